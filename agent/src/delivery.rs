//! Delivery: the I/O shell around [`GroupCore`]. One task per consumer group
//! reads the topic's partitions, pushes to the app over HTTP, answers long
//! polls and streams, applies acks, dead-letters, and checkpoints committed
//! offsets. Also the subscription registry and request/reply.

use crate::broker::Broker;
use crate::error::ApiError;
use crate::group::{AckId, DeadLetter, Delivery, GroupCore, MemberSpec, FETCH_BYTES};
use crate::message::{AttrValue, Message};
use crate::metrics::{Metrics, Mode, ModeLabel, ReasonLabels};
use crate::router::{ReadAt, Router};
use crate::subscription::{StartPosition, Subscription, SubscriptionSpec};
use crate::tenancy::Action;
use crate::topic::{Partition, Topic};
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

/// File of declared subscriptions, in the data directory.
pub const SUBSCRIPTIONS_FILE: &str = "subscriptions.json";
/// The status an app answers to send a pushed message straight to the dead-letter topic.
pub const DEAD_LETTER_STATUS: StatusCode = StatusCode::UNPROCESSABLE_ENTITY;
/// Wait before retrying a dead letter that could not be stored.
const DEAD_LETTER_RETRY: Duration = Duration::from_secs(1);
/// Commands a group task buffers before senders wait.
const GROUP_QUEUE: usize = 1024;
/// Pause before fetching again from a home agent that answered with an error.
const REMOTE_FETCH_RETRY: Duration = Duration::from_millis(250);
/// Wait before asking again a leader that refused this agent's namespace.
const FORBIDDEN_FETCH_RETRY: Duration = Duration::from_secs(5);
/// Longest a request/reply may wait.
pub const MAX_REQUEST_TIMEOUT: Duration = Duration::from_secs(300);

/// The HTTP client that talks to the app on localhost.
pub type AppClient = Client<HttpConnector, Full<Bytes>>;

/// A new client for pushes and requests to the app.
pub fn app_client() -> AppClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(256)
        .build(connector)
}

/// How an app answered a push.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PushOutcome {
    Ack,
    Reject,
    Fail,
}

enum Command {
    Members(Vec<(MemberSpec, Option<String>, Option<String>)>),
    Pull {
        member: Arc<str>,
        max: usize,
        deadline: Instant,
        reply: oneshot::Sender<Vec<Delivery>>,
    },
    Ack {
        acks: Vec<AckId>,
        nacks: Vec<AckId>,
        delay: Duration,
        reply: oneshot::Sender<AckResult>,
    },
    PushDone {
        id: AckId,
        outcome: PushOutcome,
    },
    DeadLetterDone {
        partition: u32,
        offset: u64,
        stored: bool,
    },
    Stop {
        deadline: Instant,
        done: oneshot::Sender<()>,
    },
    Fetched {
        partition: u32,
        from: Option<u64>,
        result: Result<shoal_proto::FetchedBatch, ApiError>,
    },
}

/// The router, once the mesh is up; shared by the subscriptions and their groups.
type RouterCell = Arc<OnceLock<Weak<Router>>>;

/// Result of an ack request.
#[derive(Debug, Default, serde::Serialize)]
pub struct AckResult {
    /// Ids acknowledged.
    pub acked: usize,
    /// Ids given back for redelivery.
    pub nacked: usize,
    /// Ids not in flight (already acknowledged, redelivered elsewhere, or never issued).
    pub unknown: Vec<String>,
}

struct GroupHandle {
    tx: mpsc::Sender<Command>,
}

/// Declared subscriptions and the group tasks that serve them.
pub struct Subscriptions {
    broker: Arc<Broker>,
    metrics: Arc<Metrics>,
    app_port: Option<u16>,
    file: PathBuf,
    subs: Mutex<BTreeMap<String, Subscription>>,
    groups: Mutex<HashMap<(String, String), GroupHandle>>,
    client: AppClient,
    pull_waiters: AtomicUsize,
    max_pull_waiters: usize,
    request_rr: AtomicUsize,
    stopping: watch::Sender<bool>,
    router: RouterCell,
}

