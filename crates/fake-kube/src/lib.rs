//! TEST SUPPORT ONLY: a small in-memory Kubernetes API server, because no kube-apiserver can run
//! on the build machines. It is never a dependency of a shipped binary.
//!
//! Main flow: [`FakeApiServer::start`] serves the REST API on a loopback port; a `kube::Client`
//! pointed at [`FakeApiServer::url`] talks to it like to a cluster.
//!
//! Honest where it matters to controllers:
//! - every write bumps a global `resourceVersion`; lists carry it; `replace` with a stale
//!   `metadata.resourceVersion` is a 409 Conflict; `create` of an existing name is 409 AlreadyExists;
//! - `watch` streams JSON lines (`ADDED`/`MODIFIED`/`DELETED`, `BOOKMARK`s when asked), resumes
//!   from a `resourceVersion`, and answers 410 Gone (as an `ERROR` event) for one too old;
//! - label selectors (`a=b`, `a!=b`, `a`, `!a`) and `metadata.name` field selectors;
//! - merge patch, JSON patch, and apply patch (applied as a merge), and the `/status` subresource
//!   (only `status` changes there; `metadata.generation` bumps on spec changes only);
//! - delete cascades to objects whose `ownerReferences` name the deleted object's uid.
//!
//! Not modelled: admission, defaulting, field managers, finalizers, and real SSA field ownership.

// Handlers return ready-made error responses; boxing them would only add noise to test support.
#![allow(clippy::result_large_err)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use serde_json::{Value, json};
use tokio::sync::broadcast;

/// Events kept for watch resumption; older resourceVersions get 410 Gone.
const EVENT_LOG: usize = 10_000;

/// (api prefix, namespace, plural) — e.g. ("apis/agents.x-k8s.io/v1alpha1", "default", "sandboxes").
type Collection = (String, String, String);

#[derive(Clone, Debug)]
struct Event {
    rv: u64,
    collection: Collection,
    kind: &'static str,
    object: Value,
}

#[derive(Default)]
struct Store {
    rv: u64,
    objects: BTreeMap<(Collection, String), Value>,
    log: Vec<Event>,
}

/// Shared state of the fake server.
#[derive(Clone)]
pub struct Cluster {
    store: Arc<Mutex<Store>>,
    events: broadcast::Sender<Event>,
}

/// A running fake API server.
pub struct FakeApiServer {
    pub url: String,
    pub cluster: Cluster,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeApiServer {
    /// Serves on a free loopback port.
    pub async fn start() -> Self {
        let (events, _) = broadcast::channel(4096);
        let cluster = Cluster {
            store: Arc::new(Mutex::new(Store::default())),
            events,
        };
        let app = axum::Router::new()
            .route("/{*path}", any(handle))
            .with_state(cluster.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Self { url, cluster, task }
    }
}

/// A parsed request path.
struct Target {
    prefix: String,
    namespace: Option<String>,
    plural: String,
    name: Option<String>,
    status: bool,
}

fn parse_path(path: &str) -> Option<Target> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (prefix, rest) = match *parts.first()? {
        "api" => (format!("api/{}", parts.get(1)?), &parts[2..]),
        "apis" => (
            format!("apis/{}/{}", parts.get(1)?, parts.get(2)?),
            &parts[3..],
        ),
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some(ns.to_string()), rest),
        _ => (None, rest),
    };
    let plural = rest.first()?.to_string();
    let name = rest.get(1).map(|s| s.to_string());
    let status = rest.get(2) == Some(&"status");
    Some(Target {
        prefix,
        namespace,
        plural,
        name,
        status,
    })
}

fn status_body(code: u16, reason: &str, message: String) -> Response {
    let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                      "message": message, "reason": reason, "code": code});
    (StatusCode::from_u16(code).unwrap(), axum::Json(body)).into_response()
}

fn matches_labels(obj: &Value, selector: &str) -> bool {
    let labels = obj.pointer("/metadata/labels").and_then(Value::as_object);
    let get = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
    selector.split(',').filter(|s| !s.is_empty()).all(|term| {
        if let Some((k, v)) = term.split_once("!=") {
            get(k.trim()) != Some(v.trim())
        } else if let Some((k, v)) = term.split_once('=') {
            get(k.trim().trim_end_matches('=')) == Some(v.trim())
        } else if let Some(k) = term.strip_prefix('!') {
            get(k.trim()).is_none()
        } else {
            get(term.trim()).is_some()
        }
    })
}

fn matches_fields(obj: &Value, selector: &str) -> bool {
    selector
        .split(',')
        .filter(|s| !s.is_empty())
        .all(|term| match term.split_once('=') {
            Some(("metadata.name", v)) => {
                obj.pointer("/metadata/name").and_then(Value::as_str) == Some(v)
            }
            Some(("metadata.namespace", v)) => {
                obj.pointer("/metadata/namespace").and_then(Value::as_str) == Some(v)
            }
            _ => true,
        })
}

