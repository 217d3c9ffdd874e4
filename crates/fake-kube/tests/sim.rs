//! The simulated agent-sandbox controller and kubelet, driven through the REST API with a real
//! kube client, running real PicoD processes.

use std::path::{Path, PathBuf};
use std::time::Duration;

use agentcube_fake_kube::FakeApiServer;
use agentcube_fake_kube::sim::{SimConfig, Simulation};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, PostParams};
use serde_json::{Value, json};

const ROUTER_PUB: &str = include_str!("../../picod/tests/data/router.pub.pem");

fn picod() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/debug/picod");
    assert!(
        p.exists(),
        "{} missing: run `cargo build -p agentcube-picod`",
        p.display()
    );
    p
}

struct Env {
    server: FakeApiServer,
    sim: Option<Simulation>,
    client: kube::Client,
    dir: tempfile::TempDir,
}

async fn start() -> Env {
    let server = FakeApiServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let sim = Simulation::start(
        server.cluster.clone(),
        SimConfig {
            picod: picod(),
            state_dir: dir.path().to_path_buf(),
            bwrap: "bwrap".into(),
        },
    )
    .unwrap();
    let client = kube::Client::try_from(kube::Config::new(server.url.parse().unwrap())).unwrap();
    Env {
        server,
        sim: Some(sim),
        client,
        dir,
    }
}

fn api(c: &kube::Client, group: &str, kind: &str, plural: &str) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk(group, "v1alpha1", kind);
    Api::namespaced_with(
        c.clone(),
        "default",
        &ApiResource::from_gvk_with_plural(&gvk, plural),
    )
}

fn sandboxes(c: &kube::Client) -> Api<DynamicObject> {
    api(c, "agents.x-k8s.io", "Sandbox", "sandboxes")
}

fn ext(c: &kube::Client, kind: &str, plural: &str) -> Api<DynamicObject> {
    api(c, "extensions.agents.x-k8s.io", kind, plural)
}

async fn eventually<T>(env: &Env, what: &str, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if tokio::time::Instant::now() > deadline {
            let pods = env.server.cluster.list("api/v1", "default", "pods");
            let logs: Vec<String> = walk(&env.dir.path().join("pods"));
            panic!("timed out waiting for {what}\npods: {pods:#?}\nlogs: {logs:#?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn walk(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("container.log")).ok())
        .collect()
}

fn obj(v: Value) -> DynamicObject {
    serde_json::from_value(v).unwrap()
}

fn picod_pod_template() -> Value {
    json!({"spec": {"containers": [{"name": "codeinterpreter", "image": "ghcr.io/volcano-sh/picod:latest",
        "args": ["--workspace=/root"], "env": [{"name": "PICOD_AUTH_PUBLIC_KEY", "value": ROUTER_PUB}]}]}})
}

fn ready(o: &DynamicObject) -> bool {
    o.data
        .pointer("/status/conditions")
        .and_then(Value::as_array)
        .is_some_and(|cs| {
            cs.iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        })
}

async fn health(ip: &str) -> bool {
    tokio::net::TcpStream::connect((ip, 8080)).await.is_ok()
}

#[tokio::test]
async fn a_sandbox_gets_a_running_pod_with_its_own_address_and_picod_answers_there() {
    let env = start().await;
    let sb = obj(
        json!({"apiVersion": "agents.x-k8s.io/v1alpha1", "kind": "Sandbox",
        "metadata": {"name": "one", "labels": {"x": "y"}},
        "spec": {"podTemplate": {"metadata": {"labels": {"app": "p"}}, "spec": picod_pod_template()["spec"]}}}),
    );
    let created = sandboxes(&env.client)
        .create(&PostParams::default(), &sb)
        .await
        .unwrap();
    let sb = eventually(&env, "sandbox Ready", async || {
        sandboxes(&env.client).get("one").await.ok().filter(ready)
    })
    .await;
    assert_eq!(
        sb.data["status"]["serviceFQDN"],
        "one.default.svc.cluster.local"
    );
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), "default");
    let pod = pods.get("one").await.unwrap();
    let owner = &pod.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.uid.as_str(), owner.controller),
        (
            "Sandbox",
            created.metadata.uid.as_deref().unwrap(),
            Some(true)
        )
    );
    assert_eq!(pod.metadata.labels.as_ref().unwrap()["app"], "p");
    let status = pod.status.unwrap();
    assert_eq!(status.phase.as_deref(), Some("Running"));
    let ip = status.pod_ip.unwrap();
    assert!(ip.starts_with("127.") && ip != "127.0.0.1", "{ip}");
    eventually(&env, "picod on the pod IP", async || {
        health(&ip).await.then_some(())
    })
    .await;
    // A real PicoD: unauthenticated requests are refused with its own error shape.
    let r = reqwest_like_get(&format!("http://{ip}:8080/api/files?path=.")).await;
    assert!(r.starts_with("HTTP/1.1 401"), "{r}");
    // Deleting the Sandbox deletes the pod (owner reference) and kills the process.
    sandboxes(&env.client)
        .delete("one", &DeleteParams::default())
        .await
        .unwrap();
    eventually(&env, "pod gone", async || {
        pods.get_opt("one").await.unwrap().is_none().then_some(())
    })
    .await;
    eventually(&env, "process gone", async || {
        (!health(&ip).await).then_some(())
    })
    .await;
    assert!(env.sim.as_ref().unwrap().running_pods().is_empty());
    drop(env.server);
}

