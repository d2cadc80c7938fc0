//! A group's membership: the leader moving it toward the voters placement
//! wants (learners, catch-up, one joint swap), handing leadership over,
//! hibernation, recovering peers, and leaving the group.

use super::*;

impl<S: LogStore> Group<S> {
    /// A peer says whether it lost entries it may have acknowledged. A
    /// leader forgets how far that peer's log reaches (raft-rs would
    /// otherwise keep counting its old acknowledgements toward commits) and
    /// probes it again, once per recovery.
    pub(crate) fn peer_recovering(&mut self, peer: NodeId, recovering: bool) {
        if self.reset_term != self.node.raft.term {
            self.reset_peers.clear();
            self.reset_term = self.node.raft.term;
        }
        if !recovering {
            self.reset_peers.remove(&peer);
            return;
        }
        if !self.is_leader() || !self.reset_peers.insert(peer) {
            return;
        }
        let last = self.node.raft.raft_log.last_index();
        if let Some(pr) = self.node.raft.mut_prs().get_mut(peer) {
            pr.become_probe();
            pr.matched = 0;
            pr.next_idx = last + 1;
            tracing::debug!(group = %group_name(&self.id), peer, "peer lost entries; probing it again");
        }
    }

    /// Once per tick on a leader: a recovering peer whose progress this
    /// leader reset and that has every entry gets no append from raft-rs
    /// while the log stands still (heartbeats only: it may have caught up by
    /// a snapshot alone, or before the reset), yet it ends its recovery on an
    /// append of this term, which carries the commit index it must reach.
    /// Send it an empty one.
    pub(crate) fn nudge_recovering_peers(&mut self) {
        if self.reset_peers.is_empty() || self.reset_term != self.node.raft.term {
            return;
        }
        let raft = &mut self.node.raft;
        let last = raft.raft_log.last_index();
        for peer in &self.reset_peers {
            let caught_up = raft
                .prs()
                .get(*peer)
                .is_some_and(|pr| pr.matched >= last && pr.state != raft::ProgressState::Snapshot);
            if caught_up {
                raft.send_append(*peer);
            }
        }
    }

    /// Recovering peers whose progress this leader reset in its term.
    pub(crate) fn reset_peers(&self) -> &BTreeSet<NodeId> {
        &self.reset_peers
    }

    /// A leader says it reset this replica's progress (in `term`): from now
    /// on its appends count toward this replica's recovery.
    pub(crate) fn progress_reset_by(&mut self, leader: NodeId, term: u64) {
        if self.recovering && term >= self.node.raft.term && self.reset_by != (leader, term) {
            self.reset_by = (leader, term);
            self.recover_target = 0;
        }
    }

    /// Once per tick: a replica out of its group for `grace` ticks is
    /// removed (the driver reports it, the shell deletes its data).
    pub(crate) fn check_removal(&mut self, grace: usize) {
        if let Some(t) = &mut self.leaving_ticks {
            *t += 1;
            if *t >= grace && !self.removed {
                self.removed = true;
                self.events.push(GroupEvent::Removed);
            }
        }
    }

