//! Placement simulated by hand: balance, movement on join and leave, agreement.

use super::*;

fn keys(n: u32) -> Vec<(String, u32)> {
    // 1,000 partitions spread over topics of 4 to 16 partitions, as a mesh would have.
    let mut out = Vec::new();
    let mut t = 0;
    while out.len() < n as usize {
        let parts = 4 + (t % 13);
        for p in 0..parts {
            if out.len() < n as usize {
                out.push((format!("topic-{t}"), p));
            }
        }
        t += 1;
    }
    out
}

fn member_sets() -> Vec<Vec<Member>> {
    let plain: Vec<Member> = (0..10)
        .map(|i| Member::broker(format!("agent-{i}")))
        .collect();
    let pods: Vec<Member> = (0..10)
        .map(|i| Member::broker(format!("orders-7d4b9c{i:x}f-x{}k2q", i * 7)))
        .collect();
    let mixed: Vec<Member> = (0..10)
        .map(|i| Member::broker(format!("shoal-{}.ns-{}", i * 31 + 5, i % 3)))
        .collect();
    vec![plain, pods, mixed]
}

fn homes<'a>(members: &'a [Member], keys: &[(String, u32)]) -> Vec<&'a str> {
    keys.iter()
        .map(|(t, p)| {
            let key = PartitionKey {
                namespace: "default",
                topic: t,
                partition: *p,
            };
            home(members, &key).map_or("", |m| m.id.as_str())
        })
        .collect()
}

#[test]
fn a_join_or_leave_moves_at_most_1_2_over_n() {
    let keys = keys(1000);
    for members in member_sets() {
        let before = homes(&members, &keys);
        // Join: an 11th agent.
        let mut joined = members.clone();
        joined.push(Member::broker("newcomer-0"));
        let after = homes(&joined, &keys);
        let moved = before.iter().zip(&after).filter(|(a, b)| a != b).count();
        let n = joined.len() as f64;
        assert!(moved as f64 <= 1.2 / n * 1000.0, "join moved {moved}");
        assert!(
            after
                .iter()
                .zip(&before)
                .all(|(a, b)| a == b || *a == "newcomer-0"),
            "only to the newcomer"
        );
        // Leave: the 4th agent.
        let mut left = members.clone();
        let gone = left.remove(3).id;
        let after = homes(&left, &keys);
        let moved = before.iter().zip(&after).filter(|(a, b)| a != b).count();
        assert!(
            moved as f64 <= 1.2 / members.len() as f64 * 1000.0,
            "leave moved {moved}"
        );
        assert!(
            before.iter().zip(&after).all(|(b, a)| a == b || *b == gone),
            "only the leaver's"
        );
    }
}

#[test]
fn agents_with_the_same_member_list_agree_whatever_its_order() {
    let keys = keys(300);
    let members = &member_sets()[1];
    let mut shuffled = members.clone();
    shuffled.reverse();
    shuffled.swap(2, 7);
    assert_eq!(homes(members, &keys), homes(&shuffled, &keys));
    let key = PartitionKey {
        namespace: "ns",
        topic: "t",
        partition: 3,
    };
    let a: Vec<&str> = replicas(members, &key, 3)
        .iter()
        .map(|m| m.id.as_str())
        .collect();
    let b: Vec<&str> = replicas(&shuffled, &key, 3)
        .iter()
        .map(|m| m.id.as_str())
        .collect();
    assert_eq!(a, b);
    assert_eq!(a.len(), 3);
}

#[test]
fn client_only_members_hold_nothing() {
    let mut members = member_sets()[0].clone();
    for m in members.iter_mut().skip(5) {
        m.broker = false;
    }
    for h in homes(&members, &keys(200)) {
        let m = members.iter().find(|m| m.id == h).unwrap();
        assert!(m.broker);
    }
    let none: Vec<Member> = vec![Member {
        id: "job".into(),
        broker: false,
    }];
    let key = PartitionKey {
        namespace: "ns",
        topic: "t",
        partition: 0,
    };
    assert!(home(&none, &key).is_none());
}

