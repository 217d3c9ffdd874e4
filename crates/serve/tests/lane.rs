//! The HTTP/1.1 fast lane against hyper alone: the same app served twice, once with the lane
//! and once without, gets the same random request streams (valid, broken, pipelined, written
//! in random pieces), and the raw bytes of the two answers must be identical (`Date` values
//! masked). The app echoes what it was given, so what the handler saw is compared too.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use agentcube_serve::{Limits, Options, Refusal, Stats, serve};
use axum::body::Body;
use axum::extract::{Path, Request};
use axum::response::Response;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode};
use http_body::Frame;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Reproducible random cases (seeded).
struct Rng(fastrand::Rng);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(fastrand::Rng::with_seed(seed))
    }
    fn next(&mut self) -> u64 {
        self.0.u64(..)
    }
    fn below(&mut self, n: usize) -> usize {
        self.0.usize(..n)
    }
    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }
    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }
}

/// A response body made of given frames, of unknown length, optionally failing at its end.
struct Frames {
    frames: VecDeque<Frame<Bytes>>,
    fail: bool,
}

impl http_body::Body for Frames {
    type Data = Bytes;
    type Error = std::io::Error;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.frames.pop_front() {
            Some(f) => Poll::Ready(Some(Ok(f))),
            None if self.fail => Poll::Ready(Some(Err(std::io::Error::other("broken")))),
            None => Poll::Ready(None),
        }
    }
}

fn frames(chunks: &[&[u8]], trailers: Option<HeaderMap>, fail: bool) -> Body {
    let mut frames: VecDeque<_> = chunks
        .iter()
        .map(|c| Frame::data(Bytes::copy_from_slice(c)))
        .collect();
    if let Some(t) = trailers {
        frames.push_back(Frame::trailers(t));
    }
    Body::new(Frames { frames, fail })
}

fn with(status: u16, headers: &[(&'static str, &'static str)], body: Body) -> Response {
    let mut resp = Response::new(body);
    *resp.status_mut() = StatusCode::from_u16(status).unwrap();
    for (k, v) in headers {
        resp.headers_mut().append(*k, HeaderValue::from_static(v));
    }
    resp
}

/// The answer of each kind of response the differential covers, once the request's body is
/// read (hyper answers differently depending on timing when a handler leaves a body unread).
async fn kind(Path(kind): Path<String>, body: Body) -> Response {
    let _ = axum::body::to_bytes(body, usize::MAX).await;
    let big = Bytes::from(vec![b'b'; 100 * 1024]);
    let chunk: &[u8] = &[b'c'; 40 * 1024];
    let mut trailers = HeaderMap::new();
    trailers.insert("x-sum", HeaderValue::from_static("7"));
    trailers.insert("content-type", HeaderValue::from_static("text/evil"));
    trailers.insert("x-undeclared", HeaderValue::from_static("1"));
    match kind.as_str() {
        "text" => with(200, &[("content-type", "text/plain")], Body::from("hello")),
        "empty" => with(200, &[], Body::empty()),
        "created" => with(201, &[("location", "/x")], Body::from("{}")),
        "no-content" => with(204, &[("content-length", "1")], Body::from("x")),
        "not-modified" => with(304, &[("etag", "\"1\"")], Body::from("x")),
        "stream" => with(200, &[], frames(&[b"ab", b"", b"cd"], None, false)),
        "stream-length" => with(
            200,
            &[("content-length", "4")],
            frames(&[b"ab", b"cd"], None, false),
        ),
        "stream-short" => with(
            200,
            &[("content-length", "9")],
            frames(&[b"ab"], None, false),
        ),
        "stream-long" => with(
            200,
            &[("content-length", "3")],
            frames(&[b"ab", b"cd"], None, false),
        ),
        "stream-two-lengths" => with(
            200,
            &[("content-length", "2"), ("content-length", "3")],
            frames(&[b"ab"], None, false),
        ),
        "stream-bad-length" => with(
            200,
            &[("content-length", "x")],
            frames(&[b"ab"], None, false),
        ),
        "stream-fails" => with(200, &[], frames(&[b"ab"], None, true)),
        "trailers" => with(
            200,
            &[("trailer", "x-sum, content-type")],
            frames(&[b"ab"], Some(trailers), false),
        ),
        "undeclared-trailers" => with(200, &[], frames(&[b"ab"], Some(trailers), false)),
        "te" => with(200, &[("transfer-encoding", "chunked")], Body::from("abc")),
        "cookies" => with(
            200,
            &[("set-cookie", "a=1"), ("x-b", "2"), ("set-cookie", "c=3")],
            Body::from("c"),
        ),
        "close" => with(200, &[("connection", "close")], Body::from("bye")),
        "keep" => with(200, &[("connection", "keep-alive")], Body::from("k")),
        "date" => with(200, &[("date", "yesterday")], Body::from("d")),
        "continue" => with(100, &[("x-a", "1")], Body::from("x")),
        "teapot" => with(418, &[], Body::from("t")),
        "unknown-status" => with(599, &[], Body::from("u")),
        "big" => with(200, &[], Body::from(big)),
        "big-stream" => with(200, &[], frames(&[chunk, chunk, chunk], None, false)),
        "slow" => {
            tokio::time::sleep(Duration::from_millis(5)).await;
            with(200, &[], Body::from("slow"))
        }
        _ => with(404, &[], Body::empty()),
    }
}

