//! The local backend's [`Platform`]: definitions from a manifest directory (reloaded when its
//! files change), warm pools of this backend kept in step with them, a fixed Router key.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use agentcube_crds::CodeInterpreter;

use super::LocalBackend;
use crate::backend::{Background, Platform, PoolLevel, WarmPools};
use crate::definitions::Definitions;
use crate::key::RouterKey;

impl WarmPools for LocalBackend {
    fn levels(&self) -> Vec<PoolLevel> {
        self.pool_status()
            .into_iter()
            .map(|p| PoolLevel {
                namespace: p.namespace,
                name: p.name,
                ready: p.ready,
                size: p.size,
                standby: 0,
                failing: p.failing,
            })
            .collect()
    }
}

impl LocalBackend {
    /// Loads the definitions in `manifests` (none without it), fills their warm pools with
    /// sandboxes trusting `public_key`, and checks the directory for changes every `reload`.
    pub async fn platform(
        self,
        manifests: Option<PathBuf>,
        reload: Duration,
        public_key: Option<String>,
    ) -> Result<Platform, String> {
        let definitions = Arc::new(Definitions::new());
        let mut background = Background::default();
        if let Some(dir) = manifests {
            definitions
                .reload_if_changed(&dir)
                .map_err(|e| format!("cannot read manifests in {}: {e}", dir.display()))?;
            let (defs, backend, key) = (definitions.clone(), self.clone(), public_key.clone());
            let stopped = background.stopped();
            background.spawn(async move {
                tokio::pin!(stopped);
                loop {
                    tokio::select! {
                        () = tokio::time::sleep(reload) => {}
                        () = &mut stopped => return,
                    }
                    match defs.reload_if_changed(&dir) {
                        Ok(true) => {
                            backend
                                .sync_pools(defs.code_interpreters(), key.clone())
                                .await
                        }
                        Ok(false) => {}
                        Err(e) => tracing::warn!(error = %e, "cannot reload manifests"),
                    }
                }
            });
        }
        self.sync_pools(definitions.code_interpreters(), public_key.clone())
            .await;
        Ok(Platform {
            backend: Arc::new(self.clone()),
            definitions,
            key: RouterKey::fixed(public_key),
            pools: Arc::new(self),
            background,
        })
    }

    /// The set of CodeInterpreters changed: resize, roll or drop warm pools.
    pub async fn sync_pools(
        &self,
        definitions: Vec<Arc<CodeInterpreter>>,
        public_key: Option<String>,
    ) {
        let (stale, kick) = self.plan_pools(definitions, public_key);
        for name in stale {
            self.remove(&name).await;
        }
        for key in kick {
            self.refill(key);
        }
    }
}
