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
//! - Prefetch and refresh run in the background on at most `--fetchers`
//!   concurrent STS calls; a request joining a queued background fetch lets
//!   it skip the queue.
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
use prometheus_client::registry::Registry;
use tokio::sync::{oneshot, Notify, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::config::ServerConfig;
use super::sts::{AssumeRole, Credentials, Identity, SessionTags, StsError, StsMetrics};

/// Whether any live pod still uses an identity (provided by the Pod cache).
/// Called from the sweeper without the cache's lock held, so it may take
/// the Pod cache's own locks.
pub type InUse = Arc<dyn Fn(&Identity) -> bool + Send + Sync>;

/// How often the sweeper looks for credentials to refresh or drop.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);
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
const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(15);

/// What the cache needs from `kiam server`'s flags.
#[derive(Debug, Clone)]
pub struct CacheConfig {
    /// `--session-duration`: requested from STS.
    pub session_duration: Duration,
    /// `--session-refresh`: nothing is served with less life left.
    pub session_refresh: Duration,
    /// `--fetchers`: concurrent background STS calls.
    pub fetchers: usize,
    /// `--session-tags`: pass the requesting pod's tags to STS.
    pub session_tags: bool,
    /// Bound on one AssumeRole call, so a hung call cannot hold an
    /// identity's single in-flight slot.
    pub call_timeout: Duration,
}

impl CacheConfig {
    pub fn from_server(config: &ServerConfig) -> Self {
        CacheConfig {
            session_duration: config.session_duration,
            session_refresh: config.session_refresh,
            fetchers: config.fetchers,
            session_tags: config.session_tags,
            call_timeout: DEFAULT_CALL_TIMEOUT,
        }
    }

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

struct Failure {
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
    failure: Option<Failure>,
    /// The last tags seen for this identity, used by background fetches.
    tags: Option<SessionTags>,
    last_used: Instant,
}

impl Entry {
    fn new(now: Instant) -> Self {
        Entry {
            cached: None,
            fetch: None,
            failure: None,
            tags: None,
            last_used: now,
        }
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
    fetchers: Arc<Semaphore>,
    next_fetch_id: std::sync::atomic::AtomicU64,
    sts_metrics: StsMetrics,
    hits: Counter,
    misses: Counter,
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
            .field("identities", &self.len())
            .finish()
    }
}

impl CredentialCache {
    /// Creates the cache and spawns its sweeper (so call it inside a tokio
    /// runtime). Registers `kiam_sts_cache_hit_total`,
    /// `kiam_sts_cache_miss_total` and [`StsMetrics`]' families in `registry`.
    pub fn new(
        sts: Arc<dyn AssumeRole>,
        config: CacheConfig,
        in_use: InUse,
        registry: &mut Registry,
        shutdown: CancellationToken,
    ) -> Self {
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
        let sts_metrics = StsMetrics::register(registry);
        let inner = Arc::new(Inner {
            sts,
            fetchers: Arc::new(Semaphore::new(config.fetchers.max(1))),
            config,
            in_use,
            entries: Mutex::new(HashMap::new()),
            next_fetch_id: Default::default(),
            sts_metrics,
            hits,
            misses,
            stop: shutdown.child_token(),
        });
        tokio::spawn(sweep_loop(Arc::downgrade(&inner), inner.stop.clone()));
        CredentialCache { inner }
    }

    /// Credentials for `identity` with more than `--session-refresh` of life
    /// left: from the cache, from the fetch already in flight, or from a new
    /// STS call. `tags` (the requesting pod's, used only with
    /// `--session-tags`) go to STS if this call causes a fetch.
    pub async fn get(
        &self,
        identity: &Identity,
        tags: Option<&SessionTags>,
    ) -> Result<Arc<Credentials>, StsError> {
        let inner = &self.inner;
        let pending = {
            let mut entries = inner.lock();
            let now = Instant::now();
            let entry = entries
                .entry(identity.clone())
                .or_insert_with(|| Entry::new(now));
            entry.last_used = now;
            if let Some(tags) = tags {
                entry.tags = Some(tags.clone());
            }
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

    /// Starts a background fetch for `identity` unless it is cached, in
    /// flight, or backing off after a failure. Never blocks (spawns; call it
    /// inside a tokio runtime).
    pub fn prefetch(&self, identity: &Identity, tags: Option<&SessionTags>) {
        let inner = &self.inner;
        let mut entries = inner.lock();
        let now = Instant::now();
        let entry = entries
            .entry(identity.clone())
            .or_insert_with(|| Entry::new(now));
        entry.last_used = now;
        if let Some(tags) = tags {
            entry.tags = Some(tags.clone());
        }
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

    /// The identities the cache holds (cached, in flight or failed).
    pub fn len(&self) -> usize {
        self.inner.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the cache holds anything for `identity`.
    pub fn contains(&self, identity: &Identity) -> bool {
        self.inner.lock().contains_key(identity)
    }
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
        let tags = if self.config.session_tags {
            entry.tags.clone()
        } else {
            None
        };
        let inner = self.clone();
        let identity = identity.clone();
        tokio::spawn(async move {
            let _permit = if urgent {
                None
            } else {
                tokio::select! {
                    permit = inner.fetchers.clone().acquire_owned() => permit.ok(),
                    _ = promote.notified() => None,
                }
            };
            let call = async {
                let call =
                    inner
                        .sts
                        .assume_role(&identity, inner.config.session_duration, tags.as_ref());
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
                    e.failure = Some(Failure {
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

    /// Drops identities nobody uses and starts background refreshes and
    /// retries for the ones still in use.
    fn sweep(self: &Arc<Self>) {
        let identities: Vec<Identity> = self.lock().keys().cloned().collect();
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
            let backing_off = entry.failure.as_ref().is_some_and(|f| now < f.retry_at);
            let due = match &entry.cached {
                Some(c) => now >= c.refresh_at,
                None => true,
            };
            if due && !backing_off {
                tracing::debug!(pod.iam.role = %identity.role_arn, session_name = %identity.session_name,
                    "refreshing credentials");
                drop(self.start_fetch(entry, &identity, false));
            }
        }
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
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let Some(inner) = inner.upgrade() else { return };
        inner.sweep();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::sts::{FakeFailure, FakeSts};
    use std::sync::atomic::{AtomicBool, Ordering};

    const HOUR: Duration = Duration::from_secs(3600);
    const REFRESH: Duration = Duration::from_secs(30 * 60);

    fn identity(role: &str) -> Identity {
        Identity {
            role_arn: format!("arn:aws:iam::123456789012:role/{role}").into(),
            session_name: "kiam-kiam".into(),
            external_id: None,
        }
    }

    fn config() -> CacheConfig {
        CacheConfig {
            session_duration: HOUR,
            session_refresh: REFRESH,
            fetchers: 8,
            session_tags: false,
            call_timeout: Duration::from_secs(15),
        }
    }

    fn always_used() -> InUse {
        Arc::new(|_: &Identity| true)
    }

    fn cache_with(
        sts: &Arc<FakeSts>,
        config: CacheConfig,
        in_use: InUse,
    ) -> (CredentialCache, Registry) {
        let mut registry = Registry::default();
        let cache = CredentialCache::new(
            sts.clone(),
            config,
            in_use,
            &mut registry,
            CancellationToken::new(),
        );
        (cache, registry)
    }

    /// Lets spawned tasks run (paused clock: no real time passes).
    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_gets_share_one_call_per_identity() {
        let sts = Arc::new(FakeSts::new());
        sts.set_delay(Duration::from_millis(200));
        let (cache, registry) = cache_with(&sts, config(), always_used());
        let ids: Vec<Identity> = (0..5).map(|i| identity(&format!("r{i}"))).collect();
        let gets = (0..1000).map(|i| {
            let cache = cache.clone();
            let id = ids[i % 5].clone();
            tokio::spawn(async move { cache.get(&id, None).await })
        });
        let results = futures::future::join_all(gets).await;
        let mut keys_per_identity: HashMap<usize, std::collections::HashSet<String>> =
            HashMap::new();
        for (i, r) in results.into_iter().enumerate() {
            let creds = r.unwrap().expect("credentials");
            keys_per_identity
                .entry(i % 5)
                .or_default()
                .insert(creds.access_key_id.clone());
        }
        for id in &ids {
            assert_eq!(sts.calls(id), 1, "{id:?}");
            assert_eq!(sts.max_in_flight(id), 1);
        }
        assert_eq!(sts.total_calls(), 5);
        assert!(
            keys_per_identity.values().all(|k| k.len() == 1),
            "one key per identity"
        );
        let text = crate::telemetry::encode(&registry);
        let misses: u64 = metric(&text, "kiam_sts_cache_miss_total");
        let hits: u64 = metric(&text, "kiam_sts_cache_hit_total");
        assert_eq!(hits + misses, 1000, "{text}");
        assert!(misses >= 5, "{text}");
        // Everything is cached now: more gets are hits and call nobody.
        cache.get(&ids[0], None).await.unwrap();
        assert_eq!(sts.total_calls(), 5);
    }

    fn metric(text: &str, name: &str) -> u64 {
        text.lines()
            .find_map(|l| {
                l.strip_prefix(name)
                    .and_then(|rest| rest.trim().parse().ok())
            })
            .unwrap_or_else(|| panic!("{name} missing in {text}"))
    }

    #[tokio::test(start_paused = true)]
    async fn never_serves_credentials_with_less_than_refresh_left() {
        let sts = Arc::new(FakeSts::new());
        let (cache, _r) = cache_with(&sts, config(), always_used());
        let id = identity("a");
        let first = cache.get(&id, None).await.unwrap();
        // Every background refresh fails, so only the first credential exists.
        sts.fail_always(Some(FakeFailure::Throttle));
        tokio::time::sleep(HOUR - REFRESH - Duration::from_secs(1)).await;
        assert!(sts.calls(&id) > 1, "the background refresh was tried");
        // Still more than REFRESH left: served.
        assert_eq!(
            cache.get(&id, None).await.unwrap().access_key_id,
            first.access_key_id
        );
        // Exactly REFRESH left: never served again, whatever STS says.
        tokio::time::sleep(Duration::from_secs(1)).await;
        for _ in 0..3 {
            assert!(cache.get(&id, None).await.is_err());
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        sts.fail_always(None);
        tokio::time::sleep(RETRYABLE_REUSE).await;
        let fresh = cache.get(&id, None).await.unwrap();
        assert_ne!(fresh.access_key_id, first.access_key_id);
    }

    #[tokio::test(start_paused = true)]
    async fn short_lived_credentials_are_refused_not_served() {
        let sts = Arc::new(FakeSts::new());
        sts.set_lifetime(Some(REFRESH));
        let (cache, _r) = cache_with(&sts, config(), always_used());
        let e = cache.get(&identity("a"), None).await.unwrap_err();
        assert_eq!(e.code.as_deref(), Some("ShortLived"));
        assert!(e.message.contains("--session-refresh"), "{}", e.message);
    }

    #[tokio::test(start_paused = true)]
    async fn failures_are_not_cached_and_retried_with_backoff() {
        let sts = Arc::new(FakeSts::new());
        sts.fail_always(Some(FakeFailure::Throttle));
        let (cache, _r) = cache_with(&sts, config(), always_used());
        let id = identity("a");
        let e = cache.get(&id, None).await.unwrap_err();
        assert_eq!(e.code.as_deref(), Some("Throttling"));
        // A request loop right after reuses the failure instead of calling STS.
        for _ in 0..100 {
            assert!(cache.get(&id, None).await.is_err());
        }
        assert_eq!(sts.calls(&id), 1);
        // Ten minutes of failures: the background retries back off (1s, 2s,
        // 4s ... 60s), far fewer than one call per sweep.
        tokio::time::sleep(Duration::from_secs(600)).await;
        let calls = sts.calls(&id);
        assert!((6..=25).contains(&calls), "{calls} calls in 10 minutes");
        // STS recovers: the next background retry succeeds and is cached.
        sts.fail_always(None);
        tokio::time::sleep(BACKOFF_MAX + SWEEP_INTERVAL).await;
        let before = sts.calls(&id);
        let creds = cache.get(&id, None).await.expect("recovered");
        assert!(creds.access_key_id.starts_with("ASIA"));
        assert_eq!(
            sts.calls(&id),
            before,
            "served from the cache after the background retry"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_callers_share_one_failure() {
        let sts = Arc::new(FakeSts::new());
        sts.set_delay(Duration::from_millis(100));
        sts.fail_next(1, FakeFailure::AccessDenied);
        let (cache, _r) = cache_with(&sts, config(), always_used());
        let id = identity("a");
        let gets = (0..50).map(|_| {
            let cache = cache.clone();
            let id = id.clone();
            tokio::spawn(async move { cache.get(&id, None).await })
        });
        for r in futures::future::join_all(gets).await {
            let e = r.unwrap().unwrap_err();
            assert!(e.message.starts_with("AccessDenied"), "{}", e.message);
            assert!(!e.retryable);
        }
        assert_eq!(sts.calls(&id), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_hung_call_times_out_and_frees_the_identity() {
        let sts = Arc::new(FakeSts::new());
        sts.fail_next(1, FakeFailure::Hang);
        let (cache, _r) = cache_with(&sts, config(), Arc::new(|_: &Identity| false));
        let id = identity("a");
        let e = cache.get(&id, None).await.unwrap_err();
        assert_eq!(e.code.as_deref(), Some("Timeout"));
        assert!(e.retryable);
        tokio::time::advance(RETRYABLE_REUSE).await;
        assert!(cache.get(&id, None).await.is_ok());
        assert_eq!(sts.calls(&id), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn refreshes_before_expiry_while_in_use() {
        let sts = Arc::new(FakeSts::new());
        let (cache, _r) = cache_with(&sts, config(), always_used());
        let id = identity("a");
        let first = cache.get(&id, None).await.unwrap();
        // Just before the credentials would stop being served, the sweeper
        // has already replaced them.
        tokio::time::sleep(HOUR - REFRESH - Duration::from_secs(1)).await;
        assert_eq!(sts.calls(&id), 2, "refreshed in the background");
        let served = cache.get(&id, None).await.unwrap();
        assert_ne!(served.access_key_id, first.access_key_id);
        assert_eq!(sts.calls(&id), 2, "the request itself was a hit");
        // And it keeps doing so for as long as the identity is used.
        tokio::time::sleep(3 * HOUR).await;
        assert!(sts.calls(&id) >= 2 + 3, "{}", sts.calls(&id));
    }

    #[tokio::test(start_paused = true)]
    async fn unused_identity_is_dropped_and_not_refreshed() {
        let sts = Arc::new(FakeSts::new());
        let used = Arc::new(AtomicBool::new(true));
        let flag = used.clone();
        let (cache, _r) = cache_with(
            &sts,
            config(),
            Arc::new(move |_: &Identity| flag.load(Ordering::SeqCst)),
        );
        let id = identity("a");
        cache.prefetch(&id, None);
        settle().await;
        assert_eq!(sts.calls(&id), 1);
        used.store(false, Ordering::SeqCst);
        tokio::time::sleep(IDLE_GRACE + 2 * SWEEP_INTERVAL).await;
        assert!(!cache.contains(&id), "dropped once nobody uses it");
        tokio::time::sleep(2 * HOUR).await;
        assert_eq!(sts.calls(&id), 1, "never refreshed");
    }

    #[tokio::test(start_paused = true)]
    async fn prefetch_calls_sts_before_any_get() {
        let sts = Arc::new(FakeSts::new());
        let (cache, registry) = cache_with(&sts, config(), always_used());
        let id = identity("a");
        cache.prefetch(&id, None);
        cache.prefetch(&id, None);
        settle().await;
        assert_eq!(sts.calls(&id), 1, "prefetched once");
        cache.get(&id, None).await.unwrap();
        assert_eq!(sts.calls(&id), 1);
        let text = crate::telemetry::encode(&registry);
        assert_eq!(metric(&text, "kiam_sts_cache_hit_total"), 1);
        assert_eq!(metric(&text, "kiam_sts_cache_miss_total"), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn background_fetches_are_bounded_by_fetchers_and_requests_skip_the_queue() {
        let sts = Arc::new(FakeSts::new());
        sts.set_delay(Duration::from_secs(1));
        let mut cfg = config();
        cfg.fetchers = 2;
        let (cache, _r) = cache_with(&sts, cfg, always_used());
        let ids: Vec<Identity> = (0..6).map(|i| identity(&format!("r{i}"))).collect();
        for id in &ids {
            cache.prefetch(id, None);
        }
        settle().await;
        assert_eq!(sts.total_calls(), 2, "only --fetchers calls at once");
        // A request for a queued identity promotes it past the queue.
        let got = cache.get(&ids[5], None).await.unwrap();
        assert!(got.access_key_id.starts_with("ASIA"));
        assert_eq!(sts.calls(&ids[5]), 1);
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(sts.total_calls(), 6);
    }

    #[tokio::test(start_paused = true)]
    async fn session_tags_are_sent_only_when_enabled() {
        let tags = SessionTags {
            namespace: "ns".into(),
            pod: "p".into(),
            service_account: "sa".into(),
        };
        let sts = Arc::new(FakeSts::new());
        let (cache, _r) = cache_with(&sts, config(), always_used());
        cache.get(&identity("a"), Some(&tags)).await.unwrap();
        assert_eq!(sts.last_tags(&identity("a")), None);
        let mut cfg = config();
        cfg.session_tags = true;
        let (cache, _r) = cache_with(&sts, cfg, always_used());
        cache.get(&identity("b"), Some(&tags)).await.unwrap();
        assert_eq!(sts.last_tags(&identity("b")), Some(tags));
    }

    #[tokio::test(start_paused = true)]
    async fn sweeper_stops_on_shutdown() {
        let sts = Arc::new(FakeSts::new());
        let shutdown = CancellationToken::new();
        let mut registry = Registry::default();
        let cache = CredentialCache::new(
            sts.clone(),
            config(),
            always_used(),
            &mut registry,
            shutdown.clone(),
        );
        let id = identity("a");
        cache.get(&id, None).await.unwrap();
        shutdown.cancel();
        tokio::time::sleep(2 * HOUR).await;
        assert_eq!(sts.calls(&id), 1, "no refresh after shutdown");
    }
}
