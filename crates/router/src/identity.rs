//! The Router's RSA-2048 identity and the per-session token cache.
//!
//! Keys: generated in memory, or kept in a directory as `private.pem` (PKCS#1 `RSA PRIVATE KEY`)
//! and `public.pem` (SPKI `PUBLIC KEY`) — the same file names and formats as upstream's Secret
//! `picod-router-identity`. Key generation happens at start, never on a request.
//!
//! Tokens: claims `iss=agentcube-router`, `iat`, `exp=iat+300`, `session_id` (spec §1.8). One token
//! per session is cached and re-signed once it is half-way to expiry, so the hot path does no RSA.

use foldhash::HashMap;
use std::path::Path;
use std::sync::Mutex;

use agentcube_types::claims::{ROUTER_ISSUER, SANDBOX_TOKEN_TTL_SECS, SandboxClaims};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use rsa::pkcs1::{DecodeRsaPrivateKey, EncodeRsaPrivateKey};
use rsa::pkcs8::{EncodePublicKey, LineEnding};

/// Why an identity could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot read or write {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid RSA private key: {0}")]
    Key(String),
}

/// An RSA key pair in PEM.
#[derive(Clone)]
pub struct KeyPair {
    /// PKCS#1 `RSA PRIVATE KEY`.
    pub private_pem: String,
    /// SPKI `PUBLIC KEY` (what sandboxes get as `PICOD_AUTH_PUBLIC_KEY`).
    pub public_pem: String,
}

impl std::fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyPair").finish_non_exhaustive()
    }
}

impl KeyPair {
    /// A fresh RSA-2048 pair.
    pub fn generate() -> Result<Self, IdentityError> {
        let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048)
            .map_err(|e| IdentityError::Key(e.to_string()))?;
        Self::from_private(key)
    }

    fn from_private(key: rsa::RsaPrivateKey) -> Result<Self, IdentityError> {
        let private_pem = key
            .to_pkcs1_pem(LineEnding::LF)
            .map_err(|e| IdentityError::Key(e.to_string()))?
            .to_string();
        let public_pem = key
            .to_public_key()
            .to_public_key_pem(LineEnding::LF)
            .map_err(|e| IdentityError::Key(e.to_string()))?;
        Ok(Self {
            private_pem,
            public_pem,
        })
    }

    /// The SPKI public key of the pair kept in `dir`: `public.pem` if present, else derived from
    /// `private.pem`. Used by the Workload Manager to learn what sandboxes must trust.
    pub fn public_from_dir(dir: &Path) -> Result<String, IdentityError> {
        let read = |name: &str| std::fs::read_to_string(dir.join(name));
        if let Ok(p) = read("public.pem") {
            return Ok(p);
        }
        let pem = read("private.pem").map_err(|e| IdentityError::Io {
            path: dir.join("private.pem").display().to_string(),
            source: e,
        })?;
        Ok(Self::from_private_pem(&pem)?.public_pem)
    }

    /// Parses a PKCS#1 private key and derives the public key from it.
    pub fn from_private_pem(pem: &str) -> Result<Self, IdentityError> {
        let key = rsa::RsaPrivateKey::from_pkcs1_pem(pem)
            .map_err(|e| IdentityError::Key(e.to_string()))?;
        Self::from_private(key)
    }

    /// Loads `dir/private.pem`, or creates the directory and a new pair (also writing
    /// `public.pem` for the Workload Manager) on first start.
    pub fn load_or_create(dir: &Path) -> Result<Self, IdentityError> {
        let io = |path: &Path, source| IdentityError::Io {
            path: path.display().to_string(),
            source,
        };
        let private = dir.join("private.pem");
        match std::fs::read_to_string(&private) {
            Ok(pem) => {
                let pair = Self::from_private_pem(&pem)?;
                let public = dir.join("public.pem");
                if std::fs::read_to_string(&public).ok().as_deref() != Some(&pair.public_pem)
                    && let Err(e) = std::fs::write(&public, &pair.public_pem)
                {
                    // A read-only mount (the chart's Secret) is fine: the key is derived anyway.
                    tracing::debug!(path = %public.display(), error = %e, "public.pem not written");
                }
                Ok(pair)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
                let pair = Self::generate()?;
                write_private(&private, &pair.private_pem).map_err(|e| io(&private, e))?;
                let public = dir.join("public.pem");
                std::fs::write(&public, &pair.public_pem).map_err(|e| io(&public, e))?;
                Ok(pair)
            }
            Err(e) => Err(io(&private, e)),
        }
    }
}

