//! HTTP header names, defined once.

/// Session routing header, on requests to and responses from the Router.
pub const SESSION_ID: &str = "x-agentcube-session-id";

/// Router-signed end-user identity sent to the Workload Manager (OIDC mode).
pub const USER_IDENTITY: &str = "x-agentcube-user-identity";
