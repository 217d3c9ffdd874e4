//! Warm pools of the local backend: per CodeInterpreter, a queue of started sandboxes. A claim is
//! a pop; refills start in the background; a changed sandbox template (or Router key) rolls the
//! pool, a resize keeps its ready sandboxes.
//! When a start fails (a broken definition, the memory budget), the pool waits (2 s, doubling
//! to 60 s) and one retry refills it: failures never spin, and each wait is logged once.

use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use agentcube_crds::CodeInterpreter;

use super::LocalBackend;
use crate::backend::{Sandbox, Workload};

/// One pool.
pub(super) struct Pool {
    generation: u64,
    size: u32,
    ready: VecDeque<Sandbox>,
    filling: u32,
    workload: Workload,
    public_key: Option<String>,
    /// A start failed: no refill until the one retry scheduled after [`Pool::backoff`].
    waiting: bool,
    /// The wait after the next failure: [`FIRST_BACKOFF`], doubling to [`MAX_BACKOFF`], back to
    /// the first once the pool is full.
    backoff: Duration,
    /// Starts that failed since the pool was (re)made.
    failed_starts: u64,
    /// Why the last start failed, until one succeeds.
    last_failure: Option<String>,
}

/// The first wait of a pool whose sandboxes fail to start.
const FIRST_BACKOFF: Duration = Duration::from_secs(2);
/// The longest.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// Pools by (namespace, name).
pub(super) type Pools = HashMap<(String, String), Pool>;

/// Warm-pool fill level, for progress output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolStatus {
    pub namespace: String,
    pub name: String,
    pub ready: usize,
    pub size: u32,
    /// Sandbox starts that failed since the pool was made (or rolled).
    pub failed_starts: u64,
    /// Why the last start failed, while none has succeeded since.
    pub failing: Option<String>,
}

/// What the pool's sandboxes were started from: the definition's spec but for the fields that
/// only concern sessions or the pool (its size, the timeouts), and the Router's key. A change in
/// it rolls the pool; a resize keeps its ready sandboxes.
fn generation_of(ci: &CodeInterpreter, key: &Option<String>) -> u64 {
    let mut launch = ci.spec.clone();
    launch.warm_pool_size = None;
    launch.session_timeout = Default::default();
    launch.max_session_duration = Default::default();
    let mut h = std::collections::hash_map::DefaultHasher::new();
    serde_json::to_string(&launch)
        .unwrap_or_default()
        .hash(&mut h);
    key.hash(&mut h);
    h.finish()
}

fn key_of(ci: &CodeInterpreter) -> (String, String) {
    (
        ci.metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into()),
        ci.metadata.name.clone().unwrap_or_default(),
    )
}

impl LocalBackend {
    /// Warm pools and how full they are.
    pub fn pool_status(&self) -> Vec<PoolStatus> {
        let pools = self.inner.pools.lock().unwrap();
        let mut v: Vec<_> = pools
            .iter()
            .map(|((ns, name), p)| PoolStatus {
                namespace: ns.clone(),
                name: name.clone(),
                ready: p.ready.len(),
                size: p.size,
                failed_starts: p.failed_starts,
                failing: p.last_failure.clone(),
            })
            .collect();
        v.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        v
    }

    /// Takes a sandbox that died out of whichever pool holds it, and refills that pool.
    pub(super) fn drop_from_pools(&self, name: &str) {
        let key = {
            let mut pools = self.inner.pools.lock().unwrap();
            pools.iter_mut().find_map(|(key, p)| {
                let before = p.ready.len();
                p.ready.retain(|s| s.name != name);
                (p.ready.len() < before).then(|| key.clone())
            })
        };
        if let Some(key) = key {
            self.refill(key);
        }
    }

    /// Pops a ready sandbox of the pool `key` (and starts its replacement).
    pub(super) fn claim(&self, key: (String, String)) -> Option<Sandbox> {
        let claimed = {
            let mut pools = self.inner.pools.lock().unwrap();
            pools.get_mut(&key).and_then(|p| p.ready.pop_front())
        };
        if claimed.is_some() {
            self.refill(key);
        }
        claimed
    }

