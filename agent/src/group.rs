//! The consumer group state machine, free of sockets and clocks.
//!
//! A group reads every partition of one topic. Its members (the
//! subscriptions naming the group) own disjoint sets of partitions, so each
//! message goes to one member and a key's messages go to one member in order.
//! Per partition the group keeps the committed offset (every offset below it
//! is acknowledged), a window of fetched messages and their delivery state.
//! The caller feeds it entries, time and app responses, and acts on what it
//! returns; [`crate::delivery`] is that caller.

use crate::message::Message;
use crate::subscription::Backoff;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Messages fetched ahead per partition.
pub const FETCH_WINDOW: usize = 1024;
/// Bytes fetched per read.
pub const FETCH_BYTES: usize = 4 * 1024 * 1024;

/// Longest any timer may be set: bounds arithmetic on times that come from apps.
pub const MAX_TIMER: Duration = Duration::from_secs(366 * 24 * 3600);

/// `now + d`, with `d` capped at [`MAX_TIMER`] so no input can overflow the clock.
pub fn later(now: Instant, d: Duration) -> Instant {
    now.checked_add(d.min(MAX_TIMER)).unwrap_or(now)
}

/// How a member wants its messages and what it tolerates.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberSpec {
    /// Subscription name.
    pub name: Arc<str>,
    /// Time to acknowledge a delivery.
    pub ack_timeout: Duration,
    /// Deliveries before dead-lettering (0: unlimited).
    pub max_deliveries: u32,
    /// Retry delays.
    pub backoff: Backoff,
    /// Most unacknowledged messages.
    pub max_in_flight: u32,
    /// One message per partition in flight at a time.
    pub ordered: bool,
}

/// Identifies one delivery attempt; apps echo it to ack or nack.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AckId {
    /// Partition.
    pub partition: u32,
    /// Offset.
    pub offset: u64,
    /// Delivery attempt, from 1.
    pub attempt: u32,
}

impl fmt::Display for AckId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}-{}", self.partition, self.offset, self.attempt)
    }
}

impl std::str::FromStr for AckId {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        let mut it = s.splitn(3, '-');
        let partition = it.next().ok_or(())?.parse().map_err(|_| ())?;
        let offset = it.next().ok_or(())?.parse().map_err(|_| ())?;
        let attempt = it.next().ok_or(())?.parse().map_err(|_| ())?;
        Ok(AckId {
            partition,
            offset,
            attempt,
        })
    }
}

/// A message handed to a member.
#[derive(Clone, Debug)]
pub struct Delivery {
    /// Ack id of this attempt.
    pub ack_id: AckId,
    /// Publish time, ms since the epoch.
    pub timestamp_ms: u64,
    /// The message.
    pub message: Arc<Message>,
}

/// A message that must go to the dead-letter topic; call
/// [`GroupCore::complete`] once it is stored there (or dropped).
#[derive(Clone, Debug)]
pub struct DeadLetter {
    /// Where it was.
    pub partition: u32,
    /// Offset.
    pub offset: u64,
    /// Publish time.
    pub timestamp_ms: u64,
    /// The message.
    pub message: Arc<Message>,
    /// Deliveries made.
    pub attempts: u32,
    /// The member whose policy decided (its dead-letter topic applies).
    pub member: Arc<str>,
    /// Why: `max_deliveries` or `rejected`.
    pub reason: &'static str,
}

/// The ack id names no delivery in flight (acknowledged, redelivered, or never issued).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("no such delivery in flight")]
pub struct UnknownDelivery;

/// One entry fed to the group: its index, time and decoded message.
pub type Fetched = (u64, u64, Result<Message, crate::message::DecodeError>);

/// What feeding entries found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct FetchOutcome {
    /// Messages whose TTL had passed (acknowledged without delivery).
    pub expired: u32,
    /// Entries that were not messages this agent can read (skipped).
    pub undecodable: u32,
}

#[derive(Debug)]
enum State {
    Ready,
    Waiting { until: Instant },
    InFlight { member: Arc<str>, deadline: Instant },
    Parked,
}

#[derive(Debug)]
struct Pending {
    timestamp_ms: u64,
    message: Arc<Message>,
    attempts: u32,
    state: State,
}

#[derive(Debug)]
struct Part {
    committed: u64,
    fetched: u64,
    pending: BTreeMap<u64, Pending>,
    ready: BTreeSet<u64>,
    in_flight: u32,
    reported: u64,
}

impl Part {
    fn recompute_committed(&mut self) {
        self.committed = self.pending.keys().next().copied().unwrap_or(self.fetched);
    }
}

