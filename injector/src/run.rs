//! The `shoal-injector` process: flags, startup, serving, graceful shutdown.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::admission::Webhook;
use crate::bootstrap::{self, BootstrapTarget};
use crate::config::InjectFlags;
use crate::error::InjectorError;
use crate::metrics::Metrics;
use crate::nscache::NamespaceCache;
use crate::server;
use crate::tls::{self, CertFiles, CertStore};

/// Default webhook listen address.
pub const DEFAULT_LISTEN_ADDR: &str = "0.0.0.0:8443";
/// Default admin listen address.
pub const DEFAULT_ADMIN_ADDR: &str = "0.0.0.0:9090";
/// Default certificate file (a mounted `kubernetes.io/tls` Secret).
pub const DEFAULT_TLS_CERT_FILE: &str = "/etc/shoal-injector/tls/tls.crt";
/// Default key file.
pub const DEFAULT_TLS_KEY_FILE: &str = "/etc/shoal-injector/tls/tls.key";
/// Default name of the injector's Service, Secret and webhook configuration.
pub const DEFAULT_NAME: &str = "shoal-injector";
/// Default namespace of the injector.
pub const DEFAULT_NAMESPACE: &str = "shoal-system";

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Plain,
    /// One JSON object per line.
    Json,
}

/// `shoal-injector` flags; each is also an environment variable.
#[derive(clap::Parser, Debug, Clone)]
#[command(
    name = "shoal-injector",
    version,
    about = "Shoal's admission webhook: adds the agent sidecar to pods"
)]
pub struct Args {
    /// Webhook (HTTPS) listen address.
    #[arg(long, env = "SHOAL_INJECTOR_LISTEN_ADDR", default_value = DEFAULT_LISTEN_ADDR)]
    pub listen_addr: SocketAddr,
    /// Admin (HTTP: /metrics, /livez, /readyz) listen address.
    #[arg(long, env = "SHOAL_INJECTOR_ADMIN_ADDR", default_value = DEFAULT_ADMIN_ADDR)]
    pub admin_addr: SocketAddr,
    /// Serving certificate file (PEM), reloaded when it changes.
    #[arg(long, env = "SHOAL_INJECTOR_TLS_CERT_FILE", default_value = DEFAULT_TLS_CERT_FILE)]
    pub tls_cert_file: PathBuf,
    /// Serving key file (PEM), reloaded when it changes.
    #[arg(long, env = "SHOAL_INJECTOR_TLS_KEY_FILE", default_value = DEFAULT_TLS_KEY_FILE)]
    pub tls_key_file: PathBuf,
    /// Generate the CA and serving certificate, keep them in a Secret, patch the
    /// webhook configuration's caBundle and rotate them (instead of the files).
    #[arg(long, env = "SHOAL_INJECTOR_BOOTSTRAP_TLS", default_value_t = false, action = clap::ArgAction::Set)]
    pub bootstrap_tls: bool,
    /// Secret holding bootstrapped TLS material.
    #[arg(
        long,
        env = "SHOAL_INJECTOR_TLS_SECRET",
        default_value = "shoal-injector-tls"
    )]
    pub tls_secret: String,
    /// MutatingWebhookConfiguration whose caBundle bootstrap keeps current.
    #[arg(long, env = "SHOAL_INJECTOR_WEBHOOK_CONFIG", default_value = DEFAULT_NAME)]
    pub webhook_config: String,
    /// Service name the API server calls (for the certificate's DNS names).
    #[arg(long, env = "SHOAL_INJECTOR_SERVICE", default_value = DEFAULT_NAME)]
    pub service: String,
    /// The injector's own namespace.
    #[arg(long, env = "POD_NAMESPACE", default_value = DEFAULT_NAMESPACE)]
    pub namespace: String,
    /// How long to keep serving after SIGTERM while endpoints update.
    #[arg(long, env = "SHOAL_INJECTOR_SHUTDOWN_DELAY", default_value = "5s", value_parser = parse_duration)]
    pub shutdown_delay: Duration,
    /// Most time to let in-flight requests finish after that.
    #[arg(long, env = "SHOAL_INJECTOR_SHUTDOWN_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub shutdown_timeout: Duration,
    /// Log level (tracing filter syntax).
    #[arg(long, env = "SHOAL_INJECTOR_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
    /// Log format.
    #[arg(
        long,
        env = "SHOAL_INJECTOR_LOG_FORMAT",
        value_enum,
        default_value = "json"
    )]
    pub log_format: LogFormat,
    /// What to inject.
    #[command(flatten)]
    pub inject: InjectFlags,
}

/// Parses `500ms`, `5s`, `2m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map_or((s, "s"), |i| (&s[..i], &s[i..]));
    let n: u64 = num.parse().map_err(|_| format!("invalid duration {s:?}"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(format!("invalid duration {s:?}: use ms, s or m")),
    }
}

fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Sets up logging per the flags.
pub fn init_logging(args: &Args) {
    let filter = tracing_subscriber::EnvFilter::try_new(&args.log_level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match args.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Plain => builder.init(),
    }
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, InjectorError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| InjectorError::Bind { addr, source })
}

/// Resolves when SIGTERM or SIGINT arrives.
async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Runs the injector until SIGTERM/SIGINT.
pub async fn run(args: Args) -> Result<(), InjectorError> {
    let metrics = Arc::new(Metrics::new());
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let client = kube::Client::try_default().await?;

    // TLS first: without a certificate there is nothing to serve.
    let store = if args.bootstrap_tls {
        let target = BootstrapTarget {
            namespace: args.namespace.clone(),
            secret: args.tls_secret.clone(),
            webhook_configuration: args.webhook_config.clone(),
            dns_names: bootstrap::service_dns_names(&args.service, &args.namespace),
        };
        let material = bootstrap::reconcile(client.clone(), &target, now_unix()).await?;
        metrics.cert_expiry.set(material.cert_not_after);
        let store = CertStore::new(tls::certified_key(
            material.cert.as_bytes(),
            material.key.as_bytes(),
        )?);
        tokio::spawn(rotate_loop(
            client.clone(),
            target,
            store.clone(),
            metrics.clone(),
            material,
            shutdown_rx.clone(),
        ));
        store
    } else {
        let files = CertFiles {
            cert: args.tls_cert_file.clone(),
            key: args.tls_key_file.clone(),
        };
        let store = CertStore::new(files.load()?);
        metrics.cert_reloads.inc();
        tokio::spawn(files.watch(
            store.clone(),
            tls::DEFAULT_RELOAD_INTERVAL,
            metrics.clone(),
            shutdown_rx.clone(),
        ));
        store
    };
    let tls_config = tls::server_config(store)?;

    let namespaces = NamespaceCache::start(client, shutdown_rx.clone());
    let stopping = Arc::new(AtomicBool::new(false));
    let ready: server::ReadyCheck = {
        let namespaces = namespaces.clone();
        let stopping = stopping.clone();
        Arc::new(move || namespaces.is_ready() && !stopping.load(Ordering::Acquire))
    };
    let webhook = Webhook::new(
        args.inject.to_config(),
        Arc::new(namespaces),
        metrics.clone(),
    );

    let webhook_listener = bind(args.listen_addr).await?;
    let admin_listener = bind(args.admin_addr).await?;
    tracing::info!(listen = %args.listen_addr, admin = %args.admin_addr, bootstrap_tls = args.bootstrap_tls, "shoal-injector serving");
    let webhook_task = tokio::spawn(server::serve_webhook(
        webhook_listener,
        tls_config,
        webhook,
        shutdown_rx.clone(),
    ));
    let admin_task = tokio::spawn(server::serve_admin(
        admin_listener,
        metrics,
        ready,
        shutdown_rx,
    ));

    signal().await;
    tracing::info!(delay = ?args.shutdown_delay, "shutting down: no longer ready");
    stopping.store(true, Ordering::Release);
    tokio::time::sleep(args.shutdown_delay).await;
    let _ = shutdown_tx.send(true);
    let _ = tokio::time::timeout(args.shutdown_timeout, async {
        let _ = webhook_task.await;
        let _ = admin_task.await;
    })
    .await;
    tracing::info!("stopped");
    Ok(())
}

async fn rotate_loop(
    client: kube::Client,
    target: BootstrapTarget,
    store: Arc<CertStore>,
    metrics: Arc<Metrics>,
    mut current: bootstrap::TlsMaterial,
    mut shutdown: watch::Receiver<bool>,
) {
    let interval = Duration::from_secs(bootstrap::DEFAULT_CHECK_INTERVAL_SECONDS);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shutdown.changed() => return,
        }
        match bootstrap::reconcile(client.clone(), &target, now_unix()).await {
            Ok(m) if m != current => {
                match tls::certified_key(m.cert.as_bytes(), m.key.as_bytes()) {
                    Ok(ck) => {
                        store.set(ck);
                        metrics.cert_reloads.inc();
                        metrics.cert_expiry.set(m.cert_not_after);
                        current = m;
                    }
                    Err(e) => {
                        metrics.cert_reload_errors.inc();
                        tracing::warn!(error = %e, "rotated certificate unusable; keeping the current one");
                    }
                }
            }
            Ok(_) => {}
            Err(e) => {
                metrics.cert_reload_errors.inc();
                tracing::warn!(error = %e, "certificate rotation check failed; will retry");
            }
        }
    }
}
