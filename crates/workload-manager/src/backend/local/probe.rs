//! Readiness probe of a local sandbox: `GET /health` on PicoD's Unix socket.

use std::path::Path;
use std::time::Duration;

use agentcube_types::picod::HealthResponse;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;

/// The most of a `GET /health` answer read (PicoD's is a few hundred bytes).
const MAX_HEALTH_BODY: usize = 64 << 10;

/// PicoD's health, or `None` when it does not answer (yet) or answers more than
/// [`MAX_HEALTH_BODY`].
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
        // The socket is PicoD's, but whatever answers in a sandbox is read with a bound.
        let body = Limited::new(resp.into_body(), MAX_HEALTH_BODY)
            .collect()
            .await
            .ok()?
            .to_bytes();
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

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A server on a Unix socket answering every connection with `body` (JSON, padded with
    /// spaces to `len` bytes).
    async fn answering(dir: &std::path::Path, len: usize) -> std::path::PathBuf {
        let path = dir.join(format!("health-{len}.sock"));
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let json = r#"{"status":"ok","service":"PicoD","version":"x","uptime":"1s"}"#;
        let body = format!("{json}{}", " ".repeat(len - json.len()));
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len());
                let _ = s.write_all(head.as_bytes()).await;
                let _ = s.write_all(body.as_bytes()).await;
            }
        });
        path
    }

    #[tokio::test]
    async fn a_health_answer_is_read_up_to_its_bound() {
        let dir = tempfile::tempdir().unwrap();
        let small = answering(dir.path(), 100).await;
        assert_eq!(super::health(&small).await.unwrap().status, "ok");
        let huge = answering(dir.path(), super::MAX_HEALTH_BODY + 1).await;
        assert!(super::health(&huge).await.is_none());
    }
}
