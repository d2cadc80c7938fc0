//! Views and figures of the replicas held here: per-group state for the
//! cluster view, consumer lag and positions, and partition figures.

use super::{lock, Peers, Replication};
use crate::topic::TOPIC_NAMESPACE;
use serde::Serialize;
use shoal_replica::command::Command;
use shoal_replica::disk::{DiskStore, SyncPolicy};
use shoal_replica::store::LogStore;
use shoal_replica::NodeId;
use std::collections::BTreeMap;

impl Replication {
    /// The node name of the replica `id`, as people read it (an id no
    /// member has, in hex).
    pub(super) fn node_name(&self, peers: &Peers, id: NodeId) -> String {
        if id == self.me_id {
            self.me.clone()
        } else {
            peers
                .by_id
                .get(&id)
                .map_or_else(|| format!("#{id:016x}"), |(n, _)| n.clone())
        }
    }

    /// Messages between `from` and the commit index of a group held here
    /// (control entries not counted). Reads at most 1 MiB of the log; past
    /// that, the remaining entries are counted as messages (an upper bound).
    fn messages_from(grp: &shoal_replica::group::Group<DiskStore>, from: u64) -> u64 {
        let status = grp.status();
        let end = status.commit.min(grp.store().last_index());
        let from = from.max(grp.store().first_index());
        if from > end {
            return 0;
        }
        let Ok(entries) = grp.store().entries(from, end + 1, 1 << 20) else {
            return end + 1 - from;
        };
        let last = entries.last().map_or(from.saturating_sub(1), |e| e.index);
        let counted = entries
            .iter()
            .filter(|e| matches!(Command::decode(&e.data), Ok(Command::Message { .. })))
            .count() as u64;
        counted + end.saturating_sub(last)
    }

    /// The lag of `groups` on the partitions of `topic` this agent leads:
    /// (partition, group, messages not acknowledged), for the lag metric.
    pub fn lag(&self, topic: &str, groups: &[String]) -> Vec<(u32, String, u64)> {
        let core = lock(&self.core);
        let mut out = Vec::new();
        for g in core.driver.groups() {
            if g.topic != topic || g.namespace != TOPIC_NAMESPACE {
                continue;
            }
            let Some(grp) = core.driver.group(g) else {
                continue;
            };
            if grp.status().leader != Some(self.me_id) {
                continue;
            }
            for name in groups {
                if let Some(next) = grp.state().offset(name) {
                    out.push((g.partition, name.clone(), Self::messages_from(grp, next)));
                }
            }
        }
        out
    }

    /// A consumer group's position on a replicated partition this agent
    /// holds a replica of: (committed offset, end offset, messages between).
    pub fn position(
        &self,
        topic: &str,
        partition: u32,
        group: &str,
    ) -> Option<(Option<u64>, u64, Option<u64>)> {
        let g = self.group_id(topic, partition);
        let core = lock(&self.core);
        let grp = core.driver.group(&g)?;
        let end = grp.status().commit + 1;
        let committed = grp.state().offset(group);
        let lag = committed.map(|c| Self::messages_from(grp, c));
        Some((committed, end, lag))
    }

    /// A replicated partition's figures as this agent's replica has them
    /// (offsets are Raft indexes: the log's control entries count too).
    pub fn stats(&self, topic: &str, partition: u32) -> Option<shoal_proto::PartitionStats> {
        let g = self.group_id(topic, partition);
        let core = lock(&self.core);
        let grp = core.driver.group(&g)?;
        let status = grp.status();
        let log = grp.store().log();
        Some(shoal_proto::PartitionStats {
            partition,
            first_offset: status.first_index,
            next_offset: status.commit + 1,
            bytes: log.size_bytes(),
            segments: log.segment_count() as u64,
        })
    }

    /// Per-partition replication state as this agent sees it, for the
    /// cluster view.
    pub fn view(&self) -> Vec<ReplicaView> {
        let core = lock(&self.core);
        let peers = lock(&self.peers);
        let name = |id: NodeId| self.node_name(&peers, id);
        core.driver
            .groups()
            .filter_map(|g| core.driver.status(g).map(|s| (g, s)))
            .map(|(g, s)| ReplicaView {
                namespace: g.namespace.clone(),
                topic: g.topic.clone(),
                partition: g.partition,
                leader: s.leader.map(name),
                term: s.term,
                commit_index: s.commit,
                last_index: s.last_index,
                voters: s.voters.iter().map(|v| name(*v)).collect(),
                learners: s.learners.iter().map(|v| name(*v)).collect(),
                lag: s
                    .matched
                    .iter()
                    .map(|(id, m)| (name(*id), s.last_index.saturating_sub(*m)))
                    .collect(),
                hibernating: s.hibernating,
                recovering: s.recovering,
                fsync: core.driver.group(g).map_or("always", |grp| {
                    match grp.store().sync_policy() {
                        SyncPolicy::Always => "always",
                        SyncPolicy::Interval => "interval",
                        SyncPolicy::Never => "never",
                    }
                }),
            })
            .collect()
    }
}

/// One replica of a partition's group, as its agent sees it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaView {
    /// Namespace.
    pub namespace: String,
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: u32,
    /// The group's leader as known here.
    pub leader: Option<String>,
    /// Raft term.
    pub term: u64,
    /// Highest index known committed.
    pub commit_index: u64,
    /// Last index held here.
    pub last_index: u64,
    /// Voters.
    pub voters: Vec<String>,
    /// Learners (catching up before they vote).
    pub learners: Vec<String>,
    /// On the leader: how many entries each other replica is behind.
    pub lag: BTreeMap<String, u64>,
    /// Not ticking (idle).
    pub hibernating: bool,
    /// Lost entries; does not vote until caught up.
    pub recovering: bool,
    /// When this replica's writes are fsynced (`always`, `interval`,
    /// `never`): its topic's fsync policy once this agent knows the topic.
    pub fsync: &'static str,
}
