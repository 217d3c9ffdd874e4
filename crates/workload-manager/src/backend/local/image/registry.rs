//! The registry side of a pull: oci-client (registry v2 API, token auth, the host platform's
//! manifest from an index, digests verified while blobs stream), credentials from Docker's
//! `config.json`, and errors a person can act on.

use std::path::{Path, PathBuf};

use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::manifest::{OciDescriptor, OciImageManifest};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};

use super::unpack::Layer;

/// How registries are reached.
#[derive(Debug, Clone, Default)]
pub struct RegistrySettings {
    /// Registries (`host:port`) spoken to over plain HTTP.
    pub insecure: Vec<String>,
    /// Docker `config.json` with `auths`.
    pub auth_file: Option<PathBuf>,
    /// Most bytes an image's layers may unpack to (`None`: no limit).
    pub max_image_bytes: Option<u64>,
}

/// A failed registry operation.
#[derive(Debug)]
pub struct PullError {
    pub message: String,
    /// The registry could not be reached at all (a cached copy may stand in).
    pub unreachable: bool,
}

impl PullError {
    /// As a backend error: an unreachable registry, or one serving content that fails its
    /// digest, is the platform's state (503, worth a retry); anything else is the definition's
    /// image (400).
    pub fn into_backend(self, reference: &str) -> crate::backend::BackendError {
        use crate::backend::BackendError as B;
        let m = format!("cannot pull image {reference}: {}", self.message);
        if self.unreachable || self.message.contains("does not match its digest") {
            B::Unavailable(m)
        } else {
            B::Invalid(m)
        }
    }
}

/// A resolved image: the manifest for this platform, its digest and the raw config.
pub struct Resolved {
    pub digest: String,
    pub manifest: OciImageManifest,
    pub config: String,
}

pub struct Registry {
    settings: RegistrySettings,
}

impl Registry {
    pub fn new(settings: RegistrySettings) -> Result<Self, String> {
        for r in &settings.insecure {
            if r.contains('/') || r.is_empty() {
                return Err(format!(
                    "--insecure-registry {r:?}: give host:port, not a URL"
                ));
            }
        }
        Ok(Self { settings })
    }

    /// A client for one pull: credentials are read now, so a `docker login` applies at once.
    fn client(&self) -> Client {
        let protocol = if self.settings.insecure.is_empty() {
            ClientProtocol::Https
        } else {
            ClientProtocol::HttpsExcept(self.settings.insecure.clone())
        };
        Client::new(ClientConfig {
            protocol,
            connect_timeout: Some(std::time::Duration::from_secs(10)),
            read_timeout: Some(std::time::Duration::from_secs(60)),
            ..Default::default()
        })
    }

    /// The manifest (this platform's) and config of `image`. The config is read up to the size
    /// its descriptor declares, and at most [`MAX_CONFIG_BYTES`].
    pub async fn resolve(&self, image: &Reference) -> Result<Resolved, PullError> {
        let auth = self.auth_for(image);
        let client = self.client();
        let (manifest, digest) = client
            .pull_image_manifest(image, &auth)
            .await
            .map_err(|e| self.explain(image, &e))?;
        let desc = &manifest.config;
        let limit = declared_size(desc, MAX_CONFIG_BYTES, "config")?;
        let mut config = Bounded::new(Vec::new(), limit);
        client
            .pull_blob(image, desc, &mut config)
            .await
            .map_err(|e| self.explain(image, &e))?;
        let config = String::from_utf8(config.inner).map_err(|_| PullError {
            message: "the image config is not UTF-8 JSON".into(),
            unreachable: false,
        })?;
        Ok(Resolved {
            digest,
            manifest,
            config,
        })
    }

    /// Every layer of `resolved` as a verified blob file under `blobs` (downloaded unless there).
    pub async fn fetch_layers(
        &self,
        image: &Reference,
        resolved: &Resolved,
        blobs: &Path,
    ) -> Result<Vec<Layer>, PullError> {
        let client = self.client();
        let auth = self.auth_for(image);
        // Authenticates once for the blob pulls below.
        client
            .store_auth_if_needed(image.resolve_registry(), &auth)
            .await;
        let n = resolved.manifest.layers.len();
        let mut layers = Vec::with_capacity(n);
        for (i, desc) in resolved.manifest.layers.iter().enumerate() {
            let path = blobs.join(super::hex_of(&desc.digest));
            if !path.is_file() {
                tracing::info!(
                    layer = format!("{}/{n}", i + 1),
                    megabytes = format!("{:.1}", desc.size as f64 / 1e6),
                    digest = %desc.digest,
                    "pulling image layer"
                );
                self.download(&client, image, desc, &path).await?;
            }
            layers.push(Layer {
                path,
                media_type: desc.media_type.clone(),
            });
        }
        Ok(layers)
    }

