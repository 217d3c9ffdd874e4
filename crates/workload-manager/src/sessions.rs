//! Session lifecycle: create (placeholder → sandbox → ready record, rolled back on any failure or
//! when the client goes away) and delete (sandbox first, then record).

use std::sync::Arc;
use std::time::Duration;

use agentcube_store::SessionStore;
use agentcube_types::api::{CreateSandboxRequest, CreateSandboxResponse, WorkloadKind};
use agentcube_types::{BackingKind, GoDuration, SessionRecord, SessionStatus};
use jiff::{SignedDuration, Timestamp};

use crate::backend::{Backend, SandboxRequest, Workload};
use crate::definitions::Definitions;
use crate::error::ApiError;
use crate::key::RouterKey;

/// Creates and deletes sessions.
pub struct Manager {
    pub store: Arc<dyn SessionStore>,
    pub backend: Arc<dyn Backend>,
    pub definitions: Arc<Definitions>,
    /// Router public key (PEM) for `authMode: picod` sandboxes.
    pub public_key: RouterKey,
    /// How long a create may take before it is rolled back with 504.
    pub create_timeout: Duration,
    /// Counters exported on `/metrics`.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Caps on live sessions.
    pub admission: Admission,
    /// Who may call the API.
    pub auth: Arc<crate::auth::CallerAuth>,
}

/// Who asks for a session: the authenticated caller (`createdBy`) and the end user a Router
/// vouches for (`ownerId`).
#[derive(Debug, Clone, Default)]
pub struct Requester {
    pub caller: Option<crate::auth::Caller>,
    pub owner: Option<String>,
}

/// Whether `caller` may see a record: everyone when authentication is off, admins always,
/// others only what they created.
fn visible(caller: Option<&crate::auth::Caller>, record: &SessionRecord) -> bool {
    match caller {
        None => true,
        Some(c) => c.admin || record.created_by.as_deref() == Some(c.name.as_str()),
    }
}

/// How long a failed create's answer waits for its rollback ([`Manager::rollback_briefly`]).
const ROLLBACK_WAIT: Duration = Duration::from_secs(5);

/// Caps on live sessions (placeholders included); `None`: no cap.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Admission {
    pub max_sessions: Option<usize>,
    pub max_sessions_per_namespace: Option<usize>,
    /// Per end user (the Router's authenticated user), or per authenticated caller that is not
    /// an administrator when no end user is named; see [`user_scope`].
    pub max_sessions_per_user: Option<usize>,
}

/// Whose share of sessions a create counts against, with their name: the end user the Router
/// vouches for, else the authenticated caller unless an administrator (the operator, or one
/// token every client of `agentcube up` shares) or a trusted caller (the Router, creating for
/// clients it does not name). Nobody without authentication.
fn user_scope(who: &Requester) -> Option<(agentcube_store::Scope, String)> {
    use agentcube_store::Scope;
    match (&who.owner, &who.caller) {
        (Some(owner), _) => Some((Scope::Owner(owner.clone()), format!("user {owner}"))),
        (None, Some(c)) if !c.admin && !c.trusted => {
            Some((Scope::Creator(c.name.clone()), format!("caller {}", c.name)))
        }
        _ => None,
    }
}

/// The admission flags of the binaries that run a Workload Manager.
#[derive(Debug, Clone, clap::Args)]
pub struct AdmissionArgs {
    /// Most live sessions (placeholders included) across the store; 0 = no cap.
    #[arg(long, env = "AGENTCUBE_MAX_SESSIONS", default_value_t = 1000)]
    pub max_sessions: usize,
    /// Most live sessions per namespace; 0 = no cap.
    #[arg(
        long,
        env = "AGENTCUBE_MAX_SESSIONS_PER_NAMESPACE",
        default_value_t = 0
    )]
    pub max_sessions_per_namespace: usize,
    /// Most live sessions per end user (or per authenticated caller that is not an
    /// administrator); 0 = no cap. Needs caller authentication to apply.
    #[arg(long, env = "AGENTCUBE_MAX_SESSIONS_PER_USER", default_value_t = 0)]
    pub max_sessions_per_user: usize,
}

