//! The fast lane's forwarding (the Router's `LaneFront`: requests sent on from the bytes they
//! arrived in, answers with a length relayed from the bytes they came in) against the
//! `http::Request` path: two Routers, one with the fast lane and one without, get the same
//! random requests; what each sandbox receives must be the same request (same request line, the
//! same fields with the same values in the same order per name, the same body) and the clients
//! must get the same answers (`Date` masked): byte for byte when the sandboxes answer plainly,
//! the same fields per name when they answer with random heads (hop-by-hop fields, fields
//! `Connection` names, their own session header, repeated and mixed-case names, lengths given
//! twice, their own `Date`, bodiless statuses).

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use common::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Reproducible random cases (seeded).
struct Rng(fastrand::Rng);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(fastrand::Rng::with_seed(seed))
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
    /// `name` with each letter's case picked at random.
    fn case(&mut self, name: &str) -> String {
        name.chars()
            .map(|c| {
                if self.chance(30) {
                    c.to_ascii_uppercase()
                } else {
                    c
                }
            })
            .collect()
    }
}

/// One recorded request: its head and body, as the sandbox read them.
type Recorded = (Vec<u8>, Vec<u8>);

/// What the recording sandboxes answer (the test sets it before each case).
type Answers = Arc<Mutex<Vec<u8>>>;

const PLAIN: &str = "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\nx-up: 1\r\n\
                     content-length: 2\r\n\r\nok";

/// A sandbox that records every request and answers each with what `answers` holds then
/// (keep-alive, unless that answer says `close`).
async fn recorder(answers: Answers) -> (String, Arc<Mutex<Vec<Recorded>>>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let log = Arc::new(Mutex::new(Vec::new()));
    let seen = log.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let (seen, answers) = (seen.clone(), answers.clone());
            tokio::spawn(async move {
                let mut buf = Vec::new();
                while let Some((head, body)) = read_message(&mut s, &mut buf).await {
                    seen.lock().unwrap().push((head, body));
                    let answer = answers.lock().unwrap().clone();
                    if s.write_all(&answer).await.is_err() {
                        return;
                    }
                    let head = String::from_utf8_lossy(&answer).to_ascii_lowercase();
                    if head.contains("connection: close") {
                        return;
                    }
                }
            });
        }
    });
    (addr, log)
}

/// Reads one message (head, then a `Content-Length` body) from `s`; `None` at its end. A
/// chunked message fails the test (the Router sends whole bodies with their length here).
async fn read_message(
    s: &mut (impl AsyncRead + Unpin),
    buf: &mut Vec<u8>,
) -> Option<(Vec<u8>, Vec<u8>)> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head: Vec<u8> = buf.drain(..end + 4).collect();
            let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
            assert!(!text.contains("transfer-encoding"), "{text}");
            let len = text
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.split(',').next())
                .map_or(0, |v| v.trim().parse::<usize>().unwrap());
            while buf.len() < len {
                let mut more = [0u8; 4096];
                let n = s.read(&mut more).await.ok()?;
                if n == 0 {
                    return None;
                }
                buf.extend_from_slice(&more[..n]);
            }
            let body = buf.drain(..len).collect();
            return Some((head, body));
        }
        let mut more = [0u8; 4096];
        let n = s.read(&mut more).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&more[..n]);
    }
}

