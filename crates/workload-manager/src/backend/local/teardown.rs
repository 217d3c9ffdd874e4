//! Tearing sandboxes down: kill, remove the cgroup and directories, give back the uid and the
//! memory budget. A cgroup a process still holds after SIGKILL (stuck in the kernel) is retried
//! in the background, its uid and memory held until it is gone, whether this run removed the
//! sandbox or a previous run left it. A sandbox that died on its own is told apart here too
//! ([`LocalBackend::why_dead`]: its exit, a memory kill, its last output).

use std::process::Stdio;
use std::sync::atomic::Ordering;
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};

use super::cgroup::{self, SandboxCgroup};
use super::layout::SandboxPaths;
use super::{LocalBackend, human_bytes, layout, output};

impl LocalBackend {
    /// Cgroups of a predecessor's sandboxes that a process outliving SIGKILL still holds: the
    /// uids of the processes in them are kept from new sandboxes until they are gone, and they
    /// are retried in the background (on the current Tokio runtime; without one, at the next
    /// start).
    pub(super) fn keep_leftovers(&self, held: Vec<(String, SandboxCgroup)>) {
        for (name, cg) in held {
            let uids: Vec<u32> = match &self.inner.uids {
                Some(pool) => cg.uids().into_iter().filter(|u| pool.reserve(*u)).collect(),
                None => Vec::new(),
            };
            tracing::warn!(
                sandbox = %name,
                cgroups = ?cg.dirs(),
                uids = ?uids,
                "a sandbox cgroup left by a previous run still holds a process that outlived \
                 SIGKILL (stuck in the kernel); its uids are kept from new sandboxes until it is \
                 gone, and it is retried in the background"
            );
            self.hold(name, cg, uids, 0);
        }
    }

    /// Kills a sandbox (its whole process group and cgroup), deletes its directories and gives
    /// its uid back.
    #[tracing::instrument(name = "remove_sandbox", skip(self))]
    pub(super) async fn remove(&self, name: &str) {
        if !layout::is_sandbox_name(name) {
            // Never one of ours (a record naming `../x` must not send us outside the state dir).
            tracing::warn!(sandbox = %name, "not a sandbox name; nothing removed");
            return;
        }
        // Counted while its directories are still going (shutdown waits for it).
        let _busy = super::Busy::new(&self.inner.busy);
        let entry = self.inner.running.lock().unwrap().remove(name);
        if let Some(runsc) = &self.inner.tools.runsc {
            let state = format!("--root={}", self.runsc_state().display());
            for args in [
                vec![state.as_str(), "kill", name, "KILL"],
                vec![state.as_str(), "delete", "-force", name],
            ] {
                let run = tokio::process::Command::new(runsc)
                    .args(&args)
                    .env_clear()
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
                let _ = tokio::time::timeout(Duration::from_secs(10), run).await;
            }
        }
        match entry {
            Some(r) => {
                if let Some(pgid) = r.pgid {
                    let _ = killpg(pgid, Signal::SIGKILL);
                }
                let mut exit = r.exit.clone();
                let _ =
                    tokio::time::timeout(Duration::from_secs(5), exit.wait_for(Option::is_some))
                        .await;
                let stuck = match r.cgroup {
                    Some(cg) => still_held(name, cg.remove().await).then_some(cg),
                    None => None,
                };
                r.paths.remove().await;
                if let (Ok(network), Some(n)) = (&self.inner.network, &r.net) {
                    network.detach(n).await;
                }
                match stuck {
                    None => self.release(r.uid.as_slice(), r.memory),
                    Some(cg) => {
                        tracing::warn!(
                            sandbox = %name,
                            cgroups = ?cg.dirs().iter().filter(|d| d.exists()).collect::<Vec<_>>(),
                            "a process of the removed sandbox outlived SIGKILL; its cgroup is \
                             retried in the background, its uid and memory stay held until it \
                             is gone"
                        );
                        let uids = r.uid.into_iter().collect();
                        self.hold(name.to_string(), cg, uids, r.memory);
                    }
                }
            }
            None => self.paths(name).remove().await,
        }
    }

