//! The one way every AgentCube component serves HTTP: the Router, the Workload Manager, PicoD,
//! `agentcube up` and the admin (metrics) ports all call [`serve`]. No second copy of serving
//! code exists, so what it guarantees holds everywhere.
//!
//! Main flow of [`serve`]:
//! 1. Accept ([`Listener`]: TCP or a Unix socket), backing off on errors such as running out of
//!    descriptors instead of spinning; `TCP_NODELAY` on every TCP connection.
//! 2. Over [`Limits::max_connections`], answer with the component's [`Refusal`] (its own error
//!    shape, 503) and close.
//! 3. [`Handshake`] (identity, or TLS at the Router), bounded by the header timeout.
//! 4. The HTTP/1.1 fast lane (`lane.rs`, [`Limits::fast_lane`]) parses and answers plain
//!    requests — `GET`/`POST`, HTTP/1.1, no `Transfer-Encoding`/`Upgrade`/`Expect`, a body of at
//!    most 64 KiB arriving within a second of its head (a quarter of the body idle
//!    timeout if that is shorter) — writing answers byte for byte as hyper
//!    would. The first request it does not take hands the connection, with every byte read so
//!    far, to hyper for the rest of its life: HTTP/1.1 or h2c (hyper-util's auto connection),
//!    WebSocket upgrades, chunked, large and slow uploads, and every malformed request's
//!    400/431/505. Request bodies there fail
//!    after [`Limits::body_idle_timeout`] without a byte (`tower_http`'s `TimeoutBody`), so a
//!    stalled upload cannot hold a handler (and the Router's concurrency slot) forever. Each
//!    request goes to the app's [`Routes`]: a request the lane took to its [`LaneFront`] first
//!    when it has one (the Router forwards invocations from the bytes they arrived in), then as
//!    an `http::Request` to its [`Front`] (the Router's invocations, without a route table),
//!    else its `axum::Router`. A client that closes its
//!    side while its request is being answered drops the handler (both paths).
//! 5. A watchdog per connection (`conn.rs`): with no request in flight, a request whose headers
//!    have not all arrived within [`Limits::header_read_timeout`] of its first byte (slowloris;
//!    closed within twice that),
//!    or a connection idle for [`Limits::keep_alive_idle`], is closed. A request in flight is
//!    never cut for taking long (long executes and streams are legitimate), only when its client
//!    takes no byte of the answer for [`Limits::body_idle_timeout`] (a stalled download).
//! 6. A connection the server is done with closes lingering (`linger.rs`): half-closed, then
//!    read until the client closes (at most 2 s of silence, 10 s in all, its slot kept), so a
//!    client still sending — pipelined requests behind a `Connection: close`, an upload answered
//!    before it was read — gets the end of its answer instead of a reset. Stalled connections
//!    and failed handshakes close at once.
//! 7. On shutdown: stop accepting, let connections finish for the grace period, then return.
//!
//! Counters of all of this are in [`Stats`], for each component's `/metrics`.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::response::IntoResponse;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::io::AsyncWriteExt;
use tower::ServiceExt;

mod after_answer;
mod conn;
mod lane;
pub mod limits;
mod linger;
pub mod listener;
mod relayed;
mod side;
mod workers;

pub use after_answer::AfterAnswer;
pub use lane::request::LaneRequest;
pub use limits::{LimitArgs, Limits, raise_fd_limit};
pub use linger::Accepted;
pub use listener::{Handshake, Listener, Plain, Stream};
pub use relayed::{LaneResponse, Relayed};
pub use tower_http::timeout::TimeoutError as BodyTimeout;

/// How long in-flight requests may take to finish after a shutdown signal (Go's servers: 10 s).
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// `GET /metrics` answering what `render` returns (OpenMetrics text), for admin ports.
pub fn metrics_app(render: impl Fn() -> String + Clone + Send + Sync + 'static) -> axum::Router {
    axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let body = render();
            async move {
                (
                    [(
                        http::header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    body,
                )
            }
        }),
    )
}

