//! The mesh CA: the root that signs every agent's certificate, kept in a
//! Secret of the injector's namespace (`shoal-mesh-ca` by default) and
//! separate from the webhook-serving CA of [`crate::bootstrap`].
//!
//! The Secret holds `ca.crt` and `ca.key` (the signing CA) and, optionally,
//! `next-ca.crt` and `previous-ca.crt`: more roots that go into the trust
//! bundle handed out with every certificate, so a CA rotation can keep the
//! old and the new root trusted at once for an overlap window (see
//! docs/security.md). When the Secret is absent the injector creates it with
//! a fresh CA; a Secret that is present but unusable is never overwritten
//! (it may be an operator's CA): the injector reports it and refuses to sign.
//!
//! Parsing, checking and signing are plain functions; [`reconcile`] and
//! [`load`] are the thin I/O around them.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::ByteString;
use kube::api::{Api, PostParams};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, PublicKeyData, SanType, SerialNumber,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use time::OffsetDateTime;

use crate::error::InjectorError;

/// Default name of the mesh CA Secret.
pub const DEFAULT_SECRET: &str = "shoal-mesh-ca";
/// Secret key: the signing CA's certificate.
pub const KEY_CA_CERT: &str = "ca.crt";
/// Secret key: the signing CA's private key.
pub const KEY_CA_KEY: &str = "ca.key";
/// Secret key (optional): a root being introduced, trusted before it signs.
pub const KEY_NEXT_CA_CERT: &str = "next-ca.crt";
/// Secret key (optional): a root being retired, trusted until its certificates expire.
pub const KEY_PREVIOUS_CA_CERT: &str = "previous-ca.crt";
/// Lifetime of a bootstrapped mesh CA.
pub const CA_VALIDITY_SECONDS: i64 = 5 * 365 * 24 * 3600;
/// Backdating of a bootstrapped CA's `notBefore`.
pub const CA_CLOCK_SKEW_SECONDS: i64 = 3600;
/// Backdating of an issued certificate's `notBefore`, for clocks a little behind.
pub const CLOCK_SKEW_SECONDS: i64 = 300;
/// Common name of a bootstrapped mesh CA.
pub const CA_COMMON_NAME: &str = "Shoal mesh CA";
/// Common name of agent certificates (peers check the SPIFFE ID, never this).
pub const AGENT_COMMON_NAME: &str = "shoal-agent";

fn time_at(unix: i64) -> Result<OffsetDateTime, InjectorError> {
    OffsetDateTime::from_unix_timestamp(unix)
        .map_err(|e| InjectorError::Config(format!("time out of range: {e}")))
}

fn ca_err(msg: impl std::fmt::Display) -> InjectorError {
    InjectorError::Tls(format!("mesh CA: {msg}"))
}

/// The PEM material of the mesh CA as the Secret holds it.
#[derive(Clone, PartialEq, Eq)]
pub struct CaMaterial {
    /// The signing CA's certificate.
    pub cert: String,
    /// The signing CA's private key.
    pub key: String,
    /// Roots being introduced (`next-ca.crt`), possibly empty.
    pub next: String,
    /// Roots being retired (`previous-ca.crt`), possibly empty.
    pub previous: String,
}

impl std::fmt::Debug for CaMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaMaterial")
            .field("key", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// Generates a fresh self-signed mesh CA valid from a little before `now`.
pub fn generate(now: i64) -> Result<CaMaterial, InjectorError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(DnType::CommonName, CA_COMMON_NAME);
    params
        .distinguished_name
        .push(DnType::OrganizationName, "Shoal");
    // Signs agent certificates only: no intermediate below it.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = time_at(now - CA_CLOCK_SKEW_SECONDS)?;
    params.not_after = time_at(now + CA_VALIDITY_SECONDS)?;
    params.serial_number = Some(random_serial()?);
    let cert = params.self_signed(&key)?;
    Ok(CaMaterial {
        cert: cert.pem(),
        key: key.serialize_pem(),
        next: String::new(),
        previous: String::new(),
    })
}

/// A random 128-bit positive serial number (RFC 5280 wants them unique per CA;
/// rcgen's default derives them from the public key, which renewals reuse).
fn random_serial() -> Result<SerialNumber, InjectorError> {
    let mut bytes = [0u8; 16];
    crate::tls::provider()
        .secure_random
        .fill(&mut bytes)
        .map_err(|_| ca_err("no random numbers for a serial"))?;
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    Ok(SerialNumber::from_slice(&bytes))
}

