//! The real `picod` binary as PID 1 of its namespace, as a Kubernetes container's entrypoint
//! is (`unshare --pid --fork`; needs root): orphans of commands are reaped instead of staying
//! zombies, a SIGTERM to it stops PicoD gracefully, and it ends with PicoD's status.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_picod");

/// `picod` as PID 1 of a new PID namespace (with its own /proc), on the Unix socket `sock`.
fn as_pid_1(dir: &Path, sock: &Path) -> Child {
    let child = Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc", BIN, "--insecure-no-auth"])
        .arg(format!("--workspace={}", dir.join("ws").display()))
        .arg(format!("--listen=unix:{}", sock.display()))
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
    child
}

/// Runs `command` in the sandbox; its stdout.
fn execute(sock: &Path, command: &[&str]) -> String {
    let body = serde_json::json!({ "command": command }).to_string();
    let mut s = UnixStream::connect(sock).unwrap();
    write!(
        s,
        "POST /api/execute HTTP/1.1\r\nhost: picod\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{answer}");
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    v["stdout"].as_str().unwrap().to_string()
}

/// The host pids of `pid`'s children.
fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap()
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect()
}

fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
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
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(init[0] as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
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
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(server[0] as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let status = wait_exit(&mut unshare);
    assert_eq!(status.code(), Some(128 + 9), "{status:?}");
}
