//! The topic's settings on its replicas: retention (`maxAge`, `maxBytes`),
//! the fsync policy of each group's store, and the dedupe window proposed
//! through the log.

use super::{group_label, is_meta, sync_policy_of, Core, Replication};
use crate::topic::Retention;
use shoal_replica::command::Command;
use shoal_replica::disk::SyncPolicy;
use shoal_replica::state::DEFAULT_DEDUPE_WINDOW_MS;
use shoal_replica::store::LogStore;
use std::collections::HashMap;

/// Ticks (5 s) before a leader proposes a group's dedupe window again when
/// the last proposal has not been applied.
const WINDOW_RETRY_TICKS: u64 = 25;

impl Replication {
    /// Retention on every replica held here: messages older than the
    /// topic's `maxAge` (when `by_age`), and the oldest whole segments while
    /// the replica holds more than `maxBytes`, go (each replica on its own;
    /// a replica that falls behind the leader's log start catches up from a
    /// snapshot).
    pub(super) fn enforce_retention(&self, core: &mut Core, by_age: bool) {
        let now = crate::time::now_ms();
        let mut retention_of: HashMap<&str, Option<Retention>> = HashMap::new();
        // Only logs past a limit are read: sizes and oldest times are in memory.
        let mut due = Vec::new();
        for (g, grp) in core.driver.iter() {
            if is_meta(g) {
                continue;
            }
            let retention = *retention_of
                .entry(g.topic.as_str())
                .or_insert_with(|| self.broker.topic(&g.topic).map(|t| t.config().retention));
            let Some(retention) = retention else {
                continue;
            };
            let log = grp.store().log();
            let age_cutoff = retention
                .max_age
                .filter(|_| by_age)
                .map(|age| now.saturating_sub(age.as_millis() as u64))
                .filter(|cutoff| log.has_entries_older_than(*cutoff));
            let size_cut = retention
                .max_bytes
                .filter(|max| log.size_bytes() > *max)
                .map(|max| log.index_to_fit(max));
            if age_cutoff.is_some() || size_cut.is_some() {
                due.push((g.clone(), age_cutoff, size_cut.unwrap_or(0)));
            }
        }
        for (g, age_cutoff, size_cut) in due {
            let Some(grp) = core.driver.group(&g) else {
                continue;
            };
            let first = grp.store().first_index();
            let age_cut = match age_cutoff.map(|c| grp.store().log().index_at_time(c)) {
                None => 0,
                Some(Ok(i)) => i,
                Some(Err(e)) => {
                    tracing::warn!(group = %group_label(&g), error = %e, "retention could not read the log");
                    continue;
                }
            };
            let keep_from = age_cut.max(size_cut);
            if keep_from <= first {
                continue;
            }
            let segments = grp.store().log().segment_count();
            let result = core.driver.compact(&g, keep_from);
            let dropped = core.driver.group(&g).map_or(0, |grp| {
                segments.saturating_sub(grp.store().log().segment_count())
            });
            self.metrics
                .retention_deleted_segments
                .inc_by(dropped as u64);
            match result {
                Ok(()) => {
                    tracing::debug!(group = %group_label(&g), keep_from, dropped, "retention moved the log's start")
                }
                Err(e) => {
                    self.metrics
                        .storage_errors
                        .get_or_create(&crate::metrics::OpLabel { op: "retention" })
                        .inc();
                    tracing::warn!(group = %group_label(&g), error = %e, "retention failed")
                }
            }
        }
    }

    /// Brings every group's sync policy in line with its topic's fsync
    /// policy (a topic's config can change, and arrives after its groups
    /// may have been created by a peer's message). A store that cannot
    /// switch (its fsync failed) stops its replica, as a failed write does.
    pub(super) fn apply_sync_policies(&self, core: &mut Core) {
        let mut by_topic: HashMap<(&str, &str), SyncPolicy> = HashMap::new();
        // Only the groups whose store differs are touched: reaching a store
        // stirs its group, and 1,000 hibernating groups should stay asleep.
        let mut differ = Vec::new();
        for (g, grp) in core.driver.iter() {
            let policy = *by_topic
                .entry((g.namespace.as_str(), g.topic.as_str()))
                .or_insert_with(|| sync_policy_of(&self.broker, g));
            if grp.store().sync_policy() != policy {
                differ.push((g.clone(), policy));
            }
        }
        for (g, policy) in differ {
            let Some(store) = core.driver.store_mut(&g) else {
                continue;
            };
            if let Err(e) = store.set_sync_policy(policy) {
                core.driver
                    .stop_group(&g, format!("cannot change how it syncs: {e}"));
            }
        }
    }

    /// As leader: a group whose dedupe window is not its topic's
    /// `dedupeWindow` gets a `Window` entry, so the window changes at the
    /// same index on every replica; so does a group this agent began to
    /// lead whose topic's window is not the default (see `window_due`).
    /// Only those groups are looked at further (hibernating groups stay
    /// asleep).
    pub(super) fn propose_windows(&self, core: &mut Core) {
        let mut window_of: HashMap<&str, Option<u64>> = HashMap::new();
        let mut todo = Vec::new();
        let mut not_due = Vec::new();
        for (g, grp) in core.driver.iter() {
            if is_meta(g) {
                continue;
            }
            let want = *window_of.entry(g.topic.as_str()).or_insert_with(|| {
                self.broker
                    .topic(&g.topic)
                    .map(|t| t.config().dedupe_window.as_millis() as u64)
            });
            let Some(want) = want else {
                continue;
            };
            let due = core.window_due.contains(g);
            if due && (want == DEFAULT_DEDUPE_WINDOW_MS || !grp.is_leader()) {
                not_due.push(g.clone());
            }
            let restate = due && want != DEFAULT_DEDUPE_WINDOW_MS;
            if (want != grp.state().window_ms() || restate) && grp.is_leader() {
                todo.push((g.clone(), want));
            }
        }
        for g in &not_due {
            core.window_due.remove(g);
        }
        let ticks = core.ticks;
        core.window_proposed
            .retain(|_, at| ticks < *at + WINDOW_RETRY_TICKS);
        let mut done = Vec::new();
        for (g, window_ms) in todo {
            if core.window_proposed.contains_key(&g) {
                continue;
            }
            let serving = core
                .driver
                .status(&g)
                .is_some_and(|s| s.serving && s.leader == Some(self.me_id));
            if !serving {
                continue;
            }
            let Ok(data) = (Command::Window {
                timestamp_ms: crate::time::now_ms(),
                window_ms,
            })
            .encode() else {
                continue;
            };
            // No one waits for it: the token only has to be unique.
            let token = core.next_token;
            core.next_token += 1;
            match core.driver.propose(&g, token, data) {
                Ok(_) => {
                    tracing::debug!(group = %group_label(&g), window_ms, "proposed the topic's dedupe window");
                    core.window_proposed.insert(g.clone(), ticks);
                    done.push(g);
                }
                Err(e) => {
                    tracing::debug!(group = %group_label(&g), error = %e, "could not propose the dedupe window")
                }
            }
        }
        for g in done {
            core.window_due.remove(&g);
        }
        // Groups gone from here have nothing to state.
        let driver = &core.driver;
        core.window_due.retain(|g| driver.group(g).is_some());
    }
}
