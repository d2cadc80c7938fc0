//! The QUIC endpoint: one UDP socket that accepts and dials agents.

use crate::certs::spiffe_id_of;
use crate::tls::{client_config, server_config, CertStore};
use crate::{MeshError, SpiffeId};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::pki_types::CertificateDer;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// Idle time after which a silent connection is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Keep-alive interval, below the idle timeout.
pub const KEEP_ALIVE: Duration = Duration::from_secs(5);
/// Streams a peer may have open at once on one connection (quinn's default
/// is 100).
pub const MAX_STREAMS_PER_PEER: u32 = 8;
/// Packets a peer may receive before it must acknowledge them (the QUIC
/// ACK-frequency extension, which every quinn peer follows; quinn's default
/// is 1, an ACK for every other packet). The ACK delay stays at 25 ms.
pub const ACK_ELICITING_THRESHOLD: u32 = 8;
/// Server name sent when dialing; not checked (peers are named by SPIFFE ID).
const SERVER_NAME: &str = "shoal-agent";

/// An authenticated connection to another agent.
#[derive(Debug, Clone)]
pub struct Peer {
    /// The peer's SPIFFE ID, from its verified certificate.
    pub id: SpiffeId,
    /// The QUIC connection.
    pub connection: quinn::Connection,
}

/// A bound mesh endpoint.
#[derive(Debug, Clone)]
pub struct Endpoint {
    endpoint: quinn::Endpoint,
}

fn transport() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    if let Ok(idle) = quinn::IdleTimeout::try_from(IDLE_TIMEOUT) {
        t.max_idle_timeout(Some(idle));
    }
    t.keep_alive_interval(Some(KEEP_ALIVE));
    // A peer uses one long-lived stream per connection (and a few while a
    // link is replaced); each stream may buffer one whole frame, so this
    // bounds what one peer can make an agent hold.
    t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(MAX_STREAMS_PER_PEER));
    t.max_concurrent_uni_streams(quinn::VarInt::from_u32(0));
    // Mesh traffic is requests and their answers, which carry the ACKs
    // back; an ACK-only packet for every other packet cost each hop a
    // datagram to send, receive and decrypt. Reordered packets still draw
    // an ACK once a loss is detectable (reordering threshold 2), and probes
    // ask for one at once, so loss recovery keeps its pace.
    let mut acks = quinn::AckFrequencyConfig::default();
    acks.ack_eliciting_threshold(quinn::VarInt::from_u32(ACK_ELICITING_THRESHOLD));
    t.ack_frequency_config(Some(acks));
    Arc::new(t)
}

fn peer_leaf(connection: &quinn::Connection) -> Result<CertificateDer<'static>, String> {
    let identity = connection.peer_identity().ok_or("no peer certificate")?;
    let certs = identity
        .downcast::<Vec<CertificateDer<'static>>>()
        .map_err(|_| "peer identity is not a certificate chain")?;
    certs
        .first()
        .cloned()
        .ok_or_else(|| "empty peer certificate chain".to_owned())
}

/// The SPIFFE ID of a connection's peer, from the certificate it was verified with.
pub fn peer_id(connection: &quinn::Connection) -> Result<SpiffeId, String> {
    spiffe_id_of(&peer_leaf(connection)?)
}

/// The node name a connection's peer's certificate is bound to
/// ([`crate::certs::node_name_of`]), if any.
pub fn peer_node(connection: &quinn::Connection) -> Option<String> {
    crate::certs::node_name_of(&peer_leaf(connection).ok()?)
}

impl Endpoint {
    /// Binds `addr` (UDP) serving and dialing with the certificates in `store`.
    pub fn bind(addr: SocketAddr, store: &Arc<CertStore>) -> Result<Endpoint, MeshError> {
        let server = QuicServerConfig::try_from(server_config(store)?)
            .map_err(|e| MeshError::Tls(e.to_string()))?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(server));
        server.transport_config(transport());
        let client = QuicClientConfig::try_from(client_config(store)?)
            .map_err(|e| MeshError::Tls(e.to_string()))?;
        let mut client = quinn::ClientConfig::new(Arc::new(client));
        client.transport_config(transport());
        let mut endpoint = quinn::Endpoint::server(server, addr)
            .map_err(|source| MeshError::Bind { addr, source })?;
        endpoint.set_default_client_config(client);
        Ok(Endpoint { endpoint })
    }

    /// The bound address.
    pub fn local_addr(&self) -> Result<SocketAddr, MeshError> {
        self.endpoint.local_addr().map_err(|source| MeshError::Io {
            path: "mesh socket".into(),
            source,
        })
    }

    /// Dials an agent and authenticates it.
    pub async fn connect(&self, addr: SocketAddr) -> Result<Peer, MeshError> {
        let err = |reason: String| MeshError::Connect { addr, reason };
        let connecting = self
            .endpoint
            .connect(addr, SERVER_NAME)
            .map_err(|e| err(e.to_string()))?;
        let connection = connecting.await.map_err(|e| err(e.to_string()))?;
        let id = peer_id(&connection).map_err(err)?;
        Ok(Peer { id, connection })
    }

    /// Waits for the next agent to connect and authenticate. Handshakes that
    /// fail are skipped (the TLS layer has counted the refusal). `None` once
    /// the endpoint is closed.
    pub async fn accept(&self) -> Option<Result<Peer, MeshError>> {
        Some(self.accept_incoming().await?.handshake().await)
    }

    /// Waits for the next agent to start a handshake, without waiting for
    /// it to finish: callers run [`Incoming::handshake`] on a task of its
    /// own, so one slow or hostile peer does not hold up the others. `None`
    /// once the endpoint is closed.
    pub async fn accept_incoming(&self) -> Option<Incoming> {
        self.endpoint.accept().await.map(Incoming)
    }

    /// Closes every connection and the socket.
    pub fn close(&self) {
        self.endpoint.close(0u32.into(), b"agent stopping");
    }
}

/// A peer's connection attempt, not yet authenticated.
#[derive(Debug)]
pub struct Incoming(quinn::Incoming);

/// QUIC transport error codes that carry a TLS alert (RFC 9001, 4.8).
const CRYPTO_ERROR_CODES: std::ops::Range<u64> = 0x100..0x200;

impl Incoming {
    /// The address the attempt comes from.
    pub fn remote_address(&self) -> SocketAddr {
        self.0.remote_address()
    }

    /// Completes the handshake and authenticates the peer.
    /// [`MeshError::PeerRefused`] says the peer aborted it with a TLS alert,
    /// refusing this agent's certificate (a peer of another CA, say); a
    /// certificate this agent refuses is counted by the TLS layer.
    pub async fn handshake(self) -> Result<Peer, MeshError> {
        let addr = self.0.remote_address();
        match self.0.await {
            Ok(connection) => peer_id(&connection)
                .map(|id| Peer { id, connection })
                .map_err(|reason| MeshError::Connect { addr, reason }),
            Err(quinn::ConnectionError::ConnectionClosed(close))
                if CRYPTO_ERROR_CODES.contains(&u64::from(close.error_code)) =>
            {
                Err(MeshError::PeerRefused {
                    addr,
                    reason: close.to_string(),
                })
            }
            Err(e) => Err(MeshError::Connect {
                addr,
                reason: e.to_string(),
            }),
        }
    }
}

#[cfg(test)]
mod tests;
