//! How one local sandbox is started. Pure functions, so the isolation flags are unit-tested.
//!
//! bubblewrap: a tiny shell (as the manager) opens the sandbox's private launcher files as fds
//! 3–5, joins the sandbox's cgroups, then execs — through `setpriv` to the sandbox's own uid when
//! the manager is root — `bwrap --args 3 <PicoD's command line>`. Every bubblewrap option (host
//! paths, the environment with the Router key) comes from fd 3, so neither host `ps` nor the
//! sandbox (whose PID 1 is bubblewrap) sees a state path, and the launcher's environment is
//! empty: nothing of the manager's environment reaches the sandbox. fds 4 and 5 carry the
//! seccomp filters. (bubblewrap takes the command itself only from its real argv: PicoD's
//! command line, which names only paths inside the sandbox, stays visible.)
//!
//! gVisor: the same layout and PicoD command line as an OCI bundle, run by `runsc` with the same
//! seccomp profile loaded inside (`--oci-seccomp`).

use std::path::{Path, PathBuf};

use super::layout::{PICOD_SOCKET, SandboxPaths, port_socket};

/// Where things are inside the sandbox.
pub const SANDBOX_WORKSPACE: &str = "/root";
pub const SANDBOX_RUN_DIR: &str = "/run/agentcube";
pub const SANDBOX_PICOD: &str = "/opt/agentcube/picod";
/// The uid/gid sandbox processes see themselves as (`nobody`); on the host they run as the
/// sandbox's own uid (root manager) or the manager's (otherwise).
pub const SANDBOX_UID: u32 = 65534;

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
    "matplotlibrc",
    "bash.bashrc",
    "profile",
];

/// Everything that varies per sandbox.
#[derive(Debug, Clone)]
pub struct LaunchSpec {
    /// The sandbox's host directories.
    pub paths: SandboxPaths,
    /// Host PicoD binary, bound read-only at [`SANDBOX_PICOD`].
    pub picod: PathBuf,
    /// `PICOD_AUTH_PUBLIC_KEY`; `None` runs PicoD with `--insecure-no-auth`.
    pub public_key: Option<String>,
    /// `PICOD_SANDBOX_NAME`: the identity Router tokens must name.
    pub sandbox_name: String,
    /// Environment from the definition.
    pub env: Vec<(String, String)>,
    /// Ports forwarded from `/run/agentcube/port-<N>.sock` to `127.0.0.1:N` inside.
    pub forward_ports: Vec<u16>,
    /// Agent program PicoD starts (AgentRuntime), empty for a CodeInterpreter.
    pub agent: Vec<String>,
    /// The host uid the sandbox runs as (when the manager is root).
    pub uid: Option<u32>,
    /// `cgroup.procs` files to join first.
    pub cgroup_procs: Vec<PathBuf>,
    /// The seccomp filter files (raw BPF), loaded by bubblewrap.
    pub seccomp: Vec<PathBuf>,
    /// The network namespace to run in (`nsenter` binary, namespace name) when the definition
    /// has a network policy; `None`: no network at all.
    pub netns: Option<(PathBuf, String)>,
    /// The cgroup file counting OOM kills (bound read-only at [`SANDBOX_MEMORY_EVENTS`]) and the
    /// memory limit, so PicoD can say when a command was killed for memory.
    pub memory: Option<(PathBuf, String)>,
    /// The image root filesystem to run on; `None`: the host's `/usr` (host mode).
    pub image: Option<ImageRoot>,
    /// The agent's working directory (AgentRuntime: `workingDir`, or the image's `WorkingDir`).
    pub agent_dir: Option<String>,
    /// The workspace's quota (as PicoD names it when the workspace is full).
    pub workspace_limit: Option<String>,
    /// The workspace's own filesystem, mounted by the launcher in a mount namespace of its own.
    pub workspace_fs: Option<WorkspaceFs>,
    /// The sizes of its writable memory-backed directories.
    pub tmpfs: TmpfsSizes,
}

