//! TEST AND DEVELOPMENT SUPPORT ONLY, never a dependency of a shipped binary: a real Kubernetes
//! cluster on this machine for the Workload Manager's Kubernetes backend, the chart and the e2e
//! suite.
//!
//! Main flow ([`Cluster::start`]):
//! 1. [`certs`]: a fresh CA, serving and client certificates, service-account keys.
//! 2. [`controlplane`]: etcd, kube-apiserver, kube-controller-manager, kube-scheduler and the
//!    agent-sandbox controller (core + extensions), the upstream programs built from their Go
//!    modules (`kube/controlplane`, pinned there; `scripts/build-kube.sh`); agent-sandbox's CRDs
//!    and this repository's are applied first.
//! 3. [`kubelet`]: the process kubelet, the one simulated part — it registers a Node and runs the
//!    pods the real scheduler binds to it as bubblewrap processes (what it does and does not do
//!    is listed there).
//!
//! The `test-cluster` binary runs all of it in the foreground (`make kube-up`), writes an admin
//! kubeconfig and stops everything on SIGINT/SIGTERM or, with `--stdin`, when its standard input
//! closes (so a test process that dies takes its cluster with it). [`shared`] starts one per
//! test process.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

pub mod certs;
pub mod controlplane;
pub mod kubelet;

use controlplane::{ControlPlane, ControlPlaneConfig};
use kubelet::{KubeletConfig, ProcessKubelet};

/// The repository's root (this crate is `crates/test-cluster`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// This workspace's debug binaries (`target/debug`, or under `CARGO_TARGET_DIR`): what tests
/// pass to [`shared`].
pub fn debug_bin_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"))
        .join("debug")
}

/// Where `scripts/build-kube.sh` puts the Go binaries and agent-sandbox's CRDs.
pub fn kube_cache() -> PathBuf {
    std::env::var_os("AGENTCUBE_KUBE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".cache/kube"))
}

/// Everything a cluster needs.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    pub control_plane: ControlPlaneConfig,
    pub kubelet: KubeletConfig,
}

impl ClusterConfig {
    /// Defaults under `dir`: binaries from [`kube_cache`], agent-sandbox's and this repository's
    /// CRDs, images mapped to the binaries in `bin_dir` (e.g. `target/debug`).
    pub fn new(dir: &Path, bin_dir: &Path) -> Self {
        let cache = kube_cache();
        Self {
            control_plane: ControlPlaneConfig {
                bin_dir: cache.join("bin"),
                crd_dirs: vec![cache.join("crds"), repo_root().join("config/crd")],
                dir: dir.join("control-plane"),
            },
            kubelet: KubeletConfig {
                node: "process-node".into(),
                state_dir: dir.join("node"),
                images: kubelet::images::Images::repository(bin_dir),
                bwrap: "bwrap".into(),
                api_host: "127.0.0.1".into(),
                api_port: 0,
            },
        }
    }
}

/// A control plane and its process kubelet.
pub struct Cluster {
    pub control_plane: ControlPlane,
    pub kubelet: ProcessKubelet,
}

impl Cluster {
    pub async fn start(mut config: ClusterConfig) -> anyhow::Result<Self> {
        let control_plane = ControlPlane::start(config.control_plane).await?;
        config.kubelet.api_port = control_plane.port;
        let kubelet = ProcessKubelet::start(control_plane.client.clone(), config.kubelet).await?;
        Ok(Self {
            control_plane,
            kubelet,
        })
    }

    /// Kills the pods, stops the control plane; returns how many pod processes were running.
    pub async fn stop(self, keep_dir: bool) -> usize {
        let killed = self.kubelet.stop().await;
        self.control_plane.stop(keep_dir).await;
        killed
    }
}

/// A cluster shared by every test of one test process: a `test-cluster` child started on first
/// use, which stops when this process exits (its standard input closes).
#[derive(Debug)]
pub struct Shared {
    pub kubeconfig: PathBuf,
    pub dir: PathBuf,
}

impl Shared {
    /// A client with the cluster's admin credentials.
    pub async fn client(&self) -> kube::Client {
        controlplane::client_for(&self.kubeconfig)
            .await
            .expect("a client for the test cluster")
    }

    /// The API server's audit log (see [`controlplane::AUDIT_LOG`]).
    pub fn audit_log(&self) -> PathBuf {
        self.dir.join("control-plane").join(controlplane::AUDIT_LOG)
    }

    /// The audit events so far (complete requests), parsed.
    pub fn audit_events(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.audit_log())
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

/// The test process's cluster (see [`Shared`]). `bin_dir` holds `test-cluster` and the
/// binaries images map to (`target/debug`).
pub fn shared(bin_dir: &Path) -> &'static Shared {
    static SHARED: OnceLock<Shared> = OnceLock::new();
    static CHILD: OnceLock<std::sync::Mutex<std::process::Child>> = OnceLock::new();
    SHARED.get_or_init(|| {
        use std::io::BufRead;
        let dir =
            std::env::temp_dir().join(format!("agentcube-test-cluster-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let log = std::fs::File::create(dir.join("test-cluster.log")).unwrap();
        let mut child = std::process::Command::new(bin_dir.join("test-cluster"))
            .arg("--state-dir")
            .arg(&dir)
            .arg("--bin-dir")
            .arg(bin_dir)
            .arg("--stdin")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {}/test-cluster ({e}): cargo build --workspace --bins first",
                    bin_dir.display()
                )
            });
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let Some(kubeconfig) = line.trim().strip_prefix("test-cluster ready: kubeconfig=") else {
            panic!(
                "test-cluster did not start: {line:?}\n{}",
                std::fs::read_to_string(dir.join("test-cluster.log")).unwrap_or_default()
            );
        };
        let shared = Shared {
            kubeconfig: PathBuf::from(kubeconfig),
            dir,
        };
        let _ = CHILD.set(std::sync::Mutex::new(child));
        shared
    })
}
