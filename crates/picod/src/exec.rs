//! `POST /api/execute`: run an argv in the workspace, buffered (upstream) or streamed (NDJSON).
//!
//! Each command gets its own process group. A timeout kills the group and answers exit code 124;
//! a client that goes away (the handler future or the response stream is dropped) also kills the
//! group. Once the leader exits normally, background processes it left are not killed (as
//! upstream), but PicoD stops waiting for their output after a short grace period.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::{Duration, Instant};

use agentcube_types::GoDuration;
use agentcube_types::picod::{ExecuteEvent, ExecuteRequest, ExecuteResponse};
use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::mpsc;

use crate::error::ApiError;
use crate::jail::{WorkDir, Workspace};
use crate::server::AppState;

/// Exit code reported for a command killed by its timeout (as GNU `timeout`).
pub const TIMEOUT_EXIT_CODE: i32 = 124;
/// Media type that selects the streaming mode.
pub const NDJSON: &str = "application/x-ndjson";
/// How long to keep reading output after the leader exited, for pipes held by leftovers.
const OUTPUT_GRACE: Duration = Duration::from_millis(200);

/// A validated command, ready to spawn.
#[derive(Debug)]
struct CommandSpec {
    argv: Vec<String>,
    timeout: Duration,
    /// Held open until the command has started (it may be `/proc/self/fd/N`).
    dir: WorkDir,
    env: BTreeMap<String, String>,
    /// What explains an ending (OOM kill, no network).
    diag: std::sync::Arc<crate::diagnose::Diagnostics>,
}

/// Output chunk from one of the two pipes.
enum Chunk {
    Stdout(Bytes),
    Stderr(Bytes),
}

/// How a run ended.
struct Outcome {
    exit_code: i32,
    timed_out: bool,
    /// The note explaining the ending, if any (see [`crate::diagnose`]).
    note: Option<String>,
    /// Set when the process could not be started; goes to stderr.
    spawn_error: Option<String>,
    start: jiff::Timestamp,
    end: jiff::Timestamp,
    elapsed: Duration,
}

/// The handler.
pub async fn execute(
    State(state): State<AppState>,
    headers: HeaderMap,
    req: Request,
) -> Result<Response, ApiError> {
    let bytes = crate::server::read_body(req, state.config.max_body_bytes).await?;
    let body: ExecuteRequest =
        serde_json::from_slice(&bytes).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let spec = validate(&state, body).await?;
    if wants_stream(&headers) {
        Ok(stream(spec))
    } else {
        let cap = state.config.max_output_bytes;
        Ok(Json(buffered(spec, cap).await).into_response())
    }
}

fn wants_stream(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains(NDJSON))
}

async fn validate(state: &AppState, body: ExecuteRequest) -> Result<CommandSpec, ApiError> {
    if body.command.is_empty() || body.command[0].is_empty() {
        return Err(ApiError::BadRequest("command cannot be empty".into()));
    }
    let timeout = match body.timeout.as_deref() {
        None | Some("") => state.config.default_timeout,
        Some(t) => {
            GoDuration::parse(t)
                .map_err(|e| ApiError::BadRequest(format!("Invalid timeout format: {e}")))?
                .0
        }
    };
    let timeout = if timeout.is_zero() {
        state.config.default_timeout
    } else {
        timeout
    };
    let dir = work_dir(&state.workspace, body.working_dir.unwrap_or_default()).await?;
    Ok(CommandSpec {
        argv: body.command,
        timeout,
        dir,
        env: body.env.unwrap_or_default(),
        diag: state.config.diagnostics.clone(),
    })
}

/// A command's working directory. The workspace root (no `cwd`, the common case) costs one
/// `dup` and is taken right here; any other path is walked on the blocking pool, since a
/// directory the sandbox mounted (FUSE, NFS) may block. Handing every request to the blocking
/// pool cost a thread wake-up each time, and a thread start on the first call after 10 s idle
/// (a fresh warm-pool sandbox's first command).
pub(crate) async fn work_dir(ws: &Workspace, cwd: String) -> Result<WorkDir, ApiError> {
    if cwd.is_empty() {
        return Ok(ws.work_dir("")?);
    }
    let ws = ws.clone();
    tokio::task::spawn_blocking(move || ws.work_dir(&cwd))
        .await
        .map_err(ApiError::internal)?
        .map_err(ApiError::from)
}

