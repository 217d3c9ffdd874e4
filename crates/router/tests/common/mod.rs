//! Router test scaffolding: a real Workload Manager (local backend, real PicoD), an in-process
//! Router, test upstreams, and a store (memory or a real redis-server).
#![allow(dead_code)]

pub mod hydra;
pub mod upstream;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use agentcube_router::{Config, KeyPair, RouterService};
use agentcube_store::SessionStore;
use agentcube_types::{EntryPoint, GoDuration, SessionRecord, SessionStatus};
use agentcube_workload_manager::backend::local::{LocalBackend, LocalConfig};

pub const ROUTER_KEY: &str = include_str!("../../../picod/tests/data/router.key.pem");
pub const ROUTER_PUB: &str = include_str!("../../../picod/tests/data/router.pub.pem");

pub const DEFS: &str = r#"apiVersion: runtime.agentcube.volcano.sh/v1alpha1
kind: CodeInterpreter
metadata: {name: ci, namespace: default}
spec:
  template: {image: picod}
---
apiVersion: runtime.agentcube.volcano.sh/v1alpha1
kind: CodeInterpreter
metadata: {name: other, namespace: default}
spec:
  template: {image: picod}
"#;

fn picod_binary() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"));
    target.join("debug/picod")
}

/// A Workload Manager on the local backend.
pub struct Wm {
    pub url: String,
    pub dir: tempfile::TempDir,
    pub wm: Option<agentcube_workload_manager::WorkloadManager>,
    task: tokio::task::JoinHandle<()>,
}

impl Wm {
    pub async fn start(store: Arc<dyn SessionStore>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("m")).unwrap();
        std::fs::write(dir.path().join("m/defs.yaml"), DEFS).unwrap();
        let backend =
            LocalBackend::new(LocalConfig::new(dir.path().join("state"), picod_binary())).unwrap();
        let platform = backend
            .platform(
                Some(dir.path().join("m")),
                std::time::Duration::from_secs(2),
                Some(ROUTER_PUB.into()),
            )
            .await
            .unwrap();
        let config = agentcube_workload_manager::Config::default();
        let wm = agentcube_workload_manager::WorkloadManager::start(config, store, platform)
            .await
            .unwrap();
        let (url, task) = serve(wm.app()).await;
        Self {
            url,
            dir,
            wm: Some(wm),
            task,
        }
    }

    pub async fn stop(mut self) {
        self.task.abort();
        self.wm.take().unwrap().shutdown().await;
    }
}

/// Serves an axum app on a loopback port (with client addresses).
pub async fn serve(app: axum::Router) -> (String, tokio::task::JoinHandle<()>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    let task = tokio::spawn(async move {
        axum::serve(
            l,
            app.into_make_service_with_connect_info::<std::net::SocketAddr>(),
        )
        .await
        .unwrap();
    });
    (url, task)
}

pub struct Router {
    pub url: String,
    pub shared: std::sync::Arc<agentcube_router::Shared>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Router {
    pub async fn start(
        wm_url: &str,
        store: Arc<dyn SessionStore>,
        tweak: impl FnOnce(&mut Config),
    ) -> Self {
        let mut config = Config::new(wm_url);
        config.activity_flush_interval = Duration::from_millis(100);
        tweak(&mut config);
        let pair = KeyPair::from_private_pem(ROUTER_KEY).unwrap();
        let service = RouterService::start(&config, store, &pair).unwrap();
        let shared = service.shared.clone();
        // The Router under test is served through its real serving seam.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let until = async {
                let _ = stopped.await;
            };
            let _ = agentcube_router::serve(service, l, None, until).await;
        });
        Self {
            url,
            shared,
            stop: Some(stop),
            task,
        }
    }

    pub fn ci(&self, path: &str) -> String {
        format!(
            "{}/v1/namespaces/default/code-interpreters/ci/invocations/{path}",
            self.url
        )
    }

    /// `GET` of invocation `path` in session `session`.
    pub fn get_in(&self, session: &str, path: &str) -> reqwest::RequestBuilder {
        client()
            .get(self.ci(path))
            .header("x-agentcube-session-id", session)
    }

    /// Stops serving (graceful) and flushes activity, as the binary does on SIGTERM.
    pub async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        let _ = (&mut self.task).await;
    }

    pub fn shared(&self) -> &agentcube_router::Shared {
        &self.shared
    }
}

/// The Router's `/metrics`, served by its admin app.
pub async fn metrics_text(router: &Router) -> String {
    let (admin, _t) = serve(agentcube_router::admin_app(router.shared.clone())).await;
    client()
        .get(format!("{admin}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

pub fn memory() -> Arc<dyn SessionStore> {
    Arc::new(agentcube_store::MemoryStore::new())
}

/// Inserts a ready session pointing at `endpoint` (for test upstreams).
pub async fn session_to(store: &dyn SessionStore, id: &str, endpoint: &str) {
    session_to_as(store, id, endpoint, "HTTP").await
}

/// A Router (memory store, no Workload Manager) whose session `s` is the test upstream at
/// `addr`.
pub async fn router_to(addr: &str) -> Router {
    let store = memory();
    session_to(store.as_ref(), "s", addr).await;
    Router::start("http://127.0.0.1:9", store, |_| {}).await
}

/// A raw connection to `router` asking for a WebSocket upgrade of `ws` on session `session`:
/// the connection after the answer's head, and that head (lowercase).
pub async fn websocket(router: &Router, session: &str) -> (tokio::net::TcpStream, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = router.url.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "GET /v1/namespaces/default/code-interpreters/ci/invocations/ws HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nx-agentcube-session-id: {session}\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut b).await.unwrap();
        head.push(b[0]);
    }
    (s, String::from_utf8(head).unwrap().to_lowercase())
}

/// [`session_to`] with an entry point of `protocol` (`HTTP`, `H2C`).
pub async fn session_to_as(store: &dyn SessionStore, id: &str, endpoint: &str, protocol: &str) {
    let now = jiff::Timestamp::now();
    let mut r = SessionRecord::placeholder(
        id,
        "default",
        "x",
        now,
        now + jiff::SignedDuration::from_hours(1),
        GoDuration::default(),
    );
    r.status = SessionStatus::Ready;
    r.entry_points = Some(vec![EntryPoint {
        path: "/".into(),
        protocol: protocol.into(),
        endpoint: endpoint.into(),
    }]);
    store.insert(&r, now).await.unwrap();
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// The public key the sandboxes verify with.
pub fn verify(token: &str) -> agentcube_types::claims::SandboxClaims {
    let key = jsonwebtoken::DecodingKey::from_rsa_pem(ROUTER_PUB.as_bytes()).unwrap();
    let v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
    jsonwebtoken::decode(token, &key, &v).unwrap().claims
}
