//! The kubernetes-sigs/agent-sandbox kinds the Workload Manager uses. Not our CRDs: typed clients
//! only, not generated into `config/crd`. Fields we do not use are kept in `extra` so a
//! read-modify-write loses nothing.
//!
//! Two API versions are spoken, chosen at start by discovery ([`AgentSandboxApi`]):
//! - `v1beta1` (agent-sandbox v0.5+, the only one v1.0 serves): `Sandbox.spec.operatingMode`,
//!   claims name their pool with `warmPoolRef.name` and carry a `lifecycle`, warm-pool members are
//!   found by their controller owner reference.
//! - `v1alpha1` (v0.4.x): `Sandbox.spec.replicas`, claims name a template with
//!   `sandboxTemplateRef.name`, warm-pool members carry the pool's name in a label.
//!
//! Every kind is a plain struct with a [`kube::Resource`] impl whose dynamic type is the API
//! version, so one set of builders serves both: an object's `apiVersion` is a field set when it
//! is built ([`AgentSandboxApi::api_version`]) and an `Api` is made with `*_with(client, &api)`.

use std::borrow::Cow;
use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::PodSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta, Time};
use kube::core::DynamicResourceScope;
use serde::{Deserialize, Serialize};

/// Unused fields, kept verbatim.
pub type Extra = BTreeMap<String, serde_json::Value>;

/// Group of `Sandbox`.
pub const CORE_GROUP: &str = "agents.x-k8s.io";
/// Group of `SandboxClaim`, `SandboxTemplate`, `SandboxWarmPool`.
pub const EXTENSIONS_GROUP: &str = "extensions.agents.x-k8s.io";

/// The agent-sandbox API version in use (the dynamic type of every kind here).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AgentSandboxApi {
    /// agent-sandbox v0.5 and later (v1.0 serves only this).
    V1beta1,
    /// agent-sandbox v0.4.x.
    V1alpha1,
}

impl AgentSandboxApi {
    /// Preferred first.
    pub const ALL: [Self; 2] = [Self::V1beta1, Self::V1alpha1];

    pub fn version(self) -> &'static str {
        match self {
            Self::V1beta1 => "v1beta1",
            Self::V1alpha1 => "v1alpha1",
        }
    }

    /// `group/version`.
    pub fn api_version(self, group: &str) -> String {
        format!("{group}/{}", self.version())
    }

    /// The newest version both agent-sandbox groups serve, from the versions discovery reported
    /// for each.
    pub fn negotiate(core: &[String], extensions: &[String]) -> Option<Self> {
        Self::ALL.into_iter().find(|a| {
            core.iter().any(|v| v == a.version()) && extensions.iter().any(|v| v == a.version())
        })
    }
}

impl std::fmt::Display for AgentSandboxApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.version())
    }
}

/// Defines an agent-sandbox kind: the object struct (`apiVersion`/`kind` as fields) and its
/// `Resource` impl.
macro_rules! agent_sandbox_kind {
    ($(#[$doc:meta])* $name:ident, $spec:ty, $status:ty, $group:expr, $plural:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
        #[serde(rename_all = "camelCase")]
        pub struct $name {
            pub api_version: String,
            pub kind: String,
            #[serde(default)]
            pub metadata: ObjectMeta,
            pub spec: $spec,
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub status: Option<$status>,
        }

        impl $name {
            /// A new object of this kind in `api`.
            pub fn new(api: AgentSandboxApi, metadata: ObjectMeta, spec: $spec) -> Self {
                Self {
                    api_version: api.api_version($group),
                    kind: stringify!($name).into(),
                    metadata,
                    spec,
                    status: None,
                }
            }
        }

        impl kube::Resource for $name {
            type DynamicType = AgentSandboxApi;
            // Namespaced; `Dynamic` because `Api::namespaced_with` requires it.
            type Scope = DynamicResourceScope;

            fn kind(_: &AgentSandboxApi) -> Cow<'_, str> {
                stringify!($name).into()
            }
            fn group(_: &AgentSandboxApi) -> Cow<'_, str> {
                $group.into()
            }
            fn version(api: &AgentSandboxApi) -> Cow<'_, str> {
                api.version().into()
            }
            fn plural(_: &AgentSandboxApi) -> Cow<'_, str> {
                $plural.into()
            }
            fn meta(&self) -> &ObjectMeta {
                &self.metadata
            }
            fn meta_mut(&mut self) -> &mut ObjectMeta {
                &mut self.metadata
            }
        }
    };
}

