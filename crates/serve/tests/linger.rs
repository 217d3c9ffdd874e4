//! A connection the server closes while the client is still sending (a `Connection: close`
//! request followed by pipelined bytes, an answer given before an upload was read) must not
//! lose the end of its answer: closing a TCP socket with unread input makes the kernel send a
//! reset at once and throw away what it had not sent yet (RFC 9112 §9.6). The server half-closes
//! and reads until the client closes instead ("lingering close", as nginx does).

use std::net::SocketAddr;
use std::time::Duration;

use std::sync::Arc;

use agentcube_serve::{Limits, Options, Refusal, Stats, serve};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Larger than what loopback sockets buffer, so the answer's end is still queued in the
/// server's kernel when its connection ends.
const ANSWER: usize = 8 << 20;

async fn start(fast_lane: bool) -> SocketAddr {
    start_with(Limits {
        fast_lane,
        ..Limits::default()
    })
    .await
}

/// Limits allowing one connection at a time.
fn one_slot() -> Limits {
    Limits {
        max_connections: 1,
        ..Limits::default()
    }
}

async fn start_with(limits: Limits) -> SocketAddr {
    start_counted(limits).await.0
}

async fn start_counted(limits: Limits) -> (SocketAddr, Arc<Stats>) {
    let app = axum::Router::new()
        .route("/big", axum::routing::any(|| async { vec![b'a'; ANSWER] }))
        .route("/small", axum::routing::any(|| async { "small" }));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let options = Options::new(limits, Refusal::json("{\"refused\":true}"));
    let stats = options.stats.clone();
    tokio::spawn(serve(l.into(), app, options, std::future::pending::<()>()));
    (addr, stats)
}

/// Sends `raw`, waits a moment (the answer fills the buffers meanwhile), then reads what the
/// server sends until it closes: the byte count, or how reading ended.
async fn exchange(addr: SocketAddr, raw: &[u8]) -> Result<usize, String> {
    sent_then_read(addr, raw).await.map(|got| got.len())
}

