//! Workload Manager HTTP bodies (spec §1.5, §2.2), shared by the WM and the Router.

use serde::{Deserialize, Serialize};

use crate::session::{BackingKind, EntryPoint};

/// Which CRD a session is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum WorkloadKind {
    AgentRuntime,
    CodeInterpreter,
}

impl WorkloadKind {
    /// Path segment of the WM API: `agent-runtime` / `code-interpreter`.
    pub fn api_segment(self) -> &'static str {
        match self {
            Self::AgentRuntime => "agent-runtime",
            Self::CodeInterpreter => "code-interpreter",
        }
    }

    /// Path segment of the Router API: `agent-runtimes` / `code-interpreters`.
    pub fn router_segment(self) -> &'static str {
        match self {
            Self::AgentRuntime => "agent-runtimes",
            Self::CodeInterpreter => "code-interpreters",
        }
    }

    /// Kubernetes resource name used in error messages, e.g. `codeinterpreters.agentcube.volcano.sh`.
    pub fn resource(self) -> &'static str {
        match self {
            Self::AgentRuntime => "agentruntimes.agentcube.volcano.sh",
            Self::CodeInterpreter => "codeinterpreters.agentcube.volcano.sh",
        }
    }
}

impl std::fmt::Display for WorkloadKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::AgentRuntime => "AgentRuntime",
            Self::CodeInterpreter => "CodeInterpreter",
        })
    }
}

/// Body of `POST /v1/{agent-runtime|code-interpreter}`. Other fields (`metadata`, …) are accepted
/// and ignored, as upstream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateSandboxRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub namespace: String,
    /// The session's maximum lifetime in seconds, capped by the definition's
    /// `maxSessionDuration` (upstream PR #460); independent of the idle timeout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<serde_json::Number>,
}

impl CreateSandboxRequest {
    /// [`Self::ttl`] as a duration: `None` when omitted; an error unless a positive whole number
    /// of seconds.
    pub fn ttl(&self) -> Result<Option<std::time::Duration>, String> {
        match &self.ttl {
            None => Ok(None),
            Some(n) => match n.as_u64() {
                Some(secs) if secs > 0 => Ok(Some(std::time::Duration::from_secs(secs))),
                _ => Err(format!(
                    "invalid ttl {n}: a positive whole number of seconds"
                )),
            },
        }
    }
}

/// Answer of a successful create.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateSandboxResponse {
    /// Backing object kind (`Sandbox` / `SandboxClaim`), not the CRD kind.
    pub kind: BackingKind,
    pub session_id: String,
    pub sandbox_id: String,
    pub sandbox_name: String,
    pub entry_points: Vec<EntryPoint>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner_id: Option<String>,
    /// Extension: the identity the sandbox's PicoD knows itself by; the Router binds its tokens
    /// to it. Upstream components ignore it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox_identity: Option<String>,
}

/// The WM's error body: `{"message": ...}`, with (extension) a `code` on the errors a sandbox
/// caused: [`SANDBOX_FAILED`], [`SANDBOX_TIMEOUT`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageBody {
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
}

impl MessageBody {
    /// A body of `message` alone (upstream's shape).
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            code: None,
        }
    }
}

/// The sandbox of a create could not start (its program exited, its pod cannot run): the message
/// says which and why, the definition's to fix.
pub const SANDBOX_FAILED: &str = "SANDBOX_FAILED";
/// The sandbox of a create was not ready in time: the message says what it waited for.
pub const SANDBOX_TIMEOUT: &str = "SANDBOX_TIMEOUT";