/// Parses every certificate of a PEM text, naming `what` in errors.
fn parse_pem_certs(pem: &str, what: &str) -> Result<Vec<CertificateDer<'static>>, InjectorError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| ca_err(format!("{what}: {e}")))?;
    for c in &certs {
        x509_parser::parse_x509_certificate(c)
            .map_err(|e| ca_err(format!("{what}: not an X.509 certificate: {e}")))?;
    }
    Ok(certs)
}

/// Checks a trust bundle handed to agents (`shoal inject
/// --trust-anchors-file`): PEM certificates, at least one, each a CA.
/// Returns how many roots it holds.
pub fn check_trust_bundle(pem: &str) -> Result<usize, InjectorError> {
    let certs = parse_pem_certs(pem, "trust bundle")?;
    if certs.is_empty() {
        return Err(ca_err("trust bundle: no PEM certificate in it"));
    }
    for c in &certs {
        let (_, parsed) = x509_parser::parse_x509_certificate(c)
            .map_err(|e| ca_err(format!("trust bundle: not an X.509 certificate: {e}")))?;
        if !parsed.is_ca() {
            return Err(ca_err(format!(
                "trust bundle: {} is not a CA certificate",
                parsed.subject()
            )));
        }
    }
    Ok(certs.len())
}

fn to_pem(der: &CertificateDer<'_>) -> String {
    let b64 = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, der.as_ref());
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

/// A certificate issued by the mesh CA.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Issued {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// Start of validity, unix seconds.
    pub not_before: i64,
    /// End of validity, unix seconds.
    pub not_after: i64,
}

/// The mesh CA ready to sign: its key, the issuer rebuilt from the stored
/// certificate, and the trust bundle.
pub struct MeshCa {
    issuer: rcgen::Certificate,
    key: KeyPair,
    material: CaMaterial,
    bundle: String,
    roots: usize,
    not_after: i64,
}

impl std::fmt::Debug for MeshCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshCa")
            .field("not_after", &self.not_after)
            .field("roots", &self.roots)
            .finish_non_exhaustive()
    }
}

/// The suffix of the DNS SAN binding an agent's certificate to its node
/// name; the agent reads it as `shoal_mesh::certs::NODE_SAN_SUFFIX` (the
/// identity end-to-end test checks they agree).
pub const NODE_SAN_SUFFIX: &str = ".node.shoal";

impl MeshCa {
    /// Checks `material` and makes it usable: the certificate parses and is a
    /// CA, the key matches it, the extra roots parse. The bundle is the
    /// signing CA, then `next-ca.crt`, then `previous-ca.crt`, each root once.
    pub fn new(material: CaMaterial) -> Result<MeshCa, InjectorError> {
        let key = KeyPair::from_pem(&material.key).map_err(|e| ca_err(format!("ca.key: {e}")))?;
        let certs = parse_pem_certs(&material.cert, KEY_CA_CERT)?;
        let [ca_der] = certs.as_slice() else {
            return Err(ca_err(format!(
                "{KEY_CA_CERT} must hold exactly one certificate, it holds {}",
                certs.len()
            )));
        };
        let (_, parsed) = x509_parser::parse_x509_certificate(ca_der)
            .map_err(|e| ca_err(format!("{KEY_CA_CERT}: {e}")))?;
        if parsed.public_key().raw != key.public_key_der() {
            return Err(ca_err("ca.key does not match ca.crt"));
        }
        if !parsed.is_ca() {
            return Err(ca_err("ca.crt is not a CA certificate"));
        }
        let not_after = parsed.validity().not_after.timestamp();
        let params = CertificateParams::from_ca_cert_der(ca_der)
            .map_err(|e| ca_err(format!("{KEY_CA_CERT}: {e}")))?;
        // Rebuilding the CA from its own name and key signs certificates that
        // chain to the stored certificate (the issuer is matched by name and
        // verified by key).
        let issuer = params.self_signed(&key)?;

        let mut seen: Vec<CertificateDer<'static>> = Vec::new();
        for (pem, what) in [
            (material.cert.as_str(), KEY_CA_CERT),
            (material.next.as_str(), KEY_NEXT_CA_CERT),
            (material.previous.as_str(), KEY_PREVIOUS_CA_CERT),
        ] {
            for c in parse_pem_certs(pem, what)? {
                if !seen.contains(&c) {
                    seen.push(c);
                }
            }
        }
        let bundle: String = seen.iter().map(to_pem).collect();
        Ok(MeshCa {
            issuer,
            key,
            bundle,
            roots: seen.len(),
            not_after,
            material,
        })
    }

