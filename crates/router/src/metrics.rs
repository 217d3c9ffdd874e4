//! Prometheus metrics of the Router, served on the admin port (`/metrics`).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Label of an invocation's answer.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Status {
    pub code: u16,
}

/// Every metric the Router exports.
pub struct Metrics {
    registry: Registry,
    /// Invocations by HTTP status (proxied answers and the Router's own refusals).
    pub requests: Family<Status, Counter>,
    /// Seconds until the answer's headers were ready.
    pub latency: Histogram,
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
        let latency = Histogram::new(exponential_buckets(0.000_05, 2.0, 18));
        let (store_gets, signatures) = (Counter::default(), Counter::default());
        registry.register(
            "requests",
            "Invocation requests by HTTP status",
            requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time to the answer's headers",
            latency.clone(),
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
        Self {
            registry,
            ok,
            requests,
            latency,
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

    /// OpenMetrics text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
