//! Stateful code contexts (issue 20): a persistent Python interpreter (`runner.py`, plain
//! `python3`, no IPython) or a persistent `bash`, kept between requests. Cells run one at a time
//! per context; their output streams as it is printed, then the cell's results (the last
//! expression's value, `display(...)`, matplotlib figures as PNG) and error come back.
//!
//! - `POST /api/contexts` `{"language": "python"|"bash", "cwd"?, "env"?}` → `{"id","language","cwd"}`
//! - `GET /api/contexts`; `POST /api/contexts/{id}/delete` (also `DELETE /api/contexts/{id}`,
//!   which the Router does not route: it passes GET and POST only, as upstream's);
//!   `POST /api/contexts/{id}/restart`;
//!   `POST /api/contexts/{id}/interrupt` (SIGINT: `KeyboardInterrupt` in the running cell)
//! - `POST /api/contexts/{id}/execute` `{"code","timeout"?}` → `{"stdout","stderr","results",
//!   "error","execution_count","exit_code","duration"}`, or NDJSON events (`stdout`, `stderr`,
//!   `result`, `error`, `end`) with `Accept: application/x-ndjson`. A cell past its timeout is
//!   interrupted (again every 250 ms until it stops); the context keeps its state.
//!
//! Cell boundaries: after a cell the runner writes `<marker> <status>` on stderr and
//! `<marker> <status> <report>` on stdout (a random marker per cell, stripped from the output;
//! the report, Python only, is JSON: results, error, execution count).

use std::collections::BTreeMap;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::error::ApiError;
use crate::server::AppState;

/// Contexts per sandbox.
pub const MAX_CONTEXTS: usize = 8;
/// Default cell timeout.
pub const DEFAULT_CELL_TIMEOUT: Duration = Duration::from_secs(300);
/// How long an interrupted cell may take to stop before its context is restarted.
const INTERRUPT_GRACE: Duration = Duration::from_secs(5);
/// How often the interrupt is repeated during the grace: one that lands before the cell's
/// command has started (a loaded machine) is taken by the idle shell or runner, which ignores
/// it, as pressing Ctrl-C again would.
const INTERRUPT_REPEAT: Duration = Duration::from_millis(250);
const RUNNER: &str = include_str!("runner.py");

/// Every context of this sandbox.
#[derive(Default)]
pub struct Contexts {
    list: Mutex<Vec<Arc<Context>>>,
}

impl std::fmt::Debug for Contexts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Contexts").finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Language {
    Python,
    Bash,
}

struct Context {
    id: String,
    language: Language,
    cwd: String,
    env: BTreeMap<String, String>,
    runner: tokio::sync::Mutex<Option<Runner>>,
    /// Process group of the current runner (for interrupts while a cell holds `runner`).
    pgid: Mutex<Option<i32>>,
}

struct Runner {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    stdout: mpsc::Receiver<Bytes>,
    stderr: mpsc::Receiver<Bytes>,
}

/// One event of a cell, as the NDJSON stream carries it.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum Event {
    Stdout {
        data: String,
    },
    Stderr {
        data: String,
    },
    Result {
        data: serde_json::Value,
    },
    Error {
        name: String,
        value: String,
        traceback: Vec<String>,
    },
    End {
        execution_count: u64,
        exit_code: i32,
        duration: f64,
    },
}

#[derive(Debug, Deserialize)]
pub struct CreateRequest {
    language: Language,
    #[serde(default)]
    cwd: Option<String>,
    #[serde(default)]
    env: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Deserialize)]
pub struct ExecuteRequest {
    code: String,
    #[serde(default)]
    timeout: Option<String>,
}

