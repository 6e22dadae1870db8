//! The token path (GetTokenCredentials) against the in-memory API server,
//! whose TokenReview and signed service-account tokens are real enough to
//! refuse forgeries: who gets which role, what is refused, and what it
//! costs the API server. Then the same through a real `kiam agent`'s
//! `/v1/credentials` endpoint, as the SDKs' container provider asks it.

#[path = "support/cluster.rs"]
mod cluster;

use std::time::Duration;

use cluster::{pod_json, Cluster, BASE_ARN};
use kiam::proto::{GetPodCredentialsRequest, GetTokenCredentialsRequest, TokenCredentials};
use kiam::server::model::{Identity, SessionTags};
use kiam_sandbox::apiserver::{
    foreign_signed_token, tampered_token, token_claims, unsigned_token, FakeApiServer,
};
use serde_json::json;
use tonic::Code;

const HOUR: Duration = Duration::from_secs(3600);

/// The uid the API server gave the pod.
fn uid(api: &FakeApiServer, ns: &str, name: &str) -> String {
    api.pod(ns, name).unwrap()["metadata"]["uid"]
        .as_str()
        .unwrap()
        .to_string()
}

/// A kubelet's projected token for the pod (audience `kiam`).
fn token_for(api: &FakeApiServer, ns: &str, name: &str, _ip: &str) -> String {
    let uid = uid(api, ns, name);
    api.issue_token(ns, "default", &["kiam"], Some((name, &uid)), HOUR)
        .unwrap()
}

async fn ask(c: &Cluster, token: &str, from: &str) -> Result<TokenCredentials, tonic::Status> {
    c.client()
        .get_token_credentials(GetTokenCredentialsRequest {
            token: token.to_string(),
            ip: from.to_string(),
        })
        .await
        .map(|r| r.into_inner())
}

fn reviews(api: &FakeApiServer) -> usize {
    api.count_requests(|r| r.path.ends_with("/tokenreviews"))
}

async fn team_a() -> Cluster {
    let c = Cluster::start(&[]).await;
    c.namespace("team-a", Some("arn:aws:iam::123456789012:role/team-a-.*"));
    c.pod("team-a", "web", "198.18.0.10", Some("team-a-web"));
    c.pod("team-a", "db", "198.18.0.11", Some("team-a-db"));
    c.ready().await;
    c
}

