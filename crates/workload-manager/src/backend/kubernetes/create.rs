//! The two create paths (spec §2.3): a Sandbox, or a SandboxClaim on a warm pool; then the pod,
//! its IP and the port probe.

use agentcube_crds::TargetPort;
use agentcube_crds::labels;
use agentcube_crds::sandbox::{Sandbox as SandboxObject, SandboxClaim};
use agentcube_types::{BackingKind, EntryPoint};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PostParams};

use super::{KubernetesBackend, probe, watched};
use crate::backend::{BackendError, Sandbox, entry_point};

impl KubernetesBackend {
    pub(super) async fn create_sandbox(
        &self,
        namespace: &str,
        sandbox: SandboxObject,
        ports: &[TargetPort],
    ) -> Result<Sandbox, BackendError> {
        let api: Api<SandboxObject> =
            Api::namespaced_with(self.client.clone(), namespace, &self.api);
        let created = api.create(&PostParams::default(), &sandbox).await?;
        let (name, uid) = (watched::name(&created), watched::uid(&created));
        let ready = self
            .sandboxes
            .wait_for(namespace, &name, |s| {
                (watched::uid(s) == uid && s.is_ready()).then(|| s.clone())
            })
            .await;
        let (identity, entry_points) = self.reachable(namespace, &ready, ports).await?;
        Ok(Sandbox {
            kind: BackingKind::Sandbox,
            id: uid,
            name,
            entry_points,
            identity,
        })
    }

    pub(super) async fn create_claim(
        &self,
        namespace: &str,
        claim: SandboxClaim,
        ports: &[TargetPort],
    ) -> Result<Sandbox, BackendError> {
        let api: Api<SandboxClaim> =
            Api::namespaced_with(self.client.clone(), namespace, &self.api);
        let created = api.create(&PostParams::default(), &claim).await?;
        let (name, uid) = (watched::name(&created), watched::uid(&created));
        let bound = self
            .claims
            .wait_for(namespace, &name, |c| {
                let sandbox = c.status.as_ref()?.sandbox.as_ref()?.name.clone();
                (watched::uid(c) == uid && !sandbox.is_empty()).then_some(sandbox)
            })
            .await;
        let ready = self
            .sandboxes
            .wait_for(namespace, &bound, |s| s.is_ready().then(|| s.clone()))
            .await;
        let (identity, entry_points) = self.reachable(namespace, &ready, ports).await?;
        Ok(Sandbox {
            kind: BackingKind::SandboxClaim,
            // The Sandbox's uid (upstream's `sandboxId`); the record is named after the claim.
            id: watched::uid(&ready),
            name,
            entry_points,
            identity,
        })
    }

    /// The pod behind a Ready Sandbox must be Running with an IP, and every port must accept TCP.
    /// Returns the pod's name (the sandbox identity PicoD reads from the downward API) and the
    /// entry points.
    async fn reachable(
        &self,
        namespace: &str,
        sandbox: &SandboxObject,
        ports: &[TargetPort],
    ) -> Result<(String, Vec<EntryPoint>), BackendError> {
        let pod_name = pod_name_of(sandbox);
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        let pod = pods.get(&pod_name).await?;
        let status = pod.status.unwrap_or_default();
        let ip = match (status.phase.as_deref(), status.pod_ip) {
            (Some("Running"), Some(ip)) if !ip.is_empty() => ip,
            (phase, _) => {
                return Err(BackendError::Failed(format!(
                    "pod {namespace}/{pod_name} is not running with an IP (phase {})",
                    phase.unwrap_or("unknown")
                )));
            }
        };
        let mut entry_points = Vec::with_capacity(ports.len());
        for port in ports {
            let addr = join_host_port(&ip, port.port);
            probe::wait_open(&addr, self.config.probe_timeout)
                .await
                .map_err(|_| BackendError::NotReady(format!("{pod_name} ({addr} closed)")))?;
            entry_points.push(entry_point(port, addr));
        }
        Ok((pod_name, entry_points))
    }
}

/// `host:port`, with brackets for IPv6 (Go's `net.JoinHostPort`).
fn join_host_port(host: &str, port: u32) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// The pod behind a Sandbox: annotation `agents.x-k8s.io/pod-name` (a pod adopted from a warm
/// pool, agent-sandbox before v0.4), else the pod named like the Sandbox.
fn pod_name_of(sandbox: &SandboxObject) -> String {
    sandbox
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(labels::POD_NAME))
        .cloned()
        .unwrap_or_else(|| watched::name(sandbox))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pod_is_named_by_the_adoption_annotation_or_like_the_sandbox() {
        let mut sb: SandboxObject = serde_json::from_value(serde_json::json!({
            "apiVersion": "agents.x-k8s.io/v1alpha1", "kind": "Sandbox",
            "metadata": {"name": "ci-abc"}, "spec": {"podTemplate": {"spec": {"containers": []}}}
        }))
        .unwrap();
        assert_eq!(pod_name_of(&sb), "ci-abc");
        sb.metadata.annotations =
            Some([(labels::POD_NAME.to_string(), "pool-pod-1".to_string())].into());
        assert_eq!(pod_name_of(&sb), "pool-pod-1");
    }

    #[test]
    fn host_and_port_join_like_go() {
        assert_eq!(join_host_port("10.0.0.1", 8080), "10.0.0.1:8080");
        assert_eq!(join_host_port("fd00::1", 8080), "[fd00::1]:8080");
    }
}
