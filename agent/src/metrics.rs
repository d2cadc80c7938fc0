//! Prometheus metrics, exported on the admin port as text.
//!
//! Per-topic handles are created once per topic ([`TopicMetrics`]) so the hot
//! path increments an atomic instead of looking up a label set.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use std::sync::atomic::AtomicU64;

/// Latency buckets in seconds, from 50 µs to 10 s: sub-millisecond paths need fine low buckets.
pub const LATENCY_BUCKETS: [f64; 17] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
];

/// Label value used for every topic when topic labels are switched off.
pub const ALL_TOPICS: &str = "_all";

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS.into_iter())
}

/// `topic` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TopicLabel {
    /// Topic name, or `_all`.
    pub topic: String,
}

/// How a message reached the app.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum Mode {
    /// POSTed to the app.
    Push,
    /// Returned from a long poll.
    Pull,
    /// Sent as a server-sent event.
    Stream,
}

/// `topic` and `mode` labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeliveryLabels {
    /// Topic.
    pub topic: String,
    /// Delivery mode.
    pub mode: Mode,
}

/// `mode` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModeLabel {
    /// Delivery mode.
    pub mode: Mode,
}

/// `topic` and `reason` labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// Topic.
    pub topic: String,
    /// Why.
    pub reason: &'static str,
}

/// HTTP request labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    /// Route template, such as `/v1/topics/{topic}/messages`.
    pub route: &'static str,
    /// Method.
    pub method: String,
    /// Status code.
    pub status: u16,
}

/// `code` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabel {
    /// Error code.
    pub code: &'static str,
}

/// `op` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabel {
    /// Storage operation.
    pub op: &'static str,
}

/// `reason` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// Why.
    pub reason: &'static str,
}

/// `peer` label: a mesh address.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabel {
    /// Peer mesh address.
    pub peer: String,
}

/// `state` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    /// Member state.
    pub state: &'static str,
}

