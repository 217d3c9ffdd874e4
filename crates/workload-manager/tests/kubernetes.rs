//! The Kubernetes backend end to end on a real control plane with the real agent-sandbox
//! controller (v1beta1): real PicoD processes on pod IPs (process kubelet), the Workload
//! Manager's HTTP API.

#[path = "kubernetes/callers.rs"]
mod callers;
mod common;
#[path = "kubernetes/stuck.rs"]
mod stuck;
#[path = "kubernetes/unanswered.rs"]
mod unanswered;

use std::time::Duration;

use agentcube_crds::labels::FIRST_OBSERVED;
use common::kube::*;
use common::{ROUTER_PUB, sh};
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use serde_json::{Value, json};

const ON_DEMAND: &str = "apiVersion: runtime.agentcube.volcano.sh/v1alpha1
kind: CodeInterpreter
metadata: {name: od, namespace: default}
spec:
  template:
    image: ghcr.io/volcano-sh/picod:latest
    args: [--workspace=/root]
    environment: [{name: GREETING, value: hi}]
  sessionTimeout: 7m
";

const POOLED: &str = "apiVersion: runtime.agentcube.volcano.sh/v1alpha1
kind: CodeInterpreter
metadata: {name: pooled, namespace: default}
spec:
  template:
    image: ghcr.io/volcano-sh/picod:latest
    args: [--workspace=/root]
  warmPoolSize: 2
";

/// A CodeInterpreter `name` in `default` with this `template` (flow YAML) and warm pool size.
fn code_interpreter(name: &str, template: &str, pool: u32) -> String {
    format!(
        "apiVersion: runtime.agentcube.volcano.sh/v1alpha1
kind: CodeInterpreter
metadata: {{name: {name}, namespace: default}}
spec:
  template: {template}
  warmPoolSize: {pool}
"
    )
}

#[tokio::test]
async fn direct_sandbox_session_is_built_as_upstream_serves_and_is_deleted() {
    let k = KubeStack::start(KubeOptions {
        manifests: ON_DEMAND.into(),
        runtime_class: "kata".into(),
        ..Default::default()
    })
    .await;
    let s = k.create_ok("code-interpreter", "od").await;
    assert_eq!(s["kind"], "Sandbox");
    let name = s["sandboxName"].as_str().unwrap().to_string();
    assert!(name.starts_with("od-") && name.len() == 11, "{name}");
    let ep = &s["entryPoints"][0];
    assert_eq!(
        (ep["path"].as_str(), ep["protocol"].as_str()),
        (Some("/"), Some("HTTP"))
    );
    assert!(
        ep["endpoint"].as_str().unwrap().starts_with("127.")
            && ep["endpoint"].as_str().unwrap().ends_with(":8080")
    );

    // The Sandbox the backend created, field for field where it matters (spec §2.4).
    let sb = sandboxes(&k.client).get(&name).await.unwrap();
    assert_eq!(sb.metadata.uid.as_deref(), s["sandboxId"].as_str());
    let labels = sb.metadata.labels.clone().unwrap();
    assert_eq!(
        labels["runtime.agentcube.io/session-id"],
        s["sessionId"].as_str().unwrap()
    );
    assert_eq!(labels["runtime.agentcube.io/workload-name"], "od");
    assert_eq!(labels["managed-by"], "agentcube-workload-manager");
    assert_eq!(
        sb.metadata.annotations.clone().unwrap()["runtime.agentcube.io/idle-timeout"],
        "7m0s"
    );
    let spec = &sb.data["spec"];
    assert_eq!(
        sb.types.as_ref().unwrap().api_version,
        "agents.x-k8s.io/v1beta1"
    );
    assert_eq!(spec["operatingMode"], "Running");
    assert!(spec["shutdownTime"].is_string());
    let pod_spec = &spec["podTemplate"]["spec"];
    assert_eq!(
        pod_spec["runtimeClassName"], "kata",
        "--runtime-class-name is the default"
    );
    let c = &pod_spec["containers"][0];
    assert_eq!(c["name"], "code-interpreter");
    let env: Vec<(String, String)> = c["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let value = e["value"].as_str().map(str::to_string).unwrap_or_else(|| {
                format!(
                    "from {}",
                    e["valueFrom"]["fieldRef"]["fieldPath"].as_str().unwrap()
                )
            });
            (e["name"].as_str().unwrap().into(), value)
        })
        .collect();
    assert_eq!(env[0], ("GREETING".into(), "hi".into()));
    assert_eq!(
        env[1],
        ("PICOD_AUTH_PUBLIC_KEY".into(), ROUTER_PUB.into()),
        "key from the Secret"
    );
    assert_eq!(
        env[2],
        ("PICOD_SANDBOX_NAME".into(), "from metadata.name".into()),
        "PicoD learns its pod name, which Router tokens are bound to"
    );

    // PicoD in the pod answers, with the environment the pod was given.
    let (status, out) = exec_tcp(&k.http, &s, &sh("echo $GREETING; pwd")).await;
    assert_eq!(status, 200, "{out}");
    assert_eq!(
        out["stdout"], "hi\n/root\n",
        "runs in the workspace (--workspace=/root)"
    );
    // No service-account token for the untrusted code: the API server's admission adds none to
    // a pod that opts out, so the kubelet mounts none (it used to be the namespace's default).
    let pod = Api::<Pod>::namespaced(k.client.clone(), "default")
        .get(&name)
        .await
        .unwrap()
        .spec
        .unwrap();
    assert_eq!(pod.automount_service_account_token, Some(false));
    let volumes = pod.volumes.unwrap_or_default();
    assert!(
        volumes
            .iter()
            .all(|v| !v.name.starts_with("kube-api-access")),
        "{volumes:?}"
    );
    let token = "/var/run/secrets/kubernetes.io/serviceaccount/token";
    let (status, out) = exec_tcp(&k.http, &s, &["cat", token]).await;
    assert_eq!(status, 200, "{out}");
    assert_ne!(out["exit_code"], 0, "{out}");

    // The store record is upstream's.
    let rec = k.store.get(s["sessionId"].as_str().unwrap()).await.unwrap();
    assert_eq!(rec.kind, agentcube_types::BackingKind::Sandbox);
    assert_eq!(rec.name, name);
    assert_eq!(rec.status, agentcube_types::SessionStatus::Ready);

    assert_eq!(k.delete(s["sessionId"].as_str().unwrap()).await, 200);
    assert!(sandboxes(&k.client).get_opt(&name).await.unwrap().is_none());
    let pods: Api<Pod> = Api::namespaced(k.client.clone(), "default");
    k.eventually("pod gone", 10, async || {
        pods.get_opt(&name).await.unwrap().is_none().then_some(())
    })
    .await;
    assert_eq!(k.stop().await, 0, "no pod process left");
}

