//! `spec.networkPolicy` of both CRDs, in the shape of upstream's proposal (RFC #216, PR #291), so
//! upstream manifests apply unchanged. Present: the definition's sandboxes may talk to nothing
//! but the Router (ingress), DNS (egress) and the listed rules. Absent: no policy (upstream:
//! unrestricted; this project's local backend: no network at all).

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

/// Allowed traffic besides the Router's requests and DNS.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct NetworkPolicySpec {
    /// Destinations the sandboxes may connect to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress: Vec<NetworkRule>,
    /// Sources that may connect to the sandboxes (besides the Router).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ingress: Vec<NetworkRule>,
}

/// Addresses and ports one rule allows; an empty list means any (as in a Kubernetes
/// NetworkPolicy rule).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct NetworkRule {
    /// Address ranges in CIDR notation, e.g. `10.0.0.0/8`, `192.0.2.7/32`, `2001:db8::/32`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "cidrs_schema")]
    pub cidrs: Vec<String>,
    /// Ports (any port when empty).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<NetworkPort>,
}

/// One port of a rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct NetworkPort {
    /// `TCP` (default), `UDP` or `SCTP`.
    #[serde(default)]
    pub protocol: NetworkProtocol,
    /// Port number.
    #[schemars(schema_with = "port_schema")]
    pub port: u32,
}

/// Transport protocol of a rule's port.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum NetworkProtocol {
    #[default]
    TCP,
    UDP,
    SCTP,
}

/// IPv4 (`a.b.c.d/n`, n ≤ 32) or IPv6 (`hex:…/n`, n ≤ 128) CIDR; the loaders also parse it.
pub const CIDR_PATTERN: &str = r"^((25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])/(3[0-2]|[12]?[0-9])$|^[0-9a-fA-F:]*:[0-9a-fA-F:.]*/(12[0-8]|1[01][0-9]|[1-9]?[0-9])$";

fn cidrs_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "array",
        "items": {"type": "string", "pattern": CIDR_PATTERN},
        "description": "Address ranges in CIDR notation, e.g. `10.0.0.0/8`, `192.0.2.7/32`, `2001:db8::/32`."
    })
}

fn port_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "integer",
        "format": "int32",
        "minimum": 1,
        "maximum": 65535,
        "description": "Port number."
    })
}

impl NetworkPolicySpec {
    /// Checks what the schema cannot: every CIDR parses as an address and prefix. Messages name
    /// the field, as the API server's do.
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let mut errors = Vec::new();
        for (dir, rules) in [("egress", &self.egress), ("ingress", &self.ingress)] {
            for (i, rule) in rules.iter().enumerate() {
                for (j, cidr) in rule.cidrs.iter().enumerate() {
                    if let Err(e) = parse_cidr(cidr) {
                        errors.push(format!(
                            "spec.networkPolicy.{dir}[{i}].cidrs[{j}]: Invalid value: {cidr:?}: {e}"
                        ));
                    }
                }
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }
}

/// An address and prefix length, with the prefix within the address family's width.
pub fn parse_cidr(s: &str) -> Result<(std::net::IpAddr, u8), String> {
    let (addr, len) = s
        .split_once('/')
        .ok_or_else(|| "must be an address and a prefix length, e.g. 10.0.0.0/8".to_string())?;
    let addr: std::net::IpAddr = addr
        .parse()
        .map_err(|_| format!("{addr:?} is not an IP address"))?;
    let len: u8 = len
        .parse()
        .map_err(|_| format!("{len:?} is not a prefix length"))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    if len > max {
        return Err(format!("prefix length {len} is longer than {max}"));
    }
    Ok((addr, len))
}

/// Cloud instance-metadata endpoints: they answer anyone on the node or VM with its cloud
/// credentials or configuration secrets (AWS, GCP, Azure, Oracle, OpenStack at
/// `169.254.169.254`; Azure's WireServer; Alibaba; AWS over IPv6).
pub const METADATA_ENDPOINTS: [&str; 4] = [
    "169.254.169.254",
    "168.63.129.16",
    "100.100.100.200",
    "fd00:ec2::254",
];

/// The metadata endpoints (as `/32` or `/128`) a CIDR contains without naming one exactly: what
/// a rule meant as "the internet" (`0.0.0.0/0`) must except. A CIDR that is exactly an endpoint
/// asks for it, and gets nothing excepted.
pub fn metadata_within(cidr: &str) -> Vec<String> {
    let Ok((net, len)) = parse_cidr(cidr) else {
        return Vec::new();
    };
    METADATA_ENDPOINTS
        .iter()
        .filter_map(|m| m.parse::<std::net::IpAddr>().ok())
        .filter(|m| m.is_ipv4() == net.is_ipv4())
        .filter_map(|m| {
            let (width, a, b) = match (net, m) {
                (std::net::IpAddr::V4(n), std::net::IpAddr::V4(m)) => {
                    (32, u32::from(n) as u128, u32::from(m) as u128)
                }
                (std::net::IpAddr::V6(n), std::net::IpAddr::V6(m)) => {
                    (128, u128::from(n), u128::from(m))
                }
                _ => return None,
            };
            let shift = width - u32::from(len);
            let inside = shift >= width || (a >> shift) == (b >> shift);
            (u32::from(len) < width && inside).then(|| format!("{m}/{width}"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_for_the_internet_except_the_metadata_endpoints() {
        assert_eq!(
            metadata_within("0.0.0.0/0"),
            [
                "169.254.169.254/32",
                "168.63.129.16/32",
                "100.100.100.200/32"
            ]
        );
        assert_eq!(metadata_within("169.254.0.0/16"), ["169.254.169.254/32"]);
        assert_eq!(metadata_within("100.64.0.0/10"), ["100.100.100.200/32"]);
        assert_eq!(metadata_within("::/0"), ["fd00:ec2::254/128"]);
        assert!(metadata_within("169.254.169.254/32").is_empty());
        assert!(metadata_within("10.0.0.0/8").is_empty());
        assert!(metadata_within("169.254.169.0/31").is_empty());
        assert!(metadata_within("2001:db8::/32").is_empty());
        assert!(metadata_within("nonsense").is_empty());
    }

    #[test]
    fn cidrs_parse_or_say_why_not() {
        assert!(parse_cidr("10.0.0.0/8").is_ok());
        assert!(parse_cidr("2001:db8::/32").is_ok());
        assert!(parse_cidr("0.0.0.0/0").is_ok());
        for bad in [
            "10.0.0.0",
            "10.0.0.300/8",
            "10.0.0.0/33",
            "::/129",
            "x/1",
            "",
        ] {
            assert!(parse_cidr(bad).is_err(), "{bad}");
        }
        let re = regex::Regex::new(CIDR_PATTERN).unwrap();
        for good in [
            "10.0.0.0/8",
            "192.0.2.7/32",
            "2001:db8::/32",
            "::/0",
            "0.0.0.0/0",
        ] {
            assert!(re.is_match(good), "{good}");
        }
        for bad in [
            "10.0.0.0",
            "10.0.0.256/8",
            "10.0.0.0/33",
            "example.com/8",
            "::/129",
        ] {
            assert!(!re.is_match(bad), "{bad}");
        }
    }
}
