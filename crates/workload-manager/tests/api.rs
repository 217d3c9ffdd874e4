//! The Workload Manager API with real sandboxes: create → execute through PicoD → delete.

mod common;

use common::*;
use serde_json::json;

#[tokio::test]
async fn code_interpreter_create_execute_delete() {
    let s = Stack::start(Options {
        manifests: code_interpreter("ci", ""),
        ..Default::default()
    })
    .await;
    let v = s.create_ok("code-interpreter", "ci").await;
    assert_eq!(v["kind"], "Sandbox");
    let id = v["sessionId"].as_str().unwrap().to_string();
    assert_eq!(id.len(), 36, "uuid session id");
    assert!(v["sandboxName"].as_str().unwrap().starts_with("ci-"));
    assert_eq!(v["entryPoints"][0]["path"], "/");
    assert_eq!(v["entryPoints"][0]["protocol"], "HTTP");
    let ep = v["entryPoints"][0]["endpoint"].as_str().unwrap();
    let name = v["sandboxName"].as_str().unwrap();
    assert!(
        ep.starts_with("unix:") && ep.ends_with(&format!("/private/{name}/sockets/picod.sock")),
        "{ep}"
    );
    assert_eq!(v["sandboxIdentity"], name);
    let rec = s.store.get(&id).await.unwrap();
    assert_eq!(rec.status, agentcube_types::SessionStatus::Ready);
    assert_eq!(rec.entry_points()[0].endpoint, ep);
    assert_eq!(rec.idle_timeout.to_string(), "15m0s");
    let out = exec(&v, &["python3", "-c", "print(1+1)"]).await;
    assert_eq!(out["stdout"], "2\n");
    // PicoD requires the Router's token: an unsigned request is refused.
    let sock = ep.strip_prefix("unix:").unwrap();
    let stream = tokio::net::UnixStream::connect(sock).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = hyper::Request::post("/api/execute")
        .header("host", "x")
        .body(http_body_util::Full::<hyper::body::Bytes>::from("{}"))
        .unwrap();
    assert_eq!(send.send_request(req).await.unwrap().status(), 401);

    let (status, body) = s.delete(&id).await;
    assert_eq!(
        (status, body),
        (200, json!({"message": "Sandbox deleted successfully"}))
    );
    assert!(!std::path::Path::new(sock).exists());
    assert!(s.store.get(&id).await.is_err());
    let (status, body) = s.delete(&id).await;
    assert_eq!(status, 404);
    assert_eq!(
        body["message"],
        format!("Session ID {id} not found, maybe already deleted")
    );
    s.shutdown_and_check_leaks().await;
}

const ECHO_AGENT: &str = r#"apiVersion: runtime.agentcube.volcano.sh/v1alpha1
kind: AgentRuntime
metadata: {name: echo, namespace: default}
spec:
  targetPort: [{pathPrefix: /, port: 8080, protocol: HTTP}]
  podTemplate:
    spec:
      containers:
        - name: agent
          image: python
          command: [python3, -c]
          args:
            - |
              import json
              from http.server import BaseHTTPRequestHandler, HTTPServer
              class H(BaseHTTPRequestHandler):
                  def do_POST(self):
                      n = int(self.headers.get("Content-Length") or 0)
                      body = json.loads(self.rfile.read(n) or b"{}")
                      out = json.dumps({"output": "echo: " + body.get("input", ""), "path": self.path}).encode()
                      self.send_response(200); self.send_header("Content-Length", str(len(out))); self.end_headers(); self.wfile.write(out)
                  def log_message(self, *a): pass
              HTTPServer(("127.0.0.1", 8080), H).serve_forever()
"#;

#[tokio::test]
async fn agent_runtime_port_is_reachable_through_its_socket() {
    let s = Stack::start(Options {
        manifests: ECHO_AGENT.into(),
        ..Default::default()
    })
    .await;
    let v = s.create_ok("agent-runtime", "echo").await;
    let ep = v["entryPoints"][0]["endpoint"].as_str().unwrap();
    assert!(
        ep.ends_with("/port-8080.sock") && ep.contains("/private/"),
        "{ep}"
    );
    let (status, body) =
        unix_http(ep, "POST", "/echo", Some(json!({"input": "Hello, World!"}))).await;
    assert_eq!(status, 200);
    let v2: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        v2,
        json!({"output": "echo: Hello, World!", "path": "/echo"})
    );
    let id = v["sessionId"].as_str().unwrap();
    assert_eq!(s.delete(id).await.0, 200);
    s.shutdown_and_check_leaks().await;
}

