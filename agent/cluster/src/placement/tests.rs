//! Placement simulated by hand: balance, movement on join and leave, agreement.

use super::*;
use std::collections::HashMap;

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

/// Independent per-partition hashing is balls into bins: with 10 agents and
/// 1,000 partitions the busiest agent averages about 1.15x the mean and
/// reaches 1.38x for an unlucky list. The bound of 1.25x for every
/// list needs load-aware placement (bounded loads over the topic catalog),
/// which comes with the mesh; this test pins what plain rendezvous gives, so
/// a weaker hash or a placement bug fails it.
#[test]
fn balance_over_many_member_lists() {
    // 50 lists of 10 pseudo-random pod names.
    let keys = keys(1000);
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut worst = 0.0f64;
    let mut sum = 0.0f64;
    for _ in 0..50 {
        let members: Vec<Member> = (0..10)
            .map(|_| {
                seed = mix(seed.wrapping_add(0x9e37_79b9_7f4a_7c15));
                Member::broker(format!("app-{:x}-{:x}", seed >> 40, seed & 0xffff))
            })
            .collect();
        let mut load: HashMap<&str, usize> = HashMap::new();
        for h in homes(&members, &keys) {
            *load.entry(h).or_default() += 1;
        }
        assert_eq!(load.len(), members.len(), "every agent is home to some");
        let busiest = *load.values().max().unwrap_or(&0) as f64 / 100.0;
        worst = worst.max(busiest);
        sum += busiest;
    }
    let mean_busiest = sum / 50.0;
    println!("busiest/mean over 50 lists: mean {mean_busiest:.3}, worst {worst:.3}");
    assert!(
        mean_busiest <= 1.2,
        "mean busiest/mean over 50 lists: {mean_busiest}"
    );
    assert!(worst <= 1.4, "worst busiest/mean over 50 lists: {worst}");
}
