//! One host uid per sandbox (when the manager runs as root), taken from a range no host account
//! uses, so sandboxes cannot read each other's files even through a shared host path, and one
//! sandbox's per-user kernel limits (inotify instances, processes, keyrings) are not another's.
//!
//! Other managers on the host (a second `agentcube up`, a `workload-manager` beside it) draw
//! from the same default range, so a uid is also claimed host-wide: a write lock on the byte at
//! offset `uid` of one lock file ([`HOST_LOCK`]), an open-file-description lock the kernel drops
//! when the manager goes. Before, two managers each gave their first sandbox the range's first
//! uid, and one sandbox could use up the other's per-user limits (128 inotify instances here).

use std::collections::BTreeSet;
use std::fs::File;
use std::path::Path;
use std::sync::Mutex;

/// The host-wide lock file of sandbox uids (root only, like the uids themselves).
pub const HOST_LOCK: &str = "/run/agentcube/sandbox-uids.lock";

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

/// Hands out uids of a range, each to one sandbox of the host at a time.
#[derive(Debug)]
pub struct Uids {
    range: UidRange,
    /// The host-wide claims ([`HOST_LOCK`]); `None`: this manager's own only.
    lock: Option<File>,
    state: Mutex<(BTreeSet<u32>, u32)>,
}

impl Uids {
    /// An allocator over `range`, claiming its uids host-wide in the lock file `lock` (made when
    /// missing, with its directory).
    pub fn open(range: UidRange, lock: &Path) -> Result<Self, String> {
        use std::os::unix::fs::DirBuilderExt;
        let failed = |e: std::io::Error| format!("sandbox uid lock {}: {e}", lock.display());
        if let Some(dir) = lock.parent() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(dir)
                .map_err(failed)?;
        }
        let lock = super::layout::open_lock_file(lock).map_err(failed)?;
        Ok(Self::with(range, Some(lock)))
    }

    /// An allocator over `range` with these host-wide claims (`None`: none).
    fn with(range: UidRange, lock: Option<File>) -> Self {
        Self {
            range,
            lock,
            state: Mutex::new((BTreeSet::new(), 0)),
        }
    }

    /// [`open`](Self::open), or, where the lock file cannot be made (a read-only `/run`), an
    /// allocator claiming uids in this manager only, with a warning: that host then runs one
    /// manager, or gives each its own `--sandbox-uids` range.
    pub fn open_or_local(range: UidRange, lock: &Path) -> Self {
        Self::open(range, lock).unwrap_or_else(|why| {
            tracing::warn!(
                reason = %why,
                "sandbox uids are not claimed host-wide: another manager on this host with an \
                 overlapping --sandbox-uids range may run sandboxes as the same uids"
            );
            Self::with(range, None)
        })
    }

    /// A free uid (round-robin, so a uid is not reused right after its sandbox went away), or
    /// `None` when every uid of the range is taken, here or by another manager of the host.
    pub fn take(&self) -> Option<u32> {
        let mut st = self.state.lock().unwrap();
        let (used, next) = &mut *st;
        for i in 0..self.range.count {
            let offset = (*next + i) % self.range.count;
            let uid = self.range.first + offset;
            if !used.contains(&uid) && self.claim(uid, true) {
                used.insert(uid);
                *next = (offset + 1) % self.range.count;
                return Some(uid);
            }
        }
        None
    }

    /// Returns a uid to the pool.
    pub fn give_back(&self, uid: u32) {
        let mut st = self.state.lock().unwrap();
        if st.0.remove(&uid) {
            self.claim(uid, false);
        }
    }

    /// Takes `uid` out of the pool (when in the range): a process of a previous run still has
    /// it. True when it was in the range.
    pub fn reserve(&self, uid: u32) -> bool {
        let offset = uid.wrapping_sub(self.range.first);
        let inside = uid >= self.range.first && offset < self.range.count;
        if inside && self.state.lock().unwrap().0.insert(uid) {
            // Best effort: another manager may hold it (then neither hands it out).
            self.claim(uid, true);
        }
        inside
    }

    /// Locks (or unlocks) `uid`'s byte of the host lock file; false when another manager holds
    /// it. An unexpected error counts as held: a uid is never handed out unclaimed.
    fn claim(&self, uid: u32, lock: bool) -> bool {
        use nix::fcntl::{FcntlArg, fcntl};
        use nix::libc;
        let Some(file) = &self.lock else {
            return true;
        };
        let kind = if lock { libc::F_WRLCK } else { libc::F_UNLCK };
        let range = libc::flock {
            l_type: kind as libc::c_short,
            l_whence: libc::SEEK_SET as libc::c_short,
            l_start: libc::off_t::from(uid),
            l_len: 1,
            // The kernel's to fill in (open-file-description locks have no owner process).
            l_pid: 0,
        };
        match fcntl(file, FcntlArg::F_OFD_SETLK(&range)) {
            Ok(_) => true,
            Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EACCES) => false,
            Err(e) => {
                tracing::warn!(uid, error = %e, "cannot claim a sandbox uid host-wide");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uids(range: &str, lock: &Path) -> Uids {
        Uids::open(range.parse().unwrap(), lock).unwrap()
    }

    #[test]
    fn uids_are_distinct_until_given_back() {
        let dir = tempfile::tempdir().unwrap();
        let lock = dir.path().join("made/uids.lock");
        let u = uids("3000-3002", &lock);
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
        let u = uids("3000-3001", &dir.path().join("other.lock"));
        assert!(u.reserve(3000) && !u.reserve(2999) && !u.reserve(3002));
        assert_eq!(
            (u.take(), u.take()),
            (Some(3001), None),
            "a reserved uid is never handed out"
        );
        assert!("10-5".parse::<UidRange>().is_err());
        assert!("0-100".parse::<UidRange>().is_err(), "never root");
    }

    /// Two managers (each its own open of the lock file, as two processes) never hand out the
    /// same uid, whatever their ranges; one's uid given back is the other's to take.
    #[test]
    fn managers_sharing_the_lock_file_never_share_a_uid() {
        let dir = tempfile::tempdir().unwrap();
        let lock = dir.path().join("uids.lock");
        let (one, two) = (uids("3000-3003", &lock), uids("3002-3005", &lock));
        let a: Vec<_> = std::iter::from_fn(|| one.take()).collect();
        let b: Vec<_> = std::iter::from_fn(|| two.take()).collect();
        assert_eq!((a, b), (vec![3000, 3001, 3002, 3003], vec![3004, 3005]));
        one.give_back(3002);
        assert_eq!(two.take(), Some(3002), "given back host-wide");
        assert_eq!(one.take(), None);
        drop(two);
        assert_eq!(one.take(), Some(3002), "a manager's claims go with it");
    }

    /// A lock file that cannot be made (here: its directory would be below a file) leaves the
    /// manager its own claims, not a refusal to start.
    #[test]
    fn without_a_lock_file_uids_are_this_managers_own() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("file"), "").unwrap();
        let lock = dir.path().join("file/uids.lock");
        assert!(Uids::open("3000-3001".parse().unwrap(), &lock).is_err());
        let u = Uids::open_or_local("3000-3001".parse().unwrap(), &lock);
        assert_eq!(
            (u.take(), u.take(), u.take()),
            (Some(3000), Some(3001), None)
        );
        u.give_back(3000);
        assert_eq!(u.take(), Some(3000));
    }
}
