//! Why a create will never finish, so that it fails at once with the cluster's reason instead
//! of waiting out `--create-timeout` for a 504: the API server refused what agent-sandbox
//! created for it (read from agent-sandbox's conditions, [`refusal`]), or the sandbox's pod
//! failed (a container crash-looping or exited, an image that cannot be pulled, [`pod_trouble`],
//! checked by [`KubernetesBackend::pod_failed`] while a create waits past a second).

use std::time::Duration;

use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::Api;

use super::KubernetesBackend;
use crate::backend::BackendError;

/// The session ended before its sandbox was ready (`Ready=False`, reason `SandboxExpired`: its
/// `shutdownTime` passed while it started), or
/// agent-sandbox's controller failed on an object (`Ready=False`, reason `ReconcilerError`,
/// message `Error seen: <the API server's error>`) in a way retrying will not fix: the API
/// server refused what it created for one of [`FOR_GOOD`]'s reasons. A used-up ResourceQuota is
/// told apart (the caller may retry later). Anything else is waited out as before: some
/// refusals pass on their own (a new namespace's `default` service account not made yet:
/// `… is forbidden: error looking up service account …`), and so do conflicts and an
/// unreachable API server. `what` names the object.
pub(super) fn refusal(what: &str, conditions: Option<&[Condition]>) -> Option<BackendError> {
    let ready = agentcube_crds::sandbox::ready_condition(conditions)?;
    if ready.status == "False" && ready.reason == "SandboxExpired" {
        return Some(BackendError::Invalid(format!(
            "{what} expired before it was ready: the session's maximum duration (the \
             definition's maxSessionDuration, or the create's ttl) is shorter than its sandbox \
             takes to start"
        )));
    }
    if ready.status != "False" || ready.reason != "ReconcilerError" {
        return None;
    }
    let error = ready.message.trim_start_matches("Error seen: ");
    let error: String = error.chars().take(MAX_REFUSAL_CHARS).collect();
    if error.contains("is forbidden: exceeded quota") {
        return Some(BackendError::Exhausted(format!(
            "{what} cannot start: the namespace's ResourceQuota is used up: {error}"
        )));
    }
    FOR_GOOD
        .iter()
        .any(|p| error.contains(p))
        .then(|| BackendError::CannotStart(format!("{what} cannot start: {error}")))
}

/// What the API server's refusals that stand until someone changes the cluster say: the
/// namespace's Pod Security level, an admission webhook or ValidatingAdmissionPolicy, a
/// LimitRange, a ResourceQuota that needs limits the pod lacks, an invalid object, RBAC (the
/// controller may not create pods), a namespace being deleted.
const FOR_GOOD: &[&str] = &[
    "violates PodSecurity",
    "denied the request",
    "denied request",
    "usage per Container is",
    "usage per Pod is",
    "ratio per Container is",
    "ratio per Pod is",
    "is forbidden: failed quota",
    " is invalid: ",
    "cannot create resource",
    "because it is being terminated",
];

/// How much of a refusal's text goes into an error (admission messages list every violation).
const MAX_REFUSAL_CHARS: usize = 1024;

/// How long a create waits before it first looks at its pod (most are done by then: no API
/// read for them); the wait between looks then doubles up to [`POD_CHECK_MAX`], so that many
/// creates waiting for a node (a full cluster, an autoscaler adding nodes) do not each read
/// their pod every second from an API server that is busy already.
const POD_CHECK_AFTER: Duration = Duration::from_secs(1);
const POD_CHECK_MAX: Duration = Duration::from_secs(16);

impl KubernetesBackend {
    /// Resolves with why the pod `pod()` names (`(what, pod name)`: `what` names the Sandbox for
    /// the message; `None` while there is no pod to look at yet) will never become Ready, once
    /// [`pod_trouble`] says so; never otherwise (the caller races it with its wait). Read errors
    /// are ignored: the wait's own timeout still bounds the create.
    pub(super) async fn pod_failed(
        &self,
        namespace: &str,
        pod: impl Fn() -> Option<(String, String)>,
    ) -> BackendError {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        let mut wait = POD_CHECK_AFTER;
        loop {
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(POD_CHECK_MAX);
            if let Some((what, name)) = pod()
                && let Ok(Some(p)) = pods.get_opt(&name).await
                && let Some(why) = pod_trouble(&p)
            {
                return BackendError::CannotStart(pod_cannot_start(&what, &name, &why));
            }
        }
    }
}

