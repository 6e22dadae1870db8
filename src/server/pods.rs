//! The Pod cache: a small projection of each Pod (not whole objects), kept by
//! a kube-runtime watcher and indexed by pod IP and by role identity.
//!
//! Like any watch-based cache it may lag the API server; a miss on an IP
//! (or two live pods claiming one IP) is therefore settled by one direct API
//! lookup (`fieldSelector=status.podIP=<ip>`) before answering, and an
//! answer that is still ambiguous is an error, never a guess. The API server
//! does not index `status.podIP`: each such LIST walks every pod of the
//! cluster. An agent that names its node (`kiam-node`, from `--node-name`)
//! has the lookup made among that node's pods first
//! (`spec.nodeName=<node>,status.podIP=<ip>`, which the API server's watch
//! cache answers from its node index), and the whole cluster is asked only
//! when no live pod there has the IP. One live pod on the agent's node is
//! then the answer without looking at other nodes: the request came through
//! that node's agent, and pod IPs are unique in a cluster (two live pods on
//! one IP on different nodes is a broken network that the cluster-wide
//! lookup would refuse as ambiguous, and this one does not see).
//!
//! Pods are indexed under every address of `status.podIPs`, so a dual-stack
//! pod is found by either. The direct lookup cannot do the same: Kubernetes
//! has a field selector for `status.podIP` (the primary address) only, none
//! for `podIPs`. So a miss on a pod's *secondary* address (the IPv6 of a pod
//! whose primary is IPv4, or the other way round) answers `no pod found`
//! until the watch delivers the pod. The kubelet reports `podIP` and
//! `podIPs` in one status update, so that is the same moment the watch
//! delivers the primary; a LIST of every pod in the cluster to cover the gap
//! would cost far more than the agent's retry. Never another pod: whatever
//! the lookup lists is filtered again on the exact address.
//!
//! What may be stale: a pod whose deletion or completion the watch has not
//! delivered yet. Because its IP may already belong to a new pod, a cached
//! answer is used only while the API has vouched for it within
//! [`CONFIRM_TTL`]: either the whole cache was proven current (one `limit=1`
//! LIST whose resourceVersion the watch has reached, see `progress`; the
//! usual case on a busy cluster, one check for every pod), or else that pod
//! is confirmed with one GET by name (not a list), at most once per
//! [`CONFIRM_TTL`] per pod and shared by concurrent requests: a pod the API
//! reports gone, completed or moved is dropped and the IP is looked up
//! afresh. A confirmation that fails or
//! takes longer than [`CONFIRM_TIMEOUT`] trusts the cache, so an API outage
//! does not stop kiam serving running pods; while the API is unreachable
//! the window is the watch's staleness again (see docs/RELIABILITY.md).
//!
//! `--sync`: kube-runtime's watcher has no client-go style resync (which only
//! replayed the cache to event handlers; kiam's handlers ignored it). Here
//! `--sync` is the watch's server-side timeout: every `--sync` the watch is
//! re-established from the last resourceVersion, so a silently dead
//! connection is noticed within `--sync` + 5s. A full re-list happens only
//! when the API server says the resourceVersion is too old (410 Gone); pods
//! missing from that re-list are dropped.
//!
//! Lifetime: the watch runs in a spawned task that stops when the last
//! [`PodCache`] handle is dropped (mini-redis' `DbDropGuard`).

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::{BoxFuture, Shared};
use futures::FutureExt;
use jiff::Timestamp;
use kube::api::{Api, ListParams};
use kube::runtime::watcher;
use tokio::sync::{mpsc, Semaphore};

use super::index::{CachedPod, PodIndex};
use super::model::{Identity, PodInfo, Prefetch};
use super::podview::PodView;
use super::policy::Policy;
use super::watch::{Synced, Watched};

mod budget;
mod metrics;
mod progress;

use budget::Budget;
pub use metrics::PodCacheMetrics;
use progress::Progress;

