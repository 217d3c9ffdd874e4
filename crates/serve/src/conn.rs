//! One connection: what it is doing (a request in flight, reading headers, idle), and the
//! watchdog that closes it when a client stalls.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Instant;

use axum::body::Body;
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use tokio::io::{AsyncRead, ReadBuf};

use crate::Limits;

/// `u64::MAX`: not set.
const UNSET: u64 = u64::MAX;

/// After a shutdown signal, how long a request head already arriving gets to be complete
/// (at most the header timeout): a client's head comes in milliseconds, a slowloris's never,
/// and it must not hold the server's exit until its header timeout.
pub(crate) const SHUTDOWN_HEAD_GRACE: Duration = Duration::from_secs(1);

/// Shared state of one connection.
#[derive(Debug)]
pub(crate) struct Tracker {
    origin: Instant,
    in_flight: AtomicUsize,
    /// When the first byte of the next request arrived (ms since origin), while none is in flight.
    header_started: AtomicU64,
    /// When the connection last became idle (ms since origin).
    idle_since: AtomicU64,
    /// The client spoke the HTTP/2 preface: streams are multiplexed, header timing is h2's own.
    h2: AtomicBool,
    sniffed: AtomicBool,
    /// Shutting down since (ms since origin): the request in flight is the connection's last.
    closing_since: AtomicU64,
    /// Since when (ms since origin) the client has taken no byte of what is being written to it.
    send_blocked_since: AtomicU64,
    /// HTTP/2 answers in flight: since when (ms since origin) each has waited on the client to
    /// take more (`UNSET` while it waits on the app; `FREE`: no answer). An HTTP/2 client
    /// stalls a stream by not opening its flow-control window, which blocks no socket write.
    streams: std::sync::Mutex<Vec<u64>>,
}

/// A free entry of [`Tracker::streams`].
const FREE: u64 = u64::MAX - 1;

/// Why the watchdog closed a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Closed {
    HeaderTimeout,
    Idle,
    /// An answer in flight the client took no byte of for the body idle timeout (a stalled
    /// download, which would hold its request, and the Router's concurrency slot, forever).
    SendStalled,
}

