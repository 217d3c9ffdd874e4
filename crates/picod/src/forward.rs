//! Port forwarding for local AgentRuntime sandboxes (extension over upstream).
//!
//! A local sandbox has no network at all, so the agent's TCP port is unreachable from the host.
//! PicoD, which shares the sandbox's network namespace, listens on a Unix socket in the
//! host-visible run directory for each port and splices every connection to `127.0.0.1:PORT`.

use std::path::PathBuf;
use std::time::Duration;

use tokio::net::TcpStream;

/// One `--forward PORT=unix:PATH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    pub port: u16,
    pub socket: PathBuf,
}

impl std::str::FromStr for Forward {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (port, path) = s
            .split_once('=')
            .ok_or_else(|| format!("expected PORT=unix:PATH, got {s:?}"))?;
        let port = port
            .parse()
            .map_err(|e| format!("bad port in {s:?}: {e}"))?;
        let socket = path
            .strip_prefix("unix:")
            .filter(|p| !p.is_empty())
            .ok_or_else(|| format!("expected unix:PATH after '=', got {path:?}"))?;
        Ok(Self {
            port,
            socket: PathBuf::from(socket),
        })
    }
}

/// Binds every forward's socket now (so readiness is observable) and serves them in the
/// background for the life of the process.
pub fn start(forwards: &[Forward]) -> std::io::Result<()> {
    for f in forwards {
        let listener = crate::listen::unix(&f.socket)?;
        let port = f.port;
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(async move {
                    if let Ok(outbound) = TcpStream::connect(("127.0.0.1", port)).await {
                        // An agent that answers before reading all it was sent and closes is
                        // heard: the rest goes nowhere while its answer is passed on.
                        let mut outbound = agentcube_serve::AfterAnswer::new(outbound);
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
    }
    Ok(())
}

/// Whether something accepts TCP connections on `127.0.0.1:port` right now.
pub async fn port_open(port: u16) -> bool {
    matches!(
        tokio::time::timeout(
            Duration::from_millis(300),
            TcpStream::connect(("127.0.0.1", port))
        )
        .await,
        Ok(Ok(_))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An agent that answers before it has read an upload and closes with the rest unread
    /// (its kernel resets the connection) is heard through the forward: the answer it wrote
    /// before the reset reaches the client, whichever of the two the forward sees first.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_answer_given_before_the_upload_was_read_gets_through() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let agent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = agent.local_addr().unwrap().port();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = agent.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0; 4096];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        let n = s.read(&mut buf).await.unwrap_or(0);
                        if n == 0 {
                            return;
                        }
                        head.extend_from_slice(&buf[..n]);
                    }
                    let _ = s
                        .write_all(
                            b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 9\r\n\r\ntoo large",
                        )
                        .await;
                    // Dropped with the upload unread: a reset.
                });
            }
        });
        let dir = std::env::temp_dir().join(format!("picod-forward-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("port.sock");
        start(&[Forward {
            port,
            socket: socket.clone(),
        }])
        .unwrap();
        for round in 0..40 {
            let s = tokio::net::UnixStream::connect(&socket).await.unwrap();
            let (mut r, mut w) = s.into_split();
            let upload = tokio::spawn(async move {
                let _ = w
                    .write_all(b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 8388608\r\n\r\n")
                    .await;
                let chunk = vec![b'u'; 64 * 1024];
                for _ in 0..128 {
                    if w.write_all(&chunk).await.is_err() {
                        break;
                    }
                }
            });
            let mut got = Vec::new();
            let _ = r.read_to_end(&mut got).await;
            upload.abort();
            let got = String::from_utf8_lossy(&got);
            assert!(
                got.starts_with("HTTP/1.1 413") && got.ends_with("too large"),
                "round {round}: {got:?}"
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn parses() {
        let f: Forward = "8080=unix:/run/a.sock".parse().unwrap();
        assert_eq!((f.port, f.socket), (8080, PathBuf::from("/run/a.sock")));
        assert!("8080".parse::<Forward>().is_err());
        assert!("x=unix:/a".parse::<Forward>().is_err());
        assert!("80=/a".parse::<Forward>().is_err());
    }
}
