//! Membership and the roster: what this agent knows of the other members
//! (from gossip, from peers' rosters, and from the members file kept between
//! runs), and the change notifications that follow it.

use super::{lock, Inner, Known, Router};
use crate::delivery::Subscriptions;
use serde::Serialize;
use shoal_cluster::membership::Liveness;
use shoal_cluster::placement::Member;
use shoal_proto::{Message, RosterMember};
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use tokio::sync::watch;

/// File in the data directory that keeps the known members between runs.
pub const MEMBERS_FILE: &str = "mesh-members.json";

/// A member as [`MEMBERS_FILE`] keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub(super) struct SavedMember {
    pub(super) node: String,
    pub(super) addr: SocketAddr,
    pub(super) broker: bool,
    pub(super) incarnation: u64,
    #[serde(default)]
    pub(super) departed: bool,
}

impl From<RosterMember> for SavedMember {
    fn from(m: RosterMember) -> Self {
        SavedMember {
            node: m.node,
            addr: m.addr,
            broker: m.broker,
            incarnation: m.incarnation,
            departed: m.departed,
        }
    }
}

/// The contents of [`MEMBERS_FILE`].
#[derive(Debug, Default, Serialize, serde::Deserialize)]
pub(super) struct SavedMembers {
    pub(super) members: Vec<SavedMember>,
}

impl Router {
    /// Tells the replication shell who the members are now.
    pub(super) fn share_members(&self) {
        let Some(r) = self.replication.get() else {
            return;
        };
        let members: Vec<_> = {
            let inner = lock(&self.inner);
            inner
                .known
                .iter()
                .map(|(n, k)| {
                    (
                        n.clone(),
                        k.addr,
                        k.broker,
                        k.state,
                        inner.departed.contains_key(n),
                    )
                })
                .collect()
        };
        r.set_members(&members);
    }

