//! The measured workloads: closed-loop publish throughput, open-loop publish
//! latency, and publish-to-delivery latency through pull and push.
//!
//! Every loop is bounded by a message count and by time.

use crate::agent::ProcStats;
use crate::conn::{Conn, Pool};
use crate::BoxError;
use bytes::Bytes;
use hdrhistogram::Histogram;
use http::{Method, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::task::JoinSet;

/// Payload size of every published message, in bytes.
pub const PAYLOAD_BYTES: usize = 256;

/// Most requests an open-loop run keeps in flight (and connections it opens).
pub const MAX_OPEN_LOOP_CONNECTIONS: usize = 2_000;

/// Largest latency a histogram holds, in microseconds (larger values saturate).
const HIST_MAX_US: u64 = 60_000_000;

/// A latency histogram in microseconds with three significant digits.
pub fn new_histogram() -> Result<Histogram<u64>, BoxError> {
    Ok(Histogram::new_with_bounds(1, HIST_MAX_US, 3)?)
}

/// Records a duration in microseconds (at least 1, saturating at the top).
pub fn record(h: &mut Histogram<u64>, d: Duration) {
    let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1);
    h.saturating_record(us);
}

/// What the workloads share: where the agent is and how to watch it.
#[derive(Clone)]
pub struct Ctx {
    /// App API address.
    pub app: SocketAddr,
    /// Admin address (`/metrics`).
    pub admin: SocketAddr,
    /// Agent process id.
    pub pid: u32,
    /// Time zero for send times embedded in payloads.
    pub epoch: Instant,
    /// Clock ticks per second of `/proc` CPU times.
    pub clk_tck: f64,
    /// Largest agent RSS seen by the sampler since the last reset, in KiB.
    pub max_rss_kib: Arc<AtomicU64>,
}

/// Fsync figures of the agent's `/metrics` at one moment.
#[derive(Clone, Copy, Debug, Default)]
pub struct FsyncStats {
    /// `shoal_storage_fsyncs_total`.
    pub count: f64,
    /// `shoal_storage_fsync_duration_seconds_sum`.
    pub seconds: f64,
}

impl Ctx {
    /// Reads the fsync counters from the agent's `/metrics` (zeros if absent).
    pub async fn fsync_stats(&self) -> Result<FsyncStats, BoxError> {
        let mut conn = Conn::open(self.admin).await?;
        let (status, body) = conn
            .call(Method::GET, "/metrics", None, Bytes::new())
            .await?;
        if !status.is_success() {
            return Err(format!("/metrics answered {status}").into());
        }
        let text = String::from_utf8_lossy(&body);
        let value = |name: &str| {
            text.lines()
                .find_map(|l| {
                    l.strip_prefix(name)?
                        .strip_prefix(' ')?
                        .trim()
                        .parse::<f64>()
                        .ok()
                })
                .unwrap_or(0.0)
        };
        Ok(FsyncStats {
            count: value("shoal_storage_fsyncs_total"),
            seconds: value("shoal_storage_fsync_duration_seconds_sum"),
        })
    }

    fn agent_stats(&self) -> Result<ProcStats, BoxError> {
        ProcStats::read(self.pid)
            .map_err(|e| format!("cannot read the agent's /proc ({e}); did it exit?").into())
    }
}

/// Samples the agent's RSS every 100 ms into `ctx.max_rss_kib` until the process is gone.
pub fn spawn_rss_sampler(ctx: &Ctx) {
    let ctx = ctx.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tick.tick().await;
            match ProcStats::read(ctx.pid) {
                Ok(s) => {
                    ctx.max_rss_kib.fetch_max(s.rss_kib, Ordering::Relaxed);
                }
                Err(_) => break,
            }
        }
    });
}

/// The 256-byte payload of a single publish.
pub fn binary_payload() -> Bytes {
    Bytes::from(vec![b'x'; PAYLOAD_BYTES])
}

/// An ndjson batch of `n` messages of 256 bytes each (a JSON string per line).
pub fn ndjson_batch(n: usize) -> Bytes {
    let mut line = Vec::with_capacity(PAYLOAD_BYTES + 1);
    line.push(b'"');
    line.resize(PAYLOAD_BYTES - 1, b'x');
    line.push(b'"');
    line.push(b'\n');
    Bytes::from(line.repeat(n))
}

