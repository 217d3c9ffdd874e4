//! Workspace quotas on the local backend (root): each workspace is a filesystem of the
//! definition's `ephemeral-storage` size, mounted only in the sandbox's own mount namespace.
//! Filling it is `ENOSPC` with PicoD's note naming the quota, an upload over it (in one body or
//! streamed) is a 507 that keeps no partial file, the host disk holds no more than the quota,
//! the host's mount table never holds it, and its loop device is gone with the sandbox.

mod common;

use common::*;
use serde_json::json;

fn mounted_under(dir: &std::path::Path) -> Vec<String> {
    let dir = dir.canonicalize().unwrap();
    agentcube_workload_manager::backend::local::mounts::mounted_below(&dir)
        .iter()
        .map(|p| p.display().to_string())
        .collect()
}

#[tokio::test]
async fn a_full_workspace_is_a_clear_error_and_never_the_hosts_disk() {
    let s = Stack::start(Options {
        manifests: code_interpreter(
            "small",
            "    resources:\n      limits:\n        ephemeral-storage: 20Mi\n",
        ),
        ..Default::default()
    })
    .await;
    let v = s.create_ok("code-interpreter", "small").await;
    let name = v["sandboxName"].as_str().unwrap();
    let paths = s.backend.paths(name);
    let state = paths.dir.parent().unwrap().parent().unwrap().to_path_buf();
    // On the host only the sandbox's run directory is mounted (a small tmpfs, and its bind
    // where the sandbox's uid reaches it); the workspace only in the sandbox's own namespace.
    let mut host_mounts = mounted_under(&state);
    host_mounts.sort();
    let run_mounts = [paths.sockets.clone(), paths.run.clone()].map(|p| p.display().to_string());
    assert_eq!(host_mounts, run_mounts, "nothing else mounted on the host");
    let image = paths.private.join("workspace.ext4");
    assert_eq!(
        loop_devices_of(&image),
        1,
        "one loop device for the workspace"
    );
    let df = exec(&v, &sh("df -k /root | tail -1")).await;
    let size_kb: u64 = df["stdout"]
        .as_str()
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (15_000..=20_480).contains(&size_kb),
        "the workspace is its own 20Mi filesystem: {df}"
    );
    let out = exec(
        &v,
        &sh("ls -A; python3 -c \"open('big','wb').write(b'x' * 40 * 1024 * 1024)\""),
    )
    .await;
    let stdout = out["stdout"].as_str().unwrap();
    let stderr = out["stderr"].as_str().unwrap();
    assert!(!stdout.contains("lost+found"), "{stdout}");
    assert_ne!(out["exit_code"], 0, "{out}");
    assert!(stderr.contains("No space left on device"), "{stderr}");
    assert!(
        stderr.contains("the workspace is full: its quota is 20Mi"),
        "{stderr}"
    );
    // The host holds the sandbox's filesystem image, no bigger than the quota.
    let used: u64 = {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(&image).unwrap();
        m.blocks() * 512
    };
    assert!(used <= 21 << 20, "host disk used: {used}");
    // An upload over what is left: 507 naming the quota, no partial file kept.
    exec(&v, &sh("rm -f big")).await;
    let ep = v["entryPoints"][0]["endpoint"].as_str().unwrap();
    use base64::Engine;
    let content = base64::engine::general_purpose::STANDARD.encode(vec![7u8; 22 << 20]);
    let json_upload = unix_http(
        ep,
        "POST",
        "/api/files",
        Some(json!({"path": "upload.bin", "content": content})),
    )
    .await;
    // The same streamed to disk (past the body limit): its staging file removed.
    let streamed = unix_send(
        ep,
        &token(&sandbox_of(ep)),
        "POST",
        "/api/files?path=streamed.bin",
        "application/octet-stream",
        vec![7u8; 40 << 20].into(),
    )
    .await;
    for (status, body) in [json_upload, streamed] {
        let text = String::from_utf8_lossy(&body);
        assert_eq!(status, 507, "{text}");
        assert!(text.contains("quota is 20Mi"), "{text}");
        let ls = exec(&v, &sh("ls -A")).await;
        assert_eq!(ls["stdout"], "", "nothing kept: {ls}");
    }
    // Out of files (inodes) with bytes to spare: the note says so, not that the quota is full.
    let many = "mkdir d && cd d && i=0; while touch f$i 2>/dev/null; do i=$((i+1)); done; echo $i; touch last";
    let out = exec(&v, &sh(many)).await;
    let made: u64 = out["stdout"].as_str().unwrap().trim().parse().unwrap();
    assert!(
        (500..=700).contains(&made),
        "a 20Mi workspace holds ~640 files: {out}"
    );
    let stderr = out["stderr"].as_str().unwrap();
    assert!(
        stderr.contains("[picod: the workspace holds no more files: ")
            && stderr.contains(" files and directories at most"),
        "{out}"
    );
    assert_eq!(exec(&v, &sh("rm -rf d")).await["exit_code"], 0);
    // Small files still fit; a delete unmounts and removes everything.
    let ok = exec(&v, &sh("echo hi > f && cat f")).await;
    assert_eq!(ok["stdout"], "hi\n");
    assert_eq!(s.delete(v["sessionId"].as_str().unwrap()).await.0, 200);
    assert!(!paths.private.exists());
    eventually("the loop device released", 5, || {
        loop_devices_of(&image) == 0
    })
    .await;
    assert!(mounted_under(&state).is_empty());
    s.shutdown_and_check_leaks().await;
}

