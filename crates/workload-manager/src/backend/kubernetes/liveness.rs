//! Sessions whose sandbox went away under them, noticed on every GC run ([`Backend::reap`]) from
//! the watch caches. Upstream keeps such a record until its idle timeout and answers 502 for it
//! meanwhile (a retrying client never lets it idle out); the local backend reaps its dead
//! sandboxes, and this does the same on Kubernetes:
//!
//! - the session's SandboxClaim or Sandbox was deleted (`kubectl delete`, or with its
//!   CodeInterpreter, which owns its claims): the record goes;
//! - its pod was replaced: agent-sandbox recreates a deleted or evicted pod under the same Sandbox
//!   (a claim may be bound anew), with another IP and an empty workspace, while the record still
//!   points at the old IP. The claim or Sandbox and the record go, so the session answers 404
//!   like any ended session instead of failing forever, or going on in an empty sandbox;
//! - a container of its pod restarted (same pod, same IP, a new container without the session's
//!   files and processes): its Sandbox changed readiness after the session was known to run
//!   ([`Liveness::suspects`]), and its pod, read once, shows a container that exited since or is
//!   down (the backend's `reap`). Sessions this Workload Manager made are known to run from their
//!   create ([`Liveness::created`]); others (another replica's, or made before this one started)
//!   from their record's `createdAt`, so a restart before a run first saw them is not missed (a
//!   cold create's own first readiness makes it a suspect once: its pod is read and cleared).
//!
//! The store is read only for what changed: a session once when it first shows up (the pod IP
//! its record points at), and once when its object vanishes (a session deleted through the API
//! or by GC has no record left by then and is not reported). A replacement that keeps the pod's
//! IP, or an agent-sandbox that reports no pod IPs (v0.4), is not seen.
//!
//! [`Backend::reap`]: crate::backend::Backend::reap

use std::collections::HashMap;
use std::sync::Mutex;

use agentcube_crds::labels;
use agentcube_crds::sandbox::{Sandbox as SandboxObject, SandboxClaim};
use agentcube_store::{Error as StoreError, SessionStore};
use agentcube_types::{BackingKind, SessionRecord, SessionStatus};
use kube::{Resource, ResourceExt};

use super::create::{pod_name_of, sandbox_name_of};
use super::watched::Watched;

/// A session's backing object as the caches show it.
#[derive(Debug, Clone, PartialEq, Default)]
pub(super) struct Seen {
    pub kind: BackingKind,
    pub namespace: String,
    pub name: String,
    /// The IP of the pod behind it, when agent-sandbox reports one.
    pub pod_ip: Option<String>,
    /// The pod behind it, and when its Sandbox last changed readiness (agent-sandbox's `Ready`
    /// condition: a container that exits makes the pod, and so the Sandbox, not Ready).
    pub pod: Option<String>,
    pub ready_at: Option<jiff::Timestamp>,
}

/// Every object in the caches made for a session (label `runtime.agentcube.io/session-id`) and
/// not being deleted, by session id.
pub(super) fn observe(
    claims: &Watched<SandboxClaim>,
    sandboxes: &Watched<SandboxObject>,
) -> HashMap<String, Seen> {
    let mut seen = HashMap::new();
    for c in claims.all() {
        let Some((session, namespace)) = session_of(c.as_ref()) else {
            continue;
        };
        let sandbox = sandbox_name_of(&c).and_then(|(name, _)| sandboxes.get(&namespace, name));
        let mut s = sandbox.map(|s| of_sandbox(&s)).unwrap_or_default();
        (s.kind, s.namespace, s.name) = (BackingKind::SandboxClaim, namespace, c.name_any());
        seen.insert(session, s);
    }
    for s in sandboxes.all() {
        let Some((session, namespace)) = session_of(s.as_ref()) else {
            continue;
        };
        seen.entry(session).or_insert_with(|| Seen {
            namespace,
            ..of_sandbox(&s)
        });
    }
    seen
}

