//! An in-memory Kubernetes API server over plain HTTP, for tests and the local sandbox.
//!
//! Unlike a real API server, it can be made to misbehave on purpose: hold watch events
//! back while LIST and GET already see them, cut every watch mid-stream, forget its
//! history so old resourceVersions get 410 Gone, refuse connections, or answer 503 to
//! everything. Otherwise it tries to be indistinguishable from the real thing for kube-rs and `kubectl`: core/v1
//! pods, namespaces, nodes, service accounts and events (plus events.k8s.io/v1 events),
//! discovery, one global resourceVersion counter, optimistic concurrency,
//! merge/strategic/JSON patches, label and field selectors, `limit`/`continue` paging, and
//! chunked watches with bookmarks.
//!
//! It is also a service-account token issuer, as pods' projected tokens need: TokenRequest
//! (`POST .../serviceaccounts/{name}/token`, JSON or the protobuf `kubectl create token`
//! sends) returns a signed JWT with the bound-token claims (`iss`, `sub`, `aud`, `exp`,
//! `iat`, `nbf`, `jti`, and `kubernetes.io` with namespace, service account, pod and
//! node); TokenReview (`POST /apis/authentication.k8s.io/v1/tokenreviews`) checks one
//! with the real authenticator's rules (signature, one-minute leeway on times, audiences,
//! the service account and bound pod or node still existing with the same uid); and
//! `/.well-known/openid-configuration` and `/openid/v1/jwks` publish the verifying key.
//! Tests mint tokens as the kubelet would with [`FakeApiServer::issue_token`] and forge bad
//! ones with [`FakeApiServer::sign_token`], [`tampered_token`], [`unsigned_token`] and
//! [`foreign_signed_token`].
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use kiam_sandbox::apiserver::FakeApiServer;
//! let api = FakeApiServer::start().await?;
//! api.create_namespace("team-a")?;
//! api.apply_pod(serde_json::json!({
//!     "apiVersion": "v1", "kind": "Pod",
//!     "metadata": {"name": "web", "namespace": "team-a",
//!                  "annotations": {"iam.amazonaws.com/role": "reader"}},
//!     "spec": {"containers": [{"name": "web", "image": "nginx"}]},
//!     "status": {"phase": "Running", "podIP": "198.18.0.10"}
//! }))?;
//! // Point kube-rs (`kube::Config::new(api.url().parse()?)`) or kubectl
//! // (`api.write_kubeconfig(path)`) at it.
//! # Ok(()) }
//! ```
//!
//! Creates through the API go through registered mutating admission webhooks
//! ([`FakeApiServer::register_mutating_webhook_configuration`]), called over HTTPS with
//! real AdmissionReview v1 JSON as the real dispatcher calls them (the `admission`
//! module says what differs). Test controls bypass admission, as a kubelet's writes would.
//!
//! Objects written through the API follow the real registry's rules (a created pod's
//! status is reset to Pending; PUT/PATCH of a pod ignore `.status`, the `/status`
//! subresource changes only status). The test controls on [`FakeApiServer`] write
//! objects as given, status included, which is how tests give pods IPs and phases.
//!
//! Known differences from a real server: deletion is immediate (no kubelet honours a grace
//! period; use [`FakeApiServer::mark_pod_terminating`]), pod spec updates are not
//! restricted, strategic merge patches replace lists instead of merging them, core/v1
//! Events are only checked for the namespace rule (not the stricter rules for Events with an
//! `eventTime`), server-side apply answers 415, and only JSON (and YAML request bodies) is
//! spoken, never protobuf (except a TokenRequest body, which `kubectl create token` sends
//! in nothing else). The OpenAPI documents have no schemas, so `kubectl create -f` of a
//! kind without PATCH (TokenReview) needs `--validate=false`.
//!
//! Token differences: tokens are ES256 (a P-256 key made at start) where real servers
//! most often sign RS256, though they take ECDSA keys too. The issuer defaults to
//! [`DEFAULT_ISSUER`] while the discovery document and JWKS are served over plain HTTP at
//! the fake's address (a real server requires https there). The `default` ServiceAccount
//! is created with its namespace rather than moments later by a controller. Of
//! ServiceAccount admission, pods created through the API only get the `serviceAccountName`
//! default (`default`), not its token volume or the check that the account exists; pods
//! written by test controls get nothing (an empty `serviceAccountName` counts as
//! `default`). Tokens bind to pods and nodes, not Secrets. A TokenRequest is never
//! extended to a year for the kubelet (`--service-account-extend-token-expiration`) nor
//! capped by `--service-account-max-token-expiration`. No request is authenticated or
//! authorized: anyone may ask for any token. Reviews are not answered from the cache of
//! successful reviews a real server keeps for ten seconds unless a test asks for it
//! ([`FakeApiServer::set_token_review_cache`]): a deleted pod's token fails at once here,
//! and up to ten seconds later there.

