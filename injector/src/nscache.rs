//! The namespace cache: a kube-rs reflector over namespaces' metadata, so an
//! admission reads a namespace's annotations from memory.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use kube::api::Api;
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{watcher, WatchStreamExt as _};

use crate::admission::{AnnotationsFuture, NamespaceLookup};

/// How long an admission may wait for a direct namespace read while the
/// cache is still cold.
pub const COLD_LOOKUP_TIMEOUT: Duration = Duration::from_millis(500);

/// Namespace annotations, watched.
#[derive(Clone)]
pub struct NamespaceCache {
    store: Store<PartialObjectMeta<Namespace>>,
    api: Api<Namespace>,
    ready: Arc<AtomicBool>,
}

impl std::fmt::Debug for NamespaceCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NamespaceCache")
            .field("ready", &self.is_ready())
            .finish_non_exhaustive()
    }
}

impl NamespaceCache {
    /// Starts watching namespaces; the returned cache fills in the background
    /// (with kube-rs' default backoff on errors) until `shutdown` fires.
    pub fn start(
        client: kube::Client,
        shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> NamespaceCache {
        let api: Api<Namespace> = Api::all(client.clone());
        let (store, writer) = reflector::store();
        let stream = reflector::reflector(
            writer,
            watcher(
                Api::<PartialObjectMeta<Namespace>>::all(client),
                watcher::Config::default(),
            ),
        )
        .default_backoff()
        .touched_objects();
        crate::watch::drive(stream, shutdown, "namespace");
        let ready = crate::watch::ready_flag(store.clone(), "namespace cache synced");
        NamespaceCache { store, api, ready }
    }

    /// Whether the first full list has been received.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }
}

impl NamespaceLookup for NamespaceCache {
    fn annotations<'a>(&'a self, namespace: &'a str) -> AnnotationsFuture<'a> {
        Box::pin(async move {
            if self.is_ready() {
                let ns = self.store.get(&ObjectRef::new(namespace));
                return Some(
                    ns.and_then(|n| n.metadata.annotations.clone())
                        .unwrap_or_default(),
                );
            }
            // Cold cache: one short direct read, never a long wait.
            match tokio::time::timeout(COLD_LOOKUP_TIMEOUT, self.api.get_metadata_opt(namespace))
                .await
            {
                Ok(Ok(Some(ns))) => Some(ns.metadata.annotations.unwrap_or_default()),
                Ok(Ok(None)) => Some(BTreeMap::new()),
                Ok(Err(e)) => {
                    tracing::warn!(namespace, error = %e, "namespace lookup failed");
                    None
                }
                Err(_) => {
                    tracing::warn!(namespace, "namespace lookup timed out");
                    None
                }
            }
        })
    }
}
