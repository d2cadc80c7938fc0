//! The store on real files: what survives a reopen, what a flipped byte
//! does, and three drivers replicating over it with one restarted from disk.
#![allow(clippy::unwrap_used, clippy::expect_used)] // A test panics on what it does not expect.

mod support;

use raft::eraftpb::{ConfChangeSingle, ConfChangeType, ConfChangeV2, Entry, EntryType};
use shoal_proto::raft::RaftBatch;
use shoal_replica::command::Command;
use shoal_replica::disk::{DiskStore, SyncPolicy, STATE_FILE};
use shoal_replica::store::{LogStore, RaftMeta};
use shoal_replica::{Bootstrap, Driver, DriverConfig, GroupId, NodeId};
use shoal_storage::LogConfig;
use std::collections::BTreeMap;
use std::path::Path;

fn message(index: u64, term: u64, body: &str) -> Entry {
    let data = Command::Message {
        timestamp_ms: 1_000 + index,
        id: None,
        body: body.as_bytes(),
    }
    .encode()
    .unwrap();
    Entry {
        index,
        term,
        data: data.into(),
        ..Entry::default()
    }
}

fn conf_entry(index: u64, term: u64) -> Entry {
    let mut cc = ConfChangeV2::default();
    let mut single = ConfChangeSingle::default();
    single.set_change_type(ConfChangeType::AddLearnerNode);
    single.node_id = 9;
    cc.mut_changes().push(single);
    let mut e = Entry {
        index,
        term,
        data: shoal_replica::wire::encode_conf_change(&cc).into(),
        ..Entry::default()
    };
    e.set_entry_type(EntryType::EntryConfChangeV2);
    e
}

fn open(dir: &Path) -> DiskStore {
    DiskStore::open(dir, LogConfig::default()).unwrap()
}

#[test]
fn entries_and_state_survive_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path());
    assert_eq!((store.first_index(), store.last_index()), (1, 0));
    let entries = vec![message(1, 2, "a"), conf_entry(2, 2), message(3, 3, "c")];
    store.append(&entries).unwrap();
    let mut meta = RaftMeta::default();
    meta.hard_state.term = 3;
    meta.hard_state.vote = 7;
    meta.hard_state.commit = 2;
    meta.conf_state.voters = vec![1, 2, 3];
    meta.conf_index = 2;
    store.set_meta(meta.clone()).unwrap();
    store.sync().unwrap();
    drop(store);

    let store = open(dir.path());
    assert!(!store.lost_entries());
    assert_eq!(store.meta(), &meta);
    assert_eq!(store.entries(1, 4, u64::MAX).unwrap(), entries);
    assert_eq!(store.term(2).unwrap(), 2);
    assert_eq!(store.term(0).unwrap(), 0);
    // The record carries the leader's clock from the command.
    assert_eq!(
        store.log().read(3, 1, 1 << 20).unwrap()[0].timestamp_ms,
        1_003
    );
}

#[test]
fn unsynced_entries_are_not_there_after_a_reopen_and_a_conflicting_tail_is_cut() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path());
    store
        .append(&[message(1, 1, "a"), message(2, 1, "b"), message(3, 1, "c")])
        .unwrap();
    store.sync().unwrap();
    // A new leader's entry at 2 replaces the old tail.
    store.append(&[message(2, 2, "B")]).unwrap();
    store.sync().unwrap();
    store.append(&[message(3, 2, "never synced")]).unwrap();
    drop(store);
    let store = open(dir.path());
    assert_eq!(store.last_index(), 2);
    assert_eq!(
        store.entries(1, 3, u64::MAX).unwrap(),
        vec![message(1, 1, "a"), message(2, 2, "B")]
    );
}