    /// Writes the known members to [`MEMBERS_FILE`] when they changed.
    pub(super) fn save_members(&self) {
        let Some((path, last)) = &self.members_file else {
            return;
        };
        let saved = SavedMembers {
            members: Self::member_records(&lock(&self.inner))
                .into_iter()
                .filter(|m| m.node != self.me)
                .map(SavedMember::from)
                .collect(),
        };
        let Ok(text) = serde_json::to_string_pretty(&saved) else {
            return;
        };
        let mut last = lock(last);
        if *last == text {
            return;
        }
        let tmp = path.with_extension("json.tmp");
        let written =
            std::fs::write(&tmp, text.as_bytes()).and_then(|()| std::fs::rename(&tmp, path));
        match written {
            Ok(()) => *last = text,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot keep the mesh members for the next start")
            }
        }
    }

    /// Connects the router to the subscriptions, the broker's topic changes
    /// and the mesh, and follows membership.
    pub fn start(self: &Arc<Self>, subs: &Arc<Subscriptions>) {
        let _ = self.subs.set(Arc::downgrade(subs));
        let weak = Arc::downgrade(self);
        self.broker.set_topic_hook(Box::new(move |name| {
            if let Some(r) = weak.upgrade() {
                r.share_topic(name);
            }
        }));
        let weak = Arc::downgrade(self);
        self.broker.set_groups_hook(Box::new(move |topic| {
            weak.upgrade().map_or_else(Vec::new, |r| r.groups_of(topic))
        }));
        self.mesh.set_handler(self.clone());
        let mut view = self.mesh.watch();
        let router = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let Some(r) = router.upgrade() else { return };
                r.on_view();
                drop(r);
                if view.changed().await.is_err() {
                    return;
                }
            }
        });
    }

    /// Bumped whenever placement, the catalog or group membership changes.
    pub fn watch(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    pub(super) fn bump(&self) {
        self.changed.send_modify(|g| *g += 1);
    }

    pub(super) fn subs(&self) -> Option<Arc<Subscriptions>> {
        self.subs.get().and_then(Weak::upgrade)
    }

    fn on_view(self: &Arc<Self>) {
        let view = self.mesh.view();
        if let Some(conflict) = &view.name_conflict {
            if !self.refused.swap(true, Ordering::AcqRel) {
                self.joined.store(false, Ordering::Release);
                tracing::error!("router: {}", conflict.message());
                self.bump();
            }
            return;
        }
        {
            let mut inner = lock(&self.inner);
            for m in view.me.iter().chain(view.members.iter()) {
                if m.node.is_empty() {
                    continue;
                }
                // Two agents with one name: the one that had it first is the
                // member; the other leaves the mesh when it notices.
                let me_named = view.me.as_ref().is_some_and(|me| me.node == m.node);
                let taken = if me_named {
                    view.me.as_ref().is_some_and(|me| me.addr != m.addr)
                } else {
                    view.members
                        .iter()
                        .any(|o| crate::mesh::name_taken_by(m, o))
                };
                if taken {
                    continue;
                }
                if inner
                    .departed
                    .get(&m.node)
                    .is_some_and(|inc| m.incarnation > *inc && m.state != Liveness::Down)
                {
                    inner.departed.remove(&m.node);
                }
                let known = inner.known.get(&m.node);
                // A stale record of an older incarnation says nothing new.
                if known.is_some_and(|k| k.incarnation > m.incarnation) {
                    continue;
                }
                inner.known.insert(
                    m.node.clone(),
                    Known {
                        addr: m.addr,
                        broker: m.broker,
                        state: m.state,
                        incarnation: m.incarnation,
                    },
                );
            }
            // Members gossip forgot are down until they return.
            let listed: BTreeSet<&str> = view
                .me
                .iter()
                .chain(view.members.iter())
                .map(|m| m.node.as_str())
                .collect();
            for (node, k) in inner.known.iter_mut() {
                if !listed.contains(node.as_str()) {
                    k.state = Liveness::Down;
                }
            }
            // A down agent's consumers are gone: others take its partitions.
            let down: Vec<String> = inner
                .known
                .iter()
                .filter(|(_, k)| k.state == Liveness::Down)
                .map(|(n, _)| n.clone())
                .collect();
            for n in down {
                inner.remote_subs.remove(&n);
            }
            Self::recompute_members(&mut inner);
        }
        self.save_members();
        self.share_members();
        self.refresh_assignment();
        if view.joined && !self.joined.swap(true, Ordering::AcqRel) {
            tracing::info!("router: joined; taking up partitions");
        }
        self.reconcile();
        self.bump();
    }

    pub(super) fn recompute_members(inner: &mut Inner) {
        let mut members: Vec<Member> = inner
            .known
            .iter()
            .filter(|(n, _)| !inner.departed.contains_key(*n))
            .map(|(n, k)| Member {
                id: n.clone(),
                broker: k.broker,
            })
            .collect();
        members.sort();
        inner.members = members;
    }

    pub(super) fn roster(&self) -> Message {
        Message::Roster {
            members: Self::member_records(&lock(&self.inner)),
        }
    }

    /// Every member known, as the roster greeting and the members file keep
    /// it (a departed member with the incarnation it left with).
    fn member_records(inner: &Inner) -> Vec<RosterMember> {
        inner
            .known
            .iter()
            .map(|(node, k)| RosterMember {
                node: node.clone(),
                addr: k.addr,
                broker: k.broker,
                incarnation: inner.departed.get(node).copied().unwrap_or(k.incarnation),
                departed: inner.departed.contains_key(node),
            })
            .collect()
    }

    /// Learns members a peer knows: down ones gossip forgot still hold their
    /// partitions, and departed ones hold none.
    pub(super) fn merge_roster(self: &Arc<Self>, members: Vec<RosterMember>) {
        let mut changed = false;
        {
            let mut inner = lock(&self.inner);
            for m in members {
                if m.node.is_empty() || m.node == self.me {
                    continue;
                }
                match inner.known.get(&m.node) {
                    None => {
                        inner.known.insert(
                            m.node.clone(),
                            Known {
                                addr: m.addr,
                                broker: m.broker,
                                state: Liveness::Down,
                                incarnation: m.incarnation,
                            },
                        );
                        changed = true;
                    }
                    Some(k) if k.state == Liveness::Down && m.incarnation > k.incarnation => {
                        let state = k.state;
                        inner.known.insert(
                            m.node.clone(),
                            Known {
                                addr: m.addr,
                                broker: m.broker,
                                state,
                                incarnation: m.incarnation,
                            },
                        );
                        changed = true;
                    }
                    _ => {}
                }
                let current = inner.known.get(&m.node).map_or(0, |k| k.incarnation);
                if m.departed && m.incarnation >= current && !inner.departed.contains_key(&m.node) {
                    inner.departed.insert(m.node.clone(), m.incarnation);
                    inner.remote_subs.remove(&m.node);
                    changed = true;
                }
            }
            if changed {
                Self::recompute_members(&mut inner);
            }
        }
        if changed {
            self.save_members();
            self.refresh_assignment();
            self.reconcile();
            self.bump();
        }
    }

    /// Whether `node` is a member this agent knows at `from`.
    pub(super) fn is_member_at(&self, node: &str, from: SocketAddr) -> bool {
        lock(&self.inner)
            .known
            .get(node)
            .is_some_and(|k| k.addr == from)
    }

    /// Whether `from` is the address of a member other than this agent.
    pub(super) fn is_member_addr(&self, from: SocketAddr) -> bool {
        lock(&self.inner)
            .known
            .iter()
            .any(|(n, k)| *n != self.me && k.addr == from)
    }
}

/// Mesh addresses of the members `data_dir`'s [`MEMBERS_FILE`] keeps from
/// the last run (not this agent, not those that left).
pub fn saved_member_addrs(data_dir: &std::path::Path, me: &str) -> Vec<SocketAddr> {
    load_members(&data_dir.join(MEMBERS_FILE))
        .members
        .into_iter()
        .filter(|m| m.node != me && !m.departed)
        .map(|m| m.addr)
        .collect()
}

/// Reads [`MEMBERS_FILE`]; a missing or unreadable file is an empty list
/// (this agent then learns its members from gossip, as on a first start).
pub(super) fn load_members(path: &std::path::Path) -> SavedMembers {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return SavedMembers::default(),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot read the mesh members kept from the last run; starting without them");
            return SavedMembers::default();
        }
    };
    serde_json::from_str(&text).unwrap_or_else(|e| {
        tracing::warn!(path = %path.display(), error = %e, "the mesh members kept from the last run are unreadable; starting without them");
        SavedMembers::default()
    })
}
