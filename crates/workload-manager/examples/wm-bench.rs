//! Workload Manager benchmark (local backend, real bubblewrap sandboxes). Prints; never fails.
//!
//! - warm claim latency p50/p99 (session from a warm pool) vs cold create, and their ratio;
//! - GC deletions per second.
//!
//! Usage: `wm-bench PICOD_BINARY` (`make bench` builds and passes it).

use std::sync::Arc;
use std::time::{Duration, Instant};

use agentcube_types::api::{CreateSandboxRequest, WorkloadKind};
use agentcube_workload_manager::backend::local::{LocalBackend, LocalConfig};
use agentcube_workload_manager::{Config, WorkloadManager};

const DEFS: &str = "apiVersion: runtime.agentcube.volcano.sh/v1alpha1
kind: CodeInterpreter
metadata: {name: warm, namespace: default}
spec: {template: {image: picod}, warmPoolSize: 10}
---
apiVersion: runtime.agentcube.volcano.sh/v1alpha1
kind: CodeInterpreter
metadata: {name: cold, namespace: default}
spec: {template: {image: picod}, sessionTimeout: 1s}
";

fn pct(v: &[Duration], p: f64) -> Duration {
    let mut v = v.to_vec();
    v.sort();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let picod = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "target/release/picod".into());
    let dir = tempfile::tempdir()?;
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )?;
    std::fs::create_dir_all(dir.path().join("m"))?;
    std::fs::write(dir.path().join("m/defs.yaml"), DEFS)?;
    let mut local = LocalConfig::new(dir.path().join("state"), picod.into());
    // 90 sandboxes at once: PicoD needs a few MiB, not the default 1 GiB limit each.
    local.default_memory_bytes = Some(64 << 20);
    // …and their workspaces are reserved on the disk: a few MiB each, not the default 2 GiB.
    local.default_workspace_bytes = Some(16 << 20);
    let backend = LocalBackend::new(local).map_err(anyhow::Error::msg)?;
    let store = Arc::new(agentcube_store::MemoryStore::new());
    let pair_pub = include_str!("../../picod/tests/data/router.pub.pem");
    let platform = backend
        .clone()
        .platform(
            Some(dir.path().join("m")),
            Duration::from_secs(2),
            Some(pair_pub.into()),
        )
        .await
        .map_err(anyhow::Error::msg)?;
    let wm = WorkloadManager::start(Config::default(), store, platform).await?;
    let m = wm.manager.clone();
    let req = |name: &str| CreateSandboxRequest {
        kind: None,
        name: name.into(),
        namespace: "default".into(),
        ttl: None,
    };
    let pool_ready = || backend.pool_status().first().map_or(0, |p| p.ready);

    let mut warm = Vec::new();
    for _ in 0..40 {
        while pool_ready() == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let t0 = Instant::now();
        let s = m
            .create(
                WorkloadKind::CodeInterpreter,
                req("warm"),
                Default::default(),
            )
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        warm.push(t0.elapsed());
        m.delete(WorkloadKind::CodeInterpreter, &s.session_id, None)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    let mut cold = Vec::new();
    let mut ids = Vec::new();
    for _ in 0..40 {
        let t0 = Instant::now();
        let s = m
            .create(
                WorkloadKind::CodeInterpreter,
                req("cold"),
                Default::default(),
            )
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        cold.push(t0.elapsed());
        ids.push(s.session_id);
    }
    let gc = agentcube_workload_manager::gc::Gc {
        manager: m.clone(),
        interval: Duration::from_secs(3600),
        limit: 1000,
    };
    let t0 = Instant::now();
    let deleted = gc
        .run_once(jiff::Timestamp::now() + jiff::SignedDuration::from_secs(10))
        .await;
    let gc_time = t0.elapsed();

    println!("Workload Manager benchmark (local backend, bubblewrap sandboxes, in-process API)");
    println!("{:<44} {:>10} {:>10}", "metric", "value", "goal");
    println!(
        "{:<44} {:>8.2}ms {:>10}",
        "warm claim p50",
        ms(pct(&warm, 0.5)),
        "<= 20ms"
    );
    println!("{:<44} {:>8.2}ms", "warm claim p99", ms(pct(&warm, 0.99)));
    println!("{:<44} {:>8.2}ms", "cold create p50", ms(pct(&cold, 0.5)));
    println!("{:<44} {:>8.2}ms", "cold create p99", ms(pct(&cold, 0.99)));
    println!(
        "{:<44} {:>10.3} {:>10}",
        "warm ÷ cold (p50)",
        pct(&warm, 0.5).as_secs_f64() / pct(&cold, 0.5).as_secs_f64(),
        "<= 0.1"
    );
    println!(
        "{:<44} {:>8.0}/s {:>10}",
        format!("GC deletions per second ({deleted} sandboxes)"),
        deleted as f64 / gc_time.as_secs_f64(),
        ">= 100/s"
    );
    wm.shutdown().await;
    Ok(())
}
