//! The container runtime stand-in: a container's argv and environment (Kubernetes semantics:
//! `command` replaces the image's ENTRYPOINT, `args` its CMD, `$(VAR)` expansion, `env` and
//! `envFrom` with Secrets, ConfigMaps and the downward API), its volumes written to files, and the
//! bubblewrap command line that gives it a filesystem of its own.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow, bail};
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, DownwardAPIVolumeFile, KeyToPath, Pod, Secret, ServiceAccount,
};
use kube::api::{Api, PostParams};

use super::images::Image;

/// What the runtime needs to know about the pod's place in the cluster.
#[derive(Debug, Clone)]
pub struct PodContext {
    pub ip: Ipv4Addr,
    pub node: String,
    /// The API server as pods reach it (`KUBERNETES_SERVICE_HOST`/`_PORT`).
    pub api_host: String,
    pub api_port: u16,
}

/// Expands `$(VAR)` from `env` (`$$(VAR)` stays literal), as the kubelet does.
pub fn expand(s: &str, env: &[(String, String)]) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        if let Some(t) = tail.strip_prefix("$$") {
            out.push('$');
            rest = t;
        } else if let Some(inner) = tail.strip_prefix("$(")
            && let Some(end) = inner.find(')')
            && let Some((_, v)) = env.iter().rev().find(|(k, _)| k == &inner[..end])
        {
            out.push_str(v);
            rest = &inner[end + 1..];
        } else {
            out.push('$');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    out
}

fn meta(pod: &Pod) -> (&str, &str) {
    (
        pod.metadata.namespace.as_deref().unwrap_or("default"),
        pod.metadata.name.as_deref().unwrap_or_default(),
    )
}

/// A downward-API field of the pod.
fn field(pod: &Pod, ctx: &PodContext, path: &str) -> anyhow::Result<String> {
    let (ns, name) = meta(pod);
    Ok(match path {
        "status.podIP" => ctx.ip.to_string(),
        "status.hostIP" => "127.0.0.1".into(),
        "metadata.name" => name.into(),
        "metadata.namespace" => ns.into(),
        "metadata.uid" => pod.metadata.uid.clone().unwrap_or_default(),
        "spec.nodeName" => ctx.node.clone(),
        "spec.serviceAccountName" => pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".into()),
        other => {
            if let Some(key) = other
                .strip_prefix("metadata.labels['")
                .and_then(|k| k.strip_suffix("']"))
            {
                return Ok(pod
                    .metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(key).cloned())
                    .unwrap_or_default());
            }
            bail!("downward API field {other} is not supported here")
        }
    })
}

async fn secret(client: &kube::Client, ns: &str, name: &str) -> anyhow::Result<Secret> {
    Api::<Secret>::namespaced(client.clone(), ns)
        .get(name)
        .await
        .with_context(|| format!("secret {ns}/{name}"))
}

async fn config_map(client: &kube::Client, ns: &str, name: &str) -> anyhow::Result<ConfigMap> {
    Api::<ConfigMap>::namespaced(client.clone(), ns)
        .get(name)
        .await
        .with_context(|| format!("configmap {ns}/{name}"))
}

fn secret_data(s: &Secret) -> BTreeMap<String, Vec<u8>> {
    let mut out: BTreeMap<String, Vec<u8>> = s
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.0.clone()))
        .collect();
    for (k, v) in s.string_data.iter().flatten() {
        out.insert(k.clone(), v.clone().into_bytes());
    }
    out
}

fn config_map_data(c: &ConfigMap) -> BTreeMap<String, Vec<u8>> {
    let mut out: BTreeMap<String, Vec<u8>> = c
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.clone().into_bytes()))
        .collect();
    for (k, v) in c.binary_data.iter().flatten() {
        out.insert(k.clone(), v.0.clone());
    }
    out
}

