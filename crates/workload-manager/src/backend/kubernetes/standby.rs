//! Standby claims (extension, `--standby-claims N`): SandboxClaims the Workload Manager makes
//! ahead of demand, so that a session create on a warm pool does not wait for agent-sandbox to
//! adopt a warm Sandbox (three API writes after the claim's create, ~40 ms on a small control
//! plane) but takes a claim that is already bound.
//!
//! Main flow:
//! 1. [`Standby::keep`] holds `min(N, warmPoolSize)` standby claims
//!    ([`desired::standby_claim`]) per CodeInterpreter with a warm pool. On every change of the
//!    claim watch (and every [`RESYNC`]) it creates the missing ones and deletes those it must
//!    not hand out: made for an older generation of the definition, bound to a Sandbox that
//!    trusts an old Router key, not bound to a Ready Sandbox [`STUCK_AFTER`] after their
//!    creation, beyond the target, or for a definition that no longer has a warm pool.
//! 2. [`Standby::take`] (a session create): picks a standby claim bound to a Ready Sandbox, wins
//!    its mark in the session store ([`marks`]: one `SET NX`, ~0.3 ms, where an API write costs
//!    ~6 ms on a small control plane) while probing its ports, and answers. The claim is patched
//!    over to the session ([`desired::standby_handout`]) right after, off the create's path. A
//!    mark another create won moves on to the next claim; a claim whose pod does not answer is
//!    deleted. With no usable standby claim the caller makes a claim as it would without
//!    standby claims.
//! 3. Deletes by [`Standby::keep`] win the claim's mark the same way first, and every pass
//!    finishes pending marks whose writer died ([`marks::Mark::stale`]).
//!
//! Standby claims are taken out of the pool's size, not added to it: a CodeInterpreter with
//! `warmPoolSize` S and N standby claims has a SandboxWarmPool of S − min(N, S) replicas
//! ([`desired::warm_pool`]), so it keeps S warm pods whichever way they wait. A handed-out
//! standby claim is replaced by a new one, which agent-sandbox binds to a pool member (or, with
//! no member left, to a Sandbox it creates); the pool then refills.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentcube_crds::sandbox::{AgentSandboxApi, Sandbox as SandboxObject, SandboxClaim};
use agentcube_crds::{AuthMode, CodeInterpreter, TargetPort, labels};
use agentcube_store::SessionStore;
use agentcube_types::{BackingKind, SessionStatus};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::{Resource, ResourceExt};

use super::watched::{self, Watched};
use super::{KubernetesBackend, create::bound, desired};
use crate::backend::{BackendError, Sandbox};
use crate::definitions::{Definitions, Workload};
use crate::key::RouterKey;

pub mod marks;
use marks::Mark;

/// How often [`Standby::keep`] looks again without a change of the claim watch (definition and
/// key changes, stuck claims).
pub const RESYNC: Duration = Duration::from_secs(2);
/// A standby claim not bound to a Ready Sandbox this long after its creation is replaced.
pub const STUCK_AFTER: Duration = Duration::from_secs(120);
/// How long a handed-out claim's ports get to answer (its pod was Ready and probed before).
const HANDOUT_PROBE: Duration = Duration::from_secs(1);
/// A claim created here counts until the watch shows it, or this long.
const PENDING_FOR: Duration = Duration::from_secs(30);

/// The standby claims per warm pool that `--standby-claims N` gives on agent-sandbox API `api`:
/// N, or 0 on v1alpha1 (whose claims have no `lifecycle`).
pub fn effective(n: u32, api: AgentSandboxApi) -> u32 {
    if api == AgentSandboxApi::V1alpha1 {
        0
    } else {
        n
    }
}

