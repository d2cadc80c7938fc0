//! AdmissionReview in, AdmissionReview out: the webhook's logic without the
//! HTTP server around it.
//!
//! Every well-formed review is answered `allowed: true` (fail-open): with a
//! JSON Patch when the pod is injected, without one otherwise. A body that is
//! not an `admission.k8s.io/v1` AdmissionReview gets a [`BadReview`] (HTTP 400).

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use base64::Engine as _;
use k8s_openapi::api::core::v1::Pod;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use kube::core::DynamicObject;
use serde_json::Value;

use crate::config::InjectConfig;
use crate::inject::{self, NamespaceInfo, Outcome, PodContext, Reason};
use crate::metrics::Metrics;

/// The only AdmissionReview version served.
pub const ADMISSION_API_VERSION: &str = "admission.k8s.io/v1";
/// Kind of an AdmissionReview.
pub const ADMISSION_KIND: &str = "AdmissionReview";
/// Audit annotation carrying the decision.
pub const AUDIT_DECISION: &str = "decision";

/// A namespace's annotations, or `None` when they are not known.
pub type AnnotationsFuture<'a> =
    Pin<Box<dyn Future<Output = Option<BTreeMap<String, String>>> + Send + 'a>>;

/// Where the webhook learns a namespace's annotations.
pub trait NamespaceLookup: Send + Sync + 'static {
    /// The namespace's annotations, or `None` when they are not known.
    fn annotations<'a>(&'a self, namespace: &'a str) -> AnnotationsFuture<'a>;
}

/// A fixed set of namespaces: for tests and offline injection. Namespaces not
/// listed have no annotations.
#[derive(Clone, Debug, Default)]
pub struct StaticNamespaces(pub BTreeMap<String, BTreeMap<String, String>>);

impl NamespaceLookup for StaticNamespaces {
    fn annotations<'a>(&'a self, namespace: &'a str) -> AnnotationsFuture<'a> {
        let found = self.0.get(namespace).cloned().unwrap_or_default();
        Box::pin(async move { Some(found) })
    }
}

/// A request body that is not a usable AdmissionReview; answered with HTTP 400.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BadReview(pub String);

/// The webhook: configuration, namespace view and metrics.
#[derive(Clone)]
pub struct Webhook {
    config: Arc<InjectConfig>,
    namespaces: Arc<dyn NamespaceLookup>,
    metrics: Arc<Metrics>,
    trust_anchors: Option<TrustAnchors>,
}

/// The mesh trust bundle as the identity service last loaded it (None
/// until the mesh CA is loaded); injected pods get it, so their agents can
/// verify the identity service before they have a certificate.
pub type TrustAnchors = Arc<std::sync::RwLock<Option<String>>>;

