//! The agent's mesh shell: identity, the QUIC endpoint, and SWIM membership
//! carried as QUIC datagrams over one authenticated connection per agent pair.
//!
//! Decisions live in the sans-IO crates ([`shoal_cluster::membership`],
//! [`shoal_cluster::placement`]); this module moves their datagrams, fires
//! their timers, and publishes what they conclude as a [`ClusterView`].

use crate::error::AgentError;
use crate::metrics::Metrics;
use bytes::Bytes;
use serde::Serialize;
use shoal_cluster::membership::{self, AgentId, Effects, Event, Liveness, Membership};
use shoal_mesh::certs::{CertSource, DevCertSource};
use shoal_mesh::tls::CertStore;
use shoal_mesh::transport::Endpoint;
use shoal_mesh::SpiffeId;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};

/// Cluster size gossip is tuned for until the mesh learns better.
pub const DEFAULT_EXPECTED_SIZE: u32 = 16;
/// How often certificate files are checked for changes and renewal.
pub const CERT_CHECK_INTERVAL: Duration = Duration::from_secs(10);
/// How often a not-yet-joined agent announces itself to its seeds again.
pub const JOIN_RETRY: Duration = Duration::from_secs(2);
/// How often per-peer QUIC statistics are exported.
pub const STATS_INTERVAL: Duration = Duration::from_secs(5);
/// Datagrams queued for the membership task before new ones are dropped
/// (gossip tolerates loss; memory must stay bounded).
const DATAGRAM_QUEUE: usize = 4096;

/// What the mesh needs to start.
#[derive(Clone, Debug)]
pub struct MeshSettings {
    /// UDP address to bind.
    pub addr: SocketAddr,
    /// Seeds (`host:port`).
    pub join: Vec<String>,
    /// Development CA directory.
    pub ca_dir: PathBuf,
    /// Node name.
    pub node: String,
    /// Namespace of this agent's identity.
    pub namespace: String,
    /// Service account of this agent's identity.
    pub service_account: String,
    /// Whether this agent stores partitions.
    pub broker: bool,
    /// Expected cluster size (tunes gossip).
    pub expected_size: u32,
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
    Datagram(Bytes),
    Timer(membership::Timer),
    Leave(oneshot::Sender<()>),
}

/// Connections to other agents, one per address.
#[derive(Clone)]
struct Peers {
    endpoint: Endpoint,
    conns: Arc<Mutex<HashMap<SocketAddr, shoal_mesh::quinn::Connection>>>,
    input: mpsc::Sender<Input>,
    metrics: Arc<Metrics>,
    node: String,
}

impl Peers {
    fn conn(&self, addr: &SocketAddr) -> Option<shoal_mesh::quinn::Connection> {
        let conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        conns
            .get(addr)
            .filter(|c| c.close_reason().is_none())
            .cloned()
    }

