//! One partition's replica: its raft-rs `RawNode`, its storage and its state
//! machine.
//!
//! The driver calls [`Group`] in two phases per round so that every group's
//! writes share one sync: [`Group::collect`] takes the node's `Ready`, sends
//! what may leave before anything is durable (a leader's appends), applies
//! committed entries and writes new entries and the hard state; then, after
//! the driver synced every store, [`Group::finish`] sends what promises
//! durability (votes, append acknowledgements) and advances the node.

use crate::command::Command;
use crate::snapshot::SnapshotData;
use crate::state::{Applied, PartitionState};
use crate::store::{LogStore, StoreError};
use crate::wire;
use crate::{group_name, Error, GroupId, NodeId};
use raft::eraftpb::{
    ConfChangeSingle, ConfChangeTransition, ConfChangeType, ConfChangeV2, ConfState, Entry,
    EntryType, Message, Snapshot,
};
use raft::{GetEntriesContext, RaftState, RawNode, Ready, StateRole, Storage};
use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet};

mod membership;
mod snapshots;

/// A peer's term may be ahead of this replica's by at most this many
/// elections (pre-vote keeps a cut-off replica's term where it was).
pub const MAX_TERM_JUMP: u64 = 1_000_000;

/// Where a new group's log starts: after a snapshot at this index, which
/// carries the first configuration. The first message is at index 6.
pub const INITIAL_INDEX: u64 = 5;
/// The term of that snapshot.
pub const INITIAL_TERM: u64 = 5;

/// How a replica starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bootstrap {
    /// A new group with these voters. Every initial voter must be created
    /// with the same list (one decider chooses it), or two groups could form.
    Voters(Vec<NodeId>),
    /// Joins an existing group: empty until its leader sends the log.
    Join,
    /// Reopens what the store holds (a restart).
    Restart,
}

/// What the rest of the agent may know of a group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupStatus {
    /// The group's leader, as far as this replica knows.
    pub leader: Option<NodeId>,
    /// This replica's term.
    pub term: u64,
    /// Whether this replica leads and has applied its own term's first
    /// entry, so it may answer publishes and reads.
    pub serving: bool,
    /// Highest index known committed.
    pub commit: u64,
    /// Highest index applied.
    pub applied: u64,
    /// First index held.
    pub first_index: u64,
    /// Last index held.
    pub last_index: u64,
    /// Voters (both halves when joint).
    pub voters: Vec<NodeId>,
    /// Learners.
    pub learners: Vec<NodeId>,
    /// On the leader: each other replica's matched index.
    pub matched: Vec<(NodeId, u64)>,
    /// Not ticking.
    pub hibernating: bool,
    /// Its log was cut below what it had committed (a corrupt segment): it
    /// neither votes nor campaigns until it has the log back.
    pub recovering: bool,
}

/// The storage as raft-rs sees it.
#[derive(Debug)]
pub(crate) struct RaftStore<S> {
    pub(crate) inner: S,
    /// raft-rs asked for a snapshot that was not ready; the group builds
    /// one after the round.
    snapshot_wanted: Cell<bool>,
    /// The last snapshot built, until no follower needs one.
    snapshot: Option<Snapshot>,
}

fn raft_store_error(e: StoreError) -> raft::Error {
    match e {
        StoreError::Compacted { .. } => raft::Error::Store(raft::StorageError::Compacted),
        StoreError::Unavailable { .. } => raft::Error::Store(raft::StorageError::Unavailable),
        other => raft::Error::Store(raft::StorageError::Other(Box::new(other))),
    }
}

impl<S: LogStore> Storage for RaftStore<S> {
    fn initial_state(&self) -> raft::Result<RaftState> {
        let meta = self.inner.meta();
        Ok(RaftState::new(
            meta.hard_state.clone(),
            meta.conf_state.clone(),
        ))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        let max = max_size.into().unwrap_or(u64::MAX);
        self.inner.entries(low, high, max).map_err(raft_store_error)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        self.inner.term(idx).map_err(raft_store_error)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.inner.first_index())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.inner.last_index())
    }

    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        if let Some(snap) = &self.snapshot {
            let meta = snap.get_metadata();
            // Usable while the entries after it are still held here, and for
            // a replica its configuration has (raft-rs refuses it otherwise).
            if meta.index >= request_index
                && meta.index + 1 >= self.inner.first_index()
                && conf_nodes(meta.get_conf_state()).contains(&to)
            {
                return Ok(snap.clone());
            }
        }
        self.snapshot_wanted.set(true);
        Err(raft::Error::Store(
            raft::StorageError::SnapshotTemporarilyUnavailable,
        ))
    }
}

