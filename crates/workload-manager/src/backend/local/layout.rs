//! Where local sandboxes live on the host, who may enter, and how the host takes a sandbox's
//! sockets without ever following a path the sandbox controls.
//!
//! ```text
//! <state>/                        0711 (0700 when not root)    traverse only
//! <state>/sandboxes/              0711 (0700)
//! <state>/sandboxes/<name>/       0700, owned by the sandbox's uid
//!     ws/                         the sandbox's /root (workspace)
//!     run/                        the sandbox's /run/agentcube: PicoD binds its sockets here
//!                                 (as root, `sockets/run` below, bound here)
//! <state>/private/<name>/         0700, the manager's only: never mounted into the sandbox
//!                                 (but for `sockets/run/`, as root)
//!     sockets/                    as root a tmpfs of its own (`SOCKETS_TMPFS`)
//!         run/                    as root: the sandbox's run/ itself
//!         picod.sock, port-<N>.sock   moved here from run/ once bound (see `claim_socket`)
//!     bwrap.args, seccomp-*.bpf   the launcher's inputs; the gVisor bundle
//!     sandbox.log, sandbox.log.1  its output, written by the manager (see `output`)
//!     workspace.ext4              the workspace's filesystem, when it has a quota
//! ```
//!
//! Everything the Router and the Workload Manager connect to or open lives in `private/`, which
//! the sandbox cannot see (as root, `sockets/run/` is the sandbox's run directory). The only
//! thing taken from `run/` is a socket, by `rename` (which never follows a symlink) and checked
//! to be a socket afterwards: a symlink planted by sandbox code is refused and nothing is ever
//! sent to it. `run/` is a host directory the sandbox writes: on the state directory's disk it
//! was room outside the workspace quota (a sandbox could fill the disk through it) and a place to
//! nest directories deeper than the manager's stack. As root it
//! is on a tmpfs of a few KiB and inodes instead, the one the sockets move within (`rename`
//! cannot cross filesystems, nor mounts: the move is made on the tmpfs's own mount, the bind at
//! `sandboxes/<name>/run` being only the path the sandbox's uid can reach), unmounted with the
//! sandbox.

use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::mounts;

/// PicoD's socket name.
pub const PICOD_SOCKET: &str = "picod.sock";

/// Socket of a forwarded port.
pub fn port_socket(port: u16) -> String {
    format!("port-{port}.sock")
}

/// The host paths of one sandbox.
#[derive(Debug, Clone)]
pub struct SandboxPaths {
    /// `<state>/sandboxes/<name>`.
    pub dir: PathBuf,
    /// The workspace (`/root` inside).
    pub ws: PathBuf,
    /// Bound at `/run/agentcube` inside; PicoD creates its sockets here.
    pub run: PathBuf,
    /// `<state>/private/<name>`: the manager's own files about this sandbox.
    pub private: PathBuf,
    /// `<private>/sockets`: the sandbox's sockets once claimed.
    pub sockets: PathBuf,
    /// Whether `sockets` is a tmpfs of its own whose `run/` is bound at `run` (root).
    pub tmpfs: bool,
}

/// The options of the tmpfs `sockets/` is, as root: room for PicoD's sockets and their markers
/// (no data blocks), nothing more a sandbox could fill or nest.
pub const SOCKETS_TMPFS: &str = "size=64k,nr_inodes=1024,mode=0700";

/// Whether `name` can name a sandbox's directories, cgroups and network namespace: one path
/// component of lowercase letters, digits, `-` and `.` (not first), short enough for
/// `agentcube-<name>` to be a file name. Definition names are checked like the API server's
/// when manifests load; this keeps a name that slipped past from ever leaving the state
/// directory.
pub fn is_sandbox_name(name: &str) -> bool {
    let allowed = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.';
    !name.is_empty() && name.len() <= 245 && !name.starts_with('.') && name.chars().all(allowed)
}