async fn spawn_runner(s: &AppState, ctx: &Context) -> Result<Runner, ApiError> {
    let dir = crate::exec::work_dir(&s.workspace, ctx.cwd.clone()).await?;
    let mut cmd = match ctx.language {
        Language::Python => {
            let mut cmd = crate::init::command("python3");
            cmd.args(["-u", "-c", RUNNER]).env("MPLBACKEND", "Agg");
            cmd
        }
        Language::Bash => {
            let mut cmd = crate::init::command("bash");
            cmd.args(["--noprofile", "--norc", "-s"]);
            cmd
        }
    };
    dir.apply(&mut cmd);
    cmd.envs(&ctx.env)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|e| {
        ApiError::BadRequest(format!("cannot start the {:?} context: {e}", ctx.language))
    })?;
    drop(dir);
    crate::exec::killed_first_for_memory(&child);
    let stdout = pipe_to_channel(child.stdout.take());
    let stderr = pipe_to_channel(child.stderr.take());
    let mut stdin = child
        .stdin
        .take()
        .ok_or_else(|| ApiError::internal("no stdin"))?;
    if ctx.language == Language::Bash {
        // A Ctrl-C interrupts the cell's commands; the shell itself stays.
        stdin
            .write_all(b"trap ':' INT\n")
            .await
            .map_err(ApiError::internal)?;
    }
    *ctx.pgid.lock().unwrap() = child.id().map(|p| p as i32);
    Ok(Runner {
        child,
        stdin,
        stdout,
        stderr,
    })
}

