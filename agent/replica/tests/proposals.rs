//! Proposals of many commands: consecutive entries, an append per
//! `max_append_bytes` of them to each follower (not one per command), and
//! every token committed at its own index; and a new commit index sent
//! with the next append or heartbeat unless the group asks for it at once.
#![allow(clippy::unwrap_used, clippy::expect_used)] // A test panics on what it does not expect.

mod support;

use shoal_proto::raft::RaftMessageKind;
use shoal_replica::command::Command;
use shoal_replica::driver::{DEFAULT_MAX_APPEND_BYTES, ENTRY_OVERHEAD_BYTES};
use shoal_replica::store::MemStore;
use shoal_replica::{Driver, GroupId, NodeId};
use std::collections::BTreeMap;

fn group() -> GroupId {
    GroupId {
        namespace: "ns".into(),
        topic: "t".into(),
        partition: 0,
    }
}

#[test]
fn a_many_message_proposal_goes_in_a_few_appends_and_every_token_commits_in_order() {
    let group = group();
    let (mut drivers, leader) = three_voters(&group, 5);
    let ids: Vec<NodeId> = drivers.keys().copied().collect();
    // 100 commands of 10 KiB: about four appends' worth.
    let body = vec![b'x'; 10 * 1024];
    let commands: Vec<(u64, Vec<u8>)> = (0..100u64)
        .map(|token| {
            let data = Command::Message {
                timestamp_ms: token,
                id: None,
                body: &body,
            }
            .encode()
            .unwrap();
            (token, data)
        })
        .collect();
    // raft-rs cuts appends by encoded size: the data and a few bytes more.
    let bytes: usize = commands
        .iter()
        .map(|(_, d)| d.len() + ENTRY_OVERHEAD_BYTES as usize)
        .sum();
    let most_appends = bytes.div_ceil(DEFAULT_MAX_APPEND_BYTES as usize);
    let first = drivers
        .get_mut(&leader)
        .unwrap()
        .propose_many(&group, commands)
        .unwrap();
    let mut appends: BTreeMap<NodeId, usize> = BTreeMap::new();
    let mut committed = BTreeMap::new();
    for _ in 0..20 {
        let round = support::round_editing(&mut drivers, |from, to, batch| {
            if from == leader {
                let carrying = batch
                    .groups
                    .iter()
                    .flat_map(|g| &g.messages)
                    .filter(|m| m.kind == RaftMessageKind::Append && !m.entries.is_empty())
                    .count();
                *appends.entry(to).or_default() += carrying;
            }
        });
        for c in round.committed {
            committed.insert(c.token, c.index);
        }
    }
    assert_eq!(committed.len(), 100, "every token committed");
    for (token, index) in &committed {
        assert_eq!(*index, first + token, "token {token} at its own index");
    }
    for follower in ids.iter().filter(|id| **id != leader) {
        let n = appends.get(follower).copied().unwrap_or(0);
        assert!(
            (1..=most_appends).contains(&n),
            "{n} appends carried the 100 commands to {follower} (at most {most_appends})"
        );
    }
}

/// Processes every driver and delivers what it sends, without a tick (so
/// without heartbeats): what a proposal alone puts on the wire.
fn exchange(drivers: &mut BTreeMap<NodeId, Driver<MemStore>>) {
    let mut mail = Vec::new();
    for (id, d) in drivers.iter_mut() {
        for (to, batch) in d.process() {
            mail.push((*id, to, batch));
        }
        d.take_events();
    }
    for (from, to, batch) in mail {
        if let Some(d) = drivers.get_mut(&to) {
            d.step(from, batch);
        }
    }
}

/// Three voters of `group` with an elected, serving leader; returns it.
fn three_voters(group: &GroupId, seed: u64) -> (BTreeMap<NodeId, Driver<MemStore>>, NodeId) {
    let mut drivers = support::three_agents(std::slice::from_ref(group), seed);
    for _ in 0..500 {
        support::round(&mut drivers);
        let serving = drivers
            .iter()
            .find(|(_, d)| d.status(group).is_some_and(|s| s.serving))
            .map(|(id, _)| *id);
        if let Some(leader) = serving {
            // Every follower holds the leader's whole log and commit index.
            for _ in 0..5 {
                support::round(&mut drivers);
            }
            return (drivers, leader);
        }
    }
    panic!("no leader");
}

/// Proposes one command on the leader and exchanges messages, without
/// ticks, until nothing more is sent; returns the leader's commit index and
/// the followers'.
fn commit_without_heartbeats(
    drivers: &mut BTreeMap<NodeId, Driver<MemStore>>,
    leader: NodeId,
    group: &GroupId,
) -> (u64, Vec<u64>) {
    let data = Command::Message {
        timestamp_ms: 1,
        id: None,
        body: b"one",
    }
    .encode()
    .unwrap();
    drivers
        .get_mut(&leader)
        .unwrap()
        .propose(group, 1, data)
        .unwrap();
    for _ in 0..10 {
        exchange(drivers);
    }
    let commit = |id: &NodeId| drivers[id].status(group).unwrap().commit;
    let followers = drivers
        .keys()
        .filter(|id| **id != leader)
        .map(commit)
        .collect();
    (commit(&leader), followers)
}

#[test]
fn a_new_commit_index_rides_the_next_append_unless_the_group_asks_for_it_at_once() {
    let group = group();
    // By default the followers learn the commit with the next append or
    // heartbeat: after the proposal alone they are one entry behind.
    let (mut drivers, leader) = three_voters(&group, 9);
    let (leader_commit, followers) = commit_without_heartbeats(&mut drivers, leader, &group);
    for f in &followers {
        assert_eq!(
            *f + 1,
            leader_commit,
            "a follower heard the commit in an append of its own"
        );
    }
    // A tick's heartbeat carries it.
    support::round(&mut drivers);
    support::round(&mut drivers);
    for (id, d) in &drivers {
        assert_eq!(
            d.status(&group).unwrap().commit,
            leader_commit,
            "{id} after a heartbeat"
        );
    }

    // A group that asks for every commit at once (the meta group) gets it
    // without waiting for a heartbeat.
    let (mut drivers, leader) = three_voters(&group, 9);
    drivers
        .get_mut(&leader)
        .unwrap()
        .broadcast_commits(&group, true);
    let (leader_commit, followers) = commit_without_heartbeats(&mut drivers, leader, &group);
    for f in &followers {
        assert_eq!(
            *f, leader_commit,
            "a follower has the commit without a heartbeat"
        );
    }
}
