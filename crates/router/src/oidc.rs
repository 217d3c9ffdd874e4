//! End-user authentication at the Router (spec §1.9): OIDC bearer tokens verified against the
//! issuer's published keys, a required role, and the caller's identity for session ownership.
//!
//! Flow: [`Oidc::discover`] reads `{issuer}/.well-known/openid-configuration` and the JWKS once at
//! start (an unreachable issuer stops the Router, as upstream). [`Oidc::authenticate`] parses
//! `Authorization: Bearer`, answers from the verified-token cache when it can (a hash lookup:
//! the hot path does no signature check for a token it has seen), else verifies the signature
//! with the key named by `kid` (an unknown `kid` refetches the JWKS, at most once per
//! [`REFETCH_EVERY`]: the issuer rotated its keys), then `iss`, `aud`, `exp`/`nbf` with leeway,
//! `sub`, and reads the roles.
//!
//! The static-token mode of `agentcube up` ([`Authn::Token`]) shares the seam: one bearer token,
//! whose holder is an administrator.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};

use crate::error::RouterError;

/// The role that bypasses session ownership (upstream: literally `admin`).
pub const ADMIN_ROLE: &str = "admin";
/// An unknown `kid` refetches the JWKS at most this often.
pub const REFETCH_EVERY: Duration = Duration::from_secs(5);
/// The JWKS is refetched when older than this, on the next verification.
const MAX_KEYS_AGE: Duration = Duration::from_secs(600);
/// Verified tokens remembered (each until it expires).
const VERIFIED_CAPACITY: usize = 10_000;

/// `--jwt-*` settings.
#[derive(Debug, Clone)]
pub struct OidcConfig {
    /// Issuer URL; must equal the tokens' `iss` exactly.
    pub issuer: String,
    /// Required `aud` entry; empty skips the check.
    pub audience: String,
    /// Dot path to the roles array (`realm_access.roles`, `groups`, `scp`).
    pub role_claim: String,
    /// Role every `/v1` request needs.
    pub required_role: String,
    /// Clock skew allowed on `exp` and `nbf` (upstream: 30 s).
    pub leeway: Duration,
}

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub sub: String,
    pub email: Option<String>,
    pub roles: Vec<String>,
}

impl Caller {
    /// Administrators may use any session.
    pub fn is_admin(&self) -> bool {
        self.roles.iter().any(|r| r == ADMIN_ROLE)
    }
}

/// How the Router authenticates end users.
#[derive(Debug)]
pub enum Authn {
    /// OIDC bearer tokens.
    Oidc(Box<Oidc>),
    /// One static bearer token (`agentcube up` on a non-loopback address); its holder is an
    /// administrator named `local`.
    Token(String),
}

impl Authn {
    /// The caller of a request with this (first) `Authorization` value, or the 401/403 to
    /// answer.
    pub async fn authenticate(
        &self,
        authorization: Option<&[u8]>,
    ) -> Result<Arc<Caller>, RouterError> {
        let token = bearer(authorization)?;
        match self {
            Self::Oidc(o) => o.authenticate(token).await,
            Self::Token(want) => {
                if agentcube_types::claims::constant_time_eq(token.as_bytes(), want.as_bytes()) {
                    Ok(Arc::new(Caller {
                        sub: "local".into(),
                        email: None,
                        roles: vec![ADMIN_ROLE.into()],
                    }))
                } else {
                    Err(RouterError::Unauthorized("invalid or expired token"))
                }
            }
        }
    }
}

/// `Authorization: <scheme> <token>`, split on the first space, scheme case-insensitive.
fn bearer(authorization: Option<&[u8]>) -> Result<&str, RouterError> {
    let v = authorization.ok_or(RouterError::Unauthorized("missing authorization header"))?;
    let v = crate::h1::visible(v).ok_or(RouterError::Unauthorized(
        "invalid authorization header format",
    ))?;
    let (scheme, token) = v.split_once(' ').ok_or(RouterError::Unauthorized(
        "invalid authorization header format",
    ))?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(RouterError::Unauthorized(
            "invalid authorization header format",
        ));
    }
    let token = token.trim();
    if token.is_empty() {
        return Err(RouterError::Unauthorized("empty bearer token"));
    }
    Ok(token)
}

struct Keys {
    by_kid: HashMap<String, DecodingKey>,
    /// Keys without a `kid`, tried in order for tokens without one.
    unnamed: Vec<DecodingKey>,
    fetched: Instant,
}

/// An OIDC issuer's keys and the tokens verified against them.
pub struct Oidc {
    config: OidcConfig,
    http: reqwest::Client,
    jwks_uri: String,
    keys: RwLock<Keys>,
    /// Serialises refetches and remembers when the last one was.
    refetch: tokio::sync::Mutex<Instant>,
    verified: Mutex<HashMap<String, (Arc<Caller>, i64)>>,
}

