//! The HTTP API (spec §2.2): health, create, delete, and the session reads of upstream PR #331
//! (list one kind's sessions, get one). Error bodies are `{"message": ...}`.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use agentcube_types::api::{
    CreateSandboxRequest, CreateSandboxResponse, MessageBody, WorkloadKind,
};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{ConnectInfo, DefaultBodyLimit, FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{delete, get, post};
use axum::{Json, Router};

use crate::auth::Caller;
use crate::error::ApiError;
use crate::sessions::{Manager, Requester};

/// Largest accepted request body (create bodies are tiny).
const MAX_BODY: usize = 1024 * 1024;

/// The router; tests drive it in-process.
pub fn app(manager: Arc<Manager>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/v1/code-interpreter", post(create::<CI>))
        .route("/v1/agent-runtime", post(create::<AR>))
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

/// A create's body: upstream's `400 Invalid request body` when it is not one, a `413` in the
/// API's shape when it is over [`MAX_BODY`] (axum's own answer is plain text).
fn parse(body: Result<Bytes, BytesRejection>) -> Result<CreateSandboxRequest, ApiError> {
    let invalid = || ApiError::BadRequest("Invalid request body".into());
    let body = body.map_err(|e| match e.status() {
        StatusCode::PAYLOAD_TOO_LARGE => {
            ApiError::TooLarge(format!("request body over {MAX_BODY} bytes"))
        }
        _ => invalid(),
    })?;
    // serde reads a struct from an array too (`[]` as an empty request); Go, upstream, does not.
    if body.trim_ascii_start().starts_with(b"[") {
        return Err(invalid());
    }
    serde_json::from_slice(&body).map_err(|_| invalid())
}

/// The caller (401 when authentication is on and the token is missing or bad; 403 for what a
/// web page may have sent when it is off).
async fn caller(m: &Manager, headers: &HeaderMap, peer: Peer) -> Result<Option<Caller>, ApiError> {
    m.auth.authenticate(headers, peer.0).await
}

/// The client's address (TCP listeners; `None` in-process and on Unix sockets).
#[derive(Debug, Clone, Copy)]
struct Peer(Option<IpAddr>);

impl<S: Send + Sync> FromRequestParts<S> for Peer {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let addr = parts.extensions.get::<ConnectInfo<SocketAddr>>();
        Ok(Self(addr.map(|ConnectInfo(a)| a.ip())))
    }
}

async fn create<K: Kind>(
    State(m): State<Arc<Manager>>,
    headers: HeaderMap,
    peer: Peer,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<CreateSandboxResponse>, ApiError> {
    let caller = caller(&m, &headers, peer).await?;
    let owner = crate::auth::end_user(&headers, m.public_key.get().as_deref())?;
    let who = Requester { caller, owner };
    Ok(Json(m.create(K::KIND, parse(body)?, who).await?))
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
    headers: HeaderMap,
    peer: Peer,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<SessionList>, ApiError> {
    // Without caller authentication a session's id is its only key (as upstream): a list would
    // hand every id to whoever reaches this port (in a cluster, any pod, a sandbox's included).
    let Some(caller) = caller(&m, &headers, peer).await? else {
        return Err(ApiError::Forbidden(
            "listing sessions needs caller authentication (--enable-auth, or agentcube up's \
             --auth-token): without it a session's id is its only key"
                .into(),
        ));
    };
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
    let page = m.list(K::KIND, q.cursor.as_deref(), limit, &caller).await?;
    Ok(Json(SessionList {
        sessions: page.records,
        next: page.next,
    }))
}

async fn get_session<K: Kind>(
    State(m): State<Arc<Manager>>,
    headers: HeaderMap,
    peer: Peer,
    Path(id): Path<String>,
) -> Result<Json<agentcube_types::SessionRecord>, ApiError> {
    let caller = caller(&m, &headers, peer).await?;
    Ok(Json(m.find(K::KIND, &id, caller.as_ref()).await?))
}

async fn delete_session<K: Kind>(
    State(m): State<Arc<Manager>>,
    headers: HeaderMap,
    peer: Peer,
    Path(id): Path<String>,
) -> Result<Json<MessageBody>, ApiError> {
    let caller = caller(&m, &headers, peer).await?;
    m.delete(K::KIND, &id, caller.as_ref()).await?;
    Ok(Json(MessageBody::new("Sandbox deleted successfully")))
}
