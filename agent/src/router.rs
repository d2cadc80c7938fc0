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

use crate::broker::{choose_partition, Broker, PublishOutcome};
use crate::delivery::Subscriptions;
use crate::error::ApiError;
use crate::mesh::{CallError, Handler, Mesh, Replier, Sender};
use crate::message::Message as AppMessage;
use crate::metrics::{HandoffLabels, Metrics};
use crate::replication::{self, Replication, Route};
use crate::subscription::StartPosition;
use crate::tenancy::Action;
use crate::topic::{Partition, Role, Topic, TopicConfig, TOPIC_NAMESPACE};
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use serde::Serialize;
use shoal_cluster::membership::Liveness;
use shoal_cluster::placement::{self, Assignment, Member, OwnedPartitionKey, PartitionKey};
use shoal_proto::{
    FetchedBatch, Message, PartitionStats, PublishEntry, PublishResult, ReplyBody, RosterMember,
    SubscriberRef, WireEntry, WireError,
};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};
use tokio::sync::watch;

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
/// Bytes of entries per hand-off chunk.
pub const CHUNK_BYTES: usize = 4 << 20;
/// Bytes of entries per fetch answer: small enough that a subscribing agent's
/// buffers stay small, large enough to carry a full fetch window of small messages.
pub const FETCH_ANSWER_BYTES: usize = 1 << 20;
/// Longest one hand-off chunk may take to be stored by the new home.
pub const HANDOFF_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause before asking a previous home again for a partition.
pub const ACQUIRE_RETRY: Duration = Duration::from_millis(200);
/// Publish requests forwarded and unanswered before more get 503.
pub const DEFAULT_MAX_FORWARDS: usize = 1024;
/// Longest a one-way message or a short call waits for its peer.
const SHORT_CALL: Duration = Duration::from_secs(5);
/// Longest a home may take to give its partition figures for `GET /v1/topics`.
pub const STATS_CALL: Duration = Duration::from_secs(2);

/// How a hand-off ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum HandOff {
    /// The new home holds the partition now (or already held a longer copy).
    Done,
    /// The new home is stopping too: the partition stays here.
    PeerStopping,
    /// Not delivered: the partition stays here.
    Failed,
}

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
    lanes: Mutex<HashMap<(SocketAddr, String), Lane>>,
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

/// File in the data directory that keeps the known members between runs.
pub const MEMBERS_FILE: &str = "mesh-members.json";

/// A member as [`MEMBERS_FILE`] keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
struct SavedMember {
    node: String,
    addr: SocketAddr,
    broker: bool,
    incarnation: u64,
    #[serde(default)]
    departed: bool,
}

impl From<RosterMember> for SavedMember {
    fn from(m: RosterMember) -> Self {
        SavedMember {
            node: m.node,
            addr: m.addr,
            broker: m.broker,
            incarnation: m.incarnation,
            departed: m.departed,
        }
    }
}

/// The contents of [`MEMBERS_FILE`].
#[derive(Debug, Default, Serialize, serde::Deserialize)]
struct SavedMembers {
    members: Vec<SavedMember>,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router").field("me", &self.me).finish()
    }
}

/// A message waiting to be stored: its index in the request, its partition, the message.
type Placed = (usize, u32, AppMessage);

/// Publish calls to one agent for one topic sent at once; more wait and go
/// together in the next call.
pub const FORWARD_CALLS_PER_LANE: usize = 4;

/// Per-message results of a forward.
type Outcomes = Vec<Result<PublishOutcome, ApiError>>;

/// A forward waiting for a call of its lane.
struct Queued {
    batch: Vec<Placed>,
    done: tokio::sync::oneshot::Sender<Outcomes>,
}

/// The calls under way to one agent for one topic and the forwards waiting.
#[derive(Default)]
struct Lane {
    calls: usize,
    queue: Vec<Queued>,
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

/// The `outcome` of a forward the home refused: `moving` when the partition
/// is between homes (the agent retries it), else `failed`.
fn forward_outcome(e: &ApiError) -> &'static str {
    if retryable(e) {
        "moving"
    } else {
        "failed"
    }
}

fn retryable(e: &ApiError) -> bool {
    matches!(
        e.code,
        "not_home" | "partition_unknown" | "topic_unknown" | "not_ready" | "not_leader"
    )
}

/// A batch and its per-message results.
type Answered = (Vec<Placed>, Vec<Result<PublishOutcome, ApiError>>);

