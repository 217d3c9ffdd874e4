//! Writes to a peer that has stopped reading. A server may answer before it has read a
//! request's body — a 413 for an upload it refuses, a 401 — and close; the body's next write
//! then fails (a reset, a broken pipe), and whoever sends that body gives up on the whole
//! exchange, though the answer is waiting in the socket. [`AfterAnswer`] turns those write
//! errors into writes that go nowhere, so reading goes on and finds the answer; a peer that
//! closed without one still fails the exchange, at the next read (the reset or the end of the
//! stream). Used by the Router's client to sandboxes (hyper's client fails the request on the
//! write error: the client got "sandbox unreachable" instead of the sandbox's own answer; and
//! without it an upgraded connection's splice gives up before passing on the last bytes a
//! sandbox wrote before closing) and
//! by PicoD's port forward (its splice gave up on both directions at once, losing an answer
//! it had not yet passed on).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A connection whose write errors of a closed peer are swallowed (see the module
/// documentation).
#[derive(Debug)]
pub struct AfterAnswer<S> {
    io: S,
    /// The peer closed its side: what is written goes nowhere.
    deaf: bool,
}

impl<S> AfterAnswer<S> {
    pub fn new(io: S) -> Self {
        Self { io, deaf: false }
    }
}

/// The peer has closed: writing on is pointless, reading may still find its answer.
fn closed(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
    )
}

impl<S: AsyncWrite + Unpin> AfterAnswer<S> {
    /// `polled`, unless it failed because the peer closed: then `done` (a write that went
    /// nowhere), and every write after it too.
    fn unless_closed<T>(&mut self, polled: Poll<io::Result<T>>, done: T) -> Poll<io::Result<T>> {
        match polled {
            Poll::Ready(Err(e)) if closed(&e) => {
                tracing::debug!(error = %e, "the peer stopped reading; reading its answer");
                self.deaf = true;
                Poll::Ready(Ok(done))
            }
            other => other,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for AfterAnswer<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AfterAnswer<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.deaf {
            return Poll::Ready(Ok(buf.len()));
        }
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        self.unless_closed(polled, buf.len())
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let all = bufs.iter().map(|b| b.len()).sum();
        if self.deaf {
            return Poll::Ready(Ok(all));
        }
        let polled = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.unless_closed(polled, all)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.deaf {
            return Poll::Ready(Ok(()));
        }
        let polled = Pin::new(&mut self.io).poll_flush(cx);
        self.unless_closed(polled, ())
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.deaf {
            return Poll::Ready(Ok(()));
        }
        let polled = Pin::new(&mut self.io).poll_shutdown(cx);
        self.unless_closed(polled, ())
    }
}
