//! A peer that lies: real Raft messages of a running group, mutated field by
//! field (indexes, terms, commits, entries, snapshots, configurations,
//! senders), stepped into live drivers. raft-rs stops the process on what it
//! considers impossible (`fatal!`, and release builds abort on a panic), so
//! every such input must be refused before raft-rs sees it: nothing here may
//! panic, and the group must keep working for the honest agents.
#![allow(clippy::unwrap_used, clippy::expect_used)] // A test panics on what it does not expect.

mod support;

use shoal_proto::raft::{
    ConfState, EntryPayload, GroupMessages, Hibernate, RaftBatch, RaftEntry, RaftMessage,
    RaftMessageKind, RaftSnapshot, Signal,
};
use shoal_replica::command::Command;
use shoal_replica::store::MemStore;
use shoal_replica::{Driver, Event, GroupId, NodeId};
use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};

const ROUNDS: usize = 5_000;

fn group() -> GroupId {
    GroupId {
        namespace: "ns".into(),
        topic: "t".into(),
        partition: 0,
    }
}

struct Cluster {
    drivers: BTreeMap<NodeId, Driver<MemStore>>,
    /// Real messages seen, to mutate.
    seen: Vec<(NodeId, RaftMessage)>,
    acked: u64,
}

impl Cluster {
    fn new(seed: u64) -> Self {
        Cluster {
            drivers: support::three_agents(&[group()], seed),
            seen: Vec::new(),
            acked: 0,
        }
    }

    fn round(&mut self, token: &mut u64) {
        let mut mail = Vec::new();
        for (id, d) in self.drivers.iter_mut() {
            d.tick();
            for (to, batch) in d.process() {
                mail.push((*id, to, batch));
            }
            for e in d.take_events() {
                match e {
                    Event::Committed { .. } => self.acked += 1,
                    Event::Failed { group, reason } => {
                        panic!("group {group:?} failed on {id}: {reason}")
                    }
                    _ => {}
                }
            }
        }
        for (from, to, batch) in mail {
            for gm in &batch.groups {
                for m in &gm.messages {
                    if self.seen.len() < 500 {
                        self.seen.push((from, m.clone()));
                    }
                }
            }
            if let Some(d) = self.drivers.get_mut(&to) {
                d.step(from, batch);
            }
        }
        for d in self.drivers.values_mut() {
            if d.status(&group()).is_some_and(|s| s.serving) {
                *token += 1;
                let data = Command::Message {
                    timestamp_ms: *token,
                    id: None,
                    body: b"x",
                }
                .encode()
                .unwrap();
                let _ = d.propose(&group(), *token, data);
            }
        }
    }
}

fn pick(rng: &mut fastrand::Rng, around: u64) -> u64 {
    match rng.u8(0..8) {
        0 => 0,
        1 => 1,
        2 => u64::MAX,
        3 => u64::MAX / 2,
        4 => around.saturating_add(rng.u64(0..5)),
        5 => around.saturating_sub(rng.u64(0..5)),
        _ => rng.u64(0..around.saturating_add(20)),
    }
}

fn random_conf(rng: &mut fastrand::Rng) -> ConfState {
    let ids = |rng: &mut fastrand::Rng| -> Vec<u64> {
        (0..rng.usize(0..4)).map(|_| rng.u64(0..5)).collect()
    };
    ConfState {
        voters: ids(rng),
        learners: ids(rng),
        voters_outgoing: ids(rng),
        learners_next: ids(rng),
        auto_leave: rng.bool(),
    }
}

