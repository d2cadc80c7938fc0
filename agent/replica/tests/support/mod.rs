//! What the driver tests share: drivers in one process, batches handed
//! from one to another, no clock.
#![allow(dead_code)] // Each test file uses a part.

use shoal_proto::raft::RaftBatch;
use shoal_replica::store::{LogStore, MemStore};
use shoal_replica::{Bootstrap, Driver, DriverConfig, Event, GroupId, NodeId};
use std::collections::BTreeMap;

/// Drivers of agents 1, 2 and 3 in memory, each with a replica of every
/// group in `groups`, the three of them its voters.
pub fn three_agents(groups: &[GroupId], seed: u64) -> BTreeMap<NodeId, Driver<MemStore>> {
    let ids: Vec<NodeId> = vec![1, 2, 3];
    let mut drivers = BTreeMap::new();
    for id in &ids {
        let config = DriverConfig {
            seed,
            ..DriverConfig::default()
        };
        let mut d = Driver::new(*id, config, Box::new(|_| Ok(MemStore::new())));
        for g in groups {
            d.open_group(g.clone(), MemStore::new(), Bootstrap::Voters(ids.clone()))
                .expect("a new group opens in memory");
        }
        drivers.insert(*id, d);
    }
    drivers
}

/// A proposal a round saw committed.
pub struct Committed {
    /// The proposer's token.
    pub token: u64,
    /// Its entry's index.
    pub index: u64,
}

/// What one round saw.
#[derive(Default)]
pub struct Round {
    /// Proposals committed.
    pub committed: Vec<Committed>,
    /// Replicas that stopped on an error: (agent, reason).
    pub failed: Vec<(NodeId, String)>,
    /// Bytes of the largest snapshot sent (its data).
    pub largest_snapshot: usize,
}

/// One round of every driver: a tick, a process, and every batch delivered
/// to the drivers in `drivers` (a batch to one that is not there is lost).
pub fn round<S: LogStore>(drivers: &mut BTreeMap<NodeId, Driver<S>>) -> Round {
    round_editing(drivers, |_, _, _| {})
}

/// [`round`], with `edit(from, to, batch)` applied to every batch before it
/// is delivered (a test's stand-in for what a real network or a lagging
/// leader would send).
pub fn round_editing<S: LogStore>(
    drivers: &mut BTreeMap<NodeId, Driver<S>>,
    mut edit: impl FnMut(NodeId, NodeId, &mut RaftBatch),
) -> Round {
    let mut mail = Vec::new();
    let mut seen = Round::default();
    for (id, d) in drivers.iter_mut() {
        d.tick();
        for (to, batch) in d.process() {
            mail.push((*id, to, batch));
        }
        for e in d.take_events() {
            match e {
                Event::Committed { token, index, .. } => {
                    seen.committed.push(Committed { token, index })
                }
                Event::Failed { reason, .. } => seen.failed.push((*id, reason)),
                _ => {}
            }
        }
    }
    for (_, _, batch) in &mail {
        for m in batch.groups.iter().flat_map(|g| &g.messages) {
            if let Some(snap) = &m.snapshot {
                seen.largest_snapshot = seen.largest_snapshot.max(snap.data.len());
            }
        }
    }
    for (from, to, mut batch) in mail {
        edit(from, to, &mut batch);
        if let Some(d) = drivers.get_mut(&to) {
            d.step(from, batch);
        }
    }
    seen
}
