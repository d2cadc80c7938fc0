//! The injection itself: decide whether a pod gets the agent, and build the
//! JSON Patch that adds it.
//!
//! This is the one place that knows what an injected pod looks like; the
//! webhook ([`crate::admission`]) and offline injection ([`crate::offline`])
//! both call [`inject`] and apply or return its patch.

use std::collections::BTreeMap;

use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, PatchOperation};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource,
    HTTPGetAction, Lifecycle, LifecycleHandler, ObjectFieldSelector, Pod, Probe,
    ProjectedVolumeSource, ResourceRequirements, SeccompProfile, SecurityContext,
    ServiceAccountTokenProjection, SleepAction, Volume, VolumeMount, VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity as K8sQuantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::{json, Value};

use crate::annotations::{self as ann, InjectChoice, Overrides, Quantity};
use crate::config::{self as cfg, InjectConfig, SidecarMode};

/// Why a pod was or was not injected; the `reason` label of the decision metric.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// The agent was added.
    Injected,
    /// The pod already carries the agent.
    AlreadyInjected,
    /// The pod says `shoal.io/inject: disabled`.
    PodDisabled,
    /// Neither the namespace nor the pod asked for injection.
    NamespaceNotEnabled,
    /// The namespace's annotations are not known (cache cold, lookup failed).
    NamespaceUnknown,
    /// The pod's namespace is never injected (`kube-system`, `shoal-system`).
    ExcludedNamespace,
    /// The pod uses the node's network.
    HostNetwork,
    /// The pod turns service-account token mounting off, and the agent needs one.
    TokenNotMounted,
    /// Not a pod CREATE: allowed unchanged.
    NotPodCreate,
    /// The object could not be read as a Pod: allowed unchanged.
    InvalidObject,
}

impl Reason {
    /// Label value for metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Injected => "injected",
            Reason::AlreadyInjected => "already_injected",
            Reason::PodDisabled => "pod_disabled",
            Reason::NamespaceNotEnabled => "namespace_not_enabled",
            Reason::NamespaceUnknown => "namespace_unknown",
            Reason::ExcludedNamespace => "excluded_namespace",
            Reason::HostNetwork => "host_network",
            Reason::TokenNotMounted => "token_not_mounted",
            Reason::NotPodCreate => "not_pod_create",
            Reason::InvalidObject => "invalid_object",
        }
    }

    /// The `result` label: `injected`, `skipped` or `error`.
    pub fn result(self) -> &'static str {
        match self {
            Reason::Injected => "injected",
            Reason::InvalidObject | Reason::NamespaceUnknown => "error",
            _ => "skipped",
        }
    }
}

/// What is known about the pod's namespace.
#[derive(Clone, Copy, Debug)]
pub enum NamespaceInfo<'a> {
    /// Its annotations.
    Known(&'a BTreeMap<String, String>),
    /// Nothing (cache not synced and the lookup failed).
    Unknown,
}

/// Facts about a pod that are not in its spec.
#[derive(Clone, Copy, Debug)]
pub struct PodContext<'a> {
    /// The pod's namespace.
    pub namespace: &'a str,
    /// The namespace's annotations.
    pub namespace_info: NamespaceInfo<'a>,
    /// Kind of the pod's controller (`ReplicaSet`, `Job`, ...), if any.
    pub owner_kind: Option<&'a str>,
}

/// The result of [`inject`].
#[derive(Clone, Debug, PartialEq)]
pub struct Outcome {
    /// Why.
    pub reason: Reason,
    /// The JSON Patch to apply to the pod (may be non-empty even when skipped:
    /// an already injected pod still gets `SHOAL_URL` into new app containers).
    pub patch: Vec<PatchOperation>,
    /// Warnings for the person creating the pod.
    pub warnings: Vec<String>,
    /// Tuning annotations whose values were invalid and ignored.
    pub invalid_annotations: Vec<&'static str>,
}

impl Outcome {
    /// A decision with no patch and no warnings.
    pub fn skip(reason: Reason) -> Outcome {
        Outcome {
            reason,
            patch: Vec::new(),
            warnings: Vec::new(),
            invalid_annotations: Vec::new(),
        }
    }

