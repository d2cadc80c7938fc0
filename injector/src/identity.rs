//! The identity service: agents trade a CSR and their projected
//! service-account token for a short-lived mesh certificate, as Linkerd's
//! identity service does.
//!
//! `POST /v1/certificates` with `{"csr": "<PEM>", "token": "<JWT>"}`:
//!
//! 1. the CSR must parse, its signature verify (the agent holds the key; the
//!    key itself never travels), and ask for exactly one SAN, a URI
//!    `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`;
//! 2. the token goes to the API server in a TokenReview with audience
//!    `shoal`;
//! 3. [`decide`] (a pure function) compares the review with the identity
//!    asked for: authenticated, for audience `shoal`, a service account's
//!    token bound to a pod, that service account and namespace, this trust
//!    domain;
//! 4. the mesh CA ([`crate::meshca`]) signs the CSR's public key for 24 h by
//!    default, back-dated for clock skew.
//!
//! The answer is `{"spiffe_id", "certificate", "trust_bundle", "not_before",
//! "not_after", "peers"}` (`peers`: a few other agents' mesh addresses, from
//! [`crate::peers`]); a refusal is `{"error": {"code", "message"}}` with one of
//! the codes of [`Outcome`].

use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use kube::api::{Api, PostParams};
use serde::{Deserialize, Serialize};

use crate::meshca::CaStore;
use crate::metrics::Metrics;
use crate::peers::PeerBook;

/// Default listen address of the identity endpoint (HTTPS).
pub const DEFAULT_IDENTITY_ADDR: &str = "0.0.0.0:4711";

/// The node name of the agent in pod `pod` of `namespace`: `<pod>.<namespace>`,
/// unique in the cluster where pod names are not (a StatefulSet's `db-0` in
/// two namespaces). The injector sets the agent's `SHOAL_NODE_NAME` to it,
/// and the identity service binds each certificate to it.
pub fn node_name(pod: &str, namespace: &str) -> String {
    format!("{pod}.{namespace}")
}
/// Name of the identity port in the Deployment and the Service.
pub const IDENTITY_PORT_NAME: &str = "identity";
/// Path of the certificate endpoint.
pub const CERTIFICATES_PATH: &str = "/v1/certificates";
/// Path of the discovery endpoint (`{"token"}` in, `{"peers", "founder"}`
/// out), for agents whose certificate comes from a pod certificate volume.
pub const PEERS_PATH: &str = "/v1/peers";
/// Default trust domain of cluster meshes.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
/// Default lifetime of an agent certificate.
pub const DEFAULT_CERT_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// Lifetime of the identity endpoint's own serving certificate.
pub const SERVING_CERT_LIFETIME_SECONDS: i64 = 24 * 3600;
/// Most time a TokenReview may take.
pub const TOKEN_REVIEW_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest request body accepted.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// TokenReview `extra` key naming the pod a token is bound to.
pub const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";
/// TokenReview `extra` key with the UID of the pod a token is bound to.
pub const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";
/// Prefix of a service account's username.
pub const SERVICE_ACCOUNT_PREFIX: &str = "system:serviceaccount:";

/// A SPIFFE ID of the form `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`
/// (the same rules as the agent's `shoal_mesh::identity::SpiffeId`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SpiffeId {
    /// Trust domain (the mesh).
    pub trust_domain: String,
    /// Kubernetes namespace.
    pub namespace: String,
    /// Kubernetes service account.
    pub service_account: String,
}

fn valid_segment(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'.' | b'_')
        })
}

impl std::str::FromStr for SpiffeId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or_else(|| format!("{s:?} is not a SPIFFE ID (spiffe://...)"))?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            [td, "ns", ns, "sa", sa]
                if valid_segment(td) && valid_segment(ns) && valid_segment(sa) =>
            {
                Ok(SpiffeId {
                    trust_domain: (*td).to_owned(),
                    namespace: (*ns).to_owned(),
                    service_account: (*sa).to_owned(),
                })
            }
            _ => Err(format!(
                "{s:?} is not spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>"
            )),
        }
    }
}

impl std::fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

