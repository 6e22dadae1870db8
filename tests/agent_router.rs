//! The agent's router with a faked server client and a faked caller
//! address: every route and status, IMDSv2, identity rules, fallback.

#[path = "support/fake_kiam.rs"]
mod fake_kiam;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::connect_info::ConnectInfo;
use fake_kiam::{creds, FakeKiam};
use http::{HeaderMap, Request, StatusCode};
use http_body_util::BodyExt;
use kiam::agent::client::ClientError;
use kiam::agent::metadata::{router, Config, RouterContext};
use kiam::agent::metrics::Metrics;
use kiam::agent::proxy::Upstream;
use kiam::wire::Check;
use kiam_sandbox::imds::{Behaviour, ImdsEmulator, NodeIdentity};
use prometheus_client::registry::Registry;
use regex::Regex;
use tower::ServiceExt;

const POD: &str = "10.1.0.5";
const OTHER_POD: &str = "10.1.0.6";
const NO_ROLE_POD: &str = "10.1.0.7";
const ARN_POD: &str = "10.1.0.8";
const ROLE_ARN: &str = "arn:aws:iam::210987654321:role/team/app";

struct Agent {
    app: axum::Router,
    fake: Arc<FakeKiam>,
    state: Arc<RouterContext>,
    registry: Registry,
    _imds: ImdsEmulator,
}

fn default_fake() -> FakeKiam {
    FakeKiam::new()
        .pod(POD, Some("app-role"))
        .grant(POD, "app-role", creds("PODKEY"))
        .pod(OTHER_POD, Some("other-role"))
        .grant(OTHER_POD, "other-role", creds("OTHERKEY"))
        .pod(NO_ROLE_POD, None)
        .pod(ARN_POD, Some(ROLE_ARN))
        .grant(ARN_POD, ROLE_ARN, creds("ARNKEY"))
}

async fn agent_with(fake: FakeKiam, tweak: impl FnOnce(&mut Config)) -> Agent {
    let imds = ImdsEmulator::start(NodeIdentity::default(), Behaviour::leaky())
        .await
        .unwrap();
    let mut cfg = Config::new(Regex::new("^$").unwrap());
    // Short budgets keep retry-until-deadline cases fast.
    cfg.deadline = Duration::from_millis(250);
    cfg.health_deadline = Duration::from_secs(2);
    tweak(&mut cfg);
    let mut registry = Registry::default();
    let metrics = Metrics::new(&mut registry);
    let fake = Arc::new(fake);
    let upstream = Upstream::new(&imds.url(), Duration::from_secs(2)).unwrap();
    let state = RouterContext::new(cfg, fake.clone(), Arc::new(upstream), metrics);
    Agent {
        app: router(state.clone()),
        fake,
        state,
        registry,
        _imds: imds,
    }
}

async fn agent() -> Agent {
    agent_with(default_fake(), |_| {}).await
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
}

impl Agent {
    async fn call(&self, method: &str, uri: &str, from: &str, headers: &[(&str, &str)]) -> Reply {
        let mut req = Request::builder().method(method).uri(uri);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let mut req = req.body(Body::empty()).unwrap();
        let peer: SocketAddr = format!("{from}:43210").parse().unwrap();
        req.extensions_mut().insert(ConnectInfo(peer));
        let resp = self.app.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        Reply {
            status,
            headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        }
    }

    async fn get(&self, uri: &str, from: &str) -> Reply {
        self.call("GET", uri, from, &[]).await
    }

    fn metrics(&self) -> String {
        kiam::telemetry::encode(&self.registry)
    }

    async fn token(&self, from: &str, ttl: &str) -> Reply {
        self.call(
            "PUT",
            "/latest/api/token",
            from,
            &[("x-aws-ec2-metadata-token-ttl-seconds", ttl)],
        )
        .await
    }
}

fn metric_line<'a>(metrics: &'a str, prefix: &str) -> Option<&'a str> {
    metrics.lines().find(|l| l.starts_with(prefix))
}

#[tokio::test]
async fn ping_answers_pong() {
    let a = agent().await;
    let r = a.get("/ping", POD).await;
    assert_eq!((r.status, r.body.as_str()), (StatusCode::OK, "pong"));
}

