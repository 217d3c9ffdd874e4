//! What a backend hands the Workload Manager, so that [`crate::WorkloadManager::start`] makes no
//! backend decisions.

use std::sync::Arc;

use super::Backend;
use crate::definitions::Definitions;
use crate::key::RouterKey;

/// One warm pool's level.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolLevel {
    pub namespace: String,
    pub name: String,
    /// Members ready to be claimed.
    pub ready: usize,
    /// The size asked for (`warmPoolSize`).
    pub size: u32,
    /// Standby claims bound to a Ready Sandbox that a create may take (`--standby-claims`;
    /// always 0 on the local backend, whose pool members are taken directly).
    pub standby: usize,
    /// Why the pool's last sandbox start failed, while none has started since (local backend;
    /// on Kubernetes the CodeInterpreter's status says it).
    pub failing: Option<String>,
}

/// Warm pools, as far as the Workload Manager needs to see them (metrics, progress output).
pub trait WarmPools: Send + Sync {
    fn levels(&self) -> Vec<PoolLevel>;
}

/// A backend ready to serve: built by `LocalBackend::platform` or `KubernetesBackend::platform`.
pub struct Platform {
    /// Where sandboxes run.
    pub backend: Arc<dyn Backend>,
    /// The definitions, kept current by the platform (manifest reloads, or the cluster's CRs).
    pub definitions: Arc<Definitions>,
    /// The Router's public key as the platform knows it (fixed, or followed from its Secret).
    pub key: RouterKey,
    /// Its warm pools.
    pub pools: Arc<dyn WarmPools>,
    /// Tasks keeping the definitions and pools current; stopped before the sandboxes are removed.
    pub background: Background,
}

/// Background tasks that end at a stop signal, between two steps (never in the middle of one,
/// as an abort would: a sandbox half removed leaves its directory behind).
pub struct Background {
    stop: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Default for Background {
    fn default() -> Self {
        Self {
            stop: tokio::sync::watch::channel(false).0,
            tasks: Vec::new(),
        }
    }
}

impl Background {
    /// Resolves once [`Background::stop`] is called: what a task selects on between steps.
    pub fn stopped(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.stop.subscribe();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    }

    pub fn spawn(&mut self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        self.tasks.push(tokio::spawn(task));
    }

    /// Signals every task and waits for them to end.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}
