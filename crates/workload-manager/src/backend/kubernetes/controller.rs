//! The CodeInterpreter controller (spec §2.6): a CodeInterpreter with `warmPoolSize > 0` gets a
//! SandboxTemplate and a SandboxWarmPool named like it (server-side apply, controller owner
//! references); with 0 they are removed. Status: `ready` and a `Ready` condition with
//! `observedGeneration`, written only when it changes; not Ready (`WarmPoolFailing`, with the
//! reason) while a pool member cannot start ([`super::pool_health`]), for which a CodeInterpreter
//! is looked at again every 10 s while its pool is not full and every 5 minutes when it is. While an `authMode: picod` pool waits for
//! the Router's key the CodeInterpreter is requeued (and reported not ready). When the key
//! changes every CodeInterpreter is reconciled again, and pool members still carrying an old key
//! are retired so the pool refills with sandboxes that accept the Router's tokens. Both kinds
//! keep the NetworkPolicy of their `spec.networkPolicy` ([`super::network`]); AgentRuntimes have
//! a controller of their own for it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentcube_crds::sandbox::{AgentSandboxApi, Sandbox, SandboxTemplate, SandboxWarmPool};
use agentcube_crds::{AgentRuntime, AuthMode, CodeInterpreter, CodeInterpreterStatus};
use agentcube_types::api::WorkloadKind;
use futures_util::StreamExt;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};

use super::desired;
use crate::backend::BackendError;
use crate::key::RouterKey;

/// Field manager of everything the Workload Manager applies.
pub const FIELD_MANAGER: &str = "agentcube-workload-manager";
/// How soon a CodeInterpreter waiting for the Router's key is looked at again (upstream: 5 s).
pub const KEY_REQUEUE: Duration = Duration::from_secs(5);

/// What reconciles share.
pub struct Context {
    pub client: kube::Client,
    /// The agent-sandbox API version the cluster serves.
    pub api: AgentSandboxApi,
    pub key: RouterKey,
    pub pod_defaults: desired::PodDefaults,
    /// Status writes not yet seen in the watch cache, by namespace/name: the resourceVersion the
    /// write was based on and what it wrote. A reconcile that still sees that resourceVersion is
    /// looking at a stale copy and must not write the same status again.
    pub written: Mutex<HashMap<String, (String, Condition)>>,
    /// The Router's pods, allowed into every sandbox with a network policy.
    pub peers: super::network::Peers,
    /// Standby claims per warm pool (`--standby-claims`, 0 where agent-sandbox has none): the
    /// members they hold are taken out of the SandboxWarmPool's replicas.
    pub standby_claims: u32,
    /// Every Sandbox (the backend's watch): the pools' members, for their health.
    pub sandboxes: Arc<super::watched::Watched<Sandbox>>,
    /// How the controllers' watches are made ([`super::watched::config`]).
    pub watch: watcher::Config,
}

/// Runs the controller until the task is dropped.
pub async fn run(ctx: Arc<Context>) {
    let (client, api) = (ctx.client.clone(), ctx.api);
    let key_changed = futures_util::stream::unfold(ctx.key.subscribe(), |mut rx| async move {
        rx.changed().await.ok()?;
        Some(((), rx))
    });
    let watch = ctx.watch.clone();
    Controller::new(Api::<CodeInterpreter>::all(client.clone()), watch.clone())
        .owns_stream_with(
            spec_changes(
                Api::<SandboxTemplate>::all_with(client.clone(), &api),
                watch.clone(),
            ),
            api,
        )
        .owns_stream_with(
            spec_changes(
                Api::<SandboxWarmPool>::all_with(client.clone(), &api),
                watch.clone(),
            ),
            api,
        )
        .owns_stream(spec_changes(Api::<NetworkPolicy>::all(client), watch))
        .reconcile_all_on(key_changed)
        .run(reconcile, error_policy, ctx)
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(error = %e, "codeinterpreter controller");
            }
        })
        .await;
}

