//! Network access of local sandboxes whose definition sets `spec.networkPolicy` (without one a
//! sandbox has no network at all: bubblewrap unshares it).
//!
//! Each such sandbox gets a network namespace of its own (`agentcube-<sandbox>`) joined to the
//! host by a veth pair on a /30 of `10.213.0.0/16` (host side `acv<index>`), a default route
//! through the host (forwarding on, masquerade towards every other interface), and nftables
//! rules **inside** its namespace: output only to loopback, the configured DNS resolver (port
//! 53) and the policy's egress rules, input only from loopback and the ingress rules; anything
//! else is rejected at once (TCP reset, ICMP admin-prohibited), so a refused connection fails
//! fast with a clear error instead of hanging. The host's own table drops everything sandboxes
//! send to the host itself (its services: Router, Workload Manager, Redis, other sandboxes'
//! sockets) and between sandboxes, whatever a policy says. The sandbox's processes never hold
//! `CAP_NET_ADMIN` over their namespace (bubblewrap's user namespace is a child of it), so they
//! cannot change these rules.
//!
//! Needs root, `ip` (iproute2) and `nft` (nftables). Index allocation is shared by every
//! Workload Manager on the host through lock files under [`INDEX_DIR`].

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use agentcube_crds::{NetworkPolicySpec, NetworkProtocol, NetworkRule};

use super::tools::{run, system_tool};
use crate::backend::BackendError;

/// Where sandbox addresses come from: `/30`s of `10.213.0.0/16` (16384 sandboxes).
pub const SUBNET: &str = "10.213.0.0/16";
const SUBNET_BASE: u32 = u32::from_be_bytes([10, 213, 0, 0]);
const MAX_INDEX: u32 = 1 << 14;
/// Lock files naming the owner of each address index (one per networked sandbox on the host).
pub const INDEX_DIR: &str = "/run/agentcube-net";
/// Host-side interface names: `acv<index>`.
const HOST_IF_PREFIX: &str = "acv";
/// Network namespace names: `agentcube-<sandbox>`.
pub const NETNS_PREFIX: &str = "agentcube-";

/// The host side: tools and the resolver sandboxes use.
#[derive(Debug, Clone)]
pub struct Network {
    ip: PathBuf,
    nft: PathBuf,
    nsenter: PathBuf,
    /// DNS server sandboxes may ask (their `/etc/resolv.conf`); `None`: no DNS.
    pub resolver: Option<IpAddr>,
    /// Set once forwarding and the host table are in place (the first networked sandbox).
    host_ready: std::sync::Arc<tokio::sync::OnceCell<()>>,
}

/// One sandbox's namespace and address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxNet {
    pub netns: String,
    pub index: u32,
}

/// The host and sandbox addresses of index `i`: `10.213.x.(4k+1)` and `(4k+2)`.
pub fn addresses(i: u32) -> (Ipv4Addr, Ipv4Addr) {
    let base = SUBNET_BASE + i * 4;
    (Ipv4Addr::from(base + 1), Ipv4Addr::from(base + 2))
}

impl Network {
    /// Finds the tools; `None` with the reason when networked sandboxes cannot be made here.
    pub fn detect(resolver: Option<IpAddr>) -> Result<Self, String> {
        if !nix::unistd::Uid::effective().is_root() {
            return Err(
                "network namespaces for sandboxes need the Workload Manager to run as root".into(),
            );
        }
        Ok(Self {
            ip: system_tool("ip", "iproute2")?,
            nft: system_tool("nft", "nftables")?,
            nsenter: system_tool("nsenter", "util-linux")?,
            resolver: resolver.or_else(host_resolver),
            host_ready: Default::default(),
        })
    }

    /// The `nsenter` binary (the launcher enters the namespace with `nsenter --net=`).
    pub fn nsenter_binary(&self) -> &Path {
        &self.nsenter
    }

