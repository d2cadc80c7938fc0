//! The agent's mesh shell: identity, the QUIC endpoint, and SWIM membership
//! carried as QUIC datagrams over one authenticated connection per agent pair.
//!
//! Decisions live in the sans-IO crates ([`shoal_cluster::membership`],
//! [`shoal_cluster::placement`]); this module moves their datagrams, fires
//! their timers, and publishes what they conclude as a [`ClusterView`].

mod gossip;
mod link;
mod serve;
mod upkeep;

use gossip::run_membership;
use link::Link;
use serve::serve_streams;
pub use serve::Replier;
pub(crate) use upkeep::load_identity;
use upkeep::{spawn_cert_reload, spawn_stats};

use crate::error::AgentError;
use crate::metrics::Metrics;
use bytes::Bytes;
use serde::Serialize;
use shoal_cluster::membership::{self, AgentId, Liveness, Membership};
use shoal_mesh::certs::{CertSource, Identity};
use shoal_mesh::tls::CertStore;
use shoal_mesh::transport::Endpoint;
use shoal_mesh::{MeshError, SpiffeId};
use shoal_proto::Message;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};

/// Bytes read from a stream at once.
const READ_CHUNK: usize = 64 * 1024;
/// Most bytes one stream may buffer: a whole largest frame, plus the chunk
/// that completed it.
const MAX_STREAM_BUFFER: usize =
    shoal_proto::MAX_FRAME_BYTES + shoal_proto::HEADER_LEN + READ_CHUNK;
/// Cluster size gossip is tuned for until the mesh learns better.
pub const DEFAULT_EXPECTED_SIZE: u32 = 16;
/// How often certificate files are checked for changes and renewal, at most.
pub const CERT_CHECK_INTERVAL: Duration = Duration::from_secs(10);
/// Shortest wait between two checks, when a renewal is due sooner.
pub const MIN_CERT_CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// How often a not-yet-joined agent announces itself to its seeds again.
pub const JOIN_RETRY: Duration = Duration::from_secs(2);
/// How often an agent announces itself to members it holds down: one that
/// crashed and restarted at the same address, or the other side of a healed
/// partition, hears from the rest again (Serf's reconnect to failed members)
/// even if nothing else would make either side probe the other.
pub const RECONNECT_INTERVAL: Duration = Duration::from_secs(5);
/// How often per-peer QUIC statistics are exported.
pub const STATS_INTERVAL: Duration = Duration::from_secs(5);
/// Datagrams queued for the membership task before new ones are dropped
/// (gossip tolerates loss; memory must stay bounded).
const DATAGRAM_QUEUE: usize = 4096;
/// Frames queued for one peer before senders wait: backpressure, not memory.
const LINK_QUEUE: usize = 4096;
/// Bytes combined into one stream write.
const MAX_COALESCED_WRITE: usize = 256 * 1024;
/// Requests one stream may have under way (answers not yet written
/// included) before new ones are refused.
const MAX_REQUESTS_PER_STREAM: usize = 4096;
/// Answer bytes one connection (all its streams) may leave unread before
/// its fetches are answered `peer_busy` instead: a fetched batch already
/// read is shed, and new `Fetch` and `Request` calls are refused before
/// they run (a read is asked again with nothing lost; a request is refused
/// before its subscriber sees it, so a retry does not run it twice).
pub const MAX_UNREAD_ANSWER_BYTES_PER_CONNECTION: usize = 64 * 1024 * 1024;
/// Answer bytes one stream may leave unread before the agent stops reading
/// its requests until the peer reads: small answers (pongs, refusals),
/// which are never shed, cannot pile up either.
const MAX_UNREAD_ANSWER_BYTES_PER_STREAM: usize = 16 * 1024 * 1024;
/// An answer at most this large is never shed.
const SMALL_ANSWER_BYTES: usize = 4096;
/// What a queued answer costs besides its bytes (the queue's slot, the
/// allocation), counted so that many small answers weigh what they hold.
const QUEUED_ANSWER_OVERHEAD: usize = 128;
/// Longest a dial may take before a call fails.
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(3);

