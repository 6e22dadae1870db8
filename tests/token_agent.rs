//! `/v1/credentials` on a real `kiam agent` process: the statuses and JSON
//! documents the SDKs' container provider sees, against our server (the
//! in-process one, over mutual TLS) and against a Go kiam server, which
//! does not know GetTokenCredentials and must give pods a clear error.

#[path = "support/cluster.rs"]
mod cluster;
#[path = "support/gokiam.rs"]
mod gokiam;
#[path = "support/procs.rs"]
mod procs;

use std::time::Duration;

use cluster::Cluster;
use kiam_sandbox::apiserver::{tampered_token, unsigned_token};
use procs::{free_port, kiam_bin, wait_for_port, ChildGuard, ProcCluster};
use serde_json::Value;

/// One GET of `/v1/credentials` with `authorization` (if any), as the SDKs
/// send it: (status, JSON body).
async fn get(port: u16, authorization: Option<&str>) -> (u16, Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let auth = authorization
        .map(|a| format!("Authorization: {a}\r\n"))
        .unwrap_or_default();
    s.write_all(
        format!(
            "GET /v1/credentials HTTP/1.1\r\nHost: 169.254.170.23\r\n{auth}Connection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut out))
        .await
        .expect("the agent answers")
        .unwrap();
    let status = out.split(' ').nth(1).unwrap().parse().unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/json"),
        "{head}"
    );
    (status, serde_json::from_str(body).unwrap())
}

fn agent(port: u16, server: &str, certs: &std::path::Path) -> ChildGuard {
    let mut cmd = kiam_bin();
    kiam_sandbox::procs::agent_args(&mut cmd, port, server, "http://127.0.0.1:9", certs)
        .args(["--host", "127.0.0.1"]);
    let child = ChildGuard::spawn("kiam agent", cmd).unwrap();
    assert!(
        wait_for_port(port, Duration::from_secs(30)),
        "agent never listened"
    );
    child
}

fn refusal(status: u16, doc: &Value) -> (u16, String, String) {
    (
        status,
        doc["Code"].as_str().unwrap_or("").to_string(),
        doc["Message"].as_str().unwrap_or("").to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_endpoint_answers_as_the_container_provider_expects() {
    let c = Cluster::start(&[]).await;
    c.namespace("team-a", Some("arn:aws:iam::123456789012:role/team-a-.*"));
    c.namespace("locked", None);
    c.pod("team-a", "web", "198.18.0.10", Some("team-a-web"));
    c.pod("locked", "web", "198.18.0.11", Some("team-a-web"));
    c.ready().await;
    let port = free_port();
    let _agent = agent(port, &format!("localhost:{}", c.addr.port()), &c.pki.dir);
    let token = |ns: &str, aud: &str| {
        let uid = c.api.pod(ns, "web").unwrap()["metadata"]["uid"]
            .as_str()
            .unwrap()
            .to_string();
        c.api
            .issue_token(
                ns,
                "default",
                &[aud],
                Some(("web", &uid)),
                Duration::from_secs(3600),
            )
            .unwrap()
    };
    let good = token("team-a", "kiam");

    let (status, doc) = get(port, Some(&good)).await;
    assert_eq!(status, 200, "{doc}");
    for field in ["AccessKeyId", "SecretAccessKey", "Token", "Expiration"] {
        assert!(
            doc[field].as_str().is_some_and(|v| !v.is_empty()),
            "{field}: {doc}"
        );
    }
    assert_eq!(doc["AccountId"], "123456789012");
    let exp: jiff::Timestamp = doc["Expiration"].as_str().unwrap().parse().unwrap();
    assert!(exp > jiff::Timestamp::now());
    // `Bearer` is tolerated, as some clients add it.
    assert_eq!(get(port, Some(&format!("Bearer {good}"))).await.0, 200);

    // Refusals: JSON {Code, Message}, 401 for the token, 403 for policy,
    // and never a credential.
    let cases = [
        ("no token", None, 401),
        ("garbage", Some("not-a-token".to_string()), 401),
        (
            "other audience",
            Some(token("team-a", "sts.amazonaws.com")),
            401,
        ),
        ("unsigned", Some(unsigned_token(&good)), 401),
        (
            "tampered",
            Some(tampered_token(&good, |c| {
                c["kubernetes.io"]["namespace"] = "locked".into()
            })),
            401,
        ),
        (
            "namespace forbids the role",
            Some(token("locked", "kiam")),
            403,
        ),
    ];
    for (what, auth, want) in cases {
        let (status, doc) = get(port, auth.as_deref()).await;
        let (status, code, message) = refusal(status, &doc);
        assert_eq!(status, want, "{what}: {doc}");
        assert!(!code.is_empty() && !message.is_empty(), "{what}: {doc}");
        assert!(doc.get("AccessKeyId").is_none(), "{what}: {doc}");
        assert!(!message.contains("127.0.0.1"), "{what}: {doc}");
    }
    // The pod's token stops working when the pod is deleted.
    c.api.delete_pod("team-a", "web").unwrap();
    let mut last = (0, Value::Null);
    for _ in 0..200 {
        last = get(port, Some(&good)).await;
        if last.0 != 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(last.0, 401, "{}", last.1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_go_kiam_server_gives_pods_a_clear_error() {
    let Some(bin) = gokiam::go_kiam_bin() else {
        return;
    };
    let cluster = ProcCluster::start().await;
    // Never asked: nothing here has a role.
    let sts = gokiam::StsProxy::start("http://127.0.0.1:9").await;
    let go_port = free_port();
    let cmd = gokiam::go_server_cmd(
        &bin,
        &cluster.kubeconfig,
        &cluster.pki.dir,
        go_port,
        &sts,
        &[
            "--role-base-arn",
            "arn:aws:iam::123456789012:role/",
            "--assume-role-arn",
            "kiam-server",
        ],
    );
    let _go = ChildGuard::spawn("Go kiam server", cmd).unwrap();
    assert!(wait_for_port(go_port, Duration::from_secs(30)));
    let port = free_port();
    let _agent = agent(port, &format!("localhost:{go_port}"), &cluster.pki.dir);
    let mut last = (0, Value::Null);
    // Until the Go server has synced it answers UNAVAILABLE (502 here).
    for _ in 0..100 {
        last = get(port, Some("a.b.c")).await;
        if last.0 == 501 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, code, message) = refusal(last.0, &last.1);
    assert_eq!(
        (status, code.as_str()),
        (501, "NotImplemented"),
        "{}",
        last.1
    );
    assert!(message.contains("GetTokenCredentials"), "{message}");
}
