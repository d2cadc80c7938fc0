//! The mesh with real processes on loopback: agents started with --dev share
//! one CA, join over QUIC with mutual TLS, and see each other come and go.
//!
//! The topics here ask for `replicas: 1`: each partition lives on one agent,
//! its home, and moves by hand-off. Replicated partitions (the default, 3)
//! are tested in `replication.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use serde_json::Value;
use shoal_agent::client::AgentClient;
use std::path::Path;
use std::process::Command;

fn start(root: &Path, ca: &str, name: &str, mesh_port: u16, join: Option<u16>) -> MeshAgent {
    start_mesh_agent(root, ca, name, mesh_port, join, &[])
}

async fn cluster(a: &MeshAgent) -> Option<Value> {
    let r = a.client.get("/v1/cluster").await.ok()?;
    (r.status == 200).then(|| r.json())
}

/// (node, state, incarnation) of every member `a` knows, itself included.
async fn members(a: &MeshAgent) -> Vec<(String, String, u64)> {
    let Some(v) = cluster(a).await else {
        return Vec::new();
    };
    let mut out: Vec<(String, String, u64)> = v["members"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| {
            (
                m["node"].as_str().unwrap_or("").to_string(),
                m["state"].as_str().unwrap_or("").to_string(),
                m["incarnation"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    out.sort();
    out
}

async fn state_of(a: &MeshAgent, node: &str) -> Option<String> {
    members(a)
        .await
        .into_iter()
        .find(|m| m.0 == node)
        .map(|m| m.1)
}

async fn ready(a: &MeshAgent) -> bool {
    a.admin
        .get("/readyz")
        .await
        .map(|r| r.status == 200)
        .unwrap_or(false)
}

#[tokio::test]
async fn three_agents_join_see_a_crash_and_a_rejoin() {
    let root = tempfile::tempdir().unwrap();
    let seed_port = free_udp_port();
    let a1 = start(root.path(), "ca", "agent-1", seed_port, None);
    let a2 = start(
        root.path(),
        "ca",
        "agent-2",
        free_udp_port(),
        Some(seed_port),
    );
    let a3_port = free_udp_port();
    let mut a3 = start(root.path(), "ca", "agent-3", a3_port, Some(seed_port));
    for a in [&a1, &a2, &a3] {
        wait_until("every agent sees three alive members", || async {
            let m = members(a).await;
            m.len() == 3 && m.iter().all(|(_, s, _)| s == "alive")
        })
        .await;
        assert!(ready(a).await, "ready once joined");
    }
    let first_incarnation = members(&a1)
        .await
        .into_iter()
        .find(|m| m.0 == "agent-3")
        .unwrap()
        .2;
    // kill -9 agent-3: the others suspect it, then declare it down.
    a3.child.kill().unwrap();
    a3.child.wait().unwrap();
    for a in [&a1, &a2] {
        wait_until("agent-3 is declared down", || async {
            state_of(a, "agent-3").await.as_deref() == Some("down")
        })
        .await;
    }
    let metrics = a1.admin.get("/metrics").await.unwrap().text();
    assert!(
        metrics.contains("shoal_mesh_members{state=\"down\"} 1"),
        "{metrics}"
    );
    // The pod restarts on the same address: it rejoins with a newer incarnation.
    let a3 = start(root.path(), "ca", "agent-3", a3_port, Some(seed_port));
    wait_until("agent-3 is alive again", || async {
        state_of(&a1, "agent-3").await.as_deref() == Some("alive")
    })
    .await;
    let again = members(&a1)
        .await
        .into_iter()
        .find(|m| m.0 == "agent-3")
        .unwrap()
        .2;
    assert!(
        again > first_incarnation,
        "new incarnation {again} > {first_incarnation}"
    );
    drop(a3);
}

/// Two agents with one node name would split into two brokers answering the
/// same partitions: the one that comes second is refused, says why in its
/// logs' place (`/readyz`, `/v1/cluster`, publish errors), and the mesh keeps
/// the first.
#[tokio::test]
async fn a_second_agent_with_a_taken_node_name_is_refused() {
    let root = tempfile::tempdir().unwrap();
    let seed_port = free_udp_port();
    let a = start(root.path(), "ca", "agent-x", seed_port, None);
    let b = start(
        root.path(),
        "ca",
        "agent-y",
        free_udp_port(),
        Some(seed_port),
    );
    for m in [&a, &b] {
        wait_until("two agents join", || async {
            members(m).await.len() == 2 && ready(m).await
        })
        .await;
    }
    // Same name as the first, its own data and address.
    let dup = start(
        &root.path().join("second"),
        "../ca",
        "agent-x",
        free_udp_port(),
        Some(seed_port),
    );
    wait_until("the second agent-x says why it is not ready", || async {
        match dup.admin.get("/readyz").await {
            Ok(r) => r.status == 503 && r.text().contains("already used by the agent at"),
            Err(_) => false,
        }
    })
    .await;
    let v = cluster(&dup).await.unwrap();
    assert_eq!(v["name_conflict"]["node"], "agent-x", "{v}");
    assert_eq!(
        v["name_conflict"]["holder"],
        format!("127.0.0.1:{seed_port}"),
        "{v}"
    );
    assert_eq!(v["joined"], false, "{v}");
    let r = dup
        .client
        .publish("orders", &[("shoal-key", "k")], "refused")
        .await
        .unwrap();
    expect_error(&r, 503, "name_conflict", "publish on the refused agent");
    let text = dup.admin.get("/metrics").await.unwrap().text();
    assert_eq!(
        metric_value(&text, "shoal_mesh_name_conflicts_total"),
        Some(1.0)
    );

    // The first keeps its name and the mesh works on without the second.
    for m in [&a, &b] {
        assert!(ready(m).await);
        wait_until(
            "agent-x is the first one again for every member",
            || async {
                cluster(m).await.is_some_and(|v| {
                    v["members"].as_array().into_iter().flatten().any(|x| {
                        x["node"] == "agent-x"
                            && x["addr"] == format!("127.0.0.1:{seed_port}")
                            && x["state"] == "alive"
                    })
                })
            },
        )
        .await;
    }
    for key in ["k1", "k2", "k3", "k4"] {
        publish(&b.client, "orders", &[("shoal-key", key)], "kept").await;
    }
    drop(dup);
}

#[tokio::test]
async fn a_graceful_stop_leaves_the_mesh() {
    let root = tempfile::tempdir().unwrap();
    let seed_port = free_udp_port();
    let a1 = start(root.path(), "ca", "agent-1", seed_port, None);
    let a2 = start(
        root.path(),
        "ca",
        "agent-2",
        free_udp_port(),
        Some(seed_port),
    );
    wait_until("agent-2 joined", || async {
        state_of(&a1, "agent-2").await.as_deref() == Some("alive")
    })
    .await;
    let pid = a2.child.id();
    Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    wait_until("agent-2 left", || async {
        state_of(&a1, "agent-2").await.as_deref() == Some("down")
    })
    .await;
    let mut a2 = a2;
    let status = a2.child.wait().unwrap();
    assert!(status.success(), "graceful stop exits 0: {status}");
}

#[tokio::test]
async fn an_agent_with_a_certificate_from_another_ca_is_refused() {
    let root = tempfile::tempdir().unwrap();
    let seed_port = free_udp_port();
    let a1 = start(root.path(), "ca", "agent-1", seed_port, None);
    let a2 = start(
        root.path(),
        "ca",
        "agent-2",
        free_udp_port(),
        Some(seed_port),
    );
    wait_until("agent-2 joined", || async {
        state_of(&a1, "agent-2").await.as_deref() == Some("alive")
    })
    .await;
    // Same flags, its own CA directory: a stranger to this mesh.
    let intruder = start(
        root.path(),
        "other-ca",
        "intruder",
        free_udp_port(),
        Some(seed_port),
    );
    wait_until("the intruder counts its refused handshakes", || async {
        let m = intruder
            .admin
            .get("/metrics")
            .await
            .map(|r| r.text())
            .unwrap_or_default();
        series_value(
            &m,
            "shoal_mesh_handshake_failures_total{reason=\"unknown_ca\"}",
        )
        .unwrap_or(0.0)
            > 0.0
    })
    .await;
    // The mesh agent it dialed sees the attempt too: the intruder aborted
    // the handshake, refusing the mesh's certificate.
    wait_until("the seed counts the aborted handshakes", || async {
        let m = a1
            .admin
            .get("/metrics")
            .await
            .map(|r| r.text())
            .unwrap_or_default();
        series_value(
            &m,
            "shoal_mesh_handshake_failures_total{reason=\"peer_refused\"}",
        )
        .unwrap_or(0.0)
            > 0.0
    })
    .await;
    assert!(
        !ready(&intruder).await,
        "an agent that cannot join is not ready"
    );
    assert_eq!(
        state_of(&a1, "intruder").await,
        None,
        "the mesh never lists it"
    );
    let v = cluster(&intruder).await.unwrap();
    assert_eq!(v["joined"], false);
    drop(a2);
}

#[tokio::test]
async fn an_agent_without_a_mesh_identity_ignores_join_loudly_and_runs_alone() {
    // An injected pod gets SHOAL_JOIN from the injector's --agent-join
    // before agents have cluster identities: the pod must still start.
    let root = tempfile::tempdir().unwrap();
    let (app, admin) = (free_port(), free_port());
    let mut child = Command::new(env!("CARGO_BIN_EXE_shoal-agent"))
        .arg("--data-dir")
        .arg(root.path())
        .args(["--app-addr", &format!("127.0.0.1:{app}")])
        .args(["--admin-addr", &format!("127.0.0.1:{admin}")])
        .args(["--join", "127.0.0.1:1", "--log-format", "plain"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let admin_client = AgentClient::new(&format!("http://127.0.0.1:{admin}"));
    wait_until("the agent is ready, alone", || async {
        admin_client
            .get("/readyz")
            .await
            .is_ok_and(|r| r.status == 200)
    })
    .await;
    let client = AgentClient::new(&format!("http://127.0.0.1:{app}"));
    publish(&client, "orders", &[], "alone").await;
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--join is ignored"), "{err}");
    assert!(err.contains("ERROR"), "{err}");
}

/// A mesh peer built from the same dev CA, speaking raw frames.
async fn raw_peer(root: &Path, ca: &str) -> shoal_mesh::transport::Endpoint {
    raw_mesh_peer(root, ca, "default").await
}

#[tokio::test]
async fn a_malformed_frame_ends_its_stream_not_the_agent() {
    use shoal_proto::Message;
    let root = tempfile::tempdir().unwrap();
    let port = free_udp_port();
    let agent = start(root.path(), "ca", "agent-1", port, None);
    wait_until("the agent is ready", || ready(&agent)).await;
    let peer = raw_peer(root.path(), "ca").await;
    let conn = peer
        .connect(format!("127.0.0.1:{port}").parse().unwrap())
        .await
        .unwrap()
        .connection;

    let mut ping = bytes::BytesMut::new();
    shoal_proto::encode(&Message::Ping { seq: 1 }, &mut ping).unwrap();
    shoal_proto::encode(&Message::Ping { seq: 2 }, &mut ping).unwrap();
    assert_eq!(
        exchange_frames(&conn, &ping).await,
        vec![Message::Pong { seq: 1 }, Message::Pong { seq: 2 }]
    );

    // A frame from a future protocol version, then plain garbage.
    let mut future = ping.to_vec();
    future[4] = 9;
    let refused = exchange_frames(&conn, &future).await;
    assert!(
        matches!(refused.as_slice(), [Message::Refuse { reason }] if reason.contains("version 9")),
        "{refused:?}"
    );
    let garbage = exchange_frames(
        &conn,
        &[0, 0, 0, 3, shoal_proto::PROTOCOL_VERSION, 0xff, 0xff],
    )
    .await;
    assert!(
        matches!(garbage.as_slice(), [Message::Refuse { .. }]),
        "{garbage:?}"
    );

    // The connection, the agent and its app API carry on.
    assert_eq!(exchange_frames(&conn, &ping).await.len(), 2);
    publish(&agent.client, "still-up", &[], "x").await;
    let metrics = agent.admin.get("/metrics").await.unwrap().text();
    assert!(
        metrics.contains("shoal_mesh_bad_frames_total{reason=\"version\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("shoal_mesh_bad_frames_total{reason=\"malformed\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn five_agents_form_one_mesh_and_agree_on_homes() {
    let root = tempfile::tempdir().unwrap();
    let seed = free_udp_port();
    let mut agents = vec![start(root.path(), "ca", "agent-0", seed, None)];
    for i in 1..5 {
        agents.push(start(
            root.path(),
            "ca",
            &format!("agent-{i}"),
            free_udp_port(),
            Some(seed),
        ));
    }
    for a in &agents {
        wait_until("five alive members", || async {
            let m = members(a).await;
            m.len() == 5 && m.iter().all(|(_, s, _)| s == "alive")
        })
        .await;
    }
    // Every agent that knows the topic computes the same home for each partition.
    for a in &agents {
        let r = a
            .client
            .put_json(
                "/v1/topics/orders",
                &serde_json::json!({"partitions": 16, "replicas": 1}),
            )
            .await
            .unwrap();
        assert!(r.status.is_success());
    }
    let homes = |v: Value| -> Vec<(String, Vec<String>)> {
        let mut out: Vec<(String, Vec<String>)> = v["members"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                let p = m["partitions"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_str().unwrap().to_string())
                    .collect();
                (m["node"].as_str().unwrap().to_string(), p)
            })
            .collect();
        out.sort();
        out
    };
    let first = homes(cluster(&agents[0]).await.unwrap());
    let total: usize = first.iter().map(|(_, p)| p.len()).sum();
    assert_eq!(total, 16, "each partition has one home: {first:?}");
    for a in &agents[1..] {
        assert_eq!(homes(cluster(a).await.unwrap()), first, "agents agree");
    }
}

// ----- routing: the mesh acting as one broker -----

fn sigterm(a: &MeshAgent) {
    Command::new("kill")
        .args(["-TERM", &a.child.id().to_string()])
        .status()
        .unwrap();
}

/// Starts `n` agents (agent-1 is the seed) and waits until each sees all alive.
async fn mesh_of(root: &Path, n: usize) -> Vec<MeshAgent> {
    let seed = free_udp_port();
    let mut agents = vec![start(root, "ca", "agent-1", seed, None)];
    for i in 2..=n {
        agents.push(start(
            root,
            "ca",
            &format!("agent-{i}"),
            free_udp_port(),
            Some(seed),
        ));
    }
    for a in &agents {
        wait_until("every agent sees every member alive", || async {
            let m = members(a).await;
            m.len() == n && m.iter().all(|(_, s, _)| s == "alive")
        })
        .await;
    }
    agents
}

/// Partition → home node, as `a` sees it, for `topic`.
async fn homes(a: &MeshAgent, topic: &str) -> std::collections::BTreeMap<u32, String> {
    let mut out = std::collections::BTreeMap::new();
    let Some(v) = cluster(a).await else {
        return out;
    };
    for m in v["members"].as_array().into_iter().flatten() {
        let node = m["node"].as_str().unwrap_or("").to_string();
        for p in m["partitions"].as_array().into_iter().flatten() {
            let p = p.as_str().unwrap_or("");
            if let Some(n) = p.strip_prefix(&format!("{topic}/")) {
                out.insert(n.parse().unwrap(), node.clone());
            }
        }
    }
    out
}

/// Waits until every agent knows all `partitions` of `topic`, agrees on
/// their homes, and none is unavailable; returns the homes.
async fn settled(
    agents: &[&MeshAgent],
    topic: &str,
    partitions: u32,
) -> std::collections::BTreeMap<u32, String> {
    wait_until(
        &format!("the agents agree on the homes of {topic}"),
        || async {
            let mut seen = Vec::new();
            for a in agents {
                let h = homes(a, topic).await;
                let unavailable = cluster(a)
                    .await
                    .map(|v| v["unavailable"].as_array().map_or(1, |u| u.len()))
                    .unwrap_or(1);
                if h.len() != partitions as usize || unavailable != 0 {
                    return false;
                }
                seen.push(h);
            }
            seen.windows(2).all(|w| w[0] == w[1])
        },
    )
    .await;
    homes(agents[0], topic).await
}

/// The partitions `a`'s members of `group` read.
async fn group_partitions(a: &MeshAgent, topic: &str, group: &str) -> Vec<u64> {
    let Some(v) = cluster(a).await else {
        return Vec::new();
    };
    v["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|g| g["topic"] == topic && g["group"] == group)
        .map(|g| {
            g["partitions"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_u64)
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn a_message_published_on_one_agent_is_stored_at_its_home_and_read_on_another() {
    let root = tempfile::tempdir().unwrap();
    let agents = mesh_of(root.path(), 3).await;
    let (a1, a2, a3) = (&agents[0], &agents[1], &agents[2]);
    expect_status(
        &put_topic(
            &a1.client,
            "orders",
            serde_json::json!({"partitions": 6, "replicas": 1}),
        )
        .await,
        201,
        "create orders",
    );
    let homes = settled(&agents.iter().collect::<Vec<_>>(), "orders", 6).await;
    for node in ["agent-1", "agent-2", "agent-3"] {
        assert!(
            homes.values().any(|h| h == node),
            "every agent is home to some partition: {homes:?}"
        );
    }
    put_sub(
        &a3.client,
        "billing",
        serde_json::json!({"topic": "orders", "start": "earliest"}),
    )
    .await;
    let mut published = std::collections::BTreeMap::new();
    for i in 0..60 {
        let v = publish(&a1.client, "orders", &[], format!("m{i}")).await;
        let at = (
            v["partition"].as_u64().unwrap(),
            v["offset"].as_u64().unwrap(),
        );
        published.insert(format!("m{i}"), at);
    }
    let got = pull_ack_n(&a3.client, "billing", 60).await;
    let mut received = std::collections::BTreeMap::new();
    for e in &got {
        assert!(
            received.insert(text_of(e), position(e)).is_none(),
            "delivered once: {e}"
        );
    }
    assert_eq!(
        received, published,
        "every message, at the offset its publisher was told"
    );
    let m1 = metrics(&a1.admin).await;
    assert!(
        series_value(&m1, "shoal_forwarded_messages_total{outcome=\"stored\"}").unwrap_or(0.0)
            > 0.0,
        "agent-1 forwarded to the other homes: {m1}"
    );
    // Publish latency is counted once per request by the agent the app
    // called, forwarded or not; the homes count their stores.
    assert_eq!(
        metric_value(&m1, "shoal_publish_duration_seconds_count"),
        Some(60.0),
        "{m1}"
    );
    let m2 = metrics(&a2.admin).await;
    assert!(
        metric_value(&m2, "shoal_store_duration_seconds_count").unwrap_or(0.0) > 0.0,
        "agent-2 stored its partitions' messages: {m2}"
    );
    assert_eq!(
        metric_value(&m2, "shoal_publish_duration_seconds_count"),
        Some(0.0),
        "agent-2 was not called by an app: {m2}"
    );
    // Publishing right after creating the topic meets homes that may not
    // know it yet: those forwards are retried as `moving`, never `failed`.
    assert_eq!(
        series_value(&m1, "shoal_forwarded_messages_total{outcome=\"failed\"}"),
        Some(0.0),
        "{m1}"
    );
    let m3 = metrics(&a3.admin).await;
    assert!(
        metric_value(&m3, "shoal_mesh_frames_received_total").unwrap_or(0.0) > 0.0,
        "{m3}"
    );
}

#[tokio::test]
async fn a_group_spread_over_three_agents_shares_the_work_once() {
    let root = tempfile::tempdir().unwrap();
    let agents = mesh_of(root.path(), 3).await;
    let refs: Vec<&MeshAgent> = agents.iter().collect();
    expect_status(
        &put_topic(
            &agents[0].client,
            "jobs",
            serde_json::json!({"partitions": 6, "replicas": 1}),
        )
        .await,
        201,
        "create jobs",
    );
    settled(&refs, "jobs", 6).await;
    for a in &agents {
        put_sub(
            &a.client,
            "worker",
            serde_json::json!({"topic": "jobs", "group": "workers", "start": "earliest"}),
        )
        .await;
    }
    wait_until(
        "the group's partitions are dealt once over the three agents",
        || async {
            let mut all = Vec::new();
            for a in &agents {
                let mine = group_partitions(a, "jobs", "workers").await;
                if mine.is_empty() {
                    return false;
                }
                all.extend(mine);
            }
            all.sort_unstable();
            all == (0..6).collect::<Vec<u64>>()
        },
    )
    .await;
    let total = 300;
    for i in 0..total {
        let a = &agents[i % 3];
        publish(&a.client, "jobs", &[], format!("job-{i}")).await;
    }
    let mut seen: std::collections::BTreeMap<String, usize> = Default::default();
    let mut per_agent = [0usize; 3];
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while seen.len() < total {
        assert!(
            std::time::Instant::now() < deadline,
            "only {} of {total} jobs arrived",
            seen.len()
        );
        for (k, a) in agents.iter().enumerate() {
            let got = pull(&a.client, "worker", 100, "100ms").await;
            if got.is_empty() {
                continue;
            }
            let ids: Vec<String> = got.iter().map(ackid).collect();
            ack(&a.client, "worker", &ids).await;
            for e in &got {
                per_agent[k] += 1;
                *seen.entry(text_of(e)).or_default() += 1;
            }
        }
    }
    let doubled: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        doubled.is_empty(),
        "each job to one member once: {doubled:?}"
    );
    assert!(
        per_agent.iter().all(|n| *n > 0),
        "every agent's member worked: {per_agent:?}"
    );
    // Nothing more arrives: every job was acknowledged once.
    for a in &agents {
        assert!(pull(&a.client, "worker", 100, "300ms").await.is_empty());
    }
}

#[tokio::test]
async fn a_graceful_stop_during_a_publish_loop_loses_nothing_acknowledged() {
    let root = tempfile::tempdir().unwrap();
    let agents = mesh_of(root.path(), 3).await;
    let refs: Vec<&MeshAgent> = agents.iter().collect();
    expect_status(
        &put_topic(
            &agents[0].client,
            "ledger",
            serde_json::json!({"partitions": 8, "replicas": 1}),
        )
        .await,
        201,
        "create ledger",
    );
    let homes = settled(&refs, "ledger", 8).await;
    assert!(homes.values().any(|h| h == "agent-2"), "{homes:?}");
    let client = agents[0].client.clone();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let acknowledged = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let publisher = {
        let (stop, acknowledged) = (stop.clone(), acknowledged.clone());
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Acquire)
                && i < 20_000
                && started.elapsed() < std::time::Duration::from_secs(60)
            {
                let id = format!("entry-{i}");
                for _attempt in 0..200 {
                    let r = client
                        .publish("ledger", &[("shoal-id", id.as_str())], id.clone())
                        .await
                        .unwrap();
                    match r.status.as_u16() {
                        200 | 201 => {
                            acknowledged.lock().unwrap().push(id.clone());
                            break;
                        }
                        503 => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
                        other => panic!("publish {id}: {other} {}", r.text()),
                    }
                }
                i += 1;
            }
        })
    };
    wait_until("200 publishes acknowledged", || async {
        acknowledged.lock().unwrap().len() >= 200
    })
    .await;
    sigterm(&agents[1]);
    let mut agents = agents;
    let status = agents[1].child.wait().unwrap();
    assert!(status.success(), "graceful stop exits 0: {status}");
    let at_stop = acknowledged.lock().unwrap().len();
    wait_until("200 more publishes acknowledged after the stop", || async {
        acknowledged.lock().unwrap().len() >= at_stop + 200
    })
    .await;
    stop.store(true, std::sync::atomic::Ordering::Release);
    publisher.await.unwrap();
    let acknowledged = acknowledged.lock().unwrap().clone();
    let m2 = cluster(&agents[0]).await.unwrap();
    assert!(
        m2["departed"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d == "agent-2"),
        "{m2}"
    );
    let reader = &agents[2];
    put_sub(
        &reader.client,
        "audit",
        serde_json::json!({"topic": "ledger", "start": "earliest"}),
    )
    .await;
    let got = pull_ack_n(&reader.client, "audit", acknowledged.len()).await;
    let mut stored: std::collections::BTreeMap<String, usize> = Default::default();
    for e in &got {
        *stored.entry(text_of(e)).or_default() += 1;
    }
    let lost: Vec<&String> = acknowledged
        .iter()
        .filter(|id| !stored.contains_key(*id))
        .collect();
    assert!(lost.is_empty(), "acknowledged but lost: {lost:?}");
    let twice: Vec<_> = stored.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "stored once per Shoal-Id: {twice:?}");
}

#[tokio::test]
async fn a_joining_agent_takes_over_its_share_with_the_data() {
    let root = tempfile::tempdir().unwrap();
    let seed = free_udp_port();
    let a1 = start(root.path(), "ca", "agent-1", seed, None);
    let a2 = start(root.path(), "ca", "agent-2", free_udp_port(), Some(seed));
    wait_until("agent-2 joined", || async {
        state_of(&a1, "agent-2").await.as_deref() == Some("alive")
    })
    .await;
    expect_status(
        &put_topic(
            &a1.client,
            "history",
            serde_json::json!({"partitions": 6, "replicas": 1}),
        )
        .await,
        201,
        "create history",
    );
    settled(&[&a1, &a2], "history", 6).await;
    for i in 0..120 {
        publish(&a1.client, "history", &[], format!("old-{i}")).await;
    }
    let a3 = start(root.path(), "ca", "agent-3", free_udp_port(), Some(seed));
    let homes = settled(&[&a1, &a2, &a3], "history", 6).await;
    assert!(
        homes.values().any(|h| h == "agent-3"),
        "the new agent is home to its share: {homes:?}"
    );
    let m3 = metrics(&a3.admin).await;
    assert!(
        m3.contains("shoal_handoffs_total{direction=\"received\",outcome=\"ok\"}"),
        "{m3}"
    );
    for i in 0..30 {
        publish(&a3.client, "history", &[], format!("new-{i}")).await;
    }
    put_sub(
        &a2.client,
        "reader",
        serde_json::json!({"topic": "history", "start": "earliest"}),
    )
    .await;
    let got = pull_ack_n(&a2.client, "reader", 150).await;
    let texts: std::collections::BTreeSet<String> = got.iter().map(text_of).collect();
    assert_eq!(texts.len(), 150, "every message once, old and new");
    for i in 0..120 {
        assert!(
            texts.contains(&format!("old-{i}")),
            "old-{i} moved with its partition"
        );
    }
}

#[tokio::test]
async fn keyless_publishes_avoid_a_killed_home_and_keyed_ones_get_503_not_a_hang() {
    let root = tempfile::tempdir().unwrap();
    let seed = free_udp_port();
    let a1 = start(root.path(), "ca", "agent-1", seed, None);
    let mut a2 = start(root.path(), "ca", "agent-2", free_udp_port(), Some(seed));
    wait_until("agent-2 joined", || async {
        state_of(&a1, "agent-2").await.as_deref() == Some("alive")
    })
    .await;
    expect_status(
        &put_topic(
            &a1.client,
            "fragile",
            serde_json::json!({"partitions": 4, "replicas": 1}),
        )
        .await,
        201,
        "create fragile",
    );
    let homes = settled(&[&a1, &a2], "fragile", 4).await;
    assert!(homes.values().any(|h| h == "agent-2"), "{homes:?}");
    a2.child.kill().unwrap();
    a2.child.wait().unwrap();
    wait_until("agent-2 is declared down", || async {
        state_of(&a1, "agent-2").await.as_deref() == Some("down")
    })
    .await;
    let dead: Vec<u32> = homes
        .iter()
        .filter(|(_, h)| *h == "agent-2")
        .map(|(p, _)| *p)
        .collect();
    // A keyed message keeps its partition: one homed on the crashed agent
    // answers 503 at once, with Retry-After.
    let key = (0..1000)
        .map(|i| format!("k{i}"))
        .find(|k| dead.contains(&shoal_agent::topic::partition_for_key(k, 4)))
        .unwrap();
    let r = tokio::time::timeout(
        std::time::Duration::from_secs(20),
        a1.client
            .publish("fragile", &[("shoal-key", &key)], "keyed"),
    )
    .await
    .expect("a publish to a crashed home answers, it does not hang")
    .unwrap();
    expect_error(
        &r,
        503,
        "home_unavailable",
        "keyed publish to a crashed home",
    );
    assert!(
        r.headers.contains_key("retry-after"),
        "503 carries Retry-After"
    );
    // Messages with neither key nor id go round robin over the partitions
    // whose home is alive: every one is stored, none where the dead agent was.
    for i in 0..8 {
        let r = tokio::time::timeout(
            std::time::Duration::from_secs(20),
            a1.client.publish("fragile", &[], format!("p{i}")),
        )
        .await
        .expect("a publish answers, it does not hang")
        .unwrap();
        expect_status(&r, 201, "keyless publish with a crashed home in the mesh");
        let partition = r.json()["partition"].as_u64().unwrap() as u32;
        assert!(
            !dead.contains(&partition),
            "stored in {partition}, homed on the dead agent"
        );
    }
    let v = cluster(&a1).await.unwrap();
    assert!(!v["unavailable"].as_array().unwrap().is_empty(), "{v}");
}

#[tokio::test]
async fn request_reply_and_ephemeral_fan_out_cross_agents() {
    let root = tempfile::tempdir().unwrap();
    let seed = free_udp_port();
    let app = FakeApp::start(|p| {
        AppReply::status(200)
            .header("content-type", "text/plain")
            .body(format!("pong:{}", String::from_utf8_lossy(&p.body)))
    })
    .await;
    let port = app.port.to_string();
    let a1 = start(root.path(), "ca", "agent-1", seed, None);
    let a2 = start_mesh_agent(
        root.path(),
        "ca",
        "agent-2",
        free_udp_port(),
        Some(seed),
        &["--app-port", &port],
    );
    wait_until("agent-2 joined", || async {
        state_of(&a1, "agent-2").await.as_deref() == Some("alive")
    })
    .await;
    put_sub(
        &a2.client,
        "answers",
        serde_json::json!({"topic": "ping", "pushPath": "/ping"}),
    )
    .await;
    wait_until("agent-1 learns agent-2 answers ping", || async {
        let r = a1
            .client
            .call(
                http::Method::POST,
                "/v1/topics/ping/requests?timeout=2s",
                &[],
                "hello",
            )
            .await
            .unwrap();
        r.status == 200 && r.text() == "pong:hello"
    })
    .await;
    // Ephemeral: nothing stored, fanned out to a subscriber on another agent.
    expect_status(
        &put_topic(
            &a1.client,
            "ticks",
            serde_json::json!({"kind": "ephemeral", "partitions": 2}),
        )
        .await,
        201,
        "create ticks",
    );
    settled(&[&a1, &a2], "ticks", 2).await;
    put_sub(&a2.client, "watch", serde_json::json!({"topic": "ticks"})).await;
    wait_until("agent-2's group reads both partitions", || async {
        group_partitions(&a2, "ticks", "watch").await.len() == 2
    })
    .await;
    // Fetches start right after the declaration; give each home a fetch to hold.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    for i in 0..10 {
        publish(&a1.client, "ticks", &[], format!("tick-{i}")).await;
    }
    let got = pull_ack_n(&a2.client, "watch", 10).await;
    let texts: std::collections::BTreeSet<String> = got.iter().map(text_of).collect();
    assert_eq!(texts.len(), 10);
    for agent in ["agent-1", "agent-2"] {
        let dir = root.path().join(agent).join("topics/ticks");
        assert_eq!(
            files_under(&dir),
            0,
            "ephemeral topics store nothing: {dir:?}"
        );
    }
}

fn files_under(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .map(|e| {
            let p = e.path();
            if p.is_dir() {
                files_under(&p)
            } else {
                usize::from(p.extension().is_some_and(|x| x == "log"))
            }
        })
        .sum()
}

#[tokio::test]
async fn well_framed_but_invalid_peer_messages_get_errors_and_metrics() {
    use shoal_proto::{Message, PublishEntry, PublishResult, WireEntry};
    let root = tempfile::tempdir().unwrap();
    let port = free_udp_port();
    let agent = start(root.path(), "ca", "agent-1", port, None);
    wait_until("the agent is ready", || ready(&agent)).await;
    expect_status(
        &put_topic(
            &agent.client,
            "t",
            serde_json::json!({"partitions": 1, "replicas": 1}),
        )
        .await,
        201,
        "create t",
    );
    let peer = raw_peer(root.path(), "ca").await;
    let conn = peer
        .connect(format!("127.0.0.1:{port}").parse().unwrap())
        .await
        .unwrap()
        .connection;
    let mut frames = bytes::BytesMut::new();
    for m in [
        Message::Topic {
            name: "bad".into(),
            config: "{not json".into(),
            version: 1,
        },
        Message::Publish {
            req: 1,
            topic: "t".into(),
            entries: vec![
                PublishEntry {
                    partition: 0,
                    message: vec![0xff, 0x00],
                },
                PublishEntry {
                    partition: 7,
                    message: shoal_agent::message::Message {
                        id: "x".into(),
                        client_id: false,
                        key: None,
                        content_type: None,
                        expires_at_ms: None,
                        deliver_at_ms: None,
                        attributes: Vec::new(),
                        payload: bytes::Bytes::from_static(b"x"),
                    }
                    .encode()
                    .unwrap()
                    .to_vec(),
                },
            ],
        },
        Message::Handoff {
            req: 2,
            topic: "t".into(),
            partition: 0,
            reset: false,
            first_index: 1,
            end_index: 99,
            entries: vec![WireEntry {
                index: 99,
                timestamp_ms: 0,
                data: vec![1],
            }],
            offsets: vec![],
            last: true,
        },
        Message::Fetch {
            req: 3,
            topic: "nope".into(),
            partition: 0,
            group: "g".into(),
            start: "\"earliest\"".into(),
            from: None,
            max: 10,
            wait_ms: 0,
        },
    ] {
        shoal_proto::encode(&m, &mut frames).unwrap();
    }
    let mut answers = exchange_frames(&conn, &frames).await;
    answers.sort_by_key(|m| m.req());
    assert_eq!(answers.len(), 3, "{answers:?}");
    match &answers[0] {
        Message::Published { req: 1, results } => {
            assert!(
                matches!(&results[0], PublishResult::Failed(e) if e.code == "invalid_message" && e.status == 400),
                "{results:?}"
            );
            assert!(
                matches!(&results[1], PublishResult::Failed(e) if e.code == "partition_unknown"),
                "{results:?}"
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(
        matches!(&answers[1], Message::HandoffAck { req: 2, result: Err(e) } if e.code == "unknown_sender"),
        "a hand-off from a peer that is not a member is refused: {:?}",
        answers[1]
    );
    assert!(
        matches!(&answers[2], Message::Fetched { req: 3, result: Err(e) } if e.code == "topic_unknown"),
        "{:?}",
        answers[2]
    );
    // Nothing was stored from those, and the agent carries on.
    assert!(put_topic(&agent.client, "bad", serde_json::json!({}))
        .await
        .status
        .is_success());
    let v = publish(&agent.client, "t", &[], "real").await;
    assert_eq!(v["offset"], 1, "the refused messages stored nothing: {v}");
    let m = metrics(&agent.admin).await;
    for reason in ["invalid_topic", "undecodable_message", "unknown_sender"] {
        assert!(
            m.contains(&format!(
                "shoal_mesh_invalid_messages_total{{reason=\"{reason}\"}} 1"
            )),
            "{reason}: {m}"
        );
    }
}

#[tokio::test]
async fn a_slow_home_slows_its_publishers_with_503_and_bounded_waiting() {
    let root = tempfile::tempdir().unwrap();
    let seed = free_udp_port();
    let a1 = start_mesh_agent(
        root.path(),
        "ca",
        "agent-1",
        seed,
        None,
        &["--max-forwards", "4"],
    );
    let a2 = start(root.path(), "ca", "agent-2", free_udp_port(), Some(seed));
    wait_until("agent-2 joined", || async {
        state_of(&a1, "agent-2").await.as_deref() == Some("alive")
    })
    .await;
    // A one-partition topic whose home is agent-2.
    let mut topic = None;
    for i in 0..32 {
        let name = format!("slow-{i}");
        expect_status(
            &put_topic(
                &a1.client,
                &name,
                serde_json::json!({"partitions": 1, "replicas": 1}),
            )
            .await,
            201,
            "create",
        );
        if settled(&[&a1, &a2], &name, 1)
            .await
            .get(&0)
            .map(String::as_str)
            == Some("agent-2")
        {
            topic = Some(name);
            break;
        }
    }
    let topic = topic.expect("some topic is homed on agent-2");
    publish(&a1.client, &topic, &[], "warm").await;
    // The home stops answering (paused, like a stalled pod).
    let pid = a2.child.id().to_string();
    Command::new("kill").args(["-STOP", &pid]).status().unwrap();
    let busy = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut calls = Vec::new();
    for i in 0..12 {
        let (client, topic, busy) = (a1.client.clone(), topic.clone(), busy.clone());
        calls.push(tokio::spawn(async move {
            let r = client.publish(&topic, &[], format!("m{i}")).await.unwrap();
            if r.status == 503 && r.json()["error"]["code"] == "home_busy" {
                assert!(
                    r.headers.contains_key("retry-after"),
                    "503 carries Retry-After"
                );
                busy.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
            }
            r.status.as_u16()
        }));
    }
    wait_until("all but the 4 forwards allowed are turned away", || async {
        busy.load(std::sync::atomic::Ordering::Acquire) == 8
    })
    .await;
    Command::new("kill").args(["-CONT", &pid]).status().unwrap();
    let mut statuses = Vec::new();
    for c in calls {
        statuses.push(c.await.unwrap());
    }
    statuses.sort_unstable();
    assert_eq!(
        statuses,
        [201, 201, 201, 201, 503, 503, 503, 503, 503, 503, 503, 503],
        "the 4 waiting publishes are stored once the home resumes"
    );
    let m = metrics(&a1.admin).await;
    assert!(
        m.contains("shoal_forwarded_messages_total{outcome=\"busy\"} 8"),
        "{m}"
    );
}

#[tokio::test]
async fn a_client_only_agent_homes_nothing_but_publishes_and_reads() {
    let root = tempfile::tempdir().unwrap();
    let seed = free_udp_port();
    let a1 = start(root.path(), "ca", "agent-1", seed, None);
    let a2 = start_mesh_agent(
        root.path(),
        "ca",
        "agent-2",
        free_udp_port(),
        Some(seed),
        &["--broker", "false"],
    );
    wait_until("agent-2 joined", || async {
        state_of(&a1, "agent-2").await.as_deref() == Some("alive")
    })
    .await;
    expect_status(
        &put_topic(
            &a2.client,
            "jobs",
            serde_json::json!({"partitions": 4, "replicas": 1}),
        )
        .await,
        201,
        "create jobs on the client-only agent",
    );
    let homes = settled(&[&a1, &a2], "jobs", 4).await;
    assert!(homes.values().all(|h| h == "agent-1"), "{homes:?}");
    put_sub(
        &a2.client,
        "reader",
        serde_json::json!({"topic": "jobs", "start": "earliest"}),
    )
    .await;
    for i in 0..8 {
        publish(&a2.client, "jobs", &[], format!("j{i}")).await;
    }
    let got = pull_ack_n(&a2.client, "reader", 8).await;
    assert_eq!(got.len(), 8);
    // Every log file on the client-only agent is as long as an empty one:
    // its header alone.
    let empty = log_sizes_under(&root.path().join("agent-2/topics/jobs"));
    let full = log_sizes_under(&root.path().join("agent-1/topics/jobs"));
    assert!(
        !empty.is_empty() && empty.iter().all(|s| *s == empty[0]),
        "{empty:?}"
    );
    assert!(full.iter().any(|s| *s > empty[0]), "{full:?} vs {empty:?}");
}

fn log_sizes_under(dir: &Path) -> Vec<u64> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in entries.filter_map(Result::ok) {
        let p = e.path();
        if p.is_dir() {
            out.extend(log_sizes_under(&p));
        } else if p.extension().is_some_and(|x| x == "log") {
            out.push(e.metadata().map_or(0, |m| m.len()));
        }
    }
    out
}

#[tokio::test]
async fn a_crashed_home_keeps_its_partitions_through_a_join_and_hands_them_on_return() {
    let root = tempfile::tempdir().unwrap();
    let seed = free_udp_port();
    let a1 = start(root.path(), "ca", "agent-1", seed, None);
    let x_port = free_udp_port();
    let mut x = start(root.path(), "ca", "agent-2", x_port, Some(seed));
    wait_until("agent-2 joined", || async {
        state_of(&a1, "agent-2").await.as_deref() == Some("alive")
    })
    .await;
    expect_status(
        &put_topic(
            &a1.client,
            "keep",
            serde_json::json!({"partitions": 6, "replicas": 1}),
        )
        .await,
        201,
        "create keep",
    );
    let before = settled(&[&a1, &x], "keep", 6).await;
    assert!(before.values().any(|h| h == "agent-2"), "{before:?}");
    for i in 0..60 {
        publish(&a1.client, "keep", &[], format!("k{i}")).await;
    }
    // agent-2 crashes; a new agent joins while it is down.
    x.child.kill().unwrap();
    x.child.wait().unwrap();
    wait_until("agent-2 is declared down", || async {
        state_of(&a1, "agent-2").await.as_deref() == Some("down")
    })
    .await;
    let a3 = start(root.path(), "ca", "agent-3", free_udp_port(), Some(seed));
    wait_until("agent-3 joined", || async {
        state_of(&a1, "agent-3").await.as_deref() == Some("alive")
    })
    .await;
    // agent-2 returns with its data; every partition is served again.
    let x = start(root.path(), "ca", "agent-2", x_port, Some(seed));
    settled(&[&a1, &x, &a3], "keep", 6).await;
    put_sub(
        &a1.client,
        "check",
        serde_json::json!({"topic": "keep", "start": "earliest"}),
    )
    .await;
    let got = pull_ack_n(&a1.client, "check", 60).await;
    let texts: std::collections::BTreeSet<String> = got.iter().map(text_of).collect();
    assert_eq!(texts.len(), 60, "nothing acknowledged was lost");
}

#[tokio::test]
async fn a_whole_mesh_stopped_and_started_again_keeps_every_acknowledged_message() {
    let root = tempfile::tempdir().unwrap();
    let ports = [free_udp_port(), free_udp_port(), free_udp_port()];
    let start_all = || {
        let mut agents = vec![start(root.path(), "ca", "agent-1", ports[0], None)];
        for (i, port) in ports.iter().enumerate().skip(1) {
            agents.push(start(
                root.path(),
                "ca",
                &format!("agent-{}", i + 1),
                *port,
                Some(ports[0]),
            ));
        }
        agents
    };
    let mut acknowledged = 0;
    for round in 0..3 {
        let agents = start_all();
        let refs: Vec<&MeshAgent> = agents.iter().collect();
        for a in &agents {
            wait_until("every agent sees every member alive", || async {
                let m = members(a).await;
                m.len() == 3 && m.iter().all(|(_, s, _)| s == "alive")
            })
            .await;
        }
        if round == 0 {
            expect_status(
                &put_topic(
                    &agents[0].client,
                    "durable",
                    serde_json::json!({"partitions": 6, "replicas": 1}),
                )
                .await,
                201,
                "create durable",
            );
        }
        settled(&refs, "durable", 6).await;
        // Everything acknowledged in earlier rounds is still there.
        let group = format!("check-{round}");
        put_sub(
            &agents[2].client,
            &group,
            serde_json::json!({"topic": "durable", "start": "earliest"}),
        )
        .await;
        let got = pull_ack_n(&agents[2].client, &group, acknowledged).await;
        let texts: std::collections::BTreeSet<String> = got.iter().map(text_of).collect();
        assert_eq!(
            texts.len(),
            acknowledged,
            "round {round}: every acknowledged message, once"
        );
        for i in 0..40 {
            let a = &agents[i % 3];
            publish(&a.client, "durable", &[], format!("r{round}-{i}")).await;
        }
        acknowledged += 40;
        // Stop every agent at once, as Ctrl-C on `shoal dev` does.
        for a in &agents {
            sigterm(a);
        }
        for mut a in agents {
            let status = a.child.wait().unwrap();
            assert!(status.success(), "graceful stop exits 0: {status}");
        }
    }
}
