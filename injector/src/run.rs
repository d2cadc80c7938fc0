//! The `shoal-injector` process: flags, startup, serving, graceful shutdown.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::admission::{TrustAnchors, Webhook};
use crate::bootstrap::{self, BootstrapTarget};
use crate::config::InjectFlags;
use crate::error::InjectorError;
use crate::identity::{self, now_unix, IdentityConfig, IdentityService, Policy, SpiffeId};
use crate::meshca::{self, CaStore, MeshCa};
use crate::metrics::Metrics;
use crate::nscache::NamespaceCache;
use crate::peers::PeerBook;
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
    /// Identity endpoint (HTTPS: agents trade a CSR and their token for a
    /// certificate) listen address; served when `--identity` is true.
    #[arg(long, env = "SHOAL_INJECTOR_IDENTITY_ADDR", default_value = identity::DEFAULT_IDENTITY_ADDR)]
    pub identity_addr: SocketAddr,
    /// Trust domain of the mesh: agent identities are
    /// `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
    #[arg(long, env = "SHOAL_TRUST_DOMAIN", default_value = identity::DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// Secret (in the injector's namespace) holding the mesh CA; created with
    /// a fresh CA when absent.
    #[arg(long, env = "SHOAL_INJECTOR_MESH_CA_SECRET", default_value = meshca::DEFAULT_SECRET)]
    pub mesh_ca_secret: String,
    /// Lifetime of the agent certificates the identity endpoint signs.
    #[arg(long, env = "SHOAL_INJECTOR_IDENTITY_CERT_LIFETIME", default_value = "24h", value_parser = parse_duration)]
    pub identity_cert_lifetime: Duration,
    /// How often the mesh CA Secret is re-read: a CA rotation's step is
    /// picked up within this time.
    #[arg(long, env = "SHOAL_INJECTOR_MESH_CA_RELOAD_INTERVAL", default_value = "60s", value_parser = parse_duration)]
    pub mesh_ca_reload_interval: Duration,
    /// What to inject.
    #[command(flatten)]
    pub inject: InjectFlags,
}

/// Parses `500ms`, `5s`, `2m`, `24h`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map_or((s, "s"), |i| (&s[..i], &s[i..]));
    let n: u64 = num.parse().map_err(|_| format!("invalid duration {s:?}"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n.saturating_mul(60))),
        "h" => Ok(Duration::from_secs(n.saturating_mul(3600))),
        _ => Err(format!("invalid duration {s:?}: use ms, s, m or h")),
    }
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

/// Longest wait for a byte of an API server answer.
pub const API_READ_TIMEOUT: Duration = Duration::from_secs(295);

