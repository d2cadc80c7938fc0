use super::*;
use crate::message::Message;

fn spec(name: &str) -> MemberSpec {
    MemberSpec {
        name: Arc::from(name),
        ack_timeout: Duration::from_secs(10),
        max_deliveries: 0,
        backoff: Backoff {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(8),
        },
        max_in_flight: 100,
        ordered: false,
    }
}

fn msg(id: &str) -> Message {
    Message {
        id: id.into(),
        ..Default::default()
    }
}

fn feed(g: &mut GroupCore, partition: u32, from: u64, n: u64, now: Instant) {
    let entries = (from..from + n)
        .map(|i| (i, 1000, Ok(msg(&format!("p{partition}-{i}")))))
        .collect();
    g.on_fetched(partition, entries, 1000, now);
}

fn group(partitions: u32, members: &[MemberSpec]) -> GroupCore {
    let mut g = GroupCore::new();
    for p in 0..partitions {
        g.add_partition(p, 1);
    }
    g.set_members(members.to_vec());
    g
}

#[test]
fn members_share_partitions_and_each_message_goes_to_one() {
    let now = Instant::now();
    let mut g = group(4, &[spec("a"), spec("b")]);
    for p in 0..4 {
        feed(&mut g, p, 1, 10, now);
    }
    let a = g.take("a", 1000, now);
    let b = g.take("b", 1000, now);
    assert_eq!(a.len(), 20);
    assert_eq!(b.len(), 20);
    let mut ids: Vec<_> = a.iter().chain(&b).map(|d| d.message.id.clone()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 40, "no message twice");
    let pa: BTreeSet<u32> = a.iter().map(|d| d.ack_id.partition).collect();
    let pb: BTreeSet<u32> = b.iter().map(|d| d.ack_id.partition).collect();
    assert!(pa.is_disjoint(&pb), "partitions are owned by one member");
}

#[test]
fn acks_commit_only_the_acknowledged_prefix() {
    let now = Instant::now();
    let mut g = group(1, &[spec("a")]);
    feed(&mut g, 0, 1, 3, now);
    let d = g.take("a", 10, now);
    assert_eq!(d.len(), 3);
    assert!(g.ack(&d[1].ack_id));
    assert_eq!(g.committed(0), Some(1));
    assert!(g.take_commits().is_empty());
    assert!(g.ack(&d[0].ack_id));
    assert_eq!(g.committed(0), Some(3));
    assert_eq!(g.take_commits(), vec![(0, 3)]);
    assert!(g.ack(&d[2].ack_id));
    assert_eq!(g.committed(0), Some(4));
    assert!(!g.ack(&d[2].ack_id), "a second ack is unknown");
    assert!(!g.ack(&AckId {
        partition: 9,
        offset: 1,
        attempt: 1
    }));
}

#[test]
fn ack_timeout_redelivers_after_backoff() {
    let now = Instant::now();
    let mut g = group(1, &[spec("a")]);
    feed(&mut g, 0, 1, 1, now);
    let first = g.take("a", 10, now);
    assert_eq!(first[0].ack_id.attempt, 1);
    assert!(g.take("a", 10, now).is_empty());
    let (dead, timed_out) = g.tick(now + Duration::from_secs(11));
    assert!(dead.is_empty());
    assert_eq!(timed_out, 1);
    assert!(
        g.take("a", 10, now + Duration::from_secs(11)).is_empty(),
        "waits for backoff"
    );
    let later = now + Duration::from_secs(13);
    g.tick(later);
    let second = g.take("a", 10, later);
    assert_eq!(second.len(), 1);
    assert_eq!(second[0].ack_id.attempt, 2);
    assert!(g.ack(&second[0].ack_id));
    assert_eq!(g.committed(0), Some(2));
}

