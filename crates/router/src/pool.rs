//! The Router's HTTP/1.1 keep-alive connections to sandbox entry points, one pool per worker.
//!
//! An entry point ([`Endpoint`]) keeps its idle connections. A request checks one out (the most
//! recently used), or connects when there is none; the connection goes back when the response
//! body has been read to its end — a response dropped early, one framed by the connection's
//! close, or one followed by bytes nobody asked for, is never reused. A request that a reused
//! connection failed before the sandbox answered anything (a sandbox closing an idle keep-alive
//! connection as the request went out) is sent again on a new connection, so the client never
//! sees that race: always when the request could not be written, for idempotent methods when it
//! was. Idle connections older than [`IDLE_TIMEOUT`] are dropped, at most [`MAX_IDLE`] per entry
//! point are kept, and a reaper task sweeps closed and expired ones.
//!
//! The exchange runs in the request's own task, with this crate's codec ([`crate::h1`]): the
//! request written in one go (its body is already buffered), the response head read, the body
//! read from the socket as the client takes it. No connection task, no channel between the two.
//! Requests whose body streams (unknown or large size) and upgrades go over a fresh, unpooled
//! hyper connection instead ([`Pool::send_streaming`]).
//!
//! Why not hyper-util's pooled client: per request it hashed the pool key with SipHash three
//! times, locked a shared pool twice and spawned a task to return the connection; here one
//! uncontended lock on the entry point's own list and no task.

use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use axum::body::Body;
use bytes::{Bytes, BytesMut};
use foldhash::HashMap;
use http::header::HeaderValue;
use http::uri::Authority;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::client::conn::http1;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpStream, UnixStream};

use crate::h1::{self, Chunked, Decoded, Framing};
use crate::proxy::Stream;

/// Idle connections older than this are not reused: shorter than PicoD's keep-alive (the
/// serving default, 90 s), so the Router gives an idle connection up before PicoD closes it and
/// never writes a request into that close (a POST that met it would not be sent again).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Idle connections kept per entry point (more are closed when they come back).
pub const MAX_IDLE: usize = 64;
/// How often the reaper drops closed and expired idle connections.
const SWEEP_EVERY: Duration = Duration::from_secs(30);
/// How long a connection to a sandbox may be quiet (idle in the pool, or waiting for a long
/// command's answer) before its host is asked whether it is still there: keepalive probes, every
/// [`PROBE_EVERY`], [`PROBES`] unanswered ones ending the connection. A request waiting on a
/// sandbox whose node went away without a word (its packets dropped) then ends in about a minute
/// instead of waiting as long as its client does, holding a concurrency slot; a live host
/// answers the probes whatever its sandbox is doing. The kernel sends no probes while bytes it
/// sent are unacknowledged: a request written into such a connection is bounded by
/// [`DEAD_PEER_TIMEOUT`] instead.
pub const QUIET_BEFORE_PROBE: Duration = Duration::from_secs(30);
/// See [`QUIET_BEFORE_PROBE`].
pub const PROBE_EVERY: Duration = Duration::from_secs(10);
/// See [`QUIET_BEFORE_PROBE`].
pub const PROBES: u32 = 3;

/// How long the bytes of a request written on a pooled connection may go unacknowledged by the
/// sandbox's host before the connection is given up (`TCP_USER_TIMEOUT`). Without it a request
/// written into a connection whose node went away (a pooled one, idle less than the keepalive
/// probes take) was retransmitted for the kernel's ~15 minutes (`tcp_retries2`), holding its
/// client and a concurrency slot. Linux also applies it to a peer that keeps its receive window
/// shut, so only connections whose peer never does get it: pooled HTTP/1.1 ones, whose requests
/// are at most [`crate::proxy`]'s buffered 64 KiB, which a live host's kernel acknowledges
/// whether or not its server reads them (a non-reading peer takes ~124 KiB on loopback with
/// Linux's default buffers), and h2c ones ([`crate::proxy::Connector`]). Streamed bodies (an
/// agent reading an upload at its own pace) go over connections without it. It also ends a
/// quiet connection's keepalive probes once it has passed since the host last answered.
pub const DEAD_PEER_TIMEOUT: Duration = Duration::from_secs(20);