impl std::fmt::Debug for Subscriptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscriptions")
            .field("file", &self.file)
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Subscriptions {
    /// Loads declared subscriptions and starts their groups.
    pub fn open(
        broker: Arc<Broker>,
        data_dir: &std::path::Path,
        app_port: Option<u16>,
        max_pull_waiters: usize,
    ) -> Result<Arc<Subscriptions>, crate::AgentError> {
        let file = data_dir.join(SUBSCRIPTIONS_FILE);
        let subs: BTreeMap<String, Subscription> = match shoal_storage::meta::read(&file) {
            Ok(Some(bytes)) => {
                serde_json::from_slice(&bytes).map_err(|e| crate::AgentError::Storage {
                    path: file.clone(),
                    message: format!("unreadable subscriptions: {e}"),
                })?
            }
            Ok(None) => BTreeMap::new(),
            Err(e) => {
                return Err(crate::AgentError::Storage {
                    path: file.clone(),
                    message: e.to_string(),
                })
            }
        };
        let s = Arc::new(Subscriptions {
            metrics: broker.metrics.clone(),
            broker,
            app_port,
            file,
            subs: Mutex::new(subs),
            groups: Mutex::new(HashMap::new()),
            client: app_client(),
            pull_waiters: AtomicUsize::new(0),
            max_pull_waiters,
            request_rr: AtomicUsize::new(0),
            stopping: watch::Sender::new(false),
            router: Arc::new(OnceLock::new()),
        });
        let weak = Arc::downgrade(&s);
        s.broker.set_groups_hook(Box::new(move |topic| {
            weak.upgrade().map_or_else(Vec::new, |s| s.groups_of(topic))
        }));
        let keys: Vec<(String, String)> = lock(&s.subs)
            .values()
            .map(|sub| (sub.topic.clone(), sub.group.clone()))
            .collect();
        for (topic, group) in keys {
            if let Err(e) = s.refresh_group(&topic, &group) {
                tracing::error!(topic, group, error = %e, "could not start a consumer group");
            }
        }
        Ok(s)
    }

    /// Connects the groups to the mesh: from now on they read only the
    /// partitions dealt to this agent, wherever their home is.
    pub fn attach_router(&self, router: &Arc<Router>) {
        let _ = self.router.set(Arc::downgrade(router));
    }

    fn share(&self) {
        if let Some(r) = self.router.get().and_then(Weak::upgrade) {
            r.share_subscriptions();
        }
    }

    /// Every subscription.
    pub fn list(&self) -> Vec<Subscription> {
        lock(&self.subs).values().cloned().collect()
    }

    /// One subscription.
    pub fn get(&self, name: &str) -> Option<Subscription> {
        lock(&self.subs).get(name).cloned()
    }

    /// Whether any subscription reads `topic`.
    pub fn uses_topic(&self, topic: &str) -> Vec<String> {
        lock(&self.subs)
            .values()
            .filter(|s| s.topic == topic)
            .map(|s| s.name.clone())
            .collect()
    }

    fn persist(&self, subs: &BTreeMap<String, Subscription>) -> Result<(), ApiError> {
        let body =
            serde_json::to_vec_pretty(subs).map_err(|e| ApiError::internal(e.to_string()))?;
        shoal_storage::meta::write_atomic(&self.file, &body)
            .map_err(|e| ApiError::internal(format!("writing subscriptions: {e}")))
    }

    /// Declares (creates or updates) a subscription. Returns it and whether it was created.
    pub fn put(
        &self,
        name: &str,
        spec: SubscriptionSpec,
    ) -> Result<(Subscription, bool), ApiError> {
        let spec = self.qualify(name, spec)?;
        let (sub, created) = {
            let mut subs = lock(&self.subs);
            let previous = subs.get(name).cloned();
            let sub = Subscription::from_spec(name, spec, previous.as_ref(), self.app_port)?;
            if previous.as_ref() == Some(&sub) {
                return Ok((sub, false));
            }
            self.broker.topic_or_create(&sub.topic)?;
            let mut next = subs.clone();
            next.insert(name.to_string(), sub.clone());
            self.persist(&next)?;
            *subs = next;
            (sub, previous.is_none())
        };
        self.refresh_group(&sub.topic, &sub.group)?;
        self.share();
        if created {
            tracing::info!(subscription = name, topic = %sub.topic, group = %sub.group, "subscription declared");
        }
        Ok((sub, created))
    }

    /// The spec with full names (plain names are in this agent's namespace),
    /// if this agent's namespace may read its topic, use its group and
    /// publish to its dead-letter topic.
    fn qualify(
        &self,
        name: &str,
        mut spec: SubscriptionSpec,
    ) -> Result<SubscriptionSpec, ApiError> {
        let ns = self.broker.namespace();
        spec.topic = crate::names::qualify("topic", ns, &spec.topic)?;
        let group = crate::names::qualify("group", ns, spec.group.as_deref().unwrap_or(name))?;
        crate::tenancy::may_use_group(ns, &group)
            .inspect_err(|_| self.metrics.count_denial("app", "group"))?;
        spec.group = Some(group);
        self.broker.authorize(&spec.topic, Action::Subscribe)?;
        if let Some(dlq) = spec.dead_letter_topic.take() {
            let dlq = crate::names::qualify("dead-letter topic", ns, &dlq)?;
            self.broker.authorize(&dlq, Action::Publish)?;
            spec.dead_letter_topic = Some(dlq);
        }
        Ok(spec)
    }

    /// Deletes a subscription; its group keeps its committed offsets.
    pub fn delete(&self, name: &str) -> Result<(), ApiError> {
        let sub = {
            let mut subs = lock(&self.subs);
            let Some(sub) = subs.get(name).cloned() else {
                return Err(ApiError::not_found(
                    "subscription_not_found",
                    format!("no subscription {name:?}"),
                ));
            };
            let mut next = subs.clone();
            next.remove(name);
            self.persist(&next)?;
            *subs = next;
            sub
        };
        self.refresh_group(&sub.topic, &sub.group)?;
        self.share();
        tracing::info!(subscription = name, "subscription deleted");
        Ok(())
    }

    /// Sends the group its members, starting or stopping its task as needed.
    fn refresh_group(&self, topic: &str, group: &str) -> Result<(), ApiError> {
        let members: Vec<(MemberSpec, Option<String>, Option<String>)> = lock(&self.subs)
            .values()
            .filter(|s| s.topic == topic && s.group == group)
            .map(|s| {
                (
                    MemberSpec {
                        name: Arc::from(s.name.as_str()),
                        ack_timeout: s.ack_timeout,
                        max_deliveries: s.max_deliveries,
                        backoff: s.backoff.clone(),
                        max_in_flight: s.max_in_flight,
                        ordered: s.ordered,
                    },
                    s.push_path.clone(),
                    s.dead_letter_topic.clone(),
                )
            })
            .collect();
        let key = (topic.to_string(), group.to_string());
        let mut groups = lock(&self.groups);
        if members.is_empty() {
            if let Some(h) = groups.remove(&key) {
                let (done, _) = oneshot::channel();
                let _ = h.tx.try_send(Command::Stop {
                    deadline: Instant::now(),
                    done,
                });
            }
            return Ok(());
        }
        if let Some(h) = groups.get(&key) {
            if h.tx.try_send(Command::Members(members.clone())).is_ok() {
                return Ok(());
            }
            groups.remove(&key);
        }
        let topic_arc = self.broker.topic_or_create(topic)?;
        let start = lock(&self.subs)
            .values()
            .find(|s| s.topic == topic && s.group == group)
            .map(|s| s.start.clone())
            .unwrap_or_default();
        // Fix where a new group starts before the declaration is answered: a
        // message published right after it must be delivered.
        let partitions = topic_arc.partitions();
        let established = partitions
            .iter()
            .any(|p| p.committed_offset(group).is_some());
        for p in &partitions {
            start_offset(p, group, &start, established);
        }
        let (tx, rx) = mpsc::channel(GROUP_QUEUE);
        let task = GroupTask {
            group: Arc::from(group),
            topic: topic_arc,
            start,
            core: GroupCore::new(),
            push_paths: HashMap::new(),
            dead_letter_topics: HashMap::new(),
            waiters: VecDeque::new(),
            rx,
            tx: tx.clone(),
            broker: self.broker.clone(),
            metrics: self.metrics.clone(),
            client: self.client.clone(),
            app_port: self.app_port,
            stopping: self.stopping.subscribe(),
            reported_in_flight: 0,
            pushes_running: 0,
            router: self.router.clone(),
            remote_in_flight: HashSet::new(),
            forbidden: HashSet::new(),
            starting: BTreeSet::new(),
            retry_at: HashMap::new(),
        };
        let _ = tx.try_send(Command::Members(members));
        tokio::spawn(task.run());
        groups.insert(key, GroupHandle { tx });
        Ok(())
    }

    fn group_of(&self, name: &str) -> Result<(Subscription, mpsc::Sender<Command>), ApiError> {
        let sub = self.get(name).ok_or_else(|| {
            ApiError::not_found(
                "subscription_not_found",
                format!("no subscription {name:?}"),
            )
        })?;
        let key = (sub.topic.clone(), sub.group.clone());
        let live = |groups: &HashMap<(String, String), GroupHandle>| {
            groups
                .get(&key)
                .map(|h| h.tx.clone())
                .filter(|tx| !tx.is_closed())
        };
        let found = live(&lock(&self.groups));
        if let Some(tx) = found {
            return Ok((sub, tx));
        }
        // The group's task ended unexpectedly: start it again from its committed offsets.
        if !*self.stopping.borrow() {
            tracing::warn!(topic = %sub.topic, group = %sub.group, "restarting a consumer group that stopped");
            lock(&self.groups).remove(&key);
            self.refresh_group(&sub.topic, &sub.group)?;
        }
        let tx = live(&lock(&self.groups)).ok_or_else(|| {
            ApiError::unavailable("group_unavailable", "the consumer group is restarting", 1)
        })?;
        Ok((sub, tx))
    }

    /// Long-polls a pull subscription for up to `max` messages, waiting up to `wait`.
    pub async fn pull(
        &self,
        name: &str,
        max: usize,
        wait: Duration,
        mode: Mode,
    ) -> Result<(Subscription, Vec<Delivery>), ApiError> {
        let (sub, tx) = self.group_of(name)?;
        if sub.push_path.is_some() {
            return Err(ApiError::conflict(
                "push_subscription",
                format!("subscription {name:?} pushes to the app; pull and stream need a subscription without pushPath"),
            ));
        }
        if *self.stopping.borrow() {
            return Err(ApiError::unavailable(
                "shutting_down",
                "the agent is stopping",
                1,
            ));
        }
        let _waiter = WaiterGuard::new(self)?;
        let (reply, rx) = oneshot::channel();
        let deadline = Instant::now() + wait;
        tx.send(Command::Pull {
            member: Arc::from(name),
            max,
            deadline,
            reply,
        })
        .await
        .map_err(|_| ApiError::unavailable("group_unavailable", "the consumer group stopped", 1))?;
        let deliveries = rx.await.unwrap_or_default();
        let topic = self.broker.topic(&sub.topic);
        for d in &deliveries {
            record_delivery(&self.metrics, topic.as_deref(), d, mode);
        }
        Ok((sub, deliveries))
    }

    /// Acks and nacks deliveries of a subscription.
    pub async fn ack(
        &self,
        name: &str,
        acks: &[String],
        nacks: &[String],
        delay: Duration,
    ) -> Result<AckResult, ApiError> {
        let (_, tx) = self.group_of(name)?;
        let mut unknown = Vec::new();
        let mut parse = |ids: &[String]| -> Vec<AckId> {
            ids.iter()
                .filter_map(|s| match s.parse::<AckId>() {
                    Ok(id) => Some(id),
                    Err(()) => {
                        unknown.push(s.clone());
                        None
                    }
                })
                .collect()
        };
        let acks = parse(acks);
        let nacks = parse(nacks);
        let (reply, rx) = oneshot::channel();
        tx.send(Command::Ack {
            acks,
            nacks,
            delay,
            reply,
        })
        .await
        .map_err(|_| ApiError::unavailable("group_unavailable", "the consumer group stopped", 1))?;
        let mut result = rx.await.map_err(|_| {
            ApiError::unavailable("group_unavailable", "the consumer group stopped", 1)
        })?;
        result.unknown.extend(unknown);
        Ok(result)
    }

    /// Consumer groups with members on this agent that read `topic`.
    pub fn groups_of(&self, topic: &str) -> Vec<String> {
        let mut g: Vec<String> = lock(&self.subs)
            .values()
            .filter(|s| s.topic == topic)
            .map(|s| s.group.clone())
            .collect();
        g.sort();
        g.dedup();
        g
    }

    /// Whether a push subscription on this agent reads `topic`.
    pub fn has_push_subscriber(&self, topic: &str) -> bool {
        lock(&self.subs)
            .values()
            .any(|s| s.topic == topic && s.push_path.is_some())
    }

    /// Sends a request to one push subscriber of `topic` and returns its response.
    pub async fn request(
        &self,
        topic: &str,
        message: Message,
        timeout: Duration,
    ) -> Result<(StatusCode, HeaderMap, Bytes), ApiError> {
        crate::names::validate_full("topic", topic)?;
        let targets: Vec<Subscription> = lock(&self.subs)
            .values()
            .filter(|s| s.topic == topic && s.push_path.is_some())
            .cloned()
            .collect();
        let count = |outcome| self.metrics.count_request_reply(outcome);
        let Some(port) = self.app_port else {
            count("no_subscriber");
            return Err(ApiError::unavailable(
                "no_subscriber",
                "this agent has no --app-port, so no app behind it can answer requests",
                1,
            ));
        };
        if targets.is_empty() {
            count("no_subscriber");
            return Err(ApiError::unavailable(
                "no_subscriber",
                format!("no push subscription on topic {topic:?} to answer the request"),
                1,
            ));
        }
        let sub = &targets[self.request_rr.fetch_add(1, Ordering::Relaxed) % targets.len()];
        let path = sub.push_path.clone().unwrap_or_default();
        let mut req = build_push(
            port,
            &path,
            topic,
            &sub.name,
            0,
            0,
            1,
            crate::time::now_ms(),
            &message,
        )?;
        // A request is not stored: it has no partition or offset.
        req.headers_mut().remove("shoal-partition");
        req.headers_mut().remove("shoal-offset");
        req.headers_mut()
            .insert("shoal-request", HeaderValue::from_static("true"));
        let call = async {
            let resp = self.client.request(req).await?;
            let (parts, body) = resp.into_parts();
            let body = body.collect().await?.to_bytes();
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>((parts.status, parts.headers, body))
        };
        match tokio::time::timeout(timeout, call).await {
            Ok(Ok(r)) => {
                count("answered");
                Ok(r)
            }
            Ok(Err(e)) => {
                count("app_unreachable");
                Err(ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    "app_unreachable",
                    format!("the subscriber's app did not answer: {e}"),
                ))
            }
            Err(_) => {
                count("request_timeout");
                Err(ApiError::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    "request_timeout",
                    format!("no reply within {}", crate::time::format_duration(timeout)),
                ))
            }
        }
    }

    /// Stops every group: no new deliveries; in-flight pushes may finish until `deadline`.
    pub async fn shutdown(&self, deadline: Instant) {
        self.stopping.send_replace(true);
        let handles: Vec<GroupHandle> = lock(&self.groups).drain().map(|(_, h)| h).collect();
        let mut waits = Vec::new();
        for h in handles {
            let (done, rx) = oneshot::channel();
            if h.tx.send(Command::Stop { deadline, done }).await.is_ok() {
                waits.push(rx);
            }
        }
        for w in waits {
            let _ = tokio::time::timeout_at(deadline + Duration::from_millis(100), w).await;
        }
    }

    /// Whether every long-poll and stream slot is taken.
    pub fn waiters_full(&self) -> bool {
        self.pull_waiters.load(Ordering::Acquire) >= self.max_pull_waiters
    }

    /// Whether the agent is stopping.
    pub fn stopping(&self) -> watch::Receiver<bool> {
        self.stopping.subscribe()
    }
}