impl Tracker {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self {
            origin: Instant::now(),
            in_flight: AtomicUsize::new(0),
            header_started: AtomicU64::new(UNSET),
            idle_since: AtomicU64::new(0),
            h2: AtomicBool::new(false),
            sniffed: AtomicBool::new(false),
            closing_since: AtomicU64::new(UNSET),
            send_blocked_since: AtomicU64::new(UNSET),
            streams: std::sync::Mutex::new(Vec::new()),
        })
    }

    /// The server is shutting down: no request after the one in flight.
    pub(crate) fn close_soon(&self) {
        let _ = self.closing_since.compare_exchange(
            UNSET,
            self.now_ms(),
            Ordering::AcqRel,
            Ordering::Relaxed,
        );
    }

    pub(crate) fn closing(&self) -> bool {
        self.closing_since.load(Ordering::Acquire) != UNSET
    }

    /// No request in flight, and none begun (no byte of a next request read while idle).
    pub(crate) fn quiet(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) == 0
            && self.header_started.load(Ordering::Acquire) == UNSET
    }

    fn now_ms(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64
    }

    /// A write to the client: `Pending` (its socket takes nothing) starts the stall clock,
    /// progress stops it.
    fn on_write<T>(&self, result: &Poll<io::Result<T>>, progressed: impl Fn(&T) -> bool) {
        match result {
            Poll::Pending => {
                let _ = self.send_blocked_since.compare_exchange(
                    UNSET,
                    self.now_ms(),
                    Ordering::AcqRel,
                    Ordering::Relaxed,
                );
            }
            // A load first: the hot path (a write going through) then writes nothing shared.
            Poll::Ready(Ok(v))
                if progressed(v) && self.send_blocked_since.load(Ordering::Relaxed) != UNSET =>
            {
                self.send_blocked_since.store(UNSET, Ordering::Release);
            }
            Poll::Ready(_) => {}
        }
    }

    fn on_read(&self, bytes: &[u8]) {
        if !self.sniffed.swap(true, Ordering::Relaxed) && bytes.starts_with(b"PRI * HTTP/2.0") {
            self.h2.store(true, Ordering::Relaxed);
        }
        if self.in_flight.load(Ordering::Acquire) == 0 {
            let _ = self.header_started.compare_exchange(
                UNSET,
                self.now_ms(),
                Ordering::AcqRel,
                Ordering::Relaxed,
            );
        }
    }

    /// A request's headers are in: it is in flight until its response body is done.
    pub(crate) fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.header_started.store(UNSET, Ordering::Release);
        InFlight(self.clone())
    }

    /// An HTTP/2 answer handed to hyper: it waits on the client (hyper polls its body only
    /// when the stream's window has room) until its body is polled.
    pub(crate) fn stream(self: &Arc<Self>) -> Stream {
        let now = self.now_ms();
        let mut streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        let i = match streams.iter().position(|&s| s == FREE) {
            Some(i) => i,
            None => {
                streams.push(FREE);
                streams.len() - 1
            }
        };
        streams[i] = now;
        Stream {
            tracker: self.clone(),
            i,
        }
    }

    fn set_stream(&self, i: usize, since: u64) {
        let mut streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        streams[i] = since;
    }

    /// Since when the longest-waiting HTTP/2 answer has waited on the client, if one does.
    fn stream_blocked_since(&self) -> u64 {
        let streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        streams
            .iter()
            .copied()
            .filter(|&s| s != FREE)
            .min()
            .unwrap_or(UNSET)
    }

    /// Waits until the connection has stalled, and says how. Nothing wakes it when the
    /// connection changes state (that would cost every request a wake-up): it re-checks at its
    /// deadline, and at least once per header timeout, so a request's first bytes are noticed
    /// in time to close a slowloris within twice the header timeout.
    pub(crate) async fn watchdog(&self, limits: &Limits) -> Closed {
        let recheck = limits.header_read_timeout.as_millis().max(1) as u64;
        loop {
            let now = self.now_ms();
            let wait = match self.deadline(limits) {
                Some((at, why)) if at <= now => return why,
                Some((at, _)) => (at - now).min(recheck),
                None => recheck,
            };
            tokio::time::sleep(Duration::from_millis(wait)).await;
        }
    }

    /// The moment the connection counts as stalled, if nothing changes.
    fn deadline(&self, limits: &Limits) -> Option<(u64, Closed)> {
        let ms = |d: Duration| d.as_millis() as u64;
        if self.in_flight.load(Ordering::Acquire) > 0 {
            // A request in flight is never cut for taking long, only for an answer the client
            // does not take: its socket takes no byte or, over HTTP/2, a stream's window stays
            // shut (which blocks no socket write).
            let mut blocked = self.send_blocked_since.load(Ordering::Acquire);
            if self.h2.load(Ordering::Relaxed) {
                blocked = blocked.min(self.stream_blocked_since());
            }
            return (blocked != UNSET)
                .then(|| (blocked + ms(limits.body_idle_timeout), Closed::SendStalled));
        }
        let started = self.header_started.load(Ordering::Acquire);
        if started != UNSET && !self.h2.load(Ordering::Relaxed) {
            let mut at = started + ms(limits.header_read_timeout);
            let closing = self.closing_since.load(Ordering::Acquire);
            if closing != UNSET {
                at = at.min(closing.max(started) + ms(SHUTDOWN_HEAD_GRACE));
            }
            return Some((at, Closed::HeaderTimeout));
        }
        let idle = self.idle_since.load(Ordering::Acquire);
        Some((idle + ms(limits.keep_alive_idle), Closed::Idle))
    }
}

/// A request in flight; its drop (with the response body) makes the connection idle again.
#[derive(Debug)]
pub(crate) struct InFlight(Arc<Tracker>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let t = &self.0;
        if t.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            t.idle_since.store(t.now_ms(), Ordering::Release);
        }
    }
}

/// An HTTP/2 answer's entry in its connection's [`Tracker`], freed when it is dropped.
#[derive(Debug)]
pub(crate) struct Stream {
    tracker: Arc<Tracker>,
    i: usize,
}

impl Stream {
    /// Its body was polled: it waits on the app while that is pending, on the client once a
    /// frame has been handed out (hyper polls again when the client has room for more).
    fn polled<T>(&self, polled: &Poll<Option<T>>) {
        let since = match polled {
            Poll::Ready(Some(_)) => self.tracker.now_ms(),
            _ => UNSET,
        };
        self.tracker.set_stream(self.i, since);
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.tracker.set_stream(self.i, FREE);
    }
}

