//! Activity is recorded in memory on the hot path and flushed to the store in one batch per
//! interval (`touch_many`), which never re-creates a deleted session.

use std::collections::HashMap;
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
    /// Notes activity on a session now.
    pub fn record(&self, session_id: &str) {
        let now = Timestamp::now();
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
