//! The workspace jail: every user path is resolved here, race-free, beneath the workspace.
//!
//! Upstream semantics (spec §5.6, §10 item 10): absolute paths are workspace-relative (`/tmp/x` is
//! `<ws>/tmp/x`); a relative path that climbs above the workspace is refused. Beyond upstream:
//!
//! - Resolution walks the path one component at a time from a directory file descriptor of the
//!   workspace (`openat` with `O_NOFOLLOW`, `readlinkat`), never through a path string the
//!   sandbox could swap between a check and a use. Symlinks are followed only while they stay
//!   inside (an absolute target must name the workspace as PicoD sees it); `..` above the root,
//!   a target outside, or a loop is refused.
//! - The final open is made on the directory fd with `O_NOFOLLOW | O_NONBLOCK`, then `fstat`-ed:
//!   a FIFO, socket or device is refused and never waited on, so a `mkfifo` cannot wedge PicoD.
//! - NUL bytes and over-long paths are refused up front.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag, openat, readlinkat};
use nix::sys::stat::{FileStat, Mode, SFlag, fstat, fstatat, mkdirat};
use nix::unistd::ftruncate;

/// Longest path accepted (Linux `PATH_MAX`).
pub const MAX_PATH_BYTES: usize = 4096;
/// Symlinks followed in one resolution before it is called a loop (Linux `MAXSYMLINKS`).
const MAX_SYMLINKS: usize = 40;

/// Why a path was refused.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    /// The path would leave the workspace.
    #[error("path {0:?} escapes the workspace")]
    Escape(String),
    /// A NUL byte, an over-long path or component.
    #[error("{0}")]
    BadPath(String),
    /// Nothing there.
    #[error("no such file or directory: {0}")]
    NotFound(String),
    /// A directory where a file was expected.
    #[error("Path is a directory, not a file")]
    IsDirectory,
    /// A file where a directory was expected.
    #[error("{0} is not a directory")]
    NotADirectory(String),
    /// A FIFO, socket or device: never opened for reading or writing.
    #[error("{0} is not a regular file (FIFOs, sockets and devices are refused)")]
    Special(String),
    /// Filesystem error while resolving.
    #[error("{0}")]
    Io(#[from] io::Error),
}

impl From<Errno> for JailError {
    fn from(e: Errno) -> Self {
        match e {
            Errno::ENAMETOOLONG => Self::BadPath("file name too long".into()),
            other => Self::Io(io::Error::from(other)),
        }
    }
}

/// The sandbox's workspace root: its canonical path and a directory fd every walk starts from.
#[derive(Debug, Clone)]
pub struct Workspace {
    root: PathBuf,
    root_fd: Arc<OwnedFd>,
    /// `/proc/self/fd` exists, so a directory fd can serve as a race-free working directory.
    proc_fds: bool,
    /// The process's working directory is the root ([`Workspace::enter`]).
    entered: bool,
}

/// Where a walk ended: an open directory, and the final component in it (`None`: the directory
/// itself). `rel` is the logical path from the root, symlinks resolved.
#[derive(Debug)]
pub struct Target {
    dir: OwnedFd,
    name: Option<OsString>,
    rel: PathBuf,
}

/// A directory a command may run in, kept open until the command has started.
#[derive(Debug)]
pub struct WorkDir {
    _fd: OwnedFd,
    /// What to pass as the working directory: `/proc/self/fd/N` (the open directory itself), or
    /// the real path where `/proc` is not mounted; `None`: the process's own, which is the
    /// workspace root ([`Workspace::enter`]).
    pub path: Option<PathBuf>,
}

impl WorkDir {
    /// Sets the command's working directory (unless it is the process's own).
    pub fn apply(&self, cmd: &mut tokio::process::Command) {
        if let Some(p) = &self.path {
            cmd.current_dir(p);
        }
    }
}

fn dir_flags() -> OFlag {
    OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC
}

fn kind(st: &FileStat) -> SFlag {
    SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits())
}

/// The user path as components, cleaned lexically like Go's `filepath.Clean` (`/..` is `/`; a
/// relative path may not climb out).
fn clean(user: &str) -> Result<Vec<OsString>, JailError> {
    if user.contains('\0') {
        return Err(JailError::BadPath("path contains a NUL byte".into()));
    }
    if user.len() > MAX_PATH_BYTES {
        return Err(JailError::BadPath(format!(
            "path longer than {MAX_PATH_BYTES} bytes"
        )));
    }
    let absolute = user.starts_with('/');
    let mut parts: Vec<OsString> = Vec::new();
    for c in Path::new(user).components() {
        match c {
            Component::RootDir | Component::Prefix(_) | Component::CurDir => {}
            Component::ParentDir => {
                if parts.pop().is_none() && !absolute {
                    return Err(JailError::Escape(user.to_string()));
                }
            }
            Component::Normal(p) => parts.push(p.to_os_string()),
        }
    }
    Ok(parts)
}