/// The container's environment, in the kubelet's order: the image's, the API server's service
/// variables, `envFrom`, then `env` (later entries win).
pub async fn environment(
    client: &kube::Client,
    pod: &Pod,
    container: &Container,
    image: &Image,
    ctx: &PodContext,
) -> anyhow::Result<Vec<(String, String)>> {
    let (ns, _) = meta(pod);
    let pod_ip = vec![("POD_IP".to_string(), ctx.ip.to_string())];
    let mut out: Vec<(String, String)> = image
        .env
        .iter()
        .map(|(k, v)| (k.clone(), expand(v, &pod_ip)))
        .collect();
    for (k, v) in [
        ("KUBERNETES_SERVICE_HOST", ctx.api_host.clone()),
        ("KUBERNETES_SERVICE_PORT", ctx.api_port.to_string()),
        ("KUBERNETES_SERVICE_PORT_HTTPS", ctx.api_port.to_string()),
        (
            "KUBERNETES_PORT",
            format!("tcp://{}:{}", ctx.api_host, ctx.api_port),
        ),
    ] {
        out.push((k.into(), v));
    }
    for from in container.env_from.iter().flatten() {
        let prefix = from.prefix.clone().unwrap_or_default();
        let data = if let Some(s) = &from.secret_ref {
            match secret(client, ns, &s.name).await {
                Ok(s) => secret_data(&s),
                Err(_) if s.optional == Some(true) => continue,
                Err(e) => return Err(e),
            }
        } else if let Some(c) = &from.config_map_ref {
            match config_map(client, ns, &c.name).await {
                Ok(c) => config_map_data(&c),
                Err(_) if c.optional == Some(true) => continue,
                Err(e) => return Err(e),
            }
        } else {
            continue;
        };
        for (k, v) in data {
            out.push((
                format!("{prefix}{k}"),
                String::from_utf8_lossy(&v).into_owned(),
            ));
        }
    }
    for var in container.env.iter().flatten() {
        let value = if let Some(v) = &var.value {
            expand(v, &out)
        } else if let Some(from) = &var.value_from {
            if let Some(f) = &from.field_ref {
                field(pod, ctx, &f.field_path)?
            } else if let Some(sel) = &from.secret_key_ref {
                let found = match secret(client, ns, &sel.name).await {
                    Ok(s) => secret_data(&s).remove(&sel.key),
                    Err(_) => None,
                };
                match found {
                    Some(v) => String::from_utf8_lossy(&v).into_owned(),
                    None if sel.optional == Some(true) => continue,
                    None => bail!(
                        "env {}: key {} of secret {} not found",
                        var.name,
                        sel.key,
                        sel.name
                    ),
                }
            } else if let Some(sel) = &from.config_map_key_ref {
                let found = match config_map(client, ns, &sel.name).await {
                    Ok(c) => config_map_data(&c).remove(&sel.key),
                    Err(_) => None,
                };
                match found {
                    Some(v) => String::from_utf8_lossy(&v).into_owned(),
                    None if sel.optional == Some(true) => continue,
                    None => bail!(
                        "env {}: key {} of configmap {} not found",
                        var.name,
                        sel.key,
                        sel.name
                    ),
                }
            } else {
                bail!("env {}: resourceFieldRef is not supported here", var.name)
            }
        } else {
            String::new()
        };
        out.push((var.name.clone(), value));
    }
    Ok(out)
}

/// The argv: `command` (else ENTRYPOINT) + `args` (else CMD, only without `command`), expanded.
pub fn argv(container: &Container, image: &Image, env: &[(String, String)]) -> Vec<String> {
    let x = |v: &Vec<String>| v.iter().map(|s| expand(s, env)).collect::<Vec<_>>();
    let (entry, cmd) = match (&container.command, &container.args) {
        (Some(c), Some(a)) => (x(c), x(a)),
        (Some(c), None) => (x(c), Vec::new()),
        (None, Some(a)) => (image.entrypoint.clone(), x(a)),
        (None, None) => (image.entrypoint.clone(), image.cmd.clone()),
    };
    entry.into_iter().chain(cmd).collect()
}

/// A volume's files on the host, and how containers mount it.
#[derive(Debug, Clone)]
pub struct Mount {
    pub host: PathBuf,
    pub path: String,
    pub read_only: bool,
}

fn write_items(
    dir: &Path,
    data: &BTreeMap<String, Vec<u8>>,
    items: Option<&Vec<KeyToPath>>,
    what: &str,
) -> anyhow::Result<()> {
    let pairs: Vec<(String, &Vec<u8>)> = match items {
        Some(items) => items
            .iter()
            .map(|i| {
                data.get(&i.key)
                    .map(|v| (i.path.clone(), v))
                    .ok_or_else(|| anyhow!("{what}: key {} not found", i.key))
            })
            .collect::<anyhow::Result<_>>()?,
        None => data.iter().map(|(k, v)| (k.clone(), v)).collect(),
    };
    for (rel, bytes) in pairs {
        if rel.split('/').any(|c| c == ".." || c.is_empty()) {
            bail!("{what}: bad path {rel:?}");
        }
        let file = dir.join(&rel);
        if let Some(parent) = file.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(file, bytes)?;
    }
    Ok(())
}