#[derive(Debug)]
struct Member {
    spec: MemberSpec,
    in_flight: u32,
    partitions: Vec<u32>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum TimerKind {
    Retry,
    Deadline,
}

/// The state of one consumer group over one topic.
#[derive(Debug, Default)]
pub struct GroupCore {
    parts: BTreeMap<u32, Part>,
    members: BTreeMap<Arc<str>, Member>,
    owners: HashMap<u32, Arc<str>>,
    timers: BTreeSet<(Instant, u32, u64, u32, TimerKind)>,
    rotate: usize,
    now_ms: u64,
    expired: u32,
}

impl GroupCore {
    /// An empty group.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the wall clock (ms since the epoch) that message TTLs are checked against.
    pub fn set_now_ms(&mut self, now_ms: u64) {
        self.now_ms = now_ms;
    }

    /// Messages dropped because their TTL passed before delivery, since the last call.
    pub fn take_expired(&mut self) -> u32 {
        std::mem::take(&mut self.expired)
    }

    /// Adds a partition whose next offset to deliver is `committed`.
    pub fn add_partition(&mut self, partition: u32, committed: u64) {
        self.parts.entry(partition).or_insert(Part {
            committed,
            fetched: committed,
            pending: BTreeMap::new(),
            ready: BTreeSet::new(),
            in_flight: 0,
            reported: committed,
        });
        self.assign();
    }

    /// Drops a partition another agent's members now read: its messages in
    /// flight here are forgotten (their acks answer "unknown") and will be
    /// redelivered from the committed offset by the new reader.
    pub fn remove_partition(&mut self, partition: u32) {
        let Some(part) = self.parts.remove(&partition) else {
            return;
        };
        for pending in part.pending.values() {
            if let State::InFlight { member, .. } = &pending.state {
                if let Some(m) = self.members.get_mut(member) {
                    m.in_flight = m.in_flight.saturating_sub(1);
                }
            }
        }
        self.timers.retain(|t| t.1 != partition);
        self.assign();
    }

    /// Whether the group reads `partition`.
    pub fn has_partition(&self, partition: u32) -> bool {
        self.parts.contains_key(&partition)
    }

    /// Partitions known.
    pub fn partitions(&self) -> impl Iterator<Item = u32> + '_ {
        self.parts.keys().copied()
    }

    /// Replaces the members; partitions whose owner changes give their
    /// in-flight messages back for immediate redelivery to the new owner.
    pub fn set_members(&mut self, specs: Vec<MemberSpec>) {
        let mut members = BTreeMap::new();
        for spec in specs {
            let in_flight = self.members.get(&spec.name).map_or(0, |m| m.in_flight);
            members.insert(
                spec.name.clone(),
                Member {
                    spec,
                    in_flight,
                    partitions: Vec::new(),
                },
            );
        }
        self.members = members;
        self.assign();
    }

    /// A member's ack timeout.
    pub fn ack_timeout(&self, member: &str) -> Option<Duration> {
        self.members.get(member).map(|m| m.spec.ack_timeout)
    }

    /// Member names.
    pub fn member_names(&self) -> Vec<Arc<str>> {
        self.members.keys().cloned().collect()
    }

    /// Whether the group has no members.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// The member owning a partition.
    pub fn owner(&self, partition: u32) -> Option<&Arc<str>> {
        self.owners.get(&partition)
    }

    fn assign(&mut self) {
        let names: Vec<Arc<str>> = self.members.keys().cloned().collect();
        for m in self.members.values_mut() {
            m.partitions.clear();
        }
        let mut owners = HashMap::new();
        for (i, &p) in self.parts.keys().enumerate() {
            if names.is_empty() {
                break;
            }
            let owner = names[i % names.len()].clone();
            if let Some(m) = self.members.get_mut(&owner) {
                m.partitions.push(p);
            }
            owners.insert(p, owner);
        }
        for (&p, part) in self.parts.iter_mut() {
            let new_owner = owners.get(&p);
            for (&offset, pending) in part.pending.iter_mut() {
                if let State::InFlight { member, .. } = &pending.state {
                    if new_owner != Some(member) {
                        if let Some(m) = self.members.get_mut(member) {
                            m.in_flight = m.in_flight.saturating_sub(1);
                        }
                        part.in_flight = part.in_flight.saturating_sub(1);
                        pending.state = State::Ready;
                        part.ready.insert(offset);
                    }
                }
            }
        }
        // Members that left keep no in-flight count.
        self.owners = owners;
    }

