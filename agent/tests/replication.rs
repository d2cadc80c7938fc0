//! Replicated partitions with real processes: three `shoal-agent --dev`
//! processes on loopback hold a topic with `replicas: 3`; an agent is killed
//! with SIGKILL, stopped with SIGTERM, or replaced by a new one under a new
//! name (its data thrown away) while a publisher keeps publishing, and a
//! checker then reads everything back: every acknowledged message is there,
//! at the partition and offset its publisher was told, in order per key.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use serde_json::{json, Value};
use shoal_agent::client::AgentClient;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

const TOPIC: &str = "orders";
const PARTITIONS: u64 = 4;
/// How long a test publisher retries one message (with its `Shoal-Id`)
/// before it counts it as not acknowledged.
const PUBLISH_PATIENCE: Duration = Duration::from_secs(20);

struct Node {
    name: String,
    agent: MeshAgent,
}

async fn cluster(c: &AgentClient) -> Option<Value> {
    let r = c.get("/v1/cluster").await.ok()?;
    (r.status == 200).then(|| r.json())
}

/// Starts `n` agents; agent-1 (no --join) creates the mesh's meta group.
async fn mesh_of(root: &Path, n: usize, extra: &[&str]) -> Vec<Node> {
    let seed = free_udp_port();
    let mut nodes = Vec::new();
    for i in 1..=n {
        let name = format!("agent-{i}");
        let join = (i > 1).then_some(seed);
        let port = if i == 1 { seed } else { free_udp_port() };
        nodes.push(Node {
            agent: start_mesh_agent(root, "ca", &name, port, join, extra),
            name,
        });
    }
    // Patient: the test runner starts many agents at once on two cores.
    let deadline = Instant::now() + Duration::from_secs(60);
    for node in &nodes {
        loop {
            let formed = cluster(&node.agent.client).await.is_some_and(|v| {
                let m = v["members"].as_array().cloned().unwrap_or_default();
                m.len() == n && m.iter().all(|m| m["state"] == "alive")
            });
            if formed {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not see all {n} agents alive within 60 s",
                node.name
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    nodes
}

/// Partition → (leader, voters), as each group's leader reports it.
async fn leaders(nodes: &[&Node]) -> BTreeMap<u64, (String, BTreeSet<String>)> {
    let mut out = BTreeMap::new();
    for node in nodes {
        let Some(v) = cluster(&node.agent.client).await else {
            continue;
        };
        for g in v["replicated"].as_array().into_iter().flatten() {
            if g["topic"] == TOPIC
                && g["leader"].as_str() == Some(node.name.as_str())
                && g["learners"].as_array().is_some_and(|l| l.is_empty())
            {
                let voters = g["voters"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect();
                out.insert(
                    g["partition"].as_u64().unwrap(),
                    (node.name.clone(), voters),
                );
            }
        }
    }
    out
}

/// Waits until every partition has a leader with exactly `voters`.
async fn formed(nodes: &[&Node], voters: &[&str]) -> BTreeMap<u64, (String, BTreeSet<String>)> {
    let want: BTreeSet<String> = voters.iter().map(|v| v.to_string()).collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let l = leaders(nodes).await;
        if l.len() as u64 == PARTITIONS && l.values().all(|(_, v)| *v == want) {
            return l;
        }
        assert!(
            Instant::now() < deadline,
            "the groups of {TOPIC} did not form with voters {want:?} within 60 s: {l:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A message the publisher was told is stored.
#[derive(Debug, Clone)]
struct Acked {
    id: String,
    key: String,
    body: String,
    partition: u64,
    offset: u64,
}

/// Publishes messages `range` through `c`, each keyed (eight keys) and with
/// a `Shoal-Id`, retrying a 503 as an app would (same id) for up to
/// [`PUBLISH_PATIENCE`]. Returns the acknowledged ones and the longest time
/// one publish took.
async fn publish_range(c: &AgentClient, range: std::ops::Range<usize>) -> (Vec<Acked>, Duration) {
    let mut acked = Vec::new();
    let mut slowest = Duration::ZERO;
    for i in range {
        let id = format!("id-{i}");
        let key = format!("k{}", i % 8);
        let body = format!("m-{i}");
        let started = Instant::now();
        loop {
            let r = c
                .publish(
                    TOPIC,
                    &[("shoal-key", &key), ("shoal-id", &id)],
                    body.clone(),
                )
                .await;
            match r {
                Ok(r) if r.status == 201 || r.status == 200 => {
                    let v = r.json();
                    acked.push(Acked {
                        id: id.clone(),
                        key: key.clone(),
                        body: body.clone(),
                        partition: v["partition"].as_u64().unwrap(),
                        offset: v["offset"].as_u64().unwrap(),
                    });
                    break;
                }
                Ok(r) if r.status == 503 || r.status == 504 => {}
                Ok(r) => panic!("publish {id}: {} {}", r.status, r.text()),
                Err(_) => {}
            }
            assert!(
                started.elapsed() < PUBLISH_PATIENCE,
                "publish {id} got no acknowledgement within {PUBLISH_PATIENCE:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        slowest = slowest.max(started.elapsed());
    }
    (acked, slowest)
}

/// Reads the whole topic back through `c` with a new consumer group and
/// checks it against what was acknowledged: every acked message present at
/// its partition and offset with its body; offsets ascending per partition
/// (so order per key); returns how many duplicates were delivered.
async fn check_read_back(c: &AgentClient, group: &str, acked: &[Acked]) -> usize {
    put_sub(
        c,
        group,
        json!({"topic": TOPIC, "group": group, "start": "earliest"}),
    )
    .await;
    let want: BTreeMap<&str, &Acked> = acked.iter().map(|a| (a.id.as_str(), a)).collect();
    let mut seen: BTreeMap<String, (u64, u64, String)> = BTreeMap::new();
    let mut last_offset: BTreeMap<u64, u64> = BTreeMap::new();
    let mut duplicates = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while want.keys().any(|id| !seen.contains_key(*id)) {
        assert!(
            Instant::now() < deadline,
            "read back {} of {} acknowledged messages within 60 s; missing: {:?}",
            want.keys().filter(|id| seen.contains_key(**id)).count(),
            want.len(),
            want.keys()
                .filter(|id| !seen.contains_key(**id))
                .take(20)
                .collect::<Vec<_>>()
        );
        let r = c
            .get(&format!(
                "/v1/subscriptions/{group}/messages?max=500&wait=1s"
            ))
            .await;
        let events = match r {
            Ok(r) if r.status == 200 => match r.json() {
                Value::Array(a) => a,
                _ => Vec::new(),
            },
            _ => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        if events.is_empty() {
            continue;
        }
        for e in &events {
            let (p, o) = position(e);
            let id = e["id"].as_str().unwrap().to_string();
            if seen.insert(id.clone(), (p, o, text_of(e))).is_some() {
                duplicates += 1;
                continue;
            }
            if let Some(prev) = last_offset.insert(p, o) {
                assert!(
                    o > prev,
                    "partition {p} delivered offset {o} after {prev}: order broken"
                );
            }
        }
        let ids: Vec<String> = events.iter().map(ackid).collect();
        let _ = c
            .post_json(
                &format!("/v1/subscriptions/{group}/acks"),
                &json!({ "ack": ids }),
            )
            .await;
    }
    for a in acked {
        let (p, o, body) = &seen[&a.id];
        assert_eq!(
            (*p, *o, body.as_str()),
            (a.partition, a.offset, a.body.as_str()),
            "message {} (key {}) was acknowledged at {}/{} with {:?}",
            a.id,
            a.key,
            a.partition,
            a.offset,
            a.body
        );
    }
    duplicates
}

/// The agent leading the most partitions among `candidates`.
fn busiest_leader(l: &BTreeMap<u64, (String, BTreeSet<String>)>, candidates: &[&str]) -> String {
    let mut count: BTreeMap<&str, usize> = BTreeMap::new();
    for (leader, _) in l.values() {
        if candidates.contains(&leader.as_str()) {
            *count.entry(leader.as_str()).or_default() += 1;
        }
    }
    count
        .into_iter()
        .max_by_key(|(_, n)| *n)
        .map(|(n, _)| n.to_string())
        .unwrap_or_else(|| candidates[0].to_string())
}

async fn create_topic(c: &AgentClient) {
    let r = put_topic(c, TOPIC, json!({"partitions": PARTITIONS, "replicas": 3})).await;
    assert!(
        r.status == 201 || r.status == 200,
        "create {TOPIC}: {}",
        r.text()
    );
}

#[tokio::test]
async fn kill_9_of_a_leader_loses_no_acknowledged_message() {
    let root = tempdir();
    let mut nodes = mesh_of(root.path(), 3, &[]).await;
    create_topic(&nodes[0].agent.client).await;
    let all: Vec<&Node> = nodes.iter().collect();
    let l = formed(&all, &["agent-1", "agent-2", "agent-3"]).await;
    // Kill the busiest leader other than the publisher's agent (agent-3).
    let victim = busiest_leader(&l, &["agent-1", "agent-2"]);
    let (mut acked, _) = publish_range(&nodes[2].agent.client, 0..150).await;
    let v = nodes.iter_mut().find(|n| n.name == victim).unwrap();
    v.agent.child.kill().unwrap();
    v.agent.child.wait().unwrap();
    let (more, slowest) = publish_range(&nodes[2].agent.client, 150..300).await;
    acked.extend(more);
    eprintln!("kill -9 of {victim}: longest publish after the kill {slowest:?}");
    let survivor = nodes
        .iter()
        .find(|n| n.name != victim && n.name != "agent-3")
        .unwrap();
    let dups = check_read_back(&survivor.agent.client, "checker", &acked).await;
    eprintln!(
        "read back {} acknowledged messages, {dups} duplicates",
        acked.len()
    );
    let m = metrics(&nodes[2].agent.admin).await;
    assert!(
        metric_value(&m, "shoal_replica_leader_changes_total").unwrap_or(0.0) > 0.0,
        "leader changes are counted"
    );
}

#[tokio::test]
async fn a_graceful_stop_hands_leadership_over_and_loses_nothing() {
    let root = tempdir();
    let nodes = mesh_of(root.path(), 3, &[]).await;
    create_topic(&nodes[0].agent.client).await;
    let all: Vec<&Node> = nodes.iter().collect();
    let l = formed(&all, &["agent-1", "agent-2", "agent-3"]).await;
    let victim = busiest_leader(&l, &["agent-1", "agent-2"]);
    let (mut acked, _) = publish_range(&nodes[2].agent.client, 0..100).await;
    let v = nodes.iter().find(|n| n.name == victim).unwrap();
    std::process::Command::new("kill")
        .args(["-TERM", &v.agent.child.id().to_string()])
        .status()
        .unwrap();
    let (more, slowest) = publish_range(&nodes[2].agent.client, 100..200).await;
    acked.extend(more);
    eprintln!("SIGTERM of {victim}: longest publish after it {slowest:?}");
    let dups = check_read_back(&nodes[2].agent.client, "checker", &acked).await;
    eprintln!(
        "read back {} acknowledged messages, {dups} duplicates",
        acked.len()
    );
}

#[tokio::test]
async fn a_replaced_agent_is_replaced_in_every_group_and_nothing_is_lost() {
    let root = tempdir();
    let extra = ["--replace-after", "2s"];
    let mut nodes = mesh_of(root.path(), 3, &extra).await;
    create_topic(&nodes[0].agent.client).await;
    {
        let all: Vec<&Node> = nodes.iter().collect();
        formed(&all, &["agent-1", "agent-2", "agent-3"]).await;
    }
    let (mut acked, _) = publish_range(&nodes[0].agent.client, 0..100).await;
    // The pod dies with its emptyDir; a new pod comes under a new name.
    let gone = nodes.remove(2);
    drop(gone);
    std::fs::remove_dir_all(root.path().join("agent-3")).unwrap();
    let seed_port = {
        let v = cluster(&nodes[0].agent.client).await.unwrap();
        v["addr"]
            .as_str()
            .unwrap()
            .rsplit(':')
            .next()
            .unwrap()
            .parse::<u16>()
            .unwrap()
    };
    nodes.push(Node {
        agent: start_mesh_agent(
            root.path(),
            "ca",
            "agent-4",
            free_udp_port(),
            Some(seed_port),
            &extra,
        ),
        name: "agent-4".into(),
    });
    let (more, _) = publish_range(&nodes[1].agent.client, 100..200).await;
    acked.extend(more);
    let all: Vec<&Node> = nodes.iter().collect();
    formed(&all, &["agent-1", "agent-2", "agent-4"]).await;
    // The new agent holds every partition: a read through it, after the
    // two agents that had the data from the start are gone, finds it all.
    let (more, _) = publish_range(&nodes[2].agent.client, 200..250).await;
    acked.extend(more);
    let m = metrics(&nodes[0].agent.admin).await;
    assert_eq!(
        metric_value(&m, "shoal_replica_under_replicated"),
        Some(0.0),
        "no partition led by agent-1 is under-replicated once agent-4 holds its replicas"
    );
    let dups = check_read_back(&nodes[2].agent.client, "checker", &acked).await;
    eprintln!(
        "read back {} acknowledged messages, {dups} duplicates",
        acked.len()
    );
}
