//! The node's role never reaches a pod: hundreds of path spellings sent
//! over real TCP to the agent, in front of a deliberately leaky metadata
//! emulator, with the default allow-list and with `.*`. Also the proxy's
//! own rules: default deny, no forwarded identity headers, upstream IMDSv2.

#[path = "support/fake_kiam.rs"]
mod fake_kiam;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::connect_info::ConnectInfo;
use fake_kiam::{creds, FakeKiam};
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use kiam::agent::metadata::{router, Config, RouterContext};
use kiam::agent::metrics::Metrics;
use kiam::agent::proxy::Upstream;
use kiam_sandbox::imds::{looks_like_iam, Behaviour, ImdsEmulator, NodeIdentity};
use prometheus_client::registry::Registry;
use regex::Regex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

const POD_ROLE: &str = "pod-role";

fn state(imds: &ImdsEmulator, allow: &str, registry: &mut Registry) -> Arc<RouterContext> {
    let fake = FakeKiam::new().pod("127.0.0.1", Some(POD_ROLE)).grant(
        "127.0.0.1",
        POD_ROLE,
        creds("PODKEY"),
    );
    let mut cfg = Config::new(Regex::new(allow).unwrap());
    cfg.deadline = Duration::from_millis(200);
    RouterContext::new(
        cfg,
        Arc::new(fake),
        Arc::new(Upstream::new(&imds.url(), Duration::from_secs(2)).unwrap()),
        Metrics::new(registry),
    )
}

/// One way of respelling a path.
type Transform = Box<dyn Fn(&str) -> String>;

/// Path spellings aimed at the node's IAM data.
fn variants() -> Vec<String> {
    // The node every emulator here runs as.
    let node = NodeIdentity::default();
    let versions = ["latest", "2016-09-02", "1.0", "garbage"];
    let bodies = [
        "meta-data/iam/security-credentials/".to_string(),
        "meta-data/iam/security-credentials".to_string(),
        format!("meta-data/iam/security-credentials/{}", node.role_name),
        format!(
            "meta-data/iam/security-credentials-extended/{}",
            node.role_name
        ),
        "meta-data/iam/security-credentials-extended/".to_string(),
        "meta-data/iam/info".to_string(),
        "meta-data/iam/".to_string(),
        "meta-data/iam".to_string(),
        "meta-data/identity-credentials/ec2/security-credentials/ec2-instance".to_string(),
    ];
    let transforms: Vec<Transform> = vec![
        Box::new(|p| p.to_string()),
        Box::new(|p| format!("/{}", p[1..].replace('/', "%2F"))),
        Box::new(|p| format!("/{}", p[1..].replace('/', "%2f"))),
        Box::new(|p| p.replace("meta-data/iam", "META-DATA/IAM")),
        Box::new(|p| p.replace("meta-data/iam", "Meta-Data/Iam")),
        Box::new(|p| p.replace("/iam", "/%69%61%6d")),
        Box::new(|p| p.replace("/iam", "/%2569am")),
        Box::new(|p| p.replace("/iam", "%252Fiam")),
        Box::new(|p| p.replace('/', "//")),
        Box::new(|p| p.replace("/iam", "/./iam")),
        Box::new(|p| p.replace("/iam", "/%2e/iam")),
        Box::new(|p| p.replace("/iam", "/x/../iam")),
        Box::new(|p| p.replace("/iam", "/x/%2e%2e/iam")),
        Box::new(|p| p.replace("/iam", "/x/%2E%2E%2Fiam")),
        Box::new(|p| p.replace("/iam", "/x/..%2fiam")),
        Box::new(|p| p.replace("/iam", "/iam;x=1")),
        Box::new(|p| p.replace("/meta-data", "/./meta-data")),
        Box::new(|p| format!("{p}?")),
        Box::new(|p| format!("{p}#")),
        Box::new(|p| format!("{p}%00")),
        Box::new(|p| format!("{p};")),
        Box::new(|p| format!("{p}%20")),
        Box::new(|p| format!("{p}/.")),
        Box::new(|p| format!("{p}?ip=10.0.0.1")),
        Box::new(|p| format!("http://169.254.169.254{p}")),
        Box::new(|p| p.replace("/iam", "\\iam")),
        Box::new(|p| p.replace("/iam", "%5Ciam")),
    ];
    let mut out = Vec::new();
    for v in versions {
        for b in &bodies {
            let base = format!("/{v}/{b}");
            for t in &transforms {
                out.push(t(&base));
            }
        }
    }
    // Ways up from elsewhere.
    out.push("/latest/user-data/../meta-data/iam/security-credentials/".into());
    out.push("/latest/meta-data/../../latest/meta-data/iam/info".into());
    out.push("/meta-data/iam/security-credentials/".into());
    out.push("/latest/latest/meta-data/iam/info".into());
    out.push("/iam/security-credentials/".into());
    out
}

