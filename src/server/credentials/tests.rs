use super::*;
use crate::server::model::SessionTags;
use fake_sts::{FakeFailure, FakeSts};

#[path = "../../../tests/support/fake_sts.rs"]
mod fake_sts;
use std::sync::atomic::{AtomicBool, Ordering};

const HOUR: Duration = Duration::from_secs(3600);
const REFRESH: Duration = Duration::from_secs(30 * 60);

fn identity(role: &str) -> Identity {
    Identity {
        role_arn: format!("arn:aws:iam::123456789012:role/{role}").into(),
        session_name: "kiam-kiam".into(),
        external_id: None,
        tags: None,
    }
}

fn config() -> CacheConfig {
    CacheConfig {
        session_duration: HOUR,
        session_refresh: REFRESH,
        fetchers: 8,
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
        CredentialMetrics::register(&mut registry),
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
        tokio::spawn(async move { cache.get(&id).await })
    });
    let results = futures::future::join_all(gets).await;
    let mut keys_per_identity: HashMap<usize, std::collections::HashSet<String>> = HashMap::new();
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
    cache.get(&ids[0]).await.unwrap();
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
    let first = cache.get(&id).await.unwrap();
    // Every background refresh fails, so only the first credential exists.
    sts.fail_always(Some(FakeFailure::Throttle));
    tokio::time::sleep(HOUR - REFRESH - Duration::from_secs(1)).await;
    assert!(sts.calls(&id) > 1, "the background refresh was tried");
    // Still more than REFRESH left: served.
    assert_eq!(
        cache.get(&id).await.unwrap().access_key_id,
        first.access_key_id
    );
    // Exactly REFRESH left: never served again, whatever STS says.
    tokio::time::sleep(Duration::from_secs(1)).await;
    for _ in 0..3 {
        assert!(cache.get(&id).await.is_err());
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    sts.fail_always(None);
    tokio::time::sleep(RETRYABLE_REUSE).await;
    let fresh = cache.get(&id).await.unwrap();
    assert_ne!(fresh.access_key_id, first.access_key_id);
}

#[tokio::test(start_paused = true)]
async fn short_lived_credentials_are_refused_not_served() {
    let sts = Arc::new(FakeSts::new());
    sts.set_lifetime(Some(REFRESH));
    let (cache, _r) = cache_with(&sts, config(), always_used());
    let e = cache.get(&identity("a")).await.unwrap_err();
    assert_eq!(e.code.as_deref(), Some("ShortLived"));
    assert!(e.message.contains("--session-refresh"), "{}", e.message);
}

#[tokio::test(start_paused = true)]
async fn failures_are_not_cached_and_retried_with_backoff() {
    let sts = Arc::new(FakeSts::new());
    sts.fail_always(Some(FakeFailure::Throttle));
    let (cache, _r) = cache_with(&sts, config(), always_used());
    let id = identity("a");
    let e = cache.get(&id).await.unwrap_err();
    assert_eq!(e.code.as_deref(), Some("Throttling"));
    // A request loop right after reuses the failure instead of calling STS.
    for _ in 0..100 {
        assert!(cache.get(&id).await.is_err());
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
    let creds = cache.get(&id).await.expect("recovered");
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
        tokio::spawn(async move { cache.get(&id).await })
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
    let e = cache.get(&id).await.unwrap_err();
    assert_eq!(e.code.as_deref(), Some("Timeout"));
    assert!(e.retryable);
    tokio::time::advance(RETRYABLE_REUSE).await;
    assert!(cache.get(&id).await.is_ok());
    assert_eq!(sts.calls(&id), 2);
}

#[tokio::test(start_paused = true)]
async fn refreshes_before_expiry_while_in_use() {
    let sts = Arc::new(FakeSts::new());
    let (cache, _r) = cache_with(&sts, config(), always_used());
    let id = identity("a");
    let first = cache.get(&id).await.unwrap();
    // Just before the credentials would stop being served, the sweeper
    // has already replaced them.
    tokio::time::sleep(HOUR - REFRESH - Duration::from_secs(1)).await;
    assert_eq!(sts.calls(&id), 2, "refreshed in the background");
    let served = cache.get(&id).await.unwrap();
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
    cache.prefetch(&id);
    settle().await;
    assert_eq!(sts.calls(&id), 1);
    used.store(false, Ordering::SeqCst);
    tokio::time::sleep(IDLE_GRACE + UNUSED_CHECK_INTERVAL + SWEEP_INTERVAL).await;
    assert!(
        !cache.inner.lock().contains_key(&id),
        "dropped once nobody uses it"
    );
    tokio::time::sleep(2 * HOUR).await;
    assert_eq!(sts.calls(&id), 1, "never refreshed");
}

#[tokio::test(start_paused = true)]
async fn prefetch_calls_sts_before_any_get() {
    let sts = Arc::new(FakeSts::new());
    let (cache, registry) = cache_with(&sts, config(), always_used());
    let id = identity("a");
    cache.prefetch(&id);
    cache.prefetch(&id);
    settle().await;
    assert_eq!(sts.calls(&id), 1, "prefetched once");
    cache.get(&id).await.unwrap();
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
        cache.prefetch(id);
    }
    settle().await;
    assert_eq!(sts.total_calls(), 2, "only --fetchers calls at once");
    // A request for a queued identity promotes it past the queue.
    let got = cache.get(&ids[5]).await.unwrap();
    assert!(got.access_key_id.starts_with("ASIA"));
    assert_eq!(sts.calls(&ids[5]), 1);
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(sts.total_calls(), 6);
}

