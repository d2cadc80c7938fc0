//! Replicated partitions: the agent's I/O shell around `shoal-replica`.
//!
//! A durable topic with `replicas` of 2 or more keeps each partition in a
//! Raft group ([`shoal_replica::Driver`] over [`DiskStore`]s under
//! `DATA_DIR/replicas/`). This module owns the driver: it ticks it, steps
//! the batches peers send, sends the batches it hands out over the mesh,
//! answers publishes once their entry is committed, and serves consumer
//! groups from the leader up to the commit index.
//!
//! **Who creates a group.** Every first voter of a Raft group must start
//! from the same configuration, so exactly one agent may create each group.
//! That decision is made by a small Raft group of its own, the *meta group*
//! (`shoal-system/__meta/0`, up to [`META_VOTERS`] broker agents): its
//! leader sees a replicated partition in the topic catalog that has no
//! creation record, and proposes one naming itself. The first record for a
//! partition to commit wins; the agent it names creates the group as its
//! only voter and then adds the replicas placement wants (learner, catch up,
//! one joint-consensus swap). Publishes wait until the group has them.
//!
//! The meta group itself is created by the agent started without `--join`
//! (the first agent of a mesh; `etcd --initial-cluster-state new` plays the
//! same part); every other agent joins it when its leader adds it.

use crate::broker::{Broker, PublishOutcome};
use crate::error::ApiError;
use crate::mesh::Mesh;
use crate::message::Message as AppMessage;
use crate::metrics::Metrics;
use crate::subscription::StartPosition;
use crate::topic::{FsyncPolicy, Retention, Topic, TopicConfig, TopicKind, TOPIC_NAMESPACE};
use serde::{Deserialize, Serialize};
use shoal_cluster::membership::Liveness;
use shoal_cluster::placement::{self, Member, PartitionKey};
use shoal_proto::raft::RaftBatch;
use shoal_proto::{FetchedBatch, Message, WireEntry};
use shoal_replica::command::Command;
use shoal_replica::disk::{DiskStore, SyncPolicy};
use shoal_replica::state::{Applied, DEFAULT_DEDUPE_WINDOW_MS};
use shoal_replica::store::LogStore;
use shoal_replica::{node_id, Bootstrap, Driver, DriverConfig, Event, GroupId, NodeId};
use shoal_storage::LogConfig;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::{oneshot, watch};

/// The namespace of the meta group.
pub const META_NAMESPACE: &str = "shoal-system";
/// The meta group's topic name (not a topic apps can name: names may not
/// start with an underscore).
pub const META_TOPIC: &str = "__meta";
/// Voters of the meta group, at most.
pub const META_VOTERS: usize = 5;
/// Folder of the replicated partitions inside the data directory.
pub const REPLICAS_DIR: &str = "replicas";
/// Longest a publish waits for its entry to commit.
pub const PROPOSAL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a publish keeps looking for a partition's leader (a failover,
/// a group still forming) before the app gets 503 with `Retry-After`.
pub const DEFAULT_LEADER_WAIT: Duration = Duration::from_secs(5);
/// Consumer offsets go through the log at most this often per group and
/// partition (the newest one wins); a failover redelivers at most this much.
pub const COMMIT_EVERY_TICKS: u64 = 5;
/// How often the meta leader looks for partitions without a group, and
/// every agent re-reads placement for the groups it holds.
const RECONCILE_EVERY_TICKS: u64 = 5;

/// How long a new meta leader waits for its group to take in every voter
/// placement wants before it founds partitions' groups anyway: 10 ticks
/// (2 s), well inside the 5 s a publish waits for a leader.
const FOUNDING_WAIT_TICKS: u64 = 10;
/// How often (in ticks: 10 s, as for topics of one copy) every replica
/// applies its topic's `maxBytes`. A pass reads only sizes kept in memory,
/// and a log past its limit drops whole segments.
const SIZE_RETENTION_EVERY_TICKS: u64 = 50;
/// How often (in ticks: a minute) every replica applies its topic's
/// `maxAge`. A log with an expired message is read to find the cut, which
/// moves the log's start by whole messages (a state write), so a partition
/// that expires messages all the time does it once a minute.
const AGE_RETENTION_EVERY_TICKS: u64 = 300;
/// Ticks (5 s) before a leader proposes a group's dedupe window again when
/// the last proposal has not been applied.
const WINDOW_RETRY_TICKS: u64 = 25;
/// Ticks (30 s) before leadership of a group is handed to placement's
/// first choice again after a try.
const TRANSFER_BACKOFF_TICKS: u64 = 150;
/// File listing the groups this agent created, so a restart that replays
/// the meta log never creates one twice.
const CREATED_FILE: &str = "created.json";

/// Wakes the driver's thread: at most one wake-up is pending at a time.
#[derive(Debug)]
struct Waker {
    tx: std::sync::mpsc::SyncSender<()>,
    rx: Mutex<std::sync::mpsc::Receiver<()>>,
}

impl Waker {
    fn new() -> Self {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        Waker {
            tx,
            rx: Mutex::new(rx),
        }
    }

    /// Asks for a round now (a full queue means one is already asked for).
    fn wake(&self) {
        let _ = self.tx.try_send(());
    }

    /// Waits until woken (true) or `timeout` passed (false).
    fn wait(&self, timeout: Duration) -> bool {
        lock(&self.rx).recv_timeout(timeout).is_ok()
    }
}

/// How an agent's replication starts.
#[derive(Debug, Clone)]
pub struct ReplicationSettings {
    /// This agent's node name.
    pub me: String,
    /// The data directory (groups live in `REPLICAS_DIR` inside).
    pub data_dir: PathBuf,
    /// The first agent of a mesh (started without `--join`, or the one the
    /// identity service calls the founder): creates the meta group when new.
    pub seed: bool,
    /// How long an agent may be down before its replicas move (`--replace-after`).
    pub replace_after: Duration,
    /// How often groups of `interval` topics fsync (`--fsync-interval`).
    pub fsync_interval: Duration,
    /// How each replica's log is cut into segments (`--segment-bytes`).
    pub log: LogConfig,
}

/// Whether a topic's partitions are Raft groups.
pub fn is_replicated(config: &TopicConfig) -> bool {
    config.kind == TopicKind::Durable && config.replicas >= 2
}

/// A decision of the meta group (postcard, in a message entry's body).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
enum MetaRecord {
    /// Creates the partition's group. With a `bootstrapper`, that agent
    /// creates it as its only voter (records of agents before founders).
    /// With an empty `bootstrapper`, the body goes on with [`Founders`]:
    /// an agent that cannot read them (an older one, in a rolling upgrade)
    /// still sees the partition as recorded and founds nothing of its own.
    Create {
        namespace: String,
        topic: String,
        partition: u32,
        bootstrapper: String,
        /// The bootstrapper's run (its start time): a record is acted on
        /// only by the run that proposed it, never by a later run replaying
        /// the meta log (it may have created the group and lost it since).
        incarnation: u64,
    },
}

/// The first voters of a partition's group, after a [`MetaRecord::Create`]
/// without a bootstrapper: meta voters that create the group together,
/// each as one of its first voters, so it does not hang on one agent
/// surviving its first seconds. Each acts only in the run (incarnation)
/// named beside it, never in a later run replaying the meta log; the
/// others elect without it, and it joins back as any replica does.
type Founders = Vec<(NodeId, u64)>;

/// Fewest founders worth naming: with fewer, one that does not create its
/// replica would leave the rest without a majority, so the meta leader
/// founds the group alone, as before founders.
const MIN_FOUNDERS: usize = 3;

/// A partition: namespace, topic, number.
type PartitionKey3 = (String, String, u32);

/// The body of a creation record for `key`: naming `founders` when there
/// are at least [`MIN_FOUNDERS`], else `me` (run `incarnation`) alone.
fn creation_record(
    key: &PartitionKey3,
    founders: &Founders,
    me: &str,
    incarnation: u64,
) -> Result<Vec<u8>, postcard::Error> {
    let record = |bootstrapper: String, incarnation| MetaRecord::Create {
        namespace: key.0.clone(),
        topic: key.1.clone(),
        partition: key.2,
        bootstrapper,
        incarnation,
    };
    if founders.len() >= MIN_FOUNDERS {
        let mut body = postcard::to_allocvec(&record(String::new(), 0))?;
        body.extend(postcard::to_allocvec(founders)?);
        Ok(body)
    } else {
        postcard::to_allocvec(&record(me.to_owned(), incarnation))
    }
}

/// Reads a creation record: its partition, and the first voters of the
/// group if the agent `me` (`me_id`, run `incarnation`) is to create its
/// replica now. `None`: not a creation record.
fn read_creation_record(
    body: &[u8],
    me: &str,
    me_id: NodeId,
    incarnation: u64,
) -> Option<(PartitionKey3, Option<Vec<NodeId>>)> {
    let (record, rest) = postcard::take_from_bytes::<MetaRecord>(body).ok()?;
    let MetaRecord::Create {
        namespace,
        topic,
        partition,
        bootstrapper,
        incarnation: run,
    } = record;
    let first_voters = if bootstrapper.is_empty() {
        // Unreadable founders found nothing here (the partition is still
        // recorded, so nobody founds it twice).
        let founders: Founders = postcard::from_bytes(rest).unwrap_or_default();
        founders
            .contains(&(me_id, incarnation))
            .then(|| founders.iter().map(|(id, _)| *id).collect())
    } else {
        (bootstrapper == me && run == incarnation).then(|| vec![me_id])
    };
    Some(((namespace, topic, partition), first_voters))
}

/// Where a partition's publishes and reads go now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// This agent leads the partition's group.
    Local,
    /// Try this agent (the leader as far as known, else a replica).
    Peer {
        /// Node name.
        node: String,
        /// Mesh address.
        addr: SocketAddr,
    },
    /// Nobody to ask yet (no broker, or the group is still forming).
    Unavailable,
}

/// A publish or read that this agent cannot serve because it does not lead.
pub fn not_leader(topic: &str, partition: u32, leader: Option<&str>) -> ApiError {
    ApiError::unavailable(
        "not_leader",
        match leader {
            Some(l) => format!(
                "this agent does not lead partition {partition} of topic {topic:?}; {l} does"
            ),
            None => format!(
                "partition {partition} of topic {topic:?} has no leader right now (an election or a group forming); retry shortly"
            ),
        },
        1,
    )
}