#[tokio::test]
async fn warm_pool_session_is_a_claim_on_a_pool_pod_and_the_pool_refills() {
    let k = KubeStack::start(KubeOptions {
        manifests: POOLED.into(),
        ..Default::default()
    })
    .await;
    let members = async || pool_members(&k.client, "pooled").await;
    let initial = k
        .eventually("pool of 2 ready", 20, async || {
            let m = members().await;
            (m.len() == 2 && m.iter().all(ready)).then_some(m)
        })
        .await;
    // Warm-pool depth as /metrics reports it, from the shared Sandbox watch.
    let pools = k.wm.as_ref().unwrap().pools.clone();
    k.eventually("pool level 2/2", 10, async || {
        let level = agentcube_workload_manager::backend::PoolLevel {
            namespace: "default".into(),
            name: "pooled".into(),
            ready: 2,
            size: 2,
            standby: 0,
            failing: None,
        };
        pools.levels().contains(&level).then_some(())
    })
    .await;
    let pods: Api<Pod> = Api::namespaced(k.client.clone(), "default");
    let mut pool_pods = Vec::new();
    for m in &initial {
        let p = pods.get(m.metadata.name.as_deref().unwrap()).await.unwrap();
        pool_pods.push((p.metadata.name.unwrap(), p.metadata.uid.unwrap()));
    }
    let s = k.create_ok("code-interpreter", "pooled").await;
    assert_eq!(s["kind"], "SandboxClaim");
    let claim_name = s["sandboxName"].as_str().unwrap().to_string();
    let claim = claims(&k.client).get(&claim_name).await.unwrap();
    let owner = &claim.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str(), owner.controller),
        ("CodeInterpreter", "pooled", None)
    );
    assert_eq!(claim.data["spec"]["warmPoolRef"]["name"], "pooled");
    assert_eq!(claim.data["spec"]["lifecycle"]["shutdownPolicy"], "Delete");
    // The Workload Manager answers once the claim controls the Sandbox its annotation names,
    // possibly before agent-sandbox writes the claim's status, which then names the same one.
    let bound =
        claim.metadata.annotations.as_ref().unwrap()["agents.x-k8s.io/sandbox-name"].clone();
    k.eventually("claim status names the adopted Sandbox", 10, async || {
        let c = claims(&k.client).get(&claim_name).await.unwrap();
        (c.data["status"]["sandbox"]["name"] == bound.as_str()).then_some(())
    })
    .await;
    // Created with agent-sandbox's first-observed annotation, so agent-sandbox's first write to
    // the claim is the adoption itself, not a patch adding that annotation.
    let observed = &claim.metadata.annotations.as_ref().unwrap()[FIRST_OBSERVED];
    assert!(observed.parse::<jiff::Timestamp>().is_ok(), "{observed}");
    let writes = claim_writes(&k, &claim_name).await;
    assert_eq!(
        writes[..2],
        ["create", "update"],
        "created, then agent-sandbox's adoption: {writes:?}"
    );
    let sb = sandboxes(&k.client).get(&bound).await.unwrap();
    assert_eq!(
        sb.metadata.uid.as_deref(),
        s["sandboxId"].as_str(),
        "sandboxId is the adopted Sandbox's uid"
    );
    assert_eq!(
        sb.metadata.owner_references.as_ref().unwrap()[0].uid,
        claim.metadata.uid.clone().unwrap()
    );
    let pod = pods.get(&bound).await.unwrap();
    assert!(
        pool_pods.contains(&(
            pod.metadata.name.clone().unwrap(),
            pod.metadata.uid.clone().unwrap()
        )),
        "served by a pool pod"
    );
    let (status, out) = exec_tcp(&k.http, &s, &["echo", "warm"]).await;
    assert_eq!((status, out["stdout"].as_str()), (200, Some("warm\n")));
    let rec = k.store.get(s["sessionId"].as_str().unwrap()).await.unwrap();
    assert_eq!(
        (rec.kind, rec.name.as_str()),
        (
            agentcube_types::BackingKind::SandboxClaim,
            claim_name.as_str()
        )
    );
    k.eventually("pool refilled", 20, async || {
        let m = members().await;
        (m.len() == 2
            && m.iter().all(ready)
            && m.iter().all(|x| x.metadata.name.as_deref() != Some(&bound)))
        .then_some(())
    })
    .await;
    assert_eq!(k.delete(s["sessionId"].as_str().unwrap()).await, 200);
    k.eventually("claim, sandbox and pod gone", 10, async || {
        (claims(&k.client)
            .get_opt(&claim_name)
            .await
            .unwrap()
            .is_none()
            && sandboxes(&k.client)
                .get_opt(&bound)
                .await
                .unwrap()
                .is_none()
            && pods.get_opt(&bound).await.unwrap().is_none())
        .then_some(())
    })
    .await;
    assert_eq!(
        members().await.len(),
        2,
        "the pool is untouched by the delete"
    );
}

/// A direct Sandbox past its session's maximum duration is deleted by agent-sandbox itself
/// (`shutdownPolicy: Delete`, as on claims), not kept as an expired object, even while no
/// Workload Manager GC runs (here: none within the test); one whose session ends before it is
/// ready fails its create at once.
#[tokio::test]
async fn an_expired_direct_sandbox_is_deleted_by_agent_sandbox() {
    // Its image takes 3 s to pull (the test kubelet's slow registry): longer than the session.
    let slow = "{image: slow-registry.test/3s/ghcr.io/volcano-sh/picod:latest}";
    let brief = code_interpreter("brief", slow, 0) + "  maxSessionDuration: 1s\n";
    let k = KubeStack::start(KubeOptions {
        manifests: ON_DEMAND.replace("  sessionTimeout: 7m\n", "  maxSessionDuration: 10s\n")
            + "---\n"
            + &brief,
        ..Default::default()
    })
    .await;
    // A session that ends before its pod can start fails at once, saying so (it waited for the
    // create timeout and answered 504), and leaves nothing.
    let started = std::time::Instant::now();
    let (status, body) = k.create("code-interpreter", "brief").await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("expired before it was ready"),
        "{body}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
    k.assert_no_records().await;
    let s = k.create_ok("code-interpreter", "od").await;
    let name = s["sandboxName"].as_str().unwrap().to_string();
    let sb = sandboxes(&k.client).get(&name).await.unwrap();
    assert_eq!(sb.data["spec"]["shutdownPolicy"], "Delete");
    let pods: Api<Pod> = Api::namespaced(k.client.clone(), "default");
    k.eventually("the expired Sandbox and its pod gone", 30, async || {
        (sandboxes(&k.client).get_opt(&name).await.unwrap().is_none()
            && pods.get_opt(&name).await.unwrap().is_none())
        .then_some(())
    })
    .await;
}

