//! `/api/files`: upload (JSON base64 or multipart, as upstream, up to the body limit; or, an
//! extension, the raw bytes streamed to disk: `POST /api/files?path=P&mode=0644` with
//! `Content-Type: application/octet-stream`, bounded only by the workspace), list, and download
//! with Range support.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::fcntl::AtFlags;
use nix::libc;
use nix::sys::stat::fstatat;

use agentcube_types::picod::{FileEntry, ListFilesResponse, UploadRequest, UploadResponse};
use axum::Json;
use axum::body::Body;
use axum::extract::{FromRequest, Multipart, Path as UrlPath, Query, Request, State};
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde::Deserialize;
use tower::ServiceExt;
use tower_http::services::ServeFile;

use crate::error::ApiError;
use crate::jail::{JailError, Workspace};
use crate::server::AppState;

const DEFAULT_MODE: u32 = 0o644;

impl From<JailError> for ApiError {
    fn from(e: JailError) -> Self {
        match e {
            JailError::Escape(p) => ApiError::Forbidden(format!("access denied: {p}")),
            JailError::BadPath(_)
            | JailError::IsDirectory
            | JailError::NotADirectory(_)
            | JailError::Special(_) => ApiError::BadRequest(e.to_string()),
            JailError::NotFound(_) => ApiError::NotFound("File not found"),
            JailError::Io(e) => ApiError::internal(e),
        }
    }
}

/// Whether a request is a streamed upload (`POST /api/files`, `application/octet-stream`): the
/// one request whose body may pass the body limit.
pub fn is_streamed_upload(req: &Request) -> bool {
    req.method() == http::Method::POST
        && req.uri().path() == "/api/files"
        && content_type(req).is_some_and(|ct| ct.starts_with("application/octet-stream"))
}

fn content_type(req: &Request) -> Option<&str> {
    req.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
}

/// `POST /api/files`: multipart when the Content-Type says so, raw bytes for
/// `application/octet-stream`, JSON otherwise (as upstream).
pub async fn upload(State(state): State<AppState>, req: Request) -> Result<Response, ApiError> {
    if is_streamed_upload(&req) {
        return upload_streamed(state, req).await;
    }
    let is_multipart = content_type(&req).is_some_and(|ct| ct.starts_with("multipart/form-data"));
    let (path, mode, content) = if is_multipart {
        read_multipart(req, &state).await?
    } else {
        read_json(req, &state).await?
    };
    let mode = parse_mode(mode.as_deref());
    let ws = state.workspace.clone();
    let diag = state.config.diagnostics.clone();
    let resp = tokio::task::spawn_blocking(move || -> Result<UploadResponse, ApiError> {
        let (mut file, rel) = ws.create_file(&path, mode).map_err(|e| match e {
            JailError::Io(e) => diag.io_error(e),
            e => e.into(),
        })?;
        if let Err(e) = file.write_all(&content) {
            drop(file);
            // A partial file would look like a complete one: nothing is kept.
            let _ = ws.remove_file(&path);
            return Err(diag.io_error(e));
        }
        uploaded(&file, &rel)
    })
    .await
    .map_err(ApiError::internal)??;
    Ok(Json(resp).into_response())
}

/// The answer to an upload: the written file as it is now.
fn uploaded(file: &File, rel: &Path) -> Result<UploadResponse, ApiError> {
    let meta = file.metadata().map_err(ApiError::internal)?;
    Ok(UploadResponse {
        path: Workspace::relative(rel),
        size: meta.len(),
        mode: go_mode_string(meta.mode()),
        modified: rfc3339(meta.mtime()),
    })
}

/// `?path=&mode=` of a streamed upload.
#[derive(Deserialize)]
struct StreamedQuery {
    #[serde(default)]
    path: String,
    mode: Option<String>,
}

/// A streamed upload: the body goes to a staging file beside the target as it arrives, which
/// replaces the target once the body is complete (a cut-short upload changes nothing).
async fn upload_streamed(state: AppState, req: Request) -> Result<Response, ApiError> {
    use futures_util::StreamExt;
    use tokio::io::AsyncWriteExt;
    let q = Query::<StreamedQuery>::try_from_uri(req.uri())
        .map_err(|e| ApiError::BadRequest(format!("Invalid query: {}", e.body_text())))?;
    if q.path.is_empty() {
        return Err(ApiError::BadRequest(
            "Missing 'path' query parameter".into(),
        ));
    }
    let mode = parse_mode(q.mode.as_deref());
    let (ws, diag) = (state.workspace.clone(), state.config.diagnostics.clone());
    let path = q.0.path;
    let (file, staged) = tokio::task::spawn_blocking(move || ws.stage_file(&path, mode))
        .await
        .map_err(ApiError::internal)?
        .map_err(|e| match e {
            JailError::Io(e) => diag.io_error(e),
            e => e.into(),
        })?;
    let mut out = tokio::fs::File::from_std(file);
    let mut body = req.into_body().into_data_stream();
    while let Some(chunk) = body.next().await {
        let chunk =
            chunk.map_err(|e| ApiError::BadRequest(format!("the upload was cut short: {e}")))?;
        out.write_all(&chunk)
            .await
            .map_err(|e| state.config.diagnostics.io_error(e))?;
    }
    out.flush()
        .await
        .map_err(|e| state.config.diagnostics.io_error(e))?;
    let file = out.into_std().await;
    let resp = tokio::task::spawn_blocking(move || -> Result<UploadResponse, ApiError> {
        let rel = staged.commit()?;
        uploaded(&file, &rel)
    })
    .await
    .map_err(ApiError::internal)??;
    Ok(Json(resp).into_response())
}

