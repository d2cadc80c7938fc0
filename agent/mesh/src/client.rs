//! The agent's side of the injector's identity service: a [`CertSource`]
//! that makes a key in memory, sends a CSR for its SPIFFE ID with the pod's
//! projected service-account token to the identity endpoint, and renews the
//! certificate at two thirds of its life, retrying failures with backoff.
//!
//! The key never leaves the process; only its CSR travels. The identity
//! endpoint is trusted through `anchors` (the mesh trust bundle handed to
//! the pod) and, once a certificate came back, through the trust bundle that
//! came with it, so a mesh CA rotation is followed.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use rcgen::{CertificateParams, KeyPair, SanType};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use serde::Deserialize;
use tokio::net::TcpStream;

use crate::certs::{spiffe_id_of, validity_of, CertSource, Identity};
use crate::identity::SpiffeId;
use crate::MeshError;

/// Path of the identity endpoint's certificate requests.
pub const CERTIFICATES_PATH: &str = "/v1/certificates";
/// Path of the identity service's discovery endpoint (for agents whose
/// certificate comes from files).
pub const PEERS_PATH: &str = "/v1/peers";
/// Default identity endpoint: the injector's Service, port `identity`.
pub const DEFAULT_ENDPOINT: &str = "shoal-injector.shoal-system.svc:4711";
/// Default limit on one request (connect, TLS, answer).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// First wait after a failed request; doubled after each further failure.
pub const BACKOFF_START: Duration = Duration::from_secs(1);
/// Longest wait between retries.
pub const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// Largest answer read.
const MAX_ANSWER_BYTES: usize = 256 * 1024;

/// Where and how to ask for certificates.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// `host:port` to connect to.
    pub endpoint: String,
    /// The name the endpoint's certificate must carry (the Service's DNS name).
    pub server_name: String,
    /// The projected service-account token file (re-read for each request:
    /// the kubelet rotates it).
    pub token_file: PathBuf,
    /// Roots the endpoint's certificate must chain to, PEM.
    pub anchors_pem: String,
    /// The identity to ask for.
    pub id: SpiffeId,
    /// Limit on one request.
    pub timeout: Duration,
}

#[derive(Deserialize)]
struct Answer {
    spiffe_id: String,
    certificate: String,
    trust_bundle: String,
    /// Other agents' mesh addresses (`ip:port`), for discovery.
    #[serde(default)]
    peers: Vec<String>,
    /// Whether this agent's pod is the oldest injected one (it founds the mesh).
    #[serde(default)]
    founder: Option<bool>,
}

/// The answer of the discovery endpoint.
#[derive(Deserialize)]
struct PeersAnswer {
    #[serde(default)]
    peers: Vec<String>,
    #[serde(default)]
    founder: Option<bool>,
}

/// Most peer addresses taken from one answer.
pub const MAX_PEERS: usize = 16;

#[derive(Deserialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Deserialize)]
struct ErrorDetail {
    code: String,
    message: String,
}

#[derive(Default)]
struct State {
    /// Consecutive failures.
    failures: u32,
    /// No request before this time (backoff).
    not_before: Option<SystemTime>,
    /// The trust bundle of the last answer, also trusted for the endpoint.
    learned_roots: Vec<CertificateDer<'static>>,
    /// Other agents named in the last answer.
    peers: Vec<SocketAddr>,
    /// Whether the last answer said this agent founds the mesh (None: it
    /// did not say, as an identity service without discovery).
    founder: Option<bool>,
}

/// A [`CertSource`] backed by the injector's identity service.
pub struct IdentityServiceSource {
    config: ClientConfig,
    anchors: Vec<CertificateDer<'static>>,
    state: Mutex<State>,
}

impl std::fmt::Debug for IdentityServiceSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityServiceSource")
            .field("endpoint", &self.config.endpoint)
            .field("id", &self.config.id.to_string())
            .finish_non_exhaustive()
    }
}

