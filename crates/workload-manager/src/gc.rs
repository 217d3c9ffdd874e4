//! Garbage collection: sessions idle past their own `sessionTimeout`, and sessions past their
//! `maxSessionDuration` (`expiresAt`), are deleted sandbox first, then record. Runs on an interval
//! in every Workload Manager (deletes are idempotent), paging through the store's indexes.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use agentcube_types::SessionStatus;
use jiff::{SignedDuration, Timestamp};

use crate::sessions::Manager;

/// Upstream default idle timeout for records that carry none.
pub const DEFAULT_IDLE: Duration = Duration::from_secs(15 * 60);

/// The collector.
pub struct Gc {
    pub manager: Arc<Manager>,
    pub interval: Duration,
    /// Candidates examined per index per run.
    pub limit: usize,
}

impl Gc {
    /// One pass at time `now`. Returns how many sessions were deleted.
    pub async fn run_once(&self, now: Timestamp) -> usize {
        let store = &self.manager.store;
        let mut victims = Vec::new();
        let mut seen = HashSet::new();
        match store.list_idle(now, self.limit).await {
            Ok(idle) => {
                for s in idle {
                    let timeout = if s.record.idle_timeout.0.is_zero() {
                        DEFAULT_IDLE
                    } else {
                        s.record.idle_timeout.0
                    };
                    // Activity scores are whole seconds (floored): count from the end of that
                    // second so a session is never reclaimed early (at most 1 s late).
                    let deadline = s.last_activity
                        + SignedDuration::from_secs(1)
                        + SignedDuration::try_from(timeout).unwrap_or(SignedDuration::MAX);
                    // A placeholder belongs to a create in progress (which rolls back itself).
                    let creating = s.record.status == SessionStatus::Creating
                        && now
                            < s.record.created_at
                                + SignedDuration::try_from(self.manager.create_timeout * 2)
                                    .unwrap_or(SignedDuration::MAX);
                    if deadline <= now && !creating && seen.insert(s.record.session_id.clone()) {
                        victims.push(s.record);
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "gc: cannot list idle sessions"),
        }
        match store.list_expired(now, self.limit).await {
            Ok(expired) => {
                // Scores are whole seconds; the record's own `expiresAt` is exact.
                for r in expired.into_iter().filter(|r| r.expires_at <= now) {
                    if seen.insert(r.session_id.clone()) {
                        victims.push(r);
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "gc: cannot list expired sessions"),
        }
        let mut deleted = 0;
        for r in victims {
            match self.manager.delete_record(&r).await {
                Ok(()) => {
                    deleted += 1;
                    self.manager.metrics.gc_deleted.inc();
                }
                Err(e) => {
                    tracing::warn!(session_id = %r.session_id, error = %e, "gc: delete failed")
                }
            }
        }
        if deleted > 0 {
            tracing::info!(deleted, "gc: sessions reclaimed");
        }
        deleted
    }

    /// Runs [`Gc::run_once`] every interval until `shutdown` resolves.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) {
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = tick.tick() => { self.run_once(Timestamp::now()).await; }
                () = &mut shutdown => return,
            }
        }
    }
}