fn in_scope(c: &Collection, prefix: &str, ns: &Option<String>, plural: &str) -> bool {
    c.0 == prefix && c.2 == plural && ns.as_ref().is_none_or(|n| &c.1 == n)
}

impl Cluster {
    fn emit(
        store: &mut Store,
        events: &broadcast::Sender<Event>,
        collection: Collection,
        kind: &'static str,
        object: Value,
    ) {
        let e = Event {
            rv: store.rv,
            collection,
            kind,
            object,
        };
        store.log.push(e.clone());
        if store.log.len() > EVENT_LOG {
            store.log.remove(0);
        }
        let _ = events.send(e);
    }

    /// A snapshot of every object in a collection (for assertions in tests).
    pub fn list(&self, prefix: &str, namespace: &str, plural: &str) -> Vec<Value> {
        let store = self.store.lock().unwrap();
        store
            .objects
            .iter()
            .filter(|((c, _), _)| c.0 == prefix && c.1 == namespace && c.2 == plural)
            .map(|(_, v)| v.clone())
            .collect()
    }

    fn write(
        &self,
        collection: Collection,
        name: &str,
        mut obj: Value,
        create: bool,
    ) -> Result<Value, Response> {
        let mut store = self.store.lock().unwrap();
        let key = (collection.clone(), name.to_string());
        let existing = store.objects.get(&key).cloned();
        match (&existing, create) {
            (Some(_), true) => {
                return Err(status_body(
                    409,
                    "AlreadyExists",
                    format!("{} \"{name}\" already exists", collection.2),
                ));
            }
            (None, false) => {
                return Err(status_body(
                    404,
                    "NotFound",
                    format!("{} \"{name}\" not found", collection.2),
                ));
            }
            _ => {}
        }
        if let Some(old) = &existing {
            let sent = obj
                .pointer("/metadata/resourceVersion")
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty());
            let current = old
                .pointer("/metadata/resourceVersion")
                .and_then(Value::as_str);
            if sent.is_some() && sent != current {
                return Err(status_body(
                    409,
                    "Conflict",
                    format!(
                        "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
                        collection.2
                    ),
                ));
            }
        }
        if collection.2 == "secrets" {
            secret_string_data(&mut obj);
        }
        store.rv += 1;
        let rv = store.rv;
        let spec_changed = existing
            .as_ref()
            .is_some_and(|old| old.get("spec") != obj.get("spec"));
        let meta = obj
            .as_object_mut()
            .unwrap()
            .entry("metadata")
            .or_insert_with(|| json!({}));
        meta["name"] = json!(name);
        if !collection.1.is_empty() {
            meta["namespace"] = json!(collection.1);
        }
        meta["resourceVersion"] = json!(rv.to_string());
        match &existing {
            None => {
                meta["uid"] = json!(uuid::Uuid::new_v4().to_string());
                meta["creationTimestamp"] = json!(
                    jiff::Timestamp::now()
                        .strftime("%Y-%m-%dT%H:%M:%SZ")
                        .to_string()
                );
                meta["generation"] = json!(1);
            }
            Some(old) => {
                for k in ["uid", "creationTimestamp"] {
                    meta[k] = old["metadata"][k].clone();
                }
                let generation = old
                    .pointer("/metadata/generation")
                    .and_then(Value::as_i64)
                    .unwrap_or(1);
                meta["generation"] = json!(if spec_changed {
                    generation + 1
                } else {
                    generation
                });
            }
        }
        store.objects.insert(key, obj.clone());
        let kind = if existing.is_some() {
            "MODIFIED"
        } else {
            "ADDED"
        };
        Self::emit(&mut store, &self.events, collection, kind, obj.clone());
        Ok(obj)
    }

    fn delete(&self, collection: Collection, name: &str) -> Option<Value> {
        let mut store = self.store.lock().unwrap();
        let removed = store
            .objects
            .remove(&(collection.clone(), name.to_string()))?;
        store.rv += 1;
        let mut gone = removed.clone();
        gone["metadata"]["resourceVersion"] = json!(store.rv.to_string());
        Self::emit(&mut store, &self.events, collection, "DELETED", gone);
        // Cascade: everything owned by the deleted uid, recursively.
        let mut uids = vec![
            removed["metadata"]["uid"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        ];
        while let Some(uid) = uids.pop() {
            let owned: Vec<(Collection, String)> = store
                .objects
                .iter()
                .filter(|(_, v)| {
                    v.pointer("/metadata/ownerReferences")
                        .and_then(Value::as_array)
                        .is_some_and(|refs| refs.iter().any(|r| r["uid"] == json!(uid)))
                })
                .map(|(k, _)| k.clone())
                .collect();
            for k in owned {
                if let Some(v) = store.objects.remove(&k) {
                    uids.push(
                        v["metadata"]["uid"]
                            .as_str()
                            .unwrap_or_default()
                            .to_string(),
                    );
                    store.rv += 1;
                    let mut gone = v;
                    gone["metadata"]["resourceVersion"] = json!(store.rv.to_string());
                    Self::emit(&mut store, &self.events, k.0, "DELETED", gone);
                }
            }
        }
        Some(removed)
    }

    fn get(&self, collection: &Collection, name: &str) -> Option<Value> {
        self.store
            .lock()
            .unwrap()
            .objects
            .get(&(collection.clone(), name.to_string()))
            .cloned()
    }
}

