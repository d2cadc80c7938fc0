//! Publishing: each message goes to its partition's home (or a replicated
//! partition's leader), stored here or forwarded over the mesh in coalesced
//! lanes; and serving publishes forwarded by peers.

use super::{
    api_error, call_error, join_all, lock, not_ready, retryable, stopping, wire_error, Home,
    Router, FORWARD_TIMEOUT, MOVE_RETRY_STEP, MOVE_RETRY_WINDOW, REPLICATED_FORWARD_TIMEOUT,
};
use crate::broker::{choose_partition, PublishOutcome};
use crate::error::ApiError;
use crate::mesh::Replier;
use crate::message::Message as AppMessage;
use crate::replication::{self, Replication, Route};
use crate::topic::Topic;
use bytes::Bytes;
use shoal_proto::{Message, PublishEntry, PublishResult};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

/// A message waiting to be stored: its index in the request, its partition, the message.
type Placed = (usize, u32, AppMessage);

/// Publish calls to one agent for one topic sent at once; more wait and go
/// together in the next call. One is the classic group commit: every call
/// costs the leader a proposal round and each follower an append, so the
/// publishes that arrive while a call is out are worth gathering into the
/// next. With 64 publishes in flight through a follower, 1, 2, 4, 8 and 16
/// calls per lane gave 36.9k, 33.1k, 32.0k, 30.6k and 28.2k acks/s
/// (docs/benchmarks.md).
pub const FORWARD_CALLS_PER_LANE: usize = 1;

/// A lane: the peer forwarded to and the topic (shared, so a forward does
/// not copy the topic's name).
pub(crate) type LaneKey = (SocketAddr, Arc<str>);

/// Per-message results of a forward.
type Outcomes = Vec<Result<PublishOutcome, ApiError>>;

/// A forward waiting for a call of its lane.
struct Queued {
    batch: Vec<Placed>,
    done: tokio::sync::oneshot::Sender<Outcomes>,
}

/// The call slot of a forward that found its lane idle and makes the call
/// itself; dropping it passes the slot on ([`Router::release_slot`]).
struct LaneSlot {
    router: Arc<Router>,
    topic: Arc<Topic>,
    node: String,
    key: Option<LaneKey>,
}

impl Drop for LaneSlot {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            let node = std::mem::take(&mut self.node);
            self.router
                .clone()
                .release_slot(self.topic.clone(), node, key);
        }
    }
}

/// Gives a call slot of `key`'s lane back when no forward waits on it (the
/// lane goes with its last call); whether it did. With forwards waiting, the
/// caller keeps the slot and sends them.
fn free_slot_if_idle(lanes: &mut HashMap<LaneKey, Lane>, key: &LaneKey) -> bool {
    let Some(lane) = lanes.get_mut(key) else {
        return true;
    };
    if !lane.queue.is_empty() {
        return false;
    }
    lane.calls = lane.calls.saturating_sub(1);
    if lane.calls == 0 {
        lanes.remove(key);
    }
    true
}

/// The calls under way to one agent for one topic and the forwards waiting.
#[derive(Default)]
pub(super) struct Lane {
    calls: usize,
    queue: Vec<Queued>,
}

/// The `outcome` of a forward the home refused: `moving` when the partition
/// is between homes (the agent retries it), else `failed`.
fn forward_outcome(e: &ApiError) -> &'static str {
    if retryable(e) {
        "moving"
    } else {
        "failed"
    }
}

/// A batch and its per-message results.
type Answered = (Vec<Placed>, Vec<Result<PublishOutcome, ApiError>>);

/// Publishes a batch to replicated partitions this agent leads, one call
/// per partition, results in the batch's order.
async fn publish_replicated(
    r: &Arc<Replication>,
    topic: &Arc<Topic>,
    batch: &[Placed],
) -> Vec<Result<PublishOutcome, ApiError>> {
    let mut by_partition: BTreeMap<u32, Vec<(usize, AppMessage)>> = BTreeMap::new();
    for (n, (_, pid, m)) in batch.iter().enumerate() {
        by_partition.entry(*pid).or_default().push((n, m.clone()));
    }
    let mut out: Vec<Option<Result<PublishOutcome, ApiError>>> =
        batch.iter().map(|_| None).collect();
    let calls = by_partition.into_iter().map(|(pid, items)| async move {
        let (slots, msgs): (Vec<usize>, Vec<AppMessage>) = items.into_iter().unzip();
        (slots, r.publish_local(topic, pid, msgs).await)
    });
    for (slots, results) in join_all(calls.collect()).await {
        for (slot, result) in slots.into_iter().zip(results) {
            out[slot] = Some(result);
        }
    }
    out.into_iter()
        .map(|r| r.unwrap_or_else(|| Err(ApiError::internal("publish lost a result"))))
        .collect()
}