/// A 256-byte JSON payload carrying its scheduled send time (`t`, nanoseconds
/// since `epoch`) and sequence number.
pub fn timed_payload(epoch: Instant, seq: u64, at: Instant) -> Bytes {
    let t = at.saturating_duration_since(epoch).as_nanos();
    let mut s = format!("{{\"t\":{t},\"seq\":{seq},\"pad\":\"");
    while s.len() < PAYLOAD_BYTES - 2 {
        s.push('x');
    }
    s.push_str("\"}");
    Bytes::from(s)
}

/// Result of a closed-loop throughput run.
#[derive(Clone, Debug)]
pub struct Throughput {
    /// Messages acknowledged (2xx) in the measured window.
    pub messages: u64,
    /// Requests answered with an error status in the measured window.
    pub rejected: u64,
    /// First error answer seen, if any.
    pub first_error: Option<String>,
    /// Measured window.
    pub elapsed: Duration,
    /// Agent CPU seconds in the window.
    pub agent_cpu_s: f64,
    /// Bench CPU seconds in the window.
    pub bench_cpu_s: f64,
    /// Largest agent RSS seen in the window, KiB.
    pub max_rss_kib: u64,
    /// Client connections.
    pub connections: usize,
    /// Fsyncs the agent made in the window.
    pub fsyncs: f64,
    /// Seconds the agent spent in those fsyncs.
    pub fsync_seconds: f64,
}

