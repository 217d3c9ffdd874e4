//! Stateful code contexts (`/api/contexts`): Python state between cells, results (last
//! expression, display, rich reprs), errors, interrupt and timeout keeping state, restart
//! clearing it, bash keeping `cd` and variables, NDJSON events, limits. Real interpreters.

mod common;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use common::*;
use serde_json::{Value, json};

async fn context(p: &Picod, language: &str) -> String {
    let r = p
        .post_json("/api/contexts", json!({"language": language}))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["language"], language);
    r.json()["id"].as_str().unwrap().to_string()
}

async fn cell(p: &Picod, id: &str, code: &str, timeout: Option<&str>) -> Value {
    let mut body = json!({"code": code});
    if let Some(t) = timeout {
        body["timeout"] = json!(t);
    }
    let r = p
        .post_json(&format!("/api/contexts/{id}/execute"), body)
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    r.json()
}

#[tokio::test]
async fn python_cells_share_state_and_return_results() {
    let p = Picod::new();
    let id = context(&p, "python").await;
    let v = cell(&p, &id, "x = 41\nprint('set', end='')", None).await;
    assert_eq!(
        (v["stdout"].as_str(), v["error"].clone()),
        (Some("set"), Value::Null),
        "{v}"
    );
    assert_eq!(v["results"], json!([]));
    let v = cell(&p, &id, "x + 1", None).await;
    assert_eq!(v["results"], json!([{"text/plain": "42"}]));
    assert_eq!(v["execution_count"], 2);
    let rich = "class T:\n    def _repr_html_(self): return '<b>t</b>'\n    def __repr__(self): return 'T()'\ndisplay(T())\n{'a': [1, 2]}";
    let v = cell(&p, &id, rich, None).await;
    assert_eq!(
        v["results"],
        json!([{"text/plain": "T()", "text/html": "<b>t</b>"}, {"text/plain": "{'a': [1, 2]}"}])
    );
    // An error: name, value, traceback; the context lives on.
    let v = cell(&p, &id, "print('before'); undefined_name", None).await;
    assert_eq!(v["error"]["name"], "NameError", "{v}");
    assert_eq!(v["stdout"], "before\n");
    assert!(v["stderr"].as_str().unwrap().contains("NameError"));
    assert_eq!(
        cell(&p, &id, "x", None).await["results"][0]["text/plain"],
        "41"
    );
    // A cell past its timeout is interrupted; the state stays.
    let v = cell(
        &p,
        &id,
        "import time\ny = 1\nwhile True: time.sleep(0.05)",
        Some("1s"),
    )
    .await;
    assert_eq!(v["error"]["name"], "TimeoutError", "{v}");
    assert_eq!(
        cell(&p, &id, "x + y", None).await["results"][0]["text/plain"],
        "42"
    );
    // Restart clears it.
    let r = p
        .post_json(&format!("/api/contexts/{id}/restart"), json!({}))
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(cell(&p, &id, "x", None).await["error"]["name"], "NameError");
    // Output streams as NDJSON events, ending with `end`.
    let r = p
        .send(
            authed(Request::post(format!("/api/contexts/{id}/execute")))
                .header("accept", "application/x-ndjson")
                .header("content-type", "application/json")
                .body(Body::from(
                    json!({"code": "print(1); print(2, file=__import__('sys').stderr); 3"})
                        .to_string(),
                ))
                .unwrap(),
        )
        .await;
    let events: Vec<Value> = r
        .text()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert!(
        kinds.contains(&"stdout") && kinds.contains(&"stderr"),
        "{events:?}"
    );
    assert_eq!(kinds[kinds.len() - 2..], ["result", "end"], "{events:?}");
    assert_eq!(events.last().unwrap()["exit_code"], 0);
}

/// A timeout's interrupt that lands while the shell itself is busy (here a builtin loop; on a
/// loaded machine, before the cell's command has even started) is repeated until the command
/// stops, so the context keeps its state instead of being restarted after the grace.
#[tokio::test]
async fn an_interrupt_that_lands_before_the_command_starts_is_repeated() {
    let p = Picod::new();
    let id = context(&p, "bash").await;
    cell(&p, &id, "X=7", None).await;
    let busy_then_sleep = "end=$(( ${EPOCHREALTIME/./} + 1500000 )); \
        while (( ${EPOCHREALTIME/./} < end )); do :; done; sleep 30";
    let started = std::time::Instant::now();
    let v = cell(&p, &id, busy_then_sleep, Some("1s")).await;
    assert_ne!(v["exit_code"], 0, "{v}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(4),
        "stopped by a repeated interrupt, not by the 5 s grace: {:?}",
        started.elapsed()
    );
    assert_eq!(cell(&p, &id, "echo $X", None).await["stdout"], "7\n");
}

