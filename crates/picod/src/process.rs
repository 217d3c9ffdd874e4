//! Background processes (issue 20's process API): started by one request, outliving it, not
//! subject to the execute timeout, talked to by later requests, dying with the sandbox.
//!
//! - `POST /api/processes` `{"command": [...], "cwd"?, "env"?}` → `{"id", "pid"}`
//! - `GET /api/processes` → `[{"id", "pid", "command", "running", "exit_code"}]`
//! - `GET /api/processes/{id}/output?since=<seq>&follow=true` → NDJSON: `{"seq", "stream", "data"}`
//!   per chunk, `{"missed": n}` when older output was dropped from the buffer, and, once the
//!   process has ended, `{"exit_code"}` last. Output is kept in a bounded buffer per process, so
//!   a client that reconnects later with `since` loses nothing that is still buffered.
//! - `POST /api/processes/{id}/stdin` (raw bytes), `POST …/stdin/close`,
//!   `POST …/signal` `{"signal": "INT"|"TERM"|"KILL"}` (to the process group).
//!
//! Limits: [`MAX_RUNNING`] processes at once (429), [`BUFFER_BYTES`] of output kept per process,
//! [`MAX_KEPT`] processes listed (the oldest ended ones are forgotten first).

use std::collections::{BTreeMap, VecDeque};
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

use crate::error::ApiError;
use crate::server::AppState;

/// Running processes per sandbox.
pub const MAX_RUNNING: usize = 16;
/// Processes remembered (running and ended).
pub const MAX_KEPT: usize = 64;
/// Output kept per process (older chunks are dropped first).
pub const BUFFER_BYTES: usize = 1 << 20;

/// Every process PicoD started.
#[derive(Default)]
pub struct Processes {
    list: Mutex<Vec<Arc<Proc>>>,
}

impl std::fmt::Debug for Processes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Processes").finish_non_exhaustive()
    }
}

struct Proc {
    id: String,
    pid: u32,
    command: Vec<String>,
    out: Mutex<Output>,
    changed: tokio::sync::watch::Sender<u64>,
    stdin: tokio::sync::Mutex<Option<tokio::process::ChildStdin>>,
}

#[derive(Default)]
struct Output {
    chunks: VecDeque<Chunk>,
    bytes: usize,
    /// Sequence number of the next chunk.
    next: u64,
    exit_code: Option<i32>,
}

#[derive(Clone, Serialize)]
struct Chunk {
    seq: u64,
    stream: &'static str,
    data: String,
}

impl Proc {
    fn push(&self, stream: &'static str, data: &[u8]) {
        let mut o = self.out.lock().unwrap();
        let seq = o.next;
        o.next += 1;
        o.bytes += data.len();
        o.chunks.push_back(Chunk {
            seq,
            stream,
            data: String::from_utf8_lossy(data).into_owned(),
        });
        while o.bytes > BUFFER_BYTES
            && let Some(old) = o.chunks.pop_front()
        {
            o.bytes -= old.data.len();
        }
        self.changed.send_replace(o.next);
    }

    fn running(&self) -> bool {
        self.out.lock().unwrap().exit_code.is_none()
    }
}

/// `POST /api/processes`.
#[derive(Debug, Deserialize)]
pub struct StartRequest {
    command: Vec<String>,
    #[serde(default)]
    cwd: Option<String>,
    #[serde(default)]
    env: Option<BTreeMap<String, String>>,
}

/// `POST /api/processes`: starts a process in its own group; answers once it runs.
pub async fn start(State(s): State<AppState>, req: Request) -> Result<Response, ApiError> {
    let bytes = crate::server::read_body(req, s.config.max_body_bytes).await?;
    let body: StartRequest =
        serde_json::from_slice(&bytes).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    if body.command.first().is_none_or(String::is_empty) {
        return Err(ApiError::BadRequest("command cannot be empty".into()));
    }
    let running = s
        .processes
        .list
        .lock()
        .unwrap()
        .iter()
        .filter(|p| p.running())
        .count();
    if running >= MAX_RUNNING {
        return Err(ApiError::TooMany(format!(
            "{MAX_RUNNING} processes are running in this sandbox already"
        )));
    }
    let dir = crate::exec::work_dir(&s.workspace, body.cwd.unwrap_or_default()).await?;
    let mut cmd = crate::init::command(&body.command[0]);
    dir.apply(&mut cmd);
    let mut child = cmd
        .args(&body.command[1..])
        .envs(body.env.unwrap_or_default())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(|e| ApiError::BadRequest(format!("cannot start {:?}: {e}", body.command[0])))?;
    drop(dir);
    crate::exec::killed_first_for_memory(&child);
    let pid = child.id().unwrap_or_default();
    let proc = Arc::new(Proc {
        id: random_id(),
        pid,
        command: body.command,
        out: Mutex::default(),
        changed: tokio::sync::watch::channel(0).0,
        stdin: tokio::sync::Mutex::new(child.stdin.take()),
    });
    let pumps = [
        child
            .stdout
            .take()
            .map(|r| tokio::spawn(pump(r, "stdout", proc.clone()))),
        child
            .stderr
            .take()
            .map(|r| tokio::spawn(pump(r, "stderr", proc.clone()))),
    ];
    let waiter = proc.clone();
    tokio::spawn(async move {
        let status = child.wait().await.ok();
        for p in pumps.into_iter().flatten() {
            let _ = p.await;
        }
        let code = status.and_then(|s| s.code()).unwrap_or(-1);
        waiter.out.lock().unwrap().exit_code = Some(code);
        waiter.changed.send_modify(|v| *v += 1);
    });
    let mut list = s.processes.list.lock().unwrap();
    list.push(proc.clone());
    while list.len() > MAX_KEPT {
        match list.iter().position(|p| !p.running()) {
            Some(i) => {
                list.remove(i);
            }
            None => break,
        }
    }
    Ok(Json(serde_json::json!({"id": proc.id, "pid": pid})).into_response())
}

