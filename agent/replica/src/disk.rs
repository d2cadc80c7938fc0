//! A group's store on disk: the partition's `shoal-storage` log is the Raft
//! log, and a small `raft-state` file beside it holds the rest.
//!
//! This is the one module of the crate that does I/O; the driver and the
//! groups see only [`LogStore`].
//!
//! - **Entries.** Each Raft entry is one log record: index and term as they
//!   are, the data prefixed with one byte of entry type, and the record's
//!   timestamp taken from the command (the leader's clock), so retention by
//!   age and reads by time work on every replica alike.
//! - **`raft-state`.** Term, vote, commit, configuration, where the log
//!   starts, the state machine's manifest there, and the recovering flag:
//!   postcard behind a CRC32C and a version byte, written with
//!   `shoal_storage::meta::write_atomic` (temp file, fsync, rename, fsync).
//!   Term, vote and configuration are written before the messages that
//!   depend on them leave (the driver sends those after [`LogStore::sync`]);
//!   a commit index alone is written lazily (every [`COMMIT_WRITE_STRIDE`]
//!   entries): after a crash it is learned again from the leader.
//! - **Lost entries.** When `shoal-storage` recovery cut the log (a corrupt
//!   or torn record) or the state file is unreadable, the replica counts as
//!   having lost entries it may have acknowledged ([`LogStore::lost_entries`]).

use crate::store::{LogStore, RaftMeta, StoreError};
use crate::wire;
use raft::eraftpb::{Entry, EntryType, HardState};
use serde::{Deserialize, Serialize};
use shoal_storage::{Log, LogConfig, StorageError};
use std::path::{Path, PathBuf};

/// Name of the state file in a partition's directory.
pub const STATE_FILE: &str = "raft-state";
/// A commit index alone is written once it moved this far.
pub const COMMIT_WRITE_STRIDE: u64 = 4096;
const STATE_VERSION: u8 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct StateFile {
    term: u64,
    vote: u64,
    commit: u64,
    conf_state: shoal_proto::raft::ConfState,
    conf_index: u64,
    snapshot_index: u64,
    snapshot_term: u64,
    manifest: Vec<u8>,
    recovering: bool,
}

impl StateFile {
    fn of(meta: &RaftMeta) -> Self {
        StateFile {
            term: meta.hard_state.term,
            vote: meta.hard_state.vote,
            commit: meta.hard_state.commit,
            conf_state: wire::conf_state_to_wire(&meta.conf_state),
            conf_index: meta.conf_index,
            snapshot_index: meta.snapshot_index,
            snapshot_term: meta.snapshot_term,
            manifest: meta.manifest.clone(),
            recovering: meta.recovering,
        }
    }

    fn into_meta(self) -> Result<RaftMeta, String> {
        let conf_state = wire::conf_state_from_wire(self.conf_state).map_err(|e| e.to_string())?;
        let hard_state = HardState {
            term: self.term,
            vote: self.vote,
            commit: self.commit,
            ..HardState::default()
        };
        Ok(RaftMeta {
            hard_state,
            conf_state,
            snapshot_index: self.snapshot_index,
            snapshot_term: self.snapshot_term,
            manifest: self.manifest,
            conf_index: self.conf_index,
            recovering: self.recovering,
        })
    }

    /// Whether writing `self` matters before messages leave (anything but
    /// the commit index moved).
    fn differs_beyond_commit(&self, other: &StateFile) -> bool {
        let mut a = self.clone();
        a.commit = other.commit;
        a != *other
    }
}

