//! The HTTP/1.1 fast lane: plain requests are parsed and answered here, with no per-request
//! machinery beyond the app itself; the first request it does not take ([`request`] says
//! which) hands the connection, with every byte read so far, to hyper for the rest of its
//! life. hyper thus still answers everything unusual (chunked uploads, large bodies, upgrades,
//! h2c, `Expect`, HTTP/1.0, malformed heads with their 400/431/505).
//!
//! Main flow of [`Lane::run`], per request:
//! 1. Read until [`request::parse`] has a whole request (head and body), or rules the lane out
//!    ([`End::Hyper`]).
//! 2. Call the app; meanwhile read ahead on the client side, so a client that goes away drops
//!    the handler (hyper's `half_close(false)`), and pipelined bytes are kept.
//! 3. Write the head as hyper would ([`response::encode`]; an answer whose fields the app wrote
//!    itself, [`crate::Relayed`], with [`response::relayed`]) and the body by its framing; a
//!    body that fails or falls short closes the connection.
//! 4. Keep the connection unless either side asked to close or the server is shutting down.

use std::future::{Future, poll_fn};
use std::io;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use bytes::{Buf, Bytes, BytesMut};
use http_body::{Body as _, Frame};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::Instant;
use tokio_util::io::poll_read_buf;

use crate::conn::Tracker;
use crate::{LaneResponse, Routes, Stats};

pub(crate) mod request;
pub(crate) mod response;

use request::{Asks, Parsed};
use response::{BodyLen, Framing};

/// How much the lane reads ahead of the request it is answering (pipelined requests).
const READ_AHEAD: usize = request::MAX_HEAD + request::MAX_BODY;
/// How long a body may take to follow its head before hyper takes the request (clients often
/// write the head and the body separately; a slow upload is hyper's, with its idle timeout), at
/// most: never more than a quarter of the body idle timeout, so a stalled upload is cut at most
/// a quarter later than on hyper alone.
const BODY_GRACE: Duration = Duration::from_secs(1);
/// Body chunks up to this size are copied next to their framing; larger ones are written as
/// they are.
const COPY_UP_TO: usize = 16 * 1024;

/// How the lane left the connection.
pub(crate) enum End<I> {
    /// Closed (either side asked, the client went away, or an answer could not be finished).
    Closed,
    /// hyper's from here: the stream, replaying what the lane read and did not use. `after`:
    /// the lane answered requests on it first (then it stays HTTP/1.1).
    Hyper { io: Rewind<I>, after: bool },
}

/// The client went away, or its connection failed: stop.
struct Gone;

/// One connection in the lane.
pub(crate) struct Lane<I> {
    io: I,
    buf: BytesMut,
    out: Vec<u8>,
    date: response::Date,
    answered: bool,
    body_grace: Duration,
}

enum Next {
    Request(request::LaneRequest, Asks),
    Hyper,
    Closed,
}

impl<I: AsyncRead + AsyncWrite + Unpin> Lane<I> {
    /// The lane on `io`, whose request bodies fail after `body_idle_timeout` without a byte.
    pub(crate) fn new(io: I, body_idle_timeout: Duration) -> Self {
        Self {
            io,
            buf: BytesMut::new(),
            out: Vec::new(),
            date: response::Date::default(),
            answered: false,
            body_grace: BODY_GRACE.min(body_idle_timeout / 4),
        }
    }

    /// Serves requests until the connection closes or hyper has to take it.
    pub(crate) async fn run(
        mut self,
        app: &Routes,
        peer: Option<SocketAddr>,
        tracker: &Arc<Tracker>,
        stats: &Stats,
    ) -> End<I> {
        loop {
            let (req, asks) = match self.next_request().await {
                Next::Request(req, asks) => (req, asks),
                Next::Closed => return End::Closed,
                Next::Hyper => {
                    return End::Hyper {
                        after: self.answered,
                        io: Rewind::new(self.buf.freeze(), self.io),
                    };
                }
            };
            let in_flight = tracker.begin();
            stats.fast_requests.inc();
            self.answered = true;
            let answer = app.clone().answer_lane(req, peer);
            let Ok(resp) = self.watching(pin!(answer)).await else {
                return End::Closed;
            };
            let asks = Asks {
                keep_alive: asks.keep_alive && !tracker.closing(),
                ..asks
            };
            let kept = self.respond(resp, asks).await;
            drop(in_flight);
            if !matches!(kept, Ok(true)) || tracker.closing() {
                let _ = self.io.shutdown().await;
                return End::Closed;
            }
        }
    }

