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
    mesh_port: u16,
}

impl Node {
    fn signal(&self, sig: &str) {
        let ok = std::process::Command::new("kill")
            .args([sig, &self.agent.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig} {}", self.name);
    }
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
            mesh_port: port,
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

/// Waits until every replica of the test topic on `nodes` applies `fsync`
/// (the agent brings its replicas in line with the topic's policy once a
/// second).
async fn wait_fsync(nodes: &[Node], fsync: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut seen = BTreeSet::new();
        for n in nodes {
            if let Some(c) = cluster(&n.agent.client).await {
                for g in c["replicated"].as_array().into_iter().flatten() {
                    if g["topic"] == TOPIC {
                        seen.insert(g["fsync"].as_str().unwrap_or("?").to_string());
                    }
                }
            }
        }
        if seen.len() == 1 && seen.contains(fsync) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the replicas of {TOPIC} did not all apply fsync {fsync} within 20 s: {seen:?}"
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
    let clients: Clients = std::sync::Arc::new(std::sync::Mutex::new(vec![c.clone()]));
    let mut acked = Vec::new();
    let mut slowest = Duration::ZERO;
    let mut at = 0;
    for i in range {
        let (a, took) = publish_until_acked(&clients, &mut at, i).await;
        acked.push(a);
        slowest = slowest.max(took);
    }
    (acked, slowest)
}

/// Publishes message `i` (key `k{i % 8}`, `Shoal-Id` `id-{i}`) through the
/// agents of `clients`, starting at `at`, until one acknowledges it: a 503
/// is tried again (same id), an agent that does not answer is left for the
/// next one. Fails after [`PUBLISH_PATIENCE`].
async fn publish_until_acked(clients: &Clients, at: &mut usize, i: usize) -> (Acked, Duration) {
    let id = format!("id-{i}");
    let key = format!("k{}", i % 8);
    let body = format!("m-{i}");
    let started = Instant::now();
    loop {
        let c = {
            let list = clients.lock().unwrap();
            list[*at % list.len()].clone()
        };
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
                let acked = Acked {
                    id,
                    key,
                    body,
                    partition: v["partition"].as_u64().unwrap(),
                    offset: v["offset"].as_u64().unwrap(),
                };
                return (acked, started.elapsed());
            }
            Ok(r) if r.status == 503 || r.status == 504 => {}
            Ok(r) => panic!("publish {id}: {} {}", r.status, r.text()),
            // This agent is down (stopped, restarting): use another.
            Err(_) => *at += 1,
        }
        assert!(
            started.elapsed() < PUBLISH_PATIENCE,
            "publish {id} got no acknowledgement within {PUBLISH_PATIENCE:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
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

/// Partition → (leader, voters) of the test topic.
type Leaders = BTreeMap<u64, (String, BTreeSet<String>)>;

/// Three agents with the test topic, every group formed on all three; the
/// leaders then.
async fn formed_mesh(root: &Path) -> (Vec<Node>, Leaders) {
    formed_mesh_with(root, "interval").await
}

/// [`formed_mesh`] with the topic's fsync policy given.
async fn formed_mesh_with(root: &Path, fsync: &str) -> (Vec<Node>, Leaders) {
    let nodes = mesh_of(root, 3, &[]).await;
    create_topic_with(&nodes[0].agent.client, fsync).await;
    let all: Vec<&Node> = nodes.iter().collect();
    let l = formed(&all, &["agent-1", "agent-2", "agent-3"]).await;
    (nodes, l)
}

/// The agent to hurt: the busiest leader other than agent-3 (which the
/// tests publish through).
fn victim_of<'a>(nodes: &'a [Node], l: &Leaders) -> &'a Node {
    let name = busiest_leader(l, &["agent-1", "agent-2"]);
    nodes.iter().find(|n| n.name == name).unwrap()
}

async fn create_topic(c: &AgentClient) {
    create_topic_with(c, "interval").await;
}

/// The test topic, R=3, with `fsync` as its policy (`interval`, the default,
/// acknowledges entries written to a majority's OS; `always`, fsynced there).
async fn create_topic_with(c: &AgentClient, fsync: &str) {
    let r = put_topic(
        c,
        TOPIC,
        json!({"partitions": PARTITIONS, "replicas": 3, "fsync": fsync}),
    )
    .await;
    assert!(
        r.status == 201 || r.status == 200,
        "create {TOPIC}: {}",
        r.text()
    );
}

#[tokio::test]
async fn kill_9_of_a_leader_loses_no_acknowledged_message() {
    let root = tempdir();
    let (mut nodes, l) = formed_mesh(root.path()).await;
    wait_fsync(&nodes, "interval").await;
    // Kill the busiest leader other than the publisher's agent (agent-3).
    let victim = victim_of(&nodes, &l).name.clone();
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
    // The other tests run the default policy (`interval`); this one fsyncs.
    let (nodes, l) = formed_mesh_with(root.path(), "always").await;
    wait_fsync(&nodes, "always").await;
    let v = victim_of(&nodes, &l);
    let victim = v.name.clone();
    let (mut acked, _) = publish_range(&nodes[2].agent.client, 0..100).await;
    v.signal("-TERM");
    let (more, slowest) = publish_range(&nodes[2].agent.client, 100..200).await;
    acked.extend(more);
    eprintln!("SIGTERM of {victim}: longest publish after it {slowest:?}");
    let dups = check_read_back(&nodes[2].agent.client, "checker", &acked).await;
    eprintln!(
        "read back {} acknowledged messages, {dups} duplicates",
        acked.len()
    );
}

/// Agents replaced after 2 s down, for the tests of a replaced pod.
const REPLACE_QUICKLY: [&str; 2] = ["--replace-after", "2s"];

/// A mesh of three whose agents replace a lost one after 2 s, with the
/// test topic's groups formed on all three.
async fn formed_replaceable_mesh(root: &Path) -> Vec<Node> {
    let nodes = mesh_of(root, 3, &REPLACE_QUICKLY).await;
    create_topic(&nodes[0].agent.client).await;
    let all: Vec<&Node> = nodes.iter().collect();
    formed(&all, &["agent-1", "agent-2", "agent-3"]).await;
    nodes
}

/// The pod of agent-3 dies with its emptyDir; a new pod comes under a new
/// name, agent-4, joining agent-1.
fn replace_agent_3(root: &Path, nodes: &mut Vec<Node>) {
    let gone = nodes.remove(2);
    drop(gone);
    std::fs::remove_dir_all(root.join("agent-3")).unwrap();
    let port4 = free_udp_port();
    let seed = Some(nodes[0].mesh_port);
    nodes.push(Node {
        agent: start_mesh_agent(root, "ca", "agent-4", port4, seed, &REPLACE_QUICKLY),
        name: "agent-4".into(),
        mesh_port: port4,
    });
}

#[tokio::test]
async fn a_replaced_agent_is_replaced_in_every_group_and_nothing_is_lost() {
    let root = tempdir();
    let mut nodes = formed_replaceable_mesh(root.path()).await;
    let (mut acked, _) = publish_range(&nodes[0].agent.client, 0..100).await;
    replace_agent_3(root.path(), &mut nodes);
    let (more, _) = publish_range(&nodes[1].agent.client, 100..200).await;
    acked.extend(more);
    let all: Vec<&Node> = nodes.iter().collect();
    formed(&all, &["agent-1", "agent-2", "agent-4"]).await;
    // The new agent holds every partition and takes publishes; a read
    // through it finds every message, those from before it existed too.
    let (more, _) = publish_range(&nodes[2].agent.client, 200..250).await;
    acked.extend(more);
    // The gauge is refreshed every second by each leader.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let mut under = 0.0;
        for n in &nodes {
            let m = metrics(&n.agent.admin).await;
            under += metric_value(&m, "shoal_replica_under_replicated").unwrap_or(-1.0);
        }
        if under == 0.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "partitions still under-replicated (summed over the leaders: {under}) once agent-4 holds its replicas"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let dups = check_read_back(&nodes[2].agent.client, "checker", &acked).await;
    eprintln!(
        "read back {} acknowledged messages, {dups} duplicates",
        acked.len()
    );
}

/// A steady publisher: publishes through `clients` (moving to the next one
/// when its agent does not answer) until stopped, at most 5,000 messages.
struct Load {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<(Vec<Acked>, Duration)>,
}

/// The agents a [`Load`] publishes through; a restarted agent's client
/// (a new app port) replaces its old one.
type Clients = std::sync::Arc<std::sync::Mutex<Vec<AgentClient>>>;

fn start_load(clients: Clients, first: usize) -> Load {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop.clone();
    let task = tokio::spawn(async move {
        let mut acked = Vec::new();
        let mut slowest = Duration::ZERO;
        let mut at = 0usize;
        for i in first..first + 5_000 {
            if flag.load(std::sync::atomic::Ordering::Relaxed) {
                break;
            }
            let (a, took) = publish_until_acked(&clients, &mut at, i).await;
            acked.push(a);
            slowest = slowest.max(took);
        }
        (acked, slowest)
    });
    Load { stop, task }
}

impl Load {
    async fn finish(self) -> (Vec<Acked>, Duration) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.task.await.unwrap()
    }
}