    async fn download(
        &self,
        client: &Client,
        image: &Reference,
        desc: &OciDescriptor,
        path: &Path,
    ) -> Result<(), PullError> {
        let partial = path.with_extension(format!("partial-{}", uuid::Uuid::new_v4().simple()));
        let io = |e: std::io::Error| PullError {
            message: format!("{}: {e}", partial.display()),
            unreachable: false,
        };
        let limit = declared_size(
            desc,
            self.settings.max_image_bytes.unwrap_or(u64::MAX),
            "layer",
        )?;
        let file = tokio::fs::File::create(&partial).await.map_err(io)?;
        let mut out = Bounded::new(tokio::io::BufWriter::new(file), limit);
        let pulled = client.pull_blob(image, desc, &mut out).await;
        let flushed = tokio::io::AsyncWriteExt::flush(&mut out).await;
        match (pulled, flushed) {
            (Ok(()), Ok(())) => tokio::fs::rename(&partial, path).await.map_err(io),
            (Err(e), _) => {
                let _ = tokio::fs::remove_file(&partial).await;
                Err(self.explain(image, &e))
            }
            (_, Err(e)) => {
                let _ = tokio::fs::remove_file(&partial).await;
                Err(io(e))
            }
        }
    }

    /// Credentials for the image's registry from the Docker config file, if any.
    fn auth_for(&self, image: &Reference) -> RegistryAuth {
        let Some(file) = &self.settings.auth_file else {
            return RegistryAuth::Anonymous;
        };
        let Ok(raw) = std::fs::read(file) else {
            return RegistryAuth::Anonymous;
        };
        match credentials(&raw, &[image.registry(), image.resolve_registry()]) {
            Ok(Some((user, pass))) => RegistryAuth::Basic(user, pass),
            Ok(None) => RegistryAuth::Anonymous,
            Err(why) => {
                tracing::warn!(file = %file.display(), %why, "registry credentials ignored");
                RegistryAuth::Anonymous
            }
        }
    }

    /// An error message that says what happened and what to do.
    fn explain(&self, image: &Reference, e: &OciDistributionError) -> PullError {
        let registry = image.resolve_registry();
        let detail = crate::backend::error_chain(e);
        let (message, unreachable) = match e {
            OciDistributionError::RequestError(r) if r.is_connect() || r.is_timeout() => (
                format!(
                    "registry {registry} is unreachable (no network, or a plain-HTTP registry \
                     that needs --insecure-registry {registry}?); without a registry, \
                     `--images host` (AGENTCUBE_IMAGES=host) runs sandboxes on this host's /usr: \
                     {detail}"
                ),
                true,
            ),
            OciDistributionError::AuthenticationFailure(_)
            | OciDistributionError::UnauthorizedError { .. } => (
                format!(
                    "registry {registry} refused the credentials ({}): {detail}",
                    match &self.settings.auth_file {
                        Some(f) => format!("from {}", f.display()),
                        None => "none configured".into(),
                    }
                ),
                false,
            ),
            OciDistributionError::ImageManifestNotFoundError(_) => {
                (format!("not found in {registry}: {detail}"), false)
            }
            OciDistributionError::RegistryError { envelope, .. } => {
                let codes: Vec<String> = envelope
                    .errors
                    .iter()
                    .map(|c| format!("{:?}", c.code))
                    .collect();
                let what = if codes.iter().any(|c| c.contains("Unknown")) {
                    "not found (unknown repository, tag or digest)"
                } else if codes
                    .iter()
                    .any(|c| c.contains("Unauthorized") || c.contains("Denied"))
                {
                    "access denied (check the registry credentials)"
                } else {
                    "refused by the registry"
                };
                (format!("{what}: {detail}"), false)
            }
            OciDistributionError::IoError(io) if io.kind() == std::io::ErrorKind::FileTooLarge => (
                format!(
                    "content does not match its digest: the registry sent more bytes than the \
                     manifest declares (corrupted or tampered; cut off there, nothing was kept): \
                     {detail}"
                ),
                false,
            ),
            OciDistributionError::DigestError(_) => (
                format!(
                    "content does not match its digest (corrupted or tampered; nothing was \
                     kept): {detail}"
                ),
                false,
            ),
            _ => (detail, false),
        };
        PullError {
            message,
            unreachable,
        }
    }
}

