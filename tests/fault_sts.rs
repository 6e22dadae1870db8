//! Fault scenario: STS throttles, denies, times out or hangs while pods keep
//! asking (the in-process server over mTLS, the fake STS). Pass conditions:
//! STS sees a handful of calls however many requests arrive (backoff, one
//! call in flight per identity); cached credentials are served until they
//! have no more than `--session-refresh` left and never after; the pod gets
//! one `KiamCredentialError` Event; service resumes once STS does.
//!
//! Lifetimes are seconds here (`--session-refresh 2s`, credentials issued
//! for a few seconds by the fake) so the whole life of a credential fits in
//! a test; the rules are the same at production scale.

#[path = "support/cluster.rs"]
mod cluster;
#[path = "support/fault_stack.rs"]
mod fault_stack;
#[path = "support/grpc.rs"]
mod grpc;

use std::sync::Arc;
use std::time::{Duration, Instant};

use cluster::FakeFailure;
use cluster::{Cluster, BASE_ARN};
use fault_stack::{ms, report, until};
use kiam::proto::kiam_service_client::KiamServiceClient;
use kiam::server::model::Identity;
use tonic::transport::Channel;

const NS: &str = "team-a";
const REFRESH: Duration = Duration::from_secs(2);
const FLAGS: &[&str] = &["--session-duration", "15m", "--session-refresh", "2s"];

fn identity(role: &str) -> Identity {
    Identity {
        role_arn: format!("{BASE_ARN}{role}").into(),
        session_name: "kiam-kiam".into(),
        external_id: None,
        tags: None,
    }
}

/// What a burst of requests saw.
#[derive(Default, Debug)]
struct Seen {
    sent: usize,
    ok: usize,
    failed: usize,
    errors: Vec<String>,
    /// The least life a served credential had left, in seconds.
    min_left: Option<f64>,
}

/// When the credentials a pod gets expire, or the refusal's message.
async fn ask(client: &KiamServiceClient<Channel>, ip: &str, role: &str) -> Result<String, String> {
    grpc::credentials(client, ip, role)
        .await
        .map(|c| c.expiration)
        .map_err(|(_, message)| message)
}

