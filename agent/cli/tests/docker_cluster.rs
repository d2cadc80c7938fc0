//! A cluster played with Docker, as a platform engineer's would run.
//!
//! - An API-server stand-in (HTTPS, in this test, speaking the k8s-openapi
//!   types) signs the pods' projected service-account tokens (JWTs, ES256,
//!   with a key it owns), answers TokenReviews by their signature, expiry
//!   and audience, keeps Secrets, and lists and watches namespaces and pods.
//! - `shoal-injector` runs as a container from its image, with the
//!   environment of `manifests/base/deployment.yaml` and in-cluster API
//!   credentials (token, `ca.crt`, `KUBERNETES_SERVICE_HOST`). It bootstraps
//!   the mesh CA into the stand-in's Secret and serves identity.
//! - `shoal inject` (this package's binary) injects `manifests/examples/hello`
//!   into two namespaces; each Deployment becomes one pod: a pause container
//!   holding the pod's network namespace, then every container of the
//!   injected pod spec (the agent from `shoal-agent:dev`, the app from
//!   `shoal-test-app:dev` in place of `curlimages/curl`), with the spec's
//!   environment, user, read-only root, dropped capabilities, memory limit and
//!   volumes (the projected token as a file the test writes, `emptyDir` as
//!   tmpfs).
//!
//! Checked: the mesh forms with no seeds given by hand; hello's subscriber
//! receives its publisher's greetings across pods, and only its own
//! namespace's; a publish to another namespace's topic is refused with a
//! clear error until the owner grants it, then delivered; a token for
//! another audience, an expired token and a token of another service
//! account are refused, each with a clear reason and a metric; certificates
//! rotate (one-minute lifetimes) with no publish refused and no message lost.
//!
//! Then a CA rotation (a new root introduced, signing switched to it, the
//! old root retired; the injector re-reads the Secret every 5 s) while
//! publishes go on: every agent trusts both roots, then holds a
//! certificate of the new CA, then trusts the new root only; the mesh stays
//! whole and every publish is acknowledged and read.
//!
//! Then pod certificates (KEP-4317): the injector also runs with the
//! `manifests/pod-certificates` overlay's environment (it signs for
//! `shoal.io/mesh`), the stand-in keeps PodCertificateRequests and
//! ClusterTrustBundles, and the test plays the kubelet for hello injected
//! into a third namespace with `--pod-certificates`: it files each pod's
//! request with a stub CSR of a key it makes, waits for the signer, and
//! writes key, chain and roots into the pod's volume. Checked: a pod the
//! injector did not inject is denied (`NotInjected`) and does not start;
//! the others' agents join the mesh of the CSR-path agents through
//! discovery alone, hello works there, and it is all counted.
//!
//! Needs Docker and the images `shoal-agent:dev` and `shoal-injector:dev`
//! (`bash .ci/injector.sh images`, which CI runs first); `shoal-test-app:dev`
//! is built when missing. Skipped without them unless `SHOAL_REQUIRE_DOCKER=1`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewStatus, UserInfo};
use k8s_openapi::api::certificates::v1::{
    ClusterTrustBundle, PodCertificateRequest, PodCertificateRequestSpec,
};
use k8s_openapi::api::core::v1::{Container, Namespace, Pod, PodStatus, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::Notify;

mod docker;
use docker::*;

/// The image the hello example's apps run; replaced by [`APP_IMAGE`].
const HELLO_APP_IMAGE: &str = "curlimages/curl:8.10.1";
const SYSTEM_NS: &str = "shoal-system";
const IDENTITY_HOST: &str = "shoal-injector.shoal-system.svc";
const AUDIENCE: &str = "shoal";
const NAMESPACES: [&str; 2] = ["team-a", "team-b"];
/// Agent certificates live this long (the injector's shortest), so every
/// agent renews within the test.
const CERT_LIFETIME: &str = "60s";
const INJECTOR_SA_TOKEN: &str = "injector-service-account-token";
/// How often the injector re-reads the mesh CA Secret here (a minute by
/// default), so a CA rotation's steps take effect within the test.
const CA_RELOAD: Duration = Duration::from_secs(5);

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

// ---------------------------------------------------------- the API server

/// What a projected token says, as the stand-in issued it.
#[derive(Clone)]
struct Claims {
    namespace: String,
    service_account: String,
    pod: String,
    pod_uid: String,
    audience: String,
    expires: i64,
}

/// The stand-in's objects. Every change of a pod is an event in `events`
/// with the resource version it made, so a watch from any version replays
/// what followed, as the API server's does.
#[derive(Default)]
struct ApiState {
    secrets: BTreeMap<(String, String), Secret>,
    namespaces: Vec<Namespace>,
    pods: BTreeMap<(String, String), Pod>,
    events: Vec<(u64, &'static str, Pod)>,
    /// PodCertificateRequests by (namespace, name), as the kubelet files them.
    pod_certificate_requests: BTreeMap<(String, String), PodCertificateRequest>,
    cluster_trust_bundles: BTreeMap<String, ClusterTrustBundle>,
    version: u64,
    reviews: usize,
}

struct ApiServer {
    state: Mutex<ApiState>,
    changed: Notify,
    /// The key service-account tokens are signed with (ES256), as the API
    /// server's `--service-account-signing-key-file`.
    token_key: ring::signature::EcdsaKeyPair,
}

fn b64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

impl ApiServer {
    fn new() -> ApiServer {
        use ring::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        ApiServer {
            state: Mutex::new(ApiState::default()),
            changed: Notify::new(),
            token_key: EcdsaKeyPair::from_pkcs8(
                &ECDSA_P256_SHA256_FIXED_SIGNING,
                pkcs8.as_ref(),
                &rng,
            )
            .unwrap(),
        }
    }

    /// A projected service-account token: a JWT with Kubernetes' claims,
    /// signed with the stand-in's key.
    fn issue_token(&self, claims: Claims) -> String {
        let header = json!({"alg": "ES256", "typ": "JWT", "kid": "stand-in"});
        let payload = json!({
            "iss": "https://kubernetes.default.svc.cluster.local",
            "aud": [claims.audience],
            "exp": claims.expires,
            "iat": unix_now(),
            "nbf": unix_now(),
            "sub": format!("system:serviceaccount:{}:{}", claims.namespace, claims.service_account),
            "kubernetes.io": {
                "namespace": claims.namespace,
                "pod": {"name": claims.pod, "uid": claims.pod_uid},
                "serviceaccount": {"name": claims.service_account, "uid": "sa-uid"},
            },
        });
        let signed = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(payload.to_string().as_bytes())
        );
        let signature = self
            .token_key
            .sign(&ring::rand::SystemRandom::new(), signed.as_bytes())
            .unwrap();
        format!("{signed}.{}", b64(signature.as_ref()))
    }

    /// The claims of `token` if its signature is the stand-in's.
    fn verify_token(&self, token: &str) -> Option<Claims> {
        use base64::Engine as _;
        use ring::signature::KeyPair as _;
        let (signed, signature) = token.rsplit_once('.')?;
        let (_, payload) = signed.split_once('.')?;
        let decode = |s: &str| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(s)
                .ok()
        };
        ring::signature::UnparsedPublicKey::new(
            &ring::signature::ECDSA_P256_SHA256_FIXED,
            self.token_key.public_key().as_ref(),
        )
        .verify(signed.as_bytes(), &decode(signature)?)
        .ok()?;
        let claims: Value = serde_json::from_slice(&decode(payload)?).ok()?;
        let k8s = &claims["kubernetes.io"];
        Some(Claims {
            namespace: k8s["namespace"].as_str()?.to_owned(),
            service_account: k8s["serviceaccount"]["name"].as_str()?.to_owned(),
            pod: k8s["pod"]["name"].as_str()?.to_owned(),
            pod_uid: k8s["pod"]["uid"].as_str()?.to_owned(),
            audience: claims["aud"][0].as_str()?.to_owned(),
            expires: claims["exp"].as_i64()?,
        })
    }

    fn put_pod(&self, mut pod: Pod) {
        let mut st = self.state.lock().unwrap();
        st.version += 1;
        pod.metadata.resource_version = Some(st.version.to_string());
        let key = (
            pod.metadata.namespace.clone().unwrap(),
            pod.metadata.name.clone().unwrap(),
        );
        let kind = if st.pods.contains_key(&key) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        let version = st.version;
        st.events.push((version, kind, pod.clone()));
        st.pods.insert(key, pod);
        drop(st);
        self.changed.notify_waiters();
    }

    fn delete_pod(&self, namespace: &str, name: &str) {
        let mut st = self.state.lock().unwrap();
        if let Some(mut pod) = st.pods.remove(&(namespace.to_owned(), name.to_owned())) {
            st.version += 1;
            pod.metadata.resource_version = Some(st.version.to_string());
            let version = st.version;
            st.events.push((version, "DELETED", pod));
        }
        drop(st);
        self.changed.notify_waiters();
    }

    /// Writes the mesh CA Secret as an operator's edit would.
    fn put_mesh_ca(&self, material: &shoal_injector::meshca::CaMaterial) {
        let mut secret = shoal_injector::meshca::to_secret("shoal-mesh-ca", SYSTEM_NS, material);
        let mut st = self.state.lock().unwrap();
        st.version += 1;
        secret.metadata.resource_version = Some(st.version.to_string());
        st.secrets
            .insert((SYSTEM_NS.to_owned(), "shoal-mesh-ca".to_owned()), secret);
    }

    fn secret(&self, namespace: &str, name: &str) -> Option<Secret> {
        self.state
            .lock()
            .unwrap()
            .secrets
            .get(&(namespace.to_owned(), name.to_owned()))
            .cloned()
    }
}

