//! `CodeInterpreter`: a template for PicoD sandboxes that run code for one session each.

use std::collections::BTreeMap;

use agentcube_types::GoDuration;
use k8s_openapi::api::core::v1::{EnvVar, LocalObjectReference, ResourceRequirements};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

use crate::common::{
    TargetPort, atomic_string_list, default_max_session_duration, default_session_timeout,
    duration_defaults, duration_schema,
};

/// A CodeInterpreter declares how to start sandboxes that run code for AI agents: each session
/// gets its own sandbox running PicoD, created on demand or taken from a warm pool.
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "runtime.agentcube.volcano.sh",
    version = "v1alpha1",
    kind = "CodeInterpreter",
    plural = "codeinterpreters",
    namespaced,
    status = "CodeInterpreterStatus",
    derive = "PartialEq",
    doc = "A CodeInterpreter declares sandboxes that run code for AI agents: one PicoD sandbox per session, created on demand or taken from a warm pool. Use it with the Python SDK's CodeInterpreterClient.",
    shortname = "ci",
    printcolumn = r#"{"name":"Ready","type":"boolean","jsonPath":".status.ready"}"#,
    printcolumn = r#"{"name":"Warm pool","type":"integer","jsonPath":".spec.warmPoolSize"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = duration_defaults)]
pub struct CodeInterpreterSpec {
    /// Ports the Router may forward to. Default: one HTTP port 8080 at path prefix `/` (PicoD).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<TargetPort>>,
    /// How each sandbox is started.
    pub template: CodeInterpreterSandboxTemplate,
    /// A session idle for longer than this is deleted (Go duration, e.g. `15m`, `1h30m`).
    #[serde(default = "default_session_timeout")]
    #[schemars(schema_with = "duration_schema")]
    pub session_timeout: GoDuration,
    /// A session is deleted this long after it was created, however active (e.g. `8h`).
    #[serde(default = "default_max_session_duration")]
    #[schemars(schema_with = "duration_schema")]
    pub max_session_duration: GoDuration,
    /// Number of sandboxes kept started ahead of demand. A new session takes one at once and the
    /// pool refills in the background. 0 or unset: sandboxes are created on demand.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub warm_pool_size: Option<i32>,
    /// `picod`: sandboxes accept only requests signed by the Router (PICOD_AUTH_PUBLIC_KEY is
    /// injected). `none`: no key is injected (the image must run PicoD without auth).
    #[serde(default)]
    pub auth_mode: AuthMode,
    /// Network access of the sandboxes (upstream's proposal, PR #291). Present: deny all but the
    /// control plane's requests, DNS and these rules (Kubernetes: a NetworkPolicy, enforced by the
    /// CNI). Absent: on Kubernetes only the Router and the Workload Manager may connect in, egress
    /// is unrestricted (upstream: no policy at all); the local backend: no network at all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_policy: Option<crate::NetworkPolicySpec>,
}

impl CodeInterpreterSpec {
    /// The ports, or upstream's default (HTTP 8080 at `/`) when none are declared.
    pub fn effective_ports(&self) -> Vec<TargetPort> {
        match &self.ports {
            Some(p) if !p.is_empty() => p.clone(),
            _ => vec![TargetPort {
                path_prefix: Some("/".into()),
                name: None,
                port: 8080,
                protocol: crate::Protocol::HTTP,
            }],
        }
    }

    /// `warmPoolSize`, treating unset and negative as 0.
    pub fn warm_pool(&self) -> u32 {
        self.warm_pool_size.unwrap_or(0).max(0) as u32
    }
}

/// Authentication between the Router and the sandbox.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// Router-signed RS256 JWT checked by PicoD (default).
    #[default]
    Picod,
    /// No authentication.
    None,
}

/// Pull policy of the sandbox image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ImagePullPolicy {
    Always,
    Never,
    IfNotPresent,
}

/// How a CodeInterpreter sandbox is started.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CodeInterpreterSandboxTemplate {
    /// Labels added to each sandbox pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
    /// Annotations added to each sandbox pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
    /// RuntimeClass of the sandbox pods (e.g. a Kata or gVisor class). Unset: the Workload
    /// Manager's `--runtime-class-name`, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime_class_name: Option<String>,
    /// Container image of the sandbox (e.g. `python:3.12-slim`). On Kubernetes it must run
    /// PicoD (e.g. `ghcr.io/volcano-sh/picod:latest`). The local backend pulls it and runs it as
    /// the sandbox's read-only root with the host's PicoD injected; `host` (or
    /// `--images host`) runs the host's `/usr` instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// `Always`, `Never` or `IfNotPresent`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<ImagePullPolicy>,
    /// Secrets for pulling the image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "pull_secrets_schema")]
    pub image_pull_secrets: Option<Vec<LocalObjectReference>>,
    /// Environment variables of the sandbox container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub environment: Option<Vec<EnvVar>>,
    /// Entrypoint override.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "atomic_string_list")]
    pub command: Option<Vec<String>>,
    /// Arguments to the entrypoint (e.g. `--workspace=/root`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<Vec<String>>,
    /// CPU and memory requests and limits. The local backend turns limits into cgroup limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
}

fn pull_secrets_schema(g: &mut SchemaGenerator) -> Schema {
    let item = g.subschema_for::<LocalObjectReference>();
    json_schema!({
        "type": "array",
        "items": item,
        "x-kubernetes-list-type": "map",
        "x-kubernetes-list-map-keys": ["name"],
        "nullable": true
    })
}

/// Observed state of a CodeInterpreter.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CodeInterpreterStatus {
    /// `Ready` once the Workload Manager reconciled the spec (warm pool objects in place).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conditions: Option<Vec<Condition>>,
    /// True when the CodeInterpreter can serve sessions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready: Option<bool>,
}
