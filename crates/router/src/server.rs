//! Routes and the invoke handler: resolve the session, pick the entry point, attach the cached
//! token, forward, and stamp the session header on the sandbox's answer.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;

use agentcube_serve::{LaneRequest, LaneResponse, Relayed};
use agentcube_types::api::WorkloadKind;
use agentcube_types::browser::{Field, Guard};
use agentcube_types::headers::SESSION_ID;
use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;
use tokio::sync::Semaphore;
use tracing::Instrument;

use crate::activity::Activity;
use crate::error::RouterError;
use crate::held::{InFlight, Unclaimed};
use crate::identity::Signer;
use crate::inbound::{Inbound, path_of};
use crate::proxy::{Answer, Answered, Forward, Upstream};
use crate::resolve::{Resolver, pick};

/// Shared by every request of one worker. Everything but the upstream client is shared by all
/// workers; the client (and so its pooled connections and their tasks) is each worker's own.
pub struct Shared {
    pub metrics: Arc<crate::metrics::Metrics>,
    /// End-user authentication; `None`: off (upstream's default).
    pub authn: Option<Arc<crate::oidc::Authn>>,
    pub resolver: Arc<Resolver>,
    pub signer: Arc<Signer>,
    pub upstream: Upstream,
    pub activity: Arc<Activity>,
    /// Deletions of sessions whose id never reached their client ([`crate::held::Unclaimed`]).
    pub rollbacks: crate::held::Rollbacks,
    /// `None`: unlimited.
    pub limiter: Option<Arc<Semaphore>>,
    /// Each end user's share of the slots; `None`: no share.
    pub shares: Option<Arc<crate::shares::Shares>>,
    /// `http` or `https` (for X-Forwarded-Proto).
    pub scheme: &'static str,
    /// What a web page may have sent that is refused ([`agentcube_types::browser::Guard`]):
    /// `Local` on `agentcube up`'s loopback without a token, `Off` with end-user
    /// authentication, `Open` otherwise.
    pub browser_guard: Guard,
}

impl Shared {
    /// The state of another worker: the same sessions, tokens, activity and limits, its own
    /// upstream connections.
    pub fn for_worker(&self) -> Self {
        Self {
            metrics: self.metrics.clone(),
            authn: self.authn.clone(),
            resolver: self.resolver.clone(),
            signer: self.signer.clone(),
            upstream: self.upstream.fresh(),
            activity: self.activity.clone(),
            rollbacks: self.rollbacks.clone(),
            limiter: self.limiter.clone(),
            shares: self.shares.clone(),
            scheme: self.scheme,
            browser_guard: self.browser_guard,
        }
    }
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").finish_non_exhaustive()
    }
}

pub(crate) type AppState = Arc<Shared>;

/// The session header's name, built once.
const SESSION: http::HeaderName = http::HeaderName::from_static(SESSION_ID);
/// [`SESSION`], to be lent for as long as a request is forwarded.
static SESSION_NAME: http::HeaderName = SESSION;

/// The HTTP surface: health routes, and every other path through [`dispatch`] (the invocation
/// URLs are matched by hand: one split of the path, no router tables or extractors on the hot
/// path).
pub fn app(state: AppState) -> Router {
    Router::new()
        .route(
            "/health/live",
            get(|| async { axum::Json(json!({"status": "alive"})) }),
        )
        .route("/health/ready", get(ready))
        .fallback(dispatch)
        .with_state(state)
}

/// The hot path ahead of axum's router (no route table, no extractors): `GET`/`POST` on
/// `…/invocations/…` go straight to [`invoke`]; everything else is handed back to [`app`], whose
/// [`dispatch`] answers the same invocations the same way when called without this front.
#[expect(
    clippy::result_large_err,
    reason = "a request the front does not answer is handed back whole, by value"
)]
pub fn front(state: AppState) -> agentcube_serve::Front {
    Arc::new(move |req: Request, client: Option<SocketAddr>| {
        if req.method() != http::Method::GET && req.method() != http::Method::POST {
            return Err(req);
        }
        match match_invocation(req.uri().path()) {
            Some(inv) if inv.path_start.is_some() => {
                // `invoke`'s future is made inside the block, not moved into it (else the
                // block holds it twice: once to await, once as what it captured).
                let state = state.clone();
                Ok(
                    Box::pin(async move { invoke(state, inv, req, client).await.into() })
                        as agentcube_serve::Answer,
                )
            }
            _ => Err(req),
        }
    })
}

