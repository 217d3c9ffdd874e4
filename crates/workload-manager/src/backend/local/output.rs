//! A sandbox's output: its launcher's stdout and stderr (PicoD's log, an agent's own output).
//!
//! The sandbox writes into a pipe, never into a host file: the manager drains the pipe into
//! `sandbox.log` in the sandbox's private directory, and moves a full log to `sandbox.log.1`
//! (the previous one is dropped), so a sandbox keeps at most two logs of [`MAX_LOG`] bytes on
//! the host's disk. Before, the launcher's stdout and stderr were `sandbox.log` itself: an
//! agent printing without end filled the host's disk, past its workspace quota.
//!
//! The pipe is read at most [`LOG_RATE`] bytes a second (after a first second's worth at once):
//! past that, the pipe fills and the sandbox's writes wait, as on a slow terminal. Nothing is
//! dropped, and a sandbox printing without end costs the manager next to nothing (copying
//! whatever it printed cost the manager several times the CPU the sandbox spent printing it,
//! past the sandbox's own CPU limit).

use std::io;
use std::path::{Path, PathBuf};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The largest a sandbox's log grows before it is moved to `sandbox.log.1`.
pub const MAX_LOG: u64 = 1 << 20;

/// The most a sandbox's output is read per second.
pub const LOG_RATE: u64 = 1 << 20;

/// How much of a sandbox's output is kept, and how fast it is taken.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// The largest `sandbox.log` grows before it is rotated.
    pub(crate) max: u64,
    /// Bytes read per second at most.
    pub(crate) rate: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max: MAX_LOG,
            rate: LOG_RATE,
        }
    }
}

/// The write end of a sandbox's output pipe, for its launcher's stdout and stderr.
pub(crate) struct Output {
    pub(crate) stdout: std::io::PipeWriter,
    pub(crate) stderr: std::io::PipeWriter,
}

/// Says when a sandbox's output has all been written to its log (every writer gone).
#[derive(Debug, Clone)]
pub(crate) struct Drained(tokio::sync::watch::Receiver<bool>);

impl Drained {
    /// Waits until the log holds all the sandbox wrote, for at most `limit`.
    pub(crate) async fn wait(&self, limit: std::time::Duration) {
        let mut rx = self.0.clone();
        let _ = tokio::time::timeout(limit, rx.wait_for(|done| *done)).await;
    }
}

/// Creates `log` (truncated) and a pipe drained into it within `limits`, until every holder
/// of the returned write ends has closed them.
pub(crate) fn start(log: PathBuf, limits: Limits) -> io::Result<(Output, Drained)> {
    let (max, rate) = (limits.max.max(1), limits.rate.max(1));
    let file = std::fs::File::create(&log)?;
    let (reader, writer) = std::io::pipe()?;
    let reader = tokio::net::unix::pipe::Receiver::from_owned_fd(reader.into())?;
    let output = Output {
        stdout: writer.try_clone()?,
        stderr: writer,
    };
    let (done, drained) = tokio::sync::watch::channel(false);
    let log = Log {
        path: log,
        file: Some(tokio::fs::File::from_std(file)),
        written: 0,
        max,
    };
    tokio::spawn(async move {
        drain(reader, log, Bucket::new(rate)).await;
        let _ = done.send(true);
    });
    Ok((output, Drained(drained)))
}

/// The log being written.
struct Log {
    path: PathBuf,
    /// `None` once the log could not be written (its directory removed): the rest is dropped.
    file: Option<tokio::fs::File>,
    written: u64,
    max: u64,
}

impl Log {
    async fn write(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.written == self.max {
                self.file = rotate(&self.path).await.ok();
                self.written = 0;
            }
            let Some(file) = &mut self.file else { return };
            let fits = bytes.len().min((self.max - self.written) as usize);
            if file.write_all(&bytes[..fits]).await.is_err() {
                self.file = None;
                return;
            }
            self.written += fits as u64;
            bytes = &bytes[fits..];
        }
    }
}

/// Copies the pipe into the log until its end, at `bucket`'s pace; once the log cannot be
/// written (its directory removed), the rest is read and dropped.
async fn drain(mut pipe: tokio::net::unix::pipe::Receiver, mut log: Log, mut bucket: Bucket) {
    let mut buf = vec![0u8; (64 << 10).min(bucket.rate as usize)];
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                log.write(&buf[..n]).await;
                bucket.take(n as u64).await;
            }
        }
    }
    if let Some(mut file) = log.file {
        let _ = file.flush().await;
    }
}

