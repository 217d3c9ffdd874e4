//! The host mounts the local backend makes (each sandbox's run directory, as root; see
//! [`super::layout`]) and the mount table it reads to find what a crashed predecessor left.

use std::io;
use std::path::{Path, PathBuf};

use nix::mount::MsFlags;

/// Mounts a tmpfs with `options` (`size=…`) at `at`: no set-uid, devices or executables.
pub fn tmpfs(at: &Path, options: &str) -> io::Result<()> {
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    nix::mount::mount(Some("tmpfs"), at, Some("tmpfs"), flags, Some(options))?;
    Ok(())
}

/// Binds the directory `from` at `at`.
pub fn bind(from: &Path, at: &Path) -> io::Result<()> {
    nix::mount::mount(Some(from), at, None::<&str>, MsFlags::MS_BIND, None::<&str>)?;
    Ok(())
}

/// Detaches the mount at `at`, if there is one (best effort: a path that is no mount point is
/// left as it is).
pub fn detach(at: &Path) {
    let _ = nix::mount::umount2(
        at,
        nix::mount::MntFlags::MNT_DETACH | nix::mount::MntFlags::UMOUNT_NOFOLLOW,
    );
}

/// A mount point as `/proc/self/mountinfo` writes it, with its octal escapes (`\040` for a
/// space, and tab, newline, backslash) undone.
fn unescape_mount_point(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match (bytes[i], octal) {
            (b'\\', Some(d)) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The mount points strictly below `dir`, as `/proc/self/mountinfo` lists them.
pub fn mounted_below(dir: &Path) -> Vec<PathBuf> {
    let Ok(table) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    table
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape_mount_point(p)))
        .filter(|p| p.starts_with(dir) && p != dir)
        .collect()
}
