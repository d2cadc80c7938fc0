//! What the driver tests share: drivers in one process, batches handed
//! from one to another, no clock.
#![allow(dead_code)] // Each test file uses a part.

use shoal_replica::store::MemStore;
use shoal_replica::{Driver, Event, NodeId};
use std::collections::BTreeMap;

/// One round of every driver: a tick, a process, and every batch delivered
/// to the drivers in `drivers` (a batch to one that is not there is lost).
/// Returns the tokens committed.
pub fn round(drivers: &mut BTreeMap<NodeId, Driver<MemStore>>) -> Vec<u64> {
    let mut mail = Vec::new();
    let mut committed = Vec::new();
    for (id, d) in drivers.iter_mut() {
        d.tick();
        for (to, batch) in d.process() {
            mail.push((*id, to, batch));
        }
        for e in d.take_events() {
            if let Event::Committed { token, .. } = e {
                committed.push(token);
            }
        }
    }
    for (from, to, batch) in mail {
        if let Some(d) = drivers.get_mut(&to) {
            d.step(from, batch);
        }
    }
    committed
}
