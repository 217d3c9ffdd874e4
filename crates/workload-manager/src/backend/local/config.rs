//! The local backend's settings: [`LocalConfig`] (what the binaries build from their flags),
//! the memory flags both binaries share ([`MemoryArgs`]) and the isolation choice.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::image;
use super::quantity;
use super::uids::UidRange;

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
    /// Holds `sandboxes/<name>/` and `private/<name>/`.
    pub state_dir: PathBuf,
    /// The `picod` binary started in every sandbox.
    pub picod: PathBuf,
    /// The `bwrap` binary.
    pub bwrap: PathBuf,
    /// Where `bwrap`, `runsc` and `setpriv` are looked for when named without a directory (the
    /// binaries pass their `PATH`; default [`SYSTEM_PATH`]).
    pub tool_path: std::ffi::OsString,
    /// When running as root: the host uids sandboxes run as, one per sandbox.
    pub uids: Option<UidRange>,
    /// How long a new sandbox may take to answer.
    pub ready_timeout: Duration,
    /// `pids.max` when the definition sets none (Kubernetes resources have no pid limit).
    pub default_pids_limit: u64,
    /// cgroup filesystem root (`/sys/fs/cgroup`).
    pub cgroup_root: PathBuf,
    /// Refuse to start when cgroup limits cannot be enforced.
    pub require_cgroups: bool,
    /// Memory limit of sandboxes whose definition sets none (none is unbounded).
    pub default_memory_bytes: Option<u64>,
    /// Most memory all sandboxes' limits may add up to (default: the host's memory); a create
    /// over it is refused with 429 (`None`: no budget).
    pub memory_budget: Option<u64>,
    /// DNS server of sandboxes with a network policy (default: the host's first non-loopback
    /// `nameserver`).
    pub sandbox_dns: Option<std::net::IpAddr>,
    /// Pull definitions' images from their registries and run sandboxes on them; `None` (the
    /// library default): every sandbox runs on the host's `/usr` (host mode).
    pub images: Option<image::RegistrySettings>,
    /// Workspace quota of sandboxes whose definition sets no `ephemeral-storage` limit (`None`:
    /// unbounded). Enforced when running as root (see [`super::quota`]).
    pub default_workspace_bytes: Option<u64>,
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
            tool_path: SYSTEM_PATH.into(),
            uids: root.then(UidRange::default),
            ready_timeout: Duration::from_secs(30),
            default_pids_limit: 512,
            cgroup_root: PathBuf::from("/sys/fs/cgroup"),
            require_cgroups: false,
            default_memory_bytes: Some(DEFAULT_MEMORY_BYTES),
            memory_budget: host_memory(),
            sandbox_dns: None,
            images: None,
            default_workspace_bytes: Some(DEFAULT_WORKSPACE_BYTES),
        }
    }
}

/// The memory flags of the local backend (`workload-manager`, `agentcube up`).
#[derive(Debug, Clone, clap::Args)]
pub struct MemoryArgs {
    /// Most memory the limits of all local sandboxes may add up to (a quantity such as `24Gi`;
    /// `host` = this host's memory; `0` = no budget). Over it, creates are refused with 429.
    #[arg(long, env = "AGENTCUBE_MEMORY_BUDGET", default_value = "host")]
    pub memory_budget: String,
    /// Memory limit of local sandboxes whose definition sets none (quantity; `0` = none).
    #[arg(long, env = "AGENTCUBE_DEFAULT_MEMORY_LIMIT", default_value = "1Gi")]
    pub default_memory_limit: String,
    /// Workspace quota of local sandboxes whose definition sets no `ephemeral-storage` limit
    /// (quantity; `0` = none). Enforced when running as root.
    #[arg(long, env = "AGENTCUBE_DEFAULT_WORKSPACE_SIZE", default_value = "2Gi")]
    pub default_workspace_size: String,
}

impl MemoryArgs {
    /// Applies the flags to a local configuration.
    pub fn apply(&self, config: &mut LocalConfig) -> Result<(), String> {
        let quantity =
            |flag: &str, v: &str| quantity::bytes(v).map_err(|e| format!("--{flag}: {e}"));
        config.memory_budget = match self.memory_budget.as_str() {
            "host" => host_memory(),
            v => Some(quantity("memory-budget", v)?).filter(|b| *b > 0),
        };
        config.default_memory_bytes = Some(quantity(
            "default-memory-limit",
            &self.default_memory_limit,
        )?)
        .filter(|b| *b > 0);
        config.default_workspace_bytes = Some(quantity(
            "default-workspace-size",
            &self.default_workspace_size,
        )?)
        .filter(|b| *b > 0);
        Ok(())
    }
}

/// Memory limit of a sandbox whose definition sets none: 1 GiB.
pub const DEFAULT_MEMORY_BYTES: u64 = 1 << 30;

/// Workspace quota of a sandbox whose definition sets none: 2 GiB.
pub const DEFAULT_WORKSPACE_BYTES: u64 = 2 << 30;

/// The host's memory (`MemTotal`).
pub fn host_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb: u64 = info
        .lines()
        .find(|l| l.starts_with("MemTotal:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// The system directories: where host tools are looked for by default.
pub const SYSTEM_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Finds `name` in the directories of `path` (a `PATH` value), or returns it if it is a path.
pub fn which(name: &Path, path: &std::ffi::OsStr) -> Option<PathBuf> {
    if name.components().count() > 1 {
        return name.is_file().then(|| name.to_path_buf());
    }
    std::env::split_paths(path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}
