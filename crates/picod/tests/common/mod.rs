//! Shared test scaffolding: an in-process PicoD with the test key, signed tokens, requests.
#![allow(dead_code)]

use std::path::Path;

use agentcube_picod::{AppState, Auth, Config};
use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode};
use http_body_util::BodyExt;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use tower::ServiceExt;

pub const ROUTER_KEY: &str = include_str!("../data/router.key.pem");
pub const ROUTER_PUB: &str = include_str!("../data/router.pub.pem");
pub const OTHER_KEY: &str = include_str!("../data/other.key.pem");

pub fn now() -> i64 {
    jiff::Timestamp::now().as_second()
}

/// A token as the Router signs it.
pub fn token() -> String {
    sign(
        ROUTER_KEY,
        Algorithm::RS256,
        serde_json::json!({"iss": "agentcube-router", "iat": now(), "exp": now() + 300, "session_id": "s1"}),
    )
}

pub fn sign(key_pem: &str, alg: Algorithm, claims: serde_json::Value) -> String {
    install_ring(); // before jsonwebtoken's first use picks its default provider
    let key = EncodingKey::from_rsa_pem(key_pem.as_bytes()).unwrap();
    jsonwebtoken::encode(&Header::new(alg), &claims, &key).unwrap()
}

/// Tokens are verified as the `picod` binary verifies them: with ring as jsonwebtoken's RSA
/// verifier (installed once per test process, as `main` does, before anything here uses
/// jsonwebtoken).
pub fn install_ring() {
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    INSTALLED.call_once(|| {
        let provider = Box::leak(Box::new(agentcube_picod::ring_rsa::provider()));
        jsonwebtoken::crypto::CryptoProvider::install_default(provider)
            .unwrap_or_else(|_| panic!("a JWT crypto provider was installed before the tests'"));
    });
}

pub struct Picod {
    pub dir: tempfile::TempDir,
    pub state: AppState,
}

impl Picod {
    pub fn new() -> Self {
        Self::with(|_| {})
    }

    pub fn with(f: impl FnOnce(&mut Config)) -> Self {
        install_ring();
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::new(dir.path().join("ws"), Auth::PublicKeyPem(ROUTER_PUB.into()));
        f(&mut config);
        let state = AppState::new(config).unwrap();
        Self { dir, state }
    }

    pub fn ws(&self) -> &Path {
        self.state.workspace.root()
    }

    pub async fn send(&self, req: Request<Body>) -> Resp {
        let resp = agentcube_picod::app(self.state.clone())
            .oneshot(req)
            .await
            .unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec();
        Resp {
            status,
            headers,
            body,
        }
    }

    pub async fn post_json(&self, path: &str, body: serde_json::Value) -> Resp {
        self.send(
            authed(Request::post(path))
                .header("content-type", "application/json")
                .body(Body::from(body.to_string()))
                .unwrap(),
        )
        .await
    }

    pub async fn get(&self, path: &str) -> Resp {
        self.send(authed(Request::get(path)).body(Body::empty()).unwrap())
            .await
    }

    pub async fn exec(&self, body: serde_json::Value) -> serde_json::Value {
        let r = self.post_json("/api/execute", body).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        r.json()
    }
}

pub fn authed(b: axum::http::request::Builder) -> axum::http::request::Builder {
    b.header("authorization", format!("Bearer {}", token()))
}

pub struct Resp {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}
