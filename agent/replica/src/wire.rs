//! raft-rs messages to and from Shoal's frames, field by field.
//!
//! Outgoing: every field of a raft-rs `Message` is copied into a
//! [`shoal_proto::raft::RaftMessage`]; a configuration entry's data (a
//! protobuf `ConfChangeV2` this process encoded itself) becomes a
//! [`shoal_proto::raft::ConfChange`]. Incoming: the reverse, and the protobuf
//! bytes of a configuration entry are *encoded* here from the checked
//! struct, never parsed from what the peer sent. Local-only message kinds
//! (propose, hup, beat, unreachable, snapshot status, check quorum) have no
//! wire form, so a peer cannot inject them.

use protobuf::Message as _;
use raft::eraftpb::{
    ConfChangeSingle, ConfChangeTransition, ConfChangeType, ConfChangeV2, ConfState, Entry,
    EntryType, Message, MessageType, Snapshot,
};
use shoal_proto::raft as w;

/// Largest number of configuration changes in one entry a peer may send.
pub const MAX_CONF_CHANGES: usize = 16;
/// Largest number of nodes in a configuration a peer may send.
pub const MAX_CONF_NODES: usize = 64;
/// Indexes and terms from a peer stay below this (2^62).
pub const MAX_INDEX: u64 = 1 << 62;

/// A message that cannot cross the mesh.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// A local-only kind (such as a proposal) was about to be sent.
    #[error("raft message kind {0:?} is local and never sent")]
    LocalKind(MessageType),
    /// A configuration entry whose data is not a `ConfChangeV2` we encoded.
    #[error("configuration entry at {index} is unreadable")]
    BadConfEntry {
        /// The entry.
        index: u64,
    },
    /// A configuration larger than any Shoal builds.
    #[error("configuration of {0} nodes or changes is over the limit")]
    ConfTooLarge(usize),
    /// A transition value outside 0..=2.
    #[error("unknown configuration transition {0}")]
    BadTransition(u8),
    /// Raft id 0 (raft-rs's "none") as a sender or receiver.
    #[error("raft id 0 is not a node")]
    ZeroId,
    /// Term 0 marks a local message in raft-rs; none crosses the mesh.
    #[error("a {0:?} with term 0")]
    ZeroTerm(MessageType),
    /// An index or term no log reaches.
    #[error("index or term out of range")]
    OutOfRange,
    /// A configuration raft-rs could not restore (it would stop the process).
    #[error("inconsistent configuration: {0}")]
    BadConf(&'static str),
}

/// raft-rs message → wire form.
pub fn to_wire(m: &Message) -> Result<w::RaftMessage, WireError> {
    let kind = match m.get_msg_type() {
        MessageType::MsgAppend => w::RaftMessageKind::Append,
        MessageType::MsgAppendResponse => w::RaftMessageKind::AppendResponse,
        MessageType::MsgRequestVote => w::RaftMessageKind::RequestVote,
        MessageType::MsgRequestVoteResponse => w::RaftMessageKind::RequestVoteResponse,
        MessageType::MsgSnapshot => w::RaftMessageKind::Snapshot,
        MessageType::MsgHeartbeat => w::RaftMessageKind::Heartbeat,
        MessageType::MsgHeartbeatResponse => w::RaftMessageKind::HeartbeatResponse,
        MessageType::MsgTransferLeader => w::RaftMessageKind::TransferLeader,
        MessageType::MsgTimeoutNow => w::RaftMessageKind::TimeoutNow,
        MessageType::MsgReadIndex => w::RaftMessageKind::ReadIndex,
        MessageType::MsgReadIndexResp => w::RaftMessageKind::ReadIndexResponse,
        MessageType::MsgRequestPreVote => w::RaftMessageKind::RequestPreVote,
        MessageType::MsgRequestPreVoteResponse => w::RaftMessageKind::RequestPreVoteResponse,
        other => return Err(WireError::LocalKind(other)),
    };
    let entries = m
        .get_entries()
        .iter()
        .map(entry_to_wire)
        .collect::<Result<Vec<_>, _>>()?;
    let snapshot = if m.has_snapshot() && !m.get_snapshot().is_empty() {
        let s = m.get_snapshot();
        let meta = s.get_metadata();
        Some(w::RaftSnapshot {
            index: meta.index,
            term: meta.term,
            conf_state: conf_state_to_wire(meta.get_conf_state()),
            data: s.data.to_vec(),
        })
    } else {
        None
    };
    Ok(w::RaftMessage {
        kind,
        to: m.to,
        from: m.from,
        term: m.term,
        log_term: m.log_term,
        index: m.index,
        entries,
        commit: m.commit,
        commit_term: m.commit_term,
        snapshot,
        request_snapshot: m.request_snapshot,
        reject: m.reject,
        reject_hint: m.reject_hint,
        context: m.context.to_vec(),
        priority: m.priority,
    })
}

