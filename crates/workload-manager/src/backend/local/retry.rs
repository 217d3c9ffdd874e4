//! Retrying what a removed sandbox holds for a moment after its kill (its cgroups, its
//! directories): the kernel usually ends the processes within a millisecond or two, so the first
//! retries come quickly (a fixed 20 ms poll made every removal take over 20 ms), then every 20 ms,
//! for about a second in all.

use std::time::Duration;

/// The pauses between attempts: 1, 2, 4, 8 and 16 ms, then 20 ms, 0.99 s in all.
fn pauses() -> impl Iterator<Item = Duration> {
    (0..5)
        .map(|i| Duration::from_millis(1 << i))
        .chain(std::iter::repeat_n(Duration::from_millis(20), 48))
}

/// Runs `attempt` until it succeeds or [`pauses`] run out; the last result.
pub async fn until_ok<T, F>(mut attempt: impl FnMut() -> F) -> std::io::Result<T>
where
    F: Future<Output = std::io::Result<T>>,
{
    let mut last = attempt().await;
    for pause in pauses() {
        if last.is_ok() {
            break;
        }
        tokio::time::sleep(pause).await;
        last = attempt().await;
    }
    last
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_start_quickly_and_last_about_a_second() {
        let p: Vec<Duration> = pauses().collect();
        assert_eq!(p[0], Duration::from_millis(1));
        let total: Duration = p.iter().sum();
        assert!(total > Duration::from_millis(950) && total <= Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn stops_at_the_first_success_and_gives_the_last_failure() {
        let mut n = 0;
        let ok = until_ok(|| {
            n += 1;
            let n = n;
            async move {
                if n < 3 {
                    Err(std::io::Error::other("busy"))
                } else {
                    Ok(n)
                }
            }
        })
        .await;
        assert_eq!(ok.unwrap(), 3);
        let mut tries = 0;
        let failed: std::io::Result<()> = until_ok(|| {
            tries += 1;
            async { Err(std::io::Error::other("busy")) }
        })
        .await;
        assert!(failed.is_err());
        assert_eq!(tries, pauses().count() + 1);
    }
}
