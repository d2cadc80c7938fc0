//! Agent identity: SPIFFE IDs and the development CA.
//!
//! An agent's identity is `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`
//! in a URI SAN of a short-lived certificate. In `--dev` mode every local agent
//! shares one CA kept in `--ca-dir`: the first agent creates it, the others
//! load it, and each issues its own certificate with it.

use crate::MeshError;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Lifetime of an agent certificate.
pub const DEFAULT_CERT_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// Lifetime of the development CA.
pub const DEV_CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Trust domain of development meshes.
pub const DEV_TRUST_DOMAIN: &str = "shoal.local";
/// The development CA's certificate file, in `--ca-dir`.
pub const CA_CERT_FILE: &str = "ca.pem";
/// The development CA's private key file, in `--ca-dir`.
pub const CA_KEY_FILE: &str = "ca.key.pem";
/// Common name of the development CA.
const DEV_CA_NAME: &str = "Shoal development CA";
/// Certificates start this long before now, for clocks a little apart.
const CLOCK_SKEW: Duration = Duration::from_secs(300);

/// A SPIFFE ID of the form `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SpiffeId {
    /// Trust domain (the mesh).
    pub trust_domain: String,
    /// Kubernetes namespace.
    pub namespace: String,
    /// Kubernetes service account.
    pub service_account: String,
}

impl SpiffeId {
    /// A SPIFFE ID from its parts.
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Result<Self, String> {
        let id = SpiffeId {
            trust_domain: trust_domain.to_string(),
            namespace: namespace.to_string(),
            service_account: service_account.to_string(),
        };
        id.to_string().parse()
    }
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
                    trust_domain: td.to_string(),
                    namespace: ns.to_string(),
                    service_account: sa.to_string(),
                })
            }
            _ => Err(format!(
                "{s:?} is not spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>"
            )),
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

/// A certificate chain and its private key, PEM-encoded.
#[derive(Clone)]
pub struct IssuedCert {
    /// The certificate, then its issuers up to (not including) the root.
    pub chain_pem: String,
    /// The private key (PKCS#8).
    pub key_pem: String,
}

impl fmt::Debug for IssuedCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedCert")
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

/// A CA that can issue agent certificates.
pub struct Ca {
    params: CertificateParams,
    key: KeyPair,
    cert_pem: String,
}

impl fmt::Debug for Ca {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ca").finish_non_exhaustive()
    }
}

fn cert_err(e: impl fmt::Display) -> MeshError {
    MeshError::Certificate(e.to_string())
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> MeshError + '_ {
    move |source| MeshError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn ca_params(not_after: time::OffsetDateTime) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, DEV_CA_NAME);
    dn.push(DnType::OrganizationName, "Shoal");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = time::OffsetDateTime::now_utc() - CLOCK_SKEW;
    params.not_after = not_after;
    params
}

impl Ca {
    /// A new self-signed CA valid for `lifetime`.
    pub fn generate(lifetime: Duration) -> Result<Ca, MeshError> {
        let key = KeyPair::generate().map_err(cert_err)?;
        let params = ca_params(time::OffsetDateTime::now_utc() + lifetime);
        let cert = params.clone().self_signed(&key).map_err(cert_err)?;
        Ok(Ca {
            cert_pem: cert.pem(),
            params,
            key,
        })
    }