/// Serves an admin surface (e.g. [`metrics_app`]) on its own listener, with default limits,
/// until `shutdown` resolves.
pub fn spawn_admin(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    refusal: Refusal,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> tokio::task::JoinHandle<std::io::Result<()>> {
    let options = Options::new(Limits::default(), refusal);
    tokio::spawn(serve(listener.into(), app, options, shutdown))
}

/// Binds `ip:port`; the error names the address ("cannot listen on 127.0.0.1:8080: Address
/// already in use"). Binaries bind every listener before they start anything that would have
/// to be undone (sandboxes, warm pools), so a port in use stops them with nothing left behind.
pub async fn listen(
    (ip, port): (std::net::IpAddr, u16),
) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind((ip, port))
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {ip}:{port}: {e}")))
}

/// [`listen`] for an admin surface served with [`spawn_admin`]: port 0 means none (`None`).
pub async fn listen_admin(
    addr: (std::net::IpAddr, u16),
) -> std::io::Result<Option<tokio::net::TcpListener>> {
    if addr.1 == 0 {
        return Ok(None);
    }
    listen(addr).await.map(Some)
}

/// Several OpenMetrics texts as one (a single `# EOF` at the end).
pub fn join_openmetrics(texts: &[String]) -> String {
    let mut out = String::new();
    for t in texts {
        out.push_str(t.trim_end().trim_end_matches("# EOF").trim_end());
        out.push('\n');
    }
    out.push_str("# EOF\n");
    out
}

/// The answer to a connection over the limit, in the component's error shape.
#[derive(Debug, Clone)]
pub struct Refusal {
    raw: bytes::Bytes,
}

