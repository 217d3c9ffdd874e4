//! Local sandbox isolation. Each test would fail if its isolation were missing.

mod common;

use common::*;

async fn stack(extra: &str, pids: u64) -> (Stack, serde_json::Value) {
    let s = Stack::start(Options {
        manifests: code_interpreter("ci", extra),
        pids,
        ..Default::default()
    })
    .await;
    let v = s.create_ok("code-interpreter", "ci").await;
    (s, v)
}

#[tokio::test]
async fn no_network_from_inside() {
    // A host port that is really listening: the WM itself.
    let (s, v) = stack("", 512).await;
    let port = s.url.rsplit(':').next().unwrap().to_string();
    let script = format!(
        "import socket\ntry:\n    socket.create_connection(('127.0.0.1', {port}), 2)\n    print('CONNECTED')\nexcept OSError as e:\n    print('refused', e)\n"
    );
    let out = exec(&v, &["python3", "-c", &script]).await;
    assert!(
        out["stdout"].as_str().unwrap().starts_with("refused"),
        "{out}"
    );
    // From the host the same port answers, so the refusal comes from the sandbox.
    assert!(std::net::TcpStream::connect(format!("127.0.0.1:{port}")).is_ok());
    let out = exec(&v, &["cat", "/proc/net/dev"]).await;
    let ifaces: Vec<_> = out["stdout"]
        .as_str()
        .unwrap()
        .lines()
        .skip(2)
        .map(|l| l.split(':').next().unwrap().trim().to_string())
        .collect();
    assert_eq!(ifaces, ["lo"], "only loopback inside");
    s.shutdown_and_check_leaks().await;
}

#[tokio::test]
async fn host_system_directories_are_read_only() {
    let (s, v) = stack("", 512).await;
    let out = exec(&v, &sh("touch /usr/agentcube-escape 2>&1; echo rc=$?")).await;
    assert!(out["stdout"].as_str().unwrap().contains("rc=1"), "{out}");
    assert!(!std::path::Path::new("/usr/agentcube-escape").exists());
    let out = exec(&v, &sh("echo x > /etc/agentcube-escape; ls /etc")).await;
    assert!(
        !std::path::Path::new("/etc/agentcube-escape").exists(),
        "host /etc untouched"
    );
    assert!(
        !out["stdout"].as_str().unwrap().contains("shadow"),
        "no /etc/shadow inside: {out}"
    );
    let out = exec(&v, &sh("cat /etc/shadow; echo rc=$?")).await;
    assert!(out["stdout"].as_str().unwrap().contains("rc=1"));
    s.shutdown_and_check_leaks().await;
}

#[tokio::test]
async fn host_processes_are_invisible() {
    let (s, v) = stack("", 512).await;
    let out = exec(
        &v,
        &sh("ls /proc | grep -c '^[0-9]'; cat /proc/1/cmdline | tr '\\0' ' '"),
    )
    .await;
    let text = out["stdout"].as_str().unwrap();
    let count: usize = text.lines().next().unwrap().parse().unwrap();
    let host: usize = std::fs::read_dir("/proc")
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .chars()
                .all(|c| c.is_ascii_digit())
        })
        .count();
    assert!(
        count < 10 && count < host,
        "sandbox sees {count} processes (host has {host})"
    );
    assert!(
        text.lines().nth(1).unwrap().contains("bwrap"),
        "pid 1 is the sandbox's own init: {text}"
    );
    s.shutdown_and_check_leaks().await;
}

#[tokio::test]
async fn sandboxes_cannot_read_each_other() {
    let s = Stack::start(Options {
        manifests: code_interpreter("ci", ""),
        ..Default::default()
    })
    .await;
    let a = s.create_ok("code-interpreter", "ci").await;
    let b = s.create_ok("code-interpreter", "ci").await;
    exec(&a, &sh("echo top-secret > secret.txt")).await;
    let a_ws = sandbox_ws(&s.backend, a["sandboxName"].as_str().unwrap());
    assert_eq!(
        std::fs::read_to_string(a_ws.join("secret.txt")).unwrap(),
        "top-secret\n"
    );
    let script = format!(
        "cat {}/secret.txt; cat /root/secret.txt; grep -r top-secret / 2>/dev/null; echo done",
        a_ws.display()
    );
    let out = exec(&b, &sh(&script)).await;
    assert!(
        !out["stdout"].as_str().unwrap().contains("top-secret"),
        "{out}"
    );
    s.shutdown_and_check_leaks().await;
}