/// Settings of every group of a driver.
#[derive(Debug, Clone)]
pub struct GroupConfig {
    /// Ticks without a leader before a follower campaigns (randomized up to
    /// twice this).
    pub election_ticks: usize,
    /// Ticks between a leader's heartbeats.
    pub heartbeat_ticks: usize,
    /// Largest append message, in bytes of entry data.
    pub max_append_bytes: u64,
    /// Appends in flight per follower.
    pub max_inflight: usize,
    /// The dedupe window of the state machine.
    pub dedupe_window_ms: u64,
}

/// What a group tells the driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum GroupEvent {
    Committed {
        token: u64,
        index: u64,
        applied: Applied,
    },
    Dropped {
        token: u64,
    },
    Applied {
        index: u64,
        term: u64,
        data: Vec<u8>,
        applied: Applied,
    },
    Leader {
        leader: Option<NodeId>,
        term: u64,
    },
    Removed,
    BadEntry {
        index: u64,
        reason: String,
    },
}

/// One partition's replica.
pub struct Group<S: LogStore> {
    pub(crate) id: GroupId,
    me: NodeId,
    pub(crate) node: RawNode<RaftStore<S>>,
    pub(crate) state: PartitionState,
    window_ms: u64,
    pub(crate) hibernating: bool,
    /// Something reached this group since the driver last looked for its
    /// ready while it hibernated: a hibernating group is looked at only then.
    pub(crate) stirred: bool,
    pub(crate) quiet_ticks: u32,
    /// A follower woke from hibernation and has not heard from its leader
    /// since: it tells the leader to wake every tick until it does, so a
    /// lost [`shoal_proto::raft::Signal::Wake`] cannot leave a live leader
    /// asleep while the woken followers' election timers run.
    pub(crate) leader_unheard: bool,
    /// Proposals awaiting their entry: index → (term, token).
    pending: BTreeMap<u64, (u64, u64)>,
    pub(crate) removed: bool,
    /// Ticks since this replica found itself out of the configuration.
    leaving_ticks: Option<usize>,
    pub(crate) desired: Option<BTreeSet<NodeId>>,
    /// Its log lost entries it may have acknowledged (recovery cut a corrupt
    /// segment): it neither votes nor campaigns until it has caught up with
    /// a leader of the current term.
    recovering: bool,
    /// While recovering: the highest commit index a leader of the current
    /// term sent; the replica votes again once it has committed that far.
    recover_target: u64,
    /// While recovering: the leader and term that told this replica it had
    /// reset its progress; only that leader's appends count.
    reset_by: (NodeId, u64),
    leader_seen: (Option<NodeId>, u64),
    /// Peers known to be recovering whose progress this leader has reset,
    /// and the term it did so in.
    reset_peers: BTreeSet<NodeId>,
    reset_term: u64,
    /// Ticks each follower has spent waiting for a snapshot (leader only).
    snapshot_waits: BTreeMap<NodeId, usize>,
    pub(crate) events: Vec<GroupEvent>,
}

impl<S: LogStore> std::fmt::Debug for Group<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Group")
            .field("id", &self.id)
            .field("me", &self.me)
            .field("applied", &self.state.applied())
            .finish_non_exhaustive()
    }
}

fn conf_nodes(cs: &ConfState) -> BTreeSet<NodeId> {
    cs.voters
        .iter()
        .chain(&cs.learners)
        .chain(&cs.voters_outgoing)
        .chain(&cs.learners_next)
        .copied()
        .collect()
}

/// Repairs what a crash in the middle of a snapshot or a compaction left:
/// the meta is written before the log is cut.
fn repair<S: LogStore>(store: &mut S) -> Result<(), StoreError> {
    let meta = store.meta().clone();
    let at = meta.snapshot_index;
    if at == 0 {
        return Ok(());
    }
    let matches = at >= store.first_index()
        && at <= store.last_index()
        && store.term(at).ok() == Some(meta.snapshot_term);
    if store.last_index() < at || (at >= store.first_index() && !matches) {
        store.reset(at, meta.snapshot_term)?;
    } else if store.first_index() <= at {
        store.compact(at + 1)?;
    }
    Ok(())
}