async fn read_json(
    req: Request,
    state: &AppState,
) -> Result<(String, Option<String>, Vec<u8>), ApiError> {
    let bytes = crate::server::read_body(req, state.config.max_body_bytes).await?;
    let body: UploadRequest = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::BadRequest(format!("Invalid request body: {e}")))?;
    if body.path.is_empty() {
        return Err(ApiError::BadRequest(
            "Invalid request body: path is required".into(),
        ));
    }
    if body.content.is_empty() {
        return Err(ApiError::BadRequest(
            "Invalid request body: content is required".into(),
        ));
    }
    let content = base64::engine::general_purpose::STANDARD
        .decode(body.content.as_bytes())
        .map_err(|e| ApiError::BadRequest(format!("Invalid base64 content: {e}")))?;
    Ok((body.path, body.mode, content))
}

async fn read_multipart(
    req: Request,
    state: &AppState,
) -> Result<(String, Option<String>, Vec<u8>), ApiError> {
    let limit = state.config.max_body_bytes;
    let multipart_err = |e: axum::extract::multipart::MultipartError| {
        if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::TooLarge { limit }
        } else {
            ApiError::BadRequest(format!("Invalid multipart body: {}", e.body_text()))
        }
    };
    let mut form = Multipart::from_request(req, &())
        .await
        .map_err(|e| ApiError::BadRequest(format!("Invalid multipart body: {}", e.body_text())))?;
    let (mut path, mut mode, mut file) = (None, None, None);
    while let Some(field) = form.next_field().await.map_err(multipart_err)? {
        match field.name() {
            Some("path") => path = Some(field.text().await.map_err(multipart_err)?),
            Some("mode") => mode = Some(field.text().await.map_err(multipart_err)?),
            Some("file") => file = Some(field.bytes().await.map_err(multipart_err)?.to_vec()),
            _ => {}
        }
    }
    let path = path
        .filter(|p| !p.is_empty())
        .ok_or_else(|| ApiError::BadRequest("Missing 'path' field".into()))?;
    let file =
        file.ok_or_else(|| ApiError::BadRequest("Failed to get file: http: no such file".into()))?;
    Ok((path, mode, file))
}

/// Octal mode string; empty, invalid or above 0777 means 0644 (upstream).
fn parse_mode(mode: Option<&str>) -> u32 {
    mode.and_then(|m| u32::from_str_radix(m.trim(), 8).ok())
        .filter(|m| *m <= 0o777)
        .unwrap_or(DEFAULT_MODE)
}

#[derive(Deserialize)]
pub struct ListQuery {
    path: Option<String>,
}

/// `GET /api/files?path=DIR`: entries sorted by name.
pub async fn list(
    State(state): State<AppState>,
    Query(q): Query<ListQuery>,
) -> Result<Json<ListFilesResponse>, ApiError> {
    let path = q
        .path
        .filter(|p| !p.is_empty())
        .ok_or_else(|| ApiError::BadRequest("Missing 'path' query parameter".into()))?;
    let ws = state.workspace.clone();
    tokio::task::spawn_blocking(move || {
        let (fd, _) = ws.open_dir(&path).map_err(|e| match e {
            JailError::NotFound(_) => ApiError::NotFound("Directory not found"),
            // Upstream answers 500 for a listing of a file.
            JailError::NotADirectory(p) => {
                ApiError::Internal(format!("Failed to read directory: {p}: not a directory"))
            }
            other => other.into(),
        })?;
        Ok(Json(ListFilesResponse {
            files: list_entries(fd)?,
        }))
    })
    .await
    .map_err(ApiError::internal)?
}

/// The entries of an open directory, sorted by name; entries whose `lstat` fails are skipped.
fn list_entries(fd: std::os::fd::OwnedFd) -> Result<Vec<FileEntry>, ApiError> {
    let read_err = |e: nix::Error| ApiError::Internal(format!("Failed to read directory: {e}"));
    let mut dir = nix::dir::Dir::from_fd(fd).map_err(read_err)?;
    let dir_fd = dir
        .as_fd()
        .try_clone_to_owned()
        .map_err(ApiError::internal)?;
    let mut files = Vec::new();
    for entry in dir.iter() {
        let entry = entry.map_err(read_err)?;
        let name = entry.file_name();
        if matches!(name.to_bytes(), b"." | b"..") {
            continue;
        }
        let Ok(st) = fstatat(&dir_fd, name, AtFlags::AT_SYMLINK_NOFOLLOW) else {
            continue;
        };
        files.push(FileEntry {
            name: name.to_string_lossy().into_owned(),
            size: st.st_size as u64,
            modified: rfc3339(st.st_mtime),
            mode: go_mode_string(st.st_mode),
            is_dir: st.st_mode & libc::S_IFMT == libc::S_IFDIR,
        });
    }
    files.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(files)
}