    /// The next request, whole. A body that has not all arrived within the body grace of its
    /// head (a slow upload) is hyper's to time out, with the head and what came of the body.
    async fn next_request(&mut self) -> Next {
        let mut body_until = None;
        loop {
            if !self.buf.is_empty() {
                match request::parse(&mut self.buf) {
                    Parsed::Ready(req, asks) => return Next::Request(req, asks),
                    Parsed::Hyper => return Next::Hyper,
                    Parsed::Body => {
                        body_until.get_or_insert_with(|| Instant::now() + self.body_grace);
                    }
                    Parsed::Partial => {}
                }
            }
            self.buf.reserve(4096);
            let read = poll_fn(|cx| poll_read_buf(Pin::new(&mut self.io), cx, &mut self.buf));
            let read = match body_until {
                Some(at) => match tokio::time::timeout_at(at, read).await {
                    Ok(read) => read,
                    Err(_) => return Next::Hyper,
                },
                None => read.await,
            };
            match read {
                Ok(0) | Err(_) => return Next::Closed,
                Ok(_) => {}
            }
        }
    }

    /// Waits for `work` while watching the client: bytes it sends are kept (up to
    /// [`READ_AHEAD`]); its end of the connection closing stops the wait.
    async fn watching<F: Future>(&mut self, mut work: Pin<&mut F>) -> Result<F::Output, Gone> {
        poll_fn(|cx| {
            if let Poll::Ready(out) = work.as_mut().poll(cx) {
                return Poll::Ready(Ok(out));
            }
            self.poll_client(cx).map(|()| Err(Gone))
        })
        .await
    }

