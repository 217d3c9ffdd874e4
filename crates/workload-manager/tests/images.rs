//! Images on the local backend, against a real registry (Debian's `docker-registry`) holding
//! images this test builds from host files: pulled once, cached (layers shared between images,
//! the rootfs shared between sandboxes, usable with the registry gone), run read-only with the
//! image's own files, environment and entrypoint, side by side with other images and host mode;
//! tampered layers, unknown images and unreachable registries fail the create with a clear
//! message and leave nothing behind.

mod common;
#[path = "common/oci.rs"]
mod oci;

use agentcube_workload_manager::backend::local::image::RegistrySettings;
use common::*;
use serde_json::json;

/// A stack's options pulling images from `registry` (plain HTTP).
fn pulling(registry: &oci::Registry) -> Options {
    Options {
        images: Some(RegistrySettings {
            insecure: vec![registry.addr.clone()],
            auth_file: None,
            max_image_bytes: Some(16 << 30),
        }),
        ..Default::default()
    }
}

fn ci(name: &str, image: &str, extra: &str) -> String {
    format!(
        "apiVersion: runtime.agentcube.volcano.sh/v1alpha1\nkind: CodeInterpreter\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  template:\n    image: {image}\n{extra}---\n"
    )
}

const AGENT: &str = r#"
import json, os, sys
from http.server import BaseHTTPRequestHandler, HTTPServer
class H(BaseHTTPRequestHandler):
    def do_GET(self):
        out = json.dumps({"cwd": os.getcwd(), "greeting": os.environ.get("GREETING"), "argv": sys.argv[1:]}).encode()
        self.send_response(200); self.send_header("Content-Length", str(len(out))); self.end_headers(); self.wfile.write(out)
    def log_message(self, *a): pass
HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"#;

/// (stdout, exit code) of a Python snippet in the session's sandbox.
async fn py(session: &serde_json::Value, code: &str) -> (String, i64) {
    let out = exec(session, &["python3", "-c", code]).await;
    let stdout = out["stdout"].as_str().unwrap().trim().to_string();
    let code = out["exit_code"].as_i64().unwrap();
    if code != 0 {
        return (format!("{stdout} | stderr: {}", out["stderr"]), code);
    }
    (stdout, code)
}