struct WaiterGuard<'a>(&'a Subscriptions);

impl<'a> WaiterGuard<'a> {
    fn new(s: &'a Subscriptions) -> Result<Self, ApiError> {
        if s.pull_waiters.fetch_add(1, Ordering::AcqRel) >= s.max_pull_waiters {
            s.pull_waiters.fetch_sub(1, Ordering::AcqRel);
            return Err(ApiError::too_many(
                "too_many_waiters",
                format!(
                    "{} long polls and streams are waiting already",
                    s.max_pull_waiters
                ),
                1,
            ));
        }
        s.metrics.pull_waiters.inc();
        Ok(WaiterGuard(s))
    }
}

impl Drop for WaiterGuard<'_> {
    fn drop(&mut self) {
        self.0.pull_waiters.fetch_sub(1, Ordering::AcqRel);
        self.0.metrics.pull_waiters.dec();
    }
}

fn record_delivery(metrics: &Metrics, topic: Option<&Topic>, d: &Delivery, mode: Mode) {
    if let Some(t) = topic {
        t.metrics.delivered(mode).inc();
        t.metrics
            .delivered_bytes
            .inc_by(d.message.payload.len() as u64);
        if d.ack_id.attempt > 1 {
            t.metrics.redeliveries.inc();
        }
    }
    let latency = crate::time::now_ms().saturating_sub(d.timestamp_ms) as f64 / 1000.0;
    metrics
        .delivery_latency
        .get_or_create(&ModeLabel { mode })
        .observe(latency);
}

