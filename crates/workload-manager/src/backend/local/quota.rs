//! Workspace quotas: each sandbox's workspace is a filesystem of its own, an ext4 image of the
//! quota's size in the manager's private directory, its blocks reserved on the host's disk when
//! the sandbox is made ([`reserve`]).
//! The launcher mounts it (`nodev,nosuid`) on the workspace directory inside a mount namespace of
//! its own (see `launch::WorkspaceFs`): the host's mount table never holds it, and it goes —
//! loop device included — with the sandbox's last process, even if the manager is killed. A full
//! workspace is `ENOSPC` inside that sandbox and nothing else. Needs root (mount); without it
//! workspaces are plain host directories, unbounded.

use std::path::{Path, PathBuf};

use super::launch::WorkspaceFs;
use super::layout::SandboxPaths;
use super::tools::{run, system_tool};
use crate::backend::BackendError;

/// The tools, found at start, and whether images are memory.
#[derive(Debug, Clone)]
pub struct Quotas {
    mkfs: PathBuf,
    unshare: PathBuf,
    mount: PathBuf,
    /// The state directory (where the images are) is tmpfs: images stay sparse ([`reserve`]).
    on_memory: bool,
    /// What reservations leave free on the images' filesystem.
    host_share: DiskReserve,
    /// Taken by each reservation from its first look at the free space to its last, so that
    /// creates arriving together see each other's reservations whole and are never refused
    /// for one that is being given back.
    reserving: std::sync::Arc<tokio::sync::Mutex<()>>,
}

/// The disk space workspace reservations leave free for the host (its logs, the store, the next
/// image) on the filesystem holding the images: a percentage of that filesystem (`5%`, the
/// default) or a quantity (`20Gi`); `0` leaves nothing (the manager runs as root: the last
/// block, root's own reserve included).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskReserve {
    /// Percent of the filesystem's size, 0–90.
    Percent(u8),
    Bytes(u64),
}

impl Default for DiskReserve {
    fn default() -> Self {
        Self::Percent(5)
    }
}

impl DiskReserve {
    /// The bytes it keeps on a filesystem of `total` bytes.
    fn of(self, total: u64) -> u64 {
        match self {
            Self::Percent(p) => total / 100 * u64::from(p),
            Self::Bytes(b) => b,
        }
    }
}

impl std::str::FromStr for DiskReserve {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().strip_suffix('%') {
            Some(p) => match p.trim().parse::<u8>() {
                Ok(p) if p <= 90 => Ok(Self::Percent(p)),
                _ => Err(format!(
                    "{s:?}: a whole percentage of the disk from 0% to 90%, or a quantity such as 20Gi"
                )),
            },
            None => super::quantity::bytes(s)
                .map(Self::Bytes)
                .map_err(|e| format!("{e} (or a percentage of the disk such as 5%)")),
        }
    }
}

impl std::fmt::Display for DiskReserve {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Percent(p) => write!(f, "{p}% of the disk"),
            Self::Bytes(b) => f.write_str(&super::human_bytes(*b)),
        }
    }
}

const IMAGE: &str = "workspace.ext4";

impl Quotas {
    /// The quota tools for images kept under `state`, or why workspaces cannot be bounded here.
    /// Warns when `state` is on tmpfs: images there are the host's memory, outside every
    /// sandbox's memory limit (each up to its workspace quota).
    pub fn detect(state: &Path, host_share: DiskReserve) -> Result<Self, String> {
        if !nix::unistd::Uid::effective().is_root() {
            return Err(
                "workspace quotas need root (a loop-mounted filesystem per sandbox)".into(),
            );
        }
        Ok(Self {
            mkfs: system_tool("mkfs.ext4", "e2fsprogs")?,
            unshare: system_tool("unshare", "util-linux")?,
            mount: system_tool("mount", "mount")?,
            on_memory: on_memory(state),
            host_share,
            reserving: Default::default(),
        })
    }

    /// The workspace image of `paths`, `bytes` large and reserved on the host's disk; formatted
    /// next by [`Self::format`] (while the launcher starts: see `launch`'s prologue).
    pub async fn image(
        &self,
        paths: &SandboxPaths,
        bytes: u64,
    ) -> Result<WorkspaceFs, BackendError> {
        let image = paths.private.join(IMAGE);
        let file = std::fs::File::create(&image)
            .map_err(|e| BackendError::Failed(format!("workspace quota (image): {e}")))?;
        let _turn = self.reserving.lock().await;
        reserve(&file, bytes, self.on_memory, self.host_share)?;
        Ok(WorkspaceFs {
            image,
            unshare: self.unshare.clone(),
            mount: self.mount.clone(),
        })
    }

    /// Makes the filesystem on `fs`'s image, its root owned by `uid`.
    pub async fn format(&self, fs: &WorkspaceFs, uid: Option<u32>) -> Result<(), BackendError> {
        let owner = uid.unwrap_or(0);
        // No journal, no resize reserve, no discard pass, an inode per 32 KiB: a scratch
        // filesystem made in ~5 ms whatever its size.
        let extended = format!("nodiscard,root_owner={owner}:{owner}");
        let image_arg = fs.image.display().to_string();
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
        .map_err(|e| BackendError::Failed(format!("workspace quota (mkfs.ext4): {e}")))
    }
}

