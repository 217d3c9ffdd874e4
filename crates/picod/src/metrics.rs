//! Optional Prometheus metrics (`--metrics`): `GET /metrics`, unauthenticated and never
//! compressed, like upstream's PicoD proposal (PR #400). Off by default, so a sandbox exposes
//! nothing new unless its definition asks. Counts requests by route and status, their duration,
//! and the listener's connection counters; never a path, command or file name.

use std::sync::Arc;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// A request's route pattern (`/api/execute`, `/api/files/{*path}`, …) and status code.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Answer {
    pub route: String,
    pub code: u16,
}

/// A route pattern.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Route {
    pub route: String,
}

/// PicoD's metrics, under `agentcube_picod_`.
pub struct Metrics {
    registry: Registry,
    requests: Family<Answer, Counter>,
    duration: Family<Route, Histogram, fn() -> Histogram>,
    /// The listener's connection counters.
    pub serve: Arc<agentcube_serve::Stats>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

fn buckets() -> Histogram {
    // 100 µs (a file listing) … ~200 s (a long command).
    Histogram::new(exponential_buckets(0.000_1, 2.0, 22))
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("agentcube_picod");
        let m = Self {
            registry: Registry::default(),
            requests: Family::default(),
            duration: Family::new_with_constructor(buckets),
            serve: Default::default(),
        };
        registry.register(
            "requests",
            "API requests by route and status",
            m.requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time to the answer's headers (streams: to their start), by route",
            m.duration.clone(),
        );
        m.serve.register(&mut registry);
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

/// Middleware counting every routed request (refused ones too: a 401 is worth seeing).
pub async fn record(State(m): State<Arc<Metrics>>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "other".to_string(), |p| p.as_str().to_string());
    let started = std::time::Instant::now();
    let resp = next.run(req).await;
    let code = resp.status().as_u16();
    m.duration
        .get_or_create(&Route {
            route: route.clone(),
        })
        .observe(started.elapsed().as_secs_f64());
    m.requests.get_or_create(&Answer { route, code }).inc();
    resp
}
