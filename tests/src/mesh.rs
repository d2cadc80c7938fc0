//! The mesh benchmark: three release agents on this machine, the app
//! publishing on agent 1, the partition's home on agent 2, the subscriber
//! behind agent 3.
//!
//! Workloads, each bounded by a message count and by time, in the order
//! they run (light to heavy):
//!
//! 1. memory of each agent idle and during a 10,000 msg/s publish → push run;
//! 2. publish → push latency at 1,000 msg/s, open loop, pushed by agent 3 to
//!    the bench's HTTP server;
//! 3. request/reply from agent 1 to the bench's app behind agent 3, sequential
//!    (and on agent 3 alone, for comparison);
//! 4. end-to-end throughput: one 256 B message per POST on agent 1 from many
//!    keep-alive connections, pulled on agent 3 until every published message
//!    arrived;
//! 5. ephemeral batches: 64 × 256 B per POST on agent 1, pulled on agent 3,
//!    loss counted; then again with publishers held within a window of the
//!    subscriber.

use crate::agent::{AgentOptions, AgentProcess, ProcStats};
use crate::conn::Conn;
use crate::workloads::{self, Ctx, OpenLoop, OpenLoopSpec, PushSink, Recorder, PAYLOAD_BYTES};
use crate::BoxError;
use bytes::Bytes;
use hdrhistogram::Histogram;
use http::{Method, StatusCode};
use serde_json::Value;
use shoal_agent::client::AgentClient;
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::task::JoinSet;

/// Node names, in the order of [`Mesh::agents`].
pub const NODES: [&str; 3] = ["agent-1", "agent-2", "agent-3"];
/// The agent the app publishes on.
pub const PUBLISHER: usize = 0;
/// The agent that is home to the measured partitions.
pub const HOME: usize = 1;
/// The agent the subscriber sits behind.
pub const SUBSCRIBER: usize = 2;

/// Messages the held ephemeral run lets be on their way at once: half of
/// what an ephemeral partition keeps for slow readers (10,000).
pub const EPH_WINDOW: u64 = 5_000;

/// Counts and durations of the mesh run.
pub struct MeshPlan {
    /// Most single publishes of the throughput run.
    pub tput_max: u64,
    /// Longest publishing window of the throughput run.
    pub tput_time: Duration,
    /// Most messages of the ephemeral batch run.
    pub eph_max: u64,
    /// Longest publishing window of the ephemeral batch run.
    pub eph_time: Duration,
    /// Open-loop rate of the latency run.
    pub latency_rate: u64,
    /// Length of the latency run.
    pub latency_time: Duration,
    /// Unmeasured messages before the latency and memory runs.
    pub warmup_messages: u64,
    /// Most sequential requests.
    pub rr_max: u64,
    /// Longest request/reply run.
    pub rr_time: Duration,
    /// Open-loop rate of the memory run.
    pub rss_rate: u64,
    /// Length of the memory run.
    pub rss_time: Duration,
    /// Longest wait for the subscriber to catch up after publishing stops.
    pub drain_limit: Duration,
    /// Longest wait before a run for other processes to leave the CPUs alone.
    pub quiet_limit: Duration,
}

impl MeshPlan {
    /// Small counts with `quick`, else the full run.
    pub fn new(quick: bool) -> MeshPlan {
        if quick {
            MeshPlan {
                tput_max: 20_000,
                tput_time: Duration::from_secs(5),
                eph_max: 256_000,
                eph_time: Duration::from_secs(3),
                latency_rate: 1_000,
                latency_time: Duration::from_secs(2),
                warmup_messages: 100,
                rr_max: 2_000,
                rr_time: Duration::from_secs(3),
                rss_rate: 10_000,
                rss_time: Duration::from_secs(2),
                drain_limit: Duration::from_secs(10),
                quiet_limit: Duration::from_secs(3),
            }
        } else {
            MeshPlan {
                tput_max: 1_000_000,
                tput_time: Duration::from_secs(20),
                eph_max: 16_000_000,
                eph_time: Duration::from_secs(20),
                latency_rate: 1_000,
                latency_time: Duration::from_secs(10),
                warmup_messages: 500,
                rr_max: 20_000,
                rr_time: Duration::from_secs(20),
                rss_rate: 10_000,
                // Longer than a subscription's default ack timeout (30 s), so
                // state kept per delivery until its ack deadline is at its
                // steady state.
                rss_time: Duration::from_secs(40),
                drain_limit: Duration::from_secs(30),
                quiet_limit: Duration::from_secs(120),
            }
        }
    }
}

/// Shape of the client side.
pub struct MeshOptions {
    /// Keep-alive connections of the single-publish throughput run.
    pub connections: usize,
    /// Connections of the ephemeral batch run.
    pub batch_connections: usize,
    /// Messages per batch.
    pub batch_size: usize,
}

// ----- the three agents -----

/// Three agents in one mesh. Dropping it stops all three (SIGTERM to each
/// first, so they stop together, then each is waited for and killed if it
/// lingers) before the shared CA directory is removed.
pub struct Mesh {
    /// agent-1, agent-2, agent-3.
    pub agents: Vec<AgentProcess>,
    /// App API clients, in the same order.
    pub clients: Vec<AgentClient>,
    // Dropped after the agents (fields drop in declaration order).
    ca: tempfile::TempDir,
}

impl Drop for Mesh {
    fn drop(&mut self) {
        for a in &mut self.agents {
            a.terminate();
        }
        // Each AgentProcess then waits for its process (and kills it after 5 s).
    }
}

impl Mesh {
    /// Starts agent-1, then agents 2 and 3 joining it; agent 3 pushes to
    /// `app_port`. Waits for every `/readyz` and for all three to see three
    /// alive members.
    pub async fn start(bin: &Path, app_port: u16) -> Result<Mesh, BoxError> {
        let ca = tempfile::Builder::new()
            .prefix("shoal-bench-ca-")
            .tempdir()?;
        let mut mesh = Mesh {
            agents: Vec::new(),
            clients: Vec::new(),
            ca,
        };
        let started = Instant::now();
        for (i, node) in NODES.iter().enumerate() {
            let mut extra: Vec<OsString> = vec![
                "--dev".into(),
                "--ca-dir".into(),
                mesh.ca.path().as_os_str().to_owned(),
                "--shutdown-timeout".into(),
                "3s".into(),
            ];
            if let Some(first) = mesh.agents.first() {
                extra.push("--join".into());
                extra.push(first.mesh_addr.to_string().into());
            }
            let agent = AgentProcess::start_with(
                bin,
                &AgentOptions {
                    node_name: (*node).to_string(),
                    app_port: (i == SUBSCRIBER).then_some(app_port),
                    extra,
                },
            )?;
            mesh.clients
                .push(AgentClient::new(&format!("http://{}", agent.app_addr)));
            mesh.agents.push(agent);
            // The first agent creates the CA the others load: wait for it alone.
            if i == 0 {
                mesh.agents[0].wait_ready(Duration::from_secs(30)).await?;
            }
        }
        for a in &mut mesh.agents[1..] {
            a.wait_ready(Duration::from_secs(30)).await?;
        }
        mesh.wait_members(Duration::from_secs(20)).await?;
        println!(
            "==> mesh of 3 ready in {} ms",
            started.elapsed().as_millis()
        );
        Ok(mesh)
    }

    /// Fails if any agent has exited.
    pub fn check_alive(&mut self) -> Result<(), BoxError> {
        for a in &mut self.agents {
            a.check_alive()
                .map_err(|e| format!("{}: {e}", a.node_name))?;
        }
        Ok(())
    }

    /// The agents' process ids, in the order of [`NODES`].
    pub fn pids(&self) -> Vec<u32> {
        self.agents.iter().map(AgentProcess::pid).collect()
    }

    /// `GET /v1/cluster` of agent `i`.
    async fn cluster(&self, i: usize) -> Result<Value, BoxError> {
        let r = self.clients[i].get("/v1/cluster").await?;
        if !r.status.is_success() {
            return Err(format!("{}: /v1/cluster answered {}", NODES[i], r.status).into());
        }
        Ok(r.json())
    }

