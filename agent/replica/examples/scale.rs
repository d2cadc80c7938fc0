//! Scale and idle cost of the replica core, measured sans-IO.
//!
//! ```sh
//! cargo run --release -p shoal-replica --example scale            # 1,000 agents x 10,000 partitions
//! cargo run --release -p shoal-replica --example scale -- --quick # 100 agents x 1,000 partitions
//! ```
//!
//! 1. Placement: replica sets as the top 3 of rendezvous hashing; replicas
//!    and preferred leaders per agent; what a join and a leave move, as a
//!    multiple of the ideal 1/N.
//! 2. The multi-raft drivers of every agent, in one process, messages
//!    passed by hand: leaders per agent after the first elections; batches
//!    and Raft messages per agent pair per heartbeat interval while every
//!    group is awake, then once the groups hibernate; driver CPU per tick.
//! 3. Idle cost: 3 agents holding 1,000 groups each (every group on all
//!    three), hibernated, for 60 simulated seconds: CPU and memory of the
//!    drivers alone (not a whole agent).
#![allow(clippy::unwrap_used, clippy::expect_used)] // A benchmark stops on what it does not expect.

use shoal_cluster::placement::{replicas, Member, PartitionKey};
use shoal_replica::command::Command;
use shoal_replica::store::MemStore;
use shoal_replica::{node_id, Bootstrap, Driver, DriverConfig, GroupId, NodeId};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Instant;

const R: usize = 3;

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn cpu_seconds() -> f64 {
    // utime + stime of this process, in clock ticks (100 per second on Linux).
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            let ut: f64 = f.get(11)?.parse().ok()?;
            let st: f64 = f.get(12)?.parse().ok()?;
            Some((ut + st) / 100.0)
        })
        .unwrap_or(0.0)
}

fn keys(partitions: usize) -> Vec<(String, u32)> {
    (0..partitions)
        .map(|p| (format!("topic-{}", p / 100), (p % 100) as u32))
        .collect()
}

fn placement(members: &[Member], keys: &[(String, u32)]) -> Vec<Vec<String>> {
    keys.iter()
        .map(|(topic, partition)| {
            let key = PartitionKey {
                namespace: "bench",
                topic,
                partition: *partition,
            };
            replicas(members, &key, R)
                .into_iter()
                .map(|m| m.id.clone())
                .collect()
        })
        .collect()
}

fn max_mean(counts: &HashMap<String, usize>, n: usize) -> (usize, f64) {
    let max = counts.values().copied().max().unwrap_or(0);
    let total: usize = counts.values().sum();
    (max, total as f64 / n as f64)
}

fn moved(before: &[Vec<String>], after: &[Vec<String>]) -> usize {
    before
        .iter()
        .zip(after)
        .map(|(b, a)| {
            let b: BTreeSet<&String> = b.iter().collect();
            a.iter().filter(|m| !b.contains(m)).count()
        })
        .sum()
}

fn part_placement(agents: usize, partitions: usize) -> Vec<Vec<String>> {
    let names: Vec<String> = (0..agents).map(|i| format!("agent-{i:04}")).collect();
    let members: Vec<Member> = names.iter().map(|n| Member::broker(n.clone())).collect();
    let keys = keys(partitions);
    let sets = placement(&members, &keys);
    let mut per_agent: HashMap<String, usize> = HashMap::new();
    let mut leaders: HashMap<String, usize> = HashMap::new();
    for set in &sets {
        for m in set {
            *per_agent.entry(m.clone()).or_default() += 1;
        }
        *leaders.entry(set[0].clone()).or_default() += 1;
    }
    let (rmax, rmean) = max_mean(&per_agent, agents);
    let (lmax, lmean) = max_mean(&leaders, agents);
    println!("## Placement: {agents} agents x {partitions} partitions x R={R}");
    println!(
        "replicas per agent: max {rmax}, mean {rmean:.1} ({:.2}x)",
        rmax as f64 / rmean
    );
    println!(
        "preferred leaders (first replica) per agent: max {lmax}, mean {lmean:.1} ({:.2}x)",
        lmax as f64 / lmean
    );
    let total = (partitions * R) as f64;
    let mut joined = members.clone();
    joined.push(Member::broker(format!("agent-{agents:04}")));
    let after_join = placement(&joined, &keys);
    let m = moved(&sets, &after_join);
    println!(
        "a join moves {m} replicas: {:.3} of all, {:.2}/N (N = {})",
        m as f64 / total,
        m as f64 / total * (agents + 1) as f64,
        agents + 1
    );
    let left: Vec<Member> = members[1..].to_vec();
    let after_leave = placement(&left, &keys);
    let m = moved(&sets, &after_leave);
    println!(
        "a leave moves {m} replicas: {:.3} of all, {:.2}/N (N = {agents})",
        m as f64 / total,
        m as f64 / total * agents as f64
    );
    sets
}

