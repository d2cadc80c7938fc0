//! Publishing to, reading from and committing offsets on replicated
//! partitions: where each goes (the leader as far as known), and how the
//! leader answers once entries commit.

use super::{lock, not_leader, Core, Hint, Replication, Route, Waiter, PROPOSAL_TIMEOUT};
use crate::broker::PublishOutcome;
use crate::error::ApiError;
use crate::message::Message as AppMessage;
use crate::subscription::StartPosition;
use crate::topic::Topic;
use shoal_proto::{FetchedBatch, Message, WireEntry};
use shoal_replica::command::Command;
use shoal_replica::state::Applied;
use shoal_replica::store::LogStore;
use shoal_replica::{node_id, NodeId};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;

impl Replication {
    /// Where to send a read of `topic`/`partition` now (or show where it
    /// goes): a sleeping group stays asleep.
    pub fn route(&self, topic: &str, partition: u32) -> Route {
        self.route_waking(topic, partition, false)
    }

    /// Where to send a publish to `topic`/`partition` now. A sleeping
    /// replica here wakes its group: if the leader died while it slept, the
    /// followers elect another while this publish's forward waits, instead
    /// of after it times out.
    pub fn route_publish(&self, topic: &str, partition: u32) -> Route {
        self.route_waking(topic, partition, true)
    }

    fn route_waking(&self, topic: &str, partition: u32, wake: bool) -> Route {
        let g = self.group_id(topic, partition);
        // The usual case, asked on every publish: this agent's replica
        // knows a leader that is up (no status built, no vectors copied).
        let (leader, woke) = {
            let mut core = lock(&self.core);
            let leader = core.driver.leader(&g).flatten();
            let woke = wake && leader != Some(self.me_id) && core.driver.wake_group(&g);
            (leader, woke)
        };
        if woke {
            self.wake.wake();
        }
        if let Some(leader) = leader {
            if leader == self.me_id {
                return Route::Local;
            }
            let peers = lock(&self.peers);
            if let Some((name, addr)) = peers.by_id.get(&leader) {
                if !peers.down.contains(name) {
                    return Route::Peer {
                        node: name.clone(),
                        addr: *addr,
                    };
                }
            }
        }
        let voters = lock(&self.core)
            .driver
            .status(&g)
            .map(|s| s.voters)
            .unwrap_or_default();
        let peers = lock(&self.peers);
        let live = |name: &str| -> Option<SocketAddr> {
            if peers.down.contains(name) {
                None
            } else {
                peers.addrs.get(name).copied()
            }
        };
        let skip = match peers.hint(topic, partition) {
            Some(Hint::Leader(node)) => {
                if let Some(addr) = live(node) {
                    return Route::Peer {
                        node: node.clone(),
                        addr,
                    };
                }
                0
            }
            Some(Hint::Skip(n)) => *n,
            None => 0,
        };
        let wanted = self.wanted(&peers, &g, &voters);
        let candidates: Vec<(String, Option<SocketAddr>)> = wanted
            .iter()
            .filter_map(|id| {
                if *id == self.me_id {
                    Some((self.me.clone(), None))
                } else {
                    peers
                        .by_id
                        .get(id)
                        .filter(|(n, _)| !peers.down.contains(n))
                        .map(|(n, a)| (n.clone(), Some(*a)))
                }
            })
            .collect();
        if candidates.is_empty() {
            return Route::Unavailable;
        }
        match &candidates[skip % candidates.len()] {
            (_, None) => {
                // This agent is a wanted replica but not (yet) a leader:
                // the group is forming or electing here.
                if candidates.len() == 1 {
                    Route::Unavailable
                } else {
                    let (node, addr) = &candidates[(skip + 1) % candidates.len()];
                    match addr {
                        Some(a) => Route::Peer {
                            node: node.clone(),
                            addr: *a,
                        },
                        None => Route::Unavailable,
                    }
                }
            }
            (node, Some(addr)) => Route::Peer {
                node: node.clone(),
                addr: *addr,
            },
        }
    }