impl<S: LogStore> Group<S> {
    /// Opens a replica on `store`.
    pub(crate) fn open(
        id: GroupId,
        me: NodeId,
        mut store: S,
        bootstrap: Bootstrap,
        config: &GroupConfig,
    ) -> Result<Self, Error> {
        repair(&mut store)?;
        // A replica that joins (or comes back with nothing) may once have
        // acknowledged entries it no longer has: it votes again only after
        // catching up with a leader of the current term.
        let mut recovering =
            store.lost_entries() || bootstrap == Bootstrap::Join || store.meta().recovering;
        match &bootstrap {
            Bootstrap::Voters(voters) => {
                let mut meta = store.meta().clone();
                if meta.conf_state == ConfState::default() && store.last_index() == 0 {
                    // The log starts after a snapshot that holds the first
                    // configuration, so a replica that joins later learns it
                    // from that snapshot (it is in no entry).
                    meta.conf_state = ConfState::from((voters.iter().copied(), []));
                    meta.conf_index = INITIAL_INDEX;
                    meta.snapshot_index = INITIAL_INDEX;
                    meta.snapshot_term = INITIAL_TERM;
                    meta.hard_state.term = INITIAL_TERM;
                    meta.hard_state.commit = INITIAL_INDEX;
                    store.set_meta(meta)?;
                    store.reset(INITIAL_INDEX, INITIAL_TERM)?;
                }
            }
            Bootstrap::Join | Bootstrap::Restart => {}
        }
        {
            let mut meta = store.meta().clone();
            let last = store.last_index();
            let commit = meta.hard_state.commit;
            if commit > last {
                // The log lost entries it had committed.
                recovering = true;
            }
            meta.hard_state.commit = commit.min(last).max(meta.snapshot_index);
            if meta.hard_state.commit != commit || meta.recovering != recovering {
                meta.recovering = recovering;
                store.set_meta(meta)?;
                // Durable now: a restart before any message arrives must
                // still know that entries were lost.
                store.sync()?;
            }
        }
        let meta = store.meta().clone();
        let mut state = PartitionState::decode_manifest(&meta.manifest, config.dedupe_window_ms)
            .map_err(|e| StoreError::Io(e.to_string()))?;
        if state.applied() < meta.snapshot_index {
            state.skip(meta.snapshot_index);
        }
        // The manifest may be newer than the commit index stored (it is
        // written lazily); raft-rs must not be told more was applied.
        let applied = state.applied().min(meta.hard_state.commit);
        let raft_config = raft::Config {
            id: me,
            election_tick: config.election_ticks,
            heartbeat_tick: config.heartbeat_ticks,
            applied,
            max_size_per_msg: config.max_append_bytes,
            max_inflight_msgs: config.max_inflight,
            check_quorum: true,
            // Unlimited, so that `propose_many` appends all its entries or
            // none: a limit could refuse a later part of one publish.
            max_uncommitted_size: raft::NO_LIMIT,
            pre_vote: true,
            // A new commit index reaches followers with the next append or
            // heartbeat instead of in an append of its own: one message per
            // follower per proposal instead of two. Only the leader serves
            // reads and acks, so a follower learning it later costs nothing;
            // configuration changes are still broadcast at once (raft-rs), and
            // a group whose followers act on commits can ask for every one
            // (`Driver::broadcast_commits`).
            skip_bcast_commit: true,
            ..raft::Config::default()
        };
        let node = RawNode::new(
            &raft_config,
            RaftStore {
                inner: store,
                snapshot_wanted: Cell::new(false),
                snapshot: None,
            },
            &crate::log::logger(),
        )?;
        let mut group = Group {
            id,
            me,
            node,
            state,
            window_ms: config.dedupe_window_ms,
            hibernating: false,
            leader_unheard: false,
            stirred: false,
            quiet_ticks: 0,
            pending: BTreeMap::new(),
            removed: false,
            leaving_ticks: None,
            desired: None,
            recovering,
            recover_target: 0,
            reset_by: (0, 0),
            leader_seen: (None, 0),
            reset_peers: BTreeSet::new(),
            reset_term: 0,
            snapshot_waits: BTreeMap::new(),
            events: Vec::new(),
        };
        // Entries committed before a restart come back in the first ready
        // (raft-rs starts from `applied`): the state machine is rebuilt from
        // the manifest on, not stored per entry.
        group.note_leader();
        Ok(group)
    }