async fn reqwest_like_get(url: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let u: http::Uri = url.parse().unwrap();
    let mut s = tokio::net::TcpStream::connect(u.authority().unwrap().as_str())
        .await
        .unwrap();
    let req = format!(
        "GET {} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        u.path_and_query().unwrap()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test]
async fn shutdown_time_deletes_the_pod_and_keeps_the_sandbox() {
    let env = start().await;
    let past = "2020-01-01T00:00:00Z";
    let sb = obj(
        json!({"apiVersion": "agents.x-k8s.io/v1alpha1", "kind": "Sandbox", "metadata": {"name": "old"},
        "spec": {"shutdownTime": past, "podTemplate": picod_pod_template()}}),
    );
    sandboxes(&env.client)
        .create(&PostParams::default(), &sb)
        .await
        .unwrap();
    let sb = eventually(&env, "expired status", async || {
        let s = sandboxes(&env.client).get("old").await.ok()?;
        (s.data.pointer("/status/conditions/0/reason") == Some(&json!("SandboxExpired")))
            .then_some(s)
    })
    .await;
    assert!(!ready(&sb));
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), "default");
    assert!(pods.get_opt("old").await.unwrap().is_none());
}

#[tokio::test]
async fn warm_pool_keeps_sandboxes_and_a_claim_adopts_one_then_the_pool_refills() {
    let env = start().await;
    let c = &env.client;
    let template = obj(
        json!({"apiVersion": "extensions.agents.x-k8s.io/v1alpha1", "kind": "SandboxTemplate",
        "metadata": {"name": "ci"}, "spec": {"podTemplate": picod_pod_template()}}),
    );
    ext(c, "SandboxTemplate", "sandboxtemplates")
        .create(&PostParams::default(), &template)
        .await
        .unwrap();
    let pool = obj(
        json!({"apiVersion": "extensions.agents.x-k8s.io/v1alpha1", "kind": "SandboxWarmPool",
        "metadata": {"name": "ci"}, "spec": {"replicas": 2, "sandboxTemplateRef": {"name": "ci"}}}),
    );
    let pool = ext(c, "SandboxWarmPool", "sandboxwarmpools")
        .create(&PostParams::default(), &pool)
        .await
        .unwrap();
    let members = async || -> Vec<DynamicObject> {
        sandboxes(c)
            .list(&kube::api::ListParams::default().labels("agents.x-k8s.io/warm-pool-sandbox=ci"))
            .await
            .unwrap()
            .items
    };
    let initial = eventually(&env, "2 ready members", async || {
        let m = members().await;
        (m.len() == 2 && m.iter().all(ready)).then_some(m)
    })
    .await;
    for m in &initial {
        let owner = &m.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(owner.uid, pool.metadata.uid.clone().unwrap());
        assert!(m.metadata.name.as_ref().unwrap().starts_with("ci-"));
    }
    let pool_status = eventually(&env, "pool status", async || {
        let p = ext(c, "SandboxWarmPool", "sandboxwarmpools")
            .get("ci")
            .await
            .ok()?;
        (p.data["status"]["readyReplicas"] == 2).then_some(p)
    })
    .await;
    assert_eq!(pool_status.data["status"]["replicas"], 2);
    let pods: Api<Pod> = Api::namespaced(c.clone(), "default");
    let initial_pods: Vec<(String, String)> = {
        let mut v = Vec::new();
        for m in &initial {
            let p = pods.get(m.metadata.name.as_ref().unwrap()).await.unwrap();
            v.push((p.metadata.name.unwrap(), p.metadata.uid.unwrap()));
        }
        v
    };
    let claim = obj(
        json!({"apiVersion": "extensions.agents.x-k8s.io/v1alpha1", "kind": "SandboxClaim",
        "metadata": {"name": "ci-claim1"}, "spec": {"sandboxTemplateRef": {"name": "ci"}}}),
    );
    let claim = ext(c, "SandboxClaim", "sandboxclaims")
        .create(&PostParams::default(), &claim)
        .await
        .unwrap();
    let bound = eventually(&env, "claim bound and ready", async || {
        let cl = ext(c, "SandboxClaim", "sandboxclaims")
            .get("ci-claim1")
            .await
            .ok()?;
        let n = cl
            .data
            .pointer("/status/sandbox/name")?
            .as_str()?
            .to_string();
        ready(&cl).then_some(n)
    })
    .await;
    let adopted = sandboxes(c).get(&bound).await.unwrap();
    assert!(
        initial
            .iter()
            .any(|m| m.metadata.name.as_deref() == Some(bound.as_str())),
        "adopted from the pool"
    );
    let owner = &adopted.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.uid.clone()),
        ("SandboxClaim", claim.metadata.uid.clone().unwrap())
    );
    assert!(
        !adopted
            .metadata
            .labels
            .unwrap_or_default()
            .contains_key("agents.x-k8s.io/warm-pool-sandbox")
    );
    let pod = pods.get(&bound).await.unwrap();
    assert!(
        initial_pods.contains(&(
            pod.metadata.name.clone().unwrap(),
            pod.metadata.uid.clone().unwrap()
        )),
        "the pod is one of the pool's"
    );
    eventually(&env, "pool refilled", async || {
        let m = members().await;
        (m.len() == 2
            && m.iter().all(ready)
            && m.iter()
                .all(|s| s.metadata.name.as_deref() != Some(bound.as_str())))
        .then_some(())
    })
    .await;
    // Deleting the claim removes its Sandbox and Pod; the pool is untouched.
    ext(c, "SandboxClaim", "sandboxclaims")
        .delete("ci-claim1", &DeleteParams::default())
        .await
        .unwrap();
    eventually(&env, "claimed sandbox and pod gone", async || {
        (sandboxes(c).get_opt(&bound).await.unwrap().is_none()
            && pods.get_opt(&bound).await.unwrap().is_none())
        .then_some(())
    })
    .await;
    assert_eq!(members().await.len(), 2);
    // Scale down: one member goes.
    ext(c, "SandboxWarmPool", "sandboxwarmpools")
        .patch(
            "ci",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"spec": {"replicas": 1}})),
        )
        .await
        .unwrap();
    eventually(&env, "pool scaled to 1", async || {
        (members().await.len() == 1).then_some(())
    })
    .await;
    let killed = env.sim.unwrap().stop().await;
    assert_eq!(killed, 1, "the one remaining pool pod was still running");
}

