//! The driver's rounds: stepping the inbox, ticking, processing every
//! group, sending what it hands out, and acting on its events; and the
//! periodic fsync of `interval` topics.

use super::transfer::{raft_frames, split_batch, Sending, PART_PACE};
use super::{
    group_dir, group_label, is_meta, leader_lost, lock, Core, Replication,
    AGE_RETENTION_EVERY_TICKS, COMMIT_EVERY_TICKS, RECONCILE_EVERY_TICKS,
    SIZE_RETENTION_EVERY_TICKS,
};
use shoal_replica::disk::{DiskStore, SyncPolicy};
use shoal_replica::{Bootstrap, Event};
use std::path::PathBuf;
use std::sync::MutexGuard;
use std::time::Duration;

impl Replication {
    /// Fsyncs what `interval` topics wrote since the last flush. The fsyncs
    /// run without the driver's lock: with one worker thread, a publish or
    /// a peer's batch waiting for that lock would stall the whole runtime
    /// for as long as the disk takes.
    pub(super) fn flush_interval_stores(&self) {
        let pending = lock(&self.core).driver.begin_flush(DiskStore::begin_flush);
        if pending.is_empty() {
            return;
        }
        let results: Vec<_> = pending
            .into_iter()
            .map(|(id, handle)| (id, handle.sync()))
            .collect();
        lock(&self.core).driver.end_flush(results, |store, synced| {
            store.end_flush(synced).map(|()| true)
        });
    }

    /// A round for new work (a proposal, a peer's batch): on the caller's
    /// task when it writes only to the OS, which saves the hand-off to the
    /// driver's thread on every step of a commit; on that thread when it
    /// could block on the disk (a store with work that fsyncs every round:
    /// `always` topics, the meta group; a snapshot; a new term or vote). A
    /// state write every `COMMIT_WRITE_STRIDE` commits and a membership
    /// change still fsync inline: rare, and one small file.
    pub(super) fn round_now(&self) {
        // Busy (another round under way): the driver's thread takes it.
        let Ok(mut core) = self.core.try_lock() else {
            self.wake.wake();
            return;
        };
        // Batches waiting in the inbox join this round: whether it may
        // block depends on them too (a vote, an `always` append).
        self.step_inbox(&mut core);
        if core
            .driver
            .round_may_block(|s| s.sync_policy() == SyncPolicy::Always)
        {
            drop(core);
            self.wake.wake();
        } else {
            self.round_in(core, false, false);
        }
    }

    /// One round: tick (if due), process every group, send what it hands out.
    pub(super) fn round(&self, ticked: bool) {
        self.round_in(lock(&self.core), ticked, true);
    }

