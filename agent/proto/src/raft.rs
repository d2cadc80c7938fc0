//! Raft traffic between agents, in Shoal's own types.
//!
//! Every partition is a Raft group (raft-rs). Its messages cross the mesh in
//! these structs, converted field by field on both sides, so raft-rs's
//! protobuf types are never parsed from peer input (RUSTSEC-2024-0437 is a
//! stack overflow in the protobuf 2 parser). All messages for all groups
//! between one pair of agents in one driver round travel in one
//! [`RaftBatch`]: heartbeats of a thousand groups are one frame.

use serde::{Deserialize, Serialize};

/// Everything one agent's multi-raft driver sends another in one round.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RaftBatch {
    /// The sender's incarnation (its start time): a batch from an older
    /// incarnation of a peer (delayed past its restart) is dropped, so an
    /// acknowledgement from before a crash cannot count after it.
    pub incarnation: u64,
    /// Per group, its messages in order.
    pub groups: Vec<GroupMessages>,
}

/// The partition a group replicates.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct GroupRef {
    /// The owning namespace.
    pub namespace: String,
    /// Topic name.
    pub topic: String,
    /// Partition number.
    pub partition: u32,
}

/// One group's messages and signals in a batch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupMessages {
    /// The group.
    pub group: GroupRef,
    /// Raft messages, in the order the sender produced them.
    pub messages: Vec<RaftMessage>,
    /// Hibernation: the leader going quiet, or a replica waking the group.
    pub signal: Signal,
    /// The sender lost entries it may have acknowledged (a corrupt record
    /// cut its log, or it came back empty): its leader forgets how far the
    /// sender's log reaches and probes it again.
    pub recovering: bool,
    /// From a leader to a recovering follower: "I have forgotten your old
    /// acknowledgements". Only appends that follow it count toward the
    /// follower's recovery.
    pub progress_reset: bool,
}

/// What a replica tells its peers about the group's sleep.
///
/// Encoded exactly as the `Option<Hibernate>` it replaced (postcard writes
/// `Nothing` as 0 and `Hibernate` as 1 followed by its fields, as it wrote
/// `None` and `Some`), so an agent that knows only those two reads every
/// batch without `Wake` as before.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Signal {
    /// Nothing about sleep.
    #[default]
    Nothing,
    /// The leader is going quiet: stop ticking while nothing changes.
    Hibernate(Hibernate),
    /// A replica woke the group for a reason of its own (a publish or a read
    /// reached it, or the gossip suspects the leader): wake too. A leader
    /// that is alive then heartbeats before any woken follower's election
    /// timeout runs out, so waking followers never unseats it; a dead one
    /// is replaced by the woken followers, all timing out together.
    Wake,
}

/// A leader's request that its followers stop ticking the group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hibernate {
    /// The leader's term.
    pub term: u64,
    /// The leader's commit index; a follower behind it stays awake.
    pub commit: u64,
}

/// Kinds of Raft messages that may cross the mesh. Local-only kinds (hup,
/// beat, propose, unreachable, snapshot status, check quorum) have no
/// variant: a peer cannot send them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RaftMessageKind {
    /// Append entries.
    Append,
    /// Answer to an append.
    AppendResponse,
    /// Request a vote.
    RequestVote,
    /// Answer to a vote request.
    RequestVoteResponse,
    /// Install a snapshot.
    Snapshot,
    /// Leader heartbeat.
    Heartbeat,
    /// Answer to a heartbeat.
    HeartbeatResponse,
    /// Leadership transfer, from the transferee's side.
    TransferLeader,
    /// Campaign now (leadership transfer).
    TimeoutNow,
    /// Linearizable read request.
    ReadIndex,
    /// Answer to a read request.
    ReadIndexResponse,
    /// Pre-vote request.
    RequestPreVote,
    /// Answer to a pre-vote request.
    RequestPreVoteResponse,
}

/// One Raft message, field by field.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RaftMessage {
    /// Kind.
    pub kind: RaftMessageKind,
    /// Receiver's Raft id.
    pub to: u64,
    /// Sender's Raft id.
    pub from: u64,
    /// Sender's term.
    pub term: u64,
    /// Term of the entry before `entries`.
    pub log_term: u64,
    /// Index of the entry before `entries`, or the index answered.
    pub index: u64,
    /// Entries to append.
    pub entries: Vec<RaftEntry>,
    /// Leader's commit index.
    pub commit: u64,
    /// Term of the commit index (raft-rs uses it to fast-forward).
    pub commit_term: u64,
    /// A snapshot, for `Snapshot`.
    pub snapshot: Option<RaftSnapshot>,
    /// Index of a requested snapshot.
    pub request_snapshot: u64,
    /// A refusal.
    pub reject: bool,
    /// Where the refuser's log could match.
    pub reject_hint: u64,
    /// Opaque context (read index requests, campaign type).
    pub context: Vec<u8>,
    /// Election priority.
    pub priority: i64,
}

/// A log entry of a group.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RaftEntry {
    /// Term.
    pub term: u64,
    /// Index.
    pub index: u64,
    /// What the entry holds.
    pub payload: EntryPayload,
}

/// The content of an entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EntryPayload {
    /// A command of the partition's state machine (empty: a new leader's no-op).
    Normal(Vec<u8>),
    /// A membership change of the group.
    ConfChange(ConfChange),
}

/// A membership change (raft-rs `ConfChangeV2`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfChange {
    /// 0 auto, 1 implicit joint, 2 explicit joint.
    pub transition: u8,
    /// The single changes.
    pub changes: Vec<ConfChangeSingle>,
}

/// One change of a membership change.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfChangeSingle {
    /// What happens to the node.
    pub kind: ConfChangeKind,
    /// The node's Raft id.
    pub node: u64,
}

/// What a membership change does to one node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConfChangeKind {
    /// Becomes a voter.
    AddNode,
    /// Leaves the group.
    RemoveNode,
    /// Becomes a learner.
    AddLearner,
}

/// A group's configuration.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfState {
    /// Voters (of the incoming configuration when joint).
    pub voters: Vec<u64>,
    /// Learners.
    pub learners: Vec<u64>,
    /// Voters of the outgoing configuration, when joint.
    pub voters_outgoing: Vec<u64>,
    /// Voters that become learners when the joint configuration is left.
    pub learners_next: Vec<u64>,
    /// Leave the joint configuration by itself.
    pub auto_leave: bool,
}

/// A snapshot: where the log starts and the state machine's manifest; the
/// messages themselves follow as ordinary appends.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RaftSnapshot {
    /// Last index the snapshot covers.
    pub index: u64,
    /// Its term.
    pub term: u64,
    /// The configuration in force on the leader when it built the
    /// snapshot (at or after `index`).
    pub conf_state: ConfState,
    /// The state machine's manifest (consumer offsets, dedupe window), as
    /// of the leader's applied index when it built the snapshot.
    pub data: Vec<u8>,
}
