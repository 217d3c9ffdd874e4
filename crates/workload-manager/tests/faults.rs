//! Faults and caps on the local backend (issue 14): sandboxes that die, records that vanish, a
//! restart on an old store, and admission caps. Real bubblewrap sandboxes and PicoD processes.

mod common;

use std::sync::Arc;
use std::time::Duration;

use agentcube_store::SessionStore;
use agentcube_workload_manager::sessions::Admission;
use common::*;

/// Host pids of a sandbox's processes whose command line starts with `prefix`.
fn sandbox_pids(s: &Stack, name: &str, prefix: &str) -> Vec<i32> {
    let procs = s
        .backend
        .cgroup_dirs(name)
        .into_iter()
        .find(|d| d.to_string_lossy().contains("/pids/") || d.join("cgroup.procs").exists())
        .map(|d| std::fs::read_to_string(d.join("cgroup.procs")).unwrap_or_default())
        .unwrap_or_default();
    procs
        .lines()
        .filter_map(|l| l.trim().parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.starts_with(prefix.as_bytes()))
        })
        .collect()
}

fn kill9(pid: i32) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
}

/// Reclaimed when it dies, not at GC's next run (an hour away here): until then the Router
/// answered the session's calls with 502 "sandbox unreachable" instead of ending it.
#[tokio::test]
async fn a_sandbox_whose_picod_dies_is_reclaimed_with_its_session() {
    let s = Stack::start(Options {
        manifests: code_interpreter("ci", ""),
        ..Default::default()
    })
    .await;
    assert!(
        s.backend.enforces_limits(),
        "the test finds PicoD through its cgroup"
    );
    let v = s.create_ok("code-interpreter", "ci").await;
    let (id, name) = (
        v["sessionId"].as_str().unwrap().to_string(),
        v["sandboxName"].as_str().unwrap().to_string(),
    );
    let cgroups = s.backend.cgroup_dirs(&name);
    let picod = sandbox_pids(&s, &name, "/opt/agentcube/picod");
    assert_eq!(picod.len(), 1, "one PicoD in the sandbox");
    kill9(picod[0]);
    eventually("the dead sandbox reclaimed", 10, || {
        s.backend.running().is_empty()
    })
    .await;
    eventually("its record deleted", 5, || {
        futures_util::FutureExt::now_or_never(s.store.get(&id))
            .is_some_and(|r| matches!(r, Err(agentcube_store::Error::NotFound)))
    })
    .await;
    for d in &cgroups {
        assert!(!d.exists(), "{} left behind", d.display());
    }
    let paths = s.backend.paths(&name);
    assert!(!paths.dir.exists() && !paths.private.exists());
    s.shutdown_and_check_leaks().await;
}

/// A stack whose CodeInterpreter `ci` has a warm pool of one, filled.
async fn one_warm_sandbox(gc_interval: Duration) -> Stack {
    let s = Stack::start(Options {
        manifests: code_interpreter("ci", "  warmPoolSize: 1\n"),
        gc_interval,
        ..Default::default()
    })
    .await;
    eventually("pool filled", 20, || {
        s.backend
            .pool_status()
            .first()
            .is_some_and(|p| p.ready == 1)
    })
    .await;
    s
}

/// A pool refill still starting when the manager shuts down (the session just took the pool's
/// member) is waited for and removed: shutdown used to sweep only what was already running, and
/// a start not yet registered left its directories and processes behind.
#[tokio::test]
async fn a_refill_starting_at_shutdown_leaves_nothing() {
    let s = one_warm_sandbox(Duration::from_secs(3600)).await;
    s.create_ok("code-interpreter", "ci").await;
    s.shutdown_and_check_leaks().await;
}

/// A sandbox's log goes with it: when one dies, what it last printed (why an agent died) is
/// kept in the manager's log.
#[tokio::test]
async fn a_dead_agents_last_words_reach_the_managers_log() {
    let (_guard, logs) = common::Logs::start();
    let s = Stack::start(Options {
        manifests: host_agent(
            "dies",
            8080,
            r#"[sh, -c, "python3 -m http.server 8080 --bind 127.0.0.1 >/dev/null 2>&1 &
              sleep 3; echo first-words; echo goodbye-from-the-agent >&2; exit 7"]"#,
        ),
        ..Default::default()
    })
    .await;
    // Ready well before it exits (3 s later, leaving a slow machine time to start Python).
    let v = s.create_ok("agent-runtime", "dies").await;
    eventually("the dead sandbox reclaimed", 20, || {
        s.backend.running().is_empty()
    })
    .await;
    let line = logs.line_with("reclaiming a dead sandbox");
    assert!(
        line.contains(v["sandboxName"].as_str().unwrap())
            && line.contains("first-words | goodbye-from-the-agent"),
        "{line}"
    );
    s.shutdown_and_check_leaks().await;
}

