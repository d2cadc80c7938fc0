//! One round of the driver: stepping what peers sent, ticking, and
//! processing every group's ready into one batch per peer.

use super::{Driver, Event, Outbox, REMOVAL_GRACE_ELECTIONS};
use crate::group::{Bootstrap, Group, GroupEvent};
use crate::snapshot::SnapshotData;
use crate::store::LogStore;
use crate::wire;
use crate::{group_name, Error, GroupId, NodeId};
use raft::eraftpb::{Message, MessageType};
use shoal_proto::raft::{GroupMessages, Hibernate, RaftBatch, Signal};
use std::collections::BTreeSet;

impl<S: LogStore> Driver<S> {
    /// Steps the batch a peer sent. `from` is the sender's Raft id as its
    /// certificate says; a message claiming another sender is refused.
    pub fn step(&mut self, from: NodeId, batch: RaftBatch) {
        let newest = self
            .peer_incarnations
            .entry(from)
            .or_insert(batch.incarnation);
        if batch.incarnation < *newest {
            self.refuse(from, "stale_incarnation");
            return;
        }
        *newest = batch.incarnation;
        for gm in batch.groups {
            let GroupMessages {
                group,
                messages,
                signal,
                recovering,
                progress_reset,
            } = gm;
            if !self.groups.contains_key(&group) {
                let leaderish = messages.iter().any(|m| {
                    matches!(
                        m.kind,
                        shoal_proto::raft::RaftMessageKind::Append
                            | shoal_proto::raft::RaftMessageKind::Heartbeat
                            | shoal_proto::raft::RaftMessageKind::Snapshot
                    )
                });
                if !(self.config.join_on_message && leaderish) {
                    self.refuse(from, "unknown_group");
                    continue;
                }
                match (self.new_store)(&group)
                    .map_err(Error::from)
                    .and_then(|store| {
                        Group::open(
                            group.clone(),
                            self.me,
                            store,
                            Bootstrap::Join,
                            &self.group_config,
                        )
                    }) {
                    Ok(mut g) => {
                        g.redraw_timeout(&mut self.rng, self.config.election_ticks);
                        self.groups.insert(group.clone(), g);
                    }
                    Err(e) => {
                        self.events.push(Event::Failed {
                            group: group.clone(),
                            reason: e.to_string(),
                        });
                        continue;
                    }
                }
            }
            let mut failed = None;
            let mut refused = Vec::new();
            if let Some(g) = self.groups.get_mut(&group) {
                g.stirred = true;
                if progress_reset {
                    let term = messages.iter().map(|m| m.term).max().unwrap_or(0);
                    g.progress_reset_by(from, term);
                }
                for m in messages {
                    if m.from != from {
                        refused.push("wrong_sender");
                        continue;
                    }
                    if m.to != self.me {
                        refused.push("wrong_receiver");
                        continue;
                    }
                    if let Some(snap) = &m.snapshot {
                        if SnapshotData::decode(&snap.data, snap.index, snap.term).is_err() {
                            refused.push("bad_snapshot");
                            continue;
                        }
                    }
                    let msg = match wire::from_wire(m) {
                        Ok(msg) => msg,
                        Err(_) => {
                            refused.push("malformed");
                            continue;
                        }
                    };
                    let stepped = g.step(msg);
                    g.redraw_timeout(&mut self.rng, self.config.election_ticks);
                    match stepped {
                        Ok(()) | Err(Error::Raft(raft::Error::StepPeerNotFound)) => {}
                        Err(Error::Malformed(_)) => refused.push("malformed"),
                        Err(e) => {
                            failed = Some(e.to_string());
                            break;
                        }
                    }
                }
                match signal {
                    Signal::Nothing => {}
                    Signal::Hibernate(h) => g.hibernate_follower(from, h.term, h.commit),
                    // Only a replica of the group may wake it; it is not
                    // passed on (the waking replica told every peer).
                    Signal::Wake if g.peers().contains(&from) => g.wake(),
                    Signal::Wake => refused.push("not_a_peer"),
                }
                g.peer_recovering(from, recovering);
            }
            for reason in refused {
                self.refuse(from, reason);
            }
            if let Some(reason) = failed {
                self.fail(&group, reason);
            }
        }
    }