fn count(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_are_pulled_once_and_sandboxes_run_on_them() {
    let mut registry = oci::Registry::start().await;
    let base = oci::python_base_layer();
    let nonce = uuid::Uuid::new_v4().simple().to_string();
    let probe = oci::layer(|l| {
        l.dir("usr/lib/python3/dist-packages/acprobe");
        l.file(
            "usr/lib/python3/dist-packages/acprobe/__init__.py",
            format!("VERSION = {nonce:?}\n").as_bytes(),
            0o644,
        );
        l.file("opt/lower/c", b"upper", 0o644);
    });
    // The base has /etc/gone and /opt/lower/{a,b}; the next layer hides them.
    let lower = oci::layer(|l| {
        l.file("etc/gone", b"x", 0o644);
        l.dir("opt");
        l.dir("opt/lower");
        l.file("opt/lower/a", b"a", 0o644);
        l.file("opt/lower/b", b"b", 0o644);
    });
    let hide = oci::layer(|l| {
        l.file("etc/.wh.gone", b"", 0o644);
        l.file("opt/lower/.wh..wh..opq", b"", 0o644);
    });
    let env = |name: &str| json!({"Env": ["PATH=/usr/local/bin:/usr/bin:/bin", format!("IMAGE_NAME={name}")]});
    let (py_digest, _) = registry
        .push(
            "py:1",
            &[base.clone(), lower, hide, oci::zstd(&probe)],
            env("py"),
        )
        .await;
    let other = oci::layer(|l| l.file("etc/image-name", b"other", 0o644));
    registry
        .push("other:1", &[base.clone(), other], env("other"))
        .await;
    let app = oci::layer(|l| {
        l.dir("app");
        l.file("app/agent.py", AGENT.as_bytes(), 0o644);
    });
    registry
        .push(
            "agent:1",
            &[base, app],
            json!({"Env": ["PATH=/usr/bin:/bin", "GREETING=from-image"],
                   "Entrypoint": ["python3", "/app/agent.py"], "Cmd": ["8080"], "WorkingDir": "/app"}),
        )
        .await;
    let r = registry.addr.clone();
    let manifests = [
        ci("py", &format!("{r}/py:1"), ""),
        ci("other", &format!("{r}/other:1"), ""),
        ci("onhost", "host", ""),
        format!(
            "apiVersion: runtime.agentcube.volcano.sh/v1alpha1\nkind: AgentRuntime\nmetadata: {{name: agent, namespace: default}}\nspec:\n  targetPort: [{{pathPrefix: /, port: 8080, protocol: HTTP}}]\n  podTemplate:\n    spec:\n      containers:\n        - name: agent\n          image: {r}/agent:1\n---\n"
        ),
    ]
    .concat();
    let s = Stack::start(Options {
        manifests,
        ..pulling(&registry)
    })
    .await;

    // The image's files and environment; layers applied with their whiteouts; nothing of the host.
    let py1 = s.create_ok("code-interpreter", "py").await;
    let (out, code) = py(
        &py1,
        "import acprobe, os; print(acprobe.VERSION, os.path.exists('/etc/gone'), sorted(os.listdir('/opt/lower')), \
         os.path.exists('/usr/bin/bwrap'), os.environ['IMAGE_NAME'], os.environ['HOME'])",
    )
    .await;
    assert_eq!(code, 0, "{out}");
    assert_eq!(out, format!("{nonce} False ['c'] False py /root"));
    // Read-only root; the workspace and /tmp are writable.
    let w = exec(
        &py1,
        &sh("echo x > /usr/x; echo $?; echo y > /root/y && echo y > /tmp/y && echo ok"),
    )
    .await;
    let lines: Vec<&str> = w["stdout"].as_str().unwrap().lines().collect();
    assert_ne!(lines[0], "0", "the image root must be read-only: {w}");
    assert_eq!(lines[1], "ok", "{w}");

    // A second image side by side; host mode for `image: host`.
    let o = s.create_ok("code-interpreter", "other").await;
    let (out, _) = py(
        &o,
        "print(open('/etc/image-name').read(), __import__('os').environ['IMAGE_NAME'])",
    )
    .await;
    assert_eq!(out, "other other");
    let h = s.create_ok("code-interpreter", "onhost").await;
    let (out, _) = py(
        &h,
        "import os; print(os.path.exists('/usr/bin/bwrap'), 'IMAGE_NAME' in os.environ)",
    )
    .await;
    assert_eq!(out, "True False");

    // AgentRuntime: the image's entrypoint, cmd, env and working directory.
    let a = s.create_ok("agent-runtime", "agent").await;
    let ep = a["entryPoints"][0]["endpoint"].as_str().unwrap();
    let (status, body) = unix_http(ep, "GET", "/", None).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        v,
        json!({"cwd": "/app", "greeting": "from-image", "argv": ["8080"]})
    );

    // Cached: one rootfs per image, the shared base layer stored once.
    let cache = s.backend.images().unwrap().dir().to_path_buf();
    assert_eq!(count(&cache.join("rootfs")), 3);
    assert_eq!(count(&cache.join("blobs")), 1 + 3 + 1 + 1);
    assert!(
        cache
            .join("rootfs")
            .join(py_digest.trim_start_matches("sha256:"))
            .is_dir()
    );

    // With the registry gone, more sandboxes of a pulled image still start, also after a restart.
    registry.stop();
    let py2 = s.create_ok("code-interpreter", "py").await;
    assert_eq!(
        py(&py2, "import acprobe; print(acprobe.VERSION)").await.0,
        nonce
    );
    for id in [&py1, &py2, &o, &h, &a] {
        assert_eq!(s.delete(id["sessionId"].as_str().unwrap()).await.0, 200);
    }
    let dir = s.stop_keeping_dir().await;
    let s = Stack::start(Options {
        manifests: ci("py", &format!("{r}/py:1"), ""),
        dir: Some(dir),
        ..pulling(&registry)
    })
    .await;
    let py3 = s.create_ok("code-interpreter", "py").await;
    assert_eq!(
        py(&py3, "import acprobe; print(acprobe.VERSION)").await.0,
        nonce
    );
    assert_eq!(s.delete(py3["sessionId"].as_str().unwrap()).await.0, 200);
    s.shutdown_and_check_leaks().await;
}

