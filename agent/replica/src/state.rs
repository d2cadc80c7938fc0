//! A partition's state machine: what applying its log in order yields
//! besides the messages themselves.
//!
//! - Consumer groups' committed offsets. A commit never moves an offset
//!   backwards, so replaying entries after a snapshot is harmless.
//! - The dedupe window: which `Shoal-Id` was stored at which offset, forgotten
//!   once the leader's clock (the timestamps in the entries, never the local
//!   clock) has moved past it by the window. The window's length is itself
//!   set by entries (`Command::Window`), so it changes at the same index on
//!   every replica.
//!
//! Every replica applies the same entries with the same timestamps, so every
//! replica holds the same state at the same index.

use crate::command::Command;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

/// The default dedupe window: 2 minutes.
pub const DEFAULT_DEDUPE_WINDOW_MS: u64 = 120_000;

/// What applying one entry did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// Nothing visible (a no-op, a configuration change).
    Nothing,
    /// A message stored at this index.
    Message,
    /// A message whose id was stored before, at `original`, within the
    /// window: readers skip it and its publisher is answered with `original`.
    Duplicate {
        /// Where the id was first stored.
        original: u64,
    },
    /// A consumer group's offset moved (or stayed, if it was older).
    Commit,
}

/// The state machine of one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionState {
    applied: u64,
    clock_ms: u64,
    window_ms: u64,
    offsets: BTreeMap<String, u64>,
    ids: HashMap<String, (u64, u64)>,
    expiry: VecDeque<(u64, String)>,
    /// Indexes applied as [`Applied::Duplicate`]: readers skip them by
    /// index, whatever the window says when they read.
    duplicates: BTreeSet<u64>,
}

/// The state machine as a snapshot carries it (postcard).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Index the state was taken at.
    pub applied: u64,
    /// The latest leader timestamp applied.
    pub clock_ms: u64,
    /// Committed offsets by group.
    pub offsets: Vec<(String, u64)>,
    /// Dedupe ids: (id, offset, timestamp ms), oldest first.
    pub ids: Vec<(String, u64, u64)>,
}

/// What a manifest carries after [`Manifest`], outside it, so that an
/// agent that predates it reads the manifest and ignores the rest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct ManifestTail {
    /// The dedupe window's length.
    window_ms: u64,
    /// Indexes applied as duplicates, ascending.
    duplicates: Vec<u64>,
}

/// A manifest that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed partition manifest: {0}")]
pub struct ManifestError(String);

impl PartitionState {
    /// An empty state with the given dedupe window.
    pub fn new(window_ms: u64) -> Self {
        PartitionState {
            applied: 0,
            clock_ms: 0,
            window_ms,
            offsets: BTreeMap::new(),
            ids: HashMap::new(),
            expiry: VecDeque::new(),
            duplicates: BTreeSet::new(),
        }
    }

    /// The last index applied.
    pub fn applied(&self) -> u64 {
        self.applied
    }

    /// The latest leader timestamp applied.
    pub fn clock_ms(&self) -> u64 {
        self.clock_ms
    }

    /// A group's committed offset (the next offset it reads).
    pub fn offset(&self, group: &str) -> Option<u64> {
        self.offsets.get(group).copied()
    }

    /// Every group's committed offset.
    pub fn offsets(&self) -> &BTreeMap<String, u64> {
        &self.offsets
    }

    /// The dedupe window's length now.
    pub fn window_ms(&self) -> u64 {
        self.window_ms
    }

    /// Where `id` was stored, if it is within the window at `now_ms`.
    pub fn lookup(&self, id: &str, now_ms: u64) -> Option<u64> {
        let (offset, at) = *self.ids.get(id)?;
        (now_ms.saturating_sub(at) < self.window_ms).then_some(offset)
    }

    /// Whether the entry at `index` was applied as a duplicate (its
    /// publisher was answered with the original): readers skip it.
    pub fn is_duplicate(&self, index: u64) -> bool {
        self.duplicates.contains(&index)
    }

    /// Forgets what it knows of entries before `first_index` (the log
    /// starts there now).
    pub fn forget_before(&mut self, first_index: u64) {
        self.duplicates = self.duplicates.split_off(&first_index);
    }

    /// Ids held in the window.
    pub fn ids_len(&self) -> usize {
        self.ids.len()
    }

