//! Starting a sandbox ([`LocalBackend::start`]): the definition read, memory budget and uid
//! taken, directories, cgroups, network and workspace made, the launcher (bubblewrap or runsc)
//! spawned, and PicoD's sockets claimed and probed; a failure at any step undoes the ones
//! before it.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use nix::unistd::Pid;

use agentcube_types::BackingKind;

use super::cgroup::SandboxCgroup;
use super::launch::LaunchSpec;
use super::layout::{PICOD_SOCKET, SandboxPaths};
use super::{
    Assigned, BackendError, Busy, LocalBackend, Running, Sandbox, Workload, human_bytes, image,
    launch, layout, net, output, probe, workload,
};

impl LocalBackend {
    pub(super) async fn start(
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
    pub(super) async fn try_start(
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
    pub(super) async fn image(
        &self,
        workload: &Workload,
    ) -> Result<Option<Arc<image::Image>>, BackendError> {
        match (workload::image_of(workload), &self.inner.images) {
            (Some(reference), Some((images, _))) => {
                let policy = workload::pull_policy_of(workload);
                Ok(Some(images.get(reference, policy).await?))
            }
            _ => Ok(None),
        }
    }

    /// A network namespace limited to `policy`, or why this host cannot make one.
    pub(super) async fn attach_network(
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
    pub(super) fn network_tool(&self) -> PathBuf {
        self.inner
            .network
            .as_ref()
            .map(|n| n.nsenter_binary().to_path_buf())
            .unwrap_or_else(|_| PathBuf::from("nsenter"))
    }

    /// Directories, cgroups, launcher inputs, and the launcher process itself.
    pub(super) async fn launch(
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
        paths.create(uid).map_err(|e| match e.raw_os_error() {
            Some(e) if e == nix::errno::Errno::ENOSPC as i32 => BackendError::Exhausted(
                "the disk where the Workload Manager keeps sandboxes is full: retry once \
                 sessions have ended"
                    .into(),
            ),
            _ => fail("cannot create sandbox directories", e),
        })?;
        let limits = sizes.limits;
        let workspace = sizes
            .workspace_bytes
            .or(cfg.default_workspace_bytes)
            .filter(|_| self.inner.quotas.is_some());
        let workspace_fs = match (&self.inner.quotas, workspace) {
            (Some(q), Some(bytes)) => Some(q.image(paths, bytes).await?),
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
        let started = match self.spawn_launcher(&spec, name, paths) {
            Ok(started) => self.format_workspace(&spec, uid, started).await,
            Err(e) => Err(e),
        };
        let (mut child, drained) = match started {
            Ok(started) => started,
            Err(e) => {
                // No sandbox record holds the cgroup yet: removed here (empty once the launcher
                // is gone).
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

    /// Formats the workspace image of `spec`, if any, while its launcher starts, then lets the
    /// launcher mount it (`go` on its standard input; `launch`'s `PROLOGUE`). When formatting
    /// fails the launcher is told nothing: it reads the end of its input and exits (95) without
    /// running anything, and is waited for.
    async fn format_workspace(
        &self,
        spec: &LaunchSpec,
        uid: Option<u32>,
        (mut child, drained): (tokio::process::Child, output::Drained),
    ) -> Result<(tokio::process::Child, output::Drained), BackendError> {
        use tokio::io::AsyncWriteExt;
        let (Some(quotas), Some(fs)) = (&self.inner.quotas, &spec.workspace_fs) else {
            return Ok((child, drained));
        };
        let go = child.stdin.take();
        match quotas.format(fs, uid).await {
            Ok(()) => {
                // A launcher already gone (it could not join its cgroups) is seen by the
                // readiness wait, with its status.
                if let Some(mut go) = go {
                    let _ = go.write_all(b"go\n").await;
                }
                Ok((child, drained))
            }
            Err(e) => {
                drop(go);
                let _ = child.wait().await;
                Err(e)
            }
        }
    }

    /// Starts the sandbox's launcher, its output going through a pipe to the sandbox's log
    /// ([`output`]); its standard input a pipe when it mounts a workspace filesystem.
    pub(super) fn spawn_launcher(
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
            .stdin(if spec.workspace_fs.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(out.stdout)
            .stderr(out.stderr)
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| fail("cannot start the sandbox launcher", e))?;
        Ok((child, drained))
    }

    /// Writes the launcher's inputs into the private directory and returns its argv.
    pub(super) fn launcher(&self, spec: &LaunchSpec, name: &str) -> std::io::Result<Vec<String>> {
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
    pub(super) async fn wait_ready(
        &self,
        name: &str,
        paths: &SandboxPaths,
        sockets: &[String],
        ports_too: bool,
    ) -> Result<(), BackendError> {
        let started = tokio::time::Instant::now();
        let deadline = started + self.inner.config.ready_timeout;
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
            tokio::time::sleep(next_look(started.elapsed())).await;
        }
        Err(BackendError::NotReady(format!(
            "sandbox {name} not ready within {:?}: {missing}",
            self.inner.config.ready_timeout
        )))
    }

    /// The launcher's exit status if it has exited.
    pub(super) fn exited(
        &self,
        name: &str,
    ) -> Result<Option<std::process::ExitStatus>, BackendError> {
        let running = self.inner.running.lock().unwrap();
        match running.get(name) {
            Some(r) => Ok(*r.exit.borrow()),
            None => Err(BackendError::NotReady(format!("{name} (removed)"))),
        }
    }

    /// Hands a ready sandbox's later death to GC, unless it has died already (then its start
    /// fails, and the starter removes it). Under the same lock as [`LocalBackend::on_exit`]'s
    /// check, so a death is always either the starter's or GC's.
    pub(super) fn mark_started(&self, name: &str) -> Result<(), BackendError> {
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
    pub(super) fn on_exit(&self, name: &str, status: Option<std::process::ExitStatus>) {
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
}

/// How long a start waits before looking again at a sandbox that is not ready, `elapsed` into
/// it: 1 ms at first, then an eighth of the time so far, at most 50 ms. A sandbox is seen ready
/// at most an eighth (and 1 ms) after it is, with a few dozen looks over the slowest start. (The
/// doubling from 2 ms it replaces looked at 30 and 62 ms: a sandbox ready in 35 ms was seen at
/// 62; `bench-wm`'s cold create went from 84 to 63 ms, and in a quieter hour from 43 to 37.)
fn next_look(elapsed: Duration) -> Duration {
    (elapsed / 8).clamp(Duration::from_millis(1), Duration::from_millis(50))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ready_sandbox_is_seen_within_an_eighth_of_its_start_and_looks_stay_few() {
        let ms = Duration::from_millis;
        let looks = |until: Duration| {
            let (mut t, mut n, mut worst) = (Duration::ZERO, 0, Duration::ZERO);
            while t < until {
                let next = next_look(t);
                worst = worst.max(next.saturating_sub(t / 8));
                t += next;
                n += 1;
            }
            (n, worst)
        };
        let (n, worst) = looks(ms(30_000));
        assert!(n < 700, "{n} looks over a 30 s start");
        assert!(worst <= ms(1), "seen up to {worst:?} beyond an eighth");
        assert!(looks(ms(40)).0 >= 20, "a fast start is looked at often");
        assert_eq!(next_look(ms(0)), ms(1));
        assert_eq!(next_look(ms(80)), ms(10));
        assert_eq!(next_look(ms(10_000)), ms(50));
    }
}
