use super::founding::{creation_record, read_creation_record, Founders, MetaRecord, PartitionKey3};
use super::transfer::{raft_frames, split_batch, PART_BYTES};
use shoal_proto::raft::RaftBatch;
use shoal_proto::Message;

fn key() -> PartitionKey3 {
    ("team-a".into(), "orders".into(), 3)
}

/// What an agent from before founders reads of a record: the same enum,
/// decoded whole with `from_bytes` (it ignores what follows).
fn read_as_older_agent(body: &[u8], me: &str, incarnation: u64) -> Option<bool> {
    let MetaRecord::Create {
        bootstrapper,
        incarnation: run,
        ..
    } = postcard::from_bytes::<MetaRecord>(body).ok()?;
    Some(bootstrapper == me && run == incarnation)
}

#[test]
fn founders_create_together_and_only_in_the_run_named() {
    let founders: Founders = vec![(11, 100), (22, 200), (33, 300)];
    let body = creation_record(&key(), &founders, "agent-1", 100).unwrap();
    for (id, run) in [(11, 100), (22, 200), (33, 300)] {
        let (k, voters) = read_creation_record(&body, "whoever", id, run).unwrap();
        assert_eq!(k, key());
        assert_eq!(
            voters,
            Some(vec![11, 22, 33]),
            "founder {id} creates with the list"
        );
    }
    // A later run of a founder (a restart replaying the meta log) and an
    // agent not named create nothing, yet see the partition as recorded.
    for (id, run) in [(11, 101), (44, 100)] {
        assert_eq!(
            read_creation_record(&body, "whoever", id, run),
            Some((key(), None))
        );
    }
}

#[test]
fn an_older_agent_reads_a_founders_record_as_recorded_and_creates_nothing() {
    let founders: Founders = vec![(11, 100), (22, 200), (33, 300)];
    let body = creation_record(&key(), &founders, "agent-1", 100).unwrap();
    // Empty bootstrapper: no older agent is named (node names are never
    // empty), whatever its name and run.
    for (me, run) in [("agent-1", 100), ("agent-2", 200), ("agent-1", 0)] {
        assert_eq!(read_as_older_agent(&body, me, run), Some(false));
    }
}

#[test]
fn fewer_than_three_founders_found_the_group_alone_as_before() {
    let two: Founders = vec![(11, 100), (22, 200)];
    let body = creation_record(&key(), &two, "agent-1", 100).unwrap();
    assert_eq!(read_as_older_agent(&body, "agent-1", 100), Some(true));
    let (_, voters) = read_creation_record(&body, "agent-1", 11, 100).unwrap();
    assert_eq!(voters, Some(vec![11]));
    assert_eq!(
        read_creation_record(&body, "agent-2", 22, 200),
        Some((key(), None))
    );
    assert_eq!(read_creation_record(b"\xff\xff", "agent-1", 11, 100), None);
}

fn batch_of(entry_bytes: &[usize]) -> RaftBatch {
    use shoal_proto::raft::{EntryPayload, GroupMessages, GroupRef, RaftEntry, RaftMessage};
    let entries = entry_bytes
        .iter()
        .enumerate()
        .map(|(i, n)| RaftEntry {
            term: 2,
            index: 10 + i as u64,
            payload: EntryPayload::Normal(vec![i as u8; *n]),
        })
        .collect();
    RaftBatch {
        incarnation: 7,
        groups: vec![GroupMessages {
            group: GroupRef {
                namespace: "team-a".into(),
                topic: "orders".into(),
                partition: 0,
            },
            messages: vec![RaftMessage {
                kind: shoal_proto::raft::RaftMessageKind::Append,
                to: 2,
                from: 1,
                term: 2,
                log_term: 2,
                index: 9,
                entries,
                commit: 9,
                commit_term: 2,
                snapshot: None,
                request_snapshot: 0,
                reject: false,
                reject_hint: 0,
                context: Vec::new(),
                priority: 0,
            }],
            signal: shoal_proto::raft::Signal::Nothing,
            recovering: false,
            progress_reset: false,
        }],
    }
}

#[test]
fn a_batch_larger_than_a_frame_goes_in_parts_that_put_together_give_it_back() {
    let big = batch_of(&[6 << 20, 6 << 20, 6 << 20, 3 << 20]);
    let frames = raft_frames(big.clone(), 99);
    assert_eq!(frames.len(), 3, "21 MiB in 8 MiB parts");
    let mut whole = Vec::new();
    for (i, f) in frames.iter().enumerate() {
        let Message::RaftPart {
            transfer,
            part,
            parts,
            bytes,
        } = f
        else {
            panic!("frame {i} is not a part");
        };
        assert_eq!((*transfer, *part as usize, *parts), (99, i, 3));
        assert!(bytes.len() <= PART_BYTES);
        // Each part fits a mesh frame with room to spare.
        let mut buf = bytes::BytesMut::new();
        shoal_proto::encode(f, &mut buf).unwrap();
        whole.extend_from_slice(bytes);
    }
    let back: RaftBatch = postcard::from_bytes(&whole).unwrap();
    assert_eq!(back, big);
    // Small batches go as they are.
    let small = batch_of(&[1024, 1024]);
    assert_eq!(raft_frames(small.clone(), 100), vec![Message::Raft(small)]);
}

#[test]
fn a_group_catching_a_replica_up_is_split_into_frames_in_order_with_its_signals_in_place() {
    // Ten full 1 MiB appends of one group, as a leader sends when its
    // in-flight window opens to a replica catching up.
    let one = batch_of(&[1 << 20]);
    let mut gm = one.groups[0].clone();
    let message = gm.messages[0].clone();
    gm.messages = (0..10)
        .map(|i| {
            let mut m = message.clone();
            m.index = 9 + i;
            m
        })
        .collect();
    gm.progress_reset = true;
    gm.recovering = true;
    gm.signal =
        shoal_proto::raft::Signal::Hibernate(shoal_proto::raft::Hibernate { term: 2, commit: 9 });
    let batch = RaftBatch {
        incarnation: 7,
        groups: vec![gm.clone()],
    };
    let parts = split_batch(batch);
    assert!(parts.len() >= 3, "10 MiB in frames of at most 4 MiB");
    let runs: Vec<_> = parts.iter().flat_map(|b| &b.groups).collect();
    let indexes: Vec<u64> = runs
        .iter()
        .flat_map(|r| r.messages.iter().map(|m| m.index))
        .collect();
    assert_eq!(
        indexes,
        (9..19).collect::<Vec<_>>(),
        "every message, in order"
    );
    for part in &parts {
        assert_eq!(part.incarnation, 7);
        assert!(
            matches!(raft_frames(part.clone(), 1)[..], [Message::Raft(_)]),
            "each part is one frame"
        );
    }
    assert!(runs[0].progress_reset && runs[1..].iter().all(|r| !r.progress_reset));
    assert!(runs.iter().all(|r| r.recovering && r.group == gm.group));
    let (last, rest) = runs.split_last().unwrap();
    assert_eq!(last.signal, gm.signal);
    assert!(rest
        .iter()
        .all(|r| r.signal == shoal_proto::raft::Signal::Nothing));
    // A group under the limit stays whole.
    let small = batch_of(&[1024, 1024]);
    assert_eq!(split_batch(small.clone()), vec![small]);
}