    fn skip_warn(reason: Reason, warning: String) -> Outcome {
        Outcome {
            warnings: vec![warning],
            ..Outcome::skip(reason)
        }
    }
}

/// Whether a pod already carries the agent (as a container or init container).
pub fn is_injected(pod: &Pod) -> bool {
    let Some(spec) = pod.spec.as_ref() else {
        return false;
    };
    spec.containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .any(|c| c.name == cfg::AGENT_CONTAINER_NAME)
}

/// Decides whether `pod` gets the agent and builds the patch that adds it.
pub fn inject(pod: &Pod, ctx: PodContext<'_>, config: &InjectConfig) -> Outcome {
    let empty = BTreeMap::new();
    let pod_annotations = pod.metadata.annotations.as_ref().unwrap_or(&empty);

    if config
        .excluded_namespaces
        .iter()
        .any(|n| n == ctx.namespace)
    {
        return Outcome::skip(Reason::ExcludedNamespace);
    }
    if is_injected(pod) {
        let mut out = Outcome::skip(Reason::AlreadyInjected);
        shoal_url_ops(pod, config, &mut out.patch);
        return out;
    }

    let mut warnings = Vec::new();
    // Invalid annotations, counted in shoal_injector_invalid_annotations_total.
    let mut invalid_annotations = Vec::new();
    let mut pod_choice = ann::inject_choice(pod_annotations);
    if pod_choice == Some(InjectChoice::Invalid) {
        invalid_annotations.push(ann::INJECT);
        warnings.push(format!(
            "shoal: annotation {}={:?} ignored: expected enabled or disabled",
            ann::INJECT,
            pod_annotations.get(ann::INJECT).map_or("", |v| v.as_str())
        ));
        pod_choice = None;
    }
    match pod_choice {
        Some(InjectChoice::Disabled) => {
            return Outcome {
                warnings,
                invalid_annotations,
                ..Outcome::skip(Reason::PodDisabled)
            }
        }
        Some(InjectChoice::Enabled) => {}
        Some(InjectChoice::Invalid) | None => match ctx.namespace_info {
            NamespaceInfo::Known(ns) => {
                if ann::inject_choice(ns) != Some(InjectChoice::Enabled) {
                    return Outcome {
                        warnings,
                        invalid_annotations,
                        ..Outcome::skip(Reason::NamespaceNotEnabled)
                    };
                }
            }
            NamespaceInfo::Unknown => {
                warnings.push(format!(
                    "shoal: namespace {:?} not known to the injector yet; pod not injected",
                    ctx.namespace
                ));
                return Outcome {
                    warnings,
                    invalid_annotations,
                    ..Outcome::skip(Reason::NamespaceUnknown)
                };
            }
        },
    }

    let Some(spec) = pod.spec.as_ref() else {
        return Outcome::skip_warn(
            Reason::InvalidObject,
            "shoal: pod has no spec; not injected".to_owned(),
        );
    };
    if spec.host_network == Some(true) {
        return Outcome::skip_warn(
            Reason::HostNetwork,
            "shoal: hostNetwork pods are not injected (the agent's ports would clash on the node)"
                .to_owned(),
        );
    }
    if config.identity && spec.automount_service_account_token == Some(false) {
        return Outcome::skip_warn(
            Reason::TokenNotMounted,
            "shoal: automountServiceAccountToken is false, and the agent needs the pod's \
             service-account identity; not injected"
                .to_owned(),
        );
    }

    let overrides = Overrides::parse(pod_annotations);
    for (name, warning) in &overrides.invalid {
        invalid_annotations.push(*name);
        warnings.push(format!("shoal: {warning}"));
    }
    let mode = overrides.sidecar.unwrap_or(config.sidecar_mode);
    let (resources, resource_warnings) = resources(config, &overrides);
    warnings.extend(resource_warnings);
    let agent = agent_container(config, &overrides, mode, resources, ctx.owner_kind);

    let mut patch = Vec::new();
    // Label and annotations.
    add_map_entries(
        &mut patch,
        &["metadata", "labels"],
        pod.metadata.labels.is_some(),
        vec![(ann::INJECTED_LABEL.to_owned(), "true".to_owned())],
    );
    let admin_port = cfg::DEFAULT_ADMIN_PORT.to_string();
    let wanted = [
        (ann::PROMETHEUS_SCRAPE, "true"),
        (ann::PROMETHEUS_PORT, admin_port.as_str()),
        (ann::PROMETHEUS_PATH, "/metrics"),
    ];
    let mut prometheus = Vec::new();
    for (k, v) in wanted {
        match pod_annotations.get(k) {
            None => prometheus.push((k.to_owned(), v.to_owned())),
            Some(existing) if existing == v => {}
            Some(existing) => warnings.push(format!(
                "shoal: pod already sets {k}={existing:?}; left as is, so the agent's metrics \
                 (port {}) need the PodMonitor",
                cfg::DEFAULT_ADMIN_PORT
            )),
        }
    }
    add_map_entries(
        &mut patch,
        &["metadata", "annotations"],
        pod.metadata.annotations.is_some(),
        prometheus,
    );

    // The agent container.
    let agent = to_value(&agent);
    match mode {
        SidecarMode::Native => match &spec.init_containers {
            None => add(&mut patch, &["spec", "initContainers"], json!([agent])),
            Some(_) => add(&mut patch, &["spec", "initContainers", "0"], agent),
        },
        SidecarMode::Classic => add(&mut patch, &["spec", "containers", "-"], agent),
    }

    // Volumes.
    let mut volumes = vec![Volume {
        name: cfg::DATA_VOLUME_NAME.to_owned(),
        empty_dir: Some(EmptyDirVolumeSource::default()),
        ..Volume::default()
    }];
    if config.identity {
        volumes.push(Volume {
            name: cfg::TOKEN_VOLUME_NAME.to_owned(),
            projected: Some(ProjectedVolumeSource {
                default_mode: Some(cfg::PROJECTED_FILE_MODE),
                sources: Some(vec![VolumeProjection {
                    service_account_token: Some(ServiceAccountTokenProjection {
                        audience: Some(config.token_audience.clone()),
                        expiration_seconds: Some(config.token_expiration_seconds),
                        path: cfg::TOKEN_FILE_NAME.to_owned(),
                        ..ServiceAccountTokenProjection::default()
                    }),
                    ..VolumeProjection::default()
                }]),
                ..ProjectedVolumeSource::default()
            }),
            ..Volume::default()
        });
    }
    if pod_certificates(config) {
        volumes.push(pod_certificate_volume());
    }
    match &spec.volumes {
        None => add(
            &mut patch,
            &["spec", "volumes"],
            Value::Array(volumes.iter().map(to_value).collect()),
        ),
        Some(_) => {
            for v in &volumes {
                add(&mut patch, &["spec", "volumes", "-"], to_value(v));
            }
        }
    }

    shoal_url_ops(pod, config, &mut patch);

    Outcome {
        reason: Reason::Injected,
        patch,
        warnings,
        invalid_annotations,
    }
}