#[test]
fn replicas_are_distinct_and_the_home_comes_first() {
    let members = &member_sets()[2];
    for (t, p) in keys(200) {
        let key = PartitionKey {
            namespace: "default",
            topic: &t,
            partition: p,
        };
        let r = replicas(members, &key, 3);
        assert_eq!(r.len(), 3);
        assert!(r[0] != r[1] && r[1] != r[2] && r[0] != r[2]);
        assert_eq!(Some(r[0]), home(members, &key));
    }
    // Duplicate ids in a member list (a gossip glitch) still give distinct replicas.
    let dup = vec![
        Member::broker("a"),
        Member::broker("a"),
        Member::broker("b"),
    ];
    let key = PartitionKey {
        namespace: "n",
        topic: "t",
        partition: 1,
    };
    assert_eq!(replicas(&dup, &key, 3).len(), 2);
}

#[test]
fn weights_are_stable_across_builds() {
    // Changing the hash moves every partition of a running mesh: pin it.
    let key = PartitionKey {
        namespace: "default",
        topic: "orders",
        partition: 0,
    };
    assert_eq!(weight("agent-0", &key), weight("agent-0", &key));
    let pinned = weight("agent-0", &key);
    assert_eq!(
        pinned, PINNED_WEIGHT,
        "weight({key:?}) changed: {pinned:#x}"
    );
}

const PINNED_WEIGHT: u64 = 0xcbd2_35b5_1d69_a8fe;

// ---- bounded loads ----

/// `keys(n)` (topics of 4 to 16 partitions) in the `default` namespace, as a
/// catalog holds them.
fn catalog(n: u32) -> Vec<OwnedPartitionKey> {
    keys(n)
        .into_iter()
        .map(|(t, p)| OwnedPartitionKey::new("default", t, p))
        .collect()
}

/// `n` seeded lists of 11 pseudo-random pod names: the first 10 are the
/// cluster, the 11th joins it.
fn random_lists(n: usize) -> Vec<Vec<Member>> {
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    (0..n)
        .map(|_| {
            (0..11)
                .map(|_| {
                    seed = mix(seed.wrapping_add(0x9e37_79b9_7f4a_7c15));
                    Member::broker(format!("app-{:x}-{:x}", seed >> 40, seed & 0xffff))
                })
                .collect()
        })
        .collect()
}

/// Partitions of `keys` whose home differs, and how many of those neither
/// came from nor went to `changed` (the cascade).
fn moves(
    a: &Assignment,
    b: &Assignment,
    keys: &[OwnedPartitionKey],
    changed: &str,
) -> (usize, usize) {
    let mut moved = 0;
    let mut cascade = 0;
    for k in keys {
        let (x, y) = (a.home(&k.as_key()), b.home(&k.as_key()));
        if x != y {
            moved += 1;
            if x != Some(changed) && y != Some(changed) {
                cascade += 1;
            }
        }
    }
    (moved, cascade)
}

fn busiest(a: &Assignment, members: &[Member]) -> usize {
    members.iter().map(|m| a.load(&m.id)).max().unwrap_or(0)
}

/// A seeded Fisher-Yates shuffle.
fn shuffle<T>(items: &mut [T], mut seed: u64) {
    for i in (1..items.len()).rev() {
        seed = mix(seed.wrapping_add(0x9e37_79b9_7f4a_7c15));
        items.swap(i, (seed % (i as u64 + 1)) as usize);
    }
}

/// A hash of a whole assignment, to pin it.
fn fingerprint(a: &Assignment) -> u64 {
    a.iter().fold(FNV_OFFSET, |h, (k, m)| {
        let h = fnv1a(
            h,
            format!("{}/{}/{}={m};", k.namespace, k.topic, k.partition).as_bytes(),
        );
        mix(h)
    })
}