async fn raw(addr: SocketAddr, method: &str, target: &str) -> Vec<u8> {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "{method} {target} HTTP/1.1\r\nHost: 169.254.169.254\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    out
}

async fn leak_check(allow: &str) {
    let imds = ImdsEmulator::start(NodeIdentity::default(), Behaviour::leaky())
        .await
        .unwrap();
    let mut registry = Registry::default();
    let state = state(&imds, allow, &mut registry);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let server = tokio::spawn(kiam::agent::run(listener, state, stop.clone()));

    let mut requests: Vec<(&str, String)> = variants().into_iter().map(|v| ("GET", v)).collect();
    for m in ["HEAD", "POST", "PUT", "DELETE"] {
        for v in [
            "/latest/meta-data/iam/security-credentials/",
            "/latest/meta-data/iam/info",
        ] {
            requests.push((m, v.to_string()));
            requests.push((m, v.replace('/', "%2F").replacen("%2F", "/", 1)));
        }
    }
    let mut user_data = vec![
        "/latest/user-data".to_string(),
        "/latest/user-data/".to_string(),
        "/latest/%75ser-data".to_string(),
        "/2016-09-02/user-data".to_string(),
    ];
    if allow == "^$" {
        requests.extend(user_data.drain(..).map(|p| ("GET", p)));
    }
    assert!(requests.len() > 300, "only {} variants", requests.len());

    let mut seen_ok = 0;
    for chunk in requests.chunks(16) {
        let replies = futures::future::join_all(chunk.iter().map(|(m, p)| raw(addr, m, p))).await;
        for ((m, p), reply) in chunk.iter().zip(replies) {
            let text = String::from_utf8_lossy(&reply).to_lowercase();
            assert!(
                !text.is_empty() || p.contains('#') || p.contains('\\'),
                "{m} {p}: no answer"
            );
            for marker in imds.node().markers() {
                assert!(
                    !text.contains(&marker.to_lowercase()),
                    "{m} {p} leaked {marker}:\n{text}"
                );
            }
            if allow == "^$" {
                assert!(
                    !text.contains(&imds.node().user_data.to_lowercase()),
                    "{m} {p} got user-data"
                );
            }
            if text.starts_with("http/1.1 200") {
                seen_ok += 1;
            }
        }
    }
    // Canonical spellings do reach the pod's own answers.
    assert!(seen_ok > 0);

    // Nothing IAM-like ever reached the upstream, in any spelling.
    for s in imds.seen() {
        assert!(
            !looks_like_iam(&s.path),
            "forwarded upstream: {} {}",
            s.method,
            s.path
        );
    }
    if allow == "^$" {
        assert!(
            imds.seen().is_empty(),
            "default allow-list proxied {:?}",
            imds.seen()
        );
    }
    stop.cancel();
    server.await.unwrap().unwrap();
}

#[tokio::test]
async fn node_role_never_leaks_with_default_allow_list() {
    leak_check("^$").await;
}

#[tokio::test]
async fn node_role_never_leaks_even_when_everything_is_allowed() {
    leak_check(".*").await;
}