fn encode_state(state: &StateFile) -> Vec<u8> {
    let body = postcard::to_allocvec(state).unwrap_or_default();
    let mut out = Vec::with_capacity(body.len() + 5);
    out.push(STATE_VERSION);
    out.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

fn decode_state(bytes: &[u8]) -> Result<StateFile, String> {
    let (&version, rest) = bytes.split_first().ok_or("empty state file")?;
    if version != STATE_VERSION {
        return Err(format!(
            "state file version {version}, this build reads {STATE_VERSION}"
        ));
    }
    let crc = rest
        .get(..4)
        .and_then(|c| <[u8; 4]>::try_from(c).ok())
        .map(u32::from_le_bytes)
        .ok_or("state file too short")?;
    let body = &rest[4..];
    if crc32c::crc32c(body) != crc {
        return Err("state file checksum mismatch".into());
    }
    postcard::from_bytes(body).map_err(|e| format!("state file unreadable: {e}"))
}

fn io(e: impl std::fmt::Display) -> StoreError {
    StoreError::Io(e.to_string())
}

/// When a group's log writes reach the disk, from the topic's fsync policy.
/// Term, vote and configuration are fsynced before the messages that depend
/// on them leave, whatever the policy: only message entries wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SyncPolicy {
    /// Every round's writes are fsynced before this replica acknowledges
    /// them: an acknowledged entry is on the disks of a majority.
    #[default]
    Always,
    /// Written to the OS before acknowledged, fsynced by [`LogStore::flush`]
    /// (every `--fsync-interval`): an acknowledged entry is in the page cache
    /// of a majority, so it survives any process dying, not a majority of
    /// machines losing power within the interval.
    Interval,
    /// Written to the OS before acknowledged; the OS writes it back when it
    /// likes (and the store fsyncs it before the state file names it).
    Never,
}

/// A group's log and state in one directory.
pub struct DiskStore {
    dir: PathBuf,
    log: Log,
    policy: SyncPolicy,
    /// Files written and not yet fsynced (`Interval`, `Never`).
    unsynced: Option<shoal_storage::SyncHandle>,
    /// Files a flush outside the lock is fsyncing now
    /// ([`DiskStore::begin_flush`]); not durable until it ends.
    flushing: Option<shoal_storage::SyncHandle>,
    meta: RaftMeta,
    /// What `raft-state` holds now.
    written: StateFile,
    lost: bool,
    /// What opening found, for logs and metrics.
    problem: Option<String>,
}

impl std::fmt::Debug for DiskStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskStore")
            .field("dir", &self.dir)
            .field("first", &self.log.first_index())
            .field("last", &self.log.last_index())
            .finish_non_exhaustive()
    }
}

impl DiskStore {
    /// Opens (creating if missing) the store in `dir`, recovering the log.
    pub fn open(dir: &Path, config: LogConfig) -> Result<DiskStore, StoreError> {
        std::fs::create_dir_all(dir).map_err(io)?;
        let (log, recovery) = Log::open(dir, config).map_err(io)?;
        let mut problem = recovery.problem.clone();
        let path = dir.join(STATE_FILE);
        let meta = match shoal_storage::meta::read(&path).map_err(io)? {
            None => RaftMeta::default(),
            Some(bytes) => match decode_state(&bytes).and_then(StateFile::into_meta) {
                Ok(meta) => meta,
                Err(e) => {
                    // Keep the bad file for a person to look at; start over as
                    // a replica that lost everything (it will not vote until
                    // a leader has caught it up).
                    let aside = dir.join(format!("{STATE_FILE}.bad"));
                    std::fs::rename(&path, &aside).map_err(io)?;
                    tracing::warn!(dir = %dir.display(), error = %e, "raft state unreadable; moved aside");
                    problem.get_or_insert(e);
                    RaftMeta::default()
                }
            },
        };
        if let Some(p) = &problem {
            tracing::warn!(dir = %dir.display(), problem = %p, "replica lost entries on open");
        }
        Ok(DiskStore {
            dir: dir.to_path_buf(),
            log,
            policy: SyncPolicy::Always,
            unsynced: None,
            flushing: None,
            written: StateFile::of(&meta),
            meta,
            lost: problem.is_some(),
            problem,
        })
    }

