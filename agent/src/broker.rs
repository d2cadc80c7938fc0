//! The broker of one agent: the topic registry, durable metadata, and the
//! publish path (partition choice, dedupe, append, wait for durability).

use crate::error::{AgentError, ApiError};
use crate::flusher::Flusher;
use crate::message::Message;
use crate::metrics::Metrics;
use crate::tenancy::Action;
use crate::topic::{
    partition_for_key, Dedupe, FsyncPolicy, Partition, Retention, Topic, TopicConfig, TopicKind,
    TopicSpec,
};
use serde::Serialize;
use shoal_storage::{Log, LogConfig};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// File of a topic's configuration, inside its directory.
pub const TOPIC_FILE: &str = "topic.json";
/// File of a partition's committed offsets, inside its directory.
pub const OFFSETS_FILE: &str = "offsets.json";
/// File of a topic's catalog version, inside its directory.
pub const VERSION_FILE: &str = "version";
/// Longest a publish waits for its entries to be written.
pub const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Replicas of a new topic's partitions unless it asks otherwise: in a mesh,
/// each partition is a Raft group of three agents (fewer when the mesh has
/// fewer brokers); outside a mesh the setting has no effect.
pub const DEFAULT_REPLICAS: u32 = 3;

/// Settings of the broker, from the agent's configuration.
#[derive(Clone, Debug)]
pub struct BrokerSettings {
    /// Data directory.
    pub data_dir: PathBuf,
    /// Partitions of auto-created topics.
    pub default_partitions: u32,
    /// Default dedupe window.
    pub dedupe_window: Duration,
    /// Unwritten bytes per partition before publishes get 503.
    pub max_pending_bytes: u64,
    /// Segment size of new logs.
    pub log: LogConfig,
    /// Whether the agent is part of a mesh: partitions then start idle and
    /// the router decides which this agent serves.
    pub meshed: bool,
    /// The Kubernetes namespace of this agent's app: plain topic names are
    /// its topics ([`crate::names`]).
    pub namespace: String,
}

/// 404 for another namespace's topic this agent has not heard of.
fn foreign_topic_unknown(topic: &str) -> ApiError {
    let owner = crate::names::namespace_of(topic);
    ApiError::not_found(
        "topic_not_found",
        format!(
            "topic {topic} is not known to this agent: only namespace {owner} creates its topics, and agents pass them on to each other as they meet (declare it there first, or retry shortly)"
        ),
    )
}

/// Called with a topic's name when its configuration changed here.
pub type TopicHook = Box<dyn Fn(&str) + Send + Sync>;
/// Names the consumer groups that read a topic now (anywhere in the mesh).
pub type GroupsHook = Box<dyn Fn(&str) -> Vec<String> + Send + Sync>;
/// The consumer lag of a replicated topic's partitions led by this agent:
/// (partition, group, messages not acknowledged) for the given groups.
pub type ReplicatedLagHook = Box<dyn Fn(&str, &[String]) -> Vec<(u32, String, u64)> + Send + Sync>;

/// Where a published message was stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PublishOutcome {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: u32,
    /// Offset within the partition.
    pub offset: u64,
    /// Message id.
    pub id: String,
    /// True when the id was seen within the dedupe window and nothing new was stored.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub duplicate: bool,
}

/// The topics of one agent.
#[derive(Debug)]
pub struct Broker {
    settings: BrokerSettings,
    topics: RwLock<BTreeMap<String, Arc<Topic>>>,
    create_lock: Mutex<()>,
    /// Topics known only from another namespace's agents so far: the
    /// owner's word replaces them whatever its version.
    relayed: Mutex<std::collections::HashSet<String>>,
    flusher: Flusher,
    topic_hook: HookCell,
    /// Metrics.
    pub metrics: Arc<Metrics>,
}

/// Holds the hooks; a type of its own so the broker stays `Debug`.
#[derive(Default)]
struct HookCell(
    std::sync::OnceLock<TopicHook>,
    std::sync::RwLock<Option<GroupsHook>>,
    std::sync::OnceLock<ReplicatedLagHook>,
);

impl std::fmt::Debug for HookCell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TopicHook")
    }
}