#[tokio::test]
async fn no_capabilities_and_not_root_outside() {
    let (s, v) = stack("", 512).await;
    let out = exec(&v, &sh("grep -E 'CapEff|CapPrm|CapBnd' /proc/self/status")).await;
    for line in out["stdout"].as_str().unwrap().lines() {
        assert!(line.ends_with("0000000000000000"), "{line}");
    }
    // The sandbox's processes run as an unprivileged uid on the host.
    let out = exec(&v, &sh("echo $$ > /root/pid; sleep 2")).await;
    assert_eq!(out["exit_code"], 0);
    let name = v["sandboxName"].as_str().unwrap();
    let ws = sandbox_ws(&s.backend, name);
    let meta = std::fs::metadata(ws.join("pid")).unwrap();
    if nix::unistd::Uid::effective().is_root() {
        let uid = s.backend.sandbox_uid(name).expect("a uid of its own");
        assert!(uid >= 2_000_000_000, "from the sandbox range: {uid}");
        assert_eq!(
            std::os::unix::fs::MetadataExt::uid(&meta),
            uid,
            "files written inside are owned by the sandbox's own uid"
        );
    }
    s.shutdown_and_check_leaks().await;
}

#[tokio::test]
async fn memory_limit_kills_a_hog() {
    let (s, v) = stack("    resources:\n      limits:\n        memory: 64Mi\n", 512).await;
    assert!(
        s.backend.enforces_limits(),
        "cgroups must be available for this test"
    );
    let out = exec(&v, &["python3", "-c", "x = bytearray(400 * 1024 * 1024); x[::4096] = b'x' * len(x[::4096]); print('survived')"]).await;
    assert_eq!(
        out["exit_code"], -1,
        "killed by a signal, as upstream reports it: {out}"
    );
    assert!(!out["stdout"].as_str().unwrap().contains("survived"));
    // …and stderr says why, with the limit.
    let stderr = out["stderr"].as_str().unwrap();
    assert!(
        stderr.contains("killed by the out-of-memory killer")
            && stderr.contains("memory limit (64Mi)"),
        "{stderr}"
    );
    // A network error in a sandbox without network says what is missing.
    let out = exec(
        &v,
        &[
            "python3",
            "-c",
            "import socket; socket.getaddrinfo('pypi.org', 443)",
        ],
    )
    .await;
    let stderr = out["stderr"].as_str().unwrap();
    assert!(
        stderr.contains("this sandbox has no network") && stderr.contains("spec.networkPolicy"),
        "{stderr}"
    );
    // Small allocations still work: the sandbox itself is fine.
    let out = exec(
        &v,
        &[
            "python3",
            "-c",
            "x = bytearray(8 * 1024 * 1024); print('ok')",
        ],
    )
    .await;
    assert_eq!(out["stdout"], "ok\n");
    s.shutdown_and_check_leaks().await;
}

/// `/tmp`, `/dev/shm` and `/run` are memory (tmpfs): filled, they are full at half, an eighth
/// of the sandbox's memory limit and 1 MiB, a write past it fails with ENOSPC, and the sandbox
/// goes on; `/` and `/dev` (bubblewrap's own tmpfs) are read-only. Before, each took the whole
/// limit: the kernel cannot reclaim those pages, so the out-of-memory killer took PicoD and the
/// session's sandbox was gone.
#[tokio::test]
async fn filling_tmp_is_enospc_not_the_end_of_the_sandbox() {
    let (s, v) = stack("    resources:\n      limits:\n        memory: 64Mi\n", 512).await;
    let fills = [("/tmp/fill", 32), ("/dev/shm/fill", 8), ("/run/fill", 1)];
    tmpfs_fill_up_to_their_size(&v, &fills, &["", "/dev"]).await;
    s.shutdown_and_check_leaks().await;
}

