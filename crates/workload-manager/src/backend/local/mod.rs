//! The local backend: each sandbox is PicoD under bubblewrap on this host, with cgroup limits.
//!
//! Layout on the host: `<state_dir>/sandboxes/<name>/{ws,run,sandbox.log}`. `ws` is the sandbox's
//! `/root` (its workspace); `run` holds `picod.sock` and, for AgentRuntimes, `port-<N>.sock`
//! forwarded by PicoD to the agent's port inside the sandbox's own network namespace. Entry points
//! are `unix:<run>/…sock`. Warm pools are queues of started sandboxes: a claim is a pop.

use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentcube_crds::CodeInterpreter;
use agentcube_types::{BackingKind, EntryPoint};
use k8s_openapi::api::core::v1::ResourceRequirements;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

use super::{Backend, BackendError, Sandbox, SandboxRequest, Workload, entry_point};

pub mod cgroup;
pub mod launch;
pub mod probe;

use cgroup::{Cgroups, Limits, SandboxCgroup};
use launch::{LaunchSpec, PICOD_SOCKET, launcher_argv, port_socket};

/// How local sandboxes are isolated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Isolation {
    /// bubblewrap: Linux namespaces, no capabilities, read-only host system (the default).
    #[default]
    Bubblewrap,
    /// gVisor `runsc`: the same layout, behind a user-space kernel (stronger; needs root).
    Gvisor,
}

impl std::str::FromStr for Isolation {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "bubblewrap" | "bwrap" => Ok(Self::Bubblewrap),
            "gvisor" | "runsc" => Ok(Self::Gvisor),
            other => Err(format!(
                "unknown isolation {other:?} (bubblewrap or gvisor)"
            )),
        }
    }
}

/// Local backend settings.
#[derive(Debug, Clone)]
pub struct LocalConfig {
    /// bubblewrap (default) or gVisor.
    pub isolation: Isolation,
    /// Holds `sandboxes/<name>/`.
    pub state_dir: PathBuf,
    /// The `picod` binary started in every sandbox.
    pub picod: PathBuf,
    /// The `bwrap` binary.
    pub bwrap: PathBuf,
    /// When running as root: the unprivileged uid/gid sandboxes run as (default 65534, nobody).
    pub drop_to: Option<u32>,
    /// How long a new sandbox may take to answer.
    pub ready_timeout: Duration,
    /// `pids.max` when the definition sets none (Kubernetes resources have no pid limit).
    pub default_pids_limit: u64,
    /// cgroup filesystem root (`/sys/fs/cgroup`).
    pub cgroup_root: PathBuf,
    /// Refuse to start when cgroup limits cannot be enforced.
    pub require_cgroups: bool,
}

impl LocalConfig {
    /// Defaults for a state directory and a PicoD binary.
    pub fn new(state_dir: PathBuf, picod: PathBuf) -> Self {
        let root = nix::unistd::Uid::effective().is_root();
        Self {
            isolation: Isolation::Bubblewrap,
            state_dir,
            picod,
            bwrap: PathBuf::from("bwrap"),
            drop_to: root.then_some(65534),
            ready_timeout: Duration::from_secs(30),
            default_pids_limit: 512,
            cgroup_root: PathBuf::from("/sys/fs/cgroup"),
            require_cgroups: false,
        }
    }
}

/// Finds `name` on PATH (or returns it if it is a path).
pub fn which(name: &Path) -> Option<PathBuf> {
    if name.components().count() > 1 {
        return name.is_file().then(|| name.to_path_buf());
    }
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

struct Running {
    pgid: Option<Pid>,
    child: tokio::process::Child,
    dir: PathBuf,
    cgroup: Option<SandboxCgroup>,
}

struct Pool {
    generation: u64,
    size: u32,
    ready: VecDeque<Sandbox>,
    filling: u32,
    workload: Workload,
    public_key: Option<String>,
}

struct Inner {
    config: LocalConfig,
    bwrap: PathBuf,
    /// `runsc` when the isolation is gVisor.
    runsc: Option<PathBuf>,
    cgroups: Option<Cgroups>,
    running: Mutex<HashMap<String, Running>>,
    pools: Mutex<HashMap<(String, String), Pool>>,
}

/// The local backend. Cheap to clone.
#[derive(Clone)]
pub struct LocalBackend {
    inner: Arc<Inner>,
}

/// Warm-pool fill level, for progress output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolStatus {
    pub namespace: String,
    pub name: String,
    pub ready: usize,
    pub size: u32,
}