#[test]
fn an_interval_store_leaves_its_fsync_to_the_flush_and_writes_to_the_os_on_sync() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path());
    assert_eq!(store.sync_policy(), SyncPolicy::Always);
    store.append(&[message(1, 1, "a")]).unwrap();
    store.sync().unwrap();
    assert!(!store.flush().unwrap(), "an Always store synced already");

    store.set_sync_policy(SyncPolicy::Interval).unwrap();
    store.append(&[message(2, 1, "b")]).unwrap();
    store.sync().unwrap();
    store.append(&[message(3, 1, "c")]).unwrap();
    store.sync().unwrap();
    // Both rounds' files wait for one fsync.
    assert!(store.flush().unwrap());
    assert!(!store.flush().unwrap(), "nothing left after a flush");

    // A state write (a new term) fsyncs the entries first, so the state never
    // names more than the log on disk holds.
    store.append(&[message(4, 2, "after a new term")]).unwrap();
    let mut meta = store.meta().clone();
    meta.hard_state.term = 2;
    store.set_meta(meta).unwrap();
    store.sync().unwrap();
    assert!(
        !store.flush().unwrap(),
        "the state write synced the log first"
    );

    store.append(&[message(5, 2, "d")]).unwrap();
    store.sync().unwrap();
    // Turning to Always syncs what was pending.
    store.set_sync_policy(SyncPolicy::Always).unwrap();
    assert!(!store.flush().unwrap());

    store.set_sync_policy(SyncPolicy::Never).unwrap();
    store.append(&[message(6, 2, "e")]).unwrap();
    store.sync().unwrap();
    assert!(
        !store.flush().unwrap(),
        "a Never store leaves its writes to the OS"
    );
    drop(store);

    // What `sync` wrote reached the OS under every policy: a process that
    // dies keeps it.
    let store = open(dir.path());
    assert!(!store.lost_entries());
    assert_eq!(store.last_index(), 6);
    assert_eq!(
        store.entries(6, 7, u64::MAX).unwrap(),
        vec![message(6, 2, "e")]
    );
}

#[test]
fn a_flush_outside_the_lock_keeps_its_files_pending_until_it_ends_and_a_failed_one_fails_the_store()
{
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path());
    store.set_sync_policy(SyncPolicy::Interval).unwrap();
    store.append(&[message(1, 1, "a")]).unwrap();
    store.sync().unwrap();

    let handle = store.begin_flush().expect("a write waits for its fsync");
    assert_eq!(handle.file_count(), 1);
    assert!(
        store.begin_flush().is_none(),
        "one flush at a time hands out the files once"
    );
    // Until the flush ends its files are not durable: a state write (or a
    // flush under the lock) meanwhile syncs them itself.
    assert!(store.flush().unwrap(), "files being flushed still count");
    handle.sync().unwrap();
    store.end_flush(Ok(())).unwrap();
    assert!(
        !store.flush().unwrap(),
        "nothing left after the flush ended"
    );

    // Writes made while a flush runs wait for the next one.
    store.append(&[message(2, 1, "b")]).unwrap();
    store.sync().unwrap();
    let handle = store.begin_flush().expect("pending");
    store.append(&[message(3, 1, "c")]).unwrap();
    store.sync().unwrap();
    handle.sync().unwrap();
    store.end_flush(Ok(())).unwrap();
    assert!(store.begin_flush().is_some(), "the later write still waits");
    store.end_flush(Ok(())).unwrap();

    // A failed fsync is an error and leaves the files pending.
    store.append(&[message(4, 1, "d")]).unwrap();
    store.sync().unwrap();
    let _handle = store.begin_flush().expect("pending");
    let failed = std::io::Error::other("injected fsync failure");
    assert!(store.end_flush(Err(failed)).is_err());
    assert!(store.begin_flush().is_some(), "kept for a later sync");
    store.end_flush(Ok(())).unwrap();

    // Other policies leave nothing to a flush.
    store.set_sync_policy(SyncPolicy::Never).unwrap();
    store.append(&[message(5, 1, "e")]).unwrap();
    store.sync().unwrap();
    assert!(store.begin_flush().is_none());
    drop(store);
    let store = open(dir.path());
    assert_eq!(store.last_index(), 5);
}

#[test]
fn a_flipped_byte_cuts_the_log_and_marks_the_replica_as_having_lost_entries() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path());
    let entries: Vec<Entry> = (1..=20).map(|i| message(i, 1, "payload")).collect();
    store.append(&entries).unwrap();
    store.sync().unwrap();
    drop(store);
    let segment = dir.path().join("00000000000000000001.log");
    let mut bytes = std::fs::read(&segment).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x40;
    std::fs::write(&segment, bytes).unwrap();

    let store = open(dir.path());
    assert!(store.lost_entries(), "a cut log must count as lost entries");
    assert!(store.last_index() < 20);
    let kept = store.entries(1, store.last_index() + 1, u64::MAX).unwrap();
    assert_eq!(kept, entries[..kept.len()].to_vec());
}

