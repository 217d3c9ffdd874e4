//! Network policies on the local backend, tried from inside real sandboxes against test hosts in
//! network namespaces this test creates (never an outside address): allowed host and port
//! reachable, everything else refused, DNS only to the configured resolver, the host itself and
//! other sandboxes and link-local addresses (cloud metadata endpoints) unreachable whatever the
//! policy, no network without a policy, and policy changes applied to new sandboxes; under
//! bubblewrap and under gVisor. Needs root (network namespaces, nftables).

mod common;

use std::process::{Child, Command, Stdio};

use agentcube_workload_manager::backend::local::Isolation;
use common::*;

/// A host on its own network namespace, linked to the root namespace by a veth pair on
/// `10.214.<n>.0/30` (root side `.1`, host `.2`), serving TCP on 8000 and 8001 and UDP on 53
/// (each answers its own name and port).
struct TestHost {
    ns: String,
    ip: String,
    root_ip: String,
    servers: Vec<Child>,
}

const SERVER: &str = r#"
import socket, sys, threading
ip, name = sys.argv[1], sys.argv[2]
def tcp(port):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((ip, port)); s.listen(16)
    while True:
        c, _ = s.accept(); c.sendall(f"{name}:{port}".encode()); c.close()
def udp():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind((ip, 53))
    while True:
        d, a = s.recvfrom(512); s.sendto(f"{name}:dns".encode(), a)
for p in (8000, 8001):
    threading.Thread(target=tcp, args=(p,), daemon=True).start()
udp()
"#;

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl TestHost {
    fn start(n: u8) -> Self {
        Self::start_at(n, &format!("10.214.{n}"))
    }

    /// A host at `<net>.2`, the root namespace's side at `<net>.1`.
    fn start_at(n: u8, net: &str) -> Self {
        let tag = format!("{}{n}", std::process::id() % 100_000);
        let ns = format!("actest-{tag}");
        let (root_if, root_ip, host_ip) =
            (format!("ath{tag}"), format!("{net}.1"), format!("{net}.2"));
        let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        ip(&["netns", "add", &ns]);
        ip(&[
            "link", "add", &root_if, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ]);
        ip(&["addr", "add", &format!("{root_ip}/30"), "dev", &root_if]);
        ip(&["link", "set", &root_if, "up"]);
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{host_ip}/30"),
            "dev",
            "eth0",
        ]);
        ip(&["-n", &ns, "link", "set", "eth0", "up"]);
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        // Answers go back through the root namespace (to the sandboxes' masqueraded traffic).
        ip(&["-n", &ns, "route", "add", "default", "via", &root_ip]);
        let server = Command::new("ip")
            .args(["netns", "exec", &ns, "python3", "-c", SERVER, &host_ip, &ns])
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(300));
        Self {
            ns,
            ip: host_ip,
            root_ip,
            servers: vec![server],
        }
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        for s in &mut self.servers {
            let _ = s.kill();
            let _ = s.wait();
        }
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
    }
}

/// Runs in the sandbox: `tcp HOST PORT` / `udp HOST PORT`, printing what came back or the error.
const PROBE: &str = r#"
import socket, sys
kind, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
try:
    if kind == "tcp":
        s = socket.create_connection((host, port), timeout=3); print("ok", s.recv(100).decode())
    else:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2)
        s.sendto(b"q", (host, port)); print("ok", s.recv(100).decode())
except Exception as e:
    print("err", type(e).__name__)
"#;

async fn probe(session: &serde_json::Value, kind: &str, host: &str, port: u16) -> String {
    let port = port.to_string();
    let out = exec(session, &["python3", "-c", PROBE, kind, host, &port]).await;
    out["stdout"].as_str().unwrap().trim().to_string()
}

/// Creates a session; a failure shows the Workload Manager's log.
async fn create(s: &Stack, logs: &Logs, kind: &str, name: &str) -> serde_json::Value {
    let (status, body) = s.create(kind, name).await;
    assert_eq!(status, 200, "create {name}: {body}\nlog:\n{}", logs.text());
    body
}

fn policy_ci(name: &str, policy: &str) -> String {
    code_interpreter(name, &format!("  networkPolicy: {policy}\n"))
}

#[tokio::test]
async fn policies_allow_what_they_name_and_nothing_else() {
    policies_hold(Isolation::Bubblewrap, 0).await;
}

#[tokio::test]
async fn policies_hold_under_gvisor_too() {
    // runsc runs in the sandbox's namespace with host networking (`--network=host`): its
    // sockets are the namespace's, under the same rules.
    policies_hold(Isolation::Gvisor, 10).await;
}

