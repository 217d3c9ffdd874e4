//! Forwarding a request to a sandbox entry point: pooled keep-alive connections over TCP or Unix
//! sockets, bodies streamed both ways, hop-by-hop headers handled, WebSocket upgrades spliced.

use foldhash::HashMap;
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use agentcube_serve::LaneRequest;
use agentcube_types::EntryPoint;
use axum::body::Body;
use axum::extract::Request;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Method, Uri};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

use crate::error::RouterError;
use crate::h1::{self, HOP_BY_HOP};
use crate::pool::{self, Addr, Endpoint, Pool};

/// A connection to a sandbox.
pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    pub fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            Self::Tcp(s) => s.poll_read_ready(cx),
            Self::Unix(s) => s.poll_read_ready(cx),
        }
    }

    pub fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Tcp(s) => s.try_read(buf),
            Self::Unix(s) => s.try_read(buf),
        }
    }
}

impl Connection for Stream {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Self::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Self::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_flush(cx),
            Self::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Self::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// Unix socket paths are carried to the h2c client's connector through a synthetic host
/// `unix-<hash>`, so that client's pool keys connections per socket.
#[derive(Clone, Default)]
struct UnixHosts(Arc<Mutex<HashMap<String, PathBuf>>>);

impl UnixHosts {
    /// The synthetic host of a socket path (also its `Host` header over HTTP/1.1).
    fn host_of(path: &str) -> String {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        path.hash(&mut h);
        format!("unix-{:016x}", h.finish())
    }

    /// Makes `host` connectable by the h2c client (only h2c requests need it).
    fn register(&self, host: &str, path: &std::path::Path) {
        let mut map = self.0.lock().unwrap();
        if !map.contains_key(host) {
            map.insert(host.to_string(), path.to_path_buf());
        }
    }
}

/// Connects to `host:port` over TCP, or to a registered Unix socket. A TCP connection gives up a
/// host that leaves its bytes unacknowledged for the dead-peer bound (`TCP_USER_TIMEOUT`,
/// [`pool::DEAD_PEER_TIMEOUT`]): safe over HTTP/2, whose peer's stack reads the connection
/// whatever its streams do (its flow control, not TCP's window, holds back what an application
/// has not read). HTTP/2 PINGs would do it too, but gRPC servers close a connection pinged
/// more often than every 5 minutes by default (`too_many_pings`), long quiet streams with it.
#[derive(Clone)]
pub struct Connector {
    unix: UnixHosts,
    connect_timeout: Duration,
    dead_peer_timeout: Duration,
}

impl tower::Service<Uri> for Connector {
    type Response = TokioIo<Stream>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let host = uri.host().unwrap_or_default().to_string();
        let addr = match self.unix.0.lock().unwrap().get(&host) {
            Some(path) => Addr::Unix(path.clone()),
            None => Addr::Tcp {
                host,
                port: uri.port_u16().unwrap_or(80),
            },
        };
        let (timeout, dead_peer) = (self.connect_timeout, self.dead_peer_timeout);
        Box::pin(async move {
            let stream = addr.open(timeout).await?;
            pool::give_up_unacked_after(&stream, dead_peer)?;
            Ok(TokioIo::new(stream))
        })
    }
}

/// Which `unix:` entry points the Router connects to. Entry points come from the session store:
/// whoever can write it could otherwise aim the Router, with its clients' requests, at any
/// socket on the host (a container runtime's, say).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UnixEntryPoints {
    /// Any path (the library's default, for tests).
    Any,
    /// Only sockets below this directory (the local manager's `<state>/private`), by a plain
    /// absolute path without `.` or `..`.
    Under(PathBuf),
    /// None (a cluster's entry points are pod IPs).
    Refused,
}

impl UnixEntryPoints {
    /// `Ok` when `path` may be connected to; otherwise what to tell the operator.
    pub fn check(&self, path: &str) -> Result<(), String> {
        use std::path::Component;
        let p = std::path::Path::new(path);
        match self {
            Self::Any => Ok(()),
            Self::Under(dir)
                if p.is_absolute()
                    && p.components()
                        .all(|c| !matches!(c, Component::ParentDir | Component::CurDir))
                    && p.starts_with(dir)
                    && p != dir =>
            {
                Ok(())
            }
            Self::Under(dir) => Err(format!(
                "entry point unix:{path} is not below {} (--unix-socket-dir): not connected",
                dir.display()
            )),
            Self::Refused => Err(format!(
                "entry point unix:{path}: this Router connects to no Unix sockets (start it with \
                 --unix-socket-dir <the local manager's state directory>/private)"
            )),
        }
    }
}

