//! The credential cache: one STS call in flight per identity, however many
//! pods and requests want it.
//!
//! Unlike a plain TTL cache, a credential is served only while it has MORE
//! than `--session-refresh` of life left; below that it is fetched again (and
//! a background task normally refreshes it before it gets there). Lifetimes
//! are measured on tokio's monotonic clock from the moment STS answered, so
//! a wall-clock jump cannot make the cache serve near-expired credentials.
//!
//! - Single flight: a fetch is a spawned task whose result every concurrent
//!   caller awaits through one shared future, so a cancelled gRPC request
//!   never cancels the fetch others are waiting for.
//! - Failures are never cached as successes. The request path reuses an
//!   identity's last failure for a short while (1s when retryable, up to 10s
//!   otherwise) so pods retrying in a loop cannot storm STS; the background
//!   path retries with exponential backoff (1s doubling to 60s, jittered).
//! - Prefetch and refresh run in the background on an adaptive number of
//!   concurrent STS calls, at most `--fetchers` ([`fetchers`]: grows while
//!   STS answers quickly, halves when it throttles); a request joining a
//!   queued background fetch lets it skip the queue.
//! - Identities that the "in use" predicate (the Pod cache) disowns and no
//!   request asked for during the last minute are dropped, never refreshed.
//!
//! The background sweeper stops when the shutdown token given to
//! [`CredentialCache::new`] is cancelled or when the last clone of the cache
//! is dropped, whichever comes first.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use futures::future::{BoxFuture, Shared};
use futures::FutureExt;
use jiff::Timestamp;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::{oneshot, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::model::Identity;
use super::sts::{AssumeRole, Credentials, StsError, StsMetrics};

mod fetchers;
use fetchers::{Fetchers, Outcome};

/// Whether any live pod still uses an identity (provided by the Pod cache).
/// Called from the sweeper without the cache's lock held, so it may take
/// the Pod cache's own locks.
pub type InUse = Arc<dyn Fn(&Identity) -> bool + Send + Sync>;

/// How often the sweeper looks for credentials to refresh (and retries).
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// How often the sweeper asks, for every identity, whether a pod still uses
/// it (to drop the unused ones). Each tick asks only about identities due
/// for a refresh or retry: with per-pod session tags a server holds one
/// identity per pod, and asking about 150,000 of them every second was the
/// server's largest cost at that size (BENCHMARKS.md figure 10).
const UNUSED_CHECK_INTERVAL: Duration = Duration::from_secs(10);
/// An identity no pod uses is still kept this long after its last request,
/// so a pod found by the direct API lookup (not yet in the watch cache) does
/// not refetch on every request.
const IDLE_GRACE: Duration = Duration::from_secs(60);
/// Background retry backoff: doubles from the base up to the cap.
const BACKOFF_BASE: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// How long requests reuse a retryable failure instead of calling STS again.
const RETRYABLE_REUSE: Duration = Duration::from_secs(1);
/// The most requests reuse a final failure (AccessDenied): an operator who
/// fixes a trust policy should not wait longer than this.
const FINAL_REUSE_MAX: Duration = Duration::from_secs(10);
/// Default bound on one AssumeRole call; the real client's own timeout is
/// shorter, this catches any implementation that hangs.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(15);

/// What the cache needs from `kiam server`'s flags.
#[derive(Debug, Clone)]
pub struct CacheConfig {
    /// `--session-duration`: requested from STS.
    pub session_duration: Duration,
    /// `--session-refresh`: nothing is served with less life left.
    pub session_refresh: Duration,
    /// `--fetchers`: the most concurrent background STS calls (the number
    /// adapts below it).
    pub fetchers: usize,
    /// Bound on one AssumeRole call, so a hung call cannot hold an
    /// identity's single in-flight slot.
    pub call_timeout: Duration,
}

impl CacheConfig {
    /// How long before the refresh threshold the background refresh starts,
    /// so retries have time before requests would have to wait for STS.
    fn refresh_margin(&self) -> Duration {
        (self.session_refresh / 10).clamp(Duration::from_secs(5), Duration::from_secs(300))
    }
}

type FetchResult = Result<Arc<Credentials>, StsError>;

/// An in-flight fetch that callers join.
struct Fetch {
    id: u64,
    result: Shared<BoxFuture<'static, FetchResult>>,
    /// Lets a queued background fetch skip the `--fetchers` queue once a
    /// request is waiting on it.
    promote: Arc<Notify>,
}

struct Cached {
    credentials: Arc<Credentials>,
    expires_at: Instant,
    /// When the sweeper refreshes (before `expires_at - refresh`, jittered).
    refresh_at: Instant,
}

struct LastFailure {
    error: StsError,
    /// Requests get this failure back until then.
    reuse_until: Instant,
    /// The background path retries from then on.
    retry_at: Instant,
    consecutive: u32,
}

struct Entry {
    cached: Option<Cached>,
    fetch: Option<Fetch>,
    failure: Option<LastFailure>,
    last_used: Instant,
}

impl Entry {
    fn new(now: Instant) -> Self {
        Entry {
            cached: None,
            fetch: None,
            failure: None,
            last_used: now,
        }
    }

    /// Due a background refresh (or retry) at `now`: not fetching, not
    /// backing off after a failure, and past its refresh time (or never
    /// fetched).
    fn due(&self, now: Instant) -> bool {
        let backing_off = self.failure.as_ref().is_some_and(|f| now < f.retry_at);
        let past = self.cached.as_ref().is_none_or(|c| now >= c.refresh_at);
        self.fetch.is_none() && !backing_off && past
    }

    /// The credentials if they have more than `refresh` of life left.
    fn fresh(&self, now: Instant, refresh: Duration) -> Option<Arc<Credentials>> {
        self.cached
            .as_ref()
            .filter(|c| c.expires_at > now + refresh)
            .map(|c| c.credentials.clone())
    }
}

struct Inner {
    sts: Arc<dyn AssumeRole>,
    config: CacheConfig,
    in_use: InUse,
    // No `.await` happens under this lock: fetches run in spawned tasks.
    entries: Mutex<HashMap<Identity, Entry>>,
    fetchers: Arc<Fetchers>,
    next_fetch_id: std::sync::atomic::AtomicU64,
    sts_metrics: StsMetrics,
    hits: Counter,
    misses: Counter,
    size: Gauge,
    /// Child of the shutdown token; cancelled on drop to stop the sweeper.
    stop: CancellationToken,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// STS credentials per [`Identity`], shared by every pod using it. Cheap to
/// clone; clones share one cache.
#[derive(Clone)]
pub struct CredentialCache {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for CredentialCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CredentialCache")
            .field("config", &self.inner.config)
            .field("identities", &self.inner.lock().len())
            .finish()
    }
}

/// The credential cache's metric families (kiam's names).
#[derive(Clone, Debug)]
pub struct CredentialMetrics {
    hits: Counter,
    misses: Counter,
    sts: StsMetrics,
    /// `kiam_sts_cacheSize` (Go kiam's name): identities the cache holds,
    /// updated by the sweeper every second.
    size: Gauge,
}

impl CredentialMetrics {
    /// Registers `kiam_sts_cache_hit_total`, `kiam_sts_cache_miss_total` and
    /// [`StsMetrics`]' families.
    pub fn register(registry: &mut Registry) -> Self {
        let hits = Counter::default();
        let misses = Counter::default();
        // prometheus-client appends `_total` to counters.
        registry.register(
            "kiam_sts_cache_hit",
            "Number of cache hits to the metadata cache",
            hits.clone(),
        );
        registry.register(
            "kiam_sts_cache_miss",
            "Number of cache misses to the metadata cache",
            misses.clone(),
        );
        let size = Gauge::default();
        registry.register(
            "kiam_sts_cacheSize",
            "Current size of the metadata cache",
            size.clone(),
        );
        CredentialMetrics {
            hits,
            misses,
            sts: StsMetrics::register(registry),
            size,
        }
    }
}

impl CredentialCache {
    /// Creates the cache and spawns its sweeper (so call it inside a tokio
    /// runtime).
    pub fn new(
        sts: Arc<dyn AssumeRole>,
        config: CacheConfig,
        in_use: InUse,
        metrics: CredentialMetrics,
        shutdown: CancellationToken,
    ) -> Self {
        let CredentialMetrics {
            hits,
            misses,
            sts: sts_metrics,
            size,
        } = metrics;
        let inner = Arc::new(Inner {
            sts,
            fetchers: Fetchers::new(config.fetchers),
            config,
            in_use,
            entries: Mutex::new(HashMap::new()),
            next_fetch_id: Default::default(),
            sts_metrics,
            hits,
            misses,
            size,
            stop: shutdown.child_token(),
        });
        tokio::spawn(sweep_loop(Arc::downgrade(&inner), inner.stop.clone()));
        CredentialCache { inner }
    }

    /// Credentials for `identity` with more than `--session-refresh` of life
    /// left: from the cache, from the fetch already in flight, or from a new
    /// STS call.
    pub async fn get(&self, identity: &Identity) -> Result<Arc<Credentials>, StsError> {
        let inner = &self.inner;
        let pending = {
            let mut entries = inner.lock();
            let now = Instant::now();
            let entry = entries
                .entry(identity.clone())
                .or_insert_with(|| Entry::new(now));
            entry.last_used = now;
            if let Some(credentials) = entry.fresh(now, inner.config.session_refresh) {
                inner.hits.inc();
                return Ok(credentials);
            }
            inner.misses.inc();
            if let Some(fetch) = &entry.fetch {
                fetch.promote.notify_one();
                fetch.result.clone()
            } else if let Some(failure) = entry.failure.as_ref().filter(|f| now < f.reuse_until) {
                return Err(failure.error.clone());
            } else {
                inner.start_fetch(entry, identity, true)
            }
        };
        pending.await
    }

    /// `--session-refresh`: nothing is served with less life left, so an
    /// agent may not reuse an answer past `expiration - session_refresh`.
    pub fn session_refresh(&self) -> Duration {
        self.inner.config.session_refresh
    }

    /// How many background STS calls may run at once right now (adapts
    /// between 1 and `--fetchers`).
    pub fn fetch_limit(&self) -> usize {
        self.inner.fetchers.limit()
    }

    /// Starts a background fetch for `identity` unless it is cached, in
    /// flight, or backing off after a failure. Never blocks (spawns; call it
    /// inside a tokio runtime).
    pub fn prefetch(&self, identity: &Identity) {
        let inner = &self.inner;
        let mut entries = inner.lock();
        let now = Instant::now();
        let entry = entries
            .entry(identity.clone())
            .or_insert_with(|| Entry::new(now));
        entry.last_used = now;
        let backing_off = entry.failure.as_ref().is_some_and(|f| now < f.retry_at);
        if entry.fresh(now, inner.config.session_refresh).is_some()
            || entry.fetch.is_some()
            || backing_off
        {
            return;
        }
        // The returned future is only for joiners; the spawned task runs anyway.
        drop(inner.start_fetch(entry, identity, false));
    }

    /// What the cache holds for `identity` right now, for `kiam explain`.
    /// Reads only: never starts a fetch, never marks the identity used.
    pub fn state(&self, identity: &Identity) -> CredentialState {
        let inner = &self.inner;
        let entries = inner.lock();
        let Some(entry) = entries.get(identity) else {
            return CredentialState::default();
        };
        let now = Instant::now();
        CredentialState {
            cached: entry.cached.as_ref().map(|c| CachedState {
                access_key_id: c.credentials.access_key_id.clone(),
                expiration: c.credentials.expiration,
                refresh_at: wall_time(c.refresh_at, now),
                fresh: c.expires_at > now + inner.config.session_refresh,
            }),
            in_flight: entry.fetch.is_some(),
            last_failure: entry.failure.as_ref().map(|f| FailureState {
                code: f.error.code.clone(),
                message: f.error.message.clone(),
                retryable: f.error.retryable,
                consecutive: f.consecutive,
                retry_at: wall_time(f.retry_at, now),
            }),
        }
    }
}

/// A snapshot of one identity's credentials, without the secrets: the
/// access key id at most.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CredentialState {
    /// `None`: nothing cached (never fetched, failed, or dropped as unused).
    pub cached: Option<CachedState>,
    /// An STS call for this identity is running; requests join it.
    pub in_flight: bool,
    /// The last fetch failed; cleared by the next success.
    pub last_failure: Option<FailureState>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedState {
    pub access_key_id: String,
    pub expiration: Timestamp,
    /// When the background refresh is due.
    pub refresh_at: Timestamp,
    /// More than `--session-refresh` of life left, so requests are served
    /// from the cache.
    pub fresh: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailureState {
    /// The AWS error code (`AccessDenied`, `Throttling`, ...).
    pub code: Option<String>,
    pub message: String,
    pub retryable: bool,
    pub consecutive: u32,
    /// When the background path tries again.
    pub retry_at: Timestamp,
}

/// The wall-clock time of a monotonic instant (for display only).
fn wall_time(at: Instant, now: Instant) -> Timestamp {
    let wall = Timestamp::now();
    let shifted = if at >= now {
        jiff::SignedDuration::try_from(at - now).map(|d| wall.checked_add(d))
    } else {
        jiff::SignedDuration::try_from(now - at).map(|d| wall.checked_sub(d))
    };
    shifted.ok().and_then(Result::ok).unwrap_or(wall)
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Identity, Entry>> {
        // Entries stay consistent even if a holder panicked: every update is
        // a single assignment.
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Spawns the STS call for `identity` and records it in `entry` as in
    /// flight. `urgent` (a request is waiting) skips the `--fetchers` queue.
    fn start_fetch(
        self: &Arc<Self>,
        entry: &mut Entry,
        identity: &Identity,
        urgent: bool,
    ) -> Shared<BoxFuture<'static, FetchResult>> {
        let id = self
            .next_fetch_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (tx, rx) = oneshot::channel::<FetchResult>();
        let result = rx
            .map(|r| {
                r.unwrap_or_else(|_| {
                    Err(StsError::transient(
                        "Cancelled",
                        "the credential fetch was abandoned (server shutting down)",
                    ))
                })
            })
            .boxed()
            .shared();
        let promote = Arc::new(Notify::new());
        entry.fetch = Some(Fetch {
            id,
            result: result.clone(),
            promote: promote.clone(),
        });
        let inner = self.clone();
        let identity = identity.clone();
        tokio::spawn(async move {
            let slot = if urgent {
                inner.fetchers.enter()
            } else {
                tokio::select! {
                    slot = inner.fetchers.acquire() => slot,
                    _ = promote.notified() => inner.fetchers.enter(),
                }
            };
            let call = async {
                let call = inner
                    .sts
                    .assume_role(&identity, inner.config.session_duration);
                match tokio::time::timeout(inner.config.call_timeout, call).await {
                    Ok(res) => res,
                    Err(_) => Err(StsError::transient(
                        "Timeout",
                        format!(
                            "STS did not answer within {}",
                            humantime::format_duration(inner.config.call_timeout)
                        ),
                    )),
                }
            };
            let res = inner.sts_metrics.observe(call).await;
            slot.done(match &res {
                Ok(_) => Outcome::Answered,
                Err(e) if fetchers::is_throttling(e.code.as_deref()) => Outcome::Throttled,
                Err(e) if e.retryable => Outcome::Failed,
                Err(_) => Outcome::Answered,
            });
            let res = inner.complete(&identity, id, res);
            // Nobody waiting is fine: the cache is updated either way.
            let _ = tx.send(res);
        });
        result
    }

    /// Records a finished fetch; the entry is updated before any waiter
    /// wakes, so a waiter's next `get` sees the outcome.
    fn complete(
        &self,
        identity: &Identity,
        id: u64,
        res: Result<Credentials, StsError>,
    ) -> FetchResult {
        let now = Instant::now();
        let refresh = self.config.session_refresh;
        let res = res.and_then(|creds| {
            let left = creds.expiration.duration_since(Timestamp::now());
            let left = Duration::try_from(left).unwrap_or(Duration::ZERO);
            if left <= refresh {
                return Err(StsError {
                    code: Some("ShortLived".into()),
                    message: format!(
                        "STS issued credentials for {} valid for only {}, not more than --session-refresh {}; \
                         lower --session-refresh or raise the role's maximum session duration",
                        identity.role_arn,
                        humantime::format_duration(Duration::from_secs(left.as_secs())),
                        humantime::format_duration(refresh)
                    ),
                    retryable: false,
                });
            }
            Ok((Arc::new(creds), left))
        });
        let mut entries = self.lock();
        let entry = entries.get_mut(identity);
        let entry = match entry {
            Some(e) => {
                if e.fetch.as_ref().is_some_and(|f| f.id == id) {
                    e.fetch = None;
                }
                Some(e)
            }
            None => None,
        };
        match res {
            Ok((credentials, left)) => {
                let expires_at = now + left;
                let margin = self.config.refresh_margin();
                let jitter = margin.mul_f64(rand::random_range(0.0..1.0));
                let refresh_at = expires_at
                    .checked_sub(refresh + margin + jitter)
                    .unwrap_or(now)
                    .max(now);
                tracing::info!(
                    pod.iam.role = %identity.role_arn,
                    session_name = %identity.session_name,
                    access_key_id = %credentials.access_key_id,
                    expiration = %credentials.expiration,
                    "requested new credentials"
                );
                if let Some(e) = entry {
                    e.cached = Some(Cached {
                        credentials: credentials.clone(),
                        expires_at,
                        refresh_at,
                    });
                    e.failure = None;
                }
                Ok(credentials)
            }
            Err(error) => {
                let consecutive = entry
                    .as_ref()
                    .and_then(|e| e.failure.as_ref())
                    .map_or(1, |f| f.consecutive.saturating_add(1));
                let backoff = backoff(consecutive);
                let reuse = if error.retryable {
                    RETRYABLE_REUSE
                } else {
                    backoff.min(FINAL_REUSE_MAX)
                };
                tracing::warn!(
                    pod.iam.role = %identity.role_arn,
                    session_name = %identity.session_name,
                    error = %error,
                    retryable = error.retryable,
                    retry_in = %humantime::format_duration(backoff),
                    "error requesting credentials"
                );
                if let Some(e) = entry {
                    e.failure = Some(LastFailure {
                        error: error.clone(),
                        reuse_until: now + reuse,
                        retry_at: now + backoff,
                        consecutive,
                    });
                }
                Err(error)
            }
        }
    }

    /// Starts background refreshes and retries for identities due one and
    /// still in use; with `every_identity`, also drops the ones nobody uses.
    fn sweep(self: &Arc<Self>, every_identity: bool) {
        let now = Instant::now();
        let identities: Vec<Identity> = self
            .lock()
            .iter()
            .filter(|(_, entry)| every_identity || entry.due(now))
            .map(|(identity, _)| identity.clone())
            .collect();
        // Asked without our lock: the predicate takes the Pod cache's locks,
        // and the Pod cache calls `prefetch` while holding them.
        let used: Vec<(Identity, bool)> = identities
            .into_iter()
            .map(|id| {
                let used = (self.in_use)(&id);
                (id, used)
            })
            .collect();
        let now = Instant::now();
        let mut entries = self.lock();
        for (identity, used) in used {
            let Some(entry) = entries.get_mut(&identity) else {
                continue;
            };
            if entry.fetch.is_some() {
                continue;
            }
            if !used {
                if now.duration_since(entry.last_used) >= IDLE_GRACE {
                    tracing::debug!(pod.iam.role = %identity.role_arn, session_name = %identity.session_name,
                        "dropping credentials no pod uses");
                    entries.remove(&identity);
                }
                continue;
            }
            if entry.due(now) {
                tracing::debug!(pod.iam.role = %identity.role_arn, session_name = %identity.session_name,
                    "refreshing credentials");
                drop(self.start_fetch(entry, &identity, false));
            }
        }
        self.size
            .set(i64::try_from(entries.len()).unwrap_or(i64::MAX));
    }
}

/// `BACKOFF_BASE * 2^(n-1)` capped at `BACKOFF_MAX`, minus up to a fifth so
/// identities that failed together do not retry together.
fn backoff(consecutive: u32) -> Duration {
    let exp = consecutive.saturating_sub(1).min(16);
    let full = BACKOFF_BASE.saturating_mul(1 << exp).min(BACKOFF_MAX);
    full.mul_f64(1.0 - rand::random_range(0.0..0.2))
}

async fn sweep_loop(inner: Weak<Inner>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(SWEEP_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_full = Instant::now();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let Some(inner) = inner.upgrade() else { return };
        let every_identity = last_full.elapsed() >= UNUSED_CHECK_INTERVAL;
        if every_identity {
            last_full = Instant::now();
        }
        inner.sweep(every_identity);
    }
}

#[cfg(test)]
mod tests;
