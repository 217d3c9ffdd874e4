//! The real `picod` binary as PID 1 of its namespace, as a Kubernetes container's entrypoint
//! is (`unshare --pid --fork`; needs root): orphans of commands are reaped instead of staying
//! zombies, a SIGTERM to it stops PicoD gracefully, and it ends with PicoD's status; there
//! `POST /api/processes/kill-all` ends every process but PicoD and its init, and it is refused
//! where PicoD does not serve a PID namespace of its own.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde_json::json;

const BIN: &str = env!("CARGO_BIN_EXE_picod");

/// `picod` as PID 1 of a new PID namespace (with its own /proc), on the Unix socket `sock`.
fn as_pid_1(dir: &Path, sock: &Path) -> Ns {
    as_pid_1_with(dir, sock, &[])
}

/// `unshare` and the PID namespace it made: whatever is left of it is killed when dropped (a
/// test that failed half-way), the namespace's PID 1 first, which takes the rest with it.
struct Ns(Child);

impl Ns {
    fn id(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            for init in children(self.0.id()) {
                signal(init, Signal::SIGKILL);
            }
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// [`as_pid_1`] with more arguments (an agent after `--`).
fn as_pid_1_with(dir: &Path, sock: &Path, more: &[&str]) -> Ns {
    let child = Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc", BIN, "--insecure-no-auth"])
        .arg(format!("--workspace={}", dir.join("ws").display()))
        .arg(format!("--listen=unix:{}", sock.display()))
        .args(more)
        .env_remove("PICOD_AUTH_PUBLIC_KEY")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("unshare (util-linux)");
    let started = Instant::now();
    while UnixStream::connect(sock).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "picod did not listen"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Ns(child)
}

/// `method path` with a JSON `body` over `sock`: status and body.
fn request(sock: &Path, method: &str, path: &str, body: &serde_json::Value) -> (u16, String) {
    let body = body.to_string();
    let mut s = UnixStream::connect(sock).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nhost: picod\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    let status = head[9..12].parse().unwrap();
    (status, body.to_string())
}

/// Runs `command` in the sandbox; its stdout.
fn execute(sock: &Path, command: &[&str]) -> String {
    let (status, body) = request(sock, "POST", "/api/execute", &json!({ "command": command }));
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["stdout"].as_str().unwrap().to_string()
}

/// Sends `s` to host pid `pid` (gone already: ignored).
fn signal(pid: u32, s: Signal) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), s);
}

/// The host pids of `pid`'s children.
fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect()
}

fn wait_exit(Ns(child): &mut Ns) -> std::process::ExitStatus {
    let started = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "did not stop in 10 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn as_pid_1_it_reaps_orphans_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("picod.sock");
    let mut unshare = as_pid_1(dir.path(), &sock);
    // PID 1 is the init, PicoD serves as PID 2.
    assert_eq!(
        execute(&sock, &["cat", "/proc/1/comm", "/proc/2/comm"]),
        "picod\npicod\n"
    );
    // Each command's shell exits before its `sleep`, which PID 1 inherits.
    for _ in 0..5 {
        assert_eq!(
            execute(&sock, &["sh", "-c", "sleep 0.1 & echo started"]),
            "started\n"
        );
    }
    std::thread::sleep(Duration::from_millis(500));
    let states = execute(&sock, &["sh", "-c", "cat /proc/[0-9]*/stat"]);
    let zombies: Vec<&str> = states
        .lines()
        .filter(|l| {
            l.rsplit_once(") ")
                .is_some_and(|(_, rest)| rest.starts_with('Z'))
        })
        .collect();
    assert!(zombies.is_empty(), "{zombies:?}");
    assert!(!states.contains("(sleep)"), "{states}");

    // SIGTERM to the init (what the kubelet sends PID 1): PicoD stops gracefully, status 0.
    let init = children(unshare.id());
    assert_eq!(init.len(), 1, "{init:?}");
    signal(init[0], Signal::SIGTERM);
    let status = wait_exit(&mut unshare);
    assert_eq!(status.code(), Some(0), "{status:?}");
}

#[test]
fn as_pid_1_it_ends_with_picods_status() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("picod.sock");
    let mut unshare = as_pid_1(dir.path(), &sock);
    let init = children(unshare.id());
    let server = children(init[0]);
    assert_eq!(server.len(), 1, "{server:?}");
    signal(server[0], Signal::SIGKILL);
    let status = wait_exit(&mut unshare);
    assert_eq!(status.code(), Some(128 + 9), "{status:?}");
}

