//! End-user authentication against a real OpenID Connect provider (Ory Hydra): 401/403 bodies,
//! roles, session ownership, admin bypass, expiry and key rotation at the issuer.

mod common;

use std::sync::Arc;
use std::time::Duration;

use agentcube_router::oidc::{Authn, Oidc, OidcConfig};
use common::hydra::{Hydra, kid};
use common::*;
use serde_json::{Value, json};

const ROLE: &str = "sandbox:invoke";
const AUD: &str = "agentcube-api";

async fn oidc(h: &Hydra) -> Arc<Authn> {
    let config = OidcConfig {
        issuer: h.issuer.clone(),
        audience: AUD.into(),
        role_claim: "scp".into(),
        required_role: ROLE.into(),
        leeway: Duration::from_secs(1),
    };
    Arc::new(Authn::Oidc(Box::new(Oidc::discover(config).await.unwrap())))
}

/// `(status, body, x-agentcube-error)` of a request with an optional bearer and session.
async fn call(url: &str, token: Option<&str>, session: Option<&str>) -> (u16, Value, bool) {
    let mut r = client().post(url).json(&json!({"command": ["echo", "hi"]}));
    if let Some(t) = token {
        r = r.header("authorization", format!("Bearer {t}"));
    }
    if let Some(s) = session {
        r = r.header("x-agentcube-session-id", s);
    }
    let r = r.send().await.unwrap();
    let router_made = r.headers().contains_key("x-agentcube-error");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null), router_made)
}

fn refused(code: &str, error: &str) -> Value {
    json!({"error": error, "code": code})
}