/// The standby claims of one Workload Manager (shared view: every replica counts every standby
/// claim in the cluster).
pub struct Standby {
    client: kube::Client,
    api: AgentSandboxApi,
    /// Standby claims per warm pool (at most its size).
    per_pool: u32,
    claims: Arc<Watched<SandboxClaim>>,
    sandboxes: Arc<Watched<SandboxObject>>,
    definitions: Arc<Definitions>,
    key: RouterKey,
    /// Where the marks live ([`marks`]).
    store: Arc<dyn SessionStore>,
    /// Created by this process and not yet in the watch cache: (namespace, name) → the
    /// definition and when.
    pending: Mutex<HashMap<(String, String), (String, tokio::time::Instant)>>,
    /// Being handed out or deleted by this process, until its mark is finished:
    /// (namespace, name).
    taking: Arc<Mutex<HashSet<(String, String)>>>,
}

/// What one pass decided for one definition.
#[derive(Debug, Default, PartialEq)]
struct Plan {
    create: usize,
    /// Names; each is deleted only by whoever wins its mark, so a claim a create has just
    /// handed out is never deleted.
    delete: Vec<String>,
}

/// A standby claim as a pass sees it.
#[derive(Debug)]
struct Held {
    name: String,
    /// Bound to a Ready Sandbox that may be handed out.
    usable: bool,
    /// Must go whatever the count (old generation, old key, stuck).
    stale: bool,
}

impl Standby {
    /// `per_pool` standby claims per warm pool, kept by the returned task; `None` for 0, and on
    /// agent-sandbox v0.4 (`v1alpha1`, whose claims have no `lifecycle`), with a warning.
    pub fn start(
        per_pool: u32,
        client: &kube::Client,
        api: AgentSandboxApi,
        (claims, sandboxes): (&Arc<Watched<SandboxClaim>>, &Arc<Watched<SandboxObject>>),
        definitions: &Arc<Definitions>,
        key: &RouterKey,
        store: &Arc<dyn SessionStore>,
    ) -> Option<(Arc<Self>, tokio::task::JoinHandle<()>)> {
        if per_pool == 0 {
            return None;
        }
        if effective(per_pool, api) == 0 {
            tracing::warn!("--standby-claims needs agent-sandbox v0.5+ (v1beta1); ignored");
            return None;
        }
        let standby = Arc::new(Self {
            client: client.clone(),
            api,
            per_pool,
            claims: claims.clone(),
            sandboxes: sandboxes.clone(),
            definitions: definitions.clone(),
            key: key.clone(),
            store: store.clone(),
            pending: Mutex::default(),
            taking: Default::default(),
        });
        let task = tokio::spawn(standby.clone().keep());
        Some((standby, task))
    }

    /// How many standby claims a CodeInterpreter gets.
    fn target(&self, ci: &CodeInterpreter) -> usize {
        desired::standby_share(self.per_pool, ci) as usize
    }

    /// Keeps the standby claims until the task is dropped.
    pub async fn keep(self: Arc<Self>) {
        self.claims.ready().await;
        self.sandboxes.ready().await;
        let mut changes = self.claims.subscribe();
        loop {
            changes.borrow_and_update();
            self.pass().await;
            // Coalesces a burst of watch events (each claim's status writes) into one pass.
            tokio::time::sleep(Duration::from_millis(50)).await;
            tokio::select! {
                r = changes.changed() => if r.is_err() { return },
                _ = tokio::time::sleep(RESYNC) => {}
            }
        }
    }

    /// One look at every standby claim and every CodeInterpreter.
    #[tracing::instrument(name = "standby", skip_all)]
    async fn pass(&self) {
        // Pending first: a claim the watch shows in between is then counted twice (one create
        // too few, made up next pass), never not at all (one too many).
        let pending = self.pending_by_definition();
        let Some(mut held) = self.held().await else {
            return;
        };
        let targets: HashMap<(String, String), Arc<CodeInterpreter>> = self
            .definitions
            .code_interpreters()
            .into_iter()
            .filter(|ci| self.target(ci) > 0)
            .map(|ci| ((ci.namespace().unwrap_or_default(), ci.name_any()), ci))
            .collect();
        let keys: HashSet<_> = held.keys().chain(targets.keys()).cloned().collect();
        for key in keys {
            let ci = targets.get(&key);
            let target = ci.map(|c| self.target(c)).unwrap_or(0);
            let mine = held.remove(&key).unwrap_or_default();
            let plan = plan(mine, pending.get(&key).copied().unwrap_or(0), target);
            self.apply(&key.0, ci, plan).await;
        }
    }

