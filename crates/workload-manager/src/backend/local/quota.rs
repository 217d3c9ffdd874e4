//! Workspace quotas: each sandbox's workspace is a filesystem of its own, an ext4 image of the
//! quota's size (sparse: it takes host disk only as it fills) in the manager's private directory.
//! The launcher mounts it (`nodev,nosuid`) on the workspace directory inside a mount namespace of
//! its own (see `launch::WorkspaceFs`): the host's mount table never holds it, and it goes —
//! loop device included — with the sandbox's last process, even if the manager is killed. A full
//! workspace is `ENOSPC` inside that sandbox and nothing else. Needs root (mount); without it
//! workspaces are plain host directories, unbounded.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use super::launch::WorkspaceFs;
use super::layout::SandboxPaths;
use crate::backend::BackendError;

/// The tools, found at start.
#[derive(Debug, Clone)]
pub struct Quotas {
    mkfs: PathBuf,
    unshare: PathBuf,
    mount: PathBuf,
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
            unshare: find("unshare", "util-linux")?,
            mount: find("mount", "mount")?,
        })
    }

    /// Makes the workspace filesystem of `paths`: `bytes` large, its root owned by `uid`.
    pub async fn prepare(
        &self,
        paths: &SandboxPaths,
        bytes: u64,
        uid: Option<u32>,
    ) -> Result<WorkspaceFs, BackendError> {
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
        Ok(WorkspaceFs {
            image,
            unshare: self.unshare.clone(),
            mount: self.mount.clone(),
        })
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