    /// One step of moving the group toward its desired voters, on the
    /// leader. Returns whether a change was proposed (it counts against the
    /// driver's pace).
    ///
    /// While a voter is `down`, no live voter is removed: the group keeps
    /// every live copy until the down one returns or is replaced (it is
    /// then no longer desired), and only then moves on. A swap in that
    /// state would need every live old voter to complete, and would move
    /// data that the down voter's return or replacement moves back.
    pub(crate) fn reconfigure(
        &mut self,
        catch_up_slack: u64,
        down: &BTreeSet<NodeId>,
    ) -> Result<bool, Error> {
        let Some(desired) = self.desired.clone() else {
            return Ok(false);
        };
        if !self.serving() || desired.is_empty() {
            return Ok(false);
        }
        let raft = &self.node.raft;
        if raft.pending_conf_index > self.state.applied() {
            return Ok(false);
        }
        let cs = self.conf();
        if !cs.voters_outgoing.is_empty() {
            // A leader elected in the middle of a joint change leaves it.
            self.node
                .propose_conf_change(Vec::new(), ConfChangeV2::default())?;
            return Ok(true);
        }
        let voters: BTreeSet<NodeId> = cs.voters.iter().copied().collect();
        let learners: BTreeSet<NodeId> = cs.learners.iter().copied().collect();
        if voters == desired && learners.is_empty() {
            return Ok(false);
        }
        if !desired.contains(&self.me) {
            // Hand leadership to a caught-up, recently active desired voter
            // that has its log; the next leader removes this replica. With
            // none (the wanted set shares no voter with this one, or those
            // are down), this leader adds the new replicas itself and leaves
            // in the joint change, stepping down once it is out.
            let last = raft.raft_log.last_index();
            let target = raft
                .prs()
                .iter()
                .filter(|(id, pr)| {
                    **id != self.me
                        && voters.contains(id)
                        && desired.contains(id)
                        && pr.matched == last
                        && pr.recent_active
                        && !self.reset_peers.contains(id)
                })
                .map(|(id, _)| *id)
                .next();
            if let Some(target) = target {
                if raft.lead_transferee.is_none() {
                    self.node.transfer_leader(target);
                }
                return Ok(false);
            }
        }
        let missing: Vec<NodeId> = desired
            .iter()
            .filter(|n| !voters.contains(n) && !learners.contains(n))
            .copied()
            .collect();
        let mut cc = ConfChangeV2::default();
        if !missing.is_empty() {
            for node in missing {
                cc.mut_changes()
                    .push(single(ConfChangeType::AddLearnerNode, node));
            }
            self.node.propose_conf_change(Vec::new(), cc)?;
            return Ok(true);
        }
        let commit = raft.raft_log.committed;
        // A down learner waits as a learner: it neither holds back the
        // promotion of live ones (a group founded while an agent was dying
        // would stay a single copy for the whole grace period) nor becomes
        // a voter that cannot acknowledge.
        let promotable: Vec<NodeId> = learners
            .iter()
            .filter(|n| desired.contains(n) && !down.contains(n))
            .copied()
            .collect();
        let caught_up = promotable.iter().all(|n| {
            // Matched counts only for what the learner acknowledged itself
            // (never 0 after a reset), and a quiet group leaves a caught-up
            // learner in Probe: that counts too.
            raft.prs().get(*n).is_some_and(|pr| {
                pr.state != raft::ProgressState::Snapshot
                    && pr.matched > 0
                    && pr.matched + catch_up_slack >= commit
                    && !self.reset_peers.contains(n)
            })
        });
        if !caught_up {
            return Ok(false);
        }
        let down_voters: Vec<NodeId> = voters
            .iter()
            .filter(|v| down.contains(v))
            .copied()
            .collect();
        let removes_live_voter = voters
            .iter()
            .any(|v| !desired.contains(v) && !down.contains(v));
        let (promote, mut remove): (Vec<NodeId>, Vec<NodeId>) =
            if !down_voters.is_empty() && removes_live_voter {
                // Only the down voters that are no longer desired go, each
                // replaced by a caught-up live learner while there are; within
                // their grace period (still desired) only learners no longer
                // wanted leave.
                let gone: Vec<NodeId> = down_voters
                    .into_iter()
                    .filter(|v| !desired.contains(v))
                    .collect();
                let stale_learners = learners.iter().filter(|n| !desired.contains(n)).copied();
                if gone.is_empty() {
                    let stale: Vec<NodeId> = stale_learners.collect();
                    if stale.is_empty() {
                        return Ok(false);
                    }
                    (Vec::new(), stale)
                } else {
                    let mut candidates = promotable;
                    candidates.truncate(gone.len());
                    (candidates, gone.into_iter().chain(stale_learners).collect())
                }
            } else {
                (
                    promotable,
                    voters
                        .iter()
                        .chain(&learners)
                        .filter(|n| !desired.contains(n))
                        .copied()
                        .collect(),
                )
            };
        // With a desired learner down, fewer may be promoted than leave: the
        // group never shrinks below its size (or the desired one) for it,
        // and this leader is the last voter to go (its removal costs an
        // election).
        remove.sort_by_key(|n| (!voters.contains(n), *n == self.me));
        let keep = voters.len().min(desired.len());
        let may_remove = (voters.len() + promote.len()).saturating_sub(keep);
        let mut voters_removed = 0;
        remove.retain(|n| {
            if !voters.contains(n) {
                return true;
            }
            voters_removed += 1;
            voters_removed <= may_remove
        });
        for node in promote {
            cc.mut_changes().push(single(ConfChangeType::AddNode, node));
        }
        for node in remove {
            cc.mut_changes()
                .push(single(ConfChangeType::RemoveNode, node));
        }
        if cc.get_changes().is_empty() {
            return Ok(false);
        }
        if cc.get_changes().len() > 1 {
            cc.set_transition(ConfChangeTransition::Auto);
        }
        self.node.propose_conf_change(Vec::new(), cc)?;
        Ok(true)
    }

