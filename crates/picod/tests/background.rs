//! Background processes (`/api/processes`): start, talk to stdin, read output with resume and
//! follow, signals, limits, errors in PicoD's shape. Real processes.

mod common;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use common::*;
use serde_json::{Value, json};

fn lines(r: &Resp) -> Vec<Value> {
    r.text()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn data(lines: &[Value]) -> String {
    lines.iter().filter_map(|l| l["data"].as_str()).collect()
}

async fn start(p: &Picod, command: Value) -> String {
    let r = p
        .post_json("/api/processes", json!({"command": command}))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let v = r.json();
    assert!(v["pid"].as_u64().unwrap() > 0);
    v["id"].as_str().unwrap().to_string()
}

async fn raw_post(p: &Picod, path: &str, body: &'static [u8]) -> Resp {
    p.send(authed(Request::post(path)).body(Body::from(body)).unwrap())
        .await
}

#[tokio::test]
async fn a_process_outlives_its_request_takes_stdin_and_its_output_can_be_resumed() {
    let p = Picod::new();
    let script = "echo one; read line; echo got:$line; echo oops >&2; exit 3";
    let id = start(&p, json!(["sh", "-c", script])).await;
    // It runs on after the start answered: waiting for stdin.
    let mut first = Vec::new();
    for _ in 0..50 {
        first = lines(&p.get(&format!("/api/processes/{id}/output")).await);
        if data(&first).contains("one") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(data(&first), "one\n");
    assert!(
        first.iter().all(|l| l.get("exit_code").is_none()),
        "still running"
    );
    let listed = p.get("/api/processes").await.json();
    assert_eq!(listed[0]["running"], true);
    assert_eq!(listed[0]["command"], json!(["sh", "-c", script]));
    let r = raw_post(&p, &format!("/api/processes/{id}/stdin"), b"hello\n").await;
    assert_eq!(r.json(), json!({"written": 6}));
    // Follow from after what we saw: the rest, then the exit code, then the end.
    let since = first.last().unwrap()["seq"].as_u64().unwrap() + 1;
    let rest = lines(
        &p.get(&format!(
            "/api/processes/{id}/output?since={since}&follow=true"
        ))
        .await,
    );
    assert_eq!(rest.last().unwrap(), &json!({"exit_code": 3}));
    let text = data(&rest);
    assert!(
        text.contains("got:hello\n") && text.contains("oops\n"),
        "{rest:?}"
    );
    assert!(
        rest.iter()
            .any(|l| l["stream"] == "stderr" && l["data"] == "oops\n")
    );
    // A client that comes back later from the start loses nothing.
    let again = lines(&p.get(&format!("/api/processes/{id}/output?since=0")).await);
    assert_eq!(data(&again), format!("one\n{text}"));
    assert_eq!(p.get("/api/processes").await.json()[0]["exit_code"], 3);
}

#[tokio::test]
async fn signals_reach_the_group_and_limits_and_errors_are_clear() {
    let p = Picod::new();
    let id = start(&p, json!(["sh", "-c", "sleep 30 & sleep 30; echo never"])).await;
    let r = p
        .post_json(
            &format!("/api/processes/{id}/signal"),
            json!({"signal": "KILL"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let out = lines(
        &p.get(&format!("/api/processes/{id}/output?follow=true"))
            .await,
    );
    assert_eq!(out.last().unwrap(), &json!({"exit_code": -1}));
    assert!(!data(&out).contains("never"));
    // Errors in PicoD's shape.
    let bad = p
        .post_json(
            &format!("/api/processes/{id}/signal"),
            json!({"signal": "HUP"}),
        )
        .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert!(
        bad.json()["error"]
            .as_str()
            .unwrap()
            .contains("INT, TERM or KILL")
    );
    let missing = p.get("/api/processes/nope/output").await;
    assert_eq!(
        (missing.status, missing.json()["error"].clone()),
        (StatusCode::NOT_FOUND, json!("process not found"))
    );
    let empty = p.post_json("/api/processes", json!({"command": []})).await;
    assert_eq!(empty.status, StatusCode::BAD_REQUEST);
    let closed = raw_post(&p, &format!("/api/processes/{id}/stdin/close"), b"").await;
    assert_eq!(closed.status, StatusCode::OK);
    let write = raw_post(&p, &format!("/api/processes/{id}/stdin"), b"x").await;
    assert_eq!(write.status, StatusCode::BAD_REQUEST, "{}", write.text());
    // At most 16 running at once.
    let mut ids = Vec::new();
    for _ in 0..agentcube_picod::process::MAX_RUNNING {
        ids.push(start(&p, json!(["sleep", "30"])).await);
    }
    let over = p
        .post_json("/api/processes", json!({"command": ["sleep", "30"]}))
        .await;
    assert_eq!(
        over.status,
        StatusCode::TOO_MANY_REQUESTS,
        "{}",
        over.text()
    );
    assert_eq!(over.json()["code"], 429);
    for id in &ids {
        p.post_json(
            &format!("/api/processes/{id}/signal"),
            json!({"signal": "TERM"}),
        )
        .await;
    }
    // Without a token: refused like every API route.
    let r = p
        .send(Request::get("/api/processes").body(Body::empty()).unwrap())
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn background_processes_are_the_kernels_first_choice_when_memory_runs_out() {
    let p = Picod::new();
    let id = start(
        &p,
        json!(["sh", "-c", "sleep 0.3; cat /proc/self/oom_score_adj"]),
    )
    .await;
    let out = lines(
        &p.get(&format!("/api/processes/{id}/output?since=0&follow=true"))
            .await,
    );
    assert_eq!(data(&out), "1000\n", "{out:?}");
}
