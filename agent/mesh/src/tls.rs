//! rustls for the mesh: TLS 1.3, mutual authentication, SPIFFE identities.
//!
//! Both sides present the agent's certificate and require the peer's to
//! chain to the mesh roots, be within its validity, and carry exactly one
//! SPIFFE ID. Host names are not checked: agents are named by SPIFFE ID, not
//! DNS. Certificates are swapped in place ([`CertStore::install`]): new
//! handshakes use the new ones, existing connections are untouched.

use crate::certs::{spiffe_id_of, Identity};
use crate::{MeshError, SpiffeId};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::ParsedCertificate;
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, Error, RootCertStore,
    SignatureScheme,
};
use std::sync::{Arc, RwLock};

/// ALPN protocol of the mesh.
pub const ALPN: &[u8] = b"shoal/1";

/// Why a peer was refused, as metrics label it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// The certificate does not chain to the mesh CA.
    UnknownCa,
    /// Outside its validity period.
    Expired,
    /// No (or more than one, or a malformed) SPIFFE ID.
    NoSpiffeId,
    /// Any other certificate problem.
    BadCertificate,
    /// The peer sent no certificate.
    NoCertificate,
}

impl Refusal {
    /// Every reason, for creating their metric series up front.
    pub const ALL: [Refusal; 5] = [
        Refusal::UnknownCa,
        Refusal::Expired,
        Refusal::NoSpiffeId,
        Refusal::BadCertificate,
        Refusal::NoCertificate,
    ];

    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::UnknownCa => "unknown_ca",
            Refusal::Expired => "expired",
            Refusal::NoSpiffeId => "no_spiffe_id",
            Refusal::BadCertificate => "bad_certificate",
            Refusal::NoCertificate => "no_certificate",
        }
    }

    fn of(e: &Error) -> Refusal {
        match e {
            Error::InvalidCertificate(CertificateError::UnknownIssuer) => Refusal::UnknownCa,
            Error::InvalidCertificate(CertificateError::BadSignature) => Refusal::UnknownCa,
            Error::InvalidCertificate(
                CertificateError::Expired
                | CertificateError::ExpiredContext { .. }
                | CertificateError::NotValidYet
                | CertificateError::NotValidYetContext { .. },
            ) => Refusal::Expired,
            Error::NoCertificatesPresented => Refusal::NoCertificate,
            _ => Refusal::BadCertificate,
        }
    }
}

/// Called with every refusal: the agent logs and counts it.
pub type RefusalHook = Arc<dyn Fn(Refusal, &str) + Send + Sync>;

struct Current {
    key: Arc<CertifiedKey>,
    roots: Arc<RootCertStore>,
    id: SpiffeId,
}

/// The agent's certificate and trust roots, swappable while serving.
pub struct CertStore {
    current: RwLock<Current>,
    provider: Arc<CryptoProvider>,
    on_refusal: RefusalHook,
}

impl std::fmt::Debug for CertStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertStore")
            .field("id", &self.id().to_string())
            .finish()
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn current_from(identity: &Identity, provider: &CryptoProvider) -> Result<Current, MeshError> {
    let key = provider
        .key_provider
        .load_private_key(identity.key.clone_key())
        .map_err(|e| MeshError::Tls(format!("private key: {e}")))?;
    let mut roots = RootCertStore::empty();
    for r in &identity.roots {
        roots
            .add(r.clone())
            .map_err(|e| MeshError::Tls(format!("trust root: {e}")))?;
    }
    Ok(Current {
        key: Arc::new(CertifiedKey::new(identity.chain.clone(), key)),
        roots: Arc::new(roots),
        id: identity.id.clone(),
    })
}

impl CertStore {
    /// A store holding `identity`; `on_refusal` hears about every refused peer.
    pub fn new(identity: &Identity, on_refusal: RefusalHook) -> Result<Arc<Self>, MeshError> {
        let provider = provider();
        let current = current_from(identity, &provider)?;
        Ok(Arc::new(CertStore {
            current: RwLock::new(current),
            provider,
            on_refusal,
        }))
    }