impl Workspace {
    /// Creates the directory if needed, canonicalises it and opens it.
    pub fn new(dir: &Path) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let root = dir.canonicalize()?;
        let root_fd = openat(nix::fcntl::AT_FDCWD, &root, dir_flags(), Mode::empty())?;
        Ok(Self {
            root,
            root_fd: Arc::new(root_fd),
            proc_fds: Path::new("/proc/self/fd").is_dir(),
            entered: false,
        })
    }

    /// Makes the root this process's working directory (by its fd: the directory opened at
    /// start, wherever it is renamed to), so commands in the root inherit it.
    pub fn enter(&mut self) -> io::Result<()> {
        nix::unistd::fchdir(&*self.root_fd)?;
        self.entered = true;
        Ok(())
    }

    /// The canonical root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The path relative to the root, as upstream reports it (`"."` for the root itself).
    pub fn relative(rel: &Path) -> String {
        if rel.as_os_str().is_empty() {
            ".".into()
        } else {
            rel.to_string_lossy().into_owned()
        }
    }

    /// Walks `user` beneath the root. Every directory on the way is opened from its parent's fd
    /// with `O_NOFOLLOW`; symlinks are read and expanded by hand, only inside. Missing
    /// intermediate directories are created (0755) when `create` is set.
    pub fn walk(&self, user: &str, create: bool) -> Result<Target, JailError> {
        let escape = || JailError::Escape(user.to_string());
        let mut pending: std::collections::VecDeque<OsString> = clean(user)?.into();
        // Open directories from the root down, with their names.
        let mut stack: Vec<(OwnedFd, OsString)> = Vec::new();
        let mut links = 0;
        while let Some(comp) = pending.pop_front() {
            let cur = stack
                .last()
                .map_or(self.root_fd.as_fd(), |(fd, _)| fd.as_fd());
            if comp == ".." {
                stack.pop().ok_or_else(escape)?;
                continue;
            }
            if comp.is_empty() || comp == "." {
                continue;
            }
            let last = pending.is_empty();
            match fstatat(
                cur,
                comp.as_os_str(),
                nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
            ) {
                Err(Errno::ENOENT) if last => return self.target(stack, Some(comp)),
                Err(Errno::ENOENT) if create => {
                    match mkdirat(cur, comp.as_os_str(), Mode::from_bits_truncate(0o755)) {
                        Ok(()) | Err(Errno::EEXIST) => {}
                        Err(e) => return Err(e.into()),
                    }
                    let fd = openat(cur, comp.as_os_str(), dir_flags(), Mode::empty())
                        .map_err(|e| self.raced(e, &comp))?;
                    stack.push((fd, comp));
                }
                Err(Errno::ENOENT) => return Err(JailError::NotFound(user.to_string())),
                Err(e) => return Err(e.into()),
                Ok(st) if kind(&st) == SFlag::S_IFLNK => {
                    links += 1;
                    if links > MAX_SYMLINKS {
                        return Err(escape());
                    }
                    let target = PathBuf::from(readlinkat(cur, comp.as_os_str())?);
                    if target.is_absolute() {
                        // Absolute targets mean what they mean inside the sandbox: only ones
                        // under the workspace root are followed, from the root.
                        let inside = target.strip_prefix(&self.root).map_err(|_| escape())?;
                        stack.clear();
                        prepend(&mut pending, inside);
                    } else {
                        prepend(&mut pending, &target);
                    }
                }
                Ok(_) if last => return self.target(stack, Some(comp)),
                Ok(st) if kind(&st) == SFlag::S_IFDIR => {
                    let fd = openat(cur, comp.as_os_str(), dir_flags(), Mode::empty())
                        .map_err(|e| self.raced(e, &comp))?;
                    stack.push((fd, comp));
                }
                Ok(_) => return Err(JailError::NotADirectory(comp.to_string_lossy().into())),
            }
        }
        self.target(stack, None)
    }

    /// An entry changed between `fstatat` and `openat` (swapped for a symlink or a file): refuse.
    fn raced(&self, e: Errno, comp: &OsStr) -> JailError {
        match e {
            Errno::ELOOP | Errno::ENOTDIR => JailError::Escape(comp.to_string_lossy().into_owned()),
            other => other.into(),
        }
    }

    fn target(
        &self,
        stack: Vec<(OwnedFd, OsString)>,
        name: Option<OsString>,
    ) -> Result<Target, JailError> {
        let mut rel: PathBuf = stack.iter().map(|(_, n)| n.as_os_str()).collect();
        if let Some(n) = &name {
            rel.push(n);
        }
        let dir = match stack.into_iter().last() {
            Some((fd, _)) => fd,
            None => self.root_fd.try_clone()?,
        };
        Ok(Target { dir, name, rel })
    }

    /// Opens a regular file for reading (downloads). Refuses directories and special files.
    pub fn open_read(&self, user: &str) -> Result<(File, PathBuf), JailError> {
        let t = self.walk(user, false)?;
        let name = t.name.as_deref().ok_or(JailError::IsDirectory)?;
        let flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_NOCTTY;
        let fd = match openat(&t.dir, name, flags | OFlag::O_CLOEXEC, Mode::empty()) {
            Ok(fd) => fd,
            Err(Errno::ENOENT) => return Err(JailError::NotFound(user.to_string())),
            Err(Errno::ELOOP) => return Err(JailError::Escape(user.to_string())),
            // A socket cannot be opened at all.
            Err(Errno::ENXIO) => return Err(JailError::Special(Workspace::relative(&t.rel))),
            Err(e) => return Err(e.into()),
        };
        let st = fstat(&fd)?;
        match kind(&st) {
            SFlag::S_IFREG => {}
            SFlag::S_IFDIR => return Err(JailError::IsDirectory),
            _ => return Err(JailError::Special(Workspace::relative(&t.rel))),
        }
        blocking(&fd)?;
        Ok((File::from(fd), t.rel))
    }

    /// Opens a directory for listing.
    pub fn open_dir(&self, user: &str) -> Result<(OwnedFd, PathBuf), JailError> {
        let t = self.walk(user, false)?;
        let name: &OsStr = t.name.as_deref().unwrap_or(OsStr::new("."));
        let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        match openat(&t.dir, name, flags, Mode::empty()) {
            Ok(fd) => Ok((fd, t.rel)),
            Err(Errno::ENOENT) => Err(JailError::NotFound(user.to_string())),
            Err(Errno::ENOTDIR) => Err(JailError::NotADirectory(Workspace::relative(&t.rel))),
            Err(Errno::ELOOP) => Err(JailError::Escape(user.to_string())),
            Err(e) => Err(e.into()),
        }
    }

    /// Creates or truncates a regular file for writing (uploads), creating missing parents.
    /// `mode` applies only when the file is created, as upstream.
    pub fn create_file(&self, user: &str, mode: u32) -> Result<(File, PathBuf), JailError> {
        let t = self.walk(user, true)?;
        let name = t.name.as_deref().ok_or(JailError::IsDirectory)?;
        let flags = OFlag::O_WRONLY
            | OFlag::O_CREAT
            | OFlag::O_NOFOLLOW
            | OFlag::O_NONBLOCK
            | OFlag::O_NOCTTY
            | OFlag::O_CLOEXEC;
        let fd = match openat(&t.dir, name, flags, Mode::from_bits_truncate(mode)) {
            Ok(fd) => fd,
            Err(Errno::EISDIR) => return Err(JailError::IsDirectory),
            Err(Errno::ELOOP) => return Err(JailError::Escape(user.to_string())),
            // A FIFO nobody reads: opening it for writing would block.
            Err(Errno::ENXIO) => return Err(JailError::Special(Workspace::relative(&t.rel))),
            Err(e) => return Err(e.into()),
        };
        match kind(&fstat(&fd)?) {
            SFlag::S_IFREG => {}
            _ => return Err(JailError::Special(Workspace::relative(&t.rel))),
        }
        ftruncate(&fd, 0)?;
        blocking(&fd)?;
        Ok((File::from(fd), t.rel))
    }

    /// A new, hidden file beside `user` (created with `mode`, missing parents too) that takes
    /// `user`'s place only when [`Staged::commit`]ted: a streamed upload cut short leaves the old
    /// file as it was, and its staging file is removed when the [`Staged`] is dropped.
    pub fn stage_file(&self, user: &str, mode: u32) -> Result<(File, Staged), JailError> {
        let t = self.walk(user, true)?;
        let name = t.name.clone().ok_or(JailError::IsDirectory)?;
        // Refused now rather than after the whole body (the rename checks again).
        if fstatat(
            &t.dir,
            name.as_os_str(),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .is_ok_and(|st| kind(&st) == SFlag::S_IFDIR)
        {
            return Err(JailError::IsDirectory);
        }
        let flags = OFlag::O_WRONLY
            | OFlag::O_CREAT
            | OFlag::O_EXCL
            | OFlag::O_NOFOLLOW
            | OFlag::O_NOCTTY
            | OFlag::O_CLOEXEC;
        let mut staging = OsString::from(".");
        staging.push(&name);
        staging.push(format!(".upload-{}", crate::process::random_id()));
        let fd = openat(
            &t.dir,
            staging.as_os_str(),
            flags,
            Mode::from_bits_truncate(mode),
        )?;
        // The umask does not narrow what was asked for, as it does not for `chmod`.
        nix::sys::stat::fchmod(&fd, Mode::from_bits_truncate(mode))?;
        let staged = Staged {
            dir: t.dir,
            staging: Some(staging),
            name,
            rel: t.rel,
        };
        Ok((File::from(fd), staged))
    }

    /// Unlinks a file (never a directory; a symlink itself, not its target).
    pub fn remove_file(&self, user: &str) -> Result<(), JailError> {
        let t = self.walk(user, false)?;
        let name = t.name.as_deref().ok_or(JailError::IsDirectory)?;
        nix::unistd::unlinkat(&t.dir, name, nix::unistd::UnlinkatFlags::NoRemoveDir)?;
        Ok(())
    }

    /// A working directory for a command (created if missing), pinned by an open fd.
    pub fn work_dir(&self, user: &str) -> Result<WorkDir, JailError> {
        let t = self.walk(user, true)?;
        let fd = match &t.name {
            None => t.dir,
            Some(name) => {
                match mkdirat(&t.dir, name.as_os_str(), Mode::from_bits_truncate(0o755)) {
                    Ok(()) | Err(Errno::EEXIST) => {}
                    Err(e) => return Err(e.into()),
                }
                openat(&t.dir, name.as_os_str(), dir_flags(), Mode::empty()).map_err(
                    |e| match e {
                        Errno::ENOTDIR => JailError::NotADirectory(Workspace::relative(&t.rel)),
                        other => self.raced(other, name),
                    },
                )?
            }
        };
        let path = if self.entered && t.name.is_none() && t.rel.as_os_str().is_empty() {
            None
        } else if self.proc_fds {
            Some(PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd())))
        } else {
            Some(self.root.join(&t.rel))
        };
        Ok(WorkDir { _fd: fd, path })
    }
}

