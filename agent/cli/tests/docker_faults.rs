//! Replication against real faults, with agents as containers on a network
//! of their own: the two failures that used to lose acknowledged messages.
//!
//! - An agent killed with SIGKILL, its data directory thrown away and a
//!   replacement started under a new name (a pod replaced, as Kubernetes
//!   does every day).
//! - An agent's network cut for 20 s (iptables in its network namespace)
//!   and then healed.
//! - An agent frozen for 15 s (`docker pause`: SIGSTOP for the container).
//! - A rolling restart: every agent in turn stopped with SIGTERM and
//!   started again with its data.
//!
//! Each pod is a pause container (the network namespace, with sh and curl
//! for the test to act as the app) and the agent from `shoal-agent:dev`
//! joined to it, with a data directory of its own on the host; the agents
//! run with `--dev` and share one dev CA directory. Every message the
//! agents acknowledged must be read back. Skipped without Docker and the
//! images unless `SHOAL_REQUIRE_DOCKER=1`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;

mod docker;
use docker::*;

/// How long a gone agent's replicas wait before they are replaced (short,
/// so the test sees the replacement; the default is 60 s).
const REPLACE_AFTER: &str = "10s";
const PARTITIONS: u32 = 6;

/// One agent's pod.
#[derive(Clone)]
struct AgentPod {
    node: String,
    pause: String,
    agent: String,
    ip: IpAddr,
    data: PathBuf,
}

impl AgentPod {
    fn curl(&self, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
        app_curl(&self.pause, method, path, &[], body)
    }

    fn alive_members(&self) -> Option<BTreeSet<String>> {
        alive_nodes(&self.pause)
    }

    /// Publishes `orders` messages `m<from>`..=`m<to>` (keyed), each retried
    /// as an app would until acknowledged or given up; the numbers acknowledged.
    fn publish(&self, from: u32, to: u32) -> BTreeSet<u32> {
        let script = format!(
            "i={from}; while [ $i -le {to} ]; do n=0; \
             until [ \"$(curl -sS -m 10 -o /dev/null -w '%{{http_code}}' -X POST \
               -H \"Shoal-Key: k$((i % 37))\" -H 'content-type: text/plain' --data \"m$i\" \
               http://127.0.0.1:4700/v1/topics/orders/messages)\" = 201 ]; do \
               n=$((n+1)); if [ $n -ge 60 ]; then break; fi; sleep 0.5; done; \
             if [ $n -lt 60 ]; then echo acked $i; else echo gave-up $i; fi; \
             i=$((i+1)); done"
        );
        let out = must(&["exec", &self.pause, "sh", "-c", &script]);
        out.lines()
            .filter_map(|l| l.strip_prefix("acked "))
            .map(|n| n.parse().unwrap())
            .collect()
    }

    /// Pulls and acks a batch of `subscription`: the message numbers read.
    fn pull(&self, subscription: &str) -> Vec<u32> {
        pull_ack(&self.pause, subscription)
            .iter()
            .filter_map(|d| d.strip_prefix('m')?.parse().ok())
            .collect()
    }

    /// Drops or lets through every packet of its pod's network interface.
    fn cut(&self, cut: bool) {
        let pid = must(&["inspect", "-f", "{{.State.Pid}}", &self.pause]);
        let op = if cut { "-I" } else { "-D" };
        for rule in [
            ["INPUT", "-i", "eth0", "-j", "DROP"],
            ["OUTPUT", "-o", "eth0", "-j", "DROP"],
        ] {
            let status = std::process::Command::new("nsenter")
                .args(["-t", &pid, "-n", "iptables", op])
                .args(rule)
                .status()
                .unwrap();
            assert!(status.success(), "iptables {op} {rule:?} in {}", self.node);
        }
    }
}

