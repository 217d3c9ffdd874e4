//! Where accepted connections run: on the caller's runtime, or on worker threads with one
//! single-threaded runtime each (connections round-robin, never moving once there).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::OwnedSemaphorePermit;
use tokio::sync::mpsc::{UnboundedSender, unbounded_channel};

use crate::side::Drain;
use crate::{App, Builders, Connection, Handshake, Options, Stream};

/// An accepted connection on its way to a worker (a std stream: it leaves the acceptor's
/// reactor and joins the worker's).
pub(crate) struct Job {
    stream: StdStream,
    peer: Option<SocketAddr>,
    slot: OwnedSemaphorePermit,
}

pub(crate) enum StdStream {
    Tcp(std::net::TcpStream),
    Unix(std::os::unix::net::UnixStream),
}

/// The connection spawner of one `serve` call.
pub(crate) enum Dispatch<H> {
    /// On the caller's runtime.
    Inline {
        app: crate::Routes,
        options: Options<H>,
        builder: Arc<Builders>,
        graceful: Drain,
    },
    /// On worker threads.
    Workers {
        senders: Vec<UnboundedSender<Job>>,
        next: usize,
        threads: Vec<std::thread::JoinHandle<()>>,
    },
}

impl<H: Handshake> Dispatch<H> {
    pub(crate) fn start(app: App, options: Options<H>, builder: Arc<Builders>) -> Self {
        if options.workers == 0 {
            return Self::Inline {
                app: app.make(),
                options,
                builder,
                graceful: Drain::new(),
            };
        }
        let (mut senders, mut threads) = (Vec::new(), Vec::new());
        for i in 0..options.workers {
            let (tx, rx) = unbounded_channel::<Job>();
            let (app, options, builder) = (app.clone(), options.clone(), builder.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("http-worker-{i}"))
                .spawn(move || worker(rx, app, options, builder));
            match spawned {
                Ok(t) => {
                    senders.push(tx);
                    threads.push(t);
                }
                Err(e) => tracing::error!(error = %e, "cannot start an HTTP worker thread"),
            }
        }
        Self::Workers {
            senders,
            next: 0,
            threads,
        }
    }

    pub(crate) fn send(
        &mut self,
        stream: Stream,
        peer: Option<SocketAddr>,
        slot: OwnedSemaphorePermit,
    ) {
        match self {
            Self::Inline {
                app,
                options,
                builder,
                graceful,
            } => {
                let conn = Connection {
                    app: app.clone(),
                    peer,
                    options: options.clone(),
                    builders: builder.clone(),
                    watcher: graceful.watcher(),
                };
                tokio::spawn(conn.run(stream, slot));
            }
            Self::Workers { senders, next, .. } => {
                let stream = match stream {
                    Stream::Tcp(s) => s.into_std().map(StdStream::Tcp),
                    Stream::Unix(s) => s.into_std().map(StdStream::Unix),
                };
                let Ok(stream) = stream else { return };
                if senders.is_empty() {
                    return;
                }
                *next = (*next + 1) % senders.len();
                let _ = senders[*next].send(Job { stream, peer, slot });
            }
        }
    }

    /// Stops taking connections and lets the open ones finish for `grace`.
    pub(crate) async fn shutdown(self, grace: Duration) {
        match self {
            Self::Inline { graceful, .. } => graceful.drain(grace).await,
            Self::Workers {
                senders, threads, ..
            } => {
                drop(senders);
                let _ = tokio::task::spawn_blocking(move || {
                    for t in threads {
                        let _ = t.join();
                    }
                })
                .await;
            }
        }
    }
}

/// One worker thread: its own runtime and app; serves the connections it is sent until the
/// sender goes away, then drains.
fn worker<H: Handshake>(
    mut rx: tokio::sync::mpsc::UnboundedReceiver<Job>,
    app: App,
    options: Options<H>,
    builder: Arc<Builders>,
) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot build an HTTP worker runtime");
            return;
        }
    };
    rt.block_on(async move {
        let app = app.make();
        let graceful = Drain::new();
        while let Some(job) = rx.recv().await {
            let stream = match job.stream {
                StdStream::Tcp(s) => tokio::net::TcpStream::from_std(s).map(Stream::Tcp),
                StdStream::Unix(s) => tokio::net::UnixStream::from_std(s).map(Stream::Unix),
            };
            let Ok(stream) = stream else { continue };
            let conn = Connection {
                app: app.clone(),
                peer: job.peer,
                options: options.clone(),
                builders: builder.clone(),
                watcher: graceful.watcher(),
            };
            tokio::spawn(conn.run(stream, job.slot));
        }
        graceful.drain(options.grace).await;
    });
}
