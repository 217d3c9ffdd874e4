//! Prometheus metrics of the Router, served on the admin port (`/metrics`).
//!
//! Names upstream chose (PR #353) where the quantity is the same —
//! `agentcube_router_request_duration_seconds{kind}`, `agentcube_router_proxy_errors_total{kind,reason}`
//! — and ours (`agentcube_router_*`) for the rest. The README lists them all.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use agentcube_types::api::WorkloadKind;

/// Label of an invocation's answer.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Status {
    pub code: u16,
}

/// The runtime kind of an invocation (`AgentRuntime`, `CodeInterpreter`), as upstream labels it.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

/// Why talking to a sandbox failed.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProxyError {
    pub kind: String,
    /// `connection_refused`, `timeout` or `other`.
    pub reason: &'static str,
}

/// Every metric the Router exports.
pub struct Metrics {
    registry: Registry,
    /// Invocations by HTTP status (proxied answers and the Router's own refusals).
    pub requests: Family<Status, Counter>,
    /// Seconds until the answer's headers were ready, by runtime kind.
    pub latency: Family<KindLabel, Histogram>,
    /// Failures reaching a sandbox, by kind and reason.
    pub proxy_errors: Family<ProxyError, Counter>,
    /// `latency` of each kind, looked up once (the hot path skips the family's map).
    latency_of: [Histogram; 2],
    /// Session lookups that went to the store (cache misses).
    pub store_gets: Counter,
    /// RS256 signatures made (one per session per refresh, never per request).
    pub signatures: Counter,
    /// `requests{code="200"}`, looked up once (the usual answer skips the family's map).
    ok: Counter,
    /// The listener's connection counters (timeouts, refusals, `TCP_NODELAY`).
    pub serve: std::sync::Arc<agentcube_serve::Stats>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("agentcube_router");
        let requests = Family::<Status, Counter>::default();
        let latency = Family::<KindLabel, Histogram>::new_with_constructor(
            (|| Histogram::new(exponential_buckets(0.000_05, 2.0, 18))) as fn() -> Histogram,
        );
        let proxy_errors = Family::<ProxyError, Counter>::default();
        let (store_gets, signatures) = (Counter::default(), Counter::default());
        registry.register(
            "requests",
            "Invocation requests by HTTP status",
            requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time to the answer's headers, by runtime kind",
            latency.clone(),
        );
        registry.register(
            "proxy_errors",
            "Requests that could not reach their sandbox, by kind and reason",
            proxy_errors.clone(),
        );
        registry.register(
            "store_lookups",
            "Session lookups that reached the store",
            store_gets.clone(),
        );
        registry.register(
            "token_signatures",
            "RS256 sandbox tokens signed",
            signatures.clone(),
        );
        let serve = std::sync::Arc::new(agentcube_serve::Stats::default());
        serve.register(&mut registry);
        let ok = requests.get_or_create(&Status { code: 200 }).clone();
        let latency_of = [WorkloadKind::AgentRuntime, WorkloadKind::CodeInterpreter].map(|k| {
            latency
                .get_or_create(&KindLabel {
                    kind: k.to_string(),
                })
                .clone()
        });
        Self {
            registry,
            ok,
            requests,
            latency,
            latency_of,
            proxy_errors,
            store_gets,
            signatures,
            serve,
        }
    }
}

impl Metrics {
    /// Counts one answer by status.
    pub fn count_status(&self, code: u16) {
        if code == 200 {
            self.ok.inc();
        } else {
            self.requests.get_or_create(&Status { code }).inc();
        }
    }

    /// Records how long an invocation of `kind` took to its answer's headers.
    pub fn observe_latency(&self, kind: WorkloadKind, seconds: f64) {
        let i = match kind {
            WorkloadKind::AgentRuntime => 0,
            WorkloadKind::CodeInterpreter => 1,
        };
        self.latency_of[i].observe(seconds);
    }

    /// Counts a failure to reach a sandbox; other errors are not proxy errors.
    pub fn count_proxy_error(&self, kind: WorkloadKind, e: &crate::error::RouterError) {
        use crate::error::RouterError;
        let reason = match e {
            RouterError::Refused => "connection_refused",
            RouterError::UpstreamTimeout => "timeout",
            RouterError::Unreachable => "other",
            _ => return,
        };
        let label = ProxyError {
            kind: kind.to_string(),
            reason,
        };
        self.proxy_errors.get_or_create(&label).inc();
    }

    /// OpenMetrics text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
