//! Marks: how a standby claim changes hands without an API write before the answer.
//!
//! A standby claim leaves standby (handed to a session, or deleted by [`super::Standby::keep`])
//! only through a mark in the session store won first-come (`SET NX`): of all Workload
//! Manager replicas and all concurrent creates, exactly one wins it. The winner answers, then
//! patches the claim over to the session (or deletes it) and marks it [`Mark::Done`].
//!
//! Why this is safe:
//! - A pending mark ([`Mark::HandingOut`], [`Mark::Deleting`]) lives [`PENDING_TTL`]: until its
//!   work is done by its writer or, if that process died, by any replica's next pass
//!   ([`Mark::stale`] after [`COMPLETE_AFTER`]), which finishes it from the mark alone.
//! - A done mark lives [`DONE_TTL`], far longer than a claim watch lags (kube-rs re-lists on
//!   any watch error; a watch is re-established every few minutes), so no replica's cache can
//!   still show the claim as standby once the mark is gone. Claim names are never reused.
//! - What is left: a store that loses its data (Redis without persistence, restarted) in the
//!   milliseconds between a hand-out's answer and its patch, while its writer also dies. The
//!   claim would then look like an unused standby claim again.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A pending mark outlives any pass that would finish it.
pub const PENDING_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// A finished mark outlives any claim watch's lag.
pub const DONE_TTL: Duration = Duration::from_secs(3600);
/// A pass finishes another process's pending mark only when it is this old (its writer
/// normally finishes it within milliseconds).
pub const COMPLETE_AFTER: Duration = Duration::from_secs(10);

/// The mark of one standby claim.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "camelCase")]
pub enum Mark {
    /// Given to `session`; the claim still has to be patched with `patch`.
    #[serde(rename_all = "camelCase")]
    HandingOut {
        session: String,
        patch: serde_json::Value,
        /// When, in Unix milliseconds.
        at: i64,
    },
    /// To be deleted (surplus or stale).
    Deleting { at: i64 },
    /// Left standby for good.
    Done,
}

impl Mark {
    /// A hand-out to `session` now.
    pub fn handing_out(session: &str, patch: serde_json::Value) -> Self {
        Self::HandingOut {
            session: session.into(),
            patch,
            at: now_ms(),
        }
    }

    /// A delete now.
    pub fn deleting() -> Self {
        Self::Deleting { at: now_ms() }
    }

    /// Pending and older than [`COMPLETE_AFTER`]: a pass may finish it.
    pub fn stale(&self) -> bool {
        let at = match self {
            Self::HandingOut { at, .. } | Self::Deleting { at } => *at,
            Self::Done => return false,
        };
        now_ms().saturating_sub(at) >= COMPLETE_AFTER.as_millis() as i64
    }

    /// The stored form.
    pub fn encode(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// A stored mark; one this version cannot read counts as taken (never handed out again).
    pub fn decode(s: &str) -> Self {
        serde_json::from_str(s).unwrap_or(Self::Done)
    }
}

/// The mark name of claim `name` in `namespace` (Kubernetes names hold no `/`).
pub fn name(namespace: &str, name: &str) -> String {
    format!("standby/{namespace}/{name}")
}

fn now_ms() -> i64 {
    jiff::Timestamp::now().as_millisecond()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_round_trip_and_unknown_ones_count_as_taken() {
        let m = Mark::handing_out("s1", serde_json::json!({"metadata": {}}));
        assert_eq!(Mark::decode(&m.encode()), m);
        assert!(m.encode().contains(r#""state":"handingOut""#));
        let d = Mark::Deleting { at: 5 };
        assert_eq!(Mark::decode(&d.encode()), d);
        assert_eq!(Mark::decode("not json"), Mark::Done);
        assert_eq!(Mark::decode(r#"{"state":"fromTheFuture"}"#), Mark::Done);
    }

    #[test]
    fn only_old_pending_marks_are_stale() {
        assert!(!Mark::deleting().stale());
        assert!(!Mark::Done.stale());
        let old = now_ms() - COMPLETE_AFTER.as_millis() as i64 - 1;
        assert!(Mark::Deleting { at: old }.stale());
        assert!(
            Mark::HandingOut {
                session: "s".into(),
                patch: serde_json::Value::Null,
                at: old
            }
            .stale()
        );
    }
}
