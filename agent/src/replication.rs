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
//!
//! This file holds the shell's state, its driver loop (rounds, events) and
//! shared helpers; the child modules hold its jobs: `founding` (creation
//! records and the groups they found), `placement` (which agents hold each
//! group's replicas, and who leads), `transfer` (Raft batches and snapshots
//! in parts between agents), `settings` (retention, fsync policy and dedupe
//! window on the replicas), `serve` (publishes, reads and commits) and
//! `view` (the cluster view and figures).

mod founding;
mod replicas;
mod rounds;
mod serve;
mod settings;
mod transfer;
mod view;

use crate::broker::Broker;
use crate::error::ApiError;
use crate::mesh::Mesh;
use crate::metrics::Metrics;
use crate::topic::{FsyncPolicy, TopicConfig, TopicKind, TOPIC_NAMESPACE};
use replicas::Settled;
use shoal_cluster::placement::Member;
use shoal_replica::disk::{DiskStore, SyncPolicy};
use shoal_replica::state::Applied;
use shoal_replica::{node_id, Bootstrap, Driver, DriverConfig, GroupId, NodeId};
use shoal_storage::LogConfig;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::{oneshot, watch};
use transfer::Assembly;

pub use founding::KNOWS_FOUNDERS;
pub use transfer::MAX_TRANSFER_BYTES;
pub use view::ReplicaView;

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

/// How often (in ticks: 10 s, as for topics of one copy) every replica
/// applies its topic's `maxBytes`. A pass reads only sizes kept in memory,
/// and a log past its limit drops whole segments.
const SIZE_RETENTION_EVERY_TICKS: u64 = 50;
/// How often (in ticks: a minute) every replica applies its topic's
/// `maxAge`. A log with an expired message is read to find the cut, which
/// moves the log's start by whole messages (a state write), so a partition
/// that expires messages all the time does it once a minute.
const AGE_RETENTION_EVERY_TICKS: u64 = 300;
/// Most groups a round creates from the meta log. Creating one makes its
/// folder and files (a few milliseconds on an overlay filesystem) under the
/// driver's lock: a topic of 1,000 partitions created at once would stall
/// every group's ticks and messages for seconds, long enough for the meta
/// group to lose its leader.
const FOUNDED_PER_ROUND: usize = 32;

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
    /// Members gossip suspects (not yet down): the groups they lead here
    /// were woken when the suspicion began, not at every change of view.
    suspected: BTreeSet<String>,
    /// Bumped whenever the members change (placement may then differ).
    epoch: u64,
    /// The agent a publish to a partition tried last and its answer, by
    /// topic and partition (by topic first, so a lookup needs no `String`).
    hints: HashMap<String, HashMap<u32, Hint>>,
}

impl Peers {
    fn hint(&self, topic: &str, partition: u32) -> Option<&Hint> {
        self.hints.get(topic)?.get(&partition)
    }

    fn set_hint(&mut self, topic: &str, partition: u32, hint: Hint) {
        match self.hints.get_mut(topic) {
            Some(by_partition) => {
                by_partition.insert(partition, hint);
            }
            None => {
                self.hints
                    .insert(topic.to_string(), HashMap::from([(partition, hint)]));
            }
        }
    }
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
    /// The leader and term last counted in `shoal_replica_leader_changes`,
    /// by group.
    leaders_counted: HashMap<GroupId, (NodeId, u64)>,
    /// The tick this agent, as meta leader, first saw partitions without a
    /// creation record (`None` when every partition has one).
    founding_wait_since: Option<u64>,
    /// The driver's catch-up bytes already counted in the metric.
    catch_up_counted: u64,
    /// Creation records proposed by this agent as meta leader, not yet applied.
    proposed: BTreeSet<(String, String, u32)>,
    /// Groups this agent created (kept in [`CREATED_FILE`]).
    created: BTreeSet<String>,
    /// Groups the meta log told this agent to create, not created yet:
    /// taken [`FOUNDED_PER_ROUND`] a round.
    to_found: std::collections::VecDeque<(GroupId, Vec<NodeId>)>,
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
    /// Peers' batches that came while a round held the core (its fsyncs,
    /// a batch of new groups): stepped, in arrival order, before anything
    /// else the next time the core is taken, so the task that read them
    /// never waits for the disk.
    inbox: Mutex<transfer::Inbox>,
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
            // Its only voter: it leads at once, not after an election
            // timeout, so the others join a new mesh's meta group sooner.
            if let Err(e) = driver.campaign(&meta) {
                tracing::debug!(error = %e, "the new meta group could not campaign at once; the election timeout will");
            }
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
                leaders_counted: HashMap::new(),
                founding_wait_since: None,
                catch_up_counted: 0,
                proposed: BTreeSet::new(),
                created,
                to_found: std::collections::VecDeque::new(),
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
            inbox: Mutex::new(transfer::Inbox::default()),
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
                        let mut core = lock(&this.core);
                        // Groups the meta log named this run to create are
                        // created now: no later run acts on those records.
                        while !core.to_found.is_empty() {
                            this.found_some(&mut core);
                        }
                        // What `interval` topics left in the page cache goes
                        // to disk before the agent exits.
                        core.driver.flush_stores();
                        return;
                    }
                    let now = std::time::Instant::now();
                    if now >= next_flush {
                        this.flush_interval_stores();
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

    fn group_id(&self, topic: &str, partition: u32) -> GroupId {
        GroupId {
            namespace: TOPIC_NAMESPACE.to_owned(),
            topic: topic.to_string(),
            partition,
        }
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
}

#[cfg(test)]
mod tests;
