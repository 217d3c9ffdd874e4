//! The Router's upstream connection pool, seen from a raw TCP upstream that counts the
//! connections it accepts and closes: keep-alive reuse, no reuse of a connection whose response
//! was not read to its end or that the sandbox closed, one connection per concurrent request.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A hand-written HTTP/1.1 upstream; by path: `/slow` answers after 300 ms, `/big` sends 64 MiB (more than socket buffers hold)
/// in 64 KiB pieces, `/close` answers with `connection: close` and closes, `/quit` answers
/// keep-alive and closes 20 ms later (as a server ending an idle connection), `/early` answers
/// before reading the request's body and then only reads (never answers again), anything else
/// answers `ok` and keeps the connection.
#[derive(Clone, Default)]
struct Counts {
    accepted: Arc<AtomicUsize>,
    ended: Arc<AtomicUsize>,
    /// The Router's end (its port) of each connection accepted.
    peers: Arc<std::sync::Mutex<Vec<u16>>>,
}

async fn raw_upstream() -> (String, Counts) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let counts = Counts::default();
    let c = counts.clone();
    tokio::spawn(async move {
        while let Ok((s, peer)) = l.accept().await {
            c.peers.lock().unwrap().push(peer.port());
            c.accepted.fetch_add(1, SeqCst);
            let c = c.clone();
            tokio::spawn(async move {
                let _ = answer(s).await;
                c.ended.fetch_add(1, SeqCst);
            });
        }
    });
    (addr, counts)
}

/// Answers requests (without bodies) until the peer closes or a path says to stop.
async fn answer(mut s: TcpStream) -> std::io::Result<()> {
    let mut buf = Vec::new();
    loop {
        let head = loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_string();
                buf.drain(..end + 4);
                break head;
            }
            let mut chunk = [0u8; 4096];
            let n = s.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let path = head.split(' ').nth(1).unwrap_or("/").to_string();
        const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
        match path.as_str() {
            "/slow" => {
                tokio::time::sleep(Duration::from_millis(300)).await;
                s.write_all(OK).await?;
            }
            "/big" => {
                let piece = vec![b'x'; 64 * 1024];
                s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 67108864\r\n\r\n")
                    .await?;
                for _ in 0..1024 {
                    s.write_all(&piece).await?;
                }
            }
            "/close" => {
                s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
                    .await?;
                return Ok(());
            }
            "/early" => {
                s.write_all(OK).await?;
                let mut sink = [0u8; 4096];
                while s.read(&mut sink).await? > 0 {}
                return Ok(());
            }
            "/quit" => {
                s.write_all(OK).await?;
                tokio::time::sleep(Duration::from_millis(20)).await;
                return Ok(());
            }
            _ => s.write_all(OK).await?,
        }
    }
}

async fn get(router: &Router, path: &str) -> reqwest::Response {
    router.get_in("s", path).send().await.unwrap()
}

async fn get_ok(router: &Router, path: &str) {
    let r = get(router, path).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "ok");
}