/// Every metric the agent exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    topic_labels: bool,
    published: Family<TopicLabel, Counter>,
    published_bytes: Family<TopicLabel, Counter>,
    delivered: Family<DeliveryLabels, Counter>,
    delivered_bytes: Family<TopicLabel, Counter>,
    redeliveries: Family<TopicLabel, Counter>,
    expired: Family<TopicLabel, Counter>,
    deduplicated: Family<TopicLabel, Counter>,
    /// Messages sent to a dead-letter topic, by reason.
    pub dead_lettered: Family<ReasonLabels, Counter>,
    /// Messages dropped (ephemeral overflow, max deliveries without a dead-letter topic), by reason.
    pub dropped: Family<ReasonLabels, Counter>,
    /// Publish latency, request received to answer ready.
    pub publish_latency: Histogram,
    /// Publish-to-delivery latency.
    pub delivery_latency: Family<ModeLabel, Histogram, fn() -> Histogram>,
    /// Time the app took to answer a push.
    pub push_duration: Histogram,
    /// Messages handed to the app and not yet acknowledged.
    pub in_flight: Gauge,
    /// Long polls and streams waiting for messages.
    pub pull_waiters: Gauge,
    /// Stored bytes per topic.
    pub storage_bytes: Family<TopicLabel, Gauge>,
    /// Stored segments per topic.
    pub storage_segments: Family<TopicLabel, Gauge>,
    /// Storage failures by operation.
    pub storage_errors: Family<OpLabel, Counter>,
    /// fsync calls.
    pub fsyncs: Counter,
    /// fsync duration.
    pub fsync_duration: Histogram,
    /// Bytes cut from torn or corrupt log tails at start-up.
    pub recovery_truncated_bytes: Counter,
    /// Files moved to quarantine at start-up.
    pub recovery_quarantined_files: Counter,
    /// Segments deleted by retention.
    pub retention_deleted_segments: Counter,
    /// HTTP requests by route, method and status.
    pub http_requests: Family<HttpLabels, Counter>,
    /// Errors answered to apps, by code.
    pub api_errors: Family<CodeLabel, Counter>,
    /// Request/reply exchanges by outcome.
    pub requests: Family<CodeLabel, Counter>,
    /// Mesh members by state (this agent counted as alive).
    pub mesh_members: Family<StateLabel, Gauge>,
    /// Mesh peers refused during the TLS handshake, by reason.
    pub mesh_handshake_failures: Family<ReasonLabel, Counter>,
    /// Mesh datagrams received.
    pub mesh_datagrams_in: Counter,
    /// Mesh datagrams sent.
    pub mesh_datagrams_out: Counter,
    /// Mesh bytes received.
    pub mesh_bytes_in: Counter,
    /// Mesh bytes sent.
    pub mesh_bytes_out: Counter,
    /// Gossip datagrams that could not be decoded.
    pub mesh_bad_datagrams: Counter,
    /// Mesh stream frames refused, by reason; each ends its stream.
    pub mesh_bad_frames: Family<ReasonLabel, Counter>,
    /// QUIC round-trip time per peer.
    pub mesh_rtt: Family<PeerLabel, Gauge<f64, std::sync::atomic::AtomicU64>>,
    /// QUIC packets lost per peer over the connection's life.
    pub mesh_lost_packets: Family<PeerLabel, Gauge>,
    /// Mesh stream frames received.
    pub mesh_frames_in: Counter,
    /// Mesh stream frames sent.
    pub mesh_frames_out: Counter,
    /// Mesh stream writes (each combining one or more frames).
    pub mesh_writes: Counter,
    /// Publishes forwarded to a partition's home agent, by outcome.
    pub forwarded: Family<CodeLabel, Counter>,
    /// Round trip of a forwarded publish (send to answer).
    pub forward_latency: Histogram,
    /// Partitions this agent is home to.
    pub partitions_homed: Gauge,
    /// Partition hand-offs by direction (`sent`, `received`) and outcome.
    pub handoffs: Family<HandoffLabels, Counter>,
    /// Remote fetches for consumer groups served by this agent (as a partition's home).
    pub fetches_served: Counter,
    /// Well-framed mesh messages refused for their content, by reason.
    pub mesh_invalid_messages: Family<ReasonLabel, Counter>,
    /// Messages each live consumer group has not acknowledged, per partition
    /// this agent serves (refreshed at each scrape).
    pub consumer_lag: Family<LagLabels, Gauge>,
    /// Partitions whose home is down or missing in this agent's view.
    pub partitions_unavailable: Gauge,
}

/// Labels of the consumer-lag gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LagLabels {
    /// Topic (or `_all` with topic labels off).
    pub topic: String,
    /// Consumer group.
    pub group: String,
    /// Partition number (or `_all` with topic labels off).
    pub partition: String,
}

/// Labels of a hand-off counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandoffLabels {
    /// `sent` or `received`.
    pub direction: &'static str,
    /// `ok` or `failed`.
    pub outcome: &'static str,
}

/// Metric handles of one topic.
#[derive(Clone, Debug)]
pub struct TopicMetrics {
    /// Label value.
    pub label: String,
    /// Messages stored or fanned out.
    pub published: Counter,
    /// Payload bytes published.
    pub published_bytes: Counter,
    /// Delivered by push.
    pub delivered_push: Counter,
    /// Delivered by pull.
    pub delivered_pull: Counter,
    /// Delivered by stream.
    pub delivered_stream: Counter,
    /// Payload bytes delivered.
    pub delivered_bytes: Counter,
    /// Deliveries after the first.
    pub redeliveries: Counter,
    /// Messages whose TTL passed before delivery.
    pub expired: Counter,
    /// Publishes answered from the dedupe table.
    pub deduplicated: Counter,
}

impl TopicMetrics {
    /// The delivered counter of a mode.
    pub fn delivered(&self, mode: Mode) -> &Counter {
        match mode {
            Mode::Push => &self.delivered_push,
            Mode::Pull => &self.delivered_pull,
            Mode::Stream => &self.delivered_stream,
        }
    }
}