#[tokio::test]
async fn a_claim_without_a_pool_gets_its_own_sandbox_and_an_unknown_template_is_reported() {
    let env = start().await;
    let c = &env.client;
    let template = obj(
        json!({"apiVersion": "extensions.agents.x-k8s.io/v1alpha1", "kind": "SandboxTemplate",
        "metadata": {"name": "t"}, "spec": {"podTemplate": picod_pod_template()}}),
    );
    ext(c, "SandboxTemplate", "sandboxtemplates")
        .create(&PostParams::default(), &template)
        .await
        .unwrap();
    for (name, tpl) in [("cold", "t"), ("lost", "missing")] {
        let claim = obj(
            json!({"apiVersion": "extensions.agents.x-k8s.io/v1alpha1", "kind": "SandboxClaim",
            "metadata": {"name": name}, "spec": {"sandboxTemplateRef": {"name": tpl}}}),
        );
        ext(c, "SandboxClaim", "sandboxclaims")
            .create(&PostParams::default(), &claim)
            .await
            .unwrap();
    }
    eventually(
        &env,
        "cold claim ready with a sandbox of its name",
        async || {
            let cl = ext(c, "SandboxClaim", "sandboxclaims")
                .get("cold")
                .await
                .ok()?;
            (ready(&cl) && cl.data.pointer("/status/sandbox/name") == Some(&json!("cold")))
                .then_some(())
        },
    )
    .await;
    let lost = eventually(&env, "lost claim reported", async || {
        let cl = ext(c, "SandboxClaim", "sandboxclaims")
            .get("lost")
            .await
            .ok()?;
        cl.data
            .pointer("/status/conditions/0/reason")
            .cloned()
            .filter(|r| r == "TemplateNotFound")
    })
    .await;
    assert_eq!(lost, "TemplateNotFound");
}

#[tokio::test]
async fn a_container_the_fake_cannot_run_stays_pending_with_a_reason() {
    let env = start().await;
    let sb = obj(
        json!({"apiVersion": "agents.x-k8s.io/v1alpha1", "kind": "Sandbox", "metadata": {"name": "bad"},
        "spec": {"podTemplate": {"spec": {"containers": [{"name": "c", "image": "busybox"}]}}}}),
    );
    sandboxes(&env.client)
        .create(&PostParams::default(), &sb)
        .await
        .unwrap();
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), "default");
    let pod = eventually(&env, "pod status", async || {
        pods.get_opt("bad")
            .await
            .unwrap()
            .filter(|p| p.status.is_some())
    })
    .await;
    let status = pod.status.unwrap();
    assert_eq!(status.phase.as_deref(), Some("Pending"));
    let waiting = status.container_statuses.unwrap()[0]
        .state
        .clone()
        .unwrap()
        .waiting
        .unwrap();
    assert_eq!(waiting.reason.as_deref(), Some("ErrImagePull"));
    assert!(status.pod_ip.is_none());
    assert!(!ready(&sandboxes(&env.client).get("bad").await.unwrap()));
}
