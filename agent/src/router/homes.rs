//! Homes of topics with one copy (`replicas: 1`) and their hand-off: which
//! agent is home to each partition, and how a partition's log and committed
//! offsets move to a new home when membership changes. Replicated topics
//! (Raft groups, [`crate::replication`]) do not use this hand-off.

use super::{join_all, lock, wire_error, Home, Inner, Router, SHORT_CALL};
use crate::error::ApiError;
use crate::mesh::Replier;
use crate::metrics::HandoffLabels;
use crate::topic::{Partition, Role, Topic, TOPIC_NAMESPACE};
use bytes::Bytes;
use shoal_cluster::membership::Liveness;
use shoal_cluster::placement::{self, Assignment, Member, OwnedPartitionKey, PartitionKey};
use shoal_proto::{Message, WireEntry};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Bytes of entries per hand-off chunk.
pub const CHUNK_BYTES: usize = 4 << 20;
/// Longest one hand-off chunk may take to be stored by the new home.
pub const HANDOFF_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause before asking a previous home again for a partition.
pub const ACQUIRE_RETRY: Duration = Duration::from_millis(200);

/// How a hand-off ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum HandOff {
    /// The new home holds the partition now (or already held a longer copy).
    Done,
    /// The new home is stopping too: the partition stays here.
    PeerStopping,
    /// Not delivered: the partition stays here.
    Failed,
}

impl Router {
    /// Recomputes the balanced homes of every partition in the catalog over
    /// the current members. Every agent with the same members and catalog
    /// computes the same homes.
    pub(super) fn refresh_assignment(&self) {
        let mut keys = Vec::new();
        for t in self.broker.topics() {
            for p in 0..t.partition_count() {
                keys.push(OwnedPartitionKey::new(TOPIC_NAMESPACE, &*t.name, p));
            }
        }
        let members = lock(&self.inner).members.clone();
        let without: Vec<Member> = members
            .iter()
            .filter(|m| m.id != self.me)
            .cloned()
            .collect();
        let all = Assignment::compute(&members, &keys, placement::DEFAULT_LOAD_EPSILON);
        let rest = Assignment::compute(&without, &keys, placement::DEFAULT_LOAD_EPSILON);
        let mut inner = lock(&self.inner);
        // Members changed meanwhile: the next refresh is on its way.
        if inner.members == members && inner.assignment != all {
            let mut moved = Vec::new();
            for (key, home) in all.iter() {
                if let Some(before) = inner.assignment.home(&key) {
                    if before != home {
                        moved.push(((key.topic.to_string(), key.partition), before.to_string()));
                    }
                }
            }
            inner.previous.extend(moved);
            inner.assignment = all;
            inner.assignment_without_me = rest;
        }
    }

    fn key<'a>(&'a self, topic: &'a str, partition: u32) -> PartitionKey<'a> {
        PartitionKey {
            namespace: TOPIC_NAMESPACE,
            topic,
            partition,
        }
    }

    /// The home of a partition as this agent sees it.
    pub fn home(&self, topic: &str, partition: u32) -> Home {
        let inner = lock(&self.inner);
        self.home_in(&inner, &inner.assignment, &inner.members, topic, partition)
    }

    /// The home by the balanced assignment; a partition the assignment does
    /// not know yet (a topic arriving right now) falls back to plain
    /// rendezvous hashing.
    fn home_in(
        &self,
        inner: &Inner,
        assignment: &Assignment,
        members: &[Member],
        topic: &str,
        partition: u32,
    ) -> Home {
        let key = self.key(topic, partition);
        let node = match assignment.home(&key) {
            Some(n) => n.to_string(),
            None => match placement::home(members, &key) {
                Some(m) => m.id.clone(),
                None => return Home::Nobody,
            },
        };
        if node == self.me {
            return Home::Me;
        }
        match inner.known.get(&node) {
            Some(k) if k.state != Liveness::Down => Home::Peer { addr: k.addr, node },
            _ => Home::Down { node },
        }
    }