    /// What recovery found when opening, if anything.
    pub fn problem(&self) -> Option<&str> {
        self.problem.as_deref()
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The sync policy now.
    pub fn sync_policy(&self) -> SyncPolicy {
        self.policy
    }

    /// Changes the sync policy. Whatever was written under the old one is
    /// fsynced first, so a switch never leaves writes behind (`interval` to
    /// `never`) or an `always` store with unsynced entries.
    pub fn set_sync_policy(&mut self, policy: SyncPolicy) -> Result<(), StoreError> {
        if policy == self.policy {
            return Ok(());
        }
        self.sync_unsynced()?;
        self.policy = policy;
        Ok(())
    }

    /// Fsyncs the log files written and not synced yet. A failed fsync keeps
    /// them pending (and the caller stops the replica: after a failed fsync
    /// the kernel may have dropped the pages, so a retry proves nothing).
    fn sync_unsynced(&mut self) -> Result<(), StoreError> {
        // A flush under way outside the lock may not have reached these
        // files yet: what must be durable now is synced here as well.
        if let Some(handle) = self.flushing.take() {
            match &mut self.unsynced {
                Some(pending) => pending.merge(handle),
                None => self.unsynced = Some(handle),
            }
        }
        if let Some(handle) = self.unsynced.take() {
            if let Err(e) = handle.sync() {
                self.unsynced = Some(handle);
                return Err(io(e));
            }
        }
        Ok(())
    }

    /// Starts an `interval` flush that the caller runs without holding
    /// the driver's lock, so an fsync does not stall publishes and peers:
    /// hands out the files written since the last flush, and keeps them as
    /// not yet durable until [`DiskStore::end_flush`]. `None` when there is
    /// nothing to flush (or the policy is not `interval`).
    pub fn begin_flush(&mut self) -> Option<shoal_storage::SyncHandle> {
        if self.policy != SyncPolicy::Interval {
            return None;
        }
        let handle = self.unsynced.take()?;
        match &mut self.flushing {
            Some(flushing) => flushing.merge(handle.clone()),
            None => self.flushing = Some(handle.clone()),
        }
        Some(handle)
    }

    /// Ends a flush [`DiskStore::begin_flush`] started, with the fsync's
    /// result. A failed fsync keeps the files pending and fails the store
    /// (the caller stops the replica, as after a failed write), even if
    /// another sync covered them meanwhile: after a failed fsync the kernel
    /// may have dropped the pages.
    pub fn end_flush(&mut self, synced: std::io::Result<()>) -> Result<(), StoreError> {
        let flushed = self.flushing.take();
        match synced {
            Ok(()) => Ok(()),
            Err(e) => {
                if let Some(handle) = flushed {
                    match &mut self.unsynced {
                        Some(pending) => pending.merge(handle),
                        None => self.unsynced = Some(handle),
                    }
                }
                Err(io(e))
            }
        }
    }

    /// The underlying log (for reads by consumers and storage gauges).
    pub fn log(&self) -> &Log {
        &self.log
    }

    fn write_state(&mut self) -> Result<(), StoreError> {
        let state = StateFile::of(&self.meta);
        if state == self.written {
            return Ok(());
        }
        // The state names a commit index, a configuration and a log start
        // that the log must back after a power loss: under `interval` and
        // `never` its entries are fsynced first (rare: terms, membership,
        // compaction, every `COMMIT_WRITE_STRIDE` commits).
        self.sync_unsynced()?;
        shoal_storage::meta::write_atomic(&self.dir.join(STATE_FILE), &encode_state(&state))
            .map_err(io)?;
        self.written = state;
        Ok(())
    }
}

fn storage_error(e: StorageError) -> StoreError {
    match e {
        StorageError::Compacted { first_index } => StoreError::Compacted {
            index: first_index.saturating_sub(1),
            first: first_index,
        },
        other => StoreError::Io(other.to_string()),
    }
}

fn timestamp_of(entry: &Entry) -> u64 {
    if entry.get_entry_type() != EntryType::EntryNormal {
        return 0;
    }
    crate::command::Command::decode(&entry.data)
        .map(|c| c.timestamp_ms())
        .unwrap_or(0)
}

fn entry_type_byte(t: EntryType) -> u8 {
    match t {
        EntryType::EntryNormal => 0,
        EntryType::EntryConfChange => 1,
        EntryType::EntryConfChangeV2 => 2,
    }
}

impl LogStore for DiskStore {
    fn meta(&self) -> &RaftMeta {
        &self.meta
    }

    fn set_meta(&mut self, meta: RaftMeta) -> Result<(), StoreError> {
        self.meta = meta;
        Ok(())
    }

    fn first_index(&self) -> u64 {
        // Compaction drops whole segments, so the file may still hold
        // entries below the log start the state records; Raft starts there.
        self.log.first_index().max(self.meta.snapshot_index + 1)
    }

    fn last_index(&self) -> u64 {
        self.log.last_index()
    }