/// Builds the CloudEvents binary-mode POST of a message to the app.
#[allow(clippy::too_many_arguments)]
fn build_push(
    port: u16,
    path: &str,
    topic: &str,
    subscription: &str,
    partition: u32,
    offset: u64,
    attempt: u32,
    timestamp_ms: u64,
    m: &Message,
) -> Result<Request<Full<Bytes>>, ApiError> {
    let uri = format!("http://127.0.0.1:{port}{path}");
    let mut b = Request::post(uri);
    let headers = crate::cloudevents::binary_headers(m, topic, timestamp_ms);
    for (name, value) in headers {
        b = b.header(name, value);
    }
    b = b
        .header("shoal-topic", topic)
        .header("shoal-subscription", subscription)
        .header("shoal-partition", partition.to_string())
        .header("shoal-offset", offset.to_string())
        .header("shoal-delivery-attempt", attempt.to_string());
    if let Some(k) = &m.key {
        if let Ok(v) = HeaderValue::from_str(k) {
            b = b.header("shoal-key", v);
        }
    }
    // The publisher's trace context, as plain W3C headers too, so tracing
    // middleware in the app picks it up without knowing CloudEvents.
    for (name, value) in &m.attributes {
        let Some(value) = value.as_str() else {
            continue;
        };
        let valid = match name.as_str() {
            "traceparent" => crate::cloudevents::valid_traceparent(value),
            "tracestate" => true,
            _ => false,
        };
        if valid {
            if let Ok(v) = HeaderValue::from_str(value) {
                b = b.header(name.as_str(), v);
            }
        }
    }
    b.body(Full::new(m.payload.clone()))
        .map_err(|e| ApiError::internal(format!("building the push request: {e}")))
}

