//! The storage seam of a group, and a simulated disk.
//!
//! A [`LogStore`] holds one group's Raft log and its [`RaftMeta`] (hard state,
//! configuration, where the log starts, the state machine's manifest there).
//! Writes are buffered; [`LogStore::sync`] makes everything before it
//! durable. The driver syncs every store it wrote in a round before it sends
//! the messages that promise durability (votes, append acknowledgements),
//! which is what lets a round's writes share one sync phase.
//!
//! Entries are raft-rs [`Entry`] values. Their data is a [`crate::command`]
//! for normal entries and a protobuf `ConfChangeV2` for configuration
//! entries; the latter is only ever produced by this process's own encoder
//! (see [`crate::wire`]), so parsing it back is parsing our own bytes.

use raft::eraftpb::{ConfState, Entry, HardState};

/// What a store keeps beside the log, written as one unit.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RaftMeta {
    /// Term, vote and commit index.
    pub hard_state: HardState,
    /// The configuration as of the last applied configuration entry.
    pub conf_state: ConfState,
    /// The log starts after this index (0 for a log that was never cut).
    pub snapshot_index: u64,
    /// The term of `snapshot_index`.
    pub snapshot_term: u64,
    /// The state machine's manifest at (or after) `snapshot_index`.
    pub manifest: Vec<u8>,
    /// Index of the configuration entry `conf_state` comes from (or of the
    /// snapshot that carried it), so a replay after a restart skips it.
    pub conf_index: u64,
    /// The replica lost entries it may have acknowledged, or joined empty,
    /// and has not yet caught up with a leader: it does not vote.
    pub recovering: bool,
}

/// Why a store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The index asked for was cut by a snapshot or retention.
    #[error("index {index} is compacted (the log starts at {first})")]
    Compacted {
        /// Asked for.
        index: u64,
        /// First index held.
        first: u64,
    },
    /// The index asked for is past the end.
    #[error("index {index} is past the log's end {last}")]
    Unavailable {
        /// Asked for.
        index: u64,
        /// Last index held.
        last: u64,
    },
    /// Entries that do not follow the log.
    #[error("entries starting at {got} do not follow the log ending at {last}")]
    NonContiguous {
        /// First index given.
        got: u64,
        /// Last index held.
        last: u64,
    },
    /// The disk failed or holds something unreadable.
    #[error("{0}")]
    Io(String),
}

/// One group's durable Raft state. Implemented by the agent on
/// `shoal-storage` segments and by [`MemStore`] for the simulation.
pub trait LogStore {
    /// The state written beside the log.
    fn meta(&self) -> &RaftMeta;
    /// Replaces the state beside the log (durable after the next sync).
    fn set_meta(&mut self, meta: RaftMeta) -> Result<(), StoreError>;
    /// The first index held (`snapshot_index + 1`).
    fn first_index(&self) -> u64;
    /// The last index held (`snapshot_index` for an empty log).
    fn last_index(&self) -> u64;
    /// The term of `index`, for `snapshot_index ..= last_index`.
    fn term(&self, index: u64) -> Result<u64, StoreError>;
    /// Entries `lo .. hi`, at most `max_bytes` of data but at least one.
    fn entries(&self, lo: u64, hi: u64, max_bytes: u64) -> Result<Vec<Entry>, StoreError>;
    /// Appends entries, first cutting whatever the log holds from
    /// `entries[0].index` on (a new leader overwriting an uncommitted tail).
    fn append(&mut self, entries: &[Entry]) -> Result<(), StoreError>;
    /// Drops the whole log; it restarts after `index` (a snapshot installed).
    fn reset(&mut self, index: u64, term: u64) -> Result<(), StoreError>;
    /// Drops entries before `first_index` (retention).
    fn compact(&mut self, first_index: u64) -> Result<(), StoreError>;
    /// Makes every write so far durable, as far as the store's policy asks,
    /// before the messages that promise durability (votes, append
    /// acknowledgements) leave.
    fn sync(&mut self) -> Result<(), StoreError>;
    /// Makes durable the writes [`LogStore::sync`] left to a later flush (a
    /// store that syncs lazily, every interval); returns whether it synced
    /// anything. A store that syncs on every `sync` has nothing to flush.
    fn flush(&mut self) -> Result<bool, StoreError> {
        Ok(false)
    }
    /// Whether opening the store cut entries it had made durable (a
    /// corrupt record), so the replica may have lost entries it
    /// acknowledged. A torn unsynced tail does not count.
    fn lost_entries(&self) -> bool;
}

#[derive(Debug, Clone, Default)]
struct Disk {
    meta: RaftMeta,
    /// `entries[i]` has index `first + i`.
    first: u64,
    entries: Vec<Entry>,
}

impl Disk {
    fn last(&self) -> u64 {
        self.first + self.entries.len() as u64 - 1
    }

    fn apply(&mut self, op: &Op) {
        match op {
            Op::Meta(meta) => self.meta = meta.clone(),
            Op::Append(entries) => {
                if let Some(first) = entries.first() {
                    let keep = first.index.saturating_sub(self.first) as usize;
                    self.entries.truncate(keep);
                    self.entries.extend(entries.iter().cloned());
                }
            }
            Op::Reset(index) => {
                self.first = index + 1;
                self.entries.clear();
            }
            Op::Compact(first) => {
                let drop = first.saturating_sub(self.first) as usize;
                let drop = drop.min(self.entries.len());
                self.entries.drain(..drop);
                self.first += drop as u64;
            }
        }
    }
}