/// [`front`] for the requests the fast lane took: answered from the bytes they arrived in
/// ([`crate::inbound`]); any other is handed back, to become an `http::Request`.
pub fn lane_front(state: AppState) -> agentcube_serve::LaneFront {
    Arc::new(move |req: LaneRequest, client: Option<SocketAddr>| {
        match match_invocation(path_of(req.target())) {
            Some(inv) if inv.path_start.is_some() => {
                Ok(Box::pin(invoke(state.clone(), inv, req, client))
                    as agentcube_serve::LaneAnswer)
            }
            _ => Err(req),
        }
    })
}

/// A request for `/v1/namespaces/{ns}/{code-interpreters|agent-runtimes}/{name}/invocations…`:
/// where its parts are in the raw path (nothing is copied until they are used).
#[derive(Debug, PartialEq, Eq)]
pub struct Invocation {
    pub kind: WorkloadKind,
    /// The namespace's bytes in the raw path (percent-encoded).
    ns: (usize, usize),
    /// The runtime name's bytes in the raw path (percent-encoded).
    name: (usize, usize),
    /// Where the invocation path (its leading `/`, never stripped) starts in the raw path;
    /// `None` for `…/invocations` without the slash (redirected, as gin does).
    pub path_start: Option<usize>,
}

impl Invocation {
    /// The namespace and runtime name, percent-decoded, from the raw path this was matched in
    /// (borrowed unless they were encoded).
    pub fn names<'a>(&self, raw: &'a str) -> (Cow<'a, str>, Cow<'a, str>) {
        let decode = |(a, b): (usize, usize)| decode(raw.get(a..b).unwrap_or_default());
        let (ns, name) = (decode(self.ns), decode(self.name));
        (ns.unwrap_or_default(), name.unwrap_or_default())
    }
}

/// Percent-decoded; `None` when the result is empty or not UTF-8.
fn decode(s: &str) -> Option<Cow<'_, str>> {
    if !s.contains('%') {
        // Nothing to decode, and a `str` is UTF-8 already.
        return (!s.is_empty()).then_some(Cow::Borrowed(s));
    }
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .ok()
        .filter(|d| !d.is_empty())
}

/// Matches an invocation URL by position (names may contain `invocations`); `None` for
/// anything else.
pub fn match_invocation(raw: &str) -> Option<Invocation> {
    // The first six segments, as (start, end) byte ranges.
    let mut segs = [(0usize, 0usize); 6];
    let mut end = 0;
    for seg in &mut segs {
        let start = end + 1;
        if raw.as_bytes().get(end) != Some(&b'/') {
            return None;
        }
        end = memchr::memchr(b'/', &raw.as_bytes()[start..]).map_or(raw.len(), |e| start + e);
        *seg = (start, end);
    }
    let at = |(a, b): (usize, usize)| &raw[a..b];
    let [v1, namespaces, ns, kind, name, invocations] = segs;
    if (at(v1), at(namespaces), at(invocations)) != ("v1", "namespaces", "invocations") {
        return None;
    }
    let kind = match at(kind) {
        "code-interpreters" => WorkloadKind::CodeInterpreter,
        "agent-runtimes" => WorkloadKind::AgentRuntime,
        _ => return None,
    };
    decode(at(ns))?;
    decode(at(name))?;
    Some(Invocation {
        kind,
        ns,
        name,
        path_start: (invocations.1 < raw.len()).then_some(invocations.1),
    })
}