/// As the API server does: `stringData` is folded into base64 `data` and never stored.
fn secret_string_data(obj: &mut Value) {
    use base64::Engine;
    let Some(string_data) = obj.as_object_mut().and_then(|o| o.remove("stringData")) else {
        return;
    };
    let data = obj
        .as_object_mut()
        .unwrap()
        .entry("data")
        .or_insert_with(|| json!({}));
    if let (Some(d), Some(sd)) = (data.as_object_mut(), string_data.as_object()) {
        for (k, v) in sd {
            let text = v.as_str().unwrap_or_default();
            d.insert(
                k.clone(),
                json!(base64::engine::general_purpose::STANDARD.encode(text)),
            );
        }
    }
}

fn merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

async fn handle(
    State(cluster): State<Cluster>,
    Path(path): Path<String>,
    Query(q): Query<BTreeMap<String, String>>,
    method: Method,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(t) = parse_path(&path) else {
        return status_body(
            404,
            "NotFound",
            format!("the server could not find the requested resource /{path}"),
        );
    };
    let ns = t.namespace.clone().unwrap_or_default();
    let collection: Collection = (t.prefix.clone(), ns.clone(), t.plural.clone());
    let parse_body = || -> Result<Value, Response> {
        let ct = headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if ct.contains("yaml") {
            serde_yaml::from_slice(&body).map_err(|e| status_body(400, "BadRequest", e.to_string()))
        } else {
            serde_json::from_slice(&body).map_err(|e| status_body(400, "BadRequest", e.to_string()))
        }
    };
    match (&method, &t.name) {
        (&Method::GET, None) if q.get("watch").is_some_and(|w| w == "true" || w == "1") => {
            watch(cluster, t, q)
        }
        (&Method::GET, None) => {
            let store = cluster.store.lock().unwrap();
            let items: Vec<Value> = store
                .objects
                .iter()
                .filter(|((c, _), v)| {
                    in_scope(c, &t.prefix, &t.namespace, &t.plural)
                        && q.get("labelSelector").is_none_or(|s| matches_labels(v, s))
                        && q.get("fieldSelector").is_none_or(|s| matches_fields(v, s))
                })
                .map(|(_, v)| v.clone())
                .collect();
            axum::Json(json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": store.rv.to_string()}, "items": items})).into_response()
        }
        (&Method::POST, None) => {
            let obj = match parse_body() {
                Ok(v) => v,
                Err(r) => return r,
            };
            let name = obj
                .pointer("/metadata/name")
                .and_then(Value::as_str)
                .map(str::to_string)
                .or_else(|| {
                    obj.pointer("/metadata/generateName")
                        .and_then(Value::as_str)
                        .map(|g| format!("{g}{}", &uuid::Uuid::new_v4().simple().to_string()[..5]))
                });
            let Some(name) = name else {
                return status_body(422, "Invalid", "metadata.name: Required value".into());
            };
            match cluster.write(collection, &name, obj, true) {
                Ok(v) => (StatusCode::CREATED, axum::Json(v)).into_response(),
                Err(r) => r,
            }
        }
        (&Method::GET, Some(name)) => match cluster.get(&collection, name) {
            Some(v) => axum::Json(v).into_response(),
            None => status_body(
                404,
                "NotFound",
                format!("{} \"{name}\" not found", t.plural),
            ),
        },
        (&Method::PUT, Some(name)) => {
            let mut obj = match parse_body() {
                Ok(v) => v,
                Err(r) => return r,
            };
            if t.status {
                let Some(mut current) = cluster.get(&collection, name) else {
                    return status_body(
                        404,
                        "NotFound",
                        format!("{} \"{name}\" not found", t.plural),
                    );
                };
                current["status"] = obj.get("status").cloned().unwrap_or(Value::Null);
                current["metadata"]["resourceVersion"] = obj
                    .pointer("/metadata/resourceVersion")
                    .cloned()
                    .unwrap_or(Value::Null);
                obj = current;
            }
            match cluster.write(collection, name, obj, false) {
                Ok(v) => axum::Json(v).into_response(),
                Err(r) => r,
            }
        }
        (&Method::PATCH, Some(name)) => {
            let ct = headers
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            let patch = match parse_body() {
                Ok(v) => v,
                Err(r) => return r,
            };
            let current = cluster.get(&collection, name);
            let is_apply = ct.contains("apply-patch");
            let mut obj = match (current, is_apply) {
                (Some(c), _) => c,
                (None, true) => json!({}),
                (None, false) => {
                    return status_body(
                        404,
                        "NotFound",
                        format!("{} \"{name}\" not found", t.plural),
                    );
                }
            };
            let create = obj == json!({});
            let mut patched = obj.clone();
            if ct.contains("json-patch") {
                let p: json_patch::Patch = match serde_json::from_value(patch) {
                    Ok(p) => p,
                    Err(e) => return status_body(400, "BadRequest", e.to_string()),
                };
                if let Err(e) = json_patch::patch(&mut patched, &p) {
                    return status_body(422, "Invalid", e.to_string());
                }
            } else {
                merge(&mut patched, &patch);
            }
            if t.status {
                obj["status"] = patched.get("status").cloned().unwrap_or(Value::Null);
            } else {
                if let Some(s) = obj.get("status").cloned() {
                    patched["status"] = s;
                }
                obj = patched;
            }
            if let Some(m) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
                m.remove("resourceVersion");
            }
            match cluster.write(collection, name, obj, create) {
                Ok(v) => axum::Json(v).into_response(),
                Err(r) => r,
            }
        }
        (&Method::DELETE, Some(name)) => match cluster.delete(collection, name) {
            Some(v) => axum::Json(v).into_response(),
            None => status_body(
                404,
                "NotFound",
                format!("{} \"{name}\" not found", t.plural),
            ),
        },
        _ => status_body(
            405,
            "MethodNotAllowed",
            format!("{method} not supported on /{path}"),
        ),
    }
}