/// What the handler was given, as text.
async fn echo(req: Request) -> String {
    let (parts, body) = req.into_parts();
    let body = axum::body::to_bytes(body, usize::MAX).await;
    let mut out = format!("{} {} {:?}\n", parts.method, parts.uri, parts.version);
    for (k, v) in &parts.headers {
        let _ = writeln!(out, "{k}: {v:?}");
    }
    match body {
        Ok(b) => {
            let _ = write!(out, "body {} {:?}", b.len(), String::from_utf8_lossy(&b));
        }
        Err(e) => {
            let _ = write!(out, "body error {e}");
        }
    }
    out
}

fn app() -> axum::Router {
    axum::Router::new()
        .route("/r/{kind}", axum::routing::any(kind))
        .fallback(echo)
}

async fn start(fast_lane: bool) -> (SocketAddr, Arc<Stats>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let mut options = Options::new(Limits::default(), Refusal::json("{}"));
    options.limits.fast_lane = fast_lane;
    let stats = options.stats.clone();
    tokio::spawn(serve(
        l.into(),
        app(),
        options,
        std::future::pending::<()>(),
    ));
    (addr, stats)
}

const KINDS: &[&str] = &[
    "text",
    "empty",
    "created",
    "no-content",
    "not-modified",
    "stream",
    "stream-length",
    "stream-short",
    "stream-long",
    "stream-two-lengths",
    "stream-bad-length",
    "stream-fails",
    "trailers",
    "undeclared-trailers",
    "te",
    "cookies",
    "close",
    "keep",
    "date",
    "continue",
    "teapot",
    "unknown-status",
    "big",
    "big-stream",
    "slow",
    "nowhere",
];

/// A request of a test stream.
struct Req {
    raw: Vec<u8>,
    /// `HEAD`: its answer has no body.
    head: bool,
}

