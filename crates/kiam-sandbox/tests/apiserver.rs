//! The fake API server driven by the real kube-rs client (and kubectl, when installed).

use std::future::Future;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kiam_sandbox::apiserver::{FakeApiServer, Resource};
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

fn client(api: &FakeApiServer) -> Client {
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
