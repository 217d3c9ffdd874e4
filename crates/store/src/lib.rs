//! The session store: all session state lives here, so Routers and Workload Managers can be
//! restarted or scaled without losing a session.
//!
//! Main flow:
//! 1. A binary turns flags/env into a [`StoreConfig`] ([`config::StoreArgs`], upstream env names).
//! 2. [`connect`] builds an `Arc<dyn SessionStore>`: [`RedisStore`] (Redis and Valkey, plain or
//!    over TLS with [`RedisTls`]) or [`MemoryStore`] (embedded default, tests). Errors that
//!    mean "try later" (no answer, `LOADING`, `READONLY`, `OOM`…) are [`Error::Unavailable`]
//!    (`503`); the rest are the backend's.
//! 3. The Workload Manager [`insert`](SessionStore::insert)s a `creating` placeholder, then
//!    [`replace`](SessionStore::replace)s it with the ready record (or deletes it on rollback).
//! 4. The Router [`get`](SessionStore::get)s records and flushes activity with
//!    [`touch_many`](SessionStore::touch_many); GC pages through
//!    [`list_expired`](SessionStore::list_expired) / [`list_idle`](SessionStore::list_idle).
//!
//! Key schema (identical to upstream, spec §4.3; the `session:` prefix is configurable for tests):
//! `session:<id>` JSON record, ZSET `session:expiry` (score `expiresAt`), ZSET
//! `session:last_activity` (score last activity), scores in whole Unix seconds, no Redis TTLs.
//! Extensions under the reserved `session:idx:` prefix (no session id can start with `idx:`):
//! the secondary indexes of [`Scope`], and marks (`session:idx:mark:<name>`, short strings
//! with a Redis TTL) that the Workload Manager sets before handing out a standby claim
//! ([`set_mark`](SessionStore::set_mark)), and when it ends a session: why ([`gone_mark`], kept
//! [`GONE_TTL`]), which the Router adds to its unknown-session 404.
//!
//! Modules: [`keys`] (key layout and id rules), [`memory`], [`redis`], [`config`], and `testing`
//! (conformance suite, feature `test-util`).

use std::sync::Arc;
use std::time::Duration;

use agentcube_types::SessionRecord;
use jiff::Timestamp;

pub mod config;
pub mod keys;
pub mod memory;
pub mod redis;
#[cfg(feature = "test-util")]
pub mod testing;

pub use config::{StoreArgs, StoreConfig};
pub use memory::MemoryStore;
pub use redis::{RedisConfig, RedisStore, RedisTls};

/// What a store call can fail with. Callers map [`Error::Unavailable`] to 503.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No record with that id.
    #[error("session not found")]
    NotFound,
    /// `insert` of an id that already exists.
    #[error("session already exists")]
    AlreadyExists,
    /// An id the key schema cannot hold (empty, too long, control characters, or an index name).
    #[error("invalid session id: {0}")]
    InvalidId(String),
    /// The store cannot be reached in time (connection refused, timeout, I/O).
    #[error("session store unavailable: {0}")]
    Unavailable(String),
    /// A stored record that is not valid JSON for [`SessionRecord`].
    #[error("corrupt session record: {0}")]
    Codec(#[from] serde_json::Error),
    /// A listing cursor this store did not hand out.
    #[error("invalid page cursor: {0}")]
    BadCursor(String),
    /// Any other backend error (e.g. authentication failure, script error).
    #[error("session store error: {0}")]
    Backend(String),
}

impl Error {
    /// True for errors that mean "try again later" (HTTP 503).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::Unavailable(_))
    }

    /// What a component says of the store when this error stopped `who`: an outage ("does
    /// not answer") or a refusal (a wrong password, a refused certificate: waiting will not help).
    pub fn said_to(&self, who: &str) -> String {
        if self.is_unavailable() {
            "the session store does not answer".into()
        } else {
            format!("the session store refuses {who}")
        }
    }
}