impl SandboxPaths {
    /// The paths of sandbox `name` under `state`.
    pub fn new(state: &Path, name: &str) -> Self {
        let dir = state.join("sandboxes").join(name);
        let private = state.join("private").join(name);
        Self {
            ws: dir.join("ws"),
            run: dir.join("run"),
            dir,
            sockets: private.join("sockets"),
            private,
            tmpfs: false,
        }
    }

    /// The same, with `sockets/` a tmpfs of its own when `tmpfs` (see [`SandboxPaths::create`]).
    pub fn with_tmpfs(self, tmpfs: bool) -> Self {
        Self { tmpfs, ..self }
    }

    /// Where the manager finds what PicoD binds: `run/` on the filesystem and mount the sockets
    /// move to (with a tmpfs, its own `run/`, which `run` is a bind of).
    pub fn handover(&self) -> PathBuf {
        if self.tmpfs {
            self.sockets.join("run")
        } else {
            self.run.clone()
        }
    }

    /// Where the host reaches a socket of this sandbox (after [`claim_socket`]).
    pub fn socket(&self, file: &str) -> PathBuf {
        self.sockets.join(file)
    }

    /// The sandbox's log (its launcher's stdout and stderr).
    pub fn log(&self) -> PathBuf {
        self.private.join("sandbox.log")
    }

    /// Creates the sandbox's directories: its own ones owned by `uid` (when running as root), the
    /// private ones by the manager; all 0700. With [`SandboxPaths::tmpfs`], `sockets/` is then
    /// mounted as a tmpfs ([`SOCKETS_TMPFS`]) and its `run/` bound at `run`.
    pub fn create(&self, uid: Option<u32>) -> io::Result<()> {
        mkdir_private(&self.private)?;
        mkdir_private(&self.sockets)?;
        let mut own = vec![&self.dir, &self.ws, &self.run];
        let handover = self.handover();
        if self.tmpfs {
            mounts::tmpfs(&self.sockets, SOCKETS_TMPFS)?;
            own.push(&handover);
        }
        for d in own {
            mkdir_private(d)?;
            if let Some(uid) = uid {
                std::os::unix::fs::chown(d, Some(uid), Some(uid))?;
            }
        }
        if self.tmpfs {
            mounts::bind(&handover, &self.run)?;
        }
        Ok(())
    }

    /// Deletes both directories (see [`super::rmtree`]: whatever the sandbox made of them),
    /// `run/`'s bind and `sockets/`'s tmpfs unmounted first.
    pub async fn remove(&self) {
        if self.tmpfs {
            mounts::detach(&self.run);
            mounts::detach(&self.sockets);
        }
        for d in [&self.dir, &self.private] {
            // Without cgroups, a process of the sandbox may outlive its launcher by a moment
            // (the kernel kills a pid namespace when its init goes): retry briefly.
            let last = super::retry::until_ok(|| {
                let dir = d.clone();
                async move {
                    match tokio::task::spawn_blocking(move || super::rmtree::remove_tree(&dir))
                        .await
                    {
                        Ok(r) => r,
                        Err(e) => Err(io::Error::other(e)),
                    }
                }
            })
            .await;
            if let Err(e) = last {
                tracing::error!(
                    dir = %d.display(),
                    error = %e,
                    "cannot remove a removed sandbox's directory; the next start on this state \
                     directory removes it"
                );
            }
        }
    }
}

/// Whether this process may give sandboxes' `sockets/` a tmpfs (root, outside a container that
/// withholds `CAP_SYS_ADMIN`): mounts and unmounts one on a directory of `private/`.
pub fn tmpfs_works(state: &Path) -> Result<(), String> {
    let probe = state.join("private").join(".tmpfs-probe");
    mkdir_private(&probe).map_err(|e| format!("{}: {e}", probe.display()))?;
    let mounted = mounts::tmpfs(&probe, SOCKETS_TMPFS);
    mounts::detach(&probe);
    let _ = std::fs::remove_dir(&probe);
    mounted.map_err(|e| format!("cannot mount a tmpfs: {e}"))
}

