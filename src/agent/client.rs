//! The agent's view of the kiam servers: a pool over every address
//! `--server-address` resolves to that asks about each pod its owner first
//! ([`crate::shard`]: the server that prefetched it) and, within one call,
//! skips a dead or hung server and asks the next in the pod's rank.
//!
//! Unlike a plain gRPC client, errors are classified by their *message*
//! (`no pod found`, `forbidden by policy`), not their code: Go kiam servers
//! send both with code `Unknown`, ours with `NotFound`/`PermissionDenied`.
//! A denial's response metadata says which policy check refused, so the
//! router can answer it without asking the servers again.
//!
//! "No server answered" ([`ClientError::Unavailable`], the one error the
//! credential fallback may cover) means only that no server could be
//! reached: connection refused or never completed, TLS handshake failed,
//! connection lost before a reply, or a server saying `UNAVAILABLE` because
//! it has not synced yet. A server that has the request and is slow (an
//! attempt timed out on an open connection, see [`link`](super::link)) has
//! answered: [`ClientError::Timeout`]. Both move on to the next server.
//!
//! A kiam server may say, in a success's response metadata
//! ([`REUSE_KEY`](crate::wire::REUSE_KEY)), for how long the agent may
//! answer the same question from memory ([`Answer::reuse_until`]). That
//! window is measured from when the attempt was sent, so it ends before the
//! server's own; a Go kiam server never says it, and nothing is reused.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use tokio::sync::Notify;
use tokio::time::Instant as TokioInstant;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use super::link::Link;
use super::server_address::{parse_server_address, AddressError, Resolve, Target};
use crate::cli::ClientArgs;
pub use crate::grpc_metrics::GrpcMetrics;
use crate::proto;
use crate::proto::kiam_service_client::KiamServiceClient;
use crate::wire::{
    Check, DENIED_CHECK_KEY, FORBIDDEN_BY_POLICY, GO_POD_NOT_FOUND, NODE_KEY, NO_POD_FOUND,
    REUSE_KEY,
};

/// The longest an answer is reused, whatever a server says: the server's
/// own trust in a pod it confirmed with the API lasts no longer.
pub const MAX_REUSE: Duration = crate::server::pods::CONFIRM_TTL;

/// A server's answer, and until when the same question may be answered
/// from memory (`None`: ask every time).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer<T> {
    pub value: T,
    pub reuse_until: Option<TokioInstant>,
}

impl<T> Answer<T> {
    /// An answer that must not be reused.
    pub fn once(value: T) -> Self {
        Answer {
            value,
            reuse_until: None,
        }
    }
}

/// The reuse window a server granted on `response`, from `sent` (when the
/// attempt left): never longer than [`MAX_REUSE`].
fn reuse_until<T>(response: &tonic::Response<T>, sent: TokioInstant) -> Option<TokioInstant> {
    let ms: u64 = response
        .metadata()
        .get(REUSE_KEY)?
        .to_str()
        .ok()?
        .parse()
        .ok()?;
    let window = Duration::from_millis(ms).min(MAX_REUSE);
    (!window.is_zero()).then(|| sent + window)
}

/// Credentials as a server returned them. Times are kept as the server's
/// strings; the router reformats them for the metadata API.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub code: String,
    pub kind: String,
    pub access_key_id: String,
    pub secret_access_key: String,
    pub token: String,
    pub expiration: String,
    pub last_updated: String,
}

impl fmt::Debug for Credentials {
    // Secrets never reach a log line, even at debug level.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("access_key_id", &self.access_key_id)
            .field("expiration", &self.expiration)
            .finish_non_exhaustive()
    }
}

impl From<proto::Credentials> for Credentials {
    fn from(c: proto::Credentials) -> Self {
        Credentials {
            code: c.code,
            kind: c.r#type,
            access_key_id: c.access_key_id,
            secret_access_key: c.secret_access_key,
            token: c.token,
            expiration: c.expiration,
            last_updated: c.last_updated,
        }
    }
}

