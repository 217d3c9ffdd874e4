//! Attacks from code running inside a real local sandbox on the host and on other sandboxes
//! (issue 13). Each test fails without the defence it names.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::time::Duration;

use common::*;

fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

/// A host Unix socket server counting the connections it receives.
struct HostServer {
    path: std::path::PathBuf,
    accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl HostServer {
    fn start(dir: &std::path::Path) -> Self {
        let path = dir.join("host-daemon.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = accepted.clone();
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                drop(s);
            }
        });
        Self {
            path,
            accepted,
            task,
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }
}

#[tokio::test]
async fn a_socket_replaced_by_a_symlink_is_never_followed() {
    let s = Stack::start(Options {
        manifests: code_interpreter("ci", ""),
        ..Default::default()
    })
    .await;
    let host = HostServer::start(s.dir.path());
    let v = s.create_ok("code-interpreter", "ci").await;
    // Inside: replace PicoD's socket with a symlink to a host daemon's socket.
    let script = format!(
        "rm -f /run/agentcube/picod.sock; ln -s {} /run/agentcube/picod.sock; ls -l /run/agentcube",
        host.path.display()
    );
    let out = exec(&v, &sh(&script)).await;
    assert!(out["stdout"].as_str().unwrap().contains("->"), "{out}");
    // Every new connection of the host still reaches the sandbox's own PicoD.
    for _ in 0..5 {
        let out = exec(&v, &["echo", "still-picod"]).await;
        assert_eq!(out["stdout"], "still-picod\n");
    }
    assert_eq!(host.accepted(), 0, "the host daemon was reached");
    host.task.abort();
    s.shutdown_and_check_leaks().await;
}

const RACING_AGENT: &str = r#"apiVersion: runtime.agentcube.volcano.sh/v1alpha1
kind: AgentRuntime
metadata:
  name: racer
  namespace: default
spec:
  targetPort: [{port: 8080, protocol: HTTP, pathPrefix: /}]
  podTemplate:
    spec:
      containers:
      - name: agent
        image: python
        command: [sh, -c]
        args:
        - |
          python3 -m http.server 8080 --bind 127.0.0.1 >/dev/null 2>&1 &
          while true; do
            for s in /run/agentcube/picod.sock /run/agentcube/port-8080.sock; do
              rm -f "$s"; ln -s "$HOST_SOCKET" "$s"
            done
          done
        env:
        - {name: HOST_SOCKET, value: HOST}
"#;