/// [`exchange`]: what the server sent, or how writing or reading ended.
async fn sent_then_read(addr: SocketAddr, raw: &[u8]) -> Result<Vec<u8>, String> {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(raw)
        .await
        .map_err(|e| format!("writing the request: {e}"))?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut got = Vec::new();
    match s.read_to_end(&mut got).await {
        Ok(_) => Ok(got),
        Err(e) => Err(format!("{e} after {} bytes", got.len())),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_is_delivered_whole_when_the_client_sent_more_than_was_read() {
    for fast_lane in [true, false] {
        let addr = start(fast_lane).await;
        // The last request of the connection, followed by one it never reads.
        let mut raw = b"GET /big HTTP/1.1\r\nhost: h\r\nconnection: close\r\n\r\n".to_vec();
        raw.extend_from_slice(b"POST /big HTTP/1.1\r\nhost: h\r\ncontent-length: 65536\r\n\r\n");
        raw.extend(std::iter::repeat_n(b'p', 65536));
        let got = exchange(addr, &raw).await;
        let got = got.unwrap_or_else(|e| panic!("fast lane {fast_lane}: {e}"));
        assert!(
            got > ANSWER,
            "fast lane {fast_lane}: {got} bytes, the answer has {ANSWER}"
        );
        // HTTP/1.0 (closes after one answer) with a second request behind it.
        let mut raw = b"GET /big HTTP/1.0\r\nhost: h\r\n\r\n".to_vec();
        raw.extend_from_slice(b"GET /big HTTP/1.1\r\nhost: h\r\nx-pad: ");
        raw.extend(std::iter::repeat_n(b'x', 4000));
        raw.extend_from_slice(b"\r\n\r\n");
        let got = exchange(addr, &raw).await;
        let got = got.unwrap_or_else(|e| panic!("fast lane {fast_lane}, HTTP/1.0: {e}"));
        assert!(got > ANSWER, "fast lane {fast_lane}: {got} bytes");
    }
}

const CLOSE: &[u8] = b"GET /small HTTP/1.1\r\nhost: h\r\nconnection: close\r\n\r\n";

/// A client that asked to close, read its answer (to the server's FIN), and then neither
/// closes nor sends: with one connection allowed, its slot is held while the server lingers,
/// and given back after two silent seconds.
#[tokio::test]
async fn a_silent_client_keeps_a_closing_connection_two_seconds_at_most() {
    let (addr, stats) = start_counted(one_slot()).await;
    let (a, got) = answered_and_kept_open(addr).await;
    assert!(String::from_utf8_lossy(&got).ends_with("small"));
    let lingering = tokio::time::Instant::now();
    let answer = |raw: Vec<u8>| String::from_utf8_lossy(&raw).into_owned();
    let b = answer(exchange_small(addr).await);
    assert!(b.contains("refused"), "served while a lingered: {b}");
    // b, refused, lingers too until its close reaches the server.
    settle(&stats, 1).await;
    assert_eq!(stats.lingering.get(), 1, "a is lingering");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let c = answer(exchange_small(addr).await);
    assert!(
        c.ends_with("small"),
        "still held after {:?}: {c}",
        lingering.elapsed()
    );
    // c lingers until its close reaches the server, a moment after it read its answer.
    settle(&stats, 0).await;
    assert_eq!(stats.lingering.get(), 0, "a is done lingering, c closed");
    drop(a);
}

/// Waits (a second at most) for the lingering gauge to read `n`: a connection stops lingering
/// a moment after its client's close reaches the server.
async fn settle(stats: &Stats, n: i64) {
    let settled = tokio::time::Instant::now() + Duration::from_secs(1);
    while stats.lingering.get() != n && tokio::time::Instant::now() < settled {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A client that keeps a closing connection alive with a byte now and then is cut after
/// ten seconds in all, and its slot given back.
#[tokio::test]
async fn a_trickling_client_keeps_a_closing_connection_ten_seconds_at_most() {
    let addr = start_with(one_slot()).await;
    let (mut a, _) = answered_and_kept_open(addr).await;
    let start = tokio::time::Instant::now();
    // Writes fail once the server has closed (a reset answers the first byte after it).
    while a.write_all(b"x").await.is_ok() && start.elapsed() < Duration::from_secs(20) {
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(9500) && took < Duration::from_secs(15),
        "closed after {took:?}"
    );
    let c = String::from_utf8_lossy(&exchange_small(addr).await).into_owned();
    assert!(c.ends_with("small"), "slot not given back: {c}");
}

/// One `GET /small` asking to close, read until the server's FIN; the client's side stays
/// open.
async fn answered_and_kept_open(addr: SocketAddr) -> (tokio::net::TcpStream, Vec<u8>) {
    let mut a = tokio::net::TcpStream::connect(addr).await.unwrap();
    a.write_all(CLOSE).await.unwrap();
    let mut got = Vec::new();
    a.read_to_end(&mut got).await.unwrap();
    (a, got)
}

/// One `GET /small` on a new connection (closing): everything the server sent.
async fn exchange_small(addr: SocketAddr) -> Vec<u8> {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(CLOSE).await.unwrap();
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got).await;
    got
}

/// A slowloris the watchdog cuts (its head still incomplete after the header timeout) is
/// closed at once, not lingered with: its slot is free for the next client right away, however
/// it keeps trickling.
#[tokio::test]
async fn a_connection_cut_for_stalling_gives_its_slot_back_at_once() {
    let addr = start_with(Limits {
        header_read_timeout: Duration::from_millis(500),
        ..one_slot()
    })
    .await;
    let mut a = tokio::net::TcpStream::connect(addr).await.unwrap();
    a.write_all(b"GET /small HTTP/1.1\r\n").await.unwrap();
    let (mut r, mut w) = a.into_split();
    let trickle = tokio::spawn(async move {
        while w.write_all(b"x-a: b\r\n").await.is_ok() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let mut got = Vec::new();
    let _ = r.read_to_end(&mut got).await;
    let c = String::from_utf8_lossy(&exchange_small(addr).await).into_owned();
    assert!(
        c.ends_with("small"),
        "the cut slowloris still holds the slot: {c}"
    );
    trickle.abort();
}

/// A client refused over `max_connections` while it is still sending its request (an upload
/// larger than the socket buffers) gets the 503 in the component's shape, not a reset: the
/// refused connection lingers like any other.
#[tokio::test]
async fn a_refused_client_still_uploading_gets_its_503_not_a_reset() {
    let addr = start_with(one_slot()).await;
    let held = holding_the_slot(addr).await;
    let mut raw = b"POST /small HTTP/1.1\r\nhost: h\r\ncontent-length: 4194304\r\n\r\n".to_vec();
    raw.extend(std::iter::repeat_n(b'u', 4 << 20));
    let got = sent_then_read(addr, &raw)
        .await
        .unwrap_or_else(|e| panic!("refused with a reset: {e}"));
    let got = String::from_utf8_lossy(&got);
    assert!(
        got.starts_with("HTTP/1.1 503") && got.ends_with("{\"refused\":true}"),
        "{got}"
    );
    drop(held);
}

/// Refused connections linger 64 at a time at most: beyond that they are closed at once (a
/// flood of refused connections holds a bounded number of descriptors), and a byte sent to
/// one of those after its 503 is answered with a reset. The lingering gauge counts the 64.
#[tokio::test]
async fn at_most_64_refused_connections_linger() {
    let (addr, stats) = start_counted(one_slot()).await;
    let held = holding_the_slot(addr).await;
    let mut refused = Vec::new();
    for _ in 0..70 {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        assert!(got.starts_with(b"HTTP/1.1 503"));
        // A byte to a closed socket is answered with a reset, which the next write sees; one
        // that lingers reads it (and waits two more seconds for the next).
        let _ = s.write_all(b"x").await;
        refused.push(s);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut reset = 0;
    for s in &mut refused {
        if s.write_all(b"x").await.is_err() {
            reset += 1;
        }
    }
    assert_eq!(reset, 70 - 64, "refused connections closed at once");
    assert_eq!(
        stats.lingering.get(),
        64,
        "the lingering refused connections"
    );
    drop(refused);
    settle(&stats, 0).await;
    assert_eq!(
        stats.lingering.get(),
        0,
        "closed by their clients: done lingering"
    );
    drop(held);
}

/// A keep-alive connection that was answered and stays open, idle: it holds its slot (for the
/// 90 s keep-alive).
async fn holding_the_slot(addr: SocketAddr) -> tokio::net::TcpStream {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /small HTTP/1.1\r\nhost: h\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    while !got.ends_with(b"small") {
        let mut buf = [0; 1024];
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    s
}