#[tokio::test]
async fn a_leader_paused_for_10_s_with_sigstop_loses_nothing() {
    let root = tempdir();
    let (nodes, l) = formed_mesh(root.path()).await;
    let all: Vec<&Node> = nodes.iter().collect();
    let victim = victim_of(&nodes, &l);
    let load = start_load(
        std::sync::Arc::new(std::sync::Mutex::new(vec![nodes[2].agent.client.clone()])),
        0,
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    victim.signal("-STOP");
    tokio::time::sleep(Duration::from_secs(10)).await;
    victim.signal("-CONT");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (acked, slowest) = load.finish().await;
    eprintln!(
        "SIGSTOP of {} for 10 s: {} acknowledged, longest publish {slowest:?}",
        victim.name,
        acked.len()
    );
    formed(&all, &["agent-1", "agent-2", "agent-3"]).await;
    let dups = check_read_back(&victim.agent.client, "checker", &acked).await;
    eprintln!(
        "read back {} acknowledged messages, {dups} duplicates",
        acked.len()
    );
}

#[tokio::test]
async fn a_rolling_restart_of_every_agent_loses_nothing() {
    let root = tempdir();
    let mut nodes = mesh_of(root.path(), 3, &[]).await;
    create_topic(&nodes[0].agent.client).await;
    {
        let all: Vec<&Node> = nodes.iter().collect();
        formed(&all, &["agent-1", "agent-2", "agent-3"]).await;
    }
    let clients: Clients = std::sync::Arc::new(std::sync::Mutex::new(
        nodes.iter().map(|n| n.agent.client.clone()).collect(),
    ));
    let load = start_load(clients.clone(), 0);
    let seed = nodes[0].mesh_port;
    for i in 0..nodes.len() {
        tokio::time::sleep(Duration::from_secs(1)).await;
        nodes[i].signal("-TERM");
        let (name, port) = (nodes[i].name.clone(), nodes[i].mesh_port);
        let deadline = Instant::now() + Duration::from_secs(30);
        while nodes[i].agent.child.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "{name} did not stop within 30 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let join = (i > 0).then_some(seed);
        // Same name, address and data: a pod's container restarted.
        nodes[i].agent = start_mesh_agent(root.path(), "ca", &name, port, join, &[]);
        clients.lock().unwrap()[i] = nodes[i].agent.client.clone();
        // The restarted agent's client is a new one on a new app port.
        let all: Vec<&Node> = nodes.iter().collect();
        formed(&all, &["agent-1", "agent-2", "agent-3"]).await;
        eprintln!("{name} restarted; every group has its three voters again");
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (acked, slowest) = load.finish().await;
    eprintln!(
        "rolling restart: {} acknowledged, longest publish {slowest:?}",
        acked.len()
    );
    let dups = check_read_back(&nodes[1].agent.client, "checker", &acked).await;
    eprintln!(
        "read back {} acknowledged messages, {dups} duplicates",
        acked.len()
    );
}

/// The directory of partition `p`'s replica on `node`.
fn replica_dir(root: &Path, node: &str, p: u64) -> std::path::PathBuf {
    root.join(node)
        .join("replicas/default")
        .join(TOPIC)
        .join(p.to_string())
}

/// The one segment file of partition `p`'s replica on `node`.
fn segment_of(root: &Path, node: &str, p: u64) -> std::path::PathBuf {
    let dir = replica_dir(root, node, p);
    let mut logs: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    logs.sort();
    logs.pop()
        .unwrap_or_else(|| panic!("no segment in {}", dir.display()))
}

#[tokio::test]
async fn a_flipped_byte_in_a_followers_segment_then_its_crash_loses_nothing() {
    let root = tempdir();
    let mut nodes = mesh_of(root.path(), 3, &[]).await;
    create_topic(&nodes[0].agent.client).await;
    let l = {
        let all: Vec<&Node> = nodes.iter().collect();
        formed(&all, &["agent-1", "agent-2", "agent-3"]).await
    };
    let (mut acked, _) = publish_range(&nodes[0].agent.client, 0..200).await;
    let (leader, voters) = l[&0].clone();
    let follower = voters.iter().find(|v| **v != leader).unwrap().clone();
    let fi = nodes.iter().position(|n| n.name == follower).unwrap();
    // Flip a byte in the middle of the follower's copy of partition 0...
    let seg = segment_of(root.path(), &follower, 0);
    let mut bytes = std::fs::read(&seg).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x5a;
    std::fs::write(&seg, &bytes).unwrap();
    // ...then crash it and start it again on the damaged file.
    nodes[fi].agent.child.kill().unwrap();
    nodes[fi].agent.child.wait().unwrap();
    let join = (fi > 0).then_some(nodes[0].mesh_port);
    let port = nodes[fi].mesh_port;
    nodes[fi].agent = start_mesh_agent(root.path(), "ca", &follower, port, join, &[]);
    let other = nodes
        .iter()
        .position(|n| n.name != follower && n.name != leader)
        .unwrap();
    let (more, _) = publish_range(&nodes[other].agent.client, 200..300).await;
    acked.extend(more);
    // The damaged follower catches up: its copy has everything committed.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = cluster(&nodes[fi].agent.client).await;
        let caught_up = v.as_ref().is_some_and(|v| {
            v["replicated"].as_array().into_iter().flatten().any(|g| {
                g["topic"] == TOPIC
                    && g["partition"] == 0
                    && g["recovering"] == false
                    && g["lastIndex"].as_u64()
                        >= acked
                            .iter()
                            .filter(|a| a.partition == 0)
                            .map(|a| a.offset)
                            .max()
            })
        });
        if caught_up {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{follower} did not catch up within 60 s: {v:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Now another replica dies (partition 0's leader, unless the repaired
    // follower leads it): the repaired follower and one more must hold
    // every acknowledged message between them.
    let current = {
        let all: Vec<&Node> = nodes.iter().collect();
        leaders(&all).await.get(&0).map(|(l, _)| l.clone())
    };
    let victim = match current {
        Some(l) if l != follower => l,
        _ => nodes[other].name.clone(),
    };
    let vi = nodes.iter().position(|n| n.name == victim).unwrap();
    nodes[vi].agent.child.kill().unwrap();
    nodes[vi].agent.child.wait().unwrap();
    eprintln!("flipped a byte on {follower}; killed {victim} once it had caught up");
    let dups = check_read_back(&nodes[fi].agent.client, "checker", &acked).await;
    eprintln!(
        "read back {} acknowledged messages, {dups} duplicates",
        acked.len()
    );
}

/// iptables rules dropping mesh packets on loopback, removed when dropped.
struct Firewall {
    rules: Vec<Vec<String>>,
}

impl Firewall {
    /// Whether iptables can be used here (root, the binary present). Without
    /// it the network-fault test skips, unless SHOAL_REQUIRE_NETFAULT=1.
    fn available() -> bool {
        let ok = std::process::Command::new("iptables")
            .args(["-w", "-L", "OUTPUT", "-n"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok && std::env::var("SHOAL_REQUIRE_NETFAULT").as_deref() == Ok("1") {
            panic!("iptables is not usable here and SHOAL_REQUIRE_NETFAULT=1");
        }
        ok
    }

    fn new() -> Firewall {
        Firewall { rules: Vec::new() }
    }

    fn add(&mut self, rule: &[&str]) {
        let rule: Vec<String> = rule.iter().map(|s| s.to_string()).collect();
        let mut args = vec!["-w".to_string(), "-I".to_string()];
        args.extend(rule.iter().cloned());
        let ok = std::process::Command::new("iptables")
            .args(&args)
            .status()
            .unwrap()
            .success();
        assert!(ok, "iptables {args:?}");
        self.rules.push(rule);
    }

    /// Every packet to or from `port` (UDP, loopback) is dropped.
    fn isolate(&mut self, port: u16) {
        let p = port.to_string();
        self.add(&[
            "INPUT", "-i", "lo", "-p", "udp", "--dport", &p, "-j", "DROP",
        ]);
        self.add(&[
            "OUTPUT", "-o", "lo", "-p", "udp", "--sport", &p, "-j", "DROP",
        ]);
    }

    /// `percent` % of the packets between ports `a` and `b` are dropped.
    fn lossy(&mut self, a: u16, b: u16, percent: u32) {
        let prob = format!("{:.2}", f64::from(percent) / 100.0);
        for (from, to) in [(a, b), (b, a)] {
            let (f, t) = (from.to_string(), to.to_string());
            self.add(&[
                "INPUT",
                "-i",
                "lo",
                "-p",
                "udp",
                "--sport",
                &f,
                "--dport",
                &t,
                "-m",
                "statistic",
                "--mode",
                "random",
                "--probability",
                &prob,
                "-j",
                "DROP",
            ]);
        }
    }

    fn heal(&mut self) {
        for rule in self.rules.drain(..) {
            let mut args = vec!["-w".to_string(), "-D".to_string()];
            args.extend(rule);
            let _ = std::process::Command::new("iptables").args(&args).status();
        }
    }
}

impl Drop for Firewall {
    fn drop(&mut self) {
        self.heal();
    }
}

#[tokio::test]
async fn an_isolated_leader_and_a_lossy_link_lose_nothing() {
    if !Firewall::available() {
        eprintln!("skipped: iptables is not usable here (root and iptables needed)");
        return;
    }
    let root = tempdir();
    let (nodes, l) = formed_mesh(root.path()).await;
    let all: Vec<&Node> = nodes.iter().collect();
    let victim = victim_of(&nodes, &l);
    let load = start_load(
        std::sync::Arc::new(std::sync::Mutex::new(vec![nodes[2].agent.client.clone()])),
        0,
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut fw = Firewall::new();
    fw.isolate(victim.mesh_port);
    tokio::time::sleep(Duration::from_secs(10)).await;
    fw.heal();
    eprintln!("{} isolated for 10 s, then healed", victim.name);
    formed(&all, &["agent-1", "agent-2", "agent-3"]).await;
    fw.lossy(nodes[0].mesh_port, nodes[1].mesh_port, 20);
    tokio::time::sleep(Duration::from_secs(10)).await;
    fw.heal();
    let (acked, slowest) = load.finish().await;
    eprintln!(
        "isolation and 20 % loss: {} acknowledged, longest publish {slowest:?}",
        acked.len()
    );
    let dups = check_read_back(&victim.agent.client, "checker", &acked).await;
    eprintln!(
        "read back {} acknowledged messages, {dups} duplicates",
        acked.len()
    );
}

#[tokio::test]
async fn consumer_lag_of_a_replicated_topic_counts_messages_not_log_entries() {
    let root = tempdir();
    let nodes = mesh_of(root.path(), 3, &[]).await;
    create_topic(&nodes[0].agent.client).await;
    {
        let all: Vec<&Node> = nodes.iter().collect();
        formed(&all, &["agent-1", "agent-2", "agent-3"]).await;
    }
    let c = &nodes[1].agent.client;
    publish_range(c, 0..10).await;
    put_sub(c, "lagging", json!({"topic": TOPIC, "start": "earliest"})).await;
    let mut acked = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    while acked < 4 {
        assert!(Instant::now() < deadline, "pulled {acked} of 4 within 30 s");
        let got = pull(c, "lagging", 4 - acked, "1s").await;
        if !got.is_empty() {
            let ids: Vec<String> = got.iter().map(ackid).collect();
            ack(c, "lagging", &ids).await;
            acked += got.len();
        }
    }
    // The acknowledged offsets go through each partition's log; the lag,
    // as the API and the metric count it, is the 6 messages left (the
    // log's no-ops, membership changes and offsets do not count).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v = c.get("/v1/subscriptions/lagging").await.unwrap().json();
        let api: u64 = v["partitions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["lag"].as_u64().unwrap_or(0))
            .sum();
        let mut metric = 0.0;
        for n in &nodes {
            let m = metrics(&n.agent.admin).await;
            metric += m
                .lines()
                .filter(|l| {
                    l.starts_with("shoal_consumer_lag_messages{") && l.contains("group=\"lagging\"")
                })
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum::<f64>();
        }
        if api == 6 && metric == 6.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "lag of the group: API {api}, metric summed over the leaders {metric}; 6 expected: {v}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publishes_through_a_follower_go_together_and_all_land() {
    let root = tempdir();
    let (nodes, l) = formed_mesh(root.path()).await;
    // Publish through an agent that does not lead partition 0, so its
    // publishes to that partition are forwarded.
    let (leader0, _) = &l[&0];
    let via = nodes.iter().find(|n| &n.name != leader0).unwrap();
    let clients: Clients =
        std::sync::Arc::new(std::sync::Mutex::new(vec![via.agent.client.clone()]));
    let mut tasks = Vec::new();
    for i in 0..200 {
        let clients = clients.clone();
        tasks.push(tokio::spawn(async move {
            let mut at = 0;
            publish_until_acked(&clients, &mut at, i).await.0
        }));
    }
    let mut acked = Vec::new();
    for t in tasks {
        acked.push(t.await.unwrap());
    }
    let dups = check_read_back(&via.agent.client, "checker", &acked).await;
    eprintln!("200 concurrent publishes read back, {dups} duplicates");
    let m = metrics(&via.agent.admin).await;
    let messages = series_value(&m, "shoal_forwarded_messages_total{outcome=\"stored\"}")
        .expect("forwarded messages are counted");
    let calls =
        metric_value(&m, "shoal_forward_duration_seconds_count").expect("forward calls are timed");
    eprintln!("{messages} messages forwarded in {calls} calls");
    assert!(messages > 0.0, "some publishes were forwarded");
    assert!(
        calls < messages,
        "concurrent forwards to one leader share calls: {messages} messages took {calls} calls"
    );
    // Bursts and lone publishes in turn: every call slot of the lane is
    // given back (a slot kept after its call would leave later forwards
    // queued with no call to carry them).
    for burst in 0..5 {
        let mut tasks = Vec::new();
        for i in 0..20 {
            let clients = clients.clone();
            let n = 1_000 + burst * 100 + i;
            tasks.push(tokio::spawn(async move {
                let mut at = 0;
                publish_until_acked(&clients, &mut at, n).await.0
            }));
        }
        for t in tasks {
            acked.push(t.await.unwrap());
        }
        for i in 0..5 {
            let n = 1_000 + burst * 100 + 50 + i;
            let lone = tokio::time::timeout(
                Duration::from_secs(30),
                publish_until_acked(&clients, &mut 0, n),
            )
            .await
            .expect("a lone publish after a burst was answered");
            acked.push(lone.0);
        }
    }
    check_read_back(&via.agent.client, "checker-2", &acked).await;
}

/// A new topic's groups are founded by several agents at once: the meta
/// leader, which decides that they exist, dying while they form (here: as
/// soon as another agent holds a replica of each) strands none of them.
#[tokio::test]
async fn a_new_topics_groups_outlive_the_meta_leader_dying_as_they_form() {
    let root = tempdir();
    let mut nodes = mesh_of(root.path(), 3, &[]).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let meta_leader = loop {
        let v = cluster(&nodes[0].agent.client).await;
        // The meta group grows to every agent first: its voters found the
        // topic's groups.
        let leader = v.as_ref().and_then(|v| {
            let meta = v["replicated"]
                .as_array()?
                .iter()
                .find(|g| g["topic"] == "__meta")?;
            (meta["voters"].as_array()?.len() == 3)
                .then(|| meta["leader"].as_str().map(String::from))
                .flatten()
        });
        if let Some(l) = leader {
            break l;
        }
        assert!(
            Instant::now() < deadline,
            "no meta group of 3 voters within 60 s: {v:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let witness = nodes.iter().position(|n| n.name != meta_leader).unwrap();
    create_topic(&nodes[witness].agent.client).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let held = cluster(&nodes[witness].agent.client)
            .await
            .map(|v| {
                v["replicated"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|g| g["topic"] == TOPIC)
                    .count() as u64
            })
            .unwrap_or(0);
        if held == PARTITIONS {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} did not hold a replica of every partition within 60 s",
            nodes[witness].name
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let v = nodes.iter_mut().find(|n| n.name == meta_leader).unwrap();
    v.agent.child.kill().unwrap();
    v.agent.child.wait().unwrap();
    let (acked, slowest) = publish_range(&nodes[witness].agent.client, 0..40).await;
    let partitions: BTreeSet<u64> = acked.iter().map(|a| a.partition).collect();
    assert_eq!(
        partitions.len() as u64,
        PARTITIONS,
        "every partition took publishes after the meta leader {meta_leader} died: {partitions:?}"
    );
    eprintln!("meta leader {meta_leader} killed as the groups formed; longest publish {slowest:?}");
    let dups = check_read_back(&nodes[witness].agent.client, "checker", &acked).await;
    assert_eq!(dups, 0);
}

/// A topic created the moment a new mesh's agents see each other, before
/// the meta group has taken them all in, is still founded by all three
/// (each lists every partition in its `created.json`), not by the meta
/// leader alone with the others added one group at a time afterwards.
#[tokio::test]
async fn a_topic_created_as_a_new_mesh_forms_is_founded_by_all_its_replicas() {
    let root = tempdir();
    let (nodes, _) = formed_mesh(root.path()).await;
    for node in &nodes {
        let path = root.path().join(&node.name).join("replicas/created.json");
        let created: BTreeSet<String> =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        let ours: BTreeSet<String> = created
            .into_iter()
            .filter(|g| g.contains(&format!("/{TOPIC}/")))
            .collect();
        assert_eq!(
            ours.len() as u64,
            PARTITIONS,
            "{} founded {ours:?}, not every partition of {TOPIC}",
            node.name
        );
    }
}

/// A replica that replaces a lost one in a partition holding more than a
/// mesh frame's worth (17 MiB) gets every message: the leader's snapshot,
/// which carries the partition's log, crosses the mesh in parts.
#[tokio::test]
async fn a_replacement_catches_up_on_a_partition_larger_than_a_frame() {
    let root = tempdir();
    let mut nodes = formed_replaceable_mesh(root.path()).await;
    // 24 messages of 900 KiB under one key: about 21 MiB in one partition.
    let filler = "x".repeat(900 * 1024);
    let mut acked = Vec::new();
    for i in 0..24 {
        let id = format!("big-{i}");
        let body = format!("big-{i}-{filler}");
        let started = Instant::now();
        loop {
            let r = nodes[0]
                .agent
                .client
                .publish(
                    TOPIC,
                    &[("shoal-key", "big"), ("shoal-id", &id)],
                    body.clone(),
                )
                .await
                .unwrap();
            if r.status == 201 || r.status == 200 {
                let v = r.json();
                acked.push(Acked {
                    id: id.clone(),
                    key: "big".into(),
                    body: body.clone(),
                    partition: v["partition"].as_u64().unwrap(),
                    offset: v["offset"].as_u64().unwrap(),
                });
                break;
            }
            assert!(
                r.status == 503 && started.elapsed() < PUBLISH_PATIENCE,
                "publish {id}: {} {}",
                r.status,
                r.text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    replace_agent_3(root.path(), &mut nodes);
    let all: Vec<&Node> = nodes.iter().collect();
    formed(&all, &["agent-1", "agent-2", "agent-4"]).await;
    // Its voter seat needs the log: it came through appends after a
    // snapshot that carries none, and is on its disk.
    fn bytes_under(dir: &Path) -> u64 {
        std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| match e.metadata() {
                Ok(m) if m.is_dir() => bytes_under(&e.path()),
                Ok(m) => m.len(),
                Err(_) => 0,
            })
            .sum()
    }
    let held = bytes_under(&root.path().join("agent-4").join("replicas"));
    assert!(
        held > 21 * 1024 * 1024,
        "agent-4 holds {held} bytes of replicas, less than the big partition"
    );
    let m = metrics(&nodes[2].agent.admin).await;
    assert!(
        !m.contains("raft_transfer_too_large"),
        "no transfer was refused"
    );
    // The leaders counted the copy as catch-up (refreshed every second).
    let started = Instant::now();
    loop {
        let mut copied = 0.0;
        for n in &nodes {
            let m = metrics(&n.agent.admin).await;
            copied += metric_value(&m, "shoal_replica_catch_up_bytes_total").unwrap_or(0.0);
        }
        if copied >= 21.0 * 1024.0 * 1024.0 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the leaders counted {copied} catch-up bytes, less than the big partition"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let dups = check_read_back(&nodes[2].agent.client, "checker", &acked).await;
    assert_eq!(dups, 0);
}

/// The bytes of partition `p`'s log segments in `node`'s replica, and the
/// first index its oldest segment holds.
fn replica_log(root: &Path, node: &str, p: u64) -> (u64, u64) {
    let dir = replica_dir(root, node, p);
    let mut bytes = 0;
    let mut first = u64::MAX;
    for e in std::fs::read_dir(&dir).unwrap().flatten() {
        let path = e.path();
        if path.extension().is_some_and(|x| x == "log") {
            // Retention may remove a segment between the listing and here:
            // a segment that is gone holds nothing.
            let Ok(meta) = e.metadata() else {
                continue;
            };
            bytes += meta.len();
            let base: u64 = path.file_stem().unwrap().to_str().unwrap().parse().unwrap();
            first = first.min(base);
        }
    }
    (bytes, first)
}

#[tokio::test]
async fn retention_by_size_keeps_every_replica_within_max_bytes() {
    const SEGMENT: u64 = 64 * 1024;
    const MAX_BYTES: u64 = 4 * SEGMENT;
    let root = tempdir();
    let segment = SEGMENT.to_string();
    let nodes = mesh_of(root.path(), 3, &["--segment-bytes", &segment]).await;
    let c = &nodes[0].agent.client;
    let r = put_topic(
        c,
        TOPIC,
        json!({"partitions": PARTITIONS, "replicas": 3, "retention": {"maxBytes": MAX_BYTES}}),
    )
    .await;
    assert!(r.status == 201 || r.status == 200, "create: {}", r.text());
    let all: Vec<&Node> = nodes.iter().collect();
    formed(&all, &["agent-1", "agent-2", "agent-3"]).await;
    // About 2 MiB, eight times the limit, in one partition.
    let body = vec![b'x'; 4096];
    let mut last = (0, 0);
    for _ in 0..512 {
        let v = publish(c, TOPIC, &[("shoal-key", "k")], body.clone()).await;
        last = (
            v["partition"].as_u64().unwrap(),
            v["offset"].as_u64().unwrap(),
        );
    }
    let (p, last_offset) = last;
    // Retention runs every 10 s on each replica.
    let deadline = Instant::now() + Duration::from_secs(60);
    for node in &nodes {
        loop {
            let (bytes, first) = replica_log(root.path(), &node.name, p);
            if bytes <= MAX_BYTES && first > 1 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{}'s replica of partition {p} holds {bytes} bytes from index {first} (maxBytes {MAX_BYTES})",
                node.name
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let m = metrics(&node.agent.admin).await;
        let dropped = metric_value(&m, "shoal_storage_retention_deleted_segments_total");
        assert!(
            dropped.is_some_and(|d| d >= 4.0),
            "{}: segments deleted by retention {dropped:?}",
            node.name
        );
    }
    // The oldest messages are gone, the newest are read back, and the group
    // still takes publishes after its log was compacted by size.
    let v = publish(c, TOPIC, &[("shoal-key", "k")], "after").await;
    assert_eq!(v["partition"].as_u64(), Some(p));
    let after = v["offset"].as_u64().unwrap();
    assert_eq!(after, last_offset + 1);
    put_sub(c, "tail", json!({"topic": TOPIC, "start": "earliest"})).await;
    let mut first_read = None;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        assert!(
            Instant::now() < deadline,
            "offset {after} not read within 30 s"
        );
        let got = pull(c, "tail", 500, "1s").await;
        let ids: Vec<String> = got.iter().map(ackid).collect();
        if !ids.is_empty() {
            ack(c, "tail", &ids).await;
        }
        let mut done = false;
        for e in &got {
            let (partition, offset) = position(e);
            if partition != p {
                continue;
            }
            first_read.get_or_insert(offset);
            if offset == after {
                assert_eq!(text_of(e), "after");
                done = true;
            }
        }
        if done {
            break;
        }
    }
    let first_read = first_read.unwrap();
    assert!(
        first_read > 300,
        "partition {p} was read from offset {first_read}: retention kept more than maxBytes"
    );
}

#[tokio::test]
async fn a_topics_dedupe_window_applies_to_its_replicated_partitions() {
    let root = tempdir();
    let nodes = mesh_of(root.path(), 3, &[]).await;
    let c = &nodes[2].agent.client;
    let r = put_topic(
        c,
        TOPIC,
        json!({"partitions": PARTITIONS, "replicas": 3, "dedupeWindow": "1s"}),
    )
    .await;
    assert!(r.status == 201 || r.status == 200, "create: {}", r.text());
    let all: Vec<&Node> = nodes.iter().collect();
    formed(&all, &["agent-1", "agent-2", "agent-3"]).await;
    let first = publish(c, TOPIC, &[("shoal-id", "once")], "first").await;
    assert_ne!(first["duplicate"], true);
    // With the agents' default window (2 minutes) every retry below would
    // be a duplicate of the first; with the topic's 1 s, which the leader
    // puts in the log, a retry a few seconds later is a new message.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let r = c
            .publish(TOPIC, &[("shoal-id", "once")], "again")
            .await
            .unwrap();
        let v = r.json();
        if r.status == 201 {
            assert_ne!(v["duplicate"], true, "{v}");
            assert_eq!(v["partition"], first["partition"]);
            assert!(v["offset"].as_u64() > first["offset"].as_u64(), "{v}");
            break;
        }
        assert!(
            r.status == 200 || r.status == 503,
            "publish again: {} {v}",
            r.status
        );
        assert!(
            Instant::now() < deadline,
            "the same id was still a duplicate after 30 s with a 1 s window: {v}"
        );
    }
}
