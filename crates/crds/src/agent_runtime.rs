//! `AgentRuntime`: a pod template for agents that get one sandbox per session.

use std::collections::BTreeMap;

use agentcube_types::GoDuration;
use k8s_openapi::api::core::v1::PodSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::{JsonSchema, Schema};
use serde::{Deserialize, Serialize};

use crate::common::{
    TargetPort, default_session_timeout, duration_schema, require, schema_defaults,
};

/// An AgentRuntime declares an agent server: every session gets its own sandbox running the pod
/// template, reached through the Router at
/// `/v1/namespaces/{ns}/agent-runtimes/{name}/invocations/...`.
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "runtime.agentcube.volcano.sh",
    version = "v1alpha1",
    kind = "AgentRuntime",
    plural = "agentruntimes",
    namespaced,
    status = "AgentRuntimeStatus",
    derive = "PartialEq",
    doc = "An AgentRuntime declares an agent server: every session gets its own sandbox running the pod template, reached through the Router at /v1/namespaces/{ns}/agent-runtimes/{name}/invocations/<path>.",
    shortname = "ar",
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = require_durations)]
pub struct AgentRuntimeSpec {
    /// Ports of the agent the Router may forward to (may be empty: then nothing is reachable).
    pub target_port: Vec<TargetPort>,
    /// The pod each session's sandbox runs.
    pub pod_template: SandboxTemplate,
    /// A session idle for longer than this is deleted (Go duration, e.g. `15m`).
    #[serde(default = "default_session_timeout")]
    #[schemars(schema_with = "duration_schema")]
    pub session_timeout: GoDuration,
    /// A session is deleted this long after creation, however active (e.g. `8h`). Unset: no
    /// maximum lifetime (upstream PR #410); the idle timeout and a create's `ttl` still apply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "duration_schema")]
    pub max_session_duration: Option<GoDuration>,
    /// Network access of the sandboxes (upstream's proposal, PR #291). Present: deny all but the
    /// control plane's requests, DNS and these rules (Kubernetes: a NetworkPolicy, enforced by the
    /// CNI). Absent: on Kubernetes only the Router and the Workload Manager may connect in, egress
    /// is unrestricted (upstream: no policy at all); the local backend: no network at all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_policy: Option<crate::NetworkPolicySpec>,
}

fn require_durations(schema: &mut Schema) {
    // Upstream requires sessionTimeout (the API server applies its default first);
    // maxSessionDuration is optional since PR #410.
    require(schema, &["sessionTimeout"]);
    schema_defaults(schema, &[("sessionTimeout", "15m")]);
}

/// Pod labels, annotations and spec of an agent sandbox.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SandboxTemplate {
    /// Labels added to the sandbox pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
    /// Annotations added to the sandbox pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
    /// A Kubernetes PodSpec. The local backend runs the first container's command and args on
    /// the host's read-only root; the image is not used there.
    pub spec: PodSpec,
}

/// Observed state of an AgentRuntime.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentRuntimeStatus {
    /// Conditions (upstream never writes them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conditions: Option<Vec<Condition>>,
}