/// The upstream client of one worker: its own HTTP/1.1 pool ([`crate::pool`]), and hyper-util's
/// client for prior-knowledge HTTP/2 (h2c) entry points.
#[derive(Clone)]
pub struct Upstream {
    connect_timeout: Duration,
    dead_peer_timeout: Duration,
    unix_entry_points: UnixEntryPoints,
    pool: Pool,
    /// Prior-knowledge HTTP/2 (h2c), used when the client itself speaks HTTP/2 (e.g. gRPC).
    h2c: Client<Connector, Body>,
    unix: UnixHosts,
}

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// The first value of a header that is not one of HTTP's standard ones, by a scan of the
/// request's few headers: cheaper than the hash of its name `HeaderMap::get` computes.
pub(crate) fn custom_header<'a>(h: &'a HeaderMap, name: &HeaderName) -> Option<&'a HeaderValue> {
    h.iter().find_map(|(n, v)| (n == name).then_some(v))
}

/// One pass over the (few) headers present, rather than a lookup per hop-by-hop name.
fn has_hop_by_hop(h: &HeaderMap) -> bool {
    h.keys().any(|k| HOP_BY_HOP.contains(k))
}

fn strip_hop_by_hop(h: &mut HeaderMap) {
    if !has_hop_by_hop(h) {
        return;
    }
    if h.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = h
            .get_all(header::CONNECTION)
            .iter()
            .filter(|v| v.to_str().is_ok())
            .flat_map(|v| h1::list(v.as_bytes()))
            .filter_map(|n| HeaderName::from_bytes(n).ok())
            .collect();
        for n in named {
            h.remove(n);
        }
    }
    for n in &HOP_BY_HOP {
        h.remove(n);
    }
}

fn upgrade_of(h: &HeaderMap) -> Option<HeaderValue> {
    let wants = h
        .get_all(header::CONNECTION)
        .iter()
        .filter(|v| v.to_str().is_ok())
        .any(|v| h1::list(v.as_bytes()).any(|t| t.eq_ignore_ascii_case(b"upgrade")));
    if wants {
        h.get(header::UPGRADE).cloned()
    } else {
        None
    }
}

/// The headers the Router sets, replacing the client's, in the order it writes them.
static ADDED: [HeaderName; 5] = [
    header::HOST,
    header::AUTHORIZATION,
    X_FORWARDED_FOR,
    X_FORWARDED_HOST,
    X_FORWARDED_PROTO,
];

/// The headers the Router sets on every request it forwards, replacing the client's.
struct Added {
    /// The entry point, as a client library would have written it (made once per entry point).
    host: HeaderValue,
    /// `Bearer <the session's token>`.
    authorization: HeaderValue,
    forwarded_for: Option<HeaderValue>,
    forwarded_host: Option<HeaderValue>,
    forwarded_proto: HeaderValue,
}

impl Added {
    /// From the client's first `X-Forwarded-For` (when it is text) and first `Host`.
    fn new(
        prior_for: Option<&str>,
        host: Option<HeaderValue>,
        f: &Forward<'_>,
        ep: &Endpoint,
    ) -> Self {
        Self {
            host: ep.host.clone(),
            authorization: f.authorization.clone(),
            forwarded_for: f
                .client_addr
                .and_then(|addr| forwarded_for(prior_for, addr.ip())),
            forwarded_host: host,
            forwarded_proto: HeaderValue::from_static(f.scheme),
        }
    }

    /// [`Added::new`] for a request's headers.
    fn of(h: &HeaderMap, f: &Forward<'_>, ep: &Endpoint) -> Self {
        let prior = custom_header(h, &X_FORWARDED_FOR).and_then(|v| v.to_str().ok());
        Self::new(prior, h.get(header::HOST).cloned(), f, ep)
    }

    /// Whether the client's header `n` is one the Router replaces.
    fn replaces(n: &HeaderName) -> bool {
        ADDED.contains(n)
    }