/// Whether `state` is on tmpfs, warned about: workspace images there are host memory.
fn on_memory(state: &Path) -> bool {
    use nix::sys::statfs::{TMPFS_MAGIC, statfs};
    let tmpfs = statfs(state).is_ok_and(|fs| fs.filesystem_type() == TMPFS_MAGIC);
    if tmpfs {
        tracing::warn!(
            state_dir = %state.display(),
            "the state directory is on tmpfs: sandbox workspaces there are host memory, outside \
             their memory limits (up to each one's workspace quota): put --state-dir on a disk"
        );
    }
    tmpfs
}

/// Reserves the image's `bytes` on the host's disk (`fallocate`): every write inside the
/// workspace then has its place, and a workspace the disk cannot hold, with `host_share` of it
/// left to the host ([`left_for_the_host`]), is refused now (429, saying how much is free)
/// rather than losing writes later — a sparse image on a full host disk fails its writes only
/// at writeback, after the sandbox's `write` succeeded (the kernel logs "potential data loss").
/// On a filesystem without `fallocate`, and `on_memory` (tmpfs, where the reservation would be
/// host memory), the image stays sparse.
fn reserve(
    file: &std::fs::File,
    bytes: u64,
    on_memory: bool,
    host_share: DiskReserve,
) -> Result<(), BackendError> {
    let sparse = |file: &std::fs::File| {
        file.set_len(bytes)
            .map_err(|e| BackendError::Failed(format!("workspace quota (image size): {e}")))
    };
    if on_memory {
        return sparse(file);
    }
    let len = i64::try_from(bytes).unwrap_or(i64::MAX);
    let too_little = |free: u64| {
        BackendError::Exhausted(format!(
            "not enough disk for the sandbox's workspace ({}; {} MiB free where the Workload \
             Manager keeps workspaces, of which {host_share} stays the host's, \
             --disk-reserve): lower resources.limits.ephemeral-storage (or \
             --default-workspace-size), or retry once sessions have ended",
            super::human_bytes(bytes),
            free >> 20,
        ))
    };
    // Refused before reserving when it cannot fit: a reservation that fails part-way takes the
    // disk to its last block for a moment, failing whatever else writes there.
    if let Some((free, share)) = left_for_the_host(file, host_share)
        && free < share.saturating_add(bytes)
    {
        return Err(too_little(free));
    }
    match nix::fcntl::fallocate(file, nix::fcntl::FallocateFlags::empty(), 0, len) {
        // Looked at again once reserved: another program may have written meanwhile.
        Ok(()) => match left_for_the_host(file, host_share) {
            Some((free, share)) if free < share => {
                let _ = file.set_len(0);
                Err(too_little(free + bytes))
            }
            _ => Ok(()),
        },
        Err(nix::errno::Errno::ENOSPC) => {
            // What a failed `fallocate` did allocate stays allocated: given back now.
            let _ = file.set_len(0);
            let free = left_for_the_host(file, host_share).map_or(0, |(free, _)| free);
            Err(too_little(free))
        }
        Err(nix::errno::Errno::EOPNOTSUPP) => sparse(file),
        Err(e) => Err(BackendError::Failed(format!(
            "workspace quota (reserving {}): {e}",
            super::human_bytes(bytes)
        ))),
    }
}

/// What an unprivileged writer may still take on `file`'s filesystem, and the share of it that
/// workspace reservations leave to the host (`--disk-reserve`, 5% of the filesystem by default).
/// The manager runs as root and would otherwise fill the disk to its last block, root's own
/// reserve included.
fn left_for_the_host(file: &std::fs::File, host_share: DiskReserve) -> Option<(u64, u64)> {
    let st = nix::sys::statvfs::fstatvfs(file).ok()?;
    let block = st.fragment_size();
    Some((
        st.blocks_available() * block,
        host_share.of(st.blocks() * block),
    ))
}

#[cfg(test)]
mod tests {
    use super::DiskReserve;

    #[test]
    fn a_disk_reserve_is_a_percentage_or_a_quantity() {
        assert_eq!("5%".parse(), Ok(DiskReserve::Percent(5)));
        assert_eq!("0".parse(), Ok(DiskReserve::Bytes(0)));
        assert_eq!("20Gi".parse(), Ok(DiskReserve::Bytes(20 << 30)));
        assert_eq!(DiskReserve::Percent(5).of(1000 << 20), 50 << 20);
        assert_eq!(DiskReserve::Bytes(7).of(1000), 7);
        for bad in ["91%", "-1%", "5.5%", "%", "lots", "-3Gi"] {
            let err = bad.parse::<DiskReserve>().unwrap_err();
            assert!(err.contains("percentage"), "{bad}: {err}");
        }
        assert_eq!(DiskReserve::Percent(5).to_string(), "5% of the disk");
        assert_eq!(DiskReserve::Bytes(20 << 30).to_string(), "20Gi");
    }
}