async fn get(
    state: &Arc<RouterContext>,
    path: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, String) {
    let mut req = Request::get(path);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let mut req = req.body(Body::empty()).unwrap();
    req.extensions_mut()
        .insert(ConnectInfo("127.0.0.1:5555".parse::<SocketAddr>().unwrap()));
    let resp = router(state.clone()).oneshot(req).await.unwrap();
    let status = resp.status();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn user_data_is_blocked_by_default() {
    let imds = ImdsEmulator::start(NodeIdentity::default(), Behaviour::leaky())
        .await
        .unwrap();
    let mut registry = Registry::default();
    let state = state(&imds, "^$", &mut registry);
    let (status, body) = get(&state, "/latest/user-data", &[]).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(!body.contains(&imds.node().user_data));
    let m = kiam::telemetry::encode(&registry);
    assert!(
        m.contains("kiam_metadata_proxy_requests_blocked_total 1"),
        "{m}"
    );
    assert!(
        m.contains(r#"kiam_metadata_responses_total{handler="proxy",code="404"} 1"#),
        "{m}"
    );
    assert!(imds.seen().is_empty());
}

#[tokio::test]
async fn allowed_paths_are_proxied_without_identity_headers() {
    let imds = ImdsEmulator::start(NodeIdentity::default(), Behaviour::leaky())
        .await
        .unwrap();
    let mut registry = Registry::default();
    let state = state(
        &imds,
        "^/latest/(meta-data/placement/.*|user-data)$",
        &mut registry,
    );

    // The pod's own IMDSv2 token must not travel upstream either.
    let mut req = Request::put("/latest/api/token")
        .header("x-aws-ec2-metadata-token-ttl-seconds", "60")
        .body(Body::empty())
        .unwrap();
    req.extensions_mut()
        .insert(ConnectInfo("127.0.0.1:5555".parse::<SocketAddr>().unwrap()));
    let resp = router(state.clone()).oneshot(req).await.unwrap();
    let pod_token = String::from_utf8(
        resp.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap();

    let (status, body) = get(
        &state,
        "/latest/meta-data/placement/region",
        &[
            ("x-forwarded-for", "10.9.9.9"),
            ("forwarded", "for=10.9.9.9"),
            ("x-real-ip", "10.9.9.9"),
            ("x-aws-ec2-metadata-token", &pod_token),
            ("user-agent", "aws-sdk-test"),
        ],
    )
    .await;
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::OK, imds.node().region.as_str())
    );
    let (status, body) = get(&state, "/latest/user-data", &[]).await;
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::OK, imds.node().user_data.as_str())
    );
    // Not allowed: blocked even though the upstream has it.
    let (status, _) = get(&state, "/latest/meta-data/instance-id", &[]).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    let seen = imds.seen();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(seen[0].path, "/latest/meta-data/placement/region");
    for s in &seen {
        for h in [
            "x-forwarded-for",
            "forwarded",
            "x-real-ip",
            "x-aws-ec2-metadata-token",
        ] {
            assert!(
                !s.headers.contains_key(h),
                "{h} reached the upstream: {:?}",
                s.headers
            );
        }
    }
    assert_eq!(seen[0].headers["user-agent"], "aws-sdk-test");
    let m = kiam::telemetry::encode(&registry);
    assert!(
        m.contains(r#"kiam_metadata_success_total{handler="proxy"} 2"#),
        "{m}"
    );
}

#[tokio::test]
async fn upstream_requiring_imdsv2_still_works() {
    let behaviour = Behaviour::leaky().requiring_tokens();
    let imds = ImdsEmulator::start(NodeIdentity::default(), behaviour)
        .await
        .unwrap();
    let mut registry = Registry::default();
    let state = state(&imds, "^/latest/meta-data/placement/", &mut registry);
    let (status, body) = get(&state, "/latest/meta-data/placement/region", &[]).await;
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::OK, imds.node().region.as_str())
    );
    let (status, _) = get(&state, "/latest/meta-data/placement/region", &[]).await;
    assert_eq!(status, StatusCode::OK);
    // One token, reused; it is the agent's own, never a pod's.
    assert_eq!(imds.issued_tokens().len(), 1);
    let (status, body) = get(&state, "/health", &[]).await;
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::OK, imds.node().instance_id.as_str())
    );
    let tokens = imds.issued_tokens();
    assert_eq!(tokens.len(), 1);
    let gets: Vec<_> = imds
        .seen()
        .into_iter()
        .filter(|s| s.method == http::Method::GET)
        .collect();
    assert!(gets
        .iter()
        .filter(|s| s.headers.contains_key("x-aws-ec2-metadata-token"))
        .all(|s| s.headers["x-aws-ec2-metadata-token"] == tokens[0].as_str()));
}