/// Plain rendezvous is balls into bins: with 10 agents and 1,000 partitions
/// the busiest agent averages 1.14x the mean over these 50 lists and reaches
/// 1.38x on an unlucky one, past the 1.25x the requirement allows. Bounded
/// loads cap every agent at `ceil(mean x (1 + epsilon))`: 1.15x with the
/// default epsilon, on every list (the cap binds on most of them: mean
/// busiest 1.13x). Plain rendezvous is pinned too, so a weaker hash or a
/// placement bug fails here.
#[test]
fn balance_over_many_member_lists_plain_and_bounded() {
    let keys = catalog(1000);
    let (mut plain_sum, mut plain_worst) = (0.0f64, 0.0f64);
    let (mut bounded_sum, mut bounded_worst) = (0.0f64, 0.0f64);
    for list in random_lists(50) {
        let members = &list[..10];
        let plain = Assignment::compute(members, &keys, f64::INFINITY);
        let bounded = Assignment::compute(members, &keys, DEFAULT_LOAD_EPSILON);
        for a in [&plain, &bounded] {
            assert_eq!(a.len(), 1000);
            assert_eq!(members.iter().map(|m| a.load(&m.id)).sum::<usize>(), 1000);
            assert!(
                members.iter().all(|m| a.load(&m.id) > 0),
                "every agent is home to some"
            );
        }
        let p = busiest(&plain, members) as f64 / 100.0;
        let b = busiest(&bounded, members) as f64 / 100.0;
        assert!(b <= 1.25, "bounded busiest/mean {b} for {members:?}");
        assert!(busiest(&bounded, members) <= bounded.cap());
        assert_eq!(bounded.cap(), 115);
        plain_sum += p;
        plain_worst = plain_worst.max(p);
        bounded_sum += b;
        bounded_worst = bounded_worst.max(b);
    }
    let (plain_mean, bounded_mean) = (plain_sum / 50.0, bounded_sum / 50.0);
    println!(
        "busiest/mean over 50 lists: plain mean {plain_mean:.3} worst {plain_worst:.3}; bounded mean {bounded_mean:.3} worst {bounded_worst:.3}"
    );
    assert!(plain_mean <= 1.2, "plain mean busiest/mean: {plain_mean}");
    assert!(
        plain_worst <= 1.4,
        "plain worst busiest/mean: {plain_worst}"
    );
    assert!(
        plain_worst > 1.25,
        "plain rendezvous should miss the bound on some list"
    );
    assert!(
        bounded_worst <= 1.15,
        "bounded worst busiest/mean: {bounded_worst}"
    );
}