fn start_agent(lab: &Lab, ca: &std::path::Path, node: &str, seed: Option<IpAddr>) -> AgentPod {
    use std::os::unix::fs::PermissionsExt as _;
    let pause = lab.run(
        &format!("{node} (pause)"),
        &[
            format!("--network={}", lab.network),
            format!("--hostname={node}"),
            APP_IMAGE.to_owned(),
            "sleep".to_owned(),
            "infinity".to_owned(),
        ],
    );
    let ip = lab.ip_of(&pause);
    let data = lab.dir.path().join(format!("data-{node}"));
    std::fs::create_dir_all(&data).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o777)).unwrap();
    let mut args = vec![
        format!("--network=container:{pause}"),
        "--read-only".to_owned(),
        "--cap-drop=ALL".to_owned(),
        "--security-opt=no-new-privileges".to_owned(),
        format!("--volume={}:/ca", ca.display()),
        format!("--volume={}:/var/lib/shoal", data.display()),
        "-e".to_owned(),
        "SHOAL_DEV=true".to_owned(),
        "-e".to_owned(),
        "SHOAL_CA_DIR=/ca".to_owned(),
        "-e".to_owned(),
        format!("SHOAL_NODE_NAME={node}"),
        "-e".to_owned(),
        format!("SHOAL_ADVERTISE_ADDR={ip}:4701"),
        "-e".to_owned(),
        format!("SHOAL_REPLACE_AFTER={REPLACE_AFTER}"),
        "-e".to_owned(),
        "SHOAL_LOG_FORMAT=json".to_owned(),
    ];
    if let Some(seed) = seed {
        args.push("-e".to_owned());
        args.push(format!("SHOAL_JOIN={seed}:4701"));
    }
    args.push(AGENT_IMAGE.to_owned());
    let agent = lab.run(node, &args);
    AgentPod {
        node: node.to_owned(),
        pause,
        agent,
        ip,
        data,
    }
}

async fn wait_members(pods: &[&AgentPod], nodes: &[&str]) {
    let want: BTreeSet<String> = nodes.iter().map(|n| (*n).to_owned()).collect();
    for p in pods {
        eventually(
            &format!("{} sees {nodes:?} alive", p.node),
            Duration::from_secs(90),
            || (p.alive_members()? == want).then_some(()),
        )
        .await;
    }
}