/// When the sandbox runs out of memory the kernel kills commands before PicoD, even where PicoD
/// is the largest process: many small ones (a shell pipeline, `xargs -P`) beside a full `/tmp`.
/// Before, the largest was PicoD, and the session's sandbox ended with it.
#[tokio::test]
async fn out_of_memory_takes_commands_before_picod() {
    let (s, v) = stack("    resources:\n      limits:\n        memory: 64Mi\n", 512).await;
    let fill = "head -c 30000000 /dev/zero > /tmp/fill";
    assert_eq!(exec(&v, &sh(fill)).await["exit_code"], 0);
    // Each shell holds ~2-3 MiB: together well past what is left.
    let many = "for i in $(seq 24); do sh -c 'x=$(head -c 1500000 /dev/zero | tr \"\\0\" a); sleep 5' & done; wait; echo done";
    let out = exec(&v, &sh(many)).await;
    assert_eq!(out["stdout"], "done\n", "{out}");
    // The kernel did kill (the sandbox sees its cgroup's count at /run/memory.events).
    let events = exec(&v, &["cat", "/run/memory.events"]).await;
    let kills: u64 = events["stdout"]
        .as_str()
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("{events}"));
    assert!(
        kills > 0,
        "nothing was killed: the test asks too little memory"
    );
    assert_eq!(exec(&v, &["echo", "alive"]).await["stdout"], "alive\n");
    s.shutdown_and_check_leaks().await;
}

/// Limits the manifest schema lets through (it takes any quantity the API server's pattern
/// does) but no sandbox can run under: each create is a 400 naming the limit, nothing is left
/// running and the memory budget loses nothing.
#[tokio::test]
async fn limits_no_sandbox_can_run_under_are_a_400_naming_them() {
    let cases = [
        (
            "negative",
            "memory: \"-1Gi\"",
            "resources.limits.memory: \"-1Gi\" is negative",
        ),
        (
            "zero",
            "memory: \"0\"",
            "resources.limits.memory: must be more than 0",
        ),
        (
            "huge",
            "cpu: \"1e30\"",
            "resources.limits.cpu: \"1e30\" is too large",
        ),
        (
            "exponent",
            "ephemeral-storage: \"1e1.5\"",
            "\"1e1.5\" is not a Kubernetes quantity",
        ),
        (
            "over",
            "memory: \"1E\"",
            "more than the whole memory budget",
        ),
        (
            "small-workspace",
            "ephemeral-storage: 32Ki",
            "resources.limits.ephemeral-storage: \"32Ki\" is too small: a workspace filesystem \
             needs at least 1Mi",
        ),
        (
            "tiny",
            "memory: \"2Mi\"",
            "killed by its memory limit (2Mi) while starting",
        ),
    ];
    let limits = |l: &str| format!("    resources:\n      limits:\n        {l}\n");
    let mut manifests: String = cases
        .iter()
        .map(|(name, l, _)| code_interpreter(name, &limits(l)))
        .collect();
    manifests.push_str(&code_interpreter("fits", &limits("memory: 256Mi")));
    let s = Stack::start(Options {
        manifests,
        memory_budget: Some(256 << 20),
        ..Default::default()
    })
    .await;
    assert!(s.backend.enforces_limits());
    for (name, _, says) in cases {
        let (status, v) = s.create("code-interpreter", name).await;
        assert_eq!(status, 400, "{name}: {v}");
        let message = v["message"].as_str().unwrap();
        assert!(message.contains(says), "{name}: {message}");
        assert!(s.backend.running().is_empty(), "{name}");
    }
    // The whole budget is still there.
    s.create_ok("code-interpreter", "fits").await;
    s.shutdown_and_check_leaks().await;
}

#[test]
fn a_limit_that_is_not_a_quantity_is_refused_when_the_manifest_loads() {
    let text = code_interpreter(
        "typo",
        "    resources:\n      limits:\n        memory: 512MB\n",
    );
    let e = agentcube_crds::manifest::load(&text, "typo.yaml")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("spec.template.resources.limits.memory: Invalid value: \"512MB\""),
        "{e}"
    );
}

