//! An in-process kiam server, as `kiam server` builds it, against the
//! in-memory API server and a fake STS, answering over mutual TLS on
//! 127.0.0.1:0. The same wiring as the integration tests' fixture.
//!
//! The STS double pads credentials to real STS sizes (a session token is
//! ~900 characters), because answer size is part of what the benchmarks move,
//! and records when each identity's call finished so prefetch can be judged
//! against the moment a pod asks.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use futures::future::BoxFuture;
use futures::FutureExt;
use kiam::proto::kiam_service_client::KiamServiceClient;
use kiam::server::config::ServerConfig;
use kiam::server::events::EventRecorder;
use kiam::server::model::Identity;
use kiam::server::sts::{AssumeRole, Credentials, StsError};
use kiam::server::{Deps, ServerMetrics};
use kiam::tls::{ChannelOpts, ClientTls, ServerTls};
use kiam_sandbox::apiserver::FakeApiServer;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::pods::BASE_ARN;

/// The STS double the integration tests use, shared by path.
#[path = "../../../tests/support/fake_sts.rs"]
mod fake_sts;
use fake_sts::FakeSts;

/// [`FakeSts`] with real-sized answers and a record of finished calls.
#[derive(Default)]
pub struct RecordingSts {
    pub fake: FakeSts,
    /// When the last successful call for each role ARN finished.
    done: Mutex<HashMap<Arc<str>, Instant>>,
}

impl RecordingSts {
    /// When credentials for `role_arn` were last issued.
    pub fn done_at(&self, role_arn: &str) -> Option<Instant> {
        self.done.lock().unwrap().get(role_arn).copied()
    }

    pub fn calls(&self) -> usize {
        self.fake.total_calls()
    }
}

impl AssumeRole for RecordingSts {
    fn assume_role<'a>(
        &'a self,
        identity: &'a Identity,
        duration: Duration,
    ) -> BoxFuture<'a, Result<Credentials, StsError>> {
        async move {
            let mut c = self.fake.assume_role(identity, duration).await?;
            // Real STS: 20-character key id, 40-character secret, and a
            // session token of several hundred characters.
            c.access_key_id = format!("{:A<20}", c.access_key_id)[..20].to_string();
            c.secret_access_key = format!("{:x<40}", c.secret_access_key)[..40].to_string();
            c.session_token = format!("{:F<900}", c.session_token);
            self.done
                .lock()
                .unwrap()
                .insert(identity.role_arn.clone(), Instant::now());
            Ok(c)
        }
        .boxed()
    }
}

/// The server's configuration from `kiam server` flags plus `extra`.
pub fn server_config(extra: &[&str]) -> Result<ServerConfig> {
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
    let kiam::cli::Command::Server(args) = kiam::cli::Cli::try_parse_from(argv)?.command else {
        anyhow::bail!("not a server command line");
    };
    ServerConfig::from_args(&args).map_err(|e| anyhow::anyhow!("{e}"))
}

pub fn kube_client(api_url: &str) -> Result<kube::Client> {
    kiam::ensure_crypto_provider();
    let config = kube::Config::new(api_url.parse()?);
    Ok(kube::Client::try_from(config)?)
}

/// A running in-process kiam server.
pub struct Cluster {
    pub sts: Arc<RecordingSts>,
    pub addr: SocketAddr,
    pub pki: kiam::certs::Pki,
    pub shutdown: CancellationToken,
    /// The server's metrics, read by figures that count what it did.
    registry: Registry,
    _dir: tempfile::TempDir,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl Cluster {
    /// A channel presenting the agent certificate (one HTTP/2 connection).
    pub fn channel(&self) -> Result<Channel> {
        let tls = ClientTls::load(self.pki.agent_files(), &mut Registry::default())?;
        Ok(tls.channel(
            &format!("127.0.0.1:{}", self.addr.port()),
            &ChannelOpts::default(),
        )?)
    }

    /// The value of one counter sample as `/metrics` would show it, e.g.
    /// `kiam_k8s_pod_confirmations_total{result="skipped"}`; 0 when the
    /// sample has not been created yet (nothing counted).
    pub fn counter(&self, sample: &str) -> f64 {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("encoding metrics into a String");
        text.lines()
            .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0)
    }

