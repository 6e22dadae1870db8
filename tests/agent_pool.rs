//! The agent's server pool against real gRPC servers over mutual TLS (certs
//! from `kiam certs`): a server killed or hung mid-traffic costs no request,
//! the pool follows re-resolution, and when every server is gone the last
//! good credentials are served inside the stale window and not after.
//!
//! Each server sits behind a small TCP relay the test controls, so "killed"
//! means connections cut and the port closed, and "hung" means connections
//! accepted but never answered — what a crashed or frozen process looks like
//! from the agent.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::connect_info::ConnectInfo;
use futures::future::BoxFuture;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use kiam::agent::client::{Pool, PoolConfig};
use kiam::agent::metadata::{router, Config, RouterContext};
use kiam::agent::metrics::Metrics;
use kiam::agent::proxy::Upstream;
use kiam::agent::server_address::{Resolve, SystemResolver, Target};
use kiam::agent::TlsConnect;
use kiam::proto::kiam_service_server::{KiamService, KiamServiceServer};
use kiam::proto::{
    Credentials, GetHealthRequest, GetPodCredentialsRequest, GetPodRoleRequest, HealthStatus, Role,
};
use kiam::tls::{self, ClientTls, ServerTls};
use kiam::wire::{Check, DENIED_CHECK_KEY};
use kiam_sandbox::imds::{Behaviour as ImdsBehaviour, ImdsEmulator, NodeIdentity};
use prometheus_client::registry::Registry;
use regex::Regex;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::{Response, Status};
use tower::ServiceExt;

const POD: &str = "10.2.0.5";
const ROLE: &str = "pod-role";
/// A role the stand-in refuses as a Go kiam server would: code Unknown,
/// no metadata naming the check.
const GO_DENIED: &str = "go-kiam-denied";
/// A role the stand-in refuses as the pod's own role that its namespace
/// does not permit.
const NAMESPACE_DENIED: &str = "namespace-denied";

/// A kiam server stand-in: one pod with one role. Other IPs get Go kiam's
/// `no pod found` (code Unknown, the message tells); other roles are
/// refused as a kiam server refuses them (see [`denied`]).
struct Srv {
    name: &'static str,
    calls: Arc<AtomicUsize>,
    behaviour: Arc<Behaviour>,
}

impl Srv {
    /// Notes the node an agent named in a pod call (`kiam-node`).
    fn note_node<T>(&self, r: &tonic::Request<T>) {
        let node = r
            .metadata()
            .get(kiam::wire::NODE_KEY)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        self.behaviour.nodes.lock().unwrap().push(node);
    }
}

/// What the test makes a stand-in do for the pod's own role.
#[derive(Default)]
struct Behaviour {
    /// Every answer waits this long first (a server stuck on a slow API
    /// lookup).
    delay: Mutex<Duration>,
    /// Credentials for [`ROLE`] fail with this code and message.
    fail: Mutex<Option<(tonic::Code, &'static str)>>,
    /// The node each pod call named (`kiam-node`), in order.
    nodes: Mutex<Vec<Option<String>>>,
}

impl Behaviour {
    async fn pause(&self) {
        let d = *self.delay.lock().unwrap();
        if !d.is_zero() {
            tokio::time::sleep(d).await;
        }
    }
}

#[tonic::async_trait]
impl KiamService for Srv {
    async fn get_pod_role(
        &self,
        r: tonic::Request<GetPodRoleRequest>,
    ) -> Result<Response<Role>, Status> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.note_node(&r);
        self.behaviour.pause().await;
        if r.into_inner().ip == POD {
            Ok(Response::new(Role {
                name: ROLE.into(),
                ..Default::default()
            }))
        } else {
            Err(Status::unknown("no pod found"))
        }
    }

