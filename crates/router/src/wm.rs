//! Client of the Workload Manager's create call (spec §1.5).

use std::time::Duration;

use agentcube_types::api::{CreateSandboxRequest, CreateSandboxResponse, WorkloadKind};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::error::RouterError;

/// Talks to `WORKLOAD_MANAGER_URL`.
#[derive(Clone)]
pub struct WmClient {
    base: String,
    http: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    timeout: Duration,
    /// Bearer sent to the WM (the pod's service-account token file, re-read per call).
    token_file: Option<std::path::PathBuf>,
    /// Bearer sent to the WM when there is no token file.
    token: Option<String>,
}

impl std::fmt::Debug for WmClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WmClient")
            .field("base", &self.base)
            .finish()
    }
}

impl WmClient {
    /// A client for `base` (e.g. `http://workloadmanager:8080`): with `tls`, mutual TLS
    /// (`https://` only); without, `https://` checked against the system's CAs.
    pub fn new(
        base: &str,
        timeout: Duration,
        token_file: Option<std::path::PathBuf>,
        token: Option<String>,
        tls: Option<&agentcube_tls::ClientTls>,
    ) -> Self {
        // The API server client's TCP ([`agentcube_crds::client::tcp_connector`]): a create
        // waiting on a manager whose node went away without a word ends in about a minute
        // (keepalive probes after 30 s of silence) rather than at the WM timeout (120 s), one
        // written into a connection whose manager had gone already in 20 s (`TCP_USER_TIMEOUT`:
        // the manager reads its small requests at once); an idle pooled connection to it is
        // dropped within about a minute (hyper keeps idle ones 90 s).
        let http = agentcube_crds::client::tcp_connector();
        let connector = match tls {
            Some(tls) => tls.connector(http),
            None => agentcube_tls::system_roots(base, http),
        };
        Self {
            base: base.trim_end_matches('/').to_string(),
            http: Client::builder(TokioExecutor::new()).build(connector),
            timeout,
            token_file,
            token,
        }
    }

    /// One call to the WM: (status, body).
    async fn call(
        &self,
        method: http::Method,
        path: &str,
        body: Option<Vec<u8>>,
        identity: Option<&str>,
    ) -> Result<(http::StatusCode, Bytes), RouterError> {
        let url = format!("{}{path}", self.base);
        let mut req = hyper::Request::builder().method(method).uri(&url);
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        let token = match &self.token_file {
            Some(p) => std::fs::read_to_string(p).ok(),
            None => self.token.clone(),
        };
        if let Some(tok) = token {
            req = req.header("authorization", format!("Bearer {}", tok.trim()));
        }
        if let Some(id) = identity {
            req = req.header(agentcube_types::headers::USER_IDENTITY, id);
        }
        let req = req
            .body(Full::from(body.unwrap_or_default()))
            .map_err(|e| RouterError::Internal(e.to_string()))?;
        let call = async {
            let resp =
                self.http.request(req).await.map_err(|e| {
                    RouterError::Internal(format!("workload manager: {}", causes(&e)))
                })?;
            let status = resp.status();
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| RouterError::Internal(e.to_string()))?
                .to_bytes();
            Ok::<_, RouterError>((status, bytes))
        };
        tokio::time::timeout(self.timeout, call)
            .await
            .map_err(|_| RouterError::Internal("workload manager timed out".into()))?
    }

    /// Creates a session, owned by the user an `identity` token (signed by this Router) names.
    /// WM 404 (or 400 saying "not found") → the upstream k8s-style 404; see [`refusal`] for the
    /// rest.
    pub async fn create(
        &self,
        kind: WorkloadKind,
        namespace: &str,
        name: &str,
        identity: Option<&str>,
    ) -> Result<CreateSandboxResponse, RouterError> {
        let body = CreateSandboxRequest {
            kind: Some(kind.to_string()),
            name: name.to_string(),
            namespace: namespace.to_string(),
            ttl: None,
        };
        let path = format!("/v1/{}", kind.api_segment());
        let body = serde_json::to_vec(&body).unwrap_or_default();
        let (status, bytes) = self
            .call(http::Method::POST, &path, Some(body), identity)
            .await?;
        let not_found = status == 404
            || (status == 400 && String::from_utf8_lossy(&bytes).contains("not found"));
        if not_found {
            return Err(RouterError::UnknownRuntime(Box::new(
                crate::error::UnknownRuntime {
                    resource: kind.resource(),
                    namespace: namespace.to_string(),
                    name: name.to_string(),
                },
            )));
        }
        if status != 200 {
            return Err(refusal(status, &bytes));
        }
        let resp: CreateSandboxResponse = serde_json::from_slice(&bytes)
            .map_err(|e| RouterError::Internal(format!("bad workload manager answer: {e}")))?;
        if resp.session_id.is_empty() {
            return Err(RouterError::Internal(
                "workload manager returned no sessionId".into(),
            ));
        }
        Ok(resp)
    }

    /// Deletes a session (the rollback of a session the Router created but could not use).
    pub async fn delete(&self, kind: WorkloadKind, session_id: &str) -> Result<(), RouterError> {
        let path = format!("/v1/{}/sessions/{session_id}", kind.api_segment());
        let (status, bytes) = self.call(http::Method::DELETE, &path, None, None).await?;
        if status.is_success() || status == 404 {
            return Ok(());
        }
        Err(RouterError::Internal(format!(
            "workload manager answered {status}: {}",
            String::from_utf8_lossy(&bytes)
        )))
    }
}

