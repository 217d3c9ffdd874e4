//! An API server that stops answering — a network path that drops packets rather than refusing
//! them: the manager's requests fail after its client's request timeout with a reason instead
//! of waiting for good, and what failed is done once the API server answers again.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentcube_workload_manager::backend::kubernetes::client;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use super::ON_DEMAND;
use crate::common::kube::*;

/// A TCP relay to `target` that can fall silent: while silent it forwards nothing on the
/// connections it holds nor on new ones, and closes none — packets dropped on the way. Or it
/// can cut the connections it holds (silent for good) and go on relaying new ones — connections
/// that died without a word, the API server still there.
struct Relay {
    addr: SocketAddr,
    /// (silent, epoch): a connection accepted in an earlier epoch than this one is cut.
    state: Arc<watch::Sender<(bool, u64)>>,
    /// The client ports of the connections accepted, in order.
    peers: Arc<std::sync::Mutex<Vec<u16>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(watch::channel((false, 0)).0);
        let tx = state.clone();
        let peers = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = peers.clone();
        let task = tokio::spawn(async move {
            while let Ok((inbound, peer)) = listener.accept().await {
                seen.lock().unwrap().push(peer.port());
                let rx = tx.subscribe();
                let epoch = rx.borrow().1;
                tokio::spawn(async move {
                    if open(&mut rx.clone(), epoch).await.is_err() {
                        return;
                    }
                    let Ok(outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    let (ri, wi) = inbound.into_split();
                    let (ro, wo) = outbound.into_split();
                    tokio::join!(pump(ri, wo, rx.clone(), epoch), pump(ro, wi, rx, epoch));
                });
            }
        });
        Self {
            addr,
            state,
            peers,
            task,
        }
    }

    fn silence(&self, on: bool) {
        self.state.send_modify(|s| s.0 = on);
    }

