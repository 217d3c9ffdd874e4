//! A kubelet for the fake cluster: every Pod becomes a real process on this host.
//!
//! - **Network**: each Pod gets its own loopback address (`127.A.B.N`, with `A.B` random per
//!   kubelet so parallel fake clusters do not collide) as `status.podIP`. Pods share the host's
//!   network stack, so a process must bind its pod IP rather than a wildcard: the image `…picod…`
//!   is told so through its image environment (`PICOD_LISTEN=<podIP>:8080`), and other containers
//!   read the downward API (`valueFrom.fieldRef: status.podIP`).
//! - **Filesystem**: bubblewrap gives each Pod the host's `/usr` and `/etc` read-only, a private
//!   `/root` (a directory of the Pod's own), `/tmp`, `/proc`, `/dev`, and its own pid, ipc and uts
//!   namespaces (hostname = pod name).
//! - **Images** ([`super::runtime`]): `…picod…` runs the PicoD binary given to the simulation
//!   (entrypoint `/opt/agentcube/picod`); `python…` has entrypoint `python3`; any other image
//!   needs a `command`. A container the fake cannot run stays `Pending` with reason `ErrImagePull`.
//! - **Lifecycle**: the Pod is `Running` and `Ready` as soon as its process started (no readiness
//!   probes, like a pod without one; the Workload Manager probes ports itself). An exited process
//!   is restarted with back-off under `restartPolicy: Always` (the default), otherwise the Pod ends
//!   `Succeeded`/`Failed`. A deleted Pod's process group is killed and its directory removed.
//!
//! Only the first container of a Pod is run; resources are not enforced.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde_json::{Value, json};

use super::runtime::{bwrap_args, container_env, expand, image_defaults};
use super::{POD, SimConfig, condition, name, namespace, str_at};
use crate::store::Cluster;

struct PodProcess {
    namespace: String,
    name: String,
    ip: Ipv4Addr,
    dir: PathBuf,
    child: Option<tokio::process::Child>,
    restarts: u32,
    restart_at: Option<Instant>,
    started_at: String,
    /// Last termination (exit code), for the container status.
    last_exit: Option<i32>,
    /// Set when the pod ended for good (`Succeeded`/`Failed`) or cannot start.
    terminal: Option<String>,
}

/// The simulated node.
pub struct Kubelet {
    config: SimConfig,
    root: bool,
    /// Pods by uid.
    pods: Mutex<HashMap<String, PodProcess>>,
    net: (u8, u8),
    next_host: Mutex<u32>,
}

