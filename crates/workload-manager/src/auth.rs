//! Who calls the Workload Manager, and whose sessions they may see.
//!
//! Two independent inputs, as upstream (spec §2.3, §2.9):
//! - the **caller** (`Authorization: Bearer`), with `--enable-auth`: a Kubernetes ServiceAccount
//!   token checked by TokenReview (answers cached 5 minutes, refusals too), whose
//!   `system:serviceaccount:<ns>:<sa>` name is recorded as the session's `createdBy`; or, for
//!   `agentcube up` on a non-loopback address, one static token whose holder is an administrator.
//!   Reads and deletes are then allowed only on sessions the caller created (others' ids are 404,
//!   never 403: no enumeration), unless the caller is in the admin group.
//! - the **end user** (`X-AgentCube-User-Identity`), a Router-signed token naming the OIDC user
//!   the Router authenticated; it becomes the session's `ownerId`, which the Router enforces.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use agentcube_types::claims::{IDENTITY_AUDIENCE, ROUTER_ISSUER};
use sha2::{Digest, Sha256};

use crate::error::ApiError;

/// How long a TokenReview answer (allowed or refused) is reused.
pub const REVIEW_TTL: Duration = Duration::from_secs(300);
/// Reviewed tokens remembered.
const REVIEW_CAPACITY: usize = 1000;

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// `system:serviceaccount:<ns>:<sa>`, or `local` for the static token.
    pub name: String,
    /// May read and delete every session.
    pub admin: bool,
}

/// How callers are authenticated.
pub enum CallerAuth {
    /// Everyone may do everything (upstream's default).
    Off,
    /// One static bearer token; its holder is the administrator `local`.
    Token(String),
    /// Kubernetes TokenReview; members of `admin_group` are administrators.
    TokenReview(TokenReviewer),
}

impl std::fmt::Debug for CallerAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Off => "Off",
            Self::Token(_) => "Token",
            Self::TokenReview(_) => "TokenReview",
        })
    }
}

impl CallerAuth {
    /// The caller of a request (`None` when authentication is off), or the 401 to answer.
    pub async fn authenticate(
        &self,
        headers: &http::HeaderMap,
    ) -> Result<Option<Caller>, ApiError> {
        if matches!(self, Self::Off) {
            return Ok(None);
        }
        let token = bearer(headers)?;
        match self {
            Self::Off => Ok(None),
            Self::Token(want) => {
                if agentcube_types::claims::constant_time_eq(token.as_bytes(), want.as_bytes()) {
                    Ok(Some(Caller {
                        name: "local".into(),
                        admin: true,
                    }))
                } else {
                    Err(ApiError::Unauthorized("Invalid or expired token".into()))
                }
            }
            Self::TokenReview(r) => r.review(token).await.map(Some),
        }
    }
}

/// `Authorization: Bearer <token>`, exactly two parts (upstream's parsing).
fn bearer(headers: &http::HeaderMap) -> Result<&str, ApiError> {
    let v = headers
        .get(http::header::AUTHORIZATION)
        .ok_or_else(|| ApiError::Unauthorized("Missing authorization header".into()))?;
    let parts: Vec<&str> = v.to_str().unwrap_or("").split_whitespace().collect();
    match parts.as_slice() {
        ["Bearer", token] => Ok(token),
        _ => Err(ApiError::Unauthorized(
            "Invalid authorization header format".into(),
        )),
    }
}

/// A TokenReview's answer (the caller, or the refusal's message) and when it was given.
type Review = (Result<Caller, String>, Instant);

/// TokenReview with a cache keyed by the token's SHA-256 (tokens themselves are not kept).
pub struct TokenReviewer {
    client: kube::Client,
    admin_group: Option<String>,
    cache: Mutex<HashMap<[u8; 32], Review>>,
}

impl TokenReviewer {
    /// A reviewer using the Workload Manager's own client (it needs `tokenreviews: create`).
    pub fn new(client: kube::Client, admin_group: Option<String>) -> Self {
        Self {
            client,
            admin_group: admin_group.filter(|g| !g.is_empty()),
            cache: Mutex::new(HashMap::new()),
        }
    }

