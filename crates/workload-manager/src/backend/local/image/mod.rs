//! OCI images for local sandboxes: a definition's `image:` is pulled from its registry and run as
//! the sandbox's read-only root filesystem, with PicoD bound in from the host.
//!
//! Main flow of [`Images::get`] (once per image per manager; concurrent callers wait for it):
//! 1. Resolve: the manifest (the host platform's, from an index) and the image config, by the
//!    registry v2 API ([`registry`]); the manifest digest pins everything after. An unreachable
//!    registry falls back to the digest this host last resolved for the same reference.
//! 2. Layers: each blob is downloaded once into `<state>/images/blobs/`, its sha256 checked
//!    against the manifest while it streams (a mismatch fails the pull; nothing is kept).
//! 3. Unpack ([`unpack`]): layers applied in order into `<state>/images/rootfs/<digest>/`, with
//!    whiteouts honoured and set-id bits, device nodes and ownership dropped, plus the mount points
//!    the sandbox needs; renamed into place only when complete, so a crash leaves no half rootfs.
//!
//! Every sandbox of that image shares the rootfs read-only (bubblewrap `--ro-bind`, or gVisor's
//! read-only root); writes go to the workspace (`/root`) and `/tmp`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};
use oci_client::Reference;
use serde::Deserialize;

use crate::backend::BackendError;

mod registry;
mod unpack;

pub use registry::RegistrySettings;

/// The `image:` value that keeps the host-rootfs mode for one definition.
pub const HOST_IMAGE: &str = "host";

/// The image flags of the local backend (`workload-manager`, `agentcube up`).
#[derive(Debug, Clone, clap::Args)]
pub struct ImageArgs {
    /// What a definition's `image:` means on the local backend: `pull` runs the image (pulled
    /// from its registry) as the sandbox's root filesystem; `host` ignores it and runs every
    /// sandbox on this host's `/usr` (for machines without a registry). `image: host` in a
    /// definition always means the host.
    #[arg(long, env = "AGENTCUBE_IMAGES", default_value = "pull", value_parser = ["pull", "host"])]
    pub images: String,
    /// A registry (`host:port`) reached over plain HTTP instead of HTTPS; repeatable.
    #[arg(
        long = "insecure-registry",
        env = "AGENTCUBE_INSECURE_REGISTRIES",
        value_delimiter = ','
    )]
    pub insecure_registries: Vec<String>,
    /// Registry credentials in Docker's `config.json` format (`auths.<registry>.auth`; default:
    /// `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`). Read at each pull.
    #[arg(long, env = "AGENTCUBE_REGISTRY_AUTH_FILE")]
    pub registry_auth_file: Option<PathBuf>,
    /// Most an image may unpack to on this host (a quantity such as `16Gi`; `0` = no limit): an
    /// image whose layers unpack to more (a decompression bomb, say) fails its creates with 400.
    #[arg(long, env = "AGENTCUBE_MAX_IMAGE_SIZE", default_value = "16Gi", value_parser = image_size)]
    pub max_image_size: u64,
}

fn image_size(v: &str) -> Result<u64, String> {
    super::quantity::bytes(v)
}

impl ImageArgs {
    /// The registry settings, or `None` when images are not pulled (`--images host`).
    /// `docker_config` is the default credentials file (from `DOCKER_CONFIG` or `HOME`, read by
    /// `main`).
    pub fn settings(&self, docker_config: Option<PathBuf>) -> Option<RegistrySettings> {
        (self.images == "pull").then(|| RegistrySettings {
            insecure: self.insecure_registries.clone(),
            auth_file: self.registry_auth_file.clone().or(docker_config),
            max_image_bytes: Some(self.max_image_size).filter(|b| *b > 0),
        })
    }
}

/// The default Docker credentials file: `$DOCKER_CONFIG/config.json`, else
/// `$HOME/.docker/config.json` (the caller passes those two variables).
pub fn docker_config_file(
    docker_config: Option<PathBuf>,
    home: Option<PathBuf>,
) -> Option<PathBuf> {
    docker_config
        .map(|d| d.join("config.json"))
        .or_else(|| home.map(|h| h.join(".docker/config.json")))
}

