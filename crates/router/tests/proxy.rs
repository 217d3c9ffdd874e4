//! Proxy behaviour against a test upstream: headers, statuses, SSE, WebSocket, limits, failures.

mod common;

use std::time::Duration;

use common::upstream;
use common::*;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn setup(
    tweak: impl FnOnce(&mut agentcube_router::Config),
) -> (
    Router,
    std::sync::Arc<dyn agentcube_store::SessionStore>,
    String,
) {
    let store = memory();
    let (up, _task) = serve(upstream::app()).await;
    session_to(store.as_ref(), "s1", up.trim_start_matches("http://")).await;
    let router = Router::start("http://127.0.0.1:9", store.clone(), tweak).await;
    (router, store, up)
}

#[tokio::test]
async fn headers_are_rewritten_like_upstream() {
    let (router, _store, up) = setup(|_| {}).await;
    let r = client()
        .post(router.ci("mcp/tools%20list?x=1&y=2"))
        .header("x-agentcube-session-id", "s1")
        .header("authorization", "Bearer client")
        .header("connection", "keep-alive, x-drop")
        .header("x-drop", "secret")
        .header("x-forwarded-for", "10.0.0.1")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-agentcube-session-id"], "s1");
    assert!(
        r.headers().get("x-secret").is_none(),
        "hop-by-hop response headers removed"
    );
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["method"], "POST");
    assert_eq!(v["path"], "/mcp/tools%20list", "full path, not stripped");
    assert_eq!(v["query"], "x=1&y=2");
    let h = &v["headers"];
    let token = h["authorization"]
        .as_str()
        .unwrap()
        .strip_prefix("Bearer ")
        .unwrap();
    let claims = verify(token);
    assert_eq!(
        (claims.iss.as_str(), claims.session_id.as_str()),
        ("agentcube-router", "s1")
    );
    assert_eq!(claims.exp - claims.iat, 300);
    assert_eq!(h["x-forwarded-for"], "10.0.0.1, 127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(
        h["host"],
        up.trim_start_matches("http://"),
        "Host names the sandbox"
    );
    assert!(
        h["x-forwarded-host"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:")
    );
    assert!(
        h.get("x-drop").is_none(),
        "headers named in Connection are dropped"
    );
    assert_eq!(h["x-agentcube-session-id"], "s1");
}

#[tokio::test]
async fn upstream_errors_are_proxied_with_the_session_header() {
    let (router, _store, _) = setup(|_| {}).await;
    for code in [400u16, 401, 500, 503] {
        let r = client()
            .get(router.ci(&format!("status/{code}")))
            .header("x-agentcube-session-id", "s1")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), code);
        assert_eq!(r.headers()["x-agentcube-session-id"], "s1");
        assert_eq!(r.text().await.unwrap(), "upstream says no");
    }
}

#[tokio::test]
async fn only_get_and_post_and_slashless_redirects() {
    let (router, _store, _) = setup(|_| {}).await;
    let http = client();
    let r = http
        .put(router.ci("x"))
        .header("x-agentcube-session-id", "s1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(r.text().await.unwrap(), "404 page not found");
    let base = router.ci("").trim_end_matches('/').to_string();
    let r = http.get(format!("{base}?a=1")).send().await.unwrap();
    assert_eq!(r.status(), 301);
    assert!(
        r.headers()["location"]
            .to_str()
            .unwrap()
            .ends_with("/invocations/?a=1")
    );
    assert_eq!(http.post(&base).send().await.unwrap().status(), 307);
    let r = http
        .get(router.ci(""))
        .header("x-agentcube-session-id", "s1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.json::<Value>().await.unwrap()["path"], "/");
    assert_eq!(
        http.get(format!("{}/health/live", router.url))
            .send()
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap(),
        json!({"status": "alive"})
    );
    assert_eq!(
        http.get(format!("{}/health/ready", router.url))
            .send()
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap(),
        json!({"status": "ready"})
    );
}

#[tokio::test]
async fn sse_events_arrive_one_by_one() {
    let (router, _store, _) = setup(|_| {}).await;
    let mut r = client()
        .get(router.ci("sse"))
        .header("x-agentcube-session-id", "s1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let first = r.chunk().await.unwrap().unwrap();
    assert_eq!(
        &first[..],
        b"data: event-0\n\n",
        "first event before the stream ends"
    );
    let mut rest = Vec::new();
    while let Some(c) = r.chunk().await.unwrap() {
        rest.extend_from_slice(&c);
    }
    assert_eq!(
        String::from_utf8(rest).unwrap(),
        "data: event-1\n\ndata: event-2\n\n"
    );
}

#[tokio::test]
async fn websocket_upgrades_pass_through() {
    let (router, _store, _) = setup(|_| {}).await;
    let (mut s, head) = websocket(&router, "s1").await;
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("x-agentcube-session-id: s1"));
    s.write_all(b"ping-frame").await.unwrap();
    let mut echo = [0u8; 10];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut echo))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&echo, b"ping-frame");
}