/// A changed CodeInterpreter template reaches the next session: the warm pool's unclaimed
/// Sandboxes of the old template are replaced (agent-sandbox's default, `OnReplenish`, would
/// hand them out until each was claimed once), and a session already made keeps its own.
#[tokio::test]
async fn a_changed_template_replaces_the_unclaimed_warm_sandboxes() {
    let k = KubeStack::start(KubeOptions {
        manifests: POOLED.into(),
        ..Default::default()
    })
    .await;
    let members = async || pool_members(&k.client, "pooled").await;
    let names = |m: &[DynamicObject]| -> Vec<String> {
        m.iter().filter_map(|x| x.metadata.name.clone()).collect()
    };
    let initial = k
        .eventually("pool of 2 ready", 20, async || {
            let m = members().await;
            (m.len() == 2 && m.iter().all(ready)).then_some(names(&m))
        })
        .await;
    let before = k.create_ok("code-interpreter", "pooled").await;
    let flavour = async |s: &Value| {
        let (status, out) = exec_tcp(&k.http, s, &["sh", "-c", "echo \"<$FLAVOUR>\""]).await;
        assert_eq!(status, 200, "{out}");
        out["stdout"].as_str().unwrap().trim().to_string()
    };
    assert_eq!(flavour(&before).await, "<>");
    code_interpreters(&k.client)
        .patch(
            "pooled",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"template": {"environment": [{"name": "FLAVOUR", "value": "new"}]}}})),
        )
        .await
        .unwrap();
    k.eventually(
        "the pool holds only new-template sandboxes",
        30,
        async || {
            let m = members().await;
            (m.len() == 2 && m.iter().all(ready) && !names(&m).iter().any(|n| initial.contains(n)))
                .then_some(())
        },
    )
    .await;
    let after = k.create_ok("code-interpreter", "pooled").await;
    assert_eq!(after["kind"], "SandboxClaim");
    assert_eq!(
        flavour(&after).await,
        "<new>",
        "the new session runs the new template"
    );
    assert_eq!(
        flavour(&before).await,
        "<>",
        "the session made before keeps its sandbox"
    );
    for s in [&before, &after] {
        assert_eq!(k.delete(s["sessionId"].as_str().unwrap()).await, 200);
    }
}

