//! End-to-end flows through the Router with a real Workload Manager and real PicoD sandboxes.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};

async fn create_session(wm: &Wm, name: &str) -> String {
    let r = client()
        .post(format!("{}/v1/code-interpreter", wm.url))
        .json(&json!({"name": name, "namespace": "default"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.json::<Value>().await.unwrap()["sessionId"]
        .as_str()
        .unwrap()
        .to_string()
}

#[tokio::test]
async fn sdk_flow_and_router_bootstrapped_flow() {
    let store = memory();
    let wm = Wm::start(store.clone()).await;
    let router = Router::start(&wm.url, store.clone(), |_| {}).await;
    let http = client();

    // SDK flow: session from the WM, data plane through the Router with the client's own bearer.
    let id = create_session(&wm, "ci").await;
    let r = http
        .post(router.ci("api/execute"))
        .header("x-agentcube-session-id", &id)
        .header("authorization", "Bearer some-client-token")
        .json(&json!({"command": ["python3", "-c", "print(1+1)"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-agentcube-session-id"], id.as_str());
    assert_eq!(r.json::<Value>().await.unwrap()["stdout"], "2\n");

    // Router-bootstrapped: no header → a new session, returned in the header, reusable.
    let r = http
        .post(router.ci("api/execute"))
        .json(&json!({"command": ["echo", "boot"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let new_id = r.headers()["x-agentcube-session-id"]
        .to_str()
        .unwrap()
        .to_string();
    assert_ne!(new_id, id);
    assert_eq!(r.json::<Value>().await.unwrap()["stdout"], "boot\n");
    let r = http
        .get(router.ci("api/files?path=."))
        .header("x-agentcube-session-id", &new_id)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.json::<Value>().await.unwrap()["files"].is_array());
    assert!(store.get(&new_id).await.is_ok());

    // PicoD's own 4xx is proxied and still carries the session header.
    let r = http
        .get(router.ci("api/files/missing.txt"))
        .header("x-agentcube-session-id", &id)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(r.headers()["x-agentcube-session-id"], id.as_str());
    assert!(
        r.headers().get("x-agentcube-error").is_none(),
        "the application's 404 passes through untouched"
    );
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({"error": "File not found", "code": 404})
    );

    // Streaming: an NDJSON execute arrives chunk by chunk through the Router.
    let mut r = http
        .post(router.ci("api/execute"))
        .header("x-agentcube-session-id", &id)
        .header("accept", "application/x-ndjson")
        .json(&json!({"command": ["sh", "-c", "echo first; sleep 1; echo second"]}))
        .send()
        .await
        .unwrap();
    let first = r.chunk().await.unwrap().unwrap();
    let first: Value = serde_json::from_slice(&first).unwrap();
    assert_eq!(first, json!({"type": "stdout", "data": "first\n"}));
    let mut rest = Vec::new();
    while let Some(c) = r.chunk().await.unwrap() {
        rest.extend_from_slice(&c);
    }
    assert!(String::from_utf8_lossy(&rest).contains("\"exit_code\":0"));

    // Activity reaches the store in batches.
    let before = store
        .list_idle(jiff::Timestamp::now(), 0, 10)
        .await
        .unwrap();
    assert!(before.iter().any(|s| s.record.session_id == id));

    router.stop().await;
    wm.stop().await;
}

/// A session past its lifetime (`expiresAt`: maxSessionDuration or the create's ttl) is refused
/// as ended from that moment, cached or not, saying why; before, it was served until the
/// Workload Manager's GC tore it down, up to a GC interval (15 s) later.
#[tokio::test]
async fn a_session_past_its_lifetime_is_ended_at_once() {
    let store = memory();
    let (up, _task) = serve(upstream::app()).await;
    let addr = up.trim_start_matches("http://");
    session_to(store.as_ref(), "s", addr).await;
    let mut record = store.get("s").await.unwrap();
    let end = jiff::Timestamp::now() + jiff::SignedDuration::from_millis(1500);
    record.expires_at = end;
    store.replace(&record).await.unwrap();
    // A cache longer than the rest of its life: the cached entry is refused too.
    let router = Router::start("http://127.0.0.1:9", store.clone(), |c| {
        c.session_cache_ttl = Duration::from_secs(60)
    })
    .await;
    let get = || router.get_in("s", "x").send();
    assert_eq!(get().await.unwrap().status(), 200);
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let r = get().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(r.headers()["x-agentcube-error"], "router");
    let why = format!(
        "it reached its maximum duration (maxSessionDuration or the create's ttl; it expired at {end})"
    );
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({"error": "sessions.agentcube.volcano.sh \"s\" not found", "code": "SESSION_NOT_FOUND", "reason": why})
    );
    router.stop().await;
}

#[tokio::test]
async fn unknown_session_unknown_runtime_and_mismatch() {
    let store = memory();
    let wm = Wm::start(store.clone()).await;
    let router = Router::start(&wm.url, store.clone(), |_| {}).await;
    let http = client();
    // A session the Workload Manager ended with a note of why: the 404 says it.
    let why = "it was idle for longer than its sessionTimeout (15m0s)";
    let mark = agentcube_store::gone_mark("ended");
    store
        .set_mark(&mark, why, agentcube_store::GONE_TTL, false)
        .await
        .unwrap();
    for (id, reason) in [("nope", None), ("ended", Some(why))] {
        let r = http
            .get(router.ci("api/files?path=."))
            .header("x-agentcube-session-id", id)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404);
        assert!(r.headers().get("x-agentcube-session-id").is_none());
        assert_eq!(r.headers()["x-agentcube-error"], "router");
        let mut want = json!({"error": format!("sessions.agentcube.volcano.sh \"{id}\" not found"), "code": "SESSION_NOT_FOUND"});
        if let Some(why) = reason {
            want["reason"] = json!(why);
        }
        assert_eq!(r.json::<Value>().await.unwrap(), want);
    }

    let url = format!(
        "{}/v1/namespaces/default/code-interpreters/nope/invocations/api/execute",
        router.url
    );
    let r = http
        .post(url)
        .json(&json!({"command": ["true"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({"error": "codeinterpreters.agentcube.volcano.sh \"default/nope\" not found"})
    );
    let url = format!(
        "{}/v1/namespaces/default/agent-runtimes/nope/invocations/",
        router.url
    );
    let r = http.get(url).send().await.unwrap();
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({"error": "agentruntimes.agentcube.volcano.sh \"default/nope\" not found"})
    );

    let id = create_session(&wm, "ci").await;
    let url = format!(
        "{}/v1/namespaces/default/code-interpreters/other/invocations/api/execute",
        router.url
    );
    let r = http
        .post(url)
        .header("x-agentcube-session-id", &id)
        .json(&json!({"command": ["true"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
    let v = r.json::<Value>().await.unwrap();
    assert_eq!(v["code"], "SESSION_TARGET_MISMATCH");
    assert_eq!(
        v["error"],
        format!("session {id} belongs to CodeInterpreter default/ci")
    );

    // Deleted sessions 404 once the short cache expires.
    let r = http
        .delete(format!("{}/v1/code-interpreter/sessions/{id}", wm.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let r = http
        .get(router.ci("api/files?path=."))
        .header("x-agentcube-session-id", &id)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    router.stop().await;
    wm.stop().await;
}

#[tokio::test]
async fn hot_path_does_one_lookup_and_no_signing_per_request() {
    let store = memory();
    let wm = Wm::start(store.clone()).await;
    let router = Router::start(&wm.url, store.clone(), |c| {
        c.session_cache_ttl = Duration::ZERO
    })
    .await;
    let id = create_session(&wm, "ci").await;
    let http = client();
    let (gets0, sigs0) = (
        router.shared().resolver.store_gets(),
        router.shared().signer.signatures(),
    );
    for _ in 0..20 {
        let r = http
            .get(router.ci("api/files?path=."))
            .header("x-agentcube-session-id", &id)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let gets = router.shared().resolver.store_gets() - gets0;
    let sigs = router.shared().signer.signatures() - sigs0;
    assert_eq!(
        gets, 20,
        "at most one store GET per request (cache disabled here)"
    );
    assert_eq!(sigs, 1, "one RSA signature for the whole session");
    router.stop().await;
    wm.stop().await;
}

#[tokio::test]
async fn two_routers_share_one_redis_and_identity() {
    let server =
        agentcube_store::testing::ServerProcess::start(agentcube_store::testing::Flavor::Redis);
    let store: std::sync::Arc<dyn agentcube_store::SessionStore> = std::sync::Arc::new(
        agentcube_store::RedisStore::new(agentcube_store::RedisConfig::new(server.url())).unwrap(),
    );
    let wm = Wm::start(store.clone()).await;
    let a = Router::start(&wm.url, store.clone(), |_| {}).await;
    let b = Router::start(&wm.url, store.clone(), |_| {}).await;
    let http = client();
    let r = http
        .post(a.ci("api/execute"))
        .json(&json!({"command": ["sh", "-c", "echo hi > f.txt; cat f.txt"]}))
        .send()
        .await
        .unwrap();
    let id = r.headers()["x-agentcube-session-id"]
        .to_str()
        .unwrap()
        .to_string();
    assert_eq!(r.json::<Value>().await.unwrap()["stdout"], "hi\n");
    let r = http
        .get(b.ci("api/files/f.txt"))
        .header("x-agentcube-session-id", &id)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "hi\n");
    a.stop().await;
    b.stop().await;
    wm.stop().await;
}