impl std::fmt::Debug for Oidc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Oidc")
            .field("issuer", &self.config.issuer)
            .field("jwks_uri", &self.jwks_uri)
            .finish_non_exhaustive()
    }
}

/// The fields of the discovery document we use.
#[derive(serde::Deserialize)]
struct Discovery {
    issuer: String,
    jwks_uri: String,
}

/// Upstream's asymmetric algorithms (ES512 is not offered by `jsonwebtoken`; HMAC never).
const ALGORITHMS: [Algorithm; 9] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::EdDSA,
];

impl Oidc {
    /// Discovery and the first JWKS fetch; any failure is an error naming the URL.
    pub async fn discover(config: OidcConfig) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()?;
        let base = config.issuer.trim_end_matches('/');
        let url = format!("{base}/.well-known/openid-configuration");
        let doc: Discovery = fetch_json(&http, &url).await?;
        anyhow::ensure!(
            doc.issuer == config.issuer,
            "OIDC discovery at {url} names issuer {:?}, not {:?} (--jwt-issuer-url must match exactly)",
            doc.issuer,
            config.issuer
        );
        let keys = fetch_keys(&http, &doc.jwks_uri).await?;
        tracing::info!(issuer = %config.issuer, jwks_uri = %doc.jwks_uri, keys = keys.by_kid.len() + keys.unnamed.len(), "OIDC issuer discovered");
        Ok(Self {
            config,
            http,
            jwks_uri: doc.jwks_uri,
            keys: RwLock::new(keys),
            // The first unknown `kid` may refetch at once.
            refetch: tokio::sync::Mutex::new(
                Instant::now()
                    .checked_sub(REFETCH_EVERY)
                    .unwrap_or_else(Instant::now),
            ),
            verified: Mutex::new(HashMap::new()),
        })
    }

    /// Verifies a bearer token (or finds it verified) and checks the required role.
    pub async fn authenticate(&self, token: &str) -> Result<Arc<Caller>, RouterError> {
        let now = jiff::Timestamp::now().as_second();
        let leeway = self.config.leeway.as_secs() as i64;
        let cached = self.verified.lock().unwrap().get(token).cloned();
        let caller = match cached {
            Some((caller, exp)) if now <= exp + leeway => caller,
            _ => {
                let (caller, exp) = self.verify(token).await?;
                let caller = Arc::new(caller);
                let mut v = self.verified.lock().unwrap();
                if v.len() >= VERIFIED_CAPACITY {
                    v.retain(|_, (_, e)| now <= *e + leeway);
                    if v.len() >= VERIFIED_CAPACITY {
                        v.clear();
                    }
                }
                v.insert(token.to_string(), (caller.clone(), exp));
                caller
            }
        };
        let role = &self.config.required_role;
        if !role.is_empty() && !caller.roles.iter().any(|r| r == role) {
            return Err(RouterError::Forbidden(format!(
                "insufficient permissions: missing role {role}"
            )));
        }
        Ok(caller)
    }

    async fn verify(&self, token: &str) -> Result<(Caller, i64), RouterError> {
        let invalid = |why: &dyn std::fmt::Display| {
            tracing::debug!(reason = %why, "bearer token refused");
            RouterError::Unauthorized("invalid or expired token")
        };
        if token.split('.').count() != 3 {
            return Err(invalid(&"not a JWT"));
        }
        let header = jsonwebtoken::decode_header(token).map_err(|e| invalid(&e))?;
        if !ALGORITHMS.contains(&header.alg) {
            return Err(invalid(&format!("algorithm {:?} not allowed", header.alg)));
        }
        let mut validation = Validation::new(header.alg);
        validation.leeway = self.config.leeway.as_secs();
        validation.validate_nbf = true;
        validation.set_issuer(&[&self.config.issuer]);
        if self.config.audience.is_empty() {
            validation.validate_aud = false;
        } else {
            validation.set_audience(&[&self.config.audience]);
        }
        validation.set_required_spec_claims(&["exp", "iss", "sub"]);
        let claims = self
            .with_key(header.kid.as_deref(), |key| {
                jsonwebtoken::decode::<serde_json::Value>(token, key, &validation)
            })
            .await
            .map_err(|e| invalid(&e))?
            .claims;
        let sub = claims["sub"]
            .as_str()
            .filter(|s| !s.is_empty())
            .ok_or_else(|| invalid(&"no sub"))?;
        let exp = claims["exp"].as_i64().ok_or_else(|| invalid(&"no exp"))?;
        Ok((
            Caller {
                sub: sub.to_string(),
                email: claims["email"].as_str().map(str::to_string),
                roles: roles(&claims, &self.config.role_claim),
            },
            exp,
        ))
    }

    /// Runs `check` with the key for `kid` (every unnamed key when there is no `kid`), fetching
    /// the JWKS again when the key is unknown or the set is old.
    async fn with_key<T>(
        &self,
        kid: Option<&str>,
        check: impl Fn(&DecodingKey) -> jsonwebtoken::errors::Result<T>,
    ) -> Result<T, String> {
        for attempt in 0..2 {
            let stale = self.keys.read().unwrap().fetched.elapsed() > MAX_KEYS_AGE;
            if attempt == 1 || stale {
                self.refetch_keys().await;
            }
            let keys = self.keys.read().unwrap();
            let candidates: Vec<&DecodingKey> = match kid {
                Some(k) => keys.by_kid.get(k).into_iter().collect(),
                None => keys.unnamed.iter().chain(keys.by_kid.values()).collect(),
            };
            let mut last = None;
            for key in candidates {
                match check(key) {
                    Ok(v) => return Ok(v),
                    Err(e) => last = Some(e.to_string()),
                }
            }
            if let Some(e) = last {
                // A known key that refuses the token: a bad token, not a rotation.
                return Err(e);
            }
        }
        Err(format!("no key {kid:?} at the issuer"))
    }

    async fn refetch_keys(&self) {
        let mut last = self.refetch.lock().await;
        if last.elapsed() < REFETCH_EVERY {
            return;
        }
        *last = Instant::now();
        match fetch_keys(&self.http, &self.jwks_uri).await {
            Ok(keys) => {
                tracing::info!(jwks_uri = %self.jwks_uri, keys = keys.by_kid.len() + keys.unnamed.len(), "OIDC keys refreshed");
                *self.keys.write().unwrap() = keys;
            }
            Err(e) => tracing::warn!(error = %e, "cannot refresh the OIDC issuer's keys"),
        }
    }
}