/// Waits until `n` connections have ended at the upstream.
async fn ended(c: &Counts, n: usize) {
    for _ in 0..200 {
        if c.ended.load(SeqCst) >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!(
        "{} upstream connections ended, want {n}",
        c.ended.load(SeqCst)
    );
}

#[tokio::test]
async fn sequential_requests_share_one_keep_alive_connection() {
    let (addr, c) = raw_upstream().await;
    let router = router_to(&addr).await;
    for _ in 0..20 {
        get_ok(&router, "x").await;
    }
    assert_eq!(c.accepted.load(SeqCst), 1);
    assert_eq!(c.ended.load(SeqCst), 0);
}

#[tokio::test]
async fn concurrent_requests_get_a_connection_each_and_keep_them() {
    let (addr, c) = raw_upstream().await;
    let router = router_to(&addr).await;
    let slow = (0..5).map(|_| get_ok(&router, "slow"));
    futures_util::future::join_all(slow).await;
    assert_eq!(c.accepted.load(SeqCst), 5);
    // Later requests reuse them.
    for _ in 0..10 {
        get_ok(&router, "x").await;
    }
    let slow = (0..5).map(|_| get_ok(&router, "slow"));
    futures_util::future::join_all(slow).await;
    assert_eq!(c.accepted.load(SeqCst), 5);
}

#[tokio::test]
async fn a_response_not_read_to_its_end_closes_its_connection() {
    let (addr, c) = raw_upstream().await;
    let router = router_to(&addr).await;
    let r = get(&router, "big").await;
    assert_eq!(r.status(), 200);
    drop(r);
    // The unread rest of the body cannot be skipped on a reused connection: it is closed.
    ended(&c, 1).await;
    get_ok(&router, "x").await;
    assert_eq!(c.accepted.load(SeqCst), 2);
    // A body read to its end gives its connection back.
    let r = get(&router, "big").await;
    assert_eq!(r.bytes().await.unwrap().len(), 64 << 20);
    get_ok(&router, "x").await;
    assert_eq!(c.accepted.load(SeqCst), 2);
}

#[tokio::test]
async fn connections_the_sandbox_closes_are_not_reused() {
    let (addr, c) = raw_upstream().await;
    let router = router_to(&addr).await;
    // `connection: close`, then a server that ends an idle keep-alive connection: the next
    // request goes on a new connection and succeeds.
    let r = get(&router, "close").await;
    assert_eq!(r.text().await.unwrap(), "ok");
    ended(&c, 1).await;
    get_ok(&router, "quit").await;
    ended(&c, 2).await;
    get_ok(&router, "x").await;
    assert_eq!(c.accepted.load(SeqCst), 3);
    get_ok(&router, "x").await;
    assert_eq!(c.accepted.load(SeqCst), 3);
}

#[tokio::test]
async fn a_connection_still_sending_a_request_body_is_not_waited_for() {
    let (addr, c) = raw_upstream().await;
    let router = router_to(&addr).await;
    // An upload that stalls after its first bytes, answered before its end.
    let stalled = futures_util::stream::once(async {
        Ok::<_, std::io::Error>(bytes::Bytes::from_static(b"0123456789"))
    })
    .chain(futures_util::stream::pending());
    let r = client()
        .post(router.ci("early"))
        .header("x-agentcube-session-id", "s")
        .body(reqwest::Body::wrap_stream(stalled))
        .send()
        .await
        .unwrap();
    assert_eq!(r.text().await.unwrap(), "ok");
    // Its connection is still busy sending: the next request takes another one at once.
    tokio::time::timeout(Duration::from_secs(5), get_ok(&router, "x"))
        .await
        .expect("a request waited behind a connection still sending a body");
    assert_eq!(c.accepted.load(SeqCst), 2);
}

/// A Router whose session `s` is `addr`, giving up a host that leaves a request unacknowledged
/// for `bound`.
async fn router_giving_up_after(addr: &str, bound: Duration) -> Router {
    let store = memory();
    session_to(store.as_ref(), "s", addr).await;
    Router::start("http://127.0.0.1:9", store, |c| c.dead_peer_timeout = bound).await
}

/// A pooled connection whose host went away without a word (a node gone, its packets dropped):
/// a request written into it is given up once its bytes have gone unacknowledged for the
/// dead-peer bound — keepalive probes do not run while bytes are unacknowledged, so before, it
/// was retransmitted for the kernel's ~15 minutes. A POST is answered 504, as a sandbox that
/// cannot be reached in time (it may have arrived: never sent twice); a GET goes out again on a new connection and is answered.
#[tokio::test]
async fn a_request_written_into_a_connection_whose_host_vanished_ends_in_seconds() {
    use agentcube_store::testing::BlackHole;
    let (addr, c) = raw_upstream().await;
    let port: u16 = addr.rsplit(':').next().unwrap().parse().unwrap();
    let bound = Duration::from_secs(1);
    let router = router_giving_up_after(&addr, bound).await;
    let in_dead_connection = |request: reqwest::RequestBuilder| async {
        let pooled = *c.peers.lock().unwrap().last().unwrap();
        let hole = BlackHole::connection(pooled, port);
        let started = std::time::Instant::now();
        let sent = tokio::time::timeout(Duration::from_secs(60), request.send()).await;
        let waited = started.elapsed();
        drop(hole);
        let r = sent.expect("a request written into a dead connection waited for the kernel");
        assert!(waited >= bound && waited < bound * 10, "{waited:?}");
        r.unwrap()
    };

    get_ok(&router, "x").await;
    let post = client()
        .post(router.ci("x"))
        .header("x-agentcube-session-id", "s")
        .body("{}");
    let r = in_dead_connection(post).await;
    assert_eq!(r.status(), 504);
    assert_eq!(c.accepted.load(SeqCst), 1, "a POST is never sent twice");

    get_ok(&router, "x").await;
    assert_eq!(c.accepted.load(SeqCst), 2);
    let r = in_dead_connection(router.get_in("s", "x")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "ok");
    assert_eq!(
        c.accepted.load(SeqCst),
        3,
        "the GET went out again on a new connection"
    );
}

/// The dead-peer bound never cuts a live host that reads a request late (a server busy with
/// something else): a pooled request's bytes (at most 64 KiB of body) are acknowledged by the
/// host's kernel whether or not the server reads them.
#[tokio::test]
async fn a_host_that_reads_a_request_late_still_gets_it() {
    let bound = Duration::from_millis(500);
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        tokio::time::sleep(bound * 6).await;
        // Unread, and all there: this host's kernel acknowledged the whole request.
        let mut chunk = vec![0u8; 1 << 18];
        let queued = s.peek(&mut chunk).await.unwrap();
        assert!(queued > 64 * 1024, "{queued}");
        let mut got = Vec::new();
        // The head and the 64 KiB body.
        while got.len() < 64 * 1024 + 100 {
            let n = s.read(&mut chunk).await.unwrap();
            assert!(n > 0);
            got.extend_from_slice(&chunk[..n]);
        }
        s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            .await
            .unwrap();
        let _ = s.read(&mut chunk).await;
    });
    let router = router_giving_up_after(&addr, bound).await;
    let r = client()
        .post(router.ci("x"))
        .header("x-agentcube-session-id", "s")
        .body(vec![b'x'; 64 * 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "ok");
}