/// A random id: 32 hex digits from the kernel's random source (PicoD keeps its dependencies
/// small: no uuid or rand crate). Also the cell markers of [`crate::context`].
pub fn random_id() -> String {
    let mut b = [0u8; 16];
    let _ = std::fs::File::open("/dev/urandom").and_then(|mut f| {
        use std::io::Read;
        f.read_exact(&mut b)
    });
    b.iter().map(|x| format!("{x:02x}")).collect()
}

async fn pump(mut r: impl AsyncRead + Unpin, stream: &'static str, proc: Arc<Proc>) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => proc.push(stream, &buf[..n]),
        }
    }
}

fn find(s: &AppState, id: &str) -> Result<Arc<Proc>, ApiError> {
    s.processes
        .list
        .lock()
        .unwrap()
        .iter()
        .find(|p| p.id == id)
        .cloned()
        .ok_or(ApiError::NotFound("process not found"))
}

/// `GET /api/processes`.
pub async fn list(State(s): State<AppState>) -> Json<serde_json::Value> {
    let list = s.processes.list.lock().unwrap();
    let items: Vec<_> = list
        .iter()
        .map(|p| {
            let exit = p.out.lock().unwrap().exit_code;
            serde_json::json!({"id": p.id, "pid": p.pid, "command": p.command,
                               "running": exit.is_none(), "exit_code": exit})
        })
        .collect();
    Json(serde_json::Value::Array(items))
}

/// `?since=&follow=` of the output route.
#[derive(Debug, Deserialize)]
pub struct OutputQuery {
    #[serde(default)]
    since: u64,
    #[serde(default)]
    follow: bool,
}

/// `GET /api/processes/{id}/output`: NDJSON of the buffered chunks from `since`, then (with
/// `follow`) new ones as they come, ending with the exit code.
pub async fn output(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<OutputQuery>,
) -> Result<Response, ApiError> {
    let proc = find(&s, &id)?;
    let mut changed = proc.changed.subscribe();
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(16);
    tokio::spawn(async move {
        let mut since = q.since;
        loop {
            let (lines, exit) = {
                let o = proc.out.lock().unwrap();
                let mut lines = Vec::new();
                let first = o.chunks.front().map_or(o.next, |c| c.seq);
                if since < first {
                    lines.push(serde_json::json!({"missed": first - since}).to_string());
                    since = first;
                }
                for c in o.chunks.iter().filter(|c| c.seq >= since) {
                    lines.push(serde_json::to_string(c).unwrap_or_default());
                }
                since = o.next;
                (lines, o.exit_code)
            };
            for l in lines {
                if tx.send(Bytes::from(format!("{l}\n"))).await.is_err() {
                    return;
                }
            }
            if let Some(code) = exit {
                let _ = tx
                    .send(Bytes::from(format!(
                        "{}\n",
                        serde_json::json!({"exit_code": code})
                    )))
                    .await;
                return;
            }
            if !q.follow {
                return;
            }
            tokio::select! {
                r = changed.changed() => if r.is_err() { return },
                () = tx.closed() => return,
            }
        }
    });
    let body = Body::from_stream(futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, std::convert::Infallible>(b), rx))
    }));
    let mut resp = Response::new(body);
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(crate::exec::NDJSON),
    );
    Ok(resp)
}

/// `POST /api/processes/{id}/stdin`: the raw body, written to the process's stdin.
pub async fn stdin(
    State(s): State<AppState>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    let proc = find(&s, &id)?;
    let mut pipe = proc.stdin.lock().await;
    let p = pipe
        .as_mut()
        .ok_or_else(|| ApiError::BadRequest("stdin is closed".into()))?;
    p.write_all(&body)
        .await
        .map_err(|e| ApiError::BadRequest(format!("cannot write to stdin: {e}")))?;
    Ok(Json(serde_json::json!({"written": body.len()})))
}

/// `POST /api/processes/{id}/stdin/close`.
pub async fn close_stdin(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let proc = find(&s, &id)?;
    proc.stdin.lock().await.take();
    Ok(Json(serde_json::json!({"closed": true})))
}

/// `POST /api/processes/{id}/signal` body.
#[derive(Debug, Deserialize)]
pub struct SignalRequest {
    signal: String,
}

/// `POST /api/processes/{id}/signal`: to the whole process group.
pub async fn signal(
    State(s): State<AppState>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    let req: SignalRequest =
        serde_json::from_slice(&body).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let proc = find(&s, &id)?;
    let sig = match req.signal.as_str() {
        "INT" => Signal::SIGINT,
        "TERM" => Signal::SIGTERM,
        "KILL" => Signal::SIGKILL,
        other => {
            return Err(ApiError::BadRequest(format!(
                "signal must be INT, TERM or KILL, not {other:?}"
            )));
        }
    };
    if proc.running() {
        let _ = killpg(Pid::from_raw(proc.pid as i32), sig);
    }
    Ok(Json(serde_json::json!({"signal": req.signal})))
}
