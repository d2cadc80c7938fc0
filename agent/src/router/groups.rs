//! Consumer groups across agents: which partitions this agent's members
//! read, fetching from a partition's home, committing offsets, and sharing
//! subscriptions and the topic catalog with peers.

use super::{
    api_error, call_error, lock, not_home_here, wire_error, Home, Router, FETCH_ANSWER_BYTES,
    FETCH_WAIT, REPLICATED_FORWARD_TIMEOUT, SHORT_CALL,
};
use crate::error::ApiError;
use crate::mesh::Replier;
use crate::replication::{self, Route};
use crate::subscription::StartPosition;
use crate::topic::Role;
use shoal_cluster::membership::Liveness;
use shoal_proto::{FetchedBatch, Message, SubscriberRef, WireEntry};
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

impl Router {
    /// The partitions of `topic` this agent's members of `group` read: the
    /// topic's partitions dealt in turn to the agents with members in the
    /// group, in node-name order, so every agent computes the same split.
    pub fn assigned(&self, topic: &str, group: &str, partitions: u32) -> Vec<u32> {
        let mut nodes: BTreeSet<String> = BTreeSet::new();
        nodes.insert(self.me.clone());
        {
            let inner = lock(&self.inner);
            for (node, r) in &inner.remote_subs {
                let alive = inner
                    .known
                    .get(node)
                    .is_some_and(|k| k.state != Liveness::Down)
                    && !inner.departed.contains_key(node);
                if alive
                    && self.may_read(&r.namespace, topic)
                    && r.subs.iter().any(|s| s.topic == topic && s.group == group)
                {
                    nodes.insert(node.clone());
                }
            }
        }
        let nodes: Vec<String> = nodes.into_iter().collect();
        let Some(me) = nodes.iter().position(|n| *n == self.me) else {
            return Vec::new();
        };
        (0..partitions)
            .filter(|p| *p as usize % nodes.len() == me)
            .collect()
    }

    /// Reads a partition at its home for a consumer group.
    pub async fn fetch(
        &self,
        topic: &str,
        partition: u32,
        group: &str,
        start: &StartPosition,
        from: Option<u64>,
        max: usize,
    ) -> Result<FetchedBatch, ApiError> {
        let target = match self.replicated(topic) {
            None => self.home(topic, partition),
            Some(r) => match r.route(topic, partition) {
                Route::Local => {
                    return r
                        .fetch_local(topic, partition, group, start, from, max, FETCH_WAIT)
                        .await
                }
                Route::Peer { node, addr } => Home::Peer { node, addr },
                Route::Unavailable => {
                    return Err(replication::not_leader(topic, partition, None));
                }
            },
        };
        let (node, addr) = match target {
            Home::Peer { node, addr } => (node, addr),
            Home::Me => return Err(not_home_here()),
            Home::Down { node } => {
                return Err(ApiError::unavailable(
                    "home_unavailable",
                    format!("agent {node} is down"),
                    5,
                ))
            }
            Home::Nobody => {
                return Err(ApiError::unavailable(
                    "home_unavailable",
                    "no broker agent",
                    5,
                ))
            }
        };
        let start = serde_json::to_string(start).unwrap_or_default();
        let (t, g) = (topic.to_string(), group.to_string());
        // A replicated partition's leader that does not answer within its
        // long poll and a little more has likely died: another is elected.
        let timeout = if self.replicated(topic).is_some() {
            FETCH_WAIT + REPLICATED_FORWARD_TIMEOUT
        } else {
            FETCH_WAIT + SHORT_CALL
        };
        let answer = self
            .mesh
            .call(addr, timeout, |req| Message::Fetch {
                req,
                topic: t,
                partition,
                group: g,
                start,
                from,
                max: u32::try_from(max).unwrap_or(u32::MAX),
                wait_ms: FETCH_WAIT.as_millis() as u32,
            })
            .await;
        if let Some(r) = self.replicated(topic) {
            // A leader too busy to answer (`peer_busy`) is still the leader.
            let ok = matches!(&answer, Ok(Message::Fetched { result: Ok(_), .. }))
                || matches!(&answer, Ok(Message::Fetched { result: Err(e), .. } | Message::Failed { error: e, .. }) if e.code == "peer_busy");
            if answer.is_err() {
                r.suspect(&node);
            }
            r.note_answer(topic, partition, &node, ok);
        }
        match answer {
            Ok(Message::Fetched { result, .. }) => result.map_err(api_error),
            Ok(Message::Failed { error, .. }) => Err(api_error(error)),
            Ok(_) => Err(ApiError::internal("unexpected answer to a fetch")),
            Err(e) => Err(call_error(&node, &e)),
        }
    }

    /// Consumer groups reading `topic` anywhere in the mesh.
    pub fn groups_of(&self, topic: &str) -> Vec<String> {
        let mut groups = self.subs().map(|s| s.groups_of(topic)).unwrap_or_default();
        {
            let inner = lock(&self.inner);
            for r in inner.remote_subs.values() {
                if !self.may_read(&r.namespace, topic) {
                    continue;
                }
                groups.extend(
                    r.subs
                        .iter()
                        .filter(|s| s.topic == topic)
                        .map(|s| s.group.clone()),
                );
            }
        }
        groups.sort();
        groups.dedup();
        groups
    }

