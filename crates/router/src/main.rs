//! `router`: flags and environment → config, then serve until SIGTERM/SIGINT.

use std::path::PathBuf;
use std::time::Duration;

use agentcube_router::{Config, KeyPair, RouterService};
use agentcube_store::StoreArgs;
use anyhow::Context;
use clap::{CommandFactory, Parser};

/// AgentCube Router.
#[derive(Debug, Parser)]
#[command(name = "router", version)]
struct Args {
    /// Listen port.
    #[arg(long, env = "ROUTER_PORT", default_value_t = 8080)]
    port: u16,
    /// Listen address (IP).
    #[arg(long, env = "ROUTER_BIND", default_value = "0.0.0.0")]
    bind: std::net::IpAddr,
    /// Workload Manager base URL (required).
    #[arg(long, env = "WORKLOAD_MANAGER_URL")]
    workload_manager_url: String,
    /// Concurrent proxied requests; 0 means unlimited.
    #[arg(long, env = "ROUTER_MAX_CONCURRENT_REQUESTS", default_value_t = 1000)]
    max_concurrent_requests: usize,
    /// With OIDC: concurrent proxied requests per end user (administrators aside); 0 means no
    /// per-user share.
    #[arg(long, env = "ROUTER_MAX_CONCURRENT_PER_USER", default_value_t = 100)]
    max_concurrent_per_user: usize,
    /// Directory holding the Router key pair (`private.pem` PKCS#1, `public.pem` SPKI), created
    /// on first start. Without it, in a cluster (in-cluster service account, or KUBECONFIG set)
    /// the pair lives in Secret `picod-router-identity`; otherwise it is generated in memory for
    /// this process only.
    #[arg(long, env = "AGENTCUBE_ROUTER_IDENTITY_DIR")]
    identity_dir: Option<PathBuf>,
    /// The only directory whose Unix sockets (`unix:` entry points, a local Workload Manager's:
    /// `<its state directory>/private`) this Router connects to. Unset: none (a cluster's entry
    /// points are pod IPs), so a store record cannot aim the Router at a socket on this host.
    #[arg(long, env = "ROUTER_UNIX_SOCKET_DIR")]
    unix_socket_dir: Option<PathBuf>,
    /// Namespace of the identity Secret `picod-router-identity` in a cluster.
    #[arg(long, env = "AGENTCUBE_NAMESPACE", default_value = "default")]
    namespace: String,
    /// Port of the admin listener serving `/metrics` (0 disables it).
    #[arg(long, env = "ROUTER_METRICS_PORT", default_value_t = 9090)]
    metrics_port: u16,
    /// How long a looked-up session is reused without asking the store, in milliseconds.
    #[arg(long, env = "ROUTER_SESSION_CACHE_TTL_MS", default_value_t = 1000)]
    session_cache_ttl_ms: u64,
    #[command(flatten)]
    limits: agentcube_serve::LimitArgs,
    /// HTTP worker threads, each with its own runtime and upstream connection pool (requests
    /// never hop between threads); 0 = one per CPU.
    #[arg(long, env = "ROUTER_WORKERS", default_value_t = 0)]
    workers: usize,
    /// Upstream's flag: this Router's own debug logs (not its libraries'; RUST_LOG, when set,
    /// decides instead).
    #[arg(long)]
    debug: bool,
    /// Serve HTTPS (HTTP/1.1 and HTTP/2) with --tls-cert and --tls-key.
    #[arg(long, env = "ROUTER_ENABLE_TLS")]
    enable_tls: bool,
    /// PEM certificate chain for --enable-tls.
    #[arg(long, env = "ROUTER_TLS_CERT", default_value = "")]
    tls_cert: String,
    /// PEM private key for --enable-tls.
    #[arg(long, env = "ROUTER_TLS_KEY", default_value = "")]
    tls_key: String,
    /// Router -> Workload Manager mutual TLS: this Router's certificate (PEM). With --mtls-key
    /// and --mtls-ca (all three or none); WORKLOAD_MANAGER_URL must then be `https://`. The
    /// files are waited for up to 30 s at start and reloaded when they change.
    #[arg(long, env = "ROUTER_MTLS_CERT", default_value = "")]
    mtls_cert: String,
    /// The private key of --mtls-cert (PEM).
    #[arg(long, env = "ROUTER_MTLS_KEY", default_value = "")]
    mtls_key: String,
    /// CA bundle (PEM) the Workload Manager's certificate must chain to.
    #[arg(long, env = "ROUTER_MTLS_CA", default_value = "")]
    mtls_ca: String,
    /// SPIFFE trust domain of the Workload Manager's expected identity
    /// `spiffe://<domain>/ns/<AGENTCUBE_NAMESPACE, default agentcube>/sa/workloadmanager`.
    #[arg(
        long,
        env = "AGENTCUBE_SPIFFE_TRUST_DOMAIN",
        default_value = "cluster.local"
    )]
    spiffe_trust_domain: String,
    /// OIDC issuer: end users must send `Authorization: Bearer <JWT>` from it (empty: off).
    #[arg(long, env = "ROUTER_JWT_ISSUER_URL", default_value = "")]
    jwt_issuer_url: String,
    /// The `aud` the tokens must carry (empty: not checked).
    #[arg(long, env = "ROUTER_JWT_AUDIENCE", default_value = "agentcube-api")]
    jwt_audience: String,
    /// Dot path to the roles array in the token (e.g. `realm_access.roles`, `groups`, `scp`).
    #[arg(long, env = "ROUTER_JWT_ROLE_CLAIM", default_value = "")]
    jwt_role_claim: String,
    /// Role every request needs (e.g. `sandbox:invoke`); `admin` may use every session.
    #[arg(long, env = "ROUTER_JWT_REQUIRED_ROLE", default_value = "")]
    jwt_required_role: String,
    #[command(flatten)]
    store: StoreArgs,
    /// Validate flags and environment, print the environment variables this binary reads, exit.
    #[arg(long, hide = true)]
    check_config: bool,
}

