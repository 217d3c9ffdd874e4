//! Garbage collection: sessions idle past their own `sessionTimeout`, and sessions past their
//! `maxSessionDuration` (`expiresAt`), are deleted sandbox first, then record. Runs on an interval
//! in every Workload Manager (deletes are idempotent), paging through the store's indexes.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use agentcube_types::SessionStatus;
use jiff::{SignedDuration, Timestamp};

use crate::metrics::Reason;
use crate::sessions::Manager;

/// A session the collector deletes.
type Victim = agentcube_types::SessionRecord;

/// Sandboxes torn down at once by one GC run.
pub const TEARDOWN_CONCURRENCY: usize = 32;

/// Session records looked up per store round trip by the orphan check.
pub const ORPHAN_BATCH: usize = 500;

/// Upstream default idle timeout for records that carry none.
pub const DEFAULT_IDLE: Duration = Duration::from_secs(15 * 60);

/// A record's idle timeout ([`DEFAULT_IDLE`] for one that carries none).
fn idle_timeout(r: &Victim) -> Duration {
    if r.idle_timeout.0.is_zero() {
        DEFAULT_IDLE
    } else {
        r.idle_timeout.0
    }
}

/// Why GC reclaimed a session, in words for its next user.
fn why_reclaimed(r: &Victim, reason: Reason) -> String {
    match reason {
        Reason::idle => format!(
            "it was idle for longer than its sessionTimeout ({})",
            agentcube_types::GoDuration(idle_timeout(r))
        ),
        _ => agentcube_types::session::past_its_end(r.expires_at),
    }
}

/// The collector.
pub struct Gc {
    pub manager: Arc<Manager>,
    pub interval: Duration,
    /// Candidates examined per index per run.
    pub limit: usize,
}

impl Gc {
    /// One pass at time `now`. Returns how many sessions were deleted.
    #[tracing::instrument(name = "gc", skip_all)]
    pub async fn run_once(&self, now: Timestamp) -> usize {
        let started = std::time::Instant::now();
        let metrics = &self.manager.metrics;
        let mut deleted = self.reap().await;
        // Before this run's own deletions: a backend may list its sandboxes as `reap` saw them,
        // and a session reclaimed below would look like an orphan.
        let n = self.orphans().await;
        metrics.reclaimed(Reason::orphan, n);
        deleted += n;
        let (idle, expired) = self.victims(now).await;
        let n = self.tear_down(idle, Reason::idle).await;
        metrics.reclaimed(Reason::idle, n);
        deleted += n;
        let n = self.tear_down(expired, Reason::expired).await;
        metrics.reclaimed(Reason::expired, n);
        deleted += n;
        if deleted > 0 {
            tracing::info!(deleted, "gc: sessions reclaimed");
        }
        metrics.gc_cycle.observe(started.elapsed().as_secs_f64());
        deleted
    }

    /// Sandboxes that died on their own: their sessions go at once, idle or not.
    async fn reap(&self) -> usize {
        let dead = self.manager.backend.reap().await;
        self.manager.metrics.reclaimed(Reason::dead, dead.len());
        let ids: Vec<String> = dead.iter().map(|(id, _)| id.clone()).collect();
        // Why first: whoever misses the record from now on finds it.
        self.manager.mark_gone(&dead).await;
        self.delete_records(&ids).await
    }

    /// Idle sessions past their own timeout, and sessions past `expiresAt` (that are not idle
    /// victims already).
    async fn victims(&self, now: Timestamp) -> (Vec<Victim>, Vec<Victim>) {
        let mut seen = HashSet::new();
        let idle_victims = self.idle_victims(now, &mut seen).await;
        let mut expired_victims = Vec::new();
        match self.manager.store.list_expired(now, self.limit).await {
            Ok(expired) => {
                // Scores are whole seconds; the record's own `expiresAt` is exact.
                for r in expired.into_iter().filter(|r| r.expires_at <= now) {
                    if seen.insert(r.session_id.clone()) {
                        expired_victims.push(r);
                    }
                }
            }
            Err(e) => {
                self.manager.metrics.gc_errors.inc();
                tracing::warn!(error = %e, "gc: cannot list expired sessions");
            }
        }
        (idle_victims, expired_victims)
    }

