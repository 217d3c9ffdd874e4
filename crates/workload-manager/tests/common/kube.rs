//! A Workload Manager on the Kubernetes backend against a real control plane (kube-apiserver,
//! controller-manager, scheduler, the agent-sandbox controller; `agentcube-test-cluster`) whose
//! process kubelet runs the pods — real PicoD processes on 127.x pod IPs.
//!
//! One cluster per test process, shared: a test holds [`KubeStack`] (and with it a process-wide
//! lock) from start to end, and [`KubeStack::start`] first clears what an earlier test left in
//! the namespaces used here, so tests run one at a time against a clean cluster.

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use agentcube_crds::sandbox::AgentSandboxApi;
use agentcube_store::SessionStore;
use agentcube_test_cluster::Shared;
use agentcube_workload_manager::backend::kubernetes::{KubeConfig, KubernetesBackend};
use agentcube_workload_manager::{Config, WorkloadManager};
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret};
use kube::api::{Api, DeleteParams, DynamicObject, GroupVersionKind, ListParams, PostParams};
use serde_json::{Value, json};

use super::{ROUTER_KEY, ROUTER_PUB, picod_binary};

/// Namespace of the Workload Manager (and of the Router's identity Secret) in these tests.
pub const SYSTEM_NS: &str = "agentcube";
/// The agent-sandbox version the test cluster serves (v1.0.x).
pub const API: AgentSandboxApi = AgentSandboxApi::V1beta1;

static LOCK: LazyLock<Arc<tokio::sync::Mutex<()>>> = LazyLock::new(Default::default);

/// The test process's cluster.
pub fn cluster() -> &'static Shared {
    agentcube_test_cluster::shared(picod_binary().parent().unwrap())
}

pub struct KubeStack {
    pub client: kube::Client,
    /// How many audit events the API server had logged when this test's objects did not exist
    /// yet: the test's own requests come after.
    pub audit_start: usize,
    pub url: String,
    pub store: Arc<dyn SessionStore>,
    pub wm: Option<WorkloadManager>,
    pub http: reqwest::Client,
    serve: tokio::task::JoinHandle<()>,
    _exclusive: tokio::sync::OwnedMutexGuard<()>,
}

pub struct KubeOptions {
    /// Create Secret `picod-router-identity` (with the test key) before the Workload Manager starts.
    pub identity_secret: bool,
    pub create_timeout: Duration,
    pub gc_interval: Duration,
    pub runtime_class: String,
    /// CRs (YAML documents) applied before the Workload Manager starts.
    pub manifests: String,
    /// `--enable-auth` with this admin group (TokenReview against the test API server).
    pub auth_admin_group: Option<String>,
    /// `--standby-claims`.
    pub standby_claims: u32,
    /// `--auth-trusted-callers` (with `auth_admin_group`).
    pub auth_trusted_callers: Vec<String>,
    /// `--code-interpreter-uid`.
    pub code_interpreter_uid: Option<i64>,
    /// `--sandbox-metadata-access`.
    pub metadata_access: bool,
    /// `--sandbox-user-namespaces`.
    pub user_namespaces: bool,
    /// The Workload Manager's own client (default: the test's admin client).
    pub wm_client: Option<kube::Client>,
    /// How long each of its watches lasts (default: the backend's).
    pub watch_timeout: Option<Duration>,
}

impl Default for KubeOptions {
    fn default() -> Self {
        Self {
            identity_secret: true,
            create_timeout: Duration::from_secs(30),
            gc_interval: Duration::from_secs(3600),
            runtime_class: String::new(),
            manifests: String::new(),
            auth_admin_group: None,
            wm_client: None,
            watch_timeout: None,
            standby_claims: 0,
            auth_trusted_callers: Vec::new(),
            code_interpreter_uid: None,
            metadata_access: false,
            user_namespaces: false,
        }
    }
}

pub fn dynamic(
    client: &kube::Client,
    group: &str,
    version: &str,
    kind: &str,
    plural: &str,
    ns: &str,
) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk(group, version, kind);
    Api::namespaced_with(
        client.clone(),
        ns,
        &kube::api::ApiResource::from_gvk_with_plural(&gvk, plural),
    )
}

fn agent_sandbox(c: &kube::Client, group: &str, kind: &str, plural: &str) -> Api<DynamicObject> {
    dynamic(c, group, API.version(), kind, plural, "default")
}

pub fn sandboxes(c: &kube::Client) -> Api<DynamicObject> {
    agent_sandbox(c, "agents.x-k8s.io", "Sandbox", "sandboxes")
}