impl Router {
    /// Publishes messages: each goes to its partition's home, here or on
    /// another agent; results are per message, in order.
    pub async fn publish(
        &self,
        topic_name: &str,
        messages: Vec<AppMessage>,
    ) -> Result<Vec<Result<PublishOutcome, ApiError>>, ApiError> {
        if let Some(conflict) = self.mesh.view().name_conflict {
            return Err(ApiError::unavailable(
                "name_conflict",
                conflict.message(),
                60,
            ));
        }
        let topic = self.broker.topic_or_create(topic_name)?;
        let mut results: Vec<Option<Result<PublishOutcome, ApiError>>> =
            (0..messages.len()).map(|_| None).collect();
        let mut todo: Vec<Placed> = messages
            .into_iter()
            .enumerate()
            .map(|(i, m)| (i, self.choose_live_partition(&topic, topic_name, &m), m))
            .collect();
        let repl = self.replicated(topic_name).cloned();
        let deadline =
            Instant::now() + repl.as_ref().map_or(MOVE_RETRY_WINDOW, |r| r.leader_wait());
        loop {
            let mut by_home: HashMap<Option<(String, SocketAddr)>, Vec<Placed>> = HashMap::new();
            let mut unrouted: Vec<Answered> = Vec::new();
            for (i, pid, m) in todo.drain(..) {
                let home = match &repl {
                    None => self.home(topic_name, pid),
                    Some(r) => match r.route_publish(topic_name, pid) {
                        Route::Local => Home::Me,
                        Route::Peer { node, addr } => Home::Peer { node, addr },
                        Route::Unavailable => {
                            let e = replication::not_leader(topic_name, pid, None);
                            unrouted.push((vec![(i, pid, m)], vec![Err(e)]));
                            continue;
                        }
                    },
                };
                match home {
                    Home::Me => by_home.entry(None).or_default().push((i, pid, m)),
                    Home::Peer { node, addr } => by_home
                        .entry(Some((node, addr)))
                        .or_default()
                        .push((i, pid, m)),
                    Home::Down { node } => {
                        results[i] = Some(Err(ApiError::unavailable(
                            "home_unavailable",
                            format!("partition {pid} of topic {topic_name:?} lives on agent {node}, which is down; it is unavailable until that agent returns"),
                            5,
                        )));
                    }
                    Home::Nobody => {
                        results[i] = Some(Err(ApiError::unavailable(
                            "home_unavailable",
                            "no broker agent in the mesh can store messages",
                            5,
                        )));
                    }
                }
            }
            let mut calls = Vec::new();
            let topic = &topic;
            for (home, batch) in by_home.into_iter().flat_map(|(home, batch)| {
                split_by_bytes(batch)
                    .into_iter()
                    .map(move |b| (home.clone(), b))
            }) {
                let repl = repl.clone();
                calls.push(async move {
                    let outcome = match (&home, &repl) {
                        (None, None) => self.publish_here(topic, &batch).await,
                        (None, Some(r)) => publish_replicated(r, topic, &batch).await,
                        (Some((node, addr)), _) => {
                            let outcome = self.forward(topic, node, *addr, &batch).await;
                            if let Some(r) = &repl {
                                for ((_, pid, _), o) in batch.iter().zip(&outcome) {
                                    match o {
                                        Ok(_) => r.note_answer(&topic.name, *pid, node, true),
                                        Err(e) if e.code == "home_unavailable" => {
                                            r.suspect(node);
                                            r.note_answer(&topic.name, *pid, node, false)
                                        }
                                        Err(e) if retryable(e) => {
                                            r.note_answer(&topic.name, *pid, node, false)
                                        }
                                        Err(_) => {}
                                    }
                                }
                            }
                            outcome
                        }
                    };
                    (batch, outcome)
                });
            }
            let mut answered = join_all(calls).await;
            answered.extend(unrouted);
            let retry_allowed = Instant::now() < deadline && !self.stopping.load(Ordering::Acquire);
            for (batch, outcome) in answered {
                for ((i, pid, m), r) in batch.into_iter().zip(outcome) {
                    // A replicated partition's leader that does not answer is
                    // replaced by an election: try again (a message it stored
                    // before dying may be stored twice; `Shoal-Id` dedupes it).
                    let again = |e: &ApiError| {
                        retryable(e) || (repl.is_some() && e.code == "home_unavailable")
                    };
                    match r {
                        Err(e) if retry_allowed && again(&e) => todo.push((i, pid, m)),
                        r => results[i] = Some(r),
                    }
                }
            }
            if todo.is_empty() {
                break;
            }
            tokio::time::sleep(MOVE_RETRY_STEP).await;
        }
        let replicated = repl.is_some();
        Ok(results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(ApiError::internal("publish lost a result"))))
            .map(|r| match r {
                // The leader that did not answer is being replaced: for the
                // app it is the same as no leader (one code, whatever the timing).
                Err(e) if replicated && e.code == "home_unavailable" => Err(ApiError::unavailable(
                    "not_leader",
                    format!("no leader of this partition of topic {topic_name:?} answered within the retry window ({})", e.message),
                    1,
                )),
                r => r,
            })
            .collect())
    }

    /// A message with a key or an id keeps its partition (order per key,
    /// dedupe per id). One with neither goes round robin over the partitions
    /// whose home is not down, so a crashed agent costs apps nothing but a
    /// share of the partitions; only with every home down does it go where
    /// the counter points (and get 503).
    fn choose_live_partition(&self, topic: &Topic, name: &str, m: &AppMessage) -> u32 {
        if m.key.is_some() || m.client_id {
            return choose_partition(topic, m);
        }
        let count = topic.partition_count().max(1);
        // A replicated partition is live when it has a leader that is up (as
        // far as this agent's replica knows); another, when its home is up.
        let repl = self.replicated(name);
        let live = |p: u32| match repl {
            Some(r) => r.has_live_leader(name, p) != Some(false),
            None => !matches!(self.home(name, p), Home::Down { .. }),
        };
        let first = choose_partition(topic, m);
        if live(first) {
            return first;
        }
        (1..count)
            .map(|_| choose_partition(topic, m))
            .find(|p| live(*p))
            .unwrap_or(first)
    }

    async fn publish_here(
        &self,
        topic: &Arc<Topic>,
        batch: &[Placed],
    ) -> Vec<Result<PublishOutcome, ApiError>> {
        if !self.joined.load(Ordering::Acquire) {
            return all_failed(batch, not_ready());
        }
        let placed = batch.iter().map(|(_, p, m)| (*p, m.clone())).collect();
        self.broker.append(topic, placed).await
    }

    /// Forwards a batch to its home (a replicated partition's leader).
    /// Forwards to one agent for one topic share its lane: up to
    /// [`FORWARD_CALLS_PER_LANE`] calls at once, each sent by a task of its
    /// own that keeps taking the forwards waiting (as many as fit one
    /// frame) until none is left. Many concurrent publishes so become a few
    /// frames and proposal rounds at the leader instead of one each, and a
    /// publisher that goes away never cancels a call carrying others.
    ///
    /// A forward that finds its lane idle makes the call itself, on its own
    /// task and with its own messages only (no task to start, no hand-back:
    /// what a publisher waiting for each answer pays), and then passes the
    /// lane's slot to the forwards that queued meanwhile.
    async fn forward(
        &self,
        topic: &Arc<Topic>,
        node: &str,
        addr: SocketAddr,
        batch: &[Placed],
    ) -> Outcomes {
        // Every forward holds a permit while it waits (`--max-forwards`).
        let Ok(_permit) = self.forwards.clone().try_acquire_owned() else {
            self.count_forward("busy", batch.len());
            let e = ApiError::unavailable(
                "home_busy",
                format!("too many publishes are waiting for home agents (agent {node} among them); retry shortly"),
                1,
            );
            return all_failed(batch, e);
        };
        let key = (addr, topic.name.clone());
        let idle = {
            let mut lanes = lock(&self.lanes);
            let lane = lanes.entry(key.clone()).or_default();
            let idle = lane.calls == 0 && lane.queue.is_empty();
            if idle {
                lane.calls = 1;
            }
            idle
        };
        if idle {
            let Some(router) = self.this.upgrade() else {
                return all_failed(batch, stopping());
            };
            // Dropped when the call ends or the publisher goes away.
            let _slot = LaneSlot {
                router,
                topic: topic.clone(),
                node: node.to_string(),
                key: Some(key),
            };
            return self.forward_call(topic, node, addr, batch).await;
        }
        let (done, rx) = tokio::sync::oneshot::channel();
        let start_call = {
            let mut lanes = lock(&self.lanes);
            let lane = lanes.entry(key.clone()).or_default();
            lane.queue.push(Queued {
                batch: batch.to_vec(),
                done,
            });
            let start = lane.calls < FORWARD_CALLS_PER_LANE;
            if start {
                lane.calls += 1;
            }
            start
        };
        if start_call {
            match self.this.upgrade() {
                Some(router) => {
                    let (topic, node) = (topic.clone(), node.to_string());
                    tokio::spawn(async move { router.run_lane(&topic, &node, key).await });
                }
                // The router is being dropped (the agent stops): no call.
                None => {
                    return all_failed(batch, stopping());
                }
            }
        }
        match rx.await {
            Ok(outcomes) => outcomes,
            Err(_) => {
                let e = ApiError::internal("a forward to the partition's home was lost");
                all_failed(batch, e)
            }
        }
    }

    /// Gives up a lane's call slot: to a task that sends the forwards that
    /// queued meanwhile, or, with none, the lane has one call fewer.
    fn release_slot(self: Arc<Self>, topic: Arc<Topic>, node: String, key: LaneKey) {
        if free_slot_if_idle(&mut lock(&self.lanes), &key) {
            return;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move { self.run_lane(&topic, &node, key).await });
            }
            // No runtime: the agent is stopping. The queued forwards are
            // answered as lost when their senders drop.
            Err(_) => {
                if let Some(lane) = lock(&self.lanes).get_mut(&key) {
                    lane.calls = lane.calls.saturating_sub(1);
                    lane.queue.clear();
                }
            }
        }
    }

    /// One call slot of a lane: sends the forwards waiting, together, until
    /// none is left.
    async fn run_lane(&self, topic: &Arc<Topic>, node: &str, key: LaneKey) {
        loop {
            let jobs: Vec<Queued> = {
                let mut lanes = lock(&self.lanes);
                if free_slot_if_idle(&mut lanes, &key) {
                    return;
                }
                let Some(lane) = lanes.get_mut(&key) else {
                    return;
                };
                let mut bytes = 0usize;
                let take = lane
                    .queue
                    .iter()
                    .take_while(|q| {
                        bytes += q.batch.iter().map(frame_bytes).sum::<usize>();
                        bytes <= FORWARD_FRAME_BYTES
                    })
                    .count()
                    .max(1);
                lane.queue.drain(..take).collect()
            };
            // Publishers that went away meanwhile are left out.
            let jobs: Vec<Queued> = jobs.into_iter().filter(|q| !q.done.is_closed()).collect();
            if jobs.is_empty() {
                continue;
            }
            let combined: Vec<Placed> = jobs.iter().flat_map(|q| q.batch.iter().cloned()).collect();
            let mut outcomes = self
                .forward_call(topic, node, key.0, &combined)
                .await
                .into_iter();
            for q in jobs {
                let mine: Outcomes = outcomes.by_ref().take(q.batch.len()).collect();
                let _ = q.done.send(mine);
            }
        }
    }

    async fn forward_call(
        &self,
        topic: &Arc<Topic>,
        node: &str,
        addr: SocketAddr,
        batch: &[Placed],
    ) -> Outcomes {
        let started = Instant::now();
        let mut entries = Vec::with_capacity(batch.len());
        let mut encoded: Vec<Option<ApiError>> = Vec::with_capacity(batch.len());
        for (_, pid, m) in batch {
            match m.encode() {
                Ok(data) => {
                    entries.push(PublishEntry {
                        partition: *pid,
                        message: data.to_vec(),
                    });
                    encoded.push(None);
                }
                Err(what) => encoded.push(Some(ApiError::bad_request(
                    "invalid_message",
                    format!("message {what} is too long"),
                ))),
            }
        }
        let name = topic.name.to_string();
        let timeout = if self.replicated(&topic.name).is_some() {
            REPLICATED_FORWARD_TIMEOUT
        } else {
            FORWARD_TIMEOUT
        };
        let answer = self
            .mesh
            .call(addr, timeout, |req| Message::Publish {
                req,
                topic: name,
                entries,
            })
            .await;
        self.metrics
            .forward_latency
            .observe(started.elapsed().as_secs_f64());
        let mut stored = match answer {
            Ok(Message::Published { results, .. }) => results.into_iter(),
            Ok(Message::Failed { error, .. }) => {
                let e = api_error(error);
                self.count_forward(forward_outcome(&e), batch.len());
                return all_failed(batch, e);
            }
            Ok(_) => {
                return all_failed(
                    batch,
                    ApiError::internal("unexpected answer from the home agent"),
                )
            }
            Err(e) => {
                self.count_forward("unreachable", batch.len());
                let err = call_error(node, &e);
                return all_failed(batch, err);
            }
        };
        let mut out = Vec::with_capacity(batch.len());
        for ((_, _, m), bad) in batch.iter().zip(encoded) {
            if let Some(e) = bad {
                out.push(Err(e));
                continue;
            }
            out.push(match stored.next() {
                Some(PublishResult::Stored {
                    partition,
                    offset,
                    duplicate,
                }) => {
                    self.count_forward("stored", 1);
                    Ok(PublishOutcome {
                        topic: topic.name.to_string(),
                        partition,
                        offset,
                        id: m.id.clone(),
                        duplicate,
                    })
                }
                Some(PublishResult::Failed(w)) => {
                    let e = api_error(w);
                    self.count_forward(forward_outcome(&e), 1);
                    Err(e)
                }
                None => Err(ApiError::internal(
                    "the home agent answered too few results",
                )),
            });
        }
        out
    }

    fn count_forward(&self, outcome: &'static str, n: usize) {
        self.metrics
            .forwarded
            .get_or_create(&crate::metrics::OutcomeLabel { outcome })
            .inc_by(n as u64);
    }

    pub(super) fn serve_publish(
        self: Arc<Self>,
        topic: String,
        entries: Vec<PublishEntry>,
        reply: Replier,
        req: u64,
    ) {
        tokio::spawn(async move {
            let fail = |e: ApiError| PublishResult::Failed(wire_error(&e));
            let Some(t) = self.broker.topic(&topic) else {
                let e = ApiError::unavailable(
                    "topic_unknown",
                    format!("topic {topic:?} is not known here yet"),
                    1,
                );
                reply.send(publish_refused(req, &entries, &e));
                return;
            };
            let repl = self.replicated(&topic).cloned();
            let mut results: Vec<Option<PublishResult>> = Vec::with_capacity(entries.len());
            let mut placed = Vec::with_capacity(entries.len());
            for e in entries {
                if repl.is_none() && self.home(&topic, e.partition) != Home::Me {
                    results.push(Some(fail(crate::broker::not_home(&topic, e.partition))));
                    continue;
                }
                match AppMessage::decode(&Bytes::from(e.message)) {
                    Ok(m) => {
                        results.push(None);
                        placed.push((e.partition, m));
                    }
                    Err(err) => {
                        self.count_invalid("undecodable_message");
                        results.push(Some(fail(ApiError::bad_request(
                            "invalid_message",
                            format!("undecodable forwarded message: {err}"),
                        ))))
                    }
                }
            }
            let stored = if placed.is_empty() {
                Vec::new()
            } else if let Some(r) = &repl {
                let batch: Vec<Placed> = placed.into_iter().map(|(p, m)| (0, p, m)).collect();
                publish_replicated(r, &t, &batch).await
            } else {
                self.broker.append(&t, placed).await
            };
            let mut stored = stored.into_iter();
            let results = results
                .into_iter()
                .map(|r| {
                    r.unwrap_or_else(|| match stored.next() {
                        Some(Ok(o)) => PublishResult::Stored {
                            partition: o.partition,
                            offset: o.offset,
                            duplicate: o.duplicate,
                        },
                        Some(Err(e)) => fail(e),
                        None => fail(ApiError::internal("missing result")),
                    })
                })
                .collect();
            reply.send(Message::Published { req, results });
        });
    }
}