#[tokio::test]
async fn end_users_are_authenticated_authorised_and_kept_to_their_own_sessions() {
    let h = Hydra::start().await;
    for id in ["alice", "bob"] {
        h.client(id, ROLE, &[AUD, "elsewhere"], "1h").await;
    }
    h.client("root", &format!("{ROLE} admin"), &[AUD], "1h")
        .await;
    h.client("guest", "other", &[AUD], "1h").await;
    h.client("brief", ROLE, &[AUD], "1s").await;
    let store = memory();
    let wm = Wm::start(store.clone()).await;
    let authn = oidc(&h).await;
    let router = Router::start(&wm.url, store.clone(), |c| c.authn = Some(authn)).await;
    let url = router.ci("api/execute");
    let alice = h.token("alice", ROLE, AUD).await;

    // No, malformed, forged and misdirected tokens: 401 from the Router, nothing created.
    let unauthorized = |m: &str| refused("UNAUTHORIZED", m);
    assert_eq!(
        call(&url, None, None).await,
        (401, unauthorized("missing authorization header"), true)
    );
    let mut tampered = alice.clone();
    let last = tampered.pop().unwrap();
    tampered.push(if last == 'A' { 'B' } else { 'A' });
    let elsewhere = h.token("alice", ROLE, "elsewhere").await;
    let forged = {
        // Our own RS256 key with the issuer's kid and claims: not the issuer's key.
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
        header.kid = Some(kid(&alice));
        let now = jiff::Timestamp::now().as_second();
        let claims =
            json!({"iss": h.issuer, "sub": "alice", "aud": [AUD], "exp": now + 300, "scp": [ROLE]});
        let key = jsonwebtoken::EncodingKey::from_rsa_pem(ROUTER_KEY.as_bytes()).unwrap();
        jsonwebtoken::encode(&header, &claims, &key).unwrap()
    };
    for bad in [
        tampered.as_str(),
        elsewhere.as_str(),
        forged.as_str(),
        "not-a-jwt",
    ] {
        assert_eq!(
            call(&url, Some(bad), None).await,
            (401, unauthorized("invalid or expired token"), true),
            "{bad}"
        );
    }
    // A valid token without the required role: 403.
    let guest = h.token("guest", "other", AUD).await;
    assert_eq!(
        call(&url, Some(&guest), None).await,
        (
            403,
            refused(
                "FORBIDDEN",
                "insufficient permissions: missing role sandbox:invoke"
            ),
            true
        )
    );
    assert_eq!(store.count(&agentcube_store::Scope::All).await.unwrap(), 0);

    // Alice's new session is hers: recorded with her as owner, usable by her and an admin only.
    // (Made from a web app of another site: with authentication on, a page cannot act for her
    // without her token, so fetch metadata is not asked.)
    let r = client()
        .post(&url)
        .header("authorization", format!("Bearer {alice}"))
        .header("sec-fetch-site", "cross-site")
        .header("origin", "https://app.example")
        .json(&json!({"command": ["echo", "mine"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let sid = r.headers()["x-agentcube-session-id"]
        .to_str()
        .unwrap()
        .to_string();
    assert_eq!(
        store.get(&sid).await.unwrap().owner_id.as_deref(),
        Some("alice")
    );
    assert_eq!(call(&url, Some(&alice), Some(&sid)).await.0, 200);
    let bob = h.token("bob", ROLE, AUD).await;
    assert_eq!(
        call(&url, Some(&bob), Some(&sid)).await,
        (
            403,
            refused("FORBIDDEN", "you do not own this sandbox"),
            true
        )
    );
    let root = h.token("root", &format!("{ROLE} admin"), AUD).await;
    assert_eq!(
        call(&url, Some(&root), Some(&sid)).await.0,
        200,
        "admin bypass"
    );

    // A session made directly at the Workload Manager has no owner: refused (fail-closed).
    let r = client()
        .post(format!("{}/v1/code-interpreter", wm.url))
        .json(&json!({"name": "ci", "namespace": "default"}))
        .send()
        .await
        .unwrap();
    let direct = r.json::<Value>().await.unwrap()["sessionId"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        call(&url, Some(&alice), Some(&direct)).await,
        (
            403,
            refused("FORBIDDEN", "sandbox has no owner record"),
            true
        )
    );
    assert_eq!(call(&url, Some(&root), Some(&direct)).await.0, 200);

    // The sandbox's token names the user (upstream's user_sub), per user on a shared session.
    let (up, _t) = serve(common::upstream::app()).await;
    session_to(store.as_ref(), "echo", up.trim_start_matches("http://")).await;
    let mut rec = store.get("echo").await.unwrap();
    rec.owner_id = Some("alice".into());
    store.replace(&rec).await.unwrap();
    for (token, sub) in [(&alice, "alice"), (&root, "root")] {
        let (status, body, _) = call(&url, Some(token), Some("echo")).await;
        assert_eq!(status, 200, "{body}");
        let sandbox_token = body["headers"]["authorization"]
            .as_str()
            .unwrap()
            .strip_prefix("Bearer ")
            .unwrap()
            .to_string();
        assert_eq!(verify(&sandbox_token).user_sub.as_deref(), Some(sub));
    }

    // Expiry: a 1 s token is refused once past it (and the 1 s leeway).
    let brief = h.token("brief", ROLE, AUD).await;
    assert_eq!(
        call(&url, Some(&brief), Some(&sid)).await.0,
        403,
        "valid: not the owner"
    );
    tokio::time::sleep(Duration::from_millis(3100)).await;
    assert_eq!(
        call(&url, Some(&brief), Some(&sid)).await,
        (401, unauthorized("invalid or expired token"), true)
    );

    // Key rotation at the issuer: tokens signed with the new key are accepted at once (the
    // unknown kid refetches the JWKS); tokens of the old key keep working until they expire.
    h.rotate_keys().await;
    let rotated = h.token("alice", ROLE, AUD).await;
    assert_ne!(kid(&rotated), kid(&alice), "a new signing key");
    assert_eq!(call(&url, Some(&rotated), Some(&sid)).await.0, 200);
    assert_eq!(call(&url, Some(&alice), Some(&sid)).await.0, 200);

    router.stop().await;
    wm.stop().await;
}

/// With OIDC every end user gets a share of the Router's slots (`--max-concurrent-per-user`):
/// one user's streams cannot take every slot from the others. Administrators are not counted.
#[tokio::test]
async fn one_user_cannot_take_every_slot() {
    let h = Hydra::start().await;
    for id in ["alice", "bob"] {
        h.client(id, ROLE, &[AUD], "1h").await;
    }
    h.client("root", &format!("{ROLE} admin"), &[AUD], "1h")
        .await;
    let store = memory();
    let (up, _t) = serve(common::upstream::app()).await;
    for user in ["alice", "bob"] {
        session_to(store.as_ref(), user, up.trim_start_matches("http://")).await;
        let mut rec = store.get(user).await.unwrap();
        rec.owner_id = Some(user.into());
        store.replace(&rec).await.unwrap();
    }
    let authn = oidc(&h).await;
    let router = Router::start("http://127.0.0.1:9", store, |c| {
        c.authn = Some(authn);
        c.max_concurrent_per_user = 2;
    })
    .await;
    let (alice, bob) = (
        h.token("alice", ROLE, AUD).await,
        h.token("bob", ROLE, AUD).await,
    );
    let root = h.token("root", &format!("{ROLE} admin"), AUD).await;
    let get = |token: &str, session: &str, path: &str| {
        client()
            .get(router.ci(path))
            .header("authorization", format!("Bearer {token}"))
            .header("x-agentcube-session-id", session)
            .send()
    };
    // Alice's two streams (three events 0.4 s apart) hold her whole share.
    let streams = [
        get(&alice, "alice", "sse").await.unwrap(),
        get(&alice, "alice", "sse").await.unwrap(),
    ];
    let third = get(&alice, "alice", "ok").await.unwrap();
    assert_eq!(third.status(), 429);
    assert_eq!(
        third.json::<Value>().await.unwrap(),
        refused(
            "USER_OVERLOADED",
            "too many requests in flight for this user (at most 2), please try again later"
        )
    );
    assert_eq!(
        get(&bob, "bob", "ok").await.unwrap().status(),
        200,
        "bob's share"
    );
    let mut admin = Vec::new();
    for _ in 0..3 {
        let stream = get(&root, "alice", "sse").await.unwrap();
        assert_eq!(stream.status(), 200, "administrators are not counted");
        admin.push(stream);
    }
    // Once her streams are done, her share is back.
    for s in streams {
        assert!(s.text().await.unwrap().contains("event-2"));
    }
    assert_eq!(get(&alice, "alice", "ok").await.unwrap().status(), 200);
    router.stop().await;
}

#[tokio::test]
async fn an_unreachable_or_mismatched_issuer_stops_the_start() {
    let gone = OidcConfig {
        issuer: "http://127.0.0.1:9".into(),
        audience: AUD.into(),
        role_claim: "scp".into(),
        required_role: ROLE.into(),
        leeway: Duration::from_secs(30),
    };
    let e = Oidc::discover(gone.clone()).await.unwrap_err();
    assert!(format!("{e:#}").contains("cannot reach"), "{e:#}");
    let h = Hydra::start().await;
    let slash = OidcConfig {
        issuer: format!("{}/", h.issuer),
        ..gone
    };
    let e = Oidc::discover(slash).await.unwrap_err();
    assert!(format!("{e:#}").contains("must match exactly"), "{e:#}");
}