agent_sandbox_kind!(
    /// `agents.x-k8s.io` Sandbox: one pod kept alive until `shutdownTime`.
    Sandbox, SandboxSpec, SandboxStatus, CORE_GROUP, "sandboxes"
);
agent_sandbox_kind!(
    /// `extensions.agents.x-k8s.io` SandboxClaim: takes a Sandbox from a warm pool.
    SandboxClaim, SandboxClaimSpec, SandboxClaimStatus, EXTENSIONS_GROUP, "sandboxclaims"
);
agent_sandbox_kind!(
    /// `extensions.agents.x-k8s.io` SandboxTemplate.
    SandboxTemplate, SandboxTemplateSpec, Extra, EXTENSIONS_GROUP, "sandboxtemplates"
);
agent_sandbox_kind!(
    /// `extensions.agents.x-k8s.io` SandboxWarmPool: keeps `replicas` Sandboxes ready.
    SandboxWarmPool, SandboxWarmPoolSpec, SandboxWarmPoolStatus, EXTENSIONS_GROUP, "sandboxwarmpools"
);

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

/// Sandbox spec (both versions' fields; builders set the ones of the version in use).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SandboxSpec {
    pub pod_template: PodTemplate,
    /// v1alpha1 only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<i32>,
    /// v1beta1 only: `Running` or `Suspended`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operating_mode: Option<String>,
    /// When agent-sandbox deletes the pod.
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
    /// The pod's IPs (agent-sandbox v0.5+; set once the pod has them and is the Sandbox's own).
    #[serde(default, rename = "podIPs", skip_serializing_if = "Option::is_none")]
    pub pod_ips: Option<Vec<String>>,
    #[serde(flatten)]
    pub extra: Extra,
}

/// Reference to an object by name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NameRef {
    pub name: String,
}

/// v1beta1 claim lifecycle.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClaimLifecycle {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shutdown_time: Option<Time>,
    /// `Delete`, `DeleteForeground` or `Retain` (agent-sandbox's default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shutdown_policy: Option<String>,
    #[serde(flatten)]
    pub extra: Extra,
}

/// SandboxClaim spec (both versions' fields).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SandboxClaimSpec {
    /// v1alpha1: the template to claim a sandbox of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox_template_ref: Option<NameRef>,
    /// v1beta1 (required): the warm pool to claim from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warm_pool_ref: Option<NameRef>,
    /// v1beta1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lifecycle: Option<ClaimLifecycle>,
    #[serde(flatten)]
    pub extra: Extra,
}

/// SandboxClaim status (`status.sandbox.name`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SandboxClaimStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<NameRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conditions: Option<Vec<Condition>>,
    #[serde(flatten)]
    pub extra: Extra,
}

/// SandboxTemplate spec (the same in both versions).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SandboxTemplateSpec {
    pub pod_template: PodTemplate,
    /// AgentCube sets `Unmanaged`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_policy_management: Option<String>,
    #[serde(flatten)]
    pub extra: Extra,
}

/// SandboxWarmPool spec (the same fields in both versions; v1beta1 adds `updateStrategy`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SandboxWarmPoolSpec {
    pub replicas: i32,
    pub sandbox_template_ref: NameRef,
    /// v1beta1 only: what becomes of unclaimed members when the template changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update_strategy: Option<WarmPoolUpdateStrategy>,
    #[serde(flatten)]
    pub extra: Extra,
}

/// `spec.updateStrategy` of a v1beta1 SandboxWarmPool: `Recreate` replaces unclaimed members of
/// an old template at once; `OnReplenish` (agent-sandbox's default) hands them out until each
/// has been claimed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WarmPoolUpdateStrategy {
    #[serde(rename = "type")]
    pub type_: String,
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

impl SandboxClaim {
    /// Its status's conditions, if any.
    pub fn conditions(&self) -> Option<&[Condition]> {
        self.status.as_ref().and_then(|s| s.conditions.as_deref())
    }
}

/// The `Ready` condition among `conditions`, if any.
pub fn ready_condition(conditions: Option<&[Condition]>) -> Option<&Condition> {
    conditions?.iter().find(|c| c.type_ == "Ready")
}

impl Sandbox {
    /// Its status's conditions, if any.
    pub fn conditions(&self) -> Option<&[Condition]> {
        self.status.as_ref().and_then(|s| s.conditions.as_deref())
    }

    /// Whether agent-sandbox reports this Sandbox `Ready=True`.
    pub fn is_ready(&self) -> bool {
        is_ready(self.conditions())
    }

    /// The first pod IP agent-sandbox reports, if any.
    pub fn pod_ip(&self) -> Option<&str> {
        let ips = self.status.as_ref()?.pod_ips.as_ref()?;
        ips.iter().map(String::as_str).find(|ip| !ip.is_empty())
    }

