//! The Pod cache: a small projection of each Pod (not whole objects), kept by
//! a kube-runtime watcher and indexed by pod IP and by role identity.
//!
//! Like any watch-based cache it may lag the API server; a miss on an IP
//! (or two live pods claiming one IP) is therefore settled by one direct API
//! lookup (`fieldSelector=status.podIP=<ip>`) before answering, and an
//! answer that is still ambiguous is an error, never a guess.
//!
//! What may be stale: a pod whose deletion or completion the watch has not
//! delivered yet. Because its IP may already belong to a new pod, a cached
//! answer is confirmed with one GET of that pod by name (not a list) before
//! it is used, at most once per [`CONFIRM_TTL`] per pod and shared by
//! concurrent requests: a pod the API reports gone, completed or moved is
//! dropped and the IP is looked up afresh. A confirmation that fails or
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

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::{BoxFuture, Shared};
use futures::{FutureExt, StreamExt};
use jiff::Timestamp;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, ListParams};
use kube::runtime::watcher::{self, watcher};
use kube::runtime::WatchStreamExt;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio_util::sync::{CancellationToken, DropGuard};

use super::policy::{
    self, ArnResolver, PolicyError, EXTERNAL_ID_ANNOTATION, ROLE_ANNOTATION,
    SESSION_NAME_ANNOTATION,
};
use super::sts::Identity;

/// At most this many direct pod lookups run at once, however many IPs miss:
/// a `status.podIP` field selector is not indexed by the API server.
const MAX_CONCURRENT_LOOKUPS: usize = 8;
/// A direct lookup that takes longer than this answers an error; agents
/// retry within their own deadline.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a deleted pod's uid is remembered, so that a direct lookup that
/// raced with the deletion cannot re-insert it. A lookup's answer is at most
/// [`LOOKUP_TIMEOUT`] old when it is inserted, so this is ample.
const TOMBSTONE_TTL: Duration = Duration::from_secs(60);
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

/// The pod phases kiam cares about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodPhase {
    Pending,
    Running,
    Succeeded,
    Failed,
    Unknown,
}

impl PodPhase {
    fn parse(phase: Option<&str>) -> Self {
        match phase {
            Some("Pending") => PodPhase::Pending,
            Some("Running") => PodPhase::Running,
            Some("Succeeded") => PodPhase::Succeeded,
            Some("Failed") => PodPhase::Failed,
            _ => PodPhase::Unknown,
        }
    }

    /// Succeeded or Failed: the containers are gone and the IP may be reused.
    pub fn is_completed(self) -> bool {
        matches!(self, PodPhase::Succeeded | PodPhase::Failed)
    }
}

/// What kiam keeps of a Pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInfo {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
    /// Distinguishes a new pod that reuses an old pod's name or IP.
    pub uid: Arc<str>,
    pub ip: Option<IpAddr>,
    pub phase: PodPhase,
    /// Host-network pods share the node's IP and are never matched.
    pub host_network: bool,
    /// `deletionTimestamp`; a pod past it (the grace period is already
    /// folded in by the API server) is never matched.
    pub deletion: Option<Timestamp>,
    /// `iam.amazonaws.com/role`, as written (name, `/name` or an ARN).
    pub role: Option<Arc<str>>,
    /// `iam.amazonaws.com/session-name`.
    pub session_name: Option<Arc<str>>,
    /// `iam.amazonaws.com/external-id`.
    pub external_id: Option<Arc<str>>,
    pub service_account: Option<Arc<str>>,
}

impl PodInfo {
    /// The projection of a whole `pod`, by the rules of [`PodInfo::from_view`].
    pub fn from_pod(pod: &Pod) -> Self {
        // One set of rules: project the fields a PodView keeps, then use it.
        Self::from_view(&PodView {
            metadata: pod.metadata.clone(),
            spec: pod.spec.as_ref().map(|s| SpecView {
                host_network: s.host_network,
                service_account_name: s.service_account_name.clone(),
            }),
            status: pod.status.as_ref().map(|s| StatusView {
                phase: s.phase.clone(),
                pod_ip: s.pod_ip.clone(),
            }),
        })
    }

    /// May a request from this pod's IP be answered with this pod at `now`?
    /// Not when it has no IP, uses the host's network, has completed, or is
    /// past its deletion deadline. Pending pods with an IP do match.
    pub fn matches_ip_at(&self, now: Timestamp) -> bool {
        self.ip.is_some()
            && !self.host_network
            && !self.phase.is_completed()
            && self.deletion.is_none_or(|deadline| deadline > now)
    }
}

impl PodInfo {
    /// The projection of a [`PodView`]. Empty annotations count as absent (as
    /// in kiam); only `status.podIP` is used (kiam's rule, and the only IP the
    /// `status.podIP` field selector knows); an unparsable IP counts as none.
    pub fn from_view(pod: &PodView) -> Self {
        let meta = &pod.metadata;
        let annotation = |key: &str| {
            meta.annotations
                .as_ref()
                .and_then(|a| a.get(key))
                .filter(|v| !v.is_empty())
                .map(|v| Arc::<str>::from(v.as_str()))
        };
        let status = pod.status.as_ref();
        let spec = pod.spec.as_ref();
        PodInfo {
            namespace: meta.namespace.as_deref().unwrap_or_default().into(),
            name: meta.name.as_deref().unwrap_or_default().into(),
            uid: meta.uid.as_deref().unwrap_or_default().into(),
            ip: status
                .and_then(|s| s.pod_ip.as_deref())
                .and_then(|ip| ip.parse().ok()),
            phase: PodPhase::parse(status.and_then(|s| s.phase.as_deref())),
            host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
            deletion: meta
                .deletion_timestamp
                .as_ref()
                .and_then(|t| from_k8s_time(&t.0)),
            role: annotation(ROLE_ANNOTATION),
            session_name: annotation(SESSION_NAME_ANNOTATION),
            external_id: annotation(EXTERNAL_ID_ANNOTATION),
            service_account: spec
                .and_then(|s| s.service_account_name.as_deref())
                .filter(|s| !s.is_empty())
                .map(Into::into),
        }
    }
}

