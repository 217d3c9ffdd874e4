//! A Workload Manager on the local backend with real bubblewrap sandboxes, a real PicoD binary,
//! and an HTTP client that reaches sandboxes through their Unix sockets.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use agentcube_store::SessionStore;
use agentcube_workload_manager::backend::local::{LocalBackend, LocalConfig};
use agentcube_workload_manager::{Config, WorkloadManager};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use serde_json::{Value, json};

pub const ROUTER_KEY: &str = include_str!("../../../picod/tests/data/router.key.pem");
pub const ROUTER_PUB: &str = include_str!("../../../picod/tests/data/router.pub.pem");

/// The PicoD sandboxes run: `AGENTCUBE_TEST_PICOD` when set (e.g. the static release build of
/// `scripts/build-picod.sh`), else the debug build.
pub fn picod_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("AGENTCUBE_TEST_PICOD") {
        return PathBuf::from(p);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"));
    let p = target.join("debug/picod");
    assert!(
        p.exists(),
        "{} missing: run `cargo build -p agentcube-picod`",
        p.display()
    );
    p
}

pub struct Stack {
    /// Dropped before `dir`, so that a failed test's mounts do not keep its directory.
    _unmounts: Unmounts,
    pub dir: tempfile::TempDir,
    pub url: String,
    pub backend: LocalBackend,
    pub store: Arc<dyn SessionStore>,
    pub wm: Option<WorkloadManager>,
    pub http: reqwest::Client,
    server: tokio::task::JoinHandle<()>,
}

/// Unmounts what sandboxes left mounted below a state directory (their `run/` tmpfs, when a
/// test failed before its sandboxes were removed).
struct Unmounts(PathBuf);

impl Drop for Unmounts {
    fn drop(&mut self) {
        agentcube_workload_manager::backend::local::layout::unmount_leftovers(&self.0);
    }
}

pub struct Options {
    pub manifests: String,
    pub store: Option<Arc<dyn SessionStore>>,
    pub picod: Option<PathBuf>,
    pub create_timeout: Duration,
    pub gc_interval: Duration,
    pub pids: u64,
    pub isolation: agentcube_workload_manager::backend::local::Isolation,
    pub admission: agentcube_workload_manager::sessions::Admission,
    pub memory_budget: Option<u64>,
    /// Reuse this directory (state, manifests) instead of a fresh one: a restart.
    pub dir: Option<tempfile::TempDir>,
    /// Require this static bearer token from callers.
    pub auth_token: Option<String>,
    /// DNS server of sandboxes with a network policy.
    pub sandbox_dns: Option<std::net::IpAddr>,
    /// Pull definitions' images (`None`: host mode).
    pub images: Option<agentcube_workload_manager::backend::local::image::RegistrySettings>,
    /// How long a local sandbox may take to answer.
    pub ready_timeout: Duration,
    /// What workspace reservations leave free on the state directory's disk.
    pub disk_reserve: agentcube_workload_manager::backend::local::quota::DiskReserve,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            manifests: String::new(),
            store: None,
            picod: None,
            create_timeout: Duration::from_secs(30),
            ready_timeout: Duration::from_secs(20),
            gc_interval: Duration::from_secs(3600),
            pids: 512,
            isolation: Default::default(),
            admission: Default::default(),
            memory_budget: agentcube_workload_manager::backend::local::host_memory(),
            dir: None,
            auth_token: None,
            sandbox_dns: None,
            images: None,
            disk_reserve: Default::default(),
        }
    }
}

/// What the code under test logs on this thread (a current-thread test runtime: the Workload
/// Manager's tasks included) while the guard lives.
pub struct Logs(Arc<std::sync::Mutex<Vec<u8>>>);

impl Logs {
    pub fn start() -> (tracing::subscriber::DefaultGuard, Self) {
        // With exactly one dispatcher alive in the process, tracing-core works out a callsite's
        // interest from the default of whichever thread reaches it first: a sibling test with no
        // subscriber caches "never" for a line this test then waits for, and the capture stays
        // empty (tokio-rs/tracing#3611; it happened in CI). A second dispatcher, alive for good,
        // makes it ask every dispatcher instead.
        static SECOND: std::sync::OnceLock<tracing::Dispatch> = std::sync::OnceLock::new();
        SECOND.get_or_init(|| tracing::Dispatch::new(tracing::subscriber::NoSubscriber::default()));
        let buf = Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || Sink(sink.clone()))
            .finish();
        (tracing::subscriber::set_default(subscriber), Self(buf))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    /// The first line logged that contains `needle` (the whole log in the panic when none).
    pub fn line_with(&self, needle: &str) -> String {
        let text = self.text();
        text.lines()
            .find(|l| l.contains(needle))
            .map(str::to_string)
            .unwrap_or_else(|| panic!("no {needle:?} in the log:\n{text}"))
    }
}