    /// Starts sandboxes until a pool has `size` ready or starting.
    pub(super) fn refill(&self, key: (String, String)) {
        let mut pools = self.inner.pools.lock().unwrap();
        let Some(pool) = pools.get_mut(&key) else {
            return;
        };
        if pool.waiting {
            return;
        }
        let deficit = (pool.size as usize).saturating_sub(pool.ready.len() + pool.filling as usize);
        for _ in 0..deficit {
            pool.filling += 1;
            let (this, key) = (self.clone(), key.clone());
            let (workload, public_key, generation) = (
                pool.workload.clone(),
                pool.public_key.clone(),
                pool.generation,
            );
            tokio::spawn(async move {
                let name = workload.sandbox_name();
                let started = this.start(&name, &workload, public_key).await;
                let keep = this.offer(&key, generation, &started);
                match started {
                    Ok(sb) if !keep => this.remove(&sb.name).await,
                    Err(e) => this.retry_later(key, generation, &e),
                    Ok(_) => {}
                }
            });
        }
    }

    /// A start for the pool failed: the first failure of a round schedules the one retry (and is
    /// logged); the others of the round wait for it.
    fn retry_later(
        &self,
        key: (String, String),
        generation: u64,
        error: &crate::backend::BackendError,
    ) {
        let mut pools = self.inner.pools.lock().unwrap();
        let Some(pool) = pools.get_mut(&key).filter(|p| p.generation == generation) else {
            return;
        };
        pool.failed_starts += 1;
        pool.last_failure = Some(error.to_string());
        if pool.waiting {
            tracing::debug!(pool = %key.1, %error, "warm pool sandbox failed to start");
            return;
        }
        let wait = pool.backoff;
        pool.backoff = (wait * 2).min(MAX_BACKOFF);
        pool.waiting = true;
        tracing::warn!(
            pool = %key.1,
            %error,
            retry_in = ?wait,
            "warm pool sandbox failed to start; the pool is refilled again after a wait"
        );
        let this = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(wait).await;
            {
                let mut pools = this.inner.pools.lock().unwrap();
                match pools.get_mut(&key).filter(|p| p.generation == generation) {
                    Some(p) => p.waiting = false,
                    None => return,
                }
            }
            this.refill(key);
        });
    }

    /// A refill finished: keep the sandbox if its pool still wants it.
    fn offer(
        &self,
        key: &(String, String),
        generation: u64,
        started: &Result<Sandbox, crate::backend::BackendError>,
    ) -> bool {
        let mut pools = self.inner.pools.lock().unwrap();
        match pools.get_mut(key) {
            Some(p) if p.generation == generation => {
                p.filling -= 1;
                match started {
                    Ok(sb) if p.ready.len() < p.size as usize => {
                        p.ready.push_back(sb.clone());
                        p.last_failure = None;
                        if p.ready.len() == p.size as usize {
                            p.backoff = FIRST_BACKOFF;
                        }
                        true
                    }
                    _ => false,
                }
            }
            _ => false,
        }
    }

    /// Brings the pools in line with `definitions`; returns the names of sandboxes to remove and
    /// the pools to refill.
    pub(super) fn plan_pools(
        &self,
        definitions: Vec<Arc<CodeInterpreter>>,
        public_key: Option<String>,
    ) -> (Vec<String>, Vec<(String, String)>) {
        let mut stale = Vec::new();
        let mut kick = Vec::new();
        let mut pools = self.inner.pools.lock().unwrap();
        let wanted: HashMap<(String, String), Arc<CodeInterpreter>> = definitions
            .into_iter()
            .filter(|ci| ci.spec.warm_pool() > 0)
            .map(|ci| (key_of(&ci), ci))
            .collect();
        pools.retain(|key, pool| {
            let keep = wanted.contains_key(key);
            if !keep {
                stale.extend(pool.ready.drain(..).map(|s| s.name));
            }
            keep
        });
        for (key, ci) in wanted {
            let generation = generation_of(&ci, &public_key);
            let size = ci.spec.warm_pool();
            match pools.get_mut(&key) {
                Some(p) if p.generation == generation => {
                    p.size = size;
                    p.workload = Workload::CodeInterpreter(ci);
                    while p.ready.len() > size as usize {
                        stale.extend(p.ready.pop_back().map(|s| s.name));
                    }
                }
                existing => {
                    // New or changed definition: roll the pool.
                    if let Some(p) = existing {
                        stale.extend(p.ready.drain(..).map(|s| s.name));
                    }
                    pools.insert(
                        key.clone(),
                        Pool {
                            generation,
                            size,
                            ready: VecDeque::new(),
                            filling: 0,
                            workload: Workload::CodeInterpreter(ci),
                            public_key: public_key.clone(),
                            waiting: false,
                            backoff: FIRST_BACKOFF,
                            failed_starts: 0,
                            last_failure: None,
                        },
                    );
                }
            }
            kick.push(key);
        }
        (stale, kick)
    }
}