    /// The store.
    pub fn store(&self) -> &S {
        &self.node.store().inner
    }

    pub(crate) fn store_mut(&mut self) -> &mut S {
        &mut self.node.mut_store().inner
    }

    /// The state machine.
    pub fn state(&self) -> &PartitionState {
        &self.state
    }

    /// Whether this replica leads and its state machine is current.
    pub fn serving(&self) -> bool {
        let raft = &self.node.raft;
        raft.state == StateRole::Leader
            && raft.raft_log.term(self.state.applied()).ok() == Some(raft.term)
    }

    /// Whether this replica is its group's leader (serving or not yet).
    pub fn is_leader(&self) -> bool {
        self.node.raft.state == StateRole::Leader
    }

    /// While the group hibernates: its term and commit index. Nothing about
    /// the group (leader, voters, log) changes without moving one of them,
    /// so a caller may keep what it derived from the group under this key.
    pub fn asleep_at(&self) -> Option<(u64, u64)> {
        let raft = &self.node.raft;
        self.hibernating
            .then_some((raft.term, raft.raft_log.committed))
    }

    pub(crate) fn leader(&self) -> Option<NodeId> {
        let id = self.node.raft.leader_id;
        (id != raft::INVALID_ID).then_some(id)
    }

    pub(crate) fn recovering(&self) -> bool {
        self.recovering
    }

    /// Whether this replica answers vote requests: not while it may miss
    /// entries it once acknowledged. (A replica outside its own latest
    /// configuration still votes: a candidate that has not applied that
    /// configuration yet may need it, and the log check keeps it safe.)
    fn may_vote(&self) -> bool {
        !self.recovering
    }

    /// The configuration in force.
    pub(crate) fn conf(&self) -> ConfState {
        self.node.raft.prs().conf().to_conf_state()
    }

    /// Every node of the configuration in force.
    pub(crate) fn peers(&self) -> BTreeSet<NodeId> {
        let mut nodes = conf_nodes(&self.conf());
        nodes.remove(&self.me);
        nodes
    }

    /// Whether processing this group now could do slow disk work beyond
    /// writing entries: a snapshot to build or install, or a new term or
    /// vote to make durable (the state file is fsynced).
    pub(crate) fn round_may_block(&self) -> bool {
        let raft = &self.node.raft;
        let hs = &self.store().meta().hard_state;
        self.node.store().snapshot_wanted.get()
            || raft.raft_log.unstable.snapshot.is_some()
            || raft.term != hs.term
            || raft.vote != hs.vote
    }

    /// The last index applied here, counting only entries this replica
    /// holds and knows committed. After a snapshot the state machine is
    /// ahead of the log until the entries up to it arrive and are known
    /// committed.
    pub fn held_applied(&self) -> u64 {
        self.state.applied().min(self.node.raft.raft_log.applied())
    }

    /// A snapshot of what the group looks like from here.
    pub fn status(&self) -> GroupStatus {
        let raft = &self.node.raft;
        let cs = self.conf();
        let mut voters: Vec<NodeId> = cs
            .voters
            .iter()
            .chain(&cs.voters_outgoing)
            .copied()
            .collect();
        voters.sort_unstable();
        voters.dedup();
        let matched = if raft.state == StateRole::Leader {
            raft.prs()
                .iter()
                .filter(|(id, _)| **id != self.me)
                .map(|(id, pr)| (*id, pr.matched))
                .collect()
        } else {
            Vec::new()
        };
        GroupStatus {
            leader: self.leader(),
            term: raft.term,
            serving: self.serving(),
            commit: raft.raft_log.committed,
            applied: self.held_applied(),
            first_index: self.store().first_index(),
            last_index: raft.raft_log.last_index(),
            voters,
            learners: cs.learners.clone(),
            matched,
            hibernating: self.hibernating,
            recovering: self.recovering(),
        }
    }

    /// Proposes a command; `token` comes back in the driver's event when
    /// the entry is applied or lost. Returns the entry's index.
    pub(crate) fn propose(&mut self, token: u64, data: Vec<u8>) -> Result<u64, Error> {
        self.propose_many(vec![(token, data)])
    }