/// Wire form → raft-rs message, checked.
pub fn from_wire(m: w::RaftMessage) -> Result<Message, WireError> {
    if m.to == 0 || m.from == 0 {
        return Err(WireError::ZeroId);
    }
    let msg_type = match m.kind {
        w::RaftMessageKind::Append => MessageType::MsgAppend,
        w::RaftMessageKind::AppendResponse => MessageType::MsgAppendResponse,
        w::RaftMessageKind::RequestVote => MessageType::MsgRequestVote,
        w::RaftMessageKind::RequestVoteResponse => MessageType::MsgRequestVoteResponse,
        w::RaftMessageKind::Snapshot => MessageType::MsgSnapshot,
        w::RaftMessageKind::Heartbeat => MessageType::MsgHeartbeat,
        w::RaftMessageKind::HeartbeatResponse => MessageType::MsgHeartbeatResponse,
        w::RaftMessageKind::TimeoutNow => MessageType::MsgTimeoutNow,
        w::RaftMessageKind::RequestPreVote => MessageType::MsgRequestPreVote,
        w::RaftMessageKind::RequestPreVoteResponse => MessageType::MsgRequestPreVoteResponse,
        // Shoal forwards no leadership transfer and no read index across the
        // mesh; raft-rs would forward them, or index into them, unchecked.
        w::RaftMessageKind::TransferLeader => {
            return Err(WireError::LocalKind(MessageType::MsgTransferLeader))
        }
        w::RaftMessageKind::ReadIndex => {
            return Err(WireError::LocalKind(MessageType::MsgReadIndex))
        }
        w::RaftMessageKind::ReadIndexResponse => {
            return Err(WireError::LocalKind(MessageType::MsgReadIndexResp))
        }
    };
    if m.term == 0 {
        return Err(WireError::ZeroTerm(msg_type));
    }
    // raft-rs adds 1 to indexes and terms unchecked; no honest log comes
    // anywhere near these.
    let huge = |v: u64| v >= MAX_INDEX;
    if [
        m.term,
        m.log_term,
        m.index,
        m.commit,
        m.commit_term,
        m.reject_hint,
        m.request_snapshot,
    ]
    .into_iter()
    .any(huge)
        || m.entries.iter().any(|e| huge(e.index) || huge(e.term))
        || m.snapshot
            .as_ref()
            .is_some_and(|s| huge(s.index) || huge(s.term))
    {
        return Err(WireError::OutOfRange);
    }
    let mut out = Message::default();
    out.set_msg_type(msg_type);
    out.to = m.to;
    out.from = m.from;
    out.term = m.term;
    out.log_term = m.log_term;
    out.index = m.index;
    let entries = m
        .entries
        .into_iter()
        .map(entry_from_wire)
        .collect::<Result<Vec<_>, _>>()?;
    out.set_entries(entries.into());
    out.commit = m.commit;
    out.commit_term = m.commit_term;
    if let Some(s) = m.snapshot {
        let mut snap = Snapshot::default();
        let meta = snap.mut_metadata();
        meta.index = s.index;
        meta.term = s.term;
        meta.set_conf_state(conf_state_from_wire(s.conf_state)?);
        snap.data = s.data.into();
        out.set_snapshot(snap);
    }
    out.request_snapshot = m.request_snapshot;
    out.reject = m.reject;
    out.reject_hint = m.reject_hint;
    out.context = m.context.into();
    out.priority = m.priority;
    Ok(out)
}

/// A log entry → wire form.
pub fn entry_to_wire(e: &Entry) -> Result<w::RaftEntry, WireError> {
    let payload = match e.get_entry_type() {
        EntryType::EntryNormal => w::EntryPayload::Normal(e.data.to_vec()),
        EntryType::EntryConfChangeV2 => {
            w::EntryPayload::ConfChange(conf_change_to_wire(&conf_change_of(e)?))
        }
        // Shoal proposes only V2 changes; a V1 entry cannot be in its logs.
        EntryType::EntryConfChange => return Err(WireError::BadConfEntry { index: e.index }),
    };
    Ok(w::RaftEntry {
        term: e.term,
        index: e.index,
        payload,
    })
}

/// Wire form → log entry, checked.
pub fn entry_from_wire(e: w::RaftEntry) -> Result<Entry, WireError> {
    let mut out = Entry {
        term: e.term,
        index: e.index,
        ..Entry::default()
    };
    match e.payload {
        w::EntryPayload::Normal(data) => {
            out.set_entry_type(EntryType::EntryNormal);
            out.data = data.into();
        }
        w::EntryPayload::ConfChange(cc) => {
            out.set_entry_type(EntryType::EntryConfChangeV2);
            out.data = encode_conf_change(&conf_change_from_wire(cc)?).into();
        }
    }
    Ok(out)
}

/// The `ConfChangeV2` of a configuration entry this process wrote (or
/// encoded from a checked wire form). An empty entry is "leave joint".
pub fn conf_change_of(e: &Entry) -> Result<ConfChangeV2, WireError> {
    let mut cc = ConfChangeV2::default();
    if !e.data.is_empty() {
        cc.merge_from_bytes(&e.data)
            .map_err(|_| WireError::BadConfEntry { index: e.index })?;
    }
    Ok(cc)
}