fn cert_err(e: impl std::fmt::Display) -> MeshError {
    MeshError::Certificate(e.to_string())
}

/// The wait before the next attempt after `failures` consecutive failures
/// (1 s, 2 s, 4 s, ... up to [`BACKOFF_MAX`]).
pub fn backoff(failures: u32) -> Duration {
    if failures == 0 {
        return Duration::ZERO;
    }
    let exp = failures.saturating_sub(1).min(16);
    BACKOFF_START.saturating_mul(1u32 << exp).min(BACKOFF_MAX)
}

fn parse_pem_certs(pem: &str, what: &str) -> Result<Vec<CertificateDer<'static>>, MeshError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| cert_err(format!("{what}: {e}")))?;
    if certs.is_empty() {
        return Err(cert_err(format!("{what}: no certificate")));
    }
    Ok(certs)
}

impl IdentityServiceSource {
    /// A source asking `config.endpoint` for `config.id`.
    pub fn new(config: ClientConfig) -> Result<Self, MeshError> {
        let anchors = parse_pem_certs(&config.anchors_pem, "identity service trust anchors")?;
        ServerName::try_from(config.server_name.clone())
            .map_err(|e| cert_err(format!("server name {:?}: {e}", config.server_name)))?;
        Ok(IdentityServiceSource {
            config,
            anchors,
            state: Mutex::new(State::default()),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn roots(&self) -> rustls::RootCertStore {
        let mut roots = rustls::RootCertStore::empty();
        let learned = self.state().learned_roots.clone();
        for c in self.anchors.iter().cloned().chain(learned) {
            // A root the store cannot use is skipped; the others still count.
            let _ = roots.add(c);
        }
        roots
    }

    /// One request, on a thread of its own with its own runtime, so it can
    /// be called from anywhere (the mesh calls `load` from a blocking task).
    fn request(&self, path: &'static str, body: String) -> Result<(u16, Vec<u8>), MeshError> {
        let roots = self.roots();
        let config = self.config.clone();
        std::thread::scope(|s| {
            s.spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| cert_err(format!("runtime: {e}")))?;
                rt.block_on(async {
                    tokio::time::timeout(config.timeout, post(&config, roots, path, body))
                        .await
                        .unwrap_or_else(|_| {
                            Err(cert_err(format!(
                                "identity service {} did not answer within {:?}",
                                config.endpoint, config.timeout
                            )))
                        })
                })
            })
            .join()
            .unwrap_or_else(|_| Err(cert_err("identity request thread panicked")))
        })
    }

    fn fetch(&self) -> Result<Identity, MeshError> {
        let token =
            std::fs::read_to_string(&self.config.token_file).map_err(|source| MeshError::Io {
                path: self.config.token_file.clone(),
                source,
            })?;
        let key = KeyPair::generate().map_err(cert_err)?;
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(
            rcgen::Ia5String::try_from(self.config.id.to_string()).map_err(cert_err)?,
        )];
        let csr = params
            .serialize_request(&key)
            .and_then(|c| c.pem())
            .map_err(cert_err)?;
        let body = serde_json::json!({"csr": csr, "token": token.trim()}).to_string();
        let body = self.answered(CERTIFICATES_PATH, body)?;
        let answer: Answer = serde_json::from_slice(&body)
            .map_err(|e| cert_err(format!("identity service answer: {e}")))?;
        let chain = parse_pem_certs(&answer.certificate, "issued certificate")?;
        let roots = parse_pem_certs(&answer.trust_bundle, "trust bundle")?;
        let leaf = &chain[0];
        let id = spiffe_id_of(leaf).map_err(cert_err)?;
        if id != self.config.id || answer.spiffe_id != self.config.id.to_string() {
            return Err(cert_err(format!(
                "identity service certified {id}, not {}",
                self.config.id
            )));
        }
        let (_, parsed) = x509_parser::parse_x509_certificate(leaf)
            .map_err(|e| cert_err(format!("issued certificate: {e}")))?;
        if parsed.public_key().raw != key.public_key_der() {
            return Err(cert_err("issued certificate is not for our key"));
        }
        let (not_before, not_after) = validity_of(leaf)?;
        {
            let mut st = self.state();
            st.learned_roots = roots.clone();
            st.peers = parse_peers(&answer.peers);
            st.founder = answer.founder;
        }
        Ok(Identity {
            id,
            chain,
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            roots,
            not_after,
            not_before,
            loaded_at: std::time::SystemTime::now(),
        })
    }
}