    /// Whether a replicated partition has a leader that is up, as this
    /// agent's replica knows it; `None` when it holds no replica.
    pub fn has_live_leader(&self, topic: &str, partition: u32) -> Option<bool> {
        let g = self.group_id(topic, partition);
        let leader = lock(&self.core).driver.leader(&g)?;
        let Some(leader) = leader else {
            return Some(false);
        };
        if leader == self.me_id {
            return Some(true);
        }
        let peers = lock(&self.peers);
        Some(
            peers
                .by_id
                .get(&leader)
                .is_some_and(|(name, _)| !peers.down.contains(name)),
        )
    }

    /// `node` did not answer a call: the sleeping groups here that it leads
    /// wake, so their followers elect another leader if it died while they
    /// slept.
    pub fn suspect(&self, node: &str) {
        let woken = lock(&self.core).driver.wake_groups_led_by(node_id(node));
        if woken > 0 {
            self.wake.wake();
        }
    }

    /// A peer answered for a partition: it leads (`ok`), or try another.
    /// Called for every message a peer stores, so the usual answer (the
    /// leader it already named) allocates nothing.
    pub fn note_answer(&self, topic: &str, partition: u32, node: &str, ok: bool) {
        let mut peers = lock(&self.peers);
        let hint = match (ok, peers.hint(topic, partition)) {
            (true, Some(Hint::Leader(known))) if known == node => return,
            (true, _) => Hint::Leader(node.to_string()),
            (false, Some(Hint::Skip(n))) => Hint::Skip(n + 1),
            (false, _) => Hint::Skip(1),
        };
        peers.set_hint(topic, partition, hint);
    }