#[test]
fn an_unreadable_state_file_is_moved_aside_and_the_replica_starts_over() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path());
    let mut meta = RaftMeta::default();
    meta.hard_state.term = 5;
    store.set_meta(meta).unwrap();
    store.append(&[message(1, 5, "a")]).unwrap();
    store.sync().unwrap();
    drop(store);
    let path = dir.path().join(STATE_FILE);
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&path, bytes).unwrap();

    let store = open(dir.path());
    assert!(store.lost_entries());
    assert_eq!(store.meta(), &RaftMeta::default());
    assert!(dir.path().join(format!("{STATE_FILE}.bad")).exists());
}

#[test]
fn reset_and_compaction_move_the_start_of_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig {
        segment_bytes: 256,
        ..LogConfig::default()
    };
    let mut store = DiskStore::open(dir.path(), config.clone()).unwrap();
    let entries: Vec<Entry> = (1..=40)
        .map(|i| message(i, 1, "0123456789abcdef"))
        .collect();
    store.append(&entries).unwrap();
    store.sync().unwrap();
    let mut meta = store.meta().clone();
    meta.snapshot_index = 19;
    meta.snapshot_term = 1;
    store.set_meta(meta).unwrap();
    store.compact(20).unwrap();
    let first = store.first_index();
    assert!(first > 1 && first <= 20, "first index {first}");
    assert_eq!(store.term(19).unwrap(), 1);
    assert!(store.entries(1, 2, u64::MAX).is_err());

    let mut meta = store.meta().clone();
    meta.snapshot_index = 100;
    meta.snapshot_term = 4;
    store.set_meta(meta).unwrap();
    store.reset(100, 4).unwrap();
    store.append(&[message(101, 4, "after")]).unwrap();
    store.sync().unwrap();
    drop(store);
    let store = DiskStore::open(dir.path(), config).unwrap();
    assert_eq!((store.first_index(), store.last_index()), (101, 101));
    assert_eq!(store.term(100).unwrap(), 4);
}

/// Three drivers on real files, messages passed by hand; one is dropped and
/// reopened from its directory and catches up.
#[test]
fn three_replicas_on_disk_agree_and_one_restarts_from_its_files() {
    let root = tempfile::tempdir().unwrap();
    let group = GroupId {
        namespace: "ns".into(),
        topic: "orders".into(),
        partition: 0,
    };
    let ids: Vec<NodeId> = vec![1, 2, 3];
    let dir_of = |id: NodeId| root.path().join(format!("agent-{id}"));
    let open_driver = |id: NodeId, bootstrap: Bootstrap| {
        let config = DriverConfig {
            seed: 7,
            ..DriverConfig::default()
        };
        let mut d: Driver<DiskStore> = Driver::new(id, config, Box::new(|_| unreachable_store()));
        d.open_group(group.clone(), open(&dir_of(id)), bootstrap)
            .unwrap();
        d
    };
    let mut drivers: BTreeMap<NodeId, Driver<DiskStore>> = ids
        .iter()
        .map(|id| (*id, open_driver(*id, Bootstrap::Voters(ids.clone()))))
        .collect();
    let mut acked = Vec::new();
    let mut token = 0;
    for round in 0..400 {
        if round == 150 {
            drivers.remove(&3);
        }
        if round == 200 {
            drivers.insert(3, open_driver(3, Bootstrap::Restart));
        }
        acked.extend(
            support::round(&mut drivers)
                .committed
                .iter()
                .map(|c| c.index),
        );
        if round % 5 == 0 {
            if let Some(d) = drivers
                .values_mut()
                .find(|d| d.status(&group).is_some_and(|s| s.serving))
            {
                token += 1;
                let data = Command::Message {
                    timestamp_ms: round,
                    id: None,
                    body: format!("m{token}").as_bytes(),
                }
                .encode()
                .unwrap();
                d.propose(&group, token, data).unwrap();
            }
        }
    }
    assert!(acked.len() > 40, "only {} acknowledged", acked.len());
    let last = *acked.iter().max().unwrap();
    for (id, d) in &drivers {
        let s = d.status(&group).unwrap();
        assert!(
            s.commit >= last,
            "agent {id} committed {} < {last}",
            s.commit
        );
    }
    let logs: Vec<Vec<Entry>> = drivers
        .values()
        .map(|d| {
            let store = d.group(&group).unwrap().store();
            store
                .entries(store.first_index(), last + 1, u64::MAX)
                .unwrap()
        })
        .collect();
    assert_eq!(logs[0], logs[1]);
    assert_eq!(logs[0], logs[2]);
}

