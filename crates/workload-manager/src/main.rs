//! `workload-manager`: flags and environment → config, then serve until SIGTERM/SIGINT.

use std::path::PathBuf;

use agentcube_store::StoreArgs;
use agentcube_types::GoDuration;
use agentcube_workload_manager::backend::kubernetes::{KubeConfig, KubernetesBackend};
use agentcube_workload_manager::backend::local::{LocalBackend, LocalDefaults};
use agentcube_workload_manager::lease::StoreLease;
use agentcube_workload_manager::{Config, WorkloadManager, key};
use anyhow::Context;
use clap::{CommandFactory, Parser};

/// AgentCube Workload Manager.
#[derive(Debug, Parser)]
#[command(name = "workload-manager", version)]
struct Args {
    /// Listen port.
    #[arg(long, env = "WORKLOAD_MANAGER_PORT", default_value_t = 8080)]
    port: u16,
    /// Listen address (IP).
    #[arg(long, env = "WORKLOAD_MANAGER_BIND", default_value = "0.0.0.0")]
    bind: std::net::IpAddr,
    /// Sandbox backend: `local` (bubblewrap on this host) or `kubernetes` (agent-sandbox objects
    /// in the cluster of the in-cluster service account, or of KUBECONFIG).
    #[arg(long, env = "AGENTCUBE_BACKEND", default_value = "local")]
    backend: String,
    /// Local backend: directory of CodeInterpreter/AgentRuntime manifests (reloaded on change).
    /// The Kubernetes backend reads the cluster's CRs instead.
    #[arg(long, env = "AGENTCUBE_MANIFESTS")]
    manifests: Option<PathBuf>,
    /// Router public key (PEM file) injected into `authMode: picod` sandboxes. Kubernetes
    /// backend default: followed from Secret `picod-router-identity` in AGENTCUBE_NAMESPACE.
    #[arg(long, env = "AGENTCUBE_ROUTER_PUBLIC_KEY_FILE")]
    router_public_key_file: Option<PathBuf>,
    #[arg(long, env = "WORKLOAD_MANAGER_METRICS_PORT", default_value_t = 9090)]
    metrics_port: u16,
    /// GC interval (Go duration).
    #[arg(long, env = "AGENTCUBE_GC_INTERVAL", default_value_t = GoDuration(agentcube_workload_manager::DEFAULT_GC_INTERVAL))]
    gc_interval: GoDuration,
    /// Upper bound of one sandbox creation (Go duration; upstream 2m: the SDKs and the Router
    /// give up on a create after 2 minutes, before its 504 said why).
    #[arg(long, env = "AGENTCUBE_CREATE_TIMEOUT", default_value_t = GoDuration(agentcube_workload_manager::DEFAULT_CREATE_TIMEOUT))]
    create_timeout: GoDuration,
    /// Kubernetes backend: RuntimeClass of sandboxes whose definition names none (upstream
    /// ignored this flag). Not used by the local backend.
    #[arg(long, env = "AGENTCUBE_RUNTIME_CLASS_NAME", default_value = "")]
    runtime_class_name: String,
    /// Kubernetes backend: run CodeInterpreter sandboxes as this uid instead of their image's
    /// user (root in PicoD's images): `runAsNonRoot`, so that they pass Pod Security
    /// `restricted`, with the workspace on an `emptyDir` and `HOME` there. Unset: the image's
    /// user, as upstream.
    #[arg(long, env = "AGENTCUBE_CODE_INTERPRETER_UID", value_parser = clap::value_parser!(i64).range(1..))]
    code_interpreter_uid: Option<i64>,
    /// Directory with the Router's key (`public.pem`, or `private.pem` to derive it from), e.g. the
    /// mounted Secret `picod-router-identity`.
    #[arg(long, env = "AGENTCUBE_ROUTER_IDENTITY_DIR")]
    router_identity_dir: Option<PathBuf>,
    /// Kubernetes backend: labels (`k=v,…`) of the Router's pods in AGENTCUBE_NAMESPACE, let in
    /// (with the manager's own pods) by every definition's NetworkPolicy, besides its own rules.
    #[arg(
        long,
        env = "AGENTCUBE_ROUTER_POD_LABELS",
        default_value = "app=agentcube-router"
    )]
    router_pod_labels: String,
    /// Kubernetes backend: labels (`k=v,…`) of this Workload Manager's pods in
    /// AGENTCUBE_NAMESPACE, also let in by every definition's NetworkPolicy (its port probe must
    /// reach a sandbox before the session is answered).
    #[arg(
        long,
        env = "AGENTCUBE_MANAGER_POD_LABELS",
        default_value = "app=workloadmanager"
    )]
    manager_pod_labels: String,
    /// Kubernetes backend (extension): SandboxClaims per warm pool (at most its warmPoolSize)
    /// bound to warm Sandboxes ahead of demand, so a session create takes one with a single
    /// patch instead of waiting for agent-sandbox's adoption. Taken out of the pool's size (its
    /// SandboxWarmPool gets warmPoolSize − N replicas), so no extra pods. 0: none.
    #[arg(long, env = "AGENTCUBE_STANDBY_CLAIMS", default_value_t = 0)]
    standby_claims: u32,
    /// Kubernetes backend: let sandboxes whose definition has no `spec.networkPolicy` reach the
    /// cloud metadata endpoints (169.254.169.254 and the like: the node's cloud credentials
    /// where the cloud hands them to pods), as upstream. Off: their egress is everything else.
    #[arg(long, env = "AGENTCUBE_SANDBOX_METADATA_ACCESS")]
    sandbox_metadata_access: bool,
    /// Kubernetes backend: run sandbox pods in a user namespace of their own (`hostUsers:
    /// false`, unless the definition's pod template sets it or shares a node namespace): their
    /// uids, root included, are host uids no other pod has. Needs nodes that support it
    /// (Kubernetes 1.33+, a container runtime and kernel with idmapped mounts).
    #[arg(long, env = "AGENTCUBE_SANDBOX_USER_NAMESPACES")]
    sandbox_user_namespaces: bool,
    /// Kubernetes backend: namespace of the Router's identity Secret.
    #[arg(long, env = "AGENTCUBE_NAMESPACE", default_value = "default")]
    namespace: String,
    /// Authenticate callers with Kubernetes TokenReview (ServiceAccount tokens, upstream's
    /// `--enable-auth`); sessions are then visible and deletable only by their creator.
    #[arg(long, env = "AGENTCUBE_ENABLE_AUTH")]
    enable_auth: bool,
    /// With --enable-auth: members of this group may read and delete every session.
    #[arg(long, env = "AGENTCUBE_AUTH_ADMIN_GROUP", default_value = "")]
    auth_admin_group: String,
    /// With --enable-auth: callers (`system:serviceaccount:<ns>:<sa>`, comma-separated) that
    /// may create sessions in every namespace without RBAC for it there: the Router's service
    /// account, which creates sessions for its own clients. Otherwise ordinary callers.
    #[arg(
        long,
        env = "AGENTCUBE_AUTH_TRUSTED_CALLERS",
        value_delimiter = ',',
        default_value = ""
    )]
    auth_trusted_callers: Vec<String>,
    /// Require this static bearer token from every caller instead (for hosts without
    /// Kubernetes); its holder is an administrator.
    #[arg(long, env = "AGENTCUBE_AUTH_TOKEN", hide_env_values = true)]
    auth_token: Option<String>,
    #[command(flatten)]
    store: StoreArgs,
    #[command(flatten)]
    limits: agentcube_serve::LimitArgs,
    #[command(flatten)]
    admission: agentcube_workload_manager::sessions::AdmissionArgs,
    #[command(flatten)]
    local: agentcube_workload_manager::backend::local::LocalArgs,
    /// Serve HTTPS with --tls-cert and --tls-key (upstream's flags).
    #[arg(long, env = "WORKLOAD_MANAGER_ENABLE_TLS")]
    enable_tls: bool,
    /// PEM certificate chain of the listener.
    #[arg(long, env = "WORKLOAD_MANAGER_TLS_CERT", default_value = "")]
    tls_cert: String,
    /// PEM private key of the listener.
    #[arg(long, env = "WORKLOAD_MANAGER_TLS_KEY", default_value = "")]
    tls_key: String,
    /// CA bundle (PEM): with --tls-cert and --tls-key, mutual TLS (TLS 1.3; clients, the
    /// Router, must present a certificate chaining to it for client authentication). The files
    /// are waited for up to 30 s at start; all are reloaded when they change.
    #[arg(long, env = "WORKLOAD_MANAGER_TLS_CA", default_value = "")]
    tls_ca: String,
    /// Validate flags and environment, print the environment variables this binary reads, exit.
    #[arg(long, hide = true)]
    check_config: bool,
    /// Log format: plain or json.
    #[arg(long, env = "AGENTCUBE_LOG_FORMAT", default_value = "plain", value_parser = ["plain", "json"])]
    log_format: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Descriptors inherited from whoever started us must not reach sandboxes or the commands
    // they run: everything above stderr becomes close-on-exec.
    close_fds::set_fds_cloexec_threadsafe(3, &[]);
    let args = Args::parse();
    if args.check_config {
        args.store.clone().into_config(false)?;
        if !["local", "kubernetes"].contains(&args.backend.as_str()) {
            anyhow::bail!("unknown --backend {:?} (local or kubernetes)", args.backend);
        }
        agentcube_tls::listener_files(args.enable_tls, &args.tls_cert, &args.tls_key, &args.tls_ca)
            .map_err(anyhow::Error::msg)?;
        for a in Args::command().get_arguments() {
            if let Some(e) = a.get_env() {
                println!("{}", e.to_string_lossy());
            }
        }
        return Ok(());
    }
    init_tracing(&args.log_format);
    // Before anything starts: files that do not load stop us with nothing to clean up.
    let tls = listener_tls(&args).await?;
    let store_config = args.store.clone().into_config(false)?;
    let store = agentcube_store::connect(&store_config)?;
    wait_for_store(store.as_ref(), STORE_WAIT).await?;
    let public_key = match (&args.router_public_key_file, &args.router_identity_dir) {
        (Some(p), _) => Some(
            std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?,
        ),
        (None, Some(dir)) => Some(key::public_from_dir(dir).map_err(anyhow::Error::msg)?),
        (None, None) => None,
    };
    if args.backend == "kubernetes" && args.manifests.is_some() {
        anyhow::bail!(
            "--manifests is for the local backend: the Kubernetes backend reads the cluster's CodeInterpreter/AgentRuntime CRs"
        );
    }
    // First what may fail: a port in use stops the start before any sandbox or warm pool is
    // made.
    let auth = std::sync::Arc::new(caller_auth(&args).await?);
    let listener = agentcube_serve::listen((args.bind, args.port)).await?;
    let metrics = agentcube_serve::listen_admin((args.bind, args.metrics_port)).await?;
    let (platform, lease) = match args.backend.as_str() {
        "local" => {
            let backend = local_backend(&args)?;
            let lease = StoreLease::hold(store.clone(), backend.holder()).await?;
            let platform = backend
                .platform(args.manifests.clone(), RELOAD_INTERVAL, public_key)
                .await
                .map_err(anyhow::Error::msg)?;
            (platform, lease)
        }
        "kubernetes" => {
            // Every replica in the namespace names the same holder.
            let holder = format!("the Kubernetes backend of namespace {}", args.namespace);
            let lease = StoreLease::hold(store.clone(), holder).await?;
            let client = kube_client().await?;
            let mut kc = KubeConfig::new(args.namespace.clone());
            kc.pod_defaults.runtime_class = args.runtime_class_name.clone();
            kc.pod_defaults.code_interpreter_uid = args.code_interpreter_uid;
            kc.fixed_key = public_key;
            kc.standby_claims = args.standby_claims;
            kc.metadata_access = args.sandbox_metadata_access;
            kc.pod_defaults.user_namespaces = args.sandbox_user_namespaces;
            let labels = |flag: &str, v: &str| {
                agentcube_workload_manager::backend::kubernetes::network::Peers::parse_labels(v)
                    .map_err(|e| anyhow::anyhow!("--{flag}: {e}"))
            };
            kc.router_pod_labels = labels("router-pod-labels", &args.router_pod_labels)?;
            kc.manager_pod_labels = labels("manager-pod-labels", &args.manager_pod_labels)?;
            let backend = KubernetesBackend::start(client, kc, store.clone())
                .await
                .map_err(anyhow::Error::msg)?;
            (backend.platform(), lease)
        }
        other => anyhow::bail!("unknown --backend {other:?} (local or kubernetes)"),
    };
    let config = Config {
        gc_interval: args.gc_interval.0,
        create_timeout: args.create_timeout.0,
        limits: args
            .limits
            .limits(10_000)
            .fit_fd_limit(agentcube_serve::raise_fd_limit(), 1),
        admission: args.admission.admission(),
        auth,
    };
    let wm = WorkloadManager::start(config, store, platform).await?;
    if let Some(metrics) = metrics {
        let (app, refusal) = (wm.admin_app(), agentcube_workload_manager::refusal());
        agentcube_serve::spawn_admin(metrics, app, refusal, std::future::pending());
    }
    tracing::info!(
        addr = %listener.local_addr()?,
        backend = %args.backend,
        tls = tls.as_ref().map_or("off", |t| if t.mutual() { "mutual" } else { "on" }),
        "workload manager listening"
    );
    // A signal, or another manager holding the store: stop.
    let (lost_tx, lost_rx) = tokio::sync::oneshot::channel();
    let stop = async move {
        tokio::select! {
            () = shutdown_signal() => {}
            why = lease.wait() => {
                tracing::error!(error = %why, "stopping");
                let _ = lost_tx.send(why);
            }
        }
    };
    agentcube_workload_manager::serve(wm, listener, tls, stop).await?;
    lost_rx.await.map_or(Ok(()), Err)
}

