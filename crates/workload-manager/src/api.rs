//! The HTTP API (spec §2.2): health, create, delete, and the session reads of upstream PR #331
//! (list one kind's sessions, get one). Error bodies are `{"message": ...}`.

use std::sync::Arc;

use agentcube_types::api::{
    CreateSandboxRequest, CreateSandboxResponse, MessageBody, WorkloadKind,
};
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
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
        .route("/v1/code-interpreter/sessions", get(list::<CI>))
        .route("/v1/agent-runtime/sessions", get(list::<AR>))
        .route(
            "/v1/code-interpreter/sessions/{id}",
            delete(delete_session::<CI>).get(get_session::<CI>),
        )
        .route(
            "/v1/agent-runtime/sessions/{id}",
            delete(delete_session::<AR>).get(get_session::<AR>),
        )
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

/// The kind a route serves, as a type so one handler serves both URL families.
trait Kind {
    const KIND: WorkloadKind;
}
struct CI;
impl Kind for CI {
    const KIND: WorkloadKind = WorkloadKind::CodeInterpreter;
}
struct AR;
impl Kind for AR {
    const KIND: WorkloadKind = WorkloadKind::AgentRuntime;
}

/// Sessions in one page unless `limit` says otherwise, and the most it may say.
const DEFAULT_PAGE: usize = 100;
const MAX_PAGE: usize = 1000;

/// `?limit=&continue=` of a listing.
#[derive(Debug, serde::Deserialize)]
struct ListQuery {
    limit: Option<usize>,
    #[serde(rename = "continue")]
    cursor: Option<String>,
}

/// A page of sessions: the store records, and the token of the next page when there is one.
#[derive(Debug, serde::Serialize)]
struct SessionList {
    sessions: Vec<agentcube_types::SessionRecord>,
    #[serde(rename = "continue", skip_serializing_if = "Option::is_none")]
    next: Option<String>,
}

async fn list<K: Kind>(
    State(m): State<Arc<Manager>>,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<SessionList>, ApiError> {
    let Query(q) =
        query.map_err(|e| ApiError::BadRequest(format!("invalid query: {}", e.body_text())))?;
    let limit = match q.limit {
        None => DEFAULT_PAGE,
        Some(n @ 1..=MAX_PAGE) => n,
        Some(n) => {
            return Err(ApiError::BadRequest(format!(
                "limit must be between 1 and {MAX_PAGE}, got {n}"
            )));
        }
    };
    let page = m.list(K::KIND, q.cursor.as_deref(), limit).await?;
    Ok(Json(SessionList {
        sessions: page.records,
        next: page.next,
    }))
}

async fn get_session<K: Kind>(
    State(m): State<Arc<Manager>>,
    Path(id): Path<String>,
) -> Result<Json<agentcube_types::SessionRecord>, ApiError> {
    Ok(Json(m.find(K::KIND, &id).await?))
}

async fn delete_session<K: Kind>(
    State(m): State<Arc<Manager>>,
    Path(id): Path<String>,
) -> Result<Json<MessageBody>, ApiError> {
    m.delete(K::KIND, &id).await?;
    Ok(Json(MessageBody {
        message: "Sandbox deleted successfully".into(),
    }))
}