/// Where an entry point listens.
#[derive(Debug, Clone)]
pub enum Addr {
    Tcp { host: String, port: u16 },
    Unix(PathBuf),
}

impl Addr {
    /// A connection to this address (TCP with `TCP_NODELAY` and keepalive probes), within
    /// `timeout`.
    pub async fn open(&self, timeout: Duration) -> io::Result<Stream> {
        let connect = async {
            Ok(match self {
                Addr::Unix(path) => Stream::Unix(UnixStream::connect(path).await?),
                Addr::Tcp { host, port } => {
                    let s = TcpStream::connect((host.as_str(), *port)).await?;
                    s.set_nodelay(true)?;
                    probe_when_quiet(&s)?;
                    Stream::Tcp(s)
                }
            })
        };
        match tokio::time::timeout(timeout, connect).await {
            Ok(r) => r,
            Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "connect timeout")),
        }
    }
}

/// Keepalive probes ([`QUIET_BEFORE_PROBE`]) on a connection to a sandbox.
fn probe_when_quiet(s: &TcpStream) -> io::Result<()> {
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(QUIET_BEFORE_PROBE)
        .with_interval(PROBE_EVERY)
        .with_retries(PROBES);
    socket2::SockRef::from(s).set_tcp_keepalive(&keepalive)
}

/// `TCP_USER_TIMEOUT` on a TCP connection ([`DEAD_PEER_TIMEOUT`]).
pub fn give_up_unacked_after(s: &Stream, timeout: Duration) -> io::Result<()> {
    match s {
        Stream::Tcp(s) => socket2::SockRef::from(s).set_tcp_user_timeout(Some(timeout)),
        Stream::Unix(_) => Ok(()),
    }
}

/// One entry point: how to reach it, its `Host` header, its idle connections.
#[derive(Debug)]
pub struct Endpoint {
    /// The URI authority (a synthetic `unix-…` host for Unix sockets), for the h2c client.
    pub authority: Authority,
    /// The `Host` header sent upstream over HTTP/1.1, made once.
    pub host: HeaderValue,
    addr: Addr,
    idle: Mutex<Vec<Idle>>,
}

/// A connection with nothing in flight.
#[derive(Debug)]
struct Idle {
    conn: Conn,
    since: Instant,
}

impl Idle {
    fn usable(&self, now: Instant) -> bool {
        now.duration_since(self.since) < IDLE_TIMEOUT && !self.conn.closed()
    }
}

/// An HTTP/1.1 connection to an entry point and what has been read from it but not used.
pub struct Conn {
    io: Stream,
    buf: BytesMut,
    /// How much to make room for before the next read (grows while reads fill it).
    read_size: usize,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("buffered", &self.buf.len())
            .finish()
    }
}

/// The first read's room; reads that fill it double it, up to [`MAX_READ`].
const FIRST_READ: usize = 8 * 1024;
const MAX_READ: usize = 256 * 1024;
/// Body pieces up to this size are copied out of the read buffer (see [`Conn::take`]).
const COPY_BELOW: usize = 4 * 1024;

impl Conn {
    fn new(io: Stream) -> Self {
        Self {
            io,
            buf: BytesMut::new(),
            read_size: FIRST_READ,
        }
    }

