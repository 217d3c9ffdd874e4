//! The Router's HTTP/1.1 keep-alive connections to sandbox entry points, one pool per worker.
//!
//! An entry point ([`Endpoint`]) keeps its idle connections. A request checks one out (the most
//! recently used), or connects when there is none; the connection goes back when the response
//! body has been read to its end — a response dropped early, or an upgraded connection, is never
//! reused. A request that a reused connection closed before sending it (a sandbox closing an idle
//! keep-alive connection) is sent again on a new connection, so the client never sees that race.
//! Idle connections older than [`IDLE_TIMEOUT`] are dropped, at most [`MAX_IDLE`] per entry point
//! are kept, and a reaper task sweeps closed and expired ones.
//!
//! Why not hyper-util's pooled client: per request it hashed the pool key with SipHash three
//! times, locked a shared pool twice and spawned a task to return the connection; here one
//! uncontended lock on the entry point's own list and no task.

use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use bytes::Bytes;
use foldhash::HashMap;
use http::header::HeaderValue;
use http::uri::Authority;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpStream, UnixStream};

use crate::proxy::Stream;

/// Idle connections older than this are not reused.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Idle connections kept per entry point (more are closed when they come back).
pub const MAX_IDLE: usize = 64;
/// How often the reaper drops closed and expired idle connections.
const SWEEP_EVERY: Duration = Duration::from_secs(30);

/// Where an entry point listens.
#[derive(Debug, Clone)]
pub enum Addr {
    Tcp { host: String, port: u16 },
    Unix(PathBuf),
}

impl Addr {
    /// A connection to this address (TCP with `TCP_NODELAY`), within `timeout`.
    pub async fn open(&self, timeout: Duration) -> io::Result<Stream> {
        let connect = async {
            Ok(match self {
                Addr::Unix(path) => Stream::Unix(UnixStream::connect(path).await?),
                Addr::Tcp { host, port } => {
                    let s = TcpStream::connect((host.as_str(), *port)).await?;
                    s.set_nodelay(true)?;
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

#[derive(Debug)]
struct Idle {
    sender: SendRequest<Body>,
    since: Instant,
}

impl Idle {
    fn usable(&self, now: Instant) -> bool {
        !self.sender.is_closed() && now.duration_since(self.since) < IDLE_TIMEOUT
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
    fn checkout(&self) -> Option<SendRequest<Body>> {
        let now = Instant::now();
        let mut idle = self.idle.lock().unwrap();
        while let Some(i) = idle.pop() {
            if i.usable(now) {
                return Some(i.sender);
            }
        }
        None
    }

    /// Keeps `sender` for the next request (unless closed, or the list is full).
    fn put_back(&self, sender: SendRequest<Body>) {
        if sender.is_closed() {
            return;
        }
        let now = Instant::now();
        let mut idle = self.idle.lock().unwrap();
        // The oldest is at the bottom: sweep when it is stale, so a busy list never keeps them.
        if idle.first().is_some_and(|i| !i.usable(now)) {
            idle.retain(|i| i.usable(now));
        }
        if idle.len() < MAX_IDLE {
            idle.push(Idle { sender, since: now });
        }
    }

    /// Drops closed and expired idle connections; `true` if none is left.
    fn sweep(&self, now: Instant) -> bool {
        let mut idle = self.idle.lock().unwrap();
        idle.retain(|i| i.usable(now));
        idle.is_empty()
    }

    async fn connect(&self, timeout: Duration) -> io::Result<SendRequest<Body>> {
        let stream = self.addr.open(timeout).await?;
        // The handshake itself writes nothing; it cannot hang.
        let (sender, conn) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(io::Error::other)?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "upstream connection ended");
            }
        });
        Ok(sender)
    }
}

/// Why a request got no response.
#[derive(Debug)]
pub enum SendError {
    Connect(io::Error),
    Http(hyper::Error),
}

impl SendError {
    pub fn as_error(&self) -> &(dyn std::error::Error + 'static) {
        match self {
            Self::Connect(e) => e,
            Self::Http(e) => e,
        }
    }
}

/// One worker's entry points and their connections.
#[derive(Clone, Default)]
pub struct Pool {
    endpoints: Arc<Mutex<HashMap<String, Arc<Endpoint>>>>,
    reaper: Arc<std::sync::OnceLock<()>>,
}

impl Pool {
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

    /// Sends `req` (origin-form URI, `Host` set) to `ep` over HTTP/1.1. On success, the response
    /// and the connection it came on, to [`Pool::finish`] or drop.
    pub async fn send(
        &self,
        ep: &Endpoint,
        mut req: Request<Body>,
        connect_timeout: Duration,
    ) -> Result<(Response<Incoming>, SendRequest<Body>), SendError> {
        // Connections passed over as busy go back to the pool however this ends.
        let mut busy = Busy {
            ep,
            senders: Vec::new(),
        };
        loop {
            let (mut sender, reused) = match ep.checkout() {
                Some(s) => (s, true),
                None => {
                    self.start_reaper();
                    // Boxed: a new connection is the rare path, and its future is large.
                    let s = Box::pin(ep.connect(connect_timeout)).await;
                    (s.map_err(SendError::Connect)?, false)
                }
            };
            if reused && !sender.is_ready() {
                // Usually the connection's task finishing the last exchange: let it run once.
                tokio::task::yield_now().await;
                if !sender.is_ready() {
                    // Still busy (say, sending the rest of a request body the sandbox answered
                    // early): another connection rather than waiting behind it.
                    if !sender.is_closed() {
                        busy.senders.push(sender);
                    }
                    continue;
                }
            }
            match sender.try_send_request(req).await {
                Ok(resp) => return Ok((resp, sender)),
                Err(mut e) => match e.take_message() {
                    // Never written (the connection closed meanwhile): safe to send again,
                    // whatever the method.
                    Some(r) if reused => req = r,
                    _ => return Err(SendError::Http(e.into_error())),
                },
            }
        }
    }

    /// The response body, which gives `sender` back to `ep` once read to its end.
    pub fn finish(ep: Arc<Endpoint>, sender: SendRequest<Body>, body: Incoming) -> Returning {
        let mut b = Returning {
            body,
            back: Some((ep, sender)),
        };
        b.release_if_done();
        b
    }

    /// One reaper per pool, on the runtime of its first connection; it ends with the pool.
    fn start_reaper(&self) {
        self.reaper.get_or_init(|| {
            let endpoints = Arc::downgrade(&self.endpoints);
            tokio::spawn(reap(endpoints));
        });
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

/// Connections a request passed over because they were still busy; back to the pool on drop.
struct Busy<'a> {
    ep: &'a Endpoint,
    senders: Vec<SendRequest<Body>>,
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        for sender in self.senders.drain(..) {
            self.ep.put_back(sender);
        }
    }
}

/// A response body that returns its connection to the pool at its end.
pub struct Returning {
    body: Incoming,
    back: Option<(Arc<Endpoint>, SendRequest<Body>)>,
}

impl Returning {
    fn release_if_done(&mut self) {
        use hyper::body::Body as _;
        if self.body.is_end_stream()
            && let Some((ep, sender)) = self.back.take()
        {
            ep.put_back(sender);
        }
    }
}

impl hyper::body::Body for Returning {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => {
                if let Some((ep, sender)) = this.back.take() {
                    ep.put_back(sender);
                }
            }
            Poll::Ready(Some(Ok(_))) => this.release_if_done(),
            // A broken body leaves its connection unusable.
            Poll::Ready(Some(Err(_))) => this.back = None,
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
