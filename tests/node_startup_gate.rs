//! The node start-up gate (`--node-startup-taint`) against the in-memory API
//! server: the agent takes only its own taint off its node, only after its
//! iptables rule is in place and a server is healthy, without dropping a
//! taint another controller adds meanwhile, retrying while the API server is
//! unreachable, and doing nothing when the taint is already gone. The last
//! tests run the real `kiam agent` and `kiam server` processes.

#[path = "support/fake_kiam.rs"]
mod fake_kiam;
#[path = "support/procs.rs"]
mod procs;

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
    assert_eq!(metrics.gate_closed.get(), 1, "the gate reads closed");

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
    assert_eq!(metrics.gate_closed.get(), 0, "the gate reads open");
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

/// A `kiam agent` with the gate on and no `--iptables`, its node from
/// `NODE_NAME` and its API server from `KUBECONFIG`, as in a Pod.
fn gated_agent(cluster: &procs::ProcCluster, server_port: u16) -> std::process::Command {
    let mut cmd = procs::kiam_bin();
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("NODE_NAME", NODE)
        .env("KUBECONFIG", &cluster.kubeconfig)
        .args(["agent", "--host", "127.0.0.1", "--node-startup-taint", KEY])
        .args(["--port", &procs::free_port().to_string()])
        .args(["--server-address", &format!("127.0.0.1:{server_port}")])
        .args(["--metadata-endpoint", "http://127.0.0.1:1"]);
    cluster.tls_args(&mut cmd, "agent");
    cmd.stdout(std::process::Stdio::null())
        .stderr(procs::child_stderr());
    cmd
}

#[tokio::test]
async fn the_agent_process_removes_its_taint_only_once_a_server_is_healthy() {
    kiam::ensure_crypto_provider();
    let cluster = procs::ProcCluster::start().await;
    cluster
        .api
        .apply_node(json!({
            "metadata": {"name": NODE},
            "spec": {"taints": [
                {"key": KEY, "effect": "NoSchedule"},
                {"key": "example.com/gpu", "value": "true", "effect": "NoSchedule"},
            ]}
        }))
        .unwrap();
    let server_port = procs::free_port();
    let _agent = procs::ChildGuard {
        child: gated_agent(&cluster, server_port).spawn().unwrap(),
        name: "kiam agent".into(),
    };

    // No server yet: the agent reads nothing and writes nothing.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(taint_keys(&cluster.api), [KEY, "example.com/gpu"]);
    assert_eq!(patches(&cluster.api), 0, "no write before a healthy server");

    let _server = cluster.spawn_server(
        "http://127.0.0.1:1",
        &[
            "--bind",
            &format!("127.0.0.1:{server_port}"),
            "--role-base-arn",
            "arn:aws:iam::123456789012:role/",
        ],
    );
    let took = eventually("the taint to go", Duration::from_secs(20), || {
        taint_keys(&cluster.api) == ["example.com/gpu"]
    })
    .await;
    assert_eq!(patches(&cluster.api), 1);
    println!(
        "RELIABILITY node-startup-gate/process: taint_removed_after_server_start={}ms",
        took.as_millis()
    );
}

#[test]
fn the_gate_without_a_node_name_is_a_usage_error() {
    let out = procs::kiam_bin()
        .env_clear()
        .args(["agent", "--host", "127.0.0.1", "--cert", "a", "--key", "b"])
        .args(["--ca", "c", "--node-startup-taint", KEY, "--check-config"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("--node-name"), "{stderr}");
}
