//! Who calls the Workload Manager, and whose sessions they may see.
//!
//! Two independent inputs, as upstream (spec §2.3, §2.9):
//! - the **caller** (`Authorization: Bearer`), with `--enable-auth`: a Kubernetes ServiceAccount
//!   token checked by TokenReview (answers cached 5 minutes, refusals too), whose
//!   `system:serviceaccount:<ns>:<sa>` name is recorded as the session's `createdBy`; or, for
//!   `agentcube up` on a non-loopback address, one static token whose holder is an administrator.
//!   Reads and deletes are then allowed only on sessions the caller created (others' ids are 404,
//!   never 403: no enumeration), unless the caller is in the admin group. A create is allowed
//!   only where the caller may create the object the session becomes (a `Sandbox` or a
//!   `SandboxClaim` in the definition's namespace), asked with a SubjectAccessReview (allowances
//!   cached 5 minutes, refusals 10 seconds): upstream's Workload Manager made that object with the caller's own token, so
//!   the cluster's RBAC decided; this one writes with its own identity and asks instead.
//! - the **end user** (`X-AgentCube-User-Identity`), a Router-signed token naming the OIDC user
//!   the Router authenticated; it becomes the session's `ownerId`, which the Router enforces.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use agentcube_types::BackingKind;
use agentcube_types::browser::{Field, Guard};

use crate::budget::Budget;
use agentcube_types::claims::{IDENTITY_AUDIENCE, ROUTER_ISSUER};
use sha2::{Digest, Sha256};

use crate::error::ApiError;

/// How long a TokenReview answer (allowed or refused) is reused.
pub const REVIEW_TTL: Duration = Duration::from_secs(300);
/// How long a SubjectAccessReview's refusal is reused: short, so that a caller given the RBAC it
/// lacked can create within seconds (an allowance is reused for [`REVIEW_TTL`], so a revoked
/// grant still works for up to that long, as a cached token does).
const DENIAL_TTL: Duration = Duration::from_secs(10);
/// Reviewed tokens remembered.
const REVIEW_CAPACITY: usize = 1000;

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Caller {
    /// `system:serviceaccount:<ns>:<sa>`, or `local` for the static token.
    pub name: String,
    /// May read and delete every session, and create sessions in every namespace.
    pub admin: bool,
    /// Creates sessions for others (the Router): in every namespace, and not counted as one
    /// user's share; otherwise an ordinary caller.
    pub trusted: bool,
    /// Its groups and uid as the TokenReview gave them (for its SubjectAccessReviews).
    pub groups: Vec<String>,
    pub uid: Option<String>,
}

/// How callers are authenticated.
pub enum CallerAuth {
    /// Everyone may do everything (upstream's default), but no page of another site, nor a page
    /// that rebound its name to a loopback peer's address (a `kubectl port-forward`)
    /// ([`agentcube_types::browser::Guard::Open`]: a 403).
    Off,
    /// Off, on loopback (`agentcube up` without a token): everyone on this machine may do
    /// everything, and no web page may ([`agentcube_types::browser::Guard::Local`]: a foreign
    /// `Host` or `Origin`, or `Sec-Fetch-Site: cross-site`, is a 403).
    LocalOnly,
    /// One static bearer token; its holder is the administrator `local`.
    Token(String),
    /// Kubernetes TokenReview; members of `admin_group` are administrators.
    TokenReview(Box<TokenReviewer>),
}

impl std::fmt::Debug for CallerAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Off => "Off",
            Self::LocalOnly => "LocalOnly",
            Self::Token(_) => "Token",
            Self::TokenReview(_) => "TokenReview",
        })
    }
}