    /// Tells a partition's home where a consumer group resumes.
    pub fn commit(self: &Arc<Self>, topic: &str, partition: u32, group: &str, next: u64) {
        if let Some(r) = self.replicated(topic) {
            r.commit(topic, partition, group, next);
            return;
        }
        let Home::Peer { addr, .. } = self.home(topic, partition) else {
            return;
        };
        let msg = Message::Commit {
            topic: topic.to_string(),
            partition,
            group: group.to_string(),
            next,
        };
        let router = self.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(SHORT_CALL, router.mesh.tell(addr, msg)).await;
        });
    }

    /// Tells every member which consumer groups this agent has members in.
    pub fn share_subscriptions(self: &Arc<Self>) {
        let msg = self.subscribers_message();
        for addr in self.peer_addrs() {
            let router = self.clone();
            let msg = msg.clone();
            tokio::spawn(async move {
                let _ = tokio::time::timeout(SHORT_CALL, router.mesh.tell(addr, msg)).await;
            });
        }
        self.bump();
    }

    pub(super) fn subscribers_message(&self) -> Message {
        let mut subs: Vec<SubscriberRef> = self
            .subs()
            .map(|s| s.list())
            .unwrap_or_default()
            .into_iter()
            .map(|s| SubscriberRef {
                topic: s.topic,
                group: s.group,
                push: s.push_path.is_some(),
            })
            .collect();
        subs.sort();
        subs.dedup();
        Message::Subscribers {
            node: self.me.clone(),
            subs,
        }
    }

    fn peer_addrs(&self) -> Vec<SocketAddr> {
        lock(&self.inner)
            .known
            .iter()
            .filter(|(n, k)| **n != self.me && k.state != Liveness::Down)
            .map(|(_, k)| k.addr)
            .collect()
    }

    pub(super) fn topic_message(&self, name: &str) -> Option<Message> {
        let topic = self.broker.topic(name)?;
        let config = serde_json::to_string(&topic.config()).ok()?;
        Some(Message::Topic {
            name: name.to_string(),
            config,
            version: topic.version.load(Ordering::Relaxed),
        })
    }

    pub(super) fn share_topic(self: &Arc<Self>, name: &str) {
        let Some(msg) = self.topic_message(name) else {
            return;
        };
        for addr in self.peer_addrs() {
            let router = self.clone();
            let msg = msg.clone();
            tokio::spawn(async move {
                let _ = tokio::time::timeout(SHORT_CALL, router.mesh.tell(addr, msg)).await;
            });
        }
        self.refresh_assignment();
        self.reconcile();
        self.bump();
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn serve_fetch(
        self: Arc<Self>,
        req: u64,
        topic: String,
        partition: u32,
        group: String,
        start: String,
        from: Option<u64>,
        max: u32,
        wait_ms: u32,
        reply: Replier,
    ) {
        tokio::spawn(async move {
            let result = self
                .fetch_here(&topic, partition, &group, &start, from, max, wait_ms)
                .await
                .map_err(|e| wire_error(&e));
            self.metrics.fetches_served.inc();
            reply.send(Message::Fetched { req, result });
        });
    }

    #[allow(clippy::too_many_arguments)]
    async fn fetch_here(
        &self,
        topic: &str,
        partition: u32,
        group: &str,
        start: &str,
        from: Option<u64>,
        max: u32,
        wait_ms: u32,
    ) -> Result<FetchedBatch, ApiError> {
        if let Some(r) = self.replicated(topic) {
            let start: StartPosition = serde_json::from_str(start).unwrap_or_default();
            let wait = Duration::from_millis(u64::from(wait_ms)).min(FETCH_WAIT);
            return r
                .fetch_local(topic, partition, group, &start, from, max as usize, wait)
                .await;
        }
        let t = self.broker.topic(topic).ok_or_else(|| {
            ApiError::unavailable(
                "topic_unknown",
                format!("topic {topic:?} is not known here yet"),
                1,
            )
        })?;
        let p = t.partition(partition).ok_or_else(|| {
            ApiError::unavailable("partition_unknown", "no such partition here yet", 1)
        })?;
        if p.role() != Role::Serving || self.home(topic, partition) != Home::Me {
            return Err(crate::broker::not_home(topic, partition));
        }
        let start_at = match from {
            // An ephemeral partition restarts its offsets when it moves: a
            // reader ahead of its end resumes at the end.
            Some(f) if p.is_ephemeral() && f > p.committed() + 1 => p.committed() + 1,
            Some(f) => f,
            None => {
                let start: StartPosition = serde_json::from_str(start).unwrap_or_default();
                crate::delivery::start_offset(&p, group, &start, false)
            }
        };
        let max = (max as usize).clamp(1, 4096);
        let mut changed = t.changed.subscribe();
        let deadline =
            tokio::time::Instant::now() + Duration::from_millis(u64::from(wait_ms)).min(FETCH_WAIT);
        loop {
            let entries = match p.read(start_at, max, FETCH_ANSWER_BYTES) {
                Ok(e) => e,
                // Gone (retention, or an ephemeral ring that moved on): the
                // answer says where the partition starts now, at once.
                Err(shoal_storage::StorageError::Compacted { .. }) => Vec::new(),
                Err(e) => return Err(ApiError::internal(format!("reading the partition: {e}"))),
            };
            if !entries.is_empty()
                || start_at < p.first_index()
                || tokio::time::Instant::now() >= deadline
                || p.role() != Role::Serving
            {
                return Ok(FetchedBatch {
                    start: start_at,
                    first_index: p.first_index(),
                    entries: entries
                        .into_iter()
                        .map(|e| WireEntry {
                            index: e.index,
                            timestamp_ms: e.timestamp_ms,
                            data: e.data.to_vec(),
                        })
                        .collect(),
                });
            }
            if tokio::time::timeout_at(deadline, changed.changed())
                .await
                .is_err()
            {
                continue;
            }
        }
    }
}