    /// Creates the sandbox's namespace, link, addresses, route, rules and `resolv.conf`. On
    /// failure everything made so far is removed again.
    pub async fn attach(
        &self,
        sandbox: &str,
        policy: &NetworkPolicySpec,
    ) -> Result<SandboxNet, BackendError> {
        self.host_ready
            .get_or_try_init(|| self.host_setup())
            .await?;
        let index = take_index(Path::new(INDEX_DIR), sandbox)?;
        let net = SandboxNet {
            netns: format!("{NETNS_PREFIX}{sandbox}"),
            index,
        };
        if let Err(e) = self.configure(&net, policy).await {
            self.detach(&net).await;
            return Err(e);
        }
        Ok(net)
    }

    async fn configure(
        &self,
        net: &SandboxNet,
        policy: &NetworkPolicySpec,
    ) -> Result<(), BackendError> {
        let (host, inside) = addresses(net.index);
        let (ns, hif) = (net.netns.as_str(), format!("{HOST_IF_PREFIX}{}", net.index));
        let host_cidr = format!("{host}/30");
        let inside_cidr = format!("{inside}/30");
        let host_ip = host.to_string();
        let steps: [Vec<&str>; 8] = [
            vec!["netns", "add", ns],
            vec![
                "link", "add", &hif, "type", "veth", "peer", "name", "eth0", "netns", ns,
            ],
            vec!["addr", "add", &host_cidr, "dev", &hif],
            vec!["link", "set", &hif, "up"],
            vec!["-n", ns, "link", "set", "lo", "up"],
            vec!["-n", ns, "addr", "add", &inside_cidr, "dev", "eth0"],
            vec!["-n", ns, "link", "set", "eth0", "up"],
            vec!["-n", ns, "route", "add", "default", "via", &host_ip],
        ];
        for args in steps {
            run(&self.ip, args, None).await?;
        }
        let rules = sandbox_ruleset(policy, self.resolver);
        let nft = self.nft.display().to_string();
        run(
            &self.ip,
            vec!["netns", "exec", ns, &nft, "-f", "-"],
            Some(rules),
        )
        .await?;
        // Bound over the sandbox's /etc/resolv.conf (the `ip netns` convention).
        let etc = Path::new("/etc/netns").join(ns);
        let resolv = match self.resolver {
            Some(r) => format!("nameserver {r}\n"),
            None => String::new(),
        };
        std::fs::create_dir_all(&etc)
            .and_then(|()| std::fs::write(etc.join("resolv.conf"), resolv))
            .map_err(|e| BackendError::Failed(format!("{}: {e}", etc.display())))?;
        Ok(())
    }

    /// Removes the namespace (its veth pair goes with it), `resolv.conf` and the index.
    pub async fn detach(&self, net: &SandboxNet) {
        if let Err(e) = run(&self.ip, vec!["netns", "del", &net.netns], None).await {
            tracing::debug!(netns = %net.netns, error = %e, "netns already gone");
        }
        let _ = std::fs::remove_dir_all(Path::new("/etc/netns").join(&net.netns));
        let _ = std::fs::remove_file(Path::new(INDEX_DIR).join(net.index.to_string()));
    }

    /// Forwarding on, and the host table (idempotent; replaced whole). A host that did not
    /// forward before ([`FORWARDING_MARK`]) forwards only sandboxes' traffic.
    async fn host_setup(&self) -> Result<(), BackendError> {
        let fail =
            |e: std::io::Error| BackendError::Failed(format!("cannot enable IPv4 forwarding: {e}"));
        let forwarding = Path::new("/proc/sys/net/ipv4/ip_forward");
        let mark = Path::new(INDEX_DIR).join(FORWARDING_MARK);
        if std::fs::read_to_string(forwarding).map_err(fail)?.trim() == "0" {
            std::fs::create_dir_all(INDEX_DIR)
                .and_then(|()| std::fs::write(&mark, b""))
                .map_err(fail)?;
            tracing::warn!(
                mark = %mark.display(),
                "IPv4 forwarding was off: turned on for sandboxes' traffic only (table inet \
                 agentcube drops all other forwarded traffic until reboot; a container runtime \
                 started later on this host needs the mark removed and the table deleted)"
            );
        }
        std::fs::write(forwarding, "1").map_err(fail)?;
        run(
            &self.nft,
            vec!["-f", "-"],
            Some(host_ruleset(mark.exists())),
        )
        .await
    }