#[tokio::test]
async fn bash_contexts_keep_directory_and_variables_and_limits_hold() {
    let p = Picod::new();
    let id = context(&p, "bash").await;
    cell(&p, &id, "mkdir -p sub && cd sub; X=5", None).await;
    let v = cell(&p, &id, "basename \"$PWD\"; echo $X", None).await;
    assert_eq!(v["stdout"], "sub\n5\n");
    let v = cell(&p, &id, "echo no >&2; false", None).await;
    assert_eq!(
        (v["exit_code"].clone(), v["error"]["name"].clone()),
        (json!(1), json!("ExitStatus"))
    );
    assert_eq!(v["stderr"], "no\n");
    // Interrupting a long command keeps the shell (and its variables).
    let v = cell(&p, &id, "sleep 30", Some("1s")).await;
    assert_ne!(v["exit_code"], 0);
    assert_eq!(cell(&p, &id, "echo $X", None).await["stdout"], "5\n");
    // Limits, errors.
    let mut ids = vec![id];
    for _ in 1..agentcube_picod::context::MAX_CONTEXTS {
        ids.push(context(&p, "bash").await);
    }
    let over = p
        .post_json("/api/contexts", json!({"language": "bash"}))
        .await;
    assert_eq!(over.status, StatusCode::TOO_MANY_REQUESTS);
    let bad = p
        .post_json("/api/contexts", json!({"language": "cobol"}))
        .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        p.get("/api/contexts")
            .await
            .json()
            .as_array()
            .unwrap()
            .len(),
        ids.len()
    );
    // Deleted by DELETE (direct callers) and by POST …/delete (the way through the Router).
    for (i, id) in ids.iter().enumerate() {
        let r = if i % 2 == 0 {
            p.send(
                authed(Request::delete(format!("/api/contexts/{id}")))
                    .body(Body::empty())
                    .unwrap(),
            )
            .await
        } else {
            p.post_json(&format!("/api/contexts/{id}/delete"), json!({}))
                .await
        };
        assert_eq!(r.status, StatusCode::OK);
    }
    assert_eq!(p.get("/api/contexts").await.json(), json!([]));
    let gone = p
        .post_json(
            &format!("/api/contexts/{}/execute", ids[0]),
            json!({"code": "true"}),
        )
        .await;
    assert_eq!(gone.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn a_matplotlib_figure_comes_back_as_a_png() {
    use base64::Engine;
    let p = Picod::new();
    // The interpreter sandboxes run: Debian's, where `make test` installs matplotlib.
    let r = p
        .post_json(
            "/api/contexts",
            json!({"language": "python", "env": {"PATH": "/usr/bin:/bin"}}),
        )
        .await;
    let id = r.json()["id"].as_str().unwrap().to_string();
    let code =
        "import matplotlib.pyplot as plt\nplt.plot([1, 2, 3], [1, 4, 9])\nplt.title('squares')";
    let v = cell(&p, &id, code, Some("60s")).await;
    assert_eq!(v["error"], Value::Null, "{v}");
    let png = v["results"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|r| r["image/png"].as_str())
        .unwrap_or_else(|| panic!("no image/png result: {v}"));
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(png)
        .unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "a PNG");
    assert!(bytes.len() > 1000);
    // The figure was closed: the next cell returns none.
    let v = cell(&p, &id, "1", None).await;
    assert_eq!(v["results"], json!([{"text/plain": "1"}]));
}

#[tokio::test]
async fn contexts_are_the_kernels_first_choice_when_memory_runs_out() {
    let p = Picod::new();
    let id = context(&p, "bash").await;
    let v = cell(&p, &id, "cat /proc/self/oom_score_adj", None).await;
    assert_eq!(v["stdout"], "1000\n", "{v}");
}