mod admission;
mod discovery;
mod http;
mod jwt;
mod kinds;
mod ops;
mod protobuf;
mod resources;
mod selector;
mod status;
mod store;
mod table;
mod tokens;
mod watch;

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::watch as signal;

pub use jwt::{foreign_signed_token, tampered_token, token_claims, unsigned_token};
pub use resources::Resource;
pub use status::ApiError;
pub use tokens::DEFAULT_ISSUER;

use resources::metadata_mut;
use store::Store;

/// How many changes watches can resume across before a resourceVersion is too old.
const HISTORY_LIMIT: usize = 10_000;

/// How many requests the log keeps; the oldest are dropped so a long sandbox run stays small.
const REQUEST_LOG_LIMIT: usize = 50_000;

/// Real servers send a bookmark about once a minute; tests want them sooner.
const DEFAULT_BOOKMARK_INTERVAL: Duration = Duration::from_secs(1);

/// One request as the server received it, for assertions like "a GET with
/// `fieldSelector=status.podIP=...` happened".
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordedRequest {
    /// The HTTP method, e.g. "GET".
    pub method: String,
    /// The Kubernetes verb: get, list, watch, create, update, patch, delete,
    /// deletecollection, or "get" for discovery documents.
    pub verb: &'static str,
    /// The URL path, e.g. "/api/v1/pods".
    pub path: String,
    /// Decoded query parameters in order.
    pub query: Vec<(String, String)>,
}

impl RecordedRequest {
    /// The first value of a query parameter.
    pub fn param(&self, key: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// State shared by the handle, the accept loop, connections and watch tasks.
pub(crate) struct Shared {
    pub(crate) store: Store,
    pub(crate) addr: SocketAddr,
    // std Mutex: only pushed to and copied, never held across an `.await`.
    requests: Mutex<VecDeque<RecordedRequest>>,
    unavailable: AtomicBool,
    /// While true, new connections are closed at once and open ones are dropped.
    refuse: signal::Sender<bool>,
    /// Bumped to end every open watch abruptly.
    pub(crate) cut: signal::Sender<u64>,
    /// How many watch streams are open, so tests can wait for a watcher to connect.
    pub(crate) open_watches: signal::Sender<usize>,
    // std Mutex: read once per watch, never held across an `.await`.
    bookmark_interval: Mutex<Duration>,
    /// Signs service-account tokens and checks them for TokenReview.
    pub(crate) tokens: tokens::Issuer,
    /// Mutating admission webhooks called on create.
    pub(crate) admission: admission::Registry,
}

impl Shared {
    pub(crate) fn record(&self, request: RecordedRequest) {
        let mut log = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        if log.len() >= REQUEST_LOG_LIMIT {
            log.pop_front();
        }
        log.push_back(request);
    }

    pub(crate) fn is_unavailable(&self) -> bool {
        self.unavailable.load(Ordering::SeqCst)
    }

    pub(crate) fn bookmark_interval(&self) -> Duration {
        *self
            .bookmark_interval
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }
}

/// Values a test control accepts as an object: a JSON `Value` (e.g. `serde_json::json!` or
/// `serde_json::to_value(&k8s_openapi_pod)`), or YAML/JSON text.
pub trait IntoObject {
    fn into_object(self) -> Result<Value, ApiError>;
}

impl IntoObject for Value {
    fn into_object(self) -> Result<Value, ApiError> {
        Ok(self)
    }
}

impl IntoObject for &str {
    fn into_object(self) -> Result<Value, ApiError> {
        serde_yaml::from_str(self)
            .map_err(|e| ApiError::bad_request(format!("not a YAML or JSON object: {e}")))
    }
}

impl IntoObject for String {
    fn into_object(self) -> Result<Value, ApiError> {
        self.as_str().into_object()
    }
}

impl IntoObject for &String {
    fn into_object(self) -> Result<Value, ApiError> {
        self.as_str().into_object()
    }
}

/// Fills in a missing apiVersion/kind, and refuses an object of another type.
fn typed(mut obj: Value, res: Resource) -> Result<Value, ApiError> {
    let Some(map) = obj.as_object_mut() else {
        return Err(ApiError::bad_request(format!(
            "a {} must be a map, got {obj}",
            res.kind()
        )));
    };
    map.entry("apiVersion")
        .or_insert_with(|| res.api_version().into());
    map.entry("kind").or_insert_with(|| res.kind().into());
    ops::check_type(res, &obj)?;
    Ok(obj)
}

/// A running fake API server. Clones share the server; it stops (closing its listener and
/// every connection) when the last clone is dropped.
#[derive(Clone)]
pub struct FakeApiServer {
    shared: Arc<Shared>,
    /// Dropping the last sender is the stop signal for the accept loop and connections.
    _stop: Arc<signal::Sender<()>>,
}

impl std::fmt::Debug for FakeApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeApiServer")
            .field("addr", &self.shared.addr)
            .finish_non_exhaustive()
    }
}

