//! Pure builders of the agent-sandbox objects the Workload Manager creates (spec §2.4), field for
//! field as upstream, plus one fix: the Workload Manager's `--runtime-class-name` is the default
//! RuntimeClass for definitions that name none (upstream ignored the flag). Also the standby
//! claims of `--standby-claims` (extension) and the patch that hands one to a session.

use std::collections::BTreeMap;

use agentcube_crds::labels;
use agentcube_crds::sandbox::{
    AgentSandboxApi, ClaimLifecycle, NameRef, PodMetadata, PodTemplate, Sandbox, SandboxClaim,
    SandboxClaimSpec, SandboxSpec, SandboxTemplate, SandboxTemplateSpec, SandboxWarmPool,
    SandboxWarmPoolSpec, WarmPoolUpdateStrategy,
};
use agentcube_crds::{AgentRuntime, AuthMode, CodeInterpreter};
use agentcube_types::api::WorkloadKind;
use k8s_openapi::api::core::v1::{
    Capabilities, Container, EnvVar, EnvVarSource, ObjectFieldSelector, PodSecurityContext,
    PodSpec, SeccompProfile, SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time};

/// Per-session inputs of a build.
#[derive(Debug, Clone)]
pub struct SessionInfo<'a> {
    /// The agent-sandbox API version the cluster serves.
    pub api: AgentSandboxApi,
    pub session_id: &'a str,
    /// Object name (`<definition>-<8 random chars>`).
    pub name: &'a str,
    pub namespace: &'a str,
    /// OIDC subject of the owner, if any.
    pub owner: Option<&'a str>,
    /// The session's end (`None`: no maximum lifetime, no `shutdownTime`).
    pub shutdown_time: Option<jiff::Timestamp>,
    /// Router public key for `authMode: picod`.
    pub public_key: Option<&'a str>,
    /// What the Workload Manager adds to pods their definitions leave open.
    pub pod_defaults: &'a PodDefaults,
}

/// What the Workload Manager adds to every sandbox pod where its definition leaves it open.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodDefaults {
    /// `--runtime-class-name`: RuntimeClass of sandboxes whose definition names none (empty:
    /// none).
    pub runtime_class: String,
    /// `--code-interpreter-uid`: CodeInterpreter pods (whose definitions cannot say) run as this
    /// uid instead of the image's user, which is root in PicoD's images ([`run_as`]).
    pub code_interpreter_uid: Option<i64>,
    /// `--sandbox-user-namespaces`: sandbox pods run in a user namespace of their own
    /// (`hostUsers: false`, [`user_namespace`]).
    pub user_namespaces: bool,
}

/// First 63 hex characters of sha256(owner): labels cannot hold arbitrary subjects.
pub fn owner_hash(owner: &str) -> String {
    use sha2::{Digest, Sha256};
    let hex: String = Sha256::digest(owner.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    hex[..63].to_string()
}

fn session_meta(
    s: &SessionInfo<'_>,
    idle_timeout: &str,
    mut labels_: BTreeMap<String, String>,
) -> ObjectMeta {
    labels_.insert(labels::SESSION_ID.into(), s.session_id.into());
    let mut annotations =
        BTreeMap::from([(labels::IDLE_TIMEOUT.to_string(), idle_timeout.to_string())]);
    if let Some(owner) = s.owner.filter(|o| !o.is_empty()) {
        labels_.insert(labels::OWNER_HASH.into(), owner_hash(owner));
        annotations.insert(labels::OWNER.into(), owner.into());
    }
    ObjectMeta {
        name: Some(s.name.into()),
        namespace: Some(s.namespace.into()),
        labels: Some(labels_),
        annotations: Some(annotations),
        ..Default::default()
    }
}

fn runtime_class(own: Option<&String>, default: &str) -> Option<String> {
    own.filter(|c| !c.is_empty())
        .cloned()
        .or_else(|| (!default.is_empty()).then(|| default.to_string()))
}

/// What a sandbox container gets when its definition sets no `securityContext` (beyond upstream,
/// which sets none): the runtime's default seccomp profile, no privilege escalation, no
/// capabilities. A definition that sets its own keeps it untouched.
pub fn default_security_context() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            add: None,
        }),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            localhost_profile: None,
        }),
        ..Default::default()
    }
}