fn random_suffix() -> String {
    let n = uuid::Uuid::new_v4().as_u128();
    let alphabet = b"abcdefghijklmnopqrstuvwxyz0123456789";
    (0..8)
        .map(|i| alphabet[((n >> (i * 6)) % 36) as usize] as char)
        .collect()
}

/// Name of a new sandbox for a definition: `<name>-<8 random [a-z0-9]>` (upstream's scheme).
pub fn sandbox_name(definition: &str) -> String {
    format!("{definition}-{}", random_suffix())
}

fn limits_of(res: Option<&ResourceRequirements>, default_pids: u64) -> Limits {
    let lim = res.and_then(|r| r.limits.as_ref());
    let get = |k: &str| lim.and_then(|l| l.get(k)).map(|q| q.0.clone());
    Limits {
        memory_bytes: get("memory").and_then(|q| cgroup::parse_memory(&q)),
        cpu_millis: get("cpu").and_then(|q| cgroup::parse_cpu(&q)),
        pids: Some(default_pids),
    }
}

impl LocalBackend {
    /// Checks the host (bubblewrap present, PicoD present, cgroups) and cleans leftovers of a
    /// previous run.
    pub fn new(config: LocalConfig) -> Result<Self, String> {
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
        if config.drop_to.is_some() && which(Path::new("setpriv")).is_none() {
            return Err("`setpriv` is missing: install the `util-linux` package".into());
        }
        let cgroups = match Cgroups::detect(&config.cgroup_root) {
            Ok(c) => Some(c),
            Err(why) if config.require_cgroups => {
                return Err(format!("cgroup limits cannot be enforced: {why}"));
            }
            Err(why) => {
                tracing::warn!(reason = %why, "sandboxes will run WITHOUT cgroup limits");
                None
            }
        };
        let sandboxes = config.state_dir.join("sandboxes");
        if sandboxes.exists() {
            let _ = std::fs::remove_dir_all(&sandboxes);
        }
        std::fs::create_dir_all(&sandboxes)
            .map_err(|e| format!("cannot create {}: {e}", sandboxes.display()))?;
        if config.drop_to.is_some() {
            for dir in [&config.state_dir, &sandboxes] {
                let _ = std::fs::set_permissions(
                    dir,
                    std::os::unix::fs::PermissionsExt::from_mode(0o711),
                );
            }
            check_traversable(&sandboxes)?;
        }
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                bwrap,
                runsc,
                cgroups,
                running: Mutex::new(HashMap::new()),
                pools: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// Whether cgroup limits are enforced.
    pub fn enforces_limits(&self) -> bool {
        self.inner.cgroups.is_some()
    }

    /// Names of running sandboxes (pooled ones included).
    pub fn running(&self) -> Vec<String> {
        let mut v: Vec<_> = self.inner.running.lock().unwrap().keys().cloned().collect();
        v.sort();
        v
    }

    /// Host directory of a sandbox.
    pub fn sandbox_dir(&self, name: &str) -> PathBuf {
        self.inner.config.state_dir.join("sandboxes").join(name)
    }

    /// Warm pools and how full they are.
    pub fn pool_status(&self) -> Vec<PoolStatus> {
        let pools = self.inner.pools.lock().unwrap();
        let mut v: Vec<_> = pools
            .iter()
            .map(|((ns, name), p)| PoolStatus {
                namespace: ns.clone(),
                name: name.clone(),
                ready: p.ready.len(),
                size: p.size,
            })
            .collect();
        v.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        v
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

    async fn start(
        &self,
        name: &str,
        workload: &Workload,
        public_key: Option<String>,
    ) -> Result<Sandbox, BackendError> {
        let result = self.try_start(name, workload, public_key).await;
        if result.is_err() {
            self.remove(name).await;
        }
        result
    }

    async fn try_start(
        &self,
        name: &str,
        workload: &Workload,
        public_key: Option<String>,
    ) -> Result<Sandbox, BackendError> {
        let cfg = &self.inner.config;
        let fail = |what: &str, e: std::io::Error| BackendError::Failed(format!("{what}: {e}"));
        let dir = self.sandbox_dir(name);
        let (ws, run) = (dir.join("ws"), dir.join("run"));
        for d in [&ws, &run] {
            std::fs::create_dir_all(d).map_err(|e| fail("cannot create sandbox directory", e))?;
            if let Some(uid) = cfg.drop_to {
                std::os::unix::fs::chown(d, Some(uid), Some(uid))
                    .map_err(|e| fail("cannot chown sandbox directory", e))?;
            }
        }
        let namespace = workload.namespace();
        let (env, resources, ports, agent, entry_points) =
            describe(workload, &run, name, &namespace)?;
        let limits = limits_of(resources.as_ref(), cfg.default_pids_limit);
        let cgroup = match &self.inner.cgroups {
            Some(c) => Some(
                c.create(name, limits)
                    .map_err(|e| fail("cannot create cgroup", e))?,
            ),
            None => None,
        };
        let spec = LaunchSpec {
            workspace: ws,
            run_dir: run.clone(),
            picod: cfg.picod.clone(),
            public_key: if workload.needs_key() {
                public_key
            } else {
                None
            },
            env,
            forward_ports: ports,
            agent,
            drop_to: cfg.drop_to,
            cgroup_procs: cgroup
                .as_ref()
                .map(SandboxCgroup::procs_files)
                .unwrap_or_default(),
        };
        if workload.needs_key() && spec.public_key.is_none() {
            return Err(BackendError::Failed(
                "authMode picod needs the Router's public key, and none is configured".into(),
            ));
        }
        let argv = match &self.inner.runsc {
            None => launcher_argv(&spec, &self.inner.bwrap),
            Some(runsc) => {
                let bundle = dir.join("bundle");
                launch::write_oci_bundle(&bundle, &spec).map_err(|e| fail("gVisor bundle", e))?;
                launch::runsc_argv(runsc, &self.runsc_state(), &bundle, name)
            }
        };
        let log = std::fs::File::create(dir.join("sandbox.log")).map_err(|e| fail("log", e))?;
        let procs: Vec<String> = spec
            .cgroup_procs
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        let child = tokio::process::Command::new(&argv[0])
            .args(&argv[1..])
            .env("AGENTCUBE_CGROUP_PROCS", procs.join(" "))
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| fail("log", e))?)
            .stderr(log)
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| fail("cannot start bubblewrap", e))?;
        let pgid = child.id().map(|id| Pid::from_raw(id as i32));
        self.inner.running.lock().unwrap().insert(
            name.to_string(),
            Running {
                pgid,
                child,
                dir: dir.clone(),
                cgroup,
            },
        );
        self.wait_ready(name, &run.join(PICOD_SOCKET)).await?;
        Ok(Sandbox {
            kind: BackingKind::Sandbox,
            id: uuid::Uuid::new_v4().to_string(),
            name: name.to_string(),
            entry_points,
        })
    }

    async fn wait_ready(&self, name: &str, socket: &Path) -> Result<(), BackendError> {
        let deadline = tokio::time::Instant::now() + self.inner.config.ready_timeout;
        let mut delay = Duration::from_millis(2);
        while tokio::time::Instant::now() < deadline {
            if probe::ready(socket).await {
                return Ok(());
            }
            let exited = {
                let mut running = self.inner.running.lock().unwrap();
                match running.get_mut(name) {
                    Some(r) => r.child.try_wait().ok().flatten(),
                    None => return Err(BackendError::NotReady(format!("{name} (removed)"))),
                }
            };
            if let Some(status) = exited {
                let log = std::fs::read_to_string(self.sandbox_dir(name).join("sandbox.log"))
                    .unwrap_or_default();
                let tail: String = log.lines().rev().take(5).collect::<Vec<_>>().join(" | ");
                return Err(BackendError::Failed(format!(
                    "sandbox {name} exited during start ({status}): {tail}"
                )));
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(50));
        }
        Err(BackendError::NotReady(name.to_string()))
    }

    fn runsc_state(&self) -> PathBuf {
        self.inner.config.state_dir.join("runsc")
    }

    /// Kills a sandbox (its whole process group and cgroup) and deletes its directories.
    async fn remove(&self, name: &str) {
        let entry = self.inner.running.lock().unwrap().remove(name);
        if let Some(runsc) = &self.inner.runsc {
            let state = format!("--root={}", self.runsc_state().display());
            for args in [
                vec![state.as_str(), "kill", name, "KILL"],
                vec![state.as_str(), "delete", "-force", name],
            ] {
                let run = tokio::process::Command::new(runsc)
                    .args(&args)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
                let _ = tokio::time::timeout(Duration::from_secs(10), run).await;
            }
        }
        if let Some(mut r) = entry {
            if let Some(pgid) = r.pgid {
                let _ = killpg(pgid, Signal::SIGKILL);
            }
            let _ = r.child.kill().await;
            if let Some(cg) = &r.cgroup {
                cg.remove().await;
            }
            let _ = tokio::fs::remove_dir_all(&r.dir).await;
        } else {
            let _ = tokio::fs::remove_dir_all(self.sandbox_dir(name)).await;
        }
    }

    /// Starts sandboxes until a pool has `size` ready or starting.
    fn refill(&self, key: (String, String)) {
        let mut pools = self.inner.pools.lock().unwrap();
        let Some(pool) = pools.get_mut(&key) else {
            return;
        };
        let deficit = (pool.size as usize).saturating_sub(pool.ready.len() + pool.filling as usize);
        for _ in 0..deficit {
            pool.filling += 1;
            let (this, key) = (self.clone(), key.clone());
            let (workload, public_key, generation) = (
                pool.workload.clone(),
                pool.public_key.clone(),
                pool.generation,
            );
            tokio::spawn(async move {
                let name = sandbox_name(workload.name());
                let started = this.start(&name, &workload, public_key).await;
                let keep = {
                    let mut pools = this.inner.pools.lock().unwrap();
                    match pools.get_mut(&key) {
                        Some(p) if p.generation == generation => {
                            p.filling -= 1;
                            match &started {
                                Ok(sb) if p.ready.len() < p.size as usize => {
                                    p.ready.push_back(sb.clone());
                                    true
                                }
                                _ => false,
                            }
                        }
                        _ => false,
                    }
                };
                match started {
                    Ok(sb) if !keep => this.remove(&sb.name).await,
                    Err(e) => {
                        tracing::warn!(pool = %key.1, error = %e, "warm pool sandbox failed to start");
                        // Back off before the next attempt so a broken definition does not spin.
                        tokio::time::sleep(Duration::from_secs(2)).await;
                        this.refill(key);
                    }
                    Ok(_) => {}
                }
            });
        }
    }
}

