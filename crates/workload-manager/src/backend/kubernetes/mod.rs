//! The Kubernetes backend: sandboxes are kubernetes-sigs/agent-sandbox objects (spec §2.3–2.8).
//!
//! Main flow of a create ([`KubernetesBackend`] as [`Backend`]):
//! 1. Build the object ([`desired`]): a `Sandbox` for an AgentRuntime or a CodeInterpreter
//!    without warm pool, a `SandboxClaim` for a CodeInterpreter with `warmPoolSize > 0` — unless
//!    `--standby-claims` keeps claims bound ahead of demand: then one of those is handed to the
//!    session by winning its mark in the session store, patched over after the answer
//!    ([`standby`]), and steps 2–3 are already done.
//! 2. Create it, then wait on the one shared watch of that kind ([`watched`]): the claim's
//!    `status.sandbox.name`, then that Sandbox's `Ready=True`.
//! 3. Resolve the pod (annotation `agents.x-k8s.io/pod-name` for adopted pods, else the Sandbox
//!    name); require `Running` and a pod IP; TCP-probe every port ([`probe`]).
//! 4. Answer with entry points `podIP:port`. Any failure, timeout or vanished client makes the
//!    session layer delete the object by kind (rollback).
//!
//! At start the agent-sandbox API version is chosen by discovery ([`discover_api`]): `v1beta1`
//! (agent-sandbox v0.5+, v1.0) when served, else `v1alpha1` (v0.4.x); one set of builders
//! serves both.
//!
//! Alongside: [`sources`] mirrors the CRs into definitions and follows the Router's key Secret;
//! [`controller`] keeps SandboxTemplate + SandboxWarmPool in step with each CodeInterpreter;
//! [`liveness`] ends, at each GC run, sessions whose claim or Sandbox was deleted or whose pod
//! was replaced.
//! Nothing is deleted on shutdown: sessions outlive a Workload Manager restart.

use std::sync::Arc;
use std::time::Duration;

use agentcube_crds::sandbox::{
    AgentSandboxApi, CORE_GROUP, EXTENSIONS_GROUP, Sandbox as SandboxObject, SandboxClaim,
};

use agentcube_types::BackingKind;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams};

use super::{
    Backend, BackendError, Platform, PoolLevel, Sandbox, SandboxRequest, WarmPools, Workload,
};
use crate::definitions::Definitions;
use crate::key::RouterKey;

pub mod client;
pub mod controller;
mod create;
pub mod desired;
mod liveness;
pub mod network;
mod pool_health;
pub mod probe;
pub mod sources;
pub mod standby;
mod stuck;
pub mod watched;

use watched::Watched;

/// Kubernetes backend settings.
#[derive(Debug, Clone)]
pub struct KubeConfig {
    /// Namespace of the Router's identity Secret (`AGENTCUBE_NAMESPACE`).
    pub namespace: String,
    /// What sandbox pods get where their definitions leave it open (`--runtime-class-name`,
    /// `--code-interpreter-uid`).
    pub pod_defaults: desired::PodDefaults,
    /// How long the entry-point probe keeps trying (upstream: 15 s).
    pub probe_timeout: Duration,
    /// The Router key, when given at start instead of followed from the Secret.
    pub fixed_key: Option<String>,
    /// How long to wait for the first lists of the CRDs at start (upstream: 1 min).
    pub sync_timeout: Duration,
    /// How long the API server keeps each watch open before the watch is made anew
    /// ([`watched::config`]).
    pub watch_timeout: Duration,
    /// Labels of the Router's pods (in `namespace`): ingress every definition's NetworkPolicy
    /// allows.
    pub router_pod_labels: std::collections::BTreeMap<String, String>,
    /// Labels of this Workload Manager's pods (in `namespace`): ingress every definition's
    /// NetworkPolicy allows (the port probe before a session is answered).
    pub manager_pod_labels: std::collections::BTreeMap<String, String>,
    /// `--standby-claims`: claims per warm pool bound ahead of demand ([`standby`]; 0: none,
    /// as upstream).
    pub standby_claims: u32,
    /// `--sandbox-metadata-access`: sandboxes without `spec.networkPolicy` may reach the cloud
    /// metadata endpoints (upstream: their egress is not limited at all).
    pub metadata_access: bool,
}