    /// Publishes to a partition this agent leads: answers once each
    /// message's entry is committed on a majority of the group.
    pub async fn publish_local(
        &self,
        topic: &Arc<Topic>,
        partition: u32,
        messages: Vec<AppMessage>,
    ) -> Vec<Result<PublishOutcome, ApiError>> {
        let g = self.group_id(&topic.name, partition);
        let window_ms = topic.config().dedupe_window.as_millis() as u64;
        let mut pending: Vec<Result<oneshot::Receiver<_>, ApiError>> = Vec::new();
        {
            let mut core = lock(&self.core);
            let wanted_len = {
                let peers = lock(&self.peers);
                let voters = core.driver.status(&g).map(|s| s.voters).unwrap_or_default();
                self.wanted(&peers, &g, &voters).len()
            };
            let check = match core.driver.status(&g) {
                None => Err(not_leader(&topic.name, partition, None)),
                Some(s) if !s.serving => {
                    let leader = s
                        .leader
                        .and_then(|l| lock(&self.peers).by_id.get(&l).map(|(n, _)| n.clone()));
                    Err(not_leader(&topic.name, partition, leader.as_deref()))
                }
                Some(s) if s.voters.len() < wanted_len.min(2) => {
                    let peers = lock(&self.peers);
                    let names = |ids: &[NodeId]| -> Vec<String> {
                        ids.iter().map(|id| self.node_name(&peers, *id)).collect()
                    };
                    Err(ApiError::unavailable(
                        "not_leader",
                        format!(
                            "partition {partition} of topic {:?} is still gathering its replicas (voters {:?}, catching up {:?}); retry shortly",
                            topic.name,
                            names(&s.voters),
                            names(&s.learners)
                        ),
                        1,
                    ))
                }
                Some(_) => Ok(()),
            };
            if let Err(e) = check {
                core.driver.wake_group(&g);
                drop(core);
                self.wake.wake();
                return messages.iter().map(|_| Err(e.clone())).collect();
            }
            let now = crate::time::now_ms();
            let mut batch = Vec::with_capacity(messages.len());
            let mut senders = Vec::with_capacity(messages.len());
            for m in &messages {
                if m.client_id && window_ms > 0 {
                    let original = core
                        .driver
                        .group(&g)
                        .and_then(|grp| grp.state().lookup(&m.id, now));
                    if let Some(original) = original {
                        let (tx, rx) = oneshot::channel();
                        let _ = tx.send(Ok((original, Applied::Duplicate { original })));
                        pending.push(Ok(rx));
                        continue;
                    }
                }
                let body = match m.encode() {
                    Ok(b) => b,
                    Err(what) => {
                        pending.push(Err(ApiError::bad_request(
                            "invalid_message",
                            format!("message {what} is too long"),
                        )));
                        continue;
                    }
                };
                let id = (m.client_id && window_ms > 0).then_some(m.id.as_str());
                let data = match (Command::Message {
                    timestamp_ms: now,
                    id,
                    body: &body,
                })
                .encode()
                {
                    Ok(d) => d,
                    Err(e) => {
                        pending.push(Err(ApiError::bad_request("invalid_message", e.to_string())));
                        continue;
                    }
                };
                let token = core.next_token;
                core.next_token += 1;
                let (tx, rx) = oneshot::channel();
                batch.push((token, data));
                senders.push((token, tx, pending.len()));
                pending.push(Ok(rx));
            }
            // One proposal for the whole call: one append per follower.
            if !batch.is_empty() {
                match core.driver.propose_many(&g, batch) {
                    Ok(_) => {
                        for (token, tx, _) in senders {
                            core.waiters.insert(token, Waiter { tx });
                        }
                    }
                    Err(e) => {
                        let error = match e {
                            // raft-rs drops proposals while leadership moves.
                            shoal_replica::Error::NotLeader { .. }
                            | shoal_replica::Error::LeaderCatchingUp(_)
                            | shoal_replica::Error::Raft(raft::Error::ProposalDropped) => {
                                not_leader(&topic.name, partition, None)
                            }
                            other => ApiError::unavailable(
                                "storage_error",
                                format!("the partition's group refused the message: {other}"),
                                1,
                            ),
                        };
                        for (_, _, slot) in senders {
                            pending[slot] = Err(error.clone());
                        }
                    }
                }
            }
        }
        // The proposal goes out at once, on this task when the round writes
        // only to the OS. Handing it to the driver's thread to gather with
        // others cost a thread wake-up per publish and was slower (30.1k
        // against 32.3k acks/s with 64 in flight, docs/benchmarks.md):
        // forwards already arrive gathered, one call per lane at a time.
        self.round_now();
        let started = std::time::Instant::now();
        let mut out = Vec::with_capacity(messages.len());
        for (m, p) in messages.iter().zip(pending) {
            let result = match p {
                Err(e) => Err(e),
                Ok(rx) => match tokio::time::timeout(PROPOSAL_TIMEOUT, rx).await {
                    Ok(Ok(Ok((index, applied)))) => {
                        let (offset, duplicate) = match applied {
                            Applied::Duplicate { original } => (original, true),
                            _ => (index, false),
                        };
                        Ok(PublishOutcome {
                            topic: topic.name.to_string(),
                            partition,
                            offset,
                            id: m.id.clone(),
                            duplicate,
                        })
                    }
                    Ok(Ok(Err(e))) => Err(e),
                    Ok(Err(_)) | Err(_) => Err(ApiError::unavailable(
                        "storage_timeout",
                        format!("partition {partition} of topic {:?} did not store the message on a majority of its replicas in time; it may or may not be stored (publish again with the same Shoal-Id to be sure)", topic.name),
                        1,
                    )),
                },
            };
            out.push(result);
        }
        let (mut published, mut bytes) = (0u64, 0u64);
        for (m, r) in messages.iter().zip(&out) {
            match r {
                Ok(o) if o.duplicate => {
                    topic.metrics.deduplicated.inc();
                }
                Ok(_) => {
                    published += 1;
                    bytes += m.payload.len() as u64;
                }
                Err(_) => {}
            }
        }
        topic.metrics.published.inc_by(published);
        topic.metrics.published_bytes.inc_by(bytes);
        let elapsed = started.elapsed().as_secs_f64();
        self.metrics.store_latency.observe(elapsed);
        self.metrics.replica_commit_latency.observe(elapsed);
        out
    }

