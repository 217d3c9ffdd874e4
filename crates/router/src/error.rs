//! The Router's one error type and its HTTP mapping (upstream body `{"error", "code"?}`, spec §1.7).
//! Router-generated errors never carry the session header, and carry `x-agentcube-error: router`
//! so clients can tell them from a sandbox's own answers.

use axum::Json;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// An error followed by its sources, outermost first (hyper's client error alone says only
/// "client error (Connect)": why the connection failed is further down).
pub(crate) fn sources<'a>(
    e: &'a (dyn std::error::Error + 'static),
) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    std::iter::successors(Some(e), |s| s.source())
}

/// [`agentcube_types::headers::ROUTER_ERROR`].
pub const ROUTER_ERROR: axum::http::HeaderName =
    axum::http::HeaderName::from_static(agentcube_types::headers::ROUTER_ERROR);

/// Everything the Router can answer itself.
#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    /// `sessions.agentcube.volcano.sh "<id>" not found`, and why it ended when the Workload
    /// Manager noted it (`reason` in the body; extension).
    #[error("{0}")]
    UnknownSession(Box<UnknownSession>),
    /// The WM says the runtime does not exist.
    #[error("{0}")]
    UnknownRuntime(Box<UnknownRuntime>),
    /// The record has no entry point (placeholder or no ports).
    #[error("no entry point found for sandbox")]
    NoEntryPoint,
    /// A session used on another runtime's URL.
    #[error("{0}")]
    SessionMismatch(Box<SessionMismatch>),
    /// `x-agentcube-session-id` that is not visible ASCII.
    #[error("invalid x-agentcube-session-id header")]
    BadSessionHeader,
    /// The client stopped sending its request body.
    #[error("request body timed out")]
    BodyTimeout,
    /// The client's request body could not be read (e.g. malformed chunked encoding).
    #[error("malformed request body")]
    BadBody,
    /// No or a bad end-user token (OIDC or the static token): 401 `UNAUTHORIZED`.
    #[error("{0}")]
    Unauthorized(&'static str),
    /// A missing role, or a session the caller does not own: 403 `FORBIDDEN`.
    #[error("{0}")]
    Forbidden(String),
    /// Concurrency limit reached.
    #[error("server overloaded, please try again later")]
    Overloaded,
    /// The end user has their whole share of the slots in flight (`--max-concurrent-per-user`).
    #[error("too many requests in flight for this user (at most {0}), please try again later")]
    UserOverloaded(usize),
    /// Connection refused by the sandbox.
    #[error("sandbox unreachable")]
    Refused,
    /// Connecting to the sandbox timed out, or its host left a request unacknowledged past
    /// [`crate::pool::DEAD_PEER_TIMEOUT`].
    #[error("sandbox timeout")]
    UpstreamTimeout,
    /// Any other failure talking to the sandbox.
    #[error("sandbox unreachable")]
    Unreachable,
    /// The session store cannot be reached.
    #[error("session store unavailable")]
    StoreUnavailable,
    /// The Workload Manager refused a new session for a reason the client can act on: its
    /// status (400, 403, 429, 503) and words are kept (extension; upstream answers 500); or the
    /// session's sandbox could not start: upstream's 500, with the manager's words.
    #[error("{}", .0.message)]
    CreateRefused(Box<CreateRefused>),
    /// Signing the sandbox token failed.
    #[error("failed to sign request")]
    Signing,
    /// Anything else (WM failures other than [`RouterError::CreateRefused`], as upstream).
    #[error("internal server error")]
    Internal(String),
}

/// [`RouterError::UnknownRuntime`]'s details (boxed: the rare errors keep the error, and every
/// `Result` on the request path, small).
#[derive(Debug, thiserror::Error)]
#[error("{resource} \"{namespace}/{name}\" not found")]
pub struct UnknownRuntime {
    pub resource: &'static str,
    pub namespace: String,
    pub name: String,
}