/// At most this many direct pod lookups run at once, however many IPs miss:
/// a `status.podIP` field selector is not indexed by the API server.
const MAX_CONCURRENT_LOOKUPS: usize = 8;
/// A direct lookup that takes longer than this answers an error; agents
/// retry within their own deadline.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);
/// A pod the API confirmed (or could not be asked about) is trusted from
/// the cache for this long. Shorter than any IP hand-over: the kubelet must
/// stop the old pod, the CNI free and re-assign its address, and the new
/// pod's container start, before the new pod can ask.
pub const CONFIRM_TTL: Duration = Duration::from_secs(1);
/// A confirmation slower than this is abandoned and the cache trusted: the
/// agent gives one attempt 300ms and the API may be overloaded or down.
pub const CONFIRM_TIMEOUT: Duration = Duration::from_millis(150);
/// Past this many remembered confirmations the stale ones are pruned.
const CONFIRMATIONS_PRUNE_AT: usize = 1024;
/// After a direct lookup found no pod on an IP, further misses on that IP
/// answer `no pod found` without asking the API again for this long. It
/// spans an agent's bounded retries of one request (about a second), so a
/// request from an address with no pod costs at most one LIST. A pod that
/// appears meanwhile is still found as soon as its watch event arrives: the
/// cache is consulted before this.
pub const NEGATIVE_TTL: Duration = Duration::from_secs(1);
/// Past this many remembered misses the expired ones are pruned.
const NEGATIVES_PRUNE_AT: usize = 4096;

/// Why [`PodCache::find_by_ip`] has no pod to answer with.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FindError {
    /// Agents compare this exact text (kiam's wire string).
    #[error("no pod found")]
    NotFound,
    #[error("{} live pods share IP {ip} ({}); refusing to guess", pods.len(), pods.join(", "))]
    Ambiguous {
        ip: IpAddr,
        /// `namespace/name` of each live pod the API server reported.
        pods: Vec<String>,
    },
    #[error("asking the Kubernetes API for the pod with IP {ip}: {source}")]
    Api {
        ip: IpAddr,
        #[source]
        source: Arc<kube::Error>,
    },
    #[error("asking the Kubernetes API for the pod with IP {ip}: {reason}")]
    Interrupted { ip: IpAddr, reason: &'static str },
}

/// Options for [`PodCache::spawn`], from the server's flags.
#[derive(Debug, Clone)]
pub struct PodCacheConfig {
    /// `--prefetch-buffer-size`: capacity of the prefetch channel.
    pub prefetch_buffer_size: usize,
    /// `--sync`: the watch timeout (see the module doc); zero means
    /// kube-runtime's default (290s).
    pub resync: Duration,
    /// `--pod-confirmations-per-second`: the budget of confirmation GETs;
    /// 0 turns confirmation off.
    pub confirmations_per_second: u32,
}

/// A cheaply cloneable handle on the Pod cache. The watch stops when the
/// last handle is dropped.
#[derive(Clone)]
pub struct PodCache {
    handle: Arc<Watched<PodCacheState>>,
}

type Lookup = Shared<BoxFuture<'static, Result<Arc<PodInfo>, FindError>>>;

/// What a confirmation of a cached pod found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Confirmed {
    /// The API still has it, live, on that IP (or could not say): use it.
    Trusted,
    /// Gone, completed, past its deadline or moved: the cache was updated;
    /// ask the API who has the IP now.
    Stale,
}

