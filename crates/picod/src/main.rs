//! `picod`: flags and environment → [`Config`], then serve until SIGTERM/SIGINT.

use std::path::PathBuf;

use agentcube_picod::{AppState, Auth, Config, ListenAddr};
use anyhow::Context;
use clap::{CommandFactory, Parser};

/// PicoD, the AgentCube in-sandbox daemon.
#[derive(Debug, Parser)]
#[command(name = "picod", version)]
struct Args {
    /// TCP port on all interfaces (ignored when --listen is given).
    #[arg(long, env = "PICOD_PORT", default_value_t = 8080)]
    port: u16,
    /// Listen address: `HOST:PORT`, `:PORT`, or `unix:/path/to.sock`.
    #[arg(long, env = "PICOD_LISTEN")]
    listen: Option<ListenAddr>,
    /// Workspace directory (created if missing). Default: the current directory.
    #[arg(long, env = "PICOD_WORKSPACE")]
    workspace: Option<PathBuf>,
    /// PEM public key (SPKI `PUBLIC KEY`) of the Router; required unless --insecure-no-auth.
    #[arg(long, env = "PICOD_AUTH_PUBLIC_KEY", hide_env_values = true)]
    auth_public_key: Option<String>,
    /// This sandbox's identity (its pod or sandbox name). When set, a token is accepted only if
    /// its `aud` names this sandbox. Unset: any Router token is accepted (upstream behaviour).
    #[arg(long, env = "PICOD_SANDBOX_NAME")]
    sandbox_name: Option<String>,
    /// Serve without any authentication. Only for local experiments.
    #[arg(long, env = "PICOD_INSECURE_NO_AUTH")]
    insecure_no_auth: bool,
    /// Largest accepted request body in bytes.
    #[arg(long, env = "PICOD_MAX_BODY_BYTES", default_value_t = agentcube_picod::config::DEFAULT_MAX_BODY_BYTES)]
    max_body_bytes: usize,
    /// Largest stdout (and stderr) kept per buffered execute, in bytes.
    #[arg(long, env = "PICOD_MAX_OUTPUT_BYTES", default_value_t = agentcube_picod::config::DEFAULT_MAX_OUTPUT_BYTES)]
    max_output_bytes: usize,
    /// Forward a Unix socket to a TCP port inside the sandbox: `PORT=unix:/path.sock`
    /// (repeatable). `/health` then reports whether each port is open.
    #[arg(long = "forward", env = "PICOD_FORWARD", value_delimiter = ',')]
    forwards: Vec<agentcube_picod::forward::Forward>,
    /// A program PicoD starts in the workspace and keeps as its child (an agent server), given
    /// after `--`. PicoD exits when it exits.
    #[arg(last = true)]
    agent: Vec<String>,
    /// The agent's working directory (default: the workspace).
    #[arg(long, env = "PICOD_AGENT_DIR")]
    agent_dir: Option<std::path::PathBuf>,
    #[command(flatten)]
    limits: agentcube_serve::LimitArgs,
    /// The sandbox cgroup's `memory.events` (or v1 `memory.oom_control`), to say when a command
    /// was killed for memory (default: found under /sys/fs/cgroup when mounted).
    #[arg(long, env = "PICOD_MEMORY_EVENTS")]
    memory_events: Option<std::path::PathBuf>,
    /// The sandbox's memory limit as shown in that message (default: /sys/fs/cgroup/memory.max).
    #[arg(long, env = "PICOD_MEMORY_LIMIT")]
    memory_limit: Option<String>,
    /// The sandbox has no network: network errors get a note saying so.
    #[arg(long, env = "PICOD_NO_NETWORK")]
    no_network: bool,
    /// The workspace's quota as shown when it is full (e.g. `1Gi`).
    #[arg(long, env = "PICOD_WORKSPACE_LIMIT")]
    workspace_limit: Option<String>,
    /// Serve Prometheus metrics at `GET /metrics`, without authentication (off by default).
    #[arg(long, env = "PICOD_METRICS")]
    metrics: bool,
    /// Log format: plain or json.
    #[arg(long, env = "PICOD_LOG_FORMAT", default_value = "plain", value_parser = ["plain", "json"])]
    log_format: String,
    /// Validate flags and environment, print the environment variables this binary reads, exit.
    #[arg(long, hide = true)]
    check_config: bool,
}

