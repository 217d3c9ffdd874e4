//! Creates that cannot succeed fail at once with the cluster's reason (a pod the API server
//! refuses, a pod that fails), and one that waits for a node times out as before.

use super::*;

#[tokio::test]
async fn a_sandbox_that_never_runs_is_rolled_back_with_504() {
    // No node fits its pod: it stays Pending (a cluster autoscaler might add a node), so the
    // create waits for --create-timeout.
    let broken = code_interpreter(
        "broken",
        "{image: ghcr.io/volcano-sh/picod:latest, resources: {requests: {cpu: '1000'}}}",
        0,
    );
    let (_guard, logs) = common::Logs::start();
    let k = KubeStack::start(KubeOptions {
        manifests: broken,
        create_timeout: Duration::from_secs(2),
        ..Default::default()
    })
    .await;
    let (status, body) = k.create("code-interpreter", "broken").await;
    assert_eq!(
        (status, &body["code"]),
        (504, &json!("SANDBOX_TIMEOUT")),
        "{body}"
    );
    let message = body["message"].as_str().unwrap();
    assert!(
        message.starts_with("sandbox creation timed out: sandbox broken-")
            && message
                .contains("not ready within --create-timeout (2s; rolled back): Sandbox broken-")
            && message.contains("is not Ready ("),
        "{message}"
    );
    // The log says what it waited for: the Sandbox and why agent-sandbox calls it not Ready.
    let line = logs.line_with("sandbox creation timed out");
    assert!(
        line.contains("not ready within --create-timeout (2s; rolled back): Sandbox broken-")
            && line.contains("is not Ready ("),
        "{line}"
    );
    k.eventually("the Sandbox rolled back", 10, async || {
        no_sandboxes(&k.client).await.then_some(())
    })
    .await;
    k.assert_no_records().await;
}

/// An AgentRuntime whose pod asks for the host: privileged, the host's root directory mounted.
const PRIVILEGED_AGENT: &str = "apiVersion: runtime.agentcube.volcano.sh/v1alpha1
kind: AgentRuntime
metadata: {name: host, namespace: default}
spec:
  targetPort: [{port: 9000, protocol: HTTP, pathPrefix: /}]
  podTemplate:
    spec:
      volumes: [{name: root, hostPath: {path: /}}]
      containers:
        - name: agent
          image: python:3.12-slim
          command: [sleep, infinity]
          securityContext: {privileged: true}
          volumeMounts: [{name: root, mountPath: /host}]
";

#[tokio::test]
async fn a_pod_the_api_server_refuses_fails_the_create_at_once_with_its_reason() {
    // The namespace enforces Pod Security `restricted`, which needs `runAsNonRoot` (the
    // definitions set none): agent-sandbox's controller cannot create the pods, and says why in
    // the Sandbox's Ready condition. The create used to wait out --create-timeout (2 min by
    // default) and answer 504 `sandbox creation timed out`.
    let (_guard, logs) = common::Logs::start();
    let k = KubeStack::start(KubeOptions {
        manifests: format!("{ON_DEMAND}---\n{PRIVILEGED_AGENT}"),
        create_timeout: Duration::from_secs(60),
        ..Default::default()
    })
    .await;
    // `baseline` (what the threat model asks of sandbox namespaces): the Workload Manager's
    // defaults pass it, a definition asking for the host does not.
    label_namespace(&k.client, "default", POD_SECURITY_ENFORCE, Some("baseline")).await;
    let s = k.create_ok("code-interpreter", "od").await;
    assert_eq!(k.delete(s["sessionId"].as_str().unwrap()).await, 200);
    let (status, body) = k.create("agent-runtime", "host").await;
    let message = body["message"].as_str().unwrap_or_default();
    assert_eq!(status, 500, "{body}");
    assert!(
        message.contains("violates PodSecurity \"baseline:latest\"")
            && message.contains("privileged")
            && message.contains("hostPath"),
        "{message}"
    );
    label_namespace(
        &k.client,
        "default",
        POD_SECURITY_ENFORCE,
        Some("restricted"),
    )
    .await;
    // A warm pool made now: its members' pods are refused too.
    apply(&k.client, POOLED).await;
    for definition in ["od", "pooled"] {
        let started = std::time::Instant::now();
        let (status, body) = k.create("code-interpreter", definition).await;
        let message = body["message"].as_str().unwrap_or_default();
        assert_eq!(status, 500, "{definition}: {body}");
        assert_eq!(body["code"], "SANDBOX_FAILED", "{definition}: {body}");
        assert!(
            message.contains("cannot start: pods ")
                && message.contains("is forbidden: violates PodSecurity \"restricted:latest\"")
                && message.contains("runAsNonRoot"),
            "{definition}: {message}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{definition}: answered after {:?}",
            started.elapsed()
        );
        let logged = logs.line_with("request failed");
        assert!(logged.contains("violates PodSecurity"), "{logged}");
    }
    // Rolled back: no Sandbox of the on-demand definition and no claim left, no record.
    k.eventually("the creates rolled back", 15, async || {
        let lp = ListParams::default();
        let sbs = sandboxes(&k.client).list(&lp).await.unwrap().items;
        let claims = claims(&k.client).list(&lp).await.unwrap().items;
        let od = sbs
            .iter()
            .filter(|s| s.metadata.name.as_deref().unwrap().starts_with("od-"));
        (od.count() == 0 && claims.is_empty()).then_some(())
    })
    .await;
    k.assert_no_records().await;
    // A ResourceQuota used up is a 429: the caller may try again once sessions end.
    label_namespace(&k.client, "default", POD_SECURITY_ENFORCE, None).await;
    Api::<k8s_openapi::api::core::v1::ResourceQuota>::namespaced(k.client.clone(), "default")
        .create(
            &Default::default(),
            &serde_json::from_value(json!({"metadata": {"name": "no-pods"},
                "spec": {"hard": {"pods": "0"}}}))
            .unwrap(),
        )
        .await
        .unwrap();
    // The API server's quota admission reads quotas from its own cache, so a quota created a
    // moment ago may not stop the next pod yet (this test once got its session): a session made
    // meanwhile is deleted and the create tried again.
    let body = k
        .eventually("the quota enforced", 40, async || {
            let (status, body) = k.create("code-interpreter", "od").await;
            match status {
                200 => {
                    k.delete(body["sessionId"].as_str().unwrap()).await;
                    None
                }
                _ => Some((status, body)),
            }
        })
        .await;
    let (status, body) = body;
    let message = body["message"].as_str().unwrap_or_default();
    assert_eq!(status, 429, "{body}");
    assert!(
        message.contains("the namespace's ResourceQuota is used up")
            && message.contains("exceeded quota: no-pods"),
        "{message}"
    );
}

