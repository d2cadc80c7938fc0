//! What the injector adds to a pod: the agent's image, ports, resources and
//! the defaults every annotation falls back to.
//!
//! One [`InjectConfig`] is shared by the webhook and by offline injection
//! (`shoal inject`), so both produce the same pod.

use std::collections::BTreeMap;

/// Name of the injected agent container; its presence marks a pod as injected.
pub const AGENT_CONTAINER_NAME: &str = "shoal-agent";
/// Default agent image: the agent built from this workspace, tagged with the crate version.
pub const DEFAULT_AGENT_IMAGE: &str = concat!("shoal-agent:", env!("CARGO_PKG_VERSION"));
/// Default image pull policy of the agent container.
pub const DEFAULT_IMAGE_PULL_POLICY: &str = "IfNotPresent";
/// The agent's app API port (loopback only, so it is not declared as a container port).
pub const DEFAULT_APP_API_PORT: u16 = 4700;
/// The agent's mesh port (QUIC over UDP).
pub const DEFAULT_MESH_PORT: u16 = 4701;
/// The agent's admin port (`/metrics`, `/livez`, `/readyz`).
pub const DEFAULT_ADMIN_PORT: u16 = 4702;
/// Name of the mesh container port.
pub const MESH_PORT_NAME: &str = "shoal-mesh";
/// Name of the admin container port.
pub const ADMIN_PORT_NAME: &str = "shoal-admin";
/// Where the agent keeps its data, on an `emptyDir` volume.
pub const DATA_DIR: &str = "/var/lib/shoal";
/// Name of the data volume.
pub const DATA_VOLUME_NAME: &str = "shoal-data";
/// Name of the projected service-account token volume.
pub const TOKEN_VOLUME_NAME: &str = "shoal-token";
/// Where the projected token volume is mounted; the token is the file `token` inside.
pub const TOKEN_MOUNT_PATH: &str = "/var/run/secrets/shoal.io/serviceaccount";
/// File name of the projected token inside [`TOKEN_MOUNT_PATH`].
pub const TOKEN_FILE_NAME: &str = "token";
/// Mode of the files of the agent's projected volumes (token, pod
/// certificate). Only the agent container mounts them. The kubelet makes
/// them root's unless every container of the pod runs as one user, and an
/// app usually runs as its own: readable by owner and group only, the
/// agent (uid 65532) could not read them in a pod without an `fsGroup`.
pub const PROJECTED_FILE_MODE: i32 = 0o444;
/// Name of the pod-certificate volume (`--pod-certificates`).
pub const POD_CERT_VOLUME_NAME: &str = "shoal-identity";
/// Where the pod-certificate volume is mounted: `cert.pem`, `key.pem` and
/// `ca.pem`, the agent's `SHOAL_CERT_DIR`.
pub const POD_CERT_MOUNT_PATH: &str = "/var/run/secrets/shoal.io/identity";
/// Audience of the projected service-account token.
pub const DEFAULT_TOKEN_AUDIENCE: &str = "shoal";
/// Lifetime asked for the projected token (the kubelet renews it at 80 %).
pub const DEFAULT_TOKEN_EXPIRATION_SECONDS: i64 = 3600;
/// Default CPU request of the agent.
pub const DEFAULT_CPU_REQUEST: &str = "10m";
/// Default memory request of the agent.
pub const DEFAULT_MEMORY_REQUEST: &str = "32Mi";
/// Default memory limit of the agent (no CPU limit by default: throttling hurts latency).
pub const DEFAULT_MEMORY_LIMIT: &str = "256Mi";
/// Default log level handed to the agent.
pub const DEFAULT_LOG_LEVEL: &str = "info";
/// Log format handed to the agent in a cluster (one JSON object a line).
pub const AGENT_LOG_FORMAT: &str = "json";
/// Numeric uid and gid the agent runs as (the images' non-root user).
pub const AGENT_UID: i64 = 65532;
/// How long a classic sidecar waits in `preStop` so the app drains first.
pub const DEFAULT_DRAIN_SECONDS: i64 = 5;
/// The URL apps use to reach their agent, injected as `SHOAL_URL`.
pub const DEFAULT_SHOAL_URL: &str = "http://127.0.0.1:4700";
/// Namespaces never injected, whatever their annotations say.
pub const DEFAULT_EXCLUDED_NAMESPACES: [&str; 2] = ["kube-system", "shoal-system"];

/// How the agent joins the pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum SidecarMode {
    /// An init container with `restartPolicy: Always` (Kubernetes 1.29+): it
    /// starts before the app's containers and stops after them.
    #[default]
    Native,
    /// A regular container next to the app, with a `preStop` pause so the
    /// app drains first; for clusters without native sidecars.
    Classic,
}

