//! JWT acceptance and refusal, with the three upstream 401 bodies.

mod common;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use base64::Engine;
use common::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;

async fn with_auth(p: &Picod, value: Option<String>) -> Resp {
    let mut b = Request::get("/api/files?path=.");
    if let Some(v) = value {
        b = b.header("authorization", v);
    }
    p.send(b.body(Body::empty()).unwrap()).await
}

fn invalid_token(r: &Resp) {
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.text());
    let v = r.json();
    assert_eq!(v["error"], "Invalid token");
    assert_eq!(v["code"], 401);
    assert!(
        v["detail"]
            .as_str()
            .unwrap()
            .starts_with("JWT verification failed: "),
        "{v}"
    );
}

#[tokio::test]
async fn missing_and_malformed_headers_get_upstream_bodies() {
    let p = Picod::new();
    let r = with_auth(&p, None).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        r.json(),
        json!({"error":"Missing Authorization header","code":401,"detail":"Request requires JWT authentication"})
    );
    for bad in ["Basic abc", "Bearer", "bearer x", "Bearer a b"] {
        let r = with_auth(&p, Some(bad.into())).await;
        assert_eq!(
            r.json(),
            json!({"error":"Invalid Authorization header format","code":401,"detail":"Use Bearer <token>"}),
            "{bad}"
        );
    }
}

#[tokio::test]
async fn router_tokens_are_accepted() {
    let p = Picod::new();
    let r = with_auth(&p, Some(format!("Bearer {}", token()))).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    // RS512 is an RSA PKCS#1 algorithm too, as upstream accepts.
    let t = sign(ROUTER_KEY, Algorithm::RS512, json!({"exp": now() + 60}));
    assert_eq!(
        with_auth(&p, Some(format!("Bearer {t}"))).await.status,
        StatusCode::OK
    );
    // Expired 30 s ago is inside the 60 s leeway.
    let t = sign(
        ROUTER_KEY,
        Algorithm::RS256,
        json!({"exp": now() - 30, "iat": now() - 330}),
    );
    assert_eq!(
        with_auth(&p, Some(format!("Bearer {t}"))).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn bad_tokens_are_refused() {
    let p = Picod::new();
    let cases = [
        (
            "wrong key",
            sign(OTHER_KEY, Algorithm::RS256, json!({"exp": now() + 60})),
        ),
        (
            "expired",
            sign(ROUTER_KEY, Algorithm::RS256, json!({"exp": now() - 120})),
        ),
        (
            "no exp",
            sign(ROUTER_KEY, Algorithm::RS256, json!({"iat": now()})),
        ),
        (
            "future iat",
            sign(
                ROUTER_KEY,
                Algorithm::RS256,
                json!({"exp": now() + 600, "iat": now() + 300}),
            ),
        ),
        ("garbage", "not.a.jwt".to_string()),
    ];
    for (name, t) in cases {
        let r = with_auth(&p, Some(format!("Bearer {t}"))).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{name}");
        invalid_token(&r);
    }
}

#[tokio::test]
async fn alg_none_and_hmac_with_the_public_key_are_refused() {
    let p = Picod::new();
    let b64 = |v: serde_json::Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let claims = json!({"exp": now() + 60, "iat": now()});
    let none = format!(
        "{}.{}.",
        b64(json!({"alg":"none","typ":"JWT"})),
        b64(claims.clone())
    );
    invalid_token(&with_auth(&p, Some(format!("Bearer {none}"))).await);
    // The classic key-confusion attack: HS256 keyed with the RSA public key PEM.
    let hs = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(ROUTER_PUB.as_bytes()),
    )
    .unwrap();
    invalid_token(&with_auth(&p, Some(format!("Bearer {hs}"))).await);
}

#[tokio::test]
async fn a_verified_token_is_cached_until_it_expires() {
    let p = Picod::new();
    let t = token();
    let verifier = p.state.verifier.clone().unwrap();
    assert!(!verifier.is_cached(&t, now()));
    assert_eq!(
        with_auth(&p, Some(format!("Bearer {t}"))).await.status,
        StatusCode::OK
    );
    assert!(verifier.is_cached(&t, now()));
    assert!(
        !verifier.is_cached(&t, now() + 300 + 61),
        "expired tokens must not stay valid"
    );
    // A refused token is never cached.
    let bad = sign(OTHER_KEY, Algorithm::RS256, json!({"exp": now() + 60}));
    let _ = with_auth(&p, Some(format!("Bearer {bad}"))).await;
    assert!(!verifier.is_cached(&bad, now()));
}

#[tokio::test]
async fn health_needs_no_token_and_disabled_auth_lets_everything_in() {
    let p = Picod::new();
    let r = p
        .send(Request::get("/health").body(Body::empty()).unwrap())
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let open = Picod::with(|c| c.auth = agentcube_picod::Auth::Disabled);
    assert_eq!(with_auth(&open, None).await.status, StatusCode::OK);
}

#[tokio::test]
async fn a_sandbox_with_an_identity_accepts_only_tokens_for_it() {
    let p = Picod::with(|c| c.sandbox_name = Some("ci-aaaa1111".into()));
    let claims = |aud: serde_json::Value| {
        let mut c = json!({"iss": "agentcube-router", "iat": now(), "exp": now() + 300, "session_id": "s1"});
        if !aud.is_null() {
            c["aud"] = aud;
        }
        format!("Bearer {}", sign(ROUTER_KEY, Algorithm::RS256, c))
    };
    let ok = with_auth(&p, Some(claims(json!("ci-aaaa1111")))).await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.text());
    // A token the Router signed for another sandbox (e.g. captured by an agent) is refused…
    let other = with_auth(&p, Some(claims(json!("ci-bbbb2222")))).await;
    invalid_token(&other);
    assert!(
        other.json()["detail"]
            .as_str()
            .unwrap()
            .contains("another sandbox")
    );
    // …and so is one bound to no sandbox at all.
    let none = with_auth(&p, Some(claims(serde_json::Value::Null))).await;
    invalid_token(&none);
    // The verified-token cache does not let a refused token in on a second try.
    invalid_token(&with_auth(&p, Some(claims(json!("ci-bbbb2222")))).await);
    // Without an identity (upstream PicoD behaviour), any Router token works.
    let open = Picod::new();
    let r = with_auth(&open, Some(claims(json!("ci-bbbb2222")))).await;
    assert_eq!(r.status, StatusCode::OK);
}

