//! Prefetch shared by pod IP (`--prefetch-peers`, `--advertise-ip`): three
//! in-process servers over one in-memory API server and one STS double.
//! With per-pod identities (`--session-tags`), sharing fetches each pod's
//! credentials once in all, not once per server; without the flags, or when
//! a server does not find itself among its peers, every server prefetches
//! every pod as before. Requests are answered by any server: a non-owner
//! fetches cold and does not keep refreshing what it fetched for a pod it
//! does not own.
//!
//! Nothing is timed: each test waits for STS calls it expects (a sentinel
//! pod per server, created last, marks that the server has processed the
//! pods before it) and then counts them.

#[path = "support/cluster.rs"]
mod cluster;
#[path = "support/grpc.rs"]
mod grpc;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use cluster::{eventually, kube_client, pod_json, server_config, FakeSts, BASE_ARN};
use kiam::proto::kiam_service_client::KiamServiceClient;
use kiam::server::events::EventRecorder;
use kiam::server::model::{Identity, SessionTags};
use kiam::server::{Deps, ServerMetrics};
use kiam::tls::{ChannelOpts, ClientTls, ServerTls};
use kiam_sandbox::apiserver::FakeApiServer;
use prometheus_client::registry::Registry;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

const NS: &str = "shard";
const ROLE: &str = "app";
/// Pods per test.
const N: usize = 30;

struct Server {
    addr: SocketAddr,
    registry: Registry,
}

