//! The Router: every SDK or agent request goes through it. It is stateless (any replica serves
//! any session) and keeps its hot path to at most one store round trip and no RSA.
//!
//! Main flow of `/v1/namespaces/{ns}/{code-interpreters|agent-runtimes}/{name}/invocations/*path`:
//! 1. [`server`]: end-user authentication when configured ([`oidc`]: 401/403, before any
//!    concurrency slot is taken), concurrency limit (429), then the `x-agentcube-session-id`
//!    header.
//! 2. [`resolve`]: present → local cache (short TTL) or one store GET (404 if unknown, 409 if the
//!    session belongs to another runtime; with authentication, 403 unless the caller owns it or
//!    is an admin); absent → the Workload Manager creates one ([`wm`]), owned by the caller.
//! 3. [`identity`]: the session's cached RS256 token replaces the client's `Authorization`.
//! 4. [`proxy`]: a pooled TCP / Unix-socket connection ([`pool`]), bodies streamed, upgrades spliced; the
//!    answer gets the session header. A request the serving fast lane took is forwarded from
//!    the bytes it arrived in, with no `http` types built ([`inbound`]: the handler is the same). Refused → 502, timeout → 504, other → 503 ([`error`]).
//! 5. [`activity`]: a session is active while requests to it are in flight and at each answer's
//!    end (noted in memory by what the request holds, `held`, and flushed to the store in
//!    batches); a session made for a request whose id never reached its client is deleted again.
//!
//! `agentcube_tls` serves the same app over HTTPS when configured (`--enable-tls`, reloading
//! its certificate when the files change), and carries the create calls to the Workload Manager
//! over mutual TLS with `--mtls-*` ([`wm`]).

use std::sync::Arc;
use std::time::Duration;

use agentcube_store::SessionStore;

pub mod activity;
pub mod error;
mod h1;
mod held;
pub use held::Rollbacks;
pub mod identity;
pub mod inbound;
pub mod metrics;
pub mod oidc;
pub mod pool;
pub mod proxy;
pub mod resolve;
pub mod server;
pub mod shares;
pub mod wm;

pub use identity::KeyPair;
pub use server::Shared;

/// Router settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// `WORKLOAD_MANAGER_URL`.
    pub workload_manager_url: String,
    /// Concurrent proxied requests; 0 = unlimited.
    pub max_concurrent_requests: usize,
    /// Concurrent proxied requests per authenticated end user (administrators aside); 0 =
    /// no share. Applies only with end-user authentication.
    pub max_concurrent_per_user: usize,
    /// HTTP worker threads (a runtime and upstream pool each); 0 serves on the caller's runtime.
    pub workers: usize,
    /// How long a looked-up session is reused without asking the store (0 = always ask).
    pub session_cache_ttl: Duration,
    /// How often activity is written to the store.
    pub activity_flush_interval: Duration,
    /// On shutdown, how long requests in flight may finish before their connections are cut.
    pub shutdown_grace: Duration,
    /// Upper bound of connecting to a sandbox.
    pub connect_timeout: Duration,
    /// How long a sandbox's host may leave a request unacknowledged before its connection is
    /// given up (pooled HTTP/1.1 and h2c connections; [`pool::DEAD_PEER_TIMEOUT`]).
    pub dead_peer_timeout: Duration,
    /// Upper bound of a Workload Manager create call (upstream: 2 min).
    pub workload_manager_timeout: Duration,
    /// Service-account token sent to the WM, re-read per call (in a cluster).
    pub workload_manager_token_file: Option<std::path::PathBuf>,
    /// A fixed bearer token sent to the WM when there is no token file (`agentcube up`).
    pub workload_manager_token: Option<String>,
    /// Mutual TLS towards the WM (`--mtls-*`); `None`: `https://` against the system's CAs.
    pub workload_manager_tls: Option<agentcube_tls::ClientTls>,
    /// End-user authentication (OIDC, or `agentcube up`'s static token); `None`: off.
    pub authn: Option<Arc<oidc::Authn>>,
    /// `X-Forwarded-Proto` value.
    pub scheme: &'static str,
    /// Timeouts and the connection cap of the listener.
    pub limits: agentcube_serve::Limits,
    /// Which `unix:` entry points may be connected to.
    pub unix_entry_points: proxy::UnixEntryPoints,
    /// On loopback without a token (`agentcube up`): refuse every invocation a web page may have
    /// sent (a foreign `Host` or `Origin`, or `Sec-Fetch-Site: cross-site`; see
    /// [`agentcube_types::browser::Guard::Local`]). Otherwise, without `authn`, a page of another
    /// site and a rebinding page from loopback are still refused (`Guard::Open`).
    pub local_only: bool,
}

impl Config {
    /// Defaults for a WM URL.
    pub fn new(workload_manager_url: impl Into<String>) -> Self {
        Self {
            workload_manager_url: workload_manager_url.into(),
            max_concurrent_requests: 1000,
            max_concurrent_per_user: 100,
            workers: 0,
            session_cache_ttl: Duration::from_secs(1),
            activity_flush_interval: Duration::from_secs(1),
            shutdown_grace: agentcube_serve::SHUTDOWN_GRACE,
            connect_timeout: Duration::from_secs(5),
            dead_peer_timeout: pool::DEAD_PEER_TIMEOUT,
            workload_manager_timeout: Duration::from_secs(120),
            workload_manager_token_file: None,
            workload_manager_token: None,
            workload_manager_tls: None,
            authn: None,
            scheme: "http",
            limits: agentcube_serve::Limits::default(),
            unix_entry_points: proxy::UnixEntryPoints::Any,
            local_only: false,
        }
    }
}