/// Kills the process group when dropped, unless disarmed: covers client disconnects.
struct GroupGuard(Option<Pid>);

impl GroupGuard {
    fn kill(&mut self) {
        if let Some(pgid) = self.0.take() {
            let _ = killpg(pgid, Signal::SIGKILL);
        }
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs the command, sending output chunks to `sink`. Stops early (killing the group) when the
/// sink's receiver is gone.
async fn run(spec: CommandSpec, sink: mpsc::Sender<Chunk>) -> Outcome {
    let start = jiff::Timestamp::now();
    let clock = Instant::now();
    let finish = |exit_code, timed_out, spawn_error| Outcome {
        exit_code,
        timed_out,
        note: None,
        spawn_error,
        start,
        end: jiff::Timestamp::now(),
        elapsed: clock.elapsed(),
    };
    let mut cmd = crate::init::command(&spec.argv[0]);
    spec.dir.apply(&mut cmd);
    cmd.args(&spec.argv[1..])
        .envs(&spec.env)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let oom_before = spec.diag.oom_kills();
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return finish(1, false, Some(spawn_error_text(&spec.argv[0], &e))),
    };
    killed_first_for_memory(&child);
    let mut guard = GroupGuard(child.id().map(|id| Pid::from_raw(id as i32)));
    let seen = std::sync::Arc::new(crate::diagnose::Seen::default());
    let pumps = [
        child
            .stdout
            .take()
            .map(|r| tokio::spawn(pump(r, None, sink.clone()))),
        child
            .stderr
            .take()
            .map(|r| tokio::spawn(pump(r, Some(seen.clone()), sink.clone()))),
    ];
    // `None`: the timeout fired or the client went away; either way the group is killed.
    let status = tokio::select! {
        s = child.wait() => Some(s.ok()),
        () = tokio::time::sleep(spec.timeout) => None,
        () = sink.closed() => None,
    };
    let timed_out = status.is_none();
    if timed_out {
        guard.kill();
        let _ = child.wait().await;
    } else {
        // Leftover background processes keep running, as upstream.
        guard.0 = None;
    }
    let status = status.flatten();
    for pump in pumps.into_iter().flatten() {
        let abort = pump.abort_handle();
        if tokio::time::timeout(OUTPUT_GRACE, pump).await.is_err() {
            abort.abort();
        }
    }
    // Go reports -1 for a process ended by a signal.
    let code = match status {
        _ if timed_out => TIMEOUT_EXIT_CODE,
        Some(s) => s.code().unwrap_or(-1),
        None => -1,
    };
    let mut outcome = finish(code, timed_out, None);
    if !timed_out {
        use std::os::unix::process::ExitStatusExt;
        let signal = status.and_then(|s| s.signal());
        outcome.note = spec.diag.explain(oom_before, signal, code != 0, &seen);
    }
    outcome
}

/// Text of a start failure, worded like Go's `exec` package so clients see familiar errors.
/// Makes a command (and what it starts from now on) the kernel's first choice when the sandbox
/// runs out of memory (`oom_score_adj` 1000; raising it needs no privilege): otherwise the
/// largest process goes, which was PicoD itself beside many small commands, and the session's
/// sandbox ended with it. Set right after the spawn: what the command forks in its first
/// instants keeps PicoD's score. A sandbox's code may lower it back as far as PicoD's, and may
/// kill PicoD outright anyway: this guards against accidents, not against the sandbox.
pub(crate) fn killed_first_for_memory(child: &tokio::process::Child) {
    if let Some(pid) = child.id()
        && let Err(e) = std::fs::write(format!("/proc/{pid}/oom_score_adj"), b"1000")
    {
        tracing::debug!(pid, error = %e, "cannot raise a command's oom_score_adj");
    }
}

fn spawn_error_text(program: &str, e: &std::io::Error) -> String {
    if e.kind() == std::io::ErrorKind::NotFound && !program.contains('/') {
        format!("exec: {program:?}: executable file not found in $PATH")
    } else {
        let msg = e.to_string();
        let msg = msg
            .split(" (os error")
            .next()
            .unwrap_or(&msg)
            .to_lowercase();
        let text = format!("fork/exec {program}: {msg}");
        if e.raw_os_error() == Some(nix::libc::EAGAIN) {
            format!("{text}\n{}", crate::diagnose::PROCESS_LIMIT)
        } else {
            text
        }
    }
}

/// Copies one pipe into `tx`; the stderr pump (`seen` given) also notes errors worth a note.
async fn pump(
    mut r: impl AsyncRead + Unpin,
    seen: Option<std::sync::Arc<crate::diagnose::Seen>>,
    tx: mpsc::Sender<Chunk>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                let b = Bytes::copy_from_slice(&buf[..n]);
                let chunk = match &seen {
                    Some(seen) => {
                        seen.scan(&b);
                        Chunk::Stderr(b)
                    }
                    None => Chunk::Stdout(b),
                };
                if tx.send(chunk).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Output kept in memory up to a cap; the rest is counted, not stored.
struct Capped {
    buf: Vec<u8>,
    cap: usize,
    dropped: usize,
}

impl Capped {
    fn new(cap: usize) -> Self {
        Self {
            buf: Vec::new(),
            cap,
            dropped: 0,
        }
    }

    fn push(&mut self, b: &[u8]) {
        let room = self.cap.saturating_sub(self.buf.len());
        let take = room.min(b.len());
        self.buf.extend_from_slice(&b[..take]);
        self.dropped += b.len() - take;
    }

    fn into_string(self) -> String {
        let mut s = String::from_utf8_lossy(&self.buf).into_owned();
        if self.dropped > 0 {
            s.push_str(&format!(
                "\n[picod: output truncated, {} bytes omitted]",
                self.dropped
            ));
        }
        s
    }
}

/// The upstream mode: wait for the end, answer one JSON object.
async fn buffered(spec: CommandSpec, cap: usize) -> ExecuteResponse {
    let timeout = spec.timeout;
    let (tx, mut rx) = mpsc::channel(64);
    let collect = async move {
        let (mut out, mut err) = (Capped::new(cap), Capped::new(cap));
        while let Some(chunk) = rx.recv().await {
            match chunk {
                Chunk::Stdout(b) => out.push(&b),
                Chunk::Stderr(b) => err.push(&b),
            }
        }
        (out, err)
    };
    let (outcome, (out, err)) = tokio::join!(run(spec, tx), collect);
    let stdout = out.into_string();
    let mut stderr = err.into_string();
    let extra = if let Some(e) = &outcome.spawn_error {
        Some(e.clone())
    } else if outcome.timed_out {
        Some(timeout_message(timeout))
    } else {
        outcome.note.clone()
    };
    if let Some(extra) = extra {
        if !stderr.is_empty() && !stderr.ends_with('\n') {
            stderr.push('\n');
        }
        stderr.push_str(&extra);
    }
    ExecuteResponse {
        stdout,
        stderr,
        exit_code: outcome.exit_code,
        duration: outcome.elapsed.as_secs_f64(),
        start_time: outcome.start.to_string(),
        end_time: outcome.end.to_string(),
    }
}

fn timeout_message(timeout: Duration) -> String {
    format!(
        "Command timed out after {:.0} seconds",
        timeout.as_secs_f64()
    )
}

/// The streaming mode: one NDJSON line per chunk as it happens, then an `exit` line.
fn stream(spec: CommandSpec) -> Response {
    let timeout = spec.timeout;
    let (tx, mut rx) = mpsc::channel::<Chunk>(16);
    let (line_tx, line_rx) = mpsc::channel::<Bytes>(16);
    tokio::spawn(async move {
        let forward_tx = line_tx.clone();
        let forward = async move {
            let (mut out_utf8, mut err_utf8) = (Utf8Carry::default(), Utf8Carry::default());
            loop {
                let chunk = tokio::select! {
                    c = rx.recv() => c,
                    // Client gone: dropping `rx` makes `run` kill the group.
                    () = forward_tx.closed() => return,
                };
                let Some(chunk) = chunk else { return };
                let event = match chunk {
                    Chunk::Stdout(b) => ExecuteEvent::Stdout {
                        data: out_utf8.push(&b),
                    },
                    Chunk::Stderr(b) => ExecuteEvent::Stderr {
                        data: err_utf8.push(&b),
                    },
                };
                if forward_tx.send(ndjson_line(&event)).await.is_err() {
                    return;
                }
            }
        };
        // `run` notices a vanished client through `tx.closed()` once `forward` stops reading.
        let (outcome, ()) = tokio::join!(run(spec, tx), forward);
        if let Some(e) = &outcome.spawn_error {
            let _ = line_tx
                .send(ndjson_line(&ExecuteEvent::Stderr { data: e.clone() }))
                .await;
        } else if outcome.timed_out {
            let data = format!("\n{}", timeout_message(timeout));
            let _ = line_tx
                .send(ndjson_line(&ExecuteEvent::Stderr { data }))
                .await;
        } else if let Some(note) = &outcome.note {
            let data = format!("\n{note}");
            let _ = line_tx
                .send(ndjson_line(&ExecuteEvent::Stderr { data }))
                .await;
        }
        let exit = ExecuteEvent::Exit {
            exit_code: outcome.exit_code,
            duration: outcome.elapsed.as_secs_f64(),
            start_time: outcome.start.to_string(),
            end_time: outcome.end.to_string(),
            timed_out: outcome.timed_out,
        };
        let _ = line_tx.send(ndjson_line(&exit)).await;
    });
    let body = Body::from_stream(futures_util::stream::unfold(line_rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, std::convert::Infallible>(b), rx))
    }));
    let mut resp = Response::new(body);
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(NDJSON));
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