/// Runs the injector until SIGTERM/SIGINT.
pub async fn run(args: Args) -> Result<(), InjectorError> {
    if args.inject.pod_certificates && !args.inject.identity {
        return Err(InjectorError::Config(
            "--pod-certificates needs --identity=true: pod certificates are the agents' mesh identity, and the identity service names their peers".into(),
        ));
    }
    let metrics = Arc::new(Metrics::new());
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let client = {
        let mut config = kube::Config::infer()
            .await
            .map_err(kube::Error::InferConfig)?;
        // kube 5 has no read timeout by default: one request hung on a
        // half-open connection would stop the signer and the CA reloads.
        // Watches end within the server's 290 s; this is kube 2's 295 s.
        config.read_timeout = Some(API_READ_TIMEOUT);
        kube::Client::try_from(config)?
    };

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

    // The identity service must never take the webhook down: its settings
    // and port are checked now, the mesh CA is loaded (or made) in the
    // background, with retries.
    let trust_anchors: TrustAnchors = Arc::default();
    let identity_task = if args.inject.identity {
        let identity = IdentitySetup {
            anchors: trust_anchors.clone(),
            peers: PeerBook::start(client.clone(), shutdown_rx.clone()),
            pod_certificates: args.inject.pod_certificates,
            config: identity_config(&args)?,
            client: client.clone(),
            target: MeshCaTarget {
                namespace: args.namespace.clone(),
                secret: args.mesh_ca_secret.clone(),
                reload_interval: args.mesh_ca_reload_interval,
                dns_names: bootstrap::service_dns_names(&args.service, &args.namespace),
            },
            metrics: metrics.clone(),
        };
        let listener = bind(args.identity_addr).await?;
        tracing::info!(listen = %args.identity_addr, trust_domain = %args.trust_domain, secret = %args.mesh_ca_secret, "identity service starting");
        Some(tokio::spawn(run_identity(
            identity,
            listener,
            shutdown_rx.clone(),
        )))
    } else {
        None
    };

    let namespaces = NamespaceCache::start(client, shutdown_rx.clone());
    let stopping = Arc::new(AtomicBool::new(false));
    let ready: server::ReadyCheck = {
        let namespaces = namespaces.clone();
        let stopping = stopping.clone();
        Arc::new(move || namespaces.is_ready() && !stopping.load(Ordering::Acquire))
    };
    let mut inject_config = args.inject.to_config();
    inject_config.identity_addr = format!(
        "{}.{}.svc:{}",
        args.service,
        args.namespace,
        args.identity_addr.port()
    );
    let webhook = Webhook::new(inject_config, Arc::new(namespaces), metrics.clone())
        .with_trust_anchors(trust_anchors);

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
        if let Some(t) = identity_task {
            let _ = t.await;
        }
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

/// The identity service's settings from the flags, checked.
pub fn identity_config(args: &Args) -> Result<IdentityConfig, InjectorError> {
    SpiffeId::from_str(&format!("spiffe://{}/ns/n/sa/s", args.trust_domain)).map_err(|_| {
        InjectorError::Config(format!(
            "--trust-domain {:?}: use lowercase letters, digits, '-', '.' and '_'",
            args.trust_domain
        ))
    })?;
    if args.mesh_ca_reload_interval < Duration::from_secs(1) {
        return Err(InjectorError::Config(format!(
            "--mesh-ca-reload-interval {:?} is shorter than a second",
            args.mesh_ca_reload_interval
        )));
    }
    if args.identity_cert_lifetime < Duration::from_secs(60) {
        return Err(InjectorError::Config(format!(
            "--identity-cert-lifetime {:?} is shorter than a minute",
            args.identity_cert_lifetime
        )));
    }
    Ok(IdentityConfig {
        policy: Policy {
            trust_domain: args.trust_domain.clone(),
            audience: crate::config::DEFAULT_TOKEN_AUDIENCE.to_owned(),
        },
        cert_lifetime: args.identity_cert_lifetime,
        review_timeout: identity::TOKEN_REVIEW_TIMEOUT,
    })
}

/// A serving certificate for the identity endpoint from the mesh CA, and its expiry.
fn identity_serving_key(
    ca: &MeshCa,
    dns_names: &[String],
) -> Result<(Arc<rustls::sign::CertifiedKey>, i64), InjectorError> {
    let (issued, key) = ca.issue_serving(
        dns_names,
        now_unix(),
        identity::SERVING_CERT_LIFETIME_SECONDS,
    )?;
    Ok((
        tls::certified_key(issued.cert_pem.as_bytes(), key.as_bytes())?,
        issued.not_after,
    ))
}

/// Where the mesh CA is kept and the names the identity endpoint serves.
struct MeshCaTarget {
    namespace: String,
    secret: String,
    reload_interval: Duration,
    dns_names: Vec<String>,
}

/// What the identity service needs to start.
struct IdentitySetup {
    config: IdentityConfig,
    /// Where the webhook reads the trust bundle it hands injected pods.
    anchors: TrustAnchors,
    /// Injected pods, for discovery.
    peers: PeerBook,
    /// Whether to sign PodCertificateRequests for `shoal.io/mesh`.
    pod_certificates: bool,
    client: kube::Client,
    target: MeshCaTarget,
    metrics: Arc<Metrics>,
}

/// Longest wait between attempts to load the mesh CA at start.
const MESH_CA_MAX_RETRY: Duration = Duration::from_secs(60);

/// Loads (or bootstraps) the mesh CA, retrying with backoff until it works
/// or shutdown; then serves the identity endpoint on `listener` and keeps
/// the CA current until shutdown.
async fn run_identity(
    setup: IdentitySetup,
    listener: TcpListener,
    mut shutdown: watch::Receiver<bool>,
) {
    let IdentitySetup {
        config,
        anchors,
        peers,
        pod_certificates,
        client,
        target,
        metrics,
    } = setup;
    let mut wait = Duration::from_secs(1);
    let (ca, serving, serving_not_after) = loop {
        let attempt = async {
            let ca = meshca::reconcile(
                client.clone(),
                &target.namespace,
                &target.secret,
                now_unix(),
            )
            .await?;
            let (serving, not_after) = identity_serving_key(&ca, &target.dns_names)?;
            Ok::<_, InjectorError>((ca, serving, not_after))
        };
        match attempt.await {
            Ok(r) => break r,
            Err(e) => {
                metrics.mesh_ca_reload_errors.inc();
                tracing::warn!(error = %e, retry_in = ?wait, "mesh CA not usable; the identity service waits for it (the webhook is unaffected)");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = server::stopped(&mut shutdown) => return,
        }
        wait = (wait * 2).min(MESH_CA_MAX_RETRY);
    };
    metrics.mesh_ca_expiry.set(ca.not_after());
    let serving_store = CertStore::new(serving);
    let tls_config = match tls::server_config(serving_store.clone()) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "identity service cannot serve TLS");
            return;
        }
    };
    tracing::info!(roots = ca.roots(), "identity service serving");
    set_anchors(&anchors, &ca);
    let ca_store = CaStore::new(ca);
    if pod_certificates {
        tracing::info!(
            signer = crate::podcert::SIGNER_NAME,
            "signing pod certificates"
        );
        tokio::spawn(
            crate::podcert::Signer::new(
                client.clone(),
                ca_store.clone(),
                config.policy.trust_domain.clone(),
                config.cert_lifetime,
                metrics.clone(),
            )
            .run(shutdown.clone()),
        );
    }
    let service = IdentityService::new(client.clone(), ca_store.clone(), config, metrics.clone())
        .with_peers(peers);
    tokio::join!(
        mesh_ca_loop(
            client,
            target,
            (ca_store, anchors),
            serving_store,
            serving_not_after,
            metrics,
            shutdown.clone(),
        ),
        server::serve_identity(listener, tls_config, service, shutdown),
    );
}

