//! The watch driver and sync state shared by the Pod and Namespace caches.
//!
//! The surprise: a watch error never ends the watch. kube-runtime's watcher
//! retries with backoff (0.8s doubling to 30s, like client-go) and re-lists
//! when the API server says the resourceVersion is too old; this driver only
//! logs, so a cache is at worst stale, never stopped.

use std::time::Duration;

use futures::StreamExt;
use kube::api::Api;
use kube::runtime::watcher::{self, watcher};
use kube::runtime::WatchStreamExt;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// "The first full list has been applied", shared by the Pod and Namespace
/// caches.
#[derive(Debug)]
pub(super) struct Synced(watch::Sender<bool>);

impl Default for Synced {
    fn default() -> Self {
        Synced(watch::Sender::new(false))
    }
}

impl Synced {
    pub(super) fn set(&self) {
        self.0.send_replace(true);
    }

    pub(super) fn is_synced(&self) -> bool {
        *self.0.borrow()
    }

    pub(super) async fn wait(&self) {
        let mut synced = self.0.subscribe();
        // The sender lives as long as `self`, so this cannot fail.
        let _ = synced.wait_for(|s| *s).await;
    }
}

/// Runs a kube-runtime watcher until `stop` is cancelled, handing every
/// event to `on_event`. Errors are logged and retried with kube-runtime's
/// default backoff (0.8s doubling to 30s, like client-go); they never end
/// the watch.
pub(super) async fn drive<K>(
    api: Api<K>,
    resync: Duration,
    stop: CancellationToken,
    what: &'static str,
    mut on_event: impl FnMut(watcher::Event<K>) + Send,
) where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    let mut config = watcher::Config::default();
    if !resync.is_zero() {
        let secs = resync.as_secs().clamp(1, u64::from(u32::MAX));
        config = config.timeout(secs as u32);
    }
    let stream = watcher(api, config).default_backoff();
    futures::pin_mut!(stream);
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            next = stream.next() => match next {
                Some(Ok(event)) => on_event(event),
                Some(Err(error)) => {
                    let error = crate::telemetry::error_chain(&error);
                    tracing::warn!(%error, "{what} watch failed; retrying with backoff")
                }
                // The watcher stream never ends by itself.
                None => return,
            },
        }
    }
}
