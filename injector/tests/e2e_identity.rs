//! End to end: the identity endpoint over real TLS against an API-server
//! stand-in (plain HTTP on loopback, speaking the k8s-openapi TokenReview
//! and Secret types). The mesh CA is bootstrapped into the stand-in's
//! Secret; real CSRs made with rcgen get certificates, or clear refusals
//! that are counted.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewStatus, UserInfo};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::ByteString;
use rcgen::{CertificateParams, KeyPair, SanType};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use serde_json::{json, Value};
use shoal_injector::identity::{
    CertificateResponse, IdentityConfig, IdentityService, CERTIFICATES_PATH, PEERS_PATH,
};
use shoal_injector::meshca::{self, CaStore};
use shoal_injector::metrics::Metrics;
use shoal_injector::{bootstrap, server, tls};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsConnector;
use x509_parser::extensions::GeneralName;

const NAMESPACE: &str = "shoal-system";
const SECRET: &str = "shoal-mesh-ca";
const DNS: &str = "shoal-injector.shoal-system.svc";
const DAY: i64 = 24 * 3600;

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// What the stand-in knows about a token.
#[derive(Clone)]
struct Token {
    audiences: Vec<String>,
    namespace: String,
    service_account: String,
    pod: String,
    expired: bool,
}

fn token(aud: &str, ns: &str, sa: &str, expired: bool) -> Token {
    Token {
        audiences: vec![aud.to_owned()],
        namespace: ns.to_owned(),
        service_account: sa.to_owned(),
        pod: format!("{sa}-7d9f-x2x"),
        expired,
    }
}

#[derive(Default)]
struct ApiState {
    tokens: BTreeMap<String, Token>,
    secrets: BTreeMap<String, Secret>,
    /// Every TokenReview received: (token, spec audiences).
    reviews: Vec<(String, Vec<String>)>,
}

type State = Arc<Mutex<ApiState>>;

fn respond(status: u16, body: Value) -> http::Response<Full<Bytes>> {
    http::Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

fn not_found(what: &str) -> http::Response<Full<Bytes>> {
    respond(
        404,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": format!("{what} not found"), "reason": "NotFound", "code": 404}),
    )
}

/// Answers a TokenReview the way an audience-aware API server does.
fn review(state: &State, mut review: TokenReview) -> TokenReview {
    let mut st = state.lock().unwrap();
    let wanted = review.spec.audiences.clone().unwrap_or_default();
    let raw = review.spec.token.clone();
    st.reviews.push((raw.clone(), wanted.clone()));
    let refuse = |error: String| TokenReviewStatus {
        authenticated: Some(false),
        error: Some(error),
        ..TokenReviewStatus::default()
    };
    review.status = Some(match st.tokens.get(&raw) {
        None => refuse("[invalid bearer token, token lookup failed]".to_owned()),
        Some(t) if t.expired => refuse("[invalid bearer token, Token has expired.]".to_owned()),
        Some(t) => {
            let common: Vec<String> = t
                .audiences
                .iter()
                .filter(|a| wanted.contains(a))
                .cloned()
                .collect();
            if common.is_empty() {
                refuse(format!(
                    "[invalid bearer token, token audiences {:?} is invalid for the target audiences {wanted:?}]",
                    t.audiences
                ))
            } else {
                TokenReviewStatus {
                    authenticated: Some(true),
                    audiences: Some(common),
                    error: None,
                    user: Some(UserInfo {
                        username: Some(format!(
                            "system:serviceaccount:{}:{}",
                            t.namespace, t.service_account
                        )),
                        uid: Some("3c1a".to_owned()),
                        groups: Some(vec!["system:serviceaccounts".to_owned()]),
                        extra: Some(BTreeMap::from([
                            (
                                "authentication.kubernetes.io/pod-name".to_owned(),
                                vec![t.pod.clone()],
                            ),
                            (
                                "authentication.kubernetes.io/pod-uid".to_owned(),
                                vec!["9b2e".to_owned()],
                            ),
                        ])),
                    }),
                }
            }
        }
    });
    review
}

async fn api(
    state: State,
    req: http::Request<hyper::body::Incoming>,
) -> http::Response<Full<Bytes>> {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let body = req.into_body().collect().await.unwrap().to_bytes();
    let secrets = format!("/api/v1/namespaces/{NAMESPACE}/secrets");
    match (method.as_str(), path.as_str()) {
        ("POST", "/apis/authentication.k8s.io/v1/tokenreviews") => {
            let r: TokenReview = serde_json::from_slice(&body).unwrap();
            respond(201, serde_json::to_value(review(&state, r)).unwrap())
        }
        ("POST", p) if p == secrets => {
            let mut s: Secret = serde_json::from_slice(&body).unwrap();
            let name = s.metadata.name.clone().unwrap();
            let mut st = state.lock().unwrap();
            if st.secrets.contains_key(&name) {
                return respond(
                    409,
                    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                           "message": "already exists", "reason": "AlreadyExists", "code": 409}),
                );
            }
            s.metadata.resource_version = Some("1".to_owned());
            st.secrets.insert(name, s.clone());
            respond(201, serde_json::to_value(s).unwrap())
        }
        ("GET", p) if p.starts_with(&format!("{secrets}/")) => {
            let name = &p[secrets.len() + 1..];
            match state.lock().unwrap().secrets.get(name) {
                Some(s) => respond(200, serde_json::to_value(s).unwrap()),
                None => not_found(&format!("secrets {name:?}")),
            }
        }
        _ => not_found(&path),
    }
}