fn watch(cluster: Cluster, t: Target, q: BTreeMap<String, String>) -> Response {
    let from: u64 = q
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let bookmarks = q.get("allowWatchBookmarks").is_some_and(|v| v == "true");
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|v| v.parse().ok())
        .unwrap_or(300u64);
    let (labels, fields) = (
        q.get("labelSelector").cloned(),
        q.get("fieldSelector").cloned(),
    );
    let mut rx = cluster.events.subscribe();
    let (backlog, current_rv, too_old) = {
        let store = cluster.store.lock().unwrap();
        let oldest = store
            .log
            .first()
            .map_or(store.rv, |e| e.rv.saturating_sub(1));
        let backlog: Vec<Event> = store.log.iter().filter(|e| e.rv > from).cloned().collect();
        (backlog, store.rv, from > 0 && from < oldest)
    };
    let wanted = move |e: &Event| {
        in_scope(&e.collection, &t.prefix, &t.namespace, &t.plural)
            && labels
                .as_deref()
                .is_none_or(|s| matches_labels(&e.object, s))
            && fields
                .as_deref()
                .is_none_or(|s| matches_fields(&e.object, s))
    };
    let (tx, out) = tokio::sync::mpsc::channel::<Bytes>(256);
    tokio::spawn(async move {
        let line = |v: Value| Bytes::from(format!("{v}\n"));
        if too_old {
            let status = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Expired",
                                "code": 410, "message": format!("too old resource version: {from}")});
            let _ = tx
                .send(line(json!({"type": "ERROR", "object": status})))
                .await;
            return;
        }
        let mut last = from.max(if from == 0 { current_rv } else { 0 });
        for e in backlog.into_iter().filter(|e| from > 0 && wanted(e)) {
            last = e.rv;
            if tx
                .send(line(json!({"type": e.kind, "object": e.object})))
                .await
                .is_err()
            {
                return;
            }
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout);
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(deadline) => return,
                _ = tick.tick(), if bookmarks => {
                    let bm = json!({"type": "BOOKMARK", "object": {"kind": "Bookmark", "apiVersion": "v1", "metadata": {"resourceVersion": last.to_string()}}});
                    if tx.send(line(bm)).await.is_err() { return; }
                }
                e = rx.recv() => match e {
                    Ok(e) if e.rv > last && wanted(&e) => {
                        last = e.rv;
                        if tx.send(line(json!({"type": e.kind, "object": e.object}))).await.is_err() { return; }
                    }
                    Ok(e) => { last = last.max(e.rv); }
                    Err(broadcast::error::RecvError::Lagged(_)) => return,
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        }
    });
    let stream = futures_util::stream::unfold(out, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, std::convert::Infallible>(b), rx))
    });
    Response::builder()
        .header("content-type", "application/json")
        .body(Body::from_stream(stream))
        .unwrap()
}
