//! The Pod and Namespace caches against the in-memory API server, through
//! the real kube-rs client: what a pod's IP is matched to as pods appear,
//! complete, terminate, are deleted and hand their IP to another pod, and
//! what happens while watch events are late.
//!
//! Waiting: a watch event arrives asynchronously, so tests wait (polling)
//! for the cache to reflect a change before asserting what a lookup
//! answers. The wait has a generous bound only so a broken watcher fails the
//! test instead of hanging it; nothing here measures speed.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use kiam::server::model::{PodInfo, PodPhase, Prefetch};
use kiam::server::namespaces::NamespaceCache;
use kiam::server::pods::{FindError, PodCache, PodCacheConfig, PodCacheMetrics};
use kiam::server::policy::{ArnResolver, NamespacePolicyConfig, Policy};
use kiam_sandbox::apiserver::{FakeApiServer, RecordedRequest};
use prometheus_client::registry::Registry;
use serde_json::json;
use tokio::sync::mpsc;

const BASE: &str = "arn:aws:iam::123456789012:role/";
const NS: &str = "team-a";

struct Fixture {
    api: FakeApiServer,
    pods: PodCache,
    prefetch: mpsc::Receiver<Prefetch>,
    metrics: PodCacheMetrics,
    registry: Registry,
}

/// The policy of a server run with `--role-base-arn=BASE` and
/// `--default-permitted-regexp=default` (strict).
fn policy(default: Option<&str>) -> Arc<Policy> {
    Arc::new(Policy::new(
        ArnResolver::new(BASE).unwrap(),
        "kiam",
        false,
        NamespacePolicyConfig::new(true, default).unwrap(),
    ))
}

fn client(api: &FakeApiServer) -> kube::Client {
    kiam::ensure_crypto_provider();
    let config = kube::Config::new(api.url().parse().unwrap());
    kube::Client::try_from(config).unwrap()
}

async fn fixture_with_buffer(buffer: usize) -> Fixture {
    fixture_with(buffer, 100).await
}

async fn fixture_with(buffer: usize, confirmations_per_second: u32) -> Fixture {
    let api = FakeApiServer::start().await.unwrap();
    api.create_namespace(NS).unwrap();
    let mut registry = Registry::default();
    let metrics = PodCacheMetrics::register(&mut registry);
    let (pods, prefetch) = PodCache::spawn(
        client(&api),
        policy(None),
        PodCacheConfig {
            prefetch_buffer_size: buffer,
            confirmations_per_second,
            resync: Duration::from_secs(60),
        },
        metrics.clone(),
    );
    pods.wait_synced().await;
    // Changes made from here on arrive as watch events, not in the list.
    api.wait_for_open_watches(1).await;
    Fixture {
        api,
        pods,
        prefetch,
        metrics,
        registry,
    }
}

async fn fixture() -> Fixture {
    fixture_with_buffer(100).await
}

fn pod(name: &str, ip: &str, phase: &str, role: Option<&str>) -> serde_json::Value {
    let annotations = match role {
        Some(role) => json!({ "iam.amazonaws.com/role": role }),
        None => json!({}),
    };
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": name, "namespace": NS, "annotations": annotations },
        "spec": { "containers": [{ "name": "app", "image": "app" }] },
        "status": { "phase": phase, "podIP": ip, "podIPs": [{ "ip": ip }] },
    })
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// Polls until `cond` holds; panics (naming `what`) if it never does.
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..1000 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

fn is_ip_lookup(r: &RecordedRequest, ip: &str) -> bool {
    r.verb == "list"
        && r.path == "/api/v1/pods"
        && r.param("fieldSelector") == Some(&format!("status.podIP={ip}"))
}

fn ip_lookups(api: &FakeApiServer, ip: &str) -> usize {
    api.count_requests(|r| is_ip_lookup(r, ip))
}

impl Fixture {
    /// Waits until the cache holds `name` in a state that satisfies `cond`.
    async fn cached(&self, name: &str, cond: impl Fn(&PodInfo) -> bool) {
        let pods = self.pods.clone();
        eventually(&format!("pod {name} in the cache"), || {
            pods.get(NS, name).is_some_and(|p| cond(&p))
        })
        .await
    }

    async fn gone(&self, name: &str) {
        let pods = self.pods.clone();
        eventually(&format!("pod {name} to leave the cache"), || {
            pods.get(NS, name).is_none()
        })
        .await
    }
}

#[tokio::test]
async fn a_new_pod_is_found_by_ip_from_the_cache() {
    let f = fixture().await;
    assert!(f.pods.is_synced());
    f.api
        .apply_pod(pod("web", "10.1.0.1", "Running", Some("reader")))
        .unwrap();
    f.cached("web", |_| true).await;

    let found = f.pods.find_by_ip(ip("10.1.0.1")).await.unwrap();
    assert_eq!(&*found.name, "web");
    assert_eq!(found.role.as_deref(), Some("reader"));
    assert_eq!(
        ip_lookups(&f.api, "10.1.0.1"),
        0,
        "a cached pod needs no API call"
    );
}

