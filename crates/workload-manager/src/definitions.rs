//! CodeInterpreter / AgentRuntime definitions: loaded from a directory of the same YAML a cluster
//! takes and reloaded when the files change (polled; no restart needed), or kept in step with the
//! cluster's CRs by the Kubernetes backend.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use agentcube_crds::CodeInterpreter;
use agentcube_crds::manifest::{self, Definition};
use agentcube_types::api::WorkloadKind;

use crate::backend::Workload;

type Key = (WorkloadKind, String, String);

/// The definitions currently known.
#[derive(Default)]
pub struct Definitions {
    map: RwLock<HashMap<Key, Workload>>,
    fingerprint: RwLock<Vec<(PathBuf, Option<SystemTime>, u64)>>,
}

impl std::fmt::Debug for Definitions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Definitions")
            .field("count", &self.map.read().unwrap().len())
            .finish()
    }
}

fn fingerprint(dir: &Path) -> Vec<(PathBuf, Option<SystemTime>, u64)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter_map(|e| {
            let m = e.metadata().ok()?;
            Some((e.path(), m.modified().ok(), m.len()))
        })
        .collect();
    v.sort();
    v
}

fn key_of(kind: WorkloadKind, w: &Workload) -> Key {
    (kind, w.namespace(), w.name().to_string())
}

impl Definitions {
    /// Empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// The definition of `kind` `namespace/name`.
    pub fn get(&self, kind: WorkloadKind, namespace: &str, name: &str) -> Option<Workload> {
        let key = (kind, namespace.to_string(), name.to_string());
        self.map.read().unwrap().get(&key).cloned()
    }

    /// Every CodeInterpreter (for warm pools).
    pub fn code_interpreters(&self) -> Vec<Arc<CodeInterpreter>> {
        self.map
            .read()
            .unwrap()
            .values()
            .filter_map(|w| match w {
                Workload::CodeInterpreter(c) => Some(c.clone()),
                Workload::AgentRuntime(_) => None,
            })
            .collect()
    }

    /// Replaces every definition of `kind` (the cluster's current list of that CRD).
    pub fn replace_kind(&self, kind: WorkloadKind, workloads: Vec<Workload>) {
        let mut map = self.map.write().unwrap();
        map.retain(|k, _| k.0 != kind);
        for w in workloads {
            map.insert(key_of(kind, &w), w);
        }
    }

    /// Adds or replaces one definition.
    pub fn insert(&self, kind: WorkloadKind, workload: Workload) {
        self.map
            .write()
            .unwrap()
            .insert(key_of(kind, &workload), workload);
    }

    /// Replaces the whole set.
    pub fn replace(&self, defs: Vec<Definition>) {
        let map = defs
            .into_iter()
            .map(|d| {
                let (ns, name) = d.key();
                match d {
                    Definition::CodeInterpreter(c) => (
                        (WorkloadKind::CodeInterpreter, ns, name),
                        Workload::CodeInterpreter(Arc::from(c)),
                    ),
                    Definition::AgentRuntime(a) => (
                        (WorkloadKind::AgentRuntime, ns, name),
                        Workload::AgentRuntime(Arc::from(a)),
                    ),
                }
            })
            .collect();
        *self.map.write().unwrap() = map;
    }

    /// Loads `dir` if its files changed since the last call. Returns `true` when the set changed.
    /// Refused documents are logged and skipped; the others still load.
    pub fn reload_if_changed(&self, dir: &Path) -> std::io::Result<bool> {
        let fp = fingerprint(dir);
        if *self.fingerprint.read().unwrap() == fp && !fp.is_empty() {
            return Ok(false);
        }
        let (defs, errors) = manifest::load_dir(dir)?;
        for e in &errors {
            tracing::error!(error = %e, "manifest refused");
        }
        tracing::info!(dir = %dir.display(), definitions = defs.len(), "definitions loaded");
        self.replace(defs);
        *self.fingerprint.write().unwrap() = fp;
        Ok(true)
    }
}
