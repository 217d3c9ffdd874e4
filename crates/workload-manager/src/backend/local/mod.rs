//! The local backend: each sandbox is PicoD under bubblewrap (or gVisor) on this host, with cgroup
//! limits, a seccomp filter, its own uid (when root) and nothing of the manager's environment.
//!
//! Main flow of a start ([`LocalBackend::start`]):
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
use std::process::Stdio;
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
pub mod net;
pub mod output;
mod platform;
mod pool;
pub mod probe;
pub mod quantity;
pub mod quota;
mod retry;
pub mod seccomp;
mod teardown;
mod tools;
pub mod uids;
mod workload;

use cgroup::{Cgroups, SandboxCgroup};
pub use config::{
    DEFAULT_MEMORY_BYTES, DEFAULT_WORKSPACE_BYTES, Isolation, LocalConfig, MemoryArgs, SYSTEM_PATH,
    host_memory, which,
};
use launch::LaunchSpec;
use layout::{PICOD_SOCKET, SandboxPaths};
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
        let quotas = match (quota::Quotas::detect(state), config.default_workspace_bytes) {
            (Ok(q), _) => Some(q),
            (Err(why), Some(_)) => {
                tracing::warn!(reason = %why, "sandbox workspaces are NOT size-limited");
                None
            }
            (Err(_), None) => None,
        };
        for d in ["sandboxes", "private"] {
            let _ = layout::remove_tree(&state.join(d));
        }
        layout::prepare_state(state, config.uids.is_some())
            .map_err(|e| format!("cannot prepare {}: {e}", state.display()))?;
        if config.uids.is_some() {
            check_traversable(&state.join("sandboxes"))?;
        }
        // Leftovers of a predecessor that crashed: its sandboxes died with it (bubblewrap's
        // die-with-parent, runsc's pdeathsig); its directories went above, its cgroups go here.
        let uids = config.uids.map(Uids::new);
        let (cgroups, held) = match Cgroups::detect(&config.cgroup_root, &instance_of(state)) {
            Ok(c) => {
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
        SandboxPaths::new(&self.inner.config.state_dir, name)
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

    async fn start(
        &self,
        name: &str,
        workload: &Workload,
        public_key: Option<String>,
    ) -> Result<Sandbox, BackendError> {
        let _busy = Busy::new(&self.inner.busy);
        let result = self.try_start(name, workload, public_key).await;
        if result.is_err() {
            self.remove(name).await;
        }
        result
    }

    #[tracing::instrument(name = "start_sandbox", skip_all, fields(sandbox = name, definition = workload.name()))]
    async fn try_start(
        &self,
        name: &str,
        workload: &Workload,
        public_key: Option<String>,
    ) -> Result<Sandbox, BackendError> {
        if !layout::is_sandbox_name(name) {
            return Err(BackendError::Invalid(format!(
                "{name:?} cannot name a sandbox on this host: lowercase letters, digits, '-' \
                 and '.' only, at most 245 characters (the definition's name is too long or \
                 not an RFC 1123 subdomain)"
            )));
        }
        let cfg = &self.inner.config;
        let paths = self.paths(name);
        let mut sizes = workload::sizes_of(workload, cfg.default_pids_limit)?;
        let image = self.image(workload).await?;
        let desc = workload::describe(workload, &paths, name, image.as_deref())?;
        let public_key = if workload.needs_key() {
            Some(public_key.ok_or_else(|| {
                BackendError::Failed(
                    "authMode picod needs the Router's public key, and none is configured".into(),
                )
            })?)
        } else {
            None
        };
        let limits = &mut sizes.limits;
        limits.memory_bytes = limits.memory_bytes.or(cfg.default_memory_bytes);
        let memory = self.reserve_memory(limits.memory_bytes.unwrap_or(0))?;
        let uid = match &self.inner.uids {
            Some(u) => match u.take() {
                Some(uid) => Some(uid),
                None => {
                    self.release_memory(memory);
                    return Err(BackendError::Exhausted(
                        "every sandbox uid of the range is in use (--sandbox-uids)".into(),
                    ));
                }
            },
            None => None,
        };
        let net = match &desc.network {
            None => None,
            Some(policy) => match self.attach_network(name, policy).await {
                Ok(n) => Some(n),
                Err(e) => {
                    self.release(uid.as_slice(), memory);
                    return Err(e);
                }
            },
        };
        let netns = net.as_ref().map(|n| (self.network_tool(), n.netns.clone()));
        let given = Assigned {
            public_key,
            uid,
            netns,
        };
        let running = match self.launch(name, &paths, &desc, sizes, given).await {
            Ok(r) => Running { memory, net, ..r },
            Err(e) => {
                if let (Ok(network), Some(n)) = (&self.inner.network, &net) {
                    network.detach(n).await;
                }
                self.release(uid.as_slice(), memory);
                return Err(e);
            }
        };
        self.inner
            .running
            .lock()
            .unwrap()
            .insert(name.to_string(), running);
        // An agent is ready once its ports listen; a code interpreter once PicoD answers (its
        // extra ports are for servers its users start later).
        let ports_too = !desc.agent.is_empty();
        self.wait_ready(name, &paths, &desc.sockets, ports_too)
            .await?;
        self.mark_started(name)?;
        Ok(Sandbox {
            kind: BackingKind::Sandbox,
            id: uuid::Uuid::new_v4().to_string(),
            name: name.to_string(),
            entry_points: desc.entry_points,
            identity: name.to_string(),
        })
    }

    /// The definition's image, pulled if needed; `None` in host mode.
    async fn image(&self, workload: &Workload) -> Result<Option<Arc<image::Image>>, BackendError> {
        match (workload::image_of(workload), &self.inner.images) {
            (Some(reference), Some((images, _))) => {
                let policy = workload::pull_policy_of(workload);
                Ok(Some(images.get(reference, policy).await?))
            }
            _ => Ok(None),
        }
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

    /// A network namespace limited to `policy`, or why this host cannot make one.
    async fn attach_network(
        &self,
        name: &str,
        policy: &agentcube_crds::NetworkPolicySpec,
    ) -> Result<net::SandboxNet, BackendError> {
        match &self.inner.network {
            Ok(n) => n.attach(name, policy).await,
            Err(why) => Err(BackendError::Invalid(format!(
                "this definition sets spec.networkPolicy, which this host cannot enforce: {why}; \
                 without a policy its sandboxes have no network at all"
            ))),
        }
    }

    /// The `nsenter` binary (only called with a network, so detection succeeded).
    fn network_tool(&self) -> PathBuf {
        self.inner
            .network
            .as_ref()
            .map(|n| n.nsenter_binary().to_path_buf())
            .unwrap_or_else(|_| PathBuf::from("nsenter"))
    }

    /// Directories, cgroups, launcher inputs, and the launcher process itself.
    async fn launch(
        &self,
        name: &str,
        paths: &SandboxPaths,
        desc: &workload::Description,
        sizes: workload::Sizes,
        given: Assigned,
    ) -> Result<Running, BackendError> {
        let Assigned {
            public_key,
            uid,
            netns,
        } = given;
        let cfg = &self.inner.config;
        let fail = |what: &str, e: std::io::Error| BackendError::Failed(format!("{what}: {e}"));
        paths
            .create(uid)
            .map_err(|e| fail("cannot create sandbox directories", e))?;
        let limits = sizes.limits;
        let workspace = sizes
            .workspace_bytes
            .or(cfg.default_workspace_bytes)
            .filter(|_| self.inner.quotas.is_some());
        let workspace_fs = match (&self.inner.quotas, workspace) {
            (Some(q), Some(bytes)) => Some(q.prepare(paths, bytes, uid).await?),
            _ => None,
        };
        let cgroup = match &self.inner.cgroups {
            Some(c) => Some(
                c.create(name, limits)
                    .map_err(|e| fail("cannot create cgroup", e))?,
            ),
            None => None,
        };
        let memory = match (&cgroup, limits.memory_bytes) {
            (Some(cg), Some(bytes)) => cg.memory_events().map(|f| (f, human_bytes(bytes))),
            _ => None,
        };
        let spec = LaunchSpec {
            memory,
            paths: paths.clone(),
            picod: cfg.picod.clone(),
            public_key,
            sandbox_name: name.to_string(),
            env: desc.env.clone(),
            forward_ports: desc.forward_ports.clone(),
            agent: desc.agent.clone(),
            uid,
            cgroup_procs: cgroup
                .as_ref()
                .map(SandboxCgroup::procs_files)
                .unwrap_or_default(),
            seccomp: self.inner.seccomp.clone(),
            netns,
            image: desc.rootfs.clone().map(|rootfs| launch::ImageRoot {
                rootfs,
                libs: self
                    .inner
                    .images
                    .as_ref()
                    .map(|(_, libs)| libs.clone())
                    .unwrap_or_default(),
            }),
            agent_dir: desc.agent_dir.clone(),
            workspace_limit: workspace.map(human_bytes),
            workspace_fs,
            tmpfs: launch::TmpfsSizes::for_limit(limits.memory_bytes),
        };
        let (mut child, drained) = match self.spawn_launcher(&spec, name, paths) {
            Ok(started) => started,
            Err(e) => {
                // No sandbox record holds the cgroup yet: removed here (empty, nothing joined).
                if let Some(cg) = &cgroup {
                    let _ = cg.remove().await;
                }
                return Err(e);
            }
        };
        let pgid = child.id().map(|id| Pid::from_raw(id as i32));
        let (exit_tx, exit) = tokio::sync::watch::channel(None);
        let (this, name) = (self.clone(), name.to_string());
        tokio::spawn(async move {
            let status = child.wait().await.ok();
            let _ = exit_tx.send(status);
            this.on_exit(&name, status);
        });
        Ok(Running {
            pgid,
            exit,
            session: None,
            paths: paths.clone(),
            cgroup,
            uid,
            memory: 0,
            net: None,
            drained,
            started: false,
        })
    }

    /// Starts the sandbox's launcher, its output going through a pipe to the sandbox's log
    /// ([`output`]).
    fn spawn_launcher(
        &self,
        spec: &LaunchSpec,
        name: &str,
        paths: &SandboxPaths,
    ) -> Result<(tokio::process::Child, output::Drained), BackendError> {
        let fail = |what: &str, e: std::io::Error| BackendError::Failed(format!("{what}: {e}"));
        let argv = self.launcher(spec, name).map_err(|e| fail("launcher", e))?;
        let (out, drained) =
            output::start(paths.log(), output::Limits::default()).map_err(|e| fail("log", e))?;
        let child = tokio::process::Command::new(&argv[0])
            .args(&argv[1..])
            .env_clear()
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(out.stdout)
            .stderr(out.stderr)
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| fail("cannot start the sandbox launcher", e))?;
        Ok((child, drained))
    }

    /// Writes the launcher's inputs into the private directory and returns its argv.
    fn launcher(&self, spec: &LaunchSpec, name: &str) -> std::io::Result<Vec<String>> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        match &self.inner.tools.runsc {
            None => {
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(launch::args_file(&spec.paths))?;
                f.write_all(&launch::args_file_content(spec)?)?;
                Ok(launch::launcher_argv(
                    spec,
                    &self.inner.tools.bwrap,
                    &self.inner.tools.setpriv,
                ))
            }
            Some(runsc) => {
                let bundle = spec.paths.private.join("bundle");
                launch::write_oci_bundle(&bundle, spec)?;
                Ok(launch::runsc_argv(
                    runsc,
                    &self.inner.tools.setpriv,
                    &self.runsc_state(),
                    &bundle,
                    name,
                    spec,
                ))
            }
        }
    }

    /// Waits until PicoD has bound every socket (each then moved out of the sandbox's reach) and
    /// answers `/health`, or the sandbox exits, or the timeout passes.
    async fn wait_ready(
        &self,
        name: &str,
        paths: &SandboxPaths,
        sockets: &[String],
        ports_too: bool,
    ) -> Result<(), BackendError> {
        let deadline = tokio::time::Instant::now() + self.inner.config.ready_timeout;
        let mut delay = Duration::from_millis(2);
        let mut claimed = 0;
        let mut missing = String::new();
        while tokio::time::Instant::now() < deadline {
            while claimed < sockets.len() {
                match layout::claim_socket(paths, &sockets[claimed]) {
                    Ok(true) => claimed += 1,
                    Ok(false) => break,
                    Err(e) => return Err(BackendError::Failed(format!("sandbox {name}: {e}"))),
                }
            }
            if let Some(socket) = sockets.get(claimed) {
                missing = format!("PicoD has not bound {socket}");
            } else {
                match probe::not_ready(&paths.socket(PICOD_SOCKET), ports_too).await {
                    None => return Ok(()),
                    Some(why) => missing = why,
                }
            }
            if let Some(status) = self.exited(name)? {
                if let Some(limit) = self.killed_for_memory(name) {
                    return Err(BackendError::Invalid(format!(
                        "the sandbox was killed by its memory limit ({limit}) while starting: \
                         raise resources.limits.memory"
                    )));
                }
                return Err(BackendError::Exited {
                    message: format!("sandbox {name} exited while starting ({status})"),
                    log: self.last_output(name, paths).await,
                });
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(50));
        }
        Err(BackendError::NotReady(format!(
            "sandbox {name} not ready within {:?}: {missing}",
            self.inner.config.ready_timeout
        )))
    }

    /// Why a sandbox that died on its own ended, for its session's next user.
    fn why_dead(&self, name: &str) -> String {
        use std::os::unix::process::ExitStatusExt;
        let status = self.exited(name).ok().flatten();
        // The launcher (bubblewrap, runsc) passes its program's death by a signal on as 128 + it.
        let signal = status.and_then(|s| {
            s.signal()
                .or(s.code().filter(|c| *c > 128).map(|c| c - 128))
        });
        let exited = match (signal, status.and_then(|s| s.code())) {
            (Some(n), _) => match nix::sys::signal::Signal::try_from(n) {
                Ok(sig) => format!("its sandbox was killed by signal {n} ({sig})"),
                Err(_) => format!("its sandbox was killed by signal {n}"),
            },
            (None, Some(code)) => format!("its sandbox exited with status {code}"),
            (None, None) => "its sandbox exited".to_string(),
        };
        match self.killed_for_memory(name) {
            Some(limit) => format!("{exited} after reaching its memory limit ({limit})"),
            None => exited,
        }
    }

    /// The sandbox's memory limit when the kernel killed one of its processes for memory (the
    /// `oom_kill` count of its cgroup).
    fn killed_for_memory(&self, name: &str) -> Option<String> {
        let running = self.inner.running.lock().unwrap();
        let r = running.get(name)?;
        let events = std::fs::read_to_string(r.cgroup.as_ref()?.memory_events()?).ok()?;
        let kills: u64 = events
            .lines()
            .find_map(|l| l.strip_prefix("oom_kill "))?
            .trim()
            .parse()
            .ok()?;
        (kills > 0).then(|| human_bytes(r.memory))
    }

    /// The last lines the sandbox printed (its agent's, PicoD's), joined with ` | `, once its
    /// output is all in its log (waited for at most 1 s): for the manager's log, never a client.
    async fn last_output(&self, name: &str, paths: &SandboxPaths) -> String {
        if let Some(drained) = self.drained(name) {
            drained.wait(Duration::from_secs(1)).await;
        }
        // Up to 2 MiB: read off the runtime's threads.
        let log = tokio::fs::read_to_string(paths.log())
            .await
            .unwrap_or_default();
        let mut tail: Vec<&str> = log.lines().rev().take(5).collect();
        tail.reverse();
        tail.join(" | ")
    }

    /// When the sandbox's output is all in its log.
    fn drained(&self, name: &str) -> Option<output::Drained> {
        let running = self.inner.running.lock().unwrap();
        running.get(name).map(|r| r.drained.clone())
    }

    /// The launcher's exit status if it has exited.
    fn exited(&self, name: &str) -> Result<Option<std::process::ExitStatus>, BackendError> {
        let running = self.inner.running.lock().unwrap();
        match running.get(name) {
            Some(r) => Ok(*r.exit.borrow()),
            None => Err(BackendError::NotReady(format!("{name} (removed)"))),
        }
    }

    /// Hands a ready sandbox's later death to GC, unless it has died already (then its start
    /// fails, and the starter removes it). Under the same lock as [`LocalBackend::on_exit`]'s
    /// check, so a death is always either the starter's or GC's.
    fn mark_started(&self, name: &str) -> Result<(), BackendError> {
        let mut running = self.inner.running.lock().unwrap();
        match running.get_mut(name) {
            Some(r) if r.exit.borrow().is_none() => {
                r.started = true;
                Ok(())
            }
            _ => Err(BackendError::Failed(format!(
                "sandbox {name} exited as it became ready"
            ))),
        }
    }

    /// A launcher exited. Still registered means nobody removed it: the sandbox died on its own
    /// (PicoD or the agent exited, was killed, hit its memory limit). It is taken out of its warm
    /// pool at once and reclaimed (with its session) by GC at once. One still starting is left to
    /// its starter, which reports the exit (reaping it under the starter turned its "exited
    /// while starting" into a timeout).
    fn on_exit(&self, name: &str, status: Option<std::process::ExitStatus>) {
        let session = match self.inner.running.lock().unwrap().get(name) {
            Some(r) if r.started => r.session.clone(),
            _ => return,
        };
        tracing::warn!(sandbox = name, session_id = ?session, ?status, "sandbox died");
        self.drop_from_pools(name);
        self.inner
            .dead
            .lock()
            .unwrap()
            .push((name.to_string(), session));
        self.inner.died.notify_one();
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
