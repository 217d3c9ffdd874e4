//! What a definition means on this host: environment, limits, forwarded ports, the agent to run,
//! and the entry points (Unix sockets in the sandbox's private directory).

use agentcube_crds::AgentRuntime;
use agentcube_types::EntryPoint;
use k8s_openapi::api::core::v1::EnvVar;

use super::cgroup::Limits;
use super::image::{HOST_IMAGE, Image, PullPolicy};
use super::layout::{PICOD_SOCKET, SandboxPaths, port_socket};
use super::quantity;
use crate::backend::{BackendError, Workload, entry_point};

/// What a sandbox of one definition runs.
#[derive(Debug, Clone)]
pub struct Description {
    pub env: Vec<(String, String)>,
    /// Ports PicoD forwards into the sandbox (AgentRuntime ports, extra CodeInterpreter ports).
    pub forward_ports: Vec<u16>,
    /// The agent program (AgentRuntime), empty for a CodeInterpreter.
    pub agent: Vec<String>,
    pub entry_points: Vec<EntryPoint>,
    /// The socket files (in `run/`) the host takes once the sandbox has bound them.
    pub sockets: Vec<String>,
    /// `spec.networkPolicy`: the sandbox gets a network of its own, limited to it.
    pub network: Option<agentcube_crds::NetworkPolicySpec>,
    /// The agent's working directory (`workingDir`, else the image's `WorkingDir`).
    pub agent_dir: Option<String>,
    /// The image's root filesystem; `None`: the host's (host mode).
    pub rootfs: Option<std::path::PathBuf>,
}

/// The container an AgentRuntime's sandbox runs: its pod template's first.
fn agent_container(ar: &AgentRuntime) -> Option<&k8s_openapi::api::core::v1::Container> {
    ar.spec.pod_template.spec.containers.first()
}

/// The definition's `imagePullPolicy`.
pub fn pull_policy_of(workload: &Workload) -> PullPolicy {
    use agentcube_crds::ImagePullPolicy as P;
    match workload {
        Workload::CodeInterpreter(ci) => match ci.spec.template.image_pull_policy {
            Some(P::Always) => PullPolicy::Always,
            Some(P::Never) => PullPolicy::Never,
            _ => PullPolicy::IfNotPresent,
        },
        Workload::AgentRuntime(ar) => {
            PullPolicy::parse(agent_container(ar).and_then(|c| c.image_pull_policy.as_deref()))
        }
    }
}

/// The image a definition names, unless it is empty or [`HOST_IMAGE`].
pub fn image_of(workload: &Workload) -> Option<&str> {
    let image = match workload {
        Workload::CodeInterpreter(ci) => ci.spec.template.image.as_deref(),
        Workload::AgentRuntime(ar) => agent_container(ar).and_then(|c| c.image.as_deref()),
    };
    image
        .map(str::trim)
        .filter(|i| !i.is_empty() && *i != HOST_IMAGE)
}

/// The image's environment (without `HOME`: the workspace is home), then the definition's.
fn with_image_env(image: Option<&Image>, env: Vec<(String, String)>) -> Vec<(String, String)> {
    let mut all: Vec<(String, String)> = image
        .map(|i| i.config.env_pairs())
        .unwrap_or_default()
        .into_iter()
        .filter(|(k, _)| k != "HOME")
        .collect();
    all.extend(env);
    all
}

/// The agent's command line, as a container runtime makes it: `command` replaces the image's
/// `Entrypoint` (and drops its `Cmd`), `args` replaces its `Cmd`.
fn agent_argv(c: &k8s_openapi::api::core::v1::Container, image: Option<&Image>) -> Vec<String> {
    let config = image.map(|i| &i.config);
    let entrypoint = match &c.command {
        Some(cmd) if !cmd.is_empty() => cmd.clone(),
        _ => config
            .and_then(|i| i.entrypoint.clone())
            .unwrap_or_default(),
    };
    let args = match (&c.command, &c.args) {
        (_, Some(args)) if !args.is_empty() => args.clone(),
        (Some(cmd), _) if !cmd.is_empty() => Vec::new(),
        _ => config.and_then(|i| i.cmd.clone()).unwrap_or_default(),
    };
    let mut argv = entrypoint;
    argv.extend(args);
    argv
}

