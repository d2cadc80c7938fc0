//! Topics and partitions: configuration, the per-partition store (a durable
//! [`Log`] or a bounded in-memory ring for ephemeral topics), committed
//! offsets, and the dedupe table.

use crate::error::ApiError;
use crate::metrics::TopicMetrics;
use crate::tenancy::Grants;
use serde::{Deserialize, Serialize};
use shoal_storage::{Entry, Log, StorageError, SyncHandle};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;
use tokio::sync::watch;

/// The namespace of every placement key and Raft group name. A topic's own
/// namespace is already in its full name (`shop:orders`, see
/// [`crate::names`]), and every agent of every Kubernetes namespace must
/// compute the same homes and name the same groups, or a forward to a leader
/// in another namespace finds no group there.
pub const TOPIC_NAMESPACE: &str = "default";

/// Most partitions a topic may have.
pub const MAX_PARTITIONS: u32 = 1024;
/// Most replicas a topic may ask for.
pub const MAX_REPLICAS: u32 = 7;
/// Default time a durable topic keeps messages.
pub const DEFAULT_RETENTION_AGE: Duration = Duration::from_secs(7 * 24 * 3600);
/// Longest retention age.
pub const MAX_RETENTION_AGE: Duration = Duration::from_secs(10 * 366 * 24 * 3600);
/// Messages an ephemeral partition keeps in memory for slow subscribers.
pub const EPHEMERAL_CAPACITY_ENTRIES: usize = 10_000;
/// Bytes an ephemeral partition keeps in memory for slow subscribers.
pub const EPHEMERAL_CAPACITY_BYTES: usize = 16 * 1024 * 1024;
/// Most ids a topic's dedupe table holds; beyond it the oldest are forgotten early.
pub const MAX_DEDUPE_ENTRIES: usize = 1_000_000;

/// Whether a topic stores messages.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TopicKind {
    /// Stored in partition logs on disk, delivered at least once.
    #[default]
    Durable,
    /// Fan-out from memory to current subscribers; nothing stored.
    Ephemeral,
}

/// When a durable topic's writes are fsynced.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[repr(u8)]
pub enum FsyncPolicy {
    /// Before the publish is answered.
    Always = 0,
    /// Every `--fsync-interval`; a publish is answered once written to the OS.
    #[default]
    Interval = 1,
    /// Left to the OS.
    Never = 2,
}

/// How long and how much a durable topic keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Retention {
    /// Delete whole segments older than this.
    #[serde(default, with = "crate::time::serde_opt_duration")]
    pub max_age: Option<Duration>,
    /// Delete the oldest whole segments while a partition holds more than this.
    #[serde(default)]
    pub max_bytes: Option<u64>,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            max_age: Some(DEFAULT_RETENTION_AGE),
            max_bytes: None,
        }
    }
}

/// A topic's configuration as stored and as answered by the API.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TopicConfig {
    /// Number of partitions (may grow, never shrink).
    pub partitions: u32,
    /// Replicas of each partition (used by the mesh).
    pub replicas: u32,
    /// Durable or ephemeral.
    pub kind: TopicKind,
    /// Retention of durable topics.
    pub retention: Retention,
    /// Fsync policy of durable topics.
    pub fsync: FsyncPolicy,
    /// Window within which a repeated `Shoal-Id` is stored once.
    #[serde(with = "crate::time::serde_duration")]
    pub dedupe_window: Duration,
    /// Most messages a partition may hold that some consumer group has not
    /// acknowledged yet; publishes beyond it get 429 until the slowest group
    /// catches up. None: no limit (retention alone bounds the log).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_backlog: Option<u64>,
    /// What other namespaces may do with the topic.
    #[serde(default, skip_serializing_if = "Grants::is_empty")]
    pub grants: Grants,
}