/// Everything but the health routes: invocations (GET and POST; other methods get gin's plain
/// 404, as upstream), the trailing-slash redirect, or the plain 404.
async fn dispatch(State(s): State<AppState>, req: Request) -> Response {
    let Some(inv) = match_invocation(req.uri().path()) else {
        return not_found().await;
    };
    if inv.path_start.is_none() {
        return redirect_to_slash(req).await;
    }
    if req.method() != http::Method::GET && req.method() != http::Method::POST {
        return not_found().await;
    }
    let client = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0);
    invoke(s, inv, req, client).await.into()
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

/// One invocation, from the request to the answer the client gets (the sandbox's, or the
/// Router's error), counted in the metrics.
///
/// Written as a plain function returning one `async` block, with the steps before and after the
/// send done in place rather than in `async fn`s of their own: every `async fn` keeps its own
/// copy of its arguments for as long as it runs, and this future is boxed and moved on every
/// request (for a fast-lane request it stays under 1 KiB, inside the allocator's per-thread
/// cache: `a_lane_requests_future_fits_the_allocators_thread_cache`).
fn invoke<R: Inbound>(
    s: AppState,
    t: Invocation,
    req: R,
    client: Option<SocketAddr>,
) -> impl Future<Output = LaneResponse> + Send {
    let started = std::time::Instant::now();
    // The path's bytes are shared, not copied: the names borrow them while `req` moves on.
    let held = req.held_target();
    let span = tracing::debug_span!(
        "invoke",
        kind = %t.kind,
        ns = tracing::field::Empty,
        name = tracing::field::Empty,
        session_id = tracing::field::Empty,
    );
    if !span.is_disabled() {
        let (ns, name) = t.names(path_of(held.as_str()));
        span.record("ns", &*ns);
        span.record("name", &*name);
    }
    async move {
        let kind = t.kind;
        let target = held.as_str();
        let (ns, name) = t.names(path_of(target));
        let call = Call {
            kind,
            ns,
            name,
            path_start: t.path_start.unwrap_or(usize::MAX),
            client_addr: &client,
        };
        let authorization = req.first(&header::AUTHORIZATION);
        let answer = 'answer: {
            if let Some(why) = s
                .browser_guard
                .refusal_of(client.map(|a| a.ip()), |f| req.first(field_name(f)))
            {
                break 'answer Err(RouterError::Forbidden(why.into()));
            }
            let a = match admit(&s, &call, authorization, req.first(&SESSION)).await {
                Ok(a) => a,
                Err(e) => break 'answer Err(e),
            };
            // The sandbox's answer is taken apart in the statement that awaits it, so the
            // future does not keep room for it (216 bytes) beside the send's.
            let e = match to_sandbox(&s, a.target(), &call, a.caller(), target) {
                Ok(fwd) => match req.forward(&s.upstream, fwd).await {
                    Ok(resp) => break 'answer Ok(answered(resp, a)),
                    Err(e) => e,
                },
                Err(e) => e,
            };
            Err(Box::pin(failed(&s, &call, a, e)).await)
        };
        let resp = match answer {
            Ok(r) => r,
            Err(e) => {
                s.metrics.count_proxy_error(kind, &e);
                e.into_response().into()
            }
        };
        s.metrics.count_status(resp.status().as_u16());
        s.metrics
            .observe_latency(kind, started.elapsed().as_secs_f64());
        resp
    }
    .instrument(span)
}

/// One invocation: the runtime it names, where its path starts, who sent it.
struct Call<'a> {
    kind: WorkloadKind,
    /// The namespace and the runtime's name, percent-decoded (borrowed from the path unless
    /// they were encoded).
    ns: Cow<'a, str>,
    name: Cow<'a, str>,
    /// Where the invocation path starts in the raw path.
    path_start: usize,
    client_addr: &'a Option<SocketAddr>,
}

/// The session header: absent (or empty), a valid id, or a 400 for bytes that are not visible
/// ASCII (never silently treated as "no session").
fn session_header(value: Option<&[u8]>) -> Result<Option<&str>, RouterError> {
    match value {
        None => Ok(None),
        Some(v) => {
            let v = crate::h1::visible(v).ok_or(RouterError::BadSessionHeader)?;
            Ok((!v.is_empty()).then_some(v))
        }
    }
}