/// A random request the fast lane takes: `GET`/`POST`, the headers the Router replaces or
/// removes (in any case, repeated), hop-by-hop ones, a field `Connection: close` names, odd but
/// valid values, and bodies with and without their length.
fn request(rng: &mut Rng, authorization: &[&str]) -> Vec<u8> {
    let post = rng.chance(50);
    let mut target = String::from("/v1/namespaces/default/code-interpreters/ci/invocations/");
    for _ in 0..rng.below(4) {
        target.push_str(rng.pick(&["api", "execute", "a%20b", "x-y.z~", "(1)", "@:,;", ""]));
        target.push('/');
    }
    if rng.chance(40) {
        target.push('?');
        target.push_str(rng.pick(&["a=b", "a=b&c=%2F", "x", "=/?", ""]));
    }
    let mut fields: Vec<(String, Vec<u8>)> = Vec::new();
    let session = rng.case("x-agentcube-session-id");
    // Sometimes not text: not UTF-8, or UTF-8 but not visible ASCII (both a 400).
    let id: &[u8] = match rng.below(100) {
        0..=1 => b"s\xff1",
        2..=3 => "sé1".as_bytes(),
        _ => b"s1",
    };
    fields.push((session, id.to_vec()));
    if rng.chance(60) {
        let value = rng.pick(authorization).as_bytes().to_vec();
        fields.push((rng.case("authorization"), value));
    }
    let pool: &[(&str, &[&str])] = &[
        ("host", &["example.com", "a.b:81", "h"]),
        (
            "x-forwarded-for",
            &["10.0.0.1", "10.0.0.1, 10.0.0.2", "bad\tvalue"],
        ),
        ("x-forwarded-host", &["fh"]),
        ("x-forwarded-proto", &["https"]),
        (
            "connection",
            &["keep-alive", "Keep-Alive", "close", "keep-alive, close"],
        ),
        ("keep-alive", &["timeout=5"]),
        ("proxy-connection", &["keep-alive"]),
        ("proxy-authorization", &["Basic eA=="]),
        ("proxy-authenticate", &["x"]),
        ("te", &["trailers", "gzip"]),
        ("trailer", &["x-t"]),
        ("close", &["1"]),
        ("keep", &["1"]),
        ("content-type", &["application/json"]),
        ("accept", &["*/*"]),
        ("x-agentcube-session-id", &["s1", "other"]),
        (
            "x-a",
            &["1", "two words", "tab\there", "q\"uote", "", "a,b"],
        ),
        ("x-b", &["2"]),
    ];
    let n = rng.below(9);
    random_fields(rng, pool, n, &mut fields);
    let body: Vec<u8> = if post {
        (0..rng.below(3) * rng.below(300))
            .map(|i| b'a' + (i % 26) as u8)
            .collect()
    } else {
        Vec::new()
    };
    if !body.is_empty() || rng.chance(30) {
        let at = rng.below(fields.len() + 1);
        fields.insert(
            at,
            (
                rng.case("content-length"),
                body.len().to_string().into_bytes(),
            ),
        );
    }
    let method = if post { "POST" } else { "GET" };
    message(&format!("{method} {target} HTTP/1.1"), fields, &body)
}

/// `n` fields picked from `pool`, names in random case, now and then obs-text in a value (valid
/// in a field value, but not text; never in `Connection`, where it makes a request hyper's).
fn random_fields(
    rng: &mut Rng,
    pool: &[(&str, &[&str])],
    n: usize,
    fields: &mut Vec<(String, Vec<u8>)>,
) {
    for _ in 0..n {
        let (name, values) = pool[rng.below(pool.len())];
        let name = rng.case(name);
        let mut value = rng.pick(values).as_bytes().to_vec();
        if rng.chance(5) && !name.eq_ignore_ascii_case("connection") {
            value.extend_from_slice(&[0xc3, 0xa9, 0xff]);
        }
        fields.push((name, value));
    }
}