    /// Reads a partition this agent leads for a consumer group, up to the
    /// commit index (never an uncommitted entry).
    #[allow(clippy::too_many_arguments)]
    pub async fn fetch_local(
        &self,
        topic: &str,
        partition: u32,
        group: &str,
        start: &StartPosition,
        from: Option<u64>,
        max: usize,
        wait: Duration,
    ) -> Result<FetchedBatch, ApiError> {
        let g = self.group_id(topic, partition);
        let mut round = self.round.subscribe();
        let deadline = tokio::time::Instant::now() + wait;
        let max = max.clamp(1, 4096);
        let mut start_at = None;
        loop {
            let answer = {
                let mut core = lock(&self.core);
                let Some(grp) = core.driver.group(&g) else {
                    return Err(not_leader(topic, partition, None));
                };
                let status = grp.status();
                if !status.serving {
                    if core.driver.wake_group(&g) {
                        drop(core);
                        self.wake.wake();
                    }
                    return Err(not_leader(topic, partition, None));
                }
                let first = grp.store().first_index().max(status.first_index);
                let at = match start_at {
                    Some(a) => a,
                    None => {
                        let pending = core
                            .pending_commits
                            .get(&(topic.to_string(), partition, group.to_string()))
                            .copied();
                        let a = match from {
                            Some(f) => f,
                            None => match pending.or_else(|| grp.state().offset(group)) {
                                Some(o) => o,
                                None => {
                                    let a = match start {
                                        StartPosition::Earliest => first,
                                        StartPosition::Latest => status.commit + 1,
                                        StartPosition::Offset(o) => (*o).max(first),
                                        StartPosition::Time(t) => crate::time::parse_rfc3339_ms(t)
                                            .and_then(|ms| grp.store().log().index_at_time(ms).ok())
                                            .unwrap_or(first),
                                    };
                                    // The choice is kept, so a restart resumes from it.
                                    let kept = core
                                        .pending_commits
                                        .entry((topic.to_string(), partition, group.to_string()))
                                        .or_insert(a);
                                    *kept = (*kept).max(a);
                                    a
                                }
                            },
                        };
                        start_at = Some(a);
                        a
                    }
                };
                let Some(grp) = core.driver.group(&g) else {
                    return Err(not_leader(topic, partition, None));
                };
                // Applied, not only committed: whether an entry is a
                // duplicate is known once it is applied.
                let readable = status
                    .commit
                    .min(grp.store().last_index())
                    .min(grp.state().applied());
                let from_index = at.max(first);
                let mut entries = Vec::new();
                if from_index <= readable {
                    let raw = grp
                        .store()
                        .entries(
                            from_index,
                            readable + 1,
                            crate::router::FETCH_ANSWER_BYTES as u64,
                        )
                        .map_err(|e| {
                            ApiError::internal(format!("reading the partition's log: {e}"))
                        })?;
                    for e in raw {
                        if entries.len() >= max {
                            break;
                        }
                        if let Ok(Command::Message {
                            timestamp_ms, body, ..
                        }) = Command::decode(&e.data)
                        {
                            // A duplicate id was answered with its original; readers skip it.
                            if grp.state().is_duplicate(e.index) {
                                continue;
                            }
                            entries.push(WireEntry {
                                index: e.index,
                                timestamp_ms,
                                data: body.to_vec(),
                            });
                        }
                    }
                }
                if !entries.is_empty() || at < first || tokio::time::Instant::now() >= deadline {
                    Some(FetchedBatch {
                        start: at,
                        first_index: first,
                        entries,
                    })
                } else {
                    None
                }
            };
            if let Some(batch) = answer {
                return Ok(batch);
            }
            if tokio::time::timeout_at(deadline, round.changed())
                .await
                .is_err()
            {
                continue;
            }
        }
    }