impl Refusal {
    /// `503` with a JSON body (e.g. the Router's `{"error","code"}`, the WM's `{"message"}`).
    pub fn json(body: &str) -> Self {
        let raw = format!(
            "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
             content-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        Self { raw: raw.into() }
    }
}

/// What [`serve`] counted, for metrics (`prometheus-client` types, so a component registers
/// them in its own registry with [`Stats::register`]).
#[derive(Debug, Default)]
pub struct Stats {
    /// Connections accepted and served.
    pub accepted: Counter,
    /// Accepted TCP connections on which `TCP_NODELAY` was read back as set (the guard against
    /// the 40 ms Nagle/delayed-ACK stall coming back).
    pub nodelay: Counter,
    /// Connections refused with the 503 (over `max_connections`).
    pub refused: Counter,
    /// Accept errors (e.g. out of descriptors).
    pub accept_errors: Counter,
    /// Connections closed because headers did not arrive in time (slowloris).
    pub header_timeouts: Counter,
    /// Idle keep-alive connections closed.
    pub idle_closed: Counter,
    /// Connections closed because the client took no byte of an answer for the body idle
    /// timeout (a stalled download).
    pub send_timeouts: Counter,
    /// Handshakes (TLS) that failed or timed out.
    pub handshake_failures: Counter,
    /// Connections open now.
    pub open: Gauge,
    /// Connections closing now: answered, half-closed, and read until the client closes
    /// (`linger.rs`); each still holds its slot under `max_connections`. Also the refused
    /// connections lingering after their 503 (at most 64, outside the slots).
    pub lingering: Gauge,
    /// Requests parsed and answered by the HTTP/1.1 fast lane (the others by hyper).
    pub fast_requests: Counter,
}

impl Stats {
    /// Registers every counter under `registry` (names `connections_*`).
    pub fn register(&self, registry: &mut Registry) {
        let r = registry;
        r.register(
            "connections_accepted",
            "Connections accepted",
            self.accepted.clone(),
        );
        r.register(
            "connections_nodelay",
            "Accepted TCP connections with TCP_NODELAY set (read back from the socket)",
            self.nodelay.clone(),
        );
        r.register(
            "connections_refused",
            "Connections refused over the connection limit",
            self.refused.clone(),
        );
        r.register(
            "accept_errors",
            "Accept errors (e.g. out of descriptors)",
            self.accept_errors.clone(),
        );
        r.register(
            "connections_header_timeouts",
            "Connections closed: request headers too slow",
            self.header_timeouts.clone(),
        );
        r.register(
            "connections_idle_closed",
            "Idle keep-alive connections closed",
            self.idle_closed.clone(),
        );
        r.register(
            "connections_send_timeouts",
            "Connections closed: the client took no byte of an answer for the body idle timeout",
            self.send_timeouts.clone(),
        );
        r.register(
            "connections_handshake_failures",
            "TLS handshakes that failed or timed out",
            self.handshake_failures.clone(),
        );
        r.register("connections_open", "Connections open", self.open.clone());
        r.register(
            "connections_lingering",
            "Connections closing: read until the client closes (accepted ones still hold their slot)",
            self.lingering.clone(),
        );
        r.register(
            "http1_fast_requests",
            "Requests answered by the HTTP/1.1 fast lane (the others by hyper)",
            self.fast_requests.clone(),
        );
    }
}

/// Everything [`serve`] needs besides the listener and the app.
#[derive(Debug, Clone)]
pub struct Options<H = Plain> {
    pub limits: Limits,
    pub refusal: Refusal,
    pub handshake: H,
    pub stats: Arc<Stats>,
    /// After the shutdown signal, how long in-flight requests may take.
    pub grace: Duration,
    /// Worker threads with a runtime of their own each; 0 serves on the caller's runtime.
    pub workers: usize,
}

impl Options<Plain> {
    /// Plain HTTP with `limits`, refusing extra connections with `refusal`.
    pub fn new(limits: Limits, refusal: Refusal) -> Self {
        Self {
            limits,
            refusal,
            handshake: Plain,
            stats: Arc::default(),
            grace: SHUTDOWN_GRACE,
            workers: 0,
        }
    }
}

impl<H> Options<H> {
    /// The same options with another handshake (TLS).
    pub fn with_handshake<H2: Handshake>(self, handshake: H2) -> Options<H2> {
        Options {
            limits: self.limits,
            refusal: self.refusal,
            handshake,
            stats: self.stats,
            grace: self.grace,
            workers: self.workers,
        }
    }
}

/// The app a connection is served by: one shared [`Routes`], or one built per worker thread
/// (the Router keeps a connection pool per worker, so a request never leaves its thread).
#[derive(Clone)]
pub struct App(Arc<dyn Fn() -> Routes + Send + Sync>);

impl App {
    /// An app built once per worker by `make`.
    pub fn per_worker<R: Into<Routes>>(make: impl Fn() -> R + Send + Sync + 'static) -> Self {
        Self(Arc::new(move || make().into()))
    }

    fn make(&self) -> Routes {
        (self.0)()
    }
}

impl From<axum::Router> for App {
    fn from(app: axum::Router) -> Self {
        let routes = Routes::from(app);
        Self(Arc::new(move || routes.clone()))
    }
}

/// A response being made by a [`Front`].
pub type Answer = std::pin::Pin<Box<dyn Future<Output = axum::response::Response> + Send>>;

/// Answers the requests it recognises itself and hands the others back (`Err`), before any
/// router table or extractor runs: a component's hot path (the Router's invocations). It gets
/// the client's address (TCP listeners) as an argument; requests handed to the router carry it
/// as axum's `ConnectInfo` extension, which the front's requests are spared (an allocation).
pub type Front = Arc<
    dyn Fn(axum::extract::Request, Option<SocketAddr>) -> Result<Answer, axum::extract::Request>
        + Send
        + Sync,
>;

/// An answer being made by a [`LaneFront`].
pub type LaneAnswer = std::pin::Pin<Box<dyn Future<Output = LaneResponse> + Send>>;

/// A [`Front`] for the requests the HTTP/1.1 fast lane took, as they arrived
/// ([`LaneRequest`]: the head's bytes, no `http` types built); it may answer with the fields
/// of its answer already written ([`Relayed`]). What it hands back becomes an `http::Request`
/// for the [`Front`] and the router.
pub type LaneFront =
    Arc<dyn Fn(LaneRequest, Option<SocketAddr>) -> Result<LaneAnswer, LaneRequest> + Send + Sync>;

/// What answers a connection's requests: an `axum::Router`, optionally behind a [`Front`] (and
/// a [`LaneFront`] for the fast lane's requests).
#[derive(Clone)]
pub struct Routes {
    router: axum::Router,
    front: Option<Front>,
    lane_front: Option<LaneFront>,
}

impl Routes {
    /// `router`, with `front` answering first.
    pub fn with_front(router: axum::Router, front: Front) -> Self {
        Self {
            router,
            front: Some(front),
            lane_front: None,
        }
    }

