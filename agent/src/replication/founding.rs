//! Founding the partitions' groups: the meta group's creation records
//! (who creates each group, alone or with founders), proposed by the meta
//! leader for partitions that have none, and acted on by the agents they
//! name.

use super::{
    group_dir, group_label, is_replicated, lock, meta_group, Core, Replication, CREATED_FILE,
    FOUNDED_PER_ROUND,
};
use crate::topic::TOPIC_NAMESPACE;
use serde::{Deserialize, Serialize};
use shoal_replica::command::Command;
use shoal_replica::disk::DiskStore;
use shoal_replica::store::LogStore;
use shoal_replica::{Bootstrap, GroupId, NodeId};
use std::collections::{BTreeSet, HashMap};

/// How long a new meta leader waits for its group to take in every voter
/// placement wants before it founds partitions' groups anyway: 10 ticks
/// (2 s), well inside the 5 s a publish waits for a leader.
const FOUNDING_WAIT_TICKS: u64 = 10;

/// A decision of the meta group (postcard, in a message entry's body).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) enum MetaRecord {
    /// Creates the partition's group. With a `bootstrapper`, that agent
    /// creates it as its only voter (records of agents before founders).
    /// With an empty `bootstrapper`, the body goes on with [`Founders`]:
    /// an agent that cannot read them (an older one, in a rolling upgrade)
    /// still sees the partition as recorded and founds nothing of its own.
    Create {
        namespace: String,
        topic: String,
        partition: u32,
        bootstrapper: String,
        /// The bootstrapper's run (its start time): a record is acted on
        /// only by the run that proposed it, never by a later run replaying
        /// the meta log (it may have created the group and lost it since).
        incarnation: u64,
    },
}

/// The first voters of a partition's group, after a [`MetaRecord::Create`]
/// without a bootstrapper: meta voters that create the group together,
/// each as one of its first voters, so it does not hang on one agent
/// surviving its first seconds. Each acts only in the run (incarnation)
/// named beside it, never in a later run replaying the meta log; the
/// others elect without it, and it joins back as any replica does.
pub(super) type Founders = Vec<(NodeId, u64)>;

/// Fewest founders worth naming: with fewer, one that does not create its
/// replica would leave the rest without a majority, so the meta leader
/// founds the group alone, as before founders.
const MIN_FOUNDERS: usize = 3;

/// A partition: namespace, topic, number.
pub(super) type PartitionKey3 = (String, String, u32);

/// The body of a creation record for `key`: naming `founders` when there
/// are at least [`MIN_FOUNDERS`], else `me` (run `incarnation`) alone.
pub(super) fn creation_record(
    key: &PartitionKey3,
    founders: &Founders,
    me: &str,
    incarnation: u64,
) -> Result<Vec<u8>, postcard::Error> {
    let record = |bootstrapper: String, incarnation| MetaRecord::Create {
        namespace: key.0.clone(),
        topic: key.1.clone(),
        partition: key.2,
        bootstrapper,
        incarnation,
    };
    if founders.len() >= MIN_FOUNDERS {
        let mut body = postcard::to_allocvec(&record(String::new(), 0))?;
        body.extend(postcard::to_allocvec(founders)?);
        Ok(body)
    } else {
        postcard::to_allocvec(&record(me.to_owned(), incarnation))
    }
}

/// Reads a creation record: its partition, and the first voters of the
/// group if the agent `me` (`me_id`, run `incarnation`) is to create its
/// replica now. `None`: not a creation record.
pub(super) fn read_creation_record(
    body: &[u8],
    me: &str,
    me_id: NodeId,
    incarnation: u64,
) -> Option<(PartitionKey3, Option<Vec<NodeId>>)> {
    let (record, rest) = postcard::take_from_bytes::<MetaRecord>(body).ok()?;
    let MetaRecord::Create {
        namespace,
        topic,
        partition,
        bootstrapper,
        incarnation: run,
    } = record;
    let first_voters = if bootstrapper.is_empty() {
        // Unreadable founders found nothing here (the partition is still
        // recorded, so nobody founds it twice).
        let founders: Founders = postcard::from_bytes(rest).unwrap_or_default();
        founders
            .contains(&(me_id, incarnation))
            .then(|| founders.iter().map(|(id, _)| *id).collect())
    } else {
        (bootstrapper == me && run == incarnation).then(|| vec![me_id])
    };
    Some(((namespace, topic, partition), first_voters))
}

/// Set in this agent's Raft incarnation (its start time otherwise): it
/// reads creation records that name founders, so a meta leader names it as
/// one. An older agent in a rolling upgrade is never named: it would not
/// create its replica, and two such founders of three would leave the
/// group without a majority.
pub const KNOWS_FOUNDERS: u64 = 1 << 62;