fn leader_lost(topic: &str, partition: u32) -> ApiError {
    ApiError::unavailable(
        "not_leader",
        format!("the leader of partition {partition} of topic {topic:?} changed before the message was stored; it was not stored, retry"),
        1,
    )
}

struct Waiter {
    tx: oneshot::Sender<Result<(u64, Applied), ApiError>>,
}

#[derive(Default)]
struct Peers {
    /// Raft id → node name and address.
    by_id: HashMap<NodeId, (String, SocketAddr)>,
    /// Node name → address.
    addrs: HashMap<String, SocketAddr>,
    /// Broker members placement counts (down ones included until they leave).
    members: Vec<Member>,
    /// Members gossip says are down.
    down: BTreeSet<String>,
    /// Since when each down member has been down (this agent's clock).
    down_since: HashMap<String, std::time::Instant>,
    /// Bumped whenever the members change (placement may then differ).
    epoch: u64,
    /// The agent a publish to a partition tried last and its answer.
    hints: HashMap<(String, u32), Hint>,
}

#[derive(Clone, Debug)]
enum Hint {
    /// This agent led the partition when last asked.
    Leader(String),
    /// These agents did not lead it; try the next.
    Skip(usize),
}

struct Core {
    driver: Driver<DiskStore>,
    waiters: HashMap<u64, Waiter>,
    next_token: u64,
    /// Meta log applied up to here (this run).
    meta_applied: u64,
    /// Partitions with a creation record.
    records: BTreeSet<(String, String, u32)>,
    /// How many of them each topic has (a topic with all its partitions
    /// recorded is passed over without a lookup per partition).
    recorded: HashMap<String, u32>,
    /// The tick this agent's meta replica last saw a new leader.
    meta_lead_since: u64,
    /// Creation records proposed by this agent as meta leader, not yet applied.
    proposed: BTreeSet<(String, String, u32)>,
    /// Groups this agent created (kept in [`CREATED_FILE`]).
    created: BTreeSet<String>,
    /// Consumer offsets waiting to go through the log.
    pending_commits: BTreeMap<(String, u32, String), u64>,
    /// When (in ticks) leadership of a group was last handed to
    /// placement's first choice: a target that cannot take it (it is
    /// catching up, or cut off one way) is not asked again for a while, as
    /// a leader refuses publishes while a transfer is under way.
    transferred_at: HashMap<GroupId, u64>,
    /// Groups led here already reported as under-replicated.
    under_warned: BTreeSet<GroupId>,
    /// Hibernating groups placement has nothing to do for, with what they
    /// add to the gauges: skipped by [`Replication::place_all`] until the
    /// members, the topic's replicas or the group change.
    settled: HashMap<GroupId, Settled>,
    /// When (in ticks) a group's dedupe window was last proposed here.
    window_proposed: HashMap<GroupId, u64>,
    /// Groups this agent began to lead: each states its topic's dedupe
    /// window once in its term, unless it is the default (a replica of an
    /// agent that predates `Window` entries, or restored from its manifest,
    /// may hold the default while the log says otherwise).
    window_due: BTreeSet<GroupId>,
    ticks: u64,
}

/// A hibernating group as [`Replication::place_all`] last found it: its
/// voters are the wanted ones and its leader is placement's first choice
/// (or another agent leads it).
struct Settled {
    /// [`Peers::epoch`] then.
    epoch: u64,
    /// The topic's replicas then.
    asked: u32,
    /// [`shoal_replica::group::Group::asleep_at`] then.
    asleep_at: (u64, u64),
    under: bool,
    leaderless: bool,
}

/// The replicated partitions of one agent.
pub struct Replication {
    me: String,
    me_id: NodeId,
    root: PathBuf,
    mesh: Arc<Mesh>,
    broker: Arc<Broker>,
    metrics: Arc<Metrics>,
    core: Mutex<Core>,
    peers: Mutex<Peers>,
    /// Wakes the driver's thread for a round now (a proposal, a peer's batch).
    wake: Waker,
    /// Bumped after every round, so readers waiting for entries look again.
    round: watch::Sender<u64>,
    leader_wait: Duration,
    replace_after: Duration,
    /// How often groups of `interval` topics fsync (`--fsync-interval`).
    fsync_interval: Duration,
    /// How each replica's log is cut into segments.
    log: LogConfig,
    /// The driver's thread, once started.
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// This run of the agent (its start time, ms).
    incarnation: u64,
    /// Transfers in parts being put together, by sender.
    assembling: Mutex<HashMap<SocketAddr, Assembly>>,
    /// The id of this agent's next transfer in parts.
    next_transfer: Arc<std::sync::atomic::AtomicU64>,
    /// Peers a transfer in parts is on its way to.
    sending: Arc<Mutex<std::collections::HashSet<SocketAddr>>>,
}

impl std::fmt::Debug for Replication {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replication")
            .field("me", &self.me)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn meta_group() -> GroupId {
    GroupId {
        namespace: META_NAMESPACE.into(),
        topic: META_TOPIC.into(),
        partition: 0,
    }
}

/// Whether `g` is the meta group (without building one to compare).
fn is_meta(g: &GroupId) -> bool {
    g.partition == 0 && g.topic == META_TOPIC && g.namespace == META_NAMESPACE
}

fn group_dir(root: &Path, g: &GroupId) -> PathBuf {
    root.join(&g.namespace)
        .join(&g.topic)
        .join(g.partition.to_string())
}

fn group_label(g: &GroupId) -> String {
    shoal_replica::group_name(g)
}

/// Bytes of entry data per `Raft` frame: well under the mesh's frame limit,
/// so many groups appending at once in one round still go out.
const MAX_BATCH_DATA: usize = 4 << 20;

/// Past this estimate a frame goes in [`Message::RaftPart`]s: a snapshot of
/// a partition holding more than a frame's worth (17 MiB) would otherwise
/// never reach a new replica.
const PART_THRESHOLD: usize = 8 << 20;

/// Bytes per [`Message::RaftPart`].
const PART_BYTES: usize = 8 << 20;

/// How long a peer gets no other transfer in parts, per part queued.
const PART_PACE: Duration = Duration::from_secs(1);

/// Most bytes of parts held for transfers not yet complete, over all peers:
/// a snapshot larger than this (a partition retaining more) cannot be
/// received, and the replica is not added (logged, and counted as
/// `raft_transfer_too_large`).
pub const MAX_TRANSFER_BYTES: usize = 256 << 20;

/// How long a transfer in parts may take to come whole; past it, what
/// was put together is dropped (its sender died or gave up).
const ASSEMBLY_TIMEOUT: Duration = Duration::from_secs(60);

/// Set in this agent's Raft incarnation (its start time otherwise): it
/// reads creation records that name founders, so a meta leader names it as
/// one. An older agent in a rolling upgrade is never named: it would not
/// create its replica, and two such founders of three would leave the
/// group without a majority.
pub const KNOWS_FOUNDERS: u64 = 1 << 62;

/// A transfer in parts from one peer, being put together.
struct Assembly {
    transfer: u64,
    parts: u32,
    next: u32,
    bytes: Vec<u8>,
    started: std::time::Instant,
}

/// Marks a peer as having a transfer in parts on its way, until dropped:
/// one at a time per peer, so parts of two transfers never interleave on
/// the link and a slow link does not pile up copies of a snapshot.
struct Sending {
    peers: Arc<Mutex<std::collections::HashSet<SocketAddr>>>,
    addr: SocketAddr,
}

impl Sending {
    fn start(
        peers: &Arc<Mutex<std::collections::HashSet<SocketAddr>>>,
        addr: SocketAddr,
    ) -> Option<Self> {
        lock(peers).insert(addr).then(|| Sending {
            peers: peers.clone(),
            addr,
        })
    }
}

impl Drop for Sending {
    fn drop(&mut self) {
        lock(&self.peers).remove(&self.addr);
    }
}

/// The frames one batch goes out in: itself, or, when it is too large for
/// a frame, its postcard in parts.
fn raft_frames(batch: RaftBatch, transfer: u64) -> Vec<Message> {
    if batch.groups.iter().map(batch_bytes).sum::<usize>() <= PART_THRESHOLD {
        return vec![Message::Raft(batch)];
    }
    let encoded = match postcard::to_allocvec(&batch) {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(error = %e, "cannot encode a raft batch; not sent");
            return Vec::new();
        }
    };
    if encoded.len() <= PART_BYTES {
        // The estimate was high: it fits one frame.
        return vec![Message::Raft(batch)];
    }
    if encoded.len() > MAX_TRANSFER_BYTES {
        // No peer would take it: not queued at all (the leader asks again).
        tracing::debug!(
            bytes = encoded.len(),
            "a raft batch (a snapshot) is larger than any agent takes; not sent"
        );
        return Vec::new();
    }
    let parts = encoded.len().div_ceil(PART_BYTES);
    let Ok(count) = u32::try_from(parts) else {
        return Vec::new();
    };
    encoded
        .chunks(PART_BYTES)
        .enumerate()
        .map(|(i, c)| Message::RaftPart {
            transfer,
            part: i as u32,
            parts: count,
            bytes: c.to_vec(),
        })
        .collect()
}

/// About how many bytes a group's messages take on the wire.
fn batch_bytes(gm: &shoal_proto::raft::GroupMessages) -> usize {
    use shoal_proto::raft::EntryPayload;
    gm.messages
        .iter()
        .map(|m| {
            64 + m
                .entries
                .iter()
                .map(|e| match &e.payload {
                    EntryPayload::Normal(d) => d.len() + 24,
                    EntryPayload::ConfChange(_) => 128,
                })
                .sum::<usize>()
                + m.snapshot.as_ref().map_or(0, |s| s.data.len())
        })
        .sum()
}

/// Splits one round's batch to a peer into frames of at most
/// [`MAX_BATCH_DATA`] bytes of entries and snapshots (a single group's
/// messages larger than that still go alone).
fn split_batch(batch: RaftBatch) -> Vec<RaftBatch> {
    let incarnation = batch.incarnation;
    let mut out: Vec<RaftBatch> = Vec::new();
    let mut current = RaftBatch {
        incarnation,
        groups: Vec::new(),
    };
    let mut bytes = 0;
    for gm in batch.groups {
        let n = batch_bytes(&gm);
        if !current.groups.is_empty() && bytes + n > MAX_BATCH_DATA {
            out.push(std::mem::replace(
                &mut current,
                RaftBatch {
                    incarnation,
                    groups: Vec::new(),
                },
            ));
            bytes = 0;
        }
        bytes += n;
        current.groups.push(gm);
    }
    out.push(current);
    out
}

