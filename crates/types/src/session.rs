//! The session record the store keeps at `session:<id>` (upstream `SandboxInfo`, spec §4.3).
//!
//! Field names and formats are upstream's, so a record written by us reads back in an upstream
//! component and vice versa: RFC 3339 times with nanoseconds, `idleTimeout` as a Go duration string,
//! `entryPoints: null` on a placeholder, `ownerId` omitted when empty.

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::GoDuration;

/// Kind of object backing a session: the agent-sandbox kind in a cluster, also used by the local
/// backend (which always reports `Sandbox`). Delete and GC branch on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub enum BackingKind {
    #[default]
    Sandbox,
    SandboxClaim,
}

impl std::fmt::Display for BackingKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Sandbox => "Sandbox",
            Self::SandboxClaim => "SandboxClaim",
        })
    }
}

/// Lifecycle of a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum SessionStatus {
    /// Placeholder written before the sandbox exists; no entry points yet.
    #[default]
    Creating,
    /// Sandbox reachable at the entry points.
    Ready,
    /// Written by upstream for a sandbox that is not ready.
    NotReady,
}

/// Where a sandbox port is reached. `endpoint` is `host:port`, or `unix:/path` for local sandboxes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryPoint {
    /// Path prefix that selects this entry point (`/` matches everything).
    #[serde(default)]
    pub path: String,
    /// `HTTP` or `HTTPS`.
    #[serde(default)]
    pub protocol: String,
    pub endpoint: String,
}

/// One session, as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SessionRecord {
    #[serde(default)]
    pub kind: BackingKind,
    #[serde(default)]
    pub sandbox_id: String,
    #[serde(default)]
    pub sandbox_namespace: String,
    /// Name of the backing object (the claim's name on the warm-pool path).
    #[serde(default)]
    pub name: String,
    /// `null` while the record is a placeholder.
    #[serde(default)]
    pub entry_points: Option<Vec<EntryPoint>>,
    pub session_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner_id: Option<String>,
    pub created_at: Timestamp,
    pub expires_at: Timestamp,
    /// Idle timeout of this session; upstream writes `"0s"` when unset.
    #[serde(default)]
    pub idle_timeout: GoDuration,
    #[serde(default)]
    pub status: SessionStatus,
    /// Extension: the CRD kind the session was created for (upstream components ignore it). The
    /// Router refuses the session on another runtime's URL when it is present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload_kind: Option<crate::api::WorkloadKind>,
    /// Extension: the CRD name the session was created for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload_name: Option<String>,
    /// Extension: the identity the sandbox's PicoD knows itself by (the pod name in a cluster,
    /// the sandbox name locally). The Router binds its tokens to it (`aud`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox_identity: Option<String>,
    /// Who created the session at the Workload Manager (its caller's identity when the WM
    /// authenticates callers; upstream PR #331's `createdBy`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_by: Option<String>,
}

impl SessionRecord {
    /// A `creating` placeholder with no entry points.
    pub fn placeholder(
        session_id: impl Into<String>,
        namespace: impl Into<String>,
        name: impl Into<String>,
        created_at: Timestamp,
        expires_at: Timestamp,
        idle_timeout: GoDuration,
    ) -> Self {
        Self {
            kind: BackingKind::Sandbox,
            sandbox_id: String::new(),
            sandbox_namespace: namespace.into(),
            name: name.into(),
            entry_points: None,
            session_id: session_id.into(),
            owner_id: None,
            created_at,
            expires_at,
            idle_timeout,
            status: SessionStatus::Creating,
            workload_kind: None,
            workload_name: None,
            sandbox_identity: None,
            created_by: None,
        }
    }

    /// Entry points, empty for a placeholder.
    pub fn entry_points(&self) -> &[EntryPoint] {
        self.entry_points.as_deref().unwrap_or(&[])
    }
}

/// Why a session past its `expiresAt` ended, in words for its next user (the Workload Manager's
/// GC notes it; the Router says it from the record before GC has run).
pub fn past_its_end(expires_at: Timestamp) -> String {
    format!(
        "it reached its maximum duration (maxSessionDuration or the create's ttl; it expired at \
         {expires_at})"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The record from spec §4.3, as an upstream component writes it.
    pub const UPSTREAM: &str = r#"{"kind":"Sandbox","sandboxId":"5c1e","sandboxNamespace":"default","name":"my-interpreter-k3j9x0ab","entryPoints":[{"path":"/","protocol":"HTTP","endpoint":"10.244.0.12:8080"}],"sessionId":"0b6f","ownerId":"user-sub","createdAt":"2026-08-03T04:05:06.123456789Z","expiresAt":"2026-08-03T12:05:06Z","idleTimeout":"15m0s","status":"ready"}"#;

    #[test]
    fn upstream_record_round_trips_byte_for_byte() {
        let rec: SessionRecord = serde_json::from_str(UPSTREAM).unwrap();
        assert_eq!(rec.kind, BackingKind::Sandbox);
        assert_eq!(rec.owner_id.as_deref(), Some("user-sub"));
        assert_eq!(rec.idle_timeout.0.as_secs(), 900);
        assert_eq!(rec.entry_points()[0].endpoint, "10.244.0.12:8080");
        assert_eq!(serde_json::to_string(&rec).unwrap(), UPSTREAM);
    }

    #[test]
    fn placeholder_has_null_entry_points_and_no_owner() {
        let t: Timestamp = "2026-08-03T04:05:06Z".parse().unwrap();
        let rec = SessionRecord::placeholder("s", "ns", "n", t, t, GoDuration::default());
        let v = serde_json::to_value(&rec).unwrap();
        assert_eq!(v["entryPoints"], serde_json::Value::Null);
        assert_eq!(v["status"], "creating");
        assert_eq!(v["idleTimeout"], "0s");
        assert_eq!(v["sandboxId"], "");
        assert!(v.get("ownerId").is_none());
    }

    #[test]
    fn v010_records_without_optional_fields_parse() {
        // v0.1.0 wrote no ownerId / idleTimeout; local offsets are valid RFC 3339 too.
        let old = r#"{"kind":"SandboxClaim","sandboxId":"u","sandboxNamespace":"ns","name":"c","entryPoints":null,"sessionId":"s","createdAt":"2026-04-17T10:00:00+08:00","expiresAt":"2026-04-17T18:00:00+08:00","status":"not-ready"}"#;
        let rec: SessionRecord = serde_json::from_str(old).unwrap();
        assert_eq!(rec.kind, BackingKind::SandboxClaim);
        assert_eq!(rec.status, SessionStatus::NotReady);
        assert!(rec.idle_timeout.0.is_zero() && rec.owner_id.is_none());
        assert_eq!(rec.created_at.as_second(), 1776391200);
    }
}
