//! Shoal's mesh transport: who an agent is, and how agents reach each other.
//!
//! - [`identity`]: SPIFFE IDs, the development CA (`--dev`) and certificate issuing.
//! - [`certs`]: the one seam every certificate comes through ([`certs::CertSource`]):
//!   the dev CA, a CSR signed by the injector's identity service ([`client`]), files
//!   reloaded when they change.
//! - [`client`]: the identity service's client, a [`certs::CertSource`].
//! - [`tls`]: rustls configuration with mutual authentication: a peer must chain to
//!   the mesh CA, be within its validity, and carry a SPIFFE ID; refusals say why.
//! - [`transport`]: a QUIC endpoint (quinn, ALPN `shoal/1`) that accepts and dials
//!   authenticated peers.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod certs;
pub mod client;
pub mod identity;
pub mod tls;
pub mod transport;

pub use identity::SpiffeId;
/// The QUIC implementation, for callers that hold connections.
pub use quinn;

/// Why the mesh could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    /// A certificate or key could not be made, read or parsed.
    #[error("certificate: {0}")]
    Certificate(String),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// TLS configuration was refused.
    #[error("TLS configuration: {0}")]
    Tls(String),
    /// A socket could not be bound.
    #[error("cannot bind {addr}: {source}")]
    Bind {
        /// The address.
        addr: std::net::SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The peer aborted the handshake with a TLS alert: it refused this
    /// agent's certificate.
    #[error("{addr} refused this agent's certificate: {reason}")]
    PeerRefused {
        /// The peer address.
        addr: std::net::SocketAddr,
        /// The peer's alert.
        reason: String,
    },
    /// A connection failed or was refused.
    #[error("connection to {addr}: {reason}")]
    Connect {
        /// The peer address.
        addr: std::net::SocketAddr,
        /// What happened.
        reason: String,
    },
}