/// A store opener for the driver (a group this agent joins).
fn opener(
    root: PathBuf,
    broker: Arc<Broker>,
    log: LogConfig,
) -> shoal_replica::driver::NewStore<DiskStore> {
    Box::new(move |g: &GroupId| {
        // A peer names the group: its names become directories here.
        if !valid_group(g) {
            return Err(shoal_replica::store::StoreError::Io(format!(
                "refused a group with an invalid name: {:?}/{:?}/{}",
                g.namespace, g.topic, g.partition
            )));
        }
        let mut store = DiskStore::open(&group_dir(&root, g), log.clone())?;
        store.set_sync_policy(sync_policy_of(&broker, g))?;
        Ok(store)
    })
}

/// How a group's writes reach the disk: its topic's fsync policy. The meta
/// group, and a group whose topic this agent does not know yet, sync every
/// write (the safe side until the topic arrives).
fn sync_policy_of(broker: &Broker, g: &GroupId) -> SyncPolicy {
    if is_meta(g) || g.namespace != TOPIC_NAMESPACE {
        return SyncPolicy::Always;
    }
    match broker.topic(&g.topic).map(|t| t.config().fsync) {
        Some(FsyncPolicy::Interval) => SyncPolicy::Interval,
        Some(FsyncPolicy::Never) => SyncPolicy::Never,
        Some(FsyncPolicy::Always) | None => SyncPolicy::Always,
    }
}

/// Whether a group's names are safe as directory names: the meta group, or
/// a namespace and topic that follow the naming rule.
fn valid_group(g: &GroupId) -> bool {
    is_meta(g)
        || (crate::names::validate("namespace", &g.namespace).is_ok()
            && crate::names::validate_full("topic", &g.topic).is_ok())
}

impl Replication {
    /// Opens the replicated partitions kept in `data_dir` and, on the first
    /// agent of a mesh (`seed`: started without `--join`), creates the meta
    /// group when none is kept.
    pub fn open(
        settings: ReplicationSettings,
        mesh: Arc<Mesh>,
        broker: Arc<Broker>,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Replication>, String> {
        let ReplicationSettings {
            me,
            data_dir,
            seed,
            replace_after,
            fsync_interval,
            log,
        } = settings;
        let data_dir = data_dir.as_path();
        let root = data_dir.join(REPLICAS_DIR);
        // Only an agent that was never part of a mesh founds one: a seed
        // whose meta replica moved away (or was removed) must not start a
        // second meta group on its next start.
        let fresh = !root.exists();
        std::fs::create_dir_all(&root)
            .map_err(|e| format!("cannot create {}: {e}", root.display()))?;
        let me_id = node_id(&me);
        let incarnation = crate::time::now_ms() | KNOWS_FOUNDERS;
        let config = DriverConfig {
            incarnation,
            seed: fastrand::u64(..),
            ..DriverConfig::default()
        };
        let mut driver = Driver::new(
            me_id,
            config,
            opener(root.clone(), broker.clone(), log.clone()),
        );
        let mut opened = 0usize;
        for g in Self::kept_groups(&root) {
            let dir = group_dir(&root, &g);
            if !dir.join(shoal_replica::disk::STATE_FILE).exists() {
                // Created on a message and never written: nothing to keep.
                let _ = std::fs::remove_dir_all(&dir);
                continue;
            }
            match DiskStore::open(&dir, log.clone()) {
                Ok(store) => match driver.open_group(g.clone(), store, Bootstrap::Restart) {
                    Ok(()) => opened += 1,
                    Err(e) => {
                        tracing::error!(group = %group_label(&g), error = %e, "cannot reopen a replica; it stays closed")
                    }
                },
                Err(e) => {
                    tracing::error!(group = %group_label(&g), error = %e, "cannot open a replica's files; it stays closed")
                }
            }
        }
        let meta = meta_group();
        if driver.group(&meta).is_none() && seed && !fresh {
            tracing::info!("this agent was started without --join but was part of a mesh before: it does not found a new one (it waits for the others to reach it)");
        }
        if driver.group(&meta).is_none() && seed && fresh {
            let store = DiskStore::open(&group_dir(&root, &meta), log.clone())
                .map_err(|e| format!("cannot create the meta group: {e}"))?;
            driver
                .open_group(meta.clone(), store, Bootstrap::Voters(vec![me_id]))
                .map_err(|e| format!("cannot create the meta group: {e}"))?;
            tracing::info!("created the mesh's meta group (this agent was started without --join)");
        }
        let created = std::fs::read(root.join(CREATED_FILE))
            .ok()
            .and_then(|b| serde_json::from_slice::<BTreeSet<String>>(&b).ok())
            .unwrap_or_default();
        tracing::info!(replicas = opened, "replicated partitions opened");
        Ok(Arc::new(Replication {
            me,
            me_id,
            root,
            mesh,
            broker,
            metrics,
            core: Mutex::new(Core {
                driver,
                waiters: HashMap::new(),
                next_token: 1,
                meta_applied: 0,
                records: BTreeSet::new(),
                recorded: HashMap::new(),
                meta_lead_since: 0,
                proposed: BTreeSet::new(),
                created,
                pending_commits: BTreeMap::new(),
                transferred_at: HashMap::new(),
                under_warned: BTreeSet::new(),
                settled: HashMap::new(),
                window_proposed: HashMap::new(),
                window_due: BTreeSet::new(),
                ticks: 0,
            }),
            peers: Mutex::new(Peers::default()),
            wake: Waker::new(),
            round: watch::Sender::new(0),
            leader_wait: DEFAULT_LEADER_WAIT,
            replace_after,
            fsync_interval,
            log,
            thread: Mutex::new(None),
            incarnation,
            assembling: Mutex::new(HashMap::new()),
            // Unique across runs: a receiver never mistakes a new run's
            // transfer for the middle of an old one.
            next_transfer: Arc::new(std::sync::atomic::AtomicU64::new(
                crate::time::now_ms() << 20,
            )),
            sending: Arc::new(Mutex::new(std::collections::HashSet::new())),
        }))
    }

    /// Groups kept under `root`: `NAMESPACE/TOPIC/PARTITION` folders.
    fn kept_groups(root: &Path) -> Vec<GroupId> {
        let mut out = Vec::new();
        let dirs = |p: &Path| -> Vec<(String, PathBuf)> {
            std::fs::read_dir(p)
                .map(|rd| {
                    rd.flatten()
                        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                        .filter_map(|e| Some((e.file_name().into_string().ok()?, e.path())))
                        .collect()
                })
                .unwrap_or_default()
        };
        for (ns, ns_dir) in dirs(root) {
            for (topic, topic_dir) in dirs(&ns_dir) {
                for (p, _) in dirs(&topic_dir) {
                    if let Ok(partition) = p.parse::<u32>() {
                        out.push(GroupId {
                            namespace: ns.clone(),
                            topic: topic.clone(),
                            partition,
                        });
                    }
                }
            }
        }
        out
    }

    /// How long a publish looks for a leader.
    pub fn leader_wait(&self) -> Duration {
        self.leader_wait
    }

    /// Starts the driver's loop; it ends when `stop` turns true (see
    /// [`Replication::join`]).
    pub fn start(self: &Arc<Self>, stop: watch::Receiver<bool>) {
        let this = self.clone();
        let runtime = tokio::runtime::Handle::current();
        // Its own thread: a round writes and fsyncs every group it touched,
        // which must not hold up the runtime's workers (the mesh, the app API).
        let spawned = std::thread::Builder::new()
            .name("shoal-replica".into())
            .spawn(move || {
                let _runtime = runtime.enter();
                let tick = Duration::from_millis(shoal_replica::driver::DEFAULT_TICK_MS);
                let mut next_tick = std::time::Instant::now() + tick;
                let mut next_flush = std::time::Instant::now() + this.fsync_interval;
                loop {
                    if *stop.borrow() {
                        // What `interval` topics left in the page cache goes
                        // to disk before the agent exits.
                        lock(&this.core).driver.flush_stores();
                        return;
                    }
                    let now = std::time::Instant::now();
                    if now >= next_flush {
                        lock(&this.core).driver.flush_stores();
                        next_flush = now + this.fsync_interval;
                    }
                    if now >= next_tick {
                        next_tick = now + tick;
                        this.round(true);
                    } else if this.wake.wait(next_tick.min(next_flush) - now) {
                        this.round(false);
                    }
                }
            });
        match spawned {
            Ok(handle) => *lock(&self.thread) = Some(handle),
            Err(e) => {
                tracing::error!(error = %e, "cannot start the replication thread; replicated partitions stay unavailable")
            }
        }
    }

    /// Waits (blocking) until the driver's thread has ended, after its stop
    /// signal: it flushes the stores of `interval` topics on its way out.
    pub fn join(&self) {
        self.wake.wake();
        let handle = lock(&self.thread).take();
        if let Some(handle) = handle {
            if handle.join().is_err() {
                tracing::error!("the replication thread panicked");
            }
        }
    }

    /// A round for new work (a proposal, a peer's batch): on the caller's
    /// task when it writes only to the OS, which saves the hand-off to the
    /// driver's thread on every step of a commit; on that thread when it
    /// could block on the disk (a store with work that fsyncs every round:
    /// `always` topics, the meta group; a snapshot; a new term or vote). A
    /// state write every `COMMIT_WRITE_STRIDE` commits and a membership
    /// change still fsync inline: rare, and one small file.
    fn round_now(&self) {
        // Busy (another round under way): the driver's thread takes it.
        let Ok(core) = self.core.try_lock() else {
            self.wake.wake();
            return;
        };
        if core
            .driver
            .round_may_block(|s| s.sync_policy() == SyncPolicy::Always)
        {
            drop(core);
            self.wake.wake();
        } else {
            self.round_in(core, false);
        }
    }

    /// One round: tick (if due), process every group, send what it hands out.
    fn round(&self, ticked: bool) {
        self.round_in(lock(&self.core), ticked);
    }

    fn round_in(&self, mut core: MutexGuard<'_, Core>, ticked: bool) {
        let (outbox, removed) = {
            if ticked {
                core.driver.tick();
                core.ticks += 1;
                if core.ticks.is_multiple_of(RECONCILE_EVERY_TICKS) {
                    // Publishers that gave up (their entry neither committed
                    // nor dropped in time) leave nothing behind.
                    core.waiters.retain(|_, w| !w.tx.is_closed());
                    self.propose_missing(&mut core);
                    self.place_all(&mut core);
                    self.apply_sync_policies(&mut core);
                    self.propose_windows(&mut core);
                }

                if core.ticks.is_multiple_of(COMMIT_EVERY_TICKS) {
                    self.flush_commits(&mut core);
                }
                if core.ticks.is_multiple_of(SIZE_RETENTION_EVERY_TICKS) {
                    let by_age = core.ticks.is_multiple_of(AGE_RETENTION_EVERY_TICKS);
                    self.enforce_retention(&mut core, by_age);
                }
            }
            let outbox = core.driver.process();
            let removed = self.handle_events(&mut core);
            self.apply_meta(&mut core);
            if ticked {
                // Counted over every group: once a tick, not on every
                // publish's round.
                self.metrics
                    .replica_groups
                    .set(core.driver.groups().count() as i64);
                self.metrics
                    .replica_leading
                    .set(core.driver.leading() as i64);
                self.metrics
                    .replica_hibernating
                    .set(core.driver.hibernating() as i64);
            }
            (outbox, removed)
        };
        drop(core);
        for dir in removed {
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot delete a removed replica's files");
            }
        }
        self.round.send_modify(|r| *r += 1);
        if outbox.is_empty() {
            return;
        }
        let peers = lock(&self.peers);
        for (to, batch) in outbox {
            let Some((name, addr)) = peers.by_id.get(&to).cloned() else {
                tracing::debug!(
                    to,
                    "no address for a replica peer yet; its batch waits for the next round"
                );
                continue;
            };
            let mesh = self.mesh.clone();
            let transfers = self.next_transfer.clone();
            let sending = self.sending.clone();
            tokio::spawn(async move {
                // In order, one frame after the other, each under the frame limit.
                for part in split_batch(batch) {
                    let transfer = transfers.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let frames = raft_frames(part, transfer);
                    let parts = frames.len();
                    let one_at_a_time = if parts > 1 {
                        let Some(guard) = Sending::start(&sending, addr) else {
                            // Another transfer to this peer is on its way;
                            // the leader sends this snapshot again later.
                            tracing::debug!(peer = %name, "a raft transfer to this peer is under way; this one waits");
                            continue;
                        };
                        Some(guard)
                    } else {
                        None
                    };
                    for frame in frames {
                        // A part may take a while behind other traffic.
                        let sent =
                            tokio::time::timeout(Duration::from_secs(10), mesh.tell(addr, frame))
                                .await;
                        if !matches!(sent, Ok(Ok(()))) {
                            tracing::debug!(peer = %name, "raft batch not delivered");
                            return;
                        }
                    }
                    if let Some(guard) = one_at_a_time {
                        // Queued is not sent: the peer gets no other
                        // transfer for a second per part (8 MiB/s at
                        // least), so resent snapshots never pile up in
                        // the link's queue.
                        tokio::spawn(async move {
                            tokio::time::sleep(PART_PACE * parts as u32).await;
                            drop(guard);
                        });
                    }
                }
            });
        }
    }

