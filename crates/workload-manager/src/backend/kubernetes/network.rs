//! The NetworkPolicy of every definition: it selects the definition's sandbox pods (warm-pool
//! members included, by the labels [`pod_labels`] puts on them) and lets in only the Router's
//! and the Workload Manager's pods (the manager probes every port before a session is
//! answered), so no other pod — another session's sandbox included — reaches a sandbox directly.
//! With `spec.networkPolicy` (upstream proposal, PR #291) it also limits egress to DNS (the
//! cluster's `k8s-app: kube-dns` pods, port 53) and the definition's rules, and adds its ingress
//! rules. Enforcement is the CNI's.

use std::collections::BTreeMap;

use agentcube_crds::{NetworkPolicySpec, NetworkProtocol, NetworkRule, labels, network};
use agentcube_types::api::WorkloadKind;
use k8s_openapi::api::networking::v1::{
    IPBlock, NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyIngressRule, NetworkPolicyPeer,
    NetworkPolicyPort, NetworkPolicySpec as KubeSpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

/// Where the control plane's pods are: the only ingress every policy allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peers {
    /// Their namespace (`AGENTCUBE_NAMESPACE`).
    pub namespace: String,
    /// Labels of the Router's pods (the chart's: `app=agentcube-router`).
    pub router: BTreeMap<String, String>,
    /// Labels of the Workload Manager's pods (the chart's: `app=workloadmanager`), whose port
    /// probe must reach a sandbox before its session is answered.
    pub manager: BTreeMap<String, String>,
    /// Sandboxes without `spec.networkPolicy` may reach the cloud metadata endpoints
    /// (`--sandbox-metadata-access`, as upstream); otherwise their egress is everything else.
    pub metadata_access: bool,
}

impl Peers {
    /// `key=value[,key=value…]` (the `--router-pod-labels` / `--manager-pod-labels` flags).
    pub fn parse_labels(s: &str) -> Result<BTreeMap<String, String>, String> {
        let labels: BTreeMap<String, String> = s
            .split(',')
            .filter(|p| !p.trim().is_empty())
            .map(|p| {
                let (k, v) = p
                    .split_once('=')
                    .ok_or_else(|| format!("{p:?} is not key=value"))?;
                Ok((k.trim().to_string(), v.trim().to_string()))
            })
            .collect::<Result<_, String>>()?;
        if labels.is_empty() {
            // An empty selector would let every pod of the Router's namespace in.
            return Err("at least one key=value label of the pods is needed".into());
        }
        Ok(labels)
    }
}

/// The labels every sandbox pod of a definition carries (direct Sandboxes and warm-pool
/// templates alike), which its NetworkPolicy selects.
pub fn pod_labels(kind: WorkloadKind, name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (labels::WORKLOAD_NAME.to_string(), name.to_string()),
        (labels::WORKLOAD_KIND.to_string(), kind.to_string()),
    ])
}

/// `ci-<name>` / `ar-<name>`: one policy per definition, distinct across the two kinds.
pub fn policy_name(kind: WorkloadKind, name: &str) -> String {
    match kind {
        WorkloadKind::CodeInterpreter => format!("ci-{name}"),
        WorkloadKind::AgentRuntime => format!("ar-{name}"),
    }
}

/// The desired NetworkPolicy, owned (controller) by the definition: ingress only from the
/// control plane, plus `policy`'s rules and an egress limit when the definition has one.
pub fn network_policy(
    kind: WorkloadKind,
    definition: &ObjectMeta,
    owner: OwnerReference,
    policy: Option<&NetworkPolicySpec>,
    control: &Peers,
) -> NetworkPolicy {
    let name = definition.name.clone().unwrap_or_default();
    let mut meta_labels = pod_labels(kind, &name);
    meta_labels.insert(
        labels::MANAGED_BY.to_string(),
        labels::MANAGED_BY_VALUE.to_string(),
    );
    let peer = |labels: &BTreeMap<String, String>| NetworkPolicyPeer {
        namespace_selector: Some(selector(BTreeMap::from([(
            "kubernetes.io/metadata.name".to_string(),
            control.namespace.clone(),
        )]))),
        pod_selector: Some(selector(labels.clone())),
        ip_block: None,
    };
    let dns = NetworkPolicyEgressRule {
        to: Some(vec![NetworkPolicyPeer {
            namespace_selector: Some(LabelSelector::default()),
            pod_selector: Some(selector(BTreeMap::from([(
                "k8s-app".to_string(),
                "kube-dns".to_string(),
            )]))),
            ip_block: None,
        }]),
        ports: Some(
            ["UDP", "TCP"]
                .map(|p| NetworkPolicyPort {
                    protocol: Some(p.into()),
                    port: Some(IntOrString::Int(53)),
                    end_port: None,
                })
                .to_vec(),
        ),
    };
    let mut ingress = vec![NetworkPolicyIngressRule {
        from: Some(vec![peer(&control.router), peer(&control.manager)]),
        ports: None,
    }];
    let (mut types, mut egress) = (vec!["Ingress".to_string()], None);
    if policy.is_none() && !control.metadata_access {
        types.push("Egress".into());
        egress = Some(vec![everything_but_metadata()]);
    }
    if let Some(policy) = policy {
        ingress.extend(policy.ingress.iter().map(|r| NetworkPolicyIngressRule {
            from: peers(r),
            ports: ports(r),
        }));
        let mut rules = vec![dns];
        rules.extend(policy.egress.iter().map(|r| NetworkPolicyEgressRule {
            to: peers(r),
            ports: ports(r),
        }));
        types.push("Egress".into());
        egress = Some(rules);
    }
    NetworkPolicy {
        metadata: ObjectMeta {
            name: Some(policy_name(kind, &name)),
            namespace: definition.namespace.clone(),
            labels: Some(meta_labels),
            owner_references: Some(vec![owner]),
            ..Default::default()
        },
        spec: Some(KubeSpec {
            pod_selector: Some(selector(pod_labels(kind, &name))),
            policy_types: Some(types),
            ingress: Some(ingress),
            egress,
        }),
    }
}

