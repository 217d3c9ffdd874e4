//! The Router identity Secret: create-then-load-on-conflict against a real API server (the
//! shared test cluster; each test in a namespace of its own).

use agentcube_router::identity::{KeyPair, SECRET_NAME, load_or_create_secret};
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::{Api, PostParams};

async fn client() -> kube::Client {
    let bin = agentcube_test_cluster::debug_bin_dir();
    agentcube_test_cluster::shared(&bin).client().await
}

/// A fresh namespace for one test.
async fn namespace(name: &str) {
    let ns = serde_json::from_value(serde_json::json!({"metadata": {"name": name}})).unwrap();
    Api::<Namespace>::all(client().await)
        .create(&PostParams::default(), &ns)
        .await
        .unwrap();
}

#[tokio::test]
async fn replicas_racing_at_start_share_one_key() {
    namespace("agentcube").await;
    let (a, b, c) = tokio::join!(
        async {
            load_or_create_secret(client().await, "agentcube")
                .await
                .unwrap()
        },
        async {
            load_or_create_secret(client().await, "agentcube")
                .await
                .unwrap()
        },
        async {
            load_or_create_secret(client().await, "agentcube")
                .await
                .unwrap()
        },
    );
    assert_eq!(a.public_pem, b.public_pem);
    assert_eq!(b.public_pem, c.public_pem);
    let secret = Api::<Secret>::namespaced(client().await, "agentcube")
        .get(SECRET_NAME)
        .await
        .unwrap();
    let labels = secret.metadata.labels.unwrap();
    assert_eq!(labels.get("app").map(String::as_str), Some("agentcube"));
    assert_eq!(labels.get("component").map(String::as_str), Some("router"));
    let data = secret.data.unwrap();
    let private = String::from_utf8(data["private.pem"].0.clone()).unwrap();
    let public = String::from_utf8(data["public.pem"].0.clone()).unwrap();
    assert!(
        private.starts_with("-----BEGIN RSA PRIVATE KEY-----"),
        "PKCS#1 as upstream"
    );
    assert!(
        public.starts_with("-----BEGIN PUBLIC KEY-----"),
        "SPKI as upstream"
    );
    assert_eq!(public, a.public_pem);
}

#[tokio::test]
async fn an_existing_secret_is_loaded_not_replaced() {
    namespace("existing").await;
    let first = load_or_create_secret(client().await, "existing")
        .await
        .unwrap();
    let again = load_or_create_secret(client().await, "existing")
        .await
        .unwrap();
    assert_eq!(first.public_pem, again.public_pem);
    let other = KeyPair::generate().unwrap();
    assert_ne!(other.public_pem, first.public_pem);
}

/// An API server that accepts and never answers (hung, or a path that drops packets): the
/// Router's start fails in bounded time and says why, instead of never getting ready.
#[tokio::test]
async fn an_api_server_that_does_not_answer_fails_the_start_in_time() {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    let held = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((c, _)) = l.accept().await {
            held.push(c);
        }
    });
    let config = kube::Config::new(url.parse().unwrap());
    let timeout = std::time::Duration::from_millis(500);
    let client = agentcube_crds::client::client(config, "test", timeout).unwrap();
    let started = std::time::Instant::now();
    let e = load_or_create_secret(client, "agentcube")
        .await
        .unwrap_err()
        .to_string();
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    assert!(
        e.contains("picod-router-identity: the Kubernetes API did not answer in time"),
        "{e}"
    );
    held.abort();
}