/// `<what> cannot start: its pod <pod>: <why>`, for a Sandbox (`what`) whose pod failed.
pub(super) fn pod_cannot_start(what: &str, pod: &str, why: &str) -> String {
    format!("{what} cannot start: its pod {pod}: {why}")
}

/// Why a sandbox's pod will not become Ready without someone changing its definition or the
/// cluster, in words: the pod ended, or a container (an init container included) exited, is
/// crash-looping, or cannot be created or pulled. A sandbox's containers serve until it is
/// deleted, so any exit of one before the pod is Ready is a failure (an init container's exit 0
/// is its job done). `None` for everything that may still come right (`ContainerCreating`,
/// `Pending` while unschedulable: a cluster autoscaler may add a node).
pub(super) fn pod_trouble(pod: &Pod) -> Option<String> {
    let status = pod.status.as_ref()?;
    if let Some(phase @ ("Failed" | "Succeeded")) = status.phase.as_deref() {
        let why = [status.reason.as_deref(), status.message.as_deref()]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
            .join(": ");
        return Some(format!("the pod is {phase}{}", parenthesised(&why)));
    }
    let init = status.init_container_statuses.iter().flatten();
    let main = status.container_statuses.iter().flatten();
    init.map(|c| (c, true))
        .chain(main.map(|c| (c, false)))
        .find_map(|(c, init)| container_trouble(c, init))
}

/// Why a session's pod no longer has what it ran since `since`, if so: a container is down now
/// ([`pod_trouble`]), or one exited at or after `since` and was restarted (its `lastState`; the
/// API's times have whole seconds, so `since` is taken to its second). A new container starts
/// with a new writable layer: the files and processes the session had are gone.
pub(super) fn restarted_since(pod: &Pod, since: jiff::Timestamp) -> Option<String> {
    if let Some(why) = pod_trouble(pod) {
        return Some(why);
    }
    let since = since.as_second();
    let status = pod.status.as_ref()?;
    let all = status.init_container_statuses.iter().flatten();
    all.chain(status.container_statuses.iter().flatten())
        .find_map(|c| {
            let t = c.last_state.as_ref()?.terminated.as_ref()?;
            let at = t.finished_at.as_ref()?.0;
            (at.as_second() >= since).then(|| {
                format!(
                    "container {} restarted ({} at {at})",
                    c.name,
                    exit_text(t.exit_code, t.reason.as_deref()).replacen(
                        "exit",
                        "it exited with",
                        1
                    )
                )
            })
        })
}

/// What a kubelet says of a container that will not come right by waiting.
const FAILING_WAITS: &[&str] = &[
    "CrashLoopBackOff",
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "ErrImageNeverPull",
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
];

/// The waits of a failed image pull (the back-off's message carries the pull's error).
const PULLS: &[&str] = &["ErrImagePull", "ImagePullBackOff"];

/// What a pull error says when the registry could not be reached or was overloaded: the kubelet
/// pulls again (with a back-off) and it may well work, so the create waits (bounded by its
/// timeout). A pull refused for good (no such image or tag, no access) fails it at once.
const PASSING_PULL_ERRORS: &[&str] = &[
    "registryunavailable",
    "registry is unavailable",
    "timeout",
    "connection refused",
    "connection reset",
    "no route to host",
    "network is unreachable",
    "no such host",
    "temporary failure",
    "server misbehaving",
    "unexpected eof",
    "too many requests",
    "toomanyrequests",
    "500 internal server error",
    "502 bad gateway",
    "503 service unavailable",
    "504 gateway timeout",
    "deadline exceeded",
];