fn respond(status: u16, body: &Value) -> http::Response<Full<Bytes>> {
    http::Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

fn status(code: u16, reason: &str, message: &str) -> http::Response<Full<Bytes>> {
    respond(
        code,
        &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                "reason": reason, "code": code, "message": message}),
    )
}

/// Answers a TokenReview as an audience-aware API server does: the token's
/// signature, expiry and audience.
fn review(api: &ApiServer, mut r: TokenReview) -> TokenReview {
    api.state.lock().unwrap().reviews += 1;
    let wanted = r.spec.audiences.clone().unwrap_or_default();
    let refuse = |error: String| TokenReviewStatus {
        authenticated: Some(false),
        error: Some(error),
        ..TokenReviewStatus::default()
    };
    let token = r.spec.token.clone();
    r.status = Some(match api.verify_token(&token).as_ref() {
        None => refuse("[invalid bearer token, square/go-jose: error in cryptographic primitive]".to_owned()),
        Some(c) if c.expires <= unix_now() => {
            refuse("[invalid bearer token, Token has expired.]".to_owned())
        }
        Some(c) if !wanted.contains(&c.audience) => refuse(format!(
            "[invalid bearer token, token audiences [{:?}] is invalid for the target audiences {wanted:?}]",
            c.audience
        )),
        Some(c) => TokenReviewStatus {
            authenticated: Some(true),
            audiences: Some(vec![c.audience.clone()]),
            user: Some(UserInfo {
                username: Some(format!(
                    "system:serviceaccount:{}:{}",
                    c.namespace, c.service_account
                )),
                groups: Some(vec!["system:serviceaccounts".to_owned()]),
                extra: Some(BTreeMap::from([
                    (
                        "authentication.kubernetes.io/pod-name".to_owned(),
                        vec![c.pod.clone()],
                    ),
                    (
                        "authentication.kubernetes.io/pod-uid".to_owned(),
                        vec![c.pod_uid.clone()],
                    ),
                ])),
                ..UserInfo::default()
            }),
            ..TokenReviewStatus::default()
        },
    });
    r
}

fn query_param<'q>(query: &'q str, key: &str) -> Option<&'q str> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        match (bytes[i], bytes.get(i + 1..i + 3)) {
            (b'%', Some(hex)) => {
                let hex = std::str::from_utf8(hex).unwrap();
                out.push(u8::from_str_radix(hex, 16).unwrap());
                i += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                i += 1;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).unwrap()
}

/// Whether `pod` matches an equality label selector (`k=v,k2=v2`), as the
/// API server filters lists and watches; no selector selects every pod.
fn selects(selector: Option<&str>, pod: &Pod) -> bool {
    let labels = pod.metadata.labels.clone().unwrap_or_default();
    selector.into_iter().flat_map(|s| s.split(',')).all(|term| {
        let (k, v) = term
            .split_once('=')
            .unwrap_or_else(|| panic!("selector {term:?} is not played"));
        labels.get(k).map(String::as_str) == Some(v.trim_start_matches('='))
    })
}

fn list(kind: &str, version: u64, items: Vec<Value>) -> http::Response<Full<Bytes>> {
    respond(
        200,
        &json!({"apiVersion": "v1", "kind": kind,
                "metadata": {"resourceVersion": version.to_string()}, "items": items}),
    )
}