/// Adds `SHOAL_URL` to every app container that does not set it.
fn shoal_url_ops(pod: &Pod, config: &InjectConfig, patch: &mut Vec<PatchOperation>) {
    let Some(spec) = pod.spec.as_ref() else {
        return;
    };
    let var = to_value(&EnvVar {
        name: "SHOAL_URL".to_owned(),
        value: Some(config.shoal_url.clone()),
        value_from: None,
    });
    for (i, c) in spec.containers.iter().enumerate() {
        if c.name == cfg::AGENT_CONTAINER_NAME {
            continue;
        }
        let index = i.to_string();
        match &c.env {
            None => add(
                patch,
                &["spec", "containers", &index, "env"],
                json!([var.clone()]),
            ),
            Some(env) if env.iter().any(|e| e.name == "SHOAL_URL") => {}
            Some(_) => add(
                patch,
                &["spec", "containers", &index, "env", "-"],
                var.clone(),
            ),
        }
    }
}

/// Whether the agent gets a pod-certificate volume: only with the trust
/// anchors, as the identity service then only names peers (an agent with a
/// certificate but no service to find peers by would found a mesh of its
/// own), and a pod waits for its volume's certificate before it starts.
fn pod_certificates(config: &InjectConfig) -> bool {
    config.identity && config.pod_certificates && config.trust_anchors.is_some()
}