/// A response body that keeps its request in flight until it is done (or dropped).
pub(crate) struct GuardedBody {
    pub(crate) inner: Body,
    /// HTTP/2 only: HTTP/1.1 stalls show as socket writes that do not go through.
    pub(crate) stream: Option<Stream>,
    pub(crate) _guard: InFlight,
}

impl http_body::Body for GuardedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Some(stream) = &self.stream {
            stream.polled(&polled);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

pin_project_lite::pin_project! {
    /// A request body that fails after an idle timeout (`tower_http`'s `TimeoutBody`), still
    /// telling how much is left and when it has ended (`TimeoutBody` does not say, which would
    /// make every body look like a stream of unknown length).
    pub(crate) struct TimedBody<B> {
        #[pin]
        inner: tower_http::timeout::TimeoutBody<B>,
        left: Option<u64>,
        ended: bool,
    }
}

impl<B: http_body::Body> TimedBody<B> {
    pub(crate) fn new(timeout: Duration, body: B) -> Self {
        Self {
            left: body.size_hint().exact(),
            ended: body.is_end_stream(),
            inner: tower_http::timeout::TimeoutBody::new(timeout, body),
        }
    }
}

impl<B> http_body::Body for TimedBody<B>
where
    B: http_body::Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = B::Data;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        use bytes::Buf as _;
        let this = self.project();
        let polled = std::task::ready!(this.inner.poll_frame(cx));
        match &polled {
            None | Some(Err(_)) => *this.ended = true,
            Some(Ok(frame)) => {
                if let (Some(left), Some(data)) = (this.left.as_mut(), frame.data_ref()) {
                    *left = left.saturating_sub(data.remaining() as u64);
                }
            }
        }
        Poll::Ready(polled)
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.left == Some(0)
    }

    fn size_hint(&self) -> SizeHint {
        match self.left {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

/// The connection's stream, reporting reads and stalled writes to its tracker.
pub(crate) struct TrackedIo<I> {
    pub(crate) io: I,
    pub(crate) tracker: Arc<Tracker>,
}

impl<I: AsyncRead + Unpin> AsyncRead for TrackedIo<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r
            && buf.filled().len() > before
        {
            self.tracker.on_read(&buf.filled()[before..]);
        }
        r
    }
}

/// `AsyncWrite` for a stream wrapper with an `io` field: every write goes straight through
/// (the wrappers only change reads).
macro_rules! writes_through {
    ($wrapper:ident) => {
        impl<I: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for $wrapper<I> {
            fn poll_write(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                buf: &[u8],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
            }
            fn poll_write_vectored(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                bufs: &[std::io::IoSlice<'_>],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
            }
            fn is_write_vectored(&self) -> bool {
                self.io.is_write_vectored()
            }
            fn poll_flush(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.io).poll_flush(cx)
            }
            fn poll_shutdown(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
            }
        }
    };
}
pub(crate) use writes_through;