/// Who sent a message: the connection's address, and the namespace and
/// node name its verified certificate names (what authorization checks go by).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sender {
    /// The connection's remote address.
    pub addr: SocketAddr,
    /// The Kubernetes namespace of the peer's SPIFFE ID.
    pub namespace: Arc<str>,
    /// The node name the peer's certificate is bound to (its one DNS SAN),
    /// if it has one: such a peer speaks only for that node.
    pub node: Option<Arc<str>>,
}

impl Sender {
    /// Whether this peer may speak for `node`: its certificate names that
    /// node, or names none (certificates from files may not).
    pub fn may_speak_for(&self, node: &str) -> bool {
        bound_may_speak_for(self.node.as_deref(), node)
    }
}

/// Whether a peer whose certificate is bound to `bound` may speak for
/// `node`: a bound certificate only for its own node, one that binds none
/// (from files) for any.
fn bound_may_speak_for(bound: Option<&str>, node: &str) -> bool {
    bound.is_none_or(|b| b == node)
}

/// Handles what peers send: requests (answered through the [`Replier`]) and
/// one-way messages. The agent's router implements it.
pub trait Handler: Send + Sync + 'static {
    /// A message from the peer `from`.
    fn handle(self: Arc<Self>, from: &Sender, msg: Message, reply: Replier);
    /// A connection to the peer at `addr` is up.
    fn connected(self: Arc<Self>, addr: SocketAddr);
}

/// Why a call to a peer failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// No connection could be made.
    #[error("cannot reach {0}")]
    Unreachable(SocketAddr),
    /// The connection or stream closed before the answer came.
    #[error("the connection to {0} closed")]
    Closed(SocketAddr),
    /// No answer in time.
    #[error("no answer from {0} in time")]
    Timeout(SocketAddr),
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What the mesh needs to start.
pub struct MeshSettings {
    /// UDP address to bind.
    pub addr: SocketAddr,
    /// Seeds (`host:port`).
    pub join: Vec<String>,
    /// Where the identity comes from, and renewals.
    pub source: Arc<dyn CertSource>,
    /// The identity to start with (from `source`).
    pub identity: Identity,
    /// The address other agents reach this one at (default: the bound one,
    /// loopback when bound to an unspecified address).
    pub advertise: Option<SocketAddr>,
    /// Node name.
    pub node: String,
    /// Whether this agent stores partitions.
    pub broker: bool,
    /// Expected cluster size (tunes gossip).
    pub expected_size: u32,
    /// Mesh addresses of the members this agent knew in its last run: it
    /// announces itself to them at start and every
    /// [`RECONNECT_INTERVAL`] until each is a member again (they need not
    /// answer for this agent to be joined). A restarted agent started
    /// without `--join` is heard from at once instead of waiting for the
    /// others to find it.
    pub known: Vec<SocketAddr>,
}

/// A member as `GET /v1/cluster` shows it.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct MemberView {
    /// Node name.
    pub node: String,
    /// Mesh address.
    pub addr: SocketAddr,
    /// Liveness.
    pub state: Liveness,
    /// Restart counter.
    pub incarnation: u64,
    /// Whether it stores partitions.
    pub broker: bool,
}

/// The cluster as this agent sees it.
#[derive(Clone, Debug, Serialize, Default)]
pub struct ClusterView {
    /// This agent.
    pub me: Option<MemberView>,
    /// Whether the cluster knows this agent (always true for an agent with no seeds).
    pub joined: bool,
    /// Other members.
    pub members: Vec<MemberView>,
    /// Another agent had this agent's node name first: this one left the
    /// mesh and serves nothing until restarted under a name of its own.
    pub name_conflict: Option<NameConflict>,
}

/// Two agents with one node name: the one that started first keeps it.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct NameConflict {
    /// The node name both use.
    pub node: String,
    /// The mesh address of the agent that has it.
    pub holder: SocketAddr,
}