    /// Reads the group wants: (partition, from offset, max entries).
    pub fn wanted_fetches(&self) -> Vec<(u32, u64, usize)> {
        self.parts
            .iter()
            .filter(|(p, part)| {
                self.owners.contains_key(p) && part.pending.len() < FETCH_WINDOW / 2
            })
            .map(|(&p, part)| (p, part.fetched, FETCH_WINDOW - part.pending.len()))
            .collect()
    }

    /// Feeds entries read from `partition`, in index order from its fetch position.
    pub fn on_fetched(
        &mut self,
        partition: u32,
        entries: Vec<Fetched>,
        now_ms: u64,
        now: Instant,
    ) -> FetchOutcome {
        let mut outcome = FetchOutcome::default();
        let Some(part) = self.parts.get_mut(&partition) else {
            return outcome;
        };
        for (index, timestamp_ms, message) in entries {
            if index < part.fetched {
                continue;
            }
            part.fetched = index + 1;
            let message = match message {
                Ok(m) => m,
                Err(_) => {
                    outcome.undecodable += 1;
                    continue;
                }
            };
            if message.expires_at_ms.is_some_and(|t| t <= now_ms) {
                outcome.expired += 1;
                continue;
            }
            let state = match message.deliver_at_ms {
                Some(at) if at > now_ms => {
                    let until = later(now, Duration::from_millis(at - now_ms));
                    self.timers
                        .insert((until, partition, index, 0, TimerKind::Retry));
                    State::Waiting { until }
                }
                _ => {
                    part.ready.insert(index);
                    State::Ready
                }
            };
            part.pending.insert(
                index,
                Pending {
                    timestamp_ms,
                    message: Arc::new(message),
                    attempts: 0,
                    state,
                },
            );
        }
        part.recompute_committed();
        outcome
    }

    /// The partition's log no longer holds offsets below `first_index`
    /// (retention, or an ephemeral ring that moved on): the group skips to
    /// it. Returns how many messages it skipped unread.
    pub fn on_compacted(&mut self, partition: u32, first_index: u64) -> u64 {
        let Some(part) = self.parts.get_mut(&partition) else {
            return 0;
        };
        if part.fetched >= first_index {
            return 0;
        }
        let skipped = first_index - part.fetched;
        part.fetched = first_index;
        part.recompute_committed();
        skipped
    }

    /// Hands up to `max` ready messages to `member`, within its in-flight limit.
    pub fn take(&mut self, member: &str, max: usize, now: Instant) -> Vec<Delivery> {
        let mut out = Vec::new();
        let Some(m) = self.members.get_mut(member) else {
            return out;
        };
        let capacity = (m.spec.max_in_flight.saturating_sub(m.in_flight) as usize).min(max);
        if capacity == 0 || m.partitions.is_empty() {
            return out;
        }
        let name = m.spec.name.clone();
        let ordered = m.spec.ordered;
        let deadline = later(now, m.spec.ack_timeout);
        let parts = m.partitions.clone();
        self.rotate = self.rotate.wrapping_add(1);
        let n = parts.len();
        // Round robin over the member's partitions, one message each per pass.
        let mut progress = true;
        while out.len() < capacity && progress {
            progress = false;
            for i in 0..n {
                if out.len() >= capacity {
                    break;
                }
                let p = parts[(i + self.rotate) % n];
                let Some(part) = self.parts.get_mut(&p) else {
                    continue;
                };
                let Some(&offset) = part.ready.iter().next() else {
                    continue;
                };
                if ordered && (part.in_flight > 0 || part.pending.keys().next() != Some(&offset)) {
                    continue;
                }
                part.ready.remove(&offset);
                let Some(pending) = part.pending.get_mut(&offset) else {
                    continue;
                };
                // A message whose TTL passed while it waited (for its turn, its
                // delay, or a retry) is dropped, not delivered.
                if pending
                    .message
                    .expires_at_ms
                    .is_some_and(|t| t <= self.now_ms)
                {
                    part.pending.remove(&offset);
                    part.recompute_committed();
                    self.expired += 1;
                    progress = true;
                    continue;
                }
                pending.attempts += 1;
                pending.state = State::InFlight {
                    member: name.clone(),
                    deadline,
                };
                part.in_flight += 1;
                self.timers
                    .insert((deadline, p, offset, pending.attempts, TimerKind::Deadline));
                out.push(Delivery {
                    ack_id: AckId {
                        partition: p,
                        offset,
                        attempt: pending.attempts,
                    },
                    timestamp_ms: pending.timestamp_ms,
                    message: pending.message.clone(),
                });
                progress = true;
            }
        }
        if let Some(m) = self.members.get_mut(member) {
            m.in_flight += out.len() as u32;
        }
        out
    }