struct Servers {
    api: FakeApiServer,
    sts: Arc<FakeSts>,
    pki: kiam::certs::Pki,
    servers: Vec<Server>,
    shutdown: CancellationToken,
    _dir: tempfile::TempDir,
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// `n` servers sharing one API server and one STS. `peers` builds each
/// server's extra flags from every server's address.
async fn start(n: usize, peers: impl Fn(&[SocketAddr]) -> Vec<String>) -> Servers {
    let dir = tempfile::tempdir().unwrap();
    let pki = kiam::certs::generate(dir.path(), &[], 1).unwrap();
    let api = FakeApiServer::start().await.unwrap();
    api.create_namespace(json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": NS, "annotations": {"iam.amazonaws.com/permitted": ".*"}}}))
        .unwrap();
    let sts = Arc::new(FakeSts::new());
    let shutdown = CancellationToken::new();
    let mut listeners = Vec::new();
    for _ in 0..n {
        listeners.push(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap());
    }
    let addrs: Vec<SocketAddr> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
    let extra = peers(&addrs);
    let mut servers = Vec::new();
    for listener in listeners {
        let mut flags = vec!["--session-tags"];
        flags.extend(extra.iter().map(String::as_str));
        let mut registry = Registry::default();
        let kube = kube_client(&api).await;
        let deps = Deps {
            config: server_config(&flags),
            events: EventRecorder::new(kube.clone()),
            kube,
            sts: sts.clone(),
            tls: ServerTls::load(pki.server_files(), &mut registry).unwrap(),
            metrics: ServerMetrics::register(&mut registry),
        };
        let addr = listener.local_addr().unwrap();
        tokio::spawn(kiam::server::run(listener, deps, shutdown.clone()));
        servers.push(Server { addr, registry });
    }
    Servers {
        api,
        sts,
        pki,
        servers,
        shutdown,
        _dir: dir,
    }
}

/// The flags that make `addrs` share prefetch.
fn sharing(addrs: &[SocketAddr]) -> Vec<String> {
    let list: Vec<String> = addrs.iter().map(|a| a.to_string()).collect();
    vec![
        "--prefetch-peers".into(),
        list.join(","),
        "--advertise-ip".into(),
        "127.0.0.1".into(),
    ]
}

fn pod_ip(i: usize) -> IpAddr {
    IpAddr::from([198, 18, 20, u8::try_from(i).unwrap()])
}

fn pod_name(i: usize) -> String {
    format!("pod-{i}")
}

/// The identity `--session-tags` gives pod `name`.
fn identity(name: &str) -> Identity {
    Identity {
        role_arn: format!("{BASE_ARN}{ROLE}").into(),
        session_name: "kiam-kiam".into(),
        external_id: None,
        tags: Some(Arc::new(SessionTags {
            namespace: NS.into(),
            pod: name.into(),
            service_account: "default".into(),
        })),
    }
}

impl Servers {
    fn addrs(&self) -> Vec<SocketAddr> {
        self.servers.iter().map(|s| s.addr).collect()
    }

    fn pod(&self, name: &str, ip: IpAddr) {
        self.api
            .apply_pod(pod_json(NS, name, &ip.to_string(), Some(ROLE), "Running"))
            .unwrap();
    }

    /// A client presenting the agent certificate to server `i`.
    fn client(&self, i: usize) -> KiamServiceClient<Channel> {
        let tls = ClientTls::load(self.pki.agent_files(), &mut Registry::default()).unwrap();
        let channel = tls
            .channel(
                &format!("localhost:{}", self.servers[i].addr.port()),
                &ChannelOpts::default(),
            )
            .unwrap();
        KiamServiceClient::new(channel)
    }

    async fn ready(&self) {
        for i in 0..self.servers.len() {
            let mut client = self.client(i);
            let mut ok = false;
            for _ in 0..200 {
                if let Ok(r) = client.get_health(kiam::proto::GetHealthRequest {}).await {
                    ok = r.into_inner().message == "ok";
                    if ok {
                        break;
                    }
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            assert!(ok, "server {i} never became ready");
        }
    }

    fn metrics(&self, i: usize) -> String {
        kiam::telemetry::encode(&self.servers[i].registry)
    }

    /// Creates `N` pods, then one sentinel pod owned by each server (by
    /// `kiam::shard` over every server's address), and waits until every
    /// sentinel's credentials were fetched: each server has then processed
    /// every pod before its sentinel. Returns the sentinels' names.
    async fn pods_then_sentinels(&self) -> Vec<String> {
        for i in 0..N {
            self.pod(&pod_name(i), pod_ip(i));
        }
        let addrs = self.addrs();
        let mut sentinels = Vec::new();
        for owner in 0..addrs.len() {
            let ip = (100..=250)
                .map(pod_ip)
                .find(|ip| kiam::shard::owner(*ip, &addrs) == Some(owner))
                .expect("an IP owned by each server");
            let name = format!("sentinel-{owner}");
            self.pod(&name, ip);
            sentinels.push(name);
        }
        for name in &sentinels {
            let id = identity(name);
            eventually(&format!("{name} prefetched"), || self.sts.calls(&id) > 0).await;
        }
        sentinels
    }
}

/// The point of sharing: N pods with per-pod identities cost N STS calls
/// (plus one per sentinel) over three servers, not 3N; each pod's owner
/// answers it from the cache (no further call).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_sharing_servers_fetch_each_pods_credentials_once() {
    let s = start(3, sharing).await;
    s.ready().await;
    for i in 0..3 {
        eventually("sharing on", || {
            s.metrics(i).contains("kiam_server_prefetch_peers 3")
        })
        .await;
    }
    let sentinels = s.pods_then_sentinels().await;
    for i in 0..N {
        let id = identity(&pod_name(i));
        eventually("every pod prefetched", || s.sts.calls(&id) > 0).await;
    }
    let calls = s.sts.total_calls();
    eprintln!(
        "STS calls with --prefetch-peers: {calls} for {} pods",
        N + 3
    );
    assert_eq!(calls, N + sentinels.len(), "one STS call per pod");
    for i in 0..N {
        assert_eq!(s.sts.calls(&identity(&pod_name(i))), 1, "{}", pod_name(i));
    }

    // Each pod asks its owner first: answered from the cache.
    let addrs = s.addrs();
    for i in 0..N {
        let owner = kiam::shard::owner(pod_ip(i), &addrs).unwrap();
        let creds = grpc::credentials(&s.client(owner), &pod_ip(i).to_string(), ROLE).await;
        assert!(creds.is_ok(), "{creds:?}");
    }
    assert_eq!(
        s.sts.total_calls(),
        calls,
        "owners answered from their caches"
    );
}

/// Without `--prefetch-peers` every server prefetches every pod: 3N.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_prefetch_peers_every_server_prefetches_every_pod() {
    let s = start(3, |_| Vec::new()).await;
    s.ready().await;
    s.pods_then_sentinels().await;
    for i in 0..N {
        let id = identity(&pod_name(i));
        eventually("three fetches per pod", || s.sts.calls(&id) == 3).await;
    }
    let calls = s.sts.total_calls();
    eprintln!(
        "STS calls without --prefetch-peers: {calls} for {} pods",
        N + 3
    );
    assert_eq!(calls, 3 * (N + 3));
    for i in 0..3 {
        assert!(s.metrics(i).contains("kiam_server_prefetch_peers 0"));
    }
}

/// A server that is not among the peers it resolves (a wrong
/// `--advertise-ip`, or not yet in the Service's DNS answer) prefetches
/// everything rather than nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_missing_from_its_peers_prefetches_every_pod() {
    let s = start(1, |_| {
        vec![
            "--prefetch-peers".into(),
            "127.0.0.1:1,127.0.0.1:2".into(),
            "--advertise-ip".into(),
            "127.0.0.1".into(),
        ]
    })
    .await;
    s.ready().await;
    for i in 0..N {
        s.pod(&pod_name(i), pod_ip(i));
    }
    for i in 0..N {
        let id = identity(&pod_name(i));
        eventually("every pod prefetched", || s.sts.calls(&id) == 1).await;
    }
    assert!(s.metrics(0).contains("kiam_server_prefetch_peers 0"));
}

/// A request to a server that does not own the pod (an agent failed over)
/// is answered, with a cold fetch; that identity is then not refreshed by
/// this server, while the one it owns is. Credentials live 14 s and are
/// refreshed 2 s (--session-refresh) plus a 5 s margin plus up to 5 s of
/// jitter before they expire: every 2 to 7 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_fetch_is_answered_and_not_kept_fresh_by_the_non_owner() {
    let s = start(2, |addrs| {
        let mut f = sharing(addrs);
        f.extend(["--session-duration", "15m", "--session-refresh", "2s"].map(String::from));
        f
    })
    .await;
    s.sts.set_lifetime(Some(Duration::from_secs(14)));
    s.ready().await;
    for i in 0..2 {
        eventually("sharing on", || {
            s.metrics(i).contains("kiam_server_prefetch_peers 2")
        })
        .await;
    }
    let addrs = s.addrs();
    let owned_by = |server: usize| {
        (1..=250)
            .map(pod_ip)
            .find(|ip| kiam::shard::owner(*ip, &addrs) == Some(server))
            .unwrap()
    };
    // "mine" is owned by server 0, "theirs" by server 1.
    let (mine, theirs) = (owned_by(0), owned_by(1));
    s.pod("mine", mine);
    s.pod("theirs", theirs);
    let (mine_id, theirs_id) = (identity("mine"), identity("theirs"));
    eventually("both prefetched by their owners", || {
        s.sts.calls(&mine_id) >= 1 && s.sts.calls(&theirs_id) >= 1
    })
    .await;