/// The sizes of a sandbox's writable memory-backed directories (tmpfs): their pages are the
/// sandbox's memory, and killing a process frees none of them. Unbounded, a sandbox that filled
/// `/tmp` up to its memory limit had the out-of-memory killer take PicoD, and the session was
/// gone; bounded well below the limit, a full one is `ENOSPC` for the writer and the sandbox
/// goes on. Everything else in the sandbox is read-only, or disk (the workspace).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TmpfsSizes {
    /// `/tmp`: half the memory limit (`None`: no limit, the kernel's default).
    pub tmp: Option<u64>,
    /// `/dev/shm` (POSIX shared memory, `multiprocessing`): an eighth of the limit.
    pub shm: Option<u64>,
    /// `/run` under bubblewrap (PicoD's run directory in it is bound from the host):
    /// [`RUN_TMPFS_BYTES`]. Under gVisor `/run` is the read-only root's.
    pub run: u64,
}

/// The size of a sandbox's `/run`.
pub const RUN_TMPFS_BYTES: u64 = 1 << 20;

impl TmpfsSizes {
    /// The sizes under a memory limit of `memory` bytes (none below 1 MiB).
    pub fn for_limit(memory: Option<u64>) -> Self {
        let part = |d: u64| memory.map(|m| (m / d).max(1 << 20));
        Self {
            tmp: part(2),
            shm: part(8),
            run: RUN_TMPFS_BYTES,
        }
    }
}

/// A workspace filesystem image and the tools that mount it (see `quota`; the launcher waits
/// for `go` on its standard input before it mounts it: [`PROLOGUE`]). The launcher runs
/// under `unshare --mount --propagation private` and mounts it there, so the host's mount table
/// never holds it: it goes when the sandbox's last process does, whatever happens to the manager.
#[derive(Debug, Clone)]
pub struct WorkspaceFs {
    pub image: PathBuf,
    pub unshare: PathBuf,
    pub mount: PathBuf,
}

/// A sandbox on an image: its read-only rootfs, and PicoD's shared libraries from the host
/// (PicoD runs through the host's dynamic loader, so it works whatever libc the image has).
#[derive(Debug, Clone)]
pub struct ImageRoot {
    pub rootfs: PathBuf,
    /// Host paths of PicoD's libraries and loader (`ldd`), bound under [`SANDBOX_LIB_DIR`].
    pub libs: Vec<PathBuf>,
}

/// Where PicoD and its libraries are in an image sandbox (a tmpfs, read-only once set up).
pub const SANDBOX_INJECT_DIR: &str = "/opt/agentcube";
pub const SANDBOX_LIB_DIR: &str = "/opt/agentcube/lib";

impl ImageRoot {
    /// `(host path, sandbox path)` of each library.
    fn lib_binds(&self) -> Vec<(String, String)> {
        self.libs
            .iter()
            .filter_map(|l| {
                let name = l.file_name()?.to_string_lossy().to_string();
                Some((l.display().to_string(), format!("{SANDBOX_LIB_DIR}/{name}")))
            })
            .collect()
    }

    /// The loader's path inside, if PicoD is dynamically linked.
    fn loader(&self) -> Option<String> {
        self.lib_binds()
            .into_iter()
            .map(|(_, inside)| inside)
            .find(|p| p.rsplit('/').next().is_some_and(|n| n.starts_with("ld-")))
    }
}

/// Where the sandbox sees its cgroup's OOM counter.
pub const SANDBOX_MEMORY_EVENTS: &str = "/run/memory.events";

/// The launcher's input files, written into the sandbox's private directory.
pub fn args_file(paths: &SandboxPaths) -> PathBuf {
    paths.private.join("bwrap.args")
}