fn mutate(rng: &mut fastrand::Rng, mut m: RaftMessage, last: u64) -> RaftMessage {
    for _ in 0..rng.usize(1..4) {
        match rng.u8(0..14) {
            0 => m.index = pick(rng, last),
            1 => m.log_term = pick(rng, m.log_term),
            2 => m.commit = pick(rng, last),
            3 => m.term = pick(rng, m.term),
            4 => m.reject = !m.reject,
            5 => m.reject_hint = pick(rng, last),
            6 => m.request_snapshot = pick(rng, last),
            7 => {
                m.kind = match rng.u8(0..13) {
                    0 => RaftMessageKind::Append,
                    1 => RaftMessageKind::AppendResponse,
                    2 => RaftMessageKind::RequestVote,
                    3 => RaftMessageKind::RequestVoteResponse,
                    4 => RaftMessageKind::Snapshot,
                    5 => RaftMessageKind::Heartbeat,
                    6 => RaftMessageKind::HeartbeatResponse,
                    7 => RaftMessageKind::TransferLeader,
                    8 => RaftMessageKind::TimeoutNow,
                    9 => RaftMessageKind::ReadIndex,
                    10 => RaftMessageKind::ReadIndexResponse,
                    11 => RaftMessageKind::RequestPreVote,
                    _ => RaftMessageKind::RequestPreVoteResponse,
                }
            }
            8 => {
                let start = pick(rng, last);
                m.entries = (0..rng.usize(0..4))
                    .map(|i| RaftEntry {
                        term: pick(rng, m.term),
                        index: if rng.u8(0..4) == 0 {
                            pick(rng, last)
                        } else {
                            start.saturating_add(i as u64)
                        },
                        payload: if rng.u8(0..5) == 0 {
                            EntryPayload::ConfChange(shoal_proto::raft::ConfChange {
                                transition: rng.u8(0..4),
                                changes: Vec::new(),
                            })
                        } else {
                            EntryPayload::Normal(vec![rng.u8(..); rng.usize(0..12)])
                        },
                    })
                    .collect();
            }
            9 => {
                m.snapshot = Some(RaftSnapshot {
                    index: pick(rng, last),
                    term: pick(rng, m.term),
                    conf_state: random_conf(rng),
                    data: vec![rng.u8(..); rng.usize(0..16)],
                })
            }
            10 => m.entries.reverse(),
            11 => m.priority = rng.i64(..),
            12 => m.context = vec![rng.u8(..); rng.usize(0..8)],
            _ => m.commit_term = pick(rng, m.term),
        }
    }
    m
}

#[test]
fn mutated_peer_messages_never_stop_the_agent() {
    let (mut sent, mut refused) = (0u64, 0u64);
    for seed in 1..=8u64 {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut c = Cluster::new(seed);
        let mut token = 0;
        for _ in 0..30 {
            c.round(&mut token);
        }
        for i in 0..ROUNDS {
            if i % 10 == 0 {
                c.round(&mut token);
            }
            if c.seen.is_empty() {
                continue;
            }
            let (_, base) = c.seen[rng.usize(0..c.seen.len())].clone();
            let to = 1 + rng.u64(0..3);
            let Some(d) = c.drivers.get_mut(&to) else {
                continue;
            };
            let last = d.status(&group()).map_or(0, |s| s.last_index);
            let mut m = mutate(&mut rng, base, last);
            m.to = to;
            // Mostly a sender that matches its certificate, sometimes not.
            let sender = if rng.u8(0..8) == 0 {
                1 + rng.u64(0..3)
            } else {
                m.from
            };
            let batch = RaftBatch {
                incarnation: 0,
                groups: vec![GroupMessages {
                    group: group(),
                    messages: vec![m.clone()],
                    signal: match rng.u8(0..20) {
                        0 => Signal::Wake,
                        1 => Signal::Hibernate(Hibernate {
                            term: rng.u64(0..8),
                            commit: rng.u64(0..64),
                        }),
                        _ => Signal::Nothing,
                    },
                    recovering: rng.u8(0..20) == 0,
                    progress_reset: rng.u8(0..20) == 0,
                }],
            };
            let stepped = catch_unwind(AssertUnwindSafe(|| {
                d.step(sender, batch);
                d.process()
            }));
            assert!(
                stepped.is_ok(),
                "seed {seed}, round {i}: stepping {m:?} from {sender} into agent {to} panicked"
            );
            sent += 1;
            for e in d.take_events() {
                match e {
                    Event::Failed { reason, .. } => {
                        panic!("seed {seed}, round {i}: {m:?} made the group fail: {reason}")
                    }
                    Event::Refused { .. } => refused += 1,
                    _ => {}
                }
            }
        }
        let before = c.acked;
        for _ in 0..60 {
            c.round(&mut token);
        }
        assert!(
            c.acked > before,
            "seed {seed}: the group stopped committing after the hostile messages"
        );
    }
    // Most mutations are refused at the door, but raft-rs must see plenty.
    assert!(
        refused > sent / 10 && refused < sent * 9 / 10,
        "{refused} of {sent} refused"
    );
    println!("{sent} mutated messages, {refused} refused before raft-rs");
}
