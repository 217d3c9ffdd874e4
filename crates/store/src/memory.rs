//! In-process store with the same semantics as Redis, for the embedded default and tests.
//!
//! Records are kept serialised, exactly as Redis keeps them, so the codec is exercised the same way.
//! Both indexes are `BTreeSet<(score, id)>` plus a score map, so listings are O(log N + k).

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use agentcube_types::SessionRecord;
use jiff::Timestamp;

use crate::keys::{Keys, check_id};
use crate::{
    Error, IdleSession, Page, Result, Scope, SessionStore, cursor_of, parse_cursor, score,
};

/// A sorted set: member → score, plus (score, member) ordered.
#[derive(Default)]
struct ZSet {
    scores: HashMap<String, i64>,
    ordered: BTreeSet<(i64, String)>,
}

impl ZSet {
    fn add(&mut self, member: &str, s: i64) {
        if let Some(old) = self.scores.insert(member.to_string(), s) {
            self.ordered.remove(&(old, member.to_string()));
        }
        self.ordered.insert((s, member.to_string()));
    }

    fn remove(&mut self, member: &str) {
        if let Some(old) = self.scores.remove(member) {
            self.ordered.remove(&(old, member.to_string()));
        }
    }

    /// Members after `(score, id)` (all when `None`), lowest first.
    fn after(&self, cursor: Option<(i64, &str)>) -> impl Iterator<Item = &(i64, String)> {
        use std::ops::Bound::{Excluded, Unbounded};
        let start = match cursor {
            Some((s, id)) => Excluded((s, id.to_string())),
            None => Unbounded,
        };
        self.ordered.range((start, Unbounded))
    }

    /// Members with score ≤ `max`, lowest first.
    fn range_to(&self, max: i64) -> impl Iterator<Item = &(i64, String)> {
        self.ordered.range(..=(max, String::from("\u{10ffff}")))
    }
}

#[derive(Default)]
struct Inner {
    records: HashMap<String, String>,
    expiry: ZSet,
    activity: ZSet,
    /// Secondary indexes by key name (the same names as in Redis).
    indexes: HashMap<String, ZSet>,
    /// Marks: name → (value, expiry).
    marks: HashMap<String, (String, Instant)>,
    /// How many marks the last pruning of expired ones kept: the next waits until there are
    /// twice as many (every session that ends leaves one for an hour: pruning on every set was
    /// quadratic).
    marks_kept: usize,
}

impl Inner {
    fn index_mut(&mut self, keys: &Keys, scope: &Scope) -> &mut ZSet {
        match scope {
            Scope::All => &mut self.expiry,
            other => self.indexes.entry(keys.index(other)).or_default(),
        }
    }

    /// Drops a record and every index entry of it.
    fn remove(&mut self, keys: &Keys, id: &str) -> bool {
        let Some(json) = self.records.remove(id) else {
            self.expiry.remove(id);
            self.activity.remove(id);
            return false;
        };
        self.expiry.remove(id);
        self.activity.remove(id);
        if let Ok(r) = serde_json::from_str::<SessionRecord>(&json) {
            for scope in Scope::of(&r) {
                let key = keys.index(&scope);
                if let Some(z) = self.indexes.get_mut(&key) {
                    z.remove(id);
                    if z.scores.is_empty() {
                        self.indexes.remove(&key);
                    }
                }
            }
        }
        true
    }
}

