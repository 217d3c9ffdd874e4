//! What the agent-sandbox controllers do, as far as the Workload Manager can observe it:
//! - **Sandbox**: keeps one Pod (named like the Sandbox, or by annotation
//!   `agents.x-k8s.io/pod-name`), controller-owned by it, from `spec.podTemplate`; reports
//!   `Ready` when the Pod is Ready; deletes the Pod at `spec.shutdownTime` (policy `Retain`: the
//!   Sandbox stays) or when `spec.replicas` is 0.
//! - **SandboxWarmPool**: keeps `spec.replicas` Sandboxes labelled
//!   `agents.x-k8s.io/warm-pool-sandbox=<pool>`, controller-owned by the pool, made from the
//!   referenced SandboxTemplate; reports `replicas` and `readyReplicas`.
//! - **SandboxClaim**: adopts a pool Sandbox made from the same template (Ready ones first; the
//!   pool label is removed and the claim becomes its controller), or creates a Sandbox named like
//!   the claim; writes `status.sandbox.name` and mirrors the Sandbox's `Ready` condition.

use std::hash::{Hash, Hasher};

use jiff::Timestamp;
use serde_json::{Value, json};

use super::{
    CLAIM, POD, SANDBOX, TEMPLATE, WARM_POOL, condition, controller_ref, label, name, namespace,
    ready_status, str_at, suffix,
};
use crate::store::Cluster;

/// Label marking a Sandbox as a member of a warm pool.
pub const WARM_POOL_LABEL: &str = "agents.x-k8s.io/warm-pool-sandbox";
/// Label naming the template a pool Sandbox came from (a hash of the template name).
pub const TEMPLATE_REF_HASH: &str = "agents.x-k8s.io/sandbox-template-ref-hash";
/// Label agent-sandbox puts on a Sandbox's pod (a hash of the Sandbox name).
pub const SANDBOX_NAME_HASH: &str = "agents.x-k8s.io/sandbox-name-hash";
/// Annotation naming the pod of a Sandbox when it is not named like the Sandbox.
pub const POD_NAME_ANNOTATION: &str = "agents.x-k8s.io/pod-name";

const SANDBOX_API: &str = "agents.x-k8s.io/v1alpha1";
const EXTENSIONS_API: &str = "extensions.agents.x-k8s.io/v1alpha1";

fn short_hash(s: &str) -> String {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    s.hash(&mut h);
    format!("{:08x}", h.finish() as u32)
}

fn owned_by(v: &Value, owner_uid: &str) -> bool {
    v.pointer("/metadata/ownerReferences")
        .and_then(Value::as_array)
        .is_some_and(|refs| refs.iter().any(|r| r["uid"] == json!(owner_uid)))
}

fn set_status(c: &Cluster, kind: crate::store::Kind, obj: &Value, status: Value) {
    if obj.get("status") == Some(&status) {
        return;
    }
    if let Err(e) = c.replace_status(kind.in_ns(namespace(obj)), name(obj), status) {
        tracing::debug!(name = name(obj), error = %e, "fake agent-sandbox: status write failed");
    }
}

/// One pass over every SandboxWarmPool, SandboxClaim and Sandbox.
pub fn reconcile(c: &Cluster, now: Timestamp) {
    for pool in c.list_kind(WARM_POOL) {
        warm_pool(c, &pool);
    }
    for claim in c.list_kind(CLAIM) {
        sandbox_claim(c, &claim);
    }
    for sb in c.list_kind(SANDBOX) {
        sandbox(c, &sb, now);
    }
}

/// A Sandbox object made from a template's pod template.
fn sandbox_from_template(
    name: &str,
    namespace: &str,
    template: &Value,
    labels: Value,
    owner: Value,
) -> Value {
    json!({
        "apiVersion": SANDBOX_API, "kind": "Sandbox",
        "metadata": {"name": name, "namespace": namespace, "labels": labels, "ownerReferences": [owner]},
        "spec": {"podTemplate": template.pointer("/spec/podTemplate").cloned().unwrap_or(json!({"spec": {}})), "replicas": 1},
    })
}

