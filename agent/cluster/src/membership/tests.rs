//! A simulated cluster stepped by hand: a virtual clock, a message queue,
//! and agents that crash (drop everything) or leave gracefully.

use super::*;
use std::collections::{BTreeMap, HashMap, VecDeque};

struct Sim {
    now: Duration,
    agents: Vec<Option<Membership>>,
    by_addr: HashMap<SocketAddr, usize>,
    timers: BTreeMap<(Duration, u64), (usize, Timer)>,
    seq: u64,
    queue: VecDeque<(usize, bytes::Bytes)>,
    delivered: u64,
    /// Every event, with the agent that saw it.
    events: Vec<(usize, Event)>,
}

fn addr(i: usize) -> SocketAddr {
    SocketAddr::from(([10, 0, (i / 250) as u8, (i % 250) as u8 + 1], 4701))
}

fn id(i: usize, incarnation: u64) -> AgentId {
    AgentId {
        addr: addr(i),
        node: format!("agent-{i}"),
        incarnation,
        broker: true,
    }
}

impl Sim {
    fn new(n: usize) -> Sim {
        let mut sim = Sim {
            now: Duration::ZERO,
            agents: Vec::new(),
            by_addr: HashMap::new(),
            timers: BTreeMap::new(),
            seq: 0,
            queue: VecDeque::new(),
            delivered: 0,
            events: Vec::new(),
        };
        for i in 0..n {
            sim.by_addr.insert(addr(i), i);
            sim.agents.push(Some(Membership::new(
                id(i, 0),
                config(n as u32),
                i as u64 + 1,
            )));
        }
        sim
    }

    fn apply(&mut self, from: usize, fx: Effects) {
        self.events
            .extend(fx.events.iter().map(|e| (from, e.clone())));
        for (to, data) in fx.send {
            if let Some(&j) = self.by_addr.get(&to.addr) {
                if self.agents[from].is_some() {
                    self.queue.push_back((j, data));
                }
            }
        }
        for (after, timer) in fx.timers {
            self.seq += 1;
            self.timers
                .insert((self.now + after, self.seq), (from, timer));
        }
    }

    fn join(&mut self, i: usize, seed: usize) {
        let fx = self.agents[i]
            .as_mut()
            .unwrap()
            .join(AgentId::seed(addr(seed)))
            .unwrap();
        self.apply(i, fx);
    }

    fn deliver_all(&mut self) {
        while let Some((to, data)) = self.queue.pop_front() {
            if let Some(m) = self.agents[to].as_mut() {
                self.delivered += 1;
                // Datagrams from a crashed incarnation may be stale; errors are the shell's to log.
                if let Ok(fx) = m.handle_data(&data) {
                    self.apply(to, fx);
                }
            }
        }
    }

    fn run_for(&mut self, d: Duration) {
        let end = self.now + d;
        self.deliver_all();
        while let Some((&(at, seq), _)) = self.timers.iter().next() {
            if at > end {
                break;
            }
            let Some((i, timer)) = self.timers.remove(&(at, seq)) else {
                break;
            };
            self.now = at;
            if let Some(m) = self.agents[i].as_mut() {
                if let Ok(fx) = m.handle_timer(timer) {
                    self.apply(i, fx);
                }
            }
            self.deliver_all();
        }
        self.now = end;
    }

    fn live_view(&self, i: usize) -> Vec<SocketAddr> {
        self.agents[i]
            .as_ref()
            .unwrap()
            .live()
            .iter()
            .map(|a| a.addr)
            .collect()
    }

    fn running(&self) -> Vec<usize> {
        (0..self.agents.len())
            .filter(|&i| self.agents[i].is_some())
            .collect()
    }
}

fn joined_cluster(n: usize) -> Sim {
    let mut sim = Sim::new(n);
    for i in 1..n {
        sim.join(i, 0);
    }
    sim.run_for(Duration::from_secs(30));
    sim
}

