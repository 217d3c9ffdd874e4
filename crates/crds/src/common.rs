//! Pieces both CRDs share: ports, Go-syntax durations, schema helpers.

use agentcube_types::GoDuration;
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

/// Protocol of a sandbox port.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Protocol {
    /// Plain HTTP (the default).
    #[default]
    HTTP,
    /// HTTPS. The Router does not verify sandbox certificates.
    HTTPS,
    /// HTTP/2 in cleartext with prior knowledge (gRPC agents). Extension over upstream: the
    /// Router speaks HTTP/1.1 to `HTTP` ports whatever the client speaks, and h2c to these.
    H2C,
}

/// A port of the sandbox that the Router forwards to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = require_protocol)]
pub struct TargetPort {
    /// Request-path prefix that selects this port, e.g. `/` or `/mcp`. The Router picks the port
    /// with the longest prefix of the invocation path, else the first port. The prefix is not
    /// stripped from the forwarded path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<String>,
    /// Optional name of the port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Port number the sandbox listens on.
    #[schemars(schema_with = "port_schema")]
    pub port: u32,
    /// `HTTP` or `HTTPS`.
    #[serde(default)]
    pub protocol: Protocol,
}

fn require_protocol(schema: &mut Schema) {
    require(schema, &["protocol"]);
}

fn port_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "integer",
        "format": "int32",
        "minimum": 1,
        "maximum": 65535,
        "description": "Port number the sandbox listens on."
    })
}

/// What the API server takes as a resource quantity (`512Mi`, `1.5Gi`, `500m`, `1e9`): the pattern
/// controller-gen writes on every `resource.Quantity`, as upstream's CRDs have it.
pub const QUANTITY_PATTERN: &str = r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$";

/// Go `time.ParseDuration` syntax: one or more `<number><unit>` with units ns, us, µs, ms, s, m, h.
pub const DURATION_PATTERN: &str = r"^(0|([0-9]+(\.[0-9]*)?|\.[0-9]+)(ns|us|µs|μs|ms|s|m|h)(([0-9]+(\.[0-9]*)?|\.[0-9]+)(ns|us|µs|μs|ms|s|m|h))*)$";

/// Schema of a duration field: a string in Go syntax.
pub fn duration_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "string",
        "pattern": DURATION_PATTERN,
    })
}

/// Upstream default idle timeout: 15 minutes.
pub fn default_session_timeout() -> GoDuration {
    GoDuration(std::time::Duration::from_secs(15 * 60))
}

/// Upstream default maximum session duration: 8 hours.
pub fn default_max_session_duration() -> GoDuration {
    GoDuration(std::time::Duration::from_secs(8 * 3600))
}

/// Adds field names to an object schema's `required` list.
pub fn require(schema: &mut Schema, fields: &[&str]) {
    let Some(obj) = schema.as_object_mut() else {
        return;
    };
    let required = obj
        .entry("required")
        .or_insert_with(|| serde_json::Value::Array(Vec::new()));
    if let Some(list) = required.as_array_mut() {
        for f in fields {
            if !list.iter().any(|v| v == f) {
                list.push(serde_json::Value::String((*f).to_string()));
            }
        }
    }
}

/// Marks a list as atomic (`x-kubernetes-list-type: atomic`).
pub fn atomic_string_list(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "array",
        "items": {"type": "string"},
        "x-kubernetes-list-type": "atomic",
        "nullable": true
    })
}

/// Sets upstream's literal duration defaults (`15m`, `8h`) on a spec schema; schemars would
/// otherwise render the serde defaults in canonical form (`15m0s`).
pub fn duration_defaults(schema: &mut Schema) {
    schema_defaults(
        schema,
        &[("sessionTimeout", "15m"), ("maxSessionDuration", "8h")],
    );
}

/// Sets `default` on the named properties of an object schema (absent ones are skipped).
pub fn schema_defaults(schema: &mut Schema, defaults: &[(&str, &str)]) {
    let Some(props) = schema
        .as_object_mut()
        .and_then(|o| o.get_mut("properties"))
        .and_then(|p| p.as_object_mut())
    else {
        return;
    };
    for (field, default) in defaults {
        if let Some(f) = props.get_mut(*field).and_then(|f| f.as_object_mut()) {
            f.insert(
                "default".into(),
                serde_json::Value::String((*default).into()),
            );
        }
    }
}