    async fn get_pod_credentials(
        &self,
        r: tonic::Request<GetPodCredentialsRequest>,
    ) -> Result<Response<Credentials>, Status> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.note_node(&r);
        self.behaviour.pause().await;
        let r = r.into_inner();
        if r.ip != POD {
            return Err(Status::unknown("no pod found"));
        }
        if let Some((code, message)) = *self.behaviour.fail.lock().unwrap() {
            if r.role == ROLE {
                return Err(Status::new(code, message));
            }
        }
        match r.role.as_str() {
            ROLE => {}
            GO_DENIED => return Err(Status::unknown("forbidden by policy")),
            NAMESPACE_DENIED => return Err(denied(Check::NamespacePermitted)),
            _ => return Err(denied(Check::AnnotatedRole)),
        }
        let now = jiff::Timestamp::now();
        Ok(Response::new(Credentials {
            code: "Success".into(),
            r#type: "AWS-HMAC".into(),
            access_key_id: format!("KEY-{}", self.name),
            secret_access_key: "secret".into(),
            token: "token".into(),
            expiration: (now + jiff::SignedDuration::from_secs(3600)).to_string(),
            last_updated: now.to_string(),
        }))
    }

    async fn get_health(
        &self,
        _: tonic::Request<GetHealthRequest>,
    ) -> Result<Response<HealthStatus>, Status> {
        Ok(Response::new(HealthStatus {
            message: "ok".into(),
        }))
    }
    async fn explain(
        &self,
        _: tonic::Request<kiam::proto::ExplainRequest>,
    ) -> Result<Response<kiam::proto::Explanation>, Status> {
        Err(Status::unimplemented("explain"))
    }
    async fn get_token_credentials(
        &self,
        _: tonic::Request<kiam::proto::GetTokenCredentialsRequest>,
    ) -> Result<tonic::Response<kiam::proto::TokenCredentials>, tonic::Status> {
        Err(tonic::Status::unimplemented("token credentials"))
    }
}

/// A policy refusal naming the check that refused, in the response
/// metadata a kiam server attaches.
fn denied(check: Check) -> Status {
    let mut status = Status::permission_denied("forbidden by policy");
    status
        .metadata_mut()
        .insert(DENIED_CHECK_KEY, check.as_str().parse().unwrap());
    status
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Pass,
    Hang,
    Dead,
}

/// A gRPC server over mTLS behind a controllable relay.
struct Server {
    name: &'static str,
    addr: SocketAddr,
    mode: watch::Sender<Mode>,
    calls: Arc<AtomicUsize>,
    behaviour: Arc<Behaviour>,
    stop: CancellationToken,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.mode.send(Mode::Dead);
        self.stop.cancel();
    }
}

impl Server {
    async fn start(name: &'static str, files: tls::TlsFiles) -> Server {
        let tls = ServerTls::load(files, &mut Registry::default()).unwrap();
        let backend = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let backend_addr = backend.local_addr().unwrap();
        let calls = Arc::new(AtomicUsize::new(0));
        let behaviour = Arc::new(Behaviour::default());
        let stop = CancellationToken::new();
        let svc = KiamServiceServer::new(Srv {
            name,
            calls: calls.clone(),
            behaviour: behaviour.clone(),
        });
        let signal = stop.clone().cancelled_owned();
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming_shutdown(tls::incoming(backend, tls), signal)
                .await
                .unwrap();
        });

        let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = front.local_addr().unwrap();
        let (mode, rx) = watch::channel(Mode::Pass);
        tokio::spawn(relay(front, backend_addr, rx));
        Server {
            name,
            addr,
            mode,
            calls,
            behaviour,
            stop,
        }
    }

    fn set(&self, m: Mode) {
        self.mode.send(m).unwrap();
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    /// The access key id this stand-in hands out.
    fn name(&self) -> String {
        format!("KEY-{}", self.name)
    }
}

async fn relay(front: TcpListener, backend: SocketAddr, mut mode: watch::Receiver<Mode>) {
    loop {
        let accepted = tokio::select! {
            a = front.accept() => a,
            _ = mode.wait_for(|m| *m == Mode::Dead) => return, // closes the port
        };
        let Ok((mut client, _)) = accepted else {
            continue;
        };
        let mut mode = mode.clone();
        tokio::spawn(async move {
            if *mode.borrow() == Mode::Hang {
                // Accept, then never answer.
                let _ = mode.wait_for(|m| *m == Mode::Dead).await;
                return;
            }
            let Ok(mut server) = TcpStream::connect(backend).await else {
                return;
            };
            let stopped = tokio::select! {
                _ = tokio::io::copy_bidirectional(&mut client, &mut server) => false,
                _ = mode.wait_for(|m| *m != Mode::Pass) => true,
            };
            if stopped {
                // Hung: keep both sockets open, forward nothing, until dead.
                let _ = mode.wait_for(|m| *m == Mode::Dead).await;
            }
            // Dropping both sockets cuts the connection.
        });
    }
}