    /// [`Added::replaces`] for a name as the client wrote it.
    fn replaces_raw(n: &[u8]) -> bool {
        ADDED
            .iter()
            .any(|r| n.eq_ignore_ascii_case(r.as_str().as_bytes()))
    }

    fn iter(&self) -> impl Iterator<Item = (&HeaderName, &HeaderValue)> {
        let values = [
            Some(&self.host),
            Some(&self.authorization),
            self.forwarded_for.as_ref(),
            self.forwarded_host.as_ref(),
            Some(&self.forwarded_proto),
        ];
        ADDED.iter().zip(values).filter_map(|(n, v)| Some((n, v?)))
    }

    fn apply(self, h: &mut HeaderMap) {
        h.insert(header::HOST, self.host);
        h.insert(header::AUTHORIZATION, self.authorization);
        if let Some(v) = self.forwarded_for {
            h.insert(X_FORWARDED_FOR.clone(), v);
        }
        if let Some(v) = self.forwarded_host {
            h.insert(X_FORWARDED_HOST.clone(), v);
        }
        h.insert(X_FORWARDED_PROTO.clone(), self.forwarded_proto);
    }
}

/// What the handler knows about the incoming request.
pub struct Forward<'a> {
    pub entry: &'a EntryPoint,
    /// What the sandbox is sent as the target: the request's path from the invocation path on
    /// (its leading `/` never stripped), and its query.
    pub target: &'a str,
    /// `Bearer <the session's token>`.
    pub authorization: HeaderValue,
    pub client_addr: Option<SocketAddr>,
    pub scheme: &'static str,
    /// A fast-lane request's answer, when it has a length, is relayed from the bytes it came
    /// in, without the sandbox's fields of this name (the one the caller sets).
    pub relay_without: Option<&'a HeaderName>,
}

impl Upstream {
    /// A client with pooled keep-alive connections; a sandbox's host that leaves a request on
    /// one (HTTP/1.1 or h2c) unacknowledged for `dead_peer_timeout` is given up
    /// ([`pool::DEAD_PEER_TIMEOUT`]).
    pub fn new(
        connect_timeout: Duration,
        dead_peer_timeout: Duration,
        unix_entry_points: UnixEntryPoints,
    ) -> Self {
        let unix = UnixHosts::default();
        let connector = Connector {
            unix: unix.clone(),
            connect_timeout,
            dead_peer_timeout,
        };
        let h2c = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(pool::IDLE_TIMEOUT)
            .http2_only(true)
            .build(connector);
        Self {
            connect_timeout,
            dead_peer_timeout,
            unix_entry_points,
            pool: Pool::new(dead_peer_timeout),
            h2c,
            unix,
        }
    }

    /// A client with the same settings and pools of its own.
    pub fn fresh(&self) -> Self {
        Self::new(
            self.connect_timeout,
            self.dead_peer_timeout,
            self.unix_entry_points.clone(),
        )
    }

    /// The entry point: its address, URI authority (`host:port`, or the synthetic host of a
    /// Unix socket) and `Host` header, made once.
    fn endpoint(&self, entry: &EntryPoint) -> Result<Arc<Endpoint>, RouterError> {
        self.pool.endpoint(&entry.endpoint, || {
            if !entry.protocol.is_empty()
                && !entry.protocol.eq_ignore_ascii_case("HTTP")
                && !is_h2c(entry)
            {
                // HTTPS to a pod IP cannot be verified; upstream's attempt is unusable too.
                return Err(RouterError::Internal(format!(
                    "entry point protocol {} is not supported",
                    entry.protocol
                )));
            }
            let bad = |e: &dyn std::fmt::Display| {
                RouterError::Internal(format!("bad entry point {:?}: {e}", entry.endpoint))
            };
            let (host, unix) = match entry.endpoint.strip_prefix("unix:") {
                Some(path) => {
                    self.unix_entry_points
                        .check(path)
                        .map_err(RouterError::Internal)?;
                    (UnixHosts::host_of(path), Some(PathBuf::from(path)))
                }
                None => {
                    let e = entry.endpoint.as_str();
                    let e = e.split_once("://").map_or(e, |(_, rest)| rest);
                    (e.trim_end_matches('/').to_string(), None)
                }
            };
            let authority = Authority::try_from(host).map_err(|e| bad(&e))?;
            let header = HeaderValue::from_str(authority.as_str()).map_err(|e| bad(&e))?;
            let addr = match unix {
                Some(path) => Addr::Unix(path),
                None => Addr::Tcp {
                    host: authority.host().to_string(),
                    port: authority.port_u16().unwrap_or(80),
                },
            };
            Ok(Endpoint::new(authority, header, addr))
        })
    }

