//! The Workload Manager: creates sandboxes for sessions, keeps warm pools, and reclaims idle and
//! expired sessions.
//!
//! Main flow:
//! 1. `main` builds a [`Config`], a store (`agentcube-store`) and a [`backend::Platform`]:
//!    [`backend::local::LocalBackend::platform`] (bubblewrap sandboxes on this host, definitions
//!    from a manifest directory) or [`backend::kubernetes::KubernetesBackend::platform`]
//!    (agent-sandbox objects in a cluster, whose CRs, warm pools and Router key it follows).
//! 2. [`WorkloadManager::start`] takes the platform's definitions, key and pools as they are,
//!    reconciles the store with its sandboxes and starts the [`gc`] loop.
//! 3. [`api::app`] serves `POST /v1/{code-interpreter,agent-runtime}`, the session reads and
//!    `DELETE /v1/*/sessions/{id}` through [`sessions::Manager`]: placeholder record → sandbox →
//!    ready record, rolled back on failure, timeout (504) or a vanished client. [`auth`] says
//!    who calls (TokenReview or a static token) and which end user a Router vouches for.
//! 4. At start, [`reconcile`] deletes records whose sandbox is gone and sandboxes without a
//!    record; every [`gc`] run also reclaims sandboxes that died on their own.
//! 5. On shutdown every sandbox this process started is removed.
//!
//! Before any of it, `main` takes the store's [`lease::StoreLease`]: one platform per store.
//!
//! Errors map to HTTP in one place: [`error::ApiError`].

use std::sync::Arc;
use std::time::Duration;

use agentcube_store::SessionStore;

pub mod api;
pub mod auth;
pub mod backend;
mod budget;
pub mod definitions;
pub mod error;
pub mod gc;
pub mod key;
pub mod lease;
pub mod metrics;
pub mod reconcile;
pub mod sessions;

use backend::{Backend, Background, Platform, WarmPools};
use sessions::Manager;

/// Settings shared by both backends.
/// Default upper bound of one create (`--create-timeout`): 1 min 50 s (upstream: 2 min), so that
/// its `504` and the reason reach callers that give up after 2 minutes (the SDKs, the Router)
/// before they do.
pub const DEFAULT_CREATE_TIMEOUT: Duration = Duration::from_secs(110);

/// Default interval of garbage collection (`--gc-interval`; upstream: 15 s).
pub const DEFAULT_GC_INTERVAL: Duration = Duration::from_secs(15);

#[derive(Debug, Clone)]
pub struct Config {
    /// GC interval ([`DEFAULT_GC_INTERVAL`]).
    pub gc_interval: Duration,
    /// Upper bound of one create ([`DEFAULT_CREATE_TIMEOUT`]).
    pub create_timeout: Duration,
    /// Timeouts and the connection cap of the API listener.
    pub limits: agentcube_serve::Limits,
    /// Caps on live sessions.
    pub admission: sessions::Admission,
    /// Caller authentication of the API (`--enable-auth`, or `agentcube up`'s token).
    pub auth: Arc<auth::CallerAuth>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            gc_interval: DEFAULT_GC_INTERVAL,
            create_timeout: DEFAULT_CREATE_TIMEOUT,
            limits: agentcube_serve::Limits::default(),
            admission: sessions::Admission::default(),
            auth: Arc::new(auth::CallerAuth::Off),
        }
    }
}

/// A running Workload Manager (without its HTTP listener, so it can be embedded).
pub struct WorkloadManager {
    pub manager: Arc<Manager>,
    limits: agentcube_serve::Limits,
    pub backend: Arc<dyn Backend>,
    pub pools: Arc<dyn WarmPools>,
    /// GC.
    background: Background,
    /// The platform's (manifest reloads).
    platform_tasks: Background,
}

impl WorkloadManager {
    /// Reconciles the store with the platform's sandboxes and starts GC.
    pub async fn start(
        config: Config,
        store: Arc<dyn SessionStore>,
        platform: Platform,
    ) -> anyhow::Result<Self> {
        let Platform {
            backend,
            definitions,
            key,
            pools,
            background: platform_tasks,
        } = platform;
        let manager = Arc::new(Manager {
            store,
            backend: backend.clone(),
            definitions,
            public_key: key,
            create_timeout: config.create_timeout,
            metrics: Arc::new(metrics::Metrics::default()),
            admission: config.admission,
            auth: config.auth.clone(),
        });
        match reconcile::run(&manager, jiff::Timestamp::now()).await {
            Ok(r) => tracing::info!(
                records = r.records,
                stale_records = r.stale_records,
                orphan_sandboxes = r.orphans,
                "start-up reconciliation done"
            ),
            Err(e) => {
                tracing::warn!(error = %e, "start-up reconciliation failed; GC will catch up")
            }
        }
        let mut background = Background::default();
        let gc = gc::Gc {
            manager: manager.clone(),
            interval: config.gc_interval,
            limit: 1000,
        };
        background.spawn(gc.run(background.stopped()));
        Ok(Self {
            manager,
            limits: config.limits,
            backend,
            pools,
            background,
            platform_tasks,
        })
    }

    /// The HTTP API.
    pub fn app(&self) -> axum::Router {
        api::app(self.manager.clone())
    }

    /// The admin surface: `GET /metrics` (Prometheus text format).
    pub fn admin_app(&self) -> axum::Router {
        agentcube_serve::metrics_app(self.metrics_renderer())
    }

    /// Renders the metrics (warm-pool levels refreshed first), for an admin port.
    pub fn metrics_renderer(&self) -> impl Fn() -> String + Clone + Send + Sync + 'static {
        let (metrics, pools) = (self.manager.metrics.clone(), self.pools.clone());
        move || {
            for p in pools.levels() {
                let pool = metrics::Pool {
                    namespace: p.namespace,
                    name: p.name,
                };
                metrics
                    .warm_pool_ready
                    .get_or_create(&pool)
                    .set(p.ready as i64);
                metrics
                    .standby_claims_ready
                    .get_or_create(&pool)
                    .set(p.standby as i64);
            }
            metrics.encode()
        }
    }

    /// Stops the background tasks and removes every sandbox.
    pub async fn shutdown(self) {
        self.platform_tasks.stop().await;
        self.background.stop().await;
        self.backend.shutdown().await;
    }
}

/// The Workload Manager's answer to a connection over `--max-connections`.
pub fn refusal() -> agentcube_serve::Refusal {
    agentcube_serve::Refusal::json(r#"{"message":"too many connections, please try again later"}"#)
}

/// Serves the API on `listener` (plain HTTP/1.1 and h2c, or HTTPS / mutual TLS with `tls`)
/// until `shutdown` (through `agentcube-serve`: limits, `TCP_NODELAY`, graceful shutdown), then
/// cleans up.
pub async fn serve(
    wm: WorkloadManager,
    listener: impl Into<agentcube_serve::Listener>,
    tls: Option<agentcube_tls::ServerTls>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let mut options = agentcube_serve::Options::new(wm.limits, refusal());
    options.stats = wm.manager.metrics.serve.clone();
    let (listener, app) = (listener.into(), wm.app());
    match tls {
        None => agentcube_serve::serve(listener, app, options, shutdown).await?,
        Some(tls) => {
            let options = options.with_handshake(tls);
            agentcube_serve::serve(listener, app, options, shutdown).await?
        }
    }
    wm.shutdown().await;
    Ok(())
}