    fn handle_events(&self, core: &mut Core) -> Vec<PathBuf> {
        let mut removed = Vec::new();
        for event in core.driver.take_events() {
            match event {
                Event::Committed {
                    token,
                    index,
                    applied,
                    ..
                } => {
                    if let Some(w) = core.waiters.remove(&token) {
                        let _ = w.tx.send(Ok((index, applied)));
                    }
                }
                Event::Dropped { group, token } => {
                    if let Some(w) = core.waiters.remove(&token) {
                        let _ = w.tx.send(Err(leader_lost(&group.topic, group.partition)));
                    }
                }
                Event::Leader {
                    group,
                    leader,
                    term,
                } => {
                    self.metrics.replica_leader_changes.inc();
                    if leader == Some(self.me_id) {
                        tracing::info!(group = %group_label(&group), term, "leading");
                        if !is_meta(&group) {
                            core.window_due.insert(group.clone());
                        }
                    }
                    if is_meta(&group) {
                        core.proposed.clear();
                        core.meta_lead_since = core.ticks;
                    }
                }
                Event::Removed { group } => {
                    tracing::info!(group = %group_label(&group), "replica removed from its group; deleting its files");
                    core.settled.remove(&group);
                    core.driver.remove_group(&group);
                    removed.push(group_dir(&self.root, &group));
                }
                Event::Refused { from, reason } => {
                    self.metrics
                        .mesh_invalid_messages
                        .get_or_create(&crate::metrics::ReasonLabel { reason })
                        .inc();
                    tracing::debug!(from, reason, "refused a raft message");
                }
                Event::BadEntry {
                    group,
                    index,
                    reason,
                } => {
                    tracing::error!(group = %group_label(&group), index, reason = %reason, "skipped an unreadable entry");
                }
                Event::Failed { group, reason } => {
                    tracing::error!(group = %group_label(&group), reason = %reason, "replica stopped on an error; reopening it");
                    core.settled.remove(&group);
                    core.driver.remove_group(&group);
                    let dir = group_dir(&self.root, &group);
                    match DiskStore::open(&dir, self.log.clone()) {
                        Ok(store) => {
                            if let Err(e) =
                                core.driver
                                    .open_group(group.clone(), store, Bootstrap::Restart)
                            {
                                tracing::error!(group = %group_label(&group), error = %e, "cannot reopen the replica");
                            }
                        }
                        Err(e) => {
                            tracing::error!(group = %group_label(&group), error = %e, "cannot reopen the replica's files")
                        }
                    }
                }
                Event::Applied { .. } => {}
            }
        }
        removed
    }