/// What a Sandbox shows of itself and its pod.
fn of_sandbox(s: &SandboxObject) -> Seen {
    let ready_at =
        agentcube_crds::sandbox::ready_condition(s.conditions()).map(|c| c.last_transition_time.0);
    Seen {
        kind: BackingKind::Sandbox,
        namespace: s.namespace().unwrap_or_default(),
        name: s.name_any(),
        pod_ip: s.pod_ip().map(str::to_string),
        pod: Some(pod_name_of(s)),
        ready_at,
    }
}

/// The session id and namespace of an object made for a session and not being deleted.
fn session_of<K: Resource>(o: &K) -> Option<(String, String)> {
    let meta = o.meta();
    if meta.deletion_timestamp.is_some() {
        return None;
    }
    let session = meta.labels.as_ref()?.get(labels::SESSION_ID)?;
    Some((session.clone(), meta.namespace.clone()?))
}

/// Why a session whose claim or Sandbox vanished ended (seen going by a run, or looked up).
pub(super) const DELETED: &str = "its SandboxClaim or Sandbox was deleted";

/// A session whose sandbox died.
#[derive(Debug, PartialEq)]
pub(super) struct Dead {
    pub session_id: String,
    pub seen: Seen,
    pub why: &'static str,
    /// Whether its object is still there (to be deleted before the record).
    pub delete: bool,
}

/// The live sessions one Workload Manager knows of, with the pod IP each record points at.
#[derive(Default)]
pub(super) struct Liveness {
    known: Mutex<HashMap<String, Known>>,
    /// The session objects of the last run, for GC's orphan check ([`Liveness::sessions`]).
    last: Mutex<Vec<(String, BackingKind, String, String)>>,
    /// When sessions this Workload Manager created became ready, until a run first sees them.
    created: Mutex<HashMap<String, jiff::Timestamp>>,
}

struct Known {
    seen: Seen,
    /// `None` when the record has no TCP entry point, or when there was none.
    record_ip: Option<String>,
    /// Since when the sandbox is to have run without a restart: the session's ready time
    /// (sessions this Workload Manager created), else its record's creation time.
    since: jiff::Timestamp,
}

/// A session whose Sandbox changed readiness after `since`: its pod may have restarted.
#[derive(Debug, PartialEq)]
pub(super) struct Suspect {
    pub session_id: String,
    pub seen: Seen,
    pub since: jiff::Timestamp,
}

/// Baselines of sessions never seen by a run (deleted first) are dropped after this long.
const CREATED_KEPT: jiff::SignedDuration = jiff::SignedDuration::from_mins(10);

impl Liveness {
    /// Session `id` became ready `at` (its sandbox running since).
    pub(super) fn created(&self, id: &str, at: jiff::Timestamp) {
        let mut created = self.created.lock().unwrap();
        created.retain(|_, t| at.duration_since(*t) < CREATED_KEPT);
        created.insert(id.to_string(), at);
    }

    /// Known sessions whose Sandbox changed readiness after they were known to run: for their
    /// pod to be looked at ([`Liveness::cleared`] when it had not restarted).
    pub(super) fn suspects(&self) -> Vec<Suspect> {
        let known = self.known.lock().unwrap();
        known
            .iter()
            .filter(|(_, k)| k.seen.ready_at.is_some_and(|at| at > k.since))
            .map(|(id, k)| Suspect {
                session_id: id.clone(),
                seen: k.seen.clone(),
                since: k.since,
            })
            .collect()
    }

    /// Session `id`'s pod was looked at `at` and had not restarted.
    pub(super) fn cleared(&self, id: &str, at: jiff::Timestamp) {
        if let Some(k) = self.known.lock().unwrap().get_mut(id) {
            k.since = at;
        }
    }

    /// The sessions the caches showed at the last [`Liveness::judge`], as (session id, kind,
    /// namespace, name): GC deletes those whose record is gone (a Redis that lost its data).
    pub(super) fn sessions(&self) -> Vec<(String, BackingKind, String, String)> {
        self.last.lock().unwrap().clone()
    }

