//! The two create paths (spec §2.3): a Sandbox, or a SandboxClaim on a warm pool; then the pod,
//! its IP and the port probe.

use agentcube_crds::TargetPort;
use agentcube_crds::labels;
use agentcube_crds::sandbox::{Sandbox as SandboxObject, SandboxClaim, ready_condition};
use agentcube_types::{BackingKind, EntryPoint};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{Api, PostParams};

use super::stuck::refusal;
use super::{KubernetesBackend, desired, probe, watched};
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
        let ready = self.sandboxes.wait_for(namespace, &name, |s| {
            if watched::uid(s) != uid {
                None
            } else if s.is_ready() {
                Some(Ok(s.clone()))
            } else {
                refusal(&format!("Sandbox {name}"), s.conditions()).map(Err)
            }
        });
        let pod = || {
            let sandbox = self.sandboxes.get(namespace, &name)?;
            Some((format!("Sandbox {name}"), pod_name_of(&sandbox)))
        };
        let reachable = async {
            let ready = ready.await?;
            self.reachable(namespace, &ready, ports, self.config.probe_timeout)
                .await
        };
        let (identity, entry_points) = tokio::select! {
            reachable = reachable => reachable?,
            failed = self.pod_failed(namespace, pod) => return Err(failed),
        };
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
        mut claim: SandboxClaim,
        ports: &[TargetPort],
    ) -> Result<Sandbox, BackendError> {
        let api: Api<SandboxClaim> =
            Api::namespaced_with(self.client.clone(), namespace, &self.api);
        desired::stamp_observed(&mut claim, jiff::Timestamp::now());
        let created = api.create(&PostParams::default(), &claim).await?;
        let (name, uid) = (watched::name(&created), watched::uid(&created));
        let pod = || {
            let claim = self.claims.get(namespace, &name)?;
            let (sb, _) = sandbox_name_of(&claim)?;
            let sandbox = self.sandboxes.get(namespace, sb)?;
            Some((
                format!("Sandbox {sb} (of SandboxClaim {name})"),
                pod_name_of(&sandbox),
            ))
        };
        let reachable = async {
            let ready = self.adopted(namespace, &name, &uid).await?;
            let (identity, entry_points) = self
                .reachable(namespace, &ready, ports, self.config.probe_timeout)
                .await?;
            Ok::<_, BackendError>((ready, identity, entry_points))
        };
        let (ready, identity, entry_points) = tokio::select! {
            reachable = reachable => reachable?,
            failed = self.pod_failed(namespace, pod) => return Err(failed),
        };
        Ok(Sandbox {
            kind: BackingKind::SandboxClaim,
            // The Sandbox's uid (upstream's `sandboxId`); the record is named after the claim.
            id: watched::uid(&ready),
            name,
            entry_points,
            identity,
        })
    }

    /// The Ready Sandbox claim `name` (uid `uid`) got: the one its status names, or — sooner,
    /// by one write of agent-sandbox — the warm Sandbox its annotation names once the claim is
    /// that Sandbox's controller owner (the adoption is then final). Waits on both watches;
    /// callers bound it with a timeout. Fails at once when the claim is refused for good
    /// ([`refusal`]).
    async fn adopted(
        &self,
        namespace: &str,
        name: &str,
        uid: &str,
    ) -> Result<SandboxObject, BackendError> {
        let (mut claims, mut sandboxes) = (self.claims.subscribe(), self.sandboxes.subscribe());
        loop {
            claims.borrow_and_update();
            sandboxes.borrow_and_update();
            if let Some(ready) = self.bound_and_ready(namespace, name, uid) {
                return Ok(ready);
            }
            if let Some(refused) = self.claim_refused(namespace, name, uid) {
                return Err(refused);
            }
            tokio::select! {
                r = claims.changed() => if r.is_err() { std::future::pending::<()>().await },
                r = sandboxes.changed() => if r.is_err() { std::future::pending::<()>().await },
            }
        }
    }

    /// What the claim or Sandbox `namespace/name` of a create is still waiting for, from the
    /// watch caches.
    pub(super) fn stalled_on(&self, namespace: &str, name: &str) -> String {
        let sandbox = |sb: &str| self.sandboxes.get(namespace, sb);
        if let Some(claim) = self.claims.get(namespace, name) {
            return match sandbox_name_of(&claim) {
                Some((sb, _)) => match sandbox(sb) {
                    Some(s) => format!(
                        "SandboxClaim {name} got Sandbox {sb}, which {}",
                        readiness(&s)
                    ),
                    None => format!("SandboxClaim {name} names Sandbox {sb}, which is gone"),
                },
                None => format!(
                    "SandboxClaim {name} has no Sandbox yet (is its warm pool empty and not \
                     refilling?); the claim {}",
                    condition_text(claim.conditions())
                ),
            };
        }
        match sandbox(name) {
            Some(s) => format!("Sandbox {name} {}", readiness(&s)),
            None => format!("{name} is not in the Workload Manager's watch cache"),
        }
    }

    /// Why the claim `name` (uid `uid`) will never be Ready, if so. (agent-sandbox copies a
    /// refusal of the claim's Sandbox or pod into the claim's own Ready condition.)
    fn claim_refused(&self, namespace: &str, name: &str, uid: &str) -> Option<BackendError> {
        let claim = self.claims.get(namespace, name)?;
        if watched::uid(claim.as_ref()) != uid {
            return None;
        }
        refusal(&format!("SandboxClaim {name}"), claim.conditions())
    }

    fn bound_and_ready(&self, namespace: &str, name: &str, uid: &str) -> Option<SandboxObject> {
        let claim = self.claims.get(namespace, name)?;
        bound(&claim, uid, |s| self.sandboxes.get(namespace, s))
    }

    /// The pod behind a Ready Sandbox must be Running with an IP, and every port must accept TCP
    /// within `probe_timeout`. Returns the pod's name (the sandbox identity PicoD reads from the
    /// downward API) and the entry points.
    pub(super) async fn reachable(
        &self,
        namespace: &str,
        sandbox: &SandboxObject,
        ports: &[TargetPort],
        probe_timeout: std::time::Duration,
    ) -> Result<(String, Vec<EntryPoint>), BackendError> {
        let pod_name = pod_name_of(sandbox);
        // agent-sandbox reports Ready only for a Running, Ready pod with IPs, and names them
        // (v0.5+); otherwise the pod is asked.
        let ip = match sandbox.pod_ip().filter(|_| sandbox.is_ready()) {
            Some(ip) => ip.to_string(),
            None => self.pod_ip(namespace, &pod_name).await?,
        };
        let mut entry_points = Vec::with_capacity(ports.len());
        for port in ports {
            let addr = join_host_port(&ip, port.port);
            probe::wait_open(&addr, probe_timeout).await.map_err(|_| {
                BackendError::NotReady(format!(
                    "nothing accepts connections on {addr} (pod {pod_name}) within {:?}",
                    probe_timeout
                ))
            })?;
            entry_points.push(entry_point(port, addr));
        }
        Ok((pod_name, entry_points))
    }

    /// The IP of a Running pod.
    async fn pod_ip(&self, namespace: &str, pod_name: &str) -> Result<String, BackendError> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        let status = pods.get(pod_name).await?.status.unwrap_or_default();
        match (status.phase.as_deref(), status.pod_ip) {
            (Some("Running"), Some(ip)) if !ip.is_empty() => Ok(ip),
            (phase, _) => Err(BackendError::Failed(format!(
                "pod {namespace}/{pod_name} is not running with an IP (phase {})",
                phase.unwrap_or("unknown")
            ))),
        }
    }
}

