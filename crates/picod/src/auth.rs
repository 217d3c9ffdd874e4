//! RS256 verification of the Router's token, with a cache so a repeated token costs one hash.
//!
//! Upstream semantics (spec §5.3): `Authorization` must be exactly `Bearer <token>`; RSA PKCS#1 v1.5
//! algorithms only (RS256/384/512), `exp` required, `iat` checked, 60 s leeway; `iss` and
//! `session_id` are not checked. `alg: none` and HMAC tokens are refused because only RSA algorithms
//! are accepted for an RSA key.
//!
//! Beyond upstream: when PicoD knows its own sandbox identity (`--sandbox-name` /
//! `PICOD_SANDBOX_NAME`, given by the Workload Manager), a token must name it in `aud`, so a token
//! captured in one sandbox (every AgentRuntime receives the Router's tokens) opens no other.

use std::collections::HashMap;
use std::sync::Mutex;

use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::Response;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use sha2::{Digest, Sha256};

use crate::error::ApiError;
use crate::server::AppState;

/// Clock skew tolerated on `exp` and `iat`, as upstream.
pub const LEEWAY_SECS: i64 = 60;

/// Verifies Router tokens against one RSA public key and remembers the ones it already accepted.
pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
    cache: Mutex<TokenCache>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier").finish_non_exhaustive()
    }
}

/// Why a public key could not be loaded.
#[derive(Debug, thiserror::Error)]
#[error("PICOD_AUTH_PUBLIC_KEY is not a PEM RSA public key: {0}")]
pub struct KeyError(String);

impl Verifier {
    /// Builds a verifier from a PEM `PUBLIC KEY` (SPKI) or `RSA PUBLIC KEY` (PKCS#1). With
    /// `audience`, tokens must carry it in `aud` (this sandbox's identity).
    pub fn from_pem(
        pem: &str,
        cache_capacity: usize,
        audience: Option<&str>,
    ) -> Result<Self, KeyError> {
        if !pem.contains("-----BEGIN") {
            return Err(KeyError("no PEM header found".into()));
        }
        let key = DecodingKey::from_rsa_pem(pem.as_bytes()).map_err(|e| KeyError(e.to_string()))?;
        crate::ring_rsa::check_key(&key).map_err(KeyError)?;
        let mut validation = Validation::new(Algorithm::RS256);
        validation.algorithms = vec![Algorithm::RS256, Algorithm::RS384, Algorithm::RS512];
        validation.leeway = LEEWAY_SECS as u64;
        match audience {
            Some(aud) => {
                validation.set_audience(&[aud]);
                validation.set_required_spec_claims(&["exp", "aud"]);
            }
            None => {
                validation.validate_aud = false;
                validation.set_required_spec_claims(&["exp"]);
            }
        }
        validation.validate_exp = true;
        Ok(Self {
            key,
            validation,
            cache: Mutex::new(TokenCache::new(cache_capacity)),
        })
    }

    /// True when `token` is in the cache of already-verified tokens and not expired.
    pub fn is_cached(&self, token: &str, now: i64) -> bool {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        self.cache.lock().unwrap().contains(&digest, now)
    }

    /// Checks one bearer token. A token accepted before is accepted again without RSA work until
    /// its `exp` (plus leeway) passes.
    pub fn verify(&self, token: &str, now: i64) -> Result<(), ApiError> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if self.cache.lock().unwrap().contains(&digest, now) {
            return Ok(());
        }
        let data = jsonwebtoken::decode::<serde_json::Value>(token, &self.key, &self.validation)
            .map_err(|e| {
                use jsonwebtoken::errors::ErrorKind;
                ApiError::InvalidToken(match e.kind() {
                    ErrorKind::InvalidAudience => "token is for another sandbox".into(),
                    ErrorKind::MissingRequiredClaim(c) if c == "aud" => {
                        "token names no sandbox (aud), and this sandbox requires it".into()
                    }
                    _ => e.to_string(),
                })
            })?;
        let claims = data.claims;
        let exp = claims.get("exp").and_then(serde_json::Value::as_i64);
        let exp = exp.ok_or_else(|| ApiError::InvalidToken("token has no numeric exp".into()))?;
        match claims.get("iat") {
            None => {}
            Some(iat) => {
                let iat = iat
                    .as_i64()
                    .ok_or_else(|| ApiError::InvalidToken("iat is not a number".into()))?;
                if iat > now + LEEWAY_SECS {
                    return Err(ApiError::InvalidToken("token used before issued".into()));
                }
            }
        }
        self.cache.lock().unwrap().insert(digest, exp, now);
        Ok(())
    }
}

