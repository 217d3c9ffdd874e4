//! Simulated cluster behaviour for the fake API server: what kubernetes-sigs/agent-sandbox
//! (v0.4.6 field names) and a kubelet would do, level-triggered, so that the Workload Manager's
//! Kubernetes backend runs against something that behaves like a cluster.
//!
//! Main flow: [`Simulation::start`] spawns one loop. On every change in the store (and every
//! 200 ms, for deadlines and exited processes) it runs [`agent_sandbox::reconcile`] (Sandbox →
//! Pod and Ready condition; SandboxWarmPool → N pool Sandboxes; SandboxClaim → adopt a pool
//! Sandbox or create one) and then [`kubelet::Kubelet::sync`] (Pod → a real process on its own
//! loopback address, status `Running` with `podIP`; deleted Pod → process killed).
//! [`Simulation::stop`] kills every pod process.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

use crate::store::{Cluster, Kind};

pub mod agent_sandbox;
pub mod kubelet;
pub mod runtime;

/// `agents.x-k8s.io/v1alpha1` Sandbox.
pub const SANDBOX: Kind = Kind {
    prefix: "apis/agents.x-k8s.io/v1alpha1",
    plural: "sandboxes",
};
/// `extensions.agents.x-k8s.io/v1alpha1` SandboxClaim.
pub const CLAIM: Kind = Kind {
    prefix: "apis/extensions.agents.x-k8s.io/v1alpha1",
    plural: "sandboxclaims",
};
/// `extensions.agents.x-k8s.io/v1alpha1` SandboxTemplate.
pub const TEMPLATE: Kind = Kind {
    prefix: "apis/extensions.agents.x-k8s.io/v1alpha1",
    plural: "sandboxtemplates",
};
/// `extensions.agents.x-k8s.io/v1alpha1` SandboxWarmPool.
pub const WARM_POOL: Kind = Kind {
    prefix: "apis/extensions.agents.x-k8s.io/v1alpha1",
    plural: "sandboxwarmpools",
};
/// Core Pod.
pub const POD: Kind = Kind {
    prefix: "api/v1",
    plural: "pods",
};
/// Core Secret.
pub const SECRET: Kind = Kind {
    prefix: "api/v1",
    plural: "secrets",
};
/// Core ConfigMap.
pub const CONFIG_MAP: Kind = Kind {
    prefix: "api/v1",
    plural: "configmaps",
};

/// How the simulated node runs pods.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// The `picod` binary: what images named `…picod…` run.
    pub picod: PathBuf,
    /// Pod directories (`<state_dir>/pods/<namespace>_<name>_<uid>/`).
    pub state_dir: PathBuf,
    /// The `bwrap` binary that gives each pod its own filesystem view.
    pub bwrap: PathBuf,
}

/// The running simulation.
pub struct Simulation {
    task: tokio::task::JoinHandle<()>,
    kubelet: Arc<kubelet::Kubelet>,
    stop: tokio::sync::watch::Sender<bool>,
}

impl Simulation {
    /// Starts reconciling `cluster`.
    pub fn start(cluster: Cluster, config: SimConfig) -> Result<Self, String> {
        let kubelet = Arc::new(kubelet::Kubelet::new(config)?);
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let k = kubelet.clone();
        let task = tokio::spawn(async move {
            let mut changes = cluster.subscribe();
            loop {
                agent_sandbox::reconcile(&cluster, jiff::Timestamp::now());
                k.sync(&cluster).await;
                tokio::select! {
                    _ = changes.recv() => {
                        // Coalesce a burst of changes into one pass.
                        while changes.try_recv().is_ok() {}
                    }
                    () = tokio::time::sleep(Duration::from_millis(200)) => {}
                    _ = stopped.wait_for(|s| *s) => return,
                }
            }
        });
        Ok(Self {
            task,
            kubelet,
            stop,
        })
    }

    /// Stops the loop and kills every pod process. Returns how many were killed.
    pub async fn stop(self) -> usize {
        let _ = self.stop.send(true);
        let _ = self.task.await;
        self.kubelet.kill_all().await
    }

    /// Pods with a live process, as `namespace/name`.
    pub fn running_pods(&self) -> Vec<String> {
        self.kubelet.running()
    }
}

/// Small accessors for JSON objects.
pub(crate) fn str_at<'a>(v: &'a Value, pointer: &str) -> &'a str {
    v.pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_default()
}

pub(crate) fn name(v: &Value) -> &str {
    str_at(v, "/metadata/name")
}

pub(crate) fn namespace(v: &Value) -> &str {
    str_at(v, "/metadata/namespace")
}

pub(crate) fn label<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.pointer("/metadata/labels")
        .and_then(|l| l.get(key))
        .and_then(Value::as_str)
}

/// A controller owner reference to `owner`.
pub(crate) fn controller_ref(owner: &Value, api_version: &str, kind: &str) -> Value {
    json!({"apiVersion": api_version, "kind": kind, "name": name(owner),
           "uid": str_at(owner, "/metadata/uid"), "controller": true, "blockOwnerDeletion": true})
}

/// The `Ready` condition's status (`"True"`, `"False"`, or `""` when absent).
pub(crate) fn ready_status(v: &Value) -> &str {
    v.pointer("/status/conditions")
        .and_then(Value::as_array)
        .and_then(|cs| cs.iter().find(|c| c["type"] == "Ready"))
        .map(|c| str_at(c, "/status"))
        .unwrap_or_default()
}

/// A condition with `lastTransitionTime` kept from `previous` when the status did not change.
pub(crate) fn condition(
    previous: &Value,
    type_: &str,
    ready: bool,
    reason: &str,
    message: &str,
) -> Value {
    let status = if ready { "True" } else { "False" };
    let old = previous
        .pointer("/status/conditions")
        .and_then(Value::as_array)
        .and_then(|cs| cs.iter().find(|c| c["type"] == type_));
    let since = match old {
        Some(c) if c["status"] == status => c["lastTransitionTime"].clone(),
        _ => json!(
            jiff::Timestamp::now()
                .strftime("%Y-%m-%dT%H:%M:%SZ")
                .to_string()
        ),
    };
    json!({"type": type_, "status": status, "reason": reason, "message": message,
           "lastTransitionTime": since,
           "observedGeneration": previous.pointer("/metadata/generation").cloned().unwrap_or(json!(1))})
}

/// Five random `[a-z0-9]` characters (as `generateName` uses).
pub(crate) fn suffix() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..5].to_string()
}
