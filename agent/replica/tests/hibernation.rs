//! Hibernation keeps idle groups free: once every group sleeps, a round
//! looks at none of them, and a proposal wakes only its own group.
#![allow(clippy::unwrap_used, clippy::expect_used)] // A test panics on what it does not expect.

mod support;

use shoal_replica::command::Command;
use shoal_replica::store::MemStore;
use shoal_replica::{Driver, GroupId, NodeId};
use std::collections::BTreeMap;
use support::{round, round_editing, three_agents};

const GROUPS: u32 = 20;

fn group(partition: u32) -> GroupId {
    GroupId {
        namespace: "ns".into(),
        topic: "t".into(),
        partition,
    }
}

fn all_asleep(drivers: &BTreeMap<NodeId, Driver<MemStore>>) -> bool {
    drivers.values().all(|d| d.hibernating() == GROUPS as usize)
}

fn checks(drivers: &BTreeMap<NodeId, Driver<MemStore>>) -> Vec<u64> {
    drivers.values().map(|d| d.stats().ready_checks).collect()
}

#[test]
fn sleeping_groups_are_not_looked_at_and_a_proposal_wakes_only_its_own() {
    let (mut drivers, _) = asleep(11);
    let checked_asleep = checks(&drivers);
    for _ in 0..100 {
        round(&mut drivers);
    }
    assert_eq!(
        checks(&drivers),
        checked_asleep,
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
        let looked = d.stats().ready_checks - checked_asleep[i];
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

/// Three drivers whose groups all sleep, and the agent leading the most.
fn asleep(seed: u64) -> (BTreeMap<NodeId, Driver<MemStore>>, NodeId) {
    let groups: Vec<GroupId> = (0..GROUPS).map(group).collect();
    let mut drivers = three_agents(&groups, seed);
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
    let leads = |id: NodeId| {
        (0..GROUPS)
            .filter(|p| drivers[&id].status(&group(*p)).is_some_and(|s| s.serving))
            .count()
    };
    let busiest = (1..=3).max_by_key(|id| leads(*id)).unwrap();
    assert!(leads(busiest) > 0);
    (drivers, busiest)
}

/// Every group's (leader, term) as each driver sees it.
fn leaders(
    drivers: &BTreeMap<NodeId, Driver<MemStore>>,
) -> Vec<(NodeId, u32, Option<NodeId>, u64)> {
    drivers
        .iter()
        .flat_map(|(id, d)| {
            (0..GROUPS).map(move |p| {
                let s = d.status(&group(p)).unwrap();
                (*id, p, s.leader, s.term)
            })
        })
        .collect()
}

#[test]
fn a_suspected_leader_that_is_alive_keeps_the_sleeping_groups_its_followers_wake() {
    for seed in 0..20 {
        let (mut drivers, suspected) = asleep(seed);
        let before = leaders(&drivers);
        // Both followers' gossip suspects it, so both wake the groups they
        // follow under it: their election timers run together, and without
        // the leader woken too the first to time out would win the other's
        // vote. Told to wake, the leader heartbeats first.
        for (id, d) in drivers.iter_mut() {
            if *id != suspected {
                let woken = d.wake_groups_led_by(suspected);
                assert!(woken > 0, "seed {seed}: nothing woke");
            }
        }
        for _ in 0..200 {
            round(&mut drivers);
        }
        assert_eq!(
            leaders(&drivers),
            before,
            "seed {seed}: a live leader lost a group its followers woke"
        );
        assert!(
            all_asleep(&drivers),
            "seed {seed}: the woken groups should sleep again"
        );
    }
}

#[test]
fn a_suspected_leader_that_is_dead_is_replaced_in_the_sleeping_groups_one_follower_wakes() {
    for seed in 0..20 {
        let (mut drivers, dead) = asleep(seed);
        let its_groups: Vec<GroupId> = (0..GROUPS)
            .map(group)
            .filter(|g| drivers[&dead].status(g).is_some_and(|s| s.serving))
            .collect();
        // It dies silently: its groups sleep, so nobody notices by itself.
        drivers.remove(&dead);
        for _ in 0..100 {
            round(&mut drivers);
        }
        assert!(
            all_asleep(&drivers),
            "seed {seed}: sleeping followers do not notice a silent leader by themselves"
        );
        // One survivor wakes them; the other is woken by its signal.
        let follower = *drivers.keys().next().unwrap();
        assert_eq!(
            drivers.get_mut(&follower).unwrap().wake_groups_led_by(dead),
            its_groups.len(),
            "seed {seed}"
        );
        let mut rounds = 0;
        while !its_groups.iter().all(|g| {
            drivers
                .values()
                .any(|d| d.status(g).is_some_and(|s| s.serving))
        }) {
            round(&mut drivers);
            rounds += 1;
            assert!(
                rounds < 100,
                "seed {seed}: the woken groups never elected another leader"
            );
        }
    }
}

#[test]
fn a_live_leader_keeps_its_sleeping_groups_when_the_wakes_sent_to_it_are_lost() {
    use shoal_proto::raft::Signal;
    for seed in 0..20 {
        for one_way_cut in [false, true] {
            let (mut drivers, suspected) = asleep(seed);
            let before = leaders(&drivers);
            let followers: Vec<NodeId> = drivers
                .keys()
                .copied()
                .filter(|id| *id != suspected)
                .collect();
            for f in &followers {
                assert!(drivers.get_mut(f).unwrap().wake_groups_led_by(suspected) > 0);
            }
            let mut first = true;
            for _ in 0..200 {
                round_editing(&mut drivers, |from, to, batch| {
                    if one_way_cut && from == followers[0] && to == suspected {
                        // Nothing of the first follower's reaches the leader.
                        batch.groups.clear();
                    } else if first {
                        // Every wake of the first round is lost.
                        for g in &mut batch.groups {
                            if g.signal == Signal::Wake {
                                g.signal = Signal::Nothing;
                            }
                        }
                    }
                });
                first = false;
            }
            assert_eq!(
                leaders(&drivers),
                before,
                "seed {seed}, one-way cut {one_way_cut}: a live leader lost a group"
            );
            // Once heard from, nobody keeps waking the leader: the groups
            // sleep again (with the cut, the leader never hears that one
            // follower has everything, so it stays awake).
            if !one_way_cut {
                assert!(
                    all_asleep(&drivers),
                    "seed {seed}: the woken groups should sleep again"
                );
            }
        }
    }
}