/// Detaches whatever is mounted below `<state>/sandboxes/` and `<state>/private/` (the `run/`
/// binds and `sockets/` tmpfs of sandboxes a crashed predecessor left), deepest first, so that
/// their directories can go. Returns how many.
pub fn unmount_leftovers(state: &Path) -> usize {
    let below = [state.join("sandboxes"), state.join("private")];
    let mut points: Vec<PathBuf> = mounts::mounted_below(state)
        .into_iter()
        .filter(|p| below.iter().any(|b| p.starts_with(b) && p != b))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for p in &points {
        mounts::detach(p);
    }
    points.len()
}

fn mkdir_private(d: &Path) -> io::Result<()> {
    match std::fs::DirBuilder::new().mode(0o700).create(d) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700))
        }
        Err(e) => Err(e),
    }
}

/// Makes the state directory if needed and checks that no other user can change it: the
/// directory (symlinks resolved) must belong to this process's user, and each directory above
/// it to root or this user, writable by nobody else (this process's group aside) unless sticky
/// (as `/tmp`). Whoever could
/// rename entries there could swap `private/` for a directory of their own, whose "sockets" the
/// Router would then follow (as root, to any socket on the host), or the seccomp filters the
/// sandboxes load. Returns the resolved path, which is the one to use from then on.
pub fn trusted_state_dir(state: &Path) -> Result<PathBuf, String> {
    use std::os::unix::fs::MetadataExt;
    std::fs::create_dir_all(state).map_err(|e| format!("cannot make {}: {e}", state.display()))?;
    let real = state
        .canonicalize()
        .map_err(|e| format!("{}: {e}", state.display()))?;
    let me = nix::unistd::Uid::effective().as_raw();
    let my_group = nix::unistd::Gid::effective().as_raw();
    let meta = std::fs::metadata(&real).map_err(|e| format!("{}: {e}", real.display()))?;
    if meta.uid() != me {
        return Err(format!(
            "state directory {} belongs to uid {}, not to this process (uid {me}): another user \
             could change what the manager trusts there; use a directory of your own \
             (--state-dir)",
            real.display(),
            meta.uid()
        ));
    }
    for dir in real.ancestors().skip(1) {
        let meta = std::fs::metadata(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let mode = meta.mode();
        // Group-writable is fine for this process's own group (a user private group).
        let others_write = (mode & 0o002 != 0 || (mode & 0o020 != 0 && meta.gid() != my_group))
            && mode & 0o1000 == 0;
        if (meta.uid() != 0 && meta.uid() != me) || others_write {
            return Err(format!(
                "{} (above the state directory {}) belongs to uid {} with mode {:o}: another \
                 user could rename the state directory; use one whose parents only root or \
                 this user can change (--state-dir)",
                dir.display(),
                real.display(),
                meta.uid(),
                mode & 0o7777
            ));
        }
    }
    Ok(real)
}

/// Opens (making it, 0600, when missing) a lock file of root's or this manager's: never through a
/// symlink, never inherited by what the manager starts. Its contents are left as they are.
pub fn open_lock_file(path: &Path) -> io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
        .open(path)
}

/// Takes the state directory (made by [`trusted_state_dir`]) for this manager: an exclusive lock
/// on `<state>/lock`, held while the returned file is open (the kernel drops it when the process
/// dies, so a crash never leaves it behind). A second manager on the same directory would take the first one's sandboxes for a
/// crashed predecessor's and remove them. The holder's pid is written into the file, for the
/// refusal's message.
pub fn lock_state(state: &Path) -> Result<std::fs::File, String> {
    use std::io::{Read, Seek, Write};
    let path = state.join("lock");
    let mut file =
        open_lock_file(&path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    match file.try_lock() {
        Ok(()) => {
            let pid = std::process::id().to_string();
            let _ = file.set_len(0);
            let _ = file.rewind().and_then(|()| file.write_all(pid.as_bytes()));
            Ok(file)
        }
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            Err(format!(
                "state directory {} is in use by another Workload Manager or `agentcube up` \
                 (pid {}): stop it, or give this one another --state-dir",
                state.display(),
                holder.trim()
            ))
        }
        Err(std::fs::TryLockError::Error(e)) => Err(format!("cannot lock {}: {e}", path.display())),
    }
}

