//! The agent's configuration: every flag is also a `SHOAL_*` environment variable.

use crate::error::AgentError;
use clap::{Parser, ValueEnum};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Default app API port.
pub const DEFAULT_APP_PORT_API: u16 = 4700;
/// Default largest accepted message payload.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 1024 * 1024;
/// Default dedupe window for `Shoal-Id`.
pub const DEFAULT_DEDUPE_WINDOW: Duration = Duration::from_secs(120);
/// Default interval between fsyncs for topics with the `interval` policy.
pub const DEFAULT_FSYNC_INTERVAL: Duration = Duration::from_millis(200);
/// Default time a graceful stop may take.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(20);
/// Default partitions of an auto-created topic.
pub const DEFAULT_PARTITIONS: u32 = 4;
/// Default trust domain of cluster identities (the injector's default).
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// Where the agent's mesh identity comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IdentitySource {
    /// No identity: the mesh is off and the agent runs alone.
    None,
    /// `--dev`: the development CA in `--ca-dir`.
    Dev,
    /// `--cert-dir`: certificate, key and roots from files.
    Files(PathBuf),
    /// `--cert-dir` and `--identity-addr`: certificate, key and roots from
    /// files (a Kubernetes pod certificate volume), peers from the
    /// identity service's discovery endpoint.
    FilesWithDiscovery {
        /// The directory of the files.
        dir: PathBuf,
        /// The identity service, as in [`IdentitySource::Service`].
        service: Box<IdentitySource>,
    },
    /// `--identity-addr`: the injector's identity service.
    Service {
        /// `host:port`.
        addr: String,
        /// The name its certificate carries.
        server_name: String,
        /// Roots its certificate chains to, PEM.
        anchors: String,
        /// The service-account token file.
        token_file: PathBuf,
    },
}

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Plain,
    /// One JSON object per line.
    Json,
}