/// No service-account token unless the definition asks for one (`automountServiceAccountToken:
/// true`): the code in a sandbox is untrusted, and the token is a credential for the cluster's
/// API. Containers without a `securityContext` of their own (and in a pod without one) get
/// [`default_security_context`].
fn harden(pod: &mut PodSpec) {
    pod.automount_service_account_token.get_or_insert(false);
    if pod.security_context.is_some() {
        return;
    }
    for c in &mut pod.containers {
        c.security_context
            .get_or_insert_with(default_security_context);
    }
}

/// With `--sandbox-user-namespaces`, a pod whose definition leaves `hostUsers` unset gets
/// `hostUsers: false`: its uids (root included) map to a range of host uids no other pod has, so
/// a process that escapes its container is nobody on the node. Not for a pod that shares the
/// node's network, PID or IPC namespace, which the API server refuses in a user namespace.
fn user_namespace(pod: &mut PodSpec, on: bool) {
    let shares_node = [pod.host_network, pod.host_pid, pod.host_ipc].contains(&Some(true));
    if on && pod.host_users.is_none() && !shares_node {
        pod.host_users = Some(false);
    }
}

/// `PICOD_SANDBOX_NAME` from the downward API: the pod's own name.
fn sandbox_name_env() -> EnvVar {
    EnvVar {
        name: labels::PICOD_SANDBOX_NAME.into(),
        value: None,
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: "metadata.name".into(),
                api_version: None,
            }),
            ..Default::default()
        }),
    }
}

/// The Sandbox for an AgentRuntime session.
pub fn agent_runtime_sandbox(ar: &AgentRuntime, s: &SessionInfo<'_>) -> Sandbox {
    let mut spec = ar.spec.pod_template.spec.clone();
    harden(&mut spec);
    user_namespace(&mut spec, s.pod_defaults.user_namespaces);
    spec.runtime_class_name = runtime_class(
        spec.runtime_class_name.as_ref(),
        &s.pod_defaults.runtime_class,
    );
    let template_labels = ar.spec.pod_template.labels.clone();
    let template_annotations = ar.spec.pod_template.annotations.clone();
    sandbox(
        WorkloadKind::AgentRuntime,
        ar.metadata.name.as_deref().unwrap_or_default(),
        &ar.spec.session_timeout.to_string(),
        s,
        spec,
        template_labels,
        template_annotations,
    )
}

/// The container list of a CodeInterpreter sandbox (`container_name` differs between the direct
/// path, `code-interpreter`, and the template path, `codeinterpreter`, as upstream).
fn code_interpreter_pod(
    ci: &CodeInterpreter,
    container_name: &str,
    key: Option<&str>,
    defaults: &PodDefaults,
) -> PodSpec {
    let t = &ci.spec.template;
    let mut env: Vec<EnvVar> = t.environment.clone().unwrap_or_default();
    if ci.spec.auth_mode == AuthMode::Picod
        && let Some(key) = key
    {
        env.push(EnvVar {
            name: labels::PICOD_AUTH_PUBLIC_KEY.into(),
            value: Some(key.into()),
            ..Default::default()
        });
        env.push(sandbox_name_env());
    }
    let mut pod = PodSpec {
        containers: vec![Container {
            name: container_name.into(),
            image: t.image.clone(),
            image_pull_policy: t.image_pull_policy.map(|p| format!("{p:?}")),
            command: t.command.clone(),
            args: t.args.clone(),
            resources: t.resources.clone(),
            env: (!env.is_empty()).then_some(env),
            ..Default::default()
        }],
        image_pull_secrets: t.image_pull_secrets.clone(),
        runtime_class_name: runtime_class(t.runtime_class_name.as_ref(), &defaults.runtime_class),
        ..Default::default()
    };
    harden(&mut pod);
    user_namespace(&mut pod, defaults.user_namespaces);
    if let Some(uid) = defaults.code_interpreter_uid {
        run_as(
            &mut pod,
            uid,
            &picod_workspace(t.args.as_deref().unwrap_or_default()),
        );
    }
    pod
}

/// Where PicoD keeps its workspace in a CodeInterpreter's container: its `--workspace`
/// argument, else its image's working directory (`/root` in upstream's image and ours).
fn picod_workspace(args: &[String]) -> String {
    let mut args = args.iter();
    while let Some(a) = args.next() {
        if let Some(w) = a.strip_prefix("--workspace=") {
            return w.to_string();
        }
        if a == "--workspace"
            && let Some(w) = args.next()
        {
            return w.clone();
        }
    }
    "/root".to_string()
}

