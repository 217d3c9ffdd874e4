//! Hostile clients and faults against the Router as it is served (its real serving seam):
//! stalled uploads, slowloris, connection floods, bad headers and bodies, routing by position,
//! 409 inside the cache, readiness, and no orphaned or falsely active sessions (issue 14).

mod common;

use std::sync::Arc;
use std::time::Duration;

use agentcube_types::api::WorkloadKind;
use common::upstream;
use common::*;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn short_limits(c: &mut agentcube_router::Config) {
    c.limits = agentcube_serve::Limits {
        header_read_timeout: Duration::from_millis(800),
        body_idle_timeout: Duration::from_millis(800),
        keep_alive_idle: Duration::from_secs(2),
        max_connections: 1000,
        ..Default::default()
    };
}

fn host_of(url: &str) -> String {
    url.trim_start_matches("http://").to_string()
}

/// Reads until the server closes the connection (or `limit` passes); returns what arrived.
async fn read_until_closed(s: &mut TcpStream, limit: Duration) -> Option<String> {
    let mut buf = Vec::new();
    match tokio::time::timeout(limit, s.read_to_end(&mut buf)).await {
        Ok(_) => Some(String::from_utf8_lossy(&buf).into_owned()),
        Err(_) => None,
    }
}

/// A Router with `slots` concurrency slots (short limits) and session `s1` on a test upstream
/// (served by the returned task).
async fn router_with_slots(slots: usize) -> (Router, tokio::task::JoinHandle<()>) {
    let store = memory();
    let (up, task) = serve(upstream::app()).await;
    session_to(store.as_ref(), "s1", &host_of(&up)).await;
    let router = Router::start("http://127.0.0.1:9", store, |c| {
        short_limits(c);
        c.max_concurrent_requests = slots;
    })
    .await;
    (router, task)
}