    /// Whether the sandbox closed this idle connection (or sent something nobody asked for),
    /// found out without waiting: the readiness the runtime already has, then a non-blocking
    /// read only if it says readable.
    fn closed(&self) -> bool {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match self.io.poll_read_ready(&mut cx) {
            Poll::Pending => false,
            Poll::Ready(Err(_)) => true,
            Poll::Ready(Ok(())) => !matches!(
                self.io.try_read(&mut [0u8; 1]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock
            ),
        }
    }

    /// Gives back a read buffer grown by a large answer, so idle connections hold little.
    fn shrink(&mut self) {
        if self.buf.capacity() > 2 * FIRST_READ {
            self.buf = BytesMut::new();
            self.read_size = FIRST_READ;
        }
    }

    /// Reads more into `buf`; the number of bytes (0 at the end of the stream).
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        self.buf.reserve(self.read_size);
        let room = self.buf.capacity() - self.buf.len();
        let n = ready!(tokio_util::io::poll_read_buf(
            Pin::new(&mut self.io),
            cx,
            &mut self.buf
        ))?;
        if n == room {
            self.read_size = (self.read_size * 2).min(MAX_READ);
        }
        Poll::Ready(Ok(n))
    }

    /// The first `n` buffered bytes. Small pieces are copied out, so the read buffer stays this
    /// connection's own and is reused by the next read instead of allocated again.
    fn take(&mut self, n: usize) -> Bytes {
        if n <= COPY_BELOW {
            let data = Bytes::copy_from_slice(&self.buf[..n]);
            bytes::Buf::advance(&mut self.buf, n);
            data
        } else {
            self.buf.split_to(n).freeze()
        }
    }

    async fn fill(&mut self) -> io::Result<usize> {
        std::future::poll_fn(|cx| self.poll_fill(cx)).await
    }
}

impl Endpoint {
    pub fn new(authority: Authority, host: HeaderValue, addr: Addr) -> Self {
        Self {
            authority,
            host,
            addr,
            idle: Mutex::default(),
        }
    }

    /// The socket path of a Unix-socket entry point.
    pub fn unix_path(&self) -> Option<&std::path::Path> {
        match &self.addr {
            Addr::Unix(path) => Some(path),
            Addr::Tcp { .. } => None,
        }
    }

    /// The most recently returned usable idle connection, if any.
    fn checkout(&self) -> Option<Conn> {
        let now = Instant::now();
        let mut idle = self.idle.lock().unwrap();
        while let Some(i) = idle.pop() {
            if i.usable(now) {
                return Some(i.conn);
            }
        }
        None
    }

    /// Keeps `conn` for the next request (unless the list is full).
    fn put_back(&self, mut conn: Conn) {
        conn.shrink();
        let now = Instant::now();
        let mut idle = self.idle.lock().unwrap();
        // The oldest is at the bottom: sweep when it is stale, so a busy list never keeps them.
        if idle.first().is_some_and(|i| !i.usable(now)) {
            idle.retain(|i| i.usable(now));
        }
        if idle.len() < MAX_IDLE {
            idle.push(Idle { conn, since: now });
        }
    }

    /// Drops closed and expired idle connections; `true` if none is left.
    fn sweep(&self, now: Instant) -> bool {
        let mut idle = self.idle.lock().unwrap();
        idle.retain(|i| i.usable(now));
        idle.is_empty()
    }
}

/// A request ready to go: its bytes (head and body), and what decides how it may be retried
/// and how its response is framed.
pub struct Outgoing<'a> {
    pub wire: &'a [u8],
    pub head_request: bool,
    /// RFC 9110 §9.2.2: safe to send again when a reused connection dropped it unanswered.
    pub idempotent: bool,
    /// The answer's fields are to be relayed, without this one, when its body has a length
    /// (`h1::Fields::Relay`).
    pub relay_without: Option<&'a http::HeaderName>,
}

/// Why a request got no response.
#[derive(Debug)]
pub enum SendError {
    Connect(io::Error),
    Io(io::Error),
    Http(hyper::Error),
}

impl SendError {
    pub fn as_error(&self) -> &(dyn std::error::Error + 'static) {
        match self {
            Self::Connect(e) | Self::Io(e) => e,
            Self::Http(e) => e,
        }
    }
}

