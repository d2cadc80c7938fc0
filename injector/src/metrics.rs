//! Prometheus metrics of the injector, served on the admin port.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Buckets of the admission latency histogram, in seconds.
pub const LATENCY_BUCKETS: [f64; 10] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

/// Labels of an admission decision.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    /// `injected`, `skipped` or `error`.
    pub result: String,
    /// Why (see [`crate::inject::Reason`]).
    pub reason: String,
}

/// Labels naming one annotation.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AnnotationLabels {
    /// The annotation's key.
    pub annotation: String,
}

/// Kinds of rejected webhook request, created at 0 at start-up.
pub const BAD_REQUEST_KINDS: [&str; 4] = ["body", "too_large", "method", "path"];

/// Labels of a rejected HTTP request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BadRequestLabels {
    /// What was wrong: `body`, `too_large`, `method`, `path`.
    pub kind: String,
}

/// Labels of an identity request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// How it ended (see [`crate::identity::Outcome`]).
    pub outcome: String,
}

/// All metrics, registered once.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Admissions by result and reason.
    pub admissions: Family<DecisionLabels, Counter>,
    /// Time to answer one AdmissionReview.
    pub latency: Histogram,
    /// Ignored invalid tuning annotations.
    pub invalid_annotations: Family<AnnotationLabels, Counter>,
    /// Requests answered 4xx.
    pub bad_requests: Family<BadRequestLabels, Counter>,
    /// Serving certificate (re)loads.
    pub cert_reloads: Counter,
    /// Failed certificate reloads (the previous certificate stays in use).
    pub cert_reload_errors: Counter,
    /// Unix time at which the serving certificate expires (bootstrap mode).
    pub cert_expiry: Gauge,
    /// Identity requests by outcome.
    pub identity_requests: Family<OutcomeLabels, Counter>,
    /// Agent certificates issued.
    pub identity_certificates_issued: Counter,
    /// Unix time at which the mesh CA expires (0 until it is loaded).
    pub mesh_ca_expiry: Gauge,
    /// Failed re-reads of the mesh CA Secret (the CA in use stays).
    pub mesh_ca_reload_errors: Counter,
    /// PodCertificateRequests answered, by outcome.
    pub pod_certificates: Family<OutcomeLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Creates and registers the metrics under the `shoal_injector_` prefix.
    pub fn new() -> Metrics {
        let mut root = Registry::default();
        root.register_collector(Box::new(shoal_exposition::ProcessCollector));
        shoal_exposition::register_build_info(
            &mut root,
            "shoal_injector_build_info",
            env!("CARGO_PKG_VERSION"),
        );
        let registry = root.sub_registry_with_prefix("shoal_injector");
        let admissions = Family::<DecisionLabels, Counter>::default();
        registry.register(
            "admissions",
            "Admission reviews answered, by result and reason",
            admissions.clone(),
        );
        let latency = Histogram::new(LATENCY_BUCKETS.into_iter());
        registry.register(
            "admission_duration_seconds",
            "Time to answer one admission review",
            latency.clone(),
        );
        let invalid_annotations = Family::<AnnotationLabels, Counter>::default();
        registry.register(
            "invalid_annotations",
            "Pod annotations with invalid values, ignored",
            invalid_annotations.clone(),
        );
        let bad_requests = Family::<BadRequestLabels, Counter>::default();
        registry.register(
            "bad_requests",
            "Webhook requests answered with a 4xx status",
            bad_requests.clone(),
        );
        let cert_reloads = Counter::default();
        registry.register(
            "cert_reloads",
            "Serving certificate loads",
            cert_reloads.clone(),
        );
        let cert_reload_errors = Counter::default();
        registry.register(
            "cert_reload_errors",
            "Serving certificate loads that failed",
            cert_reload_errors.clone(),
        );
        let cert_expiry = Gauge::default();
        registry.register(
            "cert_expiry_timestamp_seconds",
            "When the self-bootstrapped serving certificate expires",
            cert_expiry.clone(),
        );
        let identity_requests = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "identity_requests",
            "Identity (certificate) requests answered, by outcome",
            identity_requests.clone(),
        );
        let identity_certificates_issued = Counter::default();
        registry.register(
            "identity_certificates_issued",
            "Agent certificates signed by the mesh CA",
            identity_certificates_issued.clone(),
        );
        let mesh_ca_expiry = Gauge::default();
        registry.register(
            "mesh_ca_expiry_timestamp_seconds",
            "When the mesh CA that signs agent certificates expires",
            mesh_ca_expiry.clone(),
        );
        let mesh_ca_reload_errors = Counter::default();
        registry.register(
            "mesh_ca_reload_errors",
            "Re-reads of the mesh CA Secret that failed (the CA in use stays)",
            mesh_ca_reload_errors.clone(),
        );
        let pod_certificates = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "pod_certificates",
            "PodCertificateRequests for signer shoal.io/mesh answered, by outcome",
            pod_certificates.clone(),
        );
        let outcomes = crate::podcert::Reason::ALL
            .map(crate::podcert::Reason::as_str)
            .into_iter()
            .chain([crate::podcert::API_ERROR]);
        for outcome in outcomes {
            pod_certificates
                .get_or_create(&OutcomeLabels {
                    outcome: outcome.to_owned(),
                })
                .inc_by(0);
        }
        for outcome in crate::identity::Outcome::ALL {
            identity_requests
                .get_or_create(&OutcomeLabels {
                    outcome: outcome.as_str().to_owned(),
                })
                .inc_by(0);
        }
        for kind in BAD_REQUEST_KINDS {
            bad_requests
                .get_or_create(&BadRequestLabels {
                    kind: kind.to_owned(),
                })
                .inc_by(0);
        }
        Metrics {
            registry: root,
            admissions,
            latency,
            invalid_annotations,
            bad_requests,
            cert_reloads,
            cert_reload_errors,
            cert_expiry,
            identity_requests,
            identity_certificates_issued,
            mesh_ca_expiry,
            mesh_ca_reload_errors,
            pod_certificates,
        }
    }

    /// Counts one decision.
    pub fn decision(&self, result: &str, reason: &str) {
        self.admissions
            .get_or_create(&DecisionLabels {
                result: result.to_owned(),
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// Counts one invalid annotation.
    pub fn invalid_annotation(&self, annotation: &str) {
        self.invalid_annotations
            .get_or_create(&AnnotationLabels {
                annotation: annotation.to_owned(),
            })
            .inc();
    }

    /// Counts one rejected request.
    pub fn bad_request(&self, kind: &str) {
        self.bad_requests
            .get_or_create(&BadRequestLabels {
                kind: kind.to_owned(),
            })
            .inc();
    }

    /// Counts one identity request.
    pub fn identity_request(&self, outcome: &str) {
        self.identity_requests
            .get_or_create(&OutcomeLabels {
                outcome: outcome.to_owned(),
            })
            .inc();
    }

    /// Counts one answered PodCertificateRequest.
    pub fn pod_certificate(&self, outcome: &str) {
        self.pod_certificates
            .get_or_create(&OutcomeLabels {
                outcome: outcome.to_owned(),
            })
            .inc();
    }

    /// The metrics in `format`.
    pub fn encode(&self, format: shoal_exposition::Format) -> String {
        format.encode(&self.registry)
    }
}