/// Addresses that do not parse are skipped: discovery is a hint, and every
/// peer is still authenticated by mTLS.
fn parse_peers(peers: &[String]) -> Vec<SocketAddr> {
    peers
        .iter()
        .filter_map(|p| p.parse().ok())
        .take(MAX_PEERS)
        .collect()
}

impl IdentityServiceSource {
    /// POSTs `body` to `path`; the body of a 200 answer, else the refusal
    /// as an error.
    fn answered(&self, path: &'static str, body: String) -> Result<Vec<u8>, MeshError> {
        let (status, body) = self.request(path, body)?;
        if status != 200 {
            let why = serde_json::from_slice::<ErrorBody>(&body).map_or_else(
                |_| String::from_utf8_lossy(&body).chars().take(200).collect(),
                |e| format!("{}: {}", e.error.code, e.error.message),
            );
            return Err(cert_err(format!(
                "identity service refused ({status}): {why}"
            )));
        }
        Ok(body)
    }

    /// Trusts `roots` too for the endpoint, from now on, if they share a
    /// root with those it trusts already: the mesh roots this agent holds
    /// (a pod certificate volume's `ca.pem`, which the kubelet keeps current
    /// through a CA rotation, each step keeping a root of the one before).
    /// Unrelated roots (a `--cert-dir` of another CA) are not trusted to
    /// vouch for the service the token is sent to. Whether they were taken.
    pub fn learn_roots(&self, roots: Vec<CertificateDer<'static>>) -> bool {
        let mut st = self.state();
        let known = self.anchors.iter().chain(st.learned_roots.iter());
        let overlaps = known
            .into_iter()
            .any(|k| roots.iter().any(|r| r.as_ref() == k.as_ref()));
        if overlaps {
            st.learned_roots = roots;
        }
        overlaps
    }

    /// Asks the discovery endpoint for peers (with the token, no CSR), and
    /// keeps them for [`CertSource::peers`].
    pub fn discover(&self) -> Result<(), MeshError> {
        let token =
            std::fs::read_to_string(&self.config.token_file).map_err(|source| MeshError::Io {
                path: self.config.token_file.clone(),
                source,
            })?;
        let body = serde_json::json!({"token": token.trim()}).to_string();
        let body = self.answered(PEERS_PATH, body)?;
        let answer: PeersAnswer = serde_json::from_slice(&body)
            .map_err(|e| cert_err(format!("identity service discovery answer: {e}")))?;
        let mut st = self.state();
        st.peers = parse_peers(&answer.peers);
        st.founder = answer.founder;
        Ok(())
    }
}

/// A [`CertSource`] whose certificate comes from files (a Kubernetes pod
/// certificate volume) and whose peers come from the identity service's
/// discovery endpoint.
pub struct FilesWithDiscovery {
    files: crate::certs::FileCertSource,
    discovery: IdentityServiceSource,
    /// Whether discovery ever answered: until it has, a load fails (an
    /// agent that knew no one would found a mesh of its own); after, a
    /// failure keeps the peers last named.
    discovered: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for FilesWithDiscovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FilesWithDiscovery")
            .field("files", &self.files)
            .field("discovery", &self.discovery)
            .finish_non_exhaustive()
    }
}