    /// Namespaces a crashed Workload Manager left (its sandboxes died with it): those whose
    /// index file names a process that is gone, or no index file at all.
    pub fn remove_leftovers(&self) -> usize {
        let mut removed = 0;
        let Ok(dir) = std::fs::read_dir("/run/netns") else {
            return 0;
        };
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if let Some(sandbox) = name.strip_prefix(NETNS_PREFIX)
                && owner_gone(Path::new(INDEX_DIR), sandbox)
            {
                let _ = std::process::Command::new(&self.ip)
                    .args(["netns", "del", &name])
                    .stderr(std::process::Stdio::null())
                    .status();
                let _ = std::fs::remove_dir_all(Path::new("/etc/netns").join(&name));
                removed += 1;
            }
        }
        removed
    }
}

/// Written (under [`INDEX_DIR`], gone at reboot as the setting is) when IPv4 forwarding was off
/// until a Workload Manager turned it on for sandboxes: the host then forwards nothing else, as
/// before (forwarding is one switch for every interface; without this the host would route
/// between its other networks for anyone who made it their gateway).
pub const FORWARDING_MARK: &str = "forwarding-enabled";

/// [`HOST_RULESET`], plus, when forwarding is on only for sandboxes (`sandboxes_only`), a drop
/// of every forwarded packet that neither comes from nor goes to one.
pub fn host_ruleset(sandboxes_only: bool) -> String {
    if !sandboxes_only {
        return HOST_RULESET.to_string();
    }
    HOST_RULESET.replacen(
        "    type filter hook forward priority -10; policy accept;\n",
        "    type filter hook forward priority -10; policy accept;\n    iifname != \"acv*\" oifname != \"acv*\" counter drop\n",
        1,
    )
}

/// The host's table: sandboxes never reach the host itself, each other, nor a cloud's
/// instance-metadata endpoints — link-local `169.254.0.0/16` (AWS, GCP, Azure, Oracle,
/// OpenStack), Azure's WireServer `168.63.129.16`, Alibaba's `100.100.100.200`, AWS's IPv6
/// `fd00:ec2::254`, which hand the host's own cloud credentials to the host, which a sandbox's
/// masqueraded traffic is — whatever their policy says. DNS (port 53) to link-local addresses
/// and the WireServer stays open: AWS's resolver is `169.254.169.253`, Azure's the WireServer,
/// and the sandbox's own rules still allow DNS only to its configured resolver. Their traffic
/// out is masqueraded. Static, so every Workload Manager on the host writes the same table;
/// replaced whole each time (the `add`/`delete` pair makes it idempotent).
pub const HOST_RULESET: &str = r#"add table inet agentcube
delete table inet agentcube
table inet agentcube {
  chain input {
    type filter hook input priority -10; policy accept;
    iifname "acv*" ct state established,related accept
    iifname "acv*" counter reject with icmpx type admin-prohibited
  }
  chain forward {
    type filter hook forward priority -10; policy accept;
    iifname "acv*" oifname "acv*" counter reject with icmpx type admin-prohibited
    iifname "acv*" ip daddr { 169.254.0.0/16, 168.63.129.16 } meta l4proto { tcp, udp } th dport 53 accept
    iifname "acv*" ip daddr { 169.254.0.0/16, 168.63.129.16, 100.100.100.200 } counter reject with icmpx type admin-prohibited
    iifname "acv*" ip6 daddr fd00:ec2::254 counter reject with icmpx type admin-prohibited
  }
  chain postrouting {
    type nat hook postrouting priority 100; policy accept;
    ip saddr 10.213.0.0/16 oifname != "acv*" masquerade
  }
}
"#;

