//! Kubernetes pod certificates (KEP-4317, `certificates.k8s.io/v1` from
//! Kubernetes 1.37): the injector as the signer `shoal.io/mesh`.
//!
//! With `--pod-certificates`, injected pods get a projected volume with a
//! `podCertificate` source for signer `shoal.io/mesh` and a
//! `clusterTrustBundle` source for the same signer. The kubelet generates the
//! agent's key, writes it to the volume and files a `PodCertificateRequest`
//! naming the pod, its UID, its service account and node, with a stub CSR
//! carrying the public key (the API server has checked the proof of
//! possession). The [`Signer`] watches those requests and:
//!
//! 1. reads the pod the request names, and [`decide`]s (a pure function):
//!    the pod exists with that UID, service account and node, carries the
//!    injector's `shoal.io/injected` label, the key type is one the mesh's
//!    TLS accepts, and no user annotation asks for anything;
//! 2. signs, with the mesh CA, a certificate for
//!    `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>` bound to
//!    node `<pod>.<namespace>` (the same certificate the identity service
//!    gives for a CSR), for the configured lifetime capped by the request's
//!    `maxExpirationSeconds`;
//! 3. writes it into the request's status with an `Issued` condition (or a
//!    `Denied` or `Failed` one with the reason), through `/status`.
//!
//! The kubelet writes the certificate into the volume and asks again from
//! `beginRefreshAt` (70 % of the lifetime); the agent's file source reloads
//! it. The mesh CA's roots are kept in the `ClusterTrustBundle`
//! [`TRUST_BUNDLE_NAME`] (both during a CA rotation), which the kubelet
//! projects next to the certificate.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt as _;
use k8s_openapi::api::certificates::v1::{
    ClusterTrustBundle, ClusterTrustBundleSpec, PodCertificateRequest, PodCertificateRequestSpec,
    PodCertificateRequestStatus,
};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta, Time};
use kube::api::{Api, PostParams};
use kube::runtime::watcher;

use crate::identity::{node_name, now_unix, SpiffeId};
use crate::meshca::CaStore;
use crate::metrics::Metrics;

/// The signer name injected pods ask for.
pub const SIGNER_NAME: &str = "shoal.io/mesh";
/// The `ClusterTrustBundle` holding the mesh roots; a signer-linked bundle's
/// name starts with the signer name, `/` turned into `:`.
pub const TRUST_BUNDLE_NAME: &str = "shoal.io:mesh:roots";
/// Label on the mesh's trust bundles, which the injected projection selects.
pub const TRUST_BUNDLE_LABEL: &str = "shoal.io/trust-bundle";
/// Value of [`TRUST_BUNDLE_LABEL`].
pub const TRUST_BUNDLE_LABEL_VALUE: &str = "mesh";
/// Key type the injected projection asks the kubelet for.
pub const KEY_TYPE: &str = "ECDSAP256";
/// Shortest lifetime the API server lets a signer issue.
pub const MIN_LIFETIME: Duration = Duration::from_secs(3600);
/// Lifetime the API server assumes when a request names none.
pub const DEFAULT_MAX_EXPIRATION: Duration = Duration::from_secs(24 * 3600);
/// How often the trust bundle is compared with the mesh CA's roots.
pub const TRUST_BUNDLE_SYNC_INTERVAL: Duration = Duration::from_secs(60);
/// Part of a certificate's lifetime after which the kubelet should renew.
pub const REFRESH_AT_PERCENT: i64 = 70;

/// How often requests whose answer failed on an API error are tried again
/// (and a trust bundle that could not be written).
pub const RETRY_INTERVAL: Duration = Duration::from_secs(5);
/// Value of the `outcome` label counting API errors on the way to an answer
/// (each attempt; the request is tried again).
pub const API_ERROR: &str = "api_error";

/// Whether a request is done with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answered {
    /// Decided and written, or nothing to do.
    Done,
    /// An API error on the way: to be tried again.
    Retry,
}