struct Setup {
    _dir: tempfile::TempDir,
    pki: kiam::certs::Pki,
    _imds: ImdsEmulator,
}

async fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let pki = kiam::certs::generate(dir.path(), &[], 30).unwrap();
    Setup {
        _dir: dir,
        pki,
        _imds: ImdsEmulator::start(NodeIdentity::default(), ImdsBehaviour::leaky())
            .await
            .unwrap(),
    }
}

fn pool_config(servers: &[&Server]) -> PoolConfig {
    PoolConfig {
        targets: servers
            .iter()
            .map(|s| Target {
                host: "127.0.0.1".into(),
                port: s.addr.port(),
            })
            .collect(),
        connect_timeout: Duration::from_millis(500),
        attempt_timeout: Duration::from_millis(300),
        credentials_attempt_timeout: Duration::from_millis(300),
        keepalive_time: Duration::from_secs(10),
        keepalive_timeout: Duration::from_secs(2),
        keepalive_while_idle: false,
        refresh_interval: Duration::from_secs(3600),
        failure_cooldown: Duration::from_secs(2),
        node: None,
    }
}

struct Agent {
    state: Arc<RouterContext>,
    registry: Registry,
}

/// An agent in front of one server "a", with a 5-minute stale window.
async fn one_server() -> (Setup, Server, Agent) {
    let s = setup().await;
    let srv = Server::start("a", s.pki.server_files()).await;
    let agent = agent(
        &s,
        pool_config(&[&srv]),
        Arc::new(SystemResolver),
        Duration::from_secs(300),
    )
    .await;
    (s, srv, agent)
}

async fn agent(s: &Setup, cfg: PoolConfig, resolver: Arc<dyn Resolve>, window: Duration) -> Agent {
    let mut registry = Registry::default();
    let client_tls = ClientTls::load(s.pki.agent_files(), &mut registry).unwrap();
    let pool = Pool::new(
        cfg,
        Arc::new(TlsConnect(client_tls)),
        resolver,
        kiam::grpc_metrics::GrpcMetrics::client(&mut registry),
    )
    .await;
    let mut config = Config::new(Regex::new("^$").unwrap());
    config.stale_window = window;
    let upstream = Upstream::new(&s._imds.url(), Duration::from_secs(2)).unwrap();
    let state = RouterContext::new(
        config,
        Arc::new(pool),
        Arc::new(upstream),
        Metrics::new(&mut registry),
    );
    Agent { state, registry }
}

impl Agent {
    async fn get(&self, path: &str) -> (StatusCode, String) {
        self.get_from(POD, path).await
    }

