//! `kiam agent`: answers pods' requests to the EC2 metadata API on each node.
//!
//! The surprise: the agent never decides who a pod is from anything the pod
//! sends. Identity is the TCP source address of the connection (the
//! `--iptables` DNAT rule preserves it), and everything else — headers, the
//! path's spelling, IMDSv2 tokens — is checked against it, never trusted.
//!
//! - [`metadata`]: the HTTP router (kiam's routes, IMDSv2, allow-listed proxy).
//! - [`path`]: request paths normalised, and which ones name IAM data.
//! - `documents`: the JSON answers (credentials, `iam/info`).
//! - `retry`: asking the servers again inside a request's deadline.
//! - [`metrics`]: kiam's `kiam_metadata_*` metrics and the agent's own.
//! - [`imdsv2`]: stateless IMDSv2 tokens bound to the caller's IP.
//! - [`proxy`]: the client for `--metadata-endpoint`.
//! - [`client`]: the pool of kiam servers.
//! - [`link`]: open connections per server, to tell slow from unreachable.
//! - [`server_address`]: `--server-address` parsed and resolved.
//! - [`fallback`]: last good answers, served only while no server answers.
//! - [`iptables`]: the DNAT rules for `169.254.169.254:80` and (ip6tables)
//!   `[fd00:ec2::254]:80`.
//! - [`taint`]: the node start-up gate (`--node-startup-taint`).

pub mod client;
mod documents;
pub mod fallback;
pub mod imdsv2;
pub mod iptables;
pub mod link;
pub mod metadata;
pub mod metrics;
pub mod path;
pub mod proxy;
mod retry;
pub mod server_address;
mod sources;
pub mod taint;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::connect_info::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::registry::Registry;
use regex::Regex;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::{Channel, Endpoint};
use tower::ServiceExt;

use crate::cli::AgentArgs;
use crate::tls::{ClientTls, TlsError, TlsFiles};
use client::{Connect, Pool, PoolConfig};
use link::Link;
use metadata::{Config, RouterContext};
use metrics::Metrics;
use proxy::Upstream;
use server_address::SystemResolver;
use sources::{refuse, PerSource};

/// Largest request head accepted (hyper's minimum buffer); bigger heads get 431.
const MAX_HEAD_BYTES: usize = 16 * 1024;
/// A client must send its request head within this time (slow clients).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long in-flight requests may take to finish after shutdown starts.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Open connections beyond this wait in the kernel's backlog: a flood of
/// idle or slow clients cannot exhaust the agent's file descriptors.
const MAX_CONNECTIONS: usize = 4096;
/// Bound on one exchange with `--metadata-endpoint`.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);

/// Why the agent could not start. `Usage` variants are bad flags or files
/// (exit 64).
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("--allow-route-regexp {0:?} is not a valid regular expression: {1}")]
    AllowRoute(String, String),
    #[error("--host {0:?} is not an IP address")]
    Host(String),
    #[error("--host-ipv6 {0:?} is not a comma-separated list of IP addresses")]
    HostIpv6(String),
    #[error(transparent)]
    Endpoint(#[from] proxy::EndpointError),
    #[error(transparent)]
    ServerAddress(#[from] server_address::AddressError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("--port {port}: cannot listen: {source}")]
    Bind { port: u16, source: std::io::Error },
    #[error("--prometheus-listen-addr {addr:?}: cannot listen: {source}")]
    Metrics {
        addr: String,
        source: std::io::Error,
    },
    /// A bad `--host-interface`/`--host` for the rule (usage error).
    #[error("{0}")]
    IptablesRule(String),
    #[error("{0}")]
    Iptables(String),
    /// A bad `--node-startup-taint`/`--node-name` (usage error).
    #[error(transparent)]
    StartupTaint(taint::TaintError),
    #[error("agent server failed: {0}")]
    Serve(std::io::Error),
}

impl AgentError {
    /// Bad flags or files, reported before any port is bound.
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            AgentError::AllowRoute(..)
                | AgentError::Host(_)
                | AgentError::HostIpv6(_)
                | AgentError::Endpoint(_)
                | AgentError::ServerAddress(_)
                | AgentError::Tls(_)
                | AgentError::IptablesRule(_)
                | AgentError::StartupTaint(_)
        )
    }
}

impl From<AgentError> for crate::Fatal {
    fn from(e: AgentError) -> Self {
        if e.is_usage() {
            crate::Fatal::Usage(e.to_string())
        } else {
            crate::Fatal::Failed(e.to_string())
        }
    }
}