/// Over the 50 lists: a join (the 11th member; N = 11 after it) and a leave
/// (each of the 10 in turn; N = 9 after it) move at most 1.2/N of the 1,000
/// partitions. Observed worst: join 1.177/N (107 partitions), leave 1.098/N
/// (122). Bounded loads add a cascade: when the cap or a load changes, a
/// partition can move between two members that neither joined nor left;
/// here that is 1.1% of the join's moves and 0.8% of the leaves'.
#[test]
fn bounded_join_or_leave_moves_at_most_1_2_over_n() {
    let keys = catalog(1000);
    let (mut worst_join, mut worst_leave) = (0.0f64, 0.0f64);
    let (mut join_moves, mut join_cascade) = (0, 0);
    let (mut leave_moves, mut leave_cascade) = (0, 0);
    for list in random_lists(50) {
        let members = &list[..10];
        let before = Assignment::compute(members, &keys, DEFAULT_LOAD_EPSILON);
        // Join: N = 11 after.
        let joiner = &list[10].id;
        let after = Assignment::compute(&list, &keys, DEFAULT_LOAD_EPSILON);
        let (moved, cascade) = moves(&before, &after, &keys, joiner);
        let n = 11.0;
        assert!(
            moved as f64 <= 1.2 / n * 1000.0,
            "join moved {moved} for {list:?}"
        );
        assert!(
            moved >= after.load(joiner),
            "the joiner's partitions all moved"
        );
        assert!(cascade <= 10, "join cascade {cascade} for {list:?}");
        worst_join = worst_join.max(moved as f64 / 1000.0 * n);
        join_moves += moved;
        join_cascade += cascade;
        // Leave: N = 9 after.
        for gone in 0..10 {
            let mut left = members.to_vec();
            let gone = left.remove(gone).id;
            let after = Assignment::compute(&left, &keys, DEFAULT_LOAD_EPSILON);
            let (moved, cascade) = moves(&before, &after, &keys, &gone);
            let n = 9.0;
            assert!(
                moved as f64 <= 1.2 / n * 1000.0,
                "leave of {gone} moved {moved}"
            );
            assert_eq!(
                moved - cascade,
                before.load(&gone),
                "the leaver's partitions all moved"
            );
            assert!(cascade <= 10, "leave cascade {cascade} for {gone}");
            worst_leave = worst_leave.max(moved as f64 / 1000.0 * n);
            leave_moves += moved;
            leave_cascade += cascade;
        }
    }
    let join_cascade = join_cascade as f64 / join_moves as f64;
    let leave_cascade = leave_cascade as f64 / leave_moves as f64;
    println!(
        "worst moved x N: join {worst_join:.3}, leave {worst_leave:.3}; cascade: join {join_cascade:.3}, leave {leave_cascade:.3}"
    );
    assert!(join_cascade <= 0.03 && leave_cascade <= 0.03);
}

/// A new topic (8 partitions) on a 10-member cluster moves almost none of the
/// 1,000 existing partitions: 0.24 on average over the 50 lists, 2 at worst
/// (0.4 and 4 over 500 lists).
/// Only the overflow of full members can change (the cap grows by at most
/// one and the new partitions take places in the order), so one global cap
/// is enough; a cap per topic measured far worse on joins and leaves (see
/// the module doc).
#[test]
fn a_new_topic_moves_few_existing_partitions() {
    let keys = catalog(1000);
    let mut grown = keys.clone();
    grown.extend((0..8).map(|p| OwnedPartitionKey::new("default", "brand-new", p)));
    let (mut total, mut worst) = (0, 0);
    for list in random_lists(50) {
        let members = &list[..10];
        let before = Assignment::compute(members, &keys, DEFAULT_LOAD_EPSILON);
        let after = Assignment::compute(members, &grown, DEFAULT_LOAD_EPSILON);
        assert_eq!(after.len(), 1008);
        assert!(busiest(&after, members) <= after.cap());
        let (moved, _) = moves(&before, &after, &keys, "");
        total += moved;
        worst = worst.max(moved);
    }
    println!(
        "a new topic moved {} existing partitions on average, {worst} at worst",
        total as f64 / 50.0
    );
    assert!(worst <= 5, "a new topic moved {worst} existing partitions");
}

#[test]
fn bounded_assignment_is_independent_of_input_order_and_duplicates() {
    let keys = catalog(1000);
    for (i, list) in random_lists(5).into_iter().enumerate() {
        let members = &list[..10];
        let a = Assignment::compute(members, &keys, DEFAULT_LOAD_EPSILON);
        let mut m2 = members.to_vec();
        let mut k2 = keys.clone();
        shuffle(&mut m2, i as u64);
        shuffle(&mut k2, i as u64 + 100);
        let b = Assignment::compute(&m2, &k2, DEFAULT_LOAD_EPSILON);
        assert_eq!(a, b);
        // Duplicates (a gossip glitch, a catalog listed twice) count once, and
        // an id listed once as a broker is a broker.
        m2.push(m2[3].clone());
        m2.push(Member {
            id: m2[5].id.clone(),
            broker: false,
        });
        m2.insert(
            0,
            Member {
                id: m2[7].id.clone(),
                broker: false,
            },
        );
        k2.extend(keys[..100].iter().cloned());
        let c = Assignment::compute(&m2, &k2, DEFAULT_LOAD_EPSILON);
        assert_eq!(a, c);
        for k in &keys {
            assert_eq!(a.home(&k.as_key()), b.home(&k.as_key()));
        }
    }
}