#[tokio::test]
async fn an_agent_racing_its_socket_handoff_reaches_nothing_on_the_host() {
    let dir = tempfile::tempdir().unwrap();
    let host = HostServer::start(dir.path());
    let s = Stack::start(Options {
        manifests: RACING_AGENT.replace("HOST", &host.path.display().to_string()),
        ..Default::default()
    })
    .await;
    // The agent swaps the sockets for symlinks from its first instant: the create may fail
    // (refused: not a socket) or win the race; either way the host is never contacted.
    for _ in 0..3 {
        let (status, v) = s.create("agent-runtime", "racer").await;
        if status == 200 {
            let ep = v["entryPoints"][0]["endpoint"].as_str().unwrap();
            let _ = unix_http(ep, "GET", "/", None).await;
        } else {
            assert_eq!(status, 500, "{v}");
        }
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(host.accepted(), 0, "the host daemon was reached");
    host.task.abort();
    s.shutdown_and_check_leaks().await;
}

/// An agent's stdout and stderr were its sandbox's log file on the host's disk: an agent
/// printing without end filled the host's disk past its workspace quota (and copying it to a
/// log cost the manager more CPU than the agent spent). They are a pipe now, read at the log
/// rate into a log the manager rotates: the agent's prints wait, nothing is lost.
#[tokio::test]
async fn an_agent_printing_without_end_cannot_fill_the_hosts_disk() {
    let s = Stack::start(Options {
        manifests: host_agent(
            "printer",
            8080,
            r#"[sh, -c, "python3 -m http.server 8080 --bind 127.0.0.1 >/dev/null 2>&1 &
              head -c 1500000 /dev/zero >&2; head -c 1500000 /dev/zero; echo all-out; sleep 600"]"#,
        ),
        ..Default::default()
    })
    .await;
    let started = std::time::Instant::now();
    let v = s.create_ok("agent-runtime", "printer").await;
    let ep = v["entryPoints"][0]["endpoint"].as_str().unwrap();
    // The sandbox's private directory, where its log is (its sockets in `sockets/` below).
    let private = std::path::Path::new(ep.strip_prefix("unix:").unwrap())
        .parent()
        .and_then(std::path::Path::parent)
        .unwrap()
        .to_path_buf();
    // The agent is through its 3 MB when its last line is in: held to the log's rate.
    let log = private.join("sandbox.log");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !std::fs::read(&log)
        .unwrap_or_default()
        .ends_with(b"all-out\n")
    {
        assert!(std::time::Instant::now() < deadline, "the agent is stuck");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let took = started.elapsed();
    assert!(
        took > Duration::from_secs(1),
        "not held to the rate: {took:?}"
    );
    let logs: u64 = std::fs::read_dir(&private)
        .unwrap()
        .map(Result::unwrap)
        .filter(|e| e.file_name().to_string_lossy().starts_with("sandbox.log"))
        .map(|e| e.metadata().unwrap().len())
        .sum();
    let max = agentcube_workload_manager::backend::local::output::MAX_LOG;
    assert!(logs > max && logs <= 2 * max, "{logs} bytes of logs");
    // Its server still answers.
    assert_eq!(unix_http(ep, "GET", "/", None).await.0, 200);
    s.shutdown_and_check_leaks().await;
}

/// Nests directories below the current one until told to stop or refused; prints how deep.
const NEST: &str = "import os
n = 0
try:
    while n < 100000:
        os.mkdir('a'); os.chdir('a'); n += 1
except OSError as e:
    print('refused', e.errno)
print('depth', n)";

/// `/run/agentcube` is a host directory the sandbox writes (PicoD binds its sockets there). On
/// the state directory's disk it was room outside the workspace quota (50 MiB written there
/// landed on the host's disk) and a place to nest directories 100,000 deep, whose removal
/// overflowed the manager's stack and aborted it. As root it is a tmpfs of 64 KiB and 1024
/// inodes; whatever the sandbox nests there, its teardown leaves the manager serving.
#[tokio::test]
async fn the_run_directory_holds_sockets_not_the_hosts_disk() {
    let s = Stack::start(Options {
        manifests: code_interpreter("ci", ""),
        ..Default::default()
    })
    .await;
    let v = s.create_ok("code-interpreter", "ci").await;
    let paths = s.backend.paths(v["sandboxName"].as_str().unwrap());
    let script = format!(
        "head -c 1048576 /dev/zero > /run/agentcube/fill; echo written $?; \
         cd /run/agentcube && python3 -c \"{NEST}\""
    );
    let out = exec(&v, &sh(&script)).await;
    let stdout = out["stdout"].as_str().unwrap();
    let depth: usize = stdout
        .lines()
        .find_map(|l| l.strip_prefix("depth "))
        .unwrap_or_else(|| panic!("{out}"))
        .parse()
        .unwrap();
    if is_root() {
        assert!(
            stdout.contains("written 1") && stdout.contains("refused 28"),
            "{out}"
        );
        let on_host = std::fs::metadata(paths.run.join("fill")).unwrap().len();
        assert!(on_host <= 64 << 10, "{on_host} bytes written to the host");
        assert!(depth < 1024, "{depth} directories deep");
    }
    let (status, body) = s.delete(v["sessionId"].as_str().unwrap()).await;
    assert_eq!(status, 200, "{body}");
    eventually("the sandbox's directories to go", 30, || {
        !paths.dir.exists() && !paths.private.exists()
    })
    .await;
    let next = s.create_ok("code-interpreter", "ci").await;
    assert_eq!(exec(&next, &["echo", "served"]).await["stdout"], "served\n");
    s.shutdown_and_check_leaks().await;
}

#[tokio::test]
async fn nothing_of_the_manager_reaches_the_sandbox() {
    // cargo runs tests with CARGO_MANIFEST_DIR etc. in the environment: the manager's.
    assert!(std::env::var_os("CARGO_MANIFEST_DIR").is_some());
    let s = Stack::start(Options {
        manifests: code_interpreter("ci", "    environment: [{name: MINE, value: yes}]\n"),
        ..Default::default()
    })
    .await;
    let v = s.create_ok("code-interpreter", "ci").await;
    let state = s.dir.path().display().to_string();
    const ENV_NAMES: &str = r"
import glob
names = set()
for p in glob.glob('/proc/[0-9]*/environ'):
    try:
        names |= {e.split(b'=')[0].decode() for e in open(p, 'rb').read().split(b'\0') if e}
    except OSError:
        pass
print('\n'.join(sorted(names)))
print('---')
for p in ('/proc/1/cmdline', '/proc/2/cmdline'):
    print(open(p, 'rb').read().replace(b'\0', b' ').decode())
";
    let out = exec(&v, &["python3", "-c", ENV_NAMES]).await;
    let text = out["stdout"].as_str().unwrap();
    let (names, cmdlines) = text.split_once("---").unwrap();
    let allowed = [
        "PATH",
        "HOME",
        "LANG",
        "RUST_LOG",
        "PICOD_AUTH_PUBLIC_KEY",
        "PICOD_SANDBOX_NAME",
        // PicoD's own, naming the sandbox's view: /run/memory.events, the limit, "no network",
        // the workspace quota
        "PICOD_MEMORY_EVENTS",
        "PICOD_MEMORY_LIMIT",
        "PICOD_NO_NETWORK",
        "PICOD_WORKSPACE_LIMIT",
        "MINE",
        // set by the shell running this very probe
        "PWD",
        "SHLVL",
        "OLDPWD",
        "_",
    ];
    for name in names.lines().filter(|l| !l.is_empty()) {
        assert!(
            allowed.contains(&name),
            "{name} leaked into the sandbox: {text}"
        );
    }
    assert!(names.contains("MINE"), "{text}");
    assert!(
        !cmdlines.contains(&state),
        "host state paths on a command line inside: {cmdlines}"
    );
    // Descriptors: only stdin/stdout/stderr reach what PicoD runs.
    let out = exec(&v, &sh("ls /proc/self/fd")).await;
    let fds: Vec<&str> = out["stdout"].as_str().unwrap().lines().collect();
    assert!(fds.len() <= 4, "unexpected descriptors inside: {fds:?}");
    // PicoD's standard input is /dev/null: the pipe the manager tells the launcher `go` on
    // (workspace formatted) stays with the launcher.
    let stdin =
        "for p in /proc/[0-9]*; do [ \"$(cat $p/comm)\" = picod ] && readlink $p/fd/0; done";
    let out = exec(&v, &sh(stdin)).await;
    let seen = out["stdout"].as_str().unwrap().trim().to_string();
    assert_eq!(seen, "/dev/null", "PicoD's stdin: {out}");
    s.shutdown_and_check_leaks().await;
}

#[tokio::test]
async fn seccomp_closes_nested_user_namespaces_and_kernel_surface() {
    let s = Stack::start(Options {
        manifests: code_interpreter("ci", ""),
        ..Default::default()
    })
    .await;
    let v = s.create_ok("code-interpreter", "ci").await;
    let out = exec(
        &v,
        &sh("grep '^Seccomp:' /proc/self/status; unshare -Ur true 2>&1; echo unshare=$?; \
             python3 -c 'import os; os.unshare(os.CLONE_NEWNS)' 2>&1 | tail -1; \
             python3 -c 'import ctypes; print(\"keyctl\", ctypes.CDLL(None, use_errno=True).syscall(250, 0, 0) , ctypes.get_errno())'"),
    )
    .await;
    let text = out["stdout"].as_str().unwrap();
    assert!(text.contains("Seccomp:\t2"), "{text}");
    assert!(
        text.contains("unshare=1") || !text.contains("unshare=0"),
        "{text}"
    );
    assert!(text.contains("Operation not permitted"), "{text}");
    assert!(
        text.contains("keyctl -1 1"),
        "keyctl denied with EPERM: {text}"
    );
    // Ordinary work still runs: threads, processes, files.
    let out = exec(
        &v,
        &["python3", "-c", "import threading, subprocess; t = threading.Thread(target=print, args=('thread',)); t.start(); t.join(); print(subprocess.run(['echo', 'child'], capture_output=True, text=True).stdout.strip())"],
    )
    .await;
    assert_eq!(out["stdout"], "thread\nchild\n", "{out}");
    s.shutdown_and_check_leaks().await;
}

/// A stack with two sandboxes of one CodeInterpreter.
async fn two_sandboxes() -> (Stack, serde_json::Value, serde_json::Value) {
    let s = Stack::start(Options {
        manifests: code_interpreter("ci", ""),
        ..Default::default()
    })
    .await;
    let a = s.create_ok("code-interpreter", "ci").await;
    let b = s.create_ok("code-interpreter", "ci").await;
    (s, a, b)
}

#[tokio::test]
async fn workspaces_are_private_to_their_sandbox() {
    let (s, a, b) = two_sandboxes().await;
    exec(&a, &sh("echo top-secret > secret.txt")).await;
    let pa = s.backend.paths(a["sandboxName"].as_str().unwrap());
    for d in [&pa.dir, &pa.ws, &pa.run, &pa.sockets, &pa.private] {
        let mode = std::fs::metadata(d).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "{}", d.display());
    }
    if is_root() {
        let (ua, ub) = (
            s.backend
                .sandbox_uid(a["sandboxName"].as_str().unwrap())
                .unwrap(),
            s.backend
                .sandbox_uid(b["sandboxName"].as_str().unwrap())
                .unwrap(),
        );
        assert_ne!(ua, ub, "a uid per sandbox");
        assert_eq!(std::fs::metadata(&pa.ws).unwrap().uid(), ua);
        let secret = sandbox_ws(&s.backend, a["sandboxName"].as_str().unwrap()).join("secret.txt");
        assert_eq!(std::fs::read_to_string(&secret).unwrap(), "top-secret\n");
        // Another host user, and the other sandbox's uid, cannot read it.
        for uid in [65534, ub] {
            let out = std::process::Command::new("setpriv")
                .args([
                    &format!("--reuid={uid}"),
                    &format!("--regid={uid}"),
                    "--clear-groups",
                    "cat",
                ])
                .arg(&secret)
                .output()
                .unwrap();
            assert!(!out.status.success());
            assert!(
                String::from_utf8_lossy(&out.stderr).contains("Permission denied"),
                "{out:?}"
            );
        }
    }
    s.shutdown_and_check_leaks().await;
}

/// Each sandbox has its own network, IPC and process namespaces: another sandbox's abstract
/// sockets, loopback ports, SysV objects and processes, and the host's, are out of its reach.
#[tokio::test]
async fn a_sandbox_reaches_no_neighbours_sockets_ipc_or_processes() {
    let (s, a, b) = two_sandboxes().await;
    neighbours_are_out_of_reach(&a, &b).await;
    s.shutdown_and_check_leaks().await;
}

#[tokio::test]
async fn a_token_for_one_sandbox_opens_no_other() {
    let (s, a, b) = two_sandboxes().await;
    let (ea, eb) = (
        a["entryPoints"][0]["endpoint"].as_str().unwrap(),
        b["entryPoints"][0]["endpoint"].as_str().unwrap(),
    );
    let for_a = token(a["sandboxIdentity"].as_str().unwrap());
    let body = Some(serde_json::json!({"command": ["true"]}));
    let (ok, _) = unix_http_as(ea, &for_a, "POST", "/api/execute", body.clone()).await;
    assert_eq!(ok, 200);
    let (refused, text) = unix_http_as(eb, &for_a, "POST", "/api/execute", body).await;
    assert_eq!(refused, 401, "{}", String::from_utf8_lossy(&text));
    s.shutdown_and_check_leaks().await;
}
