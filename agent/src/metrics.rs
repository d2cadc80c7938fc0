//! Prometheus metrics, exported on the admin port as text.
//!
//! Per-topic handles are created once per topic ([`TopicMetrics`]) so the hot
//! path increments an atomic instead of looking up a label set.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

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
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Mode {
    /// POSTed to the app.
    Push,
    /// Returned from a long poll.
    Pull,
    /// Sent as a server-sent event.
    Stream,
}

impl Mode {
    /// Label value, lowercase as Prometheus label values are by convention.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Push => "push",
            Mode::Pull => "pull",
            Mode::Stream => "stream",
        }
    }
}

impl EncodeLabelValue for Mode {
    fn encode(
        &self,
        encoder: &mut prometheus_client::encoding::LabelValueEncoder<'_>,
    ) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&self.as_str(), encoder)
    }
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
    /// Method: one of [`HTTP_METHODS`], or `other`, so a client cannot
    /// grow the label set.
    pub method: &'static str,
    /// Status code.
    pub status: u16,
}

/// Methods counted by name in `shoal_http_requests_total`; any other is `other`.
pub const HTTP_METHODS: [&str; 7] = ["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH"];

/// The `method` label value of an HTTP method.
pub fn method_label(method: &http::Method) -> &'static str {
    HTTP_METHODS
        .into_iter()
        .find(|m| *m == method.as_str())
        .unwrap_or("other")
}

/// `outcome` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    /// What happened.
    pub outcome: &'static str,
}

/// Outcomes of a request/reply exchange.
pub const REQUEST_REPLY_OUTCOMES: [&str; 4] = [
    "answered",
    "no_subscriber",
    "app_unreachable",
    "request_timeout",
];

/// Outcomes of a message forwarded to its partition's home.
pub const FORWARD_OUTCOMES: [&str; 5] = ["stored", "moving", "failed", "unreachable", "busy"];

/// Storage operations counted in `shoal_storage_errors_total`.
pub const STORAGE_OPS: [&str; 6] = ["append", "write", "read", "fsync", "offsets", "retention"];

/// Reasons a mesh stream frame is refused.
pub const BAD_FRAME_REASONS: [&str; 5] =
    ["version", "too_large", "empty", "malformed", "bad_answer"];

/// `reason` of a handshake the peer aborted, refusing this agent's certificate.
pub const PEER_REFUSED: &str = "peer_refused";

/// Why a message went to a dead-letter topic.
pub const DEAD_LETTER_REASONS: [&str; 2] = ["max_deliveries", "rejected"];

/// Why a message was dropped: given up without a dead-letter topic
/// (`max_deliveries`, `rejected`), unreadable (`undecodable`), or skipped
/// unread by a group because an ephemeral ring overran it (`overrun`) or
/// retention removed it first (`retention`).
pub const DROP_REASONS: [&str; 5] = [
    "max_deliveries",
    "rejected",
    "undecodable",
    "overrun",
    "retention",
];

/// Reasons a well-framed mesh message is refused.
pub const INVALID_MESSAGE_REASONS: [&str; 3] =
    ["undecodable_message", "invalid_topic", "unknown_sender"];

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

/// Labels of `shoal_authorization_denials_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DenialLabels {
    /// Where the request came from: `app` (this agent's app) or `mesh` (a peer).
    pub side: &'static str,
    /// What was refused: `publish`, `subscribe`, `configure` or `group`.
    pub action: &'static str,
}