pub fn claims(c: &kube::Client) -> Api<DynamicObject> {
    agent_sandbox(
        c,
        "extensions.agents.x-k8s.io",
        "SandboxClaim",
        "sandboxclaims",
    )
}

pub fn templates(c: &kube::Client) -> Api<DynamicObject> {
    agent_sandbox(
        c,
        "extensions.agents.x-k8s.io",
        "SandboxTemplate",
        "sandboxtemplates",
    )
}

pub fn pools(c: &kube::Client) -> Api<DynamicObject> {
    agent_sandbox(
        c,
        "extensions.agents.x-k8s.io",
        "SandboxWarmPool",
        "sandboxwarmpools",
    )
}

fn definitions(c: &kube::Client, kind: &str, ns: &str) -> Api<DynamicObject> {
    let plural = format!("{}s", kind.to_lowercase());
    dynamic(
        c,
        "runtime.agentcube.volcano.sh",
        "v1alpha1",
        kind,
        &plural,
        ns,
    )
}

pub fn code_interpreters(c: &kube::Client) -> Api<DynamicObject> {
    definitions(c, "CodeInterpreter", "default")
}

/// The unclaimed Sandboxes of warm pool `pool`: those it controls (agent-sandbox v1beta1 labels
/// members with a hash of the pool's name; ownership is the reliable mark).
pub async fn pool_members(c: &kube::Client, pool: &str) -> Vec<DynamicObject> {
    let all = sandboxes(c)
        .list(&ListParams::default())
        .await
        .unwrap()
        .items;
    all.into_iter()
        .filter(|s| {
            s.metadata.owner_references.iter().flatten().any(|o| {
                o.controller == Some(true) && o.kind == "SandboxWarmPool" && o.name == pool
            })
        })
        .collect()
}

/// Whether no Sandbox is left in `default`.
pub async fn no_sandboxes(c: &kube::Client) -> bool {
    sandboxes(c)
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .is_empty()
}

/// Creates the CRs in `yaml` (CodeInterpreter / AgentRuntime documents).
pub async fn apply(client: &kube::Client, yaml: &str) {
    for doc in serde_yaml::Deserializer::from_str(yaml) {
        let v: Value = serde::Deserialize::deserialize(doc).unwrap();
        if v.is_null() {
            continue;
        }
        let kind = v["kind"].as_str().unwrap();
        assert!(
            ["CodeInterpreter", "AgentRuntime"].contains(&kind),
            "unexpected kind {kind}"
        );
        let ns = v["metadata"]["namespace"].as_str().unwrap_or("default");
        definitions(client, kind, ns)
            .create(&PostParams::default(), &serde_json::from_value(v).unwrap())
            .await
            .unwrap();
    }
}

/// Secret `picod-router-identity` as the Router creates it (PKCS#1 private, SPKI public).
pub async fn create_identity_secret(client: &kube::Client, private: &str, public: &str) {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), SYSTEM_NS);
    let s = serde_json::from_value(json!({"metadata": {"name": "picod-router-identity",
        "labels": {"app": "agentcube", "component": "router"}},
        "type": "Opaque", "stringData": {"private.pem": private, "public.pem": public}}))
    .unwrap();
    secrets.create(&PostParams::default(), &s).await.unwrap();
}

/// The label that sets a namespace's enforced Pod Security level.
pub const POD_SECURITY_ENFORCE: &str = "pod-security.kubernetes.io/enforce";

/// Sets (or with `None` removes) label `key` of namespace `ns`.
pub async fn label_namespace(client: &kube::Client, ns: &str, key: &str, value: Option<&str>) {
    Api::<Namespace>::all(client.clone())
        .patch(
            ns,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"metadata": {"labels": {key: value}}})),
        )
        .await
        .unwrap();
}

/// Deletes what a test may have left (definitions, agent-sandbox objects, the identity Secret)
/// and waits until no pod is left in `default`.
async fn clean(client: &kube::Client) {
    let _ = Api::<Namespace>::all(client.clone())
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": SYSTEM_NS}})).unwrap(),
        )
        .await;
    let dp = DeleteParams::background();
    let lp = ListParams::default();
    for api in [
        definitions(client, "CodeInterpreter", "default"),
        definitions(client, "AgentRuntime", "default"),
        claims(client),
        pools(client),
        templates(client),
        sandboxes(client),
    ] {
        api.delete_collection(&dp, &lp).await.unwrap();
    }
    let _ = Api::<Secret>::namespaced(client.clone(), SYSTEM_NS)
        .delete("picod-router-identity", &dp)
        .await;
    // What a test may have put on `default` to make the API server refuse pods.
    Api::<k8s_openapi::api::core::v1::ResourceQuota>::namespaced(client.clone(), "default")
        .delete_collection(&dp, &lp)
        .await
        .unwrap();
    label_namespace(client, "default", POD_SECURITY_ENFORCE, None).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let left = pods.list(&lp).await.unwrap().items.len();
        let sbs = sandboxes(client).list(&lp).await.unwrap().items.len();
        if left == 0 && sbs == 0 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the previous test's {left} pods / {sbs} sandboxes are not going away"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

