//! The listener side: HTTPS, or mutual TLS with a CA bundle.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::rustls::server::WebPkiClientVerifier;

use crate::files::{self, PemFiles, Reloading};
use crate::{TlsError, provider};

/// A listener's TLS, swapped whole when its files change.
#[derive(Debug, Clone)]
pub struct ServerTls(Reloading<ServerConfig>);

impl ServerTls {
    /// HTTPS with `files.cert` and `files.key`; with `files.ca`, mutual TLS (TLS 1.3, a client
    /// certificate for client authentication chaining to the CA required). ALPN h2 and
    /// http/1.1.
    pub fn load(files: PemFiles) -> Result<Self, TlsError> {
        Reloading::load(files, build).map(Self)
    }

    /// Whether clients must present a certificate.
    pub fn mutual(&self) -> bool {
        self.0.files.ca.is_some()
    }

    /// Swaps in the files' certificates whenever they differ from those loaded (looked at
    /// every second, until the runtime ends).
    pub fn watch(&self) -> tokio::task::JoinHandle<()> {
        self.watch_every(Duration::from_secs(1))
    }

    /// [`Self::watch`], looking every `every`.
    pub fn watch_every(&self, every: Duration) -> tokio::task::JoinHandle<()> {
        self.0.watch_every(every)
    }
}

fn build(files: &PemFiles) -> Result<ServerConfig, TlsError> {
    let (certs, key) = (files::chain(&files.cert)?, files::key(&files.key)?);
    let provider = provider();
    let mut config = match &files.ca {
        None => ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(certs, key)?,
        Some(ca) => {
            let roots = Arc::new(files::roots(ca)?);
            let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
                .build()
                .map_err(|e| TlsError::File {
                    path: ca.clone(),
                    why: e.to_string(),
                })?;
            ServerConfig::builder_with_provider(provider)
                .with_protocol_versions(&[&tokio_rustls::rustls::version::TLS13])?
                .with_client_cert_verifier(verifier)
                .with_single_cert(certs, key)?
        }
    };
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

impl agentcube_serve::Handshake for ServerTls {
    type Io = tokio_rustls::server::TlsStream<agentcube_serve::Accepted>;
    fn handshake(
        &self,
        s: agentcube_serve::Accepted,
    ) -> Pin<Box<dyn Future<Output = std::io::Result<Self::Io>> + Send>> {
        let acceptor = TlsAcceptor::from(self.0.current.load_full());
        Box::pin(async move { acceptor.accept(s).await })
    }
}