/// A request let through: its concurrency slot, its place among its session's requests in
/// flight, and the parts only some requests have.
struct Admitted {
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
    in_flight: InFlight,
    /// Boxed (the hot path's future stays small): `None` for a request on an existing session
    /// without end-user authentication.
    rare: Option<Box<Rare>>,
}

/// What only some admitted requests have.
struct Rare {
    /// The end user (OIDC).
    caller: Option<Arc<crate::oidc::Caller>>,
    /// The end user's slot (given back when dropped).
    _share: Option<crate::shares::Share>,
    /// The session made for this request (it had none), until its id is on its way to the
    /// client.
    created: Option<Unclaimed>,
}

impl Admitted {
    fn target(&self) -> &crate::resolve::Target {
        &self.in_flight.target
    }

    fn caller(&self) -> Option<&crate::oidc::Caller> {
        self.rare.as_ref()?.caller.as_deref()
    }

    fn created(&self) -> bool {
        self.rare.as_ref().is_some_and(|r| r.created.is_some())
    }
}

/// The name of a field that tells a web page's request ([`Shared::browser_guard`]).
fn field_name(f: Field) -> &'static http::HeaderName {
    match f {
        Field::Host => &header::HOST,
        Field::Origin => &header::ORIGIN,
        Field::FetchSite => &FETCH_SITE,
    }
}

/// `Sec-Fetch-Site`, built once.
static FETCH_SITE: http::HeaderName =
    http::HeaderName::from_static(agentcube_types::browser::FETCH_SITE);

/// Authenticates the caller (the `Authorization` field's value), then finds the session the
/// `x-agentcube-session-id` value names, or creates one.
async fn admit(
    s: &AppState,
    t: &Call<'_>,
    authorization: Option<&[u8]>,
    session: Option<&[u8]>,
) -> Result<Admitted, RouterError> {
    // Refused callers never take a concurrency slot. (The rare paths' futures are boxed, so
    // the hot path's future, moved on every request, stays small.)
    let caller = match &s.authn {
        Some(a) => Some(Box::pin(a.authenticate(authorization)).await?),
        None => None,
    };
    let session = session_header(session)?;
    let permit = match &s.limiter {
        Some(sem) => Some(
            sem.clone()
                .try_acquire_owned()
                .map_err(|_| RouterError::Overloaded)?,
        ),
        None => None,
    };
    let share = match (&s.shares, &caller) {
        (Some(shares), Some(c)) => shares.take(c)?,
        _ => None,
    };
    let target = match &session {
        Some(id) => {
            let target = s.resolver.existing(id, t.kind, &t.ns, &t.name).await?;
            if let Some(c) = &caller {
                check_owner(&target, c)?;
            }
            target
        }
        None => Box::pin(create(s, t, caller.as_deref())).await?,
    };
    let created = session
        .is_none()
        .then(|| Unclaimed::new(s, t.kind, &target.session_id));
    if tracing::enabled!(tracing::Level::DEBUG) {
        // Only then is the invocation's span on (asking for the current span costs a lookup).
        tracing::Span::current().record("session_id", &*target.session_id);
    }
    let rare = (caller.is_some() || share.is_some() || created.is_some()).then(|| {
        Box::new(Rare {
            caller,
            _share: share,
            created,
        })
    });
    Ok(Admitted {
        permit,
        in_flight: InFlight::begin(&s.activity, target),
        rare,
    })
}

/// The sandbox answered: its session stays active until the answer has been streamed out, and
/// that is noted as activity (a request the sandbox did not answer notes none: a dead sandbox
/// does not stay "active").
fn answered(mut resp: Answered, a: Admitted) -> LaneResponse {
    let mut in_flight = a.in_flight;
    in_flight.answered();
    if let Answered::Http(r) = &mut resp
        && let Some(tunnel) = r.extensions_mut().remove::<crate::proxy::Tunnel>()
    {
        // A WebSocket's: its session is active for as long as it is open.
        let mut open = in_flight.another();
        open.answered();
        tunnel.keep(Box::new(open));
    }
    let rare = a.rare.map(|mut r| {
        if let Some(new) = &mut r.created {
            new.delivered();
        }
        r
    });
    let done = Done {
        in_flight,
        _permit: a.permit,
        _rare: rare,
    };
    reply(resp, done)
}