    /// The records of sessions this Workload Manager made that no run has seen yet and that
    /// `shown` (the caches, read before [`Liveness::judge`]) does not hold: their object may
    /// have gone before a run first saw it (a CodeInterpreter deleted right after the create
    /// takes its claims along), which [`Liveness::judge`], knowing only what it saw, would
    /// never notice. The backend looks each object up in the API (a cache may not show a
    /// session's labels yet) and ends those that are gone ([`Liveness::forget`]). Records still
    /// being created are asked about again at the next run; expired ones are the expiry pass's.
    pub(super) async fn unseen(
        &self,
        shown: &std::collections::HashSet<String>,
        store: &dyn SessionStore,
    ) -> Vec<SessionRecord> {
        let ids: Vec<String> = (self.created.lock().unwrap().keys())
            .filter(|id| !shown.contains(*id))
            .cloned()
            .collect();
        let mut records = Vec::new();
        for id in ids {
            match store.get(&id).await {
                Ok(r) if r.status == SessionStatus::Creating => {}
                Ok(r) if r.expires_at <= jiff::Timestamp::now() => {}
                Ok(r) => records.push(r),
                Err(StoreError::NotFound) => self.forget(&id),
                Err(e) => tracing::warn!(session_id = id, error = %e, "gc: cannot read a record"),
            }
        }
        records
    }

    /// Session `id` was ended: no baseline of it is kept.
    pub(super) fn forget(&self, id: &str) {
        self.created.lock().unwrap().remove(id);
    }

    /// The sessions among those known and `now` whose sandbox died since the last call.
    pub(super) async fn judge(
        &self,
        now: HashMap<String, Seen>,
        store: &dyn SessionStore,
    ) -> Vec<Dead> {
        *self.last.lock().unwrap() = now
            .iter()
            .map(|(id, s)| (id.clone(), s.kind, s.namespace.clone(), s.name.clone()))
            .collect();
        let mut known = std::mem::take(&mut *self.known.lock().unwrap());
        let mut dead = Vec::new();
        let vanished: Vec<String> = known
            .keys()
            .filter(|id| !now.contains_key(*id))
            .cloned()
            .collect();
        for id in vanished {
            match store.get(&id).await {
                // Past its end: agent-sandbox deleted it at its `shutdownTime`; the expiry pass
                // of the same GC run ends the session and says why (its maximum duration).
                Ok(r) if r.expires_at <= jiff::Timestamp::now() => {}
                Ok(_) => {
                    let seen = known.remove(&id).expect("listed above").seen;
                    dead.push(Dead {
                        session_id: id,
                        seen,
                        why: DELETED,
                        delete: false,
                    });
                }
                Err(StoreError::NotFound) => {
                    known.remove(&id);
                }
                Err(e) => tracing::warn!(session_id = id, error = %e, "gc: cannot read a record"),
            }
        }
        for (id, seen) in now {
            let (record_ip, began) = match known.get_mut(&id) {
                Some(k) => {
                    k.seen = seen.clone();
                    (k.record_ip.clone(), None)
                }
                None => match store.get(&id).await {
                    // Still being created: asked again at the next run.
                    Ok(r) if r.status == SessionStatus::Creating => continue,
                    Ok(r) => (record_ip(&r), Some(r.created_at)),
                    // Being deleted (the object goes before the record), or lost.
                    Err(StoreError::NotFound) => (None, None),
                    Err(e) => {
                        tracing::warn!(session_id = id, error = %e, "gc: cannot read a record");
                        continue;
                    }
                },
            };
            if let (Some(want), Some(have)) = (&record_ip, &seen.pod_ip)
                && want != have
            {
                let why = "its pod was replaced (another pod IP: the processes and files it had \
                           are gone)";
                // Forgotten: should its deletion fail, the next run finds it anew.
                known.remove(&id);
                dead.push(Dead {
                    session_id: id,
                    seen,
                    why,
                    delete: true,
                });
                continue;
            }
            known.entry(id).or_insert_with_key(|id| {
                let created = self.created.lock().unwrap().remove(id);
                Known {
                    seen,
                    record_ip,
                    since: created.or(began).unwrap_or_else(jiff::Timestamp::now),
                }
            });
        }
        *self.known.lock().unwrap() = known;
        // What GC ends as dead is not also an orphan once its record is gone.
        self.last
            .lock()
            .unwrap()
            .retain(|(id, ..)| !dead.iter().any(|d| &d.session_id == id));
        dead
    }
}

