//! Warm pools (claim, refill, exhaustion, rolling) and garbage collection.

mod common;

use std::time::Duration;

use common::*;

fn ready(s: &Stack) -> usize {
    s.backend.pool_status().first().map_or(0, |p| p.ready)
}

#[tokio::test]
async fn warm_pool_claim_refill_and_exhaustion() {
    let s = Stack::start(Options {
        manifests: code_interpreter("pool", "  warmPoolSize: 2\n"),
        ..Default::default()
    })
    .await;
    eventually("pool filled", 30, || ready(&s) == 2).await;
    let pooled = s.backend.running();
    assert_eq!(pooled.len(), 2);
    let a = s.create_ok("code-interpreter", "pool").await;
    assert!(
        pooled.contains(&a["sandboxName"].as_str().unwrap().to_string()),
        "served from the pool"
    );
    assert_eq!(exec(&a, &["echo", "warm"]).await["stdout"], "warm\n");
    eventually("pool refilled", 30, || ready(&s) == 2).await;
    // Exhaustion: more sessions than the pool holds still succeed (cold starts).
    let mut ids = vec![a["sessionId"].as_str().unwrap().to_string()];
    for _ in 0..4 {
        let v = s.create_ok("code-interpreter", "pool").await;
        ids.push(v["sessionId"].as_str().unwrap().to_string());
    }
    eventually("pool refilled again", 30, || ready(&s) == 2).await;
    for id in &ids {
        assert_eq!(s.delete(id).await.0, 200);
    }
    let admin = s.wm.as_ref().unwrap().admin_app();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/metrics", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, admin).await });
    let text = s.http.get(url).send().await.unwrap().text().await.unwrap();
    for line in [
        "agentcube_sandbox_create_total{kind=\"CodeInterpreter\",status=\"success\"} 5",
        "agentcube_sandbox_create_duration_seconds_count{kind=\"CodeInterpreter\",status=\"success\"} 5",
        "agentcube_sandbox_delete_total{kind=\"CodeInterpreter\"} 5",
        "agentcube_workload_manager_sessions_deleted_total 5",
        "agentcube_sandbox_rollback_total 0",
    ] {
        assert!(text.contains(line), "{line}\n{text}");
    }
    assert!(
        text.contains(
            "agentcube_workload_manager_warm_pool_ready{namespace=\"default\",name=\"pool\"}"
        ),
        "{text}"
    );
    assert_eq!(s.backend.running().len(), 2, "only the pool is left");
    s.shutdown_and_check_leaks().await;
}

/// A pool bigger than the memory budget holds: the starts that cannot fit fail, and the pool
/// waits before trying again (2 s, then 4 s, …) instead of retrying each failure at once (which
/// multiplied the retries and spun the manager's CPU); a claim still gets the one that fits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_that_cannot_fill_waits_between_rounds_of_failed_starts() {
    let s = Stack::start(Options {
        manifests: code_interpreter(
            "pool",
            "    resources:\n      limits:\n        memory: 256Mi\n  warmPoolSize: 20\n",
        ),
        memory_budget: Some(300 << 20),
        ..Default::default()
    })
    .await;
    eventually("one sandbox fits", 30, || ready(&s) == 1).await;
    let failed = || s.backend.pool_status()[0].failed_starts;
    eventually("the others failed", 30, || failed() >= 19).await;
    // Why, for the progress line of `agentcube up`.
    let failing = || {
        s.backend.pool_status()[0]
            .failing
            .clone()
            .unwrap_or_default()
    };
    eventually("the pool says why it cannot fill", 10, || {
        failing().contains("memory budget")
    })
    .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    // Rounds at 0 s, 2 s and 6 s at most: 19 starts fail in each.
    assert!(
        failed() <= 3 * 19,
        "{} failed starts in about 5 s",
        failed()
    );
    let v = s.create_ok("code-interpreter", "pool").await;
    assert_eq!(exec(&v, &["echo", "warm"]).await["stdout"], "warm\n");
    assert_eq!(s.delete(v["sessionId"].as_str().unwrap()).await.0, 200);
    s.shutdown_and_check_leaks().await;
}

#[tokio::test]
async fn changing_the_definition_rolls_the_pool() {
    let s = Stack::start(Options {
        manifests: code_interpreter("pool", "  warmPoolSize: 1\n"),
        ..Default::default()
    })
    .await;
    eventually("pool filled", 30, || ready(&s) == 1).await;
    let before = s.backend.running();
    let extra = "    environment:\n      - {name: FLAVOR, value: new}\n  warmPoolSize: 2\n";
    std::fs::write(
        s.dir.path().join("manifests/defs.yaml"),
        code_interpreter("pool", extra),
    )
    .unwrap();
    eventually("pool rolled to 2 new sandboxes", 30, || {
        let now = s.backend.running();
        ready(&s) == 2 && now.iter().all(|n| !before.contains(n))
    })
    .await;
    let v = s.create_ok("code-interpreter", "pool").await;
    assert_eq!(exec(&v, &sh("echo $FLAVOR")).await["stdout"], "new\n");
    // Pool size 0 removes the pool.
    std::fs::write(
        s.dir.path().join("manifests/defs.yaml"),
        code_interpreter("pool", ""),
    )
    .unwrap();
    eventually("pool drained", 30, || {
        s.backend.pool_status().is_empty() && s.backend.running().len() == 1
    })
    .await;
    s.shutdown_and_check_leaks().await;
}