#[test]
fn a_hundred_agents_join_through_one_seed_and_agree() {
    let sim = joined_cluster(100);
    let expected: Vec<SocketAddr> = {
        let mut v: Vec<SocketAddr> = (0..100).map(addr).collect();
        v.sort();
        v
    };
    for i in 0..100 {
        assert!(sim.agents[i].as_ref().unwrap().joined(), "agent {i} joined");
        assert_eq!(sim.live_view(i), expected, "agent {i} sees everyone");
    }
}

#[test]
fn a_crashed_agent_is_suspected_then_declared_down_by_all() {
    let mut sim = joined_cluster(100);
    sim.agents[57] = None;
    sim.run_for(Duration::from_secs(2));
    // Within a couple of probe periods someone suspects it; nobody has forgotten it yet.
    let suspected = sim
        .running()
        .iter()
        .filter(|&&i| {
            sim.agents[i]
                .as_ref()
                .unwrap()
                .members()
                .iter()
                .any(|(a, l)| a.addr == addr(57) && *l == Liveness::Suspect)
        })
        .count();
    assert!(suspected > 0, "suspicion precedes the verdict");
    sim.run_for(Duration::from_secs(60));
    for i in sim.running() {
        let view = sim.live_view(i);
        assert!(
            !view.contains(&addr(57)),
            "agent {i} still counts the crashed agent live"
        );
        assert_eq!(view.len(), 99, "agent {i}");
    }
}

/// What agent `i` was told about agent `about`: `Down` or `Left` events.
fn downs_seen(sim: &Sim, i: usize, about: usize) -> Vec<Event> {
    sim.events
        .iter()
        .filter(|(at, e)| {
            *at == i && matches!(e, Event::Down(a) | Event::Left(a) if a.addr == addr(about))
        })
        .map(|(_, e)| e.clone())
        .collect()
}

#[test]
fn a_graceful_leave_is_reported_as_left_and_a_crash_as_down() {
    let mut sim = joined_cluster(3);
    let fx = sim.agents[2].as_mut().unwrap().leave().unwrap();
    sim.apply(2, fx);
    sim.deliver_all();
    sim.agents[2] = None;
    sim.run_for(Duration::from_secs(10));
    for i in [0, 1] {
        assert_eq!(
            downs_seen(&sim, i, 2),
            vec![Event::Left(id(2, 0))],
            "agent {i} heard the leave from the leaver itself"
        );
    }
    // A crash says nothing: found by probes, it is a failure.
    sim.agents[1] = None;
    sim.run_for(Duration::from_secs(30));
    assert_eq!(downs_seen(&sim, 0, 1), vec![Event::Down(id(1, 0))]);
}

#[test]
fn a_leaving_agent_is_dropped_and_a_restarted_one_rejoins_with_a_new_incarnation() {
    let mut sim = joined_cluster(20);
    let fx = sim.agents[7].as_mut().unwrap().leave().unwrap();
    sim.apply(7, fx);
    sim.deliver_all();
    sim.agents[7] = None;
    sim.run_for(Duration::from_secs(10));
    for i in sim.running() {
        assert!(
            !sim.live_view(i).contains(&addr(7)),
            "agent {i} dropped the leaver"
        );
    }
    // The pod restarts on the same address with the next incarnation.
    sim.agents[7] = Some(Membership::new(id(7, 1), config(20), 99));
    sim.join(7, 0);
    sim.run_for(Duration::from_secs(30));
    for i in sim.running() {
        let m = sim.agents[i].as_ref().unwrap();
        let seen: Vec<AgentId> = m.live().into_iter().filter(|a| a.addr == addr(7)).collect();
        assert_eq!(seen.len(), 1, "agent {i}");
        assert_eq!(
            seen[0].incarnation, 1,
            "agent {i} knows the new incarnation"
        );
    }
}

#[test]
fn garbage_datagrams_are_errors_not_panics() {
    let mut m = Membership::new(id(0, 0), config(3), 1);
    let mut rng = 0x1234_5678u64;
    for len in 0..300 {
        let data: Vec<u8> = (0..len)
            .map(|_| {
                rng = rng
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (rng >> 56) as u8
            })
            .collect();
        let _ = m.handle_data(&data);
    }
    assert!(m.members().is_empty());
}
