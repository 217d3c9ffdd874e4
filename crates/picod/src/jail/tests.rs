use super::*;
use proptest::prelude::*;
use std::io::{Read, Write};
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
    symlink("a/file", root.join("relin")).unwrap();
    symlink("../outside/newfile", root.join("dangling")).unwrap();
    symlink("/", root.join("slash")).unwrap();
    symlink("loop2", root.join("loop1")).unwrap();
    symlink("loop1", root.join("loop2")).unwrap();
    Fixture {
        _tmp: tmp,
        ws,
        outside,
    }
}

fn rel(ws: &Workspace, user: &str) -> Result<PathBuf, JailError> {
    ws.walk(user, false).map(|t| t.rel)
}

#[test]
fn absolute_paths_are_workspace_relative() {
    let f = fixture();
    assert_eq!(rel(&f.ws, "/a/x").unwrap(), Path::new("a/x"));
    assert!(matches!(rel(&f.ws, "/tmp/x"), Err(JailError::NotFound(_))));
    assert_eq!(f.ws.walk("/tmp/x", true).unwrap().rel, Path::new("tmp/x"));
    assert_eq!(rel(&f.ws, "/../a/file").unwrap(), Path::new("a/file"));
    assert_eq!(rel(&f.ws, "a/./b/../file").unwrap(), Path::new("a/file"));
    assert_eq!(rel(&f.ws, "").unwrap(), Path::new(""));
    assert_eq!(rel(&f.ws, ".").unwrap(), Path::new(""));
    assert_eq!(Workspace::relative(Path::new("")), ".");
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
        "loop1",
    ] {
        assert!(
            matches!(rel(&f.ws, p), Err(JailError::Escape(_))),
            "{p} should be refused: {:?}",
            rel(&f.ws, p)
        );
    }
}

#[test]
fn symlinks_inside_are_followed() {
    let f = fixture();
    assert_eq!(rel(&f.ws, "in/file").unwrap(), Path::new("a/file"));
    assert_eq!(rel(&f.ws, "in/new").unwrap(), Path::new("a/new"));
    assert_eq!(rel(&f.ws, "relin").unwrap(), Path::new("a/file"));
    let (mut file, r) = f.ws.open_read("in/file").unwrap();
    let mut s = String::new();
    file.read_to_string(&mut s).unwrap();
    assert_eq!((s.as_str(), r.as_path()), ("f", Path::new("a/file")));
}

#[test]
fn bad_paths_are_refused_as_such() {
    let f = fixture();
    assert!(matches!(rel(&f.ws, "a\0b"), Err(JailError::BadPath(_))));
    let long = "x/".repeat(MAX_PATH_BYTES);
    assert!(matches!(rel(&f.ws, &long), Err(JailError::BadPath(_))));
    let name = "n".repeat(300);
    assert!(matches!(
        f.ws.create_file(&name, 0o644),
        Err(JailError::BadPath(_))
    ));
    assert!(matches!(
        f.ws.open_read("a/file/below"),
        Err(JailError::NotADirectory(_))
    ));
}

#[test]
fn special_files_are_refused_without_blocking() {
    let f = fixture();
    nix::unistd::mkfifo(&f.ws.root().join("fifo"), Mode::from_bits_truncate(0o644)).unwrap();
    // Neither would return if the FIFO were opened blocking (nobody writes or reads it).
    assert!(matches!(f.ws.open_read("fifo"), Err(JailError::Special(_))));
    assert!(matches!(
        f.ws.create_file("fifo", 0o644),
        Err(JailError::Special(_))
    ));
    let _sock = std::os::unix::net::UnixListener::bind(f.ws.root().join("sock")).unwrap();
    assert!(matches!(f.ws.open_read("sock"), Err(JailError::Special(_))));
    assert!(matches!(f.ws.open_read("a"), Err(JailError::IsDirectory)));
    assert!(matches!(
        f.ws.create_file("a", 0o644),
        Err(JailError::IsDirectory)
    ));
}

#[test]
fn create_file_refuses_a_symlink_swapped_in() {
    let f = fixture();
    let t = f.ws.walk("late", true).unwrap();
    symlink(f.outside.join("late"), f.ws.root().join("late")).unwrap();
    let name = t.name.clone().unwrap();
    let flags = OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_NOFOLLOW;
    assert_eq!(
        openat(
            &t.dir,
            name.as_os_str(),
            flags,
            Mode::from_bits_truncate(0o644)
        )
        .unwrap_err(),
        Errno::ELOOP
    );
    // Through the API, the symlink now resolves outside and is refused.
    assert!(matches!(
        f.ws.create_file("late", 0o644),
        Err(JailError::Escape(_))
    ));
    assert!(!f.outside.join("late").exists());
}

#[test]
fn writes_create_parents_and_truncate() {
    let f = fixture();
    let (mut file, r) = f.ws.create_file("/x/y/z.txt", 0o600).unwrap();
    file.write_all(b"hello world").unwrap();
    assert_eq!(r, Path::new("x/y/z.txt"));
    let (mut file, _) = f.ws.create_file("x/y/z.txt", 0o644).unwrap();
    file.write_all(b"hi").unwrap();
    assert_eq!(
        std::fs::read_to_string(f.ws.root().join("x/y/z.txt")).unwrap(),
        "hi"
    );
    let wd = f.ws.work_dir("made/here").unwrap();
    assert!(f.ws.root().join("made/here").is_dir());
    assert!(wd.path.as_ref().is_some_and(|p| p.is_dir()));
    // Not entered: even the root is named (the process cwd is not the workspace).
    assert!(f.ws.work_dir("").unwrap().path.is_some());
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
        "relin",
        "file",
        "etc",
        "loop1",
    ])
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]
    /// Whatever the path, what it resolves to is inside the workspace, and writing there creates
    /// nothing outside it.
    #[test]
    fn nothing_resolves_outside(abs in any::<bool>(), segs in prop::collection::vec(segment(), 0..7)) {
        let f = fixture();
        let user = format!("{}{}", if abs { "/" } else { "" }, segs.join("/"));
        if let Ok(t) = f.ws.walk(&user, false) {
            let real = f.ws.root().join(&t.rel);
            prop_assert!(!t.rel.components().any(|c| c == Component::ParentDir), "{user} → {:?}", t.rel);
            if let Ok(c) = real.canonicalize() {
                prop_assert!(c.starts_with(f.ws.root()), "{user} resolved to {c:?}");
            }
        }
        let _ = f.ws.create_file(&format!("{user}/probe"), 0o644);
        let _ = f.ws.work_dir(&format!("{user}/dir"));
        let _ = f.ws.create_file(&user, 0o644);
        let mut outside: Vec<_> = std::fs::read_dir(&f.outside).unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        outside.sort();
        prop_assert_eq!(outside, vec!["secret".to_string()]);
        prop_assert_eq!(std::fs::read_to_string(f.outside.join("secret")).unwrap(), "s");
    }
}