async fn handle(
    api: Arc<ApiServer>,
    req: http::Request<hyper::body::Incoming>,
) -> http::Response<Full<Bytes>> {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return status(400, "BadRequest", "body"),
    };
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let watch = matches!(query_param(&query, "watch"), Some("true" | "1"));
    match (method.as_str(), segments.as_slice()) {
        ("POST", ["apis", "authentication.k8s.io", "v1", "tokenreviews"]) => {
            let Ok(r) = serde_json::from_slice::<TokenReview>(&body) else {
                return status(400, "BadRequest", "not a TokenReview");
            };
            let answered = review(&api, r);
            respond(201, &serde_json::to_value(answered).unwrap())
        }
        ("POST", ["api", "v1", "namespaces", ns, "secrets"]) => {
            let Ok(mut s) = serde_json::from_slice::<Secret>(&body) else {
                return status(400, "BadRequest", "not a Secret");
            };
            let name = s.metadata.name.clone().unwrap_or_default();
            let mut st = api.state.lock().unwrap();
            let key = ((*ns).to_owned(), name);
            if st.secrets.contains_key(&key) {
                return status(409, "AlreadyExists", "secret exists");
            }
            st.version += 1;
            s.metadata.namespace = Some((*ns).to_owned());
            s.metadata.resource_version = Some(st.version.to_string());
            st.secrets.insert(key, s.clone());
            respond(201, &serde_json::to_value(s).unwrap())
        }
        ("GET" | "PUT", ["api", "v1", "namespaces", ns, "secrets", name]) => {
            let key = ((*ns).to_owned(), (*name).to_owned());
            let mut st = api.state.lock().unwrap();
            if method == "PUT" {
                let Ok(mut s) = serde_json::from_slice::<Secret>(&body) else {
                    return status(400, "BadRequest", "not a Secret");
                };
                let stored = st
                    .secrets
                    .get(&key)
                    .and_then(|s| s.metadata.resource_version.clone());
                if s.metadata.resource_version.is_some() && s.metadata.resource_version != stored {
                    return status(409, "Conflict", "the object has been modified");
                }
                st.version += 1;
                s.metadata.resource_version = Some(st.version.to_string());
                st.secrets.insert(key, s.clone());
                return respond(200, &serde_json::to_value(s).unwrap());
            }
            match st.secrets.get(&key) {
                Some(s) => respond(200, &serde_json::to_value(s).unwrap()),
                None => status(404, "NotFound", &format!("secrets \"{name}\" not found")),
            }
        }
        ("GET", ["api", "v1", "namespaces"]) if watch => {
            // Namespaces do not change in this test: the watch ends
            // empty after a while and is made again.
            tokio::time::sleep(Duration::from_secs(1)).await;
            respond(200, &Value::Null).map(|_| Full::new(Bytes::new()))
        }
        ("GET", ["api", "v1", "namespaces"]) => {
            let st = api.state.lock().unwrap();
            let items = st
                .namespaces
                .iter()
                .map(|n| serde_json::to_value(n).unwrap())
                .collect();
            list("NamespaceList", st.version, items)
        }
        ("GET", ["api", "v1", "pods"]) if watch => {
            let from: u64 = query_param(&query, "resourceVersion")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let selector = query_param(&query, "labelSelector").map(percent_decode);
            let pending = || {
                let st = api.state.lock().unwrap();
                st.events
                    .iter()
                    .filter(|(v, _, pod)| *v > from && selects(selector.as_deref(), pod))
                    .map(|(_, kind, pod)| {
                        json!({"type": kind, "object": serde_json::to_value(pod).unwrap()})
                            .to_string()
                    })
                    .collect::<Vec<String>>()
            };
            let mut lines = pending();
            if lines.is_empty() {
                let _ = tokio::time::timeout(Duration::from_secs(1), api.changed.notified()).await;
                lines = pending();
            }
            let mut text = lines.join("\n");
            text.push('\n');
            http::Response::builder()
                .status(200)
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(text)))
                .unwrap()
        }
        ("GET", ["api", "v1", "pods"]) => {
            let selector = query_param(&query, "labelSelector").map(percent_decode);
            let st = api.state.lock().unwrap();
            let items = st
                .pods
                .values()
                .filter(|p| selects(selector.as_deref(), p))
                .map(|p| serde_json::to_value(p).unwrap())
                .collect();
            list("PodList", st.version, items)
        }
        ("GET", ["api", "v1", "namespaces", ns, "pods", name]) => {
            let st = api.state.lock().unwrap();
            match st.pods.get(&((*ns).to_owned(), (*name).to_owned())) {
                Some(p) => respond(200, &serde_json::to_value(p).unwrap()),
                None => status(404, "NotFound", &format!("pods \"{name}\" not found")),
            }
        }
        (
            "GET",
            ["apis", "certificates.k8s.io", "v1", "namespaces", ns, "podcertificaterequests", name],
        ) => {
            let st = api.state.lock().unwrap();
            match st
                .pod_certificate_requests
                .get(&((*ns).to_owned(), (*name).to_owned()))
            {
                Some(r) => respond(200, &serde_json::to_value(r).unwrap()),
                None => status(404, "NotFound", "no such request"),
            }
        }
        ("GET", ["apis", "certificates.k8s.io", "v1", "podcertificaterequests"]) => {
            let selector = query_param(&query, "fieldSelector").map(percent_decode);
            let wanted = |r: &PodCertificateRequest| {
                selector.as_deref().is_none_or(|s| {
                    s.strip_prefix("spec.signerName=") == Some(r.spec.signer_name.as_str())
                })
            };
            if watch {
                let from: u64 = query_param(&query, "resourceVersion")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                let pending = || {
                    let st = api.state.lock().unwrap();
                    st.pod_certificate_requests
                        .values()
                        .filter(|r| {
                            wanted(r)
                                && r.metadata
                                    .resource_version
                                    .as_deref()
                                    .and_then(|v| v.parse::<u64>().ok())
                                    .is_some_and(|v| v > from)
                        })
                        .map(|r| json!({"type": "MODIFIED", "object": r}).to_string())
                        .collect::<Vec<String>>()
                };
                let mut lines = pending();
                if lines.is_empty() {
                    let _ =
                        tokio::time::timeout(Duration::from_secs(1), api.changed.notified()).await;
                    lines = pending();
                }
                let mut text = lines.join("\n");
                text.push('\n');
                return http::Response::builder()
                    .status(200)
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from(text)))
                    .unwrap();
            }
            let st = api.state.lock().unwrap();
            let items = st
                .pod_certificate_requests
                .values()
                .filter(|r| wanted(r))
                .map(|r| serde_json::to_value(r).unwrap())
                .collect();
            list("PodCertificateRequestList", st.version, items)
        }
        (
            "PUT",
            ["apis", "certificates.k8s.io", "v1", "namespaces", ns, "podcertificaterequests", name, "status"],
        ) => {
            let Ok(r) = serde_json::from_slice::<PodCertificateRequest>(&body) else {
                return status(400, "BadRequest", "not a PodCertificateRequest");
            };
            let mut st = api.state.lock().unwrap();
            let key = ((*ns).to_owned(), (*name).to_owned());
            let Some(stored) = st.pod_certificate_requests.get(&key).cloned() else {
                return status(404, "NotFound", "no such request");
            };
            if r.metadata.resource_version != stored.metadata.resource_version {
                return status(409, "Conflict", "the object has been modified");
            }
            st.version += 1;
            let mut next = stored;
            next.status = r.status;
            next.metadata.resource_version = Some(st.version.to_string());
            st.pod_certificate_requests.insert(key, next.clone());
            drop(st);
            api.changed.notify_waiters();
            respond(200, &serde_json::to_value(next).unwrap())
        }
        ("GET" | "PUT", ["apis", "certificates.k8s.io", "v1", "clustertrustbundles", name]) => {
            let mut st = api.state.lock().unwrap();
            if method == "PUT" {
                let Ok(mut b) = serde_json::from_slice::<ClusterTrustBundle>(&body) else {
                    return status(400, "BadRequest", "not a ClusterTrustBundle");
                };
                st.version += 1;
                b.metadata.resource_version = Some(st.version.to_string());
                st.cluster_trust_bundles
                    .insert((*name).to_owned(), b.clone());
                return respond(200, &serde_json::to_value(b).unwrap());
            }
            match st.cluster_trust_bundles.get(*name) {
                Some(b) => respond(200, &serde_json::to_value(b).unwrap()),
                None => status(404, "NotFound", "no such bundle"),
            }
        }
        ("POST", ["apis", "certificates.k8s.io", "v1", "clustertrustbundles"]) => {
            let Ok(mut b) = serde_json::from_slice::<ClusterTrustBundle>(&body) else {
                return status(400, "BadRequest", "not a ClusterTrustBundle");
            };
            let mut st = api.state.lock().unwrap();
            let name = b.metadata.name.clone().unwrap_or_default();
            // A signer-linked bundle's name starts with its signer's.
            let signer = b.spec.signer_name.clone().unwrap_or_default();
            if !name.starts_with(&format!("{}:", signer.replace('/', ":"))) {
                return status(422, "Invalid", "name must start with the signer name");
            }
            if st.cluster_trust_bundles.contains_key(&name) {
                return status(409, "AlreadyExists", "bundle exists");
            }
            st.version += 1;
            b.metadata.resource_version = Some(st.version.to_string());
            st.cluster_trust_bundles.insert(name, b.clone());
            respond(201, &serde_json::to_value(b).unwrap())
        }
        _ => status(404, "NotFound", &format!("{method} {path}")),
    }
}

/// A CA and, signed by it, a serving certificate for `ip` and the names an
/// in-cluster client may use.
fn api_certificates(ip: IpAddr) -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, SanType};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["kubernetes.default.svc".to_owned()]).unwrap();
    params.subject_alt_names.push(SanType::IpAddress(ip));
    let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
    (ca.pem(), cert.pem(), key.serialize_pem())
}