#[tokio::test]
async fn health_returns_upstream_instance_id() {
    let a = agent().await;
    let r = a.get("/health", POD).await;
    assert_eq!(
        (r.status, r.body.as_str()),
        (StatusCode::OK, a._imds.node().instance_id.as_str())
    );
    assert_eq!(
        a.fake.health_calls.load(Ordering::SeqCst),
        0,
        "shallow health must not ask the server"
    );

    let r = a.get("/health?deep=1", POD).await;
    assert_eq!(
        (r.status, r.body.as_str()),
        (StatusCode::OK, a._imds.node().instance_id.as_str())
    );
    assert_eq!(a.fake.health_calls.load(Ordering::SeqCst), 1);

    a.fake.set_health("degraded");
    let r = a.get("/health?deep=1", POD).await;
    assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(r.body.contains("degraded"), "{}", r.body);
}

#[tokio::test]
async fn health_fails_when_upstream_is_gone() {
    let imds = ImdsEmulator::start(NodeIdentity::default(), Behaviour::leaky())
        .await
        .unwrap();
    let dead = imds.url();
    drop(imds);
    let mut registry = Registry::default();
    let state = RouterContext::new(
        Config::new(Regex::new("^$").unwrap()),
        Arc::new(default_fake()),
        Arc::new(Upstream::new(&dead, Duration::from_millis(500)).unwrap()),
        Metrics::new(&mut registry),
    );
    let mut req = Request::get("/health").body(Body::empty()).unwrap();
    req.extensions_mut()
        .insert(ConnectInfo("10.0.0.1:1".parse::<SocketAddr>().unwrap()));
    let resp = router(state).oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::INTERNAL_SERVER_ERROR);
}

#[tokio::test]
async fn listing_without_slash_redirects_for_any_version() {
    let a = agent().await;
    for v in ["latest", "2016-09-02", "1.0"] {
        let r = a
            .get(&format!("/{v}/meta-data/iam/security-credentials"), POD)
            .await;
        assert_eq!(r.status, StatusCode::MOVED_PERMANENTLY, "{v}");
        assert_eq!(
            r.headers["location"].to_str().unwrap(),
            format!("/{v}/meta-data/iam/security-credentials/")
        );
    }
}