impl std::fmt::Debug for Webhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhook")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Webhook {
    /// A webhook injecting per `config`, reading namespaces from `namespaces`.
    pub fn new(
        config: InjectConfig,
        namespaces: Arc<dyn NamespaceLookup>,
        metrics: Arc<Metrics>,
    ) -> Webhook {
        Webhook {
            config: Arc::new(config),
            namespaces,
            metrics,
            trust_anchors: None,
        }
    }

    /// Hands injected pods the mesh trust bundle in `anchors` once it is
    /// known; until then they are injected without identity settings (and
    /// told so in a warning).
    pub fn with_trust_anchors(mut self, anchors: TrustAnchors) -> Webhook {
        self.trust_anchors = Some(anchors);
        self
    }

    /// The metrics this webhook records into.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Answers one AdmissionReview body with the response body.
    pub async fn review(&self, body: &[u8]) -> Result<Vec<u8>, BadReview> {
        let started = Instant::now();
        let result = self.review_inner(body).await;
        self.metrics
            .latency
            .observe(started.elapsed().as_secs_f64());
        if result.is_err() {
            self.metrics.bad_request("body");
        }
        result
    }

    async fn review_inner(&self, body: &[u8]) -> Result<Vec<u8>, BadReview> {
        let review: AdmissionReview<DynamicObject> = serde_json::from_slice(body)
            .map_err(|e| BadReview(format!("body is not an AdmissionReview: {e}")))?;
        if review.types.api_version != ADMISSION_API_VERSION || review.types.kind != ADMISSION_KIND
        {
            return Err(BadReview(format!(
                "expected apiVersion {ADMISSION_API_VERSION} kind {ADMISSION_KIND}, got apiVersion {:?} kind {:?}",
                review.types.api_version, review.types.kind
            )));
        }
        let request: AdmissionRequest<DynamicObject> = review
            .try_into()
            .map_err(|_| BadReview("AdmissionReview has no request".to_owned()))?;

        let (response, decision) = self.decide(&request).await;
        let reason = decision.reason;
        self.metrics.decision(reason.result(), reason.as_str());
        for a in &decision.invalid_annotations {
            self.metrics.invalid_annotation(a);
        }
        tracing::info!(
            uid = %request.uid,
            namespace = request.namespace.as_deref().unwrap_or(""),
            owner = %decision.owner,
            result = reason.result(),
            reason = reason.as_str(),
            warnings = decision.warnings,
            dry_run = request.dry_run,
            "admission"
        );
        encode_review(response).map_err(|e| BadReview(format!("cannot encode response: {e}")))
    }

    async fn decide(
        &self,
        request: &AdmissionRequest<DynamicObject>,
    ) -> (AdmissionResponse, Decision) {
        let base = AdmissionResponse::from(request);
        let is_pod = request.kind.group.is_empty() && request.kind.kind == "Pod";
        if !is_pod || request.operation != Operation::Create || request.sub_resource.is_some() {
            return finish(base, Outcome::skip(Reason::NotPodCreate), String::new());
        }
        let pod: Pod = match request
            .object
            .as_ref()
            .ok_or_else(|| "request has no object".to_owned())
            .and_then(|o| serde_json::to_value(o).map_err(|e| e.to_string()))
            .and_then(|v| serde_json::from_value(v).map_err(|e| e.to_string()))
        {
            Ok(p) => p,
            Err(e) => {
                let mut out = Outcome::skip(Reason::InvalidObject);
                out.warnings
                    .push(format!("shoal: pod not injected, object unreadable: {e}"));
                return finish(base, out, "Pod/?".to_owned());
            }
        };
        let namespace = request
            .namespace
            .clone()
            .or_else(|| pod.metadata.namespace.clone())
            .unwrap_or_else(|| "default".to_owned());
        let owner = inject::owner_of(&pod);
        let ns_annotations = self.namespaces.annotations(&namespace).await;
        let namespace_info = match &ns_annotations {
            Some(a) => NamespaceInfo::Known(a),
            None => NamespaceInfo::Unknown,
        };
        let context = PodContext {
            namespace: &namespace,
            namespace_info,
            owner_kind: inject::owner_kind(&pod),
        };
        let outcome = match &self.trust_anchors {
            Some(anchors) if self.config.identity => {
                let known = anchors
                    .read()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .clone();
                let config = InjectConfig {
                    trust_anchors: known.clone(),
                    ..(*self.config).clone()
                };
                let mut outcome = inject::inject(&pod, context, &config);
                if known.is_none() && outcome.reason == Reason::Injected {
                    outcome.warnings.push(
                        "shoal: the mesh CA is not loaded yet, so this pod's agent gets no mesh identity and runs alone; recreate the pod once shoal-injector's identity service is serving".to_owned(),
                    );
                }
                outcome
            }
            _ => inject::inject(&pod, context, &self.config),
        };
        finish(base, outcome, owner)
    }
}

/// What the log line and metrics need about one decision.
struct Decision {
    reason: Reason,
    owner: String,
    warnings: usize,
    invalid_annotations: Vec<&'static str>,
}

fn finish(
    mut response: AdmissionResponse,
    outcome: Outcome,
    owner: String,
) -> (AdmissionResponse, Decision) {
    response.audit_annotations.insert(
        AUDIT_DECISION.to_owned(),
        outcome.reason.as_str().to_owned(),
    );
    if !outcome.warnings.is_empty() {
        response.warnings = Some(outcome.warnings.clone());
    }
    if !outcome.patch.is_empty() {
        let patch = json_patch::Patch(outcome.patch);
        response = match response.clone().with_patch(patch) {
            Ok(r) => r,
            // Cannot happen for our patches; fail open without one.
            Err(_) => response,
        };
    }
    let decision = Decision {
        reason: outcome.reason,
        owner,
        warnings: outcome.warnings.len(),
        invalid_annotations: outcome.invalid_annotations,
    };
    (response, decision)
}

/// Serializes the response as an AdmissionReview, with the patch base64
/// encoded as the API server documents it.
pub fn encode_review(response: AdmissionResponse) -> Result<Vec<u8>, serde_json::Error> {
    let mut value = serde_json::to_value(response.into_review())?;
    if let Some(patch) = value.pointer_mut("/response/patch") {
        if let Value::Array(bytes) = patch {
            let raw: Vec<u8> = bytes
                .iter()
                .filter_map(|b| b.as_u64().and_then(|b| u8::try_from(b).ok()))
                .collect();
            *patch = Value::String(base64::engine::general_purpose::STANDARD.encode(raw));
        }
    }
    serde_json::to_vec(&value)
}

/// Decodes the `patch` of an AdmissionResponse JSON (base64 string or byte
/// array) into JSON Patch operations; `None` when there is no patch.
pub fn decode_patch(response: &Value) -> Option<Result<Value, String>> {
    let patch = response.get("patch")?;
    let bytes = match patch {
        Value::String(s) => base64::engine::general_purpose::STANDARD
            .decode(s)
            .map_err(|e| e.to_string()),
        Value::Array(a) => Ok(a
            .iter()
            .filter_map(|b| b.as_u64().and_then(|b| u8::try_from(b).ok()))
            .collect()),
        _ => Err("patch is neither a string nor an array".to_owned()),
    };
    Some(bytes.and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string())))
}

#[cfg(test)]
mod tests;