/// Makes the state directory and its `sandboxes/` and `private/` children. When sandboxes run as
/// other uids (`shared`), the first two are 0711: traversable, not listable.
pub fn prepare_state(state: &Path, shared: bool) -> io::Result<()> {
    let traverse = if shared { 0o711 } else { 0o700 };
    std::fs::create_dir_all(state)?;
    std::fs::set_permissions(state, std::fs::Permissions::from_mode(traverse))?;
    for (d, mode) in [("sandboxes", traverse), ("private", 0o700)] {
        let d = state.join(d);
        std::fs::create_dir_all(&d)?;
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(mode))?;
    }
    Ok(())
}

/// Takes a socket PicoD bound in the sandbox's `run/` into `sockets/`: a `rename` (the entry
/// itself moves, a symlink is not followed), then a check that what arrived is a socket. Returns
/// `Ok(false)` while PicoD has not said it listens (its `<file>.ready` marker): under gVisor a
/// `bind` is more than one step on the host, and a move in between failed PicoD's start with
/// ENOENT. The marker only says when; what is moved is checked all the same.
pub fn claim_socket(paths: &SandboxPaths, file: &str) -> io::Result<bool> {
    let (from, to) = (paths.handover().join(file), paths.socket(file));
    if std::fs::symlink_metadata(&to).is_ok_and(|m| m.file_type().is_socket()) {
        return Ok(true);
    }
    let marker = agentcube_types::picod::socket_ready_marker(&from);
    if std::fs::symlink_metadata(marker).is_err() {
        return Ok(false);
    }
    match std::fs::rename(&from, &to) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    }
    let meta = std::fs::symlink_metadata(&to)?;
    if meta.file_type().is_socket() {
        return Ok(true);
    }
    let _ = std::fs::remove_file(&to);
    Err(io::Error::new(
        io::ErrorKind::PermissionDenied,
        format!(
            "{file} in the sandbox is not a socket ({}): refused",
            describe(&meta)
        ),
    ))
}