/// How one exchange on a connection failed.
enum Failed {
    /// The request could not be written.
    Unsent(io::Error),
    /// Written, and the connection ended before a single byte of an answer.
    Unanswered(io::Error),
    /// The sandbox's answer was broken.
    Answer(io::Error),
}

/// One worker's entry points and their connections.
#[derive(Clone)]
pub struct Pool {
    endpoints: Arc<Mutex<HashMap<String, Arc<Endpoint>>>>,
    reaper: Arc<std::sync::OnceLock<()>>,
    /// [`DEAD_PEER_TIMEOUT`], or a test's.
    dead_peer_timeout: Duration,
}

impl Pool {
    /// An empty pool whose connections give up a host that stops acknowledging a request after
    /// `dead_peer_timeout` ([`DEAD_PEER_TIMEOUT`]).
    pub fn new(dead_peer_timeout: Duration) -> Self {
        Self {
            endpoints: Arc::default(),
            reaper: Arc::default(),
            dead_peer_timeout,
        }
    }

    /// The entry point named `endpoint`, made by `make` the first time.
    pub fn endpoint<E>(
        &self,
        endpoint: &str,
        make: impl FnOnce() -> Result<Endpoint, E>,
    ) -> Result<Arc<Endpoint>, E> {
        if let Some(e) = self.endpoints.lock().unwrap().get(endpoint) {
            return Ok(e.clone());
        }
        let made = Arc::new(make()?);
        let mut map = self.endpoints.lock().unwrap();
        Ok(map.entry(endpoint.to_string()).or_insert(made).clone())
    }

    /// Sends `req` to `ep` on a pooled connection; the response head, and its body, which
    /// gives the connection back at its end.
    #[expect(
        clippy::manual_async_fn,
        reason = "an `async fn` would copy its arguments into its future once more"
    )]
    pub fn send<'a>(
        &'a self,
        ep: &'a Arc<Endpoint>,
        req: &'a Outgoing<'a>,
        connect_timeout: Duration,
    ) -> impl Future<Output = Result<Received, SendError>> + Send + 'a {
        async move {
            loop {
                let (mut conn, reused) = match ep.checkout() {
                    Some(c) => (c, true),
                    None => {
                        self.start_reaper();
                        // Boxed: a new connection is the rare path, and its future is large.
                        let io = Box::pin(ep.addr.open(connect_timeout)).await;
                        let io = io.map_err(SendError::Connect)?;
                        give_up_unacked_after(&io, self.dead_peer_timeout)
                            .map_err(SendError::Connect)?;
                        (Conn::new(io), false)
                    }
                };
                let failed = match exchange(&mut conn, req).await {
                    Ok(head) => return Ok(Returning::received(ep, conn, head)),
                    Err(f) => f,
                };
                match failed {
                    Failed::Unsent(_) if reused => continue,
                    Failed::Unanswered(_) if reused && req.idempotent => continue,
                    Failed::Unsent(e) | Failed::Unanswered(e) | Failed::Answer(e) => {
                        return Err(SendError::Io(e));
                    }
                }
            }
        }
    }

    /// Sends `req` over a new hyper connection of its own, for requests whose body streams and
    /// for upgrades (hyper drives the body and the answer concurrently, and hands over the
    /// upgraded connection). The connection is not pooled.
    pub async fn send_streaming(
        &self,
        ep: &Endpoint,
        req: Request<Body>,
        connect_timeout: Duration,
    ) -> Result<Response<Incoming>, SendError> {
        let stream = ep
            .addr
            .open(connect_timeout)
            .await
            .map_err(SendError::Connect)?;
        // The handshake itself writes nothing; it cannot hang.
        // An answer the sandbox gives before it has read the whole body is read, not lost to
        // the failed write after it; so are the last bytes of an upgraded connection (tunnel)
        // the sandbox closed while the client was still sending.
        let stream = agentcube_serve::AfterAnswer::new(stream);
        let (mut sender, conn) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(SendError::Http)?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "upstream connection ended");
            }
        });
        sender.send_request(req).await.map_err(SendError::Http)
    }

    /// One reaper per pool, on the runtime of its first connection; it ends with the pool.
    fn start_reaper(&self) {
        self.reaper.get_or_init(|| {
            let endpoints = Arc::downgrade(&self.endpoints);
            tokio::spawn(reap(endpoints));
        });
    }
}