/// Owned objects whose spec or metadata changed (a new `generation`), appeared or were deleted.
/// Status-only changes are left out: agent-sandbox rewrites a pool's status on every claim and
/// refill, and reconciling each time cost two applies and a list per change, on the hot path.
fn spec_changes<K>(
    api: Api<K>,
    watch: watcher::Config,
) -> impl futures_util::Stream<Item = Result<K, watcher::Error>> + Send + 'static
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    let mut seen: HashMap<String, Option<i64>> = HashMap::new();
    watcher(api, watch).filter_map(move |event| {
        let out = match event {
            Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) => {
                let uid = o.meta().uid.clone().unwrap_or_default();
                let generation = o.meta().generation;
                (seen.insert(uid, generation) != Some(generation)).then_some(Ok(o))
            }
            Ok(watcher::Event::Delete(o)) => {
                seen.remove(o.meta().uid.as_deref().unwrap_or_default());
                Some(Ok(o))
            }
            Ok(watcher::Event::Init | watcher::Event::InitDone) => None,
            Err(e) => Some(Err(e)),
        };
        std::future::ready(out)
    })
}

fn error_policy(ci: Arc<CodeInterpreter>, e: &BackendError, _: Arc<Context>) -> Action {
    tracing::warn!(codeinterpreter = %ci.name_any(), error = %e, "reconcile failed; retrying");
    Action::requeue(Duration::from_secs(5))
}

/// The AgentRuntime side: its only owned object is the NetworkPolicy of `spec.networkPolicy`.
pub async fn run_agent_runtimes(ctx: Arc<Context>) {
    let (client, watch) = (ctx.client.clone(), ctx.watch.clone());
    Controller::new(Api::<AgentRuntime>::all(client.clone()), watch.clone())
    .owns_stream(spec_changes(Api::<NetworkPolicy>::all(client), watch))
    .run(
        |ar: Arc<AgentRuntime>, ctx: Arc<Context>| async move {
            let owner = controller_ref(&*ar);
            let policy = ar.spec.network_policy.as_ref();
            super::network::sync(
                &ctx.client,
                WorkloadKind::AgentRuntime,
                &ar.metadata,
                owner,
                policy,
                &ctx.peers,
            )
            .await?;
            Ok::<_, BackendError>(Action::await_change())
        },
        |ar: Arc<AgentRuntime>, e: &BackendError, _| {
            tracing::warn!(agentruntime = %ar.name_any(), error = %e, "reconcile failed; retrying");
            Action::requeue(Duration::from_secs(5))
        },
        ctx,
    )
    .for_each(|r| async move {
        if let Err(e) = r {
            tracing::debug!(error = %e, "agentruntime controller");
        }
    })
    .await;
}

/// A controller owner reference to a definition (its NetworkPolicy goes with it).
fn controller_ref<K: Resource<DynamicType = ()>>(
    obj: &K,
) -> k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
    obj.controller_owner_ref(&()).unwrap_or_default()
}

async fn reconcile(ci: Arc<CodeInterpreter>, ctx: Arc<Context>) -> Result<Action, BackendError> {
    let ns = ci.namespace().unwrap_or_else(|| "default".into());
    let name = ci.name_any();
    super::network::sync(
        &ctx.client,
        WorkloadKind::CodeInterpreter,
        &ci.metadata,
        controller_ref(&*ci),
        ci.spec.network_policy.as_ref(),
        &ctx.peers,
    )
    .await?;
    let templates: Api<SandboxTemplate> = Api::namespaced_with(ctx.client.clone(), &ns, &ctx.api);
    let pools: Api<SandboxWarmPool> = Api::namespaced_with(ctx.client.clone(), &ns, &ctx.api);
    if ci.spec.warm_pool() == 0 {
        for deleted in [
            pools
                .delete(&name, &DeleteParams::default())
                .await
                .map(|_| ()),
            templates
                .delete(&name, &DeleteParams::default())
                .await
                .map(|_| ()),
        ] {
            match deleted {
                Ok(()) => tracing::info!(codeinterpreter = %name, "warm pool removed"),
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(e.into()),
            }
        }
        write_status(&ctx, &ci, true, "Reconciled", "CodeInterpreter is ready").await?;
        return Ok(Action::await_change());
    }
    let key = ctx.key.get();
    if ci.spec.auth_mode != AuthMode::None && key.is_none() {
        let why = "waiting for the Router's public key (Secret picod-router-identity)";
        write_status(&ctx, &ci, false, "RouterKeyUnavailable", why).await?;
        return Ok(Action::requeue(KEY_REQUEUE));
    }
    let apply = PatchParams::apply(FIELD_MANAGER).force();
    let template = desired::sandbox_template(ctx.api, &ci, key.as_deref(), &ctx.pod_defaults);
    templates
        .patch(&name, &apply, &Patch::Apply(&template))
        .await?;
    pools
        .patch(
            &name,
            &apply,
            &Patch::Apply(&desired::warm_pool(ctx.api, &ci, ctx.standby_claims)),
        )
        .await?;
    if let Some(key) = &key {
        retire_stale_members(&ctx, &ns, &name, key).await?;
    }
    let (trouble, filling) =
        super::pool_health::health(&ctx.client, &ctx.sandboxes, &ns, &name).await;
    match trouble {
        Some(why) => {
            let why = format!("warm pool sandboxes cannot start: {why}");
            write_status(&ctx, &ci, false, "WarmPoolFailing", &why).await?;
        }
        None => write_status(&ctx, &ci, true, "Reconciled", "CodeInterpreter is ready").await?,
    }
    // Members' health shows in no object this controller watches: looked at again, soon while
    // the pool is not full, now and then when it is (a pool can break without its definition
    // changing: a namespace's Pod Security level, a registry).
    Ok(Action::requeue(if filling {
        POOL_RECHECK_FILLING
    } else {
        POOL_RECHECK
    }))
}

