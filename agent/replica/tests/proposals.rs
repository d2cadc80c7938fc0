//! Proposals of many commands: consecutive entries, an append per
//! `max_append_bytes` of them to each follower (not one per command), and
//! every token committed at its own index.
#![allow(clippy::unwrap_used, clippy::expect_used)] // A test panics on what it does not expect.

mod support;

use shoal_proto::raft::RaftMessageKind;
use shoal_replica::command::Command;
use shoal_replica::driver::DEFAULT_MAX_APPEND_BYTES;
use shoal_replica::store::MemStore;
use shoal_replica::{Bootstrap, Driver, DriverConfig, GroupId, NodeId};
use std::collections::BTreeMap;

#[test]
fn a_many_message_proposal_goes_in_a_few_appends_and_every_token_commits_in_order() {
    let group = GroupId {
        namespace: "ns".into(),
        topic: "t".into(),
        partition: 0,
    };
    let ids: Vec<NodeId> = vec![1, 2, 3];
    let mut drivers: BTreeMap<NodeId, Driver<MemStore>> = BTreeMap::new();
    for id in &ids {
        let config = DriverConfig {
            seed: 5,
            ..DriverConfig::default()
        };
        let mut d = Driver::new(*id, config, Box::new(|_| Ok(MemStore::new())));
        d.open_group(
            group.clone(),
            MemStore::new(),
            Bootstrap::Voters(ids.clone()),
        )
        .unwrap();
        drivers.insert(*id, d);
    }
    let mut rounds = 0;
    let leader = loop {
        support::round(&mut drivers);
        if let Some((id, _)) = drivers
            .iter()
            .find(|(_, d)| d.status(&group).is_some_and(|s| s.serving))
        {
            break *id;
        }
        rounds += 1;
        assert!(rounds < 500, "no leader");
    };
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
    // raft-rs cuts appends by encoded size: the data and some 20 bytes.
    let bytes: usize = commands.iter().map(|(_, d)| d.len() + 24).sum();
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
