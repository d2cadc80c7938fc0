//! A group's snapshots and compaction: building one (a manifest at the
//! log's start), installing one, retention, and re-sending one that was
//! lost.

use super::*;

impl<S: LogStore> Group<S> {
    pub(super) fn install(&mut self, snap: Snapshot) -> Result<(), Error> {
        let meta_in = snap.get_metadata();
        let (body, entries) = SnapshotData::decode(&snap.data, meta_in.index, meta_in.term)?;
        let mut state = PartitionState::decode_manifest(&body.manifest, self.window_ms)
            .map_err(|e| StoreError::Io(e.to_string()))?;
        state.skip(meta_in.index);
        let mut meta = self.store().meta().clone();
        meta.conf_state = meta_in.get_conf_state().clone();
        meta.conf_index = meta_in.index;
        meta.snapshot_index = body.log_start - 1;
        meta.snapshot_term = body.log_start_term;
        meta.manifest = body.manifest;
        meta.hard_state.commit = meta.hard_state.commit.max(meta_in.index);
        meta.hard_state.term = meta.hard_state.term.max(meta_in.term);
        self.store_mut().set_meta(meta)?;
        self.store_mut()
            .reset(body.log_start - 1, body.log_start_term)?;
        self.store_mut().append(&entries)?;
        self.state = state;
        Ok(())
    }

    /// Builds the snapshot raft-rs asked for: a manifest, never the log.
    ///
    /// It stands at the entry before the log's start (whose term the store
    /// keeps), so the replica it goes to then receives every entry the
    /// leader holds through ordinary appends: read from the segments in
    /// batches of `max_append_bytes`, paced by raft-rs's in-flight window,
    /// whatever the partition's size. Two things in it are newer than its
    /// index, both taken at the applied index:
    /// - the state machine, so the replica skips applying the entries up to
    ///   there (replaying them over newer state would not give the same
    ///   dedupe window);
    /// - the configuration in force, so a replica that joined as a learner
    ///   is in it (raft-rs refuses a snapshot that leaves it out). The
    ///   configuration entries it receives after the snapshot are at or
    ///   below the applied index, so they are skipped with the rest.
    pub(crate) fn build_snapshot(&mut self) -> Result<(), Error> {
        if !self.node.store().snapshot_wanted.replace(false) {
            return Ok(());
        }
        let applied = self.state.applied();
        let store = self.store();
        let log_start = store.first_index();
        if applied + 1 < log_start {
            return Ok(());
        }
        let log_start_term = store.term(log_start - 1)?;
        let body = SnapshotData {
            manifest: self.state.encode_manifest(),
            log_start,
            log_start_term,
            entries: Vec::new(),
        };
        let mut snap = Snapshot::default();
        let m = snap.mut_metadata();
        m.index = log_start - 1;
        m.term = log_start_term;
        m.set_conf_state(store.meta().conf_state.clone());
        snap.data = body.encode().into();
        self.node.mut_store().snapshot = Some(snap);
        Ok(())
    }

    /// Drops a built snapshot once no follower is being caught up by one.
    pub(crate) fn drop_snapshot_if_unneeded(&mut self) {
        if self.node.store().snapshot.is_none() {
            return;
        }
        let raft = &self.node.raft;
        let needed = raft.state == StateRole::Leader
            && raft
                .prs()
                .iter()
                .any(|(_, pr)| pr.state != raft::ProgressState::Replicate);
        if !needed {
            self.node.mut_store().snapshot = None;
        }
    }

    /// Once per awake tick: a follower left waiting for a snapshot that never
    /// arrived (the message was lost) is reported failed after `limit`
    /// ticks, so raft-rs sends another instead of pausing it for good.
    pub(crate) fn check_snapshots(&mut self, limit: usize) {
        if !self.is_leader() {
            self.snapshot_waits.clear();
            return;
        }
        let waiting: Vec<NodeId> = self
            .node
            .raft
            .prs()
            .iter()
            .filter(|(_, pr)| pr.state == raft::ProgressState::Snapshot)
            .map(|(id, _)| *id)
            .collect();
        self.snapshot_waits.retain(|id, _| waiting.contains(id));
        for id in waiting {
            let waited = self.snapshot_waits.entry(id).or_insert(0);
            *waited += 1;
            if *waited > limit {
                self.snapshot_waits.remove(&id);
                self.node.report_snapshot(id, raft::SnapshotStatus::Failure);
            }
        }
    }

    /// Retention: drops entries before `first_index` (at most up to what is
    /// applied). The meta written first says where the log starts and holds
    /// the state machine's manifest, from which a restart rebuilds it.
    pub(crate) fn compact(&mut self, first_index: u64) -> Result<(), Error> {
        // The state machine may be ahead of the log: a corrupt record cut
        // it, or a snapshot's manifest is newer than the entries received
        // so far. raft-rs reads from what it applied on (a restart gives it
        // the stored commit), so nothing past that may go.
        let held = self.state.applied().min(self.node.raft.raft_log.applied());
        let upto = first_index.min(held + 1);
        if upto <= self.store().first_index() {
            return Ok(());
        }
        let at = upto - 1;
        let term = self.store().term(at)?;
        let mut meta = self.store().meta().clone();
        meta.snapshot_index = at;
        meta.snapshot_term = term;
        self.state.forget_before(upto);
        meta.manifest = self.state.encode_manifest();
        meta.hard_state.commit = meta
            .hard_state
            .commit
            .max(self.node.raft.raft_log.committed);
        self.store_mut().set_meta(meta)?;
        self.store_mut().compact(upto)?;
        Ok(())
    }
}