#[tokio::test]
async fn code_interpreters_run_as_a_uid_pass_pod_security_restricted() {
    // A CodeInterpreter's definition has no securityContext (upstream's shape), and PicoD's
    // images run as root: no CodeInterpreter could start in a namespace enforcing `restricted`
    // (the test above). With --code-interpreter-uid its pods run as that uid, and pass; with
    // --sandbox-user-namespaces too, in a user namespace of their own (`hostUsers: false`, which
    // the API server and `restricted` admit with the rest; the process kubelet runs the
    // container as the uid it names, without mapping it).
    let k = KubeStack::start(KubeOptions {
        manifests: format!("{ON_DEMAND}---\n{POOLED}"),
        code_interpreter_uid: Some(1000),
        user_namespaces: true,
        ..Default::default()
    })
    .await;
    label_namespace(
        &k.client,
        "default",
        POD_SECURITY_ENFORCE,
        Some("restricted"),
    )
    .await;
    // The pool's members already running were admitted before the label: new ones are made.
    for s in pool_members(&k.client, "pooled").await {
        sandboxes(&k.client)
            .delete(&kube::ResourceExt::name_any(&s), &DeleteParams::default())
            .await
            .unwrap();
    }
    for definition in ["od", "pooled"] {
        let session = k.create_ok("code-interpreter", definition).await;
        let sid = session["sessionId"].as_str().unwrap();
        // It runs as that uid (the process kubelet switches to it), in a workspace it can write,
        // with HOME there (`pip install --user`).
        let script =
            "id -u; echo $HOME; pwd; echo x > f && cat f; mkdir -p $HOME/.local && echo ok";
        let (status, out) = exec_tcp(&k.http, &session, &common::sh(script)).await;
        assert_eq!(status, 200, "{definition}: {out}");
        assert_eq!(
            out["stdout"], "1000\n/root\n/root\nx\nok\n",
            "{definition}: {out}"
        );
        let pods: Api<Pod> = Api::namespaced(k.client.clone(), "default");
        let selector = format!(
            "runtime.agentcube.io/workload-kind=CodeInterpreter,runtime.agentcube.io/workload-name={definition}"
        );
        let listed = pods
            .list(&ListParams::default().labels(&selector))
            .await
            .unwrap()
            .items;
        assert!(!listed.is_empty(), "{definition}");
        for pod in listed {
            let spec = serde_json::to_value(pod.spec.unwrap()).unwrap();
            assert_eq!(spec["securityContext"]["runAsUser"], 1000, "{definition}");
            assert_eq!(
                spec["securityContext"]["runAsNonRoot"], true,
                "{definition}"
            );
            assert_eq!(spec["hostUsers"], false, "{definition}");
        }
        assert_eq!(k.delete(sid).await, 200);
    }
    label_namespace(&k.client, "default", POD_SECURITY_ENFORCE, None).await;
}

