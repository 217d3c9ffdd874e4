//! A hostile sandbox's answers, byte for byte: the Router's own HTTP/1.1 client (`h1`, `pool`)
//! against hyper's client on the same raw responses (a differential test: where hyper takes an
//! answer, the Router gives the client the same status and body, except where it is stricter on
//! purpose; where hyper refuses one, so does the Router), and what a broken or surplus answer
//! does to connection reuse and retries.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::time::Duration;

use common::*;
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Reads one request head (and a `content-length` body) from `s`; false at the end.
async fn read_request(s: &mut TcpStream, buf: &mut Vec<u8>) -> bool {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
            let body = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .map_or(0, |n| n.trim().parse::<usize>().unwrap());
            while buf.len() < end + 4 + body {
                let mut chunk = [0u8; 4096];
                match s.read(&mut chunk).await {
                    Ok(0) | Err(_) => return false,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            buf.drain(..end + 4 + body);
            return true;
        }
        let mut chunk = [0u8; 4096];
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// An upstream that answers every request on every connection with `raw`, then closes when
/// `close` (else waits for the next request); counts the connections it accepts.
async fn scripted(raw: &'static [u8], close: bool) -> (String, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            count.fetch_add(1, SeqCst);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                while read_request(&mut s, &mut buf).await {
                    if s.write_all(raw).await.is_err() || close {
                        return;
                    }
                }
            });
        }
    });
    (addr, accepted)
}

/// What a client ends up with: the status and the whole body, or a failure.
#[derive(Debug, PartialEq)]
enum Outcome {
    Answer(u16, Vec<u8>),
    /// The Router answered with its own error (`{"error","code"}`): the sandbox was unreachable.
    RouterError(u16),
    Failed,
}

impl Outcome {
    /// The client did not get the answer: the Router's own 503, or a cut body.
    fn refused(&self) -> bool {
        matches!(self, Self::Failed | Self::RouterError(503))
    }
}

/// hyper's client on one fresh connection, as the Router used to forward.
async fn through_hyper(addr: &str) -> Outcome {
    let go = async {
        let s = TcpStream::connect(addr).await.ok()?;
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(s))
                .await
                .ok()?;
        tokio::spawn(conn);
        let req = http::Request::get("/x")
            .header("host", addr)
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        let resp = send.send_request(req).await.ok()?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.ok()?.to_bytes();
        Some(Outcome::Answer(status, body.to_vec()))
    };
    match tokio::time::timeout(Duration::from_secs(3), go).await {
        Ok(Some(o)) => o,
        _ => Outcome::Failed,
    }
}

async fn through_router(router: &Router) -> Outcome {
    through_router_as(router, Sent::Buffered).await
}

/// How a request reaches the Router, and so which of its two upstream paths it takes.
#[derive(Debug, Clone, Copy)]
enum Sent {
    /// A `GET` without a body: read first, sent on a pooled connection by the Router's codec.
    Buffered,
    /// A `POST` whose body is a stream of unknown length: sent on a connection of its own by
    /// hyper's client, streaming.
    Streamed,
}

async fn through_router_as(router: &Router, sent: Sent) -> Outcome {
    let go = async {
        let req = match sent {
            Sent::Buffered => client().get(router.ci("x")),
            Sent::Streamed => {
                let parts = [Ok::<_, std::io::Error>(bytes::Bytes::from_static(b"body"))];
                client()
                    .post(router.ci("x"))
                    .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
                        parts,
                    )))
            }
        };
        let r = req
            .header("x-agentcube-session-id", "s")
            .send()
            .await
            .ok()?;
        let status = r.status().as_u16();
        let routers_own = r
            .headers()
            .get("x-agentcube-error")
            .is_some_and(|v| v == "router");
        let body = r.bytes().await.ok()?.to_vec();
        if routers_own {
            return Some(Outcome::RouterError(status));
        }
        Some(Outcome::Answer(status, body))
    };
    match tokio::time::timeout(Duration::from_secs(3), go).await {
        Ok(Some(o)) => o,
        _ => Outcome::Failed,
    }
}