#[tokio::test]
async fn an_unknown_ip_is_no_pod_found_after_one_api_lookup() {
    let f = fixture().await;
    let err = f.pods.find_by_ip(ip("10.9.9.9")).await.unwrap_err();
    assert!(matches!(err, FindError::NotFound));
    assert_eq!(err.to_string(), "no pod found");
    assert_eq!(ip_lookups(&f.api, "10.9.9.9"), 1);
}

/// 20 requests from an address with no pod used to cost 20 cluster-wide
/// LISTs (and an agent's retries multiplied that): now one, then misses are
/// answered from the negative cache for NEGATIVE_TTL, and a pod that takes
/// the IP meanwhile is still found as soon as the watch delivers it.
#[tokio::test]
async fn misses_on_one_ip_cost_one_api_lookup() {
    let f = fixture().await;
    for _ in 0..20 {
        let err = f.pods.find_by_ip(ip("10.9.9.8")).await.unwrap_err();
        assert!(matches!(err, FindError::NotFound), "{err}");
    }
    assert_eq!(ip_lookups(&f.api, "10.9.9.8"), 1);
    let text = kiam::telemetry::encode(&f.registry);
    assert!(
        text.contains("kiam_k8s_pod_lookups_negative_cached_total 19"),
        "{text}"
    );
    assert!(
        text.contains(r#"kiam_k8s_pod_lookups_total{result="not_found"} 1"#),
        "{text}"
    );
    assert!(text.contains("kiam_k8s_pod_lookups_in_flight 0"), "{text}");

    // A pod taking the IP is found from the watch, negative entry or not.
    f.api
        .apply_pod(pod("late", "10.9.9.8", "Running", Some("reader")))
        .unwrap();
    f.cached("late", |_| true).await;
    assert_eq!(
        &*f.pods.find_by_ip(ip("10.9.9.8")).await.unwrap().name,
        "late"
    );

    // After the TTL a miss asks the API again.
    tokio::time::sleep(kiam::server::pods::NEGATIVE_TTL).await;
    f.pods.find_by_ip(ip("10.9.9.7")).await.unwrap_err();
    tokio::time::sleep(kiam::server::pods::NEGATIVE_TTL).await;
    f.pods.find_by_ip(ip("10.9.9.7")).await.unwrap_err();
    assert_eq!(ip_lookups(&f.api, "10.9.9.7"), 2);
}

/// Confirmation GETs are bounded by `--pod-confirmations-per-second`
/// across all pods: past the budget the cache is trusted (and counted), so
/// busy pods cannot turn the server into an etcd load generator. The budget
/// is spent only while the watch cannot be proven current (here: its events
/// are held back and a newer pod change is waiting).
#[tokio::test]
async fn confirmations_stay_within_their_budget() {
    let f = fixture_with(100, 3).await;
    for n in 1..=12 {
        f.api
            .apply_pod(pod(
                &format!("b{n}"),
                &format!("10.1.7.{n}"),
                "Running",
                None,
            ))
            .unwrap();
    }
    f.cached("b12", |_| true).await;
    f.api.hold_watch_events(true);
    f.api
        .apply_pod(pod("held", "10.1.7.99", "Running", None))
        .unwrap();
    let gets =
        |api: &FakeApiServer| api.count_requests(|r| r.verb == "get" && r.path.contains("/pods/b"));
    let before = gets(&f.api);
    for n in 1..=12 {
        let found = f.pods.find_by_ip(ip(&format!("10.1.7.{n}"))).await.unwrap();
        assert_eq!(&*found.name, format!("b{n}"));
    }
    let spent = gets(&f.api) - before;
    // A burst of 12 pods within well under a second: the bucket's 3, plus
    // at most what it refilled meanwhile.
    assert!((3..=5).contains(&spent), "{spent} confirmation GETs");
    let text = kiam::telemetry::encode(&f.registry);
    let skipped = 12 - spent;
    assert!(
        text.contains(&format!(
            r#"kiam_k8s_pod_confirmations_total{{result="skipped"}} {skipped}"#
        )),
        "{text}"
    );

    assert!(
        !text.contains(r#"kiam_k8s_pod_confirmations_total{result="current"}"#),
        "{text}"
    );
    f.api.hold_watch_events(false);

    // 0 turns confirmation off: no GET at all.
    let off = fixture_with(100, 0).await;
    off.api
        .apply_pod(pod("c1", "10.1.7.100", "Running", None))
        .unwrap();
    off.cached("c1", |_| true).await;
    off.pods.find_by_ip(ip("10.1.7.100")).await.unwrap();
    assert_eq!(
        off.api
            .count_requests(|r| r.verb == "get" && r.path.contains("/pods/c1")),
        0
    );
}

#[tokio::test]
async fn completed_and_deleted_pods_are_not_matched() {
    let f = fixture().await;
    f.api
        .apply_pod(pod("job", "10.1.0.2", "Running", Some("batch")))
        .unwrap();
    f.api
        .apply_pod(pod("web", "10.1.0.3", "Running", Some("reader")))
        .unwrap();
    f.cached("job", |_| true).await;
    f.cached("web", |_| true).await;
    assert!(f.pods.find_by_ip(ip("10.1.0.2")).await.is_ok());

    for phase in ["Succeeded", "Failed"] {
        f.api.set_pod_phase(NS, "job", phase).unwrap();
        f.cached("job", |p| p.phase != PodPhase::Running).await;
        let err = f.pods.find_by_ip(ip("10.1.0.2")).await.unwrap_err();
        assert!(matches!(err, FindError::NotFound), "{phase}: {err}");
    }

    f.api.delete_pod(NS, "web").unwrap();
    f.gone("web").await;
    let err = f.pods.find_by_ip(ip("10.1.0.3")).await.unwrap_err();
    assert!(matches!(err, FindError::NotFound), "{err}");
}

#[tokio::test]
async fn a_reused_ip_answers_the_new_pods_role() {
    let f = fixture().await;
    f.api
        .apply_pod(pod("old", "10.1.0.4", "Running", Some("old-role")))
        .unwrap();
    f.cached("old", |_| true).await;
    assert_eq!(
        f.pods
            .find_by_ip(ip("10.1.0.4"))
            .await
            .unwrap()
            .role
            .as_deref(),
        Some("old-role")
    );

    // Completed but not yet deleted: both are cached, only the new one is live.
    f.api.set_pod_phase(NS, "old", "Succeeded").unwrap();
    f.api
        .apply_pod(pod("new", "10.1.0.4", "Pending", Some("new-role")))
        .unwrap();
    f.cached("new", |_| true).await;
    f.cached("old", |p| p.phase == PodPhase::Succeeded).await;
    let found = f.pods.find_by_ip(ip("10.1.0.4")).await.unwrap();
    assert_eq!(
        (&*found.name, found.role.as_deref()),
        ("new", Some("new-role"))
    );

    // Deleted, and the IP handed on once more.
    f.api.delete_pod(NS, "old").unwrap();
    f.api.delete_pod(NS, "new").unwrap();
    f.api
        .apply_pod(pod("newer", "10.1.0.4", "Running", Some("newer-role")))
        .unwrap();
    f.gone("new").await;
    f.cached("newer", |_| true).await;
    let found = f.pods.find_by_ip(ip("10.1.0.4")).await.unwrap();
    assert_eq!(found.role.as_deref(), Some("newer-role"));
    assert_eq!(ip_lookups(&f.api, "10.1.0.4"), 0);
}

#[tokio::test]
async fn host_network_pods_are_never_matched() {
    let f = fixture().await;
    let mut host = pod("node-agent", "192.168.0.10", "Running", Some("node-role"));
    host["spec"]["hostNetwork"] = json!(true);
    f.api.apply_pod(host).unwrap();
    f.cached("node-agent", |p| p.host_network).await;

    let err = f.pods.find_by_ip(ip("192.168.0.10")).await.unwrap_err();
    assert!(matches!(err, FindError::NotFound), "{err}");
    // The API server was asked and reported the pod; it was still refused.
    assert_eq!(ip_lookups(&f.api, "192.168.0.10"), 1);
}

#[tokio::test]
async fn a_terminating_pod_matches_until_its_deadline_only() {
    let f = fixture().await;
    f.api
        .apply_pod(pod("slow", "10.1.0.5", "Running", Some("reader")))
        .unwrap();
    f.api
        .apply_pod(pod("done", "10.1.0.6", "Running", Some("reader")))
        .unwrap();
    f.api
        .mark_pod_terminating(NS, "slow", Duration::from_secs(3600))
        .unwrap();
    f.api
        .mark_pod_terminating(NS, "done", Duration::ZERO)
        .unwrap();
    f.cached("slow", |p| p.deletion.is_some()).await;
    f.cached("done", |p| p.deletion.is_some()).await;

    // Within its grace period a pod still runs and still gets its role.
    let found = f.pods.find_by_ip(ip("10.1.0.5")).await.unwrap();
    assert_eq!(&*found.name, "slow");
    // Past it, never, although the API server still lists it.
    let err = f.pods.find_by_ip(ip("10.1.0.6")).await.unwrap_err();
    assert!(matches!(err, FindError::NotFound), "{err}");
    assert!(f.api.pod(NS, "done").is_some());
}

#[tokio::test]
async fn start_up_race_is_answered_by_a_direct_lookup() {
    let mut f = fixture().await;
    f.api.hold_watch_events(true);
    f.api
        .apply_pod(pod("early", "10.1.0.7", "Running", Some("reader")))
        .unwrap();
    assert!(f.pods.get(NS, "early").is_none(), "the event is held back");

    let found = f.pods.find_by_ip(ip("10.1.0.7")).await.unwrap();
    assert_eq!(
        (&*found.name, found.role.as_deref()),
        ("early", Some("reader"))
    );
    assert_eq!(ip_lookups(&f.api, "10.1.0.7"), 1);
    // The answer is kept (and prefetched for), so the next request
    // needs no API call even before the event arrives.
    assert!(f.pods.get(NS, "early").is_some());
    assert_eq!(&*f.prefetch.recv().await.unwrap().pod.name, "early");
    f.pods.find_by_ip(ip("10.1.0.7")).await.unwrap();
    assert_eq!(ip_lookups(&f.api, "10.1.0.7"), 1);

    // When the event finally arrives, nothing changes for the pod.
    f.api.hold_watch_events(false);
    f.api.set_pod_phase(NS, "early", "Succeeded").unwrap();
    f.cached("early", |p| p.phase == PodPhase::Succeeded).await;
}

#[tokio::test]
async fn concurrent_misses_on_one_ip_share_one_lookup() {
    let f = fixture().await;
    f.api.hold_watch_events(true);
    f.api
        .apply_pod(pod("early", "10.1.0.8", "Running", Some("reader")))
        .unwrap();
    let lookups: Vec<_> = (0..20)
        .map(|_| {
            let pods = f.pods.clone();
            tokio::spawn(async move { pods.find_by_ip(ip("10.1.0.8")).await })
        })
        .collect();
    for lookup in lookups {
        assert_eq!(&*lookup.await.unwrap().unwrap().name, "early");
    }
    // Overlapping callers share one request; later ones find the answer
    // cached. (On a multi-threaded runtime a caller could miss both by a
    // hair; tokio::test runs on one thread.)
    assert_eq!(ip_lookups(&f.api, "10.1.0.8"), 1);
}

#[tokio::test]
async fn two_live_pods_on_one_ip_are_settled_by_the_api_or_refused() {
    let f = fixture().await;
    f.api
        .apply_pod(pod("a", "10.1.0.9", "Running", Some("role-a")))
        .unwrap();
    f.api
        .apply_pod(pod("b", "10.1.0.9", "Running", Some("role-b")))
        .unwrap();
    f.cached("a", |_| true).await;
    f.cached("b", |_| true).await;

    // Really two live pods: an error, never a guess.
    match f.pods.find_by_ip(ip("10.1.0.9")).await {
        Err(FindError::Ambiguous { ip: got, mut pods }) => {
            pods.sort();
            assert_eq!(got, ip("10.1.0.9"));
            assert_eq!(pods, ["team-a/a", "team-a/b"]);
        }
        other => panic!("expected Ambiguous, got {other:?}"),
    }
    assert_eq!(ip_lookups(&f.api, "10.1.0.9"), 1);

    // The cache is stale (a's completion is held back): the API settles it.
    f.api.hold_watch_events(true);
    f.api.set_pod_phase(NS, "a", "Succeeded").unwrap();
    let found = f.pods.find_by_ip(ip("10.1.0.9")).await.unwrap();
    assert_eq!((&*found.name, found.role.as_deref()), ("b", Some("role-b")));
    assert_eq!(ip_lookups(&f.api, "10.1.0.9"), 2);
}

#[tokio::test]
async fn prefetch_gets_pods_with_a_role_and_an_ip() {
    let mut f = fixture().await;
    // Neither of these is worth prefetching for.
    f.api
        .apply_pod(pod("plain", "10.1.1.1", "Running", None))
        .unwrap();
    let mut no_ip = pod("starting", "", "Pending", Some("reader"));
    no_ip["status"] = json!({ "phase": "Pending" });
    f.api.apply_pod(no_ip).unwrap();
    // This one is, once it has an IP.
    f.api.set_pod_ip(NS, "starting", "10.1.1.2").unwrap();

    let Prefetch {
        pod: prefetched,
        identity,
    } = f.prefetch.recv().await.unwrap();
    assert_eq!(&*prefetched.name, "starting");
    assert_eq!(prefetched.ips, Some(ip("10.1.1.2").into()));
    assert_eq!(prefetched.role.as_deref(), Some("reader"));

    assert_eq!(&*identity.role_arn, format!("{BASE}reader"));
    assert_eq!(&*identity.session_name, "kiam-kiam");
    assert!(f.pods.identity_in_use(&identity));

    // Running with the same role: already prefetched for.
    f.api.set_pod_phase(NS, "starting", "Running").unwrap();
    f.api.delete_pod(NS, "starting").unwrap();
    f.gone("starting").await;
    assert!(f.prefetch.try_recv().is_err());
    assert!(!f.pods.identity_in_use(&identity));
}

#[tokio::test]
async fn a_full_prefetch_buffer_drops_and_counts() {
    let f = fixture_with_buffer(1).await;
    for n in 1..=3 {
        f.api
            .apply_pod(pod(
                &format!("p{n}"),
                &format!("10.1.2.{n}"),
                "Running",
                Some("reader"),
            ))
            .unwrap();
    }
    f.cached("p3", |_| true).await;
    let metrics = f.metrics.clone();
    eventually("two dropped prefetches", || metrics.dropped_pods() == 2).await;
    // The watcher kept going: every pod is matched.
    for n in 1..=3 {
        let found = f.pods.find_by_ip(ip(&format!("10.1.2.{n}"))).await.unwrap();
        assert_eq!(&*found.name, format!("p{n}"));
    }
    assert_eq!(ip_lookups(&f.api, "10.1.2.3"), 0);
}

#[tokio::test]
async fn a_re_list_after_lost_history_drops_pods_deleted_meanwhile() {
    let f = fixture().await;
    f.api
        .apply_pod(pod("gone", "10.1.3.1", "Running", Some("reader")))
        .unwrap();
    f.api
        .apply_pod(pod("kept", "10.1.3.2", "Running", Some("reader")))
        .unwrap();
    f.cached("gone", |_| true).await;
    f.cached("kept", |_| true).await;

    // The watch goes down, the pod is deleted, and the history is compacted
    // away: the watcher must re-list to learn about the deletion.
    let lists = |api: &FakeApiServer| {
        api.count_requests(|r| {
            r.verb == "list" && r.path == "/api/v1/pods" && r.param("fieldSelector").is_none()
        })
    };
    assert_eq!(lists(&f.api), 1);
    f.api.set_unavailable(true);
    let api = f.api.clone();
    eventually("the watch to drop", || api.open_watches() == 0).await;
    f.api.delete_pod(NS, "gone").unwrap();
    f.api.compact();
    f.api.set_unavailable(false);

    f.gone("gone").await;
    assert_eq!(lists(&f.api), 2, "the deletion was learnt from a re-list");
    assert!(f.pods.get(NS, "kept").is_some());
    assert!(matches!(
        f.pods.find_by_ip(ip("10.1.3.1")).await,
        Err(FindError::NotFound)
    ));
}

#[tokio::test]
async fn pods_listed_before_the_cache_starts_are_synced() {
    let api = FakeApiServer::start().await.unwrap();
    api.create_namespace(NS).unwrap();
    api.apply_pod(pod("pre", "10.1.4.1", "Running", Some("reader")))
        .unwrap();
    let (pods, mut prefetch) = PodCache::spawn(
        client(&api),
        policy(None),
        PodCacheConfig {
            prefetch_buffer_size: 10,
            confirmations_per_second: 100,
            resync: Duration::ZERO,
        },
        PodCacheMetrics::default(),
    );
    pods.wait_synced().await;
    assert!(pods.get(NS, "pre").is_some(), "synced means listed");
    assert_eq!(&*prefetch.recv().await.unwrap().pod.name, "pre");
    pods.find_by_ip(ip("10.1.4.1")).await.unwrap();
    assert_eq!(ip_lookups(&api, "10.1.4.1"), 0);

    // Dropping the last handle stops the watch.
    drop(pods);
    eventually("the watch to close", || api.open_watches() == 0).await;
    assert!(prefetch.recv().await.is_none());
}

fn namespace(name: &str, permitted: Option<&str>) -> serde_json::Value {
    let annotations = match permitted {
        Some(p) => json!({ "iam.amazonaws.com/permitted": p }),
        None => json!({}),
    };
    json!({ "metadata": { "name": name, "annotations": annotations } })
}

#[tokio::test]
async fn namespace_regex_changes_are_picked_up() {
    let api = FakeApiServer::start().await.unwrap();
    api.create_namespace(namespace("apps", Some(".*/reader")))
        .unwrap();
    let namespaces = NamespaceCache::spawn(client(&api), policy(None), Duration::from_secs(60));
    namespaces.wait_synced().await;
    api.wait_for_open_watches(1).await;
    let reader = format!("{BASE}reader");
    let writer = format!("{BASE}writer");
    let policy = namespaces.get("apps").unwrap();
    assert!(policy.permits(&reader).is_ok());
    assert!(policy.permits(&writer).is_err());
    // `default` exists and has no annotation: nothing permitted.
    assert!(namespaces.get("default").unwrap().permits(&reader).is_err());

    api.create_namespace(namespace("apps", Some(".*/writer")))
        .unwrap();
    eventually("the new regex", || {
        namespaces
            .get("apps")
            .is_some_and(|p| p.permits(&writer).is_ok())
    })
    .await;
    assert!(namespaces.get("apps").unwrap().permits(&reader).is_err());

    // An invalid regex denies, with the reason.
    api.create_namespace(namespace("apps", Some("("))).unwrap();
    eventually("the invalid regex", || {
        namespaces
            .get("apps")
            .is_some_and(|p| p.permits(&writer).is_err())
    })
    .await;
    let why = namespaces
        .get("apps")
        .unwrap()
        .permits(&writer)
        .unwrap_err();
    assert!(why.contains("invalid"), "{why}");

    api.delete_namespace("apps").unwrap();
    eventually("the namespace to leave the cache", || {
        namespaces.get("apps").is_none()
    })
    .await;
}

#[tokio::test]
async fn a_namespace_whose_event_is_late_is_fetched_directly() {
    let api = FakeApiServer::start().await.unwrap();
    let namespaces =
        NamespaceCache::spawn(client(&api), policy(Some(".*")), Duration::from_secs(60));
    namespaces.wait_synced().await;
    api.hold_watch_events(true);
    api.create_namespace(namespace("fresh", Some(".*/reader")))
        .unwrap();
    assert!(namespaces.get("fresh").is_none());
    let policy = namespaces.find("fresh").await.unwrap().unwrap();
    assert!(policy.permits(&format!("{BASE}reader")).is_ok());
    assert!(policy.permits(&format!("{BASE}writer")).is_err());
    assert!(namespaces.get("fresh").is_some());
    assert!(namespaces.find("missing").await.unwrap().is_none());
    // --default-permitted-regexp applies to namespaces without the annotation.
    assert!(namespaces
        .get("default")
        .unwrap()
        .permits(&format!("{BASE}anything"))
        .is_ok());
}

/// A pod with several addresses (`podIPs`), the first its `podIP`.
fn dual_stack(name: &str, ips: &[&str], role: Option<&str>) -> serde_json::Value {
    let mut pod = pod(name, ips[0], "Running", role);
    pod["status"]["podIPs"] = ips.iter().map(|ip| json!({ "ip": ip })).collect();
    pod
}

#[tokio::test]
async fn a_dual_stack_pod_is_found_by_either_address() {
    let f = fixture().await;
    f.api
        .apply_pod(dual_stack(
            "dual",
            &["198.18.1.1", "2001:2::11"],
            Some("reader"),
        ))
        .unwrap();
    f.api
        .apply_pod(dual_stack(
            "v6-first",
            &["2001:2::12", "198.18.1.2"],
            Some("writer"),
        ))
        .unwrap();
    f.api
        .apply_pod(pod("v6-only", "2001:2::13", "Running", Some("other")))
        .unwrap();
    f.cached("dual", |_| true).await;
    f.cached("v6-first", |_| true).await;
    f.cached("v6-only", |_| true).await;
    for (address, name) in [
        ("198.18.1.1", "dual"),
        ("2001:2::11", "dual"),
        ("::ffff:198.18.1.1", "dual"),
        ("2001:2::12", "v6-first"),
        ("198.18.1.2", "v6-first"),
        ("2001:2::13", "v6-only"),
    ] {
        let found = f.pods.find_by_ip(ip(address)).await.unwrap();
        assert_eq!(&*found.name, name, "{address}");
    }
    // All from the cache.
    for address in [
        "198.18.1.1",
        "2001:2::11",
        "2001:2::12",
        "198.18.1.2",
        "2001:2::13",
    ] {
        assert_eq!(ip_lookups(&f.api, address), 0, "{address}");
    }
}

/// The direct lookup can only select on `status.podIP` (Kubernetes has no
/// field selector for `podIPs`): a pod the watch has not delivered is found
/// by its primary address, not by its secondary one, and a miss on the
/// secondary never answers another pod.
#[tokio::test]
async fn a_direct_lookup_finds_the_primary_address_only() {
    let f = fixture().await;
    f.api.hold_watch_events(true);
    f.api
        .apply_pod(dual_stack(
            "early",
            &["198.18.1.3", "2001:2::14"],
            Some("reader"),
        ))
        .unwrap();
    f.api
        .apply_pod(dual_stack(
            "early6",
            &["2001:2::15", "198.18.1.4"],
            Some("reader"),
        ))
        .unwrap();

    // Secondary address, watch lagging: no pod (after one lookup).
    let err = f.pods.find_by_ip(ip("2001:2::14")).await.unwrap_err();
    assert!(matches!(err, FindError::NotFound), "{err}");
    assert_eq!(ip_lookups(&f.api, "2001:2::14"), 1);
    // Primary IPv6 address: found by the lookup.
    let found = f.pods.find_by_ip(ip("2001:2::15")).await.unwrap();
    assert_eq!(&*found.name, "early6");
    // The lookup put the pod in the cache under both addresses.
    let found = f.pods.find_by_ip(ip("198.18.1.4")).await.unwrap();
    assert_eq!(&*found.name, "early6");
    assert_eq!(ip_lookups(&f.api, "198.18.1.4"), 0);

    // Once the watch delivers the pod, its secondary address is found.
    f.api.hold_watch_events(false);
    f.cached("early", |_| true).await;
    let found = f.pods.find_by_ip(ip("2001:2::14")).await.unwrap();
    assert_eq!(&*found.name, "early");
}

/// A cached dual-stack pod is confirmed to still own the address asked
/// about, not just any of its addresses.
#[tokio::test]
async fn a_cached_pod_that_lost_an_ipv6_address_is_not_its_owner() {
    let f = fixture().await;
    f.api
        .apply_pod(dual_stack(
            "old",
            &["198.18.1.5", "2001:2::16"],
            Some("old-role"),
        ))
        .unwrap();
    f.cached("old", |_| true).await;
    assert_eq!(
        &*f.pods.find_by_ip(ip("2001:2::16")).await.unwrap().name,
        "old"
    );

    // The watch lags: the API has the old pod without its IPv6 address and
    // a new pod (primary IPv6) with it; the cache still has the old state.
    f.api.hold_watch_events(true);
    f.api
        .apply_pod(dual_stack("old", &["198.18.1.5"], Some("old-role")))
        .unwrap();
    f.api
        .apply_pod(dual_stack(
            "new",
            &["2001:2::16", "198.18.1.6"],
            Some("new-role"),
        ))
        .unwrap();
    tokio::time::sleep(kiam::server::pods::CONFIRM_TTL).await;
    let found = f.pods.find_by_ip(ip("2001:2::16")).await.unwrap();
    assert_eq!(
        (&*found.name, found.role.as_deref()),
        ("new", Some("new-role"))
    );
    // The old pod still has its IPv4 address.
    assert_eq!(
        &*f.pods.find_by_ip(ip("198.18.1.5")).await.unwrap().name,
        "old"
    );
}

/// The value of one series in an exposition (0 when absent).
fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

fn watch_checks(api: &FakeApiServer) -> usize {
    api.count_requests(|r| {
        r.verb == "list" && r.path == "/api/v1/pods" && r.param("limit") == Some("1")
    })
}

/// Waits until a check proved the watch current (the first request starts
/// one; it answers per pod meanwhile).
async fn proven_current(f: &Fixture, ip_of_a_cached_pod: &str) {
    f.pods.find_by_ip(ip(ip_of_a_cached_pod)).await.unwrap();
    let registry = &f.registry;
    eventually("a check proving the watch current", || {
        let text = kiam::telemetry::encode(registry);
        value(
            &text,
            r#"kiam_k8s_pod_watch_checks_total{result="current"}"#,
        ) >= 1.0
    })
    .await;
}

/// While the watch is proven current (one `limit=1` LIST whose
/// resourceVersion the watch has reached), every cached pod is confirmed at
/// once: no GET per pod however many pods ask, and every answer may be
/// reused by the agent until the proof ends.
#[tokio::test]
async fn a_current_watch_confirms_every_pod_with_one_list() {
    let f = fixture_with(100, 3).await;
    for n in 1..=40 {
        f.api
            .apply_pod(pod(
                &format!("p{n}"),
                &format!("10.1.8.{n}"),
                "Running",
                Some("reader"),
            ))
            .unwrap();
    }
    f.cached("p40", |_| true).await;
    proven_current(&f, "10.1.8.1").await;
    let gets = || {
        f.api
            .count_requests(|r| r.verb == "get" && r.path.contains("/pods/p"))
    };
    let (gets_before, checks_before) = (gets(), watch_checks(&f.api));
    for n in 1..=40 {
        let at = ip(&format!("10.1.8.{n}"));
        let found = f.pods.find_by_ip(at).await.unwrap();
        assert_eq!(&*found.name, format!("p{n}"));
        let until = f.pods.reuse_until(&found, at);
        assert!(
            until.is_some(),
            "p{n}: no reuse window under a current watch"
        );
        assert!(
            until.unwrap() <= std::time::Instant::now() + kiam::server::pods::CONFIRM_TTL,
            "p{n}: a window past CONFIRM_TTL"
        );
    }
    // 40 pods with a budget of 3 GETs a second: none spent.
    assert_eq!(gets() - gets_before, 0, "confirmation GETs");
    // Renewals only (at most one check in flight and one per 250 ms).
    assert!(watch_checks(&f.api) - checks_before <= 2);
    let text = kiam::telemetry::encode(&f.registry);
    assert!(
        text.contains(r#"kiam_k8s_pod_confirmations_total{result="current"} 40"#),
        "{text}"
    );
    assert!(!text.contains(r#"result="skipped""#), "{text}");
}

/// The proof lasts CONFIRM_TTL after its LIST and is renewed only when the
/// watch reaches the new LIST's resourceVersion: with its events held back
/// (a lagging watch) and a pod change waiting, it ends, the reused IP's old
/// pod is checked with a GET again, and the new pod on that IP is answered.
#[tokio::test]
async fn a_lagging_watch_ends_the_proof_and_a_reused_ip_is_checked_again() {
    let f = fixture().await;
    f.api
        .apply_pod(pod("old", "10.1.9.1", "Running", Some("reader")))
        .unwrap();
    f.api
        .apply_pod(pod("other", "10.1.9.2", "Running", Some("reader")))
        .unwrap();
    f.cached("old", |_| true).await;
    f.cached("other", |_| true).await;
    proven_current(&f, "10.1.9.2").await;

    f.api.hold_watch_events(true);
    f.api.delete_pod(NS, "old").unwrap();
    f.api
        .apply_pod(pod("new", "10.1.9.1", "Running", Some("writer")))
        .unwrap();
    // Past the last proof's window: whatever checks run now are behind.
    tokio::time::sleep(kiam::server::pods::CONFIRM_TTL + std::time::Duration::from_millis(100))
        .await;
    let found = f.pods.find_by_ip(ip("10.1.9.1")).await.unwrap();
    assert_eq!(&*found.name, "new", "the old pod's role for a reused IP");
    assert_eq!(found.role.as_deref(), Some("writer"));
    let gets = f
        .api
        .count_requests(|r| r.verb == "get" && r.path.ends_with("/pods/old"));
    assert_eq!(
        gets, 1,
        "the cached pod is confirmed by name once the proof ended"
    );
    let registry = &f.registry;
    eventually("a check that found the watch behind", || {
        let text = kiam::telemetry::encode(registry);
        value(&text, r#"kiam_k8s_pod_watch_checks_total{result="behind"}"#) >= 1.0
    })
    .await;
    f.api.hold_watch_events(false);
}

/// A pod the watch has not delivered, asked about by an agent that names
/// its node: looked up among that node's pods (`spec.nodeName`, indexed by
/// the API server) and not in the whole cluster; a wrong or stale node name
/// costs one more LIST, never a wrong answer; no live pod anywhere is
/// `no pod found` as before.
#[tokio::test]
async fn a_miss_is_looked_up_on_the_agents_node_first() {
    let f = fixture().await;
    f.api.hold_watch_events(true);
    let mut on_node = pod("early", "10.1.0.31", "Running", Some("reader"));
    on_node["spec"]["nodeName"] = json!("node-a");
    f.api.apply_pod(on_node).unwrap();
    let scoped = |api: &FakeApiServer, node: &str, ip: &str| {
        api.count_requests(|r| {
            r.verb == "list"
                && r.param("fieldSelector")
                    == Some(&format!("spec.nodeName={node},status.podIP={ip}"))
        })
    };

    let found = f
        .pods
        .find_by_ip_on(ip("10.1.0.31"), Some("node-a"))
        .await
        .unwrap();
    assert_eq!(&*found.name, "early");
    assert_eq!(scoped(&f.api, "node-a", "10.1.0.31"), 1);
    assert_eq!(ip_lookups(&f.api, "10.1.0.31"), 0, "no cluster-wide LIST");

    // The agent named another node: that node has no such pod, so the
    // whole cluster is asked, and the pod is found there.
    let mut elsewhere = pod("moved", "10.1.0.32", "Running", Some("writer"));
    elsewhere["spec"]["nodeName"] = json!("node-a");
    f.api.apply_pod(elsewhere).unwrap();
    let found = f
        .pods
        .find_by_ip_on(ip("10.1.0.32"), Some("node-b"))
        .await
        .unwrap();
    assert_eq!(
        (&*found.name, found.role.as_deref()),
        ("moved", Some("writer"))
    );
    assert_eq!(scoped(&f.api, "node-b", "10.1.0.32"), 1);
    assert_eq!(ip_lookups(&f.api, "10.1.0.32"), 1);

    // No pod on that IP anywhere.
    let err = f
        .pods
        .find_by_ip_on(ip("10.1.0.33"), Some("node-a"))
        .await
        .unwrap_err();
    assert!(matches!(err, FindError::NotFound), "{err}");
    assert_eq!(ip_lookups(&f.api, "10.1.0.33"), 1);
    let text = kiam::telemetry::encode(&f.registry);
    assert!(
        text.contains(r#"kiam_k8s_pod_lookups_on_node_total{result="found"} 1"#),
        "{text}"
    );
    assert!(
        text.contains(r#"kiam_k8s_pod_lookups_on_node_total{result="not_found"} 2"#),
        "{text}"
    );
    f.api.hold_watch_events(false);
}
