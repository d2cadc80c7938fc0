//! Running kube-rs reflectors: the namespace cache and the pod watch of
//! discovery keep their stores filled the same way.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use futures_util::{Stream, StreamExt as _};
use kube::runtime::reflector::Store;

/// Drives a reflector's `stream` (which fills its store) until `shutdown`
/// fires; errors are logged as `what` and retried by the stream's backoff.
pub(crate) fn drive<T, E>(
    stream: impl Stream<Item = Result<T, E>> + Send + 'static,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
    what: &'static str,
) where
    E: std::fmt::Display,
{
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                item = stream.next() => match item {
                    Some(Ok(_)) => {}
                    Some(Err(e)) => tracing::warn!(error = %e, "{what} watch error; retrying"),
                    None => return,
                },
            }
        }
    });
}

/// A flag that turns true once `store` has its first full list (logged as
/// `synced`).
pub(crate) fn ready_flag<K>(store: Store<K>, synced: &'static str) -> Arc<AtomicBool>
where
    K: kube::Resource + Clone + Send + Sync + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone + Default + Send + Sync,
{
    let ready = Arc::new(AtomicBool::new(false));
    let flag = ready.clone();
    tokio::spawn(async move {
        if store.wait_until_ready().await.is_ok() {
            flag.store(true, Ordering::Release);
            tracing::info!("{synced}");
        }
    });
    ready
}
