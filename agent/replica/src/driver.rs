//! The multi-raft driver: every group of one agent, driven together.
//!
//! - **One tick for all.** The shell calls [`Driver::tick`] every
//!   [`DriverConfig::tick_ms`]; awake groups tick, hibernating ones do not.
//! - **One batch per peer per round.** Every message of every group to one
//!   agent goes out in one [`RaftBatch`], so a thousand groups' heartbeats
//!   are one frame per agent pair per heartbeat interval.
//! - **One sync phase per round.** [`Driver::process`] collects every
//!   group's ready and writes, syncs each written store once, then sends
//!   what promises durability and advances every group.
//! - **Hibernation.** A leader whose group has nothing in flight for
//!   [`DriverConfig::hibernate_after_ticks`] tells its followers and stops
//!   ticking; they stop too. A proposal, a peer's message, a membership
//!   change or a peer going down wakes a group.
//! - **Paced membership changes.** Each group moves toward the voters the
//!   shell wants ([`Driver::set_replicas`]): new replicas join as learners,
//!   catch up, then one joint-consensus swap; at most
//!   [`DriverConfig::max_concurrent_changes`] changes are proposed per tick.

mod rounds;

use crate::group::{Bootstrap, Group, GroupConfig, GroupStatus};
use crate::state::Applied;
use crate::store::{LogStore, StoreError};
use crate::{group_name, Error, GroupId, NodeId};
use shoal_proto::raft::{GroupMessages, RaftBatch, Signal};
use std::collections::{BTreeMap, BTreeSet};

/// Default tick: 200 ms. Every group ticks on the driver's tick, so the
/// heartbeats of all groups leave in the same round: one batch per peer.
pub const DEFAULT_TICK_MS: u64 = 200;
/// Default election timeout: 5 ticks (1 s), randomized up to 2 s.
pub const DEFAULT_ELECTION_TICKS: usize = 5;
/// Default heartbeat interval: every tick (200 ms).
pub const DEFAULT_HEARTBEAT_TICKS: usize = 1;
/// Default quiet time before a group hibernates: 15 ticks (3 s).
pub const DEFAULT_HIBERNATE_AFTER_TICKS: u32 = 15;
/// Default number of membership changes proposed per tick.
pub const DEFAULT_MAX_CONCURRENT_CHANGES: usize = 8;
/// A replica out of its group's configuration keeps voting this many
/// election timeouts before it is removed: voters that have not applied the
/// change yet still count it.
pub const REMOVAL_GRACE_ELECTIONS: usize = 20;
/// Default largest append, in bytes of entry data (a single larger entry
/// still goes alone).
pub const DEFAULT_MAX_APPEND_BYTES: u64 = 256 << 10;
/// Default appends in flight to one follower. A replica catching up gets a
/// full window at once, so this times the larger of
/// [`DEFAULT_MAX_APPEND_BYTES`] and the largest message (an entry larger
/// than an append goes alone) bounds what a leader holds for it: 4 MiB of
/// small messages, 16 MiB of 1 MiB ones. A publish is one proposal per
/// append's worth of its messages ([`Driver::propose_many`]), so a window
/// this small does not hold one back.
pub const DEFAULT_MAX_INFLIGHT: usize = 16;

/// Bytes an entry takes in an append beyond its data (protobuf fields for
/// its index, term and type, and framing), rounded up: what a proposal
/// counts per entry when it cuts its commands into appends.
pub const ENTRY_OVERHEAD_BYTES: u64 = 24;

/// Settings of a driver.
#[derive(Debug, Clone)]
pub struct DriverConfig {
    /// How often the shell ticks, for reference (the driver counts ticks).
    pub tick_ms: u64,
    /// Election timeout in ticks.
    pub election_ticks: usize,
    /// Heartbeat interval in ticks.
    pub heartbeat_ticks: usize,
    /// Quiet ticks before a leader hibernates its group.
    pub hibernate_after_ticks: u32,
    /// Membership changes proposed per tick, over all groups.
    pub max_concurrent_changes: usize,
    /// A learner within this many entries of the commit index counts as
    /// caught up.
    pub catch_up_slack: u64,
    /// Largest append message.
    pub max_append_bytes: u64,
    /// Appends in flight per follower.
    pub max_inflight: usize,
    /// Dedupe window of every partition.
    pub dedupe_window_ms: u64,
    /// Create a replica (empty, joining) when a leader's message arrives
    /// for a group this agent does not have.
    pub join_on_message: bool,
    /// Report every applied entry as [`Event::Applied`] (the simulation's
    /// checker reads them; the agent reads the log instead).
    pub report_applied: bool,
    /// Seed of the election timeouts (a simulation replays a seed exactly).
    pub seed: u64,
    /// This agent's incarnation, growing at every start (its start time in
    /// milliseconds); peers drop batches from an older one.
    pub incarnation: u64,
}