/// The fields of a Pod that kiam reads, deserialized straight from the API
/// server's JSON; everything else — env, volumes, probes, managed fields,
/// container statuses, annotations other than kiam's — is skipped without
/// being built. A real pod is 4-8 KB of JSON of which kiam keeps a dozen
/// fields, so at start-up (a full LIST) building whole `Pod` objects only
/// to drop them was most of the sync's time and its peak memory.
#[derive(Clone, Debug, Default, serde::Deserialize)]
pub struct PodView {
    #[serde(default, deserialize_with = "view::metadata")]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: Option<SpecView>,
    #[serde(default)]
    pub status: Option<StatusView>,
}

#[derive(Clone, Debug, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SpecView {
    pub host_network: Option<bool>,
    pub service_account_name: Option<String>,
}

#[derive(Clone, Debug, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusView {
    pub phase: Option<String>,
    #[serde(rename = "podIP")]
    pub pod_ip: Option<String>,
}

impl k8s_openapi::Resource for PodView {
    const API_VERSION: &'static str = <Pod as k8s_openapi::Resource>::API_VERSION;
    const GROUP: &'static str = <Pod as k8s_openapi::Resource>::GROUP;
    const KIND: &'static str = <Pod as k8s_openapi::Resource>::KIND;
    const VERSION: &'static str = <Pod as k8s_openapi::Resource>::VERSION;
    const URL_PATH_SEGMENT: &'static str = <Pod as k8s_openapi::Resource>::URL_PATH_SEGMENT;
    type Scope = <Pod as k8s_openapi::Resource>::Scope;
}

impl k8s_openapi::Metadata for PodView {
    type Ty = ObjectMeta;

    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// Deserializers that keep only what [`PodView`] needs.
mod view {
    use std::collections::BTreeMap;
    use std::fmt;

    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
    use serde::de::{self, Deserializer, IgnoredAny, MapAccess, Visitor};
    use serde::Deserialize;

    use super::{EXTERNAL_ID_ANNOTATION, ROLE_ANNOTATION, SESSION_NAME_ANNOTATION};

    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Meta {
        name: Option<String>,
        namespace: Option<String>,
        uid: Option<String>,
        resource_version: Option<String>,
        deletion_timestamp: Option<Time>,
        #[serde(default, deserialize_with = "kiam_annotations")]
        annotations: Option<BTreeMap<String, String>>,
    }

    pub(super) fn metadata<'de, D: Deserializer<'de>>(d: D) -> Result<ObjectMeta, D::Error> {
        let m = Option::<Meta>::deserialize(d)?;
        Ok(m.map(|m| ObjectMeta {
            name: m.name,
            namespace: m.namespace,
            uid: m.uid,
            resource_version: m.resource_version,
            deletion_timestamp: m.deletion_timestamp,
            annotations: m.annotations,
            ..ObjectMeta::default()
        })
        .unwrap_or_default())
    }

    /// An annotation key: `Some` only for the annotations kiam reads.
    struct Key(Option<String>);

    impl<'de> Deserialize<'de> for Key {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl Visitor<'_> for V {
                type Value = Key;
                fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                    f.write_str("an annotation key")
                }
                fn visit_str<E: de::Error>(self, v: &str) -> Result<Key, E> {
                    let wanted = [
                        ROLE_ANNOTATION,
                        SESSION_NAME_ANNOTATION,
                        EXTERNAL_ID_ANNOTATION,
                    ];
                    Ok(Key(wanted.contains(&v).then(|| v.to_string())))
                }
            }
            d.deserialize_str(V)
        }
    }

    fn kiam_annotations<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<BTreeMap<String, String>>, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Option<BTreeMap<String, String>>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a map of annotations")
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(None)
            }
            fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(None)
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
                d.deserialize_map(self)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut kept = BTreeMap::new();
                while let Some(Key(key)) = map.next_key()? {
                    match key {
                        Some(key) => {
                            kept.insert(key, map.next_value()?);
                        }
                        None => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(Some(kept))
            }
        }
        d.deserialize_option(V)
    }
}

/// k8s-openapi uses jiff 0.2 and this crate jiff 1; both count nanoseconds
/// since the epoch.
fn from_k8s_time(t: &k8s_openapi::jiff::Timestamp) -> Option<Timestamp> {
    Timestamp::from_nanosecond(t.as_nanosecond()).ok()
}

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
    /// `--session`: the session name for pods without
    /// `iam.amazonaws.com/session-name`.
    pub session: String,
    /// `--prefetch-buffer-size`: capacity of the prefetch channel.
    pub prefetch_buffer_size: usize,
    /// `--sync`: the watch timeout (see the module doc); zero means
    /// kube-runtime's default (290s).
    pub resync: Duration,
}

/// A cheaply cloneable handle on the Pod cache. The watch stops when the
/// last handle is dropped.
#[derive(Clone)]
pub struct PodCache {
    handle: Arc<Handle>,
}

