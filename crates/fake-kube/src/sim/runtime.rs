//! The fake container runtime: what a container runs (image entrypoints, `$(VAR)` expansion, the
//! environment with the downward API, Secrets and ConfigMaps) and the bubblewrap command line that
//! gives it a filesystem of its own.

use std::net::Ipv4Addr;
use std::path::Path;

use base64::Engine;
use serde_json::Value;

use super::{CONFIG_MAP, SECRET, name, namespace, str_at};
use crate::store::Cluster;

/// Where the PicoD binary is inside a pod.
pub const POD_PICOD: &str = "/opt/agentcube/picod";
/// PicoD's port in its image (the image's `EXPOSE`).
pub const PICOD_PORT: u16 = 8080;

/// The image's entrypoint and environment: `…picod…` runs PicoD on the pod IP, `python…` runs
/// `python3`, anything else has none.
pub fn image_defaults(image: &str, ip: Ipv4Addr) -> (Vec<String>, Vec<(String, String)>) {
    if image.contains("picod") {
        (
            vec![POD_PICOD.into()],
            vec![("PICOD_LISTEN".into(), format!("{ip}:{PICOD_PORT}"))],
        )
    } else if image.starts_with("python") || image.contains("/python") {
        (vec!["python3".into()], Vec::new())
    } else {
        (Vec::new(), Vec::new())
    }
}

/// Expands `$(VAR)` from `env` (`$$(VAR)` stays literal), as the kubelet does for command/args.
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

/// The container's environment: `value`s, and `valueFrom` the downward API (`status.podIP`,
/// `status.hostIP`, `metadata.name`, `metadata.namespace`, `metadata.uid`, `spec.nodeName`),
/// Secrets and ConfigMaps.
pub fn container_env(
    cluster: &Cluster,
    pod: &Value,
    container: &Value,
    ip: Ipv4Addr,
) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for var in container
        .get("env")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let key = str_at(var, "/name").to_string();
        let value = if let Some(v) = var.get("value").and_then(Value::as_str) {
            expand(v, &out)
        } else if let Some(path) = var
            .pointer("/valueFrom/fieldRef/fieldPath")
            .and_then(Value::as_str)
        {
            match path {
                "status.podIP" => ip.to_string(),
                "status.hostIP" => "127.0.0.1".into(),
                "metadata.name" => name(pod).into(),
                "metadata.namespace" => namespace(pod).into(),
                "metadata.uid" => str_at(pod, "/metadata/uid").into(),
                "spec.nodeName" => "fake-node".into(),
                other => return Err(format!("env {key}: fieldRef {other} is not supported")),
            }
        } else if let Some(sel) = var.pointer("/valueFrom/secretKeyRef") {
            let secret = cluster
                .get(&SECRET.in_ns(namespace(pod)), str_at(sel, "/name"))
                .ok_or_else(|| format!("env {key}: secret {} not found", str_at(sel, "/name")))?;
            let b64 = str_at(&secret, &format!("/data/{}", str_at(sel, "/key")));
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(b64)
                .map_err(|e| format!("env {key}: {e}"))?;
            String::from_utf8_lossy(&bytes).into_owned()
        } else if let Some(sel) = var.pointer("/valueFrom/configMapKeyRef") {
            let cm = cluster
                .get(&CONFIG_MAP.in_ns(namespace(pod)), str_at(sel, "/name"))
                .ok_or_else(|| {
                    format!("env {key}: configmap {} not found", str_at(sel, "/name"))
                })?;
            str_at(&cm, &format!("/data/{}", str_at(sel, "/key"))).to_string()
        } else {
            String::new()
        };
        out.push((key, value));
    }
    Ok(out)
}

/// The bubblewrap argv for one container (without the program name).
pub fn bwrap_args(
    root: &Path,
    picod: &Path,
    hostname: &str,
    workdir: &str,
    unprivileged: bool,
    env: &[(String, String)],
    argv: &[String],
) -> Vec<String> {
    let mut a: Vec<String> = Vec::new();
    let mut push = |v: &[&str]| a.extend(v.iter().map(ToString::to_string));
    push(&["--die-with-parent", "--new-session"]);
    if unprivileged {
        push(&["--unshare-user"]);
    }
    push(&[
        "--unshare-pid",
        "--unshare-ipc",
        "--unshare-uts",
        "--hostname",
        hostname,
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
    push(&[
        "--ro-bind",
        "/etc",
        "/etc",
        "--proc",
        "/proc",
        "--dev",
        "/dev",
    ]);
    push(&["--tmpfs", "/tmp", "--tmpfs", "/run"]);
    let (root, picod) = (root.display().to_string(), picod.display().to_string());
    push(&["--bind", &root, "/root", "--ro-bind", &picod, POD_PICOD]);
    push(&["--chdir", workdir, "--clearenv"]);
    push(&[
        "--setenv",
        "PATH",
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    ]);
    push(&[
        "--setenv", "HOME", "/root", "--setenv", "HOSTNAME", hostname,
    ]);
    for (k, v) in env {
        push(&["--setenv", k, v]);
    }
    push(&["--"]);
    a.extend(argv.iter().cloned());
    a
}

#[cfg(test)]
mod tests {
    use super::expand;

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
}