    /// The standby claims not being deleted and not marked, judged, by (namespace, definition);
    /// finishes stale marks on the way. `None` when the store cannot say which are marked.
    async fn held(&self) -> Option<HashMap<(String, String), Vec<Held>>> {
        let now = jiff::Timestamp::now();
        let claims: Vec<_> = self
            .claims
            .all()
            .into_iter()
            .filter(|c| c.labels().contains_key(labels::STANDBY))
            .filter(|c| c.meta().deletion_timestamp.is_none())
            .collect();
        let names: Vec<String> = claims
            .iter()
            .map(|c| marks::name(&c.namespace().unwrap_or_default(), &c.name_any()))
            .collect();
        let marked = match self.store.get_marks(&names).await {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "standby: cannot read the marks; pass skipped");
                return None;
            }
        };
        let mut held: HashMap<(String, String), Vec<Held>> = HashMap::new();
        for (claim, mark) in claims.into_iter().zip(marked) {
            let ns = claim.namespace().unwrap_or_default();
            if let Some(mark) = mark {
                // Leaving standby: not counted; finished here if its writer is gone.
                let mark = Mark::decode(&mark);
                if mark.stale() {
                    self.finish_stale(&ns, &claim.name_any(), mark).await;
                }
                continue;
            }
            let definition = claim.labels()[labels::STANDBY].clone();
            let kind = agentcube_types::api::WorkloadKind::CodeInterpreter;
            let ci = match self.definitions.get(kind, &ns, &definition) {
                Some(Workload::CodeInterpreter(ci)) => Some(ci),
                _ => None,
            };
            let h = self.judge(&claim, ci.as_deref(), now);
            held.entry((ns, definition)).or_default().push(h);
        }
        Some(held)
    }

    /// Whether a standby claim may be handed out, or must go.
    fn judge(
        &self,
        claim: &SandboxClaim,
        ci: Option<&CodeInterpreter>,
        now: jiff::Timestamp,
    ) -> Held {
        let name = claim.name_any();
        let Some(ci) = ci else {
            return Held {
                name,
                usable: false,
                stale: true,
            };
        };
        let generation = claim
            .annotations()
            .get(labels::STANDBY_GENERATION)
            .and_then(|g| g.parse::<i64>().ok());
        let old_generation = generation != Some(ci.metadata.generation.unwrap_or_default());
        let sandbox = self.bound_sandbox(claim);
        let old_key = match (&sandbox, self.key.get()) {
            (Some(sb), Some(key)) if ci.spec.auth_mode != AuthMode::None => {
                sb.trusted_key() != Some(key.as_str())
            }
            _ => false,
        };
        let age = claim
            .meta()
            .creation_timestamp
            .as_ref()
            .map(|t| now.duration_since(t.0))
            .unwrap_or_default();
        let stuck = sandbox.is_none()
            && age > jiff::SignedDuration::try_from(STUCK_AFTER).unwrap_or_default();
        Held {
            name,
            usable: sandbox.is_some() && !old_generation && !old_key,
            stale: old_generation || old_key || stuck,
        }
    }

    /// The Ready Sandbox a claim is bound to.
    fn bound_sandbox(&self, claim: &SandboxClaim) -> Option<SandboxObject> {
        let ns = claim.namespace().unwrap_or_default();
        bound(claim, &watched::uid(claim), |s| self.sandboxes.get(&ns, s))
    }

    /// Claims created here that the watch does not show yet, by (namespace, definition); forgets
    /// those it shows and those older than [`PENDING_FOR`].
    fn pending_by_definition(&self) -> HashMap<(String, String), usize> {
        let seen: HashSet<(String, String)> = self
            .claims
            .all()
            .iter()
            .map(|c| (c.namespace().unwrap_or_default(), c.name_any()))
            .collect();
        let mut pending = self.pending.lock().unwrap();
        pending.retain(|k, (_, at)| !seen.contains(k) && at.elapsed() < PENDING_FOR);
        let mut by = HashMap::new();
        for ((ns, _), (definition, _)) in pending.iter() {
            *by.entry((ns.clone(), definition.clone())).or_default() += 1;
        }
        by
    }

    async fn apply(&self, ns: &str, ci: Option<&Arc<CodeInterpreter>>, plan: Plan) {
        let api: Api<SandboxClaim> = Api::namespaced_with(self.client.clone(), ns, &self.api);
        self.delete(&api, ns, &plan.delete).await;
        if let Some(ci) = ci {
            self.create(&api, ns, ci, plan.create).await;
        }
    }

    /// Deletes standby claims, each only if this pass wins its mark (not while this process,
    /// another create or another replica is handing it out).
    async fn delete(&self, api: &Api<SandboxClaim>, ns: &str, names: &[String]) {
        for name in names {
            let Some(_taking) = Taking::new(&self.taking, ns, name) else {
                continue;
            };
            match self.win(ns, name, &Mark::deleting()).await {
                Ok(true) => {
                    tracing::info!(namespace = ns, claim = %name, "deleting a standby claim");
                    self.retire(api, ns, name).await;
                }
                // Another create or replica has it.
                Ok(false) => {}
                Err(e) => tracing::warn!(claim = %name, error = %e, "cannot mark a standby claim"),
            }
        }
    }

    /// Wins the mark of claim `name` for `mark`: false when someone else holds it.
    async fn win(&self, ns: &str, name: &str, mark: &Mark) -> Result<bool, BackendError> {
        self.store
            .set_mark(
                &marks::name(ns, name),
                &mark.encode(),
                marks::PENDING_TTL,
                true,
            )
            .await
            .map_err(|e| BackendError::Unavailable(format!("session store: {e}")))
    }

    /// Marks claim `name` as having left standby for good.
    async fn done(&self, ns: &str, name: &str) {
        let mark = marks::name(ns, name);
        let done = Mark::Done.encode();
        if let Err(e) = self
            .store
            .set_mark(&mark, &done, marks::DONE_TTL, false)
            .await
        {
            // Left pending: a later pass finishes it again (idempotent).
            tracing::warn!(claim = %name, error = %e, "cannot mark a standby claim done");
        }
    }

    /// Deletes a claim whose mark this process holds, then marks it done. A failure leaves the
    /// mark pending for a later pass.
    async fn retire(&self, api: &Api<SandboxClaim>, ns: &str, name: &str) {
        match api.delete(name, &DeleteParams::background()).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => {
                tracing::warn!(claim = %name, error = %e, "cannot delete a standby claim");
                return;
            }
        }
        self.done(ns, name).await;
    }

    /// Patches a claim whose hand-out mark this process holds over to its session, then marks
    /// it done; retried a few times, then left pending for a later pass. A claim deleted
    /// meanwhile (the session already ended) is simply done.
    async fn patch_over(
        &self,
        api: &Api<SandboxClaim>,
        ns: &str,
        name: &str,
        patch: &serde_json::Value,
    ) {
        for attempt in 0..4u32 {
            match api
                .patch(name, &PatchParams::default(), &Patch::Merge(patch))
                .await
            {
                Ok(_) => return self.done(ns, name).await,
                Err(kube::Error::Api(e)) if e.code == 404 => return self.done(ns, name).await,
                Err(e) => {
                    tracing::warn!(claim = %name, attempt, error = %e, "cannot patch a handed-out claim");
                    tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
                }
            }
        }
    }

    /// Finishes a pending mark whose writer seems gone: a delete is redone; a hand-out is
    /// patched through if its session still stands for this claim (its record is a
    /// placeholder or names the claim), else the claim is deleted (that create failed).
    async fn finish_stale(&self, ns: &str, name: &str, mark: Mark) {
        let Some(_taking) = Taking::new(&self.taking, ns, name) else {
            return;
        };
        let api: Api<SandboxClaim> = Api::namespaced_with(self.client.clone(), ns, &self.api);
        let Mark::HandingOut { session, patch, .. } = mark else {
            tracing::info!(namespace = %ns, claim = %name, "finishing a standby claim's delete");
            return self.retire(&api, ns, name).await;
        };
        let stands = match self.store.get(&session).await {
            Ok(r) => r.name == name || r.status == SessionStatus::Creating,
            Err(agentcube_store::Error::NotFound) => false,
            Err(e) => {
                tracing::warn!(claim = %name, error = %e, "cannot look up a handed-out claim's session");
                return;
            }
        };
        tracing::info!(namespace = %ns, claim = %name, session_id = %session, stands, "finishing a standby claim's hand-out");
        if stands {
            self.patch_over(&api, ns, name, &patch).await;
        } else {
            self.retire(&api, ns, name).await;
        }
    }

    /// Creates `n` standby claims for `ci`, remembered as pending until the watch shows them.
    async fn create(&self, api: &Api<SandboxClaim>, ns: &str, ci: &Arc<CodeInterpreter>, n: usize) {
        for _ in 0..n {
            let name = Workload::CodeInterpreter(ci.clone()).sandbox_name();
            let mut claim = desired::standby_claim(self.api, ci, &name);
            desired::stamp_observed(&mut claim, jiff::Timestamp::now());
            match api.create(&PostParams::default(), &claim).await {
                Ok(_) => {
                    tracing::info!(namespace = ns, claim = %name, "standby claim created");
                    self.pending.lock().unwrap().insert(
                        (ns.to_string(), name),
                        (ci.name_any(), tokio::time::Instant::now()),
                    );
                }
                Err(e) => {
                    tracing::warn!(namespace = ns, error = %e, "cannot create a standby claim");
                    return;
                }
            }
        }
    }

    /// Gives a standby claim of `ci` bound to a Ready Sandbox to the session `info` describes;
    /// `Ok(None)` when there is none to give.
    pub async fn take(
        self: &Arc<Self>,
        backend: &KubernetesBackend,
        ci: &CodeInterpreter,
        info: &desired::SessionInfo<'_>,
        ports: &[TargetPort],
    ) -> Result<Option<Sandbox>, BackendError> {
        let ns = info.namespace;
        let mut usable = self.usable(ci);
        // Concurrent creates start at different claims instead of all racing for the first.
        if !usable.is_empty() {
            let start = info.session_id.bytes().map(usize::from).sum::<usize>() % usable.len();
            usable.rotate_left(start);
        }
        for claim in usable {
            let name = claim.name_any();
            let Some(taking) = Taking::new(&self.taking, ns, &name) else {
                continue;
            };
            let Some(sandbox) = self.bound_sandbox(&claim) else {
                continue;
            };
            let patch = desired::standby_handout(ci, info);
            let mark = Mark::handing_out(info.session_id, patch.clone());
            // The ports are probed while the mark is being won (a connect is harmless to a pod
            // that turns out not to be ours).
            let (won, reached) = tokio::join!(
                self.win(ns, &name, &mark),
                backend.reachable(ns, &sandbox, ports, HANDOUT_PROBE)
            );
            if !won? {
                continue;
            }
            // From here the claim is the session's (patched over after the answer) or, if its
            // pod does not answer, nobody's (deleted).
            let api: Api<SandboxClaim> = Api::namespaced_with(self.client.clone(), ns, &self.api);
            let (this, ns_, name_, answers) =
                (self.clone(), ns.to_string(), name.clone(), reached.is_ok());
            tokio::spawn(async move {
                if answers {
                    this.patch_over(&api, &ns_, &name_, &patch).await;
                } else {
                    this.retire(&api, &ns_, &name_).await;
                }
                drop(taking);
            });
            match reached {
                Ok((identity, entry_points)) => {
                    tracing::info!(claim = %name, "standby claim handed out");
                    return Ok(Some(Sandbox {
                        kind: BackingKind::SandboxClaim,
                        id: watched::uid(&sandbox),
                        name,
                        entry_points,
                        identity,
                    }));
                }
                Err(e) => {
                    tracing::warn!(claim = %name, error = %e, "a standby claim's sandbox does not answer; deleting it");
                }
            }
        }
        Ok(None)
    }

    /// The standby claims of `ci` (in its namespace) that may be handed out now, as cached.
    pub fn usable(&self, ci: &CodeInterpreter) -> Vec<Arc<SandboxClaim>> {
        let (ns, definition) = (ci.namespace(), ci.name_any());
        let now = jiff::Timestamp::now();
        self.claims
            .all()
            .into_iter()
            .filter(|c| {
                c.namespace() == ns
                    && c.meta().deletion_timestamp.is_none()
                    && c.labels().get(labels::STANDBY) == Some(&definition)
                    && self.judge(c, Some(ci), now).usable
            })
            .collect()
    }
}