/// What a sandbox of a definition may use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sizes {
    /// cgroup limits: `resources.limits` memory and cpu, and the pid limit.
    pub limits: Limits,
    /// The workspace quota: `resources.limits.ephemeral-storage`.
    pub workspace_bytes: Option<u64>,
}

/// The smallest workspace quota: ext4 cannot be made in less than about 512 KiB.
pub const MIN_WORKSPACE_BYTES: u64 = 1 << 20;

/// Why a workspace quota written `given` is refused, when it is under [`MIN_WORKSPACE_BYTES`]
/// (a definition's limit, or `--default-workspace-size`).
pub fn workspace_too_small(given: &str) -> String {
    format!(
        "{given:?} is too small: a workspace filesystem needs at least {}",
        super::human_bytes(MIN_WORKSPACE_BYTES)
    )
}

/// The definition's [`Sizes`] (`None` where it sets none); a limit that is not a Kubernetes
/// quantity, a memory limit of 0 or an ephemeral-storage limit under [`MIN_WORKSPACE_BYTES`] is
/// refused (400) naming it.
pub fn sizes_of(workload: &Workload, default_pids: u64) -> Result<Sizes, BackendError> {
    let res = match workload {
        Workload::CodeInterpreter(ci) => ci.spec.template.resources.as_ref(),
        Workload::AgentRuntime(ar) => agent_container(ar).and_then(|c| c.resources.as_ref()),
    };
    let limit = |key: &str, parse: fn(&str) -> Result<u64, String>, least: u64| {
        let Some(q) = res.and_then(|r| r.limits.as_ref()).and_then(|l| l.get(key)) else {
            return Ok(None);
        };
        match parse(&q.0) {
            Ok(v) if v >= least => Ok(Some(v)),
            Ok(_) if least > 1 => Err(workspace_too_small(&q.0)),
            Ok(_) => Err(format!("must be more than 0, not {:?}", q.0)),
            Err(e) => Err(e),
        }
        .map_err(|e| BackendError::Invalid(format!("resources.limits.{key}: {e}")))
    };
    Ok(Sizes {
        limits: Limits {
            memory_bytes: limit("memory", quantity::bytes, 1)?,
            cpu_millis: limit("cpu", quantity::millicores, 0)?,
            pids: Some(default_pids),
        },
        workspace_bytes: limit("ephemeral-storage", quantity::bytes, MIN_WORKSPACE_BYTES)?,
    })
}