#[test]
fn max_deliveries_dead_letters_and_completes() {
    let now = Instant::now();
    let mut s = spec("a");
    s.max_deliveries = 2;
    let mut g = group(1, &[s]);
    feed(&mut g, 0, 1, 2, now);
    let d1 = g.take("a", 1, now);
    assert!(matches!(
        g.nack(&d1[0].ack_id, Duration::ZERO, now),
        Ok(None)
    ));
    let d2 = g.take("a", 1, now);
    assert_eq!(d2[0].ack_id.offset, 1);
    assert_eq!(d2[0].ack_id.attempt, 2);
    let dead = g
        .nack(&d2[0].ack_id, Duration::ZERO, now)
        .unwrap()
        .expect("dead letter");
    assert_eq!(dead.attempts, 2);
    assert_eq!(dead.reason, "max_deliveries");
    assert_eq!(
        g.committed(0),
        Some(1),
        "not committed until stored in the dead-letter topic"
    );
    let next = g.take("a", 10, now);
    assert_eq!(next.len(), 1);
    assert_eq!(
        next[0].ack_id.offset, 2,
        "a parked message is not delivered again"
    );
    g.complete(0, 1);
    assert_eq!(g.committed(0), Some(2));
}

#[test]
fn reject_dead_letters_at_once() {
    let now = Instant::now();
    let mut g = group(1, &[spec("a")]);
    feed(&mut g, 0, 1, 1, now);
    let d = g.take("a", 1, now);
    let dead = g.reject(&d[0].ack_id).expect("dead letter");
    assert_eq!(dead.reason, "rejected");
    g.park_failed(0, 1, now, Duration::from_secs(1));
    g.tick(now + Duration::from_secs(2));
    let again = g.take("a", 1, now + Duration::from_secs(2));
    assert_eq!(
        again.len(),
        1,
        "a dead letter that could not be stored is retried"
    );
}

#[test]
fn ordered_keeps_one_in_flight_per_partition() {
    let now = Instant::now();
    let mut s = spec("a");
    s.ordered = true;
    let mut g = group(2, &[s]);
    feed(&mut g, 0, 1, 3, now);
    feed(&mut g, 1, 1, 3, now);
    let d = g.take("a", 10, now);
    assert_eq!(d.len(), 2, "one per partition");
    assert!(g.take("a", 10, now).is_empty());
    let p0 = d.iter().find(|d| d.ack_id.partition == 0).unwrap();
    g.nack(&p0.ack_id, Duration::ZERO, now).unwrap();
    let again = g.take("a", 10, now);
    assert_eq!(again.len(), 1);
    assert_eq!(
        (again[0].ack_id.partition, again[0].ack_id.offset),
        (0, 1),
        "the failed head comes first"
    );
}

#[test]
fn delayed_and_expired_messages() {
    let now = Instant::now();
    let mut g = group(1, &[spec("a")]);
    let delayed = Message {
        id: "late".into(),
        deliver_at_ms: Some(6000),
        ..Default::default()
    };
    let expired = Message {
        id: "old".into(),
        expires_at_ms: Some(500),
        ..Default::default()
    };
    let out = g.on_fetched(
        0,
        vec![
            (1, 900, Ok(expired)),
            (2, 900, Ok(delayed)),
            (3, 900, Ok(msg("now"))),
        ],
        1000,
        now,
    );
    assert_eq!(out.expired, 1);
    let d = g.take("a", 10, now);
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].message.id, "now");
    g.tick(now + Duration::from_secs(4));
    assert!(g.take("a", 10, now + Duration::from_secs(4)).is_empty());
    g.tick(now + Duration::from_secs(5));
    let d = g.take("a", 10, now + Duration::from_secs(5));
    assert_eq!(d[0].message.id, "late");
}

#[test]
fn leaving_member_hands_in_flight_to_the_next_owner() {
    let now = Instant::now();
    let mut g = group(2, &[spec("a"), spec("b")]);
    feed(&mut g, 0, 1, 2, now);
    feed(&mut g, 1, 1, 2, now);
    let a = g.take("a", 10, now);
    assert_eq!(a.len(), 2);
    g.set_members(vec![spec("b")]);
    let b = g.take("b", 10, now);
    assert_eq!(
        b.len(),
        4,
        "b owns both partitions and gets a's unacked messages again"
    );
    assert_eq!(g.in_flight(), 4);
    // The old member's late ack still counts: the app processed it.
    assert!(g.ack(&a[0].ack_id));
    assert_eq!(g.in_flight(), 3);
}