impl FilesWithDiscovery {
    /// Certificates from `files`, peers from `discovery`.
    pub fn new(files: crate::certs::FileCertSource, discovery: IdentityServiceSource) -> Self {
        FilesWithDiscovery {
            files,
            discovery,
            discovered: std::sync::atomic::AtomicBool::new(false),
        }
    }
}

impl CertSource for FilesWithDiscovery {
    fn load(&self) -> Result<Identity, MeshError> {
        let identity = self.files.load()?;
        // After a CA switch the identity service serves a certificate of
        // the new CA, which the anchors in the pod spec may predate.
        if !self.discovery.learn_roots(identity.roots.clone()) {
            tracing::debug!("the certificate's roots share none with the identity service's anchors; not used for it");
        }
        match self.discovery.discover() {
            Ok(()) => {
                self.discovered
                    .store(true, std::sync::atomic::Ordering::Release);
            }
            Err(e) if self.discovered.load(std::sync::atomic::Ordering::Acquire) => {
                tracing::warn!(error = %e, "discovery failed; keeping the peers it named before");
            }
            Err(e) => return Err(e),
        }
        Ok(identity)
    }

    fn changed(&self, current: &Identity) -> bool {
        self.files.changed(current)
    }

    fn describe(&self) -> String {
        format!(
            "{}, peers from {}",
            self.files.describe(),
            self.discovery.describe()
        )
    }

    fn peers(&self) -> Vec<SocketAddr> {
        self.discovery.peers()
    }

    fn founds_mesh(&self) -> Option<bool> {
        self.discovery.founds_mesh()
    }
}

async fn post(
    config: &ClientConfig,
    roots: rustls::RootCertStore,
    path: &'static str,
    body: String,
) -> Result<(u16, Vec<u8>), MeshError> {
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| MeshError::Tls(e.to_string()))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name = ServerName::try_from(config.server_name.clone())
        .map_err(|e| cert_err(format!("server name: {e}")))?;
    let tcp = match config.endpoint.parse::<SocketAddr>() {
        Ok(addr) => TcpStream::connect(addr).await,
        Err(_) => TcpStream::connect(config.endpoint.as_str()).await,
    }
    .map_err(|e| cert_err(format!("cannot reach {}: {e}", config.endpoint)))?;
    let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect(name, tcp)
        .await
        .map_err(|e| cert_err(format!("TLS with {}: {e}", config.endpoint)))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| cert_err(format!("HTTP with {}: {e}", config.endpoint)))?;
    tokio::spawn(conn);
    let req = http::Request::builder()
        .method("POST")
        .uri(path)
        .header(http::header::HOST, config.server_name.as_str())
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .map_err(cert_err)?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| cert_err(format!("request to {}: {e}", config.endpoint)))?;
    let status = resp.status().as_u16();
    let bytes = http_body_util::Limited::new(resp.into_body(), MAX_ANSWER_BYTES)
        .collect()
        .await
        .map_err(|e| cert_err(format!("answer from {}: {e}", config.endpoint)))?
        .to_bytes();
    Ok((status, bytes.to_vec()))
}

impl CertSource for IdentityServiceSource {
    fn load(&self) -> Result<Identity, MeshError> {
        match self.fetch() {
            Ok(identity) => {
                let mut st = self.state();
                st.failures = 0;
                st.not_before = None;
                Ok(identity)
            }
            Err(e) => {
                let mut st = self.state();
                st.failures = st.failures.saturating_add(1);
                st.not_before = Some(SystemTime::now() + backoff(st.failures));
                Err(e)
            }
        }
    }

    fn changed(&self, current: &Identity) -> bool {
        let now = SystemTime::now();
        let backing_off = self.state().not_before.is_some_and(|t| now < t);
        !backing_off && now >= current.renew_at()
    }

    fn describe(&self) -> String {
        format!("identity service {}", self.config.endpoint)
    }

    fn peers(&self) -> Vec<SocketAddr> {
        self.state().peers.clone()
    }