impl Default for DriverConfig {
    fn default() -> Self {
        DriverConfig {
            tick_ms: DEFAULT_TICK_MS,
            election_ticks: DEFAULT_ELECTION_TICKS,
            heartbeat_ticks: DEFAULT_HEARTBEAT_TICKS,
            hibernate_after_ticks: DEFAULT_HIBERNATE_AFTER_TICKS,
            max_concurrent_changes: DEFAULT_MAX_CONCURRENT_CHANGES,
            catch_up_slack: 64,
            max_append_bytes: DEFAULT_MAX_APPEND_BYTES,
            max_inflight: DEFAULT_MAX_INFLIGHT,
            dedupe_window_ms: crate::state::DEFAULT_DEDUPE_WINDOW_MS,
            join_on_message: true,
            report_applied: false,
            seed: 0,
            incarnation: 0,
        }
    }
}

/// What happened, for the shell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A proposal's entry was applied at `index`.
    Committed {
        /// The group.
        group: GroupId,
        /// The proposer's token.
        token: u64,
        /// Where the entry is.
        index: u64,
        /// What applying it did (a duplicate id names the original).
        applied: Applied,
    },
    /// A proposal's entry was replaced by another leader's: it will never
    /// be applied. Its publisher may try again (with the same id).
    Dropped {
        /// The group.
        group: GroupId,
        /// The proposer's token.
        token: u64,
    },
    /// An entry was applied (only with [`DriverConfig::report_applied`]).
    Applied {
        /// The group.
        group: GroupId,
        /// Index.
        index: u64,
        /// Term.
        term: u64,
        /// The entry's data.
        data: Vec<u8>,
        /// What applying it did.
        applied: Applied,
    },
    /// The group's leader or term changed, as this replica sees it.
    Leader {
        /// The group.
        group: GroupId,
        /// The leader, if any.
        leader: Option<NodeId>,
        /// The term.
        term: u64,
    },
    /// This replica was removed from the group; the shell deletes its data.
    Removed {
        /// The group.
        group: GroupId,
    },
    /// A peer's message was refused (bad form, wrong sender, unknown group).
    Refused {
        /// The sender.
        from: NodeId,
        /// Why, for logs and the metric label.
        reason: &'static str,
    },
    /// An entry could not be applied (its data is unreadable); skipped.
    BadEntry {
        /// The group.
        group: GroupId,
        /// Index.
        index: u64,
        /// Why.
        reason: String,
    },
    /// A group stopped on a storage or raft error; the shell reopens it.
    Failed {
        /// The group.
        group: GroupId,
        /// Why.
        reason: String,
    },
}

/// Batches to send, by destination.
pub type Outbox = BTreeMap<NodeId, RaftBatch>;

/// Opens the store of a group this agent joins.
pub type NewStore<S> = Box<dyn FnMut(&GroupId) -> Result<S, StoreError> + Send>;

/// Counters of a driver's work, for metrics and the benchmark.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DriverStats {
    /// Ticks so far.
    pub ticks: u64,
    /// Groups that ticked, summed over ticks.
    pub group_ticks: u64,
    /// Batches handed out.
    pub batches: u64,
    /// Raft messages in them.
    pub messages: u64,
    /// Stores synced.
    pub syncs: u64,
    /// Rounds that synced at least one store.
    pub sync_rounds: u64,
    /// Membership changes proposed.
    pub conf_changes: u64,
    /// Groups asked whether raft-rs has a ready for them, summed over
    /// rounds (a hibernating group nothing stirred is not asked).
    pub ready_checks: u64,
    /// Bytes of entry data a leader sent that were already committed: a
    /// replica catching up (a new one after its snapshot, or one that was
    /// away). Entries sent before they commit, the steady state, are not
    /// counted.
    pub catch_up_bytes: u64,
}

