//! Membership: the loop that runs the SWIM state machine
//! ([`shoal_cluster::membership`]): carries its datagrams, fires its timers,
//! and publishes who is up, suspected, down or gone as the [`ClusterView`].

use super::{
    speaks_for_itself, view_of, ClusterView, ExpectedDowns, Input, NameConflict, Peers, JOIN_RETRY,
    RECONNECT_INTERVAL,
};
use crate::metrics::Metrics;
use shoal_cluster::membership::{AgentId, Effects, Event, Liveness, Membership};
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::sync::{mpsc, watch};

pub(super) async fn run_membership(
    mut m: Membership,
    (seeds, mut known): (Vec<SocketAddr>, Vec<SocketAddr>),
    peers: Peers,
    (mut input, timers): (mpsc::Receiver<Input>, mpsc::Sender<Input>),
    view: watch::Sender<ClusterView>,
    metrics: Arc<Metrics>,
    expected: Arc<ExpectedDowns>,
) {
    let seeded = !seeds.is_empty();
    let apply = |m: &Membership, fx: Effects| {
        for (to, data) in fx.send {
            peers.send(to.addr, data);
        }
        for (after, timer) in fx.timers {
            let tx = timers.clone();
            tokio::spawn(async move {
                tokio::time::sleep(after).await;
                let _ = tx.send(Input::Timer(timer)).await;
            });
        }
        // Alone because the last other member left on purpose: nothing failed.
        let someone_left = fx.events.iter().any(|e| matches!(e, Event::Left(_)));
        for e in &fx.events {
            match e {
                Event::Up(a) => {
                    expected.back_up(&a.node);
                    tracing::info!(node = %a.node, addr = %a.addr, "member up")
                }
                // It said so itself: a graceful stop (often the whole mesh
                // stopping at once, its signal ahead of this agent's).
                Event::Left(a) => {
                    expected.left(&a.node);
                    tracing::info!(node = %a.node, addr = %a.addr, "member left")
                }
                // A member that said it leaves, or any while this agent
                // stops (the whole mesh stopping), going down is expected.
                Event::Down(a) => match expected.down_expected(&a.node) {
                    Some(why) => {
                        tracing::info!(node = %a.node, addr = %a.addr, "member down ({why})")
                    }
                    None => tracing::warn!(node = %a.node, addr = %a.addr, "member down"),
                },
                Event::Alone if expected.stopping.load(std::sync::atomic::Ordering::Acquire) => {
                    tracing::info!("no other member is alive (this agent is stopping too)")
                }
                Event::Alone if someone_left => {
                    tracing::info!("no other member is alive (the last one left)")
                }
                Event::Joined => tracing::info!(me = %m.me().node, "joined the mesh"),
                Event::Alone => tracing::warn!("no other member is alive"),
                Event::Rejoined(a) => {
                    tracing::warn!(incarnation = a.incarnation, "declared down; rejoined")
                }
            }
        }
    };
    let mut retry = tokio::time::interval(JOIN_RETRY);
    let mut reconnect = tokio::time::interval(RECONNECT_INTERVAL);
    reconnect.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Set once another agent turns out to have this agent's name: it then
    // leaves and takes no further part in gossip.
    let mut refused: Option<NameConflict> = None;
    loop {
        tokio::select! {
            got = input.recv() => match got {
                Some(Input::Datagram(..) | Input::Timer(_) | Input::Discovered(_)) if refused.is_some() => {}
                Some(Input::Discovered(addrs)) => {
                    // Announced to now, and every reconnect interval until
                    // members: two meshes that formed apart merge this way.
                    let me = m.me().addr;
                    for addr in addrs {
                        if addr != me && !known.contains(&addr) {
                            if let Ok(fx) = m.join(AgentId::seed(addr)) {
                                apply(&m, fx);
                            }
                            known.push(addr);
                        }
                    }
                }
                Some(Input::Datagram(d, bound)) if !speaks_for_itself(&d, bound.as_deref()) => {
                    metrics.mesh_invalid_messages.get_or_create(&crate::metrics::ReasonLabel { reason: "unknown_sender" }).inc();
                    tracing::debug!(peer = ?bound, "gossip datagram in another member's name dropped");
                }
                Some(Input::Datagram(d, _)) => match m.handle_data(&d) {
                    Ok(fx) => apply(&m, fx),
                    Err(e) => {
                        metrics.mesh_bad_datagrams.inc();
                        tracing::debug!(error = %e, "bad gossip datagram");
                    }
                },
                Some(Input::Timer(t)) => {
                    if let Ok(fx) = m.handle_timer(t) {
                        apply(&m, fx);
                    }
                }
                Some(Input::Leave(done)) => {
                    if let Ok(fx) = m.leave() {
                        apply(&m, fx);
                    }
                    let _ = done.send(());
                    return;
                }
                None => return,
            },
            _ = reconnect.tick(), if refused.is_none() => {
                let members = m.members();
                let mut down: Vec<SocketAddr> = members
                    .iter()
                    .filter(|(_, l)| *l == Liveness::Down)
                    .map(|(a, _)| a.addr)
                    .collect();
                // Last run's members that gossip does not list yet.
                down.extend(
                    known
                        .iter()
                        .filter(|k| !members.iter().any(|(a, _)| a.addr == **k)),
                );
                for addr in down {
                    if let Ok(fx) = m.join(AgentId::seed(addr)) {
                        apply(&m, fx);
                    }
                }
            }
            _ = retry.tick(), if seeded && !m.joined() && refused.is_none() => {
                for s in &seeds {
                    if let Ok(fx) = m.join(AgentId::seed(*s)) {
                        apply(&m, fx);
                    }
                }
            }
        }
        let mut v = view_of(&m, seeded);
        // Gossip passes on what members say about others, so a name
        // conflict counts only once the holder spoke for itself: over a
        // connection whose certificate is bound to that name (or binds none).
        // Until then a member claiming this agent's name is a rumour.
        if v.name_conflict
            .as_ref()
            .is_some_and(|c| !peers.holds_name(c.holder, &c.node))
        {
            v.name_conflict = None;
        }
        if refused.is_none() {
            if let Some(conflict) = v.name_conflict.clone() {
                tracing::error!(node = %conflict.node, holder = %conflict.holder, "{}", conflict.message());
                metrics.mesh_name_conflicts.inc();
                if let Ok(fx) = m.leave() {
                    apply(&m, fx);
                }
                refused = Some(conflict);
            }
        }
        if let Some(conflict) = &refused {
            v.name_conflict = Some(conflict.clone());
            v.joined = false;
        }
        for state in [Liveness::Alive, Liveness::Suspect, Liveness::Down] {
            let n = v.members.iter().filter(|x| x.state == state).count()
                + usize::from(state == Liveness::Alive);
            metrics
                .mesh_members
                .get_or_create(&crate::metrics::StateLabel {
                    state: liveness_label(state),
                })
                .set(n as i64);
        }
        view.send_if_modified(|old| {
            let changed = old.joined != v.joined
                || old.members != v.members
                || old.name_conflict != v.name_conflict;
            if changed {
                *old = v;
            }
            changed
        });
    }
}

fn liveness_label(l: Liveness) -> &'static str {
    match l {
        Liveness::Alive => "alive",
        Liveness::Suspect => "suspect",
        Liveness::Down => "down",
    }
}
