//! Work beside a connection that must not cost its requests anything: the watchdog's timer and
//! the shutdown signal are polled only when they themselves woke the connection's task, not on
//! every wake-up its socket causes (as a `select!` would, a few times per request).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use futures_util::task::AtomicWaker;
use tokio::sync::watch;

use crate::Limits;
use crate::conn::{Closed, Tracker};

/// A future polled only after something it waits on has woken it (and once at the start).
pub(crate) struct Gated<F: ?Sized> {
    fut: Pin<Box<F>>,
    flag: Arc<Flag>,
    /// `flag` as a waker, made once.
    waker: Waker,
}

/// Set by whatever the gated future waits on; wakes the task that owns it.
#[derive(Default)]
struct Flag {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl<F: Future + ?Sized> Gated<F> {
    #[cfg(test)]
    pub(crate) fn new(fut: F) -> Self
    where
        F: Sized,
    {
        Self::boxed(Box::pin(fut))
    }

    pub(crate) fn boxed(fut: Pin<Box<F>>) -> Self {
        let flag = Arc::new(Flag {
            woken: AtomicBool::new(true),
            task: AtomicWaker::new(),
        });
        Self {
            fut,
            waker: Waker::from(flag.clone()),
            flag,
        }
    }

    /// Polls the future if it was woken since its last poll; `Pending` otherwise.
    pub(crate) fn poll(&mut self, cx: &mut Context<'_>) -> Poll<F::Output> {
        self.flag.task.register(cx.waker());
        if !self.flag.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        self.fut
            .as_mut()
            .poll(&mut Context::from_waker(&self.waker))
    }
}

/// The signal every connection of one runtime watches for a graceful shutdown.
#[derive(Debug)]
pub(crate) struct Drain {
    tx: watch::Sender<()>,
}

/// One connection's end of [`Drain`]: it counts as open while this exists.
pub(crate) type Watcher = watch::Receiver<()>;

impl Drain {
    pub(crate) fn new() -> Self {
        Self {
            tx: watch::channel(()).0,
        }
    }

    pub(crate) fn watcher(&self) -> Watcher {
        self.tx.subscribe()
    }

    /// Tells every connection to finish, and waits (at most `grace`) until they all have.
    pub(crate) async fn drain(self, grace: Duration) {
        let _ = self.tx.send(());
        if tokio::time::timeout(grace, self.tx.closed()).await.is_err() {
            tracing::warn!("shutdown grace period over, dropping in-flight requests");
        }
    }
}

/// Resolves when the shutdown signal has been given (or its sender is gone).
pub(crate) async fn shutdown_signal(mut w: Watcher) {
    let _ = w.changed().await;
}

/// What the work beside a connection found.
pub(crate) enum Side {
    /// The watchdog closes the connection.
    Stalled(Closed),
    /// Shutting down: the connection finishes what it is doing, then closes.
    Shutdown,
}

/// The connection's watchdog, and (until it comes) the shutdown signal.
pub(crate) async fn beside(
    tracker: Arc<Tracker>,
    limits: Limits,
    shutdown: Option<Watcher>,
) -> Side {
    let watchdog = async { Side::Stalled(tracker.watchdog(&limits).await) };
    match shutdown {
        Some(w) => tokio::select! {
            side = watchdog => side,
            () = shutdown_signal(w) => Side::Shutdown,
        },
        None => watchdog.await,
    }
}

/// The work beside one connection: its watchdog and, until it comes, the shutdown signal
/// (each reported once; after the signal, the watchdog alone).
pub(crate) struct Beside {
    side: Gated<dyn Future<Output = Side> + Send>,
    tracker: Arc<Tracker>,
    limits: Limits,
}

impl Beside {
    pub(crate) fn new(tracker: Arc<Tracker>, limits: Limits, shutdown: Watcher) -> Self {
        let first: Pin<Box<dyn Future<Output = Side> + Send>> =
            Box::pin(beside(tracker.clone(), limits, Some(shutdown)));
        let side = Gated::boxed(first);
        Self {
            side,
            tracker,
            limits,
        }
    }

    pub(crate) fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Side> {
        let polled = self.side.poll(cx);
        if let Poll::Ready(Side::Shutdown) = polled {
            let watchdog: Pin<Box<dyn Future<Output = Side> + Send>> =
                Box::pin(beside(self.tracker.clone(), self.limits, None));
            self.side = Gated::boxed(watchdog);
        }
        polled
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_gated_future_runs_when_its_own_wake_up_comes() {
        let mut gated = Gated::new(tokio::time::sleep(Duration::from_secs(5)));
        let started = tokio::time::Instant::now();
        std::future::poll_fn(|cx| gated.poll(cx)).await;
        assert!(started.elapsed() >= Duration::from_secs(5));
    }

    #[tokio::test]
    async fn a_gated_future_is_not_polled_for_other_wake_ups() {
        let polls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = polls.clone();
        let mut gated = Gated::new(std::future::poll_fn(move |_| {
            counted.fetch_add(1, Ordering::Relaxed);
            Poll::<()>::Pending
        }));
        // The task is woken ten times by something else; the gated future is polled once.
        let mut n = 0;
        std::future::poll_fn(|cx| {
            assert!(gated.poll(cx).is_pending());
            n += 1;
            if n == 10 {
                return Poll::Ready(());
            }
            cx.waker().wake_by_ref();
            Poll::Pending
        })
        .await;
        assert_eq!(polls.load(Ordering::Relaxed), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn draining_waits_for_every_watcher_until_the_grace_period_ends() {
        let drain = Drain::new();
        let w = drain.watcher();
        let conn = tokio::spawn(async move {
            shutdown_signal(w.clone()).await;
            tokio::time::sleep(Duration::from_secs(3)).await;
            drop(w);
        });
        let started = tokio::time::Instant::now();
        drain.drain(Duration::from_secs(10)).await;
        assert!(started.elapsed() >= Duration::from_secs(3));
        assert!(started.elapsed() < Duration::from_secs(10));
        conn.await.unwrap();
        let drain = Drain::new();
        let _stuck = drain.watcher();
        let started = tokio::time::Instant::now();
        drain.drain(Duration::from_secs(10)).await;
        assert!(started.elapsed() >= Duration::from_secs(10));
    }
}