    fn term(&self, index: u64) -> Result<u64, StoreError> {
        if let Some(term) = self.log.term_at(index).map_err(storage_error)? {
            return Ok(term);
        }
        if index == self.meta.snapshot_index {
            return Ok(self.meta.snapshot_term);
        }
        if index < self.first_index() {
            return Err(StoreError::Compacted {
                index,
                first: self.first_index(),
            });
        }
        Err(StoreError::Unavailable {
            index,
            last: self.log.last_index(),
        })
    }

    fn entries(&self, lo: u64, hi: u64, max_bytes: u64) -> Result<Vec<Entry>, StoreError> {
        if lo < self.first_index() {
            return Err(StoreError::Compacted {
                index: lo,
                first: self.first_index(),
            });
        }
        if hi > self.log.written_index() + 1 {
            return Err(StoreError::Unavailable {
                index: hi - 1,
                last: self.log.written_index(),
            });
        }
        let max_bytes = usize::try_from(max_bytes).unwrap_or(usize::MAX);
        let records = self
            .log
            .read(lo, (hi - lo) as usize, max_bytes)
            .map_err(storage_error)?;
        let mut out = Vec::with_capacity(records.len());
        for r in records {
            let (&kind, data) = r.data.split_first().ok_or_else(|| {
                StoreError::Io(format!(
                    "entry {} of {} has no type",
                    r.index,
                    self.dir.display()
                ))
            })?;
            let entry_type = match kind {
                0 => EntryType::EntryNormal,
                1 => EntryType::EntryConfChange,
                2 => EntryType::EntryConfChangeV2,
                other => {
                    return Err(StoreError::Io(format!(
                        "entry {} of {} has unknown type {other}",
                        r.index,
                        self.dir.display()
                    )))
                }
            };
            let mut e = Entry {
                index: r.index,
                term: r.term,
                data: r.data.slice(1..1 + data.len()),
                ..Entry::default()
            };
            e.set_entry_type(entry_type);
            out.push(e);
        }
        Ok(out)
    }

    fn append(&mut self, entries: &[Entry]) -> Result<(), StoreError> {
        let Some(first) = entries.first() else {
            return Ok(());
        };
        if first.index < self.first_index() || first.index > self.log.last_index() + 1 {
            return Err(StoreError::NonContiguous {
                got: first.index,
                last: self.log.last_index(),
            });
        }
        if first.index <= self.log.last_index() {
            self.log
                .truncate_after(first.index - 1)
                .map_err(storage_error)?;
        }
        let mut data = Vec::new();
        for e in entries {
            data.clear();
            data.push(entry_type_byte(e.get_entry_type()));
            data.extend_from_slice(&e.data);
            self.log
                .append_entry(&shoal_storage::Entry {
                    index: e.index,
                    term: e.term,
                    timestamp_ms: timestamp_of(e),
                    data: bytes::Bytes::copy_from_slice(&data),
                })
                .map_err(storage_error)?;
        }
        Ok(())
    }

    fn reset(&mut self, index: u64, _term: u64) -> Result<(), StoreError> {
        // The snapshot's meta goes to disk first, so a crash in the middle of
        // the reset is redone on open (see `group::repair`).
        self.write_state()?;
        self.log.reset(index + 1).map_err(storage_error)
    }

    fn compact(&mut self, first_index: u64) -> Result<(), StoreError> {
        self.write_state()?;
        self.log.drop_before(first_index).map_err(storage_error)?;
        Ok(())
    }

    fn sync(&mut self) -> Result<(), StoreError> {
        if let Some(handle) = self.log.write_buffered().map_err(storage_error)? {
            match (self.policy, &mut self.unsynced) {
                (SyncPolicy::Always, _) => handle.sync().map_err(io)?,
                (_, Some(pending)) => pending.merge(handle),
                (_, None) => self.unsynced = Some(handle),
            }
        }
        let state = StateFile::of(&self.meta);
        let commit_moved = state.commit >= self.written.commit + COMMIT_WRITE_STRIDE;
        if state.differs_beyond_commit(&self.written) || commit_moved {
            self.write_state()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<bool, StoreError> {
        if self.policy != SyncPolicy::Interval
            || (self.unsynced.is_none() && self.flushing.is_none())
        {
            return Ok(false);
        }
        self.sync_unsynced()?;
        Ok(true)
    }

    fn lost_entries(&self) -> bool {
        self.lost
    }
}