/// The multi-raft driver of one agent.
pub struct Driver<S: LogStore> {
    me: NodeId,
    config: DriverConfig,
    group_config: GroupConfig,
    groups: BTreeMap<GroupId, Group<S>>,
    new_store: NewStore<S>,
    down: BTreeSet<NodeId>,
    outbox: BTreeMap<NodeId, BTreeMap<GroupId, GroupMessages>>,
    events: Vec<Event>,
    stats: DriverStats,
    rng: fastrand::Rng,
    /// The newest incarnation each peer has sent.
    peer_incarnations: BTreeMap<NodeId, u64>,
    /// Groups whose stores were written since the last
    /// [`Driver::flush_stores`] (only they can hold writes left for later).
    written: BTreeSet<GroupId>,
}

impl<S: LogStore> std::fmt::Debug for Driver<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver")
            .field("me", &self.me)
            .field("groups", &self.groups.len())
            .finish_non_exhaustive()
    }
}

impl<S: LogStore> Driver<S> {
    /// A driver for the agent with Raft id `me`; `new_store` opens the
    /// store of a group this agent joins.
    pub fn new(me: NodeId, config: DriverConfig, new_store: NewStore<S>) -> Self {
        let group_config = GroupConfig {
            election_ticks: config.election_ticks,
            heartbeat_ticks: config.heartbeat_ticks,
            max_append_bytes: config.max_append_bytes,
            max_inflight: config.max_inflight,
            dedupe_window_ms: config.dedupe_window_ms,
        };
        let rng = fastrand::Rng::with_seed(config.seed ^ me);
        Driver {
            me,
            config,
            group_config,
            groups: BTreeMap::new(),
            new_store,
            down: BTreeSet::new(),
            outbox: BTreeMap::new(),
            events: Vec::new(),
            stats: DriverStats::default(),
            rng,
            peer_incarnations: BTreeMap::new(),
            written: BTreeSet::new(),
        }
    }

    /// This agent's Raft id.
    pub fn me(&self) -> NodeId {
        self.me
    }

    /// Opens a replica of `group` on `store`.
    pub fn open_group(
        &mut self,
        group: GroupId,
        store: S,
        bootstrap: Bootstrap,
    ) -> Result<(), Error> {
        if self.groups.contains_key(&group) {
            return Err(Error::GroupExists(group_name(&group)));
        }
        let mut g = Group::open(group.clone(), self.me, store, bootstrap, &self.group_config)?;
        g.redraw_timeout(&mut self.rng, self.config.election_ticks);
        self.groups.insert(group, g);
        Ok(())
    }

    /// Drops a replica (its store is closed; the shell deletes its files).
    pub fn remove_group(&mut self, group: &GroupId) -> bool {
        self.groups.remove(group).is_some()
    }

    /// A group to act on: marked stirred, so [`Self::process`] looks at it
    /// even while it hibernates.
    fn group_mut(&mut self, group: &GroupId) -> Option<&mut Group<S>> {
        let g = self.groups.get_mut(group)?;
        g.stirred = true;
        Some(g)
    }

    /// The groups held here.
    pub fn groups(&self) -> impl Iterator<Item = &GroupId> {
        self.groups.keys()
    }

    /// Every group held here with its replica, in order.
    pub fn iter(&self) -> impl Iterator<Item = (&GroupId, &Group<S>)> {
        self.groups.iter()
    }

    /// A group's replica.
    pub fn group(&self, group: &GroupId) -> Option<&Group<S>> {
        self.groups.get(group)
    }

    /// A group's store, to change how it writes (its sync policy). Its log
    /// and state belong to the group: write them only through the driver.
    pub fn store_mut(&mut self, group: &GroupId) -> Option<&mut S> {
        self.group_mut(group).map(Group::store_mut)
    }

    /// Whether the next [`Self::process`] could block on the disk: a group
    /// with work has a store that `syncs_each_round` picks (it fsyncs every
    /// round), a snapshot to build or install, or a new term or vote to make
    /// durable. The shell runs such a round on its own thread.
    pub fn round_may_block(&self, syncs_each_round: impl Fn(&S) -> bool) -> bool {
        self.groups
            .values()
            .any(|g| g.may_have_ready() && (syncs_each_round(g.store()) || g.round_may_block()))
    }

    /// Stops a group's replica as a failed write does (its store failed
    /// outside the driver, for example changing how it syncs); it reports
    /// [`Event::Failed`].
    pub fn stop_group(&mut self, group: &GroupId, reason: String) {
        if self.groups.contains_key(group) {
            self.fail(group, reason);
        }
    }

    /// Flushes every store that left writes for later ([`LogStore::flush`]);
    /// returns how many synced. A store that fails stops its replica, as a
    /// failed write does.
    pub fn flush_stores(&mut self) -> u64 {
        let flushed = self.begin_flush(|s| Some(s.flush()));
        self.end_flush(flushed, |_, flushed| flushed)
    }