/// The environment PicoD (and what it runs) starts with: fixed values, the definition's, and
/// PicoD's own settings. Nothing else.
fn sandbox_env(spec: &LaunchSpec) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = [
        ("PATH", "/usr/local/bin:/usr/bin:/bin"),
        ("HOME", SANDBOX_WORKSPACE),
        ("LANG", "C.UTF-8"),
        ("RUST_LOG", "warn"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    env.extend(spec.env.iter().cloned());
    if let Some(key) = &spec.public_key {
        env.push(("PICOD_AUTH_PUBLIC_KEY".into(), key.clone()));
    }
    env.push(("PICOD_SANDBOX_NAME".into(), spec.sandbox_name.clone()));
    if let Some((_, limit)) = &spec.memory {
        env.push(("PICOD_MEMORY_EVENTS".into(), SANDBOX_MEMORY_EVENTS.into()));
        env.push(("PICOD_MEMORY_LIMIT".into(), limit.clone()));
    }
    if spec.netns.is_none() {
        env.push(("PICOD_NO_NETWORK".into(), "true".into()));
    }
    if let Some(limit) = &spec.workspace_limit {
        env.push(("PICOD_WORKSPACE_LIMIT".into(), limit.clone()));
    }
    // The last value of a name wins (the image's PATH over the default, the definition's over
    // the image's), and each name is set once.
    let mut seen = std::collections::HashSet::new();
    let mut env: Vec<_> = env
        .into_iter()
        .rev()
        .filter(|(k, _)| seen.insert(k.clone()))
        .collect();
    env.reverse();
    env
}

/// PicoD's command line inside the sandbox.
pub fn picod_argv(spec: &LaunchSpec) -> Vec<String> {
    let mut a = match spec.image.as_ref().and_then(ImageRoot::loader) {
        Some(loader) => vec![loader, "--library-path".into(), SANDBOX_LIB_DIR.into()],
        None => Vec::new(),
    };
    a.extend([
        SANDBOX_PICOD.to_string(),
        "--workspace".into(),
        SANDBOX_WORKSPACE.into(),
        "--listen".into(),
        format!("unix:{SANDBOX_RUN_DIR}/{PICOD_SOCKET}"),
    ]);
    if spec.public_key.is_none() {
        a.push("--insecure-no-auth".into());
    }
    for port in &spec.forward_ports {
        a.push("--forward".into());
        a.push(format!(
            "{port}=unix:{SANDBOX_RUN_DIR}/{}",
            port_socket(*port)
        ));
    }
    if let Some(dir) = &spec.agent_dir {
        a.push("--agent-dir".into());
        a.push(dir.clone());
    }
    if !spec.agent.is_empty() {
        a.push("--".into());
        a.extend(spec.agent.iter().cloned());
    }
    a
}

/// Everything bubblewrap reads from fd 3: its options and the environment.
pub fn bwrap_args(spec: &LaunchSpec) -> Vec<String> {
    // Every namespace unshared; with a network policy the network one is the sandbox's own,
    // prepared by the manager (see `net`), so it is kept.
    let unshare: &[&str] = match spec.netns {
        None => &["--unshare-all"],
        Some(_) => &[
            "--unshare-ipc",
            "--unshare-pid",
            "--unshare-uts",
            "--unshare-cgroup-try",
        ],
    };
    let mut a: Vec<String> = unshare.iter().map(ToString::to_string).collect();
    let mut push = |v: &[&str]| a.extend(v.iter().map(ToString::to_string));
    push(&[
        "--unshare-user",
        "--disable-userns",
        "--die-with-parent",
        "--new-session",
        "--hostname",
        "sandbox",
        "--cap-drop",
        "ALL",
        "--add-seccomp-fd",
        "4",
        "--add-seccomp-fd",
        "5",
    ]);
    let id = SANDBOX_UID.to_string();
    push(&["--uid", &id, "--gid", &id]);
    match &spec.image {
        None => push(&host_root().iter().map(String::as_str).collect::<Vec<_>>()),
        Some(image) => push(&["--ro-bind", &image.rootfs.display().to_string(), "/"]),
    }
    if let Some((_, ns)) = &spec.netns {
        // The namespace's own resolver file, written by the manager.
        let resolv = format!("/etc/netns/{ns}/resolv.conf");
        push(&["--ro-bind-try", &resolv, "/etc/resolv.conf"]);
    }
    // `/dev` read-only (bubblewrap's own tmpfs, unsized): writable memory only where sized.
    push(&["--proc", "/proc", "--dev", "/dev"]);
    let run = Some(spec.tmpfs.run);
    for (size, dir) in [
        (spec.tmpfs.shm, "/dev/shm"),
        (spec.tmpfs.tmp, "/tmp"),
        (run, "/run"),
    ] {
        if let Some(bytes) = size {
            push(&["--size", &bytes.to_string()]);
        }
        push(&["--tmpfs", dir]);
    }
    push(&["--remount-ro", "/dev"]);
    let ws = spec.paths.ws.display().to_string();
    let run = spec.paths.run.display().to_string();
    let picod = spec.picod.display().to_string();
    push(&[
        "--bind",
        &ws,
        SANDBOX_WORKSPACE,
        "--bind",
        &run,
        SANDBOX_RUN_DIR,
    ]);
    match &spec.image {
        None => push(&["--ro-bind", &picod, SANDBOX_PICOD]),
        Some(image) => {
            // The image's root is read-only: PicoD and its libraries go on a tmpfs of their own,
            // made read-only once they are bound.
            push(&[
                "--tmpfs",
                SANDBOX_INJECT_DIR,
                "--ro-bind",
                &picod,
                SANDBOX_PICOD,
            ]);
            for (host, inside) in image.lib_binds() {
                push(&["--ro-bind", &host, &inside]);
            }
            push(&["--remount-ro", SANDBOX_INJECT_DIR]);
        }
    }
    if let Some((events, _)) = &spec.memory {
        let events = events.display().to_string();
        push(&["--ro-bind", &events, SANDBOX_MEMORY_EVENTS]);
    }
    if spec.image.is_none() {
        // bubblewrap's root tmpfs (unsized), read-only once every mount point is on it (an
        // image's root is bound read-only).
        push(&["--remount-ro", "/"]);
    }
    push(&["--clearenv"]);
    for (k, v) in sandbox_env(spec) {
        push(&["--setenv", &k, &v]);
    }
    push(&["--chdir", SANDBOX_WORKSPACE]);
    a
}

/// The host-rootfs mode: the host's `/usr` read-only, and only the allow-listed `/etc` files.
fn host_root() -> Vec<String> {
    let mut a: Vec<String> = [
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
    if Path::new("/usr/lib64").exists() {
        a.extend(["--symlink", "usr/lib64", "/lib64"].map(String::from));
    }
    for entry in ETC_ALLOWLIST {
        let p = format!("/etc/{entry}");
        a.extend(["--ro-bind-try".to_string(), p.clone(), p]);
    }
    a
}

/// The args file content: NUL-separated, as `bwrap --args` reads it. An argument holding a NUL
/// (an environment value, say) is refused: it would end there and its rest would be read as
/// further bubblewrap options (`--share-net`, `--bind / /host`).
pub fn args_file_content(spec: &LaunchSpec) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    for arg in bwrap_args(spec) {
        if arg.contains('\0') {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "a sandbox option holds a NUL byte",
            ));
        }
        out.extend(arg.as_bytes());
        out.push(0);
    }
    Ok(out)
}

