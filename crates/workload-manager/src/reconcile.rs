//! Start-up reconciliation: the store and the platform are brought back in line after a crash, a
//! lost Redis, or a restart. Records whose sandbox is gone are deleted; sandboxes whose session
//! has no record are deleted. Idempotent; placeholders of creates that may still be running (on
//! another replica) are left alone.

use std::collections::HashSet;

use agentcube_store::Scope;
use agentcube_types::SessionStatus;
use jiff::{SignedDuration, Timestamp};

use crate::sessions::Manager;

/// What one pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Report {
    /// Records examined.
    pub records: usize,
    /// Records deleted because their sandbox no longer exists.
    pub stale_records: usize,
    /// Sandboxes deleted because no record names their session.
    pub orphans: usize,
}

/// Records read per store round trip.
const PAGE: usize = 500;

/// One pass over every record and every sandbox.
#[tracing::instrument(name = "reconcile", skip_all)]
pub async fn run(manager: &Manager, now: Timestamp) -> Result<Report, agentcube_store::Error> {
    let store = &manager.store;
    let young = SignedDuration::try_from(manager.create_timeout * 2).unwrap_or(SignedDuration::MAX);
    let mut report = Report::default();
    let mut live = HashSet::new();
    let mut cursor: Option<String> = None;
    loop {
        let page = store
            .list_page(&Scope::All, cursor.as_deref(), PAGE)
            .await?;
        for r in page.records {
            report.records += 1;
            let creating = r.status == SessionStatus::Creating && now < r.created_at + young;
            if !creating && manager.backend.sandbox_exists(&r).await == Some(false) {
                if store.delete(&r.session_id).await? {
                    report.stale_records += 1;
                }
                continue;
            }
            live.insert(r.session_id);
        }
        match page.next {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    report.orphans = manager.backend.delete_orphans(&live).await;
    manager
        .metrics
        .reconciled_records
        .inc_by(report.stale_records as u64);
    manager
        .metrics
        .reconciled_orphans
        .inc_by(report.orphans as u64);
    Ok(report)
}