enum Confirmation {
    /// Trusted until `until`. `by_api`: the API said the pod owns the IP
    /// (a GET or a direct lookup answered), rather than a confirmation
    /// that could not be made; only then may an answer be reused (see
    /// [`PodCache::reuse_until`]).
    Until {
        until: Instant,
        by_api: bool,
    },
    InFlight(Shared<BoxFuture<'static, Confirmed>>),
}

struct PodCacheState {
    // std Mutex: no `.await` happens while it is held.
    index: Mutex<PodIndex>,
    /// Decides the identity of each pod once per change.
    policy: Arc<Policy>,
    api: Api<PodView>,
    prefetch: mpsc::Sender<Prefetch>,
    metrics: PodCacheMetrics,
    synced: Synced,
    // std Mutex: held only to find or insert a lookup, never across `.await`.
    lookups: Mutex<HashMap<IpAddr, Lookup>>,
    lookup_permits: Semaphore,
    // std Mutex: held only to read or note a miss, never across `.await`.
    negatives: Mutex<HashMap<IpAddr, Instant>>,
    // std Mutex: held only to find or insert a confirmation, never across `.await`.
    confirmations: Mutex<HashMap<Arc<str>, Confirmation>>,
    // std Mutex: held only to take a token, never across `.await`.
    confirm_budget: Mutex<Budget>,
    /// `--pod-confirmations-per-second` is not 0.
    confirming: bool,
    /// Proof that the whole cache is current (see `progress`).
    progress: Arc<Progress>,
}

impl PodCache {
    /// Starts watching every Pod in the cluster. Returns the cache and the
    /// prefetch receiver: a [`Prefetch`] (the pod and the identity `policy`
    /// gave it) arrives whenever a pod with a resolvable role and an IP
    /// (Pending or Running) appears, or its identity or IP changes. When the
    /// receiver lags and the channel is full, the pod is dropped and counted
    /// (`kiam_k8s_dropped_pods_total`); the watcher never waits.
    ///
    /// Must be called inside a tokio runtime (it spawns the watch).
    pub fn spawn(
        client: kube::Client,
        policy: Arc<Policy>,
        config: PodCacheConfig,
        metrics: PodCacheMetrics,
    ) -> (PodCache, mpsc::Receiver<Prefetch>) {
        let (prefetch, receiver) = mpsc::channel(config.prefetch_buffer_size.max(1));
        let state = Arc::new(PodCacheState {
            index: Mutex::new(PodIndex::default()),
            policy,
            api: Api::all(client),
            prefetch,
            metrics,
            synced: Synced::default(),
            lookups: Mutex::new(HashMap::new()),
            lookup_permits: Semaphore::new(MAX_CONCURRENT_LOOKUPS),
            negatives: Mutex::new(HashMap::new()),
            confirm_budget: Mutex::new(Budget::new(config.confirmations_per_second)),
            confirmations: Mutex::new(HashMap::new()),
            confirming: config.confirmations_per_second > 0,
            progress: Arc::new(Progress::default()),
        });
        let api = state.api.clone();
        let handle = Watched::spawn(state, api, config.resync, "pod", PodCacheState::on_event);
        let cache = PodCache { handle };
        (cache, receiver)
    }

    /// The one live pod using `ip`. Answers from the cache when it knows
    /// exactly one live pod there and the API confirms it (see the module
    /// doc); otherwise asks the API server once (at most one lookup per IP
    /// is in flight, shared by concurrent callers) and answers from that:
    /// one live pod (also put in the cache), none ([`FindError::NotFound`])
    /// or several ([`FindError::Ambiguous`]).
    pub async fn find_by_ip(&self, ip: IpAddr) -> Result<Arc<PodInfo>, FindError> {
        self.find_by_ip_on(ip, None).await
    }

    /// [`PodCache::find_by_ip`] for a request an agent on `node` forwarded:
    /// a pod the cache does not have is looked up among that node's pods
    /// first (`spec.nodeName`, which the API server indexes), and in the
    /// whole cluster only if none there has the IP. The node is a hint, not
    /// a check: the answer is still a live pod the API reports on exactly
    /// that IP.
    pub async fn find_by_ip_on(
        &self,
        ip: IpAddr,
        node: Option<&str>,
    ) -> Result<Arc<PodInfo>, FindError> {
        // `::ffff:198.18.0.5` is 198.18.0.5, in the index, the negative
        // cache and the field selector alike.
        let ip = ip.to_canonical();
        let state = &self.handle.state;
        // Asked before reading the cache: a proof that arrives after that
        // read says nothing about what was read.
        let current = state.confirming && state.progress.is_current(&state.api, &state.metrics);
        let live = state.index.lock().unwrap().live_on(ip, Timestamp::now());
        if let [only] = live.as_slice() {
            if current {
                state.metrics.confirmed("current");
                return Ok(only.clone());
            }
            if state.clone().confirm(only.clone(), ip).await == Confirmed::Trusted {
                return Ok(only.clone());
            }
            tracing::info!(
                pod.namespace = %only.namespace, pod.name = %only.name, pod.ip = %ip,
                "the cached pod for this IP is gone or moved (the watch lags); asking who has the IP now"
            );
        }
        tracing::debug!(pod.ip = %ip, cached_live_pods = live.len(), "asking the API server for the pod");
        state.clone().lookup(ip, node.map(Arc::from)).await
    }