    /// Waits until GetHealth answers `ok` (the caches have synced).
    pub async fn wait_ready(&self, timeout: Duration) -> Result<()> {
        let mut client = KiamServiceClient::new(self.channel()?);
        let deadline = Instant::now() + timeout;
        loop {
            match client.get_health(kiam::proto::GetHealthRequest {}).await {
                Ok(r) if r.get_ref().message == "ok" => return Ok(()),
                other => {
                    if Instant::now() > deadline {
                        anyhow::bail!("kiam server not ready after {timeout:?}: {other:?}");
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Builds and serves a kiam server (flags `extra`) watching `api`. Call
    /// inside the runtime the server should run on.
    pub async fn start(api: &FakeApiServer, extra: &[&str]) -> Result<Cluster> {
        Self::start_url(&api.url(), extra).await
    }

    pub async fn start_url(api_url: &str, extra: &[&str]) -> Result<Cluster> {
        let (cluster, listener, deps) = Self::prepare(api_url, extra).await?;
        tokio::spawn(kiam::server::run(listener, deps, cluster.shutdown.clone()));
        Ok(cluster)
    }

    /// Everything [`Cluster::start_url`] sets up (certificates, listener,
    /// dependencies) without starting the server, so a measurement can
    /// start exactly when the server does.
    pub async fn prepare(
        api_url: &str,
        extra: &[&str],
    ) -> Result<(Cluster, tokio::net::TcpListener, Deps)> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        Self::prepare_on(api_url, extra, listener).await
    }

    /// A server on a listener bound beforehand, so servers can be told each
    /// other's addresses (`--prefetch-peers`) before any starts.
    pub async fn start_on(
        api: &FakeApiServer,
        extra: &[&str],
        listener: tokio::net::TcpListener,
    ) -> Result<Cluster> {
        let (cluster, listener, deps) = Self::prepare_on(&api.url(), extra, listener).await?;
        tokio::spawn(kiam::server::run(listener, deps, cluster.shutdown.clone()));
        Ok(cluster)
    }

    async fn prepare_on(
        api_url: &str,
        extra: &[&str],
        listener: tokio::net::TcpListener,
    ) -> Result<(Cluster, tokio::net::TcpListener, Deps)> {
        let dir = tempfile::tempdir()?;
        let pki = kiam::certs::generate(dir.path(), &[], 1)?;
        let sts = Arc::new(RecordingSts::default());
        let mut registry = Registry::default();
        let kube = kube_client(api_url)?;
        let shutdown = CancellationToken::new();
        let tls = ServerTls::load(pki.server_files(), &mut registry)?;
        let deps = Deps {
            config: server_config(extra)?,
            events: EventRecorder::new(kube.clone()),
            kube,
            sts: sts.clone(),
            tls,
            metrics: ServerMetrics::register(&mut registry),
        };
        let addr = listener.local_addr()?;
        let cluster = Cluster {
            sts,
            addr,
            pki,
            shutdown,
            registry,
            _dir: dir,
        };
        Ok((cluster, listener, deps))
    }
}

/// Asks for every request's credentials once, 64 at a time over
/// `channels`, each retried (every 20 ms, up to `tries` times) while
/// prefetch or the first sync may still be running: afterwards every
/// identity is cached and every pod is in the servers' caches.
pub async fn ask_every_pod_once(
    channels: &[Channel],
    requests: Arc<Vec<kiam::proto::GetPodCredentialsRequest>>,
    tries: u32,
) -> Result<()> {
    let mut tasks = Vec::new();
    for w in 0..64 {
        let requests = requests.clone();
        let mut client = KiamServiceClient::new(channels[w % channels.len()].clone());
        tasks.push(tokio::spawn(async move {
            for r in requests.iter().skip(w).step_by(64) {
                let mut tried = 0;
                while let Err(e) = client.get_pod_credentials(r.clone()).await {
                    tried += 1;
                    anyhow::ensure!(tried < tries, "warming {}: {e}", r.ip);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}