/// A resize, or a change of the timeouts, starts no sandbox anew: the ready ones stay (they were
/// thrown away and restarted, a new image pull's worth of work on every resize).
#[tokio::test]
async fn resizing_the_pool_keeps_its_ready_sandboxes() {
    let s = Stack::start(Options {
        manifests: code_interpreter("pool", "  warmPoolSize: 1\n"),
        ..Default::default()
    })
    .await;
    eventually("pool filled", 30, || ready(&s) == 1).await;
    let first = s.backend.running();
    let write = |extra: &str| {
        std::fs::write(
            s.dir.path().join("manifests/defs.yaml"),
            code_interpreter("pool", extra),
        )
        .unwrap()
    };
    write("  warmPoolSize: 3\n  sessionTimeout: 20m\n  maxSessionDuration: 30m\n");
    eventually("pool grown to 3", 30, || ready(&s) == 3).await;
    let grown = s.backend.running();
    assert!(
        first.iter().all(|n| grown.contains(n)),
        "{first:?} kept in {grown:?}"
    );
    write("  warmPoolSize: 2\n  sessionTimeout: 20m\n  maxSessionDuration: 30m\n");
    eventually("pool shrunk to 2", 30, || {
        ready(&s) == 2 && s.backend.running().len() == 2
    })
    .await;
    let shrunk = s.backend.running();
    assert!(
        shrunk.iter().all(|n| grown.contains(n)),
        "{shrunk:?} within {grown:?}"
    );
    // A session claimed from it gets the definition's new timeouts.
    let v = s.create_ok("code-interpreter", "pool").await;
    let record = s.store.get(v["sessionId"].as_str().unwrap()).await.unwrap();
    assert!(grown.contains(&record.name), "claimed from the kept pool");
    assert_eq!(record.idle_timeout.to_string(), "20m0s");
    let lifetime = record.expires_at.duration_since(record.created_at);
    assert_eq!(lifetime, jiff::SignedDuration::from_mins(30));
    s.shutdown_and_check_leaks().await;
}

#[tokio::test]
async fn gc_reclaims_idle_and_expired_sessions() {
    let s = Stack::start(Options {
        manifests: code_interpreter("idle", "  sessionTimeout: 1s\n")
            + &code_interpreter("short", "  maxSessionDuration: 2s\n"),
        ..Default::default()
    })
    .await;
    let idle = s.create_ok("code-interpreter", "idle").await;
    let short = s.create_ok("code-interpreter", "short").await;
    let manager = s.wm.as_ref().unwrap().manager.clone();
    let gc = agentcube_workload_manager::gc::Gc {
        manager,
        interval: Duration::from_secs(3600),
        limit: 100,
    };
    let now = jiff::Timestamp::now();
    assert_eq!(gc.run_once(now).await, 0, "nothing is due yet");
    // Activity keeps a session alive.
    let later = now + jiff::SignedDuration::from_millis(1500);
    s.store
        .touch(idle["sessionId"].as_str().unwrap(), later)
        .await
        .unwrap();
    assert_eq!(gc.run_once(later).await, 0);
    let due = later + jiff::SignedDuration::from_secs(2);
    assert_eq!(
        gc.run_once(due).await,
        2,
        "idle past 1s and past maxSessionDuration 2s"
    );
    for v in [&idle, &short] {
        assert!(s.store.get(v["sessionId"].as_str().unwrap()).await.is_err());
    }
    assert!(s.backend.running().is_empty());
    let text = gc.manager.metrics.encode();
    for line in [
        "agentcube_gc_sandboxes_reclaimed_total{reason=\"idle\"} 1",
        "agentcube_gc_sandboxes_reclaimed_total{reason=\"expired\"} 1",
        "agentcube_gc_errors_total 0",
    ] {
        assert!(text.contains(line), "{line}\n{text}");
    }
    // Our three passes, plus any of the Workload Manager's own loop.
    let cycles: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("agentcube_gc_cycle_duration_seconds_count "))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(cycles >= 3, "{text}");
    s.shutdown_and_check_leaks().await;
}

#[tokio::test]
async fn gc_loop_deletes_within_timeout_plus_interval_plus_a_second() {
    let s = Stack::start(Options {
        manifests: code_interpreter("idle", "  sessionTimeout: 1s\n"),
        gc_interval: Duration::from_millis(500),
        ..Default::default()
    })
    .await;
    let v = s.create_ok("code-interpreter", "idle").await;
    let id = v["sessionId"].as_str().unwrap().to_string();
    let started = std::time::Instant::now();
    // Activity is recorded in whole seconds: allow one more second of rounding.
    let bound = Duration::from_secs(1)
        + Duration::from_millis(500)
        + Duration::from_secs(1)
        + Duration::from_secs(1);
    loop {
        if s.store.get(&id).await.is_err() {
            break;
        }
        assert!(
            started.elapsed() < bound + Duration::from_secs(2),
            "session still alive after {:?}",
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eventually("sandbox removed", 5, || s.backend.running().is_empty()).await;
    s.shutdown_and_check_leaks().await;
}