/// Name of the Secret holding the Router identity in a cluster (upstream's).
pub const SECRET_NAME: &str = agentcube_crds::labels::IDENTITY_SECRET;

/// In a cluster: create Secret `picod-router-identity` with a fresh pair, or, if another replica
/// won the race (409), load its `private.pem` (PKCS#1). Every replica ends up with one key.
pub async fn load_or_create_secret(
    client: kube::Client,
    namespace: &str,
) -> Result<KeyPair, IdentityError> {
    use k8s_openapi::api::core::v1::Secret;
    use kube::api::{Api, PostParams};
    let api: Api<Secret> = Api::namespaced(client, namespace);
    let fresh = KeyPair::generate()?;
    let secret: Secret = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": SECRET_NAME,
            "labels": {"app": "agentcube", "component": "router"},
        },
        "stringData": {"private.pem": fresh.private_pem, "public.pem": fresh.public_pem},
    }))
    .map_err(|e| IdentityError::Key(e.to_string()))?;
    let kube_err = |e: kube::Error| {
        let e = match agentcube_crds::client::is_timeout(&e) {
            true => "the Kubernetes API did not answer in time".to_string(),
            false => e.to_string(),
        };
        IdentityError::Key(format!("Secret {namespace}/{SECRET_NAME}: {e}"))
    };
    match api.create(&PostParams::default(), &secret).await {
        Ok(_) => Ok(fresh),
        Err(kube::Error::Api(e)) if e.code == 409 => {
            let existing = api.get(SECRET_NAME).await.map_err(kube_err)?;
            let pem = existing
                .data
                .as_ref()
                .and_then(|d| d.get("private.pem"))
                .map(|b| String::from_utf8_lossy(&b.0).into_owned())
                .or_else(|| {
                    existing
                        .string_data
                        .as_ref()
                        .and_then(|d| d.get("private.pem").cloned())
                })
                .ok_or_else(|| {
                    IdentityError::Key(format!("Secret {SECRET_NAME} has no private.pem"))
                })?;
            KeyPair::from_private_pem(&pem)
        }
        Err(e) => Err(kube_err(e)),
    }
}

fn write_private(path: &Path, pem: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(pem.as_bytes())
}

#[derive(Clone)]
struct Cached {
    token: std::sync::Arc<str>,
    header: http::HeaderValue,
    iat: i64,
}

/// Signs sandbox tokens, one cached token per session (and per user, with OIDC). An entry is
/// replaced when its token is half-way to expiry; a deleted session's entry is never used again
/// (its session is unknown from then on) and goes when the cache is full (expired ones first).
///
/// RS256 with ring and the key parsed once: jsonwebtoken's RustCrypto provider parses the key
/// again for every token (~1.3 ms a token, on the first request of every session). Tokens are the
/// standard compact form, verified by jsonwebtoken in PicoD and the tests.
pub struct Signer {
    key: ring::signature::RsaKeyPair,
    rng: ring::rand::SystemRandom,
    cache: Mutex<HashMap<String, Cached>>,
    signatures: prometheus_client::metrics::counter::Counter,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer").finish_non_exhaustive()
    }
}

/// Re-sign once a cached token is this old (half its lifetime).
const REFRESH_AFTER_SECS: i64 = SANDBOX_TOKEN_TTL_SECS / 2;
/// Cache bound; expired entries go first, then everything.
const CACHE_CAPACITY: usize = 100_000;