impl SidecarMode {
    /// The annotation / flag spelling of this mode.
    pub fn as_str(self) -> &'static str {
        match self {
            SidecarMode::Native => "native",
            SidecarMode::Classic => "classic",
        }
    }
}

/// Requests and limits of the agent container, as Kubernetes quantities.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resources {
    /// CPU request (`None`: none).
    pub cpu_request: Option<String>,
    /// CPU limit (`None`: none).
    pub cpu_limit: Option<String>,
    /// Memory request (`None`: none).
    pub memory_request: Option<String>,
    /// Memory limit (`None`: none).
    pub memory_limit: Option<String>,
}

impl Default for Resources {
    fn default() -> Self {
        Resources {
            cpu_request: Some(DEFAULT_CPU_REQUEST.to_owned()),
            cpu_limit: None,
            memory_request: Some(DEFAULT_MEMORY_REQUEST.to_owned()),
            memory_limit: Some(DEFAULT_MEMORY_LIMIT.to_owned()),
        }
    }
}

/// Everything the injector needs to know to mutate a pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InjectConfig {
    /// Agent image reference.
    pub image: String,
    /// Agent image pull policy.
    pub image_pull_policy: String,
    /// Default sidecar mode (a pod may override it with `shoal.io/sidecar`).
    pub sidecar_mode: SidecarMode,
    /// Default resources (pods may override each with annotations).
    pub resources: Resources,
    /// Default agent log level.
    pub log_level: String,
    /// Mesh seed addresses handed to the agent as `SHOAL_JOIN` (empty: none).
    pub join: Vec<String>,
    /// Whether the agent needs a projected service-account token (its mesh
    /// identity); when true, pods that turn token mounting off are skipped.
    pub identity: bool,
    /// Audience of the projected token.
    pub token_audience: String,
    /// Lifetime of the projected token in seconds.
    pub token_expiration_seconds: i64,
    /// `preStop` pause of a classic sidecar, in seconds.
    pub drain_seconds: i64,
    /// Value of `SHOAL_URL` put into app containers.
    pub shoal_url: String,
    /// Namespaces never injected.
    pub excluded_namespaces: Vec<String>,
    /// Extra environment for the agent container (operator-chosen `SHOAL_*` settings).
    pub extra_env: BTreeMap<String, String>,
    /// The identity service as agents reach it (`host:port`), handed to the
    /// agent as `SHOAL_IDENTITY_ADDR`.
    pub identity_addr: String,
    /// The mesh trust bundle (PEM), handed to the agent as
    /// `SHOAL_IDENTITY_TRUST_ANCHORS` so it can verify the identity service
    /// before it has a certificate. Unknown (None) until the mesh CA is
    /// loaded; a pod injected then gets no identity settings and its agent
    /// runs alone.
    pub trust_anchors: Option<String>,
    /// Whether the agent's certificate comes from a Kubernetes pod
    /// certificate volume (signer `shoal.io/mesh`, KEP-4317) rather than
    /// from a CSR to the identity service; the identity service then only
    /// names peers.
    pub pod_certificates: bool,
}

/// Default address of the identity service as agents reach it.
pub const DEFAULT_IDENTITY_ADDR: &str = "shoal-injector.shoal-system.svc:4711";

impl Default for InjectConfig {
    fn default() -> Self {
        InjectConfig {
            image: DEFAULT_AGENT_IMAGE.to_owned(),
            image_pull_policy: DEFAULT_IMAGE_PULL_POLICY.to_owned(),
            sidecar_mode: SidecarMode::default(),
            resources: Resources::default(),
            log_level: DEFAULT_LOG_LEVEL.to_owned(),
            join: Vec::new(),
            identity: true,
            token_audience: DEFAULT_TOKEN_AUDIENCE.to_owned(),
            token_expiration_seconds: DEFAULT_TOKEN_EXPIRATION_SECONDS,
            drain_seconds: DEFAULT_DRAIN_SECONDS,
            shoal_url: DEFAULT_SHOAL_URL.to_owned(),
            excluded_namespaces: DEFAULT_EXCLUDED_NAMESPACES
                .iter()
                .map(|s| (*s).to_owned())
                .collect(),
            extra_env: BTreeMap::new(),
            identity_addr: DEFAULT_IDENTITY_ADDR.to_owned(),
            trust_anchors: None,
            pod_certificates: false,
        }
    }
}