    async fn wait_members(&self, limit: Duration) -> Result<(), BoxError> {
        let started = Instant::now();
        loop {
            let mut all = true;
            let mut last = String::new();
            for (i, node) in NODES.iter().enumerate() {
                let v = self.cluster(i).await?;
                let alive = v.get("members").and_then(Value::as_array).map_or(0, |m| {
                    m.iter()
                        .filter(|m| m.get("state").and_then(Value::as_str) == Some("alive"))
                        .count()
                });
                if alive != NODES.len() {
                    all = false;
                    last = format!("{node} sees {alive} alive members: {v}");
                }
            }
            if all {
                return Ok(());
            }
            if started.elapsed() > limit {
                return Err(format!("the mesh did not form within {limit:?}: {last}").into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Homes ("topic/N" → node) as agent `i` sees them, and its unavailable list.
    async fn homes(&self, i: usize) -> Result<(BTreeMap<String, String>, Vec<String>), BoxError> {
        let v = self.cluster(i).await?;
        let mut homes = BTreeMap::new();
        for m in v
            .get("members")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let Some(node) = m.get("node").and_then(Value::as_str) else {
                continue;
            };
            for p in m
                .get("partitions")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
            {
                homes.insert(p.to_string(), node.to_string());
            }
        }
        let unavailable = v
            .get("unavailable")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .map(Value::to_string)
            .collect();
        Ok((homes, unavailable))
    }

    /// Waits until all three agents know every partition of `parts`, agree
    /// on its home, report nothing unavailable, and the answer holds for two
    /// polls 300 ms apart; returns the homes.
    async fn settled_homes(
        &self,
        parts: &[String],
        limit: Duration,
    ) -> Result<BTreeMap<String, String>, BoxError> {
        let started = Instant::now();
        let mut previous: Option<BTreeMap<String, String>> = None;
        loop {
            let mut views = Vec::new();
            let mut problem = None;
            for (i, node) in NODES.iter().enumerate() {
                let (homes, unavailable) = self.homes(i).await?;
                if !unavailable.is_empty() {
                    problem = Some(format!("{node} reports unavailable {unavailable:?}"));
                }
                views.push(homes);
            }
            let mut agreed = BTreeMap::new();
            for p in parts {
                let seen: Vec<Option<&String>> = views.iter().map(|v| v.get(p)).collect();
                match seen.first().copied().flatten() {
                    Some(home) if seen.iter().all(|s| *s == Some(home)) => {
                        agreed.insert(p.clone(), home.clone());
                    }
                    _ => problem = Some(format!("homes of {p} as agents 1-3 see them: {seen:?}")),
                }
            }
            if problem.is_none() {
                if previous.as_ref() == Some(&agreed) {
                    return Ok(agreed);
                }
                previous = Some(agreed);
                tokio::time::sleep(Duration::from_millis(300)).await;
                continue;
            }
            previous = None;
            if started.elapsed() > limit {
                return Err(format!(
                    "placement did not settle within {limit:?}: {}",
                    problem.unwrap_or_default()
                )
                .into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Fails unless all three agents say agent-2 is home to `topic`'s partition 0.
    pub async fn check_home(&self, topic: &str) -> Result<(), BoxError> {
        let key = format!("{topic}/0");
        for (i, node) in NODES.iter().enumerate() {
            let (homes, unavailable) = self.homes(i).await?;
            let home = homes.get(&key).map_or("none", String::as_str);
            if home != NODES[HOME] || unavailable.iter().any(|u| u.contains(&key)) {
                return Err(format!(
                    "{node} says {key} is home on {home} (unavailable: {unavailable:?}); the bench needs it on {}",
                    NODES[HOME]
                )
                .into());
            }
        }
        Ok(())
    }
}

// ----- watching the agents -----

/// CPU times of the three agents and the bench at one moment.
#[derive(Clone, Copy, Debug)]
struct CpuMark {
    agents: [u64; 3],
    bench: u64,
    /// Busy ticks of the whole machine (all processes), from `/proc/stat`.
    machine: u64,
    at: Instant,
}

/// CPU used over a window, in cores (CPU seconds per second).
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuUse {
    /// agent-1, agent-2, agent-3.
    pub agents: [f64; 3],
    /// The bench client.
    pub bench: f64,
    /// CPU seconds of all three agents together.
    pub agents_cpu_s: f64,
    /// CPU seconds of each agent.
    pub agent_s: [f64; 3],
    /// Everything else on the machine (other processes, kernel threads,
    /// interrupts not charged to the agents or the bench), in cores.
    pub others: f64,
}

fn cpu_mark(pids: &[u32]) -> Result<CpuMark, BoxError> {
    let mut agents = [0; 3];
    for (slot, pid) in agents.iter_mut().zip(pids) {
        *slot = ProcStats::read(*pid)?.cpu_ticks;
    }
    Ok(CpuMark {
        agents,
        bench: ProcStats::own_cpu_ticks()?,
        machine: machine_busy_ticks().unwrap_or(0),
        at: Instant::now(),
    })
}

/// Busy ticks of all CPUs since boot: the first line of `/proc/stat` minus
/// idle and iowait.
fn machine_busy_ticks() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is in user)
    let total: u64 = v.iter().take(8).sum();
    Some(total - v.get(3)? - v.get(4)?)
}

fn cpu_use(a: &CpuMark, b: &CpuMark, clk_tck: f64) -> CpuUse {
    let secs = b.at.duration_since(a.at).as_secs_f64().max(1e-9);
    let mut agents = [0.0; 3];
    let mut agent_s = [0.0; 3];
    for i in 0..3 {
        agent_s[i] = b.agents[i].saturating_sub(a.agents[i]) as f64 / clk_tck;
        agents[i] = agent_s[i] / secs;
    }
    let bench_s = b.bench.saturating_sub(a.bench) as f64 / clk_tck;
    let machine_s = b.machine.saturating_sub(a.machine) as f64 / clk_tck;
    let agents_cpu_s: f64 = agent_s.iter().sum();
    CpuUse {
        agents,
        bench: bench_s / secs,
        agents_cpu_s,
        agent_s,
        others: ((machine_s - agents_cpu_s - bench_s) / secs).max(0.0),
    }
}

/// Waits (at most `limit`) until the rest of the machine is quiet: other
/// processes busy for less than a quarter core over one second. The machine
/// is shared, and the figures mean little while something else compiles.
/// Returns what the rest of the machine used in the last second, in cores.
async fn wait_quiet(pids: &[u32], clk_tck: f64, limit: Duration) -> f64 {
    let started = Instant::now();
    loop {
        let Ok(a) = cpu_mark(pids) else { return 0.0 };
        tokio::time::sleep(Duration::from_secs(1)).await;
        let Ok(b) = cpu_mark(pids) else { return 0.0 };
        let others = cpu_use(&a, &b, clk_tck).others;
        if others < 0.25 {
            return others;
        }
        if started.elapsed() >= limit {
            println!(
                "==> the machine is still busy ({others:.2} cores used by other processes); going on"
            );
            return others;
        }
        println!("==> other processes use {others:.2} cores; waiting for a quieter machine");
    }
}

/// Between two runs: `sync(1)` and a second of rest, then a quiet machine.
async fn between(mesh: &Mesh, clk_tck: f64, plan: &MeshPlan) {
    crate::settle().await;
    wait_quiet(&mesh.pids(), clk_tck, plan.quiet_limit).await;
}

/// Largest RSS of each agent since the last reset, sampled every 100 ms.
#[derive(Clone, Default)]
pub struct RssWatch {
    since_reset: Arc<[AtomicU64; 3]>,
    overall: Arc<[AtomicU64; 3]>,
}

impl RssWatch {
    fn spawn(pids: Vec<u32>) -> RssWatch {
        let w = RssWatch::default();
        let watch = w.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tick.tick().await;
                let mut alive = false;
                for (i, pid) in pids.iter().enumerate() {
                    if let Ok(s) = ProcStats::read(*pid) {
                        alive = true;
                        watch.since_reset[i].fetch_max(s.rss_kib, Ordering::Relaxed);
                        watch.overall[i].fetch_max(s.rss_kib, Ordering::Relaxed);
                    }
                }
                if !alive {
                    break;
                }
            }
        });
        w
    }

    fn reset(&self) {
        for a in self.since_reset.iter() {
            a.store(0, Ordering::Relaxed);
        }
    }

    fn since_reset(&self) -> [u64; 3] {
        [0, 1, 2].map(|i| self.since_reset[i].load(Ordering::Relaxed))
    }

    fn overall(&self) -> [u64; 3] {
        [0, 1, 2].map(|i| self.overall[i].load(Ordering::Relaxed))
    }
}

fn rss_now(pids: &[u32]) -> Result<[u64; 3], BoxError> {
    let mut out = [0; 3];
    for (slot, pid) in out.iter_mut().zip(pids) {
        *slot = ProcStats::read(*pid)?.rss_kib;
    }
    Ok(out)
}

/// Sums every sample of a Prometheus metric (all label sets) in `text`.
fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            let value = if rest.starts_with('{') {
                rest.rsplit_once(' ')?.1
            } else {
                rest.strip_prefix(' ')?
            };
            value.trim().parse::<f64>().ok()
        })
        .sum()
}

