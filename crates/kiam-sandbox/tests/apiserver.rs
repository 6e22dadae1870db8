//! The fake API server driven by the real kube-rs client (and kubectl, when installed).

use std::future::Future;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenReview};
use k8s_openapi::api::core::v1::{Namespace, Pod, ServiceAccount};
use kiam_sandbox::apiserver::{
    foreign_signed_token, tampered_token, token_claims, unsigned_token, FakeApiServer, Resource,
    DEFAULT_ISSUER,
};
use kube::api::{
    DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams,
};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, ResourceExt};
use serde_json::{json, Value};

/// Generous upper bound on waiting for something that should happen promptly; only a hang
/// guard, never a measurement.
const PATIENCE: Duration = Duration::from_secs(30);

/// In a workspace build rustls has both ring and aws-lc-rs (the AWS SDK's)
/// compiled in and cannot choose a process default itself; kube-rs needs one.
fn ensure_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn client(api: &FakeApiServer) -> Client {
    ensure_crypto_provider();
    let config = kube::Config::new(api.url().parse().expect("the fake's URL parses"));
    Client::try_from(config).expect("a client for the fake")
}

fn pod(ns: &str, name: &str, ip: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": {"app": name},
                     "annotations": {"iam.amazonaws.com/role": format!("{name}-role")}},
        "spec": {"containers": [{"name": "main", "image": "busybox"}]},
        "status": {"phase": "Running", "podIP": ip}
    })
}

fn typed_pod(ns: &str, name: &str) -> Pod {
    serde_json::from_value(pod(ns, name, "198.18.0.99")).unwrap()
}

/// Polls `cond` until it holds; panics (instead of hanging) after [`PATIENCE`].
async fn eventually<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let wait = async {
        while !cond().await {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(PATIENCE, wait)
        .await
        .unwrap_or_else(|_| panic!("gave up waiting for: {what}"));
}

async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(PATIENCE, fut)
        .await
        .unwrap_or_else(|_| panic!("gave up waiting for: {what}"))
}

fn api_error(err: kube::Error) -> (u16, String) {
    match err {
        kube::Error::Api(status) => (status.code, status.reason.clone()),
        other => panic!("expected an API error Status, got {other:?}"),
    }
}

/// Runs a reflector over all pods and returns its store; the task ends with the test.
fn reflect_pods(client: Client, config: watcher::Config) -> Store<Pod> {
    let (reader, writer) = reflector::store();
    let stream =
        reflector::reflector(writer, watcher(Api::<Pod>::all(client), config)).applied_objects();
    tokio::spawn(async move {
        futures::pin_mut!(stream);
        // Errors (410 Gone, cut connections) are part of the show; the watcher recovers.
        while stream.next().await.is_some() {}
    });
    reader
}

fn names(store: &Store<Pod>) -> Vec<String> {
    let mut names: Vec<String> = store.state().iter().map(|p| p.name_any()).collect();
    names.sort();
    names
}

#[tokio::test]
async fn pods_and_namespaces_round_trip_through_kube_rs() {
    let fake = FakeApiServer::start().await.unwrap();
    let client = client(&fake);
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace = serde_json::from_value(json!({
        "metadata": {"name": "team-a", "annotations": {"iam.amazonaws.com/permitted": ".*"}}
    }))
    .unwrap();
    let created = namespaces
        .create(&PostParams::default(), &ns)
        .await
        .unwrap();
    assert_eq!(created.status.unwrap().phase.as_deref(), Some("Active"));
    assert!(created.metadata.uid.is_some());
    assert!(created.metadata.creation_timestamp.is_some());
    let (code, reason) = api_error(
        namespaces
            .create(&PostParams::default(), &ns)
            .await
            .unwrap_err(),
    );
    assert_eq!((code, reason.as_str()), (409, "AlreadyExists"));

    let pods: Api<Pod> = Api::namespaced(client.clone(), "team-a");
    let created = pods
        .create(&PostParams::default(), &typed_pod("team-a", "web"))
        .await
        .unwrap();
    // As on a real server, a created pod's status is the server's, not the client's.
    assert_eq!(
        created.status.as_ref().unwrap().phase.as_deref(),
        Some("Pending")
    );
    assert_eq!(created.status.as_ref().unwrap().pod_ip, None);
    assert_eq!(created.metadata.generation, Some(1));
    let rv1: u64 = created.resource_version().unwrap().parse().unwrap();

    let fetched = pods.get("web").await.unwrap();
    assert_eq!(fetched.metadata.uid, created.metadata.uid);
    let (code, reason) = api_error(pods.get("nope").await.unwrap_err());
    assert_eq!((code, reason.as_str()), (404, "NotFound"));

    let missing: Api<Pod> = Api::namespaced(client.clone(), "no-such-ns");
    let (code, _) = api_error(
        missing
            .create(&PostParams::default(), &typed_pod("no-such-ns", "web"))
            .await
            .unwrap_err(),
    );
    assert_eq!(code, 404);

    let patched = pods
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"metadata": {"annotations": {"iam.amazonaws.com/role": "writer"}}}),
            ),
        )
        .await
        .unwrap();
    assert_eq!(patched.annotations()["iam.amazonaws.com/role"], "writer");
    let rv2: u64 = patched.resource_version().unwrap().parse().unwrap();
    assert!(rv2 > rv1);

    let status = pods
        .patch_status(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"phase": "Running", "podIP": "198.18.0.7"}})),
        )
        .await
        .unwrap();
    assert_eq!(status.status.unwrap().pod_ip.as_deref(), Some("198.18.0.7"));

    // A replace with the stale resourceVersion from before the patches is refused.
    let (code, reason) = api_error(
        pods.replace("web", &PostParams::default(), &created)
            .await
            .unwrap_err(),
    );
    assert_eq!((code, reason.as_str()), (409, "Conflict"));
    let mut current = pods.get("web").await.unwrap();
    current.labels_mut().insert("tier".into(), "front".into());
    let replaced = pods
        .replace("web", &PostParams::default(), &current)
        .await
        .unwrap();
    assert_eq!(replaced.labels()["tier"], "front");
    // The main resource ignores status; it stays what the status subresource set.
    assert_eq!(
        replaced.status.unwrap().pod_ip.as_deref(),
        Some("198.18.0.7")
    );

    pods.delete("web", &DeleteParams::default()).await.unwrap();
    assert_eq!(api_error(pods.get("web").await.unwrap_err()).0, 404);
    namespaces
        .delete("team-a", &DeleteParams::default())
        .await
        .unwrap();
    assert!(fake.namespace("team-a").is_none());
}