/// Every slot is held by `stalled` clients (another request on session `s1` gets `429`), then
/// given back within 10 s (the request is served).
async fn slots_come_back(router: &Router, stalled: &str) {
    let call = || {
        client()
            .get(router.ci("ok"))
            .header("x-agentcube-session-id", "s1")
            .send()
    };
    assert_eq!(
        call().await.unwrap().status(),
        429,
        "{stalled} hold the slots at first"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while call().await.unwrap().status() != 200 {
        assert!(
            std::time::Instant::now() < deadline,
            "{stalled} still hold the slots"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn stalled_uploads_give_their_slots_back() {
    let (router, _t) = router_with_slots(5).await;
    // Five clients send headers announcing a body, then nothing: every slot is taken.
    let mut stalled = Vec::new();
    for _ in 0..5 {
        let mut s = TcpStream::connect(host_of(&router.url)).await.unwrap();
        let head = "POST /v1/namespaces/default/code-interpreters/x/invocations/upload HTTP/1.1\r\n\
                    Host: r\r\nx-agentcube-session-id: s1\r\nContent-Length: 100\r\n\r\n";
        s.write_all(head.as_bytes()).await.unwrap();
        stalled.push(s);
    }
    // The fast lane waits a quarter of the body idle timeout for a body before hyper takes the
    // request (and the slot): well before this.
    tokio::time::sleep(Duration::from_millis(450)).await;
    let call = || {
        client()
            .get(format!(
                "{}/v1/namespaces/default/code-interpreters/x/invocations/ok",
                router.url
            ))
            .header("x-agentcube-session-id", "s1")
            .send()
    };
    assert_eq!(
        call().await.unwrap().status(),
        429,
        "slots are held while the bodies stall"
    );
    // After the body idle timeout the stalled requests end with 408, and the slots are free.
    for s in &mut stalled {
        let answer = read_until_closed(s, Duration::from_secs(5)).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        assert!(answer.contains("REQUEST_TIMEOUT"), "{answer}");
    }
    assert_eq!(call().await.unwrap().status(), 200);
}

/// Clients that stop reading their answers (stalled downloads) used to hold their requests,
/// and the Router's concurrency slots, forever: everyone else got 429. Now a connection whose
/// client takes no byte for the body idle timeout is closed, and the slot is free again.
#[tokio::test]
async fn stalled_downloads_give_their_slots_back() {
    let (router, _t) = router_with_slots(3).await;
    let mut stalled = Vec::new();
    for _ in 0..3 {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let mut s = socket
            .connect(host_of(&router.url).parse().unwrap())
            .await
            .unwrap();
        let head = "GET /v1/namespaces/default/code-interpreters/x/invocations/big/67108864 \
                    HTTP/1.1\r\nHost: r\r\nx-agentcube-session-id: s1\r\n\r\n";
        s.write_all(head.as_bytes()).await.unwrap();
        stalled.push(s);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Cut after the body idle timeout (checked at least once per header timeout): 0.8 + 0.8 s.
    slots_come_back(&router, "stalled downloads").await;
    // The first one cut frees a slot; the other two are cut about as soon.
    let stats = &router.shared().metrics.serve;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while stats.send_timeouts.get() < 3 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        stats.send_timeouts.get(),
        3,
        "every stalled download is cut"
    );
    drop(stalled);
}

/// The same over HTTP/2: a client that never opens its streams' flow-control windows
/// (`SETTINGS_INITIAL_WINDOW_SIZE` 0, no `WINDOW_UPDATE`) while its connection stays alive
/// (its h2 stack answers pings) held every slot forever with one connection, whose socket
/// never blocks. Now a stream whose answer waits on the client for the body idle timeout
/// closes its connection, and the slots are free again.
#[tokio::test]
async fn stalled_http2_streams_give_their_slots_back() {
    let (router, _t) = router_with_slots(3).await;
    let tcp = TcpStream::connect(host_of(&router.url)).await.unwrap();
    let (h2, connection) = h2::client::Builder::new()
        .initial_window_size(0)
        .handshake::<_, bytes::Bytes>(tcp)
        .await
        .unwrap();
    let connection = tokio::spawn(connection);
    let mut h2 = h2.ready().await.unwrap();
    let mut answers = Vec::new();
    for _ in 0..3 {
        let req = http::Request::get(router.ci("ok"))
            .header("x-agentcube-session-id", "s1")
            .body(())
            .unwrap();
        let (answer, _) = h2.send_request(req, true).unwrap();
        answers.push(answer);
        h2 = h2.ready().await.unwrap();
    }
    let mut bodies = Vec::new();
    for a in answers {
        let a = a.await.unwrap();
        assert_eq!(a.status(), 200, "the heads arrive, the bodies cannot");
        bodies.push(a.into_body());
    }
    slots_come_back(&router, "stalled HTTP/2 streams").await;
    let stats = &router.shared().metrics.serve;
    assert_eq!(stats.send_timeouts.get(), 1, "one connection cut");
    let ended = tokio::time::timeout(Duration::from_secs(5), connection).await;
    assert!(ended.is_ok(), "the stalled client's connection is closed");
    drop((h2, bodies));
}

#[tokio::test]
async fn slowloris_and_idle_connections_are_closed_while_others_are_served() {
    let store = memory();
    let (up, _t) = serve(upstream::app()).await;
    session_to(store.as_ref(), "s1", &host_of(&up)).await;
    let router = Router::start("http://127.0.0.1:9", store, short_limits).await;
    let mut slow = Vec::new();
    for _ in 0..200 {
        let mut s = TcpStream::connect(host_of(&router.url)).await.unwrap();
        s.write_all(b"GET /v1/namespaces/default/code-interpreters/x/invocations/ HTTP/1.1\r\nHost: r\r\nX-a: ")
            .await
            .unwrap();
        slow.push(s);
    }
    let idle = TcpStream::connect(host_of(&router.url)).await.unwrap();
    let r = client()
        .get(router.ci("ok"))
        .header("x-agentcube-session-id", "s1")
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        200,
        "served while 200 slowloris connections hang"
    );
    for s in &mut slow {
        assert!(
            read_until_closed(s, Duration::from_secs(5)).await.is_some(),
            "partial headers are cut after the header timeout"
        );
    }
    let mut idle = idle;
    assert!(
        read_until_closed(&mut idle, Duration::from_secs(5))
            .await
            .is_some(),
        "an idle connection is closed after the keep-alive timeout"
    );
    let stats = &router.shared().metrics.serve;
    assert!(
        stats.header_timeouts.get() >= 200,
        "{}",
        stats.header_timeouts.get()
    );
    assert!(stats.idle_closed.get() >= 1);
}

#[tokio::test]
async fn connections_over_the_cap_get_the_routers_503_and_the_router_recovers() {
    let store = memory();
    let (up, _t) = serve(upstream::app()).await;
    session_to(store.as_ref(), "s1", &host_of(&up)).await;
    let router = Router::start("http://127.0.0.1:9", store, |c| {
        short_limits(c);
        c.limits.max_connections = 20;
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..20 {
        held.push(TcpStream::connect(host_of(&router.url)).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut extra = TcpStream::connect(host_of(&router.url)).await.unwrap();
    let answer = read_until_closed(&mut extra, Duration::from_secs(5))
        .await
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("TOO_MANY_CONNECTIONS"), "{answer}");
    drop(held);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let r = client()
        .get(router.ci("ok"))
        .header("x-agentcube-session-id", "s1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(router.shared().metrics.serve.refused.get() >= 1);
}

/// A Router (short limits) with session `s1` on a test upstream, whose Workload Manager counts
/// the calls it gets (each answered 500); the tasks serving both.
async fn router_counting_creates() -> (
    Router,
    Arc<std::sync::atomic::AtomicUsize>,
    [tokio::task::JoinHandle<()>; 2],
) {
    let store = memory();
    let (up, upstream_task) = serve(upstream::app()).await;
    session_to(store.as_ref(), "s1", &host_of(&up)).await;
    let creates = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = creates.clone();
    let wm = axum::Router::new().fallback(move || {
        seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        async { (axum::http::StatusCode::INTERNAL_SERVER_ERROR, "no") }
    });
    let (wm_url, wm_task) = serve(wm).await;
    let router = Router::start(&wm_url, store, short_limits).await;
    (router, creates, [upstream_task, wm_task])
}

#[tokio::test]
async fn bad_session_headers_and_bodies_are_400_and_create_nothing() {
    let (router, creates, _tasks) = router_counting_creates().await;
    let mut s = TcpStream::connect(host_of(&router.url)).await.unwrap();
    let mut head = b"GET /v1/namespaces/default/code-interpreters/x/invocations/ HTTP/1.1\r\nHost: r\r\nConnection: close\r\nx-agentcube-session-id: ".to_vec();
    head.extend([0xff, 0xfe, b'x']);
    head.extend(b"\r\n\r\n");
    s.write_all(&head).await.unwrap();
    let answer = read_until_closed(&mut s, Duration::from_secs(5))
        .await
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("INVALID_SESSION_ID"), "{answer}");
    assert_eq!(
        creates.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "no session created"
    );
    // A malformed chunked body is the client's fault: 400, not "sandbox unreachable".
    let mut s = TcpStream::connect(host_of(&router.url)).await.unwrap();
    s.write_all(
        b"POST /v1/namespaces/default/code-interpreters/x/invocations/up HTTP/1.1\r\nHost: r\r\n\
          x-agentcube-session-id: s1\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n\
          5\r\nhello\r\nzz-not-hex\r\n",
    )
    .await
    .unwrap();
    let answer = read_until_closed(&mut s, Duration::from_secs(5))
        .await
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("BAD_REQUEST_BODY"), "{answer}");
}

/// One raw HTTP/1.1 request from a loopback client (as a `kubectl port-forward` delivers a
/// browser's); the status line and body of the answer.
async fn raw(router: &Router, head: &str, body: &str) -> String {
    let mut s = TcpStream::connect(host_of(&router.url)).await.unwrap();
    let req = format!(
        "{head}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    read_until_closed(&mut s, Duration::from_secs(10))
        .await
        .unwrap()
}

/// Without end-user authentication any web page the browser of someone who reaches the Router
/// shows can `POST` to it (a `text/plain` body needs no preflight) and so make a session and run
/// a command in it; a page that rebinds its name to a port-forward's `127.0.0.1` reads the
/// answers too. Such requests are refused before a session is looked up or made; clients that
/// are no browser, and pages of this machine, are served.
#[tokio::test]
async fn pages_of_other_sites_make_no_session_without_authentication() {
    let (router, creates, _tasks) = router_counting_creates().await;
    let post =
        "POST /v1/namespaces/default/code-interpreters/ci/invocations/api/execute HTTP/1.1\r\n";
    let cmd = r#"{"command":["sh","-c","id"]}"#;
    let port = router.url.rsplit(':').next().unwrap().to_string();
    for (what, fields) in [
        (
            "another site's page",
            "Host: router.agentcube.svc\r\nOrigin: https://evil.example\r\nSec-Fetch-Site: cross-site\r\nSec-Fetch-Mode: no-cors\r\nContent-Type: text/plain\r\n"
                .to_string(),
        ),
        (
            "an <img> of another site",
            "Host: localhost\r\nSec-Fetch-Site: cross-site\r\n".to_string(),
        ),
        (
            "a page rebound to the port-forward",
            format!(
                "Host: rebound.example:{port}\r\nOrigin: http://rebound.example:{port}\r\nSec-Fetch-Site: same-origin\r\nContent-Type: text/plain\r\n"
            ),
        ),
    ] {
        let answer = raw(&router, &format!("{post}{fields}"), cmd).await;
        assert!(answer.starts_with("HTTP/1.1 403"), "{what}: {answer}");
        assert!(
            answer.contains("\"code\":\"FORBIDDEN\"") && answer.contains("web page"),
            "{what}: {answer}"
        );
        assert!(
            answer.contains("x-agentcube-error: router"),
            "{what}: {answer}"
        );
    }
    assert_eq!(
        creates.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "a refused page made a session"
    );
    // A session's requests from a page of another site are refused the same way.
    let on_s1 = "GET /v1/namespaces/default/code-interpreters/ci/invocations/ok HTTP/1.1\r\nx-agentcube-session-id: s1\r\n";
    let answer = raw(
        &router,
        &format!("{on_s1}Host: localhost\r\nSec-Fetch-Site: cross-site\r\n"),
        "",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    // Served: a client that is no browser under any name (a sidecar, a Service name), a page this
    // machine serves, and the browser's own navigation (typed, bookmarked: `none`).
    for fields in [
        "Host: rebound.example\r\n".to_string(),
        format!(
            "Host: localhost:{port}\r\nOrigin: http://localhost:3000\r\nSec-Fetch-Site: same-site\r\n"
        ),
        format!("Host: 127.0.0.1:{port}\r\nSec-Fetch-Site: none\r\n"),
    ] {
        let answer = raw(&router, &format!("{on_s1}{fields}"), "").await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{fields}: {answer}");
    }
}

/// A record made by this project for a given runtime.
async fn session_for(
    store: &dyn agentcube_store::SessionStore,
    id: &str,
    endpoint: &str,
    kind: WorkloadKind,
    ns: &str,
    name: &str,
) {
    session_to(store, id, endpoint).await;
    let mut r = store.get(id).await.unwrap();
    r.sandbox_namespace = ns.into();
    r.workload_kind = Some(kind);
    r.workload_name = Some(name.into());
    store.replace(&r).await.unwrap();
}

#[tokio::test]
async fn routing_uses_positions_not_substrings_and_409_holds_inside_the_cache() {
    let store = memory();
    let (up, _t) = serve(upstream::app()).await;
    let ci = WorkloadKind::CodeInterpreter;
    session_for(
        store.as_ref(),
        "a",
        &host_of(&up),
        ci,
        "default",
        "invocations-ci",
    )
    .await;
    session_for(store.as_ref(), "b", &host_of(&up), ci, "invocations", "x").await;
    let router = Router::start("http://127.0.0.1:9", store, |_| {}).await;
    let get = |url: String, sid: &'static str| async move {
        let r = client()
            .get(url)
            .header("x-agentcube-session-id", sid)
            .send()
            .await
            .unwrap();
        (
            r.status().as_u16(),
            r.json::<Value>().await.unwrap_or(Value::Null),
        )
    };
    let base = format!("{}/v1/namespaces", router.url);
    let (st, v) = get(
        format!(
            "{base}/default/code-interpreters/invocations-ci/invocations/api/invocations%2Fx?q=1"
        ),
        "a",
    )
    .await;
    assert_eq!(
        (st, v["path"].as_str()),
        (200, Some("/api/invocations%2Fx")),
        "{v}"
    );
    assert_eq!(v["query"], "q=1");
    let (st, v) = get(
        format!("{base}/invocations/code-interpreters/x/invocations/health"),
        "b",
    )
    .await;
    assert_eq!((st, v["path"].as_str()), (200, Some("/health")), "{v}");
    // Now cached: the same session on another runtime's URL is still refused.
    let (st, v) = get(
        format!("{base}/default/code-interpreters/other/invocations/x"),
        "a",
    )
    .await;
    assert_eq!(st, 409, "{v}");
    assert_eq!(v["code"], "SESSION_TARGET_MISMATCH");
    let (st, _) = get(
        format!("{base}/default/agent-runtimes/invocations-ci/invocations/x"),
        "a",
    )
    .await;
    assert_eq!(st, 409, "another kind with the same name");
}

#[tokio::test]
async fn readiness_fails_while_the_store_hangs() {
    // A "Redis" that accepts connections and never answers.
    let hang = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = hang.local_addr().unwrap();
    let _keep = std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in hang.incoming() {
            held.push(s);
        }
    });
    let mut cfg = agentcube_store::RedisConfig::new(format!("redis://{addr}"));
    cfg.op_timeout = Duration::from_millis(300);
    let store: Arc<dyn agentcube_store::SessionStore> =
        Arc::new(agentcube_store::RedisStore::new(cfg).unwrap());
    let router = Router::start("http://127.0.0.1:9", store, |_| {}).await;
    let r = client()
        .get(format!("{}/health/ready", router.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.json::<Value>().await.unwrap()["status"], "not ready");
    let live = client()
        .get(format!("{}/health/live", router.url))
        .send()
        .await
        .unwrap();
    assert_eq!(live.status(), 200, "alive, just not ready");
}

/// A Workload Manager whose sessions (`new-1`, `new-2`, …) all have their sandbox at
/// `endpoint`, recording the deletes it receives; the task serving it.
async fn wm_recording_deletes(
    endpoint: &str,
) -> (
    String,
    Arc<std::sync::Mutex<Vec<String>>>,
    tokio::task::JoinHandle<()>,
) {
    let deletes = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let seen = deletes.clone();
    let made = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let endpoint = endpoint.to_string();
    let wm = axum::Router::new()
        .route(
            "/v1/code-interpreter",
            axum::routing::post(move || {
                let n = made.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                let endpoint = endpoint.clone();
                async move {
                    axum::Json(json!({"kind": "Sandbox", "sessionId": format!("new-{n}"),
                        "sandboxId": "u", "sandboxName": format!("x-{n}"), "entryPoints":
                        [{"path": "/", "protocol": "HTTP", "endpoint": endpoint}]}))
                }
            }),
        )
        .route(
            "/v1/code-interpreter/sessions/{id}",
            axum::routing::delete(
                move |axum::extract::Path(id): axum::extract::Path<String>| {
                    seen.lock().unwrap().push(id);
                    async { axum::Json(json!({"message": "Sandbox deleted successfully"})) }
                },
            ),
        );
    let (url, task) = serve(wm).await;
    (url, deletes, task)
}

/// Waits up to 2 s for `deletes` to hold `want`.
async fn deleted(deletes: &std::sync::Mutex<Vec<String>>, want: &[&str]) -> Vec<String> {
    for _ in 0..100 {
        if *deletes.lock().unwrap() == want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    deletes.lock().unwrap().clone()
}

#[tokio::test]
async fn a_session_created_for_a_failing_request_is_rolled_back() {
    let (wm_url, deletes, _w) = wm_recording_deletes("unix:/nonexistent/picod.sock").await;
    let router = Router::start(&wm_url, memory(), |_| {}).await;
    let r = client()
        .post(router.ci("api/execute"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    assert!(r.headers().get("x-agentcube-session-id").is_none());
    assert_eq!(
        deleted(&deletes, &["new-1"]).await,
        ["new-1"],
        "the new session is deleted again"
    );
}

/// A sandbox that reads each request and never answers it, except requests for `/answer`; it
/// tells `got` of every request it read.
async fn sandbox_that_holds(got: tokio::sync::mpsc::UnboundedSender<()>) -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            let got = got.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let _ = got.send(());
                if buf.starts_with(b"POST /answer ") {
                    let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
                    let _ = s.write_all(ok).await;
                }
                // Held until the Router lets go of it.
                let _ = s.read(&mut chunk).await;
            });
        }
    });
    addr
}

/// A client that sends a request without a session goes away while the new session's sandbox
/// is still working on it: the session's id was to reach the client with the answer only, so
/// nobody could ever name it, yet it held its sandbox until its idle timeout (15 minutes by
/// default; a client that times out or is cancelled on every first call left one each). It is
/// deleted again, whichever way the request came (the fast lane, hyper, an HTTP/2 stream the
/// client resets); a session whose answer went out is kept.
#[tokio::test]
async fn a_new_session_whose_client_went_away_before_the_answer_is_rolled_back() {
    let (got_tx, mut got) = tokio::sync::mpsc::unbounded_channel();
    let sandbox = sandbox_that_holds(got_tx).await;
    let (wm_url, deletes, _w) = wm_recording_deletes(&sandbox).await;
    let router = Router::start(&wm_url, memory(), |_| {}).await;
    let path = "/v1/namespaces/default/code-interpreters/ci/invocations";
    let requests = [
        // Taken by the fast lane.
        format!("POST {path}/hold HTTP/1.1\r\nHost: r\r\nContent-Length: 2\r\n\r\n{{}}"),
        // Chunked: hyper's.
        format!(
            "POST {path}/hold HTTP/1.1\r\nHost: r\r\nTransfer-Encoding: chunked\r\n\r\n\
             2\r\n{{}}\r\n0\r\n\r\n"
        ),
    ];
    for (n, req) in requests.iter().enumerate() {
        let mut s = TcpStream::connect(host_of(&router.url)).await.unwrap();
        s.write_all(req.as_bytes()).await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), got.recv())
            .await
            .expect("the request reaches the sandbox");
        drop(s);
        let want: Vec<String> = (1..=n + 1).map(|i| format!("new-{i}")).collect();
        let want: Vec<&str> = want.iter().map(String::as_str).collect();
        assert_eq!(deleted(&deletes, &want).await, want, "{req}");
    }
    // HTTP/2: the client resets the stream; its connection stays.
    let tcp = TcpStream::connect(host_of(&router.url)).await.unwrap();
    let (h2, connection) = h2::client::handshake(tcp).await.unwrap();
    let _connection = tokio::spawn(connection);
    let mut h2 = h2.ready().await.unwrap();
    let req = http::Request::post(router.ci("hold")).body(()).unwrap();
    let (answer, mut body) = h2.send_request(req, false).unwrap();
    body.send_data(bytes::Bytes::from_static(b"{}"), true)
        .unwrap();
    tokio::time::timeout(Duration::from_secs(5), got.recv())
        .await
        .expect("the HTTP/2 request reaches the sandbox");
    drop(answer);
    body.send_reset(h2::Reason::CANCEL);
    let want = ["new-1", "new-2", "new-3"];
    assert_eq!(deleted(&deletes, &want).await, want, "HTTP/2 stream reset");
    // Answered: the session is the client's.
    let r = client()
        .post(router.ci("answer"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-agentcube-session-id"], "new-4");
    drop(r);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        *deletes.lock().unwrap(),
        want,
        "an answered session is kept"
    );
    drop(h2);
}

/// The same when the Router shuts down under such a request (a rolling update): the request is
/// cut when the shutdown's grace ends, on an HTTP worker whose runtime is going away, and its
/// session's deletion used to be spawned there and dropped with it (the session then held its
/// sandbox until its idle timeout). The shutdown now ends only once the deletion is done.
#[tokio::test]
async fn a_new_session_whose_request_the_shutdown_cut_is_rolled_back() {
    let (got_tx, mut got) = tokio::sync::mpsc::unbounded_channel();
    let sandbox = sandbox_that_holds(got_tx).await;
    let (wm_url, deletes, _w) = wm_recording_deletes(&sandbox).await;
    let router = Router::start(&wm_url, memory(), |c| {
        c.workers = 2;
        c.shutdown_grace = Duration::from_millis(300);
    })
    .await;
    let path = "/v1/namespaces/default/code-interpreters/ci/invocations";
    let mut s = TcpStream::connect(host_of(&router.url)).await.unwrap();
    let req = format!("POST {path}/hold HTTP/1.1\r\nHost: r\r\nContent-Length: 2\r\n\r\n{{}}");
    s.write_all(req.as_bytes()).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), got.recv())
        .await
        .expect("the request reaches the sandbox");
    tokio::time::timeout(Duration::from_secs(10), router.stop())
        .await
        .expect("the shutdown ends");
    assert_eq!(
        *deletes.lock().unwrap(),
        ["new-1"],
        "deleted before the shutdown ended"
    );
    drop(s);
}