/// The flags that need checking, checked; no I/O.
#[derive(Debug)]
pub struct Validated {
    pub config: Config,
    /// The `--iptables` rule, when asked for.
    pub rule: Option<iptables::IptablesRule>,
    /// The ip6tables rule for `[fd00:ec2::254]`, when `--iptables` is asked
    /// for and `--host-ipv6` names an IPv6 address.
    pub rule_v6: Option<iptables::IptablesRule>,
    /// The rules for the container credentials address (IPv4, and IPv6
    /// with `--host-ipv6`), with `--iptables-container-credentials`.
    pub container_rules: Vec<iptables::IptablesRule>,
    pub pool: PoolConfig,
    /// The node start-up gate, when `--node-startup-taint` is set.
    pub startup_taint: Option<taint::StartupTaint>,
}

/// Checks every agent flag, naming the flag at fault.
pub fn validate(args: &AgentArgs) -> Result<Validated, AgentError> {
    let allow_route = Regex::new(&args.allow_route_regexp).map_err(|e| {
        // regex's message spans lines (pattern, caret, reason): keep the reason.
        let text = e.to_string();
        let reason = text
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("invalid");
        AgentError::AllowRoute(
            args.allow_route_regexp.clone(),
            reason.trim_start_matches("error: ").to_string(),
        )
    })?;
    let host = args
        .host
        .trim()
        .parse::<IpAddr>()
        .map_err(|_| AgentError::Host(args.host.clone()))?;
    // Parsed here only for the error; the router builds its own client.
    Upstream::new(&args.metadata_endpoint, UPSTREAM_TIMEOUT)?;
    let node_name = match args.node_name.trim() {
        "" => std::env::var("NODE_NAME").unwrap_or_default(),
        name => name.to_string(),
    };
    let mut pool = PoolConfig::from_args(&args.client)?;
    pool.node = Some(node_name.clone()).filter(|n| !n.is_empty());
    for t in &pool.targets {
        crate::tls::server_name_of(&t.to_string())?;
    }
    let mut config = Config::new(allow_route);
    config.allow_ip_query = args.allow_ip_query;
    config.require_imdsv2 = args.require_imdsv2;
    config.stale_window = args.stale_credentials_window;
    let host_ipv6 = host_ipv6(&args.host_ipv6)?;
    let rule = if args.iptables {
        Some(
            iptables::IptablesRule::new(host, args.port, &args.host_interface)
                .map_err(|e| AgentError::IptablesRule(e.to_string()))?,
        )
    } else {
        None
    };
    let rule_v6 = match host_ipv6 {
        Some(ip) if args.iptables => Some(
            iptables::IptablesRule::new_v6(ip, args.port, &args.host_interface)
                .map_err(|e| AgentError::IptablesRule(e.to_string()))?,
        ),
        _ => None,
    };
    if args.iptables_container_credentials && !args.iptables {
        return Err(AgentError::IptablesRule(
            "--iptables-container-credentials needs --iptables".into(),
        ));
    }
    let mut container_rules = Vec::new();
    if args.iptables_container_credentials {
        let rule = |r: Result<_, iptables::IptablesError>| {
            r.map_err(|e| AgentError::IptablesRule(e.to_string()))
        };
        container_rules.push(rule(iptables::IptablesRule::container_credentials(
            host,
            args.port,
            &args.host_interface,
        ))?);
        // Host-network Pods' connections never cross a Pod interface.
        container_rules.push(rule(iptables::IptablesRule::container_credentials_local(
            host, args.port,
        ))?);
        if let Some(ip) = host_ipv6 {
            container_rules.push(rule(iptables::IptablesRule::container_credentials_v6(
                ip,
                args.port,
                &args.host_interface,
            ))?);
            container_rules.push(rule(iptables::IptablesRule::container_credentials_local(
                ip, args.port,
            ))?);
        }
    }
    let startup_taint = taint::StartupTaint::new(&args.node_startup_taint, &node_name)
        .map_err(AgentError::StartupTaint)?;
    Ok(Validated {
        config,
        rule,
        rule_v6,
        container_rules,
        pool,
        startup_taint,
    })
}

