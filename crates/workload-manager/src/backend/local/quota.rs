//! Workspace quotas: each sandbox's workspace is a filesystem of its own, an ext4 image of the
//! quota's size (sparse: it takes host disk only as it fills) in the manager's private directory.
//! The launcher mounts it (`nodev,nosuid`) on the workspace directory inside a mount namespace of
//! its own (see `launch::WorkspaceFs`): the host's mount table never holds it, and it goes —
//! loop device included — with the sandbox's last process, even if the manager is killed. A full
//! workspace is `ENOSPC` inside that sandbox and nothing else. Needs root (mount); without it
//! workspaces are plain host directories, unbounded.

use std::path::PathBuf;

use super::launch::WorkspaceFs;
use super::layout::SandboxPaths;
use super::tools::{run, system_tool};
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
        Ok(Self {
            mkfs: system_tool("mkfs.ext4", "e2fsprogs")?,
            unshare: system_tool("unshare", "util-linux")?,
            mount: system_tool("mount", "mount")?,
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
        let image_arg = image.display().to_string();
        run(
            &self.mkfs,
            vec![
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
                &image_arg,
            ],
            None,
        )
        .await
        .map_err(|e| fail("mkfs.ext4", e.to_string()))?;
        Ok(WorkspaceFs {
            image,
            unshare: self.unshare.clone(),
            mount: self.mount.clone(),
        })
    }
}