/// A well-formed request: the lane's kind, or one hyper takes whole (other methods,
/// HTTP/1.0, chunked or large bodies, unusual `Connection` tokens).
fn ordinary(rng: &mut Rng) -> Req {
    let method = match rng.below(10) {
        0..=3 => "GET",
        4..=7 => "POST",
        _ => rng.pick(&["HEAD", "PUT", "DELETE", "OPTIONS"]),
    };
    let target = match rng.below(10) {
        0..=5 => format!("/r/{}", rng.pick(KINDS)),
        _ => rng
            .pick(&["/echo", "/echo?a=1&b=%20", "/e/%2F/x", "/"])
            .to_string(),
    };
    let version = if rng.chance(5) {
        "HTTP/1.0"
    } else {
        "HTTP/1.1"
    };
    let mut head = format!("{method} {target} {version}\r\nhost: h\r\n");
    for _ in 0..rng.below(4) {
        let line = rng.pick(&[
            "x-a: 1",
            "X-A: 2",
            "x-b: spaced  value ",
            "accept: */*",
            "authorization: Bearer t",
            "x-obs: \u{e9}",
            "x-empty:",
            "te: trailers",
            "TE: gzip, Trailers",
        ]);
        head.push_str(line);
        head.push_str("\r\n");
    }
    let connection = rng.pick(&[
        "",
        "",
        "",
        "",
        "keep-alive",
        "Keep-Alive, close",
        "close",
        "foo",
    ]);
    if !connection.is_empty() {
        let _ = write!(head, "connection: {connection}\r\n");
    }
    let body = match rng.below(8) {
        0 => vec![b'p'; 70 * 1024],
        1..=3 => Vec::new(),
        _ => format!("{{\"n\":{}}}", rng.below(1000)).into_bytes(),
    };
    let raw = match rng.below(10) {
        0 => chunked(head, &body),
        1 => {
            let _ = write!(
                head,
                "content-length: {0}\r\ncontent-length: {0}\r\n\r\n",
                body.len()
            );
            [head.into_bytes(), body].concat()
        }
        _ if body.is_empty() && rng.chance(50) => [head.into_bytes(), b"\r\n".to_vec()].concat(),
        _ => {
            let _ = write!(head, "content-length: {}\r\n\r\n", body.len());
            [head.into_bytes(), body].concat()
        }
    };
    Req {
        raw,
        head: method == "HEAD",
    }
}

fn chunked(mut head: String, body: &[u8]) -> Vec<u8> {
    head.push_str("transfer-encoding: chunked\r\n\r\n");
    let mut raw = head.into_bytes();
    if !body.is_empty() {
        raw.extend_from_slice(format!("{:x}\r\n", body.len()).as_bytes());
        raw.extend_from_slice(body);
        raw.extend_from_slice(b"\r\n");
    }
    raw.extend_from_slice(b"0\r\n\r\n");
    raw
}

/// A request that is malformed, or that asks for something the lane leaves to hyper
/// (`Expect`, upgrades, h2c settings): sent on its own once earlier answers are in, since
/// hyper itself answers a bad head differently depending on what it is still writing.
fn odd(rng: &mut Rng) -> Req {
    let line = rng.pick(&[
        "get /echo HTTP/1.1",
        "GET http://h/echo HTTP/1.1",
        "GET * HTTP/1.1",
        "GET /a b HTTP/1.1",
        "GET /\u{1} HTTP/1.1",
        "GET /\u{e9} HTTP/1.1",
        "GET /echo HTTP/1.2",
        "GET /echo HTTX/1.1",
        "GET /echo",
    ]);
    let mut head = format!("{line}\r\nhost: h\r\n");
    let extra = rng.pick(&[
        "",
        "bad header: 1\r\n",
        "x-fold: a\r\n b\r\n",
        "x-ctl: a\u{7f}b\r\n",
        "expect: 100-continue\r\n",
        "upgrade: websocket\r\nconnection: upgrade\r\n",
        "connection: upgrade\r\n",
        "http2-settings: AAMAAABkAAQCAAAAAAIAAAAA\r\nupgrade: h2c\r\nconnection: upgrade, http2-settings\r\n",
        "content-length: +1\r\n",
        "content-length: x\r\n",
        "content-length: 1, 2\r\n",
        "content-length: 0\r\ncontent-length: 1\r\n",
        "content-length: 99999999999999999999999\r\n",
        "many",
        "long",
    ]);
    match extra {
        "many" => (0..70).for_each(|i| {
            let _ = write!(head, "x-many-{i}: v\r\n");
        }),
        "long" => {
            let _ = write!(head, "x-long: {}\r\n", "l".repeat(20 * 1024));
        }
        _ => head.push_str(extra),
    }
    let raw = if extra.starts_with("expect") {
        format!("{head}content-length: 2\r\n\r\nok")
    } else {
        format!("{head}\r\n")
    };
    Req {
        raw: raw.into_bytes(),
        head: false,
    }
}