/// Encodes a `ConfChangeV2` as entry data.
pub fn encode_conf_change(cc: &ConfChangeV2) -> Vec<u8> {
    // Encoding an in-memory message only fails on a size over 2 GiB.
    cc.write_to_bytes().unwrap_or_default()
}

fn conf_change_to_wire(cc: &ConfChangeV2) -> w::ConfChange {
    w::ConfChange {
        transition: match cc.get_transition() {
            ConfChangeTransition::Auto => 0,
            ConfChangeTransition::Implicit => 1,
            ConfChangeTransition::Explicit => 2,
        },
        changes: cc
            .get_changes()
            .iter()
            .map(|c| w::ConfChangeSingle {
                kind: match c.get_change_type() {
                    ConfChangeType::AddNode => w::ConfChangeKind::AddNode,
                    ConfChangeType::RemoveNode => w::ConfChangeKind::RemoveNode,
                    ConfChangeType::AddLearnerNode => w::ConfChangeKind::AddLearner,
                },
                node: c.node_id,
            })
            .collect(),
    }
}

fn conf_change_from_wire(cc: w::ConfChange) -> Result<ConfChangeV2, WireError> {
    if cc.changes.len() > MAX_CONF_CHANGES {
        return Err(WireError::ConfTooLarge(cc.changes.len()));
    }
    let mut out = ConfChangeV2::default();
    out.set_transition(match cc.transition {
        0 => ConfChangeTransition::Auto,
        1 => ConfChangeTransition::Implicit,
        2 => ConfChangeTransition::Explicit,
        other => return Err(WireError::BadTransition(other)),
    });
    for c in cc.changes {
        if c.node == 0 {
            return Err(WireError::ZeroId);
        }
        let mut single = ConfChangeSingle::default();
        single.set_change_type(match c.kind {
            w::ConfChangeKind::AddNode => ConfChangeType::AddNode,
            w::ConfChangeKind::RemoveNode => ConfChangeType::RemoveNode,
            w::ConfChangeKind::AddLearner => ConfChangeType::AddLearnerNode,
        });
        single.node_id = c.node;
        out.mut_changes().push(single);
    }
    Ok(out)
}

/// raft-rs configuration → wire form.
pub fn conf_state_to_wire(cs: &ConfState) -> w::ConfState {
    w::ConfState {
        voters: cs.voters.clone(),
        learners: cs.learners.clone(),
        voters_outgoing: cs.voters_outgoing.clone(),
        learners_next: cs.learners_next.clone(),
        auto_leave: cs.auto_leave,
    }
}

/// Wire form → raft-rs configuration, checked.
pub fn conf_state_from_wire(cs: w::ConfState) -> Result<ConfState, WireError> {
    let nodes =
        cs.voters.len() + cs.learners.len() + cs.voters_outgoing.len() + cs.learners_next.len();
    if nodes > MAX_CONF_NODES {
        return Err(WireError::ConfTooLarge(nodes));
    }
    if [
        &cs.voters,
        &cs.learners,
        &cs.voters_outgoing,
        &cs.learners_next,
    ]
    .iter()
    .any(|ids| ids.contains(&0))
    {
        return Err(WireError::ZeroId);
    }
    check_conf(&cs)?;
    Ok(ConfState {
        voters: cs.voters,
        learners: cs.learners,
        voters_outgoing: cs.voters_outgoing,
        learners_next: cs.learners_next,
        auto_leave: cs.auto_leave,
        ..ConfState::default()
    })
}

/// The invariants raft-rs asserts when it restores a configuration (a
/// violation there stops the process), checked before it sees one.
fn check_conf(cs: &w::ConfState) -> Result<(), WireError> {
    use std::collections::BTreeSet;
    let set = |ids: &[u64]| -> Result<BTreeSet<u64>, WireError> {
        let s: BTreeSet<u64> = ids.iter().copied().collect();
        if s.len() == ids.len() {
            Ok(s)
        } else {
            Err(WireError::BadConf("a node listed twice"))
        }
    };
    let voters = set(&cs.voters)?;
    let learners = set(&cs.learners)?;
    let outgoing = set(&cs.voters_outgoing)?;
    let next = set(&cs.learners_next)?;
    if voters.is_empty() && learners.is_empty() && outgoing.is_empty() && next.is_empty() {
        // A replica that has not learned its group's configuration yet.
        return if cs.auto_leave {
            Err(WireError::BadConf(
                "joint settings outside a joint configuration",
            ))
        } else {
            Ok(())
        };
    }
    if voters.is_empty() {
        return Err(WireError::BadConf("no voters"));
    }
    if !voters.is_disjoint(&learners) || !voters.is_disjoint(&next) {
        return Err(WireError::BadConf("a voter is also a learner"));
    }
    if !learners.is_disjoint(&next) {
        return Err(WireError::BadConf("a learner is also a next learner"));
    }
    if outgoing.is_empty() && (!next.is_empty() || cs.auto_leave) {
        return Err(WireError::BadConf(
            "joint settings outside a joint configuration",
        ));
    }
    if !next.is_subset(&outgoing) {
        return Err(WireError::BadConf(
            "a next learner is not an outgoing voter",
        ));
    }
    Ok(())
}
