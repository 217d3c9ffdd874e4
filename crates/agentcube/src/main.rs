//! `agentcube`: the embedded default.
//!
//! Main flow of `agentcube up`:
//! 1. Pick the store (in-memory unless `--store redis://…`) and generate the Router's RSA key in
//!    memory.
//! 2. Start the Workload Manager on the local (bubblewrap) backend with the manifest directory,
//!    injecting the Router's public key into sandboxes; serve its API.
//! 3. Start the Router pointing at it; serve.
//! 4. Print the URLs and `export` lines (with `AGENTCUBE_AUTH_TOKEN` when both servers require a
//!    token: always on a non-loopback `--bind`), and warm-pool progress until the pools are full.
//! 5. On Ctrl-C / SIGTERM: stop serving, remove every sandbox, exit.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use agentcube_router::{KeyPair, RouterService};
use agentcube_store::StoreArgs;
use agentcube_types::GoDuration;
use agentcube_workload_manager::WorkloadManager;
use agentcube_workload_manager::backend::local::{LocalBackend, LocalDefaults};
use agentcube_workload_manager::backend::{PoolLevel, WarmPools};
use agentcube_workload_manager::lease::StoreLease;
use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "agentcube", version, about = "AgentCube on one machine")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run Router + Workload Manager + store in this process, sandboxes on this host.
    Up(UpArgs),
}

#[derive(Debug, clap::Args)]
struct UpArgs {
    /// Directory of CodeInterpreter / AgentRuntime manifests (reloaded on change).
    #[arg(long, env = "AGENTCUBE_MANIFESTS", default_value = "examples")]
    manifests: PathBuf,
    /// Address to listen on.
    #[arg(long, env = "AGENTCUBE_BIND", default_value = "127.0.0.1")]
    bind: IpAddr,
    /// Router port.
    #[arg(long, env = "AGENTCUBE_ROUTER_PORT", default_value_t = 8081)]
    router_port: u16,
    /// Workload Manager port.
    #[arg(long, env = "AGENTCUBE_WM_PORT", default_value_t = 8080)]
    wm_port: u16,
    /// Keep the Router's key pair in this directory (`private.pem`, `public.pem`; created on
    /// first start) instead of a fresh in-memory key: sandbox tokens can then be verified, or
    /// signed, outside this process.
    #[arg(long, env = "AGENTCUBE_IDENTITY_DIR")]
    identity_dir: Option<PathBuf>,
    /// GC interval (Go duration).
    #[arg(long, env = "AGENTCUBE_GC_INTERVAL", default_value_t = GoDuration(agentcube_workload_manager::DEFAULT_GC_INTERVAL))]
    gc_interval: GoDuration,
    /// Port of the admin listener serving `/metrics` (Router and Workload Manager); 0 disables it.
    #[arg(long, env = "AGENTCUBE_METRICS_PORT", default_value_t = 8082)]
    metrics_port: u16,
    /// Bearer token required by the Router and the Workload Manager. Unset: none on a loopback
    /// `--bind`; on any other address one is generated and printed (never an open port).
    #[arg(long, env = "AGENTCUBE_AUTH_TOKEN", hide_env_values = true)]
    auth_token: Option<String>,
    /// Concurrent proxied requests at the Router; 0 means unlimited.
    #[arg(
        long,
        env = "AGENTCUBE_MAX_CONCURRENT_REQUESTS",
        default_value_t = 1000
    )]
    max_concurrent_requests: usize,
    #[command(flatten)]
    store: StoreArgs,
    #[command(flatten)]
    limits: agentcube_serve::LimitArgs,
    #[command(flatten)]
    admission: agentcube_workload_manager::sessions::AdmissionArgs,
    #[command(flatten)]
    local: agentcube_workload_manager::backend::local::LocalArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Descriptors inherited from whoever started us must not reach sandboxes or the commands
    // they run: everything above stderr becomes close-on-exec.
    close_fds::set_fds_cloexec_threadsafe(3, &[]);
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,agentcube=info"));
    tracing_subscriber::fmt()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Up(args) => up(args).await,
    }
}

/// The token both servers require: the given one, else a new one when `--bind` is not loopback
/// (sandboxes run code for whoever reaches these ports), else none.
fn auth_token(args: &UpArgs) -> Option<String> {
    let given = args.auth_token.clone().filter(|t| !t.is_empty());
    if given.is_some() || args.bind.is_loopback() {
        return given;
    }
    let (a, b) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
    Some(format!("{}{}", a.simple(), b.simple()))
}