/// Most bytes an image config may have (real ones have a few KiB).
pub const MAX_CONFIG_BYTES: u64 = 4 << 20;

/// The size a blob's descriptor declares (its content must have exactly that many bytes), if
/// it is at most `max`.
fn declared_size(desc: &OciDescriptor, max: u64, what: &str) -> Result<u64, PullError> {
    match u64::try_from(desc.size) {
        Ok(size) if size <= max => Ok(size),
        _ => Err(PullError {
            message: format!(
                "its {what} {} declares {} bytes, more than the {max} this host takes",
                desc.digest, desc.size
            ),
            unreachable: false,
        }),
    }
}

/// A writer taking at most `left` bytes: a registry sending more than a blob's declared size
/// (an endless stream, say) is cut off there, before it fills memory or the disk (the digest
/// would only be checked at the end).
struct Bounded<W> {
    inner: W,
    left: u64,
}

impl<W> Bounded<W> {
    fn new(inner: W, left: u64) -> Self {
        Self { inner, left }
    }
}

impl<W: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Bounded<W> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        if buf.len() as u64 > self.left {
            return std::task::Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::FileTooLarge,
                "the registry sent more bytes than the blob's declared size",
            )));
        }
        let written = std::task::ready!(std::pin::Pin::new(&mut self.inner).poll_write(cx, buf))?;
        self.left -= written as u64;
        std::task::Poll::Ready(Ok(written))
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// `user:password` for any of `registries` from a Docker `config.json` (keys may carry a scheme
/// and a path, as `https://index.docker.io/v1/`).
fn credentials(raw: &[u8], registries: &[&str]) -> Result<Option<(String, String)>, String> {
    use base64::Engine;
    #[derive(serde::Deserialize)]
    struct File {
        #[serde(default)]
        auths: std::collections::HashMap<String, Entry>,
    }
    #[derive(serde::Deserialize)]
    struct Entry {
        auth: Option<String>,
        username: Option<String>,
        password: Option<String>,
    }
    let file: File = serde_json::from_slice(raw).map_err(|e| format!("not valid JSON: {e}"))?;
    let host = |k: &str| {
        let k = k
            .trim_start_matches("https://")
            .trim_start_matches("http://");
        k.split('/').next().unwrap_or(k).to_string()
    };
    let Some(entry) = file
        .auths
        .iter()
        .find(|(k, _)| registries.contains(&host(k).as_str()))
        .map(|(_, v)| v)
    else {
        return Ok(None);
    };
    if let (Some(u), Some(p)) = (&entry.username, &entry.password) {
        return Ok(Some((u.clone(), p.clone())));
    }
    let Some(auth) = &entry.auth else {
        return Ok(None);
    };
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(auth.trim())
        .map_err(|e| format!("auth is not base64: {e}"))?;
    let text = String::from_utf8(decoded).map_err(|_| "auth is not UTF-8".to_string())?;
    let (u, p) = text.split_once(':').ok_or("auth is not user:password")?;
    Ok(Some((u.to_string(), p.to_string())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_blob_writer_takes_its_declared_size_and_not_a_byte_more() {
        use tokio::io::AsyncWriteExt;
        let mut w = Bounded::new(Vec::new(), 10);
        w.write_all(b"0123456789").await.unwrap();
        assert_eq!(w.inner, b"0123456789");
        let more = w.write_all(b"x").await.unwrap_err();
        assert_eq!(more.kind(), std::io::ErrorKind::FileTooLarge);
        let mut w = Bounded::new(Vec::new(), 4);
        assert!(w.write_all(b"12345").await.is_err());
        assert!(
            w.inner.is_empty(),
            "nothing of an oversized chunk is written"
        );
    }

    #[test]
    fn docker_config_credentials_by_registry_host() {
        let raw = br#"{"auths":{
            "https://index.docker.io/v1/":{"auth":"aHViOnNlY3JldA=="},
            "127.0.0.1:5000":{"username":"u","password":"p"},
            "bad.example":{"auth":"!!"}}}"#;
        assert_eq!(
            credentials(raw, &["docker.io", "index.docker.io"]).unwrap(),
            Some(("hub".into(), "secret".into()))
        );
        assert_eq!(
            credentials(raw, &["127.0.0.1:5000"]).unwrap(),
            Some(("u".into(), "p".into()))
        );
        assert_eq!(credentials(raw, &["ghcr.io"]).unwrap(), None);
        assert!(credentials(raw, &["bad.example"]).is_err());
        assert!(credentials(b"not json", &["x"]).is_err());
    }
}