/// Where `group` starts reading `p`: its committed offset; else, for a group
/// that already reads the topic, the partition's first offset (everything in
/// it arrived after the group existed); else the group's start position. The
/// choice is committed at once, so a restart resumes from it.
pub fn start_offset(p: &Partition, group: &str, start: &StartPosition, established: bool) -> u64 {
    if let Some(c) = p.committed_offset(group) {
        return c;
    }
    let first = p.first_index();
    let offset = if established {
        first
    } else {
        match start {
            StartPosition::Earliest => first,
            StartPosition::Latest => p.committed() + 1,
            StartPosition::Offset(o) => (*o).max(first),
            StartPosition::Time(t) => crate::time::parse_rfc3339_ms(t)
                .and_then(|ms| p.offset_at_time(ms).ok())
                .unwrap_or(first),
        }
    };
    p.commit_offset(group, offset);
    offset
}

struct Waiter {
    member: Arc<str>,
    max: usize,
    deadline: Instant,
    reply: oneshot::Sender<Vec<Delivery>>,
}

struct GroupTask {
    group: Arc<str>,
    topic: Arc<Topic>,
    start: StartPosition,
    core: GroupCore,
    push_paths: HashMap<Arc<str>, String>,
    dead_letter_topics: HashMap<Arc<str>, String>,
    waiters: VecDeque<Waiter>,
    rx: mpsc::Receiver<Command>,
    tx: mpsc::Sender<Command>,
    broker: Arc<Broker>,
    metrics: Arc<Metrics>,
    client: AppClient,
    app_port: Option<u16>,
    stopping: watch::Receiver<bool>,
    reported_in_flight: i64,
    pushes_running: usize,
    router: RouterCell,
    /// Partitions with a fetch under way at their home agent.
    remote_in_flight: HashSet<u32>,
    /// Partitions whose leader refuses this agent's namespace (a grant taken
    /// back): said once at WARN, asked again slowly.
    forbidden: HashSet<u32>,
    /// Remote partitions dealt to this agent whose resume offset the home has not told yet.
    starting: BTreeSet<u32>,
    /// When to fetch again from a home that answered with an error.
    retry_at: HashMap<u32, Instant>,
}

impl GroupTask {
    /// Counts messages the group skipped because its partition no longer
    /// holds them: an ephemeral ring overran a slow group (`overrun`), or
    /// retention removed them first (`retention`).
    fn count_skipped(&self, partition: u32, skipped: u64) {
        if skipped == 0 {
            return;
        }
        let reason = if self.topic.is_ephemeral() {
            "overrun"
        } else {
            "retention"
        };
        self.metrics
            .dropped
            .get_or_create(&ReasonLabels {
                topic: self.topic.metrics.label.clone(),
                reason,
            })
            .inc_by(skipped);
        tracing::debug!(topic = %self.topic.name, group = %self.group, partition, skipped, reason, "the group skipped messages its partition no longer holds");
    }

    fn router(&self) -> Option<Arc<Router>> {
        self.router.get().and_then(Weak::upgrade)
    }

    fn sync_partitions(&mut self) {
        let parts = self.topic.partitions();
        let router = self.router();
        let assigned: BTreeSet<u32> = match &router {
            Some(r) => r
                .assigned(&self.topic.name, &self.group, parts.len() as u32)
                .into_iter()
                .collect(),
            None => parts.iter().map(|p| p.id).collect(),
        };
        let known: Vec<u32> = self.core.partitions().collect();
        for pid in known {
            if !assigned.contains(&pid) {
                tracing::debug!(topic = %self.topic.name, group = %self.group, partition = pid, "partition dealt to another agent");
                self.core.remove_partition(pid);
            }
        }
        self.starting.retain(|p| assigned.contains(p));
        for pid in assigned {
            if self.core.has_partition(pid) || self.starting.contains(&pid) {
                continue;
            }
            let local = match &router {
                None => true,
                Some(r) => r.read_at(&self.topic.name, pid) == ReadAt::Local,
            };
            match parts.get(pid as usize) {
                Some(p) if local && p.role() == crate::topic::Role::Serving => {
                    // A partition new to a running group holds only messages
                    // published after the group existed: read all of it.
                    let start = start_offset(p, &self.group, &self.start, true);
                    self.core.add_partition(p.id, start);
                }
                // Home elsewhere (or still arriving here): the home says where the group resumes.
                _ if router.is_some() => {
                    self.starting.insert(pid);
                }
                _ => {}
            }
        }
    }

    /// Starts a fetch at a partition's home agent unless one is under way.
    fn fetch_remote(
        &mut self,
        router: &Arc<Router>,
        pid: u32,
        from: Option<u64>,
        max: usize,
        now: Instant,
    ) {
        if self.remote_in_flight.contains(&pid) || self.retry_at.get(&pid).is_some_and(|t| *t > now)
        {
            return;
        }
        self.remote_in_flight.insert(pid);
        let router = router.clone();
        let tx = self.tx.clone();
        let topic = self.topic.name.to_string();
        let group = self.group.to_string();
        let start = self.start.clone();
        tokio::spawn(async move {
            let result = router.fetch(&topic, pid, &group, &start, from, max).await;
            let _ = tx
                .send(Command::Fetched {
                    partition: pid,
                    from,
                    result,
                })
                .await;
        });
    }