/// Condition types with special meaning on a request.
const ISSUED: &str = "Issued";
const DENIED: &str = "Denied";
const FAILED: &str = "Failed";

/// Why a request was decided as it was; the condition's `reason` and a
/// value of the `outcome` label of `shoal_injector_pod_certificates_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// Signed.
    Issued,
    /// The key is not one the mesh's TLS accepts (RSA, P-521).
    UnsupportedKeyType,
    /// The pod is gone, or its UID, service account or node differ.
    PodMismatch,
    /// The pod was not injected by this injector.
    NotInjected,
    /// `unverifiedUserAnnotations` asks for something this signer ignores.
    UnsupportedAnnotation,
    /// The stub CSR does not parse.
    BadRequest,
    /// Signing failed (the mesh CA is unusable).
    SignerFailed,
}

impl Reason {
    /// Every reason, so the metric starts with each at 0.
    pub const ALL: [Reason; 7] = [
        Reason::Issued,
        Reason::UnsupportedKeyType,
        Reason::PodMismatch,
        Reason::NotInjected,
        Reason::UnsupportedAnnotation,
        Reason::BadRequest,
        Reason::SignerFailed,
    ];

    /// The condition reason (CamelCase, as Kubernetes writes them).
    pub fn condition_reason(self) -> &'static str {
        match self {
            Reason::Issued => "Issued",
            Reason::UnsupportedKeyType => "UnsupportedKeyType",
            Reason::PodMismatch => "PodMismatch",
            Reason::NotInjected => "NotInjected",
            Reason::UnsupportedAnnotation => "UnsupportedAnnotation",
            Reason::BadRequest => "BadRequest",
            Reason::SignerFailed => "SignerFailed",
        }
    }

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Issued => "issued",
            Reason::UnsupportedKeyType => "unsupported_key_type",
            Reason::PodMismatch => "pod_mismatch",
            Reason::NotInjected => "not_injected",
            Reason::UnsupportedAnnotation => "unsupported_annotation",
            Reason::BadRequest => "bad_request",
            Reason::SignerFailed => "signer_failed",
        }
    }

    /// The condition type: `Failed` when the signer could not sign,
    /// `Denied` when it would not.
    fn condition_type(self) -> &'static str {
        match self {
            Reason::Issued => ISSUED,
            Reason::SignerFailed => FAILED,
            _ => DENIED,
        }
    }
}

/// A request refused: why, in a reason and in words.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// Never [`Reason::Issued`].
    pub reason: Reason,
    /// For the condition's message.
    pub message: String,
}

fn refuse(reason: Reason, message: impl Into<String>) -> Refusal {
    Refusal {
        reason,
        message: message.into(),
    }
}

/// What a granted request gets certified.
#[derive(Debug, PartialEq, Eq)]
pub struct Grant {
    /// The pod's workload identity.
    pub id: SpiffeId,
    /// The node name the certificate binds: `<pod>.<namespace>`.
    pub node: String,
    /// Lifetime of the certificate.
    pub lifetime: Duration,
    /// The key to certify, from the stub CSR.
    pub public_key: rcgen::PublicKey,
}

/// Key algorithms of the stub CSR that the mesh's TLS (rustls with ring)
/// accepts for a client and server certificate.
fn key_supported(alg: &rcgen::SignatureAlgorithm) -> bool {
    [
        &rcgen::PKCS_ECDSA_P256_SHA256,
        &rcgen::PKCS_ECDSA_P384_SHA384,
        &rcgen::PKCS_ED25519,
    ]
    .contains(&alg)
}