    /// Sessions past their own idle timeout, up to `limit` of them. The store lists candidates
    /// by last activity, oldest first, whatever their timeouts, so the listing goes on page by
    /// page past those not due (sessions idle for hours under an 8-hour timeout) until it has
    /// `limit` victims or has seen every session idle before `now`.
    async fn idle_victims(&self, now: Timestamp, seen: &mut HashSet<String>) -> Vec<Victim> {
        let mut victims = Vec::new();
        let mut skip = 0;
        while victims.len() < self.limit {
            let page = match self.manager.store.list_idle(now, skip, self.limit).await {
                Ok(page) => page,
                Err(e) => {
                    self.manager.metrics.gc_errors.inc();
                    tracing::warn!(error = %e, "gc: cannot list idle sessions");
                    break;
                }
            };
            // A short page is the end (the store reads on past index entries whose record
            // vanished, which it drops from the index, so `skip` counts what is still there).
            let last = page.len() < self.limit;
            skip += page.len();
            for s in page {
                if self.idle_due(&s, now) && seen.insert(s.record.session_id.clone()) {
                    victims.push(s.record);
                }
            }
            if last {
                break;
            }
        }
        victims
    }

    /// Whether an idle candidate is due at `now`.
    fn idle_due(&self, s: &agentcube_store::IdleSession, now: Timestamp) -> bool {
        let timeout = idle_timeout(&s.record);
        // Activity scores are whole seconds (floored): count from the end of that second so a
        // session is never reclaimed early (at most 1 s late).
        let deadline = s.last_activity
            + SignedDuration::from_secs(1)
            + SignedDuration::try_from(timeout).unwrap_or(SignedDuration::MAX);
        // A placeholder belongs to a create in progress (which rolls back itself) for twice the
        // create timeout; past that it is a leftover whatever its idle timeout (a create whose
        // store write landed after it gave up, or whose rollback could not reach the store),
        // which counted against the session caps until its idle timeout, 15 minutes by default.
        let placeholder = s.record.status == SessionStatus::Creating;
        let in_progress = placeholder
            && now
                < s.record.created_at
                    + SignedDuration::try_from(self.manager.create_timeout * 2)
                        .unwrap_or(SignedDuration::MAX);
        (deadline <= now || placeholder) && !in_progress
    }

    /// Notes why each victim ends (first: a request the teardown cuts is told so), deletes
    /// their sandboxes, [`TEARDOWN_CONCURRENCY`] at a time, then the records of those that are
    /// gone in one store round trip (a record never goes before its sandbox; a victim whose
    /// delete failed is tried again next run, its note standing meanwhile).
    async fn tear_down(&self, victims: Vec<Victim>, reason: Reason) -> usize {
        use futures_util::StreamExt;
        if victims.is_empty() {
            return 0;
        }
        let why: Vec<(String, String)> = victims
            .iter()
            .map(|r| (r.session_id.clone(), why_reclaimed(r, reason)))
            .collect();
        self.manager.mark_gone(&why).await;
        let backend = &self.manager.backend;
        let ids: Vec<String> = futures_util::stream::iter(victims)
            .map(|r| async move {
                match backend.delete(r.kind, &r.sandbox_namespace, &r.name).await {
                    Ok(()) => Some(r.session_id),
                    Err(e) => {
                        self.manager.metrics.gc_errors.inc();
                        tracing::warn!(session_id = %r.session_id, error = %e, "gc: delete failed");
                        None
                    }
                }
            })
            .buffer_unordered(TEARDOWN_CONCURRENCY)
            .filter_map(std::future::ready)
            .collect()
            .await;
        let deleted = self.delete_records(&ids).await;
        self.manager.metrics.sessions_deleted.inc_by(deleted as u64);
        deleted
    }

    /// Deletes records in one round trip; returns how many were deleted.
    async fn delete_records(&self, ids: &[String]) -> usize {
        if ids.is_empty() {
            return 0;
        }
        match self.manager.store.delete_many(ids).await {
            Ok(n) => n,
            Err(e) => {
                self.manager.metrics.gc_errors.inc();
                tracing::warn!(error = %e, sessions = ids.len(), "gc: cannot delete records");
                0
            }
        }
    }

    /// Sandboxes whose session record vanished (a store that lost its data): deleted. The
    /// records are looked up [`ORPHAN_BATCH`] at a time; a batch the store cannot answer
    /// deletes nothing.
    async fn orphans(&self) -> usize {
        let mut deleted = 0;
        let sessions = self.manager.backend.sessions();
        for batch in sessions.chunks(ORPHAN_BATCH) {
            let ids: Vec<String> = batch.iter().map(|(id, ..)| id.clone()).collect();
            let found = match self.manager.store.exists_many(&ids).await {
                Ok(found) => found,
                Err(e) => {
                    self.manager.metrics.gc_errors.inc();
                    tracing::warn!(error = %e, "gc: cannot check sessions' records");
                    continue;
                }
            };
            for ((session_id, kind, namespace, name), found) in batch.iter().zip(found) {
                if !found {
                    deleted += self.delete_orphan(session_id, *kind, namespace, name).await;
                }
            }
        }
        deleted
    }