/// Which standby claims of one definition go, and how many to create: stale ones go; of the
/// rest, those beyond `target` (counting `pending` creates) go, unusable ones first, then by
/// name (so replicas pick the same ones).
fn plan(mut held: Vec<Held>, pending: usize, target: usize) -> Plan {
    let mut delete = Vec::new();
    held.retain(|h| {
        if h.stale {
            delete.push(h.name.clone());
        }
        !h.stale
    });
    held.sort_by(|a, b| b.usable.cmp(&a.usable).then_with(|| a.name.cmp(&b.name)));
    let have = held.len() + pending;
    if held.len() > target {
        delete.extend(held.drain(target..).map(|h| h.name));
    }
    Plan {
        create: target.saturating_sub(have),
        delete,
    }
}

/// A claim this process is handing out or deleting; released on drop.
struct Taking {
    set: Arc<Mutex<HashSet<(String, String)>>>,
    key: (String, String),
}

impl Taking {
    fn new(set: &Arc<Mutex<HashSet<(String, String)>>>, ns: &str, name: &str) -> Option<Self> {
        let key = (ns.to_string(), name.to_string());
        // Not `then_some`: it would build (and, when refused, drop) a guard that releases the
        // other taker's name, under the lock.
        let fresh = set.lock().unwrap().insert(key.clone());
        fresh.then(|| Self {
            set: set.clone(),
            key,
        })
    }
}