/// Loop devices whose backing file is `image` (deleted or not).
fn loop_devices_of(image: &std::path::Path) -> usize {
    let out = std::process::Command::new("losetup")
        .arg("-a")
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(&*image.to_string_lossy()))
        .count()
}

/// A small filesystem of its own (ext4, `mib` MiB) mounted on a fresh directory, for a state
/// directory whose disk fills up; unmounted, and its directory and image removed, on drop (a
/// failed test's too).
struct SmallDisk {
    dir: Option<tempfile::TempDir>,
    mountpoint: std::path::PathBuf,
    image: std::path::PathBuf,
}

impl SmallDisk {
    fn new(mib: u64) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().with_extension("ext4");
        let ok = |c: &mut std::process::Command| assert!(c.status().unwrap().success(), "{c:?}");
        ok(std::process::Command::new("truncate")
            .arg(format!("-s{mib}M"))
            .arg(&image));
        ok(std::process::Command::new("mkfs.ext4")
            .args(["-q", "-F"])
            .arg(&image));
        ok(std::process::Command::new("mount")
            .args(["-o", "loop"])
            .arg(&image)
            .arg(dir.path()));
        Self {
            mountpoint: dir.path().to_path_buf(),
            dir: Some(dir),
            image,
        }
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.mountpoint)
            .status();
        drop(self.dir.take());
        let _ = std::fs::remove_dir(&self.mountpoint);
        let _ = std::fs::remove_file(&self.image);
    }
}

/// Workspaces are reserved on the host's disk when their sandbox is made: one that the disk
/// cannot hold is a 429 saying so, and one that was made can be filled to its quota and keeps
/// every byte. Before, images were sparse: a second sandbox was made, and when the two wrote more
/// than the disk had, writes that had succeeded were lost at writeback ("potential data loss").
#[tokio::test]
async fn workspaces_are_reserved_so_a_full_host_disk_loses_no_write() {
    let mut disk = SmallDisk::new(400);
    let s = Stack::start(Options {
        manifests: code_interpreter(
            "big",
            "    resources:\n      limits:\n        ephemeral-storage: 250Mi\n",
        ),
        dir: disk.dir.take(),
        ..Default::default()
    })
    .await;
    let v = s.create_ok("code-interpreter", "big").await;
    let (status, body) = s.create("code-interpreter", "big").await;
    assert_eq!(status, 429, "{body}");
    let message = body["message"].as_str().unwrap();
    assert!(
        message.contains("not enough disk for the sandbox's workspace (250Mi;")
            && message.contains("ephemeral-storage"),
        "{message}"
    );
    // The one made holds its quota, every byte of it.
    let fill = "head -c 235929600 /dev/urandom > data && sync && sha256sum data | cut -c1-64 && sha256sum data | cut -c1-64";
    let out = exec(&v, &sh(fill)).await;
    let sums: Vec<&str> = out["stdout"].as_str().unwrap().lines().collect();
    assert_eq!(out["exit_code"], 0, "{out}");
    assert!(sums.len() == 2 && sums[0] == sums[1], "{out}");
    // Its session ended, the disk takes a new one.
    assert_eq!(s.delete(v["sessionId"].as_str().unwrap()).await.0, 200);
    let again = s.create_ok("code-interpreter", "big").await;
    assert_eq!(s.delete(again["sessionId"].as_str().unwrap()).await.0, 200);
    disk.dir = Some(s.stop_keeping_dir().await);
}

