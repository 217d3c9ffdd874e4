//! The client side of mutual TLS (the Router's calls to the Workload Manager): this component's
//! certificate, and the server's checked against the CA with its SPIFFE ID.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio_rustls::rustls::client::ResolvesClientCert;
use tokio_rustls::rustls::client::danger::{
    HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
};
use tokio_rustls::rustls::crypto::WebPkiSupportedAlgorithms;
use tokio_rustls::rustls::sign::CertifiedKey;
use tokio_rustls::rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, Error, OtherError, RootCertStore,
    SignatureScheme,
};

use crate::files::{self, PemFiles, Reloading};
use crate::{TlsError, provider};

/// What a reload swaps: this component's certificate and key, and the CA bundle.
struct Material {
    key: Arc<CertifiedKey>,
    roots: RootCertStore,
}

/// Mutual TLS towards a server known by its SPIFFE ID.
#[derive(Clone)]
pub struct ClientTls {
    material: Reloading<Material>,
    config: Arc<ClientConfig>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("ClientTls").field(&self.material).finish()
    }
}

impl ClientTls {
    /// TLS 1.3 with `files.cert`/`files.key` as the client certificate, accepting a server whose
    /// chain reaches `files.ca` (required) for server authentication and whose certificate names
    /// `server_id` as a URI SAN.
    pub fn load(files: PemFiles, server_id: String) -> Result<Self, TlsError> {
        let reloading = Reloading::load(files, material)?;
        let material = reloading.current.clone();
        let provider = provider();
        let verifier = Arc::new(SpiffeVerifier {
            material: material.clone(),
            server_id,
            algorithms: provider.signature_verification_algorithms,
        });
        let config = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&tokio_rustls::rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_cert_resolver(Arc::new(Resolver(material.clone())));
        Ok(Self {
            material: reloading,
            config: Arc::new(config),
        })
    }

    /// An HTTPS-only connector over `http` (plain `http://` URLs are refused), HTTP/1.1 (its
    /// ALPN set by the connector).
    pub fn connector(&self, http: HttpConnector) -> HttpsConnector<HttpConnector> {
        hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config((*self.config).clone())
            .https_only()
            .enable_http1()
            .wrap_connector(http)
    }

    /// Swaps in the files' certificates whenever they differ from those loaded (looked at
    /// every second, until the runtime ends).
    pub fn watch(&self) -> tokio::task::JoinHandle<()> {
        self.watch_every(Duration::from_secs(1))
    }

    /// [`Self::watch`], looking every `every`.
    pub fn watch_every(&self, every: Duration) -> tokio::task::JoinHandle<()> {
        self.material.watch_every(every)
    }
}

/// A connector for a client without mutual TLS towards `url`: an `http://` URL in the clear
/// (the system's CA certificates are not even read), an `https://` one checked against them
/// (none found: logged, and every `https://` server is refused).
pub fn system_roots(url: &str, http: HttpConnector) -> HttpsConnector<HttpConnector> {
    let no_roots = || {
        let config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default versions")
            .with_root_certificates(RootCertStore::empty())
            .with_no_client_auth();
        hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(config)
    };
    let builder = if url.starts_with("https://") {
        match hyper_rustls::HttpsConnectorBuilder::new().with_provider_and_native_roots(provider())
        {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, %url, "no system CA certificates: https:// is refused");
                no_roots()
            }
        }
    } else {
        no_roots()
    };
    builder.https_or_http().enable_http1().wrap_connector(http)
}

fn material(files: &PemFiles) -> Result<Material, TlsError> {
    let Some(ca) = &files.ca else {
        return Err(TlsError::Missing(
            "mutual TLS needs a CA bundle to check the server against".into(),
        ));
    };
    let (certs, key) = (files::chain(&files.cert)?, files::key(&files.key)?);
    // A key that is not the certificate's is refused (as for a listener's): a half-written
    // rotation is then kept out until both files are in.
    let key = CertifiedKey::from_der(certs, key, &provider()).map_err(|e| TlsError::File {
        path: files.key.clone(),
        why: format!("not usable with {}: {e}", files.cert.display()),
    })?;
    Ok(Material {
        key: Arc::new(key),
        roots: files::roots(ca)?,
    })
}

/// Presents the current certificate.
#[derive(Debug)]
struct Resolver(Arc<ArcSwap<Material>>);

impl std::fmt::Debug for Material {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Material")
            .field("roots", &self.roots.len())
            .finish()
    }
}

impl ResolvesClientCert for Resolver {
    fn resolve(
        &self,
        _acceptable_issuers: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load().key.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// The server's chain against the current CA bundle, for server authentication, and its SPIFFE
/// ID among the leaf's URI SANs; no host name.
#[derive(Debug)]
struct SpiffeVerifier {
    material: Arc<ArcSwap<Material>>,
    server_id: String,
    algorithms: WebPkiSupportedAlgorithms,
}

fn refused(e: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

/// A refusal in words.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Refusal(String);

impl ServerCertVerifier for SpiffeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let material = self.material.load();
        let cert = webpki::EndEntityCert::try_from(end_entity).map_err(refused)?;
        cert.verify_for_usage(
            self.algorithms.all,
            &material.roots.roots,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .map_err(refused)?;
        let named = uri_sans(end_entity)
            .map_err(|e| refused(Refusal(format!("cannot read its names: {e}"))))?;
        if named.contains(&self.server_id) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(refused(Refusal(format!(
                "the server's certificate names {named:?}, not the expected SPIFFE ID {}",
                self.server_id
            ))))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        tokio_rustls::rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        tokio_rustls::rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The URI SANs of a certificate.
fn uri_sans(der: &CertificateDer<'_>) -> Result<Vec<String>, String> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| e.to_string())?;
    let names = cert.subject_alternative_name().map_err(|e| e.to_string())?;
    Ok(names
        .into_iter()
        .flat_map(|san| san.value.general_names.iter())
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(u.to_string()),
            _ => None,
        })
        .collect())
}