/// A pod's role as a server answered it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRole {
    /// As annotated (`name`, `/name`, `path/name` or a full ARN): what the
    /// pod's SDK lists and asks credentials for.
    pub name: String,
    /// The ARN the server resolved `name` to (`Role.arn`), so a bare name's
    /// account is known. `None` from a Go kiam server, which does not send
    /// it, and from a server that could not resolve the role.
    pub arn: Option<String>,
}

impl PodRole {
    /// A role whose ARN is not known (a Go kiam server's answer).
    pub fn named(name: &str) -> Self {
        PodRole {
            name: name.to_string(),
            arn: None,
        }
    }
}

/// Why a call to the servers failed; the router branches on this.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    /// A server answered `no pod found` for the IP.
    #[error("{}", NO_POD_FOUND)]
    NotFound,
    /// A server answered `forbidden by policy`: final, never retried. The
    /// check that refused, when the server named it (a Go kiam server
    /// never does).
    #[error("{}{}", FORBIDDEN_BY_POLICY, named_check(.0))]
    Forbidden(Option<Check>),
    /// No server could be reached (connection refused or never completed,
    /// TLS failure, connection lost before a reply, server not ready).
    #[error("no kiam server answered (check --server-address): {0}")]
    Unavailable(String),
    /// A server had the request but did not answer in time (e.g. it waits
    /// on a slow API server). It has answered, for the fallback's purposes.
    #[error("kiam server did not answer in time: {0}")]
    Timeout(String),
    /// A server answered with an error asking again will not change
    /// (`FAILED_PRECONDITION`: STS refused the role, several pods share
    /// the IP): never retried.
    #[error("kiam server refused: {0}")]
    Final(String),
    /// A server answered with another error (e.g. STS failed for now):
    /// retried, as another server may have the answer.
    #[error("kiam server error: {0}")]
    Server(String),
}

/// ` (annotated-role)` after a denial that named its check, for the logs.
fn named_check(check: &Option<Check>) -> String {
    check.map_or(String::new(), |c| format!(" ({})", c.as_str()))
}

impl ClientError {
    /// Whether a server actually answered (so a fallback must not be used).
    pub fn answered(&self) -> bool {
        !matches!(self, ClientError::Unavailable(_))
    }

    /// Whether asking again cannot change the answer.
    pub fn is_final(&self) -> bool {
        matches!(self, ClientError::Forbidden(_) | ClientError::Final(_))
    }

    /// Names the server in a message for the logs (never for pods).
    fn naming_server(self, addr: SocketAddr) -> Self {
        match self {
            ClientError::Final(m) => ClientError::Final(format!("{addr}: {m}")),
            ClientError::Server(m) => ClientError::Server(format!("{addr}: {m}")),
            other => other,
        }
    }
}

/// What the router needs from the servers; a trait so router tests can use
/// a fake. Each call is over by `deadline`: the pool stops its last attempt
/// then and says whether that attempt had reached a server.
pub trait KiamClient: Send + Sync + 'static {
    /// The role annotated on the pod at `ip`; `None` when it has none.
    fn get_pod_role(
        &self,
        ip: IpAddr,
        deadline: TokioInstant,
    ) -> BoxFuture<'_, Result<Option<PodRole>, ClientError>>;
    /// Credentials for `role` if the pod at `ip` may use it.
    fn get_pod_credentials<'a>(
        &'a self,
        ip: IpAddr,
        role: &'a str,
        deadline: TokioInstant,
    ) -> BoxFuture<'a, Result<Credentials, ClientError>>;
    /// A server's health message (`ok` when healthy).
    fn health(&self, deadline: TokioInstant) -> BoxFuture<'_, Result<String, ClientError>>;
    /// Credentials for the pod a projected service-account token is bound
    /// to (the container credentials path); `ip` is for the server's logs.
    /// Clients that cannot ask say so as every Go kiam server would.
    fn get_token_credentials<'a>(
        &'a self,
        token: &'a str,
        ip: IpAddr,
        deadline: TokioInstant,
    ) -> BoxFuture<'a, Result<TokenCredentials, ClientError>> {
        let _ = (token, ip, deadline);
        Box::pin(async { Err(ClientError::Unavailable(TOKEN_UNSUPPORTED.into())) })
    }
    /// [`Self::get_pod_role`] with the window in which the answer may be
    /// reused; by default none.
    fn get_pod_role_answer(
        &self,
        ip: IpAddr,
        deadline: TokioInstant,
    ) -> BoxFuture<'_, Result<Answer<Option<PodRole>>, ClientError>> {
        Box::pin(async move { self.get_pod_role(ip, deadline).await.map(Answer::once) })
    }

    /// [`Self::get_pod_credentials`] with the window in which the answer
    /// may be reused; by default none.
    fn get_pod_credentials_answer<'a>(
        &'a self,
        ip: IpAddr,
        role: &'a str,
        deadline: TokioInstant,
    ) -> BoxFuture<'a, Result<Answer<Credentials>, ClientError>> {
        Box::pin(async move {
            self.get_pod_credentials(ip, role, deadline)
                .await
                .map(Answer::once)
        })
    }
}