    /// Whether `member` could take a message now.
    pub fn has_ready_for(&self, member: &str) -> bool {
        let Some(m) = self.members.get(member) else {
            return false;
        };
        m.in_flight < m.spec.max_in_flight
            && m.partitions.iter().any(|p| {
                self.parts
                    .get(p)
                    .is_some_and(|part| match part.ready.iter().next() {
                        Some(o) if m.spec.ordered => {
                            part.in_flight == 0 && part.pending.keys().next() == Some(o)
                        }
                        Some(_) => true,
                        None => false,
                    })
            })
    }

    fn release(&mut self, id: &AckId) -> Option<(Arc<str>, &mut Pending)> {
        let part = self.parts.get_mut(&id.partition)?;
        let pending = part.pending.get_mut(&id.offset)?;
        let State::InFlight { member, .. } = &pending.state else {
            return None;
        };
        let member = member.clone();
        part.in_flight = part.in_flight.saturating_sub(1);
        if let Some(m) = self.members.get_mut(&member) {
            m.in_flight = m.in_flight.saturating_sub(1);
        }
        Some((member, pending))
    }

    /// Acknowledges a delivery. Late acks of an earlier attempt still count:
    /// the app processed the message. Returns false for unknown ids.
    pub fn ack(&mut self, id: &AckId) -> bool {
        let Some(part) = self.parts.get_mut(&id.partition) else {
            return false;
        };
        let Some(pending) = part.pending.get(&id.offset) else {
            return false;
        };
        if id.attempt == 0 || id.attempt > pending.attempts {
            return false;
        }
        // The delivery's timer goes with it: timers of acknowledged messages
        // would otherwise stay until their deadline (memory grows with rate ×
        // ack timeout).
        let timer = match pending.state {
            State::InFlight { deadline, .. } => Some((
                deadline,
                id.partition,
                id.offset,
                pending.attempts,
                TimerKind::Deadline,
            )),
            State::Waiting { until } => Some((
                until,
                id.partition,
                id.offset,
                pending.attempts,
                TimerKind::Retry,
            )),
            _ => None,
        };
        if matches!(pending.state, State::InFlight { .. }) {
            self.release(id);
        }
        let Some(part) = self.parts.get_mut(&id.partition) else {
            return false;
        };
        if matches!(
            part.pending.get(&id.offset).map(|p| &p.state),
            Some(State::Parked)
        ) {
            return false;
        }
        part.pending.remove(&id.offset);
        part.ready.remove(&id.offset);
        part.recompute_committed();
        if let Some(t) = timer {
            self.timers.remove(&t);
        }
        true
    }

    /// Timers scheduled (deadlines and retries), for tests and metrics.
    pub fn timer_count(&self) -> usize {
        self.timers.len()
    }

    /// Gives a delivery back for redelivery after `delay` (or dead-letters it
    /// when its deliveries are used up). Unknown or stale ids return Err.
    pub fn nack(
        &mut self,
        id: &AckId,
        delay: Duration,
        now: Instant,
    ) -> Result<Option<DeadLetter>, UnknownDelivery> {
        if !self.is_current(id) {
            return Err(UnknownDelivery);
        }
        Ok(self.retry_or_dead_letter(id, Some(delay), now, "max_deliveries"))
    }

    /// A push failed or timed out: retry with backoff or dead-letter.
    pub fn fail(&mut self, id: &AckId, now: Instant) -> Option<DeadLetter> {
        if !self.is_current(id) {
            return None;
        }
        self.retry_or_dead_letter(id, None, now, "max_deliveries")
    }

    /// The app rejected the message for good: dead-letter it now.
    pub fn reject(&mut self, id: &AckId) -> Option<DeadLetter> {
        if !self.is_current(id) {
            return None;
        }
        let (member, pending) = self.release(id)?;
        pending.state = State::Parked;
        Some(DeadLetter {
            partition: id.partition,
            offset: id.offset,
            timestamp_ms: pending.timestamp_ms,
            message: pending.message.clone(),
            attempts: pending.attempts,
            member,
            reason: "rejected",
        })
    }

    fn is_current(&self, id: &AckId) -> bool {
        self.parts
            .get(&id.partition)
            .and_then(|p| p.pending.get(&id.offset))
            .is_some_and(|p| p.attempts == id.attempt && matches!(p.state, State::InFlight { .. }))
    }