#[tokio::test]
async fn pids_limit_stops_a_fork_bomb() {
    let (s, v) = stack("", 40).await;
    let out = exec(
        &v,
        &sh("for i in $(seq 1 200); do sleep 3 & done; echo spawned; wait"),
    )
    .await;
    // The shell could not fork, and PicoD's note says why.
    let stderr = out["stderr"].as_str().unwrap();
    assert!(
        stderr.contains("Cannot fork")
            && stderr.contains(
                "[picod: the sandbox cannot start another process: it is at its process limit"
            ),
        "{out}"
    );
    // Inside the limit, processes still start.
    let out = exec(&v, &["echo", "alive"]).await;
    assert_eq!(out["stdout"], "alive\n");
    s.shutdown_and_check_leaks().await;
}

/// A sandbox held at its process limit still serves file calls. PicoD does file work on tokio's
/// blocking threads, which ended after 10 s idle; once the limit held longer than that, the next
/// file call could not make its thread and tokio panicked in the request (the connection cut,
/// the Router's `503 sandbox unreachable`). PicoD now keeps its blocking threads.
#[tokio::test]
async fn files_are_served_while_processes_hold_the_whole_limit() {
    let (s, v) = stack("", 40).await;
    // Takes every process slot there is, and any that frees up, for 13 s.
    let hog = "import os, time\nend = time.time() + 13\nwhile time.time() < end:\n    try:\n        if os.fork() == 0:\n            time.sleep(max(0, end - time.time()))\n            os._exit(0)\n    except OSError:\n        time.sleep(0.01)\n";
    let bomb = tokio::spawn({
        let v = v.clone();
        async move { exec(&v, &["python3", "-c", hog]).await }
    });
    // Past tokio's 10 s keep-alive of the threads PicoD used to start it.
    tokio::time::sleep(std::time::Duration::from_millis(11_500)).await;
    assert!(!bomb.is_finished(), "the limit is still held");
    let ep = v["entryPoints"][0]["endpoint"].as_str().unwrap();
    let (status, body) = unix_http(ep, "GET", "/api/files?path=.", None).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(bomb.await.unwrap()["exit_code"], 0);
    s.shutdown_and_check_leaks().await;
}

/// A sandbox without a CPU limit (its definition sets none, the default) that spins on every CPU
/// with hundreds of processes takes no more than its share from a neighbour: each sandbox is a
/// CPU cgroup of its own, and the scheduler shares CPU time between cgroups before processes.
/// (Where the kernel groups sessions, `sched_autogroup`, bubblewrap's `--new-session` does too.)
/// Measured as CPU time the kernel accounts to the neighbour, not as wall-clock latency: a fair
/// share is about one CPU (at least half of one with other tests running), the neighbour's lot
/// among all those processes without either a few percent of one (0.16 s, mutation-checked with
/// the cpu cgroups left out and autogroup off; either one alone passes).
#[tokio::test]
async fn a_sandbox_spinning_on_every_cpu_leaves_its_neighbour_its_share() {
    let s = Stack::start(Options {
        manifests: code_interpreter("ci", ""),
        ..Default::default()
    })
    .await;
    if !s.backend.enforces_limits() {
        eprintln!("skipped: no cgroups here (not root)");
        return;
    }
    let (hog, neighbour) = (
        s.create_ok("code-interpreter", "ci").await,
        s.create_ok("code-interpreter", "ci").await,
    );
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
    // Two processes each (`timeout` and its shell), within the 512-process limit.
    let spinners = (16 * cpus).min(200);
    let spin = format!(
        "for i in $(seq {spinners}); do timeout 8 sh -c 'while :; do :; done' & done; wait; echo done"
    );
    // The neighbour spins one process for 3 s of wall-clock time and reports its CPU time.
    let measure = "import time\nwall, cpu = time.monotonic(), time.process_time()\nwhile time.monotonic() - wall < 3: pass\nprint(round(time.process_time() - cpu, 3))";
    let spin = sh(&spin);
    let (spun, measured) = tokio::join!(exec(&hog, &spin), async {
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
        exec(&neighbour, &["python3", "-c", measure]).await
    });
    assert_eq!(spun["stdout"], "done\n", "{spun}");
    let cpu: f64 = measured["stdout"].as_str().unwrap().trim().parse().unwrap();
    assert!(
        cpu >= 0.75,
        "the neighbour got {cpu} s of CPU in 3 s beside {spinners} spinning processes"
    );
    s.shutdown_and_check_leaks().await;
}

