//! PicoD's one error type and its HTTP mapping (upstream body `{"error","code","detail"?}`).

use agentcube_types::picod::PicodError;
use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

/// Everything a PicoD handler can refuse with. The status code and body are decided in
/// [`IntoResponse`] below and nowhere else.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No `Authorization` header.
    #[error("Missing Authorization header")]
    MissingAuth,
    /// Not exactly `Bearer <token>`.
    #[error("Invalid Authorization header format")]
    BadAuthFormat,
    /// Signature, algorithm, expiry or issued-at check failed.
    #[error("Invalid token")]
    InvalidToken(String),
    /// Malformed request (bad JSON, missing field, bad duration, bad base64...).
    #[error("{0}")]
    BadRequest(String),
    /// A path that would leave the workspace.
    #[error("{0}")]
    Forbidden(String),
    /// Missing file or directory; the message is the upstream text.
    #[error("{0}")]
    NotFound(&'static str),
    /// No route has this path.
    #[error("no such route: {method} {path}")]
    NoRoute { method: String, path: String },
    /// The route exists, without this method.
    #[error("method {method} not allowed on {path}")]
    MethodNotAllowed { method: String, path: String },
    /// A per-sandbox limit is reached (e.g. running processes).
    #[error("{0}")]
    TooMany(String),
    /// Not possible in this sandbox's state (e.g. ending every process where that is unsafe).
    #[error("{0}")]
    Conflict(String),
    /// Body over the configured limit.
    #[error("request body too large")]
    TooLarge { limit: usize },
    /// The workspace is full (its quota); the message names the quota.
    #[error("{0}")]
    InsufficientStorage(String),
    /// I/O failure on the server side.
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    /// The HTTP status for this error.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::MissingAuth | Self::BadAuthFormat | Self::InvalidToken(_) => {
                StatusCode::UNAUTHORIZED
            }
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::NotFound(_) | Self::NoRoute { .. } => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Self::TooMany(_) => StatusCode::TOO_MANY_REQUESTS,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::InsufficientStorage(_) => StatusCode::INSUFFICIENT_STORAGE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn detail(&self) -> Option<String> {
        match self {
            Self::MissingAuth => Some("Request requires JWT authentication".into()),
            Self::BadAuthFormat => Some("Use Bearer <token>".into()),
            Self::InvalidToken(why) => Some(format!("JWT verification failed: {why}")),
            Self::TooLarge { limit } => Some(format!("maximum allowed size is {limit} bytes")),
            _ => None,
        }
    }

    /// Helper for I/O errors that are the server's fault.
    pub fn internal(e: impl std::fmt::Display) -> Self {
        Self::Internal(e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::warn!(error = %self, "request failed");
        }
        let body = match &self {
            // Upstream's 413 body has no `code` member; keep it byte-compatible.
            Self::TooLarge { .. } => serde_json::json!({
                "error": self.to_string(),
                "detail": self.detail(),
            }),
            _ => serde_json::to_value(PicodError {
                error: self.to_string(),
                code: status.as_u16(),
                detail: self.detail(),
            })
            .unwrap_or_default(),
        };
        (status, Json(body)).into_response()
    }
}
