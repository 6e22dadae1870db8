//! The real STS client ([`kiam::server::sts::StsClient`]) against local
//! stand-ins: a tiny fake that answers STS errors, and moto's STS server for
//! the happy path (credentials, external id, regions, `--assume-role-arn`,
//! `AWS_ENDPOINT_URL_STS` / `AWS_ENDPOINT_URL`).
//!
//! moto is found and started by `kiam_sandbox::procs::start_moto`
//! (`MOTO_SERVER`, `PATH`, or the `.venv` scripts/test.sh makes); without it
//! the moto test prints a loud SKIP and passes. Tests here change
//! process environment variables, so they run one at a time (`SERIAL`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use aws_config::retry::RetryConfig;
use aws_config::{BehaviorVersion, Region};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use kiam::server::credentials::{CacheConfig, CredentialCache, CredentialMetrics};
use kiam::server::model::{Identity, PodInfo, PodPhase, SessionTags};
use kiam::server::sts::{AssumeRole, StsClient, StsError};
use kiam_sandbox::procs::{free_port, start_moto, Moto};
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

/// Environment variables are process-wide: one test at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const HOUR: Duration = Duration::from_secs(3600);

fn identity(role: &str, external_id: Option<&str>) -> Identity {
    Identity {
        role_arn: format!("arn:aws:iam::123456789012:role/{role}").into(),
        session_name: format!("kiam-{role}").into(),
        external_id: external_id.map(Into::into),
        tags: None,
    }
}

/// A fake STS answering every request with `status` and `body`.
async fn fake_sts(status: StatusCode, body: &'static str) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new().fallback(move || async move {
        (status, [("content-type", "text/xml")], body).into_response()
    });
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

/// A client for `endpoint` that reads no environment and does not retry.
fn client_for(endpoint: &str) -> StsClient {
    let conf = aws_sdk_sts::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .endpoint_url(endpoint)
        .credentials_provider(aws_sdk_sts::config::Credentials::new(
            "testing", "testing", None, None, "test",
        ))
        .retry_config(RetryConfig::disabled())
        .build();
    StsClient::from_conf(conf)
}

fn sts_error_xml(code: &str, message: &str) -> &'static str {
    let xml = format!(
        r#"<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
  <Error><Type>Sender</Type><Code>{code}</Code><Message>{message}</Message></Error>
  <RequestId>4f1c2a9e-0000-0000-0000-000000000000</RequestId>
</ErrorResponse>"#
    );
    Box::leak(xml.into_boxed_str())
}

async fn assume(
    client: &StsClient,
    id: &Identity,
) -> Result<kiam::server::sts::Credentials, StsError> {
    client.assume_role(id, HOUR).await
}

#[tokio::test]
async fn access_denied_is_final_with_a_readable_message() {
    let _serial = SERIAL.lock().await;
    let body = sts_error_xml(
        "AccessDenied",
        "User: arn:aws:sts::123456789012:assumed-role/kiam-server/kiam is not authorized to perform: sts:AssumeRole on resource: arn:aws:iam::123456789012:role/reader",
    );
    let addr = fake_sts(StatusCode::FORBIDDEN, body).await;
    let e = assume(
        &client_for(&format!("http://{addr}")),
        &identity("reader", None),
    )
    .await
    .unwrap_err();
    assert_eq!(e.code.as_deref(), Some("AccessDenied"));
    assert!(!e.retryable);
    assert!(
        e.message.starts_with("AccessDenied: User: arn:aws:sts::123456789012:assumed-role/kiam-server/kiam is not authorized"),
        "{}",
        e.message
    );
}

#[tokio::test]
async fn throttling_and_server_errors_are_retryable() {
    let _serial = SERIAL.lock().await;
    let throttled = fake_sts(
        StatusCode::BAD_REQUEST,
        sts_error_xml("Throttling", "Rate exceeded"),
    )
    .await;
    let e = assume(
        &client_for(&format!("http://{throttled}")),
        &identity("a", None),
    )
    .await
    .unwrap_err();
    assert_eq!(e.code.as_deref(), Some("Throttling"));
    assert!(e.retryable, "{e:?}");
    assert_eq!(e.message, "Throttling: Rate exceeded");

    let unavailable = fake_sts(
        StatusCode::SERVICE_UNAVAILABLE,
        sts_error_xml("ServiceUnavailable", "try again"),
    )
    .await;
    let e = assume(
        &client_for(&format!("http://{unavailable}")),
        &identity("a", None),
    )
    .await
    .unwrap_err();
    assert!(e.retryable, "{e:?}");

    let invalid = fake_sts(
        StatusCode::BAD_REQUEST,
        sts_error_xml("ValidationError", "1 validation error detected"),
    )
    .await;
    let e = assume(
        &client_for(&format!("http://{invalid}")),
        &identity("a", None),
    )
    .await
    .unwrap_err();
    assert_eq!(e.code.as_deref(), Some("ValidationError"));
    assert!(!e.retryable, "{e:?}");
}