#[tokio::test]
async fn cgroups_are_removed_with_the_sandbox() {
    let (_guard, logs) = Logs::start();
    let (s, v) = stack(
        "    resources:\n      limits:\n        memory: 256Mi\n        cpu: 500m\n",
        512,
    )
    .await;
    let name = v["sandboxName"].as_str().unwrap();
    let dirs = s.backend.cgroup_dirs(name);
    assert!(!dirs.is_empty());
    let mem = dirs
        .iter()
        .find(|d| d.to_string_lossy().contains("/memory/"))
        .cloned();
    let read = |dir: &std::path::Path, file: &str| {
        std::fs::read_to_string(dir.join(file))
            .unwrap()
            .trim()
            .to_owned()
    };
    if let Some(mem) = mem {
        assert_eq!(
            read(&mem, "memory.limit_in_bytes"),
            (256u64 << 20).to_string()
        );
    } else {
        // cgroup v2: one directory, every controller's files in it.
        assert_eq!(dirs.len(), 1, "{dirs:?}");
        assert_eq!(read(&dirs[0], "memory.max"), (256u64 << 20).to_string());
        // `make cgroup-v2`'s scenario of a user's scope where systemd delegates only memory and
        // pids (before systemd 252) says so: no CPU limit there, the others still in force.
        if std::env::var_os("AGENTCUBE_TEST_NO_CPU_CONTROLLER").is_some() {
            assert!(!dirs[0].join("cpu.max").exists(), "{dirs:?}");
            logs.line_with("CPU limits will NOT be enforced");
        } else {
            assert!(
                !logs.text().contains("CPU limits will NOT"),
                "{}",
                logs.text()
            );
            assert_eq!(read(&dirs[0], "cpu.max"), "50000 100000");
        }
        assert_eq!(read(&dirs[0], "pids.max"), "512");
    }
    assert_eq!(s.delete(v["sessionId"].as_str().unwrap()).await.0, 200);
    for d in &dirs {
        assert!(!d.exists(), "{} left behind", d.display());
    }
    s.shutdown_and_check_leaks().await;
}

#[test]
fn missing_bubblewrap_or_runsc_names_the_package() {
    use agentcube_workload_manager::backend::local::{LocalBackend, LocalConfig};
    let dir = tempfile::tempdir().unwrap();
    let mut c = LocalConfig::new(dir.path().join("state"), picod_binary());
    c.bwrap = "/nonexistent/bwrap".into();
    let err = LocalBackend::new(c).err().expect("must refuse to start");
    assert!(err.contains("install the `bubblewrap` package"), "{err}");
    let mut c = LocalConfig::new(dir.path().join("state"), "/nonexistent/picod".into());
    c.bwrap = "bwrap".into();
    let err = LocalBackend::new(c).err().expect("must refuse to start");
    assert!(err.contains("PicoD binary not found"), "{err}");
}

/// A second manager on a state directory in use is refused before it touches anything: it used
/// to take the first one's sandboxes for a crashed predecessor's and remove them (two `make run`s
/// killed each other's sessions). A clean stop lets the next one in.
#[tokio::test]
async fn a_second_manager_on_the_same_state_directory_is_refused() {
    use agentcube_workload_manager::backend::local::{LocalBackend, LocalConfig};
    let s = Stack::start(Options {
        manifests: code_interpreter("ci", ""),
        ..Default::default()
    })
    .await;
    let v = s.create_ok("code-interpreter", "ci").await;
    let config = || LocalConfig::new(s.dir.path().join("state"), picod_binary());
    let err = LocalBackend::new(config())
        .err()
        .expect("must refuse to start");
    assert!(
        err.contains("is in use by another Workload Manager or `agentcube up`")
            && err.contains(&format!("(pid {})", std::process::id())),
        "{err}"
    );
    assert_eq!(exec(&v, &["echo", "alive"]).await["stdout"], "alive\n");
    let dir = s.stop_keeping_dir().await;
    let next = LocalBackend::new(LocalConfig::new(dir.path().join("state"), picod_binary()));
    assert!(next.is_ok(), "{:?}", next.err());
}