/// `shoal-agent`: the Shoal sidecar. Serves the app API on loopback, stores
/// durable topics on disk, delivers to subscribers, exports metrics.
#[derive(Clone, Debug, Parser)]
#[command(name = "shoal-agent", version, about, long_about = None)]
pub struct Config {
    /// App API listen addresses, comma-separated. Loopback only: the app API
    /// carries message data and is never exposed outside the pod.
    #[arg(
        long,
        env = "SHOAL_APP_ADDR",
        value_delimiter = ',',
        default_value = "127.0.0.1:4700,[::1]:4700"
    )]
    pub app_addr: Vec<SocketAddr>,

    /// Mesh (QUIC, mutual TLS) listen address. The mesh runs with --dev (identity from the dev CA).
    #[arg(long, env = "SHOAL_MESH_ADDR", default_value = "0.0.0.0:4701")]
    pub mesh_addr: SocketAddr,

    /// Admin listen address: /metrics, /livez, /readyz. Carries no message data.
    #[arg(long, env = "SHOAL_ADMIN_ADDR", default_value = "0.0.0.0:4702")]
    pub admin_addr: SocketAddr,

    /// Directory for partition logs, committed offsets and metadata.
    #[arg(long, env = "SHOAL_DATA_DIR", default_value = "shoal-data")]
    pub data_dir: PathBuf,

    /// Mesh address (host:port) of another agent to join; repeatable or comma-separated.
    #[arg(long, env = "SHOAL_JOIN", value_delimiter = ',')]
    pub join: Vec<String>,

    /// Development mode: the mesh identity comes from a CA generated in --ca-dir (shared by local agents).
    #[arg(long, env = "SHOAL_DEV")]
    pub dev: bool,

    /// Directory of the development CA, shared by local agents.
    #[arg(long, env = "SHOAL_CA_DIR", default_value = "shoal-ca")]
    pub ca_dir: PathBuf,

    /// The mesh identity from files: `cert.pem`, `key.pem` and `ca.pem` in
    /// this directory (cert-manager, a pod-certificate volume), reloaded
    /// when they change.
    #[arg(long, env = "SHOAL_CERT_DIR", conflicts_with = "dev")]
    pub cert_dir: Option<PathBuf>,

    /// The injector's identity service (`host:port`): the agent trades a CSR
    /// and its service-account token (--token-file) for a mesh certificate,
    /// and learns other agents' mesh addresses with it. With --cert-dir
    /// (pod certificates), only the addresses.
    #[arg(long, env = "SHOAL_IDENTITY_ADDR", conflicts_with = "dev")]
    pub identity_addr: Option<String>,

    /// The name the identity service's certificate carries. Default: the
    /// host of --identity-addr.
    #[arg(long, env = "SHOAL_IDENTITY_SERVER_NAME")]
    pub identity_server_name: Option<String>,

    /// Roots (PEM) the identity service's certificate must chain to: the
    /// mesh trust bundle, which the injector writes into the pod spec.
    #[arg(long, env = "SHOAL_IDENTITY_TRUST_ANCHORS", hide_env_values = true)]
    pub identity_trust_anchors: Option<String>,

    /// The projected service-account token (audience `shoal`) sent to the
    /// identity service; re-read for every request.
    #[arg(long, env = "SHOAL_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,

    /// Trust domain of the mesh identity asked of the identity service.
    #[arg(long, env = "SHOAL_TRUST_DOMAIN", default_value = DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,

    /// The mesh address other agents reach this one at. Default: $POD_IP
    /// with the --mesh-addr port when set, else the bound address
    /// (127.0.0.1 when bound to 0.0.0.0).
    #[arg(long, env = "SHOAL_ADVERTISE_ADDR")]
    pub advertise_addr: Option<SocketAddr>,

    /// Whether this agent stores partitions (false: a client-only agent, for Jobs).
    #[arg(long, env = "SHOAL_BROKER", default_value_t = true, action = clap::ArgAction::Set)]
    pub broker: bool,

    /// Port of the app on localhost, where push subscriptions deliver.
    #[arg(long, env = "SHOAL_APP_PORT")]
    pub app_port: Option<u16>,

    /// This agent's name in logs, metrics and (later) the mesh. Default: the host name.
    #[arg(long, env = "SHOAL_NODE_NAME")]
    pub node_name: Option<String>,

    /// Kubernetes namespace of this agent's app and identity: plain topic names are its topics (else $POD_NAMESPACE, else `default`).
    #[arg(long, env = "SHOAL_NAMESPACE")]
    pub namespace: Option<String>,

    /// Service account of this agent's identity (else $POD_SERVICE_ACCOUNT, else `default`).
    #[arg(long, env = "SHOAL_SERVICE_ACCOUNT")]
    pub service_account: Option<String>,

    /// Subscriptions to declare at start, as a JSON array of
    /// `{"name": ..., "topic": ..., ...}` (the same fields as PUT /v1/subscriptions/{name}).
    #[arg(long, env = "SHOAL_SUBSCRIPTIONS")]
    pub subscriptions: Option<String>,

    /// Largest accepted message payload in bytes; larger publishes get 413.
    #[arg(long, env = "SHOAL_MAX_MESSAGE_BYTES", default_value_t = DEFAULT_MAX_MESSAGE_BYTES)]
    pub max_message_bytes: usize,

    /// Largest accepted batch request body in bytes.
    #[arg(long, env = "SHOAL_MAX_BATCH_BYTES", default_value_t = 16 * 1024 * 1024)]
    pub max_batch_bytes: usize,

    /// Window within which a repeated `Shoal-Id` is stored once.
    #[arg(long, env = "SHOAL_DEDUPE_WINDOW", default_value = "2m", value_parser = parse_duration_arg)]
    pub dedupe_window: Duration,

    /// Interval between fsyncs for topics with `fsync: interval`.
    #[arg(long, env = "SHOAL_FSYNC_INTERVAL", default_value = "200ms", value_parser = parse_duration_arg)]
    pub fsync_interval: Duration,

    /// Partitions of a topic created by its first publish.
    #[arg(long, env = "SHOAL_DEFAULT_PARTITIONS", default_value_t = DEFAULT_PARTITIONS)]
    pub default_partitions: u32,

    /// Size at which a partition's active log segment is sealed and a new
    /// one started. Retention deletes whole segments, so smaller segments
    /// follow `maxBytes` and `maxAge` more closely, at the cost of more files.
    #[arg(long, env = "SHOAL_SEGMENT_BYTES", default_value_t = shoal_storage::DEFAULT_SEGMENT_BYTES)]
    pub segment_bytes: u64,

    /// Most concurrent long-poll pulls and streams; more get 429.
    #[arg(long, env = "SHOAL_MAX_PULL_WAITERS", default_value_t = 1024)]
    pub max_pull_waiters: usize,

    /// Unwritten bytes a partition may buffer before publishes get 503.
    #[arg(long, env = "SHOAL_MAX_PENDING_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub max_pending_bytes: u64,

    /// Most publish requests forwarded to home agents and not yet answered;
    /// more get 503 until a home catches up (a slow home slows its publishers
    /// and memory stays bounded).
    #[arg(long, env = "SHOAL_MAX_FORWARDS", default_value_t = crate::router::DEFAULT_MAX_FORWARDS)]
    pub max_forwards: usize,

    /// How long an agent may be down before its replicas of replicated
    /// partitions are placed on other agents (a pod replaced under a new
    /// name never returns; a restarting one usually does within this).
    #[arg(long, env = "SHOAL_REPLACE_AFTER", default_value = "60s", value_parser = parse_duration_arg)]
    pub replace_after: Duration,

    /// How long a graceful stop (SIGTERM, SIGINT) may take.
    #[arg(long, env = "SHOAL_SHUTDOWN_TIMEOUT", default_value = "20s", value_parser = parse_duration_arg)]
    pub shutdown_timeout: Duration,

    /// Label metrics with the topic name (switch off when topics are many).
    #[arg(long, env = "SHOAL_METRICS_TOPIC_LABELS", default_value_t = true, action = clap::ArgAction::Set)]
    pub metrics_topic_labels: bool,

    /// Threads running the agent's tasks (the app API, the mesh, routing;
    /// replicated partitions' periodic fsyncs run on a thread of their own).
    /// A sidecar shares its pod's CPU with the app: 1 to 64.
    #[arg(long, env = "SHOAL_WORKER_THREADS", default_value_t = crate::entry::DEFAULT_WORKER_THREADS, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub worker_threads: u16,

    /// Log filter: error, warn, info, debug, trace, or a tracing directive list.
    #[arg(long, env = "SHOAL_LOG_LEVEL", default_value = "info")]
    pub log_level: String,

    /// Log line format.
    #[arg(long, env = "SHOAL_LOG_FORMAT", value_enum, default_value = "plain")]
    pub log_format: LogFormat,
}

