//! Service names without cluster DNS or kube-proxy: every pod's `/etc/hosts` maps each Service's
//! names (`svc`, `svc.ns`, `svc.ns.svc`, `svc.ns.svc.cluster.local`) to the IP of one ready pod its
//! selector matches, and is rewritten in place (the bind mount follows) whenever that changes.
//! A Service's `port` must equal its `targetPort` to be reached this way (there is no cluster IP
//! translating ports); the chart's are.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Pod, Service};

/// `(address, names)` lines for the ready endpoints of `services`, given this node's pods as
/// `(pod, ip, ready)`.
pub fn entries(
    services: &[Arc<Service>],
    pods: &[(Arc<Pod>, String, bool)],
) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for svc in services {
        let (Some(name), Some(ns)) = (
            svc.metadata.name.as_deref(),
            svc.metadata.namespace.as_deref(),
        ) else {
            continue;
        };
        let Some(selector) = svc
            .spec
            .as_ref()
            .and_then(|s| s.selector.as_ref())
            .filter(|s| !s.is_empty())
        else {
            continue;
        };
        let mut ready: Vec<(&str, &str)> = pods
            .iter()
            .filter(|(p, _, ready)| {
                *ready
                    && p.metadata.namespace.as_deref() == Some(ns)
                    && p.metadata.deletion_timestamp.is_none()
                    && matches(selector, p.metadata.labels.as_ref())
            })
            .map(|(p, ip, _)| (p.metadata.name.as_deref().unwrap_or_default(), ip.as_str()))
            .collect();
        ready.sort();
        if let Some((_, ip)) = ready.first() {
            out.push((
                ip.to_string(),
                format!("{name}.{ns}.svc.cluster.local {name}.{ns}.svc {name}.{ns} {name}"),
            ));
        }
    }
    out.sort();
    out
}

fn matches(selector: &BTreeMap<String, String>, labels: Option<&BTreeMap<String, String>>) -> bool {
    let labels = labels.cloned().unwrap_or_default();
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, ns: &str, app: &str) -> Arc<Pod> {
        Arc::new(
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": name, "namespace": ns, "labels": {"app": app}}
            }))
            .unwrap(),
        )
    }

    #[test]
    fn a_service_names_its_first_ready_matching_pod() {
        let svc: Arc<Service> = Arc::new(
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "redis", "namespace": "ac"}, "spec": {"selector": {"app": "redis"}}
            }))
            .unwrap(),
        );
        let pods = vec![
            (pod("r-b", "ac", "redis"), "127.1.0.3".to_string(), true),
            (pod("r-a", "ac", "redis"), "127.1.0.2".to_string(), false),
            (pod("r-c", "other", "redis"), "127.1.0.4".to_string(), true),
            (pod("web", "ac", "web"), "127.1.0.5".to_string(), true),
        ];
        assert_eq!(
            entries(std::slice::from_ref(&svc), &pods),
            vec![(
                "127.1.0.3".into(),
                "redis.ac.svc.cluster.local redis.ac.svc redis.ac redis".into()
            )]
        );
        assert!(
            entries(&[svc], &pods[1..2]).is_empty(),
            "no ready endpoint, no name"
        );
    }
}
