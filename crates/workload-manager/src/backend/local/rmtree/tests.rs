use std::os::unix::fs::PermissionsExt;

use super::*;

/// Makes `depth` directories, each inside the last, below `root` (by descriptors: the path is far
/// longer than `PATH_MAX`), with a file in the deepest.
fn nest(root: &Path, depth: usize) {
    let mut cur = open_dir(AT_FDCWD, root).unwrap();
    for _ in 0..depth {
        nix::sys::stat::mkdirat(&cur, c"a", Mode::from_bits_truncate(0o700)).unwrap();
        cur = open_dir(&cur, c"a").unwrap();
    }
    let f = openat(
        &cur,
        c"f",
        OFlag::O_CREAT | OFlag::O_WRONLY | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o600),
    );
    drop(f.unwrap());
}

/// std's `remove_dir_all` aborted the process (stack overflow) on a tree like this one, deeper
/// than a thread's stack allows for one frame per level; here the removing thread has 64 KiB.
#[test]
fn a_tree_deeper_than_any_stack_is_removed() {
    let tmp = tempfile::tempdir().unwrap();
    let top = tmp.path().join("deep");
    std::fs::create_dir(&top).unwrap();
    nest(&top, 30_000);
    let dir = top.clone();
    let removed = std::thread::Builder::new()
        .stack_size(64 << 10)
        .spawn(move || remove_tree(&dir))
        .unwrap()
        .join()
        .unwrap();
    removed.unwrap();
    assert!(!top.exists());
}

#[test]
fn symlinks_are_removed_not_followed_and_locked_directories_opened() {
    let tmp = tempfile::tempdir().unwrap();
    let outside = tmp.path().join("outside");
    std::fs::create_dir_all(outside.join("sub")).unwrap();
    std::fs::write(outside.join("sub/keep"), "k").unwrap();
    let top = tmp.path().join("tree");
    std::fs::create_dir_all(top.join("a/b/c")).unwrap();
    std::fs::write(top.join("a/b/c/f"), "x").unwrap();
    std::os::unix::fs::symlink(&outside, top.join("a/link")).unwrap();
    std::os::unix::fs::symlink(outside.join("sub/keep"), top.join("a/b/file-link")).unwrap();
    std::os::unix::net::UnixListener::bind(top.join("a/sock")).unwrap();
    nix::unistd::mkfifo(&top.join("a/b/fifo"), Mode::from_bits_truncate(0o600)).unwrap();
    std::fs::set_permissions(top.join("a/b"), std::fs::Permissions::from_mode(0o000)).unwrap();
    std::fs::set_permissions(top.join("a"), std::fs::Permissions::from_mode(0o500)).unwrap();
    remove_tree(&top).unwrap();
    assert!(!top.exists());
    assert_eq!(
        std::fs::read_to_string(outside.join("sub/keep")).unwrap(),
        "k"
    );
    // A symlink (or a file) given as the tree is removed itself.
    let link = tmp.path().join("link");
    std::os::unix::fs::symlink(&outside, &link).unwrap();
    remove_tree(&link).unwrap();
    assert!(std::fs::symlink_metadata(&link).is_err() && outside.join("sub/keep").exists());
    remove_tree(&tmp.path().join("absent")).unwrap();
}

/// Many directories side by side are listed once each, not once per sibling removed.
#[test]
fn a_wide_tree_is_removed() {
    let tmp = tempfile::tempdir().unwrap();
    let top = tmp.path().join("wide");
    for i in 0..5_000 {
        std::fs::create_dir_all(top.join(format!("d{i}/e"))).unwrap();
    }
    let started = std::time::Instant::now();
    remove_tree(&top).unwrap();
    assert!(!top.exists());
    assert!(
        started.elapsed() < std::time::Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
}
