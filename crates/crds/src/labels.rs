//! Every label, annotation and well-known name the system puts on Kubernetes objects (spec §2.4).

/// Session id of the sandbox (label).
pub const SESSION_ID: &str = "runtime.agentcube.io/session-id";
/// Name of the AgentRuntime/CodeInterpreter a sandbox runs (label).
pub const WORKLOAD_NAME: &str = "runtime.agentcube.io/workload-name";
/// Kind of the definition a sandbox pod runs: `CodeInterpreter` or `AgentRuntime` (label, on
/// pods; with [`WORKLOAD_NAME`] it is what a definition's NetworkPolicy selects).
pub const WORKLOAD_KIND: &str = "runtime.agentcube.io/workload-kind";
/// Name of the Sandbox or SandboxClaim (label, on pods and claims).
pub const SANDBOX_NAME: &str = "runtime.agentcube.io/sandbox-name";
/// Extension: on a SandboxClaim the Workload Manager made ahead of demand (a standby claim), the
/// name of the CodeInterpreter it is for; removed when a session takes the claim.
pub const STANDBY: &str = "runtime.agentcube.io/standby";
/// Extension: the CodeInterpreter's `metadata.generation` a standby claim was made for
/// (annotation); a claim made for another generation is not handed out.
pub const STANDBY_GENERATION: &str = "runtime.agentcube.io/standby-generation";
/// Idle timeout as a Go duration string, e.g. `15m0s` (annotation).
pub const IDLE_TIMEOUT: &str = "runtime.agentcube.io/idle-timeout";
/// OIDC subject of the session owner (annotation).
pub const OWNER: &str = "agentcube.io/owner";
/// First 63 hex characters of sha256(owner) (label; labels cannot hold arbitrary subjects).
pub const OWNER_HASH: &str = "agentcube.io/owner-hash";
/// `managed-by` label key on Sandboxes the Workload Manager creates.
pub const MANAGED_BY: &str = "managed-by";
/// Value of [`MANAGED_BY`].
pub const MANAGED_BY_VALUE: &str = "agentcube-workload-manager";
/// agent-sandbox's annotation naming the pod a Sandbox adopted from a warm pool.
pub const POD_NAME: &str = "agents.x-k8s.io/pod-name";
/// Annotation agent-sandbox puts on a SandboxClaim naming the warm Sandbox it is adopting
/// (before it transfers the Sandbox's ownership and before the claim's status names it).
pub const ASSIGNED_SANDBOX: &str = "agents.x-k8s.io/sandbox-name";
/// agent-sandbox's annotation on a SandboxClaim recording when its controller first saw the claim
/// (RFC 3339, nanoseconds). agent-sandbox writes it when missing, as the first write of every
/// claim; the Workload Manager sets it at create time so that write is skipped.
pub const FIRST_OBSERVED: &str = "agents.x-k8s.io/controller-first-observed-at";
/// Container name in a direct CodeInterpreter Sandbox.
pub const CODE_INTERPRETER_CONTAINER: &str = "code-interpreter";
/// Container name in a CodeInterpreter SandboxTemplate (upstream differs between paths).
pub const TEMPLATE_CONTAINER: &str = "codeinterpreter";
/// Environment variable carrying the Router's public key into sandboxes.
pub const PICOD_AUTH_PUBLIC_KEY: &str = "PICOD_AUTH_PUBLIC_KEY";
/// Env var telling PicoD its own identity (the pod name, from the downward API); PicoD then
/// accepts only Router tokens whose `aud` names it.
pub const PICOD_SANDBOX_NAME: &str = "PICOD_SANDBOX_NAME";
/// agent-sandbox's label on warm-pool member Sandboxes (v1alpha1: the pool's name; v1beta1: a
/// hash of it, so membership is read from the owner reference there).
pub const WARM_POOL_MEMBER: &str = "agents.x-k8s.io/warm-pool-sandbox";
/// Name of the Secret holding the Router's signing key pair (`private.pem`, `public.pem`).
pub const IDENTITY_SECRET: &str = "picod-router-identity";
