//! A kiam server wired to the in-memory Kubernetes API server and a fake
//! STS, served over mutual TLS on 127.0.0.1:0 — the fixture for gRPC-level
//! tests. Certificates come from `kiam certs`' library functions.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use kiam::proto::kiam_service_client::KiamServiceClient;
use kiam::server::config::ServerConfig;
use kiam::server::events::EventRecorder;
use kiam::server::{Deps, ServerMetrics};
use kiam::tls::{ChannelOpts, ClientTls, ServerTls};
use kiam_sandbox::apiserver::FakeApiServer;
use prometheus_client::registry::Registry;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

#[path = "fake_sts.rs"]
pub mod fake_sts;
#[allow(unused_imports)]
pub use fake_sts::{FakeFailure, FakeSts};

pub const BASE_ARN: &str = "arn:aws:iam::123456789012:role/";

pub struct Cluster {
    pub api: FakeApiServer,
    pub sts: Arc<FakeSts>,
    pub addr: std::net::SocketAddr,
    pub pki: kiam::certs::Pki,
    pub registry: Arc<std::sync::Mutex<Registry>>,
    pub shutdown: CancellationToken,
    _dir: tempfile::TempDir,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

pub fn server_config(extra: &[&str]) -> ServerConfig {
    use clap::Parser;
    let mut argv = vec![
        "kiam",
        "server",
        "--cert",
        "unused",
        "--key",
        "unused",
        "--ca",
        "unused",
        "--role-base-arn",
        BASE_ARN,
    ];
    argv.extend_from_slice(extra);
    let kiam::cli::Command::Server(args) = kiam::cli::Cli::try_parse_from(argv).unwrap().command
    else {
        unreachable!()
    };
    ServerConfig::from_args(&args).unwrap()
}

pub async fn kube_client(api: &FakeApiServer) -> kube::Client {
    kiam::ensure_crypto_provider();
    let config = kube::Config::new(api.url().parse().unwrap());
    kube::Client::try_from(config).unwrap()
}

impl Cluster {
    /// Starts a server with default flags plus `extra`.
    pub async fn start(extra: &[&str]) -> Cluster {
        let api = FakeApiServer::start().await.unwrap();
        Self::start_with(api, extra).await
    }

    pub async fn start_with(api: FakeApiServer, extra: &[&str]) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let pki = kiam::certs::generate(dir.path(), &[], 1).unwrap();
        let sts = Arc::new(FakeSts::new());
        let mut registry = Registry::default();
        let kube = kube_client(&api).await;
        let shutdown = CancellationToken::new();
        let tls = ServerTls::load(pki.server_files(), &mut registry).unwrap();
        let deps = Deps {
            config: server_config(extra),
            events: EventRecorder::new(kube.clone()),
            kube,
            sts: sts.clone(),
            tls,
            metrics: ServerMetrics::register(&mut registry),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(kiam::server::run(listener, deps, shutdown.clone()));
        Cluster {
            api,
            sts,
            addr,
            pki,
            registry: Arc::new(std::sync::Mutex::new(registry)),
            shutdown,
            _dir: dir,
        }
    }

    /// A client presenting the agent certificate.
    pub fn client(&self) -> KiamServiceClient<Channel> {
        let tls = ClientTls::load(self.pki.agent_files(), &mut Registry::default()).unwrap();
        let channel = tls
            .channel(
                &format!("localhost:{}", self.addr.port()),
                &ChannelOpts::default(),
            )
            .unwrap();
        KiamServiceClient::new(channel)
    }

    /// Waits until GetHealth answers `ok` (the caches have synced).
    pub async fn ready(&self) -> KiamServiceClient<Channel> {
        let mut client = self.client();
        for _ in 0..200 {
            if let Ok(r) = client.get_health(kiam::proto::GetHealthRequest {}).await {
                assert_eq!(r.into_inner().message, "ok");
                return client;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("server never became ready");
    }

    pub fn namespace(&self, name: &str, permitted: Option<&str>) {
        let mut ns = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}});
        if let Some(p) = permitted {
            ns["metadata"]["annotations"] = json!({"iam.amazonaws.com/permitted": p});
        }
        self.api.create_namespace(ns).unwrap();
    }

    pub fn pod(&self, ns: &str, name: &str, ip: &str, role: Option<&str>) {
        self.api
            .apply_pod(pod_json(ns, name, ip, role, "Running"))
            .unwrap();
    }

    pub fn metrics(&self) -> String {
        kiam::telemetry::encode(&self.registry.lock().unwrap())
    }
}

pub fn pod_json(
    ns: &str,
    name: &str,
    ip: &str,
    role: Option<&str>,
    phase: &str,
) -> serde_json::Value {
    let mut pod = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "uid": format!("uid-{ns}-{name}-{ip}")},
        "spec": {"containers": [{"name": "app", "image": "busybox"}], "serviceAccountName": "default"},
        "status": {"phase": phase, "podIP": ip, "podIPs": [{"ip": ip}]}
    });
    if let Some(r) = role {
        pod["metadata"]["annotations"] = json!({"iam.amazonaws.com/role": r});
    }
    pod
}

/// Polls `f` until it is true (or panics after ~5 s).
pub async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..500 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for: {what}");
}