/// Egress to every address but the cloud metadata endpoints (which hand the node's cloud
/// credentials to whoever asks from a pod, where the cloud does), and to every pod (whether a
/// CNI applies `ipBlock` to pod addresses is its choice): a definition without a policy, as
/// upstream's unlimited egress less the node's identity. A link-local node DNS cache
/// (`169.254.20.10`) stays reachable: only the endpoints themselves are excepted.
fn everything_but_metadata() -> NetworkPolicyEgressRule {
    let block = |cidr: &str| NetworkPolicyPeer {
        ip_block: Some(IPBlock {
            cidr: cidr.into(),
            except: Some(network::metadata_within(cidr)),
        }),
        ..Default::default()
    };
    let pods = NetworkPolicyPeer {
        namespace_selector: Some(LabelSelector::default()),
        ..Default::default()
    };
    NetworkPolicyEgressRule {
        to: Some(vec![block("0.0.0.0/0"), block("::/0"), pods]),
        ports: None,
    }
}

fn selector(labels: BTreeMap<String, String>) -> LabelSelector {
    LabelSelector {
        match_labels: Some(labels),
        match_expressions: None,
    }
}

/// A rule's CIDRs as peers (`None`, i.e. any peer, when it lists none). A CIDR holding a cloud
/// metadata endpoint without naming it (`0.0.0.0/0`) excepts it: a pod asking it gets the
/// node's cloud credentials where the cloud hands them to pods.
fn peers(r: &NetworkRule) -> Option<Vec<NetworkPolicyPeer>> {
    (!r.cidrs.is_empty()).then(|| {
        r.cidrs
            .iter()
            .map(|c| NetworkPolicyPeer {
                ip_block: Some(IPBlock {
                    cidr: c.clone(),
                    except: Some(network::metadata_within(c)).filter(|e| !e.is_empty()),
                }),
                ..Default::default()
            })
            .collect()
    })
}

/// A rule's ports (`None`, i.e. any port, when it lists none).
fn ports(r: &NetworkRule) -> Option<Vec<NetworkPolicyPort>> {
    (!r.ports.is_empty()).then(|| {
        r.ports
            .iter()
            .map(|p| NetworkPolicyPort {
                protocol: Some(
                    match p.protocol {
                        NetworkProtocol::TCP => "TCP",
                        NetworkProtocol::UDP => "UDP",
                        NetworkProtocol::SCTP => "SCTP",
                    }
                    .into(),
                ),
                port: Some(IntOrString::Int(p.port as i32)),
                end_port: None,
            })
            .collect()
    })
}

