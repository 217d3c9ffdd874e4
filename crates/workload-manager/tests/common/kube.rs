//! A Workload Manager on the Kubernetes backend against the fake API server, with the simulated
//! agent-sandbox controller and kubelet running real PicoD processes.

use std::sync::Arc;
use std::time::Duration;

use agentcube_fake_kube::FakeApiServer;
use agentcube_fake_kube::sim::{SimConfig, Simulation};
use agentcube_store::SessionStore;
use agentcube_workload_manager::backend::kubernetes::{KubeConfig, KubernetesBackend};
use agentcube_workload_manager::{Config, WorkloadManager};
use kube::api::{Api, DynamicObject, GroupVersionKind, PostParams};
use serde_json::{Value, json};

use super::{ROUTER_KEY, ROUTER_PUB, picod_binary};

/// Namespace of the Workload Manager (and of the Router's identity Secret) in these tests.
pub const SYSTEM_NS: &str = "agentcube";

pub struct KubeStack {
    pub server: FakeApiServer,
    pub sim: Option<Simulation>,
    pub client: kube::Client,
    pub url: String,
    pub store: Arc<dyn SessionStore>,
    pub wm: Option<WorkloadManager>,
    pub http: reqwest::Client,
    pub dir: tempfile::TempDir,
    serve: tokio::task::JoinHandle<()>,
}

pub struct KubeOptions {
    /// Create Secret `picod-router-identity` (with the test key) before the Workload Manager starts.
    pub identity_secret: bool,
    pub create_timeout: Duration,
    pub gc_interval: Duration,
    pub runtime_class: String,
    /// CRs (YAML documents) applied before the Workload Manager starts.
    pub manifests: String,
}

impl Default for KubeOptions {
    fn default() -> Self {
        Self {
            identity_secret: true,
            create_timeout: Duration::from_secs(30),
            gc_interval: Duration::from_secs(3600),
            runtime_class: String::new(),
            manifests: String::new(),
        }
    }
}

pub fn dynamic(
    client: &kube::Client,
    group: &str,
    kind: &str,
    plural: &str,
    ns: &str,
) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk(group, "v1alpha1", kind);
    Api::namespaced_with(
        client.clone(),
        ns,
        &kube::api::ApiResource::from_gvk_with_plural(&gvk, plural),
    )
}

pub fn sandboxes(c: &kube::Client) -> Api<DynamicObject> {
    dynamic(c, "agents.x-k8s.io", "Sandbox", "sandboxes", "default")
}

pub fn claims(c: &kube::Client) -> Api<DynamicObject> {
    dynamic(
        c,
        "extensions.agents.x-k8s.io",
        "SandboxClaim",
        "sandboxclaims",
        "default",
    )
}

pub fn templates(c: &kube::Client) -> Api<DynamicObject> {
    dynamic(
        c,
        "extensions.agents.x-k8s.io",
        "SandboxTemplate",
        "sandboxtemplates",
        "default",
    )
}

pub fn pools(c: &kube::Client) -> Api<DynamicObject> {
    dynamic(
        c,
        "extensions.agents.x-k8s.io",
        "SandboxWarmPool",
        "sandboxwarmpools",
        "default",
    )
}

pub fn code_interpreters(c: &kube::Client) -> Api<DynamicObject> {
    dynamic(
        c,
        "runtime.agentcube.volcano.sh",
        "CodeInterpreter",
        "codeinterpreters",
        "default",
    )
}

/// The Sandboxes of warm pool `pool` (agent-sandbox's member label).
pub async fn pool_members(c: &kube::Client, pool: &str) -> Vec<DynamicObject> {
    let lp = kube::api::ListParams::default()
        .labels(&format!("agents.x-k8s.io/warm-pool-sandbox={pool}"));
    sandboxes(c).list(&lp).await.unwrap().items
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
        let (kind, plural) = match v["kind"].as_str().unwrap() {
            "CodeInterpreter" => ("CodeInterpreter", "codeinterpreters"),
            "AgentRuntime" => ("AgentRuntime", "agentruntimes"),
            other => panic!("unexpected kind {other}"),
        };
        let ns = v["metadata"]["namespace"].as_str().unwrap_or("default");
        let api = dynamic(client, "runtime.agentcube.volcano.sh", kind, plural, ns);
        api.create(&PostParams::default(), &serde_json::from_value(v).unwrap())
            .await
            .unwrap();
    }
}