/// The rules inside one sandbox's namespace.
pub fn sandbox_ruleset(policy: &NetworkPolicySpec, resolver: Option<IpAddr>) -> String {
    let mut s = String::from(
        "table inet sandbox {\n  chain output {\n    type filter hook output priority 0; policy drop;\n    oifname \"lo\" accept\n    ct state established,related accept\n",
    );
    if let Some(r) = resolver {
        let fam = family(&r);
        for proto in ["udp", "tcp"] {
            let _ = writeln!(s, "    {fam} daddr {r} {proto} dport 53 accept");
        }
    }
    for rule in &policy.egress {
        for line in rule_lines(rule, "daddr") {
            let _ = writeln!(s, "    {line} accept");
        }
    }
    s.push_str("    meta l4proto tcp reject with tcp reset\n    reject with icmpx type admin-prohibited\n  }\n");
    s.push_str("  chain input {\n    type filter hook input priority 0; policy drop;\n    iifname \"lo\" accept\n    ct state established,related accept\n");
    for rule in &policy.ingress {
        for line in rule_lines(rule, "saddr") {
            let _ = writeln!(s, "    {line} accept");
        }
    }
    s.push_str("  }\n}\n");
    s
}

fn family(a: &IpAddr) -> &'static str {
    if a.is_ipv4() { "ip" } else { "ip6" }
}

/// The nft matches of one rule: each CIDR × each port (any, when a list is empty).
fn rule_lines(rule: &NetworkRule, dir: &str) -> Vec<String> {
    let addrs: Vec<Option<String>> = if rule.cidrs.is_empty() {
        vec![None]
    } else {
        rule.cidrs
            .iter()
            .filter_map(|c| agentcube_crds::network::parse_cidr(c).ok())
            .map(|(a, len)| Some(format!("{} {dir} {a}/{len}", family(&a))))
            .collect()
    };
    let ports: Vec<Option<String>> = if rule.ports.is_empty() {
        vec![None]
    } else {
        rule.ports
            .iter()
            .map(|p| {
                let proto = match p.protocol {
                    NetworkProtocol::TCP => "tcp",
                    NetworkProtocol::UDP => "udp",
                    NetworkProtocol::SCTP => "sctp",
                };
                Some(format!("{proto} dport {}", p.port))
            })
            .collect()
    };
    let mut out = Vec::new();
    for a in &addrs {
        for p in &ports {
            let parts: Vec<&str> = [a.as_deref(), p.as_deref()].into_iter().flatten().collect();
            out.push(if parts.is_empty() {
                "meta nfproto { ipv4, ipv6 }".to_string()
            } else {
                parts.join(" ")
            });
        }
    }
    out
}

/// Where the host's resolvers are listed: its `/etc/resolv.conf`, and, when that names only a
/// local stub (systemd-resolved's `127.0.0.53`, which a sandbox cannot reach), the servers the
/// stub itself asks (as Docker does).
const RESOLV_FILES: &[&str] = &["/etc/resolv.conf", "/run/systemd/resolve/resolv.conf"];

/// The first `nameserver` of the host's resolver files ([`RESOLV_FILES`]) that a sandbox can
/// reach: not a loopback address, nor one of this host's own (the host table closes the host to
/// sandboxes: a dnsmasq on the host's LAN address answers the host, not them).
fn host_resolver() -> Option<IpAddr> {
    RESOLV_FILES
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .find_map(|text| first_nameserver(&text, |a| is_this_host(*a)))
}

/// The first `nameserver` of a `resolv.conf` that is neither a loopback address nor `local`.
fn first_nameserver(text: &str, local: impl Fn(&IpAddr) -> bool) -> Option<IpAddr> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|a| a.trim().parse::<IpAddr>().ok())
        .find(|a| !a.is_loopback() && !local(a))
}