/// A session whose pod agent-sandbox replaced (another IP, an empty workspace) or whose claim
/// was deleted ends at the next GC run: its record goes (the Router then answers 404, not 502
/// until the idle timeout), and a replaced pod's claim with it; other sessions are untouched,
/// until their record is lost: then their claim goes.
#[tokio::test]
async fn sessions_whose_pod_was_replaced_or_whose_claim_went_end_at_the_next_gc() {
    let k = KubeStack::start(KubeOptions {
        manifests: POOLED.into(),
        gc_interval: Duration::from_millis(300),
        ..Default::default()
    })
    .await;
    let (replaced, deleted, healthy) = (
        k.create_ok("code-interpreter", "pooled").await,
        k.create_ok("code-interpreter", "pooled").await,
        k.create_ok("code-interpreter", "pooled").await,
    );
    let id = |s: &serde_json::Value| s["sessionId"].as_str().unwrap().to_string();
    let claim_of = |s: &serde_json::Value| s["sandboxName"].as_str().unwrap().to_string();
    // Let a few GC runs pass over the three live sessions first: nothing is reaped.
    tokio::time::sleep(Duration::from_secs(1)).await;
    for s in [&replaced, &deleted, &healthy] {
        assert!(!k.record_gone(s).await, "a live session was reaped: {s}");
    }

    let pod_name = k
        .eventually("the claim names its Sandbox (and pod)", 10, async || {
            let c = claims(&k.client).get(&claim_of(&replaced)).await.unwrap();
            c.data["status"]["sandbox"]["name"]
                .as_str()
                .map(str::to_string)
        })
        .await;
    let pods: Api<Pod> = Api::namespaced(k.client.clone(), "default");
    pods.delete(&pod_name, &DeleteParams::default())
        .await
        .unwrap();
    claims(&k.client)
        .delete(&claim_of(&deleted), &DeleteParams::background())
        .await
        .unwrap();
    k.eventually("the deleted claim's session ended", 20, async || {
        k.record_gone(&deleted).await.then_some(())
    })
    .await;
    k.eventually(
        "the replaced pod's session and claim ended",
        30,
        async || {
            let claim_gone = claims(&k.client)
                .get_opt(&claim_of(&replaced))
                .await
                .unwrap()
                .is_none();
            (k.record_gone(&replaced).await && claim_gone).then_some(())
        },
    )
    .await;
    assert!(!k.record_gone(&healthy).await, "the healthy session stays");
    let (status, out) = exec_tcp(&k.http, &healthy, &["echo", "alive"]).await;
    assert_eq!((status, out["stdout"].as_str()), (200, Some("alive\n")));

    // Its record lost (a Redis restarted without persistence): its claim goes at a GC run, not
    // only at the next Workload Manager start.
    k.store.delete(&id(&healthy)).await.unwrap();
    k.eventually("the orphaned claim deleted", 20, async || {
        claims(&k.client)
            .get_opt(&claim_of(&healthy))
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;
    // Each counted once, for what it was.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let count = |reason| reclaimed(&k, reason);
    assert_eq!((count("dead"), count("orphan")), (2, 1));
}

/// A session whose object went before any GC run had seen it ends at the next run too: a
/// CodeInterpreter deleted right after a create takes its claims along, and before, GC noticed
/// only objects vanishing that a run had seen: such a session answered 502 until its idle
/// timeout (forever for a client that retries). A session made at the same time that keeps its
/// object goes on. Mutation-checked: without `reap_unseen` the two records stay.
#[tokio::test]
async fn sessions_whose_object_went_before_gc_first_saw_them_end_too() {
    let k = KubeStack::start(KubeOptions {
        manifests: format!("{ON_DEMAND}---\n{POOLED}"),
        // Long enough that no run falls between a create and the deletion below.
        gc_interval: Duration::from_secs(2),
        ..Default::default()
    })
    .await;
    let (direct, claimed, healthy) = (
        k.create_ok("code-interpreter", "od").await,
        k.create_ok("code-interpreter", "pooled").await,
        k.create_ok("code-interpreter", "pooled").await,
    );
    let name = |s: &serde_json::Value| s["sandboxName"].as_str().unwrap().to_string();
    let dp = DeleteParams::background();
    sandboxes(&k.client)
        .delete(&name(&direct), &dp)
        .await
        .unwrap();
    claims(&k.client)
        .delete(&name(&claimed), &dp)
        .await
        .unwrap();
    k.eventually("both sessions ended", 20, async || {
        (k.record_gone(&direct).await && k.record_gone(&claimed).await).then_some(())
    })
    .await;
    // A few more runs: the session that kept its claim goes on.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(!k.record_gone(&healthy).await, "a live session was reaped");
    let (status, out) = exec_tcp(&k.http, &healthy, &["echo", "alive"]).await;
    assert_eq!((status, out["stdout"].as_str()), (200, Some("alive\n")));
    assert_eq!(reclaimed(&k, "dead"), 2);
}

/// A session whose sandbox's container restarted (PicoD killed: from user code, an OOM kill)
/// keeps its pod and IP but has lost its files and processes: it ends at the next GC run, on
/// both create paths, while an untouched session goes on.
#[tokio::test]
async fn sessions_whose_sandbox_restarted_end_at_the_next_gc() {
    let k = KubeStack::start(KubeOptions {
        manifests: format!("{ON_DEMAND}---\n{POOLED}"),
        gc_interval: Duration::from_millis(300),
        ..Default::default()
    })
    .await;
    let (direct, claimed, healthy) = (
        k.create_ok("code-interpreter", "od").await,
        k.create_ok("code-interpreter", "pooled").await,
        k.create_ok("code-interpreter", "od").await,
    );
    let id = |s: &serde_json::Value| s["sessionId"].as_str().unwrap().to_string();
    for s in [&direct, &claimed, &healthy] {
        let (status, _) = exec_tcp(&k.http, s, &["sh", "-c", "echo kept > f.txt"]).await;
        assert_eq!(status, 200);
    }
    // A few GC runs over three live sessions first: nothing is reaped.
    tokio::time::sleep(Duration::from_secs(1)).await;
    for s in [&direct, &claimed, &healthy] {
        assert!(!k.record_gone(s).await, "a live session was reaped: {s}");
    }
    // User code kills its PicoD; the kubelet restarts the container (same pod, same IP).
    for s in [&direct, &claimed] {
        let (status, _) = exec_tcp(&k.http, s, &["sh", "-c", KILL_PICOD]).await;
        assert_eq!(status, 200);
    }
    k.eventually("the restarted sessions ended", 30, async || {
        (k.record_gone(&direct).await && k.record_gone(&claimed).await).then_some(())
    })
    .await;
    k.eventually("their Sandbox and claim deleted", 30, async || {
        let sb = sandboxes(&k.client)
            .get_opt(direct["sandboxName"].as_str().unwrap())
            .await
            .unwrap();
        let claim = claims(&k.client)
            .get_opt(claimed["sandboxName"].as_str().unwrap())
            .await
            .unwrap();
        let going = |o: Option<kube::api::DynamicObject>| {
            o.is_none_or(|o| o.metadata.deletion_timestamp.is_some())
        };
        (going(sb) && going(claim)).then_some(())
    })
    .await;
    // Why, for whoever uses them next (the Router's 404 adds it).
    for s in [&direct, &claimed] {
        assert_ended_for_a_restart(&k, &id(s)).await;
    }
    assert!(
        !k.record_gone(&healthy).await,
        "the untouched session stays"
    );
    let (status, out) = exec_tcp(&k.http, &healthy, &["cat", "f.txt"]).await;
    assert_eq!((status, out["stdout"].as_str()), (200, Some("kept\n")));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(reclaimed(&k, "dead"), 2, "each counted once");
}

/// A container restart is caught by a replica that did not make the session, even when it
/// happened before that replica first saw the session (another replica made it, or this one
/// started since): sessions it did not make count from their record's creation. Before, they
/// counted from its first GC run, and such a session went on in its empty new container.
#[tokio::test]
async fn a_restart_before_another_replica_first_saw_the_session_still_ends_it() {
    // This one never collects garbage (1 h): only the replica below can end the session.
    let k = KubeStack::start(KubeOptions {
        manifests: ON_DEMAND.into(),
        ..Default::default()
    })
    .await;
    let s = k.create_ok("code-interpreter", "od").await;
    let id = s["sessionId"].as_str().unwrap().to_string();
    let killed_at = jiff::Timestamp::now();
    assert_eq!(
        exec_tcp(&k.http, &s, &["sh", "-c", KILL_PICOD]).await.0,
        200
    );
    // Ready again on its new container before the replica starts: it sees the Sandbox as it is.
    let name = s["sandboxName"].as_str().unwrap().to_string();
    k.eventually(
        "the Sandbox Ready again after its restart",
        60,
        async || {
            let sb = sandboxes(&k.client).get(&name).await.unwrap();
            let conditions = sb.data["status"]["conditions"].as_array().cloned();
            conditions?.iter().find_map(|c| {
                let at: jiff::Timestamp = c["lastTransitionTime"].as_str()?.parse().ok()?;
                (c["type"] == "Ready" && c["status"] == "True" && at > killed_at).then_some(())
            })
        },
    )
    .await;
    let replica = k.replica(Duration::from_millis(300)).await;
    k.eventually("the replica ended the session", 30, async || {
        matches!(
            k.store.get(&id).await,
            Err(agentcube_store::Error::NotFound)
        )
        .then_some(())
    })
    .await;
    assert_ended_for_a_restart(&k, &id).await;
    replica.shutdown().await;
}

/// What user code runs to kill its sandbox's PicoD a moment after the answer: the kubelet then
/// restarts the container (same pod, same IP, none of the session's files or processes).
const KILL_PICOD: &str =
    "p=$PPID; setsid sh -c \"sleep 0.3; kill -9 $p\" >/dev/null 2>&1 </dev/null & exit 0";

/// Session `id` ended because its container restarted, and says so to whoever uses it next.
async fn assert_ended_for_a_restart(k: &KubeStack, id: &str) {
    let why = k
        .store
        .get_marks(&[agentcube_store::gone_mark(id)])
        .await
        .unwrap();
    let why = why[0].clone().unwrap_or_default();
    // Restarted, or backing off before a restart: either way, killed (137).
    assert!(
        why.starts_with("its sandbox's container ") && why.contains("137"),
        "{why:?}"
    );
}

/// The writes to claim `name` in the API server's audit log (`create`, `update`, `patch status`,
/// …), once agent-sandbox has written its status.
async fn claim_writes(k: &KubeStack, name: &str) -> Vec<String> {
    k.eventually(
        "agent-sandbox's status write in the audit log",
        10,
        async || {
            let writes: Vec<String> = cluster().audit_events()[k.audit_start..]
                .iter()
                .filter(|e| {
                    e["objectRef"]["resource"] == "sandboxclaims"
                        && e["objectRef"]["name"] == name
                        && !matches!(e["verb"].as_str(), Some("get" | "list" | "watch"))
                })
                .map(|e| {
                    let sub = e["objectRef"]["subresource"].as_str().unwrap_or("");
                    format!("{} {sub}", e["verb"].as_str().unwrap_or(""))
                        .trim()
                        .to_string()
                })
                .collect();
            writes.iter().any(|w| w == "patch status").then_some(writes)
        },
    )
    .await
}

#[tokio::test]
async fn unknown_definitions_404_and_a_cr_applied_later_is_served() {
    let k = KubeStack::start(KubeOptions::default()).await;
    let (status, body) = k.create("code-interpreter", "od").await;
    assert_eq!(
        (status, body),
        (404, json!({"message": "code interpreter not found"}))
    );
    let (status, body) = k.create("agent-runtime", "nope").await;
    assert_eq!(
        (status, body),
        (404, json!({"message": "agent runtime not found"}))
    );
    apply(&k.client, ON_DEMAND).await;
    // Straight after the apply: found through the watch, or by asking the API server directly.
    let s = k.create_ok("code-interpreter", "od").await;
    assert_eq!(s["kind"], "Sandbox");
    code_interpreters(&k.client)
        .delete("od", &DeleteParams::default())
        .await
        .unwrap();
    k.eventually("definition gone", 10, async || {
        (k.create("code-interpreter", "od").await.0 == 404).then_some(())
    })
    .await;
    // The API server refuses a limit that is not a quantity (our CRDs carry its pattern, as
    // upstream's do), naming the field.
    let typo = ON_DEMAND.replace("name: od", "name: typo").replace(
        "    args:",
        "    resources: {limits: {memory: 512MB}}\n    args:",
    );
    let typo: serde_json::Value = serde_yaml::from_str(&typo).unwrap();
    let refused = code_interpreters(&k.client)
        .create(&Default::default(), &serde_json::from_value(typo).unwrap())
        .await;
    match refused {
        Err(kube::Error::Api(e)) => assert!(
            e.code == 422 && e.message.contains("spec.template.resources.limits.memory"),
            "{e:?}"
        ),
        other => panic!("a CodeInterpreter with memory: 512MB was not refused: {other:?}"),
    }
    // Long definition names: up to 63 characters they work (the sandbox's name is cut to fit a
    // label value; it was a 500 from the API server's 422 before), beyond that a clear 400.
    let (fits, over) = ("f".repeat(63), "o".repeat(64));
    for name in [&fits, &over] {
        apply(
            &k.client,
            &ON_DEMAND.replace("name: od", &format!("name: {name}")),
        )
        .await;
    }
    let s = k.create_ok("code-interpreter", &fits).await;
    let sandbox = s["sandboxName"].as_str().unwrap();
    assert!(
        sandbox.len() <= 63 && sandbox.starts_with("fff"),
        "{sandbox}"
    );
    let (status, body) = k.create("code-interpreter", &over).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("must fit a label value"),
        "{body}"
    );
}

#[tokio::test]
async fn agent_runtime_sandbox_runs_the_pod_template_and_reads_its_pod_ip() {
    let agent = r#"apiVersion: runtime.agentcube.volcano.sh/v1alpha1
kind: AgentRuntime
metadata: {name: echo, namespace: default}
spec:
  targetPort: [{port: 9000, protocol: HTTP, pathPrefix: /}]
  podTemplate:
    labels: {app: echo}
    spec:
      containers:
        - name: agent
          image: python:3.12-slim
          command: [python3, -c, "import http.server as h, os; h.HTTPServer((os.environ['POD_IP'], 9000), h.SimpleHTTPRequestHandler).serve_forever()"]
          env: [{name: POD_IP, valueFrom: {fieldRef: {fieldPath: status.podIP}}}]
"#;
    let k = KubeStack::start(KubeOptions {
        manifests: agent.into(),
        ..Default::default()
    })
    .await;
    let s = k.create_ok("agent-runtime", "echo").await;
    let sb = sandboxes(&k.client)
        .get(s["sandboxName"].as_str().unwrap())
        .await
        .unwrap();
    assert_eq!(
        sb.data["spec"]["podTemplate"]["metadata"]["labels"]["app"],
        "echo"
    );
    assert!(
        sb.data["spec"]["podTemplate"]["spec"]["containers"][0]["env"]
            .as_array()
            .unwrap()
            .len()
            == 1,
        "no key injected into AgentRuntime pods"
    );
    let ep = s["entryPoints"][0]["endpoint"].as_str().unwrap();
    assert!(ep.ends_with(":9000"));
    let r = k.http.get(format!("http://{ep}/")).send().await.unwrap();
    assert_eq!(r.status(), 200, "the agent answers on its pod IP");
}

#[tokio::test]
async fn gc_reclaims_an_idle_session_by_deleting_its_sandbox() {
    let short = "apiVersion: runtime.agentcube.volcano.sh/v1alpha1
kind: CodeInterpreter
metadata: {name: short, namespace: default}
spec:
  template: {image: ghcr.io/volcano-sh/picod:latest}
  sessionTimeout: 1s
";
    let k = KubeStack::start(KubeOptions {
        manifests: short.into(),
        gc_interval: Duration::from_millis(300),
        ..Default::default()
    })
    .await;
    let s = k.create_ok("code-interpreter", "short").await;
    let name = s["sandboxName"].as_str().unwrap().to_string();
    // GC deletes the sandbox, then the record: wait for both (the record used to be checked the
    // moment the sandbox was gone, which raced GC's second step).
    k.eventually("idle session reclaimed", 15, async || {
        let sandbox_gone = sandboxes(&k.client).get_opt(&name).await.unwrap().is_none();
        let record = k.store.get(s["sessionId"].as_str().unwrap()).await;
        let record_gone = matches!(record, Err(agentcube_store::Error::NotFound));
        (sandbox_gone && record_gone).then_some(())
    })
    .await;
    // Counted once, as idle: not also as an orphan or a dead sandbox by later GC runs.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let count = |reason| reclaimed(&k, reason);
    assert_eq!((count("idle"), count("orphan"), count("dead")), (1, 0, 0));
}

/// `agentcube_gc_sandboxes_reclaimed_total{reason}` of the stack's Workload Manager (0 when
/// never counted).
fn reclaimed(k: &KubeStack, reason: &str) -> u64 {
    let text = k.wm.as_ref().unwrap().manager.metrics.encode();
    let prefix = format!("agentcube_gc_sandboxes_reclaimed_total{{reason=\"{reason}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .map_or(0, |n| n.parse().unwrap())
}

#[tokio::test]
async fn definitions_get_a_networkpolicy_kept_in_sync() {
    use k8s_openapi::api::networking::v1::NetworkPolicy;
    let defs = "apiVersion: runtime.agentcube.volcano.sh/v1alpha1
kind: AgentRuntime
metadata: {name: netagent, namespace: default}
spec:
  targetPort: [{port: 9000}]
  podTemplate: {spec: {containers: [{name: a, image: python:3.12-slim}]}}
  networkPolicy:
    egress: [{cidrs: [10.0.0.0/8, 2001:db8::/32], ports: [{protocol: TCP, port: 443}]}]
    ingress: [{cidrs: [192.0.2.0/24], ports: [{protocol: UDP, port: 9000}]}]
---
apiVersion: runtime.agentcube.volcano.sh/v1alpha1
kind: CodeInterpreter
metadata: {name: netci, namespace: default}
spec:
  template: {image: ghcr.io/volcano-sh/picod:latest}
  warmPoolSize: 1
  networkPolicy: {egress: [{cidrs: [0.0.0.0/0]}]}
";
    let k = KubeStack::start(KubeOptions {
        manifests: defs.into(),
        ..Default::default()
    })
    .await;
    let nps: Api<NetworkPolicy> = Api::namespaced(k.client.clone(), "default");
    let get = |name: &'static str| {
        let nps = nps.clone();
        async move { nps.get_opt(name).await.unwrap() }
    };
    let ar = k
        .eventually("the AgentRuntime's NetworkPolicy", 30, async || {
            get("ar-netagent").await
        })
        .await;
    let v = serde_json::to_value(&ar).unwrap();
    assert_eq!(v["metadata"]["ownerReferences"][0]["kind"], "AgentRuntime");
    assert_eq!(v["metadata"]["ownerReferences"][0]["controller"], true);
    assert_eq!(
        v["spec"]["podSelector"]["matchLabels"],
        json!({"runtime.agentcube.io/workload-kind": "AgentRuntime", "runtime.agentcube.io/workload-name": "netagent"})
    );
    assert_eq!(v["spec"]["policyTypes"], json!(["Ingress", "Egress"]));
    assert_eq!(
        v["spec"]["ingress"][0]["from"][0]["namespaceSelector"]["matchLabels"],
        json!({"kubernetes.io/metadata.name": SYSTEM_NS})
    );
    // The Workload Manager's own pods too: its port probe must reach a new sandbox.
    assert_eq!(
        v["spec"]["ingress"][0]["from"][1]["podSelector"]["matchLabels"],
        json!({"app": "workloadmanager"})
    );
    assert_eq!(
        v["spec"]["ingress"][1],
        json!({"from": [{"ipBlock": {"cidr": "192.0.2.0/24"}}], "ports": [{"protocol": "UDP", "port": 9000}]})
    );
    assert_eq!(v["spec"]["egress"][0]["ports"][0]["port"], 53);
    assert_eq!(
        v["spec"]["egress"][1],
        json!({"to": [{"ipBlock": {"cidr": "10.0.0.0/8"}}, {"ipBlock": {"cidr": "2001:db8::/32"}}],
               "ports": [{"protocol": "TCP", "port": 443}]})
    );
    let ci = k
        .eventually("the CodeInterpreter's NetworkPolicy", 30, async || {
            get("ci-netci").await
        })
        .await;
    // "The internet" excepts the cloud metadata endpoints (the API server checks they are inside).
    assert_eq!(
        serde_json::to_value(&ci).unwrap()["spec"]["egress"][1],
        json!({"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["169.254.169.254/32", "168.63.129.16/32", "100.100.100.200/32"]}}]})
    );
    // The pods it selects: warm-pool members carry the definition's labels.
    let pods: Api<Pod> = Api::namespaced(k.client.clone(), "default");
    let selector = "runtime.agentcube.io/workload-kind=CodeInterpreter,runtime.agentcube.io/workload-name=netci";
    k.eventually("a selected warm-pool pod", 30, async || {
        let lp = kube::api::ListParams::default().labels(selector);
        (!pods.list(&lp).await.unwrap().items.is_empty()).then_some(())
    })
    .await;
    // Someone edits the policy by hand: the controller puts it back.
    let patch = json!({"spec": {"egress": []}});
    nps.patch(
        "ar-netagent",
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(&patch),
    )
    .await
    .unwrap();
    k.eventually("the edited policy restored", 30, async || {
        let v = serde_json::to_value(get("ar-netagent").await?).unwrap();
        (v["spec"]["egress"].as_array().map_or(0, Vec::len) == 2).then_some(())
    })
    .await;
    // The policy removed from the definition: the NetworkPolicy goes.
    let ars = dynamic(
        &k.client,
        "runtime.agentcube.volcano.sh",
        "v1alpha1",
        "AgentRuntime",
        "agentruntimes",
        "default",
    );
    let patch = json!({"spec": {"networkPolicy": null}});
    ars.patch(
        "netagent",
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(&patch),
    )
    .await
    .unwrap();
    // Without one, the definition's pods still take connections only from the Router's and the
    // Workload Manager's pods (no other sandbox reaches them directly); egress is everything but
    // the cloud metadata endpoints (accepted by the API server's validation as it is).
    let everything_but_metadata = json!([{"to": [
        {"ipBlock": {"cidr": "0.0.0.0/0", "except": ["169.254.169.254/32", "168.63.129.16/32", "100.100.100.200/32"]}},
        {"ipBlock": {"cidr": "::/0", "except": ["fd00:ec2::254/128"]}},
        {"namespaceSelector": {}}
    ]}]);
    k.eventually(
        "the AgentRuntime's NetworkPolicy back to the control plane's ingress",
        30,
        async || {
            let v = serde_json::to_value(get("ar-netagent").await?).unwrap();
            let default = v["spec"]["policyTypes"] == json!(["Ingress", "Egress"])
                && v["spec"]["egress"] == everything_but_metadata
                && v["spec"]["ingress"].as_array().map_or(0, Vec::len) == 1;
            default.then_some(())
        },
    )
    .await;
    // The definition deleted: its NetworkPolicy goes with it (owner reference).
    let cis = dynamic(
        &k.client,
        "runtime.agentcube.volcano.sh",
        "v1alpha1",
        "CodeInterpreter",
        "codeinterpreters",
        "default",
    );
    cis.delete("netci", &DeleteParams::background())
        .await
        .unwrap();
    k.eventually(
        "the CodeInterpreter's NetworkPolicy garbage-collected",
        60,
        async || get("ci-netci").await.is_none().then_some(()),
    )
    .await;
    k.stop().await;
}

/// A standby claim changes hands only through its mark in the session store: a mark another
/// replica holds keeps creates off it, and a pending mark whose writer died is finished by the
/// next pass (the claim deleted if its session never came to be, else patched over to it).
#[tokio::test]
async fn a_standby_claim_changes_hands_only_through_its_mark() {
    let k = KubeStack::start(KubeOptions {
        manifests: POOLED.into(),
        standby_claims: 1,
        ..Default::default()
    })
    .await;
    let first = k
        .eventually("a standby claim bound to a Ready Sandbox", 30, async || {
            bound_standby(&k, "pooled").await.pop()
        })
        .await;
    let first = first.0.metadata.name.clone().unwrap();
    k.standby_ready("pooled", 1).await;
    let mark = |name: &str| format!("standby/default/{name}");
    let now_ms = || jiff::Timestamp::now().as_millisecond();
    let handing_out = |session: &str, at: i64| {
        json!({
            "state": "handingOut", "session": session, "at": at,
            "patch": {"metadata": {"labels": {
                "runtime.agentcube.io/session-id": session,
                "runtime.agentcube.io/standby": null,
            }}},
        })
        .to_string()
    };
    let long = Duration::from_secs(600);

    // Another replica is handing it out right now: creates leave it alone.
    let fresh = handing_out("elsewhere", now_ms());
    assert!(
        k.store
            .set_mark(&mark(&first), &fresh, long, true)
            .await
            .unwrap()
    );
    let s = k.create_ok("code-interpreter", "pooled").await;
    assert_ne!(
        s["sandboxName"],
        first.as_str(),
        "a marked claim is never handed out"
    );
    assert!(claims(&k.client).get_opt(&first).await.unwrap().is_some());

    // Its writer died long ago and no session "ghost" exists: the claim is deleted.
    let dead = handing_out("ghost", now_ms() - 60_000);
    assert!(
        k.store
            .set_mark(&mark(&first), &dead, long, false)
            .await
            .unwrap()
    );
    // Deleted, then marked done (in that order: wait for both).
    let done = Some(json!({"state": "done"}).to_string());
    k.eventually(
        "the ghost's claim deleted and its mark done",
        20,
        async || {
            let gone = claims(&k.client).get_opt(&first).await.unwrap().is_none();
            let left = k.store.get_marks(&[mark(&first)]).await.unwrap();
            (gone && left == [done.clone()]).then_some(())
        },
    )
    .await;

    // A dead writer whose session stands (its placeholder record): patched over to it.
    // Read from the API server (the Workload Manager's count can still include the claim just
    // deleted, before its watch hears of it), then the Workload Manager's count agrees.
    let second = k
        .eventually(
            "a new standby claim bound to a Ready Sandbox",
            30,
            async || {
                let bound = bound_standby(&k, "pooled").await.into_iter();
                bound
                    .filter_map(|(c, _)| c.metadata.name)
                    .find(|n| *n != first)
            },
        )
        .await;
    k.standby_ready("pooled", 1).await;
    let now = jiff::Timestamp::now();
    let record = agentcube_types::SessionRecord::placeholder(
        "orphaned-create",
        "default",
        "planned-name",
        now,
        now + jiff::SignedDuration::from_hours(1),
        agentcube_types::GoDuration(Duration::from_secs(900)),
    );
    k.store.insert(&record, now).await.unwrap();
    let dead = handing_out("orphaned-create", now_ms() - 60_000);
    assert!(
        k.store
            .set_mark(&mark(&second), &dead, long, true)
            .await
            .unwrap()
    );
    k.eventually("the claim patched over to its session", 20, async || {
        let c = claims(&k.client).get(&second).await.unwrap();
        let labels = c.metadata.labels.unwrap_or_default();
        (labels
            .get("runtime.agentcube.io/session-id")
            .map(String::as_str)
            == Some("orphaned-create")
            && !labels.contains_key("runtime.agentcube.io/standby"))
        .then_some(())
    })
    .await;
    assert_eq!(k.delete(s["sessionId"].as_str().unwrap()).await, 200);
    k.stop().await;
}

#[tokio::test]
async fn standby_claims_are_bound_ahead_of_demand_and_handed_out_whole() {
    let k = KubeStack::start(KubeOptions {
        manifests: POOLED.into(),
        standby_claims: 1,
        ..Default::default()
    })
    .await;
    let (standby, sandbox) = k
        .eventually("a standby claim bound to a Ready Sandbox", 30, async || {
            bound_standby(&k, "pooled").await.pop()
        })
        .await;
    let standby_name = standby.metadata.name.clone().unwrap();
    let labels = standby.metadata.labels.clone().unwrap();
    assert!(
        !labels.contains_key("runtime.agentcube.io/session-id"),
        "no session yet: {labels:?}"
    );
    assert!(standby.data["spec"]["lifecycle"]["shutdownTime"].is_null());
    // Created with agent-sandbox's first-observed annotation, as a session's claim is: after the
    // create comes the adoption's update or (no pool member was ready) the status, not a patch.
    let writes = claim_writes(&k, &standby_name).await;
    assert_ne!(writes[1], "patch", "{writes:?}");
    assert_eq!(standby.data["spec"]["warmPoolRef"]["name"], "pooled");
    assert_eq!(
        standby.metadata.owner_references.as_ref().unwrap()[0].kind,
        "CodeInterpreter"
    );
    // The standby claim's Sandbox is one of the definition's two warm ones: the pool keeps the
    // other, and no third pod is started.
    let pool = pools(&k.client).get("pooled").await.unwrap();
    assert_eq!(
        pool.data["spec"]["replicas"], 1,
        "warmPoolSize 2 less 1 standby"
    );
    k.eventually("one ready pool member besides it", 30, async || {
        let m = pool_members(&k.client, "pooled").await;
        (m.len() == 1 && m.iter().all(ready)).then_some(())
    })
    .await;

    // Start-up reconciliation leaves standby claims alone: they serve no session yet.
    let manager = k.wm.as_ref().unwrap().manager.clone();
    let report = agentcube_workload_manager::reconcile::run(&manager, jiff::Timestamp::now())
        .await
        .unwrap();
    assert_eq!(report.orphans, 0);
    assert!(
        claims(&k.client)
            .get_opt(&standby_name)
            .await
            .unwrap()
            .is_some()
    );

    // A create takes the bound claim whole (once the Workload Manager's watch shows it bound):
    // its Sandbox, its pod, the session's labels.
    k.standby_ready("pooled", 1).await;
    let s = k.create_ok("code-interpreter", "pooled").await;
    assert_eq!(s["kind"], "SandboxClaim");
    assert_eq!(s["sandboxName"], standby_name.as_str());
    assert_eq!(
        s["sandboxId"],
        sandbox.metadata.uid.clone().unwrap().as_str()
    );
    assert_eq!(
        s["sandboxIdentity"],
        sandbox.metadata.name.clone().unwrap().as_str()
    );
    // The answer came before the claim's patch (the mark decided); the patch follows.
    let taken = k
        .eventually("the claim patched over to the session", 10, async || {
            let c = claims(&k.client).get(&standby_name).await.unwrap();
            let labels = c.metadata.labels.clone().unwrap_or_default();
            labels
                .contains_key("runtime.agentcube.io/session-id")
                .then_some(c)
        })
        .await;
    let labels = taken.metadata.labels.clone().unwrap();
    assert_eq!(
        labels["runtime.agentcube.io/session-id"],
        s["sessionId"].as_str().unwrap()
    );
    assert!(!labels.contains_key("runtime.agentcube.io/standby"));
    let annotations = taken.metadata.annotations.clone().unwrap();
    assert!(!annotations.contains_key("runtime.agentcube.io/standby-generation"));
    assert_eq!(annotations["runtime.agentcube.io/idle-timeout"], "15m0s");
    let rec = k.store.get(s["sessionId"].as_str().unwrap()).await.unwrap();
    let shutdown = taken.data["spec"]["lifecycle"]["shutdownTime"]
        .as_str()
        .expect("the session's end is the claim's shutdownTime")
        .parse::<jiff::Timestamp>()
        .unwrap();
    assert_eq!(shutdown.as_second(), rec.expires_at.as_second());
    let (status, out) = exec_tcp(&k.http, &s, &["echo", "standby"]).await;
    assert_eq!((status, out["stdout"].as_str()), (200, Some("standby\n")));

    // Another standby claim replaces it.
    let (next, _) = k
        .eventually("a new bound standby claim", 30, async || {
            bound_standby(&k, "pooled").await.pop()
        })
        .await;
    assert_ne!(next.metadata.name.as_deref(), Some(standby_name.as_str()));

    // A changed definition: the standby claim made for the old generation is replaced.
    code_interpreters(&k.client)
        .patch(
            "pooled",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"spec": {"sessionTimeout": "20m"}})),
        )
        .await
        .unwrap();
    let next_name = next.metadata.name.clone().unwrap();
    let (fresh, _) = k
        .eventually(
            "the old generation's standby claim replaced",
            30,
            async || {
                let gone = claims(&k.client)
                    .get_opt(&next_name)
                    .await
                    .unwrap()
                    .is_none();
                let b = bound_standby(&k, "pooled").await.pop()?;
                gone.then_some(b)
            },
        )
        .await;
    let ci = code_interpreters(&k.client).get("pooled").await.unwrap();
    assert_eq!(
        fresh.metadata.annotations.as_ref().unwrap()["runtime.agentcube.io/standby-generation"],
        ci.metadata.generation.unwrap().to_string()
    );

    // Two creates at once with one standby claim: it goes to one of them, the other claims
    // from the pool as without standby claims.
    let fresh_name = fresh.metadata.name.clone().unwrap();
    k.standby_ready("pooled", 1).await;
    let (a, b) = tokio::join!(
        k.create_ok("code-interpreter", "pooled"),
        k.create_ok("code-interpreter", "pooled")
    );
    let names = [a["sandboxName"].clone(), b["sandboxName"].clone()];
    assert_ne!(names[0], names[1]);
    assert!(names.contains(&json!(fresh_name)), "{names:?}");
    assert_ne!(a["sandboxIdentity"], b["sandboxIdentity"]);

    for session in [&s, &a, &b] {
        assert_eq!(k.delete(session["sessionId"].as_str().unwrap()).await, 200);
    }
    k.eventually("the sessions' claims gone", 20, async || {
        let mut left = 0;
        for session in [&s, &a, &b] {
            let name = session["sandboxName"].as_str().unwrap();
            left += claims(&k.client).get_opt(name).await.unwrap().is_some() as usize;
        }
        (left == 0).then_some(())
    })
    .await;

    // Without a warm pool there is nothing to hold: the standby claims go.
    code_interpreters(&k.client)
        .patch(
            "pooled",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"spec": {"warmPoolSize": 0}})),
        )
        .await
        .unwrap();
    k.eventually("no standby claim left", 30, async || {
        let lp = ListParams::default().labels("runtime.agentcube.io/standby");
        claims(&k.client)
            .list(&lp)
            .await
            .unwrap()
            .items
            .is_empty()
            .then_some(())
    })
    .await;
}
