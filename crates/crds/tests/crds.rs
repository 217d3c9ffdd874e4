//! The generated CRDs, the examples, upstream manifests, and bad manifests.

use std::path::{Path, PathBuf};

use agentcube_crds::common::QUANTITY_PATTERN;
use agentcube_crds::manifest::{self, Definition};
use agentcube_crds::{AuthMode, Protocol, crd_file_name, crds};
use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[test]
fn committed_crd_yaml_is_current() {
    for crd in crds() {
        let path = repo().join("config/crd").join(crd_file_name(&crd));
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        let fresh = serde_yaml::to_string(&crd).unwrap();
        assert!(
            committed.ends_with(&fresh),
            "{} is stale: run `make crds` and commit it",
            path.display()
        );
    }
}

/// Every int-or-string below `v`: (path, has the quantity pattern).
fn int_or_strings(v: &Value, path: &str, out: &mut Vec<(String, bool)>) {
    match v {
        Value::Object(o) => {
            if o.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true)) {
                let pattern = o.get("pattern").and_then(Value::as_str);
                out.push((path.to_string(), pattern == Some(QUANTITY_PATTERN)));
            }
            for (k, child) in o {
                int_or_strings(child, &format!("{path}.{k}"), out);
            }
        }
        Value::Array(items) => items.iter().for_each(|c| int_or_strings(c, path, out)),
        _ => {}
    }
}

#[test]
fn quantities_take_the_api_servers_pattern_and_ports_do_not() {
    for crd in crds() {
        let v = serde_json::to_value(&crd).unwrap();
        let mut found = Vec::new();
        int_or_strings(&v, "", &mut found);
        let limits = found
            .iter()
            .find(|(p, _)| p.ends_with("resources.properties.limits.additionalProperties"));
        assert_eq!(limits.map(|l| l.1), Some(true), "{found:?}");
        for (path, patterned) in &found {
            assert_eq!(*patterned, !path.ends_with(".port"), "{path}");
        }
    }
    let ci = |limits: &str| {
        format!(
            "apiVersion: runtime.agentcube.volcano.sh/v1alpha1\nkind: CodeInterpreter\n\
             metadata: {{name: x}}\nspec:\n  template:\n    resources:\n      limits: {limits}\n"
        )
    };
    for ok in [
        "{memory: 512Mi, cpu: 500m}",
        "{memory: \"1.5Gi\", cpu: 2}",
        "{memory: \"1e9\"}",
    ] {
        manifest::load(&ci(ok), "ok.yaml").unwrap_or_else(|e| panic!("{ok}: {e}"));
    }
    for bad in ["512MB", "1gi", "NaN", "lots", "' 1Gi'"] {
        let e = manifest::load(&ci(&format!("{{memory: {bad}}}")), "bad.yaml")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("spec.template.resources.limits.memory: Invalid value")
                && e.contains("must be a quantity such as 512Mi"),
            "{bad}: {e}"
        );
    }
}

