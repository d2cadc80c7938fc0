//! Replication against real faults, with agents as containers on a network
//! of their own: the two failures that used to lose acknowledged messages.
//!
//! - An agent killed with SIGKILL, its data directory thrown away and a
//!   replacement started under a new name (a pod replaced, as Kubernetes
//!   does every day).
//! - An agent's network cut for 20 s (iptables in its network namespace)
//!   and then healed.
//! - An agent frozen for 15 s (`docker pause`: SIGSTOP for the container).
//! - An agent killed with SIGKILL while publishes go on, and started again
//!   on its data.
//! - A rolling restart: every agent in turn stopped with SIGTERM and
//!   started again with its data.
//! - 20 % of the packets between two agents dropped, both ways.
//! - A byte flipped in a follower's segment, the follower killed and
//!   started on the damaged file, then a second replica killed.
//!
//! Every publish carries a `Shoal-Id` and is retried until acknowledged,
//! as an app would; the read-back checks each key's order, counts
//! duplicates, and the longest wait for an ack is printed per fault.
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
/// Distinct `Shoal-Key`s: message `m<i>` has key `k<i mod KEYS>`.
const KEYS: u32 = 37;
/// Seconds an app waits before it retries a publish that was not acknowledged.
const RETRY_PAUSE: f64 = 0.5;

/// What a publisher saw: the message numbers acknowledged, and the longest an
/// acknowledged message waited from its first attempt to its ack (the longest
/// its partition went without a leader that could take it, as an app sees it).
#[derive(Default)]
struct Published {
    acked: BTreeSet<u32>,
    longest: Duration,
}

impl Published {
    /// Reads the publish script's output: a `try <i> <status> <seconds>` line
    /// per attempt, then `acked <i>` or `gave-up <i>`.
    fn parse(out: &str) -> Published {
        let mut published = Published::default();
        let mut waited = 0.0_f64;
        for line in out.lines() {
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.as_slice() {
                ["try", _, status, seconds] => {
                    waited += seconds.parse::<f64>().unwrap_or(0.0);
                    if *status != "201" {
                        waited += RETRY_PAUSE;
                    }
                }
                ["acked", i] => {
                    published.acked.insert(i.parse().unwrap());
                    published.longest = published.longest.max(Duration::from_secs_f64(waited));
                    waited = 0.0;
                }
                _ => waited = 0.0,
            }
        }
        published
    }

