//! The command line that starts one local sandbox: a tiny shell that joins the sandbox's cgroups,
//! then (as root) drops to an unprivileged uid with `setpriv`, then execs bubblewrap running PicoD.
//! Pure functions, so the isolation flags are unit-tested.

use std::path::{Path, PathBuf};

/// Where things are inside the sandbox.
pub const SANDBOX_WORKSPACE: &str = "/root";
pub const SANDBOX_RUN_DIR: &str = "/run/agentcube";
pub const SANDBOX_PICOD: &str = "/opt/agentcube/picod";
/// PicoD's socket name in the run directory.
pub const PICOD_SOCKET: &str = "picod.sock";

/// Host files under `/etc` a sandbox may read (never shadow, ssh keys or other secrets).
const ETC_ALLOWLIST: &[&str] = &[
    "passwd",
    "group",
    "hosts",
    "nsswitch.conf",
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "localtime",
    "ssl",
    "ca-certificates",
    "alternatives",
    "mime.types",
    "os-release",
    "debian_version",
    "python3",
    "python3.11",
    "bash.bashrc",
    "profile",
];

/// Everything that varies per sandbox.
#[derive(Debug, Clone)]
pub struct LaunchSpec {
    /// Host directory bound read-write at [`SANDBOX_WORKSPACE`].
    pub workspace: PathBuf,
    /// Host directory bound read-write at [`SANDBOX_RUN_DIR`] (PicoD's and forwarded sockets).
    pub run_dir: PathBuf,
    /// Host PicoD binary, bound read-only at [`SANDBOX_PICOD`].
    pub picod: PathBuf,
    /// `PICOD_AUTH_PUBLIC_KEY`; `None` runs PicoD with `--insecure-no-auth`.
    pub public_key: Option<String>,
    /// Environment from the definition.
    pub env: Vec<(String, String)>,
    /// Ports forwarded from `<run_dir>/port-<N>.sock` to `127.0.0.1:N` inside.
    pub forward_ports: Vec<u16>,
    /// Agent program PicoD starts (AgentRuntime), empty for a CodeInterpreter.
    pub agent: Vec<String>,
    /// Drop to this uid/gid before starting bubblewrap (when running as root).
    pub drop_to: Option<u32>,
    /// `cgroup.procs` files to join first.
    pub cgroup_procs: Vec<PathBuf>,
}

/// Socket of a forwarded port, relative to the run directory.
pub fn port_socket(port: u16) -> String {
    format!("port-{port}.sock")
}

/// The bubblewrap argv (without the `bwrap` program name).
pub fn bwrap_args(spec: &LaunchSpec) -> Vec<String> {
    let mut a: Vec<String> = [
        "--unshare-all",
        "--die-with-parent",
        "--new-session",
        "--hostname",
        "sandbox",
        "--cap-drop",
        "ALL",
        "--ro-bind",
        "/usr",
        "/usr",
        "--symlink",
        "usr/bin",
        "/bin",
        "--symlink",
        "usr/sbin",
        "/sbin",
        "--symlink",
        "usr/lib",
        "/lib",
    ]
    .iter()
    .map(ToString::to_string)
    .collect();
    let mut push = |v: &[&str]| a.extend(v.iter().map(ToString::to_string));
    if Path::new("/usr/lib64").exists() {
        push(&["--symlink", "usr/lib64", "/lib64"]);
    }
    for entry in ETC_ALLOWLIST {
        let p = format!("/etc/{entry}");
        push(&["--ro-bind-try", &p, &p]);
    }
    push(&[
        "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "--tmpfs", "/run",
    ]);
    let ws = spec.workspace.display().to_string();
    let run = spec.run_dir.display().to_string();
    let picod = spec.picod.display().to_string();
    push(&[
        "--bind",
        &ws,
        SANDBOX_WORKSPACE,
        "--bind",
        &run,
        SANDBOX_RUN_DIR,
    ]);
    push(&["--ro-bind", &picod, SANDBOX_PICOD]);
    push(&[
        "--clearenv",
        "--setenv",
        "PATH",
        "/usr/local/bin:/usr/bin:/bin",
    ]);
    push(&[
        "--setenv",
        "HOME",
        SANDBOX_WORKSPACE,
        "--setenv",
        "LANG",
        "C.UTF-8",
    ]);
    push(&["--setenv", "RUST_LOG", "warn"]);
    for (k, v) in &spec.env {
        push(&["--setenv", k, v]);
    }
    if let Some(key) = &spec.public_key {
        push(&["--setenv", "PICOD_AUTH_PUBLIC_KEY", key]);
    }
    push(&["--chdir", SANDBOX_WORKSPACE, SANDBOX_PICOD]);
    push(&["--workspace", SANDBOX_WORKSPACE]);
    let listen = format!("unix:{SANDBOX_RUN_DIR}/{PICOD_SOCKET}");
    push(&["--listen", &listen]);
    if spec.public_key.is_none() {
        push(&["--insecure-no-auth"]);
    }
    for port in &spec.forward_ports {
        let fwd = format!("{port}=unix:{SANDBOX_RUN_DIR}/{}", port_socket(*port));
        push(&["--forward", &fwd]);
    }
    if !spec.agent.is_empty() {
        push(&["--"]);
        a.extend(spec.agent.iter().cloned());
    }
    a
}

