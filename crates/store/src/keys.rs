//! Key layout and session-id rules, in one place.
//!
//! Upstream's indexes share the `session:` prefix with records, so a session id `expiry` or
//! `last_activity` would overwrite an index. Such ids are refused here (upstream ids are UUIDs, so
//! nothing legitimate is lost).

use crate::Error;

/// Upstream's prefix for records and indexes.
pub const DEFAULT_PREFIX: &str = "session:";
/// Suffix of the expiry index.
pub const EXPIRY: &str = "expiry";
/// Suffix of the last-activity index.
pub const LAST_ACTIVITY: &str = "last_activity";
/// Longest id accepted.
pub const MAX_ID_LEN: usize = 256;
/// Prefix (after the store prefix) of the secondary indexes and marks (extension: upstream has
/// none).
pub const INDEX: &str = "idx:";

/// Key names under one prefix.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
    expiry: String,
    last_activity: String,
}

impl Keys {
    /// Keys under `prefix` (upstream: `session:`).
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_string(),
            expiry: format!("{prefix}{EXPIRY}"),
            last_activity: format!("{prefix}{LAST_ACTIVITY}"),
        }
    }

    /// `session:<id>`.
    pub fn record(&self, id: &str) -> String {
        format!("{}{id}", self.prefix)
    }

    /// `session:expiry`.
    pub fn expiry(&self) -> &str {
        &self.expiry
    }

    /// `session:last_activity`.
    pub fn last_activity(&self) -> &str {
        &self.last_activity
    }

    /// `session:idx:mark:<name>`: a mark ([`crate::SessionStore::set_mark`]).
    pub fn mark(&self, name: &str) -> String {
        format!("{}{INDEX}mark:{name}", self.prefix)
    }

    /// The prefix itself.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The index of a scope: the expiry index for everything, else a ZSET
    /// `session:idx:<dimension>:<value>` scored by creation time. The Redis delete script
    /// spells these names too (from the record's fields); keep them in step.
    pub fn index(&self, scope: &crate::Scope) -> String {
        use crate::Scope;
        let p = &self.prefix;
        match scope {
            Scope::All => self.expiry.clone(),
            Scope::Namespace(ns) => format!("{p}{INDEX}ns:{ns}"),
            Scope::Kind(k) => format!("{p}{INDEX}kind:{k}"),
            Scope::Creator(c) => format!("{p}{INDEX}creator:{c}"),
            Scope::KindCreator(k, c) => format!("{p}{INDEX}kind-creator:{k}:{c}"),
            Scope::Owner(o) => format!("{p}{INDEX}owner:{o}"),
        }
    }
}

impl Default for Keys {
    fn default() -> Self {
        Self::new(DEFAULT_PREFIX)
    }
}

/// Refuses ids the key schema cannot hold.
pub fn check_id(id: &str) -> Result<(), Error> {
    let bad = |why: &str| Err(Error::InvalidId(format!("{id:?}: {why}")));
    if id.is_empty() {
        return bad("empty");
    }
    if id.len() > MAX_ID_LEN {
        return bad("longer than 256 bytes");
    }
    if id == EXPIRY || id == LAST_ACTIVITY || id.starts_with(INDEX) {
        return bad("clashes with an index key");
    }
    if id.chars().any(char::is_control) {
        return bad("contains control characters");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_upstream() {
        let k = Keys::default();
        assert_eq!(k.record("abc"), "session:abc");
        assert_eq!(k.expiry(), "session:expiry");
        assert_eq!(k.last_activity(), "session:last_activity");
    }

    #[test]
    fn index_names_and_junk_are_not_ids() {
        for id in [
            "",
            "expiry",
            "last_activity",
            "idx:ns:default",
            "a\nb",
            &"x".repeat(257),
        ] {
            assert!(check_id(id).is_err(), "{id:?}");
        }
        assert!(check_id("0b6f3c1e-2d4a-4b7e-9f00-123456789abc").is_ok());
        assert!(check_id("expiry2").is_ok());
    }
}
