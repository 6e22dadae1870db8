//! Proof that the Pod watch is current: one check for every pod at once.
//!
//! The surprise: the cheapest confirmation of a cached pod is not a look at
//! that pod. A LIST with `limit=1` (a quorum read; its body is one pod)
//! answers with the cluster's current resourceVersion R. The API server
//! sends a watch's events in resourceVersion order, so once the Pod watch
//! has delivered an event at or past R, every pod change committed before
//! that LIST has been applied to the cache: the whole cache is then as
//! current as a GET of each pod answered at the same moment, and is trusted
//! for [`CONFIRM_TTL`] after the LIST answered, exactly as one pod is after
//! its confirmation GET. This is the client's version of what the API
//! server itself does for consistent reads from its watch cache.
//!
//! It costs one small LIST per check, at most one check in flight and at
//! most one started per [`MIN_INTERVAL`], however many pods ask. A check
//! proves nothing when no pod event at or past R arrives within
//! [`WAIT`] (a cluster where other objects changed last and no pod changes
//! since: node Leases and Events move R too); then requests fall back to
//! the per-pod GET, and the next check waits [`BEHIND_INTERVAL`]. A
//! resourceVersion that is not a number (the API promises nothing about
//! its form; every Kubernetes release so far uses etcd's revision) makes
//! every check fail the same way. A re-list (410 Gone) drops the proof
//! until it completes: only then are deletions during the gap applied.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kube::api::{Api, ListParams};
use tokio::sync::watch;

use super::metrics::PodCacheMetrics;
use super::{PodView, CONFIRM_TTL};

/// At most one check starts per this long.
const MIN_INTERVAL: Duration = Duration::from_millis(250);
/// After a check that proved nothing, the next one waits this long.
const BEHIND_INTERVAL: Duration = Duration::from_secs(1);
/// The LIST must answer within this.
const LIST_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a check waits for the watch to reach the LIST's resourceVersion.
const WAIT: Duration = Duration::from_millis(500);

/// What the Pod watch has delivered, and until when the cache is known to
/// be current.
pub(super) struct Progress {
    /// The highest resourceVersion of a pod event applied since the last
    /// (re-)list completed; 0 while a (re-)list runs or before the first.
    seen: watch::Sender<u64>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// The cache is current as a GET answered `CONFIRM_TTL` before this
    /// would say, until this instant.
    current_until: Option<Instant>,
    /// During a (re-)list: the highest resourceVersion it listed.
    relist_max: Option<u64>,
    checking: bool,
    /// When the next check may start.
    next_check: Option<Instant>,
}

impl Default for Progress {
    fn default() -> Self {
        Progress {
            seen: watch::Sender::new(0),
            state: Mutex::new(State::default()),
        }
    }
}

impl Progress {
    /// A (re-)list starts: nothing is proven until it completes.
    pub(super) fn relist_started(&self) {
        let mut state = self.state.lock().unwrap();
        state.current_until = None;
        state.relist_max = Some(0);
        self.seen.send_replace(0);
    }

    /// A pod of the (re-)list was applied.
    pub(super) fn relisted(&self, rv: Option<u64>) {
        let mut state = self.state.lock().unwrap();
        if let (Some(max), Some(rv)) = (state.relist_max.as_mut(), rv) {
            *max = (*max).max(rv);
        }
    }

    /// The (re-)list completed (its deletions applied): the watch is at
    /// least as far as the newest pod it listed.
    pub(super) fn relist_done(&self) {
        let max = self.state.lock().unwrap().relist_max.take().unwrap_or(0);
        self.seen.send_replace(max);
    }

    /// A watch event was applied to the cache. Call after applying it.
    pub(super) fn delivered(&self, rv: Option<u64>) {
        let Some(rv) = rv else { return };
        if self.state.lock().unwrap().relist_max.is_some() {
            return;
        }
        self.seen.send_if_modified(|seen| {
            let newer = rv > *seen;
            if newer {
                *seen = rv;
            }
            newer
        });
    }

    /// Until when the whole cache is known current, if it is now.
    pub(super) fn current_until(&self, now: Instant) -> Option<Instant> {
        self.state
            .lock()
            .unwrap()
            .current_until
            .filter(|until| *until > now)
    }

    /// Is the cache known current now? Starts a check when the proof is
    /// missing or half spent (so a busy server keeps it without a request
    /// ever waiting for it).
    pub(super) fn is_current(
        self: &Arc<Self>,
        api: &Api<PodView>,
        metrics: &PodCacheMetrics,
    ) -> bool {
        let now = Instant::now();
        let mut state = self.state.lock().unwrap();
        let until = state.current_until.filter(|until| *until > now);
        let renew = until.is_none_or(|until| until - now < CONFIRM_TTL / 2);
        if renew && !state.checking && state.next_check.is_none_or(|at| at <= now) {
            state.checking = true;
            state.next_check = Some(now + MIN_INTERVAL);
            tokio::spawn(self.clone().check(api.clone(), metrics.clone()));
        }
        until.is_some()
    }

    async fn check(self: Arc<Self>, api: Api<PodView>, metrics: PodCacheMetrics) {
        let outcome = self.prove(&api).await;
        metrics.progress_checked(outcome);
        let mut state = self.state.lock().unwrap();
        state.checking = false;
        match outcome {
            Ok(answered) => {
                let until = answered + CONFIRM_TTL;
                state.current_until = Some(state.current_until.map_or(until, |u| u.max(until)));
            }
            Err(_) => {
                let later = Instant::now() + BEHIND_INTERVAL;
                state.next_check = Some(state.next_check.map_or(later, |at| at.max(later)));
            }
        }
    }

    /// One check: `Ok(when the LIST answered)` once the watch has reached
    /// its resourceVersion.
    async fn prove(&self, api: &Api<PodView>) -> Result<Instant, Unproven> {
        let params = ListParams::default().limit(1);
        let list = match tokio::time::timeout(LIST_TIMEOUT, api.list(&params)).await {
            Ok(Ok(list)) => list,
            Ok(Err(error)) => {
                tracing::debug!(%error, "cannot read the current resourceVersion; confirming pods one by one");
                return Err(Unproven::Failed);
            }
            Err(_) => return Err(Unproven::Failed),
        };
        let answered = Instant::now();
        let Some(rv) = list
            .metadata
            .resource_version
            .as_deref()
            .and_then(|rv| rv.parse::<u64>().ok())
        else {
            return Err(Unproven::Failed);
        };
        let mut seen = self.seen.subscribe();
        let reached = tokio::time::timeout(WAIT, seen.wait_for(|seen| *seen >= rv))
            .await
            .is_ok_and(|waited| waited.is_ok());
        if reached {
            Ok(answered)
        } else {
            Err(Unproven::Behind)
        }
    }
}

/// Why a check proved nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Unproven {
    /// The LIST failed, was slow, or its resourceVersion is not a number.
    Failed,
    /// No pod event reached the LIST's resourceVersion in time.
    Behind,
}