#[test]
fn bounded_non_brokers_hold_nothing() {
    let keys = catalog(300);
    let mut members = member_sets()[0].clone();
    for m in members.iter_mut().skip(5) {
        m.broker = false;
    }
    let a = Assignment::compute(&members, &keys, DEFAULT_LOAD_EPSILON);
    assert_eq!(a.len(), 300);
    assert_eq!(a.cap(), 69); // ceil(300 / 5 x 1.15)
    for m in &members {
        assert_eq!(a.load(&m.id) > 0, m.broker, "{}", m.id);
    }
    for (_, home) in a.iter() {
        assert!(members.iter().any(|m| m.id == home && m.broker));
    }
    // No broker at all: no homes.
    let none = vec![Member {
        id: "job".into(),
        broker: false,
    }];
    for a in [
        Assignment::compute(&none, &keys, DEFAULT_LOAD_EPSILON),
        Assignment::compute(&[], &keys, DEFAULT_LOAD_EPSILON),
    ] {
        assert!(a.is_empty());
        assert_eq!(a.len(), 0);
        assert_eq!(a.home(&keys[0].as_key()), None);
        assert_eq!(a.load("job"), 0);
        assert_eq!(a.iter().count(), 0);
    }
    // No partitions: nothing to hold.
    let a = Assignment::compute(&members, &[], DEFAULT_LOAD_EPSILON);
    assert!(a.is_empty());
    assert_eq!(a.load(&members[0].id), 0);
}

#[test]
fn bounded_homes_match_plain_rendezvous_where_the_cap_allows() {
    let keys = catalog(1000);
    for members in member_sets() {
        let unbounded = Assignment::compute(&members, &keys, f64::INFINITY);
        let bounded = Assignment::compute(&members, &keys, DEFAULT_LOAD_EPSILON);
        let mut differ = 0;
        for k in &keys {
            let plain = home(&members, &k.as_key()).map(|m| m.id.as_str());
            assert_eq!(unbounded.home(&k.as_key()), plain);
            if bounded.home(&k.as_key()) != plain {
                differ += 1;
            }
        }
        // Only the overflow of members past the cap differs.
        let overflow: usize = members
            .iter()
            .map(|m| unbounded.load(&m.id).saturating_sub(bounded.cap()))
            .sum();
        assert!(
            differ >= overflow && differ <= 3 * overflow,
            "{differ} vs {overflow}"
        );
    }
}

#[test]
fn the_cap_holds_for_any_size_and_epsilon() {
    for brokers in 1..=12usize {
        let members: Vec<Member> = (0..brokers)
            .map(|i| Member::broker(format!("m{i}")))
            .collect();
        for parts in [0u32, 1, 2, 3, 7, 10, 11, 12, 13, 25, 50, 97] {
            let keys: Vec<OwnedPartitionKey> = (0..parts)
                .map(|p| OwnedPartitionKey::new("ns", format!("t{}", p % 3), p))
                .collect();
            for eps in [-1.0, f64::NAN, 0.0, 0.05, 0.15, 0.25, 1.0, f64::INFINITY] {
                let a = Assignment::compute(&members, &keys, eps);
                let p = parts as usize;
                let even = p.div_ceil(brokers);
                let slack = if eps > 0.0 { eps } else { 0.0 };
                let bound = (p as f64 / brokers as f64 * (1.0 + slack))
                    .ceil()
                    .min(p as f64);
                assert!(a.cap() >= even && a.cap() as f64 <= bound.max(even as f64));
                assert_eq!(a.len(), p, "every partition placed");
                let total: usize = members
                    .iter()
                    .map(|m| {
                        assert!(a.load(&m.id) <= a.cap());
                        a.load(&m.id)
                    })
                    .sum();
                assert_eq!(total, p);
                for k in &keys {
                    assert!(a.home(&k.as_key()).is_some());
                }
            }
        }
    }
    // Float error does not add a partition: 100 x 1.15 is 115, not 116.
    let keys = catalog(1000);
    let members: Vec<Member> = (0..10)
        .map(|i| Member::broker(format!("agent-{i}")))
        .collect();
    assert_eq!(Assignment::compute(&members, &keys, 0.15).cap(), 115);
    assert_eq!(Assignment::compute(&members, &keys, 0.25).cap(), 125);
    assert_eq!(Assignment::compute(&members[..9], &keys, 0.15).cap(), 128);
}