fn storage_err(path: &Path, e: impl std::fmt::Display) -> AgentError {
    AgentError::Storage {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

impl Broker {
    /// Opens the data directory, recovers every topic, and starts the flusher.
    pub fn open(
        settings: BrokerSettings,
        metrics: Arc<Metrics>,
        fsync_interval: Duration,
    ) -> Result<Arc<Broker>, AgentError> {
        let topics_dir = settings.data_dir.join("topics");
        std::fs::create_dir_all(&topics_dir).map_err(|e| storage_err(&topics_dir, e))?;
        let trash = settings.data_dir.join("trash");
        if trash.exists() {
            if let Err(e) = std::fs::remove_dir_all(&trash) {
                tracing::warn!(error = %e, "could not empty the trash of deleted topics");
            }
        }
        let flusher =
            Flusher::start(fsync_interval, metrics.clone()).map_err(|e| AgentError::Io {
                context: "starting the flusher thread".into(),
                source: e,
            })?;
        let broker = Arc::new(Broker {
            settings,
            topics: RwLock::new(BTreeMap::new()),
            create_lock: Mutex::new(()),
            relayed: Mutex::default(),
            flusher,
            topic_hook: HookCell::default(),
            metrics,
        });
        let mut names: Vec<String> = std::fs::read_dir(&topics_dir)
            .map_err(|e| storage_err(&topics_dir, e))?
            .filter_map(|e| e.ok())
            .filter(|e| e.path().is_dir())
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        names.sort();
        for name in names {
            if crate::names::validate_full("topic", &name).is_err() {
                tracing::warn!(dir = %topics_dir.join(&name).display(), "ignoring a directory that is not a topic");
                continue;
            }
            let file = topics_dir.join(&name).join(TOPIC_FILE);
            let config = match shoal_storage::meta::read(&file) {
                Ok(Some(bytes)) => match serde_json::from_slice::<TopicConfig>(&bytes) {
                    Ok(c) => c,
                    Err(e) => {
                        return Err(storage_err(
                            &file,
                            format!("unreadable topic configuration: {e}"),
                        ));
                    }
                },
                Ok(None) => {
                    tracing::warn!(topic = %name, "topic directory without {TOPIC_FILE}: ignored");
                    continue;
                }
                Err(e) => return Err(storage_err(&file, e)),
            };
            let topic = broker.build_topic(&name, config)?;
            let version = shoal_storage::meta::read(&topics_dir.join(&name).join(VERSION_FILE))
                .ok()
                .flatten()
                .and_then(|b| String::from_utf8(b).ok())
                .and_then(|s| s.trim().parse::<u64>().ok())
                .unwrap_or(0);
            topic.version.store(version, Ordering::Relaxed);
            broker.write_lock().insert(name, topic);
        }
        Ok(broker)
    }

    fn write_lock(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Arc<Topic>>> {
        self.topics.write().unwrap_or_else(|p| p.into_inner())
    }

    fn read_lock(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Arc<Topic>>> {
        self.topics.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The default configuration of a new topic.
    pub fn default_config(&self) -> TopicConfig {
        TopicConfig {
            partitions: self.settings.default_partitions,
            replicas: DEFAULT_REPLICAS,
            kind: TopicKind::Durable,
            retention: Retention::default(),
            fsync: FsyncPolicy::Interval,
            dedupe_window: self.settings.dedupe_window,
            max_backlog: None,
            grants: Default::default(),
        }
    }

    fn topic_dir(&self, name: &str) -> PathBuf {
        self.settings.data_dir.join("topics").join(name)
    }

    fn open_partition(
        &self,
        name: &Arc<str>,
        id: u32,
        config: &TopicConfig,
        changed: &Arc<watch::Sender<u64>>,
    ) -> Result<Arc<Partition>, AgentError> {
        let partition = self.open_partition_inner(name, id, config, changed)?;
        if self.settings.meshed {
            // What this agent held when it stopped it holds still: retired
            // until placement says whether it serves it or hands it on.
            partition.set_role(if partition.was_holder() {
                crate::topic::Role::Retired
            } else {
                crate::topic::Role::Idle
            });
        }
        Ok(partition)
    }

    fn open_partition_inner(
        &self,
        name: &Arc<str>,
        id: u32,
        config: &TopicConfig,
        changed: &Arc<watch::Sender<u64>>,
    ) -> Result<Arc<Partition>, AgentError> {
        if config.kind == TopicKind::Ephemeral {
            return Ok(Arc::new(Partition::ephemeral(
                name.clone(),
                id,
                changed.clone(),
            )));
        }
        let dir = self.topic_dir(name).join(id.to_string());
        let (log, recovery) =
            Log::open(&dir, self.settings.log.clone()).map_err(|e| storage_err(&dir, e))?;
        if recovery.truncated_bytes > 0
            || !recovery.quarantined.is_empty()
            || recovery.problem.is_some()
        {
            tracing::warn!(
                topic = %name, partition = id,
                truncated_bytes = recovery.truncated_bytes,
                quarantined = ?recovery.quarantined,
                problem = ?recovery.problem,
                "recovered a damaged partition log"
            );
        }
        self.metrics
            .recovery_truncated_bytes
            .inc_by(recovery.truncated_bytes);
        self.metrics
            .recovery_quarantined_files
            .inc_by(recovery.quarantined.len() as u64);
        let offsets_file = dir.join(OFFSETS_FILE);
        let offsets: BTreeMap<String, u64> = match shoal_storage::meta::read(&offsets_file) {
            Ok(Some(bytes)) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::error!(file = %offsets_file.display(), error = %e, "unreadable committed offsets; groups restart from their start position");
                BTreeMap::new()
            }),
            Ok(None) => BTreeMap::new(),
            Err(e) => return Err(storage_err(&offsets_file, e)),
        };
        Ok(Arc::new(Partition::durable(
            name.clone(),
            id,
            dir,
            config.fsync,
            log,
            offsets,
            changed.clone(),
        )))
    }

    fn build_topic(&self, name: &str, config: TopicConfig) -> Result<Arc<Topic>, AgentError> {
        let name: Arc<str> = Arc::from(name);
        let changed = Arc::new(watch::Sender::new(0));
        let mut partitions = Vec::with_capacity(config.partitions as usize);
        for id in 0..config.partitions {
            partitions.push(self.open_partition(&name, id, &config, &changed)?);
        }
        let topic = Arc::new(Topic {
            metrics: self.metrics.topic(&name),
            name: name.clone(),
            config: RwLock::new(config.clone()),
            partitions: RwLock::new(partitions),
            next_partition: AtomicU32::new(0),
            dedupe: Mutex::new(Dedupe::default()),
            changed,
            version: std::sync::atomic::AtomicU64::new(0),
        });
        self.rebuild_dedupe(&topic, &config);
        self.flusher.watch_topic(&topic);
        Ok(topic)
    }

    /// Refills the dedupe table from the entries within the window, so a
    /// publisher retrying across an agent restart is still answered once.
    fn rebuild_dedupe(&self, topic: &Topic, config: &TopicConfig) {
        let horizon = crate::time::now_ms().saturating_sub(config.dedupe_window.as_millis() as u64);
        let mut dedupe = topic.dedupe.lock().unwrap_or_else(|p| p.into_inner());
        for p in topic.partitions() {
            let Ok(mut next) = p.offset_at_time(horizon) else {
                continue;
            };
            loop {
                let entries = match p.read(next, 4096, 16 << 20) {
                    Ok(e) if !e.is_empty() => e,
                    _ => break,
                };
                for e in &entries {
                    if let Ok(m) = Message::decode(&e.data) {
                        if m.client_id {
                            dedupe.insert(m.id, e.timestamp_ms, p.id, e.index);
                        }
                    }
                }
                next = entries.last().map_or(next, |e| e.index + 1);
            }
        }
    }

    /// A topic, if it exists.
    pub fn topic(&self, name: &str) -> Option<Arc<Topic>> {
        self.read_lock().get(name).cloned()
    }

    /// Every topic.
    pub fn topics(&self) -> Vec<Arc<Topic>> {
        self.read_lock().values().cloned().collect()
    }

    /// The namespace of this agent's app.
    pub fn namespace(&self) -> &str {
        &self.settings.namespace
    }

    /// The full name of a topic as this agent's app names it.
    pub fn full_topic_name(&self, raw: &str) -> Result<String, ApiError> {
        crate::names::qualify("topic", &self.settings.namespace, raw)
    }

    /// Whether this agent's app may `action` on `topic` (a full name), by
    /// the topic's grants as known here. Another namespace's topic that is
    /// not known here is not found: only its own namespace creates it.
    pub fn authorize(&self, topic: &str, action: Action) -> Result<(), ApiError> {
        match self.grant(&self.settings.namespace, topic, action) {
            Some(r) => r.inspect_err(|_| self.metrics.count_denial("app", action.as_str())),
            None => Err(foreign_topic_unknown(topic)),
        }
    }

    /// Whether namespace `ns` may `action` on `topic` (a full name), by the
    /// grants in this agent's copy of the topic's configuration; `None` for
    /// another namespace's topic this agent does not know. A namespace's own
    /// topics need no lookup (nor a copy of the configuration): this is on
    /// the path of every publish and fetch.
    pub fn grant(&self, ns: &str, topic: &str, action: Action) -> Option<Result<(), ApiError>> {
        if crate::names::namespace_of(topic) == ns {
            return Some(Ok(()));
        }
        let grants = self.topic(topic)?.config().grants;
        Some(crate::tenancy::authorize(ns, topic, Some(&grants), action))
    }

    /// Whether this agent's app may create, configure or delete `topic`.
    pub fn may_configure(&self, topic: &str) -> Result<(), ApiError> {
        crate::tenancy::may_configure(&self.settings.namespace, topic)
            .inspect_err(|_| self.metrics.count_denial("app", "configure"))
    }

    /// A topic, created with defaults if missing (only topics of this
    /// agent's own namespace are created).
    pub fn topic_or_create(&self, name: &str) -> Result<Arc<Topic>, ApiError> {
        if let Some(t) = self.topic(name) {
            return Ok(t);
        }
        crate::names::validate_full("topic", name)?;
        if crate::names::namespace_of(name) != self.settings.namespace {
            return Err(foreign_topic_unknown(name));
        }
        let (topic, created) = self.put_topic_local(name, &TopicSpec::default())?;
        if created {
            self.topic_changed_here(name);
        }
        Ok(topic)
    }

    /// Installs the function told about every topic change made here (the
    /// mesh shares them); once.
    pub fn set_topic_hook(&self, hook: TopicHook) {
        let _ = self.topic_hook.0.set(hook);
    }

    /// Installs the function that names a topic's live consumer groups
    /// (for `maxBacklog`); the last one installed wins.
    pub fn set_groups_hook(&self, hook: GroupsHook) {
        *self.topic_hook.1.write().unwrap_or_else(|p| p.into_inner()) = Some(hook);
    }

    fn live_groups(&self, topic: &str) -> Vec<String> {
        self.topic_hook
            .1
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|h| h(topic))
            .unwrap_or_default()
    }

    fn topic_changed_here(&self, name: &str) {
        if let Some(h) = self.topic_hook.0.get() {
            h(name);
        }
    }

    fn write_version(&self, name: &str, version: u64) {
        let file = self.topic_dir(name).join(VERSION_FILE);
        if let Err(e) = shoal_storage::meta::write_atomic(&file, version.to_string().as_bytes()) {
            tracing::warn!(topic = name, error = %e, "could not store the topic's catalog version");
        }
    }

    /// Creates or reconfigures a topic on behalf of an app (the change is
    /// shared with the mesh). Returns the topic and whether it was created.
    pub fn put_topic(&self, name: &str, spec: &TopicSpec) -> Result<(Arc<Topic>, bool), ApiError> {
        self.may_configure(name)?;
        let (topic, created) = self.put_topic_local(name, spec)?;
        // The owner's own word: no longer a relayed copy.
        self.relayed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
        let version = crate::time::now_ms();
        if topic.version.swap(version, Ordering::Relaxed) != version {
            self.write_version(name, version);
        }
        self.topic_changed_here(name);
        Ok((topic, created))
    }

    /// Applies a topic configuration another agent shared. The higher version
    /// wins; partitions only grow. Returns whether anything changed here.
    ///
    /// Only an agent of the topic's own namespace (`from_owner`) configures
    /// it. Any other agent may only pass on a topic this agent does not know
    /// yet, and only as what it is: its grants are dropped (nothing is
    /// granted until the owner says so), and the owner's word replaces it
    /// whatever its version (partitions still only grow).
    pub fn apply_catalog(
        &self,
        name: &str,
        config: TopicConfig,
        version: u64,
        from_owner: bool,
    ) -> Result<bool, ApiError> {
        crate::names::validate_full("topic", name)?;
        let local = self.topic(name);
        let mut relayed = self.relayed.lock().unwrap_or_else(|p| p.into_inner());
        let (config, version) = match (&local, from_owner) {
            (_, true) => (config, version),
            (Some(_), false) => return Ok(false),
            (None, false) => (
                TopicConfig {
                    grants: Default::default(),
                    ..config
                },
                0,
            ),
        };
        let provisional = from_owner && relayed.remove(name);
        if !from_owner && local.is_none() {
            relayed.insert(name.to_owned());
        }
        drop(relayed);
        let (current, local_version) = match &local {
            // A relayed copy yields to the owner's word at any version.
            Some(t) if !provisional => (Some(t.config()), t.version.load(Ordering::Relaxed)),
            Some(t) => (Some(t.config()), 0),
            None => (None, 0),
        };
        let wanted = match &current {
            Some(c) if provisional => TopicConfig {
                partitions: config.partitions.max(c.partitions),
                kind: c.kind,
                ..config
            },
            Some(c) if version < local_version => {
                if config.partitions <= c.partitions {
                    return Ok(false);
                }
                TopicConfig {
                    partitions: config.partitions,
                    ..c.clone()
                }
            }
            Some(c) if version == local_version && config.partitions <= c.partitions => {
                return Ok(false);
            }
            Some(c) => TopicConfig {
                partitions: config.partitions.max(c.partitions),
                kind: c.kind,
                ..config
            },
            None => config,
        };
        if current.as_ref() == Some(&wanted) && version <= local_version {
            return Ok(false);
        }
        let spec = TopicSpec {
            partitions: Some(wanted.partitions),
            replicas: Some(wanted.replicas),
            kind: Some(wanted.kind),
            retention: Some(wanted.retention),
            fsync: Some(wanted.fsync),
            dedupe_window: Some(wanted.dedupe_window),
            max_backlog: wanted.max_backlog,
            grants: Some(wanted.grants.clone()),
        };
        let (topic, _) = self.put_topic_local(name, &spec)?;
        let v = version.max(local_version);
        topic.version.store(v, Ordering::Relaxed);
        self.write_version(name, v);
        Ok(true)
    }

    fn put_topic_local(
        &self,
        name: &str,
        spec: &TopicSpec,
    ) -> Result<(Arc<Topic>, bool), ApiError> {
        crate::names::validate_full("topic", name)?;
        let _guard = self.create_lock.lock().unwrap_or_else(|p| p.into_inner());
        let dir = self.topic_dir(name);
        if let Some(topic) = self.topic(name) {
            let old = topic.config();
            let new = spec.apply(&old, true)?;
            if new == old {
                return Ok((topic, false));
            }
            let body =
                serde_json::to_vec_pretty(&new).map_err(|e| ApiError::internal(e.to_string()))?;
            if new.partitions > old.partitions {
                let mut added = Vec::new();
                for id in old.partitions..new.partitions {
                    added.push(
                        self.open_partition(&topic.name, id, &new, &topic.changed)
                            .map_err(|e| ApiError::internal(e.to_string()))?,
                    );
                }
                topic
                    .partitions
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .extend(added);
            }
            shoal_storage::meta::write_atomic(&dir.join(TOPIC_FILE), &body)
                .map_err(|e| ApiError::internal(format!("writing topic configuration: {e}")))?;
            for p in topic.partitions() {
                p.set_fsync(new.fsync);
            }
            *topic.config.write().unwrap_or_else(|p| p.into_inner()) = new;
            return Ok((topic, false));
        }
        let config = spec.apply(&self.default_config(), false)?;
        std::fs::create_dir_all(&dir)
            .map_err(|e| ApiError::internal(format!("creating {}: {e}", dir.display())))?;
        let body =
            serde_json::to_vec_pretty(&config).map_err(|e| ApiError::internal(e.to_string()))?;
        shoal_storage::meta::write_atomic(&dir.join(TOPIC_FILE), &body)
            .map_err(|e| ApiError::internal(format!("writing topic configuration: {e}")))?;
        let topic = self
            .build_topic(name, config)
            .map_err(|e| ApiError::internal(e.to_string()))?;
        self.write_lock().insert(name.to_string(), topic.clone());
        tracing::info!(topic = %name, "topic created");
        Ok((topic, true))
    }

    /// Deletes a topic and its data. The caller checks that no subscription uses it.
    pub fn delete_topic(&self, name: &str) -> Result<(), ApiError> {
        self.may_configure(name)?;
        let _guard = self.create_lock.lock().unwrap_or_else(|p| p.into_inner());
        let Some(topic) = self.write_lock().remove(name) else {
            return Err(ApiError::not_found(
                "topic_not_found",
                format!("no topic {name:?}"),
            ));
        };
        drop(topic);
        let dir = self.topic_dir(name);
        let trash = self.settings.data_dir.join("trash");
        let target = trash.join(format!("{name}-{}", crate::time::now_ms()));
        // Rename first: a crash mid-delete leaves the topic whole or in the trash, never half.
        std::fs::create_dir_all(&trash)
            .and_then(|_| std::fs::rename(&dir, &target))
            .and_then(|_| std::fs::remove_dir_all(&target))
            .map_err(|e| ApiError::internal(format!("deleting topic data: {e}")))?;
        tracing::info!(topic = %name, "topic deleted");
        Ok(())
    }

    /// Publishes messages to a topic (created if missing) and waits until
    /// each is stored per the topic's durability. Results are per message.
    pub async fn publish(
        &self,
        topic_name: &str,
        messages: Vec<Message>,
    ) -> Result<Vec<Result<PublishOutcome, ApiError>>, ApiError> {
        let topic = self.topic_or_create(topic_name)?;
        let placed = messages
            .into_iter()
            .map(|m| (choose_partition(&topic, &m), m))
            .collect();
        Ok(self.append(&topic, placed).await)
    }

    /// Stores messages in the partitions chosen for them (this agent is their
    /// home) and waits until each is stored per the topic's durability.
    pub async fn append(
        &self,
        topic: &Topic,
        messages: Vec<(u32, Message)>,
    ) -> Vec<Result<PublishOutcome, ApiError>> {
        let started = Instant::now();
        let topic_name: &str = &topic.name;
        let config = topic.config();
        let partitions = topic.partitions();
        let now = crate::time::now_ms();
        let groups = if config.max_backlog.is_some() {
            self.live_groups(topic_name)
        } else {
            Vec::new()
        };
        let mut results = Vec::with_capacity(messages.len());
        let mut waits: HashMap<u32, u64> = HashMap::new();
        let mut published_bytes = 0u64;
        let mut published = 0u64;
        {
            let needs_dedupe = messages.iter().any(|(_, m)| m.client_id);
            let mut dedupe =
                needs_dedupe.then(|| topic.dedupe.lock().unwrap_or_else(|p| p.into_inner()));
            for (pid, m) in messages {
                if m.client_id {
                    if let Some((partition, offset)) = dedupe
                        .as_mut()
                        .and_then(|d| d.lookup(&m.id, now, config.dedupe_window))
                    {
                        topic.metrics.deduplicated.inc();
                        let w = waits.entry(partition).or_insert(0);
                        *w = (*w).max(offset);
                        results.push(Ok(PublishOutcome {
                            topic: topic_name.to_string(),
                            partition,
                            offset,
                            id: m.id,
                            duplicate: true,
                        }));
                        continue;
                    }
                }
                let Some(partition) = partitions.get(pid as usize) else {
                    results.push(Err(ApiError::unavailable(
                        "partition_unknown",
                        format!("topic {topic_name:?} has no partition {pid} on this agent yet"),
                        1,
                    )));
                    continue;
                };
                if config
                    .max_backlog
                    .is_some_and(|max| partition.backlog(&groups) >= max)
                {
                    results.push(Err(ApiError::too_many(
                        "backlog_full",
                        format!(
                            "partition {pid} of topic {topic_name:?} holds maxBacklog messages its slowest consumer group has not acknowledged; retry when it catches up"
                        ),
                        1,
                    )));
                    continue;
                }
                if partition.pending_bytes.load(Ordering::Relaxed) > self.settings.max_pending_bytes
                {
                    results.push(Err(ApiError::unavailable(
                        "storage_busy",
                        "the partition's write buffer is full; retry shortly",
                        1,
                    )));
                    continue;
                }
                let data = match m.encode() {
                    Ok(d) => d,
                    Err(what) => {
                        results.push(Err(ApiError::bad_request(
                            "invalid_message",
                            format!("message {what} is too long"),
                        )));
                        continue;
                    }
                };
                let payload_len = m.payload.len() as u64;
                let appended = {
                    let mut store = partition.store();
                    if partition.role_locked(&store) != crate::topic::Role::Serving {
                        results.push(Err(not_home(topic_name, pid)));
                        continue;
                    }
                    partition.append(&mut store, now, data)
                };
                match appended {
                    Ok(offset) => {
                        if m.client_id {
                            if let Some(d) = dedupe.as_mut() {
                                d.insert(m.id.clone(), now, pid, offset);
                            }
                        }
                        published += 1;
                        published_bytes += payload_len;
                        let w = waits.entry(pid).or_insert(0);
                        *w = (*w).max(offset);
                        results.push(Ok(PublishOutcome {
                            topic: topic_name.to_string(),
                            partition: pid,
                            offset,
                            id: m.id,
                            duplicate: false,
                        }));
                    }
                    Err(e) => {
                        self.metrics
                            .storage_errors
                            .get_or_create(&crate::metrics::OpLabel { op: "append" })
                            .inc();
                        results.push(Err(ApiError::from(e)));
                    }
                }
            }
        }
        let mut failed_partitions = Vec::new();
        let mut durable_waits = Vec::new();
        for (&pid, &offset) in &waits {
            let Some(p) = partitions.get(pid as usize) else {
                continue;
            };
            if p.is_ephemeral() {
                // In-memory entries are visible at once: wake the readers
                // (local groups and the long polls of remote ones).
                p.topic_changed.send_modify(|g| *g += 1);
                continue;
            }
            match p.fsync() {
                // fsync before answering: the flusher batches fsyncs across requests.
                FsyncPolicy::Always => {
                    self.flusher.schedule(p);
                    durable_waits.push((pid, offset));
                }
                FsyncPolicy::Interval | FsyncPolicy::Never => match p.write_now() {
                    Ok(written) if written >= offset => {}
                    Ok(_) => durable_waits.push((pid, offset)),
                    Err(e) => {
                        self.metrics
                            .storage_errors
                            .get_or_create(&crate::metrics::OpLabel { op: "write" })
                            .inc();
                        tracing::error!(topic = %topic_name, partition = pid, error = %e, "writing the partition log failed");
                        failed_partitions.push(pid);
                    }
                },
            }
        }
        for (pid, offset) in durable_waits {
            if let Some(p) = partitions.get(pid as usize) {
                if !p.wait_committed(offset, DEFAULT_WRITE_TIMEOUT).await {
                    failed_partitions.push(pid);
                }
            }
        }
        if !failed_partitions.is_empty() {
            for r in results.iter_mut() {
                if let Ok(o) = r {
                    if failed_partitions.contains(&o.partition) {
                        *r = Err(ApiError::unavailable(
                            "storage_timeout",
                            "the message was not written in time; retry with the same Shoal-Id",
                            1,
                        ));
                    }
                }
            }
        }
        topic.metrics.published.inc_by(published);
        topic.metrics.published_bytes.inc_by(published_bytes);
        self.metrics
            .store_latency
            .observe(started.elapsed().as_secs_f64());
        results
    }

    /// Replaces this agent's copy of a partition with entries handed off by
    /// its previous home: `reset` starts the copy over at `first_index`.
    /// Entries are fsynced before this returns.
    pub fn apply_handoff(
        &self,
        topic: &Topic,
        partition: &Partition,
        reset: bool,
        first_index: u64,
        entries: Vec<shoal_storage::Entry>,
    ) -> Result<(), AgentError> {
        let dir = partition.dir.clone().unwrap_or_default();
        let err = |e: shoal_storage::StorageError| storage_err(&dir, e);
        let last = {
            let mut store = partition.store();
            let crate::topic::Store::Disk(log) = &mut *store else {
                return Ok(());
            };
            if reset {
                log.reset(first_index.max(1)).map_err(err)?;
            }
            for e in &entries {
                log.append_entry(e).map_err(err)?;
            }
            if let Some(handle) = log.write_buffered().map_err(err)? {
                handle.sync().map_err(|e| storage_err(&dir, e))?;
            }
            log.written_index()
        };
        partition.reset_committed(last);
        let window = topic.config().dedupe_window;
        let horizon = crate::time::now_ms().saturating_sub(window.as_millis() as u64);
        let mut dedupe = topic.dedupe.lock().unwrap_or_else(|p| p.into_inner());
        for e in &entries {
            if e.timestamp_ms < horizon {
                continue;
            }
            if let Ok(m) = Message::decode(&e.data) {
                if m.client_id {
                    dedupe.insert(m.id, e.timestamp_ms, partition.id, e.index);
                }
            }
        }
        Ok(())
    }

    /// Sets where the lag of replicated topics comes from (their Raft
    /// groups, not the local partitions).
    pub fn set_replicated_lag_hook(&self, hook: ReplicatedLagHook) {
        let _ = self.topic_hook.2.set(hook);
    }

    /// Recomputes `shoal_consumer_lag_messages` for the partitions this agent
    /// serves (for a replicated topic: leads) and the consumer groups that
    /// read them now.
    pub fn refresh_lag_metrics(&self) {
        let per_topic = self.metrics.topic_labels();
        let mut totals: BTreeMap<String, i64> = BTreeMap::new();
        self.metrics.consumer_lag.clear();
        for topic in self.topics() {
            let groups = self.live_groups(&topic.name);
            if groups.is_empty() {
                continue;
            }
            let replicated = self
                .topic_hook
                .2
                .get()
                .filter(|_| crate::replication::is_replicated(&topic.config()));
            if let Some(hook) = replicated {
                for (partition, g, lag) in hook(&topic.name, &groups) {
                    let lag = i64::try_from(lag).unwrap_or(i64::MAX);
                    if per_topic {
                        self.metrics
                            .consumer_lag
                            .get_or_create(&crate::metrics::LagLabels {
                                topic: topic.name.to_string(),
                                group: g,
                                partition: partition.to_string(),
                            })
                            .set(lag);
                    } else {
                        *totals.entry(g).or_default() += lag;
                    }
                }
                continue;
            }
            for p in topic.partitions() {
                if p.role() != crate::topic::Role::Serving {
                    continue;
                }
                let end = p.committed() + 1;
                for g in &groups {
                    let Some(next) = p.committed_offset(g) else {
                        continue;
                    };
                    let lag = i64::try_from(end.saturating_sub(next)).unwrap_or(i64::MAX);
                    if per_topic {
                        self.metrics
                            .consumer_lag
                            .get_or_create(&crate::metrics::LagLabels {
                                topic: topic.name.to_string(),
                                group: g.clone(),
                                partition: p.id.to_string(),
                            })
                            .set(lag);
                    } else {
                        *totals.entry(g.clone()).or_default() += lag;
                    }
                }
            }
        }
        for (group, lag) in totals {
            self.metrics
                .consumer_lag
                .get_or_create(&crate::metrics::LagLabels {
                    topic: crate::metrics::ALL_TOPICS.to_string(),
                    group,
                    partition: crate::metrics::ALL_TOPICS.to_string(),
                })
                .set(lag);
        }
    }

    /// Writes everything buffered, checkpoints offsets and stops the flusher.
    pub fn shutdown(&self) {
        self.flusher.stop();
    }
}

/// The answer for a partition this agent is not (or not yet) serving.
pub fn not_home(topic: &str, partition: u32) -> ApiError {
    ApiError::unavailable(
        "not_home",
        format!("partition {partition} of topic {topic:?} is moving between agents; retry shortly"),
        1,
    )
}

/// The partition a message goes to: by its key; else by its `Shoal-Id`, so
/// a retried publish meets its first attempt's dedupe entry; else round robin.
pub fn choose_partition(topic: &Topic, m: &Message) -> u32 {
    let count = topic.partition_count().max(1);
    match &m.key {
        Some(key) => partition_for_key(key, count),
        None if m.client_id => partition_for_key(&m.id, count),
        None => topic.next_partition.fetch_add(1, Ordering::Relaxed) % count,
    }
}