/// The first IPv6 address of `--host-ipv6` (IPv4 entries are skipped, so
/// the `status.podIPs` of a host-network Pod on an IPv4-only node means
/// "no IPv6").
fn host_ipv6(value: &str) -> Result<Option<IpAddr>, AgentError> {
    let mut first = None;
    for entry in value.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let ip: IpAddr = entry
            .parse()
            .map_err(|_| AgentError::HostIpv6(value.to_string()))?;
        if ip.is_ipv6() && first.is_none() {
            first = Some(ip);
        }
    }
    Ok(first)
}

/// Binds the metadata port on IPv4 (which must work) and on IPv6 (which
/// may not: a node with IPv6 disabled gets one log line). Two sockets, the
/// IPv6 one `IPV6_V6ONLY`, rather than one dual-stack socket: IPv4 must not
/// depend on the kernel having IPv6, and a dual-stack `[::]` socket would
/// take the IPv4 port too.
pub async fn bind(port: u16) -> std::io::Result<Vec<TcpListener>> {
    let v4 = TcpListener::bind(("0.0.0.0", port)).await?;
    // The same port as the IPv4 socket got (tests ask for port 0).
    let port = v4.local_addr()?.port();
    let mut listeners = vec![v4];
    match bind_v6_only(port) {
        Ok(v6) => listeners.push(v6),
        Err(e) => tracing::warn!(
            port, error = %e,
            "cannot listen on IPv6 (is IPv6 disabled on this node?): serving IPv4 only"
        ),
    }
    Ok(listeners)
}

fn bind_v6_only(port: u16) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::IPV6, Type::STREAM, Some(Protocol::TCP))?;
    socket.set_only_v6(true)?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port)).into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

/// Channels to kiam servers over mutual TLS, verifying each server as the
/// host named in `--server-address`.
pub struct TlsConnect(pub ClientTls);

impl Connect for TlsConnect {
    fn channel(&self, endpoint: Endpoint, addr: SocketAddr, host: &str, link: &Link) -> Channel {
        match self.0.connector(host) {
            Ok(c) => endpoint.connect_with_connector_lazy(link.track(c)),
            Err(e) => {
                // Names are checked at start-up; this is unreachable in
                // practice. A channel that cannot connect keeps the pool
                // honest (the member just fails over).
                tracing::error!(server = %addr, error = %e, "cannot build TLS connector");
                Endpoint::from_static("http://0.0.0.0:1").connect_lazy()
            }
        }
    }
}

