//! The Workload Manager's one error type and its HTTP mapping (upstream body `{"message": ...}`).

use agentcube_types::api::MessageBody;
use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::backend::BackendError;

/// Everything a WM request can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Malformed or incomplete request (upstream texts: `Invalid request body`, `name is required`).
    #[error("{0}")]
    BadRequest(String),
    /// No or a bad caller token, or a bad identity token (upstream texts).
    #[error("{0}")]
    Unauthorized(String),
    /// The caller may not do this at all (not a matter of which session).
    #[error("{0}")]
    Forbidden(String),
    /// Unknown definition or session; the message is upstream's text.
    #[error("{0}")]
    NotFound(String),
    /// A request body over the API's limit; the message says the limit.
    #[error("{0}")]
    TooLarge(String),
    /// An admission cap (sessions, memory) is reached; the message names it.
    #[error("{0}")]
    TooMany(String),
    /// The store or the sandbox platform is unavailable right now.
    #[error("{0}")]
    Unavailable(String),
    /// The sandbox did not become ready in time: upstream's text, then what it was waiting for.
    #[error("sandbox creation timed out: {0}")]
    Timeout(String),
    /// The sandbox could not start: the client sees which sandbox and why (its program's exit
    /// status, the platform's refusal); anything more (`detail`: the program's output) goes to
    /// the log only.
    #[error("{message}")]
    SandboxFailed { message: String, detail: String },
    /// Anything else; details are logged, the client sees `internal server error`.
    #[error("internal server error")]
    Internal(String),
}

impl ApiError {
    /// Status code for this error.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::TooMany(_) => StatusCode::TOO_MANY_REQUESTS,
            Self::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            Self::Internal(_) | Self::SandboxFailed { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The body's `code` (extension): set on the errors a sandbox caused, so that the Router can
    /// tell them from the manager's own failures and pass their words on.
    fn code(&self) -> Option<&'static str> {
        match self {
            Self::SandboxFailed { .. } => Some(agentcube_types::api::SANDBOX_FAILED),
            Self::Timeout(_) => Some(agentcube_types::api::SANDBOX_TIMEOUT),
            _ => None,
        }
    }
}

impl From<agentcube_store::Error> for ApiError {
    fn from(e: agentcube_store::Error) -> Self {
        match e {
            agentcube_store::Error::Unavailable(m) => {
                Self::Unavailable(format!("session store unavailable: {m}"))
            }
            other => Self::Internal(other.to_string()),
        }
    }
}

impl From<BackendError> for ApiError {
    fn from(e: BackendError) -> Self {
        match e {
            BackendError::NotReady(detail) => Self::Timeout(detail),
            BackendError::Unavailable(m) => Self::Unavailable(m),
            BackendError::Exhausted(m) => Self::TooMany(m),
            BackendError::Invalid(m) => Self::BadRequest(m),
            BackendError::Exited { message, log } => Self::SandboxFailed {
                message: format!("{message}; its output is in the Workload Manager's log"),
                detail: log,
            },
            BackendError::CannotStart(message) => Self::SandboxFailed {
                message,
                detail: String::new(),
            },
            other => Self::Internal(other.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        match &self {
            Self::Internal(detail) => tracing::warn!(error = %detail, "request failed"),
            Self::Timeout(detail) => tracing::warn!(error = %detail, "sandbox creation timed out"),
            Self::SandboxFailed { message, detail } => {
                tracing::warn!(error = %message, output = %detail, "request failed");
            }
            _ => {}
        }
        (
            status,
            Json(MessageBody {
                message: self.to_string(),
                code: self.code().map(str::to_string),
            }),
        )
            .into_response()
    }
}