    /// Proposes commands as consecutive entries, in proposals of up to an
    /// append's size (`max_append_bytes`): raft-rs sends each proposal to
    /// each follower in one append, where a proposal per command would be
    /// an append and an acknowledgement per command. Each token comes back
    /// in the driver's event when its entry is applied or lost. Returns the
    /// first entry's index. All go or none: raft-rs refuses a proposal for
    /// being led no more, for a leadership transfer, or past
    /// `max_uncommitted_size`; the first two cannot change within this
    /// call, and the last is left unlimited (see [`Group::open`]).
    pub(crate) fn propose_many(&mut self, commands: Vec<(u64, Vec<u8>)>) -> Result<u64, Error> {
        if !self.is_leader() {
            return Err(Error::NotLeader {
                group: group_name(&self.id),
                leader: self.leader(),
            });
        }
        if !self.serving() {
            return Err(Error::LeaderCatchingUp(group_name(&self.id)));
        }
        let first = self.node.raft.raft_log.last_index() + 1;
        let limit = self.node.raft.max_msg_size;
        let mut commands = commands.into_iter().peekable();
        while commands.peek().is_some() {
            let mut tokens = Vec::new();
            let mut entries = Vec::new();
            let mut bytes = 0u64;
            // raft-rs cuts appends by each entry's encoded size: the data
            // and a few bytes of index, term and framing.
            let size = |d: &[u8]| d.len() as u64 + crate::driver::ENTRY_OVERHEAD_BYTES;
            while let Some((token, data)) =
                commands.next_if(|(_, d)| entries.is_empty() || bytes + size(d) <= limit)
            {
                bytes += size(&data);
                tokens.push(token);
                entries.push(Entry {
                    data: data.into(),
                    ..Entry::default()
                });
            }
            let before = self.node.raft.raft_log.last_index();
            let count = entries.len() as u64;
            let mut m = Message::default();
            m.set_msg_type(raft::eraftpb::MessageType::MsgPropose);
            m.from = self.me;
            m.set_entries(entries.into());
            // What `RawNode::propose` does for one entry, for several.
            self.node.raft.step(m)?;
            if self.node.raft.raft_log.last_index() != before + count {
                return Err(Error::Raft(raft::Error::ProposalDropped));
            }
            let term = self.node.raft.term;
            for (i, token) in tokens.into_iter().enumerate() {
                // An index proposed again in a later term: the entry that
                // held it was cut before it committed, and its token is lost.
                if let Some((_, lost)) = self.pending.insert(before + 1 + i as u64, (term, token)) {
                    self.events.push(GroupEvent::Dropped { token: lost });
                }
            }
        }
        self.wake();
        Ok(first)
    }

    /// raft-rs draws election timeouts from the thread's RNG; the driver
    /// draws them from its own seeded one so a simulation replays exactly.
    /// Called after every tick and step: a timeout that just restarted is
    /// drawn again, from the same range.
    pub(crate) fn redraw_timeout(&mut self, rng: &mut fastrand::Rng, election_ticks: usize) {
        if self.node.raft.election_elapsed == 0 {
            let t = rng.usize(election_ticks..2 * election_ticks);
            self.node.raft.set_randomized_election_timeout(t);
        }
    }

    /// Whether raft-rs may have a ready for this group: an awake group is
    /// asked, a hibernating one only when something stirred it.
    pub(crate) fn may_have_ready(&self) -> bool {
        (!self.hibernating || self.stirred) && self.node.has_ready()
    }

    pub(crate) fn wake(&mut self) {
        self.quiet_ticks = 0;
        self.stirred = true;
        if self.hibernating {
            self.hibernating = false;
            self.leader_unheard = self.node.raft.state == StateRole::Follower;
            // Time stood still while asleep: a follower gets a whole election
            // timeout to hear from its leader, and a leader a fresh lease
            // (its check-quorum would otherwise count the silent followers
            // of the quiet time as lost and step down).
            let raft = &mut self.node.raft;
            raft.election_elapsed = 0;
            if raft.state == StateRole::Leader {
                let me = self.me;
                for (id, pr) in raft.mut_prs().iter_mut() {
                    if *id != me {
                        pr.recent_active = true;
                    }
                }
                // Re-assert at once rather than after a heartbeat interval.
                self.node.ping();
            }
        }
    }

