//! One pod as a process: start (volumes, environment, bubblewrap), restarts under the pod's
//! `restartPolicy` with back-off, termination with the grace period, and the status the API
//! server is told.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde_json::{Value, json};

use super::Shared;
use super::runtime::{self, PodContext, Sandbox};

/// A pod's process and what the kubelet knows about it.
pub struct PodProcess {
    pub namespace: String,
    pub name: String,
    /// `spec.hostname`, else the pod's name.
    pub hostname: String,
    pub ip: Ipv4Addr,
    pub dir: PathBuf,
    pub child: Option<tokio::process::Child>,
    pub restarts: u32,
    restart_at: Option<Instant>,
    started_at: String,
    pod_started: String,
    /// When the container last exited (`lastState.terminated.finishedAt`).
    exited_at: String,
    last_exit: Option<i32>,
    /// Set when the pod ended for good (`Succeeded`/`Failed`) or cannot start (the reason).
    terminal: Option<String>,
    /// Why the container is not created yet (retried): the waiting reason (`ContainerCreating`,
    /// or `ErrImagePull` for a pull that may pass) and message.
    creating: Option<(&'static str, String)>,
    /// When the current container started, and its startup and liveness probes' state.
    started: Instant,
    pub probes: super::probe::Probes,
    /// Last status written to the API server.
    pub reported: Option<Value>,
    /// Result of the last readiness check.
    pub ready: bool,
}

/// Why a container did not start.
enum StartError {
    /// Never will: the image maps to no program (`ErrImagePull`).
    Image(String),
    /// Not yet: its registry cannot be reached (`ErrImagePull`, retried).
    Pull(String),
    /// Not yet: what it needs is missing (retried).
    NotYet(anyhow::Error),
}

impl<E: Into<anyhow::Error>> From<E> for StartError {
    fn from(e: E) -> Self {
        Self::NotYet(e.into())
    }
}

pub fn now_rfc3339() -> String {
    jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

impl PodProcess {
    pub fn new(pod: &Pod, ip: Ipv4Addr, dir: PathBuf) -> Self {
        Self {
            namespace: pod.metadata.namespace.clone().unwrap_or_default(),
            name: pod.metadata.name.clone().unwrap_or_default(),
            hostname: pod
                .spec
                .as_ref()
                .and_then(|s| s.hostname.clone())
                .or_else(|| pod.metadata.name.clone())
                .unwrap_or_default(),
            ip,
            dir,
            child: None,
            restarts: 0,
            restart_at: None,
            started_at: now_rfc3339(),
            pod_started: now_rfc3339(),
            exited_at: String::new(),
            last_exit: None,
            terminal: None,
            creating: None,
            started: Instant::now(),
            probes: Default::default(),
            reported: None,
            ready: false,
        }
    }

    /// Starts the pod's first container. An image that maps to no program marks the pod for good
    /// (`ErrImagePull`); anything else (a Secret or ConfigMap that does not exist yet, e.g.
    /// `kube-root-ca.crt` right after the cluster starts) is retried every second while the pod
    /// waits in `ContainerCreating`, as a kubelet does.
    pub async fn start(&mut self, shared: &Shared, pod: &Pod) {
        self.creating = None;
        match self.spawn(shared, pod).await {
            Ok(()) => {}
            Err(StartError::Image(msg)) => {
                tracing::warn!(pod = %self.name, error = %msg, "cannot start pod");
                self.terminal = Some(format!("ErrImagePull: {msg}"));
            }
            Err(StartError::NotYet(e)) => {
                let msg = format!("{e:#}");
                tracing::info!(pod = %self.name, error = %msg, "pod not startable yet; retrying");
                self.creating = Some(("ContainerCreating", msg));
                self.restart_at = Some(Instant::now() + Duration::from_secs(1));
            }
            Err(StartError::Pull(msg)) => {
                tracing::info!(pod = %self.name, error = %msg, "image not pulled yet; retrying");
                self.creating = Some(("ErrImagePull", msg));
                self.restart_at = Some(Instant::now() + Duration::from_secs(1));
            }
        }
    }

    async fn spawn(&mut self, shared: &Shared, pod: &Pod) -> Result<(), StartError> {
        let spec = pod.spec.clone().unwrap_or_default();
        let container = spec
            .containers
            .first()
            .ok_or_else(|| StartError::Image("the pod has no container".into()))?;
        let image_name = container.image.clone().unwrap_or_default();
        let image_name = super::images::through_slow_registry(&image_name, self.started.elapsed())
            .map_err(StartError::Pull)?;
        let image = shared.config.images.find(&image_name).ok_or_else(|| {
            StartError::Image(format!(
                "image {image_name:?} has no mapping to a program on this host"
            ))
        })?;
        let ctx = PodContext {
            ip: self.ip,
            node: shared.config.node.clone(),
            api_host: shared.config.api_host.clone(),
            api_port: shared.config.api_port,
        };
        let env = runtime::environment(&shared.client, pod, container, image, &ctx).await?;
        let argv = runtime::argv(container, image, &env);
        if argv.is_empty() {
            return Err(StartError::Image(format!(
                "image {image_name:?} has no entrypoint here: give the container a command"
            )));
        }
        let root = self.dir.join("root");
        std::fs::create_dir_all(&root)?;
        let mounts = runtime::volumes(&shared.client, pod, container, &ctx, &self.dir).await?;
        let hostname = self.hostname.clone();
        let hosts_file = self.dir.join("hosts");
        std::fs::write(&hosts_file, shared.hosts_for(self.ip, &hostname))?;
        let log = std::fs::File::create(self.dir.join("container.log"))?;
        let workdir = container.working_dir.clone().unwrap_or_else(|| "/".into());
        // As root, a container asking for a uid runs as it (bubblewrap then unprivileged, in a
        // user namespace of that uid); otherwise as this process's user.
        let user = runtime::run_as(pod, container).filter(|_| shared.root);
        let args = runtime::bwrap_args(&Sandbox {
            root: &root,
            hosts_file: &hosts_file,
            hostname: &hostname,
            workdir: &workdir,
            unprivileged: !shared.root || user.is_some(),
            image,
            mounts: &mounts,
            env: &env,
            argv: &argv,
        });
        let mut command = match user {
            Some((uid, gid)) => {
                let mut c = tokio::process::Command::new("setpriv");
                c.args([
                    format!("--reuid={uid}"),
                    format!("--regid={gid}"),
                    "--clear-groups".into(),
                    "--".into(),
                ])
                .arg(&shared.config.bwrap);
                c
            }
            None => tokio::process::Command::new(&shared.config.bwrap),
        };
        let child = command
            .args(&args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| anyhow::anyhow!("cannot start bubblewrap: {e}"))?;
        tracing::debug!(pod = %self.name, pid = child.id(), "container started");
        self.child = Some(child);
        self.started_at = now_rfc3339();
        self.started = Instant::now();
        self.probes = Default::default();
        Ok(())
    }

    /// Notices an exit (or kills a container that failed its startup or liveness probe); restarts under the
    /// restart policy, with back-off (1 s doubling to 30 s).
    pub async fn check(&mut self, shared: &Shared, pod: &Pod) {
        if let Some(pid) = self.child.as_ref().and_then(|c| c.id())
            && self.probes.failed(pod, self.ip, self.started).await
        {
            tracing::info!(pod = %self.name, "startup or liveness probe failed; restarting the container");
            let _ = nix::sys::signal::killpg(
                Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            if let Some(child) = &mut self.child {
                let _ = child.wait().await;
            }
        }
        if let Some(child) = &mut self.child
            && let Ok(Some(status)) = child.try_wait()
        {
            self.child = None;
            self.ready = false;
            self.last_exit = Some(status.code().unwrap_or(137));
            self.exited_at = now_rfc3339();
            let policy = pod
                .spec
                .as_ref()
                .and_then(|s| s.restart_policy.as_deref())
                .unwrap_or("Always");
            let restart = match policy {
                "Never" => false,
                "OnFailure" => !status.success(),
                _ => true,
            };
            if restart {
                let backoff =
                    Duration::from_secs(1 << self.restarts.min(5)).min(Duration::from_secs(30));
                self.restart_at = Some(Instant::now() + backoff);
            } else {
                self.terminal = Some(
                    if status.success() {
                        "Succeeded"
                    } else {
                        "Failed"
                    }
                    .into(),
                );
            }
        }
        if self.child.is_none()
            && self.terminal.is_none()
            && self.restart_at.is_some_and(|t| Instant::now() >= t)
        {
            self.restart_at = None;
            if self.creating.is_none() {
                self.restarts += 1;
            }
            self.start(shared, pod).await;
        }
    }

    /// Kills the pod: SIGTERM to its container's program (PID 1 of its namespace, as a container
    /// runtime sends it), SIGKILL to bubblewrap after `grace` (its namespace dies with it);
    /// removes its directory. (A SIGTERM to bubblewrap itself ended it at once and its
    /// container with SIGKILL: no program ever saw the grace period.)
    pub async fn stop(mut self, grace: Duration) {
        if let Some(mut child) = self.child.take() {
            if let Some(pid) = child.id() {
                if let Some(program) = only_child(pid) {
                    let _ = nix::sys::signal::kill(program, Signal::SIGTERM);
                }
                if tokio::time::timeout(grace, child.wait()).await.is_err() {
                    let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
                }
            }
            let _ = child.wait().await;
        }
        // Processes in the pod's pid namespace die a moment after bubblewrap (the kernel kills
        // them when its init goes): one may still be writing to the directory, so retry.
        for _ in 0..50 {
            match std::fs::remove_dir_all(&self.dir) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                _ => break,
            }
        }
    }

    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    /// The pod status this process amounts to.
    pub fn status(&self, pod: &Pod) -> Value {
        let container = pod
            .spec
            .as_ref()
            .and_then(|s| s.containers.first().cloned())
            .unwrap_or_default();
        let running = self.child.is_some();
        let ready = running && self.ready;
        let phase = match self.terminal.as_deref() {
            Some("Succeeded") => "Succeeded",
            Some("Failed") => "Failed",
            Some(_) => "Pending",
            // Nothing started yet (a Secret or an image pull awaited): a kubelet says Pending.
            None if self.creating.is_some() && !running && self.last_exit.is_none() => "Pending",
            None => "Running",
        };
        let state = match (&self.terminal, running, self.last_exit) {
            (Some(t), _, _) if t.starts_with("ErrImagePull") => {
                json!({"waiting": {"reason": "ErrImagePull", "message": t}})
            }
            (_, true, _) => json!({"running": {"startedAt": self.started_at}}),
            // Exited, to be restarted after its back-off: a kubelet says `CrashLoopBackOff`
            // (the exit goes to `lastState`, below).
            (None, false, Some(_)) if self.restart_at.is_some() => {
                json!({"waiting": {"reason": "CrashLoopBackOff",
                    "message": format!("back-off restarting failed container {}", container.name)}})
            }
            (_, false, Some(code)) => json!({"terminated": {"exitCode": code,
                "reason": if code == 0 { "Completed" } else { "Error" }}}),
            _ => match &self.creating {
                Some((reason, why)) => json!({"waiting": {"reason": reason, "message": why}}),
                None => json!({"waiting": {"reason": "ContainerCreating"}}),
            },
        };
        let cond =
            |t: &str, ok: bool| json!({"type": t, "status": if ok { "True" } else { "False" }});
        let mut status = json!({
            "phase": phase,
            "hostIP": "127.0.0.1",
            "hostIPs": [{"ip": "127.0.0.1"}],
            "startTime": self.pod_started,
            "conditions": [cond("PodScheduled", true), cond("Initialized", true),
                           cond("ContainersReady", ready), cond("Ready", ready)],
            "containerStatuses": [{
                "name": container.name,
                "image": container.image.unwrap_or_default(),
                "imageID": "",
                "ready": ready,
                "started": running,
                "restartCount": self.restarts,
                "state": state,
            }],
        });
        if let (Some(code), None) = (self.last_exit, &self.terminal) {
            status["containerStatuses"][0]["lastState"] = json!({"terminated": {"exitCode": code,
                "reason": if code == 0 { "Completed" } else { "Error" },
                "finishedAt": self.exited_at}});
        }
        if phase == "Running" {
            status["podIP"] = json!(self.ip.to_string());
            status["podIPs"] = json!([{"ip": self.ip.to_string()}]);
        }
        status
    }
}

/// The one child of process `pid` (bubblewrap's: the container's program, PID 1 of its
/// namespace), if it has one.
fn only_child(pid: u32) -> Option<Pid> {
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).ok()?;
    let mut ids = children.split_whitespace();
    let first = ids.next()?.parse().ok()?;
    ids.next().is_none().then(|| Pid::from_raw(first))
}