/// How many final answers (1xx aside) `buf` holds whole; `heads[i]`: request `i` was `HEAD`.
fn answers_in(buf: &[u8], heads: &[bool]) -> usize {
    let (mut pos, mut n) = (0, 0);
    loop {
        let mut h = [httparse::EMPTY_HEADER; 128];
        let mut r = httparse::Response::new(&mut h);
        let Ok(httparse::Status::Complete(len)) = r.parse(&buf[pos..]) else {
            return n;
        };
        let code = r.code.unwrap_or(0);
        let header = |name: &str| {
            r.headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case(name))
                .map(|h| String::from_utf8_lossy(h.value).into_owned())
        };
        let (te, cl) = (header("transfer-encoding"), header("content-length"));
        pos += len;
        if (100..200).contains(&code) && code != 101 {
            continue;
        }
        let bodiless = heads.get(n).copied().unwrap_or(false) || code == 204 || code == 304;
        let body = if bodiless {
            Some(0)
        } else if te.is_some() {
            chunked_len(&buf[pos..])
        } else {
            cl.and_then(|v| v.parse::<usize>().ok())
                .filter(|l| pos + l <= buf.len())
        };
        let Some(body) = body else { return n };
        pos += body;
        n += 1;
    }
}

/// The length of a whole chunked body (with trailers) at the start of `buf`.
fn chunked_len(buf: &[u8]) -> Option<usize> {
    let line = |from: usize| {
        let end = buf.get(from..)?.windows(2).position(|w| w == b"\r\n")?;
        Some((&buf[from..from + end], from + end + 2))
    };
    let mut pos = 0;
    loop {
        let (size, next) = line(pos)?;
        let size = usize::from_str_radix(std::str::from_utf8(size).ok()?.trim(), 16).ok()?;
        if size == 0 {
            pos = next;
            loop {
                let (field, next) = line(pos)?;
                pos = next;
                if field.is_empty() {
                    return Some(pos);
                }
            }
        }
        pos = next + size + 2;
        if pos > buf.len() {
            return None;
        }
    }
}

/// A client connection: what it sent and what came back.
struct Client {
    w: tokio::net::tcp::OwnedWriteHalf,
    rx: tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>,
    got: Vec<u8>,
    heads: Vec<bool>,
    closed: bool,
    rng: Rng,
}