    fn refuse(&mut self, from: NodeId, reason: &'static str) {
        self.events.push(Event::Refused { from, reason });
    }

    pub(super) fn fail(&mut self, group: &GroupId, reason: String) {
        tracing::warn!(group = %group_name(group), %reason, "replica stopped");
        self.groups.remove(group);
        self.events.push(Event::Failed {
            group: group.clone(),
            reason,
        });
    }

    /// One tick of every awake group, hibernation and paced membership
    /// changes. Call [`Self::process`] afterwards.
    pub fn tick(&mut self) {
        self.stats.ticks += 1;
        let mut changes = 0;
        let mut failed = Vec::new();
        let mut going_quiet = Vec::new();
        let mut to_wake = Vec::new();
        let grace = REMOVAL_GRACE_ELECTIONS * self.config.election_ticks;
        for (id, g) in self.groups.iter_mut() {
            g.check_removal(grace);
            if g.hibernating || g.removed {
                continue;
            }
            if g.recovering() {
                // No ticks: a replica that lost committed entries must not
                // campaign. It still takes appends.
                continue;
            }
            g.node.tick();
            g.redraw_timeout(&mut self.rng, self.config.election_ticks);
            if g.leader_unheard {
                match g.leader() {
                    // A leader membership says is down is not worth a frame
                    // a tick; its followers' timers are running.
                    Some(leader) if self.down.contains(&leader) => {}
                    Some(leader) if !g.is_leader() => to_wake.push((id.clone(), leader)),
                    // An election began: nobody to wake any more.
                    _ => g.leader_unheard = false,
                }
            }
            g.drop_snapshot_if_unneeded();
            g.check_snapshots(2 * self.config.election_ticks);
            if let Err(e) = g.build_snapshot() {
                failed.push((id.clone(), e.to_string()));
            }
            self.stats.group_ticks += 1;
            if g.is_leader() {
                g.nudge_recovering_peers();
            }
            if g.is_leader() && changes < self.config.max_concurrent_changes {
                match g.reconfigure(self.config.catch_up_slack, &self.down) {
                    Ok(true) => {
                        changes += 1;
                        self.stats.conf_changes += 1;
                    }
                    Ok(false) => {}
                    Err(Error::Raft(raft::Error::ProposalDropped)) => {}
                    Err(e) => failed.push((id.clone(), e.to_string())),
                }
            }
            if g.quiet() {
                g.quiet_ticks += 1;
                if g.quiet_ticks >= self.config.hibernate_after_ticks {
                    g.hibernating = true;
                    g.stirred = true;
                    going_quiet.push((
                        id.clone(),
                        g.peers(),
                        g.node.raft.term,
                        g.node.raft.raft_log.committed,
                    ));
                }
            } else {
                g.quiet_ticks = 0;
            }
        }
        for (id, peers, term, commit) in going_quiet {
            for peer in peers {
                self.entry(peer, &id).signal = Signal::Hibernate(Hibernate { term, commit });
            }
        }
        for (id, leader) in to_wake {
            self.entry(leader, &id).signal = Signal::Wake;
        }
        for (id, reason) in failed {
            self.fail(&id, reason);
        }
    }

    pub(super) fn entry(&mut self, to: NodeId, group: &GroupId) -> &mut GroupMessages {
        self.outbox
            .entry(to)
            .or_default()
            .entry(group.clone())
            .or_insert_with(|| GroupMessages {
                group: group.clone(),
                messages: Vec::new(),
                signal: Signal::Nothing,
                recovering: false,
                progress_reset: false,
            })
    }

    fn send(&mut self, group: &GroupId, messages: Vec<Message>) {
        let (recovering, reset, committed) = match self.groups.get(group) {
            Some(g) => (
                g.recovering(),
                g.reset_peers().clone(),
                g.node.raft.raft_log.committed,
            ),
            None => (false, BTreeSet::new(), 0),
        };
        for m in messages {
            if m.get_msg_type() == MessageType::MsgAppend {
                self.stats.catch_up_bytes += m
                    .entries
                    .iter()
                    .filter(|e| e.index <= committed)
                    .map(|e| e.data.len() as u64)
                    .sum::<u64>();
            }
            match wire::to_wire(&m) {
                Ok(w) => {
                    let to = m.to;
                    let entry = self.entry(to, group);
                    entry.messages.push(w);
                    entry.recovering |= recovering;
                    entry.progress_reset |= reset.contains(&to);
                }
                Err(e) => {
                    tracing::warn!(group = %group_name(group), error = %e, "raft message not sent")
                }
            }
        }
    }

