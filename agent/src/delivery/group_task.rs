//! One consumer group's task: reads the topic's partitions (here or at
//! their home agents), pushes to the app, answers long polls and streams,
//! applies acks and dead-letters, and commits offsets.

use super::{
    build_push, record_delivery, start_offset, AckResult, AppClient, Command, PushOutcome,
    RouterCell, Subscriptions, DEAD_LETTER_STATUS,
};
use crate::broker::Broker;
use crate::error::ApiError;
use crate::group::{AckId, DeadLetter, Delivery, GroupCore, FETCH_BYTES};
use crate::message::{AttrValue, Message};
use crate::metrics::{Metrics, Mode, ReasonLabels};
use crate::router::{ReadAt, Router};
use crate::subscription::StartPosition;
use crate::topic::Topic;
use bytes::Bytes;
use http_body_util::BodyExt;
use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

/// Wait before retrying a dead letter that could not be stored.
const DEAD_LETTER_RETRY: Duration = Duration::from_secs(1);
/// Pause before fetching again from a home agent that answered with an error.
const REMOTE_FETCH_RETRY: Duration = Duration::from_millis(250);
/// Wait before asking again a leader that refused this agent's namespace.
const FORBIDDEN_FETCH_RETRY: Duration = Duration::from_secs(5);

/// A long poll waiting for deliveries.
struct Waiter {
    member: Arc<str>,
    max: usize,
    deadline: Instant,
    reply: oneshot::Sender<Vec<Delivery>>,
}

/// The task of one consumer group of one topic, fed by [`Command`]s.
pub(super) struct GroupTask {
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
    /// A group's task, not started yet; `(tx, rx)` is its command queue.
    pub(super) fn new(
        group: Arc<str>,
        topic: Arc<Topic>,
        start: StartPosition,
        (tx, rx): (mpsc::Sender<Command>, mpsc::Receiver<Command>),
        subs: &Subscriptions,
    ) -> GroupTask {
        GroupTask {
            group,
            topic,
            start,
            core: GroupCore::new(),
            push_paths: HashMap::new(),
            dead_letter_topics: HashMap::new(),
            waiters: VecDeque::new(),
            rx,
            tx,
            broker: subs.broker.clone(),
            metrics: subs.metrics.clone(),
            client: subs.client.clone(),
            app_port: subs.app_port,
            stopping: subs.stopping.subscribe(),
            reported_in_flight: 0,
            pushes_running: 0,
            router: subs.router.clone(),
            remote_in_flight: HashSet::new(),
            forbidden: HashSet::new(),
            starting: BTreeSet::new(),
            retry_at: HashMap::new(),
        }
    }

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

    pub(super) async fn run(mut self) {
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