/// Launcher prologue: optionally `--mount MOUNT IMAGE DIR` (the workspace filesystem, mounted in
/// the launcher's own mount namespace, emptied of `lost+found` and made private); then `$1`.. are
/// files to open as fds 3.., up to `--fds-end`; then the `cgroup.procs` files to join, up to
/// `--`; then the command to exec. Nothing of the sandbox ever runs outside its cgroups, and the
/// fds are the only way its inputs reach it.
///
/// The workspace is mounted beside the rest, by a child forked first (outside the sandbox's
/// cgroups, holding none of its fds, its standard input the launcher's), once the manager, which
/// formats the image meanwhile, writes `go` there; the command starts only once it is mounted
/// (end of input instead of `go`: status 95, nothing runs). Joining a cgroup v1 hierarchy waits
/// for an RCU grace period (10-20 ms on the machines measured): formatting and mounting take
/// about as long, and now take it at the same time.
const PROLOGUE: &str = r#"unset PWD OLDPWD; fd=3; mounting=
if [ "$1" = "--mount" ]; then
  exec 8<&0
  { read -r go && [ "$go" = go ] && "$2" -t ext4 -o loop,nodev,nosuid,noatime,noinit_itable "$3" "$4" && rmdir "$4/lost+found" && chmod 700 "$4"; } <&8 &
  mounting=$!
  exec 8<&- </dev/null
  shift 4
fi
while [ "$1" != "--fds-end" ]; do eval "exec $fd<\"\$1\"" || exit 96; fd=$((fd+1)); shift; done; shift
while [ "$1" != "--" ]; do echo $$ > "$1" || exit 97; shift; done; shift
if [ -n "$mounting" ]; then wait "$mounting" || exit 95; fi
exec "$@""#;

