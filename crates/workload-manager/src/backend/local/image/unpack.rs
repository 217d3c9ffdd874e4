//! Layers into a root filesystem (the tar crate does the archive format; this file does the OCI
//! layer rules). Image content is untrusted: entries never land outside the rootfs (tar refuses
//! `..` and parents that resolve outside; whiteouts and type changes only act through real
//! directories, never through a symlink), set-id bits are masked, device nodes and FIFOs are
//! skipped, and everything is owned by the manager (image uids mean nothing on this host).

use std::collections::HashSet;
use std::fs;
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Component, Path, PathBuf};

/// One verified layer blob.
#[derive(Debug, Clone)]
pub struct Layer {
    pub path: PathBuf,
    pub media_type: String,
}

/// Directories a sandbox mounts over (they must exist in a read-only root).
const MOUNT_DIRS: &[&str] = &["proc", "dev", "tmp", "run", "root", "etc", "opt/agentcube"];

/// Files bound over, created empty when the image has none.
const MOUNT_FILES: &[(&str, &str)] = &[
    ("etc/resolv.conf", ""),
    (
        "etc/hosts",
        "127.0.0.1\tlocalhost\n::1\tlocalhost\n127.0.1.1\tsandbox\n",
    ),
];

/// Removes what an interrupted pull or unpack left (`*.partial-*` in `blobs/` and `rootfs/`).
pub fn remove_partials(dir: &Path) {
    for sub in ["blobs", "rootfs"] {
        let Ok(entries) = fs::read_dir(dir.join(sub)) else {
            continue;
        };
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().contains(".partial-") {
                let _ = crate::backend::local::rmtree::remove_tree(&e.path())
                    .or_else(|_| fs::remove_file(e.path()));
            }
        }
    }
}

/// Applies `layers` in order into a fresh directory next to `target`, adds the mount points, and
/// renames it to `target` only when complete. With `max_bytes`, the layers' unpacked tar streams
/// together may be at most that long (a decompression bomb fails with `FileTooLarge`).
pub fn build_rootfs(
    parent: &Path,
    target: &Path,
    layers: &[Layer],
    max_bytes: Option<u64>,
) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let name = target.file_name().map(|n| n.to_string_lossy().to_string());
    let partial = parent.join(format!(
        "{}.partial-{}",
        name.unwrap_or_default(),
        uuid::Uuid::new_v4().simple()
    ));
    fs::create_dir(&partial)?;
    let limit = max_bytes.unwrap_or(u64::MAX);
    let mut budget = Budget {
        left: limit,
        limit,
        exceeded: false,
    };
    let built = (|| {
        for layer in layers {
            apply_layer(&partial, layer, &mut budget).map_err(|e| {
                // The tar crate puts its own message on our reader's error.
                let e = if budget.exceeded { budget.error() } else { e };
                let (name, kind) = (layer_name(layer), &layer.media_type);
                io::Error::new(e.kind(), format!("layer {name} ({kind}): {e}"))
            })?;
        }
        add_mount_points(&partial)?;
        fs::set_permissions(&partial, fs::Permissions::from_mode(0o755))?;
        fs::rename(&partial, target)
    })();
    if built.is_err() || partial.exists() {
        let _ = crate::backend::local::rmtree::remove_tree(&partial);
    }
    match built {
        // Another manager on the same state finished first: theirs is as good.
        Err(_) if target.is_dir() => Ok(()),
        other => other,
    }
}

fn layer_name(layer: &Layer) -> String {
    layer
        .path
        .file_name()
        .map(|n| n.to_string_lossy().chars().take(12).collect())
        .unwrap_or_default()
}

/// Opens a layer blob, decompressing by its content: gzip, zstd (every frame, skippable ones
/// skipped, as `zstd:chunked` layers have them) or plain tar.
fn open_layer(layer: &Layer) -> io::Result<Box<dyn Read>> {
    let mut file = BufReader::new(fs::File::open(&layer.path)?);
    let magic = file.fill_buf()?;
    if magic.starts_with(&[0x1f, 0x8b]) {
        Ok(Box::new(flate2::read::GzDecoder::new(file)))
    } else if magic.starts_with(&ZSTD_MAGIC) {
        Ok(Box::new(zstd::stream::read::Decoder::with_buffer(file)?))
    } else {
        Ok(Box::new(file))
    }
}

/// The first bytes of a zstd frame.
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

/// What an image may still unpack to.
struct Budget {
    left: u64,
    limit: u64,
    exceeded: bool,
}

impl Budget {
    fn error(&self) -> io::Error {
        io::Error::new(
            io::ErrorKind::FileTooLarge,
            format!(
                "the image unpacks to more than {} bytes (--max-image-size)",
                self.limit
            ),
        )
    }
}