/// Whether `ip` is loopback or an address of one of this host's interfaces: what sandboxes can
/// never reach. (From the interfaces themselves, not a bind probe, which a host with
/// `ip_nonlocal_bind` would pass for every address.)
pub fn is_this_host(ip: IpAddr) -> bool {
    ip.is_loopback()
        || nix::ifaddrs::getifaddrs().is_ok_and(|mut addrs| {
            addrs.any(|a| {
                a.address.is_some_and(|sa| {
                    sa.as_sockaddr_in().map(|v4| IpAddr::V4(v4.ip())) == Some(ip)
                        || sa.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())) == Some(ip)
                })
            })
        })
}

/// `--sandbox-dns` checked: a server sandboxes can reach, else why not.
pub fn check_resolver(dns: IpAddr) -> Result<(), String> {
    if is_this_host(dns) {
        return Err(format!(
            "--sandbox-dns {dns} is an address of this host: sandboxes never reach the host's own \
             services (its network table refuses them), so their lookups would fail; name the \
             server that one forwards to, or leave the flag unset"
        ));
    }
    Ok(())
}

/// Takes the lowest free index: a lock file `<dir>/<index>` holding `<pid> <sandbox>`, created
/// exclusively; one whose process is gone is taken over.
fn take_index(dir: &Path, sandbox: &str) -> Result<u32, BackendError> {
    use std::io::Write;
    std::fs::create_dir_all(dir)
        .map_err(|e| BackendError::Failed(format!("{}: {e}", dir.display())))?;
    let me = format!("{} {sandbox}\n", std::process::id());
    for i in 0..MAX_INDEX {
        let path = dir.join(i.to_string());
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
        {
            Ok(mut f) => {
                f.write_all(me.as_bytes())
                    .map_err(|e| BackendError::Failed(format!("{}: {e}", path.display())))?;
                return Ok(i);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                if holder_gone(&path) && under_takeover_lock(dir, || remove_if_dead(&path)) {
                    // Retry this index on the next round of the loop is not possible; take it now.
                    if let Ok(mut f) = std::fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .open(&path)
                    {
                        let _ = f.write_all(me.as_bytes());
                        return Ok(i);
                    }
                }
            }
            Err(e) => return Err(BackendError::Failed(format!("{}: {e}", path.display()))),
        }
    }
    Err(BackendError::Exhausted(format!(
        "every sandbox network address of {SUBNET} is in use"
    )))
}

/// Lock file serialising the removal of dead holders' index files (a directory entry beside
/// them that names no index).
const TAKEOVER_LOCK: &str = ".takeover.lock";

/// Runs `f` holding the host-wide lock on [`TAKEOVER_LOCK`] (false when it cannot be had). Two
/// managers that both saw an index's holder dead both removed "its" file, the second one the
/// file the first had just made as the index's new holder, and both held the index. The lock is
/// root's only (0600), and is waited for a second at most (a holder is microseconds), so nothing
/// else on the host can stall a sandbox start with it.
fn under_takeover_lock(dir: &Path, f: impl FnOnce() -> bool) -> bool {
    let Ok(file) = super::layout::open_lock_file(&dir.join(TAKEOVER_LOCK)) else {
        return false;
    };
    for _ in 0..100 {
        match file.try_lock() {
            Ok(()) => return f(),
            Err(std::fs::TryLockError::WouldBlock) => {
                std::thread::sleep(std::time::Duration::from_millis(10))
            }
            Err(std::fs::TryLockError::Error(_)) => return false,
        }
    }
    false
}

/// Removes an index file whose holder is gone, judged again now (call it under the takeover
/// lock): true when it was removed.
fn remove_if_dead(path: &Path) -> bool {
    holder_gone(path) && std::fs::remove_file(path).is_ok()
}

/// Whether the process named in a lock file is gone.
fn holder_gone(path: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(path) else {
        return false;
    };
    let pid = text
        .split_whitespace()
        .next()
        .and_then(|p| p.parse::<i32>().ok());
    pid.is_some_and(|p| !Path::new(&format!("/proc/{p}")).exists())
}