#[tokio::test]
async fn concurrency_limit_answers_429_and_zero_is_unlimited() {
    let (router, _store, _) = setup(|c| c.max_concurrent_requests = 1).await;
    // Hold the only slot with a streaming response that is not read to the end.
    let mut held = client()
        .get(router.ci("sse"))
        .header("x-agentcube-session-id", "s1")
        .send()
        .await
        .unwrap();
    let _ = held.chunk().await.unwrap();
    let r = client()
        .get(router.ci("x"))
        .header("x-agentcube-session-id", "s1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({"error": "server overloaded, please try again later", "code": "SERVER_OVERLOADED"})
    );
    while held.chunk().await.unwrap().is_some() {}
    drop(held);
    let mut ok = false;
    for _ in 0..20 {
        if client()
            .get(router.ci("x"))
            .header("x-agentcube-session-id", "s1")
            .send()
            .await
            .unwrap()
            .status()
            == 200
        {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ok, "slot released after the stream ended");

    let (router, _store, _) = setup(|c| c.max_concurrent_requests = 0).await;
    let mut streams = Vec::new();
    for _ in 0..5 {
        let mut r = client()
            .get(router.ci("sse"))
            .header("x-agentcube-session-id", "s1")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let _ = r.chunk().await.unwrap();
        streams.push(r);
    }
}

#[tokio::test]
async fn sandbox_failures_map_to_502_503_504() {
    let store = memory();
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    session_to(store.as_ref(), "refused", &dead.to_string()).await;
    session_to(
        store.as_ref(),
        "nosock",
        "unix:/nonexistent/agentcube/p.sock",
    )
    .await;
    // A listener with a full accept queue never completes new handshakes: a connect timeout.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let full = sock.listen(0).unwrap();
    let full_addr = full.local_addr().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..4 {
        if let Ok(Ok(s)) = tokio::time::timeout(
            Duration::from_millis(200),
            tokio::net::TcpStream::connect(full_addr),
        )
        .await
        {
            fillers.push(s);
        }
    }
    session_to(store.as_ref(), "slow", &full_addr.to_string()).await;
    let mut placeholder = agentcube_types::SessionRecord::placeholder(
        "placeholder",
        "default",
        "x",
        jiff::Timestamp::now(),
        jiff::Timestamp::now() + jiff::SignedDuration::from_hours(1),
        Default::default(),
    );
    placeholder.status = agentcube_types::SessionStatus::Creating;
    store
        .insert(&placeholder, jiff::Timestamp::now())
        .await
        .unwrap();
    let router = Router::start("http://127.0.0.1:9", store.clone(), |c| {
        c.connect_timeout = Duration::from_millis(300)
    })
    .await;
    let get = |id: &'static str| {
        let url = router.ci("x");
        async move {
            client()
                .get(url)
                .header("x-agentcube-session-id", id)
                .send()
                .await
                .unwrap()
        }
    };
    let r = get("refused").await;
    assert_eq!(r.status(), 502);
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({"error": "sandbox unreachable"})
    );
    assert_eq!(get("nosock").await.status(), 502);
    let r = get("slow").await;
    assert_eq!(r.status(), 504, "full accept queue should time out");
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({"error": "sandbox timeout"})
    );
    let r = get("placeholder").await;
    assert_eq!(r.status(), 404);
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({"error": "no entry point found for sandbox"})
    );
    drop(fillers);
    // Upstream's proxy error counter: refused (TCP and a missing socket) and the timeout; the
    // placeholder's 404 is not a proxy error.
    let text = metrics_text(&router).await;
    for line in [
        "agentcube_router_proxy_errors_total{kind=\"CodeInterpreter\",reason=\"connection_refused\"} 2",
        "agentcube_router_proxy_errors_total{kind=\"CodeInterpreter\",reason=\"timeout\"} 1",
    ] {
        assert!(text.contains(line), "{line}\n{text}");
    }
    assert!(!text.contains("reason=\"other\""), "{text}");
}