#[tokio::test]
async fn metrics_are_off_by_default_and_unauthenticated_uncompressed_when_on() {
    let req = || {
        Request::get("/metrics")
            .header("accept-encoding", "gzip")
            .body(Body::empty())
            .unwrap()
    };
    let off = Picod::new();
    assert_eq!(off.send(req()).await.status, StatusCode::NOT_FOUND);
    let on = Picod::with(|c| c.metrics = true);
    // Two answered calls and one refused one, all counted by route pattern and status.
    let ok = with_auth(&on, Some(format!("Bearer {}", token()))).await;
    assert_eq!(ok.status, StatusCode::OK);
    assert_eq!(
        with_auth(&on, Some(format!("Bearer {}", token())))
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(with_auth(&on, None).await.status, StatusCode::UNAUTHORIZED);
    let r = on.send(req()).await;
    assert_eq!(r.status, StatusCode::OK, "no token needed");
    assert!(r.header("content-encoding").is_none(), "never compressed");
    let text = r.text();
    for line in [
        "agentcube_picod_requests_total{route=\"/api/files\",code=\"200\"} 2",
        "agentcube_picod_requests_total{route=\"/api/files\",code=\"401\"} 1",
        "agentcube_picod_request_duration_seconds_count{route=\"/api/files\"} 3",
    ] {
        assert!(text.contains(line), "{line}\n{text}");
    }
    assert!(
        !text.contains("route=\"/metrics\""),
        "scrapes are not counted"
    );
}