/// A CodeInterpreter pod run as `uid`, not root: `runAsNonRoot`, so it passes Pod Security
/// `restricted` (its containers already have what else that asks, [`harden`]); its workspace
/// an `emptyDir` (the image's is root's), group-owned by `uid` (`fsGroup`); `HOME` the
/// workspace unless the definition sets one (a uid without a passwd entry gets `/`), so that
/// `pip install --user` works.
fn run_as(pod: &mut PodSpec, uid: i64, workspace: &str) {
    pod.security_context = Some(PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(uid),
        run_as_group: Some(uid),
        fs_group: Some(uid),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            localhost_profile: None,
        }),
        ..Default::default()
    });
    pod.volumes.get_or_insert_with(Vec::new).push(Volume {
        name: WORKSPACE_VOLUME.into(),
        empty_dir: Some(Default::default()),
        ..Default::default()
    });
    for c in &mut pod.containers {
        c.volume_mounts
            .get_or_insert_with(Vec::new)
            .push(VolumeMount {
                name: WORKSPACE_VOLUME.into(),
                mount_path: workspace.into(),
                ..Default::default()
            });
        let env = c.env.get_or_insert_with(Vec::new);
        if !env.iter().any(|e| e.name == "HOME") {
            env.push(EnvVar {
                name: "HOME".into(),
                value: Some(workspace.into()),
                ..Default::default()
            });
        }
    }
}

/// The `emptyDir` a CodeInterpreter run as a uid keeps its workspace on.
const WORKSPACE_VOLUME: &str = "workspace";

/// The Sandbox for a CodeInterpreter session without a warm pool.
pub fn code_interpreter_sandbox(ci: &CodeInterpreter, s: &SessionInfo<'_>) -> Sandbox {
    let pod = code_interpreter_pod(
        ci,
        labels::CODE_INTERPRETER_CONTAINER,
        s.public_key,
        s.pod_defaults,
    );
    sandbox(
        WorkloadKind::CodeInterpreter,
        ci.metadata.name.as_deref().unwrap_or_default(),
        &ci.spec.session_timeout.to_string(),
        s,
        pod,
        ci.spec.template.labels.clone(),
        ci.spec.template.annotations.clone(),
    )
}

fn sandbox(
    kind: WorkloadKind,
    workload: &str,
    idle_timeout: &str,
    s: &SessionInfo<'_>,
    pod: PodSpec,
    template_labels: Option<BTreeMap<String, String>>,
    template_annotations: Option<BTreeMap<String, String>>,
) -> Sandbox {
    let labels_ = BTreeMap::from([
        (labels::WORKLOAD_NAME.to_string(), workload.to_string()),
        (
            labels::MANAGED_BY.to_string(),
            labels::MANAGED_BY_VALUE.to_string(),
        ),
    ]);
    let mut pod_labels = template_labels.unwrap_or_default();
    pod_labels.extend(super::network::pod_labels(kind, workload));
    pod_labels.insert(labels::SESSION_ID.into(), s.session_id.into());
    pod_labels.insert(labels::SANDBOX_NAME.into(), s.name.into());
    let (replicas, operating_mode) = match s.api {
        AgentSandboxApi::V1alpha1 => (Some(1), None),
        AgentSandboxApi::V1beta1 => (None, Some("Running".to_string())),
    };
    Sandbox::new(
        s.api,
        session_meta(s, idle_timeout, labels_),
        SandboxSpec {
            pod_template: PodTemplate {
                metadata: Some(PodMetadata {
                    labels: Some(pod_labels),
                    annotations: template_annotations,
                }),
                spec: pod,
            },
            replicas,
            operating_mode,
            shutdown_time: s.shutdown_time.map(Time),
            // On v1beta1 an expired Sandbox is deleted, as a claim is, rather than kept as an
            // object saying `SandboxExpired` (its default, `Retain`) until the GC gets to it.
            shutdown_policy: (s.api == AgentSandboxApi::V1beta1 && s.shutdown_time.is_some())
                .then(|| "Delete".to_string()),
            extra: Default::default(),
        },
    )
}

