//! Prometheus metrics of the Workload Manager, served on the admin port (`/metrics`).
//!
//! Upstream's names (PR #353) where the quantity is the same — `agentcube_sandbox_*` and
//! `agentcube_gc_*` — and ours (`agentcube_workload_manager_*`) for what upstream lacks. The
//! README lists them all.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use agentcube_types::api::WorkloadKind;

/// A warm pool.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Pool {
    pub namespace: String,
    pub name: String,
}

/// A create's runtime kind and outcome (`success` or `failure`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Create {
    pub kind: String,
    pub status: &'static str,
}

/// A runtime kind (`AgentRuntime`, `CodeInterpreter`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Kind {
    pub kind: String,
}

/// Why the garbage collector reclaimed a sandbox.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reclaim {
    pub reason: Reason,
}

/// `idle` (past `sessionTimeout`), `expired` (past `expiresAt`), `dead` (the sandbox exited on
/// its own), `orphan` (no record named its session).
#[derive(
    Clone, Copy, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelValue,
)]
#[allow(non_camel_case_types)]
pub enum Reason {
    idle,
    expired,
    dead,
    orphan,
}

/// Every metric the Workload Manager exports.
pub struct Metrics {
    registry: Registry,
    /// `agentcube_sandbox_create_duration_seconds{kind,status}`.
    create_duration: Family<Create, Histogram, fn() -> Histogram>,
    /// `agentcube_sandbox_create_total{kind,status}`.
    creates: Family<Create, Counter>,
    /// `agentcube_sandbox_delete_total{kind}`: deletes asked through the API.
    deletes: Family<Kind, Counter>,
    /// `agentcube_sandbox_rollback_total`: creates undone (failure, timeout, client gone).
    pub rollbacks: Counter,
    /// `agentcube_gc_cycle_duration_seconds`.
    pub gc_cycle: Histogram,
    /// `agentcube_gc_sandboxes_reclaimed_total{reason}`.
    gc_reclaimed: Family<Reclaim, Counter>,
    /// `agentcube_gc_errors_total`: failed GC steps (store listings, deletes).
    pub gc_errors: Counter,
    /// All deletes, API and GC (ours).
    pub sessions_deleted: Counter,
    /// Creates refused by an admission cap.
    pub admission_refusals: Counter,
    /// Records deleted at start because their sandbox was gone.
    pub reconciled_records: Counter,
    /// Sandboxes deleted at start because their session had no record.
    pub reconciled_orphans: Counter,
    /// Ready sandboxes per warm pool (refreshed at each scrape).
    pub warm_pool_ready: Family<Pool, Gauge>,
    /// Standby claims ready to be handed out per warm pool (refreshed at each scrape).
    pub standby_claims_ready: Family<Pool, Gauge>,
    /// The API listener's connection counters.
    pub serve: std::sync::Arc<agentcube_serve::Stats>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

fn create_buckets() -> Histogram {
    // 5 ms (warm claim) … ~160 s (a cold pod pulling its image).
    Histogram::new(exponential_buckets(0.005, 2.0, 16))
}

impl Default for Metrics {
    fn default() -> Self {
        let m = Self {
            registry: Registry::default(),
            create_duration: Family::new_with_constructor(create_buckets),
            creates: Family::default(),
            deletes: Family::default(),
            rollbacks: Counter::default(),
            gc_cycle: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            gc_reclaimed: Family::default(),
            gc_errors: Counter::default(),
            sessions_deleted: Counter::default(),
            admission_refusals: Counter::default(),
            reconciled_records: Counter::default(),
            reconciled_orphans: Counter::default(),
            warm_pool_ready: Family::default(),
            standby_claims_ready: Family::default(),
            serve: Default::default(),
        };
        let mut registry = Registry::default();
        m.register_upstream(&mut registry);
        m.register_ours(registry.sub_registry_with_prefix("agentcube_workload_manager"));
        Self { registry, ..m }
    }
}

impl Metrics {
    fn register_upstream(&self, r: &mut Registry) {
        r.register(
            "agentcube_sandbox_create_duration_seconds",
            "Time to create a session's sandbox, by kind and status",
            self.create_duration.clone(),
        );
        r.register(
            "agentcube_sandbox_create",
            "Sandbox creations by kind and status (success, failure)",
            self.creates.clone(),
        );
        r.register(
            "agentcube_sandbox_delete",
            "Sessions deleted through the API, by kind",
            self.deletes.clone(),
        );
        r.register(
            "agentcube_sandbox_rollback",
            "Creates rolled back (sandbox and record removed)",
            self.rollbacks.clone(),
        );
        r.register(
            "agentcube_gc_cycle_duration_seconds",
            "Time of one garbage-collection pass",
            self.gc_cycle.clone(),
        );
        r.register(
            "agentcube_gc_sandboxes_reclaimed",
            "Sandboxes reclaimed by the garbage collector, by reason",
            self.gc_reclaimed.clone(),
        );
        r.register(
            "agentcube_gc_errors",
            "Garbage-collection steps that failed",
            self.gc_errors.clone(),
        );
    }

    fn register_ours(&self, r: &mut Registry) {
        self.serve.register(r);
        r.register(
            "sessions_deleted",
            "Sessions deleted (API and GC)",
            self.sessions_deleted.clone(),
        );
        r.register(
            "admission_refusals",
            "Session creates refused by an admission cap (sessions, memory)",
            self.admission_refusals.clone(),
        );
        r.register(
            "reconciled_stale_records",
            "Records deleted at start because their sandbox was gone",
            self.reconciled_records.clone(),
        );
        r.register(
            "reconciled_orphan_sandboxes",
            "Sandboxes deleted at start because no record named their session",
            self.reconciled_orphans.clone(),
        );
        r.register(
            "warm_pool_ready",
            "Ready sandboxes per warm pool",
            self.warm_pool_ready.clone(),
        );
        r.register(
            "standby_claims_ready",
            "Standby claims bound to a Ready sandbox per warm pool (--standby-claims)",
            self.standby_claims_ready.clone(),
        );
    }

    /// Records a finished create of `kind`.
    pub fn created(&self, kind: WorkloadKind, ok: bool, seconds: f64) {
        let label = Create {
            kind: kind.to_string(),
            status: if ok { "success" } else { "failure" },
        };
        self.creates.get_or_create(&label).inc();
        self.create_duration.get_or_create(&label).observe(seconds);
    }

    /// Records a delete asked through the API.
    pub fn deleted(&self, kind: WorkloadKind) {
        let label = Kind {
            kind: kind.to_string(),
        };
        self.deletes.get_or_create(&label).inc();
    }

    /// Records `n` sandboxes the garbage collector reclaimed for `reason`.
    pub fn reclaimed(&self, reason: Reason, n: usize) {
        if n > 0 {
            self.gc_reclaimed
                .get_or_create(&Reclaim { reason })
                .inc_by(n as u64);
        }
    }

    /// OpenMetrics text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
