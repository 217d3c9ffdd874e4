//! Activity is recorded in memory on the hot path and flushed to the store in one batch per
//! interval (`touch_many`), which never re-creates a deleted session.
//!
//! A session is active while a request to it is being served ([`Activity::begin`] to
//! [`Activity::end`]: the Router's request to the sandbox, until the answer has been streamed
//! out or a WebSocket tunnel closed) and when an answer ends. A flush notes as active at that
//! moment every session that has had requests in flight since the flush before (at least a
//! flush interval), so a command or an answer that takes longer than the session's idle timeout
//! does not get its sandbox reclaimed under it. A request the sandbox never answered notes
//! nothing: one to a dead sandbox fails within a flush interval, so it never keeps its session
//! alive, however often it is retried.

use foldhash::HashMap;
use std::sync::Mutex;

use agentcube_store::SessionStore;
use jiff::Timestamp;

/// What is pending for one session: the latest activity not yet flushed, how many of its
/// requests are being served, and whether a flush has seen it busy since they began.
#[derive(Default)]
struct Pending {
    at: Option<Timestamp>,
    in_flight: u32,
    seen_busy: bool,
}

/// Pending activity per session id.
#[derive(Default)]
pub struct Activity {
    pending: Mutex<HashMap<String, Pending>>,
}

impl std::fmt::Debug for Activity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Activity").finish_non_exhaustive()
    }
}

impl Activity {
    /// A request to `session_id` is being served: the session is active at every flush until
    /// the matching [`Activity::end`].
    pub fn begin(&self, session_id: &str) {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        match p.get_mut(session_id) {
            Some(e) => e.in_flight += 1,
            None => {
                let e = Pending {
                    at: None,
                    in_flight: 1,
                    seen_busy: false,
                };
                p.insert(session_id.to_string(), e);
            }
        }
    }

    /// A request [`Activity::begin`] noted is over; `answered`: the sandbox answered it, and
    /// its end is the session's latest activity.
    pub fn end(&self, session_id: &str, answered: bool) {
        let at = answered.then(Timestamp::now);
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = p.get_mut(session_id) {
            e.in_flight = e.in_flight.saturating_sub(1);
            if e.in_flight == 0 {
                e.seen_busy = false;
            }
            if at.is_some() {
                e.at = at;
            }
        }
    }