/// A fresh directory with a 64 MiB tmpfs mounted on it, and what unmounts and removes it.
fn tmpfs_dir() -> (tempfile::TempDir, impl Fn(&std::path::Path)) {
    let dir = tempfile::tempdir().unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64m", "tmpfs"])
        .arg(dir.path())
        .status()
        .unwrap();
    assert!(mounted.success());
    let unmount = |d: &std::path::Path| {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(d)
            .status();
        let _ = std::fs::remove_dir(d);
    };
    (dir, unmount)
}

/// A state directory on tmpfs is named at start: its workspace images would be host memory.
#[tokio::test]
async fn a_state_directory_on_tmpfs_is_warned_about() {
    let (_guard, logs) = Logs::start();
    let (dir, unmount) = tmpfs_dir();
    let path = dir.path().to_path_buf();
    let s = Stack::start(Options {
        dir: Some(dir),
        manifests: code_interpreter("ci", ""),
        ..Default::default()
    })
    .await;
    let text = logs.text();
    // Its images stay sparse: a 2Gi workspace on this 64 MiB tmpfs is made (reserving it would
    // be memory, and refused here).
    let created = s.create("code-interpreter", "ci").await;
    drop(s.stop_keeping_dir().await);
    unmount(&path);
    assert!(
        text.contains("the state directory is on tmpfs")
            && text.contains("put --state-dir on a disk"),
        "{text}"
    );
    assert_eq!(created.0, 200, "{:?}", created.1);
}

/// A workspace whose filesystem cannot be made fails its create, the log naming `mkfs.ext4`. The
/// launcher, started while the image is formatted, is told nothing and goes; nothing is left: no
/// sandbox directory, cgroup or process. (Made to fail here with a 2Ei quota on a tmpfs state
/// directory, where images stay sparse: too big for ext4.)
#[tokio::test]
async fn a_workspace_that_cannot_be_formatted_fails_its_create_and_leaves_nothing() {
    let (_guard, logs) = Logs::start();
    let (dir, unmount) = tmpfs_dir();
    let path = dir.path().to_path_buf();
    let s = Stack::start(Options {
        dir: Some(dir),
        manifests: code_interpreter(
            "vast",
            "    resources:\n      limits:\n        ephemeral-storage: 2Ei\n",
        ),
        ..Default::default()
    })
    .await;
    let (status, body) = s.create("code-interpreter", "vast").await;
    let state = path.join("state");
    let dirs_left: Vec<String> = ["sandboxes", "private"]
        .iter()
        .flat_map(|sub| std::fs::read_dir(state.join(sub)).unwrap())
        .map(|e| e.unwrap().path().display().to_string())
        .collect();
    let cgroups_left: Vec<std::path::PathBuf> = (s.backend.cgroup_instance_dirs().iter())
        .flat_map(|d| std::fs::read_dir(d).unwrap())
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    let state_text = state.to_string_lossy().into_owned();
    let processes_left: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| std::fs::read(e.ok()?.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(&state_text))
        .collect();
    let running = s.backend.running();
    drop(s.stop_keeping_dir().await);
    unmount(&path);
    assert_eq!(status, 500, "{body}");
    assert!(
        logs.text().contains("workspace quota (mkfs.ext4)"),
        "{}",
        logs.text()
    );
    assert!(running.is_empty(), "{running:?}");
    assert!(dirs_left.is_empty(), "{dirs_left:?}");
    assert!(cgroups_left.is_empty(), "{cgroups_left:?}");
    assert!(processes_left.is_empty(), "{processes_left:?}");
}

