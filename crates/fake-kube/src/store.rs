//! The object store behind the fake API server: objects by (collection, name), a global
//! `resourceVersion`, an event log for watches, and owner-reference cascade on delete.
//!
//! Writes behave like the API server's: a create of an existing name is 409 AlreadyExists, a
//! replace with a stale `metadata.resourceVersion` is 409 Conflict, and a write that changes
//! nothing is a no-op (no new resourceVersion, no watch event), which is what keeps controllers
//! that apply their desired state on every reconcile from looping.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use serde_json::{Value, json};
use tokio::sync::broadcast;

/// Events kept for watch resumption; older resourceVersions get 410 Gone.
const EVENT_LOG: usize = 10_000;

/// Where objects of one kind live: API prefix (`api/v1`, `apis/G/V`), namespace (empty for
/// cluster-scoped or "every namespace" in queries), plural.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Collection {
    pub prefix: String,
    pub namespace: String,
    pub plural: String,
}

/// A kind the simulation works with: API prefix and plural.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Kind {
    pub prefix: &'static str,
    pub plural: &'static str,
}

impl Kind {
    /// The collection of this kind in `namespace`.
    pub fn in_ns(&self, namespace: &str) -> Collection {
        Collection {
            prefix: self.prefix.into(),
            namespace: namespace.into(),
            plural: self.plural.into(),
        }
    }
}

/// A failed API call, as the API server reports it (`Status` object).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.code, self.reason, self.message)
    }
}

impl ApiError {
    pub(crate) fn new(code: u16, reason: &'static str, message: String) -> Self {
        Self {
            code,
            reason,
            message,
        }
    }

    fn not_found(c: &Collection, name: &str) -> Self {
        Self::new(
            404,
            "NotFound",
            format!("{} \"{name}\" not found", c.plural),
        )
    }
}

/// One request, as an API server's audit log has it: who asked for which verb on what.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct AuditEntry {
    /// `get`, `list`, `watch`, `create`, `update`, `patch` or `delete` (RBAC verbs).
    pub verb: String,
    /// API group (`""` for the core group).
    pub group: String,
    /// Plural, with `/status` for the subresource (as RBAC names it).
    pub resource: String,
    /// Empty for cluster-wide requests.
    pub namespace: String,
    pub name: String,
    /// The client's `User-Agent`.
    pub user_agent: String,
}

/// One change, as a watch reports it.
#[derive(Clone, Debug)]
pub(crate) struct Event {
    pub rv: u64,
    pub collection: Collection,
    pub kind: &'static str,
    pub object: Value,
}

#[derive(Default)]
pub(crate) struct Store {
    pub rv: u64,
    pub objects: BTreeMap<(Collection, String), Value>,
    pub log: Vec<Event>,
    /// Every REST request (an audit log, for tests).
    pub audit: Vec<AuditEntry>,
}

/// Shared state of the fake server. Cheap to clone.
#[derive(Clone)]
pub struct Cluster {
    pub(crate) store: Arc<Mutex<Store>>,
    pub(crate) events: broadcast::Sender<Event>,
}

impl Default for Cluster {
    fn default() -> Self {
        let (events, _) = broadcast::channel(4096);
        Self {
            store: Arc::new(Mutex::new(Store::default())),
            events,
        }
    }
}

