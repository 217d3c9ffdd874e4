//! cgroup limits for local sandboxes, on cgroup v1 (memory, pids, cpu controllers) and v2.
//!
//! Sandbox cgroups are `agentcube/<instance>/<sandbox>`, `<instance>` derived from the state
//! directory: a restarted manager finds (and removes) what its crashed predecessor left, and
//! never touches another manager's sandboxes. On v1 they go under this process's own cgroup. On
//! v2 a cgroup can hand controllers to its children only while it holds no process ("no internal
//! processes"), so they go under this process's own cgroup where it hands them down (a systemd
//! service with `Delegate=yes`, a container's cgroup) — this process first moving into a leaf of
//! its own there when it is alone in it — and otherwise under the hierarchy's root (a login
//! session's scope, where the shell that started the manager holds the cgroup: the case of
//! `agentcube up` on a systemd host). The launcher shell writes its own pid into every
//! `cgroup.procs` before it execs bubblewrap, so nothing in the sandbox ever runs outside its
//! limits.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Limits of one sandbox.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    pub memory_bytes: Option<u64>,
    pub pids: Option<u64>,
    /// CPU in millicores (`500m` = 500).
    pub cpu_millis: Option<u64>,
}

#[derive(Debug, Clone)]
enum Layout {
    /// One directory per controller: (controller, our agentcube dir).
    V1(Vec<(&'static str, PathBuf)>),
    /// The unified hierarchy: our agentcube dir, and whether it hands the cpu controller down.
    V2 { dir: PathBuf, cpu: bool },
}

/// Where sandbox cgroups go. `None` from [`Cgroups::detect`] means limits cannot be enforced.
#[derive(Debug, Clone)]
pub struct Cgroups {
    layout: Layout,
}

/// One sandbox's cgroup directories.
#[derive(Debug)]
pub struct SandboxCgroup {
    dirs: Vec<PathBuf>,
}

fn own_path(controller: &str) -> Option<String> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    text.lines().find_map(|l| {
        let mut parts = l.splitn(3, ':');
        let (_, ctrls, path) = (parts.next()?, parts.next()?, parts.next()?);
        if controller.is_empty() && ctrls.is_empty() {
            return Some(path.to_string());
        }
        ctrls
            .split(',')
            .any(|c| c == controller)
            .then(|| path.to_string())
    })
}

impl Cgroups {
    /// Finds a writable place for sandbox cgroups of `instance`, or the reason there is none.
    pub fn detect(root: &Path, instance: &str) -> Result<Self, String> {
        let v1_memory = root.join("memory");
        if v1_memory.join("memory.limit_in_bytes").exists()
            || own_path("memory").is_some() && v1_memory.is_dir()
        {
            let mut dirs = Vec::new();
            for ctrl in ["memory", "pids", "cpu"] {
                let own =
                    own_path(ctrl).ok_or_else(|| format!("no {ctrl} cgroup for this process"))?;
                let dir = root
                    .join(ctrl)
                    .join(own.trim_start_matches('/'))
                    .join("agentcube")
                    .join(instance);
                std::fs::create_dir_all(&dir)
                    .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
                dirs.push((ctrl, dir));
            }
            return Ok(Self {
                layout: Layout::V1(dirs),
            });
        }
        if root.join("cgroup.controllers").exists() {
            let own = own_path("").ok_or("no cgroup v2 entry for this process")?;
            let own = root.join(own.trim_start_matches('/'));
            let (dir, cpu) = v2_instance_dir(root, &own, instance).map_err(|why| {
                if nix::unistd::Uid::effective().is_root() {
                    why
                } else {
                    format!("{why}; {WITHOUT_ROOT}")
                }
            })?;
            return Ok(Self {
                layout: Layout::V2 { dir, cpu },
            });
        }
        Err(format!(
            "no cgroup v1 or v2 hierarchy at {}",
            root.display()
        ))
    }