/// Applies a definition's NetworkPolicy (server-side apply).
pub async fn sync(
    client: &kube::Client,
    kind: WorkloadKind,
    definition: &ObjectMeta,
    owner: OwnerReference,
    policy: Option<&NetworkPolicySpec>,
    peers: &Peers,
) -> Result<(), kube::Error> {
    use kube::api::{Api, Patch, PatchParams};
    let ns = definition.namespace.as_deref().unwrap_or("default");
    let name = policy_name(kind, definition.name.as_deref().unwrap_or_default());
    let api: Api<NetworkPolicy> = Api::namespaced(client.clone(), ns);
    let desired = network_policy(kind, definition, owner, policy, peers);
    let apply = PatchParams::apply(super::controller::FIELD_MANAGER).force();
    api.patch(&name, &apply, &Patch::Apply(&desired)).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_policy_allows_the_control_plane_dns_and_the_rules_only() {
        let policy: NetworkPolicySpec = serde_json::from_value(json!({
            "egress": [{"cidrs": ["10.0.0.0/8"], "ports": [{"protocol": "TCP", "port": 443}]}, {"cidrs": ["192.0.2.7/32"]},
                       {"cidrs": ["0.0.0.0/0", "::/0", "169.254.169.254/32"]}],
            "ingress": [{"ports": [{"protocol": "UDP", "port": 9000}]}]
        }))
        .unwrap();
        let meta = ObjectMeta {
            name: Some("agent".into()),
            namespace: Some("team".into()),
            ..Default::default()
        };
        let owner = OwnerReference {
            api_version: "runtime.agentcube.volcano.sh/v1alpha1".into(),
            kind: "AgentRuntime".into(),
            name: "agent".into(),
            uid: "u-1".into(),
            controller: Some(true),
            block_owner_deletion: Some(true),
        };
        let peers = Peers {
            namespace: "agentcube".into(),
            router: Peers::parse_labels("app=agentcube-router").unwrap(),
            manager: Peers::parse_labels("app=workloadmanager").unwrap(),
            metadata_access: false,
        };
        let np = network_policy(
            WorkloadKind::AgentRuntime,
            &meta,
            owner.clone(),
            Some(&policy),
            &peers,
        );
        let v = serde_json::to_value(&np).unwrap();
        assert_eq!(v["metadata"]["name"], "ar-agent");
        assert_eq!(v["metadata"]["namespace"], "team");
        assert_eq!(v["metadata"]["ownerReferences"][0]["uid"], "u-1");
        assert_eq!(
            v["spec"]["podSelector"],
            json!({"matchLabels": {"runtime.agentcube.io/workload-kind": "AgentRuntime",
                                   "runtime.agentcube.io/workload-name": "agent"}})
        );
        assert_eq!(v["spec"]["policyTypes"], json!(["Ingress", "Egress"]));
        assert_eq!(
            v["spec"]["ingress"],
            json!([
                {"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "agentcube"}},
                           "podSelector": {"matchLabels": {"app": "agentcube-router"}}},
                          {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "agentcube"}},
                           "podSelector": {"matchLabels": {"app": "workloadmanager"}}}]},
                {"ports": [{"protocol": "UDP", "port": 9000}]}
            ])
        );
        assert_eq!(
            v["spec"]["egress"],
            json!([
                {"to": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}],
                 "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]},
                {"to": [{"ipBlock": {"cidr": "10.0.0.0/8"}}], "ports": [{"protocol": "TCP", "port": 443}]},
                {"to": [{"ipBlock": {"cidr": "192.0.2.7/32"}}]},
                {"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["169.254.169.254/32", "168.63.129.16/32", "100.100.100.200/32"]}},
                        {"ipBlock": {"cidr": "::/0", "except": ["fd00:ec2::254/128"]}},
                        {"ipBlock": {"cidr": "169.254.169.254/32"}}]}
            ])
        );
        assert_eq!(
            policy_name(WorkloadKind::CodeInterpreter, "agent"),
            "ci-agent"
        );
        // Without a policy of its own: ingress from the control plane only (egress: below).
        let np = network_policy(WorkloadKind::AgentRuntime, &meta, owner, None, &peers);
        let v = serde_json::to_value(&np).unwrap();
        assert_eq!(v["spec"]["ingress"].as_array().unwrap().len(), 1);
        assert_eq!(
            v["spec"]["ingress"][0]["from"][1]["podSelector"]["matchLabels"],
            json!({"app": "workloadmanager"})
        );
        assert!(Peers::parse_labels("app").is_err());
        assert!(Peers::parse_labels(" ").is_err());
    }

    #[test]
    fn without_a_policy_egress_is_everything_but_the_metadata_endpoints_unless_allowed() {
        let meta = ObjectMeta {
            name: Some("ci".into()),
            namespace: Some("team".into()),
            ..Default::default()
        };
        let mut peers = Peers {
            namespace: "agentcube".into(),
            router: Peers::parse_labels("app=agentcube-router").unwrap(),
            manager: Peers::parse_labels("app=workloadmanager").unwrap(),
            metadata_access: false,
        };
        let kind = WorkloadKind::CodeInterpreter;
        let np = network_policy(kind, &meta, OwnerReference::default(), None, &peers);
        let v = serde_json::to_value(&np).unwrap();
        assert_eq!(v["spec"]["policyTypes"], json!(["Ingress", "Egress"]));
        assert_eq!(
            v["spec"]["egress"],
            json!([{"to": [
                {"ipBlock": {"cidr": "0.0.0.0/0", "except": ["169.254.169.254/32", "168.63.129.16/32", "100.100.100.200/32"]}},
                {"ipBlock": {"cidr": "::/0", "except": ["fd00:ec2::254/128"]}},
                {"namespaceSelector": {}}
            ]}])
        );
        peers.metadata_access = true;
        let np = network_policy(kind, &meta, OwnerReference::default(), None, &peers);
        let v = serde_json::to_value(&np).unwrap();
        assert_eq!(v["spec"]["policyTypes"], json!(["Ingress"]));
        assert!(v["spec"].get("egress").is_none(), "{v}");
    }
}