/// What `main` needs besides the library's [`Config`].
struct Extras {
    forwards: Vec<agentcube_picod::forward::Forward>,
    agent: Vec<String>,
    agent_dir: Option<std::path::PathBuf>,
}

impl TryFrom<Args> for (Config, ListenAddr) {
    type Error = anyhow::Error;
    fn try_from(a: Args) -> anyhow::Result<Self> {
        let auth = match (
            a.auth_public_key.filter(|k| !k.trim().is_empty()),
            a.insecure_no_auth,
        ) {
            (Some(pem), _) => Auth::PublicKeyPem(pem),
            (None, true) => Auth::Disabled,
            (None, false) => anyhow::bail!(
                "PICOD_AUTH_PUBLIC_KEY is not set: PicoD refuses to start without the Router's \
                 public key (pass --insecure-no-auth to run without authentication)"
            ),
        };
        let workspace = match a.workspace {
            Some(w) => w,
            None => std::env::current_dir().context("cannot read the current directory")?,
        };
        let mut config = Config::new(workspace.clone(), auth);
        config.max_body_bytes = a.max_body_bytes;
        config.max_output_bytes = a.max_output_bytes;
        config.health_ports = a.forwards.iter().map(|f| f.port).collect();
        config.sandbox_name = a.sandbox_name.filter(|n| !n.is_empty());
        config.metrics = a.metrics;
        config.enter_workspace = true;
        config.diagnostics = std::sync::Arc::new(
            agentcube_picod::diagnose::Diagnostics {
                memory_events: a.memory_events,
                memory_limit: a.memory_limit,
                no_network: a.no_network,
                workspace_limit: a.workspace_limit,
                workspace: Some(workspace.clone()),
                scratch: ["/tmp", "/dev/shm"].map(PathBuf::from).to_vec(),
            }
            .detect(),
        );
        config.limits = a
            .limits
            .limits(1024)
            .fit_fd_limit(agentcube_serve::raise_fd_limit(), 1);
        let listen = a
            .listen
            .unwrap_or_else(|| ListenAddr::Tcp(([0, 0, 0, 0], a.port).into()));
        Ok((config, listen))
    }
}

/// How long an idle blocking thread (file work runs there) is kept: for good, in effect. A
/// sandbox can hold its whole process limit (threads count), and tokio, unable to make a thread
/// when it has none, panics in the request; with one kept, work waits for it instead.
const BLOCKING_KEEP_ALIVE: std::time::Duration = std::time::Duration::from_secs(365 * 24 * 3600);

fn main() -> anyhow::Result<std::process::ExitCode> {
    // PID 1 of its namespace (a container's entrypoint): be its init, serve from a child.
    let marked = std::env::var_os(agentcube_picod::init::CHILD_MARK).is_some();
    if agentcube_picod::init::wanted(nix::unistd::getpid(), marked) {
        // The whole command line, a dynamic loader's options included (`args_os` drops them).
        let cmdline = match std::fs::read("/proc/self/cmdline") {
            Ok(line) => agentcube_picod::init::arguments(&line),
            Err(_) => std::env::args_os().collect(),
        };
        let (program, args) = agentcube_picod::init::again(std::env::current_exe().ok(), cmdline);
        return agentcube_picod::init::supervise(program, args)
            .context("cannot start PicoD under its init");
    }
    if marked {
        agentcube_picod::init::as_child().context("cannot unblock signals")?;
    }
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_keep_alive(BLOCKING_KEEP_ALIVE)
        .build()
        .context("cannot start the runtime")?
        .block_on(run())
}