#[tokio::test]
async fn a_sandbox_whose_pod_fails_fails_the_create_at_once_with_its_reason() {
    // An agent that exits at once (a typo in its command, say), an image that cannot be pulled,
    // and a warm pool of the latter: each used to wait out --create-timeout for a 504.
    let crashing = r#"apiVersion: runtime.agentcube.volcano.sh/v1alpha1
kind: AgentRuntime
metadata: {name: crashing, namespace: default}
spec:
  targetPort: [{port: 9000, protocol: HTTP, pathPrefix: /}]
  podTemplate:
    spec:
      containers:
        - {name: agent, image: python:3.12-slim, command: [python3, -c, "raise SystemExit(3)"]}
"#;
    let unpullable =
        |name: &str, pool: u32| code_interpreter(name, "{image: registry.invalid/nope:1}", pool);
    // Its registry unreachable for 5 s (the process kubelet's simulated one), then pulled.
    let slow = code_interpreter(
        "slow-registry",
        "{image: slow-registry.test/5s/ghcr.io/volcano-sh/picod:latest}",
        0,
    );
    let k = KubeStack::start(KubeOptions {
        manifests: format!(
            "{crashing}---\n{}---\n{}---\n{slow}",
            unpullable("unpullable", 0),
            unpullable("unpullable-pool", 1)
        ),
        create_timeout: Duration::from_secs(60),
        ..Default::default()
    })
    .await;
    for (kind, definition, want) in [
        (
            "agent-runtime",
            "crashing",
            "container agent is in CrashLoopBackOff (",
        ),
        ("code-interpreter", "unpullable", "is in ErrImagePull"),
        ("code-interpreter", "unpullable-pool", "is in ErrImagePull"),
    ] {
        let started = std::time::Instant::now();
        let (status, body) = k.create(kind, definition).await;
        let message = body["message"].as_str().unwrap_or_default();
        assert_eq!(status, 500, "{definition}: {body}");
        assert_eq!(body["code"], "SANDBOX_FAILED", "{definition}: {body}");
        assert!(
            message.starts_with("Sandbox ")
                && message.contains(" cannot start: its pod ")
                && message.contains(want),
            "{definition}: {message}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{definition}: answered after {:?}",
            started.elapsed()
        );
        if definition == "crashing" {
            assert!(message.contains("last exit code 3 (Error)"), "{message}");
        }
    }
    // A pull that failed because the registry could not be reached may work at the kubelet's
    // next try: the create waits for it (it failed at once, as for an image that does not exist).
    let started = std::time::Instant::now();
    let session = k.create_ok("code-interpreter", "slow-registry").await;
    assert!(
        started.elapsed() >= Duration::from_secs(5),
        "answered after {:?}",
        started.elapsed()
    );
    assert_eq!(k.delete(session["sessionId"].as_str().unwrap()).await, 200);
    // Rolled back: only the warm pool's own Sandbox is left, no claim, no record.
    k.eventually("the creates rolled back", 15, async || {
        let lp = ListParams::default();
        let sbs = sandboxes(&k.client).list(&lp).await.unwrap().items;
        let claims = claims(&k.client).list(&lp).await.unwrap().items;
        let pool = pool_members(&k.client, "unpullable-pool").await;
        (claims.is_empty() && sbs.len() == pool.len()).then_some(())
    })
    .await;
    k.assert_no_records().await;
}

#[tokio::test]
async fn a_warm_pool_that_cannot_fill_says_why_in_its_status() {
    // Its CodeInterpreter said READY true while every member failed; every create then waited
    // (now: fails) with the reason only the create's answer told.
    let unpullable = code_interpreter("unpullable", "{image: registry.invalid/nope:1}", 1);
    let k = KubeStack::start(KubeOptions {
        manifests: unpullable,
        ..Default::default()
    })
    .await;
    let condition = async || {
        let c = code_interpreters(&k.client)
            .get("unpullable")
            .await
            .unwrap();
        c.data.pointer("/status/conditions/0").cloned()
    };
    let failing = k
        .eventually("the status says why the pool cannot fill", 40, async || {
            condition().await.filter(|c| c["status"] == "False")
        })
        .await;
    assert_eq!(failing["reason"], "WarmPoolFailing");
    let message = failing["message"].as_str().unwrap();
    assert!(
        message.starts_with("warm pool sandboxes cannot start: Sandbox unpullable-")
            && message.contains("is in ErrImagePull"),
        "{message}"
    );
    // Given an image that runs, the pool fills and the status says so.
    code_interpreters(&k.client)
        .patch(
            "unpullable",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"spec": {"template":
                {"image": "ghcr.io/volcano-sh/picod:latest", "args": ["--workspace=/root"]}}})),
        )
        .await
        .unwrap();
    // agent-sandbox keeps a failing member; it is replaced when deleted.
    for m in pool_members(&k.client, "unpullable").await {
        let _ = sandboxes(&k.client)
            .delete(
                m.metadata.name.as_deref().unwrap(),
                &DeleteParams::default(),
            )
            .await;
    }
    k.eventually("the status ready again", 40, async || {
        condition().await.filter(|c| c["status"] == "True")
    })
    .await;
}