fn pipe_to_channel(
    pipe: Option<impl tokio::io::AsyncRead + Unpin + Send + 'static>,
) -> mpsc::Receiver<Bytes> {
    let (tx, rx) = mpsc::channel(64);
    if let Some(mut r) = pipe {
        tokio::spawn(async move {
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                match r.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if tx.send(Bytes::copy_from_slice(&buf[..n])).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
    }
    rx
}

/// Finds `<marker> <status>\n` in a stream, holding back what could be the start of it.
struct Scanner {
    marker: Vec<u8>,
    buf: Vec<u8>,
    status: Option<i32>,
    /// What followed the status on the marker line (the Python report).
    report: String,
}

impl Scanner {
    fn new(marker: &str) -> Self {
        Self {
            marker: marker.as_bytes().to_vec(),
            buf: Vec::new(),
            status: None,
            report: String::new(),
        }
    }

    /// Adds bytes; returns the cell output that is certainly not part of the marker line.
    fn push(&mut self, b: &[u8]) -> Vec<u8> {
        self.buf.extend_from_slice(b);
        if let Some(at) = find(&self.buf, &self.marker) {
            let rest = &self.buf[at + self.marker.len()..];
            if let Some(nl) = rest.iter().position(|&c| c == b'\n') {
                let line = String::from_utf8_lossy(&rest[..nl]).into_owned();
                let (status, report) = line
                    .trim_start()
                    .split_once(' ')
                    .unwrap_or((line.trim(), ""));
                self.status = Some(status.trim().parse().unwrap_or(1));
                self.report = report.to_string();
                let out = self.buf[..at].to_vec();
                self.buf.clear();
                return out;
            }
            let out = self.buf[..at].to_vec();
            self.buf.drain(..at);
            return out;
        }
        let keep = self.marker.len().min(self.buf.len());
        let cut = self.buf.len() - keep;
        self.buf.drain(..cut).collect()
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Runs one cell, sending its events to `sink`. The runner must be idle.
async fn run_cell(
    ctx: &Context,
    runner: &mut Runner,
    code: &str,
    timeout: Duration,
    sink: &mpsc::Sender<Event>,
) -> Result<(), String> {
    let started = Instant::now();
    let marker = format!("__picod_cell_{}", crate::process::random_id());
    let input = match ctx.language {
        Language::Python => format!("{}\n", serde_json::json!({"code": code, "marker": marker})),
        Language::Bash => format!(
            "{code}\n__picod_rc=$?; printf '%s %d\\n' '{marker}' $__picod_rc; printf '%s %d\\n' '{marker}' $__picod_rc >&2\n"
        ),
    };
    runner
        .stdin
        .write_all(input.as_bytes())
        .await
        .map_err(|e| format!("the context is gone: {e}"))?;
    let (mut out, mut err) = (Scanner::new(&marker), Scanner::new(&marker));
    let deadline = tokio::time::Instant::now() + timeout;
    let give_up = deadline + INTERRUPT_GRACE;
    let mut interrupted = false;
    let mut wake = deadline;
    loop {
        if out.status.is_some() && err.status.is_some() {
            break;
        }
        tokio::select! {
            b = runner.stdout.recv(), if out.status.is_none() => match b {
                Some(b) => send_text(sink, true, out.push(&b)).await,
                None => return Err("the context's process ended".into()),
            },
            b = runner.stderr.recv(), if err.status.is_none() => match b {
                Some(b) => send_text(sink, false, err.push(&b)).await,
                None => return Err("the context's process ended".into()),
            },
            () = tokio::time::sleep_until(wake) => {
                if wake >= give_up {
                    return Err(format!("the cell did not stop within {} s of its timeout", INTERRUPT_GRACE.as_secs()));
                }
                interrupted = true;
                interrupt(ctx);
                wake = (wake + INTERRUPT_REPEAT).min(give_up);
            }
        }
    }
    let status = out.status.unwrap_or(1);
    let control: serde_json::Value = serde_json::from_str(&out.report).unwrap_or_default();
    for r in control["results"].as_array().cloned().unwrap_or_default() {
        let _ = sink.send(Event::Result { data: r }).await;
    }
    let error = control.get("error").filter(|e| !e.is_null()).cloned();
    match (&error, ctx.language) {
        (Some(e), _) => {
            let tb = e["traceback"].as_array().cloned().unwrap_or_default();
            let _ = sink
                .send(Event::Error {
                    name: if interrupted { "TimeoutError".into() } else { e["name"].as_str().unwrap_or("Error").into() },
                    value: if interrupted {
                        format!("the cell ran past its timeout of {} s and was interrupted; the context keeps its state", timeout.as_secs())
                    } else {
                        e["value"].as_str().unwrap_or_default().into()
                    },
                    traceback: tb.iter().filter_map(|l| l.as_str().map(String::from)).collect(),
                })
                .await;
        }
        (None, Language::Bash) if status != 0 => {
            let _ = sink
                .send(Event::Error {
                    name: "ExitStatus".into(),
                    value: status.to_string(),
                    traceback: vec![],
                })
                .await;
        }
        _ => {}
    }
    let count = control["execution_count"].as_u64().unwrap_or(0);
    let _ = sink
        .send(Event::End {
            execution_count: count,
            exit_code: status,
            duration: started.elapsed().as_secs_f64(),
        })
        .await;
    Ok(())
}

async fn send_text(sink: &mpsc::Sender<Event>, stdout: bool, b: Vec<u8>) {
    if b.is_empty() {
        return;
    }
    let data = String::from_utf8_lossy(&b).into_owned();
    let _ = sink
        .send(if stdout {
            Event::Stdout { data }
        } else {
            Event::Stderr { data }
        })
        .await;
}

fn interrupt(ctx: &Context) {
    if let Some(pgid) = *ctx.pgid.lock().unwrap() {
        let _ = killpg(Pid::from_raw(pgid), Signal::SIGINT);
    }
}

fn find_ctx(s: &AppState, id: &str) -> Result<Arc<Context>, ApiError> {
    s.contexts
        .list
        .lock()
        .unwrap()
        .iter()
        .find(|c| c.id == id)
        .cloned()
        .ok_or(ApiError::NotFound("context not found"))
}

fn describe(c: &Context) -> serde_json::Value {
    serde_json::json!({"id": c.id, "language": c.language, "cwd": c.cwd})
}

/// `POST /api/contexts`.
pub async fn create(
    State(s): State<AppState>,
    req: Request,
) -> Result<Json<serde_json::Value>, ApiError> {
    let bytes = crate::server::read_body(req, s.config.max_body_bytes).await?;
    let body: CreateRequest =
        serde_json::from_slice(&bytes).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    if s.contexts.list.lock().unwrap().len() >= MAX_CONTEXTS {
        return Err(ApiError::TooMany(format!(
            "this sandbox has {MAX_CONTEXTS} contexts already; delete one first"
        )));
    }
    let ctx = Arc::new(Context {
        id: crate::process::random_id(),
        language: body.language,
        cwd: body.cwd.unwrap_or_else(|| ".".into()),
        env: body.env.unwrap_or_default(),
        runner: tokio::sync::Mutex::new(None),
        pgid: Mutex::new(None),
    });
    let runner = spawn_runner(&s, &ctx).await?;
    *ctx.runner.lock().await = Some(runner);
    s.contexts.list.lock().unwrap().push(ctx.clone());
    Ok(Json(describe(&ctx)))
}

/// `GET /api/contexts`.
pub async fn list(State(s): State<AppState>) -> Json<serde_json::Value> {
    let items: Vec<_> = s
        .contexts
        .list
        .lock()
        .unwrap()
        .iter()
        .map(|c| describe(c))
        .collect();
    Json(serde_json::Value::Array(items))
}

/// `POST /api/contexts/{id}/delete` and `DELETE /api/contexts/{id}`.
pub async fn delete(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let ctx = find_ctx(&s, &id)?;
    s.contexts.list.lock().unwrap().retain(|c| c.id != id);
    interrupt(&ctx);
    if let Some(mut r) = ctx.runner.lock().await.take() {
        let _ = r.child.kill().await;
    }
    Ok(Json(serde_json::json!({"deleted": id})))
}

/// `POST /api/contexts/{id}/restart`: a fresh interpreter (state cleared).
pub async fn restart(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let ctx = find_ctx(&s, &id)?;
    interrupt(&ctx);
    let mut slot = ctx.runner.lock().await;
    if let Some(mut r) = slot.take() {
        let _ = r.child.kill().await;
    }
    *slot = Some(spawn_runner(&s, &ctx).await?);
    Ok(Json(describe(&ctx)))
}

/// `POST /api/contexts/{id}/interrupt`.
pub async fn interrupt_route(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let ctx = find_ctx(&s, &id)?;
    interrupt(&ctx);
    Ok(Json(serde_json::json!({"interrupted": id})))
}

/// `POST /api/contexts/{id}/execute`.
pub async fn execute(
    State(s): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    req: Request,
) -> Result<Response, ApiError> {
    let ctx = find_ctx(&s, &id)?;
    let bytes = crate::server::read_body(req, s.config.max_body_bytes).await?;
    let body: ExecuteRequest =
        serde_json::from_slice(&bytes).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let timeout = match body.timeout.as_deref() {
        None | Some("") => DEFAULT_CELL_TIMEOUT,
        Some(t) => {
            t.parse::<agentcube_types::GoDuration>()
                .map_err(|e| ApiError::BadRequest(format!("invalid timeout {t:?}: {e}")))?
                .0
        }
    };
    let (tx, mut rx) = mpsc::channel::<Event>(64);
    let cap = s.config.max_output_bytes;
    let state = s.clone();
    tokio::spawn(async move {
        let mut slot = ctx.runner.lock().await;
        if slot.is_none() {
            match spawn_runner(&state, &ctx).await {
                Ok(r) => *slot = Some(r),
                Err(e) => {
                    let _ = tx
                        .send(Event::Error {
                            name: "ContextError".into(),
                            value: e.to_string(),
                            traceback: vec![],
                        })
                        .await;
                    return;
                }
            }
        }
        let runner = slot.as_mut().expect("runner");
        if let Err(why) = run_cell(&ctx, runner, &body.code, timeout, &tx).await {
            // The interpreter is gone or stuck: a fresh one next time (its state is lost).
            if let Some(mut r) = slot.take() {
                let _ = r.child.kill().await;
            }
            let value = format!("{why}; the context was restarted and its state is lost");
            let _ = tx
                .send(Event::Error {
                    name: "ContextDied".into(),
                    value,
                    traceback: vec![],
                })
                .await;
            let _ = tx
                .send(Event::End {
                    execution_count: 0,
                    exit_code: -1,
                    duration: 0.0,
                })
                .await;
        }
    });
    let wants_stream = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains(crate::exec::NDJSON));
    if wants_stream {
        let body = Body::from_stream(futures_util::stream::unfold(rx, |mut rx| async move {
            let e = rx.recv().await?;
            let line = format!("{}\n", serde_json::to_string(&e).unwrap_or_default());
            Some((Ok::<_, std::convert::Infallible>(Bytes::from(line)), rx))
        }));
        let mut resp = Response::new(body);
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(crate::exec::NDJSON),
        );
        return Ok(resp);
    }
    let (mut stdout, mut stderr) = (Capped::new(cap), Capped::new(cap));
    let (mut results, mut error, mut end) =
        (Vec::new(), serde_json::Value::Null, serde_json::Value::Null);
    while let Some(e) = rx.recv().await {
        match e {
            Event::Stdout { data } => stdout.push(&data),
            Event::Stderr { data } => stderr.push(&data),
            Event::Result { data } => results.push(data),
            Event::Error {
                name,
                value,
                traceback,
            } => error = serde_json::json!({"name": name, "value": value, "traceback": traceback}),
            Event::End {
                execution_count,
                exit_code,
                duration,
            } => {
                end = serde_json::json!({"execution_count": execution_count, "exit_code": exit_code, "duration": duration})
            }
        }
    }
    let (stdout, stderr) = (stdout.finish(), stderr.finish());
    Ok(Json(serde_json::json!({
        "stdout": stdout, "stderr": stderr, "results": results, "error": error,
        "execution_count": end["execution_count"], "exit_code": end["exit_code"], "duration": end["duration"],
    }))
    .into_response())
}

/// A cell's output kept up to `--max-output-bytes`; the rest is counted and reported with the
/// same marker as `/api/execute`.
struct Capped {
    text: String,
    cap: usize,
    dropped: usize,
}

impl Capped {
    fn new(cap: usize) -> Self {
        Self {
            text: String::new(),
            cap,
            dropped: 0,
        }
    }

    fn push(&mut self, s: &str) {
        let room = self.cap.saturating_sub(self.text.len());
        let mut take = room.min(s.len());
        while !s.is_char_boundary(take) {
            take -= 1;
        }
        self.text.push_str(&s[..take]);
        self.dropped += s.len() - take;
    }

    fn finish(mut self) -> String {
        if self.dropped > 0 {
            let note = format!(
                "\n[picod: output truncated, {} bytes omitted]",
                self.dropped
            );
            self.text.push_str(&note);
        }
        self.text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_marker_is_found_across_chunks_and_never_leaks() {
        let mut s = Scanner::new("MARK");
        let mut out = s.push(b"hello MA");
        out.extend(s.push(b"RK 0\n"));
        assert_eq!(out, b"hello ");
        assert_eq!(s.status, Some(0));
        let mut s = Scanner::new("MARK");
        let mut out = s.push(b"no newline yet");
        out.extend(s.push(b"MARK 1"));
        assert_eq!(s.status, None);
        out.extend(s.push(b" {\"a\": 1}\n"));
        assert_eq!(
            (out.as_slice(), s.status),
            (&b"no newline yet"[..], Some(1))
        );
        assert_eq!(s.report, "{\"a\": 1}");
    }

    #[test]
    fn cell_output_is_capped_with_a_marker() {
        let mut c = Capped::new(5);
        c.push("héllo world");
        assert_eq!(
            c.finish(),
            "héll\n[picod: output truncated, 7 bytes omitted]"
        );
    }
}
