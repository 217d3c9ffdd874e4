//! The session store: all session state lives here, so Routers and Workload Managers can be
//! restarted or scaled without losing a session.
//!
//! Main flow:
//! 1. A binary turns flags/env into a [`StoreConfig`] ([`config::StoreArgs`], upstream env names).
//! 2. [`connect`] builds an `Arc<dyn SessionStore>`: [`RedisStore`] (Redis and Valkey) or
//!    [`MemoryStore`] (embedded default, tests).
//! 3. The Workload Manager [`insert`](SessionStore::insert)s a `creating` placeholder, then
//!    [`replace`](SessionStore::replace)s it with the ready record (or deletes it on rollback).
//! 4. The Router [`get`](SessionStore::get)s records and flushes activity with
//!    [`touch_many`](SessionStore::touch_many); GC pages through
//!    [`list_expired`](SessionStore::list_expired) / [`list_idle`](SessionStore::list_idle).
//!
//! Key schema (identical to upstream, spec §4.3; the `session:` prefix is configurable for tests):
//! `session:<id>` JSON record, ZSET `session:expiry` (score `expiresAt`), ZSET
//! `session:last_activity` (score last activity), scores in whole Unix seconds, no Redis TTLs.
//!
//! Modules: [`keys`] (key layout and id rules), [`memory`], [`redis`], [`config`], and `testing`
//! (conformance suite, feature `test-util`).

use std::sync::Arc;

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
pub use redis::{RedisConfig, RedisStore};

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
    /// Any other backend error (e.g. authentication failure, script error).
    #[error("session store error: {0}")]
    Backend(String),
}

impl Error {
    /// True for errors that mean "try again later" (HTTP 503).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::Unavailable(_))
    }
}

/// Result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;

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

    /// Writes a new record and its index entries (expiry = `expiresAt`, last activity = `now`)
    /// atomically; [`Error::AlreadyExists`] if the id is taken.
    async fn insert(&self, record: &SessionRecord, now: Timestamp) -> Result<()>;

    /// Overwrites an existing record (and its expiry score); [`Error::NotFound`] if it vanished.
    async fn replace(&self, record: &SessionRecord) -> Result<()>;

    /// Deletes the record and its index entries. Returns whether it existed.
    async fn delete(&self, id: &str) -> Result<bool>;

    /// Records activity at `at`, only if the session still exists ([`Error::NotFound`]
    /// otherwise: a touch never resurrects a deleted session). Activity never moves backwards.
    async fn touch(&self, id: &str, at: Timestamp) -> Result<()>;

    /// [`touch`](Self::touch) for many sessions in one round trip. Returns how many still existed.
    async fn touch_many(&self, touches: &[(String, Timestamp)]) -> Result<usize>;

    /// Records whose `expiresAt` is at or before `before`, oldest first, at most `limit`.
    async fn list_expired(&self, before: Timestamp, limit: usize) -> Result<Vec<SessionRecord>>;

    /// Records whose last activity is at or before `before`, oldest first, at most `limit`.
    async fn list_idle(&self, before: Timestamp, limit: usize) -> Result<Vec<IdleSession>>;
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
