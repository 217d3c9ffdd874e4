//! The same sandboxes under gVisor `runsc` (the stronger isolation).

mod common;

use agentcube_workload_manager::backend::local::Isolation;
use common::*;

#[tokio::test]
async fn gvisor_sandboxes_run_picod_behind_a_user_space_kernel() {
    let s = Stack::start(Options {
        manifests: code_interpreter(
            "ci",
            "    resources:\n      limits:\n        memory: 256Mi\n",
        ),
        isolation: Isolation::Gvisor,
        ..Default::default()
    })
    .await;
    let v = s.create_ok("code-interpreter", "ci").await;
    let out = exec(&v, &sh("uname -r; id -u; python3 -c 'print(6*7)'; cat /proc/net/dev | tail -n +3 | cut -d: -f1")).await;
    let lines: Vec<&str> = out["stdout"]
        .as_str()
        .unwrap()
        .lines()
        .map(str::trim)
        .collect();
    let host_kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    assert_ne!(
        lines[0],
        host_kernel.trim(),
        "gVisor's kernel, not the host's: {out}"
    );
    let uid = s.backend.sandbox_uid(v["sandboxName"].as_str().unwrap());
    assert_eq!(
        lines[1],
        uid.unwrap_or(65534).to_string(),
        "the sandbox's own unprivileged uid inside"
    );
    assert_eq!(lines[2], "42");
    assert_eq!(&lines[3..], ["lo"], "no network but loopback");
    let out = exec(
        &v,
        &sh("touch /usr/x 2>&1; echo rc=$?; cat /etc/shadow 2>&1; echo rc=$?"),
    )
    .await;
    let text = out["stdout"].as_str().unwrap();
    assert!(text.matches("rc=1").count() == 2, "{text}");
    // The seccomp profile is loaded inside gVisor too: no nested user namespace.
    let out = exec(
        &v,
        &sh("grep '^Seccomp:' /proc/self/status; unshare -Ur true 2>&1; echo rc=$?"),
    )
    .await;
    let text = out["stdout"].as_str().unwrap();
    assert!(text.contains("Seccomp:\t2"), "{text}");
    assert!(
        text.contains("Operation not permitted") && !text.contains("rc=0"),
        "{text}"
    );
    // PicoD is PID 1 under gVisor: it serves as PID 2 under its own init, which reaps what
    // commands leave behind (before, each orphan stayed a zombie, holding a process slot).
    let out = exec(&v, &sh("cat /proc/1/comm /proc/2/comm; sleep 0.1 &")).await;
    assert_eq!(out["stdout"], "picod\npicod\n", "{out}");
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let out = exec(&v, &sh("cat /proc/[0-9]*/stat")).await;
    let states = out["stdout"].as_str().unwrap();
    assert!(
        states.lines().all(|l| !l.contains(") Z ")) && !states.contains("(sleep)"),
        "{states}"
    );
    // Memory-backed directories are sized below the memory limit, the rest is read-only.
    let fills = [("/tmp/fill", 128), ("/dev/shm/fill", 32)];
    tmpfs_fill_up_to_their_size(&v, &fills, &["", "/dev", "/run"]).await;
    // Another gVisor sandbox (its own user-space kernel) reaches none of this one's sockets, IPC
    // objects or processes, nor the host's.
    let neighbour = s.create_ok("code-interpreter", "ci").await;
    neighbours_are_out_of_reach(&neighbour, &v).await;
    // A socket symlink planted inside (gVisor's gofer makes it a real host symlink) is never
    // followed: the host talks to the socket it took out of the sandbox's reach.
    let host = s.dir.path().join("host.sock");
    let listener = std::os::unix::net::UnixListener::bind(&host).unwrap();
    listener.set_nonblocking(true).unwrap();
    let plant = format!(
        "rm -f /run/agentcube/picod.sock; ln -s {} /run/agentcube/picod.sock; readlink /run/agentcube/picod.sock",
        host.display()
    );
    let out = exec(&v, &sh(&plant)).await;
    assert!(
        out["stdout"].as_str().unwrap().contains("host.sock"),
        "{out}"
    );
    assert_eq!(exec(&v, &["echo", "picod"]).await["stdout"], "picod\n");
    assert!(listener.accept().is_err(), "the host socket was reached");
    assert_eq!(s.delete(v["sessionId"].as_str().unwrap()).await.0, 200);
    let listed = std::process::Command::new("runsc")
        .arg(format!(
            "--root={}",
            s.dir.path().join("state/runsc").display()
        ))
        .arg("list")
        .arg("-q")
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&listed.stdout).trim().is_empty(),
        "runsc sandbox left: {listed:?}"
    );
    s.shutdown_and_check_leaks().await;
}