impl Drop for Taking {
    fn drop(&mut self) {
        self.set.lock().unwrap().remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_is_taken_once_until_released() {
        let set = Arc::default();
        let first = Taking::new(&set, "ns", "c").unwrap();
        assert!(Taking::new(&set, "ns", "c").is_none());
        assert!(
            set.lock().unwrap().contains(&("ns".into(), "c".into())),
            "a refusal releases nothing"
        );
        drop(first);
        assert!(Taking::new(&set, "ns", "c").is_some());
    }

    fn held(name: &str, usable: bool, stale: bool) -> Held {
        Held {
            name: name.into(),
            usable,
            stale,
        }
    }

    #[test]
    fn missing_claims_are_created_counting_pending_ones() {
        assert_eq!(
            plan(vec![], 0, 2),
            Plan {
                create: 2,
                delete: vec![]
            }
        );
        assert_eq!(
            plan(vec![held("a", true, false)], 0, 2),
            Plan {
                create: 1,
                delete: vec![]
            }
        );
        assert_eq!(
            plan(vec![held("a", false, false)], 1, 2),
            Plan {
                create: 0,
                delete: vec![]
            }
        );
    }

    #[test]
    fn stale_claims_go_and_are_replaced() {
        assert_eq!(
            plan(vec![held("a", true, false), held("b", false, true)], 0, 2),
            Plan {
                create: 1,
                delete: vec!["b".to_string()]
            }
        );
    }

    #[test]
    fn extras_go_unusable_first_then_by_name() {
        let p = plan(
            vec![
                held("c", true, false),
                held("a", false, false),
                held("b", true, false),
            ],
            0,
            1,
        );
        assert_eq!(
            p,
            Plan {
                create: 0,
                delete: vec!["c".to_string(), "a".to_string()]
            }
        );
        // A definition without a warm pool (target 0) keeps none.
        assert_eq!(
            plan(vec![held("a", true, false)], 0, 0).delete,
            vec!["a".to_string()]
        );
    }
}