struct Handle {
    state: Arc<State>,
    _stop: DropGuard,
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
    /// Trusted until then.
    Until(Instant),
    InFlight(Shared<BoxFuture<'static, Confirmed>>),
}

struct State {
    // std Mutex: no `.await` happens while it is held.
    index: Mutex<Index>,
    resolver: Arc<ArnResolver>,
    session: String,
    api: Api<PodView>,
    prefetch: mpsc::Sender<PodInfo>,
    dropped: Counter,
    synced: Synced,
    // std Mutex: held only to find or insert a lookup, never across `.await`.
    lookups: Mutex<HashMap<IpAddr, Lookup>>,
    lookup_permits: Semaphore,
    // std Mutex: held only to find or insert a confirmation, never across `.await`.
    confirmations: Mutex<HashMap<Arc<str>, Confirmation>>,
}

impl PodCache {
    /// Starts watching every Pod in the cluster. Returns the cache and the
    /// prefetch receiver: a [`PodInfo`] arrives whenever a pod with a
    /// resolvable role and an IP (Pending or Running) appears, or its role,
    /// session name, external id or IP changes. When the receiver lags and
    /// the channel is full, the announcement is dropped and counted in
    /// `kiam_k8s_dropped_pods_total`; the watcher never waits.
    ///
    /// Must be called inside a tokio runtime (it spawns the watch).
    pub fn spawn(
        client: kube::Client,
        resolver: Arc<ArnResolver>,
        config: PodCacheConfig,
        registry: &mut Registry,
    ) -> (PodCache, mpsc::Receiver<PodInfo>) {
        let (prefetch, receiver) = mpsc::channel(config.prefetch_buffer_size.max(1));
        let dropped = Counter::default();
        registry.register(
            "kiam_k8s_dropped_pods",
            "Number of dropped pods because of full buffer",
            dropped.clone(),
        );
        let state = Arc::new(State {
            index: Mutex::new(Index::default()),
            resolver,
            session: config.session,
            api: Api::all(client),
            prefetch,
            dropped,
            synced: Synced::default(),
            lookups: Mutex::new(HashMap::new()),
            lookup_permits: Semaphore::new(MAX_CONCURRENT_LOOKUPS),
            confirmations: Mutex::new(HashMap::new()),
        });
        let stop = CancellationToken::new();
        let task_state = state.clone();
        tokio::spawn(drive(
            state.api.clone(),
            config.resync,
            stop.clone(),
            "pod",
            move |event| task_state.on_event(event),
        ));
        let cache = PodCache {
            handle: Arc::new(Handle {
                state,
                _stop: stop.drop_guard(),
            }),
        };
        (cache, receiver)
    }