/// A pulled image, ready to run.
#[derive(Debug, Clone)]
pub struct Image {
    /// The reference as the definition wrote it.
    pub reference: String,
    /// The manifest digest the rootfs was built from (`sha256:…`).
    pub digest: String,
    /// The unpacked, complete root filesystem.
    pub rootfs: PathBuf,
    /// From the image config: `Env`, `Entrypoint`, `Cmd`, `WorkingDir`.
    pub config: RunConfig,
}

/// The parts of an image config a sandbox uses.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase", default)]
pub struct RunConfig {
    pub env: Option<Vec<String>>,
    pub entrypoint: Option<Vec<String>>,
    pub cmd: Option<Vec<String>>,
    pub working_dir: Option<String>,
}

impl RunConfig {
    /// `Env` as pairs (entries without `=` are skipped).
    pub fn env_pairs(&self) -> Vec<(String, String)> {
        self.env
            .iter()
            .flatten()
            .filter_map(|e| e.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }
}

#[derive(Deserialize)]
struct ConfigFile {
    #[serde(default)]
    config: RunConfig,
}

/// When the registry is asked (Kubernetes' `imagePullPolicy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PullPolicy {
    /// Once per image per manager (and from the cache while the registry is unreachable).
    #[default]
    IfNotPresent,
    /// The tag is resolved again at each sandbox start (layers already here are not downloaded).
    Always,
    /// Only what this host already has.
    Never,
}

impl PullPolicy {
    /// From a definition's `imagePullPolicy` (unset or unknown: `IfNotPresent`).
    pub fn parse(policy: Option<&str>) -> Self {
        match policy {
            Some("Always") => Self::Always,
            Some("Never") => Self::Never,
            _ => Self::IfNotPresent,
        }
    }
}

/// A pull in flight, awaited by every create that needs the image. It runs as its own task, so
/// a create that gives up (timeout, client gone) does not cancel it.
type Pull = Shared<BoxFuture<'static, Result<Arc<Image>, BackendError>>>;

enum Slot {
    Ready(Arc<Image>),
    Pulling(Pull),
}

/// The image cache of one local backend. Cheap to clone.
#[derive(Clone)]
pub struct Images {
    inner: Arc<Inner>,
}

struct Inner {
    dir: PathBuf,
    max_image_bytes: Option<u64>,
    registry: registry::Registry,
    slots: Mutex<HashMap<String, Slot>>,
}

impl std::fmt::Debug for Images {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Images")
            .field("dir", &self.inner.dir)
            .finish()
    }
}

