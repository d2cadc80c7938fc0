//! The webhook's TLS: rustls with the ring provider, TLS 1.3 and 1.2, and a
//! certificate that can be swapped while serving (file reload, rotation).

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;

use crate::error::InjectorError;
use crate::metrics::Metrics;

/// How often mounted certificate files are checked for changes.
pub const DEFAULT_RELOAD_INTERVAL: Duration = Duration::from_secs(10);

/// The crypto provider used everywhere: ring (no C toolchain, static builds).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Parses a PEM certificate chain and private key into a [`CertifiedKey`].
pub fn certified_key(cert_pem: &[u8], key_pem: &[u8]) -> Result<Arc<CertifiedKey>, InjectorError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| InjectorError::Tls(format!("certificate PEM: {e}")))?;
    if certs.is_empty() {
        return Err(InjectorError::Tls("no certificate in PEM".to_owned()));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| InjectorError::Tls(format!("private key PEM: {e}")))?;
    let ck = CertifiedKey::from_der(certs, key, &provider())
        .map_err(|e| InjectorError::Tls(format!("certificate and key: {e}")))?;
    Ok(Arc::new(ck))
}

/// A certificate resolver whose certificate can be replaced at any time.
#[derive(Debug)]
pub struct CertStore {
    current: RwLock<Arc<CertifiedKey>>,
}

impl CertStore {
    /// A store serving `key`.
    pub fn new(key: Arc<CertifiedKey>) -> Arc<CertStore> {
        Arc::new(CertStore {
            current: RwLock::new(key),
        })
    }

    /// Serves `key` from now on.
    pub fn set(&self, key: Arc<CertifiedKey>) {
        match self.current.write() {
            Ok(mut g) => *g = key,
            Err(poisoned) => *poisoned.into_inner() = key,
        }
    }

    /// The certificate being served.
    pub fn get(&self) -> Arc<CertifiedKey> {
        match self.current.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.get())
    }
}

/// A rustls server configuration (TLS 1.3 and 1.2, ALPN h2 and http/1.1)
/// serving whatever `store` holds.
pub fn server_config(store: Arc<CertStore>) -> Result<Arc<ServerConfig>, InjectorError> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| InjectorError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(store);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Certificate and key files (a mounted `kubernetes.io/tls` Secret:
/// `tls.crt`, `tls.key`).
#[derive(Clone, Debug)]
pub struct CertFiles {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
}

fn read(path: &Path) -> Result<Vec<u8>, InjectorError> {
    std::fs::read(path).map_err(|source| InjectorError::Io {
        path: path.to_owned(),
        source,
    })
}

impl CertFiles {
    /// Reads both files.
    pub fn read(&self) -> Result<(Vec<u8>, Vec<u8>), InjectorError> {
        Ok((read(&self.cert)?, read(&self.key)?))
    }

    /// Loads the certificate now.
    pub fn load(&self) -> Result<Arc<CertifiedKey>, InjectorError> {
        let (cert, key) = self.read()?;
        certified_key(&cert, &key)
    }

    /// Re-reads the files every `interval` and swaps the served certificate
    /// when their content changed and parses; a bad update keeps the old one.
    /// Runs until `shutdown` fires.
    pub async fn watch(
        self,
        store: Arc<CertStore>,
        interval: Duration,
        metrics: Arc<Metrics>,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) {
        let mut last = self.read().ok();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = shutdown.changed() => return,
            }
            let current = match self.read() {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read certificate files; keeping the current certificate");
                    metrics.cert_reload_errors.inc();
                    continue;
                }
            };
            if last.as_ref() == Some(&current) {
                continue;
            }
            match certified_key(&current.0, &current.1) {
                Ok(ck) => {
                    store.set(ck);
                    metrics.cert_reloads.inc();
                    tracing::info!(cert = %self.cert.display(), "serving certificate reloaded");
                    last = Some(current);
                }
                Err(e) => {
                    // Files are often written one at a time: retry next tick.
                    tracing::warn!(error = %e, "new certificate files not usable yet; keeping the current certificate");
                    metrics.cert_reload_errors.inc();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