    /// These routes, with `front` answering the fast lane's requests first.
    pub fn with_lane_front(self, front: LaneFront) -> Self {
        Self {
            lane_front: Some(front),
            ..self
        }
    }

    /// The response to a request the fast lane took.
    async fn answer_lane(self, req: LaneRequest, peer: Option<SocketAddr>) -> LaneResponse {
        let req = match &self.lane_front {
            Some(front) => match front(req, peer) {
                Ok(answer) => return answer.await,
                Err(req) => req,
            },
            None => req,
        };
        match req.into_request() {
            Some(req) => self.answer(req.map(Body::from), peer).await.into(),
            // Not expected (the lane takes only what `http` accepts); hyper would say 400.
            None => http::StatusCode::BAD_REQUEST.into_response().into(),
        }
    }

    /// The response to `req`, from a client at `peer`.
    async fn answer(
        self,
        req: axum::extract::Request,
        peer: Option<SocketAddr>,
    ) -> axum::response::Response {
        let mut req = match &self.front {
            Some(front) => match front(req, peer) {
                Ok(answer) => return answer.await,
                Err(req) => req,
            },
            None => req,
        };
        if let Some(addr) = peer {
            req.extensions_mut().insert(ConnectInfo(addr));
        }
        match self.router.oneshot(req).await {
            Ok(resp) => resp,
            Err(never) => match never {},
        }
    }
}

impl From<axum::Router> for Routes {
    fn from(router: axum::Router) -> Self {
        Self {
            router,
            front: None,
            lane_front: None,
        }
    }
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("App")
    }
}

/// hyper's connection builders: `any` for a connection from its start (HTTP/1.1 or h2c),
/// `http1` for one the fast lane hands over after answering requests on it.
pub(crate) struct Builders {
    any: auto::Builder<TokioExecutor>,
    http1: auto::Builder<TokioExecutor>,
}

fn connection_builders() -> Arc<Builders> {
    let mut any = auto::Builder::new(TokioExecutor::new());
    any.http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .max_concurrent_streams(256);
    let http1 = auto::Builder::new(TokioExecutor::new()).http1_only();
    Arc::new(Builders { any, http1 })
}

/// Serves `app` on `listener` until `shutdown` resolves; see the crate documentation. With
/// `options.workers > 0`, connections are handed out round-robin to that many threads, each
/// running its own single-threaded runtime (and its own instance of the app): a request and
/// everything it waits on stay on one thread, as in nginx's worker model.
pub async fn serve<H: Handshake>(
    listener: Listener,
    app: impl Into<App>,
    options: Options<H>,
    shutdown: impl Future<Output = ()> + Send,
) -> std::io::Result<()> {
    let app = app.into();
    let slots = Arc::new(tokio::sync::Semaphore::new(options.limits.max_connections));
    let refusals = Arc::new(tokio::sync::Semaphore::new(linger::REFUSALS));
    let mut dispatch = workers::Dispatch::start(app, options.clone(), connection_builders());
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            c = listener.accept_backing_off(&options.stats.accept_errors) => c,
            () = &mut shutdown => break,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            options.stats.refused.inc();
            let lingers = refusals.clone().try_acquire_owned().ok();
            let lingers = lingers.map(|place| (place, options.stats.lingering.clone()));
            tokio::spawn(refuse(stream, options.refusal.raw.clone(), lingers));
            continue;
        };
        options.stats.accepted.inc();
        if let Stream::Tcp(s) = &stream
            && s.nodelay().unwrap_or(false)
        {
            options.stats.nodelay.inc();
        }
        dispatch.send(stream, peer, slot);
    }
    drop(listener);
    dispatch.shutdown(options.grace).await;
    Ok(())
}

