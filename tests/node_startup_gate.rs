//! The node start-up gate (`--node-startup-taint`) against the in-memory API
//! server: the agent takes only its own taint off its node, only after its
//! iptables rule is in place and a server is healthy, without dropping a
//! taint another controller adds meanwhile, retrying while the API server is
//! unreachable, and doing nothing when the taint is already gone.

#[path = "support/fake_kiam.rs"]
mod fake_kiam;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fake_kiam::FakeKiam;
use kiam::agent::client::ClientError;
use kiam::agent::taint::{self, Removal, StartupTaint, TaintMetrics};
use kiam_sandbox::apiserver::FakeApiServer;
use serde_json::{json, Value};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

const KEY: &str = "kiam.example.com/agent-not-ready";
const NODE: &str = "node-1";

/// A node as the kubelet registers it with `--register-with-taints`, plus
/// another controller's taint.
async fn cluster() -> (FakeApiServer, kube::Client) {
    kiam::ensure_crypto_provider();
    let api = FakeApiServer::start().await.unwrap();
    api.apply_node(json!({
        "metadata": {"name": NODE, "labels": {"kubernetes.io/hostname": NODE}},
        "spec": {"taints": [
            {"key": "example.com/gpu", "value": "true", "effect": "NoSchedule"},
            {"key": KEY, "effect": "NoSchedule"},
        ]},
        "status": {"conditions": [{"type": "Ready", "status": "True"}]}
    }))
    .unwrap();
    let config = kube::Config::new(api.url().parse().unwrap());
    let client = kube::Client::try_from(config).unwrap();
    (api, client)
}

fn startup_taint() -> StartupTaint {
    StartupTaint::new(KEY, NODE).unwrap().unwrap()
}

