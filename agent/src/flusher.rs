//! The flusher: one OS thread for the slow storage work, kept off the
//! publish path where it can be.
//!
//! - `always` topics: publishers buffer and queue the partition; the flusher
//!   writes everything queued, fsyncs each file once, then answers them all.
//!   Publishers arriving meanwhile join the next round: group commit.
//! - `interval` topics: publishers write themselves ([`Partition::write_now`]);
//!   every `--fsync-interval` the flusher fsyncs each file written since.
//! - Every interval it also checkpoints committed offsets, and every
//!   [`RETENTION_INTERVAL`] applies retention and refreshes storage gauges.

use crate::metrics::{Metrics, OpLabel, TopicLabel};
use crate::topic::{Partition, Store, Topic};
use shoal_storage::SyncHandle;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

/// How often retention runs and storage gauges are refreshed.
pub const RETENTION_INTERVAL: Duration = Duration::from_secs(10);
/// Wait before retrying a partition whose write failed.
const WRITE_RETRY_DELAY: Duration = Duration::from_millis(100);

#[derive(Default)]
struct Queue {
    partitions: Vec<Arc<Partition>>,
    stop: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
    topics: Mutex<Vec<Weak<Topic>>>,
    metrics: Arc<Metrics>,
    interval: Duration,
}

/// Handle to the flusher thread.
#[derive(Clone)]
pub struct Flusher {
    shared: Arc<Shared>,
    thread: Arc<Mutex<Option<std::thread::JoinHandle<()>>>>,
}

impl std::fmt::Debug for Flusher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Flusher")
            .field("interval", &self.shared.interval)
            .finish()
    }
}