struct Sink(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Sink {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

pub fn code_interpreter(name: &str, extra: &str) -> String {
    format!(
        "apiVersion: runtime.agentcube.volcano.sh/v1alpha1\nkind: CodeInterpreter\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  template:\n    image: picod\n{extra}---\n"
    )
}

impl Stack {
    pub async fn start(mut opts: Options) -> Self {
        let dir = opts
            .dir
            .take()
            .unwrap_or_else(|| tempfile::tempdir().unwrap());
        let manifests = dir.path().join("manifests");
        std::fs::create_dir_all(&manifests).unwrap();
        std::fs::write(manifests.join("defs.yaml"), &opts.manifests).unwrap();
        let mut local = LocalConfig::new(
            dir.path().join("state"),
            opts.picod.unwrap_or_else(picod_binary),
        );
        local.default_pids_limit = opts.pids;
        local.memory_budget = opts.memory_budget;
        local.isolation = opts.isolation;
        local.ready_timeout = opts.ready_timeout;
        local.sandbox_dns = opts.sandbox_dns;
        local.images = opts.images;
        local.disk_reserve = opts.disk_reserve;
        let backend = LocalBackend::new(local).unwrap();
        let store = opts
            .store
            .unwrap_or_else(|| Arc::new(agentcube_store::MemoryStore::new()));
        let config = Config {
            gc_interval: opts.gc_interval,
            create_timeout: opts.create_timeout,
            admission: opts.admission,
            auth: Arc::new(match opts.auth_token.clone() {
                Some(t) => agentcube_workload_manager::auth::CallerAuth::Token(t),
                None => agentcube_workload_manager::auth::CallerAuth::Off,
            }),
            ..Default::default()
        };
        let platform = backend
            .clone()
            .platform(
                Some(manifests),
                Duration::from_millis(200),
                Some(ROUTER_PUB.into()),
            )
            .await
            .unwrap();
        let wm = WorkloadManager::start(config, store.clone(), platform)
            .await
            .unwrap();
        let (url, server) = serve_api(&wm).await;
        Self {
            _unmounts: Unmounts(dir.path().join("state")),
            dir,
            url,
            backend,
            store,
            wm: Some(wm),
            http: reqwest::Client::new(),
            server,
        }
    }

    pub async fn create(&self, kind: &str, name: &str) -> (u16, Value) {
        create_session(&self.http, &self.url, kind, name).await
    }

    pub async fn create_ok(&self, kind: &str, name: &str) -> Value {
        let (s, v) = self.create(kind, name).await;
        assert_eq!(s, 200, "create {name}: {v}");
        v
    }

    /// Deletes through the route of the session's own kind (`code-interpreter` when unknown).
    pub async fn delete(&self, id: &str) -> (u16, Value) {
        delete_session(
            &self.http,
            &self.url,
            &kind_segment(&*self.store, id).await,
            id,
        )
        .await
    }

    /// Stops the Workload Manager (sandboxes removed, records kept, as a clean shutdown does)
    /// and hands back its directory, for a restart on the same state.
    pub async fn stop_keeping_dir(mut self) -> tempfile::TempDir {
        self.wm.take().unwrap().shutdown().await;
        self.server.abort();
        self.dir
    }

    /// Everything this stack started is gone: processes, sockets, directories, cgroups.
    pub async fn shutdown_and_check_leaks(mut self) {
        let state = self.dir.path().join("state/sandboxes");
        let cgroups = self.backend.cgroup_instance_dirs();
        self.wm.take().unwrap().shutdown().await;
        self.server.abort();
        assert!(
            self.backend.running().is_empty(),
            "sandboxes left: {:?}",
            self.backend.running()
        );
        let left: Vec<_> = std::fs::read_dir(&state).unwrap().collect();
        assert!(left.is_empty(), "sandbox directories left: {left:?}");
        let left: Vec<_> = cgroups.iter().filter(|d| d.exists()).collect();
        assert!(left.is_empty(), "cgroup directories left: {left:?}");
    }
}

/// Serves a Workload Manager's API on a free loopback port: (base URL, server task).
pub async fn serve_api(wm: &WorkloadManager) -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let app = wm.app();
    let server = tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    (url, server)
}

/// `POST {url}/v1/{kind}` with the body the SDK sends.
pub async fn create_session(
    http: &reqwest::Client,
    url: &str,
    kind: &str,
    name: &str,
) -> (u16, Value) {
    create_session_in(http, url, kind, "default", name).await
}

/// [`create_session`] of a definition in `namespace`.
pub async fn create_session_in(
    http: &reqwest::Client,
    url: &str,
    kind: &str,
    namespace: &str,
    name: &str,
) -> (u16, Value) {
    let r = http
        .post(format!("{url}/v1/{kind}"))
        .json(&json!({"name": name, "namespace": namespace, "ttl": 3600, "metadata": {}}))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// The WM API segment of a stored session's kind (`code-interpreter` when it has none).
pub async fn kind_segment(store: &dyn agentcube_store::SessionStore, id: &str) -> String {
    let kind = store.get(id).await.ok().and_then(|r| r.workload_kind);
    kind.map_or("code-interpreter", |k| k.api_segment())
        .to_string()
}

/// `DELETE {url}/v1/{kind}/sessions/{id}`.
pub async fn delete_session(
    http: &reqwest::Client,
    url: &str,
    kind: &str,
    id: &str,
) -> (u16, Value) {
    let r = http
        .delete(format!("{url}/v1/{kind}/sessions/{id}"))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// A token as the Router signs it, bound to sandbox `aud`.
pub fn token(aud: &str) -> String {
    let now = jiff::Timestamp::now().as_second();
    let claims = json!({"iss": "agentcube-router", "iat": now, "exp": now + 300, "session_id": "t", "aud": aud});
    let key = jsonwebtoken::EncodingKey::from_rsa_pem(ROUTER_KEY.as_bytes()).unwrap();
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256),
        &claims,
        &key,
    )
    .unwrap()
}

/// An AgentRuntime `name` on the host's `/usr` running `command` (a YAML list), reached on `port`.
pub fn host_agent(name: &str, port: u16, command: &str) -> String {
    format!(
        "apiVersion: runtime.agentcube.volcano.sh/v1alpha1\nkind: AgentRuntime\n\
         metadata: {{name: {name}, namespace: default}}\nspec:\n  \
         targetPort: [{{pathPrefix: /, port: {port}, protocol: HTTP}}]\n  podTemplate:\n    \
         spec:\n      containers:\n        - name: agent\n          image: host\n          \
         command: {command}\n"
    )
}

/// The sandbox a local endpoint belongs to: its socket sits in `private/<name>/sockets/`.
pub fn sandbox_of(endpoint: &str) -> String {
    let sock = Path::new(endpoint.strip_prefix("unix:").expect("unix endpoint"));
    sock.parent()
        .and_then(Path::parent)
        .and_then(Path::file_name)
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

/// One HTTP request over a Unix socket (`unix:/path` endpoint), with a token for that sandbox.
pub async fn unix_http(
    endpoint: &str,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (u16, Vec<u8>) {
    unix_http_as(endpoint, &token(&sandbox_of(endpoint)), method, path, body).await
}

/// [`unix_http`] with the given bearer token.
pub async fn unix_http_as(
    endpoint: &str,
    token: &str,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (u16, Vec<u8>) {
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    unix_send(
        endpoint,
        token,
        method,
        path,
        "application/json",
        body.into(),
    )
    .await
}

/// A request with a raw body of `content_type` to PicoD at a `unix:` endpoint, as the Router.
pub async fn unix_send(
    endpoint: &str,
    token: &str,
    method: &str,
    path: &str,
    content_type: &str,
    body: Bytes,
) -> (u16, Vec<u8>) {
    let sock = endpoint.strip_prefix("unix:").expect("unix endpoint");
    let stream = tokio::net::UnixStream::connect(sock).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "sandbox")
        .header("authorization", format!("Bearer {token}"))
        .header("content-type", content_type)
        .body(Full::new(body))
        .unwrap();
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

/// Runs a command in a CodeInterpreter session's sandbox through PicoD.
pub async fn exec(session: &Value, argv: &[&str]) -> Value {
    let ep = session["entryPoints"][0]["endpoint"].as_str().unwrap();
    let (status, body) = unix_http(
        ep,
        "POST",
        "/api/execute",
        Some(json!({"command": argv, "timeout": "20s"})),
    )
    .await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    serde_json::from_slice(&body).unwrap()
}

pub fn sh(script: &str) -> Vec<&str> {
    vec!["sh", "-c", script]
}

pub async fn eventually(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    for _ in 0..secs * 20 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}
pub mod kube;

/// The workspace as its sandbox sees it, reached from the host through PicoD's root
/// (`/proc/<pid>/root/root`): a workspace with a quota is mounted only in the sandbox's own mount
/// namespace, so the host directory stays empty. Falls back to that directory without cgroups.
pub fn sandbox_ws(backend: &LocalBackend, name: &str) -> PathBuf {
    for dir in backend.cgroup_dirs(name) {
        let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        for pid in procs.lines() {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            if comm.trim() == "picod" {
                return PathBuf::from(format!("/proc/{pid}/root/root"));
            }
        }
    }
    backend.paths(name).ws
}

/// Fills each `(file, MiB)` of `fills` in the sandbox: the write fails with ENOSPC at that size,
/// and afterwards the sandbox still answers, with room for a program's own memory. Writing under
/// each of `read_only` fails with EROFS (or EACCES).
pub async fn tmpfs_fill_up_to_their_size(
    session: &Value,
    fills: &[(&str, u64)],
    read_only: &[&str],
) {
    const FILL: &str = r#"
import errno, sys
path, total = sys.argv[1], 0
try:
    with open(path, "wb") as f:
        for _ in range(200):
            f.write(b"x" * (1 << 20)); f.flush(); total += 1 << 20
    print("wrote", total >> 20)
except OSError as e:
    print(errno.errorcode[e.errno], total >> 20)
"#;
    for (path, mib) in fills {
        let out = exec(session, &["python3", "-c", FILL, path]).await;
        let stdout = out["stdout"].as_str().unwrap_or_default();
        let got: Vec<&str> = stdout.split_whitespace().collect();
        assert_eq!(got.first(), Some(&"ENOSPC"), "{path}: {out}");
        let wrote: u64 = got[1].parse().unwrap();
        assert!(
            wrote + 2 >= *mib && wrote <= *mib,
            "{path}: {wrote} MiB of {mib}: {out}"
        );
        // A command that meets the full directory is told which one it is.
        let dir = path.rsplit_once('/').unwrap().0;
        if ["/tmp", "/dev/shm"].contains(&dir) {
            let more = format!("head -c 2097152 /dev/zero > {path}.more");
            let out = exec(session, &sh(&more)).await;
            let note =
                format!("[picod: {dir} is full: it holds {mib}.0 MiB at most; the workspace has ");
            assert!(
                out["stderr"].as_str().unwrap().contains(&note),
                "{note}: {out}"
            );
        }
        // Still alive, and a program gets memory beside the full tmpfs.
        let out = exec(
            session,
            &["python3", "-c", "x = bytearray(8 << 20); print('ok')"],
        )
        .await;
        assert_eq!(out["stdout"], "ok\n", "after filling {path}: {out}");
        let rm = format!("rm -f {path} {path}.more");
        assert_eq!(exec(session, &sh(&rm)).await["exit_code"], 0);
    }
    for dir in read_only {
        let path = format!("{dir}/fill");
        let out = exec(session, &["python3", "-c", FILL, &path]).await;
        let stdout = out["stdout"].as_str().unwrap_or_default();
        assert!(
            stdout == "EROFS 0\n" || stdout == "EACCES 0\n",
            "{path}: {out}"
        );
    }
}

/// Sandbox `a` listens on an abstract Unix socket and on a loopback port, holds a SysV
/// shared-memory segment and message queue, and runs with a marker in its command line.
const NEIGHBOUR: &str = r#"
import ctypes, select, socket, time
libc = ctypes.CDLL(None, use_errno=True)
KEY, CREATE = 0x41435A31, 0o1000
shm, msq = libc.shmget(KEY, 4096, CREATE | 0o666), libc.msgget(KEY, CREATE | 0o666)
addrs = ((socket.AF_UNIX, "\0agentcube-neighbour"), (socket.AF_INET, ("127.0.0.1", 47123)))
listening = []
for family, addr in addrs:
    s = socket.socket(family)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(addr)
    s.listen(8)
    listening.append(s)
start = time.time()
end, accepted = start + 8, 0
while time.time() < end:
    for s in select.select(listening, [], [], 0.1)[0]:
        s.accept()[0].close()
        accepted += 1
own = 0
for family, addr in addrs:
    c = socket.socket(family)
    c.connect(addr)
    own += 1
print(f"start={start} end={end} accepted={accepted} shm={shm} msq={msq} own={own}")
"#;

/// Sandbox `b`, meanwhile, tries each of them, and the host's abstract socket and loopback port
/// (argv: their name and port).
const PROBE: &str = r#"
import ctypes, os, socket, sys, time
libc = ctypes.CDLL(None, use_errno=True)
KEY = 0x41435A31
out = [f"at={time.time()}"]
targets = (
    ("a-abstract", socket.AF_UNIX, "\0agentcube-neighbour"),
    ("a-tcp", socket.AF_INET, ("127.0.0.1", 47123)),
    ("host-abstract", socket.AF_UNIX, "\0" + sys.argv[1]),
    ("host-tcp", socket.AF_INET, ("127.0.0.1", int(sys.argv[2]))),
)
for name, family, addr in targets:
    s = socket.socket(family)
    s.settimeout(1)
    try:
        s.connect(addr)
        out.append(f"{name}=reached")
    except OSError:
        out.append(f"{name}=refused")
out.append(f"shm={libc.shmget(KEY, 0, 0)} msq={libc.msgget(KEY, 0)}")
marker, seen = b"agentcube-" + b"neighbour-marker", 0
for pid in os.listdir("/proc"):
    if pid.isdigit() and int(pid) != os.getpid():
        try:
            seen += marker in open(f"/proc/{pid}/cmdline", "rb").read()
        except OSError:
            pass
out.append(f"marker={seen}")
print(" ".join(out))
"#;

/// Sandbox `b` reaches nothing of sandbox `a`'s, nor the host's: while `a` ([`NEIGHBOUR`]) listens
/// and holds its IPC objects, `b` ([`PROBE`]) cannot connect to either socket, open either object
/// by its key or see `a`'s process, nor connect to an abstract socket or loopback port of the
/// host. `a` reaching its own sockets and making its objects shows the probes would work.
pub async fn neighbours_are_out_of_reach(a: &Value, b: &Value) {
    use std::os::linux::net::SocketAddrExt;
    let name = format!("agentcube-host-probe-{}", std::process::id());
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(&name).unwrap();
    let host_unix = std::os::unix::net::UnixListener::bind_addr(&addr).unwrap();
    let host_tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = host_tcp.local_addr().unwrap().port().to_string();
    let probe = async {
        tokio::time::sleep(Duration::from_secs(3)).await;
        exec(b, &["python3", "-c", PROBE, &name, &port]).await
    };
    let (listened, probed) = tokio::join!(
        exec(
            a,
            &["python3", "-c", NEIGHBOUR, "agentcube-neighbour-marker"]
        ),
        probe
    );
    let fields = |v: &Value| -> std::collections::HashMap<String, String> {
        v["stdout"]
            .as_str()
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let (a_saw, b_saw) = (fields(&listened), fields(&probed));
    let num = |m: &std::collections::HashMap<String, String>, k: &str| -> f64 {
        m.get(k).and_then(|v| v.parse().ok()).unwrap_or(f64::NAN)
    };
    assert!(
        num(&a_saw, "shm") >= 0.0 && num(&a_saw, "msq") >= 0.0 && a_saw["own"] == "2",
        "the probes' targets exist: {listened}"
    );
    assert!(
        num(&a_saw, "start") < num(&b_saw, "at") && num(&b_saw, "at") < num(&a_saw, "end"),
        "probed while the neighbour listened: {listened} {probed}"
    );
    for target in ["a-abstract", "a-tcp", "host-abstract", "host-tcp"] {
        assert_eq!(b_saw[target], "refused", "{target}: {probed}");
    }
    assert_eq!(
        (
            b_saw["shm"].as_str(),
            b_saw["msq"].as_str(),
            b_saw["marker"].as_str()
        ),
        ("-1", "-1", "0"),
        "{probed}"
    );
    assert_eq!(a_saw["accepted"], "0", "{listened}");
    host_unix.set_nonblocking(true).unwrap();
    host_tcp.set_nonblocking(true).unwrap();
    assert!(host_unix.accept().is_err() && host_tcp.accept().is_err());
}