    /// Steps a peer's message.
    pub(crate) fn step(&mut self, mut m: Message) -> Result<(), Error> {
        use raft::eraftpb::MessageType::*;
        let msg_type = m.get_msg_type();
        if matches!(msg_type, MsgRequestVote | MsgRequestPreVote | MsgTimeoutNow)
            && !self.may_vote()
        {
            // A replica that lost entries (or never had them) could elect a
            // log without what it once acknowledged: it stays silent.
            return Ok(());
        }
        if self.recovering && msg_type == MsgAppend && (m.from, m.term) == self.reset_by {
            self.recover_target = self.recover_target.max(m.commit);
        }
        if msg_type == MsgHeartbeat {
            // raft-rs treats a commit past the log's end as fatal; a leader
            // never sends one, but a bad peer must not stop the agent.
            m.commit = m.commit.min(self.node.raft.raft_log.last_index());
        }
        if let Some(why) = self.malformed(&m) {
            return Err(Error::Malformed(why));
        }
        // Acknowledgements of the last heartbeats, and anything from a node
        // outside the configuration (a removed replica that still
        // campaigns), do not wake a quiet group.
        let benign = (matches!(msg_type, MsgHeartbeatResponse | MsgAppendResponse)
            && m.term == self.node.raft.term
            && !m.reject)
            || !self.peers().contains(&m.from);
        if !benign {
            self.wake();
        }
        let (from, term) = (m.from, m.term);
        self.node.step(m)?;
        if matches!(msg_type, MsgAppend | MsgHeartbeat | MsgSnapshot)
            && self.node.raft.leader_id == from
            && self.node.raft.term == term
        {
            self.leader_unheard = false;
        }
        Ok(())
    }