/// How a request ended; the refusals are the error codes of the API, and
/// every value is a value of the `outcome` label of
/// `shoal_injector_identity_requests_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// A certificate was issued.
    Issued,
    /// Peers were named (`POST /v1/peers`).
    Discovered,
    /// Not a JSON body with `csr` and `token`, wrong method or path.
    BadRequest,
    /// The CSR does not parse, its signature does not verify, or it does not
    /// ask for exactly one SPIFFE ID.
    BadCsr,
    /// The API server did not authenticate the token.
    TokenInvalid,
    /// The API server said the token has expired.
    TokenExpired,
    /// The token is not for audience `shoal`.
    TokenAudience,
    /// The token is good but not for the identity the CSR asks for (another
    /// service account or namespace, not bound to a pod, another trust domain).
    IdentityMismatch,
    /// The TokenReview could not be made (API server unreachable, slow, or
    /// refusing the injector).
    ApiUnavailable,
    /// Signing failed (the mesh CA is unusable or expired).
    Internal,
}

impl Outcome {
    /// Every outcome, so the metric starts with each at 0.
    pub const ALL: [Outcome; 10] = [
        Outcome::Issued,
        Outcome::Discovered,
        Outcome::BadRequest,
        Outcome::BadCsr,
        Outcome::TokenInvalid,
        Outcome::TokenExpired,
        Outcome::TokenAudience,
        Outcome::IdentityMismatch,
        Outcome::ApiUnavailable,
        Outcome::Internal,
    ];

    /// The error code and metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Issued => "issued",
            Outcome::Discovered => "discovered",
            Outcome::BadRequest => "bad_request",
            Outcome::BadCsr => "bad_csr",
            Outcome::TokenInvalid => "token_invalid",
            Outcome::TokenExpired => "token_expired",
            Outcome::TokenAudience => "token_audience",
            Outcome::IdentityMismatch => "identity_mismatch",
            Outcome::ApiUnavailable => "api_unavailable",
            Outcome::Internal => "internal",
        }
    }

    /// The HTTP status of the answer.
    pub fn status(self) -> StatusCode {
        match self {
            Outcome::Issued | Outcome::Discovered => StatusCode::OK,
            Outcome::BadRequest | Outcome::BadCsr => StatusCode::BAD_REQUEST,
            Outcome::TokenInvalid | Outcome::TokenExpired | Outcome::TokenAudience => {
                StatusCode::UNAUTHORIZED
            }
            Outcome::IdentityMismatch => StatusCode::FORBIDDEN,
            Outcome::ApiUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            Outcome::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// A refused request: why, in a code and in words.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Denial {
    /// The error code (never [`Outcome::Issued`]).
    pub outcome: Outcome,
    /// What was wrong, for the agent's log.
    pub message: String,
}

impl Denial {
    fn new(outcome: Outcome, message: impl Into<String>) -> Denial {
        Denial {
            outcome,
            message: message.into(),
        }
    }
}

/// The pod a request was allowed for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Allowed {
    /// The pod the token is bound to.
    pub pod: String,
    /// Its UID, when the API server said.
    pub pod_uid: Option<String>,
}

/// What [`decide`] checks against.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// The mesh's trust domain.
    pub trust_domain: String,
    /// The token audience that was asked for in the review.
    pub audience: String,
}

/// Classifies an unauthenticated review by the API server's error text:
/// expired, wrong audience, or anything else.
fn unauthenticated(error: Option<&str>) -> Denial {
    let detail = error
        .filter(|e| !e.trim().is_empty())
        .unwrap_or("no reason given");
    let lower = detail.to_ascii_lowercase();
    let (outcome, what) = if lower.contains("expired") {
        (Outcome::TokenExpired, "the token has expired")
    } else if lower.contains("audience") {
        (Outcome::TokenAudience, "the token is for another audience")
    } else {
        (Outcome::TokenInvalid, "the token was not authenticated")
    };
    Denial::new(outcome, format!("{what} (API server: {detail})"))
}

/// Who a reviewed token speaks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bearer {
    /// The service account's namespace.
    pub namespace: String,
    /// The service account.
    pub service_account: String,
    /// The pod the token is bound to, and its UID when the API server said.
    pub allowed: Allowed,
}

