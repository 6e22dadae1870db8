//! `kiam server`: answers agents over gRPC/mTLS only after the Pod and
//! Namespace caches have completed their first full sync.
//!
//! The surprise: who a pod is gets decided once. The [`policy::Policy`]
//! built here from the validated flags is shared by the pod cache (which
//! identity each pod uses, for prefetch and for keeping credentials
//! refreshed), the prefetcher and the gRPC service; an allowed request
//! carries the identity the policy built to the credential cache, and
//! nothing downstream resolves a role again.
//!
//! Data flow: [`pods`] watches Pods (projected by `podview` into
//! [`model::PodInfo`], indexed by `index`, driven by `watch`) and sends
//! each new pod with a role, with its identity, to the prefetcher;
//! [`namespaces`] keeps each namespace's compiled `permitted` regex;
//! `grpc` answers agents: pod by IP -> [`policy`] decision -> [`credentials`]
//! -> [`sts`], recording [`events`] on the Pod; [`peers`] decides which
//! pods this server prefetches when servers share that by pod IP; on the container
//! credentials path the pod is the one a verified [`token`] names instead. `explain` answers `kiam
//! explain` from the same caches and policy, reading only.

pub mod config;
pub mod credentials;
mod error;
pub mod events;
mod explain;
mod grpc;
mod index;
pub mod model;
pub mod namespaces;
pub mod peers;
pub mod pods;
mod podview;
pub mod policy;
pub mod sts;
pub mod token;
mod watch;

pub use error::ServerError;

pub use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::cli::ServerArgs;
use crate::grpc_metrics::GrpcMetrics;
use crate::proto::kiam_service_server::KiamServiceServer;
use crate::tls::{incoming, ServerTls, TlsFiles};
use config::{BaseArn, ServerConfig};
use credentials::{CredentialCache, CredentialMetrics};
use events::EventRecorder;
use grpc::{KiamGrpc, Service};
use model::Prefetch;
use namespaces::NamespaceCache;
use peers::{Peers, PeersMetrics};
use pods::{PodCache, PodCacheConfig, PodCacheMetrics};
use policy::ArnResolver;
use sts::AssumeRole;

/// How long shutdown waits for pending Event counts to be written.
const EVENT_FLUSH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

/// Every metric family the server exports, registered once before it runs
/// (kiam's names, so its Grafana dashboard keeps working).
#[derive(Clone)]
pub struct ServerMetrics {
    grpc: GrpcMetrics,
    credentials: CredentialMetrics,
    pods: PodCacheMetrics,
    peers: PeersMetrics,
}

impl ServerMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        ServerMetrics {
            grpc: GrpcMetrics::server(registry),
            credentials: CredentialMetrics::register(registry),
            pods: PodCacheMetrics::register(registry),
            peers: PeersMetrics::register(registry),
        }
    }
}

/// What [`run`] talks to; tests pass the in-memory API server and a fake STS.
pub struct Deps {
    pub config: ServerConfig,
    pub kube: kube::Client,
    pub sts: Arc<dyn AssumeRole>,
    pub events: EventRecorder,
    pub tls: ServerTls,
    pub metrics: ServerMetrics,
}