    /// Until when an answer about `pod`, asked from `ip`, may be reused
    /// without asking this server again: the end of the window in which the
    /// API's last word on the pod is trusted, [`CONFIRM_TTL`] after that
    /// word, and never past the pod's deletion deadline. That word is a
    /// confirmation GET or direct lookup that found the pod live on its IP,
    /// or a proof that the whole cache was current while it still showed
    /// the pod as the only live one on `ip`. `None` when the pod is trusted
    /// for any other reason (the confirmation budget was spent, confirmation
    /// is off, or the API did not answer): then the server trusts its watch
    /// per request, and an answer reused past this request would not see
    /// what the watch delivers next.
    pub fn reuse_until(&self, pod: &PodInfo, ip: IpAddr) -> Option<Instant> {
        let now = Instant::now();
        let state = &self.handle.state;
        // The proof first, then the cache it vouches for.
        let by_proof = state
            .confirming
            .then(|| state.progress.current_until(now))
            .flatten()
            .filter(|_| {
                let live = state
                    .index
                    .lock()
                    .unwrap()
                    .live_on(ip.to_canonical(), Timestamp::now());
                matches!(live.as_slice(), [only] if only.uid == pod.uid)
            });
        let by_get = match state.confirmations.lock().unwrap().get(&pod.uid) {
            Some(Confirmation::Until {
                until,
                by_api: true,
            }) if *until > now => Some(*until),
            _ => None,
        };
        let until = by_proof.max(by_get)?;
        match pod.deletion {
            None => Some(until),
            Some(deadline) => {
                let left = deadline.duration_since(Timestamp::now());
                let left = Duration::try_from(left).ok()?;
                Some(until.min(now + left))
            }
        }
    }

    /// Is any live (not completed, not host-network) pod annotated with a role
    /// that resolves to this identity? The credential cache keeps refreshing
    /// only such identities. A terminating pod counts until it is deleted.
    pub fn identity_in_use(&self, identity: &Identity) -> bool {
        self.handle
            .state
            .index
            .lock()
            .unwrap()
            .identities
            .contains_key(identity)
    }

    /// The cached projection of one pod, live or not.
    pub fn get(&self, namespace: &str, name: &str) -> Option<Arc<PodInfo>> {
        let index = self.handle.state.index.lock().unwrap();
        index
            .pods
            .get(&(Arc::from(namespace), Arc::from(name)))
            .map(|e| e.info.clone())
    }

    /// The live pods the cache has on `ip` (no API call): more than one
    /// means requests from that IP are refused.
    pub fn live_on(&self, ip: IpAddr) -> Vec<Arc<PodInfo>> {
        let index = self.handle.state.index.lock().unwrap();
        index.live_on(ip.to_canonical(), Timestamp::now())
    }

