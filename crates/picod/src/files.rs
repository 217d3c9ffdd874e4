//! `/api/files`: upload (JSON base64 or multipart), list, and download with Range support.

use std::io::Write;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};

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
use crate::jail::JailError;
use crate::server::AppState;

const DEFAULT_MODE: u32 = 0o644;

impl From<JailError> for ApiError {
    fn from(e: JailError) -> Self {
        match e {
            JailError::Escape(p) => ApiError::Forbidden(format!("access denied: {p}")),
            JailError::Io(e) if e.kind() == std::io::ErrorKind::NotADirectory => {
                ApiError::BadRequest(e.to_string())
            }
            JailError::Io(e) => ApiError::internal(e),
        }
    }
}

/// `POST /api/files`: multipart when the Content-Type says so, JSON otherwise (as upstream).
pub async fn upload(State(state): State<AppState>, req: Request) -> Result<Response, ApiError> {
    let is_multipart = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("multipart/form-data"));
    let (path, mode, content) = if is_multipart {
        read_multipart(req, &state).await?
    } else {
        read_json(req, &state).await?
    };
    let mode = parse_mode(mode.as_deref());
    let ws = state.workspace.clone();
    let resp = tokio::task::spawn_blocking(move || -> Result<UploadResponse, ApiError> {
        let target = ws.resolve(&path)?;
        if target.is_dir() {
            return Err(ApiError::BadRequest(
                "Path is a directory, not a file".into(),
            ));
        }
        let mut file = ws.create_file(&target, mode)?;
        file.write_all(&content).map_err(ApiError::internal)?;
        let meta = file.metadata().map_err(ApiError::internal)?;
        Ok(UploadResponse {
            path: ws.relative(&target),
            size: meta.len(),
            mode: go_mode_string(&meta),
            modified: rfc3339(&meta),
        })
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
        let dir = ws.resolve(&path)?;
        let entries = std::fs::read_dir(&dir).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => ApiError::NotFound("Directory not found"),
            _ => ApiError::Internal(format!("Failed to read directory: {e}")),
        })?;
        let mut files: Vec<FileEntry> = entries
            .filter_map(Result::ok)
            .filter_map(|entry| {
                let meta = entry.metadata().ok()?;
                Some(FileEntry {
                    name: entry.file_name().to_string_lossy().into_owned(),
                    size: meta.len(),
                    modified: rfc3339(&meta),
                    mode: go_mode_string(&meta),
                    is_dir: meta.is_dir(),
                })
            })
            .collect();
        files.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Json(ListFilesResponse { files }))
    })
    .await
    .map_err(ApiError::internal)?
}

/// `GET /api/files/{*path}`: the file's bytes, with Range and conditional requests.
pub async fn download(
    State(state): State<AppState>,
    UrlPath(path): UrlPath<String>,
    req: Request,
) -> Result<Response, ApiError> {
    let ws = state.workspace.clone();
    let user = path.trim_start_matches('/').to_string();
    let target = tokio::task::spawn_blocking(move || ws.resolve(&user))
        .await
        .map_err(ApiError::internal)??;
    let meta = match tokio::fs::metadata(&target).await {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ApiError::NotFound("File not found"));
        }
        Err(e) => return Err(ApiError::internal(e)),
    };
    if meta.is_dir() {
        return Err(ApiError::BadRequest(
            "Path is a directory, not a file".into(),
        ));
    }
    let mut resp = ServeFile::new(&target)
        .oneshot(req)
        .await
        .map_err(ApiError::internal)?
        .map(Body::new);
    let name = target
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

/// Go's `FileMode.String()`: `-rw-r--r--`, `drwxr-xr-x`, `Lrwxrwxrwx`, ...
pub fn go_mode_string(meta: &std::fs::Metadata) -> String {
    let ft = meta.file_type();
    let mode = meta.permissions().mode();
    let mut s = String::new();
    if ft.is_dir() {
        s.push('d');
    }
    if ft.is_symlink() {
        s.push('L');
    }
    if ft.is_block_device() || ft.is_char_device() {
        s.push('D');
    }
    if ft.is_fifo() {
        s.push('p');
    }
    if ft.is_socket() {
        s.push('S');
    }
    for (bit, c) in [(0o4000, 'u'), (0o2000, 'g'), (0o1000, 't')] {
        if mode & bit != 0 {
            s.push(c);
        }
    }
    if ft.is_char_device() {
        s.push('c');
    }
    if s.is_empty() {
        s.push('-');
    }
    for (i, c) in "rwxrwxrwx".chars().enumerate() {
        s.push(if mode & (1 << (8 - i)) != 0 { c } else { '-' });
    }
    s
}

/// Modification time in RFC 3339, whole seconds (Go's `time.RFC3339`).
fn rfc3339(meta: &std::fs::Metadata) -> String {
    let Ok(modified) = meta.modified() else {
        return String::new();
    };
    let Ok(ts) = jiff::Timestamp::try_from(modified) else {
        return String::new();
    };
    ts.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

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
            go_mode_string(&std::fs::metadata(&f).unwrap()),
            "-rw-r-----"
        );
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(
            go_mode_string(&std::fs::metadata(dir.path()).unwrap()),
            "drwxr-xr-x"
        );
    }
}