/// A create or configure request: every field optional.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TopicSpec {
    /// Partitions.
    pub partitions: Option<u32>,
    /// Replicas.
    pub replicas: Option<u32>,
    /// Kind.
    pub kind: Option<TopicKind>,
    /// Retention.
    #[serde(default, deserialize_with = "crate::json_object::optional")]
    pub retention: Option<Retention>,
    /// Fsync policy.
    pub fsync: Option<FsyncPolicy>,
    /// Dedupe window.
    #[serde(default, with = "crate::time::serde_opt_duration")]
    pub dedupe_window: Option<Duration>,
    /// Backlog limit.
    pub max_backlog: Option<u64>,
    /// Grants to other namespaces (replacing the ones before).
    pub grants: Option<Grants>,
}

impl TopicSpec {
    /// The configuration this spec asks for, on top of `base`; checks limits and allowed changes.
    pub fn apply(&self, base: &TopicConfig, existing: bool) -> Result<TopicConfig, ApiError> {
        let mut c = base.clone();
        if let Some(p) = self.partitions {
            if p == 0 || p > MAX_PARTITIONS {
                return Err(ApiError::bad_request(
                    "invalid_config",
                    format!("partitions must be 1..={MAX_PARTITIONS}"),
                ));
            }
            if existing && p < base.partitions {
                return Err(ApiError::conflict(
                    "partitions_decrease",
                    format!(
                        "a topic's partitions can grow but never shrink (has {}, asked {p})",
                        base.partitions
                    ),
                ));
            }
            c.partitions = p;
        }
        if let Some(r) = self.replicas {
            if r > MAX_REPLICAS {
                return Err(ApiError::bad_request(
                    "invalid_config",
                    format!("replicas must be 0..={MAX_REPLICAS}"),
                ));
            }
            c.replicas = r;
        }
        if let Some(k) = self.kind {
            if existing && k != base.kind {
                return Err(ApiError::conflict(
                    "kind_change",
                    "a topic's kind (durable or ephemeral) cannot change; delete and recreate it",
                ));
            }
            c.kind = k;
        }
        if let Some(r) = &self.retention {
            if r.max_age.is_some_and(|a| a > MAX_RETENTION_AGE) {
                return Err(ApiError::bad_request(
                    "invalid_config",
                    "retention maxAge must be at most 10 years",
                ));
            }
            if r.max_bytes == Some(0) || r.max_age == Some(Duration::ZERO) {
                return Err(ApiError::bad_request(
                    "invalid_config",
                    "retention maxAge and maxBytes must be positive (omit them for no limit)",
                ));
            }
            c.retention = *r;
        }
        if let Some(f) = self.fsync {
            c.fsync = f;
        }
        if let Some(w) = self.dedupe_window {
            if w > Duration::from_secs(24 * 3600) {
                return Err(ApiError::bad_request(
                    "invalid_config",
                    "dedupeWindow must be at most 24h",
                ));
            }
            c.dedupe_window = w;
        }
        if let Some(b) = self.max_backlog {
            if b == 0 {
                return Err(ApiError::bad_request(
                    "invalid_config",
                    "maxBacklog must be positive (omit it for no limit)",
                ));
            }
            c.max_backlog = Some(b);
        }
        if let Some(g) = &self.grants {
            g.validate()?;
            c.grants = g.clone();
        }
        if c.kind == TopicKind::Ephemeral {
            c.replicas = 0;
        } else if c.replicas == 0 {
            // 0 is the ephemeral topics' count; a durable topic keeps a copy.
            c.replicas = 1;
        }
        // One copy lives in a local log, two or more in a Raft group: a
        // change across that line would leave the stored messages behind.
        if existing && base.kind == TopicKind::Durable && (base.replicas >= 2) != (c.replicas >= 2)
        {
            return Err(ApiError::conflict(
                "replicas_change",
                format!(
                    "a topic's replicas can change between 2 and 7, but not between 1 and 2 or more (has {}, asked {}): its messages are stored differently; create a new topic",
                    base.replicas, c.replicas
                ),
            ));
        }
        Ok(c)
    }
}

