//! The HTTP API (spec §2.2): health, create, delete. Error bodies are `{"message": ...}`.

use std::sync::Arc;

use agentcube_types::api::{
    CreateSandboxRequest, CreateSandboxResponse, MessageBody, WorkloadKind,
};
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::routing::{delete, get, post};
use axum::{Json, Router};

use crate::error::ApiError;
use crate::sessions::Manager;

/// Largest accepted request body (create bodies are tiny).
const MAX_BODY: usize = 1024 * 1024;

/// The router; tests drive it in-process.
pub fn app(manager: Arc<Manager>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/v1/code-interpreter", post(create_code_interpreter))
        .route("/v1/agent-runtime", post(create_agent_runtime))
        .route("/v1/code-interpreter/sessions/{id}", delete(delete_session))
        .route("/v1/agent-runtime/sessions/{id}", delete(delete_session))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(manager)
}

async fn health() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "healthy"}))
}

fn parse(body: &Bytes) -> Result<CreateSandboxRequest, ApiError> {
    serde_json::from_slice(body).map_err(|_| ApiError::BadRequest("Invalid request body".into()))
}

async fn create_code_interpreter(
    State(m): State<Arc<Manager>>,
    body: Bytes,
) -> Result<Json<CreateSandboxResponse>, ApiError> {
    Ok(Json(
        m.create(WorkloadKind::CodeInterpreter, parse(&body)?)
            .await?,
    ))
}

async fn create_agent_runtime(
    State(m): State<Arc<Manager>>,
    body: Bytes,
) -> Result<Json<CreateSandboxResponse>, ApiError> {
    Ok(Json(
        m.create(WorkloadKind::AgentRuntime, parse(&body)?).await?,
    ))
}

async fn delete_session(
    State(m): State<Arc<Manager>>,
    Path(id): Path<String>,
) -> Result<Json<MessageBody>, ApiError> {
    m.delete(&id).await?;
    Ok(Json(MessageBody {
        message: "Sandbox deleted successfully".into(),
    }))
}