/// A Router whose Workload Manager is `wm` (`timeout` for its calls), and the answer to a request
/// without a session (which makes one).
async fn first_request_with(
    wm: axum::Router,
    store: &std::sync::Arc<dyn agentcube_store::SessionStore>,
    timeout: Option<Duration>,
) -> reqwest::Response {
    let (wm_url, _t) = serve(wm).await;
    let router = Router::start(&wm_url, store.clone(), |c| {
        if let Some(t) = timeout {
            c.workload_manager_timeout = t;
        }
    })
    .await;
    client()
        .post(router.ci("api/execute"))
        .body("{}")
        .send()
        .await
        .unwrap()
}

/// A create the Workload Manager refuses for a reason the client can act on keeps its status
/// and words (upstream turned each into `500 internal server error`: an end user over their
/// session cap could not tell it from a crash); a sandbox that could not start, or was not ready
/// in time, is upstream's 500 with the manager's words and code (an agent exiting at start was
/// a bare `internal server error`); the manager's other failures, and a slow one, are 500.
#[tokio::test]
async fn workload_manager_refusals_keep_their_status_and_failures_are_a_500() {
    use axum::http::StatusCode;
    let store = memory();
    let refused = |said: &str| (said.to_string(), Some("SESSION_CREATE_REFUSED"));
    let cases = [
        (
            StatusCode::TOO_MANY_REQUESTS,
            json!({"message": "session limit reached: 2 live sessions of user alice (--max-sessions-per-user)"}),
            429,
            refused(
                "session limit reached: 2 live sessions of user alice (--max-sessions-per-user)",
            ),
        ),
        (
            StatusCode::BAD_REQUEST,
            json!({"message": "invalid ttl 0"}),
            400,
            refused("invalid ttl 0"),
        ),
        (
            StatusCode::FORBIDDEN,
            json!({"message": "not allowed to create sandboxes in namespace default"}),
            403,
            refused("not allowed to create sandboxes in namespace default"),
        ),
        (
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"message": "session store unavailable: Connection refused (os error 111)"}),
            503,
            refused("the workload manager cannot create sessions now, please try again later"),
        ),
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            json!({"message": "the API server said no"}),
            500,
            ("internal server error".into(), None),
        ),
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            json!({"message": "sandbox quits-1 exited while starting (exit status: 3)", "code": "SANDBOX_FAILED"}),
            500,
            (
                "sandbox quits-1 exited while starting (exit status: 3)".into(),
                Some("SANDBOX_FAILED"),
            ),
        ),
        (
            StatusCode::GATEWAY_TIMEOUT,
            json!({"message": "sandbox creation timed out: nothing accepts connections on port 9999", "code": "SANDBOX_TIMEOUT"}),
            500,
            (
                "sandbox creation timed out: nothing accepts connections on port 9999".into(),
                Some("SANDBOX_TIMEOUT"),
            ),
        ),
        // Only the manager's own codes pass words on.
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            json!({"message": "the API server said no", "code": "SANDBOX_TIMEOUT"}),
            500,
            ("internal server error".into(), None),
        ),
        (
            StatusCode::GATEWAY_TIMEOUT,
            json!({"message": "sandbox creation timed out"}),
            500,
            ("internal server error".into(), None),
        ),
    ];
    for (status, said, want_status, (told, code)) in cases {
        let wm = axum::Router::new().fallback({
            let said = said.clone();
            move || async move { (status, axum::Json(said)) }
        });
        let r = first_request_with(wm, &store, None).await;
        assert_eq!(r.status(), want_status, "{said}");
        assert_eq!(r.headers()["x-agentcube-error"], "router");
        assert!(r.headers().get("x-agentcube-session-id").is_none());
        let want = match code {
            Some(code) => json!({"error": told, "code": code}),
            None => json!({"error": told}),
        };
        assert_eq!(r.json::<Value>().await.unwrap(), want, "{said}");
    }
    let slow = axum::Router::new().fallback(|| async {
        tokio::time::sleep(Duration::from_secs(30)).await;
        "late"
    });
    let r = first_request_with(slow, &store, Some(Duration::from_millis(300))).await;
    assert_eq!(r.status(), 500);
}

