//! Membership changes while a voter is down: the group keeps every live
//! copy until the down voter returns or is replaced.
#![allow(clippy::unwrap_used, clippy::expect_used)] // A test panics on what it does not expect.

mod support;

use shoal_replica::command::Command;
use shoal_replica::store::MemStore;
use shoal_replica::{Bootstrap, Driver, DriverConfig, GroupId, GroupStatus, NodeId};
use std::collections::{BTreeMap, BTreeSet};
use support::round;

fn group() -> GroupId {
    GroupId {
        namespace: "ns".into(),
        topic: "t".into(),
        partition: 0,
    }
}

fn leader_status(drivers: &BTreeMap<NodeId, Driver<MemStore>>) -> Option<(NodeId, GroupStatus)> {
    drivers.iter().find_map(|(id, d)| {
        let s = d.status(&group())?;
        s.serving.then_some((*id, s))
    })
}

/// Drivers for `ids`, seeded with `seed`: each of `founders` opens the
/// group with them as its first voters; every one sees `down` down.
fn drivers(
    ids: &[NodeId],
    seed: u64,
    founders: &[NodeId],
    down: &[NodeId],
) -> BTreeMap<NodeId, Driver<MemStore>> {
    let mut drivers = BTreeMap::new();
    for &id in ids {
        let config = DriverConfig {
            seed,
            ..DriverConfig::default()
        };
        let mut d = Driver::new(id, config, Box::new(|_| Ok(MemStore::new())));
        if founders.contains(&id) {
            d.open_group(
                group(),
                MemStore::new(),
                Bootstrap::Voters(founders.to_vec()),
            )
            .unwrap();
        }
        for &n in down {
            d.set_down(n, true);
        }
        drivers.insert(id, d);
    }
    drivers
}

fn set(ids: &[NodeId]) -> BTreeSet<NodeId> {
    ids.iter().copied().collect()
}

fn set_replicas(drivers: &mut BTreeMap<NodeId, Driver<MemStore>>, voters: &[NodeId]) {
    for d in drivers.values_mut() {
        d.set_replicas(&group(), voters);
    }
}

#[test]
fn a_down_voter_keeps_the_live_ones_until_it_is_replaced() {
    let mut drivers = drivers(&[1, 2, 3, 4], 5, &[1, 2, 3], &[]);
    let mut rounds = 0;
    let leader = loop {
        round(&mut drivers);
        rounds += 1;
        assert!(rounds < 200, "no leader");
        if let Some((id, _)) = leader_status(&drivers) {
            break id;
        }
    };
    let data = Command::Message {
        timestamp_ms: 1,
        id: None,
        body: b"kept",
    }
    .encode()
    .unwrap();
    drivers
        .get_mut(&leader)
        .unwrap()
        .propose(&group(), 1, data)
        .unwrap();
    let mut committed = Vec::new();
    while !committed.contains(&1) {
        committed.extend(round(&mut drivers).committed.iter().map(|c| c.token));
        rounds += 1;
        assert!(rounds < 400, "the entry never committed");
    }
    // One follower dies; every other agent sees it down.
    let followers: Vec<NodeId> = (1..=3).filter(|id| *id != leader).collect();
    let (down, live) = (followers[0], followers[1]);
    drivers.remove(&down);
    for d in drivers.values_mut() {
        d.set_down(down, true);
    }
    // Within its grace period placement keeps the down voter and, with the
    // new agent 4 ranking above `live`, would drop the live follower.
    set_replicas(&mut drivers, &[leader, down, 4]);
    for _ in 0..100 {
        round(&mut drivers);
        rounds += 1;
    }
    let (now_leader, s) = leader_status(&drivers).expect("the group keeps a leader");
    assert_eq!(now_leader, leader);
    let voters: BTreeSet<NodeId> = s.voters.iter().copied().collect();
    assert_eq!(
        voters,
        BTreeSet::from([1, 2, 3]),
        "a live voter was removed while another was down: {s:?}"
    );
    // Agent 4 waits as a caught-up learner: the swap could have gone ahead.
    assert_eq!(s.learners, vec![4], "{s:?}");
    let fourth = drivers[&4].status(&group()).unwrap();
    assert_eq!(fourth.last_index, s.last_index, "agent 4 caught up");
    // Past the grace period the down voter is replaced; the live ones stay.
    set_replicas(&mut drivers, &[leader, live, 4]);
    let want = BTreeSet::from([leader, live, 4]);
    loop {
        round(&mut drivers);
        rounds += 1;
        let s = leader_status(&drivers).map(|(_, s)| s);
        let done = s.as_ref().is_some_and(|s| {
            s.voters.iter().copied().collect::<BTreeSet<_>>() == want && s.learners.is_empty()
        });
        if done {
            break;
        }
        assert!(rounds < 2_000, "the down voter was never replaced: {s:?}");
    }
    let fourth = drivers[&4].status(&group()).unwrap();
    assert!(fourth.last_index >= 1, "agent 4 holds the log");
}