/// How long the start waits for a session store that cannot serve yet (a Redis pod started
/// beside this one, or loading its dataset after a restart), within the chart's startup probe.
const STORE_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// Waits up to `within` for the store to answer while it is unavailable (not for one that
/// refuses us: a wrong password fails at once), saying so once; the last error after that.
async fn wait_for_store(
    store: &dyn agentcube_store::SessionStore,
    within: std::time::Duration,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + within;
    let mut said = false;
    loop {
        let e = match store.ping().await {
            Ok(()) => break,
            Err(e) => e,
        };
        if !e.is_unavailable() {
            let what = e.said_to("this manager");
            return Err(anyhow::Error::new(e).context(what));
        }
        if tokio::time::Instant::now() >= deadline {
            let waited = if said {
                format!(" (waited {within:?})")
            } else {
                String::new()
            };
            return Err(
                anyhow::Error::new(e).context(format!("the session store does not answer{waited}"))
            );
        }
        if !said {
            tracing::warn!(error = %e, "the session store does not answer yet; waiting up to {within:?}");
            said = true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    if said {
        tracing::info!("the session store answers");
    }
    Ok(())
}

/// `--enable-tls`, `--tls-cert`, `--tls-key`, `--tls-ca`, chosen as upstream
/// ([`agentcube_tls::listener_files`]); mutual TLS waits for its files (a sidecar writes them).
async fn listener_tls(args: &Args) -> anyhow::Result<Option<agentcube_tls::ServerTls>> {
    let files =
        agentcube_tls::listener_files(args.enable_tls, &args.tls_cert, &args.tls_key, &args.tls_ca)
            .map_err(anyhow::Error::msg)?;
    let Some(files) = files else {
        return Ok(None);
    };
    if files.ca.is_some() {
        agentcube_tls::wait_for_files(&files, agentcube_tls::FILE_WAIT).await?;
    }
    let tls = agentcube_tls::ServerTls::load(files)?;
    tls.watch();
    Ok(Some(tls))
}

/// The cluster's client (in-cluster or KUBECONFIG).
async fn kube_client() -> anyhow::Result<kube::Client> {
    use agentcube_workload_manager::backend::kubernetes::client;
    let kc = kube::Config::infer()
        .await
        .context("no Kubernetes client configuration (in-cluster or KUBECONFIG)")?;
    Ok(client::client(kc, client::REQUEST_TIMEOUT)?)
}

/// `--enable-auth` (TokenReview) or `--auth-token`, never both.
async fn caller_auth(args: &Args) -> anyhow::Result<agentcube_workload_manager::auth::CallerAuth> {
    use agentcube_workload_manager::auth::{CallerAuth, TokenReviewer};
    let token = args.auth_token.clone().filter(|t| !t.is_empty());
    Ok(match (args.enable_auth, token) {
        (true, Some(_)) => anyhow::bail!("--enable-auth and --auth-token exclude each other"),
        (true, None) => {
            let client = kube_client().await.context("--enable-auth (TokenReview)")?;
            let group = Some(args.auth_admin_group.clone());
            tracing::info!("callers authenticated by TokenReview");
            let reviewer =
                TokenReviewer::new(client, group).trusting(args.auth_trusted_callers.clone());
            CallerAuth::TokenReview(Box::new(reviewer))
        }
        (false, Some(t)) => CallerAuth::Token(t),
        (false, None) => CallerAuth::Off,
    })
}

/// How often the local backend's manifest directory is checked for changes.
const RELOAD_INTERVAL: std::time::Duration = std::time::Duration::from_secs(2);

fn local_backend(args: &Args) -> anyhow::Result<LocalBackend> {
    let defaults = LocalDefaults {
        exe: std::env::current_exe()?,
        state_dir: default_state_dir(),
        tool_path: std::env::var_os("PATH"),
        docker_config: agentcube_workload_manager::backend::local::image::docker_config_file(
            std::env::var_os("DOCKER_CONFIG").map(PathBuf::from),
            std::env::var_os("HOME").map(PathBuf::from),
        ),
    };
    let local = args.local.config(defaults).map_err(anyhow::Error::msg)?;
    LocalBackend::new(local).map_err(anyhow::Error::msg)
}

fn default_state_dir() -> PathBuf {
    if nix::unistd::Uid::effective().is_root() {
        PathBuf::from("/var/lib/agentcube")
    } else {
        std::env::var_os("XDG_STATE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))
            .unwrap_or_else(std::env::temp_dir)
            .join("agentcube")
    }
}

fn init_tracing(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        b.json().init()
    } else {
        b.init()
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term.recv() => {},
    }
}