impl Metrics {
    /// Registers every metric; `topic_labels` false folds all topics into `_all`.
    pub fn new(topic_labels: bool) -> Self {
        let mut registry = Registry::default();
        let m = Metrics {
            registry: Registry::default(),
            topic_labels,
            published: Family::default(),
            published_bytes: Family::default(),
            delivered: Family::default(),
            delivered_bytes: Family::default(),
            redeliveries: Family::default(),
            expired: Family::default(),
            deduplicated: Family::default(),
            dead_lettered: Family::default(),
            dropped: Family::default(),
            publish_latency: latency_histogram(),
            delivery_latency: Family::new_with_constructor(latency_histogram),
            push_duration: latency_histogram(),
            in_flight: Gauge::default(),
            pull_waiters: Gauge::default(),
            storage_bytes: Family::default(),
            storage_segments: Family::default(),
            storage_errors: Family::default(),
            fsyncs: Counter::default(),
            fsync_duration: latency_histogram(),
            recovery_truncated_bytes: Counter::default(),
            recovery_quarantined_files: Counter::default(),
            retention_deleted_segments: Counter::default(),
            http_requests: Family::default(),
            api_errors: Family::default(),
            requests: Family::default(),
            mesh_members: Family::default(),
            mesh_handshake_failures: Family::default(),
            mesh_datagrams_in: Counter::default(),
            mesh_datagrams_out: Counter::default(),
            mesh_bytes_in: Counter::default(),
            mesh_bytes_out: Counter::default(),
            mesh_bad_datagrams: Counter::default(),
            mesh_bad_frames: Family::default(),
            mesh_rtt: Family::default(),
            mesh_lost_packets: Family::default(),
            mesh_frames_in: Counter::default(),
            mesh_frames_out: Counter::default(),
            mesh_writes: Counter::default(),
            forwarded: Family::default(),
            forward_latency: latency_histogram(),
            partitions_homed: Gauge::default(),
            handoffs: Family::default(),
            fetches_served: Counter::default(),
            mesh_invalid_messages: Family::default(),
            consumer_lag: Family::default(),
            partitions_unavailable: Gauge::default(),
        };
        let r = &mut registry;
        r.register(
            "shoal_messages_published",
            "Messages published (stored, or fanned out for ephemeral topics)",
            m.published.clone(),
        );
        r.register_with_unit(
            "shoal_published",
            "Payload bytes published",
            Unit::Bytes,
            m.published_bytes.clone(),
        );
        r.register(
            "shoal_messages_delivered",
            "Messages handed to apps, by delivery mode",
            m.delivered.clone(),
        );
        r.register_with_unit(
            "shoal_delivered",
            "Payload bytes handed to apps",
            Unit::Bytes,
            m.delivered_bytes.clone(),
        );
        r.register(
            "shoal_redeliveries",
            "Deliveries after the first attempt",
            m.redeliveries.clone(),
        );
        r.register(
            "shoal_messages_expired",
            "Messages whose TTL passed before delivery",
            m.expired.clone(),
        );
        r.register(
            "shoal_messages_deduplicated",
            "Publishes answered from the dedupe window instead of stored again",
            m.deduplicated.clone(),
        );
        r.register(
            "shoal_messages_dead_lettered",
            "Messages sent to a dead-letter topic, by reason",
            m.dead_lettered.clone(),
        );
        r.register(
            "shoal_messages_dropped",
            "Messages dropped, by reason",
            m.dropped.clone(),
        );
        r.register_with_unit(
            "shoal_publish_duration",
            "Time from a publish request to its answer",
            Unit::Seconds,
            m.publish_latency.clone(),
        );
        r.register_with_unit(
            "shoal_delivery_latency",
            "Time from publish to hand-over to the app",
            Unit::Seconds,
            m.delivery_latency.clone(),
        );
        r.register_with_unit(
            "shoal_push_duration",
            "Time the app took to answer a push",
            Unit::Seconds,
            m.push_duration.clone(),
        );
        r.register(
            "shoal_messages_in_flight",
            "Messages handed to apps and not yet acknowledged",
            m.in_flight.clone(),
        );
        r.register(
            "shoal_pull_waiters",
            "Long polls and streams waiting for messages",
            m.pull_waiters.clone(),
        );
        r.register_with_unit(
            "shoal_storage",
            "Bytes stored in partition logs",
            Unit::Bytes,
            m.storage_bytes.clone(),
        );
        r.register(
            "shoal_storage_segments",
            "Segment files in partition logs",
            m.storage_segments.clone(),
        );
        r.register(
            "shoal_storage_errors",
            "Storage failures by operation",
            m.storage_errors.clone(),
        );
        r.register(
            "shoal_storage_fsyncs",
            "fsync calls on partition logs",
            m.fsyncs.clone(),
        );
        r.register_with_unit(
            "shoal_storage_fsync_duration",
            "Time spent in fsync",
            Unit::Seconds,
            m.fsync_duration.clone(),
        );
        r.register_with_unit(
            "shoal_storage_recovery_truncated",
            "Bytes cut from torn or corrupt log tails at start-up",
            Unit::Bytes,
            m.recovery_truncated_bytes.clone(),
        );
        r.register(
            "shoal_storage_recovery_quarantined_files",
            "Files moved to quarantine at start-up",
            m.recovery_quarantined_files.clone(),
        );
        r.register(
            "shoal_storage_retention_deleted_segments",
            "Segments deleted by retention",
            m.retention_deleted_segments.clone(),
        );
        r.register(
            "shoal_http_requests",
            "App API requests by route, method and status",
            m.http_requests.clone(),
        );
        r.register(
            "shoal_api_errors",
            "Errors answered to apps, by error code",
            m.api_errors.clone(),
        );
        r.register(
            "shoal_requests",
            "Request/reply exchanges by outcome",
            m.requests.clone(),
        );
        r.register(
            "shoal_mesh_members",
            "Mesh members by state, this agent included",
            m.mesh_members.clone(),
        );
        r.register(
            "shoal_mesh_handshake_failures",
            "Mesh peers refused in the TLS handshake, by reason",
            m.mesh_handshake_failures.clone(),
        );
        r.register(
            "shoal_mesh_datagrams_received",
            "Mesh gossip datagrams received",
            m.mesh_datagrams_in.clone(),
        );
        r.register(
            "shoal_mesh_datagrams_sent",
            "Mesh gossip datagrams sent",
            m.mesh_datagrams_out.clone(),
        );
        r.register_with_unit(
            "shoal_mesh_received",
            "Mesh bytes received",
            Unit::Bytes,
            m.mesh_bytes_in.clone(),
        );
        r.register_with_unit(
            "shoal_mesh_sent",
            "Mesh bytes sent",
            Unit::Bytes,
            m.mesh_bytes_out.clone(),
        );
        r.register(
            "shoal_mesh_bad_datagrams",
            "Gossip datagrams that could not be decoded",
            m.mesh_bad_datagrams.clone(),
        );
        r.register(
            "shoal_mesh_bad_frames",
            "Mesh stream frames refused, by reason (each ends its stream)",
            m.mesh_bad_frames.clone(),
        );
        r.register_with_unit(
            "shoal_mesh_rtt",
            "QUIC round-trip time per peer",
            Unit::Seconds,
            m.mesh_rtt.clone(),
        );
        r.register(
            "shoal_mesh_lost_packets",
            "QUIC packets lost per peer over the connection",
            m.mesh_lost_packets.clone(),
        );
        r.register(
            "shoal_mesh_frames_received",
            "Mesh stream frames received",
            m.mesh_frames_in.clone(),
        );
        r.register(
            "shoal_mesh_frames_sent",
            "Mesh stream frames sent",
            m.mesh_frames_out.clone(),
        );
        r.register(
            "shoal_mesh_writes",
            "Mesh stream writes, each combining one or more frames",
            m.mesh_writes.clone(),
        );
        r.register(
            "shoal_forwarded_publishes",
            "Publishes forwarded to the partition's home agent, by outcome",
            m.forwarded.clone(),
        );
        r.register_with_unit(
            "shoal_forward_duration",
            "Round trip of a publish forwarded to the partition's home agent",
            Unit::Seconds,
            m.forward_latency.clone(),
        );
        r.register(
            "shoal_partitions_homed",
            "Partitions this agent is home to",
            m.partitions_homed.clone(),
        );
        r.register(
            "shoal_handoffs",
            "Partition hand-offs by direction and outcome",
            m.handoffs.clone(),
        );
        r.register(
            "shoal_fetches_served",
            "Consumer-group fetches served to other agents as a partition's home",
            m.fetches_served.clone(),
        );
        r.register(
            "shoal_mesh_invalid_messages",
            "Well-framed mesh messages refused for their content, by reason",
            m.mesh_invalid_messages.clone(),
        );
        r.register(
            "shoal_consumer_lag_messages",
            "Messages a live consumer group has not acknowledged, per partition this agent serves",
            m.consumer_lag.clone(),
        );
        r.register(
            "shoal_partitions_unavailable",
            "Partitions whose home is down or missing in this agent's view",
            m.partitions_unavailable.clone(),
        );
        // A gauge fixed at 1 rather than an OpenMetrics `info`: the classic
        // text format (and `promtool check metrics`) has no info type.
        let build = Family::<Vec<(&'static str, &'static str)>, Gauge>::default();
        build
            .get_or_create(&vec![("version", env!("CARGO_PKG_VERSION"))])
            .set(1);
        r.register(
            "shoal_build_info",
            "Build information: the version label; always 1",
            build,
        );
        registry.register_collector(Box::new(ProcessCollector));
        Metrics { registry, ..m }
    }