/// The sandbox was not reached, or did not answer: the error the client gets.
async fn failed(s: &AppState, t: &Call<'_>, a: Admitted, e: RouterError) -> RouterError {
    if a.created() {
        // The new session's id never reaches the client: dropping `a` deletes it again.
        return e;
    }
    unknown_if_deleted(s, a.target(), t, e).await
}

/// The answer to the client: the sandbox's, with the session id set, its body holding `done`.
fn reply(resp: Answered, done: Done) -> LaneResponse {
    let session = done.in_flight.target.session_header.as_ref();
    match resp {
        Answered::Http(resp) => {
            let (mut parts, body) = resp.into_parts();
            if let Some(v) = session {
                parts.headers.insert(SESSION, v.clone());
            }
            // Only the Router's own errors carry it (the relay path drops it likewise).
            parts.headers.remove(crate::error::ROUTER_ERROR);
            let body = Body::new(Streamed { body, _done: done });
            LaneResponse::Http(Response::from_parts(parts, body))
        }
        Answered::Relay {
            status,
            relay,
            body,
        } => {
            // Relayed only when the session header is set (`to_sandbox`).
            let mut fields = relay.lines;
            if let Some(v) = session {
                for part in [SESSION.as_str().as_bytes(), b": ", v.as_bytes(), b"\r\n"] {
                    fields.extend_from_slice(part);
                }
            }
            LaneResponse::Relayed(Relayed {
                status,
                fields,
                has_date: relay.has_date,
                len: relay.len,
                body: Body::new(Streamed { body, _done: done }),
            })
        }
    }
}

/// A new session for a request without one, owned by the authenticated caller (if any).
async fn create(
    s: &AppState,
    t: &Call<'_>,
    caller: Option<&crate::oidc::Caller>,
) -> Result<Arc<crate::resolve::Target>, RouterError> {
    let identity = match caller {
        Some(c) => Some(
            s.signer
                .identity_token(c, jiff::Timestamp::now().as_second())
                .map_err(|_| RouterError::Signing)?,
        ),
        None => None,
    };
    let owner = caller.map(|c| c.sub.as_str());
    let identity = owner.zip(identity.as_deref());
    s.resolver.create(t.kind, &t.ns, &t.name, identity).await
}

/// Session ownership (spec §1.9, RLAC): admins use any session; a session without an owner is
/// refused (fail-closed, as upstream); otherwise only its owner may use it.
fn check_owner(
    target: &crate::resolve::Target,
    caller: &crate::oidc::Caller,
) -> Result<(), RouterError> {
    if caller.is_admin() {
        return Ok(());
    }
    match target.owner.as_deref() {
        None => Err(RouterError::Forbidden("sandbox has no owner record".into())),
        Some(o) if o != caller.sub => {
            Err(RouterError::Forbidden("you do not own this sandbox".into()))
        }
        Some(_) => Ok(()),
    }
}

/// Where and how a request for `req_target` (its path and query) goes: the entry point its
/// path picks, and the session's token.
fn to_sandbox<'a>(
    s: &AppState,
    target: &'a crate::resolve::Target,
    t: &Call<'_>,
    caller: Option<&crate::oidc::Caller>,
    req_target: &'a str,
) -> Result<Forward<'a>, RouterError> {
    let upstream_target = req_target.get(t.path_start..).unwrap_or("/");
    let path = path_of(upstream_target);
    let entry = pick(&target.entry_points, path).ok_or(RouterError::NoEntryPoint)?;
    let authorization = s
        .signer
        .authorization(
            &target.session_id,
            target.identity.as_deref(),
            caller,
            jiff::Timestamp::now().as_second(),
        )
        .map_err(|_| RouterError::Signing)?;
    Ok(Forward {
        entry,
        target: upstream_target,
        authorization,
        client_addr: *t.client_addr,
        scheme: s.scheme,
        relay_without: target.session_header.is_some().then_some(&SESSION_NAME),
    })
}

