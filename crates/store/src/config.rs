//! Store selection from flags and the upstream environment names (spec §4.2).
//!
//! [`StoreArgs`] is a clap fragment the binaries flatten into their own `Args`; clap reads the
//! environment there, in `main`. [`StoreArgs::into_config`] applies upstream's rules and turns bad
//! combinations into clear startup errors.

use std::path::PathBuf;
use std::time::Duration;

use crate::redis::{RedisConfig, RedisTls};

/// Which store to use.
#[derive(Debug, Clone)]
pub enum StoreConfig {
    /// In-process store (single process only: the embedded default).
    Memory,
    /// Redis or Valkey.
    Redis(RedisConfig),
}

/// Store flags. Every flag also reads the upstream environment variable of the same meaning.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct StoreArgs {
    /// Store URL: `redis://[:password@]host:port[/db]`, `rediss://…` (over TLS), `valkey://…`
    /// and `valkeys://…` (the same), or `memory`. Overrides the variables below.
    #[arg(long = "store", env = "AGENTCUBE_STORE_URL", hide_env_values = true)]
    pub store_url: Option<String>,
    /// `redis` (default) or `valkey` (upstream `STORE_TYPE`); `memory` also accepted.
    #[arg(long, env = "STORE_TYPE")]
    pub store_type: Option<String>,
    /// Redis address `host:port` (required for STORE_TYPE=redis).
    #[arg(long, env = "REDIS_ADDR")]
    pub redis_addr: Option<String>,
    /// Redis password.
    #[arg(long, env = "REDIS_PASSWORD", hide_env_values = true)]
    pub redis_password: Option<String>,
    /// Set to `false` to allow Redis without a password.
    #[arg(long, env = "REDIS_PASSWORD_REQUIRED")]
    pub redis_password_required: Option<String>,
    /// Valkey address `host:port` (required for STORE_TYPE=valkey).
    #[arg(long, env = "VALKEY_ADDR")]
    pub valkey_addr: Option<String>,
    /// Valkey password.
    #[arg(long, env = "VALKEY_PASSWORD", hide_env_values = true)]
    pub valkey_password: Option<String>,
    /// Set to `false` to allow Valkey without a password.
    #[arg(long, env = "VALKEY_PASSWORD_REQUIRED")]
    pub valkey_password_required: Option<String>,
    /// Upper bound of one store call, in milliseconds.
    #[arg(long, env = "AGENTCUBE_STORE_TIMEOUT_MS", default_value_t = 2000)]
    pub store_timeout_ms: u64,
    /// `true`: reach REDIS_ADDR / VALKEY_ADDR over TLS (a `--store` URL says so itself:
    /// `rediss://`). The server's certificate is checked against the system's CAs, or
    /// `--store-ca-file`, and must name the host.
    #[arg(long, env = "AGENTCUBE_STORE_TLS")]
    pub store_tls: Option<String>,
    /// PEM CA certificate(s) the store's TLS certificate must chain to, instead of the system's.
    #[arg(long, env = "AGENTCUBE_STORE_CA_FILE")]
    pub store_ca_file: Option<PathBuf>,
    /// PEM client certificate for a store that asks for one (Redis's `tls-auth-clients`), with
    /// `--store-key-file`.
    #[arg(long, env = "AGENTCUBE_STORE_CERT_FILE")]
    pub store_cert_file: Option<PathBuf>,
    /// PEM private key of `--store-cert-file`.
    #[arg(long, env = "AGENTCUBE_STORE_KEY_FILE")]
    pub store_key_file: Option<PathBuf>,
}

/// A configuration that cannot work, said plainly.
#[derive(Debug, thiserror::Error)]
#[error("store configuration: {0}")]
pub struct ConfigError(pub String);

