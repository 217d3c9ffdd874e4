//! A structural-schema checker for our CRDs: applies `default`s and refuses what the API server
//! would refuse (types, enums, patterns, bounds, required fields, unknown fields), with messages
//! worded like the API server's. It lets the embedded default load manifests exactly as a cluster
//! would take them, and lets tests prove the generated schema says what we mean.
//!
//! Supported keywords: `type`, `properties`, `required`, `additionalProperties`, `items`, `enum`,
//! `pattern`, `minimum`, `maximum`, `format: int32`, `nullable`, `default`,
//! `x-kubernetes-int-or-string`, `x-kubernetes-preserve-unknown-fields`. An object schema with
//! neither properties nor additionalProperties (e.g. `metadata`) accepts any fields.

use serde_json::{Map, Value};

use crate::common::{DURATION_PATTERN, QUANTITY_PATTERN};

/// One refusal, at a dotted path such as `spec.template.imagePullPolicy`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub path: String,
    pub message: String,
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Applies defaults in place and checks `obj` against `schema` (an `openAPIV3Schema`).
pub fn validate(schema: &Value, obj: &mut Value) -> Result<(), Vec<FieldError>> {
    let mut errors = Vec::new();
    walk(schema, obj, "", &mut errors);
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 80 {
        format!("{}…", &s[..80])
    } else {
        s
    }
}

fn walk(schema: &Value, v: &mut Value, path: &str, errs: &mut Vec<FieldError>) {
    let mut err = |message: String| {
        errs.push(FieldError {
            path: if path.is_empty() {
                "<root>".into()
            } else {
                path.to_string()
            },
            message,
        })
    };
    if v.is_null() {
        if schema.get("nullable") != Some(&Value::Bool(true)) && schema.get("type").is_some() {
            err("Invalid value: null: must not be null".into());
        }
        return;
    }
    if schema.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true)) {
        if !(v.is_i64() || v.is_u64() || v.is_string()) {
            err(format!(
                "Invalid value: {}: must be an integer or a string",
                short(v)
            ));
        }
        check_scalar(schema, v, &mut err);
        return;
    }
    let ty = schema.get("type").and_then(Value::as_str);
    let type_ok = match ty {
        Some("object") => v.is_object(),
        Some("array") => v.is_array(),
        Some("string") => v.is_string(),
        Some("integer") => v.is_i64() || v.is_u64(),
        Some("number") => v.is_number(),
        Some("boolean") => v.is_boolean(),
        _ => true,
    };
    if !type_ok {
        err(format!(
            "Invalid value: {}: must be of type {}",
            short(v),
            ty.unwrap_or("?")
        ));
        return;
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array)
        && !allowed.contains(v)
    {
        let list: Vec<String> = allowed
            .iter()
            .filter(|a| !a.is_null())
            .map(Value::to_string)
            .collect();
        err(format!(
            "Unsupported value: {}: supported values: {}",
            short(v),
            list.join(", ")
        ));
    }
    check_scalar(schema, v, &mut err);
    match v {
        Value::Object(map) => walk_object(schema, map, path, errs),
        Value::Array(items) => {
            if let Some(item_schema) = schema.get("items") {
                for (i, item) in items.iter_mut().enumerate() {
                    walk(item_schema, item, &format!("{path}[{i}]"), errs);
                }
            }
        }
        _ => {}
    }
}

fn check_scalar(schema: &Value, v: &Value, err: &mut impl FnMut(String)) {
    if let (Some(p), Some(s)) = (schema.get("pattern").and_then(Value::as_str), v.as_str()) {
        let ok = regex::Regex::new(p)
            .map(|re| re.is_match(s))
            .unwrap_or(true);
        if !ok && p == DURATION_PATTERN {
            err(format!(
                "Invalid value: {}: must be a duration such as 30s, 15m, 1h30m or 1.5h",
                short(v)
            ));
        } else if !ok && p == QUANTITY_PATTERN {
            err(format!(
                "Invalid value: {}: must be a quantity such as 512Mi, 1.5Gi, 500m or 1e9",
                short(v)
            ));
        } else if !ok {
            err(format!("Invalid value: {}: should match '{p}'", short(v)));
        }
    }
    if let Some(n) = v.as_f64() {
        if let Some(min) = schema.get("minimum").and_then(Value::as_f64)
            && n < min
        {
            err(format!(
                "Invalid value: {n}: should be greater than or equal to {min}"
            ));
        }
        if let Some(max) = schema.get("maximum").and_then(Value::as_f64)
            && n > max
        {
            err(format!(
                "Invalid value: {n}: should be less than or equal to {max}"
            ));
        }
        if schema.get("format").and_then(Value::as_str) == Some("int32")
            && (n < f64::from(i32::MIN) || n > f64::from(i32::MAX))
        {
            err(format!("Invalid value: {n}: must fit in a 32-bit integer"));
        }
    }
}

fn walk_object(
    schema: &Value,
    map: &mut Map<String, Value>,
    path: &str,
    errs: &mut Vec<FieldError>,
) {
    let props = schema.get("properties").and_then(Value::as_object);
    let additional = schema.get("additionalProperties");
    let preserve = schema.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
    if let Some(props) = props {
        for (k, s) in props {
            if !map.contains_key(k)
                && let Some(d) = s.get("default")
            {
                map.insert(k.clone(), d.clone());
            }
        }
    }
    if let Some(req) = schema.get("required").and_then(Value::as_array) {
        for r in req.iter().filter_map(Value::as_str) {
            if !map.contains_key(r) {
                errs.push(FieldError {
                    path: join(path, r),
                    message: "Required value".into(),
                });
            }
        }
    }
    for (k, child) in map.iter_mut() {
        let child_path = join(path, k);
        match (props.and_then(|p| p.get(k)), additional) {
            (Some(s), _) => walk(s, child, &child_path, errs),
            (None, Some(s)) if s.is_object() => walk(s, child, &child_path, errs),
            (None, _) if preserve || props.is_none() => {}
            (None, _) => errs.push(FieldError {
                path: child_path,
                message: format!("unknown field \"{k}\""),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn defaults_types_enums_and_unknowns() {
        let schema = json!({"type": "object", "required": ["a"], "properties": {
            "a": {"type": "string", "enum": ["x", "y"]},
            "b": {"type": "integer", "default": 3, "minimum": 0},
            "c": {"type": "object", "additionalProperties": {"type": "string"}},
            "m": {"type": "object"}
        }});
        let mut ok = json!({"a": "x", "c": {"k": "v"}, "m": {"anything": 1}});
        validate(&schema, &mut ok).unwrap();
        assert_eq!(ok["b"], 3);
        let mut bad = json!({"b": -1, "c": {"k": 1}, "zz": true});
        let errs: Vec<String> = validate(&schema, &mut bad)
            .unwrap_err()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert!(errs.contains(&"a: Required value".to_string()), "{errs:?}");
        assert!(
            errs.iter().any(|e| e.starts_with("b: Invalid value: -1")),
            "{errs:?}"
        );
        assert!(
            errs.iter()
                .any(|e| e.starts_with("c.k: Invalid value: 1: must be of type string")),
            "{errs:?}"
        );
        assert!(
            errs.contains(&"zz: unknown field \"zz\"".to_string()),
            "{errs:?}"
        );
        let mut bad = json!({"a": "q"});
        let errs = validate(&schema, &mut bad).unwrap_err();
        assert_eq!(
            errs[0].to_string(),
            "a: Unsupported value: \"q\": supported values: \"x\", \"y\""
        );
    }
}