impl CallerAuth {
    /// The caller of a request from `peer` (`None` when authentication is off), or the 401 (a
    /// bad token) or 403 (a web page's request, authentication off) to answer.
    pub async fn authenticate(
        &self,
        headers: &http::HeaderMap,
        peer: Option<IpAddr>,
    ) -> Result<Option<Caller>, ApiError> {
        let guard = match self {
            Self::Off => Guard::Open,
            Self::LocalOnly => Guard::Local,
            Self::Token(_) | Self::TokenReview(_) => Guard::Off,
        };
        let field = |f: Field| headers.get(f.name()).map(http::HeaderValue::as_bytes);
        if let Some(why) = guard.refusal_of(peer, field) {
            return Err(ApiError::Forbidden(why.into()));
        }
        match self {
            Self::Off | Self::LocalOnly => Ok(None),
            Self::Token(want) => {
                let token = bearer(headers)?;
                if agentcube_types::claims::constant_time_eq(token.as_bytes(), want.as_bytes()) {
                    Ok(Some(Caller {
                        name: "local".into(),
                        admin: true,
                        ..Caller::default()
                    }))
                } else {
                    Err(ApiError::Unauthorized("Invalid or expired token".into()))
                }
            }
            Self::TokenReview(r) => r.review(bearer(headers)?).await.map(Some),
        }
    }

    /// Whether `caller` may create a session in `namespace` that becomes a `backing` object:
    /// administrators always; a reviewed caller when the cluster's RBAC lets it create that
    /// object there (403 naming what it lacks otherwise).
    pub async fn may_create(
        &self,
        caller: &Caller,
        namespace: &str,
        backing: BackingKind,
    ) -> Result<(), ApiError> {
        match self {
            Self::TokenReview(r) if !caller.admin && !caller.trusted => {
                r.may_create(caller, namespace, backing).await
            }
            _ => Ok(()),
        }
    }

    /// Whether `caller` may create any session in `namespace` (a `Sandbox` or a
    /// `SandboxClaim`). One who may create neither gets the same 403 whatever the definition —
    /// one that does not exist, one with a warm pool, one without — so it learns nothing about
    /// what is defined there.
    pub async fn may_create_any(&self, caller: &Caller, namespace: &str) -> Result<(), ApiError> {
        for backing in [BackingKind::Sandbox, BackingKind::SandboxClaim] {
            match self.may_create(caller, namespace, backing).await {
                Err(ApiError::Forbidden(_)) => {}
                other => return other,
            }
        }
        Err(ApiError::Forbidden(format!(
            "{} may not create sessions in namespace {namespace}: a session is a \
             sandboxes.agents.x-k8s.io there (from a warm pool, a \
             sandboxclaims.extensions.agents.x-k8s.io); grant it that with RBAC (as upstream \
             needed) or make it an administrator (--auth-admin-group)",
            caller.name
        )))
    }
}

/// One request to the API server out of `budget`, or a 503 saying there are too many `what` at
/// once.
fn spend(budget: &Mutex<Budget>, what: &str) -> Result<(), ApiError> {
    if budget.lock().unwrap().take() {
        Ok(())
    } else {
        Err(ApiError::Unavailable(format!(
            "too many {what} at once, please try again later"
        )))
    }
}

/// Caches `value` under `key`, holding at most [`REVIEW_CAPACITY`] answers: when full, the
/// stale ones (not `fresh`) go first, and all of them if none is stale.
fn remember<K: Eq + std::hash::Hash, V>(
    cache: &mut HashMap<K, V>,
    key: K,
    value: V,
    fresh: impl Fn(&V) -> bool,
) {
    if cache.len() >= REVIEW_CAPACITY {
        cache.retain(|_, v| fresh(v));
        if cache.len() >= REVIEW_CAPACITY {
            cache.clear();
        }
    }
    cache.insert(key, value);
}