fn describe(meta: &std::fs::Metadata) -> &'static str {
    let t = meta.file_type();
    if t.is_symlink() {
        "a symlink"
    } else if t.is_dir() {
        "a directory"
    } else if t.is_file() {
        "a regular file"
    } else {
        "a special file"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_names_name_sandboxes() {
        for ok in ["ci-abc123", "my.ci-x", &"a".repeat(245)] {
            assert!(is_sandbox_name(ok), "{ok}");
        }
        for bad in [
            "",
            "../x",
            "a/b",
            ".hidden",
            "..",
            "A",
            "a b",
            "a\0b",
            &"a".repeat(246),
        ] {
            assert!(!is_sandbox_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn a_symlink_planted_instead_of_the_socket_is_refused_and_never_followed() {
        let tmp = tempfile::tempdir().unwrap();
        prepare_state(tmp.path(), false).unwrap();
        let paths = SandboxPaths::new(tmp.path(), "sb");
        paths.create(None).unwrap();
        assert!(
            !claim_socket(&paths, PICOD_SOCKET).unwrap(),
            "not bound yet"
        );
        // A host socket the sandbox would like the host to talk to.
        let host = tmp.path().join("host.sock");
        let _host = std::os::unix::net::UnixListener::bind(&host).unwrap();
        std::os::unix::fs::symlink(&host, paths.run.join(PICOD_SOCKET)).unwrap();
        assert!(
            !claim_socket(&paths, PICOD_SOCKET).unwrap(),
            "not moved before PicoD says it listens"
        );
        let marker = agentcube_types::picod::socket_ready_marker(&paths.run.join(PICOD_SOCKET));
        std::fs::write(marker, b"").unwrap();
        let err = claim_socket(&paths, PICOD_SOCKET).unwrap_err();
        assert!(err.to_string().contains("a symlink"), "{err}");
        assert!(!paths.socket(PICOD_SOCKET).exists());
        // A real socket bound inside is taken.
        std::fs::remove_file(paths.run.join(PICOD_SOCKET)).ok();
        let _l = std::os::unix::net::UnixListener::bind(paths.run.join(PICOD_SOCKET)).unwrap();
        assert!(claim_socket(&paths, PICOD_SOCKET).unwrap());
        assert!(
            std::fs::symlink_metadata(paths.socket(PICOD_SOCKET))
                .unwrap()
                .file_type()
                .is_socket()
        );
        assert!(std::os::unix::net::UnixStream::connect(paths.socket(PICOD_SOCKET)).is_ok());
    }

    #[test]
    fn directories_are_private_and_removal_survives_chmod_000() {
        let tmp = tempfile::tempdir().unwrap();
        prepare_state(tmp.path(), false).unwrap();
        let paths = SandboxPaths::new(tmp.path(), "sb");
        paths.create(None).unwrap();
        for d in [&paths.dir, &paths.ws, &paths.run, &paths.private] {
            let mode = std::fs::metadata(d).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o700, "{}", d.display());
        }
        let locked = paths.ws.join("a/b");
        std::fs::create_dir_all(&locked).unwrap();
        std::fs::write(locked.join("f"), "x").unwrap();
        std::fs::set_permissions(paths.ws.join("a"), std::fs::Permissions::from_mode(0o000))
            .unwrap();
        // Outside the tree, reached through a symlink inside it: must survive.
        let outside = tmp.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("keep"), "k").unwrap();
        std::os::unix::fs::symlink(&outside, paths.ws.join("link")).unwrap();
        super::super::rmtree::remove_tree(&paths.dir).unwrap();
        assert!(!paths.dir.exists());
        assert_eq!(std::fs::read_to_string(outside.join("keep")).unwrap(), "k");
    }

    #[test]
    fn a_state_directory_has_one_manager_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let state = trusted_state_dir(&dir.path().join("state")).unwrap();
        let held = lock_state(&state).unwrap();
        let err = lock_state(&state).unwrap_err();
        assert!(
            err.contains("is in use by another")
                && err.contains(&format!("(pid {})", std::process::id())),
            "{err}"
        );
        drop(held);
        let again = lock_state(&state);
        assert!(again.is_ok(), "{again:?}");
    }

    #[test]
    fn a_state_directory_another_user_could_change_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let ok = trusted_state_dir(&dir.path().join("a/state")).unwrap();
        assert!(ok.is_absolute() && ok.ends_with("a/state"));
        // Through a symlink: the resolved directory is the one used.
        std::os::unix::fs::symlink(&ok, dir.path().join("link")).unwrap();
        assert_eq!(trusted_state_dir(&dir.path().join("link")).unwrap(), ok);
        // A parent others may write (not sticky): refused.
        let open = dir.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = trusted_state_dir(&open.join("state")).unwrap_err();
        assert!(err.contains("another user could rename"), "{err}");
        // Sticky (as /tmp): fine; writable by this process's own group only: fine.
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o1777)).unwrap();
        assert!(trusted_state_dir(&open.join("state")).is_ok());
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o775)).unwrap();
        assert!(trusted_state_dir(&open.join("state")).is_ok());
        if nix::unistd::Uid::effective().is_root() {
            // Writable by another group: refused.
            std::os::unix::fs::chown(&open, None, Some(65534)).unwrap();
            let err = trusted_state_dir(&open.join("state")).unwrap_err();
            assert!(err.contains("another user could rename"), "{err}");
            // Another user's directory: refused.
            let theirs = dir.path().join("theirs");
            std::fs::create_dir(&theirs).unwrap();
            std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
            let err = trusted_state_dir(&theirs).unwrap_err();
            assert!(err.contains("belongs to uid 65534"), "{err}");
        }
    }
}
