//! What a request holds while the Router serves it, and lets go of when it is dropped: its
//! place among its session's requests in flight ([`InFlight`], the session's activity), and a
//! session made for it whose id has not reached the client yet ([`Unclaimed`], deleted again
//! if it never does).

use std::sync::Arc;

use agentcube_types::api::WorkloadKind;

use crate::activity::Activity;
use crate::server::AppState;

/// A session made for a request whose answer (the only place its id is told) has not been
/// handed to the client. Dropped so — the sandbox failed, or the client went away (its request's
/// future is dropped then) while the sandbox was still working — the session is deleted again:
/// nobody could name it, yet it would hold its sandbox until its idle timeout.
pub(crate) struct Unclaimed {
    shared: AppState,
    kind: WorkloadKind,
    /// `None` once delivered.
    session_id: Option<Arc<str>>,
}

impl Unclaimed {
    pub(crate) fn new(shared: &AppState, kind: WorkloadKind, session_id: &Arc<str>) -> Self {
        Self {
            shared: shared.clone(),
            kind,
            session_id: Some(session_id.clone()),
        }
    }

    /// The answer carrying the id goes to the client: the session is theirs.
    pub(crate) fn delivered(&mut self) {
        self.session_id = None;
    }
}

impl Drop for Unclaimed {
    fn drop(&mut self) {
        let Some(id) = self.session_id.take() else {
            return;
        };
        tracing::info!(session_id = %id, "the new session's id did not reach the client; deleting it");
        let (s, kind) = (self.shared.clone(), self.kind);
        self.shared
            .rollbacks
            .spawn(async move { s.resolver.roll_back(kind, &id).await });
    }
}

/// Where [`Unclaimed`] sessions are deleted: on the runtime the Router was started on, which
/// outlives its HTTP workers' (a request cut when the shutdown's grace ends is dropped while its
/// worker's runtime goes away, and a deletion spawned there would go with it), tracked so the
/// shutdown waits for them.
#[derive(Clone)]
pub struct Rollbacks {
    runtime: tokio::runtime::Handle,
    tracker: tokio_util::task::TaskTracker,
}

/// How long a shutdown waits for the deletions in flight.
const ROLLBACK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

impl Rollbacks {
    /// On the current runtime (panics outside one, as `tokio::spawn` does).
    pub fn on_this_runtime() -> Self {
        Self {
            runtime: tokio::runtime::Handle::current(),
            tracker: tokio_util::task::TaskTracker::new(),
        }
    }

    fn spawn(&self, deletion: impl std::future::Future<Output = ()> + Send + 'static) {
        self.runtime.spawn(self.tracker.track_future(deletion));
    }

    /// Waits (up to [`ROLLBACK_WAIT`]) for the deletions spawned so far and those the last
    /// requests' ends spawn meanwhile.
    pub async fn finish(&self) {
        self.tracker.close();
        if tokio::time::timeout(ROLLBACK_WAIT, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                pending = self.tracker.len(),
                "sessions made for requests cut by the shutdown are still being deleted; the \
                 rest end at their idle timeout"
            );
        }
    }
}

/// A request to its session's sandbox, from its admission until its answer has been streamed
/// out (or a WebSocket tunnel it opened is closed): its session counts as active meanwhile, and
/// its end is activity if the sandbox answered ([`Activity`]).
pub(crate) struct InFlight {
    activity: Arc<Activity>,
    pub(crate) target: Arc<crate::resolve::Target>,
    answered: bool,
}

impl InFlight {
    pub(crate) fn begin(activity: &Arc<Activity>, target: Arc<crate::resolve::Target>) -> Self {
        activity.begin(&target.session_id);
        Self {
            activity: activity.clone(),
            target,
            answered: false,
        }
    }

    /// The sandbox answered: the request's end is activity.
    pub(crate) fn answered(&mut self) {
        self.answered = true;
    }

    /// Another request of the same session (a tunnel that outlives its `101`).
    pub(crate) fn another(&self) -> Self {
        Self::begin(&self.activity, self.target.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.activity.end(&self.target.session_id, self.answered);
    }
}