// Requests are served by `--workers` threads with a runtime each; this one only runs start-up and
// the background tasks (activity flush).
#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.check_config {
        args.store.clone().into_config(false)?;
        mtls_files(&args)?;
        print_env_names();
        return Ok(());
    }
    let level = if args.debug {
        "info,router=debug,agentcube_router=debug"
    } else {
        "info"
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    tracing_subscriber::fmt()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let authn = oidc(&args).await?;
    let store = agentcube_store::connect(&args.store.clone().into_config(false)?)?;
    let identity = match &args.identity_dir {
        Some(dir) => KeyPair::load_or_create(dir)
            .with_context(|| format!("identity in {}", dir.display()))?,
        // In a cluster: Secret picod-router-identity, shared by every replica.
        None if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some()
            || std::env::var_os("KUBECONFIG").is_some() =>
        {
            let kc = kube::Config::infer()
                .await
                .context("Kubernetes client (in-cluster or KUBECONFIG)")?;
            // Named in the API server's audit log (and checked against the chart's RBAC in
            // tests); an API server that does not answer fails the start in bounded time.
            let agent = concat!("agentcube-router/", env!("CARGO_PKG_VERSION"));
            let client =
                agentcube_crds::client::client(kc, agent, agentcube_crds::client::REQUEST_TIMEOUT)?;
            agentcube_router::identity::load_or_create_secret(client, &args.namespace).await?
        }
        None => {
            tracing::warn!(
                "no --identity-dir and not in a cluster: using an in-memory key; sandboxes must \
                 get this process's public key"
            );
            KeyPair::generate()?
        }
    };
    let mut config = Config::new(args.workload_manager_url.clone());
    config.unix_entry_points = match &args.unix_socket_dir {
        Some(dir) => agentcube_router::proxy::UnixEntryPoints::Under(dir.clone()),
        None => agentcube_router::proxy::UnixEntryPoints::Refused,
    };
    config.max_concurrent_requests = args.max_concurrent_requests;
    config.max_concurrent_per_user = args.max_concurrent_per_user;
    config.session_cache_ttl = Duration::from_millis(args.session_cache_ttl_ms);
    config.workers = match args.workers {
        0 => std::thread::available_parallelism().map_or(1, usize::from),
        n => n,
    };
    // Each client connection may need an upstream one: two descriptors.
    config.limits = args
        .limits
        .limits(10_000)
        .fit_fd_limit(agentcube_serve::raise_fd_limit(), 2);
    config.authn = authn.map(std::sync::Arc::new);
    let sa = PathBuf::from("/var/run/secrets/kubernetes.io/serviceaccount/token");
    config.workload_manager_token_file = sa.exists().then_some(sa);
    let tls =
        match agentcube_tls::listener_files(args.enable_tls, &args.tls_cert, &args.tls_key, "")
            .map_err(anyhow::Error::msg)?
        {
            None => None,
            Some(files) => {
                let tls = agentcube_tls::ServerTls::load(files)?;
                tls.watch();
                config.scheme = "https";
                Some(tls)
            }
        };
    config.workload_manager_tls = workload_manager_mtls(&args).await?;
    let listener = agentcube_serve::listen((args.bind, args.port)).await?;
    let metrics = agentcube_serve::listen_admin((args.bind, args.metrics_port)).await?;
    let service = RouterService::start(&config, store, &identity)?;
    if let Some(metrics) = metrics {
        let (app, refusal) = (service.admin_app(), agentcube_router::refusal());
        agentcube_serve::spawn_admin(metrics, app, refusal, std::future::pending());
    }
    tracing::info!(addr = %listener.local_addr()?, tls = tls.is_some(), "router listening");
    agentcube_router::serve(service, listener, tls, shutdown_signal()).await
}