/// The first half of [`decide`]: the token is authenticated, for
/// `policy.audience`, a service account's and bound to a pod. Pure.
pub fn authenticate(status: &TokenReviewStatus, policy: &Policy) -> Result<Bearer, Denial> {
    if status.authenticated != Some(true) {
        return Err(unauthenticated(status.error.as_deref()));
    }
    // An audience-aware API server says which of the asked audiences the
    // token carries; one that says nothing cannot be trusted to have checked.
    let audiences = status.audiences.as_deref().unwrap_or_default();
    if !audiences.contains(&policy.audience) {
        return Err(Denial::new(
            Outcome::TokenAudience,
            format!(
                "the token is not for audience {:?} (API server answered audiences {audiences:?})",
                policy.audience
            ),
        ));
    }
    let user = status.user.clone().unwrap_or_default();
    let username = user.username.as_deref().unwrap_or("");
    let Some((namespace, service_account)) = username
        .strip_prefix(SERVICE_ACCOUNT_PREFIX)
        .and_then(|rest| rest.split_once(':'))
        .filter(|(ns, sa)| !ns.is_empty() && !sa.is_empty() && !sa.contains(':'))
    else {
        return Err(Denial::new(
            Outcome::IdentityMismatch,
            format!("the token is not a service account's (user {username:?})"),
        ));
    };
    let extra = user.extra.unwrap_or_default();
    let single = |key: &str| match extra.get(key).map(Vec::as_slice) {
        Some([v]) if !v.is_empty() => Some(v.clone()),
        _ => None,
    };
    let Some(pod) = single(EXTRA_POD_NAME) else {
        return Err(Denial::new(
            Outcome::IdentityMismatch,
            "the token is not bound to a pod: use the projected token the injector mounts",
        ));
    };
    Ok(Bearer {
        namespace: namespace.to_owned(),
        service_account: service_account.to_owned(),
        allowed: Allowed {
            pod,
            pod_uid: single(EXTRA_POD_UID),
        },
    })
}

/// The decision: may the holder of the reviewed token have a certificate
/// for `wanted`? Pure; `status` is the API server's answer to a TokenReview
/// that asked for `policy.audience`.
pub fn decide(
    status: &TokenReviewStatus,
    wanted: &SpiffeId,
    policy: &Policy,
) -> Result<Allowed, Denial> {
    let Bearer {
        namespace,
        service_account,
        allowed,
    } = authenticate(status, policy)?;
    if namespace != wanted.namespace || service_account != wanted.service_account {
        return Err(Denial::new(
            Outcome::IdentityMismatch,
            format!(
                "the token is for service account {namespace}/{service_account} (pod {}), \
                 the CSR asks for {wanted}",
                allowed.pod
            ),
        ));
    }
    if wanted.trust_domain != policy.trust_domain {
        return Err(Denial::new(
            Outcome::IdentityMismatch,
            format!(
                "the CSR asks for trust domain {:?}, this mesh is {:?}",
                wanted.trust_domain, policy.trust_domain
            ),
        ));
    }
    Ok(allowed)
}

/// A checked CSR: the identity it asks for and the key to certify.
pub struct Csr {
    /// The SPIFFE ID of its one URI SAN.
    pub id: SpiffeId,
    /// The public key whose possession the CSR's signature proves.
    pub public_key: rcgen::PublicKey,
}

impl std::fmt::Debug for Csr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Csr")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// Parses and checks a PEM CSR: a valid signature and exactly one SAN, a
/// URI that is a SPIFFE ID. What else it asks for (subject, key usages) is
/// ignored: the CA decides those.
pub fn parse_csr(pem: &str) -> Result<Csr, Denial> {
    let bad = |m: String| Denial::new(Outcome::BadCsr, m);
    if !pem.contains("-----BEGIN CERTIFICATE REQUEST-----") {
        return Err(bad(
            "csr is not a PEM CERTIFICATE REQUEST (PKCS#10)".to_owned()
        ));
    }
    let params = rcgen::CertificateSigningRequestParams::from_pem(pem).map_err(|e| {
        bad(match e {
            rcgen::Error::RingUnspecified => "the CSR's signature does not verify".to_owned(),
            rcgen::Error::UnsupportedExtension => {
                "the CSR asks for an extension other than subjectAltName, keyUsage, extKeyUsage"
                    .to_owned()
            }
            e => format!("cannot parse the CSR: {e}"),
        })
    })?;
    let sans = &params.params.subject_alt_names;
    let [rcgen::SanType::URI(uri)] = sans.as_slice() else {
        return Err(bad(format!(
            "the CSR must ask for exactly one subjectAltName, a URI \
             spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>; it asks for {} SANs",
            sans.len()
        )));
    };
    let id: SpiffeId = uri.as_str().parse().map_err(bad)?;
    Ok(Csr {
        id,
        public_key: params.public_key,
    })
}