    fn on_remote_fetched(
        &mut self,
        pid: u32,
        from: Option<u64>,
        result: Result<shoal_proto::FetchedBatch, ApiError>,
        now: Instant,
    ) {
        self.remote_in_flight.remove(&pid);
        let batch = match result {
            Ok(b) => b,
            Err(e) if e.code == "forbidden" => {
                if self.forbidden.insert(pid) {
                    tracing::warn!(topic = %self.topic.name, group = %self.group, partition = pid, error = %e.message, "the partition's leader refuses this namespace (was a grant taken back?); asking again every {}s", FORBIDDEN_FETCH_RETRY.as_secs());
                }
                self.retry_at.insert(pid, now + FORBIDDEN_FETCH_RETRY);
                return;
            }
            Err(e) => {
                tracing::debug!(topic = %self.topic.name, group = %self.group, partition = pid, error = %e.message, "fetch from the home agent failed; retrying");
                self.retry_at.insert(pid, now + REMOTE_FETCH_RETRY);
                return;
            }
        };
        self.retry_at.remove(&pid);
        if self.forbidden.remove(&pid) {
            tracing::info!(topic = %self.topic.name, group = %self.group, partition = pid, "the partition's leader serves this namespace again");
        }
        if self.starting.remove(&pid) {
            self.core.add_partition(pid, batch.start);
        } else if from.is_some_and(|f| batch.start < f) && self.core.has_partition(pid) {
            // The home restarted the partition's offsets (an ephemeral
            // partition that moved): read on from its answer.
            self.core.remove_partition(pid);
            self.core.add_partition(pid, batch.start);
        }
        if !self.core.has_partition(pid) {
            return;
        }
        if batch.first_index > batch.start {
            let skipped = self.core.on_compacted(pid, batch.first_index);
            self.count_skipped(pid, skipped);
        }
        let fed = batch
            .entries
            .into_iter()
            .map(|e| {
                (
                    e.index,
                    e.timestamp_ms,
                    Message::decode(&Bytes::from(e.data)),
                )
            })
            .collect();
        let outcome = self
            .core
            .on_fetched(pid, fed, crate::time::now_ms(), now.into_std());
        self.topic
            .metrics
            .expired
            .inc_by(u64::from(outcome.expired));
    }

    fn commit(&self, pid: u32, offset: u64) {
        let router = self.router();
        let local = match &router {
            None => true,
            Some(r) => r.read_at(&self.topic.name, pid) == ReadAt::Local,
        };
        if local {
            if let Some(part) = self.topic.partition(pid) {
                part.commit_offset(&self.group, offset);
            }
        } else if let Some(r) = router {
            r.commit(&self.topic.name, pid, &self.group, offset);
        }
    }

