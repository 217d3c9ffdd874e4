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

/// True when PicoD answers and, with `ports_too`, every forwarded port it reports is open.
pub async fn ready(socket: &Path, ports_too: bool) -> bool {
    match health(socket).await {
        Some(h) => !ports_too || h.ports.is_none_or(|p| p.values().all(|open| *open)),
        None => false,
    }
}