async fn write_downward(
    dir: &Path,
    pod: &Pod,
    ctx: &PodContext,
    items: &[DownwardAPIVolumeFile],
) -> anyhow::Result<()> {
    let mut data = BTreeMap::new();
    for item in items {
        let f = item
            .field_ref
            .as_ref()
            .ok_or_else(|| anyhow!("downward API {}: only fieldRef is supported", item.path))?;
        data.insert(
            item.path.clone(),
            field(pod, ctx, &f.field_path)?.into_bytes(),
        );
    }
    write_items(dir, &data, None, "downward API")
}

/// A token for the pod's service account from the TokenRequest API, bound to the pod.
async fn token(
    client: &kube::Client,
    pod: &Pod,
    audience: Option<&str>,
    seconds: Option<i64>,
) -> anyhow::Result<String> {
    let (ns, name) = meta(pod);
    let sa = pod
        .spec
        .as_ref()
        .and_then(|s| s.service_account_name.clone())
        .unwrap_or_else(|| "default".into());
    let req = TokenRequest {
        spec: TokenRequestSpec {
            audiences: audience.map(|a| vec![a.to_string()]).unwrap_or_default(),
            expiration_seconds: Some(seconds.unwrap_or(3607)),
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: Some(name.into()),
                uid: pod.metadata.uid.clone(),
            }),
        },
        ..Default::default()
    };
    let answer = Api::<ServiceAccount>::namespaced(client.clone(), ns)
        .create_token_request(&sa, &PostParams::default(), &req)
        .await
        .with_context(|| format!("token for service account {ns}/{sa}"))?;
    Ok(answer.status.map(|s| s.token).unwrap_or_default())
}

/// Writes every volume of the pod under `dir/volumes/<name>` and returns the container's mounts.
/// Supported: `emptyDir`, `secret`, `configMap`, `downwardAPI` and `projected` (service-account
/// token through the TokenRequest API, secrets, configMaps, downward API). Tokens are not
/// refreshed (a pod here lives for a test run, well inside a token's hour).
pub async fn volumes(
    client: &kube::Client,
    pod: &Pod,
    container: &Container,
    ctx: &PodContext,
    dir: &Path,
) -> anyhow::Result<Vec<Mount>> {
    let (ns, _) = meta(pod);
    let spec = pod.spec.clone().unwrap_or_default();
    let mut hosts: BTreeMap<String, PathBuf> = BTreeMap::new();
    for v in spec.volumes.iter().flatten() {
        let vdir = dir.join("volumes").join(&v.name);
        std::fs::create_dir_all(&vdir)?;
        if v.empty_dir.is_some() {
            // World-writable, as a kubelet makes it: any uid the pod runs as may write.
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&vdir, std::fs::Permissions::from_mode(0o777))?;
        } else if let Some(s) = &v.secret {
            let name = s.secret_name.clone().unwrap_or_default();
            match secret(client, ns, &name).await {
                Ok(found) => write_items(&vdir, &secret_data(&found), s.items.as_ref(), &name)?,
                Err(_) if s.optional == Some(true) => {}
                Err(e) => return Err(e),
            }
        } else if let Some(c) = &v.config_map {
            match config_map(client, ns, &c.name).await {
                Ok(found) => {
                    write_items(&vdir, &config_map_data(&found), c.items.as_ref(), &c.name)?
                }
                Err(_) if c.optional == Some(true) => {}
                Err(e) => return Err(e),
            }
        } else if let Some(d) = &v.downward_api {
            write_downward(&vdir, pod, ctx, d.items.as_deref().unwrap_or_default()).await?;
        } else if let Some(p) = &v.projected {
            for source in p.sources.iter().flatten() {
                if let Some(t) = &source.service_account_token {
                    let tok =
                        token(client, pod, t.audience.as_deref(), t.expiration_seconds).await?;
                    let data = BTreeMap::from([(t.path.clone(), tok.into_bytes())]);
                    write_items(&vdir, &data, None, "token")?;
                } else if let Some(c) = &source.config_map {
                    match config_map(client, ns, &c.name).await {
                        Ok(found) => {
                            write_items(&vdir, &config_map_data(&found), c.items.as_ref(), &c.name)?
                        }
                        Err(_) if c.optional == Some(true) => {}
                        Err(e) => return Err(e),
                    }
                } else if let Some(s) = &source.secret {
                    match secret(client, ns, &s.name).await {
                        Ok(found) => {
                            write_items(&vdir, &secret_data(&found), s.items.as_ref(), &s.name)?
                        }
                        Err(_) if s.optional == Some(true) => {}
                        Err(e) => return Err(e),
                    }
                } else if let Some(d) = &source.downward_api {
                    write_downward(&vdir, pod, ctx, d.items.as_deref().unwrap_or_default()).await?;
                }
            }
        } else {
            bail!(
                "volume {}: this kind of volume is not supported here",
                v.name
            );
        }
        hosts.insert(v.name.clone(), vdir);
    }
    let mut mounts = Vec::new();
    for m in container.volume_mounts.iter().flatten() {
        let host = hosts
            .get(&m.name)
            .ok_or_else(|| anyhow!("volume mount {}: no such volume", m.name))?;
        let host = match &m.sub_path {
            Some(sub) if !sub.is_empty() => host.join(sub),
            _ => host.clone(),
        };
        mounts.push(Mount {
            host,
            path: m.mount_path.clone(),
            read_only: m.read_only == Some(true),
        });
    }
    Ok(mounts)
}

