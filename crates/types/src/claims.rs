//! JWT claims the Router signs for sandboxes (spec §1.8).

use serde::{Deserialize, Serialize};

/// Issuer the Router puts in every sandbox token.
pub const ROUTER_ISSUER: &str = "agentcube-router";

/// `aud` of the Router-signed `X-AgentCube-User-Identity` token the Workload Manager accepts.
pub const IDENTITY_AUDIENCE: &str = "workloadmanager";

/// Lifetime of a sandbox token, in seconds (upstream: 5 minutes).
pub const SANDBOX_TOKEN_TTL_SECS: i64 = 300;

/// Claims of the RS256 token the Router sends to PicoD / agents in `Authorization: Bearer`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxClaims {
    pub iss: String,
    pub iat: i64,
    pub exp: i64,
    pub session_id: String,
    /// Extension: the one sandbox this token is for (its pod or sandbox name). PicoD started with
    /// `PICOD_SANDBOX_NAME` refuses tokens for any other; upstream PicoD ignores it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_sub: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_email: Option<String>,
}

/// Compares a presented bearer token with the expected one without an early exit on the first
/// differing byte (the static-token modes of the Router and the Workload Manager).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod constant_time_tests {
    use super::constant_time_eq;

    #[test]
    fn static_tokens_compare_in_constant_time() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
    }
}