/// Bytes of messages per forwarded publish frame: big batches go in several,
/// well under the frame limit.
const FORWARD_FRAME_BYTES: usize = 8 << 20;

/// What a message takes of a forward frame: its payload and room for its
/// headers and framing.
fn frame_bytes(placed: &Placed) -> usize {
    placed.2.payload.len() + 512
}

/// Splits messages bound for one home into batches that each fit a frame.
fn split_by_bytes(batch: Vec<Placed>) -> Vec<Vec<Placed>> {
    let mut out = vec![Vec::new()];
    let mut bytes = 0usize;
    for placed in batch {
        let size = frame_bytes(&placed);
        if bytes + size > FORWARD_FRAME_BYTES && out.last().is_some_and(|b| !b.is_empty()) {
            out.push(Vec::new());
            bytes = 0;
        }
        bytes += size;
        if let Some(last) = out.last_mut() {
            last.push(placed);
        }
    }
    out
}

/// The answer to a forwarded publish refused as a whole: `e` for every entry.
pub(super) fn publish_refused(req: u64, entries: &[PublishEntry], e: &ApiError) -> Message {
    let e = wire_error(e);
    Message::Published {
        req,
        results: entries
            .iter()
            .map(|_| PublishResult::Failed(e.clone()))
            .collect(),
    }
}

/// The same error for every message of `batch`.
fn all_failed(batch: &[Placed], e: ApiError) -> Outcomes {
    batch.iter().map(|_| Err(e.clone())).collect()
}