/// The pod-certificate volume: the kubelet's key and the certificate signer
/// `shoal.io/mesh` issues for it, and the mesh roots from the signer's
/// ClusterTrustBundles, under the file names the agent's `SHOAL_CERT_DIR`
/// reads.
fn pod_certificate_volume() -> Volume {
    use k8s_openapi::api::core::v1::{ClusterTrustBundleProjection, PodCertificateProjection};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
    Volume {
        name: cfg::POD_CERT_VOLUME_NAME.to_owned(),
        projected: Some(ProjectedVolumeSource {
            default_mode: Some(cfg::PROJECTED_FILE_MODE),
            sources: Some(vec![
                VolumeProjection {
                    pod_certificate: Some(PodCertificateProjection {
                        signer_name: crate::podcert::SIGNER_NAME.to_owned(),
                        key_type: crate::podcert::KEY_TYPE.to_owned(),
                        certificate_chain_path: Some("cert.pem".to_owned()),
                        key_path: Some("key.pem".to_owned()),
                        ..PodCertificateProjection::default()
                    }),
                    ..VolumeProjection::default()
                },
                VolumeProjection {
                    cluster_trust_bundle: Some(ClusterTrustBundleProjection {
                        signer_name: Some(crate::podcert::SIGNER_NAME.to_owned()),
                        label_selector: Some(LabelSelector {
                            match_labels: Some(
                                [(
                                    crate::podcert::TRUST_BUNDLE_LABEL.to_owned(),
                                    crate::podcert::TRUST_BUNDLE_LABEL_VALUE.to_owned(),
                                )]
                                .into(),
                            ),
                            ..LabelSelector::default()
                        }),
                        path: "ca.pem".to_owned(),
                        ..ClusterTrustBundleProjection::default()
                    }),
                    ..VolumeProjection::default()
                },
            ]),
            ..ProjectedVolumeSource::default()
        }),
        ..Volume::default()
    }
}

fn add(patch: &mut Vec<PatchOperation>, tokens: &[&str], value: Value) {
    patch.push(PatchOperation::Add(AddOperation {
        path: PointerBuf::from_tokens(tokens.iter().copied()),
        value,
    }));
}

/// Adds map entries: the whole map when the object has none, else one op per key.
fn add_map_entries(
    patch: &mut Vec<PatchOperation>,
    map_path: &[&str],
    exists: bool,
    entries: Vec<(String, String)>,
) {
    if entries.is_empty() {
        return;
    }
    if exists {
        for (k, v) in entries {
            let mut tokens = map_path.to_vec();
            tokens.push(&k);
            add(patch, &tokens, Value::String(v));
        }
    } else {
        let map: serde_json::Map<String, Value> = entries
            .into_iter()
            .map(|(k, v)| (k, Value::String(v)))
            .collect();
        add(patch, map_path, Value::Object(map));
    }
}

fn to_value<T: serde::Serialize>(v: &T) -> Value {
    // Serializing k8s-openapi types to a Value cannot fail (string keys, no
    // non-finite floats); fall back to null rather than panic.
    serde_json::to_value(v).unwrap_or(Value::Null)
}

