//! The `workload-manager` binary's start against a session store that cannot serve yet: a Redis
//! pod started beside it, or one loading its dataset after a restart. Before, the manager
//! exited at once, and in a cluster waited out the kubelet's restart back-off.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use agentcube_store::testing::{Flavor, ServerProcess};

const BIN: &str = env!("CARGO_BIN_EXE_workload-manager");

/// The manager on the local backend (no definitions), on a free loopback port, its log in `log`.
fn start(dir: &Path, store: &str, log: &Path) -> (Child, u16) {
    start_with(dir, &["--store", store], log)
}

/// [`start`] with store flags `store`.
fn start_with(dir: &Path, store: &[&str], log: &Path) -> (Child, u16) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    std::fs::create_dir_all(dir.join("manifests")).unwrap();
    let child = Command::new(BIN)
        .args([
            "--backend",
            "local",
            "--bind",
            "127.0.0.1",
            "--metrics-port",
            "0",
        ])
        .args(["--port", &port.to_string()])
        .args(store)
        .arg("--manifests")
        .arg(dir.join("manifests"))
        .arg("--state-dir")
        .arg(dir.join("state"))
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    (child, port)
}

/// `GET /health`'s status, `None` while nothing answers.
fn health(port: u16) -> Option<u16> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).ok()?;
    String::from_utf8_lossy(&head[9..12]).parse().ok()
}

/// Kills the manager when dropped (a failed assertion leaves nothing running).
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_start_waits_for_a_store_that_is_down_then_loading() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("wm.log");
    let mut redis = ServerProcess::start(Flavor::Redis);
    redis.stop();
    let (child, port) = start(dir.path(), &redis.url(), &log);
    let mut wm = Running(child);
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        wm.0.try_wait().unwrap().is_none(),
        "exited with the store down"
    );
    assert_eq!(health(port), None, "serving without a store");
    // Back, but loading its dataset for a few seconds: still waiting.
    redis.restart_loading(20_000, Duration::from_micros(150));
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        wm.0.try_wait().unwrap().is_none(),
        "exited while the store loads"
    );
    assert_eq!(health(port), None, "serving while the store loads");
    let deadline = Instant::now() + Duration::from_secs(40);
    while health(port) != Some(200) {
        assert!(wm.0.try_wait().unwrap().is_none(), "exited");
        assert!(
            Instant::now() < deadline,
            "not serving once the store answers"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(text.matches("does not answer yet").count(), 1, "{text}");
    assert!(text.contains("the session store answers"), "{text}");
}

/// Waits for the manager's exit (10 s at most) and returns its log.
fn exit_log(wm: &mut Running, log: &Path) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = wm.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "still starting");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!status.success());
    std::fs::read_to_string(log).unwrap()
}

/// The store flags reach the binary: over TLS with a private CA it serves; with the system's
/// CAs (which do not know that one) the start stops at once, naming the certificate.
#[test]
fn a_store_over_tls_with_its_own_ca() {
    let dir = tempfile::tempdir().unwrap();
    let pki = agentcube_test_cluster::certs::Pki::write(&dir.path().join("pki"), &[]).unwrap();
    let redis =
        ServerProcess::start_tls(&pki.server_cert(), &pki.server_key(), &pki.ca_cert(), false);
    let url = format!("rediss://localhost:{}/", redis.port());
    let ca = pki.ca_cert();
    let log = dir.path().join("wm.log");
    let flags = ["--store", &url, "--store-ca-file", ca.to_str().unwrap()];
    let (child, port) = start_with(&dir.path().join("a"), &flags, &log);
    let wm = Running(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while health(port) != Some(200) {
        assert!(
            Instant::now() < deadline,
            "not serving: {}",
            std::fs::read_to_string(&log).unwrap()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(wm);
    let (child, _) = start_with(&dir.path().join("b"), &["--store", &url], &log);
    let text = exit_log(&mut Running(child), &log);
    assert!(text.contains("invalid peer certificate"), "{text}");
    assert!(!text.contains("waiting up to"), "{text}");
}

#[test]
fn a_store_that_refuses_the_manager_stops_the_start_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("wm.log");
    let redis = ServerProcess::start(Flavor::Redis);
    // A password this Redis does not have: waiting would not help.
    let url = redis.url().replace("redis://", "redis://:wrong@");
    let (child, _) = start(dir.path(), &url, &log);
    let text = exit_log(&mut Running(child), &log);
    assert!(
        text.contains("the session store refuses this manager"),
        "{text}"
    );
    assert!(text.contains("Password authentication failed"), "{text}");
    assert!(!text.contains("waiting up to"), "{text}");
}
