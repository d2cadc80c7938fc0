use super::*;
use crate::command::Command;
use crate::state::{Applied, PartitionState};

#[test]
fn node_ids_are_stable_and_never_zero() {
    assert_eq!(node_id("agent-1"), node_id("agent-1"));
    assert_ne!(node_id("agent-1"), node_id("agent-2"));
    assert_ne!(node_id(""), 0);
    // FNV-1a of "a", pinned: the id is part of every replica's stored state.
    assert_eq!(node_id("a"), 0xaf63_dc4c_8601_ec8c);
}

#[test]
fn commands_round_trip() {
    let cases = [
        Command::Noop,
        Command::Message {
            timestamp_ms: 7,
            id: Some("order-1"),
            body: b"hello",
        },
        Command::Message {
            timestamp_ms: u64::MAX,
            id: None,
            body: b"",
        },
        Command::Commit {
            timestamp_ms: 9,
            group: "billing",
            next: 42,
        },
    ];
    for c in cases {
        let data = c.encode().unwrap();
        assert_eq!(Command::decode(&data).unwrap(), c);
    }
}

#[test]
fn bad_commands_are_errors_not_panics() {
    assert!(Command::decode(&[9, 0, 0, 0, 0, 0, 0, 0, 0]).is_err());
    assert!(Command::decode(&[1, 0]).is_err());
    // id length past the end
    let mut data = vec![1];
    data.extend_from_slice(&0u64.to_le_bytes());
    data.extend_from_slice(&500u16.to_le_bytes());
    assert_eq!(
        Command::decode(&data),
        Err(command::CommandError::Truncated)
    );
    let mut data = vec![2];
    data.extend_from_slice(&0u64.to_le_bytes());
    data.extend_from_slice(&1u64.to_le_bytes());
    data.extend_from_slice(&[0xff, 0xfe]);
    assert_eq!(Command::decode(&data), Err(command::CommandError::NotUtf8));
    for len in 0..64 {
        let data: Vec<u8> = (0..len).map(|_| fastrand::u8(..)).collect();
        let _ = Command::decode(&data);
    }
    let long = "x".repeat(command::MAX_ID_BYTES + 1);
    assert!(Command::Message {
        timestamp_ms: 0,
        id: Some(&long),
        body: b""
    }
    .encode()
    .is_err());
}

#[test]
fn state_dedupes_by_leader_time_and_offsets_only_grow() {
    let mut s = PartitionState::new(1_000);
    let msg = |t, id| Command::Message {
        timestamp_ms: t,
        id,
        body: b"x",
    };
    assert_eq!(s.apply(1, &msg(100, Some("a"))), Applied::Message);
    assert_eq!(
        s.apply(2, &msg(200, Some("a"))),
        Applied::Duplicate { original: 1 }
    );
    // Replaying index 1 (after a snapshot) is not a duplicate of itself.
    let mut replay = PartitionState::decode_manifest(&s.encode_manifest(), 1_000).unwrap();
    assert_eq!(replay, s);
    assert_eq!(replay.apply(2, &msg(200, Some("a"))), Applied::Nothing);
    // The window is measured on the entries' clock: 1 s later, "a" is new.
    assert_eq!(s.apply(3, &msg(1_100, None)), Applied::Message);
    assert_eq!(s.lookup("a", 1_100), None);
    assert_eq!(s.apply(4, &msg(1_150, Some("a"))), Applied::Message);
    let commit = |next| Command::Commit {
        timestamp_ms: 1_200,
        group: "g",
        next,
    };
    s.apply(5, &commit(10));
    s.apply(6, &commit(7));
    assert_eq!(s.offset("g"), Some(10));
    assert!(PartitionState::decode_manifest(b"\xff\xff\xff", 1).is_err());
}