/// Result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Which sessions a count or a listing covers. Each is one sorted index in the store, kept by
/// `insert`/`delete`, so counting is O(1) and listing O(log N + k).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Every session.
    All,
    /// Sessions whose sandbox lives in a namespace.
    Namespace(String),
    /// Sessions created for one kind of runtime (records that name their runtime).
    Kind(agentcube_types::api::WorkloadKind),
    /// Sessions created by one caller (`createdBy`).
    Creator(String),
    /// Both of the above.
    KindCreator(agentcube_types::api::WorkloadKind, String),
    /// Sessions made for one end user (`ownerId`, the Router's authenticated user).
    Owner(String),
}

impl Scope {
    /// The indexes a record belongs to (besides [`Scope::All`]).
    pub fn of(record: &SessionRecord) -> Vec<Scope> {
        let mut v = vec![Scope::Namespace(record.sandbox_namespace.clone())];
        if let Some(k) = record.workload_kind {
            v.push(Scope::Kind(k));
        }
        if let Some(c) = &record.created_by {
            v.push(Scope::Creator(c.clone()));
            if let Some(k) = record.workload_kind {
                v.push(Scope::KindCreator(k, c.clone()));
            }
        }
        if let Some(o) = &record.owner_id {
            v.push(Scope::Owner(o.clone()));
        }
        v
    }
}

/// One page of a listing, and where the next one starts.
#[derive(Debug, Clone, PartialEq)]
pub struct Page {
    pub records: Vec<SessionRecord>,
    /// Opaque cursor for the next page; `None` at the end.
    pub next: Option<String>,
}

/// A record whose last activity is older than the asked time, with that activity time.
#[derive(Debug, Clone, PartialEq)]
pub struct IdleSession {
    pub record: SessionRecord,
    /// From the `session:last_activity` score (whole seconds).
    pub last_activity: Timestamp,
}

/// Everything the Router, the Workload Manager and GC need from the store.
///
/// Listing calls cost O(log N + k) (sorted-set range queries), never a scan of all keys. Results
/// are ordered oldest first.
#[async_trait::async_trait]
pub trait SessionStore: Send + Sync + 'static {
    /// Checks the store answers.
    async fn ping(&self) -> Result<()>;

    /// The record for `id`, or [`Error::NotFound`].
    async fn get(&self, id: &str) -> Result<SessionRecord>;

    /// Whether each of `ids` has a record, in order, in one round trip (GC's check for
    /// sandboxes whose record vanished). An id no record can have is `false`.
    async fn exists_many(&self, ids: &[String]) -> Result<Vec<bool>>;

    /// Writes a new record and its index entries (expiry = `expiresAt`, last activity = `now`)
    /// atomically; [`Error::AlreadyExists`] if the id is taken.
    async fn insert(&self, record: &SessionRecord, now: Timestamp) -> Result<()>;

    /// Overwrites an existing record (and its expiry score); [`Error::NotFound`] if it vanished.
    async fn replace(&self, record: &SessionRecord) -> Result<()>;

    /// Deletes the record and its index entries. Returns whether it existed.
    async fn delete(&self, id: &str) -> Result<bool>;

    /// [`delete`](Self::delete) for many sessions in one round trip (GC). Returns how many
    /// existed.
    async fn delete_many(&self, ids: &[String]) -> Result<usize>;

    /// Records activity at `at`, only if the session still exists ([`Error::NotFound`]
    /// otherwise: a touch never resurrects a deleted session). Activity never moves backwards.
    async fn touch(&self, id: &str, at: Timestamp) -> Result<()>;

    /// [`touch`](Self::touch) for many sessions in one round trip. Returns how many still existed.
    async fn touch_many(&self, touches: &[(String, Timestamp)]) -> Result<usize>;

    /// Records whose `expiresAt` is at or before `before`, oldest first, at most `limit`.
    async fn list_expired(&self, before: Timestamp, limit: usize) -> Result<Vec<SessionRecord>>;

    /// Records whose last activity is at or before `before`, oldest first: at most `limit`,
    /// after the first `skip` of them (paging; activity moves sessions to the end and deletes
    /// shift the rest, so pages are a snapshot of no single moment). Index entries whose record
    /// vanished are dropped from the indexes and read past: fewer than `limit` means no more.
    async fn list_idle(
        &self,
        before: Timestamp,
        skip: usize,
        limit: usize,
    ) -> Result<Vec<IdleSession>>;

    /// How many sessions a scope holds (one index cardinality; placeholders included).
    async fn count(&self, scope: &Scope) -> Result<usize>;

    /// One page of a scope's records, oldest first (by creation; [`Scope::All`] by expiry),
    /// starting after `cursor` (from a previous [`Page`]), at most `limit`. Concurrent deletes
    /// may make a page shorter, never skip a record that stays.
    async fn list_page(&self, scope: &Scope, cursor: Option<&str>, limit: usize) -> Result<Page>;

    /// Sets the mark `name` to `value` for `ttl` (Redis `SET … PX`); with `only_if_absent`,
    /// only if no live mark of that name exists (`NX`): of concurrent such calls exactly one
    /// wins. Returns whether it was set. Extension: the Workload Manager's standby claims change
    /// hands only through a mark won this way.
    async fn set_mark(
        &self,
        name: &str,
        value: &str,
        ttl: Duration,
        only_if_absent: bool,
    ) -> Result<bool>;

    /// The live marks of `names` (`None`: absent or expired), in order, in one round trip.
    async fn get_marks(&self, names: &[String]) -> Result<Vec<Option<String>>>;
}