impl Client {
    async fn connect(addr: SocketAddr, seed: u64) -> Self {
        let s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.set_nodelay(true).unwrap();
        let (mut r, w) = s.into_split();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut buf = vec![0; 64 * 1024];
            while let Ok(n @ 1..) = r.read(&mut buf).await {
                let _ = tx.send(buf[..n].to_vec());
            }
        });
        Self {
            w,
            rx,
            got: Vec::new(),
            heads: Vec::new(),
            closed: false,
            rng: Rng::new(seed),
        }
    }

    /// Sends the requests back to back, in random pieces (sometimes pausing between them),
    /// then waits until each has its answer or the server has closed.
    async fn send(&mut self, reqs: &[Req]) {
        let raw: Vec<u8> = reqs.iter().flat_map(|r| r.raw.clone()).collect();
        self.heads.extend(reqs.iter().map(|r| r.head));
        let mut rest = &raw[..];
        while !rest.is_empty() && !self.closed {
            let most = if self.rng.chance(50) { 64 } else { 4096 };
            let n = (1 + self.rng.below(most)).min(rest.len());
            if self.w.write_all(&rest[..n]).await.is_err() {
                break;
            }
            rest = &rest[n..];
            if self.rng.chance(10) {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        while !self.closed && answers_in(&self.got, &self.heads) < self.heads.len() {
            match tokio::time::timeout(Duration::from_secs(10), self.rx.recv()).await {
                Ok(Some(bytes)) => self.got.extend_from_slice(&bytes),
                Ok(None) => self.closed = true,
                Err(_) => {
                    self.got.extend_from_slice(b"<no answer in 10 s>");
                    self.closed = true;
                }
            }
        }
    }
}

/// One test stream on a fresh connection: each batch's requests pipelined, the next batch
/// sent once they are answered; everything the server wrote until it closed.
async fn stream(addr: SocketAddr, case: &[Vec<Req>], seed: u64) -> Vec<u8> {
    let mut c = Client::connect(addr, seed).await;
    for batch in case {
        c.send(batch).await;
    }
    c.got
}

/// `Date` values replaced (they differ by the second the answer was made).
fn masked(raw: &[u8]) -> String {
    let text = String::from_utf8_lossy(raw);
    let mut out = String::new();
    let mut rest: &str = &text;
    while let Some(i) = rest.find("\r\ndate: ") {
        let start = i + "\r\ndate: ".len();
        out.push_str(&rest[..start]);
        rest = &rest[start..];
        let stamp = rest.len() >= 29 && rest.as_bytes().get(25..29) == Some(b" GMT");
        if stamp {
            out.push_str("<date>");
            rest = &rest[29..];
        }
    }
    out.push_str(rest);
    out
}

/// Ordinary requests pipelined, maybe an odd one, and a last `Connection: close` request.
fn case(rng: &mut Rng) -> Vec<Vec<Req>> {
    let mut batches = vec![(0..rng.below(4)).map(|_| ordinary(rng)).collect::<Vec<_>>()];
    if rng.chance(40) {
        batches.push(vec![odd(rng)]);
    }
    let last = b"GET /r/text HTTP/1.1\r\nhost: h\r\nconnection: close\r\n\r\n".to_vec();
    batches.push(vec![Req {
        raw: last,
        head: false,
    }]);
    batches
}

fn show(case: &[Vec<Req>]) -> String {
    let mut out = String::new();
    for (i, batch) in case.iter().enumerate() {
        let raw: Vec<u8> = batch.iter().flat_map(|r| r.raw.clone()).collect();
        let _ = writeln!(
            out,
            "[batch {i}] {}",
            String::from_utf8_lossy(&raw).escape_debug()
        );
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fast_lane_answers_byte_for_byte_as_hyper_does() {
    let (lane, lane_stats) = start(true).await;
    let (hyper, hyper_stats) = start(false).await;
    let mut rng = Rng::new(0x5eed_1a7e);
    for n in 0..1000 {
        let case = case(&mut rng);
        let seed = rng.next();
        let (a, b) = tokio::join!(stream(lane, &case, seed), stream(hyper, &case, seed));
        let (a, b) = (masked(&a), masked(&b));
        if a != b {
            let at = a.bytes().zip(b.bytes()).take_while(|(x, y)| x == y).count();
            let from = at.saturating_sub(300);
            let (a, b) = (a.get(from..).unwrap_or(&a), b.get(from..).unwrap_or(&b));
            panic!(
                "case {n}: requests\n{}--- from byte {from}, the fast lane answered\n{a}\n--- hyper answered\n{b}",
                show(&case)
            );
        }
    }
    let fast = lane_stats.fast_requests.get();
    assert!(fast > 200, "the lane answered only {fast} requests itself");
    assert_eq!(hyper_stats.fast_requests.get(), 0);
}

/// Dropped with the handler's future (or its answer's body): says so on a channel.
struct Tell(Option<tokio::sync::oneshot::Sender<()>>);

impl Drop for Tell {
    fn drop(&mut self) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(());
        }
    }
}

/// A body that never ends, holding a [`Tell`].
struct Endless(#[expect(dead_code, reason = "held for its drop")] Tell);

impl http_body::Body for Endless {
    type Data = Bytes;
    type Error = std::io::Error;
    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Poll::Pending
    }
}

/// A client that goes away while its request is being answered (the handler still running, or
/// its answer's body still streaming) drops the handler and the body: that is what gives a
/// Router's concurrency slot back. With the lane and with hyper alone.
#[tokio::test]
async fn a_client_that_goes_away_drops_its_handler_and_its_answer() {
    for fast_lane in [true, false] {
        let (started_tx, mut started) = tokio::sync::mpsc::unbounded_channel::<()>();
        let (dropped_tx, mut dropped) = tokio::sync::mpsc::unbounded_channel::<&str>();
        let (s1, d1) = (started_tx.clone(), dropped_tx.clone());
        let app = axum::Router::new()
            .route(
                "/hang",
                axum::routing::get(move || {
                    let (s, d) = (s1.clone(), d1.clone());
                    async move {
                        let (tx, rx) = tokio::sync::oneshot::channel();
                        tokio::spawn(async move {
                            let _ = rx.await;
                            let _ = d.send("handler");
                        });
                        let _tell = Tell(Some(tx));
                        let _ = s.send(());
                        std::future::pending::<()>().await;
                        "never"
                    }
                }),
            )
            .route(
                "/stream",
                axum::routing::get(move || {
                    let (s, d) = (started_tx.clone(), dropped_tx.clone());
                    async move {
                        let (tx, rx) = tokio::sync::oneshot::channel();
                        tokio::spawn(async move {
                            let _ = rx.await;
                            let _ = d.send("body");
                        });
                        let _ = s.send(());
                        Body::new(Endless(Tell(Some(tx))))
                    }
                }),
            );
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let mut options = Options::new(Limits::default(), Refusal::json("{}"));
        options.limits.fast_lane = fast_lane;
        let stats = options.stats.clone();
        tokio::spawn(serve(l.into(), app, options, std::future::pending::<()>()));
        for (path, what) in [("/hang", "handler"), ("/stream", "body")] {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            let req = format!("GET {path} HTTP/1.1\r\nhost: h\r\n\r\n");
            s.write_all(req.as_bytes()).await.unwrap();
            started.recv().await.unwrap();
            if what == "body" {
                // The head is out before the client leaves.
                let mut head = [0u8; 17];
                s.read_exact(&mut head).await.unwrap();
                assert_eq!(&head, b"HTTP/1.1 200 OK\r\n");
            }
            drop(s);
            let got = tokio::time::timeout(Duration::from_secs(5), dropped.recv()).await;
            assert_eq!(got.ok().flatten(), Some(what), "lane {fast_lane}: {path}");
        }
        assert_eq!(stats.fast_requests.get() == 2, fast_lane);
    }
}

/// A body that follows its head a little later (clients write them separately) is waited for
/// and the lane answers; one that takes longer than the lane's grace second goes to hyper with
/// the head and what came of the body, and is answered there just the same.
#[tokio::test]
async fn a_late_body_is_waited_for_then_left_to_hyper() {
    let (addr, stats) = start(true).await;
    let head = "POST /echo HTTP/1.1\r\nhost: h\r\ncontent-length: 6\r\n\r\nabc";
    for (pause, by_lane) in [
        (Duration::from_millis(100), 1),
        (Duration::from_millis(1500), 0),
    ] {
        let before = stats.fast_requests.get();
        let mut c = Client::connect(addr, 1).await;
        c.w.write_all(head.as_bytes()).await.unwrap();
        tokio::time::sleep(pause).await;
        c.heads.push(false);
        c.w.write_all(b"def").await.unwrap();
        let last = b"GET /r/text HTTP/1.1\r\nhost: h\r\nconnection: close\r\n\r\n".to_vec();
        c.send(&[Req {
            raw: last,
            head: false,
        }])
        .await;
        let got = String::from_utf8_lossy(&c.got).into_owned();
        assert!(got.contains("body 6 \"abcdef\""), "{pause:?}: {got}");
        assert!(got.ends_with("hello"), "{pause:?}: {got}");
        // After a hand-over, hyper keeps the connection: the last request is its too.
        let lane = stats.fast_requests.get() - before;
        assert_eq!(lane, by_lane * 2, "{pause:?}");
    }
}

/// Shutdown while a request's body is still on its way (clients write head and body
/// separately): the request is read to its end and answered, then the connection closes.
#[tokio::test]
async fn shutdown_finishes_a_request_whose_body_is_still_arriving() {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let options = Options::new(Limits::default(), Refusal::json("{}"));
    let stats = options.stats.clone();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(serve(l.into(), app(), options, async move {
        let _ = stopped.await;
    }));
    let mut c = Client::connect(addr, 1).await;
    let head = "POST /echo HTTP/1.1\r\nhost: h\r\ncontent-length: 6\r\n\r\nabc";
    c.w.write_all(head.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    stop.send(()).unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    c.heads.push(false);
    c.w.write_all(b"def").await.unwrap();
    c.send(&[]).await;
    while !c.closed {
        match tokio::time::timeout(Duration::from_secs(5), c.rx.recv()).await {
            Ok(Some(bytes)) => c.got.extend_from_slice(&bytes),
            _ => c.closed = true,
        }
    }
    let got = String::from_utf8_lossy(&c.got).into_owned();
    assert!(got.starts_with("HTTP/1.1 200 OK\r\n"), "{got}");
    assert!(got.contains("\r\nconnection: close\r\n"), "{got}");
    assert!(got.ends_with("body 6 \"abcdef\""), "{got}");
    assert_eq!(stats.fast_requests.get(), 1);
    tokio::time::timeout(Duration::from_secs(5), served)
        .await
        .expect("serve returns once the connection is done")
        .unwrap()
        .unwrap();
}

/// Everything the server sends until it closes the connection (or 5 s pass).
async fn until_closed(s: &mut tokio::net::TcpStream) -> String {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Shutdown while request heads are still arriving, on the lane and on hyper: a head completed
/// within a second of the signal is answered; one that never completes (a slowloris) is closed
/// a second after the signal instead of holding the server until its header timeout (30 s
/// here, beyond the 10 s grace), and `serve` returns.
#[tokio::test]
async fn shutdown_gives_a_head_still_arriving_a_second_not_its_header_timeout() {
    for fast_lane in [true, false] {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let mut options = Options::new(Limits::default(), Refusal::json("{}"));
        options.limits.fast_lane = fast_lane;
        options.limits.header_read_timeout = Duration::from_secs(30);
        let stats = options.stats.clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let served = tokio::spawn(serve(l.into(), app(), options, async move {
            let _ = stopped.await;
        }));
        let connect = || tokio::net::TcpStream::connect(addr);
        let (mut slow, mut late) = (connect().await.unwrap(), connect().await.unwrap());
        slow.write_all(b"GET /echo HTTP/1.1\r\nhost: h\r\n")
            .await
            .unwrap();
        late.write_all(b"POST /echo HTTP/1.1\r\nhost: h\r\n")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let signalled = std::time::Instant::now();
        stop.send(()).unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        late.write_all(b"content-length: 3\r\n\r\nabc")
            .await
            .unwrap();
        let answered = until_closed(&mut late).await;
        assert!(
            answered.starts_with("HTTP/1.1 200 OK\r\n"),
            "{fast_lane}: {answered}"
        );
        assert!(
            answered.ends_with("body 3 \"abc\""),
            "{fast_lane}: {answered}"
        );
        let cut = until_closed(&mut slow).await;
        let after = signalled.elapsed();
        assert!(cut.is_empty(), "{fast_lane}: {cut}");
        assert!(
            after < Duration::from_secs(4),
            "{fast_lane}: the slowloris was closed {after:?} after the signal"
        );
        assert_eq!(stats.header_timeouts.get(), 1, "{fast_lane}");
        tokio::time::timeout(Duration::from_secs(3), served)
            .await
            .expect("serve returns once both connections are done")
            .unwrap()
            .unwrap();
    }
}
