//! The injector's one error type.

use std::net::SocketAddr;
use std::path::PathBuf;

/// Everything that can go wrong in the injector outside of an admission
/// (admissions themselves never fail: they are answered fail-open).
#[derive(Debug, thiserror::Error)]
pub enum InjectorError {
    /// Offline input that cannot be read as Kubernetes YAML or JSON.
    #[error("input: {0}")]
    Input(String),
    /// Output that cannot be written.
    #[error("output: {0}")]
    Output(String),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Certificates or keys that cannot be used.
    #[error("tls: {0}")]
    Tls(String),
    /// Certificate generation failed.
    #[error("certificate generation: {0}")]
    CertGen(#[from] rcgen::Error),
    /// A Kubernetes API call failed.
    #[error("kubernetes api: {0}")]
    Kube(#[from] kube::Error),
    /// Bad configuration.
    #[error("config: {0}")]
    Config(String),
}
