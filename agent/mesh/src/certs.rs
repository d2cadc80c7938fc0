//! Where certificates come from: the one seam between identity and the mesh.
//!
//! The mesh asks a [`CertSource`] for an [`Identity`] at start and whenever
//! [`CertSource::changed`] says so; it never knows whether the files came
//! from the dev CA, a CSR signed by the injector's identity service
//! ([`crate::client`]), or an operator.

use crate::identity::{self, Ca, SpiffeId, DEFAULT_CERT_LIFETIME};
use crate::MeshError;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// File names of an agent's own certificate, key and trust roots.
pub const CERT_FILE: &str = "cert.pem";
/// Private key file.
pub const KEY_FILE: &str = "key.pem";
/// Trust roots file.
pub const ROOTS_FILE: &str = "ca.pem";

/// What an agent presents and trusts.
pub struct Identity {
    /// Its SPIFFE ID (from its certificate).
    pub id: SpiffeId,
    /// Its certificate chain, leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// Its private key.
    pub key: PrivateKeyDer<'static>,
    /// The CAs it trusts for peers.
    pub roots: Vec<CertificateDer<'static>>,
    /// When its certificate expires.
    pub not_after: SystemTime,
    /// When it was issued (valid from).
    pub not_before: SystemTime,
    /// When this agent got it: issuers back-date certificates for clock
    /// skew, so its life here starts at the later of this and `not_before`.
    pub loaded_at: SystemTime,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("id", &self.id.to_string())
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// When to renew: at two thirds of the certificate's life from when
    /// it was issued or got, whichever is later. Counting from the
    /// back-dated `not_before` alone would make a short-lived certificate
    /// (under about 2.5 times the back-dating) due as soon as it arrives,
    /// and the agent would renew in a loop.
    pub fn renew_at(&self) -> SystemTime {
        let start = self.not_before.max(self.loaded_at);
        let life = self.not_after.duration_since(start).unwrap_or_default();
        start + life.mul_f64(2.0 / 3.0)
    }
}

/// A source of the agent's identity.
pub trait CertSource: Send + Sync + 'static {
    /// Loads (or issues) the identity to use now.
    fn load(&self) -> Result<Identity, MeshError>;
    /// Whether [`CertSource::load`] would now give something new (files
    /// changed, or the current certificate is due for renewal).
    fn changed(&self, current: &Identity) -> bool;
    /// For logs.
    fn describe(&self) -> String;
    /// Mesh addresses of other agents learned with the last identity
    /// (discovery through the identity service); none for other sources.
    fn peers(&self) -> Vec<std::net::SocketAddr> {
        Vec::new()
    }
    /// Whether the source says this agent founds the mesh (creates its meta
    /// group when new); None when it has no say (then an agent with no one
    /// to join founds).
    fn founds_mesh(&self) -> Option<bool> {
        None
    }
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// Certificate, key and roots from PEM files, reloaded when they change.
#[derive(Debug, Clone)]
pub struct FileCertSource {
    /// Certificate chain file.
    pub cert: PathBuf,
    /// Private key file.
    pub key: PathBuf,
    /// Trust roots file.
    pub roots: PathBuf,
    loaded_at: std::sync::Arc<std::sync::Mutex<Option<SystemTime>>>,
}

impl FileCertSource {
    /// Files in `dir`: `cert.pem`, `key.pem`, `ca.pem`.
    pub fn in_dir(dir: &Path) -> Self {
        Self::new(
            dir.join(CERT_FILE),
            dir.join(KEY_FILE),
            dir.join(ROOTS_FILE),
        )
    }

    /// Given files.
    pub fn new(cert: PathBuf, key: PathBuf, roots: PathBuf) -> Self {
        FileCertSource {
            cert,
            key,
            roots,
            loaded_at: Default::default(),
        }
    }

    fn newest_change(&self) -> Option<SystemTime> {
        [&self.cert, &self.key, &self.roots]
            .iter()
            .filter_map(|p| modified(p))
            .max()
    }
}

fn read(path: &Path) -> Result<Vec<u8>, MeshError> {
    std::fs::read(path).map_err(|source| MeshError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Parses PEM certificates; errors name the file.
pub fn parse_certs(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, MeshError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|e| MeshError::Certificate(format!("{}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(MeshError::Certificate(format!(
            "{}: no PEM certificate",
            path.display()
        )));
    }
    Ok(certs)
}

/// The SPIFFE ID in a certificate's URI SANs, if it has exactly one valid one.
pub fn spiffe_id_of(cert: &CertificateDer<'_>) -> Result<SpiffeId, String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert)
        .map_err(|e| format!("unparsable certificate: {e}"))?;
    let san = parsed
        .subject_alternative_name()
        .map_err(|e| format!("bad subjectAltName: {e}"))?
        .ok_or("no subjectAltName")?;
    let uris: Vec<&str> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(u) if u.starts_with("spiffe://") => Some(*u),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [one] => one.parse(),
        [] => Err("no SPIFFE ID in the certificate's URI SANs".into()),
        _ => Err("more than one SPIFFE ID".into()),
    }
}

/// The suffix of the DNS SAN that binds a certificate to a node name:
/// `<node>.node.shoal`. Only the dev CA and the identity service write it
/// (the identity service with `<pod>.<namespace>`, which is the injected
/// agent's node name), so a certificate from elsewhere with DNS names of its own binds
/// nothing.
pub const NODE_SAN_SUFFIX: &str = ".node.shoal";

