use super::*;

fn spec() -> LaunchSpec {
    LaunchSpec {
        paths: SandboxPaths::new(Path::new("/state"), "s1"),
        picod: "/bin/picod".into(),
        public_key: Some("PEM".into()),
        sandbox_name: "s1".into(),
        env: vec![("A".into(), "b".into())],
        forward_ports: vec![],
        agent: vec![],
        uid: Some(2_000_000_007),
        cgroup_procs: vec!["/cg/memory/s1/cgroup.procs".into()],
        seccomp: vec!["/state/seccomp/0.bpf".into(), "/state/seccomp/1.bpf".into()],
        netns: None,
        memory: None,
        image: None,
        agent_dir: None,
        workspace_limit: None,
        workspace_fs: None,
        tmpfs: TmpfsSizes::for_limit(Some(64 << 20)),
    }
}

fn image_spec() -> LaunchSpec {
    LaunchSpec {
        image: Some(ImageRoot {
            rootfs: "/state/images/rootfs/abc".into(),
            libs: vec![
                "/lib/x86_64-linux-gnu/libc.so.6".into(),
                "/lib64/ld-linux-x86-64.so.2".into(),
            ],
        }),
        env: vec![
            ("PATH".into(), "/image/bin".into()),
            ("A".into(), "image".into()),
            ("A".into(), "definition".into()),
        ],
        agent: vec!["python3".into(), "app.py".into()],
        agent_dir: Some("/app".into()),
        ..spec()
    }
}

/// The gVisor launcher argv of `spec` for sandbox `s1`, with the tools at their usual paths.
fn gvisor_argv(spec: &LaunchSpec) -> Vec<String> {
    runsc_argv(
        Path::new("/usr/bin/runsc"),
        Path::new("/usr/bin/setpriv"),
        Path::new("/st"),
        Path::new("/b"),
        "s1",
        spec,
    )
}

#[test]
fn a_workspace_filesystem_is_mounted_in_the_launchers_own_mount_namespace() {
    let with_fs = LaunchSpec {
        workspace_fs: Some(WorkspaceFs {
            image: "/state/private/s1/workspace.ext4".into(),
            unshare: "/usr/bin/unshare".into(),
            mount: "/usr/bin/mount".into(),
        }),
        ..spec()
    };
    let argv = launcher_argv(
        &with_fs,
        Path::new("/usr/bin/bwrap"),
        Path::new("/usr/bin/setpriv"),
    );
    assert_eq!(
        &argv[..5],
        [
            "/usr/bin/unshare",
            "--mount",
            "--propagation",
            "private",
            "--"
        ]
    );
    assert!(has(
        &argv,
        &[
            "sh",
            "--mount",
            "/usr/bin/mount",
            "/state/private/s1/workspace.ext4",
            "/state/sandboxes/s1/ws"
        ]
    ));
    let r = gvisor_argv(&with_fs);
    assert_eq!(r[0], "/usr/bin/unshare");
    // Without one, nothing of it.
    let plain = launcher_argv(
        &spec(),
        Path::new("/usr/bin/bwrap"),
        Path::new("/usr/bin/setpriv"),
    );
    assert_eq!(plain[0], "/bin/sh");
    assert!(!plain.iter().any(|a| a == "--mount"));
}