async fn up(args: UpArgs) -> anyhow::Result<()> {
    if !args.manifests.is_dir() {
        anyhow::bail!(
            "manifest directory {} not found (run from the repository root, or pass --manifests DIR)",
            args.manifests.display()
        );
    }
    let store_config = args.store.clone().into_config(true)?;
    let store = agentcube_store::connect(&store_config)?;
    if let Err(e) = store.ping().await {
        let what = e.said_to("agentcube up");
        return Err(anyhow::Error::new(e).context(what));
    }
    // Every listener first: a port in use stops the start before any sandbox is made (a failed
    // start left its warm pool's mounts and cgroups to the next start with its --state-dir).
    let wm_listener = agentcube_serve::listen((args.bind, args.wm_port)).await?;
    let router_listener = agentcube_serve::listen((args.bind, args.router_port)).await?;
    let metrics_listener = agentcube_serve::listen_admin((args.bind, args.metrics_port)).await?;
    let identity = match &args.identity_dir {
        Some(dir) => KeyPair::load_or_create(dir)
            .with_context(|| format!("Router identity in {}", dir.display()))?,
        None => KeyPair::generate()?,
    };
    let defaults = LocalDefaults {
        exe: std::env::current_exe()?,
        state_dir: std::env::temp_dir().join("agentcube-state"),
        tool_path: std::env::var_os("PATH"),
        docker_config: agentcube_workload_manager::backend::local::image::docker_config_file(
            std::env::var_os("DOCKER_CONFIG").map(PathBuf::from),
            std::env::var_os("HOME").map(PathBuf::from),
        ),
    };
    let local = args.local.config(defaults).map_err(anyhow::Error::msg)?;
    let backend = LocalBackend::new(local).map_err(anyhow::Error::msg)?;
    if !backend.enforces_limits() {
        eprintln!(
            "warning: cgroup limits are not available here; sandboxes run without memory/cpu/pids limits"
        );
    }
    // The Router proxies (two descriptors per connection); the WM shares the same budget.
    let limits = args
        .limits
        .limits(10_000)
        .fit_fd_limit(agentcube_serve::raise_fd_limit(), 3);
    let token = auth_token(&args);
    let config = agentcube_workload_manager::Config {
        gc_interval: args.gc_interval.0,
        limits,
        admission: args.admission.admission(),
        auth: Arc::new(match &token {
            Some(t) => agentcube_workload_manager::auth::CallerAuth::Token(t.clone()),
            // Loopback without a token: nothing but web pages to keep out.
            None => agentcube_workload_manager::auth::CallerAuth::LocalOnly,
        }),
        ..Default::default()
    };
    let wm_url = format!("http://{}", wm_listener.local_addr()?);
    let router_url = format!("http://{}", router_listener.local_addr()?);
    let mut router_config = agentcube_router::Config::new(wm_url.clone());
    router_config.max_concurrent_requests = args.max_concurrent_requests;
    // Its sandboxes' sockets only: a store record (with --store redis://…) cannot aim the
    // Router at another socket on this host.
    router_config.unix_entry_points =
        agentcube_router::proxy::UnixEntryPoints::Under(backend.socket_dir());
    router_config.limits = limits;
    router_config.workers = std::thread::available_parallelism().map_or(1, usize::from);
    match &token {
        Some(t) => {
            router_config.authn = Some(Arc::new(agentcube_router::oidc::Authn::Token(t.clone())));
            router_config.workload_manager_token = Some(t.clone());
        }
        // Loopback without a token: nothing but web pages to keep out.
        None => router_config.local_only = true,
    }
    let router = RouterService::start(&router_config, store.clone(), &identity)?;
    // One platform per store: another `agentcube up` on it would delete these sessions.
    let lease = StoreLease::hold(store.clone(), backend.holder()).await?;
    // Last: what starts sandboxes (warm pools) once nothing else can fail.
    let platform = backend
        .clone()
        .platform(
            Some(args.manifests.clone()),
            Duration::from_secs(2),
            Some(identity.public_pem.clone()),
        )
        .await
        .map_err(anyhow::Error::msg)?;
    let wm = WorkloadManager::start(config, store, platform).await?;
    let pools = wm.pools.clone();

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let (wm_text, shared) = (wm.metrics_renderer(), router.shared.clone());
    let metrics_app = agentcube_serve::metrics_app(move || {
        agentcube_serve::join_openmetrics(&[wm_text(), shared.metrics.encode()])
    });
    let metrics_url = match metrics_listener {
        Some(l) => {
            let url = format!("http://{}/metrics", l.local_addr()?);
            agentcube_serve::spawn_admin(l, metrics_app, agentcube_router::refusal(), stopped());
            Some(url)
        }
        None => None,
    };
    // Both through their crates' serving functions: the same limits and TCP_NODELAY as the
    // standalone binaries.
    let wm_server = tokio::spawn(agentcube_workload_manager::serve(
        wm,
        wm_listener,
        None,
        stopped(),
    ));
    let router_server = tokio::spawn(agentcube_router::serve(
        router,
        router_listener,
        None,
        stopped(),
    ));

    println!(
        "AgentCube is up (embedded: Router + Workload Manager + {} store, sandboxes: {:?})",
        store_name(&store_config),
        args.local.isolation
    );
    println!("  Router:           {router_url}");
    println!("  Workload Manager: {wm_url}");
    println!(
        "  Manifests:        {} (reloaded on change)",
        args.manifests.display()
    );
    if let Some(url) = &metrics_url {
        println!("  Metrics:          {url}");
    }
    match &token {
        Some(t) => {
            println!("  Auth:             Authorization: Bearer $AGENTCUBE_AUTH_TOKEN on both");
            println!();
            println!(
                "export WORKLOAD_MANAGER_URL={wm_url} ROUTER_URL={router_url} AGENTCUBE_AUTH_TOKEN={t}"
            );
        }
        None => {
            println!();
            println!("export WORKLOAD_MANAGER_URL={wm_url} ROUTER_URL={router_url}");
        }
    }
    println!();
    println!("Press Ctrl-C to stop (every sandbox is removed).");
    let progress = tokio::spawn(pool_progress(pools));

    let lost = tokio::select! {
        () = shutdown_signal() => None,
        why = lease.wait() => Some(why),
    };
    if let Some(why) = &lost {
        eprintln!("\n{why}");
    }
    println!("\nstopping…");
    progress.abort();
    let _ = stop_tx.send(true);
    // Each serve drains its connections (10 s at most), then the Router flushes activity and
    // the Workload Manager removes every sandbox.
    let _ = router_server.await;
    let _ = wm_server.await;
    match backend.reclaiming() {
        0 => println!("stopped; no sandbox left running"),
        n => println!(
            "stopped; {n} removed sandbox(es) still have a process that outlived SIGKILL (stuck \
             in the kernel): the next start with this --state-dir removes their cgroups (retrying \
             while a process still holds one)"
        ),
    }
    lost.map_or(Ok(()), Err)
}

