//! One host uid per sandbox (when the manager runs as root), taken from a range no host account
//! uses, so sandboxes cannot read each other's files even through a shared host path, and one
//! sandbox's per-user kernel limits (inotify instances, processes, keyrings) are not another's.

use std::collections::BTreeSet;
use std::sync::Mutex;

/// Default first uid of the range (`--sandbox-uids`): far above login accounts, subordinate
/// ranges (`/etc/subuid` usually starts at 100000) and systemd's container ranges.
pub const DEFAULT_BASE: u32 = 2_000_000_000;
/// Default size of the range: more sandboxes than one host runs at once.
pub const DEFAULT_COUNT: u32 = 65_536;

/// A range of uids, parsed from `FIRST-LAST`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UidRange {
    pub first: u32,
    pub count: u32,
}

impl Default for UidRange {
    fn default() -> Self {
        Self {
            first: DEFAULT_BASE,
            count: DEFAULT_COUNT,
        }
    }
}

impl std::str::FromStr for UidRange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (a, b) = s
            .split_once('-')
            .ok_or_else(|| format!("expected FIRST-LAST, got {s:?}"))?;
        let parse = |v: &str| {
            v.trim()
                .parse::<u32>()
                .map_err(|e| format!("bad uid {v:?}: {e}"))
        };
        let (first, last) = (parse(a)?, parse(b)?);
        if first < 1000 || last < first || last == u32::MAX {
            return Err(format!(
                "uid range {s:?} must be FIRST-LAST with 1000 <= FIRST <= LAST < 4294967295"
            ));
        }
        Ok(Self {
            first,
            count: last - first + 1,
        })
    }
}

/// Hands out uids of a range, each to one sandbox at a time.
#[derive(Debug)]
pub struct Uids {
    range: UidRange,
    state: Mutex<(BTreeSet<u32>, u32)>,
}

impl Uids {
    /// An allocator over `range`.
    pub fn new(range: UidRange) -> Self {
        Self {
            range,
            state: Mutex::new((BTreeSet::new(), 0)),
        }
    }

    /// A free uid (round-robin, so a uid is not reused right after its sandbox went away), or
    /// `None` when every uid of the range is taken.
    pub fn take(&self) -> Option<u32> {
        let mut st = self.state.lock().unwrap();
        let (used, next) = &mut *st;
        for i in 0..self.range.count {
            let offset = (*next + i) % self.range.count;
            let uid = self.range.first + offset;
            if used.insert(uid) {
                *next = (offset + 1) % self.range.count;
                return Some(uid);
            }
        }
        None
    }

    /// Returns a uid to the pool.
    pub fn give_back(&self, uid: u32) {
        self.state.lock().unwrap().0.remove(&uid);
    }

    /// Takes `uid` out of the pool (when in the range): a process of a previous run still has
    /// it. True when it was in the range.
    pub fn reserve(&self, uid: u32) -> bool {
        let offset = uid.wrapping_sub(self.range.first);
        let inside = uid >= self.range.first && offset < self.range.count;
        if inside {
            self.state.lock().unwrap().0.insert(uid);
        }
        inside
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uids_are_distinct_until_given_back() {
        let u = Uids::new("3000-3002".parse().unwrap());
        let a = u.take().unwrap();
        let b = u.take().unwrap();
        let c = u.take().unwrap();
        assert_eq!(
            [a, b, c].iter().collect::<BTreeSet<_>>().len(),
            3,
            "distinct"
        );
        assert!(u.take().is_none(), "range exhausted");
        u.give_back(b);
        assert_eq!(u.take(), Some(b));
        let u = Uids::new("3000-3001".parse().unwrap());
        assert!(u.reserve(3000) && !u.reserve(2999) && !u.reserve(3002));
        assert_eq!(
            (u.take(), u.take()),
            (Some(3001), None),
            "a reserved uid is never handed out"
        );
        assert!("10-5".parse::<UidRange>().is_err());
        assert!("0-100".parse::<UidRange>().is_err(), "never root");
    }
}