/// What a pool's error says when every server it asked answered
/// GetTokenCredentials with UNIMPLEMENTED (Go kiam servers).
pub const TOKEN_UNSUPPORTED: &str =
    "the kiam server does not implement GetTokenCredentials (Go kiam?)";

/// A GetTokenCredentials answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenCredentials {
    pub credentials: Credentials,
    /// The role's resolved ARN.
    pub role_arn: String,
    /// The pod the token named, for the logs.
    pub namespace: String,
    pub name: String,
}

/// Maps a gRPC status to the agent's error: by message first (Go servers
/// send `Unknown`), then by whether a server produced it at all, then by
/// code.
fn classify(status: &Status) -> ClientError {
    let msg = status.message();
    if msg.contains(NO_POD_FOUND) || msg.contains(GO_POD_NOT_FOUND) {
        return ClientError::NotFound;
    }
    if msg.contains(FORBIDDEN_BY_POLICY) {
        let check = status
            .metadata()
            .get(DENIED_CHECK_KEY)
            .and_then(|v| v.to_str().ok())
            .and_then(Check::parse);
        return ClientError::Forbidden(check);
    }
    let detail = format!("{:?}: {}", status.code(), msg);
    // A status with a source was made locally from a transport error (tonic
    // keeps the hyper/h2 or connect error as its source), not decoded from
    // a server's grpc-status: the connection could not be made, or was lost
    // before a reply. A server's own UNAVAILABLE means it is not ready.
    let local = std::error::Error::source(status).is_some();
    if local || status.code() == Code::Unavailable {
        return ClientError::Unavailable(detail);
    }
    match status.code() {
        // A server cut its own work short: it had the request.
        Code::DeadlineExceeded | Code::Cancelled => ClientError::Timeout(detail),
        // UNAUTHENTICATED: a token the server refused (the token path).
        Code::FailedPrecondition | Code::PermissionDenied | Code::Unauthenticated => {
            ClientError::Final(detail)
        }
        _ => ClientError::Server(detail),
    }
}

/// Makes the channel to one server address. The TLS connector verifies the
/// server certificate against `host` (the name in `--server-address`), not
/// against the resolved IP.
pub trait Connect: Send + Sync + 'static {
    /// A lazily connecting channel; `endpoint` carries timeouts and
    /// keepalive already. Its connector must be wrapped by `link`
    /// ([`Link::track`]) so the pool can tell a slow server from an
    /// unreachable one.
    fn channel(&self, endpoint: Endpoint, addr: SocketAddr, host: &str, link: &Link) -> Channel;
}

/// Pool tuning; [`PoolConfig::from_args`] maps the kiam flags.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    pub targets: Vec<Target>,
    /// Connection set-up bound (`--gateway-timeout-creation`).
    pub connect_timeout: Duration,
    /// One attempt at GetPodRole/GetHealth on one server. Short so a hung
    /// server costs a fraction of the SDK's ~1 s budget.
    pub attempt_timeout: Duration,
    /// One attempt at GetPodCredentials: a little longer because a server
    /// whose cache is cold waits for STS.
    pub credentials_attempt_timeout: Duration,
    pub keepalive_time: Duration,
    pub keepalive_timeout: Duration,
    pub keepalive_while_idle: bool,
    /// How often names are re-resolved to follow server scale-out/in.
    pub refresh_interval: Duration,
    /// How long a server that just failed is tried only after the others.
    pub failure_cooldown: Duration,
    /// This agent's node (`--node-name` or `NODE_NAME`), sent with pod calls
    /// as [`NODE_KEY`] so a server looks up a pod its watch has not
    /// delivered among this node's pods first. `None`: not sent.
    pub node: Option<String>,
}