    async fn run(mut self) {
        let mut changed = self.topic.changed.subscribe();
        let mut placement = self.router().map(|r| r.watch());
        let mut stop: Option<(Instant, oneshot::Sender<()>)> = None;
        tracing::debug!(topic = %self.topic.name, group = %self.group, "consumer group started");
        loop {
            let now = Instant::now();
            if stop.is_none() {
                self.sync_partitions();
                self.fetch(now);
            }
            self.core.set_now_ms(crate::time::now_ms());
            let (dead, timed_out) = self.core.tick(now.into_std());
            if timed_out > 0 {
                tracing::debug!(group = %self.group, timed_out, "deliveries passed their ack timeout");
            }
            for d in dead {
                self.dead_letter(d);
            }
            if stop.is_none() && !*self.stopping.borrow() {
                self.dispatch_pushes(now);
            }
            self.serve_waiters(now);
            self.topic
                .metrics
                .expired
                .inc_by(u64::from(self.core.take_expired()));
            for (p, offset) in self.core.take_commits() {
                self.commit(p, offset);
            }
            self.report_in_flight();
            // Pulled and streamed messages are redelivered after a restart;
            // only pushes under way are worth waiting for.
            if let Some((deadline, _)) = &stop {
                if self.pushes_running == 0 || now >= *deadline {
                    break;
                }
            }
            let mut wake = self.core.next_timer().map(Instant::from_std);
            if let Some(w) = self.waiters.iter().map(|w| w.deadline).min() {
                wake = Some(wake.map_or(w, |t| t.min(w)));
            }
            if let Some(w) = self.retry_at.values().min().copied() {
                wake = Some(wake.map_or(w, |t| t.min(w)));
            }
            if placement.is_none() {
                placement = self.router().map(|r| r.watch());
            }
            let placement_changed = async {
                match placement.as_mut() {
                    Some(rx) => {
                        if rx.changed().await.is_err() {
                            std::future::pending::<()>().await;
                        }
                    }
                    None => std::future::pending().await,
                }
            };
            if let Some((deadline, _)) = &stop {
                wake = Some(wake.map_or(*deadline, |t| t.min(*deadline)));
            }
            let sleep = async {
                match wake {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                cmd = self.rx.recv() => match cmd {
                    Some(Command::Stop { deadline, done }) => {
                        for w in self.waiters.drain(..) {
                            let _ = w.reply.send(Vec::new());
                        }
                        stop = Some((deadline, done));
                    }
                    Some(cmd) => self.handle(cmd),
                    None => break,
                },
                r = changed.changed(), if stop.is_none() => {
                    if r.is_err() {
                        break;
                    }
                }
                _ = placement_changed, if stop.is_none() => {}
                _ = sleep => {}
            }
            // Drain whatever else is queued before the next round.
            while let Ok(cmd) = self.rx.try_recv() {
                match cmd {
                    Command::Stop { deadline, done } => stop = Some((deadline, done)),
                    cmd => self.handle(cmd),
                }
            }
        }
        for (p, offset) in self.core.take_commits() {
            self.commit(p, offset);
        }
        self.metrics
            .in_flight
            .dec_by(std::mem::take(&mut self.reported_in_flight));
        if let Some((_, done)) = stop {
            let _ = done.send(());
        }
        tracing::debug!(topic = %self.topic.name, group = %self.group, "consumer group stopped");
    }

    fn report_in_flight(&mut self) {
        let now = i64::from(self.core.in_flight());
        let before = std::mem::replace(&mut self.reported_in_flight, now);
        self.metrics.in_flight.inc_by(now - before);
    }

    fn fetch(&mut self, now: Instant) {
        let now_ms = crate::time::now_ms();
        let router = self.router();
        if let Some(r) = &router {
            let starting: Vec<u32> = self.starting.iter().copied().collect();
            for pid in starting {
                let at = r.read_at(&self.topic.name, pid);
                if at == ReadAt::Remote {
                    self.fetch_remote(r, pid, None, crate::group::FETCH_WINDOW, now);
                } else if at == ReadAt::Local
                    && self
                        .topic
                        .partition(pid)
                        .is_some_and(|p| p.role() == crate::topic::Role::Serving)
                {
                    // The partition arrived here: read it locally.
                    self.starting.remove(&pid);
                    if let Some(p) = self.topic.partition(pid) {
                        let start = start_offset(&p, &self.group, &self.start, false);
                        self.core.add_partition(pid, start);
                    }
                }
            }
        }
        for (pid, from, max) in self.core.wanted_fetches() {
            if let Some(r) = &router {
                match r.read_at(&self.topic.name, pid) {
                    ReadAt::Local => {}
                    ReadAt::Remote => {
                        self.fetch_remote(r, pid, Some(from), max, now);
                        continue;
                    }
                    ReadAt::Unavailable => continue,
                }
            }
            let Some(partition) = self.topic.partition(pid) else {
                continue;
            };
            if router.is_some() && partition.role() != crate::topic::Role::Serving {
                continue;
            }
            match partition.read(from, max, FETCH_BYTES) {
                Ok(entries) if entries.is_empty() => {
                    let first = partition.first_index();
                    if from < first {
                        let skipped = self.core.on_compacted(pid, first);
                        self.count_skipped(pid, skipped);
                    }
                }
                Ok(entries) => {
                    // An ephemeral ring answers from its start when it has
                    // moved past `from`: the group skips what it lost.
                    if let Some(first) = entries.first().map(|e| e.index).filter(|i| *i > from) {
                        let skipped = self.core.on_compacted(pid, first);
                        self.count_skipped(pid, skipped);
                    }
                    let fed = entries
                        .into_iter()
                        .map(|e| (e.index, e.timestamp_ms, Message::decode(&e.data)))
                        .collect();
                    let outcome = self.core.on_fetched(pid, fed, now_ms, now.into_std());
                    self.topic
                        .metrics
                        .expired
                        .inc_by(u64::from(outcome.expired));
                    if outcome.undecodable > 0 {
                        self.metrics
                            .dropped
                            .get_or_create(&ReasonLabels {
                                topic: self.topic.metrics.label.clone(),
                                reason: "undecodable",
                            })
                            .inc_by(u64::from(outcome.undecodable));
                        tracing::error!(topic = %self.topic.name, partition = pid, count = outcome.undecodable, "skipped entries that are not readable messages");
                    }
                }
                Err(shoal_storage::StorageError::Compacted { first_index, .. }) => {
                    let skipped = self.core.on_compacted(pid, first_index);
                    self.count_skipped(pid, skipped);
                }
                Err(e) => {
                    self.metrics
                        .storage_errors
                        .get_or_create(&crate::metrics::OpLabel { op: "read" })
                        .inc();
                    tracing::error!(topic = %self.topic.name, partition = pid, error = %e, "reading the partition failed");
                }
            }
        }
    }

    fn handle(&mut self, cmd: Command) {
        let now = Instant::now().into_std();
        match cmd {
            Command::Members(members) => {
                self.push_paths.clear();
                self.dead_letter_topics.clear();
                let mut specs = Vec::new();
                for (spec, push, dlq) in members {
                    if let Some(path) = push {
                        self.push_paths.insert(spec.name.clone(), path);
                    }
                    if let Some(t) = dlq {
                        self.dead_letter_topics.insert(spec.name.clone(), t);
                    }
                    specs.push(spec);
                }
                self.core.set_members(specs);
            }
            Command::Pull {
                member,
                max,
                deadline,
                reply,
            } => self.waiters.push_back(Waiter {
                member,
                max,
                deadline,
                reply,
            }),
            Command::Ack {
                acks,
                nacks,
                delay,
                reply,
            } => {
                let mut result = AckResult::default();
                for id in acks {
                    if self.core.ack(&id) {
                        result.acked += 1;
                    } else {
                        result.unknown.push(id.to_string());
                    }
                }
                for id in nacks {
                    match self.core.nack(&id, delay, now) {
                        Ok(dead) => {
                            result.nacked += 1;
                            if let Some(d) = dead {
                                self.dead_letter(d);
                            }
                        }
                        Err(_) => result.unknown.push(id.to_string()),
                    }
                }
                let _ = reply.send(result);
            }
            Command::PushDone { id, outcome } => {
                self.pushes_running = self.pushes_running.saturating_sub(1);
                self.push_done(id, outcome, now);
            }
            Command::DeadLetterDone {
                partition,
                offset,
                stored,
            } => {
                if stored {
                    self.core.complete(partition, offset);
                } else {
                    self.core
                        .park_failed(partition, offset, now, DEAD_LETTER_RETRY);
                }
            }
            Command::Fetched {
                partition,
                from,
                result,
            } => {
                self.on_remote_fetched(partition, from, result, Instant::now());
            }
            Command::Stop { .. } => {}
        }
    }

    fn push_done(&mut self, id: AckId, outcome: PushOutcome, now: std::time::Instant) {
        let dead = match outcome {
            PushOutcome::Ack => {
                self.core.ack(&id);
                None
            }
            PushOutcome::Reject => self.core.reject(&id),
            PushOutcome::Fail => self.core.fail(&id, now),
        };
        if let Some(d) = dead {
            self.dead_letter(d);
        }
    }

    fn dispatch_pushes(&mut self, now: Instant) {
        let Some(port) = self.app_port else { return };
        let members: Vec<(Arc<str>, String)> = self
            .push_paths
            .iter()
            .map(|(m, p)| (m.clone(), p.clone()))
            .collect();
        for (member, path) in members {
            let deliveries = self.core.take(&member, usize::MAX, now.into_std());
            for d in deliveries {
                record_delivery(&self.metrics, Some(&self.topic), &d, Mode::Push);
                let req = match build_push(
                    port,
                    &path,
                    &self.topic.name,
                    &member,
                    d.ack_id.partition,
                    d.ack_id.offset,
                    d.ack_id.attempt,
                    d.timestamp_ms,
                    &d.message,
                ) {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot build a push");
                        self.push_done(d.ack_id, PushOutcome::Reject, now.into_std());
                        continue;
                    }
                };
                self.pushes_running += 1;
                let client = self.client.clone();
                let tx = self.tx.clone();
                let metrics = self.metrics.clone();
                // The push call ends when the delivery would time out anyway, so
                // a hung app holds no task or connection past its ack timeout.
                let timeout = self
                    .core
                    .ack_timeout(&member)
                    .unwrap_or(crate::subscription::MAX_ACK_TIMEOUT);
                tokio::spawn(async move {
                    let started = std::time::Instant::now();
                    let outcome = match tokio::time::timeout(timeout, client.request(req)).await {
                        Ok(Ok(resp)) => {
                            let status = resp.status();
                            // Drain the body so the connection can be reused.
                            let _ = resp.into_body().collect().await;
                            if status.is_success() {
                                PushOutcome::Ack
                            } else if status == DEAD_LETTER_STATUS {
                                PushOutcome::Reject
                            } else {
                                PushOutcome::Fail
                            }
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(error = %e, "push failed");
                            PushOutcome::Fail
                        }
                        Err(_) => PushOutcome::Fail,
                    };
                    metrics
                        .push_duration
                        .observe(started.elapsed().as_secs_f64());
                    let _ = tx
                        .send(Command::PushDone {
                            id: d.ack_id,
                            outcome,
                        })
                        .await;
                });
            }
        }
    }

