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
//!
//! [`client`] is the Kubernetes client the Workload Manager and the Router reach the API server
//! with (request timeout, keepalive, unacknowledged-data timeout).

pub mod agent_runtime;
pub mod client;
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
    vec![crd_of::<AgentRuntime>(), crd_of::<CodeInterpreter>()]
}

/// A CRD as we publish it: kube's, with the API server's quantity pattern on every resource
/// quantity (as controller-gen writes it), so `kubectl apply` refuses `memory: 512MB` as it does
/// with upstream's CRDs.
pub fn crd_of<K: CustomResourceExt>() -> CustomResourceDefinition {
    let mut crd = K::crd();
    for version in &mut crd.spec.versions {
        let Some(schema) = version
            .schema
            .as_mut()
            .and_then(|s| s.open_api_v3_schema.as_mut())
        else {
            continue;
        };
        let mut value = serde_json::to_value(&*schema).expect("a schema serializes");
        pattern_quantities(&mut value);
        *schema = serde_json::from_value(value).expect("a schema with a pattern added parses");
    }
    crd
}

/// Adds [`common::QUANTITY_PATTERN`] to every quantity schema below `v`. In the schemas of our
/// kinds (pod templates included) every int-or-string is a `resource.Quantity` except the
/// `IntOrString` ports of probes and lifecycle handlers, which are named `port`.
fn pattern_quantities(v: &mut serde_json::Value) {
    use serde_json::Value;
    match v {
        Value::Object(o) => {
            for (key, child) in o.iter_mut() {
                if let Some(c) = child.as_object_mut()
                    && key != "port"
                    && c.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true))
                {
                    c.insert("pattern".into(), common::QUANTITY_PATTERN.into());
                }
                pattern_quantities(child);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(pattern_quantities),
        _ => {}
    }
}

/// File name of a CRD under `config/crd/` (kubebuilder's convention: `<group>_<plural>.yaml`).
pub fn crd_file_name(crd: &CustomResourceDefinition) -> String {
    format!("{}_{}.yaml", crd.spec.group, crd.spec.names.plural)
}
