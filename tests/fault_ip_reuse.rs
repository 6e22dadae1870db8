//! Fault scenario: a pod's IP is reused by a new pod with another role right
//! after the first pod is deleted (or completes). Pass condition: from the
//! moment the new pod exists in the API, nothing asking from that IP gets
//! the old role's credentials or the old role's name — not from the
//! server's caches, not from the agent's fallback, and not while the
//! server's watch lags behind the API.

#[path = "support/cluster.rs"]
mod cluster;
#[path = "support/fault_stack.rs"]
mod fault_stack;
#[path = "support/grpc.rs"]
mod grpc;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cluster::{pod_json, Cluster};
use fault_stack::{ms, report, until, Agent};
use kiam::proto::kiam_service_client::KiamServiceClient;
use kiam::server::pods::CONFIRM_TTL;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

const NS: &str = "team-a";

/// The least time between the old pod's last request and the new pod's
/// first on the same IP: the kubelet must notice the old pod stopped, the
/// CNI free its address and set it up for the new pod, and the new pod's
/// container start. The server trusts a pod it confirmed with the API for
/// [`CONFIRM_TTL`], which is shorter; waiting it out here is what makes this
/// the real race rather than one no node can produce.
const HANDOVER: Duration = Duration::from_millis(CONFIRM_TTL.as_millis() as u64 + 100);

/// GetPodRole, a failure as one line.
async fn role(client: &KiamServiceClient<Channel>, ip: &str) -> Result<String, String> {
    grpc::role(client, ip).await.map_err(as_line)
}

/// The access key id a pod gets, a failure as one line.
async fn creds(
    client: &KiamServiceClient<Channel>,
    ip: &str,
    role: &str,
) -> Result<String, String> {
    grpc::credentials(client, ip, role)
        .await
        .map(|c| c.access_key_id)
        .map_err(as_line)
}

fn as_line((code, message): grpc::Failure) -> String {
    format!("{code:?}: {message}")
}

/// Asks as the pod at `ip` would, `rounds` times: its role, the old role's
/// credentials, the new role's. Returns (requests, old-role answers, new-role
/// credentials seen).
async fn probe(
    client: &KiamServiceClient<Channel>,
    ip: &str,
    rounds: usize,
) -> (usize, Vec<String>, Vec<String>) {
    let mut leaks = Vec::new();
    let mut fresh = Vec::new();
    for _ in 0..rounds {
        match role(client, ip).await {
            Ok(r) if r == "old-role" => leaks.push("GetPodRole answered old-role".into()),
            _ => {}
        }
        if let Ok(key) = creds(client, ip, "old-role").await {
            leaks.push(format!("old-role credentials {key}"));
        }
        if let Ok(key) = creds(client, ip, "new-role").await {
            fresh.push(key);
        }
    }
    (rounds * 3, leaks, fresh)
}

#[tokio::test]
async fn a_reused_ip_never_gets_the_old_pods_role_from_the_server() {
    let c = Cluster::start(&[]).await;
    c.namespace(NS, Some(".*"));
    let ip = "198.18.7.10";
    c.pod(NS, "old", ip, Some("old-role"));
    let client = c.ready().await;
    let old_key = creds(&client, ip, "old-role").await.unwrap();

    // Deleted, and its IP goes to a pod with another role.
    tokio::time::sleep(HANDOVER).await;
    c.api.delete_pod(NS, "old").unwrap();
    c.pod(NS, "new", ip, Some("new-role"));
    let start = Instant::now();
    let (sent, leaks, fresh) = probe(&client, ip, 50).await;
    assert!(
        leaks.is_empty(),
        "the new pod got the old pod's role: {leaks:?}"
    );
    assert!(!fresh.is_empty(), "the new pod was never served");
    assert!(fresh.iter().all(|k| *k != old_key));
    report(
        "ip-reuse/server/deleted",
        &[
            ("requests", sent.to_string()),
            ("old_role_answers", leaks.len().to_string()),
            ("new_role_served", fresh.len().to_string()),
            ("elapsed", ms(start.elapsed())),
        ],
    );
}

