//! The local backend: each sandbox is PicoD under bubblewrap (or gVisor) on this host, with cgroup
//! limits, a seccomp filter, its own uid (when root) and nothing of the manager's environment.
//!
//! Main flow of a start ([`start`]):
//! 0. The definition is read ([`workload`]): limits as strict Kubernetes quantities
//!    ([`quantity`]), the environment and agent checked for what no process can take.
//! 1. Directories ([`layout`]): the sandbox's own (workspace, run dir) and the manager's private
//!    one; a uid from the sandbox range ([`uids`]); cgroups ([`cgroup`]).
//! 2. Launch ([`launch`]): bubblewrap reads all its options from a private file through an fd,
//!    under an empty environment, with the [`seccomp`] filters; PicoD binds its sockets in the
//!    run dir. Its stdout and stderr are a pipe drained into a bounded log ([`output`]).
//! 3. The host *moves* each socket into the private dir and checks it is a socket
//!    ([`layout::claim_socket`]); entry points are `unix:<private>/…sock`, a path the sandbox
//!    cannot see or replace. Then PicoD's `/health` ([`probe`]).
//! 4. Warm pools ([`pool`]) are queues of started sandboxes: a claim is a pop.
//! 5. Removal ([`teardown`]): kill, cgroup, directories, then the uid and memory go back.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentcube_types::BackingKind;
use nix::unistd::Pid;

use super::{Backend, BackendError, Sandbox, SandboxRequest, Workload};

pub mod cgroup;
mod config;
pub mod image;
pub mod launch;
pub mod layout;
pub mod mounts;
pub mod net;
pub mod output;
mod platform;
mod pool;
pub mod probe;
pub mod quantity;
pub mod quota;
mod retry;
pub mod rmtree;
pub mod seccomp;
mod start;
mod teardown;
mod tools;
pub mod uids;
mod workload;

use cgroup::{Cgroups, SandboxCgroup};
pub use config::{
    DEFAULT_MEMORY_BYTES, DEFAULT_WORKSPACE_BYTES, Isolation, LocalArgs, LocalConfig,
    LocalDefaults, MemoryArgs, SYSTEM_PATH, host_memory, which,
};
use layout::SandboxPaths;
pub use pool::PoolStatus;
use uids::Uids;

struct Running {
    pgid: Option<Pid>,
    /// The launcher's exit status once it has exited (set by its reaper task).
    exit: tokio::sync::watch::Receiver<Option<std::process::ExitStatus>>,
    /// The session this sandbox serves (set when it is handed out).
    session: Option<String>,
    paths: SandboxPaths,
    cgroup: Option<SandboxCgroup>,
    uid: Option<u32>,
    /// Bytes of the memory budget this sandbox holds.
    memory: u64,
    /// Its network namespace, when its definition has a network policy.
    net: Option<net::SandboxNet>,
    /// When its output is all in its log.
    drained: output::Drained,
    /// It became ready: from then on a death is GC's to reap; before, its starter's to report.
    started: bool,
}

/// A start or a removal in flight, counted until it ends (or its future is dropped).
struct Busy<'a>(&'a AtomicUsize);

impl<'a> Busy<'a> {
    fn new(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::AcqRel);
        Self(count)
    }
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// However the backend ends — a clean shutdown, or a start that failed after it was made (the
/// store lease refused, say) — its instance cgroups go with it when empty (`rmdir` refuses one
/// that still has a sandbox's).
impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(c) = &self.cgroups {
            c.remove_instance();
        }
    }
}

/// What one sandbox is given besides its definition: the Router key, its uid, its network.
struct Assigned {
    public_key: Option<String>,
    uid: Option<u32>,
    /// `nsenter` binary and network namespace, when the definition has a network policy.
    netns: Option<(PathBuf, String)>,
}