    // Server 1 is "down" for the agent: it asks server 0 about "theirs".
    let before = server_sts_calls(&s, 0);
    let creds = grpc::credentials(&s.client(0), &theirs.to_string(), ROLE).await;
    assert!(creds.is_ok(), "a non-owner answers: {creds:?}");
    assert_eq!(
        server_sts_calls(&s, 0),
        before + 1,
        "a cold fetch on server 0"
    );

    // Four refreshes of its own pod (at least 8 s: past the 7 s at which
    // the failover credentials were due for refresh too)...
    let mine_before = s.sts.calls(&mine_id);
    let mut waited = 0;
    while s.sts.calls(&mine_id) < mine_before + 4 {
        assert!(waited < 600, "server 0 never refreshed its own pod");
        tokio::time::sleep(Duration::from_millis(100)).await;
        waited += 1;
    }
    // ...and no refresh of "theirs": every STS call server 0 made since
    // the failover was for "mine" (server 1 keeps "theirs" fresh).
    let mine_calls = s.sts.calls(&mine_id) - mine_before;
    assert_eq!(
        server_sts_calls(&s, 0) - before - 1,
        mine_calls,
        "server 0 refreshed credentials for a pod it does not own"
    );
    assert!(s.sts.calls(&theirs_id) >= 3, "its owner refreshes it");
}

/// STS calls server `i` made (its `kiam_sts_assumerole_timing_seconds`).
fn server_sts_calls(s: &Servers, i: usize) -> usize {
    let m = s.metrics(i);
    m.lines()
        .find_map(|l| l.strip_prefix("kiam_sts_assumerole_timing_seconds_count "))
        .map(|n| n.trim().parse().unwrap())
        .unwrap_or_else(|| panic!("no STS timing count: {m}"))
}
