//! `/api/execute`: buffered and streamed, timeouts, process groups, limits, parallelism.

mod common;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use common::*;
use http_body_util::BodyExt;
use serde_json::json;
use tower::ServiceExt;

#[tokio::test]
async fn runs_argv_without_a_shell() {
    let p = Picod::new();
    let v = p.exec(json!({"command": ["echo", "Hello, World!"]})).await;
    assert_eq!(v["stdout"], "Hello, World!\n");
    assert_eq!(v["stderr"], "");
    assert_eq!(v["exit_code"], 0);
    assert!(v["duration"].as_f64().unwrap() >= 0.0);
    for k in ["start_time", "end_time"] {
        v[k].as_str().unwrap().parse::<jiff::Timestamp>().unwrap();
    }
    let v = p.exec(json!({"command": ["sh", "-c", "exit 1"]})).await;
    assert_eq!(
        (v["exit_code"].as_i64(), v["stderr"].as_str()),
        (Some(1), Some(""))
    );
    // A shell string is one argv element, not a shell command: `&&` is not interpreted.
    let v = p.exec(json!({"command": ["echo", "a && echo b"]})).await;
    assert_eq!(v["stdout"], "a && echo b\n");
}

#[tokio::test]
async fn bad_bodies_are_400_with_picod_error_shape() {
    let p = Picod::new();
    for body in [
        json!({"command": "echo hi"}),
        json!({}),
        json!({"command": []}),
    ] {
        let r = p.post_json("/api/execute", body.clone()).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(r.json()["code"], 400);
        assert!(!r.json()["error"].as_str().unwrap().is_empty());
    }
    let r = p
        .post_json(
            "/api/execute",
            json!({"command": ["true"], "timeout": "soon"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap()
            .starts_with("Invalid timeout format")
    );
    let r = p
        .send(
            authed(Request::post("/api/execute"))
                .body(Body::from("{not json"))
                .unwrap(),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn missing_program_is_200_exit_1() {
    let p = Picod::new();
    let v = p
        .exec(json!({"command": ["definitely-not-a-program"]}))
        .await;
    assert_eq!(v["exit_code"], 1);
    assert_eq!(
        v["stderr"],
        "exec: \"definitely-not-a-program\": executable file not found in $PATH"
    );
}

#[tokio::test]
async fn timeout_kills_the_whole_group_and_answers_124() {
    let p = Picod::new();
    let v = p
        .exec(json!({
            "command": ["sh", "-c", "echo started; sleep 30 & echo $! > bg.pid; wait"],
            "timeout": "1s"
        }))
        .await;
    assert_eq!(v["exit_code"], 124);
    assert_eq!(v["stdout"], "started\n");
    assert!(
        v["stderr"]
            .as_str()
            .unwrap()
            .ends_with("Command timed out after 1 seconds"),
        "{v}"
    );
    let pid: i32 = std::fs::read_to_string(p.ws().join("bg.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        wait_gone(pid).await,
        "background child {pid} survived the timeout"
    );
}

pub async fn wait_gone(pid: i32) -> bool {
    for _ in 0..100 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // Gone, or a zombie waiting for its (killed) parent's reaper.
        if stat.is_empty() || stat.split(' ').nth(2) == Some("Z") {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    false
}

#[tokio::test]
async fn go_duration_timeouts_are_accepted() {
    let p = Picod::new();
    for t in ["30s", "120.0s", "500ms", "1m"] {
        let v = p.exec(json!({"command": ["true"], "timeout": t})).await;
        assert_eq!(v["exit_code"], 0, "{t}");
    }
}

#[tokio::test]
async fn working_dir_is_jailed_and_created_and_env_is_merged() {
    let p = Picod::new();
    let v = p
        .exec(
            json!({"command": ["sh", "-c", "pwd; echo $FOO; test -n \"$PATH\" && echo path"],
                     "working_dir": "/sub/dir", "env": {"FOO": "bar"}}),
        )
        .await;
    let expected = format!("{}\nbar\npath\n", p.ws().join("sub/dir").display());
    assert_eq!(v["stdout"], expected);
    let r = p
        .post_json(
            "/api/execute",
            json!({"command": ["pwd"], "working_dir": "../.."}),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.text());
    std::os::unix::fs::symlink("/etc", p.ws().join("etc-link")).unwrap();
    let r = p
        .post_json(
            "/api/execute",
            json!({"command": ["pwd"], "working_dir": "etc-link"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    // Default: the workspace itself.
    let v = p.exec(json!({"command": ["pwd"]})).await;
    assert_eq!(v["stdout"], format!("{}\n", p.ws().display()));
}

/// The default working directory is the workspace PicoD opened at start, not whatever its path
/// names later: a command that moves the workspace away and leaves a symlink to `/etc` in its
/// place does not get the next command started in `/etc`.
#[tokio::test]
async fn a_workspace_swapped_for_a_symlink_does_not_move_the_default_working_directory() {
    let p = Picod::new();
    std::fs::write(p.ws().join("marker"), "").unwrap();
    let ws = p.ws().display().to_string();
    let swap = format!("mv '{ws}' '{ws}.moved' && ln -s /etc '{ws}'");
    let v = p.exec(json!({"command": ["sh", "-c", swap]})).await;
    assert_eq!(v["exit_code"], 0, "{v}");
    let mut outputs = Vec::new();
    for body in [
        json!({"command": ["ls"]}),
        json!({"command": ["ls"], "working_dir": ""}),
    ] {
        outputs.push(p.exec(body).await);
    }
    std::fs::remove_file(p.ws()).unwrap();
    std::fs::rename(format!("{ws}.moved"), p.ws()).unwrap();
    for v in outputs {
        let out = v["stdout"].as_str().unwrap_or_default();
        assert!(out.contains("marker") && !out.contains("passwd"), "{v}");
    }
}

#[tokio::test]
async fn output_is_capped_with_a_marker() {
    let p = Picod::with(|c| c.max_output_bytes = 1000);
    let v = p
        .exec(json!({"command": ["sh", "-c", "yes | head -c 5000"]}))
        .await;
    let out = v["stdout"].as_str().unwrap();
    assert!(out.starts_with(&"y\n".repeat(500)));
    assert!(
        out.ends_with("[picod: output truncated, 4000 bytes omitted]"),
        "{out}"
    );
}

#[tokio::test]
async fn parallel_executes_do_not_block_each_other() {
    // Each command waits until all four have started: this only finishes if they run together.
    let p = std::sync::Arc::new(Picod::new());
    let script =
        "touch started.$N; until [ $(ls started.* | wc -l) -ge 4 ]; do sleep 0.02; done; echo $N";
    let tasks: Vec<_> = (0..4)
        .map(|n| {
            let p = p.clone();
            tokio::spawn(async move {
                p.exec(json!({"command": ["sh", "-c", script], "env": {"N": n.to_string()}, "timeout": "20s"}))
                    .await
            })
        })
        .collect();
    for (n, t) in tasks.into_iter().enumerate() {
        let v = t.await.unwrap();
        assert_eq!(v["exit_code"], 0, "{v}");
        assert_eq!(v["stdout"], format!("{n}\n"));
    }
}

#[tokio::test]
async fn gzip_when_asked_from_one_kib() {
    let p = Picod::new();
    let req = authed(Request::post("/api/execute"))
        .header("accept-encoding", "gzip")
        .body(Body::from(
            json!({"command": ["seq", "1", "1000"]}).to_string(),
        ))
        .unwrap();
    let r = p.send(req).await;
    assert_eq!(r.header("content-encoding"), Some("gzip"));
    let mut out = String::new();
    std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(&r.body[..]), &mut out)
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(v["stdout"].as_str().unwrap().ends_with("999\n1000\n"));
    // A small answer is sent as it is, asked or not.
    let req = authed(Request::post("/api/execute"))
        .header("accept-encoding", "gzip")
        .body(Body::from(json!({"command": ["true"]}).to_string()))
        .unwrap();
    let r = p.send(req).await;
    assert_eq!(r.header("content-encoding"), None);
    assert!(r.body.len() < agentcube_picod::COMPRESS_FROM_BYTES as usize);
    assert_eq!(r.json()["exit_code"], 0);
    // Without Accept-Encoding: plain.
    let r = p
        .post_json("/api/execute", json!({"command": ["seq", "1", "1000"]}))
        .await;
    assert_eq!(r.header("content-encoding"), None);
    // Never on /health.
    let r = p
        .send(
            Request::get("/health")
                .header("accept-encoding", "gzip")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(r.header("content-encoding"), None);
    assert_eq!(r.json()["service"], "PicoD");
}

#[tokio::test]
async fn ndjson_streams_chunks_as_they_happen() {
    let p = Picod::new();
    let req = authed(Request::post("/api/execute"))
        .header("accept", "application/x-ndjson")
        .header("accept-encoding", "gzip")
        .body(Body::from(
            json!({"command": ["sh", "-c", "echo first; sleep 1; echo second >&2; exit 3"]})
                .to_string(),
        ))
        .unwrap();
    let resp = agentcube_picod::app(p.state.clone())
        .oneshot(req)
        .await
        .unwrap();
    assert_eq!(resp.headers()["content-type"], "application/x-ndjson");
    assert!(
        resp.headers().get("content-encoding").is_none(),
        "streams are never compressed"
    );
    let mut body = resp.into_body();
    // The first frame arrives while the command is still sleeping: it carries `first` and no exit.
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    let first: serde_json::Value = serde_json::from_slice(&first).unwrap();
    assert_eq!(first, json!({"type": "stdout", "data": "first\n"}));
    let rest = body.collect().await.unwrap().to_bytes();
    let events: Vec<serde_json::Value> = rest
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).unwrap())
        .collect();
    assert_eq!(events[0], json!({"type": "stderr", "data": "second\n"}));
    let exit = events.last().unwrap();
    assert_eq!(exit["type"], "exit");
    assert_eq!(exit["exit_code"], 3);
    assert!(exit["duration"].as_f64().unwrap() >= 1.0);
}

#[tokio::test]
async fn ndjson_timeout_reports_124() {
    let p = Picod::new();
    let req = authed(Request::post("/api/execute"))
        .header("accept", "application/x-ndjson")
        .body(Body::from(
            json!({"command": ["sleep", "30"], "timeout": "300ms"}).to_string(),
        ))
        .unwrap();
    let r = p.send(req).await;
    let last: serde_json::Value =
        serde_json::from_str(r.text().trim_end().lines().last().unwrap()).unwrap();
    assert_eq!(last["exit_code"], 124);
    assert_eq!(last["timed_out"], true);
    assert!(r.text().contains("Command timed out after 0 seconds"));
}

/// What reads a command's own `oom_score_adj` a moment after it started (PicoD raises it right
/// after the spawn).
const OOM_SCORE_ADJ: &str = "sleep 0.3; cat /proc/self/oom_score_adj";

#[tokio::test]
async fn commands_are_the_kernels_first_choice_when_memory_runs_out() {
    let p = Picod::new();
    let v = p
        .exec(json!({"command": ["sh", "-c", OOM_SCORE_ADJ]}))
        .await;
    assert_eq!(v["stdout"], "1000\n", "{v}");
    // PicoD itself keeps its own.
    let own = std::fs::read_to_string("/proc/self/oom_score_adj").unwrap();
    assert_ne!(own.trim(), "1000");
}
