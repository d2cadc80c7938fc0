//! The mesh as one broker: which agent is home to each partition, publishes
//! forwarded to it, consumer groups that span agents, request/reply across
//! agents, the shared topic catalog, and partitions handed between agents
//! when membership changes.
//!
//! Placement is decided by [`shoal_cluster::placement`] over the members this
//! agent knows; each partition's [`Role`] on this agent says what it may do
//! with it. A partition moves in one direction only: the agent that held it
//! (serving or retired) seals it, sends its log and committed offsets to the
//! new home, and only then does the new home serve it. An agent that crashed
//! keeps its partitions (publishes to them get 503 with `Retry-After`) until
//! it returns; one that stops gracefully hands them off and says it leaves.
//!
//! This file holds the router's state and its dispatch of peers' messages;
//! the child modules hold its jobs, in the order of the data path:
//! `members` (membership and the roster), `homes` (homes of topics with
//! one copy and their hand-off), `publish`, `groups` (consumer groups and
//! fetching), `request` (request/reply) and `view` (the cluster view and
//! partition figures).

mod groups;
mod homes;
mod members;
mod publish;
mod request;
mod view;

use crate::broker::Broker;
use crate::delivery::Subscriptions;
use crate::error::ApiError;
use crate::mesh::{CallError, Handler, Mesh, Replier, Sender};
use crate::metrics::Metrics;
use crate::replication::{self, Replication};
use crate::tenancy::Action;
use crate::topic::{Role, TopicConfig};
use http::StatusCode;
use members::load_members;
use publish::publish_refused;
use publish::{Lane, LaneKey};
use shoal_cluster::membership::Liveness;
use shoal_cluster::placement::{Assignment, Member};
use shoal_proto::{Message, SubscriberRef, WireError};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;
use tokio::sync::watch;

pub use homes::{ACQUIRE_RETRY, CHUNK_BYTES, HANDOFF_TIMEOUT};
pub use members::{saved_member_addrs, MEMBERS_FILE};
pub use publish::FORWARD_CALLS_PER_LANE;
pub use request::MAX_REPLY_BYTES;
pub use view::{local_stats, PartitionFigures, PartitionView};

/// Longest a forwarded publish waits for its home's answer (storage included).
pub const FORWARD_TIMEOUT: Duration = Duration::from_secs(12);
/// Longest a publish forwarded to a replicated partition's leader waits
/// before trying another replica (a leader that died does not answer).
pub const REPLICATED_FORWARD_TIMEOUT: Duration = Duration::from_millis(1500);
/// How long a publish keeps retrying, inside the agent, a partition that is
/// moving between agents before the app gets 503.
pub const MOVE_RETRY_WINDOW: Duration = Duration::from_secs(3);
/// Pause between those retries.
pub const MOVE_RETRY_STEP: Duration = Duration::from_millis(25);
/// Longest a home holds a consumer group's fetch open waiting for entries.
pub const FETCH_WAIT: Duration = Duration::from_secs(2);
/// Bytes of entries per fetch answer: small enough that a subscribing agent's
/// buffers stay small, large enough to carry a full fetch window of small messages.
pub const FETCH_ANSWER_BYTES: usize = 1 << 20;
/// Publish requests forwarded and unanswered before more get 503.
pub const DEFAULT_MAX_FORWARDS: usize = 1024;
/// Longest a one-way message or a short call waits for its peer.
const SHORT_CALL: Duration = Duration::from_secs(5);
/// Longest a home may take to give its partition figures for `GET /v1/topics`.
pub const STATS_CALL: Duration = Duration::from_secs(2);

/// What the agent knows of a member, including ones gossip has forgotten.
#[derive(Clone, Debug)]
struct Known {
    addr: SocketAddr,
    broker: bool,
    state: Liveness,
    incarnation: u64,
}

/// What another agent said it reads, and the namespace its certificate
/// names: an entry counts only while that namespace may read the topic
/// ([`Router::may_read`]), so a grant taken back, or one never given, takes
/// no part in dealing partitions, backlogs or requests.
struct RemoteSubs {
    namespace: Arc<str>,
    subs: Vec<SubscriberRef>,
}

