//! The mesh's upkeep: loading and reloading the agent's certificate, and
//! connection statistics for the metrics.

use super::{Input, Peers, CERT_CHECK_INTERVAL, MIN_CERT_CHECK_INTERVAL, STATS_INTERVAL};
use crate::metrics::Metrics;
use shoal_mesh::certs::{CertSource, Identity};
use shoal_mesh::tls::CertStore;
use shoal_mesh::MeshError;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::sync::mpsc;

/// Loads `source`'s identity on a blocking thread (it may read files or make
/// a request of its own).
pub(crate) async fn load_identity(source: &Arc<dyn CertSource>) -> Result<Identity, MeshError> {
    let s = source.clone();
    tokio::task::spawn_blocking(move || s.load())
        .await
        .unwrap_or_else(|e| {
            Err(MeshError::Certificate(format!(
                "certificate task failed: {e}"
            )))
        })
}

pub(super) fn spawn_cert_reload(
    source: Arc<dyn CertSource>,
    store: Arc<CertStore>,
    mut current: Identity,
    input: mpsc::Sender<Input>,
    metrics: Arc<Metrics>,
) {
    metrics.certificate_loaded(&current);
    tokio::spawn(async move {
        let mut failures = 0u32;
        loop {
            // Short-lived certificates are renewed when due, not up to a
            // whole check interval later (past their expiry); after
            // failures, no sooner than the backoff.
            let until_due = current
                .renew_at()
                .duration_since(std::time::SystemTime::now())
                .unwrap_or_default();
            let wait = until_due
                .clamp(MIN_CERT_CHECK_INTERVAL, CERT_CHECK_INTERVAL)
                .max(shoal_mesh::client::backoff(failures));
            tokio::time::sleep(wait).await;
            if !source.changed(&current) {
                continue;
            }
            let failed = match load_identity(&source).await {
                Ok(next) => match store.install(&next) {
                    Ok(()) => {
                        tracing::info!(source = %source.describe(), id = %next.id, "mesh certificate reloaded");
                        metrics.certificate_loaded(&next);
                        current = next;
                        let peers = source.peers();
                        if !peers.is_empty() && input.send(Input::Discovered(peers)).await.is_err()
                        {
                            return;
                        }
                        false
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "new mesh certificate refused; keeping the old one");
                        true
                    }
                },
                Err(e) => {
                    tracing::error!(error = %e, source = %source.describe(), "cannot load the mesh certificate; keeping the old one");
                    true
                }
            };
            if failed {
                failures = failures.saturating_add(1);
                metrics.mesh_certificate_failures.inc();
            } else {
                failures = 0;
            }
        }
    });
}

/// Packets lost since the last reading, given the last reading `seen`
/// (connection id, its lost-packet count then), which it updates. A new
/// connection to the same peer starts counting from zero.
fn newly_lost(seen: &mut (usize, u64), connection: usize, lost: u64) -> u64 {
    if seen.0 != connection {
        *seen = (connection, 0);
    }
    let new = lost.saturating_sub(seen.1);
    seen.1 = lost;
    new
}

pub(super) fn spawn_stats(peers: Peers, metrics: Arc<Metrics>) {
    tokio::spawn(async move {
        // Per peer: the connection last read and its lost-packet count then,
        // so the counter grows by what each connection lost since.
        let mut lost_seen: HashMap<SocketAddr, (usize, u64)> = HashMap::new();
        loop {
            tokio::time::sleep(STATS_INTERVAL).await;
            let conns: Vec<(SocketAddr, shoal_mesh::quinn::Connection)> = peers
                .conns
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .map(|(a, c)| (*a, c.clone()))
                .collect();
            for (addr, c) in conns {
                let label = crate::metrics::PeerLabel {
                    peer: addr.to_string(),
                };
                if c.close_reason().is_some() {
                    peers
                        .conns
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&addr);
                    metrics.mesh_rtt.remove(&label);
                    metrics.mesh_lost_packets.remove(&label);
                    lost_seen.remove(&addr);
                    continue;
                }
                let stats = c.stats();
                metrics
                    .mesh_rtt
                    .get_or_create(&label)
                    .set(stats.path.rtt.as_secs_f64());
                let seen = lost_seen.entry(addr).or_insert((c.stable_id(), 0));
                metrics
                    .mesh_lost_packets
                    .get_or_create(&label)
                    .inc_by(newly_lost(seen, c.stable_id(), stats.path.lost_packets));
            }
        }
    });
}

#[cfg(test)]
mod tests;