/// A token bucket: `rate` bytes a second, and up to a second's worth at once.
struct Bucket {
    rate: u64,
    tokens: u64,
    at: tokio::time::Instant,
}

impl Bucket {
    fn new(rate: u64) -> Self {
        Self {
            rate,
            tokens: rate,
            at: tokio::time::Instant::now(),
        }
    }

    /// Takes `n` bytes' worth, waiting until the bucket holds them (in debt past a second's).
    async fn take(&mut self, n: u64) {
        let now = tokio::time::Instant::now();
        let earned = (now - self.at).as_secs_f64() * self.rate as f64;
        self.tokens = self.tokens.saturating_add(earned as u64).min(self.rate);
        self.at = now;
        if self.tokens >= n {
            self.tokens -= n;
            return;
        }
        let short = n - self.tokens;
        tokio::time::sleep(std::time::Duration::from_secs_f64(
            short as f64 / self.rate as f64,
        ))
        .await;
        self.tokens = 0;
        self.at = tokio::time::Instant::now();
    }
}

/// Moves `path` to `path.1` (replacing it) and opens a new, empty `path`.
async fn rotate(path: &Path) -> io::Result<tokio::fs::File> {
    let mut old = path.as_os_str().to_owned();
    old.push(".1");
    tokio::fs::rename(path, &old).await?;
    tokio::fs::File::create(path).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::time::Duration;

    /// Writes `chunks` to the pipe from a thread of its own (writes block while the pipe is full).
    async fn write(out: Output, chunks: Vec<Vec<u8>>) {
        tokio::task::spawn_blocking(move || {
            let Output {
                mut stdout,
                mut stderr,
            } = out;
            for (i, c) in chunks.iter().enumerate() {
                let w = if i % 2 == 0 { &mut stdout } else { &mut stderr };
                w.write_all(c).unwrap();
            }
        })
        .await
        .unwrap();
    }

    fn unlimited(max: u64) -> Limits {
        Limits {
            max,
            rate: u64::MAX,
        }
    }

    /// Past the first second's worth, output is taken at the rate: the writer waits.
    #[tokio::test]
    async fn output_is_taken_at_the_rate() {
        let dir = tempfile::tempdir().unwrap();
        let limits = Limits {
            max: 1 << 20,
            rate: 256 << 10,
        };
        let (out, drained) = start(dir.path().join("sandbox.log"), limits).unwrap();
        let started = std::time::Instant::now();
        write(out, vec![vec![b'z'; 64 << 10]; 12]).await;
        drained.wait(Duration::from_secs(10)).await;
        let took = started.elapsed();
        // 768 KiB: 256 at once, then 512 at 256 KiB/s (less what the pipe holds at the end).
        assert!(took >= Duration::from_millis(1500), "{took:?}");
        assert!(took < Duration::from_secs(5), "{took:?}");
        let kept = std::fs::metadata(dir.path().join("sandbox.log"))
            .unwrap()
            .len();
        assert_eq!(kept, 768 << 10, "nothing dropped");
    }

    #[tokio::test]
    async fn output_past_the_limit_keeps_two_logs_and_the_newest_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("sandbox.log");
        let (out, drained) = start(log.clone(), unlimited(1000)).unwrap();
        let lines: Vec<Vec<u8>> = (0..100)
            .map(|i| format!("line {i:04} {}\n", "x".repeat(40)).into_bytes())
            .collect();
        let all = lines.concat();
        write(out, lines).await;
        drained.wait(Duration::from_secs(5)).await;
        let now = std::fs::read(&log).unwrap();
        let before = std::fs::read(dir.path().join("sandbox.log.1")).unwrap();
        assert!(now.len() <= 1000 && !before.is_empty() && before.len() <= 1000);
        assert!(
            all.ends_with(&[before, now].concat()),
            "the newest bytes, in order"
        );
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
    }

    #[tokio::test]
    async fn a_removed_log_directory_stops_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (out, drained) = start(dir.path().join("sandbox.log"), unlimited(1000)).unwrap();
        std::fs::remove_dir_all(dir.path()).unwrap();
        // Far more than a pipe holds: the writer would wait for ever if the drain stopped.
        let written = tokio::time::timeout(
            Duration::from_secs(10),
            write(out, vec![vec![b'y'; 64 << 10]; 64]),
        );
        assert!(written.await.is_ok(), "the writer was held up");
        drained.wait(Duration::from_secs(5)).await;
        assert!(*drained.0.borrow());
    }
}
