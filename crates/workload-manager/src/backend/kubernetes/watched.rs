//! One shared watch per kind: a reflector cache plus a change counter. Waiters re-check their own
//! object in the cache on every change, so any number of creates wait on one watch, and nothing
//! is missed between "create" and "start waiting" (the state is checked, not the event).

use std::fmt::Debug;
use std::hash::Hash;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use kube::api::Api;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio::sync::watch;

/// A kind's cached objects, kept current by one watch.
pub struct Watched<K>
where
    K: Resource + Clone + 'static,
    K::DynamicType: Eq + Hash + Clone,
{
    store: Store<K>,
    dyntype: K::DynamicType,
    changes: watch::Receiver<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl<K> Drop for Watched<K>
where
    K: Resource + Clone + 'static,
    K::DynamicType: Eq + Hash + Clone,
{
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// How long the API server keeps a watch open (its `timeoutSeconds`) before the watch is made
/// anew from where it was. kube-rs's watcher gives up on a watch that has sent nothing for this
/// long plus 5 s; on HTTP/1.1 that is the only sign of a connection that died silently (a path
/// that drops packets, a load balancer that forgot it), where client-go pings its HTTP/2
/// connection. kube-rs's default, 290 s, left the caches blind that long: every create waited
/// out its timeout for a Sandbox the dead watch never reported ready.
pub const WATCH_TIMEOUT: Duration = Duration::from_secs(55);

/// A watcher configuration whose watches last `timeout` (whole seconds, at least 1).
pub fn config(timeout: Duration) -> watcher::Config {
    let secs = u32::try_from(timeout.as_secs()).unwrap_or(u32::MAX).max(1);
    watcher::Config::default().timeout(secs)
}

impl<K> Watched<K>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    /// Starts watching `api` (re-listing and backing off by itself after errors).
    pub fn start(api: Api<K>, config: watcher::Config) -> Self {
        Self::start_with(api, config, ())
    }
}

impl<K> Watched<K>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Eq + Hash + Clone + Send + Sync,
{
    /// Starts watching `api`, whose kind's dynamic type is `dyntype`.
    pub fn start_with(api: Api<K>, config: watcher::Config, dyntype: K::DynamicType) -> Self {
        let writer = reflector::store::Writer::new(dyntype.clone());
        let store = writer.as_reader();
        let (tx, changes) = watch::channel(0u64);
        let kind = K::kind(&dyntype).to_string();
        let task = tokio::spawn(async move {
            let mut stream = watcher(api, config)
                .default_backoff()
                .reflect(writer)
                .boxed();
            while let Some(event) = stream.next().await {
                match event {
                    Ok(_) => {
                        tx.send_modify(|n| *n = n.wrapping_add(1));
                    }
                    Err(e) => tracing::warn!(kind = %kind, error = %e, "watch failed; retrying"),
                }
            }
        });
        Self {
            store,
            dyntype,
            changes,
            task,
        }
    }

    /// Resolves once the first list has been loaded.
    pub async fn ready(&self) {
        let _ = self.store.wait_until_ready().await;
    }

    /// A cached object.
    pub fn get(&self, namespace: &str, name: &str) -> Option<Arc<K>> {
        self.store
            .get(&ObjectRef::new_with(name, self.dyntype.clone()).within(namespace))
    }

    /// Every cached object.
    pub fn all(&self) -> Vec<Arc<K>> {
        self.store.state()
    }

    /// Notified on every change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.clone()
    }

    /// Waits until `namespace/name` exists and `check` accepts it; returns what `check` returned.
    /// Never gives up by itself: callers bound it with a timeout.
    pub async fn wait_for<T>(
        &self,
        namespace: &str,
        name: &str,
        check: impl Fn(&K) -> Option<T>,
    ) -> T {
        let mut changes = self.changes.clone();
        loop {
            changes.borrow_and_update();
            if let Some(found) = self.get(namespace, name).and_then(|o| check(&o)) {
                return found;
            }
            if changes.changed().await.is_err() {
                // The watch task ended (only on shutdown): nothing more will come.
                std::future::pending::<()>().await;
            }
        }
    }
}

/// `uid` of an object, empty when unset.
pub fn uid<K: Resource>(o: &K) -> String {
    o.meta().uid.clone().unwrap_or_default()
}

/// `name` of an object.
pub fn name<K: Resource>(o: &K) -> String {
    o.name_any()
}