    /// A consumer group's committed offset, to go through the partition's
    /// log (coalesced: the newest value within [`COMMIT_EVERY_TICKS`](super::COMMIT_EVERY_TICKS)).
    pub fn commit(&self, topic: &str, partition: u32, group: &str, next: u64) {
        let mut core = lock(&self.core);
        let entry = core
            .pending_commits
            .entry((topic.to_string(), partition, group.to_string()))
            .or_insert(next);
        *entry = (*entry).max(next);
    }

    pub(super) fn flush_commits(&self, core: &mut Core) {
        if core.pending_commits.is_empty() {
            return;
        }
        let pending = std::mem::take(&mut core.pending_commits);
        let now = crate::time::now_ms();
        // Not proposed or sent this time (leadership moving, no leader
        // known): kept for the next flush, so no offset is lost on the way.
        let mut retry = Vec::new();
        for ((topic, partition, group), next) in pending {
            let g = self.group_id(&topic, partition);
            let leads = core
                .driver
                .status(&g)
                .is_some_and(|s| s.serving && s.leader == Some(self.me_id));
            if leads {
                // An offset past the log's end (a peer's mistake or lie)
                // would make the group skip every message still to come.
                let end = core.driver.status(&g).map_or(0, |s| s.last_index + 1);
                let next = next.min(end);
                if core
                    .driver
                    .group(&g)
                    .and_then(|grp| grp.state().offset(&group))
                    .is_some_and(|o| o >= next)
                {
                    continue;
                }
                let Ok(data) = (Command::Commit {
                    timestamp_ms: now,
                    group: &group,
                    next,
                })
                .encode() else {
                    continue;
                };
                if core.driver.propose(&g, 0, data).is_err() {
                    tracing::debug!(group = %group, "offset commit not proposed (leadership moving); trying again");
                    retry.push(((topic, partition, group), next));
                }
                continue;
            }
            // Led elsewhere: tell the leader (it proposes it). Only this
            // agent's namespace's groups: the leader takes a commit from a
            // peer only for the peer's own namespace's groups, so another
            // namespace's commit that reached this follower is dropped (its
            // reader sends the next one to the leader it finds then).
            if crate::tenancy::may_use_group(self.broker.namespace(), &group).is_err() {
                tracing::debug!(group = %group, "a peer's offset commit reached a follower; dropped");
                continue;
            }
            let Route::Peer { addr, .. } = self.route_unlocked(core, &topic, partition) else {
                retry.push(((topic, partition, group), next));
                continue;
            };
            let mesh = self.mesh.clone();
            let msg = Message::Commit {
                topic,
                partition,
                group,
                next,
            };
            tokio::spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(5), mesh.tell(addr, msg)).await;
            });
        }
        for (key, next) in retry {
            let kept = core.pending_commits.entry(key).or_insert(next);
            *kept = (*kept).max(next);
        }
    }

    /// [`Replication::route`] with the core already locked.
    fn route_unlocked(&self, core: &Core, topic: &str, partition: u32) -> Route {
        let g = self.group_id(topic, partition);
        let peers = lock(&self.peers);
        if let Some(s) = core.driver.status(&g) {
            if let Some((name, addr)) = s.leader.and_then(|l| peers.by_id.get(&l)) {
                return Route::Peer {
                    node: name.clone(),
                    addr: *addr,
                };
            }
        }
        if let Some(Hint::Leader(node)) = peers.hint(topic, partition) {
            if let Some(addr) = peers.addrs.get(node) {
                return Route::Peer {
                    node: node.clone(),
                    addr: *addr,
                };
            }
        }
        Route::Unavailable
    }
}
