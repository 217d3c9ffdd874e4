//! Session → sandbox: a short-lived local cache, then one store GET; or a WM create when the
//! request carries no session.

use foldhash::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use agentcube_store::SessionStore;
use agentcube_types::EntryPoint;
use agentcube_types::api::WorkloadKind;

use crate::error::RouterError;
use crate::wm::WmClient;

/// What the proxy needs to know about a session.
#[derive(Debug, Clone)]
pub struct Target {
    pub session_id: Arc<str>,
    /// The session id as the header stamped on every answer, made once (`None`: not a valid
    /// header value).
    pub session_header: Option<http::HeaderValue>,
    pub entry_points: Arc<[EntryPoint]>,
    /// The sandbox's identity, which the token is bound to (absent in upstream records).
    pub identity: Option<Arc<str>>,
    /// The runtime the session was made for (absent in upstream records): checked on every
    /// request, cached or not.
    pub workload: Option<Arc<Workload>>,
    /// The end user who owns the session (`ownerId`), when it was created by an authenticated
    /// caller.
    pub owner: Option<Arc<str>>,
    /// The end of the session's lifetime (`expiresAt`; `None` for one this Router just made):
    /// past it the session is refused as ended, before the Workload Manager's GC, which runs
    /// every 15 s, has torn it down.
    pub expires_at: Option<jiff::Timestamp>,
}

/// The runtime a session belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    pub kind: WorkloadKind,
    pub namespace: String,
    pub name: String,
}

struct CacheEntry {
    target: Arc<Target>,
    at: Instant,
}

/// Resolves sessions.
pub struct Resolver {
    store: Arc<dyn SessionStore>,
    wm: WmClient,
    ttl: Duration,
    cache: Mutex<HashMap<String, CacheEntry>>,
    store_gets: prometheus_client::metrics::counter::Counter,
    /// What the last readiness check found (`None` before the first), to log changes only.
    store_was_ready: Mutex<Option<bool>>,
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
            cache: Mutex::new(HashMap::default()),
            store_gets,
            store_was_ready: Mutex::new(None),
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

    /// Why a session that is not in the store ended, when the Workload Manager noted it (one
    /// more store read, on this miss only).
    async fn why_gone(&self, session_id: &str) -> Option<String> {
        match agentcube_store::why_gone(self.store.as_ref(), session_id).await {
            Ok(why) => why,
            Err(e) => {
                tracing::debug!(session_id, error = %e, "cannot read why the session ended");
                None
            }
        }
    }

    /// Why a session whose sandbox just failed a request is ending, when the Workload Manager
    /// noted it: it notes why before it tears a session down (a delete, the end of its
    /// lifetime), so a request in flight that the teardown cut is told so, while the record
    /// still stands.
    pub async fn ending(&self, session_id: &str) -> Option<RouterError> {
        let why = self.why_gone(session_id).await?;
        Some(RouterError::unknown_session(session_id, Some(why)))
    }

    /// The sandbox for an existing session, refusing one created for another runtime; for an
    /// unknown one, why it ended when the Workload Manager noted it.
    pub async fn existing(
        &self,
        session_id: &str,
        kind: WorkloadKind,
        namespace: &str,
        name: &str,
    ) -> Result<Arc<Target>, RouterError> {
        // Looked up here, once the record's lookup is over: inside it, the answer's record
        // would stay in every request's future across this wait (its size is bounded:
        // `server::tests`). Boxed: it is needed on this miss only.
        match self.lookup(session_id, kind, namespace, name).await {
            Err(RouterError::UnknownSession(mut unknown)) if unknown.why.is_none() => {
                unknown.why = Box::pin(self.why_gone(session_id)).await;
                Err(RouterError::UnknownSession(unknown))
            }
            other => other,
        }
    }