/// Serves the stand-in over HTTPS on `ip`; its address and CA.
async fn start_api(api: Arc<ApiServer>, ip: IpAddr) -> (SocketAddr, String) {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let (ca, cert, key) = api_certificates(ip);
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()],
        PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
    )
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind(SocketAddr::new(ip, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let (acceptor, api) = (acceptor.clone(), api.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper::service::service_fn(move |req| {
                    let api = api.clone();
                    async move { Ok::<_, Infallible>(handle(api, req).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    (addr, ca)
}

// ---------------------------------------------------------------- pods

/// `value` of a Kubernetes quantity such as `256Mi`, in bytes.
fn bytes_of(quantity: &str) -> u64 {
    let (num, mult) = [("Ki", 1u64 << 10), ("Mi", 1 << 20), ("Gi", 1 << 30)]
        .into_iter()
        .find_map(|(suffix, m)| quantity.strip_suffix(suffix).map(|n| (n, m)))
        .unwrap_or((quantity, 1));
    num.parse::<u64>().unwrap() * mult
}

/// `value` with each `$(NAME)` of a variable defined before it replaced,
/// as the kubelet expands dependent environment variables (`$$` is `$`;
/// an unknown reference stays as it is).
fn expand(value: &str, defined: &[(String, String)]) -> String {
    let mut out = String::new();
    let mut rest = value;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        rest = &rest[i..];
        if let Some(after) = rest.strip_prefix("$$") {
            out.push('$');
            rest = after;
        } else if let Some((name, after)) = rest.strip_prefix("$(").and_then(|r| r.split_once(')'))
        {
            match defined.iter().rev().find(|(n, _)| n == name) {
                Some((_, v)) => out.push_str(v),
                None => out.push_str(&rest[..name.len() + 3]),
            }
            rest = after;
        } else {
            out.push('$');
            rest = &rest[1..];
        }
    }
    out.push_str(rest);
    out
}

/// A pod the test runs: its pause container (the network namespace) and IP.
struct RunningPod {
    pod: Pod,
    ip: IpAddr,
    /// Container name -> container id.
    containers: BTreeMap<String, String>,
}

impl RunningPod {
    fn name(&self) -> &str {
        self.pod.metadata.name.as_deref().unwrap()
    }

    fn namespace(&self) -> &str {
        self.pod.metadata.namespace.as_deref().unwrap()
    }

    fn app(&self) -> &str {
        let app = self
            .containers
            .keys()
            .find(|n| *n != "shoal-agent")
            .unwrap();
        &self.containers[app]
    }

    /// `curl` inside the pod's app container: (status, body).
    fn curl(&self, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
        app_curl(self.app(), method, path, &[], body)
    }

    /// The node names of the alive members its agent sees, itself included.
    fn alive_nodes(&self) -> Option<BTreeSet<String>> {
        alive_nodes(self.app())
    }

    fn admin(&self, path: &str) -> (u16, String) {
        host_curl(&format!("http://{}:4702{path}", self.ip))
    }
}

/// How a test pod gets its token.
enum TokenKind {
    Good,
    OtherAudience,
    Expired,
    OtherServiceAccount,
}

struct Cluster {
    lab: Lab,
    api: Arc<ApiServer>,
    injector_ip: IpAddr,
    created: std::sync::atomic::AtomicI64,
}

impl Cluster {
    /// The value of `env` as Kubernetes would resolve it for `pod`.
    fn env_value(
        pod: &Pod,
        ip: IpAddr,
        c: &Container,
        e: &k8s_openapi::api::core::v1::EnvVar,
    ) -> String {
        if let Some(v) = &e.value {
            return v.clone();
        }
        let from = e.value_from.as_ref().unwrap();
        if let Some(f) = &from.field_ref {
            return match f.field_path.as_str() {
                "metadata.name" => pod.metadata.name.clone().unwrap(),
                "metadata.namespace" => pod.metadata.namespace.clone().unwrap(),
                "metadata.uid" => pod.metadata.uid.clone().unwrap(),
                "status.podIP" => ip.to_string(),
                "spec.serviceAccountName" => pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.service_account_name.clone())
                    .unwrap(),
                "spec.nodeName" => "docker-node".to_owned(),
                other => panic!("fieldRef {other} is not played by this test"),
            };
        }
        if let Some(r) = &from.resource_field_ref {
            let resources = c.resources.as_ref().unwrap();
            let (kind, what) = r.resource.split_once('.').unwrap();
            let map = if kind == "limits" {
                resources.limits.as_ref()
            } else {
                resources.requests.as_ref()
            };
            let q = map.and_then(|m| m.get(what)).map(|q| q.0.clone());
            return q.map(|q| bytes_of(&q).to_string()).unwrap_or_default();
        }
        panic!("env {} comes from a source this test does not play", e.name)
    }

    /// `docker run` arguments for container `c` of `pod`.
    /// `pod_dir` holds the pod's volumes: `token/` (the projected token)
    /// and `volume-<name>/` for each emptyDir.
    fn container_args(
        &self,
        pod: &Pod,
        ip: IpAddr,
        pause: &str,
        c: &Container,
        pod_dir: &Path,
    ) -> Vec<String> {
        let spec = pod.spec.as_ref().unwrap();
        let mut args = vec![
            "--network".to_owned(),
            format!("container:{pause}"),
            "-e".to_owned(),
            format!("HOSTNAME={}", pod.metadata.name.as_deref().unwrap()),
        ];
        let mut env: Vec<(String, String)> = Vec::new();
        for e in c.env.iter().flatten() {
            let value = expand(&Self::env_value(pod, ip, c, e), &env);
            env.push((e.name.clone(), value));
        }
        for (name, value) in env {
            args.push("-e".to_owned());
            args.push(format!("{name}={value}"));
        }
        let pod_sc = spec.security_context.clone().unwrap_or_default();
        let sc = c.security_context.clone().unwrap_or_default();
        if let Some(uid) = sc.run_as_user.or(pod_sc.run_as_user) {
            let gid = sc.run_as_group.or(pod_sc.run_as_group).unwrap_or(uid);
            args.push(format!("--user={uid}:{gid}"));
        }
        if sc.read_only_root_filesystem == Some(true) {
            args.push("--read-only".to_owned());
        }
        if sc.allow_privilege_escalation == Some(false) {
            args.push("--security-opt=no-new-privileges".to_owned());
        }
        for cap in sc.capabilities.iter().flat_map(|c| c.drop.iter().flatten()) {
            args.push(format!("--cap-drop={cap}"));
        }
        let limits = c.resources.as_ref().and_then(|r| r.limits.clone());
        if let Some(m) = limits.as_ref().and_then(|l| l.get("memory")) {
            args.push(format!("--memory={}", bytes_of(&m.0)));
        }
        for m in c.volume_mounts.iter().flatten() {
            let v = spec
                .volumes
                .iter()
                .flatten()
                .find(|v| v.name == m.name)
                .unwrap();
            if v.empty_dir.is_some() {
                // A directory on the node, world-writable, as the kubelet
                // makes an emptyDir (a tmpfs would take the image
                // directory's owner and mode).
                let dir = pod_dir.join(format!("volume-{}", v.name));
                std::fs::create_dir_all(&dir).unwrap();
                use std::os::unix::fs::PermissionsExt as _;
                std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
                args.push(format!("--volume={}:{}", dir.display(), m.mount_path));
            } else if v.projected.is_some() {
                // Written by the test as the kubelet would (the token, the
                // pod certificate).
                args.push(format!(
                    "--volume={}:{}:ro",
                    pod_dir.join(format!("projected-{}", v.name)).display(),
                    m.mount_path
                ));
            } else {
                panic!("volume {} is of a kind this test does not play", v.name);
            }
        }
        let image = c.image.clone().unwrap();
        let image = if image == HELLO_APP_IMAGE {
            APP_IMAGE.to_owned()
        } else {
            image
        };
        let mut command = c.command.clone().unwrap_or_default().into_iter();
        if let Some(entry) = command.next() {
            args.push(format!("--entrypoint={entry}"));
        }
        args.push(image);
        args.extend(command);
        args.extend(c.args.clone().unwrap_or_default());
        args
    }

    /// Runs `pod` (a pod the API server just created from an injected
    /// template): a pause container, its registration (with IP) in the API
    /// server, its token and pod certificate, then its containers in
    /// Kubernetes' order. A pod whose certificate is denied does not start:
    /// the reason.
    fn start_pod(&self, mut pod: Pod, token: TokenKind) -> Result<RunningPod, String> {
        let name = pod.metadata.name.clone().unwrap();
        let namespace = pod.metadata.namespace.clone().unwrap();
        let label = format!("{namespace}/{name}");
        let pause = self.lab.run(
            &format!("{label} (pause)"),
            &[
                format!("--network={}", self.lab.network),
                format!("--hostname={name}"),
                format!("--add-host={IDENTITY_HOST}:{}", self.injector_ip),
                APP_IMAGE.to_owned(),
                "sleep".to_owned(),
                "infinity".to_owned(),
            ],
        );
        let ip = self.lab.ip_of(&pause);
        let created = self
            .created
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        pod.metadata.uid = Some(format!("uid-{namespace}-{name}"));
        pod.metadata.creation_timestamp = Some(Time(
            k8s_openapi::jiff::Timestamp::from_second(created).unwrap(),
        ));
        let spec = pod.spec.as_mut().unwrap();
        spec.service_account_name
            .get_or_insert_with(|| "default".to_owned());
        spec.node_name = Some("docker-node".to_owned());
        pod.status = Some(PodStatus {
            phase: Some("Running".to_owned()),
            pod_ip: Some(ip.to_string()),
            ..PodStatus::default()
        });
        self.api.put_pod(pod.clone());

        // The projected token, as the kubelet writes it.
        let spec = pod.spec.clone().unwrap();
        let (token_volume, projection) = spec
            .volumes
            .iter()
            .flatten()
            .find_map(|v| {
                let sources = v.projected.as_ref()?.sources.as_ref()?;
                let token = sources
                    .iter()
                    .find_map(|s| s.service_account_token.clone())?;
                Some((v.name.clone(), token))
            })
            .expect("the injected pod projects a token");
        assert_eq!(projection.audience.as_deref(), Some(AUDIENCE));
        let mut claims = Claims {
            namespace: namespace.clone(),
            service_account: spec.service_account_name.clone().unwrap(),
            pod: name.clone(),
            pod_uid: pod.metadata.uid.clone().unwrap(),
            audience: projection.audience.clone().unwrap(),
            expires: unix_now() + projection.expiration_seconds.unwrap_or(3600),
        };
        match token {
            TokenKind::Good => {}
            TokenKind::OtherAudience => {
                claims.audience = "https://kubernetes.default.svc".to_owned()
            }
            TokenKind::Expired => claims.expires = unix_now() - 10,
            TokenKind::OtherServiceAccount => claims.service_account = "intruder".to_owned(),
        }
        let token = self.api.issue_token(claims);
        let pod_dir = self.lab.dir.path().join(format!("{namespace}-{name}"));
        let token_dir = pod_dir.join(format!("projected-{token_volume}"));
        std::fs::create_dir_all(&token_dir).unwrap();
        let file = token_dir.join(&projection.path);
        std::fs::write(&file, token).unwrap();
        // As a kubelet writes a projected volume when the pod's containers
        // run as different users (hello's app runs as 100, the agent as
        // 65532) and it sets no fsGroup: root's, with the volume's mode.
        let mode = |volume: &str| {
            spec.volumes
                .iter()
                .flatten()
                .find(|v| v.name == volume)
                .and_then(|v| v.projected.as_ref()?.default_mode)
                .unwrap_or(0o644) as u32
        };
        std::os::unix::fs::chown(&file, Some(0), Some(0)).unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode(&token_volume)))
            .unwrap();
        std::fs::set_permissions(&token_dir, std::fs::Permissions::from_mode(0o755)).unwrap();

        // A pod certificate, as the kubelet gets it before it starts the
        // containers: a key it makes, a request it files, the signer's
        // answer; a denied request keeps the pod from starting.
        if let Some(volume) = spec.volumes.iter().flatten().find(|v| {
            v.projected
                .as_ref()
                .and_then(|p| p.sources.as_ref())
                .is_some_and(|s| s.iter().any(|s| s.pod_certificate.is_some()))
        }) {
            let dir = pod_dir.join(format!("projected-{}", volume.name));
            self.kubelet_pod_certificate(&pod, volume, &dir, mode(&volume.name))?;
        }

        // Native sidecars (init containers that always restart) first.
        let mut containers = BTreeMap::new();
        for c in spec
            .init_containers
            .iter()
            .flatten()
            .chain(spec.containers.iter())
        {
            let args = self.container_args(&pod, ip, &pause, c, &pod_dir);
            let id = self.lab.run(&format!("{label}/{}", c.name), &args);
            containers.insert(c.name.clone(), id);
        }
        Ok(RunningPod {
            pod,
            ip,
            containers,
        })
    }

    /// Plays the kubelet for `volume` (a projected volume with a
    /// `podCertificate` and a `clusterTrustBundle` source) of `pod`: files
    /// a PodCertificateRequest with a stub CSR of a new key, waits for the
    /// signer's answer, and writes the key, the chain and the signer's
    /// roots into `dir`, root's with `mode`. A refusal is returned as the
    /// Denied or Failed condition's reason.
    fn kubelet_pod_certificate(
        &self,
        pod: &Pod,
        volume: &k8s_openapi::api::core::v1::Volume,
        dir: &Path,
        mode: u32,
    ) -> Result<(), String> {
        let sources = volume.projected.clone().unwrap().sources.unwrap();
        let cert = sources
            .iter()
            .find_map(|s| s.pod_certificate.clone())
            .unwrap();
        let roots = sources
            .iter()
            .find_map(|s| s.cluster_trust_bundle.clone())
            .expect("the mesh roots are projected beside the certificate");
        assert_eq!(cert.key_type, "ECDSAP256");
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let stub = rcgen::CertificateParams::default()
            .serialize_request(&key)
            .unwrap();
        let namespace = pod.metadata.namespace.clone().unwrap();
        let name = format!("{}-{}", pod.metadata.name.as_deref().unwrap(), volume.name);
        let spec = pod.spec.clone().unwrap();
        {
            let mut st = self.api.state.lock().unwrap();
            st.version += 1;
            let request = PodCertificateRequest {
                metadata: ObjectMeta {
                    name: Some(name.clone()),
                    namespace: Some(namespace.clone()),
                    resource_version: Some(st.version.to_string()),
                    generation: Some(1),
                    ..ObjectMeta::default()
                },
                spec: PodCertificateRequestSpec {
                    signer_name: cert.signer_name.clone(),
                    pod_name: pod.metadata.name.clone().unwrap(),
                    pod_uid: pod.metadata.uid.clone().unwrap(),
                    service_account_name: spec.service_account_name.clone().unwrap(),
                    service_account_uid: "sa-uid".to_owned(),
                    node_name: spec.node_name.clone().unwrap(),
                    node_uid: "node-uid".to_owned(),
                    max_expiration_seconds: cert.max_expiration_seconds,
                    stub_pkc_s10_request: k8s_openapi::ByteString(stub.der().to_vec()),
                    unverified_user_annotations: cert.user_annotations.clone(),
                },
                status: None,
            };
            st.pod_certificate_requests
                .insert((namespace.clone(), name.clone()), request);
        }
        self.api.changed.notify_waiters();
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let status = loop {
            let st = self.api.state.lock().unwrap();
            let status = st.pod_certificate_requests[&(namespace.clone(), name.clone())]
                .status
                .clone();
            drop(st);
            if let Some(c) = status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .and_then(|c| c.first())
            {
                if c.type_ != "Issued" {
                    return Err(c.reason.clone());
                }
                break status.unwrap();
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{namespace}/{name}: no answer from signer {} in 60 s",
                cert.signer_name
            );
            std::thread::sleep(Duration::from_millis(200));
        };
        let bundle = {
            let st = self.api.state.lock().unwrap();
            let labels = roots
                .label_selector
                .as_ref()
                .and_then(|s| s.match_labels.clone())
                .unwrap_or_default();
            st.cluster_trust_bundles
                .values()
                .filter(|b| b.spec.signer_name == roots.signer_name)
                .filter(|b| {
                    let have = b.metadata.labels.clone().unwrap_or_default();
                    labels.iter().all(|(k, v)| have.get(k) == Some(v))
                })
                .map(|b| b.spec.trust_bundle.clone())
                .collect::<Vec<_>>()
                .join("")
        };
        assert!(!bundle.is_empty(), "the signer published its roots");
        std::fs::create_dir_all(dir).unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        for (file, text) in [
            (cert.key_path.clone().unwrap(), key.serialize_pem()),
            (
                cert.certificate_chain_path.clone().unwrap(),
                status.certificate_chain.clone().unwrap(),
            ),
            (roots.path.clone(), bundle),
        ] {
            let path = dir.join(file);
            std::fs::write(&path, text).unwrap();
            std::os::unix::fs::chown(&path, Some(0), Some(0)).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        }
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        Ok(())
    }
}

/// The injector's container, as `manifests/base/deployment.yaml` runs it,
/// with in-cluster credentials for the stand-in.
fn injector_args(lab: &Lab, api_addr: SocketAddr, api_ca: &str) -> Vec<String> {
    let text = std::fs::read_to_string(repo_dir().join("manifests/base/deployment.yaml")).unwrap();
    let deployment: Deployment = serde_norway::from_str(&text).unwrap();
    let spec = deployment.spec.template.spec.unwrap();
    let c = spec
        .containers
        .iter()
        .find(|c| c.name == "injector")
        .unwrap();

    let sa = lab.dir.path().join("injector-sa");
    std::fs::create_dir_all(&sa).unwrap();
    std::fs::write(sa.join("token"), INJECTOR_SA_TOKEN).unwrap();
    std::fs::write(sa.join("ca.crt"), api_ca).unwrap();
    std::fs::write(sa.join("namespace"), SYSTEM_NS).unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    for f in ["token", "ca.crt", "namespace"] {
        std::fs::set_permissions(sa.join(f), std::fs::Permissions::from_mode(0o444)).unwrap();
    }
    std::fs::set_permissions(&sa, std::fs::Permissions::from_mode(0o755)).unwrap();

    let mut args = vec![
        format!("--network={}", lab.network),
        format!("--add-host=kubernetes.default.svc:{}", api_addr.ip()),
        format!(
            "--volume={}:/var/run/secrets/kubernetes.io/serviceaccount:ro",
            sa.display()
        ),
        "-e".to_owned(),
        format!("KUBERNETES_SERVICE_HOST={}", api_addr.ip()),
        "-e".to_owned(),
        format!("KUBERNETES_SERVICE_PORT={}", api_addr.port()),
    ];
    for e in c.env.iter().flatten() {
        let value = match (
            &e.value,
            e.value_from.as_ref().and_then(|f| f.field_ref.as_ref()),
        ) {
            (Some(v), _) => v.clone(),
            (None, Some(f)) if f.field_path == "metadata.namespace" => SYSTEM_NS.to_owned(),
            _ => panic!("injector env {} is not played by this test", e.name),
        };
        let value = match e.name.as_str() {
            "SHOAL_AGENT_IMAGE" => AGENT_IMAGE.to_owned(),
            _ => value,
        };
        args.push("-e".to_owned());
        args.push(format!("{}={value}", e.name));
    }
    // And the environment the pod-certificates overlay adds: the injector
    // signs shoal.io/mesh pod certificates too.
    let text = std::fs::read_to_string(
        repo_dir().join("manifests/pod-certificates/deployment-patch.yaml"),
    )
    .unwrap();
    let patch: Value = serde_norway::from_str(&text).unwrap();
    for e in patch["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()
        .unwrap()
    {
        args.push("-e".to_owned());
        args.push(format!(
            "{}={}",
            e["name"].as_str().unwrap(),
            e["value"].as_str().unwrap()
        ));
    }
    args.push("-e".to_owned());
    args.push(format!(
        "SHOAL_INJECTOR_IDENTITY_CERT_LIFETIME={CERT_LIFETIME}"
    ));
    args.push("-e".to_owned());
    args.push(format!(
        "SHOAL_INJECTOR_MESH_CA_RELOAD_INTERVAL={}s",
        CA_RELOAD.as_secs()
    ));
    let sc = c.security_context.clone().unwrap_or_default();
    if sc.read_only_root_filesystem == Some(true) {
        args.push("--read-only".to_owned());
    }
    args.push("--cap-drop=ALL".to_owned());
    args.push("--security-opt=no-new-privileges".to_owned());
    args.push(INJECTOR_IMAGE.to_owned());
    args
}

/// `shoal inject` of the hello example, moved to `namespace`: its pods, one
/// per Deployment, named as a ReplicaSet would name them.
fn hello_pods(namespace: &str, anchors: &Path, dir: &Path, pod_certificates: bool) -> Vec<Pod> {
    let hello = repo_dir().join("manifests/examples/hello");
    let moved = dir.join(format!("hello-{namespace}"));
    std::fs::create_dir_all(&moved).unwrap();
    for f in ["publisher.yaml", "subscriber.yaml"] {
        let text = std::fs::read_to_string(hello.join(f)).unwrap();
        assert!(text.contains("namespace: shoal-demo"), "{f}");
        std::fs::write(
            moved.join(f),
            text.replace("namespace: shoal-demo", &format!("namespace: {namespace}")),
        )
        .unwrap();
    }
    let out = Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args(["inject", "-f"])
        .arg(&moved)
        .args(["--agent-image", AGENT_IMAGE, "--trust-anchors-file"])
        .arg(anchors)
        .args(pod_certificates.then_some("--pod-certificates"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "shoal inject: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    serde_norway::Deserializer::from_str(&text)
        .map(|doc| {
            let d: Deployment = serde::Deserialize::deserialize(doc).unwrap();
            let template = d.spec.template;
            let name = d.metadata.name.unwrap();
            let mut meta = template.metadata.unwrap_or_default();
            // The subscribers have the same pod name in both namespaces (as
            // two copies of one StatefulSet would): node names must still
            // differ. The publishers' differ, as their greetings name them.
            let suffix = if name == "subscriber" {
                "x2x4q".to_owned()
            } else {
                format!("{:05x}", fastrand::u32(..0xfffff))
            };
            meta.name = Some(format!("{name}-7d9c5-{suffix}"));
            meta.namespace = Some(namespace.to_owned());
            Pod {
                metadata: meta,
                spec: template.spec,
                status: None,
            }
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_across_pods_and_namespaces_in_a_docker_cluster() {
    if !docker_ready("docker_cluster", &[AGENT_IMAGE, INJECTOR_IMAGE]) {
        return;
    }
    let lab = Lab::new();
    let gateway = lab.gateway();
    let api = Arc::new(ApiServer::new());
    {
        let mut st = api.state.lock().unwrap();
        for ns in [SYSTEM_NS].into_iter().chain(NAMESPACES) {
            let annotations = (ns != SYSTEM_NS)
                .then(|| BTreeMap::from([("shoal.io/inject".to_owned(), "enabled".to_owned())]));
            st.namespaces.push(Namespace {
                metadata: ObjectMeta {
                    name: Some(ns.to_owned()),
                    annotations,
                    resource_version: Some("1".to_owned()),
                    ..ObjectMeta::default()
                },
                ..Namespace::default()
            });
        }
    }
    let (api_addr, api_ca) = start_api(api.clone(), gateway).await;

    // The injector, from its image, as the Deployment runs it.
    let injector = lab.run(
        "shoal-system/shoal-injector",
        &injector_args(&lab, api_addr, &api_ca),
    );
    let injector_ip = lab.ip_of(&injector);
    eventually("the injector is ready", Duration::from_secs(60), || {
        (host_curl(&format!("http://{injector_ip}:9090/readyz")).0 == 200).then_some(())
    })
    .await;
    let ca_secret = eventually(
        "the injector bootstraps the mesh CA",
        Duration::from_secs(30),
        || api.secret(SYSTEM_NS, "shoal-mesh-ca"),
    )
    .await;
    let bundle = &ca_secret.data.as_ref().unwrap()["ca.crt"].0;
    let anchors = lab.dir.path().join("mesh-ca.crt");
    std::fs::write(&anchors, bundle).unwrap();

    let cluster = Cluster {
        lab,
        api: api.clone(),
        injector_ip,
        created: std::sync::atomic::AtomicI64::new(1_800_000_000),
    };

    // hello in two namespaces: publisher and subscriber, each its own pod.
    let mut pods: BTreeMap<(String, String), RunningPod> = BTreeMap::new();
    for ns in NAMESPACES {
        for pod in hello_pods(ns, &anchors, cluster.lab.dir.path(), false) {
            let app = pod.metadata.labels.as_ref().unwrap()["app.kubernetes.io/name"].clone();
            assert_eq!(
                pod.metadata
                    .labels
                    .as_ref()
                    .unwrap()
                    .get("shoal.io/injected")
                    .map(String::as_str),
                Some("true")
            );
            let running = cluster.start_pod(pod, TokenKind::Good).unwrap();
            pods.insert((ns.to_owned(), app), running);
        }
    }
    let pod = |ns: &str, app: &str| &pods[&(ns.to_owned(), app.to_owned())];

    // The mesh forms with no seeds: every agent sees all four alive, each
    // under its `<pod>.<namespace>` node name (the two subscribers share a
    // pod name).
    let everyone: BTreeSet<String> = pods
        .values()
        .map(|p| format!("{}.{}", p.name(), p.namespace()))
        .collect();
    assert_eq!(everyone.len(), 4);
    let all_alive = |p: &RunningPod| p.alive_nodes().is_some_and(|n| n == everyone);
    for p in pods.values() {
        eventually(
            &format!("{}/{} sees all four agents alive", p.namespace(), p.name()),
            Duration::from_secs(90),
            || all_alive(p).then_some(()),
        )
        .await;
    }

    // hello: each subscriber prints its own namespace's greetings, from the
    // publisher's pod, and never the other namespace's.
    for ns in NAMESPACES {
        let publisher = pod(ns, "publisher").name().to_owned();
        let subscriber = pod(ns, "subscriber");
        eventually(
            &format!("{ns}'s subscriber prints two greetings from {publisher}"),
            Duration::from_secs(60),
            || {
                let logs = Lab::logs(subscriber.app());
                (logs.matches(&format!("from {publisher}")).count() >= 2).then_some(())
            },
        )
        .await;
    }
    for ns in NAMESPACES {
        let logs = Lab::logs(pod(ns, "subscriber").app());
        for other in NAMESPACES.iter().filter(|o| **o != ns) {
            let theirs = pod(other, "publisher").name();
            assert!(
                !logs.contains(theirs),
                "{ns} received {other}'s greetings: {logs}"
            );
        }
    }

    // Between namespaces: refused until granted, then delivered.
    let (a_pub, b_pub) = (pod("team-a", "publisher"), pod("team-b", "publisher"));
    let (code, body) = b_pub.curl(
        "POST",
        "/v1/topics/team-a:greetings/messages",
        Some("\"from team-b\""),
    );
    assert_eq!(code, 403, "{body}");
    assert!(
        body.contains("forbidden") && body.contains("grant"),
        "{body}"
    );
    let denials = metric(
        &b_pub.admin("/metrics").1,
        "shoal_authorization_denials_total",
        "side=\"app\"",
    );
    assert!(denials >= 1.0, "the refusal is counted");
    let (code, body) = a_pub.curl(
        "PUT",
        "/v1/topics/greetings",
        Some(r#"{"grants": {"publish": ["team-b"]}}"#),
    );
    assert!(code == 200 || code == 201, "{code} {body}");
    eventually(
        "team-b may publish to team-a:greetings once granted",
        Duration::from_secs(30),
        || {
            let (code, _) = b_pub.curl(
                "POST",
                "/v1/topics/team-a:greetings/messages",
                Some("\"granted greeting from team-b\""),
            );
            (code == 201).then_some(())
        },
    )
    .await;
    eventually(
        "team-a's subscriber receives team-b's greeting",
        Duration::from_secs(40),
        || {
            Lab::logs(pod("team-a", "subscriber").app())
                .contains("granted greeting from team-b")
                .then_some(())
        },
    )
    .await;

    // Refused identities: each pod's agent stays unready, says why, and the
    // injector counts the refusal by reason.
    let template = hello_pods("team-b", &anchors, cluster.lab.dir.path(), false)
        .into_iter()
        .next()
        .unwrap();
    let mut refused = Vec::new();
    for (kind, outcome) in [
        (TokenKind::OtherAudience, "token_audience"),
        (TokenKind::Expired, "token_expired"),
        (TokenKind::OtherServiceAccount, "identity_mismatch"),
    ] {
        let mut p = template.clone();
        p.metadata.name = Some(format!("refused-{}", outcome.replace('_', "-")));
        refused.push((cluster.start_pod(p, kind).unwrap(), outcome));
    }
    for (p, outcome) in &refused {
        eventually(
            &format!("{} is refused a certificate for {outcome}", p.name()),
            Duration::from_secs(30),
            || {
                let (code, body) = p.admin("/readyz");
                (code == 503 && body.contains(outcome)).then_some(())
            },
        )
        .await;
        let injector_metrics = host_curl(&format!("http://{injector_ip}:9090/metrics")).1;
        assert!(
            metric(
                &injector_metrics,
                "shoal_injector_identity_requests_total",
                &format!("outcome=\"{outcome}\"")
            ) >= 1.0,
            "{outcome} counted: {injector_metrics}"
        );
        let agent_metrics = p.admin("/metrics").1;
        assert!(metric(&agent_metrics, "shoal_mesh_certificate_failures_total", "") >= 1.0);
        for id in p.containers.values() {
            let _ = docker(&["rm", "-f", id]);
        }
        api.delete_pod(p.namespace(), p.name());
    }

    // Certificates rotate (one-minute lifetimes, renewed at two thirds)
    // while team-a publishes; no publish is refused and none is lost.
    let issued = || {
        metric(
            &host_curl(&format!("http://{injector_ip}:9090/metrics")).1,
            "shoal_injector_identity_certificates_issued_total",
            "",
        )
    };
    let issued_before = issued();
    let expiry = |p: &RunningPod| {
        metric(
            &p.admin("/metrics").1,
            "shoal_mesh_certificate_expiry_timestamp_seconds",
            "",
        )
    };
    let expiries_before: Vec<f64> = pods.values().map(expiry).collect();
    let a_sub = pod("team-a", "subscriber");
    let (code, body) = a_sub.curl(
        "PUT",
        "/v1/subscriptions/ledger-reader",
        Some(r#"{"topic": "ledger", "start": "earliest"}"#),
    );
    assert!(code == 200 || code == 201, "{code} {body}");
    let script = "i=0; while [ $i -lt 90 ]; do i=$((i+1)); \
        curl -sS -m 20 -o /dev/null -w '%{http_code}\\n' -X POST \
        -H 'content-type: text/plain' --data \"ledger-$i\" \
        http://127.0.0.1:4700/v1/topics/ledger/messages; sleep 0.6; done";
    let publisher_app = a_pub.app().to_owned();
    let codes =
        tokio::task::spawn_blocking(move || must(&["exec", &publisher_app, "sh", "-c", script]))
            .await
            .unwrap();
    let codes: Vec<&str> = codes.lines().collect();
    assert_eq!(codes.len(), 90, "{codes:?}");
    assert!(
        codes.iter().all(|c| *c == "201"),
        "every publish acknowledged: {codes:?}"
    );
    let renewed = issued() - issued_before;
    assert!(renewed >= 4.0, "{renewed} certificates issued");
    for (p, before) in pods.values().zip(expiries_before) {
        assert!(
            expiry(p) > before,
            "{}/{} renewed its certificate while publishes went on",
            p.namespace(),
            p.name()
        );
    }
    let mut received = BTreeSet::new();
    eventually(
        "team-a's subscriber reads all 90 ledger messages",
        Duration::from_secs(60),
        || {
            received.extend(pull_ack(a_sub.app(), "ledger-reader"));
            (received.len() == 90).then_some(())
        },
    )
    .await;
    let expected: BTreeSet<String> = (1..=90).map(|i| format!("ledger-{i}")).collect();
    assert_eq!(received, expected);
    // The mesh is still whole after the renewals.
    for p in pods.values() {
        eventually(
            &format!("{}/{} still sees all four alive", p.namespace(), p.name()),
            Duration::from_secs(30),
            || all_alive(p).then_some(()),
        )
        .await;
    }
    assert!(api.state.lock().unwrap().reviews >= 4);

    // A CA rotation, security.md's three steps, while team-a publishes
    // (each publish retried as an app would, up to 10 times): the mesh stays
    // connected, every publish is acknowledged, none is lost.
    const ROTATION_PUBLISHES: usize = 250;
    let publisher_app = a_pub.app().to_owned();
    let during_rotation = tokio::task::spawn_blocking(move || {
        let script = format!(
            "i=0; while [ $i -lt {ROTATION_PUBLISHES} ]; do i=$((i+1)); n=0; \
             until c=$(curl -sS -m 20 -o /dev/null -w '%{{http_code}}' -X POST \
               -H 'content-type: text/plain' -H \"Shoal-Id: rotation-$i\" --data \"rotation-$i\" \
               http://127.0.0.1:4700/v1/topics/ledger/messages); [ \"$c\" = 201 ] || [ $n -ge 10 ]; \
             do n=$((n+1)); sleep 0.5; done; echo \"$c $n\"; sleep 0.6; done"
        );
        must(&["exec", &publisher_app, "sh", "-c", &script])
    });
    let old_ca =
        shoal_injector::meshca::from_secret(&api.secret(SYSTEM_NS, "shoal-mesh-ca").unwrap())
            .unwrap()
            .unwrap();
    let new_ca = shoal_injector::meshca::generate(unix_now()).unwrap();
    // 1. Introduce the new root: every agent learns it with its next
    //    certificate and then trusts two.
    api.put_mesh_ca(&shoal_injector::meshca::CaMaterial {
        next: new_ca.cert.clone(),
        ..old_ca.clone()
    });
    let roots = |p: &RunningPod| metric(&p.admin("/metrics").1, "shoal_mesh_trust_roots", "");
    for p in pods.values() {
        eventually(
            &format!(
                "{}/{} trusts the old and the new root",
                p.namespace(),
                p.name()
            ),
            Duration::from_secs(120),
            || (roots(p) == 2.0).then_some(()),
        )
        .await;
    }
    // 2. Switch: the new CA signs, the old root stays trusted. Every agent
    //    renews with a certificate of the new CA (one issued after the
    //    injector read the switch lives past this bound).
    let switched = unix_now();
    api.put_mesh_ca(&shoal_injector::meshca::CaMaterial {
        cert: new_ca.cert.clone(),
        key: new_ca.key.clone(),
        next: String::new(),
        previous: old_ca.cert.clone(),
    });
    // A certificate issued once the injector read the switch (within two
    // reload intervals, the loop sleeping between reads) expires past this.
    let renewed_after = (switched + 2 * CA_RELOAD.as_secs() as i64 + 60) as f64;
    for p in pods.values() {
        eventually(
            &format!(
                "{}/{} holds a certificate of the new CA",
                p.namespace(),
                p.name()
            ),
            Duration::from_secs(150),
            || (expiry(p) >= renewed_after).then_some(()),
        )
        .await;
        assert_eq!(roots(p), 2.0, "the old root stays trusted until step 3");
        eventually(
            &format!("{}/{}: the mesh stays whole", p.namespace(), p.name()),
            Duration::from_secs(30),
            || all_alive(p).then_some(()),
        )
        .await;
    }
    // 3. Retire the old root: every agent, renewed, trusts the new one only.
    api.put_mesh_ca(&shoal_injector::meshca::CaMaterial {
        cert: new_ca.cert.clone(),
        key: new_ca.key.clone(),
        next: String::new(),
        previous: String::new(),
    });
    for p in pods.values() {
        eventually(
            &format!("{}/{} trusts the new root only", p.namespace(), p.name()),
            Duration::from_secs(120),
            || (roots(p) == 1.0).then_some(()),
        )
        .await;
        eventually(
            &format!("{}/{}: the mesh stays whole", p.namespace(), p.name()),
            Duration::from_secs(30),
            || all_alive(p).then_some(()),
        )
        .await;
    }
    let outcomes = during_rotation.await.unwrap();
    let outcomes: Vec<&str> = outcomes.lines().collect();
    assert_eq!(outcomes.len(), ROTATION_PUBLISHES, "{outcomes:?}");
    assert!(
        outcomes.iter().all(|o| o.starts_with("201 ")),
        "every publish acknowledged during the CA rotation: {outcomes:?}"
    );
    let retried = outcomes.iter().filter(|o| !o.ends_with(" 0")).count();
    eprintln!("CA rotation: {ROTATION_PUBLISHES} publishes acknowledged, {retried} after a retry");
    let expected: BTreeSet<String> = (1..=ROTATION_PUBLISHES)
        .map(|i| format!("rotation-{i}"))
        .collect();
    let mut received = BTreeSet::new();
    eventually(
        "team-a's subscriber reads every message published during the CA rotation",
        Duration::from_secs(60),
        || {
            received.extend(
                pull_ack(a_sub.app(), "ledger-reader")
                    .into_iter()
                    .filter(|m| m.starts_with("rotation-")),
            );
            (received == expected).then_some(())
        },
    )
    .await;

    // Pod certificates (the injector runs the pod-certificates overlay's
    // signer): hello in team-c, injected with --pod-certificates. The test
    // plays the kubelet: it files each pod's PodCertificateRequest, the
    // injector signs it, and the agents read their certificates from the
    // volume and ask the identity service only for peers. They join the
    // mesh of the CSR-path agents, and team-c's hello works.
    let injector_metric = |name: &str, label: &str| {
        metric(
            &host_curl(&format!("http://{injector_ip}:9090/metrics")).1,
            name,
            label,
        )
    };
    // Injected with the bundle as the Secret has it now (install.md §7),
    // the new root only.
    let now_ca =
        shoal_injector::meshca::from_secret(&api.secret(SYSTEM_NS, "shoal-mesh-ca").unwrap())
            .unwrap()
            .unwrap();
    let anchors = cluster.lab.dir.path().join("mesh-ca-now.crt");
    std::fs::write(&anchors, &now_ca.cert).unwrap();
    let team_c = hello_pods("team-c", &anchors, cluster.lab.dir.path(), true);
    // A pod the injector did not inject (its label taken away) is denied a
    // certificate, and so does not start.
    let mut uninjected = team_c[0].clone();
    uninjected.metadata.name = Some("uninjected-0".to_owned());
    uninjected
        .metadata
        .labels
        .as_mut()
        .unwrap()
        .remove("shoal.io/injected");
    // The kubelet's part waits for the signer: off the runtime's workers.
    let Err(reason) =
        tokio::task::block_in_place(|| cluster.start_pod(uninjected, TokenKind::Good))
    else {
        panic!("a pod the injector did not inject got a pod certificate");
    };
    assert_eq!(reason, "NotInjected");
    let mut everyone = everyone;
    for pod in team_c {
        let app = pod.metadata.labels.as_ref().unwrap()["app.kubernetes.io/name"].clone();
        let running =
            tokio::task::block_in_place(|| cluster.start_pod(pod, TokenKind::Good)).unwrap();
        everyone.insert(format!("{}.{}", running.name(), running.namespace()));
        pods.insert(("team-c".to_owned(), app), running);
    }
    assert_eq!(everyone.len(), 6);
    for p in pods.values() {
        eventually(
            &format!("{}/{} sees all six agents alive", p.namespace(), p.name()),
            Duration::from_secs(90),
            || p.alive_nodes().is_some_and(|n| n == everyone).then_some(()),
        )
        .await;
    }
    let publisher = pods[&("team-c".to_owned(), "publisher".to_owned())]
        .name()
        .to_owned();
    let subscriber = &pods[&("team-c".to_owned(), "subscriber".to_owned())];
    eventually(
        &format!("team-c's subscriber prints two greetings from {publisher}"),
        Duration::from_secs(60),
        || {
            let logs = Lab::logs(subscriber.app());
            (logs.matches(&format!("from {publisher}")).count() >= 2).then_some(())
        },
    )
    .await;
    let outcome = |o: &str| format!("outcome=\"{o}\"");
    assert_eq!(
        injector_metric("shoal_injector_pod_certificates_total", &outcome("issued")),
        2.0
    );
    assert_eq!(
        injector_metric(
            "shoal_injector_pod_certificates_total",
            &outcome("not_injected")
        ),
        1.0
    );
    assert!(
        injector_metric(
            "shoal_injector_identity_requests_total",
            &outcome("discovered")
        ) >= 2.0,
        "team-c's agents asked for peers"
    );
    // Their certificates came from the pod-certificate volume: an hour (the
    // API's shortest), where the CSR path gives one minute here.
    for app in ["publisher", "subscriber"] {
        let p = &pods[&("team-c".to_owned(), app.to_owned())];
        let expiry = metric(
            &p.admin("/metrics").1,
            "shoal_mesh_certificate_expiry_timestamp_seconds",
            "",
        );
        assert!(
            expiry > (unix_now() + 1800) as f64,
            "team-c/{app} holds the pod certificate (an hour or more), not a one-minute CSR one"
        );
    }
    drop(cluster);
}