impl NameConflict {
    /// For logs, `/readyz` and errors.
    pub fn message(&self) -> String {
        format!(
            "node name {:?} is already used by the agent at {}: every agent needs a name of its own (--node-name, SHOAL_NODE_NAME); this agent left the mesh and serves nothing",
            self.node, self.holder
        )
    }
}

/// Whether `other` had the node name of `me` first: same name, another
/// address, not down, and started earlier (its incarnation is its start
/// time), the address breaking a tie.
pub fn name_taken_by(me: &MemberView, other: &MemberView) -> bool {
    other.node == me.node
        && other.addr != me.addr
        && other.state != Liveness::Down
        && (other.incarnation, other.addr) < (me.incarnation, me.addr)
}

impl ClusterView {
    /// Members that count for placement: alive or suspect, this agent included.
    pub fn placement_members(&self) -> Vec<shoal_cluster::placement::Member> {
        self.me
            .iter()
            .chain(self.members.iter().filter(|m| m.state != Liveness::Down))
            .map(|m| shoal_cluster::placement::Member {
                id: m.node.clone(),
                broker: m.broker,
            })
            .collect()
    }
}

enum Input {
    /// A gossip datagram, and the node the sending peer's certificate is
    /// bound to (if it is bound to one).
    Datagram(Bytes, Option<Arc<str>>),
    Timer(membership::Timer),
    Leave(oneshot::Sender<()>),
    /// Other agents' addresses, newly learned (discovery).
    Discovered(Vec<SocketAddr>),
}

/// Whether a gossip datagram's sender is one its peer's certificate may
/// speak for. One whose header does not decode passes here and is counted
/// as a bad datagram where membership reads it.
fn speaks_for_itself(datagram: &[u8], bound: Option<&str>) -> bool {
    Membership::sender_of(datagram).is_none_or(|src| bound_may_speak_for(bound, &src.node))
}

/// Most connections one peer may hold open to this agent at once, counted
/// by its certificate's node name (else its SPIFFE ID and address: agents
/// whose certificates bind no node may share an identity). An agent needs
/// one (two while agents dial each other at once, one more for a moment
/// after a restart); each connection has its own stream and answer budget,
/// so a hostile peer must not multiply them. Past the limit the peer's
/// oldest connection is closed: a legitimate agent uses its newest.
pub const MAX_CONNECTIONS_PER_PEER: usize = 4;

/// QUIC application close code of a connection closed for
/// [`MAX_CONNECTIONS_PER_PEER`].
pub const TOO_MANY_CONNECTIONS: u32 = 0x5c01;

/// Connections to other agents, one per address.
#[derive(Clone)]
struct Peers {
    endpoint: Endpoint,
    conns: Arc<Mutex<HashMap<SocketAddr, shoal_mesh::quinn::Connection>>>,
    /// Open accepted connections per peer identity, oldest first.
    accepted:
        Arc<Mutex<HashMap<String, std::collections::VecDeque<shoal_mesh::quinn::Connection>>>>,
    input: mpsc::Sender<Input>,
    metrics: Arc<Metrics>,
    node: String,
    handler: Arc<OnceLock<Arc<dyn Handler>>>,
    links: Arc<Mutex<HashMap<SocketAddr, Arc<Link>>>>,
}

impl Peers {
    fn conn(&self, addr: &SocketAddr) -> Option<shoal_mesh::quinn::Connection> {
        let conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        conns
            .get(addr)
            .filter(|c| c.close_reason().is_none())
            .cloned()
    }

    /// Whether the agent at `addr` proved it goes by `node`: a connection
    /// to it whose certificate is bound to that node, or to none (a
    /// certificate from files, taken on its word).
    fn holds_name(&self, addr: SocketAddr, node: &str) -> bool {
        self.conn(&addr).is_some_and(|c| {
            bound_may_speak_for(shoal_mesh::transport::peer_node(&c).as_deref(), node)
        })
    }