/// Reads `subscription` on `pod` until every number of `acked` was read.
async fn read_all(pod: &AgentPod, subscription: &str, acked: &BTreeSet<u32>) {
    let (code, body) = pod.curl(
        "PUT",
        &format!("/v1/subscriptions/{subscription}"),
        Some(r#"{"topic": "orders", "start": "earliest"}"#),
    );
    assert!(code == 200 || code == 201, "{code} {body}");
    let mut read = BTreeSet::new();
    eventually(
        &format!(
            "{} reads all {} acknowledged messages",
            pod.node,
            acked.len()
        ),
        Duration::from_secs(120),
        || {
            read.extend(pod.pull(subscription));
            acked.is_subset(&read).then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_acknowledged_message_is_lost_when_pods_are_replaced_cut_off_frozen_or_restarted() {
    if !docker_ready("docker_faults", &[AGENT_IMAGE]) {
        return;
    }
    let lab = Lab::new();
    let ca = lab.dir.path().join("ca");
    std::fs::create_dir_all(&ca).unwrap();
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&ca, std::fs::Permissions::from_mode(0o777)).unwrap();
    }
    let a1 = start_agent(&lab, &ca, "agent-1", None);
    eventually("agent-1 is ready", Duration::from_secs(60), || {
        (host_curl(&format!("http://{}:4702/readyz", a1.ip)).0 == 200).then_some(())
    })
    .await;
    let a2 = start_agent(&lab, &ca, "agent-2", Some(a1.ip));
    let a3 = start_agent(&lab, &ca, "agent-3", Some(a1.ip));
    wait_members(&[&a1, &a2, &a3], &["agent-1", "agent-2", "agent-3"]).await;

    let (code, body) = a1.curl(
        "PUT",
        "/v1/topics/orders",
        Some(&format!(r#"{{"partitions": {PARTITIONS}, "replicas": 3}}"#)),
    );
    assert!(code == 200 || code == 201, "{code} {body}");
    let mut acked = a1.publish(1, 600);
    assert_eq!(
        acked.len(),
        600,
        "every publish acknowledged before the faults"
    );

    // A pod replaced: agent-2 killed, its data gone, agent-4 in its place.
    must(&["kill", "--signal=KILL", &a2.agent]);
    must(&["rm", "-f", &a2.agent, &a2.pause]);
    std::fs::remove_dir_all(&a2.data).unwrap();
    let a4 = start_agent(&lab, &ca, "agent-4", Some(a1.ip));
    wait_members(&[&a1, &a3, &a4], &["agent-1", "agent-3", "agent-4"]).await;
    read_all(&a3, "after-replace", &acked).await;
    // The gone agent's replicas are replaced: agent-4 votes in every
    // partition's group, agent-2 in none.
    eventually(
        "agent-4 replaces agent-2 in every partition",
        Duration::from_secs(120),
        || {
            let (_, body) = a4.curl("GET", "/v1/cluster", None);
            let v: Value = serde_json::from_str(&body).ok()?;
            let groups: Vec<&Value> = v["replicated"]
                .as_array()?
                .iter()
                .filter(|g| g["topic"] == "orders")
                .collect();
            let replaced = groups.iter().all(|g| {
                let voters = g["voters"].to_string();
                voters.contains("agent-4") && !voters.contains("agent-2")
            });
            (groups.len() == PARTITIONS as usize && replaced).then_some(())
        },
    )
    .await;
    let more = a1.publish(601, 700);
    assert_eq!(
        more.len(),
        100,
        "every partition takes publishes after the replacement"
    );
    acked.extend(more);

    // agent-3's network cut for 20 s while agent-1 publishes, then healed.
    a3.cut(true);
    let publisher = {
        let a1 = a1.clone();
        tokio::task::spawn_blocking(move || a1.publish(701, 800))
    };
    tokio::time::sleep(Duration::from_secs(20)).await;
    a3.cut(false);
    let during = publisher.await.unwrap();
    assert_eq!(
        during.len(),
        100,
        "publishes go on while one of three replicas is cut off"
    );
    acked.extend(during);
    wait_members(&[&a1, &a3, &a4], &["agent-1", "agent-3", "agent-4"]).await;
    // Read through every agent, the one that was cut off among them.
    read_all(&a4, "after-cut-4", &acked).await;
    read_all(&a3, "after-cut-3", &acked).await;

    // agent-4 frozen for 15 s (SIGSTOP for every process of the container)
    // while agent-1 publishes, then thawed.
    let publisher = {
        let a1 = a1.clone();
        tokio::task::spawn_blocking(move || a1.publish(801, 900))
    };
    must(&["pause", &a4.agent]);
    tokio::time::sleep(Duration::from_secs(15)).await;
    must(&["unpause", &a4.agent]);
    let during = publisher.await.unwrap();
    assert_eq!(
        during.len(),
        100,
        "publishes go on while a replica is frozen"
    );
    acked.extend(during);

    // A rolling restart (SIGTERM, then the same container again, its data
    // kept) of every agent in turn while agent-1 publishes; agent-1's app
    // retries while its own agent restarts, as an app would.
    let publisher = {
        let a1 = a1.clone();
        tokio::task::spawn_blocking(move || a1.publish(901, 1100))
    };
    for p in [&a3, &a4, &a1] {
        must(&["restart", "--time=20", &p.agent]);
        wait_members(&[&a1, &a3, &a4], &["agent-1", "agent-3", "agent-4"]).await;
    }
    let during = publisher.await.unwrap();
    assert_eq!(
        during.len(),
        200,
        "publishes go on through a rolling restart"
    );
    acked.extend(during);
    read_all(&a1, "after-restarts-1", &acked).await;
    read_all(&a4, "after-restarts-4", &acked).await;
    assert_eq!(acked.len(), 1100);
    drop(lab);
}
