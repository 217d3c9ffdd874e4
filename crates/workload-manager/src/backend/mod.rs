//! The seam between the Workload Manager and where sandboxes run. One trait, two backends:
//! [`local`] (bubblewrap on this host; the embedded default) and, in a cluster, Kubernetes
//! agent-sandbox objects. The API, GC, warm-pool policy and store records are shared.

use std::sync::Arc;

use agentcube_crds::{AgentRuntime, CodeInterpreter};
use agentcube_types::{BackingKind, EntryPoint};

pub mod kubernetes;
pub mod local;

/// A definition a sandbox is made from.
#[derive(Debug, Clone)]
pub enum Workload {
    CodeInterpreter(Arc<CodeInterpreter>),
    AgentRuntime(Arc<AgentRuntime>),
}

impl Workload {
    /// `metadata.name`.
    pub fn name(&self) -> &str {
        let meta = match self {
            Self::CodeInterpreter(c) => &c.metadata,
            Self::AgentRuntime(a) => &a.metadata,
        };
        meta.name.as_deref().unwrap_or_default()
    }

    /// Whether sandboxes must verify the Router's token.
    pub fn needs_key(&self) -> bool {
        match self {
            Self::CodeInterpreter(c) => c.spec.auth_mode == agentcube_crds::AuthMode::Picod,
            // Upstream injects no key into AgentRuntime pods; agents do their own auth.
            Self::AgentRuntime(_) => false,
        }
    }
}

/// What the session layer asks a backend for.
#[derive(Debug, Clone)]
pub struct SandboxRequest {
    pub session_id: String,
    pub namespace: String,
    /// Name to give a newly started sandbox (`<definition>-<8 random chars>`); a warm-pool claim
    /// may answer with another name.
    pub name: String,
    pub workload: Workload,
    /// Router public key (PEM) injected as `PICOD_AUTH_PUBLIC_KEY`, when the workload needs it.
    pub public_key: Option<String>,
}

/// A sandbox that answers on its entry points.
#[derive(Debug, Clone, PartialEq)]
pub struct Sandbox {
    pub kind: BackingKind,
    pub id: String,
    pub name: String,
    pub entry_points: Vec<EntryPoint>,
}

/// Backend failures.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The sandbox started but never answered (it has been removed).
    #[error("sandbox {0} did not become ready")]
    NotReady(String),
    /// The platform cannot take work now.
    #[error("{0}")]
    Unavailable(String),
    /// The definition cannot run on this backend (e.g. an AgentRuntime without a command).
    #[error("{0}")]
    Invalid(String),
    /// I/O or platform error.
    #[error("{0}")]
    Failed(String),
}

/// Where sandboxes run.
#[async_trait::async_trait]
pub trait Backend: Send + Sync + 'static {
    /// Starts (or claims from a warm pool) a sandbox and returns once it answers. Cancellation
    /// safe: if the future is dropped, [`Backend::delete`] of `req.name` removes what was started.
    async fn create(&self, req: &SandboxRequest) -> Result<Sandbox, BackendError>;

    /// Removes a sandbox; an unknown one is not an error.
    async fn delete(
        &self,
        kind: BackingKind,
        namespace: &str,
        name: &str,
    ) -> Result<(), BackendError>;

    /// The set of CodeInterpreters changed: resize, roll or drop warm pools.
    async fn sync_pools(&self, definitions: Vec<Arc<CodeInterpreter>>, public_key: Option<String>);

    /// Removes every sandbox this backend started (on shutdown).
    async fn shutdown(&self);

    /// Warm pools as (namespace, name, ready, size), for metrics and progress output.
    fn pool_levels(&self) -> Vec<(String, String, usize, u32)> {
        Vec::new()
    }
}