/// Answers both clients take alike.
const SAME: &[(&str, &[u8])] = &[
    ("length", b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello"),
    ("repeated equal lengths", b"HTTP/1.1 200 OK\r\ncontent-length: 5, 5\r\ncontent-length: 5\r\n\r\nhello"),
    ("chunked", b"HTTP/1.1 201 Created\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"),
    ("chunked with extensions and trailers", b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5;a=b\r\nhello\r\n0\r\nx-t: 1\r\n\r\n"),
    ("interim responses first", b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"),
    ("204 ignores a length", b"HTTP/1.1 204 No Content\r\ncontent-length: 5\r\n\r\n"),
    ("no framing: until close", b"HTTP/1.1 200 OK\r\n\r\nall of it"),
    ("HTTP/1.0", b"HTTP/1.0 200 OK\r\n\r\nold"),
    ("surplus bytes after the body", b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokHTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nevil"),
];

/// Answers both refuse (hyper errors; the Router answers with its own error, or cuts the
/// body so the client sees a failure, never a complete answer).
const REFUSED: &[(&str, &[u8])] = &[
    (
        "differing lengths",
        b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\nhello!",
    ),
    (
        "signed length",
        b"HTTP/1.1 200 OK\r\ncontent-length: +5\r\n\r\nhello",
    ),
    (
        "truncated length body",
        b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhello",
    ),
    (
        "negative chunk",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n-5\r\nhello\r\n0\r\n\r\n",
    ),
    (
        "chunk without its CRLF",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n",
    ),
    (
        "truncated chunked body",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhel",
    ),
    (
        "folded header",
        b"HTTP/1.1 200 OK\r\nx: a\r\n b\r\ncontent-length: 0\r\n\r\n",
    ),
    (
        "space in a header name",
        b"HTTP/1.1 200 OK\r\nbad name: x\r\ncontent-length: 0\r\n\r\n",
    ),
    (
        "bare LF in a chunk extension",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5;a\nb\r\nhello\r\n0\r\n\r\n",
    ),
    ("not HTTP", b"SSH-2.0-OpenSSH_9.6\r\n\r\n"),
];

/// Answers hyper takes and the Router refuses on purpose: ambiguous framing from untrusted
/// code (RFC 9112 §6.3 says to treat it as an error), and a 101 to a request that asked for no
/// upgrade (hyper hands it over; the Router used to pass a bodiless 101 to its client).
const STRICTER: &[(&str, &[u8])] = &[
    ("unasked upgrade", b"HTTP/1.1 101 Switching Protocols\r\nupgrade: x\r\nconnection: upgrade\r\n\r\n"),
    ("length and chunked", b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
];

async fn outcomes(raw: &'static [u8]) -> (Outcome, Outcome) {
    outcomes_as(raw, Sent::Buffered).await
}

async fn outcomes_as(raw: &'static [u8], sent: Sent) -> (Outcome, Outcome) {
    let (addr, _) = scripted(raw, true).await;
    let router = router_to(&addr).await;
    let pair = (
        through_hyper(&addr).await,
        through_router_as(&router, sent).await,
    );
    router.stop().await;
    pair
}

#[tokio::test]
async fn the_router_reads_a_sandboxs_answers_as_hyper_does() {
    for (name, raw) in SAME {
        let (hyper, router) = outcomes(raw).await;
        assert!(
            matches!(hyper, Outcome::Answer(..)),
            "{name}: hyper {hyper:?}"
        );
        assert_eq!(router, hyper, "{name}");
    }
}

#[tokio::test]
async fn answers_hyper_refuses_never_reach_the_client_whole() {
    for (name, raw) in REFUSED {
        let (hyper, router) = outcomes(raw).await;
        assert_eq!(hyper, Outcome::Failed, "{name}: hyper took it");
        assert!(router.refused(), "{name}: the Router gave {router:?}");
    }
}

#[tokio::test]
async fn ambiguous_framing_is_refused_where_hyper_guesses() {
    for (name, raw) in STRICTER {
        let (hyper, router) = outcomes(raw).await;
        assert!(
            matches!(hyper, Outcome::Answer(..)),
            "{name}: hyper {hyper:?}"
        );
        assert!(router.refused(), "{name}: the Router gave {router:?}");
    }
}

/// A streamed request goes out on hyper's client instead of the Router's codec: what the pooled
/// path refuses, this one refuses too (the two answers hyper's client would take, an unasked
/// 101 and a length with chunked, are checked after it).
#[tokio::test]
async fn streamed_requests_refuse_the_same_answers() {
    for (name, raw) in REFUSED.iter().chain(STRICTER) {
        let (_, router) = outcomes_as(raw, Sent::Streamed).await;
        assert!(
            router.refused(),
            "{name}: a streamed request got {router:?}"
        );
    }
}

#[tokio::test]
async fn only_clean_answers_leave_their_connection_reusable() {
    // Bytes after the answer (a second response nobody asked for): the connection is dropped,
    // so they can never be read as the answer to the next request.
    let (addr, accepted) = scripted(
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokHTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nevil",
        false,
    )
    .await;
    let router = router_to(&addr).await;
    for i in 1..=3 {
        assert_eq!(
            through_router(&router).await,
            Outcome::Answer(200, b"ok".to_vec())
        );
        assert_eq!(accepted.load(SeqCst), i, "a dirty connection was reused");
    }
    // A clean chunked answer keeps it.
    let (addr, accepted) = scripted(
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        false,
    )
    .await;
    let router = router_to(&addr).await;
    for _ in 0..3 {
        assert_eq!(
            through_router(&router).await,
            Outcome::Answer(200, b"ok".to_vec())
        );
    }
    assert_eq!(accepted.load(SeqCst), 1);
}

/// An upstream that answers the first request of each connection and closes the connection,
/// unanswered, on its second: what a server ending an idle keep-alive connection looks like
/// when the Router's next request crosses its close. Counts requests by method.
async fn closes_on_second_request() -> (String, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let (posts, gets) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (p, g) = (posts.clone(), gets.clone());
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let (p, g) = (p.clone(), g.clone());
            tokio::spawn(async move {
                let mut buf = Vec::new();
                for n in 0.. {
                    let method = loop {
                        let head = String::from_utf8_lossy(&buf).to_string();
                        if head.contains("\r\n\r\n") {
                            break head.split(' ').next().unwrap().to_string();
                        }
                        let mut chunk = [0u8; 4096];
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(k) => buf.extend_from_slice(&chunk[..k]),
                        }
                    };
                    if !read_request(&mut s, &mut buf).await {
                        return;
                    }
                    match method.as_str() {
                        "POST" => p.fetch_add(1, SeqCst),
                        _ => g.fetch_add(1, SeqCst),
                    };
                    if n == 1 {
                        return;
                    }
                    let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                    if s.write_all(ok).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, posts, gets)
}

#[tokio::test]
async fn only_idempotent_requests_are_sent_again_after_an_unanswered_close() {
    let (addr, posts, gets) = closes_on_second_request().await;
    let router = router_to(&addr).await;
    let post = || {
        client()
            .post(router.ci("x"))
            .header("x-agentcube-session-id", "s")
            .body("{}")
            .send()
    };
    assert_eq!(post().await.unwrap().status(), 200);
    // The second POST goes out on the kept connection, which closes without an answer: it may
    // have been acted on, so it is not sent again; the client gets the Router's error.
    let r = post().await.unwrap();
    assert_eq!(r.status(), 503, "{:?}", r.text().await);
    assert_eq!(posts.load(SeqCst), 2, "a POST was sent twice");
    // A GET in the same place is sent again on a new connection, and the client never knows.
    assert_eq!(
        through_router(&router).await,
        Outcome::Answer(200, b"ok".to_vec())
    );
    assert_eq!(
        through_router(&router).await,
        Outcome::Answer(200, b"ok".to_vec())
    );
    assert_eq!(
        gets.load(SeqCst),
        3,
        "the unanswered GET was not sent again"
    );
}