/// The Ready Sandbox `claim` (if its uid is `uid`) is bound to, looked up with `sandbox`: the one
/// its status names, or the one its assignment annotation names once the claim controls it.
pub(super) fn bound(
    claim: &SandboxClaim,
    uid: &str,
    sandbox: impl Fn(&str) -> Option<std::sync::Arc<SandboxObject>>,
) -> Option<SandboxObject> {
    if watched::uid(claim) != uid {
        return None;
    }
    let (name, by_status) = sandbox_name_of(claim)?;
    let s = sandbox(name)?;
    (s.is_ready() && (by_status || s.controlled_by(uid))).then(|| s.as_ref().clone())
}

/// The Sandbox `claim` names: its status's (then `true`), else its assignment annotation's.
pub(super) fn sandbox_name_of(claim: &SandboxClaim) -> Option<(&str, bool)> {
    let named = claim.status.as_ref().and_then(|s| s.sandbox.as_ref());
    match named.filter(|n| !n.name.is_empty()) {
        Some(n) => Some((n.name.as_str(), true)),
        None => {
            let annotations = claim.metadata.annotations.as_ref()?;
            Some((annotations.get(labels::ASSIGNED_SANDBOX)?.as_str(), false))
        }
    }
}

/// A Sandbox's readiness in words, for a log.
fn readiness(sandbox: &SandboxObject) -> String {
    if sandbox.is_ready() {
        return "is Ready (its pod's IP or ports did not answer)".into();
    }
    condition_text(sandbox.conditions())
}