    fn founds_mesh(&self) -> Option<bool> {
        self.state().founder
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_a_minute() {
        assert_eq!(backoff(0), Duration::ZERO);
        assert_eq!(backoff(1), Duration::from_secs(1));
        assert_eq!(backoff(2), Duration::from_secs(2));
        assert_eq!(backoff(5), Duration::from_secs(16));
        assert_eq!(backoff(7), BACKOFF_MAX);
        assert_eq!(backoff(u32::MAX), BACKOFF_MAX);
    }

    #[test]
    fn a_short_lived_back_dated_certificate_is_renewed_at_two_thirds_of_its_life_here() {
        // The identity service back-dates 5 minutes and may issue for 1
        // minute: counted from not_before, the certificate would be due on
        // arrival, and the agent would renew in a loop.
        let ca = crate::identity::Ca::generate(Duration::from_secs(3600)).unwrap();
        let id: SpiffeId = "spiffe://cluster.local/ns/a/sa/b".parse().unwrap();
        let issued = ca.issue(&id, "b-0", Duration::from_secs(60)).unwrap();
        let chain =
            crate::certs::parse_certs(std::path::Path::new("cert"), issued.chain_pem.as_bytes())
                .unwrap();
        let (not_before, not_after) = crate::certs::validity_of(&chain[0]).unwrap();
        let loaded_at = std::time::SystemTime::now();
        let identity = Identity {
            id,
            key: PrivateKeyDer::from_pem_slice(issued.key_pem.as_bytes()).unwrap(),
            roots: Vec::new(),
            chain,
            not_after,
            not_before,
            loaded_at,
        };
        assert!(not_before < loaded_at, "back-dated");
        let due = identity.renew_at().duration_since(loaded_at).unwrap();
        assert!(
            due > Duration::from_secs(35) && due <= Duration::from_secs(40),
            "due {due:?} after it arrived"
        );
    }

    #[test]
    fn roots_are_learned_for_the_endpoint_only_when_they_share_one_with_those_trusted() {
        let [a, b, c] =
            [(); 3].map(|_| crate::identity::Ca::generate(Duration::from_secs(3600)).unwrap());
        let der = |ca: &crate::identity::Ca| {
            CertificateDer::from_pem_slice(ca.cert_pem().as_bytes()).unwrap()
        };
        let source = IdentityServiceSource::new(ClientConfig {
            endpoint: DEFAULT_ENDPOINT.to_owned(),
            server_name: "shoal-injector.shoal-system.svc".to_owned(),
            token_file: PathBuf::from("/nonexistent"),
            anchors_pem: a.cert_pem().to_owned(),
            id: "spiffe://cluster.local/ns/a/sa/b".parse().unwrap(),
            timeout: DEFAULT_TIMEOUT,
        })
        .unwrap();
        assert!(!source.learn_roots(vec![der(&b)]), "an unrelated CA");
        // A rotation seen through ca.pem: old and new, then the new alone.
        assert!(source.learn_roots(vec![der(&a), der(&b)]));
        assert!(source.learn_roots(vec![der(&b)]));
        assert!(source.learn_roots(vec![der(&b), der(&c)]));
        assert!(
            source.learn_roots(vec![der(&a)]),
            "the anchors stay trusted"
        );
    }

    #[test]
    fn bad_anchors_or_names_are_refused_at_construction() {
        let id: SpiffeId = "spiffe://cluster.local/ns/a/sa/b".parse().unwrap();
        let config = ClientConfig {
            endpoint: DEFAULT_ENDPOINT.to_owned(),
            server_name: "shoal-injector.shoal-system.svc".to_owned(),
            token_file: PathBuf::from("/nonexistent"),
            anchors_pem: "not a certificate".to_owned(),
            id,
            timeout: DEFAULT_TIMEOUT,
        };
        assert!(IdentityServiceSource::new(config).is_err());
    }
}