/// A sandbox that cannot be reached may simply have been deleted since it was cached, or be
/// being torn down under the request (its record not yet gone): then the answer is the
/// unknown-session 404 with why it ended, not a 502 or 503.
async fn unknown_if_deleted(
    s: &AppState,
    target: &crate::resolve::Target,
    t: &Call<'_>,
    e: RouterError,
) -> RouterError {
    s.resolver.invalidate(&target.session_id);
    if !matches!(e, RouterError::Refused | RouterError::Unreachable) {
        return e;
    }
    let id = &target.session_id;
    match s.resolver.existing(id, t.kind, &t.ns, &t.name).await {
        Err(again @ RouterError::UnknownSession(..)) => again,
        Ok(_) => s.resolver.ending(id).await.unwrap_or(e),
        Err(_) => e,
    }
}

/// Held by a response body until it has been streamed out: the request in flight, its
/// concurrency slot and its end user's.
struct Done {
    in_flight: InFlight,
    _permit: Option<tokio::sync::OwnedSemaphorePermit>,
    _rare: Option<Box<Rare>>,
}

/// The sandbox's answer body, holding [`Done`] until it is dropped (frames and trailers pass
/// through untouched).
struct Streamed {
    body: Answer,
    _done: Done,
}

impl hyper::body::Body for Streamed {
    type Data = bytes::Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The future of every request the fast lane takes is boxed (and moved there): it stays
    /// within glibc's per-thread cache of freed blocks (requests of up to 1032 bytes), which
    /// is what it took to get it under 1 KiB (`invoke`'s docs; `make bench-instructions`).
    #[test]
    fn a_lane_requests_future_fits_the_allocators_thread_cache() {
        fn returned<A, B, C, D, Fut>(_: impl Fn(A, B, C, D) -> Fut) -> usize {
            std::mem::size_of::<Fut>()
        }
        let size = returned(invoke::<LaneRequest>);
        assert!(size <= 1032, "{size} bytes");
    }

    #[test]
    fn invocations_are_matched_by_position() {
        let m = |p: &str| match_invocation(p);
        let raw = "/v1/namespaces/default/code-interpreters/invocations-ci/invocations/api/execute";
        let inv = m(raw).unwrap();
        let (ns, name) = inv.names(raw);
        assert_eq!(
            (inv.kind, &*ns, &*name),
            (WorkloadKind::CodeInterpreter, "default", "invocations-ci")
        );
        assert!(matches!((ns, name), (Cow::Borrowed(_), Cow::Borrowed(_))));
        let raw = "/v1/namespaces/invocations/agent-runtimes/a%20b/invocations/x/invocations";
        let inv = m(raw).unwrap();
        let (ns, name) = inv.names(raw);
        assert_eq!((&*ns, &*name), ("invocations", "a b"));
        assert_eq!(&raw[inv.path_start.unwrap()..], "/x/invocations");
        let slash = m("/v1/namespaces/n/code-interpreters/c/invocations/").unwrap();
        assert_eq!(
            slash.path_start,
            Some(48),
            "the trailing slash itself: path \"/\""
        );
        assert_eq!(
            m("/v1/namespaces/n/code-interpreters/c/invocations")
                .unwrap()
                .path_start,
            None
        );
        for bad in [
            "/v1/namespaces/n/other/c/invocations/",
            "/v2/namespaces/n/code-interpreters/c/invocations/",
            "/v1/namespaces//code-interpreters/c/invocations/",
            "/v1/namespaces/n/code-interpreters/c/invocationsX/",
            "/v1/namespaces/n/code-interpreters",
            "/v1/namespaces/%ff/code-interpreters/c/invocations/",
            "",
            "/",
        ] {
            assert!(m(bad).is_none(), "{bad}");
        }
    }
}