    async fn review(&self, token: &str) -> Result<Caller, ApiError> {
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some((answer, at)) = self.cache.lock().unwrap().get(&key)
            && at.elapsed() < REVIEW_TTL
        {
            return answer.clone().map_err(ApiError::Unauthorized);
        }
        let answer = self.ask(token).await?;
        let mut cache = self.cache.lock().unwrap();
        if cache.len() >= REVIEW_CAPACITY {
            cache.retain(|_, (_, at)| at.elapsed() < REVIEW_TTL);
            if cache.len() >= REVIEW_CAPACITY {
                cache.clear();
            }
        }
        cache.insert(key, (answer.clone(), Instant::now()));
        answer.map_err(ApiError::Unauthorized)
    }

    /// One TokenReview: `Ok(answer)` (allowed or refused, both cached), `Err` when the API
    /// server could not be asked (not cached).
    async fn ask(&self, token: &str) -> Result<Result<Caller, String>, ApiError> {
        use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                ..Default::default()
            },
            ..Default::default()
        };
        let api: kube::Api<TokenReview> = kube::Api::all(self.client.clone());
        let done = api
            .create(&kube::api::PostParams::default(), &review)
            .await
            .map_err(|e| {
                tracing::warn!(error = %e, "TokenReview failed");
                ApiError::Unauthorized("Token validation failed".into())
            })?;
        let status = done.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            return Ok(Err("Invalid or expired token".into()));
        }
        let user = status.user.unwrap_or_default();
        let name = user.username.unwrap_or_default();
        let parts: Vec<&str> = name.split(':').collect();
        if !matches!(parts.as_slice(), ["system", "serviceaccount", ns, sa] if !ns.is_empty() && !sa.is_empty())
        {
            return Ok(Err("Invalid service account format".into()));
        }
        let groups = user.groups.unwrap_or_default();
        let admin = self
            .admin_group
            .as_ref()
            .is_some_and(|g| groups.iter().any(|x| x == g));
        Ok(Ok(Caller { name, admin }))
    }
}

/// Claims of the Router's `X-AgentCube-User-Identity` token.
#[derive(Debug, serde::Deserialize)]
struct IdentityClaims {
    sub: String,
}

/// The end user a Router-signed identity token names (`None` without the header): RS256 with the
/// Router's public key, `exp` required, `iss` the Router, `aud` exactly `workloadmanager`, `sub`
/// non-empty. 401 `invalid identity token` otherwise; 503 while the key is not known yet.
pub fn end_user(
    headers: &http::HeaderMap,
    router_key: Option<&str>,
) -> Result<Option<String>, ApiError> {
    let Some(v) = headers.get(agentcube_types::headers::USER_IDENTITY) else {
        return Ok(None);
    };
    let invalid = || ApiError::Unauthorized("invalid identity token".into());
    let pem =
        router_key.ok_or_else(|| ApiError::Unavailable("identity verifier not ready".into()))?;
    let key = jsonwebtoken::DecodingKey::from_rsa_pem(pem.as_bytes()).map_err(|_| invalid())?;
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
    validation.set_audience(&[IDENTITY_AUDIENCE]);
    validation.set_issuer(&[ROUTER_ISSUER]);
    validation.set_required_spec_claims(&["exp", "aud", "iss", "sub"]);
    let token = v.to_str().map_err(|_| invalid())?;
    let claims = jsonwebtoken::decode::<IdentityClaims>(token, &key, &validation)
        .map_err(|_| invalid())?
        .claims;
    if claims.sub.is_empty() {
        return Err(invalid());
    }
    Ok(Some(claims.sub))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> http::HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| {
                (
                    http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    v.parse().unwrap(),
                )
            })
            .collect()
    }

    fn message(r: Result<Option<Caller>, ApiError>) -> String {
        match r {
            Err(ApiError::Unauthorized(m)) => m,
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn static_token_and_header_parsing() {
        let auth = CallerAuth::Token("s3cret".into());
        let ok = auth
            .authenticate(&headers(&[("authorization", "Bearer s3cret")]))
            .await
            .unwrap()
            .unwrap();
        assert!(ok.admin);
        for (h, want) in [
            (vec![], "Missing authorization header"),
            (
                vec![("authorization", "bearer s3cret")],
                "Invalid authorization header format",
            ),
            (
                vec![("authorization", "Bearer a b")],
                "Invalid authorization header format",
            ),
            (
                vec![("authorization", "Bearer wrong")],
                "Invalid or expired token",
            ),
        ] {
            assert_eq!(message(auth.authenticate(&headers(&h)).await), want);
        }
        assert_eq!(
            CallerAuth::Off.authenticate(&headers(&[])).await.unwrap(),
            None
        );
    }
}