#[tokio::test]
async fn failed_requests_do_not_keep_a_dead_sandbox_active() {
    let store = memory();
    session_to(store.as_ref(), "dead", "127.0.0.1:9").await;
    let before = store
        .list_idle(
            jiff::Timestamp::now() + jiff::SignedDuration::from_hours(1),
            0,
            10,
        )
        .await
        .unwrap()[0]
        .last_activity;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let router = Router::start("http://127.0.0.1:9", store.clone(), |_| {}).await;
    for _ in 0..3 {
        let r = client()
            .get(router.ci("x"))
            .header("x-agentcube-session-id", "dead")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 502);
    }
    router.stop().await;
    let after = store
        .list_idle(
            jiff::Timestamp::now() + jiff::SignedDuration::from_hours(1),
            0,
            10,
        )
        .await
        .unwrap()[0]
        .last_activity;
    assert_eq!(before, after, "502s are not activity");
}

#[tokio::test]
async fn an_answer_streamed_for_seconds_counts_as_activity_until_its_end() {
    // The first chunk at once, the last 2.5 s later: the session was in use all that time.
    let slow = axum::Router::new().fallback(|| async {
        let chunks = futures_util::stream::unfold(0, |i| async move {
            match i {
                0 => Some((Ok::<_, std::io::Error>("first\n"), 1)),
                1 => {
                    tokio::time::sleep(Duration::from_millis(2500)).await;
                    Some((Ok("last\n"), 2))
                }
                _ => None,
            }
        });
        axum::body::Body::from_stream(chunks)
    });
    let (url, _u) = serve(slow).await;
    let store = memory();
    session_to(store.as_ref(), "slow", &host_of(&url)).await;
    let router = Router::start("http://127.0.0.1:9", store.clone(), |_| {}).await;
    let started = jiff::Timestamp::now();
    let r = client()
        .get(router.ci("stream"))
        .header("x-agentcube-session-id", "slow")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "first\nlast\n");
    router.stop().await;
    let last = store
        .list_idle(started + jiff::SignedDuration::from_hours(1), 0, 10)
        .await
        .unwrap()[0]
        .last_activity;
    // The store keeps activity to the second; the stream ended 2.5 s after `started`.
    assert!(
        last.as_second() >= started.as_second() + 2,
        "activity at the end of the stream, not only at its start: {started} → {last}"
    );
}