impl KubeConfig {
    /// Upstream's defaults for a namespace.
    pub fn new(namespace: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            pod_defaults: desired::PodDefaults::default(),
            probe_timeout: Duration::from_secs(15),
            fixed_key: None,
            sync_timeout: Duration::from_secs(60),
            watch_timeout: watched::WATCH_TIMEOUT,
            router_pod_labels: [("app".to_string(), "agentcube-router".to_string())].into(),
            manager_pod_labels: [("app".to_string(), "workloadmanager".to_string())].into(),
            standby_claims: 0,
            metadata_access: false,
        }
    }
}

impl From<kube::Error> for BackendError {
    fn from(e: kube::Error) -> Self {
        match e {
            kube::Error::Api(s) if s.code == 429 || s.code >= 500 => {
                Self::Unavailable(format!("Kubernetes API: {}", s.message))
            }
            kube::Error::Api(s) => {
                Self::Failed(format!("Kubernetes API {}: {}", s.code, s.message))
            }
            e if client::is_timeout(&e) => Self::Unavailable(
                "Kubernetes API did not answer in time (it may be overloaded or unreachable)"
                    .into(),
            ),
            other => Self::Unavailable(format!(
                "Kubernetes API unreachable: {}",
                super::error_chain(&other)
            )),
        }
    }
}

/// Why `namespace`/`name` cannot name an object, if so. kube-rs puts names into request paths as
/// they are, and these come from session records, which whoever can write the store wrote: such
/// a name never goes into a request.
fn unusable(namespace: &str, name: &str) -> Option<String> {
    use agentcube_crds::manifest::{invalid_name, invalid_namespace};
    invalid_namespace(namespace).or_else(|| invalid_name(name))
}

