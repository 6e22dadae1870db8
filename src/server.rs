//! `kiam server`: answers agents over gRPC/mTLS only after the Pod and
//! Namespace caches have completed their first full sync.
//!
//! Data flow: the Pod watcher ([`pods`]) keeps a small projection of each Pod
//! indexed by IP and by role identity and tells the prefetcher when a Pod with
//! a role appears; [`credentials`] fetches through [`sts`] with one call in
//! flight per identity; [`grpc`] answers agents by combining [`pods`],
//! [`namespaces`] and [`policy`], and records [`events`] on the Pod.

pub mod config;
pub mod credentials;
pub mod events;
pub mod grpc;
pub mod namespaces;
pub mod pods;
pub mod policy;
pub mod sts;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::cli::ServerArgs;
use crate::proto::kiam_service_server::KiamServiceServer;
use crate::tls::{incoming, ServerTls, TlsFiles};
use crate::Fatal;
use config::{BaseArn, ServerConfig};
use credentials::{CacheConfig, CredentialCache};
use events::EventRecorder;
use grpc::{GrpcMetrics, KiamGrpc, Service};
use namespaces::NamespaceCache;
use pods::{PodCache, PodCacheConfig, PodInfo};
use policy::{ArnResolver, Decision, NamespacePolicyConfig};
use sts::{AssumeRole, SessionTags};

/// What the server talks to; tests pass the in-memory API server and a fake STS.
pub struct Deps {
    pub kube: kube::Client,
    pub sts: Arc<dyn AssumeRole>,
    pub resolver: ArnResolver,
    pub events: EventRecorder,
}

/// A built server: caches are watching, the prefetcher runs; call
/// [`Server::serve`] to answer agents.
pub struct Server {
    service: Arc<Service>,
    config: ServerConfig,
    shutdown: CancellationToken,
}

impl Server {
    /// Starts the caches, the credential cache and the prefetcher. Must run
    /// inside a tokio runtime. Everything stops when `shutdown` is cancelled.
    pub fn build(
        config: &ServerConfig,
        deps: Deps,
        registry: &mut Registry,
        shutdown: CancellationToken,
    ) -> Result<Server, Fatal> {
        crate::ensure_crypto_provider();
        let resolver = Arc::new(deps.resolver);
        let ns_config = NamespacePolicyConfig::new(
            config.strict_namespace_regexp,
            config.default_permitted_regexp.as_deref(),
        )
        .map_err(|e| Fatal::Usage(e.to_string()))?;
        let (pods, prefetch_rx) = PodCache::spawn(
            deps.kube.clone(),
            resolver.clone(),
            PodCacheConfig {
                session: config.session.clone(),
                prefetch_buffer_size: config.prefetch_buffer_size,
                resync: config.sync,
            },
            registry,
        );
        let namespaces = NamespaceCache::spawn(deps.kube.clone(), ns_config, config.sync);
        let in_use_pods = pods.clone();
        let credentials = CredentialCache::new(
            deps.sts,
            CacheConfig::from_server(config),
            Arc::new(move |id| in_use_pods.identity_in_use(id)),
            registry,
            shutdown.clone(),
        );
        let service = Arc::new(Service {
            pods,
            namespaces,
            resolver,
            credentials,
            events: deps.events,
            session: config.session.clone(),
            session_tags: config.session_tags,
            ready: Arc::new(AtomicBool::new(false)),
            metrics: GrpcMetrics::server(registry),
        });
        tokio::spawn(become_ready(service.clone(), shutdown.clone()));
        tokio::spawn(prefetch(service.clone(), prefetch_rx, shutdown.clone()));
        Ok(Server {
            service,
            config: config.clone(),
            shutdown,
        })
    }

    /// True once the first full sync of Pods and Namespaces completed.
    pub fn is_ready(&self) -> bool {
        self.service.ready.load(Ordering::Acquire)
    }

    /// Answers agents on `listener` over mutual TLS until `shutdown`.
    pub async fn serve(self, listener: TcpListener, tls: ServerTls) -> Result<(), Fatal> {
        let addr = listener.local_addr().ok();
        tracing::info!(addr = ?addr, "kiam server listening (answers once caches have synced)");
        let c = &self.config;
        let shutdown = self.shutdown.clone();
        tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(c.keepalive_time).filter(|d| !d.is_zero()))
            .http2_keepalive_timeout(Some(c.keepalive_timeout))
            .max_connection_age(c.max_connection_age)
            .max_connection_age_grace(c.max_connection_age_grace)
            .tcp_nodelay(true)
            .add_service(KiamServiceServer::new(KiamGrpc(self.service.clone())))
            .serve_with_incoming_shutdown(incoming(listener, tls), shutdown.cancelled_owned())
            .await
            .map_err(|e| Fatal::Failed(format!("gRPC server failed: {e}")))?;
        tracing::info!("kiam server stopped");
        Ok(())
    }
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

