//! Raft traffic between agents: a round's batches split into frames, a
//! batch too large for one frame (a snapshot) sent in [`Message::RaftPart`]s
//! one transfer at a time per peer, and peers' batches and parts stepped
//! into the driver.

use super::{lock, Core, Replication};
use shoal_proto::raft::{EntryPayload, RaftBatch};
use shoal_proto::Message;
use shoal_replica::NodeId;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Most entry bytes the inbox holds for the driver's thread (see
/// [`Replication::step`]); past it, the reader waits for the core.
const MAX_INBOX_BYTES: usize = 16 << 20;

/// Peers' batches waiting for the core (see [`Replication::step`]).
#[derive(Default)]
pub(super) struct Inbox {
    /// Each with its sender's Raft id and address, in arrival order.
    batches: Vec<(NodeId, SocketAddr, RaftBatch)>,
    /// The data they hold ([`entry_bytes`]), bounded by [`MAX_INBOX_BYTES`].
    bytes: usize,
}

/// Bytes of entry data per `Raft` frame: well under the mesh's frame limit,
/// so many groups appending at once in one round still go out.
const MAX_BATCH_DATA: usize = 4 << 20;

/// Past this estimate a frame goes in [`Message::RaftPart`]s: a snapshot of
/// a partition holding more than a frame's worth (17 MiB) would otherwise
/// never reach a new replica.
const PART_THRESHOLD: usize = 8 << 20;

/// Bytes per [`Message::RaftPart`].
pub(super) const PART_BYTES: usize = 8 << 20;

/// How long a peer gets no other transfer in parts, per part queued.
pub(super) const PART_PACE: Duration = Duration::from_secs(1);

/// Most bytes of parts held for transfers not yet complete, over all peers:
/// a snapshot larger than this (a partition retaining more) cannot be
/// received, and the replica is not added (logged, and counted as
/// `raft_transfer_too_large`).
pub const MAX_TRANSFER_BYTES: usize = 256 << 20;

/// How long a transfer in parts may take to come whole; past it, what
/// was put together is dropped (its sender died or gave up).
const ASSEMBLY_TIMEOUT: Duration = Duration::from_secs(60);

/// A transfer in parts from one peer, being put together.
pub(super) struct Assembly {
    transfer: u64,
    parts: u32,
    next: u32,
    bytes: Vec<u8>,
    started: std::time::Instant,
}

/// Marks a peer as having a transfer in parts on its way, until dropped:
/// one at a time per peer, so parts of two transfers never interleave on
/// the link and a slow link does not pile up copies of a snapshot.
pub(super) struct Sending {
    peers: Arc<Mutex<std::collections::HashSet<SocketAddr>>>,
    addr: SocketAddr,
}

impl Sending {
    pub(super) fn start(
        peers: &Arc<Mutex<std::collections::HashSet<SocketAddr>>>,
        addr: SocketAddr,
    ) -> Option<Self> {
        lock(peers).insert(addr).then(|| Sending {
            peers: peers.clone(),
            addr,
        })
    }
}

impl Drop for Sending {
    fn drop(&mut self) {
        lock(&self.peers).remove(&self.addr);
    }
}

/// The frames one batch goes out in: itself, or, when it is too large for
/// a frame, its postcard in parts.
pub(super) fn raft_frames(batch: RaftBatch, transfer: u64) -> Vec<Message> {
    if batch.groups.iter().map(batch_bytes).sum::<usize>() <= PART_THRESHOLD {
        return vec![Message::Raft(batch)];
    }
    let encoded = match postcard::to_allocvec(&batch) {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(error = %e, "cannot encode a raft batch; not sent");
            return Vec::new();
        }
    };
    if encoded.len() <= PART_BYTES {
        // The estimate was high: it fits one frame.
        return vec![Message::Raft(batch)];
    }
    if encoded.len() > MAX_TRANSFER_BYTES {
        // No peer would take it: not queued at all (the leader asks again).
        tracing::debug!(
            bytes = encoded.len(),
            "a raft batch (a snapshot) is larger than any agent takes; not sent"
        );
        return Vec::new();
    }
    let parts = encoded.len().div_ceil(PART_BYTES);
    let Ok(count) = u32::try_from(parts) else {
        return Vec::new();
    };
    encoded
        .chunks(PART_BYTES)
        .enumerate()
        .map(|(i, c)| Message::RaftPart {
            transfer,
            part: i as u32,
            parts: count,
            bytes: c.to_vec(),
        })
        .collect()
}

/// About how many bytes a group's messages take on the wire.
fn batch_bytes(gm: &shoal_proto::raft::GroupMessages) -> usize {
    gm.messages.iter().map(message_bytes).sum()
}

