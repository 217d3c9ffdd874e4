//! Where local sandboxes live on the host, who may enter, and how the host takes a sandbox's
//! sockets without ever following a path the sandbox controls.
//!
//! ```text
//! <state>/                        0711 (0700 when not root)    traverse only
//! <state>/sandboxes/              0711 (0700)
//! <state>/sandboxes/<name>/       0700, owned by the sandbox's uid
//!     ws/                         the sandbox's /root (workspace)
//!     run/                        the sandbox's /run/agentcube: PicoD binds its sockets here
//! <state>/private/<name>/         0700, the manager's only: never mounted into the sandbox
//!     picod.sock, port-<N>.sock   moved here from run/ once bound (see `claim_socket`)
//!     bwrap.args, seccomp-*.bpf   the launcher's inputs; the gVisor bundle
//!     sandbox.log, sandbox.log.1  its output, written by the manager (see `output`)
//! ```
//!
//! Everything the Router and the Workload Manager connect to or open lives in `private/`, which
//! the sandbox cannot see. The only thing taken from `run/` is a socket, by `rename` (which never
//! follows a symlink) and checked to be a socket afterwards: a symlink planted by sandbox code is
//! refused and nothing is ever sent to it.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

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
}

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
        Self {
            ws: dir.join("ws"),
            run: dir.join("run"),
            dir,
            private: state.join("private").join(name),
        }
    }

    /// Where the host reaches a socket of this sandbox (after [`claim_socket`]).
    pub fn socket(&self, file: &str) -> PathBuf {
        self.private.join(file)
    }

    /// The sandbox's log (its launcher's stdout and stderr).
    pub fn log(&self) -> PathBuf {
        self.private.join("sandbox.log")
    }

    /// Creates the sandbox's directories: its own ones owned by `uid` (when running as root),
    /// the private one by the manager; all 0700.
    pub fn create(&self, uid: Option<u32>) -> io::Result<()> {
        for d in [&self.dir, &self.ws, &self.run] {
            mkdir_private(d)?;
            if let Some(uid) = uid {
                std::os::unix::fs::chown(d, Some(uid), Some(uid))?;
            }
        }
        mkdir_private(&self.private)
    }

    /// Deletes both directories. Never follows a symlink (`remove_dir_all` works on directory
    /// fds); directories the sandbox made unreadable are opened up first when not root.
    pub async fn remove(&self) {
        for d in [&self.dir, &self.private] {
            // Without cgroups, a process of the sandbox may outlive its launcher by a moment
            // (the kernel kills a pid namespace when its init goes): retry briefly.
            let last = super::retry::until_ok(|| {
                let dir = d.clone();
                async move {
                    match tokio::task::spawn_blocking(move || remove_tree(&dir)).await {
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

fn mkdir_private(d: &Path) -> io::Result<()> {
    match std::fs::DirBuilder::new().mode(0o700).create(d) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700))
        }
        Err(e) => Err(e),
    }
}

/// `remove_dir_all` (which works on directory fds and never follows a symlink), retried once
/// after giving the owner rwx on every directory below `dir`: a sandbox running as our own uid
/// may `chmod 000` its directories.
pub fn remove_tree(dir: &Path) -> io::Result<()> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(_) => {
            if let Ok(fd) = open_dir_path(nix::fcntl::AT_FDCWD, dir) {
                open_up(&fd);
            }
            match std::fs::remove_dir_all(dir) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            }
        }
    }
}

fn open_dir_path<Fd: AsFd, P: ?Sized + nix::NixPath>(at: Fd, name: &P) -> nix::Result<OwnedFd> {
    use nix::fcntl::OFlag;
    nix::fcntl::openat(
        at,
        name,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
}

/// Gives the owner rwx on the directory `fd` and every directory below it. Directories are
/// reached from their parent's fd with `O_NOFOLLOW`, and chmod-ed through `/proc/self/fd` (the
/// open inode itself), so a symlink swapped in is never followed.
fn open_up(fd: &OwnedFd) {
    let by_fd = format!("/proc/self/fd/{}", fd.as_raw_fd());
    if let Ok(meta) = std::fs::metadata(&by_fd) {
        let mode = meta.permissions().mode() | 0o700;
        let _ = std::fs::set_permissions(&by_fd, std::fs::Permissions::from_mode(mode));
    }
    let flags = nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_DIRECTORY;
    let Ok(listing) = nix::fcntl::openat(fd, ".", flags, nix::sys::stat::Mode::empty()) else {
        return;
    };
    let Ok(mut dir) = nix::dir::Dir::from_fd(listing) else {
        return;
    };
    let names: Vec<std::ffi::CString> = dir
        .iter()
        .flatten()
        .filter(|e| !matches!(e.file_name().to_bytes(), b"." | b".."))
        .filter(|e| matches!(e.file_type(), Some(nix::dir::Type::Directory) | None))
        .map(|e| e.file_name().to_owned())
        .collect();
    for name in names {
        if let Ok(child) = open_dir_path(fd, name.as_c_str()) {
            open_up(&child);
        }
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

/// Takes the state directory (made by [`trusted_state_dir`]) for this manager: an exclusive lock
/// on `<state>/lock`, held while the returned file is open (the kernel drops it when the process
/// dies, so a crash never leaves it behind). A second manager on the same directory would take the first one's sandboxes for a
/// crashed predecessor's and remove them. The holder's pid is written into the file, for the
/// refusal's message.
pub fn lock_state(state: &Path) -> Result<std::fs::File, String> {
    use std::io::{Read, Seek, Write};
    use std::os::unix::fs::OpenOptionsExt;
    let path = state.join("lock");
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
        .open(&path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
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

/// Takes a socket PicoD bound in the sandbox's `run/` into `private/`: a `rename` (the entry
/// itself moves, a symlink is not followed), then a check that what arrived is a socket. Returns
/// `Ok(false)` while PicoD has not said it listens (its `<file>.ready` marker): under gVisor a
/// `bind` is more than one step on the host, and a move in between failed PicoD's start with
/// ENOENT. The marker only says when; what is moved is checked all the same.
pub fn claim_socket(paths: &SandboxPaths, file: &str) -> io::Result<bool> {
    let (from, to) = (paths.run.join(file), paths.private.join(file));
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
        remove_tree(&paths.dir).unwrap();
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