/// A layer's unpacked bytes, counted against the image's [`Budget`].
struct Counted<'b, R> {
    inner: R,
    budget: &'b mut Budget,
}

impl<R: Read> Read for Counted<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        match self.budget.left.checked_sub(n as u64) {
            Some(left) => self.budget.left = left,
            None => {
                self.budget.exceeded = true;
                return Err(self.budget.error());
            }
        }
        Ok(n)
    }
}

/// One layer onto `root`.
fn apply_layer(root: &Path, layer: &Layer, budget: &mut Budget) -> io::Result<()> {
    let mut archive = tar::Archive::new(Counted {
        inner: open_layer(layer)?,
        budget,
    });
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(false);
    archive.set_unpack_xattrs(false);
    archive.set_overwrite(true);
    archive.set_mask(0o6000);
    // Paths this layer wrote: an opaque whiteout hides only what lower layers had.
    let mut written: HashSet<PathBuf> = HashSet::new();
    for entry in archive.entries()? {
        let mut entry = entry?;
        let Some(rel) = relative(&entry.path()?) else {
            continue;
        };
        let name = rel.file_name().map(|n| n.to_string_lossy().to_string());
        let parent = rel.parent().unwrap_or(Path::new("")).to_path_buf();
        match name.as_deref() {
            Some(".wh..wh..opq") => {
                if let Some(dir) = real_dir(root, &parent) {
                    clear_lower(&dir, &parent, &written)?;
                }
                continue;
            }
            Some(n) if n.starts_with(".wh.") => {
                if let Some(dir) = real_dir(root, &parent) {
                    remove_any(&dir.join(&n[4..]))?;
                }
                continue;
            }
            _ => {}
        }
        let kind = entry.header().entry_type();
        if kind.is_character_special() || kind.is_block_special() || kind.is_fifo() {
            continue;
        }
        if let Some(dir) = real_dir(root, &parent) {
            replace_other_type(
                &dir.join(rel.file_name().unwrap_or_default()),
                kind.is_dir(),
            )?;
        }
        entry.unpack_in(root)?;
        written.insert(rel);
    }
    Ok(())
}

/// The entry path relative to the root, or `None` for one that climbs (`..`) or is empty.
fn relative(path: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::ParentDir => return None,
            _ => {}
        }
    }
    (!out.as_os_str().is_empty()).then_some(out)
}

/// `root/rel` when every component of it exists as a real directory (no symlink anywhere).
fn real_dir(root: &Path, rel: &Path) -> Option<PathBuf> {
    let mut cur = root.to_path_buf();
    for c in rel.components() {
        cur.push(c);
        if !fs::symlink_metadata(&cur).ok()?.is_dir() {
            return None;
        }
    }
    Some(cur)
}

/// Removes a file, symlink or whole directory (never following a symlink); absent is fine.
fn remove_any(p: &Path) -> io::Result<()> {
    match fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => crate::backend::local::rmtree::remove_tree(p),
        Ok(_) => fs::remove_file(p),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// A directory entry where a non-directory is (or the reverse) replaces it, as overlayfs would.
fn replace_other_type(p: &Path, entry_is_dir: bool) -> io::Result<()> {
    match fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() != entry_is_dir => remove_any(p),
        _ => Ok(()),
    }
}

/// An opaque directory: what lower layers put in `dir` goes; what this layer wrote stays.
fn clear_lower(dir: &Path, rel: &Path, written: &HashSet<PathBuf>) -> io::Result<()> {
    for e in fs::read_dir(dir)? {
        let e = e?;
        if !written.contains(&rel.join(e.file_name())) {
            remove_any(&e.path())?;
        }
    }
    Ok(())
}

/// Creates `root/rel` as a real directory, replacing a symlink or file on the way.
fn ensure_dir(root: &Path, rel: &str) -> io::Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    let mut cur = root.to_path_buf();
    for c in Path::new(rel).components() {
        cur.push(c);
        match fs::symlink_metadata(&cur) {
            Ok(m) if m.is_dir() => continue,
            Ok(_) => fs::remove_file(&cur)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        fs::DirBuilder::new().mode(0o755).create(&cur)?;
    }
    Ok(cur)
}

/// The directories and files the sandbox mounts over, as real entries of the rootfs.
fn add_mount_points(root: &Path) -> io::Result<()> {
    for d in MOUNT_DIRS {
        ensure_dir(root, d)?;
    }
    for (file, content) in MOUNT_FILES {
        let p = Path::new(file);
        let dir = ensure_dir(root, &p.parent().unwrap_or(Path::new("")).to_string_lossy())?;
        let path = dir.join(p.file_name().unwrap_or_default());
        match fs::symlink_metadata(&path) {
            Ok(m) if m.is_file() => continue,
            Ok(_) => remove_any(&path)?,
            Err(_) => {}
        }
        fs::write(&path, content)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
