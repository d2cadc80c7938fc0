//! Start-up and graceful shutdown of the agent.

use crate::admin::AdminState;
use crate::api::{ApiSettings, AppState};
use crate::broker::{Broker, BrokerSettings};
use crate::delivery::Subscriptions;
use crate::error::AgentError;
use crate::metrics::Metrics;
use crate::subscription::SubscriptionSpec;
use crate::Config;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A started agent.
#[derive(Debug)]
pub struct Running {
    /// Bound app API addresses.
    pub app_addrs: Vec<SocketAddr>,
    /// Bound admin address.
    pub admin_addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: JoinHandle<Result<(), AgentError>>,
}

impl Running {
    /// Asks the agent to stop gracefully.
    pub fn stop(&self) {
        self.stop.send_replace(true);
    }

    /// Waits until the agent has stopped.
    pub async fn wait(self) -> Result<(), AgentError> {
        match self.task.await {
            Ok(r) => r,
            Err(e) => Err(AgentError::Config(format!("agent task failed: {e}"))),
        }
    }

    /// A sender that stops the agent when set to true.
    pub fn stopper(&self) -> watch::Sender<bool> {
        self.stop.clone()
    }
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, AgentError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| AgentError::Bind { addr, source })
}

/// Binds the listeners, recovers storage, and serves until stopped.
pub async fn start(config: Config) -> Result<Running, AgentError> {
    config.validate()?;
    shoal_exposition::mark_process_start();
    let node = config.node_name();
    let metrics = Arc::new(Metrics::new(config.metrics_topic_labels));
    let admin = Arc::new(AdminState {
        metrics: metrics.clone(),
        ready: false.into(),
        not_ready_reason: std::sync::Mutex::new(None),
        broker: std::sync::OnceLock::new(),
    });
    let admin_listener = bind(config.admin_addr).await?;
    let admin_addr = admin_listener
        .local_addr()
        .map_err(|source| AgentError::Bind {
            addr: config.admin_addr,
            source,
        })?;
    let (stop, stop_rx) = watch::channel(false);
    {
        let admin = admin.clone();
        let stop_rx = stop_rx.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| crate::admin::serve(admin.clone(), req));
            accept_loop(admin_listener, service, stop_rx, false).await;
        });
    }

    let identity_source = config.identity_source()?;
    std::fs::create_dir_all(&config.data_dir).map_err(|e| AgentError::Storage {
        path: config.data_dir.clone(),
        message: e.to_string(),
    })?;
    let started = std::time::Instant::now();
    let broker = Broker::open(
        BrokerSettings {
            data_dir: config.data_dir.clone(),
            default_partitions: config.default_partitions,
            dedupe_window: config.dedupe_window,
            max_pending_bytes: config.max_pending_bytes,
            log: config.log_config(),
            meshed: identity_source != crate::config::IdentitySource::None,
            namespace: config.namespace(),
        },
        metrics.clone(),
        config.fsync_interval,
    )?;
    let _ = admin.broker.set(Arc::downgrade(&broker));
    let subs = Subscriptions::open(
        broker.clone(),
        &config.data_dir,
        config.app_port,
        config.max_pull_waiters,
    )?;
    tracing::info!(
        topics = broker.topics().len(),
        subscriptions = subs.list().len(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        data_dir = %config.data_dir.display(),
        "storage recovered"
    );
    let mut deferred_subscriptions: Vec<(String, SubscriptionSpec)> = Vec::new();
    if let Some(json) = &config.subscriptions {
        let specs: Vec<SubscriptionSpec> = serde_json::from_str(json).map_err(|e| {
            AgentError::Config(format!(
                "--subscriptions is not a JSON array of subscriptions: {e}"
            ))
        })?;
        for spec in specs {
            let Some(name) = spec.name.clone() else {
                return Err(AgentError::Config(
                    "--subscriptions: every entry needs a \"name\"".into(),
                ));
            };
            match subs.put(&name, spec.clone()) {
                Ok(_) => {}
                // Another namespace's topic is learnt from the mesh, after start.
                Err(e) if e.code == "topic_not_found" => {
                    tracing::info!(subscription = %name, topic = %spec.topic, "subscription waits until this agent learns its topic from the mesh");
                    deferred_subscriptions.push((name, spec));
                }
                Err(e) => {
                    return Err(AgentError::Config(format!(
                        "--subscriptions: {name}: {}",
                        e.message
                    )))
                }
            }
        }
    }

    let mesh = if let Some((source, identity)) =
        first_identity(&config, identity_source, &node, &admin, &metrics).await?
    {
        let mesh = crate::mesh::Mesh::start(
            crate::mesh::MeshSettings {
                addr: config.mesh_addr,
                join: config.join.clone(),
                source,
                identity,
                advertise: config.advertise_addr()?,
                node: node.clone(),
                broker: config.broker,
                expected_size: crate::mesh::DEFAULT_EXPECTED_SIZE,
                known: crate::router::saved_member_addrs(&config.data_dir, &node),
            },
            metrics.clone(),
        )
        .await?;
        Some(Arc::new(mesh))
    } else {
        if !config.join.is_empty() {
            // An injected pod must start even so: run alone, and say so loudly.
            tracing::error!(
                join = ?config.join,
                "--join is ignored: joining needs a mesh identity (--dev, --cert-dir or --identity-addr); running alone"
            );
        }
        tracing::info!(
            "mesh off: no identity source (--dev, --cert-dir or --identity-addr); running alone"
        );
        if !config.broker {
            tracing::warn!("client-only agent (--broker=false) with no mesh: it refuses publishes (503 no_broker), as it keeps no messages of its own");
        }
        None
    };
    let (replication_stop, replication_stop_rx) = watch::channel(false);
    let mut replication_thread = None;
    let router = match &mesh {
        None => None,
        Some(m) => {
            let r = crate::router::Router::new(
                node.clone(),
                m.clone(),
                broker.clone(),
                metrics.clone(),
                config.max_forwards,
                Some(&config.data_dir),
            );
            // The first agent of a mesh (no --join) creates the meta group.
            let replication = crate::replication::Replication::open(
                crate::replication::ReplicationSettings {
                    me: node.clone(),
                    data_dir: config.data_dir.clone(),
                    seed: m.founder,
                    replace_after: config.replace_after,
                    fsync_interval: config.fsync_interval,
                    log: config.log_config(),
                },
                m.clone(),
                broker.clone(),
                metrics.clone(),
            )
            .map_err(|e| AgentError::Storage {
                path: config.data_dir.join(crate::replication::REPLICAS_DIR),
                message: e,
            })?;
            replication.start(replication_stop_rx);
            replication_thread = Some(replication.clone());
            let lag_source = Arc::downgrade(&replication);
            broker.set_replicated_lag_hook(Box::new(move |topic, groups| {
                lag_source
                    .upgrade()
                    .map(|r| r.lag(topic, groups))
                    .unwrap_or_default()
            }));
            r.attach_replication(replication);
            subs.attach_router(&r);
            r.start(&subs);
            Some(r)
        }
    };
    if !deferred_subscriptions.is_empty() {
        tokio::spawn(declare_when_known(subs.clone(), deferred_subscriptions));
    }
    let state = Arc::new(AppState {
        router: router.clone(),
        mesh: mesh.clone(),
        broker: broker.clone(),
        subs: subs.clone(),
        settings: ApiSettings {
            max_message_bytes: config.max_message_bytes,
            max_batch_bytes: config.max_batch_bytes,
            client_only: !config.broker,
        },
        metrics: metrics.clone(),
    });
    let mut app_addrs = Vec::new();
    let mut app_tasks = Vec::new();
    for addr in &config.app_addr {
        let listener = match bind(*addr).await {
            Ok(l) => l,
            // Containers often have no IPv6 loopback: serve on the others.
            Err(AgentError::Bind { source, .. })
                if addr.is_ipv6()
                    && config.app_addr.len() > 1
                    && source.kind() == std::io::ErrorKind::AddrNotAvailable =>
            {
                tracing::warn!(%addr, "IPv6 loopback unavailable; app API not served there");
                continue;
            }
            Err(e) => return Err(e),
        };
        let local = listener.local_addr().map_err(|source| AgentError::Bind {
            addr: *addr,
            source,
        })?;
        app_addrs.push(local);
        let state = state.clone();
        let stop_rx = stop_rx.clone();
        app_tasks.push(tokio::spawn(async move {
            let service = service_fn(move |req| crate::api::serve(state.clone(), req));
            accept_loop(listener, service, stop_rx, true).await;
        }));
    }
    // Ready once storage is recovered, listeners are bound, and (with seeds) the mesh is joined.
    match &mesh {
        Some(m) => {
            // Ready while joined; a node name another agent had first makes
            // it not ready for good, and `/readyz` says why.
            let admin = admin.clone();
            let mut view = m.watch();
            let mut stop_view = stop_rx.clone();
            let initial = m.view();
            admin.ready.store(initial.joined, Ordering::Release);
            tokio::spawn(async move {
                let mut was_joined = initial.joined;
                loop {
                    tokio::select! {
                        changed = view.changed() => if changed.is_err() { return },
                        _ = stopped(&mut stop_view) => return,
                    }
                    let (joined, conflict) = {
                        let v = view.borrow();
                        (v.joined, v.name_conflict.clone())
                    };
                    if let Some(c) = conflict {
                        *admin
                            .not_ready_reason
                            .lock()
                            .unwrap_or_else(|p| p.into_inner()) = Some(c.message());
                        admin.ready.store(false, Ordering::Release);
                        return;
                    }
                    if joined && !was_joined {
                        admin.ready.store(true, Ordering::Release);
                        tracing::info!("ready: joined the mesh");
                    }
                    was_joined |= joined;
                }
            });
        }
        None => admin.ready.store(true, Ordering::Release),
    }
    tracing::info!(node = %node, app = ?app_addrs, admin = %admin_addr, version = env!("CARGO_PKG_VERSION"), "shoal-agent ready");

    let shutdown_timeout = config.shutdown_timeout;
    let mut stop_wait = stop_rx.clone();
    let task = tokio::spawn(async move {
        stopped(&mut stop_wait).await;
        tracing::info!("stopping: no new requests; in-flight deliveries may finish");
        admin.ready.store(false, Ordering::Release);
        if let Some(m) = &mesh {
            m.stopping();
        }
        let deadline = tokio::time::Instant::now() + shutdown_timeout;
        // Partitions go to their next homes before this agent leaves the
        // mesh, so nothing acknowledged stays behind on a stopped agent.
        // A hand-off cut short by the deadline leaves the agent as if it
        // crashed: its remaining partitions wait for its return elsewhere.
        if let Some(r) = &router {
            if tokio::time::timeout_at(deadline, r.leave()).await.is_err() {
                tracing::warn!("hand-off did not finish before --shutdown-timeout; partitions left here are unavailable until this agent returns");
            }
        }
        if let Some(m) = &mesh {
            m.leave().await;
        }
        let _ = replication_stop.send(true);
        if let Some(r) = replication_thread {
            // Its last round flushes what `interval` topics left unsynced.
            if tokio::task::spawn_blocking(move || r.join()).await.is_err() {
                tracing::error!("stopping the replication thread failed");
            }
        }
        subs.shutdown(deadline).await;
        for t in app_tasks {
            let _ = tokio::time::timeout_at(deadline, t).await;
        }
        let flush = tokio::task::spawn_blocking(move || broker.shutdown());
        if flush.await.is_err() {
            tracing::error!("flushing storage failed during shutdown");
        }
        tracing::info!("stopped");
        Ok(())
    });
    Ok(Running {
        app_addrs,
        admin_addr,
        stop,
        task,
    })
}

