//! Ory Hydra, a real OpenID Connect provider (built by `scripts/build-oidc.sh`), as the issuer of
//! end-user tokens: in-memory storage, JWT access tokens, OAuth2 client credentials (the token's
//! `sub` is the client id, its granted scopes are in `scp`).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

pub struct Hydra {
    /// The issuer (`iss`), also the public URL.
    pub issuer: String,
    admin: String,
    child: Child,
    _dir: tempfile::TempDir,
}

fn binary() -> PathBuf {
    if let Some(p) = std::env::var_os("AGENTCUBE_HYDRA_BIN") {
        return p.into();
    }
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.cache/oidc/bin/hydra");
    assert!(
        p.exists(),
        "{} is missing: run scripts/build-oidc.sh (make test does)",
        p.display()
    );
    p
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Hydra {
    /// Starts Hydra and waits for its discovery document. Its ports are picked free just before,
    /// so another process may take one first: Hydra then exits, and is started again on others.
    pub async fn start() -> Self {
        for _ in 0..3 {
            if let Some(h) = Self::try_start().await {
                return h;
            }
        }
        panic!("hydra exited at start three times (see its log above)");
    }

    /// One start; `None` when Hydra exited before it was ready (its log printed).
    async fn try_start() -> Option<Self> {
        let (public, admin) = (free_port(), free_port());
        let issuer = format!("http://127.0.0.1:{public}");
        let dir = tempfile::tempdir().unwrap();
        let log_path = dir.path().join("hydra.log");
        let log = std::fs::File::create(&log_path).unwrap();
        let child = Command::new(binary())
            .args(["serve", "all", "--dev"])
            .current_dir(dir.path())
            .env_clear()
            .env("DSN", "memory")
            .env("SECRETS_SYSTEM", "agentcube-test-secret-0123456789")
            .env("URLS_SELF_ISSUER", &issuer)
            .env("STRATEGIES_ACCESS_TOKEN", "jwt")
            .env("SERVE_PUBLIC_HOST", "127.0.0.1")
            .env("SERVE_PUBLIC_PORT", public.to_string())
            .env("SERVE_ADMIN_HOST", "127.0.0.1")
            .env("SERVE_ADMIN_PORT", admin.to_string())
            .env("LOG_LEVEL", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut h = Self {
            issuer,
            admin: format!("http://127.0.0.1:{admin}"),
            child,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        let discovery = format!("{}/.well-known/openid-configuration", h.issuer);
        let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
        loop {
            if let Ok(r) = reqwest::get(&discovery).await
                && r.status().is_success()
                && reqwest::get(format!("{}/health/ready", h.admin))
                    .await
                    .is_ok_and(|r| r.status().is_success())
            {
                return Some(h);
            }
            if let Ok(Some(status)) = h.child.try_wait() {
                eprintln!("hydra exited at start ({status}):\n{}", log());
                return None;
            }
            assert!(
                Instant::now() < deadline,
                "hydra did not start in 60 s:\n{}",
                log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Registers a client-credentials client allowed `scopes` and `audiences`, whose tokens live
    /// `lifespan` (e.g. `1h`, `2s`).
    pub async fn client(&self, id: &str, scopes: &str, audiences: &[&str], lifespan: &str) {
        let r = reqwest::Client::new()
            .post(format!("{}/admin/clients", self.admin))
            .json(&json!({
                "client_id": id, "client_secret": format!("{id}-secret-0123456789"),
                "grant_types": ["client_credentials"], "scope": scopes, "audience": audiences,
                "token_endpoint_auth_method": "client_secret_post",
                "client_credentials_grant_access_token_lifespan": lifespan,
            }))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{}", r.text().await.unwrap());
    }

    /// A JWT access token for a client (client credentials).
    pub async fn token(&self, id: &str, scope: &str, audience: &str) -> String {
        let secret = format!("{id}-secret-0123456789");
        let form = [
            ("grant_type", "client_credentials"),
            ("client_id", id),
            ("client_secret", secret.as_str()),
            ("scope", scope),
            ("audience", audience),
        ];
        let r = reqwest::Client::new()
            .post(self.token_url())
            .form(&form)
            .send()
            .await
            .unwrap();
        let status = r.status();
        let v: Value = r.json().await.unwrap();
        assert!(status.is_success(), "{v}");
        v["access_token"].as_str().unwrap().to_string()
    }

    pub fn token_url(&self) -> String {
        format!("{}/oauth2/token", self.issuer)
    }

    /// Rotates the access-token signing key (a new key in the JWKS signs from now on).
    pub async fn rotate_keys(&self) {
        let r = reqwest::Client::new()
            .post(format!("{}/admin/keys/hydra.jwt.access-token", self.admin))
            .json(&json!({"alg": "RS256", "use": "sig"}))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{}", r.text().await.unwrap());
    }
}

impl Drop for Hydra {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `kid` of a JWT's header.
pub fn kid(token: &str) -> String {
    jsonwebtoken::decode_header(token).unwrap().kid.unwrap()
}