#[tokio::test]
async fn lists_page_with_limit_and_continue_and_expire_after_compaction() {
    let fake = FakeApiServer::start().await.unwrap();
    fake.create_namespace("a").unwrap();
    for i in 0..7 {
        fake.apply_pod(pod("a", &format!("p{i}"), &format!("198.18.0.{i}")))
            .unwrap();
    }
    let pods: Api<Pod> = Api::namespaced(client(&fake), "a");
    let mut seen = Vec::new();
    let mut lp = ListParams::default().limit(3);
    let first = pods.list(&lp).await.unwrap();
    let snapshot_rv = first.metadata.resource_version.clone();
    assert_eq!(first.items.len(), 3);
    assert_eq!(first.metadata.remaining_item_count, Some(4));
    // Changes after the first page do not show up in later pages.
    fake.apply_pod(pod("a", "p99", "198.18.1.1")).unwrap();
    seen.extend(first.items.iter().map(|p| p.name_any()));
    let mut token = first.metadata.continue_;
    while let Some(t) = token {
        lp = lp.continue_token(&t);
        let page = pods.list(&lp).await.unwrap();
        assert_eq!(page.metadata.resource_version, snapshot_rv);
        seen.extend(page.items.iter().map(|p| p.name_any()));
        token = page.metadata.continue_.filter(|t| !t.is_empty());
    }
    assert_eq!(seen, ["p0", "p1", "p2", "p3", "p4", "p5", "p6"]);

    let first = pods.list(&ListParams::default().limit(2)).await.unwrap();
    fake.compact();
    let stale = ListParams::default()
        .limit(2)
        .continue_token(first.metadata.continue_.as_deref().unwrap());
    let (code, reason) = api_error(pods.list(&stale).await.unwrap_err());
    assert_eq!((code, reason.as_str()), (410, "Expired"));
}

#[tokio::test]
async fn selectors_filter_lists_and_lookups_are_logged() {
    let fake = FakeApiServer::start().await.unwrap();
    fake.create_namespace("a").unwrap();
    fake.create_namespace("b").unwrap();
    fake.apply_pod(pod("a", "one", "198.18.0.1")).unwrap();
    fake.apply_pod(pod("b", "two", "198.18.0.2")).unwrap();
    fake.set_pod_phase("b", "two", "Succeeded").unwrap();
    let pods: Api<Pod> = Api::all(client(&fake));

    let by_ip = pods
        .list(&ListParams::default().fields("status.podIP=198.18.0.2"))
        .await
        .unwrap();
    assert_eq!(
        by_ip.items.iter().map(|p| p.name_any()).collect::<Vec<_>>(),
        ["two"]
    );
    let running = pods
        .list(&ListParams::default().fields("status.phase!=Succeeded,metadata.namespace=a"))
        .await
        .unwrap();
    assert_eq!(running.items.len(), 1);
    let labelled = pods
        .list(&ListParams::default().labels("app in (one,three)"))
        .await
        .unwrap();
    assert_eq!(labelled.items[0].name_any(), "one");
    let (code, _) = api_error(
        pods.list(&ListParams::default().fields("spec.bogus=1"))
            .await
            .unwrap_err(),
    );
    assert_eq!(code, 400);

    let lookups = fake.count_requests(|r| {
        r.verb == "list"
            && r.path == "/api/v1/pods"
            && r.param("fieldSelector") == Some("status.podIP=198.18.0.2")
    });
    assert_eq!(lookups, 1);
}

#[tokio::test]
async fn a_watcher_sees_creates_modifications_and_deletes() {
    let fake = FakeApiServer::start().await.unwrap();
    fake.create_namespace("a").unwrap();
    fake.apply_pod(pod("a", "early", "198.18.0.1")).unwrap();
    let store = reflect_pods(client(&fake), watcher::Config::default());
    within("initial list", store.wait_until_ready())
        .await
        .unwrap();
    assert_eq!(names(&store), ["early"]);
    within("the watch to open", fake.wait_for_open_watches(1)).await;

    fake.apply_pod(pod("a", "late", "198.18.0.2")).unwrap();
    eventually("late appears", || async {
        names(&store) == ["early", "late"]
    })
    .await;
    fake.set_pod_phase("a", "late", "Failed").unwrap();
    eventually("late fails", || async {
        store
            .state()
            .iter()
            .any(|p| p.status.as_ref().unwrap().phase.as_deref() == Some("Failed"))
    })
    .await;
    fake.delete_pod("a", "early").unwrap();
    eventually("early disappears", || async { names(&store) == ["late"] }).await;
}

#[tokio::test]
async fn a_watcher_relists_and_converges_after_compaction_and_a_cut() {
    let fake = FakeApiServer::start().await.unwrap();
    fake.create_namespace("a").unwrap();
    fake.apply_pod(pod("a", "stays", "198.18.0.1")).unwrap();
    fake.apply_pod(pod("a", "goes", "198.18.0.2")).unwrap();
    let store = reflect_pods(client(&fake), watcher::Config::default());
    within("initial list", store.wait_until_ready())
        .await
        .unwrap();
    within("the watch to open", fake.wait_for_open_watches(1)).await;
    let lists_before = fake.count_requests(|r| r.verb == "list" && r.path == "/api/v1/pods");

    // Changes the watcher cannot see, then history that no longer covers its
    // resourceVersion: resuming must fail with 410 and make it re-list.
    fake.hold_watch_events(true);
    fake.delete_pod("a", "goes").unwrap();
    fake.apply_pod(pod("a", "new", "198.18.0.3")).unwrap();
    fake.compact();
    fake.cut_watches();
    fake.hold_watch_events(false);

    eventually("the store converges", || async {
        names(&store) == ["new", "stays"]
    })
    .await;
    let lists_after = fake.count_requests(|r| r.verb == "list" && r.path == "/api/v1/pods");
    assert!(lists_after > lists_before, "the watcher re-listed");
    // And it keeps watching from the new list.
    within("the watch to reopen", fake.wait_for_open_watches(1)).await;
    fake.apply_pod(pod("a", "later", "198.18.0.4")).unwrap();
    eventually("later appears", || async {
        names(&store).contains(&"later".to_string())
    })
    .await;
}

#[tokio::test]
async fn a_cut_watch_resumes_from_its_resource_version_without_a_relist() {
    let fake = FakeApiServer::start().await.unwrap();
    fake.create_namespace("a").unwrap();
    let store = reflect_pods(client(&fake), watcher::Config::default());
    within("initial list", store.wait_until_ready())
        .await
        .unwrap();
    within("the watch to open", fake.wait_for_open_watches(1)).await;
    fake.hold_watch_events(true);
    fake.apply_pod(pod("a", "during-cut", "198.18.0.1"))
        .unwrap();
    fake.cut_watches();
    fake.hold_watch_events(false);
    eventually("the pod arrives", || async {
        names(&store) == ["during-cut"]
    })
    .await;
    assert_eq!(
        fake.count_requests(|r| r.verb == "list" && r.path == "/api/v1/pods"),
        1,
        "history covered the gap, so no re-list was needed"
    );
}

#[tokio::test]
async fn watches_send_bookmarks_when_asked() {
    let fake = FakeApiServer::start().await.unwrap();
    fake.set_bookmark_interval(Duration::from_millis(20));
    let pods: Api<Pod> = Api::all(client(&fake));
    let list = pods.list(&ListParams::default()).await.unwrap();
    let rv = list.metadata.resource_version.unwrap();
    let wp = WatchParams::default(); // kube-rs asks for bookmarks by default
    let stream = pods.watch(&wp, &rv).await.unwrap();
    futures::pin_mut!(stream);
    match within("a bookmark", stream.try_next()).await.unwrap() {
        Some(WatchEvent::Bookmark(bookmark)) => {
            assert_eq!(bookmark.metadata.resource_version, rv);
            assert_eq!(bookmark.types.kind, "Pod");
        }
        other => panic!("expected a bookmark, got {other:?}"),
    }
    let request = fake.requests().pop().unwrap();
    assert_eq!(request.verb, "watch");
    assert_eq!(request.param("allowWatchBookmarks"), Some("true"));
}