impl Throughput {
    /// Messages per second.
    pub fn rate(&self) -> f64 {
        self.messages as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Agent CPU seconds per million messages.
    pub fn agent_cpu_per_million(&self) -> f64 {
        self.agent_cpu_s / (self.messages.max(1) as f64) * 1e6
    }
}

/// Shape of a closed-loop run.
pub struct ClosedLoop {
    /// Label in progress lines.
    pub name: &'static str,
    /// Request path.
    pub path: String,
    /// Request content type.
    pub content_type: &'static str,
    /// Request body (the same every time).
    pub body: Bytes,
    /// Messages per request.
    pub per_request: u64,
    /// Concurrent connections, one task each.
    pub connections: usize,
    /// Unmeasured warm-up.
    pub warmup: Duration,
    /// Longest measured window.
    pub duration: Duration,
    /// Most messages in the measured window.
    pub max_messages: u64,
}

#[derive(Default)]
struct Counters {
    stop: AtomicBool,
    messages: AtomicU64,
    rejected: AtomicU64,
    first_error: Mutex<Option<String>>,
}

impl Counters {
    fn note_error(&self, e: String) {
        let mut first = self.first_error.lock().unwrap_or_else(|p| p.into_inner());
        if first.is_none() {
            *first = Some(e);
        }
    }
}

/// Publishes as fast as `connections` keep-alive connections allow, each
/// waiting for its answer before sending again.
pub async fn closed_loop(ctx: &Ctx, spec: ClosedLoop) -> Result<Throughput, BoxError> {
    // One probe first, so a wrong request fails loudly instead of being counted.
    let mut probe = Conn::open(ctx.app).await?;
    let (status, body) = probe
        .post(&spec.path, spec.content_type, spec.body.clone())
        .await?;
    if !status.is_success() {
        return Err(format!(
            "{}: probe publish answered {status}: {}",
            spec.name,
            String::from_utf8_lossy(&body)
        )
        .into());
    }
    drop(probe);

    let counters = Arc::new(Counters::default());
    let mut workers = JoinSet::new();
    for _ in 0..spec.connections {
        let mut conn = Conn::open(ctx.app).await?;
        let counters = counters.clone();
        let path = spec.path.clone();
        let body = spec.body.clone();
        let (ct, per) = (spec.content_type, spec.per_request);
        workers.spawn(async move {
            while !counters.stop.load(Ordering::Relaxed) {
                match conn.post(&path, ct, body.clone()).await {
                    Ok((s, _)) if s.is_success() => {
                        counters.messages.fetch_add(per, Ordering::Relaxed);
                    }
                    Ok((s, b)) => {
                        counters.rejected.fetch_add(1, Ordering::Relaxed);
                        counters.note_error(format!("{s}: {}", String::from_utf8_lossy(&b)));
                        if s == StatusCode::SERVICE_UNAVAILABLE
                            || s == StatusCode::TOO_MANY_REQUESTS
                        {
                            tokio::time::sleep(Duration::from_millis(1)).await;
                        }
                    }
                    Err(e) => {
                        counters.note_error(e.to_string());
                        break;
                    }
                }
            }
        });
    }

    println!(
        "[{}] {} connections, {} msg/request, warming up {:?}",
        spec.name, spec.connections, spec.per_request, spec.warmup
    );
    tokio::time::sleep(spec.warmup).await;

    let f0 = ctx.fsync_stats().await?;
    let a0 = ctx.agent_stats()?;
    let b0 = ProcStats::own_cpu_ticks()?;
    let m0 = counters.messages.load(Ordering::Relaxed);
    let r0 = counters.rejected.load(Ordering::Relaxed);
    ctx.max_rss_kib.store(a0.rss_kib, Ordering::Relaxed);
    let t0 = Instant::now();
    let mut tick = tokio::time::interval_at(
        tokio::time::Instant::now() + Duration::from_millis(100),
        Duration::from_millis(100),
    );
    let mut last_print = t0;
    let mut last_count = m0;
    loop {
        tick.tick().await;
        let n = counters.messages.load(Ordering::Relaxed);
        let now = Instant::now();
        if now.duration_since(last_print) >= Duration::from_secs(1) {
            let rate = (n - last_count) as f64 / now.duration_since(last_print).as_secs_f64();
            println!(
                "[{}] {:>5.1} s  {:>10} msgs  {:>10.0} msg/s  agent RSS max {:.1} MiB",
                spec.name,
                now.duration_since(t0).as_secs_f64(),
                n - m0,
                rate,
                ctx.max_rss_kib.load(Ordering::Relaxed) as f64 / 1024.0
            );
            last_print = now;
            last_count = n;
        }
        if now.duration_since(t0) >= spec.duration
            || n - m0 >= spec.max_messages
            || workers.is_empty()
        {
            break;
        }
        if let Some(Ok(())) = workers.try_join_next() {
            // A worker stopped on a connection error: the run is not valid.
            let e = counters
                .first_error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            counters.stop.store(true, Ordering::Relaxed);
            return Err(format!(
                "{}: a connection failed: {}",
                spec.name,
                e.unwrap_or_default()
            )
            .into());
        }
    }
    let elapsed = t0.elapsed();
    let m1 = counters.messages.load(Ordering::Relaxed);
    let r1 = counters.rejected.load(Ordering::Relaxed);
    let a1 = ctx.agent_stats()?;
    let b1 = ProcStats::own_cpu_ticks()?;
    let f1 = ctx.fsync_stats().await?;
    counters.stop.store(true, Ordering::Relaxed);
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while workers.join_next().await.is_some() {}
    })
    .await;
    workers.abort_all();
    let first_error = counters
        .first_error
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    Ok(Throughput {
        messages: m1 - m0,
        rejected: r1 - r0,
        first_error,
        elapsed,
        agent_cpu_s: a1.cpu_ticks.saturating_sub(a0.cpu_ticks) as f64 / ctx.clk_tck,
        bench_cpu_s: b1.saturating_sub(b0) as f64 / ctx.clk_tck,
        max_rss_kib: ctx.max_rss_kib.load(Ordering::Relaxed).max(a1.rss_kib),
        connections: spec.connections,
        fsyncs: f1.count - f0.count,
        fsync_seconds: f1.seconds - f0.seconds,
    })
}

/// Result of an open-loop run.
pub struct OpenLoop {
    /// Publishes scheduled.
    pub scheduled: u64,
    /// Publishes answered 2xx.
    pub ok: u64,
    /// Publishes that failed or got an error status.
    pub failed: u64,
    /// First failure, if any.
    pub first_error: Option<String>,
    /// Scheduled send time to answer, µs (coordinated omission corrected).
    pub latency: Histogram<u64>,
    /// Scheduled send time to the moment the bench actually sent, µs (the
    /// bench's own share of `latency`).
    pub lateness: Histogram<u64>,
    /// Connections the run needed (at most this many requests were in flight).
    pub connections: usize,
    /// Agent CPU seconds during the run.
    pub agent_cpu_s: f64,
    /// Bench CPU seconds during the run.
    pub bench_cpu_s: f64,
    /// Length of the run.
    pub elapsed: Duration,
}

