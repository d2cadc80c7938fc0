//! Placement of the replicas: which agents each group wants as voters,
//! moving every group toward them, handing leadership to placement's first
//! choice, and the members gossip reports.

use super::{group_label, is_meta, lock, Core, Peers, Replication, META_VOTERS};
use shoal_cluster::membership::Liveness;
use shoal_cluster::placement::{self, Member, PartitionKey};
use shoal_replica::{node_id, GroupId, NodeId};
use std::collections::HashMap;
use std::net::SocketAddr;

/// Ticks (30 s) before leadership of a group is handed to placement's
/// first choice again after a try.
const TRANSFER_BACKOFF_TICKS: u64 = 150;

/// A hibernating group as [`Replication::place_all`] last found it: its
/// voters are the wanted ones and its leader is placement's first choice
/// (or another agent leads it).
pub(super) struct Settled {
    /// [`Peers::epoch`] then.
    epoch: u64,
    /// The topic's replicas then.
    asked: u32,
    /// [`shoal_replica::group::Group::asleep_at`] then.
    asleep_at: (u64, u64),
    under: bool,
    leaderless: bool,
}

impl Replication {
    /// The voters placement wants for `g`: the top `replicas` brokers (the
    /// meta group: the top [`META_VOTERS`]).
    ///
    /// A member that is down keeps its place among them for
    /// `--replace-after` only if it is already a voter (`voters`): a down
    /// agent is never added, so a group forms and grows with live agents.
    pub(super) fn wanted(&self, peers: &Peers, g: &GroupId, voters: &[NodeId]) -> Vec<NodeId> {
        let r = if is_meta(g) {
            META_VOTERS
        } else {
            match self.broker.topic(&g.topic) {
                Some(t) => t.config().replicas as usize,
                None => return Vec::new(),
            }
        };
        let now = std::time::Instant::now();
        let mut members: Vec<Member> = peers
            .members
            .iter()
            .filter(|m| {
                peers.down_since.get(&m.id).is_none_or(|since| {
                    now.duration_since(*since) < self.replace_after
                        && voters.contains(&node_id(&m.id))
                })
            })
            .cloned()
            .collect();
        if !members.iter().any(|m| m.id == self.me) && self.broker_eligible() {
            members.push(Member::broker(self.me.clone()));
            members.sort();
        }
        let key = PartitionKey {
            namespace: &g.namespace,
            topic: &g.topic,
            partition: g.partition,
        };
        placement::replicas(&members, &key, r)
            .into_iter()
            .map(|m| node_id(&m.id))
            .collect()
    }

    pub(super) fn broker_eligible(&self) -> bool {
        self.mesh.view().me.as_ref().is_none_or(|m| m.broker)
    }

    pub(super) fn place(&self, core: &mut Core, g: &GroupId) {
        let voters = core.driver.status(g).map(|s| s.voters).unwrap_or_default();
        let wanted = {
            let peers = lock(&self.peers);
            self.wanted(&peers, g, &voters)
        };
        if !wanted.is_empty() {
            core.driver.set_replicas(g, &wanted);
        }
    }