#[test]
fn kill_all_ends_every_process_but_picod_and_its_init() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("picod.sock");
    let mut unshare = as_pid_1(dir.path(), &sock);
    let left = "for i in $(seq 20); do sleep 100 & done; echo ok";
    assert_eq!(execute(&sock, &["sh", "-c", left]), "ok\n");
    let (status, body) = request(
        &sock,
        "POST",
        "/api/processes",
        &json!({"command": ["sleep", "100"]}),
    );
    assert_eq!(status, 200, "{body}");
    let listed = "ls /proc | grep -cE '^[0-9]+$'";
    // init, PicoD, 21 sleeps, and this command's sh and grep (ls may be gone already).
    assert!(
        execute(&sock, &["sh", "-c", listed])
            .trim()
            .parse::<u32>()
            .unwrap()
            >= 24
    );

    let (status, body) = request(&sock, "POST", "/api/processes/kill-all", &json!({}));
    assert_eq!(status, 200, "{body}");
    let swept: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(swept, json!({"killed": 21, "left": 0}));
    let pids = execute(
        &sock,
        &["sh", "-c", "for p in /proc/[0-9]*; do cat $p/comm; done"],
    );
    let mut pids: Vec<&str> = pids.lines().collect();
    pids.sort();
    assert_eq!(
        pids,
        ["picod", "picod", "sh"],
        "only init, PicoD and this command's shell (its cats start after the glob)"
    );
    // The background process shows as killed.
    let (_, body) = request(&sock, "GET", "/api/processes", &json!({}));
    let list: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(list[0]["running"], false, "{list}");
    // PicoD serves on; its init stops with it.
    let init = children(unshare.id());
    signal(init[0], Signal::SIGTERM);
    assert_eq!(wait_exit(&mut unshare).code(), Some(0));
}

/// On a host (PicoD not PID 2 under the sandbox's init) the sweep would reach processes that
/// are not the sandbox's: refused, nothing signalled.
#[test]
fn kill_all_is_refused_outside_a_pid_namespace_of_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("picod.sock");
    let mut picod = Command::new(BIN)
        .arg("--insecure-no-auth")
        .arg(format!("--workspace={}", dir.path().join("ws").display()))
        .arg(format!("--listen=unix:{}", sock.display()))
        .env_remove("PICOD_AUTH_PUBLIC_KEY")
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut bystander = Command::new("sleep").arg("100").spawn().unwrap();
    let started = Instant::now();
    while UnixStream::connect(&sock).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "picod did not listen"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let (status, body) = request(&sock, "POST", "/api/processes/kill-all", &json!({}));
    assert_eq!(status, 409, "{body}");
    assert!(
        body.contains("not the serving process of a PID namespace of its own"),
        "{body}"
    );
    assert!(
        bystander.try_wait().unwrap().is_none(),
        "a host process was signalled"
    );
    bystander.kill().unwrap();
    picod.kill().unwrap();
    let _ = bystander.wait();
    let _ = picod.wait();
}

/// Where PicoD supervises an agent (`picod -- CMD`), ending every process would end the agent,
/// and the sandbox with it: refused.
#[test]
fn kill_all_is_refused_beside_an_agent() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("picod.sock");
    let unshare = as_pid_1_with(dir.path(), &sock, &["--", "sleep", "100"]);
    let (status, body) = request(&sock, "POST", "/api/processes/kill-all", &json!({}));
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("runs an agent"), "{body}");
    assert!(
        execute(&sock, &["pgrep", "-x", "sleep"])
            .trim()
            .parse::<u32>()
            .is_ok()
    );
    drop(unshare);
    assert!(
        dir.path().join("picod.sock").exists(),
        "the namespace is gone with its init"
    );
}

/// The init marks the PicoD it starts (`PICOD_INIT_CHILD`); nothing PicoD starts for the
/// sandbox inherits the mark: not a command, a background process, a context, nor the agent.
#[test]
fn as_pid_1_its_mark_reaches_nothing_it_starts() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("picod.sock");
    let agent_env = dir.path().join("agent.env");
    let agent = format!("env > {}; exec sleep 100", agent_env.display());
    let _ns = as_pid_1_with(dir.path(), &sock, &["--", "sh", "-c", &agent]);
    // PicoD itself serves with the mark (its parent is the init).
    assert!(
        execute(&sock, &["sh", "-c", "tr '\\0' '\\n' < /proc/2/environ"])
            .contains("PICOD_INIT_CHILD=1")
    );
    let mut seen = vec![("command", execute(&sock, &["env"]))];
    let (status, body) = request(
        &sock,
        "POST",
        "/api/processes",
        &json!({"command": ["sh", "-c", "env > process.env"]}),
    );
    assert_eq!(status, 200, "{body}");
    let (status, body) = request(&sock, "POST", "/api/contexts", &json!({"language": "bash"}));
    assert_eq!(status, 200, "{body}");
    let id = serde_json::from_str::<serde_json::Value>(&body).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (status, body) = request(
        &sock,
        "POST",
        &format!("/api/contexts/{id}/execute"),
        &json!({"code": "env"}),
    );
    assert_eq!(status, 200, "{body}");
    seen.push(("context", body));
    let started = Instant::now();
    let files = [
        ("process", dir.path().join("ws/process.env")),
        ("agent", agent_env),
    ];
    for (what, file) in files {
        let text = loop {
            match std::fs::read_to_string(&file) {
                Ok(t) if t.contains("PATH=") => break t,
                _ if started.elapsed() > Duration::from_secs(10) => panic!("no {file:?}"),
                _ => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        seen.push((what, text));
    }
    for (what, env) in seen {
        assert!(env.contains("PATH="), "{what}: {env}");
        assert!(!env.contains("PICOD_INIT_CHILD"), "{what}: {env}");
    }
}