fn store_name(c: &agentcube_store::StoreConfig) -> &'static str {
    match c {
        agentcube_store::StoreConfig::Memory => "in-memory",
        agentcube_store::StoreConfig::Redis(_) => "Redis",
    }
}

/// Prints warm-pool fill levels until every pool is full (re-checked after manifest changes).
async fn pool_progress(pools: Arc<dyn WarmPools>) {
    let mut last = String::new();
    loop {
        let line = progress_line(&pools.levels());
        if let Some(line) = line.filter(|l| *l != last) {
            println!("{line}");
            last = line;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// `warm pools: default/a 1/2, default/b 2/2 (filling…)`, with why a pool cannot fill when its
/// last start failed; `None` without pools.
fn progress_line(status: &[PoolLevel]) -> Option<String> {
    if status.is_empty() {
        return None;
    }
    let levels = status
        .iter()
        .map(|p| format!("{}/{} {}/{}", p.namespace, p.name, p.ready, p.size))
        .collect::<Vec<_>>()
        .join(", ");
    let unfilled: Vec<&PoolLevel> = status
        .iter()
        .filter(|p| p.ready < p.size as usize)
        .collect();
    let state = if unfilled.is_empty() {
        " (ready)".to_string()
    } else {
        let failing: Vec<String> = unfilled
            .iter()
            .filter_map(|p| {
                let why = p.failing.as_deref()?;
                let short: String = why.chars().take(300).collect();
                Some(format!(
                    "{}/{} cannot start sandboxes: {short}",
                    p.namespace, p.name
                ))
            })
            .collect();
        if failing.is_empty() {
            " (filling…)".to_string()
        } else {
            format!(" (filling…; {}; retrying)", failing.join("; "))
        }
    };
    Some(format!("warm pools: {levels}{state}"))
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term.recv() => {},
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn level(name: &str, ready: usize, failing: Option<&str>) -> PoolLevel {
        PoolLevel {
            namespace: "default".into(),
            name: name.into(),
            ready,
            size: 2,
            standby: 0,
            failing: failing.map(str::to_string),
        }
    }

    /// A create the Workload Manager gives up answers `504` with what it waited for; callers
    /// that give up first (the Router here, the SDKs, both at 2 minutes) never see why.
    #[test]
    fn a_create_is_given_up_before_its_callers_give_up_on_it() {
        let create = agentcube_workload_manager::Config::default().create_timeout;
        let router =
            agentcube_router::Config::new("http://wm".to_string()).workload_manager_timeout;
        let sdk = Duration::from_secs(120);
        assert!(
            create + Duration::from_secs(5) <= router.min(sdk),
            "{create:?} vs {router:?}"
        );
    }

    #[test]
    fn the_progress_line_says_why_a_pool_cannot_fill() {
        assert_eq!(progress_line(&[]), None);
        assert_eq!(
            progress_line(&[level("a", 2, None)]).unwrap(),
            "warm pools: default/a 2/2 (ready)"
        );
        assert_eq!(
            progress_line(&[level("a", 1, None), level("b", 2, None)]).unwrap(),
            "warm pools: default/a 1/2, default/b 2/2 (filling…)"
        );
        assert_eq!(
            progress_line(&[
                level("a", 0, Some("cannot pull image x")),
                level("b", 2, None)
            ])
            .unwrap(),
            "warm pools: default/a 0/2, default/b 2/2 (filling…; default/a cannot start \
             sandboxes: cannot pull image x; retrying)"
        );
        // A full pool's old failure is not news.
        assert_eq!(
            progress_line(&[level("a", 2, Some("old"))]).unwrap(),
            "warm pools: default/a 2/2 (ready)"
        );
    }
}