fn ndjson_line(event: &ExecuteEvent) -> Bytes {
    let mut v = serde_json::to_vec(event).unwrap_or_default();
    v.push(b'\n');
    Bytes::from(v)
}

/// Decodes UTF-8 across chunk boundaries: an incomplete trailing sequence waits for the next chunk.
#[derive(Default)]
struct Utf8Carry(Vec<u8>);

impl Utf8Carry {
    fn push(&mut self, b: &[u8]) -> String {
        self.0.extend_from_slice(b);
        let keep = match std::str::from_utf8(&self.0) {
            Ok(_) => 0,
            Err(e) if e.error_len().is_none() => self.0.len() - e.valid_up_to(),
            Err(_) => 0,
        };
        let tail = self.0.split_off(self.0.len() - keep);
        let text = String::from_utf8_lossy(&self.0).into_owned();
        self.0 = tail;
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capped_output_marks_truncation() {
        let mut c = Capped::new(4);
        c.push(b"hello");
        c.push(b"world");
        let s = c.into_string();
        assert!(
            s.starts_with("hell\n[picod: output truncated, 6 bytes omitted]"),
            "{s}"
        );
    }

    #[test]
    fn utf8_is_not_split_across_chunks() {
        let mut c = Utf8Carry::default();
        let euro = "€".as_bytes();
        assert_eq!(c.push(&euro[..1]), "");
        assert_eq!(c.push(&euro[1..]), "€");
        assert_eq!(c.push(b"\xffa"), "\u{fffd}a");
    }

    #[test]
    fn spawn_errors_read_like_go() {
        let nf = std::io::Error::from(std::io::ErrorKind::NotFound);
        assert_eq!(
            spawn_error_text("nope", &nf),
            "exec: \"nope\": executable file not found in $PATH"
        );
        let e = std::io::Error::from_raw_os_error(2);
        assert_eq!(
            spawn_error_text("./x", &e),
            "fork/exec ./x: no such file or directory"
        );
        let again = std::io::Error::from_raw_os_error(nix::libc::EAGAIN);
        assert_eq!(
            spawn_error_text("true", &again),
            format!(
                "fork/exec true: resource temporarily unavailable\n{}",
                crate::diagnose::PROCESS_LIMIT
            )
        );
    }
}