    /// Removes every sandbox cgroup under ours, killing what is left in it: what a predecessor
    /// that crashed (no clean shutdown) left behind. Called once at start, before any sandbox
    /// exists. Returns how many directories were removed, and the sandboxes whose cgroup could
    /// not be (a process in it outlived SIGKILL), by name, with every directory of theirs left.
    pub fn remove_leftovers(&self) -> (usize, Vec<(String, SandboxCgroup)>) {
        let mut removed = 0;
        let mut held = std::collections::BTreeMap::<String, Vec<PathBuf>>::new();
        for base in self.instance_dirs() {
            let Ok(entries) = std::fs::read_dir(base) else {
                continue;
            };
            for e in entries.flatten() {
                if !e.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                let dir = e.path();
                let mut last = Ok(());
                for _ in 0..50 {
                    last = kill_and_remove(&dir);
                    if last.is_ok() {
                        removed += 1;
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                if last.is_err() {
                    let name = e.file_name().to_string_lossy().into_owned();
                    held.entry(name).or_default().push(dir);
                }
            }
        }
        let held = held
            .into_iter()
            .map(|(name, dirs)| (name, SandboxCgroup { dirs }))
            .collect();
        (removed, held)
    }

    /// This instance's directories, under which its sandboxes' cgroups go (one per controller on
    /// v1).
    pub fn instance_dirs(&self) -> Vec<&Path> {
        match &self.layout {
            Layout::V1(dirs) => dirs.iter().map(|(_, d)| d.as_path()).collect(),
            Layout::V2 { dir, .. } => vec![dir.as_path()],
        }
    }

    /// Whether sandboxes' CPU limits are enforced (v1 always; v2 where `cpu` is handed down).
    pub fn limits_cpu(&self) -> bool {
        match &self.layout {
            Layout::V1(_) => true,
            Layout::V2 { cpu, .. } => *cpu,
        }
    }

    /// Removes this instance's (empty) cgroup directories, on a clean shutdown.
    pub fn remove_instance(&self) {
        for d in self.instance_dirs() {
            let _ = std::fs::remove_dir(d);
        }
    }

    /// Creates the sandbox's cgroup(s) with its limits; on failure, removes what it made.
    pub fn create(&self, name: &str, limits: Limits) -> io::Result<SandboxCgroup> {
        let mut cg = SandboxCgroup { dirs: Vec::new() };
        let made = match &self.layout {
            Layout::V1(dirs) => dirs.iter().try_for_each(|(ctrl, base)| {
                let dir = base.join(name);
                std::fs::create_dir_all(&dir)?;
                cg.dirs.push(dir.clone());
                limit_v1(&dir, ctrl, limits)
            }),
            Layout::V2 { dir: base, cpu } => {
                let dir = base.join(name);
                std::fs::create_dir_all(&dir)?;
                cg.dirs.push(dir.clone());
                limit_v2(&dir, limits, *cpu)
            }
        };
        if let Err(e) = made {
            // Nothing has joined them yet: they are empty.
            for d in &cg.dirs {
                let _ = std::fs::remove_dir(d);
            }
            return Err(e);
        }
        Ok(cg)
    }
}

/// The controllers sandbox cgroups must get on v2: without them a sandbox can take the host's
/// memory or fill its process table.
const V2_REQUIRED: [&str; 2] = ["memory", "pids"];

/// The controller sandbox cgroups get on v2 where it is given: systemd before 252 delegates only
/// `memory` and `pids` to a user's services and scopes, so without root the `cpu` controller is
/// often not there (definitions' CPU limits then go unenforced, with a warning).
const V2_CPU: &str = "cpu";

/// The leaf a manager alone in its cgroup moves into, so that the cgroup may hand controllers to
/// its sandboxes' (v2).
const MANAGER_LEAF: &str = "agentcube-manager";

/// What a user without root can do to give sandboxes limits on a v2 host: start the manager in a
/// scope systemd delegates to them, alone in it.
const WITHOUT_ROOT: &str = "without root, start it in a cgroup systemd delegates to you: \
                            `systemd-run --user --scope -p Delegate=yes agentcube up …`";

/// This instance's v2 directory (`<base>/agentcube/<instance>`, controllers handed down to its
/// children) and whether `cpu` is among them, `base` being `own` (this process's cgroup) where it
/// can hand the controllers down, else the hierarchy's `root`.
fn v2_instance_dir(root: &Path, own: &Path, instance: &str) -> Result<(PathBuf, bool), String> {
    // Already in the leaf an earlier start in this process (or this cgroup) moved into.
    let own = match own.parent() {
        Some(parent) if own.ends_with(MANAGER_LEAF) => parent,
        _ => own,
    };
    let base = match hand_down(own) {
        Ok(_) => own,
        Err(why) if own == root => return Err(why),
        Err(why) => {
            hand_down(root).map_err(|at_root| format!("{why}; and at the root: {at_root}"))?;
            root
        }
    };
    let outer = base.join("agentcube");
    let dir = outer.join(instance);
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    match hand_down(&outer).and_then(|_| hand_down(&dir)) {
        Ok(cpu) => Ok((dir, cpu)),
        Err(why) => {
            // Empty ones only: another instance's sandboxes may be under `outer`.
            let _ = std::fs::remove_dir(&dir);
            let _ = std::fs::remove_dir(&outer);
            Err(why)
        }
    }
}

/// Makes the v2 cgroup `dir` hand the memory and pids controllers to its children, and cpu where
/// it is given; returns whether cpu is handed down. A cgroup holding processes cannot (the root
/// aside): when this process is the only one in `dir`, it moves into a leaf of its own first (and
/// back, if that does not do).
fn hand_down(dir: &Path) -> Result<bool, String> {
    let words = |file: &str| {
        let text = std::fs::read_to_string(dir.join(file)).unwrap_or_default();
        text.split_whitespace()
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    let given = words("cgroup.controllers");
    let missing: Vec<_> = V2_REQUIRED
        .iter()
        .filter(|c| !given.iter().any(|w| w == *c))
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "{} is not given the {missing:?} controllers by its parent",
            dir.display()
        ));
    }
    let cpu = given.iter().any(|w| w == V2_CPU);
    let wanted: Vec<&str> = V2_REQUIRED
        .into_iter()
        .chain(cpu.then_some(V2_CPU))
        .collect();
    let enabled = words("cgroup.subtree_control");
    if wanted.iter().all(|c| enabled.iter().any(|w| w == c)) {
        return Ok(cpu);
    }
    let line = wanted.iter().map(|c| format!("+{c}")).collect::<Vec<_>>();
    let enable = || std::fs::write(dir.join("cgroup.subtree_control"), line.join(" "));
    let busy = match enable() {
        Ok(()) => return Ok(cpu),
        Err(e) if e.raw_os_error() == Some(nix::libc::EBUSY) => e,
        Err(e) => {
            return Err(format!(
                "cannot enable controllers under {}: {e}",
                dir.display()
            ));
        }
    };
    let me = std::process::id().to_string();
    if words("cgroup.procs") != [me.clone()] {
        return Err(format!(
            "{} holds other processes than this one, so it cannot hand controllers down ({busy})",
            dir.display()
        ));
    }
    let leaf = dir.join(MANAGER_LEAF);
    let moved = std::fs::create_dir_all(&leaf)
        .and_then(|()| std::fs::write(leaf.join("cgroup.procs"), &me))
        .and_then(|()| enable());
    moved.map(|()| cpu).map_err(|e| {
        let _ = std::fs::write(dir.join("cgroup.procs"), &me);
        let _ = std::fs::remove_dir(&leaf);
        format!(
            "cannot enable controllers under {} from a leaf: {e}",
            dir.display()
        )
    })
}

/// Writes the limits of one v1 controller's cgroup.
fn limit_v1(dir: &Path, controller: &str, limits: Limits) -> io::Result<()> {
    match controller {
        "memory" => {
            if let Some(m) = limits.memory_bytes {
                std::fs::write(dir.join("memory.limit_in_bytes"), m.to_string())?;
                // Without swap accounting this file may be absent; best effort.
                let _ = std::fs::write(dir.join("memory.memsw.limit_in_bytes"), m.to_string());
            }
        }
        "pids" => {
            if let Some(p) = limits.pids {
                std::fs::write(dir.join("pids.max"), p.to_string())?;
            }
        }
        "cpu" => {
            if let Some(quota) = limits.cpu_millis.and_then(cpu_quota_us) {
                std::fs::write(dir.join("cpu.cfs_period_us"), CPU_PERIOD_US.to_string())?;
                std::fs::write(dir.join("cpu.cfs_quota_us"), quota.to_string())?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// Writes the limits of a v2 cgroup (its CPU limit only where it has the `cpu` controller).
fn limit_v2(dir: &Path, limits: Limits, cpu: bool) -> io::Result<()> {
    if let Some(m) = limits.memory_bytes {
        std::fs::write(dir.join("memory.max"), m.to_string())?;
        let _ = std::fs::write(dir.join("memory.swap.max"), "0");
    }
    if let Some(p) = limits.pids {
        std::fs::write(dir.join("pids.max"), p.to_string())?;
    }
    if let Some(quota) = limits.cpu_millis.and_then(cpu_quota_us).filter(|_| cpu) {
        std::fs::write(dir.join("cpu.max"), format!("{quota} {CPU_PERIOD_US}"))?;
    }
    Ok(())
}

/// The CFS period CPU limits are expressed in: 100 ms.
const CPU_PERIOD_US: u64 = 100_000;

/// The CFS quota per period of a CPU limit in millicores: at least 1 ms; `None` (no quota) from
/// 1024 CPUs up, more than a host has (and a quota the kernel might refuse).
fn cpu_quota_us(millis: u64) -> Option<u64> {
    (millis < 1024 * 1000).then(|| (millis * CPU_PERIOD_US / 1000).max(1000))
}

impl SandboxCgroup {
    /// The `cgroup.procs` files a process must join.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|d| d.join("cgroup.procs")).collect()
    }

    /// Kills whatever is left inside and removes the directories, waiting up to a second for
    /// each. The last failure when one is still there: `ResourceBusy` while a process the kill
    /// has not ended yet (stuck in the kernel, e.g. on a hung filesystem) keeps its cgroup, which
    /// the caller retries later.
    pub async fn remove(&self) -> io::Result<()> {
        let mut result = Ok(());
        for dir in &self.dirs {
            let last = super::retry::until_ok(|| async { kill_and_remove(dir) }).await;
            if last.is_err() {
                result = last;
            }
        }
        result
    }

    /// The uids (real, effective, saved, filesystem) of the processes still in it.
    pub fn uids(&self) -> std::collections::BTreeSet<u32> {
        self.dirs.iter().flat_map(|d| uids_in(d)).collect()
    }

    /// Directories (for leak checks in tests).
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// The file whose `oom_kill <n>` line counts OOM kills: `memory.events` (v2) or the memory
    /// controller's `memory.oom_control` (v1).
    pub fn memory_events(&self) -> Option<PathBuf> {
        self.dirs
            .iter()
            .flat_map(|d| [d.join("memory.events"), d.join("memory.oom_control")])
            .find(|p| p.is_file())
    }
}

/// Whether a failed removal ([`SandboxCgroup::remove`]) is a cgroup still held by a process in it
/// (`EBUSY`), which goes once that process ends, rather than a directory that cannot be removed.
pub fn held_by_a_process(removed: &io::Result<()>) -> bool {
    matches!(removed, Err(e) if e.kind() == io::ErrorKind::ResourceBusy)
}

/// The processes in the cgroup `dir` (its `cgroup.procs`), by pid. On v2 a process released
/// while the file is read can be listed as `0` (the kernel prints the pid of a task it found a
/// moment before, whose pid is gone by then; v1 leaves such entries out), and `kill(0, …)`
/// signals the caller's own process group: a manager tearing a fork bomb's sandbox down on v2
/// once killed itself so (it signalled each pid after `cgroup.kill` then). Only real pids come
/// out.
fn procs_in(dir: &Path) -> Vec<nix::unistd::Pid> {
    let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
    real_pids(&procs)
}

/// The positive pids of a `cgroup.procs` text.
fn real_pids(text: &str) -> Vec<nix::unistd::Pid> {
    text.lines()
        .filter_map(|l| l.trim().parse::<i32>().ok())
        .filter(|pid| *pid > 0)
        .map(nix::unistd::Pid::from_raw)
        .collect()
}

/// The uids (real, effective, saved, filesystem) of the processes in the cgroup `dir`.
fn uids_in(dir: &Path) -> std::collections::BTreeSet<u32> {
    let status = |pid: nix::unistd::Pid| std::fs::read_to_string(format!("/proc/{pid}/status"));
    procs_in(dir)
        .into_iter()
        .filter_map(|pid| status(pid).ok())
        .flat_map(|st| {
            let line = st
                .lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .unwrap_or("");
            line.split_whitespace()
                .filter_map(|u| u.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

/// One attempt: SIGKILL every process in the cgroup `dir`, then remove it. `Ok` once it is gone.
fn kill_and_remove(dir: &Path) -> io::Result<()> {
    // v2: every process of the cgroup and its descendants at once, one forking meanwhile
    // included (absent on v1 and before Linux 5.14; never created). Elsewhere each pid listed: a
    // pid read there may be gone and given to another process by the time it is signalled,
    // which `cgroup.kill` cannot get wrong.
    let killed = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("cgroup.kill"))
        .and_then(|mut f| io::Write::write_all(&mut f, b"1"));
    if killed.is_err() {
        for pid in procs_in(dir) {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        }
    }
    match std::fs::remove_dir(dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_limits_become_quotas_per_period_and_beyond_any_host_none() {
        assert_eq!(cpu_quota_us(500), Some(50_000));
        assert_eq!(cpu_quota_us(2000), Some(200_000));
        assert_eq!(cpu_quota_us(0), Some(1000), "at least 1 ms");
        assert_eq!(cpu_quota_us(1024 * 1000 - 1), Some(102_399_900));
        assert_eq!(cpu_quota_us(1024 * 1000), None);
        assert_eq!(cpu_quota_us(u64::MAX), None, "no overflow");
    }

    #[test]
    fn only_real_pids_are_read_from_cgroup_procs() {
        // `0` (a process released while the file was read) would be `kill(0)`: the manager's
        // own process group; `-1` every process it may signal.
        let pids = real_pids("0\n4242\n-1\n\n 17 \nx\n");
        assert_eq!(pids, [4242, 17].map(nix::unistd::Pid::from_raw));
    }

    #[test]
    fn only_a_busy_cgroup_counts_as_held_and_a_gone_one_is_removed() {
        // A plain directory with a file in it: `ENOTEMPTY`, a directory that cannot be removed
        // (the kernel's `EBUSY` for a cgroup with a process left is in tests/faults.rs).
        let dir = tempfile::tempdir().unwrap();
        let cg = dir.path().join("sandbox");
        std::fs::create_dir(&cg).unwrap();
        std::fs::write(cg.join("cgroup.procs"), "").unwrap();
        let failed = kill_and_remove(&cg);
        assert!(failed.is_err() && !held_by_a_process(&failed), "{failed:?}");
        assert!(held_by_a_process(&Err(io::ErrorKind::ResourceBusy.into())));
        std::fs::remove_file(cg.join("cgroup.procs")).unwrap();
        assert!(kill_and_remove(&cg).is_ok() && !cg.exists());
        assert!(kill_and_remove(&cg).is_ok(), "already gone is gone");
    }
}
