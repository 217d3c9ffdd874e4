//! TEST SUPPORT ONLY: a small in-memory Kubernetes API server, because no kube-apiserver can run
//! on the build machines, plus a simulated agent-sandbox controller and kubelet. It is never a
//! dependency of a shipped binary.
//!
//! Main flow: [`FakeApiServer::start`] serves the REST API on a loopback port; a `kube::Client`
//! pointed at [`FakeApiServer::url`] talks to it like to a cluster. [`sim::Simulation`] adds what
//! agent-sandbox and a kubelet would do: Sandboxes get Pods, warm pools keep Sandboxes, claims
//! adopt them, and Pods become real processes (PicoD among them) on their own loopback address.
//! The `fake-cluster` binary runs both for the end-to-end suite.
//!
//! Honest where it matters to controllers ([`store`], [`server`]):
//! - every write bumps a global `resourceVersion`; lists carry it; `replace` with a stale
//!   `metadata.resourceVersion` is a 409 Conflict; `create` of an existing name is 409
//!   AlreadyExists; a write that changes nothing is a no-op (no new version, no event);
//! - `watch` streams JSON lines (`ADDED`/`MODIFIED`/`DELETED`, `BOOKMARK`s when asked), resumes
//!   from a `resourceVersion`, and answers 410 Gone (as an `ERROR` event) for one too old;
//! - label selectors (`a=b`, `a!=b`, `a`, `!a`) and `metadata.name` field selectors;
//! - merge patch, JSON patch, and apply patch (applied as a merge; it creates when missing), and
//!   the `/status` subresource (only `status` changes there, and only there; `generation` bumps on
//!   spec changes only);
//! - delete cascades to objects whose `ownerReferences` name the deleted object's uid;
//! - an audit log of every request (verb, group, resource, namespace, user agent), also served
//!   as JSON on `GET /fake/audit`, so tests can check RBAC rules against what clients really do.
//!
//! Not modelled: admission, defaulting, field managers, finalizers, and real SSA field ownership.

use std::net::SocketAddr;

use axum::routing::any;

pub mod server;
pub mod sim;
pub mod store;

pub use store::{ApiError, AuditEntry, Cluster, Collection, Kind};

/// A running fake API server.
pub struct FakeApiServer {
    pub url: String,
    pub addr: SocketAddr,
    pub cluster: Cluster,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeApiServer {
    /// Serves on a free loopback port.
    pub async fn start() -> Self {
        Self::bind("127.0.0.1:0".parse().unwrap()).await.unwrap()
    }

    /// Serves on `addr`.
    pub async fn bind(addr: SocketAddr) -> std::io::Result<Self> {
        let cluster = Cluster::default();
        let app = axum::Router::new()
            .route("/fake/audit", axum::routing::get(server::audit))
            .route("/{*path}", any(server::handle))
            .with_state(cluster.clone());
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let url = format!("http://{addr}");
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self {
            url,
            addr,
            cluster,
            task,
        })
    }

    /// A kubeconfig file's text that points at this server (no credentials, namespace `default`).
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\nusers:\n- name: fake\n  user: {{}}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: default\ncurrent-context: fake\n",
            self.url
        )
    }
}