fn sandbox(c: &Cluster, sb: &Value, now: Timestamp) {
    let (ns, nm) = (namespace(sb), name(sb));
    let uid = str_at(sb, "/metadata/uid");
    let pod_name = sb
        .pointer(&format!(
            "/metadata/annotations/{}",
            POD_NAME_ANNOTATION.replace('/', "~1")
        ))
        .and_then(Value::as_str)
        .unwrap_or(nm);
    let pods = POD.in_ns(ns);
    let pod = c.get(&pods, pod_name);
    let expired = str_at(sb, "/spec/shutdownTime")
        .parse::<Timestamp>()
        .is_ok_and(|t| t <= now);
    let replicas = sb
        .pointer("/spec/replicas")
        .and_then(Value::as_i64)
        .unwrap_or(1);
    let base = json!({"serviceFQDN": format!("{nm}.{ns}.svc.cluster.local"), "service": nm,
                      "selector": format!("{SANDBOX_NAME_HASH}={}", short_hash(nm))});
    if expired || replicas == 0 {
        if let Some(p) = &pod
            && owned_by(p, uid)
        {
            let _ = c.delete(pods, pod_name);
        }
        let (reason, message) = if expired {
            ("SandboxExpired", "Sandbox has expired")
        } else {
            ("SandboxPaused", "Sandbox has 0 replicas")
        };
        let mut status = base;
        status["replicas"] = json!(0);
        status["conditions"] = json!([condition(sb, "Ready", false, reason, message)]);
        set_status(c, SANDBOX, sb, status);
        return;
    }
    let ready = match &pod {
        Some(p) => ready_status(p) == "True",
        None => {
            let template = sb.pointer("/spec/podTemplate").cloned().unwrap_or_default();
            let mut labels = template
                .pointer("/metadata/labels")
                .cloned()
                .filter(Value::is_object)
                .unwrap_or(json!({}));
            labels[SANDBOX_NAME_HASH] = json!(short_hash(nm));
            let pod = json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {
                    "name": pod_name, "namespace": ns, "labels": labels,
                    "annotations": template.pointer("/metadata/annotations").cloned().unwrap_or(json!({})),
                    "ownerReferences": [controller_ref(sb, SANDBOX_API, "Sandbox")],
                },
                "spec": template.get("spec").cloned().unwrap_or(json!({})),
            });
            if let Err(e) = c.create(pods, pod) {
                tracing::debug!(sandbox = nm, error = %e, "fake agent-sandbox: pod create failed");
            }
            false
        }
    };
    let (reason, message) = if ready {
        ("DependenciesReady", "Pod is Ready")
    } else {
        ("DependenciesNotReady", "Pod is not Ready")
    };
    let mut status = base;
    status["replicas"] = json!(1);
    status["conditions"] = json!([condition(sb, "Ready", ready, reason, message)]);
    set_status(c, SANDBOX, sb, status);
}

fn warm_pool(c: &Cluster, pool: &Value) {
    let (ns, nm) = (namespace(pool), name(pool));
    let uid = str_at(pool, "/metadata/uid");
    let want = pool
        .pointer("/spec/replicas")
        .and_then(Value::as_i64)
        .unwrap_or(0)
        .max(0) as usize;
    let template_name = str_at(pool, "/spec/sandboxTemplateRef/name");
    let template = c.get(&TEMPLATE.in_ns(ns), template_name);
    let sandboxes = SANDBOX.in_ns(ns);
    let mut members: Vec<Value> = c
        .list(&sandboxes.prefix, ns, &sandboxes.plural)
        .into_iter()
        .filter(|s| label(s, WARM_POOL_LABEL) == Some(nm) && owned_by(s, uid))
        .collect();
    if let Some(t) = &template {
        for _ in members.len()..want {
            let labels = json!({WARM_POOL_LABEL: nm, TEMPLATE_REF_HASH: short_hash(template_name)});
            let owner = controller_ref(pool, EXTENSIONS_API, "SandboxWarmPool");
            let sb = sandbox_from_template(&format!("{nm}-{}", suffix()), ns, t, labels, owner);
            match c.create(sandboxes.clone(), sb) {
                Ok(created) => members.push(created),
                Err(e) => {
                    tracing::debug!(pool = nm, error = %e, "fake agent-sandbox: create failed")
                }
            }
        }
    }
    if members.len() > want {
        // Not-ready members go first, then the newest.
        members.sort_by_key(|s| {
            (
                ready_status(s) == "True",
                std::cmp::Reverse(str_at(s, "/metadata/creationTimestamp").to_string()),
            )
        });
        for extra in members.drain(..members.len() - want) {
            let _ = c.delete(sandboxes.clone(), name(&extra));
        }
    }
    let ready = members.iter().filter(|s| ready_status(s) == "True").count();
    set_status(
        c,
        WARM_POOL,
        pool,
        json!({"replicas": members.len(), "readyReplicas": ready}),
    );
}