/// A certificate request.
#[derive(Clone, Deserialize)]
pub struct CertificateRequest {
    /// The CSR, PEM (`CERTIFICATE REQUEST`).
    pub csr: String,
    /// The pod's projected service-account token (audience `shoal`).
    pub token: String,
}

impl std::fmt::Debug for CertificateRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateRequest")
            .field("token", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// The answer to a granted request.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct CertificateResponse {
    /// The identity certified.
    pub spiffe_id: String,
    /// The certificate, PEM.
    pub certificate: String,
    /// Every root to trust, PEM (more than one during a CA rotation).
    pub trust_bundle: String,
    /// Start of validity, unix seconds.
    pub not_before: i64,
    /// End of validity, unix seconds.
    pub not_after: i64,
    /// Other agents' mesh addresses (`ip:port`), for discovery: a few of the
    /// injected pods the injector watches (empty for the first agent).
    #[serde(default)]
    pub peers: Vec<String>,
    /// Whether the agent's pod is the oldest injected pod: a new agent told
    /// so founds the mesh (creates its meta group); every other one joins.
    /// Absent when the service runs without discovery: the agent then
    /// decides as without one (it founds when it has no one to join).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub founder: Option<bool>,
}

/// A discovery request (`POST /v1/peers`).
#[derive(Clone, Deserialize)]
pub struct PeersRequest {
    /// The pod's projected service-account token (audience `shoal`).
    pub token: String,
}

/// The answer to a discovery request: as the same fields of
/// [`CertificateResponse`].
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PeersResponse {
    /// Other agents' mesh addresses (`ip:port`).
    pub peers: Vec<String>,
    /// Whether the agent's pod is the oldest injected pod (it founds the mesh).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub founder: Option<bool>,
}

/// Settings of the identity service.
#[derive(Clone, Debug)]
pub struct IdentityConfig {
    /// What requests are checked against.
    pub policy: Policy,
    /// Lifetime of issued certificates.
    pub cert_lifetime: Duration,
    /// Most time a TokenReview may take.
    pub review_timeout: Duration,
}

impl Default for IdentityConfig {
    fn default() -> Self {
        IdentityConfig {
            policy: Policy {
                trust_domain: DEFAULT_TRUST_DOMAIN.to_owned(),
                audience: crate::config::DEFAULT_TOKEN_AUDIENCE.to_owned(),
            },
            cert_lifetime: DEFAULT_CERT_LIFETIME,
            review_timeout: TOKEN_REVIEW_TIMEOUT,
        }
    }
}

/// The identity service: checks requests and signs certificates.
#[derive(Clone)]
pub struct IdentityService {
    client: kube::Client,
    ca: Arc<CaStore>,
    config: Arc<IdentityConfig>,
    metrics: Arc<Metrics>,
    peers: Option<PeerBook>,
}

impl std::fmt::Debug for IdentityService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityService")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Now, in Unix seconds (0 before 1970), for certificate validity.
pub(crate) fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

impl IdentityService {
    /// A service reviewing tokens through `client` and signing with `ca`.
    pub fn new(
        client: kube::Client,
        ca: Arc<CaStore>,
        config: IdentityConfig,
        metrics: Arc<Metrics>,
    ) -> IdentityService {
        IdentityService {
            client,
            ca,
            config: Arc::new(config),
            metrics,
            peers: None,
        }
    }

    /// Answers name other agents from `peers` (discovery).
    pub fn with_peers(mut self, peers: PeerBook) -> IdentityService {
        self.peers = Some(peers);
        self
    }

    /// The metrics requests are counted in.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Answers one request body; counts its outcome.
    pub async fn handle(&self, body: &[u8]) -> Result<CertificateResponse, Denial> {
        let result = self.issue(body).await;
        let outcome = match &result {
            Ok(r) => {
                self.metrics.identity_certificates_issued.inc();
                tracing::info!(spiffe_id = %r.spiffe_id, not_after = r.not_after, "certificate issued");
                Outcome::Issued
            }
            Err(d) => {
                tracing::info!(code = d.outcome.as_str(), reason = %d.message, "certificate refused");
                d.outcome
            }
        };
        self.metrics.identity_request(outcome.as_str());
        result
    }

    /// Answers one discovery request body; counts its outcome.
    pub async fn handle_peers(&self, body: &[u8]) -> Result<PeersResponse, Denial> {
        let result = self.discover(body).await;
        let outcome = match &result {
            Ok(_) => Outcome::Discovered,
            Err(d) => {
                tracing::info!(code = d.outcome.as_str(), reason = %d.message, "discovery refused");
                d.outcome
            }
        };
        self.metrics.identity_request(outcome.as_str());
        result
    }

