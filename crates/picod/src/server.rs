//! Routes, layers, and the serve loop with graceful shutdown.

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use agentcube_types::GoDuration;
use agentcube_types::picod::HealthResponse;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use tower_http::CompressionLevel;
use tower_http::compression::CompressionLayer;
use tower_http::compression::predicate::{Predicate, SizeAbove};

use crate::auth::{Verifier, require_token};
use crate::config::{Auth, Config};
use crate::error::ApiError;
use crate::jail::Workspace;
use crate::{context, exec, files, process};

/// Bodies from this size on are gzipped for clients that accept it.
pub const COMPRESS_FROM_BYTES: u16 = 1024;

/// Shared state of every handler.
#[derive(Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    pub workspace: Workspace,
    pub verifier: Option<Arc<Verifier>>,
    pub started: Instant,
    /// Present when `--metrics` is on.
    pub metrics: Option<Arc<crate::metrics::Metrics>>,
    /// Background processes started through `/api/processes`.
    pub processes: Arc<crate::process::Processes>,
    /// Stateful code contexts (`/api/contexts`).
    pub contexts: Arc<crate::context::Contexts>,
}

impl AppState {
    /// Validates the configuration: workspace created, public key parsed.
    pub fn new(config: Config) -> anyhow::Result<Self> {
        let mut workspace = Workspace::new(&config.workspace).map_err(|e| {
            anyhow::anyhow!("cannot use workspace {}: {e}", config.workspace.display())
        })?;
        if config.enter_workspace {
            workspace.enter().map_err(|e| {
                anyhow::anyhow!("cannot enter workspace {}: {e}", config.workspace.display())
            })?;
        }
        let verifier = match &config.auth {
            Auth::PublicKeyPem(pem) => Some(Arc::new(Verifier::from_pem(
                pem,
                config.token_cache_size,
                config.sandbox_name.as_deref(),
            )?)),
            Auth::Disabled => None,
        };
        let metrics = config.metrics.then(Default::default);
        Ok(Self {
            config: Arc::new(config),
            workspace,
            verifier,
            started: Instant::now(),
            metrics,
            processes: Arc::default(),
            contexts: Arc::default(),
        })
    }
}

/// Whether a body of this `Content-Type` is worth gzipping: text, JSON, XML, JavaScript, YAML,
/// shell and SVG. Anything else a download can be — archives, images, media, executables,
/// `application/octet-stream` — is mostly compressed already or compresses little, and gzip
/// would cut its transfer to the encoder's speed (tens of MB/s, paid from the sandbox's CPU)
/// and drop its `Content-Length` and ranges.
fn compressible(content_type: &str) -> bool {
    let essence = content_type.split(';').next().unwrap_or_default();
    let essence = essence.trim().to_ascii_lowercase();
    match essence.split_once('/') {
        Some(("text", sub)) => sub != "event-stream",
        Some(("application", sub)) => {
            TEXT_APPLICATION_TYPES.contains(&sub) || sub.ends_with("+json") || sub.ends_with("+xml")
        }
        Some(("image", sub)) => sub == "svg+xml",
        _ => false,
    }
}

/// `application/…` subtypes that are text.
const TEXT_APPLICATION_TYPES: &[&str] = &[
    "json",
    "xml",
    "javascript",
    "ecmascript",
    "yaml",
    "x-yaml",
    "toml",
    "x-sh",
    "sql",
    "graphql",
];