    fn serve_waiters(&mut self, now: Instant) {
        let mut keep = VecDeque::new();
        while let Some(w) = self.waiters.pop_front() {
            if w.reply.is_closed() {
                continue;
            }
            if self.core.has_ready_for(&w.member) {
                let d = self.core.take(&w.member, w.max, now.into_std());
                if !d.is_empty() {
                    if let Err(back) = w.reply.send(d) {
                        // The caller left: give the messages back at once.
                        for d in back {
                            let _ = self.core.nack(&d.ack_id, Duration::ZERO, now.into_std());
                        }
                    }
                    continue;
                }
            }
            if now >= w.deadline {
                let _ = w.reply.send(Vec::new());
                continue;
            }
            keep.push_back(w);
        }
        self.waiters = keep;
    }

    fn dead_letter(&self, d: DeadLetter) {
        let reason_labels = ReasonLabels {
            topic: self.topic.metrics.label.clone(),
            reason: d.reason,
        };
        let Some(dlq) = self.dead_letter_topics.get(&d.member).cloned() else {
            self.metrics.dropped.get_or_create(&reason_labels).inc();
            tracing::warn!(topic = %self.topic.name, group = %self.group, partition = d.partition, offset = d.offset, reason = d.reason, "message dropped: no dead-letter topic");
            let _ = self.tx.try_send(Command::DeadLetterDone {
                partition: d.partition,
                offset: d.offset,
                stored: true,
            });
            return;
        };
        self.metrics
            .dead_lettered
            .get_or_create(&reason_labels)
            .inc();
        let mut m = (*d.message).clone();
        m.client_id = false;
        m.attributes.retain(|(k, _)| !k.starts_with("shoaldlq"));
        // Numbers as Integers, like shoalpartition and shoaloffset of a pulled event.
        let int = |n: u64| AttrValue::Integer(i64::try_from(n).unwrap_or(i64::MAX));
        m.attributes.extend([
            ("shoaldlqreason".to_string(), d.reason.into()),
            (
                "shoaldlqtopic".to_string(),
                self.topic.name.to_string().into(),
            ),
            ("shoaldlqpartition".to_string(), int(u64::from(d.partition))),
            ("shoaldlqoffset".to_string(), int(d.offset)),
            ("shoaldlqattempts".to_string(), int(u64::from(d.attempts))),
        ]);
        let broker = self.broker.clone();
        let router = self.router();
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let published = match &router {
                Some(r) => r.publish(&dlq, vec![m]).await,
                None => broker.publish(&dlq, vec![m]).await,
            };
            let stored = match published {
                Ok(results) => results.iter().all(|r| r.is_ok()),
                Err(_) => false,
            };
            if !stored {
                tracing::warn!(dead_letter_topic = %dlq, "storing a dead letter failed; retrying");
            }
            let _ = tx
                .send(Command::DeadLetterDone {
                    partition: d.partition,
                    offset: d.offset,
                    stored,
                })
                .await;
        });
    }
}
