//! Plain words for endings whose bare facts confuse (issue: `exit_code: -1` and an empty stderr
//! after an out-of-memory kill; a resolver error where the sandbox simply has no network). The
//! note is appended to stderr as `[picod: …]`, like the truncation marker; exit codes stay
//! upstream's.

use std::path::PathBuf;

/// What PicoD knows about its sandbox.
#[derive(Debug, Clone, Default)]
pub struct Diagnostics {
    /// The sandbox cgroup's `memory.events` (v2) or `memory.oom_control` (v1): both have an
    /// `oom_kill <n>` line.
    pub memory_events: Option<PathBuf>,
    /// The memory limit, as the definition spells it (`512Mi`), or bytes.
    pub memory_limit: Option<String>,
    /// The sandbox has no network at all (the local backend without a network policy).
    pub no_network: bool,
    /// The workspace's size limit (its quota), as the definition spells it.
    pub workspace_limit: Option<String>,
    /// The workspace, and the other writable directories a "No space left on device" may be
    /// about (`/tmp`, `/dev/shm`: locally memory, sized below the memory limit): the note names
    /// the one that is full.
    pub workspace: Option<PathBuf>,
    pub scratch: Vec<PathBuf>,
}

/// What the filesystem holding a directory has: bytes free and in all, files (inodes) free and
/// in all; one `statvfs`.
struct Usage {
    space: (u64, u64),
    files: (u64, u64),
}

impl Usage {
    fn of(dir: &std::path::Path) -> Option<Self> {
        let st = nix::sys::statvfs::statvfs(dir).ok()?;
        let frsize = st.fragment_size();
        Some(Self {
            space: (st.blocks_available() * frsize, st.blocks() * frsize),
            files: (st.files_available(), st.files()),
        })
    }

    /// How many files the filesystem holds, when none more fits.
    fn out_of_inodes(&self) -> Option<u64> {
        let (free, all) = self.files;
        (all > 0 && free == 0).then_some(all)
    }
}

/// Whether a filesystem of `total` bytes with `free` left is what a write found full: less than
/// an eighth or 1 MiB left (ext4 keeps some blocks back for its own metadata, and a failed large
/// write leaves part of its last piece unwritten).
fn nearly_full((free, total): (u64, u64)) -> bool {
    free < (total / 8).max(1 << 20)
}

/// `12.0 MiB`.
fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1 << 20))
}

/// What a command's stderr said that deserves a note (filled while it streams).
#[derive(Debug, Default)]
pub struct Seen {
    network_error: std::sync::atomic::AtomicBool,
    disk_full: std::sync::atomic::AtomicBool,
    no_fork: std::sync::atomic::AtomicBool,
}

impl Seen {
    /// Notes the errors named in a chunk of stderr.
    pub fn scan(&self, chunk: &[u8]) {
        use std::sync::atomic::Ordering::Relaxed;
        if mentions_network_error(chunk) {
            self.network_error.store(true, Relaxed);
        }
        let text = String::from_utf8_lossy(chunk);
        if text.contains(DISK_FULL) {
            self.disk_full.store(true, Relaxed);
        }
        if mentions_failed_fork(&text) {
            self.no_fork.store(true, Relaxed);
        }
    }