/// The in-memory store. Cheap to create; share it behind an `Arc`.
#[derive(Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
    keys: Keys,
    examined: AtomicU64,
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore").finish_non_exhaustive()
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Index entries looked at by listing calls so far (a diagnostic that shows listings do not
    /// scan the whole store).
    pub fn examined(&self) -> u64 {
        self.examined.load(Ordering::Relaxed)
    }

    /// Number of records held.
    pub fn len(&self) -> usize {
        self.inner.lock().unwrap().records.len()
    }

    /// True when no record is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Walks an index up to `max`, decoding the records still present and dropping index entries
    /// whose record vanished (as the Redis script does).
    fn scan(
        &self,
        pick: fn(&mut Inner) -> &mut ZSet,
        max: i64,
        skip: usize,
        limit: usize,
    ) -> Result<Vec<(SessionRecord, i64)>> {
        let mut inner = self.inner.lock().unwrap();
        let mut out = Vec::with_capacity(limit.min(1024));
        // As Redis's script: an entry whose record vanished is dropped and read past, so a
        // short page is the end.
        loop {
            let hits: Vec<(i64, String)> = pick(&mut inner)
                .range_to(max)
                .skip(skip + out.len())
                .take(limit - out.len())
                .cloned()
                .collect();
            self.examined
                .fetch_add(hits.len() as u64, Ordering::Relaxed);
            let mut dropped = 0;
            for (s, id) in hits {
                match inner.records.get(&id) {
                    Some(json) => out.push((serde_json::from_str(json)?, s)),
                    None => {
                        inner.remove(&self.keys, &id);
                        dropped += 1;
                    }
                }
            }
            if dropped == 0 || out.len() >= limit {
                return Ok(out);
            }
        }
    }
}

#[async_trait::async_trait]
impl SessionStore for MemoryStore {
    async fn ping(&self) -> Result<()> {
        Ok(())
    }

    async fn get(&self, id: &str) -> Result<SessionRecord> {
        if check_id(id).is_err() {
            return Err(Error::NotFound);
        }
        let inner = self.inner.lock().unwrap();
        let json = inner.records.get(id).ok_or(Error::NotFound)?;
        Ok(serde_json::from_str(json)?)
    }

    async fn exists_many(&self, ids: &[String]) -> Result<Vec<bool>> {
        let inner = self.inner.lock().unwrap();
        Ok(ids
            .iter()
            .map(|id| check_id(id).is_ok() && inner.records.contains_key(id.as_str()))
            .collect())
    }

    async fn insert(&self, record: &SessionRecord, now: Timestamp) -> Result<()> {
        check_id(&record.session_id)?;
        let json = serde_json::to_string(record)?;
        let mut inner = self.inner.lock().unwrap();
        if inner.records.contains_key(&record.session_id) {
            return Err(Error::AlreadyExists);
        }
        let id = record.session_id.as_str();
        inner.records.insert(id.to_string(), json);
        inner.expiry.add(id, score(record.expires_at));
        inner.activity.add(id, score(now));
        for scope in Scope::of(record) {
            inner
                .index_mut(&self.keys, &scope)
                .add(id, score(record.created_at));
        }
        Ok(())
    }

    async fn replace(&self, record: &SessionRecord) -> Result<()> {
        check_id(&record.session_id)?;
        let json = serde_json::to_string(record)?;
        let mut inner = self.inner.lock().unwrap();
        let id = record.session_id.as_str();
        match inner.records.get_mut(id) {
            Some(slot) => *slot = json,
            None => return Err(Error::NotFound),
        }
        inner.expiry.add(id, score(record.expires_at));
        Ok(())
    }

    async fn delete(&self, id: &str) -> Result<bool> {
        Ok(self.inner.lock().unwrap().remove(&self.keys, id))
    }

    async fn delete_many(&self, ids: &[String]) -> Result<usize> {
        let mut inner = self.inner.lock().unwrap();
        Ok(ids.iter().filter(|id| inner.remove(&self.keys, id)).count())
    }

    async fn touch(&self, id: &str, at: Timestamp) -> Result<()> {
        match self.touch_many(&[(id.to_string(), at)]).await? {
            0 => Err(Error::NotFound),
            _ => Ok(()),
        }
    }

    async fn touch_many(&self, touches: &[(String, Timestamp)]) -> Result<usize> {
        let mut inner = self.inner.lock().unwrap();
        let mut n = 0;
        for (id, at) in touches {
            if !inner.records.contains_key(id) {
                continue;
            }
            n += 1;
            let s = score(*at);
            if inner.activity.scores.get(id).is_none_or(|old| *old < s) {
                inner.activity.add(id, s);
            }
        }
        Ok(n)
    }

