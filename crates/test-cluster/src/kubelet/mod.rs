//! The process kubelet: the one simulated part of the test cluster (there is no container
//! runtime on these machines). It is a client of the real API server, like a kubelet:
//!
//! - registers its Node (`Ready`, generous capacity) and renews its Lease in `kube-node-lease`;
//! - watches the Pods the real scheduler bound to it and runs each as a process: the first
//!   container, under bubblewrap, with the host's `/usr` and `/etc` read-only, a private `/root`,
//!   `/tmp` and `/run`, its own pid/ipc/uts namespaces and hostname ([`runtime`]);
//! - images map to programs on this host ([`images`]: this repository's binaries at their
//!   Dockerfile paths, `python`, `redis`); other images stay `Pending` with `ErrImagePull`;
//!   `slow-registry.test/<N>s/<image>` is a registry that cannot be reached for the pod's first
//!   `N` seconds (`ErrImagePull` with an `i/o timeout`, retried every second), then `<image>`;
//! - gives each pod its own loopback address (`127.A.B.N`) as `status.podIP`; pods share the
//!   host's network stack, so a program must bind its pod IP (PicoD's image rule sets
//!   `PICOD_LISTEN=$(POD_IP):8080`; others read `status.podIP` through the downward API);
//! - environment: `env`, `envFrom`, Secrets, ConfigMaps, the downward API, `$(VAR)` expansion,
//!   and `KUBERNETES_SERVICE_HOST`/`PORT` pointing at the real API server;
//! - volumes: `emptyDir`, `secret`, `configMap`, `downwardAPI`, `projected` — service-account
//!   tokens come from the TokenRequest API, bound to the pod, as a kubelet projects them;
//! - startup, readiness and liveness: `httpGet` and `tcpSocket` probes (others count as
//!   passing); until a startup probe passes the pod is not Ready and liveness is not probed;
//!   without a readiness probe a pod is Ready once its process runs (and has started); a
//!   container failing its startup or liveness probe `failureThreshold` times in a row is
//!   killed and restarted;
//! - Service names: every pod's `/etc/hosts` names each Service after a ready pod behind it
//!   ([`services`]), since there is no cluster DNS or kube-proxy;
//! - restarts under `restartPolicy` with back-off (meanwhile the container is `waiting` in
//!   `CrashLoopBackOff`, its exit in `lastState`); a deleted pod's program — PID 1 of its
//!   namespace, as in a container, so one without a `SIGTERM` handler ignores it — gets
//!   SIGTERM, SIGKILL after its grace period (at most 10 s here), then the kubelet removes it
//!   from the API server.
//!
//! - `securityContext.runAsUser`/`runAsGroup` (container's over pod's) when the kubelet runs as
//!   root: the container runs as that uid under an unprivileged bubblewrap; `emptyDir` volumes
//!   are world-writable, as a kubelet makes them.
//!
//! Not done (say so before relying on it): containers after the first, init containers,
//! the rest of `securityContext` (capabilities, seccomp, read-only root, `fsGroup` ownership;
//! without `runAsUser` processes run as this process's user), resource limits, exec probes,
//! image pulls, network isolation between pods, token refresh,
//! `hostPath`/PVC volumes, Services' cluster IPs and port translation ([`services`] maps Service
//! names to a ready pod's IP in every pod's `/etc/hosts` instead).

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;

pub mod images;
mod pod;
mod probe;
pub mod runtime;
pub mod services;

use pod::PodProcess;

/// How the kubelet runs.
#[derive(Debug, Clone)]
pub struct KubeletConfig {
    pub node: String,
    /// Pod directories live under `state_dir/pods`.
    pub state_dir: PathBuf,
    pub images: images::Images,
    pub bwrap: PathBuf,
    /// The API server as pods reach it.
    pub api_host: String,
    pub api_port: u16,
}

/// What every pod task needs.
pub struct Shared {
    pub client: kube::Client,
    pub config: KubeletConfig,
    pub root: bool,
    /// Extra `/etc/hosts` lines for every pod (names → addresses), e.g. Services.
    pub hosts: Mutex<Vec<(String, String)>>,
    /// Uids of deleted pods being terminated (their grace period running).
    terminating: Mutex<HashSet<String>>,
}

