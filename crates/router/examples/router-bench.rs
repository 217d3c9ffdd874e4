//! Router benchmark. Prints a table from one run; never fails on numbers.
//!
//! Same-run baselines: a direct connection to PicoD, and nginx `proxy_pass` to the same PicoD.
//! Load: open-loop at a fixed rate (default 2000 rps) over keep-alive connections, echo-sized
//! requests (`GET /health` through the invocation URL), then `wrk` for saturation throughput.
//!
//! Usage: `router-bench PICOD_BINARY` (`make bench` builds and passes it).

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentcube_router::{Config, KeyPair, RouterService};
use agentcube_store::SessionStore;
use agentcube_types::{EntryPoint, GoDuration, SessionRecord, SessionStatus};
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

const RATE: u64 = 2000;
const SECONDS: u64 = 5;

struct Reaped(Child);
impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn wait_up(url: &str) {
    let c: Client<HttpConnector, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    for _ in 0..500 {
        if let Ok(r) = c.get(url.parse().unwrap()).await
            && r.status().is_success()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{url} did not come up");
}

/// Open-loop load at `rate` rps for `secs`; returns sorted latencies.
async fn fixed_rate(url: &str, session: Option<&str>, rate: u64, secs: u64) -> Vec<Duration> {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    let client: Client<HttpConnector, Empty<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(64)
        .build(http);
    let total = rate * secs;
    let interval = Duration::from_nanos(1_000_000_000 / rate);
    let start = tokio::time::Instant::now();
    let mut handles = Vec::with_capacity(total as usize);
    for i in 0..total {
        tokio::time::sleep_until(start + interval * i as u32).await;
        let (client, url, session) = (client.clone(), url.to_string(), session.map(str::to_string));
        handles.push(tokio::spawn(async move {
            let t0 = Instant::now();
            let mut req = hyper::Request::get(url);
            if let Some(s) = session {
                req = req.header("x-agentcube-session-id", s);
            }
            let resp = client
                .request(req.body(Empty::new()).unwrap())
                .await
                .unwrap();
            assert!(resp.status().is_success(), "{}", resp.status());
            let _ = resp.into_body().collect().await.unwrap();
            t0.elapsed()
        }));
    }
    let mut lat = Vec::with_capacity(handles.len());
    for h in handles {
        lat.push(h.await.unwrap());
    }
    lat.sort();
    lat
}

fn pct(v: &[Duration], p: f64) -> Duration {
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn wrk_rps(url: &str, header: Option<&str>) -> Option<f64> {
    let mut cmd = Command::new("wrk");
    cmd.args(["-t2", "-c32", "-d4s", "--latency"]);
    if let Some(h) = header {
        cmd.args(["-H", h]);
    }
    let out = cmd.arg(url).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    text.lines()
        .find(|l| l.starts_with("Requests/sec:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let picod_bin = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "target/release/picod".into());
    let dir = tempfile::tempdir()?;
    let pair = KeyPair::generate()?;
    let picod_port = free_port();
    let _picod = Reaped(
        Command::new(&picod_bin)
            .args([
                "--listen",
                &format!("127.0.0.1:{picod_port}"),
                "--workspace",
            ])
            .arg(dir.path().join("ws"))
            .env("PICOD_AUTH_PUBLIC_KEY", &pair.public_pem)
            .env("RUST_LOG", "warn")
            .stderr(Stdio::null())
            .spawn()?,
    );
    let direct = format!("http://127.0.0.1:{picod_port}/health");
    wait_up(&direct).await;

    // nginx proxy_pass baseline.
    let nginx_port = free_port();
    let conf = dir.path().join("nginx.conf");
    std::fs::create_dir_all(dir.path().join("nginx/logs"))?;
    std::fs::write(
        &conf,
        format!(
            "daemon off; worker_processes 1; error_log stderr crit; pid {pid};\n\
         events {{ worker_connections 1024; }}\n\
         http {{ access_log off; upstream p {{ server 127.0.0.1:{picod_port}; keepalive 64; }}\n\
         server {{ listen 127.0.0.1:{nginx_port}; location / {{ proxy_pass http://p; proxy_http_version 1.1; proxy_set_header Connection \"\"; }} }} }}\n",
            pid = dir.path().join("nginx.pid").display()
        ),
    )?;
    let nginx = Command::new("nginx")
        .arg("-p")
        .arg(dir.path().join("nginx"))
        .arg("-c")
        .arg(&conf)
        .stderr(Stdio::null())
        .spawn()
        .ok()
        .map(Reaped);
    let nginx_url = format!("http://127.0.0.1:{nginx_port}/health");
    if nginx.is_some() {
        wait_up(&nginx_url).await;
    }

    // Router with one session pointing at PicoD.
    let store = Arc::new(agentcube_store::MemoryStore::new());
    let now = jiff::Timestamp::now();
    let mut rec = SessionRecord::placeholder(
        "bench",
        "default",
        "x",
        now,
        now + jiff::SignedDuration::from_hours(1),
        GoDuration::default(),
    );
    rec.status = SessionStatus::Ready;
    rec.entry_points = Some(vec![EntryPoint {
        path: "/".into(),
        protocol: "HTTP".into(),
        endpoint: format!("127.0.0.1:{picod_port}"),
    }]);
    store.insert(&rec, now).await?;
    let mut cfg = Config::new("http://127.0.0.1:9");
    cfg.max_concurrent_requests = 0;
    let service = RouterService::start(&cfg, store.clone() as Arc<dyn SessionStore>, &pair)?;
    let shared = service.shared.clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let router_addr = listener.local_addr()?;
    tokio::spawn(agentcube_router::serve(
        service,
        listener,
        None,
        std::future::pending(),
    ));
    let via = format!(
        "http://{router_addr}/v1/namespaces/default/code-interpreters/ci/invocations/health"
    );

    // Warm up all three paths.
    let _ = fixed_rate(&direct, None, 500, 1).await;
    let _ = fixed_rate(&via, Some("bench"), 500, 1).await;
    let (gets0, sigs0) = (shared.resolver.store_gets(), shared.signer.signatures());
    let d = fixed_rate(&direct, None, RATE, SECONDS).await;
    let r = fixed_rate(&via, Some("bench"), RATE, SECONDS).await;
    let (gets, sigs) = (
        shared.resolver.store_gets() - gets0,
        shared.signer.signatures() - sigs0,
    );
    let n = nginx.as_ref().map(|_| ());
    let ng = if n.is_some() {
        Some(fixed_rate(&nginx_url, None, RATE, SECONDS).await)
    } else {
        None
    };

    let added = |p: f64| pct(&r, p).saturating_sub(pct(&d, p));
    println!(
        "Router benchmark: {RATE} rps for {SECONDS}s per target, keep-alive, GET /health on PicoD"
    );
    println!("{:<52} {:>12} {:>10}", "metric", "value", "goal");
    println!("{:<52} {:>10.0}µs", "direct to PicoD p50", us(pct(&d, 0.5)));
    println!(
        "{:<52} {:>10.0}µs",
        "direct to PicoD p99",
        us(pct(&d, 0.99))
    );
    println!("{:<52} {:>10.0}µs", "via Router p50", us(pct(&r, 0.5)));
    println!("{:<52} {:>10.0}µs", "via Router p99", us(pct(&r, 0.99)));
    println!(
        "{:<52} {:>10.0}µs {:>10}",
        "Router added latency p50",
        us(added(0.5)),
        "<= 100µs"
    );
    println!(
        "{:<52} {:>10.0}µs {:>10}",
        "Router added latency p99",
        us(added(0.99)),
        "<= 500µs"
    );
    if let Some(ng) = &ng {
        let nadd = pct(ng, 0.5).saturating_sub(pct(&d, 0.5));
        println!(
            "{:<52} {:>10.0}µs",
            "nginx proxy_pass added latency p50",
            us(nadd)
        );
        let ratio = added(0.5).as_secs_f64() / nadd.as_secs_f64().max(1e-6);
        println!(
            "{:<52} {:>12.2} {:>10}",
            "Router added ÷ nginx added (p50)", ratio, "<= 1.0"
        );
    } else {
        println!("{:<52} {:>12}", "nginx baseline", "nginx missing");
    }
    let total = (RATE * SECONDS) as f64;
    println!(
        "{:<52} {:>12.4} {:>10}",
        "store round trips per request",
        gets as f64 / total,
        "<= 1"
    );
    println!(
        "{:<52} {:>12.4} {:>10}",
        "RSA signatures per request",
        sigs as f64 / total,
        "0"
    );
    match (
        wrk_rps(&direct, None),
        wrk_rps(&via, Some("x-agentcube-session-id: bench")),
    ) {
        (Some(a), Some(b)) => {
            println!("{:<52} {:>10.0}/s", "saturation direct (wrk -c32)", a);
            println!("{:<52} {:>10.0}/s", "saturation via Router (wrk -c32)", b);
            println!(
                "{:<52} {:>12.2} {:>10}",
                "throughput Router ÷ direct",
                b / a,
                ">= 0.6"
            );
        }
        _ => println!("{:<52} {:>12}", "saturation throughput", "wrk missing"),
    }
    Ok(())
}