    /// Counts an accepted connection of the peer `who` until it closes; the
    /// peer's oldest one when it now holds more than it may, to be closed.
    fn admit(
        &self,
        who: String,
        conn: &shoal_mesh::quinn::Connection,
    ) -> Option<shoal_mesh::quinn::Connection> {
        let oldest = {
            let mut accepted = lock(&self.accepted);
            let open = accepted.entry(who.clone()).or_default();
            open.push_back(conn.clone());
            (open.len() > MAX_CONNECTIONS_PER_PEER)
                .then(|| open.pop_front())
                .flatten()
        };
        let (accepted, conn) = (self.accepted.clone(), conn.clone());
        tokio::spawn(async move {
            conn.closed().await;
            let mut accepted = lock(&accepted);
            if let Some(open) = accepted.get_mut(&who) {
                open.retain(|c| c.stable_id() != conn.stable_id());
                if open.is_empty() {
                    accepted.remove(&who);
                }
            }
        });
        oldest
    }

    /// Adopts a connection: its datagrams feed membership.
    fn adopt(&self, addr: SocketAddr, conn: shoal_mesh::quinn::Connection) {
        self.conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(addr, conn.clone());
        // A new connection from an address usually means the peer restarted:
        // the link over the old one may be dead without knowing it yet.
        // New calls go over the newest connection; the old one is left to
        // close by itself (when both agents dial at once, both stay alive).
        {
            let mut links = lock(&self.links);
            if links.get(&addr).is_some_and(|l| !l.runs_on(&conn)) {
                links.remove(&addr);
            }
        }
        let input = self.input.clone();
        let metrics = self.metrics.clone();
        tokio::spawn(serve_streams(
            conn.clone(),
            self.metrics.clone(),
            self.node.clone(),
            self.handler.clone(),
        ));
        if let Some(h) = self.handler.get() {
            h.clone().connected(addr);
        }
        let node: Option<Arc<str>> = shoal_mesh::transport::peer_node(&conn).map(Arc::from);
        tokio::spawn(async move {
            while let Ok(d) = conn.read_datagram().await {
                metrics.mesh_datagrams_in.inc();
                metrics.mesh_bytes_in.inc_by(d.len() as u64);
                // Full queue: drop, as the network would.
                let _ = input.try_send(Input::Datagram(d, node.clone()));
            }
        });
    }

    /// Sends a datagram, dialing first if there is no connection.
    fn send(&self, to: SocketAddr, data: Bytes) {
        self.metrics.mesh_datagrams_out.inc();
        self.metrics.mesh_bytes_out.inc_by(data.len() as u64);
        if let Some(c) = self.conn(&to) {
            if let Err(e) = c.send_datagram(data) {
                tracing::debug!(peer = %to, error = %e, "gossip datagram not sent");
            }
            return;
        }
        let peers = self.clone();
        tokio::spawn(async move {
            match peers.endpoint.connect(to).await {
                Ok(peer) => {
                    tracing::debug!(peer = %to, id = %peer.id, "connected");
                    let _ = peer.connection.send_datagram(data);
                    peers.adopt(to, peer.connection);
                }
                Err(e) => tracing::debug!(peer = %to, error = %e, "cannot reach peer"),
            }
        });
    }
}

impl Peers {
    /// The link to `to`, dialing first if there is no connection.
    async fn link(&self, to: SocketAddr) -> Result<Arc<Link>, CallError> {
        if let Some(l) = lock(&self.links).get(&to).filter(|l| l.usable()) {
            return Ok(l.clone());
        }
        let conn = match self.conn(&to) {
            Some(c) => c,
            None => {
                let peer = tokio::time::timeout(DIAL_TIMEOUT, self.endpoint.connect(to))
                    .await
                    .map_err(|_| CallError::Unreachable(to))?
                    .map_err(|e| {
                        tracing::debug!(peer = %to, error = %e, "cannot reach peer");
                        CallError::Unreachable(to)
                    })?;
                self.adopt(to, peer.connection.clone());
                peer.connection
            }
        };
        let mut links = lock(&self.links);
        if let Some(l) = links.get(&to).filter(|l| l.usable()) {
            return Ok(l.clone());
        }
        let link = Link::open(conn, self.metrics.clone());
        links.insert(to, link.clone());
        Ok(link)
    }
}