/// The mark holding why session `session_id` ended (a sentence: "idle for longer than its
/// sessionTimeout (15m0s)"), set by the Workload Manager as it deletes the record.
pub fn gone_mark(session_id: &str) -> String {
    format!("gone:{session_id}")
}

/// Why session `session_id` ended ([`gone_mark`]), when that was noted and is still kept.
pub async fn why_gone(store: &dyn SessionStore, session_id: &str) -> Result<Option<String>> {
    let found = store.get_marks(&[gone_mark(session_id)]).await?;
    Ok(found.into_iter().next().flatten())
}

/// How long why a session ended is kept.
pub const GONE_TTL: Duration = Duration::from_secs(3600);

/// A page cursor: `<score>:<id>` of the last record returned.
pub(crate) fn cursor_of(score: i64, id: &str) -> String {
    format!("{score}:{id}")
}

/// Splits a cursor; a malformed one is an error the API maps to 400.
pub(crate) fn parse_cursor(c: &str) -> Result<(i64, &str)> {
    let (s, id) = c
        .split_once(':')
        .ok_or_else(|| Error::BadCursor(c.to_string()))?;
    let s = s.parse().map_err(|_| Error::BadCursor(c.to_string()))?;
    Ok((s, id))
}

/// Builds the store a configuration asks for. Redis is connected lazily: an unreachable Redis
/// is an [`Error::Unavailable`] on the first call, not a failure here.
pub fn connect(config: &StoreConfig) -> Result<Arc<dyn SessionStore>> {
    match config {
        StoreConfig::Memory => Ok(Arc::new(MemoryStore::new())),
        StoreConfig::Redis(c) => Ok(Arc::new(RedisStore::new(c.clone())?)),
    }
}

/// Whole Unix seconds, the score unit of both indexes.
pub(crate) fn score(t: Timestamp) -> i64 {
    t.as_second()
}

/// Pairs of (record, last-activity score) into [`IdleSession`]s.
pub(crate) fn idle_sessions(hits: Vec<(SessionRecord, i64)>) -> Result<Vec<IdleSession>> {
    hits.into_iter()
        .map(|(record, s)| {
            let last_activity =
                Timestamp::from_second(s).map_err(|e| Error::Backend(e.to_string()))?;
            Ok(IdleSession {
                record,
                last_activity,
            })
        })
        .collect()
}