    fn network_error(&self) -> bool {
        self.network_error
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    fn disk_full(&self) -> bool {
        self.disk_full.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn no_fork(&self) -> bool {
        self.no_fork.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Whether output says a process could not be started for want of processes (`EAGAIN` from
/// `fork`: dash's "Cannot fork", bash's "fork: retry: Resource temporarily unavailable",
/// Python's `BlockingIOError` in `fork_exec`).
fn mentions_failed_fork(text: &str) -> bool {
    text.contains("Cannot fork")
        || (text.contains("Resource temporarily unavailable") && text.contains("fork"))
}

/// The note for a command that could not start a process: the sandbox is at its process limit.
pub const PROCESS_LIMIT: &str = "[picod: the sandbox cannot start another process: it is at \
     its process limit, which processes that earlier commands left running in the background \
     count towards (end them all with POST /api/processes/kill-all, the SDK's \
     kill_all_processes(), or start a new session)]";

/// `ENOSPC` as libc words it.
const DISK_FULL: &str = "No space left on device";

/// Errors that, in a sandbox without network, mean exactly that.
const NETWORK_ERRORS: &[&str] = &[
    "Temporary failure in name resolution",
    "Name or service not known",
    "Network is unreachable",
    "Could not resolve host",
    "No address associated with hostname",
    "getaddrinfo failed",
];

impl Diagnostics {
    /// Finds the cgroup files of the sandbox PicoD runs in (a pod's cgroup namespace shows its
    /// own cgroup at `/sys/fs/cgroup`), unless given.
    pub fn detect(mut self) -> Self {
        if self.memory_events.is_none() {
            self.memory_events = [
                "/sys/fs/cgroup/memory.events",
                "/sys/fs/cgroup/memory/memory.oom_control",
            ]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.is_file());
        }
        if self.memory_limit.is_none() {
            self.memory_limit = std::fs::read_to_string("/sys/fs/cgroup/memory.max")
                .ok()
                .map(|s| s.trim().to_string())
                .filter(|s| s != "max" && !s.is_empty());
        }
        self
    }

    /// OOM kills so far in the sandbox's cgroup.
    pub fn oom_kills(&self) -> Option<u64> {
        let text = std::fs::read_to_string(self.memory_events.as_ref()?).ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix("oom_kill "))
            .and_then(|n| n.trim().parse().ok())
    }

    /// The note for a command that ended by `signal` (or exited non-zero, `failed`), with the
    /// OOM count from before it started and what its stderr said.
    pub fn explain(
        &self,
        oom_before: Option<u64>,
        signal: Option<i32>,
        failed: bool,
        seen: &Seen,
    ) -> Option<String> {
        if signal == Some(9) {
            let oom = matches!((oom_before, self.oom_kills()), (Some(a), Some(b)) if b > a);
            if oom {
                let limit = self.memory_limit.as_deref().unwrap_or("unknown");
                return Some(format!(
                    "[picod: killed by the out-of-memory killer: the sandbox reached its memory \
                     limit ({limit})]"
                ));
            }
            return Some("[picod: killed by signal 9 (SIGKILL)]".into());
        }
        if let Some(sig) = signal {
            return Some(format!("[picod: killed by signal {sig}]"));
        }
        if failed && seen.network_error() && self.no_network {
            return Some(
                "[picod: this sandbox has no network; its definition can allow some with \
                 spec.networkPolicy]"
                    .into(),
            );
        }
        if seen.disk_full() {
            return Some(self.disk_full());
        }
        if failed && seen.no_fork() {
            return Some(PROCESS_LIMIT.into());
        }
        None
    }

    /// Which filesystem is full: the workspace (its quota), unless it has room and `/tmp` or
    /// `/dev/shm` has none; when none is full any more (the writer removed its file), what each
    /// has free.
    fn disk_full(&self) -> String {
        let workspace = self.workspace.as_deref().and_then(Usage::of);
        if let Some(files) = workspace.as_ref().and_then(Usage::out_of_inodes) {
            return format!(
                "[picod: the workspace holds no more files: {files} files and directories at \
                 most, whatever their size]"
            );
        }
        let scratch: Vec<(&std::path::Path, (u64, u64))> = self
            .scratch
            .iter()
            .filter_map(|d| Some((d.as_path(), Usage::of(d)?.space)))
            .collect();
        self.disk_full_note(workspace.map(|w| w.space), &scratch)
    }

    /// [`Self::disk_full`] given the `(free, total)` bytes of the workspace and the others.
    fn disk_full_note(
        &self,
        workspace: Option<(u64, u64)>,
        scratch: &[(&std::path::Path, (u64, u64))],
    ) -> String {
        let Some((ws_free, _)) = workspace.filter(|w| !nearly_full(*w)) else {
            return self.workspace_full();
        };
        if let Some((dir, (_, total))) = scratch.iter().find(|(_, space)| nearly_full(*space)) {
            return format!(
                "[picod: {} is full: it holds {} at most; the workspace has {} free]",
                dir.display(),
                mib(*total),
                mib(ws_free)
            );
        }
        let others: Vec<String> = scratch
            .iter()
            .map(|(d, (free, total))| format!("{} {} of {}", d.display(), mib(*free), mib(*total)))
            .collect();
        format!(
            "[picod: a filesystem was full; free now: the workspace {}, {}]",
            mib(ws_free),
            others.join(", ")
        )
    }

    /// What a full workspace means, with its quota when known.
    pub fn workspace_full(&self) -> String {
        match &self.workspace_limit {
            Some(limit) => format!(
                "[picod: the workspace is full: its quota is {limit} (the definition's \
                 resources.limits.ephemeral-storage)]"
            ),
            None => "[picod: no space left on the device holding the workspace]".into(),
        }
    }

    /// An I/O error of the workspace as an API error: a full workspace is `507` with the quota.
    pub fn io_error(&self, e: std::io::Error) -> crate::error::ApiError {
        if e.kind() == std::io::ErrorKind::StorageFull {
            let note = self.workspace_full();
            crate::error::ApiError::InsufficientStorage(
                note.trim_start_matches("[picod: ")
                    .trim_end_matches(']')
                    .to_string(),
            )
        } else {
            crate::error::ApiError::internal(e)
        }
    }
}

/// Whether output names a network error (see [`NETWORK_ERRORS`]).
pub fn mentions_network_error(text: &[u8]) -> bool {
    let text = String::from_utf8_lossy(text);
    NETWORK_ERRORS.iter().any(|e| text.contains(e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endings_are_explained() {
        let dir = tempfile::tempdir().unwrap();
        let events = dir.path().join("memory.events");
        std::fs::write(&events, "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n").unwrap();
        let d = Diagnostics {
            memory_events: Some(events.clone()),
            memory_limit: Some("64Mi".into()),
            no_network: true,
            workspace_limit: Some("100Mi".into()),
            ..Default::default()
        };
        let nothing = Seen::default();
        let network = Seen::default();
        network.scan(b"curl: (6) Could not resolve host: pypi.org");
        let full = Seen::default();
        full.scan(b"dd: error writing 'big': No space left on device");
        for forked in [
            &b"sh: 1: Cannot fork"[..],
            b"bash: fork: retry: Resource temporarily unavailable",
            b"  File \"/usr/lib/python3.11/subprocess.py\", line 1901, in _execute_child\n    self.pid = _fork_exec(\nBlockingIOError: [Errno 11] Resource temporarily unavailable",
        ] {
            let no_fork = Seen::default();
            no_fork.scan(forked);
            assert_eq!(d.explain(None, None, true, &no_fork).as_deref(), Some(PROCESS_LIMIT));
            assert_eq!(d.explain(None, None, false, &no_fork), None, "only when it failed");
        }
        let busy = Seen::default();
        busy.scan(b"BlockingIOError: [Errno 11] Resource temporarily unavailable (a socket)");
        assert_eq!(
            d.explain(None, None, true, &busy),
            None,
            "EAGAIN of a socket"
        );
        assert_eq!(d.oom_kills(), Some(1));
        assert_eq!(
            d.explain(Some(1), Some(9), false, &nothing).unwrap(),
            "[picod: killed by signal 9 (SIGKILL)]"
        );
        std::fs::write(&events, "oom 2\noom_kill 2\n").unwrap();
        let oom = d.explain(Some(1), Some(9), false, &nothing).unwrap();
        assert!(
            oom.contains("out-of-memory") && oom.contains("(64Mi)"),
            "{oom}"
        );
        assert_eq!(
            d.explain(None, Some(15), false, &nothing).unwrap(),
            "[picod: killed by signal 15]"
        );
        assert!(
            d.explain(None, None, true, &network)
                .unwrap()
                .contains("spec.networkPolicy")
        );
        assert_eq!(d.explain(None, None, true, &nothing), None);
        let note = d.explain(None, None, true, &full).unwrap();
        assert!(
            note.contains("workspace is full") && note.contains("100Mi"),
            "{note}"
        );
        // Which filesystem a "No space left on device" was about: the workspace when it is
        // (nearly) full or unknown, else a full scratch directory, else what each has free.
        let (tmp, shm) = (
            std::path::Path::new("/tmp"),
            std::path::Path::new("/dev/shm"),
        );
        const MIB: u64 = 1 << 20;
        let roomy = Some((900 * MIB, 1000 * MIB));
        assert!(d.disk_full_note(None, &[]).contains("workspace is full"));
        assert!(
            d.disk_full_note(Some((MIB, 1000 * MIB)), &[(tmp, (0, 32 * MIB))])
                .contains("workspace is full: its quota is 100Mi")
        );
        assert_eq!(
            d.disk_full_note(roomy, &[(tmp, (10 * MIB, 512 * MIB)), (shm, (0, 64 * MIB))]),
            "[picod: /tmp is full: it holds 512.0 MiB at most; the workspace has 900.0 MiB free]"
        );
        assert_eq!(
            d.disk_full_note(
                roomy,
                &[(tmp, (500 * MIB, 512 * MIB)), (shm, (0, 64 * MIB))]
            ),
            "[picod: /dev/shm is full: it holds 64.0 MiB at most; the workspace has 900.0 MiB free]"
        );
        assert_eq!(
            d.disk_full_note(roomy, &[(tmp, (500 * MIB, 512 * MIB))]),
            "[picod: a filesystem was full; free now: the workspace 900.0 MiB, /tmp 500.0 MiB of 512.0 MiB]"
        );
        let networked = Diagnostics {
            no_network: false,
            ..d
        };
        assert_eq!(networked.explain(None, None, true, &network), None);
        assert!(mentions_network_error(
            b"socket.gaierror: [Errno -3] Temporary failure in name resolution"
        ));
        assert!(!mentions_network_error(b"ModuleNotFoundError"));
    }
}