impl PoolConfig {
    pub fn from_args(args: &ClientArgs) -> Result<Self, AddressError> {
        Ok(PoolConfig {
            targets: parse_server_address(&args.server_address)?,
            connect_timeout: args.gateway_timeout_creation,
            attempt_timeout: Duration::from_millis(300),
            credentials_attempt_timeout: Duration::from_millis(450),
            keepalive_time: args.grpc_keepalive_time_duration,
            keepalive_timeout: args.grpc_keepalive_timeout_duration,
            keepalive_while_idle: args.grpc_keepalive_permit_without_stream,
            refresh_interval: Duration::from_secs(15),
            failure_cooldown: Duration::from_secs(2),
            node: None,
        })
    }
}

/// A lookup that hangs must not stall start-up or the refresh loop.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

/// One server address and its channel.
struct Member {
    addr: SocketAddr,
    host: String,
    client: KiamServiceClient<Channel>,
    /// Whether a connection to it is open (a timed-out attempt then reached
    /// the server).
    link: Link,
    /// Until when this member is tried only after healthy ones. std Mutex:
    /// held for a copy, never across an await.
    cooling_until: Mutex<Option<Instant>>,
}

impl Member {
    fn is_cooling(&self, now: Instant) -> bool {
        matches!(*self.cooling_until.lock().unwrap(), Some(t) if t > now)
    }
    fn mark(&self, failed_for: Option<Duration>) {
        *self.cooling_until.lock().unwrap() = failed_for.map(|d| Instant::now() + d);
    }
}

/// The pool's members and what keeps them current; shared by the pool and
/// its re-resolution task.
struct Balancer {
    cfg: PoolConfig,
    connector: Arc<dyn Connect>,
    resolver: Arc<dyn Resolve>,
    metrics: GrpcMetrics,
    /// Replaced wholesale on re-resolution; calls take a snapshot. std
    /// RwLock: never held across an await.
    members: RwLock<Arc<Vec<Arc<Member>>>>,
    next: AtomicUsize,
    /// `cfg.node` as request metadata, made once (a name that cannot be
    /// metadata is not sent; servers only use it as a hint).
    node: Option<MetadataValue<Ascii>>,
    /// Wakes the resolver early when every server failed (scale-in/out).
    resolve_now: Notify,
}

/// The pool of kiam servers. Dropping it stops its re-resolution task.
pub struct Pool {
    balancer: Arc<Balancer>,
    refresher: tokio::task::JoinHandle<()>,
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.refresher.abort();
    }
}

impl Pool {
    /// Resolves every target once and starts re-resolving in the
    /// background. A name that does not resolve yet is not an error: calls
    /// fail as unavailable until it does.
    pub async fn new(
        cfg: PoolConfig,
        connector: Arc<dyn Connect>,
        resolver: Arc<dyn Resolve>,
        metrics: GrpcMetrics,
    ) -> Pool {
        let node = cfg.node.as_deref().and_then(|n| n.parse().ok());
        let balancer = Arc::new(Balancer {
            node,
            cfg,
            connector,
            resolver,
            metrics,
            members: RwLock::new(Arc::new(Vec::new())),
            next: AtomicUsize::new(0),
            resolve_now: Notify::new(),
        });
        balancer.refresh().await;
        // Holds the balancer strongly; `Pool::drop` aborts it.
        let s = Arc::clone(&balancer);
        let refresher = tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(s.cfg.refresh_interval) => {}
                    _ = s.resolve_now.notified() => {
                        // Rate-limit early refreshes.
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
                s.refresh().await;
            }
        });
        Pool {
            balancer,
            refresher,
        }
    }

    /// The addresses currently in the pool.
    pub fn addresses(&self) -> Vec<SocketAddr> {
        self.balancer
            .members
            .read()
            .unwrap()
            .iter()
            .map(|m| m.addr)
            .collect()
    }

    /// Re-resolves now (tests; the background task does it periodically).
    pub async fn refresh(&self) {
        self.balancer.refresh().await;
    }

    /// A request about a pod, with this agent's node when it has one.
    fn about_pod<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        if let Some(node) = &self.balancer.node {
            request.metadata_mut().insert(NODE_KEY, node.clone());
        }
        request
    }
}