    /// Replaces the certificate and roots; new handshakes use them.
    pub fn install(&self, identity: &Identity) -> Result<(), MeshError> {
        let next = current_from(identity, &self.provider)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = next;
        Ok(())
    }

    /// This agent's SPIFFE ID.
    pub fn id(&self) -> SpiffeId {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .id
            .clone()
    }

    fn key(&self) -> Arc<CertifiedKey> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .key
            .clone()
    }

    fn roots(&self) -> Arc<RootCertStore> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .roots
            .clone()
    }

    fn algorithms(&self) -> WebPkiSupportedAlgorithms {
        self.provider.signature_verification_algorithms
    }

    /// Checks a peer's chain and SPIFFE ID; refusals are reported.
    fn check_peer(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<SpiffeId, Error> {
        let refuse = |r: Refusal, detail: String, e: Error| {
            (self.on_refusal)(r, &detail);
            e
        };
        let parsed = ParsedCertificate::try_from(end_entity)
            .map_err(|e| refuse(Refusal::BadCertificate, e.to_string(), e.clone()))?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots(),
            intermediates,
            now,
            self.algorithms().all,
        )
        .map_err(|e| refuse(Refusal::of(&e), e.to_string(), e.clone()))?;
        let id = spiffe_id_of(end_entity).map_err(|why| {
            refuse(
                Refusal::NoSpiffeId,
                why.clone(),
                Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(
                    SpiffeError(why),
                )))),
            )
        })?;
        let nodes = crate::certs::node_names_of(end_entity);
        if nodes.len() > 1 {
            let why = format!("the certificate binds several node names: {nodes:?}");
            return Err(refuse(
                Refusal::BadCertificate,
                why.clone(),
                Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(
                    SpiffeError(why),
                )))),
            ));
        }
        Ok(id)
    }
}

#[derive(Debug)]
struct SpiffeError(String);

impl std::fmt::Display for SpiffeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SpiffeError {}

#[derive(Debug)]
struct Resolver(Arc<CertStore>);

impl rustls::server::ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.key())
    }
}

impl rustls::client::ResolvesClientCert for Resolver {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.key())
    }
    fn has_certs(&self) -> bool {
        true
    }
}

#[derive(Debug)]
struct PeerVerifier(Arc<CertStore>);

impl ClientCertVerifier for PeerVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        self.0.check_peer(end_entity, intermediates, now)?;
        Ok(ClientCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.algorithms())
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.algorithms())
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.algorithms().supported_schemes()
    }
}

impl ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        self.0.check_peer(end_entity, intermediates, now)?;
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.algorithms())
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.algorithms())
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.algorithms().supported_schemes()
    }
}

/// rustls server configuration: TLS 1.3, client certificates required.
pub fn server_config(store: &Arc<CertStore>) -> Result<rustls::ServerConfig, MeshError> {
    let mut c = rustls::ServerConfig::builder_with_provider(store.provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| MeshError::Tls(e.to_string()))?
        .with_client_cert_verifier(Arc::new(PeerVerifier(store.clone())))
        .with_cert_resolver(Arc::new(Resolver(store.clone())));
    c.alpn_protocols = vec![ALPN.to_vec()];
    Ok(c)
}

/// rustls client configuration: TLS 1.3, presenting the agent's certificate.
pub fn client_config(store: &Arc<CertStore>) -> Result<rustls::ClientConfig, MeshError> {
    let mut c = rustls::ClientConfig::builder_with_provider(store.provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| MeshError::Tls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PeerVerifier(store.clone())))
        .with_client_cert_resolver(Arc::new(Resolver(store.clone())));
    c.alpn_protocols = vec![ALPN.to_vec()];
    Ok(c)
}
