//! The builders against spec §2.4, compared as JSON (field names byte for byte).

use agentcube_crds::manifest::{self, Definition};
use serde_json::{Value, json};

use super::*;

fn ci(extra: &str) -> agentcube_crds::CodeInterpreter {
    let yaml = format!(
        "apiVersion: runtime.agentcube.volcano.sh/v1alpha1\nkind: CodeInterpreter\nmetadata: {{name: ci, namespace: ns, uid: u-1}}\nspec:\n  template:\n    image: picod:latest\n    imagePullPolicy: IfNotPresent\n    args: [--workspace=/root]\n    labels: {{team: a}}\n    environment: [{{name: A, value: b}}]\n    imagePullSecrets: [{{name: regcred}}]\n{extra}"
    );
    match manifest::load(&yaml, "t").unwrap().remove(0) {
        Definition::CodeInterpreter(c) => *c,
        Definition::AgentRuntime(_) => unreachable!(),
    }
}

fn session<'a>(owner: Option<&'a str>, rc: &'a str) -> SessionInfo<'a> {
    SessionInfo {
        api: AgentSandboxApi::V1beta1,
        session_id: "sid-1",
        name: "ci-abcd1234",
        namespace: "ns",
        owner,
        shutdown_time: Some("2026-08-03T12:00:00Z".parse().unwrap()),
        public_key: Some("PEM"),
        pod_defaults: Box::leak(Box::new(PodDefaults {
            runtime_class: rc.into(),
            ..PodDefaults::default()
        })),
    }
}

