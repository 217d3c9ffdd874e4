//! The seam between the Workload Manager and where sandboxes run. Each backend builds one
//! [`Platform`]: its sandboxes ([`Backend`]), the definitions it keeps current, the Router key it
//! knows and its warm pools. Two backends: [`local`] (bubblewrap on this host, definitions from a
//! manifest directory; the embedded default) and [`kubernetes`] (agent-sandbox objects, the
//! cluster's CRs and key Secret). The API, GC and store records are shared.

use agentcube_crds::TargetPort;
use agentcube_types::{BackingKind, EntryPoint};

pub use crate::definitions::Workload;

pub mod kubernetes;
pub mod local;
mod platform;

pub use platform::{Background, Platform, PoolLevel, WarmPools};

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
    /// The end user who owns the session (OIDC `sub`), put on the sandbox's objects.
    pub owner: Option<String>,
    /// The record's `expiresAt` (`now` + the ttl or `maxSessionDuration`): when the platform
    /// may stop the sandbox; `None` when the session has no maximum lifetime.
    pub shutdown_time: Option<jiff::Timestamp>,
}

/// The entry point of `port` at `endpoint` (`host:port` or `unix:/path`); the path prefix
/// defaults to `/`.
pub fn entry_point(port: &TargetPort, endpoint: String) -> EntryPoint {
    EntryPoint {
        path: port.path_prefix.clone().unwrap_or_else(|| "/".into()),
        protocol: format!("{:?}", port.protocol),
        endpoint,
    }
}

/// A sandbox that answers on its entry points.
#[derive(Debug, Clone, PartialEq)]
pub struct Sandbox {
    pub kind: BackingKind,
    pub id: String,
    pub name: String,
    pub entry_points: Vec<EntryPoint>,
    /// What the sandbox's PicoD knows itself by (`PICOD_SANDBOX_NAME`): the pod name in a
    /// cluster, the sandbox name locally. Router tokens are bound to it.
    pub identity: String,
}

/// Backend failures.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BackendError {
    /// The sandbox started but never answered (it has been removed).
    #[error("sandbox {0} did not become ready")]
    NotReady(String),
    /// The platform cannot take work now.
    #[error("{0}")]
    Unavailable(String),
    /// A capacity budget of the platform is used up (e.g. the local memory budget).
    #[error("{0}")]
    Exhausted(String),
    /// The definition cannot run on this backend (e.g. an AgentRuntime without a command).
    #[error("{0}")]
    Invalid(String),
    /// The sandbox's program exited while it was starting (`message` says which and how; `log`
    /// is the end of its output, for the manager's log only).
    #[error("{message}: {log}")]
    Exited { message: String, log: String },
    /// The sandbox will never start, and waiting would not change it: the platform refused what
    /// it needs (the API server's admission refused its pod: a Pod Security level, a policy
    /// webhook, a LimitRange), or its pod failed (a container crash-looping, an image that
    /// cannot be pulled). The message says which sandbox and the platform's own words.
    #[error("{0}")]
    CannotStart(String),
    /// I/O or platform error.
    #[error("{0}")]
    Failed(String),
}

/// An error and its sources, `: `-joined (a source its outer message already says is left out):
/// what a connection failure was underneath ("connection refused", a certificate refused).
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let part = c.to_string();
        if !s.contains(&part) {
            s.push_str(": ");
            s.push_str(&part);
        }
        cur = c.source();
    }
    s
}

/// Where sandboxes run.
#[async_trait::async_trait]
pub trait Backend: Send + Sync + 'static {
    /// Starts (or claims from a warm pool) a sandbox and returns once it answers. Cancellation
    /// safe: if the future is dropped, [`Backend::delete`] of `req.name` removes what was started.
    async fn create(&self, req: &SandboxRequest) -> Result<Sandbox, BackendError>;

    /// What the sandbox `req` asked for is still waiting for, for the log of a create that ran
    /// out of time (called before the rollback). `None` when the backend cannot tell.
    fn stalled(&self, _req: &SandboxRequest) -> Option<String> {
        None
    }

    /// The kind of object a create for `workload` makes (the placeholder record's `kind`, and what
    /// a rollback deletes).
    fn backing_kind(&self, _workload: &Workload) -> BackingKind {
        BackingKind::Sandbox
    }

    /// Removes a sandbox; an unknown one is not an error.
    async fn delete(
        &self,
        kind: BackingKind,
        namespace: &str,
        name: &str,
    ) -> Result<(), BackendError>;

    /// Removes every sandbox this backend started (on shutdown).
    async fn shutdown(&self);

    /// Start-up reconciliation: whether the sandbox behind `record` exists; `None` when the
    /// record is not this backend's to judge (another state directory, another platform).
    async fn sandbox_exists(&self, _record: &agentcube_types::SessionRecord) -> Option<bool> {
        None
    }

    /// Start-up reconciliation: deletes the sandboxes of sessions not in `live` (a crashed
    /// predecessor's leftovers); returns how many.
    async fn delete_orphans(&self, _live: &std::collections::HashSet<String>) -> usize {
        0
    }

    /// The sessions this backend's running sandboxes serve, as (session id, backing kind,
    /// namespace, sandbox name): GC deletes a sandbox whose record has vanished (e.g. Redis
    /// restarted without persistence). Backends that cannot tell cheaply return nothing.
    fn sessions(&self) -> Vec<(String, BackingKind, String, String)> {
        Vec::new()
    }

    /// Resolves once a sandbox has died on its own since the last [`Backend::reap`] (a
    /// death while nobody waits is remembered): GC then reaps at once instead of at its next
    /// run. Never resolves on backends that only find dead sandboxes by looking.
    async fn died(&self) {
        std::future::pending().await
    }

    /// Cleans up sandboxes that died on their own since the last call, and returns the
    /// sessions they served (whose records must go too), each with why it ended ("its sandbox
    /// exited (…)"), for whoever uses the session next. Called by every GC run.
    async fn reap(&self) -> Vec<(String, String)> {
        Vec::new()
    }
}