    /// Sends `req` to the entry point and returns the sandbox's response, streaming. The
    /// upstream is spoken to in its own protocol: HTTP/1.1, or h2c for `H2C` entry points,
    /// whatever the client used. A failure caused by the client's own body (stalled, malformed)
    /// is the client's error (408/400), not the sandbox's.
    pub async fn forward(&self, mut req: Request, f: Forward<'_>) -> Result<Answered, RouterError> {
        let ep = self.endpoint(f.entry)?;
        // An upgrade needs `Connection`, a hop-by-hop header: usually there is none.
        let hop_by_hop = has_hop_by_hop(req.headers());
        let upgrade = hop_by_hop.then(|| upgrade_of(req.headers())).flatten();
        if hop_by_hop {
            strip_hop_by_hop(req.headers_mut());
        }
        let added = Added::of(req.headers(), &f, &ep);
        let h2c = is_h2c(f.entry) && upgrade.is_none();
        if !h2c
            && upgrade.is_none()
            && let Some(len) = buffered_len(req.body())
        {
            let (parts, body) = req.into_parts();
            return self
                .send_buffered(&ep, &parts, f.target, &added, body, len)
                .await;
        }
        let client_upgrade = upgrade.is_some().then(|| hyper::upgrade::on(&mut req));
        let headers = req.headers_mut();
        if let Some(up) = &upgrade {
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            headers.insert(header::UPGRADE, up.clone());
        }
        added.apply(headers);
        if h2c {
            // h2c names the entry point in the URI's authority instead.
            headers.remove(header::HOST);
            let pq = upstream_target(f.target)?;
            return Box::pin(self.send_h2c(&ep, req, pq)).await;
        }
        *req.uri_mut() = Uri::from(upstream_target(f.target)?);
        *req.version_mut() = http::Version::HTTP_11;
        let sent = Box::pin(self.pool.send_streaming(&ep, req, self.connect_timeout)).await;
        let mut resp = sent.map_err(|e| map_client_error(e.as_error()))?;
        let h = resp.headers();
        if h.contains_key(header::CONTENT_LENGTH) && h.contains_key(header::TRANSFER_ENCODING) {
            // Ambiguous framing hyper's client resolves by guessing: refused, as on the pooled
            // path (the connection is this request's own, and is dropped with the answer).
            return Err(RouterError::Unreachable);
        }
        if resp.status() == http::StatusCode::SWITCHING_PROTOCOLS {
            // A switch nobody asked for (as on the pooled path): the sandbox's connection now
            // speaks something else, and the client must not be told it switched.
            let Some(client_upgrade) = client_upgrade else {
                return Err(RouterError::Unreachable);
            };
            let upstream_upgrade = hyper::upgrade::on(&mut resp);
            let (keeper, kept) = tokio::sync::oneshot::channel();
            tokio::spawn(async move {
                // Given before the 101 is written (the client's upgrade waits for that).
                let _kept = kept.await.ok();
                if let (Ok(c), Ok(u)) = (client_upgrade.await, upstream_upgrade.await) {
                    let (mut c, mut u) = (TokioIo::new(c), TokioIo::new(u));
                    let _ = tokio::io::copy_bidirectional(&mut c, &mut u).await;
                }
            });
            // The connection is the tunnel's now.
            let (mut parts, _) = resp.into_parts();
            parts
                .extensions
                .insert(Tunnel(Arc::new(std::sync::Mutex::new(Some(keeper)))));
            return Ok(Answered::Http(http::Response::from_parts(
                parts,
                Answer::Empty,
            )));
        }
        Ok(Answered::Http(answer(resp, Answer::Hyper)))
    }