impl AdmissionArgs {
    /// The caps (0 means none).
    pub fn admission(&self) -> Admission {
        let cap = |n: usize| (n > 0).then_some(n);
        Admission {
            max_sessions: cap(self.max_sessions),
            max_sessions_per_namespace: cap(self.max_sessions_per_namespace),
            max_sessions_per_user: cap(self.max_sessions_per_user),
        }
    }
}

impl std::fmt::Debug for Manager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Manager").finish_non_exhaustive()
    }
}

/// A definition's idle timeout and maximum lifetime (`None`: no maximum).
fn durations(w: &Workload) -> (GoDuration, Option<Duration>) {
    match w {
        Workload::CodeInterpreter(c) => {
            (c.spec.session_timeout, Some(c.spec.max_session_duration.0))
        }
        Workload::AgentRuntime(a) => (
            a.spec.session_timeout,
            a.spec.max_session_duration.map(|d| d.0),
        ),
    }
}

/// When a session created at `now` ends: the request's ttl, capped by the definition's maximum;
/// with neither, never (the record says the latest time the store can hold).
fn expiry(now: Timestamp, ttl: Option<Duration>, max: Option<Duration>) -> Option<Timestamp> {
    let lifetime = match (ttl, max) {
        (Some(t), Some(m)) => t.min(m),
        (Some(d), None) | (None, Some(d)) => d,
        (None, None) => return None,
    };
    let lifetime = SignedDuration::try_from(lifetime).ok()?;
    now.checked_add(lifetime).ok()
}