    /// What an honest raft-rs peer never sends and raft-rs would not survive
    /// (its `fatal!` stops the process): checked against this replica's log.
    fn malformed(&self, m: &Message) -> Option<&'static str> {
        use raft::eraftpb::MessageType::*;
        let last = self.node.raft.raft_log.last_index();
        if m.term > self.node.raft.term.saturating_add(MAX_TERM_JUMP) {
            return Some("a term far beyond any election");
        }
        match m.get_msg_type() {
            MsgAppend => {
                if m.index >= 1 && m.log_term == 0 {
                    return Some("append after an entry of term 0");
                }
                let mut term = m.log_term;
                for (expected, e) in (m.index + 1..).zip(m.get_entries()) {
                    if e.index != expected || e.term < term || e.term > m.term {
                        return Some("append entries that do not follow on");
                    }
                    term = e.term;
                }
            }
            MsgAppendResponse if !m.reject && m.index > last => {
                return Some("acknowledges entries this leader does not have");
            }
            _ => {}
        }
        if m.request_snapshot > last {
            return Some("asks for a snapshot past the log's end");
        }
        None
    }

    /// Phase one of a round. Returns the ready to finish after the sync,
    /// or `None` when the node had nothing.
    pub(crate) fn collect(&mut self, send: &mut Vec<Message>) -> Result<Option<Ready>, Error> {
        if !self.node.has_ready() {
            return Ok(None);
        }
        let mut rd = self.node.ready();
        if rd.ss().is_some() {
            self.note_leader();
        }
        send.append(&mut rd.take_messages());
        if !rd.snapshot().is_empty() {
            self.install(rd.snapshot().clone())?;
        }
        let committed = rd.take_committed_entries();
        self.apply(committed)?;
        if !rd.entries().is_empty() {
            self.store_mut().append(rd.entries())?;
        }
        if let Some(hs) = rd.hs() {
            let mut meta = self.store().meta().clone();
            meta.hard_state = hs.clone();
            self.store_mut().set_meta(meta)?;
        }
        Ok(Some(rd))
    }

    /// Phase two, after every store written in phase one was synced.
    pub(crate) fn finish(&mut self, mut rd: Ready, send: &mut Vec<Message>) -> Result<(), Error> {
        send.append(&mut rd.take_persisted_messages());
        let mut light = self.node.advance(rd);
        if let Some(commit) = light.commit_index() {
            let mut meta = self.store().meta().clone();
            meta.hard_state.commit = commit;
            self.store_mut().set_meta(meta)?;
        }
        send.append(&mut light.take_messages());
        self.apply(light.take_committed_entries())?;
        self.node.advance_apply();
        if self.recovering {
            let raft = &self.node.raft;
            // Everything committed anywhere is at or below the commit index
            // of a leader that has committed an entry of its own term. Having
            // that much, this log holds every entry it may once have
            // acknowledged and lost.
            let committed = raft.raft_log.committed;
            if raft.leader_id != raft::INVALID_ID
                && self.reset_by == (raft.leader_id, raft.term)
                && self.recover_target > 0
                && committed >= self.recover_target
                && raft.raft_log.term(committed).ok() == Some(raft.term)
            {
                tracing::debug!(group = %group_name(&self.id), "replica has its log back and votes again");
                self.recovering = false;
                let mut meta = self.store().meta().clone();
                meta.recovering = false;
                self.store_mut().set_meta(meta)?;
            }
        }
        self.note_leader();
        // Out of the group only once everything this replica holds is
        // applied and the configuration still leaves it out (a later entry in
        // its log may add it back, and the leader may already count it); and
        // it goes only after a grace time, voting meanwhile: voters that have
        // not applied the change yet still count it.
        let cs = self.conf();
        let out = cs != ConfState::default()
            && !conf_nodes(&cs).contains(&self.me)
            && self.state.applied() >= self.node.raft.raft_log.last_index();
        if !out {
            self.leaving_ticks = None;
        } else if self.leaving_ticks.is_none() {
            self.leaving_ticks = Some(0);
        }
        Ok(())
    }

    fn note_leader(&mut self) {
        let seen = (self.leader(), self.node.raft.term);
        if seen != self.leader_seen {
            self.leader_seen = seen;
            self.events.push(GroupEvent::Leader {
                leader: seen.0,
                term: seen.1,
            });
        }
    }

    /// Applies committed entries in order.
    fn apply(&mut self, entries: Vec<Entry>) -> Result<(), Error> {
        for entry in entries {
            let index = entry.index;
            if index <= self.state.applied() {
                continue;
            }
            let applied = match entry.get_entry_type() {
                EntryType::EntryNormal => match Command::decode(&entry.data) {
                    Ok(command) => self.state.apply(index, &command),
                    Err(e) => {
                        self.state.skip(index);
                        self.events.push(GroupEvent::BadEntry {
                            index,
                            reason: e.to_string(),
                        });
                        Applied::Nothing
                    }
                },
                EntryType::EntryConfChangeV2 | EntryType::EntryConfChange => {
                    self.apply_conf(&entry)?;
                    self.state.skip(index);
                    Applied::Nothing
                }
            };
            self.events.push(GroupEvent::Applied {
                index,
                term: entry.term,
                data: entry.data.to_vec(),
                applied,
            });
            if let Some((term, token)) = self.pending.remove(&index) {
                self.events.push(if term == entry.term {
                    GroupEvent::Committed {
                        token,
                        index,
                        applied,
                    }
                } else {
                    GroupEvent::Dropped { token }
                });
            }
        }
        Ok(())
    }

    fn apply_conf(&mut self, entry: &Entry) -> Result<(), Error> {
        if entry.index <= self.store().meta().conf_index {
            // Applied before a restart: the stored configuration has it.
            return Ok(());
        }
        let cc = match wire::conf_change_of(entry) {
            Ok(cc) => cc,
            Err(e) => {
                self.events.push(GroupEvent::BadEntry {
                    index: entry.index,
                    reason: e.to_string(),
                });
                return Ok(());
            }
        };
        let cs = match self.node.apply_conf_change(&cc) {
            Ok(cs) => cs,
            Err(e) => {
                // raft-rs refused the change (it checks what the leader
                // checked); the configuration stays as it was.
                self.events.push(GroupEvent::BadEntry {
                    index: entry.index,
                    reason: e.to_string(),
                });
                return Ok(());
            }
        };
        let mut meta = self.store().meta().clone();
        meta.conf_state = cs.clone();
        meta.conf_index = entry.index;
        self.store_mut().set_meta(meta)?;
        let raft = &mut self.node.raft;
        if raft.state == StateRole::Leader
            && !cs.voters.contains(&self.me)
            && !cs.voters_outgoing.contains(&self.me)
        {
            // raft-rs leaves a leader that a change removed in charge (and
            // fails on its next acknowledgement); it steps down here, and the
            // remaining voters elect one of theirs. Until they apply this
            // change they still count the outgoing voters, this one included:
            // it keeps voting through its removal grace time.
            let term = raft.term;
            raft.become_follower(term, raft::INVALID_ID);
        }
        Ok(())
    }
}

fn single(kind: ConfChangeType, node: NodeId) -> ConfChangeSingle {
    let mut c = ConfChangeSingle::default();
    c.set_change_type(kind);
    c.node_id = node;
    c
}