/// The decision on one request of `namespace`: pure. `pod` is the pod the
/// request names as the API server has it now (`None`: gone).
pub fn decide(
    namespace: &str,
    spec: &PodCertificateRequestSpec,
    pod: Option<&Pod>,
    trust_domain: &str,
    lifetime: Duration,
) -> Result<Grant, Refusal> {
    if let Some(keys) = spec
        .unverified_user_annotations
        .as_ref()
        .filter(|a| !a.is_empty())
    {
        return Err(refuse(
            Reason::UnsupportedAnnotation,
            format!(
                "signer {SIGNER_NAME} takes no user annotations; remove {:?}",
                keys.keys().collect::<Vec<_>>()
            ),
        ));
    }
    let Some(pod) = pod else {
        return Err(refuse(
            Reason::PodMismatch,
            format!("pod {namespace}/{} does not exist", spec.pod_name),
        ));
    };
    let pod_uid = pod.metadata.uid.as_deref().unwrap_or_default();
    if pod_uid != spec.pod_uid {
        return Err(refuse(
            Reason::PodMismatch,
            format!(
                "pod {namespace}/{} has UID {pod_uid:?}, the request names {:?}",
                spec.pod_name, spec.pod_uid
            ),
        ));
    }
    let pod_spec = pod.spec.clone().unwrap_or_default();
    let account = pod_spec
        .service_account_name
        .as_deref()
        .unwrap_or("default");
    if account != spec.service_account_name {
        return Err(refuse(
            Reason::PodMismatch,
            format!(
                "pod {namespace}/{} runs as service account {account:?}, the request names {:?}",
                spec.pod_name, spec.service_account_name
            ),
        ));
    }
    let node = pod_spec.node_name.as_deref().unwrap_or_default();
    if node != spec.node_name {
        return Err(refuse(
            Reason::PodMismatch,
            format!(
                "pod {namespace}/{} is on node {node:?}, the request names {:?}",
                spec.pod_name, spec.node_name
            ),
        ));
    }
    let injected = pod
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(crate::annotations::INJECTED_LABEL))
        .is_some_and(|v| v == "true");
    if !injected {
        return Err(refuse(
            Reason::NotInjected,
            format!(
                "pod {namespace}/{} was not injected by shoal-injector (no {}=true label); \
                 signer {SIGNER_NAME} certifies Shoal agents only",
                spec.pod_name,
                crate::annotations::INJECTED_LABEL
            ),
        ));
    }
    let der = rustls::pki_types::CertificateSigningRequestDer::from(
        spec.stub_pkc_s10_request.0.as_slice(),
    );
    let csr = rcgen::CertificateSigningRequestParams::from_der(&der).map_err(|e| {
        // The API server verified the stub CSR's signature already: one
        // that parses but that ring cannot verify has a key ring does not
        // do (P-521, RSA-PSS), which the API wants denied as such.
        use x509_parser::prelude::FromDer as _;
        let parses = x509_parser::certification_request::X509CertificationRequest::from_der(
            &spec.stub_pkc_s10_request.0,
        )
        .is_ok();
        if parses {
            refuse(
                Reason::UnsupportedKeyType,
                format!("signer {SIGNER_NAME} cannot use this key ({e}); use keyType {KEY_TYPE}"),
            )
        } else {
            refuse(
                Reason::BadRequest,
                format!("the stub CSR does not parse: {e}"),
            )
        }
    })?;
    if !key_supported(csr.public_key.algorithm()) {
        return Err(refuse(
            Reason::UnsupportedKeyType,
            format!("signer {SIGNER_NAME} certifies ECDSA P-256 or P-384 and Ed25519 keys; use keyType {KEY_TYPE}"),
        ));
    }
    let id: SpiffeId = format!(
        "spiffe://{trust_domain}/ns/{namespace}/sa/{}",
        spec.service_account_name
    )
    .parse()
    .map_err(|e| refuse(Reason::BadRequest, e))?;
    let asked = spec
        .max_expiration_seconds
        .and_then(|s| u64::try_from(s).ok())
        .map_or(DEFAULT_MAX_EXPIRATION, Duration::from_secs);
    Ok(Grant {
        id,
        node: node_name(&spec.pod_name, namespace),
        lifetime: lifetime.min(asked).max(MIN_LIFETIME),
        public_key: csr.public_key,
    })
}

