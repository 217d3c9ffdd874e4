//! What a definition means on this host: environment, limits, forwarded ports, the agent to run,
//! and the entry points (Unix sockets in the sandbox's private directory).

use agentcube_types::EntryPoint;
use k8s_openapi::api::core::v1::{EnvVar, ResourceRequirements};

use super::cgroup::{self, Limits};
use super::layout::{PICOD_SOCKET, SandboxPaths, port_socket};
use crate::backend::{BackendError, Workload, entry_point};

/// What a sandbox of one definition runs.
#[derive(Debug, Clone)]
pub struct Description {
    pub env: Vec<(String, String)>,
    pub resources: Option<ResourceRequirements>,
    /// Ports PicoD forwards into the sandbox (AgentRuntime ports, extra CodeInterpreter ports).
    pub forward_ports: Vec<u16>,
    /// The agent program (AgentRuntime), empty for a CodeInterpreter.
    pub agent: Vec<String>,
    pub entry_points: Vec<EntryPoint>,
    /// The socket files (in `run/`) the host takes once the sandbox has bound them.
    pub sockets: Vec<String>,
    /// `spec.networkPolicy`: the sandbox gets a network of its own, limited to it.
    pub network: Option<agentcube_crds::NetworkPolicySpec>,
}

/// cgroup limits from `resources.limits` (memory, cpu) and the pid limit.
pub fn limits_of(res: Option<&ResourceRequirements>, default_pids: u64) -> Limits {
    let lim = res.and_then(|r| r.limits.as_ref());
    let get = |k: &str| lim.and_then(|l| l.get(k)).map(|q| q.0.clone());
    Limits {
        memory_bytes: get("memory").and_then(|q| cgroup::parse_memory(&q)),
        cpu_millis: get("cpu").and_then(|q| cgroup::parse_cpu(&q)),
        pids: Some(default_pids),
    }
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

/// What sandbox `name` of `workload` runs, with its entry points under `paths`.
pub fn describe(
    workload: &Workload,
    paths: &SandboxPaths,
    name: &str,
) -> Result<Description, BackendError> {
    let namespace = workload.namespace();
    let socket = |file: &str| format!("unix:{}", paths.socket(file).display());
    match workload {
        Workload::CodeInterpreter(ci) => {
            let t = &ci.spec.template;
            let (mut forward_ports, mut entry_points) = (Vec::new(), Vec::new());
            let mut sockets = vec![PICOD_SOCKET.to_string()];
            for (i, p) in ci.spec.effective_ports().iter().enumerate() {
                // The first port is PicoD itself; further ports are forwarded into the sandbox.
                let file = if i == 0 {
                    PICOD_SOCKET.to_string()
                } else {
                    forward_ports.push(p.port as u16);
                    let f = port_socket(p.port as u16);
                    sockets.push(f.clone());
                    f
                };
                entry_points.push(entry_point(p, socket(&file)));
            }
            Ok(Description {
                env: env_of(t.environment.as_ref(), name, &namespace),
                resources: t.resources.clone(),
                forward_ports,
                agent: Vec::new(),
                entry_points,
                sockets,
                network: workload.network_policy().cloned(),
            })
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
            let mut sockets = vec![PICOD_SOCKET.to_string()];
            sockets.extend(ports.iter().map(|p| port_socket(*p)));
            let entry_points = ar
                .spec
                .target_port
                .iter()
                .map(|p| entry_point(p, socket(&port_socket(p.port as u16))))
                .collect();
            Ok(Description {
                env: env_of(c.env.as_ref(), name, &namespace),
                resources: c.resources.clone(),
                forward_ports: ports,
                agent,
                entry_points,
                sockets,
                network: workload.network_policy().cloned(),
            })
        }
    }
}
