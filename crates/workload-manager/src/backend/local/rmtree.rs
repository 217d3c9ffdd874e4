//! Removing a directory tree a sandbox wrote (its directories, a partial image), whatever shape
//! the sandbox gave it.
//!
//! std's `remove_dir_all` recurses on the stack once per level: a sandbox that nests directories
//! 100,000 deep (a loop of `mkdir a; cd a` gets past `PATH_MAX`) overflowed the removing thread's
//! stack, and the overflow aborts the whole manager — at the sandbox's teardown, and again at
//! each restart's clean-up of what the crashed one left. [`remove_tree`] walks the tree with a
//! stack of its own on the heap instead, holding two directory descriptors at a time: it goes
//! down by name from a directory's descriptor (`O_NOFOLLOW`), and back up through `..`, checked
//! to be the very directory it came from (device and inode), so a directory renamed meanwhile
//! stops the walk instead of sending it elsewhere. A symlink is removed, never followed.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use nix::dir::{Dir, Type};
use nix::errno::Errno;
use nix::fcntl::{AT_FDCWD, AtFlags, OFlag, openat};
use nix::sys::stat::{Mode, SFlag, fstat, fstatat};
use nix::unistd::{UnlinkatFlags, unlinkat};

/// A directory on the walk's way down: which one it is, the name it has in its parent, and its
/// subdirectories still to remove.
struct Level {
    id: (u64, u64),
    name: Option<CString>,
    pending: Vec<CString>,
}

/// Removes `dir` and everything below it (a file or symlink at `dir` is removed itself; absent
/// is fine). Directories whose owner took away their permissions (`chmod 000`, a sandbox running
/// as the manager's uid) are given back the owner's rwx first. Fails with what stopped it (a
/// directory changed under the walk, entries a live process keeps adding): the callers retry.
pub fn remove_tree(dir: &Path) -> io::Result<()> {
    let top = match open_dir(AT_FDCWD, dir) {
        Ok(fd) => fd,
        Err(Errno::ENOENT) => return Ok(()),
        Err(Errno::ENOTDIR | Errno::ELOOP) => return ignore_absent(std::fs::remove_file(dir)),
        Err(e) => return Err(e.into()),
    };
    let mut stack = vec![Level {
        id: id_of(&top)?,
        name: None,
        pending: empty_but_subdirs(&top)?,
    }];
    let mut cur = top;
    while let Some(level) = stack.last_mut() {
        if let Some(name) = level.pending.pop() {
            match open_dir(&cur, name.as_c_str()) {
                Ok(child) => {
                    let pending = empty_but_subdirs(&child)?;
                    stack.push(Level {
                        id: id_of(&child)?,
                        name: Some(name),
                        pending,
                    });
                    cur = child;
                }
                Err(Errno::ENOENT) => {}
                // Replaced by a file or a symlink since it was listed.
                Err(Errno::ENOTDIR | Errno::ELOOP) => unlink(&cur, &name, false)?,
                Err(e) => return Err(e.into()),
            }
            continue;
        }
        let Some(Level {
            name: Some(name), ..
        }) = stack.pop()
        else {
            break; // `dir` itself is empty now
        };
        let parent = open_dir(&cur, c"..")?;
        let expected = stack.last().map(|l| l.id);
        if Some(id_of(&parent)?) != expected {
            return Err(io::Error::other(format!(
                "{}: a directory was moved while its tree was being removed",
                dir.display()
            )));
        }
        unlink(&parent, &name, true)?;
        cur = parent;
    }
    drop(cur);
    ignore_absent(std::fs::remove_dir(dir))
}

/// Opens directory `name` under `at` for listing, without following a symlink; one its owner
/// may not read is given the owner's rwx back (through an `O_PATH` descriptor of the directory
/// itself, so nothing swapped in meanwhile is changed) and opened again.
fn open_dir<Fd: AsFd, P: ?Sized + nix::NixPath>(at: Fd, name: &P) -> nix::Result<OwnedFd> {
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    match openat(at.as_fd(), name, flags, Mode::empty()) {
        Err(Errno::EACCES) => {
            let path_only =
                OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
            let inode = openat(at, name, path_only, Mode::empty())?;
            owner_rwx(&inode);
            openat(&inode, c".", flags, Mode::empty())
        }
        other => other,
    }
}

/// Removes every entry of the directory `fd` but its subdirectories, and returns their names.
fn empty_but_subdirs(fd: &OwnedFd) -> io::Result<Vec<CString>> {
    // Entries are removed from it next: its owner may have taken away its write permission.
    owner_rwx(fd);
    let mut listing = Dir::from_fd(openat(
        fd,
        c".",
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?)?;
    let mut subdirs = Vec::new();
    let mut others = Vec::new();
    for entry in listing.iter() {
        let entry = entry?;
        let name = entry.file_name();
        if matches!(name.to_bytes(), b"." | b"..") {
            continue;
        }
        let is_dir = match entry.file_type() {
            Some(t) => t == Type::Directory,
            None => is_directory(fd, name)?,
        };
        if is_dir {
            subdirs.push(name.to_owned());
        } else {
            others.push(name.to_owned());
        }
    }
    for name in others {
        unlink(fd, &name, false)?;
    }
    Ok(subdirs)
}

fn is_directory(fd: &OwnedFd, name: &CStr) -> io::Result<bool> {
    match fstatat(fd, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR),
        Err(Errno::ENOENT) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

fn unlink(dir: &OwnedFd, name: &CStr, is_dir: bool) -> io::Result<()> {
    let how = if is_dir {
        UnlinkatFlags::RemoveDir
    } else {
        UnlinkatFlags::NoRemoveDir
    };
    match unlinkat(dir, name, how) {
        Ok(()) | Err(Errno::ENOENT) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

fn id_of(fd: &OwnedFd) -> io::Result<(u64, u64)> {
    let st = fstat(fd)?;
    Ok((st.st_dev, st.st_ino))
}

/// Adds the owner's rwx to the directory `fd` is (an `O_PATH` one too: changed through its
/// `/proc/self/fd` link, the inode itself); best effort.
fn owner_rwx(fd: &OwnedFd) {
    let path = format!("/proc/self/fd/{}", fd.as_raw_fd());
    if let Ok(meta) = std::fs::metadata(&path) {
        let mode = meta.permissions().mode();
        if mode & 0o700 != 0o700 {
            let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode | 0o700));
        }
    }
}

fn ignore_absent(r: io::Result<()>) -> io::Result<()> {
    match r {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests;