/// The agent's resources: defaults, then annotations; a request above its
/// limit is lowered to the limit (with a warning) so the pod stays valid.
fn resources(config: &InjectConfig, o: &Overrides) -> (ResourceRequirements, Vec<String>) {
    let mut warnings = Vec::new();
    let pick = |over: &Option<Quantity>, default: &Option<String>| -> Option<Quantity> {
        over.clone()
            .or_else(|| default.as_deref().and_then(Quantity::parse))
    };
    let mut pairs = [
        (
            "cpu",
            pick(&o.cpu_request, &config.resources.cpu_request),
            pick(&o.cpu_limit, &config.resources.cpu_limit),
        ),
        (
            "memory",
            pick(&o.memory_request, &config.resources.memory_request),
            pick(&o.memory_limit, &config.resources.memory_limit),
        ),
    ];
    for (name, request, limit) in &mut pairs {
        if let (Some(r), Some(l)) = (request.as_ref(), limit.as_ref()) {
            if r.value > l.value {
                warnings.push(format!(
                    "shoal: agent {name} request {} is above its limit {}; using the limit as the request",
                    r.text, l.text
                ));
                *request = Some(l.clone());
            }
        }
    }
    let mut requests = BTreeMap::new();
    let mut limits = BTreeMap::new();
    for (name, request, limit) in pairs {
        if let Some(r) = request {
            requests.insert(name.to_owned(), K8sQuantity(r.text));
        }
        if let Some(l) = limit {
            limits.insert(name.to_owned(), K8sQuantity(l.text));
        }
    }
    (
        ResourceRequirements {
            requests: (!requests.is_empty()).then_some(requests),
            limits: (!limits.is_empty()).then_some(limits),
            ..ResourceRequirements::default()
        },
        warnings,
    )
}

/// The injected agent's node name, `<pod>.<namespace>`, as a dependent
/// environment variable (see [`crate::identity::node_name`]).
pub const AGENT_NODE_NAME_TEMPLATE: &str = "$(POD_NAME).$(POD_NAMESPACE)";

fn field_env(name: &str, field_path: &str) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value: None,
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                api_version: None,
                field_path: field_path.to_owned(),
            }),
            ..EnvVarSource::default()
        }),
    }
}

fn value_env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value: Some(value.into()),
        value_from: None,
    }
}

fn http_probe(path: &str, period: i32, failure_threshold: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_owned()),
            port: IntOrString::String(cfg::ADMIN_PORT_NAME.to_owned()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failure_threshold),
        timeout_seconds: Some(1),
        ..Probe::default()
    }
}