/// Starts the stand-in; returns its address.
async fn start_api(state: State) -> SocketAddr {
    common::serve_http(move |req| api(state.clone(), req)).await
}

fn client(addr: SocketAddr) -> kube::Client {
    let mut config = kube::Config::new(format!("http://{addr}").parse().unwrap());
    config.connect_timeout = Some(Duration::from_secs(2));
    kube::Client::try_from(config).unwrap()
}

fn csr_for(id: &str) -> (String, KeyPair) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::URI(
        rcgen::Ia5String::try_from(id.to_owned()).unwrap(),
    )];
    (params.serialize_request(&key).unwrap().pem().unwrap(), key)
}

fn connector(bundle: &str) -> TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(bundle.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    TlsConnector::from(Arc::new(config))
}

/// One HTTPS request to the identity endpoint; (status, JSON body).
async fn post(addr: SocketAddr, connector: &TlsConnector, path: &str, body: Value) -> (u16, Value) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let tls = connector
        .connect(ServerName::try_from(DNS).unwrap(), tcp)
        .await
        .unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = http::Request::builder()
        .method("POST")
        .uri(path)
        .header("host", DNS)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&bytes).unwrap())
}

fn error_code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or("<none>")
}

/// Whether a rustls client-certificate verifier trusting `bundle` (what the
/// mesh does) accepts `cert` now.
fn mesh_accepts(bundle: &str, cert: &str) -> Result<(), rustls::Error> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(bundle.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        tls::provider(),
    )
    .build()
    .unwrap();
    let leaf = CertificateDer::from_pem_slice(cert.as_bytes()).unwrap();
    verifier
        .verify_client_cert(&leaf, &[], UnixTime::now())
        .map(|_| ())
}

