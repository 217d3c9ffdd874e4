//! The CodeInterpreter controller on a real API server with the real agent-sandbox controller: SandboxTemplate + SandboxWarmPool kept
//! in step with `warmPoolSize`, status written once per generation, and the Router's key
//! followed from its Secret.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::kube::*;
use common::{ROUTER_KEY, ROUTER_PUB};
use futures_util::StreamExt;
use kube::api::{Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::{Value, json};

const OTHER_KEY: &str = include_str!("../../picod/tests/data/other.key.pem");
const OTHER_PUB: &str = include_str!("../../picod/tests/data/other.pub.pem");

fn ci(size: i32) -> String {
    format!(
        "apiVersion: runtime.agentcube.volcano.sh/v1alpha1
kind: CodeInterpreter
metadata: {{name: pooled, namespace: default}}
spec:
  template:
    image: ghcr.io/volcano-sh/picod:latest
    labels: {{team: a}}
    args: [--workspace=/root]
  warmPoolSize: {size}
"
    )
}

/// Rewrites Secret `picod-router-identity` with another key pair (the Router recreated it).
async fn rotate_key(k: &KubeStack) {
    let secrets: kube::Api<k8s_openapi::api::core::v1::Secret> =
        kube::Api::namespaced(k.client.clone(), SYSTEM_NS);
    secrets
        .patch(
            "picod-router-identity",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"stringData": {"private.pem": OTHER_KEY, "public.pem": OTHER_PUB}}),
            ),
        )
        .await
        .unwrap();
}

async fn resize(k: &KubeStack, size: i32) {
    code_interpreters(&k.client)
        .patch(
            "pooled",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"warmPoolSize": size}})),
        )
        .await
        .unwrap();
}

fn key_in(obj: &Value) -> Option<String> {
    obj.pointer("/spec/podTemplate/spec/containers/0/env")?
        .as_array()?
        .iter()
        .find(|e| e["name"] == "PICOD_AUTH_PUBLIC_KEY")
        .and_then(|e| e["value"].as_str())
        .map(str::to_string)
}

/// Every distinct `status` the CodeInterpreter `pooled` had, in order (seen through a watch).
fn record_statuses(client: &kube::Client) -> Arc<Mutex<Vec<Value>>> {
    let seen = Arc::new(Mutex::new(Vec::<Value>::new()));
    let api = code_interpreters(client);
    let out = seen.clone();
    tokio::spawn(async move {
        let mut s = watcher(
            api,
            watcher::Config::default().fields("metadata.name=pooled"),
        )
        .applied_objects()
        .boxed();
        while let Some(Ok(o)) = s.next().await {
            let status = o.data.get("status").cloned().unwrap_or(Value::Null);
            let mut v = out.lock().unwrap();
            if v.last() != Some(&status) && !status.is_null() {
                v.push(status);
            }
        }
    });
    seen
}