/// Publishes a batch to replicated partitions this agent leads, one call
/// per partition, results in the batch's order.
async fn publish_replicated(
    r: &Arc<Replication>,
    topic: &Arc<Topic>,
    batch: &[Placed],
) -> Vec<Result<PublishOutcome, ApiError>> {
    let mut by_partition: BTreeMap<u32, Vec<(usize, AppMessage)>> = BTreeMap::new();
    for (n, (_, pid, m)) in batch.iter().enumerate() {
        by_partition.entry(*pid).or_default().push((n, m.clone()));
    }
    let mut out: Vec<Option<Result<PublishOutcome, ApiError>>> =
        batch.iter().map(|_| None).collect();
    let calls = by_partition.into_iter().map(|(pid, items)| async move {
        let (slots, msgs): (Vec<usize>, Vec<AppMessage>) = items.into_iter().unzip();
        (slots, r.publish_local(topic, pid, msgs).await)
    });
    for (slots, results) in join_all(calls.collect()).await {
        for (slot, result) in slots.into_iter().zip(results) {
            out[slot] = Some(result);
        }
    }
    out.into_iter()
        .map(|r| r.unwrap_or_else(|| Err(ApiError::internal("publish lost a result"))))
        .collect()
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

    /// Tells the replication shell who the members are now.
    fn share_members(&self) {
        let Some(r) = self.replication.get() else {
            return;
        };
        let members: Vec<_> = {
            let inner = lock(&self.inner);
            inner
                .known
                .iter()
                .map(|(n, k)| {
                    (
                        n.clone(),
                        k.addr,
                        k.broker,
                        k.state,
                        inner.departed.contains_key(n),
                    )
                })
                .collect()
        };
        r.set_members(&members);
    }

    /// Writes the known members to [`MEMBERS_FILE`] when they changed.
    fn save_members(&self) {
        let Some((path, last)) = &self.members_file else {
            return;
        };
        let saved = SavedMembers {
            members: Self::member_records(&lock(&self.inner))
                .into_iter()
                .filter(|m| m.node != self.me)
                .map(SavedMember::from)
                .collect(),
        };
        let Ok(text) = serde_json::to_string_pretty(&saved) else {
            return;
        };
        let mut last = lock(last);
        if *last == text {
            return;
        }
        let tmp = path.with_extension("json.tmp");
        let written =
            std::fs::write(&tmp, text.as_bytes()).and_then(|()| std::fs::rename(&tmp, path));
        match written {
            Ok(()) => *last = text,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot keep the mesh members for the next start")
            }
        }
    }

    /// Connects the router to the subscriptions, the broker's topic changes
    /// and the mesh, and follows membership.
    pub fn start(self: &Arc<Self>, subs: &Arc<Subscriptions>) {
        let _ = self.subs.set(Arc::downgrade(subs));
        let weak = Arc::downgrade(self);
        self.broker.set_topic_hook(Box::new(move |name| {
            if let Some(r) = weak.upgrade() {
                r.share_topic(name);
            }
        }));
        let weak = Arc::downgrade(self);
        self.broker.set_groups_hook(Box::new(move |topic| {
            weak.upgrade().map_or_else(Vec::new, |r| r.groups_of(topic))
        }));
        self.mesh.set_handler(self.clone());
        let mut view = self.mesh.watch();
        let router = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let Some(r) = router.upgrade() else { return };
                r.on_view();
                drop(r);
                if view.changed().await.is_err() {
                    return;
                }
            }
        });
    }

    /// Bumped whenever placement, the catalog or group membership changes.
    pub fn watch(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    fn bump(&self) {
        self.changed.send_modify(|g| *g += 1);
    }

    fn subs(&self) -> Option<Arc<Subscriptions>> {
        self.subs.get().and_then(Weak::upgrade)
    }

    fn on_view(self: &Arc<Self>) {
        let view = self.mesh.view();
        if let Some(conflict) = &view.name_conflict {
            if !self.refused.swap(true, Ordering::AcqRel) {
                self.joined.store(false, Ordering::Release);
                tracing::error!("router: {}", conflict.message());
                self.bump();
            }
            return;
        }
        {
            let mut inner = lock(&self.inner);
            for m in view.me.iter().chain(view.members.iter()) {
                if m.node.is_empty() {
                    continue;
                }
                // Two agents with one name: the one that had it first is the
                // member; the other leaves the mesh when it notices.
                let me_named = view.me.as_ref().is_some_and(|me| me.node == m.node);
                let taken = if me_named {
                    view.me.as_ref().is_some_and(|me| me.addr != m.addr)
                } else {
                    view.members
                        .iter()
                        .any(|o| crate::mesh::name_taken_by(m, o))
                };
                if taken {
                    continue;
                }
                if inner
                    .departed
                    .get(&m.node)
                    .is_some_and(|inc| m.incarnation > *inc && m.state != Liveness::Down)
                {
                    inner.departed.remove(&m.node);
                }
                let known = inner.known.get(&m.node);
                // A stale record of an older incarnation says nothing new.
                if known.is_some_and(|k| k.incarnation > m.incarnation) {
                    continue;
                }
                inner.known.insert(
                    m.node.clone(),
                    Known {
                        addr: m.addr,
                        broker: m.broker,
                        state: m.state,
                        incarnation: m.incarnation,
                    },
                );
            }
            // Members gossip forgot are down until they return.
            let listed: BTreeSet<&str> = view
                .me
                .iter()
                .chain(view.members.iter())
                .map(|m| m.node.as_str())
                .collect();
            for (node, k) in inner.known.iter_mut() {
                if !listed.contains(node.as_str()) {
                    k.state = Liveness::Down;
                }
            }
            // A down agent's consumers are gone: others take its partitions.
            let down: Vec<String> = inner
                .known
                .iter()
                .filter(|(_, k)| k.state == Liveness::Down)
                .map(|(n, _)| n.clone())
                .collect();
            for n in down {
                inner.remote_subs.remove(&n);
            }
            Self::recompute_members(&mut inner);
        }
        self.save_members();
        self.share_members();
        self.refresh_assignment();
        if view.joined && !self.joined.swap(true, Ordering::AcqRel) {
            tracing::info!("router: joined; taking up partitions");
        }
        self.reconcile();
        self.bump();
    }

    fn recompute_members(inner: &mut Inner) {
        let mut members: Vec<Member> = inner
            .known
            .iter()
            .filter(|(n, _)| !inner.departed.contains_key(*n))
            .map(|(n, k)| Member {
                id: n.clone(),
                broker: k.broker,
            })
            .collect();
        members.sort();
        inner.members = members;
    }

    /// Recomputes the balanced homes of every partition in the catalog over
    /// the current members. Every agent with the same members and catalog
    /// computes the same homes.
    fn refresh_assignment(&self) {
        let mut keys = Vec::new();
        for t in self.broker.topics() {
            for p in 0..t.partition_count() {
                keys.push(OwnedPartitionKey::new(TOPIC_NAMESPACE, &*t.name, p));
            }
        }
        let members = lock(&self.inner).members.clone();
        let without: Vec<Member> = members
            .iter()
            .filter(|m| m.id != self.me)
            .cloned()
            .collect();
        let all = Assignment::compute(&members, &keys, placement::DEFAULT_LOAD_EPSILON);
        let rest = Assignment::compute(&without, &keys, placement::DEFAULT_LOAD_EPSILON);
        let mut inner = lock(&self.inner);
        // Members changed meanwhile: the next refresh is on its way.
        if inner.members == members && inner.assignment != all {
            let mut moved = Vec::new();
            for (key, home) in all.iter() {
                if let Some(before) = inner.assignment.home(&key) {
                    if before != home {
                        moved.push(((key.topic.to_string(), key.partition), before.to_string()));
                    }
                }
            }
            inner.previous.extend(moved);
            inner.assignment = all;
            inner.assignment_without_me = rest;
        }
    }

    fn key<'a>(&'a self, topic: &'a str, partition: u32) -> PartitionKey<'a> {
        PartitionKey {
            namespace: TOPIC_NAMESPACE,
            topic,
            partition,
        }
    }

    /// The home of a partition as this agent sees it.
    pub fn home(&self, topic: &str, partition: u32) -> Home {
        let inner = lock(&self.inner);
        self.home_in(&inner, &inner.assignment, &inner.members, topic, partition)
    }

    /// The home by the balanced assignment; a partition the assignment does
    /// not know yet (a topic arriving right now) falls back to plain
    /// rendezvous hashing.
    fn home_in(
        &self,
        inner: &Inner,
        assignment: &Assignment,
        members: &[Member],
        topic: &str,
        partition: u32,
    ) -> Home {
        let key = self.key(topic, partition);
        let node = match assignment.home(&key) {
            Some(n) => n.to_string(),
            None => match placement::home(members, &key) {
                Some(m) => m.id.clone(),
                None => return Home::Nobody,
            },
        };
        if node == self.me {
            return Home::Me;
        }
        match inner.known.get(&node) {
            Some(k) if k.state != Liveness::Down => Home::Peer { addr: k.addr, node },
            _ => Home::Down { node },
        }
    }

    /// The home a partition would have without this agent (its previous home
    /// when this agent just joined, its next when it leaves).
    fn home_without_me(&self, topic: &str, partition: u32) -> Home {
        let inner = lock(&self.inner);
        let members: Vec<Member> = inner
            .members
            .iter()
            .filter(|m| m.id != self.me)
            .cloned()
            .collect();
        self.home_in(
            &inner,
            &inner.assignment_without_me,
            &members,
            topic,
            partition,
        )
    }

    fn addr_of(&self, node: &str) -> Option<SocketAddr> {
        lock(&self.inner).known.get(node).map(|k| k.addr)
    }

    /// Brings every partition's role in line with placement: partitions this
    /// agent no longer homes retire; new ones are acquired from their
    /// previous home.
    fn reconcile(self: &Arc<Self>) {
        if !self.joined.load(Ordering::Acquire) || self.stopping.load(Ordering::Acquire) {
            return;
        }
        let mut homed = 0i64;
        let mut unavailable = 0i64;
        for topic in self.broker.topics() {
            if self.replicated(&topic.name).is_some() {
                // Raft groups decide who serves these; the local copy stays unused.
                for p in topic.partitions() {
                    p.set_role(Role::Idle);
                }
                continue;
            }
            for p in topic.partitions() {
                let home = self.home(&topic.name, p.id);
                let mine = home == Home::Me;
                homed += i64::from(mine);
                unavailable += i64::from(matches!(home, Home::Down { .. } | Home::Nobody));
                match (mine, p.role()) {
                    (true, Role::Retired) => {
                        // Even a copy held here is checked with every peer
                        // first: another may hold a longer one.
                        if p.is_ephemeral() {
                            p.swap_role(Role::Retired, Role::Serving);
                        } else if p.swap_role(Role::Retired, Role::Acquiring) {
                            tokio::spawn(self.clone().acquire(topic.clone(), p.clone()));
                        }
                    }
                    (true, Role::Idle) => {
                        if p.is_ephemeral() {
                            p.swap_role(Role::Idle, Role::Serving);
                        } else if p.swap_role(Role::Idle, Role::Acquiring) {
                            tokio::spawn(self.clone().acquire(topic.clone(), p.clone()));
                        }
                    }
                    (false, Role::Serving) => {
                        let to = if p.is_ephemeral() {
                            Role::Idle
                        } else {
                            Role::Retired
                        };
                        p.swap_role(Role::Serving, to);
                    }
                    _ => {}
                }
            }
        }
        self.metrics.partitions_homed.set(homed);
        self.metrics.partitions_unavailable.set(unavailable);
    }

    /// Asks the previous home for a partition this agent now homes, until it
    /// hands it over, says it holds nothing, or this agent is home no more.
    async fn acquire(self: Arc<Self>, topic: Arc<Topic>, p: Arc<Partition>) {
        loop {
            if p.role() != Role::Acquiring || self.stopping.load(Ordering::Acquire) {
                return;
            }
            if self.home(&topic.name, p.id) != Home::Me {
                p.swap_role(Role::Acquiring, Role::Idle);
                return;
            }
            // The partition's previous home crashed with it: wait for its return.
            if let Some(node) = self.previous_home_down(&topic.name, p.id) {
                tracing::debug!(topic = %topic.name, partition = p.id, previous = %node, "waiting for the previous home to return");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            // Bounded-load placement may move a partition between any two
            // agents, so every live peer is asked: the one holding the
            // partition hands it over, the others answer that they hold nothing.
            let peers: Vec<(String, SocketAddr)> = {
                let inner = lock(&self.inner);
                inner
                    .known
                    .iter()
                    .filter(|(n, k)| {
                        **n != self.me
                            && k.state != Liveness::Down
                            && !inner.departed.contains_key(*n)
                    })
                    .map(|(n, k)| (n.clone(), k.addr))
                    .collect()
            };
            let mesh = &self.mesh;
            let asks = peers.iter().map(|(node, addr)| {
                let (name, pid) = (topic.name.to_string(), p.id);
                async move {
                    let answer = mesh
                        .call(*addr, HANDOFF_TIMEOUT * 4, |req| Message::HandoffRequest {
                            req,
                            topic: name,
                            partition: pid,
                        })
                        .await;
                    match answer {
                        Ok(Message::HandoffAck { result: Ok(()), .. }) => true,
                        Ok(Message::HandoffAck { result: Err(e), .. }) => {
                            tracing::debug!(partition = pid, peer = %node, error = %e.message, "peer not ready to hand off");
                            false
                        }
                        Ok(_) => false,
                        Err(e) => {
                            tracing::debug!(partition = pid, peer = %node, error = %e, "cannot ask a peer for a partition");
                            false
                        }
                    }
                }
            });
            let answers = join_all(asks.collect()).await;
            if answers.iter().all(|ok| *ok) {
                // Recorded before serving, so a crash from here on keeps it.
                p.set_holder(true);
                if p.swap_role(Role::Acquiring, Role::Serving) {
                    tracing::info!(topic = %topic.name, partition = p.id, "serving a partition");
                    self.bump();
                }
                return;
            }
            tokio::time::sleep(ACQUIRE_RETRY).await;
        }
    }

    /// The partition's home before the last placement change, if that agent is down now.
    fn previous_home_down(&self, topic: &str, partition: u32) -> Option<String> {
        let inner = lock(&self.inner);
        // The home before the last change seen here, and the home the others
        // give it without this agent (its previous home when this agent just
        // joined or returned).
        let candidates = [
            inner.previous.get(&(topic.to_string(), partition)).cloned(),
            inner
                .assignment_without_me
                .home(&self.key(topic, partition))
                .map(str::to_string),
        ];
        candidates.into_iter().flatten().find(|node| {
            *node != self.me
                && !inner.departed.contains_key(node)
                && inner
                    .known
                    .get(node)
                    .is_some_and(|k| k.state == Liveness::Down)
        })
    }

    /// Seals a partition this agent holds the truth of and sends its log and
    /// committed offsets to `node`. On success this agent's copy is idle; so
    /// it is when `node` answers that it holds a longer copy already.
    async fn hand_off(&self, topic: &Arc<Topic>, p: &Arc<Partition>, node: &str) -> bool {
        self.hand_off_to(topic, p, node).await == HandOff::Done
    }

    /// [`Router::hand_off`], telling a failure from a new home that is
    /// stopping too (the whole mesh stops: the partition stays here).
    async fn hand_off_to(&self, topic: &Arc<Topic>, p: &Arc<Partition>, node: &str) -> HandOff {
        let Some(addr) = self.addr_of(node) else {
            return HandOff::Failed;
        };
        let role = p.role();
        if role != Role::Serving && role != Role::Retired {
            return HandOff::Failed;
        }
        p.set_role(Role::Retired);
        let sent = self.send_partition(topic, p, addr).await;
        if sent == Err(Some("stale_copy".to_string())) {
            p.swap_role(Role::Retired, Role::Idle);
            p.set_holder(false);
            tracing::warn!(topic = %topic.name, partition = p.id, to = %node, "the new home holds a longer copy; this agent's copy is dropped from the truth");
            return HandOff::Done;
        }
        if sent == Err(Some("shutting_down".to_string())) {
            // Not a failure: with the new home stopping too (the whole mesh
            // stops), the partition stays here, retired, until this agent
            // returns. Nothing is counted as a failed hand-off.
            tracing::info!(topic = %topic.name, partition = p.id, to = %node, "the next home is stopping too; the partition stays here");
            return HandOff::PeerStopping;
        }
        let ok = sent.is_ok();
        let labels = HandoffLabels {
            direction: "sent",
            outcome: if ok { "ok" } else { "failed" },
        };
        self.metrics.handoffs.get_or_create(&labels).inc();
        if ok {
            p.swap_role(Role::Retired, Role::Idle);
            p.set_holder(false);
            tracing::info!(topic = %topic.name, partition = p.id, to = %node, "handed off a partition");
        } else {
            tracing::warn!(topic = %topic.name, partition = p.id, to = %node, "hand-off failed; keeping the partition");
        }
        if ok {
            HandOff::Done
        } else {
            HandOff::Failed
        }
    }

    async fn send_partition(
        &self,
        topic: &Arc<Topic>,
        p: &Arc<Partition>,
        addr: SocketAddr,
    ) -> Result<(), Option<String>> {
        // The receiver must know the topic before its data.
        if let Some(msg) = self.topic_message(&topic.name) {
            if self.mesh.tell(addr, msg).await.is_err() {
                return Err(None);
            }
        }
        let Ok(end_index) = p.write_now() else {
            return Err(None);
        };
        let first_index = p.first_index();
        let mut next = first_index;
        let mut reset = true;
        loop {
            let entries = match p.read(next, usize::MAX, CHUNK_BYTES) {
                Ok(e) => e,
                Err(e) => {
                    tracing::error!(topic = %topic.name, partition = p.id, error = %e, "reading a partition to hand off failed");
                    return Err(None);
                }
            };
            let last =
                entries.is_empty() || entries.last().is_some_and(|e| e.index >= p.committed());
            if let Some(e) = entries.last() {
                next = e.index + 1;
            }
            let offsets: Vec<(String, u64)> = if last {
                lock(&p.offsets)
                    .committed
                    .iter()
                    .map(|(g, o)| (g.clone(), *o))
                    .collect()
            } else {
                Vec::new()
            };
            let wire: Vec<WireEntry> = entries
                .into_iter()
                .map(|e| WireEntry {
                    index: e.index,
                    timestamp_ms: e.timestamp_ms,
                    data: e.data.to_vec(),
                })
                .collect();
            let (name, pid) = (topic.name.to_string(), p.id);
            let answer = self
                .mesh
                .call(addr, HANDOFF_TIMEOUT, |req| Message::Handoff {
                    req,
                    topic: name,
                    partition: pid,
                    reset,
                    first_index,
                    end_index,
                    entries: wire,
                    offsets,
                    last,
                })
                .await;
            match answer {
                Ok(Message::HandoffAck { result: Ok(()), .. }) => {}
                Ok(Message::HandoffAck { result: Err(e), .. }) => {
                    // A home with a longer copy, or one stopping too, is
                    // reported by the caller in its own words.
                    if e.code != "stale_copy" && e.code != "shutting_down" {
                        tracing::warn!(error = %e.message, "the new home refused a hand-off chunk");
                    }
                    return Err(Some(e.code));
                }
                Ok(_) => return Err(None),
                Err(e) => {
                    tracing::warn!(error = %e, "hand-off chunk not delivered");
                    return Err(None);
                }
            }
            reset = false;
            if last {
                return Ok(());
            }
        }
    }

    /// Graceful stop: hands every partition this agent holds to its next
    /// home, then tells every member it leaves.
    pub async fn leave(&self) {
        self.stopping.store(true, Ordering::Release);
        if let Some(r) = self.replication.get() {
            let n = r.transfer_leadership();
            if n > 0 {
                tracing::info!(
                    groups = n,
                    "handing over leadership of replicated partitions before leaving"
                );
                let until = Instant::now() + Duration::from_secs(3);
                while r.leading() > 0 && Instant::now() < until {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        let mut moved = 0usize;
        let mut kept = 0usize;
        // Kept because their next home stops too: no failure of its own.
        let mut kept_for_stopping = 0usize;
        for topic in self.broker.topics() {
            if self.replicated(&topic.name).is_some() {
                continue;
            }
            for p in topic.partitions() {
                let role = p.role();
                if role != Role::Serving && role != Role::Retired && role != Role::Acquiring {
                    continue;
                }
                if role == Role::Acquiring {
                    p.set_role(Role::Idle);
                    continue;
                }
                if p.is_ephemeral() {
                    p.set_role(Role::Idle);
                    continue;
                }
                match self.home_without_me(&topic.name, p.id) {
                    Home::Peer { node, .. } => match self.hand_off_to(&topic, &p, &node).await {
                        HandOff::Done => moved += 1,
                        HandOff::PeerStopping => {
                            kept += 1;
                            kept_for_stopping += 1;
                        }
                        HandOff::Failed => kept += 1,
                    },
                    Home::Down { node } if self.mesh.went_down_while_stopping(&node) => {
                        // It stopped along with this agent: the whole mesh stops.
                        tracing::info!(topic = %topic.name, partition = p.id, next = %node, "the next home stopped too; the partition stays here");
                        p.set_role(Role::Retired);
                        kept += 1;
                        kept_for_stopping += 1;
                    }
                    Home::Down { node } => {
                        tracing::warn!(topic = %topic.name, partition = p.id, next = %node, "the next home is down; the partition stays here until this agent returns");
                        p.set_role(Role::Retired);
                        kept += 1;
                    }
                    Home::Nobody | Home::Me => {
                        // No other broker to hand to (the others left, or
                        // this is the last one): kept for this agent's return.
                        p.set_role(Role::Retired);
                        kept += 1;
                        kept_for_stopping += 1;
                    }
                }
            }
        }
        if moved > 0 {
            tracing::info!(partitions = moved, "handed off partitions before leaving");
        }
        if kept > 0 && kept == kept_for_stopping {
            // Every next home stops too (the whole mesh stops, as on Ctrl-C
            // of `shoal dev`): nothing is lost and nothing is wrong; each
            // agent keeps its partitions for its next start.
            tracing::info!(
                partitions = kept,
                "no running agent to hand partitions to (the others stop too, or left); keeping them for this agent's next start"
            );
            return;
        }
        if kept > 0 {
            // Saying "leaving" would let others serve these partitions
            // without their data: stop as if crashed instead, so they wait
            // (503) until this agent returns.
            tracing::warn!(
                partitions = kept,
                "some partitions could not be handed off; stopping without leaving the placement"
            );
            return;
        }
        let peers: Vec<SocketAddr> = lock(&self.inner)
            .known
            .iter()
            .filter(|(n, k)| **n != self.me && k.state != Liveness::Down)
            .map(|(_, k)| k.addr)
            .collect();
        for addr in peers {
            let msg = Message::Leaving {
                node: self.me.clone(),
            };
            let _ = tokio::time::timeout(SHORT_CALL, self.mesh.tell(addr, msg)).await;
        }
    }

    // ----- publishing -----

    /// Publishes messages: each goes to its partition's home, here or on
    /// another agent; results are per message, in order.
    pub async fn publish(
        &self,
        topic_name: &str,
        messages: Vec<AppMessage>,
    ) -> Result<Vec<Result<PublishOutcome, ApiError>>, ApiError> {
        if let Some(conflict) = self.mesh.view().name_conflict {
            return Err(ApiError::unavailable(
                "name_conflict",
                conflict.message(),
                60,
            ));
        }
        let topic = self.broker.topic_or_create(topic_name)?;
        let mut results: Vec<Option<Result<PublishOutcome, ApiError>>> =
            (0..messages.len()).map(|_| None).collect();
        let mut todo: Vec<Placed> = messages
            .into_iter()
            .enumerate()
            .map(|(i, m)| (i, self.choose_live_partition(&topic, topic_name, &m), m))
            .collect();
        let repl = self.replicated(topic_name).cloned();
        let deadline =
            Instant::now() + repl.as_ref().map_or(MOVE_RETRY_WINDOW, |r| r.leader_wait());
        loop {
            let mut by_home: HashMap<Option<(String, SocketAddr)>, Vec<Placed>> = HashMap::new();
            let mut unrouted: Vec<Answered> = Vec::new();
            for (i, pid, m) in todo.drain(..) {
                let home = match &repl {
                    None => self.home(topic_name, pid),
                    Some(r) => match r.route(topic_name, pid) {
                        Route::Local => Home::Me,
                        Route::Peer { node, addr } => Home::Peer { node, addr },
                        Route::Unavailable => {
                            let e = replication::not_leader(topic_name, pid, None);
                            unrouted.push((vec![(i, pid, m)], vec![Err(e)]));
                            continue;
                        }
                    },
                };
                match home {
                    Home::Me => by_home.entry(None).or_default().push((i, pid, m)),
                    Home::Peer { node, addr } => by_home
                        .entry(Some((node, addr)))
                        .or_default()
                        .push((i, pid, m)),
                    Home::Down { node } => {
                        results[i] = Some(Err(ApiError::unavailable(
                            "home_unavailable",
                            format!("partition {pid} of topic {topic_name:?} lives on agent {node}, which is down; it is unavailable until that agent returns"),
                            5,
                        )));
                    }
                    Home::Nobody => {
                        results[i] = Some(Err(ApiError::unavailable(
                            "home_unavailable",
                            "no broker agent in the mesh can store messages",
                            5,
                        )));
                    }
                }
            }
            let mut calls = Vec::new();
            let topic = &topic;
            for (home, batch) in by_home.into_iter().flat_map(|(home, batch)| {
                split_by_bytes(batch)
                    .into_iter()
                    .map(move |b| (home.clone(), b))
            }) {
                let repl = repl.clone();
                calls.push(async move {
                    let outcome = match (&home, &repl) {
                        (None, None) => self.publish_here(topic, &batch).await,
                        (None, Some(r)) => publish_replicated(r, topic, &batch).await,
                        (Some((node, addr)), _) => {
                            let outcome = self.forward(topic, node, *addr, &batch).await;
                            if let Some(r) = &repl {
                                for ((_, pid, _), o) in batch.iter().zip(&outcome) {
                                    match o {
                                        Ok(_) => r.note_answer(&topic.name, *pid, node, true),
                                        Err(e) if e.code == "home_unavailable" => {
                                            r.suspect(node);
                                            r.note_answer(&topic.name, *pid, node, false)
                                        }
                                        Err(e) if retryable(e) => {
                                            r.note_answer(&topic.name, *pid, node, false)
                                        }
                                        Err(_) => {}
                                    }
                                }
                            }
                            outcome
                        }
                    };
                    (batch, outcome)
                });
            }
            let mut answered = join_all(calls).await;
            answered.extend(unrouted);
            let retry_allowed = Instant::now() < deadline && !self.stopping.load(Ordering::Acquire);
            for (batch, outcome) in answered {
                for ((i, pid, m), r) in batch.into_iter().zip(outcome) {
                    // A replicated partition's leader that does not answer is
                    // replaced by an election: try again (a message it stored
                    // before dying may be stored twice; `Shoal-Id` dedupes it).
                    let again = |e: &ApiError| {
                        retryable(e) || (repl.is_some() && e.code == "home_unavailable")
                    };
                    match r {
                        Err(e) if retry_allowed && again(&e) => todo.push((i, pid, m)),
                        r => results[i] = Some(r),
                    }
                }
            }
            if todo.is_empty() {
                break;
            }
            tokio::time::sleep(MOVE_RETRY_STEP).await;
        }
        let replicated = repl.is_some();
        Ok(results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(ApiError::internal("publish lost a result"))))
            .map(|r| match r {
                // The leader that did not answer is being replaced: for the
                // app it is the same as no leader (one code, whatever the timing).
                Err(e) if replicated && e.code == "home_unavailable" => Err(ApiError::unavailable(
                    "not_leader",
                    format!("no leader of this partition of topic {topic_name:?} answered within the retry window ({})", e.message),
                    1,
                )),
                r => r,
            })
            .collect())
    }

    /// A message with a key or an id keeps its partition (order per key,
    /// dedupe per id). One with neither goes round robin over the partitions
    /// whose home is not down, so a crashed agent costs apps nothing but a
    /// share of the partitions; only with every home down does it go where
    /// the counter points (and get 503).
    fn choose_live_partition(&self, topic: &Topic, name: &str, m: &AppMessage) -> u32 {
        if m.key.is_some() || m.client_id {
            return choose_partition(topic, m);
        }
        let count = topic.partition_count().max(1);
        // A replicated partition is live when it has a leader that is up (as
        // far as this agent's replica knows); another, when its home is up.
        let repl = self.replicated(name);
        let live = |p: u32| match repl {
            Some(r) => r.has_live_leader(name, p) != Some(false),
            None => !matches!(self.home(name, p), Home::Down { .. }),
        };
        let first = choose_partition(topic, m);
        if live(first) {
            return first;
        }
        (1..count)
            .map(|_| choose_partition(topic, m))
            .find(|p| live(*p))
            .unwrap_or(first)
    }

    async fn publish_here(
        &self,
        topic: &Arc<Topic>,
        batch: &[Placed],
    ) -> Vec<Result<PublishOutcome, ApiError>> {
        if !self.joined.load(Ordering::Acquire) {
            return all_failed(batch, not_ready());
        }
        let placed = batch.iter().map(|(_, p, m)| (*p, m.clone())).collect();
        self.broker.append(topic, placed).await
    }

    /// Forwards a batch to its home (a replicated partition's leader).
    /// Forwards to one agent for one topic share its lane: up to
    /// [`FORWARD_CALLS_PER_LANE`] calls at once, each sent by a task of its
    /// own that keeps taking the forwards waiting (as many as fit one
    /// frame) until none is left. Many concurrent publishes so become a few
    /// frames and proposal rounds at the leader instead of one each, and a
    /// publisher that goes away never cancels a call carrying others.
    async fn forward(
        &self,
        topic: &Arc<Topic>,
        node: &str,
        addr: SocketAddr,
        batch: &[Placed],
    ) -> Outcomes {
        // Every forward holds a permit while it waits (`--max-forwards`).
        let Ok(_permit) = self.forwards.clone().try_acquire_owned() else {
            self.count_forward("busy", batch.len());
            let e = ApiError::unavailable(
                "home_busy",
                format!("too many publishes are waiting for home agents (agent {node} among them); retry shortly"),
                1,
            );
            return all_failed(batch, e);
        };
        let key = (addr, topic.name.to_string());
        let (done, rx) = tokio::sync::oneshot::channel();
        let start_call = {
            let mut lanes = lock(&self.lanes);
            let lane = lanes.entry(key.clone()).or_default();
            lane.queue.push(Queued {
                batch: batch.to_vec(),
                done,
            });
            let start = lane.calls < FORWARD_CALLS_PER_LANE;
            if start {
                lane.calls += 1;
            }
            start
        };
        if start_call {
            match self.this.upgrade() {
                Some(router) => {
                    let (topic, node) = (topic.clone(), node.to_string());
                    tokio::spawn(async move { router.run_lane(&topic, &node, key).await });
                }
                // The router is being dropped (the agent stops): no call.
                None => {
                    return all_failed(batch, stopping());
                }
            }
        }
        match rx.await {
            Ok(outcomes) => outcomes,
            Err(_) => {
                let e = ApiError::internal("a forward to the partition's home was lost");
                all_failed(batch, e)
            }
        }
    }

    /// One call slot of a lane: sends the forwards waiting, together, until
    /// none is left.
    async fn run_lane(&self, topic: &Arc<Topic>, node: &str, key: (SocketAddr, String)) {
        loop {
            let jobs: Vec<Queued> = {
                let mut lanes = lock(&self.lanes);
                let Some(lane) = lanes.get_mut(&key) else {
                    return;
                };
                if lane.queue.is_empty() {
                    lane.calls -= 1;
                    if lane.calls == 0 {
                        lanes.remove(&key);
                    }
                    return;
                }
                let mut bytes = 0usize;
                let take = lane
                    .queue
                    .iter()
                    .take_while(|q| {
                        bytes += q.batch.iter().map(frame_bytes).sum::<usize>();
                        bytes <= FORWARD_FRAME_BYTES
                    })
                    .count()
                    .max(1);
                lane.queue.drain(..take).collect()
            };
            // Publishers that went away meanwhile are left out.
            let jobs: Vec<Queued> = jobs.into_iter().filter(|q| !q.done.is_closed()).collect();
            if jobs.is_empty() {
                continue;
            }
            let combined: Vec<Placed> = jobs.iter().flat_map(|q| q.batch.iter().cloned()).collect();
            let mut outcomes = self
                .forward_call(topic, node, key.0, &combined)
                .await
                .into_iter();
            for q in jobs {
                let mine: Outcomes = outcomes.by_ref().take(q.batch.len()).collect();
                let _ = q.done.send(mine);
            }
        }
    }

    async fn forward_call(
        &self,
        topic: &Arc<Topic>,
        node: &str,
        addr: SocketAddr,
        batch: &[Placed],
    ) -> Outcomes {
        let started = Instant::now();
        let mut entries = Vec::with_capacity(batch.len());
        let mut encoded: Vec<Option<ApiError>> = Vec::with_capacity(batch.len());
        for (_, pid, m) in batch {
            match m.encode() {
                Ok(data) => {
                    entries.push(PublishEntry {
                        partition: *pid,
                        message: data.to_vec(),
                    });
                    encoded.push(None);
                }
                Err(what) => encoded.push(Some(ApiError::bad_request(
                    "invalid_message",
                    format!("message {what} is too long"),
                ))),
            }
        }
        let name = topic.name.to_string();
        let timeout = if self.replicated(&topic.name).is_some() {
            REPLICATED_FORWARD_TIMEOUT
        } else {
            FORWARD_TIMEOUT
        };
        let answer = self
            .mesh
            .call(addr, timeout, |req| Message::Publish {
                req,
                topic: name,
                entries,
            })
            .await;
        self.metrics
            .forward_latency
            .observe(started.elapsed().as_secs_f64());
        let mut stored = match answer {
            Ok(Message::Published { results, .. }) => results.into_iter(),
            Ok(Message::Failed { error, .. }) => {
                let e = api_error(error);
                self.count_forward(forward_outcome(&e), batch.len());
                return all_failed(batch, e);
            }
            Ok(_) => {
                return all_failed(
                    batch,
                    ApiError::internal("unexpected answer from the home agent"),
                )
            }
            Err(e) => {
                self.count_forward("unreachable", batch.len());
                let err = call_error(node, &e);
                return all_failed(batch, err);
            }
        };
        let mut out = Vec::with_capacity(batch.len());
        for ((_, _, m), bad) in batch.iter().zip(encoded) {
            if let Some(e) = bad {
                out.push(Err(e));
                continue;
            }
            out.push(match stored.next() {
                Some(PublishResult::Stored {
                    partition,
                    offset,
                    duplicate,
                }) => {
                    self.count_forward("stored", 1);
                    Ok(PublishOutcome {
                        topic: topic.name.to_string(),
                        partition,
                        offset,
                        id: m.id.clone(),
                        duplicate,
                    })
                }
                Some(PublishResult::Failed(w)) => {
                    let e = api_error(w);
                    self.count_forward(forward_outcome(&e), 1);
                    Err(e)
                }
                None => Err(ApiError::internal(
                    "the home agent answered too few results",
                )),
            });
        }
        out
    }

    fn roster(&self) -> Message {
        Message::Roster {
            members: Self::member_records(&lock(&self.inner)),
        }
    }

    /// Every member known, as the roster greeting and the members file keep
    /// it (a departed member with the incarnation it left with).
    fn member_records(inner: &Inner) -> Vec<RosterMember> {
        inner
            .known
            .iter()
            .map(|(node, k)| RosterMember {
                node: node.clone(),
                addr: k.addr,
                broker: k.broker,
                incarnation: inner.departed.get(node).copied().unwrap_or(k.incarnation),
                departed: inner.departed.contains_key(node),
            })
            .collect()
    }

    /// Learns members a peer knows: down ones gossip forgot still hold their
    /// partitions, and departed ones hold none.
    fn merge_roster(self: &Arc<Self>, members: Vec<RosterMember>) {
        let mut changed = false;
        {
            let mut inner = lock(&self.inner);
            for m in members {
                if m.node.is_empty() || m.node == self.me {
                    continue;
                }
                match inner.known.get(&m.node) {
                    None => {
                        inner.known.insert(
                            m.node.clone(),
                            Known {
                                addr: m.addr,
                                broker: m.broker,
                                state: Liveness::Down,
                                incarnation: m.incarnation,
                            },
                        );
                        changed = true;
                    }
                    Some(k) if k.state == Liveness::Down && m.incarnation > k.incarnation => {
                        let state = k.state;
                        inner.known.insert(
                            m.node.clone(),
                            Known {
                                addr: m.addr,
                                broker: m.broker,
                                state,
                                incarnation: m.incarnation,
                            },
                        );
                        changed = true;
                    }
                    _ => {}
                }
                let current = inner.known.get(&m.node).map_or(0, |k| k.incarnation);
                if m.departed && m.incarnation >= current && !inner.departed.contains_key(&m.node) {
                    inner.departed.insert(m.node.clone(), m.incarnation);
                    inner.remote_subs.remove(&m.node);
                    changed = true;
                }
            }
            if changed {
                Self::recompute_members(&mut inner);
            }
        }
        if changed {
            self.save_members();
            self.refresh_assignment();
            self.reconcile();
            self.bump();
        }
    }

    /// Whether `node` is a member this agent knows at `from`.
    fn is_member_at(&self, node: &str, from: SocketAddr) -> bool {
        lock(&self.inner)
            .known
            .get(node)
            .is_some_and(|k| k.addr == from)
    }

    /// Whether `from` is the address of a member other than this agent.
    fn is_member_addr(&self, from: SocketAddr) -> bool {
        lock(&self.inner)
            .known
            .iter()
            .any(|(n, k)| *n != self.me && k.addr == from)
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

    fn count_forward(&self, outcome: &'static str, n: usize) {
        self.metrics
            .forwarded
            .get_or_create(&crate::metrics::OutcomeLabel { outcome })
            .inc_by(n as u64);
    }

    // ----- consumer groups -----

    /// The partitions of `topic` this agent's members of `group` read: the
    /// topic's partitions dealt in turn to the agents with members in the
    /// group, in node-name order, so every agent computes the same split.
    pub fn assigned(&self, topic: &str, group: &str, partitions: u32) -> Vec<u32> {
        let mut nodes: BTreeSet<String> = BTreeSet::new();
        nodes.insert(self.me.clone());
        {
            let inner = lock(&self.inner);
            for (node, r) in &inner.remote_subs {
                let alive = inner
                    .known
                    .get(node)
                    .is_some_and(|k| k.state != Liveness::Down)
                    && !inner.departed.contains_key(node);
                if alive
                    && self.may_read(&r.namespace, topic)
                    && r.subs.iter().any(|s| s.topic == topic && s.group == group)
                {
                    nodes.insert(node.clone());
                }
            }
        }
        let nodes: Vec<String> = nodes.into_iter().collect();
        let Some(me) = nodes.iter().position(|n| *n == self.me) else {
            return Vec::new();
        };
        (0..partitions)
            .filter(|p| *p as usize % nodes.len() == me)
            .collect()
    }

    /// Reads a partition at its home for a consumer group.
    pub async fn fetch(
        &self,
        topic: &str,
        partition: u32,
        group: &str,
        start: &StartPosition,
        from: Option<u64>,
        max: usize,
    ) -> Result<FetchedBatch, ApiError> {
        let target = match self.replicated(topic) {
            None => self.home(topic, partition),
            Some(r) => match r.route(topic, partition) {
                Route::Local => {
                    return r
                        .fetch_local(topic, partition, group, start, from, max, FETCH_WAIT)
                        .await
                }
                Route::Peer { node, addr } => Home::Peer { node, addr },
                Route::Unavailable => {
                    return Err(replication::not_leader(topic, partition, None));
                }
            },
        };
        let (node, addr) = match target {
            Home::Peer { node, addr } => (node, addr),
            Home::Me => return Err(not_home_here()),
            Home::Down { node } => {
                return Err(ApiError::unavailable(
                    "home_unavailable",
                    format!("agent {node} is down"),
                    5,
                ))
            }
            Home::Nobody => {
                return Err(ApiError::unavailable(
                    "home_unavailable",
                    "no broker agent",
                    5,
                ))
            }
        };
        let start = serde_json::to_string(start).unwrap_or_default();
        let (t, g) = (topic.to_string(), group.to_string());
        // A replicated partition's leader that does not answer within its
        // long poll and a little more has likely died: another is elected.
        let timeout = if self.replicated(topic).is_some() {
            FETCH_WAIT + REPLICATED_FORWARD_TIMEOUT
        } else {
            FETCH_WAIT + SHORT_CALL
        };
        let answer = self
            .mesh
            .call(addr, timeout, |req| Message::Fetch {
                req,
                topic: t,
                partition,
                group: g,
                start,
                from,
                max: u32::try_from(max).unwrap_or(u32::MAX),
                wait_ms: FETCH_WAIT.as_millis() as u32,
            })
            .await;
        if let Some(r) = self.replicated(topic) {
            // A leader too busy to answer (`peer_busy`) is still the leader.
            let ok = matches!(&answer, Ok(Message::Fetched { result: Ok(_), .. }))
                || matches!(&answer, Ok(Message::Fetched { result: Err(e), .. } | Message::Failed { error: e, .. }) if e.code == "peer_busy");
            if answer.is_err() {
                r.suspect(&node);
            }
            r.note_answer(topic, partition, &node, ok);
        }
        match answer {
            Ok(Message::Fetched { result, .. }) => result.map_err(api_error),
            Ok(Message::Failed { error, .. }) => Err(api_error(error)),
            Ok(_) => Err(ApiError::internal("unexpected answer to a fetch")),
            Err(e) => Err(call_error(&node, &e)),
        }
    }

    /// Consumer groups reading `topic` anywhere in the mesh.
    pub fn groups_of(&self, topic: &str) -> Vec<String> {
        let mut groups = self.subs().map(|s| s.groups_of(topic)).unwrap_or_default();
        {
            let inner = lock(&self.inner);
            for r in inner.remote_subs.values() {
                if !self.may_read(&r.namespace, topic) {
                    continue;
                }
                groups.extend(
                    r.subs
                        .iter()
                        .filter(|s| s.topic == topic)
                        .map(|s| s.group.clone()),
                );
            }
        }
        groups.sort();
        groups.dedup();
        groups
    }

    /// Tells a partition's home where a consumer group resumes.
    pub fn commit(self: &Arc<Self>, topic: &str, partition: u32, group: &str, next: u64) {
        if let Some(r) = self.replicated(topic) {
            r.commit(topic, partition, group, next);
            return;
        }
        let Home::Peer { addr, .. } = self.home(topic, partition) else {
            return;
        };
        let msg = Message::Commit {
            topic: topic.to_string(),
            partition,
            group: group.to_string(),
            next,
        };
        let router = self.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(SHORT_CALL, router.mesh.tell(addr, msg)).await;
        });
    }

    /// Tells every member which consumer groups this agent has members in.
    pub fn share_subscriptions(self: &Arc<Self>) {
        let msg = self.subscribers_message();
        for addr in self.peer_addrs() {
            let router = self.clone();
            let msg = msg.clone();
            tokio::spawn(async move {
                let _ = tokio::time::timeout(SHORT_CALL, router.mesh.tell(addr, msg)).await;
            });
        }
        self.bump();
    }

    fn subscribers_message(&self) -> Message {
        let mut subs: Vec<SubscriberRef> = self
            .subs()
            .map(|s| s.list())
            .unwrap_or_default()
            .into_iter()
            .map(|s| SubscriberRef {
                topic: s.topic,
                group: s.group,
                push: s.push_path.is_some(),
            })
            .collect();
        subs.sort();
        subs.dedup();
        Message::Subscribers {
            node: self.me.clone(),
            subs,
        }
    }

    fn peer_addrs(&self) -> Vec<SocketAddr> {
        lock(&self.inner)
            .known
            .iter()
            .filter(|(n, k)| **n != self.me && k.state != Liveness::Down)
            .map(|(_, k)| k.addr)
            .collect()
    }

    fn topic_message(&self, name: &str) -> Option<Message> {
        let topic = self.broker.topic(name)?;
        let config = serde_json::to_string(&topic.config()).ok()?;
        Some(Message::Topic {
            name: name.to_string(),
            config,
            version: topic.version.load(Ordering::Relaxed),
        })
    }

    fn share_topic(self: &Arc<Self>, name: &str) {
        let Some(msg) = self.topic_message(name) else {
            return;
        };
        for addr in self.peer_addrs() {
            let router = self.clone();
            let msg = msg.clone();
            tokio::spawn(async move {
                let _ = tokio::time::timeout(SHORT_CALL, router.mesh.tell(addr, msg)).await;
            });
        }
        self.refresh_assignment();
        self.reconcile();
        self.bump();
    }

    // ----- request/reply -----

    /// Sends a request to a push subscriber of `topic`: on this agent if it
    /// has one, else on another agent that does.
    pub async fn request(
        &self,
        topic: &str,
        message: AppMessage,
        timeout: Duration,
    ) -> Result<(StatusCode, HeaderMap, Bytes), ApiError> {
        let subs = self.subs().ok_or_else(stopping)?;
        if subs.has_push_subscriber(topic) {
            return subs.request(topic, message, timeout).await;
        }
        let targets: Vec<(String, SocketAddr)> = {
            let inner = lock(&self.inner);
            inner
                .remote_subs
                .iter()
                .filter(|(_, r)| {
                    self.may_read(&r.namespace, topic)
                        && r.subs.iter().any(|s| s.topic == topic && s.push)
                })
                .filter_map(|(n, _)| {
                    inner
                        .known
                        .get(n)
                        .filter(|k| k.state != Liveness::Down)
                        .map(|k| (n.clone(), k.addr))
                })
                .collect()
        };
        if targets.is_empty() {
            return subs.request(topic, message, timeout).await;
        }
        let (node, addr) =
            &targets[self.request_rr.fetch_add(1, Ordering::Relaxed) % targets.len()];
        let data = message
            .encode()
            .map_err(|what| {
                ApiError::bad_request("invalid_message", format!("message {what} is too long"))
            })?
            .to_vec();
        let t = topic.to_string();
        let answer = self
            .mesh
            .call(*addr, timeout + SHORT_CALL, |req| Message::Request {
                req,
                topic: t,
                message: data,
                timeout_ms: timeout.as_millis() as u64,
            })
            .await;
        match answer {
            Ok(Message::Reply { result: Ok(r), .. }) => {
                let status = StatusCode::from_u16(r.status).unwrap_or(StatusCode::BAD_GATEWAY);
                let mut headers = HeaderMap::new();
                for (k, v) in r.headers {
                    if let (Ok(k), Ok(v)) = (HeaderName::try_from(k), HeaderValue::try_from(v)) {
                        headers.append(k, v);
                    }
                }
                Ok((status, headers, Bytes::from(r.body)))
            }
            Ok(Message::Reply { result: Err(e), .. }) | Ok(Message::Failed { error: e, .. }) => {
                Err(api_error(e))
            }
            Ok(_) => Err(ApiError::internal("unexpected answer to a request")),
            Err(e) => Err(ApiError::unavailable(
                "no_subscriber",
                format!("the subscriber's agent {node} does not answer ({e})"),
                1,
            )),
        }
    }

    // ----- the cluster view -----

    /// Partitions of every topic and their homes, for `GET /v1/cluster`.
    pub fn partition_view(&self) -> Vec<PartitionView> {
        let mut out = Vec::new();
        for topic in self.broker.topics() {
            if let Some(r) = self.replicated(&topic.name) {
                for p in topic.partitions() {
                    let (home, available) = match r.route(&topic.name, p.id) {
                        Route::Local => (self.me.clone(), true),
                        Route::Peer { node, .. } => (node, true),
                        Route::Unavailable => (String::new(), false),
                    };
                    out.push(PartitionView {
                        topic: topic.name.to_string(),
                        partition: p.id,
                        home,
                        available,
                        role: "replicated",
                    });
                }
                continue;
            }
            for p in topic.partitions() {
                let (home, available) = match self.home(&topic.name, p.id) {
                    Home::Me => (self.me.clone(), p.role() == Role::Serving),
                    Home::Peer { node, .. } => (node, true),
                    Home::Down { node } => (node, false),
                    Home::Nobody => (String::new(), false),
                };
                out.push(PartitionView {
                    topic: topic.name.to_string(),
                    partition: p.id,
                    home,
                    available,
                    role: p.role().as_str(),
                });
            }
        }
        out
    }

    /// Figures (offsets, size) of every partition of `topics`, as their
    /// homes have them: this agent's own for partitions it serves, asked of
    /// the other homes over the mesh (one call per topic and home, all at
    /// once) for the rest. A home that is down or does not answer within
    /// [`STATS_CALL`] leaves this agent's copy's figures, marked as not from
    /// the home.
    pub async fn topics_stats(&self, topics: &[Arc<Topic>]) -> Vec<Vec<PartitionFigures>> {
        let mut out: Vec<Vec<PartitionFigures>> = Vec::with_capacity(topics.len());
        let mut calls = Vec::new();
        for (ti, topic) in topics.iter().enumerate() {
            let mut figures = Vec::new();
            let mut ask: BTreeMap<(String, SocketAddr), Vec<u32>> = BTreeMap::new();
            let repl = self.replicated(&topic.name);
            for p in topic.partitions() {
                let target = match repl {
                    None => self.home(&topic.name, p.id),
                    Some(r) => match r.route(&topic.name, p.id) {
                        Route::Local => {
                            figures.push(PartitionFigures {
                                stats: r
                                    .stats(&topic.name, p.id)
                                    .unwrap_or_else(|| local_stats(&p)),
                                home: self.me.clone(),
                                from_home: true,
                            });
                            continue;
                        }
                        Route::Peer { node, addr } => Home::Peer { node, addr },
                        Route::Unavailable => Home::Nobody,
                    },
                };
                let (home, from_home) = match target {
                    Home::Me => (self.me.clone(), p.role() == Role::Serving),
                    Home::Peer { node, addr } => {
                        ask.entry((node.clone(), addr)).or_default().push(p.id);
                        (node, false)
                    }
                    Home::Down { node } => (node, false),
                    Home::Nobody => (String::new(), false),
                };
                figures.push(PartitionFigures {
                    stats: local_stats(&p),
                    home,
                    from_home,
                });
            }
            out.push(figures);
            for ((node, addr), partitions) in ask {
                let mesh = self.mesh.clone();
                let name = topic.name.to_string();
                // Spawned, so every home is asked at once.
                let call = tokio::spawn(async move {
                    mesh.call(addr, STATS_CALL, |req| Message::Stats {
                        req,
                        topic: name,
                        partitions,
                    })
                    .await
                });
                calls.push((ti, node, call));
            }
        }
        for (ti, node, call) in calls {
            let stats = match call.await {
                Ok(Ok(Message::StatsAnswer {
                    result: Ok(stats), ..
                })) => stats,
                Ok(Err(e)) => {
                    tracing::debug!(peer = %node, error = %e, "cannot ask a home for its partition figures");
                    continue;
                }
                _ => continue,
            };
            let Some(figures) = out.get_mut(ti) else {
                continue;
            };
            for st in stats {
                if let Some(f) = figures
                    .iter_mut()
                    .find(|f| f.stats.partition == st.partition && f.home == node)
                {
                    f.stats = st;
                    f.from_home = true;
                }
            }
        }
        out
    }

    fn serve_stats(self: Arc<Self>, req: u64, topic: String, partitions: Vec<u32>, reply: Replier) {
        tokio::spawn(async move {
            let repl = self.replicated(&topic).cloned();
            let stats = self.broker.topic(&topic).map_or_else(Vec::new, |t| {
                if let Some(r) = &repl {
                    return partitions
                        .into_iter()
                        .filter_map(|id| r.stats(&topic, id))
                        .collect();
                }
                partitions
                    .into_iter()
                    .filter_map(|id| t.partition(id))
                    .filter(|p| p.role() == Role::Serving && self.home(&topic, p.id) == Home::Me)
                    .map(|p| local_stats(&p))
                    .collect()
            });
            reply.send(Message::StatsAnswer {
                req,
                result: Ok(stats),
            });
        });
    }

    /// Nodes that left gracefully and have not returned.
    pub fn departed(&self) -> Vec<String> {
        lock(&self.inner).departed.keys().cloned().collect()
    }

    // ----- serving peers -----

    fn serve_publish(
        self: Arc<Self>,
        topic: String,
        entries: Vec<PublishEntry>,
        reply: Replier,
        req: u64,
    ) {
        tokio::spawn(async move {
            let fail = |e: ApiError| PublishResult::Failed(wire_error(&e));
            let Some(t) = self.broker.topic(&topic) else {
                let e = ApiError::unavailable(
                    "topic_unknown",
                    format!("topic {topic:?} is not known here yet"),
                    1,
                );
                reply.send(publish_refused(req, &entries, &e));
                return;
            };
            let repl = self.replicated(&topic).cloned();
            let mut results: Vec<Option<PublishResult>> = Vec::with_capacity(entries.len());
            let mut placed = Vec::with_capacity(entries.len());
            for e in entries {
                if repl.is_none() && self.home(&topic, e.partition) != Home::Me {
                    results.push(Some(fail(crate::broker::not_home(&topic, e.partition))));
                    continue;
                }
                match AppMessage::decode(&Bytes::from(e.message)) {
                    Ok(m) => {
                        results.push(None);
                        placed.push((e.partition, m));
                    }
                    Err(err) => {
                        self.count_invalid("undecodable_message");
                        results.push(Some(fail(ApiError::bad_request(
                            "invalid_message",
                            format!("undecodable forwarded message: {err}"),
                        ))))
                    }
                }
            }
            let stored = if placed.is_empty() {
                Vec::new()
            } else if let Some(r) = &repl {
                let batch: Vec<Placed> = placed.into_iter().map(|(p, m)| (0, p, m)).collect();
                publish_replicated(r, &t, &batch).await
            } else {
                self.broker.append(&t, placed).await
            };
            let mut stored = stored.into_iter();
            let results = results
                .into_iter()
                .map(|r| {
                    r.unwrap_or_else(|| match stored.next() {
                        Some(Ok(o)) => PublishResult::Stored {
                            partition: o.partition,
                            offset: o.offset,
                            duplicate: o.duplicate,
                        },
                        Some(Err(e)) => fail(e),
                        None => fail(ApiError::internal("missing result")),
                    })
                })
                .collect();
            reply.send(Message::Published { req, results });
        });
    }

    #[allow(clippy::too_many_arguments)]
    fn serve_fetch(
        self: Arc<Self>,
        req: u64,
        topic: String,
        partition: u32,
        group: String,
        start: String,
        from: Option<u64>,
        max: u32,
        wait_ms: u32,
        reply: Replier,
    ) {
        tokio::spawn(async move {
            let result = self
                .fetch_here(&topic, partition, &group, &start, from, max, wait_ms)
                .await
                .map_err(|e| wire_error(&e));
            self.metrics.fetches_served.inc();
            reply.send(Message::Fetched { req, result });
        });
    }

    #[allow(clippy::too_many_arguments)]
    async fn fetch_here(
        &self,
        topic: &str,
        partition: u32,
        group: &str,
        start: &str,
        from: Option<u64>,
        max: u32,
        wait_ms: u32,
    ) -> Result<FetchedBatch, ApiError> {
        if let Some(r) = self.replicated(topic) {
            let start: StartPosition = serde_json::from_str(start).unwrap_or_default();
            let wait = Duration::from_millis(u64::from(wait_ms)).min(FETCH_WAIT);
            return r
                .fetch_local(topic, partition, group, &start, from, max as usize, wait)
                .await;
        }
        let t = self.broker.topic(topic).ok_or_else(|| {
            ApiError::unavailable(
                "topic_unknown",
                format!("topic {topic:?} is not known here yet"),
                1,
            )
        })?;
        let p = t.partition(partition).ok_or_else(|| {
            ApiError::unavailable("partition_unknown", "no such partition here yet", 1)
        })?;
        if p.role() != Role::Serving || self.home(topic, partition) != Home::Me {
            return Err(crate::broker::not_home(topic, partition));
        }
        let start_at = match from {
            // An ephemeral partition restarts its offsets when it moves: a
            // reader ahead of its end resumes at the end.
            Some(f) if p.is_ephemeral() && f > p.committed() + 1 => p.committed() + 1,
            Some(f) => f,
            None => {
                let start: StartPosition = serde_json::from_str(start).unwrap_or_default();
                crate::delivery::start_offset(&p, group, &start, false)
            }
        };
        let max = (max as usize).clamp(1, 4096);
        let mut changed = t.changed.subscribe();
        let deadline =
            tokio::time::Instant::now() + Duration::from_millis(u64::from(wait_ms)).min(FETCH_WAIT);
        loop {
            let entries = match p.read(start_at, max, FETCH_ANSWER_BYTES) {
                Ok(e) => e,
                // Gone (retention, or an ephemeral ring that moved on): the
                // answer says where the partition starts now, at once.
                Err(shoal_storage::StorageError::Compacted { .. }) => Vec::new(),
                Err(e) => return Err(ApiError::internal(format!("reading the partition: {e}"))),
            };
            if !entries.is_empty()
                || start_at < p.first_index()
                || tokio::time::Instant::now() >= deadline
                || p.role() != Role::Serving
            {
                return Ok(FetchedBatch {
                    start: start_at,
                    first_index: p.first_index(),
                    entries: entries
                        .into_iter()
                        .map(|e| WireEntry {
                            index: e.index,
                            timestamp_ms: e.timestamp_ms,
                            data: e.data.to_vec(),
                        })
                        .collect(),
                });
            }
            if tokio::time::timeout_at(deadline, changed.changed())
                .await
                .is_err()
            {
                continue;
            }
        }
    }

    fn serve_handoff_request(
        self: Arc<Self>,
        req: u64,
        from: SocketAddr,
        topic: String,
        partition: u32,
        reply: Replier,
    ) {
        tokio::spawn(async move {
            let result = async {
                // A topic or partition unknown here is one this agent holds nothing of.
                let Some(t) = self.broker.topic(&topic) else {
                    return Ok(());
                };
                let Some(p) = t.partition(partition) else {
                    return Ok(());
                };
                // Only the agent this agent's own view makes home may take
                // the partition, or hear that nothing is held here: until the
                // views agree, the answer is to wait.
                let requester = match self.home(&topic, partition) {
                    Home::Peer { node, addr } if addr == from => node,
                    _ => {
                        return Err(ApiError::unavailable(
                            "not_ready",
                            "this agent does not see the requester as the partition's home yet",
                            1,
                        ))
                    }
                };
                match p.role() {
                    Role::Idle => return Ok(()),
                    Role::Acquiring => {
                        return Err(ApiError::unavailable(
                            "not_ready",
                            "this agent is still acquiring the partition",
                            1,
                        ))
                    }
                    Role::Serving | Role::Retired => {}
                }
                if self.hand_off(&t, &p, &requester).await {
                    Ok(())
                } else {
                    Err(ApiError::unavailable(
                        "not_ready",
                        "the hand-off failed; retry",
                        1,
                    ))
                }
            }
            .await;
            reply.send(Message::HandoffAck {
                req,
                result: result.map_err(|e| wire_error(&e)),
            });
        });
    }

    #[allow(clippy::too_many_arguments)]
    fn serve_handoff(
        self: Arc<Self>,
        req: u64,
        topic: String,
        partition: u32,
        reset: bool,
        (first_index, end_index): (u64, u64),
        entries: Vec<WireEntry>,
        offsets: Vec<(String, u64)>,
        last: bool,
        reply: Replier,
    ) {
        tokio::task::spawn_blocking(move || {
            let result = (|| {
                let t = self
                    .broker
                    .topic(&topic)
                    .ok_or_else(|| ApiError::unavailable("topic_unknown", "unknown topic", 1))?;
                let p = t.partition(partition).ok_or_else(|| {
                    ApiError::unavailable("partition_unknown", "unknown partition", 1)
                })?;
                if self.stopping.load(Ordering::Acquire) {
                    return Err(ApiError::unavailable(
                        "shutting_down",
                        "this agent is stopping and takes no partitions",
                        1,
                    ));
                }
                // Logs only grow, so of two copies the longer is the newer: a
                // shorter one (say, an empty copy an agent served while alone)
                // never replaces it.
                let local_end = p.committed();
                if reset
                    && (end_index < local_end
                        || (p.role() == Role::Serving && end_index == local_end))
                {
                    return Err(ApiError::conflict(
                        "stale_copy",
                        format!("this agent holds a longer copy (to offset {local_end}) than the one offered (to {end_index})"),
                    ));
                }
                if p.role() == Role::Serving {
                    tracing::error!(topic = %topic, partition, local_end, end_index, "two agents hold diverging copies of a partition; keeping this one");
                    return Err(ApiError::conflict(
                        "already_serving",
                        "this agent already serves the partition",
                    ));
                }
                let entries = entries
                    .into_iter()
                    .map(|e| shoal_storage::Entry {
                        index: e.index,
                        term: 0,
                        timestamp_ms: e.timestamp_ms,
                        data: Bytes::from(e.data),
                    })
                    .collect();
                self.broker
                    .apply_handoff(&t, &p, reset, first_index, entries)
                    .map_err(|e| ApiError::internal(e.to_string()))?;
                if last {
                    {
                        let mut o = lock(&p.offsets);
                        o.committed = offsets.into_iter().collect();
                        o.dirty = true;
                    }
                    // The truth lives here now: serve it if home, else hold
                    // it. A home still acquiring serves once every peer has
                    // answered, so a longer copy elsewhere can still win.
                    p.set_holder(true);
                    let role = if p.role() == Role::Acquiring {
                        Role::Acquiring
                    } else if self.home(&topic, partition) == Home::Me {
                        Role::Serving
                    } else {
                        Role::Retired
                    };
                    p.set_role(role);
                    self.metrics
                        .handoffs
                        .get_or_create(&HandoffLabels {
                            direction: "received",
                            outcome: "ok",
                        })
                        .inc();
                    tracing::info!(topic = %topic, partition, role = role.as_str(), "received a partition");
                }
                Ok(())
            })();
            if let Err(e) = &result {
                // Refusing because this agent stops too is expected when the
                // whole mesh stops: the sender keeps the partition.
                if e.code == "shutting_down" {
                    tracing::debug!(topic = %topic, partition, "refused a hand-off chunk: stopping");
                } else {
                    tracing::warn!(topic = %topic, partition, error = %e.message, "refused a hand-off chunk");
                }
                self.metrics
                    .handoffs
                    .get_or_create(&HandoffLabels {
                        direction: "received",
                        outcome: "failed",
                    })
                    .inc();
            }
            reply.send(Message::HandoffAck {
                req,
                result: result.map_err(|e| wire_error(&e)),
            });
            self.bump();
        });
    }

    fn serve_request(
        self: Arc<Self>,
        req: u64,
        topic: String,
        message: Vec<u8>,
        timeout_ms: u64,
        reply: Replier,
    ) {
        tokio::spawn(async move {
            let result = async {
                let subs = self
                    .subs()
                    .ok_or_else(|| ApiError::unavailable("shutting_down", "stopping", 1))?;
                let m = AppMessage::decode(&Bytes::from(message))
                    .map_err(|e| ApiError::bad_request("invalid_message", e.to_string()))?;
                let timeout =
                    Duration::from_millis(timeout_ms).min(crate::subscription::MAX_ACK_TIMEOUT);
                let (status, headers, body) = subs.request(&topic, m, timeout).await?;
                if body.len() > MAX_REPLY_BYTES {
                    return Err(ApiError::new(
                        StatusCode::BAD_GATEWAY,
                        "reply_too_large",
                        format!("the subscriber's reply is larger than {MAX_REPLY_BYTES} bytes"),
                    ));
                }
                Ok::<_, ApiError>(ReplyBody {
                    status: status.as_u16(),
                    headers: headers
                        .iter()
                        .filter_map(|(k, v)| {
                            v.to_str().ok().map(|v| (k.to_string(), v.to_string()))
                        })
                        .collect(),
                    body: body.to_vec(),
                })
            }
            .await;
            reply.send(Message::Reply {
                req,
                result: result.map_err(|e| wire_error(&e)),
            });
        });
    }
}

/// Bytes of messages per forwarded publish frame: big batches go in several,
/// well under the frame limit.
const FORWARD_FRAME_BYTES: usize = 8 << 20;
/// Largest reply body carried back across the mesh.
pub const MAX_REPLY_BYTES: usize = 16 << 20;

/// What a message takes of a forward frame: its payload and room for its
/// headers and framing.
fn frame_bytes(placed: &Placed) -> usize {
    placed.2.payload.len() + 512
}

/// Splits messages bound for one home into batches that each fit a frame.
fn split_by_bytes(batch: Vec<Placed>) -> Vec<Vec<Placed>> {
    let mut out = vec![Vec::new()];
    let mut bytes = 0usize;
    for placed in batch {
        let size = frame_bytes(&placed);
        if bytes + size > FORWARD_FRAME_BYTES && out.last().is_some_and(|b| !b.is_empty()) {
            out.push(Vec::new());
            bytes = 0;
        }
        bytes += size;
        if let Some(last) = out.last_mut() {
            last.push(placed);
        }
    }
    out
}

/// The answer to a forwarded publish refused as a whole: `e` for every entry.
fn publish_refused(req: u64, entries: &[PublishEntry], e: &ApiError) -> Message {
    let e = wire_error(e);
    Message::Published {
        req,
        results: entries
            .iter()
            .map(|_| PublishResult::Failed(e.clone()))
            .collect(),
    }
}

/// The same error for every message of `batch`.
fn all_failed(batch: &[Placed], e: ApiError) -> Outcomes {
    batch.iter().map(|_| Err(e.clone())).collect()
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

/// A partition's figures for `GET /v1/topics`, and where they come from.
#[derive(Clone, Debug)]
pub struct PartitionFigures {
    /// Offsets and size.
    pub stats: PartitionStats,
    /// The home agent's node name (empty when no agent can be home).
    pub home: String,
    /// True when the figures are the home's; false when they are this
    /// agent's copy because the home could not be asked.
    pub from_home: bool,
}

/// A partition's figures as this agent's copy has them.
pub fn local_stats(p: &Partition) -> PartitionStats {
    let (bytes, segments) = p.storage_size();
    PartitionStats {
        partition: p.id,
        first_offset: p.first_index(),
        next_offset: p.committed() + 1,
        bytes,
        segments: segments as u64,
    }
}

/// A partition and its home, for `GET /v1/cluster`.
#[derive(Clone, Debug, Serialize)]
pub struct PartitionView {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: u32,
    /// Home agent's node name.
    pub home: String,
    /// Whether publishes to it can be stored now.
    pub available: bool,
    /// This agent's role for it.
    pub role: &'static str,
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

/// Mesh addresses of the members `data_dir`'s [`MEMBERS_FILE`] keeps from
/// the last run (not this agent, not those that left).
pub fn saved_member_addrs(data_dir: &std::path::Path, me: &str) -> Vec<SocketAddr> {
    load_members(&data_dir.join(MEMBERS_FILE))
        .members
        .into_iter()
        .filter(|m| m.node != me && !m.departed)
        .map(|m| m.addr)
        .collect()
}

/// Reads [`MEMBERS_FILE`]; a missing or unreadable file is an empty list
/// (this agent then learns its members from gossip, as on a first start).
fn load_members(path: &std::path::Path) -> SavedMembers {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return SavedMembers::default(),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot read the mesh members kept from the last run; starting without them");
            return SavedMembers::default();
        }
    };
    serde_json::from_str(&text).unwrap_or_else(|e| {
        tracing::warn!(path = %path.display(), error = %e, "the mesh members kept from the last run are unreadable; starting without them");
        SavedMembers::default()
    })
}