/// Writes the request and reads the final response head.
async fn exchange(conn: &mut Conn, req: &Outgoing<'_>) -> Result<h1::Head, Failed> {
    conn.io.write_all(req.wire).await.map_err(Failed::Unsent)?;
    let mut heard = false;
    loop {
        if heard
            && let Some(head) =
                h1::parse_response(&mut conn.buf, req.head_request, req.relay_without)
                    .map_err(Failed::Answer)?
        {
            return Ok(head);
        }
        let read = conn.fill().await;
        match (read, heard) {
            (Ok(0), false) => return Err(Failed::Unanswered(io::ErrorKind::UnexpectedEof.into())),
            (Ok(0), true) => return Err(Failed::Answer(io::ErrorKind::UnexpectedEof.into())),
            (Ok(_), _) => heard = true,
            (Err(e), false) => return Err(Failed::Unanswered(e)),
            (Err(e), true) => return Err(Failed::Answer(e)),
        }
    }
}

async fn reap(endpoints: Weak<Mutex<HashMap<String, Arc<Endpoint>>>>) {
    loop {
        tokio::time::sleep(SWEEP_EVERY).await;
        let Some(endpoints) = endpoints.upgrade() else {
            return;
        };
        let now = Instant::now();
        // Entry points with nothing idle and no request in flight are forgotten (and made
        // again on their next request).
        endpoints
            .lock()
            .unwrap()
            .retain(|_, ep| !(ep.sweep(now) && Arc::strong_count(ep) == 1));
    }
}

/// A sandbox's answer on a pooled connection: its status, its fields, its body.
pub struct Received {
    pub status: http::StatusCode,
    pub fields: h1::Fields,
    pub body: Returning,
}

/// Where a response body is.
#[derive(Debug, Clone, Copy)]
enum Reading {
    Length(u64),
    Chunked(Chunked),
    UntilClose,
    Done,
}

/// A response body read from its connection as it is polled; the connection goes back to its
/// entry point at the body's end when it can carry another request.
pub struct Returning {
    conn: Option<Conn>,
    reading: Reading,
    /// Where the connection goes back to; `None` when it cannot be reused.
    back: Option<Arc<Endpoint>>,
}

impl Returning {
    fn received(ep: &Arc<Endpoint>, conn: Conn, head: h1::Head) -> Received {
        let reading = match head.framing {
            Framing::Empty => Reading::Length(0),
            Framing::Length(n) => Reading::Length(n),
            Framing::Chunked => Reading::Chunked(Chunked::Size),
            Framing::UntilClose => Reading::UntilClose,
        };
        let mut body = Self {
            conn: Some(conn),
            reading,
            back: head.keep_alive.then(|| ep.clone()),
        };
        if matches!(body.reading, Reading::Length(0)) {
            body.end();
        }
        Received {
            status: head.status,
            fields: head.fields,
            body,
        }
    }

    /// The body has been read to its end: the connection goes back if it is clean.
    fn end(&mut self) {
        self.reading = Reading::Done;
        if let (Some(conn), Some(ep)) = (self.conn.take(), self.back.take())
            && conn.buf.is_empty()
        {
            ep.put_back(conn);
        }
    }