/// `is not Ready (<reason>: <message>)` from an object's conditions.
fn condition_text(conditions: Option<&[Condition]>) -> String {
    match ready_condition(conditions) {
        Some(c) => format!("is not Ready ({}: {})", c.reason, c.message),
        None => "reports no Ready condition yet".into(),
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
pub(super) fn pod_name_of(sandbox: &SandboxObject) -> String {
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
    fn a_claim_is_bound_by_its_status_or_by_a_finished_adoption() {
        let claim = |annotation: bool, status: bool| -> SandboxClaim {
            serde_json::from_value(serde_json::json!({
                "apiVersion": "extensions.agents.x-k8s.io/v1beta1", "kind": "SandboxClaim",
                "metadata": {"name": "c", "uid": "claim-uid", "annotations":
                    if annotation { serde_json::json!({"agents.x-k8s.io/sandbox-name": "warm-1"}) }
                    else { serde_json::json!({}) }},
                "spec": {"warmPoolRef": {"name": "pool"}},
                "status": if status { serde_json::json!({"sandbox": {"name": "warm-1"}}) }
                          else { serde_json::json!({}) }
            }))
            .unwrap()
        };
        let sandbox = |owner: &str, ready: bool| {
            let s: SandboxObject = serde_json::from_value(serde_json::json!({
                "apiVersion": "agents.x-k8s.io/v1beta1", "kind": "Sandbox",
                "metadata": {"name": "warm-1", "ownerReferences": [{"apiVersion": "x/v1",
                    "kind": "K", "name": "o", "uid": owner, "controller": true}]},
                "spec": {"podTemplate": {"spec": {"containers": []}}},
                "status": {"conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" },
                    "lastTransitionTime": "2026-01-01T00:00:00Z", "reason": "R", "message": ""}],
                    "podIPs": ["10.0.0.7"]}
            }))
            .unwrap();
            move |name: &str| (name == "warm-1").then(|| std::sync::Arc::new(s.clone()))
        };
        let is_bound = |c: &SandboxClaim, uid: &str, s| bound(c, uid, s).is_some();
        // Assigned but still the warm pool's: not yet.
        assert!(!is_bound(
            &claim(true, false),
            "claim-uid",
            sandbox("pool-uid", true)
        ));
        // Assigned and owned by the claim: bound (before the claim's status says so).
        let got = bound(&claim(true, false), "claim-uid", sandbox("claim-uid", true)).unwrap();
        assert_eq!(got.pod_ip(), Some("10.0.0.7"));
        // Owned but not Ready; a claim of another uid; nothing assigned.
        assert!(!is_bound(
            &claim(true, false),
            "claim-uid",
            sandbox("claim-uid", false)
        ));
        assert!(!is_bound(
            &claim(true, true),
            "other-uid",
            sandbox("claim-uid", true)
        ));
        assert!(!is_bound(
            &claim(false, false),
            "claim-uid",
            sandbox("claim-uid", true)
        ));
        // The status is authoritative on its own.
        assert!(is_bound(
            &claim(false, true),
            "claim-uid",
            sandbox("pool-uid", true)
        ));
    }

    #[test]
    fn host_and_port_join_like_go() {
        assert_eq!(join_host_port("10.0.0.1", 8080), "10.0.0.1:8080");
        assert_eq!(join_host_port("fd00::1", 8080), "[fd00::1]:8080");
    }
}