#[test]
fn an_image_sandbox_runs_on_the_read_only_image_root_with_picod_injected() {
    let spec = image_spec();
    let a = bwrap_args(&spec);
    assert!(has(&a, &["--ro-bind", "/state/images/rootfs/abc", "/"]));
    assert!(!has(&a, &["--ro-bind", "/usr", "/usr"]), "no host /usr");
    assert!(!a.iter().any(|x| x == "/etc/passwd"), "no host /etc files");
    assert!(has(
        &a,
        &[
            "--tmpfs",
            "/opt/agentcube",
            "--ro-bind",
            "/bin/picod",
            "/opt/agentcube/picod"
        ]
    ));
    assert!(has(
        &a,
        &[
            "--ro-bind",
            "/lib64/ld-linux-x86-64.so.2",
            "/opt/agentcube/lib/ld-linux-x86-64.so.2"
        ]
    ));
    assert!(has(&a, &["--remount-ro", "/opt/agentcube"]));
    // The root bind comes before every mount on top of it.
    let root = a
        .iter()
        .position(|x| x == "/state/images/rootfs/abc")
        .unwrap();
    let proc_ = a.iter().position(|x| x == "--proc").unwrap();
    assert!(root < proc_);
    // The image's PATH replaces the default; the definition's value wins; each name once.
    assert!(has(&a, &["--setenv", "PATH", "/image/bin"]));
    assert!(has(&a, &["--setenv", "A", "definition"]));
    assert_eq!(a.iter().filter(|x| *x == "PATH").count(), 1);
    assert_eq!(a.iter().filter(|x| *x == "A").count(), 1);
    // PicoD through the host's loader, the agent in its directory.
    let argv = picod_argv(&spec);
    assert_eq!(
        &argv[..4],
        [
            "/opt/agentcube/lib/ld-linux-x86-64.so.2",
            "--library-path",
            "/opt/agentcube/lib",
            "/opt/agentcube/picod"
        ]
    );
    assert!(has(
        &argv,
        &["--agent-dir", "/app", "--", "python3", "app.py"]
    ));
    // gVisor: the image's rootfs is the bundle's root.
    let oci = oci_spec(&spec);
    assert_eq!(oci["root"]["path"], "/state/images/rootfs/abc");
    let dests: Vec<&str> = oci["mounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["destination"].as_str().unwrap())
        .collect();
    assert!(!dests.contains(&"/usr"), "{dests:?}");
    assert!(dests.contains(&"/opt/agentcube/lib/libc.so.6"), "{dests:?}");
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
        &["--unshare-user"],
        &["--disable-userns"],
        &["--die-with-parent"],
        &["--new-session"],
        &["--cap-drop", "ALL"],
        &["--add-seccomp-fd", "4", "--add-seccomp-fd", "5"],
        &["--uid", "65534", "--gid", "65534"],
        &["--ro-bind", "/usr", "/usr"],
        &["--bind", "/state/sandboxes/s1/ws", "/root"],
        &["--bind", "/state/sandboxes/s1/run", "/run/agentcube"],
        &["--clearenv"],
        &["--setenv", "PICOD_AUTH_PUBLIC_KEY", "PEM"],
        &["--setenv", "PICOD_SANDBOX_NAME", "s1"],
        &["--setenv", "A", "b"],
    ] {
        assert!(has(&a, seq), "missing {seq:?} in {a:?}");
    }
    assert!(!a.iter().any(|x| x == "/etc/shadow"));
    assert!(!a.iter().any(|x| x == "--insecure-no-auth"));
    assert!(!has(&a, &["--bind", "/", "/"]) && !has(&a, &["--ro-bind", "/", "/"]));
    assert!(
        !a.iter().any(|x| x.contains("/state/private")),
        "the private directory is never mounted: {a:?}"
    );
    let content = args_file_content(&spec()).unwrap();
    assert_eq!(content.iter().filter(|b| **b == 0).count(), a.len());
    // A NUL inside an argument would end it early, the rest read as options of bubblewrap's own.
    let mut smuggler = spec();
    smuggler.env = vec![("X".into(), "a\0--share-net".into())];
    assert!(args_file_content(&smuggler).is_err());
}

#[test]
fn the_launcher_hides_everything_behind_fds() {
    let l = launcher_argv(
        &spec(),
        Path::new("/usr/bin/bwrap"),
        Path::new("/usr/bin/setpriv"),
    );
    let bwrap = l.iter().position(|a| a == "/usr/bin/bwrap").unwrap();
    assert_eq!(
        &l[bwrap - 5..bwrap + 4],
        &[
            "/usr/bin/setpriv",
            "--reuid=2000000007",
            "--regid=2000000007",
            "--clear-groups",
            "--",
            "/usr/bin/bwrap",
            "--args",
            "3",
            "--"
        ]
    );
    assert!(has(&l, &["--listen", "unix:/run/agentcube/picod.sock"]));
    assert!(has(
        &l,
        &[
            "/state/private/s1/bwrap.args",
            "/state/seccomp/0.bpf",
            "/state/seccomp/1.bpf",
            "--fds-end",
            "/cg/memory/s1/cgroup.procs",
            "--"
        ]
    ));
    // What stays visible once the shell has exec'd: no host path, no key, no environment.
    assert!(
        !l[bwrap + 1..]
            .iter()
            .any(|x| x.contains("PEM") || x.contains("/state") || x.contains("/cg/")),
        "no host path or key on the sandbox's command line: {l:?}"
    );
}