    /// Takes in another publisher's result, printing its longest wait.
    fn add(&mut self, phase: &str, other: Published) {
        eprintln!(
            "{phase}: {} acknowledged; the longest wait for an ack was {:.1?}",
            other.acked.len(),
            other.longest
        );
        self.acked.extend(other.acked);
        self.longest = self.longest.max(other.longest);
    }
}

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

    /// Publishes `orders` messages `m<from>`..=`m<to>` (keyed, each with a
    /// `Shoal-Id`), each retried as an app would until acknowledged or given
    /// up, pausing `pace` seconds after each, so a publisher outlasts the
    /// fault it runs through.
    fn publish(&self, from: u32, to: u32, pace: f64) -> Published {
        let script = format!(
            "i={from}; while [ $i -le {to} ]; do n=0; \
             until c=$(curl -sS -m 10 -o /dev/null -w '%{{http_code}} %{{time_total}}' -X POST \
               -H \"Shoal-Key: k$((i % {KEYS}))\" -H \"Shoal-Id: m$i\" -H 'content-type: text/plain' \
               --data \"m$i\" http://127.0.0.1:4700/v1/topics/orders/messages); \
               echo try $i $c; [ \"${{c%% *}}\" = 201 ]; do \
               n=$((n+1)); if [ $n -ge 60 ]; then break; fi; sleep {RETRY_PAUSE}; done; \
             if [ $n -lt 60 ]; then echo acked $i; else echo gave-up $i; fi; \
             sleep {pace}; i=$((i+1)); done"
        );
        let out = must(&["exec", &self.pause, "sh", "-c", &script]);
        Published::parse(&out)
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

impl AgentPod {
    /// Drops (or stops dropping) `percent` % of the packets between this
    /// pod and `peer`, both ways as seen from this pod.
    fn lossy(&self, peer: IpAddr, percent: u32, on: bool) {
        let pid = must(&["inspect", "-f", "{{.State.Pid}}", &self.pause]);
        let op = if on { "-I" } else { "-D" };
        let peer = peer.to_string();
        let probability = format!("{:.2}", f64::from(percent) / 100.0);
        for (chain, way) in [("INPUT", "-s"), ("OUTPUT", "-d")] {
            let status = std::process::Command::new("nsenter")
                .args(["-t", &pid, "-n", "iptables", op, chain, way, &peer])
                .args(["-m", "statistic", "--mode", "random", "--probability"])
                .args([&probability, "-j", "DROP"])
                .status()
                .unwrap();
            assert!(status.success(), "iptables {op} {chain} in {}", self.node);
        }
    }

    /// The newest segment file of this agent's copy of `orders` partition
    /// `partition`.
    fn last_segment(&self, partition: u64) -> PathBuf {
        let dir = self
            .data
            .join("replicas/default/orders")
            .join(partition.to_string());
        let mut logs: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "log"))
            .collect();
        logs.sort();
        logs.pop()
            .unwrap_or_else(|| panic!("no segment in {}", dir.display()))
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

/// Reads `subscription` on `pod` from the start until every number of
/// `acked` was read; checks that each key's messages came in the order they
/// were published and prints how many were delivered twice.
async fn read_all(pod: &AgentPod, subscription: &str, acked: &BTreeSet<u32>) {
    let (code, body) = pod.curl(
        "PUT",
        &format!("/v1/subscriptions/{subscription}"),
        Some(r#"{"topic": "orders", "start": "earliest"}"#),
    );
    assert!(code == 200 || code == 201, "{code} {body}");
    let mut read = BTreeSet::new();
    let mut duplicates = 0;
    let mut last_of_key: std::collections::BTreeMap<u32, u32> = Default::default();
    eventually(
        &format!(
            "{} reads all {} acknowledged messages",
            pod.node,
            acked.len()
        ),
        Duration::from_secs(120),
        || {
            for m in pod.pull(subscription) {
                if !read.insert(m) {
                    duplicates += 1;
                    continue;
                }
                if let Some(before) = last_of_key.insert(m % KEYS, m) {
                    assert!(
                        before < m,
                        "{}: key k{} delivered m{m} after m{before}",
                        pod.node,
                        m % KEYS
                    );
                }
            }
            acked.is_subset(&read).then_some(())
        },
    )
    .await;
    eprintln!(
        "{} read back all {} acknowledged messages ({} read in all), each key in order, {duplicates} delivered twice",
        pod.node,
        acked.len(),
        read.len()
    );
}

/// The `orders` groups as `pod`'s agent reports them in `/v1/cluster`.
fn groups_of(pod: &AgentPod) -> Option<Vec<Value>> {
    let (_, body) = pod.curl("GET", "/v1/cluster", None);
    let v: Value = serde_json::from_str(&body).ok()?;
    Some(
        v["replicated"]
            .as_array()?
            .iter()
            .filter(|g| g["topic"] == "orders")
            .cloned()
            .collect(),
    )
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
    let mut published = Published::default();
    let first = a1.publish(1, 600, 0.0);
    assert_eq!(
        first.acked.len(),
        600,
        "every publish acknowledged before the faults"
    );
    published.add("before the faults", first);

    // A pod replaced: agent-2 killed, its data gone, agent-4 in its place.
    must(&["kill", "--signal=KILL", &a2.agent]);
    must(&["rm", "-f", &a2.agent, &a2.pause]);
    std::fs::remove_dir_all(&a2.data).unwrap();
    let a4 = start_agent(&lab, &ca, "agent-4", Some(a1.ip));
    wait_members(&[&a1, &a3, &a4], &["agent-1", "agent-3", "agent-4"]).await;
    read_all(&a3, "after-replace", &published.acked).await;
    // The gone agent's replicas are replaced: agent-4 votes in every
    // partition's group, agent-2 in none.
    eventually(
        "agent-4 replaces agent-2 in every partition",
        Duration::from_secs(120),
        || {
            let groups = groups_of(&a4)?;
            let replaced = groups.iter().all(|g| {
                let voters = g["voters"].to_string();
                voters.contains("agent-4") && !voters.contains("agent-2")
            });
            (groups.len() == PARTITIONS as usize && replaced).then_some(())
        },
    )
    .await;
    let more = a1.publish(601, 700, 0.0);
    assert_eq!(
        more.acked.len(),
        100,
        "every partition takes publishes after the replacement"
    );
    published.add("after the replacement", more);

    // agent-3's network cut for 20 s while agent-1 publishes, then healed.
    a3.cut(true);
    let publisher = {
        let a1 = a1.clone();
        tokio::task::spawn_blocking(move || a1.publish(701, 800, 0.15))
    };
    tokio::time::sleep(Duration::from_secs(20)).await;
    a3.cut(false);
    let during = publisher.await.unwrap();
    assert_eq!(
        during.acked.len(),
        100,
        "publishes go on while one of three replicas is cut off"
    );
    published.add("agent-3 cut off for 20 s", during);
    wait_members(&[&a1, &a3, &a4], &["agent-1", "agent-3", "agent-4"]).await;
    // Read through every agent, the one that was cut off among them.
    read_all(&a4, "after-cut-4", &published.acked).await;
    read_all(&a3, "after-cut-3", &published.acked).await;

    // agent-4 frozen for 15 s (SIGSTOP for every process of the container)
    // while agent-1 publishes, then thawed.
    let publisher = {
        let a1 = a1.clone();
        tokio::task::spawn_blocking(move || a1.publish(801, 900, 0.15))
    };
    must(&["pause", &a4.agent]);
    tokio::time::sleep(Duration::from_secs(15)).await;
    must(&["unpause", &a4.agent]);
    let during = publisher.await.unwrap();
    assert_eq!(
        during.acked.len(),
        100,
        "publishes go on while a replica is frozen"
    );
    published.add("agent-4 frozen for 15 s", during);

    // agent-3 killed with SIGKILL while agent-1 publishes, and started again
    // on its data 5 s later (a crash, as an OOM kill is).
    let publisher = {
        let a1 = a1.clone();
        tokio::task::spawn_blocking(move || a1.publish(901, 1050, 0.1))
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    must(&["kill", "--signal=KILL", &a3.agent]);
    tokio::time::sleep(Duration::from_secs(5)).await;
    must(&["start", &a3.agent]);
    let during = publisher.await.unwrap();
    assert_eq!(
        during.acked.len(),
        150,
        "publishes go on while a replica is killed and restarts"
    );
    published.add("agent-3 killed with SIGKILL and restarted", during);
    wait_members(&[&a1, &a3, &a4], &["agent-1", "agent-3", "agent-4"]).await;

    // A rolling restart (SIGTERM, then the same container again, its data
    // kept) of every agent in turn while agent-1 publishes; agent-1's app
    // retries while its own agent restarts, as an app would.
    let publisher = {
        let a1 = a1.clone();
        tokio::task::spawn_blocking(move || a1.publish(1051, 1350, 0.2))
    };
    for p in [&a3, &a4, &a1] {
        must(&["restart", "--time=20", &p.agent]);
        wait_members(&[&a1, &a3, &a4], &["agent-1", "agent-3", "agent-4"]).await;
    }
    let during = publisher.await.unwrap();
    assert_eq!(
        during.acked.len(),
        300,
        "publishes go on through a rolling restart"
    );
    published.add("a rolling restart", during);
    read_all(&a1, "after-restarts-1", &published.acked).await;
    read_all(&a4, "after-restarts-4", &published.acked).await;

    // 20 % of the packets between agent-1 and agent-3 dropped, both ways,
    // while agent-1 publishes. (iptables' statistic match: this kernel has
    // no netem qdisc.)
    a1.lossy(a3.ip, 20, true);
    a3.lossy(a1.ip, 20, true);
    let lossy = a1.publish(1351, 1450, 0.05);
    a1.lossy(a3.ip, 20, false);
    a3.lossy(a1.ip, 20, false);
    assert_eq!(
        lossy.acked.len(),
        100,
        "publishes go on over a link that loses 20 % of its packets"
    );
    published.add("20 % packet loss between agent-1 and agent-3", lossy);

    // A flipped byte in the middle of a follower's copy of a partition (as
    // a failing disk would), then a crash of that follower: it starts again
    // on the damaged file, must repair it from the others, and then carry
    // the partition with one other replica when a third is killed.
    let partition = eventually(
        "a partition whose leader is not agent-4",
        Duration::from_secs(60),
        || {
            groups_of(&a4)?.iter().find_map(|g| {
                let leader = g["leader"].as_str()?;
                (leader != "agent-4").then(|| g["partition"].as_u64().unwrap())
            })
        },
    )
    .await;
    let segment = a4.last_segment(partition);
    {
        use std::os::unix::fs::FileExt as _;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&segment)
            .unwrap();
        let at = file.metadata().unwrap().len() / 2;
        let mut byte = [0u8];
        file.read_exact_at(&mut byte, at).unwrap();
        file.write_all_at(&[byte[0] ^ 0x5a], at).unwrap();
    }
    must(&["kill", "--signal=KILL", &a4.agent]);
    must(&["start", &a4.agent]);
    wait_members(&[&a1, &a3, &a4], &["agent-1", "agent-3", "agent-4"]).await;
    let after = a1.publish(1451, 1550, 0.0);
    assert_eq!(
        after.acked.len(),
        100,
        "publishes go on after a follower restarts on a damaged segment"
    );
    published.add("agent-4 restarted on a damaged segment", after);
    // agent-4 repairs its copy: it has every entry the others committed.
    let group = |pod: &AgentPod| -> Option<Value> {
        groups_of(pod)?
            .into_iter()
            .find(|g| g["partition"] == partition)
    };
    eventually(
        &format!("agent-4 catches up on partition {partition}"),
        Duration::from_secs(90),
        || {
            let committed = [&a1, &a3]
                .into_iter()
                .filter_map(|p| group(p)?["commitIndex"].as_u64())
                .max()?;
            let mine = group(&a4)?;
            (mine["recovering"] == false && mine["lastIndex"].as_u64()? >= committed).then_some(())
        },
    )
    .await;
    // Then the partition's leader dies (agent-3 if agent-4 leads it now):
    // agent-4 and one other must hold every acknowledged message.
    let leader = group(&a4).and_then(|g| g["leader"].as_str().map(str::to_owned));
    let victim = [&a1, &a3]
        .into_iter()
        .find(|p| Some(&p.node) == leader.as_ref())
        .unwrap_or(&a3);
    let reader = if victim.node == a1.node { &a3 } else { &a1 };
    must(&["kill", "--signal=KILL", &victim.agent]);
    eprintln!(
        "flipped a byte in agent-4's copy of partition {partition}, crashed it, \
         then killed the partition's leader {} once agent-4 had caught up",
        victim.node
    );
    read_all(reader, "after-damage", &published.acked).await;
    assert_eq!(published.acked.len(), 1550);
    eprintln!(
        "the longest any acknowledged publish waited for its ack: {:.1?}",
        published.longest
    );
    drop(lab);
}