impl Manager {
    /// `POST /v1/{code-interpreter|agent-runtime}`: answers once the sandbox is reachable.
    pub async fn create(
        self: &Arc<Self>,
        kind: WorkloadKind,
        req: CreateSandboxRequest,
        who: Requester,
    ) -> Result<CreateSandboxResponse, ApiError> {
        if req.namespace.is_empty() {
            return Err(ApiError::BadRequest("namespace is required".into()));
        }
        if req.name.is_empty() {
            return Err(ApiError::BadRequest("name is required".into()));
        }
        let not_found = match kind {
            WorkloadKind::CodeInterpreter => "code interpreter not found",
            WorkloadKind::AgentRuntime => "agent runtime not found",
        };
        // Names go into the API server's request paths as they are (kube-rs does not escape
        // them): one that cannot name a definition never leaves this process. The message keeps
        // "not found", which the Router turns into upstream's 404.
        let invalid = agentcube_crds::manifest::invalid_namespace(&req.namespace)
            .or_else(|| agentcube_crds::manifest::invalid_name(&req.name));
        if let Some(why) = invalid {
            return Err(ApiError::BadRequest(format!("{not_found}: {why}")));
        }
        let ttl = req.ttl().map_err(ApiError::BadRequest)?;
        let workload = self
            .definitions
            .lookup(kind, &req.namespace, &req.name)
            .await;
        // One who may create nothing in the namespace gets a 403 whether the definition exists
        // or not, so it cannot find out which do.
        let Some(workload) = workload else {
            if let Some(caller) = &who.caller {
                self.auth.may_create_any(caller, &req.namespace).await?;
            }
            return Err(ApiError::NotFound(not_found.into()));
        };
        if let Some(caller) = &who.caller {
            let backing = self.backend.backing_kind(&workload);
            match self.auth.may_create(caller, &req.namespace, backing).await {
                // Named only to one who may create something there.
                Err(ApiError::Forbidden(lacks)) => {
                    self.auth.may_create_any(caller, &req.namespace).await?;
                    return Err(ApiError::Forbidden(lacks));
                }
                other => other?,
            }
        }
        if workload.needs_key() && self.public_key.get().is_none() {
            return Err(ApiError::Internal(
                "authMode picod but the Router public key is not available".into(),
            ));
        }
        // The work runs in its own task: if the client goes away, the handler future is dropped
        // but the task finishes and, finding nobody to answer, rolls everything back.
        let (tx, rx) = tokio::sync::oneshot::channel();
        let this = self.clone();
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            let result = this
                .create_session(kind, &req.namespace, workload, ttl, who)
                .await;
            let refused = matches!(result, Err(ApiError::TooMany(_)));
            if !refused {
                let secs = started.elapsed().as_secs_f64();
                this.metrics.created(kind, result.is_ok(), secs);
            }
            match tx.send(result) {
                Ok(()) => {}
                Err(Ok(resp)) => {
                    tracing::info!(session_id = %resp.session_id, "client went away; rolling back");
                    this.rollback(
                        &resp.session_id,
                        resp.kind,
                        &req.namespace,
                        &resp.sandbox_name,
                    )
                    .await;
                }
                // Nobody to answer: the answer's own log line (a warning for a failure) is
                // written here instead, or the failure would leave no trace.
                Err(Err(e)) => {
                    tracing::warn!(error = %e, "create failed after its client went away");
                }
            }
        });
        rx.await
            .map_err(|_| ApiError::Internal("create task panicked".into()))?
    }

    #[tracing::instrument(name = "create", skip_all, fields(%kind, ns = namespace, name = workload.name(), session_id = tracing::field::Empty, sandbox = tracing::field::Empty))]
    async fn create_session(
        self: &Arc<Self>,
        kind: WorkloadKind,
        namespace: &str,
        workload: Workload,
        ttl: Option<std::time::Duration>,
        who: Requester,
    ) -> Result<CreateSandboxResponse, ApiError> {
        let session_id = uuid::Uuid::new_v4().to_string();
        tracing::Span::current().record("session_id", session_id.as_str());
        let (idle, max) = durations(&workload);
        let now = Timestamp::now();
        // The request's ttl shortens the definition's maximum lifetime, never extends it.
        let shutdown_time = expiry(now, ttl, max);
        let expires = shutdown_time.unwrap_or(Timestamp::MAX);
        let name = workload.sandbox_name();
        let planned = self.backend.backing_kind(&workload);
        let user = user_scope(&who);
        let mut record =
            SessionRecord::placeholder(&session_id, namespace, &name, now, expires, idle);
        record.kind = planned;
        record.workload_kind = Some(kind);
        record.workload_name = Some(workload.name().to_string());
        record.owner_id = who.owner.clone();
        record.created_by = who.caller.map(|c| c.name);
        if let Err(e) = self.store.insert(&record, now).await {
            // A store that timed out may still apply the write (Redis paused, a slow link): the
            // placeholder would then count against the caps until GC finds it abandoned. Taken
            // back in the background, after the write on the same connection. (Never for
            // another refusal: an id that exists is someone else's record.)
            if matches!(e, agentcube_store::Error::Unavailable(_)) {
                let (store, id) = (self.store.clone(), session_id.clone());
                tokio::spawn(async move { store.delete(&id).await });
            }
            return Err(e.into());
        }
        // Counted with our own placeholder in: concurrent creates can never overshoot a cap
        // together (at worst both are refused), and a refusal leaves nothing behind.
        if let Err(e) = self.admit(namespace, user).await {
            let _ = self.store.delete(&session_id).await;
            self.metrics.admission_refusals.inc();
            return Err(e);
        }
        let req = SandboxRequest {
            session_id: session_id.clone(),
            namespace: namespace.to_string(),
            name: name.clone(),
            workload,
            public_key: self.public_key.get(),
            owner: who.owner.clone(),
            shutdown_time,
        };
        let sandbox =
            match tokio::time::timeout(self.create_timeout, self.backend.create(&req)).await {
                Ok(Ok(sb)) => sb,
                Ok(Err(e)) => {
                    self.rollback_briefly(&session_id, planned, namespace, &name)
                        .await;
                    return Err(e.into());
                }
                Err(_) => {
                    let waiting = self.backend.stalled(&req);
                    let done = self
                        .rollback_briefly(&session_id, planned, namespace, &name)
                        .await;
                    return Err(ApiError::Timeout(format!(
                        "sandbox {name} not ready within --create-timeout ({:?}; {}){}",
                        self.create_timeout,
                        if done { "rolled back" } else { "rolling back" },
                        waiting.map(|w| format!(": {w}")).unwrap_or_default()
                    )));
                }
            };
        tracing::Span::current().record("sandbox", sandbox.name.as_str());
        record.kind = sandbox.kind;
        record.sandbox_id = sandbox.id.clone();
        record.name = sandbox.name.clone();
        record.entry_points = Some(sandbox.entry_points.clone());
        record.sandbox_identity = Some(sandbox.identity.clone());
        record.status = SessionStatus::Ready;
        if let Err(e) = self.store.replace(&record).await {
            // Deleted meanwhile (or the store failed): the sandbox must not outlive its record.
            self.rollback_briefly(&session_id, sandbox.kind, namespace, &sandbox.name)
                .await;
            return Err(e.into());
        }
        tracing::info!(session_id = %session_id, sandbox = %sandbox.name, "session created");
        Ok(CreateSandboxResponse {
            kind: sandbox.kind,
            session_id,
            sandbox_id: sandbox.id,
            sandbox_name: sandbox.name,
            entry_points: sandbox.entry_points,
            owner_id: who.owner,
            sandbox_identity: Some(sandbox.identity),
        })
    }

    /// Refuses a create over a cap, naming the cap.
    async fn admit(
        &self,
        namespace: &str,
        user: Option<(agentcube_store::Scope, String)>,
    ) -> Result<(), ApiError> {
        use agentcube_store::Scope;
        if let Some(max) = self.admission.max_sessions
            && self.store.count(&Scope::All).await? > max
        {
            return Err(ApiError::TooMany(format!(
                "session limit reached: {max} live sessions (--max-sessions)"
            )));
        }
        if let Some(max) = self.admission.max_sessions_per_namespace
            && self
                .store
                .count(&Scope::Namespace(namespace.to_string()))
                .await?
                > max
        {
            return Err(ApiError::TooMany(format!(
                "session limit reached: {max} live sessions in namespace {namespace} \
                 (--max-sessions-per-namespace)"
            )));
        }
        if let (Some(max), Some((scope, name))) = (self.admission.max_sessions_per_user, user)
            && self.store.count(&scope).await? > max
        {
            return Err(ApiError::TooMany(format!(
                "session limit reached: {max} live sessions of {name} (--max-sessions-per-user)"
            )));
        }
        Ok(())
    }

    /// [`rollback`](Self::rollback), waited for [`ROLLBACK_WAIT`] at most, then left to finish
    /// in the background (false). A rollback waits as long as a hung API server or store does,
    /// and the failed create's answer waited with it: with the API server stopped, the `504` due
    /// at `--create-timeout` came only when the API server did, after callers had given up.
    async fn rollback_briefly(
        self: &Arc<Self>,
        session_id: &str,
        kind: BackingKind,
        namespace: &str,
        sandbox: &str,
    ) -> bool {
        let this = self.clone();
        let (id, ns, name) = (
            session_id.to_owned(),
            namespace.to_owned(),
            sandbox.to_owned(),
        );
        let rollback = tokio::spawn(async move { this.rollback(&id, kind, &ns, &name).await });
        let done = tokio::time::timeout(ROLLBACK_WAIT, rollback).await.is_ok();
        if !done {
            tracing::warn!(
                session_id,
                sandbox,
                "rollback still running after {ROLLBACK_WAIT:?}: answering; it goes on"
            );
        }
        done
    }

    async fn rollback(&self, session_id: &str, kind: BackingKind, namespace: &str, sandbox: &str) {
        self.metrics.rollbacks.inc();
        if let Err(e) = self.backend.delete(kind, namespace, sandbox).await {
            tracing::warn!(session_id, sandbox, error = %e, "rollback could not delete the sandbox");
        }
        if let Err(e) = self.store.delete(session_id).await {
            tracing::warn!(session_id, error = %e, "rollback could not delete the record");
        }
    }

    /// `DELETE /v1/{kind}/sessions/{id}`: the sandbox first, then the record. A session created
    /// for the other kind is not found on this kind's route.
    pub async fn delete(
        &self,
        kind: WorkloadKind,
        session_id: &str,
        caller: Option<&crate::auth::Caller>,
    ) -> Result<(), ApiError> {
        let record = self
            .find(kind, session_id, caller)
            .await
            .map_err(|e| match e {
                ApiError::NotFound(_) => ApiError::NotFound(format!(
                    "Session ID {session_id} not found, maybe already deleted"
                )),
                e => e,
            })?;
        // Why first: whoever misses the record from now on finds it (a delete that fails
        // leaves a note nobody reads: the Router reads them only for sessions it cannot find).
        let why = "it was deleted (DELETE on the Workload Manager's sessions API)";
        self.mark_gone(&[(session_id.to_string(), why.to_string())])
            .await;
        self.delete_record(&record).await?;
        self.metrics.deleted(kind);
        Ok(())
    }

    /// Notes why each session ended, for the Router's unknown-session answer to whoever uses it
    /// next ([`agentcube_store::gone_mark`], kept [`agentcube_store::GONE_TTL`]). Best effort: a
    /// store that cannot take it leaves the plain "not found".
    pub async fn mark_gone(&self, gone: &[(String, String)]) {
        use futures_util::StreamExt;
        // Many at once (a GC run's): the store pipelines them.
        futures_util::stream::iter(gone)
            .for_each_concurrent(crate::gc::TEARDOWN_CONCURRENCY, |(session_id, why)| {
                self.note_gone(session_id, why)
            })
            .await;
    }

    async fn note_gone(&self, session_id: &str, why: &str) {
        let mark = agentcube_store::gone_mark(session_id);
        let set = self
            .store
            .set_mark(&mark, why, agentcube_store::GONE_TTL, false);
        if let Err(e) = set.await {
            tracing::debug!(session_id, error = %e, "cannot note why the session ended");
        }
    }

    /// `GET /v1/{kind}/sessions/{id}`: the stored record, if it exists, is of `kind` and the
    /// caller may see it (others' sessions are "not found", never "forbidden"). Records written
    /// by upstream components carry no kind and are found on either route.
    pub async fn find(
        &self,
        kind: WorkloadKind,
        session_id: &str,
        caller: Option<&crate::auth::Caller>,
    ) -> Result<SessionRecord, ApiError> {
        let not_found = || ApiError::NotFound(format!("Session ID {session_id} not found"));
        match self.store.get(session_id).await {
            Ok(r) if r.workload_kind.is_none_or(|k| k == kind) && visible(caller, &r) => Ok(r),
            Ok(_) | Err(agentcube_store::Error::InvalidId(_)) => Err(not_found()),
            // Why it ended, when this manager noted it (the Router tells a request the same).
            Err(agentcube_store::Error::NotFound) => {
                match agentcube_store::why_gone(self.store.as_ref(), session_id).await {
                    Ok(Some(why)) => Err(ApiError::NotFound(format!(
                        "Session ID {session_id} not found: {why}"
                    ))),
                    _ => Err(not_found()),
                }
            }
            Err(e) => Err(e.into()),
        }
    }

    /// `GET /v1/{kind}/sessions`: one page of the live sessions of `kind` the (authenticated)
    /// caller may see, oldest first, from the store's kind (or kind-and-creator) index, never a
    /// scan.
    pub async fn list(
        &self,
        kind: WorkloadKind,
        cursor: Option<&str>,
        limit: usize,
        caller: &crate::auth::Caller,
    ) -> Result<agentcube_store::Page, ApiError> {
        let scope = if caller.admin {
            agentcube_store::Scope::Kind(kind)
        } else {
            agentcube_store::Scope::KindCreator(kind, caller.name.clone())
        };
        match self.store.list_page(&scope, cursor, limit).await {
            Err(agentcube_store::Error::BadCursor(c)) => Err(ApiError::BadRequest(format!(
                "invalid continue token {c:?}: pass back the one a previous page returned"
            ))),
            other => Ok(other?),
        }
    }

    /// Deletes a session's sandbox and then its record (used by the API and GC).
    #[tracing::instrument(name = "delete", skip_all, fields(session_id = %record.session_id, ns = %record.sandbox_namespace, sandbox = %record.name))]
    pub async fn delete_record(&self, record: &SessionRecord) -> Result<(), ApiError> {
        self.backend
            .delete(record.kind, &record.sandbox_namespace, &record.name)
            .await?;
        self.store.delete(&record.session_id).await?;
        self.metrics.sessions_deleted.inc();
        tracing::info!(session_id = %record.session_id, sandbox = %record.name, "session deleted");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A backend whose creates never finish and whose deletes hang (the API server stopped).
    struct Hung;

    #[async_trait::async_trait]
    impl Backend for Hung {
        async fn create(
            &self,
            _: &SandboxRequest,
        ) -> Result<crate::backend::Sandbox, crate::backend::BackendError> {
            std::future::pending().await
        }
        async fn delete(
            &self,
            _: BackingKind,
            _: &str,
            _: &str,
        ) -> Result<(), crate::backend::BackendError> {
            std::future::pending().await
        }
        async fn shutdown(&self) {}
    }

    /// With the API server stopped, a create's rollback (deleting what it asked for) hangs with
    /// it; the create's 504, due at `--create-timeout`, waited for the rollback and came only
    /// once the API server did, after its callers (2 minutes) had given up.
    #[tokio::test(start_paused = true)]
    async fn a_create_answers_at_its_timeout_while_its_rollback_hangs() {
        let store: Arc<dyn SessionStore> = Arc::new(agentcube_store::MemoryStore::new());
        let manager = Arc::new(Manager {
            store: store.clone(),
            backend: Arc::new(Hung),
            definitions: Arc::new(Definitions::new()),
            public_key: RouterKey::fixed(None),
            create_timeout: Duration::from_secs(110),
            metrics: Arc::default(),
            admission: Default::default(),
            auth: Arc::new(crate::auth::CallerAuth::Off),
        });
        let ci: agentcube_crds::CodeInterpreter = serde_yaml::from_str(
            "apiVersion: runtime.agentcube.volcano.sh/v1alpha1\nkind: CodeInterpreter\n\
             metadata: {name: ci, namespace: default}\nspec: {template: {image: picod}}\n",
        )
        .unwrap();
        let workload = Workload::CodeInterpreter(Arc::new(ci));
        let who = Requester::default();
        let started = tokio::time::Instant::now();
        let create = manager.create_session(
            WorkloadKind::CodeInterpreter,
            "default",
            workload,
            None,
            who,
        );
        let answer = tokio::time::timeout(Duration::from_secs(600), create).await;
        let took = started.elapsed();
        let Ok(Err(ApiError::Timeout(message))) = answer else {
            panic!("no 504 within 10 minutes: {answer:?}");
        };
        assert!(message.contains("(110s; rolling back)"), "{message}");
        assert!(took <= Duration::from_secs(110) + ROLLBACK_WAIT, "{took:?}");
    }

    #[test]
    fn a_users_share_is_counted_by_end_user_else_by_caller_unless_an_administrator_or_trusted() {
        use agentcube_store::Scope;
        let caller = |name: &str, admin| {
            Some(crate::auth::Caller {
                name: name.into(),
                admin,
                ..Default::default()
            })
        };
        let who = |owner: Option<&str>, caller| Requester {
            caller,
            owner: owner.map(str::to_string),
        };
        let sa = "system:serviceaccount:apps:agent";
        assert_eq!(
            user_scope(&who(Some("alice"), caller("router", false))),
            Some((Scope::Owner("alice".into()), "user alice".into()))
        );
        assert_eq!(
            user_scope(&who(Some("alice"), caller("local", true))).map(|u| u.0),
            Some(Scope::Owner("alice".into()))
        );
        assert_eq!(
            user_scope(&who(None, caller(sa, false))),
            Some((Scope::Creator(sa.into()), format!("caller {sa}")))
        );
        assert_eq!(user_scope(&who(None, caller("local", true))), None);
        assert_eq!(user_scope(&who(None, None)), None);
        // The Router as a trusted caller: its clients are not one user; the end user it names is.
        let router = Some(crate::auth::Caller {
            name: "system:serviceaccount:agentcube:agentcube-router".into(),
            trusted: true,
            ..Default::default()
        });
        assert_eq!(user_scope(&who(None, router.clone())), None);
        assert_eq!(
            user_scope(&who(Some("bob"), router)).map(|u| u.0),
            Some(Scope::Owner("bob".into()))
        );
    }

    #[test]
    fn lifetime_is_the_shorter_of_ttl_and_maximum_and_may_be_unbounded() {
        let now: Timestamp = "2026-12-03T00:00:00Z".parse().unwrap();
        let (h, m) = (Duration::from_secs(3600), Duration::from_secs(60));
        let at = |d: Duration| Some(now + SignedDuration::try_from(d).unwrap());
        assert_eq!(expiry(now, Some(m), Some(h)), at(m));
        assert_eq!(expiry(now, Some(h), Some(m)), at(m));
        assert_eq!(expiry(now, None, Some(h)), at(h));
        assert_eq!(expiry(now, Some(m), None), at(m));
        assert_eq!(expiry(now, None, None), None);
        assert_eq!(
            expiry(now, Some(Duration::MAX), None),
            None,
            "past the store's range"
        );
    }
}