/// Sandboxes run as an unprivileged uid, which must be able to reach their directories.
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

/// What a workload needs locally: env, resources, forwarded ports, agent argv, entry points
/// (endpoints still host paths without the `unix:` prefix).
#[allow(clippy::type_complexity)]
/// What a sandbox of `workload` runs: (env, resources, forwarded ports, agent argv, entry points).
type Description = (
    Vec<(String, String)>,
    Option<ResourceRequirements>,
    Vec<u16>,
    Vec<String>,
    Vec<EntryPoint>,
);

/// The environment of a sandbox: `value`s, and the downward API fields that mean something here
/// (`status.podIP` is the sandbox's own loopback, `metadata.name`/`metadata.namespace` the
/// sandbox's). Other `valueFrom` sources are skipped with a warning.
fn env_of(
    vars: Option<&Vec<k8s_openapi::api::core::v1::EnvVar>>,
    name: &str,
    namespace: &str,
) -> Vec<(String, String)> {
    vars.into_iter()
        .flatten()
        .filter_map(|v| {
            if let Some(val) = &v.value {
                return Some((v.name.clone(), val.clone()));
            }
            let field = v
                .value_from
                .as_ref()
                .and_then(|f| f.field_ref.as_ref())
                .map(|f| f.field_path.as_str());
            let value = match field {
                Some("status.podIP" | "status.hostIP") => "127.0.0.1",
                Some("metadata.name") => name,
                Some("metadata.namespace") => namespace,
                _ => {
                    tracing::warn!(name = %v.name, "this env valueFrom is not supported locally; skipped");
                    return None;
                }
            };
            Some((v.name.clone(), value.to_string()))
        })
        .collect()
}