    /// The pod as the API server has it now: one GET, bypassing the cache
    /// (and not updating it). `Ok(None)`: it does not exist.
    pub async fn get_from_api(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<Option<PodInfo>, kube::Error> {
        let client = self.handle.state.api.clone().into_client();
        let api: Api<PodView> = Api::namespaced(client, namespace);
        let view = api.get_opt(name).await?;
        Ok(view.as_ref().map(PodInfo::from_view))
    }

    /// How many pods are cached (live or not).
    pub fn len(&self) -> usize {
        self.handle.state.index.lock().unwrap().pods.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// True once the first full list has been applied.
    pub fn is_synced(&self) -> bool {
        self.handle.state.synced.is_synced()
    }

    /// Waits for the first full list. Never returns while the API server is
    /// unreachable; race it against shutdown.
    pub async fn wait_synced(&self) {
        self.handle.state.synced.wait().await
    }
}

/// A pod's resourceVersion as a number (etcd's revision), if it is one.
fn resource_version(pod: &PodView) -> Option<u64> {
    pod.metadata
        .resource_version
        .as_deref()
        .and_then(|rv| rv.parse().ok())
}

impl PodCacheState {
    fn entry(&self, pod: &PodView) -> CachedPod {
        let info = PodInfo::from_view(pod);
        let identity = match self.policy.identity(&info) {
            Ok(identity) => identity,
            Err(error) => {
                // Requests from this pod are refused by policy, which
                // explains it in an Event; here it is only noise.
                tracing::debug!(
                    pod.namespace = %info.namespace, pod.name = %info.name, %error,
                    "pod's role does not resolve"
                );
                None
            }
        };
        CachedPod {
            info: Arc::new(info),
            identity,
            resource_version: resource_version(pod),
        }
    }

    fn on_event(&self, event: watcher::Event<PodView>) {
        let prefetch = {
            let mut index = self.index.lock().unwrap();
            match event {
                watcher::Event::Init => {
                    self.progress.relist_started();
                    index.relisted = Some(HashSet::new());
                    None
                }
                watcher::Event::InitApply(pod) => {
                    let entry = self.entry(&pod);
                    self.progress.relisted(entry.resource_version);
                    if let Some(seen) = index.relisted.as_mut() {
                        seen.insert(entry.key());
                    }
                    index.upsert(entry)
                }
                watcher::Event::InitDone => {
                    let gone = index.finish_relist();
                    drop(index);
                    self.progress.relist_done();
                    if gone > 0 {
                        tracing::info!(
                            pods = gone,
                            "re-list dropped pods deleted while the watch was down"
                        );
                    }
                    if !self.synced.is_synced() {
                        tracing::info!("pod cache synced");
                    }
                    self.synced.set();
                    return;
                }
                watcher::Event::Apply(pod) => {
                    let entry = self.entry(&pod);
                    let rv = entry.resource_version;
                    let prefetch = index.upsert(entry);
                    drop(index);
                    self.progress.delivered(rv);
                    prefetch
                }
                watcher::Event::Delete(pod) => {
                    let info = PodInfo::from_view(&pod);
                    tracing::debug!(pod.namespace = %info.namespace, pod.name = %info.name, "pod deleted");
                    index.delete(&(info.namespace, info.name), &info.uid);
                    drop(index);
                    self.progress.delivered(resource_version(&pod));
                    None
                }
            }
        };
        if let Some(prefetch) = prefetch {
            self.prefetch(prefetch);
        }
    }

    fn prefetch(&self, prefetch: Prefetch) {
        match self.prefetch.try_send(prefetch) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(dropped)) => {
                self.metrics.dropped.inc();
                tracing::warn!(
                    pod.namespace = %dropped.pod.namespace, pod.name = %dropped.pod.name,
                    "prefetch buffer full (--prefetch-buffer-size), not prefetching for this pod"
                );
            }
            // Nobody prefetches (e.g. in tests): nothing to tell.
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }

    /// Checks with the API that `pod` still owns `ip`, unless that was
    /// checked (or could not be) within [`CONFIRM_TTL`]. Concurrent callers
    /// share one GET, run as a task so a caller giving up cancels nothing.
    async fn confirm(self: Arc<Self>, pod: Arc<PodInfo>, ip: IpAddr) -> Confirmed {
        let pending = {
            let mut confirmations = self.confirmations.lock().unwrap();
            match confirmations.get(&pod.uid) {
                Some(Confirmation::Until { until, .. }) if Instant::now() < *until => {
                    return Confirmed::Trusted
                }
                Some(Confirmation::InFlight(f)) => f.clone(),
                _ => {
                    if !self.confirm_budget.lock().unwrap().take() {
                        // Over budget (or confirmation off): the cache is
                        // trusted as the watch shows it.
                        self.metrics.confirmed("skipped");
                        return Confirmed::Trusted;
                    }
                    if confirmations.len() >= CONFIRMATIONS_PRUNE_AT {
                        let now = Instant::now();
                        confirmations.retain(|_, c| match c {
                            Confirmation::Until { until, .. } => now < *until,
                            Confirmation::InFlight(_) => true,
                        });
                    }
                    let state = self.clone();
                    let uid = pod.uid.clone();
                    let task = tokio::spawn(async move {
                        let (outcome, by_api) = state.confirm_api(&pod, ip).await;
                        let mut confirmations = state.confirmations.lock().unwrap();
                        match outcome {
                            Confirmed::Trusted => {
                                let until = Instant::now() + CONFIRM_TTL;
                                confirmations
                                    .insert(pod.uid.clone(), Confirmation::Until { until, by_api });
                            }
                            Confirmed::Stale => {
                                confirmations.remove(&pod.uid);
                            }
                        }
                        outcome
                    });
                    // A task that died (shutdown) leaves the cache as the answer.
                    let shared = task
                        .map(|joined| joined.unwrap_or(Confirmed::Trusted))
                        .boxed()
                        .shared();
                    confirmations.insert(uid, Confirmation::InFlight(shared.clone()));
                    shared
                }
            }
        };
        pending.await
    }

    /// What the API says of `pod` on `ip`, and whether it said it (`false`:
    /// no answer, the cache is trusted).
    async fn confirm_api(&self, pod: &PodInfo, ip: IpAddr) -> (Confirmed, bool) {
        let api: Api<PodView> = Api::namespaced(self.api.clone().into_client(), &pod.namespace);
        let fetched = match tokio::time::timeout(CONFIRM_TIMEOUT, api.get_opt(&pod.name)).await {
            Ok(Ok(fetched)) => fetched,
            Ok(Err(error)) => {
                tracing::debug!(pod.namespace = %pod.namespace, pod.name = %pod.name, %error,
                    "cannot confirm the cached pod; trusting the cache");
                self.metrics.confirmed("unanswered");
                return (Confirmed::Trusted, false);
            }
            Err(_) => {
                tracing::debug!(pod.namespace = %pod.namespace, pod.name = %pod.name,
                    "confirming the cached pod took too long; trusting the cache");
                self.metrics.confirmed("unanswered");
                return (Confirmed::Trusted, false);
            }
        };
        let key = (pod.namespace.clone(), pod.name.clone());
        let mut index = self.index.lock().unwrap();
        match fetched {
            None => {
                index.delete(&key, &pod.uid);
                self.metrics.confirmed("stale");
                (Confirmed::Stale, true)
            }
            Some(fetched) => {
                let entry = self.entry(&fetched);
                if entry.info.uid != pod.uid {
                    // Replaced by a namesake: the one we had is deleted.
                    index.delete(&key, &pod.uid);
                    self.metrics.confirmed("stale");
                    return (Confirmed::Stale, true);
                }
                // Still has *this* address: a dual-stack pod confirmed on
                // one family says nothing about the other.
                let still = entry.info.has_ip(ip) && entry.info.matches_ip_at(Timestamp::now());
                // Newer than the cache (the watch lags): keep what the API said.
                let prefetch = index.insert_fresh(entry);
                drop(index);
                if let Some(prefetch) = prefetch {
                    self.prefetch(prefetch);
                }
                if still {
                    self.metrics.confirmed("owner");
                    (Confirmed::Trusted, true)
                } else {
                    self.metrics.confirmed("stale");
                    (Confirmed::Stale, true)
                }
            }
        }
    }

    /// Joins the in-flight lookup for `ip` or starts one. The lookup is a
    /// task, so a caller that gives up (its gRPC deadline passed) neither
    /// cancels it for the others nor leaves it half-done holding a permit.
    async fn lookup(
        self: Arc<Self>,
        ip: IpAddr,
        node: Option<Arc<str>>,
    ) -> Result<Arc<PodInfo>, FindError> {
        if self.recently_missing(ip) {
            self.metrics.negative_hits.inc();
            return Err(FindError::NotFound);
        }
        let lookup = {
            let mut lookups = self.lookups.lock().unwrap();
            lookups
                .entry(ip)
                .or_insert_with(|| {
                    let state = self.clone();
                    let task = tokio::spawn(async move {
                        state.metrics.in_flight.inc();
                        let result = state.lookup_api(ip, node.as_deref()).await;
                        state.metrics.in_flight.dec();
                        state.metrics.lookup_done(&result);
                        if matches!(result, Err(FindError::NotFound)) {
                            state.note_missing(ip);
                        }
                        state.lookups.lock().unwrap().remove(&ip);
                        result
                    });
                    task.map(move |joined| {
                        joined.unwrap_or(Err(FindError::Interrupted {
                            ip,
                            reason: "the server is shutting down",
                        }))
                    })
                    .boxed()
                    .shared()
                })
                .clone()
        };
        lookup.await
    }

    /// Did a lookup find no pod on `ip` within [`NEGATIVE_TTL`]?
    fn recently_missing(&self, ip: IpAddr) -> bool {
        let negatives = self.negatives.lock().unwrap();
        negatives
            .get(&ip)
            .is_some_and(|at| at.elapsed() < NEGATIVE_TTL)
    }

    fn note_missing(&self, ip: IpAddr) {
        let mut negatives = self.negatives.lock().unwrap();
        if negatives.len() >= NEGATIVES_PRUNE_AT {
            negatives.retain(|_, at| at.elapsed() < NEGATIVE_TTL);
        }
        negatives.insert(ip, Instant::now());
    }

    async fn lookup_api(&self, ip: IpAddr, node: Option<&str>) -> Result<Arc<PodInfo>, FindError> {
        // The selector compares text: an IPv6 address is written in RFC
        // 5952's canonical form here (Rust's Display) as by the kubelet (Go's
        // net.IP.String()), so the two spellings agree.
        let on_ip = format!("status.podIP={ip}");
        // Filter on the IP again: the field selector is the server's
        // business, the rule "never another pod's role" is ours.
        let live_in = |list: kube::api::ObjectList<PodView>| -> Vec<CachedPod> {
            let now = Timestamp::now();
            list.items
                .iter()
                .map(|pod| self.entry(pod))
                .filter(|e| e.info.has_ip(ip) && e.info.matches_ip_at(now))
                .collect()
        };
        // The timeout covers the wait for a slot too: a queue of lookups
        // behind a slow API server must not hold requests for longer.
        let live = tokio::time::timeout(LOOKUP_TIMEOUT, async {
            // The semaphore is never closed, so acquiring cannot fail.
            let _permit = self.lookup_permits.acquire().await;
            if let Some(node) = node {
                let params = ListParams::default().fields(&format!("spec.nodeName={node},{on_ip}"));
                let live = live_in(self.api.list(&params).await?);
                self.metrics.node_lookup(!live.is_empty());
                if !live.is_empty() {
                    return Ok(live);
                }
                tracing::debug!(pod.ip = %ip, node, "no pod on the agent's node has the IP; asking the whole cluster");
            }
            let list = self.api.list(&ListParams::default().fields(&on_ip)).await?;
            Ok::<_, kube::Error>(live_in(list))
        });
        let mut live = match live.await {
            Ok(Ok(live)) => live,
            Ok(Err(e)) => {
                return Err(FindError::Api {
                    ip,
                    source: Arc::new(e),
                })
            }
            Err(_) => {
                return Err(FindError::Interrupted {
                    ip,
                    reason: "no answer within 5s",
                })
            }
        };
        match live.len() {
            0 => Err(FindError::NotFound),
            1 => {
                let entry = live.pop().expect("one element");
                let info = entry.info.clone();
                tracing::debug!(
                    pod.namespace = %info.namespace, pod.name = %info.name, pod.ip = %ip,
                    "found pod through the API before its watch event"
                );
                let prefetch = self.index.lock().unwrap().insert_fresh(entry);
                if let Some(prefetch) = prefetch {
                    self.prefetch(prefetch);
                }
                // Just read from the API: no need to confirm it again at once.
                self.confirmations.lock().unwrap().insert(
                    info.uid.clone(),
                    Confirmation::Until {
                        until: Instant::now() + CONFIRM_TTL,
                        by_api: true,
                    },
                );
                Ok(info)
            }
            _ => {
                let pods: Vec<String> = live
                    .iter()
                    .map(|e| format!("{}/{}", e.info.namespace, e.info.name))
                    .collect();
                tracing::warn!(pod.ip = %ip, pods = ?pods, "several live pods share one IP; refusing to answer");
                Err(FindError::Ambiguous { ip, pods })
            }
        }
    }
}