    /// The hot path: a request whose body is small enough to be read first, sent on a pooled
    /// connection with this crate's codec.
    async fn send_buffered(
        &self,
        ep: &Arc<Endpoint>,
        parts: &http::request::Parts,
        target: &str,
        added: &Added,
        body: Body,
        len: usize,
    ) -> Result<Answered, RouterError> {
        let method = &parts.method;
        let mut wire = Vec::new();
        let length = len > 0
            || parts.headers.contains_key(header::CONTENT_LENGTH)
            || [Method::POST, Method::PUT, Method::PATCH].contains(method);
        // The client's headers as they are, but for those the Router sets (written after them).
        let kept = || parts.headers.iter().filter(|(n, _)| !Added::replaces(n));
        let fields = kept().chain(added.iter()).map(|(n, v)| h1::field_len(n, v));
        let mut head = h1::RequestHead::start(&mut wire, method, target, fields.sum(), len);
        for (n, v) in kept().chain(added.iter()) {
            head.header(n, v);
        }
        head.finish(length.then_some(len));
        if len > 0 {
            read_body(body, &mut wire, len).await?;
        }
        self.send_wire(ep, &wire, method, None).await
    }

    /// A request the fast lane took, forwarded from the bytes it arrived in: the same request
    /// [`Upstream::forward`] sends (`lane_requests_reach_sandboxes_as_http_requests_do`), with
    /// no `http` types built; an answer with a length comes back with its fields written for
    /// the lane to relay ([`Forward::relay_without`]). Only h2c entry points need it as an
    /// `http::Request`.
    ///
    /// The request is made into its bytes before the returned future is first polled (and
    /// dropped then): the future holds only those bytes and the exchange, which keeps the
    /// Router's per-request future small (it is boxed, and moved, on every request).
    pub fn forward_lane<'a>(
        &'a self,
        req: LaneRequest,
        f: Forward<'a>,
    ) -> impl Future<Output = Result<Answered, RouterError>> + Send + 'a {
        let prepared = self.prepare_lane(req, f);
        async move {
            // Matched in place (`ref`): the prepared request is not moved into a second local.
            match prepared {
                Ok(Prepared::Wire(ref w)) => {
                    self.send_wire(&w.ep, &w.wire, &w.method, w.relay_without)
                        .await
                }
                Ok(Prepared::H2c(h2c)) => {
                    let (req, f) = *h2c;
                    Box::pin(self.forward(req, f)).await
                }
                Err(e) => Err(e),
            }
        }
    }

    /// [`Upstream::forward_lane`]'s request, made ready to send.
    fn prepare_lane<'a>(
        &self,
        req: LaneRequest,
        f: Forward<'a>,
    ) -> Result<Prepared<'a>, RouterError> {
        if is_h2c(f.entry) {
            let req = req
                .into_request()
                .ok_or_else(|| RouterError::Internal("bad request".into()))?;
            return Ok(Prepared::H2c(Box::new((req.map(Body::from), f))));
        }
        let ep = self.endpoint(f.entry)?;
        let scan = Scan::of(&req);
        let prior = scan.prior_for.and_then(h1::visible);
        let added = Added::new(prior, scan.host.clone(), &f, &ep);
        let fields = scan.kept_len
            + added
                .iter()
                .map(|(n, v)| h1::field_len(n, v))
                .sum::<usize>();
        let (method, body) = (req.method(), req.body());
        let length = !body.is_empty() || scan.length || method == Method::POST;
        let mut wire = Vec::new();
        let mut head = h1::RequestHead::start(&mut wire, method, f.target, fields, body.len());
        for (i, (n, v)) in req.fields().enumerate() {
            if scan.kept & (1 << i) != 0 {
                head.raw_header(n, v);
            }
        }
        for (n, v) in added.iter() {
            head.header(n, v);
        }
        head.finish(length.then_some(body.len()));
        wire.extend_from_slice(body);
        Ok(Prepared::Wire(Wire {
            ep,
            wire,
            method: method.clone(),
            relay_without: f.relay_without,
        }))
    }

    /// A whole request (head and body in `wire`) sent on a pooled connection; its answer's
    /// fields relayed without `relay_without` when it has a length, else as a header map.
    fn send_wire<'a>(
        &'a self,
        ep: &'a Arc<Endpoint>,
        wire: &'a [u8],
        method: &Method,
        relay_without: Option<&'a HeaderName>,
    ) -> impl Future<Output = Result<Answered, RouterError>> + Send + 'a {
        let out = pool::Outgoing {
            wire,
            head_request: method == Method::HEAD,
            idempotent: method.is_idempotent(),
            relay_without,
        };
        async move {
            let sent = self.pool.send(ep, &out, self.connect_timeout).await;
            let got = sent.map_err(|e| map_client_error(e.as_error()))?;
            let body = Answer::Pooled(got.body);
            Ok(match got.fields {
                h1::Fields::Relay(relay) => Answered::Relay {
                    status: got.status,
                    relay,
                    body,
                },
                h1::Fields::Map(headers) => {
                    let mut resp = http::Response::new(body);
                    *resp.status_mut() = got.status;
                    *resp.headers_mut() = headers;
                    strip_hop_by_hop(resp.headers_mut());
                    Answered::Http(resp)
                }
            })
        }
    }

    /// A request to a prior-knowledge HTTP/2 (h2c) entry point.
    async fn send_h2c(
        &self,
        ep: &Endpoint,
        mut req: Request,
        pq: PathAndQuery,
    ) -> Result<Answered, RouterError> {
        if let Some(path) = ep.unix_path() {
            self.unix.register(ep.authority.host(), path);
        }
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(Scheme::HTTP);
        parts.authority = Some(ep.authority.clone());
        parts.path_and_query = Some(pq);
        *req.uri_mut() =
            Uri::from_parts(parts).map_err(|e| RouterError::Internal(e.to_string()))?;
        *req.version_mut() = http::Version::HTTP_2;
        match self.h2c.request(req).await {
            Ok(resp) => Ok(Answered::Http(answer(resp, Answer::Hyper))),
            Err(e) => Err(map_client_error(&e)),
        }
    }
}