#[tokio::test]
async fn streaming_lists_end_initial_events_with_a_marked_bookmark() {
    let fake = FakeApiServer::start().await.unwrap();
    fake.create_namespace("a").unwrap();
    fake.apply_pod(pod("a", "one", "198.18.0.1")).unwrap();
    let store = reflect_pods(client(&fake), watcher::Config::default().streaming_lists());
    within("initial events", store.wait_until_ready())
        .await
        .unwrap();
    assert_eq!(names(&store), ["one"]);
    assert_eq!(fake.count_requests(|r| r.verb == "list"), 0);
    fake.apply_pod(pod("a", "two", "198.18.0.2")).unwrap();
    eventually("two appears", || async { names(&store) == ["one", "two"] }).await;
}

#[tokio::test]
async fn a_too_old_resource_version_is_an_error_event_with_410() {
    let fake = FakeApiServer::start().await.unwrap();
    fake.create_namespace("a").unwrap();
    let old_rv = fake.resource_version();
    fake.apply_pod(pod("a", "one", "198.18.0.1")).unwrap();
    fake.compact();
    let pods: Api<Pod> = Api::all(client(&fake));
    let stream = pods.watch(&WatchParams::default(), &old_rv).await.unwrap();
    let events: Vec<_> = within("the error event", stream.collect()).await;
    match events.as_slice() {
        [Ok(WatchEvent::Error(status))] => {
            assert_eq!((status.code, status.reason.as_str()), (410, "Expired"));
        }
        other => panic!("expected one 410 ERROR event, got {other:?}"),
    }
}

#[tokio::test]
async fn selector_watches_see_objects_leave_as_deleted() {
    let fake = FakeApiServer::start().await.unwrap();
    fake.create_namespace("a").unwrap();
    fake.apply_pod(pod("a", "web", "198.18.0.1")).unwrap();
    let pods: Api<Pod> = Api::namespaced(client(&fake), "a");
    let wp = WatchParams::default().labels("app=web").disable_bookmarks();
    let stream = pods.watch(&wp, "0").await.unwrap();
    futures::pin_mut!(stream);
    let first = within("initial ADDED", stream.try_next()).await.unwrap();
    assert!(matches!(first, Some(WatchEvent::Added(p)) if p.name_any() == "web"));
    fake.patch_pod("a", "web", json!({"metadata": {"labels": {"app": "db"}}}))
        .unwrap();
    let left = within("DELETED", stream.try_next()).await.unwrap();
    match left {
        Some(WatchEvent::Deleted(p)) => assert_eq!(p.labels()["app"], "db"),
        other => panic!("expected DELETED, got {other:?}"),
    }
    fake.patch_pod("a", "web", json!({"metadata": {"labels": {"app": "web"}}}))
        .unwrap();
    let back = within("ADDED", stream.try_next()).await.unwrap();
    assert!(matches!(back, Some(WatchEvent::Added(_))));
}

#[tokio::test]
async fn held_events_reach_list_and_get_but_not_watchers_until_released() {
    let fake = FakeApiServer::start().await.unwrap();
    fake.create_namespace("a").unwrap();
    let client = client(&fake);
    let store = reflect_pods(client.clone(), watcher::Config::default());
    within("initial list", store.wait_until_ready())
        .await
        .unwrap();
    within("the watch to open", fake.wait_for_open_watches(1)).await;
    let rv_before = fake.resource_version();

    fake.hold_watch_events(true);
    let pods: Api<Pod> = Api::namespaced(client, "a");
    pods.create(&PostParams::default(), &typed_pod("a", "held"))
        .await
        .unwrap();
    assert_eq!(pods.get("held").await.unwrap().name_any(), "held");
    assert_eq!(
        pods.list(&ListParams::default()).await.unwrap().items.len(),
        1
    );

    // A watch that runs to its end while events are held sees nothing of them.
    let wp = WatchParams::default().timeout(1).disable_bookmarks();
    let seen: Vec<_> = within(
        "the short watch",
        pods.watch(&wp, &rv_before).await.unwrap().collect(),
    )
    .await;
    assert!(seen.is_empty(), "held event leaked: {seen:?}");
    assert!(store.state().is_empty());

    fake.hold_watch_events(false);
    eventually("the held pod arrives", || async {
        names(&store) == ["held"]
    })
    .await;
}

#[tokio::test]
async fn an_unavailable_server_refuses_connections() {
    let fake = FakeApiServer::start().await.unwrap();
    let pods: Api<Pod> = Api::all(client(&fake));
    pods.list(&ListParams::default()).await.unwrap();
    fake.set_unavailable(true);
    let err = pods.list(&ListParams::default()).await.unwrap_err();
    assert!(
        !matches!(err, kube::Error::Api(_)),
        "not an HTTP answer: {err:?}"
    );
    fake.set_unavailable(false);
    pods.list(&ListParams::default()).await.unwrap();
}

#[tokio::test]
async fn service_unavailable_answers_503_statuses() {
    let fake = FakeApiServer::start().await.unwrap();
    let mut config = kube::Config::new(fake.url().parse().unwrap());
    // kube-rs would otherwise retry the 503 with backoff for minutes.
    config.default_retry = false;
    ensure_crypto_provider();
    let pods: Api<Pod> = Api::all(Client::try_from(config).unwrap());
    fake.set_service_unavailable(true);
    let (code, reason) = api_error(pods.list(&ListParams::default()).await.unwrap_err());
    assert_eq!((code, reason.as_str()), (503, "ServiceUnavailable"));
    fake.set_service_unavailable(false);
    pods.list(&ListParams::default()).await.unwrap();
}