/// Answers a connection over `max_connections` with the component's 503 and closes it:
/// lingering (`linger.rs`, counted in the lingering gauge) when one of the
/// [`linger::REFUSALS`] places is free (`lingers`), else at once.
async fn refuse(
    mut stream: Stream,
    raw: bytes::Bytes,
    lingers: Option<(tokio::sync::OwnedSemaphorePermit, Gauge)>,
) {
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(&raw)).await;
    match lingers {
        Some((place, lingering)) => {
            let stream = linger::linger(stream, &lingering).await;
            drop(place);
            drop(stream);
        }
        None => {
            let _ = stream.shutdown().await;
        }
    }
}

pub(crate) struct Connection<H> {
    pub(crate) app: Routes,
    pub(crate) peer: Option<SocketAddr>,
    pub(crate) options: Options<H>,
    pub(crate) builders: Arc<Builders>,
    pub(crate) watcher: side::Watcher,
}

/// How a connection phase ended early.
enum Cut {
    /// The watchdog closed it.
    Stalled(conn::Closed),
    /// Shutdown found it with no request in flight or being read.
    Idle,
}

impl<H: Handshake> Connection<H> {
    /// Serves one accepted connection; `slot` is given back once it is closed (after
    /// [`linger`]ing).
    pub(crate) async fn run(self, stream: Stream, slot: tokio::sync::OwnedSemaphorePermit) {
        let stats = self.options.stats.clone();
        let limits = self.options.limits;
        let (accepted, armed) = linger::Accepted::new(stream, slot, stats.lingering.clone());
        let io = match tokio::time::timeout(
            limits.header_read_timeout,
            self.options.handshake.handshake(accepted),
        )
        .await
        {
            Ok(Ok(io)) => io,
            _ => {
                stats.handshake_failures.inc();
                return;
            }
        };
        armed.set(true);
        stats.open.inc();
        let tracker = conn::Tracker::new();
        // The watcher's clone counts this connection as open until it ends.
        let open = self.watcher.clone();
        let mut beside = side::Beside::new(tracker.clone(), limits, self.watcher.clone());
        let io = conn::TrackedIo {
            io,
            tracker: tracker.clone(),
        };
        let cut = match self.fast_lane(io, &tracker, &mut beside, &armed).await {
            Ok(Some((io, after))) => {
                let served = self.hyper(io, after, &tracker, &mut beside, &armed);
                served.await.err()
            }
            Ok(None) => None,
            Err(cut) => Some(cut),
        };
        if let Some(Cut::Stalled(why)) = cut {
            let counter = match why {
                conn::Closed::HeaderTimeout => &stats.header_timeouts,
                conn::Closed::Idle => &stats.idle_closed,
                conn::Closed::SendStalled => &stats.send_timeouts,
            };
            counter.inc();
        }
        drop(open);
        stats.open.dec();
    }

