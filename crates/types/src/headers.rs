//! HTTP header names, defined once.

/// Session routing header, on requests to and responses from the Router.
pub const SESSION_ID: &str = "x-agentcube-session-id";

/// Router-signed end-user identity sent to the Workload Manager (OIDC mode).
pub const USER_IDENTITY: &str = "x-agentcube-user-identity";

/// Marks an error the Router made itself (`router`), as opposed to a sandbox's own answer: the
/// Router removes it from sandbox answers, so a sandbox cannot pass its answers off as the
/// Router's.
pub const ROUTER_ERROR: &str = "x-agentcube-error";