/// Go's `strconv.ParseBool`.
fn parse_go_bool(name: &str, v: &str) -> Result<bool, ConfigError> {
    match v {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Ok(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Ok(false),
        _ => Err(ConfigError(format!(
            "{name}={v:?} is not a boolean (use true or false)"
        ))),
    }
}

/// Percent-encodes a password for the userinfo part of a URL.
fn encode_userinfo(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn non_empty(v: &Option<String>) -> Option<&str> {
    v.as_deref().map(str::trim).filter(|s| !s.is_empty())
}

impl StoreArgs {
    /// Applies upstream's rules. `default_memory`: with nothing configured at all, use the
    /// in-memory store (the embedded default) instead of failing like upstream's binaries.
    pub fn into_config(self, default_memory: bool) -> Result<StoreConfig, ConfigError> {
        let timeout = Duration::from_millis(self.store_timeout_ms.max(1));
        // The URL's scheme says whether it is TLS; the files come with it.
        let redis = |url: String| -> Result<StoreConfig, ConfigError> {
            let tls = url.starts_with("rediss://");
            let mut c = RedisConfig::new(url);
            c.tls = self.tls_files(tls)?;
            c.op_timeout = timeout;
            c.connect_timeout = timeout.min(c.connect_timeout.max(timeout / 2));
            Ok(StoreConfig::Redis(c))
        };
        if let Some(url) = non_empty(&self.store_url) {
            if url == "memory" || url == "memory://" {
                return Ok(StoreConfig::Memory);
            }
            let url = match (
                url.strip_prefix("valkey://"),
                url.strip_prefix("valkeys://"),
            ) {
                (Some(rest), _) => format!("redis://{rest}"),
                (_, Some(rest)) => format!("rediss://{rest}"),
                _ => url.to_string(),
            };
            if !url.starts_with("redis://") && !url.starts_with("rediss://") {
                return Err(ConfigError(format!(
                    "--store must be redis://…, rediss://…, valkey://…, valkeys://… or memory, got {url:?}"
                )));
            }
            if self.tls_flag()? && !url.starts_with("rediss://") {
                return Err(ConfigError(
                    "--store-tls with a redis:// URL: write rediss:// instead".into(),
                ));
            }
            return redis(url);
        }
        let kind = non_empty(&self.store_type).map(str::to_ascii_lowercase);
        let nothing_set = kind.is_none()
            && non_empty(&self.redis_addr).is_none()
            && non_empty(&self.valkey_addr).is_none();
        if nothing_set && default_memory {
            return Ok(StoreConfig::Memory);
        }
        let (name, addr, password, required) = match kind.as_deref().unwrap_or("redis") {
            "redis" => (
                "REDIS",
                &self.redis_addr,
                &self.redis_password,
                &self.redis_password_required,
            ),
            "valkey" => (
                "VALKEY",
                &self.valkey_addr,
                &self.valkey_password,
                &self.valkey_password_required,
            ),
            "memory" => return Ok(StoreConfig::Memory),
            other => {
                return Err(ConfigError(format!(
                    "unsupported STORE_TYPE {other:?} (use redis, valkey or memory)"
                )));
            }
        };
        let addr = non_empty(addr)
            .ok_or_else(|| ConfigError(format!("{name}_ADDR is required (host:port)")))?;
        if addr.contains(',') {
            return Err(ConfigError(format!(
                "{name}_ADDR={addr:?} lists several addresses; cluster and sentinel \
                 deployments are not supported, give one host:port"
            )));
        }
        if addr.contains("://") {
            return Err(ConfigError(format!(
                "{name}_ADDR={addr:?} must be host:port; use --store for a URL"
            )));
        }
        let required = match non_empty(required) {
            Some(v) => parse_go_bool(&format!("{name}_PASSWORD_REQUIRED"), v)?,
            None => true,
        };
        let password = non_empty(password);
        if required && password.is_none() {
            return Err(ConfigError(format!(
                "{name}_PASSWORD is required; set {name}_PASSWORD_REQUIRED=false to connect \
                 without a password"
            )));
        }
        let scheme = if self.tls_flag()? { "rediss" } else { "redis" };
        redis(match password {
            Some(p) => format!("{scheme}://:{}@{addr}/", encode_userinfo(p)),
            None => format!("{scheme}://{addr}/"),
        })
    }

    fn tls_flag(&self) -> Result<bool, ConfigError> {
        non_empty(&self.store_tls).map_or(Ok(false), |v| parse_go_bool("AGENTCUBE_STORE_TLS", v))
    }

    /// The CA and client identity files (read when the store is made: a missing file stops
    /// the start); only with TLS, and the certificate only with its key.
    fn tls_files(&self, tls: bool) -> Result<RedisTls, ConfigError> {
        let given = [
            &self.store_ca_file,
            &self.store_cert_file,
            &self.store_key_file,
        ];
        if !tls && given.iter().any(|f| f.is_some()) {
            return Err(ConfigError(
                "--store-ca-file, --store-cert-file and --store-key-file are for a store reached \
                 over TLS: set --store-tls true, or use a rediss:// URL"
                    .into(),
            ));
        }
        let client = match (&self.store_cert_file, &self.store_key_file) {
            (Some(c), Some(k)) => Some((c.clone(), k.clone())),
            (None, None) => None,
            _ => {
                return Err(ConfigError(
                    "--store-cert-file and --store-key-file go together".into(),
                ));
            }
        };
        Ok(RedisTls {
            ca: self.store_ca_file.clone(),
            client,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(pairs: &[(&str, &str)]) -> StoreArgs {
        let mut a = StoreArgs {
            store_timeout_ms: 2000,
            ..Default::default()
        };
        for (k, v) in pairs {
            let v = Some(v.to_string());
            match *k {
                "store" => a.store_url = v,
                "STORE_TYPE" => a.store_type = v,
                "REDIS_ADDR" => a.redis_addr = v,
                "REDIS_PASSWORD" => a.redis_password = v,
                "REDIS_PASSWORD_REQUIRED" => a.redis_password_required = v,
                "VALKEY_ADDR" => a.valkey_addr = v,
                "VALKEY_PASSWORD" => a.valkey_password = v,
                "VALKEY_PASSWORD_REQUIRED" => a.valkey_password_required = v,
                "AGENTCUBE_STORE_TLS" => a.store_tls = v,
                "AGENTCUBE_STORE_CA_FILE" => a.store_ca_file = v.map(PathBuf::from),
                "AGENTCUBE_STORE_CERT_FILE" => a.store_cert_file = v.map(PathBuf::from),
                "AGENTCUBE_STORE_KEY_FILE" => a.store_key_file = v.map(PathBuf::from),
                _ => unreachable!(),
            }
        }
        a
    }

    fn url(c: StoreConfig) -> String {
        match c {
            StoreConfig::Redis(r) => r.url,
            StoreConfig::Memory => "memory".into(),
        }
    }

    fn err(pairs: &[(&str, &str)]) -> String {
        args(pairs).into_config(false).unwrap_err().to_string()
    }

    #[test]
    fn upstream_variables() {
        let c = args(&[("REDIS_ADDR", "r:6379"), ("REDIS_PASSWORD", "p@ss w")]).into_config(false);
        assert_eq!(url(c.unwrap()), "redis://:p%40ss%20w@r:6379/");
        let c = args(&[
            ("REDIS_ADDR", "r:6379"),
            ("REDIS_PASSWORD_REQUIRED", "false"),
        ]);
        assert_eq!(url(c.into_config(false).unwrap()), "redis://r:6379/");
        let c = args(&[
            ("STORE_TYPE", "Valkey"),
            ("VALKEY_ADDR", "v:6379"),
            ("VALKEY_PASSWORD", "x"),
        ]);
        assert_eq!(url(c.into_config(false).unwrap()), "redis://:x@v:6379/");
        let c = args(&[("store", "valkey://h:1/2"), ("STORE_TYPE", "bogus")]);
        assert_eq!(url(c.into_config(false).unwrap()), "redis://h:1/2");
        assert_eq!(
            url(args(&[("store", "memory")]).into_config(false).unwrap()),
            "memory"
        );
    }

    #[test]
    fn bad_combinations_say_what_to_do() {
        assert!(err(&[]).contains("REDIS_ADDR is required"));
        assert!(err(&[("REDIS_ADDR", "r:1")]).contains("REDIS_PASSWORD_REQUIRED=false"));
        assert!(
            err(&[("STORE_TYPE", "valkey"), ("REDIS_ADDR", "r:1")])
                .contains("VALKEY_ADDR is required")
        );
        assert!(err(&[("STORE_TYPE", "mongo")]).contains("unsupported STORE_TYPE"));
        assert!(
            err(&[("REDIS_ADDR", "r:1"), ("REDIS_PASSWORD_REQUIRED", "nope")])
                .contains("not a boolean")
        );
        assert!(
            err(&[
                ("STORE_TYPE", "valkey"),
                ("VALKEY_ADDR", "a:1,b:2"),
                ("VALKEY_PASSWORD", "x")
            ])
            .contains("several addresses")
        );
        assert!(err(&[("store", "http://x")]).contains("--store must be"));
    }

    #[test]
    fn tls_is_the_url_scheme_or_the_flag_and_its_files_are_read_when_the_store_is_made() {
        let dir = tempfile::tempdir().unwrap();
        let ca_path = dir.path().join("ca.pem");
        std::fs::write(&ca_path, "CA PEM").unwrap();
        let ca = ca_path.to_str().unwrap();
        let c = args(&[
            ("REDIS_ADDR", "r:6380"),
            ("REDIS_PASSWORD", "p"),
            ("AGENTCUBE_STORE_TLS", "true"),
            ("AGENTCUBE_STORE_CA_FILE", ca),
        ]);
        let StoreConfig::Redis(c) = c.into_config(false).unwrap() else {
            panic!("not redis")
        };
        assert_eq!(c.url, "rediss://:p@r:6380/");
        assert_eq!(c.tls.ca.as_deref(), Some(ca_path.as_path()));
        assert!(c.tls.client.is_none());
        let c2 = args(&[("store", "rediss://h:1/"), ("AGENTCUBE_STORE_CA_FILE", ca)]);
        assert_eq!(url(c2.into_config(false).unwrap()), "rediss://h:1/");
        let c3 = args(&[("store", "valkeys://:p@h:1/2")]);
        assert_eq!(url(c3.into_config(false).unwrap()), "rediss://:p@h:1/2");
        let plain = [("store", "redis://h:1/"), ("AGENTCUBE_STORE_TLS", "true")];
        assert!(err(&plain).contains("write rediss://"));
        let ca_only = [("store", "redis://h:1/"), ("AGENTCUBE_STORE_CA_FILE", ca)];
        assert!(err(&ca_only).contains("reached over TLS"));
        let half = [
            ("store", "rediss://h:1/"),
            ("AGENTCUBE_STORE_CERT_FILE", ca),
        ];
        assert!(err(&half).contains("go together"));
        let bad = [
            ("REDIS_ADDR", "r:1"),
            ("REDIS_PASSWORD", "p"),
            ("AGENTCUBE_STORE_TLS", "yes"),
        ];
        assert!(err(&bad).contains("not a boolean"));
        // A file that is not there stops the start when the store is made.
        std::fs::remove_file(&ca_path).unwrap();
        let e = crate::RedisStore::new(c).err().unwrap().to_string();
        assert!(
            e.contains(&format!("cannot read --store-ca-file {ca}")),
            "{e}"
        );
    }

    #[test]
    fn nothing_configured_means_memory_only_when_allowed() {
        assert!(matches!(
            args(&[]).into_config(true).unwrap(),
            StoreConfig::Memory
        ));
        assert!(args(&[]).into_config(false).is_err());
    }
}
