//! Port forwarding for local AgentRuntime sandboxes (extension over upstream).
//!
//! A local sandbox has no network at all, so the agent's TCP port is unreachable from the host.
//! PicoD, which shares the sandbox's network namespace, listens on a Unix socket in the
//! host-visible run directory for each port and splices every connection to `127.0.0.1:PORT`.

use std::path::PathBuf;
use std::time::Duration;

use tokio::net::{TcpStream, UnixListener};

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
        let _ = std::fs::remove_file(&f.socket);
        let listener = UnixListener::bind(&f.socket)?;
        let port = f.port;
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(("127.0.0.1", port)).await {
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

    #[test]
    fn parses() {
        let f: Forward = "8080=unix:/run/a.sock".parse().unwrap();
        assert_eq!((f.port, f.socket), (8080, PathBuf::from("/run/a.sock")));
        assert!("8080".parse::<Forward>().is_err());
        assert!("x=unix:/a".parse::<Forward>().is_err());
        assert!("80=/a".parse::<Forward>().is_err());
    }
}
