//! SWIM membership (the foca crate), sans-IO.
//!
//! [`Membership`] takes datagrams, timer events and commands, and answers
//! with [`Effects`]: datagrams to send, timers to schedule, membership
//! events. The agent's shell carries the datagrams over the mesh's QUIC
//! connections (authenticated, one per agent pair) and owns the clock;
//! tests step a simulated cluster by hand.

use foca::{Codec, Config, Foca, PostcardCodec};
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::time::Duration;

/// A membership timer: the shell fires it after the delay it came with.
pub type Timer = foca::Timer<AgentId>;

/// Largest gossip datagram: fits a QUIC datagram on a 1280-byte-MTU path.
pub const MAX_DATAGRAM: usize = 1100;

/// An agent as the cluster knows it. Its mesh address is its identity;
/// the incarnation grows at every restart so a rejoin wins over the stale
/// record of the same address.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct AgentId {
    /// Mesh (QUIC) address.
    pub addr: SocketAddr,
    /// Node name (pod name).
    pub node: String,
    /// Restart counter.
    pub incarnation: u64,
    /// Whether the agent may hold partitions.
    pub broker: bool,
}

impl AgentId {
    /// A seed known only by its address (`--join`): foca learns the rest on contact.
    pub fn seed(addr: SocketAddr) -> Self {
        AgentId {
            addr,
            node: String::new(),
            incarnation: 0,
            broker: false,
        }
    }
}

impl foca::Identity for AgentId {
    type Addr = SocketAddr;

    fn renew(&self) -> Option<Self> {
        Some(AgentId {
            incarnation: self.incarnation + 1,
            ..self.clone()
        })
    }

    fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        self.incarnation > adversary.incarnation
    }
}

/// A member's liveness.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Liveness {
    /// Answering probes.
    Alive,
    /// Missed a probe; others are checking.
    Suspect,
    /// Declared down.
    Down,
}

/// Something the shell should know.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A member is up.
    Up(AgentId),
    /// A member was declared down: it stopped answering (or its leave
    /// reached this agent only second-hand).
    Down(AgentId),
    /// A member said itself that it leaves (a graceful stop): it is down
    /// from now on, and nothing failed.
    Left(AgentId),
    /// This agent is known to the cluster: it has joined.
    Joined,
    /// Every other member is gone.
    Alone,
    /// This agent was declared down and rejoined under a new incarnation.
    Rejoined(AgentId),
}

/// What the shell must do after a call.
#[derive(Debug, Default)]
pub struct Effects {
    /// Datagrams to send.
    pub send: Vec<(AgentId, bytes::Bytes)>,
    /// Timers to fire later: hand them back to [`Membership::handle_timer`].
    pub timers: Vec<(Duration, Timer)>,
    /// Membership changes.
    pub events: Vec<Event>,
}

/// Why a membership call failed.
#[derive(Debug, thiserror::Error)]
#[error("membership: {0}")]
pub struct MembershipError(String);

/// One agent's membership state.
pub struct Membership {
    foca: Foca<AgentId, PostcardCodec, StdRng, foca::NoCustomBroadcast>,
    runtime: foca::AccumulatingRuntime<AgentId>,
    joined: bool,
}

impl std::fmt::Debug for Membership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Membership")
            .field("me", self.foca.identity())
            .field("members", &self.foca.num_members())
            .finish()
    }
}

/// SWIM settings for a LAN cluster of about `expected_size` agents, with
/// datagrams sized for QUIC.
pub fn config(expected_size: u32) -> Config {
    let mut c = Config::new_lan(NonZeroU32::new(expected_size.max(1)).unwrap_or(NonZeroU32::MIN));
    if let Some(n) = std::num::NonZeroUsize::new(MAX_DATAGRAM) {
        c.max_packet_size = n;
    }
    c
}

impl Membership {
    /// Membership for `me`; `seed` makes the random choices repeatable in tests.
    pub fn new(me: AgentId, config: Config, seed: u64) -> Self {
        Membership {
            foca: Foca::new(me, config, StdRng::seed_from_u64(seed), PostcardCodec),
            runtime: foca::AccumulatingRuntime::new(),
            joined: false,
        }
    }