#[test]
fn in_flight_limit_and_undecodable_entries() {
    let now = Instant::now();
    let mut s = spec("a");
    s.max_in_flight = 2;
    let mut g = group(1, &[s]);
    let out = g.on_fetched(
        0,
        vec![
            (
                1,
                0,
                Err(crate::message::Message::decode(&bytes::Bytes::new()).unwrap_err()),
            ),
            (2, 0, Ok(msg("x"))),
            (3, 0, Ok(msg("y"))),
            (4, 0, Ok(msg("z"))),
        ],
        0,
        now,
    );
    assert_eq!(out.undecodable, 1);
    let d = g.take("a", 10, now);
    assert_eq!(d.len(), 2);
    assert!(!g.has_ready_for("a"));
    g.ack(&d[0].ack_id);
    assert!(g.has_ready_for("a"));
    assert_eq!(g.wanted_fetches(), vec![(0, 5, FETCH_WINDOW - 2)]);
}

#[test]
fn ack_id_text_round_trip() {
    let id = AckId {
        partition: 3,
        offset: 42,
        attempt: 2,
    };
    assert_eq!(id.to_string().parse::<AckId>(), Ok(id));
    assert!("x-1-2".parse::<AckId>().is_err());
    assert!("1-2".parse::<AckId>().is_err());
}

#[test]
fn a_ttl_that_passes_while_waiting_drops_the_message() {
    let now = Instant::now();
    let mut g = group(1, &[spec("a")]);
    let short = Message {
        id: "short".into(),
        expires_at_ms: Some(2000),
        ..Default::default()
    };
    g.set_now_ms(1000);
    g.on_fetched(
        0,
        vec![(1, 900, Ok(short)), (2, 900, Ok(msg("keep")))],
        1000,
        now,
    );
    // Fetched while still valid; the clock passes its TTL before anyone takes it.
    g.set_now_ms(2500);
    let d = g.take("a", 10, now);
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].message.id, "keep");
    assert_eq!(g.take_expired(), 1);
    assert_eq!(g.take_expired(), 0);
    g.ack(&d[0].ack_id);
    assert_eq!(
        g.committed(0),
        Some(3),
        "the expired one does not hold the commit back"
    );
}

#[test]
fn a_ttl_that_passes_before_a_redelivery_drops_the_message() {
    let now = Instant::now();
    let mut g = group(1, &[spec("a")]);
    let m = Message {
        id: "m".into(),
        expires_at_ms: Some(2000),
        ..Default::default()
    };
    g.set_now_ms(1000);
    g.on_fetched(0, vec![(1, 900, Ok(m))], 1000, now);
    let d = g.take("a", 1, now);
    g.nack(&d[0].ack_id, Duration::ZERO, now).unwrap();
    g.set_now_ms(3000);
    assert!(g.take("a", 1, now).is_empty());
    assert_eq!(g.take_expired(), 1);
    assert_eq!(g.committed(0), Some(2));
}

#[test]
fn a_removed_partition_frees_its_in_flight_slots_and_acks_turn_unknown() {
    let now = Instant::now();
    let mut g = GroupCore::new();
    g.add_partition(0, 1);
    g.add_partition(1, 1);
    g.set_members(vec![spec("a")]);
    for p in [0, 1] {
        let fed = vec![(1, 0, Ok(msg("x"))), (2, 0, Ok(msg("y")))];
        g.on_fetched(p, fed, 0, now);
    }
    let taken = g.take("a", 10, now);
    assert_eq!(taken.len(), 4);
    assert_eq!(g.in_flight(), 4);
    g.remove_partition(1);
    assert!(!g.has_partition(1));
    assert_eq!(g.in_flight(), 2, "partition 1's deliveries no longer count");
    let gone = taken.iter().find(|d| d.ack_id.partition == 1).unwrap();
    assert!(
        !g.ack(&gone.ack_id),
        "an ack for a removed partition is unknown"
    );
    assert!(g.wanted_fetches().iter().all(|(p, _, _)| *p == 0));
}

#[test]
fn an_ack_drops_the_deliverys_deadline_timer() {
    let now = Instant::now();
    let mut g = GroupCore::new();
    g.add_partition(0, 1);
    g.set_members(vec![spec("a")]);
    let fed = (1..=100).map(|i| (i, 0, Ok(msg("x")))).collect();
    g.on_fetched(0, fed, 0, now);
    let taken = g.take("a", 100, now);
    assert_eq!(g.timer_count(), 100, "one deadline per delivery in flight");
    for d in &taken {
        assert!(g.ack(&d.ack_id));
    }
    assert_eq!(g.timer_count(), 0, "acknowledged deliveries keep no timer");
    assert_eq!(g.next_timer(), None);
}
