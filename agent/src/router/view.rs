//! The cluster view: partitions and their homes for `GET /v1/cluster`, and
//! partition figures (offsets, sizes) for `GET /v1/topics`.

use super::{lock, Home, Router, STATS_CALL};
use crate::mesh::Replier;
use crate::replication::Route;
use crate::topic::{Partition, Role, Topic};
use serde::Serialize;
use shoal_proto::{Message, PartitionStats};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

impl Router {
    /// Partitions of every topic and their homes, for `GET /v1/cluster`.
    pub fn partition_view(&self) -> Vec<PartitionView> {
        let mut out = Vec::new();
        for topic in self.broker.topics() {
            if let Some(r) = self.replicated(&topic.name) {
                for p in topic.partitions() {
                    let (home, available) = match r.route(&topic.name, p.id) {
                        Route::Local => (self.me.clone(), true),
                        Route::Peer { node, .. } => (node, true),
                        Route::Unavailable => (String::new(), false),
                    };
                    out.push(PartitionView {
                        topic: topic.name.to_string(),
                        partition: p.id,
                        home,
                        available,
                        role: "replicated",
                    });
                }
                continue;
            }
            for p in topic.partitions() {
                let (home, available) = match self.home(&topic.name, p.id) {
                    Home::Me => (self.me.clone(), p.role() == Role::Serving),
                    Home::Peer { node, .. } => (node, true),
                    Home::Down { node } => (node, false),
                    Home::Nobody => (String::new(), false),
                };
                out.push(PartitionView {
                    topic: topic.name.to_string(),
                    partition: p.id,
                    home,
                    available,
                    role: p.role().as_str(),
                });
            }
        }
        out
    }

    /// Figures (offsets, size) of every partition of `topics`, as their
    /// homes have them: this agent's own for partitions it serves, asked of
    /// the other homes over the mesh (one call per topic and home, all at
    /// once) for the rest. A home that is down or does not answer within
    /// [`STATS_CALL`] leaves this agent's copy's figures, marked as not from
    /// the home.
    pub async fn topics_stats(&self, topics: &[Arc<Topic>]) -> Vec<Vec<PartitionFigures>> {
        let mut out: Vec<Vec<PartitionFigures>> = Vec::with_capacity(topics.len());
        let mut calls = Vec::new();
        for (ti, topic) in topics.iter().enumerate() {
            let mut figures = Vec::new();
            let mut ask: BTreeMap<(String, SocketAddr), Vec<u32>> = BTreeMap::new();
            let repl = self.replicated(&topic.name);
            for p in topic.partitions() {
                let target = match repl {
                    None => self.home(&topic.name, p.id),
                    Some(r) => match r.route(&topic.name, p.id) {
                        Route::Local => {
                            figures.push(PartitionFigures {
                                stats: r
                                    .stats(&topic.name, p.id)
                                    .unwrap_or_else(|| local_stats(&p)),
                                home: self.me.clone(),
                                from_home: true,
                            });
                            continue;
                        }
                        Route::Peer { node, addr } => Home::Peer { node, addr },
                        Route::Unavailable => Home::Nobody,
                    },
                };
                let (home, from_home) = match target {
                    Home::Me => (self.me.clone(), p.role() == Role::Serving),
                    Home::Peer { node, addr } => {
                        ask.entry((node.clone(), addr)).or_default().push(p.id);
                        (node, false)
                    }
                    Home::Down { node } => (node, false),
                    Home::Nobody => (String::new(), false),
                };
                figures.push(PartitionFigures {
                    stats: local_stats(&p),
                    home,
                    from_home,
                });
            }
            out.push(figures);
            for ((node, addr), partitions) in ask {
                let mesh = self.mesh.clone();
                let name = topic.name.to_string();
                // Spawned, so every home is asked at once.
                let call = tokio::spawn(async move {
                    mesh.call(addr, STATS_CALL, |req| Message::Stats {
                        req,
                        topic: name,
                        partitions,
                    })
                    .await
                });
                calls.push((ti, node, call));
            }
        }
        for (ti, node, call) in calls {
            let stats = match call.await {
                Ok(Ok(Message::StatsAnswer {
                    result: Ok(stats), ..
                })) => stats,
                Ok(Err(e)) => {
                    tracing::debug!(peer = %node, error = %e, "cannot ask a home for its partition figures");
                    continue;
                }
                _ => continue,
            };
            let Some(figures) = out.get_mut(ti) else {
                continue;
            };
            for st in stats {
                if let Some(f) = figures
                    .iter_mut()
                    .find(|f| f.stats.partition == st.partition && f.home == node)
                {
                    f.stats = st;
                    f.from_home = true;
                }
            }
        }
        out
    }

    pub(super) fn serve_stats(
        self: Arc<Self>,
        req: u64,
        topic: String,
        partitions: Vec<u32>,
        reply: Replier,
    ) {
        tokio::spawn(async move {
            let repl = self.replicated(&topic).cloned();
            let stats = self.broker.topic(&topic).map_or_else(Vec::new, |t| {
                if let Some(r) = &repl {
                    return partitions
                        .into_iter()
                        .filter_map(|id| r.stats(&topic, id))
                        .collect();
                }
                partitions
                    .into_iter()
                    .filter_map(|id| t.partition(id))
                    .filter(|p| p.role() == Role::Serving && self.home(&topic, p.id) == Home::Me)
                    .map(|p| local_stats(&p))
                    .collect()
            });
            reply.send(Message::StatsAnswer {
                req,
                result: Ok(stats),
            });
        });
    }

    /// Nodes that left gracefully and have not returned.
    pub fn departed(&self) -> Vec<String> {
        lock(&self.inner).departed.keys().cloned().collect()
    }
}

/// A partition's figures for `GET /v1/topics`, and where they come from.
#[derive(Clone, Debug)]
pub struct PartitionFigures {
    /// Offsets and size.
    pub stats: PartitionStats,
    /// The home agent's node name (empty when no agent can be home).
    pub home: String,
    /// True when the figures are the home's; false when they are this
    /// agent's copy because the home could not be asked.
    pub from_home: bool,
}

/// A partition's figures as this agent's copy has them.
pub fn local_stats(p: &Partition) -> PartitionStats {
    let (bytes, segments) = p.storage_size();
    PartitionStats {
        partition: p.id,
        first_offset: p.first_index(),
        next_offset: p.committed() + 1,
        bytes,
        segments: segments as u64,
    }
}

/// A partition and its home, for `GET /v1/cluster`.
#[derive(Clone, Debug, Serialize)]
pub struct PartitionView {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: u32,
    /// Home agent's node name.
    pub home: String,
    /// Whether publishes to it can be stored now.
    pub available: bool,
    /// This agent's role for it.
    pub role: &'static str,
}