async fn accept_loop<S, B>(
    listener: TcpListener,
    service: S,
    mut stop: watch::Receiver<bool>,
    http2: bool,
) where
    S: hyper::service::Service<
            hyper::Request<hyper::body::Incoming>,
            Response = hyper::Response<B>,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    if !http2 {
        builder = builder.http1_only();
    }
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _) = match accepted {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let conn = builder.serve_connection(TokioIo::new(Lingering(Some(stream))), service.clone()).into_owned();
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                });
            }
            _ = stopped(&mut stop) => break,
        }
    }
    drop(listener);
    graceful.shutdown().await;
}

/// Most request bytes read and thrown away after the server ended a connection.
pub const LINGER_MAX_BYTES: usize = 16 * 1024 * 1024;
/// Longest a connection the server ended is kept open to read them.
pub const LINGER_MAX_TIME: std::time::Duration = std::time::Duration::from_secs(5);

/// A connection's socket that, when the server is done with it, is not
/// closed at once while the client may still be sending: an answer given
/// before the request body was read (413, 400, 405) must reach clients that
/// write their whole request before reading (Python's urllib and
/// http.client, plain sockets). Closing a socket with unread data makes the
/// kernel reset the connection, and the client then gets "broken pipe" or
/// "connection reset" instead of the answer. So, as nginx's lingering close
/// does, the write side is shut (the client sees the end of the answer) and
/// what the client still sends is read and discarded, up to
/// [`LINGER_MAX_BYTES`] and [`LINGER_MAX_TIME`], before the socket closes.
struct Lingering(Option<tokio::net::TcpStream>);