#[derive(Default)]
struct Inner {
    known: BTreeMap<String, Known>,
    /// Members that said they leave, with the incarnation that left.
    departed: HashMap<String, u64>,
    /// Consumer groups other agents have members in.
    remote_subs: HashMap<String, RemoteSubs>,
    /// Members placement counts: known brokers that did not leave.
    members: Vec<Member>,
    /// Homes of every partition in the catalog, balanced (bounded loads).
    assignment: Assignment,
    /// The same without this agent: the next homes when it leaves.
    assignment_without_me: Assignment,
    /// For each partition whose home changed, the home it had before.
    previous: HashMap<(String, u32), String>,
}

/// A partition's home as this agent sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Home {
    /// This agent.
    Me,
    /// Another agent, reachable as far as gossip knows.
    Peer {
        /// Node name.
        node: String,
        /// Mesh address.
        addr: SocketAddr,
    },
    /// Another agent that is down: the partition is unavailable until it returns.
    Down {
        /// Node name.
        node: String,
    },
    /// No broker member at all.
    Nobody,
}

/// The mesh-wide broker of one agent.
pub struct Router {
    me: String,
    mesh: Arc<Mesh>,
    broker: Arc<Broker>,
    subs: OnceLock<Weak<Subscriptions>>,
    metrics: Arc<Metrics>,
    inner: Mutex<Inner>,
    joined: AtomicBool,
    /// Another agent had this agent's node name first.
    refused: AtomicBool,
    stopping: AtomicBool,
    changed: watch::Sender<u64>,
    request_rr: AtomicUsize,
    forwards: Arc<tokio::sync::Semaphore>,
    /// Forwards to one agent for one topic, coalesced (see [`Router::forward`]).
    lanes: Mutex<HashMap<LaneKey, Lane>>,
    /// This router, for the tasks it spawns.
    this: Weak<Router>,
    /// Where the members this agent knows are kept between runs, and what
    /// was written there last.
    members_file: Option<(std::path::PathBuf, Mutex<String>)>,
    /// The replicated partitions (durable topics with `replicas` ≥ 2).
    replication: OnceLock<Arc<Replication>>,
}

/// Where a consumer group reads a partition from, as this agent sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadAt {
    /// The partition's local copy (this agent is its home).
    Local,
    /// Through [`Router::fetch`] (another home, or a replicated partition).
    Remote,
    /// Nowhere right now (its home is down).
    Unavailable,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router").field("me", &self.me).finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn wire_error(e: &ApiError) -> WireError {
    WireError {
        status: e.status.as_u16(),
        code: e.code.to_string(),
        message: e.message.clone(),
        retry_after: e.retry_after.unwrap_or(0),
    }
}

/// Error codes a peer may answer with, as the static strings the API uses.
const KNOWN_CODES: &[&str] = &[
    "stale_copy",
    "already_serving",
    "backlog_full",
    "reply_too_large",
    "home_busy",
    "not_home",
    "not_leader",
    "not_ready",
    "partition_unknown",
    "topic_unknown",
    "home_unavailable",
    "storage_busy",
    "storage_timeout",
    "storage_error",
    "invalid_message",
    "invalid_name",
    "no_subscriber",
    "app_unreachable",
    "request_timeout",
    "peer_busy",
    "shutting_down",
    "internal",
    "forbidden",
];

fn api_error(w: WireError) -> ApiError {
    let code = KNOWN_CODES
        .iter()
        .find(|c| **c == w.code)
        .copied()
        .unwrap_or("peer_error");
    let status = StatusCode::from_u16(w.status).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut e = ApiError::new(status, code, w.message);
    if w.retry_after > 0 {
        e.retry_after = Some(w.retry_after);
    }
    e
}

fn call_error(node: &str, e: &CallError) -> ApiError {
    ApiError::unavailable(
        "home_unavailable",
        format!("agent {node} does not answer ({e}); retry shortly"),
        1,
    )
}

fn retryable(e: &ApiError) -> bool {
    matches!(
        e.code,
        "not_home" | "partition_unknown" | "topic_unknown" | "not_ready" | "not_leader"
    )
}

