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
use http_body_util::BodyExt;
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
        .route("/health/ready", get(ready));
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

/// Ready only while the session store answers: a Router that cannot look sessions up should get
/// no traffic.
async fn ready(State(s): State<AppState>) -> Response {
    if s.resolver.store_ready().await {
        axum::Json(json!({"status": "ready"})).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"status": "not ready", "error": "session store unavailable"})),
        )
            .into_response()
    }
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

/// The path after `/v1/namespaces/{ns}/{kind}/{name}/invocations`, still percent-encoded and
/// never stripped: everything from the 7th `/` of the matched route (`/` when nothing follows).
/// Positional, so names and namespaces containing `invocations` route correctly.
pub fn invocation_path(raw: &str) -> &str {
    match raw.match_indices('/').nth(6) {
        Some((i, _)) => &raw[i..],
        None => "/",
    }
}

/// The session header: absent (or empty), a valid id, or a 400 for bytes that are not visible
/// ASCII (never silently treated as "no session").
fn session_header(req: &Request) -> Result<Option<String>, RouterError> {
    match req.headers().get(SESSION_ID) {
        None => Ok(None),
        Some(v) => {
            let v = v.to_str().map_err(|_| RouterError::BadSessionHeader)?;
            Ok((!v.is_empty()).then(|| v.to_string()))
        }
    }
}

#[tracing::instrument(name = "invoke", skip_all, fields(%kind, ns = %t.ns, name = %t.name, session_id = tracing::field::Empty))]
async fn handle(
    kind: WorkloadKind,
    s: &AppState,
    t: Target,
    client_addr: Option<SocketAddr>,
    req: Request,
) -> Result<Response, RouterError> {
    let session = session_header(&req)?;
    let permit = match &s.limiter {
        Some(sem) => Some(
            sem.clone()
                .try_acquire_owned()
                .map_err(|_| RouterError::Overloaded)?,
        ),
        None => None,
    };
    let path = invocation_path(req.uri().path()).to_string();
    let target = match &session {
        Some(id) => s.resolver.existing(id, kind, &t.ns, &t.name).await?,
        None => s.resolver.create(kind, &t.ns, &t.name).await?,
    };
    tracing::Span::current().record("session_id", target.session_id.as_str());
    let answered = forward(s, &target, &path, client_addr, req).await;
    let resp = match answered {
        Ok(r) => r,
        Err(e) if session.is_none() => {
            // The new session's id would never reach the client: do not leave it running.
            let (s, id) = (s.clone(), target.session_id.clone());
            tokio::spawn(async move { s.resolver.roll_back(kind, &id).await });
            return Err(e);
        }
        Err(e) => return Err(unknown_if_deleted(s, &target, kind, &t, e).await),
    };
    // Activity counts only what the sandbox answered (a dead sandbox does not stay "active"),
    // at the answer and again when it has been streamed out.
    s.activity.record(&target.session_id);
    let (mut parts, body) = resp.into_parts();
    if let Ok(v) = HeaderValue::from_str(&target.session_id) {
        parts.headers.insert(SESSION_ID, v);
    }
    let done = Done {
        shared: s.clone(),
        session_id: target.session_id,
        _permit: permit,
    };
    // `map_frame` keeps trailers (gRPC over h2c) and holds `done` until the body is dropped.
    let body = Body::new(body.map_frame(move |frame| {
        let _held = &done;
        frame
    }));
    Ok(Response::from_parts(parts, body))
}

/// Picks the entry point, attaches the token and forwards.
async fn forward(
    s: &AppState,
    target: &crate::resolve::Target,
    path: &str,
    client_addr: Option<SocketAddr>,
    req: Request,
) -> Result<Response, RouterError> {
    let entry = pick(&target.entry_points, path)
        .ok_or(RouterError::NoEntryPoint)?
        .clone();
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
        path,
        token: &token,
        client_addr,
        scheme: s.scheme,
    };
    s.upstream.forward(req, fwd).await
}

/// A sandbox that cannot be reached may simply have been deleted since it was cached: then the
/// answer is the unknown-session 404, not a 502.
async fn unknown_if_deleted(
    s: &AppState,
    target: &crate::resolve::Target,
    kind: WorkloadKind,
    t: &Target,
    e: RouterError,
) -> RouterError {
    s.resolver.invalidate(&target.session_id);
    if matches!(e, RouterError::Refused | RouterError::Unreachable)
        && let Err(again @ RouterError::UnknownSession(_)) = s
            .resolver
            .existing(&target.session_id, kind, &t.ns, &t.name)
            .await
    {
        return again;
    }
    e
}

/// Held by a response body until it has been streamed out: the concurrency slot, and the
/// activity noted when the answer is complete.
struct Done {
    shared: AppState,
    session_id: String,
    _permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl Drop for Done {
    fn drop(&mut self) {
        self.shared.activity.record(&self.session_id);
    }
}
