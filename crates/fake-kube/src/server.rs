//! The REST surface: paths, verbs, selectors, patches and watches, over [`crate::store`].

use std::collections::BTreeMap;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::sync::broadcast;

use crate::store::{ApiError, AuditEntry, Cluster, Collection, Event, in_scope};

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
        "api" => (format!("api/{}", parts.get(1)?), parts.get(2..)?),
        "apis" => (
            format!("apis/{}/{}", parts.get(1)?, parts.get(2)?),
            parts.get(3..)?,
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

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                          "message": self.message, "reason": self.reason, "code": self.code});
        (
            StatusCode::from_u16(self.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            axum::Json(body),
        )
            .into_response()
    }
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

/// JSON merge patch (RFC 7386).
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

fn respond(r: Result<Value, ApiError>, ok: StatusCode) -> Response {
    match r {
        Ok(v) => (ok, axum::Json(v)).into_response(),
        Err(e) => e.into_response(),
    }
}

/// `GET /fake/audit`: the audit log as JSON (not a Kubernetes path; for tests driving the
/// `fake-cluster` binary).
pub(crate) async fn audit(State(cluster): State<Cluster>) -> Response {
    axum::Json(cluster.audit()).into_response()
}

pub(crate) async fn handle(
    State(cluster): State<Cluster>,
    Path(path): Path<String>,
    Query(q): Query<BTreeMap<String, String>>,
    method: Method,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(t) = parse_path(&path) else {
        return ApiError::new(
            404,
            "NotFound",
            format!("the server could not find the requested resource /{path}"),
        )
        .into_response();
    };
    cluster.record(AuditEntry {
        verb: match (&method, &t.name) {
            (&Method::GET, Some(_)) => "get",
            (&Method::GET, None) if q.get("watch").is_some_and(|w| w == "true" || w == "1") => {
                "watch"
            }
            (&Method::GET, None) => "list",
            (&Method::POST, _) => "create",
            (&Method::PUT, _) => "update",
            (&Method::PATCH, _) => "patch",
            (&Method::DELETE, _) => "delete",
            _ => "unknown",
        }
        .into(),
        group: t
            .prefix
            .strip_prefix("apis/")
            .and_then(|g| g.split('/').next())
            .unwrap_or("")
            .into(),
        resource: if t.status {
            format!("{}/status", t.plural)
        } else {
            t.plural.clone()
        },
        namespace: t.namespace.clone().unwrap_or_default(),
        name: t.name.clone().unwrap_or_default(),
        user_agent: headers
            .get("user-agent")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .into(),
    });
    let collection = Collection {
        prefix: t.prefix.clone(),
        namespace: t.namespace.clone().unwrap_or_default(),
        plural: t.plural.clone(),
    };
    let ct = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let parse_body = || -> Result<Value, ApiError> {
        let bad = |e: String| ApiError::new(400, "BadRequest", e);
        if ct.contains("yaml") {
            serde_yaml::from_slice(&body).map_err(|e| bad(e.to_string()))
        } else {
            serde_json::from_slice(&body).map_err(|e| bad(e.to_string()))
        }
    };
    let not_found = |name: &str| {
        ApiError::new(
            404,
            "NotFound",
            format!("{} \"{name}\" not found", t.plural),
        )
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
                    in_scope(c, &t.prefix, t.namespace.as_deref(), &t.plural)
                        && q.get("labelSelector").is_none_or(|s| matches_labels(v, s))
                        && q.get("fieldSelector").is_none_or(|s| matches_fields(v, s))
                })
                .map(|(_, v)| v.clone())
                .collect();
            axum::Json(json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": store.rv.to_string()}, "items": items})).into_response()
        }
        (&Method::POST, None) => match parse_body() {
            Ok(obj) => respond(cluster.create(collection, obj), StatusCode::CREATED),
            Err(e) => e.into_response(),
        },
        (&Method::GET, Some(name)) => match cluster.get(&collection, name) {
            Some(v) => axum::Json(v).into_response(),
            None => not_found(name).into_response(),
        },
        (&Method::PUT, Some(name)) => {
            let obj = match parse_body() {
                Ok(v) => v,
                Err(e) => return e.into_response(),
            };
            if t.status {
                let Some(mut current) = cluster.get(&collection, name) else {
                    return not_found(name).into_response();
                };
                current["status"] = obj.get("status").cloned().unwrap_or(Value::Null);
                current["metadata"]["resourceVersion"] = obj
                    .pointer("/metadata/resourceVersion")
                    .cloned()
                    .unwrap_or(Value::Null);
                respond(
                    cluster.write(collection, name, current, false),
                    StatusCode::OK,
                )
            } else {
                respond(cluster.replace(collection, name, obj), StatusCode::OK)
            }
        }
        (&Method::PATCH, Some(name)) => {
            let patch = match parse_body() {
                Ok(v) => v,
                Err(e) => return e.into_response(),
            };
            let is_apply = ct.contains("apply-patch");
            let current = cluster.get(&collection, name);
            let create = current.is_none();
            if create && !is_apply {
                return not_found(name).into_response();
            }
            let base = current.clone().unwrap_or_else(|| json!({}));
            let mut patched = base.clone();
            if ct.contains("json-patch") {
                let p: json_patch::Patch = match serde_json::from_value(patch) {
                    Ok(p) => p,
                    Err(e) => {
                        return ApiError::new(400, "BadRequest", e.to_string()).into_response();
                    }
                };
                if let Err(e) = json_patch::patch(&mut patched, &p) {
                    return ApiError::new(422, "Invalid", e.to_string()).into_response();
                }
            } else {
                merge(&mut patched, &patch);
            }
            if let Some(m) = patched.get_mut("metadata").and_then(Value::as_object_mut) {
                m.remove("resourceVersion");
            }
            let result = match (t.status, create) {
                (true, true) => Err(not_found(name)),
                (true, false) => {
                    let status = patched.get("status").cloned().unwrap_or(Value::Null);
                    cluster.replace_status(collection, name, status)
                }
                (false, true) => {
                    if let Some(m) = patched.get_mut("metadata").and_then(Value::as_object_mut) {
                        m.insert("name".into(), json!(name));
                    }
                    cluster.create(collection, patched)
                }
                (false, false) => cluster.replace(collection, name, patched),
            };
            respond(result, StatusCode::OK)
        }
        (&Method::DELETE, Some(name)) => respond(cluster.delete(collection, name), StatusCode::OK),
        _ => ApiError::new(
            405,
            "MethodNotAllowed",
            format!("{method} not supported on /{path}"),
        )
        .into_response(),
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
    let mut rx = cluster.subscribe();
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
        in_scope(&e.collection, &t.prefix, t.namespace.as_deref(), &t.plural)
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
                    // A watcher that fell behind is closed; the client re-lists, as with a real
                    // API server that drops a slow watch.
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