    /// Starts a flush the shell runs without holding its lock: `begin`
    /// hands out, for each store written since the last flush, what it has
    /// to sync (`None`: nothing). Finish with [`Driver::end_flush`].
    /// [`Driver::flush_stores`] is the same in one step. Hibernating
    /// groups stay asleep.
    pub fn begin_flush<T>(
        &mut self,
        mut begin: impl FnMut(&mut S) -> Option<T>,
    ) -> Vec<(GroupId, T)> {
        let mut out = Vec::new();
        for id in std::mem::take(&mut self.written) {
            if let Some(g) = self.groups.get_mut(&id) {
                if let Some(t) = begin(g.store_mut()) {
                    out.push((id, t));
                }
            }
        }
        out
    }

    /// Ends a flush [`Driver::begin_flush`] started: `end` takes each
    /// store's sync result and says whether it synced anything; a store
    /// that fails stops its replica, as a failed write does. A group closed
    /// meanwhile is passed over. Returns how many stores synced.
    pub fn end_flush<R>(
        &mut self,
        results: Vec<(GroupId, R)>,
        mut end: impl FnMut(&mut S, R) -> Result<bool, StoreError>,
    ) -> u64 {
        let mut synced = 0;
        let mut failed = Vec::new();
        for (id, result) in results {
            let Some(g) = self.groups.get_mut(&id) else {
                continue;
            };
            match end(g.store_mut(), result) {
                Ok(true) => synced += 1,
                Ok(false) => {}
                Err(e) => failed.push((id, e.to_string())),
            }
        }
        self.stats.syncs += synced;
        for (id, reason) in failed {
            self.fail(&id, reason);
        }
        synced
    }

    /// A group's status.
    pub fn status(&self, group: &GroupId) -> Option<GroupStatus> {
        self.groups.get(group).map(Group::status)
    }

    /// Whether a group's leader sends a new commit index at once, in an
    /// append of its own (`true`), or with its next append or heartbeat
    /// (the default). A group whose followers act on what commits wants it
    /// at once: the meta group's creation records found groups on every
    /// founder, whose first election waits for them.
    pub fn broadcast_commits(&mut self, group: &GroupId, at_once: bool) {
        if let Some(g) = self.groups.get_mut(group) {
            g.node.raft.skip_bcast_commit(!at_once);
        }
    }

    /// The leader of a group held here, as far as its replica knows
    /// (`Some(None)`: none known now; `None`: no replica here). What a
    /// publish asks on its way, without building a whole [`GroupStatus`].
    pub fn leader(&self, group: &GroupId) -> Option<Option<NodeId>> {
        self.groups.get(group).map(Group::leader)
    }

    /// Work counters.
    pub fn stats(&self) -> &DriverStats {
        &self.stats
    }

    /// Proposes `data` (an encoded [`crate::command::Command`]) to the group
    /// this agent leads. `token` comes back in [`Event::Committed`] or
    /// [`Event::Dropped`]. Returns the entry's index.
    pub fn propose(&mut self, group: &GroupId, token: u64, data: Vec<u8>) -> Result<u64, Error> {
        let g = self
            .group_mut(group)
            .ok_or_else(|| Error::UnknownGroup(group_name(group)))?;
        g.propose(token, data)
    }

    /// Proposes several commands as consecutive entries of the group this
    /// agent leads, all or none, in one append per `max_append_bytes` of
    /// them to each follower. Each token
    /// comes back in its own [`Event::Committed`] or [`Event::Dropped`].
    /// Returns the first entry's index.
    pub fn propose_many(
        &mut self,
        group: &GroupId,
        commands: Vec<(u64, Vec<u8>)>,
    ) -> Result<u64, Error> {
        if commands.is_empty() {
            return Err(Error::Raft(raft::Error::ProposalDropped));
        }
        let g = self
            .group_mut(group)
            .ok_or_else(|| Error::UnknownGroup(group_name(group)))?;
        g.propose_many(commands)
    }

    /// The voters a group should have (placement's choice). The leader
    /// moves toward them, paced.
    pub fn set_replicas(&mut self, group: &GroupId, voters: &[NodeId]) {
        if let Some(g) = self.groups.get_mut(group) {
            let desired: BTreeSet<NodeId> = voters.iter().copied().collect();
            if g.desired.as_ref() != Some(&desired) {
                g.desired = Some(desired);
                g.wake();
            }
        }
    }