fn prologue(
    files: &[&Path],
    cgroup_procs: &[PathBuf],
    workspace: Option<(&WorkspaceFs, &Path)>,
) -> Vec<String> {
    let mut argv = Vec::new();
    if let Some((fs, _)) = workspace {
        argv.extend([
            fs.unshare.display().to_string(),
            "--mount".into(),
            "--propagation".into(),
            "private".into(),
            "--".into(),
        ]);
    }
    argv.extend([
        "/bin/sh".to_string(),
        "-c".into(),
        PROLOGUE.into(),
        "sh".into(),
    ]);
    if let Some((fs, dir)) = workspace {
        argv.extend([
            "--mount".to_string(),
            fs.mount.display().to_string(),
            fs.image.display().to_string(),
            dir.display().to_string(),
        ]);
    }
    argv.extend(files.iter().map(|f| f.display().to_string()));
    argv.push("--fds-end".into());
    argv.extend(cgroup_procs.iter().map(|p| p.display().to_string()));
    argv.push("--".into());
    argv
}

/// The full bubblewrap launcher argv (the args file must have been written).
pub fn launcher_argv(spec: &LaunchSpec, bwrap: &Path, setpriv: &Path) -> Vec<String> {
    let args = args_file(&spec.paths);
    let mut files: Vec<&Path> = vec![&args];
    files.extend(spec.seccomp.iter().map(PathBuf::as_path));
    let workspace = spec
        .workspace_fs
        .as_ref()
        .map(|f| (f, spec.paths.ws.as_path()));
    let mut argv = prologue(&files, &spec.cgroup_procs, workspace);
    if let Some((nsenter, ns)) = &spec.netns {
        // Only the network namespace is entered (`ip netns exec` would also remount /sys, hiding
        // the cgroup file bound into the sandbox).
        argv.extend([
            nsenter.display().to_string(),
            format!("--net=/run/netns/{ns}"),
            "--".into(),
        ]);
    }
    if let Some(uid) = spec.uid {
        argv.extend([
            setpriv.display().to_string(),
            format!("--reuid={uid}"),
            format!("--regid={uid}"),
            "--clear-groups".into(),
            "--".into(),
        ]);
    }
    argv.push(bwrap.display().to_string());
    argv.extend(["--args".into(), "3".into(), "--".into()]);
    argv.extend(picod_argv(spec));
    argv
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
/// (`--network=none` on the runsc command line) or, with a network policy, the sandbox's network
/// namespace (runsc runs in it, so the spec asks for none) and its resolver file; no
/// capabilities, the sandbox's uid, the seccomp profile.
pub fn oci_spec(spec: &LaunchSpec) -> serde_json::Value {
    use serde_json::json;
    let bind = |src: &str, dst: &str, ro: bool| {
        json!({"destination": dst, "type": "bind", "source": src,
               "options": ["rbind", if ro { "ro" } else { "rw" }]})
    };
    let mut mounts = vec![json!({"destination": "/proc", "type": "proc", "source": "proc"})];
    for (dir, size) in [("/tmp", spec.tmpfs.tmp), ("/dev/shm", spec.tmpfs.shm)] {
        let options: Vec<String> = size.map(|b| format!("size={b}")).into_iter().collect();
        mounts.push(
            json!({"destination": dir, "type": "tmpfs", "source": "tmpfs", "options": options}),
        );
    }
    if spec.image.is_none() {
        mounts.push(bind("/usr", "/usr", true));
    }
    mounts.extend([
        bind(
            &spec.paths.ws.display().to_string(),
            SANDBOX_WORKSPACE,
            false,
        ),
        bind(
            &spec.paths.run.display().to_string(),
            SANDBOX_RUN_DIR,
            false,
        ),
    ]);
    match &spec.image {
        None => {
            mounts.push(bind(&spec.picod.display().to_string(), SANDBOX_PICOD, true));
            for entry in ETC_ALLOWLIST {
                let p = format!("/etc/{entry}");
                if Path::new(&p).exists() {
                    mounts.push(bind(&p, &p, true));
                }
            }
        }
        Some(image) => {
            mounts.push(json!({"destination": SANDBOX_INJECT_DIR, "type": "tmpfs",
                               "source": "tmpfs", "options": ["mode=755"]}));
            mounts.push(bind(&spec.picod.display().to_string(), SANDBOX_PICOD, true));
            for (host, inside) in image.lib_binds() {
                mounts.push(bind(&host, &inside, true));
            }
        }
    }
    if let Some((_, ns)) = &spec.netns {
        // The namespace's own resolver file, written by the manager.
        mounts.push(bind(
            &format!("/etc/netns/{ns}/resolv.conf"),
            "/etc/resolv.conf",
            true,
        ));
    }
    let root = match &spec.image {
        None => "rootfs".to_string(),
        Some(image) => image.rootfs.display().to_string(),
    };
    let env: Vec<String> = sandbox_env(spec)
        .into_iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    let uid = spec.uid.unwrap_or(SANDBOX_UID);
    let mut namespaces = vec![
        json!({"type": "pid"}),
        json!({"type": "ipc"}),
        json!({"type": "uts"}),
        json!({"type": "mount"}),
    ];
    if spec.netns.is_none() {
        namespaces.push(json!({"type": "network"}));
    }
    json!({
        "ociVersion": "1.0.0",
        "process": {
            "user": {"uid": uid, "gid": uid},
            "args": picod_argv(spec),
            "env": env,
            "cwd": SANDBOX_WORKSPACE,
            "noNewPrivileges": true,
            "capabilities": {"bounding": [], "effective": [], "inheritable": [], "permitted": [], "ambient": []},
        },
        "root": {"path": root, "readonly": true},
        "hostname": "sandbox",
        "mounts": mounts,
        "linux": {
            "namespaces": namespaces,
            "seccomp": super::seccomp::oci_profile(),
        },
    })
}

/// Writes a gVisor bundle (skeleton root + `config.json`) into `bundle`.
pub fn write_oci_bundle(bundle: &Path, spec: &LaunchSpec) -> std::io::Result<()> {
    std::fs::create_dir_all(bundle)?;
    let config = serde_json::to_vec_pretty(&oci_spec(spec)).map_err(std::io::Error::other)?;
    std::fs::write(bundle.join("config.json"), config)?;
    if spec.image.is_some() {
        // The image's rootfs is the root; nothing to build.
        return Ok(());
    }
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
    std::fs::write(root.join("etc/resolv.conf"), b"")?;
    for entry in ETC_ALLOWLIST {
        let host = Path::new("/etc").join(entry);
        let inside = root.join("etc").join(entry);
        if host.is_dir() {
            std::fs::create_dir_all(&inside)?;
        } else if host.exists() {
            std::fs::write(&inside, b"")?;
        }
    }
    Ok(())
}

/// The launcher argv for gVisor: join cgroups, then `runsc … run --bundle B ID` (runsc needs root
/// on the host; the sandboxed process itself runs as the sandbox's uid). PicoD may only create
/// host sockets (`--host-uds=create`, in its run directory), never connect to host ones. With a
/// network policy runsc is started in the sandbox's network namespace (`nsenter --net=`) with
/// `--network=host`: gVisor's sockets are that namespace's kernel sockets, so the namespace's
/// nftables rules apply to them as to a bubblewrap sandbox's (gVisor's own network stack would
/// send raw frames, which those rules never see).
///
/// runsc has no `--die-with-parent`: `setpriv --pdeathsig KILL` gives `runsc run` the kill that
/// bubblewrap gives itself, so a manager that dies (even by SIGKILL) takes its gVisor sandboxes
/// with it (an attached sandbox and its gofer die with `runsc run`), as it does its bubblewrap
/// ones. Both are tied to the thread that started the launcher: the runtime's worker threads,
/// which live as long as the manager.
pub fn runsc_argv(
    runsc: &Path,
    setpriv: &Path,
    state: &Path,
    bundle: &Path,
    id: &str,
    spec: &LaunchSpec,
) -> Vec<String> {
    let workspace = spec
        .workspace_fs
        .as_ref()
        .map(|f| (f, spec.paths.ws.as_path()));
    let mut argv = prologue(&[], &spec.cgroup_procs, workspace);
    let network = match &spec.netns {
        Some((nsenter, ns)) => {
            argv.extend([
                nsenter.display().to_string(),
                format!("--net=/run/netns/{ns}"),
                "--".into(),
            ]);
            "--network=host"
        }
        None => "--network=none",
    };
    argv.extend([
        setpriv.display().to_string(),
        "--pdeathsig".into(),
        "KILL".into(),
        "--".into(),
        runsc.display().to_string(),
        format!("--root={}", state.display()),
        network.into(),
        "--host-uds=create".into(),
        "--oci-seccomp".into(),
        "--ignore-cgroups".into(),
        "run".into(),
        format!("--bundle={}", bundle.display()),
        id.into(),
    ]);
    argv
}

#[cfg(test)]
mod tests;
