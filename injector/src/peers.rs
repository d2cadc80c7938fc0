//! Discovery: the injector watches injected pods (label
//! `shoal.io/injected=true`, every namespace) and hands each agent that asks
//! for a certificate a few other agents' mesh addresses, so injected agents
//! find each other with no seeds configured by anyone.
//!
//! A pod counts once it has an IP and is not being deleted, ready or not:
//! two agents starting together must learn of each other, or each would
//! start a mesh of its own. An address that is stale costs a failed join
//! attempt; every peer is still authenticated by mutual TLS.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt as _};

use crate::annotations::INJECTED_LABEL;
use crate::config::{AGENT_CONTAINER_NAME, DEFAULT_MESH_PORT, MESH_PORT_NAME};

/// The variable that gives an injected agent its identity service.
pub const IDENTITY_ADDR_ENV: &str = "SHOAL_IDENTITY_ADDR";
/// Most peers named in one answer.
pub const MAX_PEERS: usize = 8;
/// How long a certificate request waits for the watch to list the asker's
/// pod (the first full list after the injector starts, or a new pod) before
/// it is refused.
pub const SYNC_WAIT: Duration = Duration::from_secs(5);

/// The mesh address of an injected pod's agent: its IP and the agent
/// container's `mesh` port. None for a pod with no IP yet, one being
/// deleted or finished, or one without the agent container.
pub fn mesh_address(pod: &Pod) -> Option<SocketAddr> {
    if pod.metadata.deletion_timestamp.is_some() {
        return None;
    }
    let status = pod.status.as_ref()?;
    if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
        return None;
    }
    let ip: IpAddr = status.pod_ip.as_deref()?.parse().ok()?;
    let spec = pod.spec.as_ref()?;
    let agent = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .find(|c| c.name == AGENT_CONTAINER_NAME)?;
    // A pod injected without identity settings (before the mesh CA was
    // loaded, by an older injector, or offline) runs an agent that never
    // joins: naming it would hand out a seed nobody can join, and counting
    // it as the oldest would leave the mesh without a founder.
    if !agent
        .env
        .iter()
        .flatten()
        .any(|e| e.name == IDENTITY_ADDR_ENV)
    {
        return None;
    }
    let port = agent
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some(MESH_PORT_NAME))
        .and_then(|p| u16::try_from(p.container_port).ok())
        .unwrap_or(DEFAULT_MESH_PORT);
    Some(SocketAddr::new(ip, port))
}

/// Whether `p` is the pod `(namespace, name)`.
fn is_pod(p: &Pod, (namespace, name): (&str, &str)) -> bool {
    p.metadata.namespace.as_deref() == Some(namespace) && p.metadata.name.as_deref() == Some(name)
}

/// Up to [`MAX_PEERS`] mesh addresses of `pods`, leaving out the pod
/// `asker` (namespace, name); a random choice (`seed`) when there are more,
/// so answers spread over the mesh.
pub fn choose(pods: &[Arc<Pod>], asker: (&str, &str), seed: u64) -> Vec<SocketAddr> {
    let mut found: Vec<SocketAddr> = pods
        .iter()
        .filter(|p| !is_pod(p, asker))
        .filter_map(|p| mesh_address(p))
        .collect();
    found.sort_unstable();
    found.dedup();
    if found.len() > MAX_PEERS {
        let mut rng = fastrand::Rng::with_seed(seed);
        rng.shuffle(&mut found);
        found.truncate(MAX_PEERS);
        found.sort_unstable();
    }
    found
}

/// Whether the pod `asker` (namespace, name) is the oldest injected pod
/// listed (by creation time, then namespace and name): its agent, when new,
/// founds the mesh (creates its meta group). Exactly one pod is the oldest
/// in any list; a pod created later is never older than the ones before it,
/// so a new pod joining a running mesh never founds a second one. A pod not
/// listed (the watch has not shown it yet) is never the oldest.
pub fn is_oldest(pods: &[Arc<Pod>], asker: (&str, &str)) -> bool {
    let key = |p: &Pod| {
        (
            p.metadata.creation_timestamp.as_ref().map(|t| t.0),
            p.metadata.namespace.clone().unwrap_or_default(),
            p.metadata.name.clone().unwrap_or_default(),
        )
    };
    let Some(me) = pods.iter().find(|p| is_pod(p, asker)) else {
        return false;
    };
    let mine = key(me);
    pods.iter()
        .filter(|p| !is_pod(p, asker) && mesh_address(p).is_some())
        .all(|p| key(p) > mine)
}

/// What discovery tells one agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Discovery {
    /// Other agents' mesh addresses.
    pub peers: Vec<SocketAddr>,
    /// Whether its pod is the oldest injected one ([`is_oldest`]).
    pub founder: bool,
}

/// Injected pods, watched.
#[derive(Clone)]
pub struct PeerBook {
    store: Store<Pod>,
    synced: Arc<AtomicBool>,
}

impl std::fmt::Debug for PeerBook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerBook")
            .field("synced", &self.synced.load(Ordering::Acquire))
            .finish_non_exhaustive()
    }
}

impl PeerBook {
    /// Starts watching injected pods in every namespace until `shutdown`.
    pub fn start(client: kube::Client, shutdown: tokio::sync::watch::Receiver<bool>) -> Self {
        let api: Api<Pod> = Api::all(client);
        let (store, writer) = reflector::store();
        let selector = format!("{INJECTED_LABEL}=true");
        let stream = reflector::reflector(
            writer,
            watcher(api, watcher::Config::default().labels(&selector)),
        )
        .default_backoff()
        .touched_objects();
        crate::watch::drive(stream, shutdown, "injected-pod");
        let synced =
            crate::watch::ready_flag(store.clone(), "injected-pod watch synced (discovery ready)");
        PeerBook { store, synced }
    }

    /// Mesh addresses for the agent of pod `asker` (namespace, name), once
    /// the first list of pods has arrived and shows the asker's pod (with
    /// `uid`, when the token named it); None when not within [`SYNC_WAIT`]:
    /// answering "no peers" then could split the mesh.
    pub async fn peers_for(&self, asker: (&str, &str), uid: Option<&str>) -> Option<Discovery> {
        // Until the first list is in, the store is empty: the asker is not
        // listed, and the wait below covers both.
        let listed = |pods: &[Arc<Pod>]| {
            pods.iter().any(|p| {
                is_pod(p, asker) && uid.is_none_or(|u| p.metadata.uid.as_deref() == Some(u))
            })
        };
        let deadline = tokio::time::Instant::now() + SYNC_WAIT;
        let mut pods = self.store.state();
        while !listed(&pods) {
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            pods = self.store.state();
        }
        Some(Discovery {
            peers: choose(&pods, asker, fastrand::u64(..)),
            founder: is_oldest(&pods, asker),
        })
    }
}

#[cfg(test)]
mod tests;
