//! Fault scenarios with real `kiam` processes (moto for STS, the in-memory
//! API server): every server killed, then one restarted; and a server that
//! runs but cannot reach the API server. Pass conditions: while no server
//! answers, every request gets a clear error within the SDK's ~1 s (the
//! stale window is off here; tests/agent_process.rs covers serving inside
//! it); as soon as a server is back and synced the agent serves again, and
//! from then on no request fails; a server that is up but not ready is
//! never the one answering.
//!
//! Requests come from the pod's own address (127.0.x.y), as in production.

#[path = "support/cluster.rs"]
mod cluster;
#[path = "support/fault_stack.rs"]
mod fault_stack;
#[path = "support/procs.rs"]
mod procs;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use fault_stack::{http, ms, report, until, Reply};
use procs::{free_port, kiam_bin, start_moto, wait_for_port, ChildGuard, ProcCluster};

const POD: &str = "127.0.11.10";
const LISTING: &str = "/latest/meta-data/iam/security-credentials/";

async fn get(agent: SocketAddr, path: &str) -> Reply {
    let req = format!("GET {path} HTTP/1.1\r\nHost: 169.254.169.254\r\nConnection: close\r\n\r\n");
    http(agent, POD.parse().unwrap(), req.as_bytes()).await
}

/// An SDK's credential fetch: listing, then the role's credentials.
async fn sdk_fetch(agent: SocketAddr) -> Result<String, String> {
    let list = get(agent, LISTING).await;
    if list.status != 200 {
        return Err(format!(
            "listing: {} {} {:?}",
            list.status, list.body, list.error
        ));
    }
    let creds = get(agent, &format!("{LISTING}{}", list.body)).await;
    if creds.status != 200 {
        return Err(format!(
            "credentials: {} {} {:?}",
            creds.status, creds.body, creds.error
        ));
    }
    creds
        .access_key_id()
        .ok_or_else(|| format!("no key in {}", creds.body))
}

/// `kiam server` on 127.0.0.1:`port`, watching the API server `kubeconfig`
/// names (the cluster's own when `None`).
fn server(
    c: &ProcCluster,
    sts_url: &str,
    port: u16,
    kubeconfig: Option<&std::path::Path>,
) -> ChildGuard {
    let mut cmd = kiam_bin();
    kiam_sandbox::procs::server_args(&mut cmd, kubeconfig.unwrap_or(&c.kubeconfig), &c.pki.dir)
        .args(["--role-base-arn", cluster::BASE_ARN])
        .args(["--bind", &format!("127.0.0.1:{port}")]);
    procs::moto_env(&mut cmd, sts_url);
    ChildGuard::spawn(format!("kiam server :{port}"), cmd).unwrap()
}

fn agent(c: &ProcCluster, servers: &[u16]) -> (ChildGuard, SocketAddr) {
    let port = free_port();
    let addresses: Vec<String> = servers.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let cmd = c.agent_cmd(
        port,
        &addresses.join(","),
        &format!("http://127.0.0.1:{}", free_port()),
        &["--stale-credentials-window", "0s"],
    );
    let guard = ChildGuard::spawn("kiam agent", cmd).unwrap();
    assert!(wait_for_port(port, Duration::from_secs(20)));
    (guard, SocketAddr::from(([127, 0, 0, 1], port)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_servers_down_then_one_back_recovers_at_once() {
    let Some(moto) = start_moto() else {
        return;
    };
    let c = ProcCluster::start().await;
    c.namespace("team-a", ".*");
    c.pod("team-a", "web", POD, "web-role");
    let (p1, p2) = (free_port(), free_port());
    let mut s1 = server(&c, &moto.url, p1, None);
    let mut s2 = server(&c, &moto.url, p2, None);
    let (_agent, addr) = agent(&c, &[p1, p2]);
    until("the agent to serve", Duration::from_secs(30), || async {
        sdk_fetch(addr).await.ok()
    })
    .await;

    // Every server killed.
    for s in [&mut s1, &mut s2] {
        s.child.kill().unwrap();
        let _ = s.child.wait();
    }
    // Answers the servers said may be reused (the warm path, at most
    // MAX_REUSE after they were asked) are not the outage fallback, which
    // is off here: wait them out.
    tokio::time::sleep(kiam::agent::client::MAX_REUSE).await;
    let down = Instant::now();
    let mut outage_requests = 0;
    let mut slowest = Duration::ZERO;
    while down.elapsed() < Duration::from_secs(2) {
        let t = Instant::now();
        let r = get(addr, LISTING).await;
        slowest = slowest.max(t.elapsed());
        outage_requests += 1;
        assert!(
            r.status >= 500 && r.body.contains("no kiam server answered"),
            "a clear error while every server is down: {r:?}"
        );
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "answered after the SDK gave up: {r:?}"
        );
    }

    // One server comes back on its old address, with cold caches.
    let restarted = Instant::now();
    let _s2 = server(&c, &moto.url, p2, None);
    assert!(wait_for_port(p2, Duration::from_secs(20)));
    let listening = restarted.elapsed();
    until(
        "service once a server is back",
        Duration::from_secs(30),
        || async { sdk_fetch(addr).await.ok() },
    )
    .await;
    let recovered = restarted.elapsed();

    // From then on nothing fails, although the other server is still dead.
    let mut failures = Vec::new();
    for _ in 0..50 {
        if let Err(e) = sdk_fetch(addr).await {
            failures.push(e);
        }
    }
    assert!(failures.is_empty(), "{failures:?}");
    report(
        "servers/all-down-then-one-back",
        &[
            ("outage_requests", outage_requests.to_string()),
            ("outage_failed", outage_requests.to_string()),
            ("slowest_error", ms(slowest)),
            ("server_listening_after", ms(listening)),
            ("served_after_restart", ms(recovered)),
            ("requests_after_recovery", "100".into()),
            ("failed_after_recovery", failures.len().to_string()),
        ],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_cannot_reach_the_api_is_never_the_one_answering() {
    let Some(moto) = start_moto() else {
        return;
    };
    let c = ProcCluster::start().await;
    c.namespace("team-a", ".*");
    c.pod("team-a", "web", POD, "web-role");
    // A kubeconfig for an API server that refuses every connection.
    let dir = tempfile::tempdir().unwrap();
    let nowhere = dir.path().join("nowhere.kubeconfig");
    let unreachable = kiam_sandbox::apiserver::FakeApiServer::start()
        .await
        .unwrap();
    unreachable.write_kubeconfig(&nowhere).unwrap();
    unreachable.set_unavailable(true);

    let (p_bad, p_good) = (free_port(), free_port());
    let _bad = server(&c, &moto.url, p_bad, Some(&nowhere));
    let _good = server(&c, &moto.url, p_good, None);
    assert!(wait_for_port(p_bad, Duration::from_secs(20)));
    let (_agent, addr) = agent(&c, &[p_bad, p_good]);
    until("the agent to serve", Duration::from_secs(30), || async {
        sdk_fetch(addr).await.ok()
    })
    .await;

    let start = Instant::now();
    let mut failures = Vec::new();
    for _ in 0..100 {
        if let Err(e) = sdk_fetch(addr).await {
            failures.push(e);
        }
    }
    assert!(failures.is_empty(), "{failures:?}");
    report(
        "servers/one-not-synced",
        &[
            ("requests", "200".into()),
            ("failed", failures.len().to_string()),
            ("elapsed", ms(start.elapsed())),
        ],
    );
}