    /// The home a partition would have without this agent (its previous home
    /// when this agent just joined, its next when it leaves).
    fn home_without_me(&self, topic: &str, partition: u32) -> Home {
        let inner = lock(&self.inner);
        let members: Vec<Member> = inner
            .members
            .iter()
            .filter(|m| m.id != self.me)
            .cloned()
            .collect();
        self.home_in(
            &inner,
            &inner.assignment_without_me,
            &members,
            topic,
            partition,
        )
    }

    fn addr_of(&self, node: &str) -> Option<SocketAddr> {
        lock(&self.inner).known.get(node).map(|k| k.addr)
    }

    /// Brings every partition's role in line with placement: partitions this
    /// agent no longer homes retire; new ones are acquired from their
    /// previous home.
    pub(super) fn reconcile(self: &Arc<Self>) {
        if !self.joined.load(Ordering::Acquire) || self.stopping.load(Ordering::Acquire) {
            return;
        }
        let mut homed = 0i64;
        let mut unavailable = 0i64;
        for topic in self.broker.topics() {
            if self.replicated(&topic.name).is_some() {
                // Raft groups decide who serves these; the local copy stays unused.
                for p in topic.partitions() {
                    p.set_role(Role::Idle);
                }
                continue;
            }
            for p in topic.partitions() {
                let home = self.home(&topic.name, p.id);
                let mine = home == Home::Me;
                homed += i64::from(mine);
                unavailable += i64::from(matches!(home, Home::Down { .. } | Home::Nobody));
                match (mine, p.role()) {
                    (true, Role::Retired) => {
                        // Even a copy held here is checked with every peer
                        // first: another may hold a longer one.
                        if p.is_ephemeral() {
                            p.swap_role(Role::Retired, Role::Serving);
                        } else if p.swap_role(Role::Retired, Role::Acquiring) {
                            tokio::spawn(self.clone().acquire(topic.clone(), p.clone()));
                        }
                    }
                    (true, Role::Idle) => {
                        if p.is_ephemeral() {
                            p.swap_role(Role::Idle, Role::Serving);
                        } else if p.swap_role(Role::Idle, Role::Acquiring) {
                            tokio::spawn(self.clone().acquire(topic.clone(), p.clone()));
                        }
                    }
                    (false, Role::Serving) => {
                        let to = if p.is_ephemeral() {
                            Role::Idle
                        } else {
                            Role::Retired
                        };
                        p.swap_role(Role::Serving, to);
                    }
                    _ => {}
                }
            }
        }
        self.metrics.partitions_homed.set(homed);
        self.metrics.partitions_unavailable.set(unavailable);
    }