static NEXT_REQ: AtomicU64 = AtomicU64::new(1);

/// A running mesh.
pub struct Mesh {
    view: watch::Receiver<ClusterView>,
    input: mpsc::Sender<Input>,
    peers: Peers,
    endpoint: Endpoint,
    /// The bound mesh address.
    pub local_addr: SocketAddr,
    /// The address other agents reach this one at.
    pub advertised: SocketAddr,
    /// This agent's SPIFFE ID.
    pub id: SpiffeId,
    /// Whether this agent founds the mesh when new (creates its meta
    /// group): the identity service's word when it gave one, else "nobody
    /// to join".
    pub founder: bool,
    /// What makes a member going down expected rather than a warning.
    expected: Arc<ExpectedDowns>,
}

/// Members going down that are no surprise: all of them while this agent
/// stops (the whole mesh stopping), and those that said they leave.
#[derive(Debug, Default)]
struct ExpectedDowns {
    stopping: std::sync::atomic::AtomicBool,
    leaving: Mutex<std::collections::HashSet<String>>,
    /// Members that went down while this agent was stopping, or that said
    /// themselves they left (and have not come back since).
    down_while_stopping: Mutex<std::collections::HashSet<String>>,
}

impl ExpectedDowns {
    /// `node` announced its own leave: a graceful stop, not a failure.
    fn left(&self, node: &str) {
        lock(&self.leaving).remove(node);
        lock(&self.down_while_stopping).insert(node.to_string());
    }

    /// `node` is up again: what it said or did before no longer holds.
    fn back_up(&self, node: &str) {
        lock(&self.leaving).remove(node);
        lock(&self.down_while_stopping).remove(node);
    }

    /// Whether `node` going down is expected; forgets a leaving member's word.
    fn down_expected(&self, node: &str) -> Option<&'static str> {
        let left = lock(&self.leaving).remove(node);
        if left {
            Some("it left")
        } else if self.stopping.load(std::sync::atomic::Ordering::Acquire) {
            lock(&self.down_while_stopping).insert(node.to_string());
            Some("this agent is stopping too")
        } else {
            None
        }
    }
}

impl std::fmt::Debug for Mesh {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mesh")
            .field("addr", &self.local_addr)
            .field("id", &self.id.to_string())
            .finish()
    }
}

fn view_of(m: &Membership, seeded: bool) -> ClusterView {
    let as_view = |a: &AgentId, state| MemberView {
        node: a.node.clone(),
        addr: a.addr,
        state,
        incarnation: a.incarnation,
        broker: a.broker,
    };
    let mut members: Vec<MemberView> = m.members().iter().map(|(a, l)| as_view(a, *l)).collect();
    members.sort_by(|a, b| a.node.cmp(&b.node));
    let me = as_view(m.me(), Liveness::Alive);
    let name_conflict = members
        .iter()
        .find(|o| name_taken_by(&me, o))
        .map(|o| NameConflict {
            node: o.node.clone(),
            holder: o.addr,
        });
    ClusterView {
        me: Some(me),
        joined: m.joined() || !seeded,
        members,
        name_conflict,
    }
}

async fn resolve(seeds: &[String]) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    for s in seeds {
        match tokio::net::lookup_host(s.as_str()).await {
            Ok(addrs) => out.extend(addrs),
            Err(e) => tracing::warn!(seed = %s, error = %e, "cannot resolve a --join address"),
        }
    }
    out
}