    /// `on_driver_thread`: the round may take its time (create new groups'
    /// files); on a caller's task it leaves that to the driver's thread.
    pub(super) fn round_in(
        &self,
        mut core: MutexGuard<'_, Core>,
        ticked: bool,
        on_driver_thread: bool,
    ) {
        self.step_inbox(&mut core);
        let (outbox, removed) = {
            if ticked {
                core.driver.tick();
                core.ticks += 1;
                if core.ticks.is_multiple_of(RECONCILE_EVERY_TICKS) {
                    // Publishers that gave up (their entry neither committed
                    // nor dropped in time) leave nothing behind.
                    core.waiters.retain(|_, w| !w.tx.is_closed());
                    self.propose_missing(&mut core);
                    self.place_all(&mut core);
                    self.apply_sync_policies(&mut core);
                    self.propose_windows(&mut core);
                }

                if core.ticks.is_multiple_of(COMMIT_EVERY_TICKS) {
                    self.flush_commits(&mut core);
                }
                if core.ticks.is_multiple_of(SIZE_RETENTION_EVERY_TICKS) {
                    let by_age = core.ticks.is_multiple_of(AGE_RETENTION_EVERY_TICKS);
                    self.enforce_retention(&mut core, by_age);
                }
            }
            let outbox = core.driver.process();
            let removed = self.handle_events(&mut core);
            self.apply_meta(&mut core, on_driver_thread);
            if ticked {
                // Counted over every group: once a tick, not on every
                // publish's round.
                self.metrics
                    .replica_groups
                    .set(core.driver.groups().count() as i64);
                self.metrics
                    .replica_leading
                    .set(core.driver.leading() as i64);
                self.metrics
                    .replica_hibernating
                    .set(core.driver.hibernating() as i64);
            }
            (outbox, removed)
        };
        drop(core);
        for dir in removed {
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot delete a removed replica's files");
            }
        }
        self.round.send_modify(|r| *r += 1);
        if outbox.is_empty() {
            return;
        }
        let peers = lock(&self.peers);
        for (to, batch) in outbox {
            let Some((name, addr)) = peers.by_id.get(&to).cloned() else {
                tracing::debug!(
                    to,
                    "no address for a replica peer yet; its batch waits for the next round"
                );
                continue;
            };
            let mesh = self.mesh.clone();
            let transfers = self.next_transfer.clone();
            let sending = self.sending.clone();
            tokio::spawn(async move {
                // In order, one frame after the other, each under the frame limit.
                for part in split_batch(batch) {
                    let transfer = transfers.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let frames = raft_frames(part, transfer);
                    let parts = frames.len();
                    let one_at_a_time = if parts > 1 {
                        let Some(guard) = Sending::start(&sending, addr) else {
                            // Another transfer to this peer is on its way;
                            // the leader sends this snapshot again later.
                            tracing::debug!(peer = %name, "a raft transfer to this peer is under way; this one waits");
                            continue;
                        };
                        Some(guard)
                    } else {
                        None
                    };
                    for frame in frames {
                        // A part may take a while behind other traffic.
                        let sent =
                            tokio::time::timeout(Duration::from_secs(10), mesh.tell(addr, frame))
                                .await;
                        if !matches!(sent, Ok(Ok(()))) {
                            tracing::debug!(peer = %name, "raft batch not delivered");
                            return;
                        }
                    }
                    if let Some(guard) = one_at_a_time {
                        // Queued is not sent: the peer gets no other
                        // transfer for a second per part (8 MiB/s at
                        // least), so resent snapshots never pile up in
                        // the link's queue.
                        tokio::spawn(async move {
                            tokio::time::sleep(PART_PACE * parts as u32).await;
                            drop(guard);
                        });
                    }
                }
            });
        }
    }

    pub(super) fn handle_events(&self, core: &mut Core) -> Vec<PathBuf> {
        let mut removed = Vec::new();
        for event in core.driver.take_events() {
            match event {
                Event::Committed {
                    token,
                    index,
                    applied,
                    ..
                } => {
                    if let Some(w) = core.waiters.remove(&token) {
                        let _ = w.tx.send(Ok((index, applied)));
                    }
                }
                Event::Dropped { group, token } => {
                    if let Some(w) = core.waiters.remove(&token) {
                        let _ = w.tx.send(Err(leader_lost(&group.topic, group.partition)));
                    }
                }
                Event::Leader {
                    group,
                    leader,
                    term,
                } => {
                    // Counted once per group and term that has a leader: a
                    // term without one yet (an election under way), or a
                    // failed pre-vote that forgets the leader for a moment,
                    // is not a change of leader.
                    if let Some(l) = leader {
                        if core.leaders_counted.insert(group.clone(), (l, term)) != Some((l, term))
                        {
                            self.metrics.replica_leader_changes.inc();
                        }
                    }
                    if leader == Some(self.me_id) {
                        tracing::info!(group = %group_label(&group), term, "leading");
                        if !is_meta(&group) {
                            core.window_due.insert(group.clone());
                        }
                    }
                    if is_meta(&group) {
                        core.proposed.clear();
                        core.meta_lead_since = core.ticks;
                        core.founding_wait_since = None;
                    }
                }
                Event::Removed { group } => {
                    tracing::info!(group = %group_label(&group), "replica removed from its group; deleting its files");
                    core.settled.remove(&group);
                    core.leaders_counted.remove(&group);
                    core.driver.remove_group(&group);
                    removed.push(group_dir(&self.root, &group));
                }
                Event::Refused { from, reason } => {
                    self.metrics
                        .mesh_invalid_messages
                        .get_or_create(&crate::metrics::ReasonLabel { reason })
                        .inc();
                    tracing::debug!(from, reason, "refused a raft message");
                }
                Event::BadEntry {
                    group,
                    index,
                    reason,
                } => {
                    tracing::error!(group = %group_label(&group), index, reason = %reason, "skipped an unreadable entry");
                }
                Event::Failed { group, reason } => {
                    tracing::error!(group = %group_label(&group), reason = %reason, "replica stopped on an error; reopening it");
                    core.settled.remove(&group);
                    core.driver.remove_group(&group);
                    let dir = group_dir(&self.root, &group);
                    match DiskStore::open(&dir, self.log.clone()) {
                        Ok(store) => {
                            if let Err(e) =
                                core.driver
                                    .open_group(group.clone(), store, Bootstrap::Restart)
                            {
                                tracing::error!(group = %group_label(&group), error = %e, "cannot reopen the replica");
                            }
                        }
                        Err(e) => {
                            tracing::error!(group = %group_label(&group), error = %e, "cannot reopen the replica's files")
                        }
                    }
                }
                Event::Applied { .. } => {}
            }
        }
        removed
    }
}