fn describe(
    workload: &Workload,
    run: &Path,
    name: &str,
    namespace: &str,
) -> Result<Description, BackendError> {
    let socket = |file: String| format!("unix:{}", run.join(file).display());
    match workload {
        Workload::CodeInterpreter(ci) => {
            let t = &ci.spec.template;
            let ports = ci.spec.effective_ports();
            let mut forwards = Vec::new();
            let mut eps = Vec::new();
            for (i, p) in ports.iter().enumerate() {
                // The first port is PicoD itself; further ports are forwarded into the sandbox.
                let file = if i == 0 {
                    PICOD_SOCKET.to_string()
                } else {
                    forwards.push(p.port as u16);
                    port_socket(p.port as u16)
                };
                eps.push(entry_point(p, socket(file)));
            }
            Ok((
                env_of(t.environment.as_ref(), name, namespace),
                t.resources.clone(),
                forwards,
                Vec::new(),
                eps,
            ))
        }
        Workload::AgentRuntime(ar) => {
            let c = ar
                .spec
                .pod_template
                .spec
                .containers
                .first()
                .ok_or_else(|| {
                    BackendError::Invalid("the AgentRuntime pod template has no container".into())
                })?;
            let mut agent: Vec<String> = c.command.clone().unwrap_or_default();
            agent.extend(c.args.clone().unwrap_or_default());
            if agent.is_empty() {
                return Err(BackendError::Invalid(format!(
                    "container {:?} has no command: the local backend cannot read image \
                     entrypoints, so give `command` explicitly",
                    c.name
                )));
            }
            let ports: Vec<u16> = ar.spec.target_port.iter().map(|p| p.port as u16).collect();
            let eps = ar
                .spec
                .target_port
                .iter()
                .map(|p| entry_point(p, socket(port_socket(p.port as u16))))
                .collect();
            Ok((
                env_of(c.env.as_ref(), name, namespace),
                c.resources.clone(),
                ports,
                agent,
                eps,
            ))
        }
    }
}

