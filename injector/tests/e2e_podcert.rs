//! End to end: the pod-certificate signer (`shoal.io/mesh`, KEP-4317)
//! against an API-server stand-in (plain HTTP on loopback) speaking the
//! k8s-openapi `certificates.k8s.io/v1` PodCertificateRequest and
//! ClusterTrustBundle types and core Pods. The stand-in plays the kubelet's
//! part too: it files requests with stub CSRs made from real keys. The
//! signer lists and watches them through kube-rs, as in a cluster, and
//! writes its decisions through `/status`.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use k8s_openapi::api::certificates::v1::{
    ClusterTrustBundle, PodCertificateRequest, PodCertificateRequestSpec,
};
use k8s_openapi::api::core::v1::{Pod, PodSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, UnixTime};
use serde_json::{json, Value};
use shoal_injector::meshca::{self, CaStore, MeshCa};
use shoal_injector::metrics::Metrics;
use shoal_injector::podcert::{self, Signer, SIGNER_NAME};
use x509_parser::extensions::GeneralName;

const NS: &str = "shop";
const PCRS: &str = "/apis/certificates.k8s.io/v1/podcertificaterequests";
const BUNDLES: &str = "/apis/certificates.k8s.io/v1/clustertrustbundles";

#[derive(Default)]
struct ApiState {
    /// Requests by name (all in [`NS`]), and the resource version of each.
    requests: BTreeMap<String, PodCertificateRequest>,
    pods: BTreeMap<String, Pod>,
    bundles: BTreeMap<String, ClusterTrustBundle>,
    /// Status writes received, by request name.
    status_writes: BTreeMap<String, usize>,
    /// Whether the write for request `flaky` failed once already.
    failed_once: bool,
    version: u64,
}

type State = Arc<Mutex<ApiState>>;

fn respond(status: u16, body: Value) -> http::Response<Full<Bytes>> {
    http::Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

fn status(code: u16, reason: &str) -> http::Response<Full<Bytes>> {
    respond(
        code,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": reason, "reason": reason, "code": code}),
    )
}

fn query(uri: &http::Uri, key: &str) -> Option<String> {
    uri.query()?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then(|| v.replace("%3D", "=").replace("%2F", "/"))
    })
}

/// What the API server's validation says of an issued status, if wrong:
/// notAfter - notBefore within one hour and the request's
/// `maxExpirationSeconds`, the times those of the leaf, and
/// `beginRefreshAt` at least 10 minutes inside the validity.
fn invalid_issue(
    spec: &PodCertificateRequestSpec,
    status: Option<&k8s_openapi::api::certificates::v1::PodCertificateRequestStatus>,
) -> Option<String> {
    let status = status?;
    let chain = status.certificate_chain.as_ref()?;
    let leaf = CertificateDer::pem_slice_iter(chain.as_bytes())
        .next()?
        .ok()?;
    let (_, cert) = x509_parser::parse_x509_certificate(&leaf).ok()?;
    let (nb, na) = (
        cert.validity().not_before.timestamp(),
        cert.validity().not_after.timestamp(),
    );
    let max = i64::from(spec.max_expiration_seconds.unwrap_or(86_400));
    let second = |t: &Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>| {
        t.as_ref().map(|t| t.0.as_second())
    };
    if na - nb < 3600 || na - nb > max {
        return Some(format!("lifetime {} s outside [3600, {max}]", na - nb));
    }
    if second(&status.not_before) != Some(nb) || second(&status.not_after) != Some(na) {
        return Some("notBefore/notAfter differ from the leaf's".to_owned());
    }
    let refresh = second(&status.begin_refresh_at)?;
    if refresh < nb + 600 || refresh > na - 600 {
        return Some("beginRefreshAt not within the validity less 10 minutes".to_owned());
    }
    None
}