/// About how many bytes one Raft message takes on the wire.
fn message_bytes(m: &shoal_proto::raft::RaftMessage) -> usize {
    use shoal_proto::raft::EntryPayload;
    64 + m
        .entries
        .iter()
        .map(|e| match &e.payload {
            EntryPayload::Normal(d) => d.len() + 24,
            EntryPayload::ConfChange(_) => 128,
        })
        .sum::<usize>()
        + m.snapshot.as_ref().map_or(0, |s| s.data.len())
}

/// Splits one round's batch to a peer into frames of at most
/// [`MAX_BATCH_DATA`] bytes of entries and snapshots. A group whose
/// messages are larger (a leader catching a replica up fills its in-flight
/// window with full appends) is split too, its messages kept in order: only
/// a single message larger than that goes alone (an earlier agent's
/// snapshot, which may then need parts).
pub(super) fn split_batch(batch: RaftBatch) -> Vec<RaftBatch> {
    let incarnation = batch.incarnation;
    let mut out: Vec<RaftBatch> = Vec::new();
    let mut current = RaftBatch {
        incarnation,
        groups: Vec::new(),
    };
    let mut bytes = 0;
    for gm in batch.groups.into_iter().flat_map(split_group) {
        let n = batch_bytes(&gm);
        if !current.groups.is_empty() && bytes + n > MAX_BATCH_DATA {
            out.push(std::mem::replace(
                &mut current,
                RaftBatch {
                    incarnation,
                    groups: Vec::new(),
                },
            ));
            bytes = 0;
        }
        bytes += n;
        current.groups.push(gm);
    }
    out.push(current);
    out
}

/// One group's messages in runs of at most [`MAX_BATCH_DATA`] bytes (a
/// larger message alone). The signals go where they keep their meaning:
/// `progress_reset` with the first run (the appends after it count),
/// the sleep `signal` with the last (nothing follows it), `recovering` with each.
fn split_group(gm: shoal_proto::raft::GroupMessages) -> Vec<shoal_proto::raft::GroupMessages> {
    use shoal_proto::raft::{GroupMessages, Signal};
    if batch_bytes(&gm) <= MAX_BATCH_DATA || gm.messages.len() < 2 {
        return vec![gm];
    }
    let GroupMessages {
        group,
        messages,
        signal,
        recovering,
        progress_reset,
    } = gm;
    let mut runs: Vec<GroupMessages> = Vec::new();
    let mut bytes = 0;
    for m in messages {
        let n = message_bytes(&m);
        let start_run = match runs.last() {
            None => true,
            Some(run) => !run.messages.is_empty() && bytes + n > MAX_BATCH_DATA,
        };
        if start_run {
            runs.push(GroupMessages {
                group: group.clone(),
                messages: Vec::new(),
                signal: Signal::Nothing,
                recovering,
                progress_reset: runs.is_empty() && progress_reset,
            });
            bytes = 0;
        }
        bytes += n;
        if let Some(run) = runs.last_mut() {
            run.messages.push(m);
        }
    }
    if let Some(last) = runs.last_mut() {
        last.signal = signal;
    }
    runs
}

impl Replication {
    /// Steps a batch from the peer at `from`; a sender that is not a known
    /// member is refused.
    pub fn step(&self, from: SocketAddr, batch: RaftBatch) -> bool {
        let id = {
            let peers = lock(&self.peers);
            peers
                .by_id
                .iter()
                .filter(|(_, (_, a))| *a == from)
                .map(|(id, (n, _))| (*id, peers.down.contains(n)))
                .min_by_key(|(_, down)| *down)
                .map(|(id, _)| id)
        };
        let Some(id) = id else {
            return false;
        };
        {
            // The inbox is held while the core is tried, so a batch never
            // overtakes one that went to the inbox before it.
            let mut inbox = lock(&self.inbox);
            let size = entry_bytes(&batch);
            let mut core = match self.core.try_lock() {
                Ok(core) => core,
                Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
                Err(std::sync::TryLockError::WouldBlock)
                    if inbox.bytes + size <= MAX_INBOX_BYTES =>
                {
                    inbox.bytes += size;
                    inbox.batches.push((id, from, batch));
                    drop(inbox);
                    self.wake.wake();
                    return true;
                }
                // The driver's thread has been stuck for a long while: wait
                // for it rather than hold ever more batches. The inbox is let
                // go first: a round takes the core, then the inbox.
                Err(std::sync::TryLockError::WouldBlock) => {
                    drop(inbox);
                    let mut core = lock(&self.core);
                    self.step_inbox(&mut core);
                    self.step_locked(&mut core, id, from, batch);
                    drop(core);
                    self.round_now();
                    return true;
                }
            };
            // Last in line behind what the inbox holds.
            inbox.batches.push((id, from, batch));
            drop(inbox);
            self.step_inbox(&mut core);
        }
        self.round_now();
        true
    }

