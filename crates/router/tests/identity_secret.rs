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