/// The race the Pod cache documents: the watch has not delivered the old
/// pod's end, while the API already shows the new pod on its IP.
#[tokio::test]
async fn a_lagging_watch_never_answers_with_the_old_pod() {
    for ending in ["deleted", "Succeeded", "Failed"] {
        let c = Cluster::start(&[]).await;
        c.namespace(NS, Some(".*"));
        let ip = "198.18.7.20";
        c.pod(NS, "old", ip, Some("old-role"));
        let client = c.ready().await;
        let old_key = creds(&client, ip, "old-role").await.unwrap();
        assert_eq!(role(&client, ip).await.unwrap(), "old-role");

        tokio::time::sleep(HANDOVER).await;
        c.api.hold_watch_events(true);
        match ending {
            "deleted" => {
                c.api.delete_pod(NS, "old").unwrap();
            }
            phase => {
                c.api
                    .apply_pod(pod_json(NS, "old", ip, Some("old-role"), phase))
                    .unwrap();
            }
        }
        c.pod(NS, "new", ip, Some("new-role"));
        let start = Instant::now();
        let (sent, leaks, fresh) = probe(&client, ip, 20).await;
        assert!(
            leaks.is_empty(),
            "old pod {ending}, watch lagging: the new pod got {leaks:?}"
        );
        assert!(
            !fresh.is_empty(),
            "old pod {ending}: the new pod was not served while the watch lagged"
        );
        assert!(fresh.iter().all(|k| *k != old_key));
        assert_eq!(role(&client, ip).await.unwrap(), "new-role");
        report(
            &format!("ip-reuse/server/lagging-watch/{ending}"),
            &[
                ("requests", sent.to_string()),
                ("old_role_answers", leaks.len().to_string()),
                ("new_role_served", fresh.len().to_string()),
                ("elapsed", ms(start.elapsed())),
            ],
        );

        // When the watch catches up nothing changes for the new pod.
        c.api.hold_watch_events(false);
        let (sent, leaks, fresh) = probe(&client, ip, 5).await;
        assert!(
            leaks.is_empty() && fresh.len() == 5,
            "{sent}: {leaks:?} {fresh:?}"
        );
    }
}

/// Through a real agent whose fallback holds the old pod's credentials
/// (keyed by IP and role): the new pod lists its own role and never gets
/// the old role's credentials, even while the server cannot yet tell the two
/// pods apart (the old one still terminating in the API).
#[tokio::test]
async fn through_the_agent_the_fallback_never_serves_the_old_pods_credentials() {
    let c = Cluster::start(&[]).await;
    c.namespace(NS, Some(".*"));
    let ip = "127.0.7.30";
    c.pod(NS, "old", ip, Some("old-role"));
    c.ready().await;
    // The default five-minute stale window: the fallback is on.
    let agent = Agent::start(&c, &[c.addr], |cfg| {
        cfg.deadline = Duration::from_millis(300)
    })
    .await;
    let (role, old_key) = agent.sdk_fetch(ip).await.unwrap();
    assert_eq!(role, "old-role");
    assert!(kiam::telemetry::encode(&agent.registry.lock().unwrap())
        .contains("kiam_agent_fallback_pods 1"));

    let old_creds = "/latest/meta-data/iam/security-credentials/old-role";
    let listing = "/latest/meta-data/iam/security-credentials/";
    let mut sent = 0;
    let mut leaks = Vec::new();
    let mut check = |reply: fault_stack::Reply, what: &str| {
        sent += 1;
        if reply.body.contains(&old_key) || (reply.status == 200 && reply.body == "old-role") {
            leaks.push(format!("{what}: {} {}", reply.status, reply.body));
        }
    };

    // The old pod is terminating (its grace period runs for an hour) when its
    // IP is handed to a new pod: the API lists two live pods on one IP.
    tokio::time::sleep(HANDOVER).await;
    c.api
        .mark_pod_terminating(NS, "old", Duration::from_secs(3600))
        .unwrap();
    c.pod(NS, "new", ip, Some("new-role"));
    let start = Instant::now();
    for _ in 0..10 {
        check(agent.get(ip, listing).await, "listing (two pods on the IP)");
        check(
            agent.get(ip, old_creds).await,
            "old-role credentials (two pods on the IP)",
        );
    }

    // The old pod is gone: the new pod is served its own role.
    c.api.delete_pod(NS, "old").unwrap();
    let ((role, new_key), recovered) = until(
        "the new pod to be served",
        Duration::from_secs(10),
        || async { agent.sdk_fetch(ip).await.ok() },
    )
    .await;
    assert_eq!(role, "new-role");
    assert_ne!(new_key, old_key);
    for _ in 0..10 {
        check(agent.get(ip, listing).await, "listing");
        check(agent.get(ip, old_creds).await, "old-role credentials");
    }
    assert!(
        leaks.is_empty(),
        "the new pod got the old pod's role: {leaks:?}"
    );
    report(
        "ip-reuse/agent",
        &[
            ("requests", sent.to_string()),
            ("old_role_answers", leaks.len().to_string()),
            ("time_to_new_role", ms(recovered)),
            ("elapsed", ms(start.elapsed())),
        ],
    );
}

/// A TCP relay in front of the API server that holds every chunk the API
/// server sends for `delay` milliseconds (0: none): a slow API server.
async fn slow_relay(to: SocketAddr, delay: Arc<AtomicU64>) -> SocketAddr {
    let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = front.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((client, _)) = front.accept().await else {
                continue;
            };
            let delay = delay.clone();
            tokio::spawn(async move {
                let Ok(server) = TcpStream::connect(to).await else {
                    return;
                };
                let (mut from_client, mut to_client) = client.into_split();
                let (mut from_server, mut to_server) = server.into_split();
                let up = tokio::io::copy(&mut from_client, &mut to_server);
                let down = async {
                    let mut buf = vec![0u8; 16 * 1024];
                    loop {
                        let n = from_server.read(&mut buf).await?;
                        if n == 0 {
                            break;
                        }
                        let d = delay.load(Ordering::SeqCst);
                        if d > 0 {
                            tokio::time::sleep(Duration::from_millis(d)).await;
                        }
                        to_client.write_all(&buf[..n]).await?;
                    }
                    to_client.shutdown().await
                };
                let _ = tokio::join!(up, down);
            });
        }
    });
    addr
}