    /// Reads the meta log's newly applied records and acts on the ones that
    /// name this agent.
    fn apply_meta(&self, core: &mut Core) {
        let meta = meta_group();
        let Some(g) = core.driver.group(&meta) else {
            return;
        };
        let applied = g.state().applied();
        if applied <= core.meta_applied {
            return;
        }
        let from = (core.meta_applied + 1).max(g.store().first_index());
        let entries = match g.store().entries(from, applied + 1, u64::MAX) {
            Ok(e) => e,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the meta log");
                return;
            }
        };
        core.meta_applied = applied;
        let mut to_create = Vec::new();
        for e in entries {
            let Ok(Command::Message { body, .. }) = Command::decode(&e.data) else {
                continue;
            };
            let Some((key, first_voters)) =
                read_creation_record(body, &self.me, self.me_id, self.incarnation)
            else {
                tracing::error!(index = e.index, "unreadable meta record; skipped");
                continue;
            };
            core.proposed.remove(&key);
            if core.records.contains(&key) {
                continue;
            }
            *core.recorded.entry(key.1.clone()).or_default() += 1;
            core.records.insert(key.clone());
            if let Some(voters) = first_voters {
                to_create.push((key, voters));
            }
        }
        for ((namespace, topic, partition), voters) in to_create {
            // Placement's first choice leads from the start: no election
            // timeout to wait out, no hand-over afterwards.
            let preferred = voters.first() == Some(&self.me_id) && voters.len() > 1;
            let g = GroupId {
                namespace,
                topic,
                partition,
            };
            let label = group_label(&g);
            if core.created.contains(&label) || core.driver.group(&g).is_some() {
                continue;
            }
            // Recorded before the group exists: a crash in between leaves a
            // partition without a group (an operator can see it), never two.
            core.created.insert(label.clone());
            if let Err(e) = shoal_storage::meta::write_atomic(
                &self.root.join(CREATED_FILE),
                &serde_json::to_vec(&core.created).unwrap_or_default(),
            ) {
                tracing::error!(error = %e, "cannot record a created group; not creating it");
                core.created.remove(&label);
                continue;
            }
            let store = match DiskStore::open(&group_dir(&self.root, &g), self.log.clone()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(group = %label, error = %e, "cannot create a replica's files");
                    continue;
                }
            };
            match core
                .driver
                .open_group(g.clone(), store, Bootstrap::Voters(voters))
            {
                Ok(()) => {
                    tracing::info!(group = %label, "created the partition's group");
                    if preferred {
                        if let Err(e) = core.driver.campaign(&g) {
                            tracing::debug!(group = %label, error = %e, "could not campaign at once; the election timeout will");
                        }
                    }
                    self.place(core, &g);
                }
                Err(e) => tracing::error!(group = %label, error = %e, "cannot create the group"),
            }
        }
    }

    /// Retention on every replica held here: messages older than the
    /// topic's `maxAge` (when `by_age`), and the oldest whole segments while
    /// the replica holds more than `maxBytes`, go (each replica on its own;
    /// a replica that falls behind the leader's log start catches up from a
    /// snapshot).
    fn enforce_retention(&self, core: &mut Core, by_age: bool) {
        let now = crate::time::now_ms();
        let mut retention_of: HashMap<&str, Option<Retention>> = HashMap::new();
        // Only logs past a limit are read: sizes and oldest times are in memory.
        let mut due = Vec::new();
        for (g, grp) in core.driver.iter() {
            if is_meta(g) {
                continue;
            }
            let retention = *retention_of
                .entry(g.topic.as_str())
                .or_insert_with(|| self.broker.topic(&g.topic).map(|t| t.config().retention));
            let Some(retention) = retention else {
                continue;
            };
            let log = grp.store().log();
            let age_cutoff = retention
                .max_age
                .filter(|_| by_age)
                .map(|age| now.saturating_sub(age.as_millis() as u64))
                .filter(|cutoff| log.has_entries_older_than(*cutoff));
            let size_cut = retention
                .max_bytes
                .filter(|max| log.size_bytes() > *max)
                .map(|max| log.index_to_fit(max));
            if age_cutoff.is_some() || size_cut.is_some() {
                due.push((g.clone(), age_cutoff, size_cut.unwrap_or(0)));
            }
        }
        for (g, age_cutoff, size_cut) in due {
            let Some(grp) = core.driver.group(&g) else {
                continue;
            };
            let first = grp.store().first_index();
            let age_cut = match age_cutoff.map(|c| grp.store().log().index_at_time(c)) {
                None => 0,
                Some(Ok(i)) => i,
                Some(Err(e)) => {
                    tracing::warn!(group = %group_label(&g), error = %e, "retention could not read the log");
                    continue;
                }
            };
            let keep_from = age_cut.max(size_cut);
            if keep_from <= first {
                continue;
            }
            let segments = grp.store().log().segment_count();
            let result = core.driver.compact(&g, keep_from);
            let dropped = core.driver.group(&g).map_or(0, |grp| {
                segments.saturating_sub(grp.store().log().segment_count())
            });
            self.metrics
                .retention_deleted_segments
                .inc_by(dropped as u64);
            match result {
                Ok(()) => {
                    tracing::debug!(group = %group_label(&g), keep_from, dropped, "retention moved the log's start")
                }
                Err(e) => {
                    self.metrics
                        .storage_errors
                        .get_or_create(&crate::metrics::OpLabel { op: "retention" })
                        .inc();
                    tracing::warn!(group = %group_label(&g), error = %e, "retention failed")
                }
            }
        }
    }

    /// As meta leader: proposes a creation record for every replicated
    /// partition of the catalog that has none.
    fn propose_missing(&self, core: &mut Core) {
        let meta = meta_group();
        let Some(meta_status) = core
            .driver
            .status(&meta)
            .filter(|s| s.serving && s.leader == Some(self.me_id))
        else {
            return;
        };
        let meta_voters = meta_status.voters;
        // A new mesh's meta group is still taking in its voters: founding
        // waits for them (briefly), so a topic created in the first second
        // of a mesh gets several founders, not just the first agent.
        // Waiting helps only when it can bring enough founders.
        let (whole, could_have_founders) = {
            let peers = lock(&self.peers);
            let mut wanted = self.wanted(&peers, &meta, &meta_voters);
            wanted.sort_unstable();
            wanted.dedup();
            let enough = wanted.len() >= MIN_FOUNDERS;
            (
                meta_status.learners.is_empty() && wanted == meta_voters,
                enough,
            )
        };
        if !whole && could_have_founders && core.ticks < core.meta_lead_since + FOUNDING_WAIT_TICKS
        {
            return;
        }
        // The first voters come from the meta voters that are up and whose
        // run is known (a record names each voter's run).
        let peers = lock(&self.peers);
        let runs: HashMap<NodeId, u64> = meta_voters
            .iter()
            .filter_map(|v| {
                if *v == self.me_id {
                    return self.broker_eligible().then_some((*v, self.incarnation));
                }
                let (name, _) = peers.by_id.get(v)?;
                if peers.down.contains(name) || !peers.members.iter().any(|m| m.id == *name) {
                    return None;
                }
                let run = core
                    .driver
                    .peer_incarnation(*v)
                    .filter(|run| run & KNOWS_FOUNDERS != 0)?;
                Some((*v, run))
            })
            .collect();
        for topic in self.broker.topics() {
            if core.recorded.get(&*topic.name).copied().unwrap_or(0) >= topic.partition_count() {
                continue;
            }
            if !is_replicated(&topic.config()) {
                continue;
            }
            for partition in 0..topic.partition_count() {
                let key = (
                    TOPIC_NAMESPACE.to_owned(),
                    topic.name.to_string(),
                    partition,
                );
                if core.records.contains(&key) || core.proposed.contains(&key) {
                    continue;
                }
                // Founders only when the replicas placement wants over every
                // member are all founders at hand (in placement's order):
                // otherwise the group would change its voters (and leader)
                // right after forming, while apps publish; the meta leader
                // then founds it alone, as before, and placement grows it.
                let wanted = self.wanted(&peers, &self.group_id(&key.1, partition), &[]);
                let voters: Founders = wanted
                    .iter()
                    .map(|id| runs.get(id).map(|run| (*id, *run)))
                    .collect::<Option<_>>()
                    .unwrap_or_default();
                let body = creation_record(&key, &voters, &self.me, self.incarnation);
                let Ok(body) = body else {
                    continue;
                };
                let data = match (Command::Message {
                    timestamp_ms: crate::time::now_ms(),
                    id: None,
                    body: &body,
                })
                .encode()
                {
                    Ok(d) => d,
                    Err(_) => continue,
                };
                match core.driver.propose(&meta, 0, data) {
                    Ok(_) => {
                        core.proposed.insert(key);
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "meta proposal refused");
                        return;
                    }
                }
            }
        }
    }

    /// The voters placement wants for `g`: the top `replicas` brokers (the
    /// meta group: the top [`META_VOTERS`]).
    ///
    /// A member that is down keeps its place among them for
    /// `--replace-after` only if it is already a voter (`voters`): a down
    /// agent is never added, so a group forms and grows with live agents.
    fn wanted(&self, peers: &Peers, g: &GroupId, voters: &[NodeId]) -> Vec<NodeId> {
        let r = if is_meta(g) {
            META_VOTERS
        } else {
            match self.broker.topic(&g.topic) {
                Some(t) => t.config().replicas as usize,
                None => return Vec::new(),
            }
        };
        let now = std::time::Instant::now();
        let mut members: Vec<Member> = peers
            .members
            .iter()
            .filter(|m| {
                peers.down_since.get(&m.id).is_none_or(|since| {
                    now.duration_since(*since) < self.replace_after
                        && voters.contains(&node_id(&m.id))
                })
            })
            .cloned()
            .collect();
        if !members.iter().any(|m| m.id == self.me) && self.broker_eligible() {
            members.push(Member::broker(self.me.clone()));
            members.sort();
        }
        let key = PartitionKey {
            namespace: &g.namespace,
            topic: &g.topic,
            partition: g.partition,
        };
        placement::replicas(&members, &key, r)
            .into_iter()
            .map(|m| node_id(&m.id))
            .collect()
    }

    fn broker_eligible(&self) -> bool {
        self.mesh.view().me.as_ref().is_none_or(|m| m.broker)
    }

    fn place(&self, core: &mut Core, g: &GroupId) {
        let voters = core.driver.status(g).map(|s| s.voters).unwrap_or_default();
        let wanted = {
            let peers = lock(&self.peers);
            self.wanted(&peers, g, &voters)
        };
        if !wanted.is_empty() {
            core.driver.set_replicas(g, &wanted);
        }
    }

    /// Brings every group's sync policy in line with its topic's fsync
    /// policy (a topic's config can change, and arrives after its groups
    /// may have been created by a peer's message). A store that cannot
    /// switch (its fsync failed) stops its replica, as a failed write does.
    fn apply_sync_policies(&self, core: &mut Core) {
        let mut by_topic: HashMap<(&str, &str), SyncPolicy> = HashMap::new();
        // Only the groups whose store differs are touched: reaching a store
        // stirs its group, and 1,000 hibernating groups should stay asleep.
        let mut differ = Vec::new();
        for (g, grp) in core.driver.iter() {
            let policy = *by_topic
                .entry((g.namespace.as_str(), g.topic.as_str()))
                .or_insert_with(|| sync_policy_of(&self.broker, g));
            if grp.store().sync_policy() != policy {
                differ.push((g.clone(), policy));
            }
        }
        for (g, policy) in differ {
            let Some(store) = core.driver.store_mut(&g) else {
                continue;
            };
            if let Err(e) = store.set_sync_policy(policy) {
                core.driver
                    .stop_group(&g, format!("cannot change how it syncs: {e}"));
            }
        }
    }

    /// As leader: a group whose dedupe window is not its topic's
    /// `dedupeWindow` gets a `Window` entry, so the window changes at the
    /// same index on every replica; so does a group this agent began to
    /// lead whose topic's window is not the default (see `window_due`).
    /// Only those groups are looked at further (hibernating groups stay
    /// asleep).
    fn propose_windows(&self, core: &mut Core) {
        let mut window_of: HashMap<&str, Option<u64>> = HashMap::new();
        let mut todo = Vec::new();
        let mut not_due = Vec::new();
        for (g, grp) in core.driver.iter() {
            if is_meta(g) {
                continue;
            }
            let want = *window_of.entry(g.topic.as_str()).or_insert_with(|| {
                self.broker
                    .topic(&g.topic)
                    .map(|t| t.config().dedupe_window.as_millis() as u64)
            });
            let Some(want) = want else {
                continue;
            };
            let due = core.window_due.contains(g);
            if due && (want == DEFAULT_DEDUPE_WINDOW_MS || !grp.is_leader()) {
                not_due.push(g.clone());
            }
            let restate = due && want != DEFAULT_DEDUPE_WINDOW_MS;
            if (want != grp.state().window_ms() || restate) && grp.is_leader() {
                todo.push((g.clone(), want));
            }
        }
        for g in &not_due {
            core.window_due.remove(g);
        }
        let ticks = core.ticks;
        core.window_proposed
            .retain(|_, at| ticks < *at + WINDOW_RETRY_TICKS);
        let mut done = Vec::new();
        for (g, window_ms) in todo {
            if core.window_proposed.contains_key(&g) {
                continue;
            }
            let serving = core
                .driver
                .status(&g)
                .is_some_and(|s| s.serving && s.leader == Some(self.me_id));
            if !serving {
                continue;
            }
            let Ok(data) = (Command::Window {
                timestamp_ms: crate::time::now_ms(),
                window_ms,
            })
            .encode() else {
                continue;
            };
            // No one waits for it: the token only has to be unique.
            let token = core.next_token;
            core.next_token += 1;
            match core.driver.propose(&g, token, data) {
                Ok(_) => {
                    tracing::debug!(group = %group_label(&g), window_ms, "proposed the topic's dedupe window");
                    core.window_proposed.insert(g.clone(), ticks);
                    done.push(g);
                }
                Err(e) => {
                    tracing::debug!(group = %group_label(&g), error = %e, "could not propose the dedupe window")
                }
            }
        }
        for g in done {
            core.window_due.remove(&g);
        }
        // Groups gone from here have nothing to state.
        let driver = &core.driver;
        core.window_due.retain(|g| driver.group(g).is_some());
    }

    /// Every group moves toward the replicas placement wants, and a leader
    /// hands its group to placement's first choice once that one has every
    /// entry, so leaders spread over the agents as homes did.
    fn place_all(&self, core: &mut Core) {
        let peers = lock(&self.peers);
        let (mut under, mut leaderless, mut max_lag) = (0i64, 0i64, 0u64);
        let mut asked_of: HashMap<&str, u32> = HashMap::new();
        // First the settled groups, looked up and counted without a copy:
        // 1,000 hibernating groups cost 1,000 lookups a second, no more.
        let mut todo = Vec::new();
        for (g, grp) in core.driver.iter() {
            let asked = if is_meta(g) {
                META_VOTERS as u32
            } else {
                *asked_of.entry(g.topic.as_str()).or_insert_with(|| {
                    self.broker
                        .topic(&g.topic)
                        .map_or(0, |t| t.config().replicas)
                })
            };
            // A down member's seat expires with time, not with the epoch.
            if peers.down.is_empty() {
                if let (Some(at), Some(s)) = (grp.asleep_at(), core.settled.get(g)) {
                    if (s.epoch, s.asked, s.asleep_at) == (peers.epoch, asked, at) {
                        under += i64::from(s.under);
                        leaderless += i64::from(s.leaderless);
                        continue;
                    }
                }
            }
            todo.push((g.clone(), asked));
        }
        for (g, asked) in todo {
            let Some(grp) = core.driver.group(&g) else {
                continue;
            };
            let asleep_at = grp.asleep_at();
            core.settled.remove(&g);
            let status = grp.status();
            let is_leaderless = status.leader.is_none();
            leaderless += i64::from(is_leaderless);
            let leads = status.leader == Some(self.me_id);
            let mut lag = 0;
            if leads {
                for (_, matched) in &status.matched {
                    lag = lag.max(status.last_index.saturating_sub(*matched));
                }
            }
            max_lag = max_lag.max(lag);
            let wanted = self.wanted(&peers, &g, &status.voters);
            let mut is_under = false;
            if leads && !is_meta(&g) {
                let asked = asked as usize;
                // A voter that is down (not yet replaced) holds no live copy.
                let live_voters = status
                    .voters
                    .iter()
                    .filter(|v| {
                        peers
                            .by_id
                            .get(v)
                            .is_none_or(|(name, _)| !peers.down.contains(name))
                    })
                    .count();
                is_under = live_voters < asked;
                under += i64::from(is_under);
                // Said once per group while the mesh has too few brokers
                // (not while a new replica catches up, which passes).
                let lacking = wanted.len() < asked;
                if lacking && core.under_warned.insert(g.clone()) {
                    tracing::warn!(
                        group = %group_label(&g),
                        brokers = wanted.len(),
                        replicas = asked,
                        "partition has fewer replicas than its topic asks: the mesh has too few live broker agents"
                    );
                } else if !lacking {
                    core.under_warned.remove(&g);
                }
            }
            if wanted.is_empty() {
                continue;
            }
            let mut wanted_voters = wanted.clone();
            wanted_voters.sort_unstable();
            let settled = status.learners.is_empty()
                && status.voters == wanted_voters
                && !(leads && wanted[0] != self.me_id)
                && lag == 0;
            if let (Some(at), true) = (asleep_at, settled) {
                core.settled.insert(
                    g.clone(),
                    Settled {
                        epoch: peers.epoch,
                        asked,
                        asleep_at: at,
                        under: is_under,
                        leaderless: is_leaderless,
                    },
                );
            }
            core.driver.set_replicas(&g, &wanted);
            let recently = core
                .transferred_at
                .get(&g)
                .is_some_and(|t| core.ticks < t + TRANSFER_BACKOFF_TICKS);
            if wanted[0] != self.me_id
                && leads
                && status.serving
                && !recently
                && core.driver.transfer_leader(&g, wanted[0])
            {
                core.transferred_at.insert(g.clone(), core.ticks);
                tracing::debug!(group = %group_label(&g), "handing leadership to placement's first choice");
            }
        }
        self.metrics.replica_under_replicated.set(under);
        self.metrics.replica_leaderless.set(leaderless);
        self.metrics
            .replica_follower_lag
            .set(i64::try_from(max_lag).unwrap_or(i64::MAX));
    }

    /// Gossip's view changed: who is up, where, and which brokers count.
    pub fn set_members(&self, members: &[(String, SocketAddr, bool, Liveness, bool)]) {
        let mut downs = Vec::new();
        {
            let mut peers = lock(&self.peers);
            peers.by_id.clear();
            peers.addrs.clear();
            peers.members.clear();
            peers.down.clear();
            let now = std::time::Instant::now();
            peers.epoch += 1;
            let mut down_since = std::mem::take(&mut peers.down_since);
            for (name, addr, broker, state, departed) in members {
                if *name == self.me {
                    continue;
                }
                peers.by_id.insert(node_id(name), (name.clone(), *addr));
                peers.addrs.insert(name.clone(), *addr);
                // An agent that left gracefully keeps its replicas for
                // `--replace-after`, as a crashed one does: a rolling restart
                // brings it back; a pod replaced under a new name does not.
                let down = *state == Liveness::Down || *departed;
                if down {
                    peers.down.insert(name.clone());
                    let since = down_since.remove(name).unwrap_or(now);
                    peers.down_since.insert(name.clone(), since);
                }
                downs.push((node_id(name), down));
                if *broker {
                    peers.members.push(Member::broker(name.clone()));
                }
            }
            if self.broker_eligible() {
                peers.members.push(Member::broker(self.me.clone()));
            }
            peers.members.sort();
        }
        let mut core = lock(&self.core);
        for (id, down) in downs {
            core.driver.set_down(id, down);
        }
        self.place_all(&mut core);
        drop(core);
        self.wake.wake();
    }

    /// Steps a batch from the peer at `from`; a sender that is not a known
    /// member is refused.
    pub fn step(&self, from: SocketAddr, batch: RaftBatch) -> bool {
        let id = {
            let peers = lock(&self.peers);
            peers
                .by_id
                .iter()
                .filter(|(_, (_, a))| *a == from)
                .map(|(id, (n, _))| (*id, peers.down.contains(n)))
                .min_by_key(|(_, down)| *down)
                .map(|(id, _)| id)
        };
        let Some(id) = id else {
            return false;
        };
        let mut batch = batch;
        let mut core = lock(&self.core);
        // A leader's message creates a replica here only for a group
        // placement puts this agent in: otherwise any member could make
        // itself look like the leader of any partition to an agent that
        // holds none of it, and receive that agent's publishes and reads.
        // A refused join is asked again by the leader's next message, once
        // this agent's view agrees (it knows the topic and the members).
        let before = batch.groups.len();
        batch
            .groups
            .retain(|gm| core.driver.group(&gm.group).is_some() || self.placed_here(&gm.group));
        let refused = before - batch.groups.len();
        if refused > 0 {
            self.metrics
                .mesh_invalid_messages
                .get_or_create(&crate::metrics::ReasonLabel {
                    reason: "unknown_group",
                })
                .inc_by(refused as u64);
            tracing::debug!(peer = %from, groups = refused, "refused to create replicas placement does not give this agent");
        }
        core.driver.step(id, batch);
        drop(core);
        self.round_now();
        true
    }

    /// Takes one part of a transfer from the peer at `from` (see
    /// [`Message::RaftPart`]); steps the batch once every part is in.
    /// Parts come in order on the peer's one stream: a gap or another
    /// transfer's middle part drops what was put together (the leader sends
    /// its snapshot again). Refused: an unknown sender, a malformed part, or
    /// more than [`MAX_TRANSFER_BYTES`] held.
    pub fn step_part(
        &self,
        from: SocketAddr,
        transfer: u64,
        part: u32,
        parts: u32,
        bytes: Vec<u8>,
    ) -> Result<(), &'static str> {
        if !lock(&self.peers).addrs.values().any(|a| *a == from) {
            return Err("unknown_sender");
        }
        let mut assembling = lock(&self.assembling);
        assembling.retain(|_, a| a.started.elapsed() < ASSEMBLY_TIMEOUT);
        if part == 0 {
            assembling.remove(&from);
        }
        if part >= parts || parts < 2 {
            assembling.remove(&from);
            return Err("malformed");
        }
        let held: usize = assembling.values().map(|a| a.bytes.len()).sum();
        let fits = held + bytes.len() <= MAX_TRANSFER_BYTES
            && (parts as usize).saturating_mul(PART_BYTES) <= MAX_TRANSFER_BYTES + PART_BYTES;
        if !fits {
            assembling.remove(&from);
            tracing::warn!(peer = %from, parts, "a raft transfer is larger than this agent takes ({MAX_TRANSFER_BYTES} bytes): the partition's snapshot cannot reach this replica");
            return Err("raft_transfer_too_large");
        }
        let entry = assembling.entry(from).or_insert_with(|| Assembly {
            transfer,
            parts,
            next: 0,
            bytes: Vec::new(),
            started: std::time::Instant::now(),
        });
        if (entry.transfer, entry.parts, entry.next) != (transfer, parts, part) {
            // Another transfer's part, or a gap: what was put together is lost.
            assembling.remove(&from);
            return Err("malformed");
        }
        entry.bytes.extend_from_slice(&bytes);
        entry.next += 1;
        if entry.next < entry.parts {
            return Ok(());
        }
        let Some(done) = assembling.remove(&from) else {
            return Ok(());
        };
        drop(assembling);
        let batch: RaftBatch = postcard::from_bytes(&done.bytes).map_err(|_| "malformed")?;
        if self.step(from, batch) {
            Ok(())
        } else {
            Err("unknown_sender")
        }
    }

    /// Whether placement, as this agent sees it, gives it a replica of `g`.
    fn placed_here(&self, g: &GroupId) -> bool {
        let peers = lock(&self.peers);
        self.wanted(&peers, g, &[]).contains(&self.me_id)
    }

    /// Where to send a publish or a read of `topic`/`partition` now.
    pub fn route(&self, topic: &str, partition: u32) -> Route {
        let g = self.group_id(topic, partition);
        let status = lock(&self.core).driver.status(&g);
        let peers = lock(&self.peers);
        let live = |name: &str| -> Option<SocketAddr> {
            if peers.down.contains(name) {
                None
            } else {
                peers.addrs.get(name).copied()
            }
        };
        if let Some(s) = &status {
            if s.leader == Some(self.me_id) {
                return Route::Local;
            }
            if let Some((name, addr)) = s.leader.and_then(|l| peers.by_id.get(&l)) {
                if !peers.down.contains(name) {
                    return Route::Peer {
                        node: name.clone(),
                        addr: *addr,
                    };
                }
            }
        }
        let key = (topic.to_string(), partition);
        let skip = match peers.hints.get(&key) {
            Some(Hint::Leader(node)) => {
                if let Some(addr) = live(node) {
                    return Route::Peer {
                        node: node.clone(),
                        addr,
                    };
                }
                0
            }
            Some(Hint::Skip(n)) => *n,
            None => 0,
        };
        let voters = status
            .as_ref()
            .map(|s| s.voters.clone())
            .unwrap_or_default();
        let wanted = self.wanted(&peers, &g, &voters);
        let candidates: Vec<(String, Option<SocketAddr>)> = wanted
            .iter()
            .filter_map(|id| {
                if *id == self.me_id {
                    Some((self.me.clone(), None))
                } else {
                    peers
                        .by_id
                        .get(id)
                        .filter(|(n, _)| !peers.down.contains(n))
                        .map(|(n, a)| (n.clone(), Some(*a)))
                }
            })
            .collect();
        if candidates.is_empty() {
            return Route::Unavailable;
        }
        match &candidates[skip % candidates.len()] {
            (_, None) => {
                // This agent is a wanted replica but not (yet) a leader:
                // the group is forming or electing here.
                if candidates.len() == 1 {
                    Route::Unavailable
                } else {
                    let (node, addr) = &candidates[(skip + 1) % candidates.len()];
                    match addr {
                        Some(a) => Route::Peer {
                            node: node.clone(),
                            addr: *a,
                        },
                        None => Route::Unavailable,
                    }
                }
            }
            (node, Some(addr)) => Route::Peer {
                node: node.clone(),
                addr: *addr,
            },
        }
    }

    /// Whether a replicated partition has a leader that is up, as this
    /// agent's replica knows it; `None` when it holds no replica.
    pub fn has_live_leader(&self, topic: &str, partition: u32) -> Option<bool> {
        let g = self.group_id(topic, partition);
        let leader = lock(&self.core).driver.status(&g)?.leader;
        let Some(leader) = leader else {
            return Some(false);
        };
        if leader == self.me_id {
            return Some(true);
        }
        let peers = lock(&self.peers);
        Some(
            peers
                .by_id
                .get(&leader)
                .is_some_and(|(name, _)| !peers.down.contains(name)),
        )
    }

    /// `node` did not answer a call: the groups here that it leads wake, so
    /// their followers elect another leader if it died while they slept.
    pub fn suspect(&self, node: &str) {
        let id = node_id(node);
        let mut core = lock(&self.core);
        let led: Vec<GroupId> = core
            .driver
            .groups()
            .filter(|g| core.driver.status(g).is_some_and(|s| s.leader == Some(id)))
            .cloned()
            .collect();
        for g in &led {
            core.driver.wake_group(g);
        }
        drop(core);
        if !led.is_empty() {
            self.wake.wake();
        }
    }

    /// A peer answered for a partition: it leads (`ok`), or try another.
    pub fn note_answer(&self, topic: &str, partition: u32, node: &str, ok: bool) {
        let mut peers = lock(&self.peers);
        let key = (topic.to_string(), partition);
        if ok {
            peers.hints.insert(key, Hint::Leader(node.to_string()));
        } else {
            let next = match peers.hints.get(&key) {
                Some(Hint::Skip(n)) => n + 1,
                _ => 1,
            };
            peers.hints.insert(key, Hint::Skip(next));
        }
    }

    fn group_id(&self, topic: &str, partition: u32) -> GroupId {
        GroupId {
            namespace: TOPIC_NAMESPACE.to_owned(),
            topic: topic.to_string(),
            partition,
        }
    }

    /// Publishes to a partition this agent leads: answers once each
    /// message's entry is committed on a majority of the group.
    pub async fn publish_local(
        &self,
        topic: &Arc<Topic>,
        partition: u32,
        messages: Vec<AppMessage>,
    ) -> Vec<Result<PublishOutcome, ApiError>> {
        let g = self.group_id(&topic.name, partition);
        let window_ms = topic.config().dedupe_window.as_millis() as u64;
        let mut pending: Vec<Result<oneshot::Receiver<_>, ApiError>> = Vec::new();
        let mut proposed = 0;
        let alone = {
            let mut core = lock(&self.core);
            let wanted_len = {
                let peers = lock(&self.peers);
                let voters = core.driver.status(&g).map(|s| s.voters).unwrap_or_default();
                self.wanted(&peers, &g, &voters).len()
            };
            let check = match core.driver.status(&g) {
                None => Err(not_leader(&topic.name, partition, None)),
                Some(s) if !s.serving => {
                    let leader = s.leader.and_then(|l| {
                        lock(&self.peers).by_id.get(&l).map(|(n, _)| n.clone())
                    });
                    Err(not_leader(&topic.name, partition, leader.as_deref()))
                }
                Some(s) if s.voters.len() < wanted_len.min(2) => Err(ApiError::unavailable(
                    "not_leader",
                    format!("partition {partition} of topic {:?} is still gathering its replicas; retry shortly", topic.name),
                    1,
                )),
                Some(_) => Ok(()),
            };
            if let Err(e) = check {
                core.driver.wake_group(&g);
                drop(core);
                self.wake.wake();
                return messages.iter().map(|_| Err(e.clone())).collect();
            }
            let now = crate::time::now_ms();
            for m in &messages {
                if m.client_id && window_ms > 0 {
                    let original = core
                        .driver
                        .group(&g)
                        .and_then(|grp| grp.state().lookup(&m.id, now));
                    if let Some(original) = original {
                        let (tx, rx) = oneshot::channel();
                        let _ = tx.send(Ok((original, Applied::Duplicate { original })));
                        pending.push(Ok(rx));
                        continue;
                    }
                }
                let body = match m.encode() {
                    Ok(b) => b,
                    Err(what) => {
                        pending.push(Err(ApiError::bad_request(
                            "invalid_message",
                            format!("message {what} is too long"),
                        )));
                        continue;
                    }
                };
                let id = (m.client_id && window_ms > 0).then_some(m.id.as_str());
                let data = match (Command::Message {
                    timestamp_ms: now,
                    id,
                    body: &body,
                })
                .encode()
                {
                    Ok(d) => d,
                    Err(e) => {
                        pending.push(Err(ApiError::bad_request("invalid_message", e.to_string())));
                        continue;
                    }
                };
                let token = core.next_token;
                core.next_token += 1;
                match core.driver.propose(&g, token, data) {
                    Ok(_) => {
                        let (tx, rx) = oneshot::channel();
                        core.waiters.insert(token, Waiter { tx });
                        proposed += 1;
                        pending.push(Ok(rx));
                    }
                    Err(e) => pending.push(Err(match e {
                        // raft-rs drops proposals while leadership moves.
                        shoal_replica::Error::NotLeader { .. }
                        | shoal_replica::Error::LeaderCatchingUp(_)
                        | shoal_replica::Error::Raft(raft::Error::ProposalDropped) => {
                            not_leader(&topic.name, partition, None)
                        }
                        other => ApiError::unavailable(
                            "storage_error",
                            format!("the partition's group refused the message: {other}"),
                            1,
                        ),
                    })),
                }
            }
            core.waiters.len() <= proposed
        };
        // Alone, the proposal goes out at once; with others in flight the
        // driver's thread gathers them into one append per round.
        if alone {
            self.round_now();
        } else {
            self.wake.wake();
        }
        let started = std::time::Instant::now();
        let mut out = Vec::with_capacity(messages.len());
        for (m, p) in messages.iter().zip(pending) {
            let result = match p {
                Err(e) => Err(e),
                Ok(rx) => match tokio::time::timeout(PROPOSAL_TIMEOUT, rx).await {
                    Ok(Ok(Ok((index, applied)))) => {
                        let (offset, duplicate) = match applied {
                            Applied::Duplicate { original } => (original, true),
                            _ => (index, false),
                        };
                        Ok(PublishOutcome {
                            topic: topic.name.to_string(),
                            partition,
                            offset,
                            id: m.id.clone(),
                            duplicate,
                        })
                    }
                    Ok(Ok(Err(e))) => Err(e),
                    Ok(Err(_)) | Err(_) => Err(ApiError::unavailable(
                        "storage_timeout",
                        format!("partition {partition} of topic {:?} did not store the message on a majority of its replicas in time; it may or may not be stored (publish again with the same Shoal-Id to be sure)", topic.name),
                        1,
                    )),
                },
            };
            out.push(result);
        }
        let (mut published, mut bytes) = (0u64, 0u64);
        for (m, r) in messages.iter().zip(&out) {
            match r {
                Ok(o) if o.duplicate => {
                    topic.metrics.deduplicated.inc();
                }
                Ok(_) => {
                    published += 1;
                    bytes += m.payload.len() as u64;
                }
                Err(_) => {}
            }
        }
        topic.metrics.published.inc_by(published);
        topic.metrics.published_bytes.inc_by(bytes);
        let elapsed = started.elapsed().as_secs_f64();
        self.metrics.store_latency.observe(elapsed);
        self.metrics.replica_commit_latency.observe(elapsed);
        out
    }

    /// Reads a partition this agent leads for a consumer group, up to the
    /// commit index (never an uncommitted entry).
    #[allow(clippy::too_many_arguments)]
    pub async fn fetch_local(
        &self,
        topic: &str,
        partition: u32,
        group: &str,
        start: &StartPosition,
        from: Option<u64>,
        max: usize,
        wait: Duration,
    ) -> Result<FetchedBatch, ApiError> {
        let g = self.group_id(topic, partition);
        let mut round = self.round.subscribe();
        let deadline = tokio::time::Instant::now() + wait;
        let max = max.clamp(1, 4096);
        let mut start_at = None;
        loop {
            let answer = {
                let mut core = lock(&self.core);
                let Some(grp) = core.driver.group(&g) else {
                    return Err(not_leader(topic, partition, None));
                };
                let status = grp.status();
                if !status.serving {
                    core.driver.wake_group(&g);
                    return Err(not_leader(topic, partition, None));
                }
                let first = grp.store().first_index().max(status.first_index);
                let at = match start_at {
                    Some(a) => a,
                    None => {
                        let pending = core
                            .pending_commits
                            .get(&(topic.to_string(), partition, group.to_string()))
                            .copied();
                        let a = match from {
                            Some(f) => f,
                            None => match pending.or_else(|| grp.state().offset(group)) {
                                Some(o) => o,
                                None => {
                                    let a = match start {
                                        StartPosition::Earliest => first,
                                        StartPosition::Latest => status.commit + 1,
                                        StartPosition::Offset(o) => (*o).max(first),
                                        StartPosition::Time(t) => crate::time::parse_rfc3339_ms(t)
                                            .and_then(|ms| grp.store().log().index_at_time(ms).ok())
                                            .unwrap_or(first),
                                    };
                                    // The choice is kept, so a restart resumes from it.
                                    let kept = core
                                        .pending_commits
                                        .entry((topic.to_string(), partition, group.to_string()))
                                        .or_insert(a);
                                    *kept = (*kept).max(a);
                                    a
                                }
                            },
                        };
                        start_at = Some(a);
                        a
                    }
                };
                let Some(grp) = core.driver.group(&g) else {
                    return Err(not_leader(topic, partition, None));
                };
                // Applied, not only committed: whether an entry is a
                // duplicate is known once it is applied.
                let readable = status
                    .commit
                    .min(grp.store().last_index())
                    .min(grp.state().applied());
                let from_index = at.max(first);
                let mut entries = Vec::new();
                if from_index <= readable {
                    let raw = grp
                        .store()
                        .entries(
                            from_index,
                            readable + 1,
                            crate::router::FETCH_ANSWER_BYTES as u64,
                        )
                        .map_err(|e| {
                            ApiError::internal(format!("reading the partition's log: {e}"))
                        })?;
                    for e in raw {
                        if entries.len() >= max {
                            break;
                        }
                        if let Ok(Command::Message {
                            timestamp_ms, body, ..
                        }) = Command::decode(&e.data)
                        {
                            // A duplicate id was answered with its original; readers skip it.
                            if grp.state().is_duplicate(e.index) {
                                continue;
                            }
                            entries.push(WireEntry {
                                index: e.index,
                                timestamp_ms,
                                data: body.to_vec(),
                            });
                        }
                    }
                }
                if !entries.is_empty() || at < first || tokio::time::Instant::now() >= deadline {
                    Some(FetchedBatch {
                        start: at,
                        first_index: first,
                        entries,
                    })
                } else {
                    None
                }
            };
            if let Some(batch) = answer {
                return Ok(batch);
            }
            if tokio::time::timeout_at(deadline, round.changed())
                .await
                .is_err()
            {
                continue;
            }
        }
    }

    /// A consumer group's committed offset, to go through the partition's
    /// log (coalesced: the newest value within [`COMMIT_EVERY_TICKS`]).
    pub fn commit(&self, topic: &str, partition: u32, group: &str, next: u64) {
        let mut core = lock(&self.core);
        let entry = core
            .pending_commits
            .entry((topic.to_string(), partition, group.to_string()))
            .or_insert(next);
        *entry = (*entry).max(next);
    }

    fn flush_commits(&self, core: &mut Core) {
        if core.pending_commits.is_empty() {
            return;
        }
        let pending = std::mem::take(&mut core.pending_commits);
        let now = crate::time::now_ms();
        // Not proposed or sent this time (leadership moving, no leader
        // known): kept for the next flush, so no offset is lost on the way.
        let mut retry = Vec::new();
        for ((topic, partition, group), next) in pending {
            let g = self.group_id(&topic, partition);
            let leads = core
                .driver
                .status(&g)
                .is_some_and(|s| s.serving && s.leader == Some(self.me_id));
            if leads {
                // An offset past the log's end (a peer's mistake or lie)
                // would make the group skip every message still to come.
                let end = core.driver.status(&g).map_or(0, |s| s.last_index + 1);
                let next = next.min(end);
                if core
                    .driver
                    .group(&g)
                    .and_then(|grp| grp.state().offset(&group))
                    .is_some_and(|o| o >= next)
                {
                    continue;
                }
                let Ok(data) = (Command::Commit {
                    timestamp_ms: now,
                    group: &group,
                    next,
                })
                .encode() else {
                    continue;
                };
                if core.driver.propose(&g, 0, data).is_err() {
                    tracing::debug!(group = %group, "offset commit not proposed (leadership moving); trying again");
                    retry.push(((topic, partition, group), next));
                }
                continue;
            }
            // Led elsewhere: tell the leader (it proposes it). Only this
            // agent's namespace's groups: the leader takes a commit from a
            // peer only for the peer's own namespace's groups, so another
            // namespace's commit that reached this follower is dropped (its
            // reader sends the next one to the leader it finds then).
            if crate::tenancy::may_use_group(self.broker.namespace(), &group).is_err() {
                tracing::debug!(group = %group, "a peer's offset commit reached a follower; dropped");
                continue;
            }
            let Route::Peer { addr, .. } = self.route_unlocked(core, &topic, partition) else {
                retry.push(((topic, partition, group), next));
                continue;
            };
            let mesh = self.mesh.clone();
            let msg = Message::Commit {
                topic,
                partition,
                group,
                next,
            };
            tokio::spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(5), mesh.tell(addr, msg)).await;
            });
        }
        for (key, next) in retry {
            let kept = core.pending_commits.entry(key).or_insert(next);
            *kept = (*kept).max(next);
        }
    }

    /// [`Replication::route`] with the core already locked.
    fn route_unlocked(&self, core: &Core, topic: &str, partition: u32) -> Route {
        let g = self.group_id(topic, partition);
        let peers = lock(&self.peers);
        if let Some(s) = core.driver.status(&g) {
            if let Some((name, addr)) = s.leader.and_then(|l| peers.by_id.get(&l)) {
                return Route::Peer {
                    node: name.clone(),
                    addr: *addr,
                };
            }
        }
        if let Some(Hint::Leader(node)) = peers.hints.get(&(topic.to_string(), partition)) {
            if let Some(addr) = peers.addrs.get(node) {
                return Route::Peer {
                    node: node.clone(),
                    addr: *addr,
                };
            }
        }
        Route::Unavailable
    }

    /// Messages between `from` and the commit index of a group held here
    /// (control entries not counted). Reads at most 1 MiB of the log; past
    /// that, the remaining entries are counted as messages (an upper bound).
    fn messages_from(grp: &shoal_replica::group::Group<DiskStore>, from: u64) -> u64 {
        let status = grp.status();
        let end = status.commit.min(grp.store().last_index());
        let from = from.max(grp.store().first_index());
        if from > end {
            return 0;
        }
        let Ok(entries) = grp.store().entries(from, end + 1, 1 << 20) else {
            return end + 1 - from;
        };
        let last = entries.last().map_or(from.saturating_sub(1), |e| e.index);
        let counted = entries
            .iter()
            .filter(|e| matches!(Command::decode(&e.data), Ok(Command::Message { .. })))
            .count() as u64;
        counted + end.saturating_sub(last)
    }

    /// The lag of `groups` on the partitions of `topic` this agent leads:
    /// (partition, group, messages not acknowledged), for the lag metric.
    pub fn lag(&self, topic: &str, groups: &[String]) -> Vec<(u32, String, u64)> {
        let core = lock(&self.core);
        let mut out = Vec::new();
        for g in core.driver.groups() {
            if g.topic != topic || g.namespace != TOPIC_NAMESPACE {
                continue;
            }
            let Some(grp) = core.driver.group(g) else {
                continue;
            };
            if grp.status().leader != Some(self.me_id) {
                continue;
            }
            for name in groups {
                if let Some(next) = grp.state().offset(name) {
                    out.push((g.partition, name.clone(), Self::messages_from(grp, next)));
                }
            }
        }
        out
    }

    /// A consumer group's position on a replicated partition this agent
    /// holds a replica of: (committed offset, end offset, messages between).
    pub fn position(
        &self,
        topic: &str,
        partition: u32,
        group: &str,
    ) -> Option<(Option<u64>, u64, Option<u64>)> {
        let g = self.group_id(topic, partition);
        let core = lock(&self.core);
        let grp = core.driver.group(&g)?;
        let end = grp.status().commit + 1;
        let committed = grp.state().offset(group);
        let lag = committed.map(|c| Self::messages_from(grp, c));
        Some((committed, end, lag))
    }

    /// A replicated partition's figures as this agent's replica has them
    /// (offsets are Raft indexes: the log's control entries count too).
    pub fn stats(&self, topic: &str, partition: u32) -> Option<shoal_proto::PartitionStats> {
        let g = self.group_id(topic, partition);
        let core = lock(&self.core);
        let grp = core.driver.group(&g)?;
        let status = grp.status();
        let log = grp.store().log();
        Some(shoal_proto::PartitionStats {
            partition,
            first_offset: status.first_index,
            next_offset: status.commit + 1,
            bytes: log.size_bytes(),
            segments: log.segment_count() as u64,
        })
    }

    /// Moves leadership of every group this agent leads to another voter
    /// (a graceful stop); returns how many transfers started.
    pub fn transfer_leadership(&self) -> usize {
        let n = lock(&self.core).driver.transfer_all_leadership();
        self.wake.wake();
        n
    }

    /// How many groups this agent leads.
    pub fn leading(&self) -> usize {
        lock(&self.core).driver.leading()
    }

    /// Per-partition replication state as this agent sees it, for the
    /// cluster view.
    pub fn view(&self) -> Vec<ReplicaView> {
        let core = lock(&self.core);
        let peers = lock(&self.peers);
        let name = |id: NodeId| -> String {
            if id == self.me_id {
                self.me.clone()
            } else {
                peers
                    .by_id
                    .get(&id)
                    .map_or_else(|| format!("#{id:016x}"), |(n, _)| n.clone())
            }
        };
        core.driver
            .groups()
            .filter_map(|g| core.driver.status(g).map(|s| (g, s)))
            .map(|(g, s)| ReplicaView {
                namespace: g.namespace.clone(),
                topic: g.topic.clone(),
                partition: g.partition,
                leader: s.leader.map(name),
                term: s.term,
                commit_index: s.commit,
                last_index: s.last_index,
                voters: s.voters.iter().map(|v| name(*v)).collect(),
                learners: s.learners.iter().map(|v| name(*v)).collect(),
                lag: s
                    .matched
                    .iter()
                    .map(|(id, m)| (name(*id), s.last_index.saturating_sub(*m)))
                    .collect(),
                hibernating: s.hibernating,
                recovering: s.recovering,
                fsync: core.driver.group(g).map_or("always", |grp| {
                    match grp.store().sync_policy() {
                        SyncPolicy::Always => "always",
                        SyncPolicy::Interval => "interval",
                        SyncPolicy::Never => "never",
                    }
                }),
            })
            .collect()
    }
}

/// One replica of a partition's group, as its agent sees it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaView {
    /// Namespace.
    pub namespace: String,
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: u32,
    /// The group's leader as known here.
    pub leader: Option<String>,
    /// Raft term.
    pub term: u64,
    /// Highest index known committed.
    pub commit_index: u64,
    /// Last index held here.
    pub last_index: u64,
    /// Voters.
    pub voters: Vec<String>,
    /// Learners (catching up before they vote).
    pub learners: Vec<String>,
    /// On the leader: how many entries each other replica is behind.
    pub lag: BTreeMap<String, u64>,
    /// Not ticking (idle).
    pub hibernating: bool,
    /// Lost entries; does not vote until caught up.
    pub recovering: bool,
    /// When this replica's writes are fsynced (`always`, `interval`,
    /// `never`): its topic's fsync policy once this agent knows the topic.
    pub fsync: &'static str,
}

#[cfg(test)]
mod tests;
