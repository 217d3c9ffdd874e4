//! `fake-cluster` — TEST SUPPORT ONLY, never shipped: the fake API server plus the simulated
//! agent-sandbox controller and kubelet, as one process for the end-to-end suite.
//!
//! Writes a kubeconfig pointing at itself, prints `fake-cluster listening on <url>` once it
//! serves, and on SIGTERM/SIGINT kills every pod process and prints how many.

use std::path::PathBuf;

use agentcube_fake_kube::FakeApiServer;
use agentcube_fake_kube::sim::{SimConfig, Simulation};
use clap::Parser;

/// A fake Kubernetes cluster on this host (test support).
#[derive(Debug, Parser)]
#[command(name = "fake-cluster")]
struct Args {
    /// API server listen address.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: std::net::SocketAddr,
    /// PicoD binary run by pods whose image is `…picod…`.
    #[arg(long)]
    picod: PathBuf,
    /// Pod directories live here.
    #[arg(long)]
    state_dir: PathBuf,
    /// Where to write a kubeconfig for this cluster.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// The bubblewrap binary.
    #[arg(long, default_value = "bwrap")]
    bwrap: PathBuf,
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
    let server = FakeApiServer::bind(args.listen).await?;
    if let Some(path) = &args.kubeconfig {
        std::fs::write(path, server.kubeconfig())?;
    }
    let sim = Simulation::start(
        server.cluster.clone(),
        SimConfig {
            picod: args.picod,
            state_dir: args.state_dir,
            bwrap: args.bwrap,
        },
    )
    .map_err(anyhow::Error::msg)?;
    println!("fake-cluster listening on {}", server.url);
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term.recv() => {},
    }
    let killed = sim.stop().await;
    println!("fake-cluster stopped; {killed} pod processes killed");
    Ok(())
}