    /// The material this CA was made from.
    pub fn material(&self) -> &CaMaterial {
        &self.material
    }

    /// Every root to trust, PEM, the signing CA first.
    pub fn trust_bundle(&self) -> &str {
        &self.bundle
    }

    /// How many roots the trust bundle holds.
    pub fn roots(&self) -> usize {
        self.roots
    }

    /// When the signing CA expires, unix seconds.
    pub fn not_after(&self) -> i64 {
        self.not_after
    }

    /// Signs `public_key` into an agent certificate for `spiffe_id` (its one
    /// URI SAN), valid from `CLOCK_SKEW_SECONDS` before `now` for
    /// `lifetime_seconds`, never past the CA's own expiry.
    pub fn sign_agent(
        &self,
        spiffe_id: &str,
        public_key: &impl PublicKeyData,
        now: i64,
        lifetime_seconds: i64,
    ) -> Result<Issued, InjectorError> {
        self.sign_agent_of_node(spiffe_id, None, public_key, now, lifetime_seconds)
    }

    /// [`MeshCa::sign_agent`], bound to a node: `node` (the pod's name,
    /// which is the agent's node name) goes into a DNS SAN
    /// `<node>`[`NODE_SAN_SUFFIX`], and peers then take messages about that
    /// node only from this certificate.
    pub fn sign_agent_of_node(
        &self,
        spiffe_id: &str,
        node: Option<&str>,
        public_key: &impl PublicKeyData,
        now: i64,
        lifetime_seconds: i64,
    ) -> Result<Issued, InjectorError> {
        let uri = rcgen::Ia5String::try_from(spiffe_id.to_owned())?;
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(uri)];
        if let Some(node) = node {
            params
                .subject_alt_names
                .push(SanType::DnsName(rcgen::Ia5String::try_from(format!(
                    "{node}{NODE_SAN_SUFFIX}"
                ))?));
        }
        params
            .distinguished_name
            .push(DnType::CommonName, AGENT_COMMON_NAME);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        self.sign(params, public_key, now, lifetime_seconds)
    }

    /// Issues a serving certificate for the identity endpoint itself, for
    /// `dns_names`, with a fresh key; returns the certificate and the key PEM.
    pub fn issue_serving(
        &self,
        dns_names: &[String],
        now: i64,
        lifetime_seconds: i64,
    ) -> Result<(Issued, String), InjectorError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(dns_names.to_vec())?;
        params.distinguished_name.push(
            DnType::CommonName,
            dns_names.first().map_or("shoal-injector", |s| s.as_str()),
        );
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let issued = self.sign(params, &key, now, lifetime_seconds)?;
        Ok((issued, key.serialize_pem()))
    }

    fn sign(
        &self,
        mut params: CertificateParams,
        public_key: &impl PublicKeyData,
        now: i64,
        lifetime_seconds: i64,
    ) -> Result<Issued, InjectorError> {
        let not_before = now - CLOCK_SKEW_SECONDS;
        let not_after = (now + lifetime_seconds).min(self.not_after);
        if not_after <= now {
            return Err(ca_err("the mesh CA has expired"));
        }
        params.not_before = time_at(not_before)?;
        params.not_after = time_at(not_after)?;
        params.serial_number = Some(random_serial()?);
        let cert = params.signed_by(public_key, &self.issuer, &self.key)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            not_before,
            not_after,
        })
    }
}

/// The mesh CA in use, replaceable while serving (the Secret is re-read).
#[derive(Debug)]
pub struct CaStore {
    current: RwLock<Arc<MeshCa>>,
}

impl CaStore {
    /// A store holding `ca`.
    pub fn new(ca: MeshCa) -> Arc<CaStore> {
        Arc::new(CaStore {
            current: RwLock::new(Arc::new(ca)),
        })
    }