/// Shell prologue of every launcher: join the sandbox's cgroups (`$AGENTCUBE_CGROUP_PROCS`), then
/// exec the rest of the argv, so nothing of the sandbox ever runs outside its limits.
const JOIN_CGROUPS: &str =
    r#"for f in $AGENTCUBE_CGROUP_PROCS; do echo $$ > "$f" || exit 97; done; exec "$@""#;

/// The full launcher argv: `sh -c <join cgroups; exec "$@"> sh [setpriv …] bwrap …`.
pub fn launcher_argv(spec: &LaunchSpec, bwrap: &Path) -> Vec<String> {
    let mut argv = vec![
        "/bin/sh".to_string(),
        "-c".into(),
        JOIN_CGROUPS.into(),
        "sh".into(),
    ];
    if let Some(uid) = spec.drop_to {
        argv.extend([
            "setpriv".to_string(),
            format!("--reuid={uid}"),
            format!("--regid={uid}"),
            "--clear-groups".into(),
            "--".into(),
        ]);
    }
    argv.push(bwrap.display().to_string());
    argv.extend(bwrap_args(spec));
    argv
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> LaunchSpec {
        LaunchSpec {
            workspace: "/state/s1/ws".into(),
            run_dir: "/state/s1/run".into(),
            picod: "/bin/picod".into(),
            public_key: Some("PEM".into()),
            env: vec![("A".into(), "b".into())],
            forward_ports: vec![],
            agent: vec![],
            drop_to: Some(65534),
            cgroup_procs: vec![],
        }
    }

    fn has(a: &[String], seq: &[&str]) -> bool {
        a.windows(seq.len())
            .any(|w| w.iter().zip(seq).all(|(x, y)| x == y))
    }

    #[test]
    fn isolation_flags_are_all_there() {
        let a = bwrap_args(&spec());
        for seq in [
            &["--unshare-all"][..],
            &["--die-with-parent"],
            &["--new-session"],
            &["--cap-drop", "ALL"],
            &["--ro-bind", "/usr", "/usr"],
            &["--bind", "/state/s1/ws", "/root"],
            &["--clearenv"],
            &["--setenv", "PICOD_AUTH_PUBLIC_KEY", "PEM"],
            &["--listen", "unix:/run/agentcube/picod.sock"],
        ] {
            assert!(has(&a, seq), "missing {seq:?} in {a:?}");
        }
        assert!(!a.iter().any(|x| x == "/etc/shadow"));
        assert!(!a.iter().any(|x| x == "--insecure-no-auth"));
        assert!(!has(&a, &["--bind", "/", "/"]) && !has(&a, &["--ro-bind", "/", "/"]));
    }

    #[test]
    fn agent_runtime_forwards_ports_and_runs_the_agent() {
        let mut s = spec();
        s.public_key = None;
        s.forward_ports = vec![8080];
        s.agent = vec!["python3".into(), "-m".into(), "http.server".into()];
        let a = bwrap_args(&s);
        assert!(has(
            &a,
            &["--forward", "8080=unix:/run/agentcube/port-8080.sock"]
        ));
        assert!(has(&a, &["--insecure-no-auth"]));
        assert!(a.ends_with(&[
            "--".into(),
            "python3".into(),
            "-m".into(),
            "http.server".into()
        ]));
        let l = launcher_argv(&s, Path::new("/usr/bin/bwrap"));
        assert!(has(
            &l,
            &[
                "setpriv",
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "--",
                "/usr/bin/bwrap"
            ]
        ));
    }
}

/// Directories that must exist in a gVisor bundle's read-only root for the mounts and symlinks.
pub const OCI_ROOT_DIRS: &[&str] = &[
    "usr",
    "root",
    "run/agentcube",
    "opt/agentcube",
    "etc",
    "proc",
    "dev",
    "tmp",
];