fn pull_may_pass(message: &str) -> bool {
    let message = message.to_ascii_lowercase();
    PASSING_PULL_ERRORS.iter().any(|p| message.contains(p))
}

fn container_trouble(c: &ContainerStatus, init: bool) -> Option<String> {
    let state = c.state.as_ref()?;
    let last_exit = c
        .last_state
        .as_ref()
        .and_then(|s| s.terminated.as_ref())
        .map(|t| exit_text(t.exit_code, t.reason.as_deref()));
    let restarts = match c.restart_count {
        0 => String::new(),
        1 => ", restarted once".into(),
        n => format!(", restarted {n} times"),
    };
    if let Some(w) = &state.waiting
        && let Some(reason) = w.reason.as_deref().filter(|r| FAILING_WAITS.contains(r))
        && !(PULLS.contains(&reason) && pull_may_pass(w.message.as_deref().unwrap_or_default()))
    {
        let detail = [w.message.clone(), last_exit.map(|e| format!("last {e}"))]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
            .join("; ");
        let detail = format!("{detail}{restarts}");
        return Some(format!(
            "container {} is in {reason}{}",
            c.name,
            parenthesised(detail.trim_start_matches(", "))
        ));
    }
    let t = state.terminated.as_ref()?;
    if init && t.exit_code == 0 {
        return None;
    }
    Some(format!(
        "container {} {}{restarts}",
        c.name,
        exit_text(t.exit_code, t.reason.as_deref()).replacen("exit", "exited with", 1)
    ))
}

/// `exit code 3 (Error)`.
fn exit_text(code: i32, reason: Option<&str>) -> String {
    format!(
        "exit code {code}{}",
        parenthesised(reason.unwrap_or_default())
    )
}

