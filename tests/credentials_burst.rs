//! Bursts of new identities against the fake STS: the credential cache's
//! background fetches adapt their concurrency (up to `--fetchers`) to how
//! STS answers. Nothing here is timed: the assertions are on the calls and
//! the concurrency the STS double observed.

#[path = "support/cluster.rs"]
mod cluster;

use std::sync::Arc;
use std::time::Duration;

use cluster::{server_config, FakeFailure, FakeSts};
use kiam::server::credentials::{CacheConfig, CredentialCache, CredentialMetrics};
use kiam::server::model::Identity;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

fn identity(n: usize) -> Identity {
    Identity {
        role_arn: format!("arn:aws:iam::123456789012:role/burst-{n}").into(),
        session_name: "kiam-kiam".into(),
        external_id: None,
        tags: None,
    }
}

fn cache(sts: &Arc<FakeSts>, config: CacheConfig) -> CredentialCache {
    CredentialCache::new(
        sts.clone(),
        config,
        Arc::new(|_: &Identity| true),
        CredentialMetrics::register(&mut Registry::default()),
        CancellationToken::new(),
    )
}

/// Waits until every identity in `ids` has credentials cached.
async fn all_cached(cache: &CredentialCache, ids: &[Identity]) {
    for _ in 0..6000 {
        if ids.iter().all(|id| cache.state(id).cached.is_some()) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let missing = ids
        .iter()
        .filter(|id| cache.state(id).cached.is_none())
        .count();
    panic!("{missing} of {} identities never fetched", ids.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_1000_new_identities_costs_one_call_each_and_raises_concurrency() {
    let sts = Arc::new(FakeSts::new());
    sts.set_delay(Duration::from_millis(100));
    // The server's defaults.
    let config = server_config(&[]).cache();
    let ceiling = config.fetchers;
    assert!(ceiling > 8, "the default ceiling is above kiam's fixed 8");
    let cache = cache(&sts, config);
    let ids: Vec<Identity> = (0..1000).map(identity).collect();
    for id in &ids {
        cache.prefetch(id);
    }
    all_cached(&cache, &ids).await;
    assert_eq!(sts.total_calls(), 1000, "one AssumeRole per identity");
    let most = sts.max_total_in_flight();
    assert!(
        most > 8 && most <= ceiling,
        "concurrency grew past the starting 8 and stayed under --fetchers {ceiling}: {most}"
    );
    eprintln!(
        "1000 identities: {} calls, at most {most} at once, limit now {}",
        sts.total_calls(),
        cache.fetch_limit()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetchers_is_the_ceiling() {
    let sts = Arc::new(FakeSts::new());
    sts.set_delay(Duration::from_millis(50));
    let config = server_config(&["--fetchers", "12"]).cache();
    let cache = cache(&sts, config);
    let ids: Vec<Identity> = (0..300).map(identity).collect();
    for id in &ids {
        cache.prefetch(id);
    }
    all_cached(&cache, &ids).await;
    assert_eq!(sts.total_calls(), 300);
    let most = sts.max_total_in_flight();
    assert!(most <= 12, "--fetchers 12, yet {most} calls at once");
    assert!(most > 8, "it still grew up to the ceiling: {most}");
}

/// Waits until the fake has seen `n` calls in all.
async fn calls_reach(sts: &FakeSts, n: usize) {
    for _ in 0..6000 {
        if sts.total_calls() >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("only {} of {n} STS calls were made", sts.total_calls());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttling_sts_sees_the_concurrency_drop_to_one() {
    let sts = Arc::new(FakeSts::new());
    sts.set_delay(Duration::from_millis(50));
    let cache = cache(&sts, server_config(&[]).cache());

    // A first burst raises the limit well past its start.
    let warm: Vec<Identity> = (0..400).map(identity).collect();
    for id in &warm {
        cache.prefetch(id);
    }
    all_cached(&cache, &warm).await;
    let grown = sts.max_total_in_flight();
    assert!(grown > 16, "the first burst grew the concurrency: {grown}");
    let calls_before = sts.total_calls();

    // Now STS throttles everything, and a second burst arrives.
    sts.fail_always(Some(FakeFailure::Throttle));
    sts.reset_max_total_in_flight();
    let burst: Vec<Identity> = (1000..1400).map(identity).collect();
    for id in &burst {
        cache.prefetch(id);
    }
    // The first round of throttled answers comes from at most `grown`
    // calls; each later round is half the one before, so after twice that
    // many calls ...
    calls_reach(&sts, calls_before + 2 * grown + 10).await;
    let first_rounds = sts.max_total_in_flight();
    assert!(
        first_rounds <= grown,
        "throttling never raises the concurrency: {first_rounds} > {grown}"
    );
    // ... the calls go one at a time: measured over the next calls only.
    sts.reset_max_total_in_flight();
    let from = sts.total_calls();
    calls_reach(&sts, from + 20).await;
    let later = sts.max_total_in_flight();
    assert!(
        later <= 2,
        "a throttling STS still sees {later} calls at once (first rounds {first_rounds}, before {grown})"
    );
    assert_eq!(cache.fetch_limit(), 1);
    // Never a storm: no identity was asked for more than once per backoff
    // step, so the throttled calls are at most a few per identity.
    let throttled = sts.total_calls() - calls_before;
    assert!(throttled <= 2 * burst.len(), "{throttled} throttled calls");

    // STS recovers: the burst completes, one more call per identity at most
    // per retry.
    sts.fail_always(None);
    all_cached(&cache, &burst).await;
    eprintln!(
        "throttled: at most {first_rounds} at once at first, {later} later; {throttled} throttled calls; limit after recovery {}",
        cache.fetch_limit()
    );
}