fn version_of(meta: &ObjectMeta) -> u64 {
    meta.resource_version
        .as_deref()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

async fn api(
    state: State,
    req: http::Request<hyper::body::Incoming>,
) -> http::Response<Full<Bytes>> {
    let method = req.method().clone();
    let uri = req.uri().clone();
    let path = uri.path().to_owned();
    let body = req.into_body().collect().await.unwrap().to_bytes();
    let status_path =
        format!("/apis/certificates.k8s.io/v1/namespaces/{NS}/podcertificaterequests/");
    match (method.as_str(), path.as_str()) {
        ("GET", PCRS) => {
            // The field selector the signer must use.
            assert_eq!(
                query(&uri, "fieldSelector").as_deref(),
                Some("spec.signerName=shoal.io/mesh")
            );
            if query(&uri, "watch").as_deref() == Some("true") {
                // A watch: the requests changed after the version asked
                // for, as ADDED or MODIFIED events, once there are some (or
                // after 2 s); the signer then watches again.
                let since: u64 = query(&uri, "resourceVersion")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                let deadline = Instant::now() + Duration::from_secs(2);
                loop {
                    let events: Vec<String> = state
                        .lock()
                        .unwrap()
                        .requests
                        .values()
                        .filter(|r| version_of(&r.metadata) > since)
                        .map(|r| json!({"type": "ADDED", "object": r}).to_string())
                        .collect();
                    if !events.is_empty() || Instant::now() > deadline {
                        let mut text = events.join("\n");
                        text.push('\n');
                        return http::Response::builder()
                            .status(200)
                            .header("content-type", "application/json")
                            .body(Full::new(Bytes::from(text)))
                            .unwrap();
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            let st = state.lock().unwrap();
            respond(
                200,
                json!({"kind": "PodCertificateRequestList", "apiVersion": "certificates.k8s.io/v1",
                       "metadata": {"resourceVersion": st.version.to_string()},
                       "items": st.requests.values().collect::<Vec<_>>()}),
            )
        }
        ("PUT", p) if p.starts_with(&status_path) && p.ends_with("/status") => {
            let name = p[status_path.len()..p.len() - "/status".len()].to_owned();
            let r: PodCertificateRequest = serde_json::from_slice(&body).unwrap();
            let mut st = state.lock().unwrap();
            let Some(have) = st.requests.get(&name).cloned() else {
                return status(404, "NotFound");
            };
            if r.metadata.resource_version != have.metadata.resource_version {
                return status(409, "Conflict");
            }
            // As the API server: only the status is taken, and it is
            // immutable once decided.
            if podcert::decided(have.status.as_ref()) {
                return status(422, "Invalid");
            }
            if let Some(problem) = invalid_issue(&have.spec, r.status.as_ref()) {
                return status(422, &problem);
            }
            // One write fails once, as an API server under load may: the
            // signer must try again.
            if name == "flaky" && !st.failed_once {
                st.failed_once = true;
                return status(500, "InternalError");
            }
            st.version += 1;
            let mut next = have;
            next.status = r.status;
            next.metadata.resource_version = Some(st.version.to_string());
            st.requests.insert(name.clone(), next.clone());
            *st.status_writes.entry(name).or_default() += 1;
            respond(200, serde_json::to_value(next).unwrap())
        }
        ("GET", p) if p.starts_with(&status_path) => {
            let name = &p[status_path.len()..];
            match state.lock().unwrap().requests.get(name) {
                Some(r) => respond(200, serde_json::to_value(r).unwrap()),
                None => status(404, "NotFound"),
            }
        }
        ("GET", p) if p.starts_with(&format!("/api/v1/namespaces/{NS}/pods/")) => {
            let name = p.rsplit('/').next().unwrap();
            match state.lock().unwrap().pods.get(name) {
                Some(pod) => respond(200, serde_json::to_value(pod).unwrap()),
                None => status(404, "NotFound"),
            }
        }
        ("GET", p) if p.starts_with(&format!("{BUNDLES}/")) => {
            let name = &p[BUNDLES.len() + 1..];
            match state.lock().unwrap().bundles.get(name) {
                Some(b) => respond(200, serde_json::to_value(b).unwrap()),
                None => status(404, "NotFound"),
            }
        }
        ("POST", BUNDLES) => {
            let mut b: ClusterTrustBundle = serde_json::from_slice(&body).unwrap();
            let mut st = state.lock().unwrap();
            let name = b.metadata.name.clone().unwrap();
            if st.bundles.contains_key(&name) {
                return status(409, "AlreadyExists");
            }
            st.version += 1;
            b.metadata.resource_version = Some(st.version.to_string());
            st.bundles.insert(name, b.clone());
            respond(201, serde_json::to_value(b).unwrap())
        }
        ("PUT", p) if p.starts_with(&format!("{BUNDLES}/")) => {
            let mut b: ClusterTrustBundle = serde_json::from_slice(&body).unwrap();
            let mut st = state.lock().unwrap();
            st.version += 1;
            b.metadata.resource_version = Some(st.version.to_string());
            st.bundles
                .insert(p[BUNDLES.len() + 1..].to_owned(), b.clone());
            respond(200, serde_json::to_value(b).unwrap())
        }
        _ => status(404, "NotFound"),
    }
}

async fn start_api(state: State) -> SocketAddr {
    common::serve_http(move |req| api(state.clone(), req)).await
}

fn client(addr: SocketAddr) -> kube::Client {
    let mut config = kube::Config::new(format!("http://{addr}").parse().unwrap());
    config.connect_timeout = Some(Duration::from_secs(2));
    kube::Client::try_from(config).unwrap()
}

fn pod(name: &str, uid: &str, account: &str, injected: bool) -> Pod {
    let mut labels = BTreeMap::new();
    if injected {
        labels.insert("shoal.io/injected".to_owned(), "true".to_owned());
    }
    Pod {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(NS.to_owned()),
            uid: Some(uid.to_owned()),
            labels: Some(labels),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            service_account_name: Some(account.to_owned()),
            node_name: Some("node-a".to_owned()),
            ..PodSpec::default()
        }),
        ..Pod::default()
    }
}

/// Files a request as the kubelet does for `pod` (a stub CSR from `key`).
fn file_request(state: &State, name: &str, pod: &str, uid: &str, key: &rcgen::KeyPair) {
    let stub = rcgen::CertificateParams::default()
        .serialize_request(key)
        .unwrap();
    let mut st = state.lock().unwrap();
    st.version += 1;
    let request = PodCertificateRequest {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(NS.to_owned()),
            resource_version: Some(st.version.to_string()),
            generation: Some(1),
            ..ObjectMeta::default()
        },
        spec: PodCertificateRequestSpec {
            signer_name: SIGNER_NAME.to_owned(),
            pod_name: pod.to_owned(),
            pod_uid: uid.to_owned(),
            service_account_name: "orders".to_owned(),
            service_account_uid: "sa-1".to_owned(),
            node_name: "node-a".to_owned(),
            node_uid: "node-uid".to_owned(),
            max_expiration_seconds: Some(7200),
            stub_pkc_s10_request: k8s_openapi::ByteString(stub.der().to_vec()),
            unverified_user_annotations: None,
        },
        status: None,
    };
    st.requests.insert(name.to_owned(), request);
}

/// The request's one condition, once decided (waits up to 20 s).
async fn decision(state: &State, name: &str) -> (String, String, PodCertificateRequest) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = state.lock().unwrap().requests[name].clone();
        if podcert::decided(r.status.as_ref()) {
            let c = r.status.as_ref().unwrap().conditions.as_ref().unwrap()[0].clone();
            return (c.type_, c.reason, r);
        }
        assert!(Instant::now() < deadline, "{name} not decided in 20 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn metric(text: &str, outcome: &str) -> f64 {
    let line = format!("shoal_injector_pod_certificates_total{{outcome=\"{outcome}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&line))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

#[tokio::test]
async fn the_signer_issues_pod_certificates_to_injected_pods_only_and_publishes_the_roots() {
    let state: State = Arc::default();
    {
        let mut st = state.lock().unwrap();
        st.pods
            .insert("orders-0".into(), pod("orders-0", "uid-1", "orders", true));
        st.pods
            .insert("plain-0".into(), pod("plain-0", "uid-2", "orders", false));
    }
    let addr = start_api(state.clone()).await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let ca = MeshCa::new(meshca::generate(now).unwrap()).unwrap();
    let bundle = ca.trust_bundle().to_owned();
    let metrics = Arc::new(Metrics::new());
    let signer = Signer::new(
        client(addr),
        CaStore::new(ca),
        "cluster.local".to_owned(),
        Duration::from_secs(24 * 3600),
        metrics.clone(),
    );
    let (stop, stopped) = tokio::sync::watch::channel(false);
    // One request before the signer starts (found by its first list), the
    // others while it watches.
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    file_request(&state, "orders-0-a", "orders-0", "uid-1", &key);
    let task = tokio::spawn(signer.run(stopped));
    let other = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    file_request(&state, "stale-uid", "orders-0", "uid-0", &other);
    file_request(&state, "not-injected", "plain-0", "uid-2", &other);
    file_request(&state, "gone", "orders-1", "uid-9", &other);
    file_request(&state, "flaky", "orders-0", "uid-1", &other);

    // The injected pod's request: issued, for its key, its workload
    // identity and its node name, chaining to the mesh CA, with the
    // validity the status names.
    let (kind, reason, issued) = decision(&state, "orders-0-a").await;
    assert_eq!((kind.as_str(), reason.as_str()), ("Issued", "Issued"));
    let status = issued.status.unwrap();
    let chain_pem = status.certificate_chain.unwrap();
    let leaf = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .next()
        .unwrap()
        .unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(&leaf).unwrap();
    assert_eq!(
        cert.public_key().subject_public_key.data.as_ref(),
        rcgen::PublicKeyData::der_bytes(&key)
    );
    let sans: Vec<String> = cert
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .iter()
        .map(|n| match n {
            GeneralName::URI(u) => u.to_string(),
            GeneralName::DNSName(d) => d.to_string(),
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(
        sans,
        [
            "spiffe://cluster.local/ns/shop/sa/orders",
            "orders-0.shop.node.shoal"
        ]
    );
    assert_eq!(
        status.not_after.unwrap().0.as_second(),
        cert.validity().not_after.timestamp()
    );
    assert_eq!(
        status.not_before.unwrap().0.as_second(),
        cert.validity().not_before.timestamp()
    );
    assert_eq!(
        cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp(),
        7200,
        "the request's maxExpirationSeconds (2 h) caps the signer's 24 h, back-dating included"
    );
    let refresh = status.begin_refresh_at.unwrap().0.as_second();
    assert!(refresh > now && refresh < cert.validity().not_after.timestamp());
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(bundle.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()
    .unwrap();
    verifier
        .verify_client_cert(&leaf, &[], UnixTime::now())
        .expect("the pod certificate chains to the mesh CA");

    // The others are denied, each with its reason.
    for (name, want) in [
        ("stale-uid", "PodMismatch"),
        ("not-injected", "NotInjected"),
        ("gone", "PodMismatch"),
    ] {
        let (kind, reason, r) = decision(&state, name).await;
        assert_eq!((kind.as_str(), reason.as_str()), ("Denied", want), "{name}");
        assert!(r.status.unwrap().certificate_chain.is_none(), "{name}");
    }

    // The roots are published for the kubelet to project.
    let deadline = Instant::now() + Duration::from_secs(20);
    let published = loop {
        if let Some(b) = state
            .lock()
            .unwrap()
            .bundles
            .get(podcert::TRUST_BUNDLE_NAME)
        {
            break b.clone();
        }
        assert!(Instant::now() < deadline, "no ClusterTrustBundle in 20 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(published.spec.trust_bundle, bundle);
    assert_eq!(published.spec.signer_name.as_deref(), Some(SIGNER_NAME));

    // Counted; and every request was answered once, though the watch
    // brings each decided request back.
    let (kind, _, _) = decision(&state, "flaky").await;
    assert_eq!(kind, "Issued", "answered again after a failed write");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let text = metrics.encode(shoal_exposition::Format::Text);
    assert_eq!(metric(&text, "issued"), 2.0, "{text}");
    assert_eq!(metric(&text, "api_error"), 1.0, "{text}");
    assert_eq!(metric(&text, "pod_mismatch"), 2.0, "{text}");
    assert_eq!(metric(&text, "not_injected"), 1.0, "{text}");
    assert_eq!(metric(&text, "unsupported_key_type"), 0.0, "{text}");
    let writes = state.lock().unwrap().status_writes.clone();
    assert!(writes.values().all(|n| *n == 1), "{writes:?}");
    assert_eq!(writes.len(), 5);
    let _ = stop.send(true);
    task.await.unwrap();
}