/// Mesh and storage counters of the three agents at one moment.
#[derive(Clone, Debug, Default)]
struct MetricsMark {
    /// Per agent: the metrics we report.
    values: [BTreeMap<&'static str, f64>; 3],
}

/// Counters read from `/metrics` around a throughput run.
const COUNTERS: [&str; 8] = [
    "shoal_forwarded_messages_total",
    "shoal_forward_duration_seconds_sum",
    "shoal_forward_duration_seconds_count",
    "shoal_mesh_writes_total",
    "shoal_mesh_frames_received_total",
    "shoal_fetches_served_total",
    "shoal_storage_fsyncs_total",
    "shoal_storage_fsync_duration_seconds_sum",
];

/// `shoal_messages_dropped_total` summed over the agents (0 for an agent
/// that does not answer): the messages the mesh reports it dropped.
pub async fn dropped_total(mesh: &Mesh) -> f64 {
    let mut total = 0.0;
    for a in &mesh.agents {
        let Ok(mut conn) = Conn::open(a.admin_addr).await else {
            continue;
        };
        if let Ok((status, body)) = conn.call(Method::GET, "/metrics", None, Bytes::new()).await {
            if status.is_success() {
                total += metric_sum(
                    &String::from_utf8_lossy(&body),
                    "shoal_messages_dropped_total",
                );
            }
        }
    }
    total
}

async fn metrics_mark(mesh: &Mesh) -> MetricsMark {
    let mut m = MetricsMark::default();
    for (i, a) in mesh.agents.iter().enumerate() {
        let Ok(mut conn) = Conn::open(a.admin_addr).await else {
            continue;
        };
        let Ok((status, body)) = conn.call(Method::GET, "/metrics", None, Bytes::new()).await
        else {
            continue;
        };
        if !status.is_success() {
            continue;
        }
        let text = String::from_utf8_lossy(&body);
        for c in COUNTERS {
            m.values[i].insert(c, metric_sum(&text, c));
        }
    }
    m
}

/// What moved on the mesh during a run, from the agents' own counters.
#[derive(Clone, Debug, Default)]
pub struct MeshCounters {
    /// Publishes agent 1 forwarded to the home.
    pub forwarded: f64,
    /// Mean round trip of a forwarded publish batch, seconds.
    pub forward_mean_s: f64,
    /// Forward calls (one per HTTP request forwarded).
    pub forward_calls: f64,
    /// Stream writes by agent 1 (each one or more frames).
    pub publisher_writes: f64,
    /// Fetches agent 2 served to agent 3.
    pub fetches_served: f64,
    /// Fsyncs at the home.
    pub home_fsyncs: f64,
    /// Seconds in those fsyncs.
    pub home_fsync_s: f64,
}

fn mesh_counters(a: &MetricsMark, b: &MetricsMark) -> MeshCounters {
    let d = |i: usize, name: &str| {
        b.values[i].get(name).copied().unwrap_or(0.0)
            - a.values[i].get(name).copied().unwrap_or(0.0)
    };
    let calls = d(PUBLISHER, "shoal_forward_duration_seconds_count");
    MeshCounters {
        forwarded: d(PUBLISHER, "shoal_forwarded_messages_total"),
        forward_mean_s: d(PUBLISHER, "shoal_forward_duration_seconds_sum") / calls.max(1.0),
        forward_calls: calls,
        publisher_writes: d(PUBLISHER, "shoal_mesh_writes_total"),
        fetches_served: d(HOME, "shoal_fetches_served_total"),
        home_fsyncs: d(HOME, "shoal_storage_fsyncs_total"),
        home_fsync_s: d(HOME, "shoal_storage_fsync_duration_seconds_sum"),
    }
}

// ----- setup -----

/// `DELETE path`; fails unless the answer is 2xx.
pub async fn delete(client: &AgentClient, path: &str) -> Result<(), BoxError> {
    let r = client.call(Method::DELETE, path, &[], Bytes::new()).await?;
    if !r.status.is_success() {
        return Err(format!("DELETE {path} answered {}: {}", r.status, r.text()).into());
    }
    Ok(())
}

/// `PUT path` with a JSON body; the JSON answer, or an error unless 2xx.
pub async fn put(client: &AgentClient, path: &str, body: Value) -> Result<Value, BoxError> {
    let r = client.put_json(path, &body).await?;
    if !r.status.is_success() {
        return Err(format!("PUT {path} answered {}: {}", r.status, r.text()).into());
    }
    Ok(r.json())
}

/// The topics of the run, each of one partition whose home is agent-2.
#[derive(Clone, Debug)]
pub struct Topics {
    /// Durable, for the throughput run.
    pub tput: String,
    /// Ephemeral, for the batch run.
    pub eph: String,
    /// Ephemeral, for the batch run with held publishers.
    pub eph_paced: String,
    /// Durable, for the 1,000 msg/s latency run.
    pub latency: String,
    /// Durable, for the 10,000 msg/s memory run.
    pub rss: String,
    /// For request/reply (nothing is stored; its home does not matter).
    pub rr: String,
    /// Candidates created to find these, and where each one's home is.
    pub homes: BTreeMap<String, String>,
}

/// Creates candidate topics of one partition on agent 1 (the catalog
/// spreads to the others) until enough have their home on agent-2. All are
/// created before any is chosen, and none after: with balanced placement a
/// new topic may move the home of an existing one.
pub async fn choose_topics(mesh: &Mesh) -> Result<Topics, BoxError> {
    let client = &mesh.clients[PUBLISHER];
    let mut durable = Vec::new();
    let mut ephemeral = Vec::new();
    let rr = "mesh-rr".to_string();
    put(
        client,
        &format!("/v1/topics/{rr}"),
        serde_json::json!({"partitions": 1, "replicas": 1}),
    )
    .await?;
    let mut all = vec![format!("{rr}/0")];
    for round in 0..4 {
        for k in round * 9..(round + 1) * 9 {
            let t = format!("mesh-d{k}");
            put(
                client,
                &format!("/v1/topics/{t}"),
                // One copy, homed on agent-2: topics in a mesh default to
                // 3 replicas, which `--only replication` measures.
                serde_json::json!({"partitions": 1, "replicas": 1}),
            )
            .await?;
            all.push(format!("{t}/0"));
            durable.push(t);
        }
        for k in round * 3..(round + 1) * 3 {
            let t = format!("mesh-e{k}");
            put(
                client,
                &format!("/v1/topics/{t}"),
                serde_json::json!({"partitions": 1, "kind": "ephemeral"}),
            )
            .await?;
            all.push(format!("{t}/0"));
            ephemeral.push(t);
        }
        let homes = mesh.settled_homes(&all, Duration::from_secs(20)).await?;
        let on_home =
            |t: &String| homes.get(&format!("{t}/0")).map(String::as_str) == Some(NODES[HOME]);
        let d: Vec<&String> = durable.iter().filter(|t| on_home(t)).collect();
        let e: Vec<&String> = ephemeral.iter().filter(|t| on_home(t)).collect();
        println!(
            "==> placement after {} candidate topics: {} durable and {} ephemeral homed on {}",
            all.len(),
            d.len(),
            e.len(),
            NODES[HOME]
        );
        if d.len() >= 3 && e.len() >= 2 {
            return Ok(Topics {
                tput: d[0].clone(),
                latency: d[1].clone(),
                rss: d[2].clone(),
                eph: e[0].clone(),
                eph_paced: e[1].clone(),
                rr,
                homes,
            });
        }
    }
    Err(format!(
        "after {} candidate topics, too few have their home on {}",
        durable.len() + ephemeral.len(),
        NODES[HOME]
    )
    .into())
}

// ----- the subscriber's pull loop -----

/// One delivered event as the scanner found it.
struct Scanned<'a> {
    ackid: Option<&'a str>,
    t: Option<u64>,
    seq: Option<u64>,
}