/// Sides of [`DenialLabels`].
pub const DENIAL_SIDES: [&str; 2] = ["app", "mesh"];
/// Actions of [`DenialLabels`].
pub const DENIAL_ACTIONS: [&str; 4] = ["publish", "subscribe", "configure", "group"];

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
    /// Publish latency at the app API, request received to answer ready
    /// (forwarding and retries included).
    pub publish_latency: Histogram,
    /// Time a partition's home took to store a batch of messages, per attempt.
    pub store_latency: Histogram,
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
    pub request_reply: Family<OutcomeLabel, Counter>,
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
    /// Times this agent found its node name taken by another agent and left.
    pub mesh_name_conflicts: Counter,
    /// A peer's oldest connections closed because it held more than one
    /// may (`MAX_CONNECTIONS_PER_PEER`).
    pub mesh_connections_over_limit: Counter,
    /// When the mesh certificate in use expires, seconds since the Unix epoch.
    pub mesh_certificate_expiry: Gauge,
    /// Roots the mesh identity in use trusts (two during a CA rotation).
    pub mesh_trust_roots: Gauge,
    /// Mesh certificate loads or renewals that failed.
    pub mesh_certificate_failures: Counter,
    /// Mesh stream frames refused, by reason; each ends its stream.
    pub mesh_bad_frames: Family<ReasonLabel, Counter>,
    /// QUIC round-trip time per peer.
    pub mesh_rtt: Family<PeerLabel, Gauge<f64, std::sync::atomic::AtomicU64>>,
    /// QUIC packets lost per peer.
    pub mesh_lost_packets: Family<PeerLabel, Counter>,
    /// Mesh stream frames received.
    pub mesh_frames_in: Counter,
    /// Mesh stream frames sent.
    pub mesh_frames_out: Counter,
    /// Mesh stream writes (each combining one or more frames).
    pub mesh_writes: Counter,
    /// Fetches and requests answered `peer_busy` because their peer's
    /// connection left too many answer bytes unread.
    pub mesh_answers_shed: Counter,
    /// Messages forwarded to a partition's home agent, by outcome.
    pub forwarded: Family<OutcomeLabel, Counter>,
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
    /// Requests refused because their namespace may not do what they ask.
    pub authorization_denials: Family<DenialLabels, Counter>,
    /// Messages each live consumer group has not acknowledged, per partition
    /// this agent serves (refreshed at each scrape).
    pub consumer_lag: Family<LagLabels, Gauge>,
    /// Partitions whose home is down or missing in this agent's view.
    pub partitions_unavailable: Gauge,
    /// Raft groups (replicated partitions and the meta group) with a replica here.
    pub replica_groups: Gauge,
    /// Groups this agent leads.
    pub replica_leading: Gauge,
    /// Groups here that hibernate (idle: no ticks, no heartbeats).
    pub replica_hibernating: Gauge,
    /// Groups led here with fewer voters than their topic's `replicas`.
    pub replica_under_replicated: Gauge,
    /// Groups with a replica here that know no leader.
    pub replica_leaderless: Gauge,
    /// Entries the furthest-behind follower of any group led here lacks.
    pub replica_follower_lag: Gauge,
    /// New leaders seen by the replicas here (once per group and term with a leader).
    pub replica_leader_changes: Counter,
    /// Bytes of committed entries leaders here sent to replicas catching up.
    pub replica_catch_up_bytes: Counter,
    /// Publish to a led partition until a majority stored it (a batch's wait).
    pub replica_commit_latency: Histogram,
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
    /// Records the mesh certificate now in use.
    pub fn certificate_loaded(&self, identity: &shoal_mesh::certs::Identity) {
        let expiry = identity
            .not_after
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        self.mesh_certificate_expiry.set(expiry);
        self.mesh_trust_roots
            .set(i64::try_from(identity.roots.len()).unwrap_or(i64::MAX));
    }

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
            store_latency: latency_histogram(),
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
            request_reply: Family::default(),
            mesh_members: Family::default(),
            mesh_handshake_failures: Family::default(),
            mesh_datagrams_in: Counter::default(),
            mesh_datagrams_out: Counter::default(),
            mesh_bytes_in: Counter::default(),
            mesh_bytes_out: Counter::default(),
            mesh_bad_datagrams: Counter::default(),
            mesh_name_conflicts: Counter::default(),
            mesh_connections_over_limit: Counter::default(),
            mesh_certificate_expiry: Gauge::default(),
            mesh_trust_roots: Gauge::default(),
            mesh_certificate_failures: Counter::default(),
            mesh_bad_frames: Family::default(),
            mesh_rtt: Family::default(),
            mesh_lost_packets: Family::default(),
            mesh_frames_in: Counter::default(),
            mesh_frames_out: Counter::default(),
            mesh_answers_shed: Counter::default(),
            mesh_writes: Counter::default(),
            forwarded: Family::default(),
            forward_latency: latency_histogram(),
            partitions_homed: Gauge::default(),
            handoffs: Family::default(),
            fetches_served: Counter::default(),
            mesh_invalid_messages: Family::default(),
            authorization_denials: Family::default(),
            consumer_lag: Family::default(),
            partitions_unavailable: Gauge::default(),
            replica_groups: Gauge::default(),
            replica_leading: Gauge::default(),
            replica_hibernating: Gauge::default(),
            replica_leader_changes: Counter::default(),
            replica_catch_up_bytes: Counter::default(),
            replica_under_replicated: Gauge::default(),
            replica_leaderless: Gauge::default(),
            replica_follower_lag: Gauge::default(),
            replica_commit_latency: latency_histogram(),
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
            "Time from a publish request to its answer, on the agent the app called",
            Unit::Seconds,
            m.publish_latency.clone(),
        );
        r.register_with_unit(
            "shoal_store_duration",
            "Time a partition's home took to store a batch of published messages",
            Unit::Seconds,
            m.store_latency.clone(),
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
            "shoal_request_reply_exchanges",
            "Request/reply exchanges by outcome",
            m.request_reply.clone(),
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
            "shoal_mesh_connections_over_limit",
            "A peer's oldest mesh connections closed because it held more than one may (by its certificate's node, else its SPIFFE ID and address)",
            m.mesh_connections_over_limit.clone(),
        );
        r.register(
            "shoal_mesh_name_conflicts",
            "Times this agent found its node name taken by an agent that started first, and left the mesh",
            m.mesh_name_conflicts.clone(),
        );
        r.register(
            "shoal_mesh_certificate_expiry_timestamp_seconds",
            "When the mesh certificate in use expires, seconds since the Unix epoch (0 with no mesh identity)",
            m.mesh_certificate_expiry.clone(),
        );
        r.register(
            "shoal_mesh_trust_roots",
            "CA certificates the mesh identity in use trusts for its peers (two while a CA rotation is under way)",
            m.mesh_trust_roots.clone(),
        );
        r.register(
            "shoal_mesh_certificate_failures",
            "Mesh certificate loads and renewals that failed (the identity service refused or was unreachable, files unreadable); the certificate in use stays",
            m.mesh_certificate_failures.clone(),
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
            "QUIC packets lost per peer",
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
            "shoal_mesh_answers_shed",
            "Fetches and requests answered peer_busy because their peer's connection left more than 64 MiB of answers unread",
            m.mesh_answers_shed.clone(),
        );
        r.register(
            "shoal_forwarded_messages",
            "Messages forwarded to their partition's home agent, by outcome",
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
            "shoal_authorization_denials",
            "Requests refused because their namespace may not do what they ask (another namespace's topic or group), by side and action",
            m.authorization_denials.clone(),
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
        r.register(
            "shoal_replica_groups",
            "Raft groups (replicated partitions and the meta group) with a replica on this agent",
            m.replica_groups.clone(),
        );
        r.register(
            "shoal_replica_leading",
            "Raft groups this agent leads",
            m.replica_leading.clone(),
        );
        r.register(
            "shoal_replica_hibernating",
            "Raft groups on this agent that hibernate (idle: no ticks, no heartbeats)",
            m.replica_hibernating.clone(),
        );
        r.register(
            "shoal_replica_under_replicated",
            "Replicated partitions led by this agent with fewer voters than their topic's replicas",
            m.replica_under_replicated.clone(),
        );
        r.register(
            "shoal_replica_leaderless",
            "Raft groups with a replica on this agent that know no leader",
            m.replica_leaderless.clone(),
        );
        r.register(
            "shoal_replica_follower_lag_entries",
            "Entries the furthest-behind follower of any group this agent leads lacks",
            m.replica_follower_lag.clone(),
        );
        r.register(
            "shoal_replica_leader_changes",
            "New leaders seen by the replicas on this agent (one per replica and term that has a leader)",
            m.replica_leader_changes.clone(),
        );
        r.register_with_unit(
            "shoal_replica_catch_up",
            "Bytes of committed entries that leaders on this agent sent to replicas catching up (a new replica after its snapshot, or one that was away)",
            Unit::Bytes,
            m.replica_catch_up_bytes.clone(),
        );
        r.register_with_unit(
            "shoal_replica_commit_duration",
            "Publish to a partition this agent leads until a majority of its replicas stored it",
            Unit::Seconds,
            m.replica_commit_latency.clone(),
        );
        shoal_exposition::register_build_info(r, "shoal_build_info", env!("CARGO_PKG_VERSION"));
        registry.register_collector(Box::new(shoal_exposition::ProcessCollector));
        m.create_known_series();
        Metrics { registry, ..m }
    }

    /// Creates every series whose label values are known up front at 0, so
    /// `rate()` and `increase()` see the first event instead of a series
    /// appearing from nowhere.
    fn create_known_series(&self) {
        for outcome in REQUEST_REPLY_OUTCOMES {
            self.request_reply
                .get_or_create(&OutcomeLabel { outcome })
                .inc_by(0);
        }
        for outcome in FORWARD_OUTCOMES {
            self.forwarded
                .get_or_create(&OutcomeLabel { outcome })
                .inc_by(0);
        }
        for op in STORAGE_OPS {
            self.storage_errors.get_or_create(&OpLabel { op }).inc_by(0);
        }
        for reason in BAD_FRAME_REASONS {
            self.mesh_bad_frames
                .get_or_create(&ReasonLabel { reason })
                .inc_by(0);
        }
        for reason in INVALID_MESSAGE_REASONS {
            self.mesh_invalid_messages
                .get_or_create(&ReasonLabel { reason })
                .inc_by(0);
        }
        for side in DENIAL_SIDES {
            for action in DENIAL_ACTIONS {
                self.authorization_denials
                    .get_or_create(&DenialLabels { side, action })
                    .inc_by(0);
            }
        }
        let refusals = shoal_mesh::tls::Refusal::ALL.map(shoal_mesh::tls::Refusal::as_str);
        for reason in refusals.into_iter().chain([PEER_REFUSED]) {
            self.mesh_handshake_failures
                .get_or_create(&ReasonLabel { reason })
                .inc_by(0);
        }
        for direction in ["sent", "received"] {
            for outcome in ["ok", "failed"] {
                self.handoffs
                    .get_or_create(&HandoffLabels { direction, outcome })
                    .inc_by(0);
            }
        }
    }

    /// Counts a request refused by namespace ([`DenialLabels`]).
    pub fn count_denial(&self, side: &'static str, action: &'static str) {
        self.authorization_denials
            .get_or_create(&DenialLabels { side, action })
            .inc();
    }

    /// Counts a request/reply exchange.
    pub fn count_request_reply(&self, outcome: &'static str) {
        self.request_reply
            .get_or_create(&OutcomeLabel { outcome })
            .inc();
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
        for reason in DEAD_LETTER_REASONS {
            self.dead_lettered
                .get_or_create(&ReasonLabels {
                    topic: label.clone(),
                    reason,
                })
                .inc_by(0);
        }
        for reason in DROP_REASONS {
            self.dropped
                .get_or_create(&ReasonLabels {
                    topic: label.clone(),
                    reason,
                })
                .inc_by(0);
        }
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
        self.encode_as(shoal_exposition::Format::Text)
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        self.encode_as(shoal_exposition::Format::OpenMetrics)
    }

    /// The exposition in `format`.
    pub fn encode_as(&self, format: shoal_exposition::Format) -> String {
        format.encode(&self.registry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_http_methods_are_counted_as_other() {
        assert_eq!(method_label(&http::Method::POST), "POST");
        let brew = http::Method::from_bytes(b"BREW").unwrap();
        assert_eq!(method_label(&brew), "other");
    }

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
        assert!(
            text.contains("shoal_messages_delivered_total{topic=\"orders\",mode=\"push\"} 0\n"),
            "lowercase mode: {text}"
        );
        assert!(
            text.contains("shoal_forwarded_messages_total{outcome=\"busy\"} 0\n"),
            "known outcomes at 0: {text}"
        );
        assert!(
            text.contains("shoal_mesh_handshake_failures_total{reason=\"unknown_ca\"} 0\n"),
            "{text}"
        );
        let om = m.encode();
        assert!(om.ends_with("# EOF\n"));
        assert!(om.contains("# TYPE shoal_messages_published counter\n"));
    }
}