#[derive(Debug, Clone)]
enum Op {
    Meta(RaftMeta),
    Append(Vec<Entry>),
    Reset(u64),
    Compact(u64),
}

/// A simulated disk for one group: what the process sees, and what survives
/// a crash. Writes not yet synced survive a crash only in part: a prefix of
/// them, as a disk that reorders nothing but loses the unsynced tail.
#[derive(Debug, Clone)]
pub struct MemStore {
    live: Disk,
    durable: Disk,
    unsynced: Vec<Op>,
    syncs: u64,
    lost: bool,
}

impl Default for MemStore {
    fn default() -> Self {
        let disk = Disk {
            first: 1,
            ..Disk::default()
        };
        MemStore {
            live: disk.clone(),
            durable: disk,
            unsynced: Vec::new(),
            syncs: 0,
            lost: false,
        }
    }
}

impl MemStore {
    /// An empty store.
    pub fn new() -> Self {
        MemStore::default()
    }

    /// The process crashed: what was synced survives, and the first `keep`
    /// unsynced writes (the simulation draws it).
    pub fn crash(&mut self, keep: usize) {
        for op in self.unsynced.iter().take(keep) {
            self.durable.apply(op);
        }
        self.unsynced.clear();
        self.live = self.durable.clone();
        self.lost = false;
    }

    /// Writes not yet synced.
    pub fn unsynced(&self) -> usize {
        self.unsynced.len()
    }

    /// How many syncs found something to sync.
    pub fn syncs(&self) -> u64 {
        self.syncs
    }

    /// Loses every entry from `index` on, in the durable copy too: what
    /// `shoal-storage` recovery does after it finds a flipped byte there (it
    /// cuts the log at the first bad record). The meta is kept, so the log
    /// may now end below the commit index it records.
    pub fn lose_from(&mut self, index: u64) {
        for disk in [&mut self.live, &mut self.durable] {
            if index >= disk.first {
                let keep = (index - disk.first) as usize;
                disk.entries.truncate(keep);
            }
        }
        self.lost = true;
    }

    fn write(&mut self, op: Op) {
        self.live.apply(&op);
        self.unsynced.push(op);
    }
}

impl LogStore for MemStore {
    fn meta(&self) -> &RaftMeta {
        &self.live.meta
    }

    fn set_meta(&mut self, meta: RaftMeta) -> Result<(), StoreError> {
        self.write(Op::Meta(meta));
        Ok(())
    }

    fn first_index(&self) -> u64 {
        self.live.first
    }

    fn last_index(&self) -> u64 {
        self.live.last()
    }

    fn term(&self, index: u64) -> Result<u64, StoreError> {
        let disk = &self.live;
        if index >= disk.first && index <= disk.last() {
            return Ok(disk.entries[(index - disk.first) as usize].term);
        }
        if index == disk.meta.snapshot_index {
            return Ok(disk.meta.snapshot_term);
        }
        if index < disk.first {
            return Err(StoreError::Compacted {
                index,
                first: disk.first,
            });
        }
        disk.entries
            .get((index - disk.first) as usize)
            .map(|e| e.term)
            .ok_or(StoreError::Unavailable {
                index,
                last: disk.last(),
            })
    }

    fn entries(&self, lo: u64, hi: u64, max_bytes: u64) -> Result<Vec<Entry>, StoreError> {
        let disk = &self.live;
        if lo < disk.first {
            return Err(StoreError::Compacted {
                index: lo,
                first: disk.first,
            });
        }
        if hi > disk.last() + 1 {
            return Err(StoreError::Unavailable {
                index: hi - 1,
                last: disk.last(),
            });
        }
        let mut out = Vec::new();
        let mut bytes = 0u64;
        for index in lo..hi {
            let entry = &disk.entries[(index - disk.first) as usize];
            bytes += entry.data.len() as u64;
            if !out.is_empty() && bytes > max_bytes {
                break;
            }
            out.push(entry.clone());
        }
        Ok(out)
    }

    fn append(&mut self, entries: &[Entry]) -> Result<(), StoreError> {
        let Some(first) = entries.first() else {
            return Ok(());
        };
        if first.index < self.live.first || first.index > self.live.last() + 1 {
            return Err(StoreError::NonContiguous {
                got: first.index,
                last: self.live.last(),
            });
        }
        self.write(Op::Append(entries.to_vec()));
        Ok(())
    }

    fn reset(&mut self, index: u64, _term: u64) -> Result<(), StoreError> {
        self.write(Op::Reset(index));
        Ok(())
    }

    fn compact(&mut self, first_index: u64) -> Result<(), StoreError> {
        self.write(Op::Compact(first_index));
        Ok(())
    }

    fn sync(&mut self) -> Result<(), StoreError> {
        if self.unsynced.is_empty() {
            return Ok(());
        }
        for op in self.unsynced.drain(..) {
            self.durable.apply(&op);
        }
        self.syncs += 1;
        Ok(())
    }

    fn lost_entries(&self) -> bool {
        self.lost
    }
}
