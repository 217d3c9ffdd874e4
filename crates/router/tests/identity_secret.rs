//! The Router identity Secret: create-then-load-on-conflict against the fake API server.

use agentcube_fake_kube::FakeApiServer;
use agentcube_router::identity::{KeyPair, SECRET_NAME, load_or_create_secret};
use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;

async fn client(s: &FakeApiServer) -> kube::Client {
    kube::Client::try_from(kube::Config::new(s.url.parse().unwrap())).unwrap()
}

#[tokio::test]
async fn replicas_racing_at_start_share_one_key() {
    let s = FakeApiServer::start().await;
    let (a, b, c) = tokio::join!(
        async {
            load_or_create_secret(client(&s).await, "agentcube")
                .await
                .unwrap()
        },
        async {
            load_or_create_secret(client(&s).await, "agentcube")
                .await
                .unwrap()
        },
        async {
            load_or_create_secret(client(&s).await, "agentcube")
                .await
                .unwrap()
        },
    );
    assert_eq!(a.public_pem, b.public_pem);
    assert_eq!(b.public_pem, c.public_pem);
    let secret = Api::<Secret>::namespaced(client(&s).await, "agentcube")
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
    let s = FakeApiServer::start().await;
    let first = load_or_create_secret(client(&s).await, "default")
        .await
        .unwrap();
    let again = load_or_create_secret(client(&s).await, "default")
        .await
        .unwrap();
    assert_eq!(first.public_pem, again.public_pem);
    let other = KeyPair::generate().unwrap();
    assert_ne!(other.public_pem, first.public_pem);
}