impl Balancer {
    async fn refresh(&self) {
        let old = self.members.read().unwrap().clone();
        let mut wanted: Vec<(SocketAddr, String)> = Vec::new();
        for t in &self.cfg.targets {
            let resolved = tokio::time::timeout(RESOLVE_TIMEOUT, self.resolver.resolve(t))
                .await
                .unwrap_or_else(|_| {
                    Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "DNS lookup timed out",
                    ))
                });
            match resolved {
                Ok(addrs) if !addrs.is_empty() => {
                    for a in addrs {
                        if !wanted.iter().any(|(w, h)| *w == a && *h == t.host) {
                            wanted.push((a, t.host.clone()));
                        }
                    }
                }
                // A DNS blip must not empty the pool: keep what we had.
                Ok(_) => {
                    tracing::warn!(target = %t, "server address resolved to nothing; keeping previous addresses");
                    keep_old(&old, &t.host, &mut wanted);
                }
                Err(e) => {
                    tracing::warn!(target = %t, error = %e, "cannot resolve server address; keeping previous addresses");
                    keep_old(&old, &t.host, &mut wanted);
                }
            }
        }
        let by_key: HashMap<(SocketAddr, &str), &Arc<Member>> =
            old.iter().map(|m| ((m.addr, m.host.as_str()), m)).collect();
        let mut changed = wanted.len() != old.len();
        let new: Vec<Arc<Member>> = wanted
            .iter()
            .map(|(addr, host)| match by_key.get(&(*addr, host.as_str())) {
                Some(m) => Arc::clone(m),
                None => {
                    changed = true;
                    Arc::new(self.member(*addr, host))
                }
            })
            .collect();
        if changed {
            tracing::info!(addresses = ?new.iter().map(|m| m.addr).collect::<Vec<_>>(), "kiam server addresses");
            *self.members.write().unwrap() = Arc::new(new);
        }
    }

    fn member(&self, addr: SocketAddr, host: &str) -> Member {
        let cfg = &self.cfg;
        // The URI only labels the channel; connectors dial `addr`.
        let mut endpoint = Endpoint::from_shared(format!("http://{addr}"))
            .expect("a socket address is a valid URI authority")
            .connect_timeout(cfg.connect_timeout)
            .tcp_nodelay(true);
        if !cfg.keepalive_time.is_zero() {
            endpoint = endpoint
                .http2_keep_alive_interval(cfg.keepalive_time)
                .keep_alive_timeout(cfg.keepalive_timeout)
                .keep_alive_while_idle(cfg.keepalive_while_idle);
        }
        let link = Link::default();
        let channel = self.connector.channel(endpoint, addr, host, &link);
        Member {
            addr,
            host: host.to_string(),
            client: KiamServiceClient::new(channel),
            link,
            cooling_until: Mutex::new(None),
        }
    }

    /// Runs `call` on one server after another until one answers, or
    /// `deadline` passes. A server that had the request and ran out of time
    /// is skipped like an unreachable one, but the call then reports that a
    /// server answered. Any error a server sends ends the call (the caller
    /// decides whether to ask again). The answer comes with when its attempt
    /// was sent.
    ///
    /// A call about a `pod` (its IP) tries the servers in that IP's
    /// [`rank`](crate::shard::rank): its owner first, which is the one
    /// server that prefetched its credentials (`--prefetch-peers`), then
    /// the next. Other calls rotate over the servers.
    async fn call<T, F, Fut>(
        &self,
        method: &'static str,
        pod: Option<IpAddr>,
        attempt_timeout: Duration,
        deadline: TokioInstant,
        call: F,
    ) -> Result<(tonic::Response<T>, TokioInstant), ClientError>
    where
        F: Fn(KiamServiceClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let members = self.members.read().unwrap().clone();
        if members.is_empty() {
            self.resolve_now.notify_one();
            return Err(ClientError::Unavailable(
                "no server address resolved yet".into(),
            ));
        }
        let now = Instant::now();
        let ordered: Vec<&Arc<Member>> = match pod {
            // The pod's owner first, then the next in rank: the server that
            // prefetched its credentials and confirmed it recently.
            Some(ip) => {
                let addrs: Vec<SocketAddr> = members.iter().map(|m| m.addr).collect();
                crate::shard::rank(ip, &addrs)
                    .into_iter()
                    .map(|i| &members[i])
                    .collect()
            }
            None => {
                let start = self.next.fetch_add(1, Ordering::Relaxed) % members.len();
                members
                    .iter()
                    .cycle()
                    .skip(start)
                    .take(members.len())
                    .collect()
            }
        };
        // Healthy members first (in that order), then cooling ones: a
        // server that just failed is still tried if nothing else works.
        let (healthy, cooling): (Vec<_>, Vec<_>) =
            ordered.into_iter().partition(|m| !m.is_cooling(now));
        let mut unreached = String::from("no time left to ask a server");
        // Set when a server had the request but did not answer in time.
        let mut slow: Option<String> = None;
        for m in healthy.into_iter().chain(cooling) {
            let budget =
                attempt_timeout.min(deadline.saturating_duration_since(TokioInstant::now()));
            if budget.is_zero() {
                break;
            }
            let started = self.metrics.started(method);
            let sent = TokioInstant::now();
            match tokio::time::timeout(budget, call(m.client.clone())).await {
                Ok(Ok(resp)) => {
                    self.metrics.handled(method, started, Code::Ok);
                    m.mark(None);
                    return Ok((resp, sent));
                }
                Ok(Err(status)) => {
                    self.metrics.handled(method, started, status.code());
                    match classify(&status).naming_server(m.addr) {
                        ClientError::Unavailable(msg) => {
                            tracing::debug!(server = %m.addr, error = %msg, "server could not be reached; trying the next");
                            m.mark(Some(self.cfg.failure_cooldown));
                            unreached = format!("{}: {msg}", m.addr);
                        }
                        e => {
                            m.mark(None);
                            return Err(e);
                        }
                    }
                }
                Err(_) => {
                    self.metrics
                        .handled(method, started, Code::DeadlineExceeded);
                    m.mark(Some(self.cfg.failure_cooldown));
                    if m.link.is_open() {
                        tracing::debug!(server = %m.addr, "server had the request but did not answer in time; trying the next");
                        slow = Some(format!("{}: no answer within {budget:?}", m.addr));
                    } else {
                        tracing::debug!(server = %m.addr, "no connection to the server in time; trying the next");
                        unreached = format!("{}: no connection within {budget:?}", m.addr);
                    }
                }
            }
        }
        if let Some(s) = slow {
            return Err(ClientError::Timeout(s));
        }
        self.resolve_now.notify_one();
        Err(ClientError::Unavailable(unreached))
    }
}