    /// Whether metrics carry topic names.
    pub fn topic_labels(&self) -> bool {
        self.topic_labels
    }

    /// Label value for a topic.
    pub fn topic_label(&self, topic: &str) -> String {
        if self.topic_labels {
            topic.to_string()
        } else {
            ALL_TOPICS.to_string()
        }
    }

    /// Metric handles for a topic.
    pub fn topic(&self, topic: &str) -> TopicMetrics {
        let label = self.topic_label(topic);
        let t = TopicLabel {
            topic: label.clone(),
        };
        let d = |mode| {
            self.delivered
                .get_or_create(&DeliveryLabels {
                    topic: label.clone(),
                    mode,
                })
                .clone()
        };
        TopicMetrics {
            published: self.published.get_or_create(&t).clone(),
            published_bytes: self.published_bytes.get_or_create(&t).clone(),
            delivered_push: d(Mode::Push),
            delivered_pull: d(Mode::Pull),
            delivered_stream: d(Mode::Stream),
            delivered_bytes: self.delivered_bytes.get_or_create(&t).clone(),
            redeliveries: self.redeliveries.get_or_create(&t).clone(),
            expired: self.expired.get_or_create(&t).clone(),
            deduplicated: self.deduplicated.get_or_create(&t).clone(),
            label,
        }
    }

