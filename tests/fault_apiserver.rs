//! Fault scenarios with the Kubernetes API server (the in-memory one, with
//! its fault controls) under the in-process kiam server:
//!
//! - the watch stream is cut and, while it is down, history is compacted so
//!   the watch's resourceVersion is too old (410 Gone): the server re-lists;
//!   a pod deleted meanwhile is no longer served, one created meanwhile is,
//!   and pods that did not change are served throughout;
//! - the API server is unreachable when the server starts: it is not ready
//!   (GetHealth UNAVAILABLE, so agents go elsewhere) and its log says why;
//!   it becomes ready as soon as the API server answers.

#[path = "support/cluster.rs"]
mod cluster;
#[path = "support/fault_stack.rs"]
mod fault_stack;
#[path = "support/grpc.rs"]
mod grpc;

use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use cluster::Cluster;
use fault_stack::{ms, report, until};
use grpc::role;
use kiam::proto::GetHealthRequest;
use kiam_sandbox::apiserver::FakeApiServer;
use tonic::Code;

const NS: &str = "team-a";

fn full_pod_lists(api: &FakeApiServer) -> usize {
    api.count_requests(|r| {
        r.verb == "list" && r.path == "/api/v1/pods" && r.param("fieldSelector").is_none()
    })
}

#[tokio::test]
async fn a_cut_watch_with_lost_history_relists_and_serves_what_changed() {
    let c = Cluster::start(&[]).await;
    c.namespace(NS, Some(".*"));
    c.pod(NS, "gone", "198.18.10.1", Some("gone-role"));
    c.pod(NS, "kept", "198.18.10.2", Some("kept-role"));
    let client = c.ready().await;
    assert_eq!(role(&client, "198.18.10.1").await.unwrap(), "gone-role");
    assert_eq!(role(&client, "198.18.10.2").await.unwrap(), "kept-role");
    let lists_before = full_pod_lists(&c.api);

    // The watch drops and reconnecting fails; meanwhile one pod is deleted,
    // one created, and the history the watch would resume from is compacted.
    c.api.set_unavailable(true);
    until("the watches to drop", Duration::from_secs(5), || async {
        (c.api.open_watches() == 0).then_some(())
    })
    .await;
    c.api.delete_pod(NS, "gone").unwrap();
    c.pod(NS, "created", "198.18.10.3", Some("created-role"));
    c.api.compact();
    // While the API is down, pods the cache knows are still served.
    let mut served_during_outage = 0;
    for _ in 0..10 {
        assert_eq!(role(&client, "198.18.10.2").await.unwrap(), "kept-role");
        served_during_outage += 1;
    }

    let back = Instant::now();
    c.api.set_unavailable(false);
    until(
        "a full re-list (410 Gone)",
        Duration::from_secs(15),
        || async { (full_pod_lists(&c.api) > lists_before).then_some(()) },
    )
    .await;
    let relisted = back.elapsed();
    until(
        "the created pod served",
        Duration::from_secs(15),
        || async { (role(&client, "198.18.10.3").await.ok()? == "created-role").then_some(()) },
    )
    .await;
    let created_served = back.elapsed();
    until(
        "the deleted pod refused",
        Duration::from_secs(15),
        || async {
            matches!(role(&client, "198.18.10.1").await, Err((Code::NotFound, _))).then_some(())
        },
    )
    .await;
    let gone_refused = back.elapsed();
    assert_eq!(
        role(&client, "198.18.10.1").await,
        Err((Code::NotFound, "no pod found".into()))
    );
    assert_eq!(role(&client, "198.18.10.2").await.unwrap(), "kept-role");
    // A resumed watch would have missed nothing; only a re-list can learn a
    // deletion whose event was compacted away.
    let watch_410 = c
        .api
        .count_requests(|r| r.verb == "watch" && r.path == "/api/v1/pods");
    report(
        "apiserver/watch-cut-410",
        &[
            ("served_during_outage", served_during_outage.to_string()),
            ("relist_after_api_back", ms(relisted)),
            ("created_pod_served_after", ms(created_served)),
            ("deleted_pod_refused_after", ms(gone_refused)),
            ("watch_requests", watch_410.to_string()),
            ("total", ms(back.elapsed())),
        ],
    );
}

/// Everything this test binary logs, for "the logs say why".
fn logs() -> &'static Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let sink = buffer.clone();
        let _ = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::INFO)
            .with_ansi(false)
            .with_writer(move || LogSink(sink.clone()))
            .try_init();
        buffer
    })
}

struct LogSink(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn log_lines(needle: &str) -> Vec<String> {
    let logs = logs().lock().unwrap();
    String::from_utf8_lossy(&logs)
        .lines()
        .filter(|l| l.contains(needle))
        .map(str::to_string)
        .collect()
}

#[tokio::test]
async fn an_unreachable_api_server_at_start_means_not_ready_until_it_answers() {
    logs();
    let api = FakeApiServer::start().await.unwrap();
    api.create_namespace(serde_json::json!({"metadata": {"name": NS,
        "annotations": {"iam.amazonaws.com/permitted": ".*"}}}))
        .unwrap();
    api.apply_pod(cluster::pod_json(
        NS,
        "web",
        "198.18.10.20",
        Some("web-role"),
        "Running",
    ))
    .unwrap();
    api.set_unavailable(true);
    let c = Cluster::start_with(api, &[]).await;
    let client = c.client();

    // Not ready: health and every call say UNAVAILABLE, so agents try
    // another server.
    let start = Instant::now();
    let mut refused = 0;
    while start.elapsed() < Duration::from_millis(1500) {
        let health = client.clone().get_health(GetHealthRequest {}).await;
        let status = health.expect_err("ready without the API server");
        assert_eq!(status.code(), Code::Unavailable);
        assert!(
            status.message().contains("not yet synced"),
            "{}",
            status.message()
        );
        let r = role(&client, "198.18.10.20").await;
        assert!(matches!(r, Err((Code::Unavailable, _))), "{r:?}");
        refused += 2;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The log says why, naming the watch and the connection error.
    let why = log_lines("watch failed");
    assert!(
        !why.is_empty(),
        "no log line says why the server is not ready"
    );
    assert!(
        why.iter().any(|l| l.contains("error")),
        "the log line gives no reason: {why:?}"
    );

    let back = Instant::now();
    c.api.set_unavailable(false);
    let (_, ready) = until(
        "ready once the API answers",
        Duration::from_secs(40),
        || async {
            let h = client.clone().get_health(GetHealthRequest {}).await.ok()?;
            (h.into_inner().message == "ok").then_some(())
        },
    )
    .await;
    assert_eq!(role(&client, "198.18.10.20").await.unwrap(), "web-role");
    report(
        "apiserver/unreachable-at-start",
        &[
            ("refused_while_unsynced", refused.to_string()),
            (
                "log",
                format!(
                    "{:?}",
                    why[0].split("WARN").nth(1).unwrap_or(&why[0]).trim()
                ),
            ),
            ("ready_after_api_back", ms(ready)),
            ("total", ms(back.elapsed())),
        ],
    );
}