#[test]
fn crds_match_the_upstream_contract() {
    for crd in crds() {
        let v = serde_json::to_value(&crd).unwrap();
        assert_eq!(v["spec"]["group"], "runtime.agentcube.volcano.sh");
        assert_eq!(v["spec"]["scope"], "Namespaced");
        let version = &v["spec"]["versions"][0];
        assert_eq!(version["name"], "v1alpha1");
        assert_eq!(
            (version["served"].as_bool(), version["storage"].as_bool()),
            (Some(true), Some(true))
        );
        assert!(version["subresources"]["status"].is_object());
        let spec = &version["schema"]["openAPIV3Schema"]["properties"]["spec"];
        assert_eq!(spec["properties"]["sessionTimeout"]["default"], "15m");
        // AgentRuntime: optional, no default (upstream PR #410); CodeInterpreter: 8h.
        let max = &spec["properties"]["maxSessionDuration"]["default"];
        match v["spec"]["names"]["kind"].as_str().unwrap() {
            "AgentRuntime" => assert!(max.is_null(), "{max}"),
            _ => assert_eq!(max, "8h"),
        }
        let columns: Vec<_> = version["additionalPrinterColumns"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert!(columns.contains(&"Age"));
        assert_every_property_documented(spec, "spec");
    }
    let ci = serde_json::to_value(&crds()[1]).unwrap();
    let spec = &ci["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
    assert_eq!(spec["required"], serde_json::json!(["template"]));
    assert_eq!(
        spec["properties"]["authMode"]["enum"],
        serde_json::json!(["picod", "none"])
    );
    assert_eq!(spec["properties"]["authMode"]["default"], "picod");
    assert_eq!(spec["properties"]["warmPoolSize"]["format"], "int32");
    let port = &spec["properties"]["ports"]["items"];
    assert_eq!(port["required"], serde_json::json!(["port", "protocol"]));
    assert_eq!(port["properties"]["protocol"]["default"], "HTTP");
    let t = &spec["properties"]["template"]["properties"];
    let policies: Vec<_> = t["imagePullPolicy"]["enum"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| !v.is_null())
        .collect();
    assert_eq!(policies, ["Always", "Never", "IfNotPresent"]);
    assert_eq!(
        t["imagePullSecrets"]["x-kubernetes-list-map-keys"],
        serde_json::json!(["name"])
    );
    assert_eq!(t["command"]["x-kubernetes-list-type"], "atomic");
    let ar = serde_json::to_value(&crds()[0]).unwrap();
    let spec = &ar["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
    let mut req: Vec<_> = spec["required"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    req.sort();
    assert_eq!(
        req,
        ["podTemplate", "sessionTimeout", "targetPort"],
        "maxSessionDuration is optional since upstream PR #410"
    );
    assert_eq!(
        spec["properties"]["podTemplate"]["required"],
        serde_json::json!(["spec"])
    );
}

/// Every field we define (not the embedded Kubernetes types) carries a description, so
/// `kubectl explain` teaches a new user.
fn assert_every_property_documented(schema: &Value, path: &str) {
    assert!(
        schema.get("description").is_some(),
        "{path} has no description"
    );
    if path.contains("podTemplate.spec")
        || path.contains("environment")
        || path.contains("resources")
        || path.contains("imagePullSecrets")
    {
        return;
    }
    if let Some(props) = schema.get("properties").and_then(Value::as_object) {
        for (k, s) in props {
            assert_every_property_documented(s, &format!("{path}.{k}"));
        }
    }
    if let Some(items) = schema.get("items")
        && items.get("properties").is_some()
    {
        assert_every_property_documented(items, &format!("{path}[]"));
    }
}

#[test]
fn examples_load_with_defaults_applied() {
    let mut defs = Vec::new();
    for (file, outcome) in manifest::load_dir(&repo().join("examples")).unwrap() {
        defs.extend(outcome.unwrap_or_else(|e| panic!("{}: {e}", file.display())));
    }
    assert_eq!(defs.len(), 3);
    for d in &defs {
        match d {
            Definition::CodeInterpreter(ci) => {
                assert_eq!(ci.spec.auth_mode, AuthMode::Picod, "default applied");
                assert!(
                    ci.spec
                        .effective_ports()
                        .iter()
                        .all(|p| p.protocol == Protocol::HTTP)
                );
                assert!(ci.spec.template.image.is_some());
            }
            Definition::AgentRuntime(ar) => {
                assert_eq!(ar.spec.target_port[0].port, 8080);
                assert_eq!(ar.spec.session_timeout.to_string(), "15m0s");
            }
        }
    }
    let names: Vec<_> = defs.iter().map(|d| d.key().1).collect();
    assert!(names.contains(&"my-interpreter".to_string()));
    let warm = defs.iter().find_map(|d| match d {
        Definition::CodeInterpreter(c) if c.spec.warm_pool() > 0 => Some(c.spec.warm_pool()),
        _ => None,
    });
    assert_eq!(warm, Some(2), "one example has a warm pool");
}

/// Every leaf of `original` is present in `round` with the same value (durations compared parsed).
fn assert_superset(original: &Value, round: &Value, path: &str) {
    match original {
        Value::Object(m) => {
            for (k, v) in m {
                let r = round
                    .get(k)
                    .unwrap_or_else(|| panic!("lost field {path}.{k}"));
                assert_superset(v, r, &format!("{path}.{k}"));
            }
        }
        Value::Array(a) => {
            for (i, v) in a.iter().enumerate() {
                assert_superset(v, &round[i], &format!("{path}[{i}]"));
            }
        }
        Value::String(s) if path.ends_with("Timeout") || path.ends_with("Duration") => {
            let a = agentcube_types::GoDuration::parse(s).unwrap();
            let b = agentcube_types::GoDuration::parse(round.as_str().unwrap()).unwrap();
            assert_eq!(a, b, "{path}");
        }
        _ => assert_eq!(original, round, "{path}"),
    }
}

#[test]
fn upstream_examples_round_trip_without_losing_fields() {
    for name in ["code-interpreter.yaml", "agent-runtime.yaml"] {
        let text = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/data/upstream")
                .join(name),
        )
        .unwrap();
        let original: Value = serde_yaml::from_str(&text).unwrap();
        let defs = manifest::load(&text, name).unwrap();
        let round = match &defs[0] {
            Definition::CodeInterpreter(c) => serde_json::to_value(c).unwrap(),
            Definition::AgentRuntime(a) => serde_json::to_value(a).unwrap(),
        };
        assert_superset(&original, &round, "");
        // And what we render parses back to the same object.
        let again = manifest::load(&serde_yaml::to_string(&round).unwrap(), name).unwrap();
        assert_eq!(again, defs);
    }
}

#[test]
fn durations_take_go_syntax_and_render_like_go() {
    let yaml = |d: &str| {
        format!(
            "apiVersion: runtime.agentcube.volcano.sh/v1alpha1\nkind: CodeInterpreter\nmetadata: {{name: x}}\nspec:\n  template: {{}}\n  sessionTimeout: {d}\n"
        )
    };
    for (input, rendered) in [
        ("30s", "30s"),
        ("1h30m", "1h30m0s"),
        ("1.5h", "1h30m0s"),
        ("500ms", "500ms"),
        ("15m", "15m0s"),
    ] {
        let defs = manifest::load(&yaml(input), "t").unwrap();
        let Definition::CodeInterpreter(ci) = &defs[0] else {
            panic!()
        };
        assert_eq!(ci.spec.session_timeout.to_string(), rendered, "{input}");
        assert_eq!(ci.metadata.namespace.as_deref(), Some("default"));
    }
}

fn refusal(body: &str) -> String {
    let text = format!("apiVersion: runtime.agentcube.volcano.sh/v1alpha1\n{body}");
    manifest::load(&text, "bad.yaml").unwrap_err().to_string()
}

#[test]
fn bad_manifests_get_clear_errors() {
    let e = refusal(
        "kind: CodeInterpreter\nmetadata: {name: x}\nspec:\n  template: {}\n  authMode: jwt\n",
    );
    assert!(
        e.contains(
            "spec.authMode: Unsupported value: \"jwt\": supported values: \"picod\", \"none\""
        ),
        "{e}"
    );
    let e = refusal("kind: CodeInterpreter\nmetadata: {name: x}\nspec:\n  warmPoolSize: 1\n");
    assert!(e.contains("spec.template: Required value"), "{e}");
    let e = refusal(
        "kind: CodeInterpreter\nmetadata: {name: x}\nspec:\n  template: {}\n  sessionTimeout: 5d\n",
    );
    assert!(
        e.contains("spec.sessionTimeout: Invalid value: \"5d\": must be a duration"),
        "{e}"
    );
    let e = refusal(
        "kind: CodeInterpreter\nmetadata: {name: x}\nspec:\n  template: {imagePullPolicy: Sometimes}\n",
    );
    assert!(
        e.contains("spec.template.imagePullPolicy: Unsupported value"),
        "{e}"
    );
    let e = refusal(
        "kind: CodeInterpreter\nmetadata: {name: x}\nspec:\n  template: {}\n  warmPoolSize: -1\n",
    );
    assert!(e.contains("spec.warmPoolSize: Invalid value: -1"), "{e}");
    let e = refusal(
        "kind: CodeInterpreter\nmetadata: {name: x}\nspec:\n  template: {}\n  ports: [{port: 0}]\n",
    );
    assert!(e.contains("spec.ports[0].port: Invalid value: 0"), "{e}");
    let e = refusal(
        "kind: CodeInterpreter\nmetadata: {name: x}\nspec:\n  template: {}\n  warmpoolsize: 2\n",
    );
    assert!(e.contains("spec.warmpoolsize: unknown field"), "{e}");
    let e = refusal(
        "kind: AgentRuntime\nmetadata: {name: x}\nspec:\n  podTemplate: {spec: {containers: []}}\n",
    );
    assert!(e.contains("spec.targetPort: Required value"), "{e}");
    // Names as the API server takes them: they become paths, cgroups and network namespaces.
    for (meta, field) in [
        (
            "{name: \"../../x\"}",
            "metadata.name: Invalid value: \"../../x\"",
        ),
        (
            "{name: Big_Name}",
            "metadata.name: Invalid value: \"Big_Name\"",
        ),
        ("{name: a..b}", "metadata.name: Invalid value"),
        ("{name: -a}", "metadata.name: Invalid value"),
        (
            "{name: x, namespace: a.b}",
            "metadata.namespace: Invalid value: \"a.b\"",
        ),
    ] {
        let e = refusal(&format!(
            "kind: CodeInterpreter\nmetadata: {meta}\nspec:\n  template: {{}}\n"
        ));
        assert!(e.contains(field) && e.contains("RFC 1123"), "{meta}: {e}");
    }
    let long = format!(
        "kind: CodeInterpreter\nmetadata: {{name: {}}}\nspec:\n  template: {{}}\n",
        "a".repeat(254)
    );
    assert!(refusal(&long).contains("at most 253"));
    // A name of any length is quoted by its start and length, not whole.
    let huge = format!("{}é", "a".repeat(100_000));
    let e = manifest::invalid_name(&huge).unwrap();
    assert!(e.len() < 600, "{e}");
    assert!(
        e.contains(&format!("\"{}\"… (100001 characters)", "a".repeat(64))),
        "{e}"
    );
    let e = manifest::invalid_namespace(&"é".repeat(64)).unwrap();
    assert!(
        e.contains(&format!("\"{}\"… (64 characters)", "é".repeat(63))),
        "{e}"
    );
    assert!(
        manifest::invalid_namespace(&"é".repeat(63))
            .unwrap()
            .contains(&format!("{:?}:", "é".repeat(63)))
    );
    let text = "apiVersion: runtime.agentcube.volcano.sh/v1alpha1\nkind: CodeInterpreter\n\
                metadata: {name: my.interpreter-2, namespace: team-a}\nspec:\n  template: {}\n";
    assert_eq!(manifest::load(text, "ok.yaml").unwrap().len(), 1);
    let e = refusal("kind: AgentRuntime\nmetadata: {}\nspec: {}\n");
    assert!(e.contains("metadata.name: Required value"), "{e}");
    assert!(e.contains("bad.yaml: document 0"), "{e}");
    let e = manifest::load(
        "apiVersion: runtime.agentcube.volcano.sh/v2\nkind: AgentRuntime\nmetadata: {name: x}\n",
        "v",
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("apiVersion must be runtime.agentcube.volcano.sh/v1alpha1"),
        "{e}"
    );
    // Other kinds in the same file are not ours to judge.
    let ok = manifest::load(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\n---\n",
        "d",
    )
    .unwrap();
    assert!(ok.is_empty());
}

#[test]
fn generated_crds_pass_kubernetes_validate_strict() {
    let tool = repo().join(".venv/bin/kubernetes-validate");
    assert!(tool.exists(), "{} missing: run `make deps`", tool.display());
    let files: Vec<PathBuf> = crds()
        .iter()
        .map(|c| repo().join("config/crd").join(crd_file_name(c)))
        .collect();
    let out = std::process::Command::new(&tool)
        .args(["--strict", "-k", "1.33.0"])
        .args(&files)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "kubernetes-validate failed:\n{text}");
    assert!(!text.contains("ERROR"), "{text}");
}

#[test]
fn network_policies_load_in_upstreams_shape_and_bad_ones_are_refused() {
    let text = "apiVersion: runtime.agentcube.volcano.sh/v1alpha1\nkind: AgentRuntime\nmetadata: {name: a}\nspec:\n  targetPort: [{port: 8080}]\n  podTemplate: {spec: {containers: [{name: a, image: x}]}}\n  networkPolicy:\n    egress: [{cidrs: [\"10.0.0.0/8\", \"2001:db8::/32\"], ports: [{protocol: TCP, port: 443}, {port: 53, protocol: UDP}]}]\n    ingress: [{cidrs: [\"192.0.2.0/24\"]}]\n";
    let defs = manifest::load(text, "t").unwrap();
    let policy = defs[0].network_policy().unwrap();
    assert_eq!(policy.egress[0].cidrs, ["10.0.0.0/8", "2001:db8::/32"]);
    assert_eq!(
        policy.egress[0].ports[1].protocol,
        agentcube_crds::NetworkProtocol::UDP
    );
    assert_eq!(policy.ingress[0].ports, []);
    let ci = |policy: &str| {
        format!(
            "kind: CodeInterpreter\nmetadata: {{name: x}}\nspec:\n  template: {{}}\n  networkPolicy: {policy}\n"
        )
    };
    for (policy, want) in [
        (
            "{egress: [{cidrs: [10.0.0.300/8]}]}",
            "spec.networkPolicy.egress[0].cidrs[0]: Invalid value: \"10.0.0.300/8\"",
        ),
        (
            "{egress: [{cidrs: [example.com]}]}",
            "spec.networkPolicy.egress[0].cidrs[0]: Invalid value: \"example.com\"",
        ),
        (
            "{ingress: [{ports: [{port: 70000}]}]}",
            "spec.networkPolicy.ingress[0].ports[0].port: Invalid value: 70000",
        ),
        (
            "{egress: [{ports: [{port: 1, protocol: ICMP}]}]}",
            "spec.networkPolicy.egress[0].ports[0].protocol: Unsupported value: \"ICMP\"",
        ),
        (
            "{egress: [{cidr: [10.0.0.0/8]}]}",
            "spec.networkPolicy.egress[0].cidr",
        ),
    ] {
        let e = refusal(&ci(policy));
        assert!(e.contains(want), "{policy}: {e}");
    }
}
