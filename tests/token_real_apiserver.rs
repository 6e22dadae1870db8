//! The token path against a real kube-apiserver (and etcd), built by
//! scripts/peers.sh: its TokenRequest issues the pod-bound token (RS256,
//! the real claims) and its TokenReview is what kiam's server asks. The
//! server runs in process with a fake STS; the API server is real.
//! SKIPPED without KIAM_ETCD_BIN and KIAM_KUBE_APISERVER_BIN.

#[path = "support/fake_sts.rs"]
mod fake_sts;
#[path = "support/kubeapi.rs"]
mod kubeapi;

use std::sync::Arc;
use std::time::Duration;

use kiam::proto::kiam_service_client::KiamServiceClient;
use kiam::proto::GetTokenCredentialsRequest;
use kiam::server::events::EventRecorder;
use kiam::server::{Deps, ServerMetrics};
use kiam::tls::{ChannelOpts, ClientTls, ServerTls};
use kiam_sandbox::apiserver::{tampered_token, unsigned_token};
use prometheus_client::registry::Registry;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use tonic::Code;

const BASE: &str = "arn:aws:iam::123456789012:role/";

fn server_config() -> kiam::server::config::ServerConfig {
    use clap::Parser;
    let argv = [
        "kiam",
        "server",
        "--cert",
        "x",
        "--key",
        "x",
        "--ca",
        "x",
        "--role-base-arn",
        BASE,
    ];
    let kiam::cli::Command::Server(args) = kiam::cli::Cli::try_parse_from(argv).unwrap().command
    else {
        unreachable!()
    };
    kiam::server::config::ServerConfig::from_args(&args).unwrap()
}

/// A token from the real TokenRequest API, bound to the pod.
fn request_token(api: &kubeapi::KubeApi, ns: &str, pod: &str, uid: &str, aud: &str) -> String {
    let body = api.must(
        "POST",
        &format!("/api/v1/namespaces/{ns}/serviceaccounts/default/token"),
        "application/json",
        &json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
            "spec": {"audiences": [aud], "expirationSeconds": 3600,
                "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": pod, "uid": uid}}}),
    );
    let v: Value = serde_json::from_str(&body).unwrap();
    v["status"]["token"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_token_request_and_token_review() {
    let Some((etcd, apiserver)) = kubeapi::binaries() else {
        return;
    };
    let api = kubeapi::KubeApi::start(&etcd, &apiserver);
    api.namespace("team-a", "arn:aws:iam::123456789012:role/team-a-.*");
    // No controller manager: make the service account ourselves.
    api.must(
        "POST",
        "/api/v1/namespaces/team-a/serviceaccounts",
        "application/json",
        &json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "default"}}),
    );
    let created = api.must(
        "POST",
        "/api/v1/namespaces/team-a/pods",
        "application/json",
        &json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web", "namespace": "team-a",
                "annotations": {"iam.amazonaws.com/role": "team-a-web"}},
            "spec": {"nodeName": "node-1", "serviceAccountName": "default",
                "containers": [{"name": "app", "image": "busybox"}]}}),
    );
    let uid = serde_json::from_str::<Value>(&created).unwrap()["metadata"]["uid"]
        .as_str()
        .unwrap()
        .to_string();
    api.must(
        "PATCH",
        "/api/v1/namespaces/team-a/pods/web/status",
        "application/merge-patch+json",
        &json!({"status": {"phase": "Running", "podIP": "198.18.3.10",
            "podIPs": [{"ip": "198.18.3.10"}]}}),
    );

    let pki = kiam::certs::generate(&api.dir.path().join("kiam-certs"), &[], 1).unwrap();
    let kube = kiam::server::kube_client(Some(&api.kubeconfig))
        .await
        .unwrap();
    let mut registry = Registry::default();
    let sts = Arc::new(fake_sts::FakeSts::new());
    let deps = Deps {
        config: server_config(),
        events: EventRecorder::new(kube.clone()),
        kube,
        sts: sts.clone(),
        tls: ServerTls::load(pki.server_files(), &mut registry).unwrap(),
        metrics: ServerMetrics::register(&mut registry),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let shutdown = CancellationToken::new();
    tokio::spawn(kiam::server::run(listener, deps, shutdown.clone()));
    let _stop = shutdown.clone().drop_guard();
    let tls = ClientTls::load(pki.agent_files(), &mut Registry::default()).unwrap();
    let client = KiamServiceClient::new(
        tls.channel(&format!("localhost:{port}"), &ChannelOpts::default())
            .unwrap(),
    );
    let ask = |token: String| {
        let mut client = client.clone();
        async move {
            client
                .get_token_credentials(GetTokenCredentialsRequest {
                    token,
                    ip: "198.18.3.99".into(),
                })
                .await
                .map(|r| r.into_inner())
        }
    };

    let good = request_token(&api, "team-a", "web", &uid, "kiam");
    let mut answer = ask(good.clone()).await;
    for _ in 0..300 {
        if !matches!(&answer, Err(e) if e.code() == Code::Unavailable) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        answer = ask(good.clone()).await;
    }
    let answer = answer.expect("the real API server's token is accepted");
    assert_eq!(answer.role_arn, format!("{BASE}team-a-web"));
    assert_eq!(
        (answer.namespace.as_str(), answer.name.as_str()),
        ("team-a", "web")
    );
    assert!(!answer.credentials.unwrap().access_key_id.is_empty());

    // Another audience (the real API server signs it just the same).
    let other = request_token(&api, "team-a", "web", &uid, "sts.amazonaws.com");
    assert_eq!(ask(other).await.unwrap_err().code(), Code::Unauthenticated);
    // Forgeries of the real token: the real TokenReview refuses them.
    let tampered = tampered_token(&good, |c| c["kubernetes.io"]["pod"]["name"] = "db".into());
    assert_eq!(
        ask(tampered).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    assert_eq!(
        ask(unsigned_token(&good)).await.unwrap_err().code(),
        Code::Unauthenticated
    );

    // Deleted: the token dies with its pod.
    let (code, text) = api
        .curl(
            "DELETE",
            "/api/v1/namespaces/team-a/pods/web?gracePeriodSeconds=0",
            None,
            None,
        )
        .unwrap();
    assert!((200..300).contains(&code), "{code} {text}");
    let mut refused = None;
    for _ in 0..300 {
        match ask(good.clone()).await {
            Ok(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
    }
    assert_eq!(refused.expect("never refused").code(), Code::NotFound);
}