    /// Ready when the client has closed its side (or the connection failed). Reads into the
    /// room the buffer has left, growing it only when there is none: the request being
    /// answered still shares the buffer, so growing it means a new allocation, on every
    /// request (the buffer is whole again, and reused, once the request has been dropped).
    fn poll_client(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        while self.buf.len() < READ_AHEAD {
            if self.buf.capacity() == self.buf.len() {
                self.buf.reserve(4096);
            }
            match poll_read_buf(Pin::new(&mut self.io), cx, &mut self.buf) {
                Poll::Ready(Ok(0) | Err(_)) => return Poll::Ready(()),
                Poll::Ready(Ok(_)) => {}
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Pending
    }

    /// Writes `resp`; `Ok(true)` when the connection stays open for another request.
    async fn respond(&mut self, resp: LaneResponse, asks: Asks) -> Result<bool, Gone> {
        match resp {
            LaneResponse::Relayed(r) if !response::bodiless(r.status) => {
                self.out.clear();
                let head = response::relayed(&r, asks.keep_alive, &mut self.date, &mut self.out);
                self.send_length(pin!(r.body), r.len).await?;
                self.flush_out().await?;
                Ok(!head.last)
            }
            resp => self.respond_http(resp.into(), asks).await,
        }
    }

    /// Writes `resp` as hyper would. Trailers go out only when the request asked for them
    /// (`TE: trailers`) and the response declared them (`Trailer`), as with hyper.
    async fn respond_http(
        &mut self,
        resp: axum::response::Response,
        asks: Asks,
    ) -> Result<bool, Gone> {
        let (mut parts, body) = resp.into_parts();
        let len = if body.is_end_stream() {
            BodyLen::None
        } else {
            body.size_hint()
                .exact()
                .map_or(BodyLen::Unknown, BodyLen::Known)
        };
        self.out.clear();
        let status = parts.status;
        let head = response::encode(
            status,
            &mut parts.headers,
            len,
            asks.keep_alive,
            &mut self.date,
            &mut self.out,
        )
        .map_err(|_| Gone)?;
        let mut body = pin!(body);
        match head.framing {
            Framing::Length(0) => {}
            Framing::Length(n) => self.send_length(body.as_mut(), n).await?,
            Framing::Chunked(declared) => {
                let declared = declared.filter(|_| asks.trailers);
                self.send_chunked(body.as_mut(), declared).await?
            }
        }
        self.flush_out().await?;
        Ok(!head.last)
    }

    async fn send_length(&mut self, mut body: Pin<&mut Body>, mut left: u64) -> Result<(), Gone> {
        while left > 0 {
            let Some(frame) = self.next_frame(body.as_mut()).await? else {
                return Err(Gone);
            };
            if let Ok(mut data) = frame.into_data() {
                if (data.len() as u64) > left {
                    data.truncate(left as usize);
                }
                left -= data.len() as u64;
                self.put(&data, None).await?;
            }
        }
        Ok(())
    }

    async fn send_chunked(
        &mut self,
        mut body: Pin<&mut Body>,
        declared: Option<Vec<http::HeaderName>>,
    ) -> Result<(), Gone> {
        while let Some(frame) = self.next_frame(body.as_mut()).await? {
            match frame.into_data() {
                Ok(data) if data.is_empty() => {}
                Ok(data) => {
                    let size = format!("{:X}\r\n", data.len());
                    self.put(&data, Some(size.as_bytes())).await?;
                }
                Err(frame) => {
                    let section = match (frame.trailers_ref(), &declared) {
                        (Some(t), Some(d)) => response::trailer_section(t, d),
                        _ => None,
                    };
                    if let Some(section) = section {
                        self.out.extend_from_slice(&section);
                        return Ok(());
                    }
                }
            }
        }
        self.out.extend_from_slice(b"0\r\n\r\n");
        Ok(())
    }

    /// The body's next frame; what is pending goes out before waiting for it.
    async fn next_frame(&mut self, mut body: Pin<&mut Body>) -> Result<Option<Frame<Bytes>>, Gone> {
        let now = poll_fn(|cx| Poll::Ready(body.as_mut().poll_frame(cx))).await;
        let polled = match now {
            Poll::Ready(frame) => frame,
            Poll::Pending => {
                self.flush_out().await?;
                let next = poll_fn(|cx| body.as_mut().poll_frame(cx));
                self.watching(pin!(next)).await?
            }
        };
        polled.transpose().map_err(|_| Gone)
    }

    /// Queues a data chunk (with its chunk-size line when chunked).
    async fn put(&mut self, data: &Bytes, size: Option<&[u8]>) -> Result<(), Gone> {
        if let Some(size) = size {
            self.out.extend_from_slice(size);
        }
        if data.len() <= COPY_UP_TO {
            self.out.extend_from_slice(data);
        } else {
            self.flush_out().await?;
            self.io.write_all(data).await.map_err(|_| Gone)?;
        }
        if size.is_some() {
            self.out.extend_from_slice(b"\r\n");
        }
        Ok(())
    }

    async fn flush_out(&mut self) -> Result<(), Gone> {
        if !self.out.is_empty() {
            self.io.write_all(&self.out).await.map_err(|_| Gone)?;
            self.out.clear();
            if self.out.capacity() > 4 * COPY_UP_TO {
                self.out = Vec::new();
            }
        }
        self.io.flush().await.map_err(|_| Gone)
    }
}

/// A stream that first replays bytes already read from it.
pub(crate) struct Rewind<I> {
    pre: Bytes,
    io: I,
}

impl<I> Rewind<I> {
    pub(crate) fn new(pre: Bytes, io: I) -> Self {
        Self { pre, io }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Rewind<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.pre.is_empty() {
            return Pin::new(&mut self.io).poll_read(cx, buf);
        }
        let n = self.pre.len().min(buf.remaining());
        buf.put_slice(&self.pre[..n]);
        self.pre.advance(n);
        Poll::Ready(Ok(()))
    }
}

crate::conn::writes_through!(Rewind);

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// While a request is answered it shares the read buffer, so watching the client must not
    /// grow the buffer (a new allocation on every request) while it still has room.
    #[tokio::test]
    async fn watching_the_client_reads_into_the_room_left_without_a_new_buffer() {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let mut lane = Lane::new(server, Duration::from_secs(30));
        client
            .write_all(b"GET /a HTTP/1.1\r\nhost: h\r\n\r\n")
            .await
            .unwrap();
        let Next::Request(req, _) = lane.next_request().await else {
            panic!("not taken by the lane");
        };
        let at = lane.buf.as_ptr();
        client.write_all(b"GET /b HTTP/1.1\r\n").await.unwrap();
        let polled = poll_fn(|cx| Poll::Ready(lane.poll_client(cx))).await;
        assert!(polled.is_pending(), "the client is still there");
        assert_eq!(
            lane.buf.as_ptr(),
            at,
            "a new buffer while the request holds the old one"
        );
        assert_eq!(
            &lane.buf[..],
            b"GET /b HTTP/1.1\r\n",
            "what the client sent is kept"
        );
        drop(req);
    }
}
