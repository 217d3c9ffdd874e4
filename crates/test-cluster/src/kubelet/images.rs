//! What an image runs here. There is no container runtime and no registry: an image name is
//! matched against a few rules that map it to a program on this host, mounted where the image
//! would have it, with the image's `ENTRYPOINT`, `CMD` and environment (from the repository's
//! Dockerfiles, checked by a test). Anything else cannot run and its pod stays `Pending`
//! with `ErrImagePull`.

use std::path::PathBuf;

/// One image rule: images whose name (before the tag) ends in `name` (after a `/`) or is it.
#[derive(Debug, Clone)]
pub struct Image {
    pub name: String,
    /// Other names of the same image (e.g. the chart's `agentcube-router`, `workloadmanager`).
    pub aliases: Vec<String>,
    /// Host program mounted at `path` inside the pod (`None`: the program is in the host's `/usr`).
    pub binary: Option<PathBuf>,
    pub path: String,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    /// Image environment; `$(POD_IP)` is expanded. Container env wins over it.
    pub env: Vec<(String, String)>,
}

/// The rules of a cluster.
#[derive(Debug, Clone, Default)]
pub struct Images {
    pub rules: Vec<Image>,
}

impl Images {
    /// This repository's images (`deploy/docker/Dockerfile.*`) mapped to the binaries in
    /// `bin_dir`, plus `python` (the host's `python3`) and `redis` (the host's `redis-server`).
    /// PicoD is told to listen on its pod IP (`PICOD_LISTEN`), since pods share the host's network.
    pub fn repository(bin_dir: &std::path::Path) -> Self {
        let ours = |name: &str, cmd: &[&str], env: &[(&str, &str)]| Image {
            name: name.into(),
            aliases: Vec::new(),
            binary: Some(bin_dir.join(name)),
            path: format!("/usr/local/bin/{name}"),
            entrypoint: vec![format!("/usr/local/bin/{name}")],
            cmd: cmd.iter().map(ToString::to_string).collect(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        Self {
            rules: vec![
                ours(
                    "picod",
                    &["--port=8080", "--workspace=/root"],
                    &[("PICOD_LISTEN", "$(POD_IP):8080")],
                ),
                // Pods share the host's network: each listens on its own pod IP.
                Image {
                    aliases: vec!["agentcube-router".into()],
                    ..ours("router", &["--port=8080"], &[("ROUTER_BIND", "$(POD_IP)")])
                },
                Image {
                    aliases: vec!["workloadmanager".into()],
                    ..ours(
                        "workload-manager",
                        &["--port=8080"],
                        &[("WORKLOAD_MANAGER_BIND", "$(POD_IP)")],
                    )
                },
                Image {
                    name: "python".into(),
                    aliases: Vec::new(),
                    binary: None,
                    path: "/usr/bin/python3".into(),
                    entrypoint: vec!["python3".into()],
                    cmd: Vec::new(),
                    env: Vec::new(),
                },
                // The official image's entrypoint runs `redis-server ARGS` for arguments that start
                // with `-`; here always, plus `--bind` on the pod IP (Redis reads no env for it).
                Image {
                    name: "redis".into(),
                    aliases: Vec::new(),
                    binary: None,
                    path: "/usr/bin/redis-server".into(),
                    entrypoint: vec![
                        "/bin/sh".into(),
                        "-c".into(),
                        "exec redis-server \"$@\" --bind \"$REDIS_BIND\"".into(),
                        "redis".into(),
                    ],
                    cmd: Vec::new(),
                    env: vec![("REDIS_BIND".into(), "$(POD_IP)".into())],
                },
            ],
        }
    }

    /// The rule for `image`: its last path segment without tag or digest is `name`, or starts
    /// with `name-`/`name:` (so `ghcr.io/volcano-sh/picod:latest`, `picod`, `python:3.12-slim`
    /// and `redis:7-alpine` match; `mypicod` does not).
    pub fn find(&self, image: &str) -> Option<&Image> {
        let last = image.rsplit('/').next().unwrap_or(image);
        let base = last.split(['@', ':']).next().unwrap_or(last);
        self.rules.iter().find(|r| {
            std::iter::once(&r.name)
                .chain(&r.aliases)
                .any(|n| base == *n || base.starts_with(&format!("{n}-")))
        })
    }
}

/// A simulated registry that cannot be reached for a while: `slow-registry.test/<N>s/<image>`
/// fails to pull as an unreachable registry does (a containerd-style message, which the kubelet
/// reports as `ErrImagePull` and retries) until its pod has waited `N` seconds, and is `<image>`
/// from then on. For tests of a create that must wait out a pull failure that passes.
pub const SLOW_REGISTRY: &str = "slow-registry.test/";

/// The image to run for `image`, or the pull error of a [`SLOW_REGISTRY`] not reachable yet
/// after `waited`.
pub fn through_slow_registry(image: &str, waited: std::time::Duration) -> Result<String, String> {
    let Some(rest) = image.strip_prefix(SLOW_REGISTRY) else {
        return Ok(image.to_string());
    };
    let (secs, inner) = rest.split_once('/').unwrap_or((rest, ""));
    let secs: u64 = secs.trim_end_matches('s').parse().unwrap_or(0);
    if waited.as_secs() >= secs {
        return Ok(inner.to_string());
    }
    Err(format!(
        "failed to pull and unpack image \"{image}\": failed to resolve reference \"{image}\": \
         failed to do request: Head \"https://slow-registry.test/v2/{inner}/manifests/latest\": \
         dial tcp: lookup slow-registry.test: i/o timeout"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slow_registry_fails_until_its_time_then_is_the_image() {
        use std::time::Duration;
        let img = "slow-registry.test/3s/ghcr.io/volcano-sh/picod:latest";
        let early = through_slow_registry(img, Duration::from_secs(1)).unwrap_err();
        assert!(
            early.contains("i/o timeout") && early.contains(img),
            "{early}"
        );
        assert_eq!(
            through_slow_registry(img, Duration::from_secs(3)).unwrap(),
            "ghcr.io/volcano-sh/picod:latest"
        );
        assert_eq!(
            through_slow_registry("picod", Duration::ZERO).unwrap(),
            "picod"
        );
    }

    #[test]
    fn images_match_by_their_last_segment() {
        let images = Images::repository(std::path::Path::new("/b"));
        let name = |i: &str| images.find(i).map(|r| r.name.clone());
        assert_eq!(
            name("ghcr.io/volcano-sh/picod:latest").as_deref(),
            Some("picod")
        );
        assert_eq!(name("picod").as_deref(), Some("picod"));
        assert_eq!(name("python:3.12-slim").as_deref(), Some("python"));
        assert_eq!(name("docker.io/library/redis:7").as_deref(), Some("redis"));
        assert_eq!(
            name("registry/agentcube/workload-manager:dev").as_deref(),
            Some("workload-manager")
        );
        assert_eq!(
            name("ghcr.io/volcano-sh/agentcube-router:latest").as_deref(),
            Some("router")
        );
        assert_eq!(
            name("ghcr.io/volcano-sh/workloadmanager:latest").as_deref(),
            Some("workload-manager")
        );
        assert_eq!(name("mypicod"), None);
        assert_eq!(name("nginx"), None);
    }

    /// The rules say what the Dockerfiles say: same binary path, ENTRYPOINT and CMD.
    #[test]
    fn our_images_follow_the_dockerfiles() {
        let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let images = Images::repository(std::path::Path::new("/b"));
        for name in ["picod", "router", "workload-manager"] {
            let text =
                std::fs::read_to_string(repo.join(format!("deploy/docker/Dockerfile.{name}")))
                    .unwrap();
            let json_of = |directive: &str| -> Vec<String> {
                let line = text
                    .lines()
                    .find(|l| l.starts_with(directive))
                    .unwrap_or_else(|| panic!("{name}: no {directive}"));
                serde_json::from_str(line[directive.len()..].trim()).unwrap()
            };
            let rule = images.find(name).unwrap();
            assert_eq!(rule.entrypoint, json_of("ENTRYPOINT"), "{name}");
            assert_eq!(rule.cmd, json_of("CMD"), "{name}");
            let copy = text.lines().find(|l| l.starts_with("COPY --from")).unwrap();
            assert!(
                copy.ends_with(&format!(" {}", rule.path)),
                "{name}: {copy} vs {}",
                rule.path
            );
        }
    }
}