/// The unsigned number right after the first `key` in `s`.
pub fn number_after(s: &str, key: &str) -> Option<u64> {
    let at = s.find(key)? + key.len();
    let digits = s[at..].trim_start();
    let end = digits
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(digits.len());
    digits[..end].parse().ok()
}

/// Splits a pull answer (a JSON array of events) into its top-level objects
/// and reads `ackid`, `t` and `seq` from each without building a JSON tree:
/// the bench shares the agents' cores, so its consumer must be cheap.
fn scan_events(body: &[u8]) -> Result<Vec<Scanned<'_>>, BoxError> {
    let text = std::str::from_utf8(body)?;
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let (mut depth, mut in_str, mut esc, mut start) = (0usize, false, false, 0usize);
    for (i, &b) in bytes.iter().enumerate() {
        if in_str {
            if esc {
                esc = false;
            } else if b == b'\\' {
                esc = true;
            } else if b == b'"' {
                in_str = false;
            }
            continue;
        }
        match b {
            b'"' => in_str = true,
            b'{' => {
                depth += 1;
                if depth == 1 {
                    start = i;
                }
            }
            b'}' => {
                if depth == 1 {
                    let ev = &text[start..=i];
                    let ackid = ev.find("\"ackid\":\"").and_then(|at| {
                        let rest = &ev[at + 9..];
                        rest.find('"').map(|end| &rest[..end])
                    });
                    out.push(Scanned {
                        ackid,
                        t: number_after(ev, "\"t\":"),
                        seq: number_after(ev, "\"seq\":"),
                    });
                }
                depth = depth.saturating_sub(1);
            }
            _ => {}
        }
    }
    let trimmed = text.trim();
    if depth != 0 || in_str || !trimmed.starts_with('[') || !trimmed.ends_with(']') {
        return Err("a pull answer was not a complete JSON array".into());
    }
    Ok(out)
}

/// What the pull loop saw.
#[derive(Clone, Debug, Default)]
pub struct PullStats {
    /// Long polls answered.
    pub polls: u64,
    /// Events received (including redeliveries).
    pub events: u64,
    /// Polls answered with no event.
    pub empty_polls: u64,
    /// Ack requests sent.
    pub ack_requests: u64,
    /// Ack requests that failed or were refused.
    pub ack_errors: u64,
    /// First ack failure.
    pub ack_error: Option<String>,
}

/// Pulls `subscription` on `app` (`max` per long poll of 1 s) until `stop`
/// is set or `deadline` passes, recording each event (and the count of
/// distinct ones in `progress`); acks on a second connection so acking never
/// delays the next poll.
pub async fn pull_loop(
    app: SocketAddr,
    subscription: String,
    max: u32,
    rec: Arc<Mutex<Recorder>>,
    progress: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    deadline: Instant,
) -> Result<PullStats, BoxError> {
    let mut conn = Conn::open(app).await?;
    let mut ack_conn = Conn::open(app).await?;
    let (ack_tx, mut ack_rx) = tokio::sync::mpsc::unbounded_channel::<Vec<String>>();
    let ack_path = format!("/v1/subscriptions/{subscription}/acks");
    let acker = tokio::spawn(async move {
        let (mut requests, mut errors, mut first) = (0u64, 0u64, None);
        while let Some(mut ids) = ack_rx.recv().await {
            while let Ok(more) = ack_rx.try_recv() {
                ids.extend(more);
            }
            let mut body = String::with_capacity(ids.len() * 16 + 16);
            body.push_str("{\"ack\":[");
            for (i, id) in ids.iter().enumerate() {
                if i > 0 {
                    body.push(',');
                }
                body.push('"');
                body.push_str(id);
                body.push('"');
            }
            body.push_str("]}");
            requests += 1;
            match ack_conn
                .post(&ack_path, "application/json", Bytes::from(body))
                .await
            {
                Ok((s, _)) if s.is_success() => {}
                Ok((s, b)) => {
                    errors += 1;
                    first.get_or_insert_with(|| format!("{s}: {}", String::from_utf8_lossy(&b)));
                }
                Err(e) => {
                    errors += 1;
                    first.get_or_insert_with(|| e.to_string());
                    break;
                }
            }
        }
        (requests, errors, first)
    });
    let path = format!("/v1/subscriptions/{subscription}/messages?max={max}&wait=1s");
    let mut stats = PullStats::default();
    let result: Result<(), BoxError> = async {
        while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
            let (status, body) = conn.call(Method::GET, &path, None, Bytes::new()).await?;
            let now = Instant::now();
            if !status.is_success() {
                return Err(format!(
                    "pull on {subscription} answered {status}: {}",
                    String::from_utf8_lossy(&body)
                )
                .into());
            }
            let events = scan_events(&body)?;
            stats.polls += 1;
            stats.events += events.len() as u64;
            if events.is_empty() {
                stats.empty_polls += 1;
                continue;
            }
            let mut ids = Vec::with_capacity(events.len());
            {
                let mut rec = rec.lock().unwrap_or_else(|p| p.into_inner());
                for e in &events {
                    rec.record_parts(e.t, e.seq, now);
                    if let Some(id) = e.ackid {
                        ids.push(id.to_string());
                    }
                }
                progress.store(rec.unique, Ordering::Relaxed);
            }
            if !ids.is_empty() && ack_tx.send(ids).is_err() {
                return Err("the acker stopped".into());
            }
        }
        Ok(())
    }
    .await;
    drop(ack_tx);
    if let Ok(Ok((requests, errors, first))) =
        tokio::time::timeout(Duration::from_secs(5), acker).await
    {
        stats.ack_requests = requests;
        stats.ack_errors = errors;
        stats.ack_error = first;
    }
    result.map(|()| stats)
}