/// The host of a record's first TCP entry point (`10.0.0.7:8080`, `[fd00::7]:8080`).
fn record_ip(record: &SessionRecord) -> Option<String> {
    let endpoint = &record.entry_points().first()?.endpoint;
    if endpoint.starts_with("unix:") {
        return None;
    }
    let host = match endpoint.strip_prefix('[') {
        Some(rest) => rest.split_once(']')?.0,
        None => endpoint.rsplit_once(':')?.0,
    };
    Some(host.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentcube_types::EntryPoint;

    fn seen(kind: BackingKind, name: &str, ip: Option<&str>) -> Seen {
        Seen {
            kind,
            namespace: "ns".into(),
            name: name.into(),
            pod_ip: ip.map(str::to_string),
            ..Seen::default()
        }
    }

    #[tokio::test]
    async fn a_readiness_change_after_a_session_ran_makes_it_a_suspect_until_cleared() {
        let store = agentcube_store::MemoryStore::new();
        let live = Liveness::default();
        let t = |s: &str| -> jiff::Timestamp { s.parse().unwrap() };
        // "a" this manager created at 10:00:00.5 (on a Sandbox Ready since 10:00:00); "b" it
        // first sees now, on a Sandbox Ready since long before.
        live.created("a", t("2026-12-05T10:00:00.5Z"));
        let with_ready = |name: &str, at: &str| Seen {
            ready_at: Some(t(at)),
            pod: Some(format!("{name}-pod")),
            ..seen(BackingKind::Sandbox, name, Some("10.0.0.1"))
        };
        for id in ["a", "b"] {
            record(&store, id, "10.0.0.1:8080", SessionStatus::Ready).await;
        }
        let mut now = HashMap::from([
            ("a".to_string(), with_ready("sa", "2026-12-05T10:00:00Z")),
            ("b".to_string(), with_ready("sb", "2026-12-05T09:00:00Z")),
        ]);
        assert!(live.judge(now.clone(), &store).await.is_empty());
        assert!(live.suspects().is_empty(), "no change since they ran");
        // "a"'s Sandbox went not Ready and back (its container restarted, or a blip).
        now.insert("a".into(), with_ready("sa", "2026-12-05T10:05:00Z"));
        assert!(live.judge(now.clone(), &store).await.is_empty());
        let suspects = live.suspects();
        assert_eq!(suspects.len(), 1);
        assert_eq!(
            (suspects[0].session_id.as_str(), suspects[0].since),
            ("a", t("2026-12-05T10:00:00.5Z"))
        );
        assert_eq!(suspects[0].seen.pod.as_deref(), Some("sa-pod"));
        // Its pod had not restarted (a blip): cleared until the next change.
        live.cleared("a", t("2026-12-05T10:05:01Z"));
        assert!(live.judge(now, &store).await.is_empty());
        assert!(live.suspects().is_empty());
    }

    /// Sessions another replica made (or made before this Workload Manager started) count from
    /// their record's creation: a Sandbox that changed readiness since then is a suspect the first
    /// time a run sees it. Before, they counted from that first run, and a container restart
    /// between the session's create and it was never looked for.
    #[tokio::test]
    async fn another_replicas_sessions_count_from_their_records_creation() {
        let store = agentcube_store::MemoryStore::new();
        let live = Liveness::default();
        let t = |s: &str| -> jiff::Timestamp { s.parse().unwrap() };
        for id in ["restarted", "untouched"] {
            let mut r = new_record(id, "10.0.0.1:8080", SessionStatus::Ready);
            r.created_at = t("2026-12-05T10:00:00Z");
            store.insert(&r, jiff::Timestamp::now()).await.unwrap();
        }
        let with_ready = |name: &str, at: &str| Seen {
            ready_at: Some(t(at)),
            pod: Some(format!("{name}-pod")),
            ..seen(BackingKind::Sandbox, name, Some("10.0.0.1"))
        };
        let now = HashMap::from([
            // Not Ready and back 30 s into the session, before this replica's first run.
            (
                "restarted".to_string(),
                with_ready("sr", "2026-12-05T10:00:30Z"),
            ),
            // A warm pod Ready since before the session, unchanged.
            (
                "untouched".to_string(),
                with_ready("su", "2026-12-05T09:59:00Z"),
            ),
        ]);
        assert!(live.judge(now, &store).await.is_empty());
        let suspects = live.suspects();
        assert_eq!(
            suspects
                .iter()
                .map(|s| (s.session_id.as_str(), s.since))
                .collect::<Vec<_>>(),
            [("restarted", t("2026-12-05T10:00:00Z"))]
        );
    }

    fn entry(endpoint: &str) -> Option<Vec<EntryPoint>> {
        Some(vec![EntryPoint {
            path: "/".into(),
            protocol: "HTTP".into(),
            endpoint: endpoint.into(),
        }])
    }

    fn new_record(id: &str, endpoint: &str, status: SessionStatus) -> SessionRecord {
        let now = jiff::Timestamp::now();
        let idle = agentcube_types::GoDuration(std::time::Duration::from_secs(900));
        let end = now + std::time::Duration::from_secs(3600);
        let mut r = SessionRecord::placeholder(id, "ns", format!("sb-{id}"), now, end, idle);
        r.status = status;
        r.entry_points = entry(endpoint);
        r
    }

    async fn record(store: &dyn SessionStore, id: &str, endpoint: &str, status: SessionStatus) {
        let _ = store.delete(id).await;
        let r = new_record(id, endpoint, status);
        store.insert(&r, jiff::Timestamp::now()).await.unwrap();
    }

    #[test]
    fn a_record_points_at_the_host_of_its_first_tcp_entry_point() {
        let mut r = new_record("x", "10.244.0.12:8080", SessionStatus::Ready);
        assert_eq!(record_ip(&r).as_deref(), Some("10.244.0.12"));
        let ep = entry;
        r.entry_points = ep("[fd00::7]:8080");
        assert_eq!(record_ip(&r).as_deref(), Some("fd00::7"));
        r.entry_points = ep("unix:/state/private/x/picod.sock");
        assert_eq!(record_ip(&r), None);
        r.entry_points = None;
        assert_eq!(record_ip(&r), None);
    }

    /// One GC run: the dead, sorted, whose records then go (as GC deletes them).
    async fn run(
        live: &Liveness,
        now: &HashMap<String, Seen>,
        store: &dyn SessionStore,
    ) -> Vec<Dead> {
        let mut dead = live.judge(now.clone(), store).await;
        dead.sort_by(|x, y| x.session_id.cmp(&y.session_id));
        for d in &dead {
            store.delete(&d.session_id).await.unwrap();
        }
        dead
    }

    fn ids(dead: &[Dead]) -> Vec<(&str, bool)> {
        dead.iter()
            .map(|d| (d.session_id.as_str(), d.delete))
            .collect()
    }

    /// agent-sandbox deletes a Sandbox or claim at its `shutdownTime`, the session's end: that
    /// is the expiry pass's to end (saying "maximum duration"), not a death.
    #[tokio::test]
    async fn a_sandbox_gone_at_its_sessions_end_is_left_to_the_expiry_pass() {
        let store = agentcube_store::memory::MemoryStore::new();
        let live = Liveness::default();
        let mut ended = new_record("x", "10.0.0.1:8080", SessionStatus::Ready);
        ended.expires_at = jiff::Timestamp::now() - std::time::Duration::from_secs(1);
        store.insert(&ended, jiff::Timestamp::now()).await.unwrap();
        record(&store, "y", "10.0.0.2:8080", SessionStatus::Ready).await;
        let mut now = HashMap::from([
            (
                "x".to_string(),
                seen(BackingKind::Sandbox, "sx", Some("10.0.0.1")),
            ),
            (
                "y".to_string(),
                seen(BackingKind::Sandbox, "sy", Some("10.0.0.2")),
            ),
        ]);
        assert_eq!(run(&live, &now, &store).await, vec![]);
        now.clear();
        assert_eq!(ids(&run(&live, &now, &store).await), [("y", false)]);
    }

    #[tokio::test]
    async fn deleted_objects_and_replaced_pods_are_dead_and_nothing_else_is() {
        let store = agentcube_store::memory::MemoryStore::new();
        let live = Liveness::default();
        let (claim, sandbox) = (BackingKind::SandboxClaim, BackingKind::Sandbox);
        record(&store, "a", "10.0.0.1:8080", SessionStatus::Ready).await;
        record(&store, "b", "10.0.0.2:8080", SessionStatus::Ready).await;
        record(&store, "c", "10.0.0.3:8080", SessionStatus::Ready).await;
        record(&store, "d", "", SessionStatus::Creating).await;
        let mut now = HashMap::from([
            ("a".to_string(), seen(claim, "ca", Some("10.0.0.1"))),
            ("b".to_string(), seen(sandbox, "sb", Some("10.0.0.2"))),
            ("c".to_string(), seen(sandbox, "sc", None)),
            ("d".to_string(), seen(sandbox, "sd", None)),
            // An object whose record is gone (being deleted): never reported.
            ("e".to_string(), seen(sandbox, "se", Some("10.0.0.5"))),
        ]);
        assert_eq!(run(&live, &now, &store).await, vec![]);
        assert_eq!(run(&live, &now, &store).await, vec![], "steady");
        let mut listed = live.sessions();
        listed.sort_by(|x, y| x.0.cmp(&y.0));
        assert_eq!(listed.len(), 5);
        assert_eq!(
            listed[0],
            ("a".to_string(), claim, "ns".to_string(), "ca".to_string())
        );

        // `a`'s claim is bound anew (another IP); `b`'s Sandbox is deleted; `c`'s pod has no
        // IP yet (being recreated: no verdict); `d` finished creating on the IP it shows;
        // `e` went as a deleted session goes (no record).
        now.insert("a".into(), seen(claim, "ca", Some("10.0.0.9")));
        now.remove("b");
        record(&store, "d", "10.0.0.4:8080", SessionStatus::Ready).await;
        now.insert("d".into(), seen(sandbox, "sd", Some("10.0.0.4")));
        now.remove("e");
        let dead = run(&live, &now, &store).await;
        assert_eq!(ids(&dead), [("a", true), ("b", false)]);
        assert!(
            live.sessions().iter().all(|(id, ..)| id != "a"),
            "ended as dead, not listed for the orphan check"
        );
        assert_eq!(
            (dead[0].seen.name.as_str(), dead[1].seen.name.as_str()),
            ("ca", "sb")
        );

        // `a`'s claim goes (deleted by GC); `c`'s pod comes back elsewhere; `d`'s record is
        // deleted (through the API) before its Sandbox goes: not dead.
        now.remove("a");
        now.insert("c".into(), seen(sandbox, "sc", Some("10.0.0.33")));
        store.delete("d").await.unwrap();
        now.remove("d");
        assert_eq!(ids(&run(&live, &now, &store).await), [("c", true)]);
        now.remove("c");
        assert_eq!(run(&live, &now, &store).await, vec![]);

        // An object whose deletion failed is found again at the next run.
        record(&store, "g", "10.0.0.7:8080", SessionStatus::Ready).await;
        now.insert("g".into(), seen(sandbox, "sg", Some("10.0.0.7")));
        assert_eq!(run(&live, &now, &store).await, vec![]);
        now.insert("g".into(), seen(sandbox, "sg", Some("10.0.0.77")));
        assert_eq!(ids(&live.judge(now.clone(), &store).await), [("g", true)]);
        assert_eq!(ids(&live.judge(now.clone(), &store).await), [("g", true)]);

        // A Workload Manager that starts after a pod was replaced sees it at first sight.
        record(&store, "f", "10.0.0.6:8080", SessionStatus::Ready).await;
        let fresh = Liveness::default();
        let now = HashMap::from([("f".to_string(), seen(sandbox, "sf", Some("10.0.0.66")))]);
        assert_eq!(ids(&run(&fresh, &now, &store).await), [("f", true)]);
    }
}