/// The prologue really opens the files as fds 3.. and joins the "cgroups" before exec.
#[test]
fn the_prologue_opens_fds_and_joins_cgroups() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    std::fs::write(&a, "first").unwrap();
    std::fs::write(&b, "second").unwrap();
    let procs = dir.path().join("cgroup.procs");
    std::fs::write(&procs, "").unwrap();
    let mut argv = prologue(&[&a, &b], std::slice::from_ref(&procs), None);
    argv.extend([
        "/bin/sh".into(),
        "-c".into(),
        "cat <&3; cat <&4; echo $$".into(),
    ]);
    let out = std::process::Command::new(&argv[0])
        .args(&argv[1..])
        .env_clear()
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    let joined = std::fs::read_to_string(&procs).unwrap();
    assert!(text.starts_with("firstsecond"), "{text}");
    assert_eq!(
        text["firstsecond".len()..].trim(),
        joined.trim(),
        "same pid: exec, not a child"
    );
}

/// Runs the prologue with a workspace "mount" tool of `script` (given `-t ext4 -o OPTS IMAGE
/// DIR`; without `unshare`, which needs root), `input` on its standard input (what the manager
/// writes once the image is formatted), then `command`; returns the status, the command's output
/// and what was written to the "cgroup".
fn prologue_mounting(
    script: &str,
    input: &str,
    command: &str,
) -> (std::process::ExitStatus, String, String) {
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let tool = dir.path().join("mount");
    std::fs::write(&tool, format!("#!/bin/sh\n{script}\n")).unwrap();
    std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).unwrap();
    let ws = dir.path().join("ws");
    std::fs::create_dir(&ws).unwrap();
    let procs = dir.path().join("cgroup.procs");
    std::fs::write(&procs, "").unwrap();
    let fs = WorkspaceFs {
        image: dir.path().join("workspace.ext4"),
        unshare: "/usr/bin/unshare".into(),
        mount: tool,
    };
    let mut argv = prologue(&[], std::slice::from_ref(&procs), Some((&fs, &ws)));
    let sh = argv.iter().position(|a| a == "/bin/sh").unwrap();
    argv.drain(..sh);
    argv.extend(["/bin/sh".into(), "-c".into(), command.into(), "cmd".into()]);
    argv.push(ws.display().to_string());
    let mut child = std::process::Command::new(&argv[0])
        .args(&argv[1..])
        .env_clear()
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Written after the launcher is well on its way, as the manager does after formatting.
    std::thread::sleep(std::time::Duration::from_millis(200));
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(input.as_bytes()).unwrap();
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    let joined = std::fs::read_to_string(&procs).unwrap();
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into(),
        joined,
    )
}