    /// The CA to sign with now.
    pub fn get(&self) -> Arc<MeshCa> {
        match self.current.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Signs with `ca` from now on.
    pub fn set(&self, ca: MeshCa) {
        let ca = Arc::new(ca);
        match self.current.write() {
            Ok(mut g) => *g = ca,
            Err(poisoned) => *poisoned.into_inner() = ca,
        }
    }
}

/// Reads the material from a Secret. `Ok(None)` when it holds neither
/// `ca.crt` nor `ca.key` (nothing there yet), an error when it holds only
/// part of a CA or text that is not UTF-8.
pub fn from_secret(secret: &Secret) -> Result<Option<CaMaterial>, InjectorError> {
    let empty = BTreeMap::new();
    let data = secret.data.as_ref().unwrap_or(&empty);
    let text = |k: &str| -> Result<String, InjectorError> {
        match data.get(k) {
            None => Ok(String::new()),
            Some(b) => String::from_utf8(b.0.clone())
                .map_err(|_| ca_err(format!("Secret key {k} is not UTF-8 PEM"))),
        }
    };
    let cert = text(KEY_CA_CERT)?;
    let key = text(KEY_CA_KEY)?;
    if cert.trim().is_empty() && key.trim().is_empty() {
        return Ok(None);
    }
    if cert.trim().is_empty() || key.trim().is_empty() {
        return Err(ca_err(format!(
            "the Secret needs both {KEY_CA_CERT} and {KEY_CA_KEY}"
        )));
    }
    Ok(Some(CaMaterial {
        cert,
        key,
        next: text(KEY_NEXT_CA_CERT)?,
        previous: text(KEY_PREVIOUS_CA_CERT)?,
    }))
}

/// The Secret holding a freshly bootstrapped CA.
pub fn to_secret(name: &str, namespace: &str, m: &CaMaterial) -> Secret {
    let mut data = BTreeMap::new();
    for (k, v) in [
        (KEY_CA_CERT, &m.cert),
        (KEY_CA_KEY, &m.key),
        (KEY_NEXT_CA_CERT, &m.next),
        (KEY_PREVIOUS_CA_CERT, &m.previous),
    ] {
        if !v.is_empty() {
            data.insert(k.to_owned(), ByteString(v.as_bytes().to_vec()));
        }
    }
    Secret {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(namespace.to_owned()),
            labels: Some(BTreeMap::from([
                (
                    "app.kubernetes.io/name".to_owned(),
                    "shoal-injector".to_owned(),
                ),
                (
                    "app.kubernetes.io/component".to_owned(),
                    "mesh-ca".to_owned(),
                ),
            ])),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".to_owned()),
        data: Some(data),
        ..Secret::default()
    }
}

/// Reads the mesh CA from its Secret; `Ok(None)` when there is none yet.
pub async fn load(
    client: kube::Client,
    namespace: &str,
    name: &str,
) -> Result<Option<MeshCa>, InjectorError> {
    let secrets: Api<Secret> = Api::namespaced(client, namespace);
    match secrets.get_opt(name).await? {
        Some(s) => from_secret(&s)?.map(MeshCa::new).transpose(),
        None => Ok(None),
    }
}

/// Loads the mesh CA, creating the Secret with a fresh CA when it does not
/// exist (losing the creation race to another replica means using its CA).
/// A Secret that exists but is unusable is an error, never overwritten.
pub async fn reconcile(
    client: kube::Client,
    namespace: &str,
    name: &str,
    now: i64,
) -> Result<MeshCa, InjectorError> {
    if let Some(ca) = load(client.clone(), namespace, name).await? {
        return Ok(ca);
    }
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    if secrets.get_opt(name).await?.is_some() {
        // Present without ca.crt and ca.key: someone else's Secret.
        return Err(ca_err(format!(
            "Secret {namespace}/{name} exists without {KEY_CA_CERT} and {KEY_CA_KEY}; \
             fill it or delete it so the injector can create one"
        )));
    }
    let material = generate(now)?;
    match secrets
        .create(
            &PostParams::default(),
            &to_secret(name, namespace, &material),
        )
        .await
    {
        Ok(_) => {
            tracing::info!(secret = %name, "mesh CA created");
            MeshCa::new(material)
        }
        Err(kube::Error::Api(e)) if e.code == 409 => load(client, namespace, name)
            .await?
            .ok_or_else(|| ca_err(format!("Secret {namespace}/{name} vanished"))),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests;
