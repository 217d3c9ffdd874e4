//! Lingering close. A TCP socket closed while input is still unread makes the kernel answer
//! with a reset at once and discard what it had not sent yet — the end of the last answer
//! (RFC 9112 §9.6, "tear-down"). That happens whenever the server ends a connection the client
//! is still writing to: a `Connection: close` or HTTP/1.0 request with more pipelined behind it,
//! an error answered before an upload was read. So an accepted connection, once the server is
//! done with it, is half-closed (a FIN after everything queued) and read until the client
//! closes its side, for at most [`SILENCE`] without a byte and [`MOST`] in all — nginx's
//! `lingering_close`. It keeps its connection slot meanwhile. Connections the watchdog cuts
//! (stalled clients) and failed handshakes are closed at once. A connection refused over
//! `max_connections` lingers too after its 503 (a client still sending its request would
//! otherwise get a reset, not the 503), while no more than [`REFUSALS`] do (the others close at
//! once: a flood of refused connections holds a bounded number of descriptors).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::OwnedSemaphorePermit;

use crate::Stream;

/// How long a closing connection may stay silent before it is closed.
pub(crate) const SILENCE: Duration = Duration::from_secs(2);
/// How long a closing connection is read at most.
pub(crate) const MOST: Duration = Duration::from_secs(10);
/// Refused connections lingering at most at once (they hold no slot; the lingering gauge counts
/// them).
pub(crate) const REFUSALS: usize = 64;

/// An accepted connection: a [`Stream`] that lingers when dropped, if [`Armed`] says so.
#[derive(Debug)]
pub struct Accepted {
    stream: Option<Stream>,
    armed: Arc<AtomicBool>,
    slot: Option<OwnedSemaphorePermit>,
    /// Connections lingering now (the component's `connections_lingering`).
    lingering: Gauge,
}

/// Whether an [`Accepted`] connection lingers when it is dropped (not until armed).
#[derive(Debug, Clone, Default)]
pub(crate) struct Armed(Arc<AtomicBool>);

impl Armed {
    pub(crate) fn set(&self, on: bool) {
        self.0.store(on, Ordering::Release);
    }
}

impl Accepted {
    /// `slot` (the connection's place under `max_connections`) is given back when the
    /// connection is closed, after lingering.
    pub(crate) fn new(
        stream: Stream,
        slot: OwnedSemaphorePermit,
        lingering: Gauge,
    ) -> (Self, Armed) {
        let armed = Armed::default();
        let accepted = Self {
            stream: Some(stream),
            armed: armed.0.clone(),
            slot: Some(slot),
            lingering,
        };
        (accepted, armed)
    }

    /// The stream underneath (TCP or Unix).
    pub fn get_ref(&self) -> &Stream {
        self.stream.as_ref().expect("present until dropped")
    }

    fn stream(self: Pin<&mut Self>) -> Pin<&mut Stream> {
        Pin::new(
            self.get_mut()
                .stream
                .as_mut()
                .expect("present until dropped"),
        )
    }
}

impl Drop for Accepted {
    /// The slot is given back before the socket closes: a client that sees the close may
    /// connect again at once.
    fn drop(&mut self) {
        let Some(stream) = self.stream.take() else {
            return;
        };
        let slot = self.slot.take();
        let armed = self.armed.load(Ordering::Acquire);
        match tokio::runtime::Handle::try_current() {
            Ok(rt) if armed => {
                let gauge = self.lingering.clone();
                rt.spawn(async move {
                    let stream = linger(stream, &gauge).await;
                    drop(slot);
                    drop(stream);
                });
            }
            _ => {
                drop(slot);
                drop(stream);
            }
        }
    }
}

/// Half-closes `s`, then discards what arrives until the peer closes, is silent for
/// [`SILENCE`], or [`MOST`] has passed, counted in `lingering` meanwhile; `s`, to be closed.
pub(crate) async fn linger(mut s: Stream, lingering: &Gauge) -> Stream {
    lingering.inc();
    let _ = s.shutdown().await;
    let end = tokio::time::Instant::now() + MOST;
    let mut buf = vec![0; 16 * 1024];
    loop {
        let by = end.min(tokio::time::Instant::now() + SILENCE);
        match tokio::time::timeout_at(by, s.read(&mut buf)).await {
            Ok(Ok(1..)) => continue,
            _ => break,
        }
    }
    lingering.dec();
    s
}

impl AsyncRead for Accepted {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.stream().poll_read(cx, buf)
    }
}

impl AsyncWrite for Accepted {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.stream().poll_write(cx, buf)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.stream().poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.get_ref().is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.stream().poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.stream().poll_shutdown(cx)
    }
}
