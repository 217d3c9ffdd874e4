//! What the Kubernetes backend follows in the cluster besides sandboxes: the CodeInterpreter and
//! AgentRuntime CRs (into [`Definitions`]) and the Router's public key (Secret
//! `picod-router-identity`, followed when it changes; upstream read it once per process).

use std::sync::Arc;

use agentcube_crds::{AgentRuntime, CodeInterpreter};
use agentcube_types::api::WorkloadKind;
use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use kube::runtime::watcher;
use tokio::sync::watch;

use super::watched::Watched;
use crate::backend::Workload;
use crate::definitions::Definitions;
use crate::key::{RouterKey, public_from_pems};

/// Name of the Router's identity Secret (spec §1.8).
pub use agentcube_crds::labels::IDENTITY_SECRET;

/// Asks the API server for a CR the watch has not delivered yet (applied a moment ago).
pub struct CrSource(pub kube::Client);

#[async_trait::async_trait]
impl crate::definitions::Source for CrSource {
    async fn fetch(&self, kind: WorkloadKind, namespace: &str, name: &str) -> Option<Workload> {
        let client = self.0.clone();
        let result = match kind {
            WorkloadKind::CodeInterpreter => Api::<CodeInterpreter>::namespaced(client, namespace)
                .get_opt(name)
                .await
                .map(|o| o.map(|c| Workload::CodeInterpreter(Arc::new(c)))),
            WorkloadKind::AgentRuntime => Api::<AgentRuntime>::namespaced(client, namespace)
                .get_opt(name)
                .await
                .map(|o| o.map(|a| Workload::AgentRuntime(Arc::new(a)))),
        };
        result
            .inspect_err(|e| tracing::warn!(error = %e, "cannot look the definition up"))
            .ok()
            .flatten()
    }
}

/// Keeps `definitions` equal to the cluster's CRs of one kind.
fn mirror<K>(
    watched: Watched<K>,
    definitions: Arc<Definitions>,
    kind: WorkloadKind,
    wrap: fn(Arc<K>) -> Workload,
) -> tokio::task::JoinHandle<()>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    tokio::spawn(async move {
        let mut changes = watched.subscribe();
        loop {
            changes.borrow_and_update();
            definitions.replace_kind(kind, watched.all().into_iter().map(wrap).collect());
            if changes.changed().await.is_err() {
                return;
            }
        }
    })
}

/// Starts mirroring both CRDs into `definitions`; resolves once both first lists are in.
pub async fn mirror_definitions(
    client: kube::Client,
    definitions: Arc<Definitions>,
    config: watcher::Config,
) -> Vec<tokio::task::JoinHandle<()>> {
    let cis: Watched<CodeInterpreter> = Watched::start(Api::all(client.clone()), config.clone());
    let ars: Watched<AgentRuntime> = Watched::start(Api::all(client), config);
    cis.ready().await;
    ars.ready().await;
    // Load synchronously once so the first request after start finds them.
    definitions.replace_kind(
        WorkloadKind::CodeInterpreter,
        cis.all()
            .into_iter()
            .map(Workload::CodeInterpreter)
            .collect(),
    );
    definitions.replace_kind(
        WorkloadKind::AgentRuntime,
        ars.all().into_iter().map(Workload::AgentRuntime).collect(),
    );
    vec![
        mirror(
            cis,
            definitions.clone(),
            WorkloadKind::CodeInterpreter,
            Workload::CodeInterpreter,
        ),
        mirror(
            ars,
            definitions,
            WorkloadKind::AgentRuntime,
            Workload::AgentRuntime,
        ),
    ]
}

/// The public key carried by the identity Secret (`public.pem`, or derived from `private.pem`).
pub fn key_of(secret: &Secret) -> Result<String, String> {
    let text = |k: &str| {
        secret
            .data
            .as_ref()
            .and_then(|d| d.get(k))
            .map(|b| String::from_utf8_lossy(&b.0).into_owned())
    };
    public_from_pems(
        text("public.pem").as_deref(),
        text("private.pem").as_deref(),
    )
}

/// Follows the identity Secret in `namespace`; resolves once the first list is in (so a Secret
/// that exists at start is loaded before the first request). The key stays unset until the
/// Secret exists (the Router creates it at start); a deleted Secret keeps the last key (the
/// Router keeps its own).
pub async fn follow_key(
    client: kube::Client,
    namespace: &str,
    config: watcher::Config,
) -> (RouterKey, tokio::task::JoinHandle<()>) {
    let (tx, key): (watch::Sender<Option<String>>, RouterKey) = RouterKey::followed();
    let secrets: Watched<Secret> = Watched::start(
        Api::namespaced(client, namespace),
        config.fields(&format!("metadata.name={IDENTITY_SECRET}")),
    );
    secrets.ready().await;
    let namespace = namespace.to_string();
    let task = tokio::spawn(async move {
        let mut changes = secrets.subscribe();
        loop {
            changes.borrow_and_update();
            if let Some(secret) = secrets.get(&namespace, IDENTITY_SECRET) {
                match key_of(&secret) {
                    Ok(pem) if tx.borrow().as_deref() != Some(pem.as_str()) => {
                        tracing::info!(namespace = %namespace, "Router public key loaded from Secret {IDENTITY_SECRET}");
                        tx.send_replace(Some(pem));
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "Secret {IDENTITY_SECRET} holds no usable key")
                    }
                }
            }
            if changes.changed().await.is_err() {
                return;
            }
        }
    });
    (key, task)
}