/// Secret `picod-router-identity` as the Router creates it (PKCS#1 private, SPKI public).
pub async fn create_identity_secret(client: &kube::Client, private: &str, public: &str) {
    let secrets: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(client.clone(), SYSTEM_NS);
    let s = serde_json::from_value(json!({"metadata": {"name": "picod-router-identity",
        "labels": {"app": "agentcube", "component": "router"}},
        "type": "Opaque", "stringData": {"private.pem": private, "public.pem": public}}))
    .unwrap();
    secrets.create(&PostParams::default(), &s).await.unwrap();
}

impl KubeStack {
    pub async fn start(opts: KubeOptions) -> Self {
        let server = FakeApiServer::start().await;
        let dir = tempfile::tempdir().unwrap();
        let sim = Simulation::start(
            server.cluster.clone(),
            SimConfig {
                picod: picod_binary(),
                state_dir: dir.path().to_path_buf(),
                bwrap: "bwrap".into(),
            },
        )
        .unwrap();
        let client =
            kube::Client::try_from(kube::Config::new(server.url.parse().unwrap())).unwrap();
        if opts.identity_secret {
            create_identity_secret(&client, ROUTER_KEY, ROUTER_PUB).await;
        }
        apply(&client, &opts.manifests).await;
        let mut kc = KubeConfig::new(SYSTEM_NS);
        kc.default_runtime_class = opts.runtime_class;
        kc.probe_timeout = Duration::from_secs(5);
        let backend = KubernetesBackend::start(client.clone(), kc).await.unwrap();
        let store: Arc<dyn SessionStore> = Arc::new(agentcube_store::MemoryStore::new());
        let config = Config {
            gc_interval: opts.gc_interval,
            create_timeout: opts.create_timeout,
            ..Config::default()
        };
        let wm = WorkloadManager::start(config, store.clone(), Arc::new(backend))
            .await
            .unwrap();
        let (url, serve) = super::serve_api(&wm).await;
        Self {
            server,
            sim: Some(sim),
            client,
            url,
            store,
            wm: Some(wm),
            http: reqwest::Client::new(),
            dir,
            serve,
        }
    }

    pub async fn create(&self, kind: &str, name: &str) -> (u16, Value) {
        super::create_session(&self.http, &self.url, kind, name).await
    }

    pub async fn create_ok(&self, kind: &str, name: &str) -> Value {
        let (s, v) = self.create(kind, name).await;
        assert_eq!(s, 200, "create {name}: {v}\n{}", self.dump());
        v
    }

    pub async fn delete(&self, id: &str) -> u16 {
        super::delete_session(&self.http, &self.url, id).await.0
    }

    /// The cluster's sandbox-related objects, for failure messages.
    pub fn dump(&self) -> String {
        let c = &self.server.cluster;
        let names = |prefix: &str, plural: &str| -> Vec<String> {
            c.list(prefix, "default", plural)
                .iter()
                .map(|o| {
                    format!(
                        "{} {}",
                        o["metadata"]["name"],
                        o.get("status").map(|s| s.to_string()).unwrap_or_default()
                    )
                })
                .collect()
        };
        format!(
            "sandboxes: {:#?}\nclaims: {:#?}\npods: {:#?}",
            names("apis/agents.x-k8s.io/v1alpha1", "sandboxes"),
            names("apis/extensions.agents.x-k8s.io/v1alpha1", "sandboxclaims"),
            names("api/v1", "pods"),
        )
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
                panic!("timed out waiting for {what}\n{}", self.dump());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops the Workload Manager and the simulation; returns how many pod processes were left.
    pub async fn stop(mut self) -> usize {
        self.wm.take().unwrap().shutdown().await;
        self.serve.abort();
        self.sim.take().unwrap().stop().await
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

pub fn ready(o: &DynamicObject) -> bool {
    o.data
        .pointer("/status/conditions")
        .and_then(Value::as_array)
        .is_some_and(|cs| {
            cs.iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        })
}
