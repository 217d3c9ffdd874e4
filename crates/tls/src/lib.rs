//! TLS for the Router and the Workload Manager (spec §1.10, §2.1): HTTPS listeners, mutual TLS
//! between the Router and the Workload Manager with SPIFFE identities, and certificates swapped
//! when their files change. PicoD does not use it (sandboxes are reached over Unix sockets or the
//! cluster network, with the Router's JWT).
//!
//! Main flow:
//! 1. A component's `main` names its PEM files ([`PemFiles`]) and, for mutual TLS, waits for them
//!    ([`wait_for_files`]: a sidecar such as spiffe-helper writes them after the pod starts).
//! 2. A listener: [`ServerTls::load`] — HTTPS, or with a CA bundle mutual TLS: TLS 1.3 and a
//!    client certificate chaining to that CA for client authentication, required (upstream checks
//!    no client identity beyond that, and neither does this). It is the listener's
//!    [`agentcube_serve::Handshake`].
//! 3. A client (the Router's calls to the Workload Manager): [`ClientTls::load`] — TLS 1.3, this
//!    component's certificate, and the server's chain checked against the CA for server
//!    authentication with the expected [`spiffe_id`] among its URI SANs; no host name is
//!    checked (a SPIFFE certificate names a workload, not a host), as upstream.
//! 4. `watch` on either: the files are looked at every second and the certificates swapped when
//!    they change (SPIFFE certificates live about an hour); files that do not load (also a key
//!    that is not its certificate's: a rotation half written) are logged and the previous
//!    certificates kept. Connections made before a swap keep theirs; a swapped listener resumes
//!    no TLS session of the configuration before it, so every client shows its certificate again.

mod client;
mod files;
mod server;

pub use client::{ClientTls, system_roots};
pub use files::{PemFiles, wait_for_files};
pub use server::ServerTls;

/// How long `main` waits for mutual-TLS files to appear (upstream: 30 s).
pub const FILE_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file that cannot be read or holds nothing usable.
    #[error("{path}: {why}")]
    File {
        path: std::path::PathBuf,
        why: String,
    },
    /// Files that do not make a TLS configuration (a key that does not match, …).
    #[error("TLS: {0}")]
    Config(#[from] tokio_rustls::rustls::Error),
    /// Files that did not appear in time.
    #[error("{0}")]
    Missing(String),
}

/// The SPIFFE ID of a component: `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`
/// (upstream: trust domain `AGENTCUBE_SPIFFE_TRUST_DOMAIN`, default `cluster.local`; namespace
/// `AGENTCUBE_NAMESPACE`, default `agentcube`; the Workload Manager's service account
/// `workloadmanager`).
pub fn spiffe_id(trust_domain: &str, namespace: &str, service_account: &str) -> String {
    format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}")
}

/// Upstream's choice of listener from `--enable-tls`, `--tls-cert`, `--tls-key` and `--tls-ca`:
/// mutual TLS when all three files are named (whatever `--enable-tls` says), HTTPS with
/// `--enable-tls` and both of cert and key, else plain HTTP (`None`). A CA without both files,
/// or `--enable-tls` without them, is an error naming the flags.
pub fn listener_files(
    enable: bool,
    cert: &str,
    key: &str,
    ca: &str,
) -> Result<Option<PemFiles>, String> {
    let named = |s: &str| (!s.trim().is_empty()).then(|| std::path::PathBuf::from(s.trim()));
    match (named(cert), named(key), named(ca)) {
        (Some(cert), Some(key), ca @ Some(_)) => Ok(Some(PemFiles { cert, key, ca })),
        (_, _, Some(_)) => {
            Err("--tls-cert, --tls-key and --tls-ca must all be given together for mTLS".into())
        }
        (Some(cert), Some(key), None) if enable => Ok(Some(PemFiles {
            cert,
            key,
            ca: None,
        })),
        _ if enable => Err("--enable-tls needs both --tls-cert and --tls-key".into()),
        _ => Ok(None),
    }
}

/// The crypto provider both sides use (ring, as everywhere else in AgentCube).
fn provider() -> std::sync::Arc<tokio_rustls::rustls::crypto::CryptoProvider> {
    std::sync::Arc::new(tokio_rustls::rustls::crypto::ring::default_provider())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listener_flags_choose_as_upstream() {
        let files = |ca: Option<&str>| {
            Some(PemFiles {
                cert: "c".into(),
                key: "k".into(),
                ca: ca.map(Into::into),
            })
        };
        assert_eq!(listener_files(false, "", "", ""), Ok(None));
        assert_eq!(listener_files(false, "c", "k", ""), Ok(None));
        assert_eq!(listener_files(true, "c", "k", ""), Ok(files(None)));
        assert_eq!(listener_files(false, "c", "k", "a"), Ok(files(Some("a"))));
        assert_eq!(listener_files(true, "c", "k", "a"), Ok(files(Some("a"))));
        assert!(
            listener_files(false, "", "k", "a")
                .unwrap_err()
                .contains("--tls-ca")
        );
        assert!(
            listener_files(true, "c", "", "")
                .unwrap_err()
                .contains("--enable-tls")
        );
        assert_eq!(
            spiffe_id("cluster.local", "agentcube", "workloadmanager"),
            "spiffe://cluster.local/ns/agentcube/sa/workloadmanager"
        );
    }
}