/// Free space and size of the filesystem holding `dir`, as an unprivileged writer sees them.
fn free_and_total(dir: &std::path::Path) -> (u64, u64) {
    let st = nix::sys::statvfs::statvfs(dir).unwrap();
    let block = st.fragment_size();
    (st.blocks_available() * block, st.blocks() * block)
}

/// Workspace reservations leave 5% of the disk to the host: the manager runs as root, and
/// before, 76 sandboxes of the default 2Gi took a 252 GB disk to its last block (root's own
/// reserve included), so that even `mkdir` failed, for the host as for the next create. A
/// workspace the disk could hold only by going under that share is a 429, and its reservation
/// is given back; one that leaves it is made.
#[tokio::test]
async fn workspace_reservations_leave_the_host_its_share_of_the_disk() {
    let mut disk = SmallDisk::new(400);
    let s = Stack::start(Options {
        manifests: greedy_and_modest(&disk),
        dir: disk.dir.take(),
        ..Default::default()
    })
    .await;
    let mib = |b: u64| b >> 20;
    let before = free_and_total(&disk.mountpoint).0;
    let (status, body) = s.create("code-interpreter", "greedy").await;
    assert_eq!(status, 429, "{body}");
    let message = body["message"].as_str().unwrap();
    assert!(
        message.contains("not enough disk") && message.contains("5% of the disk stays the host's"),
        "{message}"
    );
    let after = free_and_total(&disk.mountpoint).0;
    assert!(
        after + (1 << 20) >= before,
        "the refused reservation is given back: {} MiB free before, {} after",
        mib(before),
        mib(after)
    );
    let v = s.create_ok("code-interpreter", "modest").await;
    assert_eq!(s.delete(v["sessionId"].as_str().unwrap()).await.0, 200);
    disk.dir = Some(s.stop_keeping_dir().await);
}

/// Two definitions whose workspaces fit the free space of `disk`: `greedy`'s leaves 2% of the
/// disk, `modest`'s 15%.
fn greedy_and_modest(disk: &SmallDisk) -> String {
    let (free, total) = free_and_total(&disk.mountpoint);
    let limits = |left: u64| {
        let mib = (free - left) >> 20;
        format!("    resources:\n      limits:\n        ephemeral-storage: {mib}Mi\n")
    };
    let mut manifests = code_interpreter("greedy", &limits(total / 50));
    manifests.push_str(&code_interpreter("modest", &limits(total * 15 / 100)));
    manifests
}

/// The host's share is the operator's to set (`--disk-reserve`): with none, the workspace that
/// leaves 2% of the disk is made; with 20%, even the one leaving 15% is a 429 that says so.
#[tokio::test]
async fn the_hosts_share_of_the_disk_is_the_operators_to_set() {
    use agentcube_workload_manager::backend::local::quota::DiskReserve;
    for (share, name, made) in [
        (DiskReserve::Bytes(0), "greedy", true),
        (DiskReserve::Percent(20), "modest", false),
    ] {
        let mut disk = SmallDisk::new(400);
        let s = Stack::start(Options {
            manifests: greedy_and_modest(&disk),
            dir: disk.dir.take(),
            disk_reserve: share,
            ..Default::default()
        })
        .await;
        if made {
            let v = s.create_ok("code-interpreter", name).await;
            assert_eq!(s.delete(v["sessionId"].as_str().unwrap()).await.0, 200);
        } else {
            let (status, body) = s.create("code-interpreter", name).await;
            assert_eq!(status, 429, "{share}: {body}");
            let message = body["message"].as_str().unwrap();
            assert!(
                message.contains(&format!(
                    "of which {share} stays the host's, --disk-reserve"
                )),
                "{message}"
            );
            // Nothing of the refused sandbox is left: no directory, no mount of its run/.
            let state = s.dir.path().join("state");
            assert_eq!(mounted_under(&state), Vec::<String>::new());
            for d in ["sandboxes", "private"] {
                let left: Vec<_> = std::fs::read_dir(state.join(d)).unwrap().collect();
                assert!(left.is_empty(), "{d}: {left:?}");
            }
        }
        disk.dir = Some(s.stop_keeping_dir().await);
    }
}