    /// Applies the entry at `index`. Indexes at or below [`Self::applied`]
    /// are skipped (a replay after a snapshot).
    pub fn apply(&mut self, index: u64, command: &Command<'_>) -> Applied {
        if index <= self.applied {
            return Applied::Nothing;
        }
        self.applied = index;
        self.clock_ms = self.clock_ms.max(command.timestamp_ms());
        self.expire();
        match *command {
            Command::Noop => Applied::Nothing,
            Command::Message { id: None, .. } => Applied::Message,
            Command::Message {
                id: Some(id),
                timestamp_ms,
                ..
            } => match self.ids.get(id) {
                Some(&(original, _)) if original != index => {
                    self.duplicates.insert(index);
                    Applied::Duplicate { original }
                }
                _ => {
                    self.ids.insert(id.to_owned(), (index, timestamp_ms));
                    self.expiry.push_back((timestamp_ms, id.to_owned()));
                    Applied::Message
                }
            },
            Command::Commit { group, next, .. } => {
                let offset = self.offsets.entry(group.to_owned()).or_insert(next);
                *offset = (*offset).max(next);
                Applied::Commit
            }
            Command::Window { window_ms, .. } => {
                self.window_ms = window_ms;
                self.expire();
                Applied::Nothing
            }
        }
    }

    /// Marks `index` applied without a command (a configuration change).
    pub fn skip(&mut self, index: u64) {
        self.applied = self.applied.max(index);
    }

    fn expire(&mut self) {
        while let Some(&(at, _)) = self.expiry.front() {
            if self.clock_ms.saturating_sub(at) < self.window_ms {
                break;
            }
            if let Some((_, id)) = self.expiry.pop_front() {
                if self.ids.get(&id).is_some_and(|&(_, t)| t == at) {
                    self.ids.remove(&id);
                }
            }
        }
    }

    /// The state as a snapshot carries it.
    pub fn manifest(&self) -> Manifest {
        Manifest {
            applied: self.applied,
            clock_ms: self.clock_ms,
            offsets: self.offsets.iter().map(|(g, o)| (g.clone(), *o)).collect(),
            ids: self
                .expiry
                .iter()
                .filter_map(|(at, id)| {
                    let &(offset, t) = self.ids.get(id)?;
                    (t == *at).then(|| (id.clone(), offset, t))
                })
                .collect(),
        }
    }

    /// Encodes [`Self::manifest`], then the window's length and the
    /// duplicates' indexes after it.
    pub fn encode_manifest(&self) -> Vec<u8> {
        let Ok(mut out) = postcard::to_allocvec(&self.manifest()) else {
            return Vec::new();
        };
        let tail = ManifestTail {
            window_ms: self.window_ms,
            duplicates: self.duplicates.iter().copied().collect(),
        };
        if let Ok(tail) = postcard::to_allocvec(&tail) {
            out.extend_from_slice(&tail);
        }
        out
    }

    /// The state a manifest describes.
    pub fn from_manifest(manifest: Manifest, window_ms: u64) -> Self {
        let mut state = PartitionState::new(window_ms);
        state.applied = manifest.applied;
        state.clock_ms = manifest.clock_ms;
        state.offsets = manifest.offsets.into_iter().collect();
        for (id, offset, at) in manifest.ids {
            state.ids.insert(id.clone(), (offset, at));
            state.expiry.push_back((at, id));
        }
        state
    }

    /// Decodes a manifest (from a peer's snapshot or our own disk);
    /// `window_ms` is the window when the manifest names none.
    pub fn decode_manifest(data: &[u8], window_ms: u64) -> Result<Self, ManifestError> {
        if data.is_empty() {
            return Ok(PartitionState::new(window_ms));
        }
        let (manifest, rest): (Manifest, &[u8]) =
            postcard::take_from_bytes(data).map_err(|e| ManifestError(e.to_string()))?;
        // A manifest written before windows went through the log has no
        // tail: the configured default holds until the log sets one.
        if rest.is_empty() {
            return Ok(PartitionState::from_manifest(manifest, window_ms));
        }
        let tail: ManifestTail =
            postcard::from_bytes(rest).map_err(|e| ManifestError(e.to_string()))?;
        let mut state = PartitionState::from_manifest(manifest, tail.window_ms);
        state.duplicates = tail.duplicates.into_iter().collect();
        Ok(state)
    }
}