    /// Counts a removed sandbox whose cgroup outlived the kill and has it [`reclaim`]ed in the
    /// background when there is a Tokio runtime (else it is left to the next start).
    ///
    /// [`reclaim`]: LocalBackend::reclaim
    fn hold(&self, name: String, cg: SandboxCgroup, uids: Vec<u32>, memory: u64) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        self.inner.reclaiming.fetch_add(1, Ordering::Relaxed);
        let this = self.clone();
        runtime.spawn(async move { this.reclaim(name, cg, uids, memory).await });
    }

    /// A removed sandbox whose cgroup outlived the kill (a process stuck in the kernel): retried
    /// with back-off (1 s, doubling, at most 30 s apart) until it is gone. Its uids and memory
    /// stay held until then, so no new sandbox runs as the uid of a process still alive, and the
    /// memory budget counts what is still in use.
    async fn reclaim(self, name: String, cg: SandboxCgroup, uids: Vec<u32>, memory: u64) {
        let mut wait = Duration::from_secs(1);
        loop {
            tokio::time::sleep(wait).await;
            if !still_held(&name, cg.remove().await) {
                break;
            }
            wait = (wait * 2).min(Duration::from_secs(30));
        }
        tracing::info!(sandbox = %name, "the removed sandbox's uid and memory are released");
        self.release(&uids, memory);
        self.inner.reclaiming.fetch_sub(1, Ordering::Relaxed);
    }

    /// Why a sandbox that died on its own ended, for its session's next user.
    pub(super) fn why_dead(&self, name: &str) -> String {
        use std::os::unix::process::ExitStatusExt;
        let status = self.exited(name).ok().flatten();
        // The launcher (bubblewrap, runsc) passes its program's death by a signal on as 128 + it.
        let signal = status.and_then(|s| {
            s.signal()
                .or(s.code().filter(|c| *c > 128).map(|c| c - 128))
        });
        let exited = match (signal, status.and_then(|s| s.code())) {
            (Some(n), _) => match nix::sys::signal::Signal::try_from(n) {
                Ok(sig) => format!("its sandbox was killed by signal {n} ({sig})"),
                Err(_) => format!("its sandbox was killed by signal {n}"),
            },
            (None, Some(code)) => format!("its sandbox exited with status {code}"),
            (None, None) => "its sandbox exited".to_string(),
        };
        match self.killed_for_memory(name) {
            Some(limit) => format!("{exited} after reaching its memory limit ({limit})"),
            None => exited,
        }
    }

    /// The sandbox's memory limit when the kernel killed one of its processes for memory (the
    /// `oom_kill` count of its cgroup).
    pub(super) fn killed_for_memory(&self, name: &str) -> Option<String> {
        let running = self.inner.running.lock().unwrap();
        let r = running.get(name)?;
        let events = std::fs::read_to_string(r.cgroup.as_ref()?.memory_events()?).ok()?;
        let kills: u64 = events
            .lines()
            .find_map(|l| l.strip_prefix("oom_kill "))?
            .trim()
            .parse()
            .ok()?;
        (kills > 0).then(|| human_bytes(r.memory))
    }

    /// The last lines the sandbox printed (its agent's, PicoD's), joined with ` | `, once its
    /// output is all in its log (waited for at most 1 s): for the manager's log, never a client.
    pub(super) async fn last_output(&self, name: &str, paths: &SandboxPaths) -> String {
        if let Some(drained) = self.drained(name) {
            drained.wait(Duration::from_secs(1)).await;
        }
        // Up to 2 MiB: read off the runtime's threads.
        let log = tokio::fs::read(paths.log()).await.unwrap_or_default();
        tail_of(&log)
    }

    /// When the sandbox's output is all in its log.
    pub(super) fn drained(&self, name: &str) -> Option<output::Drained> {
        let running = self.inner.running.lock().unwrap();
        running.get(name).map(|r| r.drained.clone())
    }
}

/// The last 5 lines of a sandbox's output, joined with ` | `, each cut at 300 characters (the
/// sandbox wrote them: bytes that are not UTF-8 and control characters are shown escaped, not
/// passed to the manager's log).
fn tail_of(log: &[u8]) -> String {
    const LINES: usize = 5;
    const CHARS: usize = 300;
    let text = String::from_utf8_lossy(log);
    let mut tail: Vec<String> = text
        .lines()
        .rev()
        .take(LINES)
        .map(|line| {
            let mut shown: String = line
                .chars()
                .take(CHARS)
                .flat_map(char::escape_debug)
                .collect();
            if line.chars().nth(CHARS).is_some() {
                shown.push('…');
            }
            shown
        })
        .collect();
    tail.reverse();
    tail.join(" | ")
}

/// Whether a sandbox's cgroup removal left it held by a process still in it (`EBUSY`: retry
/// later). Any other failure (the directory cannot be removed at all) is logged, not retried.
fn still_held(name: &str, removed: std::io::Result<()>) -> bool {
    let held = cgroup::held_by_a_process(&removed);
    if let (Err(e), false) = (&removed, held) {
        tracing::error!(sandbox = %name, error = %e, "cannot remove the sandbox's cgroup");
    }
    held
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_sandboxs_last_lines_reach_the_log_escaped_and_cut() {
        let mut log = b"one\ntwo\nthree\nfour\nfive\nsix: \x1b[31mred\rover\xff\n".to_vec();
        log.extend(b"long ".repeat(100));
        let tail = super::tail_of(&log);
        let lines: Vec<&str> = tail.split(" | ").collect();
        assert_eq!(lines.len(), 5, "{tail}");
        assert_eq!(lines[..3], ["three", "four", "five"]);
        assert_eq!(lines[3], "six: \\u{1b}[31mred\\rover\u{fffd}");
        assert!(
            lines[4].starts_with("long long") && lines[4].ends_with('…'),
            "{}",
            lines[4]
        );
        assert_eq!(lines[4].chars().count(), 301);
    }
}
