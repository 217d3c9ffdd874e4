//! A test upstream: echoes what it received, answers any status, streams SSE, accepts upgrades,
//! sends large answers.

use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, Request};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use futures_util::stream;

pub fn app() -> axum::Router {
    axum::Router::new()
        .route("/status/{code}", any(status))
        .route("/sse", get(sse))
        .route("/ws", get(ws))
        .route("/upload", axum::routing::post(upload))
        .route("/big/{bytes}", get(big))
        .fallback(echo)
}

/// `bytes` bytes of `a`, in 64 KiB chunks.
async fn big(Path(bytes): Path<usize>) -> Body {
    let chunk = bytes::Bytes::from(vec![b'a'; 64 << 10]);
    let chunks = bytes.div_ceil(chunk.len());
    Body::from_stream(stream::iter(
        (0..chunks).map(move |_| Ok::<_, std::io::Error>(chunk.clone())),
    ))
}

async fn echo(req: Request) -> impl IntoResponse {
    let headers: serde_json::Map<String, serde_json::Value> = req
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.to_string(),
                serde_json::Value::String(v.to_str().unwrap_or("").into()),
            )
        })
        .collect();
    let body = serde_json::json!({
        "method": req.method().as_str(),
        "version": format!("{:?}", req.version()),
        "path": req.uri().path(),
        "query": req.uri().query(),
        "headers": headers,
    });
    (
        [("connection", "x-secret"), ("x-secret", "1")],
        axum::Json(body),
    )
}

/// Reads the whole body before answering, as PicoD's upload does.
async fn upload(body: axum::body::Bytes) -> String {
    format!("{} bytes", body.len())
}

async fn status(Path(code): Path<u16>) -> Response {
    (StatusCode::from_u16(code).unwrap(), "upstream says no").into_response()
}

async fn sse() -> Response {
    let events = stream::unfold(0, |i| async move {
        if i == 3 {
            return None;
        }
        if i > 0 {
            tokio::time::sleep(Duration::from_millis(400)).await;
        }
        Some((
            Ok::<_, std::convert::Infallible>(format!("data: event-{i}\n\n")),
            i + 1,
        ))
    });
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(Body::from_stream(events))
        .unwrap()
}

async fn ws(headers: HeaderMap, mut req: Request) -> Response {
    assert_eq!(headers.get("upgrade").unwrap(), "websocket");
    let on = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let io = on.await.unwrap();
        let mut io = hyper_util::rt::TokioIo::new(io);
        let mut buf = [0u8; 64];
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok(n) = io.read(&mut buf).await {
            if n == 0 {
                break;
            }
            io.write_all(&buf[..n]).await.unwrap();
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .body(Body::empty())
        .unwrap()
}