    /// Runs every group's ready: collect and write, sync every written
    /// store once, then send and advance. Returns the batches to send.
    pub fn process(&mut self) -> Outbox {
        let mut readies = Vec::new();
        let mut failed = Vec::new();
        let mut send = Vec::new();
        // A hibernating group nobody stirred has nothing ready: skipping it
        // keeps 1,000 idle groups from costing 1,000 `has_ready` per round.
        let mut checked = 0;
        let ids: Vec<GroupId> = self
            .groups
            .iter_mut()
            .filter_map(|(id, g)| {
                let look = !g.hibernating || std::mem::take(&mut g.stirred);
                checked += u64::from(look);
                (look && g.node.has_ready()).then(|| id.clone())
            })
            .collect();
        self.stats.ready_checks += checked;
        for id in &ids {
            let Some(g) = self.groups.get_mut(id) else {
                continue;
            };
            match g.collect(&mut send) {
                Ok(Some(rd)) => readies.push((id.clone(), rd)),
                Ok(None) => {}
                Err(e) => failed.push((id.clone(), e.to_string())),
            }
            let out = std::mem::take(&mut send);
            self.send(id, out);
        }
        let mut synced = 0;
        for (id, _) in &readies {
            let Some(g) = self.groups.get_mut(id) else {
                continue;
            };
            self.written.insert(id.clone());
            match g.store_mut().sync() {
                Ok(()) => synced += 1,
                Err(e) => failed.push((id.clone(), e.to_string())),
            }
        }
        if synced > 0 {
            self.stats.syncs += synced;
            self.stats.sync_rounds += 1;
        }
        for (id, rd) in readies {
            if failed.iter().any(|(f, _)| *f == id) {
                continue;
            }
            let Some(g) = self.groups.get_mut(&id) else {
                continue;
            };
            if let Err(e) = g.finish(rd, &mut send) {
                failed.push((id.clone(), e.to_string()));
            }
            let out = std::mem::take(&mut send);
            self.send(&id, out);
        }
        for id in &ids {
            if let Some(g) = self.groups.get_mut(id) {
                if let Err(e) = g.build_snapshot() {
                    failed.push((id.clone(), e.to_string()));
                }
                // raft-rs may hand out more after an advance: look again.
                g.stirred = g.hibernating && g.node.has_ready();
            }
        }
        for (id, reason) in failed {
            self.fail(&id, reason);
        }
        self.drain_group_events();
        let mut out = Outbox::new();
        for (to, groups) in std::mem::take(&mut self.outbox) {
            let batch = RaftBatch {
                incarnation: self.config.incarnation,
                groups: groups.into_values().collect(),
            };
            self.stats.batches += 1;
            self.stats.messages += batch
                .groups
                .iter()
                .map(|g| g.messages.len() as u64)
                .sum::<u64>();
            out.insert(to, batch);
        }
        out
    }

    fn drain_group_events(&mut self) {
        let report = self.config.report_applied;
        for (id, g) in self.groups.iter_mut() {
            for e in g.events.drain(..) {
                let event = match e {
                    GroupEvent::Committed {
                        token,
                        index,
                        applied,
                    } => Event::Committed {
                        group: id.clone(),
                        token,
                        index,
                        applied,
                    },
                    GroupEvent::Dropped { token } => Event::Dropped {
                        group: id.clone(),
                        token,
                    },
                    GroupEvent::Applied {
                        index,
                        term,
                        data,
                        applied,
                    } => {
                        if !report {
                            continue;
                        }
                        Event::Applied {
                            group: id.clone(),
                            index,
                            term,
                            data,
                            applied,
                        }
                    }
                    GroupEvent::Leader { leader, term } => Event::Leader {
                        group: id.clone(),
                        leader,
                        term,
                    },
                    GroupEvent::Removed => Event::Removed { group: id.clone() },
                    GroupEvent::BadEntry { index, reason } => Event::BadEntry {
                        group: id.clone(),
                        index,
                        reason,
                    },
                };
                self.events.push(event);
            }
        }
    }
}