/// `per_tick` concurrent requests every 100 ms for `how_long`; every
/// request runs to its end, however long STS makes it wait.
async fn load(
    client: &KiamServiceClient<Channel>,
    ip: &str,
    role: &str,
    how_long: Duration,
    per_tick: usize,
) -> Seen {
    let start = Instant::now();
    let mut tasks = Vec::new();
    while start.elapsed() < how_long {
        for _ in 0..per_tick {
            let (client, ip, role) = (client.clone(), ip.to_string(), role.to_string());
            tasks.push(tokio::spawn(async move {
                let r = ask(&client, &ip, &role).await;
                (jiff::Timestamp::now(), r)
            }));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut seen = Seen::default();
    for t in tasks {
        let (at, r) = t.await.unwrap();
        seen.sent += 1;
        match r {
            Ok(expiration) => {
                seen.ok += 1;
                // Expirations are printed to the second (cut, not rounded).
                let exp: jiff::Timestamp = expiration.parse().unwrap();
                let left = exp.duration_since(at).as_secs_f64() + 1.0;
                seen.min_left = Some(seen.min_left.map_or(left, |m: f64| m.min(left)));
            }
            Err(e) => {
                seen.failed += 1;
                if !seen.errors.contains(&e) {
                    seen.errors.push(e);
                }
            }
        }
    }
    seen
}

/// The `KiamCredentialError` Events on pod `name`.
fn credential_events(c: &Cluster, name: &str) -> Vec<String> {
    c.api
        .events(NS)
        .into_iter()
        .filter(|e| e["reason"] == "KiamCredentialError" && e["involvedObject"]["name"] == name)
        .map(|e| e["message"].as_str().unwrap_or_default().to_string())
        .collect()
}

async fn wait_for_event(c: &Cluster, name: &str) -> Vec<String> {
    until(
        "a KiamCredentialError Event",
        Duration::from_secs(5),
        || async {
            let events = credential_events(c, name);
            (!events.is_empty()).then_some(events)
        },
    )
    .await
    .0
}

#[tokio::test]
async fn throttling_backs_off_serves_cached_until_too_old_and_recovers() {
    let c = Cluster::start(FLAGS).await;
    // Credentials live 6s and are served while more than 2s are left.
    c.sts.set_lifetime(Some(Duration::from_secs(6)));
    c.namespace(NS, Some(".*"));
    let ip = "198.18.9.10";
    c.pod(NS, "web", ip, Some("web-role"));
    let client = c.ready().await;
    until("first credentials", Duration::from_secs(5), || async {
        ask(&client, ip, "web-role").await.ok()
    })
    .await;

    // STS starts throttling every call.
    c.sts.fail_always(Some(FakeFailure::Throttle));
    let id = identity("web-role");
    let calls_before = c.sts.calls(&id);
    let outage = Instant::now();
    let seen = load(&client, ip, "web-role", Duration::from_secs(6), 10).await;
    let sts_calls = c.sts.calls(&id) - calls_before;
    let outage_secs = outage.elapsed().as_secs_f64();

    assert!(seen.ok > 0, "cached credentials were not served: {seen:?}");
    assert!(
        seen.failed > 0,
        "too-old credentials were still served: {seen:?}"
    );
    let min_left = seen.min_left.unwrap();
    assert!(
        min_left > REFRESH.as_secs_f64(),
        "served a credential with only {min_left:.1}s left (--session-refresh 2s)"
    );
    assert!(
        seen.errors.iter().all(|e| e.contains("Throttling")),
        "{:?}",
        seen.errors
    );
    // Without backoff every request would call STS.
    assert!(
        (sts_calls as f64) <= 2.0 * outage_secs + 3.0,
        "{sts_calls} STS calls in {outage_secs:.1}s for {} requests",
        seen.sent
    );
    let events = wait_for_event(&c, "web").await;
    assert_eq!(events.len(), 1, "deduplicated: {events:?}");
    assert!(events[0].contains("Throttling"), "{events:?}");

    c.sts.fail_always(None);
    let (_, recovered) = until(
        "service after STS recovers",
        Duration::from_secs(10),
        || async { ask(&client, ip, "web-role").await.ok() },
    )
    .await;
    let after = load(&client, ip, "web-role", Duration::from_millis(500), 10).await;
    assert_eq!(after.failed, 0, "{after:?}");
    report(
        "sts/throttling",
        &[
            ("requests", seen.sent.to_string()),
            ("served_from_cache", seen.ok.to_string()),
            ("failed_after_too_old", seen.failed.to_string()),
            ("sts_calls", sts_calls.to_string()),
            ("outage", format!("{outage_secs:.1}s")),
            ("least_life_left_served", format!("{min_left:.1}s")),
            ("events", events.len().to_string()),
            ("time_to_recover", ms(recovered)),
        ],
    );
}

#[tokio::test]
async fn access_denied_is_answered_without_a_call_storm_and_recovers() {
    let c = Cluster::start(FLAGS).await;
    c.sts.fail_always(Some(FakeFailure::AccessDenied));
    c.namespace(NS, Some(".*"));
    let ip = "198.18.9.20";
    c.pod(NS, "denied", ip, Some("denied-role"));
    let client = c.ready().await;
    let id = identity("denied-role");

    let start = Instant::now();
    let seen = load(&client, ip, "denied-role", Duration::from_secs(3), 10).await;
    let secs = start.elapsed().as_secs_f64();
    let sts_calls = c.sts.calls(&id);
    assert_eq!(seen.ok, 0, "{seen:?}");
    assert!(
        seen.errors.iter().all(|e| e.contains("AccessDenied")),
        "a clear error: {:?}",
        seen.errors
    );
    assert!(
        (sts_calls as f64) <= 2.0 * secs + 2.0,
        "{sts_calls} STS calls in {secs:.1}s for {} requests",
        seen.sent
    );
    let events = wait_for_event(&c, "denied").await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert!(events[0].contains("AccessDenied"), "{events:?}");

    // The trust policy is fixed.
    c.sts.fail_always(None);
    let (_, recovered) = until("service after the fix", Duration::from_secs(15), || async {
        ask(&client, ip, "denied-role").await.ok()
    })
    .await;
    report(
        "sts/access-denied",
        &[
            ("requests", seen.sent.to_string()),
            ("failed", seen.failed.to_string()),
            ("sts_calls", sts_calls.to_string()),
            ("outage", format!("{secs:.1}s")),
            ("events", events.len().to_string()),
            ("time_to_recover", ms(recovered)),
        ],
    );
}

#[tokio::test]
async fn sts_timeouts_keep_one_call_in_flight_and_recover() {
    let c = Cluster::start(FLAGS).await;
    // Every call takes a second and then fails as the real client does
    // when STS does not answer in time.
    c.sts.set_delay(Duration::from_secs(1));
    c.sts.fail_always(Some(FakeFailure::Timeout));
    c.namespace(NS, Some(".*"));
    let ip = "198.18.9.30";
    c.pod(NS, "slow", ip, Some("slow-role"));
    let client = c.ready().await;
    let id = identity("slow-role");

    let start = Instant::now();
    let seen = load(&client, ip, "slow-role", Duration::from_secs(3), 10).await;
    let secs = start.elapsed().as_secs_f64();
    let sts_calls = c.sts.calls(&id);
    assert_eq!(seen.ok, 0);
    assert!(
        seen.errors.iter().all(|e| e.contains("Timeout")),
        "{:?}",
        seen.errors
    );
    assert_eq!(
        c.sts.max_in_flight(&id),
        1,
        "one call in flight per identity"
    );
    assert!(
        (sts_calls as f64) <= secs + 2.0,
        "{sts_calls} STS calls in {secs:.1}s for {} requests",
        seen.sent
    );
    let events = wait_for_event(&c, "slow").await;
    assert_eq!(events.len(), 1, "{events:?}");

    c.sts.set_delay(Duration::ZERO);
    c.sts.fail_always(None);
    let (_, recovered) = until(
        "service after STS answers again",
        Duration::from_secs(10),
        || async { ask(&client, ip, "slow-role").await.ok() },
    )
    .await;
    report(
        "sts/timeouts",
        &[
            ("requests", seen.sent.to_string()),
            ("failed", seen.failed.to_string()),
            ("sts_calls", sts_calls.to_string()),
            ("max_in_flight", c.sts.max_in_flight(&id).to_string()),
            ("outage", format!("{secs:.1}s")),
            ("time_to_recover", ms(recovered)),
        ],
    );
}

/// A refresh that hangs holds its identity's one in-flight slot, but never
/// the requests: credentials with life left keep being served at once.
#[tokio::test]
async fn a_hung_refresh_never_blocks_cached_credentials() {
    let c = Cluster::start(FLAGS).await;
    c.sts.set_lifetime(Some(Duration::from_secs(10)));
    c.namespace(NS, Some(".*"));
    let ip = "198.18.9.40";
    c.pod(NS, "web", ip, Some("web-role"));
    let client = c.ready().await;
    until("first credentials", Duration::from_secs(5), || async {
        ask(&client, ip, "web-role").await.ok()
    })
    .await;
    let id = identity("web-role");
    c.sts.fail_always(Some(FakeFailure::Hang));
    // The background refresh (due at once: 10s credentials, 2s refresh) hangs.
    let sts = Arc::clone(&c.sts);
    let before = sts.calls(&id);
    until("the refresh to start", Duration::from_secs(5), || async {
        (sts.calls(&id) > before).then_some(())
    })
    .await;

    let start = Instant::now();
    let seen = load(&client, ip, "web-role", Duration::from_secs(2), 10).await;
    assert_eq!(seen.failed, 0, "{seen:?}");
    assert_eq!(c.sts.max_in_flight(&id), 1);
    report(
        "sts/hung-refresh",
        &[
            ("requests", seen.sent.to_string()),
            ("served_from_cache", seen.ok.to_string()),
            ("sts_calls_in_flight", "1".into()),
            ("elapsed", ms(start.elapsed())),
        ],
    );
}
