//! The real `picod` binary: startup checks, Unix socket, SIGTERM, and client disconnects.

mod common;

use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use serde_json::json;

const BIN: &str = env!("CARGO_BIN_EXE_picod");

fn spawn(args: &[&str], key: Option<&str>) -> Child {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .env_remove("PICOD_AUTH_PUBLIC_KEY");
    if let Some(k) = key {
        cmd.env("PICOD_AUTH_PUBLIC_KEY", k);
    }
    cmd.spawn().unwrap()
}

fn wait_exit(child: &mut Child, secs: u64) -> Option<std::process::ExitStatus> {
    for _ in 0..secs * 20 {
        if let Some(s) = child.try_wait().unwrap() {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

fn stderr_of(child: &mut Child) -> String {
    let mut s = String::new();
    child.stderr.take().unwrap().read_to_string(&mut s).unwrap();
    s
}

#[test]
fn refuses_to_start_without_a_usable_key() {
    let dir = tempfile::tempdir().unwrap();
    let ws = format!("--workspace={}", dir.path().display());
    let mut c = spawn(&[&ws, "--listen=127.0.0.1:0"], None);
    let status = wait_exit(&mut c, 10).expect("picod must exit without a key");
    assert!(!status.success());
    assert!(stderr_of(&mut c).contains("PICOD_AUTH_PUBLIC_KEY is not set"));
    let mut c = spawn(&[&ws, "--listen=127.0.0.1:0"], Some("not a pem"));
    assert!(!wait_exit(&mut c, 10).unwrap().success());
    assert!(stderr_of(&mut c).contains("not a PEM RSA public key"));
    // A key every token would fail on (below ring's floor) is refused at start, with the reason.
    let short = include_str!("data/short.pub.pem");
    let mut c = spawn(&[&ws, "--listen=127.0.0.1:0"], Some(short));
    assert!(!wait_exit(&mut c, 10).unwrap().success());
    assert!(stderr_of(&mut c).contains("an RSA key of 1024 bits; 2048 to 8192 are accepted"));
}

/// A log format PicoD does not have stops it at start, naming the ones it has (before, any word
/// but `json` meant plain logs, so a typo silently lost the structured logs asked for).
#[test]
fn refuses_an_unknown_log_format() {
    let dir = tempfile::tempdir().unwrap();
    let ws = format!("--workspace={}", dir.path().display());
    let mut c = spawn(
        &[
            &ws,
            "--listen=127.0.0.1:0",
            "--insecure-no-auth",
            "--log-format=jsn",
        ],
        None,
    );
    let status = wait_exit(&mut c, 10).expect("picod must exit on an unknown log format");
    assert!(!status.success());
    let err = stderr_of(&mut c);
    assert!(
        err.contains("invalid value 'jsn'") && err.contains("[possible values: plain, json]"),
        "{err}"
    );
}

async fn unix_request(sock: &std::path::Path, req: hyper::Request<Full<Bytes>>) -> (u16, Vec<u8>) {
    let stream = tokio::net::UnixStream::connect(sock).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let resp = send.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    (
        status,
        resp.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
}

async fn wait_for_socket(sock: &std::path::Path) {
    for _ in 0..200 {
        if tokio::net::UnixStream::connect(sock).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("picod did not listen on {}", sock.display());
}

/// The binary with the workspace `dir/ws`, listening on the Unix socket `sock`, once it does.
async fn on_socket(dir: &std::path::Path, sock: &std::path::Path) -> Child {
    let c = spawn(
        &[
            &format!("--workspace={}", dir.join("ws").display()),
            &format!("--listen=unix:{}", sock.display()),
        ],
        Some(ROUTER_PUB),
    );
    wait_for_socket(sock).await;
    c
}

#[tokio::test]
async fn serves_on_a_unix_socket_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("run/picod.sock");
    let mut c = on_socket(dir.path(), &sock).await;
    let req = hyper::Request::get("/health")
        .header("host", "picod")
        .body(Full::default())
        .unwrap();
    let (status, body) = unix_request(&sock, req).await;
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        (v["status"].as_str(), v["service"].as_str()),
        (Some("ok"), Some("PicoD"))
    );
    let req = hyper::Request::post("/api/execute")
        .header("host", "picod")
        .header("authorization", format!("Bearer {}", token()))
        .body(Full::from(json!({"command": ["pwd"]}).to_string()))
        .unwrap();
    let (status, body) = unix_request(&sock, req).await;
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert!(v["stdout"].as_str().unwrap().ends_with("/ws\n"), "{v}");
    // The binary checks signatures with ring (installed by its main): another key's token fails.
    let forged = sign(
        OTHER_KEY,
        jsonwebtoken::Algorithm::RS256,
        json!({"exp": now() + 60, "iat": now()}),
    );
    let req = hyper::Request::post("/api/execute")
        .header("host", "picod")
        .header("authorization", format!("Bearer {forged}"))
        .body(Full::from(json!({"command": ["pwd"]}).to_string()))
        .unwrap();
    let (status, body) = unix_request(&sock, req).await;
    assert_eq!(status, 401, "{}", String::from_utf8_lossy(&body));
    // The binary runs root commands in its own working directory (the workspace, entered at
    // start); any other directory is still given to the command.
    let req = hyper::Request::post("/api/execute")
        .header("host", "picod")
        .header("authorization", format!("Bearer {}", token()))
        .body(Full::from(
            json!({"command": ["pwd"], "working_dir": "sub/dir"}).to_string(),
        ))
        .unwrap();
    let (status, body) = unix_request(&sock, req).await;
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert!(
        v["stdout"].as_str().unwrap().ends_with("/ws/sub/dir\n"),
        "{v}"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(c.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = wait_exit(&mut c, 15).expect("picod must stop on SIGTERM");
    assert!(status.success(), "{status:?}");
}

/// SIGTERM with a command running: its answer still arrives whole, then PicoD exits cleanly;
/// the listener is gone from the moment the signal is handled.
#[tokio::test]
async fn an_execute_in_flight_is_answered_after_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("picod.sock");
    let mut c = on_socket(dir.path(), &sock).await;
    let started = dir.path().join("ws/started");
    let script = format!("touch {}; sleep 1; echo done", started.display());
    let req = hyper::Request::post("/api/execute")
        .header("host", "picod")
        .header("authorization", format!("Bearer {}", token()))
        .body(Full::from(
            json!({"command": ["sh", "-c", script]}).to_string(),
        ))
        .unwrap();
    let in_flight = tokio::spawn({
        let sock = sock.clone();
        async move { unix_request(&sock, req).await }
    });
    for _ in 0..200 {
        if started.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(started.exists(), "the command never started");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(c.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        tokio::net::UnixStream::connect(&sock).await.is_err(),
        "no new connections after SIGTERM"
    );
    let (status, body) = in_flight.await.unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["stdout"], "done\n", "{v}");
    let status = wait_exit(&mut c, 15).expect("picod must stop once the answer is out");
    assert!(status.success(), "{status:?}");
}

#[tokio::test]
async fn insecure_mode_is_explicit_and_loud() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("p.sock");
    let mut c = spawn(
        &[
            &format!("--workspace={}", dir.path().display()),
            &format!("--listen=unix:{}", sock.display()),
            "--insecure-no-auth",
        ],
        None,
    );
    wait_for_socket(&sock).await;
    let req = hyper::Request::post("/api/execute")
        .header("host", "picod")
        .body(Full::from(json!({"command": ["echo", "open"]}).to_string()))
        .unwrap();
    let (status, body) = unix_request(&sock, req).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    c.kill().unwrap();
    c.wait().unwrap();
    assert!(stderr_of(&mut c).contains("AUTHENTICATION DISABLED"));
}

/// Sends an execute over raw TCP, waits until the command wrote its pid, hangs up, and checks
/// the command's process is killed.
async fn disconnect_kills(stream_mode: bool) {
    let dir = tempfile::tempdir().unwrap();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let ws = dir.path().join("ws");
    let mut c = spawn(
        &[
            &format!("--workspace={}", ws.display()),
            &format!("--listen=127.0.0.1:{port}"),
        ],
        Some(ROUTER_PUB),
    );
    let mut conn = None;
    for _ in 0..200 {
        if let Ok(s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            conn = Some(s);
            break;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    let mut conn = conn.expect("picod did not listen");
    let body =
        json!({"command": ["sh", "-c", "echo $$ > cmd.pid; exec sleep 60"], "timeout": "120s"})
            .to_string();
    let accept = if stream_mode {
        "accept: application/x-ndjson\r\n"
    } else {
        ""
    };
    write!(
        conn,
        "POST /api/execute HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {}\r\ncontent-type: application/json\r\n{accept}content-length: {}\r\n\r\n{body}",
        token(),
        body.len()
    )
    .unwrap();
    let pid_file = ws.join("cmd.pid");
    let mut pid = None;
    for _ in 0..200 {
        if let Some(p) = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
        {
            pid = Some(p);
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let pid = pid.expect("command did not start");
    assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
    conn.shutdown(std::net::Shutdown::Both).unwrap();
    drop(conn);
    let mut gone = false;
    for _ in 0..200 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if stat.is_empty() || stat.split(' ').nth(2) == Some("Z") {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    c.kill().unwrap();
    c.wait().unwrap();
    assert!(
        gone,
        "command {pid} kept running after the client went away (stream={stream_mode})"
    );
}

#[tokio::test]
async fn client_disconnect_kills_a_buffered_command() {
    disconnect_kills(false).await;
}

#[tokio::test]
async fn client_disconnect_kills_a_streamed_command() {
    disconnect_kills(true).await;
}

#[tokio::test]
async fn commands_get_default_signals_even_when_picod_was_started_with_them_ignored() {
    // As a `&` job of a non-interactive shell is started: SIGINT and SIGQUIT ignored, which
    // `exec` keeps. A command that inherited them could not be interrupted.
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("p.sock");
    let mut c = Command::new("sh")
        .args(["-c", "trap '' INT QUIT; exec \"$0\" \"$@\"", BIN])
        .arg(format!("--workspace={}", dir.path().display()))
        .arg(format!("--listen=unix:{}", sock.display()))
        .arg("--insecure-no-auth")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_socket(&sock).await;
    let ignored = |pid: &str| -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let mask = status
            .lines()
            .find_map(|l| l.strip_prefix("SigIgn:"))
            .unwrap();
        u64::from_str_radix(mask.trim(), 16).unwrap()
    };
    // Bits of SIGINT (2) and SIGQUIT (3) in a `SigIgn` mask.
    const INT_QUIT: u64 = (1 << (2 - 1)) | (1 << (3 - 1));
    let req = hyper::Request::post("/api/execute")
        .header("host", "picod")
        .body(Full::from(
            json!({"command": ["grep", "SigIgn", "/proc/self/status"]}).to_string(),
        ))
        .unwrap();
    let (status, body) = unix_request(&sock, req).await;
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let mask = v["stdout"]
        .as_str()
        .unwrap()
        .trim()
        .trim_start_matches("SigIgn:");
    let mask = u64::from_str_radix(mask.trim(), 16).unwrap();
    assert_eq!(
        mask & INT_QUIT,
        0,
        "a command inherited ignored signals: {v}"
    );
    assert_eq!(
        ignored(&c.id().to_string()) & INT_QUIT,
        0,
        "picod catches both"
    );
    let _ = c.kill();
    let _ = c.wait();
}