/// The whole HTTP surface; tests drive it with `oneshot`.
pub fn app(state: AppState) -> Router {
    let limit = state.config.max_body_bytes;
    // Compress what the client accepts when it is text (see `compressible`), except small bodies
    // (under 1 KiB gzip saves no packet and its encoder set-up costs more than the whole
    // answer), streams (NDJSON and SSE must flush: neither is `compressible`) and partial
    // content; at gzip's fastest level, as upstream (`gzip.BestSpeed`).
    let compress = SizeAbove::new(COMPRESS_FROM_BYTES - 1).and(
        |_: StatusCode, _: http::Version, h: &http::HeaderMap, _: &http::Extensions| {
            !h.contains_key(header::CONTENT_RANGE)
                && h.get(header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(compressible)
        },
    );
    let api = Router::new()
        .route("/api/execute", post(exec::execute))
        .route("/api/files", post(files::upload).get(files::list))
        .route("/api/files/{*path}", get(files::download))
        .route("/api/processes", post(process::start).get(process::list))
        .route("/api/processes/{id}/output", get(process::output))
        .route("/api/processes/{id}/stdin", post(process::stdin))
        .route(
            "/api/processes/{id}/stdin/close",
            post(process::close_stdin),
        )
        .route("/api/processes/{id}/signal", post(process::signal))
        .route("/api/processes/kill-all", post(crate::sweep::kill_all))
        .route("/api/contexts", post(context::create).get(context::list))
        .route("/api/contexts/{id}", axum::routing::delete(context::delete))
        .route("/api/contexts/{id}/delete", post(context::delete))
        .route("/api/contexts/{id}/restart", post(context::restart))
        .route(
            "/api/contexts/{id}/interrupt",
            post(context::interrupt_route),
        )
        .route("/api/contexts/{id}/execute", post(context::execute))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token))
        .layer(
            CompressionLayer::new()
                .gzip(true)
                .quality(CompressionLevel::Fastest)
                .compress_when(compress),
        );
    let mut app = Router::new().route("/health", get(health)).merge(api);
    if let Some(m) = &state.metrics {
        // Outside the token check and the compression layer; counted requests include refusals.
        let render = m.clone();
        app = app
            .route_layer(middleware::from_fn_with_state(
                m.clone(),
                crate::metrics::record,
            ))
            .merge(agentcube_serve::metrics_app(move || render.encode()).with_state(()));
    }
    app.fallback(no_route)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(limit))
        .layer(middleware::from_fn_with_state(state.clone(), reject_large))
        .with_state(state)
}

/// Any other path: PicoD's error shape, not an empty 404.
async fn no_route(method: http::Method, uri: http::Uri) -> ApiError {
    ApiError::NoRoute {
        method: method.to_string(),
        path: uri.path().to_owned(),
    }
}

/// A known path with another method (axum adds the `Allow` header).
async fn method_not_allowed(method: http::Method, uri: http::Uri) -> ApiError {
    ApiError::MethodNotAllowed {
        method: method.to_string(),
        path: uri.path().to_owned(),
    }
}

async fn health(State(state): State<AppState>) -> Json<HealthResponse> {
    let mut ports = None;
    if !state.config.health_ports.is_empty() {
        let mut map = std::collections::BTreeMap::new();
        for p in &state.config.health_ports {
            map.insert(p.to_string(), crate::forward::port_open(*p).await);
        }
        ports = Some(map);
    }
    Json(HealthResponse {
        status: "ok".into(),
        service: "PicoD".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        uptime: GoDuration(state.started.elapsed()).to_string(),
        ports,
    })
}

/// Refuses a declared body over the limit before reading it (upstream's 413 JSON); streamed
/// uploads go to disk as they come and are bounded by the workspace instead.
async fn reject_large(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let limit = state.config.max_body_bytes;
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) && !crate::files::is_streamed_upload(&req) {
        return ApiError::TooLarge { limit }.into_response();
    }
    next.run(req).await
}

/// Reads a whole body up to `limit` bytes; more is the 413 error.
pub async fn read_body(req: Request, limit: usize) -> Result<Bytes, ApiError> {
    axum::body::to_bytes(req.into_body(), limit)
        .await
        .map_err(|_| ApiError::TooLarge { limit })
}

/// Serves until `shutdown` resolves, then lets in-flight requests finish for
/// [`agentcube_serve::SHUTDOWN_GRACE`]; the listener's limits come from the configuration.
pub async fn run(
    state: AppState,
    listener: agentcube_serve::Listener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let refusal = agentcube_serve::Refusal::json(
        &serde_json::json!({"error": "too many connections", "code": 503}).to_string(),
    );
    let mut options = agentcube_serve::Options::new(state.config.limits, refusal);
    if let Some(m) = &state.metrics {
        options.stats = m.serve.clone();
    }
    agentcube_serve::serve(listener, app(state), options, shutdown).await
}

#[cfg(test)]
mod tests {
    use super::compressible;

    #[test]
    fn text_is_compressible_and_binary_is_not() {
        for t in [
            "text/plain",
            "text/csv; charset=utf-8",
            "application/json",
            "Application/JSON",
            "application/problem+json",
            "application/xhtml+xml",
            "application/javascript",
            "image/svg+xml",
        ] {
            assert!(compressible(t), "{t}");
        }
        for t in [
            "application/octet-stream",
            "application/zip",
            "application/gzip",
            "application/x-ndjson",
            "text/event-stream",
            "image/png",
            "video/mp4",
            "",
            "nonsense",
        ] {
            assert!(!compressible(t), "{t}");
        }
    }
}
