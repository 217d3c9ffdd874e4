//! Prometheus metrics of the Workload Manager, served on the admin port (`/metrics`).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// A warm pool.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Pool {
    pub namespace: String,
    pub name: String,
}

/// Every metric the Workload Manager exports.
pub struct Metrics {
    registry: Registry,
    pub sessions_created: Counter,
    pub create_failures: Counter,
    pub sessions_deleted: Counter,
    pub gc_deleted: Counter,
    /// Creates refused by an admission cap.
    pub admission_refusals: Counter,
    /// Sandboxes found dead (exited on their own) and reclaimed.
    pub dead_reclaimed: Counter,
    /// Records deleted at start because their sandbox was gone.
    pub reconciled_records: Counter,
    /// Sandboxes deleted at start because their session had no record.
    pub reconciled_orphans: Counter,
    /// Ready sandboxes per warm pool (refreshed at each scrape).
    pub warm_pool_ready: Family<Pool, Gauge>,
    /// The API listener's connection counters.
    pub serve: std::sync::Arc<agentcube_serve::Stats>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("agentcube_workload_manager");
        let m = Self {
            sessions_created: Counter::default(),
            create_failures: Counter::default(),
            sessions_deleted: Counter::default(),
            gc_deleted: Counter::default(),
            admission_refusals: Counter::default(),
            dead_reclaimed: Counter::default(),
            reconciled_records: Counter::default(),
            reconciled_orphans: Counter::default(),
            warm_pool_ready: Family::default(),
            serve: Default::default(),
            registry: Registry::default(),
        };
        m.serve.register(&mut registry);
        registry.register(
            "sessions_created",
            "Sessions created",
            m.sessions_created.clone(),
        );
        registry.register(
            "session_create_failures",
            "Session creations that failed or timed out",
            m.create_failures.clone(),
        );
        registry.register(
            "sessions_deleted",
            "Sessions deleted (API and GC)",
            m.sessions_deleted.clone(),
        );
        registry.register(
            "gc_deleted",
            "Sessions reclaimed by the garbage collector",
            m.gc_deleted.clone(),
        );
        registry.register(
            "admission_refusals",
            "Session creates refused by an admission cap (sessions, memory)",
            m.admission_refusals.clone(),
        );
        registry.register(
            "dead_sandboxes_reclaimed",
            "Sandboxes that died on their own and were reclaimed with their session",
            m.dead_reclaimed.clone(),
        );
        registry.register(
            "reconciled_stale_records",
            "Records deleted at start because their sandbox was gone",
            m.reconciled_records.clone(),
        );
        registry.register(
            "reconciled_orphan_sandboxes",
            "Sandboxes deleted at start because no record named their session",
            m.reconciled_orphans.clone(),
        );
        registry.register(
            "warm_pool_ready",
            "Ready sandboxes per warm pool",
            m.warm_pool_ready.clone(),
        );
        Self { registry, ..m }
    }
}

impl Metrics {
    /// OpenMetrics text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