impl Drop for Lingering {
    fn drop(&mut self) {
        let Some(stream) = self.0.take() else {
            return;
        };
        // The usual case: the client closed first; nothing to wait for.
        let mut probe = [0u8; 1];
        if matches!(stream.try_read(&mut probe), Ok(0)) {
            return;
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(linger(stream));
        }
    }
}

async fn linger(mut stream: tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = stream.shutdown().await;
    let deadline = tokio::time::Instant::now() + LINGER_MAX_TIME;
    let mut buf = vec![0u8; 64 * 1024];
    let mut left = LINGER_MAX_BYTES;
    while left > 0 {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => left = left.saturating_sub(n),
            _ => break,
        }
    }
}

impl Lingering {
    fn stream(
        self: std::pin::Pin<&mut Self>,
    ) -> std::io::Result<std::pin::Pin<&mut tokio::net::TcpStream>> {
        match self.get_mut().0.as_mut() {
            Some(s) => Ok(std::pin::Pin::new(s)),
            None => Err(std::io::ErrorKind::NotConnected.into()),
        }
    }
}

impl tokio::io::AsyncRead for Lingering {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.stream() {
            Ok(s) => s.poll_read(cx, buf),
            Err(e) => std::task::Poll::Ready(Err(e)),
        }
    }
}

