use super::*;

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