impl Replication {
    /// Reads the meta log's newly applied records and acts on the ones that
    /// name this agent.
    /// Creating groups is left to the driver's thread (`found_here`
    /// false): their files take milliseconds each.
    pub(super) fn apply_meta(&self, core: &mut Core, found_here: bool) {
        self.read_meta(core);
        if found_here {
            self.found_some(core);
        } else if !core.to_found.is_empty() {
            self.wake.wake();
        }
    }

    /// Reads the meta log's new records: the groups to create here join
    /// [`Core::to_found`].
    fn read_meta(&self, core: &mut Core) {
        let meta = meta_group();
        // Founders create their replicas when a record commits here: they
        // must hear of it before the first founder asks for their votes.
        core.driver.broadcast_commits(&meta, true);
        let Some(g) = core.driver.group(&meta) else {
            return;
        };
        let applied = g.held_applied();
        if applied <= core.meta_applied {
            return;
        }
        let from = (core.meta_applied + 1).max(g.store().first_index());
        let entries = match g.store().entries(from, applied + 1, u64::MAX) {
            Ok(e) => e,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the meta log");
                return;
            }
        };
        core.meta_applied = applied;
        let mut to_create = Vec::new();
        for e in entries {
            let Ok(Command::Message { body, .. }) = Command::decode(&e.data) else {
                continue;
            };
            let Some((key, first_voters)) =
                read_creation_record(body, &self.me, self.me_id, self.incarnation)
            else {
                tracing::error!(index = e.index, "unreadable meta record; skipped");
                continue;
            };
            core.proposed.remove(&key);
            if core.records.contains(&key) {
                continue;
            }
            *core.recorded.entry(key.1.clone()).or_default() += 1;
            core.records.insert(key.clone());
            if let Some(voters) = first_voters {
                to_create.push((key, voters));
            }
        }
        core.to_found.extend(to_create.into_iter().map(
            |((namespace, topic, partition), voters)| {
                let g = GroupId {
                    namespace,
                    topic,
                    partition,
                };
                (g, voters)
            },
        ));
    }

    /// Creates up to [`FOUNDED_PER_ROUND`] of the groups the meta log named
    /// this agent a first voter of; the driver's thread takes the rest in
    /// the next rounds.
    pub(super) fn found_some(&self, core: &mut Core) {
        if core.to_found.is_empty() {
            return;
        }
        let take = core.to_found.len().min(FOUNDED_PER_ROUND);
        let batch: Vec<(GroupId, String, Vec<NodeId>)> = core
            .to_found
            .drain(..take)
            .map(|(g, voters)| {
                let label = group_label(&g);
                (g, label, voters)
            })
            .filter(|(g, label, _)| !core.created.contains(label) && core.driver.group(g).is_none())
            .collect();
        if !core.to_found.is_empty() {
            self.wake.wake();
        }
        if batch.is_empty() {
            return;
        }
        // Recorded before the groups exist: a crash in between leaves a
        // partition without a group (an operator can see it), never two.
        // One write for the batch, not one fsync per group.
        for (_, label, _) in &batch {
            core.created.insert(label.clone());
        }
        if let Err(e) = shoal_storage::meta::write_atomic(
            &self.root.join(CREATED_FILE),
            &serde_json::to_vec(&core.created).unwrap_or_default(),
        ) {
            tracing::error!(error = %e, groups = batch.len(), "cannot record created groups; not creating them");
            for (_, label, _) in &batch {
                core.created.remove(label);
            }
            return;
        }
        for (g, label, voters) in batch {
            // Placement's first choice leads from the start: no election
            // timeout to wait out, no hand-over afterwards.
            let preferred = voters.first() == Some(&self.me_id) && voters.len() > 1;
            let store = match DiskStore::open(&group_dir(&self.root, &g), self.log.clone()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(group = %label, error = %e, "cannot create a replica's files");
                    continue;
                }
            };
            match core
                .driver
                .open_group(g.clone(), store, Bootstrap::Voters(voters))
            {
                Ok(()) => {
                    tracing::info!(group = %label, "created the partition's group");
                    if preferred {
                        if let Err(e) = core.driver.campaign(&g) {
                            tracing::debug!(group = %label, error = %e, "could not campaign at once; the election timeout will");
                        }
                    }
                    self.place(core, &g);
                }
                Err(e) => tracing::error!(group = %label, error = %e, "cannot create the group"),
            }
        }
    }

    /// As meta leader: proposes a creation record for every replicated
    /// partition of the catalog that has none.
    pub(super) fn propose_missing(&self, core: &mut Core) {
        let meta = meta_group();
        let Some(meta_status) = core
            .driver
            .status(&meta)
            .filter(|s| s.serving && s.leader == Some(self.me_id))
        else {
            return;
        };
        let meta_voters = meta_status.voters;
        // A new mesh's meta group is still taking in its voters: founding
        // waits for them (briefly), so a topic created in the first second
        // of a mesh gets several founders, not just the first agent.
        // Waiting helps only when it can bring enough founders.
        let (whole, could_have_founders) = {
            let peers = lock(&self.peers);
            let mut wanted = self.wanted(&peers, &meta, &meta_voters);
            wanted.sort_unstable();
            wanted.dedup();
            let enough = wanted.len() >= MIN_FOUNDERS;
            (
                meta_status.learners.is_empty() && wanted == meta_voters,
                enough,
            )
        };
        // Replicated topics with partitions that have no creation record.
        let pending: Vec<_> = self
            .broker
            .topics()
            .into_iter()
            .filter(|topic| {
                is_replicated(&topic.config())
                    && core.recorded.get(&*topic.name).copied().unwrap_or(0)
                        < topic.partition_count()
            })
            .collect();
        if pending.is_empty() {
            core.founding_wait_since = None;
            return;
        }
        // The wait is for a meta group still forming (a new mesh, a new
        // meta leader): it counts from when this leader first saw a
        // partition to found, if that was soon after its election, so a
        // topic created a second after a new mesh's election gets the same
        // chance of founders. A meta group short of a voter for longer (one
        // down until `--replace-after`) is not waited for.
        let since = *core.founding_wait_since.get_or_insert(core.ticks);
        let forming = since < core.meta_lead_since + 2 * FOUNDING_WAIT_TICKS;
        if !whole
            && could_have_founders
            && forming
            && core.ticks < core.meta_lead_since.max(since) + FOUNDING_WAIT_TICKS
        {
            return;
        }
        // The first voters come from the meta voters that are up and whose
        // run is known (a record names each voter's run).
        let peers = lock(&self.peers);
        let runs: HashMap<NodeId, u64> = meta_voters
            .iter()
            .filter_map(|v| {
                if *v == self.me_id {
                    return self.broker_eligible().then_some((*v, self.incarnation));
                }
                let (name, _) = peers.by_id.get(v)?;
                if peers.down.contains(name) || !peers.members.iter().any(|m| m.id == *name) {
                    return None;
                }
                let run = core
                    .driver
                    .peer_incarnation(*v)
                    .filter(|run| run & KNOWS_FOUNDERS != 0)?;
                Some((*v, run))
            })
            .collect();
        let mut alone = 0usize;
        let mut missing_runs = BTreeSet::new();
        'topics: for topic in pending {
            for partition in 0..topic.partition_count() {
                let key = (
                    TOPIC_NAMESPACE.to_owned(),
                    topic.name.to_string(),
                    partition,
                );
                if core.records.contains(&key) || core.proposed.contains(&key) {
                    continue;
                }
                // Founders only when the replicas placement wants over every
                // member are all founders at hand (in placement's order):
                // otherwise the group would change its voters (and leader)
                // right after forming, while apps publish; the meta leader
                // then founds it alone, as before, and placement grows it.
                let wanted = self.wanted(&peers, &self.group_id(&key.1, partition), &[]);
                let voters: Founders = wanted
                    .iter()
                    .map(|id| runs.get(id).map(|run| (*id, *run)))
                    .collect::<Option<_>>()
                    .unwrap_or_default();
                let lacking: Vec<NodeId> = wanted
                    .iter()
                    .filter(|id| !runs.contains_key(id))
                    .copied()
                    .collect();
                let body = creation_record(&key, &voters, &self.me, self.incarnation);
                let Ok(body) = body else {
                    continue;
                };
                let data = match (Command::Message {
                    timestamp_ms: crate::time::now_ms(),
                    id: None,
                    body: &body,
                })
                .encode()
                {
                    Ok(d) => d,
                    Err(_) => continue,
                };
                match core.driver.propose(&meta, 0, data) {
                    Ok(_) => {
                        core.proposed.insert(key);
                        // Founded alone though placement wants enough
                        // replicas for founders: say who was lacking.
                        if voters.is_empty() && wanted.len() >= MIN_FOUNDERS {
                            alone += 1;
                            missing_runs.extend(lacking);
                        }
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "meta proposal refused");
                        break 'topics;
                    }
                }
            }
        }
        if alone > 0 {
            let missing: Vec<&str> = missing_runs
                .iter()
                .filter_map(|id| peers.by_id.get(id).map(|(name, _)| name.as_str()))
                .collect();
            tracing::info!(partitions = alone, meta_voters = meta_voters.len(), ?missing, "founding partitions alone: placement wants agents that are not (yet) meta voters that are up and whose run is known; placement adds them after");
        }
    }
}