struct Cluster {
    drivers: BTreeMap<NodeId, Driver<MemStore>>,
}

impl Cluster {
    /// One round: tick (optionally), process, deliver. Returns (batches,
    /// messages, ordered pairs that exchanged a batch).
    fn round(&mut self, tick: bool) -> (u64, u64, usize) {
        let mut mail = Vec::new();
        for (id, d) in self.drivers.iter_mut() {
            if tick {
                d.tick();
            }
            for (to, batch) in d.process() {
                mail.push((*id, to, batch));
            }
            d.take_events();
        }
        let batches = mail.len() as u64;
        let messages = mail
            .iter()
            .map(|(_, _, b)| {
                b.groups
                    .iter()
                    .map(|g| g.messages.len() as u64)
                    .sum::<u64>()
            })
            .sum();
        let pairs: BTreeSet<(NodeId, NodeId)> = mail.iter().map(|(f, t, _)| (*f, *t)).collect();
        for (from, to, batch) in mail {
            if let Some(d) = self.drivers.get_mut(&to) {
                d.step(from, batch);
            }
        }
        (batches, messages, pairs.len())
    }
}

fn build(sets: &[Vec<String>], config: &DriverConfig) -> (Cluster, Vec<GroupId>) {
    let mut drivers: BTreeMap<NodeId, Driver<MemStore>> = BTreeMap::new();
    let keys = keys(sets.len());
    let mut groups = Vec::new();
    for ((topic, partition), set) in keys.iter().zip(sets) {
        let g = GroupId {
            namespace: "bench".into(),
            topic: topic.clone(),
            partition: *partition,
        };
        let voters: Vec<NodeId> = set.iter().map(|n| node_id(n)).collect();
        for v in &voters {
            let d = drivers.entry(*v).or_insert_with(|| {
                Driver::new(*v, config.clone(), Box::new(|_| Ok(MemStore::new())))
            });
            d.open_group(
                g.clone(),
                MemStore::new(),
                Bootstrap::Voters(voters.clone()),
            )
            .unwrap();
        }
        groups.push(g);
    }
    (Cluster { drivers }, groups)
}