impl Mesh {
    /// Issues or loads the identity, binds the endpoint, and starts gossip.
    pub async fn start(settings: MeshSettings, metrics: Arc<Metrics>) -> Result<Mesh, AgentError> {
        let mesh_err = |e: shoal_mesh::MeshError| AgentError::Config(format!("mesh: {e}"));
        let identity = settings.identity;
        let spiffe = identity.id.clone();
        let source = settings.source;
        let refusals = metrics.clone();
        let store = CertStore::new(
            &identity,
            Arc::new(move |why, detail| {
                refusals
                    .mesh_handshake_failures
                    .get_or_create(&crate::metrics::ReasonLabel {
                        reason: why.as_str(),
                    })
                    .inc();
                tracing::warn!(reason = why.as_str(), detail, "refused a mesh peer");
            }),
        )
        .map_err(mesh_err)?;
        let discovered = source.peers();
        let founds_mesh = source.founds_mesh();
        let endpoint = Endpoint::bind(settings.addr, &store).map_err(mesh_err)?;
        let local_addr = endpoint.local_addr().map_err(mesh_err)?;
        // The address others reach this agent at: the bound one, unless it is unspecified.
        let advertised = if let Some(a) = settings.advertise {
            SocketAddr::new(
                a.ip(),
                if a.port() == 0 {
                    local_addr.port()
                } else {
                    a.port()
                },
            )
        } else if local_addr.ip().is_unspecified() {
            SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), local_addr.port())
        } else {
            local_addr
        };
        let me = AgentId {
            addr: advertised,
            node: settings.node.clone(),
            incarnation: crate::time::now_ms(),
            broker: settings.broker,
        };
        let (input_tx, input_rx) = mpsc::channel(DATAGRAM_QUEUE);
        let peers = Peers {
            endpoint: endpoint.clone(),
            conns: Default::default(),
            input: input_tx.clone(),
            metrics: metrics.clone(),
            node: settings.node.clone(),
            handler: Default::default(),
            links: Default::default(),
            accepted: Default::default(),
        };
        {
            let peers = peers.clone();
            let endpoint = endpoint.clone();
            let metrics = metrics.clone();
            tokio::spawn(async move {
                while let Some(incoming) = endpoint.accept_incoming().await {
                    let (peers, metrics) = (peers.clone(), metrics.clone());
                    tokio::spawn(async move {
                        match incoming.handshake().await {
                            Ok(peer) => {
                                let addr = peer.connection.remote_address();
                                let who = shoal_mesh::transport::peer_node(&peer.connection)
                                    .unwrap_or_else(|| format!("{}@{}", peer.id, addr.ip()));
                                if let Some(oldest) = peers.admit(who.clone(), &peer.connection) {
                                    metrics.mesh_connections_over_limit.inc();
                                    tracing::warn!(peer = %addr, %who, max = MAX_CONNECTIONS_PER_PEER, "a peer holds more connections than one may; its oldest is closed");
                                    oldest.close(
                                        TOO_MANY_CONNECTIONS.into(),
                                        b"too many connections from this peer",
                                    );
                                }
                                tracing::debug!(peer = %addr, id = %peer.id, "accepted");
                                peers.adopt(addr, peer.connection);
                            }
                            Err(e @ MeshError::PeerRefused { .. }) => {
                                metrics
                                    .mesh_handshake_failures
                                    .get_or_create(&crate::metrics::ReasonLabel {
                                        reason: crate::metrics::PEER_REFUSED,
                                    })
                                    .inc();
                                tracing::warn!(error = %e, "a peer refused this agent's certificate");
                            }
                            Err(e) => tracing::debug!(error = %e, "mesh handshake failed"),
                        }
                    });
                }
            });
        }
        let mut seeds = resolve(&settings.join).await;
        // Agents the identity service named: seeds like --join's.
        seeds.extend(&discovered);
        seeds.sort_unstable();
        seeds.dedup();
        let seeds: Vec<SocketAddr> = seeds
            .into_iter()
            .filter(|s| *s != advertised && *s != local_addr)
            .collect();
        if !discovered.is_empty() {
            tracing::info!(peers = ?discovered, source = %source.describe(), "other agents discovered");
        }
        let membership = Membership::new(
            me,
            membership::config(settings.expected_size),
            crate::time::now_ms(),
        );
        let seeded = !seeds.is_empty();
        // --join always means "join, never found", whatever discovery says.
        let founder = settings.join.is_empty() && founds_mesh.unwrap_or(discovered.is_empty());
        let (view_tx, view_rx) = watch::channel(view_of(&membership, seeded));
        let expected = Arc::new(ExpectedDowns::default());
        let known: Vec<SocketAddr> = settings
            .known
            .iter()
            .copied()
            .filter(|a| *a != advertised && *a != local_addr)
            .collect();
        tokio::spawn(run_membership(
            membership,
            (seeds, known),
            peers.clone(),
            (input_rx, input_tx.clone()),
            view_tx,
            metrics.clone(),
            expected.clone(),
        ));
        spawn_cert_reload(
            source,
            store.clone(),
            identity,
            input_tx.clone(),
            metrics.clone(),
        );
        spawn_stats(peers.clone(), metrics);
        tracing::info!(addr = %local_addr, id = %spiffe, "mesh listening (QUIC, mTLS, ALPN shoal/1)");
        Ok(Mesh {
            view: view_rx,
            input: input_tx,
            peers,
            endpoint,
            local_addr,
            advertised,
            id: spiffe,
            founder,
            expected,
        })
    }

    /// Says this agent is stopping (gracefully): from now on, other members
    /// going down (when the whole mesh stops, they stop too) is logged at
    /// INFO, not as a warning.
    pub fn stopping(&self) {
        self.expected
            .stopping
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// Whether `node` went down after this agent began stopping, or said
    /// itself it left: the whole mesh is stopping, not one agent failing.
    pub fn went_down_while_stopping(&self, node: &str) -> bool {
        lock(&self.expected.down_while_stopping).contains(node)
    }

    /// Says `node` told this agent it leaves (gracefully): its going down is
    /// then logged at INFO, not as a warning.
    pub fn peer_leaves(&self, node: &str) {
        lock(&self.expected.leaving).insert(node.to_string());
    }

    /// Installs what handles peers' messages (once, before traffic flows).
    pub fn set_handler(&self, handler: Arc<dyn Handler>) {
        if self.peers.handler.set(handler.clone()).is_err() {
            return;
        }
        // Connections made before now missed their greeting.
        let addrs: Vec<SocketAddr> = lock(&self.peers.conns).keys().copied().collect();
        for addr in addrs {
            handler.clone().connected(addr);
        }
    }

    /// Sends a request built around a fresh request id and waits for its answer.
    pub async fn call(
        &self,
        to: SocketAddr,
        timeout: Duration,
        build: impl FnOnce(u64) -> Message,
    ) -> Result<Message, CallError> {
        let req = NEXT_REQ.fetch_add(1, Ordering::Relaxed);
        let deadline = tokio::time::Instant::now() + timeout;
        let link = tokio::time::timeout_at(deadline, self.peers.link(to))
            .await
            .map_err(|_| CallError::Timeout(to))??;
        link.call(to, req, deadline, build(req)).await
    }

    /// Sends a one-way message, in order with the other messages to `to`.
    pub async fn tell(&self, to: SocketAddr, msg: Message) -> Result<(), CallError> {
        let link = self.peers.link(to).await?;
        link.tell(to, msg).await
    }

    /// The cluster now.
    pub fn view(&self) -> ClusterView {
        self.view.borrow().clone()
    }

    /// A receiver of cluster changes.
    pub fn watch(&self) -> watch::Receiver<ClusterView> {
        self.view.clone()
    }

    /// Tells the cluster this agent leaves, then closes the endpoint.
    pub async fn leave(&self) {
        let (done, rx) = oneshot::channel();
        if self.input.send(Input::Leave(done)).await.is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(2), rx).await;
        }
        // Give the leave datagrams a moment on the wire before closing.
        tokio::time::sleep(Duration::from_millis(100)).await;
        self.endpoint.close();
    }
}