/// A request in flight whose session is torn down (a delete, the end of its lifetime) had only
/// `503 sandbox unreachable`: the record still stood when the sandbox went. The Workload Manager
/// notes why a session ends before it tears it down, and the request is told: the
/// unknown-session 404 with that reason. A sandbox that fails on its own, with no such note,
/// is still 503.
#[tokio::test]
async fn a_request_cut_by_its_sessions_teardown_is_told_why() {
    // A sandbox that reads the request, then goes away without an answer.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((mut c, _)) = l.accept().await {
            let mut buf = [0u8; 4096];
            let _ = c.read(&mut buf).await;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let store = memory();
    session_to(store.as_ref(), "s", &addr).await;
    let router = Router::start("http://127.0.0.1:9", store.clone(), |_| {}).await;
    let call = || {
        client()
            .post(router.ci("api/execute"))
            .header("x-agentcube-session-id", "s")
            .body("{}")
            .send()
    };
    let r = call().await.unwrap();
    assert_eq!(r.status(), 503, "no note: the sandbox failed on its own");
    let why = "it was deleted (DELETE on the Workload Manager's sessions API)";
    store
        .set_mark(
            &agentcube_store::gone_mark("s"),
            why,
            Duration::from_secs(60),
            false,
        )
        .await
        .unwrap();
    let r = call().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({"error": "sessions.agentcube.volcano.sh \"s\" not found",
               "code": "SESSION_NOT_FOUND", "reason": why})
    );
}

