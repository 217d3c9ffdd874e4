//! The entry-point probe (upstream PR #256): a pod can be Ready before its port accepts
//! connections, so a session is published only once every port answers a TCP connect.

use std::time::Duration;

/// Each connect attempt's bound (upstream: 1 s).
const DIAL_TIMEOUT: Duration = Duration::from_secs(1);
/// Pause between attempts (upstream: 1 s; shorter here, so a port that opens a moment after the
/// pod is Ready costs milliseconds, not a second).
const RETRY: Duration = Duration::from_millis(100);

/// Returns once `addr` accepts a TCP connection, or fails after `within`.
pub async fn wait_open(addr: &str, within: Duration) -> Result<(), ()> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let attempt =
            tokio::time::timeout(DIAL_TIMEOUT, tokio::net::TcpStream::connect(addr)).await;
        if matches!(attempt, Ok(Ok(_))) {
            return Ok(());
        }
        if tokio::time::Instant::now() + RETRY >= deadline {
            return Err(());
        }
        tokio::time::sleep(RETRY).await;
    }
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