    /// Hands leadership to the most caught-up other voter (a graceful stop).
    pub(crate) fn transfer_leadership(&mut self) -> Option<NodeId> {
        let raft = &self.node.raft;
        if raft.state != StateRole::Leader {
            return None;
        }
        let cs = self.conf();
        let target = raft
            .prs()
            .iter()
            .filter(|(id, _)| **id != self.me && cs.voters.contains(id))
            .max_by_key(|(id, pr)| (pr.matched, std::cmp::Reverse(**id)))
            .map(|(id, _)| *id)?;
        self.wake();
        self.node.transfer_leader(target);
        Some(target)
    }

    /// Starts an election now instead of after an election timeout: a new
    /// group's preferred first voter takes the lead at once. A replica that
    /// may not vote (it lost entries) does not.
    pub(crate) fn campaign_now(&mut self) -> Result<(), Error> {
        if !self.may_vote() || self.node.raft.state == StateRole::Leader {
            return Ok(());
        }
        self.wake();
        self.node.campaign()?;
        Ok(())
    }

    /// Hands leadership to `target` when this replica leads a settled group
    /// (no change under way) in which `target` is a voter that has every
    /// entry: placement's preferred leader taking its groups back.
    pub(crate) fn transfer_to(&mut self, target: NodeId) -> bool {
        let raft = &self.node.raft;
        if raft.state != StateRole::Leader || target == self.me || raft.lead_transferee.is_some() {
            return false;
        }
        let last = raft.raft_log.last_index();
        let caught_up = raft.prs().get(target).is_some_and(|pr| pr.matched == last);
        let cs = self.conf();
        if !caught_up
            || !cs.voters.contains(&target)
            || !cs.voters_outgoing.is_empty()
            || !cs.learners.is_empty()
        {
            return false;
        }
        self.wake();
        self.node.transfer_leader(target);
        true
    }

    /// On a quiet leader: whether nothing is left to replicate or apply.
    pub(crate) fn quiet(&self) -> bool {
        let raft = &self.node.raft;
        let last = raft.raft_log.last_index();
        let settled = raft.state == StateRole::Leader
            && self.pending.is_empty()
            && raft.raft_log.committed == last
            && self.state.applied() == last
            && raft.lead_transferee.is_none()
            && raft
                .prs()
                .iter()
                .all(|(id, pr)| *id == self.me || pr.matched == last);
        if !settled {
            return false;
        }
        // Built once, and only for a leader that is otherwise quiet.
        let cs = self.conf();
        cs.voters_outgoing.is_empty()
            && cs.learners.is_empty()
            && self.desired.as_ref().is_none_or(|d| {
                d.len() == cs.voters.len() && cs.voters.iter().all(|v| d.contains(v))
            })
    }

    /// A follower hears its leader go quiet: it stops ticking when it has
    /// everything the leader has committed.
    pub(crate) fn hibernate_follower(&mut self, from: NodeId, term: u64, commit: u64) {
        let raft = &self.node.raft;
        // A follower that woke and has not heard from its leader since
        // ignores a `Hibernate` sent before the leader took its `Wake`: the
        // leader pings once woken, and sends another when quiet again.
        if raft.state == StateRole::Follower
            && raft.term == term
            && raft.leader_id == from
            && raft.raft_log.last_index() >= commit
            && !self.recovering()
            && !self.leader_unheard
        {
            self.hibernating = true;
        }
    }
}