#[tokio::test]
async fn events_are_recorded_from_core_clients_and_the_kube_recorder() {
    use k8s_openapi::api::core::v1::{Event, ObjectReference};
    use kube::runtime::events::{Event as RecorderEvent, EventType, Recorder, Reporter};

    let fake = FakeApiServer::start().await.unwrap();
    fake.create_namespace("a").unwrap();
    let web = fake.apply_pod(pod("a", "web", "198.18.0.1")).unwrap();
    let client = client(&fake);
    let reference = ObjectReference {
        kind: Some("Pod".into()),
        api_version: Some("v1".into()),
        namespace: Some("a".into()),
        name: Some("web".into()),
        uid: web["metadata"]["uid"].as_str().map(str::to_string),
        ..Default::default()
    };

    let events: Api<Event> = Api::namespaced(client.clone(), "a");
    let event = Event {
        metadata: kube::api::ObjectMeta {
            name: Some("web.1".into()),
            ..Default::default()
        },
        involved_object: reference.clone(),
        reason: Some("KiamRoleForbidden".into()),
        message: Some("role denied".into()),
        type_: Some("Warning".into()),
        count: Some(1),
        ..Default::default()
    };
    events.create(&PostParams::default(), &event).await.unwrap();
    events
        .patch(
            "web.1",
            &PatchParams::default(),
            &Patch::Merge(json!({"count": 2})),
        )
        .await
        .unwrap();
    let by_reason = events
        .list(&ListParams::default().fields("involvedObject.name=web,reason=KiamRoleForbidden"))
        .await
        .unwrap();
    assert_eq!(by_reason.items[0].count, Some(2));

    let recorder = Recorder::new(
        client,
        Reporter {
            controller: "kiam".into(),
            instance: None,
        },
    );
    let published = RecorderEvent {
        type_: EventType::Warning,
        reason: "KiamCredentialError".into(),
        note: Some("sts failed".into()),
        action: "GetCredentials".into(),
        secondary: None,
    };
    recorder.publish(&published, &reference).await.unwrap();
    recorder.publish(&published, &reference).await.unwrap();

    let recorded = fake.events("a");
    let reasons: Vec<(&str, &str)> = recorded
        .iter()
        .map(|e| {
            (
                e["apiVersion"].as_str().unwrap(),
                e["reason"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        reasons,
        [
            ("v1", "KiamRoleForbidden"),
            ("events.k8s.io/v1", "KiamCredentialError")
        ]
    );
    assert_eq!(recorded[1]["series"]["count"], 2);
}

#[tokio::test]
async fn the_demo_cluster_loads() {
    let fake = FakeApiServer::start().await.unwrap();
    let loaded = fake
        .load_yaml(include_str!("../demo/cluster.yaml"))
        .unwrap();
    assert!(loaded.len() >= 5);
    let namespaces = fake.list(Resource::Namespaces, None);
    let permitted = namespaces
        .iter()
        .filter(|ns| {
            ns.pointer("/metadata/annotations/iam.amazonaws.com~1permitted")
                .is_some()
        })
        .count();
    assert_eq!(
        (namespaces.len(), permitted),
        (3, 1),
        "default plus two, one permitting"
    );
    let pods = fake.list(Resource::Pods, None);
    assert!(pods.len() >= 3);
    for pod in &pods {
        assert_eq!(pod["status"]["phase"], "Running");
        let ip: std::net::Ipv4Addr = pod["status"]["podIP"].as_str().unwrap().parse().unwrap();
        assert_eq!(ip.octets()[0], 198);
        assert!(
            matches!(ip.octets()[1], 18 | 19),
            "{ip} is in 198.18.0.0/15"
        );
        assert!(pod
            .pointer("/metadata/annotations/iam.amazonaws.com~1role")
            .is_some());
    }
}

/// Raw HTTP/1.1, for what kube-rs never sends.
async fn raw(fake: &FakeApiServer, request: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(fake.addr()).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    within("the raw response", stream.read_to_string(&mut response))
        .await
        .unwrap();
    response
}

fn status_body(response: &str) -> Value {
    let body = response.split("\r\n\r\n").nth(1).unwrap();
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {response}"))
}

#[tokio::test]
async fn malformed_requests_get_status_objects() {
    let fake = FakeApiServer::start().await.unwrap();
    let bad_json = raw(
        &fake,
        "POST /api/v1/namespaces/default/pods HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: 5\r\nConnection: close\r\n\r\n{oops",
    )
    .await;
    assert!(bad_json.starts_with("HTTP/1.1 400"), "{bad_json}");
    let status = status_body(&bad_json);
    assert_eq!(
        (status["kind"].as_str(), status["reason"].as_str()),
        (Some("Status"), Some("BadRequest"))
    );

    let unknown = raw(
        &fake,
        "GET /api/v1/secrets HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(unknown.starts_with("HTTP/1.1 404"), "{unknown}");
    assert_eq!(status_body(&unknown)["code"], 404);

    let apply = raw(
        &fake,
        "PATCH /api/v1/namespaces/default HTTP/1.1\r\nHost: x\r\nContent-Type: application/apply-patch+yaml\r\n\
         Content-Length: 2\r\nConnection: close\r\n\r\n{}",
    )
    .await;
    assert!(apply.starts_with("HTTP/1.1 415"), "{apply}");
}

#[tokio::test]
async fn watches_are_chunked_newline_delimited_json() {
    let fake = FakeApiServer::start().await.unwrap();
    let response = raw(
        &fake,
        "GET /api/v1/namespaces?watch=1&timeoutSeconds=1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    let lower = response.to_ascii_lowercase();
    assert!(lower.contains("transfer-encoding: chunked"), "{response}");
    let event = response
        .lines()
        .find(|l| l.starts_with('{'))
        .expect("one event line");
    let event: Value = serde_json::from_str(event).unwrap();
    assert_eq!(event["type"], "ADDED");
    assert_eq!(event["object"]["kind"], "Namespace");
    assert_eq!(event["object"]["metadata"]["name"], "default");
}

fn kubectl(kubeconfig: &std::path::Path, args: &[&str]) -> String {
    let out = std::process::Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .output()
        .expect("kubectl runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "kubectl {args:?} failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[tokio::test]
async fn kubectl_gets_creates_annotates_and_deletes_pods() {
    if std::process::Command::new("kubectl")
        .arg("version")
        .arg("--client")
        .output()
        .is_err()
    {
        eprintln!("!!! SKIPPED kubectl_gets_creates_annotates_and_deletes_pods: kubectl is not on PATH !!!");
        return;
    }
    let fake = FakeApiServer::start().await.unwrap();
    fake.load_yaml(include_str!("../demo/cluster.yaml"))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    fake.write_kubeconfig(&kubeconfig).unwrap();
    let manifest = dir.path().join("pod.yaml");
    std::fs::write(
        &manifest,
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: made-by-kubectl\n  namespace: default\n\
         spec:\n  containers:\n  - name: main\n    image: busybox\n",
    )
    .unwrap();

    let seeded = fake.list(Resource::Pods, None);
    let (first_ns, first_name) = (
        seeded[0]["metadata"]["namespace"]
            .as_str()
            .unwrap()
            .to_string(),
        seeded[0]["metadata"]["name"].as_str().unwrap().to_string(),
    );
    let path = kubeconfig.clone();
    let listed =
        tokio::task::spawn_blocking(move || kubectl(&path, &["get", "pods", "-A", "-o", "wide"]))
            .await
            .unwrap();
    assert!(listed.starts_with("NAMESPACE"), "{listed}");
    assert!(
        listed.contains(&first_name) && listed.contains(&first_ns),
        "{listed}"
    );
    let ip = seeded[0]["status"]["podIP"].as_str().unwrap();
    assert!(listed.contains(ip), "{listed}");

    let path = kubeconfig.clone();
    let created = tokio::task::spawn_blocking(move || {
        kubectl(&path, &["create", "-f", manifest.to_str().unwrap()])
    })
    .await
    .unwrap();
    assert_eq!(created.trim(), "pod/made-by-kubectl created");
    assert!(fake.pod("default", "made-by-kubectl").is_some());

    let path = kubeconfig.clone();
    tokio::task::spawn_blocking(move || {
        kubectl(
            &path,
            &[
                "annotate",
                "pod",
                "made-by-kubectl",
                "iam.amazonaws.com/role=from-kubectl",
            ],
        )
    })
    .await
    .unwrap();
    let annotated = fake.pod("default", "made-by-kubectl").unwrap();
    assert_eq!(
        annotated["metadata"]["annotations"]["iam.amazonaws.com/role"],
        "from-kubectl"
    );

    let path = kubeconfig.clone();
    let deleted =
        tokio::task::spawn_blocking(move || kubectl(&path, &["delete", "pod", "made-by-kubectl"]))
            .await
            .unwrap();
    assert_eq!(deleted.trim(), "pod \"made-by-kubectl\" deleted");
    assert!(fake.pod("default", "made-by-kubectl").is_none());
}

#[tokio::test]
async fn patch_types_behave_like_the_real_server() {
    let fake = FakeApiServer::start().await.unwrap();
    let pods: Api<Pod> = Api::namespaced(client(&fake), "default");
    let mut generated = typed_pod("default", "ignored");
    generated.metadata.name = None;
    generated.metadata.generate_name = Some("web-".into());
    let created = pods
        .create(&PostParams::default(), &generated)
        .await
        .unwrap();
    let name = created.name_any();
    assert!(
        name.starts_with("web-") && name.len() == "web-".len() + 5,
        "{name}"
    );

    let json_patch: json_patch::Patch = serde_json::from_value(json!([
        {"op": "add", "path": "/metadata/labels/tier", "value": "front"}
    ]))
    .unwrap();
    let patched = pods
        .patch(
            &name,
            &PatchParams::default(),
            &Patch::<()>::Json(json_patch),
        )
        .await
        .unwrap();
    assert_eq!(patched.labels()["tier"], "front");

    let failing: json_patch::Patch = serde_json::from_value(json!([
        {"op": "test", "path": "/metadata/labels/tier", "value": "back"}
    ]))
    .unwrap();
    let (code, _) = api_error(
        pods.patch(&name, &PatchParams::default(), &Patch::<()>::Json(failing))
            .await
            .unwrap_err(),
    );
    assert_eq!(code, 422);

    let strategic = pods
        .patch(
            &name,
            &PatchParams::default(),
            &Patch::Strategic(
                json!({"metadata": {"annotations": {"a": "b"}, "$retainKeys": ["x"]}}),
            ),
        )
        .await
        .unwrap();
    assert_eq!(strategic.annotations()["a"], "b");
    assert!(!strategic.annotations().contains_key("$retainKeys"));

    // A resourceVersion in a patch is a precondition.
    let stale = json!({"metadata": {"resourceVersion": created.resource_version().unwrap(), "labels": {"x": "y"}}});
    let (code, reason) = api_error(
        pods.patch(&name, &PatchParams::default(), &Patch::Merge(stale))
            .await
            .unwrap_err(),
    );
    assert_eq!((code, reason.as_str()), (409, "Conflict"));

    // Server-side apply is not spoken.
    let (code, _) = api_error(
        pods.patch(
            &name,
            &PatchParams::apply("test"),
            &Patch::Apply(json!({"metadata": {"labels": {"x": "y"}}})),
        )
        .await
        .unwrap_err(),
    );
    assert_eq!(code, 415);

    // Patching a pod's status through the main resource changes nothing there.
    let unchanged = pods
        .patch(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"phase": "Failed"}})),
        )
        .await
        .unwrap();
    assert_eq!(
        unchanged.status.as_ref().unwrap().phase.as_deref(),
        Some("Pending")
    );
    assert_eq!(
        unchanged.resource_version(),
        strategic.resource_version(),
        "a no-op write"
    );
}

#[tokio::test]
async fn a_written_kubeconfig_works_for_kube_rs() {
    let fake = FakeApiServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kubeconfig");
    fake.write_kubeconfig(&path).unwrap();
    let kubeconfig = kube::config::Kubeconfig::read_from(&path).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .unwrap();
    assert_eq!(config.default_namespace, "default");
    ensure_crypto_provider();
    let client = Client::try_from(config).unwrap();
    let namespaces: Api<Namespace> = Api::all(client);
    let names: Vec<String> = namespaces
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .iter()
        .map(|n| n.name_any())
        .collect();
    assert_eq!(names, ["default"]);
}

// ---- Service-account tokens: TokenRequest, TokenReview, OIDC discovery ----

/// A running pod on node `n1` (which exists), as the kubelet would report it.
fn scheduled_pod(ns: &str, name: &str, service_account: Option<&str>) -> Value {
    let mut pod = pod(ns, name, "198.18.0.20");
    pod["spec"]["nodeName"] = "n1".into();
    if let Some(sa) = service_account {
        pod["spec"]["serviceAccountName"] = sa.into();
    }
    pod
}

/// A fake with namespace `team-a`, node `n1` and pod `web` on it; returns the pod's uid.
async fn token_cluster() -> (FakeApiServer, String) {
    let fake = FakeApiServer::start().await.unwrap();
    fake.create_namespace("team-a").unwrap();
    fake.apply_node(json!({"metadata": {"name": "n1"}}))
        .unwrap();
    let web = fake
        .apply_pod(scheduled_pod("team-a", "web", None))
        .unwrap();
    let uid = web["metadata"]["uid"].as_str().unwrap().to_string();
    (fake, uid)
}

fn token_request(audiences: &[&str], pod: Option<(&str, &str)>, seconds: i64) -> TokenRequest {
    let mut body = json!({
        "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
        "spec": {"audiences": audiences, "expirationSeconds": seconds}
    });
    if let Some((name, uid)) = pod {
        body["spec"]["boundObjectRef"] =
            json!({"kind": "Pod", "apiVersion": "v1", "name": name, "uid": uid});
    }
    serde_json::from_value(body).unwrap()
}

async fn review(client: &Client, token: &str, audiences: &[&str]) -> Value {
    let body: TokenReview = serde_json::from_value(json!({
        "apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
        "spec": {"token": token, "audiences": audiences}
    }))
    .unwrap();
    let reviewed = Api::<TokenReview>::all(client.clone())
        .create(&PostParams::default(), &body)
        .await
        .unwrap();
    serde_json::to_value(reviewed.status.unwrap()).unwrap()
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[tokio::test]
async fn every_namespace_has_a_default_service_account() {
    let fake = FakeApiServer::start().await.unwrap();
    let client = client(&fake);
    let created = Api::<Namespace>::all(client.clone())
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "team-b"}})).unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(created.name_any(), "team-b");
    for ns in ["default", "team-b"] {
        let sas = Api::<ServiceAccount>::namespaced(client.clone(), ns)
            .list(&ListParams::default())
            .await
            .unwrap();
        let names: Vec<String> = sas.items.iter().map(|s| s.name_any()).collect();
        assert_eq!(names, ["default"], "in {ns}");
    }
    let sas = Api::<ServiceAccount>::namespaced(client.clone(), "team-b");
    let reader: ServiceAccount =
        serde_json::from_value(json!({"metadata": {"name": "reader"}})).unwrap();
    let made = sas.create(&PostParams::default(), &reader).await.unwrap();
    assert!(made.metadata.uid.is_some());
    assert_eq!(
        sas.get("reader").await.unwrap().metadata.uid,
        made.metadata.uid
    );
    let (code, _) = api_error(
        sas.create(&PostParams::default(), &reader)
            .await
            .unwrap_err(),
    );
    assert_eq!(code, 409);
    // Deleting the namespace takes its service accounts with it.
    fake.delete_namespace("team-b").unwrap();
    assert!(fake.service_account("team-b", "default").is_none());
}

