//! Sans-IO replication for Shoal: every partition is a Raft group.
//!
//! The engine is raft-rs (`raft` 0.7, TiKV's `RawNode`): it decides, this
//! crate owns ticks, messages and storage. Nothing here opens a socket, reads
//! a clock or touches a file: the agent's shell feeds in ticks, peer messages
//! and proposals, performs the writes the driver asks for, and sends the
//! batches it hands out. The same code runs in the deterministic simulation
//! of `tests/sim.rs`.
//!
//! - [`command`]: what a partition's log entries hold (messages, consumer
//!   offsets), encoded by hand, zero-copy.
//! - [`state`]: the partition's state machine, applied in log order: consumer
//!   offsets and the dedupe window, with the leader's timestamps.
//! - [`store`]: the storage seam ([`store::LogStore`]), and [`store::MemStore`],
//!   a simulated disk that loses what was not synced when it crashes.
//! - [`disk`]: the store on disk, `shoal-storage` segments plus a state file
//!   (the crate's only I/O).
//! - [`wire`]: raft-rs messages to and from Shoal's own frames
//!   ([`shoal_proto::raft`]), field by field.
//! - [`group`]: one partition's Raft node and state machine.
//! - [`driver`]: the multi-raft driver of one agent: all groups, one tick,
//!   one batch per peer per round, hibernation, paced membership changes.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod command;
pub mod disk;
pub mod driver;
pub mod group;
mod log;
pub mod snapshot;
pub mod state;
pub mod store;
pub mod wire;

pub use driver::{Driver, DriverConfig, Event, Outbox};
pub use group::{Bootstrap, GroupStatus};
pub use shoal_proto::raft::GroupRef as GroupId;

/// A replica's Raft id: a stable 64-bit hash of the agent's node name
/// ([`node_id`]), never 0 (raft-rs's "none").
pub type NodeId = u64;

/// The Raft id of an agent, from its node name (FNV-1a, 64 bits).
///
/// Stable across builds and platforms. Two names that collide would be one
/// voter: the driver refuses a peer whose name maps to an id it already
/// knows under another name ([`Error::IdCollision`]).
pub fn node_id(name: &str) -> NodeId {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in name.as_bytes() {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    if hash == 0 {
        1
    } else {
        hash
    }
}

/// Why a replication call failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// This replica is not the group's leader; `leader` is who is, if known.
    #[error("not the leader of {group} (leader: {leader:?})")]
    NotLeader {
        /// The group, as `namespace/topic/partition`.
        group: String,
        /// The leader's Raft id, when known.
        leader: Option<NodeId>,
    },
    /// The leader has not yet applied its own term's first entry, so its
    /// state machine (offsets, dedupe) may be behind: try again shortly.
    #[error("the leader of {0} is catching up")]
    LeaderCatchingUp(String),
    /// No such group on this agent.
    #[error("no replica of {0} here")]
    UnknownGroup(String),
    /// The group exists already.
    #[error("{0} exists already")]
    GroupExists(String),
    /// Two node names map to one Raft id.
    #[error("node names {a:?} and {b:?} have the same Raft id")]
    IdCollision {
        /// One name.
        a: String,
        /// The other.
        b: String,
    },
    /// The storage failed; the group stops until the agent restarts it.
    #[error("storage: {0}")]
    Store(#[from] store::StoreError),
    /// raft-rs refused (a proposal dropped, a bad configuration).
    #[error("raft: {0}")]
    Raft(#[from] raft::Error),
    /// A command too large or malformed.
    #[error(transparent)]
    Command(#[from] command::CommandError),
    /// A snapshot that does not hold together.
    #[error(transparent)]
    Snapshot(#[from] snapshot::SnapshotError),
    /// A peer's message no honest raft-rs peer sends; refused, not stepped.
    #[error("malformed raft message: {0}")]
    Malformed(&'static str),
}

/// `namespace/topic/partition`, for logs and errors.
pub fn group_name(group: &GroupId) -> String {
    format!("{}/{}/{}", group.namespace, group.topic, group.partition)
}

#[cfg(test)]
mod tests;
