//! The Workload Manager: creates sandboxes for sessions, keeps warm pools, and reclaims idle and
//! expired sessions.
//!
//! Main flow:
//! 1. `main` builds a [`Config`], a store (`agentcube-store`) and a [`backend::Backend`]:
//!    [`backend::local::LocalBackend`] (bubblewrap sandboxes on this host) or
//!    [`backend::kubernetes::KubernetesBackend`] (agent-sandbox objects in a cluster, whose CRs,
//!    warm pools and Router key it follows itself).
//! 2. [`WorkloadManager::start`] takes definitions from the backend or loads them from the
//!    manifest directory ([`definitions`]), syncs warm pools, and starts the reload watcher and
//!    the [`gc`] loop.
//! 3. [`api::app`] serves `POST /v1/{code-interpreter,agent-runtime}` and
//!    `DELETE /v1/*/sessions/{id}` through [`sessions::Manager`]: placeholder record → sandbox →
//!    ready record, rolled back on failure, timeout (504) or a vanished client.
//! 4. At start, [`reconcile`] deletes records whose sandbox is gone and sandboxes without a
//!    record; every [`gc`] run also reclaims sandboxes that died on their own.
//! 5. On shutdown every sandbox this process started is removed.
//!
//! Errors map to HTTP in one place: [`error::ApiError`].

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use agentcube_store::SessionStore;

pub mod api;
pub mod backend;
pub mod definitions;
pub mod error;
pub mod gc;
pub mod key;
pub mod metrics;
pub mod reconcile;
pub mod sessions;

use backend::Backend;
use definitions::Definitions;
use key::RouterKey;
use sessions::Manager;

/// Settings shared by both backends.
#[derive(Debug, Clone)]
pub struct Config {
    /// Directory of CodeInterpreter / AgentRuntime manifests (`None`: no definitions).
    pub manifests_dir: Option<PathBuf>,
    /// How often the manifest directory is checked for changes.
    pub reload_interval: Duration,
    /// GC interval (upstream: 15 s).
    pub gc_interval: Duration,
    /// Upper bound of one create (upstream: 2 min).
    pub create_timeout: Duration,
    /// Router public key (PEM) injected into `authMode: picod` sandboxes. `None`: the backend's
    /// ([`Backend::router_key`]), if it has one.
    pub public_key: Option<String>,
    /// Timeouts and the connection cap of the API listener.
    pub limits: agentcube_serve::Limits,
    /// Caps on live sessions.
    pub admission: sessions::Admission,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            manifests_dir: None,
            reload_interval: Duration::from_secs(2),
            gc_interval: Duration::from_secs(15),
            create_timeout: Duration::from_secs(120),
            public_key: None,
            limits: agentcube_serve::Limits::default(),
            admission: sessions::Admission::default(),
        }
    }
}

/// A running Workload Manager (without its HTTP listener, so it can be embedded).
pub struct WorkloadManager {
    pub manager: Arc<Manager>,
    limits: agentcube_serve::Limits,
    pub backend: Arc<dyn Backend>,
    stop: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl WorkloadManager {
    /// Loads definitions, fills warm pools, starts the reload watcher and GC.
    pub async fn start(
        config: Config,
        store: Arc<dyn SessionStore>,
        backend: Arc<dyn Backend>,
    ) -> anyhow::Result<Self> {
        let definitions = backend
            .definitions()
            .unwrap_or_else(|| Arc::new(Definitions::new()));
        let public_key = match (&config.public_key, backend.router_key()) {
            (Some(pem), _) => RouterKey::fixed(Some(pem.clone())),
            (None, Some(followed)) => followed,
            (None, None) => RouterKey::fixed(None),
        };
        if let Some(dir) = &config.manifests_dir {
            definitions
                .reload_if_changed(dir)
                .map_err(|e| anyhow::anyhow!("cannot read manifests in {}: {e}", dir.display()))?;
        }
        backend
            .sync_pools(definitions.code_interpreters(), config.public_key.clone())
            .await;
        let manager = Arc::new(Manager {
            store,
            backend: backend.clone(),
            definitions: definitions.clone(),
            public_key,
            create_timeout: config.create_timeout,
            metrics: Arc::new(metrics::Metrics::default()),
            admission: config.admission,
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
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        let mut tasks = Vec::new();
        let gc = gc::Gc {
            manager: manager.clone(),
            interval: config.gc_interval,
            limit: 1000,
        };
        tasks.push(tokio::spawn(gc.run(stopped(stop_rx.clone()))));
        if let Some(dir) = config.manifests_dir.clone() {
            let (defs, backend, key) = (definitions, backend.clone(), config.public_key.clone());
            let interval = config.reload_interval;
            let until = stopped(stop_rx);
            tasks.push(tokio::spawn(async move {
                tokio::pin!(until);
                loop {
                    tokio::select! {
                        () = tokio::time::sleep(interval) => {}
                        () = &mut until => return,
                    }
                    match defs.reload_if_changed(&dir) {
                        Ok(true) => {
                            backend
                                .sync_pools(defs.code_interpreters(), key.clone())
                                .await
                        }
                        Ok(false) => {}
                        Err(e) => tracing::warn!(error = %e, "cannot reload manifests"),
                    }
                }
            }));
        }
        Ok(Self {
            manager,
            limits: config.limits,
            backend,
            stop,
            tasks,
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
        let (metrics, backend) = (self.manager.metrics.clone(), self.backend.clone());
        move || {
            for (namespace, name, ready, _) in backend.pool_levels() {
                metrics
                    .warm_pool_ready
                    .get_or_create(&metrics::Pool { namespace, name })
                    .set(ready as i64);
            }
            metrics.encode()
        }
    }

    /// Stops the background tasks and removes every sandbox.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
        self.backend.shutdown().await;
    }
}

/// The Workload Manager's answer to a connection over `--max-connections`.
pub fn refusal() -> agentcube_serve::Refusal {
    agentcube_serve::Refusal::json(r#"{"message":"too many connections, please try again later"}"#)
}

/// Serves the API on `listener` until `shutdown` (through `agentcube-serve`: limits,
/// `TCP_NODELAY`, graceful shutdown), then cleans up.
pub async fn serve(
    wm: WorkloadManager,
    listener: impl Into<agentcube_serve::Listener>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let mut options = agentcube_serve::Options::new(wm.limits, refusal());
    options.stats = wm.manager.metrics.serve.clone();
    agentcube_serve::serve(listener.into(), wm.app(), options, shutdown).await?;
    wm.shutdown().await;
    Ok(())
}