    /// The one live pod using `ip`. Answers from the cache when it knows
    /// exactly one live pod there and the API confirms it (see the module
    /// doc); otherwise asks the API server once (at most one lookup per IP
    /// is in flight, shared by concurrent callers) and answers from that:
    /// one live pod (also put in the cache), none ([`FindError::NotFound`])
    /// or several ([`FindError::Ambiguous`]).
    pub async fn find_by_ip(&self, ip: IpAddr) -> Result<Arc<PodInfo>, FindError> {
        let state = &self.handle.state;
        let live = state.index.lock().unwrap().live_on(ip, Timestamp::now());
        if let [only] = live.as_slice() {
            if state.clone().confirm(only.clone(), ip).await == Confirmed::Trusted {
                return Ok(only.clone());
            }
            tracing::info!(
                pod.namespace = %only.namespace, pod.name = %only.name, pod.ip = %ip,
                "the cached pod for this IP is gone or moved (the watch lags); asking who has the IP now"
            );
        }
        tracing::debug!(pod.ip = %ip, cached_live_pods = live.len(), "asking the API server for the pod");
        state.clone().lookup(ip).await
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

    /// Every identity [`identity_in_use`](Self::identity_in_use) says is in use.
    pub fn identities(&self) -> Vec<Identity> {
        let index = self.handle.state.index.lock().unwrap();
        index.identities.keys().cloned().collect()
    }

    /// The identity `pod` would receive (its annotated role, session name and
    /// external id), with this cache's resolver and `--session`.
    pub fn identity_for(&self, pod: &PodInfo) -> Result<Option<Identity>, PolicyError> {
        let state = &self.handle.state;
        policy::identity_for(pod, &state.resolver, &state.session)
    }

    pub fn resolver(&self) -> &Arc<ArnResolver> {
        &self.handle.state.resolver
    }

    /// The cached projection of one pod, live or not.
    pub fn get(&self, namespace: &str, name: &str) -> Option<Arc<PodInfo>> {
        let index = self.handle.state.index.lock().unwrap();
        index
            .pods
            .get(&(Arc::from(namespace), Arc::from(name)))
            .map(|e| e.info.clone())
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

impl State {
    fn entry(&self, pod: &PodView) -> Entry {
        let info = PodInfo::from_view(pod);
        let identity = match policy::identity_for(&info, &self.resolver, &self.session) {
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
        Entry {
            info: Arc::new(info),
            identity,
            resource_version: pod
                .metadata
                .resource_version
                .as_deref()
                .and_then(|rv| rv.parse().ok()),
        }
    }

    fn on_event(&self, event: watcher::Event<PodView>) {
        let announce = {
            let mut index = self.index.lock().unwrap();
            match event {
                watcher::Event::Init => {
                    index.relisted = Some(HashSet::new());
                    None
                }
                watcher::Event::InitApply(pod) => {
                    let entry = self.entry(&pod);
                    if let Some(seen) = index.relisted.as_mut() {
                        seen.insert(entry.key());
                    }
                    index.upsert(entry)
                }
                watcher::Event::InitDone => {
                    let gone = index.finish_relist();
                    drop(index);
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
                watcher::Event::Apply(pod) => index.upsert(self.entry(&pod)),
                watcher::Event::Delete(pod) => {
                    let info = PodInfo::from_view(&pod);
                    tracing::debug!(pod.namespace = %info.namespace, pod.name = %info.name, "pod deleted");
                    index.delete(&(info.namespace, info.name), &info.uid);
                    None
                }
            }
        };
        if let Some(info) = announce {
            self.announce(&info);
        }
    }

    fn announce(&self, info: &PodInfo) {
        match self.prefetch.try_send(info.clone()) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.dropped.inc();
                tracing::warn!(
                    pod.namespace = %info.namespace, pod.name = %info.name,
                    "prefetch buffer full (--prefetch-buffer-size), dropping pod announcement"
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
                Some(Confirmation::Until(t)) if Instant::now() < *t => return Confirmed::Trusted,
                Some(Confirmation::InFlight(f)) => f.clone(),
                _ => {
                    if confirmations.len() >= CONFIRMATIONS_PRUNE_AT {
                        let now = Instant::now();
                        confirmations.retain(|_, c| match c {
                            Confirmation::Until(t) => now < *t,
                            Confirmation::InFlight(_) => true,
                        });
                    }
                    let state = self.clone();
                    let uid = pod.uid.clone();
                    let task = tokio::spawn(async move {
                        let outcome = state.confirm_api(&pod, ip).await;
                        let mut confirmations = state.confirmations.lock().unwrap();
                        match outcome {
                            Confirmed::Trusted => {
                                let until = Instant::now() + CONFIRM_TTL;
                                confirmations.insert(pod.uid.clone(), Confirmation::Until(until));
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

    async fn confirm_api(&self, pod: &PodInfo, ip: IpAddr) -> Confirmed {
        let api: Api<PodView> = Api::namespaced(self.api.clone().into_client(), &pod.namespace);
        let fetched = match tokio::time::timeout(CONFIRM_TIMEOUT, api.get_opt(&pod.name)).await {
            Ok(Ok(fetched)) => fetched,
            Ok(Err(error)) => {
                tracing::debug!(pod.namespace = %pod.namespace, pod.name = %pod.name, %error,
                    "cannot confirm the cached pod; trusting the cache");
                return Confirmed::Trusted;
            }
            Err(_) => {
                tracing::debug!(pod.namespace = %pod.namespace, pod.name = %pod.name,
                    "confirming the cached pod took too long; trusting the cache");
                return Confirmed::Trusted;
            }
        };
        let key = (pod.namespace.clone(), pod.name.clone());
        let mut index = self.index.lock().unwrap();
        match fetched {
            None => {
                index.delete(&key, &pod.uid);
                Confirmed::Stale
            }
            Some(fetched) => {
                let entry = self.entry(&fetched);
                if entry.info.uid != pod.uid {
                    // Replaced by a namesake: the one we had is deleted.
                    index.delete(&key, &pod.uid);
                    return Confirmed::Stale;
                }
                let still = entry.info.ip == Some(ip) && entry.info.matches_ip_at(Timestamp::now());
                // Newer than the cache (the watch lags): keep what the API said.
                let announce = index.insert_fresh(entry);
                drop(index);
                if let Some(info) = announce {
                    self.announce(&info);
                }
                if still {
                    Confirmed::Trusted
                } else {
                    Confirmed::Stale
                }
            }
        }
    }

    /// Joins the in-flight lookup for `ip` or starts one. The lookup is a
    /// task, so a caller that gives up (its gRPC deadline passed) neither
    /// cancels it for the others nor leaves it half-done holding a permit.
    async fn lookup(self: Arc<Self>, ip: IpAddr) -> Result<Arc<PodInfo>, FindError> {
        let lookup = {
            let mut lookups = self.lookups.lock().unwrap();
            lookups
                .entry(ip)
                .or_insert_with(|| {
                    let state = self.clone();
                    let task = tokio::spawn(async move {
                        let result = state.lookup_api(ip).await;
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

    async fn lookup_api(&self, ip: IpAddr) -> Result<Arc<PodInfo>, FindError> {
        // The semaphore is never closed, so acquiring cannot fail.
        let _permit = self.lookup_permits.acquire().await;
        let params = ListParams::default().fields(&format!("status.podIP={ip}"));
        let list = match tokio::time::timeout(LOOKUP_TIMEOUT, self.api.list(&params)).await {
            Ok(Ok(list)) => list,
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
        let now = Timestamp::now();
        // Filter on the IP again: the field selector is the server's
        // business, the rule "never another pod's role" is ours.
        let mut live: Vec<Entry> = list
            .items
            .iter()
            .map(|pod| self.entry(pod))
            .filter(|e| e.info.ip == Some(ip) && e.info.matches_ip_at(now))
            .collect();
        match live.len() {
            0 => Err(FindError::NotFound),
            1 => {
                let entry = live.pop().expect("one element");
                let info = entry.info.clone();
                tracing::debug!(
                    pod.namespace = %info.namespace, pod.name = %info.name, pod.ip = %ip,
                    "found pod through the API before its watch event"
                );
                let announce = self.index.lock().unwrap().insert_fresh(entry);
                if let Some(announce) = announce {
                    self.announce(&announce);
                }
                // Just read from the API: no need to confirm it again at once.
                self.confirmations.lock().unwrap().insert(
                    info.uid.clone(),
                    Confirmation::Until(Instant::now() + CONFIRM_TTL),
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

type PodKey = (Arc<str>, Arc<str>);

struct Entry {
    info: Arc<PodInfo>,
    /// Resolved once per change, not per request; `None` without a
    /// (resolvable) role.
    identity: Option<Identity>,
    /// Lets a direct lookup replace only an older cached state of a pod.
    resource_version: Option<u64>,
}

impl Entry {
    fn key(&self) -> PodKey {
        (self.info.namespace.clone(), self.info.name.clone())
    }

    /// Counted in the identity index: it may still ask for credentials.
    fn uses_identity(&self) -> bool {
        self.identity.is_some() && !self.info.host_network && !self.info.phase.is_completed()
    }

    /// Worth prefetching for: has a role and an IP, and runs or is about to.
    fn announceable(&self) -> bool {
        self.identity.is_some()
            && self.info.ip.is_some()
            && !self.info.host_network
            && self.info.deletion.is_none()
            && matches!(self.info.phase, PodPhase::Pending | PodPhase::Running)
    }
}

#[derive(Default)]
struct Index {
    pods: HashMap<PodKey, Entry>,
    /// Every cached pod with an IP, live or not (liveness depends on time).
    by_ip: HashMap<IpAddr, Vec<PodKey>>,
    /// Live pods per identity.
    identities: HashMap<Identity, usize>,
    /// Uids deleted in the last [`TOMBSTONE_TTL`], oldest first.
    tombstones: VecDeque<(Instant, Arc<str>)>,
    tombstoned: HashSet<Arc<str>>,
    /// During a re-list: the pods it has listed so far.
    relisted: Option<HashSet<PodKey>>,
}

impl Index {
    fn live_on(&self, ip: IpAddr, now: Timestamp) -> Vec<Arc<PodInfo>> {
        let Some(keys) = self.by_ip.get(&ip) else {
            return Vec::new();
        };
        keys.iter()
            .filter_map(|k| self.pods.get(k))
            .filter(|e| e.info.matches_ip_at(now))
            .map(|e| e.info.clone())
            .collect()
    }

    /// Stores `entry`; returns the pod to announce for prefetch, if any:
    /// when it became announceable, or what it would be given changed.
    fn upsert(&mut self, entry: Entry) -> Option<PodInfo> {
        let key = entry.key();
        let old = self.remove(&key);
        let changed = old.as_ref().is_none_or(|old| {
            !old.announceable()
                || old.info.uid != entry.info.uid
                || old.identity != entry.identity
                || old.info.ip != entry.info.ip
        });
        let announce = (entry.announceable() && changed).then(|| (*entry.info).clone());
        if let Some(ip) = entry.info.ip {
            self.by_ip.entry(ip).or_default().push(key.clone());
        }
        if entry.uses_identity() {
            if let Some(identity) = &entry.identity {
                *self.identities.entry(identity.clone()).or_default() += 1;
            }
        }
        self.pods.insert(key, entry);
        announce
    }

    /// Stores what a direct lookup found, unless the watch already knows
    /// better: the pod was deleted meanwhile (its uid is tombstoned), or the
    /// cache holds another pod under that name or a state at least as new.
    fn insert_fresh(&mut self, entry: Entry) -> Option<PodInfo> {
        if self.tombstoned.contains(&entry.info.uid) {
            return None;
        }
        let newer = match self.pods.get(&entry.key()) {
            None => true,
            Some(old) => {
                old.info.uid == entry.info.uid
                    && matches!((old.resource_version, entry.resource_version),
                                (Some(cached), Some(fresh)) if cached < fresh)
            }
        };
        if newer {
            self.upsert(entry)
        } else {
            None
        }
    }

    fn remove(&mut self, key: &PodKey) -> Option<Entry> {
        let old = self.pods.remove(key)?;
        if let Some(ip) = old.info.ip {
            if let Some(keys) = self.by_ip.get_mut(&ip) {
                keys.retain(|k| k != key);
                if keys.is_empty() {
                    self.by_ip.remove(&ip);
                }
            }
        }
        if old.uses_identity() {
            if let Some(identity) = &old.identity {
                if let Some(count) = self.identities.get_mut(identity) {
                    *count -= 1;
                    if *count == 0 {
                        self.identities.remove(identity);
                    }
                }
            }
        }
        Some(old)
    }

    fn delete(&mut self, key: &PodKey, uid: &Arc<str>) {
        // A Delete for an older pod of the same name must not remove its successor.
        if self.pods.get(key).is_some_and(|e| e.info.uid == *uid) {
            self.remove(key);
        }
        self.tombstone(uid.clone());
    }

    fn tombstone(&mut self, uid: Arc<str>) {
        let now = Instant::now();
        while let Some((at, _)) = self.tombstones.front() {
            if now.duration_since(*at) < TOMBSTONE_TTL {
                break;
            }
            if let Some((_, old)) = self.tombstones.pop_front() {
                self.tombstoned.remove(&old);
            }
        }
        if self.tombstoned.insert(uid.clone()) {
            self.tombstones.push_back((now, uid));
        }
    }

    /// Ends a re-list: pods it did not list were deleted meanwhile. Returns
    /// how many were dropped.
    fn finish_relist(&mut self) -> usize {
        let Some(seen) = self.relisted.take() else {
            return 0;
        };
        let gone: Vec<PodKey> = self
            .pods
            .keys()
            .filter(|k| !seen.contains(*k))
            .cloned()
            .collect();
        for key in &gone {
            if let Some(old) = self.remove(key) {
                self.tombstone(old.info.uid.clone());
            }
        }
        gone.len()
    }
}

/// "The first full list has been applied", shared by the Pod and Namespace
/// caches.
#[derive(Debug)]
pub(super) struct Synced(watch::Sender<bool>);

impl Default for Synced {
    fn default() -> Self {
        Synced(watch::Sender::new(false))
    }
}

impl Synced {
    pub(super) fn set(&self) {
        self.0.send_replace(true);
    }

    pub(super) fn is_synced(&self) -> bool {
        *self.0.borrow()
    }

    pub(super) async fn wait(&self) {
        let mut synced = self.0.subscribe();
        // The sender lives as long as `self`, so this cannot fail.
        let _ = synced.wait_for(|s| *s).await;
    }
}

/// Runs a kube-runtime watcher until `stop` is cancelled, handing every
/// event to `on_event`. Errors are logged and retried with kube-runtime's
/// default backoff (0.8s doubling to 30s, like client-go); they never end
/// the watch.
pub(super) async fn drive<K>(
    api: Api<K>,
    resync: Duration,
    stop: CancellationToken,
    what: &'static str,
    mut on_event: impl FnMut(watcher::Event<K>) + Send,
) where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    let mut config = watcher::Config::default();
    if !resync.is_zero() {
        let secs = resync.as_secs().clamp(1, u64::from(u32::MAX));
        config = config.timeout(secs as u32);
    }
    let stream = watcher(api, config).default_backoff();
    futures::pin_mut!(stream);
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            next = stream.next() => match next {
                Some(Ok(event)) => on_event(event),
                Some(Err(error)) => {
                    let error = crate::telemetry::error_chain(&error);
                    tracing::warn!(%error, "{what} watch failed; retrying with backoff")
                }
                // The watcher stream never ends by itself.
                None => return,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const BASE: &str = "arn:aws:iam::123456789012:role/";

    fn pod_json(name: &str, uid: &str, ip: Option<&str>, phase: &str, role: Option<&str>) -> Pod {
        let mut annotations = serde_json::Map::new();
        if let Some(role) = role {
            annotations.insert(ROLE_ANNOTATION.into(), json!(role));
        }
        serde_json::from_value(json!({
            "metadata": {
                "namespace": "team-a", "name": name, "uid": uid, "resourceVersion": "10",
                "annotations": annotations,
            },
            "spec": { "containers": [], "serviceAccountName": "app" },
            "status": { "phase": phase, "podIP": ip },
        }))
        .unwrap()
    }

    fn entry(pod: &Pod) -> Entry {
        let info = PodInfo::from_pod(pod);
        let resolver = ArnResolver::new(BASE).unwrap();
        Entry {
            identity: policy::identity_for(&info, &resolver, "kiam").unwrap_or(None),
            info: Arc::new(info),
            resource_version: pod
                .metadata
                .resource_version
                .as_deref()
                .and_then(|v| v.parse().ok()),
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn names(pods: &[Arc<PodInfo>]) -> Vec<&str> {
        pods.iter().map(|p| &*p.name).collect()
    }

    #[test]
    fn projection_keeps_what_kiam_needs() {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {
                "namespace": "ns", "name": "p", "uid": "u1",
                "deletionTimestamp": "2030-01-02T03:04:05Z",
                "annotations": {
                    ROLE_ANNOTATION: "/foo", SESSION_NAME_ANNOTATION: "s",
                    EXTERNAL_ID_ANNOTATION: "", "other": "x",
                },
            },
            "spec": { "containers": [], "hostNetwork": true, "serviceAccountName": "sa" },
            "status": { "phase": "Running", "podIP": "fd00::5" },
        }))
        .unwrap();
        let info = PodInfo::from_pod(&pod);
        assert_eq!(&*info.namespace, "ns");
        assert_eq!(&*info.name, "p");
        assert_eq!(&*info.uid, "u1");
        assert_eq!(info.ip, Some(ip("fd00::5")));
        assert_eq!(info.phase, PodPhase::Running);
        assert!(info.host_network);
        assert_eq!(info.deletion, Some("2030-01-02T03:04:05Z".parse().unwrap()));
        assert_eq!(info.role.as_deref(), Some("/foo"));
        assert_eq!(info.session_name.as_deref(), Some("s"));
        assert_eq!(info.external_id, None, "empty annotations count as absent");
        assert_eq!(info.service_account.as_deref(), Some("sa"));

        let bare: Pod = serde_json::from_value(json!({
            "metadata": { "name": "q" }, "status": { "podIP": "not-an-ip" }
        }))
        .unwrap();
        let info = PodInfo::from_pod(&bare);
        assert_eq!(info.ip, None);
        assert_eq!(info.phase, PodPhase::Unknown);
        assert_eq!(info.role, None);
    }

    #[test]
    fn the_view_projects_like_the_full_pod() {
        let doc = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {
                "namespace": "ns", "name": "p", "uid": "u1", "resourceVersion": "42",
                "deletionTimestamp": "2030-01-02T03:04:05Z",
                "labels": {"app": "web"},
                "annotations": {
                    ROLE_ANNOTATION: "/foo", SESSION_NAME_ANNOTATION: "s",
                    EXTERNAL_ID_ANNOTATION: "", "kubectl.kubernetes.io/last-applied-configuration": "{\"big\": [1, 2]}",
                },
                "managedFields": [{"manager": "kubelet", "fieldsV1": {"f:status": {}}}],
            },
            "spec": {
                "containers": [{"name": "app", "image": "x", "env": [{"name": "A", "value": "b"}]}],
                "hostNetwork": true, "serviceAccountName": "sa",
            },
            "status": { "phase": "Running", "podIP": "fd00::5", "conditions": [{"type": "Ready"}] },
        });
        let full: Pod = serde_json::from_value(doc.clone()).unwrap();
        let view: PodView = serde_json::from_value(doc).unwrap();
        assert_eq!(PodInfo::from_view(&view), PodInfo::from_pod(&full));
        assert_eq!(view.metadata.resource_version.as_deref(), Some("42"));
        // Only kiam's annotations are kept.
        assert_eq!(view.metadata.annotations.as_ref().map(|a| a.len()), Some(3));

        // Missing or null parts are absent, not errors.
        let bare: PodView = serde_json::from_value(json!({
            "metadata": { "name": "q", "annotations": null }, "spec": null
        }))
        .unwrap();
        assert_eq!(PodInfo::from_view(&bare).role, None);
        let empty: PodView = serde_json::from_value(json!({})).unwrap();
        assert_eq!(&*PodInfo::from_view(&empty).name, "");
    }

    #[test]
    fn matching_rule() {
        let now = Timestamp::now();
        let base = PodInfo::from_pod(&pod_json("p", "u", Some("10.0.0.1"), "Running", None));
        assert!(base.matches_ip_at(now));
        let pending = PodInfo {
            phase: PodPhase::Pending,
            ..base.clone()
        };
        assert!(pending.matches_ip_at(now));
        for phase in [PodPhase::Succeeded, PodPhase::Failed] {
            assert!(!PodInfo {
                phase,
                ..base.clone()
            }
            .matches_ip_at(now));
        }
        assert!(!PodInfo {
            host_network: true,
            ..base.clone()
        }
        .matches_ip_at(now));
        assert!(!PodInfo {
            ip: None,
            ..base.clone()
        }
        .matches_ip_at(now));
        let in_grace = PodInfo {
            deletion: Some(now + jiff::SignedDuration::from_secs(30)),
            ..base.clone()
        };
        assert!(in_grace.matches_ip_at(now));
        let past = PodInfo {
            deletion: Some(now - jiff::SignedDuration::from_secs(1)),
            ..base.clone()
        };
        assert!(!past.matches_ip_at(now));
    }

    #[test]
    fn ip_reuse_answers_the_new_pod_only() {
        let mut index = Index::default();
        let now = Timestamp::now();
        index.upsert(entry(&pod_json(
            "old",
            "u1",
            Some("10.0.0.1"),
            "Running",
            Some("old-role"),
        )));
        assert_eq!(names(&index.live_on(ip("10.0.0.1"), now)), ["old"]);
        // The old pod completes, a new one gets its IP.
        index.upsert(entry(&pod_json(
            "old",
            "u1",
            Some("10.0.0.1"),
            "Succeeded",
            Some("old-role"),
        )));
        index.upsert(entry(&pod_json(
            "new",
            "u2",
            Some("10.0.0.1"),
            "Pending",
            Some("new-role"),
        )));
        let live = index.live_on(ip("10.0.0.1"), now);
        assert_eq!(names(&live), ["new"]);
        assert_eq!(live[0].role.as_deref(), Some("new-role"));
        // Deleting the old pod removes it from the IP index entirely.
        index.delete(&("team-a".into(), "old".into()), &"u1".into());
        assert_eq!(index.by_ip[&ip("10.0.0.1")].len(), 1);
        index.delete(&("team-a".into(), "new".into()), &"u2".into());
        assert!(index.by_ip.is_empty() && index.pods.is_empty());
    }

    #[test]
    fn a_pod_moving_ip_is_reindexed() {
        let mut index = Index::default();
        let now = Timestamp::now();
        index.upsert(entry(&pod_json(
            "p",
            "u1",
            Some("10.0.0.1"),
            "Running",
            None,
        )));
        index.upsert(entry(&pod_json(
            "p",
            "u1",
            Some("10.0.0.2"),
            "Running",
            None,
        )));
        assert!(index.live_on(ip("10.0.0.1"), now).is_empty());
        assert_eq!(names(&index.live_on(ip("10.0.0.2"), now)), ["p"]);
    }

    #[test]
    fn identities_count_live_pods_only() {
        let mut index = Index::default();
        let a = entry(&pod_json(
            "a",
            "u1",
            Some("10.0.0.1"),
            "Running",
            Some("foo"),
        ));
        let id = a.identity.clone().unwrap();
        index.upsert(a);
        // `/foo` is the same identity.
        index.upsert(entry(&pod_json("b", "u2", None, "Pending", Some("/foo"))));
        assert_eq!(index.identities[&id], 2);
        index.upsert(entry(&pod_json(
            "a",
            "u1",
            Some("10.0.0.1"),
            "Failed",
            Some("foo"),
        )));
        assert_eq!(index.identities[&id], 1);
        // Re-applying an unchanged pod does not double-count.
        index.upsert(entry(&pod_json("b", "u2", None, "Pending", Some("/foo"))));
        assert_eq!(index.identities[&id], 1);
        index.delete(&("team-a".into(), "b".into()), &"u2".into());
        assert!(index.identities.is_empty());
        // Unresolvable roles count for nothing.
        index.upsert(entry(&pod_json(
            "c",
            "u3",
            None,
            "Running",
            Some("bad role"),
        )));
        assert!(index.identities.is_empty());
    }

    #[test]
    fn announces_when_a_pod_with_a_role_becomes_runnable_or_changes() {
        let mut index = Index::default();
        // No IP yet: nothing to prefetch for.
        assert!(index
            .upsert(entry(&pod_json("p", "u1", None, "Pending", Some("foo"))))
            .is_none());
        let announced = index
            .upsert(entry(&pod_json(
                "p",
                "u1",
                Some("10.0.0.1"),
                "Pending",
                Some("foo"),
            )))
            .expect("pending with an IP is announced");
        assert_eq!(announced.role.as_deref(), Some("foo"));
        // Running, same role and IP: already announced.
        assert!(index
            .upsert(entry(&pod_json(
                "p",
                "u1",
                Some("10.0.0.1"),
                "Running",
                Some("foo")
            )))
            .is_none());
        // The role changes: announce again.
        assert!(index
            .upsert(entry(&pod_json(
                "p",
                "u1",
                Some("10.0.0.1"),
                "Running",
                Some("bar")
            )))
            .is_some());
        // No role, completed, host network: never.
        assert!(index
            .upsert(entry(&pod_json(
                "q",
                "u2",
                Some("10.0.0.2"),
                "Running",
                None
            )))
            .is_none());
        assert!(index
            .upsert(entry(&pod_json(
                "r",
                "u3",
                Some("10.0.0.3"),
                "Succeeded",
                Some("foo")
            )))
            .is_none());
        let mut host: Pod = pod_json("h", "u4", Some("10.0.0.4"), "Running", Some("foo"));
        host.spec.as_mut().unwrap().host_network = Some(true);
        assert!(index.upsert(entry(&host)).is_none());
    }

    #[test]
    fn direct_lookups_never_resurrect_or_overwrite_newer_state() {
        let mut index = Index::default();
        let now = Timestamp::now();
        // A lookup raced with a deletion the watch already applied.
        index.upsert(entry(&pod_json(
            "p",
            "u1",
            Some("10.0.0.1"),
            "Running",
            Some("foo"),
        )));
        index.delete(&("team-a".into(), "p".into()), &"u1".into());
        assert!(index
            .insert_fresh(entry(&pod_json(
                "p",
                "u1",
                Some("10.0.0.1"),
                "Running",
                Some("foo")
            )))
            .is_none());
        assert!(index.live_on(ip("10.0.0.1"), now).is_empty());

        // Unknown pod: inserted (and announced).
        assert!(index
            .insert_fresh(entry(&pod_json(
                "q",
                "u2",
                Some("10.0.0.2"),
                "Running",
                Some("foo")
            )))
            .is_some());
        assert_eq!(names(&index.live_on(ip("10.0.0.2"), now)), ["q"]);

        // Same resourceVersion or older: the cache keeps its state.
        let mut older = pod_json("q", "u2", Some("10.0.0.9"), "Running", Some("foo"));
        older.metadata.resource_version = Some("9".into());
        index.insert_fresh(entry(&older));
        assert_eq!(names(&index.live_on(ip("10.0.0.2"), now)), ["q"]);
        // Newer: replaces.
        let mut newer = pod_json("q", "u2", Some("10.0.0.3"), "Running", Some("foo"));
        newer.metadata.resource_version = Some("11".into());
        index.insert_fresh(entry(&newer));
        assert!(index.live_on(ip("10.0.0.2"), now).is_empty());
        assert_eq!(names(&index.live_on(ip("10.0.0.3"), now)), ["q"]);
        // Another pod under the same name: the watch decides.
        index.insert_fresh(entry(&pod_json(
            "q",
            "u9",
            Some("10.0.0.4"),
            "Running",
            None,
        )));
        assert_eq!(&*index.pods[&("team-a".into(), "q".into())].info.uid, "u2");
    }

    #[test]
    fn a_delete_for_an_older_pod_keeps_its_successor() {
        let mut index = Index::default();
        index.upsert(entry(&pod_json(
            "p",
            "new-uid",
            Some("10.0.0.1"),
            "Running",
            None,
        )));
        index.delete(&("team-a".into(), "p".into()), &"old-uid".into());
        assert_eq!(index.pods.len(), 1);
    }

    #[test]
    fn relist_drops_pods_deleted_while_the_watch_was_down() {
        let mut index = Index::default();
        index.upsert(entry(&pod_json(
            "gone",
            "u1",
            Some("10.0.0.1"),
            "Running",
            Some("foo"),
        )));
        index.upsert(entry(&pod_json(
            "kept",
            "u2",
            Some("10.0.0.2"),
            "Running",
            Some("foo"),
        )));
        index.relisted = Some(HashSet::new());
        let kept = entry(&pod_json(
            "kept",
            "u2",
            Some("10.0.0.2"),
            "Running",
            Some("foo"),
        ));
        index.relisted.as_mut().unwrap().insert(kept.key());
        index.upsert(kept);
        assert_eq!(index.finish_relist(), 1);
        assert!(index.pods.keys().all(|(_, name)| &**name == "kept"));
        assert!(!index.by_ip.contains_key(&ip("10.0.0.1")));
        assert_eq!(index.identities.values().sum::<usize>(), 1);
        assert!(index.tombstoned.contains("u1"));
    }
}
