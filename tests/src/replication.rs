//! Replicated partitions (issue 11), `--only replication`: durable R=3
//! publishes on a mesh of three agents against JetStream R3 on three
//! clustered nats-servers, the time a partition takes to accept publishes
//! again after its leader is killed, what three agents holding 1,000
//! partitions x 3 replicas cost while idle, and how long those partitions
//! take to have three replicas again after a pod is replaced.
//!
//! Unlike [`crate::mesh::Mesh`], the agents here keep their name, ports and
//! data directory across a restart (a pod's container restarted), so the
//! failover part can kill a leader with SIGKILL and bring it back.

use crate::agent::{free_port, stop_child, ProcStats};
use crate::conn::{Conn, Pool};
use crate::report::{mb, ms, thousands, Machine};
use crate::workloads::{new_histogram, record};
use crate::BoxError;
use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, StreamExt};
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use shoal_agent::client::AgentClient;
use std::collections::BTreeMap;
use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Start of the generated section in docs/benchmarks.md.
pub const BEGIN_PREFIX: &str = "<!-- shoal-bench:replication:begin";
/// End of the generated section.
pub const END: &str = "<!-- shoal-bench:replication:end -->";

/// Counts and durations of the replication part.
#[derive(Clone, Debug)]
pub struct ReplPlan {
    /// Rounds per system and mode (alternating Shoal, NATS, Shoal, NATS).
    pub rounds: usize,
    /// Longest publishing round.
    pub round_time: Duration,
    /// Most messages of a round.
    pub round_max: u64,
    /// Message size in bytes.
    pub size: usize,
    /// Publishes in flight of the pipelined mode.
    pub inflight: usize,
    /// Shoal's publishers share one h2c connection instead of one HTTP/1.1
    /// keep-alive connection each.
    pub h2: bool,
    /// Leader kills of the failover part.
    pub kills: usize,
    /// Leader kills of an idle partition (its group asleep), after those.
    pub idle_kills: usize,
    /// Partitions (x 3 replicas) of the idle part.
    pub idle_partitions: u32,
    /// Idle window.
    pub idle_time: Duration,
    /// Longest wait for the idle part's groups to form.
    pub form_limit: Duration,
    /// Whether the idle mesh then has a pod replaced (agent-3 killed, its
    /// data thrown away, agent-4 started under a new name).
    pub replace: bool,
    /// Batches of 1,000 messages of 1 KiB published before the replacement.
    pub replace_batches: usize,
}

impl ReplPlan {
    /// The full plan, or small counts with `quick`.
    pub fn new(quick: bool) -> ReplPlan {
        if quick {
            ReplPlan {
                rounds: 1,
                round_time: Duration::from_secs(1),
                round_max: 20_000,
                size: 128,
                inflight: 64,
                h2: false,
                kills: 2,
                idle_kills: 1,
                idle_partitions: 50,
                idle_time: Duration::from_secs(10),
                form_limit: Duration::from_secs(120),
                replace: true,
                replace_batches: 1,
            }
        } else {
            ReplPlan {
                rounds: 2,
                round_time: Duration::from_secs(5),
                round_max: 1_000_000,
                size: 128,
                inflight: 64,
                h2: false,
                kills: 10,
                idle_kills: 5,
                idle_partitions: 1000,
                idle_time: Duration::from_secs(60),
                form_limit: Duration::from_secs(900),
                replace: true,
                replace_batches: 8,
            }
        }
    }
}

// ----- agents that can be killed and restarted -----

/// One agent whose name, ports and data directory survive a restart.
struct Node {
    name: String,
    app: SocketAddr,
    admin: SocketAddr,
    mesh: SocketAddr,
    data: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    client: AgentClient,
}