/// A create the Workload Manager did not make. What the client can act on keeps its status: a
/// bad request (400), a namespace the caller may not use (403), a cap or the host's capacity
/// reached (429), with the manager's words; the manager's store or API server out of reach
/// (503), in words of the Router's own (the manager's go to the log). A sandbox that could not
/// start or was not ready in time (the manager's `500`/`504` with `code` `SANDBOX_FAILED` /
/// `SANDBOX_TIMEOUT`) keeps upstream's `500` and gets the manager's words: which sandbox and why
/// (an agent that exits at start, one listening on another port) is the definition's to fix.
/// Anything else is upstream's `500 internal server error`.
fn refusal(status: http::StatusCode, body: &[u8]) -> RouterError {
    use agentcube_types::api::{MessageBody, SANDBOX_FAILED, SANDBOX_TIMEOUT};
    let (message, code) = match serde_json::from_slice::<MessageBody>(body) {
        Ok(m) => (m.message, m.code),
        Err(_) => (String::from_utf8_lossy(body).into_owned(), None),
    };
    let sandbox_said = |code: &'static str| {
        tracing::warn!(error = %message, "the workload manager could not start a sandbox");
        (
            http::StatusCode::INTERNAL_SERVER_ERROR,
            message.clone(),
            code,
        )
    };
    let (status, message, code) = match (status.as_u16(), code.as_deref()) {
        (400 | 403 | 429, _) => (status, message, "SESSION_CREATE_REFUSED"),
        (503, _) => {
            tracing::warn!(error = %message, "the workload manager cannot create sessions now");
            let told = "the workload manager cannot create sessions now, please try again later";
            (status, told.into(), "SESSION_CREATE_REFUSED")
        }
        (500, Some(SANDBOX_FAILED)) => sandbox_said(SANDBOX_FAILED),
        (504, Some(SANDBOX_TIMEOUT)) => sandbox_said(SANDBOX_TIMEOUT),
        _ => {
            return RouterError::Internal(format!("workload manager answered {status}: {message}"));
        }
    };
    RouterError::CreateRefused(Box::new(crate::error::CreateRefused {
        status,
        message,
        code,
    }))
}

/// An error and its sources, `: `-separated (a refused TLS certificate, say, is in the sources).
fn causes(e: &(dyn std::error::Error + 'static)) -> String {
    crate::error::sources(e)
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(": ")
}