#[tokio::test]
async fn a_token_gets_its_pods_role_and_steady_state_costs_no_api_call() {
    let c = team_a().await;
    let token = token_for(&c.api, "team-a", "web", "198.18.0.10");
    let answer = ask(&c, &token, "198.18.0.10").await.unwrap();
    assert_eq!(answer.role_arn, format!("{BASE_ARN}team-a-web"));
    assert_eq!(
        (answer.namespace.as_str(), answer.name.as_str()),
        ("team-a", "web")
    );
    let creds = answer.credentials.unwrap();
    assert_eq!(creds.code, "Success");
    assert!(!creds.access_key_id.is_empty() && !creds.token.is_empty());

    // The same credentials as the metadata path (one identity, one STS call).
    let by_ip = c
        .client()
        .get_pod_credentials(GetPodCredentialsRequest {
            ip: "198.18.0.10".into(),
            role: "team-a-web".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(by_ip.access_key_id, creds.access_key_id);

    // Steady state: no TokenReview, no GET, nothing at all per request.
    c.api.clear_requests();
    for _ in 0..20 {
        let again = ask(&c, &token, "198.18.0.10").await.unwrap();
        assert_eq!(
            again.credentials.unwrap().access_key_id,
            creds.access_key_id
        );
    }
    let calls: Vec<String> = c
        .api
        .requests()
        .iter()
        .filter(|r| r.verb != "watch")
        .map(|r| format!("{} {}", r.verb, r.path))
        .collect();
    assert!(calls.is_empty(), "API calls in steady state: {calls:?}");

    // A rotated token: many requests at once share one TokenReview.
    let rotated = token_for(&c.api, "team-a", "web", "198.18.0.10");
    assert_ne!(rotated, token);
    let asks = (0..16).map(|_| ask(&c, &rotated, "198.18.0.10"));
    for answer in futures::future::join_all(asks).await {
        assert_eq!(answer.unwrap().name, "web");
    }
    assert_eq!(reviews(&c.api), 1);
}

#[tokio::test]
async fn the_token_not_the_address_says_who_the_pod_is() {
    let c = team_a().await;
    let web = token_for(&c.api, "team-a", "web", "198.18.0.10");
    // Presented from db's address (a stolen token): still web, never db.
    let answer = ask(&c, &web, "198.18.0.11").await.unwrap();
    assert_eq!(answer.role_arn, format!("{BASE_ARN}team-a-web"));
    assert_eq!(answer.name, "web");
    // From an address with no pod at all: the same.
    let answer = ask(&c, &web, "198.18.9.9").await.unwrap();
    assert_eq!(answer.name, "web");

    // Once web is deleted its token is refused, from any address, and the
    // refusal is remembered: no API call per retry.
    c.api.delete_pod("team-a", "web").unwrap();
    let mut refused = None;
    for _ in 0..500 {
        match ask(&c, &web, "198.18.0.11").await {
            Ok(a) => assert_eq!(a.name, "web"),
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let e = refused.expect("the deleted pod's token was never refused");
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert_eq!(e.message(), kiam::wire::NO_POD_FOUND);
    c.api.clear_requests();
    for _ in 0..5 {
        assert_eq!(
            ask(&c, &web, "198.18.0.10").await.unwrap_err().code(),
            Code::NotFound
        );
    }
    assert_eq!(c.api.count_requests(|r| r.verb != "watch"), 0);

    // A new pod on the reused IP (and even with the same name) is not the
    // old token's pod; its own token gets its own role.
    c.api
        .apply_pod(pod_json(
            "team-a",
            "web",
            "198.18.0.10",
            Some("team-a-other"),
            "Running",
        ))
        .unwrap();
    c.api
        .apply_pod(pod_json(
            "team-a",
            "web2",
            "198.18.0.10",
            Some("team-a-web2"),
            "Running",
        ))
        .unwrap();
    assert_eq!(
        ask(&c, &web, "198.18.0.10").await.unwrap_err().code(),
        Code::NotFound
    );
    let web2 = token_for(&c.api, "team-a", "web2", "198.18.0.10");
    let answer = ask(&c, &web2, "198.18.0.10").await.unwrap();
    assert_eq!(answer.role_arn, format!("{BASE_ARN}team-a-web2"));
}

#[tokio::test]
async fn a_host_network_pod_gets_its_own_role_by_token() {
    let c = Cluster::start(&[]).await;
    c.namespace("infra", Some(".*"));
    let mut pod = pod_json(
        "infra",
        "node-agent",
        "198.18.0.2",
        Some("infra-agent"),
        "Running",
    );
    pod["spec"]["hostNetwork"] = json!(true);
    c.api.apply_pod(pod).unwrap();
    c.ready().await;
    // By address: never (it shares the node's IP).
    let by_ip = c
        .client()
        .get_pod_credentials(GetPodCredentialsRequest {
            ip: "198.18.0.2".into(),
            role: "infra-agent".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(by_ip.code(), Code::NotFound);
    // By token: its own role.
    let token = token_for(&c.api, "infra", "node-agent", "198.18.0.2");
    let answer = ask(&c, &token, "198.18.0.2").await.unwrap();
    assert_eq!(answer.role_arn, format!("{BASE_ARN}infra-agent"));
}

#[tokio::test]
async fn bad_tokens_are_refused_and_leak_nothing() {
    let c = team_a().await;
    let good = token_for(&c.api, "team-a", "web", "198.18.0.10");
    let claims = token_claims(&good).unwrap();
    let now = jiff::Timestamp::now().as_second();
    let with = |change: &dyn Fn(&mut serde_json::Value)| {
        let mut c = claims.clone();
        change(&mut c);
        c
    };
    let other_audience = c
        .api
        .issue_token(
            "team-a",
            "default",
            &["sts.amazonaws.com"],
            Some(("web", &uid(&c.api, "team-a", "web"))),
            HOUR,
        )
        .unwrap();
    let api_audience = c
        .api
        .issue_token(
            "team-a",
            "default",
            &[],
            Some(("web", &uid(&c.api, "team-a", "web"))),
            HOUR,
        )
        .unwrap();
    let unbound = c
        .api
        .issue_token("team-a", "default", &["kiam"], None, HOUR)
        .unwrap();
    let expired = c.api.sign_token(&with(&|c| {
        c["exp"] = json!(now - 5);
        c["iat"] = json!(now - 3600);
        c["nbf"] = json!(now - 3600);
    }));
    let not_yet = c.api.sign_token(&with(&|c| c["nbf"] = json!(now + 600)));
    let db_uid = uid(&c.api, "team-a", "db");
    // Re-pointed at db by a forger: the signature no longer matches.
    let tampered = tampered_token(&good, |c| {
        c["kubernetes.io"]["pod"] = json!({"name": "db", "uid": db_uid});
    });
    let unsigned = unsigned_token(&good);
    let foreign = foreign_signed_token(&claims);
    let other_issuer = c
        .api
        .sign_token(&with(&|c| c["iss"] = json!("https://evil.example")));
    let cases = [
        ("other audience", other_audience),
        ("the API server's audience", api_audience),
        ("not bound to a pod", unbound),
        ("expired", expired),
        ("not yet valid", not_yet),
        ("tampered", tampered),
        ("unsigned", unsigned),
        ("signed by another key", foreign),
        ("another issuer", other_issuer),
        ("garbage", "not-a-jwt".to_string()),
        ("empty", String::new()),
    ];
    let sts_before = c.sts.total_calls();
    for (what, token) in &cases {
        let e = ask(&c, token, "198.18.0.10").await.unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{what}: {e:?}");
        assert!(
            e.message().starts_with(kiam::wire::TOKEN_REFUSED),
            "{what}: {e:?}"
        );
        for secret in ["db", "team-a-db", "arn:"] {
            assert!(!e.message().contains(secret), "{what}: {e:?}");
        }
    }
    assert_eq!(
        c.sts.total_calls(),
        sts_before,
        "a refused token made an STS call"
    );
    // Refusals decided by TokenReview are remembered: asking again with
    // the same forgeries costs the API server nothing.
    c.api.clear_requests();
    for (what, token) in &cases {
        let e = ask(&c, token, "198.18.0.10").await.unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{what}: {e:?}");
    }
    assert_eq!(reviews(&c.api), 0);
    // And the good token still works.
    assert_eq!(ask(&c, &good, "198.18.0.10").await.unwrap().name, "web");
}

#[tokio::test]
async fn policy_applies_as_on_the_metadata_path() {
    let c = Cluster::start(&["--session-tags"]).await;
    c.namespace("team-a", Some("arn:aws:iam::123456789012:role/team-a-.*"));
    c.pod("team-a", "no-role", "198.18.0.20", None);
    c.pod("team-a", "wrong", "198.18.0.21", Some("team-b-web"));
    c.pod("team-a", "web", "198.18.0.22", Some("team-a-web"));
    c.ready().await;
    let e = ask(
        &c,
        &token_for(&c.api, "team-a", "no-role", "198.18.0.20"),
        "x",
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let e = ask(
        &c,
        &token_for(&c.api, "team-a", "wrong", "198.18.0.21"),
        "x",
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert_eq!(e.message(), kiam::wire::FORBIDDEN_BY_POLICY);
    let token = token_for(&c.api, "team-a", "web", "198.18.0.22");
    ask(&c, &token, "x").await.unwrap();
    // Session tags describe the token's pod.
    let tagged = Identity {
        role_arn: format!("{BASE_ARN}team-a-web").into(),
        session_name: "kiam-kiam".into(),
        external_id: None,
        tags: Some(std::sync::Arc::new(SessionTags {
            namespace: "team-a".into(),
            pod: "web".into(),
            service_account: "default".into(),
        })),
    };
    assert_eq!(c.sts.calls(&tagged), 1);
    // A finished pod's token is refused.
    c.api.set_pod_phase("team-a", "web", "Succeeded").unwrap();
    let mut refused = false;
    for _ in 0..500 {
        if let Err(e) = ask(&c, &token, "x").await {
            assert_eq!(e.code(), Code::NotFound);
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(refused, "the finished pod's token was never refused");
}