    async fn lookup(
        &self,
        session_id: &str,
        kind: WorkloadKind,
        namespace: &str,
        name: &str,
    ) -> Result<Arc<Target>, RouterError> {
        let cached = if self.ttl.is_zero() {
            None
        } else {
            let cache = self.cache.lock().unwrap();
            cache
                .get(session_id)
                .filter(|e| e.at.elapsed() < self.ttl)
                .map(|e| e.target.clone())
        };
        if let Some(target) = cached {
            check_target(&target, kind, namespace, name)?;
            return Ok(target);
        }
        self.store_gets.inc();
        let record = match self.store.get(session_id).await {
            Ok(r) => r,
            Err(agentcube_store::Error::NotFound) => {
                self.invalidate(session_id);
                return Err(RouterError::unknown_session(session_id, None));
            }
            Err(e) if e.is_unavailable() => return Err(RouterError::StoreUnavailable),
            Err(e) => return Err(RouterError::Internal(e.to_string())),
        };
        let target = Arc::new(Target {
            session_id: session_id.into(),
            session_header: http::HeaderValue::from_str(session_id).ok(),
            entry_points: record.entry_points().to_vec().into(),
            identity: record.sandbox_identity.as_deref().map(Arc::from),
            owner: record
                .owner_id
                .as_deref()
                .filter(|o| !o.is_empty())
                .map(Arc::from),
            expires_at: Some(record.expires_at),
            workload: match (record.workload_kind, record.workload_name) {
                (Some(kind), Some(name)) => Some(Arc::new(Workload {
                    kind,
                    namespace: record.sandbox_namespace,
                    name,
                })),
                _ => None,
            },
        });
        if !self.ttl.is_zero() {
            let mut cache = self.cache.lock().unwrap();
            // Cached even when refused below: the next request is refused without a lookup.
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
        check_target(&target, kind, namespace, name)?;
        Ok(target)
    }

    /// Asks the WM for a new session, owned by the user an `identity` token names.
    pub async fn create(
        &self,
        kind: WorkloadKind,
        namespace: &str,
        name: &str,
        identity: Option<(&str, &str)>,
    ) -> Result<Arc<Target>, RouterError> {
        let (owner, token) = identity.unzip();
        let resp = self.wm.create(kind, namespace, name, token).await?;
        Ok(Arc::new(Target {
            owner: owner.map(Arc::from),
            expires_at: None,
            session_header: http::HeaderValue::from_str(&resp.session_id).ok(),
            session_id: resp.session_id.into(),
            entry_points: resp.entry_points.into(),
            identity: resp.sandbox_identity.as_deref().map(Arc::from),
            workload: Some(Arc::new(Workload {
                kind,
                namespace: namespace.to_string(),
                name: name.to_string(),
            })),
        }))
    }

    /// Deletes a session the Router created but could not deliver (its id never reached the
    /// client), so no sandbox is left behind.
    pub async fn roll_back(&self, kind: WorkloadKind, session_id: &str) {
        self.invalidate(session_id);
        if let Err(e) = self.wm.delete(kind, session_id).await {
            tracing::warn!(session_id, error = %e, "could not roll back a session the Router created");
        }
    }

    /// Whether the store answers (readiness).
    pub async fn store_ready(&self) -> bool {
        let failed = match tokio::time::timeout(Duration::from_secs(1), self.store.ping()).await {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e),
            Err(_) => Some(agentcube_store::Error::Unavailable(
                "no answer within 1s".into(),
            )),
        };
        let ready = failed.is_none();
        // Once per change, so a Router that never gets ready says why in its log, where the
        // probes' answers go nowhere.
        let was = self.store_was_ready.lock().unwrap().replace(ready);
        match (was, &failed) {
            (Some(false), None) => tracing::info!("the session store answers again: ready"),
            (None | Some(true), Some(e)) => {
                let what = e.said_to("the Router");
                tracing::warn!(error = %e, "{what}: not ready")
            }
            _ => {}
        }
        ready
    }
}

