//! The mesh with real processes on loopback: agents started with --dev share
//! one CA, join over QUIC with mutual TLS, and see each other come and go.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use serde_json::Value;
use shoal_agent::client::AgentClient;
use std::path::Path;
use std::process::{Child, Command, Stdio};

struct MeshAgent {
    child: Child,
    client: AgentClient,
    admin: AgentClient,
}

impl Drop for MeshAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start(root: &Path, ca: &str, name: &str, mesh_port: u16, join: Option<u16>) -> MeshAgent {
    let (app, admin) = (free_port(), free_port());
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_shoal-agent"));
    cmd.args(["--dev", "--node-name", name])
        .arg("--ca-dir")
        .arg(root.join(ca))
        .arg("--data-dir")
        .arg(root.join(name))
        .arg("--app-addr")
        .arg(format!("127.0.0.1:{app}"))
        .arg("--admin-addr")
        .arg(format!("127.0.0.1:{admin}"))
        .arg("--mesh-addr")
        .arg(format!("127.0.0.1:{mesh_port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some(seed) = join {
        cmd.arg("--join").arg(format!("127.0.0.1:{seed}"));
    }
    MeshAgent {
        child: cmd.spawn().unwrap(),
        client: AgentClient::new(&format!("http://127.0.0.1:{app}")),
        admin: AgentClient::new(&format!("http://127.0.0.1:{admin}")),
    }
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
        m.contains("shoal_mesh_handshake_failures_total{reason=\"unknown_ca\"}")
            && metric_value(&m, "shoal_mesh_handshake_failures_total").unwrap_or(0.0) > 0.0
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
async fn an_agent_without_dev_mode_refuses_join_clearly() {
    let root = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_shoal-agent"))
        .arg("--data-dir")
        .arg(root.path())
        .args([
            "--app-addr",
            "127.0.0.1:0",
            "--admin-addr",
            "127.0.0.1:0",
            "--join",
            "127.0.0.1:1",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--join needs a mesh identity"), "{err}");
}

/// A mesh peer built from the same dev CA, speaking raw frames.
async fn raw_peer(root: &Path, ca: &str) -> shoal_mesh::transport::Endpoint {
    let id = shoal_mesh::SpiffeId::new("shoal.local", "default", "tester").unwrap();
    let source = shoal_mesh::certs::DevCertSource::new(&root.join(ca), "tester", id);
    let identity = shoal_mesh::certs::CertSource::load(&source).unwrap();
    let store = shoal_mesh::tls::CertStore::new(&identity, std::sync::Arc::new(|_, _| {})).unwrap();
    shoal_mesh::transport::Endpoint::bind("127.0.0.1:0".parse().unwrap(), &store).unwrap()
}

async fn exchange(conn: &shoal_mesh::quinn::Connection, bytes: &[u8]) -> Vec<shoal_proto::Message> {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(bytes).await.unwrap();
    send.finish().unwrap();
    let got = tokio::time::timeout(WAIT, recv.read_to_end(1 << 20))
        .await
        .unwrap()
        .unwrap_or_default();
    let mut buf = bytes::BytesMut::from(&got[..]);
    let mut out = Vec::new();
    while let Ok(Some(m)) = shoal_proto::decode::<shoal_proto::Message>(&mut buf) {
        out.push(m);
    }
    out
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
        exchange(&conn, &ping).await,
        vec![Message::Pong { seq: 1 }, Message::Pong { seq: 2 }]
    );

    // A frame from a future protocol version, then plain garbage.
    let mut future = ping.to_vec();
    future[4] = 9;
    let refused = exchange(&conn, &future).await;
    assert!(
        matches!(refused.as_slice(), [Message::Refuse { reason }] if reason.contains("version 9")),
        "{refused:?}"
    );
    let garbage = exchange(
        &conn,
        &[0, 0, 0, 3, shoal_proto::PROTOCOL_VERSION, 0xff, 0xff],
    )
    .await;
    assert!(
        matches!(garbage.as_slice(), [Message::Refuse { .. }]),
        "{garbage:?}"
    );

    // The connection, the agent and its app API carry on.
    assert_eq!(exchange(&conn, &ping).await.len(), 2);
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
            .put_json("/v1/topics/orders", &serde_json::json!({"partitions": 16}))
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
