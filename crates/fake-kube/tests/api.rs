//! The fake API server behaves like a real one for what kube-rs clients and controllers do.

use std::time::Duration;

use agentcube_fake_kube::FakeApiServer;
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};

async fn client(server: &FakeApiServer) -> kube::Client {
    let cfg = kube::Config::new(server.url.parse().unwrap());
    kube::Client::try_from(cfg).unwrap()
}

fn cm(name: &str, labels: &[(&str, &str)]) -> ConfigMap {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "labels": labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<std::collections::BTreeMap<_, _>>()},
        "data": {"k": "v"}
    }))
    .unwrap()
}

#[tokio::test]
async fn crud_with_resource_versions_and_conflicts() {
    let s = FakeApiServer::start().await;
    let api: Api<ConfigMap> = Api::namespaced(client(&s).await, "default");
    let created = api
        .create(&PostParams::default(), &cm("a", &[("app", "x")]))
        .await
        .unwrap();
    let rv1 = created.metadata.resource_version.clone().unwrap();
    assert!(created.metadata.uid.is_some());
    let err = api
        .create(&PostParams::default(), &cm("a", &[]))
        .await
        .unwrap_err();
    assert!(
        matches!(err, kube::Error::Api(ref e) if e.code == 409 && e.reason == "AlreadyExists"),
        "{err:?}"
    );
    let mut changed = created.clone();
    changed.data = Some([("k".to_string(), "v2".to_string())].into());
    let replaced = api
        .replace("a", &PostParams::default(), &changed)
        .await
        .unwrap();
    assert_ne!(replaced.metadata.resource_version.unwrap(), rv1);
    // Stale resourceVersion: optimistic concurrency says no.
    let err = api
        .replace("a", &PostParams::default(), &changed)
        .await
        .unwrap_err();
    assert!(
        matches!(err, kube::Error::Api(ref e) if e.code == 409 && e.reason == "Conflict"),
        "{err:?}"
    );
    let patched = api
        .patch(
            "a",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"data": {"extra": "1"}})),
        )
        .await
        .unwrap();
    assert_eq!(
        patched.data.unwrap().get("extra").map(String::as_str),
        Some("1")
    );
    let applied = api
        .patch("b", &PatchParams::apply("test").force(), &Patch::Apply(serde_json::json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "b"}, "data": {"x": "y"}})))
        .await
        .unwrap();
    assert_eq!(applied.metadata.name.as_deref(), Some("b"));
    let listed = api
        .list(&ListParams::default().labels("app=x"))
        .await
        .unwrap();
    assert_eq!(listed.items.len(), 1);
    assert!(listed.metadata.resource_version.is_some());
    api.delete("a", &DeleteParams::default()).await.unwrap();
    assert!(matches!(api.get("a").await.unwrap_err(), kube::Error::Api(ref e) if e.code == 404));
}

#[tokio::test]
async fn watches_stream_changes_and_resume() {
    let s = FakeApiServer::start().await;
    let c = client(&s).await;
    let api: Api<ConfigMap> = Api::namespaced(c.clone(), "default");
    let mut stream = watcher(api.clone(), watcher::Config::default().labels("app=w"))
        .applied_objects()
        .boxed();
    api.create(&PostParams::default(), &cm("ignored", &[("app", "other")]))
        .await
        .unwrap();
    api.create(&PostParams::default(), &cm("w1", &[("app", "w")]))
        .await
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        got.metadata.name.as_deref(),
        Some("w1"),
        "label selector applies to watches"
    );
    api.patch(
        "w1",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"data": {"n": "2"}})),
    )
    .await
    .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(got.data.unwrap().get("n").map(String::as_str), Some("2"));
}

#[tokio::test]
async fn deleting_an_owner_cascades() {
    let s = FakeApiServer::start().await;
    let c = client(&s).await;
    let cms: Api<ConfigMap> = Api::namespaced(c.clone(), "default");
    let secrets: Api<Secret> = Api::namespaced(c, "default");
    let owner = cms
        .create(&PostParams::default(), &cm("owner", &[]))
        .await
        .unwrap();
    let child: Secret = serde_json::from_value(serde_json::json!({"metadata": {"name": "child", "ownerReferences": [{
        "apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner.metadata.uid.unwrap(), "controller": true}]}})).unwrap();
    secrets
        .create(&PostParams::default(), &child)
        .await
        .unwrap();
    cms.delete("owner", &DeleteParams::default()).await.unwrap();
    assert!(
        secrets.get_opt("child").await.unwrap().is_none(),
        "owned object garbage-collected"
    );
}

#[tokio::test]
async fn a_write_that_changes_nothing_is_a_no_op_and_status_is_a_subresource() {
    let s = FakeApiServer::start().await;
    let api: Api<ConfigMap> = Api::namespaced(client(&s).await, "default");
    let body = serde_json::json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "same"}, "data": {"x": "y"}});
    let pp = PatchParams::apply("test").force();
    let first = api.patch("same", &pp, &Patch::Apply(&body)).await.unwrap();
    let again = api.patch("same", &pp, &Patch::Apply(&body)).await.unwrap();
    assert_eq!(
        first.metadata.resource_version, again.metadata.resource_version,
        "no new version for an unchanged object"
    );
    let changed = serde_json::json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "same"}, "data": {"x": "z"}});
    let third = api
        .patch("same", &pp, &Patch::Apply(&changed))
        .await
        .unwrap();
    assert_ne!(
        first.metadata.resource_version,
        third.metadata.resource_version
    );

    // A status sent with a create or a main-resource update is ignored; /status sets it.
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client(&s).await, "default");
    let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "image": "i"}]}, "status": {"phase": "Running"}})).unwrap();
    let created = pods.create(&PostParams::default(), &pod).await.unwrap();
    assert!(created.status.is_none());
    let patched = pods
        .patch_status(
            "p",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"status": {"phase": "Running"}})),
        )
        .await
        .unwrap();
    assert_eq!(patched.status.unwrap().phase.as_deref(), Some("Running"));
    assert_eq!(
        patched.metadata.generation,
        Some(1),
        "status changes never bump the generation"
    );
    let mut replaced = pods.get("p").await.unwrap();
    replaced.status = None;
    replaced.metadata.labels = Some([("a".to_string(), "b".to_string())].into());
    let replaced = pods
        .replace("p", &PostParams::default(), &replaced)
        .await
        .unwrap();
    assert_eq!(
        replaced.status.unwrap().phase.as_deref(),
        Some("Running"),
        "status kept on a main-resource update"
    );
}