/// File whose presence says this agent holds a partition's truth, inside its directory.
pub const HOLDER_FILE: &str = "holder";

/// A bounded in-memory log for ephemeral partitions: the oldest entries fall off.
#[derive(Debug)]
pub struct MemLog {
    entries: VecDeque<Entry>,
    next_index: u64,
    bytes: usize,
}

impl MemLog {
    fn new() -> Self {
        MemLog {
            entries: VecDeque::new(),
            next_index: 1,
            bytes: 0,
        }
    }
    fn first_index(&self) -> u64 {
        self.entries.front().map_or(self.next_index, |e| e.index)
    }
    fn append(&mut self, timestamp_ms: u64, data: bytes::Bytes) -> u64 {
        let index = self.next_index;
        self.next_index += 1;
        self.bytes += data.len();
        self.entries.push_back(Entry {
            index,
            term: 0,
            timestamp_ms,
            data,
        });
        while self.entries.len() > EPHEMERAL_CAPACITY_ENTRIES
            || self.bytes > EPHEMERAL_CAPACITY_BYTES
        {
            match self.entries.pop_front() {
                Some(e) => self.bytes -= e.data.len(),
                None => break,
            }
        }
        index
    }
    fn read(&self, from: u64, max_entries: usize, max_bytes: usize) -> Vec<Entry> {
        let first = self.first_index();
        let skip = from.saturating_sub(first) as usize;
        let mut out = Vec::new();
        let mut bytes = 0;
        for e in self.entries.iter().skip(skip) {
            if out.len() >= max_entries || (bytes >= max_bytes && !out.is_empty()) {
                break;
            }
            bytes += e.data.len();
            out.push(e.clone());
        }
        out
    }
}

/// Where a partition keeps its entries.
#[derive(Debug)]
pub enum Store {
    /// A durable log on disk.
    Disk(Log),
    /// An ephemeral ring in memory.
    Memory(MemLog),
}

/// Committed offsets of the consumer groups reading one partition.
#[derive(Debug, Default)]
pub struct Offsets {
    /// Group name → next offset to deliver (every offset below it is acknowledged).
    pub committed: BTreeMap<String, u64>,
    /// Changed since the last checkpoint.
    pub dirty: bool,
}

/// What this agent does with a partition in a mesh.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Role {
    /// Home: accepts publishes and serves reads.
    Serving = 0,
    /// Not home, and this agent's copy (if any) is not the partition's truth.
    Idle = 1,
    /// Home, waiting for the previous home to hand the partition over.
    Acquiring = 2,
    /// No longer home but holding the partition's truth until it is handed off.
    Retired = 3,
}

impl Role {
    fn from_u8(v: u8) -> Role {
        match v {
            0 => Role::Serving,
            2 => Role::Acquiring,
            3 => Role::Retired,
            _ => Role::Idle,
        }
    }

    /// Label for logs and the cluster view.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Serving => "serving",
            Role::Idle => "idle",
            Role::Acquiring => "acquiring",
            Role::Retired => "retired",
        }
    }
}

/// One partition of a topic.
#[derive(Debug)]
pub struct Partition {
    /// Topic name.
    pub topic: Arc<str>,
    /// Partition number.
    pub id: u32,
    /// Directory of a durable partition.
    pub dir: Option<PathBuf>,
    fsync: AtomicU8,
    store: Mutex<Store>,
    /// Last index visible to consumers and acknowledged to publishers.
    committed: watch::Sender<u64>,
    /// Bytes appended but not yet written to the OS.
    pub pending_bytes: AtomicU64,
    /// Whether the partition waits in the flusher's queue.
    pub queued: AtomicBool,
    /// Committed offsets of consumer groups.
    pub offsets: Mutex<Offsets>,
    /// Files written but not yet fsynced (`interval` policy).
    unsynced: Mutex<Option<SyncHandle>>,
    /// The topic's change generation, bumped when entries become visible.
    pub topic_changed: Arc<watch::Sender<u64>>,
    role: AtomicU8,
}