/// A fast-lane request ready to send ([`Upstream::forward_lane`]).
enum Prepared<'a> {
    /// Its bytes, for a pooled HTTP/1.1 connection.
    Wire(Wire<'a>),
    /// An `http::Request`, for an h2c entry point.
    H2c(Box<(Request, Forward<'a>)>),
}

/// A whole HTTP/1.1 request and where it goes.
struct Wire<'a> {
    ep: Arc<Endpoint>,
    wire: Vec<u8>,
    method: Method,
    relay_without: Option<&'a HeaderName>,
}

/// One pass over a fast-lane request's fields: which are sent on, and what [`Added`] needs.
struct Scan<'r> {
    /// Bit `i`: field `i` is sent on (the lane takes at most 64 fields).
    kept: u64,
    /// The bytes the kept fields take in a head.
    kept_len: usize,
    prior_for: Option<&'r [u8]>,
    host: Option<HeaderValue>,
    /// The request had a `Content-Length`.
    length: bool,
}

const _: () = assert!(
    LaneRequest::MAX_FIELDS <= 64,
    "a bit per field in Scan::kept"
);

impl<'r> Scan<'r> {
    fn of(req: &'r LaneRequest) -> Self {
        let mut scan = Scan {
            kept: 0,
            kept_len: 0,
            prior_for: None,
            host: None,
            length: false,
        };
        let is = |n: &[u8], name: &HeaderName| n.eq_ignore_ascii_case(name.as_str().as_bytes());
        // The lane takes `Connection: keep-alive|close` only; both are removed, and so is a
        // field they name (`keep-alive` is hop-by-hop anyway).
        let mut names_close = false;
        for (i, (n, v)) in req.fields().enumerate() {
            if Added::replaces_raw(n) {
                if is(n, &X_FORWARDED_FOR) && scan.prior_for.is_none() {
                    scan.prior_for = Some(v);
                } else if is(n, &header::HOST) && scan.host.is_none() {
                    scan.host = req.value(i);
                }
            } else if is(n, &header::CONTENT_LENGTH) {
                scan.length = true;
            } else if h1::HOP_BY_HOP_RAW.iter().any(|h| n.eq_ignore_ascii_case(h)) {
                names_close |= is(n, &header::CONNECTION)
                    && h1::list(v).any(|t| t.eq_ignore_ascii_case(b"close"));
            } else {
                scan.kept |= 1 << i;
                scan.kept_len += n.len() + v.len() + 4;
            }
        }
        if names_close {
            for (i, (n, v)) in req.fields().enumerate() {
                if scan.kept & (1 << i) != 0 && n.eq_ignore_ascii_case(b"close") {
                    scan.kept &= !(1 << i);
                    scan.kept_len -= n.len() + v.len() + 4;
                }
            }
        }
        scan
    }
}