/// Waits until `rec` holds `target` distinct messages, or it made no
/// progress for `idle`, or `limit` passed; returns how long it waited.
pub async fn drain(
    rec: &Arc<Mutex<Recorder>>,
    target: u64,
    idle: Duration,
    limit: Duration,
) -> Duration {
    let started = Instant::now();
    let mut last = (0u64, Instant::now());
    loop {
        let unique = rec.lock().unwrap_or_else(|p| p.into_inner()).unique;
        if unique >= target || started.elapsed() >= limit {
            break;
        }
        if unique != last.0 {
            last = (unique, Instant::now());
        } else if last.1.elapsed() >= idle {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    started.elapsed()
}

/// Stops a [`pull_loop`] task (bounded by 5 s) and returns what it saw.
pub async fn stop_consumer(
    name: &str,
    stop: &AtomicBool,
    consumer: tokio::task::JoinHandle<Result<PullStats, BoxError>>,
) -> Result<PullStats, BoxError> {
    stop.store(true, Ordering::Relaxed);
    match tokio::time::timeout(Duration::from_secs(5), consumer).await {
        Ok(Ok(r)) => r.map_err(|e| format!("{name} consumer: {e}").into()),
        Ok(Err(e)) => Err(format!("{name} consumer task: {e}").into()),
        Err(_) => Err(format!("{name}: the consumer did not stop within 5 s").into()),
    }
}

/// Takes the recorder out of `rec`, leaving an empty one.
pub fn take_recorder(rec: &Arc<Mutex<Recorder>>, epoch: Instant) -> Result<Recorder, BoxError> {
    Ok(std::mem::replace(
        &mut *rec.lock().unwrap_or_else(|p| p.into_inner()),
        Recorder::new(epoch, 0)?,
    ))
}

// ----- 1 and 2: throughput end to end -----

/// Result of an end-to-end throughput run (single or batched publishes).
pub struct EndToEnd {
    /// Client connections publishing.
    pub connections: usize,
    /// Messages per request.
    pub per_request: usize,
    /// Messages acknowledged to the publisher.
    pub published: u64,
    /// Messages refused (error status, or failed entries of a batch).
    pub failed: u64,
    /// Requests that failed (transport errors and error statuses).
    pub failed_requests: u64,
    /// First failure seen.
    pub first_error: Option<String>,
    /// First publish to last answer.
    pub publish_elapsed: Duration,
    /// Publish request latency (send to answer), µs.
    pub publish_latency: Histogram<u64>,
    /// The subscriber's side.
    pub received: Recorder,
    /// First publish to last distinct delivery.
    pub delivered_elapsed: Duration,
    /// The pull loop.
    pub pull: PullStats,
    /// CPU from the first publish to the end of the drain.
    pub cpu: CpuUse,
    /// Agent counters over the same window.
    pub counters: MeshCounters,
    /// Largest RSS per agent during the run, KiB.
    pub max_rss_kib: [u64; 3],
}

impl EndToEnd {
    /// Acknowledged publishes per second.
    pub fn publish_rate(&self) -> f64 {
        self.published as f64 / self.publish_elapsed.as_secs_f64().max(1e-9)
    }
    /// Distinct deliveries per second, first publish to last delivery.
    pub fn delivered_rate(&self) -> f64 {
        self.received.unique as f64 / self.delivered_elapsed.as_secs_f64().max(1e-9)
    }
    /// Published but never delivered.
    pub fn lost(&self) -> u64 {
        self.published.saturating_sub(self.received.unique)
    }
}

/// An ndjson batch of `n` 256-byte JSON objects whose `t` and `seq` are
/// fixed-width fields (numbers right-aligned in spaces, valid JSON), with
/// the byte offsets of those fields.
pub struct BatchTemplate {
    body: Vec<u8>,
    fields: Vec<(usize, usize)>,
}

const NUM_WIDTH: usize = 20;

impl BatchTemplate {
    /// A batch of `n` objects of 256 bytes.
    pub fn new(n: usize) -> BatchTemplate {
        BatchTemplate::sized(n, PAYLOAD_BYTES)
    }

    /// A batch of `n` objects of `size` bytes each (at least the fixed
    /// fields, 82 bytes), one per line.
    pub fn sized(n: usize, size: usize) -> BatchTemplate {
        let head_t = b"{\"t\":";
        let head_seq = b",\"seq\":";
        let head_pad = b",\"pad\":\"";
        let fixed = head_t.len() + NUM_WIDTH + head_seq.len() + NUM_WIDTH + head_pad.len() + 2;
        let pad = size.saturating_sub(fixed);
        let mut body = Vec::with_capacity(n * (size.max(fixed) + 1));
        let mut fields = Vec::with_capacity(n);
        for _ in 0..n {
            body.extend_from_slice(head_t);
            let t_at = body.len();
            body.extend(std::iter::repeat_n(b' ', NUM_WIDTH));
            body.extend_from_slice(head_seq);
            let seq_at = body.len();
            body.extend(std::iter::repeat_n(b' ', NUM_WIDTH));
            body.extend_from_slice(head_pad);
            body.extend(std::iter::repeat_n(b'x', pad));
            body.extend_from_slice(b"\"}\n");
            fields.push((t_at, seq_at));
        }
        BatchTemplate { body, fields }
    }

    /// The batch whose entries are `first_seq..`, all sent at `t` ns.
    pub fn fill(&self, first_seq: u64, t: u64) -> Bytes {
        let mut body = self.body.clone();
        for (seq, &(t_at, seq_at)) in (first_seq..).zip(self.fields.iter()) {
            write_num(&mut body[t_at..t_at + NUM_WIDTH], t);
            write_num(&mut body[seq_at..seq_at + NUM_WIDTH], seq);
        }
        Bytes::from(body)
    }
}

fn write_num(field: &mut [u8], mut v: u64) {
    field.fill(b' ');
    let mut i = field.len();
    loop {
        i -= 1;
        field[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 || i == 0 {
            break;
        }
    }
}

/// Reads `"published":N` and `"failed":N` from the start of a batch answer.
pub fn batch_counts(body: &[u8]) -> Option<(u64, u64)> {
    let head = std::str::from_utf8(&body[..body.len().min(200)]).ok()?;
    Some((
        number_after(head, "\"published\":")?,
        number_after(head, "\"failed\":")?,
    ))
}

#[derive(Default)]
struct PubCounters {
    stop: AtomicBool,
    next: AtomicU64,
    published: AtomicU64,
    failed: AtomicU64,
    failed_requests: AtomicU64,
    first_error: Mutex<Option<String>>,
}

impl PubCounters {
    fn note(&self, e: String) {
        let mut first = self.first_error.lock().unwrap_or_else(|p| p.into_inner());
        if first.is_none() {
            *first = Some(e);
        }
    }
}

/// Shape of an end-to-end run.
struct EndToEndSpec {
    name: &'static str,
    topic: String,
    subscription: String,
    connections: usize,
    /// 1: single publishes of a timed JSON payload; more: ndjson batches.
    per_request: usize,
    max_messages: u64,
    duration: Duration,
    drain_limit: Duration,
    /// Hold publishers while more than this many messages are published
    /// (or being published) but not yet delivered; `None`: never hold.
    window: Option<u64>,
}

async fn end_to_end(
    mesh: &Mesh,
    rss: &RssWatch,
    epoch: Instant,
    clk_tck: f64,
    spec: EndToEndSpec,
) -> Result<EndToEnd, BoxError> {
    mesh.check_home(&spec.topic).await?;
    put(
        &mesh.clients[SUBSCRIBER],
        &format!("/v1/subscriptions/{}", spec.subscription),
        serde_json::json!({"topic": spec.topic, "start": "earliest", "maxInFlight": 10000}),
    )
    .await?;
    let per = spec.per_request.max(1) as u64;
    let requests = spec.max_messages.div_ceil(per);
    let expected = requests * per;
    let rec = Arc::new(Mutex::new(Recorder::new(epoch, expected)?));
    let progress = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let consumer = tokio::spawn(pull_loop(
        mesh.agents[SUBSCRIBER].app_addr,
        spec.subscription.clone(),
        1000,
        rec.clone(),
        progress.clone(),
        stop.clone(),
        Instant::now() + spec.duration + spec.drain_limit + Duration::from_secs(15),
    ));

    let (path, content_type) = if per == 1 {
        (
            format!("/v1/topics/{}/messages", spec.topic),
            "application/json",
        )
    } else {
        (
            format!("/v1/topics/{}/messages/batch", spec.topic),
            "application/x-ndjson",
        )
    };
    let template = Arc::new(BatchTemplate::new(per as usize));
    let counters = Arc::new(PubCounters::default());
    let app = mesh.agents[PUBLISHER].app_addr;
    let mut conns = Vec::with_capacity(spec.connections);
    for _ in 0..spec.connections.max(1) {
        conns.push(Conn::open(app).await?);
    }
    println!(
        "[{}] {} connections on {} → home {} → pull on {}, {} msg/request, at most {} msgs or {:?}{}",
        spec.name,
        conns.len(),
        NODES[PUBLISHER],
        NODES[HOME],
        NODES[SUBSCRIBER],
        per,
        requests * per,
        spec.duration,
        spec.window
            .map(|w| format!(", publishers held within {w} messages of the subscriber"))
            .unwrap_or_default()
    );
    rss.reset();
    let m0 = metrics_mark(mesh).await;
    let c0 = cpu_mark(&mesh.pids())?;
    let t0 = Instant::now();
    let end = t0 + spec.duration;
    let mut workers = JoinSet::new();
    let window = spec.window;
    for mut conn in conns {
        let (counters, path, template) = (counters.clone(), path.clone(), template.clone());
        let progress = progress.clone();
        workers.spawn(async move {
            let mut h = workloads::new_histogram().ok();
            let mut last_answer = None;
            'send: while !counters.stop.load(Ordering::Relaxed) && Instant::now() < end {
                if let Some(w) = window {
                    // Claimed and not refused, minus delivered: messages on their way.
                    loop {
                        let claimed = counters.next.load(Ordering::Relaxed) * per;
                        let refused = counters.failed.load(Ordering::Relaxed);
                        let delivered = progress.load(Ordering::Relaxed);
                        if claimed.saturating_sub(refused + delivered) + per <= w {
                            break;
                        }
                        if counters.stop.load(Ordering::Relaxed) || Instant::now() >= end {
                            break 'send;
                        }
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
                let r = counters.next.fetch_add(1, Ordering::Relaxed);
                if r >= requests {
                    break;
                }
                let at = Instant::now();
                let body = if per == 1 {
                    workloads::timed_payload(epoch, r, at)
                } else {
                    let t = u64::try_from(at.saturating_duration_since(epoch).as_nanos())
                        .unwrap_or(u64::MAX);
                    template.fill(r * per, t)
                };
                match conn.post(&path, content_type, body).await {
                    Ok((s, b)) if s.is_success() => {
                        let done = Instant::now();
                        last_answer = Some(done);
                        if let Some(h) = h.as_mut() {
                            workloads::record(h, done.duration_since(at));
                        }
                        let (ok, bad) = if per == 1 {
                            (1, 0)
                        } else {
                            batch_counts(&b).unwrap_or((0, per))
                        };
                        counters.published.fetch_add(ok, Ordering::Relaxed);
                        if bad > 0 {
                            counters.failed.fetch_add(bad, Ordering::Relaxed);
                            let text = String::from_utf8_lossy(&b);
                            let cut: String = text.chars().take(400).collect();
                            counters.note(format!("{s} with failed entries: {cut}"));
                        }
                    }
                    Ok((s, b)) => {
                        counters.failed.fetch_add(per, Ordering::Relaxed);
                        counters.failed_requests.fetch_add(1, Ordering::Relaxed);
                        counters.note(format!("{s}: {}", String::from_utf8_lossy(&b)));
                        if s == StatusCode::SERVICE_UNAVAILABLE
                            || s == StatusCode::TOO_MANY_REQUESTS
                        {
                            tokio::time::sleep(Duration::from_millis(1)).await;
                        }
                    }
                    Err(e) => {
                        counters.failed.fetch_add(per, Ordering::Relaxed);
                        counters.failed_requests.fetch_add(1, Ordering::Relaxed);
                        counters.note(format!("connection: {e}"));
                        break;
                    }
                }
            }
            (h, last_answer)
        });
    }

    // Progress once a second while the publishers run (bounded by their end).
    let mut publish_latency = workloads::new_histogram()?;
    let mut last_answer = t0;
    let mut last_print = (t0, 0u64, 0u64);
    let hard_stop = end + Duration::from_secs(15);
    while !workers.is_empty() {
        match tokio::time::timeout(Duration::from_millis(200), workers.join_next()).await {
            Ok(Some(Ok((h, last)))) => {
                if let Some(h) = h {
                    publish_latency.add(&h)?;
                }
                if let Some(l) = last {
                    last_answer = last_answer.max(l);
                }
            }
            Ok(Some(Err(e))) => counters.note(format!("publisher task: {e}")),
            Ok(None) => break,
            Err(_) => {}
        }
        let now = Instant::now();
        if now.duration_since(last_print.0) >= Duration::from_secs(1) {
            let p = counters.published.load(Ordering::Relaxed);
            let d = rec.lock().unwrap_or_else(|e| e.into_inner()).unique;
            let secs = now.duration_since(last_print.0).as_secs_f64();
            println!(
                "[{}] {:>5.1} s  published {:>9} ({:>8.0}/s)  delivered {:>9} ({:>8.0}/s)  failed {}",
                spec.name,
                now.duration_since(t0).as_secs_f64(),
                p,
                (p - last_print.1) as f64 / secs,
                d,
                (d - last_print.2) as f64 / secs,
                counters.failed.load(Ordering::Relaxed)
            );
            last_print = (now, p, d);
        }
        if now > hard_stop {
            counters.stop.store(true, Ordering::Relaxed);
            workers.abort_all();
            counters.note("publishers did not finish 15 s after the end of the window".into());
            break;
        }
    }
    let publish_elapsed = last_answer.duration_since(t0);
    let published = counters.published.load(Ordering::Relaxed);
    let waited = drain(&rec, published, Duration::from_secs(3), spec.drain_limit).await;
    let c1 = cpu_mark(&mesh.pids())?;
    let m1 = metrics_mark(mesh).await;
    let pull = stop_consumer(spec.name, &stop, consumer).await;
    let received = take_recorder(&rec, epoch)?;
    let pull = pull?;
    delete(
        &mesh.clients[SUBSCRIBER],
        &format!("/v1/subscriptions/{}", spec.subscription),
    )
    .await?;
    println!(
        "[{}] drained in {:.1} s: {} of {} delivered",
        spec.name,
        waited.as_secs_f64(),
        received.unique,
        published
    );
    mesh.check_home(&spec.topic)
        .await
        .map_err(|e| format!("{}: the home moved during the run: {e}", spec.name))?;
    let delivered_elapsed = received
        .last_at
        .map_or(Duration::ZERO, |l| l.saturating_duration_since(t0));
    let first_error = counters
        .first_error
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    Ok(EndToEnd {
        connections: spec.connections,
        per_request: per as usize,
        published,
        failed: counters.failed.load(Ordering::Relaxed),
        failed_requests: counters.failed_requests.load(Ordering::Relaxed),
        first_error,
        publish_elapsed,
        publish_latency,
        received,
        delivered_elapsed,
        pull,
        cpu: cpu_use(&c0, &c1, clk_tck),
        counters: mesh_counters(&m0, &m1),
        max_rss_kib: rss.since_reset(),
    })
}

// ----- 3 and 5: open-loop publish → push -----

/// Result of an open-loop publish → push run.
pub struct PushRun {
    /// Offered rate, msg/s.
    pub rate: u64,
    /// The publishing side (latency of the publish answer).
    pub publish: OpenLoop,
    /// The push receiver's side.
    pub received: Recorder,
    /// CPU over the run.
    pub cpu: CpuUse,
    /// Largest RSS per agent during the run, KiB.
    pub max_rss_kib: [u64; 3],
    /// RSS per agent when the last message had arrived, KiB.
    pub end_rss_kib: [u64; 3],
}

impl PushRun {
    /// Published but never pushed.
    pub fn lost(&self) -> u64 {
        self.publish.ok.saturating_sub(self.received.unique)
    }
}

#[allow(clippy::too_many_arguments)]
async fn push_run(
    mesh: &Mesh,
    rss: &RssWatch,
    sink: &PushSink,
    ctx: &Ctx,
    name: &'static str,
    topic: &str,
    rate: u64,
    duration: Duration,
    warmup: u64,
    drain_limit: Duration,
) -> Result<PushRun, BoxError> {
    mesh.check_home(topic).await?;
    let subscription = format!("{name}-push");
    put(
        &mesh.clients[SUBSCRIBER],
        &format!("/v1/subscriptions/{subscription}"),
        serde_json::json!({"topic": topic, "start": "earliest", "pushPath": "/push", "maxInFlight": 1000}),
    )
    .await?;
    let epoch = ctx.epoch;
    let path = format!("/v1/topics/{topic}/messages");
    let unique = |sink: &PushSink| {
        sink.lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map_or(0, |r| r.unique)
    };
    // Warm-up: the group starts at the home and the push connections open;
    // every warm-up message must arrive before the measured run starts.
    *sink.lock().unwrap_or_else(|p| p.into_inner()) = Some(Recorder::new(epoch, warmup)?);
    let w = workloads::open_loop(
        ctx,
        OpenLoopSpec {
            name,
            path: path.clone(),
            content_type: "application/json",
            rate: rate.min(1_000),
            duration: Duration::from_secs(10),
            max_messages: warmup,
        },
        move |i, at| workloads::timed_payload(epoch, i, at),
    )
    .await?;
    let started = Instant::now();
    while unique(sink) < w.ok && started.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let got = unique(sink);
    if w.failed > 0 || got < warmup {
        return Err(format!(
            "{name}: warm-up: {} of {warmup} published ({}), {got} pushed within 10 s",
            w.ok,
            w.first_error.unwrap_or_default()
        )
        .into());
    }
    let expected = rate * duration.as_secs().max(1);
    *sink.lock().unwrap_or_else(|p| p.into_inner()) = Some(Recorder::new(epoch, expected)?);
    rss.reset();
    let c0 = cpu_mark(&mesh.pids())?;
    let publish = workloads::open_loop(
        ctx,
        OpenLoopSpec {
            name,
            path,
            content_type: "application/json",
            rate,
            duration,
            max_messages: expected,
        },
        move |i, at| workloads::timed_payload(epoch, i, at),
    )
    .await?;
    let started = Instant::now();
    let mut last = (0, Instant::now());
    while started.elapsed() < drain_limit {
        let n = unique(sink);
        if n >= publish.ok {
            break;
        }
        if n != last.0 {
            last = (n, Instant::now());
        } else if last.1.elapsed() > Duration::from_secs(3) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let c1 = cpu_mark(&mesh.pids())?;
    let end_rss_kib = rss_now(&mesh.pids())?;
    let received = sink
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
        .ok_or("the push recorder vanished")?;
    delete(
        &mesh.clients[SUBSCRIBER],
        &format!("/v1/subscriptions/{subscription}"),
    )
    .await?;
    mesh.check_home(topic)
        .await
        .map_err(|e| format!("{name}: the home moved during the run: {e}"))?;
    println!(
        "==> {name}: {} of {} pushed, p50 {} µs, p99 {} µs, p99.9 {} µs, max {} µs\n",
        received.unique,
        publish.ok,
        received.latency.value_at_quantile(0.5),
        received.latency.value_at_quantile(0.99),
        received.latency.value_at_quantile(0.999),
        received.latency.max()
    );
    Ok(PushRun {
        rate,
        publish,
        received,
        cpu: cpu_use(&c0, &c1, ctx.clk_tck),
        max_rss_kib: rss.since_reset(),
        end_rss_kib,
    })
}

// ----- 4: request/reply -----

/// Sequential request/reply round trips.
pub struct RoundTrips {
    /// Which agent the requests were sent to.
    pub via: &'static str,
    /// Answered 200 with the app's body.
    pub ok: u64,
    /// Anything else.
    pub failed: u64,
    /// First failure.
    pub first_error: Option<String>,
    /// Round trip, µs.
    pub latency: Histogram<u64>,
    /// Length of the run.
    pub elapsed: Duration,
    /// CPU over the run.
    pub cpu: CpuUse,
}

/// Sequential request/reply round trips sent to agent `via`, each with
/// `body`, answered by the bench's app; bounded by `max` and `limit`.
pub async fn round_trips(
    mesh: &Mesh,
    via: usize,
    topic: &str,
    body: Bytes,
    max: u64,
    limit: Duration,
    clk_tck: f64,
) -> Result<RoundTrips, BoxError> {
    let mut conn = Conn::open(mesh.agents[via].app_addr).await?;
    let path = format!("/v1/topics/{topic}/requests?timeout=5s");
    // Until the subscriber's agent is known to the sender (bounded).
    let started = Instant::now();
    loop {
        let (s, b) = conn.post(&path, "application/json", body.clone()).await?;
        if s == StatusCode::OK && b.as_ref() == workloads::REPLY_BODY {
            break;
        }
        if started.elapsed() > Duration::from_secs(10) {
            return Err(format!(
                "request/reply via {}: no good answer within 10 s; last {s}: {}",
                NODES[via],
                String::from_utf8_lossy(&b)
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A few unmeasured round trips.
    for _ in 0..50 {
        let _ = conn.post(&path, "application/json", body.clone()).await?;
    }
    let mut latency = workloads::new_histogram()?;
    let (mut ok, mut failed, mut first_error) = (0u64, 0u64, None);
    let c0 = cpu_mark(&mesh.pids())?;
    let t0 = Instant::now();
    let mut n = 0;
    while n < max && t0.elapsed() < limit {
        n += 1;
        let at = Instant::now();
        match conn.post(&path, "application/json", body.clone()).await {
            Ok((s, b)) if s == StatusCode::OK && b.as_ref() == workloads::REPLY_BODY => {
                workloads::record(&mut latency, at.elapsed());
                ok += 1;
            }
            Ok((s, b)) => {
                failed += 1;
                first_error.get_or_insert_with(|| format!("{s}: {}", String::from_utf8_lossy(&b)));
            }
            Err(e) => {
                failed += 1;
                first_error.get_or_insert_with(|| e.to_string());
                conn = Conn::open(mesh.agents[via].app_addr).await?;
            }
        }
    }
    let elapsed = t0.elapsed();
    let c1 = cpu_mark(&mesh.pids())?;
    println!(
        "==> request/reply via {}: {ok} ok, {failed} failed, p50 {} µs, p99 {} µs, p99.9 {} µs",
        NODES[via],
        latency.value_at_quantile(0.5),
        latency.value_at_quantile(0.99),
        latency.value_at_quantile(0.999)
    );
    Ok(RoundTrips {
        via: NODES[via],
        ok,
        failed,
        first_error,
        latency,
        elapsed,
        cpu: cpu_use(&c0, &c1, clk_tck),
    })
}

// ----- the whole mesh run -----

/// A workload's result, or why it failed.
pub type Outcome<T> = Result<T, String>;

/// What the agents logged at WARN and ERROR level.
pub struct LogFindings {
    /// Node name.
    pub node: &'static str,
    /// WARN lines.
    pub warnings: usize,
    /// ERROR lines.
    pub errors: usize,
    /// The first few of them.
    pub samples: Vec<String>,
}

/// Everything the mesh run measured.
pub struct MeshResults {
    /// Idle RSS per agent, 1 s after the mesh formed, KiB.
    pub idle_rss_kib: [u64; 3],
    /// Largest RSS per agent over the whole run, KiB.
    pub max_rss_kib: [u64; 3],
    /// RSS per agent at the end of the whole run (1 s after the last run), KiB.
    pub end_rss_kib: [u64; 3],
    /// The topics and their homes.
    pub topics: Topics,
    /// 1. single publishes end to end.
    pub tput: Outcome<EndToEnd>,
    /// 2. ephemeral batches end to end, publishers never held.
    pub eph: Outcome<EndToEnd>,
    /// 2b. the same with publishers held within a window of the subscriber.
    pub eph_paced: Outcome<EndToEnd>,
    /// That window, messages.
    pub eph_window: u64,
    /// 3. publish → push at 1,000 msg/s.
    pub latency: Outcome<PushRun>,
    /// 4. request/reply across agents.
    pub rr: Outcome<RoundTrips>,
    /// 4b. request/reply on the subscriber's own agent (for comparison).
    pub rr_local: Outcome<RoundTrips>,
    /// 5. publish → push at 10,000 msg/s, for memory.
    pub rss: Outcome<PushRun>,
    /// Agent log findings.
    pub logs: Vec<LogFindings>,
}

fn outcome<T>(name: &str, r: Result<T, BoxError>) -> Outcome<T> {
    r.map_err(|e| {
        eprintln!("[{name}] FAILED: {e}");
        e.to_string()
    })
}

fn scan_log(node: &'static str, log: &str) -> LogFindings {
    let mut f = LogFindings {
        node,
        warnings: 0,
        errors: 0,
        samples: Vec::new(),
    };
    for line in log.lines() {
        let warn = line.contains(" WARN ");
        let error = line.contains(" ERROR ");
        if warn {
            f.warnings += 1;
        }
        if error {
            f.errors += 1;
        }
        if (warn || error) && f.samples.len() < 4 {
            f.samples.push(line.chars().take(400).collect());
        }
    }
    f
}

/// Runs the mesh workloads. Fails only when the mesh cannot be set up; a
/// workload that fails is reported in its result.
pub async fn run(
    bin: &Path,
    plan: &MeshPlan,
    opts: &MeshOptions,
    clk_tck: f64,
) -> Result<MeshResults, BoxError> {
    let push_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let push_port = push_listener.local_addr()?.port();
    let sink: PushSink = Arc::new(Mutex::new(None));
    let server = tokio::spawn(workloads::serve_push(push_listener, sink.clone()));
    let result = async {
        let mut mesh = Mesh::start(bin, push_port).await?;
        let epoch = Instant::now();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let idle_rss_kib = rss_now(&mesh.pids())?;
        println!("==> idle RSS per agent: {idle_rss_kib:?} KiB");
        let rss = RssWatch::spawn(mesh.pids());
        let topics = choose_topics(&mesh).await?;
        println!(
            "==> topics homed on {}: throughput {}, ephemeral {} and {}, latency {}, memory {}; request/reply {}",
            NODES[HOME], topics.tput, topics.eph, topics.eph_paced, topics.latency, topics.rss, topics.rr
        );
        let ctx = Ctx {
            app: mesh.agents[PUBLISHER].app_addr,
            admin: mesh.agents[HOME].admin_addr,
            pid: mesh.agents[PUBLISHER].pid(),
            epoch,
            clk_tck,
            max_rss_kib: Arc::new(AtomicU64::new(0)),
        };
        between(&mesh, clk_tck, plan).await;

        let rss_run = outcome(
            "mesh-memory",
            push_run(
                &mesh,
                &rss,
                &sink,
                &ctx,
                "mesh-memory",
                &topics.rss,
                plan.rss_rate,
                plan.rss_time,
                plan.warmup_messages,
                plan.drain_limit,
            )
            .await,
        );
        mesh.check_alive()?;
        between(&mesh, clk_tck, plan).await;

        let latency = outcome(
            "mesh-latency",
            push_run(
                &mesh,
                &rss,
                &sink,
                &ctx,
                "mesh-latency",
                &topics.latency,
                plan.latency_rate,
                plan.latency_time,
                plan.warmup_messages,
                plan.drain_limit,
            )
            .await,
        );
        mesh.check_alive()?;
        between(&mesh, clk_tck, plan).await;

        put(
            &mesh.clients[SUBSCRIBER],
            "/v1/subscriptions/mesh-rr",
            serde_json::json!({"topic": topics.rr, "pushPath": "/reply"}),
        )
        .await?;
        let rr = outcome(
            "mesh-rr",
            round_trips(
                &mesh,
                PUBLISHER,
                &topics.rr,
                Bytes::from_static(b"{\"q\":1}"),
                plan.rr_max,
                plan.rr_time,
                clk_tck,
            )
            .await,
        );
        let rr_local = outcome(
            "mesh-rr-local",
            round_trips(
                &mesh,
                SUBSCRIBER,
                &topics.rr,
                Bytes::from_static(b"{\"q\":1}"),
                plan.rr_max / 4,
                plan.rr_time / 4,
                clk_tck,
            )
            .await,
        );
        mesh.check_alive()?;
        between(&mesh, clk_tck, plan).await;

        let tput = outcome(
            "mesh-single",
            end_to_end(
                &mesh,
                &rss,
                epoch,
                clk_tck,
                EndToEndSpec {
                    name: "mesh-single",
                    topic: topics.tput.clone(),
                    subscription: "mesh-single".into(),
                    connections: opts.connections.max(1),
                    per_request: 1,
                    max_messages: plan.tput_max,
                    duration: plan.tput_time,
                    drain_limit: plan.drain_limit,
                    window: None,
                },
            )
            .await,
        );
        mesh.check_alive()?;
        between(&mesh, clk_tck, plan).await;

        let eph = outcome(
            "mesh-batch",
            end_to_end(
                &mesh,
                &rss,
                epoch,
                clk_tck,
                EndToEndSpec {
                    name: "mesh-batch",
                    topic: topics.eph.clone(),
                    subscription: "mesh-batch".into(),
                    connections: opts.batch_connections.max(1),
                    per_request: opts.batch_size.max(1),
                    max_messages: plan.eph_max,
                    duration: plan.eph_time,
                    drain_limit: plan.drain_limit,
                    window: None,
                },
            )
            .await,
        );
        mesh.check_alive()?;
        between(&mesh, clk_tck, plan).await;

        let eph_paced = outcome(
            "mesh-batch-held",
            end_to_end(
                &mesh,
                &rss,
                epoch,
                clk_tck,
                EndToEndSpec {
                    name: "mesh-batch-held",
                    topic: topics.eph_paced.clone(),
                    subscription: "mesh-batch-held".into(),
                    connections: opts.batch_connections.max(1),
                    per_request: opts.batch_size.max(1),
                    max_messages: plan.eph_max,
                    duration: plan.eph_time,
                    drain_limit: plan.drain_limit,
                    window: Some(EPH_WINDOW),
                },
            )
            .await,
        );
        mesh.check_alive()?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let end_rss_kib = rss_now(&mesh.pids())?;
        mesh.check_alive()?;
        let logs = mesh
            .agents
            .iter()
            .zip(NODES)
            .map(|(a, node)| scan_log(node, &a.log()))
            .collect();
        Ok(MeshResults {
            idle_rss_kib,
            end_rss_kib,
            max_rss_kib: rss.overall(),
            topics,
            tput,
            eph,
            eph_paced,
            eph_window: EPH_WINDOW,
            latency,
            rr,
            rr_local,
            rss: rss_run,
            logs,
        })
        // `mesh` is dropped here: all three agents stop.
    }
    .await;
    server.abort();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_template_is_ndjson_of_256_byte_objects() -> Result<(), BoxError> {
        let t = BatchTemplate::new(3);
        let body = t.fill(41, 1_234_567);
        let lines: Vec<&[u8]> = body
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .collect();
        assert_eq!(lines.len(), 3);
        for (i, l) in lines.iter().enumerate() {
            assert_eq!(l.len(), PAYLOAD_BYTES);
            let v: Value = serde_json::from_slice(l)?;
            assert_eq!(v["seq"].as_u64(), Some(41 + i as u64));
            assert_eq!(v["t"].as_u64(), Some(1_234_567));
        }
        Ok(())
    }

    #[test]
    fn scans_a_pull_answer() -> Result<(), BoxError> {
        let body = br#"[{"ackid":"0-1-1","data":{"pad":"x}{\"","seq":7,"t":99},"id":"a"},{"ackid":"0-2-1","data":"abc"}]"#;
        let ev = scan_events(body)?;
        assert_eq!(ev.len(), 2);
        assert_eq!(ev[0].ackid, Some("0-1-1"));
        assert_eq!((ev[0].t, ev[0].seq), (Some(99), Some(7)));
        assert_eq!(ev[1].ackid, Some("0-2-1"));
        assert_eq!((ev[1].t, ev[1].seq), (None, None));
        assert!(scan_events(b"[{\"a\":1}").is_err());
        Ok(())
    }

    #[test]
    fn reads_batch_counts_and_metrics() {
        assert_eq!(
            batch_counts(br#"{"failed":2,"published":62,"results":[]}"#),
            Some((62, 2))
        );
        let text = "# HELP x\nshoal_forwarded_messages_total{outcome=\"stored\"} 10\nshoal_forwarded_messages_total{outcome=\"failed\"} 2\nshoal_mesh_writes_total 7\n";
        assert_eq!(metric_sum(text, "shoal_forwarded_messages_total"), 12.0);
        assert_eq!(metric_sum(text, "shoal_mesh_writes_total"), 7.0);
    }
}
