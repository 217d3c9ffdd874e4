//! What a listener tolerates from a client: how long, how many.

use std::time::Duration;

/// Per-listener limits. The defaults suit production; every binary exposes them as flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// From the first byte of a request to its last header byte (slowloris).
    pub header_read_timeout: Duration,
    /// Longest pause between two chunks of a request body (a stalled upload), and longest time
    /// a client may take no byte of an answer being written to it (a stalled download). The
    /// transfer as a whole may take longer, as long as it keeps moving.
    pub body_idle_timeout: Duration,
    /// How long a connection may sit with no request in flight before it is closed.
    pub keep_alive_idle: Duration,
    /// Connections served at once; more are answered with the component's 503 and closed.
    pub max_connections: usize,
    /// Plain HTTP/1.1 requests go through the fast lane (`lane.rs`); off, hyper serves all.
    pub fast_lane: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            body_idle_timeout: Duration::from_secs(30),
            keep_alive_idle: Duration::from_secs(90),
            max_connections: 10_000,
            fast_lane: true,
        }
    }
}

/// Raises the soft open-files limit to the hard one (a server that runs out of descriptors
/// cannot even log why) and returns the resulting soft limit.
pub fn raise_fd_limit() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => hard,
            Err(_) => soft,
        },
        Ok((soft, _)) => soft,
        Err(_) => 1024,
    }
}

impl Limits {
    /// Caps `max_connections` so that `fds_per_connection` descriptors per connection (2 for a
    /// proxy: client and upstream) plus a reserve for everything else fit in `fd_limit`.
    pub fn fit_fd_limit(mut self, fd_limit: u64, fds_per_connection: u64) -> Self {
        const RESERVE: u64 = 256;
        let fit = fd_limit.saturating_sub(RESERVE) / fds_per_connection.max(1);
        self.max_connections = self.max_connections.min(fit.max(16) as usize);
        self
    }
}

/// The flags every server binary takes for its listener (`--header-timeout 10s` …).
#[derive(Debug, Clone, clap::Args)]
pub struct LimitArgs {
    /// Time a client may take to send a request's headers (slowloris guard), Go duration.
    #[arg(long, env = "AGENTCUBE_HEADER_TIMEOUT", default_value = "10s")]
    pub header_timeout: agentcube_types::GoDuration,
    /// Longest pause between two chunks of a request body, or in taking an answer (stalled
    /// uploads and downloads), Go duration.
    #[arg(long, env = "AGENTCUBE_BODY_IDLE_TIMEOUT", default_value = "30s")]
    pub body_idle_timeout: agentcube_types::GoDuration,
    /// How long an idle keep-alive connection is kept, Go duration.
    #[arg(long, env = "AGENTCUBE_KEEP_ALIVE_IDLE", default_value = "90s")]
    pub keep_alive_idle: agentcube_types::GoDuration,
    /// Connections served at once (more get a 503); capped to fit the open-files limit.
    #[arg(long, env = "AGENTCUBE_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Answer plain HTTP/1.1 requests on the fast lane (`false`: hyper's server takes every
    /// request, as before the lane existed).
    #[arg(long, env = "AGENTCUBE_HTTP1_FAST_LANE", default_value_t = true, action = clap::ArgAction::Set)]
    pub http1_fast_lane: bool,
}

impl LimitArgs {
    /// The limits, with `default_max` connections unless the flag says otherwise.
    pub fn limits(&self, default_max: usize) -> Limits {
        Limits {
            header_read_timeout: self.header_timeout.0,
            body_idle_timeout: self.body_idle_timeout.0,
            keep_alive_idle: self.keep_alive_idle.0,
            max_connections: self.max_connections.unwrap_or(default_max),
            fast_lane: self.http1_fast_lane,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fast_lane_is_on_unless_turned_off() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            limits: LimitArgs,
        }
        let on = <Cli as clap::Parser>::try_parse_from(["x"]).unwrap();
        assert!(on.limits.limits(1).fast_lane);
        let off =
            <Cli as clap::Parser>::try_parse_from(["x", "--http1-fast-lane", "false"]).unwrap();
        assert!(!off.limits.limits(1).fast_lane);
    }

    #[test]
    fn connections_fit_the_descriptor_limit() {
        let l = Limits::default().fit_fd_limit(1024, 2);
        assert_eq!(l.max_connections, 384);
        let l = Limits::default().fit_fd_limit(1 << 20, 2);
        assert_eq!(l.max_connections, 10_000, "never above the configured cap");
        assert_eq!(Limits::default().fit_fd_limit(10, 2).max_connections, 16);
    }
}