/// Agents 1 to 4 with drivers on disk under `root` (512-byte segments, so
/// retention has whole segments to drop); agents 1, 2 and 3 are the
/// voters of one group, agent 4 holds nothing until it is asked to join.
fn three_voters_and_a_fourth_on_disk(
    root: &Path,
    seed: u64,
) -> (GroupId, BTreeMap<NodeId, Driver<DiskStore>>) {
    let group = GroupId {
        namespace: "ns".into(),
        topic: "orders".into(),
        partition: 0,
    };
    let small = LogConfig {
        segment_bytes: 512,
        ..LogConfig::default()
    };
    let mut drivers: BTreeMap<NodeId, Driver<DiskStore>> = BTreeMap::new();
    for id in 1..=4u64 {
        let dir = root.join(format!("agent-{id}"));
        let log_config = small.clone();
        let join_dir = dir.clone();
        let config = DriverConfig {
            seed,
            ..DriverConfig::default()
        };
        let mut d: Driver<DiskStore> = Driver::new(
            id,
            config,
            Box::new(move |_| DiskStore::open(&join_dir, log_config.clone())),
        );
        if id <= 3 {
            d.open_group(
                group.clone(),
                DiskStore::open(&dir, small.clone()).unwrap(),
                Bootstrap::Voters(vec![1, 2, 3]),
            )
            .unwrap();
        }
        drivers.insert(id, d);
    }
    (group, drivers)
}

/// Retention cuts the leader's log (whole segments), then a fourth agent
/// joins: it catches up from a snapshot that carries a manifest and no
/// entry, then every message the leader still holds arrives there through
/// appends read from the files.
#[test]
fn a_replica_joins_from_a_snapshot_after_retention_on_disk() {
    let root = tempfile::tempdir().unwrap();
    let (group, mut drivers) = three_voters_and_a_fourth_on_disk(root.path(), 11);
    let mut token = 0;
    let mut largest_snapshot = 0;
    let mut run =
        |drivers: &mut BTreeMap<NodeId, Driver<DiskStore>>, rounds: usize, propose: bool| {
            for _ in 0..rounds {
                let round = support::round(drivers);
                if let Some((id, reason)) = round.failed.first() {
                    panic!("agent {id}: {reason}");
                }
                largest_snapshot = largest_snapshot.max(round.largest_snapshot);
                if propose {
                    if let Some(d) = drivers
                        .values_mut()
                        .find(|d| d.status(&group).is_some_and(|s| s.serving))
                    {
                        token += 1;
                        let body = format!("message {token} with some bytes to fill segments");
                        let data = Command::Message {
                            timestamp_ms: token,
                            id: None,
                            body: body.as_bytes(),
                        }
                        .encode()
                        .unwrap();
                        d.propose(&group, token, data).unwrap();
                    }
                }
            }
        };
    run(&mut drivers, 150, true);
    let leader = *drivers
        .iter()
        .find(|(_, d)| d.status(&group).is_some_and(|s| s.serving))
        .unwrap()
        .0;
    let applied = drivers[&leader].status(&group).unwrap().applied;
    for d in drivers.values_mut() {
        if d.status(&group).is_some() {
            d.compact(&group, applied - 20).unwrap();
        }
    }
    let first = drivers[&leader].status(&group).unwrap().first_index;
    assert!(first > 6, "retention moved the log start ({first})");
    for d in drivers.values_mut() {
        d.set_replicas(&group, &[1, 2, 3, 4]);
    }
    run(&mut drivers, 200, false);
    let s = drivers[&4].status(&group).expect("agent 4 joined");
    let l = drivers[&leader].status(&group).unwrap();
    assert!(s.voters.contains(&4), "{s:?}\nleader {l:?}");
    assert_eq!(s.commit, l.commit, "{s:?} vs {l:?}");
    let held = |d: &Driver<DiskStore>| {
        let store = d.group(&group).unwrap().store();
        store.entries(first, l.commit + 1, u64::MAX).unwrap()
    };
    let copied = held(&drivers[&4]);
    assert_eq!(copied, held(&drivers[&leader]));
    let copied_bytes: usize = copied.iter().map(|e| e.data.len()).sum();
    assert!(
        largest_snapshot > 0 && largest_snapshot * 10 < copied_bytes,
        "the snapshot ({largest_snapshot} bytes) carries the log ({copied_bytes} bytes)"
    );
}