    /// Adopts a connection: its datagrams feed membership.
    fn adopt(&self, addr: SocketAddr, conn: shoal_mesh::quinn::Connection) {
        self.conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(addr, conn.clone());
        let input = self.input.clone();
        let metrics = self.metrics.clone();
        tokio::spawn(serve_streams(
            conn.clone(),
            self.metrics.clone(),
            self.node.clone(),
        ));
        tokio::spawn(async move {
            while let Ok(d) = conn.read_datagram().await {
                metrics.mesh_datagrams_in.inc();
                metrics.mesh_bytes_in.inc_by(d.len() as u64);
                // Full queue: drop, as the network would.
                let _ = input.try_send(Input::Datagram(d));
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

/// A running mesh.
pub struct Mesh {
    view: watch::Receiver<ClusterView>,
    input: mpsc::Sender<Input>,
    endpoint: Endpoint,
    /// The bound mesh address.
    pub local_addr: SocketAddr,
    /// This agent's SPIFFE ID.
    pub id: SpiffeId,
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
    ClusterView {
        me: Some(as_view(m.me(), Liveness::Alive)),
        joined: m.joined() || !seeded,
        members,
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
        let spiffe = SpiffeId::new(
            shoal_mesh::identity::DEV_TRUST_DOMAIN,
            &settings.namespace,
            &settings.service_account,
        )
        .map_err(|e| AgentError::Config(format!("mesh identity: {e}")))?;
        let source: Arc<dyn CertSource> = Arc::new(DevCertSource::new(
            &settings.ca_dir,
            &settings.node,
            spiffe.clone(),
        ));
        let identity = source.load().map_err(mesh_err)?;
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
        spawn_cert_reload(source, store.clone(), identity);
        let endpoint = Endpoint::bind(settings.addr, &store).map_err(mesh_err)?;
        let local_addr = endpoint.local_addr().map_err(mesh_err)?;
        // The address others reach this agent at: the bound one, unless it is unspecified.
        let advertised = if local_addr.ip().is_unspecified() {
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
        };
        {
            let peers = peers.clone();
            let endpoint = endpoint.clone();
            tokio::spawn(async move {
                while let Some(accepted) = endpoint.accept().await {
                    match accepted {
                        Ok(peer) => {
                            let addr = peer.connection.remote_address();
                            tracing::debug!(peer = %addr, id = %peer.id, "accepted");
                            peers.adopt(addr, peer.connection);
                        }
                        Err(e) => tracing::debug!(error = %e, "mesh handshake failed"),
                    }
                }
            });
        }
        let seeds = resolve(&settings.join).await;
        let seeds: Vec<SocketAddr> = seeds
            .into_iter()
            .filter(|s| *s != advertised && *s != local_addr)
            .collect();
        let membership = Membership::new(
            me,
            membership::config(settings.expected_size),
            crate::time::now_ms(),
        );
        let (view_tx, view_rx) = watch::channel(view_of(&membership, !seeds.is_empty()));
        tokio::spawn(run_membership(
            membership,
            seeds,
            peers.clone(),
            input_rx,
            input_tx.clone(),
            view_tx,
            metrics.clone(),
        ));
        spawn_stats(peers, metrics);
        tracing::info!(addr = %local_addr, id = %spiffe, "mesh listening (QUIC, mTLS, ALPN shoal/1)");
        Ok(Mesh {
            view: view_rx,
            input: input_tx,
            endpoint,
            local_addr,
            id: spiffe,
        })
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

fn spawn_cert_reload(
    source: Arc<dyn CertSource>,
    store: Arc<CertStore>,
    mut current: shoal_mesh::certs::Identity,
) {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(CERT_CHECK_INTERVAL).await;
            if !source.changed(&current) {
                continue;
            }
            let s = source.clone();
            match tokio::task::spawn_blocking(move || s.load()).await {
                Ok(Ok(next)) => match store.install(&next) {
                    Ok(()) => {
                        tracing::info!(source = %source.describe(), id = %next.id, "mesh certificate reloaded");
                        current = next;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "new mesh certificate refused; keeping the old one")
                    }
                },
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "cannot load the mesh certificate; keeping the old one")
                }
                Err(e) => tracing::error!(error = %e, "certificate reload task failed"),
            }
        }
    });
}

fn spawn_stats(peers: Peers, metrics: Arc<Metrics>) {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(STATS_INTERVAL).await;
            let conns: Vec<(SocketAddr, shoal_mesh::quinn::Connection)> = peers
                .conns
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .map(|(a, c)| (*a, c.clone()))
                .collect();
            for (addr, c) in conns {
                let label = crate::metrics::PeerLabel {
                    peer: addr.to_string(),
                };
                if c.close_reason().is_some() {
                    peers
                        .conns
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&addr);
                    metrics.mesh_rtt.remove(&label);
                    metrics.mesh_lost_packets.remove(&label);
                    continue;
                }
                let stats = c.stats();
                metrics
                    .mesh_rtt
                    .get_or_create(&label)
                    .set(stats.path.rtt.as_secs_f64());
                metrics
                    .mesh_lost_packets
                    .get_or_create(&label)
                    .set(stats.path.lost_packets as i64);
            }
        }
    });
}