    /// Writes everything pending in one round trip: the sessions busy since the last flush as
    /// active now, the others at their latest activity (forgotten unless busy). On failure the
    /// batch is kept for next time.
    pub async fn flush(&self, store: &dyn SessionStore) {
        let now = Timestamp::now();
        let batch: Vec<(String, Timestamp)> = {
            let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            if p.is_empty() {
                return;
            }
            let mut batch = Vec::with_capacity(p.len());
            p.retain(|id, e| {
                let busy = e.in_flight > 0;
                let at = match (busy, e.seen_busy) {
                    (true, true) => Some(now),
                    _ => e.at,
                };
                if let Some(at) = at {
                    batch.push((id.clone(), at));
                }
                e.at = None;
                e.seen_busy = busy;
                busy
            });
            batch
        };
        if batch.is_empty() {
            return;
        }
        if let Err(e) = store.touch_many(&batch).await {
            tracing::warn!(error = %e, sessions = batch.len(), "cannot flush session activity");
            let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            for (id, t) in batch {
                let e = p.entry(id).or_default();
                e.at = Some(e.at.map_or(t, |at| at.max(t)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use agentcube_store::testing::Flaky;
    use agentcube_store::{MemoryStore, Scope};
    use agentcube_types::{GoDuration, SessionRecord};

    use super::*;

    async fn store_with(ids: &[&str]) -> (Arc<Flaky>, Arc<dyn SessionStore>) {
        let inner: Arc<dyn SessionStore> = Arc::new(MemoryStore::new());
        let t0: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        for id in ids {
            let r = SessionRecord::placeholder(
                *id,
                "default",
                "x",
                t0,
                t0 + jiff::SignedDuration::from_hours(8),
                GoDuration::default(),
            );
            inner.insert(&r, t0).await.unwrap();
        }
        (Arc::new(Flaky::new(inner.clone())), inner)
    }

    async fn last_activity(store: &dyn SessionStore, id: &str) -> i64 {
        let far = Timestamp::now() + jiff::SignedDuration::from_hours(24);
        store
            .list_idle(far, 0, 100)
            .await
            .unwrap()
            .into_iter()
            .find(|s| s.record.session_id == id)
            .unwrap()
            .last_activity
            .as_second()
    }

    /// The pending time of `id`.
    fn pending_at(activity: &Activity, id: &str) -> Option<Timestamp> {
        activity.pending.lock().unwrap().get(id).and_then(|e| e.at)
    }

    /// One request to `id` that the sandbox answered, over at once.
    fn answered(activity: &Activity, id: &str) {
        activity.begin(id);
        activity.end(id, true);
    }

    #[tokio::test]
    async fn a_failed_flush_keeps_the_batch_and_merges_newer_activity() {
        let (flaky, inner) = store_with(&["a", "b"]).await;
        let activity = Activity::default();
        answered(&activity, "a");
        let first = pending_at(&activity, "a").unwrap();
        flaky.set_down(true);
        activity.flush(flaky.as_ref()).await;
        assert_eq!(flaky.refused.load(std::sync::atomic::Ordering::SeqCst), 1);
        // Nothing lost: the batch is back, and activity recorded meanwhile merges with it.
        answered(&activity, "b");
        {
            let p = activity.pending.lock().unwrap();
            assert_eq!(p.len(), 2);
            assert_eq!(p["a"].at, Some(first), "the kept time, not an older one");
        }
        flaky.set_down(false);
        activity.flush(flaky.as_ref()).await;
        assert!(activity.pending.lock().unwrap().is_empty());
        assert_eq!(last_activity(inner.as_ref(), "a").await, first.as_second());
        assert!(last_activity(inner.as_ref(), "b").await >= first.as_second());
        assert_eq!(inner.count(&Scope::All).await.unwrap(), 2);
    }

    #[tokio::test]
    async fn a_flush_never_resurrects_a_deleted_session() {
        let (flaky, inner) = store_with(&["gone"]).await;
        let activity = Activity::default();
        answered(&activity, "gone");
        activity.begin("gone");
        inner.delete("gone").await.unwrap();
        activity.flush(flaky.as_ref()).await;
        assert!(matches!(
            inner.get("gone").await,
            Err(agentcube_store::Error::NotFound)
        ));
        assert_eq!(inner.count(&Scope::All).await.unwrap(), 0);
    }

    /// A request being served keeps its session active at every flush from the second after it
    /// began on, however long it takes; once it ends, the session's activity is the end of its
    /// answer (or none, for a request the sandbox never answered), and the session is forgotten
    /// after the next flush.
    #[tokio::test]
    async fn sessions_with_requests_in_flight_are_active_at_every_flush() {
        let (store, _) = store_with(&["long", "dead"]).await;
        let activity = Activity::default();
        let t0 = last_activity(store.as_ref(), "long").await;
        activity.begin("long");
        activity.begin("dead");
        activity.end("dead", false);
        // Not at the first flush after it began: a request to a dead sandbox fails before the
        // next one.
        activity.flush(store.as_ref()).await;
        assert_eq!(last_activity(store.as_ref(), "long").await, t0);
        activity.flush(store.as_ref()).await;
        let flushed = last_activity(store.as_ref(), "long").await;
        assert!(flushed > t0, "active while in flight");
        assert_eq!(
            last_activity(store.as_ref(), "dead").await,
            t0,
            "never answered"
        );
        assert_eq!(
            activity.pending.lock().unwrap().len(),
            1,
            "the dead one is forgotten"
        );
        // Still in flight at the next flush: active again (a later second).
        tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
        activity.flush(store.as_ref()).await;
        let again = last_activity(store.as_ref(), "long").await;
        assert!(again > flushed, "{again} > {flushed}");
        // Two requests at once: the session stays in flight until both end.
        activity.begin("long");
        activity.end("long", true);
        assert_eq!(activity.pending.lock().unwrap()["long"].in_flight, 1);
        activity.end("long", false);
        assert!(
            pending_at(&activity, "long").is_some(),
            "the answer's end noted"
        );
        activity.flush(store.as_ref()).await;
        assert!(activity.pending.lock().unwrap().is_empty());
    }
}
