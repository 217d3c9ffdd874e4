//! Activity is recorded in memory on the hot path and flushed to the store in one batch per
//! interval (`touch_many`), which never re-creates a deleted session.

use foldhash::HashMap;
use std::sync::Mutex;

use agentcube_store::SessionStore;
use jiff::Timestamp;

/// Pending activity: session id → latest time seen.
#[derive(Default)]
pub struct Activity {
    pending: Mutex<HashMap<String, Timestamp>>,
}

impl std::fmt::Debug for Activity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Activity").finish_non_exhaustive()
    }
}

impl Activity {
    /// Notes activity on a session now; the time noted.
    pub fn record(&self, session_id: &str) -> Timestamp {
        let now = Timestamp::now();
        self.record_at(session_id, now);
        now
    }

    /// Notes activity on a session at `now`.
    pub fn record_at(&self, session_id: &str, now: Timestamp) {
        let mut p = self.pending.lock().unwrap();
        match p.get_mut(session_id) {
            Some(t) => *t = now,
            None => {
                p.insert(session_id.to_string(), now);
            }
        }
    }

    /// Writes everything pending in one round trip. On failure the batch is kept for next time.
    pub async fn flush(&self, store: &dyn SessionStore) {
        let batch: Vec<(String, Timestamp)> = {
            let mut p = self.pending.lock().unwrap();
            if p.is_empty() {
                return;
            }
            p.drain().collect()
        };
        if let Err(e) = store.touch_many(&batch).await {
            tracing::warn!(error = %e, sessions = batch.len(), "cannot flush session activity");
            let mut p = self.pending.lock().unwrap();
            for (id, t) in batch {
                let e = p.entry(id).or_insert(t);
                *e = (*e).max(t);
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
            .list_idle(far, 100)
            .await
            .unwrap()
            .into_iter()
            .find(|s| s.record.session_id == id)
            .unwrap()
            .last_activity
            .as_second()
    }

    #[tokio::test]
    async fn a_failed_flush_keeps_the_batch_and_merges_newer_activity() {
        let (flaky, inner) = store_with(&["a", "b"]).await;
        let activity = Activity::default();
        activity.record("a");
        let first = activity.pending.lock().unwrap()["a"];
        flaky.set_down(true);
        activity.flush(flaky.as_ref()).await;
        assert_eq!(flaky.refused.load(std::sync::atomic::Ordering::SeqCst), 1);
        // Nothing lost: the batch is back, and activity recorded meanwhile merges with it.
        activity.record("b");
        {
            let p = activity.pending.lock().unwrap();
            assert_eq!(p.len(), 2);
            assert_eq!(p["a"], first, "the kept time, not an older one");
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
        activity.record("gone");
        inner.delete("gone").await.unwrap();
        activity.flush(flaky.as_ref()).await;
        assert!(matches!(
            inner.get("gone").await,
            Err(agentcube_store::Error::NotFound)
        ));
        assert_eq!(inner.count(&Scope::All).await.unwrap(), 0);
    }
}