/// Whether no live process holds an index for `sandbox` (its namespace is a leftover).
fn owner_gone(dir: &Path, sandbox: &str) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return true;
    };
    for e in entries.flatten() {
        let text = std::fs::read_to_string(e.path()).unwrap_or_default();
        if text.split_whitespace().nth(1) == Some(sandbox) {
            if holder_gone(&e.path()) {
                under_takeover_lock(dir, || remove_if_dead(&e.path()));
                return true;
            }
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_host_that_did_not_forward_forwards_only_sandboxes_traffic() {
        let only = host_ruleset(true);
        let drop = only
            .find("iifname != \"acv*\" oifname != \"acv*\" counter drop")
            .expect(&only);
        assert!(only.find("chain forward").unwrap() < drop);
        assert!(drop < only.find("chain postrouting").unwrap());
        assert_eq!(host_ruleset(false), HOST_RULESET);
        assert!(!HOST_RULESET.contains("counter drop"));
    }

    #[test]
    fn a_local_stub_resolver_is_skipped() {
        let none = |_: &IpAddr| false;
        assert_eq!(
            first_nameserver("nameserver 127.0.0.53\noptions edns0\n", none),
            None
        );
        assert_eq!(
            first_nameserver(
                "# x\nnameserver 127.0.0.1\nnameserver  10.0.0.2\nnameserver 10.0.0.3\n",
                none
            ),
            Some("10.0.0.2".parse().unwrap())
        );
        assert_eq!(
            first_nameserver("nameserver ::1\nnameserver fd00::53", none),
            Some("fd00::53".parse().unwrap())
        );
        // A resolver on one of the host's own addresses (a dnsmasq on its LAN address) is
        // skipped: sandboxes cannot reach the host.
        let host: IpAddr = "192.168.1.10".parse().unwrap();
        assert_eq!(
            first_nameserver("nameserver 192.168.1.10\nnameserver 192.168.1.1\n", |a| *a
                == host),
            Some("192.168.1.1".parse().unwrap())
        );
    }

    #[test]
    fn a_resolver_on_this_host_is_refused() {
        let err = check_resolver("127.0.0.1".parse().unwrap()).unwrap_err();
        assert!(err.contains("is an address of this host"), "{err}");
        // TEST-NET-1: no host has it.
        assert!(check_resolver("192.0.2.53".parse().unwrap()).is_ok());
        // The address this host sends from (a UDP connect sends nothing).
        let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        if s.connect("192.0.2.1:53").is_ok() {
            let own = s.local_addr().unwrap().ip();
            assert!(check_resolver(own).is_err(), "{own}");
        }
    }

    #[test]
    fn addresses_are_disjoint_slash_30s() {
        assert_eq!(
            addresses(0),
            (Ipv4Addr::new(10, 213, 0, 1), Ipv4Addr::new(10, 213, 0, 2))
        );
        assert_eq!(
            addresses(64),
            (Ipv4Addr::new(10, 213, 1, 1), Ipv4Addr::new(10, 213, 1, 2))
        );
        assert_eq!(addresses(MAX_INDEX - 1).1, Ipv4Addr::new(10, 213, 255, 254));
    }

    #[test]
    fn the_host_table_lets_only_dns_through_to_metadata_endpoints() {
        let at = |line: &str| {
            HOST_RULESET
                .find(line)
                .unwrap_or_else(|| panic!("{line}\n{HOST_RULESET}"))
        };
        let dns = at(
            "ip daddr { 169.254.0.0/16, 168.63.129.16 } meta l4proto { tcp, udp } th dport 53 accept",
        );
        assert!(at("chain forward") < dns);
        assert!(
            dns < at("ip daddr { 169.254.0.0/16, 168.63.129.16, 100.100.100.200 } counter reject")
        );
        assert!(at("ip6 daddr fd00:ec2::254 counter reject") < at("chain postrouting"));
    }

    #[test]
    fn rules_allow_loopback_dns_and_the_policy_only() {
        let policy: NetworkPolicySpec = serde_json::from_value(json!({
            "egress": [{"cidrs": ["192.0.2.7/32", "2001:db8::/32"], "ports": [{"port": 443}, {"protocol": "UDP", "port": 123}]},
                       {"cidrs": ["198.51.100.0/24"]}],
            "ingress": [{"ports": [{"port": 9000}]}]
        }))
        .unwrap();
        let r = sandbox_ruleset(&policy, Some("192.0.2.53".parse().unwrap()));
        for line in [
            "policy drop;",
            "oifname \"lo\" accept",
            "ip daddr 192.0.2.53 udp dport 53 accept",
            "ip daddr 192.0.2.53 tcp dport 53 accept",
            "ip daddr 192.0.2.7/32 tcp dport 443 accept",
            "ip daddr 192.0.2.7/32 udp dport 123 accept",
            "ip6 daddr 2001:db8::/32 tcp dport 443 accept",
            "ip daddr 198.51.100.0/24 accept",
            "tcp dport 9000 accept",
            "meta l4proto tcp reject with tcp reset",
        ] {
            assert!(r.contains(line), "{line}\n{r}");
        }
        let open = sandbox_ruleset(
            &serde_json::from_value(json!({"egress": [{}]})).unwrap(),
            None,
        );
        assert!(
            open.contains("meta nfproto { ipv4, ipv6 } accept"),
            "{open}"
        );
        assert!(!open.contains("dport 53"), "no resolver, no DNS rule");
    }

    #[test]
    fn indexes_are_taken_once_and_reclaimed_from_dead_holders() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(take_index(dir.path(), "a").unwrap(), 0);
        assert_eq!(take_index(dir.path(), "b").unwrap(), 1);
        std::fs::write(dir.path().join("0"), "999999999 a\n").unwrap();
        assert_eq!(
            take_index(dir.path(), "c").unwrap(),
            0,
            "a dead holder's index"
        );
        assert!(!owner_gone(dir.path(), "b"), "b is ours");
        assert!(owner_gone(dir.path(), "nobody"));
    }

    /// An index directory whose index 0 a dead process held, and the takeover lock, taken.
    fn dead_holder_and_the_lock_held() -> (tempfile::TempDir, std::fs::File) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("0"), "999999999 gone\n").unwrap();
        let lock = std::fs::File::create(dir.path().join(TAKEOVER_LOCK)).unwrap();
        lock.lock().unwrap();
        (dir, lock)
    }

    /// A manager taking a dead holder's index over while another is mid-way through the same:
    /// it waits for the other's takeover and then sees the index taken. Before, both removed
    /// the file and made their own, and both held the index.
    #[test]
    fn a_dead_holders_index_goes_to_one_manager() {
        // The other manager, mid-takeover of index 0.
        let (dir, other) = dead_holder_and_the_lock_held();
        let path = dir.path().to_path_buf();
        let taker = std::thread::spawn(move || take_index(&path, "late").unwrap());
        std::thread::sleep(std::time::Duration::from_millis(200));
        std::fs::remove_file(dir.path().join("0")).unwrap();
        let holder = format!("{} first\n", std::process::id());
        std::fs::write(dir.path().join("0"), &holder).unwrap();
        drop(other);
        assert_eq!(
            taker.join().unwrap(),
            1,
            "index 0 went to the other manager"
        );
        assert_eq!(
            std::fs::read_to_string(dir.path().join("0")).unwrap(),
            holder
        );
    }

    /// Whoever holds the takeover lock for good (it is root's, but say it were had) costs a start
    /// a second, not the start: the dead holder's index is passed over.
    #[test]
    fn a_takeover_lock_held_for_good_is_waited_for_a_second_only() {
        let (dir, _held) = dead_holder_and_the_lock_held();
        let (tx, rx) = std::sync::mpsc::channel();
        let path = dir.path().to_path_buf();
        std::thread::spawn(move || tx.send(take_index(&path, "next").unwrap()));
        let taken = rx.recv_timeout(std::time::Duration::from_secs(5));
        assert_eq!(taken, Ok(1), "a start waits for the lock's holder");
    }
}