#[tokio::test]
async fn a_token_request_returns_a_signed_token_bound_to_its_pod() {
    let (fake, web_uid) = token_cluster().await;
    let client = client(&fake);
    let sas = Api::<ServiceAccount>::namespaced(client.clone(), "team-a");
    let response = sas
        .create_token_request(
            "default",
            &PostParams::default(),
            &token_request(&["kiam"], Some(("web", &web_uid)), 3600),
        )
        .await
        .unwrap();
    assert_eq!(response.metadata.name.as_deref(), Some("default"));
    assert_eq!(response.metadata.namespace.as_deref(), Some("team-a"));
    let status = response.status.unwrap();
    let token = status.token;
    let claims = token_claims(&token).unwrap();

    let sa_uid = fake.service_account("team-a", "default").unwrap()["metadata"]["uid"].clone();
    let node_uid = fake.node("n1").unwrap()["metadata"]["uid"].clone();
    assert_eq!(claims["iss"], DEFAULT_ISSUER);
    assert_eq!(claims["iss"], fake.issuer());
    assert_eq!(claims["sub"], "system:serviceaccount:team-a:default");
    assert_eq!(claims["aud"], json!(["kiam"]));
    let (iat, nbf, exp) = (
        claims["iat"].as_i64().unwrap(),
        claims["nbf"].as_i64().unwrap(),
        claims["exp"].as_i64().unwrap(),
    );
    assert!((iat - now_secs()).abs() < 5, "{claims}");
    assert_eq!((nbf, exp - iat), (iat, 3600));
    assert_eq!(status.expiration_timestamp.0.as_second(), exp);
    assert_eq!(claims["jti"].as_str().unwrap().len(), 36);
    assert_eq!(
        claims["kubernetes.io"],
        json!({
            "namespace": "team-a",
            "serviceaccount": {"name": "default", "uid": sa_uid},
            "pod": {"name": "web", "uid": web_uid},
            "node": {"name": "n1", "uid": node_uid},
        })
    );
    let header: Value = {
        use base64::Engine as _;
        let part = token.split('.').next().unwrap();
        serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(part)
                .unwrap(),
        )
        .unwrap()
    };
    assert_eq!(
        header,
        json!({"alg": "ES256", "kid": fake.signing_key_id()})
    );

    // No audiences means the API server's own; no binding means no pod claim.
    let plain = sas
        .create_token_request(
            "default",
            &PostParams::default(),
            &token_request(&[], None, 600),
        )
        .await
        .unwrap();
    assert_eq!(plain.spec.audiences, [DEFAULT_ISSUER]);
    let plain = token_claims(&plain.status.unwrap().token).unwrap();
    assert_eq!(plain["aud"], json!([DEFAULT_ISSUER]));
    assert!(plain["kubernetes.io"].get("pod").is_none());

    let refused = |name: &'static str, body: TokenRequest| {
        let sas = sas.clone();
        async move {
            api_error(
                sas.create_token_request(name, &PostParams::default(), &body)
                    .await
                    .unwrap_err(),
            )
        }
    };
    let web = Some(("web", web_uid.as_str()));
    assert_eq!(
        refused("nobody", token_request(&["kiam"], web, 3600))
            .await
            .0,
        404
    );
    assert_eq!(
        refused(
            "default",
            token_request(&["kiam"], Some(("gone", "")), 3600)
        )
        .await
        .0,
        404
    );
    assert_eq!(
        refused(
            "default",
            token_request(&["kiam"], Some(("web", "0000")), 3600)
        )
        .await,
        (409, "Conflict".into())
    );
    assert_eq!(
        refused("default", token_request(&["kiam"], web, 599)).await,
        (422, "Invalid".into())
    );
    fake.apply_service_account("team-a", "reader").unwrap();
    assert_eq!(
        refused("reader", token_request(&["kiam"], web, 3600)).await,
        (400, "BadRequest".into())
    );
    let requests = fake.count_requests(|r| {
        r.verb == "create" && r.path == "/api/v1/namespaces/team-a/serviceaccounts/default/token"
    });
    assert_eq!(requests, 5);
}