fn parenthesised(s: &str) -> String {
    if s.is_empty() {
        String::new()
    } else {
        format!(" ({s})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_refusals_that_stand_fail_a_create() {
        let ready = |status: &str, reason: &str, message: &str| {
            vec![Condition {
                type_: "Ready".into(),
                status: status.into(),
                reason: reason.into(),
                message: message.into(),
                last_transition_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                    jiff::Timestamp::UNIX_EPOCH,
                ),
                observed_generation: None,
            }]
        };
        let verdict = |message: &str| match refusal(
            "Sandbox s",
            Some(&ready("False", "ReconcilerError", message)),
        ) {
            None => "wait".to_string(),
            Some(BackendError::CannotStart(m)) => format!("refused: {m}"),
            Some(BackendError::Exhausted(m)) => format!("exhausted: {m}"),
            Some(other) => panic!("{other:?}"),
        };
        let pod = "Error seen: pods \"s\" is forbidden: ";
        for (message, want) in [
            (format!("{pod}violates PodSecurity \"restricted:latest\": runAsNonRoot != true"), "refused"),
            (format!("{pod}[maximum memory usage per Container is 1Gi, but limit is 2Gi]"), "refused"),
            (format!("{pod}failed quota: q: must specify limits.cpu for: c"), "refused"),
            (format!("{pod}exceeded quota: q, requested: pods=1, used: pods=2, limited: pods=2"), "exhausted"),
            ("Error seen: admission webhook \"validation.gatekeeper.sh\" denied the request: no".into(), "refused"),
            ("Error seen: Pod \"s\" is invalid: spec.containers[0].image: Required value".into(), "refused"),
            (format!("{pod}User \"system:serviceaccount:x:y\" cannot create resource \"pods\""), "refused"),
            // These pass on their own: waited out.
            (format!("{pod}error looking up service account default/default: serviceaccount \"default\" not found"), "wait"),
            ("Error seen: Operation cannot be fulfilled on pods \"s\": the object has been modified".into(), "wait"),
            ("Error seen: dial tcp 10.0.0.1:443: connect: connection refused".into(), "wait"),
        ] {
            let got = verdict(&message);
            assert!(got.starts_with(want), "{message}: {got}");
            if want != "wait" {
                assert!(got.contains("Sandbox s cannot start: ") && !got.contains("Error seen"), "{got}");
            }
        }
        // Only a failed Ready condition from the controller's errors counts.
        let forbidden = format!("{pod}violates PodSecurity \"baseline:latest\"");
        for conditions in [
            ready("True", "ReconcilerError", &forbidden),
            ready("False", "DependenciesNotReady", &forbidden),
        ] {
            assert!(refusal("Sandbox s", Some(&conditions)).is_none());
        }
        assert!(refusal("Sandbox s", None).is_none());
        // Its session ended while it started: it never will.
        match refusal(
            "Sandbox s",
            Some(&ready("False", "SandboxExpired", "Sandbox has expired")),
        ) {
            Some(BackendError::Invalid(m)) => {
                assert!(m.contains("expired before it was ready"), "{m}")
            }
            other => panic!("{other:?}"),
        }
        // Admission messages can list many violations: the error stays bounded.
        let long = verdict(&format!("{pod}violates PodSecurity {}", "x".repeat(10_000)));
        assert!(long.len() < MAX_REFUSAL_CHARS + 100, "{}", long.len());
    }

    #[test]
    fn a_restart_counts_from_when_the_session_was_known_to_run() {
        let pod = |last: serde_json::Value, state: serde_json::Value| -> Pod {
            serde_json::from_value(serde_json::json!({"metadata": {"name": "p"}, "status": {
                "phase": "Running", "containerStatuses": [{"name": "code-interpreter",
                    "image": "i", "imageID": "", "ready": true, "restartCount": 1,
                    "state": state, "lastState": last}]}}))
            .unwrap()
        };
        let running = serde_json::json!({"running": {}});
        let exited_at = |at: &str| serde_json::json!({"terminated": {"exitCode": 137, "reason": "Error", "finishedAt": at}});
        let since: jiff::Timestamp = "2026-12-05T10:00:00.700Z".parse().unwrap();
        // Exited before the session ran (a warm pod's earlier restart): nothing lost.
        let before = pod(exited_at("2026-12-05T09:59:59Z"), running.clone());
        assert_eq!(restarted_since(&before, since), None);
        // Exited since (the API's whole seconds: the same second counts).
        for at in ["2026-12-05T10:00:00Z", "2026-12-05T10:03:00Z"] {
            let after = pod(exited_at(at), running.clone());
            assert_eq!(
                restarted_since(&after, since).as_deref(),
                Some(&*format!(
                    "container code-interpreter restarted (it exited with code 137 (Error) at {})",
                    at
                ))
            );
        }
        // Down right now.
        let down = pod(
            serde_json::json!({}),
            serde_json::json!({"waiting": {"reason": "CrashLoopBackOff"}}),
        );
        assert!(
            restarted_since(&down, since)
                .unwrap()
                .contains("CrashLoopBackOff")
        );
        // Never exited.
        assert_eq!(
            restarted_since(&pod(serde_json::json!({}), running), since),
            None
        );
    }

    #[test]
    fn a_pod_that_failed_is_told_apart_from_one_still_coming_up() {
        let pod = |status: serde_json::Value| -> Pod {
            serde_json::from_value(serde_json::json!({"metadata": {"name": "p"}, "status": status}))
                .unwrap()
        };
        let container = |state: serde_json::Value, extra: serde_json::Value| {
            let mut c = serde_json::json!({"name": "agent", "image": "i", "imageID": "",
                "ready": false, "restartCount": 0, "state": state});
            for (k, v) in extra.as_object().unwrap() {
                c[k] = v.clone();
            }
            c
        };
        let running = |cs: Vec<serde_json::Value>| {
            pod(serde_json::json!({"phase": "Running", "containerStatuses": cs}))
        };
        let crash = container(
            serde_json::json!({"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 10s"}}),
            serde_json::json!({"restartCount": 2,
                "lastState": {"terminated": {"exitCode": 3, "reason": "Error"}}}),
        );
        assert_eq!(
            pod_trouble(&running(vec![crash])).as_deref(),
            Some(
                "container agent is in CrashLoopBackOff (back-off 10s; last exit code 3 (Error), \
                 restarted 2 times)"
            )
        );
        let pull = container(
            serde_json::json!({"waiting": {"reason": "ErrImagePull", "message": "not found"}}),
            serde_json::json!({}),
        );
        assert_eq!(
            pod_trouble(&pod(
                serde_json::json!({"phase": "Pending", "containerStatuses": [pull]})
            ))
            .as_deref(),
            Some("container agent is in ErrImagePull (not found)")
        );
        // A registry that could not be reached or was overloaded may work at the kubelet's next
        // pull: waited for. The back-off's message carries the pull's error.
        let pulling = |reason: &str, message: &str| {
            let c = container(
                serde_json::json!({"waiting": {"reason": reason, "message": message}}),
                serde_json::json!({}),
            );
            pod_trouble(&pod(
                serde_json::json!({"phase": "Pending", "containerStatuses": [c]}),
            ))
        };
        for (reason, message) in [
            (
                "ErrImagePull",
                "failed to do request: Head \"https://r.example/v2/x/manifests/1\": dial tcp: lookup r.example: i/o timeout",
            ),
            (
                "ImagePullBackOff",
                "Back-off pulling image \"x\": ErrImagePull: unexpected status from HEAD request: 429 Too Many Requests",
            ),
            (
                "ErrImagePull",
                "read tcp 10.0.0.1:5000->10.0.0.2:443: read: connection reset by peer",
            ),
            (
                "RegistryUnavailable",
                "image pull failed for x because the registry is unavailable",
            ),
        ] {
            assert_eq!(pulling(reason, message), None, "{reason}: {message}");
        }
        for message in [
            "failed to resolve reference \"docker.io/library/nope:1\": docker.io/library/nope:1: not found",
            "pull access denied, repository does not exist or may require authorization: server message: insufficient_scope",
            "Back-off pulling image \"x\": ErrImagePull: unexpected status: 401 Unauthorized",
        ] {
            assert!(pulling("ImagePullBackOff", message).is_some(), "{message}");
        }
        let exited = container(
            serde_json::json!({"terminated": {"exitCode": 1, "reason": "Error"}}),
            serde_json::json!({"restartCount": 1}),
        );
        assert_eq!(
            pod_trouble(&running(vec![exited])).as_deref(),
            Some("container agent exited with code 1 (Error), restarted once")
        );
        assert_eq!(
            pod_trouble(&pod(
                serde_json::json!({"phase": "Failed", "reason": "Evicted",
                "message": "ephemeral storage"})
            ))
            .as_deref(),
            Some("the pod is Failed (Evicted: ephemeral storage)")
        );
        // An init container that finished is its job done; one that failed is not.
        let init_done = container(
            serde_json::json!({"terminated": {"exitCode": 0, "reason": "Completed"}}),
            serde_json::json!({}),
        );
        let creating = container(
            serde_json::json!({"waiting": {"reason": "ContainerCreating"}}),
            serde_json::json!({}),
        );
        let init_pod = |init: serde_json::Value| {
            pod(
                serde_json::json!({"phase": "Pending", "initContainerStatuses": [init],
                "containerStatuses": [creating.clone()]}),
            )
        };
        assert_eq!(pod_trouble(&init_pod(init_done)), None);
        let init_failed = container(
            serde_json::json!({"terminated": {"exitCode": 2}}),
            serde_json::json!({}),
        );
        assert_eq!(
            pod_trouble(&init_pod(init_failed)).as_deref(),
            Some("container agent exited with code 2")
        );
        // Still coming up: creating, running, unschedulable, no status yet.
        assert_eq!(pod_trouble(&running(vec![creating.clone()])), None);
        let up = container(serde_json::json!({"running": {}}), serde_json::json!({}));
        assert_eq!(pod_trouble(&running(vec![up])), None);
        assert_eq!(
            pod_trouble(&pod(serde_json::json!({"phase": "Pending", "conditions": [
                {"type": "PodScheduled", "status": "False", "reason": "Unschedulable"}]}))),
            None
        );
        assert_eq!(pod_trouble(&pod(serde_json::json!(null))), None);
    }
}