/// How soon a CodeInterpreter whose pool is not full is reconciled again, and one whose pool is.
const POOL_RECHECK_FILLING: Duration = Duration::from_secs(10);
const POOL_RECHECK: Duration = Duration::from_secs(300);

/// Deletes pool members started with another Router key; the pool replaces them.
async fn retire_stale_members(
    ctx: &Context,
    ns: &str,
    pool: &str,
    key: &str,
) -> Result<(), BackendError> {
    let sandboxes: Api<Sandbox> = Api::namespaced_with(ctx.client.clone(), ns, &ctx.api);
    let all = sandboxes.list(&ListParams::default()).await?;
    for sb in all.into_iter().filter(|s| s.warm_pool() == Some(pool)) {
        if sb.trusted_key().is_some_and(|k| k != key) {
            tracing::info!(sandbox = %sb.name_any(), "retiring a warm sandbox that trusts an old Router key");
            match sandboxes
                .delete(&sb.name_any(), &DeleteParams::default())
                .await
            {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(())
}

/// Writes `status` unless it already says the same for this generation (in the object, or in a
/// write of ours the watch cache has not caught up with).
async fn write_status(
    ctx: &Context,
    ci: &CodeInterpreter,
    ready: bool,
    reason: &str,
    message: &str,
) -> Result<(), BackendError> {
    let generation = ci.meta().generation;
    let status_str = if ready { "True" } else { "False" };
    let same = |c: &Condition| {
        c.status == status_str
            && c.reason == reason
            && c.message == message
            && c.observed_generation == generation
    };
    let current = ci.status.as_ref();
    let old = current
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"));
    if current.and_then(|s| s.ready) == Some(ready) && old.is_some_and(same) {
        return Ok(());
    }
    let ns = ci.namespace().unwrap_or_else(|| "default".into());
    let memo_key = format!("{ns}/{}", ci.name_any());
    let seen_rv = ci.resource_version().unwrap_or_default();
    let mut since = match old {
        Some(c) if c.status == status_str => c.last_transition_time.clone(),
        _ => Time(jiff::Timestamp::now()),
    };
    if let Some((rv, c)) = ctx.written.lock().unwrap().get(&memo_key) {
        if *rv == seen_rv && same(c) {
            return Ok(());
        }
        if *rv == seen_rv && c.status == status_str {
            since = c.last_transition_time.clone();
        }
    }
    let condition = Condition {
        type_: "Ready".into(),
        status: status_str.into(),
        reason: reason.into(),
        message: message.into(),
        observed_generation: generation,
        last_transition_time: since,
    };
    let status = CodeInterpreterStatus {
        ready: Some(ready),
        conditions: Some(vec![condition.clone()]),
    };
    let api: Api<CodeInterpreter> = Api::namespaced(ctx.client.clone(), &ns);
    api.patch_status(
        &ci.name_any(),
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({ "status": status })),
    )
    .await?;
    ctx.written
        .lock()
        .unwrap()
        .insert(memo_key, (seen_rv, condition));
    Ok(())
}
