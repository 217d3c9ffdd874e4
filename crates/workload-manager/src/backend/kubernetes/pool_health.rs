//! Whether a CodeInterpreter's warm pool can fill, for its status: a member the API server
//! refused (agent-sandbox's condition, [`refusal`]) or whose pod fails ([`pod_trouble`], read for
//! members not Ready for a while) makes the CodeInterpreter not Ready, with the reason, so that
//! `kubectl get codeinterpreters` says what every create would then fail with.

use std::time::Duration;

use agentcube_crds::sandbox::Sandbox;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::Api;

use super::create::pod_name_of;
use super::stuck::{pod_cannot_start, pod_trouble, refusal};
use super::watched::Watched;

/// How long a member may be not Ready before its pod is read.
const POD_LOOK_AFTER: Duration = Duration::from_secs(5);
/// Members' pods read per look, at most.
const PODS_PER_LOOK: usize = 3;

/// The pool `namespace/name`'s health: why its members cannot start (`None` when nothing says
/// they cannot), and whether any is not Ready (then it is looked at again soon).
pub(super) async fn health(
    client: &kube::Client,
    sandboxes: &Watched<Sandbox>,
    namespace: &str,
    name: &str,
) -> (Option<String>, bool) {
    let unready: Vec<_> = sandboxes
        .all()
        .into_iter()
        .filter(|s| s.namespace().as_deref() == Some(namespace) && s.warm_pool() == Some(name))
        .filter(|s| !s.is_ready())
        .collect();
    let any_unready = !unready.is_empty();
    for s in &unready {
        if let Some(e) = refusal(&format!("Sandbox {}", s.name_any()), s.conditions()) {
            return (Some(e.to_string()), true);
        }
    }
    let now = jiff::Timestamp::now();
    let old_enough = |s: &&std::sync::Arc<Sandbox>| {
        s.metadata
            .creation_timestamp
            .as_ref()
            .is_some_and(|t| now.duration_since(t.0).as_secs_f64() >= POD_LOOK_AFTER.as_secs_f64())
    };
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    for s in unready.iter().filter(old_enough).take(PODS_PER_LOOK) {
        let pod = pod_name_of(s);
        if let Ok(Some(p)) = pods.get_opt(&pod).await
            && let Some(why) = pod_trouble(&p)
        {
            let what = format!("Sandbox {}", s.name_any());
            return (Some(pod_cannot_start(&what, &pod, &why)), true);
        }
    }
    (None, any_unready)
}