    /// Asks the previous home for a partition this agent now homes, until it
    /// hands it over, says it holds nothing, or this agent is home no more.
    async fn acquire(self: Arc<Self>, topic: Arc<Topic>, p: Arc<Partition>) {
        loop {
            if p.role() != Role::Acquiring || self.stopping.load(Ordering::Acquire) {
                return;
            }
            if self.home(&topic.name, p.id) != Home::Me {
                p.swap_role(Role::Acquiring, Role::Idle);
                return;
            }
            // The partition's previous home crashed with it: wait for its return.
            if let Some(node) = self.previous_home_down(&topic.name, p.id) {
                tracing::debug!(topic = %topic.name, partition = p.id, previous = %node, "waiting for the previous home to return");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            // Bounded-load placement may move a partition between any two
            // agents, so every live peer is asked: the one holding the
            // partition hands it over, the others answer that they hold nothing.
            let peers: Vec<(String, SocketAddr)> = {
                let inner = lock(&self.inner);
                inner
                    .known
                    .iter()
                    .filter(|(n, k)| {
                        **n != self.me
                            && k.state != Liveness::Down
                            && !inner.departed.contains_key(*n)
                    })
                    .map(|(n, k)| (n.clone(), k.addr))
                    .collect()
            };
            let mesh = &self.mesh;
            let asks = peers.iter().map(|(node, addr)| {
                let (name, pid) = (topic.name.to_string(), p.id);
                async move {
                    let answer = mesh
                        .call(*addr, HANDOFF_TIMEOUT * 4, |req| Message::HandoffRequest {
                            req,
                            topic: name,
                            partition: pid,
                        })
                        .await;
                    match answer {
                        Ok(Message::HandoffAck { result: Ok(()), .. }) => true,
                        Ok(Message::HandoffAck { result: Err(e), .. }) => {
                            tracing::debug!(partition = pid, peer = %node, error = %e.message, "peer not ready to hand off");
                            false
                        }
                        Ok(_) => false,
                        Err(e) => {
                            tracing::debug!(partition = pid, peer = %node, error = %e, "cannot ask a peer for a partition");
                            false
                        }
                    }
                }
            });
            let answers = join_all(asks.collect()).await;
            if answers.iter().all(|ok| *ok) {
                // Recorded before serving, so a crash from here on keeps it.
                p.set_holder(true);
                if p.swap_role(Role::Acquiring, Role::Serving) {
                    tracing::info!(topic = %topic.name, partition = p.id, "serving a partition");
                    self.bump();
                }
                return;
            }
            tokio::time::sleep(ACQUIRE_RETRY).await;
        }
    }

    /// The partition's home before the last placement change, if that agent is down now.
    fn previous_home_down(&self, topic: &str, partition: u32) -> Option<String> {
        let inner = lock(&self.inner);
        // The home before the last change seen here, and the home the others
        // give it without this agent (its previous home when this agent just
        // joined or returned).
        let candidates = [
            inner.previous.get(&(topic.to_string(), partition)).cloned(),
            inner
                .assignment_without_me
                .home(&self.key(topic, partition))
                .map(str::to_string),
        ];
        candidates.into_iter().flatten().find(|node| {
            *node != self.me
                && !inner.departed.contains_key(node)
                && inner
                    .known
                    .get(node)
                    .is_some_and(|k| k.state == Liveness::Down)
        })
    }

    /// Seals a partition this agent holds the truth of and sends its log and
    /// committed offsets to `node`. On success this agent's copy is idle; so
    /// it is when `node` answers that it holds a longer copy already.
    async fn hand_off(&self, topic: &Arc<Topic>, p: &Arc<Partition>, node: &str) -> bool {
        self.hand_off_to(topic, p, node).await == HandOff::Done
    }

    /// [`Router::hand_off`], telling a failure from a new home that is
    /// stopping too (the whole mesh stops: the partition stays here).
    async fn hand_off_to(&self, topic: &Arc<Topic>, p: &Arc<Partition>, node: &str) -> HandOff {
        let Some(addr) = self.addr_of(node) else {
            return HandOff::Failed;
        };
        let role = p.role();
        if role != Role::Serving && role != Role::Retired {
            return HandOff::Failed;
        }
        p.set_role(Role::Retired);
        let sent = self.send_partition(topic, p, addr).await;
        if sent == Err(Some("stale_copy".to_string())) {
            p.swap_role(Role::Retired, Role::Idle);
            p.set_holder(false);
            tracing::warn!(topic = %topic.name, partition = p.id, to = %node, "the new home holds a longer copy; this agent's copy is dropped from the truth");
            return HandOff::Done;
        }
        if sent == Err(Some("shutting_down".to_string())) {
            // Not a failure: with the new home stopping too (the whole mesh
            // stops), the partition stays here, retired, until this agent
            // returns. Nothing is counted as a failed hand-off.
            tracing::info!(topic = %topic.name, partition = p.id, to = %node, "the next home is stopping too; the partition stays here");
            return HandOff::PeerStopping;
        }
        let ok = sent.is_ok();
        let labels = HandoffLabels {
            direction: "sent",
            outcome: if ok { "ok" } else { "failed" },
        };
        self.metrics.handoffs.get_or_create(&labels).inc();
        if ok {
            p.swap_role(Role::Retired, Role::Idle);
            p.set_holder(false);
            tracing::info!(topic = %topic.name, partition = p.id, to = %node, "handed off a partition");
        } else {
            tracing::warn!(topic = %topic.name, partition = p.id, to = %node, "hand-off failed; keeping the partition");
        }
        if ok {
            HandOff::Done
        } else {
            HandOff::Failed
        }
    }

    async fn send_partition(
        &self,
        topic: &Arc<Topic>,
        p: &Arc<Partition>,
        addr: SocketAddr,
    ) -> Result<(), Option<String>> {
        // The receiver must know the topic before its data.
        if let Some(msg) = self.topic_message(&topic.name) {
            if self.mesh.tell(addr, msg).await.is_err() {
                return Err(None);
            }
        }
        let Ok(end_index) = p.write_now() else {
            return Err(None);
        };
        let first_index = p.first_index();
        let mut next = first_index;
        let mut reset = true;
        loop {
            let entries = match p.read(next, usize::MAX, CHUNK_BYTES) {
                Ok(e) => e,
                Err(e) => {
                    tracing::error!(topic = %topic.name, partition = p.id, error = %e, "reading a partition to hand off failed");
                    return Err(None);
                }
            };
            let last =
                entries.is_empty() || entries.last().is_some_and(|e| e.index >= p.committed());
            if let Some(e) = entries.last() {
                next = e.index + 1;
            }
            let offsets: Vec<(String, u64)> = if last {
                lock(&p.offsets)
                    .committed
                    .iter()
                    .map(|(g, o)| (g.clone(), *o))
                    .collect()
            } else {
                Vec::new()
            };
            let wire: Vec<WireEntry> = entries
                .into_iter()
                .map(|e| WireEntry {
                    index: e.index,
                    timestamp_ms: e.timestamp_ms,
                    data: e.data.to_vec(),
                })
                .collect();
            let (name, pid) = (topic.name.to_string(), p.id);
            let answer = self
                .mesh
                .call(addr, HANDOFF_TIMEOUT, |req| Message::Handoff {
                    req,
                    topic: name,
                    partition: pid,
                    reset,
                    first_index,
                    end_index,
                    entries: wire,
                    offsets,
                    last,
                })
                .await;
            match answer {
                Ok(Message::HandoffAck { result: Ok(()), .. }) => {}
                Ok(Message::HandoffAck { result: Err(e), .. }) => {
                    // A home with a longer copy, or one stopping too, is
                    // reported by the caller in its own words.
                    if e.code != "stale_copy" && e.code != "shutting_down" {
                        tracing::warn!(error = %e.message, "the new home refused a hand-off chunk");
                    }
                    return Err(Some(e.code));
                }
                Ok(_) => return Err(None),
                Err(e) => {
                    tracing::warn!(error = %e, "hand-off chunk not delivered");
                    return Err(None);
                }
            }
            reset = false;
            if last {
                return Ok(());
            }
        }
    }

    /// Graceful stop: hands every partition this agent holds to its next
    /// home, then tells every member it leaves.
    pub async fn leave(&self) {
        self.stopping.store(true, Ordering::Release);
        if let Some(r) = self.replication.get() {
            let n = r.transfer_leadership();
            if n > 0 {
                tracing::info!(
                    groups = n,
                    "handing over leadership of replicated partitions before leaving"
                );
                let until = Instant::now() + Duration::from_secs(3);
                while r.leading() > 0 && Instant::now() < until {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        let mut moved = 0usize;
        let mut kept = 0usize;
        // Kept because their next home stops too: no failure of its own.
        let mut kept_for_stopping = 0usize;
        for topic in self.broker.topics() {
            if self.replicated(&topic.name).is_some() {
                continue;
            }
            for p in topic.partitions() {
                let role = p.role();
                if role != Role::Serving && role != Role::Retired && role != Role::Acquiring {
                    continue;
                }
                if role == Role::Acquiring {
                    p.set_role(Role::Idle);
                    continue;
                }
                if p.is_ephemeral() {
                    p.set_role(Role::Idle);
                    continue;
                }
                match self.home_without_me(&topic.name, p.id) {
                    Home::Peer { node, .. } => match self.hand_off_to(&topic, &p, &node).await {
                        HandOff::Done => moved += 1,
                        HandOff::PeerStopping => {
                            kept += 1;
                            kept_for_stopping += 1;
                        }
                        HandOff::Failed => kept += 1,
                    },
                    Home::Down { node } if self.mesh.went_down_while_stopping(&node) => {
                        // It stopped along with this agent: the whole mesh stops.
                        tracing::info!(topic = %topic.name, partition = p.id, next = %node, "the next home stopped too; the partition stays here");
                        p.set_role(Role::Retired);
                        kept += 1;
                        kept_for_stopping += 1;
                    }
                    Home::Down { node } => {
                        tracing::warn!(topic = %topic.name, partition = p.id, next = %node, "the next home is down; the partition stays here until this agent returns");
                        p.set_role(Role::Retired);
                        kept += 1;
                    }
                    Home::Nobody | Home::Me => {
                        // No other broker to hand to (the others left, or
                        // this is the last one): kept for this agent's return.
                        p.set_role(Role::Retired);
                        kept += 1;
                        kept_for_stopping += 1;
                    }
                }
            }
        }
        if moved > 0 {
            tracing::info!(partitions = moved, "handed off partitions before leaving");
        }
        if kept > 0 && kept == kept_for_stopping {
            // Every next home stops too (the whole mesh stops, as on Ctrl-C
            // of `shoal dev`): nothing is lost and nothing is wrong; each
            // agent keeps its partitions for its next start.
            tracing::info!(
                partitions = kept,
                "no running agent to hand partitions to (the others stop too, or left); keeping them for this agent's next start"
            );
            return;
        }
        if kept > 0 {
            // Saying "leaving" would let others serve these partitions
            // without their data: stop as if crashed instead, so they wait
            // (503) until this agent returns.
            tracing::warn!(
                partitions = kept,
                "some partitions could not be handed off; stopping without leaving the placement"
            );
            return;
        }
        let peers: Vec<SocketAddr> = lock(&self.inner)
            .known
            .iter()
            .filter(|(n, k)| **n != self.me && k.state != Liveness::Down)
            .map(|(_, k)| k.addr)
            .collect();
        for addr in peers {
            let msg = Message::Leaving {
                node: self.me.clone(),
            };
            let _ = tokio::time::timeout(SHORT_CALL, self.mesh.tell(addr, msg)).await;
        }
    }

    pub(super) fn serve_handoff_request(
        self: Arc<Self>,
        req: u64,
        from: SocketAddr,
        topic: String,
        partition: u32,
        reply: Replier,
    ) {
        tokio::spawn(async move {
            let result = async {
                // A topic or partition unknown here is one this agent holds nothing of.
                let Some(t) = self.broker.topic(&topic) else {
                    return Ok(());
                };
                let Some(p) = t.partition(partition) else {
                    return Ok(());
                };
                // Only the agent this agent's own view makes home may take
                // the partition, or hear that nothing is held here: until the
                // views agree, the answer is to wait.
                let requester = match self.home(&topic, partition) {
                    Home::Peer { node, addr } if addr == from => node,
                    _ => {
                        return Err(ApiError::unavailable(
                            "not_ready",
                            "this agent does not see the requester as the partition's home yet",
                            1,
                        ))
                    }
                };
                match p.role() {
                    Role::Idle => return Ok(()),
                    Role::Acquiring => {
                        return Err(ApiError::unavailable(
                            "not_ready",
                            "this agent is still acquiring the partition",
                            1,
                        ))
                    }
                    Role::Serving | Role::Retired => {}
                }
                if self.hand_off(&t, &p, &requester).await {
                    Ok(())
                } else {
                    Err(ApiError::unavailable(
                        "not_ready",
                        "the hand-off failed; retry",
                        1,
                    ))
                }
            }
            .await;
            reply.send(Message::HandoffAck {
                req,
                result: result.map_err(|e| wire_error(&e)),
            });
        });
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn serve_handoff(
        self: Arc<Self>,
        req: u64,
        topic: String,
        partition: u32,
        reset: bool,
        (first_index, end_index): (u64, u64),
        entries: Vec<WireEntry>,
        offsets: Vec<(String, u64)>,
        last: bool,
        reply: Replier,
    ) {
        tokio::task::spawn_blocking(move || {
            let result = (|| {
                let t = self
                    .broker
                    .topic(&topic)
                    .ok_or_else(|| ApiError::unavailable("topic_unknown", "unknown topic", 1))?;
                let p = t.partition(partition).ok_or_else(|| {
                    ApiError::unavailable("partition_unknown", "unknown partition", 1)
                })?;
                if self.stopping.load(Ordering::Acquire) {
                    return Err(ApiError::unavailable(
                        "shutting_down",
                        "this agent is stopping and takes no partitions",
                        1,
                    ));
                }
                // Logs only grow, so of two copies the longer is the newer: a
                // shorter one (say, an empty copy an agent served while alone)
                // never replaces it.
                let local_end = p.committed();
                if reset
                    && (end_index < local_end
                        || (p.role() == Role::Serving && end_index == local_end))
                {
                    return Err(ApiError::conflict(
                        "stale_copy",
                        format!("this agent holds a longer copy (to offset {local_end}) than the one offered (to {end_index})"),
                    ));
                }
                if p.role() == Role::Serving {
                    tracing::error!(topic = %topic, partition, local_end, end_index, "two agents hold diverging copies of a partition; keeping this one");
                    return Err(ApiError::conflict(
                        "already_serving",
                        "this agent already serves the partition",
                    ));
                }
                let entries = entries
                    .into_iter()
                    .map(|e| shoal_storage::Entry {
                        index: e.index,
                        term: 0,
                        timestamp_ms: e.timestamp_ms,
                        data: Bytes::from(e.data),
                    })
                    .collect();
                self.broker
                    .apply_handoff(&t, &p, reset, first_index, entries)
                    .map_err(|e| ApiError::internal(e.to_string()))?;
                if last {
                    {
                        let mut o = lock(&p.offsets);
                        o.committed = offsets.into_iter().collect();
                        o.dirty = true;
                    }
                    // The truth lives here now: serve it if home, else hold
                    // it. A home still acquiring serves once every peer has
                    // answered, so a longer copy elsewhere can still win.
                    p.set_holder(true);
                    let role = if p.role() == Role::Acquiring {
                        Role::Acquiring
                    } else if self.home(&topic, partition) == Home::Me {
                        Role::Serving
                    } else {
                        Role::Retired
                    };
                    p.set_role(role);
                    self.metrics
                        .handoffs
                        .get_or_create(&HandoffLabels {
                            direction: "received",
                            outcome: "ok",
                        })
                        .inc();
                    tracing::info!(topic = %topic, partition, role = role.as_str(), "received a partition");
                }
                Ok(())
            })();
            if let Err(e) = &result {
                // Refusing because this agent stops too is expected when the
                // whole mesh stops: the sender keeps the partition.
                if e.code == "shutting_down" {
                    tracing::debug!(topic = %topic, partition, "refused a hand-off chunk: stopping");
                } else {
                    tracing::warn!(topic = %topic, partition, error = %e.message, "refused a hand-off chunk");
                }
                self.metrics
                    .handoffs
                    .get_or_create(&HandoffLabels {
                        direction: "received",
                        outcome: "failed",
                    })
                    .inc();
            }
            reply.send(Message::HandoffAck {
                req,
                result: result.map_err(|e| wire_error(&e)),
            });
            self.bump();
        });
    }
}