/// `--mtls-*`: the client side of mutual TLS towards the Workload Manager, whose certificate
/// must name its SPIFFE ID (namespace: `AGENTCUBE_NAMESPACE` when set, else `agentcube`, as
/// upstream; its default here, `default`, is the identity Secret's).
async fn workload_manager_mtls(args: &Args) -> anyhow::Result<Option<agentcube_tls::ClientTls>> {
    let Some(files) = mtls_files(args)? else {
        return Ok(None);
    };
    agentcube_tls::wait_for_files(&files, agentcube_tls::FILE_WAIT).await?;
    let namespace = std::env::var("AGENTCUBE_NAMESPACE")
        .ok()
        .map(|n| n.trim().to_string())
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "agentcube".into());
    let id = agentcube_tls::spiffe_id(
        args.spiffe_trust_domain.trim(),
        &namespace,
        "workloadmanager",
    );
    let tls = agentcube_tls::ClientTls::load(files, id.clone())?;
    tls.watch();
    tracing::info!(workload_manager = %id, "Router -> Workload Manager mutual TLS");
    Ok(Some(tls))
}

/// The `--mtls-*` files: all three or none, and only towards an `https://` Workload Manager.
fn mtls_files(args: &Args) -> anyhow::Result<Option<agentcube_tls::PemFiles>> {
    let named = [&args.mtls_cert, &args.mtls_key, &args.mtls_ca].map(|s| !s.trim().is_empty());
    if named == [false; 3] {
        return Ok(None);
    }
    if named != [true; 3] {
        anyhow::bail!("--mtls-cert, --mtls-key and --mtls-ca must all be given together");
    }
    if !args.workload_manager_url.starts_with("https://") {
        anyhow::bail!(
            "--mtls-* is set but WORKLOAD_MANAGER_URL ({}) is not https://: the calls would go \
             in the clear",
            args.workload_manager_url
        );
    }
    Ok(Some(agentcube_tls::PemFiles {
        cert: args.mtls_cert.trim().into(),
        key: args.mtls_key.trim().into(),
        ca: Some(args.mtls_ca.trim().into()),
    }))
}

/// `--jwt-*`: discovery at start (an unreachable issuer stops the Router, as upstream).
async fn oidc(args: &Args) -> anyhow::Result<Option<agentcube_router::oidc::Authn>> {
    if args.jwt_issuer_url.is_empty() {
        return Ok(None);
    }
    anyhow::ensure!(
        !args.jwt_role_claim.is_empty() && !args.jwt_required_role.is_empty(),
        "--jwt-issuer-url needs --jwt-role-claim and --jwt-required-role"
    );
    let config = agentcube_router::oidc::OidcConfig {
        issuer: args.jwt_issuer_url.clone(),
        audience: args.jwt_audience.clone(),
        role_claim: args.jwt_role_claim.clone(),
        required_role: args.jwt_required_role.clone(),
        leeway: Duration::from_secs(30),
    };
    let oidc = agentcube_router::oidc::Oidc::discover(config)
        .await
        .context("OIDC (--jwt-issuer-url)")?;
    Ok(Some(agentcube_router::oidc::Authn::Oidc(Box::new(oidc))))
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term.recv() => {},
    }
}

/// One line per environment variable a flag reads (used by the chart's drift test).
fn print_env_names() {
    for a in Args::command().get_arguments() {
        if let Some(e) = a.get_env() {
            println!("{}", e.to_string_lossy());
        }
    }
}
