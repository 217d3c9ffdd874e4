//! HTTPS on the Router and HTTP/2 cleartext (h2c) end to end.

mod common;

use std::sync::Arc;

use common::upstream;
use common::*;
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use serde_json::Value;
use tokio_rustls::rustls;

#[tokio::test]
async fn each_upstream_is_spoken_to_in_its_own_protocol() {
    let store = memory();
    let (up, _t) = serve(upstream::app()).await;
    let addr = up.trim_start_matches("http://");
    session_to_as(store.as_ref(), "s1", addr, "H2C").await;
    session_to(store.as_ref(), "s2", addr).await;
    let router = Router::start("http://127.0.0.1:9", store, |_| {}).await;
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let r = h2
        .post(router.ci("grpc.Service/Call"))
        .header("x-agentcube-session-id", "s1")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(r.headers()["x-agentcube-session-id"], "s1");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["version"], "HTTP/2.0", "an H2C port gets h2c");
    assert_eq!(v["path"], "/grpc.Service/Call");
    // An HTTP/2 client to an HTTP/1 agent (the usual case, e.g. a TLS client that negotiated h2):
    // translated to HTTP/1.1.
    let r = h2
        .post(router.ci("echo"))
        .header("x-agentcube-session-id", "s2")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["version"], "HTTP/1.1", "an HTTP port gets HTTP/1.1");
    // And an HTTP/1.1 client to the h2c port is upgraded to h2c.
    let r = client()
        .get(router.ci("x"))
        .header("x-agentcube-session-id", "s1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.json::<Value>().await.unwrap()["version"], "HTTP/2.0");
}

#[tokio::test]
async fn unix_socket_entry_points_get_http1_or_h2c() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("up.sock");
    let l = tokio::net::UnixListener::bind(&path).unwrap();
    tokio::spawn(async move { axum::serve(l, upstream::app()).await.unwrap() });
    let endpoint = format!("unix:{}", path.display());
    let store = memory();
    session_to(store.as_ref(), "h1", &endpoint).await;
    session_to_as(store.as_ref(), "h2", &endpoint, "H2C").await;
    let router = Router::start("http://127.0.0.1:9", store, |_| {}).await;
    for (id, version) in [("h1", "HTTP/1.1"), ("h2", "HTTP/2.0"), ("h1", "HTTP/1.1")] {
        let r = client()
            .get(router.ci("x"))
            .header("x-agentcube-session-id", id)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{id}");
        assert_eq!(r.json::<Value>().await.unwrap()["version"], version);
    }
}

#[tokio::test]
async fn https_listener_serves_the_same_api() {
    let store = memory();
    let (up, _t) = serve(upstream::app()).await;
    session_to(store.as_ref(), "s1", up.trim_start_matches("http://")).await;
    let dir = tempfile::tempdir().unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    std::fs::write(dir.path().join("tls.crt"), cert.cert.pem()).unwrap();
    std::fs::write(dir.path().join("tls.key"), cert.signing_key.serialize_pem()).unwrap();
    let files = |cert: &str| agentcube_tls::PemFiles {
        cert: dir.path().join(cert),
        key: dir.path().join("tls.key"),
        ca: None,
    };
    let acceptor = agentcube_tls::ServerTls::load(files("tls.crt")).unwrap();
    let mut config = agentcube_router::Config::new("http://127.0.0.1:9");
    config.scheme = "https";
    let pair = agentcube_router::KeyPair::from_private_pem(ROUTER_KEY).unwrap();
    let service = agentcube_router::RouterService::start(&config, store, &pair).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(agentcube_router::serve(
        service,
        listener,
        Some(acceptor),
        std::future::pending(),
    ));

    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.cert.der().clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let stream = connector
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap();
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = hyper::Request::get("/v1/namespaces/default/code-interpreters/ci/invocations/x")
        .header("host", "localhost")
        .header("x-agentcube-session-id", "s1")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let v: Value =
        serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(v["headers"]["x-forwarded-proto"], "https");
    // Missing key files are a clear startup error.
    let Err(err) = agentcube_tls::ServerTls::load(files("nope.crt")) else {
        panic!("a missing certificate must be an error");
    };
    assert!(err.to_string().contains("nope.crt"), "{err}");
}

/// A request written into an h2c connection whose host went away without a word (its packets
/// dropped) is given up once its bytes have gone unacknowledged for the dead-peer bound, a 504
/// (TCP keepalive does not run while bytes are unacknowledged: before, it was retransmitted for
/// the kernel's ~15 minutes); the next request gets a new connection.
#[tokio::test]
async fn an_h2c_request_to_a_host_that_vanished_ends_in_seconds() {
    use agentcube_store::testing::BlackHole;
    use axum::extract::ConnectInfo;
    use std::sync::Mutex;
    use std::time::{Duration, Instant};
    let peers = Arc::new(Mutex::new(Vec::<u16>::new()));
    let seen = peers.clone();
    let app = upstream::app().layer(axum::middleware::from_fn(
        move |req: axum::extract::Request, next: axum::middleware::Next| {
            let peer = req.extensions().get::<ConnectInfo<std::net::SocketAddr>>();
            let port = peer.unwrap().0.port();
            let mut seen = seen.lock().unwrap();
            if !seen.contains(&port) {
                seen.push(port);
            }
            next.run(req)
        },
    ));
    let (up, _t) = serve(app).await;
    let addr = up.trim_start_matches("http://");
    let port: u16 = addr.rsplit(':').next().unwrap().parse().unwrap();
    let store = memory();
    session_to_as(store.as_ref(), "s", addr, "H2C").await;
    let bound = Duration::from_secs(1);
    let router = Router::start("http://127.0.0.1:9", store, |c| {
        c.dead_peer_timeout = bound;
    })
    .await;
    let get = || router.get_in("s", "x").send();
    assert_eq!(get().await.unwrap().status(), 200);
    let pooled = peers.lock().unwrap().clone();
    assert_eq!(pooled.len(), 1, "{pooled:?}");
    let hole = BlackHole::connection(pooled[0], port);
    let started = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(60), get())
        .await
        .expect("an h2c request on a dead connection waited for the kernel")
        .unwrap();
    let waited = started.elapsed();
    assert_eq!(r.status(), 504);
    assert!(waited >= bound && waited < bound * 10, "{waited:?}");
    drop(hole);
    let r = get().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["version"], "HTTP/2.0");
    assert_eq!(peers.lock().unwrap().len(), 2);
}