    /// Steps the batches the inbox holds (see [`Replication::step`]).
    pub(super) fn step_inbox(&self, core: &mut Core) {
        let queued = std::mem::take(&mut *lock(&self.inbox)).batches;
        for (id, from, batch) in queued {
            self.step_locked(core, id, from, batch);
        }
    }

    fn step_locked(&self, core: &mut Core, id: NodeId, from: SocketAddr, mut batch: RaftBatch) {
        // A leader's message creates a replica here only for a group
        // placement puts this agent in: otherwise any member could make
        // itself look like the leader of any partition to an agent that
        // holds none of it, and receive that agent's publishes and reads.
        // A refused join is asked again by the leader's next message, once
        // this agent's view agrees (it knows the topic and the members).
        let before = batch.groups.len();
        batch
            .groups
            .retain(|gm| core.driver.group(&gm.group).is_some() || self.placed_here(&gm.group));
        let refused = before - batch.groups.len();
        if refused > 0 {
            self.metrics
                .mesh_invalid_messages
                .get_or_create(&crate::metrics::ReasonLabel {
                    reason: "unknown_group",
                })
                .inc_by(refused as u64);
            tracing::debug!(peer = %from, groups = refused, "refused to create replicas placement does not give this agent");
        }
        core.driver.step(id, batch);
    }

    /// Takes one part of a transfer from the peer at `from` (see
    /// [`Message::RaftPart`]); steps the batch once every part is in.
    /// Parts come in order on the peer's one stream: a gap or another
    /// transfer's middle part drops what was put together (the leader sends
    /// its snapshot again). Refused: an unknown sender, a malformed part, or
    /// more than [`MAX_TRANSFER_BYTES`] held.
    pub fn step_part(
        &self,
        from: SocketAddr,
        transfer: u64,
        part: u32,
        parts: u32,
        bytes: Vec<u8>,
    ) -> Result<(), &'static str> {
        if !lock(&self.peers).addrs.values().any(|a| *a == from) {
            return Err("unknown_sender");
        }
        let mut assembling = lock(&self.assembling);
        assembling.retain(|_, a| a.started.elapsed() < ASSEMBLY_TIMEOUT);
        if part == 0 {
            assembling.remove(&from);
        }
        if part >= parts || parts < 2 {
            assembling.remove(&from);
            return Err("malformed");
        }
        let held: usize = assembling.values().map(|a| a.bytes.len()).sum();
        let fits = held + bytes.len() <= MAX_TRANSFER_BYTES
            && (parts as usize).saturating_mul(PART_BYTES) <= MAX_TRANSFER_BYTES + PART_BYTES;
        if !fits {
            assembling.remove(&from);
            tracing::warn!(peer = %from, parts, "a raft transfer is larger than this agent takes ({MAX_TRANSFER_BYTES} bytes): the partition's snapshot cannot reach this replica");
            return Err("raft_transfer_too_large");
        }
        let entry = assembling.entry(from).or_insert_with(|| Assembly {
            transfer,
            parts,
            next: 0,
            bytes: Vec::new(),
            started: std::time::Instant::now(),
        });
        if (entry.transfer, entry.parts, entry.next) != (transfer, parts, part) {
            // Another transfer's part, or a gap: what was put together is lost.
            assembling.remove(&from);
            return Err("malformed");
        }
        entry.bytes.extend_from_slice(&bytes);
        entry.next += 1;
        if entry.next < entry.parts {
            return Ok(());
        }
        let Some(done) = assembling.remove(&from) else {
            return Ok(());
        };
        drop(assembling);
        let batch: RaftBatch = postcard::from_bytes(&done.bytes).map_err(|_| "malformed")?;
        if self.step(from, batch) {
            Ok(())
        } else {
            Err("unknown_sender")
        }
    }
}

/// The entry, snapshot and context data a batch carries: what it holds in
/// memory, near enough.
fn entry_bytes(batch: &RaftBatch) -> usize {
    let message_bytes = |m: &shoal_proto::raft::RaftMessage| {
        let entries: usize = m
            .entries
            .iter()
            .map(|e| match &e.payload {
                EntryPayload::Normal(data) => data.len(),
                _ => 0,
            })
            .sum();
        entries + m.context.len() + m.snapshot.as_ref().map_or(0, |s| s.data.len())
    };
    batch
        .groups
        .iter()
        .flat_map(|g| &g.messages)
        .map(message_bytes)
        .sum::<usize>()
        + batch.groups.len()
}
