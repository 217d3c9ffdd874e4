//! `test-cluster` — TEST AND DEVELOPMENT SUPPORT ONLY, never shipped: a real control plane with
//! the agent-sandbox controller and the process kubelet, in the foreground.
//!
//! Prints `test-cluster ready: kubeconfig=<path>` once the cluster serves and its node is
//! registered; stops everything on SIGINT/SIGTERM (or, with `--stdin`, when standard input
//! closes) and prints `test-cluster stopped; N pod processes killed`.

use std::path::PathBuf;

use agentcube_test_cluster::{Cluster, ClusterConfig};
use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    name = "test-cluster",
    about = "A real Kubernetes control plane with a process kubelet (test support)"
)]
struct Args {
    /// Cluster state (certificates, etcd, logs, pod directories); removed on exit unless --keep.
    #[arg(long)]
    state_dir: PathBuf,
    /// This repository's binaries, which images map to (picod, router, workload-manager).
    #[arg(long, default_value = "target/debug")]
    bin_dir: PathBuf,
    /// Map an image to a host program: `NAME=PATH` (repeatable; NAME as in `ghcr.io/x/NAME:tag`).
    #[arg(long = "image", value_name = "NAME=PATH")]
    images: Vec<String>,
    /// Also stop when standard input closes.
    #[arg(long)]
    stdin: bool,
    /// Keep the state directory.
    #[arg(long)]
    keep: bool,
}

/// Removes the state directory when it holds only what a cluster puts there (so a mistaken
/// `--state-dir` never deletes anything else).
fn remove_state_dir(dir: &std::path::Path) {
    const OURS: [&str; 3] = ["control-plane", "node", "test-cluster.log"];
    let entries: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    if entries.iter().all(|e| OURS.contains(&e.as_str())) {
        let _ = std::fs::remove_dir_all(dir);
    } else {
        for e in ["control-plane", "node"] {
            let _ = std::fs::remove_dir_all(dir.join(e));
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    std::fs::create_dir_all(&args.state_dir)?;
    let state_dir = std::fs::canonicalize(&args.state_dir)?;
    let bin_dir = std::fs::canonicalize(&args.bin_dir)?;
    let mut config = ClusterConfig::new(&state_dir, &bin_dir);
    for spec in &args.images {
        let (name, path) = spec
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("--image {spec}: expected NAME=PATH"))?;
        let rule = agentcube_test_cluster::kubelet::images::Image {
            name: name.into(),
            aliases: Vec::new(),
            binary: Some(std::fs::canonicalize(path)?),
            path: format!("/usr/local/bin/{name}"),
            entrypoint: vec![format!("/usr/local/bin/{name}")],
            cmd: Vec::new(),
            env: Vec::new(),
        };
        config.kubelet.images.rules.insert(0, rule);
    }
    let started = std::time::Instant::now();
    let cluster = Cluster::start(config).await?;
    tracing::info!(secs = started.elapsed().as_secs_f64(), "cluster up");
    println!(
        "test-cluster ready: kubeconfig={}",
        cluster.control_plane.kubeconfig.display()
    );
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let stdin_closed = async {
        if args.stdin {
            let mut buf = [0u8; 64];
            let mut stdin = tokio::io::stdin();
            use tokio::io::AsyncReadExt;
            while !matches!(stdin.read(&mut buf).await, Ok(0) | Err(_)) {}
        } else {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term.recv() => {},
        () = stdin_closed => {},
    }
    let killed = cluster.stop(args.keep).await;
    if !args.keep {
        remove_state_dir(&state_dir);
    }
    println!("test-cluster stopped; {killed} pod processes killed");
    Ok(())
}
