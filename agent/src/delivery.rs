//! Delivery: the I/O shell around [`GroupCore`](crate::group::GroupCore).
//! One task per consumer group (`group_task`) reads the topic's partitions,
//! pushes to the app over HTTP, answers long polls and streams, applies acks,
//! dead-letters, and checkpoints committed offsets. Also the subscription
//! registry and request/reply.

mod group_task;

use group_task::GroupTask;

use crate::broker::Broker;
use crate::error::ApiError;
use crate::group::{AckId, Delivery, MemberSpec};
use crate::message::Message;
use crate::metrics::{Metrics, Mode, ModeLabel};
use crate::router::Router;
use crate::subscription::{StartPosition, Subscription, SubscriptionSpec};
use crate::tenancy::Action;
use crate::topic::{Partition, Topic};
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::collections::{BTreeMap, HashMap};
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
/// Commands a group task buffers before senders wait.
const GROUP_QUEUE: usize = 1024;
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

    /// One subscription, or the app's 404 (`subscription_not_found`).
    pub fn existing(&self, name: &str) -> Result<Subscription, ApiError> {
        self.get(name).ok_or_else(|| {
            ApiError::not_found(
                "subscription_not_found",
                format!("no subscription {name:?}"),
            )
        })
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
        let task = GroupTask::new(Arc::from(group), topic_arc, start, (tx.clone(), rx), self);
        let _ = tx.try_send(Command::Members(members));
        tokio::spawn(task.run());
        groups.insert(key, GroupHandle { tx });
        Ok(())
    }

    fn group_of(&self, name: &str) -> Result<(Subscription, mpsc::Sender<Command>), ApiError> {
        let sub = self.existing(name)?;
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