/// A second kiam server for `c`'s cluster (same PKI and STS) whose API
/// server connection goes through `api`.
async fn server_via(c: &Cluster, api: SocketAddr, stop: &CancellationToken) -> SocketAddr {
    kiam::ensure_crypto_provider();
    let config = kube::Config::new(format!("http://{api}").parse().unwrap());
    let kube = kube::Client::try_from(config).unwrap();
    let mut registry = prometheus_client::registry::Registry::default();
    let deps = kiam::server::Deps {
        config: cluster::server_config(&[]),
        events: kiam::server::events::EventRecorder::new(kube.clone()),
        kube,
        sts: c.sts.clone(),
        tls: kiam::tls::ServerTls::load(c.pki.server_files(), &mut registry).unwrap(),
        metrics: kiam::server::ServerMetrics::register(&mut registry),
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(kiam::server::run(listener, deps, stop.clone()));
    addr
}

/// Issue 12, defect 1, end to end: pod A (old-role) fetched credentials
/// through the agent, so its fallback holds them; A is deleted and B takes
/// its IP while the server's watch lags and the API server takes seconds to
/// answer the server's lookup. The server is up and has every request, so
/// the agent must not treat its slowness as an outage: B never gets A's role
/// or credentials (504 instead), and is served its own role once the API
/// answers again.
#[tokio::test]
async fn a_slow_api_server_never_lets_the_agent_serve_the_old_pods_credentials() {
    let c = Cluster::start(&[]).await;
    c.namespace(NS, Some(".*"));
    let ip = "127.0.7.40";
    c.pod(NS, "old", ip, Some("old-role"));
    let delay = Arc::new(AtomicU64::new(0));
    let relay = slow_relay(c.api.addr(), delay.clone()).await;
    let stop = CancellationToken::new();
    let server = server_via(&c, relay, &stop).await;
    // The default five-minute stale window: the fallback is on.
    let agent = Agent::start(&c, &[server], |_| {}).await;
    let ((role, old_key), _) = until("the agent to serve", Duration::from_secs(20), || async {
        agent.sdk_fetch(ip).await.ok()
    })
    .await;
    assert_eq!(role, "old-role");
    assert!(kiam::telemetry::encode(&agent.registry.lock().unwrap())
        .contains("kiam_agent_fallback_pods 1"));

    // A is deleted and the server's watch delivers it; then the watch lags,
    // B is created on the same IP, and the API server turns slow.
    tokio::time::sleep(HANDOVER).await;
    c.api.delete_pod(NS, "old").unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    c.api.hold_watch_events(true);
    c.pod(NS, "new", ip, Some("new-role"));
    delay.store(3000, Ordering::SeqCst);

    let listing = "/latest/meta-data/iam/security-credentials/";
    let old_creds = "/latest/meta-data/iam/security-credentials/old-role";
    let start = Instant::now();
    let mut sent = 0;
    let mut leaks = Vec::new();
    let mut slowest = Duration::ZERO;
    for _ in 0..5 {
        for path in [listing, old_creds] {
            let t = Instant::now();
            let r = agent.get(ip, path).await;
            slowest = slowest.max(t.elapsed());
            sent += 1;
            if r.body.contains(&old_key) || (r.status == 200 && r.body == "old-role") {
                leaks.push(format!("{path}: {} {}", r.status, r.body));
            }
        }
    }
    assert!(
        leaks.is_empty(),
        "the agent served the old pod's answers to the new pod: {leaks:?}"
    );
    // The agent's budget is 900 ms; the margin is for a loaded CI machine.
    assert!(
        slowest < Duration::from_millis(1500),
        "slowest answer {slowest:?}"
    );

    // The API server recovers and the watch catches up: B gets its own role.
    delay.store(0, Ordering::SeqCst);
    c.api.hold_watch_events(false);
    let ((role, new_key), recovered) = until(
        "the new pod to be served",
        Duration::from_secs(20),
        || async { agent.sdk_fetch(ip).await.ok() },
    )
    .await;
    assert_eq!(role, "new-role");
    assert_ne!(new_key, old_key);
    report(
        "ip-reuse/agent/slow-api-lagging-watch",
        &[
            ("requests", sent.to_string()),
            ("old_role_answers", leaks.len().to_string()),
            ("slowest_answer", ms(slowest)),
            ("new_role_after_recovery", ms(recovered)),
            ("elapsed", ms(start.elapsed())),
        ],
    );
    stop.cancel();
}