async fn run_membership(
    mut m: Membership,
    seeds: Vec<SocketAddr>,
    peers: Peers,
    mut input: mpsc::Receiver<Input>,
    timers: mpsc::Sender<Input>,
    view: watch::Sender<ClusterView>,
    metrics: Arc<Metrics>,
) {
    let seeded = !seeds.is_empty();
    let apply = |m: &Membership, fx: Effects| {
        for (to, data) in fx.send {
            peers.send(to.addr, data);
        }
        for (after, timer) in fx.timers {
            let tx = timers.clone();
            tokio::spawn(async move {
                tokio::time::sleep(after).await;
                let _ = tx.send(Input::Timer(timer)).await;
            });
        }
        for e in &fx.events {
            match e {
                Event::Up(a) => tracing::info!(node = %a.node, addr = %a.addr, "member up"),
                Event::Down(a) => tracing::warn!(node = %a.node, addr = %a.addr, "member down"),
                Event::Joined => tracing::info!(me = %m.me().node, "joined the mesh"),
                Event::Alone => tracing::warn!("no other member is alive"),
                Event::Rejoined(a) => {
                    tracing::warn!(incarnation = a.incarnation, "declared down; rejoined")
                }
            }
        }
    };
    let mut retry = tokio::time::interval(JOIN_RETRY);
    loop {
        tokio::select! {
            got = input.recv() => match got {
                Some(Input::Datagram(d)) => match m.handle_data(&d) {
                    Ok(fx) => apply(&m, fx),
                    Err(e) => {
                        metrics.mesh_bad_datagrams.inc();
                        tracing::debug!(error = %e, "bad gossip datagram");
                    }
                },
                Some(Input::Timer(t)) => {
                    if let Ok(fx) = m.handle_timer(t) {
                        apply(&m, fx);
                    }
                }
                Some(Input::Leave(done)) => {
                    if let Ok(fx) = m.leave() {
                        apply(&m, fx);
                    }
                    let _ = done.send(());
                    return;
                }
                None => return,
            },
            _ = retry.tick(), if seeded && !m.joined() => {
                for s in &seeds {
                    if let Ok(fx) = m.join(AgentId::seed(*s)) {
                        apply(&m, fx);
                    }
                }
            }
        }
        let v = view_of(&m, seeded);
        for state in [Liveness::Alive, Liveness::Suspect, Liveness::Down] {
            let n = v.members.iter().filter(|x| x.state == state).count()
                + usize::from(state == Liveness::Alive);
            metrics
                .mesh_members
                .get_or_create(&crate::metrics::StateLabel {
                    state: liveness_label(state),
                })
                .set(n as i64);
        }
        view.send_if_modified(|old| {
            let changed = old.joined != v.joined || old.members != v.members;
            if changed {
                *old = v;
            }
            changed
        });
    }
}

/// Serves the streams a peer opens: framed [`shoal_proto::Message`]s. A bad
/// frame ends that stream with a `Refuse` frame and a metric; the connection,
/// its other streams and the agent go on.
async fn serve_streams(conn: shoal_mesh::quinn::Connection, metrics: Arc<Metrics>, node: String) {
    while let Ok((send, recv)) = conn.accept_bi().await {
        tokio::spawn(serve_stream(send, recv, metrics.clone(), node.clone()));
    }
}

/// Most bytes one stream may buffer before a whole frame arrives.
const MAX_STREAM_BUFFER: usize = shoal_proto::MAX_FRAME_BYTES + shoal_proto::HEADER_LEN;

async fn serve_stream(
    mut send: shoal_mesh::quinn::SendStream,
    mut recv: shoal_mesh::quinn::RecvStream,
    metrics: Arc<Metrics>,
    node: String,
) {
    use shoal_proto::{FrameError, Message};
    let mut buf = bytes::BytesMut::new();
    let mut out = bytes::BytesMut::new();
    loop {
        loop {
            match shoal_proto::decode::<Message>(&mut buf) {
                Ok(Some(msg)) => {
                    let reply = match msg {
                        Message::Ping { seq } => Some(Message::Pong { seq }),
                        Message::Hello { .. } => Some(Message::Hello {
                            node: node.clone(),
                            incarnation: 0,
                            broker: true,
                        }),
                        Message::Pong { .. } | Message::Refuse { .. } => None,
                    };
                    if let Some(r) = reply {
                        if shoal_proto::encode(&r, &mut out).is_err() {
                            return;
                        }
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    let reason = match &e {
                        FrameError::UnsupportedVersion { .. } => "version",
                        FrameError::TooLarge { .. } => "too_large",
                        FrameError::Empty => "empty",
                        FrameError::Malformed(_) | FrameError::Encode(_) => "malformed",
                    };
                    metrics
                        .mesh_bad_frames
                        .get_or_create(&crate::metrics::ReasonLabel { reason })
                        .inc();
                    tracing::warn!(error = %e, "closing a mesh stream after a bad frame");
                    let _ = shoal_proto::encode(
                        &Message::Refuse {
                            reason: e.to_string(),
                        },
                        &mut out,
                    );
                    let _ = send.write_all(&out).await;
                    let _ = send.finish();
                    let _ = recv.stop(1u32.into());
                    return;
                }
            }
        }
        // Replies of everything decoded so far go out in one write.
        if !out.is_empty() {
            if send.write_all(&out).await.is_err() {
                return;
            }
            out.clear();
        }
        match recv.read_chunk(64 * 1024, true).await {
            Ok(Some(chunk)) => {
                if buf.len() + chunk.bytes.len() > MAX_STREAM_BUFFER {
                    return;
                }
                buf.extend_from_slice(&chunk.bytes);
            }
            Ok(None) | Err(_) => {
                let _ = send.finish();
                return;
            }
        }
    }
}

fn liveness_label(l: Liveness) -> &'static str {
    match l {
        Liveness::Alive => "alive",
        Liveness::Suspect => "suspect",
        Liveness::Down => "down",
    }
}
