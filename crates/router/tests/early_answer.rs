//! A sandbox that answers before it has read the request's body (a 413 for an upload it will
//! not take, an auth failure) and closes without reading the rest — as many servers do — must
//! have that answer reach the client, not a Router error: the client is told why. Likewise the
//! last bytes a sandbox writes into an upgraded connection before closing it on a client that
//! is still sending.

mod common;

use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// A scripted upstream on a free loopback port (its address): on each connection, once a
/// request's head has arrived (and maybe some of its body), `then` runs with the connection; a
/// connection that ends before is dropped.
async fn upstream<F, Fut>(then: F) -> String
where
    F: Fn(tokio::net::TcpStream) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let then = then.clone();
            tokio::spawn(async move {
                if read_head(&mut s).await {
                    then(s).await;
                }
            });
        }
    });
    addr
}

/// An upstream that reads a request's head only, answers `413` and closes at once, with the
/// body still arriving (unread: its kernel resets the connection).
async fn refuses_uploads() -> String {
    upstream(|mut s| async move {
        let _ = s
            .write_all(b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 9\r\nconnection: close\r\n\r\ntoo large")
            .await;
    })
    .await
}

/// Reads until a request's head has arrived (and maybe some of its body): false if the
/// connection ended first.
async fn read_head(s: &mut tokio::net::TcpStream) -> bool {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    true
}

/// Uploads of each size in `sizes` through `router` to a sandbox answering `413 too large`
/// get exactly that answer, not a Router error.
async fn uploads_get_its_413(router: &Router, sizes: &[usize], upstream: &str) {
    for &size in sizes {
        let sent = client()
            .post(router.ci("api/files"))
            .header("x-agentcube-session-id", "s")
            .body(vec![b'u'; size])
            .send();
        let r = tokio::time::timeout(Duration::from_secs(20), sent)
            .await
            .expect("answered in time")
            .unwrap_or_else(|e| panic!("{size} bytes: {e:?}"));
        let status = r.status().as_u16();
        let own = r.headers().get("x-agentcube-error").cloned();
        let body = r.text().await.unwrap_or_default();
        assert_eq!(
            (status, own, body.as_str()),
            (413, None, "too large"),
            "{size} bytes, {upstream} to the sandbox"
        );
    }
}

#[tokio::test]
async fn an_answer_given_before_the_body_was_read_reaches_the_client() {
    let addr = refuses_uploads().await;
    let router = router_to(&addr).await;
    uploads_get_its_413(&router, &[1024, 60 * 1024, 40 << 20], "HTTP/1.1").await;
    router.stop().await;
}

/// An upstream that reads a request's head only and closes without an answer.
async fn hangs_up() -> String {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let mut head = [0u8; 1024];
            let _ = s.read(&mut head).await;
            drop(s);
        }
    });
    addr
}

/// Writes a closed sandbox does not read go nowhere (so its answer is read), but a sandbox
/// that closed without answering still fails the request at once: an endless upload to it gets
/// the Router's 503 while it is still being sent.
#[tokio::test]
async fn a_sandbox_that_hangs_up_mid_upload_without_answering_is_503_at_once() {
    let addr = hangs_up().await;
    let router = router_to(&addr).await;
    let endless = futures_util::stream::unfold((), |()| async {
        tokio::time::sleep(Duration::from_millis(5)).await;
        Some((
            Ok::<_, std::io::Error>(bytes::Bytes::from(vec![b'u'; 64 * 1024])),
            (),
        ))
    });
    let sent = client()
        .post(router.ci("api/files"))
        .header("x-agentcube-session-id", "s")
        .body(reqwest::Body::wrap_stream(endless))
        .send();
    let r = tokio::time::timeout(Duration::from_secs(10), sent)
        .await
        .expect("answered while the upload goes on")
        .expect("an answer");
    assert_eq!(r.status().as_u16(), 503);
    assert_eq!(r.headers()["x-agentcube-error"], "router");
    router.stop().await;
}

/// The same over h2c (a gRPC agent's port): the sandbox answers 413 without reading the
/// upload and resets the stream; the client still gets the 413.
#[tokio::test]
async fn an_h2c_sandboxs_early_answer_reaches_the_client() {
    let app = axum::Router::new()
        .fallback(|| async { (axum::http::StatusCode::PAYLOAD_TOO_LARGE, "too large") });
    let (url, _task) = serve(app).await;
    let store = memory();
    session_to_as(
        store.as_ref(),
        "s",
        url.trim_start_matches("http://"),
        "H2C",
    )
    .await;
    let router = Router::start("http://127.0.0.1:9", store, |_| {}).await;
    uploads_get_its_413(&router, &[1024, 40 << 20], "h2c").await;
    router.stop().await;
}

/// An upstream that takes every request as a WebSocket upgrade (101), reads 256 KiB of what the
/// client then sends, writes its last bytes (`bye`) and closes with more still arriving (its
/// kernel resets the connection).
async fn ends_tunnels_mid_stream() -> String {
    upstream(|mut s| async move {
        let switched = b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n";
        if s.write_all(switched).await.is_err() {
            return;
        }
        let (mut got, mut buf) = (0, vec![0u8; 64 * 1024]);
        while got < 256 * 1024 {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got += n,
            }
        }
        let _ = s.write_all(b"bye").await;
    })
    .await
}

/// A sandbox that ends an upgraded connection (a WebSocket) with last bytes and closes while
/// the client is still sending: the client gets those bytes before the tunnel closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnels_last_bytes_reach_a_client_still_sending() {
    let upstream = ends_tunnels_mid_stream().await;
    let router = router_to(&upstream).await;
    let mut lost = 0;
    for _ in 0..40 {
        let (s, head) = websocket(&router, "s").await;
        assert!(head.starts_with("http/1.1 101"), "{head}");
        let (mut r, mut w) = s.into_split();
        let sender = tokio::spawn(async move {
            let chunk = vec![b'x'; 16 * 1024];
            while w.write_all(&chunk).await.is_ok() {}
        });
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        let read = async {
            loop {
                match r.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(10), read)
            .await
            .expect("the tunnel closed");
        sender.abort();
        if got != b"bye" {
            lost += 1;
        }
    }
    assert_eq!(lost, 0, "tunnels whose last bytes were lost, of 40");
}