/// [`Forward::target`] as a URI part.
fn upstream_target(target: &str) -> Result<PathAndQuery, RouterError> {
    PathAndQuery::try_from(target).map_err(|_| RouterError::Internal("bad path".into()))
}

/// The largest request body read before it is sent (on the pooled hot path); larger ones, and
/// bodies of unknown size, stream.
const MAX_BUFFERED_BODY: u64 = 64 * 1024;

/// The request body's size when it can be read before sending: none, or a small exact length.
fn buffered_len(body: &Body) -> Option<usize> {
    use hyper::body::Body as _;
    if body.is_end_stream() {
        return Some(0);
    }
    let n = body
        .size_hint()
        .exact()
        .filter(|&n| n <= MAX_BUFFERED_BODY)?;
    usize::try_from(n).ok()
}

/// Appends the request body (`len` bytes, as its `Content-Length` said) to `out`.
async fn read_body(body: Body, out: &mut Vec<u8>, len: usize) -> Result<(), RouterError> {
    use http_body_util::BodyExt as _;
    let start = out.len();
    let mut body = body;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| map_client_error(&e))?;
        if let Ok(data) = frame.into_data() {
            out.extend_from_slice(&data);
        }
    }
    if out.len() - start != len {
        return Err(RouterError::BadBody);
    }
    Ok(())
}

/// The sandbox's response with its hop-by-hop headers removed.
fn answer<B>(resp: http::Response<B>, wrap: impl FnOnce(B) -> Answer) -> http::Response<Answer> {
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    http::Response::from_parts(parts, wrap(body))
}

/// A sandbox's answer: an `http::Response`, or (fast-lane requests, an answer with a length)
/// its fields written out to be relayed as they came (`h1::Relay`).
pub enum Answered {
    Http(http::Response<Answer>),
    Relay {
        status: http::StatusCode,
        relay: h1::Relay,
        body: Answer,
    },
}

/// On a `101` answer: the WebSocket tunnel spawned for it, which holds what it is given
/// ([`Tunnel::keep`]) until it closes.
#[derive(Clone)]
pub struct Tunnel(Arc<std::sync::Mutex<Option<tokio::sync::oneshot::Sender<Kept>>>>);

/// What a tunnel holds while it is open.
type Kept = Box<dyn Send>;

impl Tunnel {
    /// Has the tunnel hold `what` until it closes (dropped at once if it never opens).
    pub fn keep(self, what: Kept) {
        let sender = self.0.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(sender) = sender {
            let _ = sender.send(what);
        }
    }
}

/// A sandbox's answer body, unboxed (the handler boxes it once, with what it holds).
pub enum Answer {
    /// HTTP/1.1 on a pooled connection: it goes back to the pool at the body's end.
    Pooled(pool::Returning),
    /// h2c, or a streamed request's own HTTP/1.1 connection.
    Hyper(Incoming),
    /// An upgrade's 101 (the connection is the tunnel's).
    Empty,
}

impl hyper::body::Body for Answer {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::BoxError>>> {
        let polled = match self.get_mut() {
            Self::Pooled(b) => ready!(Pin::new(b).poll_frame(cx)).map(|r| r.map_err(Into::into)),
            Self::Hyper(b) => ready!(Pin::new(b).poll_frame(cx)).map(|r| r.map_err(Into::into)),
            Self::Empty => None,
        };
        Poll::Ready(polled)
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Pooled(b) => b.is_end_stream(),
            Self::Hyper(b) => b.is_end_stream(),
            Self::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Pooled(b) => b.size_hint(),
            Self::Hyper(b) => b.size_hint(),
            Self::Empty => SizeHint::with_exact(0),
        }
    }
}

