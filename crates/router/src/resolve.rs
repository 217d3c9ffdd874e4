//! Session → sandbox: a short-lived local cache, then one store GET; or a WM create when the
//! request carries no session.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use agentcube_store::SessionStore;
use agentcube_types::api::WorkloadKind;
use agentcube_types::{EntryPoint, SessionRecord};

use crate::error::RouterError;
use crate::wm::WmClient;

/// What the proxy needs to know about a session.
#[derive(Debug, Clone)]
pub struct Target {
    pub session_id: String,
    pub entry_points: Arc<[EntryPoint]>,
    /// The sandbox's identity, which the token is bound to (absent in upstream records).
    pub identity: Option<Arc<str>>,
}

struct CacheEntry {
    target: Target,
    at: Instant,
}

/// Resolves sessions.
pub struct Resolver {
    store: Arc<dyn SessionStore>,
    wm: WmClient,
    ttl: Duration,
    cache: Mutex<HashMap<String, CacheEntry>>,
    store_gets: prometheus_client::metrics::counter::Counter,
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resolver").field("ttl", &self.ttl).finish()
    }
}

const CACHE_CAPACITY: usize = 100_000;

impl Resolver {
    /// `ttl` 0 disables the cache (every request does one store GET).
    pub fn new(
        store: Arc<dyn SessionStore>,
        wm: WmClient,
        ttl: Duration,
        store_gets: prometheus_client::metrics::counter::Counter,
    ) -> Self {
        Self {
            store,
            wm,
            ttl,
            cache: Mutex::new(HashMap::new()),
            store_gets,
        }
    }

    /// Store round trips made for lookups so far.
    pub fn store_gets(&self) -> u64 {
        self.store_gets.get()
    }

    /// Drops a session from the cache (after an upstream connection failure).
    pub fn invalidate(&self, session_id: &str) {
        self.cache.lock().unwrap().remove(session_id);
    }

    /// The sandbox for an existing session, refusing one created for another runtime.
    pub async fn existing(
        &self,
        session_id: &str,
        kind: WorkloadKind,
        namespace: &str,
        name: &str,
    ) -> Result<Target, RouterError> {
        if !self.ttl.is_zero()
            && let Some(e) = self.cache.lock().unwrap().get(session_id)
            && e.at.elapsed() < self.ttl
        {
            return Ok(e.target.clone());
        }
        self.store_gets.inc();
        let record = match self.store.get(session_id).await {
            Ok(r) => r,
            Err(agentcube_store::Error::NotFound) => {
                self.invalidate(session_id);
                return Err(RouterError::UnknownSession(session_id.to_string()));
            }
            Err(e) if e.is_unavailable() => return Err(RouterError::StoreUnavailable),
            Err(e) => return Err(RouterError::Internal(e.to_string())),
        };
        check_target(&record, kind, namespace, name)?;
        let target = Target {
            session_id: session_id.to_string(),
            entry_points: record.entry_points().to_vec().into(),
            identity: record.sandbox_identity.as_deref().map(Arc::from),
        };
        if !self.ttl.is_zero() {
            let mut cache = self.cache.lock().unwrap();
            if cache.len() >= CACHE_CAPACITY {
                cache.clear();
            }
            cache.insert(
                session_id.to_string(),
                CacheEntry {
                    target: target.clone(),
                    at: Instant::now(),
                },
            );
        }
        Ok(target)
    }

    /// Asks the WM for a new session.
    pub async fn create(
        &self,
        kind: WorkloadKind,
        namespace: &str,
        name: &str,
    ) -> Result<Target, RouterError> {
        let resp = self.wm.create(kind, namespace, name).await?;
        Ok(Target {
            session_id: resp.session_id,
            entry_points: resp.entry_points.into(),
            identity: resp.sandbox_identity.as_deref().map(Arc::from),
        })
    }
}

/// Records written by this project carry the CRD they were made for; upstream records do not, and
/// are accepted anywhere (as upstream does).
fn check_target(
    record: &SessionRecord,
    kind: WorkloadKind,
    namespace: &str,
    name: &str,
) -> Result<(), RouterError> {
    let (Some(k), Some(n)) = (record.workload_kind, record.workload_name.as_deref()) else {
        return Ok(());
    };
    if k != kind || n != name || record.sandbox_namespace != namespace {
        return Err(RouterError::SessionMismatch {
            session: record.session_id.clone(),
            kind: k.to_string(),
            namespace: record.sandbox_namespace.clone(),
            name: n.to_string(),
        });
    }
    Ok(())
}

/// Upstream's entry-point choice: the first whose path is a string prefix of the request path,
/// else the first.
pub fn pick<'a>(entry_points: &'a [EntryPoint], path: &str) -> Option<&'a EntryPoint> {
    entry_points
        .iter()
        .find(|e| path.starts_with(e.path.as_str()))
        .or_else(|| entry_points.first())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(path: &str, endpoint: &str) -> EntryPoint {
        EntryPoint {
            path: path.into(),
            protocol: "HTTP".into(),
            endpoint: endpoint.into(),
        }
    }

    #[test]
    fn entry_point_by_prefix_else_first() {
        let eps = [ep("/mcp", "a:1"), ep("/", "b:2")];
        assert_eq!(pick(&eps, "/mcp/x").unwrap().endpoint, "a:1");
        assert_eq!(pick(&eps, "/api").unwrap().endpoint, "b:2");
        let eps = [ep("/mcp", "a:1")];
        assert_eq!(pick(&eps, "/other").unwrap().endpoint, "a:1");
        assert!(pick(&[], "/").is_none());
    }
}
