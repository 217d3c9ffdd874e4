//! The entry-point probe (upstream PR #256): a pod can be Ready before its port accepts
//! connections, so a session is published only once every port answers a TCP connect.

use std::time::Duration;

/// Each connect attempt's bound (upstream: 1 s).
const DIAL_TIMEOUT: Duration = Duration::from_secs(1);
/// Pauses between attempts: the first short, doubling up to [`RETRY_MAX`] (upstream: a flat 1 s).
/// A pod is Ready as soon as its container started, which on a fast node is a few milliseconds
/// before PicoD listens: a flat pause would add itself to every cold create.
const RETRY_FIRST: Duration = Duration::from_millis(2);
const RETRY_MAX: Duration = Duration::from_millis(100);

/// Returns once `addr` accepts a TCP connection, or fails after `within`.
pub async fn wait_open(addr: &str, within: Duration) -> Result<(), ()> {
    let start = tokio::time::Instant::now();
    let deadline = start + within;
    let mut pause = RETRY_FIRST;
    for attempt in 1.. {
        let dial = tokio::time::timeout(DIAL_TIMEOUT, tokio::net::TcpStream::connect(addr)).await;
        if matches!(dial, Ok(Ok(_))) {
            tracing::debug!(addr, attempt, elapsed = ?start.elapsed(), "entry point open");
            return Ok(());
        }
        if tokio::time::Instant::now() + pause >= deadline {
            break;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(RETRY_MAX);
    }
    tracing::debug!(addr, elapsed = ?start.elapsed(), "entry point still closed");
    Err(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waits_for_a_port_that_opens_late_and_gives_up_on_one_that_never_does() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let a = addr.to_string();
        let opener = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            tokio::net::TcpListener::bind(addr).await.unwrap()
        });
        let started = tokio::time::Instant::now();
        wait_open(&a, Duration::from_secs(5)).await.unwrap();
        assert!(started.elapsed() >= Duration::from_millis(250));
        drop(opener.await.unwrap());
        assert!(wait_open(&a, Duration::from_millis(400)).await.is_err());
    }
}
