//! `/api/files`: JSON and multipart upload, listing, download with Range, the jail, the 413.

mod common;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use base64::Engine;
use common::*;
use serde_json::json;

fn b64(s: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

fn multipart(fields: &[(&str, Option<&str>, &[u8])]) -> (String, Vec<u8>) {
    let boundary = "XBOUNDARYx";
    let mut body = Vec::new();
    for (name, filename, data) in fields {
        body.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
        match filename {
            Some(f) => body.extend_from_slice(
                format!("Content-Disposition: form-data; name=\"{name}\"; filename=\"{f}\"\r\nContent-Type: application/octet-stream\r\n\r\n").as_bytes(),
            ),
            None => body.extend_from_slice(
                format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n").as_bytes(),
            ),
        }
        body.extend_from_slice(data);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

async fn upload_multipart(p: &Picod, fields: &[(&str, Option<&str>, &[u8])]) -> Resp {
    let (ct, body) = multipart(fields);
    p.send(
        authed(Request::post("/api/files"))
            .header("content-type", ct)
            .body(Body::from(body))
            .unwrap(),
    )
    .await
}

#[tokio::test]
async fn json_upload_writes_the_file_and_reports_it() {
    let p = Picod::new();
    let r = p
        .post_json(
            "/api/files",
            json!({"path": "test_upload.txt", "content": b64(b"hello"), "mode": "0644"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let v = r.json();
    assert_eq!(
        (v["path"].as_str(), v["size"].as_u64(), v["mode"].as_str()),
        (Some("test_upload.txt"), Some(5), Some("-rw-r--r--"))
    );
    v["modified"]
        .as_str()
        .unwrap()
        .parse::<jiff::Timestamp>()
        .unwrap();
    assert_eq!(
        std::fs::read(p.ws().join("test_upload.txt")).unwrap(),
        b"hello"
    );
    // Absolute paths are workspace-relative; parents are created; mode applies on creation.
    let r = p.post_json("/api/files", json!({"path": "/data/x/run.sh", "content": b64(b"#!/bin/sh\necho hi\n"), "mode": "0755"})).await;
    assert_eq!(r.json()["path"], "data/x/run.sh");
    assert_eq!(r.json()["mode"], "-rwxr-xr-x");
    let v = p.exec(json!({"command": ["./data/x/run.sh"]})).await;
    assert_eq!(v["stdout"], "hi\n");
    // Missing mode defaults to 0644.
    let r = p
        .post_json("/api/files", json!({"path": "m.txt", "content": b64(b"m")}))
        .await;
    assert_eq!(r.json()["mode"], "-rw-r--r--");
}

#[tokio::test]
async fn json_upload_refuses_bad_input() {
    let p = Picod::new();
    for body in [
        json!({"path": "a.txt", "content": ""}),
        json!({"path": "a.txt"}),
        json!({"content": b64(b"x")}),
        json!({"path": "", "content": b64(b"x")}),
        json!({"path": "a.txt", "content": "!!!not base64"}),
    ] {
        let r = p.post_json("/api/files", body.clone()).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(r.json()["code"], 400);
    }
    let r = p
        .post_json("/api/files", json!({"path": "a.txt", "content": "!!"}))
        .await;
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap()
            .starts_with("Invalid base64 content")
    );
    assert!(
        !p.ws().join("a.txt").exists(),
        "nothing written on a refused upload"
    );
}

#[tokio::test]
async fn multipart_upload_like_the_sdk() {
    let p = Picod::new();
    let data: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
    let r = upload_multipart(
        &p,
        &[
            ("path", None, b"bin/blob.bin"),
            ("mode", None, b"0600"),
            ("file", Some("blob.bin"), &data),
        ],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["size"], 70_000);
    assert_eq!(r.json()["mode"], "-rw-------");
    assert_eq!(std::fs::read(p.ws().join("bin/blob.bin")).unwrap(), data);
    let r = upload_multipart(&p, &[("file", Some("x"), b"x")]).await;
    assert_eq!(
        r.json(),
        json!({"error": "Missing 'path' field", "code": 400})
    );
    let r = upload_multipart(&p, &[("path", None, b"x")]).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap()
            .starts_with("Failed to get file")
    );
}

#[tokio::test]
async fn download_has_upstream_headers_and_ranges() {
    let p = Picod::new();
    std::fs::create_dir_all(p.ws().join("dir name")).unwrap();
    std::fs::write(p.ws().join("dir name/fib.json"), b"[0,1,1,2,3,5,8]").unwrap();
    let r = p.get("/api/files/dir%20name/fib.json").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body, b"[0,1,1,2,3,5,8]");
    assert_eq!(
        r.header("content-disposition"),
        Some("attachment; filename=\"fib.json\"")
    );
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.header("content-description"), Some("File Transfer"));
    assert_eq!(r.header("content-transfer-encoding"), Some("binary"));
    // Leading slash: workspace-relative.
    assert_eq!(
        p.get("/api/files//dir%20name/fib.json").await.body,
        b"[0,1,1,2,3,5,8]"
    );
    // Range.
    let req = authed(Request::get("/api/files/dir%20name/fib.json"))
        .header("range", "bytes=1-5")
        .body(Body::empty())
        .unwrap();
    let r = p.send(req).await;
    assert_eq!(r.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(r.body, b"0,1,1");
    assert_eq!(r.header("content-range"), Some("bytes 1-5/15"));
    // Unknown extension.
    std::fs::write(p.ws().join("blob.zzz"), b"z").unwrap();
    assert_eq!(
        p.get("/api/files/blob.zzz").await.header("content-type"),
        Some("application/octet-stream")
    );
}

/// Text downloads are gzipped for clients that accept it (the SDK's `requests` always does);
/// binary ones go as they are, with their length and ranges: gzip would cut a download to the
/// encoder's speed and save nothing on data that is compressed already.
#[tokio::test]
async fn only_text_downloads_are_gzipped() {
    let p = Picod::new();
    let text: String = (0..2000).map(|n| format!("{n},{}\n", n * n)).collect();
    std::fs::write(p.ws().join("squares.csv"), &text).unwrap();
    let binary: Vec<u8> = (0..64 * 1024u32)
        .map(|n| (n.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    for name in ["blob.bin", "archive.zip", "no-extension"] {
        std::fs::write(p.ws().join(name), &binary).unwrap();
    }
    let gzip_get = |path: &str| {
        authed(Request::get(path))
            .header("accept-encoding", "gzip")
            .body(Body::empty())
            .unwrap()
    };
    let r = p.send(gzip_get("/api/files/squares.csv")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("content-encoding"), Some("gzip"));
    let mut out = String::new();
    std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(&r.body[..]), &mut out)
        .unwrap();
    assert_eq!(out, text);
    for name in ["blob.bin", "archive.zip", "no-extension"] {
        let r = p.send(gzip_get(&format!("/api/files/{name}"))).await;
        assert_eq!(r.status, StatusCode::OK, "{name}");
        assert_eq!(r.header("content-encoding"), None, "{name}");
        assert_eq!(r.header("content-length"), Some("65536"), "{name}");
        assert_eq!(r.body, binary, "{name}");
    }
}

#[tokio::test]
async fn download_errors() {
    let p = Picod::new();
    let r = p.get("/api/files/nope.txt").await;
    assert_eq!(
        (r.status, r.json()),
        (
            StatusCode::NOT_FOUND,
            json!({"error": "File not found", "code": 404})
        )
    );
    std::fs::create_dir(p.ws().join("d")).unwrap();
    let r = p.get("/api/files/d").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.json()["error"], "Path is a directory, not a file");
}

#[tokio::test]
async fn listing_is_sorted_with_go_modes() {
    let p = Picod::new();
    for n in ["b.txt", "a.txt", "c.py"] {
        std::fs::write(p.ws().join(n), n).unwrap();
    }
    std::fs::create_dir(p.ws().join("sub")).unwrap();
    let r = p.get("/api/files?path=.").await;
    let files = r.json()["files"].as_array().unwrap().clone();
    let names: Vec<_> = files.iter().map(|f| f["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["a.txt", "b.txt", "c.py", "sub"]);
    assert_eq!(files[0]["size"], 5);
    assert_eq!(files[0]["is_dir"], false);
    assert_eq!(files[3]["is_dir"], true);
    assert!(files[3]["mode"].as_str().unwrap().starts_with('d'));
    // Absolute = workspace-relative.
    assert_eq!(
        p.get("/api/files?path=/").await.json()["files"]
            .as_array()
            .unwrap()
            .len(),
        4
    );
    let r = p.get("/api/files").await;
    assert_eq!(
        r.json(),
        json!({"error": "Missing 'path' query parameter", "code": 400})
    );
    let r = p.get("/api/files?path=missing").await;
    assert_eq!(
        r.json(),
        json!({"error": "Directory not found", "code": 404})
    );
}

#[tokio::test]
async fn nothing_escapes_the_workspace() {
    let p = Picod::new();
    let outside = p.dir.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("secret"), "s").unwrap();
    std::os::unix::fs::symlink(&outside, p.ws().join("out")).unwrap();
    std::os::unix::fs::symlink(outside.join("secret"), p.ws().join("secret")).unwrap();
    for path in [
        "/api/files/out/secret",
        "/api/files/secret",
        "/api/files/..%2Foutside%2Fsecret",
    ] {
        assert_eq!(p.get(path).await.status, StatusCode::FORBIDDEN, "{path}");
    }
    assert_eq!(
        p.get("/api/files?path=out").await.status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        p.get("/api/files?path=../outside").await.status,
        StatusCode::FORBIDDEN
    );
    for path in ["out/new.txt", "../outside/new.txt", "secret"] {
        let r = p
            .post_json(
                "/api/files",
                json!({"path": path, "content": b64(b"pwned")}),
            )
            .await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{path}");
        let r = upload_multipart(
            &p,
            &[
                ("path", None, path.as_bytes()),
                ("file", Some("f"), b"pwned"),
            ],
        )
        .await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{path}");
    }
    assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 1);
    assert_eq!(
        std::fs::read_to_string(outside.join("secret")).unwrap(),
        "s"
    );
}

#[tokio::test]
async fn oversized_bodies_get_the_413_json() {
    let p = Picod::new();
    let req = authed(Request::post("/api/files"))
        .header("content-type", "application/json")
        .header("content-length", (32 * 1024 * 1024 + 1).to_string())
        .body(Body::from("{}"))
        .unwrap();
    let r = p.send(req).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(
        r.json(),
        json!({"error": "request body too large", "detail": "maximum allowed size is 33554432 bytes"})
    );
    // A body without Content-Length that grows past the limit is cut off the same way.
    let small = Picod::with(|c| c.max_body_bytes = 1024);
    let big = json!({"path": "big.txt", "content": b64(&[b'x'; 4096])}).to_string();
    let stream = futures_util::stream::iter(
        big.into_bytes()
            .chunks(100)
            .map(|c| Ok::<_, std::io::Error>(c.to_vec()))
            .collect::<Vec<_>>(),
    );
    let req = authed(Request::post("/api/files"))
        .body(Body::from_stream(stream))
        .unwrap();
    let r = small.send(req).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE, "{}", r.text());
    assert_eq!(r.json()["detail"], "maximum allowed size is 1024 bytes");
    let (ct, body) = multipart(&[("path", None, b"m.bin"), ("file", Some("m"), &[0u8; 4096])]);
    let stream = futures_util::stream::iter(vec![Ok::<_, std::io::Error>(body)]);
    let req = authed(Request::post("/api/files"))
        .header("content-type", ct)
        .body(Body::from_stream(stream))
        .unwrap();
    assert_eq!(small.send(req).await.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(!small.ws().join("big.txt").exists() && !small.ws().join("m.bin").exists());
}

#[tokio::test]
async fn special_files_and_bad_paths_are_400_and_never_block() {
    let p = Picod::new();
    nix::unistd::mkfifo(
        &p.ws().join("f"),
        nix::sys::stat::Mode::from_bits_truncate(0o644),
    )
    .unwrap();
    // Nobody ever opens the FIFO's other end: a blocking open would hang these requests.
    let r = tokio::time::timeout(std::time::Duration::from_secs(5), p.get("/api/files/f"))
        .await
        .expect("download of a FIFO must not block");
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text());
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap()
            .contains("not a regular file")
    );
    let r = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        p.post_json("/api/files", json!({"path": "f", "content": b64(b"x")})),
    )
    .await
    .expect("upload onto a FIFO must not block");
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text());
    // The listing still shows it, as a FIFO.
    let files = p.get("/api/files?path=.").await.json()["files"].clone();
    assert_eq!(files[0]["mode"], "prw-r--r--");
    for (path, what) in [
        ("/api/files/a%00b", "NUL byte"),
        (&*format!("/api/files/{}", "n".repeat(300)), "too long"),
    ] {
        let r = p.get(path).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{path}: {}", r.text());
        assert!(
            r.json()["error"].as_str().unwrap().contains(what),
            "{}",
            r.text()
        );
    }
    let r = p
        .post_json(
            "/api/files",
            json!({"path": "x\u{0}y", "content": b64(b"x")}),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text());
}