#[test]
fn the_dedupe_window_changes_where_the_log_says_on_every_replica() {
    let msg = |t, id| Command::Message {
        timestamp_ms: t,
        id: Some(id),
        body: b"x",
    };
    let window = |t, w| Command::Window {
        timestamp_ms: t,
        window_ms: w,
    };
    let log = [
        msg(100, "a"),
        window(150, 10_000),
        msg(5_000, "a"),
        msg(6_000, "b"),
        window(6_500, 100),
        msg(6_600, "b"),
    ];
    let mut s = PartitionState::new(1_000);
    let applied: Vec<Applied> = log
        .iter()
        .enumerate()
        .map(|(i, c)| s.apply(i as u64 + 1, c))
        .collect();
    assert_eq!(
        applied,
        vec![
            Applied::Message,
            Applied::Nothing,
            // 4.9 s later, within the 10 s window the log set (not the
            // replica's 1 s default).
            Applied::Duplicate { original: 1 },
            Applied::Message,
            Applied::Nothing,
            // The window shrank to 100 ms at index 5: "b" (6.0 s) expired.
            Applied::Message,
        ]
    );
    assert_eq!(s.window_ms(), 100);
    // The duplicate stays one for readers after its id left the window.
    assert_eq!(s.lookup("a", 6_600), None);
    assert!(s.is_duplicate(3));
    assert!(!s.is_duplicate(1) && !s.is_duplicate(6));
    // A snapshot carries the window; a replica whose default differs
    // rebuilds the same state from it.
    let manifest = s.encode_manifest();
    let restored = PartitionState::decode_manifest(&manifest, 120_000).unwrap();
    assert_eq!(restored, s);
    // A manifest of an agent before windows went through the log: the
    // default holds. An older agent reads a new manifest as before.
    let old = postcard::to_allocvec(&s.manifest()).unwrap();
    assert_eq!(
        PartitionState::decode_manifest(&old, 120_000)
            .unwrap()
            .window_ms(),
        120_000
    );
    let older: state::Manifest = postcard::from_bytes(&manifest).unwrap();
    assert_eq!(older, s.manifest());
    // Compaction past a duplicate forgets it.
    let mut compacted = s.clone();
    compacted.forget_before(3);
    assert!(compacted.is_duplicate(3));
    compacted.forget_before(4);
    assert!(!compacted.is_duplicate(3));
    let restored = PartitionState::decode_manifest(&compacted.encode_manifest(), 1).unwrap();
    assert_eq!(restored, compacted);
    // The window command round-trips; a truncated one is refused.
    let data = window(7, 9).encode().unwrap();
    assert_eq!(Command::decode(&data).unwrap(), window(7, 9));
    assert_eq!(Command::decode(&data).unwrap().timestamp_ms(), 7);
    assert!(Command::decode(&data[..12]).is_err());
}

#[test]
fn wire_refuses_local_kinds_and_zero_ids() {
    use raft::eraftpb::{Message, MessageType};
    let mut m = Message::default();
    m.set_msg_type(MessageType::MsgPropose);
    m.to = 1;
    m.from = 2;
    assert!(wire::to_wire(&m).is_err());
    m.set_msg_type(MessageType::MsgHeartbeat);
    m.term = 3;
    let w = wire::to_wire(&m).unwrap();
    let back = wire::from_wire(w.clone()).unwrap();
    assert_eq!(back, m);
    let mut zero = w.clone();
    zero.from = 0;
    assert!(wire::from_wire(zero).is_err());
    let mut local = w;
    local.term = 0;
    assert!(
        wire::from_wire(local).is_err(),
        "term 0 is raft-rs's mark of a local message"
    );
}

#[test]
fn wire_carries_conf_changes_as_our_own_struct() {
    use raft::eraftpb::{
        ConfChangeSingle, ConfChangeType, ConfChangeV2, Entry, EntryType, Message, MessageType,
    };
    let mut cc = ConfChangeV2::default();
    let mut single = ConfChangeSingle::default();
    single.set_change_type(ConfChangeType::AddLearnerNode);
    single.node_id = 7;
    cc.mut_changes().push(single);
    let mut e = Entry::default();
    e.set_entry_type(EntryType::EntryConfChangeV2);
    e.index = 3;
    e.term = 2;
    e.data = wire::encode_conf_change(&cc).into();
    let mut m = Message::default();
    m.set_msg_type(MessageType::MsgAppend);
    m.to = 1;
    m.from = 2;
    m.term = 2;
    m.set_entries(vec![e.clone()].into());
    let w = wire::to_wire(&m).unwrap();
    match &w.entries[0].payload {
        shoal_proto::raft::EntryPayload::ConfChange(c) => assert_eq!(c.changes[0].node, 7),
        other => panic!("not a conf change: {other:?}"),
    }
    let back = wire::from_wire(w).unwrap();
    assert_eq!(wire::conf_change_of(&back.get_entries()[0]).unwrap(), cc);
}