    async fn list_expired(&self, before: Timestamp, limit: usize) -> Result<Vec<SessionRecord>> {
        let hits = self.scan(|i| &mut i.expiry, score(before), 0, limit)?;
        Ok(hits.into_iter().map(|(r, _)| r).collect())
    }

    async fn list_idle(
        &self,
        before: Timestamp,
        skip: usize,
        limit: usize,
    ) -> Result<Vec<IdleSession>> {
        let hits = self.scan(|i| &mut i.activity, score(before), skip, limit)?;
        crate::idle_sessions(hits)
    }

    async fn count(&self, scope: &Scope) -> Result<usize> {
        let inner = self.inner.lock().unwrap();
        Ok(match scope {
            Scope::All => inner.records.len(),
            other => inner
                .indexes
                .get(&self.keys.index(other))
                .map_or(0, |z| z.scores.len()),
        })
    }

    async fn list_page(&self, scope: &Scope, cursor: Option<&str>, limit: usize) -> Result<Page> {
        let cursor = cursor.map(parse_cursor).transpose()?;
        let mut inner = self.inner.lock().unwrap();
        let hits: Vec<(i64, String)> = inner
            .index_mut(&self.keys, scope)
            .after(cursor)
            .take(limit)
            .cloned()
            .collect();
        self.examined
            .fetch_add(hits.len() as u64, Ordering::Relaxed);
        let next = (hits.len() == limit)
            .then(|| hits.last().map(|(s, id)| cursor_of(*s, id)))
            .flatten();
        let mut records = Vec::with_capacity(hits.len());
        for (_, id) in hits {
            match inner.records.get(&id) {
                Some(json) => records.push(serde_json::from_str(json)?),
                None => {
                    inner.remove(&self.keys, &id);
                }
            }
        }
        Ok(Page { records, next })
    }

    async fn set_mark(
        &self,
        name: &str,
        value: &str,
        ttl: Duration,
        only_if_absent: bool,
    ) -> Result<bool> {
        let now = Instant::now();
        let mut inner = self.inner.lock().unwrap();
        if inner.marks.len() >= (2 * inner.marks_kept).max(64) {
            inner.marks.retain(|_, (_, until)| *until > now);
            inner.marks_kept = inner.marks.len();
        }
        let live = |(_, until): &(String, Instant)| *until > now;
        if only_if_absent && inner.marks.get(name).is_some_and(live) {
            return Ok(false);
        }
        inner
            .marks
            .insert(name.to_string(), (value.to_string(), now + ttl));
        Ok(true)
    }

    async fn get_marks(&self, names: &[String]) -> Result<Vec<Option<String>>> {
        let now = Instant::now();
        let inner = self.inner.lock().unwrap();
        Ok(names
            .iter()
            .map(|n| {
                inner
                    .marks
                    .get(n)
                    .filter(|(_, until)| *until > now)
                    .map(|(v, _)| v.clone())
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn expired_marks_are_pruned_as_marks_are_set() {
        let s = MemoryStore::new();
        for i in 0..1000 {
            s.set_mark(&format!("gone:old{i}"), "x", Duration::ZERO, false)
                .await
                .unwrap();
        }
        let long = Duration::from_secs(60);
        for i in 0..100 {
            s.set_mark(&format!("gone:new{i}"), "y", long, false)
                .await
                .unwrap();
        }
        let held = s.inner.lock().unwrap().marks.len();
        assert!(held < 1000, "expired marks kept: {held}");
        let names: Vec<String> = (0..100).map(|i| format!("gone:new{i}")).collect();
        let got = s.get_marks(&names).await.unwrap();
        assert!(got.iter().all(|v| v.as_deref() == Some("y")));
    }
}
