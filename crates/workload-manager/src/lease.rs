//! One Workload Manager deployment per session store.
//!
//! Start-up reconciliation and the collector delete records whose sandbox their own platform
//! does not have, and sandboxes that have no record. Two managers of different platforms on one
//! store — `agentcube up` on two hosts with one Redis, a local and a cluster manager — would
//! each delete the other's sessions as stale. The first to start holds the store's lease (a mark
//! it renews while it runs, [`TTL`]); a manager of another platform is refused at start, told
//! which one holds it. Replicas of one platform (a cluster's Workload Managers, a restart with
//! the same state directory) name the same holder and share it. A holder that stalls past the
//! lease (a suspended laptop, a stopped process) may find another platform holding it when it
//! wakes: it then stops ([`LeaseLost`]), as it would have been refused at start.

use std::sync::Arc;
use std::time::Duration;

use agentcube_store::SessionStore;

/// The mark holding the lease (its value names the holder).
pub const MARK: &str = "workload-manager";

/// How long the lease outlives its holder's last renewal (renewed every third of it).
pub const TTL: Duration = Duration::from_secs(30);

/// The store's lease, held by this manager's platform.
pub struct StoreLease {
    store: Arc<dyn SessionStore>,
    holder: String,
}

impl StoreLease {
    /// Takes the lease for `holder` (a platform's own words: "the local backend of host h with
    /// state directory /d"), or refuses with the holder that has it.
    pub async fn acquire(store: Arc<dyn SessionStore>, holder: String) -> anyhow::Result<Self> {
        let lease = Self { store, holder };
        // A lease that expires between the two reads is taken on the next round.
        for _ in 0..3 {
            if lease.store.set_mark(MARK, &lease.holder, TTL, true).await? {
                return Ok(lease);
            }
            let now = lease.store.get_marks(&[MARK.to_string()]).await?;
            match now.into_iter().next().flatten() {
                Some(h) if h == lease.holder => {
                    lease.renew().await?;
                    return Ok(lease);
                }
                Some(other) => anyhow::bail!(
                    "the session store is in use by another Workload Manager ({other}); this one \
                     is {}. Each would delete the other's sessions as stale: give each its own \
                     store (another Redis, or another database of it: redis://host:6379/1). A \
                     holder that stopped lets go {} s after it stopped",
                    lease.holder,
                    TTL.as_secs()
                ),
                None => continue,
            }
        }
        anyhow::bail!("cannot take the session store's lease (it kept changing hands)")
    }

    /// [`StoreLease::acquire`], then [`StoreLease::keep`] in a task of its own; the manager
    /// stops when the returned [`LeaseLost`] resolves.
    pub async fn hold(store: Arc<dyn SessionStore>, holder: String) -> anyhow::Result<LeaseLost> {
        let lease = Self::acquire(store, holder).await?;
        let mine = lease.holder.clone();
        Ok(LeaseLost {
            keeper: tokio::spawn(lease.keep()),
            mine,
        })
    }

    async fn renew(&self) -> Result<bool, agentcube_store::Error> {
        self.store.set_mark(MARK, &self.holder, TTL, false).await
    }

    /// Renews the lease every third of [`TTL`] until another manager has taken it (this one
    /// stalled past [`TTL`]); returns that manager's holder.
    pub async fn keep(self) -> String {
        let mut tick = tokio::time::interval(TTL / 3);
        tick.tick().await;
        loop {
            tick.tick().await;
            let now = self.store.get_marks(&[MARK.to_string()]).await;
            match now.map(|m| m.into_iter().next().flatten()) {
                Ok(Some(other)) if other != self.holder => return other,
                Ok(_) => {
                    if let Err(e) = self.renew().await {
                        tracing::warn!(error = %e, "cannot renew the session store's lease");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot renew the session store's lease"),
            }
        }
    }
}

/// Resolves when another Workload Manager took the store's lease from this one: this one must
/// stop, or each deletes the other's sessions as stale.
#[must_use = "the manager must stop when its lease is lost"]
pub struct LeaseLost {
    keeper: tokio::task::JoinHandle<String>,
    mine: String,
}

impl LeaseLost {
    /// Waits for the loss; the error to stop with.
    pub async fn wait(self) -> anyhow::Error {
        match self.keeper.await {
            Ok(other) => anyhow::anyhow!(
                "another Workload Manager ({other}) took the session store while this one ({}) \
                 was stalled past its lease ({} s); this one stops so that neither deletes the \
                 other's sessions: give each its own store",
                self.mine,
                TTL.as_secs()
            ),
            Err(e) => anyhow::anyhow!("the session store's lease keeper failed: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_platform_holds_a_store_and_shares_it_with_its_own_replicas() {
        let store: Arc<dyn SessionStore> = Arc::new(agentcube_store::MemoryStore::new());
        let local = || "the local backend of a with state directory /s".to_string();
        StoreLease::acquire(store.clone(), local()).await.unwrap();
        // A restart (or another replica) of the same platform.
        StoreLease::acquire(store.clone(), local()).await.unwrap();
        let other = "the local backend of b with state directory /s".to_string();
        let refused = StoreLease::acquire(store.clone(), other).await;
        let why = refused.err().unwrap().to_string();
        assert!(
            why.contains("in use by another Workload Manager (the local backend of a with"),
            "{why}"
        );
        assert!(why.contains("this one is the local backend of b"), "{why}");
    }

    async fn holder(store: &dyn SessionStore) -> Option<String> {
        store
            .get_marks(&[MARK.to_string()])
            .await
            .unwrap()
            .remove(0)
    }

    #[tokio::test(start_paused = true)]
    async fn the_holder_renews_its_lease_and_never_takes_over_anothers() {
        let store: Arc<dyn SessionStore> = Arc::new(agentcube_store::MemoryStore::new());
        let lease = StoreLease::acquire(store.clone(), "a".into())
            .await
            .unwrap();
        let keeper = tokio::spawn(lease.keep());
        // About to lapse: renewed at the next tick.
        store
            .set_mark(MARK, "a", Duration::from_millis(1), false)
            .await
            .unwrap();
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(holder(store.as_ref()).await, None);
        tokio::time::sleep(TTL / 3 + Duration::from_millis(1)).await;
        assert_eq!(holder(store.as_ref()).await.as_deref(), Some("a"));
        // Taken by another (this one stalled): left to it, and the keeper ends, naming it.
        store.set_mark(MARK, "b", TTL, false).await.unwrap();
        tokio::time::sleep(TTL / 3).await;
        assert_eq!(holder(store.as_ref()).await.as_deref(), Some("b"));
        assert_eq!(keeper.await.unwrap(), "b");
    }

    #[tokio::test(start_paused = true)]
    async fn a_holder_whose_lease_was_taken_is_told_to_stop() {
        let store: Arc<dyn SessionStore> = Arc::new(agentcube_store::MemoryStore::new());
        let lost = StoreLease::hold(store.clone(), "a".into()).await.unwrap();
        // "a" stalled past its lease; "b" started and took the store.
        store.set_mark(MARK, "b", TTL, false).await.unwrap();
        let why = tokio::time::timeout(TTL, lost.wait())
            .await
            .unwrap()
            .to_string();
        assert!(
            why.starts_with(
                "another Workload Manager (b) took the session store while this one (a)"
            ),
            "{why}"
        );
    }
}