impl Partition {
    /// A durable partition over an opened log, with its checkpointed offsets.
    pub fn durable(
        topic: Arc<str>,
        id: u32,
        dir: PathBuf,
        fsync: FsyncPolicy,
        log: Log,
        offsets: BTreeMap<String, u64>,
        topic_changed: Arc<watch::Sender<u64>>,
    ) -> Self {
        let written = log.written_index();
        Partition {
            topic,
            id,
            dir: Some(dir),
            fsync: AtomicU8::new(fsync as u8),
            store: Mutex::new(Store::Disk(log)),
            committed: watch::Sender::new(written),
            pending_bytes: AtomicU64::new(0),
            queued: AtomicBool::new(false),
            offsets: Mutex::new(Offsets {
                committed: offsets,
                dirty: false,
            }),
            unsynced: Mutex::new(None),
            topic_changed,
            role: AtomicU8::new(Role::Serving as u8),
        }
    }

    /// An ephemeral partition.
    pub fn ephemeral(topic: Arc<str>, id: u32, topic_changed: Arc<watch::Sender<u64>>) -> Self {
        Partition {
            topic,
            id,
            dir: None,
            fsync: AtomicU8::new(FsyncPolicy::Never as u8),
            store: Mutex::new(Store::Memory(MemLog::new())),
            committed: watch::Sender::new(0),
            pending_bytes: AtomicU64::new(0),
            queued: AtomicBool::new(false),
            offsets: Mutex::new(Offsets::default()),
            unsynced: Mutex::new(None),
            topic_changed,
            role: AtomicU8::new(Role::Serving as u8),
        }
    }

    /// What this agent does with the partition.
    pub fn role(&self) -> Role {
        Role::from_u8(self.role.load(Ordering::Acquire))
    }

    /// Changes the role. Publishes check the role under the store lock, so
    /// once this returns no publish is appended under the old role.
    pub fn set_role(&self, role: Role) {
        let _store = self.store();
        self.role.store(role as u8, Ordering::Release);
    }

    /// Changes the role if it is `from`; returns whether it did.
    pub fn swap_role(&self, from: Role, to: Role) -> bool {
        let _store = self.store();
        self.role
            .compare_exchange(from as u8, to as u8, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Records on disk whether this agent holds the partition's truth
    /// (serving it, or retired and not yet handed off), so a restart after a
    /// crash knows. Ephemeral partitions hold nothing worth recording.
    pub fn set_holder(&self, holder: bool) {
        let Some(dir) = &self.dir else { return };
        let file = dir.join(HOLDER_FILE);
        if holder {
            if !file.exists() {
                if let Err(e) = shoal_storage::meta::write_atomic(&file, b"") {
                    tracing::error!(file = %file.display(), error = %e, "cannot record that this agent holds the partition");
                }
            }
        } else if let Err(e) = std::fs::remove_file(&file) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::error!(file = %file.display(), error = %e, "cannot record that the partition moved away");
            }
        }
    }

    /// Whether the disk says this agent held the partition's truth when it stopped.
    pub fn was_holder(&self) -> bool {
        self.dir
            .as_ref()
            .is_some_and(|d| d.join(HOLDER_FILE).exists())
    }

    /// The role read under a held store lock (the publish path).
    pub fn role_locked(&self, _store: &Store) -> Role {
        Role::from_u8(self.role.load(Ordering::Acquire))
    }

    /// Sets the last visible index, down as well as up (a hand-off replaced the log).
    pub fn reset_committed(&self, index: u64) {
        self.committed.send_replace(index);
        self.topic_changed.send_modify(|g| *g += 1);
    }

    /// The fsync policy now.
    pub fn fsync(&self) -> FsyncPolicy {
        match self.fsync.load(Ordering::Relaxed) {
            0 => FsyncPolicy::Always,
            1 => FsyncPolicy::Interval,
            _ => FsyncPolicy::Never,
        }
    }

