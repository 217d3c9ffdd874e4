//! The workspace jail: every user path goes through [`Workspace::resolve`].
//!
//! Upstream semantics (spec §5.6, §10 item 10): absolute paths are workspace-relative (`/tmp/x` is
//! `<ws>/tmp/x`); a relative path that climbs above the workspace is refused. Beyond upstream, the
//! deepest existing ancestor is resolved with `canonicalize`, so symlinks pointing out (including
//! symlinked parents and dangling links) never escape, for reads, writes, listings and
//! `working_dir`. Directories are created one component at a time and files are opened with
//! `O_NOFOLLOW`, so a symlink swapped in after resolution is not followed either.

use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};

/// Why a path was refused.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    /// The path would leave the workspace.
    #[error("path {0:?} escapes the workspace")]
    Escape(String),
    /// Filesystem error while resolving.
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// The sandbox's workspace root, canonicalised once at start.
#[derive(Debug, Clone)]
pub struct Workspace {
    root: PathBuf,
}

impl Workspace {
    /// Creates the directory if needed and canonicalises it.
    pub fn new(dir: &Path) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        Ok(Self {
            root: dir.canonicalize()?,
        })
    }

    /// The canonical root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Maps a user path to a host path that is inside the workspace, or refuses it.
    ///
    /// The result is canonical up to its deepest existing ancestor; components below that do not
    /// exist yet (so they cannot be symlinks).
    pub fn resolve(&self, user: &str) -> Result<PathBuf, JailError> {
        let escape = || JailError::Escape(user.to_string());
        let absolute = user.starts_with('/');
        let mut parts: Vec<&std::ffi::OsStr> = Vec::new();
        for c in Path::new(user).components() {
            match c {
                Component::RootDir | Component::Prefix(_) | Component::CurDir => {}
                Component::ParentDir => {
                    // Go's filepath.Clean: `/..` is `/`, but a relative path may not climb out.
                    if parts.pop().is_none() && !absolute {
                        return Err(escape());
                    }
                }
                Component::Normal(p) => parts.push(p),
            }
        }
        let mut existing = self.root.clone();
        let mut idx = 0;
        while idx < parts.len() {
            let next = existing.join(parts[idx]);
            match std::fs::symlink_metadata(&next) {
                Ok(_) => {
                    existing = next;
                    idx += 1;
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                Err(e) if e.raw_os_error() == Some(nix::libc::ENOTDIR) => break,
                Err(e) => return Err(e.into()),
            }
        }
        // A dangling or looping symlink cannot be canonicalised: refuse it rather than follow it.
        let canonical = existing.canonicalize().map_err(|_| escape())?;
        if !canonical.starts_with(&self.root) {
            return Err(escape());
        }
        Ok(parts[idx..].iter().fold(canonical, |p, c| p.join(c)))
    }

    /// The path relative to the root, as upstream reports it (`"."` for the root itself).
    pub fn relative(&self, path: &Path) -> String {
        match path.strip_prefix(&self.root) {
            Ok(rel) if rel.as_os_str().is_empty() => ".".into(),
            Ok(rel) => rel.to_string_lossy().into_owned(),
            Err(_) => path.to_string_lossy().into_owned(),
        }
    }

    /// Creates `dir` (already resolved) and its missing parents, one component at a time, refusing
    /// to walk through anything that is not a real directory inside the workspace.
    pub fn create_dirs(&self, dir: &Path) -> Result<(), JailError> {
        let rel = dir
            .strip_prefix(&self.root)
            .map_err(|_| JailError::Escape(dir.display().to_string()))?;
        let mut current = self.root.clone();
        for c in rel.components() {
            current.push(c);
            match std::fs::DirBuilder::new().mode(0o755).create(&current) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e.into()),
            }
            let meta = std::fs::symlink_metadata(&current)?;
            if meta.file_type().is_symlink() {
                return Err(JailError::Escape(current.display().to_string()));
            }
            if !meta.is_dir() {
                return Err(io::Error::new(
                    io::ErrorKind::NotADirectory,
                    format!("{} is not a directory", self.relative(&current)),
                )
                .into());
            }
        }
        Ok(())
    }

    /// Opens `path` (already resolved) for writing: create or truncate, never following a symlink
    /// in the last component. `mode` applies only when the file is created, as upstream.
    pub fn create_file(&self, path: &Path, mode: u32) -> Result<std::fs::File, JailError> {
        if let Some(parent) = path.parent() {
            self.create_dirs(parent)?;
        }
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(path)?;
        Ok(file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::os::unix::fs::symlink;

    struct Fixture {
        _tmp: tempfile::TempDir,
        ws: Workspace,
        outside: PathBuf,
    }

    /// A workspace with symlinks pointing in, out, and nowhere, next to a directory outside it.
    fn fixture() -> Fixture {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tmp.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("secret"), "s").unwrap();
        let ws = Workspace::new(&tmp.path().join("ws")).unwrap();
        let root = ws.root().to_path_buf();
        std::fs::create_dir(root.join("a")).unwrap();
        std::fs::write(root.join("a/file"), "f").unwrap();
        symlink(&outside, root.join("out")).unwrap();
        symlink(outside.join("secret"), root.join("secretlink")).unwrap();
        symlink(root.join("a"), root.join("in")).unwrap();
        symlink("../outside/newfile", root.join("dangling")).unwrap();
        symlink("/", root.join("slash")).unwrap();
        Fixture {
            _tmp: tmp,
            ws,
            outside,
        }
    }

    #[test]
    fn absolute_paths_are_workspace_relative() {
        let f = fixture();
        let root = f.ws.root();
        assert_eq!(f.ws.resolve("/tmp/x").unwrap(), root.join("tmp/x"));
        assert_eq!(
            f.ws.resolve("/../etc/passwd").unwrap(),
            root.join("etc/passwd")
        );
        assert_eq!(f.ws.resolve("a/./b/../file").unwrap(), root.join("a/file"));
        assert_eq!(f.ws.resolve("").unwrap(), root);
        assert_eq!(f.ws.resolve(".").unwrap(), root);
    }

    #[test]
    fn escapes_are_refused() {
        let f = fixture();
        for p in [
            "..",
            "../x",
            "a/../../x",
            "out",
            "out/secret",
            "out/new/deeper",
            "secretlink",
            "dangling",
            "slash/etc/passwd",
        ] {
            assert!(
                matches!(f.ws.resolve(p), Err(JailError::Escape(_))),
                "{p} should be refused"
            );
        }
    }

    #[test]
    fn symlinks_inside_are_followed() {
        let f = fixture();
        assert_eq!(f.ws.resolve("in/file").unwrap(), f.ws.root().join("a/file"));
        assert_eq!(f.ws.resolve("in/new").unwrap(), f.ws.root().join("a/new"));
    }

    #[test]
    fn create_file_refuses_a_symlink_swapped_in() {
        let f = fixture();
        let target = f.ws.resolve("late").unwrap();
        symlink(f.outside.join("late"), &target).unwrap();
        assert!(f.ws.create_file(&target, 0o644).is_err());
        assert!(!f.outside.join("late").exists());
    }

    fn segment() -> impl Strategy<Value = &'static str> {
        prop::sample::select(vec![
            "..",
            ".",
            "a",
            "b",
            "",
            "out",
            "in",
            "dangling",
            "slash",
            "secretlink",
            "file",
            "etc",
        ])
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(400))]
        /// Whatever the path, the resolved target is inside the workspace, and writing there
        /// creates nothing outside it.
        #[test]
        fn nothing_resolves_outside(abs in any::<bool>(), segs in prop::collection::vec(segment(), 0..7)) {
            let f = fixture();
            let user = format!("{}{}", if abs { "/" } else { "" }, segs.join("/"));
            if let Ok(p) = f.ws.resolve(&user) {
                prop_assert!(p.starts_with(f.ws.root()), "{user} resolved to {p:?}");
                let _ = f.ws.create_file(&p.join("probe"), 0o644);
                let _ = f.ws.create_dirs(&p.join("dir"));
                let _ = f.ws.create_file(&p, 0o644);
            }
            let mut outside: Vec<_> = std::fs::read_dir(&f.outside).unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
            outside.sort();
            prop_assert_eq!(outside, vec!["secret".to_string()]);
            prop_assert_eq!(std::fs::read_to_string(f.outside.join("secret")).unwrap(), "s");
        }
    }
}