/// Shape of an open-loop run.
pub struct OpenLoopSpec {
    /// Label in progress lines.
    pub name: &'static str,
    /// Request path.
    pub path: String,
    /// Request content type.
    pub content_type: &'static str,
    /// Offered rate, messages per second.
    pub rate: u64,
    /// Longest run.
    pub duration: Duration,
    /// Most messages.
    pub max_messages: u64,
}

/// Starts a thread that hands out send `i` (with its due time) at
/// `start + i / rate`, for `i` in `0..count`, and stops early when the
/// receiver is dropped. Returns `start` and the receiver.
///
/// The thread paces with `std::thread::sleep` (tokio's timer has a 1 ms
/// granularity, as coarse as the latencies measured).
pub fn spawn_pacer(
    rate: u64,
    count: u64,
) -> Result<
    (
        Instant,
        tokio::sync::mpsc::UnboundedReceiver<(u64, Instant)>,
    ),
    BoxError,
> {
    let period = Duration::from_nanos(1_000_000_000 / rate.max(1));
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<(u64, Instant)>();
    let start = Instant::now() + Duration::from_millis(20);
    std::thread::Builder::new()
        .name("shoal-bench-pacer".into())
        .spawn(move || {
            for i in 0..count {
                let at = start + period * u32::try_from(i).unwrap_or(u32::MAX);
                let now = Instant::now();
                if at > now {
                    std::thread::sleep(at - now);
                }
                if tx.send((i, at)).is_err() {
                    break;
                }
            }
        })?;
    Ok((start, rx))
}