    /// Counts an error answered to an app.
    pub fn api_error(&self, code: &'static str) {
        self.api_errors.get_or_create(&CodeLabel { code }).inc();
    }

    /// The classic Prometheus text format (version 0.0.4), for scrapers and
    /// tools that do not ask for OpenMetrics (`promtool check metrics`, curl).
    pub fn encode_text(&self) -> String {
        openmetrics_to_text(&self.encode())
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// Rewrites OpenMetrics text as the classic Prometheus text format: a
/// counter family `x` becomes `x_total` in its HELP and TYPE lines (its
/// samples already carry the suffix), and `# UNIT` and `# EOF` lines go.
pub fn openmetrics_to_text(om: &str) -> String {
    let counters: std::collections::HashSet<&str> = om
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(om.len() + 16 * counters.len());
    for line in om.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find(|p| line.starts_with(p));
        if let Some(prefix) = meta {
            let rest = &line[prefix.len()..];
            let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
            if counters.contains(name) {
                out.push_str(prefix);
                out.push_str(name);
                out.push_str("_total ");
                out.push_str(tail);
                out.push('\n');
                continue;
            }
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// Standard `process_*` metrics read from /proc on each scrape.
#[derive(Debug)]
struct ProcessCollector;

/// Kernel clock ticks per second for /proc CPU times (USER_HZ, fixed at 100 on Linux).
const CLOCK_TICKS_PER_SECOND: f64 = 100.0;

#[derive(Default)]
struct ProcessStats {
    cpu_seconds: f64,
    resident_bytes: i64,
    virtual_bytes: i64,
    open_fds: i64,
    max_fds: i64,
    threads: i64,
}

fn read_process_stats() -> ProcessStats {
    let mut s = ProcessStats::default();
    if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
        // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
        if let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) {
            let f: Vec<&str> = rest.split_whitespace().collect();
            let num = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
            s.cpu_seconds = (num(11) + num(12)) / CLOCK_TICKS_PER_SECOND;
            s.threads = num(17) as i64;
            s.virtual_bytes = num(20) as i64;
        }
    }
    if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
        for line in status.lines() {
            if let Some(v) = line.strip_prefix("VmRSS:") {
                let kb: i64 = v.trim().trim_end_matches("kB").trim().parse().unwrap_or(0);
                s.resident_bytes = kb * 1024;
            }
        }
    }
    if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
        s.open_fds = dir.count() as i64;
    }
    if let Ok(limits) = std::fs::read_to_string("/proc/self/limits") {
        if let Some(line) = limits.lines().find(|l| l.starts_with("Max open files")) {
            s.max_fds = line
                .split_whitespace()
                .nth(3)
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
        }
    }
    s
}