/// Bounded map from token digest to expiry. When full, expired entries go first; if nothing has
/// expired, the whole map is dropped (a cache miss only costs one RSA verify).
struct TokenCache {
    entries: HashMap<[u8; 32], i64>,
    capacity: usize,
}

impl TokenCache {
    fn new(capacity: usize) -> Self {
        Self {
            entries: HashMap::new(),
            capacity,
        }
    }

    fn contains(&self, digest: &[u8; 32], now: i64) -> bool {
        self.entries
            .get(digest)
            .is_some_and(|exp| now <= exp + LEEWAY_SECS)
    }

    fn insert(&mut self, digest: [u8; 32], exp: i64, now: i64) {
        if self.capacity == 0 {
            return;
        }
        if self.entries.len() >= self.capacity {
            self.entries.retain(|_, e| now <= *e + LEEWAY_SECS);
            if self.entries.len() >= self.capacity {
                self.entries.clear();
            }
        }
        self.entries.insert(digest, exp);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.len()
    }
}

/// Extracts the token from `Authorization: Bearer <token>` the way upstream does.
fn bearer(header: Option<&str>) -> Result<&str, ApiError> {
    let header = header.ok_or(ApiError::MissingAuth)?;
    if header.is_empty() {
        return Err(ApiError::MissingAuth);
    }
    let mut parts = header.split(' ');
    match (parts.next(), parts.next(), parts.next()) {
        (Some("Bearer"), Some(token), None) => Ok(token),
        _ => Err(ApiError::BadAuthFormat),
    }
}

/// Middleware guarding `/api/*`. A no-op when auth is disabled by configuration.
pub async fn require_token(
    State(state): State<AppState>,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    if let Some(verifier) = &state.verifier {
        let header = req.headers().get(AUTHORIZATION).map(|v| v.to_str());
        let header = match header {
            Some(Ok(v)) => Some(v),
            Some(Err(_)) => return Err(ApiError::BadAuthFormat),
            None => None,
        };
        let token = bearer(header)?;
        verifier.verify(token, jiff::Timestamp::now().as_second())?;
    }
    Ok(next.run(req).await)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_parsing_matches_upstream() {
        assert!(matches!(bearer(None), Err(ApiError::MissingAuth)));
        assert!(matches!(bearer(Some("")), Err(ApiError::MissingAuth)));
        assert!(matches!(
            bearer(Some("Basic abc")),
            Err(ApiError::BadAuthFormat)
        ));
        assert!(matches!(
            bearer(Some("bearer abc")),
            Err(ApiError::BadAuthFormat)
        ));
        assert!(matches!(
            bearer(Some("Bearer a b")),
            Err(ApiError::BadAuthFormat)
        ));
        assert!(matches!(
            bearer(Some("Bearer")),
            Err(ApiError::BadAuthFormat)
        ));
        assert_eq!(bearer(Some("Bearer abc")).unwrap(), "abc");
    }

    #[test]
    fn cache_is_bounded_and_honours_expiry() {
        let mut c = TokenCache::new(2);
        c.insert([1; 32], 100, 0);
        c.insert([2; 32], 100, 0);
        assert!(c.contains(&[1; 32], 50));
        assert!(!c.contains(&[1; 32], 100 + LEEWAY_SECS + 1));
        c.insert([3; 32], 100, 0);
        assert!(c.len() <= 2);
        assert!(c.contains(&[3; 32], 0));
        // Expired entries are evicted first.
        let mut c = TokenCache::new(2);
        c.insert([1; 32], 10, 0);
        c.insert([2; 32], 1000, 0);
        c.insert([3; 32], 1000, 500);
        assert!(c.contains(&[2; 32], 500) && c.contains(&[3; 32], 500));
    }
}
