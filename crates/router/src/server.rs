//! Routes and the invoke handler: resolve the session, pick the entry point, attach the cached
//! token, forward, and stamp the session header on the sandbox's answer.

use std::net::SocketAddr;
use std::sync::Arc;

use agentcube_types::api::WorkloadKind;
use agentcube_types::headers::SESSION_ID;
use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Path, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, any, get};
use futures_util::StreamExt;
use serde_json::json;
use tokio::sync::Semaphore;

use crate::activity::Activity;
use crate::error::RouterError;
use crate::identity::Signer;
use crate::proxy::{Forward, Upstream};
use crate::resolve::{Resolver, pick};

/// Shared by every request.
pub struct Shared {
    pub metrics: crate::metrics::Metrics,
    pub resolver: Resolver,
    pub signer: Signer,
    pub upstream: Upstream,
    pub activity: Activity,
    /// `None`: unlimited.
    pub limiter: Option<Arc<Semaphore>>,
    /// `http` or `https` (for X-Forwarded-Proto).
    pub scheme: &'static str,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").finish_non_exhaustive()
    }
}

type AppState = Arc<Shared>;

/// The HTTP surface.
pub fn app(state: AppState) -> Router {
    let mut r = Router::new()
        .route(
            "/health/live",
            get(|| async { axum::Json(json!({"status": "alive"})) }),
        )
        .route(
            "/health/ready",
            get(|| async { axum::Json(json!({"status": "ready"})) }),
        );
    for kind in [WorkloadKind::CodeInterpreter, WorkloadKind::AgentRuntime] {
        let base = format!(
            "/v1/namespaces/{{ns}}/{}/{{name}}/invocations",
            kind.router_segment()
        );
        r = r
            .route(&format!("{base}/{{*path}}"), invoke_route(kind))
            .route(&format!("{base}/"), invoke_route(kind))
            .route(&base, any(redirect_to_slash));
    }
    r.fallback(not_found).with_state(state)
}

/// GET and POST are proxied; other methods get gin's plain 404, as upstream.
fn invoke_route(kind: WorkloadKind) -> MethodRouter<AppState> {
    let h = move |s: State<AppState>, p: Path<Target>, r: Request| invoke(kind, s, p, r);
    get(h).post(h).fallback(not_found)
}

async fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        [(header::CONTENT_TYPE, "text/plain")],
        "404 page not found",
    )
        .into_response()
}

/// `.../invocations` → `.../invocations/` (301 for GET, 307 otherwise), as gin does.
async fn redirect_to_slash(req: Request) -> Response {
    let status = if req.method() == http::Method::GET {
        StatusCode::MOVED_PERMANENTLY
    } else {
        StatusCode::TEMPORARY_REDIRECT
    };
    let q = req
        .uri()
        .query()
        .map(|q| format!("?{q}"))
        .unwrap_or_default();
    let loc = format!("{}/{q}", req.uri().path());
    (status, [(header::LOCATION, loc)]).into_response()
}

#[derive(serde::Deserialize)]
struct Target {
    ns: String,
    name: String,
}

async fn invoke(
    kind: WorkloadKind,
    State(s): State<AppState>,
    Path(t): Path<Target>,
    req: Request,
) -> Response {
    let client = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0);
    let started = std::time::Instant::now();
    let resp = match handle(kind, &s, t, client, req).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    };
    let code = resp.status().as_u16();
    s.metrics
        .requests
        .get_or_create(&crate::metrics::Status { code })
        .inc();
    s.metrics.latency.observe(started.elapsed().as_secs_f64());
    resp
}

async fn handle(
    kind: WorkloadKind,
    s: &AppState,
    t: Target,
    client_addr: Option<SocketAddr>,
    req: Request,
) -> Result<Response, RouterError> {
    let permit = match &s.limiter {
        Some(sem) => Some(
            sem.clone()
                .try_acquire_owned()
                .map_err(|_| RouterError::Overloaded)?,
        ),
        None => None,
    };
    // The full path after `/invocations`, still percent-encoded, never stripped.
    let raw = req.uri().path();
    let path = raw
        .find("/invocations")
        .map(|i| &raw[i + "/invocations".len()..])
        .filter(|p| !p.is_empty())
        .unwrap_or("/")
        .to_string();
    let session = req
        .headers()
        .get(SESSION_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())
        .map(str::to_string);
    let target = match &session {
        Some(id) => s.resolver.existing(id, kind, &t.ns, &t.name).await?,
        None => s.resolver.create(kind, &t.ns, &t.name).await?,
    };
    let entry = pick(&target.entry_points, &path)
        .ok_or(RouterError::NoEntryPoint)?
        .clone();
    s.activity.record(&target.session_id);
    let token = s
        .signer
        .token(
            &target.session_id,
            target.identity.as_deref(),
            jiff::Timestamp::now().as_second(),
        )
        .map_err(|_| RouterError::Signing)?;
    let fwd = Forward {
        entry: &entry,
        path: &path,
        token: &token,
        client_addr,
        scheme: s.scheme,
    };
    let resp = match s.upstream.forward(req, fwd).await {
        Ok(r) => r,
        Err(e) => {
            s.resolver.invalidate(&target.session_id);
            // A sandbox that cannot be reached may simply have been deleted since it was cached:
            // then the answer is the unknown-session 404, not a 502.
            if session.is_some()
                && matches!(e, RouterError::Refused | RouterError::Unreachable)
                && let Err(again @ RouterError::UnknownSession(_)) = s
                    .resolver
                    .existing(&target.session_id, kind, &t.ns, &t.name)
                    .await
            {
                return Err(again);
            }
            return Err(e);
        }
    };
    let (mut parts, body) = resp.into_parts();
    if let Ok(v) = HeaderValue::from_str(&target.session_id) {
        parts.headers.insert(SESSION_ID, v);
    }
    // The concurrency slot is held until the body has been streamed out.
    let body = match permit {
        Some(p) => Body::from_stream(body.into_data_stream().map(move |chunk| {
            let _held = &p;
            chunk
        })),
        None => body,
    };
    Ok(Response::from_parts(parts, body))
}