/// Sandboxes as agent-sandbox objects.
pub struct KubernetesBackend {
    client: kube::Client,
    /// The agent-sandbox API version in use.
    api: AgentSandboxApi,
    config: KubeConfig,
    sandboxes: Arc<Watched<SandboxObject>>,
    claims: Arc<Watched<SandboxClaim>>,
    definitions: Arc<Definitions>,
    key: RouterKey,
    /// Claims bound ahead of demand, when `--standby-claims` asks for them.
    standby: Option<Arc<standby::Standby>>,
    /// The session store (records read by [`liveness`]).
    store: Arc<dyn agentcube_store::SessionStore>,
    liveness: liveness::Liveness,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for KubernetesBackend {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// The agent-sandbox API version to speak: the newest that both of its API groups serve.
pub async fn discover_api(client: &kube::Client) -> Result<AgentSandboxApi, String> {
    let groups = client
        .list_api_groups()
        .await
        .map_err(|e| format!("API discovery failed: {e}"))?;
    let versions = |name: &str| -> Vec<String> {
        groups
            .groups
            .iter()
            .find(|g| g.name == name)
            .map(|g| g.versions.iter().map(|v| v.version.clone()).collect())
            .unwrap_or_default()
    };
    let (core, extensions) = (versions(CORE_GROUP), versions(EXTENSIONS_GROUP));
    AgentSandboxApi::negotiate(&core, &extensions).ok_or_else(|| {
        format!(
            "agent-sandbox is not installed (or too old/new): API group {CORE_GROUP} serves              {core:?} and {EXTENSIONS_GROUP} serves {extensions:?}; this Workload Manager speaks              v1beta1 (agent-sandbox v0.5+) or v1alpha1 (v0.4.x), core and extensions alike"
        )
    })
}

impl KubernetesBackend {
    /// The platform: these sandboxes, the cluster's CRs as definitions, the followed (or fixed)
    /// Router key, the SandboxWarmPools' levels.
    pub fn platform(self) -> Platform {
        let (definitions, key) = (self.definitions.clone(), self.key.clone());
        let backend = Arc::new(self);
        Platform {
            backend: backend.clone(),
            definitions,
            key,
            pools: backend,
            // Its watches end when the backend is dropped.
            background: Default::default(),
        }
    }

    /// The agent-sandbox API version in use.
    pub fn api(&self) -> AgentSandboxApi {
        self.api
    }

    /// Discovers the agent-sandbox API, starts the watches, the key follower and the
    /// CodeInterpreter controller; returns once the CRD caches hold their first lists. `store`
    /// is the session store (standby claims change hands through marks in it).
    pub async fn start(
        client: kube::Client,
        config: KubeConfig,
        store: Arc<dyn agentcube_store::SessionStore>,
    ) -> Result<Self, String> {
        let api = discover_api(&client).await?;
        tracing::info!(
            api = %api,
            "agent-sandbox API {api} in use ({CORE_GROUP}/{api}, {EXTENSIONS_GROUP}/{api})"
        );
        let definitions = Arc::new(Definitions::with_source(Arc::new(sources::CrSource(
            client.clone(),
        ))));
        let cfg = || watched::config(config.watch_timeout);
        let mut tasks = tokio::time::timeout(
            config.sync_timeout,
            sources::mirror_definitions(client.clone(), definitions.clone(), cfg()),
        )
        .await
        .map_err(|_| {
            format!(
                "CodeInterpreter/AgentRuntime caches did not sync within {:?}: are the CRDs \
                 installed and may this service account list them?",
                config.sync_timeout
            )
        })?;
        let key = match &config.fixed_key {
            Some(pem) => RouterKey::fixed(Some(pem.clone())),
            None => {
                let follow = sources::follow_key(client.clone(), &config.namespace, cfg());
                let (key, task) = tokio::time::timeout(config.sync_timeout, follow)
                    .await
                    .map_err(|_| {
                        format!(
                            "cannot list Secret {} in namespace {}",
                            sources::IDENTITY_SECRET,
                            config.namespace
                        )
                    })?;
                tasks.push(task);
                key
            }
        };
        let peers = network::Peers {
            namespace: config.namespace.clone(),
            router: config.router_pod_labels.clone(),
            manager: config.manager_pod_labels.clone(),
            metadata_access: config.metadata_access,
        };
        let sandboxes = Arc::new(Watched::start_with(
            Api::all_with(client.clone(), &api),
            cfg(),
            api,
        ));
        let ctx = Arc::new(controller::Context {
            client: client.clone(),
            api,
            key: key.clone(),
            pod_defaults: config.pod_defaults.clone(),
            written: Default::default(),
            peers,
            standby_claims: standby::effective(config.standby_claims, api),
            sandboxes: sandboxes.clone(),
            watch: cfg(),
        });
        tasks.push(tokio::spawn(controller::run(ctx.clone())));
        tasks.push(tokio::spawn(controller::run_agent_runtimes(ctx)));
        let claims = Arc::new(Watched::start_with(
            Api::all_with(client.clone(), &api),
            cfg(),
            api,
        ));
        let standby = standby::Standby::start(
            config.standby_claims,
            &client,
            api,
            (&claims, &sandboxes),
            &definitions,
            &key,
            &store,
        );
        let standby = standby.map(|(s, task)| {
            tasks.push(task);
            s
        });
        Ok(Self {
            client,
            api,
            config,
            sandboxes,
            claims,
            definitions,
            key,
            standby,
            store,
            liveness: Default::default(),
            tasks,
        })
    }
}

impl KubernetesBackend {
    /// Ends the sessions whose pod restarted a container since they were known to run (its
    /// Sandbox changed readiness; the pod is read to tell a restart from a readiness blip): the
    /// new container has none of the session's files or processes. Returns their ids. Pods are
    /// read [`crate::gc::TEARDOWN_CONCURRENCY`] at a time: a replica's first run after its start
    /// may have a suspect for each cold-created session it did not make.
    async fn reap_restarted(&self) -> Vec<(String, String)> {
        use futures_util::StreamExt;
        futures_util::stream::iter(self.liveness.suspects())
            .map(|suspect| self.reap_if_restarted(suspect))
            .buffer_unordered(crate::gc::TEARDOWN_CONCURRENCY)
            .filter_map(std::future::ready)
            .collect()
            .await
    }

    /// Sessions made here whose object went before a run first saw it
    /// ([`liveness::Liveness::unseen`]), looked up in the API: `(id, why)` of those gone.
    async fn reap_unseen(
        &self,
        shown: &std::collections::HashSet<String>,
    ) -> Vec<(String, String)> {
        let mut gone = Vec::new();
        for r in self.liveness.unseen(shown, self.store.as_ref()).await {
            let (kind, namespace, name) = (r.kind, &r.sandbox_namespace, &r.name);
            match self.exists(kind, namespace, name).await {
                Ok(true) => {}
                Ok(false) => {
                    let why = liveness::DELETED;
                    tracing::warn!(session_id = r.session_id, %kind, namespace, name, why,
                        "gc: the session's sandbox is gone; ending the session");
                    self.liveness.forget(&r.session_id);
                    gone.push((r.session_id, why.to_string()));
                }
                Err(e) => tracing::warn!(session_id = r.session_id, name, error = %e,
                    "gc: cannot read a session's object"),
            }
        }
        gone
    }

    /// Whether the claim or Sandbox `namespace/name` exists (read from the API, not the caches).
    async fn exists(
        &self,
        kind: BackingKind,
        namespace: &str,
        name: &str,
    ) -> Result<bool, kube::Error> {
        Ok(match kind {
            BackingKind::SandboxClaim => {
                Api::<SandboxClaim>::namespaced_with(self.client.clone(), namespace, &self.api)
                    .get_opt(name)
                    .await?
                    .is_some()
            }
            BackingKind::Sandbox => {
                Api::<SandboxObject>::namespaced_with(self.client.clone(), namespace, &self.api)
                    .get_opt(name)
                    .await?
                    .is_some()
            }
        })
    }

    /// One suspect of [`Self::reap_restarted`]: `Some((id, why))` when it was ended.
    async fn reap_if_restarted(&self, suspect: liveness::Suspect) -> Option<(String, String)> {
        let liveness::Suspect {
            session_id,
            seen,
            since,
        } = suspect;
        let pod = seen.pod.as_ref()?;
        let read_at = jiff::Timestamp::now();
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &seen.namespace);
        let why = match pods.get_opt(pod).await {
            Ok(Some(p)) => stuck::restarted_since(&p, since),
            // Gone: a replaced pod is told by its IP (judge), a deleted one by its object.
            Ok(None) => return None,
            Err(e) => {
                tracing::warn!(session_id, pod, error = %e, "gc: cannot read a pod");
                return None;
            }
        };
        let Some(why) = why else {
            self.liveness.cleared(&session_id, read_at);
            return None;
        };
        tracing::warn!(session_id, kind = %seen.kind, namespace = seen.namespace,
            name = seen.name, pod, why, "gc: the session's sandbox restarted and lost its \
            files and processes; ending the session");
        if let Err(e) = self.delete(seen.kind, &seen.namespace, &seen.name).await {
            tracing::warn!(session_id, name = seen.name, error = %e, "gc: cannot delete it");
            return None;
        }
        Some((session_id, format!("its sandbox's {why}")))
    }

    /// Makes (or claims) the sandbox of a session and waits until it answers.
    async fn make(&self, req: &SandboxRequest) -> Result<Sandbox, BackendError> {
        let definition = req.workload.name();
        if definition.len() > 63 {
            // It is a label value on every pod (and what the definition's NetworkPolicy selects).
            return Err(BackendError::Invalid(format!(
                "definition name {definition:?} is {} characters; on Kubernetes a definition \
                 name must fit a label value (63): rename it",
                definition.len()
            )));
        }
        let info = desired::SessionInfo {
            api: self.api,
            session_id: &req.session_id,
            name: &req.name,
            namespace: &req.namespace,
            owner: req.owner.as_deref(),
            shutdown_time: req.shutdown_time,
            public_key: req.public_key.as_deref(),
            pod_defaults: &self.config.pod_defaults,
        };
        let ports = req.workload.ports();
        let sandbox = match &req.workload {
            Workload::CodeInterpreter(ci) if uses_claim(&req.workload) => {
                if let Some(standby) = &self.standby {
                    match standby.take(self, ci, &info, &ports).await {
                        Ok(Some(sandbox)) => return Ok(sandbox),
                        Ok(None) => {}
                        Err(e) => tracing::warn!(error = %e, "cannot take a standby claim"),
                    }
                }
                let claim = desired::code_interpreter_claim(ci, &info);
                return self.create_claim(&req.namespace, claim, &ports).await;
            }
            Workload::CodeInterpreter(ci) => desired::code_interpreter_sandbox(ci, &info),
            Workload::AgentRuntime(ar) => desired::agent_runtime_sandbox(ar, &info),
        };
        self.create_sandbox(&req.namespace, sandbox, &ports).await
    }

    /// Objects of kind `K` made for a session (label `runtime.agentcube.io/session-id`) whose
    /// session is not in `live`, as (namespace, name).
    async fn orphans_of<K>(&self, live: &std::collections::HashSet<String>) -> Vec<(String, String)>
    where
        K: kube::Resource<Scope = kube::core::DynamicResourceScope, DynamicType = AgentSandboxApi>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug,
    {
        let lp = kube::api::ListParams::default().labels(agentcube_crds::labels::SESSION_ID);
        let list = match Api::<K>::all_with(self.client.clone(), &self.api)
            .list(&lp)
            .await
        {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "reconcile: cannot list session objects");
                return Vec::new();
            }
        };
        list.items
            .into_iter()
            .filter_map(|o| {
                let meta = o.meta();
                let session = meta
                    .labels
                    .as_ref()?
                    .get(agentcube_crds::labels::SESSION_ID)?;
                if live.contains(session) {
                    return None;
                }
                Some((meta.namespace.clone()?, meta.name.clone()?))
            })
            .collect()
    }
}