impl KubeStack {
    pub async fn start(opts: KubeOptions) -> Self {
        let exclusive = LOCK.clone().lock_owned().await;
        let client = cluster().client().await;
        clean(&client).await;
        let audit_start = cluster().audit_events().len();
        if opts.identity_secret {
            create_identity_secret(&client, ROUTER_KEY, ROUTER_PUB).await;
        }
        if !opts.runtime_class.is_empty() {
            // The API server refuses pods naming a RuntimeClass that does not exist (the
            // process kubelet runs every class the same way).
            let _ = Api::<k8s_openapi::api::node::v1::RuntimeClass>::all(client.clone())
                .create(
                    &PostParams::default(),
                    &serde_json::from_value(json!({
                        "metadata": {"name": opts.runtime_class}, "handler": opts.runtime_class
                    }))
                    .unwrap(),
                )
                .await;
        }
        apply(&client, &opts.manifests).await;
        let mut kc = KubeConfig::new(SYSTEM_NS);
        kc.pod_defaults.runtime_class = opts.runtime_class;
        kc.pod_defaults.code_interpreter_uid = opts.code_interpreter_uid;
        kc.metadata_access = opts.metadata_access;
        kc.pod_defaults.user_namespaces = opts.user_namespaces;
        kc.probe_timeout = Duration::from_secs(5);
        kc.standby_claims = opts.standby_claims;
        kc.watch_timeout = opts.watch_timeout.unwrap_or(kc.watch_timeout);
        let store: Arc<dyn SessionStore> = Arc::new(agentcube_store::MemoryStore::new());
        let wm_client = opts.wm_client.unwrap_or_else(|| client.clone());
        let backend = KubernetesBackend::start(wm_client.clone(), kc, store.clone())
            .await
            .unwrap();
        assert_eq!(
            backend.api(),
            API,
            "discovery picks what the cluster serves"
        );
        let auth = match opts.auth_admin_group {
            Some(group) => agentcube_workload_manager::auth::CallerAuth::TokenReview(Box::new(
                agentcube_workload_manager::auth::TokenReviewer::new(wm_client, Some(group))
                    .trusting(opts.auth_trusted_callers),
            )),
            None => agentcube_workload_manager::auth::CallerAuth::Off,
        };
        let config = Config {
            gc_interval: opts.gc_interval,
            create_timeout: opts.create_timeout,
            auth: Arc::new(auth),
            ..Config::default()
        };
        let wm = WorkloadManager::start(config, store.clone(), backend.platform())
            .await
            .unwrap();
        let (url, serve) = super::serve_api(&wm).await;
        Self {
            client,
            audit_start,
            url,
            store,
            wm: Some(wm),
            http: reqwest::Client::new(),
            serve,
            _exclusive: exclusive,
        }
    }

    /// Another Workload Manager replica on the same cluster and store, collecting garbage every
    /// `gc_interval` (it serves no API: its background work is the point). Stop it with
    /// `shutdown` (on Kubernetes that deletes nothing).
    pub async fn replica(&self, gc_interval: Duration) -> WorkloadManager {
        let mut kc = KubeConfig::new(SYSTEM_NS);
        kc.probe_timeout = Duration::from_secs(5);
        let backend = KubernetesBackend::start(self.client.clone(), kc, self.store.clone())
            .await
            .unwrap();
        let config = Config {
            gc_interval,
            ..Config::default()
        };
        WorkloadManager::start(config, self.store.clone(), backend.platform())
            .await
            .unwrap()
    }

    /// Fails unless the store holds no session record (a rolled-back create left none).
    pub async fn assert_no_records(&self) {
        let left = self.store.list_expired(jiff::Timestamp::MAX, 10).await;
        assert!(left.unwrap().is_empty(), "no record left");
    }

    /// Whether the record of `session` (a create's answer) is gone from the store.
    pub async fn record_gone(&self, session: &Value) -> bool {
        let id = session["sessionId"].as_str().unwrap();
        matches!(
            self.store.get(id).await,
            Err(agentcube_store::Error::NotFound)
        )
    }