/// The workspace is mounted beside the cgroup join once the manager says `go`, and the command
/// starts only once it is in place: emptied of `lost+found`, private. (A mount slower than the
/// join is waited for.)
#[test]
fn the_command_starts_on_the_mounted_workspace_only() {
    let (status, out, joined) = prologue_mounting(
        r#"sleep 0.3; mkdir "$6/lost+found"; echo mounted > "$6/marker"; echo "$$" > "$6/tool-pid""#,
        "go\n",
        r#"cat "$1/marker"; stat -c %a "$1"; ls "$1"; echo "pid $$"; cat "$1/tool-pid""#,
    );
    assert!(status.success(), "{status:?} {out}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[..2], ["mounted", "700"], "{out}");
    assert!(!out.contains("lost+found"), "{out}");
    let pid = lines.iter().find_map(|l| l.strip_prefix("pid ")).unwrap();
    assert_eq!(
        joined.trim(),
        pid,
        "the command's process joined the cgroup"
    );
    assert_ne!(
        lines.last().unwrap().trim(),
        pid,
        "the mount ran in a child of its own"
    );
}

/// Until the manager says `go` (its image formatted) nothing is mounted; without it (formatting
/// failed), or when the mount fails, the launcher stops (status 95) before the command runs.
#[test]
fn a_workspace_not_formatted_or_not_mounted_runs_nothing() {
    // A tool that would mount: only `go` keeps it from running.
    let mounts = r#"mkdir "$6/lost+found""#;
    for (script, input) in [
        (mounts, ""),
        (mounts, "no\n"),
        ("sleep 0.1; exit 32", "go\n"),
    ] {
        let (status, out, _) = prologue_mounting(script, input, "echo ran");
        assert_eq!(status.code(), Some(95), "{input:?}: {out}");
        assert!(!out.contains("ran"), "{input:?}: {out}");
    }
}

#[test]
fn agent_runtime_forwards_ports_and_runs_the_agent() {
    let mut s = spec();
    s.public_key = None;
    s.forward_ports = vec![8080];
    s.agent = vec!["python3".into(), "-m".into(), "http.server".into()];
    let a = picod_argv(&s);
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
}

#[test]
fn oci_spec_mirrors_the_bubblewrap_sandbox() {
    let v = oci_spec(&spec());
    assert_eq!(v["process"]["args"][0], SANDBOX_PICOD);
    assert_eq!(v["process"]["args"][1], "--workspace");
    assert!(
        v["process"]["args"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a == "unix:/run/agentcube/picod.sock")
    );
    assert_eq!(v["process"]["user"]["uid"], 2_000_000_007u32);
    assert_eq!(v["root"]["readonly"], true);
    let env = v["process"]["env"].as_array().unwrap();
    assert!(env.iter().any(|e| e == "PICOD_AUTH_PUBLIC_KEY=PEM"));
    assert!(env.iter().any(|e| e == "PICOD_SANDBOX_NAME=s1"));
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
    assert!(
        !mounts
            .iter()
            .any(|m| m["source"].as_str().unwrap_or_default().contains("private"))
    );
    let ns: Vec<_> = v["linux"]["namespaces"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["type"].as_str().unwrap())
        .collect();
    assert!(ns.contains(&"network") && ns.contains(&"pid"));
    assert_eq!(v["linux"]["seccomp"]["defaultAction"], "SCMP_ACT_ALLOW");
    let r = gvisor_argv(&LaunchSpec {
        cgroup_procs: vec![],
        ..spec()
    });
    assert!(has(&r, &["--host-uds=create", "--oci-seccomp"]));
    // runsc dies with the manager (bubblewrap's --die-with-parent has no runsc flag).
    assert!(has(
        &r,
        &[
            "/usr/bin/setpriv",
            "--pdeathsig",
            "KILL",
            "--",
            "/usr/bin/runsc"
        ]
    ));
}

#[test]
fn a_networked_gvisor_sandbox_runs_runsc_in_its_namespace_with_host_networking() {
    let networked = LaunchSpec {
        cgroup_procs: vec![],
        netns: Some((PathBuf::from("/usr/bin/nsenter"), "agentcube-s1".into())),
        ..spec()
    };
    let r = gvisor_argv(&networked);
    assert!(has(
        &r,
        &[
            "/usr/bin/nsenter",
            "--net=/run/netns/agentcube-s1",
            "--",
            "/usr/bin/setpriv",
            "--pdeathsig",
            "KILL",
            "--",
            "/usr/bin/runsc"
        ]
    ));
    assert!(r.contains(&"--network=host".to_string()) && !r.iter().any(|a| a == "--network=none"));
    let v = oci_spec(&networked);
    let ns = v["linux"]["namespaces"].as_array().unwrap();
    assert!(
        !ns.iter().any(|n| n["type"] == "network"),
        "runsc's own: {ns:?}"
    );
    assert!(v["mounts"].as_array().unwrap().iter().any(|m| {
        m["source"] == "/etc/netns/agentcube-s1/resolv.conf"
            && m["destination"] == "/etc/resolv.conf"
    }));
    let none = gvisor_argv(&spec());
    assert!(
        none.contains(&"--network=none".to_string()) && !none.iter().any(|a| a.contains("nsenter"))
    );
}