fn part_drivers(sets: &[Vec<String>]) {
    let config = DriverConfig::default();
    let (mut cluster, groups) = build(sets, &config);
    let agents = cluster.drivers.len();
    println!(
        "\n## Drivers: {agents} agents, {} groups x R={R} in one process",
        groups.len()
    );
    // First elections: a few election timeouts.
    for _ in 0..(4 * config.election_ticks) {
        cluster.round(true);
        cluster.round(false);
    }
    let mut leaders: HashMap<NodeId, usize> = HashMap::new();
    let mut leaderless = 0;
    for g in &groups {
        match cluster
            .drivers
            .values()
            .find_map(|d| d.status(g).filter(|s| s.serving).map(|_| d.me()))
        {
            Some(l) => *leaders.entry(l).or_default() += 1,
            None => leaderless += 1,
        }
    }
    let max = leaders.values().copied().max().unwrap_or(0);
    let mean = groups.len() as f64 / agents as f64;
    println!(
        "leaders per agent after the first elections: max {max}, mean {mean:.1} ({:.2}x); {leaderless} groups without one",
        max as f64 / mean
    );
    // A heartbeat interval with every group awake: propose one entry per
    // group to wake them all, settle, then count.
    let mut token = 0;
    for g in &groups {
        for d in cluster.drivers.values_mut() {
            if d.status(g).is_some_and(|s| s.serving) {
                token += 1;
                let data = Command::Message {
                    timestamp_ms: 1,
                    id: None,
                    body: b"x",
                }
                .encode()
                .unwrap();
                let _ = d.propose(g, token, data);
            }
        }
    }
    for _ in 0..3 {
        cluster.round(false);
    }
    let (mut batches, mut messages, mut pairs) = (0, 0, 0);
    let t = Instant::now();
    let cpu = cpu_seconds();
    // A heartbeat round and the answers' round.
    for _ in 0..config.heartbeat_ticks {
        let (b, m, p) = cluster.round(true);
        let (b2, m2, p2) = cluster.round(false);
        batches += b + b2;
        messages += m + m2;
        pairs += p + p2;
    }
    let awake_cpu = (cpu_seconds() - cpu) / config.heartbeat_ticks as f64;
    let awake_wall = t.elapsed().as_secs_f64() / config.heartbeat_ticks as f64;
    println!(
        "awake, one heartbeat interval ({} tick(s)): {batches} batches carrying {messages} Raft messages; {:.2} batches per ordered agent pair that talks, {:.1} messages per batch",
        config.heartbeat_ticks,
        batches as f64 / pairs.max(1) as f64,
        messages as f64 / batches.max(1) as f64
    );
    println!(
        "driver work per tick, all groups awake: {:.1} ms CPU for all {agents} agents ({:.3} ms per agent; wall {:.1} ms)",
        awake_cpu * 1e3,
        awake_cpu * 1e3 / agents as f64,
        awake_wall * 1e3
    );
    for _ in 0..(config.hibernate_after_ticks + 10) {
        cluster.round(true);
        cluster.round(false);
    }
    let hibernating: usize = cluster.drivers.values().map(|d| d.hibernating()).sum();
    let (mut batches, mut messages) = (0, 0);
    let cpu = cpu_seconds();
    let ticks = 10 * config.heartbeat_ticks;
    for _ in 0..ticks {
        let (b, m, _) = cluster.round(true);
        batches += b;
        messages += m;
    }
    let idle_cpu = (cpu_seconds() - cpu) / ticks as f64;
    println!(
        "hibernating replicas: {hibernating} of {}; then {ticks} ticks: {batches} batches, {messages} messages; {:.3} ms CPU per tick for all agents",
        groups.len() * R,
        idle_cpu * 1e3
    );
}

fn part_idle() {
    let config = DriverConfig::default();
    let names = ["agent-1", "agent-2", "agent-3"];
    let sets: Vec<Vec<String>> = (0..1000)
        .map(|_| names.iter().map(|n| n.to_string()).collect())
        .collect();
    let rss0 = rss_kib();
    let (mut cluster, groups) = build(&sets, &config);
    for _ in 0..(4 * config.election_ticks + config.hibernate_after_ticks as usize + 20) {
        cluster.round(true);
        cluster.round(false);
    }
    let rss = rss_kib() - rss0;
    let hibernating: usize = cluster.drivers.values().map(|d| d.hibernating()).sum();
    let minute_ticks = 60_000 / config.tick_ms;
    let cpu = cpu_seconds();
    let t = Instant::now();
    let mut batches = 0;
    for _ in 0..minute_ticks {
        batches += cluster.round(true).0;
    }
    let cpu = cpu_seconds() - cpu;
    println!(
        "\n## Idle: 3 agents x {} groups (each on all three), {hibernating} of {} replicas hibernating",
        groups.len(),
        groups.len() * 3
    );
    println!(
        "60 simulated seconds ({minute_ticks} ticks): {batches} batches, {cpu:.3} s CPU for the 3 drivers ({:.4} % of a core per agent), wall {:.2} s",
        cpu / 3.0 / 60.0 * 100.0,
        t.elapsed().as_secs_f64()
    );
    println!(
        "memory of the 3 drivers: {:.1} MiB ({:.1} MiB per agent)",
        rss as f64 / 1024.0,
        rss as f64 / 1024.0 / 3.0
    );
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let (agents, partitions) = if quick { (100, 1_000) } else { (1_000, 10_000) };
    // Idle first: memory the allocator keeps from a larger part would hide
    // what the idle drivers take.
    part_idle();
    let sets = part_placement(agents, partitions);
    part_drivers(&sets);
}