impl Router {
    /// A router over a started mesh; call [`Router::start`] next.
    ///
    /// With `data_dir`, the members this agent knows are kept in
    /// [`MEMBERS_FILE`] there and read back at start, as down until gossip
    /// sees them again: after a restart of the whole mesh (every agent
    /// stopped, none left), an agent that comes back first places partitions
    /// over the same members as before, instead of taking every partition
    /// while alone and then meeting the copies the others kept.
    pub fn new(
        me: String,
        mesh: Arc<Mesh>,
        broker: Arc<Broker>,
        metrics: Arc<Metrics>,
        max_forwards: usize,
        data_dir: Option<&std::path::Path>,
    ) -> Arc<Router> {
        let mut inner = Inner::default();
        let members_file = data_dir.map(|dir| {
            let path = dir.join(MEMBERS_FILE);
            let saved = load_members(&path);
            for m in saved.members {
                if m.node.is_empty() || m.node == me {
                    continue;
                }
                if m.departed {
                    inner.departed.insert(m.node.clone(), m.incarnation);
                }
                inner.known.insert(
                    m.node,
                    Known {
                        addr: m.addr,
                        broker: m.broker,
                        state: Liveness::Down,
                        incarnation: m.incarnation,
                    },
                );
            }
            (path, Mutex::new(String::new()))
        });
        Self::recompute_members(&mut inner);
        Arc::new_cyclic(|this| Router {
            this: this.clone(),
            me,
            mesh,
            broker,
            subs: OnceLock::new(),
            metrics,
            inner: Mutex::new(inner),
            joined: AtomicBool::new(false),
            refused: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            changed: watch::Sender::new(0),
            request_rr: AtomicUsize::new(0),
            forwards: Arc::new(tokio::sync::Semaphore::new(max_forwards.max(1))),
            lanes: Mutex::new(HashMap::new()),
            members_file,
            replication: OnceLock::new(),
        })
    }

    /// Attaches the replicated partitions; durable topics with `replicas` ≥ 2
    /// go through them from now on.
    pub fn attach_replication(&self, r: Arc<Replication>) {
        let _ = self.replication.set(r);
    }

    /// The replication shell when `topic` is replicated.
    pub fn replicated(&self, topic: &str) -> Option<&Arc<Replication>> {
        let r = self.replication.get()?;
        self.broker
            .topic(topic)
            .filter(|t| replication::is_replicated(&t.config()))
            .map(|_| r)
    }

    /// Where a consumer group on this agent reads a partition.
    pub fn read_at(&self, topic: &str, partition: u32) -> ReadAt {
        if self.replicated(topic).is_some() {
            return ReadAt::Remote;
        }
        match self.home(topic, partition) {
            Home::Me => ReadAt::Local,
            Home::Peer { .. } => ReadAt::Remote,
            Home::Down { .. } | Home::Nobody => ReadAt::Unavailable,
        }
    }

    /// The Raft groups this agent holds a replica of (replicated partitions
    /// and the meta group), for `GET /v1/cluster`.
    pub fn replica_view(&self) -> Vec<replication::ReplicaView> {
        self.replication.get().map(|r| r.view()).unwrap_or_default()
    }

    /// [`Broker::grant`] for a peer of namespace `ns`.
    fn peer_grant(&self, ns: &str, topic: &str, action: Action) -> Option<Result<(), ApiError>> {
        self.broker.grant(ns, topic, action)
    }

    /// Whether agents of namespace `ns` may read `topic` by what this agent
    /// knows now: its own namespace's, or granted (an unknown topic: no).
    fn may_read(&self, ns: &str, topic: &str) -> bool {
        matches!(self.peer_grant(ns, topic, Action::Subscribe), Some(Ok(())))
    }

    /// [`Router::peer_grant`], counted when refused. A topic not known here
    /// passes: the handler then answers `topic_unknown` (retryable), as it
    /// does to the owner, since nothing of it is stored or served here.
    fn authorize_peer(&self, ns: &str, topic: &str, action: Action) -> Result<(), ApiError> {
        match self.peer_grant(ns, topic, action) {
            None => Ok(()),
            Some(r) => r.inspect_err(|_| self.metrics.count_denial("mesh", action.as_str())),
        }
    }

    /// Whether a peer of namespace `ns` may read `topic` with `group`, or
    /// move the group's offsets.
    fn authorize_reader(&self, ns: &str, topic: &str, group: &str) -> Result<(), ApiError> {
        crate::tenancy::may_use_group(ns, group)
            .inspect_err(|_| self.metrics.count_denial("mesh", "group"))?;
        self.authorize_peer(ns, topic, Action::Subscribe)
    }

    fn count_invalid(&self, reason: &'static str) {
        self.metrics
            .mesh_invalid_messages
            .get_or_create(&crate::metrics::ReasonLabel { reason })
            .inc();
    }
}