impl Signer {
    /// A signer for a key pair, counting signatures in `signatures`.
    pub fn new(
        pair: &KeyPair,
        signatures: prometheus_client::metrics::counter::Counter,
    ) -> Result<Self, IdentityError> {
        let bad = |e: &dyn std::fmt::Display| IdentityError::Key(e.to_string());
        let der = rsa::RsaPrivateKey::from_pkcs1_pem(&pair.private_pem)
            .map_err(|e| bad(&e))?
            .to_pkcs1_der()
            .map_err(|e| bad(&e))?;
        let key = ring::signature::RsaKeyPair::from_der(der.as_bytes()).map_err(|e| bad(&e))?;
        Ok(Self {
            key,
            rng: ring::rand::SystemRandom::new(),
            cache: Mutex::new(HashMap::default()),
            signatures,
        })
    }

    /// The token for `session_id` at time `now` (Unix seconds), bound to the sandbox `audience`
    /// when the session names one: cached while fresh. A session's sandbox never changes, so the
    /// cache is keyed by session alone.
    pub fn token(
        &self,
        session_id: &str,
        audience: Option<&str>,
        now: i64,
    ) -> Result<std::sync::Arc<str>, jsonwebtoken::errors::Error> {
        self.cached(session_id, audience, None, now)
            .map(|c| c.token)
    }

    /// `Bearer <token>` as a header value, built once per token (the hot path's form). With an
    /// authenticated `user`, the token also names them (`user_sub`, `user_email`, as upstream)
    /// and is cached per session and user.
    pub fn authorization(
        &self,
        session_id: &str,
        audience: Option<&str>,
        user: Option<&crate::oidc::Caller>,
        now: i64,
    ) -> Result<http::HeaderValue, jsonwebtoken::errors::Error> {
        self.cached(session_id, audience, user, now)
            .map(|c| c.header)
    }

    fn cached(
        &self,
        session_id: &str,
        audience: Option<&str>,
        user: Option<&crate::oidc::Caller>,
        now: i64,
    ) -> Result<Cached, jsonwebtoken::errors::Error> {
        let keyed;
        let key = match user {
            None => session_id,
            Some(u) => {
                keyed = format!("{session_id}\0{}", u.sub);
                &keyed
            }
        };
        if let Some(c) = self.cache.lock().unwrap().get(key)
            && now - c.iat < REFRESH_AFTER_SECS
            && now >= c.iat
        {
            return Ok(c.clone());
        }
        let claims = SandboxClaims {
            iss: ROUTER_ISSUER.into(),
            iat: now,
            exp: now + SANDBOX_TOKEN_TTL_SECS,
            session_id: session_id.to_string(),
            aud: audience.map(str::to_string),
            user_sub: user.map(|u| u.sub.clone()),
            user_email: user.and_then(|u| u.email.clone()),
        };
        let token: std::sync::Arc<str> = self.sign(&claims)?.into();
        // A JWT is base64url and dots: always a valid header value.
        let header = http::HeaderValue::try_from(format!("Bearer {token}"))
            .map_err(|_| jsonwebtoken::errors::ErrorKind::InvalidToken)?;
        let entry = Cached {
            token,
            header,
            iat: now,
        };
        let mut cache = self.cache.lock().unwrap();
        if cache.len() >= CACHE_CAPACITY {
            cache.retain(|_, c| now - c.iat < REFRESH_AFTER_SECS);
            if cache.len() >= CACHE_CAPACITY {
                cache.clear();
            }
        }
        cache.insert(key.to_string(), entry.clone());
        Ok(entry)
    }