fn counter(text: &str, line_start: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(line_start))
        .unwrap_or_else(|| panic!("{line_start} not in the scrape:\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

fn outcome_count(metrics: &Metrics, outcome: &str) -> u64 {
    counter(
        &metrics.encode(shoal_exposition::Format::Text),
        &format!("shoal_injector_identity_requests_total{{outcome=\"{outcome}\"}} "),
    )
}

/// A running identity endpoint against a stand-in API server.
struct Started {
    state: State,
    kube: kube::Client,
    addr: SocketAddr,
    bundle: String,
    ca_store: Arc<CaStore>,
    metrics: Arc<Metrics>,
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Started {
    async fn stop(self) {
        let _ = self.shutdown.send(true);
        tokio::time::timeout(Duration::from_secs(5), self.task)
            .await
            .expect("shutdown")
            .unwrap();
    }
}

async fn start() -> Started {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let state: State = Arc::default();
    {
        let mut st = state.lock().unwrap();
        for (name, t) in [
            ("good", token("shoal", "orders", "api", false)),
            (
                "kube-api",
                token("https://kubernetes.default.svc", "orders", "api", false),
            ),
            ("expired", token("shoal", "orders", "api", true)),
            ("billing", token("shoal", "orders", "billing", false)),
        ] {
            st.tokens.insert(name.to_owned(), t);
        }
    }
    let api_addr = start_api(state.clone()).await;
    let kube = client(api_addr);

    // The mesh CA is bootstrapped into its Secret, then read back as it is.
    let ca = meshca::reconcile(kube.clone(), NAMESPACE, SECRET, now())
        .await
        .unwrap();
    assert!(state.lock().unwrap().secrets.contains_key(SECRET));
    let again = meshca::reconcile(kube.clone(), NAMESPACE, SECRET, now())
        .await
        .unwrap();
    assert_eq!(again.material(), ca.material());
    assert_eq!(ca.roots(), 1);
    let bundle = ca.trust_bundle().to_owned();

    let (serving, key) = ca
        .issue_serving(
            &bootstrap::service_dns_names("shoal-injector", NAMESPACE),
            now(),
            DAY,
        )
        .unwrap();
    let store = tls::CertStore::new(
        tls::certified_key(serving.cert_pem.as_bytes(), key.as_bytes()).unwrap(),
    );
    let ca_store = CaStore::new(ca);
    let metrics = Arc::new(Metrics::new());
    let service = IdentityService::new(
        kube.clone(),
        ca_store.clone(),
        IdentityConfig::default(),
        metrics.clone(),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = watch::channel(false);
    let task = tokio::spawn(server::serve_identity(
        listener,
        tls::server_config(store).unwrap(),
        service,
        rx,
    ));
    Started {
        state,
        kube,
        addr,
        bundle,
        ca_store,
        metrics,
        shutdown: tx,
        task,
    }
}

#[tokio::test]
async fn identity_end_to_end() {
    let started = start().await;
    let (state, kube, addr, bundle, ca_store, metrics) = (
        started.state.clone(),
        started.kube.clone(),
        started.addr,
        started.bundle.clone(),
        started.ca_store.clone(),
        started.metrics.clone(),
    );
    let conn = connector(&bundle);
    for o in [
        "issued",
        "token_audience",
        "token_expired",
        "identity_mismatch",
        "bad_csr",
    ] {
        assert_eq!(outcome_count(&metrics, o), 0, "{o}");
    }

    // A good request: a certificate for the SPIFFE ID, of the CSR's key,
    // signed by the mesh CA, valid 24 h (plus the back-dating).
    let id = "spiffe://cluster.local/ns/orders/sa/api";
    let (csr, agent_key) = csr_for(id);
    let (status, body) = post(
        addr,
        &conn,
        CERTIFICATES_PATH,
        json!({"csr": csr, "token": "good"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let answer: CertificateResponse = serde_json::from_value(body).unwrap();
    assert_eq!(answer.spiffe_id, id);
    assert_eq!(answer.trust_bundle, bundle);
    let der = CertificateDer::from_pem_slice(answer.certificate.as_bytes()).unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    let san = cert.subject_alternative_name().unwrap().unwrap();
    // The SPIFFE ID, and the node the token is bound to (its pod's name and
    // namespace, the agent's node name): peers take messages about that
    // node only from this certificate.
    assert_eq!(
        san.value.general_names,
        vec![
            GeneralName::URI(id),
            GeneralName::DNSName("api-7d9f-x2x.orders.node.shoal")
        ]
    );
    assert_eq!(meshca::NODE_SAN_SUFFIX, shoal_mesh::certs::NODE_SAN_SUFFIX);
    assert_eq!(
        shoal_mesh::certs::node_name_of(&der).as_deref(),
        Some("api-7d9f-x2x.orders"),
        "the agent reads the node its certificate is bound to"
    );
    assert_eq!(cert.public_key().raw, agent_key.public_key_der());
    assert!(!cert.is_ca());
    let (nb, na) = (
        cert.validity().not_before.timestamp(),
        cert.validity().not_after.timestamp(),
    );
    assert_eq!((nb, na), (answer.not_before, answer.not_after));
    assert_eq!(na - nb, DAY + meshca::CLOCK_SKEW_SECONDS);
    assert!(nb < now(), "back-dated");
    mesh_accepts(&answer.trust_bundle, &answer.certificate).unwrap();
    // The review asked for audience shoal.
    assert_eq!(
        state.lock().unwrap().reviews.last().unwrap(),
        &("good".to_owned(), vec!["shoal".to_owned()])
    );

    // Refusals: each with its code, a message, and counted.
    let refusals = [
        ("kube-api", id, 401, "token_audience", "audience"),
        ("expired", id, 401, "token_expired", "expired"),
        ("billing", id, 403, "identity_mismatch", "orders/billing"),
        ("nobody", id, 401, "token_invalid", "not authenticated"),
    ];
    for (tok, wanted, status_wanted, code, says) in refusals {
        let (csr, _) = csr_for(wanted);
        let (status, body) = post(
            addr,
            &conn,
            CERTIFICATES_PATH,
            json!({"csr": csr, "token": tok}),
        )
        .await;
        assert_eq!(status, status_wanted, "{tok}: {body}");
        assert_eq!(error_code(&body), code, "{tok}: {body}");
        let msg = body["error"]["message"].as_str().unwrap();
        assert!(msg.contains(says), "{tok}: {msg}");
        assert!(body.get("certificate").is_none());
        assert_eq!(outcome_count(&metrics, code), 1, "{code}");
    }

    // A bad CSR is refused before any TokenReview.
    let reviews = state.lock().unwrap().reviews.len();
    let (status, body) = post(
        addr,
        &conn,
        CERTIFICATES_PATH,
        json!({"csr": "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n", "token": "good"}),
    )
    .await;
    assert_eq!((status, error_code(&body)), (400, "bad_csr"), "{body}");
    assert_eq!(state.lock().unwrap().reviews.len(), reviews);
    let (status, body) = post(addr, &conn, CERTIFICATES_PATH, json!({"token": "good"})).await;
    assert_eq!((status, error_code(&body)), (400, "bad_request"), "{body}");
    let (status, _) = post(addr, &conn, "/elsewhere", json!({})).await;
    assert_eq!(status, 404);

    // Discovery alone (agents with pod certificates): the token, no CSR.
    // This service has no peer book, so it names no one and has no say
    // on who founds.
    let (status, body) = post(addr, &conn, PEERS_PATH, json!({"token": "good"})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, json!({"peers": []}));
    assert_eq!(outcome_count(&metrics, "discovered"), 1);
    let (status, body) = post(addr, &conn, PEERS_PATH, json!({"token": "expired"})).await;
    assert_eq!(
        (status, error_code(&body)),
        (401, "token_expired"),
        "{body}"
    );
    assert_eq!(outcome_count(&metrics, "token_expired"), 2);

    // A rotation in progress: previous-ca.crt in the Secret joins the bundle.
    let old = meshca::generate(now() - 30 * DAY).unwrap();
    state
        .lock()
        .unwrap()
        .secrets
        .get_mut(SECRET)
        .unwrap()
        .data
        .as_mut()
        .unwrap()
        .insert(
            meshca::KEY_PREVIOUS_CA_CERT.to_owned(),
            ByteString(old.cert.clone().into_bytes()),
        );
    let rotated = meshca::load(kube.clone(), NAMESPACE, SECRET)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(rotated.roots(), 2);
    ca_store.set(rotated);
    let (csr, _) = csr_for(id);
    let (status, body) = post(
        addr,
        &conn,
        CERTIFICATES_PATH,
        json!({"csr": csr, "token": "good"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let answer: CertificateResponse = serde_json::from_value(body).unwrap();
    assert_eq!(answer.trust_bundle, format!("{bundle}{}", old.cert));
    mesh_accepts(&answer.trust_bundle, &answer.certificate).unwrap();
    let old_ca = meshca::MeshCa::new(old).unwrap();
    let old_leaf = old_ca
        .sign_agent(id, &KeyPair::generate().unwrap(), now(), DAY)
        .unwrap();
    mesh_accepts(&answer.trust_bundle, &old_leaf.cert_pem).unwrap();

    // The API server unreachable: a distinct code, counted.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let down = IdentityService::new(
        client(closed),
        ca_store,
        IdentityConfig::default(),
        metrics.clone(),
    );
    let (csr, _) = csr_for(id);
    let d = down
        .handle(json!({"csr": csr, "token": "good"}).to_string().as_bytes())
        .await
        .unwrap_err();
    assert_eq!(d.outcome.as_str(), "api_unavailable", "{}", d.message);
    assert_eq!(d.outcome.status(), 503);
    assert_eq!(outcome_count(&metrics, "api_unavailable"), 1);

    let text = metrics.encode(shoal_exposition::Format::Text);
    assert_eq!(outcome_count(&metrics, "issued"), 2);
    assert_eq!(outcome_count(&metrics, "bad_csr"), 1);
    assert_eq!(outcome_count(&metrics, "bad_request"), 2);
    assert_eq!(
        counter(&text, "shoal_injector_identity_certificates_issued_total "),
        2
    );

    started.stop().await;
}

/// The agent's certificate source (shoal-mesh) against the real endpoint:
/// it gets a certificate the mesh's TLS accepts, learns the bundle, renews
/// with a fresh key, and reports refusals with the service's code.
#[tokio::test]
async fn the_agent_source_gets_its_certificate_from_the_endpoint() {
    use shoal_mesh::certs::CertSource as _;
    use shoal_mesh::client::{ClientConfig, IdentityServiceSource};

    let started = start().await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "good\n").unwrap();
    let id: shoal_mesh::SpiffeId = "spiffe://cluster.local/ns/orders/sa/api".parse().unwrap();
    let config = ClientConfig {
        endpoint: started.addr.to_string(),
        server_name: DNS.to_owned(),
        token_file: token_file.clone(),
        anchors_pem: started.bundle.clone(),
        id: id.clone(),
        timeout: Duration::from_secs(10),
    };
    let source = Arc::new(IdentityServiceSource::new(config.clone()).unwrap());

    let s = source.clone();
    let first = tokio::task::spawn_blocking(move || s.load())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.id, id);
    assert_eq!(first.roots.len(), 1);
    assert_eq!(
        first.roots[0],
        CertificateDer::from_pem_slice(started.bundle.as_bytes()).unwrap()
    );
    let life = first.not_after.duration_since(first.not_before).unwrap();
    assert_eq!(
        life,
        Duration::from_secs((DAY + meshca::CLOCK_SKEW_SECONDS) as u64)
    );
    // Fresh, so not due for renewal.
    assert!(!source.changed(&first));
    // A service without discovery names nobody and leaves founding to the
    // agent's own rule (it does not say "not the founder").
    assert!(source.peers().is_empty());
    assert_eq!(source.founds_mesh(), None);
    // The mesh's own TLS takes the certificate and key.
    let store = shoal_mesh::tls::CertStore::new(&first, Arc::new(|_, _| {})).unwrap();
    shoal_mesh::tls::server_config(&store).unwrap();

    // A renewal makes a new key.
    let s = source.clone();
    let second = tokio::task::spawn_blocking(move || s.load())
        .await
        .unwrap()
        .unwrap();
    assert_ne!(second.chain[0], first.chain[0]);
    assert_ne!(
        second.key.secret_der(),
        first.key.secret_der(),
        "every request has a key of its own"
    );
    assert_eq!(outcome_count(&started.metrics, "issued"), 2);

    // Another service account's token: refused, and the reason says so.
    std::fs::write(&token_file, "billing").unwrap();
    let refused = IdentityServiceSource::new(config.clone()).unwrap();
    let err = tokio::task::spawn_blocking(move || refused.load())
        .await
        .unwrap()
        .unwrap_err()
        .to_string();
    assert!(err.contains("identity_mismatch"), "{err}");
    assert_eq!(outcome_count(&started.metrics, "identity_mismatch"), 1);

    // An endpoint whose certificate does not chain to the anchors is not trusted.
    std::fs::write(&token_file, "good").unwrap();
    let stranger = meshca::generate(now()).unwrap();
    let untrusting = IdentityServiceSource::new(ClientConfig {
        anchors_pem: stranger.cert,
        ..config
    })
    .unwrap();
    let err = tokio::task::spawn_blocking(move || untrusting.load())
        .await
        .unwrap()
        .unwrap_err()
        .to_string();
    assert!(err.contains("TLS"), "{err}");
    assert_eq!(outcome_count(&started.metrics, "issued"), 2);

    started.stop().await;
}