/// `GET /api/files/{*path}`: the file's bytes, with Range and conditional requests.
pub async fn download(
    State(state): State<AppState>,
    UrlPath(path): UrlPath<String>,
    req: Request,
) -> Result<Response, ApiError> {
    let ws = state.workspace.clone();
    let user = path.trim_start_matches('/').to_string();
    let (file, rel) = tokio::task::spawn_blocking(move || ws.open_read(&user))
        .await
        .map_err(ApiError::internal)??;
    let mut resp = serve_open_file(file, &rel, req).await?;
    let name = rel
        .file_name()
        .map(|n| n.to_string_lossy().replace(['"', '\\'], "_"))
        .unwrap_or_default();
    let headers = resp.headers_mut();
    headers.insert(
        "content-description",
        HeaderValue::from_static("File Transfer"),
    );
    headers.insert(
        "content-transfer-encoding",
        HeaderValue::from_static("binary"),
    );
    if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{name}\"")) {
        headers.insert(header::CONTENT_DISPOSITION, v);
    }
    Ok(resp)
}

/// Serves an already-opened regular file with Range and conditional-request support. The file
/// is re-opened through `/proc/self/fd` (the same inode, never a path the sandbox could swap);
/// without `/proc` it is streamed whole.
async fn serve_open_file(file: File, rel: &Path, req: Request) -> Result<Response, ApiError> {
    let mime = mime_guess::from_path(rel).first_or_octet_stream();
    let by_fd = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
    if by_fd.exists() {
        let resp = ServeFile::new_with_mime(&by_fd, &mime)
            .oneshot(req)
            .await
            .map_err(ApiError::internal)?
            .map(Body::new);
        drop(file);
        return Ok(resp);
    }
    let len = file.metadata().map_err(ApiError::internal)?.len();
    let body = Body::from_stream(tokio_util::io::ReaderStream::new(
        tokio::fs::File::from_std(file),
    ));
    let mut resp = Response::new(body);
    if let Ok(v) = HeaderValue::from_str(mime.as_ref()) {
        resp.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    resp.headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    Ok(resp)
}

/// Go's `FileMode.String()` from a `st_mode`: `-rw-r--r--`, `drwxr-xr-x`, `Lrwxrwxrwx`, ...
pub fn go_mode_string(st_mode: u32) -> String {
    let kind = st_mode & libc::S_IFMT;
    let mut s = String::new();
    match kind {
        libc::S_IFDIR => s.push('d'),
        libc::S_IFLNK => s.push('L'),
        libc::S_IFBLK | libc::S_IFCHR => s.push('D'),
        libc::S_IFIFO => s.push('p'),
        libc::S_IFSOCK => s.push('S'),
        _ => {}
    }
    for (bit, c) in [(0o4000, 'u'), (0o2000, 'g'), (0o1000, 't')] {
        if st_mode & bit != 0 {
            s.push(c);
        }
    }
    if kind == libc::S_IFCHR {
        s.push('c');
    }
    if s.is_empty() {
        s.push('-');
    }
    for (i, c) in "rwxrwxrwx".chars().enumerate() {
        s.push(if st_mode & (1 << (8 - i)) != 0 {
            c
        } else {
            '-'
        });
    }
    s
}

/// Modification time (Unix seconds) in RFC 3339, whole seconds (Go's `time.RFC3339`).
fn rfc3339(mtime: i64) -> String {
    jiff::Timestamp::from_second(mtime)
        .map(|ts| ts.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn modes_parse_like_upstream() {
        assert_eq!(parse_mode(None), 0o644);
        assert_eq!(parse_mode(Some("")), 0o644);
        assert_eq!(parse_mode(Some("0755")), 0o755);
        assert_eq!(parse_mode(Some("600")), 0o600);
        assert_eq!(parse_mode(Some("0999")), 0o644);
        assert_eq!(parse_mode(Some("1777")), 0o644);
        assert_eq!(parse_mode(Some("rw")), 0o644);
    }

    #[test]
    fn mode_strings_match_go() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        std::fs::write(&f, "x").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert_eq!(
            go_mode_string(std::fs::metadata(&f).unwrap().mode()),
            "-rw-r-----"
        );
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(
            go_mode_string(std::fs::metadata(dir.path()).unwrap().mode()),
            "drwxr-xr-x"
        );
        assert_eq!(go_mode_string(libc::S_IFIFO | 0o644), "prw-r--r--");
    }
}