#[test]
fn lookups_follow_key_order() {
    // Names that are prefixes of each other, across namespaces.
    let keys: Vec<OwnedPartitionKey> = ["a", "ab", "a\u{0}", "b"]
        .iter()
        .flat_map(|ns| ["t", "t2", "t10", ""].iter().map(move |t| (ns, t)))
        .flat_map(|(ns, t)| [0u32, 1, 2, 10, u32::MAX].map(|p| OwnedPartitionKey::new(*ns, *t, p)))
        .collect();
    let members = &member_sets()[1];
    let a = Assignment::compute(members, &keys, 0.0);
    assert_eq!(a.len(), keys.len());
    let mut held = 0;
    for k in &keys {
        let h = a.home(&k.as_key()).unwrap();
        assert!(a.iter().any(|(k2, h2)| k2 == k.as_key() && h2 == h));
        held += 1;
    }
    assert_eq!(held, keys.len());
    let stranger = PartitionKey {
        namespace: "a",
        topic: "t",
        partition: 3,
    };
    assert_eq!(a.home(&stranger), None);
    assert_eq!(a.load("stranger"), 0);
    let k = keys[7].as_key();
    assert_eq!(OwnedPartitionKey::from(k).as_key(), k);
}

/// Changing the order hash, the tie-break or the cap rule moves partitions
/// of a running mesh, and agents of two versions would disagree: pin them.
#[test]
fn bounded_homes_are_stable_across_builds() {
    // Four members, 24 partitions, no slack: the cap (6) binds.
    let members: Vec<Member> = (0..4)
        .map(|i| Member::broker(format!("agent-{i}")))
        .collect();
    let keys: Vec<OwnedPartitionKey> = (0..24)
        .map(|p| OwnedPartitionKey::new("default", format!("orders-{}", p % 4), p))
        .collect();
    let a = Assignment::compute(&members, &keys, 0.0);
    let plain = Assignment::compute(&members, &keys, f64::INFINITY);
    let digits = |a: &Assignment| -> String {
        keys.iter()
            .map(|k| a.home(&k.as_key()).unwrap().trim_start_matches("agent-"))
            .collect()
    };
    assert_eq!(
        digits(&a),
        PINNED_SMALL,
        "bounded homes changed: {}",
        digits(&a)
    );
    assert_eq!(
        digits(&plain),
        PINNED_SMALL_PLAIN,
        "plain homes changed: {}",
        digits(&plain)
    );
    assert_ne!(digits(&a), digits(&plain), "the cap binds here");
    // The 1,000-partition catalog on ten agents, default slack.
    let members: Vec<Member> = (0..10)
        .map(|i| Member::broker(format!("agent-{i}")))
        .collect();
    let a = Assignment::compute(&members, &catalog(1000), DEFAULT_LOAD_EPSILON);
    let f = fingerprint(&a);
    assert_eq!(f, PINNED_FINGERPRINT, "assignment changed: {f:#x}");
}

// Cross-checked with an independent implementation (Python) of the
// algorithm as the module doc states it.
const PINNED_SMALL: &str = "330013101301112232302202";
const PINNED_SMALL_PLAIN: &str = "230013101301112232202222";
const PINNED_FINGERPRINT: u64 = 0x72a2_1881_fad8_42b7;

