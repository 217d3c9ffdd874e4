//! CodeInterpreter / AgentRuntime definitions: loaded from a directory of the same YAML a cluster
//! takes and reloaded when the files change (polled; no restart needed), or kept in step with the
//! cluster's CRs by the Kubernetes backend.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

use agentcube_crds::manifest::{self, Definition};
use agentcube_crds::{AgentRuntime, CodeInterpreter, TargetPort};
use agentcube_types::api::WorkloadKind;

use crate::budget::Budget;

/// A definition a sandbox is made from.
#[derive(Debug, Clone)]
pub enum Workload {
    CodeInterpreter(Arc<CodeInterpreter>),
    AgentRuntime(Arc<AgentRuntime>),
}

impl Workload {
    /// The definition's object metadata.
    pub fn meta(&self) -> &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
        match self {
            Self::CodeInterpreter(c) => &c.metadata,
            Self::AgentRuntime(a) => &a.metadata,
        }
    }

    /// `metadata.name`.
    pub fn name(&self) -> &str {
        self.meta().name.as_deref().unwrap_or_default()
    }

    /// `metadata.namespace` (`default` when unset, as `kubectl apply` would).
    pub fn namespace(&self) -> String {
        self.meta()
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into())
    }

    /// `CodeInterpreter` or `AgentRuntime`.
    pub fn kind(&self) -> agentcube_types::api::WorkloadKind {
        match self {
            Self::CodeInterpreter(_) => agentcube_types::api::WorkloadKind::CodeInterpreter,
            Self::AgentRuntime(_) => agentcube_types::api::WorkloadKind::AgentRuntime,
        }
    }

    /// `spec.networkPolicy`, when present.
    pub fn network_policy(&self) -> Option<&agentcube_crds::NetworkPolicySpec> {
        match self {
            Self::CodeInterpreter(c) => c.spec.network_policy.as_ref(),
            Self::AgentRuntime(a) => a.spec.network_policy.as_ref(),
        }
    }

    /// The ports sandboxes of this definition serve (a CodeInterpreter defaults to PicoD's).
    pub fn ports(&self) -> Vec<TargetPort> {
        match self {
            Self::CodeInterpreter(c) => c.spec.effective_ports(),
            Self::AgentRuntime(a) => a.spec.target_port.clone(),
        }
    }

    /// Name of a new sandbox of this definition: `<name>-<8 random [a-z0-9]>` (upstream's scheme),
    /// the name cut to 54 characters.
    pub fn sandbox_name(&self) -> String {
        let n = uuid::Uuid::new_v4().as_u128();
        let alphabet = b"abcdefghijklmnopqrstuvwxyz0123456789";
        let suffix: String = (0..8)
            .map(|i| alphabet[((n >> (i * 6)) % 36) as usize] as char)
            .collect();
        // At most 63 characters (as generateName makes names): a label value on its pods, and
        // the pod's host name.
        let name = self.name();
        let cut = name.char_indices().nth(54).map_or(name.len(), |(i, _)| i);
        format!("{}-{suffix}", name[..cut].trim_end_matches(['-', '.']))
    }

    /// Whether sandboxes must verify the Router's token.
    pub fn needs_key(&self) -> bool {
        match self {
            Self::CodeInterpreter(c) => c.spec.auth_mode == agentcube_crds::AuthMode::Picod,
            // Upstream injects no key into AgentRuntime pods; agents do their own auth.
            Self::AgentRuntime(_) => false,
        }
    }
}

type Key = (WorkloadKind, String, String);

/// Where definitions live, when they can be asked for one directly (a cluster's API server).
#[async_trait::async_trait]
pub trait Source: Send + Sync {
    /// The definition of `kind` `namespace/name` at the source, if it exists.
    async fn fetch(&self, kind: WorkloadKind, namespace: &str, name: &str) -> Option<Workload>;
}

/// The definitions currently known.
pub struct Definitions {
    map: RwLock<HashMap<Key, Workload>>,
    loaded: Mutex<Loaded>,
    source: Option<Arc<dyn Source>>,
    fetches: Mutex<Budget>,
}

