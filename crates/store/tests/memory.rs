//! The conformance suite on [`MemoryStore`], plus its complexity check.

use agentcube_store::testing::{Fixture, cases};
use agentcube_store::{MemoryStore, SessionStore};

agentcube_store::conformance_tests!(Fixture::memory());

#[tokio::test]
async fn listing_examines_only_what_it_returns() {
    let s = MemoryStore::new();
    for i in 0..50_000 {
        s.insert(
            &cases::record(&format!("s{i:05}"), i),
            jiff::Timestamp::UNIX_EPOCH,
        )
        .await
        .unwrap();
    }
    let before = s.examined();
    let t = "2026-08-03T04:05:06Z".parse::<jiff::Timestamp>().unwrap()
        + jiff::SignedDuration::from_secs(100_000);
    assert_eq!(s.list_expired(t, 10).await.unwrap().len(), 10);
    assert_eq!(s.list_idle(t, 0, 10).await.unwrap().len(), 10);
    assert_eq!(
        s.examined() - before,
        20,
        "a listing must not walk all 50k sessions"
    );
}