    /// The fast lane, while it keeps the connection: `Ok(Some(..))` hands it to hyper.
    async fn fast_lane<I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
        &self,
        io: I,
        tracker: &Arc<conn::Tracker>,
        beside: &mut side::Beside,
        armed: &linger::Armed,
    ) -> Result<Option<(lane::Rewind<I>, bool)>, Cut> {
        if !self.options.limits.fast_lane {
            return Ok(Some((lane::Rewind::new(bytes::Bytes::new(), io), false)));
        }
        let lane = lane::Lane::new(io, self.options.limits.body_idle_timeout);
        let run = lane.run(&self.app, self.peer, tracker, &self.options.stats);
        let mut run = std::pin::pin!(run);
        let end = std::future::poll_fn(|cx| {
            while let Poll::Ready(event) = beside.poll(cx) {
                match event {
                    side::Side::Stalled(why) => {
                        armed.set(false);
                        return Poll::Ready(Err(Cut::Stalled(why)));
                    }
                    // A request being read (its body may follow its head) is finished first.
                    side::Side::Shutdown if tracker.quiet() => return Poll::Ready(Err(Cut::Idle)),
                    side::Side::Shutdown => tracker.close_soon(),
                }
            }
            run.as_mut().poll(cx).map(Ok)
        })
        .await?;
        Ok(match end {
            lane::End::Closed => None,
            lane::End::Hyper { io, after } => Some((io, after)),
        })
    }

    /// hyper serves the connection to its end.
    async fn hyper<I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static>(
        &self,
        io: lane::Rewind<I>,
        after_lane: bool,
        tracker: &Arc<conn::Tracker>,
        beside: &mut side::Beside,
        armed: &linger::Armed,
    ) -> Result<(), Cut> {
        let limits = self.options.limits;
        let (app, peer, t) = (self.app.clone(), self.peer, tracker.clone());
        let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
            let guard = t.begin();
            let h2 = req.version() == http::Version::HTTP_2;
            let req = req.map(|b| Body::new(conn::TimedBody::new(limits.body_idle_timeout, b)));
            let call = app.clone().answer(req, peer);
            let t = t.clone();
            async move {
                let resp = call.await;
                Ok::<_, Infallible>(resp.map(|b| conn::GuardedBody {
                    inner: b,
                    stream: h2.then(|| t.stream()),
                    _guard: guard,
                }))
            }
        });
        let builder = match after_lane {
            true => &self.builders.http1,
            false => &self.builders.any,
        };
        let served = builder
            .serve_connection_with_upgrades(TokioIo::new(io), service)
            .into_owned();
        tokio::pin!(served);
        if tracker.closing() {
            served.as_mut().graceful_shutdown();
        }
        std::future::poll_fn(|cx| {
            while let Poll::Ready(event) = beside.poll(cx) {
                match event {
                    side::Side::Stalled(why) => {
                        armed.set(false);
                        return Poll::Ready(Err(Cut::Stalled(why)));
                    }
                    side::Side::Shutdown => {
                        tracker.close_soon();
                        served.as_mut().graceful_shutdown();
                    }
                }
            }
            served.as_mut().poll(cx).map(|_| Ok(()))
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::response::IntoResponse;

    fn get(path: &str) -> axum::extract::Request {
        http::Request::get(path).body(Body::empty()).unwrap()
    }

    async fn text(resp: axum::response::Response) -> String {
        let bytes = axum::body::to_bytes(resp.into_body(), 1024).await.unwrap();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    #[tokio::test]
    #[expect(
        clippy::result_large_err,
        reason = "a front hands an unanswered request back whole, by value"
    )]
    async fn the_front_answers_what_it_recognises_and_hands_the_rest_to_the_router() {
        let router = axum::Router::new()
            .route("/fast", axum::routing::get(|| async { "router" }))
            .fallback(|| async { "router fallback" });
        let front: Front = Arc::new(|req: axum::extract::Request, _| {
            if req.uri().path() == "/fast" {
                Ok(Box::pin(async { "front".into_response() }) as Answer)
            } else {
                Err(req)
            }
        });
        let routes = Routes::with_front(router.clone(), front);
        assert_eq!(
            text(routes.clone().answer(get("/fast"), None).await).await,
            "front"
        );
        assert_eq!(
            text(routes.answer(get("/other"), None).await).await,
            "router fallback"
        );
        let plain = Routes::from(router);
        assert_eq!(text(plain.answer(get("/fast"), None).await).await, "router");
    }

    fn lane_get(target: &str) -> LaneRequest {
        let raw = format!("GET {target} HTTP/1.1\r\nhost: x\r\n\r\n");
        match lane::request::parse(&mut bytes::BytesMut::from(raw.as_bytes())) {
            lane::request::Parsed::Ready(req, _) => req,
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    #[expect(
        clippy::result_large_err,
        reason = "a front hands an unanswered request back whole, by value"
    )]
    async fn the_lane_front_answers_what_it_recognises_and_the_rest_goes_on_as_http() {
        let router = axum::Router::new()
            .route("/fast", axum::routing::get(|| async { "router" }))
            .route("/slow", axum::routing::get(|| async { "router slow" }));
        let front: Front = Arc::new(|req: axum::extract::Request, _| {
            if req.uri() == "/slow?x" {
                Ok(Box::pin(async { "front".into_response() }) as Answer)
            } else {
                Err(req)
            }
        });
        let lane_front: LaneFront = Arc::new(|req: LaneRequest, _| {
            if req.target() == "/fast" {
                Ok(Box::pin(async { "lane front".into_response().into() }) as LaneAnswer)
            } else {
                Err(req)
            }
        });
        let routes = Routes::with_front(router.clone(), front).with_lane_front(lane_front);
        let answer = |t: &str| routes.clone().answer_lane(lane_get(t), None);
        assert_eq!(text(answer("/fast").await.into()).await, "lane front");
        assert_eq!(text(answer("/slow?x").await.into()).await, "front");
        assert_eq!(text(answer("/slow").await.into()).await, "router slow");
        let plain = Routes::from(router);
        let answer = plain.answer_lane(lane_get("/fast"), None).await;
        assert_eq!(text(answer.into()).await, "router");
    }

    async fn send(s: &mut tokio::net::TcpStream, path: &str) {
        let req = format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
    }

    async fn read_to_end(s: &mut tokio::net::TcpStream) -> String {
        use tokio::io::AsyncReadExt;
        let mut out = Vec::new();
        let read = s.read_to_end(&mut out);
        tokio::time::timeout(Duration::from_secs(5), read)
            .await
            .expect("the connection is closed")
            .unwrap();
        String::from_utf8_lossy(&out).into_owned()
    }

    /// On shutdown, an idle keep-alive connection is closed at once (well within the grace
    /// period) while a request in flight goes on; that request is then answered, and `serve`
    /// returns once both connections are gone: on the caller's runtime and on worker threads.
    #[tokio::test]
    async fn shutdown_lets_requests_in_flight_finish_and_closes_idle_connections() {
        for workers in [0, 2] {
            let release = Arc::new(tokio::sync::Notify::new());
            let held = release.clone();
            let router = axum::Router::new()
                .route("/quick", axum::routing::get(|| async { "quick" }))
                .route(
                    "/slow",
                    axum::routing::get(move || async move {
                        held.notified().await;
                        "slow answer"
                    }),
                );
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = l.local_addr().unwrap();
            let mut options = Options::new(Limits::default(), Refusal::json("{}"));
            options.workers = workers;
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let served = tokio::spawn(serve(l.into(), router, options, async move {
                let _ = stopped.await;
            }));
            let mut idle = tokio::net::TcpStream::connect(addr).await.unwrap();
            send(&mut idle, "/quick").await;
            let mut busy = tokio::net::TcpStream::connect(addr).await.unwrap();
            send(&mut busy, "/slow").await;
            tokio::time::sleep(Duration::from_millis(200)).await;
            stop.send(()).unwrap();
            // Closed while the other request is still held (and long before the 10 s grace).
            let idle_got = read_to_end(&mut idle).await;
            assert!(idle_got.contains("quick"), "{workers}: {idle_got}");
            release.notify_one();
            let busy_got = read_to_end(&mut busy).await;
            assert!(
                busy_got.starts_with("HTTP/1.1 200") && busy_got.ends_with("slow answer"),
                "{workers}: {busy_got}"
            );
            tokio::time::timeout(Duration::from_secs(5), served)
                .await
                .expect("serve returns once its connections are done")
                .unwrap()
                .unwrap();
        }
    }
}