#[tokio::test]
async fn an_unreachable_endpoint_is_retryable() {
    let _serial = SERIAL.lock().await;
    // A port that was just free: nothing listens there any more.
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port().unwrap()));
    let e = assume(&client_for(&format!("http://{addr}")), &identity("a", None))
        .await
        .unwrap_err();
    assert_eq!(e.code.as_deref(), Some("Unreachable"), "{e:?}");
    assert!(e.retryable);
}

/// moto's record of the roles it was asked to assume:
/// (role ARN, session name, external id, region).
async fn moto_assumed_roles(moto: &Moto) -> Vec<(String, String, Option<String>, String)> {
    let url = format!("{}/moto-api/data.json", moto.url);
    let body = http_get(&url).await;
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["sts"]["AssumedRole"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .map(|r| {
            (
                r["role_arn"].as_str().unwrap_or_default().to_string(),
                r["session_name"].as_str().unwrap_or_default().to_string(),
                r["external_id"].as_str().map(str::to_string),
                r["region_name"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

async fn http_get(url: &str) -> String {
    use http_body_util::BodyExt;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let resp = client.get(url.parse().unwrap()).await.unwrap();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(body.to_vec()).unwrap()
}

/// Points the AWS SDK's environment at moto with dummy credentials and no
/// profile, IMDS or region.
fn isolate_env(moto: &Moto, dir: &std::path::Path) {
    std::env::set_var("AWS_ACCESS_KEY_ID", "testing");
    std::env::set_var("AWS_SECRET_ACCESS_KEY", "testing");
    std::env::remove_var("AWS_SESSION_TOKEN");
    std::env::set_var("AWS_ENDPOINT_URL_STS", &moto.url);
    std::env::remove_var("AWS_ENDPOINT_URL");
    std::env::set_var("AWS_EC2_METADATA_DISABLED", "true");
    std::env::set_var("AWS_CONFIG_FILE", dir.join("no-config"));
    std::env::set_var("AWS_SHARED_CREDENTIALS_FILE", dir.join("no-credentials"));
    for var in [
        "AWS_REGION",
        "AWS_DEFAULT_REGION",
        "AWS_PROFILE",
        "AWS_ROLE_ARN",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
    ] {
        std::env::remove_var(var);
    }
}

#[tokio::test]
async fn moto_issues_credentials_through_the_default_chain() {
    let _serial = SERIAL.lock().await;
    let Some(moto) = start_moto() else { return };
    let dir = tempfile::tempdir().unwrap();
    isolate_env(&moto, dir.path());

    // No --region and none in the environment: us-east-1 (the global endpoint's).
    let client = StsClient::from_env(None, None).await;
    assert_eq!(client.region().as_deref(), Some("us-east-1"));
    let id = Identity {
        tags: Some(Arc::new(SessionTags {
            namespace: "team".into(),
            pod: "web-1".into(),
            service_account: "default".into(),
        })),
        ..identity("reader", Some("ex-1"))
    };
    let creds = client
        .assume_role(&id, HOUR)
        .await
        .expect("moto issues credentials");
    assert!(
        creds.access_key_id.starts_with("ASIA"),
        "{}",
        creds.access_key_id
    );
    assert!(!creds.secret_access_key.is_empty() && !creds.session_token.is_empty());
    let life = creds.expiration.duration_since(jiff::Timestamp::now());
    assert!(
        life > jiff::SignedDuration::from_secs(3600 - 120)
            && life <= jiff::SignedDuration::from_secs(3600 + 5),
        "expiration {} is not about an hour away",
        creds.expiration
    );
    let assumed = moto_assumed_roles(&moto).await;
    assert!(
        assumed.contains(&(
            "arn:aws:iam::123456789012:role/reader".into(),
            "kiam-reader".into(),
            Some("ex-1".into()),
            "us-east-1".into()
        )),
        "{assumed:?}"
    );

    // --region picks the regional endpoint (still moto here, via the override).
    let client = StsClient::from_env(Some("eu-west-2"), None).await;
    assert_eq!(client.region().as_deref(), Some("eu-west-2"));
    client
        .assume_role(&identity("regional", None), HOUR)
        .await
        .unwrap();
    let assumed = moto_assumed_roles(&moto).await;
    assert!(
        assumed
            .iter()
            .any(|r| r.1 == "kiam-regional" && r.3 == "eu-west-2"),
        "{assumed:?}"
    );

    // Without --region, AWS_REGION wins over the us-east-1 fallback.
    std::env::set_var("AWS_REGION", "ap-southeast-2");
    let client = StsClient::from_env(None, None).await;
    assert_eq!(client.region().as_deref(), Some("ap-southeast-2"));
    std::env::remove_var("AWS_REGION");

    // --assume-role-arn: the server assumes its own role before the pod's.
    let client =
        StsClient::from_env(None, Some("arn:aws:iam::123456789012:role/kiam-server")).await;
    let creds = client
        .assume_role(&identity("chained", None), HOUR)
        .await
        .unwrap();
    assert!(creds.access_key_id.starts_with("ASIA"));
    let assumed = moto_assumed_roles(&moto).await;
    assert!(
        assumed
            .iter()
            .any(|r| r.0 == "arn:aws:iam::123456789012:role/kiam-server" && r.1 == "kiam-server"),
        "the server's own role was not assumed: {assumed:?}"
    );
    assert!(assumed.iter().any(|r| r.1 == "kiam-chained"), "{assumed:?}");

    // The generic AWS_ENDPOINT_URL works as well as the STS-specific one.
    std::env::remove_var("AWS_ENDPOINT_URL_STS");
    std::env::set_var("AWS_ENDPOINT_URL", &moto.url);
    let client = StsClient::from_env(None, None).await;
    client
        .assume_role(&identity("generic", None), HOUR)
        .await
        .unwrap();
    assert!(moto_assumed_roles(&moto)
        .await
        .iter()
        .any(|r| r.1 == "kiam-generic"));

    // The cache over the real client: one call, then hits.
    let mut registry = Registry::default();
    let cache = CredentialCache::new(
        Arc::new(client),
        CacheConfig {
            session_duration: HOUR,
            session_refresh: Duration::from_secs(30 * 60),
            fetchers: 2,
            call_timeout: Duration::from_secs(15),
        },
        Arc::new(|_: &Identity| true),
        CredentialMetrics::register(&mut registry),
        CancellationToken::new(),
    );
    let id = identity("cached", None);
    let a = cache.get(&id).await.unwrap();
    let b = cache.get(&id).await.unwrap();
    assert_eq!(a.access_key_id, b.access_key_id);
    assert!(a.access_key_id.starts_with("ASIA"));
    let calls = moto_assumed_roles(&moto)
        .await
        .iter()
        .filter(|r| r.1 == "kiam-cached")
        .count();
    assert_eq!(calls, 1);
    let text = kiam::telemetry::encode(&registry);
    assert!(text.contains("kiam_sts_cache_hit_total 1"), "{text}");
    assert!(
        text.contains("kiam_sts_assumerole_timing_seconds_count 1"),
        "{text}"
    );
}

fn pod(namespace: &str, name: &str, uid: &str) -> PodInfo {
    PodInfo {
        namespace: namespace.into(),
        name: name.into(),
        uid: uid.into(),
        ips: Some("198.18.0.10".parse().unwrap()),
        phase: PodPhase::Running,
        host_network: false,
        deletion: None,
        role: Some("reader".into()),
        session_name: None,
        external_id: None,
        service_account: Some("default".into()),
        node: None,
    }
}

/// A fake API server and an [`EventRecorder`] writing to it.
async fn recorder_and_api() -> (
    kiam::server::events::EventRecorder,
    kiam_sandbox::apiserver::FakeApiServer,
) {
    let api = kiam_sandbox::apiserver::FakeApiServer::start()
        .await
        .unwrap();
    api.create_namespace("team").unwrap();
    kiam::ensure_crypto_provider();
    let config = kube::Config::new(api.url().parse().unwrap());
    let client = kube::Client::try_from(config).unwrap();
    (kiam::server::events::EventRecorder::new(client), api)
}

/// Waits up to 10 s for the Events in `team` to satisfy `done`.
async fn until_events(
    api: &kiam_sandbox::apiserver::FakeApiServer,
    what: &str,
    done: impl Fn(&[serde_json::Value]) -> bool,
) -> Vec<serde_json::Value> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let events = api.events("team");
        if done(&events) {
            return events;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what} never happened: {events:#?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn event_writes(api: &kiam_sandbox::apiserver::FakeApiServer, method: &str) -> usize {
    api.count_requests(|r| {
        r.method == method && r.path.starts_with("/api/v1/namespaces/team/events")
    })
}

#[tokio::test]
async fn a_denial_recorded_100_times_creates_one_event() {
    use kiam::server::events::Reason;

    let _serial = SERIAL.lock().await;
    let (recorder, api) = recorder_and_api().await;
    let web = pod("team", "web-1", "0b5e6c1a-1111-4222-8333-944455556666");
    let denial = "failed assuming role \"admin\": role arn:aws:iam::123456789012:role/admin is not permitted by namespace team";
    let is_denial = |e: &serde_json::Value| e["reason"] == "KiamRoleForbidden";
    recorder.record(&web, Reason::RoleForbidden, denial.to_string());
    until_events(&api, "the first denial's Event", |events| {
        events.iter().any(is_denial)
    })
    .await;
    for _ in 0..99 {
        recorder.record(&web, Reason::RoleForbidden, denial.to_string());
    }
    recorder.record(&web, Reason::CredentialError, "sentinel".to_string());
    // The last recorder gone, its writer writes what it counted and ends.
    drop(recorder);
    let events = until_events(&api, "a count of 100 and the sentinel", |events| {
        events.iter().any(|e| e["message"] == "sentinel")
            && events.iter().any(|e| is_denial(e) && e["count"] == 100)
    })
    .await;
    let denials: Vec<_> = events.iter().filter(|e| is_denial(e)).collect();
    assert_eq!(denials.len(), 1, "{events:#?}");
    let e = denials[0];
    assert_eq!(e["apiVersion"], "v1");
    assert_eq!(e["type"], "Warning");
    assert_eq!(e["message"], denial);
    assert_eq!(e["count"], 100);
    assert!(e["firstTimestamp"].as_str().unwrap() <= e["lastTimestamp"].as_str().unwrap());
    assert_eq!(e["involvedObject"]["kind"], "Pod");
    assert_eq!(e["involvedObject"]["namespace"], "team");
    assert_eq!(e["involvedObject"]["name"], "web-1");
    assert_eq!(
        e["involvedObject"]["uid"],
        "0b5e6c1a-1111-4222-8333-944455556666"
    );
    assert_eq!(e["source"]["component"], "kiam");
    assert_eq!(e["reportingComponent"], "kiam-server");
    let writes = (event_writes(&api, "POST"), event_writes(&api, "PATCH"));
    assert_eq!(
        writes,
        (2, 1),
        "the denial created once and updated once, and the sentinel"
    );
    println!(
        "RELIABILITY events: 100 denials of one pod -> 1 Event (count {}), creates: {}, updates: {}",
        e["count"],
        writes.0 - 1,
        writes.1
    );
}

#[tokio::test]
async fn ten_denials_on_four_pods_are_four_events() {
    use kiam::server::events::Reason;

    let _serial = SERIAL.lock().await;
    let (recorder, api) = recorder_and_api().await;
    let pods: Vec<PodInfo> = (0..4)
        .map(|i| pod("team", &format!("web-{i}"), &format!("uid-{i}")))
        .collect();
    // 4, 3, 2 and 1 denials, interleaved.
    for round in 0..4 {
        for p in &pods[round..] {
            let denial = format!("role admin is not permitted for {}", p.name);
            recorder.record(p, Reason::RoleForbidden, denial);
        }
    }
    drop(recorder);
    let events = until_events(&api, "4 Events counting 10 denials", |events| {
        events
            .iter()
            .filter_map(|e| e["count"].as_i64())
            .sum::<i64>()
            == 10
    })
    .await;
    let mut counts: Vec<(String, i64)> = events
        .iter()
        .map(|e| {
            let uid = e["involvedObject"]["uid"].as_str().unwrap().to_string();
            (uid, e["count"].as_i64().unwrap())
        })
        .collect();
    counts.sort();
    assert_eq!(
        counts,
        [
            ("uid-0".to_string(), 1),
            ("uid-1".to_string(), 2),
            ("uid-2".to_string(), 3),
            ("uid-3".to_string(), 4)
        ],
        "{events:#?}"
    );
    let writes = (event_writes(&api, "POST"), event_writes(&api, "PATCH"));
    assert_eq!(writes.0, 4, "one create per pod");
    assert!(writes.1 <= 4, "at most one update per pod");
    println!(
        "RELIABILITY events: 10 denials on 4 pods -> {} Events, creates: {}, updates: {}",
        events.len(),
        writes.0,
        writes.1
    );
}