fn owner_ref(ci: &CodeInterpreter, controller: bool) -> OwnerReference {
    OwnerReference {
        api_version: "runtime.agentcube.volcano.sh/v1alpha1".into(),
        kind: "CodeInterpreter".into(),
        name: ci.metadata.name.clone().unwrap_or_default(),
        uid: ci.metadata.uid.clone().unwrap_or_default(),
        controller: controller.then_some(true),
        block_owner_deletion: controller.then_some(true),
    }
}

/// The SandboxClaim for a CodeInterpreter session served from its warm pool (the pool and its
/// template are named like the CodeInterpreter). v1alpha1 names the template; v1beta1 names the
/// pool and sets the claim's `lifecycle.shutdownTime` to the session's end with policy `Delete`,
/// so agent-sandbox removes the sandbox at `maxSessionDuration` even if no Workload Manager is
/// left to do it.
pub fn code_interpreter_claim(ci: &CodeInterpreter, s: &SessionInfo<'_>) -> SandboxClaim {
    let labels_ = BTreeMap::from([(labels::SANDBOX_NAME.to_string(), s.name.to_string())]);
    let mut metadata = session_meta(s, &ci.spec.session_timeout.to_string(), labels_);
    // Upstream: an owner reference to the CodeInterpreter, not a controller one.
    metadata.owner_references = Some(vec![owner_ref(ci, false)]);
    let pool = NameRef {
        name: ci.metadata.name.clone().unwrap_or_default(),
    };
    let spec = match s.api {
        AgentSandboxApi::V1alpha1 => SandboxClaimSpec {
            sandbox_template_ref: Some(pool),
            ..Default::default()
        },
        AgentSandboxApi::V1beta1 => SandboxClaimSpec {
            warm_pool_ref: Some(pool),
            lifecycle: Some(ClaimLifecycle {
                shutdown_time: s.shutdown_time.map(Time),
                shutdown_policy: Some("Delete".into()),
                extra: Default::default(),
            }),
            ..Default::default()
        },
    };
    SandboxClaim::new(s.api, metadata, spec)
}

/// Stamps agent-sandbox's first-observed annotation ([`labels::FIRST_OBSERVED`]) on a claim about
/// to be created, with `at` (the create's time): agent-sandbox patches it onto every claim that
/// lacks it before adopting a warm Sandbox, so a claim created with it reaches its Sandbox one API
/// write sooner. agent-sandbox's controller-latency metric then counts from the create.
pub fn stamp_observed(claim: &mut SandboxClaim, at: jiff::Timestamp) {
    claim
        .metadata
        .annotations
        .get_or_insert_with(Default::default)
        .insert(labels::FIRST_OBSERVED.to_string(), at.to_string());
}

/// A standby claim (extension, `--standby-claims`): a SandboxClaim on the CodeInterpreter's warm
/// pool made ahead of demand, so agent-sandbox binds it to a warm Sandbox before any session
/// asks. Labelled [`labels::STANDBY`] with the definition's name instead of a session id (start-up
/// reconciliation and GC look only at session-labelled objects), annotated with the
/// definition's generation, owned like a session's claim, and without `shutdownTime`: it gets
/// the session's when [`standby_handout`] gives it to one. v1beta1 only.
pub fn standby_claim(api: AgentSandboxApi, ci: &CodeInterpreter, name: &str) -> SandboxClaim {
    let definition = ci.metadata.name.clone().unwrap_or_default();
    let metadata = ObjectMeta {
        name: Some(name.into()),
        namespace: ci.metadata.namespace.clone(),
        labels: Some(BTreeMap::from([
            (labels::SANDBOX_NAME.to_string(), name.to_string()),
            (labels::STANDBY.to_string(), definition.clone()),
        ])),
        annotations: Some(BTreeMap::from([(
            labels::STANDBY_GENERATION.to_string(),
            ci.metadata.generation.unwrap_or_default().to_string(),
        )])),
        owner_references: Some(vec![owner_ref(ci, false)]),
        ..Default::default()
    };
    let spec = SandboxClaimSpec {
        warm_pool_ref: Some(NameRef { name: definition }),
        lifecycle: Some(ClaimLifecycle {
            shutdown_time: None,
            shutdown_policy: Some("Delete".into()),
            extra: Default::default(),
        }),
        ..Default::default()
    };
    SandboxClaim::new(api, metadata, spec)
}

