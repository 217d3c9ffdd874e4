//! `POST /api/processes/kill-all` (extension): ends every process of the sandbox but PicoD and
//! the sandbox's init, so that a session whose commands left too much running — a fork bomb, a
//! server started in a loop — works again without losing its workspace. At the process limit
//! a command cannot even start `kill`; PicoD sends the signals itself.
//!
//! Only where the sandbox is a PID namespace of its own with PicoD as its serving process:
//! PicoD is PID 2 and its parent PID 1 (bubblewrap's init, PicoD's own [`crate::init`], a
//! container runtime's). Anywhere else — PicoD run on a host, in a pod sharing its process
//! namespace — the same sweep would reach processes that are not the sandbox's, so it is
//! refused (409). So is it in a sandbox whose agent PicoD supervises (`picod -- CMD`): the agent
//! would go too, and the sandbox with it.
//!
//! Processes are read from `/proc` and sent `SIGKILL`, again and again until a pass finds none
//! left (what a fork bomb forks during one pass is caught by the next) or [`DEADLINE`] passes.
//! Zombies are skipped: they are gone already, waiting for their parent to reap them.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::State;
use nix::sys::signal::{Signal, kill};
use nix::unistd::{Pid, getpid, getppid};
use serde::Serialize;

use crate::error::ApiError;
use crate::server::AppState;

/// How long the sweep may go on while processes keep appearing.
pub const DEADLINE: Duration = Duration::from_secs(2);

/// The answer: how many processes were sent `SIGKILL`, how many were still there at the end.
#[derive(Debug, Serialize)]
pub struct Swept {
    pub killed: usize,
    pub left: usize,
}

/// `POST /api/processes/kill-all`.
pub async fn kill_all(State(s): State<AppState>) -> Result<Json<Swept>, ApiError> {
    if s.config.supervises_agent {
        return Err(ApiError::Conflict(
            "this sandbox runs an agent, which ending every process would end too".into(),
        ));
    }
    let proc_self = std::fs::read_link("/proc/self").ok();
    if !own_namespace(getpid(), getppid(), proc_self.as_deref()) {
        return Err(ApiError::Conflict(
            "PicoD is not the serving process of a PID namespace of its own (PID 2 under the \
             sandbox's init, with that namespace's /proc), so ending every other process could \
             end processes that are not the sandbox's"
                .into(),
        ));
    }
    let me = getpid().as_raw();
    let mut killed = HashSet::new();
    let started = Instant::now();
    loop {
        let found = others(me).map_err(ApiError::internal)?;
        if found.is_empty() || started.elapsed() >= DEADLINE {
            tracing::info!(killed = killed.len(), left = found.len(), "processes ended");
            return Ok(Json(Swept {
                killed: killed.len(),
                left: found.len(),
            }));
        }
        for pid in found {
            if kill(Pid::from_raw(pid), Signal::SIGKILL).is_ok() {
                killed.insert(pid);
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Whether PicoD (`pid`, parent `ppid`) serves a PID namespace of its own, whose `/proc` is
/// mounted (`proc_self`, where `/proc/self` points, names PID 2 too: a namespace seeing a
/// host's `/proc` would have the sweep read host pids).
pub fn own_namespace(pid: Pid, ppid: Pid, proc_self: Option<&std::path::Path>) -> bool {
    pid.as_raw() == 2 && ppid.as_raw() == 1 && proc_self.is_some_and(|p| p.as_os_str() == "2")
}

/// Every live process but PID 1 and `me`, read from `/proc` (a process gone meanwhile is
/// skipped).
fn others(me: i32) -> std::io::Result<Vec<i32>> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc")?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        if pid == 1 || pid == me {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        if !zombie(&stat) {
            pids.push(pid);
        }
    }
    Ok(pids)
}

/// Whether a `/proc/PID/stat` line is a zombie's (the state after the `)` ending the name,
/// which may itself hold `)` and spaces).
fn zombie(stat: &str) -> bool {
    stat.rsplit_once(") ")
        .is_some_and(|(_, rest)| rest.starts_with(['Z', 'X']))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_pid_2_under_pid_1_with_its_own_proc_serves_its_own_namespace() {
        let (one, two) = (Pid::from_raw(1), Pid::from_raw(2));
        let ours = Some(std::path::Path::new("2"));
        assert!(own_namespace(two, one, ours));
        assert!(
            !own_namespace(two, Pid::from_raw(0), ours),
            "a parent outside"
        );
        assert!(!own_namespace(
            one,
            Pid::from_raw(0),
            Some(std::path::Path::new("1"))
        ));
        assert!(!own_namespace(
            Pid::from_raw(7),
            one,
            Some(std::path::Path::new("7"))
        ));
        let host = Some(std::path::Path::new("48213"));
        assert!(!own_namespace(two, one, host), "the host's /proc");
        assert!(!own_namespace(two, one, None), "no /proc");
        let here = std::fs::read_link("/proc/self").ok();
        assert!(
            !own_namespace(getpid(), getppid(), here.as_deref()),
            "tests run on the host"
        );
    }

    #[test]
    fn zombies_are_told_by_the_state_after_the_name() {
        assert!(zombie("12 (sleep) Z 1 11 0"));
        assert!(zombie("12 (a) Z) b) Z 1 11 0"));
        assert!(!zombie("12 (a) Z) b) S 1 11 0"), "a name holding ') Z'");
        assert!(!zombie("12 (sleep) S 1 11 0"));
    }
}