    fn cut(&self) {
        self.state.send_modify(|s| s.1 += 1);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Waits until a connection of `epoch` may carry bytes (never, once cut).
async fn open(state: &mut watch::Receiver<(bool, u64)>, epoch: u64) -> Result<(), ()> {
    state
        .wait_for(|(silent, now)| !silent && *now == epoch)
        .await
        .map(drop)
        .map_err(drop)
}

/// Copies `from` to `to`, holding each chunk while the relay is silent.
async fn pump(
    mut from: impl AsyncReadExt + Unpin,
    mut to: impl AsyncWriteExt + Unpin,
    mut state: watch::Receiver<(bool, u64)>,
    epoch: u64,
) {
    let mut buf = vec![0; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if open(&mut state, epoch).await.is_err() || to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

/// The Workload Manager's client (as `main` builds it, with `timeout`) reaching the test
/// cluster through `relay`.
async fn client_through(relay: &Relay, timeout: Duration) -> kube::Client {
    let kc = kube::config::Kubeconfig::read_from(&cluster().kubeconfig).unwrap();
    let mut config =
        kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
            .await
            .unwrap();
    config.cluster_url = format!("https://{}", relay.addr).parse().unwrap();
    client::client(config, timeout).unwrap()
}

fn api_server_addr() -> SocketAddr {
    let kc = kube::config::Kubeconfig::read_from(&cluster().kubeconfig).unwrap();
    let server = kc.clusters[0]
        .cluster
        .as_ref()
        .unwrap()
        .server
        .clone()
        .unwrap();
    let uri: http::Uri = server.parse().unwrap();
    format!("{}:{}", uri.host().unwrap(), uri.port_u16().unwrap())
        .parse()
        .unwrap()
}

/// Fails unless the Workload Manager's answer is the 503 of an API server that did not answer.
fn unanswered(status: u16, body: &serde_json::Value) {
    let message = body["message"].as_str().unwrap_or_default();
    assert_eq!(status, 503, "{body}");
    assert!(
        message.contains("Kubernetes API did not answer in time"),
        "{body}"
    );
}

#[tokio::test]
async fn requests_to_an_api_server_that_stopped_answering_fail_in_time() {
    cluster();
    let relay = Relay::start(api_server_addr()).await;
    let timeout = Duration::from_secs(3);
    let k = KubeStack::start(KubeOptions {
        manifests: ON_DEMAND.into(),
        wm_client: Some(client_through(&relay, timeout).await),
        ..Default::default()
    })
    .await;
    let s = k.create_ok("code-interpreter", "od").await;
    let id = s["sessionId"].as_str().unwrap();

    relay.silence(true);
    // A client's DELETE: 503 with the reason, in about the timeout; the session stays.
    let started = Instant::now();
    let r = k
        .http
        .delete(format!("{}/v1/code-interpreter/sessions/{id}", k.url))
        .timeout(Duration::from_secs(60))
        .send()
        .await
        .expect("the Workload Manager answers while the API server is silent");
    let waited = started.elapsed();
    let status = r.status().as_u16();
    unanswered(status, &r.json().await.unwrap());
    assert!(waited >= timeout && waited < timeout * 5, "{waited:?}");
    assert!(
        !k.record_gone(&s).await,
        "a failed delete keeps the session"
    );

    // A create: 503 with the reason, in about the timeout (plus the 5 s its answer waits for
    // the rollback); before, it waited out the create timeout for a 504.
    let started = Instant::now();
    let (status, body) = k.create("code-interpreter", "od").await;
    unanswered(status, &body);
    assert!(started.elapsed() < timeout * 5 + Duration::from_secs(5));

    // A garbage-collection pass ends too (before, it waited on its DELETE for good), having
    // deleted nothing.
    let gc = agentcube_workload_manager::gc::Gc {
        manager: k.wm.as_ref().unwrap().manager.clone(),
        interval: Duration::from_secs(3600),
        limit: 100,
    };
    let due = jiff::Timestamp::now() + jiff::SignedDuration::from_hours(1);
    let n = tokio::time::timeout(Duration::from_secs(60), gc.run_once(due))
        .await
        .expect("a GC pass ends while the API server is silent");
    assert_eq!(n, 0);
    assert!(!k.record_gone(&s).await);

    // Answering again: passes reclaim the session, Sandbox and all, and whatever the failed
    // create's requests left once they got through (its Sandbox has no record: an orphan).
    relay.silence(false);
    k.eventually("every Sandbox reclaimed", 60, async || {
        gc.run_once(due).await;
        let left = sandboxes(&k.client)
            .list(&Default::default())
            .await
            .unwrap();
        left.items.is_empty().then_some(())
    })
    .await;
    assert!(k.record_gone(&s).await);
    k.assert_no_records().await;
    assert_eq!(k.stop().await, 0);
}

#[tokio::test]
async fn watches_on_connections_that_died_silently_are_made_anew() {
    cluster();
    let relay = Relay::start(api_server_addr()).await;
    let k = KubeStack::start(KubeOptions {
        manifests: ON_DEMAND.into(),
        wm_client: Some(client_through(&relay, Duration::from_secs(3)).await),
        watch_timeout: Some(Duration::from_secs(3)),
        ..Default::default()
    })
    .await;
    let first = k.create_ok("code-interpreter", "od").await;
    assert_eq!(k.delete(first["sessionId"].as_str().unwrap()).await, 200);

    // Every connection the manager holds dies without a word; the API server still answers
    // new ones. A create that goes out on a dead pooled connection is a 503 (the request
    // timeout); the watches are made anew within their timeout plus 5 s, and creates work
    // again. Before, the watches stayed on their dead connections for 290 s and every create
    // waited out its timeout (504) for a Sandbox they never reported ready.
    relay.cut();
    let started = Instant::now();
    let session = loop {
        let (status, body) = k.create("code-interpreter", "od").await;
        if status == 200 {
            break body;
        }
        assert_eq!(status, 503, "{body}");
        assert!(started.elapsed() < Duration::from_secs(60), "{body}");
    };
    assert!(started.elapsed() < Duration::from_secs(30));
    assert_eq!(k.delete(session["sessionId"].as_str().unwrap()).await, 200);
    k.assert_no_records().await;
    assert_eq!(k.stop().await, 0);
}

/// A pooled connection whose packets stop arriving (the API server's node gone without a word,
/// its conntrack entry behind the `kubernetes` Service a black hole): a request written into
/// it fails when its bytes go unacknowledged for the client's `TCP_USER_TIMEOUT`, not at the
/// request timeout (70 s) — and the next goes out on a new connection.
#[tokio::test]
async fn a_request_on_a_connection_that_went_silent_fails_in_seconds() {
    use agentcube_store::testing::BlackHole;
    use k8s_openapi::api::core::v1::Namespace;
    cluster();
    let relay = Relay::start(api_server_addr()).await;
    let namespaces =
        kube::Api::<Namespace>::all(client_through(&relay, client::REQUEST_TIMEOUT).await);
    namespaces.get("default").await.unwrap();
    let pooled = relay.peers.lock().unwrap().clone();
    assert_eq!(pooled.len(), 1, "{pooled:?}");
    let hole = BlackHole::connection(pooled[0], relay.addr.port());

    let started = Instant::now();
    let e = namespaces.get("default").await.unwrap_err();
    let waited = started.elapsed();
    assert!(!client::is_timeout(&e), "{e:?}");
    let unacked = agentcube_crds::client::UNACKED_TIMEOUT;
    assert!(
        waited >= unacked / 2 && waited < unacked * 2,
        "{waited:?} {e:?}"
    );
    // What a create or DELETE would answer (503) says so.
    let said = agentcube_workload_manager::backend::BackendError::from(e);
    let said = format!("{said:?}");
    assert!(
        said.contains("Unavailable(\"Kubernetes API unreachable: "),
        "{said}"
    );
    assert!(said.contains("Connection timed out"), "{said}");
    namespaces.get("default").await.unwrap();
    assert_eq!(relay.peers.lock().unwrap().len(), 2);
    drop(hole);
}