#[tokio::test]
async fn store_outage_is_a_fast_503_and_recovers() {
    let mut server =
        agentcube_store::testing::ServerProcess::start(agentcube_store::testing::Flavor::Redis);
    let mut cfg = agentcube_store::RedisConfig::new(server.url());
    cfg.op_timeout = Duration::from_millis(500);
    let store: std::sync::Arc<dyn agentcube_store::SessionStore> =
        std::sync::Arc::new(agentcube_store::RedisStore::new(cfg).unwrap());
    let (up, _task) = serve(upstream::app()).await;
    session_to(store.as_ref(), "s1", up.trim_start_matches("http://")).await;
    let router = Router::start("http://127.0.0.1:9", store.clone(), |c| {
        c.session_cache_ttl = Duration::ZERO
    })
    .await;
    assert_eq!(
        client()
            .get(router.ci("x"))
            .header("x-agentcube-session-id", "s1")
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    server.stop();
    let r = tokio::time::timeout(
        Duration::from_secs(10),
        client()
            .get(router.ci("x"))
            .header("x-agentcube-session-id", "s1")
            .send(),
    )
    .await
    .expect("no hang")
    .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(
        r.json::<Value>().await.unwrap()["code"],
        "STORE_UNAVAILABLE"
    );
    server.restart();
    session_to(store.as_ref(), "s2", up.trim_start_matches("http://")).await;
    let r = client()
        .get(router.ci("x"))
        .header("x-agentcube-session-id", "s2")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn metrics_count_requests_lookups_and_signatures() {
    let (router, _store, _) = setup(|_| {}).await;
    for _ in 0..3 {
        client()
            .get(router.ci("x"))
            .header("x-agentcube-session-id", "s1")
            .send()
            .await
            .unwrap();
    }
    client()
        .get(router.ci("x"))
        .header("x-agentcube-session-id", "nope")
        .send()
        .await
        .unwrap();
    let text = metrics_text(&router).await;
    assert!(
        text.contains("agentcube_router_requests_total{code=\"200\"} 3"),
        "{text}"
    );
    assert!(
        text.contains("agentcube_router_requests_total{code=\"404\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("agentcube_router_token_signatures_total 1"),
        "{text}"
    );
    assert!(
        text.contains(
            "agentcube_router_request_duration_seconds_count{kind=\"CodeInterpreter\"} 4"
        ),
        "{text}"
    );
}

#[tokio::test]
async fn the_longest_matching_path_prefix_picks_the_entry_point() {
    // Three servers, each answering its own name for any path; entry points listed shortest
    // first so "first match" and "longest match" disagree.
    let named = |name: &'static str| axum::Router::new().fallback(move || async move { name });
    let (root, _a) = serve(named("root")).await;
    let (api, _b) = serve(named("api")).await;
    let (v2, _c) = serve(named("v2")).await;
    let store = memory();
    session_to(store.as_ref(), "multi", "127.0.0.1:9").await;
    let mut rec = store.get("multi").await.unwrap();
    let ep = |path: &str, url: &str| agentcube_types::EntryPoint {
        path: path.into(),
        protocol: "HTTP".into(),
        endpoint: url.trim_start_matches("http://").into(),
    };
    rec.entry_points = Some(vec![ep("/", &root), ep("/api", &api), ep("/api/v2", &v2)]);
    store.replace(&rec).await.unwrap();
    let router = Router::start("http://127.0.0.1:9", store, |_| {}).await;
    for (path, want) in [
        ("api/v2/run", "v2"),
        ("api/v1/run", "api"),
        ("api", "api"),
        ("health", "root"),
    ] {
        let r = client()
            .get(router.ci(path))
            .header("x-agentcube-session-id", "multi")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{path}");
        assert_eq!(r.text().await.unwrap(), want, "{path}");
    }
}

#[tokio::test]
async fn refused_callers_never_take_a_concurrency_slot() {
    let authn = std::sync::Arc::new(agentcube_router::oidc::Authn::Token("t0k".into()));
    let (router, _store, _) = setup(|c| {
        c.max_concurrent_requests = 1;
        c.authn = Some(authn);
    })
    .await;
    // The only slot, held by an authenticated stream.
    let mut held = client()
        .get(router.ci("sse"))
        .header("x-agentcube-session-id", "s1")
        .bearer_auth("t0k")
        .send()
        .await
        .unwrap();
    assert_eq!(held.status(), 200);
    let _ = held.chunk().await.unwrap();
    let call = |token: Option<&'static str>| {
        let mut r = client()
            .get(router.ci("x"))
            .header("x-agentcube-session-id", "s1");
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        async move { r.send().await.unwrap().status().as_u16() }
    };
    // Without a valid token: 401, whatever the load (auth comes first, takes no slot)…
    for _ in 0..5 {
        assert_eq!(call(None).await, 401);
        assert_eq!(call(Some("wrong")).await, 401);
    }
    // …while an authenticated request does compete for the slot.
    assert_eq!(call(Some("t0k")).await, 429);
    while held.chunk().await.unwrap().is_some() {}
}
