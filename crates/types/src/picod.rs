//! PicoD's wire format (spec §5): request and response bodies of `/api/execute` and `/api/files`.

use std::collections::BTreeMap;

/// What PicoD adds to a Unix socket's path for the empty file it writes once that socket listens
/// (`picod.sock.ready`): the local Workload Manager moves the socket out of the sandbox's reach
/// only then. Under gVisor a `bind` is more than one step on the host, and a move in between
/// failed PicoD's start.
pub const SOCKET_READY_SUFFIX: &str = ".ready";

/// The marker path of socket `path` ([`SOCKET_READY_SUFFIX`]).
pub fn socket_ready_marker(path: &std::path::Path) -> std::path::PathBuf {
    let mut marker = path.as_os_str().to_owned();
    marker.push(SOCKET_READY_SUFFIX);
    marker.into()
}

use serde::{Deserialize, Serialize};

/// Body of `POST /api/execute`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExecuteRequest {
    /// argv; `command[0]` is executed directly, never through a shell.
    pub command: Vec<String>,
    /// Go duration string (`"30s"`, `"120.0s"`); PicoD's default (60 s) when absent or empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    /// Working directory, relative to the workspace (absolute paths too); created if missing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    /// Extra environment, merged over PicoD's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<BTreeMap<String, String>>,
}

/// Answer of `POST /api/execute`: always HTTP 200 once the process ran or failed to start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExecuteResponse {
    pub stdout: String,
    pub stderr: String,
    pub exit_code: i32,
    /// Wall-clock seconds.
    pub duration: f64,
    /// RFC 3339 with nanoseconds.
    pub start_time: String,
    pub end_time: String,
}

/// One line of a streamed execute (`Accept: application/x-ndjson`), an extension over upstream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ExecuteEvent {
    /// A chunk of standard output as it arrived (lossy UTF-8).
    Stdout { data: String },
    /// A chunk of standard error as it arrived (lossy UTF-8).
    Stderr { data: String },
    /// Last line: the same fields as the buffered response, without the output.
    Exit {
        exit_code: i32,
        duration: f64,
        start_time: String,
        end_time: String,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        timed_out: bool,
    },
}

/// JSON body of `POST /api/files`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UploadRequest {
    pub path: String,
    /// Standard base64; must not be empty (upstream validates it as required).
    pub content: String,
    /// Octal string such as `"0644"`; invalid or missing means 0644.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
}

/// Answer of an upload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UploadResponse {
    /// Path relative to the workspace.
    pub path: String,
    pub size: u64,
    /// Go `FileMode.String()` text, e.g. `-rw-r--r--`.
    pub mode: String,
    /// RFC 3339.
    pub modified: String,
}

/// One entry of a directory listing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileEntry {
    pub name: String,
    pub size: u64,
    pub modified: String,
    pub mode: String,
    pub is_dir: bool,
}

/// Answer of `GET /api/files?path=`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ListFilesResponse {
    pub files: Vec<FileEntry>,
}

/// PicoD's error body: `{"error": ..., "code": <http status>, "detail"?: ...}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PicodError {
    pub error: String,
    pub code: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// Answer of `GET /health`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HealthResponse {
    pub status: String,
    pub service: String,
    pub version: String,
    /// Go duration text.
    pub uptime: String,
    /// Extension: whether each forwarded agent port accepts connections (local AgentRuntime
    /// sandboxes only; absent otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<std::collections::BTreeMap<String, bool>>,
}