fn sandbox_claim(c: &Cluster, claim: &Value) {
    let (ns, nm) = (namespace(claim), name(claim));
    let sandboxes = SANDBOX.in_ns(ns);
    let bound = str_at(claim, "/status/sandbox/name").to_string();
    if !bound.is_empty() {
        let ready = c
            .get(&sandboxes, &bound)
            .is_some_and(|s| ready_status(&s) == "True");
        let (reason, message) = if ready {
            ("SandboxReady", "Sandbox is Ready")
        } else {
            ("SandboxNotReady", "Sandbox is not Ready")
        };
        let status = json!({"sandbox": {"name": bound},
                            "conditions": [condition(claim, "Ready", ready, reason, message)]});
        set_status(c, CLAIM, claim, status);
        return;
    }
    let template_name = str_at(claim, "/spec/sandboxTemplateRef/name");
    let Some(template) = c.get(&TEMPLATE.in_ns(ns), template_name) else {
        let message = format!("SandboxTemplate {template_name:?} not found");
        let status =
            json!({"conditions": [condition(claim, "Ready", false, "TemplateNotFound", &message)]});
        set_status(c, CLAIM, claim, status);
        return;
    };
    let pools: Vec<String> = c
        .list(WARM_POOL.prefix, ns, WARM_POOL.plural)
        .iter()
        .filter(|p| str_at(p, "/spec/sandboxTemplateRef/name") == template_name)
        .map(|p| name(p).to_string())
        .collect();
    let mut candidates: Vec<Value> = c
        .list(&sandboxes.prefix, ns, &sandboxes.plural)
        .into_iter()
        .filter(|s| label(s, WARM_POOL_LABEL).is_some_and(|p| pools.iter().any(|n| n == p)))
        .collect();
    // Ready members first, then the oldest.
    candidates.sort_by_key(|s| {
        (
            ready_status(s) != "True",
            str_at(s, "/metadata/creationTimestamp").to_string(),
        )
    });
    let owner = controller_ref(claim, EXTENSIONS_API, "SandboxClaim");
    let chosen = match candidates.into_iter().next() {
        Some(mut sb) => {
            let sb_name = name(&sb).to_string();
            if let Some(labels) = sb
                .pointer_mut("/metadata/labels")
                .and_then(Value::as_object_mut)
            {
                labels.remove(WARM_POOL_LABEL);
            }
            sb["metadata"]["ownerReferences"] = json!([owner]);
            // Carries its resourceVersion: a concurrent change makes this a conflict, retried
            // on the next pass.
            if c.replace(sandboxes, &sb_name, sb).is_err() {
                return;
            }
            sb_name
        }
        None => {
            let sb = sandbox_from_template(nm, ns, &template, json!({}), owner);
            if let Err(e) = c.create(sandboxes, sb)
                && e.code != 409
            {
                return;
            }
            nm.to_string()
        }
    };
    let status = json!({"sandbox": {"name": chosen},
                        "conditions": [condition(claim, "Ready", false, "SandboxNotReady", "Sandbox is not Ready")]});
    set_status(c, CLAIM, claim, status);
}