impl Images {
    /// An image cache under `dir` (`<state>/images`), created 0711: sandboxes (other uids) must
    /// traverse it to reach their rootfs, but may not list it.
    pub fn new(dir: PathBuf, settings: RegistrySettings) -> Result<Self, String> {
        use std::os::unix::fs::PermissionsExt;
        for d in ["", "blobs", "rootfs", "configs", "refs"] {
            let p = dir.join(d);
            std::fs::create_dir_all(&p).map_err(|e| format!("{}: {e}", p.display()))?;
            let mode = if matches!(d, "" | "rootfs") {
                0o711
            } else {
                0o700
            };
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))
                .map_err(|e| format!("{}: {e}", p.display()))?;
        }
        unpack::remove_partials(&dir);
        Ok(Self {
            inner: Arc::new(Inner {
                max_image_bytes: settings.max_image_bytes,
                registry: registry::Registry::new(settings)?,
                dir,
                slots: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// The image `reference`, pulled and unpacked if this manager has not done so yet (per
    /// `policy`). Concurrent callers share one pull.
    #[tracing::instrument(name = "image", skip(self), fields(image = reference))]
    pub async fn get(
        &self,
        reference: &str,
        policy: PullPolicy,
    ) -> Result<Arc<Image>, BackendError> {
        let pull = {
            let mut slots = self.inner.slots.lock().unwrap();
            match (slots.get(reference), policy) {
                (Some(Slot::Pulling(p)), _) => p.clone(),
                (Some(Slot::Ready(image)), PullPolicy::IfNotPresent | PullPolicy::Never) => {
                    return Ok(image.clone());
                }
                (None, PullPolicy::Never) => return self.inner.local_only(reference),
                _ => {
                    let pull = self.start_pull(reference);
                    slots.insert(reference.to_string(), Slot::Pulling(pull.clone()));
                    pull
                }
            }
        };
        pull.await
    }

    /// Starts the pull task; it records its outcome in the slot itself.
    fn start_pull(&self, reference: &str) -> Pull {
        let (inner, reference) = (self.inner.clone(), reference.to_string());
        let task = tokio::spawn(async move {
            let result = inner.prepare(&reference).await.map(Arc::new);
            let mut slots = inner.slots.lock().unwrap();
            match &result {
                Ok(image) => {
                    slots.insert(reference, Slot::Ready(image.clone()));
                }
                Err(_) => {
                    slots.remove(&reference);
                }
            }
            result
        });
        async move {
            task.await
                .map_err(|e| BackendError::Failed(format!("image pull task: {e}")))?
        }
        .boxed()
        .shared()
    }

    /// The cache directory (for tests and diagnostics).
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }
}

impl Inner {
    /// `imagePullPolicy: Never`: only an image this host already has.
    fn local_only(&self, reference: &str) -> Result<Arc<Image>, BackendError> {
        match self.known_digest(reference) {
            Some(d) if self.rootfs(&d).is_dir() => Ok(Arc::new(self.load(reference, &d)?)),
            _ => Err(BackendError::Invalid(format!(
                "image {reference} is not on this host and imagePullPolicy is Never"
            ))),
        }
    }

    async fn prepare(&self, reference: &str) -> Result<Image, BackendError> {
        let parsed: Reference = reference.parse().map_err(|e| {
            BackendError::Invalid(format!(
                "image {reference:?} is not an image reference: {e}"
            ))
        })?;
        let resolved = match self.registry.resolve(&parsed).await {
            Ok(r) => r,
            Err(e) if e.unreachable => match self.known_digest(reference) {
                Some(digest) if self.rootfs(&digest).is_dir() => {
                    tracing::warn!(error = %e.message, %digest,
                        "registry unreachable; using the copy of this image pulled before");
                    return self.load(reference, &digest);
                }
                _ => return Err(e.into_backend(reference)),
            },
            Err(e) => return Err(e.into_backend(reference)),
        };
        let digest = resolved.digest.clone();
        self.remember_digest(reference, &digest);
        if !self.rootfs(&digest).is_dir() {
            let started = std::time::Instant::now();
            let blobs = self
                .registry
                .fetch_layers(&parsed, &resolved, &self.dir.join("blobs"))
                .await
                .map_err(|e| e.into_backend(reference))?;
            let (root, target) = (self.dir.join("rootfs"), self.rootfs(&digest));
            let max = self.max_image_bytes;
            tokio::task::spawn_blocking(move || unpack::build_rootfs(&root, &target, &blobs, max))
                .await
                .map_err(|e| BackendError::Failed(format!("unpacking {reference}: {e}")))?
                .map_err(|e| {
                    let m = format!("unpacking image {reference}: {e}");
                    match e.kind() {
                        std::io::ErrorKind::FileTooLarge => BackendError::Invalid(m),
                        _ => BackendError::Failed(m),
                    }
                })?;
            tracing::info!(%digest, seconds = started.elapsed().as_secs_f32(), "image ready");
        }
        let config = self.config_path(&digest);
        std::fs::write(&config, &resolved.config)
            .map_err(|e| BackendError::Failed(format!("{}: {e}", config.display())))?;
        self.load(reference, &digest)
    }

    /// The image from the cache (rootfs and config of `digest`).
    fn load(&self, reference: &str, digest: &str) -> Result<Image, BackendError> {
        let raw = std::fs::read(self.config_path(digest)).map_err(|e| {
            BackendError::Failed(format!(
                "image {reference}: its cached config is unreadable: {e}"
            ))
        })?;
        let file: ConfigFile = serde_json::from_slice(&raw).map_err(|e| {
            BackendError::Failed(format!("image {reference}: its config is not valid: {e}"))
        })?;
        Ok(Image {
            reference: reference.to_string(),
            digest: digest.to_string(),
            rootfs: self.rootfs(digest),
            config: file.config,
        })
    }

    fn rootfs(&self, digest: &str) -> PathBuf {
        self.dir.join("rootfs").join(hex_of(digest))
    }

    fn config_path(&self, digest: &str) -> PathBuf {
        self.dir
            .join("configs")
            .join(format!("{}.json", hex_of(digest)))
    }

    /// Where the digest last resolved for `reference` is kept (for pulls while offline).
    fn ref_path(&self, reference: &str) -> PathBuf {
        use sha2::{Digest, Sha256};
        let h = Sha256::digest(reference.as_bytes());
        let name: String = h[..16].iter().map(|b| format!("{b:02x}")).collect();
        self.dir.join("refs").join(name)
    }

    fn known_digest(&self, reference: &str) -> Option<String> {
        let d = std::fs::read_to_string(self.ref_path(reference)).ok()?;
        let d = d.trim();
        d.starts_with("sha256:").then(|| d.to_string())
    }

    fn remember_digest(&self, reference: &str, digest: &str) {
        let _ = std::fs::write(self.ref_path(reference), digest);
    }
}

/// The shared libraries and loader `binary` needs (from `ldd`), to bind into an image sandbox;
/// empty for a static binary.
pub fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>, String> {
    let out = std::process::Command::new("ldd")
        .arg(binary)
        .env_clear()
        .output()
        .map_err(|e| {
            format!(
                "cannot run ldd on {}: {e} (install libc-bin)",
                binary.display()
            )
        })?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || text.contains("not a dynamic executable") {
        return Ok(Vec::new());
    }
    let mut libs = Vec::new();
    for line in text.lines() {
        // `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)` or `/lib64/ld-linux-x86-64.so.2 (0x…)`
        let path = match line.split_once("=>") {
            Some((_, right)) => right.split_whitespace().next(),
            None => line
                .split_whitespace()
                .next()
                .filter(|p| p.starts_with('/')),
        };
        // Bound under the name the binary asks for (bubblewrap follows a symlinked source).
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(p));
        }
    }
    Ok(libs)
}