#[tokio::test(start_paused = true)]
async fn tags_are_part_of_what_is_cached_and_sent() {
    let tagged = |namespace: &str| Identity {
        tags: Some(Arc::new(SessionTags {
            namespace: namespace.into(),
            pod: "p".into(),
            service_account: "sa".into(),
        })),
        ..identity("a")
    };
    let sts = Arc::new(FakeSts::new());
    let (cache, _r) = cache_with(&sts, config(), always_used());
    let a = cache.get(&tagged("ns-a")).await.unwrap();
    let b = cache.get(&tagged("ns-b")).await.unwrap();
    // One role, two namespaces: two credentials, each tagged for its pod.
    assert_ne!(a.access_key_id, b.access_key_id);
    assert_eq!(sts.last_tags(&tagged("ns-b")).unwrap().namespace, "ns-b");
    assert_eq!(sts.last_tags(&tagged("ns-a")).unwrap().namespace, "ns-a");
    cache.get(&identity("a")).await.unwrap();
    assert_eq!(sts.last_tags(&identity("a")), None);
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
        CredentialMetrics::register(&mut registry),
        shutdown.clone(),
    );
    let id = identity("a");
    cache.get(&id).await.unwrap();
    shutdown.cancel();
    tokio::time::sleep(2 * HOUR).await;
    assert_eq!(sts.calls(&id), 1, "no refresh after shutdown");
}

#[tokio::test(start_paused = true)]
async fn state_reports_what_is_cached_in_flight_and_failed_without_fetching() {
    let sts = Arc::new(FakeSts::new());
    sts.set_delay(Duration::from_millis(100));
    let (cache, _registry) = cache_with(&sts, config(), always_used());
    let id = identity("explained");

    // Asking is free: nothing cached, nothing started.
    assert_eq!(cache.state(&id), CredentialState::default());
    settle().await;
    assert_eq!(sts.calls(&id), 0);

    let waiting = tokio::spawn({
        let (cache, id) = (cache.clone(), id.clone());
        async move { cache.get(&id).await }
    });
    settle().await;
    assert!(cache.state(&id).in_flight);
    let creds = waiting.await.unwrap().unwrap();
    let state = cache.state(&id);
    assert!(!state.in_flight && state.last_failure.is_none());
    let cached = state.cached.expect("cached");
    assert!(cached.fresh);
    assert_eq!(cached.access_key_id, creds.access_key_id);
    assert_eq!(cached.expiration, creds.expiration);
    // Refreshed before the refresh threshold, never after.
    let threshold = creds.expiration - jiff::SignedDuration::try_from(REFRESH).unwrap();
    assert!(cached.refresh_at <= threshold, "{cached:?}");

    sts.fail_always(Some(FakeFailure::AccessDenied));
    let other = identity("denied");
    cache.get(&other).await.unwrap_err();
    let failure = cache.state(&other).last_failure.expect("failure kept");
    assert_eq!(failure.code.as_deref(), Some("AccessDenied"));
    assert!(!failure.retryable);
    assert_eq!(failure.consecutive, 1);
}

/// The sweeper asks whether a pod uses an identity only when the identity
/// is due a refresh, and about every identity once per
/// UNUSED_CHECK_INTERVAL: with one identity per pod (session tags), asking
/// about all of them every second was the server's largest cost.
#[tokio::test(start_paused = true)]
async fn the_sweeper_asks_about_every_identity_only_now_and_then() {
    let sts = Arc::new(FakeSts::new());
    let asked = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = asked.clone();
    let (cache, _r) = cache_with(
        &sts,
        config(),
        Arc::new(move |_: &Identity| {
            count.fetch_add(1, Ordering::SeqCst);
            true
        }),
    );
    for n in 0..100 {
        cache.prefetch(&identity(&format!("r{n}")));
    }
    settle().await;
    asked.store(0, Ordering::SeqCst);
    // Fresh credentials, none due: ticks inside one interval ask nothing.
    tokio::time::sleep(UNUSED_CHECK_INTERVAL / 2).await;
    assert_eq!(asked.load(Ordering::SeqCst), 0);
    // One full pass per interval.
    tokio::time::sleep(UNUSED_CHECK_INTERVAL).await;
    assert_eq!(asked.load(Ordering::SeqCst), 100);
}
