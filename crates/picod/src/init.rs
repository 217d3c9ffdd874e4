//! PicoD as the first process of its PID namespace: a Kubernetes container's entrypoint is
//! PID 1 there, and PID 1 inherits every orphan — a process whose parent exited first, as
//! `sleep 9 &` in a command does once the command's shell is gone. Nobody reaped them: each
//! stayed a zombie for the sandbox's life, holding a slot of the pod's process limit, until
//! commands could no longer start. (Locally bubblewrap's own init is PID 1 and reaps them.)
//!
//! So PicoD started as PID 1 does what bubblewrap's init does: it starts PicoD again as its
//! child ([`supervise`]) and, single-threaded, reaps every process that ends under it,
//! forwards the signals a container receives (`SIGTERM` at pod deletion, …) to that child, and
//! exits with the child's status. The child serves as before; its own commands are still its
//! own children, reaped by it, so their exit codes are untouched.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use nix::sys::signal::{SigSet, SigmaskHow, Signal, kill, sigprocmask};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

/// Set in the child's environment: it is the PicoD that serves (not another init).
pub const CHILD_MARK: &str = "PICOD_INIT_CHILD";

/// A program PicoD starts for the sandbox (a command, a process, a context's runner, the
/// agent): PicoD's environment without [`CHILD_MARK`], which is the init's word to PicoD only.
pub fn command(program: impl AsRef<std::ffi::OsStr>) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(program);
    cmd.env_remove(CHILD_MARK);
    cmd
}

/// Signals passed on to the serving PicoD.
const FORWARDED: [Signal; 6] = [
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGQUIT,
    Signal::SIGHUP,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
];

/// Whether this process should be the init: PID 1 of its namespace, and not the child of one.
pub fn wanted(pid: Pid, marked: bool) -> bool {
    pid.as_raw() == 1 && !marked
}

/// How to start this binary again, from its executable (`/proc/self/exe`) and its whole command
/// line (`/proc/self/cmdline`): the same arguments after the first. Through its dynamic loader
/// (`ld.so --library-path … /opt/agentcube/picod …`, as the local backend starts a dynamically
/// linked PicoD on an image) the executable is the loader and the command line the loader's, so
/// it goes through the loader again, with the loader's options; `std::env::args` would have
/// lost them.
pub fn again(
    current_exe: Option<PathBuf>,
    mut cmdline: Vec<OsString>,
) -> (OsString, Vec<OsString>) {
    let first = if cmdline.is_empty() {
        OsString::from("picod")
    } else {
        cmdline.remove(0)
    };
    (current_exe.map_or(first, Into::into), cmdline)
}

/// The arguments of a `/proc/PID/cmdline`: NUL-terminated, an empty one kept.
pub fn arguments(cmdline: &[u8]) -> Vec<OsString> {
    use std::os::unix::ffi::OsStrExt;
    cmdline
        .strip_suffix(&[0])
        .unwrap_or(cmdline)
        .split(|b| *b == 0)
        .map(|a| std::ffi::OsStr::from_bytes(a).to_os_string())
        .collect()
}

/// Starts `program` with `args` (this binary again) marked [`CHILD_MARK`], then reaps and
/// forwards until it ends; returns its exit status (128 + signal when killed). Must run before
/// any other thread exists: the blocked signals are this thread's.
pub fn supervise(program: OsString, args: Vec<OsString>) -> std::io::Result<ExitCode> {
    let mut waited = SigSet::empty();
    waited.add(Signal::SIGCHLD);
    for s in FORWARDED {
        waited.add(s);
    }
    sigprocmask(SigmaskHow::SIG_BLOCK, Some(&waited), None)?;
    // The child inherits the blocked set: it unblocks it first thing ([`as_child`]).
    let child = std::process::Command::new(program)
        .args(args)
        .env(CHILD_MARK, "1")
        .spawn()?;
    let child = Pid::from_raw(child.id() as i32);
    loop {
        let signal = waited.wait()?;
        if signal != Signal::SIGCHLD {
            let _ = kill(child, signal);
            continue;
        }
        if let Some(code) = reap(child) {
            return Ok(code);
        }
    }
}

/// In the child [`supervise`] started: the signals its init blocked are delivered again.
pub fn as_child() -> std::io::Result<()> {
    Ok(sigprocmask(
        SigmaskHow::SIG_SETMASK,
        Some(&SigSet::empty()),
        None,
    )?)
}

/// Reaps every process that has ended; the child's exit status once it is among them.
fn reap(child: Pid) -> Option<ExitCode> {
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) if pid == child => {
                return Some(ExitCode::from(code.clamp(0, 255) as u8));
            }
            Ok(WaitStatus::Signaled(pid, signal, _)) if pid == child => {
                return Some(ExitCode::from(128 + signal as u8));
            }
            Ok(WaitStatus::StillAlive) | Err(_) => return None,
            Ok(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn it_starts_again_the_way_it_was_started() {
        let os = |v: &[&str]| v.iter().map(OsString::from).collect::<Vec<_>>();
        let me = PathBuf::from("/opt/agentcube/picod");
        let (program, args) = again(Some(me.clone()), os(&["picod", "--listen", "unix:/s"]));
        assert_eq!((program, args), (me.into(), os(&["--listen", "unix:/s"])));
        // Through the dynamic loader: its options are kept.
        let loader = PathBuf::from("/opt/agentcube/lib/ld-linux-x86-64.so.2");
        let line = os(&[
            "/opt/agentcube/lib/ld-linux-x86-64.so.2",
            "--library-path",
            "/opt/agentcube/lib",
            "/opt/agentcube/picod",
            "--workspace",
            "/w",
        ]);
        let (program, args) = again(Some(loader.clone()), line.clone());
        assert_eq!((program, args), (loader.into(), line[1..].to_vec()));
        assert_eq!(
            again(None, os(&["picod", "-x"])),
            ("picod".into(), os(&["-x"]))
        );
    }

    #[test]
    fn a_command_line_keeps_empty_arguments() {
        let line = arguments(b"picod\0--sandbox-name\0\0-x\0");
        assert_eq!(
            line,
            ["picod", "--sandbox-name", "", "-x"].map(OsString::from)
        );
    }

    #[test]
    fn only_pid_1_unmarked_is_the_init() {
        assert!(wanted(Pid::from_raw(1), false));
        assert!(!wanted(Pid::from_raw(1), true));
        assert!(!wanted(Pid::from_raw(2), false));
        assert!(!wanted(nix::unistd::getpid(), false), "tests are not PID 1");
    }
}