impl Flusher {
    /// Starts the flusher thread; `interval` is the fsync interval of `interval` topics.
    pub fn start(interval: Duration, metrics: Arc<Metrics>) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
            topics: Mutex::new(Vec::new()),
            metrics,
            interval,
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("shoal-flusher".into())
            .spawn(move || run(&s))?;
        Ok(Flusher {
            shared,
            thread: Arc::new(Mutex::new(Some(thread))),
        })
    }

    /// Registers a topic for offset checkpoints, retention and gauges.
    pub fn watch_topic(&self, topic: &Arc<Topic>) {
        let mut topics = lock(&self.shared.topics);
        topics.retain(|t| t.strong_count() > 0);
        topics.push(Arc::downgrade(topic));
    }

    /// Queues a partition with buffered entries.
    pub fn schedule(&self, partition: &Arc<Partition>) {
        if partition.queued.swap(true, Ordering::AcqRel) {
            return;
        }
        lock(&self.shared.queue).partitions.push(partition.clone());
        self.shared.wake.notify_one();
    }

    /// Writes and syncs everything, checkpoints offsets, and stops the thread.
    pub fn stop(&self) {
        lock(&self.shared.queue).stop = true;
        self.shared.wake.notify_one();
        if let Some(t) = lock(&self.thread).take() {
            if t.join().is_err() {
                tracing::error!("flusher thread panicked");
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn run(shared: &Shared) {
    let mut next_sync = Instant::now() + shared.interval;
    let mut next_retention = Instant::now() + RETENTION_INTERVAL;
    loop {
        let (batch, stop) = {
            let mut q = lock(&shared.queue);
            while q.partitions.is_empty() && !q.stop {
                let now = Instant::now();
                if now >= next_sync {
                    break;
                }
                q = shared
                    .wake
                    .wait_timeout(q, next_sync - now)
                    .map(|(g, _)| g)
                    .unwrap_or_else(|p| p.into_inner().0);
            }
            (std::mem::take(&mut q.partitions), q.stop)
        };
        // `always` partitions: write all, then one fsync per file, then answer.
        let mut sync_now = Vec::new();
        for p in batch {
            p.queued.store(false, Ordering::Release);
            match write_partition(&p) {
                Ok(Some((handle, written))) => sync_now.push((p, handle, written)),
                Ok(None) => {}
                Err(e) => {
                    shared
                        .metrics
                        .storage_errors
                        .get_or_create(&OpLabel { op: "write" })
                        .inc();
                    tracing::error!(topic = %p.topic, partition = p.id, error = %e, "writing the partition log failed; retrying");
                    std::thread::sleep(WRITE_RETRY_DELAY);
                    p.queued.store(true, Ordering::Release);
                    lock(&shared.queue).partitions.push(p);
                }
            }
        }
        for (p, handle, written) in sync_now {
            if sync(shared, &handle) {
                p.set_committed(written);
            } else {
                // Not acknowledged: the publisher times out with 503 and may retry.
                p.return_unsynced(handle);
            }
        }
        let now = Instant::now();
        if now >= next_sync || stop {
            next_sync = now + shared.interval;
            if stop {
                // Anything buffered (a publish cut short by the stop) is written too.
                for topic in live_topics(shared) {
                    for p in topic.partitions() {
                        if let Err(e) = p.write_now() {
                            tracing::error!(topic = %p.topic, partition = p.id, error = %e, "final write failed");
                        }
                    }
                }
            }
            sync_interval_partitions(shared);
            checkpoint_offsets(shared);
        }
        if now >= next_retention {
            next_retention = now + RETENTION_INTERVAL;
            retention_and_gauges(shared);
        }
        if stop {
            return;
        }
    }
}

/// The periodic fsync of `interval` partitions: each file written since the
/// last one is synced once, outside every lock publishers take.
fn sync_interval_partitions(shared: &Shared) {
    for topic in live_topics(shared) {
        for p in topic.partitions() {
            if let Some(handle) = p.take_unsynced() {
                if !sync(shared, &handle) {
                    p.return_unsynced(handle);
                }
            }
        }
    }
}

fn write_partition(
    p: &Partition,
) -> Result<Option<(SyncHandle, u64)>, shoal_storage::StorageError> {
    let mut store = p.store();
    let Store::Disk(log) = &mut *store else {
        return Ok(None);
    };
    let handle = log.write_buffered()?;
    let written = log.written_index();
    p.pending_bytes.store(0, Ordering::Relaxed);
    Ok(handle.map(|h| (h, written)))
}

fn sync(shared: &Shared, handle: &SyncHandle) -> bool {
    let started = Instant::now();
    let ok = match handle.sync() {
        Ok(()) => true,
        Err(e) => {
            shared
                .metrics
                .storage_errors
                .get_or_create(&OpLabel { op: "fsync" })
                .inc();
            tracing::error!(error = %e, "fsync failed");
            false
        }
    };
    shared.metrics.fsyncs.inc();
    shared
        .metrics
        .fsync_duration
        .observe(started.elapsed().as_secs_f64());
    ok
}

fn live_topics(shared: &Shared) -> Vec<Arc<Topic>> {
    lock(&shared.topics)
        .iter()
        .filter_map(Weak::upgrade)
        .collect()
}

/// Writes every changed committed-offset file (atomically).
fn checkpoint_offsets(shared: &Shared) {
    for topic in live_topics(shared) {
        for p in topic.partitions() {
            let Some(dir) = &p.dir else { continue };
            let body = {
                let mut o = lock(&p.offsets);
                if !o.dirty {
                    continue;
                }
                o.dirty = false;
                serde_json::to_vec(&o.committed).unwrap_or_default()
            };
            if let Err(e) =
                shoal_storage::meta::write_atomic(&dir.join(crate::broker::OFFSETS_FILE), &body)
            {
                lock(&p.offsets).dirty = true;
                shared
                    .metrics
                    .storage_errors
                    .get_or_create(&OpLabel { op: "offsets" })
                    .inc();
                tracing::error!(topic = %p.topic, partition = p.id, error = %e, "checkpointing committed offsets failed");
            }
        }
    }
}

fn retention_and_gauges(shared: &Shared) {
    let now_ms = crate::time::now_ms();
    // Summed per label: with topic labels off every topic shares one.
    let mut sizes: HashMap<String, (u64, usize)> = HashMap::new();
    for topic in live_topics(shared) {
        let config = topic.config();
        let (mut bytes, mut segments) = (0u64, 0usize);
        for p in topic.partitions() {
            let mut store = p.store();
            if let Store::Disk(log) = &mut *store {
                let max_age = config.retention.max_age.map(|d| d.as_millis() as u64);
                match log.enforce_retention(now_ms, max_age, config.retention.max_bytes) {
                    Ok(n) => {
                        shared.metrics.retention_deleted_segments.inc_by(n as u64);
                    }
                    Err(e) => {
                        shared
                            .metrics
                            .storage_errors
                            .get_or_create(&OpLabel { op: "retention" })
                            .inc();
                        tracing::error!(topic = %p.topic, partition = p.id, error = %e, "retention failed");
                    }
                };
            }
            drop(store);
            let (b, s) = p.storage_size();
            bytes += b;
            segments += s;
        }
        let slot = sizes.entry(topic.metrics.label.clone()).or_default();
        slot.0 += bytes;
        slot.1 += segments;
    }
    for (topic, (bytes, segments)) in sizes {
        let label = TopicLabel { topic };
        shared
            .metrics
            .storage_bytes
            .get_or_create(&label)
            .set(bytes as i64);
        shared
            .metrics
            .storage_segments
            .get_or_create(&label)
            .set(segments as i64);
    }
}
