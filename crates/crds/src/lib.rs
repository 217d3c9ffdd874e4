//! The AgentRuntime and CodeInterpreter CRDs (group `runtime.agentcube.volcano.sh`, `v1alpha1`),
//! the agent-sandbox kinds the Workload Manager drives, and every label key.
//!
//! Main flow:
//! 1. Users `kubectl apply` (or drop into the embedded default's manifest directory) YAML for
//!    [`CodeInterpreter`] / [`AgentRuntime`].
//! 2. `crdgen` renders [`crds()`] into `config/crd/*.yaml` (checked for staleness in `make test`).
//! 3. [`manifest::load`] parses manifest files the way the API server would: schema defaults
//!    applied, unknown fields and bad values refused ([`schema`]), then typed.
//! 4. The Workload Manager builds [`sandbox`] objects from them, labelled with [`labels`].

pub mod agent_runtime;
pub mod code_interpreter;
pub mod common;
pub mod labels;
pub mod manifest;
pub mod network;
pub mod sandbox;
pub mod schema;

pub use agent_runtime::{AgentRuntime, AgentRuntimeSpec, AgentRuntimeStatus, SandboxTemplate};
pub use code_interpreter::{
    AuthMode, CodeInterpreter, CodeInterpreterSandboxTemplate, CodeInterpreterSpec,
    CodeInterpreterStatus, ImagePullPolicy,
};
pub use common::{Protocol, TargetPort};
pub use network::{NetworkPolicySpec, NetworkPort, NetworkProtocol, NetworkRule};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

/// Our two CRDs, in a stable order.
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![AgentRuntime::crd(), CodeInterpreter::crd()]
}

/// File name of a CRD under `config/crd/` (kubebuilder's convention: `<group>_<plural>.yaml`).
pub fn crd_file_name(crd: &CustomResourceDefinition) -> String {
    format!("{}_{}.yaml", crd.spec.group, crd.spec.names.plural)
}