    async fn discover(&self, body: &[u8]) -> Result<PeersResponse, Denial> {
        let req: PeersRequest = serde_json::from_slice(body).map_err(|e| {
            Denial::new(
                Outcome::BadRequest,
                format!("expected JSON {{\"token\": \"<JWT>\"}}: {e}"),
            )
        })?;
        let token = req.token.trim();
        if token.is_empty() {
            return Err(Denial::new(Outcome::BadRequest, "token is empty"));
        }
        let status = self.review(token).await?;
        let bearer = authenticate(&status, &self.config.policy)?;
        let Some(book) = &self.peers else {
            return Ok(PeersResponse {
                peers: Vec::new(),
                founder: None,
            });
        };
        let found = book
            .peers_for(
                (&bearer.namespace, &bearer.allowed.pod),
                bearer.allowed.pod_uid.as_deref(),
            )
            .await
            .ok_or_else(|| {
                Denial::new(
                    Outcome::ApiUnavailable,
                    "the injector's watch does not list this pod yet (discovery); retry shortly",
                )
            })?;
        Ok(PeersResponse {
            peers: found.peers.iter().map(ToString::to_string).collect(),
            founder: Some(found.founder),
        })
    }

    async fn issue(&self, body: &[u8]) -> Result<CertificateResponse, Denial> {
        let req: CertificateRequest = serde_json::from_slice(body).map_err(|e| {
            Denial::new(
                Outcome::BadRequest,
                format!("expected JSON {{\"csr\": \"<PEM>\", \"token\": \"<JWT>\"}}: {e}"),
            )
        })?;
        let token = req.token.trim();
        if token.is_empty() {
            return Err(Denial::new(Outcome::BadRequest, "token is empty"));
        }
        // The CSR first: garbage costs no API call.
        let csr = parse_csr(&req.csr)?;
        let status = self.review(token).await?;
        let allowed = decide(&status, &csr.id, &self.config.policy)?;
        let discovery = match &self.peers {
            None => None,
            Some(book) => Some(
                book.peers_for((&csr.id.namespace, &allowed.pod), allowed.pod_uid.as_deref())
                    .await
                    .ok_or_else(|| {
                        Denial::new(
                            Outcome::ApiUnavailable,
                            "the injector's watch does not list this pod yet (discovery); retry shortly",
                        )
                    })?,
            ),
        };
        let ca = self.ca.get();
        let lifetime = i64::try_from(self.config.cert_lifetime.as_secs()).unwrap_or(i64::MAX);
        let spiffe_id = csr.id.to_string();
        let issued = ca
            .sign_agent_of_node(
                &spiffe_id,
                Some(&node_name(&allowed.pod, &csr.id.namespace)),
                &csr.public_key,
                now_unix(),
                lifetime,
            )
            .map_err(|e| Denial::new(Outcome::Internal, format!("cannot sign: {e}")))?;
        tracing::debug!(pod = %allowed.pod, %spiffe_id, "token matches the CSR");
        Ok(CertificateResponse {
            spiffe_id,
            certificate: issued.cert_pem,
            trust_bundle: ca.trust_bundle().to_owned(),
            not_before: issued.not_before,
            not_after: issued.not_after,
            peers: discovery
                .as_ref()
                .map(|d| d.peers.iter().map(ToString::to_string).collect())
                .unwrap_or_default(),
            founder: discovery.map(|d| d.founder),
        })
    }

    async fn review(&self, token: &str) -> Result<TokenReviewStatus, Denial> {
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: token.to_owned(),
                audiences: Some(vec![self.config.policy.audience.clone()]),
            },
            ..TokenReview::default()
        };
        let unavailable = |m: String| Denial::new(Outcome::ApiUnavailable, m);
        match tokio::time::timeout(
            self.config.review_timeout,
            api.create(&PostParams::default(), &review),
        )
        .await
        {
            Ok(Ok(r)) => r.status.ok_or_else(|| {
                unavailable("the API server answered the TokenReview without a status".to_owned())
            }),
            Ok(Err(e)) => Err(unavailable(format!("TokenReview failed: {e}"))),
            Err(_) => Err(unavailable(format!(
                "TokenReview took longer than {:?}",
                self.config.review_timeout
            ))),
        }
    }
}

#[cfg(test)]
mod tests;