/// A DNS server on one of the host's own addresses (a dnsmasq on its LAN side, here the root
/// namespace's end of a test link) is refused at start with the reason: the host table closes
/// the host to sandboxes, so their lookups would all fail. The server behind that link (not the
/// host) is accepted.
#[test]
fn a_sandbox_dns_on_the_host_itself_is_refused_at_start() {
    use agentcube_workload_manager::backend::local::{LocalBackend, LocalConfig};
    if !nix::unistd::Uid::effective().is_root() {
        panic!("needs root (a veth pair): run as root");
    }
    let h = TestHost::start(30);
    let dir = tempfile::tempdir().unwrap();
    let config = |state: &str, dns: &str| {
        let state = dir.path().join(state);
        std::fs::create_dir(&state).unwrap();
        let mut c = LocalConfig::new(state, picod_binary());
        c.sandbox_dns = Some(dns.parse().unwrap());
        c
    };
    let err = LocalBackend::new(config("on-host", &h.root_ip))
        .err()
        .expect("must refuse to start");
    assert!(
        err.contains(&format!(
            "--sandbox-dns {} is an address of this host",
            h.root_ip
        )),
        "{err}"
    );
    LocalBackend::new(config("behind-link", &h.ip)).expect("a server sandboxes can reach");
}

/// The test hosts are `base + 1..=3` (distinct per test: they run at once).
async fn policies_hold(isolation: Isolation, base: u8) {
    if !nix::unistd::Uid::effective().is_root() {
        panic!("network policy tests need root (network namespaces, nftables): run as root");
    }
    // A sandbox that fails to start says why only in the log (runsc's output, say): kept here
    // for the failure's message.
    let (_guard, logs) = Logs::start();
    let (a, b) = (TestHost::start(base + 1), TestHost::start(base + 2));
    // Link-local, as a cloud's metadata endpoint (169.254.169.254) and AWS's resolver are; the
    // stack's DNS resolver.
    let m = TestHost::start_at(base + 3, &format!("169.254.{}", 77 + base));
    let strict = format!(
        "{{egress: [{{cidrs: [{}/32], ports: [{{protocol: TCP, port: 8000}}]}}], ingress: [{{cidrs: [{}/32], ports: [{{port: 9100}}]}}]}}",
        a.ip, b.ip
    );
    // An agent with a policy: the Router reaches it through PicoD's forwarded port as any.
    let agent = host_agent(
        "netagent",
        8080,
        r#"[python3, -m, http.server, "8080", --bind, 127.0.0.1]"#,
    ) + "  networkPolicy: {egress: [{cidrs: [192.0.2.0/24]}]}\n---\n";
    let manifests = policy_ci("strict", &strict)
        + &policy_ci("open", "{egress: [{cidrs: [0.0.0.0/0]}]}")
        + &code_interpreter("none", "")
        + &agent;
    let s = Stack::start(Options {
        manifests: manifests.clone(),
        sandbox_dns: Some(m.ip.parse().unwrap()),
        isolation,
        ..Default::default()
    })
    .await;
    let strict = create(&s, &logs, "code-interpreter", "strict").await;
    let open = create(&s, &logs, "code-interpreter", "open").await;
    let none = create(&s, &logs, "code-interpreter", "none").await;
    let agent = create(&s, &logs, "agent-runtime", "netagent").await;
    let (status, _) = unix_http(
        agent["entryPoints"][0]["endpoint"].as_str().unwrap(),
        "GET",
        "/",
        None,
    )
    .await;
    assert_eq!(
        status, 200,
        "the agent's port, forwarded into its namespace"
    );
    assert_eq!(s.delete(agent["sessionId"].as_str().unwrap()).await.0, 200);

    // The allowed host and port only; the rest is refused at once (TCP reset).
    assert_eq!(
        probe(&strict, "tcp", &a.ip, 8000).await,
        format!("ok {}:8000", a.ns)
    );
    assert_eq!(
        probe(&strict, "tcp", &a.ip, 8001).await,
        "err ConnectionRefusedError"
    );
    assert_eq!(
        probe(&strict, "tcp", &b.ip, 8000).await,
        "err ConnectionRefusedError"
    );
    // DNS only to the configured resolver (link-local here, as AWS's is).
    assert_eq!(
        probe(&strict, "udp", &m.ip, 53).await,
        format!("ok {}:dns", m.ns)
    );
    assert_eq!(
        probe(&strict, "udp", &a.ip, 53).await,
        "err PermissionError"
    );
    let resolv = exec(&strict, &["cat", "/etc/resolv.conf"]).await;
    assert_eq!(resolv["stdout"], format!("nameserver {}\n", m.ip));

    // A wide-open policy still never reaches the host itself or another sandbox.
    assert_eq!(
        probe(&open, "tcp", &b.ip, 8001).await,
        format!("ok {}:8001", b.ns)
    );
    // Nor a cloud's metadata endpoint (it hands the host's credentials to the host, which the
    // sandbox's masqueraded traffic is), nor the resolver on another port.
    for port in [8000, 8001] {
        let got = probe(&open, "tcp", &m.ip, port).await;
        assert!(got.starts_with("err"), "link-local :{port}: {got}");
    }
    assert_eq!(
        probe(&open, "udp", &m.ip, 53).await,
        format!("ok {}:dns", m.ns)
    );
    let host = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let host_port = host.local_addr().unwrap().port();
    assert!(
        probe(&open, "tcp", &a.root_ip, host_port)
            .await
            .starts_with("err"),
        "the host's own address"
    );
    let gateway = exec(
        &open,
        &["sh", "-c", "ip route 2>/dev/null || cat /proc/net/route"],
    )
    .await;
    assert!(!gateway["stdout"].as_str().unwrap().is_empty());
    let strict_ip = exec(&strict, &["python3", "-c", "import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.connect(('10.214.0.1', 1)); print(s.getsockname()[0])"]).await;
    let strict_ip = strict_ip["stdout"].as_str().unwrap().trim().to_string();
    assert!(strict_ip.starts_with("10.213."), "{strict_ip}");
    let sandbox_server = exec(&strict, &["sh", "-c", "python3 -c \"import socket; s=socket.socket(); s.bind(('0.0.0.0', 9000)); s.listen(); s.accept()\" & sleep 0.3; echo started"]).await;
    assert_eq!(sandbox_server["stdout"], "started\n");
    assert!(
        probe(&open, "tcp", &strict_ip, 9000)
            .await
            .starts_with("err"),
        "another sandbox"
    );
    // Ingress: only the named source, only the named port.
    let listen = "python3 -c \"import socket; s=socket.socket(); s.bind(('0.0.0.0', 9100)); s.listen(8)\nwhile True: c,_=s.accept(); c.sendall(b'sandbox'); c.close()\" >/dev/null 2>&1 & sleep 0.3; echo started";
    assert_eq!(
        exec(&strict, &["sh", "-c", listen]).await["stdout"],
        "started\n"
    );
    let from = |host: &TestHost, port: u16| {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &host.ns,
                "python3",
                "-c",
                PROBE,
                "tcp",
                &strict_ip,
                &port.to_string(),
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(from(&b, 9100), "ok sandbox");
    assert!(from(&a, 9100).starts_with("err"), "another source");
    assert!(from(&b, 9000).starts_with("err"), "another port");
    // A host that did not forward before forwards only sandboxes' traffic: one of its other
    // networks cannot route through it to another.
    if std::path::Path::new("/run/agentcube-net/forwarding-enabled").exists() {
        let out = Command::new("ip")
            .args([
                "netns", "exec", &a.ns, "python3", "-c", PROBE, "tcp", &b.ip, "8000",
            ])
            .output()
            .unwrap();
        let got = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert!(
            got.starts_with("err"),
            "forwarded between the host's networks: {got}"
        );
    }
    // The sandbox cannot change its own rules.
    let nft = exec(
        &strict,
        &["sh", "-c", "/usr/sbin/nft flush ruleset 2>&1; echo rc=$?"],
    )
    .await;
    let out = nft["stdout"].as_str().unwrap();
    // (Under gVisor netfilter's netlink is not there at all.)
    assert!(
        (out.contains("Operation not permitted") || out.contains("Protocol not supported"))
            && !out.contains("rc=0"),
        "{out}"
    );
    assert_eq!(
        probe(&strict, "tcp", &a.ip, 8001).await,
        "err ConnectionRefusedError",
        "the rules still hold"
    );

    // No policy: no network at all.
    assert_eq!(probe(&none, "tcp", &a.ip, 8000).await, "err OSError");

    // A policy change applies to new sandboxes.
    let wider = format!(
        "{{egress: [{{cidrs: [{}/32], ports: [{{port: 8000}}, {{port: 8001}}]}}]}}",
        a.ip
    );
    std::fs::write(
        s.dir.path().join("manifests/defs.yaml"),
        policy_ci("strict", &wider) + &code_interpreter("none", ""),
    )
    .unwrap();
    let mut reached = String::new();
    for _ in 0..50 {
        let fresh = create(&s, &logs, "code-interpreter", "strict").await;
        reached = probe(&fresh, "tcp", &a.ip, 8001).await;
        assert_eq!(s.delete(fresh["sessionId"].as_str().unwrap()).await.0, 200);
        if reached.starts_with("ok") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert_eq!(reached, format!("ok {}:8001", a.ns));

    // Nothing is left behind: namespaces go with their sandboxes.
    for v in [&strict, &open, &none] {
        assert_eq!(s.delete(v["sessionId"].as_str().unwrap()).await.0, 200);
    }
    let netns = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let listed = String::from_utf8_lossy(&netns.stdout).to_string();
    for v in [&strict, &open] {
        let name = v["sandboxName"].as_str().unwrap();
        assert!(!listed.contains(&format!("agentcube-{name}")), "{listed}");
    }
    s.shutdown_and_check_leaks().await;
    drop(host);
}