#[tokio::test]
async fn a_dead_warm_sandbox_leaves_its_pool_and_is_replaced() {
    let s = one_warm_sandbox(Duration::from_millis(200)).await;
    let first = s.backend.running();
    let pids = sandbox_pids(&s, &first[0], "/opt/agentcube/picod");
    kill9(pids[0]);
    eventually("a new pool member", 20, || {
        let now = s.backend.running();
        now.len() == 1 && now != first && s.backend.pool_status()[0].ready == 1
    })
    .await;
    // The session is served by the new, live member.
    let v = s.create_ok("code-interpreter", "ci").await;
    assert_ne!(v["sandboxName"].as_str().unwrap(), first[0]);
    assert_eq!(exec(&v, &["echo", "ok"]).await["stdout"], "ok\n");
    s.shutdown_and_check_leaks().await;
}

/// Only the sandbox whose record is gone goes (the records are checked in batches), and a
/// store that cannot answer deletes nothing.
#[tokio::test]
async fn a_sandbox_whose_record_vanished_is_deleted() {
    let flaky = Arc::new(agentcube_store::testing::Flaky::new(Arc::new(
        agentcube_store::MemoryStore::new(),
    )));
    let s = Stack::start(Options {
        manifests: code_interpreter("ci", ""),
        gc_interval: Duration::from_millis(200),
        store: Some(flaky.clone()),
        ..Default::default()
    })
    .await;
    let mut sessions = Vec::new();
    for _ in 0..3 {
        sessions.push(s.create_ok("code-interpreter", "ci").await);
    }
    let name = |v: &serde_json::Value| v["sandboxName"].as_str().unwrap().to_string();
    let id = |v: &serde_json::Value| v["sessionId"].as_str().unwrap().to_string();
    // An outage: every lookup fails, and no sandbox is taken for an orphan.
    flaky.set_down(true);
    let refused = flaky.refused.load(std::sync::atomic::Ordering::SeqCst);
    eventually("GC runs during the outage", 10, || {
        flaky.refused.load(std::sync::atomic::Ordering::SeqCst) > refused + 3
    })
    .await;
    assert_eq!(s.backend.running().len(), 3);
    flaky.set_down(false);
    // The store lost one record (a Redis restarted without persistence).
    assert!(s.store.delete(&id(&sessions[1])).await.unwrap());
    eventually("the orphaned sandbox deleted", 10, || {
        s.backend.running().len() == 2
    })
    .await;
    let mut left = s.backend.running();
    left.sort();
    let mut kept = vec![name(&sessions[0]), name(&sessions[2])];
    kept.sort();
    assert_eq!(left, kept);
    for v in [&sessions[0], &sessions[2]] {
        assert_eq!(exec(v, &["echo", "ok"]).await["stdout"], "ok\n");
    }
    s.shutdown_and_check_leaks().await;
}