/// Runs the agent from its flags until SIGINT/SIGTERM. Flags and files are
/// checked before any port is bound. Logging is the caller's to set up.
pub async fn main(args: AgentArgs) -> Result<(), AgentError> {
    let Validated {
        config,
        rule,
        rule_v6,
        container_rules,
        pool: pool_cfg,
        startup_taint,
    } = validate(&args)?;
    let mut registry = Registry::default();
    let tls = ClientTls::load(TlsFiles::from(&args.tls), &mut registry)?;
    if args.check_config {
        tracing::info!("configuration is valid");
        return Ok(());
    }

    let metrics_listener = crate::telemetry::bind_metrics(&args.telemetry.prometheus_listen_addr)
        .await
        .map_err(|source| AgentError::Metrics {
            addr: args.telemetry.prometheus_listen_addr.clone(),
            source,
        })?;
    let listeners = bind(args.port).await.map_err(|source| AgentError::Bind {
        port: args.port,
        source,
    })?;

    let metrics = Metrics::new(&mut registry);
    let client_metrics = crate::grpc_metrics::GrpcMetrics::client(&mut registry);
    let iptables_metrics = iptables::IptablesMetrics::register(&mut registry);
    let taint_metrics = taint::TaintMetrics::register(&mut registry);
    let pool: Arc<dyn client::KiamClient> = Arc::new(
        Pool::new(
            pool_cfg,
            Arc::new(TlsConnect(tls)),
            Arc::new(SystemResolver),
            client_metrics,
        )
        .await,
    );
    let upstream = Upstream::new(&args.metadata_endpoint, UPSTREAM_TIMEOUT)?;
    metrics.imdsv2_required(config.require_imdsv2);
    let ctx = RouterContext::new(config, pool.clone(), Arc::new(upstream), metrics);

    let shutdown = crate::shutdown::on_signal();
    let registry = Arc::new(registry);
    if let Some(l) = metrics_listener {
        tokio::spawn(crate::telemetry::serve_metrics(
            l,
            registry.clone(),
            shutdown.child_token(),
        ));
    }

    // The start-up gate waits for the rules (when there are any) and a
    // healthy server, then takes the taint off the node.
    let (rule_in_place, rule_told) = match (&startup_taint, &rule) {
        (Some(_), Some(_)) => {
            let (tell, told) = tokio::sync::oneshot::channel();
            (Some(tell), Some(told))
        }
        _ => (None, None),
    };
    let (rule_v6_in_place, rule_told) = match (rule_told, &rule_v6) {
        (Some(told_v4), Some(_)) => {
            let (tell_v6, told_v6) = tokio::sync::oneshot::channel::<()>();
            let (tell, told) = tokio::sync::oneshot::channel();
            tokio::spawn(async move {
                if told_v4.await.is_ok() && told_v6.await.is_ok() {
                    let _ = tell.send(());
                }
            });
            (Some(tell_v6), Some(told))
        }
        (told, _) => (None, told),
    };
    if args.iptables && rule_v6.is_none() {
        tracing::info!(
            "--host-ipv6 names no IPv6 address: the IPv6 metadata address [fd00:ec2::254] is \
             not intercepted (where the instance has it enabled, IPv6 pods would reach the node's)"
        );
    }
    if let Some(startup_taint) = startup_taint {
        taint_metrics.gate_closed.set(1);
        tokio::spawn(taint::run_in_cluster(
            startup_taint,
            rule_told,
            pool,
            taint_metrics,
            shutdown.child_token(),
        ));
    }
    // The IPv6 rule is best effort: a node without ip6tables or its nat
    // table logs one line and serves IPv4. It ends at shutdown (after
    // removing its rule) like the IPv4 one; its errors never stop the agent.
    let iptables_v6_task = rule_v6.map(|rule| {
        tokio::spawn(iptables::maintain_if_available(
            rule,
            iptables::DEFAULT_CHECK_INTERVAL,
            args.iptables_remove,
            iptables_metrics.clone(),
            rule_v6_in_place,
            shutdown.child_token(),
        ))
    });
    // The container credentials rules are best effort like the IPv6 one:
    // the metadata path does not depend on them.
    let container_tasks: Vec<_> = container_rules
        .into_iter()
        .map(|rule| {
            tokio::spawn(iptables::maintain_if_available(
                rule,
                iptables::DEFAULT_CHECK_INTERVAL,
                args.iptables_remove,
                iptables_metrics.clone(),
                None,
                shutdown.child_token(),
            ))
        })
        .collect();
    let iptables_task = rule.map(|rule| {
        tokio::spawn(iptables::maintain(
            rule,
            iptables::DEFAULT_CHECK_INTERVAL,
            args.iptables_remove,
            iptables_metrics,
            rule_in_place,
            shutdown.child_token(),
        ))
    });

    tracing::info!(
        port = args.port,
        ipv6 = listeners.len() > 1,
        "agent listening"
    );
    let server = tokio::spawn(run_on(listeners, ctx, shutdown.clone()));
    // The rule task ends at shutdown (after removing the rule) or at once
    // if the rule cannot be added, which stops the agent as kiam did.
    let rule_result = match iptables_task {
        Some(task) => {
            let r = match task.await {
                Ok(r) => r.map_err(|e| AgentError::Iptables(e.to_string())),
                Err(e) => Err(AgentError::Iptables(e.to_string())),
            };
            shutdown.cancel();
            r
        }
        None => Ok(()),
    };
    for task in container_tasks {
        match task.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "the container credentials rule"),
            Err(e) => tracing::error!(error = %e, "the container credentials rule task failed"),
        }
    }
    if let Some(task) = iptables_v6_task {
        match task.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "the ip6tables rule"),
            Err(e) => tracing::error!(error = %e, "the ip6tables rule task failed"),
        }
    }
    let served = match server.await {
        Ok(r) => r.map_err(AgentError::Serve),
        Err(e) => Err(AgentError::Serve(std::io::Error::other(e))),
    };
    rule_result.and(served)
}

/// Serves the metadata API on `listener` until `shutdown`, then lets
/// in-flight requests finish (bounded by `DRAIN_TIMEOUT`).
pub async fn run(
    listener: TcpListener,
    ctx: Arc<RouterContext>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    run_on(vec![listener], ctx, shutdown).await
}