/// A file being written beside its final name (see [`Workspace::stage_file`]).
#[derive(Debug)]
pub struct Staged {
    dir: OwnedFd,
    /// `None` once committed.
    staging: Option<OsString>,
    name: OsString,
    rel: PathBuf,
}

impl Staged {
    /// Puts the staged file in place (replacing a file or symlink there; never a directory) and
    /// returns its path from the workspace root.
    pub fn commit(mut self) -> Result<PathBuf, JailError> {
        let staging = self.staging.as_deref().unwrap_or_default();
        // On failure the staged file stays staged, and goes with `self` (`Drop`).
        nix::fcntl::renameat(&self.dir, staging, &self.dir, self.name.as_os_str()).map_err(
            |e| match e {
                Errno::EISDIR | Errno::ENOTEMPTY | Errno::EEXIST => JailError::IsDirectory,
                other => other.into(),
            },
        )?;
        self.staging = None;
        Ok(std::mem::take(&mut self.rel))
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if let Some(staging) = &self.staging {
            let _ = nix::unistd::unlinkat(
                &self.dir,
                staging.as_os_str(),
                nix::unistd::UnlinkatFlags::NoRemoveDir,
            );
        }
    }
}

/// Pushes the components of `path` in front of `pending`, in order.
fn prepend(pending: &mut std::collections::VecDeque<OsString>, path: &Path) {
    let parts: Vec<OsString> = path
        .components()
        .filter_map(|c| match c {
            Component::Normal(p) => Some(p.to_os_string()),
            Component::ParentDir => Some("..".into()),
            _ => None,
        })
        .collect();
    for p in parts.into_iter().rev() {
        pending.push_front(p);
    }
}

/// Clears `O_NONBLOCK` (set only so that opening could not block).
fn blocking(fd: &OwnedFd) -> Result<(), JailError> {
    let flags = OFlag::from_bits_truncate(nix::fcntl::fcntl(fd, FcntlArg::F_GETFL)?);
    nix::fcntl::fcntl(fd, FcntlArg::F_SETFL(flags - OFlag::O_NONBLOCK))?;
    Ok(())
}

#[cfg(test)]
mod tests;