#[test]
fn a_group_founded_while_an_agent_is_down_takes_the_live_ones_as_voters() {
    // Agent 1 founds the group alone; placement wants 1, 2 and 3, and 2 is
    // down (it died during the mesh's first seconds, within its grace
    // period). Agent 3 becomes a voter at once; 2 waits as a learner.
    let mut drivers = drivers(&[1, 3], 7, &[1], &[2]);
    set_replicas(&mut drivers, &[1, 2, 3]);
    let mut rounds = 0;
    let s = loop {
        round(&mut drivers);
        rounds += 1;
        let s = leader_status(&drivers).map(|(_, s)| s);
        if let Some(s) = s.as_ref().filter(|s| s.voters.len() > 1) {
            break s.clone();
        }
        assert!(rounds < 2_000, "the group stayed one copy: {s:?}");
    };
    assert_eq!(set(&s.voters), set(&[1, 3]), "{s:?}");
    assert_eq!(s.learners, vec![2], "the down agent waits as a learner");
    // More rounds change nothing while 2 is down: it is never promoted.
    for _ in 0..200 {
        round(&mut drivers);
    }
    let (_, s) = leader_status(&drivers).expect("a leader");
    assert_eq!((set(&s.voters), s.learners), (set(&[1, 3]), vec![2]));
}

#[test]
fn a_down_learner_never_costs_a_live_voter() {
    // Voters 1, 2, 3; placement moves 3's seat to 4, which is down: 3 stays
    // a voter until 4 can take over, so the group keeps three live copies.
    let mut drivers = drivers(&[1, 2, 3], 11, &[1, 2, 3], &[4]);
    let mut rounds = 0;
    while leader_status(&drivers).is_none() {
        round(&mut drivers);
        rounds += 1;
        assert!(rounds < 200, "no leader");
    }
    set_replicas(&mut drivers, &[1, 2, 4]);
    for _ in 0..300 {
        round(&mut drivers);
    }
    let (_, s) = leader_status(&drivers).expect("a leader");
    assert_eq!(set(&s.voters), set(&[1, 2, 3]), "{s:?}");
    assert_eq!(s.learners, vec![4], "{s:?}");
}

#[test]
fn a_learner_that_dies_before_it_is_seen_down_holds_the_group_back_only_until_then() {
    // As a mesh whose agent 2 dies in its first second: agent 1 founds the
    // group alone and wants 1, 2 and 3 while 2 is not yet seen down (it
    // gets learners 2 and 3; 2 never answers). Once 2 is seen down,
    // placement wants 1 and 3: agent 3 votes and the group commits.
    let mut drivers = drivers(&[1, 3], 13, &[1], &[]);
    set_replicas(&mut drivers, &[1, 2, 3]);
    let mut rounds = 0;
    loop {
        round(&mut drivers);
        rounds += 1;
        let s = leader_status(&drivers).map(|(_, s)| s);
        let third = drivers[&3].status(&group());
        let waiting = s.as_ref().is_some_and(|s| {
            set(&s.learners) == set(&[2, 3])
                && third.as_ref().is_some_and(|t| t.last_index == s.last_index)
        });
        if waiting {
            break;
        }
        assert!(rounds < 2_000, "learners 2 and 3 never added: {s:?}");
    }
    for _ in 0..50 {
        round(&mut drivers);
    }
    let (_, s) = leader_status(&drivers).expect("a leader");
    assert_eq!(set(&s.voters), set(&[1]), "2 never caught up: {s:?}");
    for d in drivers.values_mut() {
        d.set_down(2, true);
    }
    set_replicas(&mut drivers, &[1, 3]);
    let mut rounds = 0;
    loop {
        round(&mut drivers);
        rounds += 1;
        let s = leader_status(&drivers).map(|(_, s)| s);
        if s.as_ref()
            .is_some_and(|s| set(&s.voters) == set(&[1, 3]) && s.learners.is_empty())
        {
            break;
        }
        assert!(rounds < 200, "agent 3 never became a voter: {s:?}");
    }
    let (leader, _) = leader_status(&drivers).unwrap();
    let data = Command::Message {
        timestamp_ms: 1,
        id: None,
        body: b"stored on two",
    }
    .encode()
    .unwrap();
    drivers
        .get_mut(&leader)
        .unwrap()
        .propose(&group(), 7, data)
        .unwrap();
    let mut committed = false;
    for _ in 0..200 {
        committed |= round(&mut drivers).committed.iter().any(|c| c.token == 7);
        if committed {
            break;
        }
    }
    assert!(committed, "the group of 1 and 3 commits");
}
