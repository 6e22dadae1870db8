//! The watch driver and sync state shared by the Pod and Namespace caches.
//!
//! The surprise: a watch error never ends the watch. kube-runtime's watcher
//! retries with backoff (0.8s doubling to 30s, like client-go) and re-lists
//! when the API server says the resourceVersion is too old; this driver only
//! logs, so a cache is at worst stale, never stopped.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kube::api::Api;
use kube::runtime::watcher::{self, watcher};
use kube::runtime::WatchStreamExt;
use tokio::sync::watch;
use tokio_util::sync::{CancellationToken, DropGuard};

/// A watch-fed cache: its state, and the watch task feeding it, which stops
/// when the last clone of the `Arc<Watched>` is dropped (mini-redis'
/// `DbDropGuard`).
pub struct Watched<S> {
    pub state: Arc<S>,
    _stop: DropGuard,
}

impl<S: Send + Sync + 'static> Watched<S> {
    /// Starts watching `api` (see [`drive`]) and hands every event to
    /// `on_event` with `state`. Must be called inside a tokio runtime.
    pub fn spawn<K>(
        state: Arc<S>,
        api: Api<K>,
        resync: Duration,
        what: &'static str,
        on_event: impl Fn(&S, watcher::Event<K>) + Send + 'static,
    ) -> Arc<Self>
    where
        K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
    {
        let stop = CancellationToken::new();
        let task_state = state.clone();
        tokio::spawn(drive(api, resync, stop.clone(), what, move |event| {
            on_event(&task_state, event)
        }));
        Arc::new(Watched {
            state,
            _stop: stop.drop_guard(),
        })
    }
}

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