async fn run() -> anyhow::Result<std::process::ExitCode> {
    // Descriptors inherited from whoever started us must not reach sandboxes or the commands
    // they run: everything above stderr becomes close-on-exec.
    close_fds::set_fds_cloexec_threadsafe(3, &[]);
    let args = Args::parse();
    if args.check_config {
        let _ = <(Config, ListenAddr)>::try_from(args)?;
        for a in Args::command().get_arguments() {
            if let Some(e) = a.get_env() {
                println!("{}", e.to_string_lossy());
            }
        }
        return Ok(std::process::ExitCode::SUCCESS);
    }
    init_tracing(&args.log_format);
    // The first blocking thread, made while the sandbox has processes to spare and kept
    // (`BLOCKING_KEEP_ALIVE`).
    tokio::task::spawn_blocking(|| ())
        .await
        .context("cannot start a blocking thread")?;
    // Before anything is started: catching these also means the commands we start get them at
    // their defaults, even when we were started with them ignored (a `&` job of a shell ignores
    // SIGINT and SIGQUIT, and ignored signals survive `exec`; caught ones are reset by it).
    let shutdown = shutdown_signal().context("cannot handle signals")?;
    let extras = Extras {
        forwards: args.forwards.clone(),
        agent: args.agent.clone(),
        agent_dir: args.agent_dir.clone(),
    };
    let (mut config, listen) = <(Config, ListenAddr)>::try_from(args)?;
    config.supervises_agent = !extras.agent.is_empty();
    if matches!(config.auth, Auth::Disabled) {
        tracing::warn!(
            "AUTHENTICATION DISABLED (--insecure-no-auth): anyone who can reach PicoD can run commands"
        );
    }
    // Before any token is verified: RSA signatures checked by ring (`ring_rsa`).
    let provider = Box::leak(Box::new(agentcube_picod::ring_rsa::provider()));
    jsonwebtoken::crypto::CryptoProvider::install_default(provider)
        .map_err(|_| anyhow::anyhow!("a JWT crypto provider was installed before main's"))?;
    let state = AppState::new(config)?;
    let listener = listen
        .bind()
        .await
        .with_context(|| format!("cannot listen on {listen:?}"))?;
    tracing::info!(addr = %listener.describe(), workspace = %state.workspace.root().display(), "picod listening");
    agentcube_picod::forward::start(&extras.forwards).context("cannot bind a --forward socket")?;
    let agent_dir = extras
        .agent_dir
        .clone()
        .unwrap_or_else(|| state.workspace.root().to_path_buf());
    let agent = async move {
        if extras.agent.is_empty() {
            return std::future::pending().await;
        }
        let mut child = match agentcube_picod::init::command(&extras.agent[0])
            .args(&extras.agent[1..])
            .current_dir(&agent_dir)
            .kill_on_drop(true)
            .spawn()
        {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(program = %extras.agent[0], error = %e, "cannot start the agent");
                return std::process::ExitCode::from(127);
            }
        };
        let status = child.wait().await;
        tracing::warn!(?status, "agent exited; stopping");
        // The sandbox ends with the agent's status (a shell's 128 + signal when it was killed),
        // so whoever started it can tell why.
        let code = status.ok().and_then(|s| {
            use std::os::unix::process::ExitStatusExt;
            s.code().or_else(|| s.signal().map(|sig| 128 + sig))
        });
        std::process::ExitCode::from(code.map_or(1, |c| c.clamp(0, 255) as u8))
    };
    let code = tokio::select! {
        r = agentcube_picod::run(state, listener, shutdown) => {
            r?;
            std::process::ExitCode::SUCCESS
        }
        code = agent => code,
    };
    tracing::info!("picod stopped");
    Ok(code)
}

/// Logs to stderr at the level `RUST_LOG` names (a plain level: PicoD is small, so no
/// per-module directives and none of the regex machinery they need).
fn init_tracing(format: &str) {
    let level: tracing_subscriber::filter::LevelFilter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(tracing_subscriber::filter::LevelFilter::INFO);
    let builder = tracing_subscriber::fmt()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_max_level(level)
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Resolves on SIGTERM, SIGINT or SIGQUIT (all handled from the moment this is called).
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut quit = signal(SignalKind::quit())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
            _ = quit.recv() => {},
        }
        tracing::info!("shutdown signal received");
    })
}