/// A session past its lifetime is ended (what GC will say once it has torn it down). Records
/// written by this project carry the runtime they were made for; upstream records do not, and
/// are accepted anywhere (as upstream does).
fn check_target(
    target: &Target,
    kind: WorkloadKind,
    namespace: &str,
    name: &str,
) -> Result<(), RouterError> {
    if let Some(end) = target.expires_at
        && end <= jiff::Timestamp::now()
    {
        let why = agentcube_types::session::past_its_end(end);
        return Err(RouterError::unknown_session(&target.session_id, Some(why)));
    }
    let Some(w) = &target.workload else {
        return Ok(());
    };
    if w.kind != kind || w.name != name || w.namespace != namespace {
        return Err(RouterError::SessionMismatch(Box::new(
            crate::error::SessionMismatch {
                session: target.session_id.to_string(),
                kind: w.kind.to_string(),
                namespace: w.namespace.clone(),
                name: w.name.clone(),
            },
        )));
    }
    Ok(())
}

/// Upstream's entry-point choice (PR #389): the longest path that is a string prefix of the
/// request path (the first of equal ones), else the first entry point.
pub fn pick<'a>(entry_points: &'a [EntryPoint], path: &str) -> Option<&'a EntryPoint> {
    let mut best: Option<&EntryPoint> = None;
    for e in entry_points {
        if path.starts_with(e.path.as_str()) && best.is_none_or(|b| e.path.len() > b.path.len()) {
            best = Some(e);
        }
    }
    best.or_else(|| entry_points.first())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes the log to a shared buffer (this thread's events only).
    #[derive(Clone, Default)]
    struct Log(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Log {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A Router that never gets ready says why in its log (where the probes' answers do not
    /// go), once per change rather than at every probe.
    #[tokio::test]
    async fn readiness_logs_why_the_store_fails_once_per_change() {
        use agentcube_store::testing::Flaky;
        let store = Arc::new(Flaky::new(Arc::new(agentcube_store::MemoryStore::new())));
        // Without a cache or a Workload Manager: only readiness is asked.
        let resolver_on = |store: Arc<dyn SessionStore>| {
            let wm = WmClient::new(
                "http://127.0.0.1:9",
                Duration::from_secs(1),
                None,
                None,
                None,
            );
            Resolver::new(store, wm, Duration::ZERO, Default::default())
        };
        let resolver = resolver_on(store.clone());
        let log = Log::default();
        let sink = log.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || sink.clone())
            .finish();
        let _guard = tracing::subscriber::set_default(subscriber);
        store.set_down(true);
        for _ in 0..3 {
            assert!(!resolver.store_ready().await);
        }
        store.set_down(false);
        assert!(resolver.store_ready().await);
        assert!(resolver.store_ready().await);
        let text = String::from_utf8(log.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text.matches("not ready").count(), 1, "{text}");
        assert!(text.contains("does not answer: not ready"), "{text}");
        assert!(text.contains("session store unavailable"), "{text}");
        assert_eq!(text.matches("answers again").count(), 1, "{text}");

        // A store that answers and refuses (a wrong password) is told apart from an outage.
        use agentcube_store::testing::{Flavor, ServerProcess};
        let redis = ServerProcess::start(Flavor::Redis);
        let url = redis.url().replace("redis://", "redis://:wrong@");
        let store = agentcube_store::RedisStore::new(agentcube_store::RedisConfig::new(url));
        let resolver = resolver_on(Arc::new(store.unwrap()));
        log.0.lock().unwrap().clear();
        assert!(!resolver.store_ready().await);
        let text = String::from_utf8(log.0.lock().unwrap().clone()).unwrap();
        assert!(text.contains("refuses the Router: not ready"), "{text}");
        assert!(text.contains("Password authentication failed"), "{text}");
    }

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
        // Longest prefix wins whatever the order; equal ones: the first.
        let eps = [
            ep("/", "root:1"),
            ep("/api", "api:2"),
            ep("/api/v2", "v2:3"),
        ];
        assert_eq!(pick(&eps, "/api/v2/run").unwrap().endpoint, "v2:3");
        assert_eq!(pick(&eps, "/api/v1").unwrap().endpoint, "api:2");
        assert_eq!(pick(&eps, "/health").unwrap().endpoint, "root:1");
        let eps = [ep("/a", "first:1"), ep("/a", "second:2")];
        assert_eq!(pick(&eps, "/a/b").unwrap().endpoint, "first:1");
        assert!(pick(&[], "/").is_none());
    }
}