/// How many definitions may be asked of the source ([`Definitions::lookup`]) a second, and at
/// once. Each ask is a request at the API server that a client's create causes, and names no
/// definition has are free to make up: unbounded, one client made the Workload Manager send the
/// API server a GET per request. The watch delivers a new CR within milliseconds, so asks are
/// rare in normal use.
const FETCH_RATE: f64 = 10.0;
const FETCH_BURST: f64 = 20.0;

impl Default for Definitions {
    fn default() -> Self {
        Self {
            map: RwLock::default(),
            loaded: Mutex::default(),
            source: None,
            fetches: Mutex::new(Budget::new(FETCH_RATE, FETCH_BURST)),
        }
    }
}

/// What the manifest directory held at its last reading.
#[derive(Default)]
struct Loaded {
    fingerprint: Vec<(PathBuf, Option<SystemTime>, u64)>,
    /// Each file's definitions as last loaded (a refused file keeps its previous ones).
    files: BTreeMap<PathBuf, Vec<Definition>>,
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

    /// Empty set that asks `source` for definitions it does not know yet ([`Self::lookup`]).
    pub fn with_source(source: Arc<dyn Source>) -> Self {
        Self {
            source: Some(source),
            ..Self::default()
        }
    }

    /// [`Self::get`], or, when not known yet (a CR applied a moment ago that the watch has not
    /// delivered), the source's answer, remembered; asks are rationed ([`FETCH_RATE`]).
    pub async fn lookup(
        &self,
        kind: WorkloadKind,
        namespace: &str,
        name: &str,
    ) -> Option<Workload> {
        if let Some(w) = self.get(kind, namespace, name) {
            return Some(w);
        }
        let source = self.source.as_ref()?;
        if !self.fetches.lock().unwrap().take() {
            tracing::debug!(namespace, name, "definition not asked for: too many asks");
            return None;
        }
        let found = source.fetch(kind, namespace, name).await?;
        self.insert(kind, found.clone());
        Some(found)
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

    /// Replaces the whole set. A definition given twice (the same kind, namespace and name in
    /// two files) is logged; the later one wins, as a second `kubectl apply` of it would.
    fn replace(&self, defs: Vec<Definition>) {
        let mut map = HashMap::new();
        for d in defs {
            let (ns, name) = d.key();
            let (kind, workload) = match d {
                Definition::CodeInterpreter(c) => (
                    WorkloadKind::CodeInterpreter,
                    Workload::CodeInterpreter(Arc::from(c)),
                ),
                Definition::AgentRuntime(a) => (
                    WorkloadKind::AgentRuntime,
                    Workload::AgentRuntime(Arc::from(a)),
                ),
            };
            let key = (kind, ns, name);
            if map.contains_key(&key) {
                tracing::warn!(kind = ?key.0, namespace = %key.1, name = %key.2,
                    "definition given more than once; the last one (by file name) is used");
            }
            map.insert(key, workload);
        }
        *self.map.write().unwrap() = map;
    }

    /// Loads `dir` if its files changed since the last call. Returns `true` when it was read.
    /// A refused file (not YAML, a document the schema refuses, unreadable) is logged and keeps
    /// the definitions it last loaded with (none if it never loaded): a typo while editing a
    /// manifest does not take its definitions, and their warm pools, away. The other files
    /// load; a deleted file's definitions go.
    pub fn reload_if_changed(&self, dir: &Path) -> std::io::Result<bool> {
        let fp = fingerprint(dir);
        let mut loaded = self.loaded.lock().unwrap();
        if loaded.fingerprint == fp && !fp.is_empty() {
            return Ok(false);
        }
        let outcomes = manifest::load_dir(dir)?;
        let mut previous = std::mem::take(&mut loaded.files);
        for (path, outcome) in outcomes {
            let defs = outcome.unwrap_or_else(|e| {
                let kept = previous.remove(&path).unwrap_or_default();
                tracing::error!(error = %e, kept = kept.len(),
                    "manifest refused; the definitions it loaded with before stay");
                kept
            });
            loaded.files.insert(path, defs);
        }
        let defs: Vec<Definition> = loaded.files.values().flatten().cloned().collect();
        tracing::info!(dir = %dir.display(), definitions = defs.len(), "definitions loaded");
        self.replace(defs);
        loaded.fingerprint = fp;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn named(name: &str) -> Workload {
        let yaml = format!(
            "apiVersion: runtime.agentcube.volcano.sh/v1alpha1\nkind: CodeInterpreter\n\
             metadata: {{name: {name}}}\nspec:\n  template: {{}}\n"
        );
        match agentcube_crds::manifest::load(&yaml, "t")
            .unwrap()
            .remove(0)
        {
            agentcube_crds::manifest::Definition::CodeInterpreter(c) => {
                Workload::CodeInterpreter(Arc::new(*c))
            }
            _ => unreachable!(),
        }
    }

    fn ci(name: &str, image: &str) -> String {
        format!(
            "apiVersion: runtime.agentcube.volcano.sh/v1alpha1\nkind: CodeInterpreter\n\
             metadata: {{name: {name}}}\nspec:\n  template: {{image: {image}}}\n"
        )
    }

    fn image_of(defs: &Definitions, name: &str) -> Option<String> {
        match defs.get(WorkloadKind::CodeInterpreter, "default", name)? {
            Workload::CodeInterpreter(c) => c.spec.template.image.clone(),
            Workload::AgentRuntime(_) => None,
        }
    }

    #[test]
    fn a_refused_manifest_keeps_what_it_loaded_with_before() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.yaml"), dir.path().join("b.yaml"));
        std::fs::write(&a, ci("one", "img:1")).unwrap();
        std::fs::write(&b, ci("two", "img:1")).unwrap();
        let defs = Definitions::new();
        assert!(defs.reload_if_changed(dir.path()).unwrap());
        assert_eq!(image_of(&defs, "one").as_deref(), Some("img:1"));

        // A typo while editing `a`, and `b` changed in the same round: `a` keeps its previous
        // definition, `b` takes its new one.
        std::fs::write(&a, ci("one", "img:2") + "garbage: [\n").unwrap();
        std::fs::write(&b, ci("two", "img:22")).unwrap();
        assert!(defs.reload_if_changed(dir.path()).unwrap());
        assert_eq!(image_of(&defs, "one").as_deref(), Some("img:1"));
        assert_eq!(image_of(&defs, "two").as_deref(), Some("img:22"));
        // Refused by the schema, or unreadable: the same.
        std::fs::write(&a, ci("one", "[x]")).unwrap();
        assert!(defs.reload_if_changed(dir.path()).unwrap());
        assert_eq!(image_of(&defs, "one").as_deref(), Some("img:1"));
        std::fs::write(&a, b"\xff\xfe not UTF-8").unwrap();
        assert!(defs.reload_if_changed(dir.path()).unwrap());
        assert_eq!(image_of(&defs, "one").as_deref(), Some("img:1"));

        // Fixed: it loads; deleted: its definitions go.
        std::fs::write(&a, ci("one", "img:3")).unwrap();
        assert!(defs.reload_if_changed(dir.path()).unwrap());
        assert_eq!(image_of(&defs, "one").as_deref(), Some("img:3"));
        std::fs::remove_file(&a).unwrap();
        assert!(defs.reload_if_changed(dir.path()).unwrap());
        assert_eq!(image_of(&defs, "one"), None);
        assert_eq!(image_of(&defs, "two").as_deref(), Some("img:22"));

        // A file refused from the start gives nothing, and the others still load.
        std::fs::write(&a, "garbage: [\n").unwrap();
        let fresh = Definitions::new();
        assert!(fresh.reload_if_changed(dir.path()).unwrap());
        assert_eq!(image_of(&fresh, "one"), None);
        assert_eq!(image_of(&fresh, "two").as_deref(), Some("img:22"));
    }

    #[test]
    fn sandbox_names_fit_a_label_value_and_stay_valid_names() {
        let short = named("ci").sandbox_name();
        assert!(short.starts_with("ci-") && short.len() == 11, "{short}");
        // 53 characters then a dot: the cut lands after it, which is trimmed.
        let long = format!("{}.b{}", "a".repeat(53), "c".repeat(100));
        let name = named(&long).sandbox_name();
        assert_eq!(name.len(), 62, "{name}");
        assert!(name.starts_with(&format!("{}-", "a".repeat(53))), "{name}");
    }
}
