//! Shoal side by side with NATS (issue 5): the same workloads against a
//! three-agent Shoal mesh and a `nats-server` (plain, and a second one with
//! JetStream), alternating Shoal round / NATS round so that drift on a shared
//! machine hits both alike.
//!
//! Shoal: the app publishes on agent-1, the measured partitions live on
//! agent-2 (their home), the subscribers (and the request/reply app) sit
//! behind agent-3, so every message crosses the mesh. NATS: one server; the
//! publisher and subscribers are separate client connections to it.
//!
//! Workloads, each at every message size of the plan, each round bounded by
//! a message count and by time:
//!
//! 1. open-loop latency at fixed rates (publish → subscriber, measured from
//!    the scheduled send time);
//! 2. request/reply round trips, sequential;
//! 3. one publisher → one subscriber, one message per request and batched;
//! 4. fan-out to 5 subscribers and a consumer group (queue group) of 3;
//! 5. durable publish (Shoal durable topic vs. JetStream R1 file stream),
//!    waiting for each ack and with many acks in flight.
//!
//! Publishers of the throughput runs are held while more than a window of
//! messages is published but not yet received by every subscriber, on both
//! sides alike, so neither Shoal's ephemeral ring nor a NATS slow-consumer
//! limit drops anything: every message must arrive, and a missing one fails
//! the run.

use crate::agent::ProcStats;
use crate::conn::Conn;
use crate::mesh::{self, Mesh, Topics, NODES, PUBLISHER, SUBSCRIBER};
use crate::nats::NatsServer;
use crate::workloads::{self, ClosedLoop, Ctx, OpenLoopSpec, PushSink, Recorder};
use crate::BoxError;
use bytes::Bytes;
use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;
use hdrhistogram::Histogram;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::task::JoinSet;

/// Sequence number of the warm-up probes (outside every run's range, so a
/// recorder counts a probe as unreadable, never as a message).
const PROBE_SEQ: u64 = 1 << 40;

/// Counts, durations and shapes of a comparison run.
#[derive(Clone, Debug)]
pub struct ComparePlan {
    /// Rounds per system and workload (alternating Shoal, NATS, Shoal, ...).
    pub rounds: usize,
    /// Message sizes, bytes.
    pub sizes: Vec<usize>,
    /// Offered rates of the latency runs, msg/s.
    pub rates: Vec<u64>,
    /// Length of a latency round.
    pub latency_time: Duration,
    /// Most round trips of a request/reply round.
    pub rr_max: u64,
    /// Longest request/reply round.
    pub rr_time: Duration,
    /// Longest publishing window of a throughput round.
    pub tput_time: Duration,
    /// Most messages of a throughput round.
    pub tput_max: u64,
    /// Most bytes of a throughput or durable round (caps the count of large messages).
    pub max_bytes: u64,
    /// Messages per batch (Shoal: ndjson POST; NATS: publishes per flush).
    pub batch: usize,
    /// Shoal's keep-alive connections for one-message-per-POST publishing.
    pub shoal_connections: usize,
    /// Shoal's connections for batched publishing.
    pub shoal_batch_connections: usize,
    /// Most messages on their way to the subscribers at once.
    pub window: u64,
    /// Most bytes on their way at once (caps the window for large messages).
    pub window_bytes: u64,
    /// Subscribers of the fan-out run.
    pub fanout: usize,
    /// Members of the consumer group run.
    pub group: usize,
    /// Longest durable publishing round.
    pub durable_time: Duration,
    /// Most messages of a durable round.
    pub durable_max: u64,
    /// Acks in flight of the "many in flight" durable run.
    pub inflight: usize,
    /// Longest wait for subscribers to catch up after publishing stops.
    pub drain_limit: Duration,
    /// Rest between workloads (`sync(1)` and a second).
    pub settle: bool,
    /// Run only the workloads with these keys (all when empty).
    pub only: Vec<String>,
}

impl ComparePlan {
    /// The full run (about 10 to 15 minutes on two cores) or the quick smoke run.
    pub fn new(quick: bool) -> ComparePlan {
        if quick {
            ComparePlan {
                rounds: 1,
                sizes: vec![128, 16 * 1024],
                rates: vec![1_000],
                latency_time: Duration::from_secs(1),
                rr_max: 300,
                rr_time: Duration::from_secs(1),
                tput_time: Duration::from_secs(1),
                tput_max: 50_000,
                max_bytes: 32 << 20,
                batch: 64,
                shoal_connections: 16,
                shoal_batch_connections: 4,
                window: 5_000,
                window_bytes: 8 << 20,
                fanout: 5,
                group: 3,
                durable_time: Duration::from_secs(1),
                durable_max: 20_000,
                inflight: 64,
                drain_limit: Duration::from_secs(10),
                settle: false,
                only: Vec::new(),
            }
        } else {
            ComparePlan {
                rounds: 2,
                sizes: vec![128, 1024, 16 * 1024],
                rates: vec![1_000, 10_000],
                latency_time: Duration::from_secs(5),
                rr_max: 20_000,
                rr_time: Duration::from_secs(3),
                tput_time: Duration::from_secs(4),
                tput_max: 4_000_000,
                max_bytes: 384 << 20,
                batch: 64,
                shoal_connections: 64,
                shoal_batch_connections: 8,
                window: 5_000,
                window_bytes: 8 << 20,
                fanout: 5,
                group: 3,
                durable_time: Duration::from_secs(4),
                durable_max: 2_000_000,
                inflight: 64,
                drain_limit: Duration::from_secs(20),
                settle: true,
                only: Vec::new(),
            }
        }
    }

    /// The window for messages of `size` bytes.
    pub fn window_for(&self, size: usize) -> u64 {
        self.window
            .min(self.window_bytes / size.max(1) as u64)
            .max(self.batch as u64)
    }

    /// The most messages of a round of `size`-byte messages under `max`.
    fn cap(&self, max: u64, size: usize) -> u64 {
        max.min(self.max_bytes / size.max(1) as u64).max(1)
    }
}

/// The two systems.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sys {
    /// Three Shoal agents.
    Shoal,
    /// `nats-server` (core NATS, or JetStream for the durable runs).
    Nats,
}

/// A workload of the comparison.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    /// Open-loop publish → subscriber latency at a fixed rate (msg/s).
    Latency(u64),
    /// Sequential request/reply round trips.
    RequestReply,
    /// One publisher → one subscriber; `true`: batched.
    PubSub(bool),
    /// One publisher (batched) → this many independent subscribers.
    FanOut(usize),
    /// One publisher (batched) → a consumer group of this many members.
    Group(usize),
    /// Durable publishes; `true`: many acks in flight, else one at a time.
    Durable(bool),
}