    /// The `X-AgentCube-User-Identity` token for the Workload Manager (spec §1.8): the
    /// authenticated user, `aud: workloadmanager`, 5 minutes. Signed per create, never cached.
    pub fn identity_token(
        &self,
        user: &crate::oidc::Caller,
        now: i64,
    ) -> Result<String, jsonwebtoken::errors::Error> {
        let mut claims = serde_json::json!({
            "iss": ROUTER_ISSUER, "iat": now, "exp": now + SANDBOX_TOKEN_TTL_SECS,
            "sub": user.sub, "aud": agentcube_types::claims::IDENTITY_AUDIENCE,
        });
        if let Some(e) = &user.email {
            claims["email"] = e.clone().into();
        }
        self.sign(&claims)
    }

    /// `claims` as an RS256 JWT: base64url(header).base64url(claims).base64url(signature).
    fn sign(&self, claims: &impl serde::Serialize) -> Result<String, jsonwebtoken::errors::Error> {
        const HEADER: &str = r#"{"typ":"JWT","alg":"RS256"}"#;
        let mut jwt = B64.encode(HEADER);
        jwt.push('.');
        B64.encode_string(serde_json::to_vec(claims)?, &mut jwt);
        let mut signature = vec![0; self.key.public().modulus_len()];
        self.key
            .sign(
                &ring::signature::RSA_PKCS1_SHA256,
                &self.rng,
                jwt.as_bytes(),
                &mut signature,
            )
            .map_err(|_| jsonwebtoken::errors::ErrorKind::RsaFailedSigning)?;
        jwt.push('.');
        B64.encode_string(signature, &mut jwt);
        self.signatures.inc();
        Ok(jwt)
    }

    /// RSA signatures made so far.
    pub fn signatures(&self) -> u64 {
        self.signatures.get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_in_upstream_formats() {
        let dir = tempfile::tempdir().unwrap();
        let a = KeyPair::load_or_create(&dir.path().join("id")).unwrap();
        assert!(a.private_pem.starts_with("-----BEGIN RSA PRIVATE KEY-----"));
        assert!(a.public_pem.starts_with("-----BEGIN PUBLIC KEY-----"));
        let b = KeyPair::load_or_create(&dir.path().join("id")).unwrap();
        assert_eq!(
            a.public_pem, b.public_pem,
            "second start loads the same key"
        );
        let on_disk = std::fs::read_to_string(dir.path().join("id/public.pem")).unwrap();
        assert_eq!(on_disk, a.public_pem);
    }

    #[test]
    fn tokens_are_cached_and_refreshed_half_way() {
        let pair = KeyPair::generate().unwrap();
        let s = Signer::new(&pair, Default::default()).unwrap();
        let t1 = s.token("s1", Some("ci-1"), 1000).unwrap();
        let t2 = s.token("s1", Some("ci-1"), 1100).unwrap();
        assert_eq!(t1, t2);
        assert_eq!(s.signatures(), 1);
        let t3 = s
            .token("s1", Some("ci-1"), 1000 + REFRESH_AFTER_SECS)
            .unwrap();
        assert_ne!(t1, t3);
        assert_eq!(s.signatures(), 2);
        let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
        v.validate_exp = false;
        v.set_audience(&["ci-1"]);
        let key = jsonwebtoken::DecodingKey::from_rsa_pem(pair.public_pem.as_bytes()).unwrap();
        let claims: SandboxClaims = jsonwebtoken::decode(t3.as_bytes(), &key, &v)
            .unwrap()
            .claims;
        assert_eq!(claims.iss, "agentcube-router");
        assert_eq!(claims.exp - claims.iat, 300);
        assert_eq!(claims.session_id, "s1");
        assert_eq!(claims.aud.as_deref(), Some("ci-1"));
        let header = jsonwebtoken::decode_header(t3.as_ref()).unwrap();
        assert_eq!(header.alg, jsonwebtoken::Algorithm::RS256);
        assert_eq!(header.typ.as_deref(), Some("JWT"));
        // Another key's verifier refuses it.
        let other = KeyPair::generate().unwrap();
        let key = jsonwebtoken::DecodingKey::from_rsa_pem(other.public_pem.as_bytes()).unwrap();
        assert!(jsonwebtoken::decode::<SandboxClaims>(t3.as_bytes(), &key, &v).is_err());
    }
}
