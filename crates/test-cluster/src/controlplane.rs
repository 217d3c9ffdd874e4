//! The control plane as child processes of this one: etcd, kube-apiserver (RBAC and Node
//! authorisation, service-account token issuance), kube-controller-manager (every default
//! controller: namespaces, service accounts and their CA ConfigMap, garbage collection,
//! Deployments/ReplicaSets, EndpointSlices, node lifecycle), kube-scheduler, and the
//! agent-sandbox controller with its extensions. All of them are the upstream programs, built
//! from their Go modules by `scripts/build-kube.sh`.
//!
//! Every child runs under `setpriv --pdeathsig KILL`, so none outlives this process even when it
//! is killed; [`ControlPlane::stop`] stops them in reverse order.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams};

use crate::certs::Pki;

/// Where the binaries and CRDs are, and where the cluster keeps its state.
#[derive(Debug, Clone)]
pub struct ControlPlaneConfig {
    /// `controlplane` (multi-call) and `agent-sandbox-controller`.
    pub bin_dir: PathBuf,
    /// Directories of CRD manifests applied before the controllers start (agent-sandbox's own,
    /// and this repository's `config/crd`).
    pub crd_dirs: Vec<PathBuf>,
    /// etcd data, certificates, kubeconfigs and logs (created; removed by [`ControlPlane::stop`]).
    pub dir: PathBuf,
}

/// A running control plane.
pub struct ControlPlane {
    pub dir: PathBuf,
    /// `https://127.0.0.1:<port>`.
    pub url: String,
    pub port: u16,
    pub pki: Pki,
    /// Admin kubeconfig (`system:masters`).
    pub kubeconfig: PathBuf,
    /// A client with the admin's credentials.
    pub client: kube::Client,
    children: Vec<(String, tokio::process::Child)>,
    bin_dir: PathBuf,
}

/// Every request's metadata (who, verb, resource, the authorizer's decision and the response
/// code), once complete (watches also when they start): tests read it to count writes and to
/// prove RBAC allowed every request a component made. Leases and events are left out (noise).
const AUDIT_POLICY: &str = "apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
- level: None
  resources: [{group: coordination.k8s.io, resources: [leases]}, {group: '', resources: [events]}, {group: events.k8s.io, resources: [events]}]
- level: Metadata
";

/// The API server's audit log (JSON lines), relative to the control plane's directory.
pub const AUDIT_LOG: &str = "audit.log";