#[tokio::test]
async fn role_name_is_plain_text_without_newline() {
    let a = agent().await;
    for v in ["latest", "2016-09-02"] {
        let r = a
            .get(&format!("/{v}/meta-data/iam/security-credentials/"), POD)
            .await;
        assert_eq!(
            (r.status, r.body.as_str()),
            (StatusCode::OK, "app-role"),
            "{v}"
        );
    }
    let r = a
        .get("/latest/meta-data/iam/security-credentials/", OTHER_POD)
        .await;
    assert_eq!(r.body, "other-role");
    let m = a.metrics();
    assert!(
        m.contains(r#"kiam_metadata_success_total{handler="roleName"} 3"#),
        "{m}"
    );
    assert!(
        m.contains(r#"kiam_metadata_responses_total{handler="roleName",code="200"} 3"#),
        "{m}"
    );
}

#[tokio::test]
async fn role_name_strips_leading_slash() {
    let a = agent_with(FakeKiam::new().pod(POD, Some("/slashed")), |_| {}).await;
    let r = a
        .get("/latest/meta-data/iam/security-credentials/", POD)
        .await;
    assert_eq!(r.body, "slashed");
}

#[tokio::test]
async fn no_role_is_404() {
    let a = agent().await;
    let r = a
        .get("/latest/meta-data/iam/security-credentials/", NO_ROLE_POD)
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert!(a
        .metrics()
        .contains(r#"kiam_metadata_empty_role_total{handler="roleName"} 1"#));
}

#[tokio::test]
async fn unknown_pod_is_404_after_retries() {
    let a = agent().await;
    let r = a
        .get("/latest/meta-data/iam/security-credentials/", "10.9.9.9")
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    // `no pod found` is retried inside the deadline (pod start-up race).
    assert!(a.fake.role_calls.load(Ordering::SeqCst) > 1);
    assert!(a
        .metrics()
        .contains(r#"kiam_metadata_find_role_errors_total{handler="roleName"} 1"#));
}

#[tokio::test]
async fn credentials_json_has_kiam_shape() {
    let a = agent().await;
    let r = a
        .get("/latest/meta-data/iam/security-credentials/app-role", POD)
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.headers["content-type"], "application/json");
    let keys: Vec<&str> = r
        .body
        .trim_start_matches('{')
        .split(",\"")
        .map(|kv| kv.trim_start_matches('"').split('"').next().unwrap())
        .collect();
    assert_eq!(
        keys,
        [
            "Code",
            "LastUpdated",
            "Type",
            "AccessKeyId",
            "SecretAccessKey",
            "Token",
            "Expiration"
        ]
    );
    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(v["Code"], "Success");
    assert_eq!(v["Type"], "AWS-HMAC");
    assert_eq!(v["AccessKeyId"], "PODKEY");
    assert_eq!(v["SecretAccessKey"], "PODKEY-secret");
    assert_eq!(v["Token"], "PODKEY-token");
    let time = Regex::new(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$").unwrap();
    for k in ["LastUpdated", "Expiration"] {
        assert!(time.is_match(v[k].as_str().unwrap()), "{k}: {}", v[k]);
    }
    let m = a.metrics();
    assert!(
        m.contains(r#"kiam_metadata_success_total{handler="credentials"} 1"#),
        "{m}"
    );
    assert!(
        metric_line(
            &m,
            r#"kiam_metadata_handler_latency_seconds_count{handler="credentials"} 1"#
        )
        .is_some(),
        "{m}"
    );
}

#[tokio::test]
async fn another_pods_role_is_404() {
    let a = agent().await;
    let r = a
        .get("/latest/meta-data/iam/security-credentials/other-role", POD)
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert!(!r.body.contains("OTHERKEY"));
    assert_eq!(
        a.fake.cred_calls.load(Ordering::SeqCst),
        1,
        "a denial is not retried"
    );
    assert_eq!(
        a.fake.role_calls.load(Ordering::SeqCst),
        0,
        "the denial said which check refused; nothing more is asked"
    );
}

#[tokio::test]
async fn policy_denial_is_403_at_once() {
    // The pod's own role, but the namespace does not permit it.
    let a = agent_with(FakeKiam::new().pod(POD, Some("app-role")), |_| {}).await;
    let r = a
        .get("/latest/meta-data/iam/security-credentials/app-role", POD)
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert!(r.body.contains("forbidden by policy"));
    assert_eq!(
        a.fake.cred_calls.load(Ordering::SeqCst),
        1,
        "a denial is not retried"
    );
    assert!(a
        .metrics()
        .contains(r#"kiam_metadata_credential_fetch_errors_total{handler="credentials"} 1"#));
}

/// The check a server names on a denial picks the status, and the agent
/// asks nothing more: exactly one call per denied request.
#[tokio::test]
async fn the_denied_check_picks_404_or_403_in_one_call() {
    let a = agent().await;
    for (denial, want) in [
        (Some(Check::AnnotatedRole), StatusCode::NOT_FOUND),
        (Some(Check::NamespacePermitted), StatusCode::FORBIDDEN),
        // What a Go kiam server sends: no metadata, so no check.
        (None, StatusCode::FORBIDDEN),
    ] {
        let calls_before =
            a.fake.cred_calls.load(Ordering::SeqCst) + a.fake.role_calls.load(Ordering::SeqCst);
        a.fake.script([ClientError::Forbidden(denial)]);
        let r = a
            .get("/latest/meta-data/iam/security-credentials/app-role", POD)
            .await;
        assert_eq!(r.status, want, "{denial:?}: {}", r.body);
        assert!(!r.body.contains("PODKEY"), "{denial:?}");
        let calls = a.fake.cred_calls.load(Ordering::SeqCst)
            + a.fake.role_calls.load(Ordering::SeqCst)
            - calls_before;
        assert_eq!(calls, 1, "{denial:?}: one call, no retry, no role check");
    }
}

#[tokio::test]
async fn transient_errors_are_retried() {
    let a = agent().await;
    a.fake.script([
        ClientError::Unavailable("down".into()),
        ClientError::Server("sts hiccup".into()),
    ]);
    let r = a
        .get("/latest/meta-data/iam/security-credentials/app-role", POD)
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(a.fake.cred_calls.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn persistent_errors_map_to_5xx() {
    let a = agent().await;
    a.fake
        .fail_always(Some(ClientError::Server("sts failed".into())));
    let r = a
        .get("/latest/meta-data/iam/security-credentials/app-role", POD)
        .await;
    assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(
        a.fake.cred_calls.load(Ordering::SeqCst) > 1,
        "server errors are retried"
    );

    a.fake
        .fail_always(Some(ClientError::Unavailable("refused".into())));
    let r = a
        .get("/latest/meta-data/iam/security-credentials/app-role", POD)
        .await;
    // Every attempt refused outright: no server answered.
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
}

#[tokio::test]
async fn slow_servers_hit_the_deadline() {
    let a = agent().await;
    a.fake.set_delay(Duration::from_secs(5));
    let r = a
        .get("/latest/meta-data/iam/security-credentials/app-role", POD)
        .await;
    assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT);
}

#[tokio::test]
async fn extended_credentials_carry_account_of_arn_roles() {
    let a = agent().await;
    let r = a
        .get(
            &format!("/latest/meta-data/iam/security-credentials-extended/{ROLE_ARN}"),
            ARN_POD,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(v["AccountId"], "210987654321");
    assert_eq!(v["AccessKeyId"], "ARNKEY");

    // A bare role name does not tell the account: the field is left out
    // rather than guessed.
    let r = a
        .get(
            "/latest/meta-data/iam/security-credentials-extended/app-role",
            POD,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert!(v.get("AccountId").is_none());
    assert_eq!(v["AccessKeyId"], "PODKEY");

    let r = a
        .get("/latest/meta-data/iam/security-credentials-extended/", POD)
        .await;
    assert_eq!(r.body, "app-role");
    let r = a
        .get(
            "/latest/meta-data/iam/security-credentials-extended/other-role",
            POD,
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn iam_info_is_the_pods_never_the_nodes() {
    let a = agent().await;
    let r = a.get("/latest/meta-data/iam/info", ARN_POD).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(v["Code"], "Success");
    assert_eq!(
        v["InstanceProfileArn"],
        "arn:aws:iam::210987654321:instance-profile/team/app"
    );
    assert!(v["InstanceProfileId"].as_str().unwrap().starts_with("AIPA"));
    for marker in a._imds.node().markers() {
        assert!(!r.body.contains(marker));
    }
    // Unknown account (bare role name) or no role: 404, never proxied.
    assert_eq!(
        a.get("/latest/meta-data/iam/info", POD).await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        a.get("/latest/meta-data/iam/info", NO_ROLE_POD)
            .await
            .status,
        StatusCode::NOT_FOUND
    );
    assert!(a._imds.seen().is_empty());
}

/// Issue 13: a role annotated by bare name has its account once the server
/// sends the ARN it resolved the name to (`Role.arn`; Go servers do not).
#[tokio::test]
async fn a_bare_name_resolved_by_the_server_has_its_account() {
    const RESOLVED: &str = "arn:aws:iam::123456789012:role/app-role";
    let fake = default_fake()
        .resolved(POD, RESOLVED)
        // A server's ARN that does not name the pod's role is not believed.
        .resolved(OTHER_POD, "arn:aws:iam::123456789012:role/admin");
    let a = agent_with(fake, |c| c.stale_window = Duration::from_secs(60)).await;

    for path in ["app-role", "/app-role"] {
        let r = a
            .get(
                &format!("/latest/meta-data/iam/security-credentials-extended/{path}"),
                POD,
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{path}: {}", r.body);
        let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(v["AccountId"], "123456789012", "{path}");
        assert_eq!(v["AccessKeyId"], "PODKEY");
    }
    // The plain document never has the field.
    let r = a
        .get("/latest/meta-data/iam/security-credentials/app-role", POD)
        .await;
    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert!(v.get("AccountId").is_none(), "{}", r.body);

    let r = a.get("/latest/meta-data/iam/info", POD).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(
        v["InstanceProfileArn"],
        "arn:aws:iam::123456789012:instance-profile/app-role"
    );
    assert!(v["InstanceProfileId"].as_str().unwrap().starts_with("AIPA"));
    let r = a.get("/latest/meta-data/iam/", POD).await;
    assert_eq!(r.body, "info\nsecurity-credentials/");

    // Not the pod's role: still refused, account or not.
    let r = a
        .get(
            "/latest/meta-data/iam/security-credentials-extended/other-role",
            POD,
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);

    // An ARN that names another role: no account, no iam/info.
    let r = a
        .get(
            "/latest/meta-data/iam/security-credentials-extended/other-role",
            OTHER_POD,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert!(v.get("AccountId").is_none(), "{}", r.body);
    assert_eq!(
        a.get("/latest/meta-data/iam/info", OTHER_POD).await.status,
        StatusCode::NOT_FOUND
    );

    // While no server answers, the kept role keeps its ARN.
    a.fake
        .fail_always(Some(ClientError::Unavailable("all servers down".into())));
    let r = a.get("/latest/meta-data/iam/info", POD).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let r = a
        .get(
            "/latest/meta-data/iam/security-credentials-extended/app-role",
            POD,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(v["AccountId"], "123456789012");
    assert!(a._imds.seen().is_empty());
}

#[tokio::test]
async fn unknown_iam_paths_are_404_and_not_proxied() {
    let a = agent_with(default_fake(), |c| {
        c.allow_route = Regex::new(".*").unwrap()
    })
    .await;
    for p in [
        "/latest/meta-data/iam/other",
        "/latest/meta-data/iam/security-credentials/app-role/extra",
        "/latest/meta-data/IAM/info",
        "/latest/meta-data/identity-credentials/ec2/security-credentials/ec2-instance",
    ] {
        let r = a.get(p, POD).await;
        assert_ne!(r.status, StatusCode::OK, "{p}");
        assert!(!r.body.contains(&a._imds.node().role_name), "{p}");
    }
    let r = a
        .call(
            "POST",
            "/latest/meta-data/iam/security-credentials/",
            POD,
            &[],
        )
        .await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
    assert!(a._imds.seen().is_empty(), "{:?}", a._imds.seen());
}

#[tokio::test]
async fn imdsv2_token_put_rules() {
    let a = agent().await;
    let r = a.token(POD, "21600").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.headers["x-aws-ec2-metadata-token-ttl-seconds"], "21600");
    assert!(
        r.body.len() >= 32,
        "token too short to be unguessable: {}",
        r.body
    );
    let again = a.token(POD, "21600").await;
    assert_eq!(again.status, StatusCode::OK);

    for bad in ["0", "21601", "-5", "ten", ""] {
        assert_eq!(
            a.token(POD, bad).await.status,
            StatusCode::BAD_REQUEST,
            "ttl {bad:?}"
        );
    }
    let r = a.call("PUT", "/latest/api/token", POD, &[]).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let r = a
        .call(
            "PUT",
            "/latest/api/token",
            POD,
            &[
                ("x-aws-ec2-metadata-token-ttl-seconds", "60"),
                ("x-forwarded-for", "10.1.0.5"),
            ],
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert!(
        a._imds.seen().is_empty(),
        "token requests are answered by the agent"
    );
}

#[tokio::test]
async fn imdsv2_tokens_are_checked_and_bound_to_the_caller() {
    let a = agent().await;
    let token = a.token(POD, "60").await.body;
    let path = "/latest/meta-data/iam/security-credentials/";
    let r = a
        .call("GET", path, POD, &[("x-aws-ec2-metadata-token", &token)])
        .await;
    assert_eq!((r.status, r.body.as_str()), (StatusCode::OK, "app-role"));

    // The same token from another pod.
    let r = a
        .call(
            "GET",
            path,
            OTHER_POD,
            &[("x-aws-ec2-metadata-token", &token)],
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert!(!r.body.contains("role"));

    for bad in ["", "garbage", "ffffffff.00", &token[..token.len() - 2]] {
        let r = a
            .call("GET", path, POD, &[("x-aws-ec2-metadata-token", bad)])
            .await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "token {bad:?}");
    }
    // Tokenless is fine without --require-imdsv2.
    assert_eq!(a.get(path, POD).await.status, StatusCode::OK);
}

#[tokio::test]
async fn require_imdsv2_refuses_tokenless_gets() {
    let a = agent_with(default_fake(), |c| c.require_imdsv2 = true).await;
    let path = "/latest/meta-data/iam/security-credentials/app-role";
    assert_eq!(a.get(path, POD).await.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        a.get("/latest/user-data", POD).await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(a.fake.cred_calls.load(Ordering::SeqCst), 0);
    let token = a.token(POD, "60").await.body;
    let r = a
        .call("GET", path, POD, &[("x-aws-ec2-metadata-token", &token)])
        .await;
    assert_eq!(r.status, StatusCode::OK);
    // Probes stay open.
    assert_eq!(a.get("/ping", POD).await.status, StatusCode::OK);
}

#[tokio::test]
async fn spoofed_headers_never_change_the_pod() {
    let a = agent().await;
    let spoof = [
        ("x-forwarded-for", OTHER_POD),
        ("x-real-ip", OTHER_POD),
        ("forwarded", "for=10.1.0.6"),
        ("host", "10.1.0.6"),
    ];
    let r = a
        .call(
            "GET",
            "/latest/meta-data/iam/security-credentials/",
            POD,
            &spoof,
        )
        .await;
    assert_eq!(r.body, "app-role");
    let r = a
        .call(
            "GET",
            "/latest/meta-data/iam/security-credentials/other-role",
            POD,
            &spoof,
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert!(!r.body.contains("OTHERKEY"));
    let r = a
        .call(
            "GET",
            "/latest/meta-data/iam/security-credentials/app-role",
            POD,
            &spoof,
        )
        .await;
    assert!(r.body.contains("PODKEY"));
}

#[tokio::test]
async fn ip_query_is_ignored_unless_allowed() {
    let a = agent().await;
    let r = a
        .get(
            &format!("/latest/meta-data/iam/security-credentials/?ip={OTHER_POD}"),
            POD,
        )
        .await;
    assert_eq!(r.body, "app-role");
    let r = a
        .get(
            &format!("/latest/meta-data/iam/security-credentials/other-role?ip={OTHER_POD}"),
            POD,
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);

    let a = agent_with(default_fake(), |c| c.allow_ip_query = true).await;
    let r = a
        .get(
            &format!("/latest/meta-data/iam/security-credentials/?ip={OTHER_POD}"),
            POD,
        )
        .await;
    assert_eq!(r.body, "other-role");
    let r = a
        .get(
            "/latest/meta-data/iam/security-credentials/?ip=not-an-ip",
            POD,
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    // A redirect keeps the query so the override survives it.
    let r = a
        .get(
            &format!("/latest/meta-data/iam/security-credentials?ip={OTHER_POD}"),
            POD,
        )
        .await;
    assert_eq!(
        r.headers["location"].to_str().unwrap(),
        format!("/latest/meta-data/iam/security-credentials/?ip={OTHER_POD}")
    );
}

#[tokio::test]
async fn fallback_serves_last_good_answers_only_while_no_server_answers() {
    let a = agent().await;
    let list = "/latest/meta-data/iam/security-credentials/";
    let get = "/latest/meta-data/iam/security-credentials/app-role";
    assert_eq!(a.get(list, POD).await.status, StatusCode::OK);
    assert_eq!(a.get(get, POD).await.status, StatusCode::OK);

    a.fake
        .fail_always(Some(ClientError::Unavailable("all servers down".into())));
    let r = a.get(list, POD).await;
    assert_eq!((r.status, r.body.as_str()), (StatusCode::OK, "app-role"));
    let r = a.get(get, POD).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.body.contains("PODKEY"));
    let m = a.metrics();
    assert!(
        m.contains(r#"kiam_agent_stale_credentials_served_total{handler="credentials"} 1"#),
        "{m}"
    );
    assert!(
        m.contains(r#"kiam_agent_stale_credentials_served_total{handler="roleName"} 1"#),
        "{m}"
    );
    // Another pod never gets them.
    assert_ne!(a.get(get, OTHER_POD).await.status, StatusCode::OK);

    // A server that answers "no pod" wipes the kept answers for that IP.
    a.fake.fail_always(None);
    a.fake.remove_pod(POD);
    assert_eq!(a.get(get, POD).await.status, StatusCode::NOT_FOUND);
    a.fake
        .fail_always(Some(ClientError::Unavailable("all servers down".into())));
    assert_ne!(a.get(get, POD).await.status, StatusCode::OK);
    assert_ne!(a.get(list, POD).await.status, StatusCode::OK);
}

#[tokio::test]
async fn fallback_never_covers_server_errors_and_can_be_off() {
    let a = agent().await;
    let get = "/latest/meta-data/iam/security-credentials/app-role";
    assert_eq!(a.get(get, POD).await.status, StatusCode::OK);
    a.fake
        .fail_always(Some(ClientError::Server("sts down".into())));
    assert_eq!(
        a.get(get, POD).await.status,
        StatusCode::INTERNAL_SERVER_ERROR
    );

    let a = agent_with(default_fake(), |c| c.stale_window = Duration::ZERO).await;
    assert_eq!(a.get(get, POD).await.status, StatusCode::OK);
    a.fake
        .fail_always(Some(ClientError::Unavailable("down".into())));
    assert_ne!(a.get(get, POD).await.status, StatusCode::OK);
    assert!(a.metrics().contains("kiam_agent_fallback_pods 0"));
}

#[tokio::test]
async fn iam_listing_and_paths_in_other_spellings() {
    let a = agent().await;
    let r = a.get("/latest/meta-data/iam/", POD).await;
    assert_eq!(
        (r.status, r.body.as_str()),
        (StatusCode::OK, "security-credentials/")
    );
    let r = a.get("/latest/meta-data/iam/", ARN_POD).await;
    assert_eq!(r.body, "info\nsecurity-credentials/");
    // Encoded and dotted spellings reach the same handler.
    let r = a
        .get("/latest/meta-data%2Fiam%2Fsecurity-credentials%2F", POD)
        .await;
    assert_eq!(r.body, "app-role");
    let r = a
        .get(
            "/latest/./meta-data/x/../iam//security-credentials/app-role",
            POD,
        )
        .await;
    assert!(r.body.contains("PODKEY"));
    assert_eq!(
        a.get("/latest/meta-data/iam/%00", POD).await.status,
        StatusCode::BAD_REQUEST
    );
}

/// The real listener: identity from the TCP peer, bounded heads, and
/// in-flight requests finish on shutdown.
#[tokio::test]
async fn served_over_tcp_with_graceful_shutdown() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fake = FakeKiam::new().pod("127.0.0.1", Some("loopback-role"));
    let a = agent_with(fake, |c| c.deadline = Duration::from_secs(5)).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let server = tokio::spawn(kiam::agent::run(listener, a.state.clone(), stop.clone()));

    async fn raw(addr: SocketAddr, req: String) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out).await;
        String::from_utf8_lossy(&out).into_owned()
    }
    let get = |path: &str, extra: &str| {
        format!("GET {path} HTTP/1.1\r\nHost: 169.254.169.254\r\n{extra}Connection: close\r\n\r\n")
    };

    let resp = raw(
        addr,
        get(
            "/latest/meta-data/iam/security-credentials/",
            "X-Forwarded-For: 10.1.0.5\r\n",
        ),
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.ends_with("loopback-role"), "{resp}");

    let huge = format!("X-Big: {}\r\n", "a".repeat(64 * 1024));
    let resp = raw(addr, get("/ping", &huge)).await;
    assert!(
        resp.starts_with("HTTP/1.1 431") || resp.is_empty(),
        "{resp}"
    );

    // A slow request is in flight when shutdown starts; it still completes.
    a.fake.set_delay(Duration::from_millis(300));
    let slow = tokio::spawn(raw(
        addr,
        get("/latest/meta-data/iam/security-credentials/", ""),
    ));
    while a.fake.role_calls.load(Ordering::SeqCst) < 2 {
        tokio::task::yield_now().await;
    }
    stop.cancel();
    let resp = slow.await.unwrap();
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    server.await.unwrap().unwrap();
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "listener closed after shutdown"
    );
}

/// Issue 12, defect 1: a `no pod found` in any attempt of a request drops
/// what the fallback kept for that IP, not only when it is the last error.
/// Here the server says "no pod" once (the old pod is gone) and then every
/// server becomes unreachable: the new pod on that IP must not be served
/// the old pod's role or credentials.
#[tokio::test]
async fn no_pod_found_in_any_attempt_drops_the_fallback() {
    let list = "/latest/meta-data/iam/security-credentials/";
    let get = "/latest/meta-data/iam/security-credentials/app-role";
    for path in [list, get] {
        let a = agent().await;
        assert_eq!(a.get(list, POD).await.status, StatusCode::OK);
        assert_eq!(a.get(get, POD).await.status, StatusCode::OK);
        a.fake.remove_pod(POD);
        a.fake.script(
            std::iter::once(ClientError::NotFound)
                .chain((0..200).map(|_| ClientError::Unavailable("down".into()))),
        );
        let r = a.get(path, POD).await;
        assert_ne!(r.status, StatusCode::OK, "{path}: {}", r.body);
        assert!(
            !r.body.contains("PODKEY") && r.body != "app-role",
            "{path}: {}",
            r.body
        );
        assert!(a.metrics().contains("kiam_agent_fallback_pods 0"), "{path}");
    }
}

/// Issue 12, defect 5: a pod gets a short reason; server addresses, STS
/// messages (which may carry the server's own role ARN) and other pods'
/// names go to the agent's log only.
#[tokio::test]
async fn bodies_never_carry_server_details() {
    let secrets = [
        "10.20.30.40",
        "arn:aws",
        "AccessDenied",
        "kiam-server-role",
        "team-b",
    ];
    let errors = [
        ClientError::Server(
            "10.20.30.40:443: Internal: error retrieving credentials: AccessDenied: \
             User: arn:aws:sts::123456789012:assumed-role/kiam-server-role/x"
                .into(),
        ),
        ClientError::Server("10.20.30.40:443: pods team-b/web and team-a/api share this IP".into()),
        ClientError::Unavailable("10.20.30.40:443: transport error: connection refused".into()),
    ];
    for e in errors {
        let a = agent().await;
        a.fake.fail_always(Some(e.clone()));
        for path in [
            "/latest/meta-data/iam/security-credentials/",
            "/latest/meta-data/iam/security-credentials/app-role",
            "/latest/meta-data/iam/info",
            "/health?deep=1",
        ] {
            let r = a.get(path, POD).await;
            assert!(r.status.is_server_error(), "{e:?} {path}: {}", r.status);
            for s in secrets {
                assert!(!r.body.contains(s), "{e:?} {path}: body {:?}", r.body);
            }
        }
    }
}

/// Issue 12: `/health` asks the node's metadata service for the instance-id
/// once (it never changes for a node), not on every probe; `?deep=1` still
/// asks a server every time.
#[tokio::test]
async fn health_asks_the_metadata_service_once() {
    let a = agent().await;
    for _ in 0..5 {
        let r = a.get("/health", POD).await;
        assert_eq!(
            (r.status, r.body.as_str()),
            (StatusCode::OK, a._imds.node().instance_id.as_str())
        );
    }
    for _ in 0..3 {
        let r = a.get("/health?deep=1", POD).await;
        assert_eq!(
            (r.status, r.body.as_str()),
            (StatusCode::OK, a._imds.node().instance_id.as_str())
        );
    }
    let asked = a
        ._imds
        .seen()
        .iter()
        .filter(|s| s.path.ends_with("instance-id"))
        .count();
    assert_eq!(asked, 1, "instance-id asked once");
    assert_eq!(a.fake.health_calls.load(Ordering::SeqCst), 3);
}

/// The start-up race: a pod whose IP the server learns a few hundred
/// milliseconds into the request is still served within the SDK's second.
#[tokio::test]
async fn a_pod_known_within_the_second_is_served() {
    let a = agent_with(default_fake(), |c| c.deadline = Duration::from_millis(900)).await;
    let fake = a.fake.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(350)).await;
        fake.set_pod("10.1.0.50", Some("late-role"));
    });
    let started = std::time::Instant::now();
    let r = a
        .get("/latest/meta-data/iam/security-credentials/", "10.1.0.50")
        .await;
    assert_eq!((r.status, r.body.as_str()), (StatusCode::OK, "late-role"));
    assert!(started.elapsed() < Duration::from_secs(1));
    assert!(a.fake.role_calls.load(Ordering::SeqCst) <= 3);
}

/// IMDSv2 across IP reuse: a token only proves its bearer did a PUT from
/// that IP; who the caller is comes from the connection alone. A token the
/// old pod got still authorises only the *current* pod's role at that IP.
#[tokio::test]
async fn a_token_from_an_ips_old_pod_never_brings_back_its_role() {
    let a = agent().await;
    let token = a.token(POD, "300").await.body;
    // The old pod is replaced by one with another role on the same IP.
    a.fake.remove_pod(POD);
    a.fake.set_pod(POD, Some("new-role"));
    let r = a
        .call(
            "GET",
            "/latest/meta-data/iam/security-credentials/",
            POD,
            &[("x-aws-ec2-metadata-token", &token)],
        )
        .await;
    assert_eq!((r.status, r.body.as_str()), (StatusCode::OK, "new-role"));
    let r = a
        .call(
            "GET",
            "/latest/meta-data/iam/security-credentials/app-role",
            POD,
            &[("x-aws-ec2-metadata-token", &token)],
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.body);
}