/// A CodeInterpreter's extra ports are for servers its users start later: the sandbox is ready
/// once PicoD answers (it waited for port 9000 and the create timed out), each port is forwarded
/// once however many path prefixes name it, and a server started through PicoD's process API is
/// reached through the port's socket.
#[tokio::test]
async fn code_interpreter_extra_ports_serve_what_users_start_later() {
    let ports = "  ports:\n    - {port: 8080, pathPrefix: /}\n    - {port: 9000, pathPrefix: /app}\n    \
                 - {port: 9000, pathPrefix: /app2}\n    - {port: 8080, pathPrefix: /picod}\n";
    let s = Stack::start(Options {
        manifests: code_interpreter("ci", ports),
        create_timeout: std::time::Duration::from_secs(10),
        ..Default::default()
    })
    .await;
    let v = s.create_ok("code-interpreter", "ci").await;
    let eps: Vec<&str> = v["entryPoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["endpoint"].as_str().unwrap())
        .collect();
    assert!(
        eps[0].ends_with("/picod.sock") && eps[3] == eps[0],
        "{eps:?}"
    );
    assert!(
        eps[1].ends_with("/port-9000.sock") && eps[2] == eps[1],
        "{eps:?}"
    );
    let server =
        json!({"command": ["python3", "-m", "http.server", "9000", "--bind", "127.0.0.1"]});
    let (status, _) = unix_http(eps[0], "POST", "/api/processes", Some(server)).await;
    assert_eq!(status, 200);
    // PicoD's health says when the port listens (a connection before that is reset).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let (_, health) = unix_http(eps[0], "GET", "/health", None).await;
        let health: serde_json::Value = serde_json::from_slice(&health).unwrap();
        if health["ports"]["9000"] == true {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{health}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let (status, body) = unix_http(eps[1], "GET", "/", None).await;
    assert_eq!(status, 200);
    assert!(String::from_utf8_lossy(&body).contains("Directory listing"));
    assert_eq!(s.delete(v["sessionId"].as_str().unwrap()).await.0, 200);
    s.shutdown_and_check_leaks().await;
}

/// An agent that exits while its sandbox starts: the create says so (which sandbox, and the
/// agent's exit status, which PicoD and bubblewrap pass on) instead of a bare `internal server
/// error`, keeps the agent's output out of the answer (it goes to the log), and leaves nothing
/// behind.
#[tokio::test]
async fn an_agent_exiting_at_start_is_named_in_the_error() {
    let (_guard, logs) = common::Logs::start();
    let s = Stack::start(Options {
        manifests: host_agent(
            "quits",
            8080,
            r#"[sh, -c, "echo secret-output >&2; exit 3"]"#,
        ),
        ..Default::default()
    })
    .await;
    let (status, v) = s.create("agent-runtime", "quits").await;
    assert_eq!((status, &v["code"]), (500, &json!("SANDBOX_FAILED")), "{v}");
    let message = v["message"].as_str().unwrap();
    assert!(
        message.starts_with("sandbox quits-")
            && message.contains("exited while starting (exit status: 3)")
            && message.contains("Workload Manager's log"),
        "{message}"
    );
    assert!(!message.contains("secret-output"), "{message}");
    // The agent's last words, which went through the sandbox's output pipe, are all in.
    assert!(
        logs.line_with("exited while starting")
            .contains("secret-output"),
        "{}",
        logs.text()
    );
    assert!(s.backend.running().is_empty());
    s.shutdown_and_check_leaks().await;
}

/// An AgentRuntime whose agent listens on 8080 where its definition says 9999: its creates run
/// out of time (2 s to answer), the log captured.
async fn deaf_agent() -> (tracing::subscriber::DefaultGuard, common::Logs, Stack) {
    let (guard, logs) = common::Logs::start();
    let s = Stack::start(Options {
        manifests: host_agent("deaf", 9999, r#"[python3, -m, http.server, "8080"]"#),
        ready_timeout: std::time::Duration::from_secs(2),
        ..Default::default()
    })
    .await;
    (guard, logs, s)
}

/// A create whose client gave up before it failed (the SDK and the Router wait 2 minutes) had
/// nobody to answer, and its failure, which the answer logs, was nowhere.
#[tokio::test]
async fn a_create_failing_after_its_client_left_is_logged() {
    let (_guard, logs, s) = deaf_agent().await;
    let impatient = reqwest::Client::builder()
        .timeout(std::time::Duration::from_millis(300))
        .build()
        .unwrap();
    let gave_up = impatient
        .post(format!("{}/v1/agent-runtime", s.url))
        .json(&json!({"name": "deaf", "namespace": "default"}))
        .send()
        .await;
    assert!(gave_up.is_err_and(|e| e.is_timeout()));
    eventually("the create's failure logged", 20, || {
        logs.text()
            .contains("create failed after its client went away")
    })
    .await;
    let line = logs.line_with("create failed after its client went away");
    assert!(
        line.contains("WARN") && line.contains("nothing accepts connections on port 9999"),
        "{line}"
    );
    s.shutdown_and_check_leaks().await;
}

/// A create that runs out of time is upstream's 504, its message saying what it waited for (once
/// only in the log, and before that nowhere), and so is the warning in the log.
#[tokio::test]
async fn a_create_that_times_out_logs_what_it_waited_for() {
    let (_guard, logs, s) = deaf_agent().await;
    let (status, v) = s.create("agent-runtime", "deaf").await;
    assert_eq!(
        (status, &v["code"]),
        (504, &json!("SANDBOX_TIMEOUT")),
        "{v}"
    );
    // Upstream's words, then what it waited for: the definition's to fix.
    let message = v["message"].as_str().unwrap();
    assert!(
        message.starts_with("sandbox creation timed out: sandbox deaf-")
            && message.contains("nothing accepts connections on port 9999"),
        "{message}"
    );
    let line = logs.line_with("sandbox creation timed out");
    assert!(
        line.contains("WARN")
            && line.contains("sandbox deaf-")
            && line.contains("not ready within 2s")
            && line.contains("nothing accepts connections on port 9999"),
        "{line}"
    );
    s.shutdown_and_check_leaks().await;
}

#[tokio::test]
async fn bad_requests_get_upstream_messages() {
    let s = Stack::start(Options {
        manifests: code_interpreter("ci", ""),
        ..Default::default()
    })
    .await;
    let post = |body: &str| {
        let body = body.to_owned();
        let http = s.http.clone();
        let url = format!("{}/v1/code-interpreter", s.url);
        async move {
            let r = http
                .post(url)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap();
            (
                r.status().as_u16(),
                r.json::<serde_json::Value>().await.unwrap(),
            )
        }
    };
    assert_eq!(
        post("{nope").await,
        (400, json!({"message": "Invalid request body"}))
    );
    assert_eq!(
        post(r#"{"name":"ci"}"#).await,
        (400, json!({"message": "namespace is required"}))
    );
    assert_eq!(
        post(r#"{"namespace":"default"}"#).await,
        (400, json!({"message": "name is required"}))
    );
    for bad in [
        r#"{"name":"ci","namespace":"default","ttl":-5}"#,
        r#"{"name":"ci","namespace":"default","ttl":0}"#,
        r#"{"name":"ci","namespace":"default","ttl":1.5}"#,
    ] {
        let (status, body) = post(bad).await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert!(
            body["message"].as_str().unwrap().starts_with("invalid ttl"),
            "{body}"
        );
    }
    for not_an_object in [
        r#"{"name":"ci","namespace":"default","ttl":"soon"}"#,
        "[]",
        r#" ["ci","default"]"#,
    ] {
        assert_eq!(
            post(not_an_object).await,
            (400, json!({"message": "Invalid request body"})),
            "{not_an_object}"
        );
    }
    // Over the API's 1 MiB limit: a 413 in the API's shape (it was axum's plain text).
    let big = format!(
        r#"{{"name":"ci","namespace":"default","metadata":{{"a":"{}"}}}}"#,
        "a".repeat(2 << 20)
    );
    assert_eq!(
        post(Box::leak(big.into_boxed_str())).await,
        (413, json!({"message": "request body over 1048576 bytes"}))
    );
    assert!(
        s.backend.running().is_empty(),
        "no sandbox for a refused request"
    );
    assert_eq!(
        s.create("code-interpreter", "nope").await,
        (404, json!({"message": "code interpreter not found"}))
    );
    assert_eq!(
        s.create("agent-runtime", "ci").await,
        (404, json!({"message": "agent runtime not found"}))
    );
    // A namespace or name no definition can have: a clear 400 that still says "not found" (the
    // Router's cue for upstream's 404).
    let (status, body) = post(r#"{"name":"ci","namespace":"../default"}"#).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(
        body["message"],
        "code interpreter not found: namespace: Invalid value: \"../default\": a lowercase RFC \
         1123 label of at most 63 characters must consist of lower case alphanumeric characters \
         or '-', and must start and end with an alphanumeric character"
    );
    let (status, body) = post(r#"{"name":"ci/status","namespace":"default"}"#).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .starts_with("code interpreter not found: name: Invalid value: \"ci/status\""),
        "{body}"
    );
    // A name of half a megabyte is not echoed back (nor into the log) whole.
    let long = "a".repeat(500_000);
    let (status, body) = post(&format!(r#"{{"name":"{long}","namespace":"default"}}"#)).await;
    assert_eq!(status, 400);
    let said = body["message"].as_str().unwrap();
    assert!(said.len() < 600, "{} bytes", said.len());
    assert!(
        said.starts_with("code interpreter not found: name: Invalid value: \"aaaa")
            && said.contains("… (500000 characters)"),
        "{said}"
    );
    let r = s
        .http
        .get(format!("{}/health", s.url))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.json::<serde_json::Value>().await.unwrap(),
        json!({"status": "healthy"})
    );
    s.shutdown_and_check_leaks().await;
}

#[tokio::test]
async fn the_requests_ttl_shortens_a_sessions_lifetime_and_gc_follows_it() {
    let s = Stack::start(Options {
        manifests: code_interpreter("ci", "  maxSessionDuration: 1h\n"),
        gc_interval: std::time::Duration::from_millis(200),
        ..Default::default()
    })
    .await;
    let create = |ttl: u64| {
        let (http, url) = (s.http.clone(), format!("{}/v1/code-interpreter", s.url));
        async move {
            let r = http
                .post(url)
                .json(&json!({"name": "ci", "namespace": "default", "ttl": ttl}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            r.json::<serde_json::Value>().await.unwrap()["sessionId"]
                .as_str()
                .unwrap()
                .to_string()
        }
    };
    let long = create(86_400).await;
    let rec = s.store.get(&long).await.unwrap();
    let life = rec.expires_at.duration_since(rec.created_at).as_secs();
    assert_eq!(life, 3600, "capped by maxSessionDuration");
    let short = create(2).await;
    let rec = s.store.get(&short).await.unwrap();
    assert_eq!(rec.expires_at.duration_since(rec.created_at).as_secs(), 2);
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(15);
    while s.store.get(&short).await.is_ok() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the 2 s session was not reclaimed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(s.store.get(&long).await.is_ok(), "the other session stays");
    assert_eq!(
        s.backend.running().len(),
        1,
        "the expired session's sandbox is gone"
    );
    s.shutdown_and_check_leaks().await;
}

#[tokio::test]
async fn sandbox_that_never_answers_is_a_504_with_full_rollback() {
    let (_guard, logs) = common::Logs::start();
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("picod");
    std::fs::write(&fake, "#!/bin/sh\nexec sleep 600\n").unwrap();
    std::os::unix::fs::PermissionsExt::set_mode(
        &mut std::fs::metadata(&fake).unwrap().permissions(),
        0o755,
    );
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let s = Stack::start(Options {
        manifests: code_interpreter("ci", ""),
        picod: Some(fake),
        create_timeout: std::time::Duration::from_secs(2),
        ..Default::default()
    })
    .await;
    let (status, body) = s.create("code-interpreter", "ci").await;
    assert_eq!((status, &body["code"]), (504, &json!("SANDBOX_TIMEOUT")));
    let message = body["message"].as_str().unwrap();
    assert!(
        message.starts_with("sandbox creation timed out: ")
            && message.contains("not ready within --create-timeout (2s; rolled back)"),
        "{message}"
    );
    let line = logs.line_with("sandbox creation timed out");
    assert!(
        line.contains("not ready within --create-timeout (2s; rolled back)"),
        "{line}"
    );
    let far = jiff::Timestamp::from_second(4_000_000_000).unwrap();
    assert!(
        s.store.list_expired(far, 10).await.unwrap().is_empty(),
        "record rolled back"
    );
    eventually("rollback", 5, || s.backend.running().is_empty()).await;

    // A client that goes away mid-create leaves nothing behind either.
    let http = s.http.clone();
    let url = format!("{}/v1/code-interpreter", s.url);
    let req = tokio::spawn(async move {
        let _ = http
            .post(url)
            .json(&json!({"name": "ci", "namespace": "default"}))
            .send()
            .await;
    });
    eventually("sandbox start", 5, || !s.backend.running().is_empty()).await;
    req.abort();
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    assert!(s.store.list_expired(far, 10).await.unwrap().is_empty());
    eventually("rollback after disconnect", 5, || {
        s.backend.running().is_empty()
    })
    .await;
    let text = s.wm.as_ref().unwrap().manager.metrics.encode();
    for line in [
        "agentcube_sandbox_rollback_total 2",
        "agentcube_sandbox_create_total{kind=\"CodeInterpreter\",status=\"failure\"} 2",
    ] {
        assert!(text.contains(line), "{line}\n{text}");
    }
    s.shutdown_and_check_leaks().await;
}

#[tokio::test]
async fn manifests_are_reloaded_without_restart() {
    let s = Stack::start(Options {
        manifests: code_interpreter("ci", ""),
        ..Default::default()
    })
    .await;
    assert_eq!(s.create("code-interpreter", "later").await.0, 404);
    std::fs::write(
        s.dir.path().join("manifests/more.yaml"),
        code_interpreter("later", ""),
    )
    .unwrap();
    let mut ok = None;
    for _ in 0..50 {
        let (status, v) = s.create("code-interpreter", "later").await;
        if status == 200 {
            ok = Some(v);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let v = ok.expect("new definition picked up");
    assert_eq!(s.delete(v["sessionId"].as_str().unwrap()).await.0, 200);
    s.shutdown_and_check_leaks().await;
}

/// A real `redis-server` and a stack with CodeInterpreter `ci` on it, each store call bounded
/// by `op_timeout`.
async fn on_redis(
    op_timeout: std::time::Duration,
) -> (agentcube_store::testing::ServerProcess, Stack) {
    let server =
        agentcube_store::testing::ServerProcess::start(agentcube_store::testing::Flavor::Redis);
    let mut config = agentcube_store::RedisConfig::new(server.url());
    config.op_timeout = op_timeout;
    let store = std::sync::Arc::new(agentcube_store::RedisStore::new(config).unwrap());
    let s = Stack::start(Options {
        manifests: code_interpreter("ci", ""),
        store: Some(store),
        ..Default::default()
    })
    .await;
    (server, s)
}

#[tokio::test]
async fn works_the_same_on_redis() {
    let (server, s) = on_redis(std::time::Duration::from_secs(2)).await;
    let v = s.create_ok("code-interpreter", "ci").await;
    assert_eq!(exec(&v, &["echo", "hi"]).await["stdout"], "hi\n");
    let raw = server
        .command(&format!("GET session:{}", v["sessionId"].as_str().unwrap()))
        .unwrap();
    assert!(raw.contains("\"status\":\"ready\""), "{raw}");
    assert_eq!(s.delete(v["sessionId"].as_str().unwrap()).await.0, 200);
    s.shutdown_and_check_leaks().await;
}

#[tokio::test]
async fn sessions_are_read_and_deleted_only_through_their_own_kind() {
    // Listing needs an authenticated caller (below: 403 without); this one is the administrator.
    let mut s = Stack::start(Options {
        manifests: format!("{}{ECHO_AGENT}", code_interpreter("ci", "")),
        auth_token: Some("admin-token".into()),
        ..Default::default()
    })
    .await;
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        "Bearer admin-token".parse().unwrap(),
    );
    s.http = reqwest::Client::builder()
        .default_headers(headers)
        .build()
        .unwrap();
    let get = |path: String| {
        let http = s.http.clone();
        async move {
            let r = http.get(path).send().await.unwrap();
            let status = r.status().as_u16();
            (status, r.json::<serde_json::Value>().await.unwrap())
        }
    };
    let mut ci = Vec::new();
    for _ in 0..3 {
        ci.push(s.create_ok("code-interpreter", "ci").await["sessionId"].clone());
    }
    let ar = s.create_ok("agent-runtime", "echo").await["sessionId"].clone();
    let ar = ar.as_str().unwrap();

    // Pages of two, only code-interpreter sessions, each once, then the end (ordered by creation
    // second, then id: sessions made in the same second come in id order).
    let (st, p1) = get(format!("{}/v1/code-interpreter/sessions?limit=2", s.url)).await;
    assert_eq!(st, 200, "{p1}");
    let ids = |p: &serde_json::Value| -> Vec<serde_json::Value> {
        p["sessions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["sessionId"].clone())
            .collect()
    };
    assert_eq!(ids(&p1).len(), 2);
    let next = p1["continue"]
        .as_str()
        .expect("a continue token")
        .to_string();
    let (st, p2) = get(format!(
        "{}/v1/code-interpreter/sessions?limit=2&continue={next}",
        s.url
    ))
    .await;
    assert_eq!((st, ids(&p2).len()), (200, 1));
    let mut seen: Vec<String> = ids(&p1)
        .into_iter()
        .chain(ids(&p2))
        .map(|v| v.to_string())
        .collect();
    let mut want: Vec<String> = ci.iter().map(|v| v.to_string()).collect();
    seen.sort();
    want.sort();
    assert_eq!(seen, want);
    assert!(p2.get("continue").is_none(), "{p2}");
    let (_, all_ar) = get(format!("{}/v1/agent-runtime/sessions", s.url)).await;
    assert_eq!(ids(&all_ar), vec![serde_json::json!(ar)]);
    // The record is the store's JSON (upstream SandboxInfo field names).
    let rec = &all_ar["sessions"][0];
    assert_eq!(rec["workloadName"], "echo");
    assert_eq!(rec["status"], "ready");
    assert!(
        rec["entryPoints"][0]["endpoint"]
            .as_str()
            .unwrap()
            .starts_with("unix:")
    );

    // One session: found on its own kind's route, 404 on the other (no hint it exists).
    let (st, one) = get(format!("{}/v1/agent-runtime/sessions/{ar}", s.url)).await;
    assert_eq!((st, one["sessionId"].as_str()), (200, Some(ar)));
    let (st, other) = get(format!("{}/v1/code-interpreter/sessions/{ar}", s.url)).await;
    assert_eq!(
        (st, other),
        (
            404,
            json!({"message": format!("Session ID {ar} not found")})
        )
    );
    let (st, _) = get(format!("{}/v1/code-interpreter/sessions/no-such-id", s.url)).await;
    assert_eq!(st, 404);

    // Bad paging input is a 400 with the WM's error shape.
    for q in ["limit=0", "limit=1001", "limit=x", "continue=garbage"] {
        let (st, body) = get(format!("{}/v1/code-interpreter/sessions?{q}", s.url)).await;
        assert_eq!(st, 400, "{q}: {body}");
        assert!(
            body["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{q}: {body}"
        );
    }

    // DELETE checks the kind: the wrong route deletes nothing.
    let r = s
        .http
        .delete(format!("{}/v1/code-interpreter/sessions/{ar}", s.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert!(
        s.store.get(ar).await.is_ok(),
        "the session survives a wrong-kind delete"
    );
    assert_eq!(s.backend.running().len(), 4);
    assert_eq!(s.delete(ar).await.0, 200);
    for id in &ci {
        assert_eq!(s.delete(id.as_str().unwrap()).await.0, 200);
    }
    let (_, empty) = get(format!("{}/v1/code-interpreter/sessions", s.url)).await;
    assert_eq!(empty, json!({"sessions": []}));
    // Reading a session that has ended says why, as the Router does.
    let (st, gone) = get(format!("{}/v1/agent-runtime/sessions/{ar}", s.url)).await;
    assert_eq!(st, 404);
    let said = gone["message"].as_str().unwrap();
    assert!(
        said.starts_with(&format!("Session ID {ar} not found: it was deleted")),
        "{said}"
    );
    s.shutdown_and_check_leaks().await;
}

/// Without caller authentication (upstream's default) a session's id is its only key: listing
/// would hand every id to whoever reaches the Workload Manager — in a cluster any pod, a
/// sandbox's included, which could then drive other users' sandboxes through the Router. Reading
/// one session by its id still works.
#[tokio::test]
async fn without_caller_authentication_sessions_cannot_be_listed() {
    let s = Stack::start(Options {
        manifests: code_interpreter("ci", ""),
        ..Default::default()
    })
    .await;
    let id = s.create_ok("code-interpreter", "ci").await["sessionId"]
        .as_str()
        .unwrap()
        .to_string();
    for kind in ["code-interpreter", "agent-runtime"] {
        let r = s
            .http
            .get(format!("{}/v1/{kind}/sessions?limit=5", s.url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 403);
        let body = r.text().await.unwrap();
        assert!(
            !body.contains(&id) && body.contains("listing sessions needs caller authentication"),
            "{body}"
        );
    }
    let r = s
        .http
        .get(format!("{}/v1/code-interpreter/sessions/{id}", s.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(s.delete(&id).await.0, 200);
    s.shutdown_and_check_leaks().await;
}

#[tokio::test]
async fn an_agent_runtime_without_max_session_duration_has_no_maximum_lifetime() {
    let s = Stack::start(Options {
        manifests: ECHO_AGENT.into(),
        ..Default::default()
    })
    .await;
    let create = |body: serde_json::Value| {
        let (http, url) = (s.http.clone(), format!("{}/v1/agent-runtime", s.url));
        async move {
            let r = http.post(url).json(&body).send().await.unwrap();
            assert_eq!(r.status(), 200);
            let v = r.json::<serde_json::Value>().await.unwrap();
            v["sessionId"].as_str().unwrap().to_string()
        }
    };
    let id = create(json!({"name": "echo", "namespace": "default"})).await;
    let rec = s.store.get(&id).await.unwrap();
    assert_eq!(rec.expires_at, jiff::Timestamp::MAX, "never expires by age");
    assert_eq!(
        rec.idle_timeout.to_string(),
        "15m0s",
        "the idle timeout still applies"
    );
    // The record reads back as JSON an upstream component can parse (RFC 3339).
    let json = serde_json::to_value(&rec).unwrap();
    assert_eq!(json["expiresAt"], "9999-12-30T22:00:00.999999999Z");
    // A create's ttl still bounds it.
    let short = create(json!({"name": "echo", "namespace": "default", "ttl": 60})).await;
    let rec = s.store.get(&short).await.unwrap();
    assert_eq!(rec.expires_at.duration_since(rec.created_at).as_secs(), 60);
    assert_eq!(s.delete(&id).await.0, 200);
    assert_eq!(s.delete(&short).await.0, 200);
    s.shutdown_and_check_leaks().await;
}

#[tokio::test]
async fn the_static_token_and_the_routers_identity_header_are_checked() {
    let s = Stack::start(Options {
        manifests: code_interpreter("ci", ""),
        auth_token: Some("s3cret-token".into()),
        ..Default::default()
    })
    .await;
    let post = |token: Option<&str>, identity: Option<String>| {
        let mut r = s
            .http
            .post(format!("{}/v1/code-interpreter", s.url))
            .json(&json!({"name": "ci", "namespace": "default"}));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        if let Some(i) = identity {
            r = r.header("x-agentcube-user-identity", i);
        }
        async move {
            let r = r.send().await.unwrap();
            let status = r.status().as_u16();
            (status, r.json::<serde_json::Value>().await.unwrap())
        }
    };
    assert_eq!(
        post(None, None).await,
        (401, json!({"message": "Missing authorization header"}))
    );
    assert_eq!(
        post(Some("wrong"), None).await,
        (401, json!({"message": "Invalid or expired token"}))
    );
    // An identity the Router signed names the end user; anything else is refused.
    let now = jiff::Timestamp::now().as_second();
    let sign = |claims: serde_json::Value, key: &str| {
        let key = jsonwebtoken::EncodingKey::from_rsa_pem(key.as_bytes()).unwrap();
        let header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
        jsonwebtoken::encode(&header, &claims, &key).unwrap()
    };
    let good = json!({"iss": "agentcube-router", "iat": now, "exp": now + 300, "sub": "alice", "aud": "workloadmanager"});
    let other_key = include_str!("../../picod/tests/data/other.key.pem");
    let mut wrong_aud = good.clone();
    wrong_aud["aud"] = json!("somebody-else");
    let mut expired = good.clone();
    expired["exp"] = json!(now - 120);
    let mut no_sub = good.clone();
    no_sub["sub"] = json!("");
    for bad in [
        sign(good.clone(), other_key),
        sign(wrong_aud, ROUTER_KEY),
        sign(expired, ROUTER_KEY),
        sign(no_sub, ROUTER_KEY),
        "garbage".to_string(),
    ] {
        assert_eq!(
            post(Some("s3cret-token"), Some(bad)).await,
            (401, json!({"message": "invalid identity token"}))
        );
    }
    assert_eq!(
        s.store.count(&agentcube_store::Scope::All).await.unwrap(),
        0
    );
    let (st, v) = post(Some("s3cret-token"), Some(sign(good, ROUTER_KEY))).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["ownerId"], "alice");
    let rec = s.store.get(v["sessionId"].as_str().unwrap()).await.unwrap();
    assert_eq!(
        (rec.owner_id.as_deref(), rec.created_by.as_deref()),
        (Some("alice"), Some("local"))
    );
    // The token holder is an administrator: reads and deletes work, without the token they do not.
    let one = format!("{}/v1/code-interpreter/sessions/{}", s.url, rec.session_id);
    assert_eq!(s.http.get(&one).send().await.unwrap().status(), 401);
    let r = s
        .http
        .delete(&one)
        .bearer_auth("s3cret-token")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    s.shutdown_and_check_leaks().await;
}

/// `--max-sessions-per-user`: one end user (named by the Router's signed identity) cannot take
/// every session; others still get theirs, and the administrator's own creates are not counted
/// against anyone.
#[tokio::test]
async fn each_user_gets_at_most_their_share_of_sessions() {
    let s = Stack::start(Options {
        manifests: code_interpreter("ci", ""),
        auth_token: Some("s3cret-token".into()),
        admission: agentcube_workload_manager::sessions::Admission {
            max_sessions_per_user: Some(2),
            ..Default::default()
        },
        ..Default::default()
    })
    .await;
    let now = jiff::Timestamp::now().as_second();
    let identity = |user: &str| {
        let claims = json!({"iss": "agentcube-router", "iat": now, "exp": now + 300, "sub": user,
                            "aud": "workloadmanager"});
        let key = jsonwebtoken::EncodingKey::from_rsa_pem(ROUTER_KEY.as_bytes()).unwrap();
        let header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
        jsonwebtoken::encode(&header, &claims, &key).unwrap()
    };
    let create = |user: Option<&str>| {
        let mut r = s
            .http
            .post(format!("{}/v1/code-interpreter", s.url))
            .bearer_auth("s3cret-token")
            .json(&json!({"name": "ci", "namespace": "default"}));
        if let Some(u) = user {
            r = r.header("x-agentcube-user-identity", identity(u));
        }
        async move {
            let r = r.send().await.unwrap();
            let status = r.status().as_u16();
            (status, r.json::<serde_json::Value>().await.unwrap())
        }
    };
    for _ in 0..2 {
        assert_eq!(create(Some("alice")).await.0, 200);
    }
    let (status, v) = create(Some("alice")).await;
    assert_eq!(status, 429, "{v}");
    assert_eq!(
        v["message"],
        "session limit reached: 2 live sessions of user alice (--max-sessions-per-user)"
    );
    assert_eq!(create(Some("bob")).await.0, 200, "another user's share");
    for _ in 0..3 {
        assert_eq!(create(None).await.0, 200, "the administrator is not capped");
    }
    use agentcube_store::Scope;
    let alice = s.store.count(&Scope::Owner("alice".into())).await.unwrap();
    assert_eq!(alice, 2, "nothing left by the refusal");
    assert_eq!(s.store.count(&Scope::All).await.unwrap(), 6);
    assert_eq!(s.backend.running().len(), 6);
    s.shutdown_and_check_leaks().await;
}

fn warn_once_more() {
    tracing::warn!("a line another thread reached first");
}

/// The log capture sees a line whose callsite a thread without a subscriber reached first (as
/// sibling tests do): with one dispatcher alive, tracing-core cached "never" for it and the
/// capture came back empty (tokio-rs/tracing#3611). Guards `common::Logs`.
#[test]
fn logs_capture_a_line_another_thread_reached_first() {
    let (_guard, logs) = common::Logs::start();
    std::thread::spawn(warn_once_more).join().unwrap();
    warn_once_more();
    logs.line_with("a line another thread reached first");
}

/// A create whose placeholder write times out (the store hung, not refused) answers 503 at once;
/// the write lands when the store comes back. That placeholder used to stay, counted against
/// `--max-sessions`, until its idle timeout (15 minutes by default): it is now taken back.
#[tokio::test]
async fn a_placeholder_written_after_its_create_gave_up_is_taken_back() {
    let (server, s) = on_redis(std::time::Duration::from_millis(300)).await;
    let v = s.create_ok("code-interpreter", "ci").await;
    let sessions = || server.command("ZCARD session:expiry").unwrap();
    assert_eq!(sessions(), ":1\r\n");
    server.pause(true);
    let (status, body) = s.create("code-interpreter", "ci").await;
    server.pause(false);
    assert_eq!(status, 503, "{body}");
    let mut seen = Vec::new();
    eventually("the late placeholder is taken back", 5, || {
        seen.push(sessions());
        seen.last().unwrap() == ":1\r\n" && seen.len() > 3
    })
    .await;
    assert!(seen.iter().all(|n| n != ":0\r\n"), "{seen:?}");
    assert_eq!(s.delete(v["sessionId"].as_str().unwrap()).await.0, 200);
    s.shutdown_and_check_leaks().await;
}