/// Publishes at a fixed rate whatever the answers do: send `i` is due at
/// `start + i / rate`, and its latency counts from that time, so a slow
/// answer cannot hide the sends it delays (no coordinated omission).
///
/// A thread paces the schedule with `std::thread::sleep` (tokio's timer has
/// a 1 ms granularity, as coarse as the target itself).
pub async fn open_loop(
    ctx: &Ctx,
    spec: OpenLoopSpec,
    payload: impl Fn(u64, Instant) -> Bytes,
) -> Result<OpenLoop, BoxError> {
    let rate = spec.rate.max(1);
    let count = spec
        .max_messages
        .min((spec.duration.as_secs_f64() * rate as f64) as u64)
        .max(1);
    let period = Duration::from_nanos(1_000_000_000 / rate);
    let pool = Pool::new(ctx.app, 8).await?;
    // At most this many requests in flight (one connection each): an agent
    // that answers in seconds must not exhaust the bench's file descriptors.
    // A send that waits here is late, and its latency still counts from the
    // scheduled time.
    let in_flight = Arc::new(tokio::sync::Semaphore::new(MAX_OPEN_LOOP_CONNECTIONS));
    let latency = Arc::new(Mutex::new(new_histogram()?));
    let lateness = Arc::new(Mutex::new(new_histogram()?));
    let counters = Arc::new(Counters::default());
    let path: Arc<str> = Arc::from(spec.path.as_str());

    let (start, mut rx) = spawn_pacer(rate, count)?;

    println!(
        "[{}] {} msgs at {} msg/s (open loop, {:?})",
        spec.name,
        count,
        rate,
        period * u32::try_from(count).unwrap_or(u32::MAX)
    );
    let a0 = ctx.agent_stats()?;
    let b0 = ProcStats::own_cpu_ticks()?;
    let mut tasks = JoinSet::new();
    let mut last_print = Instant::now();
    while let Some((i, at)) = rx.recv().await {
        let body = payload(i, at);
        let (pool, lat_h, late_h, counters, path) = (
            pool.clone(),
            latency.clone(),
            lateness.clone(),
            counters.clone(),
            path.clone(),
        );
        let ct = spec.content_type;
        let in_flight = in_flight.clone();
        tasks.spawn(async move {
            let Ok(_permit) = in_flight.acquire_owned().await else {
                return;
            };
            record(
                &mut late_h.lock().unwrap_or_else(|p| p.into_inner()),
                at.elapsed(),
            );
            let mut conn = match pool.take().await {
                Ok(c) => c,
                Err(e) => {
                    counters.rejected.fetch_add(1, Ordering::Relaxed);
                    counters.note_error(e.to_string());
                    return;
                }
            };
            match conn.post(&path, ct, body).await {
                Ok((s, _)) if s.is_success() => {
                    record(
                        &mut lat_h.lock().unwrap_or_else(|p| p.into_inner()),
                        at.elapsed(),
                    );
                    counters.messages.fetch_add(1, Ordering::Relaxed);
                    pool.give(conn);
                }
                Ok((s, b)) => {
                    counters.rejected.fetch_add(1, Ordering::Relaxed);
                    counters.note_error(format!("{s}: {}", String::from_utf8_lossy(&b)));
                    pool.give(conn);
                }
                Err(e) => {
                    counters.rejected.fetch_add(1, Ordering::Relaxed);
                    counters.note_error(e.to_string());
                }
            }
        });
        while tasks.try_join_next().is_some() {}
        if last_print.elapsed() >= Duration::from_secs(1) {
            let h = latency.lock().unwrap_or_else(|p| p.into_inner());
            println!(
                "[{}] {:>6} sent  p50 {} µs  p99 {} µs  max {} µs",
                spec.name,
                i + 1,
                h.value_at_quantile(0.5),
                h.value_at_quantile(0.99),
                h.max()
            );
            last_print = Instant::now();
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    tasks.abort_all();
    let elapsed = start.elapsed();
    let a1 = ctx.agent_stats()?;
    let b1 = ProcStats::own_cpu_ticks()?;
    let latency = latency.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let lateness = lateness.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let first_error = counters
        .first_error
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    Ok(OpenLoop {
        scheduled: count,
        ok: counters.messages.load(Ordering::Relaxed),
        failed: counters.rejected.load(Ordering::Relaxed),
        first_error,
        latency,
        lateness,
        connections: pool.idle_count(),
        agent_cpu_s: a1.cpu_ticks.saturating_sub(a0.cpu_ticks) as f64 / ctx.clk_tck,
        bench_cpu_s: b1.saturating_sub(b0) as f64 / ctx.clk_tck,
        elapsed,
    })
}

/// Delivery latencies of timed payloads (see [`timed_payload`]).
pub struct Recorder {
    epoch: Instant,
    /// Scheduled send time to receipt, µs.
    pub latency: Histogram<u64>,
    seen: Vec<bool>,
    /// Distinct messages received.
    pub unique: u64,
    /// Messages received again (at-least-once redelivery).
    pub duplicates: u64,
    /// Deliveries the bench could not read.
    pub unreadable: u64,
    /// When the first distinct message arrived.
    pub first_at: Option<Instant>,
    /// When the last distinct message arrived.
    pub last_at: Option<Instant>,
}

impl Recorder {
    /// A recorder expecting `expected` messages numbered from 0.
    pub fn new(epoch: Instant, expected: u64) -> Result<Recorder, BoxError> {
        Ok(Recorder {
            epoch,
            latency: new_histogram()?,
            seen: vec![false; usize::try_from(expected)?],
            unique: 0,
            duplicates: 0,
            unreadable: 0,
            first_at: None,
            last_at: None,
        })
    }

    /// Up to `n` sequence numbers below `below` that never arrived.
    pub fn missing_sample(&self, below: u64, n: usize) -> Vec<u64> {
        let below = usize::try_from(below).unwrap_or(usize::MAX);
        self.seen
            .iter()
            .take(below)
            .enumerate()
            .filter(|(_, s)| !**s)
            .take(n)
            .map(|(i, _)| i as u64)
            .collect()
    }

    /// Records a delivered payload (`{"t":..,"seq":..}`) received at `now`.
    pub fn record(&mut self, data: Option<&Value>, now: Instant) {
        let t = data.and_then(|d| d.get("t")?.as_u64());
        let seq = data.and_then(|d| d.get("seq")?.as_u64());
        self.record_parts(t, seq, now);
    }

    /// Records a delivered message by its send time `t` (nanoseconds since
    /// the epoch) and sequence number, received at `now`.
    pub fn record_parts(&mut self, t: Option<u64>, seq: Option<u64>, now: Instant) {
        let (Some(t), Some(seq)) = (t, seq) else {
            self.unreadable += 1;
            return;
        };
        let Some(slot) = usize::try_from(seq).ok().and_then(|i| self.seen.get_mut(i)) else {
            self.unreadable += 1;
            return;
        };
        if *slot {
            self.duplicates += 1;
            return;
        }
        *slot = true;
        self.unique += 1;
        self.first_at.get_or_insert(now);
        self.last_at = Some(now);
        let sent = self.epoch + Duration::from_nanos(t);
        record(&mut self.latency, now.saturating_duration_since(sent));
    }
}

/// Where the push receiver records: set while a push run is on.
pub type PushSink = Arc<Mutex<Option<Recorder>>>;

/// Body the bench's app answers to a request (`POST /reply`).
pub const REPLY_BODY: &[u8] = b"{\"ok\":true}";

/// Serves the app's side of push delivery: `POST /push` records the payload
/// and answers 204 (an ack); `POST /reply` answers a request/reply with 200
/// and [`REPLY_BODY`]; any other path gets 404.
pub async fn serve_push(listener: tokio::net::TcpListener, sink: PushSink) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let sink = sink.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let sink = sink.clone();
                async move {
                    let (parts, body) = req.into_parts();
                    let body = body
                        .collect()
                        .await
                        .map(|c| c.to_bytes())
                        .unwrap_or_default();
                    let now = Instant::now();
                    let mut resp = Response::new(Full::new(Bytes::new()));
                    if parts.method == Method::POST && parts.uri.path() == "/push" {
                        let v: Option<Value> = serde_json::from_slice(&body).ok();
                        if let Some(rec) = sink.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
                            rec.record(v.as_ref(), now);
                        }
                        *resp.status_mut() = StatusCode::NO_CONTENT;
                    } else if parts.method == Method::POST && parts.uri.path() == "/reply" {
                        *resp.body_mut() = Full::new(Bytes::from_static(REPLY_BODY));
                        resp.headers_mut().insert(
                            http::header::CONTENT_TYPE,
                            http::HeaderValue::from_static("application/json"),
                        );
                    } else {
                        *resp.status_mut() = StatusCode::NOT_FOUND;
                    }
                    Ok::<_, Infallible>(resp)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Pulls a subscription with long polls until `expected` distinct messages
/// arrived, `stop` is set, or `deadline` passes; acks on a second connection
/// so acking never delays the next poll.
pub async fn pull_consumer(
    app: SocketAddr,
    subscription: String,
    rec: Arc<Mutex<Recorder>>,
    expected: u64,
    stop: Arc<AtomicBool>,
    deadline: Instant,
) -> Result<(), BoxError> {
    let mut conn = Conn::open(app).await?;
    let mut ack_conn = Conn::open(app).await?;
    let (ack_tx, mut ack_rx) = tokio::sync::mpsc::unbounded_channel::<Vec<String>>();
    let ack_path = format!("/v1/subscriptions/{subscription}/acks");
    let acker = tokio::spawn(async move {
        while let Some(mut ids) = ack_rx.recv().await {
            while let Ok(more) = ack_rx.try_recv() {
                ids.extend(more);
            }
            let body = serde_json::json!({ "ack": ids }).to_string();
            match ack_conn
                .post(&ack_path, "application/json", Bytes::from(body))
                .await
            {
                Ok((s, _)) if s.is_success() => {}
                Ok((s, b)) => {
                    eprintln!("[pull] ack answered {s}: {}", String::from_utf8_lossy(&b));
                }
                Err(e) => {
                    eprintln!("[pull] ack failed: {e}");
                    return;
                }
            }
        }
    });
    let path = format!("/v1/subscriptions/{subscription}/messages?max=500&wait=1s");
    let result = async {
        loop {
            let unique = rec.lock().unwrap_or_else(|p| p.into_inner()).unique;
            if unique >= expected || stop.load(Ordering::Relaxed) || Instant::now() > deadline {
                return Ok(());
            }
            let (status, body) = conn.call(Method::GET, &path, None, Bytes::new()).await?;
            let now = Instant::now();
            if !status.is_success() {
                return Err(
                    format!("pull answered {status}: {}", String::from_utf8_lossy(&body)).into(),
                );
            }
            let events: Value = serde_json::from_slice(&body)?;
            let events = events
                .as_array()
                .ok_or("pull did not answer a JSON array")?;
            let mut ids = Vec::with_capacity(events.len());
            {
                let mut rec = rec.lock().unwrap_or_else(|p| p.into_inner());
                for e in events {
                    rec.record(e.get("data"), now);
                    if let Some(id) = e.get("ackid").and_then(Value::as_str) {
                        ids.push(id.to_string());
                    }
                }
            }
            if !ids.is_empty() && ack_tx.send(ids).is_err() {
                return Err::<(), BoxError>("the acker stopped".into());
            }
        }
    }
    .await;
    drop(ack_tx);
    let _ = tokio::time::timeout(Duration::from_secs(5), acker).await;
    result
}