/// `sha256:abc…` → `abc…` (only hex survives, so it is always a safe file name).
fn hex_of(digest: &str) -> String {
    digest
        .rsplit(':')
        .next()
        .unwrap_or(digest)
        .chars()
        .filter(char::is_ascii_hexdigit)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_config_fields_and_env_pairs() {
        let f: ConfigFile = serde_json::from_str(
            r#"{"architecture":"amd64","config":{"Env":["PATH=/usr/local/bin:/usr/bin","X=a=b","junk"],
               "Entrypoint":["python3"],"Cmd":["app.py"],"WorkingDir":"/app"}}"#,
        )
        .unwrap();
        assert_eq!(
            f.config.entrypoint.as_deref(),
            Some(&["python3".to_string()][..])
        );
        assert_eq!(f.config.working_dir.as_deref(), Some("/app"));
        assert_eq!(
            f.config.env_pairs(),
            vec![
                ("PATH".to_string(), "/usr/local/bin:/usr/bin".to_string()),
                ("X".to_string(), "a=b".to_string())
            ]
        );
        let empty: ConfigFile = serde_json::from_str(r#"{"config":{}}"#).unwrap();
        assert_eq!(empty.config, RunConfig::default());
    }

    #[test]
    fn digests_become_hex_file_names() {
        assert_eq!(hex_of("sha256:ab12"), "ab12");
        assert_eq!(hex_of("sha256:../../etc"), "ec");
    }
}