impl Node {
    /// A node named `name` with free loopback ports and its data and log
    /// under `root`; not started.
    fn new(root: &Path, name: &str) -> Result<Node, BoxError> {
        let app: SocketAddr = ([127, 0, 0, 1], free_port()?).into();
        Ok(Node {
            data: root.join(name),
            log: root.join(format!("{name}.log")),
            admin: ([127, 0, 0, 1], free_port()?).into(),
            mesh: ([127, 0, 0, 1], free_port()?).into(),
            client: AgentClient::new(&format!("http://{app}")),
            app,
            name: name.to_string(),
            child: None,
        })
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    fn spawn(&mut self, bin: &Path, ca: &Path, join: Option<SocketAddr>) -> Result<(), BoxError> {
        let log = File::options().create(true).append(true).open(&self.log)?;
        let mut cmd = Command::new(bin);
        cmd.args(["--dev", "--node-name", &self.name])
            .arg("--ca-dir")
            .arg(ca)
            .arg("--data-dir")
            .arg(&self.data)
            .arg("--app-addr")
            .arg(self.app.to_string())
            .arg("--admin-addr")
            .arg(self.admin.to_string())
            .arg("--mesh-addr")
            .arg(self.mesh.to_string())
            .args(["--shutdown-timeout", "3s"]);
        if let Some(seed) = join {
            cmd.arg("--join").arg(seed.to_string());
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        println!(
            "==> {} pid {} (app {}, admin {}, mesh {}, data {})",
            self.name,
            child.id(),
            self.app,
            self.admin,
            self.mesh,
            self.data.display()
        );
        self.child = Some(child);
        Ok(())
    }

    /// SIGKILL, then reaps the process.
    fn kill9(&mut self) -> Result<(), BoxError> {
        if let Some(mut c) = self.child.take() {
            c.kill()?;
            c.wait()?;
        }
        Ok(())
    }

    fn check_alive(&mut self) -> Result<(), BoxError> {
        if let Some(c) = &mut self.child {
            if let Some(status) = c.try_wait()? {
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                let lines: Vec<&str> = log.lines().collect();
                return Err(format!(
                    "{} exited ({status}); its log ends with:\n{}",
                    self.name,
                    lines[lines.len().saturating_sub(20)..].join("\n")
                )
                .into());
            }
        }
        Ok(())
    }

    async fn wait_ready(&mut self, limit: Duration) -> Result<Duration, BoxError> {
        let started = Instant::now();
        let admin = AgentClient::new(&format!("http://{}", self.admin));
        loop {
            self.check_alive()?;
            if let Ok(Ok(r)) =
                tokio::time::timeout(Duration::from_secs(2), admin.get("/readyz")).await
            {
                if r.status.is_success() {
                    return Ok(started.elapsed());
                }
            }
            if started.elapsed() > limit {
                return Err(format!("{} was not ready within {limit:?}", self.name).into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Lines of its log that say WARN or ERROR.
    fn warnings(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("WARN") || l.contains("ERROR"))
            .map(str::to_string)
            .collect()
    }
}

/// Three agents (agent-1 creates the meta group; 2 and 3 join it), stopped
/// when dropped, before their directory is removed.
struct Cluster {
    bin: PathBuf,
    ca: PathBuf,
    nodes: Vec<Node>,
    // Dropped after the nodes are stopped in `Drop::drop`.
    _root: tempfile::TempDir,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            if let Some(c) = &mut n.child {
                if let Ok(None) = c.try_wait() {
                    let _ = Command::new("kill")
                        .args(["-TERM", &c.id().to_string()])
                        .status();
                }
            }
        }
        for n in &mut self.nodes {
            if let Some(c) = &mut n.child {
                stop_child(c, &n.name);
            }
        }
    }
}

/// What a group's leader says of it in `/v1/cluster`.
#[derive(Clone, Debug)]
struct Group {
    leader: String,
    voters: usize,
    term: u64,
}

impl Cluster {
    async fn start(bin: &Path) -> Result<Cluster, BoxError> {
        let root = tempfile::Builder::new()
            .prefix("shoal-bench-repl-")
            .tempdir()?;
        let ca = root.path().join("ca");
        let mut nodes = Vec::new();
        for i in 1..=3 {
            nodes.push(Node::new(root.path(), &format!("agent-{i}"))?);
        }
        let mut c = Cluster {
            bin: bin.to_path_buf(),
            ca,
            nodes,
            _root: root,
        };
        let started = Instant::now();
        for i in 0..3 {
            c.spawn(i)?;
            if i == 0 {
                // agent-1 creates the CA the others load.
                c.nodes[0].wait_ready(Duration::from_secs(30)).await?;
            }
        }
        for n in &mut c.nodes[1..] {
            n.wait_ready(Duration::from_secs(30)).await?;
        }
        c.wait_members(Duration::from_secs(60)).await?;
        println!(
            "==> replicated mesh of 3 ready in {} ms",
            started.elapsed().as_millis()
        );
        Ok(c)
    }

    /// (Re)starts node `i`: agent-1 without `--join`, the others joining it.
    fn spawn(&mut self, i: usize) -> Result<(), BoxError> {
        let join = (i > 0).then_some(self.nodes[0].mesh);
        let (bin, ca) = (self.bin.clone(), self.ca.clone());
        self.nodes[i].spawn(&bin, &ca, join)
    }

    fn pids(&self) -> Vec<u32> {
        self.nodes.iter().map(Node::pid).collect()
    }

    fn check_alive(&mut self) -> Result<(), BoxError> {
        for n in &mut self.nodes {
            n.check_alive()?;
        }
        Ok(())
    }

    fn index_of(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.name == name)
    }

    async fn cluster(&self, i: usize) -> Option<Value> {
        let r = tokio::time::timeout(
            Duration::from_secs(5),
            self.nodes[i].client.get("/v1/cluster"),
        )
        .await
        .ok()?
        .ok()?;
        (r.status == 200).then(|| r.json())
    }

    async fn wait_members(&mut self, limit: Duration) -> Result<(), BoxError> {
        let started = Instant::now();
        loop {
            self.check_alive()?;
            let mut all = true;
            for i in 0..self.nodes.len() {
                let alive = self.cluster(i).await.is_some_and(|v| {
                    let m = v["members"].as_array().cloned().unwrap_or_default();
                    m.len() == 3 && m.iter().all(|m| m["state"] == "alive")
                });
                all &= alive;
            }
            if all {
                return Ok(());
            }
            if started.elapsed() > limit {
                return Err(
                    format!("the agents did not see 3 alive members within {limit:?}").into(),
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Partition → group, for `topic`, as each group's leader reports it
    /// (only leaders with no learners left).
    async fn leaders(&self, topic: &str) -> BTreeMap<u64, Group> {
        let mut out = BTreeMap::new();
        for i in 0..self.nodes.len() {
            let Some(v) = self.cluster(i).await else {
                continue;
            };
            for g in v["replicated"].as_array().into_iter().flatten() {
                if g["topic"] == topic
                    && g["leader"].as_str() == Some(self.nodes[i].name.as_str())
                    && g["learners"].as_array().is_none_or(|l| l.is_empty())
                {
                    if let Some(p) = g["partition"].as_u64() {
                        out.insert(
                            p,
                            Group {
                                leader: self.nodes[i].name.clone(),
                                voters: g["voters"].as_array().map_or(0, Vec::len),
                                term: g["term"].as_u64().unwrap_or(0),
                            },
                        );
                    }
                }
            }
        }
        out
    }

    /// Waits until every agent reports partition 0 of `topic` asleep
    /// (hibernating); polling `/v1/cluster` does not wake it.
    async fn wait_asleep(&self, topic: &str, limit: Duration) -> Result<(), BoxError> {
        let started = Instant::now();
        loop {
            let mut asleep = 0;
            for i in 0..self.nodes.len() {
                let Some(v) = self.cluster(i).await else {
                    continue;
                };
                asleep += v["replicated"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|g| {
                        g["topic"] == topic && g["partition"] == 0 && g["hibernating"] == true
                    })
                    .count();
            }
            if asleep == self.nodes.len() {
                return Ok(());
            }
            if started.elapsed() > limit {
                return Err(format!(
                    "partition 0 of {topic} asleep on {asleep} of {} agents after {limit:?}",
                    self.nodes.len()
                )
                .into());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits until each of `partitions` partitions of `topic` has a leader
    /// and three voters; returns how long it took, or how many had formed.
    async fn wait_formed(
        &self,
        topic: &str,
        partitions: u64,
        limit: Duration,
        poll: Duration,
    ) -> Result<Duration, (usize, Duration)> {
        let started = Instant::now();
        let mut last_print = Instant::now();
        loop {
            let l = self.leaders(topic).await;
            let n = l.values().filter(|g| g.voters == 3).count();
            if n as u64 == partitions {
                return Ok(started.elapsed());
            }
            if started.elapsed() > limit {
                return Err((n, started.elapsed()));
            }
            if last_print.elapsed() > Duration::from_secs(10) {
                println!(
                    "[formed] {topic}: {n} of {partitions} groups with 3 voters after {:.0} s",
                    started.elapsed().as_secs_f64()
                );
                last_print = Instant::now();
            }
            tokio::time::sleep(poll).await;
        }
    }

    /// Whether `name` holds partition 0 of `topic` as a voter following the
    /// group's leader, not recovering, and the leader counts it 0 entries
    /// behind (it has every entry).
    async fn caught_up(&self, topic: &str, name: &str) -> bool {
        let Some(me) = self.index_of(name) else {
            return false;
        };
        let mine = self.cluster(me).await.and_then(|v| {
            v["replicated"]
                .as_array()?
                .iter()
                .find(|g| g["topic"] == topic && g["partition"] == 0)
                .cloned()
        });
        let Some(mine) = mine else {
            return false;
        };
        let Some(leader) = mine["leader"].as_str().map(str::to_string) else {
            return false;
        };
        if leader == name || mine["recovering"] == true {
            return leader == name;
        }
        let Some(li) = self.index_of(&leader) else {
            return false;
        };
        self.cluster(li).await.is_some_and(|v| {
            v["replicated"].as_array().into_iter().flatten().any(|g| {
                g["topic"] == topic
                    && g["partition"] == 0
                    && g["leader"].as_str() == Some(leader.as_str())
                    && g["voters"]
                        .as_array()
                        .is_some_and(|vs| vs.iter().any(|v| v == name))
                    && g["lag"][name].as_u64() == Some(0)
            })
        })
    }

    /// Starts a new agent, `name`, with its own ports and data directory,
    /// joining agent-1.
    async fn add_node(&mut self, name: &str) -> Result<usize, BoxError> {
        self.nodes.push(Node::new(self._root.path(), name)?);
        let i = self.nodes.len() - 1;
        self.spawn(i)?;
        self.nodes[i].wait_ready(Duration::from_secs(30)).await?;
        Ok(i)
    }

    /// How many groups of `topic` have, as their leader reports them,
    /// three voters with `joined` and without `gone`, no learners, and
    /// `joined` 0 entries behind; and how many have `joined` as a voter.
    async fn replaced_in(&self, topic: &str, gone: &str, joined: &str) -> (usize, usize) {
        let (mut back, mut moved) = (0, 0);
        for i in 0..self.nodes.len() {
            if self.nodes[i].child.is_none() {
                continue;
            }
            let Some(v) = self.cluster(i).await else {
                continue;
            };
            for g in v["replicated"].as_array().into_iter().flatten() {
                if g["topic"] != topic || g["leader"].as_str() != Some(self.nodes[i].name.as_str())
                {
                    continue;
                }
                let voters: Vec<&str> = g["voters"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .collect();
                if !voters.contains(&joined) {
                    continue;
                }
                moved += 1;
                let no_learners = g["learners"].as_array().is_none_or(|l| l.is_empty());
                let caught_up =
                    joined == self.nodes[i].name || g["lag"][joined].as_u64() == Some(0);
                if voters.len() == 3 && !voters.contains(&gone) && no_learners && caught_up {
                    back += 1;
                }
            }
        }
        (back, moved)
    }

    async fn create_topic(&self, topic: &str, partitions: u32) -> Result<(), BoxError> {
        let r = self.nodes[0]
            .client
            .put_json(
                &format!("/v1/topics/{topic}"),
                &json!({"partitions": partitions, "replicas": 3}),
            )
            .await?;
        if !r.status.is_success() {
            return Err(
                format!("PUT /v1/topics/{topic} answered {}: {}", r.status, r.text()).into(),
            );
        }
        Ok(())
    }
}

// ----- three clustered nats-servers -----

/// Three nats-servers in one cluster (routes on loopback), JetStream with
/// file storage, stopped when dropped.
struct NatsCluster {
    children: Vec<(String, Child)>,
    ports: Vec<u16>,
    logs: Vec<PathBuf>,
    _dir: tempfile::TempDir,
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for (_, c) in &mut self.children {
            if let Ok(None) = c.try_wait() {
                let _ = Command::new("kill")
                    .args(["-TERM", &c.id().to_string()])
                    .status();
            }
        }
        for (name, c) in &mut self.children {
            stop_child(c, name);
        }
    }
}

impl NatsCluster {
    fn start(bin: &Path) -> Result<NatsCluster, BoxError> {
        let dir = tempfile::Builder::new()
            .prefix("shoal-bench-nats-r3-")
            .tempdir()?;
        let ports: Vec<u16> = (0..3).map(|_| free_port()).collect::<Result<_, _>>()?;
        let routes: Vec<u16> = (0..3).map(|_| free_port()).collect::<Result<_, _>>()?;
        let mut c = NatsCluster {
            children: Vec::new(),
            ports: ports.clone(),
            logs: Vec::new(),
            _dir: dir,
        };
        for i in 0..3 {
            let name = format!("js-{}", i + 1);
            let log_path = c._dir.path().join(format!("{name}.log"));
            let log = File::create(&log_path)?;
            let others: Vec<String> = (0..3)
                .filter(|j| *j != i)
                .map(|j| format!("nats://127.0.0.1:{}", routes[j]))
                .collect();
            let child = Command::new(bin)
                .args(["-a", "127.0.0.1", "-p", &ports[i].to_string(), "-n", &name])
                .args(["--cluster_name", "bench"])
                .arg("--cluster")
                .arg(format!("nats://127.0.0.1:{}", routes[i]))
                .arg("--routes")
                .arg(others.join(","))
                .arg("-js")
                .arg("-sd")
                .arg(c._dir.path().join(&name))
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
            println!(
                "==> nats-server {name} pid {} (client 127.0.0.1:{}, route 127.0.0.1:{})",
                child.id(),
                ports[i],
                routes[i]
            );
            c.children.push((name, child));
            c.logs.push(log_path);
        }
        Ok(c)
    }

    fn pids(&self) -> Vec<u32> {
        self.children.iter().map(|(_, c)| c.id()).collect()
    }

    fn url(&self, i: usize) -> String {
        format!("nats://127.0.0.1:{}", self.ports[i])
    }

    fn warnings(&self) -> Vec<String> {
        self.logs
            .iter()
            .flat_map(|p| {
                std::fs::read_to_string(p)
                    .unwrap_or_default()
                    .lines()
                    .filter(|l| l.contains("[WRN]") || l.contains("[ERR]"))
                    // Routes to servers not started yet, at start-up.
                    .filter(|l| {
                        !l.contains("Error trying to connect to route")
                            && !l.contains("Waiting for routing")
                    })
                    .map(str::to_string)
                    .collect::<Vec<_>>()
            })
            .collect()
    }
}

// ----- figures -----

/// One publishing round.
#[derive(Clone, Debug)]
pub struct Round {
    /// Acknowledged publishes.
    pub acked: u64,
    /// Failed publishes (error answers, timeouts).
    pub failed: u64,
    /// First error seen.
    pub first_error: Option<String>,
    /// Length of the round.
    pub elapsed: Duration,
    /// Publish → ack latency, µs.
    pub latency: Histogram<u64>,
    /// CPU seconds of the system's three server processes.
    pub cpu_s: f64,
}

impl Round {
    /// Acks per second.
    pub fn rate(&self) -> f64 {
        self.acked as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// The rounds of one mode (waiting for each ack, or `inflight` in flight).
#[derive(Clone, Debug)]
pub struct Mode {
    /// Publishes in flight.
    pub inflight: usize,
    /// Shoal's rounds.
    pub shoal: Vec<Round>,
    /// JetStream's rounds.
    pub nats: Vec<Round>,
}

/// One leader kill.
#[derive(Clone, Debug)]
pub struct Kill {
    /// Whether the partition was idle (its group asleep, no publish since
    /// it fell asleep) when its leader was killed.
    pub idle: bool,
    /// The killed leader.
    pub victim: String,
    /// The agent published through.
    pub via: String,
    /// Kill → first 201 of a publish sent after the kill.
    pub failover: Option<Duration>,
    /// The new leader, once formed again.
    pub new_leader: String,
    /// Publishes answered with an error (or not at all within 10 s).
    pub failed: u64,
    /// Longest publish of the load (sent before or after the kill).
    pub slowest: Duration,
    /// Restart → the restarted replica is a voter following the leader with
    /// every entry (lag 0 at the leader).
    pub reformed: Duration,
}

/// The idle part.
#[derive(Clone, Debug)]
pub struct Idle {
    /// Topics × partitions created.
    pub topics: Vec<(String, u32)>,
    /// Time until every group had three voters (or the limit).
    pub formed_in: Duration,
    /// Groups with three voters when the idle window began.
    pub formed: usize,
    /// Groups wanted.
    pub wanted: usize,
    /// CPU (share of one core) per agent over the whole window.
    pub cpu: Vec<f64>,
    /// CPU per agent, per tenth of the window.
    pub cpu_slices: Vec<Vec<f64>>,
    /// RSS per agent at the end, KiB.
    pub rss_kib: Vec<u64>,
    /// Private (anonymous) RSS per agent at the end, KiB.
    pub anon_kib: Vec<u64>,
    /// RSS per agent before any topic, KiB.
    pub rss_before_kib: Vec<u64>,
    /// Groups led per agent.
    pub led: Vec<usize>,
}

/// The replaced pod: agent-3 of the idle mesh killed with SIGKILL and its
/// data directory deleted, agent-4 started under a new name.
#[derive(Clone, Debug)]
pub struct Replace {
    /// Groups to bring back to three replicas.
    pub groups: usize,
    /// Messages acknowledged before the kill.
    pub published: u64,
    /// Bytes of their payloads.
    pub published_bytes: u64,
    /// The agents' `--replace-after` (their default).
    pub grace: Duration,
    /// Kill → every group has 3 voters, agent-4 among them and agent-3 not,
    /// no learners, and its leader counts agent-4 0 entries behind; `None`
    /// when not within the limit.
    pub back: Option<Duration>,
    /// Kill → the first group with agent-4 as a voter.
    pub first_moved: Option<Duration>,
    /// (seconds since the kill, groups back) every 10 s.
    pub progress: Vec<(u64, usize)>,
    /// Groups back at the end.
    pub back_count: usize,
}

/// Everything the replication part measured.
pub struct ReplResults {
    /// The modes (1 and `inflight` in flight).
    pub modes: Vec<Mode>,
    /// The kills.
    pub kills: Vec<Kill>,
    /// The idle part.
    pub idle: Option<Idle>,
    /// The replaced pod, after the idle part.
    pub replace: Option<Replace>,
    /// Shoal leader of the throughput topic before and after the rounds.
    pub tput_leaders: (String, String),
    /// Agent the throughput rounds published through.
    pub tput_via: String,
    /// Stream leader and the server the NATS publisher used.
    pub nats_leader: (String, String),
    /// Notable agent and nats-server log lines.
    pub warnings: Vec<String>,
}

fn cpu_ticks(pids: &[u32]) -> Vec<u64> {
    pids.iter()
        .map(|p| ProcStats::read(*p).map_or(0, |s| s.cpu_ticks))
        .collect()
}

fn cpu_s(a: &[u64], b: &[u64], clk_tck: f64) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| y.saturating_sub(*x) as f64 / clk_tck)
        .sum()
}

// ----- Shoal and JetStream rounds -----

/// Closed loop on `connections` keep-alive connections to `app`, each
/// sending its next publish when the last is answered; bounded by `plan`.
async fn shoal_round(
    app: SocketAddr,
    topic: &str,
    connections: usize,
    plan: &ReplPlan,
    pids: &[u32],
    clk_tck: f64,
) -> Result<Round, BoxError> {
    let path = format!("/v1/topics/{topic}/messages");
    let body = Bytes::from(vec![b'x'; plan.size]);
    let mut conns = Vec::new();
    let shared = if plan.h2 {
        Some(Conn::open_h2(app).await?)
    } else {
        None
    };
    for _ in 0..connections {
        match shared.as_ref().and_then(Conn::share) {
            Some(c) => conns.push(c),
            None => conns.push(Conn::open(app).await?),
        }
    }
    drop(shared);
    let h2 = plan.h2;
    let c0 = cpu_ticks(pids);
    let t0 = Instant::now();
    let end = t0 + plan.round_time;
    let budget = Arc::new(std::sync::atomic::AtomicU64::new(plan.round_max));
    let mut tasks = tokio::task::JoinSet::new();
    for mut conn in conns {
        let (path, body, budget) = (path.clone(), body.clone(), budget.clone());
        tasks.spawn(async move {
            let mut h = new_histogram()?;
            let (mut ok, mut failed, mut first) = (0u64, 0u64, None::<String>);
            while Instant::now() < end
                && budget
                    .fetch_update(
                        std::sync::atomic::Ordering::Relaxed,
                        std::sync::atomic::Ordering::Relaxed,
                        |b| b.checked_sub(1),
                    )
                    .is_ok()
            {
                let t = Instant::now();
                let r = tokio::time::timeout(
                    Duration::from_secs(10),
                    conn.post(&path, "application/octet-stream", body.clone()),
                )
                .await;
                match r {
                    Ok(Ok((s, _))) if s.is_success() => {
                        ok += 1;
                        record(&mut h, t.elapsed());
                    }
                    Ok(Ok((s, b))) => {
                        failed += 1;
                        first
                            .get_or_insert_with(|| format!("{s}: {}", String::from_utf8_lossy(&b)));
                    }
                    Ok(Err(e)) => {
                        failed += 1;
                        first.get_or_insert_with(|| e.to_string());
                        conn = Conn::open_as(app, h2).await?;
                    }
                    Err(_) => {
                        failed += 1;
                        first.get_or_insert_with(|| "no answer within 10 s".into());
                        conn = Conn::open_as(app, h2).await?;
                    }
                }
            }
            Ok::<_, BoxError>((h, ok, failed, first))
        });
    }
    let mut latency = new_histogram()?;
    let (mut acked, mut failed, mut first_error) = (0, 0, None);
    while let Some(r) = tasks.join_next().await {
        let (h, ok, f, first) = r??;
        latency.add(&h)?;
        acked += ok;
        failed += f;
        if first_error.is_none() {
            first_error = first;
        }
    }
    let elapsed = t0.elapsed();
    Ok(Round {
        acked,
        failed,
        first_error,
        elapsed,
        latency,
        cpu_s: cpu_s(&c0, &cpu_ticks(pids), clk_tck),
    })
}

/// JetStream publishes keeping `window` acks outstanding (1: waiting for each).
async fn nats_round(
    js: &async_nats::jetstream::Context,
    subject: &str,
    window: usize,
    plan: &ReplPlan,
    pids: &[u32],
    clk_tck: f64,
) -> Result<Round, BoxError> {
    let body = Bytes::from(vec![b'x'; plan.size]);
    let mut latency = new_histogram()?;
    let c0 = cpu_ticks(pids);
    let t0 = Instant::now();
    let end = t0 + plan.round_time;
    let (mut sent, mut acked, mut failed, mut first_error) = (0u64, 0u64, 0u64, None);
    let mut pending = FuturesUnordered::new();
    loop {
        while pending.len() < window && sent < plan.round_max && Instant::now() < end {
            let t = Instant::now();
            match js.publish(subject.to_string(), body.clone()).await {
                Ok(ack) => pending.push(async move {
                    let r = tokio::time::timeout(
                        Duration::from_secs(10),
                        std::future::IntoFuture::into_future(ack),
                    )
                    .await;
                    (t, r)
                }),
                Err(e) => {
                    failed += 1;
                    first_error.get_or_insert_with(|| e.to_string());
                }
            }
            sent += 1;
        }
        match pending.next().await {
            Some((t, Ok(Ok(_)))) => {
                acked += 1;
                record(&mut latency, t.elapsed());
            }
            Some((_, Ok(Err(e)))) => {
                failed += 1;
                first_error.get_or_insert_with(|| e.to_string());
            }
            Some((_, Err(_))) => {
                failed += 1;
                first_error.get_or_insert_with(|| "no ack within 10 s".into());
            }
            None => break,
        }
    }
    let elapsed = t0.elapsed();
    Ok(Round {
        acked,
        failed,
        first_error,
        elapsed,
        latency,
        cpu_s: cpu_s(&c0, &cpu_ticks(pids), clk_tck),
    })
}

/// Starts the JetStream cluster and creates stream `R3` (file, 3 replicas),
/// retrying while the cluster elects its meta leader. Returns the context
/// connected to a server that does not lead the stream, the stream leader
/// and that server's name.
async fn nats_setup(
    nats: &NatsCluster,
) -> Result<(async_nats::jetstream::Context, String, String), BoxError> {
    let started = Instant::now();
    let js0 = loop {
        let attempt = async {
            let c = async_nats::connect(nats.url(0)).await?;
            let js = async_nats::jetstream::new(c);
            js.get_or_create_stream(async_nats::jetstream::stream::Config {
                name: "R3".into(),
                subjects: vec!["bench.r3.>".into()],
                storage: async_nats::jetstream::stream::StorageType::File,
                num_replicas: 3,
                ..Default::default()
            })
            .await?;
            Ok::<_, BoxError>(js)
        };
        match attempt.await {
            Ok(js) => break js,
            Err(e) if started.elapsed() < Duration::from_secs(60) => {
                println!("[jetstream] stream not created yet: {e}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(format!("cannot create the R3 stream within 60 s: {e}").into()),
        }
    };
    // Wait for a stream leader with two current followers.
    let leader = loop {
        let mut s = js0.get_stream("R3").await?;
        let info = s.info().await?;
        let leader = info
            .cluster
            .as_ref()
            .and_then(|c| c.leader.clone())
            .unwrap_or_default();
        let replicas = info
            .cluster
            .as_ref()
            .map_or(0, |c| c.replicas.iter().filter(|r| r.current).count());
        if !leader.is_empty() && replicas == 2 {
            break leader;
        }
        if started.elapsed() > Duration::from_secs(60) {
            return Err(
                format!("stream R3 has no leader with 2 current replicas: {info:?}").into(),
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let via = (0..3)
        .find(|i| format!("js-{}", i + 1) != leader)
        .unwrap_or(0);
    let client = async_nats::connect(nats.url(via)).await?;
    println!(
        "==> JetStream stream R3 (file, 3 replicas) led by {leader}; publishing through js-{} after {} ms",
        via + 1,
        started.elapsed().as_millis()
    );
    Ok((
        async_nats::jetstream::new(client),
        leader,
        format!("js-{}", via + 1),
    ))
}

// ----- failover -----

/// One publish of the failover load: when sent, when answered, whether 2xx.
type Shot = (Instant, Instant, bool);

/// Kills the leader of `topic`'s partition 0 while publishing through
/// another agent (a publish every 20 ms, each on its own connection from a
/// pool, answered or failed within 10 s); measures kill → first 201 of a
/// publish sent after the kill; restarts the victim (same name, ports,
/// data) and waits for three voters again.
/// Kills the leader of `topic`'s partition 0 and times its failover. A busy
/// partition has publishes every 20 ms for a second before the kill; an
/// idle one has none until the kill, and is killed once every agent reports
/// its group asleep.
async fn one_kill(
    cluster: &mut Cluster,
    topic: &str,
    k: usize,
    idle: bool,
) -> Result<Kill, BoxError> {
    if idle {
        cluster.wait_asleep(topic, Duration::from_secs(30)).await?;
    }
    let l = cluster.leaders(topic).await;
    let g = l
        .get(&0)
        .ok_or("the failover partition has no leader")?
        .clone();
    let vi = cluster.index_of(&g.leader).ok_or("unknown leader")?;
    // Alternate between the two other agents.
    let pi = (vi + 1 + k % 2) % 3;
    let via = cluster.nodes[pi].name.clone();
    let pool = Pool::new(cluster.nodes[pi].app, 4).await?;
    let shots: Arc<Mutex<Vec<Shot>>> = Arc::new(Mutex::new(Vec::new()));
    let path = format!("/v1/topics/{topic}/messages");
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let start_publisher = || {
        let (pool, shots, stop, path) = (pool.clone(), shots.clone(), stop.clone(), path.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            let mut tasks = tokio::task::JoinSet::new();
            let hard_end = Instant::now() + Duration::from_secs(60);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < hard_end {
                tick.tick().await;
                let (pool, shots, path) = (pool.clone(), shots.clone(), path.clone());
                tasks.spawn(async move {
                    let sent = Instant::now();
                    let ok = tokio::time::timeout(Duration::from_secs(10), async {
                        let mut c = pool.take().await?;
                        let (s, _) = c
                            .post(
                                &path,
                                "application/octet-stream",
                                Bytes::from_static(b"failover"),
                            )
                            .await?;
                        pool.give(c);
                        Ok::<bool, BoxError>(s.is_success())
                    })
                    .await;
                    let ok = matches!(ok, Ok(Ok(true)));
                    shots.lock().unwrap_or_else(|p| p.into_inner()).push((
                        sent,
                        Instant::now(),
                        ok,
                    ));
                });
            }
            while tasks.join_next().await.is_some() {}
        })
    };
    let publisher = if idle {
        None
    } else {
        let p = start_publisher();
        tokio::time::sleep(Duration::from_secs(1)).await;
        Some(p)
    };
    let killed_at = Instant::now();
    cluster.nodes[vi].kill9()?;
    let publisher = publisher.unwrap_or_else(start_publisher);
    println!(
        "[failover] SIGKILL {} (leader, term {}, {} partition); publishing through {via}",
        g.leader,
        g.term,
        if idle { "idle" } else { "busy" }
    );
    // Until a publish sent after the kill is acknowledged (at most 20 s), then 0.5 s more.
    let limit = killed_at + Duration::from_secs(20);
    let failover = loop {
        let first = shots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(s, _, ok)| *ok && *s >= killed_at)
            .map(|(_, d, _)| *d)
            .min();
        if let Some(d) = first {
            break Some(d - killed_at);
        }
        if Instant::now() > limit {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = tokio::time::timeout(Duration::from_secs(15), publisher).await;
    let shots = std::mem::take(&mut *shots.lock().unwrap_or_else(|p| p.into_inner()));
    let failed = shots.iter().filter(|(_, _, ok)| !ok).count() as u64;
    let slowest = shots
        .iter()
        .map(|(s, d, _)| *d - *s)
        .max()
        .unwrap_or_default();
    let new_leader = cluster
        .leaders(topic)
        .await
        .get(&0)
        .map(|g| g.leader.clone())
        .unwrap_or_else(|| "?".into());
    println!(
        "[failover] {}: first publish acknowledged {} after the kill; {failed} failed; new leader {new_leader}",
        g.leader,
        failover.map_or("never (20 s)".into(), |d| format!("{} ms", ms(d.as_micros() as u64)))
    );
    // Restart: same name, ports and data directory.
    let restarted = Instant::now();
    cluster.spawn(vi)?;
    cluster.nodes[vi]
        .wait_ready(Duration::from_secs(60))
        .await?;
    cluster.wait_members(Duration::from_secs(60)).await?;
    let reformed = match cluster
        .wait_formed(
            topic,
            1,
            Duration::from_secs(60),
            Duration::from_millis(100),
        )
        .await
    {
        Ok(_) => {
            let victim = cluster.nodes[vi].name.clone();
            while !cluster.caught_up(topic, &victim).await {
                if restarted.elapsed() > Duration::from_secs(60) {
                    return Err(
                        format!("{victim} did not catch up within 60 s of its restart").into(),
                    );
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            restarted.elapsed()
        }
        Err(_) => {
            return Err(format!(
                "{topic} did not get 3 voters within 60 s of restarting {}",
                g.leader
            )
            .into())
        }
    };
    println!(
        "[failover] {} restarted; a caught-up voter following the leader again after {} ms",
        g.leader,
        reformed.as_millis()
    );
    Ok(Kill {
        idle,
        victim: g.leader,
        via,
        failover,
        new_leader,
        failed,
        slowest,
        reformed,
    })
}

// ----- the whole part -----

/// Runs the three measurements; `kills` and `idle` may be skipped with 0.
pub async fn run(
    bin: &Path,
    nats_bin: &Path,
    plan: &ReplPlan,
    clk_tck: f64,
) -> Result<ReplResults, BoxError> {
    let mut warnings = Vec::new();
    let mut cluster = Cluster::start(bin).await?;
    // 1. Throughput and latency against JetStream R3.
    let mut modes = Vec::new();
    let mut tput = (
        String::new(),
        String::new(),
        String::new(),
        String::new(),
        String::new(),
    );
    if plan.rounds > 0 {
        let (m, t) = throughput(&mut cluster, nats_bin, plan, clk_tck, &mut warnings).await?;
        modes = m;
        tput = t;
    }
    // 2. Failover.
    let mut kills = Vec::new();
    if plan.kills + plan.idle_kills > 0 {
        crate::settle().await;
        cluster.create_topic("failover", 1).await?;
        cluster
            .wait_formed(
                "failover",
                1,
                Duration::from_secs(60),
                Duration::from_millis(100),
            )
            .await
            .map_err(|(n, t)| format!("topic failover: {n} of 1 groups formed in {t:?}"))?;
        let all = plan.kills + plan.idle_kills;
        for k in 0..all {
            // Let leadership settle (a leader hands over to placement's choice).
            tokio::time::sleep(Duration::from_secs(3)).await;
            let idle = k >= plan.kills;
            println!(
                "==> kill {} of {all} ({} partition)",
                k + 1,
                if idle { "idle" } else { "busy" }
            );
            kills.push(one_kill(&mut cluster, "failover", k, idle).await?);
        }
    }
    for n in &cluster.nodes {
        warnings.extend(
            n.warnings()
                .into_iter()
                .map(|w| format!("{} (throughput/failover mesh): {w}", n.name)),
        );
    }
    drop(cluster);

    // 3. Idle cost, then 4. a replaced pod on the same mesh.
    let (idle, replace) = if plan.idle_partitions > 0 {
        crate::settle().await;
        let mut cluster = Cluster::start(bin).await?;
        let idle = idle_part(&cluster, plan, clk_tck).await?;
        let replace = if plan.replace {
            Some(replace_part(&mut cluster, &idle.topics, plan).await?)
        } else {
            None
        };
        for n in &cluster.nodes {
            warnings.extend(
                n.warnings()
                    .into_iter()
                    .map(|w| format!("{} (idle mesh): {w}", n.name)),
            );
        }
        (Some(idle), replace)
    } else {
        (None, None)
    };
    Ok(ReplResults {
        modes,
        kills,
        idle,
        replace,
        tput_leaders: (tput.0, tput.1),
        tput_via: tput.2,
        nats_leader: (tput.3, tput.4),
        warnings,
    })
}

/// The throughput rounds; returns the modes and (Shoal leader before,
/// after, agent published through, stream leader, NATS server used).
async fn throughput(
    cluster: &mut Cluster,
    nats_bin: &Path,
    plan: &ReplPlan,
    clk_tck: f64,
    warnings: &mut Vec<String>,
) -> Result<(Vec<Mode>, (String, String, String, String, String)), BoxError> {
    let nats = NatsCluster::start(nats_bin)?;
    let (js, nats_leader, nats_via) = nats_setup(&nats).await?;
    cluster.create_topic("r3", 1).await?;
    let formed = cluster
        .wait_formed("r3", 1, Duration::from_secs(60), Duration::from_millis(100))
        .await
        .map_err(|(n, t)| format!("topic r3: {n} of 1 groups formed in {t:?}"))?;
    println!(
        "==> topic r3 (1 partition, 3 replicas) formed in {} ms",
        formed.as_millis()
    );
    // Let leadership move to placement's choice before picking who publishes.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let leader_before = cluster
        .leaders("r3")
        .await
        .get(&0)
        .map(|g| g.leader.clone())
        .unwrap_or_default();
    let vi = cluster.index_of(&leader_before).unwrap_or(0);
    let pi = (vi + 1) % 3;
    let tput_via = cluster.nodes[pi].name.clone();
    println!("==> r3 led by {leader_before}; publishing through {tput_via}");
    let app = cluster.nodes[pi].app;
    // Warm-up, unmeasured.
    let mut warm = plan.clone();
    warm.round_time = Duration::from_millis(500);
    shoal_round(app, "r3", 8, &warm, &cluster.pids(), clk_tck).await?;
    nats_round(&js, "bench.r3.warm", 8, &warm, &nats.pids(), clk_tck).await?;
    let mut modes = Vec::new();
    for window in [1, plan.inflight] {
        let mut mode = Mode {
            inflight: window,
            shoal: Vec::new(),
            nats: Vec::new(),
        };
        for r in 0..plan.rounds {
            crate::settle().await;
            let s = shoal_round(app, "r3", window, plan, &cluster.pids(), clk_tck).await?;
            println!(
                "[shoal r3] {window} in flight, round {}: {:.0} acks/s, p50 {} p99 {} ms, {} failed",
                r + 1,
                s.rate(),
                ms(s.latency.value_at_quantile(0.5)),
                ms(s.latency.value_at_quantile(0.99)),
                s.failed
            );
            mode.shoal.push(s);
            cluster.check_alive()?;
            crate::settle().await;
            let subject = format!("bench.r3.{window}.{r}");
            let n = nats_round(&js, &subject, window, plan, &nats.pids(), clk_tck).await?;
            println!(
                "[jetstream r3] {window} in flight, round {}: {:.0} acks/s, p50 {} p99 {} ms, {} failed",
                r + 1,
                n.rate(),
                ms(n.latency.value_at_quantile(0.5)),
                ms(n.latency.value_at_quantile(0.99)),
                n.failed
            );
            mode.nats.push(n);
        }
        modes.push(mode);
    }
    let leader_after = cluster
        .leaders("r3")
        .await
        .get(&0)
        .map(|g| g.leader.clone())
        .unwrap_or_default();
    warnings.extend(nats.warnings().into_iter().map(|w| format!("nats: {w}")));
    drop(js);
    drop(nats);

    Ok((
        modes,
        (leader_before, leader_after, tput_via, nats_leader, nats_via),
    ))
}

async fn idle_part(cluster: &Cluster, plan: &ReplPlan, clk_tck: f64) -> Result<Idle, BoxError> {
    let pids = cluster.pids();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_before_kib = pids
        .iter()
        .map(|p| ProcStats::read(*p).map_or(0, |s| s.rss_kib))
        .collect();
    // One topic up to the agent's limit per topic (MAX_PARTITIONS, 1024).
    let mut topics = Vec::new();
    let mut left = plan.idle_partitions;
    while left > 0 {
        let n = left.min(1000);
        topics.push((format!("idle-{}", topics.len() + 1), n));
        left -= n;
    }
    let started = Instant::now();
    for (t, n) in &topics {
        cluster.create_topic(t, *n).await?;
    }
    let wanted = plan.idle_partitions as usize;
    let mut formed = 0;
    for (t, n) in &topics {
        let left = plan.form_limit.saturating_sub(started.elapsed());
        match cluster
            .wait_formed(t, u64::from(*n), left, Duration::from_secs(2))
            .await
        {
            Ok(_) => formed += *n as usize,
            Err((k, _)) => {
                formed += k;
                println!("[idle] {t}: only {k} of {n} groups formed within the limit");
            }
        }
    }
    let formed_in = started.elapsed();
    let mut led = vec![0; 3];
    for (t, _) in &topics {
        for g in cluster.leaders(t).await.values() {
            if let Some(i) = cluster.index_of(&g.leader) {
                led[i] += 1;
            }
        }
    }
    println!(
        "==> idle: {formed} of {wanted} groups formed in {:.1} s; leaders per agent {led:?}; idling {:?}",
        formed_in.as_secs_f64(),
        plan.idle_time
    );
    let slices = 10;
    let slice = plan.idle_time / slices;
    let c0 = cpu_ticks(&pids);
    let mut prev = c0.clone();
    let mut cpu_slices = Vec::new();
    for _ in 0..slices {
        tokio::time::sleep(slice).await;
        let now = cpu_ticks(&pids);
        cpu_slices.push(
            prev.iter()
                .zip(&now)
                .map(|(a, b)| b.saturating_sub(*a) as f64 / clk_tck / slice.as_secs_f64())
                .collect(),
        );
        prev = now;
    }
    let cpu = c0
        .iter()
        .zip(&prev)
        .map(|(a, b)| b.saturating_sub(*a) as f64 / clk_tck / plan.idle_time.as_secs_f64())
        .collect();
    let stats: Vec<ProcStats> = pids
        .iter()
        .map(|p| ProcStats::read(*p))
        .collect::<Result<_, _>>()?;
    Ok(Idle {
        topics,
        formed_in,
        formed,
        wanted,
        cpu,
        cpu_slices,
        rss_kib: stats.iter().map(|s| s.rss_kib).collect(),
        anon_kib: stats.iter().map(|s| s.anon_kib).collect(),
        rss_before_kib,
        led,
    })
}

/// Agents' default `--replace-after`, which the bench does not change.
const DEFAULT_REPLACE_AFTER: Duration = Duration::from_secs(60);
/// Longest wait, after the grace period, for the groups to be whole again.
const REPLACE_LIMIT: Duration = Duration::from_secs(300);

/// A pod replaced: publishes some data over the idle topics, kills agent-3
/// with SIGKILL, deletes its data directory, starts agent-4 under a new name
/// joining agent-1, and times until every group has three caught-up voters
/// again with agent-4 in place of agent-3.
async fn replace_part(
    cluster: &mut Cluster,
    topics: &[(String, u32)],
    plan: &ReplPlan,
) -> Result<Replace, BoxError> {
    let groups: usize = topics.iter().map(|(_, n)| *n as usize).sum();
    let pad = "x".repeat(1000);
    let line = format!("{{\"pad\":\"{pad}\"}}\n");
    let batch = Bytes::from(line.repeat(1000));
    let (mut published, mut published_bytes) = (0u64, 0u64);
    for (t, _) in topics {
        for _ in 0..plan.replace_batches {
            let r = cluster.nodes[0]
                .client
                .call(
                    http::Method::POST,
                    &format!("/v1/topics/{t}/messages/batch"),
                    &[("content-type", "application/x-ndjson")],
                    batch.clone(),
                )
                .await?;
            let v = r.json();
            let ok = v["published"].as_u64().unwrap_or(0);
            if !r.status.is_success() || ok == 0 {
                return Err(format!("batch publish to {t}: {} {}", r.status, r.text()).into());
            }
            published += ok;
            published_bytes += ok * pad.len() as u64;
        }
    }
    println!(
        "==> replace: {} messages published over {groups} groups; killing agent-3 and deleting its data",
        thousands(published)
    );
    let victim = cluster.index_of("agent-3").ok_or("no agent-3")?;
    cluster.nodes[victim].kill9()?;
    let killed = Instant::now();
    std::fs::remove_dir_all(&cluster.nodes[victim].data)?;
    cluster.add_node("agent-4").await?;
    let limit = DEFAULT_REPLACE_AFTER + REPLACE_LIMIT;
    let mut progress = Vec::new();
    let mut next_sample = Duration::ZERO;
    let mut first_moved = None;
    let (back, back_count) = loop {
        let (mut back, mut moved) = (0, 0);
        for (t, _) in topics {
            let (b, m) = cluster.replaced_in(t, "agent-3", "agent-4").await;
            back += b;
            moved += m;
        }
        let at = killed.elapsed();
        if moved > 0 && first_moved.is_none() {
            first_moved = Some(at);
        }
        if at >= next_sample {
            println!("[replace] {:.0} s after the kill: {back} of {groups} groups whole again with agent-4 ({moved} with agent-4 a voter)", at.as_secs_f64());
            progress.push((at.as_secs(), back));
            next_sample += Duration::from_secs(10);
        }
        if back == groups {
            break (Some(at), back);
        }
        if at > limit {
            break (None, back);
        }
        cluster.check_alive()?;
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    Ok(Replace {
        groups,
        published,
        published_bytes,
        grace: DEFAULT_REPLACE_AFTER,
        back,
        first_moved,
        progress,
        back_count,
    })
}

// ----- the report -----

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn merged(rounds: &[Round]) -> Option<Histogram<u64>> {
    let (first, rest) = rounds.split_first()?;
    let mut h = first.latency.clone();
    for r in rest {
        let _ = h.add(&r.latency);
    }
    Some(h)
}

fn pct(x: f64) -> String {
    format!("{:.2} %", x * 100.0)
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

/// The report of a run.
pub struct ReplReport {
    /// Whether `--quick`.
    pub quick: bool,
    /// The command line.
    pub command: String,
    /// The machine.
    pub machine: Machine,
    /// nats-server's version.
    pub nats_version: String,
    /// The plan.
    pub plan: ReplPlan,
    /// The results.
    pub results: ReplResults,
    /// Seconds the part took.
    pub took_s: f64,
    /// `/proc/loadavg` before and after the part (1, 5, 15 minutes).
    pub load: (String, String),
}

impl ReplReport {
    /// The markdown section.
    pub fn markdown(&self) -> String {
        let p = &self.plan;
        let r = &self.results;
        let m = &self.machine;
        let mut s = String::new();
        s.push_str(&format!(
            "{BEGIN_PREFIX} (generated by `cargo run --release -p shoal-bench -- --only replication`; edits here are overwritten) -->\n"
        ));
        s.push_str(
            "## Replicated partitions: R=3 vs JetStream R3, failover, idle cost (issue 11)\n\n",
        );
        s.push_str(&format!(
            "Measured {} at commit `{}` with:\n\n```sh\n{}\n```\n\n",
            m.date, m.commit, self.command
        ));
        if self.quick {
            s.push_str("**Quick run: small counts, not the figures of record.**\n\n");
        }
        s.push_str(&format!(
            "Machine: {} × {}, Linux {}. The three agents, the three nats-servers and the bench client share these cores. {}; the part took {:.0} s; load average (1, 5, 15 min) {} before, {} after.\n\n",
            m.nproc, m.model, m.kernel, self.nats_version, self.took_s, self.load.0, self.load.1
        ));
        // Targets.
        s.push_str("| target | Shoal | JetStream R3 / bound | ratio | |\n| --- | --- | --- | --- | --- |\n");
        for mode in &r.modes {
            let sr = median(mode.shoal.iter().map(Round::rate).collect());
            let nr = median(mode.nats.iter().map(Round::rate).collect());
            let ratio = sr / nr.max(1e-9);
            let what = if mode.inflight == 1 {
                "durable R=3, waiting for each ack ≥ 1.0× JetStream R3".to_string()
            } else {
                format!(
                    "durable R=3, {} in flight ≥ 1.0× JetStream R3",
                    mode.inflight
                )
            };
            let verdict = if ratio >= 1.0 {
                format!("met ({ratio:.2}×)")
            } else {
                format!(
                    "**missed** by {:.0} % ({ratio:.2}× < 1×)",
                    (1.0 - ratio) * 100.0
                )
            };
            s.push_str(&format!(
                "| {what} | {} msg/s | {} msg/s | {ratio:.2}× | {verdict} |\n",
                thousands(sr as u64),
                thousands(nr as u64)
            ));
        }
        for idle in [false, true] {
            let kills: Vec<&Kill> = r.kills.iter().filter(|k| k.idle == idle).collect();
            if kills.is_empty() {
                continue;
            }
            let mut sorted: Vec<Duration> = kills.iter().filter_map(|k| k.failover).collect();
            let never = kills.iter().filter(|k| k.failover.is_none()).count();
            sorted.sort();
            let p50 = sorted
                .get(sorted.len().saturating_sub(1) / 2)
                .copied()
                .unwrap_or_default();
            let max = sorted.last().copied().unwrap_or_default();
            let verdict = if never > 0 {
                format!("**missed**: {never} kill(s) without a publish accepted within 20 s")
            } else if max <= Duration::from_secs(3) {
                format!("met ({} under)", secs(Duration::from_secs(3) - max))
            } else {
                format!("**missed** by {}", secs(max - Duration::from_secs(3)))
            };
            let what = if idle {
                "failover after SIGKILL of an idle partition's leader (its group asleep)"
            } else {
                "failover after SIGKILL of the leader"
            };
            s.push_str(&format!(
                "| {what} ≤ 3 s at worst ({} kills) | p50 {} / max {} | ≤ 3 s | {:.2}× | {verdict} |\n",
                kills.len(),
                secs(p50),
                secs(max),
                max.as_secs_f64() / 3.0
            ));
        }
        if let Some(i) = &r.idle {
            let cpu_max = i.cpu.iter().copied().fold(0.0, f64::max);
            let rss_max = i.rss_kib.iter().copied().max().unwrap_or(0);
            let scale = if i.wanted == 1000 {
                String::new()
            } else {
                format!(" (measured at {} partitions)", i.wanted)
            };
            let cpu_verdict = if cpu_max <= 0.01 {
                "met".to_string()
            } else {
                format!("**missed**: {:.1}× the bound", cpu_max / 0.01)
            };
            let rss_mb = rss_max as f64 * 1024.0 / 1e6;
            let rss_verdict = if rss_mb <= 48.0 {
                "met".to_string()
            } else {
                format!("**missed** by {:.1} MB", rss_mb - 48.0)
            };
            s.push_str(&format!(
                "| idle CPU per agent at 1,000 partitions × 3 replicas ≤ 1 % of a core{scale} | largest {} | ≤ 1 % | {:.2}× | {cpu_verdict} |\n",
                pct(cpu_max),
                cpu_max / 0.01
            ));
            s.push_str(&format!(
                "| idle RSS per agent at 1,000 partitions × 3 replicas ≤ 48 MB{scale} | largest {} | ≤ 48 MB | {:.2}× | {rss_verdict} |\n",
                mb(rss_max),
                rss_mb / 48.0
            ));
        }
        if let Some(rp) = &r.replace {
            let bound = rp.grace + Duration::from_secs(60);
            let (figure, ratio, verdict) = match rp.back {
                Some(t) => {
                    let after = t.saturating_sub(rp.grace);
                    let verdict = if t <= bound {
                        format!("met ({} under)", secs(bound - t))
                    } else {
                        format!("**missed** by {}", secs(t - bound))
                    };
                    (
                        format!(
                            "{} after the grace period ({} after the kill)",
                            secs(after),
                            secs(t)
                        ),
                        format!("{:.2}×", after.as_secs_f64() / 60.0),
                        verdict,
                    )
                }
                None => (
                    format!(
                        "{} of {} groups within {}",
                        rp.back_count,
                        rp.groups,
                        secs(rp.grace + REPLACE_LIMIT)
                    ),
                    "-".to_string(),
                    "**missed**".to_string(),
                ),
            };
            s.push_str(&format!(
                "| a replaced pod's partitions back to 3 replicas ≤ 60 s after the grace period ({} partitions, `--replace-after` {} s) | {figure} | ≤ 60 s | {ratio} | {verdict} |\n",
                thousands(rp.groups as u64),
                rp.grace.as_secs()
            ));
        }
        s.push('\n');
        // Throughput details.
        if !r.modes.is_empty() {
            s.push_str(&format!(
            "### Durable R=3 publish vs JetStream R3 ({} B)\n\nShoal: one topic, 1 partition, `replicas: 3` (fsync `interval`, the default), led by {} before the rounds and {} after; every publish goes to **{}**, which does not lead it (the publish is forwarded to the leader, which answers 201 after a majority commit). JetStream: stream `R3`, file storage, `num_replicas: 3` (default sync), led by {}; the publisher is connected to **{}**, which does not lead it. Rounds alternate Shoal, JetStream, each up to {} messages or {} s, `sync(1)` and a second of rest between rounds; rates are the median of {} round(s) per system, latencies (publish → ack) merge all rounds.\n\n",
            p.size,
            r.tput_leaders.0,
            r.tput_leaders.1,
            r.tput_via,
            r.nats_leader.0,
            r.nats_leader.1,
            thousands(p.round_max),
            p.round_time.as_secs(),
            p.rounds
        ));
            s.push_str("| mode | system | acks/s | p50 / p99 / max | CPU s per million (3 servers) | rounds |\n| --- | --- | --- | --- | --- | --- |\n");
            for mode in &r.modes {
                let label = if mode.inflight == 1 {
                    "waiting for each ack (1 in flight)".to_string()
                } else {
                    format!(
                    "{} in flight (Shoal: {} keep-alive connections; JetStream: async publish on one connection)",
                    mode.inflight, mode.inflight
                )
                };
                for (sys, rounds) in [("Shoal R=3", &mode.shoal), ("JetStream R3", &mode.nats)] {
                    let Some(h) = merged(rounds) else {
                        continue;
                    };
                    let acked: u64 = rounds.iter().map(|r| r.acked).sum();
                    let cpu: f64 = rounds.iter().map(|r| r.cpu_s).sum();
                    let per_round: Vec<String> = rounds
                        .iter()
                        .map(|r| {
                            let mut t = format!(
                                "{}/s, {} acked in {:.1} s",
                                thousands(r.rate() as u64),
                                thousands(r.acked),
                                r.elapsed.as_secs_f64()
                            );
                            if r.failed > 0 {
                                t.push_str(&format!(
                                    ", **{} failed**: {}",
                                    r.failed,
                                    r.first_error.clone().unwrap_or_default().replace('|', "/")
                                ));
                            }
                            t
                        })
                        .collect();
                    s.push_str(&format!(
                        "| {label} | {sys} | {} | {} / {} / {} ms | {:.1} | {} |\n",
                        thousands(median(rounds.iter().map(Round::rate).collect()) as u64),
                        ms(h.value_at_quantile(0.5)),
                        ms(h.value_at_quantile(0.99)),
                        ms(h.max()),
                        cpu / (acked.max(1) as f64 / 1e6),
                        per_round.join("; ")
                    ));
                }
            }
            s.push('\n');
        }
        // Failover details.
        if !r.kills.is_empty() {
            s.push_str(&format!(
                "### Failover\n\nA topic of 1 partition, `replicas: 3`. Each kill: wait until the group has a leader and 3 voters and 3 s more (a leader hands over to placement's first choice), publish through an agent that does not lead it (the two others in turn; one publish every 20 ms, each on its own pooled keep-alive connection, 10 s timeout, no retries by the bench: the agent itself retries for up to 5 s), SIGKILL the leader after 1 s, and take the time from the kill to the **201 of the first publish sent after the kill** (resolution 20 ms). An *idle* kill publishes nothing before it: it waits until every agent reports the group asleep (hibernating), kills the leader, and only then starts the publishes. Then restart the killed agent with the same name, ports and data directory (agent-1 without `--join`, the others joining agent-1) and wait until the group has a leader with 3 voters and the restarted replica follows it with every entry (the leader reports it 0 entries behind; its voter seat never went away, as `--replace-after` is 60 s). {} kills.\n\n",
                r.kills.len()
            ));
            s.push_str("| # | partition | killed leader | published through | kill → first 201 | new leader | publishes failed | longest publish | restart → caught-up voter again |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n");
            for (i, k) in r.kills.iter().enumerate() {
                s.push_str(&format!(
                    "| {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                    i + 1,
                    if k.idle { "idle" } else { "busy" },
                    k.victim,
                    k.via,
                    k.failover.map_or("none within 20 s".into(), secs),
                    k.new_leader,
                    k.failed,
                    secs(k.slowest),
                    secs(k.reformed)
                ));
            }
            s.push('\n');
        }
        if let Some(i) = &r.idle {
            let topics: Vec<String> = i
                .topics
                .iter()
                .map(|(t, n)| format!("`{t}` ({n} partitions)"))
                .collect();
            s.push_str(&format!(
                "### Idle cost\n\nA fresh mesh of three agents; topic(s) {} with `replicas: 3` created on agent-1 (the agent's limit is 1,024 partitions per topic). {} of {} groups had a leader and 3 voters after {:.1} s (polled every 2 s); leaders per agent: {}. Then {} s of idle, nothing polled: CPU is utime + stime from `/proc/<pid>/stat` over the window, RSS is `VmRSS` from `/proc/<pid>/status` at its end.\n\n",
                topics.join(", "),
                thousands(i.formed as u64),
                thousands(i.wanted as u64),
                i.formed_in.as_secs_f64(),
                i.led.iter().map(ToString::to_string).collect::<Vec<_>>().join(" / "),
                p.idle_time.as_secs()
            ));
            s.push_str("| agent | CPU over the window | CPU per tenth of the window | RSS before any topic | RSS at the end | of which private (`RssAnon`) |\n| --- | --- | --- | --- | --- | --- |\n");
            for a in 0..i.cpu.len() {
                let slices: Vec<String> = i
                    .cpu_slices
                    .iter()
                    .map(|sl| format!("{:.1}", sl[a] * 100.0))
                    .collect();
                s.push_str(&format!(
                    "| agent-{} | {} | {} % | {} | {} | {} |\n",
                    a + 1,
                    pct(i.cpu[a]),
                    slices.join(" / "),
                    mb(i.rss_before_kib[a]),
                    mb(i.rss_kib[a]),
                    mb(i.anon_kib[a])
                ));
            }
            s.push('\n');
        }
        if let Some(rp) = &r.replace {
            let progress: Vec<String> = rp
                .progress
                .iter()
                .map(|(t, n)| format!("{t} s: {}", thousands(*n as u64)))
                .collect();
            s.push_str(&format!(
                "### A replaced pod\n\nThe idle mesh above, after its window: {} messages of 1 KiB ({}) published over its {} partitions with batch publishes through agent-1; then agent-3 killed with SIGKILL and its data directory deleted, and **agent-4** started under a new name with an empty data directory, joining agent-1 (a pod replaced by its Deployment). The agents run with their default `--replace-after` ({} s): until then agent-3 keeps its seats, as a restarting pod would. Time from the kill until every group's leader reports 3 voters with agent-4 and without agent-3, no learners, and agent-4 0 entries behind (polled every second): **{}**. The first group had agent-4 as a voter {} after the kill. Groups whole again, by seconds after the kill: {}.\n\n",
                thousands(rp.published),
                mb(rp.published_bytes / 1024),
                thousands(rp.groups as u64),
                rp.grace.as_secs(),
                rp.back.map_or(format!("not within {}", secs(rp.grace + REPLACE_LIMIT)), secs),
                rp.first_moved.map_or("never".to_string(), secs),
                progress.join(", ")
            ));
        }
        if !r.warnings.is_empty() {
            s.push_str(&format!(
                "Log lines with WARN/ERROR (agents) or [WRN]/[ERR] (nats-servers, without the route connection attempts at start-up): {} in all; the first 15:\n\n```text\n",
                r.warnings.len()
            ));
            for w in r.warnings.iter().take(15) {
                let w: String = w.chars().take(300).collect();
                s.push_str(&w);
                s.push('\n');
            }
            s.push_str("```\n\n");
        }
        s.push_str(END);
        s.push('\n');
        s
    }
}