/// A path no route serves, or a method a route lacks, is answered in PicoD's error shape (an
/// empty body told an SDK user calling `download_file("")` nothing).
#[tokio::test]
async fn unknown_routes_and_methods_answer_in_the_error_shape() {
    let p = Picod::new();
    for path in ["/api/files/", "/api/nothing", "/nothing"] {
        let r = p.get(path).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{path}");
        assert_eq!(
            r.json(),
            json!({"error": format!("no such route: GET {path}"), "code": 404}),
            "{path}"
        );
    }
    let r = p.get("/api/execute").await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(r.header("allow"), Some("POST"));
    assert_eq!(
        r.json(),
        json!({"error": "method GET not allowed on /api/execute", "code": 405})
    );
}

fn streamed(
    query: &str,
    chunks: Vec<std::io::Result<Vec<u8>>>,
    len: Option<usize>,
) -> Request<Body> {
    let mut b = authed(Request::post(format!("/api/files?{query}")))
        .header("content-type", "application/octet-stream");
    if let Some(n) = len {
        b = b.header("content-length", n.to_string());
    }
    b.body(Body::from_stream(futures_util::stream::iter(chunks)))
        .unwrap()
}

/// Names in the workspace's top directory (staging files are hidden, not invisible).
fn top_names(p: &Picod) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(p.ws())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn streamed_uploads_pass_the_body_limit_and_change_nothing_when_cut_short() {
    use std::os::unix::fs::PermissionsExt;
    let p = Picod::with(|c| c.max_body_bytes = 1024);
    // Past the limit, declared and in pieces: written as it comes.
    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let chunks = data.chunks(7000).map(|c| Ok(c.to_vec())).collect();
    let r = p
        .send(streamed(
            "path=d%2Fbig.bin&mode=0600",
            chunks,
            Some(data.len()),
        ))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["path"], "d/big.bin");
    assert_eq!(r.json()["size"], data.len());
    assert_eq!(r.json()["mode"], "-rw-------");
    let on_disk = p.ws().join("d/big.bin");
    assert_eq!(std::fs::read(&on_disk).unwrap(), data);
    assert_eq!(
        std::fs::metadata(&on_disk).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // The same size any other way is still the 413.
    let r = p
        .post_json("/api/files", json!({"path": "j", "content": b64(&data)}))
        .await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    // Cut short: the old file stays as it was and no staging file is left.
    std::fs::write(p.ws().join("keep.txt"), "old").unwrap();
    let cut = vec![
        Ok(vec![b'n'; 5000]),
        Err(std::io::Error::other("client went away")),
    ];
    let r = p.send(streamed("path=keep.txt", cut, None)).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text());
    assert!(
        r.json()["error"].as_str().unwrap().contains("cut short"),
        "{}",
        r.text()
    );
    assert_eq!(
        std::fs::read_to_string(p.ws().join("keep.txt")).unwrap(),
        "old"
    );
    assert_eq!(top_names(&p), ["d", "keep.txt"]);
    // A complete one replaces it; through a symlink only while it stays inside, as any write.
    std::os::unix::fs::symlink("keep.txt", p.ws().join("alias")).unwrap();
    let r = p
        .send(streamed("path=alias", vec![Ok(b"new".to_vec())], None))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["path"], "keep.txt");
    assert_eq!(
        std::fs::read_to_string(p.ws().join("keep.txt")).unwrap(),
        "new"
    );
    assert!(
        std::fs::symlink_metadata(p.ws().join("alias"))
            .unwrap()
            .is_symlink()
    );
    let outside = p.dir.path().join("outside.txt");
    std::fs::write(&outside, "host").unwrap();
    std::os::unix::fs::symlink(&outside, p.ws().join("out")).unwrap();
    let r = p
        .send(streamed("path=out", vec![Ok(b"mine".to_vec())], None))
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.text());
    assert_eq!(std::fs::read_to_string(&outside).unwrap(), "host");
    // A directory made at the path while the body streams (after the path was checked): the
    // same 400 as one there before, and the staged file goes.
    let late = p.ws().join("late");
    let body = futures_util::StreamExt::map(futures_util::stream::iter(0..2), move |i| {
        if i == 1 {
            std::fs::create_dir(&late).unwrap();
        }
        Ok::<_, std::io::Error>(vec![b'x'; 100])
    });
    let r = p
        .send(
            authed(Request::post("/api/files?path=late"))
                .header("content-type", "application/octet-stream")
                .body(Body::from_stream(body))
                .unwrap(),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text());
    assert_eq!(r.json()["error"], "Path is a directory, not a file");
    // Bad targets, in PicoD's error shape, leaving nothing behind.
    for (query, status) in [
        ("path=..%2F..%2Fescape", StatusCode::FORBIDDEN),
        ("path=d", StatusCode::BAD_REQUEST),
        ("path=", StatusCode::BAD_REQUEST),
        ("mode=0644", StatusCode::BAD_REQUEST),
    ] {
        let r = p.send(streamed(query, vec![Ok(b"x".to_vec())], None)).await;
        assert_eq!(r.status, status, "{query}: {}", r.text());
        assert!(r.json()["error"].is_string(), "{query}: {}", r.text());
    }
    assert_eq!(top_names(&p), ["alias", "d", "keep.txt", "late", "out"]);
    assert!(!p.dir.path().join("escape").exists());
}