    /// Changes the fsync policy (a topic reconfiguration).
    pub fn set_fsync(&self, policy: FsyncPolicy) {
        self.fsync.store(policy as u8, Ordering::Relaxed);
    }

    /// Locks the store. The lock is held for microseconds (buffering, positional reads).
    pub fn store(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether entries live only in memory.
    pub fn is_ephemeral(&self) -> bool {
        self.dir.is_none()
    }

    /// Appends one encoded message; returns its offset. Durable entries become
    /// visible when the flusher has written them.
    pub fn append(
        &self,
        store: &mut Store,
        timestamp_ms: u64,
        data: bytes::Bytes,
    ) -> Result<u64, StorageError> {
        match store {
            Store::Disk(log) => {
                let index = log.append(0, timestamp_ms, &data)?;
                self.pending_bytes
                    .fetch_add(data.len() as u64 + 32, Ordering::Relaxed);
                Ok(index)
            }
            Store::Memory(mem) => {
                let index = mem.append(timestamp_ms, data);
                self.committed.send_replace(index);
                Ok(index)
            }
        }
    }

    /// Writes buffered entries to the OS now and makes them visible; for the
    /// `interval` policy the files are remembered for the next periodic fsync.
    /// This is the publish path of `interval` and `never` topics: one write
    /// syscall per request, no thread hand-off. A process crash cannot lose
    /// what this wrote; a power loss can lose up to one fsync interval.
    pub fn write_now(&self) -> Result<u64, StorageError> {
        let written = {
            let mut store = self.store();
            let Store::Disk(log) = &mut *store else {
                return Ok(self.committed());
            };
            let handle = log.write_buffered()?;
            self.pending_bytes.store(0, Ordering::Relaxed);
            if let Some(h) = handle {
                if self.fsync() == FsyncPolicy::Interval {
                    let mut unsynced = self.unsynced.lock().unwrap_or_else(|p| p.into_inner());
                    match unsynced.as_mut() {
                        Some(u) => u.merge(h),
                        None => *unsynced = Some(h),
                    }
                }
            }
            log.written_index()
        };
        self.set_committed(written);
        Ok(written)
    }

    /// Takes the files written since the last periodic fsync.
    pub fn take_unsynced(&self) -> Option<SyncHandle> {
        self.unsynced
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    /// Puts back files whose fsync failed, to try again next interval.
    pub fn return_unsynced(&self, handle: SyncHandle) {
        let mut unsynced = self.unsynced.lock().unwrap_or_else(|p| p.into_inner());
        match unsynced.as_mut() {
            Some(u) => u.merge(handle),
            None => *unsynced = Some(handle),
        }
    }

    /// Marks entries up to `index` visible and wakes waiters.
    pub fn set_committed(&self, index: u64) {
        self.committed.send_if_modified(|c| {
            if index > *c {
                *c = index;
                true
            } else {
                false
            }
        });
        self.topic_changed.send_modify(|g| *g += 1);
    }

    /// Last visible index.
    pub fn committed(&self) -> u64 {
        *self.committed.borrow()
    }

    /// Waits until `index` is visible, or the timeout passes.
    pub async fn wait_committed(&self, index: u64, timeout: Duration) -> bool {
        let mut rx = self.committed.subscribe();
        let waited = tokio::time::timeout(timeout, rx.wait_for(|c| *c >= index)).await;
        matches!(waited, Ok(Ok(_)))
    }

    /// First index still stored.
    pub fn first_index(&self) -> u64 {
        match &*self.store() {
            Store::Disk(log) => log.first_index(),
            Store::Memory(mem) => mem.first_index(),
        }
    }

    /// Reads visible entries from `from`.
    pub fn read(
        &self,
        from: u64,
        max_entries: usize,
        max_bytes: usize,
    ) -> Result<Vec<Entry>, StorageError> {
        let committed = self.committed();
        if from > committed {
            return Ok(Vec::new());
        }
        let mut entries = match &*self.store() {
            Store::Disk(log) => log.read(from, max_entries, max_bytes)?,
            Store::Memory(mem) => mem.read(from, max_entries, max_bytes),
        };
        entries.retain(|e| e.index <= committed);
        Ok(entries)
    }

    /// The first offset at or after a time.
    pub fn offset_at_time(&self, timestamp_ms: u64) -> Result<u64, StorageError> {
        match &*self.store() {
            Store::Disk(log) => log.index_at_time(timestamp_ms),
            Store::Memory(mem) => Ok(mem
                .entries
                .iter()
                .find(|e| e.timestamp_ms >= timestamp_ms)
                .map_or(mem.next_index, |e| e.index)),
        }
    }

    /// Bytes and segments stored.
    pub fn storage_size(&self) -> (u64, usize) {
        match &*self.store() {
            Store::Disk(log) => (log.size_bytes(), log.segment_count()),
            Store::Memory(mem) => (mem.bytes as u64, 0),
        }
    }

    /// Messages the slowest of `groups` has not acknowledged here; 0 without groups.
    pub fn backlog(&self, groups: &[String]) -> u64 {
        let end = self.committed() + 1;
        let o = self.offsets.lock().unwrap_or_else(|p| p.into_inner());
        groups
            .iter()
            .filter_map(|g| o.committed.get(g))
            .map(|next| end.saturating_sub(*next))
            .max()
            .unwrap_or(0)
    }

    /// A group's committed offset, if it has one here.
    pub fn committed_offset(&self, group: &str) -> Option<u64> {
        self.offsets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .committed
            .get(group)
            .copied()
    }

    /// Records a group's committed offset (checkpointed by the flusher).
    pub fn commit_offset(&self, group: &str, next: u64) {
        let mut o = self.offsets.lock().unwrap_or_else(|p| p.into_inner());
        let slot = o.committed.entry(group.to_string()).or_insert(0);
        if *slot != next {
            *slot = next;
            o.dirty = true;
        }
    }
}

/// Ids seen within the dedupe window, and where they were stored.
#[derive(Debug, Default)]
pub struct Dedupe {
    by_id: HashMap<String, (u32, u64)>,
    order: VecDeque<(u64, String)>,
}

impl Dedupe {
    /// Where an id was stored, if seen within the window (forgetting older ones first).
    pub fn lookup(&mut self, id: &str, now_ms: u64, window: Duration) -> Option<(u32, u64)> {
        let horizon = now_ms.saturating_sub(window.as_millis() as u64);
        while let Some((t, _)) = self.order.front() {
            if *t >= horizon && self.order.len() <= MAX_DEDUPE_ENTRIES {
                break;
            }
            if let Some((_, old)) = self.order.pop_front() {
                self.by_id.remove(&old);
            }
        }
        self.by_id.get(id).copied()
    }

    /// Remembers an id.
    pub fn insert(&mut self, id: String, at_ms: u64, partition: u32, offset: u64) {
        if self.by_id.insert(id.clone(), (partition, offset)).is_none() {
            self.order.push_back((at_ms, id));
        }
    }

    /// Ids remembered.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Whether none are remembered.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }
}

/// A topic.
#[derive(Debug)]
pub struct Topic {
    /// Name.
    pub name: Arc<str>,
    /// Configuration.
    pub config: RwLock<TopicConfig>,
    /// Partitions, indexed by number.
    pub partitions: RwLock<Vec<Arc<Partition>>>,
    /// Round-robin cursor for messages without a key.
    pub next_partition: AtomicU32,
    /// Ids seen within the dedupe window.
    pub dedupe: Mutex<Dedupe>,
    /// Bumped whenever entries become visible in any partition.
    pub changed: Arc<watch::Sender<u64>>,
    /// Metric handles labelled with this topic.
    pub metrics: TopicMetrics,
    /// Catalog version of the configuration: milliseconds since the epoch
    /// of the last explicit change, 0 for a topic created with defaults.
    pub version: AtomicU64,
}

impl Topic {
    /// The configuration now.
    pub fn config(&self) -> TopicConfig {
        self.config
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The partitions now.
    pub fn partitions(&self) -> Vec<Arc<Partition>> {
        self.partitions
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// One partition.
    pub fn partition(&self, id: u32) -> Option<Arc<Partition>> {
        self.partitions
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(id as usize)
            .cloned()
    }

    /// Number of partitions.
    pub fn partition_count(&self) -> u32 {
        self.partitions
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .len() as u32
    }

    /// Whether the topic stores nothing.
    pub fn is_ephemeral(&self) -> bool {
        self.config().kind == TopicKind::Ephemeral
    }
}

/// The partition for a key: FNV-1a over the key's bytes, modulo the partition count.
pub fn partition_for_key(key: &str, partitions: u32) -> u32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (h % u64::from(partitions.max(1))) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_hash_is_stable_and_spread() {
        assert_eq!(
            partition_for_key("order-1", 8),
            partition_for_key("order-1", 8)
        );
        let mut seen = [0u32; 8];
        for i in 0..8000 {
            seen[partition_for_key(&format!("k{i}"), 8) as usize] += 1;
        }
        assert!(seen.iter().all(|&n| n > 700), "{seen:?}");
    }

    #[test]
    fn dedupe_forgets_after_window() {
        let mut d = Dedupe::default();
        d.insert("a".into(), 1000, 0, 5);
        assert_eq!(d.lookup("a", 1500, Duration::from_secs(1)), Some((0, 5)));
        assert_eq!(d.lookup("a", 2500, Duration::from_secs(1)), None);
        assert!(d.is_empty());
    }

    #[test]
    fn spec_rules() {
        let base = TopicConfig {
            partitions: 4,
            replicas: 1,
            kind: TopicKind::Durable,
            retention: Retention::default(),
            fsync: FsyncPolicy::Interval,
            dedupe_window: Duration::from_secs(120),
            max_backlog: None,
            grants: Grants::default(),
        };
        let shrink = TopicSpec {
            partitions: Some(2),
            ..Default::default()
        };
        assert_eq!(shrink.apply(&base, true).unwrap_err().status.as_u16(), 409);
        assert!(shrink.apply(&base, false).is_ok());
        let kind = TopicSpec {
            kind: Some(TopicKind::Ephemeral),
            ..Default::default()
        };
        assert_eq!(kind.apply(&base, true).unwrap_err().status.as_u16(), 409);
        let zero = TopicSpec {
            partitions: Some(0),
            ..Default::default()
        };
        assert_eq!(zero.apply(&base, false).unwrap_err().status.as_u16(), 400);
        let replicas = |r| TopicSpec {
            replicas: Some(r),
            ..Default::default()
        };
        // base has one copy: it may not become a Raft group in place...
        let err = replicas(3).apply(&base, true).unwrap_err();
        assert_eq!((err.status.as_u16(), err.code), (409, "replicas_change"));
        assert!(
            replicas(3).apply(&base, false).is_ok(),
            "a new topic may ask for 3"
        );
        // ...a replicated one may grow or shrink its groups, but not below 2...
        let replicated = replicas(3).apply(&base, false).unwrap();
        assert_eq!(replicas(5).apply(&replicated, true).unwrap().replicas, 5);
        assert_eq!(
            replicas(1).apply(&replicated, true).unwrap_err().code,
            "replicas_change"
        );
        // ...and a durable topic always keeps at least one copy.
        assert_eq!(replicas(0).apply(&base, false).unwrap().replicas, 1);
    }

    #[test]
    fn memlog_drops_oldest() {
        let mut m = MemLog::new();
        for i in 0..(EPHEMERAL_CAPACITY_ENTRIES + 10) {
            m.append(i as u64, bytes::Bytes::from_static(b"x"));
        }
        assert_eq!(m.first_index(), 11);
        let r = m.read(1, 5, 1 << 20);
        assert_eq!(r[0].index, 11);
        assert_eq!(r.len(), 5);
    }
}