impl Shared {
    fn hosts_for(&self, ip: Ipv4Addr, hostname: &str) -> String {
        let mut text = format!("127.0.0.1\tlocalhost\n::1\tlocalhost\n{ip}\t{hostname}\n");
        for (addr, names) in self.hosts.lock().unwrap().iter() {
            text.push_str(&format!("{addr}\t{names}\n"));
        }
        text
    }
}

/// A running process kubelet.
pub struct ProcessKubelet {
    state_dir: PathBuf,
    pods: Arc<tokio::sync::Mutex<HashMap<String, PodProcess>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl ProcessKubelet {
    /// Registers the Node and starts running the pods bound to it.
    pub async fn start(client: kube::Client, config: KubeletConfig) -> anyhow::Result<Self> {
        std::fs::create_dir_all(config.state_dir.join("pods"))?;
        let shared = Arc::new(Shared {
            client: client.clone(),
            root: nix::unistd::Uid::effective().is_root(),
            config,
            hosts: Mutex::new(Vec::new()),
            terminating: Mutex::default(),
        });
        register_node(&client, &shared.config.node).await?;
        let mut tasks = vec![tokio::spawn(renew_lease(
            client.clone(),
            shared.config.node.clone(),
        ))];
        let pods = Arc::new(tokio::sync::Mutex::new(HashMap::new()));
        let api: Api<Pod> = Api::all(client.clone());
        let wc =
            watcher::Config::default().fields(&format!("spec.nodeName={}", shared.config.node));
        let (store, writer) = reflector::store();
        let (tx, mut changes) = tokio::sync::watch::channel(0u64);
        let svc_tx = tx.clone();
        tasks.push(tokio::spawn(async move {
            let mut stream = watcher(api, wc).default_backoff().reflect(writer).boxed();
            while let Some(e) = stream.next().await {
                if let Err(e) = e {
                    tracing::warn!(error = %e, "pod watch failed; retrying");
                }
                tx.send_modify(|n| *n = n.wrapping_add(1));
            }
        }));
        let (svc_store, svc_writer) = reflector::store();
        let svc_api: Api<k8s_openapi::api::core::v1::Service> = Api::all(client.clone());
        tasks.push(tokio::spawn(async move {
            let mut stream = watcher(svc_api, watcher::Config::default())
                .default_backoff()
                .reflect(svc_writer)
                .boxed();
            while let Some(e) = stream.next().await {
                if let Err(e) = e {
                    tracing::warn!(error = %e, "service watch failed; retrying");
                }
                svc_tx.send_modify(|n| *n = n.wrapping_add(1));
            }
        }));
        let (s, p) = (shared.clone(), pods.clone());
        tasks.push(tokio::spawn(async move {
            let mut next = Allocator::new();
            loop {
                sync(&s, &p, &store, &mut next).await;
                update_hosts(&s, &p, &store, &svc_store).await;
                tokio::select! {
                    _ = changes.changed() => {}
                    () = tokio::time::sleep(Duration::from_millis(250)) => {}
                }
            }
        }));
        Ok(Self {
            state_dir: shared.config.state_dir.clone(),
            pods,
            tasks,
        })
    }

    /// Pods with a live process, as `namespace/name`.
    pub async fn running(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .pods
            .lock()
            .await
            .values()
            .filter(|p| p.running())
            .map(|p| format!("{}/{}", p.namespace, p.name))
            .collect();
        v.sort();
        v
    }

    /// Stops syncing, kills every pod process (without telling the API server) and removes the
    /// pod directories; returns how many processes were running.
    pub async fn stop(self) -> usize {
        for t in &self.tasks {
            t.abort();
        }
        let all: Vec<PodProcess> = self.pods.lock().await.drain().map(|(_, p)| p).collect();
        let n = all.iter().filter(|p| p.running()).count();
        for p in all {
            p.stop(Duration::ZERO).await;
        }
        // Pods caught mid-start or mid-termination when the tasks were stopped: anything whose
        // command line names our state directory.
        kill_strays(&self.state_dir);
        let _ = std::fs::remove_dir_all(self.state_dir.join("pods"));
        n
    }
}

/// SIGKILLs every process whose command line mentions `dir` (every pod's bubblewrap does).
fn kill_strays(dir: &std::path::Path) {
    let needle = dir.display().to_string();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if pid != std::process::id() as i32
            && String::from_utf8_lossy(&cmdline)
                .replace('\0', " ")
                .contains(&needle)
        {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Pod IPs `127.A.B.N`, `A.B` random per kubelet so parallel clusters do not collide.
struct Allocator {
    net: (u8, u8),
    next: u32,
}

impl Allocator {
    fn new() -> Self {
        let n = uuid::Uuid::new_v4().as_u128();
        Self {
            net: (1 + (n % 254) as u8, ((n >> 8) % 256) as u8),
            next: 1,
        }
    }

    fn allocate(&mut self, used: &HashSet<Ipv4Addr>) -> Ipv4Addr {
        loop {
            let host = self.next;
            self.next = if host >= 254 * 255 { 1 } else { host + 1 };
            let ip = Ipv4Addr::new(127, self.net.0, (host / 254) as u8, (host % 254 + 1) as u8);
            if !used.contains(&ip) {
                return ip;
            }
        }
    }
}

/// Brings processes in line with the pods bound to this node.
async fn sync(
    shared: &Arc<Shared>,
    pods: &Arc<tokio::sync::Mutex<HashMap<String, PodProcess>>>,
    store: &Store<Pod>,
    alloc: &mut Allocator,
) {
    let bound: Vec<Arc<Pod>> = store.state();
    let live: HashSet<String> = bound
        .iter()
        .filter_map(|p| p.metadata.uid.clone())
        .collect();
    let mut map = pods.lock().await;
    // Pods removed from the API server without us (force deletion): kill their processes.
    let gone: Vec<String> = map.keys().filter(|u| !live.contains(*u)).cloned().collect();
    for uid in gone {
        if let Some(p) = map.remove(&uid) {
            tokio::spawn(p.stop(Duration::ZERO));
        }
    }
    for pod in bound {
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        if pod.metadata.deletion_timestamp.is_some() {
            // Once: the pod stays in the API server until its termination removes it (a second
            // termination, without the process, removed it at once, cutting the grace period
            // short for everyone watching).
            if !shared.terminating.lock().unwrap().insert(uid.clone()) {
                continue;
            }
            let grace = pod
                .metadata
                .deletion_grace_period_seconds
                .unwrap_or(30)
                .clamp(0, 10) as u64;
            let process = map.remove(&uid);
            tokio::spawn(terminate(
                shared.clone(),
                pod.clone(),
                process,
                Duration::from_secs(grace),
            ));
            continue;
        }
        if !map.contains_key(&uid) {
            let used: HashSet<Ipv4Addr> = map.values().map(|p| p.ip).collect();
            let ip = alloc.allocate(&used);
            let dir = shared.config.state_dir.join("pods").join(format!(
                "{}_{}_{}",
                pod.metadata.namespace.as_deref().unwrap_or_default(),
                pod.metadata.name.as_deref().unwrap_or_default(),
                &uid[..8.min(uid.len())]
            ));
            let mut p = PodProcess::new(&pod, ip, dir);
            p.start(shared, &pod).await;
            map.insert(uid.clone(), p);
        }
        let Some(p) = map.get_mut(&uid) else { continue };
        p.check(shared, &pod).await;
        p.ready = p.running() && p.probes.started(&pod) && probe::ready(&pod, p.ip).await;
        report(shared, &pod, p).await;
    }
}

/// Recomputes the Service entries of `/etc/hosts` and rewrites every pod's file in place when
/// they changed.
async fn update_hosts(
    shared: &Shared,
    pods: &Arc<tokio::sync::Mutex<HashMap<String, PodProcess>>>,
    store: &Store<Pod>,
    services: &Store<k8s_openapi::api::core::v1::Service>,
) {
    let map = pods.lock().await;
    let with_ips: Vec<(Arc<Pod>, String, bool)> = store
        .state()
        .into_iter()
        .filter_map(|pod| {
            let p = map.get(pod.metadata.uid.as_deref()?)?;
            Some((pod, p.ip.to_string(), p.ready))
        })
        .collect();
    let entries = services::entries(&services.state(), &with_ips);
    {
        let mut hosts = shared.hosts.lock().unwrap();
        if *hosts == entries {
            return;
        }
        *hosts = entries;
    }
    for p in map.values() {
        // Written in place (only over an existing file: a pod not started yet writes its own):
        // the bind mount inside the pod follows the inode.
        let file = p.dir.join("hosts");
        if file.exists() {
            let _ = std::fs::write(&file, shared.hosts_for(p.ip, &p.hostname));
        }
    }
}

/// Writes the pod's status when it changed.
async fn report(shared: &Shared, pod: &Pod, p: &mut PodProcess) {
    let status = p.status(pod);
    if p.reported.as_ref() == Some(&status) {
        return;
    }
    let api: Api<Pod> = Api::namespaced(shared.client.clone(), &p.namespace);
    match api
        .patch_status(
            &p.name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": status})),
        )
        .await
    {
        Ok(_) => p.reported = Some(status),
        Err(e) => tracing::warn!(pod = %p.name, error = %e, "cannot report pod status"),
    }
}

/// A deleted pod: stop its process within the grace period, then remove the object.
async fn terminate(
    shared: Arc<Shared>,
    pod: Arc<Pod>,
    process: Option<PodProcess>,
    grace: Duration,
) {
    if let Some(p) = process {
        p.stop(grace).await;
    }
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let name = pod.metadata.name.clone().unwrap_or_default();
    let dp = DeleteParams {
        grace_period_seconds: Some(0),
        preconditions: Some(Preconditions {
            uid: pod.metadata.uid.clone(),
            resource_version: None,
        }),
        ..Default::default()
    };
    match Api::<Pod>::namespaced(shared.client.clone(), &ns)
        .delete(&name, &dp)
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
        Err(e) => tracing::warn!(pod = %name, error = %e, "cannot remove a terminated pod"),
    }
    // Still there (the delete failed): the next sync tries again, without a process.
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    shared.terminating.lock().unwrap().remove(&uid);
}

async fn register_node(client: &kube::Client, name: &str) -> anyhow::Result<()> {
    let api: Api<Node> = Api::all(client.clone());
    let node: Node = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {
            "kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
            "kubernetes.io/arch": std::env::consts::ARCH.replace("x86_64", "amd64").replace("aarch64", "arm64"),
            "agentcube.io/process-kubelet": "true"}},
        "spec": {}
    }))?;
    match api.create(&PostParams::default(), &node).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => return Err(e.into()),
    }
    let now = pod::now_rfc3339();
    let resources =
        json!({"cpu": "64", "memory": "256Gi", "pods": "1000", "ephemeral-storage": "1Ti"});
    let status = json!({"status": {
        "capacity": resources, "allocatable": resources,
        "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                        "message": "process kubelet (agentcube test cluster)",
                        "lastHeartbeatTime": now, "lastTransitionTime": now}],
        "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "Hostname", "address": name}],
        "nodeInfo": {"machineID": "", "systemUUID": "", "bootID": "", "kernelVersion": "",
                     "osImage": "process kubelet", "containerRuntimeVersion": "bubblewrap",
                     "kubeletVersion": "v1.37.2", "kubeProxyVersion": "", "operatingSystem": "linux",
                     "architecture": "amd64"}
    }});
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(status))
        .await?;
    Ok(())
}

/// Renews the node's Lease every 10 s (the node lifecycle controller's heartbeat).
async fn renew_lease(client: kube::Client, node: String) {
    let api: Api<Lease> = Api::namespaced(client, "kube-node-lease");
    loop {
        let now = jiff::Timestamp::now()
            .strftime("%Y-%m-%dT%H:%M:%S.%6fZ")
            .to_string();
        let lease = json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": node, "namespace": "kube-node-lease"},
            "spec": {"holderIdentity": node, "leaseDurationSeconds": 40, "renewTime": now}});
        let pp = PatchParams::apply("process-kubelet").force();
        if let Err(e) = api.patch(&node, &pp, &Patch::Apply(lease)).await {
            tracing::warn!(error = %e, "cannot renew the node lease");
        }
        tokio::time::sleep(Duration::from_secs(10)).await;
    }
}
