//! Workspace quotas: each sandbox's workspace is a filesystem of its own, an ext4 image of the
//! quota's size (sparse: it takes host disk only as it fills) loop-mounted on the workspace
//! directory (`nodev,nosuid`). A full workspace is `ENOSPC` inside that sandbox and nothing
//! else; the image file sits in the manager's private directory, out of the sandbox's reach.
//! Needs root (mount); without it workspaces are plain host directories, unbounded.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use super::layout::SandboxPaths;
use crate::backend::BackendError;

/// The tools, found at start.
#[derive(Debug, Clone)]
pub struct Quotas {
    mkfs: PathBuf,
    mount: PathBuf,
    umount: PathBuf,
}

const IMAGE: &str = "workspace.ext4";

impl Quotas {
    /// The quota tools, or why workspaces cannot be bounded here.
    pub fn detect() -> Result<Self, String> {
        if !nix::unistd::Uid::effective().is_root() {
            return Err(
                "workspace quotas need root (a loop-mounted filesystem per sandbox)".into(),
            );
        }
        let find = |name: &str, package: &str| {
            ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
                .iter()
                .map(|d| Path::new(d).join(name))
                .find(|p| p.is_file())
                .ok_or(format!(
                    "`{name}` is missing: install the `{package}` package"
                ))
        };
        Ok(Self {
            mkfs: find("mkfs.ext4", "e2fsprogs")?,
            mount: find("mount", "mount")?,
            umount: find("umount", "mount")?,
        })
    }

    /// Makes the workspace of `paths` a filesystem of `bytes`, owned by `uid`.
    pub async fn attach(
        &self,
        paths: &SandboxPaths,
        bytes: u64,
        uid: Option<u32>,
    ) -> Result<(), BackendError> {
        let image = paths.private.join(IMAGE);
        let fail =
            |what: &str, e: String| BackendError::Failed(format!("workspace quota ({what}): {e}"));
        let file = std::fs::File::create(&image).map_err(|e| fail("image", e.to_string()))?;
        file.set_len(bytes)
            .map_err(|e| fail("image size", e.to_string()))?;
        drop(file);
        let owner = uid.unwrap_or(0);
        // No journal, no resize reserve, no discard pass, an inode per 32 KiB: a scratch
        // filesystem made in ~10 ms whatever its size.
        let extended = format!("nodiscard,root_owner={owner}:{owner}");
        run(
            &self.mkfs,
            &[
                "-q",
                "-F",
                "-m",
                "0",
                "-i",
                "32768",
                "-O",
                "^has_journal,^resize_inode",
                "-E",
                &extended,
                &image.display().to_string(),
            ],
        )
        .await
        .map_err(|e| fail("mkfs.ext4", e))?;
        run(
            &self.mount,
            &[
                "-t",
                "ext4",
                "-o",
                "loop,nodev,nosuid,noatime",
                &image.display().to_string(),
                &paths.ws.display().to_string(),
            ],
        )
        .await
        .map_err(|e| fail("mount", e))?;
        // A fresh ext4 has `lost+found`; a workspace starts empty. The root is the sandbox's
        // alone, as the directory it covers.
        let _ = std::fs::remove_dir(paths.ws.join("lost+found"));
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&paths.ws, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| fail("permissions", e.to_string()))?;
        Ok(())
    }

    /// Unmounts a sandbox's workspace (if mounted); its image goes with the private directory.
    pub async fn detach(&self, paths: &SandboxPaths) {
        if is_mounted(&paths.ws) {
            let _ = run(&self.umount, &["-l", &paths.ws.display().to_string()]).await;
        }
    }

    /// Unmounts the workspaces a crashed predecessor left mounted under `state`.
    pub fn remove_leftovers(&self, state: &Path) -> usize {
        let sandboxes = state.join("sandboxes");
        let sandboxes = sandboxes.canonicalize().unwrap_or(sandboxes);
        let left: Vec<PathBuf> = mount_points()
            .into_iter()
            .filter(|m| m.starts_with(&sandboxes))
            .collect();
        for m in &left {
            let _ = std::process::Command::new(&self.umount)
                .arg("-l")
                .arg(m)
                .env_clear()
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        left.len()
    }
}

/// Runs a tool; its stderr is the error.
async fn run(program: &Path, args: &[&str]) -> Result<(), String> {
    let out = tokio::process::Command::new(program)
        .args(args)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| format!("{}: {e}", program.display()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

/// Mount points of this mount namespace (`/proc/self/mountinfo`, octal escapes decoded).
fn mount_points() -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape(p)))
        .collect()
}

fn is_mounted(dir: &Path) -> bool {
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    mount_points().contains(&dir)
}

/// `\040` and friends (mountinfo escapes space, tab, newline and backslash).
fn unescape(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\\' {
            let code: String = chars.by_ref().take(3).collect();
            match u8::from_str_radix(&code, 8) {
                Ok(b) => out.push(b as char),
                Err(_) => {
                    out.push('\\');
                    out.push_str(&code);
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(super::unescape(r"/a\040b/c"), "/a b/c");
        assert_eq!(super::unescape("/plain"), "/plain");
    }
}