/// Answers agents on `listener` over mutual TLS until `shutdown`: resolves
/// the base ARN (`--role-base-arn-autodetect` asks the EC2 metadata
/// service), starts the caches, the credential cache and the prefetcher,
/// and serves once the caches have synced (until then every call is
/// UNAVAILABLE, so agents try another server). Must run inside a tokio
/// runtime; everything it started stops with `shutdown`.
pub async fn run(
    listener: TcpListener,
    deps: Deps,
    shutdown: CancellationToken,
) -> Result<(), ServerError> {
    crate::ensure_crypto_provider();
    let Deps {
        config,
        kube,
        sts,
        events,
        tls,
        metrics,
    } = deps;
    let resolver = match &config.base_arn {
        BaseArn::Fixed(resolver) => resolver.clone(),
        BaseArn::Autodetect => autodetect_base_arn().await?,
    };
    tracing::info!(base_arn = resolver.base(), "resolving role names");
    let policy = Arc::new(config.policy(resolver));
    let (pods, prefetch_rx) = PodCache::spawn(
        kube.clone(),
        policy.clone(),
        PodCacheConfig {
            prefetch_buffer_size: config.prefetch_buffer_size,
            confirmations_per_second: config.pod_confirmations_per_second,
            resync: config.sync,
        },
        metrics.pods,
    );
    let tokens = token::TokenVerifier::new(kube.clone(), &config.token_audience);
    let namespaces = NamespaceCache::spawn(kube, policy.clone(), config.sync);
    // Self among --prefetch-peers: --advertise-ip and the port actually
    // bound (tests bind port 0).
    let port = listener.local_addr().map(|a| a.port()).unwrap_or_default();
    let peers = Peers::new(config.peers.clone(), port, metrics.peers);
    tokio::spawn(peers.clone().run(pods.clone(), shutdown.clone()));
    let in_use_pods = pods.clone();
    let in_use_peers = peers.clone();
    let credentials = CredentialCache::new(
        sts,
        config.cache(),
        // Kept fresh: used by a live pod, and while sharing prefetch, by a
        // live pod this server owns (not one an agent failed over for).
        Arc::new(move |id| {
            in_use_pods.identity_in_use(id) && in_use_peers.in_use(id, &in_use_pods)
        }),
        metrics.credentials,
        shutdown.clone(),
    );
    let service = Arc::new(Service {
        pods,
        namespaces,
        policy,
        credentials,
        events,
        tokens,
        ready: Arc::new(AtomicBool::new(false)),
        metrics: metrics.grpc,
    });
    tokio::spawn(become_ready(service.clone(), shutdown.clone()));
    tokio::spawn(prefetch(
        service.clone(),
        peers,
        prefetch_rx,
        shutdown.clone(),
    ));

    let addr = listener.local_addr().ok();
    tracing::info!(addr = ?addr, "kiam server listening (answers once caches have synced)");
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(config.keepalive_time).filter(|d| !d.is_zero()))
        .http2_keepalive_timeout(Some(config.keepalive_timeout))
        .max_connection_age(config.max_connection_age)
        .max_connection_age_grace(config.max_connection_age_grace)
        .tcp_nodelay(true)
        .add_service(KiamServiceServer::new(KiamGrpc(service.clone())))
        .serve_with_incoming_shutdown(incoming(listener, tls), shutdown.cancelled_owned())
        .await
        .map_err(|e| ServerError::Serve(e.to_string()))?;
    // Repeated Events are written at most every 10 s; write what is counted
    // but not yet written, briefly, so a restart loses no count.
    let flushed = tokio::time::timeout(EVENT_FLUSH_TIMEOUT, service.events.flush()).await;
    if flushed.is_err() {
        tracing::warn!("gave up writing pending Event counts at shutdown");
    }
    tracing::info!("kiam server stopped");
    Ok(())
}

async fn become_ready(service: Arc<Service>, shutdown: CancellationToken) {
    let synced = async {
        service.pods.wait_synced().await;
        service.namespaces.wait_synced().await;
    };
    tokio::select! {
        _ = synced => {
            service.ready.store(true, Ordering::Release);
            tracing::info!(pods = service.pods.len(), namespaces = service.namespaces.len(), "caches synced; serving");
        }
        _ = shutdown.cancelled() => {}
    }
}

/// Fetches credentials for pods as they appear, before they ask: the pod
/// cache already decided each pod's identity; here only its namespace is
/// checked, so a forbidden annotation costs no STS call. While servers
/// share prefetch (`--prefetch-peers`), only pods whose IP this server owns
/// are fetched; the others are their owners' (agents ask owners first).
async fn prefetch(
    service: Arc<Service>,
    peers: Arc<Peers>,
    mut rx: mpsc::Receiver<Prefetch>,
    shutdown: CancellationToken,
) {
    // Membership first, so the initial list of pods is already shared.
    tokio::select! {
        _ = async { tokio::join!(service.namespaces.wait_synced(), peers.refresh()) } => {}
        _ = shutdown.cancelled() => return,
    }
    loop {
        let next = tokio::select! {
            next = rx.recv() => match next { Some(p) => p, None => return },
            _ = shutdown.cancelled() => return,
        };
        if !peers.should_prefetch(&next) {
            tracing::trace!(pod.namespace = %next.pod.namespace, pod.name = %next.pod.name,
                "not prefetching: another server owns the pod's IP");
            continue;
        }
        let Prefetch { pod, identity } = next;
        let ns = match service.namespaces.find(&pod.namespace).await {
            Ok(ns) => ns,
            Err(e) => {
                tracing::debug!(pod.namespace = %pod.namespace, error = %e, "not prefetching: namespace unreadable");
                continue;
            }
        };
        if let Err(why) = policy::permitted_in(&pod.namespace, ns.as_deref(), &identity.role_arn) {
            tracing::debug!(pod.namespace = %pod.namespace, pod.name = %pod.name, %why, "not prefetching");
            continue;
        }
        tracing::debug!(pod.namespace = %pod.namespace, pod.name = %pod.name, pod.iam.role = %identity.role_arn, "prefetching credentials");
        service.credentials.prefetch(&identity);
    }
}