/// The agent container.
fn agent_container(
    config: &InjectConfig,
    o: &Overrides,
    mode: SidecarMode,
    resources: ResourceRequirements,
    owner_kind: Option<&str>,
) -> Container {
    let mut env = vec![
        field_env("POD_NAME", "metadata.name"),
        field_env("POD_NAMESPACE", "metadata.namespace"),
        field_env("POD_IP", "status.podIP"),
        field_env("POD_SERVICE_ACCOUNT", "spec.serviceAccountName"),
        field_env("KUBE_NODE_NAME", "spec.nodeName"),
        // Pod names repeat across namespaces (StatefulSets), node names must
        // not: Kubernetes expands the two variables defined above.
        value_env("SHOAL_NODE_NAME", AGENT_NODE_NAME_TEMPLATE),
        value_env("SHOAL_DATA_DIR", cfg::DATA_DIR),
        value_env(
            "SHOAL_LOG_LEVEL",
            o.log_level
                .clone()
                .unwrap_or_else(|| config.log_level.clone()),
        ),
        value_env("SHOAL_LOG_FORMAT", cfg::AGENT_LOG_FORMAT),
    ];
    // Jobs and CronJobs run to completion: client-only agents unless told otherwise.
    let broker = o
        .broker
        .or_else(|| (owner_kind == Some("Job")).then_some(false));
    if let Some(b) = broker {
        env.push(value_env("SHOAL_BROKER", b.to_string()));
    }
    if let Some(p) = o.app_port {
        env.push(value_env("SHOAL_APP_PORT", p.to_string()));
    }
    if let Some(s) = &o.subscriptions {
        env.push(value_env("SHOAL_SUBSCRIPTIONS", s.clone()));
    }
    if !config.join.is_empty() {
        env.push(value_env("SHOAL_JOIN", config.join.join(",")));
    }
    if config.identity {
        env.push(value_env(
            "SHOAL_TOKEN_FILE",
            format!("{}/{}", cfg::TOKEN_MOUNT_PATH, cfg::TOKEN_FILE_NAME),
        ));
        if let Some(anchors) = &config.trust_anchors {
            env.push(value_env(
                "SHOAL_IDENTITY_ADDR",
                config.identity_addr.clone(),
            ));
            env.push(value_env("SHOAL_IDENTITY_TRUST_ANCHORS", anchors.clone()));
            if pod_certificates(config) {
                env.push(value_env(
                    "SHOAL_CERT_DIR",
                    cfg::POD_CERT_MOUNT_PATH.to_owned(),
                ));
            }
        }
    }
    for (k, v) in &config.extra_env {
        if !env.iter().any(|e| &e.name == k) {
            env.push(value_env(k, v.clone()));
        }
    }

    let mut mounts = vec![VolumeMount {
        name: cfg::DATA_VOLUME_NAME.to_owned(),
        mount_path: cfg::DATA_DIR.to_owned(),
        ..VolumeMount::default()
    }];
    if config.identity {
        mounts.push(VolumeMount {
            name: cfg::TOKEN_VOLUME_NAME.to_owned(),
            mount_path: cfg::TOKEN_MOUNT_PATH.to_owned(),
            read_only: Some(true),
            ..VolumeMount::default()
        });
    }
    if pod_certificates(config) {
        mounts.push(VolumeMount {
            name: cfg::POD_CERT_VOLUME_NAME.to_owned(),
            mount_path: cfg::POD_CERT_MOUNT_PATH.to_owned(),
            read_only: Some(true),
            ..VolumeMount::default()
        });
    }

    let (restart_policy, lifecycle) = match mode {
        SidecarMode::Native => (Some("Always".to_owned()), None),
        SidecarMode::Classic => (
            None,
            Some(Lifecycle {
                pre_stop: Some(LifecycleHandler {
                    sleep: Some(SleepAction {
                        seconds: config.drain_seconds,
                    }),
                    ..LifecycleHandler::default()
                }),
                ..Lifecycle::default()
            }),
        ),
    };

    Container {
        name: cfg::AGENT_CONTAINER_NAME.to_owned(),
        image: Some(config.image.clone()),
        image_pull_policy: Some(config.image_pull_policy.clone()),
        restart_policy,
        lifecycle,
        env: Some(env),
        ports: Some(vec![
            ContainerPort {
                name: Some(cfg::MESH_PORT_NAME.to_owned()),
                container_port: i32::from(cfg::DEFAULT_MESH_PORT),
                protocol: Some("UDP".to_owned()),
                ..ContainerPort::default()
            },
            ContainerPort {
                name: Some(cfg::ADMIN_PORT_NAME.to_owned()),
                container_port: i32::from(cfg::DEFAULT_ADMIN_PORT),
                protocol: Some("TCP".to_owned()),
                ..ContainerPort::default()
            },
        ]),
        startup_probe: Some(http_probe("/livez", 1, 60)),
        readiness_probe: Some(http_probe("/readyz", 5, 3)),
        liveness_probe: Some(http_probe("/livez", 10, 3)),
        resources: Some(resources),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".to_owned()]),
                add: None,
            }),
            privileged: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            run_as_user: Some(cfg::AGENT_UID),
            run_as_group: Some(cfg::AGENT_UID),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".to_owned(),
                localhost_profile: None,
            }),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(mounts),
        termination_message_policy: Some("FallbackToLogsOnError".to_owned()),
        ..Container::default()
    }
}

/// A short name for the pod's owner, for log lines: `ReplicaSet/web-7d9f`,
/// else `Pod/<name or generateName>`.
pub fn owner_of(pod: &Pod) -> String {
    let refs = pod.metadata.owner_references.as_deref().unwrap_or_default();
    let owner = refs
        .iter()
        .find(|r| r.controller == Some(true))
        .or_else(|| refs.first());
    match owner {
        Some(r) => format!("{}/{}", r.kind, r.name),
        None => format!(
            "Pod/{}",
            pod.metadata
                .name
                .as_deref()
                .or(pod.metadata.generate_name.as_deref())
                .unwrap_or("")
        ),
    }
}

/// The kind of the pod's controller, if any.
pub fn owner_kind(pod: &Pod) -> Option<&str> {
    let refs = pod.metadata.owner_references.as_deref()?;
    refs.iter()
        .find(|r| r.controller == Some(true))
        .or_else(|| refs.first())
        .map(|r| r.kind.as_str())
}

#[cfg(test)]
mod tests;