/// bubblewrap reads its options NUL-separated, the sandbox's environment among them: a NUL in
/// an image's `Env` (or a definition's value) would end the value and hand the rest to
/// bubblewrap as options of its own (`--share-net` gave a sandbox the host's network, loopback
/// services included). Such environments, and names no process can take, are a 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_environment_cannot_smuggle_sandbox_options() {
    let registry = oci::Registry::start().await;
    let layer = oci::layer(|l| l.file("etc/hostname", b"smuggler", 0o644));
    let env = json!({"Env": ["PATH=/usr/bin:/bin", "X=a\0--share-net"]});
    registry.push("smuggler:1", &[layer], env).await;
    let manifests = [
        ci("image-env", &format!("{}/smuggler:1", registry.addr), ""),
        ci(
            "definition-env",
            "host",
            "    environment:\n      - {name: X, value: \"a\\0--share-net\"}\n",
        ),
        ci(
            "name",
            "host",
            "    environment:\n      - {name: \"A=B\", value: x}\n",
        ),
    ]
    .concat();
    let s = Stack::start(Options {
        manifests,
        ..pulling(&registry)
    })
    .await;
    for (name, says) in [
        (
            "image-env",
            "environment variable X (of the definition or its image) holds a NUL",
        ),
        (
            "definition-env",
            "environment variable X (of the definition or its image) holds a NUL",
        ),
        ("name", "environment variable name \"A=B\""),
    ] {
        let (status, body) = s.create("code-interpreter", name).await;
        assert_eq!(status, 400, "{name}: {body}");
        let message = body["message"].as_str().unwrap_or_default();
        assert!(message.contains(says), "{name}: {message}");
    }
    assert!(s.backend.running().is_empty());
    s.shutdown_and_check_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_images_fail_the_create_clearly_and_leave_nothing() {
    let registry = oci::Registry::start().await;
    let good = oci::layer(|l| l.file("etc/hostname", b"good", 0o644));
    let (_, layers) = registry.push("tampered:1", &[good], json!({})).await;
    // Someone with access to the registry's storage swaps the layer's bytes.
    let evil = oci::layer(|l| l.file("etc/hostname", b"evil", 0o644));
    std::fs::write(registry.blob_file(&layers[0]), evil).unwrap();
    // A decompression bomb: 8 MiB of zeros in a zstd layer of a few hundred bytes, against a
    // 4 MiB limit.
    let zeros = oci::layer(|l| l.file("zeros", &vec![0u8; 8 << 20], 0o644));
    registry
        .push("bomb:1", &[oci::zstd(&zeros)], json!({}))
        .await;
    // Blobs bigger than this host takes, refused from their declared size before a byte is
    // read: a 5 MiB layer that does not compress (against the 4 MiB limit), and a 5 MiB config.
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let noise: Vec<u8> = (0..5 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let big = oci::layer(|l| l.file("noise", &noise, 0o644));
    registry.push("biglayer:1", &[big], json!({})).await;
    let small = oci::layer(|l| l.file("etc/hostname", b"big", 0o644));
    let env = json!({"Env": [format!("X={}", "x".repeat(5 << 20))]});
    registry.push("bigconfig:1", &[small], env).await;
    let r = &registry.addr;
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let manifests = [
        ci("tampered", &format!("{r}/tampered:1"), ""),
        ci("unknown", &format!("{r}/no-such-image:1"), ""),
        ci("offline", &format!("{closed}/py:1"), ""),
        ci("bomb", &format!("{r}/bomb:1"), ""),
        ci("biglayer", &format!("{r}/biglayer:1"), ""),
        ci("bigconfig", &format!("{r}/bigconfig:1"), ""),
        ci(
            "never",
            &format!("{r}/tampered:1"),
            "    imagePullPolicy: Never\n",
        ),
    ]
    .concat();
    let s = Stack::start(Options {
        manifests,
        images: Some(RegistrySettings {
            insecure: vec![registry.addr.clone(), closed.clone()],
            auth_file: None,
            max_image_bytes: Some(4 << 20),
        }),
        ..Default::default()
    })
    .await;
    let cases = [
        ("tampered", 503, "does not match its digest"),
        ("unknown", 400, "not found"),
        ("offline", 503, "unreachable (no network"),
        ("never", 400, "imagePullPolicy is Never"),
        ("bomb", 400, "unpacks to more than 4194304 bytes"),
        ("biglayer", 400, "more than the 4194304 this host takes"),
        ("bigconfig", 400, "its config sha256:"),
    ];
    for (name, want, text) in cases {
        let (status, body) = s.create("code-interpreter", name).await;
        let message = body["message"].as_str().unwrap_or_default();
        assert_eq!(status, want, "{name}: {body}");
        assert!(
            message.contains(text) && message.contains("image"),
            "{name}: {message}"
        );
    }
    // Nothing kept: no rootfs, no blob but the bomb's verified one (the tampered one was
    // refused while streaming), no partial file, no sandbox, no session record.
    let cache = s.backend.images().unwrap().dir().to_path_buf();
    assert_eq!(count(&cache.join("rootfs")), 0);
    assert_eq!(count(&cache.join("blobs")), 1);
    assert!(s.backend.running().is_empty());
    let all = agentcube_store::Scope::All;
    assert_eq!(s.store.count(&all).await.unwrap(), 0);
    s.shutdown_and_check_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gvisor_sandboxes_run_on_the_image_too() {
    let registry = oci::Registry::start().await;
    let marker = oci::layer(|l| l.file("etc/image-name", b"gvisor-image", 0o644));
    registry
        .push(
            "py:1",
            &[oci::python_base_layer(), marker],
            json!({"Env": ["PATH=/usr/bin:/bin"]}),
        )
        .await;
    let image = format!("{}/py:1", registry.addr);
    let policy = "  networkPolicy: {egress: [{cidrs: [192.0.2.7/32], ports: [{port: 443}]}]}\n";
    let s = Stack::start(Options {
        manifests: ci("py", &image, "") + &ci("pynet", &image, policy),
        isolation: agentcube_workload_manager::backend::local::Isolation::Gvisor,
        sandbox_dns: Some("192.0.2.53".parse().unwrap()),
        ..pulling(&registry)
    })
    .await;
    // With a network policy (as root): the image root, whose /etc has no resolv.conf, gets the
    // namespace's, and a port the policy does not name is refused at once.
    if nix::unistd::Uid::effective().is_root() {
        let net = s.create_ok("code-interpreter", "pynet").await;
        let (out, code) = py(
            &net,
            "import socket\nprint(open('/etc/resolv.conf').read().strip())\ntry:\n    socket.create_connection(('192.0.2.7', 80), timeout=5)\nexcept OSError as e:\n    print(type(e).__name__)",
        )
        .await;
        assert_eq!(
            (out.as_str(), code),
            ("nameserver 192.0.2.53\nConnectionRefusedError", 0)
        );
        assert_eq!(s.delete(net["sessionId"].as_str().unwrap()).await.0, 200);
    }
    let v = s.create_ok("code-interpreter", "py").await;
    let (out, code) = py(
        &v,
        "import os; print(open('/etc/image-name').read(), os.path.exists('/usr/bin/bwrap'))",
    )
    .await;
    assert_eq!(code, 0, "{out}");
    let host_kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let (kernel, _) = py(&v, "import platform; print(platform.release())").await;
    assert_ne!(kernel, host_kernel.trim(), "gVisor's kernel");
    assert_eq!(out, "gvisor-image False");
    let w = exec(&v, &sh("echo x > /usr/x; echo $?")).await;
    assert_ne!(
        w["stdout"].as_str().unwrap().trim(),
        "0",
        "read-only root: {w}"
    );
    assert_eq!(s.delete(v["sessionId"].as_str().unwrap()).await.0, 200);
    s.shutdown_and_check_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_credentials_come_from_the_docker_config_file() {
    let registry = oci::Registry::start_with(Some(("agent", "s3cret"))).await;
    let marker = oci::layer(|l| l.file("etc/image-name", b"private", 0o644));
    registry
        .push(
            "private:1",
            &[oci::python_base_layer(), marker],
            json!({"Env": ["PATH=/usr/bin:/bin"]}),
        )
        .await;
    let creds = tempfile::tempdir().unwrap();
    let config = creds.path().join("config.json");
    let login = |password: &str| {
        use base64::Engine;
        let auth = base64::engine::general_purpose::STANDARD.encode(format!("agent:{password}"));
        let file = json!({"auths": {format!("http://{}", registry.addr): {"auth": auth}}});
        std::fs::write(&config, file.to_string()).unwrap();
    };
    login("wrong");
    let s = Stack::start(Options {
        manifests: ci("private", &format!("{}/private:1", registry.addr), ""),
        images: Some(RegistrySettings {
            insecure: vec![registry.addr.clone()],
            auth_file: Some(config.clone()),
            max_image_bytes: None,
        }),
        ..Default::default()
    })
    .await;
    let (status, body) = s.create("code-interpreter", "private").await;
    let message = body["message"].as_str().unwrap_or_default();
    assert_eq!(status, 400, "{body}");
    assert!(
        message.contains("credentials") && message.contains(&config.display().to_string()),
        "{message}"
    );
    // A fixed login applies at the next create, without a restart.
    login("s3cret");
    let v = s.create_ok("code-interpreter", "private").await;
    assert_eq!(
        py(&v, "print(open('/etc/image-name').read())").await.0,
        "private"
    );
    assert_eq!(s.delete(v["sessionId"].as_str().unwrap()).await.0, 200);
    s.shutdown_and_check_leaks().await;
}