fn taint_keys(api: &FakeApiServer) -> Vec<String> {
    let node = api.node(NODE).unwrap();
    node.pointer("/spec/taints")
        .and_then(Value::as_array)
        .map(|t| {
            t.iter()
                .map(|t| t["key"].as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default()
}

fn patches(api: &FakeApiServer) -> usize {
    api.count_requests(|r| r.verb == "patch")
}

async fn eventually(what: &str, bound: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < bound, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    start.elapsed()
}

fn unreachable() -> Option<ClientError> {
    Some(ClientError::Unavailable("connection refused".into()))
}

#[tokio::test]
async fn removes_only_its_taint_once_the_rule_is_in_place_and_a_server_is_healthy() {
    let (api, client) = cluster().await;
    let servers = Arc::new(FakeKiam::new());
    servers.fail_always(unreachable());
    let metrics = TaintMetrics::default();
    let (rule_in_place, told) = oneshot::channel();
    let shutdown = CancellationToken::new();
    let gate = tokio::spawn(taint::run(
        startup_taint(),
        client,
        Some(told),
        servers.clone(),
        metrics.clone(),
        shutdown.clone(),
    ));

    // No rule yet: the gate does not even ask the servers.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(servers.health_calls.load(Ordering::SeqCst), 0);
    assert_eq!(taint_keys(&api), ["example.com/gpu", KEY]);

    // The rule is in place, but no server answers: the taint stays.
    rule_in_place.send(()).unwrap();
    eventually("health polls", Duration::from_secs(5), || {
        servers.health_calls.load(Ordering::SeqCst) >= 2
    })
    .await;
    // A server that answers but is not healthy does not open the gate either.
    servers.fail_always(None);
    servers.set_health("sts: unavailable");
    let polled = servers.health_calls.load(Ordering::SeqCst);
    eventually("another health poll", Duration::from_secs(5), || {
        servers.health_calls.load(Ordering::SeqCst) > polled
    })
    .await;
    assert_eq!(taint_keys(&api), ["example.com/gpu", KEY]);
    assert_eq!(patches(&api), 0, "no write before a healthy server");
    assert_eq!(metrics.removed.get(), 0);

    servers.set_health("ok");
    let took = eventually("the taint to go", Duration::from_secs(5), || {
        taint_keys(&api) == ["example.com/gpu"]
    })
    .await;
    tokio::time::timeout(Duration::from_secs(5), gate)
        .await
        .expect("the gate ends once the taint is gone")
        .unwrap();
    assert_eq!(metrics.removed.get(), 1);
    assert_eq!(metrics.api_errors.get(), 0);
    assert_eq!(patches(&api), 1, "one guarded patch");
    let node = api.node(NODE).unwrap();
    assert_eq!(
        node["spec"]["taints"],
        json!([{"key": "example.com/gpu", "value": "true", "effect": "NoSchedule"}]),
        "the other taint is untouched"
    );
    println!(
        "RELIABILITY node-startup-gate: taint_removed_after_healthy={}ms patches=1",
        took.as_millis()
    );
}

#[tokio::test]
async fn a_taint_added_between_read_and_patch_is_kept() {
    let (api, client) = cluster().await;
    let read = api.node(NODE).unwrap();
    // Another controller adds its taint after the agent read the node.
    api.patch_node(
        NODE,
        json!({"spec": {"taints": [
            {"key": "example.com/gpu", "value": "true", "effect": "NoSchedule"},
            {"key": KEY, "effect": "NoSchedule"},
            {"key": "node.kubernetes.io/disk-pressure", "effect": "NoSchedule"},
        ]}}),
    )
    .unwrap();
    let stale = taint::remove_as_read(&client, &startup_taint(), &read)
        .await
        .unwrap();
    assert_eq!(
        stale, None,
        "the guard refuses a patch made from a stale read"
    );
    assert_eq!(
        taint_keys(&api),
        ["example.com/gpu", KEY, "node.kubernetes.io/disk-pressure"]
    );

    let fresh = taint::remove(&client, &startup_taint()).await.unwrap();
    assert_eq!(fresh, Some(Removal::Removed));
    assert_eq!(
        taint_keys(&api),
        ["example.com/gpu", "node.kubernetes.io/disk-pressure"]
    );
}

#[tokio::test]
async fn every_effect_of_the_key_goes_and_an_absent_taint_is_left_alone() {
    let (api, client) = cluster().await;
    api.patch_node(
        NODE,
        json!({"spec": {"taints": [
            {"key": KEY, "effect": "NoSchedule"},
            {"key": KEY, "effect": "NoExecute", "timeAdded": "2026-01-01T00:00:00Z"},
        ]}}),
    )
    .unwrap();
    assert_eq!(
        taint::remove(&client, &startup_taint()).await.unwrap(),
        Some(Removal::Removed)
    );
    assert!(taint_keys(&api).is_empty());
    api.clear_requests();

    // Again (an agent restart): nothing to do, nothing written.
    let metrics = TaintMetrics::default();
    let gate = taint::run(
        startup_taint(),
        client,
        None,
        Arc::new(FakeKiam::new()),
        metrics.clone(),
        CancellationToken::new(),
    );
    tokio::time::timeout(Duration::from_secs(5), gate)
        .await
        .expect("the gate ends at once");
    assert_eq!(patches(&api), 0);
    assert_eq!(metrics.removed.get(), 0);
}

#[tokio::test]
async fn api_failures_are_retried_and_a_rule_never_in_place_keeps_the_taint() {
    let (api, client) = cluster().await;
    api.set_unavailable(true);
    let metrics = TaintMetrics::default();
    let gate = tokio::spawn(taint::run(
        startup_taint(),
        client.clone(),
        None,
        Arc::new(FakeKiam::new()),
        metrics.clone(),
        CancellationToken::new(),
    ));
    eventually("a retried API failure", Duration::from_secs(10), || {
        metrics.api_errors.get() >= 2
    })
    .await;
    assert_eq!(taint_keys(&api), ["example.com/gpu", KEY]);
    api.set_unavailable(false);
    eventually("the taint to go", Duration::from_secs(10), || {
        taint_keys(&api) == ["example.com/gpu"]
    })
    .await;
    tokio::time::timeout(Duration::from_secs(5), gate)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(metrics.removed.get(), 1);

    // The rule task ended without the rule in place: the taint stays.
    api.patch_node(
        NODE,
        json!({"spec": {"taints": [{"key": KEY, "effect": "NoSchedule"}]}}),
    )
    .unwrap();
    let (rule_in_place, told) = oneshot::channel::<()>();
    drop(rule_in_place);
    let gate = taint::run(
        startup_taint(),
        client,
        Some(told),
        Arc::new(FakeKiam::new()),
        TaintMetrics::default(),
        CancellationToken::new(),
    );
    tokio::time::timeout(Duration::from_secs(5), gate)
        .await
        .expect("the gate gives up at once");
    assert_eq!(taint_keys(&api), [KEY]);
}