/// Builds a Kubernetes client from `--kubeconfig` (empty: in-cluster, then
/// the usual KUBECONFIG / ~/.kube/config inference).
pub async fn kube_client(
    kubeconfig: Option<&std::path::Path>,
) -> Result<kube::Client, ServerError> {
    crate::ensure_crypto_provider();
    let config = match kubeconfig {
        Some(path) => {
            let bad = |e: &dyn std::fmt::Display| ServerError::Kubeconfig {
                path: path.display().to_string(),
                reason: e.to_string(),
            };
            let kc = kube::config::Kubeconfig::read_from(path).map_err(|e| bad(&e))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .map_err(|e| bad(&e))?
        }
        None => kube::Config::infer()
            .await
            .map_err(|e| ServerError::NoKubeConfig(e.to_string()))?,
    };
    kube::Client::try_from(config).map_err(|e| ServerError::KubeClient(e.to_string()))
}

/// Reads the base ARN from the instance profile in IMDS `iam/info`
/// (`--role-base-arn-autodetect`). Honours `AWS_EC2_METADATA_SERVICE_ENDPOINT`.
async fn autodetect_base_arn() -> Result<ArnResolver, ServerError> {
    let imds = aws_config::imds::Client::builder().build();
    let info = imds.get("/latest/meta-data/iam/info").await.map_err(|e| {
        ServerError::Autodetect(format!(
            "reading iam/info from the EC2 metadata service: {e}"
        ))
    })?;
    let v: serde_json::Value = serde_json::from_str(info.as_ref())
        .map_err(|e| ServerError::Autodetect(format!("iam/info is not JSON: {e}")))?;
    let arn = v
        .get("InstanceProfileArn")
        .and_then(|a| a.as_str())
        .ok_or_else(|| ServerError::Autodetect("iam/info has no InstanceProfileArn".into()))?;
    ArnResolver::from_instance_profile(arn).map_err(|e| ServerError::Autodetect(e.to_string()))
}

/// `kiam server`: validate, load, bind, serve until SIGTERM.
pub async fn main(args: ServerArgs) -> Result<(), ServerError> {
    let config = ServerConfig::from_args(&args)?;
    let mut registry = Registry::default();
    let tls = ServerTls::load(TlsFiles::from(&args.tls), &mut registry)?;
    if args.check_config {
        println!("configuration ok");
        return Ok(());
    }
    if let Some(w) = config.freshness_warning() {
        tracing::warn!("{w}");
    }
    let kube = kube_client(config.kubeconfig.as_deref()).await?;
    let sts =
        sts::StsClient::from_env(config.region.as_deref(), config.assume_role_arn.as_deref()).await;
    let listener = TcpListener::bind(&config.bind)
        .await
        .map_err(|source| ServerError::Bind {
            addr: config.bind.clone(),
            source,
        })?;
    let metrics_addr = &args.telemetry.prometheus_listen_addr;
    let metrics_listener =
        crate::telemetry::bind_metrics(metrics_addr)
            .await
            .map_err(|source| ServerError::Metrics {
                addr: metrics_addr.clone(),
                source,
            })?;
    let shutdown = crate::shutdown::on_signal();
    let metrics = ServerMetrics::register(&mut registry);
    if let Some(l) = metrics_listener {
        tokio::spawn(crate::telemetry::serve_metrics(
            l,
            Arc::new(registry),
            shutdown.clone(),
        ));
    }
    let deps = Deps {
        config,
        events: EventRecorder::new(kube.clone()),
        kube,
        sts: Arc::new(sts),
        tls,
        metrics,
    };
    run(listener, deps, shutdown).await
}