    /// A CA from its certificate and key. The certificate file is what peers
    /// trust; issuing signs with the key under the same subject name.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Ca, MeshError> {
        let key = KeyPair::from_pem(key_pem).map_err(cert_err)?;
        let der = rustls::pki_types::pem::PemObject::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e: rustls::pki_types::pem::Error| cert_err(format!("CA certificate: {e}")))?;
        let der: rustls::pki_types::CertificateDer<'static> = der;
        let (_, parsed) = x509_parser::parse_x509_certificate(&der)
            .map_err(|e| cert_err(format!("CA certificate: {e}")))?;
        let not_after =
            time::OffsetDateTime::from_unix_timestamp(parsed.validity().not_after.timestamp())
                .map_err(cert_err)?;
        if parsed.public_key().raw != key.public_key_der() {
            return Err(cert_err("the CA key does not match the CA certificate"));
        }
        Ok(Ca {
            params: ca_params(not_after),
            key,
            cert_pem: cert_pem.to_string(),
        })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA private key, PEM.
    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// Issues a certificate for `id`, valid from a little before now for
    /// `lifetime`. `dns_name` is added as a DNS SAN (agents get
    /// [`crate::certs::node_san`], which binds them to their node name).
    pub fn issue(
        &self,
        id: &SpiffeId,
        dns_name: &str,
        lifetime: Duration,
    ) -> Result<IssuedCert, MeshError> {
        let now = time::OffsetDateTime::now_utc();
        self.issue_between(id, dns_name, now - CLOCK_SKEW, now + lifetime)
    }

    /// Issues a certificate valid between two times (tests use it for expired ones).
    pub fn issue_between(
        &self,
        id: &SpiffeId,
        dns_name: &str,
        not_before: time::OffsetDateTime,
        not_after: time::OffsetDateTime,
    ) -> Result<IssuedCert, MeshError> {
        let uri = rcgen::Ia5String::try_from(id.to_string()).map_err(cert_err)?;
        let mut sans = vec![SanType::URI(uri)];
        if let Ok(dns) = rcgen::Ia5String::try_from(dns_name.to_string()) {
            if !dns_name.is_empty() {
                sans.push(SanType::DnsName(dns));
            }
        }
        self.issue_with_sans(sans, not_before, not_after)
    }

    /// Issues a certificate with exactly these SANs (tests use it for one without a SPIFFE ID).
    pub fn issue_with_sans(
        &self,
        sans: Vec<SanType>,
        not_before: time::OffsetDateTime,
        not_after: time::OffsetDateTime,
    ) -> Result<IssuedCert, MeshError> {
        let key = KeyPair::generate().map_err(cert_err)?;
        let mut params = CertificateParams::default();
        params.subject_alt_names = sans;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "shoal-agent");
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.not_before = not_before;
        params.not_after = not_after;
        let issuer = self
            .params
            .clone()
            .self_signed(&self.key)
            .map_err(cert_err)?;
        let cert = params
            .signed_by(&key, &issuer, &self.key)
            .map_err(cert_err)?;
        Ok(IssuedCert {
            chain_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// Loads the development CA from `dir`, creating it first if absent. Safe
/// when several agents start at once: the CA is written to temporary files
/// and linked into place only if no other agent got there first.
pub fn load_or_create_dev_ca(dir: &Path) -> Result<Ca, MeshError> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let cert_path = dir.join(CA_CERT_FILE);
    let key_path = dir.join(CA_KEY_FILE);
    if !cert_path.exists() {
        let ca = Ca::generate(DEV_CA_LIFETIME)?;
        let tag = format!(
            "{}.{}",
            std::process::id(),
            time::OffsetDateTime::now_utc().unix_timestamp_nanos()
        );
        let tmp_key = dir.join(format!(".{CA_KEY_FILE}.{tag}"));
        let tmp_cert = dir.join(format!(".{CA_CERT_FILE}.{tag}"));
        write_private(&tmp_key, ca.key_pem().as_bytes())?;
        std::fs::write(&tmp_cert, ca.cert_pem()).map_err(io_err(&tmp_cert))?;
        // The key goes first: a certificate in place always has its key.
        let won = std::fs::hard_link(&tmp_key, &key_path).is_ok();
        if won {
            std::fs::hard_link(&tmp_cert, &cert_path).map_err(io_err(&cert_path))?;
            tracing::info!(dir = %dir.display(), "created the development CA");
        }
        let _ = std::fs::remove_file(&tmp_key);
        let _ = std::fs::remove_file(&tmp_cert);
    }
    // Another agent may be between linking the key and the certificate.
    let mut waited = 0;
    while !cert_path.exists() && waited < 50 {
        std::thread::sleep(Duration::from_millis(20));
        waited += 1;
    }
    let cert_pem = std::fs::read_to_string(&cert_path).map_err(io_err(&cert_path))?;
    let key_pem = std::fs::read_to_string(&key_path).map_err(io_err(&key_path))?;
    Ca::from_pem(&cert_pem, &key_pem)
}

/// Writes a file readable by its owner only.
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<(), MeshError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io_err(path))?;
    f.write_all(bytes).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))
}

/// Where a development agent keeps its own certificate: `<ca-dir>/agents/<node>/`.
pub fn dev_agent_dir(ca_dir: &Path, node: &str) -> PathBuf {
    ca_dir.join("agents").join(node)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_ids_parse_and_print() {
        let id: SpiffeId = "spiffe://shoal.local/ns/orders/sa/default".parse().unwrap();
        assert_eq!(id.namespace, "orders");
        assert_eq!(id.to_string(), "spiffe://shoal.local/ns/orders/sa/default");
        for bad in [
            "https://x/ns/a/sa/b",
            "spiffe://x/ns/a",
            "spiffe://x/ns//sa/b",
            "spiffe://x/ns/A/sa/b",
            "spiffe://x/ns/a/sa/b/extra",
            "spiffe:///ns/a/sa/b",
        ] {
            assert!(bad.parse::<SpiffeId>().is_err(), "{bad}");
        }
        assert!(SpiffeId::new("td", "ns", "sa").is_ok());
        assert!(SpiffeId::new("td", "n/s", "sa").is_err());
    }

    #[test]
    fn dev_ca_is_created_once_and_shared() {
        let dir = tempfile::tempdir().unwrap();
        let a = load_or_create_dev_ca(dir.path()).unwrap();
        let b = load_or_create_dev_ca(dir.path()).unwrap();
        assert_eq!(a.cert_pem(), b.cert_pem());
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(dir.path().join(CA_KEY_FILE))
                .unwrap()
                .permissions(),
        );
        assert_eq!(mode & 0o077, 0, "the CA key is private");
    }

    #[test]
    fn concurrent_agents_agree_on_one_ca() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let p = path.clone();
                std::thread::spawn(move || {
                    load_or_create_dev_ca(&p).map(|ca| ca.cert_pem().to_string())
                })
            })
            .collect();
        let pems: Vec<String> = handles
            .into_iter()
            .map(|h| h.join().unwrap().unwrap())
            .collect();
        assert!(pems.windows(2).all(|w| w[0] == w[1]));
    }

    #[test]
    fn mismatched_ca_key_is_refused() {
        let a = Ca::generate(DEV_CA_LIFETIME).unwrap();
        let b = Ca::generate(DEV_CA_LIFETIME).unwrap();
        assert!(Ca::from_pem(a.cert_pem(), &b.key_pem()).is_err());
        assert!(Ca::from_pem("garbage", &a.key_pem()).is_err());
    }
}