/// The JSON merge patch that gives a standby claim to session `s`: the session's labels and
/// annotations exactly as [`code_interpreter_claim`] sets them, the standby label and
/// generation removed, the session's `shutdownTime`. Sent by whoever won the claim's mark
/// (`standby::marks`), which is what keeps two creates from handing out the same claim.
pub fn standby_handout(ci: &CodeInterpreter, s: &SessionInfo<'_>) -> serde_json::Value {
    let meta = session_meta(s, &ci.spec.session_timeout.to_string(), BTreeMap::new());
    let mut labels_ = serde_json::to_value(meta.labels.unwrap_or_default()).unwrap_or_default();
    labels_[labels::STANDBY] = serde_json::Value::Null;
    let mut annotations =
        serde_json::to_value(meta.annotations.unwrap_or_default()).unwrap_or_default();
    annotations[labels::STANDBY_GENERATION] = serde_json::Value::Null;
    let mut patch = serde_json::json!({
        "metadata": {
            "labels": labels_,
            "annotations": annotations,
        }
    });
    if let Some(t) = s.shutdown_time {
        patch["spec"] = serde_json::json!({"lifecycle": {"shutdownTime": Time(t)}});
    }
    patch
}

/// The SandboxTemplate kept for a CodeInterpreter with a warm pool (named like it).
pub fn sandbox_template(
    api: AgentSandboxApi,
    ci: &CodeInterpreter,
    public_key: Option<&str>,
    defaults: &PodDefaults,
) -> SandboxTemplate {
    // Upstream injects the key unless authMode is none (the same as `== picod` after defaulting).
    let pod = code_interpreter_pod(ci, labels::TEMPLATE_CONTAINER, public_key, defaults);
    SandboxTemplate::new(
        api,
        pool_meta(ci),
        SandboxTemplateSpec {
            // Template labels/annotations are not copied here, as upstream; the definition's
            // labels are (what its NetworkPolicy selects).
            pod_template: PodTemplate {
                metadata: Some(PodMetadata {
                    labels: Some(super::network::pod_labels(
                        WorkloadKind::CodeInterpreter,
                        ci.metadata.name.as_deref().unwrap_or_default(),
                    )),
                    annotations: None,
                }),
                spec: pod,
            },
            network_policy_management: Some("Unmanaged".into()),
            extra: Default::default(),
        },
    )
}

/// Metadata of a CodeInterpreter's SandboxTemplate and SandboxWarmPool: named like it, owned
/// by it.
fn pool_meta(ci: &CodeInterpreter) -> ObjectMeta {
    ObjectMeta {
        name: ci.metadata.name.clone(),
        namespace: ci.metadata.namespace.clone(),
        owner_references: Some(vec![owner_ref(ci, true)]),
        ..Default::default()
    }
}

/// How many of a CodeInterpreter's `warmPoolSize` warm Sandboxes are held by standby claims
/// when there are `per_pool` standby claims per warm pool.
pub fn standby_share(per_pool: u32, ci: &CodeInterpreter) -> u32 {
    per_pool.min(ci.spec.warm_pool())
}

/// The SandboxWarmPool of a CodeInterpreter (named like it): `warmPoolSize` members, less those
/// `standby_per_pool` standby claims hold ([`standby_share`]), so a definition keeps
/// `warmPoolSize` warm Sandboxes whichever way they wait. On v1beta1 a changed template replaces
/// the unclaimed members at once (`Recreate`): the next session runs what the CodeInterpreter
/// says now, not what it said when its warm sandbox started.
pub fn warm_pool(
    api: AgentSandboxApi,
    ci: &CodeInterpreter,
    standby_per_pool: u32,
) -> SandboxWarmPool {
    let replicas = ci.spec.warm_pool() - standby_share(standby_per_pool, ci);
    SandboxWarmPool::new(
        api,
        pool_meta(ci),
        SandboxWarmPoolSpec {
            replicas: i32::try_from(replicas).unwrap_or(i32::MAX),
            sandbox_template_ref: NameRef {
                name: ci.metadata.name.clone().unwrap_or_default(),
            },
            update_strategy: (api == AgentSandboxApi::V1beta1).then(|| WarmPoolUpdateStrategy {
                type_: "Recreate".into(),
            }),
            extra: Default::default(),
        },
    )
}

#[cfg(test)]
mod tests;