/// [`RouterError::CreateRefused`]'s details.
#[derive(Debug)]
pub struct CreateRefused {
    pub status: StatusCode,
    pub message: String,
    /// `SESSION_CREATE_REFUSED`, or the manager's `SANDBOX_FAILED` / `SANDBOX_TIMEOUT`.
    pub code: &'static str,
}

/// [`RouterError::UnknownSession`]'s details (boxed, as the other rare errors).
#[derive(Debug, thiserror::Error)]
#[error("sessions.agentcube.volcano.sh \"{id}\" not found")]
pub struct UnknownSession {
    pub id: String,
    /// Why it ended ("it was idle for longer than its sessionTimeout (15m0s)"), when known.
    pub why: Option<String>,
}

/// [`RouterError::SessionMismatch`]'s details.
#[derive(Debug, thiserror::Error)]
#[error("session {session} belongs to {kind} {namespace}/{name}")]
pub struct SessionMismatch {
    pub session: String,
    pub kind: String,
    pub namespace: String,
    pub name: String,
}

impl RouterError {
    /// The unknown-session error for `id`, with why it ended when known.
    pub fn unknown_session(id: &str, why: Option<String>) -> Self {
        Self::UnknownSession(Box::new(UnknownSession {
            id: id.to_string(),
            why,
        }))
    }

    /// Status code and optional machine-readable code.
    pub fn status_and_code(&self) -> (StatusCode, Option<&'static str>) {
        match self {
            // Upstream PR #460: a stable code, so clients tell it from an application's 404.
            Self::UnknownSession(..) => (StatusCode::NOT_FOUND, Some("SESSION_NOT_FOUND")),
            Self::UnknownRuntime(_) | Self::NoEntryPoint => (StatusCode::NOT_FOUND, None),
            Self::SessionMismatch(_) => (StatusCode::CONFLICT, Some("SESSION_TARGET_MISMATCH")),
            Self::Overloaded => (StatusCode::TOO_MANY_REQUESTS, Some("SERVER_OVERLOADED")),
            Self::UserOverloaded(_) => (StatusCode::TOO_MANY_REQUESTS, Some("USER_OVERLOADED")),
            Self::Unauthorized(_) => (StatusCode::UNAUTHORIZED, Some("UNAUTHORIZED")),
            Self::Forbidden(_) => (StatusCode::FORBIDDEN, Some("FORBIDDEN")),
            Self::BadSessionHeader => (StatusCode::BAD_REQUEST, Some("INVALID_SESSION_ID")),
            Self::BodyTimeout => (StatusCode::REQUEST_TIMEOUT, Some("REQUEST_TIMEOUT")),
            Self::BadBody => (StatusCode::BAD_REQUEST, Some("BAD_REQUEST_BODY")),
            Self::Refused => (StatusCode::BAD_GATEWAY, None),
            Self::UpstreamTimeout => (StatusCode::GATEWAY_TIMEOUT, None),
            Self::Unreachable => (StatusCode::SERVICE_UNAVAILABLE, None),
            Self::StoreUnavailable => (StatusCode::SERVICE_UNAVAILABLE, Some("STORE_UNAVAILABLE")),
            Self::CreateRefused(r) => (r.status, Some(r.code)),
            Self::Signing => (
                StatusCode::INTERNAL_SERVER_ERROR,
                Some("JWT_SIGNING_FAILED"),
            ),
            Self::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, None),
        }
    }
}

impl IntoResponse for RouterError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        if let Self::Internal(detail) = &self {
            tracing::warn!(error = %detail, "request failed");
        }
        let mut body = match code {
            Some(c) => json!({"error": self.to_string(), "code": c}),
            None => json!({"error": self.to_string()}),
        };
        if let Self::UnknownSession(u) = &self
            && let Some(why) = &u.why
        {
            body["reason"] = json!(why);
        }
        let mut resp = (status, Json(body)).into_response();
        resp.headers_mut()
            .insert(ROUTER_ERROR, HeaderValue::from_static("router"));
        resp
    }
}