/// A disk another program filled to its last block: a create is a 429 saying so (it was a 500
/// "cannot create sandbox directories"), and nothing of it is left.
#[tokio::test]
async fn a_disk_full_to_the_last_block_is_a_429() {
    let mut disk = SmallDisk::new(64);
    let s = Stack::start(Options {
        manifests: code_interpreter("ci", ""),
        dir: disk.dir.take(),
        ..Default::default()
    })
    .await;
    // As root, every block: the share ext4 keeps for root included.
    let filler = disk.mountpoint.join("filler");
    let st = nix::sys::statvfs::statvfs(&disk.mountpoint).unwrap();
    let file = std::fs::File::create(&filler).unwrap();
    let all = (st.blocks_free() * st.fragment_size()) as i64;
    let _ = nix::fcntl::fallocate(&file, nix::fcntl::FallocateFlags::empty(), 0, all);
    for _ in 0..64 {
        let st = nix::sys::statvfs::statvfs(&disk.mountpoint).unwrap();
        let left = (st.blocks_free() * st.fragment_size()) as i64;
        let len = file.metadata().unwrap().len() as i64;
        if left == 0
            || nix::fcntl::fallocate(&file, nix::fcntl::FallocateFlags::empty(), len, left).is_err()
        {
            break;
        }
    }
    let (status, body) = s.create("code-interpreter", "ci").await;
    assert_eq!(status, 429, "{body}");
    assert!(body["message"].as_str().unwrap().contains("disk"), "{body}");
    assert!(s.backend.running().is_empty());
    drop(file);
    std::fs::remove_file(&filler).unwrap();
    disk.dir = Some(s.stop_keeping_dir().await);
}

/// Creates arriving together get every workspace the disk can hold, and no more. Each create
/// checked the host's share after its own reservation but while others held theirs, refused
/// ones included: once the disk neared its share, creates in flight saw too little and were
/// refused (on a 252 GB disk, 38 of 40 concurrent SDK sessions were 429s where 17 fit), and
/// reservations together took the disk to its last block for a moment, failing other creates'
/// directories ("the disk … is full"). Mutation-checked: fails most runs without the fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn concurrent_creates_get_every_workspace_the_disk_holds() {
    use agentcube_workload_manager::backend::local::quota::DiskReserve;
    let mut disk = SmallDisk::new(400);
    let (free, total) = free_and_total(&disk.mountpoint);
    // Room for four workspaces above a 25% share; a fifth would still fit the free space.
    let share = total / 4;
    let each = (((free - share) / 4) >> 20) - 1;
    let s = std::sync::Arc::new(
        Stack::start(Options {
            manifests: code_interpreter(
                "ci",
                &format!(
                    "    resources:\n      limits:\n        memory: 64Mi\n        ephemeral-storage: {each}Mi\n"
                ),
            ),
            dir: disk.dir.take(),
            disk_reserve: DiskReserve::Percent(25),
            ..Default::default()
        })
        .await,
    );
    let creates = (0..32).map(|_| {
        let s = s.clone();
        tokio::spawn(async move { s.create("code-interpreter", "ci").await })
    });
    let mut made = Vec::new();
    for done in futures_util::future::join_all(creates).await {
        let (status, body) = done.unwrap();
        match status {
            200 => made.push(body["sessionId"].as_str().unwrap().to_string()),
            429 => assert!(
                body["message"]
                    .as_str()
                    .unwrap()
                    .contains("not enough disk"),
                "{body}"
            ),
            _ => panic!("{status}: {body}"),
        }
    }
    assert_eq!(made.len(), 4, "{each} MiB each, {} MiB free", free >> 20);
    for id in &made {
        assert_eq!(s.delete(id).await.0, 200);
    }
    let s = std::sync::Arc::into_inner(s).unwrap();
    disk.dir = Some(s.stop_keeping_dir().await);
}