#[test]
fn direct_code_interpreter_sandbox_matches_spec() {
    let alpha = SessionInfo {
        api: AgentSandboxApi::V1alpha1,
        ..session(None, "")
    };
    let v = serde_json::to_value(code_interpreter_sandbox(&ci(""), &alpha)).unwrap();
    assert_eq!(v["apiVersion"], "agents.x-k8s.io/v1alpha1");
    assert!(
        v["spec"].get("shutdownPolicy").is_none(),
        "as upstream on v1alpha1"
    );
    assert_eq!(
        (
            v["spec"]["replicas"].as_i64(),
            v["spec"].get("operatingMode")
        ),
        (Some(1), None)
    );
    let v = serde_json::to_value(code_interpreter_sandbox(&ci(""), &session(None, ""))).unwrap();
    assert_eq!(v["apiVersion"], "agents.x-k8s.io/v1beta1");
    assert_eq!(v["spec"]["operatingMode"], "Running");
    assert!(
        v["spec"].get("replicas").is_none(),
        "v1beta1 has no replicas"
    );
    assert_eq!(v["kind"], "Sandbox");
    assert_eq!(v["metadata"]["name"], "ci-abcd1234");
    assert_eq!(
        v["metadata"]["labels"],
        json!({"runtime.agentcube.io/session-id": "sid-1", "runtime.agentcube.io/workload-name": "ci", "managed-by": "agentcube-workload-manager"})
    );
    assert_eq!(
        v["metadata"]["annotations"],
        json!({"runtime.agentcube.io/idle-timeout": "15m0s"})
    );
    assert_eq!(v["spec"]["shutdownTime"], "2026-08-03T12:00:00Z");
    assert_eq!(v["spec"]["shutdownPolicy"], "Delete");
    let tpl = &v["spec"]["podTemplate"];
    assert_eq!(
        tpl["metadata"]["labels"],
        json!({"team": "a", "runtime.agentcube.io/session-id": "sid-1", "runtime.agentcube.io/sandbox-name": "ci-abcd1234",
               "runtime.agentcube.io/workload-kind": "CodeInterpreter", "runtime.agentcube.io/workload-name": "ci"})
    );
    let c = &tpl["spec"]["containers"][0];
    assert_eq!(c["name"], "code-interpreter");
    assert_eq!(c["image"], "picod:latest");
    assert_eq!(c["imagePullPolicy"], "IfNotPresent");
    assert_eq!(c["args"], json!(["--workspace=/root"]));
    assert_eq!(
        c["env"],
        json!([{"name": "A", "value": "b"}, {"name": "PICOD_AUTH_PUBLIC_KEY", "value": "PEM"},
               {"name": "PICOD_SANDBOX_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}])
    );
    assert_eq!(
        c["securityContext"],
        json!({"allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]},
               "seccompProfile": {"type": "RuntimeDefault"}})
    );
    assert!(c.get("ports").is_none(), "no containerPorts, as upstream");
    assert_eq!(
        tpl["spec"]["imagePullSecrets"],
        json!([{"name": "regcred"}])
    );
    assert!(tpl["spec"].get("runtimeClassName").is_none());
}

#[test]
fn runtime_class_defaults_to_the_flag_but_the_definition_wins() {
    let v =
        serde_json::to_value(code_interpreter_sandbox(&ci(""), &session(None, "kata"))).unwrap();
    assert_eq!(v["spec"]["podTemplate"]["spec"]["runtimeClassName"], "kata");
    let own = ci("    runtimeClassName: gvisor\n");
    let v = serde_json::to_value(code_interpreter_sandbox(&own, &session(None, "kata"))).unwrap();
    assert_eq!(
        v["spec"]["podTemplate"]["spec"]["runtimeClassName"],
        "gvisor"
    );
}

#[test]
fn owner_goes_to_an_annotation_and_a_hash_label() {
    let v = serde_json::to_value(code_interpreter_sandbox(
        &ci(""),
        &session(Some("alice"), ""),
    ))
    .unwrap();
    assert_eq!(v["metadata"]["annotations"]["agentcube.io/owner"], "alice");
    let hash = v["metadata"]["labels"]["agentcube.io/owner-hash"]
        .as_str()
        .unwrap();
    assert_eq!(hash.len(), 63);
    assert!("2bd806c97f0e00af1a1fc3328fa763a9269723c8db8fac4f93af71db186d6e90".starts_with(hash));
}

#[test]
fn claim_template_and_pool_match_spec() {
    let c = ci("  warmPoolSize: 3\n  sessionTimeout: 5m\n");
    let v = serde_json::to_value(code_interpreter_claim(&c, &session(None, ""))).unwrap();
    assert_eq!(v["apiVersion"], "extensions.agents.x-k8s.io/v1beta1");
    assert_eq!(v["kind"], "SandboxClaim");
    assert_eq!(
        v["metadata"]["labels"],
        json!({"runtime.agentcube.io/session-id": "sid-1", "runtime.agentcube.io/sandbox-name": "ci-abcd1234"})
    );
    assert_eq!(
        v["metadata"]["annotations"],
        json!({"runtime.agentcube.io/idle-timeout": "5m0s"})
    );
    assert_eq!(
        v["metadata"]["ownerReferences"],
        json!([{"apiVersion": "runtime.agentcube.volcano.sh/v1alpha1", "kind": "CodeInterpreter", "name": "ci", "uid": "u-1"}])
    );
    assert_eq!(
        v["spec"],
        json!({"warmPoolRef": {"name": "ci"},
               "lifecycle": {"shutdownTime": "2026-08-03T12:00:00Z", "shutdownPolicy": "Delete"}})
    );
    let alpha = SessionInfo {
        api: AgentSandboxApi::V1alpha1,
        ..session(None, "")
    };
    let v = serde_json::to_value(code_interpreter_claim(&c, &alpha)).unwrap();
    assert_eq!(v["apiVersion"], "extensions.agents.x-k8s.io/v1alpha1");
    assert_eq!(v["spec"], json!({"sandboxTemplateRef": {"name": "ci"}}));

    let t = serde_json::to_value(sandbox_template(
        AgentSandboxApi::V1beta1,
        &c,
        Some("PEM"),
        &PodDefaults::default(),
    ))
    .unwrap();
    assert_eq!(t["apiVersion"], "extensions.agents.x-k8s.io/v1beta1");
    assert_eq!(
        (t["kind"].as_str(), t["metadata"]["name"].as_str()),
        (Some("SandboxTemplate"), Some("ci"))
    );
    assert_eq!(t["metadata"]["ownerReferences"][0]["controller"], true);
    assert_eq!(t["spec"]["networkPolicyManagement"], "Unmanaged");
    assert_eq!(
        t["spec"]["podTemplate"]["metadata"],
        json!({"labels": {"runtime.agentcube.io/workload-kind": "CodeInterpreter",
                          "runtime.agentcube.io/workload-name": "ci"}}),
        "the definition's own template labels are not copied (as upstream); the selector's are"
    );
    let container = &t["spec"]["podTemplate"]["spec"]["containers"][0];
    assert_eq!(container["name"], "codeinterpreter");
    assert_eq!(container["env"][1]["name"], "PICOD_AUTH_PUBLIC_KEY");
    assert_eq!(container["env"][2]["name"], "PICOD_SANDBOX_NAME");
    assert_eq!(
        container["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );

    let p = serde_json::to_value(warm_pool(AgentSandboxApi::V1alpha1, &c, 0)).unwrap();
    assert_eq!(p["apiVersion"], "extensions.agents.x-k8s.io/v1alpha1");
    assert_eq!(
        p["spec"],
        json!({"replicas": 3, "sandboxTemplateRef": {"name": "ci"}})
    );
    assert_eq!(p["metadata"]["ownerReferences"][0]["controller"], true);
    // Standby claims hold part of the pool's size, never more than all of it.
    for (per_pool, replicas) in [(1, 2), (3, 0), (7, 0)] {
        let share = standby_share(per_pool, &c);
        let p = serde_json::to_value(warm_pool(AgentSandboxApi::V1beta1, &c, per_pool)).unwrap();
        assert_eq!(p["spec"]["replicas"], replicas, "{per_pool} standby claims");
        assert_eq!(p["spec"]["updateStrategy"], json!({"type": "Recreate"}));
        assert_eq!(share + replicas, 3);
    }

    let none = ci("  authMode: none\n");
    let t: Value = serde_json::to_value(sandbox_template(
        AgentSandboxApi::V1beta1,
        &none,
        Some("PEM"),
        &PodDefaults::default(),
    ))
    .unwrap();
    assert_eq!(
        t["spec"]["podTemplate"]["spec"]["containers"][0]["env"],
        json!([{"name": "A", "value": "b"}])
    );
}

#[test]
fn agent_runtime_sandbox_copies_the_pod_spec() {
    let yaml = "apiVersion: runtime.agentcube.volcano.sh/v1alpha1\nkind: AgentRuntime\nmetadata: {name: echo, namespace: ns}\nspec:\n  targetPort: [{port: 8080}]\n  podTemplate:\n    labels: {app: echo}\n    spec:\n      runtimeClassName: \"\"\n      containers: [{name: agent, image: busybox, command: [sleep, '3600']}]\n";
    let Definition::AgentRuntime(ar) = manifest::load(yaml, "t").unwrap().remove(0) else {
        panic!()
    };
    let v = serde_json::to_value(agent_runtime_sandbox(&ar, &session(None, ""))).unwrap();
    assert_eq!(
        v["metadata"]["labels"]["runtime.agentcube.io/workload-name"],
        "echo"
    );
    let spec = &v["spec"]["podTemplate"]["spec"];
    assert_eq!(
        spec["containers"][0],
        json!({"name": "agent", "image": "busybox", "command": ["sleep", "3600"],
               "securityContext": {"allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]},
                                   "seccompProfile": {"type": "RuntimeDefault"}}})
    );
    assert!(
        spec.get("runtimeClassName").is_none(),
        "empty runtimeClassName normalised to null"
    );
    assert_eq!(
        v["spec"]["podTemplate"]["metadata"]["labels"]["app"],
        "echo"
    );
    assert_eq!(v["spec"]["shutdownTime"], "2026-08-03T12:00:00Z");
    assert!(ar.spec.max_session_duration.is_none(), "optional (PR #410)");
    let unbounded = SessionInfo {
        shutdown_time: None,
        ..session(None, "")
    };
    let v = serde_json::to_value(agent_runtime_sandbox(&ar, &unbounded)).unwrap();
    assert!(
        v["spec"].get("shutdownTime").is_none() && v["spec"].get("shutdownPolicy").is_none(),
        "no maximum lifetime: no shutdownTime"
    );
}

#[test]
fn a_definition_with_its_own_security_context_keeps_it() {
    let yaml = "apiVersion: runtime.agentcube.volcano.sh/v1alpha1\nkind: AgentRuntime\nmetadata: {name: echo, namespace: ns}\nspec:\n  targetPort: [{port: 8080}]\n  podTemplate:\n    spec:\n      containers:\n      - {name: a, image: busybox, securityContext: {privileged: true}}\n      - {name: b, image: busybox}\n";
    let Definition::AgentRuntime(ar) = manifest::load(yaml, "t").unwrap().remove(0) else {
        panic!()
    };
    let v = serde_json::to_value(agent_runtime_sandbox(&ar, &session(None, ""))).unwrap();
    let cs = &v["spec"]["podTemplate"]["spec"]["containers"];
    assert_eq!(cs[0]["securityContext"], json!({"privileged": true}));
    assert_eq!(
        cs[1]["securityContext"]["capabilities"]["drop"],
        json!(["ALL"])
    );
    let pod_level = yaml.replace(
        "    spec:\n      containers:",
        "    spec:\n      securityContext: {runAsUser: 1000}\n      containers:",
    );
    let Definition::AgentRuntime(ar) = manifest::load(&pod_level, "t").unwrap().remove(0) else {
        panic!()
    };
    let v = serde_json::to_value(agent_runtime_sandbox(&ar, &session(None, ""))).unwrap();
    assert!(
        v["spec"]["podTemplate"]["spec"]["containers"][1]
            .get("securityContext")
            .is_none()
    );
}

#[test]
fn a_standby_claim_has_no_session_and_its_handout_gives_it_one() {
    let mut c = ci("  warmPoolSize: 2\n");
    c.metadata.generation = Some(7);
    let claim = serde_json::to_value(standby_claim(AgentSandboxApi::V1beta1, &c, "ci-zz")).unwrap();
    assert_eq!(claim["metadata"]["labels"][labels::STANDBY], "ci");
    assert!(claim["metadata"]["labels"][labels::SESSION_ID].is_null());
    assert_eq!(
        claim["metadata"]["annotations"][labels::STANDBY_GENERATION],
        "7"
    );
    assert_eq!(claim["spec"]["warmPoolRef"]["name"], "ci");
    assert!(claim["spec"]["lifecycle"]["shutdownTime"].is_null());

    let patch = standby_handout(&c, &session(Some("alice"), ""));
    // Unguarded: the claim's mark, not its resourceVersion, decides who hands it out.
    assert!(patch["metadata"].get("resourceVersion").is_none());
    let labels_ = &patch["metadata"]["labels"];
    assert!(labels_[labels::STANDBY].is_null() && labels_.get(labels::STANDBY).is_some());
    assert_eq!(labels_[labels::SESSION_ID], "sid-1");
    assert_eq!(labels_[labels::OWNER_HASH], owner_hash("alice"));
    let annotations = &patch["metadata"]["annotations"];
    assert!(
        annotations
            .get(labels::STANDBY_GENERATION)
            .is_some_and(Value::is_null)
    );
    assert_eq!(annotations[labels::OWNER], "alice");
    assert_eq!(annotations[labels::IDLE_TIMEOUT], "15m0s");
    assert_eq!(
        patch["spec"]["lifecycle"]["shutdownTime"],
        "2026-08-03T12:00:00Z"
    );
    let unbounded = SessionInfo {
        shutdown_time: None,
        ..session(None, "")
    };
    assert!(standby_handout(&c, &unbounded).get("spec").is_none());
}

#[test]
fn sandboxes_get_no_service_account_token_unless_their_definition_asks() {
    let token =
        |v: &Value| v["spec"]["podTemplate"]["spec"]["automountServiceAccountToken"].clone();
    let direct =
        serde_json::to_value(code_interpreter_sandbox(&ci(""), &session(None, ""))).unwrap();
    assert_eq!(token(&direct), json!(false));
    let template = serde_json::to_value(sandbox_template(
        AgentSandboxApi::V1beta1,
        &ci(""),
        None,
        &PodDefaults::default(),
    ))
    .unwrap();
    assert_eq!(token(&template), json!(false));
    let agent = |extra: &str| {
        let yaml = format!(
            "apiVersion: runtime.agentcube.volcano.sh/v1alpha1\nkind: AgentRuntime\nmetadata: {{name: a, namespace: ns}}\nspec:\n  targetPort: [{{port: 8080}}]\n  podTemplate:\n    spec:\n{extra}      containers: [{{name: a, image: busybox}}]\n"
        );
        let Definition::AgentRuntime(ar) = manifest::load(&yaml, "t").unwrap().remove(0) else {
            panic!()
        };
        serde_json::to_value(agent_runtime_sandbox(&ar, &session(None, ""))).unwrap()
    };
    assert_eq!(token(&agent("")), json!(false));
    assert_eq!(
        token(&agent("      automountServiceAccountToken: true\n")),
        json!(true),
        "an agent that calls the API asks for its token"
    );
}

#[test]
fn a_code_interpreter_run_as_a_uid_is_non_root_with_its_workspace_on_an_empty_dir() {
    let uid = PodDefaults {
        code_interpreter_uid: Some(1000),
        ..PodDefaults::default()
    };
    let s = SessionInfo {
        pod_defaults: &uid,
        ..session(None, "")
    };
    let v = serde_json::to_value(code_interpreter_sandbox(&ci(""), &s)).unwrap();
    let pod = &v["spec"]["podTemplate"]["spec"];
    assert_eq!(
        pod["securityContext"],
        json!({"runAsNonRoot": true, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000,
               "seccompProfile": {"type": "RuntimeDefault"}})
    );
    assert_eq!(
        pod["volumes"],
        json!([{"name": "workspace", "emptyDir": {}}])
    );
    let c = &pod["containers"][0];
    assert_eq!(
        c["volumeMounts"],
        json!([{"name": "workspace", "mountPath": "/root"}])
    );
    assert!(
        c["env"]
            .as_array()
            .unwrap()
            .contains(&json!({"name": "HOME", "value": "/root"}))
    );
    // What else Pod Security `restricted` asks of every container is there too.
    assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(c["securityContext"]["capabilities"]["drop"], json!(["ALL"]));
    // The warm pool's template alike.
    let t = serde_json::to_value(sandbox_template(
        AgentSandboxApi::V1beta1,
        &ci("  warmPoolSize: 1\n"),
        Some("PEM"),
        &uid,
    ))
    .unwrap();
    assert_eq!(
        t["spec"]["podTemplate"]["spec"]["securityContext"]["runAsUser"],
        1000
    );
    // Without the flag: the image's user, as upstream.
    let v = serde_json::to_value(code_interpreter_sandbox(&ci(""), &session(None, ""))).unwrap();
    assert!(
        v["spec"]["podTemplate"]["spec"]
            .get("securityContext")
            .is_none()
    );
    assert!(v["spec"]["podTemplate"]["spec"].get("volumes").is_none());
}

#[test]
fn picods_workspace_is_its_argument_or_root() {
    let args = |a: &[&str]| a.iter().map(ToString::to_string).collect::<Vec<_>>();
    assert_eq!(
        picod_workspace(&args(&["--port=8080", "--workspace=/work"])),
        "/work"
    );
    assert_eq!(
        picod_workspace(&args(&["--workspace", "/w2", "--port=1"])),
        "/w2"
    );
    assert_eq!(picod_workspace(&args(&["--port=8080"])), "/root");
    assert_eq!(picod_workspace(&[]), "/root");
}

#[test]
fn sandbox_pods_get_a_user_namespace_only_when_asked_and_only_where_they_can() {
    let on: &'static PodDefaults = Box::leak(Box::new(PodDefaults {
        user_namespaces: true,
        ..PodDefaults::default()
    }));
    let with = |defaults: &'static PodDefaults| SessionInfo {
        pod_defaults: defaults,
        ..session(None, "")
    };
    let host_users = |v: Value| v["spec"]["podTemplate"]["spec"].get("hostUsers").cloned();
    // CodeInterpreters, on demand and through the warm pool's template.
    let c = ci("");
    let direct = serde_json::to_value(code_interpreter_sandbox(&c, &with(on))).unwrap();
    assert_eq!(host_users(direct), Some(json!(false)));
    let template = sandbox_template(AgentSandboxApi::V1beta1, &c, None, on);
    assert_eq!(
        host_users(serde_json::to_value(template).unwrap()),
        Some(json!(false))
    );
    let off = serde_json::to_value(code_interpreter_sandbox(&c, &session(None, ""))).unwrap();
    assert_eq!(host_users(off), None, "off by default");
    // AgentRuntimes: unless their template decides, or shares a namespace of the node.
    let runtime = |spec: &str| {
        let yaml = format!(
            "apiVersion: runtime.agentcube.volcano.sh/v1alpha1\nkind: AgentRuntime\nmetadata: {{name: echo, namespace: ns}}\nspec:\n  targetPort: [{{port: 8080}}]\n  podTemplate:\n    spec:\n{spec}      containers: [{{name: agent, image: busybox}}]\n"
        );
        let Definition::AgentRuntime(ar) = manifest::load(&yaml, "t").unwrap().remove(0) else {
            panic!()
        };
        host_users(serde_json::to_value(agent_runtime_sandbox(&ar, &with(on))).unwrap())
    };
    assert_eq!(runtime(""), Some(json!(false)));
    assert_eq!(runtime("      hostUsers: true\n"), Some(json!(true)));
    for shared in ["hostNetwork", "hostPID", "hostIPC"] {
        assert_eq!(
            runtime(&format!("      {shared}: true\n")),
            None,
            "{shared}"
        );
    }
}