/// `X-Forwarded-For` with the client's address appended. The usual case (IPv4, no prior
/// value) is written on the stack and copied once.
fn forwarded_for(prior: Option<&str>, ip: std::net::IpAddr) -> Option<HeaderValue> {
    match (prior, ip) {
        (None, std::net::IpAddr::V4(v4)) => {
            let mut buf = [0u8; 15];
            let n = write_v4(&mut buf, v4);
            HeaderValue::from_bytes(&buf[..n]).ok()
        }
        (Some(prior), ip) => HeaderValue::from_str(&format!("{prior}, {ip}")).ok(),
        (None, ip) => HeaderValue::from_str(&ip.to_string()).ok(),
    }
}

/// An IPv4 address as text into `buf`, without the formatting machinery (which costs more than
/// the rest of the header handling); the length written.
fn write_v4(buf: &mut [u8; 15], v4: std::net::Ipv4Addr) -> usize {
    let mut n = 0;
    let mut push = |b: u8| {
        buf[n] = b;
        n += 1;
    };
    for (i, o) in v4.octets().into_iter().enumerate() {
        if i > 0 {
            push(b'.');
        }
        if o >= 100 {
            push(b'0' + o / 100);
        }
        if o >= 10 {
            push(b'0' + o / 10 % 10);
        }
        push(b'0' + o % 10);
    }
    n
}

fn is_h2c(entry: &EntryPoint) -> bool {
    entry.protocol.eq_ignore_ascii_case("H2C")
}

/// Upstream's mapping: refused → 502, timeout → 504, anything else → 503. A failure of the
/// client's own request body is in the error's chain as the `axum::Error` it was sent with: then
/// it is the client's error, 408 when it stalled past the body idle timeout, else 400.
fn map_client_error(e: &(dyn std::error::Error + 'static)) -> RouterError {
    let chain = || crate::error::sources(e);
    if chain().any(|s| s.is::<axum::Error>()) {
        return if chain().any(|s| s.is::<agentcube_serve::BodyTimeout>()) {
            RouterError::BodyTimeout
        } else {
            RouterError::BadBody
        };
    }
    match chain().find_map(|s| s.downcast_ref::<io::Error>()) {
        Some(io) => match io.kind() {
            io::ErrorKind::ConnectionRefused | io::ErrorKind::NotFound => RouterError::Refused,
            io::ErrorKind::TimedOut => RouterError::UpstreamTimeout,
            _ => RouterError::Unreachable,
        },
        None => RouterError::Unreachable,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn custom_header_finds_what_get_finds() {
        let mut h = HeaderMap::new();
        assert_eq!(custom_header(&h, &X_FORWARDED_FOR), None);
        h.insert(header::HOST, HeaderValue::from_static("a"));
        h.append("x-other", HeaderValue::from_static("o"));
        h.append("X-Forwarded-For", HeaderValue::from_static("1.1.1.1"));
        h.append("x-forwarded-for", HeaderValue::from_static("2.2.2.2"));
        h.append("x-other", HeaderValue::from_static("p"));
        for name in [
            &X_FORWARDED_FOR,
            &HeaderName::from_static("x-other"),
            &header::HOST,
        ] {
            assert_eq!(custom_header(&h, name), h.get(name), "{name}");
        }
        assert_eq!(custom_header(&h, &X_FORWARDED_HOST), None);
    }

    #[test]
    fn forwarded_for_matches_the_standard_formatting() {
        for ip in [
            "0.0.0.0",
            "127.0.0.1",
            "10.9.99.100",
            "255.255.255.255",
            "192.168.1.10",
            "::1",
            "::ffff:10.0.0.1",
        ] {
            let ip: std::net::IpAddr = ip.parse().unwrap();
            assert_eq!(forwarded_for(None, ip).unwrap(), ip.to_string().as_str());
            let appended = forwarded_for(Some("1.2.3.4"), ip).unwrap();
            assert_eq!(appended, format!("1.2.3.4, {ip}").as_str());
        }
    }

    #[test]
    fn hop_by_hop_and_connection_listed_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, x-private"),
        );
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert("x-agentcube-session-id", HeaderValue::from_static("s"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-agentcube-session-id"));
    }

    #[test]
    fn upgrade_needs_connection_upgrade() {
        let mut h = HeaderMap::new();
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        assert!(upgrade_of(&h).is_none());
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        assert_eq!(upgrade_of(&h).unwrap(), "websocket");
    }
}