/// The session's last activity in `store` (its only session), to the second.
async fn last_activity_of(store: &dyn agentcube_store::SessionStore) -> i64 {
    let far = jiff::Timestamp::now() + jiff::SignedDuration::from_hours(1);
    store.list_idle(far, 0, 10).await.unwrap()[0]
        .last_activity
        .as_second()
}

/// Waits up to `within` for the session's last activity in `store` to reach `at_least`; the last
/// one read.
async fn activity_reaches(
    store: &dyn agentcube_store::SessionStore,
    at_least: i64,
    within: Duration,
) -> i64 {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let last = last_activity_of(store).await;
        if last >= at_least || tokio::time::Instant::now() >= deadline {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A session is in use while a request to it is being served, not only when an answer starts
/// or ends: a command that runs longer than the session's idle timeout had its sandbox reclaimed
/// under it (reproduced on `agentcube up`: a `sleep 8` on a session idle for 8 s of its 10 s
/// timeout was cut at once with `503`), and so did a WebSocket open for that long. The activity
/// flushed every second now names the sessions busy since the flush before.
#[tokio::test]
async fn sessions_are_active_while_their_requests_are_served() {
    let slow = axum::Router::new()
        .route(
            "/slow",
            axum::routing::post(|| async {
                tokio::time::sleep(Duration::from_millis(6000)).await;
                "done"
            }),
        )
        .fallback_service(upstream::app());
    let (url, _u) = serve(slow).await;
    let store = memory();
    session_to(store.as_ref(), "s", &host_of(&url)).await;
    let router = Router::start("http://127.0.0.1:9", store.clone(), |_| {}).await;
    let created = last_activity_of(store.as_ref()).await;
    let call = tokio::spawn(
        client()
            .post(router.ci("slow"))
            .header("x-agentcube-session-id", "s")
            .send(),
    );
    // Read well before the answer (which is activity of its own) comes.
    let during = activity_reaches(store.as_ref(), created + 2, Duration::from_secs(4)).await;
    assert!(
        !call.is_finished() && during >= created + 2,
        "active while the sandbox works on the request: {created} → {during}"
    );
    let r = call.await.unwrap().unwrap();
    assert_eq!(r.text().await.unwrap(), "done");
    // A WebSocket tunnel: active for as long as it is open.
    let (mut ws, head) = websocket(&router, "s").await;
    assert!(head.starts_with("http/1.1 101"), "{head}");
    let opened = last_activity_of(store.as_ref()).await;
    let open = activity_reaches(store.as_ref(), opened + 2, Duration::from_secs(5)).await;
    ws.write_all(b"ping").await.unwrap();
    let mut echo = [0u8; 4];
    ws.read_exact(&mut echo).await.unwrap();
    assert_eq!(&echo, b"ping", "the tunnel was open all along");
    assert!(
        open >= opened + 2,
        "active while the tunnel is open: {opened} → {open}"
    );
    drop(ws);
    router.stop().await;
}

/// Entry points come from the store: a record aiming at another socket on the host (a container
/// runtime's, say) must not get the Router, with its client's request, connected there. With
/// `--unix-socket-dir` (agentcube up: its `<state>/private`) only sockets below it are used,
/// however the path is spelled; the standalone Router without it uses none.
#[tokio::test]
async fn unix_entry_points_outside_the_socket_directory_are_never_connected() {
    let dir = tempfile::tempdir().unwrap();
    let private = dir.path().join("private");
    std::fs::create_dir(&private).unwrap();
    let inside = private.join("ok.sock");
    let l = tokio::net::UnixListener::bind(&inside).unwrap();
    tokio::spawn(async move { axum::serve(l, upstream::app()).await.unwrap() });
    // A "host" socket that counts every connection made to it.
    let outside = dir.path().join("host.sock");
    let host = tokio::net::UnixListener::bind(&outside).unwrap();
    let touched = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = touched.clone();
    tokio::spawn(async move {
        while let Ok((_s, _)) = host.accept().await {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    });
    let store = memory();
    let spell = |p: &std::path::Path| format!("unix:{}", p.display());
    session_to(store.as_ref(), "in", &spell(&inside)).await;
    session_to(store.as_ref(), "out", &spell(&outside)).await;
    let dotted = format!("unix:{}/../host.sock", private.display());
    session_to(store.as_ref(), "dotted", &dotted).await;
    session_to(store.as_ref(), "relative", "unix:private/ok.sock").await;
    let call = |router: &Router, id: &'static str| {
        client()
            .get(router.ci("x"))
            .header("x-agentcube-session-id", id)
            .send()
    };
    let policy = agentcube_router::proxy::UnixEntryPoints::Under(private.clone());
    let router = Router::start("http://127.0.0.1:9", store.clone(), |c| {
        c.unix_entry_points = policy
    })
    .await;
    assert_eq!(call(&router, "in").await.unwrap().status(), 200);
    for id in ["out", "dotted", "relative"] {
        let r = call(&router, id).await.unwrap();
        assert_eq!(r.status(), 500, "{id}");
        assert_eq!(r.headers()["x-agentcube-error"], "router", "{id}");
    }
    let refused = agentcube_router::proxy::UnixEntryPoints::Refused;
    let router = Router::start("http://127.0.0.1:9", store, |c| {
        c.unix_entry_points = refused
    })
    .await;
    assert_eq!(call(&router, "in").await.unwrap().status(), 500);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        touched.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "the host socket was connected to"
    );
}
