//! Loading CodeInterpreter / AgentRuntime manifests from YAML, as the API server would take them.

use std::path::{Path, PathBuf};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde_json::Value;

use crate::{AgentRuntime, CodeInterpreter};

/// API version of our kinds.
pub const API_VERSION: &str = "runtime.agentcube.volcano.sh/v1alpha1";

/// A definition loaded from a manifest.
#[derive(Debug, Clone, PartialEq)]
pub enum Definition {
    CodeInterpreter(Box<CodeInterpreter>),
    AgentRuntime(Box<AgentRuntime>),
}

impl Definition {
    /// `namespace/name`.
    pub fn key(&self) -> (String, String) {
        let meta = match self {
            Self::CodeInterpreter(c) => &c.metadata,
            Self::AgentRuntime(a) => &a.metadata,
        };
        (
            meta.namespace.clone().unwrap_or_else(|| "default".into()),
            meta.name.clone().unwrap_or_default(),
        )
    }

    /// `spec.networkPolicy`, when present.
    pub fn network_policy(&self) -> Option<&crate::NetworkPolicySpec> {
        match self {
            Self::CodeInterpreter(c) => c.spec.network_policy.as_ref(),
            Self::AgentRuntime(a) => a.spec.network_policy.as_ref(),
        }
    }
}

/// Why a manifest document was refused.
#[derive(Debug, thiserror::Error)]
#[error("{source_name}: document {index} ({what}): {}", .errors.join("; "))]
pub struct ManifestError {
    pub source_name: String,
    pub index: usize,
    pub what: String,
    pub errors: Vec<String>,
}

/// The CRD's `openAPIV3Schema`, plus the root fields every object has (the API server adds them
/// implicitly; `metadata` is checked separately).
fn openapi_schema(crd: &CustomResourceDefinition) -> Value {
    let mut schema = crd
        .spec
        .versions
        .first()
        .and_then(|v| v.schema.as_ref())
        .and_then(|s| s.open_api_v3_schema.as_ref())
        .map(|s| serde_json::to_value(s).unwrap_or_default())
        .unwrap_or_default();
    if let Some(props) = schema.get_mut("properties").and_then(Value::as_object_mut) {
        props.insert("apiVersion".into(), serde_json::json!({"type": "string"}));
        props.insert("kind".into(), serde_json::json!({"type": "string"}));
        props.insert("metadata".into(), serde_json::json!({"type": "object"}));
    }
    schema
}

/// Parses every YAML document in `text`. Documents of other kinds (a Deployment next to an
/// AgentRuntime, say) are skipped; documents of our kinds must pass the CRD schema.
pub fn load(text: &str, source_name: &str) -> Result<Vec<Definition>, ManifestError> {
    let mut out = Vec::new();
    for (index, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let fail = |what: &str, errors: Vec<String>| ManifestError {
            source_name: source_name.to_string(),
            index,
            what: what.to_string(),
            errors,
        };
        let value: Value = serde::Deserialize::deserialize(doc)
            .map_err(|e| fail("not YAML", vec![e.to_string()]))?;
        if value.is_null() {
            continue;
        }
        let kind = value
            .get("kind")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let api = value
            .get("apiVersion")
            .and_then(Value::as_str)
            .unwrap_or("");
        let name = value
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or("");
        let what = format!("{kind} {name:?}");
        if kind != "CodeInterpreter" && kind != "AgentRuntime" {
            continue;
        }
        if api != API_VERSION {
            return Err(fail(
                &what,
                vec![format!("apiVersion must be {API_VERSION}, got {api:?}")],
            ));
        }
        if name.is_empty() {
            return Err(fail(&what, vec!["metadata.name: Required value".into()]));
        }
        let namespace = value.pointer("/metadata/namespace").and_then(Value::as_str);
        let names = [
            check_name("metadata.name", name, 253, true),
            namespace.and_then(|ns| check_name("metadata.namespace", ns, 63, false)),
        ];
        let names: Vec<String> = names.into_iter().flatten().collect();
        if !names.is_empty() {
            return Err(fail(&what, names));
        }
        let mut value = value;
        let crd = if kind == "CodeInterpreter" {
            crate::crd_of::<CodeInterpreter>()
        } else {
            crate::crd_of::<AgentRuntime>()
        };
        crate::schema::validate(&openapi_schema(&crd), &mut value)
            .map_err(|errs| fail(&what, errs.iter().map(ToString::to_string).collect()))?;
        if value.pointer("/metadata/namespace").is_none() {
            value["metadata"]["namespace"] = Value::String("default".into());
        }
        let def = if kind == "CodeInterpreter" {
            serde_json::from_value(value).map(|c| Definition::CodeInterpreter(Box::new(c)))
        } else {
            serde_json::from_value(value).map(|a| Definition::AgentRuntime(Box::new(a)))
        };
        let def = def.map_err(|e| fail(&what, vec![e.to_string()]))?;
        if let Some(policy) = def.network_policy() {
            policy.validate().map_err(|errs| fail(&what, errs))?;
        }
        out.push(def);
    }
    Ok(out)
}