/// Injection settings shared by the `shoal-injector` server and `shoal inject`,
/// as command-line flags (each also an environment variable).
#[derive(clap::Args, Clone, Debug)]
pub struct InjectFlags {
    /// Agent image to inject.
    #[arg(long, env = "SHOAL_AGENT_IMAGE", default_value = DEFAULT_AGENT_IMAGE)]
    pub agent_image: String,
    /// Pull policy of the agent image.
    #[arg(long, env = "SHOAL_AGENT_IMAGE_PULL_POLICY", default_value = DEFAULT_IMAGE_PULL_POLICY)]
    pub agent_image_pull_policy: String,
    /// Default sidecar mode; pods override it with `shoal.io/sidecar`.
    #[arg(long, env = "SHOAL_SIDECAR_MODE", value_enum, default_value_t = SidecarMode::Native)]
    pub sidecar_mode: SidecarMode,
    /// Default agent log level; pods override it with `shoal.io/log-level`.
    #[arg(long, env = "SHOAL_AGENT_LOG_LEVEL", default_value = DEFAULT_LOG_LEVEL)]
    pub agent_log_level: String,
    /// Mesh seed addresses handed to every agent (`SHOAL_JOIN`), comma separated.
    #[arg(long, env = "SHOAL_AGENT_JOIN", value_delimiter = ',')]
    pub agent_join: Vec<String>,
    /// Extra agent environment, `NAME=VALUE`, repeatable (e.g. `SHOAL_DEV=true`).
    #[arg(long = "agent-env", env = "SHOAL_AGENT_ENV", value_delimiter = ',', value_parser = parse_key_value)]
    pub agent_env: Vec<(String, String)>,
    /// Whether agents need a projected service-account token for their identity.
    #[arg(long, env = "SHOAL_IDENTITY", default_value_t = true, action = clap::ArgAction::Set)]
    pub identity: bool,
    /// Agents get their certificates as Kubernetes pod certificates
    /// (KEP-4317, Kubernetes 1.37+): a `podCertificate` volume for signer
    /// `shoal.io/mesh`, signed by the injector, instead of a CSR to its
    /// identity service.
    #[arg(long, env = "SHOAL_POD_CERTIFICATES", default_value_t = false, num_args = 0..=1,
          default_missing_value = "true", action = clap::ArgAction::Set)]
    pub pod_certificates: bool,
    /// Default agent CPU request.
    #[arg(long, env = "SHOAL_AGENT_CPU_REQUEST", default_value = DEFAULT_CPU_REQUEST)]
    pub agent_cpu_request: String,
    /// Default agent memory request.
    #[arg(long, env = "SHOAL_AGENT_MEMORY_REQUEST", default_value = DEFAULT_MEMORY_REQUEST)]
    pub agent_memory_request: String,
    /// Default agent memory limit.
    #[arg(long, env = "SHOAL_AGENT_MEMORY_LIMIT", default_value = DEFAULT_MEMORY_LIMIT)]
    pub agent_memory_limit: String,
    /// Default agent CPU limit (none unless set).
    #[arg(long, env = "SHOAL_AGENT_CPU_LIMIT")]
    pub agent_cpu_limit: Option<String>,
    /// Namespaces never injected, comma separated.
    #[arg(long, env = "SHOAL_EXCLUDE_NAMESPACES", value_delimiter = ',',
          default_values_t = DEFAULT_EXCLUDED_NAMESPACES.map(String::from))]
    pub exclude_namespaces: Vec<String>,
}

impl InjectFlags {
    /// The configuration these flags describe.
    pub fn to_config(&self) -> InjectConfig {
        InjectConfig {
            image: self.agent_image.clone(),
            image_pull_policy: self.agent_image_pull_policy.clone(),
            sidecar_mode: self.sidecar_mode,
            resources: Resources {
                cpu_request: non_empty(&self.agent_cpu_request),
                cpu_limit: self.agent_cpu_limit.as_deref().and_then(non_empty),
                memory_request: non_empty(&self.agent_memory_request),
                memory_limit: non_empty(&self.agent_memory_limit),
            },
            log_level: self.agent_log_level.clone(),
            join: self.agent_join.clone(),
            identity: self.identity,
            pod_certificates: self.identity && self.pod_certificates,
            extra_env: self.agent_env.iter().cloned().collect(),
            excluded_namespaces: self.exclude_namespaces.clone(),
            ..InjectConfig::default()
        }
    }
}

fn non_empty(s: &str) -> Option<String> {
    let s = s.trim();
    (!s.is_empty()).then(|| s.to_owned())
}

/// Parses `NAME=VALUE`.
pub fn parse_key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_owned(), v.to_owned())),
        _ => Err(format!("expected NAME=VALUE, got {s:?}")),
    }
}