#[tokio::test]
async fn a_restart_on_an_old_store_deletes_records_whose_sandbox_is_gone() {
    let store: Arc<dyn SessionStore> = Arc::new(agentcube_store::MemoryStore::new());
    let first = Stack::start(Options {
        manifests: code_interpreter("ci", ""),
        store: Some(store.clone()),
        ..Default::default()
    })
    .await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(
            first.create_ok("code-interpreter", "ci").await["sessionId"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    // A clean stop removes the sandboxes but (sessions outlive a restart) keeps the records.
    let dir = first.stop_keeping_dir().await;
    assert_eq!(store.count(&agentcube_store::Scope::All).await.unwrap(), 3);
    // Someone else's record in the same store (a cluster's) is not ours to judge.
    let mut foreign = store.get(&ids[0]).await.unwrap();
    foreign.session_id = "foreign".into();
    foreign.entry_points.as_mut().unwrap()[0].endpoint = "10.0.0.9:8080".into();
    store
        .insert(&foreign, jiff::Timestamp::now())
        .await
        .unwrap();
    let second = Stack::start(Options {
        manifests: code_interpreter("ci", ""),
        store: Some(store.clone()),
        dir: Some(dir),
        ..Default::default()
    })
    .await;
    for id in &ids {
        assert!(
            matches!(store.get(id).await, Err(agentcube_store::Error::NotFound)),
            "{id} should have been reconciled away"
        );
    }
    assert!(store.get("foreign").await.is_ok());
    let metrics = second.wm.as_ref().unwrap().admin_app();
    let body = metrics_text(metrics).await;
    assert!(body.contains("reconciled_stale_records_total 3"), "{body}");
    second.shutdown_and_check_leaks().await;
}

async fn metrics_text(app: axum::Router) -> String {
    use http_body_util::BodyExt;
    use tower::ServiceExt;
    let resp = app
        .oneshot(
            axum::http::Request::get("/metrics")
                .body(axum::body::Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    String::from_utf8(
        resp.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap()
}

#[tokio::test]
async fn the_session_cap_refuses_with_429_and_creates_nothing() {
    let s = Stack::start(Options {
        manifests: code_interpreter("ci", ""),
        admission: Admission {
            max_sessions: Some(2),
            ..Default::default()
        },
        ..Default::default()
    })
    .await;
    s.create_ok("code-interpreter", "ci").await;
    s.create_ok("code-interpreter", "ci").await;
    let (status, v) = s.create("code-interpreter", "ci").await;
    assert_eq!(status, 429, "{v}");
    assert!(
        v["message"].as_str().unwrap().contains("--max-sessions"),
        "{v}"
    );
    assert_eq!(
        s.backend.running().len(),
        2,
        "no sandbox for the refused create"
    );
    assert_eq!(
        s.store.count(&agentcube_store::Scope::All).await.unwrap(),
        2,
        "no record either"
    );
    s.shutdown_and_check_leaks().await;
}

/// A stack whose memory budget (300Mi) holds one sandbox of `ci` (256Mi) at a time.
async fn one_sandbox_budget() -> Stack {
    Stack::start(Options {
        manifests: code_interpreter(
            "ci",
            "    resources:\n      limits:\n        memory: 256Mi\n",
        ),
        memory_budget: Some(300 << 20),
        ..Default::default()
    })
    .await
}

#[tokio::test]
async fn a_cgroup_that_outlives_its_kill_is_retried_and_keeps_its_memory_held() {
    let s = one_sandbox_budget().await;
    let first = s.create_ok("code-interpreter", "ci").await;
    let dirs = s
        .backend
        .cgroup_dirs(first["sandboxName"].as_str().unwrap());
    assert!(
        !dirs.is_empty(),
        "these tests run where cgroups are enforced"
    );
    // What keeps a cgroup after its processes are killed (a process stuck in the kernel, on a
    // hung filesystem) stood in for by a child cgroup: the kernel refuses to remove either.
    let holder = dirs[0].join("held");
    std::fs::create_dir(&holder).unwrap();
    assert_eq!(s.delete(first["sessionId"].as_str().unwrap()).await.0, 200);
    assert!(s.backend.running().is_empty());
    assert!(dirs[0].exists());
    assert_eq!(s.backend.reclaiming(), 1);
    // Its memory still counts against the budget while its cgroup is there.
    let (status, v) = s.create("code-interpreter", "ci").await;
    assert_eq!(status, 429, "{v}");
    std::fs::remove_dir(&holder).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    while dirs.iter().any(|d| d.exists()) {
        assert!(std::time::Instant::now() < deadline, "{dirs:?} not retried");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Gone, and its memory with it.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (status, v) = s.create("code-interpreter", "ci").await;
        if status == 200 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{status} {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(s.backend.reclaiming(), 0);
    s.shutdown_and_check_leaks().await;
}

/// A process frozen by the cgroup v1 freezer survives SIGKILL, in the kernel, until it is thawed
/// (then it dies): a process stuck on a hung filesystem, made on demand. Thawed on drop.
struct Frozen(std::path::PathBuf);

impl Frozen {
    /// `None` where this host has no cgroup v1 freezer.
    fn freeze(pid: &str) -> Option<Self> {
        let root = std::path::Path::new("/sys/fs/cgroup/freezer");
        if !root.join("cgroup.procs").is_file() {
            return None;
        }
        let dir = root.join(format!("agentcube-test-{}-{pid}", std::process::id()));
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("cgroup.procs"), pid).unwrap();
        std::fs::write(dir.join("freezer.state"), "FROZEN").unwrap();
        let state = || std::fs::read_to_string(dir.join("freezer.state")).unwrap();
        while state().trim() != "FROZEN" {
            std::thread::sleep(Duration::from_millis(10));
        }
        Some(Self(dir))
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = std::fs::write(self.0.join("freezer.state"), "THAWED");
        for _ in 0..500 {
            if std::fs::remove_dir(&self.0).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// What the first manager of the test below leaves: its directory, the uid and cgroup of its
/// sandbox, and that sandbox's frozen process.
struct LeftBehind {
    dir: tempfile::TempDir,
    uid: u32,
    cgroup: Vec<std::path::PathBuf>,
    frozen: Frozen,
}

/// A manager whose sandbox has a process that outlives SIGKILL, stopped cleanly, on a runtime of
/// its own that is then dropped: its background retry of the cgroup ends with it, as when its
/// process exits. `None` (after a clean stop) where there is no cgroup v1 freezer.
fn a_manager_that_leaves_a_frozen_process() -> Option<LeftBehind> {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let left = rt.block_on(async {
        let first = Stack::start(Options {
            manifests: code_interpreter("ci", ""),
            ..Default::default()
        })
        .await;
        let v = first.create_ok("code-interpreter", "ci").await;
        let name = v["sandboxName"].as_str().unwrap().to_string();
        let uid = first
            .backend
            .sandbox_uid(&name)
            .expect("root: a uid per sandbox");
        let cgroup = first.backend.cgroup_dirs(&name);
        let procs = std::fs::read_to_string(cgroup[0].join("cgroup.procs")).unwrap();
        let Some(frozen) = Frozen::freeze(procs.lines().next().unwrap()) else {
            first.shutdown_and_check_leaks().await;
            return None;
        };
        // A clean stop kills the sandbox; the frozen process stays, and its cgroup with it.
        let dir = first.stop_keeping_dir().await;
        assert!(cgroup.iter().any(|d| d.exists()));
        Some(LeftBehind {
            dir,
            uid,
            cgroup,
            frozen,
        })
    });
    drop(rt);
    left
}

#[tokio::test]
async fn a_process_outliving_its_sandbox_and_manager_keeps_its_uid_from_new_sandboxes() {
    let first = std::thread::spawn(a_manager_that_leaves_a_frozen_process);
    let Some(left) = first.join().unwrap() else {
        eprintln!("skipped: no cgroup v1 freezer here to make a process that outlives SIGKILL");
        return;
    };
    // The next manager hands out uids from the start of the range again: its first sandbox would
    // get the uid the frozen process still runs as.
    let second = Stack::start(Options {
        manifests: code_interpreter("ci", ""),
        dir: Some(left.dir),
        ..Default::default()
    })
    .await;
    assert_eq!(second.backend.reclaiming(), 1, "the leftover is counted");
    let v = second.create_ok("code-interpreter", "ci").await;
    let next = second
        .backend
        .sandbox_uid(v["sandboxName"].as_str().unwrap());
    assert!(
        next.is_some() && next != Some(left.uid),
        "{next:?} = {}",
        left.uid
    );
    drop(left.frozen);
    // Thawed, the process dies; the second manager's background retry removes its cgroup (the
    // first one's retry is gone with its runtime).
    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    while left.cgroup.iter().any(|d| d.exists()) || second.backend.reclaiming() > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "{:?} left, {} reclaiming",
            left.cgroup,
            second.backend.reclaiming()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    second.shutdown_and_check_leaks().await;
}

#[tokio::test]
async fn the_memory_budget_refuses_with_429_and_creates_nothing() {
    let s = one_sandbox_budget().await;
    let first = s.create_ok("code-interpreter", "ci").await;
    let (status, v) = s.create("code-interpreter", "ci").await;
    assert_eq!(status, 429, "{v}");
    let msg = v["message"].as_str().unwrap();
    assert!(
        msg.contains("memory budget") && msg.contains("--memory-budget"),
        "{msg}"
    );
    assert_eq!(s.backend.running().len(), 1);
    // Deleting the first frees its share of the budget.
    assert_eq!(s.delete(first["sessionId"].as_str().unwrap()).await.0, 200);
    s.create_ok("code-interpreter", "ci").await;
    s.shutdown_and_check_leaks().await;
}