fn stopping() -> ApiError {
    ApiError::unavailable("shutting_down", "the agent is stopping", 1)
}

fn not_ready() -> ApiError {
    ApiError::unavailable("not_ready", "this agent has not joined the mesh yet", 1)
}

fn not_home_here() -> ApiError {
    ApiError::internal("fetch asked of a remote home that is this agent")
}

async fn join_all<F: std::future::Future>(futures: Vec<F>) -> Vec<F::Output> {
    let mut set = Vec::with_capacity(futures.len());
    for f in futures {
        set.push(Box::pin(f));
    }
    let mut out = Vec::with_capacity(set.len());
    // Every call was sent when its future first ran; awaiting in order costs
    // no extra latency because the answers come back concurrently.
    for f in set {
        out.push(f.await);
    }
    out
}

impl Handler for Router {
    fn handle(self: Arc<Self>, sender: &Sender, msg: Message, reply: Replier) {
        let from = sender.addr;
        let ns = &*sender.namespace;
        match msg {
            Message::Publish {
                req,
                topic,
                entries,
            } => match self.authorize_peer(ns, &topic, Action::Publish) {
                Ok(()) => self.serve_publish(topic, entries, reply, req),
                Err(e) => reply.send(publish_refused(req, &entries, &e)),
            },
            Message::Fetch {
                req,
                topic,
                partition,
                group,
                start,
                from: f,
                max,
                wait_ms,
            } => match self.authorize_reader(ns, &topic, &group) {
                Ok(()) => {
                    self.serve_fetch(req, topic, partition, group, start, f, max, wait_ms, reply)
                }
                Err(e) => reply.send(Message::Fetched {
                    req,
                    result: Err(wire_error(&e)),
                }),
            },
            Message::Commit {
                topic,
                partition,
                group,
                next,
            } => {
                if let Err(e) = self.authorize_reader(ns, &topic, &group) {
                    tracing::warn!(peer = %from, error = %e.message, "refused a peer's commit");
                    return;
                }
                if let Some(r) = self.replicated(&topic) {
                    if self.is_member_addr(from) {
                        r.commit(&topic, partition, &group, next);
                    } else {
                        self.count_invalid("unknown_sender");
                    }
                    return;
                }
                if let Some(p) = self
                    .broker
                    .topic(&topic)
                    .and_then(|t| t.partition(partition))
                {
                    if matches!(p.role(), Role::Serving | Role::Retired) {
                        p.commit_offset(&group, next);
                    }
                }
            }
            Message::Topic {
                name,
                config,
                version,
            } => match serde_json::from_str::<TopicConfig>(&config) {
                Ok(c) => match self.broker.apply_catalog(
                    &name,
                    c,
                    version,
                    crate::tenancy::may_configure(ns, &name).is_ok(),
                ) {
                    Ok(true) => {
                        self.refresh_assignment();
                        self.reconcile();
                        self.bump();
                    }
                    Ok(false) => {}
                    Err(e) => {
                        self.count_invalid("invalid_topic");
                        tracing::warn!(topic = %name, error = %e.message, "refused a shared topic")
                    }
                },
                Err(e) => {
                    self.count_invalid("invalid_topic");
                    tracing::warn!(topic = %name, error = %e, "unreadable shared topic configuration")
                }
            },
            Message::Subscribers { node, subs } => {
                // A restarted agent may greet before gossip shows its new
                // address, so the name is checked against the peer's
                // certificate (and this agent's own), not its address.
                if node == self.me || !sender.may_speak_for(&node) {
                    self.count_invalid("unknown_sender");
                    tracing::warn!(peer = %from, node = %node, certified = ?sender.node, "refused a peer's subscriber list for another node");
                    return;
                }
                // A peer speaks for its own namespace's consumer groups only,
                // and they count only on topics its namespace may read
                // (checked where they are used, as grants change).
                let mut kept = Vec::with_capacity(subs.len());
                for s in subs {
                    if crate::tenancy::may_use_group(ns, &s.group).is_err() {
                        self.metrics.count_denial("mesh", "group");
                        tracing::warn!(peer = %from, namespace = ns, group = %s.group, "refused another namespace's consumer group in a peer's subscriber list");
                        continue;
                    }
                    if let Some(Err(e)) = self.peer_grant(ns, &s.topic, Action::Subscribe) {
                        self.metrics.count_denial("mesh", "subscribe");
                        tracing::warn!(peer = %from, error = %e.message, "a peer lists a subscription its namespace may not read; it is not counted");
                    }
                    kept.push(s);
                }
                lock(&self.inner).remote_subs.insert(
                    node,
                    RemoteSubs {
                        namespace: sender.namespace.clone(),
                        subs: kept,
                    },
                );
                self.bump();
            }
            Message::Request {
                req,
                topic,
                message,
                timeout_ms,
            } => match self.authorize_peer(ns, &topic, Action::Publish) {
                Ok(()) => self.serve_request(req, topic, message, timeout_ms, reply),
                Err(e) => reply.send(Message::Reply {
                    req,
                    result: Err(wire_error(&e)),
                }),
            },
            Message::Handoff { req, .. } if !self.is_member_addr(from) => {
                self.count_invalid("unknown_sender");
                reply.send(Message::HandoffAck {
                    req,
                    result: Err(WireError {
                        status: 403,
                        code: "unknown_sender".into(),
                        message: "hand-offs are taken only from members of the mesh".into(),
                        retry_after: 0,
                    }),
                });
            }
            Message::Handoff {
                req,
                topic,
                partition,
                reset,
                first_index,
                end_index,
                entries,
                offsets,
                last,
            } => self.serve_handoff(
                req,
                topic,
                partition,
                reset,
                (first_index, end_index),
                entries,
                offsets,
                last,
                reply,
            ),
            Message::HandoffRequest {
                req,
                topic,
                partition,
            } => self.serve_handoff_request(req, from, topic, partition, reply),
            Message::Roster { members } => self.merge_roster(members),
            Message::Raft(batch) => {
                let stepped = self.replication.get().is_some_and(|r| r.step(from, batch));
                if !stepped {
                    self.count_invalid("unknown_sender");
                }
            }
            Message::RaftPart {
                transfer,
                part,
                parts,
                bytes,
            } => {
                let taken = match self.replication.get() {
                    Some(r) => r.step_part(from, transfer, part, parts, bytes),
                    None => Err("unknown_sender"),
                };
                if let Err(reason) = taken {
                    self.count_invalid(reason);
                }
            }
            Message::Stats {
                req,
                topic,
                partitions,
            } => {
                // A topic's figures (offsets, sizes) are for its namespace
                // and the namespaces it grants something.
                let granted = |a| matches!(self.peer_grant(ns, &topic, a), None | Some(Ok(())));
                if granted(Action::Publish) || granted(Action::Subscribe) {
                    self.serve_stats(req, topic, partitions, reply);
                } else {
                    self.metrics.count_denial("mesh", "subscribe");
                    let e = crate::tenancy::forbidden(format!(
                        "namespace {ns} may not read the figures of topic {topic}: it is granted nothing on it"
                    ));
                    reply.send(Message::StatsAnswer {
                        req,
                        result: Err(wire_error(&e)),
                    });
                }
            }
            Message::Leaving { node } => {
                if !sender.may_speak_for(&node) || !self.is_member_at(&node, from) {
                    self.count_invalid("unknown_sender");
                    return;
                }
                {
                    let mut inner = lock(&self.inner);
                    let inc = inner.known.get(&node).map_or(0, |k| k.incarnation);
                    inner.departed.insert(node.clone(), inc);
                    inner.remote_subs.remove(&node);
                    Self::recompute_members(&mut inner);
                }
                tracing::info!(node = %node, "member leaves; its partitions move");
                self.mesh.peer_leaves(&node);
                self.save_members();
                self.share_members();
                self.refresh_assignment();
                self.reconcile();
                self.bump();
            }
            other => {
                if let Some(req) = other.req() {
                    if !other.is_answer() {
                        reply.send(Message::Failed {
                            req,
                            error: WireError {
                                status: 400,
                                code: "unexpected".into(),
                                message: "this message is not a request".into(),
                                retry_after: 0,
                            },
                        });
                    }
                }
            }
        }
    }

    fn connected(self: Arc<Self>, addr: SocketAddr) {
        tokio::spawn(async move {
            let mut msgs: Vec<Message> = vec![self.roster()];
            msgs.extend(
                self.broker
                    .topics()
                    .iter()
                    .filter_map(|t| self.topic_message(&t.name)),
            );
            msgs.push(self.subscribers_message());
            for m in msgs {
                if tokio::time::timeout(SHORT_CALL, self.mesh.tell(addr, m))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
    }
}