fn keep_old(old: &[Arc<Member>], host: &str, wanted: &mut Vec<(SocketAddr, String)>) {
    for m in old.iter().filter(|m| m.host == host) {
        if !wanted.iter().any(|(a, h)| *a == m.addr && h == host) {
            wanted.push((m.addr, m.host.clone()));
        }
    }
}

impl KiamClient for Pool {
    fn get_pod_role(
        &self,
        ip: IpAddr,
        deadline: TokioInstant,
    ) -> BoxFuture<'_, Result<Option<PodRole>, ClientError>> {
        Box::pin(async move { Ok(self.get_pod_role_answer(ip, deadline).await?.value) })
    }

    fn get_pod_credentials<'a>(
        &'a self,
        ip: IpAddr,
        role: &'a str,
        deadline: TokioInstant,
    ) -> BoxFuture<'a, Result<Credentials, ClientError>> {
        Box::pin(async move {
            Ok(self
                .get_pod_credentials_answer(ip, role, deadline)
                .await?
                .value)
        })
    }

    fn health(&self, deadline: TokioInstant) -> BoxFuture<'_, Result<String, ClientError>> {
        Box::pin(async move {
            let (h, _) = self
                .balancer
                .call(
                    "GetHealth",
                    None,
                    self.balancer.cfg.attempt_timeout,
                    deadline,
                    |mut c| async move { c.get_health(proto::GetHealthRequest {}).await },
                )
                .await?;
            Ok(h.into_inner().message)
        })
    }

    fn get_pod_role_answer(
        &self,
        ip: IpAddr,
        deadline: TokioInstant,
    ) -> BoxFuture<'_, Result<Answer<Option<PodRole>>, ClientError>> {
        Box::pin(async move {
            let pod = Some(ip);
            let ip = ip.to_string();
            let (role, sent) = self
                .balancer
                .call(
                    "GetPodRole",
                    pod,
                    self.balancer.cfg.attempt_timeout,
                    deadline,
                    |mut c| {
                        let req = self.about_pod(proto::GetPodRoleRequest { ip: ip.clone() });
                        async move { c.get_pod_role(req).await }
                    },
                )
                .await?;
            let reuse_until = reuse_until(&role, sent);
            let role = role.into_inner();
            let value = (!role.name.is_empty()).then(|| PodRole {
                name: role.name,
                arn: Some(role.arn).filter(|a| !a.is_empty()),
            });
            Ok(Answer { value, reuse_until })
        })
    }

    fn get_pod_credentials_answer<'a>(
        &'a self,
        ip: IpAddr,
        role: &'a str,
        deadline: TokioInstant,
    ) -> BoxFuture<'a, Result<Answer<Credentials>, ClientError>> {
        Box::pin(async move {
            let pod = Some(ip);
            let ip = ip.to_string();
            let (creds, sent) = self
                .balancer
                .call(
                    "GetPodCredentials",
                    pod,
                    self.balancer.cfg.credentials_attempt_timeout,
                    deadline,
                    |mut c| {
                        let req = self.about_pod(proto::GetPodCredentialsRequest {
                            ip: ip.clone(),
                            role: role.to_string(),
                        });
                        async move { c.get_pod_credentials(req).await }
                    },
                )
                .await?;
            let reuse_until = reuse_until(&creds, sent);
            Ok(Answer {
                value: creds.into_inner().into(),
                reuse_until,
            })
        })
    }

    fn get_token_credentials<'a>(
        &'a self,
        token: &'a str,
        ip: IpAddr,
        deadline: TokioInstant,
    ) -> BoxFuture<'a, Result<TokenCredentials, ClientError>> {
        Box::pin(async move {
            let pod = Some(ip);
            let ip = ip.to_string();
            let (answer, _) = self
                .balancer
                .call(
                    "GetTokenCredentials",
                    pod,
                    self.balancer.cfg.credentials_attempt_timeout,
                    deadline,
                    |mut c| {
                        let req = proto::GetTokenCredentialsRequest {
                            token: token.to_string(),
                            ip: ip.clone(),
                        };
                        async move {
                            // A Go kiam server does not know the RPC: ask
                            // the next server (a rollout mixes them), and
                            // say why if none knows it.
                            c.get_token_credentials(req).await.map_err(|s| {
                                if s.code() == Code::Unimplemented {
                                    Status::unavailable(TOKEN_UNSUPPORTED)
                                } else {
                                    s
                                }
                            })
                        }
                    },
                )
                .await?;
            let answer = answer.into_inner();
            let credentials = answer.credentials.ok_or_else(|| {
                ClientError::Server("GetTokenCredentials answered without credentials".into())
            })?;
            Ok(TokenCredentials {
                credentials: credentials.into(),
                role_arn: answer.role_arn,
                namespace: answer.namespace,
                name: answer.name,
            })
        })
    }
}

#[cfg(test)]
mod tests;
