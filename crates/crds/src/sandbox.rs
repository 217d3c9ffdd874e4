//! The kubernetes-sigs/agent-sandbox kinds the Workload Manager uses (v0.4.6 field names, spec
//! §2.4). Not our CRDs: they are typed clients only and are not generated into `config/crd`.
//! Fields we do not use are kept in `extra` so a read-modify-write loses nothing.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::PodSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use serde::{Deserialize, Serialize};

/// Unused fields, kept verbatim.
pub type Extra = BTreeMap<String, serde_json::Value>;

/// Labels and annotations of a pod template.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PodMetadata {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
}

/// agent-sandbox `PodTemplate`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PodTemplate {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<PodMetadata>,
    pub spec: PodSpec,
}

/// `agents.x-k8s.io/v1alpha1` Sandbox: one pod (and service) kept alive until `shutdownTime`.
#[derive(CustomResource, Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "agents.x-k8s.io",
    version = "v1alpha1",
    kind = "Sandbox",
    namespaced,
    status = "SandboxStatus",
    schema = "disabled"
)]
#[serde(rename_all = "camelCase")]
pub struct SandboxSpec {
    pub pod_template: PodTemplate,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<i32>,
    /// When agent-sandbox deletes the pod (lifecycle is inlined in the spec).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shutdown_time: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shutdown_policy: Option<String>,
    #[serde(flatten)]
    pub extra: Extra,
}

/// Sandbox status: readiness is condition `Ready=True`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SandboxStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conditions: Option<Vec<Condition>>,
    #[serde(flatten)]
    pub extra: Extra,
}

/// Reference to a SandboxTemplate by name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateRef {
    pub name: String,
}

/// `extensions.agents.x-k8s.io/v1alpha1` SandboxClaim: takes a Sandbox from a warm pool.
#[derive(CustomResource, Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "extensions.agents.x-k8s.io",
    version = "v1alpha1",
    kind = "SandboxClaim",
    namespaced,
    status = "SandboxClaimStatus",
    schema = "disabled"
)]
#[serde(rename_all = "camelCase")]
pub struct SandboxClaimSpec {
    pub sandbox_template_ref: TemplateRef,
    #[serde(flatten)]
    pub extra: Extra,
}

/// Name of the Sandbox a claim was bound to.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimedSandbox {
    pub name: String,
}

/// SandboxClaim status (`status.sandbox.name`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SandboxClaimStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<ClaimedSandbox>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conditions: Option<Vec<Condition>>,
    #[serde(flatten)]
    pub extra: Extra,
}

/// `extensions.agents.x-k8s.io/v1alpha1` SandboxTemplate.
#[derive(CustomResource, Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "extensions.agents.x-k8s.io",
    version = "v1alpha1",
    kind = "SandboxTemplate",
    namespaced,
    schema = "disabled"
)]
#[serde(rename_all = "camelCase")]
pub struct SandboxTemplateSpec {
    pub pod_template: PodTemplate,
    /// AgentCube sets `Unmanaged`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_policy_management: Option<String>,
    #[serde(flatten)]
    pub extra: Extra,
}

/// `extensions.agents.x-k8s.io/v1alpha1` SandboxWarmPool: keeps `replicas` Sandboxes ready.
#[derive(CustomResource, Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "extensions.agents.x-k8s.io",
    version = "v1alpha1",
    kind = "SandboxWarmPool",
    namespaced,
    status = "SandboxWarmPoolStatus",
    schema = "disabled"
)]
#[serde(rename_all = "camelCase")]
pub struct SandboxWarmPoolSpec {
    pub replicas: i32,
    pub sandbox_template_ref: TemplateRef,
    #[serde(flatten)]
    pub extra: Extra,
}

/// Warm pool status.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SandboxWarmPoolStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_replicas: Option<i32>,
    #[serde(flatten)]
    pub extra: Extra,
}

/// True when a condition `Ready` has status `True`.
pub fn is_ready(conditions: Option<&[Condition]>) -> bool {
    conditions
        .unwrap_or_default()
        .iter()
        .any(|c| c.type_ == "Ready" && c.status == "True")
}

impl Sandbox {
    /// Whether agent-sandbox reports this Sandbox `Ready=True`.
    pub fn is_ready(&self) -> bool {
        is_ready(self.status.as_ref().and_then(|s| s.conditions.as_deref()))
    }
}