/// Smallest `--segment-bytes` (a segment holds a header and at least one entry).
pub const MIN_SEGMENT_BYTES: u64 = 4096;

/// The log settings of every partition of this agent.
impl Config {
    /// How each partition's log is cut into segments (`--segment-bytes`).
    pub fn log_config(&self) -> shoal_storage::LogConfig {
        shoal_storage::LogConfig {
            segment_bytes: self.segment_bytes,
            ..shoal_storage::LogConfig::default()
        }
    }
}

fn parse_duration_arg(text: &str) -> Result<Duration, String> {
    crate::time::parse_duration(text)
        .ok_or_else(|| format!("invalid duration {text:?}: use forms like 500ms, 30s, 2m"))
}

impl Config {
    /// Checks what clap cannot: loopback-only app addresses, sane limits.
    pub fn validate(&self) -> Result<(), AgentError> {
        if self.app_addr.is_empty() {
            return Err(AgentError::Config(
                "--app-addr needs at least one address".into(),
            ));
        }
        if let Some(addr) = self.app_addr.iter().find(|a| !a.ip().is_loopback()) {
            return Err(AgentError::Config(format!(
                "--app-addr {addr} is not a loopback address: the app API carries message data and listens on loopback only (127.0.0.1, ::1)"
            )));
        }
        crate::names::validate_namespace(&self.namespace()).map_err(|e| {
            AgentError::Config(format!("--namespace (or $POD_NAMESPACE): {}", e.message))
        })?;
        if self.default_partitions == 0 || self.default_partitions > crate::topic::MAX_PARTITIONS {
            return Err(AgentError::Config(format!(
                "--default-partitions must be 1..={}",
                crate::topic::MAX_PARTITIONS
            )));
        }
        if self.max_message_bytes == 0
            || self.max_message_bytes > shoal_storage::MAX_ENTRY_BYTES - 65536
        {
            return Err(AgentError::Config(format!(
                "--max-message-bytes must be between 1 and {}",
                shoal_storage::MAX_ENTRY_BYTES - 65536
            )));
        }
        let hour = Duration::from_secs(3600);
        for (flag, value, min, max) in [
            (
                "--fsync-interval",
                self.fsync_interval,
                Duration::from_millis(1),
                hour,
            ),
            (
                "--shutdown-timeout",
                self.shutdown_timeout,
                Duration::ZERO,
                hour,
            ),
            (
                "--replace-after",
                self.replace_after,
                Duration::from_secs(1),
                24 * hour,
            ),
            (
                "--dedupe-window",
                self.dedupe_window,
                Duration::ZERO,
                24 * hour,
            ),
        ] {
            if value < min || value > max {
                return Err(AgentError::Config(format!(
                    "{flag} must be between {} and {}",
                    crate::time::format_duration(min),
                    crate::time::format_duration(max)
                )));
            }
        }
        if !(MIN_SEGMENT_BYTES..=shoal_storage::MAX_SEGMENT_BYTES).contains(&self.segment_bytes) {
            return Err(AgentError::Config(format!(
                "--segment-bytes must be between {MIN_SEGMENT_BYTES} and {}",
                shoal_storage::MAX_SEGMENT_BYTES
            )));
        }
        if self.max_pull_waiters == 0 {
            return Err(AgentError::Config(
                "--max-pull-waiters must be at least 1".into(),
            ));
        }
        Ok(())
    }