fn generation_of(ci: &CodeInterpreter, key: &Option<String>) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    serde_json::to_string(&ci.spec)
        .unwrap_or_default()
        .hash(&mut h);
    key.hash(&mut h);
    h.finish()
}

#[async_trait::async_trait]
impl Backend for LocalBackend {
    async fn create(&self, req: &SandboxRequest) -> Result<Sandbox, BackendError> {
        if let Workload::CodeInterpreter(ci) = &req.workload
            && ci.spec.warm_pool() > 0
        {
            let key = (req.namespace.clone(), req.workload.name().to_string());
            let claimed = {
                let mut pools = self.inner.pools.lock().unwrap();
                pools.get_mut(&key).and_then(|p| p.ready.pop_front())
            };
            if let Some(sb) = claimed {
                self.refill(key);
                return Ok(sb);
            }
            tracing::info!(pool = %key.1, "warm pool empty; starting a sandbox on demand");
        }
        self.start(&req.name, &req.workload, req.public_key.clone())
            .await
    }

    async fn delete(&self, _: BackingKind, _: &str, name: &str) -> Result<(), BackendError> {
        self.remove(name).await;
        Ok(())
    }

    async fn sync_pools(&self, definitions: Vec<Arc<CodeInterpreter>>, public_key: Option<String>) {
        let mut stale = Vec::new();
        let mut kick = Vec::new();
        {
            let mut pools = self.inner.pools.lock().unwrap();
            let wanted: HashMap<(String, String), Arc<CodeInterpreter>> = definitions
                .into_iter()
                .filter(|ci| ci.spec.warm_pool() > 0)
                .map(|ci| {
                    let key = (
                        ci.metadata
                            .namespace
                            .clone()
                            .unwrap_or_else(|| "default".into()),
                        ci.metadata.name.clone().unwrap_or_default(),
                    );
                    (key, ci)
                })
                .collect();
            pools.retain(|key, pool| {
                let keep = wanted.contains_key(key);
                if !keep {
                    stale.extend(pool.ready.drain(..).map(|s| s.name));
                }
                keep
            });
            for (key, ci) in wanted {
                let generation = generation_of(&ci, &public_key);
                let size = ci.spec.warm_pool();
                match pools.get_mut(&key) {
                    Some(p) if p.generation == generation => {
                        p.size = size;
                        while p.ready.len() > size as usize {
                            stale.extend(p.ready.pop_back().map(|s| s.name));
                        }
                    }
                    existing => {
                        // New or changed definition: roll the pool.
                        if let Some(p) = existing {
                            stale.extend(p.ready.drain(..).map(|s| s.name));
                        }
                        pools.insert(
                            key.clone(),
                            Pool {
                                generation,
                                size,
                                ready: VecDeque::new(),
                                filling: 0,
                                workload: Workload::CodeInterpreter(ci),
                                public_key: public_key.clone(),
                            },
                        );
                    }
                }
                kick.push(key);
            }
        }
        for name in stale {
            self.remove(&name).await;
        }
        for key in kick {
            self.refill(key);
        }
    }

    fn pool_levels(&self) -> Vec<(String, String, usize, u32)> {
        self.pool_status()
            .into_iter()
            .map(|p| (p.namespace, p.name, p.ready, p.size))
            .collect()
    }

    async fn shutdown(&self) {
        self.inner.pools.lock().unwrap().clear();
        // Pool refills in flight finish into a missing pool and are removed; keep sweeping until
        // nothing is left (bounded).
        for _ in 0..200 {
            let names: Vec<String> = self.inner.running.lock().unwrap().keys().cloned().collect();
            if names.is_empty() {
                break;
            }
            for name in names {
                self.remove(&name).await;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