fn uses_claim(w: &Workload) -> bool {
    matches!(w, Workload::CodeInterpreter(ci) if ci.spec.warm_pool() > 0)
}

#[async_trait::async_trait]
impl Backend for KubernetesBackend {
    async fn create(&self, req: &SandboxRequest) -> Result<Sandbox, BackendError> {
        let sandbox = self.make(req).await?;
        self.liveness
            .created(&req.session_id, jiff::Timestamp::now());
        Ok(sandbox)
    }

    fn stalled(&self, req: &SandboxRequest) -> Option<String> {
        Some(self.stalled_on(&req.namespace, &req.name))
    }

    fn backing_kind(&self, workload: &Workload) -> BackingKind {
        if uses_claim(workload) {
            BackingKind::SandboxClaim
        } else {
            BackingKind::Sandbox
        }
    }

    async fn delete(
        &self,
        kind: BackingKind,
        namespace: &str,
        name: &str,
    ) -> Result<(), BackendError> {
        if let Some(why) = unusable(namespace, name) {
            // Nothing by that name can exist: there is nothing to delete.
            tracing::warn!(%kind, namespace, name, why, "not deleting: not an object's name");
            return Ok(());
        }
        let dp = DeleteParams::background();
        let result = match kind {
            BackingKind::SandboxClaim => {
                Api::<SandboxClaim>::namespaced_with(self.client.clone(), namespace, &self.api)
                    .delete(name, &dp)
                    .await
                    .map(|_| ())
            }
            BackingKind::Sandbox => {
                Api::<SandboxObject>::namespaced_with(self.client.clone(), namespace, &self.api)
                    .delete(name, &dp)
                    .await
                    .map(|_| ())
            }
        };
        match result {
            Ok(()) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    async fn sandbox_exists(&self, record: &agentcube_types::SessionRecord) -> Option<bool> {
        // A local backend's record (Unix-socket entry points) in a shared store is not ours.
        if record
            .entry_points()
            .iter()
            .any(|e| e.endpoint.starts_with("unix:"))
        {
            return None;
        }
        let ns = &record.sandbox_namespace;
        if unusable(ns, &record.name).is_some() {
            return Some(false);
        }
        let found = match record.kind {
            BackingKind::SandboxClaim => {
                Api::<SandboxClaim>::namespaced_with(self.client.clone(), ns, &self.api)
                    .get_opt(&record.name)
                    .await
                    .map(|o| o.is_some())
            }
            BackingKind::Sandbox => {
                Api::<SandboxObject>::namespaced_with(self.client.clone(), ns, &self.api)
                    .get_opt(&record.name)
                    .await
                    .map(|o| o.is_some())
            }
        };
        found
            .inspect_err(|e| tracing::warn!(error = %e, "reconcile: cannot look a sandbox up"))
            .ok()
    }

    async fn delete_orphans(&self, live: &std::collections::HashSet<String>) -> usize {
        let claims = self.orphans_of::<SandboxClaim>(live).await;
        let sandboxes = self.orphans_of::<SandboxObject>(live).await;
        let mut deleted = 0;
        for (kind, list) in [
            (BackingKind::SandboxClaim, claims),
            (BackingKind::Sandbox, sandboxes),
        ] {
            for (ns, name) in list {
                match self.delete(kind, &ns, &name).await {
                    Ok(()) => deleted += 1,
                    Err(e) => {
                        tracing::warn!(%kind, ns, name, error = %e, "reconcile: cannot delete an orphan")
                    }
                }
            }
        }
        deleted
    }

    fn sessions(&self) -> Vec<(String, BackingKind, String, String)> {
        self.liveness.sessions()
    }

    /// Sessions whose claim or Sandbox was deleted, or whose pod was replaced ([`liveness`]);
    /// the latter's objects are deleted here.
    async fn reap(&self) -> Vec<(String, String)> {
        let now = liveness::observe(&self.claims, &self.sandboxes);
        let shown = now.keys().cloned().collect();
        let mut sessions = Vec::new();
        for dead in self.liveness.judge(now, self.store.as_ref()).await {
            let liveness::Dead {
                session_id,
                seen,
                why,
                delete,
            } = dead;
            tracing::warn!(session_id, kind = %seen.kind, namespace = seen.namespace,
                name = seen.name, why, "gc: the session's sandbox is gone; ending the session");
            if delete && let Err(e) = self.delete(seen.kind, &seen.namespace, &seen.name).await {
                tracing::warn!(session_id, name = seen.name, error = %e, "gc: cannot delete it");
                continue;
            }
            sessions.push((session_id, why.to_string()));
        }
        sessions.extend(self.reap_unseen(&shown).await);
        sessions.extend(self.reap_restarted().await);
        sessions
    }

    async fn shutdown(&self) {}
}

/// Warm pools are SandboxWarmPools kept by the controller; levels come from the Sandbox watch.
impl WarmPools for KubernetesBackend {
    fn levels(&self) -> Vec<PoolLevel> {
        let members = self.sandboxes.all();
        self.definitions
            .code_interpreters()
            .into_iter()
            .filter(|ci| ci.spec.warm_pool() > 0)
            .map(|ci| {
                let ns = ci
                    .metadata
                    .namespace
                    .clone()
                    .unwrap_or_else(|| "default".into());
                let name = ci.metadata.name.clone().unwrap_or_default();
                let ready = members
                    .iter()
                    .filter(|s| {
                        s.metadata.namespace.as_deref() == Some(ns.as_str())
                            && s.warm_pool() == Some(name.as_str())
                            && s.is_ready()
                    })
                    .count();
                let standby = self.standby.as_ref().map_or(0, |s| s.usable(&ci).len());
                PoolLevel {
                    namespace: ns,
                    name,
                    ready,
                    size: ci.spec.warm_pool(),
                    standby,
                    failing: None,
                }
            })
            .collect()
    }
}