impl<I: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for TrackedIo<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        self.tracker.on_write(&r, |n| *n > 0);
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.tracker.on_write(&r, |n| *n > 0);
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.io).poll_flush(cx);
        self.tracker.on_write(&r, |()| true);
        r
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            header_read_timeout: Duration::from_secs(10),
            keep_alive_idle: Duration::from_secs(90),
            ..Limits::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn idle_connections_close_after_the_keep_alive_timeout() {
        let t = Tracker::new();
        let started = tokio::time::Instant::now();
        assert_eq!(t.watchdog(&limits()).await, Closed::Idle);
        assert!(started.elapsed() >= Duration::from_secs(90));
    }

    #[tokio::test(start_paused = true)]
    async fn partial_headers_close_after_the_header_timeout() {
        let t = Tracker::new();
        tokio::time::advance(Duration::from_secs(5)).await;
        t.on_read(b"GET / HTT");
        let started = tokio::time::Instant::now();
        assert_eq!(t.watchdog(&limits()).await, Closed::HeaderTimeout);
        let waited = started.elapsed();
        assert!(waited >= Duration::from_secs(10) && waited < Duration::from_secs(11));
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_in_flight_is_never_cut() {
        let t = Tracker::new();
        let guard = t.begin();
        let dog = tokio::spawn({
            let t = t.clone();
            async move { t.watchdog(&limits()).await }
        });
        tokio::time::sleep(Duration::from_secs(3600)).await;
        assert!(
            !dog.is_finished(),
            "a long request (streaming, a long execute) stays"
        );
        drop(guard);
        tokio::time::sleep(Duration::from_secs(91)).await;
        assert_eq!(dog.await.unwrap(), Closed::Idle);
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_the_client_does_not_take_is_cut_after_the_body_idle_timeout() {
        let limits = Limits {
            body_idle_timeout: Duration::from_secs(30),
            ..limits()
        };
        let t = Tracker::new();
        let _guard = t.begin();
        let dog = tokio::spawn({
            let t = t.clone();
            async move { t.watchdog(&limits).await }
        });
        // Writes that go through, however long apart, never stall it.
        for _ in 0..10 {
            t.on_write(&Poll::<io::Result<usize>>::Pending, |n| *n > 0);
            tokio::time::sleep(Duration::from_secs(20)).await;
            t.on_write(&Poll::Ready(Ok(100usize)), |n| *n > 0);
        }
        assert!(!dog.is_finished());
        // Then the client stops reading: cut within the timeout plus one recheck.
        t.on_write(&Poll::<io::Result<usize>>::Pending, |n| *n > 0);
        let started = tokio::time::Instant::now();
        assert_eq!(dog.await.unwrap(), Closed::SendStalled);
        assert!(started.elapsed() <= Duration::from_secs(30 + 10));
    }

    fn h2_tracker() -> Arc<Tracker> {
        let t = Tracker::new();
        t.on_read(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
        t
    }

    const FRAME: Poll<Option<()>> = Poll::Ready(Some(()));

    #[tokio::test(start_paused = true)]
    async fn an_http2_answer_its_client_takes_nothing_of_is_cut_whatever_other_streams_do() {
        let limits = Limits {
            body_idle_timeout: Duration::from_secs(30),
            ..limits()
        };
        let t = h2_tracker();
        let (_a, _b) = (t.begin(), t.begin());
        let (busy, stalled) = (t.stream(), t.stream());
        let dog = tokio::spawn({
            let t = t.clone();
            async move { t.watchdog(&limits).await }
        });
        stalled.polled(&FRAME);
        let started = tokio::time::Instant::now();
        // Another stream of the same connection keeps moving: it shields nothing.
        for _ in 0..5 {
            busy.polled(&FRAME);
            busy.polled(&Poll::<Option<()>>::Pending);
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
        assert!(!dog.is_finished(), "25 s of 30");
        let cut = tokio::time::timeout(Duration::from_secs(60), dog).await;
        assert_eq!(cut.expect("not cut").unwrap(), Closed::SendStalled);
        assert!(started.elapsed() <= Duration::from_secs(30 + 10));
    }

    #[tokio::test(start_paused = true)]
    async fn an_http2_answer_waiting_on_its_app_or_taken_is_never_cut() {
        let t = h2_tracker();
        let guard = t.begin();
        let stream = t.stream();
        let dog = tokio::spawn({
            let t = t.clone();
            async move { t.watchdog(&limits()).await }
        });
        // A frame taken at once, then a long wait on the app (a long execute, an SSE stream).
        stream.polled(&FRAME);
        stream.polled(&Poll::<Option<()>>::Pending);
        tokio::time::sleep(Duration::from_secs(3600)).await;
        assert!(!dog.is_finished());
        // An answer done and dropped frees its entry; the next answer reuses it.
        drop(stream);
        let next = t.stream();
        assert_eq!(next.i, 0);
        next.polled(&Poll::<Option<()>>::Ready(None));
        tokio::time::sleep(Duration::from_secs(3600)).await;
        assert!(!dog.is_finished());
        drop((next, guard));
        assert_eq!(dog.await.unwrap(), Closed::Idle);
    }

    #[tokio::test(start_paused = true)]
    async fn http2_connections_only_idle_out() {
        let t = Tracker::new();
        t.on_read(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
        let started = tokio::time::Instant::now();
        assert_eq!(t.watchdog(&limits()).await, Closed::Idle);
        assert!(started.elapsed() >= Duration::from_secs(90));
    }
}