/// Fetches credentials for pods as they appear, before they ask — but only
/// for roles their namespace permits, so a forbidden annotation costs no STS call.
async fn prefetch(
    service: Arc<Service>,
    mut rx: mpsc::Receiver<PodInfo>,
    shutdown: CancellationToken,
) {
    tokio::select! {
        _ = service.namespaces.wait_synced() => {}
        _ = shutdown.cancelled() => return,
    }
    loop {
        let pod = tokio::select! {
            pod = rx.recv() => match pod { Some(p) => p, None => return },
            _ = shutdown.cancelled() => return,
        };
        let Some(role) = pod.role.as_deref() else {
            continue;
        };
        let ns = match service.namespaces.find(&pod.namespace).await {
            Ok(ns) => ns,
            Err(e) => {
                tracing::debug!(pod.namespace = %pod.namespace, error = %e, "not prefetching: namespace unreadable");
                continue;
            }
        };
        match policy::check(&pod, role, ns.as_deref(), &service.resolver) {
            Decision::Allowed { .. } => {}
            Decision::Forbidden { explanation, .. } => {
                tracing::debug!(pod.namespace = %pod.namespace, pod.name = %pod.name, %explanation, "not prefetching");
                continue;
            }
        }
        match service.pods.identity_for(&pod) {
            Ok(Some(identity)) => {
                let tags = service.session_tags.then(|| SessionTags::for_pod(&pod));
                tracing::debug!(pod.namespace = %pod.namespace, pod.name = %pod.name, pod.iam.role = %identity.role_arn, "prefetching credentials");
                service.credentials.prefetch(&identity, tags.as_ref());
            }
            Ok(None) => {}
            Err(e) => {
                tracing::debug!(pod.namespace = %pod.namespace, pod.name = %pod.name, error = %e, "not prefetching")
            }
        }
    }
}

/// Builds a Kubernetes client from `--kubeconfig` (empty: in-cluster, then
/// the usual KUBECONFIG / ~/.kube/config inference).
pub async fn kube_client(kubeconfig: Option<&std::path::Path>) -> Result<kube::Client, Fatal> {
    crate::ensure_crypto_provider();
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| Fatal::Usage(format!("--kubeconfig {}: {e}", path.display())))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .map_err(|e| Fatal::Usage(format!("--kubeconfig {}: {e}", path.display())))?
        }
        None => kube::Config::infer().await.map_err(|e| {
            Fatal::Failed(format!(
                "no in-cluster Kubernetes config and no --kubeconfig: {e}"
            ))
        })?,
    };
    kube::Client::try_from(config).map_err(|e| Fatal::Failed(format!("Kubernetes client: {e}")))
}

/// Reads the base ARN from the instance profile in IMDS `iam/info`
/// (`--role-base-arn-autodetect`). Honours `AWS_EC2_METADATA_SERVICE_ENDPOINT`.
pub async fn autodetect_base_arn() -> Result<ArnResolver, Fatal> {
    let imds = aws_config::imds::Client::builder().build();
    let info = imds.get("/latest/meta-data/iam/info").await.map_err(|e| {
        Fatal::Failed(format!(
            "--role-base-arn-autodetect: reading iam/info from the EC2 metadata service: {e}"
        ))
    })?;
    let v: serde_json::Value = serde_json::from_str(info.as_ref()).map_err(|e| {
        Fatal::Failed(format!(
            "--role-base-arn-autodetect: iam/info is not JSON: {e}"
        ))
    })?;
    let arn = v
        .get("InstanceProfileArn")
        .and_then(|a| a.as_str())
        .ok_or_else(|| {
            Fatal::Failed("--role-base-arn-autodetect: iam/info has no InstanceProfileArn".into())
        })?;
    ArnResolver::from_instance_profile(arn).map_err(|e| Fatal::Failed(e.to_string()))
}

/// `kiam server`: validate, load, bind, serve until SIGTERM.
pub async fn main(args: ServerArgs) -> Result<(), Fatal> {
    let config = ServerConfig::from_args(&args)?;
    let mut registry = Registry::default();
    let tls = ServerTls::load(TlsFiles::from(&args.tls), &mut registry)
        .map_err(|e| Fatal::Usage(e.to_string()))?;
    if args.check_config {
        println!("configuration ok");
        return Ok(());
    }
    if let Some(w) = config.freshness_warning() {
        tracing::warn!("{w}");
    }
    let resolver = match &config.base_arn {
        BaseArn::Fixed(base) => ArnResolver::new(base).map_err(|e| Fatal::Usage(e.to_string()))?,
        BaseArn::Autodetect => autodetect_base_arn().await?,
    };
    tracing::info!(base_arn = resolver.base(), "resolving role names");
    let kube = kube_client(config.kubeconfig.as_deref()).await?;
    let sts = sts::StsClient::from_env(
        config.region.as_deref().unwrap_or_default(),
        config.assume_role_arn.as_deref().unwrap_or_default(),
    )
    .await
    .map_err(|e| Fatal::Failed(e.to_string()))?;
    let listener = TcpListener::bind(&config.bind)
        .await
        .map_err(|e| Fatal::Failed(format!("--bind {}: {e}", config.bind)))?;
    let metrics_listener = crate::telemetry::bind_metrics(&args.telemetry.prometheus_listen_addr)
        .await
        .map_err(|e| {
            Fatal::Failed(format!(
                "--prometheus-listen-addr {}: {e}",
                args.telemetry.prometheus_listen_addr
            ))
        })?;
    let shutdown = crate::shutdown::on_signal();
    let events = EventRecorder::new(kube.clone());
    let server = Server::build(
        &config,
        Deps {
            kube,
            sts: Arc::new(sts),
            resolver,
            events,
        },
        &mut registry,
        shutdown.clone(),
    )?;
    let registry = Arc::new(registry);
    if let Some(l) = metrics_listener {
        tokio::spawn(crate::telemetry::serve_metrics(
            l,
            registry,
            shutdown.clone(),
        ));
    }
    server.serve(listener, tls).await
}