/// A running Router (without its listener, so it can be embedded).
pub struct RouterService {
    pub shared: Arc<Shared>,
    limits: agentcube_serve::Limits,
    workers: usize,
    grace: Duration,
    store: Arc<dyn SessionStore>,
    flusher: tokio::task::JoinHandle<()>,
}

impl RouterService {
    /// Builds the router and starts the activity flusher.
    pub fn start(
        config: &Config,
        store: Arc<dyn SessionStore>,
        identity: &KeyPair,
    ) -> anyhow::Result<Self> {
        let wm = wm::WmClient::new(
            &config.workload_manager_url,
            config.workload_manager_timeout,
            config.workload_manager_token_file.clone(),
            config.workload_manager_token.clone(),
            config.workload_manager_tls.as_ref(),
        );
        let metrics = Arc::new(metrics::Metrics::default());
        let shared = Arc::new(Shared {
            resolver: Arc::new(resolve::Resolver::new(
                store.clone(),
                wm,
                config.session_cache_ttl,
                metrics.store_gets.clone(),
            )),
            signer: Arc::new(identity::Signer::new(identity, metrics.signatures.clone())?),
            metrics,
            authn: config.authn.clone(),
            upstream: proxy::Upstream::new(
                config.connect_timeout,
                config.dead_peer_timeout,
                config.unix_entry_points.clone(),
            ),
            activity: Arc::default(),
            rollbacks: held::Rollbacks::on_this_runtime(),
            limiter: (config.max_concurrent_requests > 0)
                .then(|| Arc::new(tokio::sync::Semaphore::new(config.max_concurrent_requests))),
            shares: shares::Shares::new(config.max_concurrent_per_user),
            scheme: config.scheme,
            browser_guard: if config.local_only {
                agentcube_types::browser::Guard::Local
            } else {
                agentcube_types::browser::Guard::unless_authenticated(config.authn.is_some())
            },
        });
        let (s, st, every) = (
            shared.clone(),
            store.clone(),
            config.activity_flush_interval,
        );
        let flusher = tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                s.activity.flush(st.as_ref()).await;
            }
        });
        Ok(Self {
            shared,
            grace: config.shutdown_grace,
            limits: config.limits,
            workers: config.workers,
            store,
            flusher,
        })
    }

    /// The HTTP surface, built once per worker (each with its own upstream pool), invocations
    /// answered ahead of axum's router ([`server::front`]).
    pub fn worker_app(&self) -> agentcube_serve::App {
        let shared = self.shared.clone();
        agentcube_serve::App::per_worker(move || {
            let state = Arc::new(shared.for_worker());
            agentcube_serve::Routes::with_front(
                server::app(state.clone()),
                server::front(state.clone()),
            )
            .with_lane_front(server::lane_front(state))
        })
    }

    /// The admin surface: `GET /metrics` (Prometheus text format).
    pub fn admin_app(&self) -> axum::Router {
        admin_app(self.shared.clone())
    }

    /// Deletes the sessions made for requests cut by the shutdown (bounded), then stops the
    /// flusher after a last flush.
    pub async fn shutdown(self) {
        self.shared.rollbacks.finish().await;
        self.flusher.abort();
        self.shared.activity.flush(self.store.as_ref()).await;
    }
}

/// The admin surface of a Router: `GET /metrics` (Prometheus text format).
pub fn admin_app(shared: Arc<Shared>) -> axum::Router {
    agentcube_serve::metrics_app(move || shared.metrics.encode())
}

/// The Router's answer to a connection over `--max-connections`.
pub fn refusal() -> agentcube_serve::Refusal {
    agentcube_serve::Refusal::json(
        &serde_json::json!({"error": "too many connections, please try again later", "code": "TOO_MANY_CONNECTIONS"})
            .to_string(),
    )
}

/// Serves on `listener` (plain HTTP/1.1 and h2c, or HTTPS with `tls`) until `shutdown`, then
/// flushes activity. All through `agentcube-serve`: limits, `TCP_NODELAY`, graceful shutdown.
pub async fn serve(
    service: RouterService,
    listener: impl Into<agentcube_serve::Listener>,
    tls: Option<agentcube_tls::ServerTls>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let app = service.worker_app();
    let mut options = agentcube_serve::Options::new(service.limits, refusal());
    options.stats = service.shared.metrics.serve.clone();
    options.workers = service.workers;
    options.grace = service.grace;
    let listener = listener.into();
    match tls {
        None => agentcube_serve::serve(listener, app, options, shutdown).await?,
        Some(tls) => {
            let options = options.with_handshake(tls);
            agentcube_serve::serve(listener, app, options, shutdown).await?
        }
    }
    service.shutdown().await;
    Ok(())
}
