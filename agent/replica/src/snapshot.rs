//! What a group's snapshot carries: the state machine's manifest, where the
//! log starts, and the configuration in force.
//!
//! A leader builds one at the entry before its log's start, so the replica
//! it catches up receives the log itself through ordinary appends, in
//! batches, whatever the partition's size (see `Group::build_snapshot`).
//! Earlier agents built theirs at the applied index with every entry the
//! leader held in it; `entries` carries those, and this agent still
//! installs them, so a rolling upgrade mixes both. A body is decoded with
//! postcard and checked before raft-rs sees it.

use crate::wire::{self, WireError};
use raft::eraftpb::Entry;
use serde::{Deserialize, Serialize};
use shoal_proto::raft as w;

/// The body of a snapshot (raft-rs `Snapshot::data`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotData {
    /// The partition state machine's manifest at the snapshot's index.
    pub manifest: Vec<u8>,
    /// The first index of the entries below (the leader's log start).
    pub log_start: u64,
    /// The term of the entry before `log_start`.
    pub log_start_term: u64,
    /// Entries `log_start ..= snapshot index`: empty in the snapshots this
    /// agent builds (they stand at `log_start - 1`).
    pub entries: Vec<w::RaftEntry>,
}

/// A snapshot body that does not hold together.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SnapshotError {
    /// Not postcard of [`SnapshotData`].
    #[error("malformed snapshot: {0}")]
    Malformed(String),
    /// Entries that do not run from `log_start` to the snapshot's index.
    #[error("snapshot entries do not run from {log_start} to {index}")]
    Gap {
        /// Claimed start.
        log_start: u64,
        /// The snapshot's index.
        index: u64,
    },
    /// The last entry's term is not the snapshot's.
    #[error("snapshot term {0} does not match its last entry")]
    Term(u64),
    /// An entry that cannot be converted.
    #[error(transparent)]
    Entry(#[from] WireError),
    /// The manifest inside is unreadable.
    #[error(transparent)]
    Manifest(#[from] crate::state::ManifestError),
}

impl SnapshotData {
    /// Encodes the body.
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_allocvec(self).unwrap_or_default()
    }

    /// Decodes and checks a body against the snapshot's index and term.
    pub fn decode(
        data: &[u8],
        index: u64,
        term: u64,
    ) -> Result<(SnapshotData, Vec<Entry>), SnapshotError> {
        let body: SnapshotData =
            postcard::from_bytes(data).map_err(|e| SnapshotError::Malformed(e.to_string()))?;
        crate::state::PartitionState::decode_manifest(&body.manifest, 0)?;
        if body.log_start == 0
            || body.log_start > index + 1
            || body.entries.len() as u64 != index + 1 - body.log_start
        {
            return Err(SnapshotError::Gap {
                log_start: body.log_start,
                index,
            });
        }
        let mut entries = Vec::with_capacity(body.entries.len());
        let mut last_term = body.log_start_term;
        for (i, e) in body.entries.iter().enumerate() {
            if e.index != body.log_start + i as u64 || e.term < last_term {
                return Err(SnapshotError::Gap {
                    log_start: body.log_start,
                    index,
                });
            }
            last_term = e.term;
            entries.push(wire::entry_from_wire(e.clone())?);
        }
        if last_term != term {
            return Err(SnapshotError::Term(term));
        }
        Ok((body, entries))
    }
}