    /// Deletes a sandbox whose record is gone; 1 when it went.
    async fn delete_orphan(
        &self,
        session_id: &str,
        kind: agentcube_types::BackingKind,
        namespace: &str,
        name: &str,
    ) -> usize {
        tracing::warn!(
            session_id,
            sandbox = name,
            "gc: the session's record is gone; deleting its sandbox"
        );
        match self.manager.backend.delete(kind, namespace, name).await {
            Ok(()) => 1,
            Err(e) => {
                self.manager.metrics.gc_errors.inc();
                tracing::warn!(sandbox = name, error = %e, "gc: cannot delete an orphan");
                0
            }
        }
    }

    /// Runs [`Gc::run_once`] every interval until `shutdown` resolves.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) {
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = tick.tick() => { self.run_once(Timestamp::now()).await; }
                // A sandbox died: its session ends now, not up to an interval later (until
                // then the Router answered its calls with 502 "sandbox unreachable").
                () = self.manager.backend.died() => { self.reap().await; }
                () = &mut shutdown => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    use agentcube_store::{MemoryStore, SessionStore};
    use agentcube_types::{BackingKind, GoDuration, SessionRecord, SessionStatus};

    use super::*;
    use crate::backend::{Backend, BackendError, Sandbox, SandboxRequest};

    /// Records deletes (with why the session ends, as noted in `store` when its sandbox is
    /// deleted) and counts GC passes (each pass asks it to reap).
    #[derive(Default)]
    struct Recorder {
        deleted: Mutex<Vec<String>>,
        noted: Mutex<Vec<Option<String>>>,
        store: Mutex<Option<Arc<dyn SessionStore>>>,
        passes: AtomicUsize,
    }

    #[async_trait::async_trait]
    impl Backend for Recorder {
        async fn create(&self, _: &SandboxRequest) -> Result<Sandbox, BackendError> {
            Err(BackendError::Failed("not in this test".into()))
        }
        async fn delete(&self, _: BackingKind, _: &str, name: &str) -> Result<(), BackendError> {
            self.deleted.lock().unwrap().push(name.to_string());
            let store = self.store.lock().unwrap().clone();
            if let Some(store) = store {
                let id = name.trim_start_matches("sb-");
                let why = agentcube_store::why_gone(store.as_ref(), id).await.unwrap();
                self.noted.lock().unwrap().push(why);
            }
            Ok(())
        }
        async fn shutdown(&self) {}
        async fn reap(&self) -> Vec<(String, String)> {
            self.passes.fetch_add(1, Ordering::SeqCst);
            Vec::new()
        }
    }

    fn t0() -> Timestamp {
        "2026-03-01T10:00:00Z".parse().unwrap()
    }

    fn record(id: &str, idle_secs: u64, expires_in: i64, status: SessionStatus) -> SessionRecord {
        let mut r = SessionRecord::placeholder(
            id,
            "default",
            format!("sb-{id}"),
            t0(),
            t0() + SignedDuration::from_secs(expires_in),
            GoDuration(Duration::from_secs(idle_secs)),
        );
        r.status = status;
        r
    }

    async fn gc() -> (Gc, Arc<Recorder>) {
        gc_on(Arc::new(MemoryStore::new())).await
    }

    async fn gc_on(store: Arc<dyn SessionStore>) -> (Gc, Arc<Recorder>) {
        let ready = SessionStatus::Ready;
        for r in [
            record("idle-1m", 60, 3600, ready),
            record("idle-15m", 0, 3600, ready),
            record("expired", 3600, 30, ready),
            record("creating", 60, 3600, SessionStatus::Creating),
            record("creating-15m", 0, 3600, SessionStatus::Creating),
        ] {
            store.insert(&r, t0()).await.unwrap();
        }
        let backend = Arc::new(Recorder::default());
        let manager = Arc::new(crate::sessions::Manager {
            store,
            backend: backend.clone(),
            definitions: Arc::new(crate::definitions::Definitions::new()),
            public_key: crate::key::RouterKey::fixed(None),
            create_timeout: Duration::from_secs(120),
            metrics: Arc::default(),
            admission: Default::default(),
            auth: Arc::new(crate::auth::CallerAuth::Off),
        });
        let gc = Gc {
            manager,
            interval: Duration::from_secs(15),
            limit: 100,
        };
        (gc, backend)
    }