    pub async fn create(&self, kind: &str, name: &str) -> (u16, Value) {
        super::create_session(&self.http, &self.url, kind, name).await
    }

    pub async fn create_ok(&self, kind: &str, name: &str) -> Value {
        let (s, v) = self.create(kind, name).await;
        if s != 200 {
            panic!("create {name}: {s} {v}\n{}", self.dump().await);
        }
        v
    }

    pub async fn delete(&self, id: &str) -> u16 {
        let kind = super::kind_segment(&*self.store, id).await;
        super::delete_session(&self.http, &self.url, &kind, id)
            .await
            .0
    }

    /// The cluster's sandbox-related objects, for failure messages.
    pub async fn dump(&self) -> String {
        let mut out = String::new();
        let pods = dynamic(&self.client, "", "v1", "Pod", "pods", "default");
        for (what, api) in [
            ("sandboxes", sandboxes(&self.client)),
            ("claims", claims(&self.client)),
            ("pools", pools(&self.client)),
            ("pods", pods),
        ] {
            out.push_str(&format!("{what}:\n"));
            for o in api
                .list(&Default::default())
                .await
                .map(|l| l.items)
                .unwrap_or_default()
            {
                out.push_str(&format!(
                    "  {} {}\n",
                    o.metadata.name.unwrap_or_default(),
                    o.data
                        .get("status")
                        .map(Value::to_string)
                        .unwrap_or_default()
                ));
            }
        }
        out
    }

    /// Waits (up to 30 s) until the Workload Manager sees `n` standby claims of warm pool `pool`
    /// ready to be handed out.
    pub async fn standby_ready(&self, pool: &str, n: usize) {
        let pools = self.wm.as_ref().unwrap().pools.clone();
        self.eventually(
            &format!("{n} standby claims of {pool} ready"),
            30,
            async || {
                let levels = pools.levels();
                levels
                    .iter()
                    .any(|l| l.name == pool && l.standby == n)
                    .then_some(())
            },
        )
        .await
    }

    /// Waits (up to `secs`) for `f` to return `Some`.
    pub async fn eventually<T>(
        &self,
        what: &str,
        secs: u64,
        mut f: impl AsyncFnMut() -> Option<T>,
    ) -> T {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(v) = f().await {
                return v;
            }
            if tokio::time::Instant::now() > deadline {
                panic!("timed out waiting for {what}\n{}", self.dump().await);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops the Workload Manager; returns how many pods are still in `default` after their
    /// grace periods (up to 15 s): sessions outlive a Workload Manager, so a test that ended its
    /// sessions expects 0.
    pub async fn stop(mut self) -> usize {
        self.wm.take().unwrap().shutdown().await;
        self.serve.abort();
        let pods = Api::<Pod>::namespaced(self.client.clone(), "default");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            let left = pods.list(&Default::default()).await.unwrap().items.len();
            if left == 0 || tokio::time::Instant::now() > deadline {
                return left;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Runs a command through PicoD at a TCP entry point with a token signed by the test key for the
/// session's sandbox (its pod).
pub async fn exec_tcp(http: &reqwest::Client, session: &Value, argv: &[&str]) -> (u16, Value) {
    let ep = session["entryPoints"][0]["endpoint"].as_str().unwrap();
    let aud = session["sandboxIdentity"].as_str().unwrap();
    let r = http
        .post(format!("http://{ep}/api/execute"))
        .bearer_auth(super::token(aud))
        .json(&json!({"command": argv, "timeout": "20s"}))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// The standby claims of `definition` that are bound to a Ready Sandbox, as (claim, Sandbox).
pub async fn bound_standby(k: &KubeStack, definition: &str) -> Vec<(DynamicObject, DynamicObject)> {
    let lp = ListParams::default().labels(&format!("runtime.agentcube.io/standby={definition}"));
    let mut out = Vec::new();
    for c in claims(&k.client).list(&lp).await.unwrap().items {
        let Some(name) = c.data["status"]["sandbox"]["name"].as_str() else {
            continue;
        };
        if let Some(sb) = sandboxes(&k.client).get_opt(name).await.unwrap()
            && ready(&sb)
        {
            out.push((c, sb));
        }
    }
    out
}

pub fn ready(o: &DynamicObject) -> bool {
    o.data
        .pointer("/status/conditions")
        .and_then(Value::as_array)
        .is_some_and(|cs| {
            cs.iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        })
}