static PROCESS_START: AtomicU64 = AtomicU64::new(0);

/// Remembers when the process started, for `process_start_time_seconds`.
pub fn mark_process_start() {
    PROCESS_START.store(crate::time::now_ms(), std::sync::atomic::Ordering::Relaxed);
}

impl prometheus_client::collector::Collector for ProcessCollector {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder<'_>,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        let s = read_process_stats();
        let start = PROCESS_START.load(std::sync::atomic::Ordering::Relaxed) as f64 / 1000.0;
        let counter = ConstCounter::new(s.cpu_seconds);
        counter.encode(encoder.encode_descriptor(
            "process_cpu_seconds",
            "CPU time used by the process",
            None,
            counter.metric_type(),
        )?)?;
        let gauges: [(&str, &str, f64); 6] = [
            (
                "process_resident_memory_bytes",
                "Resident memory",
                s.resident_bytes as f64,
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory",
                s.virtual_bytes as f64,
            ),
            (
                "process_open_fds",
                "Open file descriptors",
                s.open_fds as f64,
            ),
            (
                "process_max_fds",
                "Limit of open file descriptors",
                s.max_fds as f64,
            ),
            ("process_threads", "OS threads", s.threads as f64),
            (
                "process_start_time_seconds",
                "Start time since the Unix epoch",
                start,
            ),
        ];
        for (name, help, value) in gauges {
            let g = ConstGauge::new(value);
            g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_classic_text_format_names_counters_with_total_and_has_no_openmetrics_lines() {
        let m = Metrics::new(true);
        m.topic("orders").published.inc();
        let text = m.encode_text();
        assert!(
            text.contains("# HELP shoal_messages_published_total "),
            "{text}"
        );
        assert!(text.contains("# TYPE shoal_messages_published_total counter\n"));
        assert!(text.contains("shoal_messages_published_total{topic=\"orders\"} 1\n"));
        assert!(text.contains("# TYPE process_cpu_seconds_total counter\n"));
        assert!(text.contains("# TYPE shoal_build_info gauge\n"));
        assert!(!text.contains("# UNIT ") && !text.contains("# EOF"));
        assert!(!text.contains(" info\n"), "no OpenMetrics info type");
        let om = m.encode();
        assert!(om.ends_with("# EOF\n"));
        assert!(om.contains("# TYPE shoal_messages_published counter\n"));
    }
}