    /// Membership says `node` is down (or up again). Groups it leads wake,
    /// so their followers can elect another leader.
    pub fn set_down(&mut self, node: NodeId, down: bool) {
        let changed = if down {
            self.down.insert(node)
        } else {
            self.down.remove(&node)
        };
        if !changed || !down {
            return;
        }
        for g in self.groups.values_mut() {
            if g.hibernating && (g.leader() == Some(node) || g.peers().contains(&node)) {
                g.wake();
            }
        }
    }

    /// Events since the last call.
    pub fn take_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }

    /// Retention: drops a group's entries before `first_index` (never past
    /// what it applied).
    pub fn compact(&mut self, group: &GroupId, first_index: u64) -> Result<(), Error> {
        let g = self
            .group_mut(group)
            .ok_or_else(|| Error::UnknownGroup(group_name(group)))?;
        g.compact(first_index)
    }

    /// A graceful stop: every group led here hands leadership to its most
    /// caught-up voter. Returns how many transfers started.
    pub fn transfer_all_leadership(&mut self) -> usize {
        self.groups
            .values_mut()
            .filter_map(|g| {
                g.stirred = true;
                g.transfer_leadership()
            })
            .count()
    }

    /// Hands leadership of `group` to `to` if this agent leads it, the
    /// group is settled and `to` is a caught-up voter; returns whether a
    /// transfer started. The shell uses it to give each group the leader
    /// placement prefers, so leaders spread over agents.
    pub fn transfer_leader(&mut self, group: &GroupId, to: NodeId) -> bool {
        if self.down.contains(&to) {
            return false;
        }
        self.group_mut(group).is_some_and(|g| g.transfer_to(to))
    }

    /// Has this replica of `group` campaign now (a group just founded with
    /// it as the preferred leader) rather than after an election timeout.
    pub fn campaign(&mut self, group: &GroupId) -> Result<(), Error> {
        let g = self
            .group_mut(group)
            .ok_or_else(|| Error::UnknownGroup(group_name(group)))?;
        g.campaign_now()
    }

    /// Wakes a hibernating group this replica follows, for a reason of its
    /// own: a publish or a read reached it, or the leader is suspected of
    /// having died. Its peers are told to wake too ([`Signal::Wake`]), and
    /// the leader again every tick until it is heard from: if it died while
    /// the group slept, the followers' election timers run together and
    /// they elect another leader instead of waiting for membership to say
    /// it is down; if it is alive, it heartbeats before their timers run
    /// out. Returns whether the group woke.
    pub fn wake_group(&mut self, group: &GroupId) -> bool {
        let Some(g) = self.groups.get_mut(group) else {
            return false;
        };
        if !g.hibernating || g.is_leader() {
            return false;
        }
        g.wake();
        let peers = g.peers();
        for peer in peers {
            self.entry(peer, group).signal = Signal::Wake;
        }
        true
    }

    /// Wakes, as [`Self::wake_group`] does, the hibernating groups this
    /// replica follows under `leader`, which the gossip suspects of having
    /// died; returns how many woke.
    pub fn wake_groups_led_by(&mut self, leader: NodeId) -> usize {
        let led: Vec<GroupId> = self
            .groups
            .iter()
            .filter(|(_, g)| g.hibernating && g.leader() == Some(leader))
            .map(|(id, _)| id.clone())
            .collect();
        led.iter().filter(|g| self.wake_group(g)).count()
    }

    /// The newest incarnation (run) `node` has sent a batch from, if any.
    pub fn peer_incarnation(&self, node: NodeId) -> Option<u64> {
        self.peer_incarnations.get(&node).copied()
    }

    /// Groups this replica leads.
    pub fn leading(&self) -> usize {
        self.groups.values().filter(|g| g.is_leader()).count()
    }

    /// Groups not ticking.
    pub fn hibernating(&self) -> usize {
        self.groups.values().filter(|g| g.hibernating).count()
    }

    /// A peer is unreachable: its groups stop sending it appends until
    /// it answers (raft-rs probes it).
    pub fn report_unreachable(&mut self, node: NodeId) {
        for g in self.groups.values_mut() {
            if g.peers().contains(&node) {
                g.stirred = true;
                g.node.report_unreachable(node);
            }
        }
    }
}

impl<S: LogStore + Default> Driver<S> {
    /// Closes a replica and hands back its store (to delete or reopen).
    pub fn close_group(&mut self, group: &GroupId) -> Option<S> {
        let mut g = self.groups.remove(group)?;
        Some(std::mem::take(g.store_mut()))
    }
}