/// Signs `grant` with `ca` at `now`: back-dated for clock skew within the
/// lifetime, so notAfter - notBefore is exactly the granted lifetime (the
/// API server refuses a certificate longer than the request's
/// `maxExpirationSeconds`), and never under [`MIN_LIFETIME`] (a CA that
/// expires sooner cannot sign: `SignerFailed`).
pub fn issue(
    ca: &crate::meshca::MeshCa,
    grant: &Grant,
    now: i64,
) -> Result<crate::meshca::Issued, Refusal> {
    let lifetime = i64::try_from(grant.lifetime.as_secs()).unwrap_or(i64::MAX);
    let issued = ca
        .sign_agent_of_node(
            &grant.id.to_string(),
            Some(&grant.node),
            &grant.public_key,
            now,
            lifetime - crate::meshca::CLOCK_SKEW_SECONDS,
        )
        .map_err(|e| refuse(Reason::SignerFailed, format!("cannot sign: {e}")))?;
    let validity = issued.not_after - issued.not_before;
    let shortest = i64::try_from(MIN_LIFETIME.as_secs()).unwrap_or(i64::MAX);
    if validity < shortest || validity > lifetime {
        return Err(refuse(
            Reason::SignerFailed,
            format!(
                "the mesh CA expires too soon: it can sign for {validity} s, the API needs at least {shortest} s"
            ),
        ));
    }
    Ok(issued)
}

/// Whether a request already carries a decision (`Issued`, `Denied` or
/// `Failed`): such a request is done.
pub fn decided(status: Option<&PodCertificateRequestStatus>) -> bool {
    status.and_then(|s| s.conditions.as_ref()).is_some_and(|c| {
        c.iter()
            .any(|c| [ISSUED, DENIED, FAILED].contains(&c.type_.as_str()) && c.status == "True")
    })
}

fn timestamp(unix: i64) -> Time {
    Time(k8s_openapi::jiff::Timestamp::from_second(unix).unwrap_or_default())
}

fn condition(reason: Reason, message: String, now: i64, generation: Option<i64>) -> Condition {
    Condition {
        type_: reason.condition_type().to_owned(),
        status: "True".to_owned(),
        reason: reason.condition_reason().to_owned(),
        message,
        last_transition_time: timestamp(now),
        observed_generation: generation,
    }
}

/// The status that issues `cert_pem` valid from `not_before` to `not_after`.
pub fn issued_status(
    cert_pem: String,
    not_before: i64,
    not_after: i64,
    now: i64,
    generation: Option<i64>,
) -> PodCertificateRequestStatus {
    let refresh = now + (not_after - now) * REFRESH_AT_PERCENT / 100;
    PodCertificateRequestStatus {
        begin_refresh_at: Some(timestamp(refresh)),
        certificate_chain: Some(cert_pem),
        conditions: Some(vec![condition(
            Reason::Issued,
            "signed by the Shoal mesh CA".to_owned(),
            now,
            generation,
        )]),
        not_after: Some(timestamp(not_after)),
        not_before: Some(timestamp(not_before)),
    }
}

/// The status that refuses a request.
pub fn refused_status(
    refusal: &Refusal,
    now: i64,
    generation: Option<i64>,
) -> PodCertificateRequestStatus {
    PodCertificateRequestStatus {
        conditions: Some(vec![condition(
            refusal.reason,
            refusal.message.clone(),
            now,
            generation,
        )]),
        ..PodCertificateRequestStatus::default()
    }
}

/// The `ClusterTrustBundle` carrying `bundle_pem` for [`SIGNER_NAME`].
pub fn trust_bundle(bundle_pem: &str) -> ClusterTrustBundle {
    ClusterTrustBundle {
        metadata: ObjectMeta {
            name: Some(TRUST_BUNDLE_NAME.to_owned()),
            labels: Some(
                [(
                    TRUST_BUNDLE_LABEL.to_owned(),
                    TRUST_BUNDLE_LABEL_VALUE.to_owned(),
                )]
                .into(),
            ),
            ..ObjectMeta::default()
        },
        spec: ClusterTrustBundleSpec {
            signer_name: Some(SIGNER_NAME.to_owned()),
            trust_bundle: bundle_pem.to_owned(),
        },
    }
}