/// Re-reads the mesh CA Secret every `--mesh-ca-reload-interval`: a changed
/// CA (rotation) is used from then on; the identity endpoint's serving
/// certificate is re-issued when the CA changed or a third of its life is
/// left. A Secret that cannot be read or used keeps the CA in use.
async fn mesh_ca_loop(
    client: kube::Client,
    target: MeshCaTarget,
    (ca_store, anchors): (Arc<CaStore>, TrustAnchors),
    serving: Arc<CertStore>,
    mut serving_not_after: i64,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(target.reload_interval) => {}
            _ = server::stopped(&mut shutdown) => return,
        }
        let mut changed = false;
        match meshca::load(client.clone(), &target.namespace, &target.secret).await {
            Ok(Some(ca)) => {
                if ca.material() != ca_store.get().material() {
                    tracing::info!(secret = %target.secret, roots = ca.roots(), "mesh CA changed; signing with the new one");
                    metrics.mesh_ca_expiry.set(ca.not_after());
                    set_anchors(&anchors, &ca);
                    ca_store.set(ca);
                    changed = true;
                }
            }
            Ok(None) => {
                metrics.mesh_ca_reload_errors.inc();
                tracing::warn!(secret = %target.secret, "mesh CA Secret is gone; keeping the CA in use");
            }
            Err(e) => {
                metrics.mesh_ca_reload_errors.inc();
                tracing::warn!(error = %e, "mesh CA Secret unusable; keeping the CA in use");
            }
        }
        let left = serving_not_after - now_unix();
        if changed || left < identity::SERVING_CERT_LIFETIME_SECONDS / 3 {
            match identity_serving_key(&ca_store.get(), &target.dns_names) {
                Ok((key, not_after)) => {
                    serving.set(key);
                    serving_not_after = not_after;
                }
                Err(e) => {
                    metrics.mesh_ca_reload_errors.inc();
                    tracing::warn!(error = %e, "cannot re-issue the identity serving certificate");
                }
            }
        }
    }
}

/// Hands pods injected from now on the trust bundle of `ca`.
fn set_anchors(anchors: &TrustAnchors, ca: &MeshCa) {
    *anchors
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(ca.trust_bundle().to_owned());
}

#[cfg(test)]
mod tests;