fn now_rfc3339() -> String {
    jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

impl Kubelet {
    /// Checks that bubblewrap exists.
    pub fn new(config: SimConfig) -> Result<Self, String> {
        if !config.picod.is_file() {
            return Err(format!("picod binary {} not found", config.picod.display()));
        }
        let pods_dir = config.state_dir.join("pods");
        std::fs::create_dir_all(&pods_dir)
            .map_err(|e| format!("cannot create {}: {e}", pods_dir.display()))?;
        let n = uuid::Uuid::new_v4().as_u128();
        Ok(Self {
            config,
            root: nix::unistd::Uid::effective().is_root(),
            pods: Mutex::new(HashMap::new()),
            net: (1 + (n % 254) as u8, ((n >> 8) % 256) as u8),
            next_host: Mutex::new(1),
        })
    }

    fn allocate_ip(&self) -> Ipv4Addr {
        let used: Vec<Ipv4Addr> = self.pods.lock().unwrap().values().map(|p| p.ip).collect();
        let mut next = self.next_host.lock().unwrap();
        loop {
            let host = *next;
            *next = if host >= 254 { 1 } else { host + 1 };
            let ip = Ipv4Addr::new(127, self.net.0, self.net.1, host as u8);
            if !used.contains(&ip) {
                return ip;
            }
        }
    }

    /// Pods with a live process, as `namespace/name`.
    pub fn running(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .pods
            .lock()
            .unwrap()
            .values()
            .filter(|p| p.child.is_some())
            .map(|p| format!("{}/{}", p.namespace, p.name))
            .collect();
        v.sort();
        v
    }

    /// Kills every pod process and removes its directory.
    pub async fn kill_all(&self) -> usize {
        let all: Vec<PodProcess> = self.pods.lock().unwrap().drain().map(|(_, p)| p).collect();
        let n = all.iter().filter(|p| p.child.is_some()).count();
        for p in all {
            stop_process(p).await;
        }
        n
    }

    /// Brings processes in line with the Pods in `cluster`.
    pub async fn sync(&self, cluster: &Cluster) {
        let pods = cluster.list_kind(POD);
        let live: std::collections::HashSet<String> = pods
            .iter()
            .map(|p| str_at(p, "/metadata/uid").to_string())
            .collect();
        let gone: Vec<PodProcess> = {
            let mut map = self.pods.lock().unwrap();
            let dead: Vec<String> = map.keys().filter(|u| !live.contains(*u)).cloned().collect();
            dead.into_iter().filter_map(|u| map.remove(&u)).collect()
        };
        for p in gone {
            stop_process(p).await;
        }
        for pod in pods {
            let uid = str_at(&pod, "/metadata/uid").to_string();
            let known = self.pods.lock().unwrap().contains_key(&uid);
            if !known {
                self.start(cluster, &pod, &uid);
            } else {
                self.check(cluster, &pod, &uid);
            }
            self.report(cluster, &pod, &uid);
        }
    }

    fn start(&self, cluster: &Cluster, pod: &Value, uid: &str) {
        let ip = self.allocate_ip();
        let dir = self.config.state_dir.join("pods").join(format!(
            "{}_{}_{}",
            namespace(pod),
            name(pod),
            &uid[..8.min(uid.len())]
        ));
        let mut p = PodProcess {
            namespace: namespace(pod).to_string(),
            name: name(pod).to_string(),
            ip,
            dir,
            child: None,
            restarts: 0,
            restart_at: None,
            started_at: now_rfc3339(),
            last_exit: None,
            terminal: None,
        };
        if let Err(why) = self.spawn(cluster, pod, &mut p) {
            p.terminal = Some(format!("ErrImagePull: {why}"));
        }
        self.pods.lock().unwrap().insert(uid.to_string(), p);
    }

    /// Notices exits; restarts under the pod's restart policy.
    fn check(&self, cluster: &Cluster, pod: &Value, uid: &str) {
        let mut map = self.pods.lock().unwrap();
        let Some(p) = map.get_mut(uid) else { return };
        if let Some(child) = &mut p.child
            && let Ok(Some(status)) = child.try_wait()
        {
            p.child = None;
            p.last_exit = Some(status.code().unwrap_or(137));
            let policy = str_at(pod, "/spec/restartPolicy");
            let success = status.success();
            let restart = match policy {
                "Never" => false,
                "OnFailure" => !success,
                _ => true,
            };
            if restart {
                let backoff =
                    Duration::from_secs(1 << p.restarts.min(5)).min(Duration::from_secs(30));
                p.restart_at = Some(Instant::now() + backoff);
            } else {
                p.terminal = Some(if success { "Succeeded" } else { "Failed" }.into());
            }
        }
        if p.child.is_none()
            && p.terminal.is_none()
            && p.restart_at.is_some_and(|t| Instant::now() >= t)
        {
            p.restart_at = None;
            p.restarts += 1;
            if let Err(why) = self.spawn(cluster, pod, p) {
                p.terminal = Some(format!("ErrImagePull: {why}"));
            }
        }
    }

    /// Writes the pod's status when it differs from what the process says.
    fn report(&self, cluster: &Cluster, pod: &Value, uid: &str) {
        let status = {
            let map = self.pods.lock().unwrap();
            let Some(p) = map.get(uid) else { return };
            pod_status(pod, p)
        };
        if pod.get("status") != Some(&status) {
            let _ = cluster.replace_status(POD.in_ns(namespace(pod)), name(pod), status);
        }
    }

    fn spawn(&self, cluster: &Cluster, pod: &Value, p: &mut PodProcess) -> Result<(), String> {
        let container = pod
            .pointer("/spec/containers/0")
            .ok_or("the pod has no container")?;
        let image = str_at(container, "/image");
        let (entrypoint, mut env) = image_defaults(image, p.ip);
        env.extend(container_env(cluster, pod, container, p.ip)?);
        let strings = |ptr: &str| -> Option<Vec<String>> {
            container.pointer(ptr).and_then(Value::as_array).map(|a| {
                a.iter()
                    .map(|s| expand(s.as_str().unwrap_or_default(), &env))
                    .collect()
            })
        };
        let mut argv = strings("/command").unwrap_or(entrypoint);
        argv.extend(strings("/args").unwrap_or_default());
        if argv.is_empty() {
            return Err(format!(
                "image {image:?} has no entrypoint in the fake cluster: give the container a command"
            ));
        }
        let root = p.dir.join("root");
        std::fs::create_dir_all(&root).map_err(|e| format!("pod directory: {e}"))?;
        let log = std::fs::File::create(p.dir.join("container.log"))
            .map_err(|e| format!("pod log: {e}"))?;
        let workdir = str_at(container, "/workingDir");
        let args = bwrap_args(
            &root,
            &self.config.picod,
            &p.name,
            if workdir.is_empty() { "/" } else { workdir },
            !self.root,
            &env,
            &argv,
        );
        let child = tokio::process::Command::new(&self.config.bwrap)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot start bubblewrap: {e}"))?;
        p.child = Some(child);
        p.started_at = now_rfc3339();
        Ok(())
    }
}

async fn stop_process(mut p: PodProcess) {
    if let Some(mut child) = p.child.take() {
        if let Some(pid) = child.id() {
            let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
        let _ = child.wait().await;
    }
    // Processes inside the pod's pid namespace die a moment after bubblewrap (the kernel kills
    // them when its init goes): one may still be changing the directory, so retry briefly.
    for _ in 0..50 {
        match std::fs::remove_dir_all(&p.dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await
            }
            _ => break,
        }
    }
}

fn pod_status(pod: &Value, p: &PodProcess) -> Value {
    let container = pod
        .pointer("/spec/containers/0")
        .cloned()
        .unwrap_or_default();
    let running = p.child.is_some();
    let phase = match p.terminal.as_deref() {
        Some("Succeeded") => "Succeeded",
        Some("Failed") => "Failed",
        Some(_) => "Pending",
        None => "Running",
    };
    let state = match (&p.terminal, running, p.last_exit) {
        (Some(t), _, _) if t.starts_with("ErrImagePull") => {
            json!({"waiting": {"reason": "ErrImagePull", "message": t}})
        }
        (_, true, _) => json!({"running": {"startedAt": p.started_at}}),
        (_, false, Some(code)) => {
            json!({"terminated": {"exitCode": code, "reason": if code == 0 { "Completed" } else { "Error" }}})
        }
        _ => json!({"waiting": {"reason": "ContainerCreating"}}),
    };
    let mut status = json!({
        "phase": phase,
        "hostIP": "127.0.0.1",
        "startTime": p.started_at,
        "conditions": [
            condition(pod, "PodScheduled", true, "", ""),
            condition(pod, "ContainersReady", running, "", ""),
            condition(pod, "Ready", running, "", ""),
        ],
        "containerStatuses": [{
            "name": str_at(&container, "/name"),
            "image": str_at(&container, "/image"),
            "ready": running,
            "started": running,
            "restartCount": p.restarts,
            "state": state,
        }],
    });
    if phase == "Running" || running {
        status["podIP"] = json!(p.ip.to_string());
        status["podIPs"] = json!([{"ip": p.ip.to_string()}]);
    }
    status
}