    async fn get_from(&self, from: &str, path: &str) -> (StatusCode, String) {
        let mut req = Request::get(path).body(Body::empty()).unwrap();
        req.extensions_mut().insert(ConnectInfo(
            format!("{from}:40000").parse::<SocketAddr>().unwrap(),
        ));
        let resp = router(self.state.clone()).oneshot(req).await.unwrap();
        let status = resp.status();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    /// What an SDK does: list the role, then fetch its credentials.
    async fn sdk_fetch(&self) -> Result<String, String> {
        let (s, role) = self
            .get("/latest/meta-data/iam/security-credentials/")
            .await;
        if s != StatusCode::OK {
            return Err(format!("role listing: {s} {role}"));
        }
        let (s, body) = self
            .get(&format!(
                "/latest/meta-data/iam/security-credentials/{role}"
            ))
            .await;
        if s != StatusCode::OK {
            return Err(format!("credentials: {s} {body}"));
        }
        let v: serde_json::Value = serde_json::from_str(&body).map_err(|e| e.to_string())?;
        Ok(v["AccessKeyId"].as_str().unwrap_or_default().to_string())
    }
}

/// Runs SDK-style fetches from 4 pods' worth of concurrency until `n`
/// have completed, calling `midway` after `n / 3`. Returns the failures.
async fn traffic(a: &Agent, n: usize, midway: impl FnOnce()) -> Vec<String> {
    let mut failures = Vec::new();
    let mut midway = Some(midway);
    for round in 0..n / 4 {
        if round == n / 12 {
            (midway.take().unwrap())();
        }
        let results = futures::future::join_all((0..4).map(|_| a.sdk_fetch())).await;
        failures.extend(results.into_iter().filter_map(Result::err));
    }
    failures
}

#[tokio::test]
async fn a_killed_server_costs_no_request() {
    let s = setup().await;
    let a_srv = Server::start("a", s.pki.server_files()).await;
    let b_srv = Server::start("b", s.pki.server_files()).await;
    let agent = agent(
        &s,
        pool_config(&[&a_srv, &b_srv]),
        Arc::new(SystemResolver),
        Duration::ZERO,
    )
    .await;

    // The pod's requests go to its owner: kill that one.
    let (owner, next) = by_rank(&a_srv, &b_srv);
    let failures = traffic(&agent, 120, || owner.set(Mode::Dead)).await;
    assert!(failures.is_empty(), "{failures:?}");
    assert!(owner.calls() > 0, "the owner took traffic before the kill");
    let next_before = next.calls();
    assert!(agent.sdk_fetch().await.is_ok());
    assert!(next.calls() > next_before);
    let m = kiam::telemetry::encode(&agent.registry);
    assert!(m.contains(r#"grpc_client_handled_total{grpc_method="GetPodRole",grpc_service="kiam.KiamService",grpc_type="unary",grpc_code="OK"}"#), "{m}");
    assert!(m.contains(r#"grpc_client_started_total{grpc_method="GetPodCredentials",grpc_service="kiam.KiamService",grpc_type="unary"}"#), "{m}");
}

#[tokio::test]
async fn a_hung_server_costs_no_request() {
    let s = setup().await;
    let a_srv = Server::start("a", s.pki.server_files()).await;
    let b_srv = Server::start("b", s.pki.server_files()).await;
    let agent = agent(
        &s,
        pool_config(&[&a_srv, &b_srv]),
        Arc::new(SystemResolver),
        Duration::ZERO,
    )
    .await;

    let (owner, next) = by_rank(&a_srv, &b_srv);
    let failures = traffic(&agent, 80, || owner.set(Mode::Hang)).await;
    assert!(failures.is_empty(), "{failures:?}");
    assert!(next.calls() > 0);
    // The hang was hit and skipped, not avoided by luck.
    let m = kiam::telemetry::encode(&agent.registry);
    assert!(m.contains(r#"grpc_code="DeadlineExceeded"}"#), "{m}");
}

/// Over real gRPC: the check named in a denial's metadata picks 404 (not
/// the pod's role) or 403 (the namespace does not permit it); a Go kiam
/// denial carries no check and is 403. Each costs the server exactly one
/// call: no retry, and no second question to choose the status.
#[tokio::test]
async fn a_denial_costs_one_call_and_its_check_picks_the_status() {
    let s = setup().await;
    let srv = Server::start("a", s.pki.server_files()).await;
    let agent = agent(
        &s,
        pool_config(&[&srv]),
        Arc::new(SystemResolver),
        Duration::ZERO,
    )
    .await;
    for (role, want) in [
        ("not-mine", StatusCode::NOT_FOUND),
        (NAMESPACE_DENIED, StatusCode::FORBIDDEN),
        (GO_DENIED, StatusCode::FORBIDDEN),
    ] {
        let before = srv.calls();
        let (status, body) = agent
            .get(&format!(
                "/latest/meta-data/iam/security-credentials/{role}"
            ))
            .await;
        assert_eq!(status, want, "{role}: {body}");
        assert_eq!(srv.calls() - before, 1, "{role}: one call");
    }
    let (status, body) = agent
        .get("/latest/meta-data/iam/security-credentials/")
        .await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, ROLE));
}

#[tokio::test]
async fn all_servers_down_serves_kept_credentials_inside_the_window_only() {
    let s = setup().await;
    let a_srv = Server::start("a", s.pki.server_files()).await;
    let b_srv = Server::start("b", s.pki.server_files()).await;
    let window = Duration::from_secs(1);
    let agent = agent(
        &s,
        pool_config(&[&a_srv, &b_srv]),
        Arc::new(SystemResolver),
        window,
    )
    .await;

    let key = agent.sdk_fetch().await.unwrap();
    a_srv.set(Mode::Dead);
    b_srv.set(Mode::Dead);
    assert_eq!(
        agent.sdk_fetch().await,
        Ok(key),
        "kept credentials served during the outage"
    );
    let m = kiam::telemetry::encode(&agent.registry);
    assert!(
        m.contains(r#"kiam_agent_stale_credentials_served_total{handler="credentials"} 1"#),
        "{m}"
    );

    tokio::time::sleep(window + Duration::from_millis(200)).await;
    let err = agent.sdk_fetch().await.unwrap_err();
    assert!(err.contains("502") || err.contains("504"), "{err}");
}

/// A deadline for a direct pool call.
fn soon() -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_secs(1)
}

/// A resolver whose answer the test changes, standing for a DNS name that
/// follows server scale-out and scale-in.
struct Scripted(Mutex<Vec<SocketAddr>>);

impl Resolve for Scripted {
    fn resolve<'a>(&'a self, _: &'a Target) -> BoxFuture<'a, std::io::Result<Vec<SocketAddr>>> {
        Box::pin(async move { Ok(self.0.lock().unwrap().clone()) })
    }
}

#[tokio::test]
async fn the_pool_follows_re_resolution() {
    let s = setup().await;
    let a_srv = Server::start("a", s.pki.server_files()).await;
    let b_srv = Server::start("b", s.pki.server_files()).await;
    let resolver = Arc::new(Scripted(Mutex::new(vec![a_srv.addr])));
    let mut cfg = pool_config(&[]);
    cfg.targets = vec![Target {
        host: "127.0.0.1".into(),
        port: 0,
    }];
    let mut registry = Registry::default();
    let client_tls = ClientTls::load(s.pki.agent_files(), &mut registry).unwrap();
    let pool = Pool::new(
        cfg,
        Arc::new(TlsConnect(client_tls)),
        resolver.clone(),
        kiam::grpc_metrics::GrpcMetrics::client(&mut registry),
    )
    .await;
    assert_eq!(pool.addresses(), vec![a_srv.addr]);

    // Scale out.
    resolver.0.lock().unwrap().push(b_srv.addr);
    pool.refresh().await;
    assert_eq!(pool.addresses(), vec![a_srv.addr, b_srv.addr]);
    use kiam::agent::client::KiamClient;
    let ip: IpAddr = POD.parse().unwrap();
    // Pods are spread by IP (each asks its owner first): 40 pods reach
    // both servers unless the hash is broken (odds 2^-39 otherwise).
    for i in 0..40u8 {
        let _ = pool.get_pod_role(IpAddr::from([10, 2, 1, i]), soon()).await;
    }
    assert!(a_srv.calls() > 0 && b_srv.calls() > 0, "balanced over both");

    // Scale in: a goes away from DNS and dies; b keeps answering.
    *resolver.0.lock().unwrap() = vec![b_srv.addr];
    pool.refresh().await;
    assert_eq!(pool.addresses(), vec![b_srv.addr]);
    a_srv.set(Mode::Dead);
    assert_eq!(
        pool.get_pod_role(ip, soon())
            .await
            .unwrap()
            .map(|r| r.name)
            .as_deref(),
        Some(ROLE)
    );

    // A DNS failure keeps the last known addresses.
    resolver.0.lock().unwrap().clear();
    pool.refresh().await;
    assert_eq!(pool.addresses(), vec![b_srv.addr]);
}

const CREDS: &str = "/latest/meta-data/iam/security-credentials/";

/// The two servers in [`POD`]'s rank: its owner, then the next.
fn by_rank<'a>(a: &'a Server, b: &'a Server) -> (&'a Server, &'a Server) {
    let pod: IpAddr = POD.parse().unwrap();
    match kiam::shard::owner(pod, &[a.addr, b.addr]) {
        Some(0) => (a, b),
        _ => (b, a),
    }
}

/// Requests about a pod go to the server that owns its IP
/// ([`kiam::shard`]), all of them, not round robin; with the owner down
/// they go to the next in the pod's rank, and with the owner back they
/// return to it. Another pod owned by the other server goes there.
#[tokio::test]
async fn a_pods_requests_go_to_its_owner_then_the_next_in_rank() {
    let s = setup().await;
    let servers = [
        Server::start("a", s.pki.server_files()).await,
        Server::start("b", s.pki.server_files()).await,
        Server::start("c", s.pki.server_files()).await,
    ];
    let addrs: Vec<SocketAddr> = servers.iter().map(|s| s.addr).collect();
    let agent = agent(
        &s,
        pool_config(&servers.iter().collect::<Vec<_>>()),
        Arc::new(SystemResolver),
        Duration::ZERO,
    )
    .await;
    let pod: IpAddr = POD.parse().unwrap();
    let rank = kiam::shard::rank(pod, &addrs);
    let calls = || servers.iter().map(Server::calls).collect::<Vec<_>>();

    for _ in 0..10 {
        assert_eq!(agent.sdk_fetch().await, Ok(servers[rank[0]].name()));
    }
    let mut want = vec![0; 3];
    want[rank[0]] = 20;
    assert_eq!(calls(), want, "every call went to the owner");

    // The owner is down: its pods fail over to the next in rank, not to
    // the third.
    servers[rank[0]].set(Mode::Dead);
    for _ in 0..5 {
        assert_eq!(agent.sdk_fetch().await, Ok(servers[rank[1]].name()));
    }
    assert_eq!(
        servers[rank[2]].calls(),
        0,
        "the third in rank was never asked"
    );

    // Another pod whose owner is the third server goes there.
    let other = (1..=255u8)
        .map(|i| IpAddr::from([10, 2, 3, i]))
        .find(|ip| kiam::shard::owner(*ip, &addrs) == Some(rank[2]))
        .expect("some pod is owned by the third server");
    let (status, _) = agent.get_from(&other.to_string(), CREDS).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "the stand-in knows one pod");
    assert!(servers[rank[2]].calls() > 0);
}

/// An agent that knows its node names it with every pod call (so a server
/// looks up a pod its watch has not delivered among that node's pods); one
/// that does not names none.
#[tokio::test]
async fn pod_calls_name_the_agents_node() {
    let s = setup().await;
    let srv = Server::start("a", s.pki.server_files()).await;
    let mut cfg = pool_config(&[&srv]);
    cfg.node = Some("node-7".into());
    let agent = agent(&s, cfg, Arc::new(SystemResolver), Duration::ZERO).await;
    assert_eq!(agent.sdk_fetch().await, Ok(srv.name()));
    let nodes = std::mem::take(&mut *srv.behaviour.nodes.lock().unwrap());
    assert_eq!(
        nodes,
        [Some("node-7".to_string()), Some("node-7".to_string())]
    );

    let plain = self::agent(
        &s,
        pool_config(&[&srv]),
        Arc::new(SystemResolver),
        Duration::ZERO,
    )
    .await;
    assert_eq!(plain.sdk_fetch().await, Ok(srv.name()));
    assert_eq!(*srv.behaviour.nodes.lock().unwrap(), [None, None]);
}

/// Issue 12, defect 1: a server that has the request and is slow to answer
/// (stuck on a slow API lookup) has answered. The fallback is for servers
/// nobody can reach; serving it here would hand a pod that reused an IP the
/// previous pod's role and credentials. The pod gets 504, not kept answers.
#[tokio::test]
async fn a_slow_server_has_answered_and_the_fallback_stays_shut() {
    let (_s, srv, agent) = one_server().await;
    let key = agent.sdk_fetch().await.unwrap();
    assert!(
        kiam::telemetry::encode(&agent.registry).contains("kiam_agent_fallback_pods 1"),
        "the fallback holds the pod"
    );

    *srv.behaviour.delay.lock().unwrap() = Duration::from_secs(3);
    let started = std::time::Instant::now();
    let (status, body) = agent.get(CREDS).await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "listing: {body}");
    assert_ne!(body, ROLE);
    // The budget is 900 ms; the margin is for a loaded CI machine.
    assert!(started.elapsed() < Duration::from_millis(1500));
    let started = std::time::Instant::now();
    let (status, body) = agent.get(&format!("{CREDS}{ROLE}")).await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "credentials: {body}");
    assert!(!body.contains(&key), "kept credentials served: {body}");
    assert!(started.elapsed() < Duration::from_millis(1500));
    let m = kiam::telemetry::encode(&agent.registry);
    assert!(
        !m.contains("kiam_agent_stale_credentials_served_total{"),
        "{m}"
    );

    // Unreachable is different: connections refused, the kept answers serve.
    *srv.behaviour.delay.lock().unwrap() = Duration::ZERO;
    srv.set(Mode::Dead);
    assert_eq!(agent.sdk_fetch().await, Ok(key));
}

/// Issue 12, defect 2: `no pod found` is asked at most three times, spread
/// over the request's deadline, then answered 404 — not once per backoff
/// step (each costing the server an API lookup).
#[tokio::test]
async fn no_pod_found_is_asked_at_most_three_times() {
    let (_s, srv, agent) = one_server().await;
    for path in [CREDS.to_string(), format!("{CREDS}{ROLE}")] {
        let before = srv.calls();
        let started = std::time::Instant::now();
        let (status, body) = agent.get_from("10.2.0.99", &path).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}: {body}");
        let calls = srv.calls() - before;
        assert!((2..=3).contains(&calls), "{path}: {calls} calls");
        assert!(started.elapsed() < Duration::from_secs(1), "{path}");
    }
}