    fn retry_or_dead_letter(
        &mut self,
        id: &AckId,
        delay: Option<Duration>,
        now: Instant,
        reason: &'static str,
    ) -> Option<DeadLetter> {
        let spec = {
            let part = self.parts.get(&id.partition)?;
            let State::InFlight { member, .. } = &part.pending.get(&id.offset)?.state else {
                return None;
            };
            self.members.get(member).map(|m| m.spec.clone())
        };
        let (member, pending) = self.release(id)?;
        let (max_deliveries, backoff) =
            spec.map_or((0, Backoff::default()), |s| (s.max_deliveries, s.backoff));
        if max_deliveries > 0 && pending.attempts >= max_deliveries {
            pending.state = State::Parked;
            return Some(DeadLetter {
                partition: id.partition,
                offset: id.offset,
                timestamp_ms: pending.timestamp_ms,
                message: pending.message.clone(),
                attempts: pending.attempts,
                member,
                reason,
            });
        }
        let wait = delay.unwrap_or_else(|| backoff.delay(pending.attempts, fastrand::f64()));
        if wait.is_zero() {
            pending.state = State::Ready;
            if let Some(part) = self.parts.get_mut(&id.partition) {
                part.ready.insert(id.offset);
            }
        } else {
            let until = later(now, wait);
            pending.state = State::Waiting { until };
            let attempts = pending.attempts;
            self.timers
                .insert((until, id.partition, id.offset, attempts, TimerKind::Retry));
        }
        None
    }

    /// A dead-lettered message is stored in its dead-letter topic (or dropped): forget it.
    pub fn complete(&mut self, partition: u32, offset: u64) {
        if let Some(part) = self.parts.get_mut(&partition) {
            if matches!(
                part.pending.get(&offset).map(|p| &p.state),
                Some(State::Parked)
            ) {
                part.pending.remove(&offset);
                part.recompute_committed();
            }
        }
    }

    /// Storing a dead letter failed: try it again later.
    pub fn park_failed(&mut self, partition: u32, offset: u64, now: Instant, retry_in: Duration) {
        if let Some(part) = self.parts.get_mut(&partition) {
            if let Some(p) = part.pending.get_mut(&offset) {
                if matches!(p.state, State::Parked) {
                    let until = later(now, retry_in);
                    p.state = State::Waiting { until };
                    self.timers
                        .insert((until, partition, offset, p.attempts, TimerKind::Retry));
                }
            }
        }
    }

    /// Applies every timer due at `now`: waiting messages become ready,
    /// deliveries past their ack deadline are retried or dead-lettered.
    /// Returns the dead letters and the number of timed-out deliveries.
    pub fn tick(&mut self, now: Instant) -> (Vec<DeadLetter>, u32) {
        let mut dead = Vec::new();
        let mut timed_out = 0;
        while let Some(&timer) = self.timers.iter().next() {
            let (at, partition, offset, attempts, kind) = timer;
            if at > now {
                break;
            }
            self.timers.remove(&timer);
            let Some(part) = self.parts.get_mut(&partition) else {
                continue;
            };
            let Some(pending) = part.pending.get_mut(&offset) else {
                continue;
            };
            match (kind, &pending.state) {
                (TimerKind::Retry, State::Waiting { until })
                    if *until <= now && pending.attempts == attempts =>
                {
                    pending.state = State::Ready;
                    part.ready.insert(offset);
                }
                (TimerKind::Deadline, State::InFlight { deadline, .. })
                    if *deadline <= now && pending.attempts == attempts =>
                {
                    timed_out += 1;
                    let id = AckId {
                        partition,
                        offset,
                        attempt: attempts,
                    };
                    if let Some(d) = self.retry_or_dead_letter(&id, None, now, "max_deliveries") {
                        dead.push(d);
                    }
                }
                _ => {}
            }
        }
        (dead, timed_out)
    }

    /// When the next timer is due.
    pub fn next_timer(&self) -> Option<Instant> {
        self.timers.iter().next().map(|t| t.0)
    }

    /// Partitions whose committed offset moved since the last call, with the new offset.
    pub fn take_commits(&mut self) -> Vec<(u32, u64)> {
        let mut out = Vec::new();
        for (&p, part) in self.parts.iter_mut() {
            if part.committed != part.reported {
                part.reported = part.committed;
                out.push((p, part.committed));
            }
        }
        out
    }

    /// The committed offset of a partition.
    pub fn committed(&self, partition: u32) -> Option<u64> {
        self.parts.get(&partition).map(|p| p.committed)
    }

    /// Messages in flight across members.
    pub fn in_flight(&self) -> u32 {
        self.members.values().map(|m| m.in_flight).sum()
    }
}

#[cfg(test)]
mod tests;