/// A free TCP port on loopback (closed again before use: good enough for a test machine).
pub fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl ControlPlane {
    /// Starts everything and returns once the API server is ready, the CRDs are established and
    /// the controllers run.
    pub async fn start(config: ControlPlaneConfig) -> anyhow::Result<Self> {
        let bin = config.bin_dir.join("controlplane");
        if !bin.is_file() {
            bail!(
                "{} not found: run scripts/build-kube.sh (make test does)",
                bin.display()
            );
        }
        std::fs::create_dir_all(config.dir.join("logs"))?;
        let pki = Pki::write(
            &config.dir.join("pki"),
            &[("admin", "admin", Some("system:masters"))],
        )?;
        let (etcd_port, peer_port, port) = (free_port()?, free_port()?, free_port()?);
        let url = format!("https://127.0.0.1:{port}");
        let kubeconfig = config.dir.join("kubeconfig");
        let (crt, key) = pki.client("admin");
        std::fs::write(
            &kubeconfig,
            kubeconfig_text(&url, &pki.ca_cert(), &crt, &key),
        )?;
        let mut cp = Self {
            dir: config.dir.clone(),
            url: url.clone(),
            port,
            pki: pki.clone(),
            kubeconfig: kubeconfig.clone(),
            client: client_for(&kubeconfig).await?,
            children: Vec::new(),
            bin_dir: config.bin_dir.clone(),
        };
        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let data = config.dir.join("etcd");
        cp.spawn(
            "etcd",
            &[
                "etcd",
                "--data-dir",
                &path(&data),
                "--listen-client-urls",
                &etcd_url,
                "--advertise-client-urls",
                &etcd_url,
                "--listen-peer-urls",
                &peer_url,
                "--initial-advertise-peer-urls",
                &peer_url,
                "--initial-cluster",
                &format!("default={peer_url}"),
                // A test cluster's data is thrown away: skip fsync, as kind and envtest do.
                "--unsafe-no-fsync",
                "--log-level",
                "warn",
            ],
        )?;
        cp.wait_tcp("etcd", etcd_port, Duration::from_secs(30))
            .await?;
        let policy = config.dir.join("audit-policy.yaml");
        std::fs::write(&policy, AUDIT_POLICY)?;
        cp.spawn(
            "kube-apiserver",
            &[
                "kube-apiserver",
                &format!("--etcd-servers={etcd_url}"),
                &format!("--secure-port={port}"),
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                // Pods reach the API server by its own address (the process kubelet sets
                // KUBERNETES_SERVICE_HOST), not through the `kubernetes` Service's endpoints, which
                // Kubernetes 1.37 no longer lets point at a loopback address.
                "--endpoint-reconciler-type=none",
                &format!("--tls-cert-file={}", path(&pki.server_cert())),
                &format!("--tls-private-key-file={}", path(&pki.server_key())),
                &format!("--client-ca-file={}", path(&pki.ca_cert())),
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                &format!("--service-account-key-file={}", path(&pki.sa_pub())),
                &format!("--service-account-signing-key-file={}", path(&pki.sa_key())),
                "--service-cluster-ip-range=10.96.0.0/16",
                "--authorization-mode=Node,RBAC",
                "--allow-privileged=true",
                &format!("--audit-policy-file={}", path(&policy)),
                &format!("--audit-log-path={}", path(&config.dir.join(AUDIT_LOG))),
                "--audit-log-format=json",
                &format!("--cert-dir={}", path(&config.dir.join("apiserver-certs"))),
                "--v=0",
            ],
        )?;
        cp.wait_ready(Duration::from_secs(60)).await?;
        for dir in &config.crd_dirs {
            apply_crds(&cp.client, dir).await?;
        }
        wait_established(&cp.client, Duration::from_secs(30)).await?;
        let kc = format!("--kubeconfig={}", path(&kubeconfig));
        cp.spawn(
            "kube-controller-manager",
            &[
                "kube-controller-manager",
                &kc,
                &format!("--authentication-kubeconfig={}", path(&kubeconfig)),
                &format!("--authorization-kubeconfig={}", path(&kubeconfig)),
                &format!("--root-ca-file={}", path(&pki.ca_cert())),
                &format!("--service-account-private-key-file={}", path(&pki.sa_key())),
                &format!("--cluster-signing-cert-file={}", path(&pki.ca_cert())),
                &format!("--cluster-signing-key-file={}", path(&pki.ca_key())),
                "--use-service-account-credentials=true",
                "--leader-elect=false",
                "--secure-port=0",
                "--controllers=*",
            ],
        )?;
        cp.spawn(
            "kube-scheduler",
            &[
                "kube-scheduler",
                &kc,
                &format!("--authentication-kubeconfig={}", path(&kubeconfig)),
                &format!("--authorization-kubeconfig={}", path(&kubeconfig)),
                "--leader-elect=false",
                "--secure-port=0",
            ],
        )?;
        let asc = config.bin_dir.join("agent-sandbox-controller");
        cp.spawn_program(
            "agent-sandbox-controller",
            &asc,
            &[
                &kc,
                "--extensions",
                "--leader-elect=false",
                "--metrics-bind-address=0",
                "--health-probe-bind-address=0",
            ],
        )?;
        Ok(cp)
    }

    /// `kubectl` of this control plane's build (multi-call), with the admin kubeconfig.
    pub fn kubectl(&self) -> std::process::Command {
        let mut c = std::process::Command::new(self.bin_dir.join("controlplane"));
        c.arg("kubectl")
            .arg(format!("--kubeconfig={}", path(&self.kubeconfig)));
        c
    }

    fn spawn(&mut self, name: &str, args: &[&str]) -> anyhow::Result<()> {
        let bin = self.bin_dir.join("controlplane");
        self.spawn_program(name, &bin, args)
    }

    fn spawn_program(&mut self, name: &str, program: &Path, args: &[&str]) -> anyhow::Result<()> {
        let log = std::fs::File::create(self.dir.join("logs").join(format!("{name}.log")))?;
        let child = tokio::process::Command::new("setpriv")
            .args(["--pdeathsig", "KILL", "--"])
            .arg(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        tracing::info!(name, pid = child.id(), "started");
        self.children.push((name.to_string(), child));
        Ok(())
    }

    /// Fails with the log's tail when a child has exited.
    fn check_alive(&mut self) -> anyhow::Result<()> {
        for (name, child) in &mut self.children {
            if let Ok(Some(status)) = child.try_wait() {
                bail!(
                    "{name} exited ({status}):\n{}",
                    log_tail(&self.dir.join("logs").join(format!("{name}.log")))
                );
            }
        }
        Ok(())
    }

    async fn wait_tcp(&mut self, what: &str, port: u16, limit: Duration) -> anyhow::Result<()> {
        let start = Instant::now();
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            self.check_alive()?;
            if start.elapsed() > limit {
                bail!("{what} did not listen on {port} within {limit:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    async fn wait_ready(&mut self, limit: Duration) -> anyhow::Result<()> {
        let start = Instant::now();
        loop {
            let req = http::Request::get("/readyz").body(Vec::new())?;
            if let Ok(text) = self.client.request_text(req).await
                && text.trim() == "ok"
            {
                return Ok(());
            }
            self.check_alive()?;
            if start.elapsed() > limit {
                bail!(
                    "kube-apiserver not ready within {limit:?}:\n{}",
                    log_tail(&self.dir.join("logs/kube-apiserver.log"))
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Names of children that have exited, with their status.
    pub fn exited(&mut self) -> Vec<String> {
        self.children
            .iter_mut()
            .filter_map(|(n, c)| c.try_wait().ok().flatten().map(|s| format!("{n} ({s})")))
            .collect()
    }

    /// Stops the controllers, then the API server, then etcd; removes the state directory.
    pub async fn stop(mut self, keep_dir: bool) {
        while let Some((name, mut child)) = self.children.pop() {
            if let Some(pid) = child.id() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
            if tokio::time::timeout(Duration::from_secs(10), child.wait())
                .await
                .is_err()
            {
                tracing::warn!(name, "did not stop within 10 s; killing it");
                let _ = child.kill().await;
            }
        }
        if !keep_dir {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

fn log_tail(p: &Path) -> String {
    let text = std::fs::read_to_string(p).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// A kubeconfig with a client certificate.
pub fn kubeconfig_text(url: &str, ca: &Path, crt: &Path, key: &Path) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: test-cluster\n  cluster:\n    server: {url}\n    certificate-authority: {}\nusers:\n- name: admin\n  user:\n    client-certificate: {}\n    client-key: {}\ncontexts:\n- name: test-cluster\n  context:\n    cluster: test-cluster\n    user: admin\n    namespace: default\ncurrent-context: test-cluster\n",
        path(ca),
        path(crt),
        path(key)
    )
}

/// A client from a kubeconfig file.
pub async fn client_for(kubeconfig: &Path) -> anyhow::Result<kube::Client> {
    let kc = kube::config::Kubeconfig::read_from(kubeconfig)?;
    let config =
        kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
            .await?;
    Ok(kube::Client::try_from(config)?)
}

/// Server-side applies every CRD document in `dir`'s `*.yaml` files.
pub async fn apply_crds(client: &kube::Client, dir: &Path) -> anyhow::Result<()> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let pp = PatchParams::apply("agentcube-test-cluster").force();
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("CRD directory {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    for file in files {
        let text = std::fs::read_to_string(&file)?;
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let v: serde_json::Value = serde::Deserialize::deserialize(doc)?;
            if v.get("kind").and_then(|k| k.as_str()) != Some("CustomResourceDefinition") {
                continue;
            }
            let crd: CustomResourceDefinition = serde_json::from_value(v)?;
            let name = crd.metadata.name.clone().unwrap_or_default();
            api.patch(&name, &pp, &Patch::Apply(&crd))
                .await
                .with_context(|| format!("applying CRD {name} from {}", file.display()))?;
        }
    }
    Ok(())
}

/// Waits until every CRD is `Established`.
pub async fn wait_established(client: &kube::Client, limit: Duration) -> anyhow::Result<()> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let start = Instant::now();
    loop {
        let pending: Vec<String> = api
            .list(&Default::default())
            .await?
            .items
            .into_iter()
            .filter(|crd| {
                !crd.status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|cs| {
                        cs.iter()
                            .any(|c| c.type_ == "Established" && c.status == "True")
                    })
            })
            .filter_map(|crd| crd.metadata.name)
            .collect();
        if pending.is_empty() {
            return Ok(());
        }
        if start.elapsed() > limit {
            bail!("CRDs not established within {limit:?}: {pending:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