/// Issue 12: FAILED_PRECONDITION (a final STS refusal, two pods on one IP)
/// is final: one call, 500, never the fallback. INTERNAL is asked again
/// within the deadline but never opens the fallback either. UNAVAILABLE
/// (a server not ready) is an outage, which the fallback covers. Bodies say
/// nothing of what the server said.
#[tokio::test]
async fn final_answers_are_final_and_internal_errors_never_open_the_fallback() {
    let (_s, srv, agent) = one_server().await;
    let key = agent.sdk_fetch().await.unwrap();
    let path = format!("{CREDS}{ROLE}");
    let fail = |code, message| *srv.behaviour.fail.lock().unwrap() = Some((code, message));

    fail(
        tonic::Code::Internal,
        "error retrieving credentials: Throttling",
    );
    let before = srv.calls();
    let (status, body) = agent.get(&path).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{body}");
    assert!(srv.calls() - before > 1, "INTERNAL is asked again");
    assert!(
        !body.contains(&key) && !body.contains("Throttling"),
        "{body}"
    );

    fail(tonic::Code::Unavailable, "kiam server is starting");
    let (status, body) = agent.get(&path).await;
    assert_eq!(status, StatusCode::OK, "a server not ready is an outage");
    assert!(body.contains(&key));

    fail(
        tonic::Code::FailedPrecondition,
        "error retrieving credentials: AccessDenied",
    );
    let before = srv.calls();
    let (status, body) = agent.get(&path).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{body}");
    assert_eq!(srv.calls() - before, 1, "a final answer is not asked again");
    assert!(
        !body.contains(&key) && !body.contains("AccessDenied"),
        "{body}"
    );

    // A refusal also drops what was kept for the IP: a later outage does
    // not bring the refused credentials back.
    fail(tonic::Code::Unavailable, "kiam server is starting");
    let (status, body) = agent.get(&path).await;
    assert_ne!(status, StatusCode::OK, "{body}");
    assert!(kiam::telemetry::encode(&agent.registry).contains("kiam_agent_fallback_pods 0"));
}

/// A server that does not know GetTokenCredentials (as every Go kiam
/// server) answers UNIMPLEMENTED: the pod's SDK hears why, as JSON, 501.
#[tokio::test]
async fn a_server_without_the_token_rpc_gives_pods_a_clear_501() {
    let (_s, _srv, a) = one_server().await;
    let mut req = Request::get("/v1/credentials")
        .header("authorization", "a.b.c")
        .body(Body::empty())
        .unwrap();
    req.extensions_mut().insert(ConnectInfo(
        format!("{POD}:40000").parse::<SocketAddr>().unwrap(),
    ));
    let resp = router(a.state.clone()).oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_IMPLEMENTED);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let doc: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(doc["Code"], "NotImplemented", "{doc}");
    assert!(
        doc["Message"]
            .as_str()
            .unwrap()
            .contains("GetTokenCredentials"),
        "{doc}"
    );
}