impl tokio::io::AsyncWrite for Lingering {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.stream() {
            Ok(s) => s.poll_write(cx, buf),
            Err(e) => std::task::Poll::Ready(Err(e)),
        }
    }

    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.stream() {
            Ok(s) => s.poll_write_vectored(cx, bufs),
            Err(e) => std::task::Poll::Ready(Err(e)),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.0.as_ref().is_some_and(|s| s.is_write_vectored())
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.stream() {
            Ok(s) => s.poll_flush(cx),
            Err(e) => std::task::Poll::Ready(Err(e)),
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.stream() {
            Ok(s) => s.poll_shutdown(cx),
            Err(e) => std::task::Poll::Ready(Err(e)),
        }
    }
}

/// Resolves once the stop flag is set (or its sender is gone).
pub async fn stopped(rx: &mut watch::Receiver<bool>) {
    loop {
        if *rx.borrow_and_update() {
            return;
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// Resolves on SIGTERM or SIGINT.
pub async fn signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = term => {},
        _ = tokio::signal::ctrl_c() => {},
    }
}

/// The identity service source of `service` (an [`IdentitySource::Service`]).
fn service_source(
    service: crate::config::IdentitySource,
    config: &Config,
) -> Result<shoal_mesh::client::IdentityServiceSource, AgentError> {
    let crate::config::IdentitySource::Service {
        addr,
        server_name,
        anchors,
        token_file,
    } = service
    else {
        return Err(AgentError::Config(
            "internal: not an identity service".into(),
        ));
    };
    let id = shoal_mesh::SpiffeId::new(
        &config.trust_domain,
        &config.namespace(),
        &config.service_account(),
    )
    .map_err(|e| AgentError::Config(format!("mesh identity: {e}")))?;
    shoal_mesh::client::IdentityServiceSource::new(shoal_mesh::client::ClientConfig {
        endpoint: addr,
        server_name,
        token_file,
        anchors_pem: anchors,
        id,
        timeout: shoal_mesh::client::DEFAULT_TIMEOUT,
    })
    .map_err(|e| AgentError::Config(format!("mesh: {e}")))
}

/// The mesh identity to start with, and its source: none when the agent has
/// no identity source. From the identity service, the first certificate is
/// waited for (retrying with backoff, the agent not ready and `/readyz`
/// saying why); files and the development CA must load at once.
async fn first_identity(
    config: &Config,
    identity_source: crate::config::IdentitySource,
    node: &str,
    admin: &AdminState,
    metrics: &Metrics,
) -> Result<
    Option<(
        Arc<dyn shoal_mesh::certs::CertSource>,
        shoal_mesh::certs::Identity,
    )>,
    AgentError,
> {
    use crate::config::IdentitySource;
    use shoal_mesh::certs::{CertSource, DevCertSource, FileCertSource};
    let mesh_err = |e: shoal_mesh::MeshError| AgentError::Config(format!("mesh: {e}"));
    let spiffe = |trust_domain: &str| {
        shoal_mesh::SpiffeId::new(trust_domain, &config.namespace(), &config.service_account())
            .map_err(|e| AgentError::Config(format!("mesh identity: {e}")))
    };
    let (source, waits): (Arc<dyn CertSource>, bool) = match identity_source {
        IdentitySource::None => return Ok(None),
        IdentitySource::Dev => (
            Arc::new(DevCertSource::new(
                &config.ca_dir,
                node,
                spiffe(shoal_mesh::identity::DEV_TRUST_DOMAIN)?,
            )),
            false,
        ),
        IdentitySource::Files(dir) => (Arc::new(FileCertSource::in_dir(&dir)), false),
        IdentitySource::FilesWithDiscovery { dir, service } => (
            Arc::new(shoal_mesh::client::FilesWithDiscovery::new(
                FileCertSource::in_dir(&dir),
                service_source(*service, config)?,
            )),
            true,
        ),
        service @ IdentitySource::Service { .. } => {
            (Arc::new(service_source(service, config)?), true)
        }
    };
    let mut failures = 0u32;
    loop {
        let loaded = crate::mesh::load_identity(&source).await.and_then(|identity| {
            if source.founds_mesh() == Some(false) && source.peers().is_empty() {
                // Alone but not the oldest pod: another agent must found
                // the mesh; running alone would start a second.
                Err(shoal_mesh::MeshError::Certificate(
                    "the identity service named no other agent yet and this pod is not the oldest injected one (which founds the mesh); asking again".into(),
                ))
            } else {
                Ok(identity)
            }
        });
        match loaded {
            Ok(identity) if identity.id.namespace != config.namespace() => {
                // Peers authorize this agent by its certificate's namespace;
                // its app's plain topic names must mean the same one.
                return Err(AgentError::Config(format!(
                    "the mesh certificate ({}, from {}) is for namespace {:?}, but this agent's namespace (--namespace, $POD_NAMESPACE) is {:?}: they must be the same",
                    identity.id,
                    source.describe(),
                    identity.id.namespace,
                    config.namespace()
                )));
            }
            Ok(identity) => {
                let bound = identity
                    .chain
                    .first()
                    .map(shoal_mesh::certs::node_names_of)
                    .unwrap_or_default();
                if bound.len() > 1 {
                    return Err(AgentError::Config(format!(
                        "the mesh certificate ({}) binds several node names {bound:?}: peers refuse it; issue one with a single DNS SAN <node>.node.shoal",
                        source.describe()
                    )));
                }
                let certified = bound.into_iter().next();
                if let Some(certified) = certified.filter(|n| n != node) {
                    // Peers would refuse this agent's subscriber lists and
                    // leave notices, and it would run half-deaf.
                    return Err(AgentError::Config(format!(
                        "the mesh certificate ({}) is bound to node {certified:?}, but this agent's node name (--node-name, $SHOAL_NODE_NAME) is {node:?}: in a pod, leave SHOAL_NODE_NAME to the injector (`<pod>.<namespace>`)",
                        source.describe()
                    )));
                }
                *admin
                    .not_ready_reason
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = None;
                tracing::info!(id = %identity.id, source = %source.describe(), "mesh certificate loaded");
                return Ok(Some((source, identity)));
            }
            Err(e) if !waits => return Err(mesh_err(e)),
            Err(e) => {
                failures = failures.saturating_add(1);
                metrics.mesh_certificate_failures.inc();
                let wait = shoal_mesh::client::backoff(failures);
                let why = format!(
                    "waiting for a mesh certificate from {}: {e}",
                    source.describe()
                );
                tracing::warn!(retry_in = ?wait, "{why}");
                *admin
                    .not_ready_reason
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = Some(why);
                tokio::time::sleep(wait).await;
            }
        }
    }
}

/// How often subscriptions waiting for another namespace's topic try again.
const DEFERRED_SUBSCRIPTION_RETRY: std::time::Duration = std::time::Duration::from_secs(2);

/// Declares `--subscriptions` entries whose topic (another namespace's) this
/// agent had not heard of at start, once it has.
async fn declare_when_known(
    subs: Arc<Subscriptions>,
    mut waiting: Vec<(String, SubscriptionSpec)>,
) {
    while !waiting.is_empty() {
        tokio::time::sleep(DEFERRED_SUBSCRIPTION_RETRY).await;
        let mut still = Vec::new();
        for (name, spec) in waiting {
            match subs.put(&name, spec.clone()) {
                Ok(_) => {
                    tracing::info!(subscription = %name, topic = %spec.topic, "subscription declared once its topic was known")
                }
                Err(e) if e.code == "topic_not_found" => still.push((name, spec)),
                Err(e) => {
                    tracing::error!(subscription = %name, error = %e.message, "--subscriptions entry refused")
                }
            }
        }
        waiting = still;
    }
}