/// A replica that installed a manifest-only snapshot holds a state machine
/// ahead of its log, and may hold entries its leader has not yet told it
/// are committed (a new leader's commit index lags until it commits an
/// entry of its own term). Retention there keeps what raft-rs has yet to
/// apply: raft-rs aborts the process when committed entries it must still
/// hand out are gone.
#[test]
fn retention_on_a_replica_catching_up_keeps_what_raft_has_not_applied() {
    let root = tempfile::tempdir().unwrap();
    let (group, mut drivers) = three_voters_and_a_fourth_on_disk(root.path(), 13);
    for token in 0..150u64 {
        if let Some((id, reason)) = support::round(&mut drivers).failed.first() {
            panic!("agent {id}: {reason}");
        }
        if let Some(d) = drivers
            .values_mut()
            .find(|d| d.status(&group).is_some_and(|s| s.serving))
        {
            let body = format!("message {token} with some bytes to fill segments");
            let data = Command::Message {
                timestamp_ms: token,
                id: None,
                body: body.as_bytes(),
            }
            .encode()
            .unwrap();
            d.propose(&group, token, data).unwrap();
        }
    }
    let leader = *drivers
        .iter()
        .find(|(_, d)| d.status(&group).is_some_and(|s| s.serving))
        .unwrap()
        .0;
    let applied = drivers[&leader].status(&group).unwrap().applied;
    for d in drivers.values_mut() {
        if d.status(&group).is_some() {
            d.compact(&group, applied - 20).unwrap();
        }
    }
    let snapshot_index = drivers[&leader].status(&group).unwrap().first_index - 1;
    for d in drivers.values_mut() {
        d.set_replicas(&group, &[1, 2, 3, 4]);
    }
    // Agent 4 joins, but every commit index it hears stops at the
    // snapshot's: it holds the entries after it, not yet committed.
    let cap_commit = |_: NodeId, to: NodeId, batch: &mut RaftBatch| {
        if to == 4 {
            for m in batch.groups.iter_mut().flat_map(|g| &mut g.messages) {
                m.commit = m.commit.min(snapshot_index);
            }
        }
    };
    for _ in 0..100 {
        if let Some((id, reason)) = support::round_editing(&mut drivers, cap_commit)
            .failed
            .first()
        {
            panic!("agent {id}: {reason}");
        }
    }
    let held = drivers[&4].status(&group).expect("agent 4 joined");
    assert!(
        held.last_index > snapshot_index && held.commit == snapshot_index,
        "agent 4 holds entries past the snapshot, uncommitted: {held:?}"
    );
    drivers
        .get_mut(&4)
        .unwrap()
        .compact(&group, u64::MAX)
        .unwrap();
    let cut = drivers[&4].status(&group).unwrap();
    assert!(
        cut.first_index <= snapshot_index + 1,
        "retention cut entries raft-rs has not applied: {held:?} -> {cut:?}"
    );
    // The commit index reaches agent 4 with the next publish: raft-rs
    // hands out every entry.
    let data = Command::Message {
        timestamp_ms: 1_000,
        id: None,
        body: b"one more",
    }
    .encode()
    .unwrap();
    drivers
        .get_mut(&leader)
        .unwrap()
        .propose(&group, 1_000, data)
        .unwrap();
    for _ in 0..50 {
        if let Some((id, reason)) = support::round(&mut drivers).failed.first() {
            panic!("agent {id}: {reason}");
        }
    }
    let l = drivers[&leader].status(&group).unwrap();
    let s = drivers[&4].status(&group).unwrap();
    assert_eq!(
        (s.commit, s.applied),
        (l.commit, l.applied),
        "{s:?} vs {l:?}"
    );
}

fn unreachable_store() -> Result<DiskStore, shoal_replica::store::StoreError> {
    Err(shoal_replica::store::StoreError::Io(
        "this test creates no replica on a message".into(),
    ))
}