/// [`run`] on several listeners (IPv4 and IPv6) sharing one set of limits.
pub async fn run_on(
    listeners: Vec<TcpListener>,
    ctx: Arc<RouterContext>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = metadata::router(ctx.clone());
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_HEAD_BYTES)
        .keep_alive(true);
    let tracker = TaskTracker::new();
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let per_source = Arc::new(PerSource::default());
    let max_per_source = ctx.config().max_connections_per_source.max(1);
    loop {
        let slot = tokio::select! {
            _ = shutdown.cancelled() => break,
            s = slots.clone().acquire_owned() => s.expect("the semaphore is never closed"),
        };
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = accept_any(&listeners) => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Usually EMFILE: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let source = peer.ip().to_canonical();
        let Some(source_slot) = PerSource::take(&per_source, source, max_per_source) else {
            ctx.metrics().connection_refused();
            tracing::debug!(peer = %peer, limit = max_per_source, "too many open connections from one source; refusing");
            tracker.spawn(async move {
                let _slot = slot;
                refuse(stream, source, max_per_source).await;
            });
            continue;
        };
        let app = app.clone();
        let svc = hyper::service::service_fn(move |mut req: http::Request<Incoming>| {
            // The only source of identity: the TCP peer.
            req.extensions_mut().insert(ConnectInfo(peer));
            app.clone().oneshot(req)
        });
        let conn = http.serve_connection(TokioIo::new(stream), svc);
        let stop = shutdown.clone();
        tracker.spawn(async move {
            let _slots = (slot, source_slot);
            tokio::pin!(conn);
            let result = tokio::select! {
                r = conn.as_mut() => r,
                _ = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                tracing::debug!(peer = %peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listeners);
    tracker.close();
    if tokio::time::timeout(DRAIN_TIMEOUT, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            "in-flight requests did not finish within {DRAIN_TIMEOUT:?}; stopping anyway"
        );
    }
    Ok(())
}

/// The next connection on any of `listeners`.
async fn accept_any(listeners: &[TcpListener]) -> std::io::Result<(TcpStream, SocketAddr)> {
    let accepts = listeners.iter().map(|l| Box::pin(l.accept()));
    futures::future::select_all(accepts).await.0
}

#[cfg(test)]
mod ipv6_tests {
    use super::*;

    #[test]
    fn host_ipv6_takes_the_first_ipv6_address() {
        let v6 = |s: &str| host_ipv6(s).unwrap().map(|ip| ip.to_string());
        assert_eq!(v6(""), None);
        assert_eq!(v6("2001:2::1"), Some("2001:2::1".into()));
        // status.hostIPs of a dual-stack node, either family first.
        assert_eq!(v6("198.18.0.1,2001:2::1"), Some("2001:2::1".into()));
        assert_eq!(v6(" 2001:2::1 , 198.18.0.1"), Some("2001:2::1".into()));
        assert_eq!(v6("2001:2::1,2001:2::2"), Some("2001:2::1".into()));
        // A single-stack IPv4 node: no IPv6, not an error.
        assert_eq!(v6("198.18.0.1"), None);
        let err = host_ipv6("2001:2::1,not-an-ip").unwrap_err();
        assert!(err.is_usage());
        assert!(err.to_string().contains("--host-ipv6"), "{err}");
    }

    #[tokio::test]
    async fn the_agent_listens_on_ipv4_and_ipv6_on_one_port() {
        let listeners = bind(0).await.unwrap();
        let v4 = listeners[0].local_addr().unwrap();
        assert!(v4.is_ipv4());
        // Without IPv6 in the kernel there is nothing more to check.
        let kernel_has_ipv6 = std::path::Path::new("/proc/net/if_inet6").exists();
        assert_eq!(listeners.len(), if kernel_has_ipv6 { 2 } else { 1 });
        if let Some(v6) = listeners.get(1) {
            let v6 = v6.local_addr().unwrap();
            assert!(v6.is_ipv6());
            assert_eq!(v6.port(), v4.port());
            // Each family's connections arrive on its own socket, from an
            // address of that family.
            let _a = TcpStream::connect(("127.0.0.1", v4.port())).await.unwrap();
            let (_, peer) = accept_any(&listeners[..1]).await.unwrap();
            assert_eq!(peer.ip(), "127.0.0.1".parse::<IpAddr>().unwrap());
            let _b = TcpStream::connect(("::1", v4.port())).await.unwrap();
            let (_, peer) = accept_any(&listeners[1..]).await.unwrap();
            assert_eq!(peer.ip(), "::1".parse::<IpAddr>().unwrap());
        }
    }
}
