//! Hibernation keeps idle groups free: once every group sleeps, a round
//! looks at none of them, and a proposal wakes only its own group.
#![allow(clippy::unwrap_used, clippy::expect_used)] // A test panics on what it does not expect.

mod support;

use shoal_replica::command::Command;
use shoal_replica::store::MemStore;
use shoal_replica::{Bootstrap, Driver, DriverConfig, GroupId, NodeId};
use std::collections::BTreeMap;
use support::round;

const GROUPS: u32 = 20;

fn group(partition: u32) -> GroupId {
    GroupId {
        namespace: "ns".into(),
        topic: "t".into(),
        partition,
    }
}

fn checks(drivers: &BTreeMap<NodeId, Driver<MemStore>>) -> Vec<u64> {
    drivers.values().map(|d| d.stats().ready_checks).collect()
}

#[test]
fn sleeping_groups_are_not_looked_at_and_a_proposal_wakes_only_its_own() {
    let ids: Vec<NodeId> = vec![1, 2, 3];
    let mut drivers: BTreeMap<NodeId, Driver<MemStore>> = BTreeMap::new();
    for id in &ids {
        let config = DriverConfig {
            seed: 11,
            ..DriverConfig::default()
        };
        let mut d = Driver::new(*id, config, Box::new(|_| Ok(MemStore::new())));
        for p in 0..GROUPS {
            d.open_group(group(p), MemStore::new(), Bootstrap::Voters(ids.clone()))
                .unwrap();
        }
        drivers.insert(*id, d);
    }
    let all_asleep = |drivers: &BTreeMap<NodeId, Driver<MemStore>>| {
        drivers.values().all(|d| d.hibernating() == GROUPS as usize)
    };
    let mut rounds = 0;
    while !all_asleep(&drivers) {
        round(&mut drivers);
        rounds += 1;
        assert!(rounds < 500, "groups never all hibernated");
    }
    // A few rounds for what going to sleep still sends.
    for _ in 0..3 {
        round(&mut drivers);
    }
    let asleep = checks(&drivers);
    for _ in 0..100 {
        round(&mut drivers);
    }
    assert_eq!(
        checks(&drivers),
        asleep,
        "100 rounds of sleeping groups should look at none of them"
    );
    assert!(all_asleep(&drivers));

    let target = group(7);
    let leader = *drivers
        .iter()
        .find(|(_, d)| d.status(&target).is_some_and(|s| s.serving))
        .map(|(id, _)| id)
        .expect("a sleeping group keeps its leader");
    let data = Command::Message {
        timestamp_ms: 1,
        id: None,
        body: b"wake up",
    }
    .encode()
    .unwrap();
    drivers
        .get_mut(&leader)
        .unwrap()
        .propose(&target, 42, data)
        .unwrap();
    let mut committed = Vec::new();
    let mut woken_rounds = 0u64;
    while !committed.contains(&42) {
        committed.extend(round(&mut drivers).committed.iter().map(|c| c.token));
        woken_rounds += 1;
        assert!(woken_rounds < 50, "the proposal never committed");
    }
    for (i, (id, d)) in drivers.iter().enumerate() {
        assert_eq!(
            d.status(&target).unwrap().commit,
            d.status(&target).unwrap().last_index,
            "agent {id} did not get the entry"
        );
        // Only the woken group is looked at: once per round.
        let looked = d.stats().ready_checks - asleep[i];
        assert!(
            looked <= woken_rounds,
            "agent {id} looked at {looked} groups in {woken_rounds} rounds: more than the woken one"
        );
        assert_eq!(
            d.hibernating(),
            GROUPS as usize - 1,
            "agent {id}: only group 7 woke"
        );
    }
}