    /// Where the mesh identity comes from, checked: the identity service
    /// needs its trust anchors and a token file.
    pub fn identity_source(&self) -> Result<IdentitySource, AgentError> {
        if self.dev {
            return Ok(IdentitySource::Dev);
        }
        let service = self.identity_service()?;
        Ok(match (&self.cert_dir, service) {
            (Some(dir), Some(service)) => IdentitySource::FilesWithDiscovery {
                dir: dir.clone(),
                service: Box::new(service),
            },
            (Some(dir), None) => IdentitySource::Files(dir.clone()),
            (None, Some(service)) => service,
            (None, None) => IdentitySource::None,
        })
    }

    /// The identity service's settings, checked; None without
    /// --identity-addr.
    fn identity_service(&self) -> Result<Option<IdentitySource>, AgentError> {
        let Some(addr) = self.identity_addr.clone().filter(|a| !a.trim().is_empty()) else {
            return Ok(None);
        };
        let host = match addr.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
            _ => {
                return Err(AgentError::Config(format!(
                    "--identity-addr {addr:?} is not host:port"
                )))
            }
        };
        let anchors = self
            .identity_trust_anchors
            .clone()
            .filter(|a| !a.trim().is_empty())
            .ok_or_else(|| {
                AgentError::Config(
                    "--identity-addr needs --identity-trust-anchors (SHOAL_IDENTITY_TRUST_ANCHORS): the PEM roots the identity service's certificate chains to, which the injector writes into the pod spec".into(),
                )
            })?;
        let token_file = self.token_file.clone().ok_or_else(|| {
            AgentError::Config(
                "--identity-addr needs --token-file (SHOAL_TOKEN_FILE): the projected service-account token with audience shoal".into(),
            )
        })?;
        Ok(Some(IdentitySource::Service {
            server_name: self.identity_server_name.clone().unwrap_or(host),
            addr,
            anchors,
            token_file,
        }))
    }

    /// The mesh address to advertise: the flag, else (outside `--dev`, bound
    /// to an unspecified address, as in a pod) $POD_IP with the mesh port,
    /// else none (the bound address).
    pub fn advertise_addr(&self) -> Result<Option<SocketAddr>, AgentError> {
        if let Some(a) = self.advertise_addr {
            return Ok(Some(a));
        }
        if self.dev || !self.mesh_addr.ip().is_unspecified() {
            return Ok(None);
        }
        match std::env::var("POD_IP") {
            Ok(ip) if !ip.trim().is_empty() => {
                let ip: std::net::IpAddr = ip.trim().parse().map_err(|e| {
                    AgentError::Config(format!("$POD_IP {ip:?} is not an IP address: {e}"))
                })?;
                Ok(Some(SocketAddr::new(ip, self.mesh_addr.port())))
            }
            _ => Ok(None),
        }
    }

    /// The identity's namespace: the flag, else $POD_NAMESPACE, else `default`.
    pub fn namespace(&self) -> String {
        self.namespace
            .clone()
            .or_else(|| std::env::var("POD_NAMESPACE").ok())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "default".to_string())
    }

    /// The identity's service account: the flag, else $POD_SERVICE_ACCOUNT, else `default`.
    pub fn service_account(&self) -> String {
        self.service_account
            .clone()
            .or_else(|| std::env::var("POD_SERVICE_ACCOUNT").ok())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "default".to_string())
    }

    /// The node name: the flag, else the host name, else `shoal-agent`.
    pub fn node_name(&self) -> String {
        self.node_name
            .clone()
            .or_else(|| std::env::var("HOSTNAME").ok())
            .or_else(|| {
                std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .ok()
                    .map(|s| s.trim().to_string())
            })
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "shoal-agent".to_string())
    }
}

#[cfg(test)]
mod tests;