/// The signer: watches the requests for [`SIGNER_NAME`] and answers them,
/// and keeps the trust bundle equal to the mesh CA's roots.
#[derive(Clone)]
pub struct Signer {
    client: kube::Client,
    ca: Arc<CaStore>,
    trust_domain: String,
    lifetime: Duration,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("trust_domain", &self.trust_domain)
            .field("lifetime", &self.lifetime)
            .finish_non_exhaustive()
    }
}

impl Signer {
    /// A signer for `trust_domain` signing with `ca` for `lifetime`.
    pub fn new(
        client: kube::Client,
        ca: Arc<CaStore>,
        trust_domain: String,
        lifetime: Duration,
        metrics: Arc<Metrics>,
    ) -> Signer {
        Signer {
            client,
            ca,
            trust_domain,
            lifetime,
            metrics,
        }
    }

    /// Runs until `shutdown` turns true: the request watch and the trust
    /// bundle sync.
    pub async fn run(self, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let api: Api<PodCertificateRequest> = Api::all(self.client.clone());
        let config = watcher::Config::default().fields(&format!("spec.signerName={SIGNER_NAME}"));
        let mut events = std::pin::pin!(watcher(api, config));
        let mut bundle_tick = tokio::time::interval(TRUST_BUNDLE_SYNC_INTERVAL);
        let mut retry_tick = tokio::time::interval(RETRY_INTERVAL);
        // The roots last written; the CA store changes on a rotation.
        let mut synced: Option<String> = None;
        // Requests whose answer failed on an API error: the watch does not
        // bring an unchanged request again, so they are asked for again.
        let mut pending: BTreeSet<(String, String)> = BTreeSet::new();
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                // A full check (someone may have edited the bundle)...
                _ = bundle_tick.tick() => synced = self.sync_trust_bundle_logged().await,
                // ...and, more often, a write when the CA changed or the
                // last write failed.
                _ = retry_tick.tick() => {
                    if synced.as_deref() != Some(self.ca.get().trust_bundle()) {
                        synced = self.sync_trust_bundle_logged().await;
                    }
                    self.retry(&mut pending).await;
                }
                event = events.next() => match event {
                    Some(Ok(watcher::Event::Apply(r) | watcher::Event::InitApply(r))) => {
                        let key = (
                            r.metadata.namespace.clone().unwrap_or_default(),
                            r.metadata.name.clone().unwrap_or_default(),
                        );
                        if self.answer(r).await == Answered::Retry {
                            pending.insert(key);
                        }
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "PodCertificateRequest watch failed; retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                    None => return,
                }
            }
        }
    }

    /// [`Signer::sync_trust_bundle`], logged and counted; the roots written.
    async fn sync_trust_bundle_logged(&self) -> Option<String> {
        let roots = self.ca.get().trust_bundle().to_owned();
        match self.sync_trust_bundle().await {
            Ok(()) => Some(roots),
            Err(e) => {
                self.metrics.pod_certificate(API_ERROR);
                tracing::warn!(error = %e, bundle = TRUST_BUNDLE_NAME, "cannot update the mesh trust bundle; retrying");
                None
            }
        }
    }

    /// Answers again the requests whose answer failed: each read afresh
    /// (one that is gone or decided meanwhile is dropped).
    async fn retry(&self, pending: &mut BTreeSet<(String, String)>) {
        for (namespace, name) in std::mem::take(pending) {
            let api: Api<PodCertificateRequest> = Api::namespaced(self.client.clone(), &namespace);
            let answered = match api.get_opt(&name).await {
                Ok(None) => Answered::Done,
                Ok(Some(request)) => self.answer(request).await,
                Err(e) => {
                    self.metrics.pod_certificate(API_ERROR);
                    tracing::warn!(error = %e, request = %name, %namespace, "cannot read a PodCertificateRequest; retrying");
                    Answered::Retry
                }
            };
            if answered == Answered::Retry {
                pending.insert((namespace, name));
            }
        }
    }

    /// Creates or updates [`TRUST_BUNDLE_NAME`] to hold the mesh CA's roots.
    pub async fn sync_trust_bundle(&self) -> Result<(), kube::Error> {
        let api: Api<ClusterTrustBundle> = Api::all(self.client.clone());
        let want = trust_bundle(self.ca.get().trust_bundle());
        match api.get_opt(TRUST_BUNDLE_NAME).await? {
            None => {
                api.create(&PostParams::default(), &want).await?;
                tracing::info!(bundle = TRUST_BUNDLE_NAME, "mesh trust bundle created");
            }
            Some(have) if have.spec.trust_bundle != want.spec.trust_bundle => {
                let mut next = have;
                next.spec = want.spec;
                api.replace(TRUST_BUNDLE_NAME, &PostParams::default(), &next)
                    .await?;
                tracing::info!(bundle = TRUST_BUNDLE_NAME, "mesh trust bundle updated");
            }
            Some(_) => {}
        }
        Ok(())
    }

    /// Decides one request (unless decided already) and writes the status;
    /// [`Answered::Retry`] when the API failed on the way.
    pub async fn answer(&self, request: PodCertificateRequest) -> Answered {
        if request.spec.signer_name != SIGNER_NAME || decided(request.status.as_ref()) {
            return Answered::Done;
        }
        let Some(namespace) = request.metadata.namespace.clone() else {
            return Answered::Done;
        };
        let Some(name) = request.metadata.name.clone() else {
            return Answered::Done;
        };
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &namespace);
        let pod = match pods.get_opt(&request.spec.pod_name).await {
            Ok(pod) => pod,
            Err(e) => {
                // Undecided and asked for again: a transient API error must
                // not deny a pod.
                self.metrics.pod_certificate(API_ERROR);
                tracing::warn!(error = %e, request = %name, %namespace, "cannot read the pod of a PodCertificateRequest; retrying");
                return Answered::Retry;
            }
        };
        let now = now_unix();
        let generation = request.metadata.generation;
        let decision = decide(
            &namespace,
            &request.spec,
            pod.as_ref(),
            &self.trust_domain,
            self.lifetime,
        )
        .and_then(|grant| {
            let issued = issue(&self.ca.get(), &grant, now)?;
            Ok((grant, issued))
        });
        let (status, reason) = match decision {
            Ok((grant, issued)) => {
                tracing::info!(request = %name, %namespace, spiffe_id = %grant.id, node = %grant.node, not_after = issued.not_after, "pod certificate issued");
                (
                    issued_status(
                        issued.cert_pem,
                        issued.not_before,
                        issued.not_after,
                        now,
                        generation,
                    ),
                    Reason::Issued,
                )
            }
            Err(refusal) => {
                tracing::warn!(request = %name, %namespace, reason = refusal.reason.condition_reason(), message = %refusal.message, "pod certificate refused");
                (refused_status(&refusal, now, generation), refusal.reason)
            }
        };
        let mut updated = request;
        updated.status = Some(status);
        let api: Api<PodCertificateRequest> = Api::namespaced(self.client.clone(), &namespace);
        match api
            .replace_status(&name, &PostParams::default(), &updated)
            .await
        {
            Ok(_) => {
                self.metrics.pod_certificate(reason.as_str());
                Answered::Done
            }
            // Another replica of the injector decided first (409), or the
            // request is gone: either way there is nothing left to do.
            Err(kube::Error::Api(e)) if e.code == 409 || e.code == 404 => Answered::Done,
            Err(e) => {
                self.metrics.pod_certificate(API_ERROR);
                tracing::warn!(error = %e, request = %name, %namespace, "cannot write a PodCertificateRequest's status; retrying");
                Answered::Retry
            }
        }
    }
}

#[cfg(test)]
mod tests;