/// The DNS SAN that binds a certificate to `node`.
pub fn node_san(node: &str) -> String {
    format!("{node}{NODE_SAN_SUFFIX}")
}

/// The node names a certificate's DNS SANs bind ([`NODE_SAN_SUFFIX`]);
/// empty for none (or an unparsable certificate). A certificate that binds
/// several is refused, by peers and by its own agent: it could not be
/// held to one.
pub fn node_names_of(cert: &CertificateDer<'_>) -> Vec<String> {
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert) else {
        return Vec::new();
    };
    let Ok(Some(san)) = parsed.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::DNSName(d) => d.strip_suffix(NODE_SAN_SUFFIX),
            _ => None,
        })
        .map(str::to_owned)
        .collect()
}

/// The node name a certificate is bound to ([`NODE_SAN_SUFFIX`]); `None`
/// when it has no such SAN, or several (which the mesh's verifier refuses).
pub fn node_name_of(cert: &CertificateDer<'_>) -> Option<String> {
    match node_names_of(cert).as_slice() {
        [one] if !one.is_empty() => Some(one.clone()),
        _ => None,
    }
}

/// The validity window of a certificate.
pub fn validity_of(cert: &CertificateDer<'_>) -> Result<(SystemTime, SystemTime), MeshError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert)
        .map_err(|e| MeshError::Certificate(format!("unparsable certificate: {e}")))?;
    let to_time = |t: i64| SystemTime::UNIX_EPOCH + Duration::from_secs(t.max(0) as u64);
    Ok((
        to_time(parsed.validity().not_before.timestamp()),
        to_time(parsed.validity().not_after.timestamp()),
    ))
}

impl CertSource for FileCertSource {
    fn load(&self) -> Result<Identity, MeshError> {
        let stamp = self.newest_change();
        let chain = parse_certs(&self.cert, &read(&self.cert)?)?;
        let key = PrivateKeyDer::from_pem_slice(&read(&self.key)?)
            .map_err(|e| MeshError::Certificate(format!("{}: {e}", self.key.display())))?;
        let roots = parse_certs(&self.roots, &read(&self.roots)?)?;
        let id = spiffe_id_of(&chain[0])
            .map_err(|e| MeshError::Certificate(format!("{}: {e}", self.cert.display())))?;
        let (not_before, not_after) = validity_of(&chain[0])?;
        *self.loaded_at.lock().unwrap_or_else(|p| p.into_inner()) = stamp;
        Ok(Identity {
            id,
            chain,
            key,
            roots,
            not_after,
            not_before,
            // When the certificate file was written, not when it was read:
            // a reload (or a restart) reading the same file must not push
            // its renewal back.
            loaded_at: modified(&self.cert)
                .unwrap_or_else(SystemTime::now)
                .min(SystemTime::now()),
        })
    }

    fn changed(&self, _current: &Identity) -> bool {
        self.newest_change() != *self.loaded_at.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn describe(&self) -> String {
        format!("files {}", self.cert.display())
    }
}

/// Development identity: issued by the shared dev CA in `--ca-dir`, written
/// to `<ca-dir>/agents/<node>/`, renewed at two thirds of its life.
#[derive(Debug, Clone)]
pub struct DevCertSource {
    ca_dir: PathBuf,
    id: SpiffeId,
    node: String,
    lifetime: Duration,
    files: FileCertSource,
}

impl DevCertSource {
    /// A dev source for agent `node` with identity `id`.
    pub fn new(ca_dir: &Path, node: &str, id: SpiffeId) -> Self {
        Self::with_lifetime(ca_dir, node, id, DEFAULT_CERT_LIFETIME)
    }

    /// Same, with a certificate lifetime (tests use short ones).
    pub fn with_lifetime(ca_dir: &Path, node: &str, id: SpiffeId, lifetime: Duration) -> Self {
        DevCertSource {
            files: FileCertSource::in_dir(&identity::dev_agent_dir(ca_dir, node)),
            ca_dir: ca_dir.to_path_buf(),
            id,
            node: node.to_string(),
            lifetime,
        }
    }

    fn issue(&self) -> Result<(), MeshError> {
        let ca: Ca = identity::load_or_create_dev_ca(&self.ca_dir)?;
        let issued = ca.issue(&self.id, &node_san(&self.node), self.lifetime)?;
        let dir = identity::dev_agent_dir(&self.ca_dir, &self.node);
        std::fs::create_dir_all(&dir).map_err(|source| MeshError::Io {
            path: dir.clone(),
            source,
        })?;
        // Key first, then roots, then the certificate: a reader that sees the new certificate sees its key.
        identity::write_private(&self.files.key, issued.key_pem.as_bytes())?;
        std::fs::write(&self.files.roots, ca.cert_pem()).map_err(|source| MeshError::Io {
            path: self.files.roots.clone(),
            source,
        })?;
        std::fs::write(&self.files.cert, issued.chain_pem).map_err(|source| MeshError::Io {
            path: self.files.cert.clone(),
            source,
        })
    }
}

impl CertSource for DevCertSource {
    fn load(&self) -> Result<Identity, MeshError> {
        let current = self
            .files
            .load()
            .ok()
            .filter(|i| i.id == self.id && SystemTime::now() < i.renew_at());
        match current {
            Some(i) => Ok(i),
            None => {
                self.issue()?;
                self.files.load()
            }
        }
    }

    fn changed(&self, current: &Identity) -> bool {
        SystemTime::now() >= current.renew_at() || self.files.changed(current)
    }

    fn describe(&self) -> String {
        format!("dev CA in {}", self.ca_dir.display())
    }
}