fn uid_of(v: &Value) -> String {
    v.pointer("/metadata/uid")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

/// Whether `c` is inside the scope of a query (`namespace` empty: every namespace).
pub(crate) fn in_scope(
    c: &Collection,
    prefix: &str,
    namespace: Option<&str>,
    plural: &str,
) -> bool {
    c.prefix == prefix && c.plural == plural && namespace.is_none_or(|n| c.namespace == n)
}

impl Cluster {
    fn emit(&self, store: &mut Store, collection: Collection, kind: &'static str, object: Value) {
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
        let _ = self.events.send(e);
    }

    /// Every REST request received so far.
    pub fn audit(&self) -> Vec<AuditEntry> {
        self.store.lock().unwrap().audit.clone()
    }

    pub(crate) fn record(&self, entry: AuditEntry) {
        self.store.lock().unwrap().audit.push(entry);
    }

    /// Notified of every change (the simulation's trigger).
    pub(crate) fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// A snapshot of every object in a collection (for assertions in tests).
    pub fn list(&self, prefix: &str, namespace: &str, plural: &str) -> Vec<Value> {
        let store = self.store.lock().unwrap();
        store
            .objects
            .iter()
            .filter(|((c, _), _)| in_scope(c, prefix, Some(namespace), plural))
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// Every object of a kind, in every namespace.
    pub fn list_kind(&self, kind: Kind) -> Vec<Value> {
        let store = self.store.lock().unwrap();
        store
            .objects
            .iter()
            .filter(|((c, _), _)| in_scope(c, kind.prefix, None, kind.plural))
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// One object.
    pub fn get(&self, collection: &Collection, name: &str) -> Option<Value> {
        self.store
            .lock()
            .unwrap()
            .objects
            .get(&(collection.clone(), name.to_string()))
            .cloned()
    }

    /// Creates `obj` (named by `metadata.name`, or `metadata.generateName` plus a suffix).
    pub fn create(&self, collection: Collection, obj: Value) -> Result<Value, ApiError> {
        let name = obj
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
            .map(str::to_string)
            .or_else(|| {
                obj.pointer("/metadata/generateName")
                    .and_then(Value::as_str)
                    .map(|g| format!("{g}{}", &uuid::Uuid::new_v4().simple().to_string()[..5]))
            })
            .ok_or_else(|| ApiError::new(422, "Invalid", "metadata.name: Required value".into()))?;
        let mut obj = obj;
        // `status` is a subresource: a create never sets it.
        if let Some(o) = obj.as_object_mut() {
            o.remove("status");
        }
        self.write(collection, &name, obj, true)
    }

    /// Replaces an existing object (optimistic concurrency when it carries a resourceVersion).
    /// `status` is a subresource: it keeps its current value whatever the body says.
    pub fn replace(
        &self,
        collection: Collection,
        name: &str,
        obj: Value,
    ) -> Result<Value, ApiError> {
        let mut obj = obj;
        if let (Some(current), Some(o)) = (self.get(&collection, name), obj.as_object_mut()) {
            match current.get("status") {
                Some(s) => o.insert("status".into(), s.clone()),
                None => o.remove("status"),
            };
        }
        self.write(collection, name, obj, false)
    }

    /// Sets `status` of an existing object (the `/status` subresource; nothing else changes).
    pub fn replace_status(
        &self,
        collection: Collection,
        name: &str,
        status: Value,
    ) -> Result<Value, ApiError> {
        let mut current = self
            .get(&collection, name)
            .ok_or_else(|| ApiError::not_found(&collection, name))?;
        current["status"] = status;
        if let Some(m) = current.get_mut("metadata").and_then(Value::as_object_mut) {
            m.remove("resourceVersion");
        }
        self.write(collection, name, current, false)
    }

    pub(crate) fn write(
        &self,
        collection: Collection,
        name: &str,
        mut obj: Value,
        create: bool,
    ) -> Result<Value, ApiError> {
        let mut store = self.store.lock().unwrap();
        let key = (collection.clone(), name.to_string());
        let existing = store.objects.get(&key).cloned();
        match (&existing, create) {
            (Some(_), true) => {
                return Err(ApiError::new(
                    409,
                    "AlreadyExists",
                    format!("{} \"{name}\" already exists", collection.plural),
                ));
            }
            (None, false) => return Err(ApiError::not_found(&collection, name)),
            _ => {}
        }
        if !obj.is_object() {
            return Err(ApiError::new(
                400,
                "BadRequest",
                "the body is not an object".into(),
            ));
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
                return Err(ApiError::new(
                    409,
                    "Conflict",
                    format!(
                        "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
                        collection.plural
                    ),
                ));
            }
        }
        if collection.plural == "secrets" {
            secret_string_data(&mut obj);
        }
        let spec_changed = existing
            .as_ref()
            .is_some_and(|old| old.get("spec") != obj.get("spec"));
        let meta = obj
            .as_object_mut()
            .unwrap()
            .entry("metadata")
            .or_insert_with(|| json!({}));
        if !meta.is_object() {
            *meta = json!({});
        }
        meta["name"] = json!(name);
        if !collection.namespace.is_empty() {
            meta["namespace"] = json!(collection.namespace);
        }
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
                // A write that changes nothing is a no-op, as on a real API server.
                meta["resourceVersion"] = old["metadata"]["resourceVersion"].clone();
                if &obj == old {
                    return Ok(obj);
                }
            }
        }
        store.rv += 1;
        let rv = store.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        store.objects.insert(key, obj.clone());
        let kind = if existing.is_some() {
            "MODIFIED"
        } else {
            "ADDED"
        };
        self.emit(&mut store, collection, kind, obj.clone());
        Ok(obj)
    }

    /// Deletes an object and, recursively, everything whose `ownerReferences` name it.
    pub fn delete(&self, collection: Collection, name: &str) -> Result<Value, ApiError> {
        let mut store = self.store.lock().unwrap();
        let removed = store
            .objects
            .remove(&(collection.clone(), name.to_string()))
            .ok_or_else(|| ApiError::not_found(&collection, name))?;
        store.rv += 1;
        let mut gone = removed.clone();
        gone["metadata"]["resourceVersion"] = json!(store.rv.to_string());
        self.emit(&mut store, collection, "DELETED", gone);
        let mut uids = vec![uid_of(&removed)];
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
                    uids.push(uid_of(&v));
                    store.rv += 1;
                    let mut gone = v;
                    gone["metadata"]["resourceVersion"] = json!(store.rv.to_string());
                    self.emit(&mut store, k.0, "DELETED", gone);
                }
            }
        }
        Ok(removed)
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
