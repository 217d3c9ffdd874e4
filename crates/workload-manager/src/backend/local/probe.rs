//! Readiness probe of a local sandbox: `GET /health` on PicoD's Unix socket.

use std::path::Path;
use std::time::Duration;

use agentcube_types::picod::HealthResponse;
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;

/// PicoD's health, or `None` when it does not answer (yet).
pub async fn health(socket: &Path) -> Option<HealthResponse> {
    let work = async {
        let stream = tokio::net::UnixStream::connect(socket).await.ok()?;
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .ok()?;
        tokio::spawn(conn);
        let req = hyper::Request::get("/health")
            .header("host", "picod")
            .body(Empty::<Bytes>::new())
            .ok()?;
        let resp = send.send_request(req).await.ok()?;
        if !resp.status().is_success() {
            return None;
        }
        let body = resp.into_body().collect().await.ok()?.to_bytes();
        serde_json::from_slice(&body).ok()
    };
    tokio::time::timeout(Duration::from_secs(2), work)
        .await
        .ok()
        .flatten()
}

/// What keeps a sandbox from being ready, `None` when nothing does: PicoD answers and, with
/// `ports_too`, every forwarded port it reports is open.
pub async fn not_ready(socket: &Path, ports_too: bool) -> Option<String> {
    let Some(health) = health(socket).await else {
        return Some("PicoD does not answer GET /health".into());
    };
    let closed: Vec<String> = match health.ports {
        Some(ports) if ports_too => ports
            .into_iter()
            .filter_map(|(port, open)| (!open).then_some(port))
            .collect(),
        _ => Vec::new(),
    };
    (!closed.is_empty()).then(|| {
        format!(
            "nothing accepts connections on port {} in the sandbox: does the agent listen on \
             it (on 0.0.0.0 or the sandbox's loopback)?",
            closed.join(", ")
        )
    })
}