#[tokio::test]
async fn pool_objects_follow_warm_pool_size_and_status_is_written_once_per_generation() {
    let k = KubeStack::start(KubeOptions {
        manifests: ci(2),
        runtime_class: "gvisor".into(),
        ..Default::default()
    })
    .await;
    let audit_start = k.audit_start;
    let statuses = record_statuses(&k.client);
    // Applied one after the other: wait for both.
    let (template, pool) = k
        .eventually("template and pool", 10, async || {
            let t = templates(&k.client).get_opt("pooled").await.unwrap()?;
            let p = pools(&k.client).get_opt("pooled").await.unwrap()?;
            Some((t, p))
        })
        .await;
    let cr = code_interpreters(&k.client).get("pooled").await.unwrap();
    for obj in [&template, &pool] {
        let owner = &obj.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.uid.as_str(), owner.controller),
            (
                "CodeInterpreter",
                cr.metadata.uid.as_deref().unwrap(),
                Some(true)
            )
        );
    }
    let spec = &template.data["spec"];
    assert_eq!(spec["networkPolicyManagement"], "Unmanaged");
    assert_eq!(
        spec["podTemplate"]["metadata"],
        json!({"labels": {"runtime.agentcube.io/workload-kind": "CodeInterpreter",
                                      "runtime.agentcube.io/workload-name": "pooled"}}),
        "the definition's own labels are not copied (as upstream); the NetworkPolicy selector's are"
    );
    assert_eq!(
        spec["podTemplate"]["spec"]["containers"][0]["name"],
        "codeinterpreter"
    );
    assert_eq!(spec["podTemplate"]["spec"]["runtimeClassName"], "gvisor");
    assert_eq!(key_in(&template.data).as_deref(), Some(ROUTER_PUB));
    let pool = pools(&k.client).get("pooled").await.unwrap();
    assert_eq!(
        pool.types.as_ref().unwrap().api_version,
        "extensions.agents.x-k8s.io/v1beta1"
    );
    assert_eq!(pool.data["spec"]["replicas"], 2);
    assert_eq!(
        pool.data["spec"]["sandboxTemplateRef"],
        json!({"name": "pooled"})
    );

    let status = k
        .eventually("status ready", 10, async || {
            let c = code_interpreters(&k.client).get("pooled").await.unwrap();
            (c.data.pointer("/status/ready") == Some(&json!(true)))
                .then_some(c.data["status"].clone())
        })
        .await;
    let cond = &status["conditions"][0];
    assert_eq!(
        (
            cond["type"].as_str(),
            cond["status"].as_str(),
            cond["reason"].as_str()
        ),
        (Some("Ready"), Some("True"), Some("Reconciled"))
    );
    assert_eq!(cond["message"], "CodeInterpreter is ready");
    assert_eq!(cond["observedGeneration"], 1);
    // The pool filling (owned objects changing) reconciles again, but writes nothing new.
    k.eventually("pool full", 20, async || {
        let p = pools(&k.client).get("pooled").await.unwrap();
        (p.data.pointer("/status/readyReplicas") == Some(&json!(2))).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        statuses.lock().unwrap().len(),
        1,
        "one status for generation 1: {:?}",
        statuses.lock().unwrap()
    );
    // Status writes as the API server's audit log saw them (an identical merge patch is a
    // no-op in etcd but still a request).
    let status_writes = || {
        cluster().audit_events()[audit_start..]
            .iter()
            .filter(|e| {
                let o = &e["objectRef"];
                ["patch", "update"].contains(&e["verb"].as_str().unwrap_or_default())
                    && o["resource"] == "codeinterpreters"
                    && o["subresource"] == "status"
                    && o["name"] == "pooled"
            })
            .count()
    };
    assert_eq!(
        status_writes(),
        1,
        "an up-to-date status is not written again"
    );

    resize(&k, 3).await;
    k.eventually("pool resized", 10, async || {
        (pools(&k.client).get("pooled").await.unwrap().data["spec"]["replicas"] == 3).then_some(())
    })
    .await;
    k.eventually("status for generation 2", 10, async || {
        (statuses
            .lock()
            .unwrap()
            .last()?
            .pointer("/conditions/0/observedGeneration")
            == Some(&json!(2)))
        .then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        statuses.lock().unwrap().len(),
        2,
        "{:?}",
        statuses.lock().unwrap()
    );
    assert_eq!(status_writes(), 2);

    resize(&k, 0).await;
    k.eventually("pool objects removed", 10, async || {
        (templates(&k.client)
            .get_opt("pooled")
            .await
            .unwrap()
            .is_none()
            && pools(&k.client).get_opt("pooled").await.unwrap().is_none())
        .then_some(())
    })
    .await;
    k.eventually("pool sandboxes gone with their pool", 10, async || {
        no_sandboxes(&k.client).await.then_some(())
    })
    .await;
    assert_eq!(k.stop().await, 0);
}

#[tokio::test]
async fn a_pool_waits_for_the_router_key_and_follows_it_when_it_changes() {
    let k = KubeStack::start(KubeOptions {
        manifests: ci(1),
        identity_secret: false,
        ..Default::default()
    })
    .await;
    let status = k
        .eventually("not-ready status", 10, async || {
            let c = code_interpreters(&k.client).get("pooled").await.unwrap();
            c.data
                .get("status")
                .cloned()
                .filter(|s| s["ready"] == false)
        })
        .await;
    assert_eq!(status["conditions"][0]["reason"], "RouterKeyUnavailable");
    assert!(
        templates(&k.client)
            .get_opt("pooled")
            .await
            .unwrap()
            .is_none(),
        "no template without a key"
    );
    // A direct create needs the key too: upstream's 500.
    let (code, _) = k.create("code-interpreter", "pooled").await;
    assert_eq!(code, 500);

    // The Router starts and creates its Secret: the pool appears with that key.
    create_identity_secret(&k.client, ROUTER_KEY, ROUTER_PUB).await;
    let template = k
        .eventually("template with the key", 15, async || {
            templates(&k.client).get_opt("pooled").await.unwrap()
        })
        .await;
    assert_eq!(key_in(&template.data).as_deref(), Some(ROUTER_PUB));
    let members = async || pool_members(&k.client, "pooled").await;
    let first = k
        .eventually("one ready member", 15, async || {
            let m = members().await;
            (m.len() == 1 && m.iter().all(ready)).then(|| m[0].metadata.name.clone().unwrap())
        })
        .await;

    // The key changes (the Secret was recreated with a new pair): the template follows, and the
    // member that trusts the old key is replaced.
    rotate_key(&k).await;
    k.eventually("template with the new key", 15, async || {
        let t = templates(&k.client).get("pooled").await.unwrap();
        (key_in(&t.data).as_deref() == Some(OTHER_PUB)).then_some(())
    })
    .await;
    k.eventually("member replaced by one with the new key", 20, async || {
        let m = members().await;
        (m.len() == 1
            && ready(&m[0])
            && m[0].metadata.name.as_deref() != Some(first.as_str())
            && key_in(&m[0].data).as_deref() == Some(OTHER_PUB))
        .then_some(())
    })
    .await;
    // Sessions now get sandboxes that trust the new key.
    let s = k.create_ok("code-interpreter", "pooled").await;
    let claim = claims(&k.client)
        .get(s["sandboxName"].as_str().unwrap())
        .await
        .unwrap();
    // The Sandbox agent-sandbox assigned (the create answers once the claim owns it, possibly
    // before the claim's status names it).
    let bound = &claim.metadata.annotations.as_ref().unwrap()["agents.x-k8s.io/sandbox-name"];
    let sb = sandboxes(&k.client).get(bound).await.unwrap();
    assert_eq!(key_in(&sb.data).as_deref(), Some(OTHER_PUB));
}

#[tokio::test]
async fn standby_claims_holding_sandboxes_of_an_old_router_key_are_replaced() {
    let k = KubeStack::start(KubeOptions {
        manifests: ci(1),
        standby_claims: 1,
        ..Default::default()
    })
    .await;
    let bound_standby = async |key: &str| -> Option<String> {
        let bound = bound_standby(&k, "pooled").await.into_iter();
        bound
            .filter(|(_, sb)| key_in(&sb.data).as_deref() == Some(key))
            .find_map(|(c, _)| c.metadata.name)
    };
    let old = k
        .eventually("a standby claim on the first key", 30, async || {
            bound_standby(ROUTER_PUB).await
        })
        .await;
    rotate_key(&k).await;
    // Its Sandbox would refuse the Router's tokens: it is never handed out, and goes.
    k.eventually(
        "a standby claim on the new key, the old one gone",
        40,
        async || {
            let gone = claims(&k.client).get_opt(&old).await.unwrap().is_none();
            bound_standby(OTHER_PUB).await?;
            gone.then_some(())
        },
    )
    .await;
    // The only standby claim left, as the Workload Manager sees it, is the new-key one.
    k.standby_ready("pooled", 1).await;
    let fresh = bound_standby(OTHER_PUB).await.unwrap();
    let s = k.create_ok("code-interpreter", "pooled").await;
    assert_eq!(s["sandboxName"], fresh.as_str());
    let sb = sandboxes(&k.client)
        .get(s["sandboxIdentity"].as_str().unwrap())
        .await
        .unwrap();
    assert_eq!(key_in(&sb.data).as_deref(), Some(OTHER_PUB));
}
