//! The PEM files: loading them, waiting for them, and noticing when they change.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::RootCertStore;

use crate::TlsError;

/// A certificate chain, its private key and, for mutual TLS, the CA bundle peers are checked
/// against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PemFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: Option<PathBuf>,
}

impl PemFiles {
    fn paths(&self) -> impl Iterator<Item = &Path> {
        [&self.cert, &self.key]
            .into_iter()
            .chain(self.ca.as_ref())
            .map(PathBuf::as_path)
    }
}

fn bad(path: &Path, why: impl std::fmt::Display) -> TlsError {
    TlsError::File {
        path: path.to_path_buf(),
        why: why.to_string(),
    }
}

/// The certificates of a PEM file, at least one.
pub(crate) fn chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| bad(path, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| bad(path, e))?;
    if certs.is_empty() {
        return Err(bad(path, "no certificate"));
    }
    Ok(certs)
}

/// The private key of a PEM file (PKCS#8, PKCS#1 or SEC1).
pub(crate) fn key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| bad(path, e))
}

/// The CA bundle of a PEM file, at least one usable certificate.
pub(crate) fn roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in chain(path)? {
        roots.add(cert).map_err(|e| bad(path, e))?;
    }
    Ok(roots)
}

/// Waits until every file exists (a sidecar writes them after start), at most `timeout`.
pub async fn wait_for_files(files: &PemFiles, timeout: Duration) -> Result<(), TlsError> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let missing: Vec<String> = files
            .paths()
            .filter(|p| !p.exists())
            .map(|p| p.display().to_string())
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(TlsError::Missing(format!(
                "TLS files still missing after {timeout:?}: {}",
                missing.join(", ")
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What identifies the files' contents cheaply: modification time, size and inode of each
/// (a sidecar replaces them by rename, or rewrites them in place).
pub(crate) type Fingerprint = Vec<Option<(std::time::SystemTime, u64, u64)>>;

/// The files' [`Fingerprint`] now.
fn fingerprint(files: &PemFiles) -> Fingerprint {
    use std::os::unix::fs::MetadataExt;
    files
        .paths()
        .map(|p| {
            let m = std::fs::metadata(p).ok()?;
            Some((m.modified().ok()?, m.len(), m.ino()))
        })
        .collect()
}

/// What was built from the files (a listener's configuration, a client's certificate and CA),
/// swapped whole for a new build when they change.
pub(crate) struct Reloading<T> {
    pub(crate) files: PemFiles,
    /// The files' fingerprint when `current` was built.
    loaded: Fingerprint,
    pub(crate) current: Arc<ArcSwap<T>>,
    build: fn(&PemFiles) -> Result<T, TlsError>,
}

impl<T> Clone for Reloading<T> {
    fn clone(&self) -> Self {
        Self {
            files: self.files.clone(),
            loaded: self.loaded.clone(),
            current: self.current.clone(),
            build: self.build,
        }
    }
}

impl<T> std::fmt::Debug for Reloading<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.files.fmt(f)
    }
}

impl<T: Send + Sync + 'static> Reloading<T> {
    /// `build` of `files` (fingerprinted before they are read, so that a change while they are
    /// read is seen as a change).
    pub(crate) fn load(
        files: PemFiles,
        build: fn(&PemFiles) -> Result<T, TlsError>,
    ) -> Result<Self, TlsError> {
        let loaded = fingerprint(&files);
        let current = Arc::new(ArcSwap::from_pointee(build(&files)?));
        Ok(Self {
            files,
            loaded,
            current,
            build,
        })
    }

    /// Builds anew whenever the files differ from those last looked at (every `every`), until
    /// the runtime ends; a build that fails is logged, the previous one stays, and it is tried
    /// again at the next change.
    pub(crate) fn watch_every(&self, every: Duration) -> tokio::task::JoinHandle<()> {
        let (this, mut seen) = (self.clone(), self.loaded.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let now = fingerprint(&this.files);
                if now == seen {
                    continue;
                }
                seen = now;
                match (this.build)(&this.files) {
                    Ok(new) => {
                        this.current.store(Arc::new(new));
                        tracing::info!(cert = %this.files.cert.display(), "TLS certificates reloaded");
                    }
                    Err(e) => tracing::warn!(
                        error = %e,
                        "TLS files changed but do not load; the previous certificates stay"
                    ),
                }
            }
        })
    }
}
