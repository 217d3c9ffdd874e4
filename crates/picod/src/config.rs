//! PicoD's typed configuration (built by `main` from flags and environment; never read here).

use std::path::PathBuf;
use std::time::Duration;

/// Default cap on request bodies (upstream: 32 MiB).
pub const DEFAULT_MAX_BODY_BYTES: usize = 32 * 1024 * 1024;
/// Default cap on each of stdout and stderr kept for one buffered execute.
pub const DEFAULT_MAX_OUTPUT_BYTES: usize = 16 * 1024 * 1024;
/// Default command timeout (upstream: 60 s).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// How requests are authenticated.
#[derive(Debug, Clone)]
pub enum Auth {
    /// Verify RS256 tokens against this PEM public key (`PICOD_AUTH_PUBLIC_KEY`).
    PublicKeyPem(String),
    /// No authentication at all (explicit opt-in only).
    Disabled,
}

/// Everything PicoD needs to serve.
#[derive(Debug, Clone)]
pub struct Config {
    pub workspace: PathBuf,
    pub auth: Auth,
    pub max_body_bytes: usize,
    pub max_output_bytes: usize,
    pub default_timeout: Duration,
    /// Verified tokens remembered at once.
    pub token_cache_size: usize,
    /// TCP ports whose readiness `/health` reports (the forwarded agent ports).
    pub health_ports: Vec<u16>,
    /// This sandbox's identity; when set, tokens must carry it in `aud`.
    pub sandbox_name: Option<String>,
    /// Timeouts and the connection cap of the listener.
    pub limits: agentcube_serve::Limits,
    /// Serve `GET /metrics` (unauthenticated); off by default.
    pub metrics: bool,
    /// What explains a command's ending (OOM kill, no network).
    pub diagnostics: std::sync::Arc<crate::diagnose::Diagnostics>,
    /// Make the workspace this process's working directory, so that commands run in the
    /// workspace root need no working directory of their own: a statically linked PicoD cannot
    /// give `posix_spawn` a directory and would fall back to a slower `fork`. Only for a process
    /// that serves this one workspace (the `picod` binary).
    pub enter_workspace: bool,
    /// PicoD started an agent it supervises (`picod -- CMD`): ending every process is refused.
    pub supervises_agent: bool,
}

impl Config {
    /// Defaults for a workspace and an auth mode.
    pub fn new(workspace: PathBuf, auth: Auth) -> Self {
        Self {
            workspace,
            auth,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            max_output_bytes: DEFAULT_MAX_OUTPUT_BYTES,
            default_timeout: DEFAULT_TIMEOUT,
            token_cache_size: 1024,
            health_ports: Vec::new(),
            sandbox_name: None,
            supervises_agent: false,
            limits: agentcube_serve::Limits {
                max_connections: 1024,
                ..Default::default()
            },
            metrics: false,
            diagnostics: Default::default(),
            enter_workspace: false,
        }
    }
}

/// Where to listen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Tcp(std::net::SocketAddr),
    Unix(PathBuf),
}

impl std::str::FromStr for ListenAddr {
    type Err = String;
    /// `unix:/path/to.sock`, `HOST:PORT`, or `:PORT` (all interfaces, Go style).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("unix: needs a socket path".into());
            }
            return Ok(Self::Unix(PathBuf::from(path)));
        }
        let s = if s.starts_with(':') {
            format!("0.0.0.0{s}")
        } else {
            s.to_string()
        };
        s.parse()
            .map(Self::Tcp)
            .map_err(|e| format!("invalid listen address {s:?}: {e}"))
    }
}

impl ListenAddr {
    /// Binds; a stale Unix socket file left by a previous run is replaced ([`crate::listen`]).
    pub async fn bind(&self) -> std::io::Result<agentcube_serve::Listener> {
        match self {
            Self::Tcp(a) => Ok(tokio::net::TcpListener::bind(a).await?.into()),
            Self::Unix(p) => Ok(crate::listen::unix(p)?.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses_parse() {
        assert_eq!(
            "unix:/tmp/p.sock".parse::<ListenAddr>().unwrap(),
            ListenAddr::Unix("/tmp/p.sock".into())
        );
        assert_eq!(
            ":8080".parse::<ListenAddr>().unwrap(),
            ListenAddr::Tcp("0.0.0.0:8080".parse().unwrap())
        );
        assert!("unix:".parse::<ListenAddr>().is_err());
        assert!("nonsense".parse::<ListenAddr>().is_err());
    }
}