/// What the API server says of a name that is not an RFC 1123 subdomain (`dots`: the name of an
/// object) or label (a namespace) of at most `max` characters; `None` when it is one. (Our names
/// become paths, cgroups and network namespaces on the local backend: `../x` must never pass.)
/// Why `namespace` cannot name a namespace (an RFC 1123 label of at most 63 characters), in the
/// API server's words; `None` when it can.
pub fn invalid_namespace(namespace: &str) -> Option<String> {
    check_name("namespace", namespace, 63, false)
}

/// Why `name` cannot name a CodeInterpreter or AgentRuntime (an RFC 1123 subdomain of at most 253
/// characters), in the API server's words; `None` when it can.
pub fn invalid_name(name: &str) -> Option<String> {
    check_name("name", name, 253, true)
}

fn check_name(field: &str, name: &str, max: usize, dots: bool) -> Option<String> {
    let alnum = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    let parts: Vec<&str> = if dots {
        name.split('.').collect()
    } else {
        vec![name]
    };
    let ok = name.len() <= max
        && parts.iter().all(|p| {
            p.starts_with(alnum) && p.ends_with(alnum) && p.chars().all(|c| alnum(c) || c == '-')
        });
    let kind = if dots { "subdomain" } else { "label" };
    let also = if dots { ", '-' or '.'" } else { " or '-'" };
    (!ok).then(|| {
        let name = shown(name, max);
        format!(
            "{field}: Invalid value: {name}: a lowercase RFC 1123 {kind} of at most {max} \
             characters must consist of lower case alphanumeric characters{also}, and must \
             start and end with an alphanumeric character"
        )
    })
}

/// A refused value as an error message quotes it: whole up to `max` characters, else its start
/// and its length (a client's megabyte of name is not echoed into answers and logs).
fn shown(value: &str, max: usize) -> String {
    let cut = |n: usize| value.char_indices().nth(n).map(|(at, _)| &value[..at]);
    match cut(max) {
        None => format!("{value:?}"),
        Some(_) => format!(
            "{:?}… ({} characters)",
            cut(64.min(max)).unwrap_or(value),
            value.chars().count()
        ),
    }
}

/// What one manifest file gave: its definitions, or why the file was refused (a file is refused
/// whole, as one `kubectl apply -f` of it would be).
pub type FileOutcome = Result<Vec<Definition>, ManifestError>;

/// Loads every `*.yaml` / `*.yml` file directly in `dir`, sorted by file name, each with its
/// outcome. Only an unreadable directory is an error; an unreadable file (permissions, not UTF-8)
/// is that file's refusal.
pub fn load_dir(dir: &Path) -> std::io::Result<Vec<(PathBuf, FileOutcome)>> {
    let mut files: Vec<_> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
        .collect();
    files.sort();
    Ok(files
        .into_iter()
        .map(|f| {
            let name = f.display().to_string();
            let outcome = match std::fs::read_to_string(&f) {
                Ok(text) => load(&text, &name),
                Err(e) => Err(ManifestError {
                    source_name: name,
                    index: 0,
                    what: "not readable".into(),
                    errors: vec![e.to_string()],
                }),
            };
            (f, outcome)
        })
        .collect())
}