    fn drain(&mut self) -> Effects {
        let mut fx = Effects::default();
        while let Some((to, data)) = self.runtime.to_send() {
            fx.send.push((to, data));
        }
        while let Some(t) = self.runtime.to_schedule() {
            fx.timers.push(t);
        }
        while let Some(n) = self.runtime.to_notify() {
            let event = match n {
                foca::OwnedNotification::MemberUp(id) => Some(Event::Up(id)),
                foca::OwnedNotification::MemberDown(id) => Some(Event::Down(id)),
                foca::OwnedNotification::Active => {
                    self.joined = true;
                    Some(Event::Joined)
                }
                foca::OwnedNotification::Idle => Some(Event::Alone),
                foca::OwnedNotification::Rejoin(id) => Some(Event::Rejoined(id)),
                _ => None,
            };
            fx.events.extend(event);
        }
        fx
    }

    fn run(&mut self, r: Result<(), foca::Error>) -> Result<Effects, MembershipError> {
        let fx = self.drain();
        r.map(|()| fx).map_err(|e| MembershipError(e.to_string()))
    }

    /// Announces this agent to a seed.
    pub fn join(&mut self, seed: AgentId) -> Result<Effects, MembershipError> {
        let r = self.foca.announce(seed, &mut self.runtime);
        self.run(r)
    }

    /// The member a datagram says it comes from (its header's source), if
    /// it decodes. The shell checks it against the certificate of the
    /// connection it came over, so a peer speaks only for itself.
    pub fn sender_of(data: &[u8]) -> Option<AgentId> {
        PostcardCodec.decode_header(data).ok().map(|h| h.src)
    }

    /// Feeds a datagram from a peer. Bad datagrams are an error, never a panic.
    ///
    /// A member going down on its own datagram declared itself down: foca's
    /// leave. That is reported as [`Event::Left`], so a graceful stop is told
    /// apart from a failure.
    pub fn handle_data(&mut self, data: &[u8]) -> Result<Effects, MembershipError> {
        let sender = Self::sender_of(data);
        let r = self.foca.handle_data(data, &mut self.runtime);
        let mut fx = self.run(r)?;
        if let Some(sender) = sender {
            for e in &mut fx.events {
                if matches!(e, Event::Down(a) if *a == sender) {
                    *e = Event::Left(sender.clone());
                }
            }
        }
        Ok(fx)
    }

    /// Fires a timer scheduled earlier.
    pub fn handle_timer(&mut self, timer: Timer) -> Result<Effects, MembershipError> {
        let r = self.foca.handle_timer(timer, &mut self.runtime);
        self.run(r)
    }

    /// Tells the cluster this agent leaves (graceful stop).
    pub fn leave(&mut self) -> Result<Effects, MembershipError> {
        let r = self.foca.leave_cluster(&mut self.runtime);
        self.run(r)
    }

    /// Whether the cluster knows this agent.
    pub fn joined(&self) -> bool {
        self.joined
    }

    /// This agent.
    pub fn me(&self) -> &AgentId {
        self.foca.identity()
    }

    /// Other members and their liveness (down members until foca forgets them).
    pub fn members(&self) -> Vec<(AgentId, Liveness)> {
        self.foca
            .iter_membership_state()
            .map(|m| {
                let l = match m.state() {
                    foca::State::Alive => Liveness::Alive,
                    foca::State::Suspect => Liveness::Suspect,
                    foca::State::Down => Liveness::Down,
                };
                (m.id().clone(), l)
            })
            .collect()
    }

    /// Members not down (this agent included), for placement.
    pub fn live(&self) -> Vec<AgentId> {
        let mut v: Vec<AgentId> = self.foca.iter_members().map(|m| m.id().clone()).collect();
        v.push(self.me().clone());
        v.sort_by_key(|a| a.addr);
        v
    }
}

#[cfg(test)]
mod tests;