/// The environment of a sandbox: `value`s, and the downward API fields that mean something here
/// (`status.podIP` is the sandbox's own loopback, `metadata.name`/`metadata.namespace` the
/// sandbox's). Other `valueFrom` sources are skipped with a warning.
fn env_of(vars: Option<&Vec<EnvVar>>, name: &str, namespace: &str) -> Vec<(String, String)> {
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

/// What sandbox `name` of `workload` runs, with its entry points under `paths`; refused (400)
/// when no process could be given it ([`check_process`]).
pub fn describe(
    workload: &Workload,
    paths: &SandboxPaths,
    name: &str,
    image: Option<&Image>,
) -> Result<Description, BackendError> {
    let desc = translate(workload, paths, name, image)?;
    check_process(&desc)?;
    Ok(desc)
}

/// Refuses what no process can be given: a NUL byte in an environment variable (the
/// definition's or the image's), the agent's command line or its working directory, and a
/// variable name that is empty or holds `=`. (A NUL would also end an argument of bubblewrap's
/// NUL-separated options, the rest read as options of its own.)
fn check_process(desc: &Description) -> Result<(), BackendError> {
    let invalid = |what: String| Err(BackendError::Invalid(what));
    for (name, value) in &desc.env {
        if name.is_empty() || name.contains(['=', '\0']) {
            return invalid(format!(
                "environment variable name {name:?} (of the definition or its image) must be \
                 non-empty, without '=' or NUL"
            ));
        }
        if value.contains('\0') {
            return invalid(format!(
                "environment variable {name} (of the definition or its image) holds a NUL byte"
            ));
        }
    }
    let agent = desc.agent.iter().chain(&desc.agent_dir);
    if let Some(arg) = agent.into_iter().find(|a| a.contains('\0')) {
        return invalid(format!(
            "the agent's command line or working directory holds a NUL byte: {arg:?}"
        ));
    }
    Ok(())
}

fn translate(
    workload: &Workload,
    paths: &SandboxPaths,
    name: &str,
    image: Option<&Image>,
) -> Result<Description, BackendError> {
    let namespace = workload.namespace();
    let socket = |file: &str| format!("unix:{}", paths.socket(file).display());
    match workload {
        Workload::CodeInterpreter(ci) => {
            let t = &ci.spec.template;
            let (mut forward_ports, mut entry_points) = (Vec::new(), Vec::new());
            let mut sockets = vec![PICOD_SOCKET.to_string()];
            let ports = ci.spec.effective_ports();
            let picod_port = ports.first().map(|p| p.port);
            for p in &ports {
                // The first port is PicoD itself; other ports are forwarded into the sandbox,
                // each once however many entry points (path prefixes) name it.
                let file = if Some(p.port) == picod_port {
                    PICOD_SOCKET.to_string()
                } else {
                    let f = port_socket(p.port as u16);
                    if !forward_ports.contains(&(p.port as u16)) {
                        forward_ports.push(p.port as u16);
                        sockets.push(f.clone());
                    }
                    f
                };
                entry_points.push(entry_point(p, socket(&file)));
            }
            Ok(Description {
                env: with_image_env(image, env_of(t.environment.as_ref(), name, &namespace)),
                forward_ports,
                agent: Vec::new(),
                entry_points,
                sockets,
                network: workload.network_policy().cloned(),
                agent_dir: None,
                rootfs: image.map(|i| i.rootfs.clone()),
            })
        }
        Workload::AgentRuntime(ar) => {
            let c = agent_container(ar).ok_or_else(|| {
                BackendError::Invalid("the AgentRuntime pod template has no container".into())
            })?;
            let agent = agent_argv(c, image);
            if agent.is_empty() {
                return Err(BackendError::Invalid(match image {
                    Some(i) => format!(
                        "container {:?} has no command and image {} has no entrypoint or cmd",
                        c.name, i.reference
                    ),
                    None => format!(
                        "container {:?} has no command: in host mode (no image pulled) give \
                         `command` explicitly",
                        c.name
                    ),
                }));
            }
            let agent_dir = c
                .working_dir
                .clone()
                .or_else(|| image.and_then(|i| i.config.working_dir.clone()))
                .filter(|d| !d.is_empty());
            let mut ports: Vec<u16> = Vec::new();
            for p in &ar.spec.target_port {
                // Each port forwarded once, however many entry points name it.
                if !ports.contains(&(p.port as u16)) {
                    ports.push(p.port as u16);
                }
            }
            let mut sockets = vec![PICOD_SOCKET.to_string()];
            sockets.extend(ports.iter().map(|p| port_socket(*p)));
            let entry_points = ar
                .spec
                .target_port
                .iter()
                .map(|p| entry_point(p, socket(&port_socket(p.port as u16))))
                .collect();
            Ok(Description {
                env: with_image_env(image, env_of(c.env.as_ref(), name, &namespace)),
                forward_ports: ports,
                agent,
                entry_points,
                sockets,
                network: workload.network_policy().cloned(),
                agent_dir,
                rootfs: image.map(|i| i.rootfs.clone()),
            })
        }
    }
}