/// The API group and resource of what a session becomes.
fn resource(backing: BackingKind) -> (&'static str, &'static str) {
    match backing {
        BackingKind::Sandbox => ("agents.x-k8s.io", "sandboxes"),
        BackingKind::SandboxClaim => ("extensions.agents.x-k8s.io", "sandboxclaims"),
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

/// Whose create of what in which namespace a SubjectAccessReview answered.
type AccessKey = (String, String, BackingKind);

/// A TokenReview's answer (the caller, or the refusal's message) and when it was given.
type Review = (Result<Caller, String>, Instant);

/// TokenReview with a cache keyed by the token's SHA-256 (tokens themselves are not kept), and
/// SubjectAccessReviews of creates, cached by caller, namespace and resource.
pub struct TokenReviewer {
    client: kube::Client,
    admin_group: Option<String>,
    cache: Mutex<HashMap<[u8; 32], Review>>,
    access: Mutex<HashMap<AccessKey, (bool, Instant)>>,
    /// Callers that create sessions on others' behalf in every namespace (the Router), not
    /// asked about namespaces; otherwise ordinary callers.
    trusted: Vec<String>,
    /// TokenReviews of tokens not seen before: made-up tokens cost a client nothing, and each
    /// would otherwise be a request at the API server.
    misses: Mutex<Budget>,
    /// SubjectAccessReviews not answered from the cache: namespaces are free to make up too.
    access_misses: Mutex<Budget>,
}

/// New tokens (and new caller × namespace × resource access checks) reviewed a second, and at
/// once: a few hundred clients starting together are reviewed at once, a flood of made-up tokens
/// or namespaces is not passed on to the API server.
const MISS_RATE: f64 = 100.0;
const MISS_BURST: f64 = 500.0;

impl TokenReviewer {
    /// A reviewer using the Workload Manager's own client (it needs `tokenreviews: create`).
    pub fn new(client: kube::Client, admin_group: Option<String>) -> Self {
        Self {
            client,
            admin_group: admin_group.filter(|g| !g.is_empty()),
            cache: Mutex::new(HashMap::new()),
            access: Mutex::new(HashMap::new()),
            trusted: Vec::new(),
            misses: Mutex::new(Budget::new(MISS_RATE, MISS_BURST)),
            access_misses: Mutex::new(Budget::new(MISS_RATE, MISS_BURST)),
        }
    }

    /// Lets the callers `names` (`system:serviceaccount:<ns>:<sa>`) create sessions in every
    /// namespace without a SubjectAccessReview: the Router, which creates them for its own
    /// (end-user) clients and may reach every definition anyway.
    pub fn trusting(mut self, names: Vec<String>) -> Self {
        self.trusted = names.into_iter().filter(|n| !n.is_empty()).collect();
        self
    }

    async fn may_create(
        &self,
        caller: &Caller,
        namespace: &str,
        backing: BackingKind,
    ) -> Result<(), ApiError> {
        let key = (caller.name.clone(), namespace.to_string(), backing);
        let cached = self.access.lock().unwrap().get(&key).copied();
        let fresh = |allowed: bool, at: Instant| {
            at.elapsed() < if allowed { REVIEW_TTL } else { DENIAL_TTL }
        };
        let allowed = match cached {
            Some((allowed, at)) if fresh(allowed, at) => allowed,
            _ => {
                spend(&self.access_misses, "access checks")?;
                let allowed = self.ask_access(caller, namespace, backing).await?;
                let mut access = self.access.lock().unwrap();
                remember(&mut access, key, (allowed, Instant::now()), |(a, at)| {
                    fresh(*a, *at)
                });
                allowed
            }
        };
        if allowed {
            return Ok(());
        }
        let (group, resource) = resource(backing);
        Err(ApiError::Forbidden(format!(
            "{} may not create {resource}.{group} in namespace {namespace}, which a session of \
             this definition is: grant it that with RBAC (as upstream needed) or make it an \
             administrator (--auth-admin-group)",
            caller.name
        )))
    }

    /// One SubjectAccessReview: may `caller` create `backing` objects in `namespace`?
    async fn ask_access(
        &self,
        caller: &Caller,
        namespace: &str,
        backing: BackingKind,
    ) -> Result<bool, ApiError> {
        use k8s_openapi::api::authorization::v1::{
            ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
        };
        let (group, resource) = resource(backing);
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: Some(caller.name.clone()),
                groups: Some(caller.groups.clone()),
                uid: caller.uid.clone(),
                resource_attributes: Some(ResourceAttributes {
                    namespace: Some(namespace.to_string()),
                    verb: Some("create".into()),
                    group: Some(group.into()),
                    resource: Some(resource.into()),
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        let api: kube::Api<SubjectAccessReview> = kube::Api::all(self.client.clone());
        let done = api
            .create(&kube::api::PostParams::default(), &review)
            .await
            .map_err(|e| {
                tracing::warn!(error = %e, "SubjectAccessReview failed");
                ApiError::Unavailable(format!("cannot check the caller's access: {e}"))
            })?;
        Ok(done.status.is_some_and(|s| s.allowed))
    }

    async fn review(&self, token: &str) -> Result<Caller, ApiError> {
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some((answer, at)) = self.cache.lock().unwrap().get(&key)
            && at.elapsed() < REVIEW_TTL
        {
            return answer.clone().map_err(ApiError::Unauthorized);
        }
        spend(&self.misses, "new callers to review")?;
        let answer = self.ask(token).await?;
        let mut cache = self.cache.lock().unwrap();
        remember(
            &mut cache,
            key,
            (answer.clone(), Instant::now()),
            |(_, at)| at.elapsed() < REVIEW_TTL,
        );
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
        Ok(Ok(Caller {
            trusted: self.trusted.contains(&name),
            name,
            admin,
            groups,
            uid: user.uid,
        }))
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
            .authenticate(&headers(&[("authorization", "Bearer s3cret")]), LOOPBACK)
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
            assert_eq!(
                message(auth.authenticate(&headers(&h), LOOPBACK).await),
                want
            );
        }
        assert_eq!(
            CallerAuth::Off
                .authenticate(&headers(&[]), LOOPBACK)
                .await
                .unwrap(),
            None
        );
    }

    const LOOPBACK: Option<std::net::IpAddr> =
        Some(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));

    /// `auth` answers a request with these fields from `peer` with a 403.
    async fn assert_forbidden(auth: &CallerAuth, fields: &[(&str, &str)], peer: Option<IpAddr>) {
        let answer = auth.authenticate(&headers(fields), peer).await;
        assert!(
            matches!(answer, Err(ApiError::Forbidden(_))),
            "{fields:?} from {peer:?}: {answer:?}"
        );
    }

    #[tokio::test]
    async fn without_authentication_other_sites_pages_are_refused() {
        let cross_site = [
            ("sec-fetch-site", "cross-site"),
            ("origin", "https://evil.example"),
        ];
        let remote = Some("10.0.0.7".parse().unwrap());
        for peer in [LOOPBACK, remote, None] {
            assert_forbidden(&CallerAuth::Off, &cross_site, peer).await;
        }
        // A page that rebound its name to a port-forward (loopback), and the same name from
        // elsewhere (the network's business).
        let rebound = [
            ("host", "rebound.example:8080"),
            ("sec-fetch-site", "same-origin"),
        ];
        assert_forbidden(&CallerAuth::Off, &rebound, LOOPBACK).await;
        assert_eq!(
            CallerAuth::Off
                .authenticate(&headers(&rebound), remote)
                .await
                .unwrap(),
            None
        );
        // A caller's token is what a page cannot send: with one, fetch metadata is not asked.
        let mut with_token = cross_site.to_vec();
        with_token.push(("authorization", "Bearer s3cret"));
        let auth = CallerAuth::Token("s3cret".into());
        assert!(
            auth.authenticate(&headers(&with_token), LOOPBACK)
                .await
                .unwrap()
                .is_some()
        );
    }

    #[tokio::test]
    async fn local_only_keeps_web_pages_out() {
        let local = CallerAuth::LocalOnly;
        for h in [
            vec![("host", "127.0.0.1:8080")],
            vec![
                ("host", "localhost:8080"),
                ("origin", "http://localhost:3000"),
            ],
            vec![],
        ] {
            assert_eq!(
                local.authenticate(&headers(&h), LOOPBACK).await.unwrap(),
                None,
                "{h:?}"
            );
        }
        for h in [
            vec![("host", "rebound.example:8080")],
            vec![
                ("host", "127.0.0.1:8080"),
                ("origin", "https://evil.example"),
            ],
        ] {
            assert_forbidden(&local, &h, LOOPBACK).await;
        }
    }
}