impl FakeApiServer {
    /// Binds 127.0.0.1 on a free port and serves there. The `default` namespace exists,
    /// as on every real cluster.
    pub async fn start() -> std::io::Result<Self> {
        Self::serve(TcpListener::bind("127.0.0.1:0").await?)
    }

    /// Serves on a listener the caller bound. Must be called inside a tokio runtime.
    pub fn serve(listener: TcpListener) -> std::io::Result<Self> {
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            store: Store::new(HISTORY_LIMIT),
            addr,
            requests: Mutex::new(VecDeque::new()),
            unavailable: AtomicBool::new(false),
            refuse: signal::Sender::new(false),
            cut: signal::Sender::new(0),
            open_watches: signal::Sender::new(0),
            bookmark_interval: Mutex::new(DEFAULT_BOOKMARK_INTERVAL),
            tokens: tokens::Issuer::new(&format!("http://{addr}")),
            admission: admission::Registry::default(),
        });
        let (stop, stopped) = signal::channel(());
        tokio::spawn(accept_loop(listener, shared.clone(), stopped));
        let server = FakeApiServer {
            shared,
            _stop: Arc::new(stop),
        };
        server
            .create_namespace("default")
            .expect("a fresh store takes the default namespace");
        Ok(server)
    }

    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// `http://127.0.0.1:<port>`, for `kube::Config::new(url.parse()?)`.
    pub fn url(&self) -> String {
        format!("http://{}", self.shared.addr)
    }

    /// A kubeconfig for kubectl and kube-rs: no credentials, namespace `default`.
    pub fn kubeconfig_yaml(&self) -> String {
        format!(
            "apiVersion: v1\n\
             kind: Config\n\
             clusters:\n\
             - name: kiam-sandbox\n  cluster:\n    server: {url}\n\
             contexts:\n\
             - name: kiam-sandbox\n  context:\n    cluster: kiam-sandbox\n    user: kiam-sandbox\n    namespace: default\n\
             current-context: kiam-sandbox\n\
             users:\n\
             - name: kiam-sandbox\n  user: {{}}\n\
             preferences: {{}}\n",
            url = self.url()
        )
    }

    pub fn write_kubeconfig(&self, path: impl AsRef<Path>) -> std::io::Result<()> {
        std::fs::write(path, self.kubeconfig_yaml())
    }

    /// Creates or replaces any served object (Namespace, Node, Pod, Event) exactly as given,
    /// status included; returns the stored object. Its namespace must exist.
    pub fn apply(&self, obj: impl IntoObject) -> Result<Value, ApiError> {
        ops::apply(&self.shared.store, obj.into_object()?).map(|o| (*o).clone())
    }

    /// Creates or replaces a namespace: a full object, or just its name
    /// (`create_namespace("team-a")`).
    pub fn create_namespace(&self, namespace: impl IntoObject) -> Result<Value, ApiError> {
        let obj = match namespace.into_object()? {
            Value::String(name) => json!({"metadata": {"name": name}}),
            obj => obj,
        };
        self.apply(typed(obj, Resource::Namespaces)?)
    }

    /// Creates or replaces a pod exactly as given (status included, so tests set
    /// `status.podIP` and `status.phase` here). Its namespace must exist.
    pub fn apply_pod(&self, pod: impl IntoObject) -> Result<Value, ApiError> {
        self.apply(typed(pod.into_object()?, Resource::Pods)?)
    }

    /// [`FakeApiServer::apply_pod`] for many pods, without copying each stored object back
    /// (for populations of 100,000+ pods); returns how many were applied.
    pub fn apply_pods(&self, pods: impl IntoIterator<Item = Value>) -> Result<usize, ApiError> {
        let mut n = 0;
        for pod in pods {
            ops::apply(&self.shared.store, typed(pod, Resource::Pods)?)?;
            n += 1;
        }
        Ok(n)
    }

    /// Applies every object in a multi-document YAML (Namespaces first, and `kind: List`
    /// items), returning the stored objects.
    pub fn load_yaml(&self, yaml: &str) -> Result<Vec<Value>, ApiError> {
        let mut objects = Vec::new();
        for doc in serde_yaml::Deserializer::from_str(yaml) {
            let value = Value::deserialize(doc)
                .map_err(|e| ApiError::bad_request(format!("invalid YAML: {e}")))?;
            match value {
                Value::Null => {}
                Value::Object(ref map) if map.get("kind") == Some(&json!("List")) => {
                    let items = map.get("items").and_then(Value::as_array);
                    objects.extend(items.into_iter().flatten().cloned());
                }
                other => objects.push(other),
            }
        }
        objects.sort_by_key(|o| o.get("kind") != Some(&json!("Namespace")));
        objects.into_iter().map(|o| self.apply(o)).collect()
    }

    /// Deletes a pod at once (DELETED event); returns its last state.
    pub fn delete_pod(&self, namespace: &str, name: &str) -> Result<Value, ApiError> {
        self.delete(Resource::Pods, namespace, name)
    }

    /// Deletes a namespace and everything in it.
    pub fn delete_namespace(&self, name: &str) -> Result<Value, ApiError> {
        self.delete(Resource::Namespaces, "", name)
    }

    pub fn delete(&self, res: Resource, namespace: &str, name: &str) -> Result<Value, ApiError> {
        ops::delete(
            &self.shared.store,
            res,
            namespace,
            name,
            &ops::Preconditions::default(),
            false,
        )
        .map(|o| (*o).clone())
    }

    /// What a graceful DELETE does on a real cluster before the kubelet confirms: sets
    /// `deletionTimestamp` to now + grace and `deletionGracePeriodSeconds` (a MODIFIED
    /// event). The pod stays until [`FakeApiServer::delete_pod`].
    pub fn mark_pod_terminating(
        &self,
        namespace: &str,
        name: &str,
        grace: Duration,
    ) -> Result<Value, ApiError> {
        let secs = i64::try_from(grace.as_secs()).unwrap_or(i64::MAX);
        let at = jiff::Timestamp::now()
            .checked_add(jiff::SignedDuration::from_secs(secs))
            .unwrap_or(jiff::Timestamp::MAX);
        self.modify_pod(namespace, name, |pod| {
            let meta = metadata_mut(pod);
            meta.insert(
                "deletionTimestamp".into(),
                resources::format_time(at).into(),
            );
            meta.insert("deletionGracePeriodSeconds".into(), secs.into());
        })
    }

    /// Sets `status.phase` (Pending, Running, Succeeded, Failed, Unknown).
    pub fn set_pod_phase(
        &self,
        namespace: &str,
        name: &str,
        phase: &str,
    ) -> Result<Value, ApiError> {
        self.modify_pod(namespace, name, |pod| pod["status"]["phase"] = phase.into())
    }

    /// Sets `status.podIP` and `status.podIPs`, as the kubelet does once the sandbox has an IP.
    pub fn set_pod_ip(&self, namespace: &str, name: &str, ip: &str) -> Result<Value, ApiError> {
        self.modify_pod(namespace, name, |pod| {
            pod["status"]["podIP"] = ip.into();
            pod["status"]["podIPs"] = json!([{"ip": ip}]);
        })
    }

    /// Applies a JSON merge patch to a pod, status included.
    pub fn patch_pod(
        &self,
        namespace: &str,
        name: &str,
        merge_patch: Value,
    ) -> Result<Value, ApiError> {
        self.modify_pod(namespace, name, |pod| json_patch::merge(pod, &merge_patch))
    }

    fn modify_pod(
        &self,
        namespace: &str,
        name: &str,
        change: impl FnOnce(&mut Value),
    ) -> Result<Value, ApiError> {
        let name_before = name.to_string();
        ops::modify(&self.shared.store, Resource::Pods, namespace, name, |pod| {
            if !pod.get("status").is_some_and(Value::is_object) {
                pod["status"] = json!({});
            }
            change(pod);
            // The key cannot change under a control either.
            metadata_mut(pod).insert("name".into(), name_before.into());
            metadata_mut(pod).insert("namespace".into(), namespace.into());
        })
        .map(|o| (*o).clone())
    }

    /// An object as stored (with apiVersion and kind), or `None`. `namespace` is ignored
    /// for namespaces.
    pub fn get(&self, res: Resource, namespace: &str, name: &str) -> Option<Value> {
        let ns = if res.namespaced() { namespace } else { "" };
        self.shared
            .store
            .get(res, &(ns.to_string(), name.to_string()))
            .map(|o| (*o).clone())
    }

    pub fn pod(&self, namespace: &str, name: &str) -> Option<Value> {
        self.get(Resource::Pods, namespace, name)
    }

    pub fn namespace(&self, name: &str) -> Option<Value> {
        self.get(Resource::Namespaces, "", name)
    }

    /// Creates or replaces a node exactly as given (status and taints included), as the
    /// kubelet registers it.
    pub fn apply_node(&self, node: impl IntoObject) -> Result<Value, ApiError> {
        self.apply(typed(node.into_object()?, Resource::Nodes)?)
    }

    pub fn node(&self, name: &str) -> Option<Value> {
        self.get(Resource::Nodes, "", name)
    }

    /// Applies a JSON merge patch to a node, as another controller writing it
    /// concurrently would (status included).
    pub fn patch_node(&self, name: &str, merge_patch: Value) -> Result<Value, ApiError> {
        ops::modify(&self.shared.store, Resource::Nodes, "", name, |node| {
            json_patch::merge(node, &merge_patch);
            metadata_mut(node).insert("name".into(), name.into());
        })
        .map(|o| (*o).clone())
    }

    /// Every stored object of a type, in key order; `namespace: None` means all.
    pub fn list(&self, res: Resource, namespace: Option<&str>) -> Vec<Value> {
        let (_, objects) = self.shared.store.list(res);
        objects
            .iter()
            .filter(|((ns, _), _)| namespace.is_none_or(|want| ns == want))
            .map(|(_, o)| (**o).clone())
            .collect()
    }

    /// Events recorded in a namespace, core/v1 and events.k8s.io/v1 alike (tell them apart
    /// by `apiVersion`), in the order they were last written.
    pub fn events(&self, namespace: &str) -> Vec<Value> {
        let mut events: Vec<Value> = [Resource::Events, Resource::EventsV1]
            .into_iter()
            .flat_map(|res| self.list(res, Some(namespace)))
            .collect();
        events.sort_by_key(|e| {
            resources::resource_version_of(e)
                .parse::<u64>()
                .unwrap_or(0)
        });
        events
    }

    /// The current global resourceVersion.
    pub fn resource_version(&self) -> String {
        self.shared.store.resource_version().to_string()
    }

    /// While held, changes are stored (LIST and GET see them) but not sent to watchers,
    /// nor replayable to new watches; releasing sends them in order. A watch that started
    /// from a LIST taken meanwhile skips the held events its list already included.
    pub fn hold_watch_events(&self, hold: bool) {
        self.shared.store.hold(hold);
    }

    /// Ends every open watch abruptly (the connection drops mid-body), as a crashed or
    /// restarted API server would. Clients reconnect from their last resourceVersion.
    pub fn cut_watches(&self) {
        self.shared.cut.send_modify(|n| *n += 1);
    }

    /// Forgets the change history and list snapshots, like an etcd compaction: a watch or
    /// continue token from before now gets 410 Expired, which makes watchers re-list.
    pub fn compact(&self) {
        self.shared.store.compact();
    }

    /// Simulates an unreachable API server: while unavailable, connections are closed as
    /// soon as they are accepted and open ones (watches included) are dropped, so clients
    /// see connection errors rather than HTTP answers, and fail fast.
    pub fn set_unavailable(&self, unavailable: bool) {
        self.shared.refuse.send_replace(unavailable);
    }

    /// While set, every request is answered 503 ServiceUnavailable (a `Status`) and open
    /// watches are cut. Note that kube-rs clients retry 503 with backoff for minutes unless
    /// their `kube::Config` has `default_retry = false`; use
    /// [`FakeApiServer::set_unavailable`] to make them fail fast.
    pub fn set_service_unavailable(&self, unavailable: bool) {
        self.shared.unavailable.store(unavailable, Ordering::SeqCst);
        if unavailable {
            self.cut_watches();
        }
    }

    /// How often watches that asked for bookmarks get one (default 1s); applies to
    /// watches opened afterwards.
    pub fn set_bookmark_interval(&self, interval: Duration) {
        let interval = interval.max(Duration::from_millis(1));
        *self
            .shared
            .bookmark_interval
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = interval;
    }

    /// How many watch streams are open now.
    pub fn open_watches(&self) -> usize {
        *self.shared.open_watches.borrow()
    }

    /// Waits until at least `n` watch streams are open (e.g. until a watcher under test
    /// has connected, so a change made next is delivered as a watch event).
    pub async fn wait_for_open_watches(&self, n: usize) {
        let mut open = self.shared.open_watches.subscribe();
        // The sender lives in `self.shared`, so this cannot see a closed channel.
        let _ = open.wait_for(|count| *count >= n).await;
    }

    /// Every request received so far (up to the newest 50 000), oldest first.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        let log = self
            .shared
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        log.iter().cloned().collect()
    }

    /// How many recorded requests satisfy `matches`.
    pub fn count_requests(&self, matches: impl Fn(&RecordedRequest) -> bool) -> usize {
        let log = self
            .shared
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        log.iter().filter(|r| matches(r)).count()
    }

    pub fn clear_requests(&self) {
        self.shared
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, mut stop: signal::Receiver<()>) {
    loop {
        let stream = tokio::select! {
            _ = stop.changed() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    // Typically out of file descriptors; back off instead of spinning.
                    tracing::warn!(%error, "fake API server could not accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        if *shared.refuse.borrow() {
            continue;
        }
        let mut refuse = shared.refuse.subscribe();
        let mut stop = stop.clone();
        let service_state = shared.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let shared = service_state.clone();
                async move { Ok::<_, Infallible>(http::handle(shared, req).await) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                result = connection => {
                    if let Err(error) = result {
                        tracing::debug!(%error, "fake API server connection ended with an error");
                    }
                }
                _ = stop.changed() => {}
                _ = refuse.wait_for(|refusing| *refusing) => {}
            }
        });
    }
}