/// The OCI runtime spec (`config.json`) for running the same sandbox under gVisor `runsc`: the
/// same mounts, environment and PicoD command line as the bubblewrap sandbox; no network
/// (`--network=none` on the runsc command line), no capabilities, an unprivileged user.
pub fn oci_spec(spec: &LaunchSpec) -> serde_json::Value {
    use serde_json::json;
    let bind = |src: &str, dst: &str, ro: bool| {
        json!({"destination": dst, "type": "bind", "source": src,
               "options": ["rbind", if ro { "ro" } else { "rw" }]})
    };
    let mut mounts = vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc"}),
        json!({"destination": "/tmp", "type": "tmpfs", "source": "tmpfs"}),
        bind("/usr", "/usr", true),
        bind(
            &spec.workspace.display().to_string(),
            SANDBOX_WORKSPACE,
            false,
        ),
        bind(&spec.run_dir.display().to_string(), SANDBOX_RUN_DIR, false),
        bind(&spec.picod.display().to_string(), SANDBOX_PICOD, true),
    ];
    for entry in ETC_ALLOWLIST {
        let p = format!("/etc/{entry}");
        if Path::new(&p).exists() {
            mounts.push(bind(&p, &p, true));
        }
    }
    // PicoD's argv is the tail of the bubblewrap argv after the program name.
    let b = bwrap_args(spec);
    let start = b.iter().rposition(|a| a == SANDBOX_PICOD).unwrap_or(0);
    let mut env = vec![
        "PATH=/usr/local/bin:/usr/bin:/bin".to_string(),
        format!("HOME={SANDBOX_WORKSPACE}"),
        "LANG=C.UTF-8".into(),
        "RUST_LOG=warn".into(),
    ];
    env.extend(spec.env.iter().map(|(k, v)| format!("{k}={v}")));
    if let Some(key) = &spec.public_key {
        env.push(format!("PICOD_AUTH_PUBLIC_KEY={key}"));
    }
    let uid = spec.drop_to.unwrap_or(65534);
    json!({
        "ociVersion": "1.0.0",
        "process": {
            "user": {"uid": uid, "gid": uid},
            "args": b[start..],
            "env": env,
            "cwd": SANDBOX_WORKSPACE,
            "noNewPrivileges": true,
            "capabilities": {"bounding": [], "effective": [], "inheritable": [], "permitted": [], "ambient": []},
        },
        "root": {"path": "rootfs", "readonly": true},
        "hostname": "sandbox",
        "mounts": mounts,
        "linux": {"namespaces": [{"type": "pid"}, {"type": "network"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}]},
    })
}

/// Writes a gVisor bundle (skeleton root + `config.json`) into `bundle`.
pub fn write_oci_bundle(bundle: &Path, spec: &LaunchSpec) -> std::io::Result<()> {
    let root = bundle.join("rootfs");
    for d in OCI_ROOT_DIRS {
        std::fs::create_dir_all(root.join(d))?;
    }
    for (link, target) in [
        ("bin", "usr/bin"),
        ("sbin", "usr/sbin"),
        ("lib", "usr/lib"),
        ("lib64", "usr/lib64"),
    ] {
        let _ = std::os::unix::fs::symlink(target, root.join(link));
    }
    std::fs::write(root.join("opt/agentcube/picod"), b"")?;
    for entry in ETC_ALLOWLIST {
        let host = Path::new("/etc").join(entry);
        let inside = root.join("etc").join(entry);
        if host.is_dir() {
            std::fs::create_dir_all(&inside)?;
        } else if host.exists() {
            std::fs::write(&inside, b"")?;
        }
    }
    let config = serde_json::to_vec_pretty(&oci_spec(spec)).map_err(std::io::Error::other)?;
    std::fs::write(bundle.join("config.json"), config)
}

/// The launcher argv for gVisor: join cgroups, then `runsc … run --bundle B ID` (runsc needs root
/// on the host; the sandboxed process itself runs as the unprivileged uid).
pub fn runsc_argv(runsc: &Path, state: &Path, bundle: &Path, id: &str) -> Vec<String> {
    vec![
        "/bin/sh".into(),
        "-c".into(),
        JOIN_CGROUPS.into(),
        "sh".into(),
        runsc.display().to_string(),
        format!("--root={}", state.display()),
        "--network=none".into(),
        "--host-uds=all".into(),
        "--ignore-cgroups".into(),
        "run".into(),
        format!("--bundle={}", bundle.display()),
        id.into(),
    ]
}

#[cfg(test)]
mod oci_tests {
    use super::*;

    #[test]
    fn oci_spec_mirrors_the_bubblewrap_sandbox() {
        let spec = LaunchSpec {
            workspace: "/s/ws".into(),
            run_dir: "/s/run".into(),
            picod: "/bin/picod".into(),
            public_key: Some("PEM".into()),
            env: vec![("A".into(), "b".into())],
            forward_ports: vec![],
            agent: vec![],
            drop_to: Some(65534),
            cgroup_procs: vec![],
        };
        let v = oci_spec(&spec);
        assert_eq!(v["process"]["args"][0], SANDBOX_PICOD);
        assert_eq!(
            v["process"]["args"][1], "--workspace",
            "PicoD's own argv, not the mount list"
        );
        assert!(
            v["process"]["args"]
                .as_array()
                .unwrap()
                .iter()
                .any(|a| a == "unix:/run/agentcube/picod.sock")
        );
        assert_eq!(v["process"]["user"]["uid"], 65534);
        assert_eq!(v["root"]["readonly"], true);
        assert!(
            v["process"]["env"]
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e == "PICOD_AUTH_PUBLIC_KEY=PEM")
        );
        assert!(
            v["process"]["capabilities"]["effective"]
                .as_array()
                .unwrap()
                .is_empty()
        );
        let mounts = v["mounts"].as_array().unwrap();
        assert!(
            mounts
                .iter()
                .any(|m| m["destination"] == "/usr" && m["options"][1] == "ro")
        );
        assert!(!mounts.iter().any(|m| m["source"] == "/etc/shadow"));
        let ns: Vec<_> = v["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["type"].as_str().unwrap())
            .collect();
        assert!(ns.contains(&"network") && ns.contains(&"pid"));
    }
}