    /// The Router public key this Sandbox's PicoD trusts (`PICOD_AUTH_PUBLIC_KEY` in its pod
    /// template), if it carries one.
    pub fn trusted_key(&self) -> Option<&str> {
        self.spec
            .pod_template
            .spec
            .containers
            .iter()
            .flat_map(|c| c.env.iter().flatten())
            .find(|e| e.name == crate::labels::PICOD_AUTH_PUBLIC_KEY)
            .and_then(|e| e.value.as_deref())
    }

    /// Whether `uid` (a SandboxClaim's) is this Sandbox's controller owner: the claim adopted it.
    pub fn controlled_by(&self, uid: &str) -> bool {
        self.metadata
            .owner_references
            .iter()
            .flatten()
            .any(|o| o.controller == Some(true) && o.uid == uid)
    }

    /// The warm pool this Sandbox is an unclaimed member of: its controller owner reference of
    /// kind SandboxWarmPool (v1beta1; the member label holds a hash there), else the value of
    /// the member label (v1alpha1). A claimed Sandbox is owned by its claim: `None`.
    pub fn warm_pool(&self) -> Option<&str> {
        let owners = self
            .metadata
            .owner_references
            .as_deref()
            .unwrap_or_default();
        if let Some(controller) = owners.iter().find(|o| o.controller == Some(true)) {
            return (controller.kind == "SandboxWarmPool").then_some(controller.name.as_str());
        }
        self.metadata
            .labels
            .as_ref()?
            .get(crate::labels::WARM_POOL_MEMBER)
            .map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::Resource;

    #[test]
    fn objects_carry_the_version_they_were_built_for() {
        for api in AgentSandboxApi::ALL {
            let sb = Sandbox::new(api, ObjectMeta::default(), SandboxSpec::default());
            let v = serde_json::to_value(&sb).unwrap();
            assert_eq!(v["apiVersion"], format!("agents.x-k8s.io/{api}"));
            assert_eq!(v["kind"], "Sandbox");
            assert_eq!(
                Sandbox::url_path(&api, Some("ns")),
                format!("/apis/agents.x-k8s.io/{api}/namespaces/ns/sandboxes")
            );
            let claim = SandboxClaim::new(api, ObjectMeta::default(), SandboxClaimSpec::default());
            assert_eq!(
                serde_json::to_value(&claim).unwrap()["apiVersion"],
                format!("extensions.agents.x-k8s.io/{api}")
            );
        }
    }

    #[test]
    fn the_newest_version_both_groups_serve_is_chosen() {
        let v = |s: &[&str]| s.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let beta = v(&["v1beta1"]);
        let both = v(&["v1alpha1", "v1beta1"]);
        let alpha = v(&["v1alpha1"]);
        assert_eq!(
            AgentSandboxApi::negotiate(&beta, &beta),
            Some(AgentSandboxApi::V1beta1)
        );
        assert_eq!(
            AgentSandboxApi::negotiate(&both, &both),
            Some(AgentSandboxApi::V1beta1)
        );
        assert_eq!(
            AgentSandboxApi::negotiate(&both, &alpha),
            Some(AgentSandboxApi::V1alpha1)
        );
        assert_eq!(
            AgentSandboxApi::negotiate(&alpha, &alpha),
            Some(AgentSandboxApi::V1alpha1)
        );
        assert_eq!(AgentSandboxApi::negotiate(&beta, &alpha), None);
        assert_eq!(AgentSandboxApi::negotiate(&[], &[]), None);
    }

    #[test]
    fn pool_membership_is_the_controller_owner_or_the_old_label() {
        let mut sb: Sandbox = serde_json::from_value(serde_json::json!({
            "apiVersion": "agents.x-k8s.io/v1beta1", "kind": "Sandbox",
            "metadata": {"name": "pool-x1", "labels": {"agents.x-k8s.io/warm-pool-sandbox": "5d1c0a7e"},
                "ownerReferences": [{"apiVersion": "extensions.agents.x-k8s.io/v1beta1",
                    "kind": "SandboxWarmPool", "name": "pool", "uid": "u", "controller": true}]},
            "spec": {"podTemplate": {"spec": {"containers": []}}, "operatingMode": "Running"}
        }))
        .unwrap();
        assert_eq!(sb.warm_pool(), Some("pool"));
        sb.metadata.owner_references.as_mut().unwrap()[0].kind = "SandboxClaim".into();
        assert_eq!(sb.warm_pool(), None, "claimed");
        sb.metadata.owner_references = None;
        sb.metadata.labels = Some(
            [(
                crate::labels::WARM_POOL_MEMBER.to_string(),
                "pool".to_string(),
            )]
            .into(),
        );
        assert_eq!(sb.warm_pool(), Some("pool"), "v1alpha1 label");
        let back = serde_json::to_value(&sb).unwrap();
        assert_eq!(back["spec"]["operatingMode"], "Running");
    }
}