    fn fail(&mut self, e: io::Error) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        self.reading = Reading::Done;
        self.conn = None;
        Poll::Ready(Some(Err(e)))
    }

    /// The next frame from what is buffered, if there is one.
    fn buffered(&mut self) -> io::Result<Option<Frame<Bytes>>> {
        let Some(conn) = self.conn.as_mut() else {
            return Ok(None);
        };
        let (frame, ended) = match &mut self.reading {
            Reading::Length(left) if !conn.buf.is_empty() => {
                let take = usize::try_from(*left)
                    .unwrap_or(usize::MAX)
                    .min(conn.buf.len());
                let data = conn.take(take);
                *left -= take as u64;
                (Some(Frame::data(data)), *left == 0)
            }
            Reading::Chunked(state) => match h1::decode_chunked(&mut conn.buf, state)? {
                Decoded::Data(n) => (Some(Frame::data(conn.take(n))), false),
                Decoded::Trailers(t) => (Some(Frame::trailers(t)), true),
                Decoded::End => (None, true),
                Decoded::More => (None, false),
            },
            Reading::UntilClose if !conn.buf.is_empty() => {
                (Some(Frame::data(conn.take(conn.buf.len()))), false)
            }
            _ => (None, false),
        };
        if ended {
            self.end();
        }
        Ok(frame)
    }
}

impl hyper::body::Body for Returning {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = &mut *self;
        loop {
            match this.buffered() {
                Ok(Some(frame)) => return Poll::Ready(Some(Ok(frame))),
                Ok(None) => {}
                Err(e) => return this.fail(e),
            }
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match ready!(conn.poll_fill(cx)) {
                Ok(0) if matches!(this.reading, Reading::UntilClose) => {
                    this.reading = Reading::Done;
                    this.conn = None;
                    return Poll::Ready(None);
                }
                Ok(0) => return this.fail(io::ErrorKind::UnexpectedEof.into()),
                Ok(_) => {}
                Err(e) => return this.fail(e),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.reading, Reading::Done)
    }

    fn size_hint(&self) -> SizeHint {
        match self.reading {
            Reading::Length(n) => SizeHint::with_exact(n),
            Reading::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[tokio::test]
    async fn idle_connections_give_back_read_buffers_grown_by_large_answers() {
        let (a, _b) = UnixStream::pair().unwrap();
        let mut c = Conn::new(Stream::Unix(a));
        c.buf.reserve(FIRST_READ);
        let small = c.buf.capacity();
        c.shrink();
        assert_eq!(c.buf.capacity(), small, "a first read's buffer is kept");
        c.buf.reserve(MAX_READ);
        c.read_size = MAX_READ;
        c.shrink();
        assert_eq!((c.buf.capacity(), c.read_size), (0, FIRST_READ));
    }

    /// The kernel's keepalive is what ends a connection whose host went away while a request
    /// waits on it; `Addr::open` must ask for it, with the timing above.
    #[tokio::test]
    async fn connections_to_sandboxes_are_probed_when_quiet() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let addr = Addr::Tcp {
            host: "127.0.0.1".into(),
            port,
        };
        let Stream::Tcp(s) = addr.open(Duration::from_secs(1)).await.unwrap() else {
            panic!("a TCP address gives a TCP stream");
        };
        assert_probed_when_quiet(&s);
    }

    /// Fails unless `s` has `TCP_NODELAY` and the keepalive timing above.
    fn assert_probed_when_quiet(s: &TcpStream) {
        let sock = socket2::SockRef::from(s);
        assert!(sock.keepalive().unwrap());
        assert_eq!(sock.tcp_keepalive_time().unwrap(), QUIET_BEFORE_PROBE);
        assert_eq!(sock.tcp_keepalive_interval().unwrap(), PROBE_EVERY);
        assert_eq!(sock.tcp_keepalive_retries().unwrap(), PROBES);
        assert!(s.nodelay().unwrap());
    }

    #[test]
    fn idle_connections_are_given_up_before_picod_closes_them() {
        let picod = agentcube_serve::Limits::default().keep_alive_idle;
        assert!(
            IDLE_TIMEOUT + Duration::from_secs(10) <= picod,
            "the pool keeps idle connections {IDLE_TIMEOUT:?}, PicoD {picod:?}"
        );
    }
}