async fn fetch_json<T: serde::de::DeserializeOwned>(
    http: &reqwest::Client,
    url: &str,
) -> anyhow::Result<T> {
    let resp = http
        .get(url)
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("cannot reach {url}: {e}"))?;
    anyhow::ensure!(
        resp.status().is_success(),
        "{url} answered {}",
        resp.status()
    );
    resp.json()
        .await
        .map_err(|e| anyhow::anyhow!("{url} did not answer the expected JSON: {e}"))
}

async fn fetch_keys(http: &reqwest::Client, url: &str) -> anyhow::Result<Keys> {
    let set: JwkSet = fetch_json(http, url).await?;
    let mut keys = Keys {
        by_kid: HashMap::new(),
        unnamed: Vec::new(),
        fetched: Instant::now(),
    };
    for jwk in &set.keys {
        let Ok(key) = DecodingKey::from_jwk(jwk) else {
            tracing::warn!(kid = ?jwk.common.key_id, "skipping a JWKS key this Router cannot use");
            continue;
        };
        match &jwk.common.key_id {
            Some(kid) => {
                keys.by_kid.insert(kid.clone(), key);
            }
            None => keys.unnamed.push(key),
        }
    }
    anyhow::ensure!(
        !keys.by_kid.is_empty() || !keys.unnamed.is_empty(),
        "{url} has no usable keys"
    );
    Ok(keys)
}

/// The roles at a dot path; a top-level key spelled like the whole path wins (Okta `groups`,
/// claims with dots in their names). Non-strings are dropped; anything but an array is none.
pub fn roles(claims: &serde_json::Value, path: &str) -> Vec<String> {
    let value = claims
        .get(path)
        .or_else(|| path.split('.').try_fold(claims, |v, part| v.get(part)));
    value
        .and_then(|v| v.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|r| r.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn roles_follow_a_dot_path_or_a_literal_key() {
        let c = json!({"realm_access": {"roles": ["a", 1, "b"]}, "groups": ["g"],
                       "x.y": ["literal"], "x": {"y": ["nested"]}, "s": "not-an-array"});
        assert_eq!(roles(&c, "realm_access.roles"), ["a", "b"]);
        assert_eq!(roles(&c, "groups"), ["g"]);
        assert_eq!(roles(&c, "x.y"), ["literal"]);
        assert!(roles(&c, "s").is_empty());
        assert!(roles(&c, "missing.path").is_empty());
    }

    #[test]
    fn bearer_parsing_matches_upstream() {
        let h = |v: &'static str| Some(v.as_bytes());
        let msg = |r: Result<&str, RouterError>| match r {
            Err(RouterError::Unauthorized(m)) => m,
            other => panic!("{other:?}"),
        };
        assert_eq!(msg(bearer(None)), "missing authorization header");
        assert_eq!(
            msg(bearer(h("Basic abc"))),
            "invalid authorization header format"
        );
        assert_eq!(
            msg(bearer(h("Bearer"))),
            "invalid authorization header format"
        );
        assert_eq!(msg(bearer(h("Bearer  "))), "empty bearer token");
        assert_eq!(bearer(h("bearer abc")).unwrap(), "abc");
        assert_eq!(bearer(h("BEARER abc")).unwrap(), "abc");
        assert_eq!(
            msg(bearer(Some(b"Bearer \xffabc"))),
            "invalid authorization header format",
            "not visible ASCII"
        );
    }
}