/// 10,000 partitions on 50 members, as measured for the module doc:
/// `cargo nextest run -p shoal-cluster --release --run-ignored only timing --no-capture`.
#[test]
#[ignore = "a measurement; run it in release"]
fn timing_10k_partitions_50_members() {
    let keys = catalog(10_000);
    let members: Vec<Member> = (0..50)
        .map(|i| Member::broker(format!("shoal-{i:02}.orders-7d4b9c")))
        .collect();
    let mut times: Vec<std::time::Duration> = (0..10)
        .map(|_| {
            let t = std::time::Instant::now();
            let a = Assignment::compute(&members, &keys, DEFAULT_LOAD_EPSILON);
            let took = t.elapsed();
            assert_eq!(a.len(), 10_000);
            took
        })
        .collect();
    times.sort();
    let (best, median, worst) = (times[0], times[5], times[9]);
    println!("10,000 partitions x 50 members, 10 runs: best {best:?}, median {median:?}, worst {worst:?}");
    if !cfg!(debug_assertions) {
        assert!(median < std::time::Duration::from_millis(100), "{median:?}");
    }
}

/// How epsilon trades balance for movement, over 500 lists (the table in the
/// module doc): `cargo nextest run -p shoal-cluster --release --run-ignored only sweep --no-capture`.
#[test]
#[ignore = "a report; run it in release"]
fn sweep() {
    const LISTS: usize = 500;
    let keys = catalog(1000);
    let mut grown = keys.clone();
    grown.extend((0..8).map(|p| OwnedPartitionKey::new("default", "brand-new", p)));
    let lists = random_lists(LISTS);
    for eps in [0.05, 0.1, 0.15, 0.2, 0.25, f64::INFINITY] {
        let (mut busy_sum, mut busy_worst) = (0.0, 0.0f64);
        let (mut join_worst, mut join_over, mut join_moves, mut join_cascade) = (0, 0, 0, 0);
        let (mut leave_worst, mut leave_over, mut leave_moves, mut leave_cascade) = (0, 0, 0, 0);
        let (mut topic_sum, mut topic_worst) = (0, 0);
        for list in &lists {
            let members = &list[..10];
            let a = Assignment::compute(members, &keys, eps);
            let b = busiest(&a, members) as f64 / 100.0;
            busy_sum += b;
            busy_worst = busy_worst.max(b);
            let j = Assignment::compute(list, &keys, eps);
            let (m, c) = moves(&a, &j, &keys, &list[10].id);
            join_worst = join_worst.max(m);
            join_over += usize::from(m as f64 > 1.2 / 11.0 * 1000.0);
            join_moves += m;
            join_cascade += c;
            for gone in 0..10 {
                let mut left = members.to_vec();
                let g = left.remove(gone);
                let l = Assignment::compute(&left, &keys, eps);
                let (m, c) = moves(&a, &l, &keys, &g.id);
                leave_worst = leave_worst.max(m);
                leave_over += usize::from(m as f64 > 1.2 / 9.0 * 1000.0);
                leave_moves += m;
                leave_cascade += c;
            }
            let t = Assignment::compute(members, &grown, eps);
            let (m, _) = moves(&a, &t, &keys, "");
            topic_sum += m;
            topic_worst = topic_worst.max(m);
        }
        println!(
            "eps {eps}: busiest/mean mean {:.3} worst {busy_worst:.3} | join worst {:.3}/N, over 1.2/N {join_over}/{LISTS}, cascade {:.3} | leave worst {:.3}/N, over 1.2/N {leave_over}/{}, cascade {:.3} | new topic moves mean {:.2} worst {topic_worst}",
            busy_sum / LISTS as f64,
            join_worst as f64 * 11.0 / 1000.0,
            join_cascade as f64 / join_moves as f64,
            leave_worst as f64 * 9.0 / 1000.0,
            10 * LISTS,
            leave_cascade as f64 / leave_moves as f64,
            topic_sum as f64 / LISTS as f64,
        );
    }
}
