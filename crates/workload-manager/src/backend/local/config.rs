//! The local backend's settings: [`LocalConfig`] (what the binaries build from their flags),
//! the flags both binaries share ([`LocalArgs`], [`MemoryArgs`]) and the isolation choice.

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
    /// Disk space workspace reservations leave free for the host (see [`super::quota`]).
    pub disk_reserve: super::quota::DiskReserve,
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
            disk_reserve: Default::default(),
        }
    }
}

/// The local backend's flags, the same in `workload-manager` and `agentcube up`.
#[derive(Debug, Clone, clap::Args)]
pub struct LocalArgs {
    /// Local backend: state directory (sandbox workspaces and sockets).
    #[arg(long, env = "AGENTCUBE_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Local backend: PicoD binary (default: `picod` next to this binary).
    #[arg(long, env = "AGENTCUBE_PICOD_BINARY")]
    pub picod_binary: Option<PathBuf>,
    /// Local backend: `bubblewrap` (default) or `gvisor` (runsc, stronger isolation, needs root).
    #[arg(long, env = "AGENTCUBE_ISOLATION", default_value = "bubblewrap")]
    pub isolation: Isolation,
    /// Local backend, as root: the host uids sandboxes run as, one per sandbox (`FIRST-LAST`).
    #[arg(
        long,
        env = "AGENTCUBE_SANDBOX_UIDS",
        default_value = "2000000000-2000065535"
    )]
    pub sandbox_uids: UidRange,
    /// Local backend: DNS server of sandboxes whose definition has a network policy (default:
    /// the host's first non-loopback nameserver; behind systemd-resolved's stub, the servers it
    /// asks).
    #[arg(long, env = "AGENTCUBE_SANDBOX_DNS")]
    pub sandbox_dns: Option<std::net::IpAddr>,
    /// Local backend: refuse to start when cgroup limits (memory, processes, CPU) cannot be
    /// enforced.
    #[arg(long, env = "AGENTCUBE_REQUIRE_CGROUPS")]
    pub require_cgroups: bool,
    #[command(flatten)]
    pub memory: MemoryArgs,
    #[command(flatten)]
    pub images: image::ImageArgs,
}

/// What [`LocalArgs::config`] takes from the process (read by `main`).
#[derive(Debug, Clone)]
pub struct LocalDefaults {
    /// The running binary: PicoD is looked for next to it.
    pub exe: PathBuf,
    /// The state directory without `--state-dir`.
    pub state_dir: PathBuf,
    /// `PATH`, where the sandbox tools are looked for (unset: [`SYSTEM_PATH`]).
    pub tool_path: Option<std::ffi::OsString>,
    /// The registry credentials file without `--registry-auth-file`
    /// ([`image::docker_config_file`]).
    pub docker_config: Option<PathBuf>,
}

impl LocalArgs {
    /// The local backend's configuration from these flags.
    pub fn config(&self, defaults: LocalDefaults) -> Result<LocalConfig, String> {
        let picod =
            (self.picod_binary.clone()).unwrap_or_else(|| defaults.exe.with_file_name("picod"));
        let state_dir = self.state_dir.clone().unwrap_or(defaults.state_dir);
        let mut local = LocalConfig::new(state_dir, picod);
        if let Some(path) = defaults.tool_path {
            local.tool_path = path;
        }
        local.require_cgroups = self.require_cgroups;
        local.sandbox_dns = self.sandbox_dns;
        local.isolation = self.isolation;
        local.uids = local.uids.map(|_| self.sandbox_uids);
        self.memory.apply(&mut local)?;
        local.images = self.images.settings(defaults.docker_config);
        Ok(local)
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
    /// Disk space workspace reservations leave free for the host on the state directory's
    /// filesystem: a percentage of it (`5%`) or a quantity (`20Gi`); `0` = none. A create that
    /// would go under it is refused with 429.
    #[arg(long, env = "AGENTCUBE_DISK_RESERVE", default_value = "5%")]
    pub disk_reserve: super::quota::DiskReserve,
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
        config.disk_reserve = self.disk_reserve;
        if let Some(b) = config.default_workspace_bytes
            && b < super::workload::MIN_WORKSPACE_BYTES
        {
            return Err(format!(
                "--default-workspace-size: {} (0 = no quota)",
                super::workload::workspace_too_small(&self.default_workspace_size)
            ));
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        local: LocalArgs,
    }

    fn defaults() -> LocalDefaults {
        LocalDefaults {
            exe: PathBuf::from("/opt/agentcube/bin/agentcube"),
            state_dir: PathBuf::from("/var/lib/default-state"),
            tool_path: Some("/opt/tools".into()),
            docker_config: Some(PathBuf::from("/home/u/.docker/config.json")),
        }
    }

    #[test]
    fn the_flags_reach_the_configuration() {
        let cli = Cli::parse_from([
            "x",
            "--state-dir",
            "/srv/state",
            "--picod-binary",
            "/opt/picod",
            "--isolation",
            "gvisor",
            "--sandbox-uids",
            "3000-3999",
            "--sandbox-dns",
            "192.0.2.53",
            "--require-cgroups",
            "--default-memory-limit",
            "256Mi",
            "--images",
            "pull",
            "--disk-reserve",
            "20Gi",
        ]);
        let c = cli.local.config(defaults()).unwrap();
        assert_eq!(
            c.disk_reserve,
            super::super::quota::DiskReserve::Bytes(20 << 30)
        );
        assert_eq!(c.state_dir, PathBuf::from("/srv/state"));
        assert_eq!(c.picod, PathBuf::from("/opt/picod"));
        assert_eq!(c.isolation, Isolation::Gvisor);
        if nix::unistd::Uid::effective().is_root() {
            assert_eq!(c.uids, Some("3000-3999".parse().unwrap()));
        }
        assert_eq!(c.sandbox_dns, Some("192.0.2.53".parse().unwrap()));
        assert!(c.require_cgroups);
        assert_eq!(c.default_memory_bytes, Some(256 << 20));
        assert_eq!(c.tool_path, std::ffi::OsString::from("/opt/tools"));
        let images = c.images.expect("--images pull");
        assert_eq!(
            images.auth_file,
            Some(PathBuf::from("/home/u/.docker/config.json"))
        );
    }

    #[test]
    fn without_flags_the_binarys_defaults_apply() {
        let mut d = defaults();
        d.tool_path = None;
        let c = Cli::parse_from(["x", "--images", "host"])
            .local
            .config(d)
            .unwrap();
        assert_eq!(c.state_dir, PathBuf::from("/var/lib/default-state"));
        assert_eq!(c.picod, PathBuf::from("/opt/agentcube/bin/picod"));
        assert_eq!(c.isolation, Isolation::Bubblewrap);
        assert!(!c.require_cgroups);
        assert_eq!(c.disk_reserve, super::super::quota::DiskReserve::Percent(5));
        assert_eq!(c.tool_path, std::ffi::OsString::from(SYSTEM_PATH));
        assert!(c.images.is_none());
    }

    #[test]
    fn a_default_workspace_too_small_for_a_filesystem_is_refused() {
        let err = Cli::parse_from(["x", "--default-workspace-size", "64Ki"])
            .local
            .config(defaults())
            .unwrap_err();
        assert!(
            err.contains("--default-workspace-size: \"64Ki\" is too small"),
            "{err}"
        );
        let none = Cli::parse_from(["x", "--default-workspace-size", "0"]);
        assert_eq!(
            none.local
                .config(defaults())
                .unwrap()
                .default_workspace_bytes,
            None
        );
    }
}