/// A state directory another user owns (say pre-made in `/tmp`, the default's parent) is
/// refused before anything is put there: its owner could swap `private/` for a directory of
/// their own, whose "sockets" the Router would follow, or the seccomp filters sandboxes load.
#[test]
fn a_state_directory_another_user_owns_is_refused() {
    use agentcube_workload_manager::backend::local::{LocalBackend, LocalConfig};
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("skipped: needs root to give a directory to another user");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let theirs = dir.path().join("state");
    std::fs::create_dir(&theirs).unwrap();
    std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
    let err = LocalBackend::new(LocalConfig::new(theirs.clone(), picod_binary()))
        .err()
        .expect("must refuse to start");
    assert!(err.contains("belongs to uid 65534"), "{err}");
    assert!(
        std::fs::read_dir(&theirs).unwrap().next().is_none(),
        "nothing was made in it"
    );
}

/// `--require-cgroups`: where no cgroup hierarchy is usable, the manager refuses to start rather
/// than run sandboxes without memory, CPU and pid limits; without it, it starts and says so.
#[test]
fn a_manager_that_must_enforce_limits_refuses_to_start_without_cgroups() {
    use agentcube_workload_manager::backend::local::{LocalBackend, LocalConfig};
    let dir = tempfile::tempdir().unwrap();
    let no_cgroups = dir.path().join("not-a-cgroup-fs");
    std::fs::create_dir(&no_cgroups).unwrap();
    let config = |state: &str, require: bool| {
        let state = dir.path().join(state);
        std::fs::create_dir(&state).unwrap();
        let mut c = LocalConfig::new(state, picod_binary());
        c.cgroup_root = no_cgroups.clone();
        c.require_cgroups = require;
        c
    };
    let err = LocalBackend::new(config("required", true))
        .err()
        .expect("must refuse to start");
    assert!(err.contains("cgroup limits cannot be enforced"), "{err}");
    let started = LocalBackend::new(config("optional", false)).expect("starts without limits");
    assert!(!started.enforces_limits());
}

/// Two managers on one host (a second `agentcube up`, a `workload-manager` beside it) draw
/// sandbox uids from the same default range. They gave their first sandboxes the same host uid,
/// and per-user kernel limits are per host uid: a sandbox of one used up the inotify instances
/// of the other's (every file watcher there failing with `EMFILE`).
#[tokio::test]
async fn sandboxes_of_two_managers_do_not_share_per_user_limits() {
    let start = || {
        Stack::start(Options {
            manifests: code_interpreter("ci", ""),
            ..Default::default()
        })
    };
    let (one, two) = (start().await, start().await);
    let a = one.create_ok("code-interpreter", "ci").await;
    let b = two.create_ok("code-interpreter", "ci").await;
    let init = "python3 -c 'import ctypes; l = ctypes.CDLL(None, use_errno=True); \
                print(\"fd\" if l.inotify_init() >= 0 else ctypes.get_errno())'";
    let hog = r#"cat > /tmp/hog.py <<'X'
import ctypes, resource, time
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
l = ctypes.CDLL(None, use_errno=True)
n = 0
while l.inotify_init() >= 0:
    n += 1
print(n, ctypes.get_errno(), flush=True)
time.sleep(60)
X
python3 /tmp/hog.py > /tmp/hog.out 2>&1 &
while [ ! -s /tmp/hog.out ]; do sleep 0.05; done; cat /tmp/hog.out"#;
    let held = exec(&a, &sh(hog)).await;
    assert!(
        held["stdout"].as_str().unwrap().ends_with(" 24\n"),
        "{held}"
    );
    let a_after = exec(&a, &sh(init)).await;
    assert_eq!(
        a_after["stdout"], "24\n",
        "the hog used up its uid's: {a_after}"
    );
    let b_after = exec(&b, &sh(init)).await;
    assert_eq!(
        b_after["stdout"], "fd\n",
        "the other manager's sandbox: {b_after}"
    );
    one.shutdown_and_check_leaks().await;
    two.shutdown_and_check_leaks().await;
}