/// A message as bytes: its start line, its fields in order, its body.
fn message(start: &str, fields: Vec<(String, Vec<u8>)>, body: &[u8]) -> Vec<u8> {
    let mut out = format!("{start}\r\n").into_bytes();
    for (n, v) in fields {
        out.extend_from_slice(n.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(&v);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    out
}

/// A request as the sandbox got it: request line, then each field name's values in order
/// (the two paths may interleave different names differently), the token checked and masked,
/// the sandbox's own address masked; and the body.
fn normalize(got: &Recorded, sandbox: &str) -> (String, BTreeMap<String, Vec<Vec<u8>>>, Vec<u8>) {
    let (head, body) = got;
    let mut lines = head.split(|&b| b == b'\n');
    let request_line = String::from_utf8(lines.next().unwrap().to_vec()).unwrap();
    let mut fields: BTreeMap<String, Vec<Vec<u8>>> = BTreeMap::new();
    for line in lines {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            continue;
        }
        let colon = line.iter().position(|&b| b == b':').unwrap();
        let name = String::from_utf8(line[..colon].to_vec()).unwrap();
        let mut value = line[colon + 1..].trim_ascii().to_vec();
        if name == "authorization" {
            let token = std::str::from_utf8(&value).unwrap();
            let claims = verify(token.strip_prefix("Bearer ").unwrap());
            assert_eq!(claims.session_id, "s1");
            value = b"Bearer <token>".to_vec();
        }
        if value == sandbox.as_bytes() {
            value = b"<sandbox>".to_vec();
        }
        fields.entry(name).or_default().push(value);
    }
    (request_line, fields, body.clone())
}

/// A random answer with a length (or a bodiless status): the fields a Router must not send on
/// and the ones it must, in any case and order, repeated, with odd values.
fn answer(rng: &mut Rng) -> Vec<u8> {
    let status = rng.pick(&[
        "200 OK",
        "201 Created",
        "404 Not Found",
        "500 Internal Server Error",
        "299 Whatever",
        "204 No Content",
    ]);
    let body = if status.starts_with("204") {
        ""
    } else {
        rng.pick(&["", "ok", "a longer body\n"])
    };
    let pool: &[(&str, &[&str])] = &[
        ("content-type", &["text/plain", "application/json"]),
        ("x-up", &["1", "two words", "tab\there", "", "a,b"]),
        ("date", &["Thu, 01 Jan 1970 00:00:00 GMT"]),
        (
            "connection",
            &[
                "keep-alive",
                "x-drop",
                "X-Drop, keep-alive",
                "close",
                "x-up",
            ],
        ),
        ("x-drop", &["1"]),
        ("keep-alive", &["timeout=5"]),
        ("proxy-connection", &["keep-alive"]),
        ("proxy-authenticate", &["Basic"]),
        ("upgrade", &["h2c"]),
        ("trailer", &["x-t"]),
        ("te", &["trailers"]),
        ("x-agentcube-session-id", &["spoofed", "s1"]),
        ("set-cookie", &["a=b", "c=d; Path=/"]),
        ("server", &["sandbox"]),
    ];
    let mut fields: Vec<(String, Vec<u8>)> = Vec::new();
    let n = rng.below(9);
    random_fields(rng, pool, n, &mut fields);
    if !status.starts_with("204") {
        let n = body.len().to_string();
        for value in match rng.below(4) {
            0 => vec![format!("{n}, {n}")],
            1 => vec![n.clone(), n],
            _ => vec![n],
        } {
            let at = rng.below(fields.len() + 1);
            fields.insert(at, (rng.case("content-length"), value.into_bytes()));
        }
    }
    message(&format!("HTTP/1.1 {status}"), fields, body.as_bytes())
}

/// Sends `req` on a new connection and reads the answer (`Date` masked).
async fn exchange(router: &str, req: &[u8]) -> Recorded {
    let mut s = TcpStream::connect(router.trim_start_matches("http://"))
        .await
        .unwrap();
    s.write_all(req).await.unwrap();
    let mut buf = Vec::new();
    let (head, body) = read_message(&mut s, &mut buf).await.expect("an answer");
    let masked: Vec<&[u8]> = head
        .split(|&b| b == b'\n')
        .map(|l| {
            if l.starts_with(b"date: ") {
                &b"date: <masked>\r"[..]
            } else {
                l
            }
        })
        .collect();
    (masked.join(&b'\n'), body)
}

async fn fast_requests(router: &Router) -> u64 {
    let text = metrics_text(router).await;
    text.lines()
        .find_map(|l| l.strip_prefix("agentcube_router_http1_fast_requests_total "))
        .map_or(0, |n| n.trim().parse().unwrap())
}

/// Two Routers (`tweak`ed alike), one with the fast lane and one without, each with session
/// `s1` on its own recording sandbox, get the same `cases` random requests; the sandboxes
/// answer plainly, or (`random_answers`) with the same random answer each.
async fn lane_against_hyper(
    seed: u64,
    cases: u64,
    authorization: &[&str],
    random_answers: bool,
    tweak: impl Fn(&mut agentcube_router::Config),
) {
    let answers: Answers = Arc::new(Mutex::new(PLAIN.as_bytes().to_vec()));
    let (lane_sandbox, lane_log) = recorder(answers.clone()).await;
    let (hyper_sandbox, hyper_log) = recorder(answers.clone()).await;
    let (lane_store, hyper_store) = (memory(), memory());
    session_to(lane_store.as_ref(), "s1", &lane_sandbox).await;
    session_to(hyper_store.as_ref(), "s1", &hyper_sandbox).await;
    let lane = Router::start("http://127.0.0.1:9", lane_store, &tweak).await;
    let hyper = Router::start("http://127.0.0.1:9", hyper_store, |c| {
        tweak(c);
        c.limits.fast_lane = false;
    })
    .await;
    let mut rng = Rng::new(seed);
    let mut forwarded = 0;
    for case in 0..cases {
        let req = request(&mut rng, authorization);
        let mut shown = String::from_utf8_lossy(&req).into_owned();
        if random_answers {
            let answer = answer(&mut rng);
            shown += &format!("\nanswered with\n{}", String::from_utf8_lossy(&answer));
            *answers.lock().unwrap() = answer;
        }
        let via_lane = exchange(&lane.url, &req).await;
        let via_hyper = exchange(&hyper.url, &req).await;
        if random_answers {
            // The same fields per name (the relayed head keeps the sandbox's order of names).
            assert_eq!(
                normalize(&via_lane, &lane_sandbox),
                normalize(&via_hyper, &hyper_sandbox),
                "case {case}: answers differ for\n{shown}\nlane:\n{}\nhyper:\n{}",
                String::from_utf8_lossy(&via_lane.0),
                String::from_utf8_lossy(&via_hyper.0),
            );
        } else {
            assert_eq!(
                String::from_utf8_lossy(&[&via_lane.0[..], &via_lane.1].concat()),
                String::from_utf8_lossy(&[&via_hyper.0[..], &via_hyper.1].concat()),
                "case {case}: answers differ for\n{shown}"
            );
        }
        let status = String::from_utf8_lossy(&via_lane.0[..12]).into_owned();
        let (got_lane, got_hyper) = (
            lane_log.lock().unwrap().pop(),
            hyper_log.lock().unwrap().pop(),
        );
        if status.ends_with(" 400") || status.ends_with(" 401") || status.ends_with(" 403") {
            // Refused alike (a session header that is not text, a caller without the token).
            assert!(got_lane.is_none() && got_hyper.is_none(), "case {case}");
            continue;
        }
        forwarded += 1;
        let (Some(got_lane), Some(got_hyper)) = (got_lane, got_hyper) else {
            panic!("case {case}: not forwarded:\n{shown}")
        };
        assert_eq!(
            normalize(&got_lane, &lane_sandbox),
            normalize(&got_hyper, &hyper_sandbox),
            "case {case}: the sandboxes got different requests for\n{shown}\nlane:\n{}\nhyper:\n{}",
            String::from_utf8_lossy(&got_lane.0),
            String::from_utf8_lossy(&got_hyper.0),
        );
    }
    assert!(forwarded > cases / 5, "{forwarded} of {cases} forwarded");
    // Every case went through the lane's own forwarding on one side, none on the other.
    assert_eq!(fast_requests(&lane).await, cases);
    assert_eq!(fast_requests(&hyper).await, 0);
    lane.stop().await;
    hyper.stop().await;
}

#[tokio::test]
async fn lane_requests_reach_sandboxes_as_http_requests_do() {
    lane_against_hyper(
        0x5eed_1a4e,
        400,
        &["Bearer client", "Basic eA=="],
        false,
        |_| {},
    )
    .await;
}

#[tokio::test]
async fn relayed_answers_reach_clients_as_http_answers_do() {
    lane_against_hyper(0x7e1a_7ed0, 400, &["Bearer client"], true, |_| {}).await;
}

#[tokio::test]
async fn lane_requests_are_authenticated_as_http_requests_are() {
    let authn = Arc::new(agentcube_router::oidc::Authn::Token("t0k".into()));
    let values = [
        "Bearer t0k",
        "bearer  t0k ",
        "Bearer t0k2",
        "Bearer",
        "Basic t0k",
    ];
    lane_against_hyper(0xa11c_e001, 200, &values, false, |c| {
        c.authn = Some(authn.clone())
    })
    .await;
}
