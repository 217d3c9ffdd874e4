//! A real OCI registry (Debian's `docker-registry`, the CNCF distribution server) on loopback,
//! and images this test builds itself from host files and pushes with oci-client.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use oci_client::client::{ClientConfig, ClientProtocol, Config, ImageLayer};
use oci_client::secrets::RegistryAuth;
use sha2::{Digest, Sha256};

pub struct Registry {
    pub addr: String,
    pub storage: PathBuf,
    /// Basic credentials the registry requires (htpasswd), if any.
    pub auth: Option<(String, String)>,
    child: Option<Child>,
    _dir: tempfile::TempDir,
}

impl Registry {
    pub async fn start() -> Self {
        Self::start_with(None).await
    }

    /// A registry that requires `user`/`password` (htpasswd with bcrypt) for everything.
    pub async fn start_with(auth: Option<(&str, &str)>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        let storage = dir.path().join("storage");
        let config = dir.path().join("config.yml");
        let mut yaml = format!(
            "version: 0.1\nlog: {{level: warn}}\nstorage:\n  filesystem: {{rootdirectory: {}}}\n  delete: {{enabled: true}}\nhttp: {{addr: \"{addr}\"}}\n",
            storage.display()
        );
        if let Some((user, password)) = auth {
            let htpasswd = dir.path().join("htpasswd");
            let hash = bcrypt::hash(password, 4).unwrap();
            std::fs::write(&htpasswd, format!("{user}:{hash}\n")).unwrap();
            yaml.push_str(&format!(
                "auth:\n  htpasswd: {{realm: agentcube-test, path: {}}}\n",
                htpasswd.display()
            ));
        }
        std::fs::write(&config, yaml).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("docker-registry (apt-get install docker-registry)");
        // Owned at once, so a registry that never comes up is still killed (Drop).
        let registry = Self {
            addr: addr.clone(),
            storage,
            auth: auth.map(|(u, p)| (u.to_string(), p.to_string())),
            child: Some(child),
            _dir: dir,
        };
        let http = reqwest::Client::new();
        for _ in 0..100 {
            // 401 when credentials are required: up all the same.
            if http
                .get(format!("http://{addr}/v2/"))
                .send()
                .await
                .is_ok_and(|r| r.status() == 200 || r.status() == 401)
            {
                return registry;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        drop(registry);
        panic!("docker-registry did not start on {addr}");
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The file the registry serves a blob from.
    pub fn blob_file(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.storage
            .join("docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    /// Pushes `layers` (gzip or zstd tars, told apart by their first bytes) with `config` (the
    /// image config's `config` object) as `<addr>/<name>`; returns (manifest digest, layer
    /// digests).
    pub async fn push(
        &self,
        name: &str,
        layers: &[Vec<u8>],
        config: serde_json::Value,
    ) -> (String, Vec<String>) {
        let diff_ids: Vec<String> = layers.iter().map(|l| sha256(&decompress(l))).collect();
        let image_config = serde_json::json!({
            "architecture": "amd64", "os": "linux", "config": config,
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        });
        let client = oci_client::Client::new(ClientConfig {
            protocol: ClientProtocol::HttpsExcept(vec![self.addr.clone()]),
            ..Default::default()
        });
        let reference: oci_client::Reference = format!("{}/{name}", self.addr).parse().unwrap();
        let oci_layers: Vec<ImageLayer> = layers
            .iter()
            .map(|l| {
                let kind = if is_zstd(l) { "zstd" } else { "gzip" };
                ImageLayer::new(
                    l.clone(),
                    format!("application/vnd.oci.image.layer.v1.tar+{kind}"),
                    None,
                )
            })
            .collect();
        let config = Config::new(
            serde_json::to_vec(&image_config).unwrap(),
            "application/vnd.oci.image.config.v1+json".into(),
            None,
        );
        let auth = match &self.auth {
            Some((u, p)) => RegistryAuth::Basic(u.clone(), p.clone()),
            None => RegistryAuth::Anonymous,
        };
        client
            .push(&reference, &oci_layers, config, &auth, None)
            .await
            .unwrap();
        let digest = client
            .fetch_manifest_digest(&reference, &auth)
            .await
            .unwrap();
        (digest, layers.iter().map(|l| sha256(l)).collect())
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}

pub fn sha256(data: &[u8]) -> String {
    let h = Sha256::digest(data);
    format!(
        "sha256:{}",
        h.iter().map(|b| format!("{b:02x}")).collect::<String>()
    )
}

fn is_zstd(layer: &[u8]) -> bool {
    layer.starts_with(&[0x28, 0xb5, 0x2f, 0xfd])
}

/// A layer's tar (its diff id is this tar's digest).
fn decompress(layer: &[u8]) -> Vec<u8> {
    if is_zstd(layer) {
        return zstd::decode_all(layer).unwrap();
    }
    let mut out = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(layer), &mut out).unwrap();
    out
}

/// A gzip layer recompressed with zstd (pushed as `tar+zstd`).
pub fn zstd(layer: &[u8]) -> Vec<u8> {
    zstd::encode_all(&decompress(layer)[..], 3).unwrap()
}

/// A gzip layer built by `fill`.
pub fn layer(fill: impl FnOnce(&mut Layer)) -> Vec<u8> {
    let mut l = Layer {
        b: tar::Builder::new(Vec::new()),
    };
    l.b.follow_symlinks(false);
    fill(&mut l);
    let raw = l.b.into_inner().unwrap();
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(&raw).unwrap();
    enc.finish().unwrap()
}

pub struct Layer {
    b: tar::Builder<Vec<u8>>,
}

impl Layer {
    pub fn file(&mut self, path: &str, content: &[u8], mode: u32) {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_size(content.len() as u64);
        h.set_mode(mode);
        self.b.append_data(&mut h, path, content).unwrap();
    }

    pub fn dir(&mut self, path: &str) {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_size(0);
        h.set_mode(0o755);
        self.b.append_data(&mut h, path, &[][..]).unwrap();
    }

    pub fn symlink(&mut self, path: &str, target: &str) {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        h.set_mode(0o777);
        self.b.append_link(&mut h, path, target).unwrap();
    }

    /// A host file's content (symlinks followed) at `inside`.
    pub fn host_file(&mut self, host: &Path, inside: &str) {
        let data = std::fs::read(host).unwrap_or_else(|e| panic!("{}: {e}", host.display()));
        self.file(inside, &data, 0o755);
    }

    /// A host directory tree at `inside`, minus directories named in `skip`.
    pub fn host_tree(&mut self, host: &Path, inside: &str, skip: &[&str]) {
        self.dir(inside);
        let mut entries: Vec<_> = std::fs::read_dir(host).unwrap().flatten().collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let name = e.file_name().to_string_lossy().to_string();
            let (path, inner) = (e.path(), format!("{inside}/{name}"));
            let meta = std::fs::symlink_metadata(&path).unwrap();
            if meta.file_type().is_symlink() {
                let target = std::fs::read_link(&path).unwrap();
                self.symlink(&inner, &target.to_string_lossy());
            } else if meta.is_dir() {
                if !skip.contains(&name.as_str()) {
                    self.host_tree(&path, &inner, skip);
                }
            } else if meta.is_file() {
                use std::os::unix::fs::PermissionsExt;
                self.file(
                    &inner,
                    &std::fs::read(&path).unwrap(),
                    meta.permissions().mode() & 0o777,
                );
            }
        }
    }
}

/// Shared libraries of host binaries (`ldd`), as absolute paths.
fn libraries(binaries: &[PathBuf]) -> Vec<String> {
    let mut libs = std::collections::BTreeSet::new();
    for b in binaries {
        let out = Command::new("ldd").arg(b).output().unwrap();
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let path = match line.split_once("=>") {
                Some((_, r)) => r.split_whitespace().next(),
                None => line.split_whitespace().next(),
            };
            if let Some(p) = path.filter(|p| p.starts_with('/')) {
                libs.insert(p.to_string());
            }
        }
    }
    libs.into_iter().collect()
}

/// A merged-/usr base layer with this host's `dash` (as `sh`) and Python 3 (interpreter, the
/// standard library without its tests, and every library they link), plus `/etc/passwd`.
/// What is not in it (bwrap, coreutils, …) is absent in the sandbox.
pub fn python_base_layer() -> Vec<u8> {
    let python = std::fs::canonicalize("/usr/bin/python3").unwrap();
    let version = python.file_name().unwrap().to_string_lossy().to_string();
    let stdlib = PathBuf::from("/usr/lib").join(&version);
    let mut binaries = vec![python.clone(), PathBuf::from("/usr/bin/dash")];
    if let Ok(dynload) = std::fs::read_dir(stdlib.join("lib-dynload")) {
        binaries.extend(dynload.flatten().map(|e| e.path()));
    }
    let libs = libraries(&binaries);
    layer(|l| {
        for d in [
            "usr",
            "usr/bin",
            "usr/lib",
            "usr/lib64",
            "usr/lib/x86_64-linux-gnu",
            "etc",
        ] {
            l.dir(d);
        }
        for (link, target) in [
            ("bin", "usr/bin"),
            ("lib", "usr/lib"),
            ("lib64", "usr/lib64"),
            ("sbin", "usr/bin"),
        ] {
            l.symlink(link, target);
        }
        l.host_file(&python, &format!("usr/bin/{version}"));
        l.symlink("usr/bin/python3", &version);
        l.host_file(Path::new("/usr/bin/dash"), "usr/bin/dash");
        l.symlink("usr/bin/sh", "dash");
        for lib in &libs {
            // /lib/… and /lib64/… are /usr/lib/… and /usr/lib64/… here (merged /usr).
            let inside = lib.trim_start_matches('/').trim_start_matches("usr/");
            l.host_file(Path::new(lib), &format!("usr/{inside}"));
        }
        l.host_tree(
            &stdlib,
            &format!("usr/lib/{version}"),
            &[
                "test",
                "__pycache__",
                "idlelib",
                "tkinter",
                "turtledemo",
                "lib2to3",
                "ensurepip",
                "pydoc_data",
            ],
        );
        l.file(
            "etc/passwd",
            b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/sh\n",
            0o644,
        );
        l.file("etc/group", b"root:x:0:\nnogroup:x:65534:\n", 0o644);
    })
}