    #[tokio::test]
    async fn the_choice_follows_each_sessions_own_timeouts_and_never_comes_early() {
        let (gc, backend) = gc().await;
        // One second before the 1-minute idle deadline (activity counts to the end of its
        // second): only the expired one goes.
        assert_eq!(gc.run_once(t0() + SignedDuration::from_secs(60)).await, 1);
        assert_eq!(*backend.deleted.lock().unwrap(), ["sb-expired"]);
        assert_eq!(gc.run_once(t0() + SignedDuration::from_secs(61)).await, 1);
        assert_eq!(backend.deleted.lock().unwrap()[1], "sb-idle-1m");
        // A placeholder of a create still in its time (twice the create timeout) stays.
        assert_eq!(gc.run_once(t0() + SignedDuration::from_secs(239)).await, 0);
        // Past that it is a leftover, whatever its idle timeout; and the default 15 minutes
        // applies to a record without an idle timeout of its own.
        assert_eq!(gc.run_once(t0() + SignedDuration::from_secs(241)).await, 2);
        let deleted = backend.deleted.lock().unwrap()[2..].to_vec();
        assert_eq!(deleted, ["sb-creating", "sb-creating-15m"]);
        assert_eq!(
            gc.run_once(t0() + SignedDuration::from_secs(15 * 60)).await,
            0
        );
        assert_eq!(
            gc.run_once(t0() + SignedDuration::from_secs(15 * 60 + 1))
                .await,
            1
        );
        assert_eq!(backend.deleted.lock().unwrap()[4], "sb-idle-15m");
    }

    /// Candidates come oldest activity first, `limit` per store round trip: sessions with long
    /// idle timeouts at the front (agents kept for hours) must not hide the due ones behind them
    /// — those would count against the session caps until the front ones went.
    #[tokio::test]
    async fn sessions_due_behind_a_page_of_long_lived_ones_are_reclaimed() {
        let (mut gc, backend) = gc().await;
        gc.limit = 3;
        for i in 0..7 {
            let mut r = record(
                &format!("agent-{i}"),
                8 * 3600,
                86_400,
                SessionStatus::Ready,
            );
            r.created_at = t0() - SignedDuration::from_hours(2);
            gc.manager.store.insert(&r, r.created_at).await.unwrap();
        }
        let now = t0() + SignedDuration::from_secs(62);
        let reclaimed = gc.run_once(now).await;
        let mut deleted = backend.deleted.lock().unwrap().clone();
        deleted.sort();
        assert_eq!(deleted, ["sb-expired", "sb-idle-1m"]);
        assert_eq!(reclaimed, 2);
    }

    /// A Redis page cut short by index entries whose record vanished (dropped from the index
    /// as the page is read) is not the end: the due sessions behind it go in the same pass.
    #[tokio::test]
    async fn sessions_behind_index_entries_of_vanished_records_are_reclaimed() {
        use agentcube_store::testing::{Flavor, ServerProcess};
        let server = ServerProcess::start(Flavor::Redis);
        let mut config = agentcube_store::RedisConfig::new(server.url());
        config.key_prefix = "gc:session:".into();
        let store = Arc::new(agentcube_store::RedisStore::new(config).unwrap());
        let (mut gc, backend) = gc_on(store.clone()).await;
        gc.limit = 3;
        // Three records that vanish (a Redis that lost keys) at the front of the idle index.
        for i in 0..3 {
            let r = record(&format!("ghost-{i}"), 60, 3600, SessionStatus::Ready);
            store
                .insert(&r, t0() - SignedDuration::from_secs(600))
                .await
                .unwrap();
            let gone = server.command(&format!("DEL gc:session:ghost-{i}"));
            assert_eq!(gone.as_deref(), Some(":1\r\n"));
        }
        let now = t0() + SignedDuration::from_secs(62);
        assert_eq!(gc.run_once(now).await, 2);
        let mut deleted = backend.deleted.lock().unwrap().clone();
        deleted.sort();
        assert_eq!(deleted, ["sb-expired", "sb-idle-1m"]);
    }

    /// A request the teardown cuts is told why (the Router reads the note while the record still
    /// stands), so the note comes before the sandbox goes.
    #[tokio::test]
    async fn why_a_session_ends_is_noted_before_its_sandbox_goes() {
        let (gc, backend) = gc().await;
        *backend.store.lock().unwrap() = Some(gc.manager.store.clone());
        assert_eq!(gc.run_once(t0() + SignedDuration::from_secs(61)).await, 2);
        let mut noted = backend.noted.lock().unwrap().clone();
        noted.sort();
        assert_eq!(
            noted,
            [
                Some("it reached its maximum duration (maxSessionDuration or the create's ttl; it expired at 2026-03-01T10:00:30Z)".to_string()),
                Some("it was idle for longer than its sessionTimeout (1m0s)".to_string()),
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_loop_runs_once_per_interval_until_shutdown() {
        let (gc, backend) = gc().await;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(gc.run(async {
            let _ = stopped.await;
        }));
        tokio::time::sleep(Duration::from_secs(15 * 3 + 1)).await;
        // Immediately, then at 15, 30 and 45 s.
        assert_eq!(backend.passes.load(Ordering::SeqCst), 4);
        let _ = stop.send(());
        task.await.unwrap();
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(
            backend.passes.load(Ordering::SeqCst),
            4,
            "no pass after shutdown"
        );
    }
}
