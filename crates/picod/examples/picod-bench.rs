//! PicoD benchmark: prints ratios against baselines measured in the same run. Never fails on
//! numbers; it reports them.
//!
//! Usage: `picod-bench [PATH_TO_PICOD]` (default `target/release/picod`). `make bench` builds and runs it.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use jsonwebtoken::{Algorithm, EncodingKey, Header};

const KEY: &str = include_str!("../tests/data/router.key.pem");
const PUB: &str = include_str!("../tests/data/router.pub.pem");
const ROUNDS: usize = 300;

/// Kills and reaps the child on every exit path.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn pct(mut v: Vec<Duration>, p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let bin = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "target/release/picod".into());
    let dir = tempfile::tempdir()?;
    let sock = dir.path().join("picod.sock");

    // Start-to-healthy, several times.
    let mut starts = Vec::new();
    let mut child: Option<Reaped> = None;
    for _ in 0..10 {
        drop(child.take());
        let t0 = Instant::now();
        let c = Reaped(
            Command::new(&bin)
                .arg(format!("--listen=unix:{}", sock.display()))
                .arg(format!("--workspace={}", dir.path().join("ws").display()))
                .env("PICOD_AUTH_PUBLIC_KEY", PUB)
                .env("RUST_LOG", "warn")
                .stderr(Stdio::null())
                .spawn()?,
        );
        loop {
            if let Ok((200, _)) = request(&sock, "GET", "/health", None).await {
                break;
            }
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
        starts.push(t0.elapsed());
        child = Some(c);
    }
    let child = child.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.0.id()))?;
    let kib = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let (rss_kib, anon_kib) = (kib("VmRSS:"), kib("RssAnon:"));

    // Execute round trip vs bare spawn+wait of the same argv.
    let claims = serde_json::json!({"iss": "agentcube-router", "iat": jiff::Timestamp::now().as_second(),
        "exp": jiff::Timestamp::now().as_second() + 600, "session_id": "bench"});
    let token = jsonwebtoken::encode(
        &Header::new(Algorithm::RS256),
        &claims,
        &EncodingKey::from_rsa_pem(KEY.as_bytes())?,
    )?;
    let body = r#"{"command":["echo","hi"]}"#;
    let (mut send, _conn) = connect(&sock).await?;
    let mut exec = Vec::with_capacity(ROUNDS);
    let mut spawn = Vec::with_capacity(ROUNDS);
    for i in 0..ROUNDS + 20 {
        let t0 = Instant::now();
        let req = hyper::Request::post("/api/execute")
            .header("host", "picod")
            .header("authorization", format!("Bearer {token}"))
            .body(Full::from(body))?;
        let resp = send.send_request(req).await?;
        let out = resp.into_body().collect().await?.to_bytes();
        let d = t0.elapsed();
        assert!(out.windows(2).any(|w| w == b"hi"), "unexpected reply");
        let t1 = Instant::now();
        let o = tokio::process::Command::new("echo")
            .arg("hi")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .await?;
        let s = t1.elapsed();
        assert_eq!(o.stdout, b"hi\n");
        if i >= 20 {
            exec.push(d);
            spawn.push(s);
        }
    }
    // Memory after moving a large file each way (it must go back to near idle).
    let big = vec![7u8; 30 << 20];
    let boundary = "agentcube-bench-boundary";
    let mut body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"path\"\r\n\r\nbig.bin\r\n\
         --{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.bin\"\r\n\
         Content-Type: application/octet-stream\r\n\r\n"
    )
    .into_bytes();
    body.extend_from_slice(&big);
    body.extend(format!("\r\n--{boundary}--\r\n").into_bytes());
    let req = hyper::Request::post("/api/files")
        .header("host", "picod")
        .header("authorization", format!("Bearer {token}"))
        .header(
            "content-type",
            format!("multipart/form-data; boundary={boundary}"),
        )
        .body(Full::from(body))?;
    let resp = send.send_request(req).await?;
    anyhow::ensure!(resp.status() == 200, "upload answered {}", resp.status());
    resp.into_body().collect().await?;
    let req = hyper::Request::get("/api/files/big.bin")
        .header("host", "picod")
        .header("authorization", format!("Bearer {token}"))
        .body(Full::default())?;
    let got = send
        .send_request(req)
        .await?
        .into_body()
        .collect()
        .await?
        .to_bytes();
    anyhow::ensure!(
        got.len() == big.len(),
        "download returned {} bytes",
        got.len()
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.0.id()))?;
    let after_kib = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .unwrap_or(0);
    drop(child);

    let (e50, s50) = (pct(exec.clone(), 0.5), pct(spawn.clone(), 0.5));
    println!("PicoD benchmark ({ROUNDS} rounds, Unix socket, keep-alive)");
    println!("{:<44} {:>12} {:>12}", "metric", "value", "goal");
    println!(
        "{:<44} {:>10.0}µs {:>12}",
        "execute `echo hi` round trip p50",
        us(e50),
        ""
    );
    println!(
        "{:<44} {:>10.0}µs {:>12}",
        "execute `echo hi` round trip p99",
        us(pct(exec, 0.99)),
        ""
    );
    println!(
        "{:<44} {:>10.0}µs {:>12}",
        "bare spawn+wait `echo hi` p50",
        us(s50),
        ""
    );
    println!(
        "{:<44} {:>12.2} {:>12}",
        "ratio execute / bare spawn (p50)",
        e50.as_secs_f64() / s50.as_secs_f64(),
        "<= 1.5"
    );
    println!(
        "{:<44} {:>9.2}MiB {:>12}",
        "idle RSS (VmRSS)",
        rss_kib as f64 / 1024.0,
        "<= 5 MiB"
    );
    println!(
        "{:<44} {:>9.2}MiB {:>12}",
        "idle private anonymous memory (RssAnon)",
        anon_kib as f64 / 1024.0,
        ""
    );
    println!(
        "{:<44} {:>9.2}MiB {:>12}",
        "VmRSS after a 30 MiB upload and download",
        after_kib as f64 / 1024.0,
        "near idle"
    );
    println!(
        "(VmRSS includes file pages of the binary and libc shared with the page cache; RssAnon is PicoD's own.)"
    );
    println!(
        "{:<44} {:>10.1}ms {:>12}",
        "start-to-healthy p50 (10 starts)",
        pct(starts.clone(), 0.5).as_secs_f64() * 1e3,
        ""
    );
    println!(
        "{:<44} {:>10.1}ms {:>12}",
        "start-to-healthy max",
        pct(starts, 1.0).as_secs_f64() * 1e3,
        ""
    );
    Ok(())
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn connect(sock: &std::path::Path) -> anyhow::Result<(Sender, tokio::task::JoinHandle<()>)> {
    let stream = tokio::net::UnixStream::connect(sock).await?;
    let (send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    let h = tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok((send, h))
}

async fn request(
    sock: &std::path::Path,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> anyhow::Result<(u16, Bytes)> {
    let (mut send, _h) = connect(sock).await?;
    let req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "picod")
        .body(Full::from(body.unwrap_or("").to_string()))?;
    let resp = send.send_request(req).await?;
    let status = resp.status().as_u16();
    Ok((status, resp.into_body().collect().await?.to_bytes()))
}