#[tokio::test]
async fn a_token_review_authenticates_a_bound_token_as_its_pod() {
    let (fake, web_uid) = token_cluster().await;
    let client = client(&fake);
    let token = fake
        .issue_token(
            "team-a",
            "default",
            &["kiam", "other"],
            Some(("web", &web_uid)),
            Duration::from_secs(3600),
        )
        .unwrap();
    let claims = token_claims(&token).unwrap();
    let status = review(&client, &token, &["kiam"]).await;
    let sa_uid = fake.service_account("team-a", "default").unwrap()["metadata"]["uid"].clone();
    let node_uid = fake.node("n1").unwrap()["metadata"]["uid"].clone();
    assert_eq!(
        status,
        json!({
            "authenticated": true,
            "audiences": ["kiam"],
            "user": {
                "username": "system:serviceaccount:team-a:default",
                "uid": sa_uid,
                "groups": ["system:serviceaccounts", "system:serviceaccounts:team-a", "system:authenticated"],
                "extra": {
                    "authentication.kubernetes.io/pod-name": ["web"],
                    "authentication.kubernetes.io/pod-uid": [web_uid],
                    "authentication.kubernetes.io/node-name": ["n1"],
                    "authentication.kubernetes.io/node-uid": [node_uid],
                    "authentication.kubernetes.io/credential-id": [format!("JTI={}", claims["jti"].as_str().unwrap())],
                }
            }
        })
    );
    assert_eq!(
        fake.count_requests(
            |r| r.verb == "create" && r.path == "/apis/authentication.k8s.io/v1/tokenreviews"
        ),
        1
    );
    // Without audiences a review asks for the API server's own, which this token lacks.
    let own = review(&client, &token, &[]).await;
    assert_eq!(own["authenticated"], Value::Null, "{own}");
    assert!(own["error"]
        .as_str()
        .unwrap()
        .contains("is invalid for the target audiences"));
    let default_aud = fake
        .issue_token("team-a", "default", &[], None, Duration::from_secs(600))
        .unwrap();
    let own = review(&client, &default_aud, &[]).await;
    assert_eq!(own["authenticated"], true, "{own}");
    assert_eq!(own["audiences"], json!([DEFAULT_ISSUER]));
    assert!(own["user"]
        .get("extra")
        .unwrap()
        .get("authentication.kubernetes.io/pod-name")
        .is_none());
}

/// What a review says of a token no authenticator recognises as its own: not a JWT,
/// another issuer, or an algorithm the key does not use (`none`).
const NOT_OURS: &str = "invalid bearer token";

/// Refused (no `authenticated`, an empty user) with a `status.error` containing `why`.
async fn assert_refused(client: &Client, token: &str, audiences: &[&str], why: &str) {
    let status = review(client, token, audiences).await;
    assert_eq!(status.get("authenticated"), None, "{status}");
    assert_eq!(status["user"], json!({}), "{status}");
    let error = status["error"].as_str().unwrap_or("");
    assert!(error.contains(why), "wanted {why:?}, got {status}");
}