    /// Every group moves toward the replicas placement wants, and a leader
    /// hands its group to placement's first choice once that one has every
    /// entry, so leaders spread over the agents as homes did.
    pub(super) fn place_all(&self, core: &mut Core) {
        let peers = lock(&self.peers);
        let (mut under, mut leaderless, mut max_lag) = (0i64, 0i64, 0u64);
        let mut asked_of: HashMap<&str, u32> = HashMap::new();
        // First the settled groups, looked up and counted without a copy:
        // 1,000 hibernating groups cost 1,000 lookups a second, no more.
        let mut todo = Vec::new();
        for (g, grp) in core.driver.iter() {
            let asked = if is_meta(g) {
                META_VOTERS as u32
            } else {
                *asked_of.entry(g.topic.as_str()).or_insert_with(|| {
                    self.broker
                        .topic(&g.topic)
                        .map_or(0, |t| t.config().replicas)
                })
            };
            // A down member's seat expires with time, not with the epoch.
            if peers.down.is_empty() {
                if let (Some(at), Some(s)) = (grp.asleep_at(), core.settled.get(g)) {
                    if (s.epoch, s.asked, s.asleep_at) == (peers.epoch, asked, at) {
                        under += i64::from(s.under);
                        leaderless += i64::from(s.leaderless);
                        continue;
                    }
                }
            }
            todo.push((g.clone(), asked));
        }
        for (g, asked) in todo {
            let Some(grp) = core.driver.group(&g) else {
                continue;
            };
            let asleep_at = grp.asleep_at();
            core.settled.remove(&g);
            let status = grp.status();
            let is_leaderless = status.leader.is_none();
            leaderless += i64::from(is_leaderless);
            let leads = status.leader == Some(self.me_id);
            let mut lag = 0;
            if leads {
                for (_, matched) in &status.matched {
                    lag = lag.max(status.last_index.saturating_sub(*matched));
                }
            }
            max_lag = max_lag.max(lag);
            let wanted = self.wanted(&peers, &g, &status.voters);
            let mut is_under = false;
            if leads && !is_meta(&g) {
                let asked = asked as usize;
                // A voter that is down (not yet replaced) holds no live copy.
                let live_voters = status
                    .voters
                    .iter()
                    .filter(|v| {
                        peers
                            .by_id
                            .get(v)
                            .is_none_or(|(name, _)| !peers.down.contains(name))
                    })
                    .count();
                is_under = live_voters < asked;
                under += i64::from(is_under);
                // Said once per group while the mesh has too few brokers
                // (not while a new replica catches up, which passes).
                let lacking = wanted.len() < asked;
                if lacking && core.under_warned.insert(g.clone()) {
                    tracing::warn!(
                        group = %group_label(&g),
                        brokers = wanted.len(),
                        replicas = asked,
                        "partition has fewer replicas than its topic asks: the mesh has too few live broker agents"
                    );
                } else if !lacking {
                    core.under_warned.remove(&g);
                }
            }
            if wanted.is_empty() {
                continue;
            }
            let mut wanted_voters = wanted.clone();
            wanted_voters.sort_unstable();
            let settled = status.learners.is_empty()
                && status.voters == wanted_voters
                && !(leads && wanted[0] != self.me_id)
                && lag == 0;
            if let (Some(at), true) = (asleep_at, settled) {
                core.settled.insert(
                    g.clone(),
                    Settled {
                        epoch: peers.epoch,
                        asked,
                        asleep_at: at,
                        under: is_under,
                        leaderless: is_leaderless,
                    },
                );
            }
            core.driver.set_replicas(&g, &wanted);
            let recently = core
                .transferred_at
                .get(&g)
                .is_some_and(|t| core.ticks < t + TRANSFER_BACKOFF_TICKS);
            if wanted[0] != self.me_id
                && leads
                && status.serving
                && !recently
                && core.driver.transfer_leader(&g, wanted[0])
            {
                core.transferred_at.insert(g.clone(), core.ticks);
                tracing::debug!(group = %group_label(&g), "handing leadership to placement's first choice");
            }
        }
        let catch_up = core.driver.stats().catch_up_bytes;
        self.metrics
            .replica_catch_up_bytes
            .inc_by(catch_up.saturating_sub(core.catch_up_counted));
        core.catch_up_counted = catch_up;
        self.metrics.replica_under_replicated.set(under);
        self.metrics.replica_leaderless.set(leaderless);
        self.metrics
            .replica_follower_lag
            .set(i64::try_from(max_lag).unwrap_or(i64::MAX));
    }

    /// Gossip's view changed: who is up, where, and which brokers count.
    pub fn set_members(&self, members: &[(String, SocketAddr, bool, Liveness, bool)]) {
        let mut downs = Vec::new();
        let mut suspects = Vec::new();
        {
            let mut peers = lock(&self.peers);
            peers.by_id.clear();
            peers.addrs.clear();
            peers.members.clear();
            peers.down.clear();
            let now = std::time::Instant::now();
            peers.epoch += 1;
            let mut down_since = std::mem::take(&mut peers.down_since);
            let was_suspected = std::mem::take(&mut peers.suspected);
            for (name, addr, broker, state, departed) in members {
                if *name == self.me {
                    continue;
                }
                peers.by_id.insert(node_id(name), (name.clone(), *addr));
                peers.addrs.insert(name.clone(), *addr);
                // An agent that left gracefully keeps its replicas for
                // `--replace-after`, as a crashed one does: a rolling restart
                // brings it back; a pod replaced under a new name does not.
                let down = *state == Liveness::Down || *departed;
                if down {
                    peers.down.insert(name.clone());
                    let since = down_since.remove(name).unwrap_or(now);
                    peers.down_since.insert(name.clone(), since);
                }
                downs.push((node_id(name), down));
                if *state == Liveness::Suspect {
                    if !was_suspected.contains(name) {
                        suspects.push(node_id(name));
                    }
                    peers.suspected.insert(name.clone());
                }
                if *broker {
                    peers.members.push(Member::broker(name.clone()));
                }
            }
            if self.broker_eligible() {
                peers.members.push(Member::broker(self.me.clone()));
            }
            peers.members.sort();
        }
        let mut core = lock(&self.core);
        for (id, down) in downs {
            core.driver.set_down(id, down);
        }
        // An idle partition whose leader died is noticed here long before
        // the gossip declares the leader down (about 6 s). Waking tells
        // the leader too, so one that is only slow keeps its groups. Once
        // per suspicion: a leader suspected for long is not woken again
        // and again at each change of view.
        for id in suspects {
            core.driver.wake_groups_led_by(id);
        }
        self.place_all(&mut core);
        drop(core);
        self.wake.wake();
    }

    /// Whether placement, as this agent sees it, gives it a replica of `g`.
    pub(super) fn placed_here(&self, g: &GroupId) -> bool {
        let peers = lock(&self.peers);
        self.wanted(&peers, g, &[]).contains(&self.me_id)
    }
}