/// The uid and gid a container asks to run as (`securityContext.runAsUser`/`runAsGroup`, the
/// container's over the pod's; the gid defaults to the uid), if any.
pub fn run_as(pod: &Pod, container: &Container) -> Option<(i64, i64)> {
    let own = container.security_context.as_ref();
    let pod_sc = pod.spec.as_ref().and_then(|s| s.security_context.as_ref());
    let uid = own
        .and_then(|c| c.run_as_user)
        .or_else(|| pod_sc.and_then(|p| p.run_as_user))?;
    let gid = own
        .and_then(|c| c.run_as_group)
        .or_else(|| pod_sc.and_then(|p| p.run_as_group))
        .unwrap_or(uid);
    Some((uid, gid))
}

/// Inputs of [`bwrap_args`].
#[derive(Debug)]
pub struct Sandbox<'a> {
    pub root: &'a Path,
    pub hosts_file: &'a Path,
    pub hostname: &'a str,
    pub workdir: &'a str,
    pub unprivileged: bool,
    pub image: &'a Image,
    pub mounts: &'a [Mount],
    pub env: &'a [(String, String)],
    pub argv: &'a [String],
}

/// The bubblewrap argv for one container (without the program name): the host's `/usr` and
/// `/etc` entries read-only (with the pod's own `/etc/hosts`), the image's binary, a private `/root`,
/// `/tmp` and `/run`, the pod's volumes, and its own pid, ipc and uts namespaces, the container's
/// program being PID 1 there as under a container runtime (`--as-pid-1`: no bubblewrap init;
/// PicoD's image then runs PicoD's own init, and a program without a `SIGTERM` handler ignores
/// the kubelet's `SIGTERM`, as PID 1 in a real container does).
pub fn bwrap_args(s: &Sandbox<'_>) -> Vec<String> {
    let mut a: Vec<String> = Vec::new();
    let mut push = |v: &[&str]| a.extend(v.iter().map(ToString::to_string));
    push(&["--die-with-parent", "--new-session"]);
    if s.unprivileged {
        push(&["--unshare-user"]);
    }
    push(&[
        "--unshare-pid",
        "--as-pid-1",
        "--unshare-ipc",
        "--unshare-uts",
        "--hostname",
        s.hostname,
    ]);
    push(&["--ro-bind", "/usr", "/usr", "--symlink", "usr/bin", "/bin"]);
    push(&[
        "--symlink",
        "usr/sbin",
        "/sbin",
        "--symlink",
        "usr/lib",
        "/lib",
    ]);
    if Path::new("/usr/lib64").exists() {
        push(&["--symlink", "usr/lib64", "/lib64"]);
    }
    // `/etc` is the host's, read-only. A pod with a volume below it (e.g. a Secret at
    // /etc/agentcube/identity) gets a tmpfs holding the host's entries instead, so the mount
    // point can be made; read-only after the mounts. Only then: a bind per entry (~150 here)
    // costs ~50 ms of pod start.
    let etc_volumes = s
        .mounts
        .iter()
        .any(|m| Path::new(&m.path).starts_with("/etc"));
    if etc_volumes {
        push(&["--tmpfs", "/etc"]);
        let mut entries: Vec<String> = std::fs::read_dir("/etc")
            .into_iter()
            .flatten()
            .filter_map(|e| Some(e.ok()?.file_name().to_str()?.to_string()))
            .filter(|n| n != "hosts")
            .collect();
        entries.sort();
        for name in &entries {
            let path = format!("/etc/{name}");
            push(&["--ro-bind-try", &path, &path]);
        }
    } else {
        push(&["--ro-bind", "/etc", "/etc"]);
    }
    let hosts = s.hosts_file.display().to_string();
    push(&["--ro-bind", &hosts, "/etc/hosts"]);
    push(&["--proc", "/proc", "--dev", "/dev"]);
    push(&[
        "--tmpfs",
        "/tmp",
        "--tmpfs",
        "/run",
        "--tmpfs",
        "/usr/local/bin",
    ]);
    let root = s.root.display().to_string();
    push(&["--bind", &root, "/root"]);
    if let Some(bin) = &s.image.binary {
        push(&["--ro-bind", &bin.display().to_string(), &s.image.path]);
    }
    for m in s.mounts {
        let flag = if m.read_only { "--ro-bind" } else { "--bind" };
        push(&[flag, &m.host.display().to_string(), &m.path]);
    }
    if etc_volumes {
        push(&["--remount-ro", "/etc"]);
    }
    push(&["--chdir", s.workdir, "--clearenv"]);
    push(&[
        "--setenv",
        "PATH",
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    ]);
    push(&[
        "--setenv", "HOME", "/root", "--setenv", "HOSTNAME", s.hostname,
    ]);
    for (k, v) in s.env {
        push(&["--setenv", k, v]);
    }
    push(&["--"]);
    a.extend(s.argv.iter().cloned());
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An image `x` whose entrypoint is `/x`, with `cmd`.
    fn image(cmd: &[&str]) -> Image {
        Image {
            name: "x".into(),
            aliases: Vec::new(),
            binary: None,
            path: "/x".into(),
            entrypoint: vec!["/x".into()],
            cmd: cmd.iter().map(ToString::to_string).collect(),
            env: Vec::new(),
        }
    }

    #[test]
    fn expands_variables_like_the_kubelet() {
        let env = vec![("POD_IP".to_string(), "127.1.2.3".to_string())];
        assert_eq!(
            expand("--listen=$(POD_IP):8080", &env),
            "--listen=127.1.2.3:8080"
        );
        assert_eq!(expand("$$(POD_IP)", &env), "$(POD_IP)");
        assert_eq!(expand("$(NOPE) $", &env), "$(NOPE) $");
    }

    #[test]
    fn command_replaces_the_entrypoint_and_args_the_cmd() {
        let image = image(&["--port=8080"]);
        let c = |command: Option<&[&str]>, args: Option<&[&str]>| Container {
            command: command.map(|v| v.iter().map(ToString::to_string).collect()),
            args: args.map(|v| v.iter().map(ToString::to_string).collect()),
            ..Default::default()
        };
        assert_eq!(argv(&c(None, None), &image, &[]), ["/x", "--port=8080"]);
        assert_eq!(argv(&c(None, Some(&["-v"])), &image, &[]), ["/x", "-v"]);
        assert_eq!(argv(&c(Some(&["sh"]), None), &image, &[]), ["sh"]);
        let env = vec![("A".to_string(), "1".to_string())];
        assert_eq!(
            argv(&c(Some(&["sh"]), Some(&["$(A)"])), &image, &env),
            ["sh", "1"]
        );
    }

    #[test]
    fn etc_is_one_bind_unless_a_volume_mounts_below_it() {
        let image = image(&[]);
        let args = |mounts: &[Mount]| {
            bwrap_args(&Sandbox {
                root: Path::new("/r"),
                hosts_file: Path::new("/h"),
                hostname: "p",
                workdir: "/",
                unprivileged: false,
                image: &image,
                mounts,
                env: &[],
                argv: &["/x".to_string()],
            })
            .join(" ")
        };
        let plain = args(&[]);
        assert!(
            plain.contains("--ro-bind /etc /etc --ro-bind /h /etc/hosts"),
            "{plain}"
        );
        assert!(!plain.contains("--tmpfs /etc"), "{plain}");
        let secret = Mount {
            host: "/s".into(),
            path: "/etc/agentcube/identity".into(),
            read_only: true,
        };
        let with = args(&[secret]);
        assert!(with.contains("--tmpfs /etc"), "{with}");
        assert!(
            with.contains("--ro-bind-try /etc/passwd /etc/passwd"),
            "{with}"
        );
        assert!(
            with.contains("--ro-bind /s /etc/agentcube/identity"),
            "{with}"
        );
        assert!(with.contains("--remount-ro /etc"), "{with}");
    }
}
