//! Startup, readiness and liveness probes: `httpGet` (any 2xx/3xx) and `tcpSocket` against the
//! pod IP, with a short timeout. A startup probe runs every `periodSeconds` after
//! `initialDelaySeconds` until it passes, and holds the others back meanwhile (the pod is not
//! Ready, liveness is not probed); readiness is checked on every sync after that; liveness every
//! `periodSeconds` after `initialDelaySeconds`. `failureThreshold` failures in a row of the
//! startup or liveness probe restart the container. Exec and gRPC probes are not run here: they
//! count as passing.

use std::net::Ipv4Addr;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Pod, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TIMEOUT: Duration = Duration::from_secs(1);

fn port(container: &Container, p: &IntOrString) -> Option<u16> {
    match p {
        IntOrString::Int(n) => u16::try_from(*n).ok(),
        IntOrString::String(name) => container
            .ports
            .iter()
            .flatten()
            .find(|cp| cp.name.as_deref() == Some(name.as_str()))
            .and_then(|cp| u16::try_from(cp.container_port).ok()),
    }
}

/// Whether the pod's first container passes its readiness probe (true without one).
pub async fn ready(pod: &Pod, ip: Ipv4Addr) -> bool {
    let Some(container) = first(pod) else {
        return false;
    };
    match &container.readiness_probe {
        Some(probe) => passes(container, probe, ip).await,
        None => true,
    }
}

/// A container's startup and liveness probes, tracked across syncs (reset at each start).
#[derive(Debug, Default)]
pub struct Probes {
    /// The startup probe passed (or there is none): liveness and readiness count from then.
    started: bool,
    next: Option<std::time::Instant>,
    failures: i32,
}

impl Probes {
    /// Whether the container has started, as its startup probe says (`true` without one).
    pub fn started(&self, pod: &Pod) -> bool {
        self.started || first(pod).is_none_or(|c| c.startup_probe.is_none())
    }

    /// Probes when due (the container has run for `since`): the startup probe until it passes,
    /// then the liveness probe. `true` when the container must be restarted (the probe's
    /// failure threshold reached).
    pub async fn failed(&mut self, pod: &Pod, ip: Ipv4Addr, since: std::time::Instant) -> bool {
        let Some(container) = first(pod) else {
            return false;
        };
        let starting = !self.started(pod);
        let probe = if starting {
            container.startup_probe.as_ref()
        } else {
            container.liveness_probe.as_ref()
        };
        let Some(probe) = probe else {
            return false;
        };
        let now = std::time::Instant::now();
        let delay = Duration::from_secs(probe.initial_delay_seconds.unwrap_or(0).max(0) as u64);
        if now < since + delay || self.next.is_some_and(|t| now < t) {
            return false;
        }
        self.next =
            Some(now + Duration::from_secs(probe.period_seconds.unwrap_or(10).max(1) as u64));
        if passes(container, probe, ip).await {
            self.failures = 0;
            if starting {
                // Liveness starts with its own initial delay counted from the start, as the
                // kubelet does: the next sync probes it.
                self.started = true;
                self.next = None;
            }
            return false;
        }
        self.failures += 1;
        if self.failures >= probe.failure_threshold.unwrap_or(3).max(1) {
            *self = Self::default();
            return true;
        }
        false
    }
}

fn first(pod: &Pod) -> Option<&Container> {
    pod.spec.as_ref().and_then(|s| s.containers.first())
}

async fn passes(container: &Container, probe: &Probe, ip: Ipv4Addr) -> bool {
    if let Some(h) = &probe.http_get {
        let Some(p) = port(container, &h.port) else {
            return false;
        };
        let path = h.path.clone().unwrap_or_else(|| "/".into());
        return tokio::time::timeout(TIMEOUT, http_ok(ip, p, &path))
            .await
            .unwrap_or(false);
    }
    if let Some(t) = &probe.tcp_socket {
        let Some(p) = port(container, &t.port) else {
            return false;
        };
        return tokio::time::timeout(TIMEOUT, tokio::net::TcpStream::connect((ip, p)))
            .await
            .is_ok_and(|r| r.is_ok());
    }
    true
}

async fn http_ok(ip: Ipv4Addr, port: u16, path: &str) -> bool {
    let Ok(mut s) = tokio::net::TcpStream::connect((ip, port)).await else {
        return false;
    };
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {ip}:{port}\r\nUser-Agent: kube-probe/1.37\r\nConnection: close\r\n\r\n"
    );
    if s.write_all(req.as_bytes()).await.is_err() {
        return false;
    }
    let mut buf = [0u8; 32];
    let mut n = 0;
    while n < 12 {
        match s.read(&mut buf[n..]).await {
            Ok(0) | Err(_) => break,
            Ok(k) => n += k,
        }
    }
    let head = String::from_utf8_lossy(&buf[..n]);
    head.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse::<u16>().ok())
        .is_some_and(|c| (200..400).contains(&c))
}