struct Inner {
    config: LocalConfig,
    tools: Tools,
    cgroups: Option<Cgroups>,
    uids: Option<Uids>,
    /// The seccomp filter files every bubblewrap sandbox loads.
    seccomp: Vec<PathBuf>,
    /// Networks for sandboxes with a policy, or why this host cannot make them.
    network: Result<net::Network, String>,
    /// The image cache (when images are pulled) and PicoD's libraries to inject with it.
    images: Option<(image::Images, Vec<PathBuf>)>,
    /// Workspace quotas (root only).
    quotas: Option<quota::Quotas>,
    /// Whether each sandbox's `sockets/` (its `/run/agentcube` and its claimed sockets) is a
    /// small tmpfs of its own ([`layout::SOCKETS_TMPFS`]; root only).
    sockets_tmpfs: bool,
    running: Mutex<HashMap<String, Running>>,
    pools: Mutex<pool::Pools>,
    /// Memory limits of the sandboxes started (or starting), against the budget.
    memory_in_use: Mutex<u64>,
    /// Sandboxes that died on their own (PicoD or the agent exited, was killed, OOM), with the
    /// session they served; reclaimed by GC, which `died` wakes at once.
    dead: Mutex<Vec<(String, Option<String>)>>,
    /// Woken when a sandbox lands in `dead`.
    died: tokio::sync::Notify,
    /// The state directory's lock ([`layout::lock_state`]), let go at shutdown.
    state_lock: Mutex<Option<std::fs::File>>,
    /// Removed sandboxes whose cgroup a process that outlived SIGKILL still holds ([`reclaim`]).
    ///
    /// [`reclaim`]: LocalBackend::reclaim
    reclaiming: AtomicUsize,
    /// Starts and removals in flight: shutdown waits for them (a pool refill may still be
    /// starting, or discarding what it started, when the manager shuts down).
    busy: AtomicUsize,
}

/// The local backend. Cheap to clone.
#[derive(Clone)]
pub struct LocalBackend {
    inner: Arc<Inner>,
}

/// The host programs sandboxes are launched with, as absolute paths.
struct Tools {
    bwrap: PathBuf,
    /// With `--isolation gvisor`.
    runsc: Option<PathBuf>,
    /// Drops to the sandbox's uid (when the manager is root).
    setpriv: PathBuf,
}

fn find_tools(config: &LocalConfig) -> Result<Tools, String> {
    let which = |name: &Path| which(name, &config.tool_path);
    let bwrap = which(&config.bwrap).ok_or_else(|| {
        "bubblewrap (`bwrap`) is not installed: install the `bubblewrap` package \
         (apt-get install bubblewrap)"
            .to_string()
    })?;
    if !config.picod.is_file() {
        return Err(format!(
            "PicoD binary not found at {} (build it with `cargo build -p agentcube-picod`, \
             or pass --picod-binary)",
            config.picod.display()
        ));
    }
    let runsc = match config.isolation {
        Isolation::Bubblewrap => None,
        Isolation::Gvisor => {
            if !nix::unistd::Uid::effective().is_root() {
                return Err("gVisor isolation needs root (runsc run)".into());
            }
            Some(which(Path::new("runsc")).ok_or(
                "gVisor (`runsc`) is not installed: install the `runsc` package (apt-get install runsc)",
            )?)
        }
    };
    let setpriv = match which(Path::new("setpriv")) {
        Some(p) => p,
        None if config.uids.is_some() => {
            return Err("`setpriv` is missing: install the `util-linux` package".into());
        }
        // Never run: sandboxes keep the manager's uid.
        None => PathBuf::from("setpriv"),
    };
    Ok(Tools {
        bwrap,
        runsc,
        setpriv,
    })
}