#[tokio::test]
async fn a_token_review_refuses_what_the_real_server_refuses() {
    let (fake, web_uid) = token_cluster().await;
    let client = client(&fake);
    let hour = Duration::from_secs(3600);
    let token = fake
        .issue_token(
            "team-a",
            "default",
            &["kiam"],
            Some(("web", &web_uid)),
            hour,
        )
        .unwrap();
    let claims = token_claims(&token).unwrap();
    let resigned = |change: &dyn Fn(&mut Value)| {
        let mut c = claims.clone();
        change(&mut c);
        fake.sign_token(&c)
    };
    let now = now_secs();

    // The same claims re-signed by the server's key pass: the checks below are the ones failing.
    assert_eq!(
        review(&client, &resigned(&|_| {}), &["kiam"]).await["authenticated"],
        true
    );
    // Within the one-minute leeway, an expired token still passes.
    let just_expired = resigned(&|c| c["exp"] = (now - 30).into());
    assert_eq!(
        review(&client, &just_expired, &["kiam"]).await["authenticated"],
        true
    );

    let expired = resigned(&|c| {
        c["iat"] = (now - 4000).into();
        c["nbf"] = (now - 4000).into();
        c["exp"] = (now - 400).into();
    });
    assert_refused(
        &client,
        &expired,
        &["kiam"],
        "service account token has expired",
    )
    .await;
    let early = resigned(&|c| c["nbf"] = (now + 600).into());
    assert_refused(
        &client,
        &early,
        &["kiam"],
        "service account token is not valid yet",
    )
    .await;
    assert_refused(
        &client,
        &token,
        &["sts.amazonaws.com"],
        "token audiences [\"kiam\"] is invalid for the target audiences [\"sts.amazonaws.com\"]",
    )
    .await;
    let tampered = tampered_token(&token, |c| c["kubernetes.io"]["pod"]["name"] = "db".into());
    assert_refused(
        &client,
        &tampered,
        &["kiam"],
        "error in cryptographic primitive",
    )
    .await;
    let foreign = foreign_signed_token(&claims);
    assert_refused(
        &client,
        &foreign,
        &["kiam"],
        "invalid signature, no keys found",
    )
    .await;
    // Unsigned tokens, other issuers and non-JWTs are not the service-account
    // authenticator's: refused as unknown bearer tokens, as on a real server.
    assert_refused(&client, &unsigned_token(&token), &["kiam"], NOT_OURS).await;
    let other_issuer = resigned(&|c| c["iss"] = "https://elsewhere.example".into());
    assert_refused(&client, &other_issuer, &["kiam"], NOT_OURS).await;
    assert_refused(&client, "not-a-jwt", &["kiam"], NOT_OURS).await;

    // The pod binding is checked on every review: recreated under the same name, the old
    // token is refused; deleted, too.
    fake.delete_pod("team-a", "web").unwrap();
    assert_refused(
        &client,
        &token,
        &["kiam"],
        "service account token has been invalidated",
    )
    .await;
    let again = fake
        .apply_pod(scheduled_pod("team-a", "web", None))
        .unwrap();
    let new_uid = again["metadata"]["uid"].as_str().unwrap().to_string();
    assert_ne!(new_uid, web_uid);
    assert_refused(
        &client,
        &token,
        &["kiam"],
        &format!("pod UID ({new_uid}) does not match service account pod ref claim ({web_uid})"),
    )
    .await;
    let fresh = fake
        .issue_token(
            "team-a",
            "default",
            &["kiam"],
            Some(("web", &new_uid)),
            hour,
        )
        .unwrap();
    assert_eq!(
        review(&client, &fresh, &["kiam"]).await["authenticated"],
        true
    );
    // A terminating pod is still itself within its grace period...
    fake.mark_pod_terminating("team-a", "web", Duration::from_secs(30))
        .unwrap();
    assert_eq!(
        review(&client, &fresh, &["kiam"]).await["authenticated"],
        true
    );
    // ...but one whose deletion is over a minute past is gone for tokens too.
    fake.patch_pod(
        "team-a",
        "web",
        json!({"metadata": {"deletionTimestamp": "2020-01-01T00:00:00Z"}}),
    )
    .unwrap();
    assert_refused(
        &client,
        &fresh,
        &["kiam"],
        "service account token has been invalidated",
    )
    .await;

    // So is its service account.
    let unbound = fake
        .issue_token("team-a", "default", &["kiam"], None, hour)
        .unwrap();
    assert_eq!(
        review(&client, &unbound, &["kiam"]).await["authenticated"],
        true
    );
    fake.delete(Resource::ServiceAccounts, "team-a", "default")
        .unwrap();
    assert_refused(
        &client,
        &unbound,
        &["kiam"],
        "serviceaccount \"default\" not found",
    )
    .await;
    fake.apply_service_account("team-a", "default").unwrap();
    assert_refused(&client, &unbound, &["kiam"], "service account UID").await;

    // Changing the issuer disowns every earlier token.
    let reissued = fake
        .issue_token("team-a", "default", &["kiam"], None, hour)
        .unwrap();
    fake.set_issuer("https://issuer.example");
    assert_refused(&client, &reissued, &["kiam"], NOT_OURS).await;

    // An empty token is a bad request, not a refusal.
    let body = r#"{"spec":{"token":""}}"#;
    let empty = raw(
        &fake,
        &format!(
            "POST /apis/authentication.k8s.io/v1/tokenreviews HTTP/1.1\r\nHost: x\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
    )
    .await;
    assert!(empty.starts_with("HTTP/1.1 400"), "{empty}");
    assert_eq!(
        status_body(&empty)["message"],
        "token is required for TokenReview in authentication"
    );
}

#[tokio::test]
async fn the_jwks_from_oidc_discovery_verifies_issued_tokens() {
    let (fake, web_uid) = token_cluster().await;
    let get = |path: &str| {
        let fake = fake.clone();
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        async move { raw(&fake, &request).await }
    };
    let response = get("/.well-known/openid-configuration").await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response
        .to_ascii_lowercase()
        .contains("content-type: application/json"));
    let discovery = status_body(&response);
    let jwks_uri = format!("{}/openid/v1/jwks", fake.url());
    assert_eq!(
        discovery,
        json!({
            "issuer": DEFAULT_ISSUER,
            "jwks_uri": jwks_uri,
            "response_types_supported": ["id_token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["ES256"],
        })
    );
    let path = jwks_uri.strip_prefix(&fake.url()).unwrap();
    let response = get(path).await;
    assert!(
        response
            .to_ascii_lowercase()
            .contains("content-type: application/jwk-set+json"),
        "{response}"
    );
    let jwks = status_body(&response);
    let keys = jwks["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 1);
    let jwk = &keys[0];
    assert_eq!(
        (
            &jwk["kty"],
            &jwk["crv"],
            &jwk["alg"],
            &jwk["use"],
            &jwk["kid"]
        ),
        (
            &json!("EC"),
            &json!("P-256"),
            &json!("ES256"),
            &json!("sig"),
            &json!(fake.signing_key_id())
        )
    );

    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine as _;
    let coordinate = |name: &str| URL_SAFE_NO_PAD.decode(jwk[name].as_str().unwrap()).unwrap();
    let mut point = vec![4u8];
    point.extend(coordinate("x"));
    point.extend(coordinate("y"));
    let public =
        ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_FIXED, point);
    let verify = |token: &str| {
        let (input, signature) = token.rsplit_once('.').unwrap();
        let signature = URL_SAFE_NO_PAD.decode(signature).unwrap();
        public.verify(input.as_bytes(), &signature).is_ok()
    };
    let token = fake
        .issue_token(
            "team-a",
            "default",
            &["kiam"],
            Some(("web", &web_uid)),
            Duration::from_secs(600),
        )
        .unwrap();
    assert!(verify(&token));
    assert!(!verify(&tampered_token(&token, |c| c["sub"] =
        "system:serviceaccount:team-a:admin".into())));
    assert!(!verify(&foreign_signed_token(
        &token_claims(&token).unwrap()
    )));

    // The issuer is configurable, and discovery follows it.
    fake.set_issuer("https://issuer.example");
    let discovery = status_body(&get("/.well-known/openid-configuration").await);
    assert_eq!(discovery["issuer"], "https://issuer.example");
    let token = fake
        .issue_token("team-a", "default", &[], None, Duration::from_secs(600))
        .unwrap();
    assert_eq!(
        token_claims(&token).unwrap()["aud"],
        json!(["https://issuer.example"])
    );
}

#[tokio::test]
async fn discovery_lists_tokenreviews_and_the_token_subresource() {
    let fake = FakeApiServer::start().await.unwrap();
    let client = client(&fake);
    let discovery = kube::Discovery::new(client)
        .filter(&["authentication.k8s.io"])
        .run()
        .await
        .unwrap();
    let group = discovery.get("authentication.k8s.io").unwrap();
    let resources = group.versioned_resources("v1");
    let (reviews, caps) = resources
        .iter()
        .find(|(r, _)| r.plural == "tokenreviews")
        .expect("tokenreviews is discovered");
    assert_eq!(reviews.kind, "TokenReview");
    assert_eq!(caps.operations, ["create"]);
    assert_eq!(caps.scope, kube::discovery::Scope::Cluster);

    let core = status_body(
        &raw(
            &fake,
            "GET /api/v1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await,
    );
    let entries = core["resources"].as_array().unwrap();
    let token = entries
        .iter()
        .find(|r| r["name"] == "serviceaccounts/token")
        .unwrap();
    assert_eq!(
        (&token["kind"], &token["group"], &token["verbs"]),
        (
            &json!("TokenRequest"),
            &json!("authentication.k8s.io"),
            &json!(["create"])
        )
    );
    assert!(entries
        .iter()
        .any(|r| r["name"] == "serviceaccounts" && r["shortNames"] == json!(["sa"])));
}

#[tokio::test]
async fn kubectl_creates_tokens_and_token_reviews() {
    if std::process::Command::new("kubectl")
        .arg("version")
        .arg("--client")
        .output()
        .is_err()
    {
        eprintln!(
            "!!! SKIPPED kubectl_creates_tokens_and_token_reviews: kubectl is not on PATH !!!"
        );
        return;
    }
    let (fake, web_uid) = token_cluster().await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    fake.write_kubeconfig(&kubeconfig).unwrap();
    let review_file = dir.path().join("review.yaml");
    let path = kubeconfig.clone();
    let uid = web_uid.clone();
    let (sas, token) = tokio::task::spawn_blocking(move || {
        let table = kubectl(&path, &["get", "sa", "-n", "team-a"]);
        assert!(
            table.starts_with("NAME") && table.contains("SECRETS") && table.contains("default"),
            "{table}"
        );
        let sas = kubectl(&path, &["get", "sa", "-n", "team-a", "-o", "name"]);
        let token = kubectl(
            &path,
            &[
                "create",
                "token",
                "default",
                "-n",
                "team-a",
                "--audience",
                "kiam",
                "--duration",
                "1h",
                "--bound-object-kind",
                "Pod",
                "--bound-object-name",
                "web",
                "--bound-object-uid",
                &uid,
            ],
        );
        (sas, token.trim().to_string())
    })
    .await
    .unwrap();
    assert_eq!(sas.trim(), "serviceaccount/default");
    let claims = token_claims(&token).unwrap();
    assert_eq!(claims["kubernetes.io"]["pod"]["uid"], web_uid.as_str());
    assert_eq!(
        claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(),
        3600
    );

    std::fs::write(
        &review_file,
        format!(
            "apiVersion: authentication.k8s.io/v1\nkind: TokenReview\n\
             spec:\n  token: {token}\n  audiences: [kiam]\n"
        ),
    )
    .unwrap();
    let reviewed = tokio::task::spawn_blocking(move || {
        kubectl(
            &kubeconfig,
            &[
                "create",
                "-f",
                review_file.to_str().unwrap(),
                "-o",
                "json",
                // The fake's OpenAPI has no schemas for kubectl to validate with, and
                // TokenReview has no PATCH to show that the server validates instead.
                "--validate=false",
            ],
        )
    })
    .await
    .unwrap();
    let reviewed: Value = serde_json::from_str(&reviewed).unwrap();
    assert_eq!(reviewed["status"]["authenticated"], true, "{reviewed}");
    assert_eq!(
        reviewed["status"]["user"]["username"],
        "system:serviceaccount:team-a:default"
    );
}

#[tokio::test]
async fn tokens_bind_to_nodes_and_name_a_missing_node_without_its_uid() {
    let (fake, _) = token_cluster().await;
    let client = client(&fake);
    let sas = Api::<ServiceAccount>::namespaced(client.clone(), "team-a");
    let bound_to = |kind: &str, name: &str| -> TokenRequest {
        serde_json::from_value(json!({
            "spec": {"audiences": ["kiam"],
                     "boundObjectRef": {"kind": kind, "apiVersion": "v1", "name": name}}
        }))
        .unwrap()
    };
    let node_token = sas
        .create_token_request("default", &PostParams::default(), &bound_to("Node", "n1"))
        .await
        .unwrap()
        .status
        .unwrap()
        .token;
    let node_uid = fake.node("n1").unwrap()["metadata"]["uid"].clone();
    let claims = token_claims(&node_token).unwrap();
    assert_eq!(
        claims["kubernetes.io"]["node"],
        json!({"name": "n1", "uid": node_uid})
    );
    assert!(claims["kubernetes.io"].get("pod").is_none());
    let status = review(&client, &node_token, &["kiam"]).await;
    assert_eq!(status["authenticated"], true, "{status}");
    assert_eq!(
        status["user"]["extra"]["authentication.kubernetes.io/node-uid"],
        json!([node_uid])
    );
    fake.delete(Resource::Nodes, "", "n1").unwrap();
    assert_refused(
        &client,
        &node_token,
        &["kiam"],
        "service account token has been invalidated",
    )
    .await;

    // A pod-bound token names the pod's node even when the Node object is gone.
    let pod_token = sas
        .create_token_request("default", &PostParams::default(), &bound_to("Pod", "web"))
        .await
        .unwrap()
        .status
        .unwrap()
        .token;
    let claims = token_claims(&pod_token).unwrap();
    assert_eq!(claims["kubernetes.io"]["node"], json!({"name": "n1"}));
    let status = review(&client, &pod_token, &["kiam"]).await;
    assert_eq!(status["authenticated"], true, "{status}");
    assert_eq!(
        status["user"]["extra"]["authentication.kubernetes.io/node-name"],
        json!(["n1"])
    );
    assert!(status["user"]["extra"]
        .get("authentication.kubernetes.io/node-uid")
        .is_none());

    let err = sas
        .create_token_request("default", &PostParams::default(), &bound_to("Secret", "s"))
        .await
        .unwrap_err();
    match err {
        kube::Error::Api(status) => assert_eq!(
            (status.code, status.message.as_str()),
            (400, "cannot bind token to object of type /v1, Kind=Secret")
        ),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_review_cache_keeps_a_deleted_pods_token_alive_like_the_real_servers() {
    let (fake, web_uid) = token_cluster().await;
    let client = client(&fake);
    let token = fake
        .issue_token(
            "team-a",
            "default",
            &["kiam"],
            Some(("web", &web_uid)),
            Duration::from_secs(3600),
        )
        .unwrap();
    fake.set_token_review_cache(Duration::from_secs(600));
    assert_eq!(
        review(&client, &token, &["kiam"]).await["authenticated"],
        true
    );
    fake.delete_pod("team-a", "web").unwrap();
    // Cached: still the pod's for the cache's lifetime, for the same audiences only.
    assert_eq!(
        review(&client, &token, &["kiam"]).await["authenticated"],
        true
    );
    assert_eq!(fake.review_token(&token, &["kiam"])["authenticated"], true);
    assert_refused(
        &client,
        &token,
        &["kiam", "other"],
        "service account token has been invalidated",
    )
    .await;
    // Off again (the default): refused at once.
    fake.set_token_review_cache(Duration::ZERO);
    assert_refused(
        &client,
        &token,
        &["kiam"],
        "service account token has been invalidated",
    )
    .await;
}