impl Workload {
    /// Short name for progress lines, plots and anchors.
    pub fn key(&self) -> String {
        match self {
            Workload::Latency(r) => format!("latency-{r}"),
            Workload::RequestReply => "request-reply".into(),
            Workload::PubSub(false) => "pubsub-single".into(),
            Workload::PubSub(true) => "pubsub-batch".into(),
            Workload::FanOut(n) => format!("fanout-{n}"),
            Workload::Group(n) => format!("group-{n}"),
            Workload::Durable(false) => "durable-sync".into(),
            Workload::Durable(true) => "durable-inflight".into(),
        }
    }

    /// Whether the figure is a latency (lower is better) rather than a rate.
    pub fn is_latency(&self) -> bool {
        matches!(self, Workload::Latency(_) | Workload::RequestReply)
    }

    /// Whether the NATS side is JetStream.
    pub fn is_durable(&self) -> bool {
        matches!(self, Workload::Durable(_))
    }
}

/// One round of one workload on one system.
#[derive(Clone, Debug)]
pub struct Round {
    /// Messages (or requests) sent and accepted: published, acked, or asked.
    pub sent: u64,
    /// Deliveries (or answers, or acks) that must arrive for every message to
    /// be accounted for.
    pub expected: u64,
    /// Distinct deliveries (or good answers, or acks) that did arrive.
    pub received: u64,
    /// Messages delivered again (at-least-once redelivery).
    pub duplicates: u64,
    /// Refused or failed sends.
    pub failed: u64,
    /// Messages the system itself reports it dropped (Shoal: the rise of
    /// `shoal_messages_dropped_total` over the agents, such as an ephemeral
    /// ring overrunning a slow subscriber, best effort by design; 0 for NATS).
    pub dropped: u64,
    /// The first failure seen.
    pub first_error: Option<String>,
    /// First send to the last delivery (or answer).
    pub elapsed: Duration,
    /// Delivery latency from the scheduled send time, or the round trip, µs.
    pub latency: Histogram<u64>,
    /// Deliveries the bench could not read (late warm-up probes among them).
    pub unreadable: u64,
    /// A few sequence numbers that never arrived (per subscriber), for the log.
    pub missing_sample: Vec<u64>,
    /// CPU seconds of the system's processes over the round.
    pub cpu_s: Vec<f64>,
    /// RSS of each of the system's processes at the end of the round, KiB.
    pub end_rss_kib: Vec<u64>,
}