/// A short, stable name for the manager owning a state directory (its cgroup subtree).
fn instance_of(state: &Path) -> String {
    use sha2::{Digest, Sha256};
    let canonical = state.canonicalize().unwrap_or_else(|_| state.to_path_buf());
    Sha256::digest(canonical.as_os_str().as_encoded_bytes())[..6]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Writes the seccomp filters once, into `<state>/seccomp/`.
fn write_seccomp(state: &Path) -> Result<Vec<PathBuf>, String> {
    let dir = state.join("seccomp");
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    seccomp::bpf_programs()?
        .into_iter()
        .enumerate()
        .map(|(i, prog)| {
            let p = dir.join(format!("{i}.bpf"));
            std::fs::write(&p, prog).map_err(|e| format!("{}: {e}", p.display()))?;
            Ok(p)
        })
        .collect()
}

impl LocalBackend {
    /// Checks the host (bubblewrap present, PicoD present, cgroups) and cleans leftovers of a
    /// previous run.
    pub fn new(mut config: LocalConfig) -> Result<Self, String> {
        if let Some(dns) = config.sandbox_dns {
            net::check_resolver(dns)?;
        }
        let tools = find_tools(&config)?;
        // Resolved and checked: sandbox entry points (`unix:<state>/private/…`) are stored and
        // read by other processes, and no other user may change what is there.
        config.state_dir = layout::trusted_state_dir(&config.state_dir)?;
        // Launchers run from `/`: a relative PicoD path would name another file there.
        config.picod = config
            .picod
            .canonicalize()
            .map_err(|e| format!("{}: {e}", config.picod.display()))?;
        let state = &config.state_dir;
        let state_lock = layout::lock_state(state)?;
        let quotas = match (
            quota::Quotas::detect(state, config.disk_reserve),
            config.default_workspace_bytes,
        ) {
            (Ok(q), _) => Some(q),
            (Err(why), Some(_)) => {
                tracing::warn!(reason = %why, "sandbox workspaces are NOT size-limited");
                None
            }
            (Err(_), None) => None,
        };
        let mounts = layout::unmount_leftovers(state);
        if mounts > 0 {
            tracing::info!(
                mounts,
                "unmounted sandbox run directories left by a previous run"
            );
        }
        for d in ["sandboxes", "private"] {
            let _ = rmtree::remove_tree(&state.join(d));
        }
        layout::prepare_state(state, config.uids.is_some())
            .map_err(|e| format!("cannot prepare {}: {e}", state.display()))?;
        if config.uids.is_some() {
            check_traversable(&state.join("sandboxes"))?;
        }
        // Leftovers of a predecessor that crashed: its sandboxes died with it (bubblewrap's
        // die-with-parent, runsc's pdeathsig); its directories went above, its cgroups go here.
        let uids =
            (config.uids).map(|range| Uids::open_or_local(range, Path::new(uids::HOST_LOCK)));
        let sockets_tmpfs = uids.is_some()
            && layout::tmpfs_works(state)
                .inspect_err(|why| {
                    tracing::warn!(
                        reason = %why,
                        "sandboxes' /run/agentcube is a directory on the state directory's disk: \
                         a sandbox can write there beyond its workspace quota"
                    )
                })
                .is_ok();
        let (cgroups, held) = match Cgroups::detect(&config.cgroup_root, &instance_of(state)) {
            Ok(c) if !c.limits_cpu() && config.require_cgroups => {
                c.remove_instance();
                return Err(format!(
                    "cgroup limits cannot be enforced: {} is not given the cpu controller",
                    c.instance_dirs()[0].display()
                ));
            }
            Ok(c) => {
                if !c.limits_cpu() {
                    tracing::warn!(
                        cgroup = %c.instance_dirs()[0].display(),
                        "sandboxes' CPU limits will NOT be enforced: their cgroups are not given \
                         the cpu controller (memory and process limits are)"
                    );
                }
                let (left, held) = c.remove_leftovers();
                if left > 0 {
                    tracing::info!(
                        cgroups = left,
                        "removed sandbox cgroups left by a previous run"
                    );
                }
                (Some(c), held)
            }
            Err(why) if config.require_cgroups => {
                return Err(format!("cgroup limits cannot be enforced: {why}"));
            }
            Err(why) => {
                tracing::warn!(reason = %why, "sandboxes will run WITHOUT cgroup limits");
                (None, Vec::new())
            }
        };
        let seccomp = write_seccomp(state)?;
        let network = net::Network::detect(config.sandbox_dns);
        if let Ok(n) = &network {
            match n.resolver {
                Some(dns) => tracing::info!(%dns, "DNS server of sandboxes with a network policy"),
                None => tracing::warn!(
                    "no DNS server for sandboxes with a network policy (the host lists only \
                     local ones): set --sandbox-dns"
                ),
            }
            let left = n.remove_leftovers();
            if left > 0 {
                tracing::info!(
                    namespaces = left,
                    "removed sandbox network namespaces left by a previous run"
                );
            }
        }
        let images = match &config.images {
            None => None,
            Some(settings) => Some((
                image::Images::new(state.join("images"), settings.clone())?,
                image::shared_libraries(&config.picod)?,
            )),
        };
        let this = Self {
            inner: Arc::new(Inner {
                images,
                quotas,
                uids,
                sockets_tmpfs,
                config,
                tools,
                cgroups,
                seccomp,
                network,
                running: Mutex::new(HashMap::new()),
                pools: Mutex::new(HashMap::new()),
                memory_in_use: Mutex::new(0),
                dead: Mutex::new(Vec::new()),
                died: tokio::sync::Notify::new(),
                reclaiming: AtomicUsize::new(0),
                busy: AtomicUsize::new(0),
                state_lock: Mutex::new(Some(state_lock)),
            }),
        };
        this.keep_leftovers(held);
        Ok(this)
    }

    /// Whether cgroup limits are enforced.
    pub fn enforces_limits(&self) -> bool {
        self.inner.cgroups.is_some()
    }

    /// How many removed sandboxes (this run's, or a previous run's found at start) still have a
    /// process that outlived SIGKILL (stuck in the kernel): their cgroups are retried in the
    /// background, and by the next start on this state directory if they outlive this process.
    pub fn reclaiming(&self) -> usize {
        self.inner.reclaiming.load(Ordering::Relaxed)
    }

    /// Where sandbox sockets are handed over (`<state>/private`, the state directory resolved):
    /// the only Unix sockets a Router in front of this backend should connect to.
    /// Who this backend is to another Workload Manager sharing its store ([`crate::lease`]):
    /// its host and state directory.
    pub fn holder(&self) -> String {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        format!(
            "the local backend of host {} with state directory {}",
            host.trim(),
            self.inner.config.state_dir.display()
        )
    }

    pub fn socket_dir(&self) -> PathBuf {
        self.inner.config.state_dir.join("private")
    }

    /// Names of running sandboxes (pooled ones included).
    pub fn running(&self) -> Vec<String> {
        let mut v: Vec<_> = self.inner.running.lock().unwrap().keys().cloned().collect();
        v.sort();
        v
    }

    /// Host directories of a sandbox.
    pub fn paths(&self, name: &str) -> SandboxPaths {
        SandboxPaths::new(&self.inner.config.state_dir, name).with_tmpfs(self.inner.sockets_tmpfs)
    }

    /// The host uid a running sandbox's processes have (root manager only).
    pub fn sandbox_uid(&self, name: &str) -> Option<u32> {
        self.inner.running.lock().unwrap().get(name)?.uid
    }

    /// The cgroup directories of a running sandbox (for tests and diagnostics).
    pub fn cgroup_dirs(&self, name: &str) -> Vec<PathBuf> {
        let running = self.inner.running.lock().unwrap();
        running
            .get(name)
            .and_then(|r| r.cgroup.as_ref())
            .map(|c| c.dirs().to_vec())
            .unwrap_or_default()
    }

    /// This manager's cgroup directories, under which its sandboxes' go (for leak checks in
    /// tests: a clean shutdown removes them).
    pub fn cgroup_instance_dirs(&self) -> Vec<PathBuf> {
        let cgroups = self.inner.cgroups.as_ref();
        cgroups.map_or_else(Vec::new, |c| {
            c.instance_dirs()
                .into_iter()
                .map(Path::to_path_buf)
                .collect()
        })
    }

    /// The image cache, when images are pulled.
    pub fn images(&self) -> Option<&image::Images> {
        self.inner.images.as_ref().map(|(i, _)| i)
    }

    /// Takes `bytes` of the memory budget, or refuses naming the budget.
    fn reserve_memory(&self, bytes: u64) -> Result<u64, BackendError> {
        let mut used = self.inner.memory_in_use.lock().unwrap();
        let budget = self.inner.config.memory_budget;
        if let Some(budget) = budget.filter(|b| bytes > *b) {
            return Err(BackendError::Invalid(format!(
                "the definition's memory limit ({} MiB) is more than the whole memory budget of \
                 this host ({} MiB, --memory-budget): it can never start here",
                bytes >> 20,
                budget >> 20
            )));
        }
        if let Some(budget) = budget
            && used.saturating_add(bytes) > budget
        {
            return Err(BackendError::Exhausted(format!(
                "memory budget reached: sandboxes already hold {} MiB of memory limits and this \
                 one needs {} MiB, over the budget of {} MiB (--memory-budget)",
                *used >> 20,
                bytes >> 20,
                budget >> 20
            )));
        }
        *used = used.saturating_add(bytes);
        Ok(bytes)
    }

    fn release_memory(&self, bytes: u64) {
        let mut used = self.inner.memory_in_use.lock().unwrap();
        *used = used.saturating_sub(bytes);
    }

    /// Gives back what a sandbox held: its uid(s) and memory.
    fn release(&self, uids: &[u32], memory: u64) {
        if let Some(pool) = &self.inner.uids {
            for uid in uids {
                pool.give_back(*uid);
            }
        }
        self.release_memory(memory);
    }

    /// Marks a sandbox as serving `session_id`.
    fn assign(&self, name: &str, session_id: &str) {
        if let Some(r) = self.inner.running.lock().unwrap().get_mut(name) {
            r.session = Some(session_id.to_string());
        }
    }

    fn runsc_state(&self) -> PathBuf {
        self.inner.config.state_dir.join("runsc")
    }
}

/// A memory limit as a Kubernetes quantity when it is whole `Gi`/`Mi`, else bytes.
fn human_bytes(b: u64) -> String {
    match b {
        _ if b >= 1 << 30 && b.is_multiple_of(1 << 30) => format!("{}Gi", b >> 30),
        _ if b >= 1 << 20 && b.is_multiple_of(1 << 20) => format!("{}Mi", b >> 20),
        _ => format!("{b} bytes"),
    }
}

/// Sandboxes run as unprivileged uids, which must be able to reach their directories.
fn check_traversable(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let dir = dir
        .canonicalize()
        .map_err(|e| format!("{}: {e}", dir.display()))?;
    for a in dir.ancestors() {
        let mode = std::fs::metadata(a)
            .map_err(|e| format!("{}: {e}", a.display()))?
            .permissions()
            .mode();
        if mode & 0o001 == 0 {
            return Err(format!(
                "sandboxes run as an unprivileged user, which cannot reach {} because {} has mode \
                 {:o}: choose a --state-dir under a directory others can traverse (e.g. /var/lib)",
                dir.display(),
                a.display(),
                mode & 0o7777
            ));
        }
    }
    Ok(())
}

#[async_trait::async_trait]
impl Backend for LocalBackend {
    async fn create(&self, req: &SandboxRequest) -> Result<Sandbox, BackendError> {
        if let Workload::CodeInterpreter(ci) = &req.workload
            && ci.spec.warm_pool() > 0
        {
            let key = (req.namespace.clone(), req.workload.name().to_string());
            if let Some(sb) = self.claim(key.clone()) {
                self.assign(&sb.name, &req.session_id);
                return Ok(sb);
            }
            tracing::info!(pool = %key.1, "warm pool empty; starting a sandbox on demand");
        }
        let sb = self
            .start(&req.name, &req.workload, req.public_key.clone())
            .await?;
        self.assign(&sb.name, &req.session_id);
        Ok(sb)
    }

    async fn sandbox_exists(&self, record: &agentcube_types::SessionRecord) -> Option<bool> {
        let ours = format!("unix:{}/", self.inner.config.state_dir.display());
        record
            .entry_points()
            .iter()
            .any(|e| e.endpoint.starts_with(&ours))
            .then(|| {
                self.inner
                    .running
                    .lock()
                    .unwrap()
                    .contains_key(&record.name)
            })
    }

    fn sessions(&self) -> Vec<(String, BackingKind, String, String)> {
        self.inner
            .running
            .lock()
            .unwrap()
            .iter()
            .filter_map(|(name, r)| {
                let session = r.session.clone()?;
                Some((session, BackingKind::Sandbox, String::new(), name.clone()))
            })
            .collect()
    }

    async fn died(&self) {
        self.inner.died.notified().await
    }

    async fn reap(&self) -> Vec<(String, String)> {
        let dead = std::mem::take(&mut *self.inner.dead.lock().unwrap());
        let mut sessions = Vec::new();
        for (name, session) in dead {
            // Its log goes with it: what it last printed (why an agent died) is kept here.
            let output = self.last_output(&name, &self.paths(&name)).await;
            let why = self.why_dead(&name);
            tracing::warn!(sandbox = name, session_id = ?session, %output, why, "reclaiming a dead sandbox");
            self.remove(&name).await;
            sessions.extend(session.map(|s| (s, why)));
        }
        sessions
    }

    async fn delete(&self, _: BackingKind, _: &str, name: &str) -> Result<(), BackendError> {
        self.remove(name).await;
        Ok(())
    }

    async fn shutdown(&self) {
        self.inner.pools.lock().unwrap().clear();
        // Pool refills in flight finish into a missing pool and are removed; keep sweeping until
        // nothing is left and nothing is starting or being removed (bounded). Before, a refill
        // not yet registered as running, or one being discarded (already out of `running`, its
        // directories not yet gone), was missed and left its directories behind.
        for _ in 0..200 {
            let names: Vec<String> = self.inner.running.lock().unwrap().keys().cloned().collect();
            if names.is_empty() && self.inner.busy.load(Ordering::Acquire) == 0 {
                break;
            }
            for name in names {
                self.remove(&name).await;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if let Some(c) = &self.inner.cgroups {
            c.remove_instance();
        }
        let stuck = self.reclaiming();
        if stuck > 0 {
            tracing::warn!(
                sandboxes = stuck,
                "removed sandboxes still have a process that outlived SIGKILL; their cgroups are \
                 removed at the next start on this state directory"
            );
        }
        // Stopped: the next manager may have the directory.
        self.inner.state_lock.lock().unwrap().take();
    }
}