impl Round {
    /// Deliveries (or answers, or acks) per second.
    pub fn rate(&self) -> f64 {
        self.received as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Expected but neither received nor reported dropped by the system.
    pub fn missing(&self) -> u64 {
        self.expected
            .saturating_sub(self.received)
            .saturating_sub(self.dropped)
    }

    /// CPU seconds of all the system's processes per million received.
    pub fn cpu_per_million(&self) -> f64 {
        self.cpu_s.iter().sum::<f64>() / self.received.max(1) as f64 * 1e6
    }
}

/// What the publisher of a NATS round did.
struct Sent {
    published: u64,
    failed: u64,
    first_error: Option<String>,
    started: Instant,
}

/// A round's result, or why it failed.
pub type Outcome = Result<Round, String>;

/// Every round of one workload at one size.
pub struct Row {
    /// The workload.
    pub workload: Workload,
    /// Message size, bytes.
    pub size: usize,
    /// Shoal's rounds, in order.
    pub shoal: Vec<Outcome>,
    /// NATS's rounds, in order.
    pub nats: Vec<Outcome>,
}

/// Memory of each process when idle.
#[derive(Clone, Debug, Default)]
pub struct Idle {
    /// agent-1..3, KiB.
    pub agents_kib: Vec<u64>,
    /// Plain nats-server, KiB.
    pub nats_kib: u64,
    /// nats-server with JetStream, KiB.
    pub nats_js_kib: u64,
    /// The private (`RssAnon`) part of each: agent-1..3, nats-server,
    /// nats-server with JetStream, KiB.
    pub anon_kib: Vec<u64>,
}

/// Everything the comparison measured.
pub struct CompareResults {
    /// Idle memory.
    pub idle: Idle,
    /// The rows, in the order they ran.
    pub rows: Vec<Row>,
    /// Process ids of everything the run started.
    pub pids: Vec<(String, u32)>,
    /// Shoal's topics and their homes.
    pub topics: Topics,
}

impl CompareResults {
    /// (expected, received, dropped, missing, failed, failed rounds) over
    /// every round.
    pub fn accounting(&self) -> (u64, u64, u64, u64, u64, usize) {
        let (mut e, mut r, mut d, mut m, mut f, mut bad) = (0, 0, 0, 0, 0, 0);
        for row in &self.rows {
            for o in row.shoal.iter().chain(&row.nats) {
                match o {
                    Ok(x) => {
                        e += x.expected;
                        r += x.received.min(x.expected);
                        d += x.dropped;
                        m += x.missing();
                        f += x.failed;
                    }
                    Err(_) => bad += 1,
                }
            }
        }
        (e, r, d, m, f, bad)
    }
}

// ----- payloads -----

/// A JSON payload of exactly `size` bytes (at least 82) carrying `seq` and
/// its send time `t` (nanoseconds since the run's epoch).
fn sized_payload(template: &mesh::BatchTemplate, seq: u64, t: u64) -> Bytes {
    let b = template.fill(seq, t);
    // The template is one ndjson line: drop its newline.
    b.slice(..b.len().saturating_sub(1))
}

fn nanos_since(epoch: Instant, at: Instant) -> u64 {
    u64::try_from(at.saturating_duration_since(epoch).as_nanos()).unwrap_or(u64::MAX)
}

/// Reads `t` and `seq` from the head of a payload made by [`sized_payload`].
fn parse_head(payload: &[u8]) -> (Option<u64>, Option<u64>) {
    let head = &payload[..payload.len().min(96)];
    match std::str::from_utf8(head) {
        Ok(s) => (
            mesh::number_after(s, "\"t\":"),
            mesh::number_after(s, "\"seq\":"),
        ),
        Err(_) => (None, None),
    }
}

// ----- watching processes -----

fn cpu_ticks(pids: &[u32]) -> Result<Vec<u64>, BoxError> {
    pids.iter()
        .map(|p| Ok(ProcStats::read(*p)?.cpu_ticks))
        .collect()
}

fn rss_kib(pids: &[u32]) -> Result<Vec<u64>, BoxError> {
    pids.iter()
        .map(|p| Ok(ProcStats::read(*p)?.rss_kib))
        .collect()
}

/// CPU seconds per process between two marks.
fn cpu_between(a: &[u64], b: &[u64], clk_tck: f64) -> Vec<f64> {
    a.iter()
        .zip(b)
        .map(|(a, b)| b.saturating_sub(*a) as f64 / clk_tck)
        .collect()
}

/// Waits until every recorder holds `target` distinct messages, none made
/// progress for 3 s, or `limit` passed.
async fn drain_all(recs: &[Arc<Mutex<Recorder>>], target: u64, limit: Duration) {
    let started = Instant::now();
    for rec in recs {
        let left = limit.saturating_sub(started.elapsed());
        mesh::drain(rec, target, Duration::from_secs(3), left).await;
    }
}

/// Holds a publisher while `claimed - min(received) + next > window`:
/// yields to the subscribers first, then sleeps a millisecond at a time.
/// Returns false when `end` passes while waiting.
async fn wait_window(
    claimed: u64,
    next: u64,
    window: u64,
    progress: &[Arc<AtomicU64>],
    end: Instant,
) -> bool {
    let mut spins = 0u32;
    loop {
        let done = progress
            .iter()
            .map(|p| p.load(Ordering::Relaxed))
            .min()
            .unwrap_or(u64::MAX);
        if claimed.saturating_sub(done) + next <= window {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        spins += 1;
        if spins < 64 {
            tokio::task::yield_now().await;
        } else {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

/// Publishing counters shared by the publisher tasks of a round.
#[derive(Default)]
struct PubState {
    next: AtomicU64,
    published: AtomicU64,
    failed: AtomicU64,
    first_error: Mutex<Option<String>>,
    first_at: Mutex<Option<Instant>>,
}

impl PubState {
    fn note(&self, e: String) {
        let mut first = self.first_error.lock().unwrap_or_else(|p| p.into_inner());
        if first.is_none() {
            *first = Some(e);
        }
    }
    fn first_error(&self) -> Option<String> {
        self.first_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
    fn started(&self) {
        self.first_at
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert_with(Instant::now);
    }
}

/// Who receives in a pub/sub round.
#[derive(Clone, Copy, Debug)]
struct Subs {
    count: usize,
    group: bool,
}

impl Subs {
    fn for_workload(w: Workload) -> Subs {
        match w {
            Workload::FanOut(n) => Subs {
                count: n,
                group: false,
            },
            Workload::Group(n) => Subs {
                count: n,
                group: true,
            },
            _ => Subs {
                count: 1,
                group: false,
            },
        }
    }
    /// Independent recorders: one per subscriber, or one for the whole group.
    fn recorders(&self) -> usize {
        if self.group {
            1
        } else {
            self.count
        }
    }
}

// ----- the Shoal side -----

/// The Shoal mesh and what the runs share.
pub struct ShoalSide {
    /// The three agents.
    pub mesh: Mesh,
    /// Topics homed on agent-2: `eph` (pub/sub, fan-out, group),
    /// `eph_paced` (latency), `tput` (durable), `rr` (request/reply).
    pub topics: Topics,
    epoch: Instant,
    clk_tck: f64,
    run: AtomicU64,
}

impl ShoalSide {
    fn pids(&self) -> Vec<u32> {
        self.mesh.pids()
    }

    fn next_run(&self) -> u64 {
        self.run.fetch_add(1, Ordering::Relaxed)
    }

    fn ctx(&self) -> Ctx {
        Ctx {
            app: self.mesh.agents[PUBLISHER].app_addr,
            admin: self.mesh.agents[mesh::HOME].admin_addr,
            pid: self.mesh.agents[PUBLISHER].pid(),
            epoch: self.epoch,
            clk_tck: self.clk_tck,
            max_rss_kib: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Declares `subs` pull subscriptions of `topic` on agent-3 (starting at
    /// the latest message), starts a pull loop for each, and publishes probes
    /// on agent-1 until every recorder got one, so the measured messages
    /// meet subscribers that are already delivering. Returns the names, the
    /// recorders (fresh, expecting `expected`), their progress counters and
    /// the loops.
    #[allow(clippy::type_complexity)]
    async fn subscribe(
        &self,
        topic: &str,
        subs: Subs,
        expected: u64,
        template: &mesh::BatchTemplate,
        stop: &Arc<AtomicBool>,
        deadline: Instant,
    ) -> Result<
        (
            Vec<String>,
            Vec<Arc<Mutex<Recorder>>>,
            Vec<Arc<AtomicU64>>,
            Vec<tokio::task::JoinHandle<Result<mesh::PullStats, BoxError>>>,
        ),
        BoxError,
    > {
        let run = self.next_run();
        let client = &self.mesh.clients[SUBSCRIBER];
        let recs: Vec<_> = (0..subs.recorders())
            .map(|_| Recorder::new(self.epoch, expected).map(|r| Arc::new(Mutex::new(r))))
            .collect::<Result<_, _>>()?;
        let progress: Vec<_> = (0..subs.recorders())
            .map(|_| Arc::new(AtomicU64::new(0)))
            .collect();
        let mut names = Vec::new();
        let mut loops = Vec::new();
        for k in 0..subs.count {
            let name = format!("cmp-{run}-{k}");
            let group = if subs.group {
                format!("cmp-{run}-g")
            } else {
                name.clone()
            };
            mesh::put(
                client,
                &format!("/v1/subscriptions/{name}"),
                serde_json::json!({"topic": topic, "group": group, "start": "latest", "maxInFlight": 10000}),
            )
            .await?;
            let r = if subs.group { 0 } else { k };
            loops.push(tokio::spawn(mesh::pull_loop(
                self.mesh.agents[SUBSCRIBER].app_addr,
                name.clone(),
                1000,
                recs[r].clone(),
                progress[r].clone(),
                stop.clone(),
                deadline,
            )));
            names.push(name);
        }
        // Probes until every recorder saw one (each counts as unreadable).
        let mut conn = Conn::open(self.mesh.agents[PUBLISHER].app_addr).await?;
        let path = format!("/v1/topics/{topic}/messages");
        let started = Instant::now();
        loop {
            let probe = sized_payload(template, PROBE_SEQ, nanos_since(self.epoch, Instant::now()));
            let (s, b) = conn.post(&path, "application/json", probe).await?;
            if !s.is_success() {
                return Err(format!(
                    "probe publish answered {s}: {}",
                    String::from_utf8_lossy(&b)
                )
                .into());
            }
            tokio::time::sleep(Duration::from_millis(30)).await;
            let all = recs.iter().all(|r| {
                let r = r.lock().unwrap_or_else(|p| p.into_inner());
                r.unreadable > 0 || r.duplicates > 0
            });
            if all {
                break;
            }
            if started.elapsed() > Duration::from_secs(15) {
                return Err("the subscribers on agent-3 got no probe within 15 s".into());
            }
        }
        for r in &recs {
            *r.lock().unwrap_or_else(|p| p.into_inner()) = Recorder::new(self.epoch, expected)?;
        }
        Ok((names, recs, progress, loops))
    }

    async fn unsubscribe(&self, names: &[String]) -> Result<(), BoxError> {
        for n in names {
            mesh::delete(
                &self.mesh.clients[SUBSCRIBER],
                &format!("/v1/subscriptions/{n}"),
            )
            .await?;
        }
        Ok(())
    }

    /// One publisher on agent-1 (several keep-alive connections, one request
    /// in flight each) → `subs` pull subscribers on agent-3.
    async fn pubsub(
        &self,
        plan: &ComparePlan,
        size: usize,
        batch: bool,
        subs: Subs,
    ) -> Result<Round, BoxError> {
        let topic = self.topics.eph.clone();
        let per = if batch { plan.batch.max(1) } else { 1 } as u64;
        let connections = if batch {
            plan.shoal_batch_connections
        } else {
            plan.shoal_connections
        }
        .max(1);
        let requests = plan.cap(plan.tput_max, size).div_ceil(per);
        let expected = requests * per;
        let single = Arc::new(mesh::BatchTemplate::sized(1, size));
        let template = Arc::new(mesh::BatchTemplate::sized(per as usize, size));
        let stop = Arc::new(AtomicBool::new(false));
        let deadline = Instant::now() + plan.tput_time + plan.drain_limit + Duration::from_secs(30);
        let (names, recs, progress, loops) = self
            .subscribe(&topic, subs, expected, &single, &stop, deadline)
            .await?;

        let (path, ct) = if batch {
            (
                format!("/v1/topics/{topic}/messages/batch"),
                "application/x-ndjson",
            )
        } else {
            (format!("/v1/topics/{topic}/messages"), "application/json")
        };
        let window = plan.window_for(size);
        let state = Arc::new(PubState::default());
        let mut conns = Vec::new();
        for _ in 0..connections {
            conns.push(Conn::open(self.mesh.agents[PUBLISHER].app_addr).await?);
        }
        let c0 = cpu_ticks(&self.pids())?;
        let t0 = Instant::now();
        let end = t0 + plan.tput_time;
        let mut workers = JoinSet::new();
        for mut conn in conns {
            let (state, path, single, template, progress) = (
                state.clone(),
                path.clone(),
                single.clone(),
                template.clone(),
                progress.clone(),
            );
            let epoch = self.epoch;
            workers.spawn(async move {
                while Instant::now() < end {
                    let claimed = state.next.load(Ordering::Relaxed) * per;
                    if !wait_window(claimed, per, window, &progress, end).await {
                        break;
                    }
                    let r = state.next.fetch_add(1, Ordering::Relaxed);
                    if r >= requests {
                        break;
                    }
                    state.started();
                    let t = nanos_since(epoch, Instant::now());
                    let body = if per == 1 {
                        sized_payload(&single, r, t)
                    } else {
                        template.fill(r * per, t)
                    };
                    match conn.post(&path, ct, body).await {
                        Ok((s, b)) if s.is_success() => {
                            let (ok, bad) = if per == 1 {
                                (1, 0)
                            } else {
                                mesh::batch_counts(&b).unwrap_or((0, per))
                            };
                            state.published.fetch_add(ok, Ordering::Relaxed);
                            if bad > 0 {
                                state.failed.fetch_add(bad, Ordering::Relaxed);
                                state.note(format!("{s}: {bad} entries of a batch failed"));
                            }
                        }
                        Ok((s, b)) => {
                            state.failed.fetch_add(per, Ordering::Relaxed);
                            state.note(format!("{s}: {}", String::from_utf8_lossy(&b)));
                        }
                        Err(e) => {
                            state.failed.fetch_add(per, Ordering::Relaxed);
                            state.note(format!("connection: {e}"));
                            break;
                        }
                    }
                }
            });
        }
        let hard_stop = end + Duration::from_secs(15);
        while !workers.is_empty() {
            if Instant::now() > hard_stop {
                workers.abort_all();
                state.note("publishers did not finish 15 s after the window".into());
                break;
            }
            let _ = tokio::time::timeout(Duration::from_millis(200), workers.join_next()).await;
        }
        let published = state.published.load(Ordering::Relaxed);
        drain_all(&recs, published, plan.drain_limit).await;
        let c1 = cpu_ticks(&self.pids())?;
        let end_rss = rss_kib(&self.pids())?;
        stop.store(true, Ordering::Relaxed);
        let mut pull_error = None;
        for l in loops {
            if let Err(e) = mesh::stop_consumer("compare", &stop, l).await {
                pull_error.get_or_insert(e.to_string());
            }
        }
        self.unsubscribe(&names).await?;
        let first = *state.first_at.lock().unwrap_or_else(|p| p.into_inner());
        let round = collect(
            &recs,
            published,
            state.failed.load(Ordering::Relaxed),
            state.first_error().or(pull_error),
            first.unwrap_or(t0),
            subs,
            cpu_between(&c0, &c1, self.clk_tck),
            end_rss,
            self.epoch,
        )?;
        Ok(round)
    }

    /// Open-loop publishes at `rate` on agent-1 (one message per POST, a
    /// pool of keep-alive connections) → one pull subscriber on agent-3.
    async fn latency(&self, plan: &ComparePlan, size: usize, rate: u64) -> Result<Round, BoxError> {
        let topic = self.topics.eph_paced.clone();
        let count = (rate as f64 * plan.latency_time.as_secs_f64()) as u64;
        let single = Arc::new(mesh::BatchTemplate::sized(1, size));
        let stop = Arc::new(AtomicBool::new(false));
        let deadline =
            Instant::now() + plan.latency_time + plan.drain_limit + Duration::from_secs(30);
        let subs = Subs {
            count: 1,
            group: false,
        };
        let (names, recs, _progress, loops) = self
            .subscribe(&topic, subs, count, &single, &stop, deadline)
            .await?;
        let c0 = cpu_ticks(&self.pids())?;
        let dropped_before = mesh::dropped_total(&self.mesh).await;
        let started = Instant::now();
        let epoch = self.epoch;
        let t = single.clone();
        let publish = workloads::open_loop(
            &self.ctx(),
            OpenLoopSpec {
                name: "compare-latency",
                path: format!("/v1/topics/{topic}/messages"),
                content_type: "application/json",
                rate,
                duration: plan.latency_time,
                max_messages: count,
            },
            move |i, at| sized_payload(&t, i, nanos_since(epoch, at)),
        )
        .await?;
        drain_all(&recs, publish.ok, plan.drain_limit).await;
        let c1 = cpu_ticks(&self.pids())?;
        let end_rss = rss_kib(&self.pids())?;
        stop.store(true, Ordering::Relaxed);
        let mut pull_error = None;
        for l in loops {
            if let Err(e) = mesh::stop_consumer("compare", &stop, l).await {
                pull_error.get_or_insert(e.to_string());
            }
        }
        self.unsubscribe(&names).await?;
        let dropped = mesh::dropped_total(&self.mesh).await - dropped_before;
        let mut round = collect(
            &recs,
            publish.ok,
            publish.failed,
            publish.first_error.or(pull_error),
            started,
            subs,
            cpu_between(&c0, &c1, self.clk_tck),
            end_rss,
            self.epoch,
        )?;
        round.dropped = dropped.max(0.0) as u64;
        Ok(round)
    }

    /// Sequential requests on agent-1, answered by the bench's app behind agent-3.
    async fn request_reply(&self, plan: &ComparePlan, size: usize) -> Result<Round, BoxError> {
        let t = mesh::BatchTemplate::sized(1, size);
        let body = sized_payload(&t, 0, 0);
        let r = mesh::round_trips(
            &self.mesh,
            PUBLISHER,
            &self.topics.rr,
            body,
            plan.rr_max,
            plan.rr_time,
            self.clk_tck,
        )
        .await?;
        Ok(Round {
            dropped: 0,
            sent: r.ok + r.failed,
            expected: r.ok + r.failed,
            received: r.ok,
            duplicates: 0,
            unreadable: 0,
            missing_sample: Vec::new(),
            failed: r.failed,
            first_error: r.first_error,
            elapsed: r.elapsed,
            latency: r.latency,
            cpu_s: r.cpu.agent_s.to_vec(),
            end_rss_kib: rss_kib(&self.pids())?,
        })
    }

    /// Durable publishes on agent-1 to a topic homed on agent-2: one
    /// connection waiting for each answer, or `inflight` connections.
    async fn durable(
        &self,
        plan: &ComparePlan,
        size: usize,
        inflight: bool,
    ) -> Result<Round, BoxError> {
        let connections = if inflight { plan.inflight.max(1) } else { 1 };
        let c0 = cpu_ticks(&self.pids())?;
        let tp = workloads::closed_loop(
            &self.ctx(),
            ClosedLoop {
                name: "compare-durable",
                path: format!("/v1/topics/{}/messages", self.topics.tput),
                content_type: "application/octet-stream",
                body: Bytes::from(vec![b'x'; size]),
                per_request: 1,
                connections,
                warmup: Duration::ZERO,
                duration: plan.durable_time,
                max_messages: plan.cap(plan.durable_max, size),
            },
        )
        .await?;
        let c1 = cpu_ticks(&self.pids())?;
        Ok(Round {
            dropped: 0,
            sent: tp.messages + tp.rejected,
            expected: tp.messages + tp.rejected,
            received: tp.messages,
            duplicates: 0,
            unreadable: 0,
            missing_sample: Vec::new(),
            failed: tp.rejected,
            first_error: tp.first_error,
            elapsed: tp.elapsed,
            latency: workloads::new_histogram()?,
            cpu_s: cpu_between(&c0, &c1, self.clk_tck),
            end_rss_kib: rss_kib(&self.pids())?,
        })
    }
}

/// Builds a pub/sub round from its recorders.
#[allow(clippy::too_many_arguments)]
fn collect(
    recs: &[Arc<Mutex<Recorder>>],
    published: u64,
    failed: u64,
    first_error: Option<String>,
    first_send: Instant,
    subs: Subs,
    cpu_s: Vec<f64>,
    end_rss_kib: Vec<u64>,
    epoch: Instant,
) -> Result<Round, BoxError> {
    let mut latency = workloads::new_histogram()?;
    let (mut received, mut duplicates, mut unreadable, mut last) = (0, 0, 0, None::<Instant>);
    let mut missing_sample = Vec::new();
    for r in recs {
        let r = mesh::take_recorder(r, epoch)?;
        received += r.unique;
        duplicates += r.duplicates;
        unreadable += r.unreadable;
        missing_sample.extend(r.missing_sample(published, 5));
        latency.add(&r.latency)?;
        last = last.max(r.last_at);
    }
    let per_message = if subs.group { 1 } else { subs.count as u64 };
    Ok(Round {
        dropped: 0,
        sent: published,
        expected: published * per_message,
        received,
        duplicates,
        unreadable,
        missing_sample,
        failed,
        first_error,
        elapsed: last.map_or(Duration::ZERO, |l| l.saturating_duration_since(first_send)),
        latency,
        cpu_s,
        end_rss_kib,
    })
}

// ----- the NATS side -----

/// The NATS servers and the clients the runs share.
pub struct NatsSide {
    /// Plain nats-server (core NATS).
    pub core: NatsServer,
    /// nats-server with JetStream (file storage).
    pub js: NatsServer,
    publisher: async_nats::Client,
    jetstream: async_nats::jetstream::Context,
    epoch: Instant,
    clk_tck: f64,
    run: AtomicU64,
    responder: tokio::task::JoinHandle<()>,
}

impl Drop for NatsSide {
    fn drop(&mut self) {
        self.responder.abort();
    }
}

async fn nats_connect(url: &str) -> Result<async_nats::Client, BoxError> {
    async_nats::ConnectOptions::new()
        .subscription_capacity(1 << 17)
        .connect(url)
        .await
        .map_err(|e| format!("cannot connect to {url}: {e}").into())
}

impl NatsSide {
    /// Connects the publisher, starts the request/reply responder on its own
    /// connection, and creates the JetStream stream `BENCH` (R1, file).
    pub async fn new(
        core: NatsServer,
        js: NatsServer,
        epoch: Instant,
        clk_tck: f64,
    ) -> Result<NatsSide, BoxError> {
        let publisher = nats_connect(&core.url()).await?;
        let responder_client = nats_connect(&core.url()).await?;
        let mut requests = responder_client.subscribe("bench.rr").await?;
        responder_client.flush().await?;
        let responder = tokio::spawn(async move {
            while let Some(m) = requests.next().await {
                if let Some(reply) = m.reply {
                    let _ = responder_client
                        .publish(reply, Bytes::from_static(workloads::REPLY_BODY))
                        .await;
                }
            }
        });
        let jetstream = async_nats::jetstream::new(nats_connect(&js.url()).await?);
        jetstream
            .get_or_create_stream(async_nats::jetstream::stream::Config {
                name: "BENCH".into(),
                subjects: vec!["bench.js.>".into()],
                storage: async_nats::jetstream::stream::StorageType::File,
                num_replicas: 1,
                ..Default::default()
            })
            .await
            .map_err(|e| format!("cannot create the JetStream stream: {e}"))?;
        Ok(NatsSide {
            core,
            js,
            publisher,
            jetstream,
            epoch,
            clk_tck,
            run: AtomicU64::new(0),
            responder,
        })
    }

    fn next_run(&self) -> u64 {
        self.run.fetch_add(1, Ordering::Relaxed)
    }

    /// One publisher connection → `subs` subscriber connections (plain
    /// subscriptions, or one queue group).
    async fn pubsub(
        &self,
        plan: &ComparePlan,
        size: usize,
        batch: bool,
        subs: Subs,
    ) -> Result<Round, BoxError> {
        let per = if batch { plan.batch.max(1) } else { 1 } as u64;
        let expected = plan.cap(plan.tput_max, size).div_ceil(per) * per;
        let subject = format!("bench.ps.{}", self.next_run());
        let stop = Arc::new(AtomicBool::new(false));
        let (recs, progress, tasks) = self.subscribe(&subject, subs, expected, &stop).await?;
        let template = mesh::BatchTemplate::sized(1, size);
        let window = plan.window_for(size);
        let pids = [self.core.pid()];
        let c0 = cpu_ticks(&pids)?;
        let t0 = Instant::now();
        let end = t0 + plan.tput_time;
        let (mut published, mut failed, mut first_error) = (0u64, 0u64, None);
        'publish: while published < expected && Instant::now() < end {
            if !wait_window(published, per, window, &progress, end).await {
                break;
            }
            let t = nanos_since(self.epoch, Instant::now());
            for _ in 0..per {
                let body = sized_payload(&template, published, t);
                if let Err(e) = self.publisher.publish(subject.clone(), body).await {
                    failed += 1;
                    first_error.get_or_insert_with(|| e.to_string());
                    break 'publish;
                }
                published += 1;
            }
            if batch {
                if let Err(e) = self.publisher.flush().await {
                    first_error.get_or_insert_with(|| e.to_string());
                    break;
                }
            }
        }
        let sent = Sent {
            published,
            failed,
            first_error,
            started: t0,
        };
        self.finish(plan, sent, &recs, subs, &stop, tasks, &c0)
            .await
    }

    /// Ends a pub/sub round: flushes the publisher, waits until the
    /// subscribers have every published message (or the drain limit), reads
    /// nats-server's CPU and memory, and stops the subscribers.
    #[allow(clippy::too_many_arguments)]
    async fn finish(
        &self,
        plan: &ComparePlan,
        mut sent: Sent,
        recs: &[Arc<Mutex<Recorder>>],
        subs: Subs,
        stop: &AtomicBool,
        tasks: Vec<tokio::task::JoinHandle<()>>,
        c0: &[u64],
    ) -> Result<Round, BoxError> {
        if let Err(e) = self.publisher.flush().await {
            sent.first_error.get_or_insert_with(|| e.to_string());
        }
        drain_all(recs, sent.published, plan.drain_limit).await;
        let pids = [self.core.pid()];
        let c1 = cpu_ticks(&pids)?;
        let end_rss = rss_kib(&pids)?;
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
        collect(
            recs,
            sent.published,
            sent.failed,
            sent.first_error,
            sent.started,
            subs,
            cpu_between(c0, &c1, self.clk_tck),
            end_rss,
            self.epoch,
        )
    }

    /// Subscribes `subs` new connections to `subject` and flushes them, so
    /// the server knows every subscription before the first publish.
    #[allow(clippy::type_complexity)]
    async fn subscribe(
        &self,
        subject: &str,
        subs: Subs,
        expected: u64,
        stop: &Arc<AtomicBool>,
    ) -> Result<
        (
            Vec<Arc<Mutex<Recorder>>>,
            Vec<Arc<AtomicU64>>,
            Vec<tokio::task::JoinHandle<()>>,
        ),
        BoxError,
    > {
        let recs: Vec<_> = (0..subs.recorders())
            .map(|_| Recorder::new(self.epoch, expected).map(|r| Arc::new(Mutex::new(r))))
            .collect::<Result<_, _>>()?;
        let progress: Vec<_> = (0..subs.recorders())
            .map(|_| Arc::new(AtomicU64::new(0)))
            .collect();
        let mut tasks = Vec::new();
        for k in 0..subs.count {
            let client = nats_connect(&self.core.url()).await?;
            let mut sub = if subs.group {
                client
                    .queue_subscribe(subject.to_string(), "bench-group".to_string())
                    .await?
            } else {
                client.subscribe(subject.to_string()).await?
            };
            client.flush().await?;
            let r = if subs.group { 0 } else { k };
            let (rec, progress, stop) = (recs[r].clone(), progress[r].clone(), stop.clone());
            tasks.push(tokio::spawn(async move {
                // Keeps the connection open as long as the subscription.
                let _client = client;
                while !stop.load(Ordering::Relaxed) {
                    match tokio::time::timeout(Duration::from_millis(200), sub.next()).await {
                        Ok(Some(m)) => {
                            let now = Instant::now();
                            let (t, seq) = parse_head(&m.payload);
                            let mut rec = rec.lock().unwrap_or_else(|p| p.into_inner());
                            rec.record_parts(t, seq, now);
                            progress.store(rec.unique, Ordering::Relaxed);
                        }
                        Ok(None) => break,
                        Err(_) => {}
                    }
                }
            }));
        }
        // A flush only empties the client's buffer: probe until every
        // subscriber receives, so the server surely has every subscription.
        let template = mesh::BatchTemplate::sized(1, 128);
        let started = Instant::now();
        loop {
            let probe = sized_payload(
                &template,
                PROBE_SEQ,
                nanos_since(self.epoch, Instant::now()),
            );
            self.publisher.publish(subject.to_string(), probe).await?;
            self.publisher.flush().await?;
            tokio::time::sleep(Duration::from_millis(5)).await;
            let all = recs.iter().all(|r| {
                let r = r.lock().unwrap_or_else(|p| p.into_inner());
                r.unreadable > 0
            });
            if all {
                break;
            }
            if started.elapsed() > Duration::from_secs(10) {
                return Err("the NATS subscribers got no probe within 10 s".into());
            }
        }
        for r in &recs {
            *r.lock().unwrap_or_else(|p| p.into_inner()) = Recorder::new(self.epoch, expected)?;
        }
        Ok((recs, progress, tasks))
    }

    /// Open-loop publishes at `rate` → one subscriber connection.
    async fn latency(&self, plan: &ComparePlan, size: usize, rate: u64) -> Result<Round, BoxError> {
        let count = (rate as f64 * plan.latency_time.as_secs_f64()) as u64;
        let subject = format!("bench.lat.{}", self.next_run());
        let stop = Arc::new(AtomicBool::new(false));
        let subs = Subs {
            count: 1,
            group: false,
        };
        let (recs, _progress, tasks) = self.subscribe(&subject, subs, count, &stop).await?;
        let template = mesh::BatchTemplate::sized(1, size);
        let pids = [self.core.pid()];
        let c0 = cpu_ticks(&pids)?;
        println!("[nats-latency] {count} msgs at {rate} msg/s (open loop)");
        let (start, mut rx) = workloads::spawn_pacer(rate, count)?;
        let (mut published, mut failed, mut first_error) = (0u64, 0u64, None);
        while let Some((i, at)) = rx.recv().await {
            let body = sized_payload(&template, i, nanos_since(self.epoch, at));
            match self.publisher.publish(subject.clone(), body).await {
                Ok(()) => published += 1,
                Err(e) => {
                    failed += 1;
                    first_error.get_or_insert_with(|| e.to_string());
                }
            }
        }
        let sent = Sent {
            published,
            failed,
            first_error,
            started: start,
        };
        self.finish(plan, sent, &recs, subs, &stop, tasks, &c0)
            .await
    }

    /// Sequential `request`s, answered by the responder connection.
    async fn request_reply(&self, plan: &ComparePlan, size: usize) -> Result<Round, BoxError> {
        let t = mesh::BatchTemplate::sized(1, size);
        let body = sized_payload(&t, 0, 0);
        for _ in 0..50 {
            self.publisher
                .request("bench.rr", body.clone())
                .await
                .map_err(|e| format!("warm-up request: {e}"))?;
        }
        let pids = [self.core.pid()];
        let c0 = cpu_ticks(&pids)?;
        let mut latency = workloads::new_histogram()?;
        let (mut ok, mut failed, mut first_error) = (0u64, 0u64, None);
        let t0 = Instant::now();
        while ok + failed < plan.rr_max && t0.elapsed() < plan.rr_time {
            let at = Instant::now();
            match self.publisher.request("bench.rr", body.clone()).await {
                Ok(m) if m.payload.as_ref() == workloads::REPLY_BODY => {
                    workloads::record(&mut latency, at.elapsed());
                    ok += 1;
                }
                Ok(m) => {
                    failed += 1;
                    first_error.get_or_insert_with(|| {
                        format!("unexpected reply {:?}", String::from_utf8_lossy(&m.payload))
                    });
                }
                Err(e) => {
                    failed += 1;
                    first_error.get_or_insert_with(|| e.to_string());
                }
            }
        }
        let elapsed = t0.elapsed();
        let c1 = cpu_ticks(&pids)?;
        println!(
            "==> nats request/reply: {ok} ok, {failed} failed, p50 {} µs, p99 {} µs",
            latency.value_at_quantile(0.5),
            latency.value_at_quantile(0.99)
        );
        Ok(Round {
            dropped: 0,
            sent: ok + failed,
            expected: ok + failed,
            received: ok,
            duplicates: 0,
            unreadable: 0,
            missing_sample: Vec::new(),
            failed,
            first_error,
            elapsed,
            latency,
            cpu_s: cpu_between(&c0, &c1, self.clk_tck),
            end_rss_kib: rss_kib(&pids)?,
        })
    }

    /// JetStream publishes to the R1 file stream, waiting for each ack or
    /// keeping `inflight` acks outstanding.
    async fn durable(
        &self,
        plan: &ComparePlan,
        size: usize,
        inflight: bool,
    ) -> Result<Round, BoxError> {
        let window = if inflight { plan.inflight.max(1) } else { 1 };
        let max = plan.cap(plan.durable_max, size);
        let subject = format!("bench.js.{}", self.next_run());
        let body = Bytes::from(vec![b'x'; size]);
        let pids = [self.js.pid()];
        println!(
            "[jetstream] {window} acks in flight, at most {max} msgs or {:?}",
            plan.durable_time
        );
        let c0 = cpu_ticks(&pids)?;
        let t0 = Instant::now();
        let end = t0 + plan.durable_time;
        let (mut sent, mut acked, mut failed, mut first_error) = (0u64, 0u64, 0u64, None);
        let mut pending = FuturesUnordered::new();
        loop {
            while pending.len() < window && sent < max && Instant::now() < end {
                match self.jetstream.publish(subject.clone(), body.clone()).await {
                    Ok(ack) => pending.push(std::future::IntoFuture::into_future(ack)),
                    Err(e) => {
                        failed += 1;
                        first_error.get_or_insert_with(|| e.to_string());
                    }
                }
                sent += 1;
            }
            match pending.next().await {
                Some(Ok(_)) => acked += 1,
                Some(Err(e)) => {
                    failed += 1;
                    first_error.get_or_insert_with(|| e.to_string());
                }
                None => break,
            }
        }
        let elapsed = t0.elapsed();
        let c1 = cpu_ticks(&pids)?;
        Ok(Round {
            dropped: 0,
            sent,
            expected: sent,
            received: acked,
            duplicates: 0,
            unreadable: 0,
            missing_sample: Vec::new(),
            failed,
            first_error,
            elapsed,
            latency: workloads::new_histogram()?,
            cpu_s: cpu_between(&c0, &c1, self.clk_tck),
            end_rss_kib: rss_kib(&pids)?,
        })
    }
}

// ----- the whole comparison -----

async fn run_one(
    sys: Sys,
    w: Workload,
    size: usize,
    plan: &ComparePlan,
    shoal: &ShoalSide,
    nats: &NatsSide,
) -> Result<Round, BoxError> {
    match (sys, w) {
        (Sys::Shoal, Workload::Latency(rate)) => shoal.latency(plan, size, rate).await,
        (Sys::Nats, Workload::Latency(rate)) => nats.latency(plan, size, rate).await,
        (Sys::Shoal, Workload::RequestReply) => shoal.request_reply(plan, size).await,
        (Sys::Nats, Workload::RequestReply) => nats.request_reply(plan, size).await,
        (Sys::Shoal, Workload::PubSub(b)) => {
            shoal.pubsub(plan, size, b, Subs::for_workload(w)).await
        }
        (Sys::Nats, Workload::PubSub(b)) => nats.pubsub(plan, size, b, Subs::for_workload(w)).await,
        (Sys::Shoal, Workload::FanOut(_) | Workload::Group(_)) => {
            shoal.pubsub(plan, size, true, Subs::for_workload(w)).await
        }
        (Sys::Nats, Workload::FanOut(_) | Workload::Group(_)) => {
            nats.pubsub(plan, size, true, Subs::for_workload(w)).await
        }
        (Sys::Shoal, Workload::Durable(f)) => shoal.durable(plan, size, f).await,
        (Sys::Nats, Workload::Durable(f)) => nats.durable(plan, size, f).await,
    }
}

/// The keys `--workloads` takes, in the order the workloads run.
pub fn workload_keys(plan: &ComparePlan) -> Vec<String> {
    all_workloads(plan).iter().map(Workload::key).collect()
}

/// The workloads in the order they run: light to heavy.
pub fn all_workloads(plan: &ComparePlan) -> Vec<Workload> {
    let mut w: Vec<Workload> = plan.rates.iter().map(|r| Workload::Latency(*r)).collect();
    w.extend([
        Workload::RequestReply,
        Workload::PubSub(false),
        Workload::PubSub(true),
        Workload::FanOut(plan.fanout),
        Workload::Group(plan.group),
        Workload::Durable(false),
        Workload::Durable(true),
    ]);
    w
}

fn summary_line(sys: Sys, w: Workload, size: usize, r: &Round) -> String {
    let lat = if r.latency.is_empty() {
        String::new()
    } else {
        format!(
            ", p50 {} µs, p99 {} µs, max {} µs",
            r.latency.value_at_quantile(0.5),
            r.latency.value_at_quantile(0.99),
            r.latency.max()
        )
    };
    format!(
        "==> {:?} {} {} B: {:.0}/s, {} of {} received, {} dropped (counted), {} missing, {} failed, {} redelivered{lat}, CPU {:.2} s/M",
        sys,
        w.key(),
        size,
        r.rate(),
        r.received,
        r.expected,
        r.dropped,
        r.missing(),
        r.failed,
        r.duplicates,
        r.cpu_per_million()
    )
}

/// Starts everything, runs every workload at every size (A/B/A/B), stops
/// everything (also when dropped: Ctrl-C or an error), and returns the
/// results. `on_pid` hears of every process started.
pub async fn run(
    agent_bin: &Path,
    nats_bin: &Path,
    plan: &ComparePlan,
    clk_tck: f64,
) -> Result<CompareResults, BoxError> {
    let mut pids = Vec::new();
    let mut core = NatsServer::start(nats_bin, false)?;
    pids.push((core.name.clone(), core.pid()));
    println!("compare: started pid {} ({})", core.pid(), core.name);
    let mut js = NatsServer::start(nats_bin, true)?;
    pids.push((js.name.clone(), js.pid()));
    println!("compare: started pid {} ({})", js.pid(), js.name);
    core.wait_ready(Duration::from_secs(10)).await?;
    js.wait_ready(Duration::from_secs(10)).await?;

    let push_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let push_port = push_listener.local_addr()?.port();
    let sink: PushSink = Arc::new(Mutex::new(None));
    let server = tokio::spawn(workloads::serve_push(push_listener, sink));
    let result = async {
        let mesh = Mesh::start(agent_bin, push_port).await?;
        for (a, node) in mesh.agents.iter().zip(NODES) {
            pids.push((node.to_string(), a.pid()));
            println!("compare: started pid {} ({node})", a.pid());
        }
        let epoch = Instant::now();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (core_stats, js_stats) = (core.stats()?, js.stats()?);
        let mut anon_kib = mesh
            .pids()
            .iter()
            .map(|p| Ok(ProcStats::read(*p)?.anon_kib))
            .collect::<Result<Vec<u64>, BoxError>>()?;
        anon_kib.extend([core_stats.anon_kib, js_stats.anon_kib]);
        let idle = Idle {
            agents_kib: rss_kib(&mesh.pids())?,
            nats_kib: core_stats.rss_kib,
            nats_js_kib: js_stats.rss_kib,
            anon_kib,
        };
        println!(
            "==> idle RSS: agents {:?} KiB, nats-server {} KiB, with JetStream {} KiB",
            idle.agents_kib, idle.nats_kib, idle.nats_js_kib
        );
        let topics = mesh::choose_topics(&mesh).await?;
        mesh::put(
            &mesh.clients[SUBSCRIBER],
            "/v1/subscriptions/compare-rr",
            serde_json::json!({"topic": topics.rr, "pushPath": "/reply"}),
        )
        .await?;
        let mut shoal = ShoalSide {
            mesh,
            topics,
            epoch,
            clk_tck,
            run: AtomicU64::new(0),
        };
        let mut nats = NatsSide::new(core, js, epoch, clk_tck).await?;
        let mut rows = Vec::new();
        let mut nats_warnings = 0;
        for w in all_workloads(plan)
            .into_iter()
            .filter(|w| plan.only.is_empty() || plan.only.iter().any(|k| *k == w.key()))
        {
            for &size in &plan.sizes {
                if plan.settle {
                    crate::settle().await;
                }
                let mut row = Row {
                    workload: w,
                    size,
                    shoal: Vec::new(),
                    nats: Vec::new(),
                };
                for round in 0..plan.rounds {
                    for sys in [Sys::Shoal, Sys::Nats] {
                        println!("--- {} {size} B, {sys:?} round {}", w.key(), round + 1);
                        let r = run_one(sys, w, size, plan, &shoal, &nats).await;
                        let o = r.map_err(|e| {
                            eprintln!("[{} {size} B {sys:?}] FAILED: {e}", w.key());
                            e.to_string()
                        });
                        if let Ok(r) = &o {
                            println!("{}", summary_line(sys, w, size, r));
                            if r.missing() > 0 || r.unreadable > 0 {
                                println!(
                                    "    {} unreadable; never arrived, first of each subscriber: {:?}",
                                    r.unreadable, r.missing_sample
                                );
                            }
                        }
                        for l in nats.core.log_warnings().into_iter().skip(nats_warnings) {
                            println!("[nats-server] {l}");
                            nats_warnings += 1;
                        }
                        match sys {
                            Sys::Shoal => row.shoal.push(o),
                            Sys::Nats => row.nats.push(o),
                        }
                    }
                    shoal.mesh.check_alive()?;
                    nats.core.check_alive()?;
                    nats.js.check_alive()?;
                }
                rows.push(row);
            }
        }
        let topics = shoal.topics.clone();
        drop(nats);
        drop(shoal);
        Ok(CompareResults {
            idle,
            rows,
            pids: pids.clone(),
            topics,
        })
    }
    .await;
    server.abort();
    result
}
