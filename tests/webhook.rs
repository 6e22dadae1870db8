//! The real `kiam webhook` process behind the in-memory API server's
//! admission chain: pods created through the API (kube-rs, as a controller
//! would) are sent to it over HTTPS as AdmissionReviews, with the
//! MutatingWebhookConfiguration from deploy/components/webhook (only its
//! clientConfig pointed at the process), and the stored pod is checked.

#[path = "support/procs.rs"]
mod procs;

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PostParams};
use procs::{free_port, kiam_bin, wait_for_port, ChildGuard, ProcCluster};
use serde_json::{json, Value};

const OPT_IN: &str = "iam.amazonaws.com/token-identity";
const TOKEN_FILE: &str = "/var/run/secrets/kiam/serviceaccount/token";

fn webhook_cmd(c: &ProcCluster, port: u16, metrics: u16) -> std::process::Command {
    let mut cmd = kiam_bin();
    cmd.args(["webhook", "--bind", &format!("127.0.0.1:{port}")])
        .args(["--prometheus-listen-addr", &format!("127.0.0.1:{metrics}")])
        .args(["--token-audience", "kiam-test"]);
    c.tls_args(&mut cmd, "server");
    cmd
}

/// deploy/components/webhook's configuration, calling `url` and trusting `ca_pem`.
fn configuration(url: &str, ca_pem: &[u8]) -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/components/webhook/webhook-configuration.yaml"
    );
    let mut config: Value = serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    for w in config["webhooks"].as_array_mut().unwrap() {
        w["clientConfig"] = json!({
            "url": url,
            "caBundle": base64::engine::general_purpose::STANDARD.encode(ca_pem),
        });
    }
    config
}

fn pod(name: &str, role: Option<&str>, spec: Value) -> Pod {
    let mut p = json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name}, "spec": spec});
    // What the ServiceAccount admission plugin sets before webhooks run.
    p["spec"]["serviceAccountName"] = json!("default");
    if let Some(role) = role {
        p["metadata"]["annotations"] = json!({"iam.amazonaws.com/role": role});
    }
    serde_json::from_value(p).unwrap()
}

fn env_of(c: &Value, name: &str) -> Option<String> {
    c["env"].as_array()?.iter().find(|e| e["name"] == name)?["value"]
        .as_str()
        .map(str::to_string)
}

/// Every container and init container has the token path (the audience
/// these tests' webhook is given).
fn assert_injected(pod: &Value) {
    assert_injected_for(pod, "kiam-test")
}

fn assert_injected_for(pod: &Value, audience: &str) {
    let spec = &pod["spec"];
    let all: Vec<&Value> = ["initContainers", "containers"]
        .iter()
        .flat_map(|f| spec[*f].as_array().into_iter().flatten())
        .collect();
    assert!(!all.is_empty());
    for c in all {
        assert_eq!(
            env_of(c, "AWS_CONTAINER_CREDENTIALS_FULL_URI").as_deref(),
            Some("http://169.254.170.23/v1/credentials"),
            "{c}"
        );
        assert_eq!(
            env_of(c, "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE").as_deref(),
            Some(TOKEN_FILE),
            "{c}"
        );
        let mount = c["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == "kiam-token")
            .expect("the token mount");
        assert_eq!(mount["readOnly"], true);
    }
    let volume = spec["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "kiam-token")
        .expect("the token volume");
    let sat = &volume["projected"]["sources"][0]["serviceAccountToken"];
    assert_eq!(sat["audience"], audience);
    assert_eq!(sat["expirationSeconds"], 3600);
    assert_eq!(sat["path"], "token");
}

fn untouched(pod: &Value) -> bool {
    !pod.to_string().contains("kiam-token") && !pod.to_string().contains("169.254.170.23")
}

/// A raw HTTPS POST to the webhook, trusting `ca_pem`: (status, body).
async fn https_post(port: u16, ca_pem: &[u8], path: &str, body: Vec<u8>) -> (u16, String) {
    https(http::Method::POST, port, ca_pem, path, body).await
}

async fn https(
    method: http::Method,
    port: u16,
    ca_pem: &[u8],
    path: &str,
    body: Vec<u8>,
) -> (u16, String) {
    use http_body_util::{BodyExt, Full};
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_slice_iter(ca_pem) {
        roots.add(c.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect("127.0.0.1".try_into().unwrap(), tcp)
        .await
        .unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "127.0.0.1")
        .header("content-type", "application/json")
        .body(Full::new(bytes::Bytes::from(body)))
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_created_through_the_api_get_the_token_path() {
    kiam::ensure_crypto_provider();
    let c = ProcCluster::start().await;
    let ca = std::fs::read(c.pki.path("ca.pem")).unwrap();
    let (port, metrics) = (free_port(), free_port());
    let webhook = ChildGuard::spawn("kiam webhook", webhook_cmd(&c, port, metrics)).unwrap();
    assert!(
        wait_for_port(port, Duration::from_secs(20)),
        "kiam webhook did not listen"
    );
    c.api
        .register_mutating_webhook_configuration(configuration(
            &format!("https://127.0.0.1:{port}/mutate"),
            &ca,
        ))
        .unwrap();
    c.api
        .create_namespace(json!({"metadata": {"name": "team-a", "labels": {OPT_IN: "enabled"}}}))
        .unwrap();
    c.api
        .create_namespace(json!({"metadata": {"name": "team-b"}}))
        .unwrap();
    let client = kube::Client::try_from(kube::Config::new(c.api.url().parse().unwrap())).unwrap();
    let team_a: Api<Pod> = Api::namespaced(client.clone(), "team-a");
    let team_b: Api<Pod> = Api::namespaced(client.clone(), "team-b");
    let pp = PostParams::default();

    // A role, an init container, and a container with its own endpoint.
    let spec = json!({
        "initContainers": [{"name": "init", "image": "busybox"}],
        "containers": [
            {"name": "app", "image": "app"},
            {"name": "own", "image": "own", "env": [
                {"name": "AWS_CONTAINER_CREDENTIALS_FULL_URI", "value": "http://127.0.0.1:9911/x"}]}
        ]
    });
    team_a
        .create(&pp, &pod("web", Some("reader"), spec.clone()))
        .await
        .unwrap();
    let stored = c.api.pod("team-a", "web").unwrap();
    let own = &stored["spec"]["containers"][1];
    assert_eq!(
        env_of(own, "AWS_CONTAINER_CREDENTIALS_FULL_URI").as_deref(),
        Some("http://127.0.0.1:9911/x"),
        "a container's own variable is kept"
    );
    assert_eq!(env_of(own, "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE"), None);
    let mut check = stored.clone();
    check["spec"]["containers"]
        .as_array_mut()
        .unwrap()
        .remove(1);
    assert_injected(&check);

    // generateName: the review carries no name yet; still patched.
    let mut generated = pod(
        "",
        Some("reader"),
        json!({"containers": [{"name": "a", "image": "a"}]}),
    );
    generated.metadata.name = None;
    generated.metadata.generate_name = Some("worker-".into());
    // No service account: the API server's ServiceAccount admission (before
    // webhooks) makes it `default`.
    generated.spec.as_mut().unwrap().service_account_name = None;
    let created = team_a.create(&pp, &generated).await.unwrap();
    let name = created.metadata.name.unwrap();
    assert!(name.starts_with("worker-"));
    assert_injected(&c.api.pod("team-a", &name).unwrap());

    // No role, or a namespace that did not opt in: nothing added.
    let plain = json!({"containers": [{"name": "a", "image": "a"}]});
    team_a
        .create(&pp, &pod("no-role", None, plain.clone()))
        .await
        .unwrap();
    assert!(untouched(&c.api.pod("team-a", "no-role").unwrap()));
    team_b
        .create(&pp, &pod("web", Some("reader"), plain.clone()))
        .await
        .unwrap();
    assert!(untouched(&c.api.pod("team-b", "web").unwrap()));

    // A dry run shows the patched pod and stores nothing.
    let dry = PostParams {
        dry_run: true,
        ..Default::default()
    };
    let shown = team_a
        .create(&dry, &pod("dry", Some("reader"), plain.clone()))
        .await
        .unwrap();
    assert_injected(&serde_json::to_value(&shown).unwrap());
    assert!(c.api.pod("team-a", "dry").is_none());

    // Bad input to the webhook itself: 400, and it keeps serving.
    let (status, _) = https_post(port, &ca, "/mutate", b"{not json".to_vec()).await;
    assert_eq!(status, 400);
    let (status, body) = https_post(port, &ca, "/healthz", Vec::new()).await;
    assert_eq!((status, body.as_str()), (405, ""), "healthz is GET only");
    // The manifests' probes: GET /healthz over HTTPS.
    let (status, body) = https(http::Method::GET, port, &ca, "/healthz", Vec::new()).await;
    assert_eq!((status, body.as_str()), (200, "ok"));

    let (status, text) = procs::http_get(metrics, "/metrics", Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(status, 200);
    // The configuration's matchConditions keep pods without a role from
    // being sent at all.
    for line in [
        "kiam_webhook_reviews_total{result=\"no_role\"} 0",
        "kiam_webhook_reviews_total{result=\"injected\"} 3",
        "kiam_webhook_reviews_total{result=\"bad_request\"} 1",
    ] {
        assert!(text.contains(line), "{line} not in:\n{text}");
    }

    // failurePolicy: Fail — with the webhook gone, a pod with a role in an
    // opted-in namespace is refused rather than started without its token;
    // namespaces that did not opt in are not affected.
    drop(webhook);
    let err = team_a
        .create(&pp, &pod("while-down", Some("reader"), plain.clone()))
        .await
        .unwrap_err();
    match err {
        kube::Error::Api(s) => {
            assert_eq!(s.code, 500, "{s:?}");
            assert!(s.message.contains("failed calling webhook"), "{s:?}");
        }
        other => panic!("{other:?}"),
    }
    assert!(c.api.pod("team-a", "while-down").is_none());
    team_b
        .create(&pp, &pod("while-down", Some("reader"), plain))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_certificate_not_from_the_ca_bundle_is_refused() {
    kiam::ensure_crypto_provider();
    let c = ProcCluster::start().await;
    let (port, metrics) = (free_port(), free_port());
    let _webhook = ChildGuard::spawn("kiam webhook", webhook_cmd(&c, port, metrics)).unwrap();
    assert!(wait_for_port(port, Duration::from_secs(20)));
    let other = tempfile::tempdir().unwrap();
    let other_pki = kiam::certs::generate(other.path(), &[], 1).unwrap();
    let wrong_ca = std::fs::read(other_pki.path("ca.pem")).unwrap();
    c.api
        .register_mutating_webhook_configuration(configuration(
            &format!("https://127.0.0.1:{port}/mutate"),
            &wrong_ca,
        ))
        .unwrap();
    c.api
        .create_namespace(json!({"metadata": {"name": "team-a", "labels": {OPT_IN: "enabled"}}}))
        .unwrap();
    let client = kube::Client::try_from(kube::Config::new(c.api.url().parse().unwrap())).unwrap();
    let team_a: Api<Pod> = Api::namespaced(client, "team-a");
    let err = team_a
        .create(
            &PostParams::default(),
            &pod(
                "web",
                Some("reader"),
                json!({"containers": [{"name": "a", "image": "a"}]}),
            ),
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("failed calling webhook"), "{err}");
}

#[test]
fn check_config_names_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let pki = kiam::certs::generate(dir.path(), &[], 1).unwrap();
    let run = |extra: &[&str]| {
        let mut cmd = kiam_bin();
        cmd.args(["webhook", "--check-config"]);
        cmd.arg("--cert").arg(pki.path("server.pem"));
        cmd.arg("--key").arg(pki.path("server-key.pem"));
        cmd.arg("--ca").arg(pki.path("ca.pem"));
        cmd.args(extra);
        cmd.output().unwrap()
    };
    let ok = run(&[]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    for (extra, flag) in [
        (&["--token-expiration", "5m"][..], "--token-expiration"),
        (
            &["--token-expiration", "200years"][..],
            "--token-expiration",
        ),
        (&["--token-audience", ""][..], "--token-audience"),
        (&["--key", "/nonexistent/key.pem"][..], "--key"),
    ] {
        let out = run(extra);
        assert_eq!(out.status.code(), Some(64), "{extra:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(flag), "{extra:?}: {err}");
    }
}

/// `cargo run -p kiam-sandbox` starts the webhook and registers it: a pod
/// applied through the API (as `kubectl apply` would) in an opted-in
/// namespace comes back with the token path.
#[test]
fn the_sandbox_runs_the_webhook() {
    use kiam_sandbox::sandbox::{NetworkChoice, Sandbox, SandboxOptions, StsChoice};
    let sandbox = Sandbox::start(SandboxOptions {
        seed_yaml: String::new(),
        seed_name: "tests/webhook.rs".into(),
        kiam: Some(std::path::PathBuf::from(env!("CARGO_BIN_EXE_kiam"))),
        sts: StsChoice::BuiltIn,
        network: NetworkChoice::Loopback,
        kubelet: false,
        ..SandboxOptions::default()
    })
    .unwrap_or_else(|e| panic!("sandbox: {e}"));
    assert!(
        sandbox.children().iter().any(|(n, _)| n == "kiam-webhook"),
        "{:?}",
        sandbox.children()
    );
    sandbox
        .api()
        .create_namespace(json!({"metadata": {"name": "team-a", "labels": {OPT_IN: "enabled"}}}))
        .unwrap();
    let url = sandbox.api().url();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let created = rt.block_on(async {
        kiam::ensure_crypto_provider();
        let client = kube::Client::try_from(kube::Config::new(url.parse().unwrap())).unwrap();
        let api: Api<Pod> = Api::namespaced(client, "team-a");
        let spec = json!({"containers": [{"name": "a", "image": "a"}]});
        api.create(&PostParams::default(), &pod("web", Some("reader"), spec))
            .await
            .unwrap()
    });
    // The sandbox's webhook runs with the default --token-audience.
    assert_injected_for(&serde_json::to_value(&created).unwrap(), "kiam");
}

/// SIGTERM: the webhook keeps answering for a moment (the API server still
/// calls it until its endpoint is removed), then exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_and_exits_0() {
    kiam::ensure_crypto_provider();
    let c = ProcCluster::start().await;
    let ca = std::fs::read(c.pki.path("ca.pem")).unwrap();
    let (port, metrics) = (free_port(), free_port());
    let mut webhook = ChildGuard::spawn("kiam webhook", webhook_cmd(&c, port, metrics)).unwrap();
    assert!(wait_for_port(port, Duration::from_secs(20)));
    let pid = i32::try_from(webhook.pid()).unwrap();
    // SAFETY: signalling our own child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    // Still answering reviews after the signal.
    let review = json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {"uid": "u1", "operation": "DELETE",
                    "resource": {"group": "", "version": "v1", "resource": "pods"}}});
    let (status, body) =
        https_post(port, &ca, "/mutate", serde_json::to_vec(&review).unwrap()).await;
    assert_eq!(status, 200, "{body}");
    let status = tokio::task::spawn_blocking(move || webhook.child.wait().unwrap())
        .await
        .unwrap();
    assert_eq!(status.code(), Some(0), "{status:?}");
}

/// The first certificate the webhook presents on a new connection, trusting
/// any of `cas`.
async fn served_cert(port: u16, cas: &[Vec<u8>]) -> Option<Vec<u8>> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for ca in cas {
        for c in rustls_pki_types::CertificateDer::pem_slice_iter(ca) {
            roots.add(c.unwrap()).unwrap();
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect("127.0.0.1".try_into().unwrap(), tcp)
        .await
        .ok()?;
    Some(tls.get_ref().1.peer_certificates()?[0].to_vec())
}

/// cert-manager renews the Secret in place: new connections get the new
/// certificate without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewed_certificates_are_served_without_a_restart() {
    kiam::ensure_crypto_provider();
    let first = tempfile::tempdir().unwrap();
    let second = tempfile::tempdir().unwrap();
    let live = tempfile::tempdir().unwrap();
    let old = kiam::certs::generate(first.path(), &[], 1).unwrap();
    let new = kiam::certs::generate(second.path(), &[], 1).unwrap();
    for f in ["server.pem", "server-key.pem", "ca.pem"] {
        std::fs::copy(old.path(f), live.path().join(f)).unwrap();
    }
    let port = free_port();
    let mut cmd = kiam_bin();
    cmd.args(["webhook", "--bind", &format!("127.0.0.1:{port}")]);
    kiam_sandbox::procs::tls_args(&mut cmd, live.path(), "server");
    let _webhook = ChildGuard::spawn("kiam webhook", cmd).unwrap();
    assert!(wait_for_port(port, Duration::from_secs(20)));
    let cas = [
        std::fs::read(old.path("ca.pem")).unwrap(),
        std::fs::read(new.path("ca.pem")).unwrap(),
    ];
    let der = |pki: &kiam::certs::Pki| {
        use rustls_pki_types::pem::PemObject;
        rustls_pki_types::CertificateDer::from_pem_file(pki.path("server.pem"))
            .unwrap()
            .to_vec()
    };
    assert_eq!(served_cert(port, &cas).await, Some(der(&old)));
    // Written aside and renamed, as the kubelet swaps a Secret volume.
    for f in ["server.pem", "server-key.pem", "ca.pem"] {
        let tmp = live.path().join(format!(".{f}.tmp"));
        std::fs::copy(new.path(f), &tmp).unwrap();
        std::fs::rename(&tmp, live.path().join(f)).unwrap();
    }
    let want = Some(der(&new));
    let mut served = None;
    for _ in 0..200 {
        served = served_cert(port, &cas).await;
        if served == want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(served == want, "the renewed certificate was never served");
}

/// An HTTPS admission webhook answering every review with `answer(review)`,
/// for the API server's own rules (denials, bad answers).
async fn scripted_webhook(
    pki: &kiam::certs::Pki,
    answer: fn(&Value) -> Value,
) -> (u16, tokio::task::JoinHandle<()>) {
    use axum::routing::post;
    let tls = kiam::tls::HttpsTls::load(
        pki.server_files(),
        &mut prometheus_client::registry::Registry::default(),
    )
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let app = axum::Router::new().route(
        "/mutate",
        post(move |body: axum::body::Bytes| async move {
            let review: Value = serde_json::from_slice(&body).unwrap();
            axum::Json(answer(&review))
        }),
    );
    let task = tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.config());
            let app = app.clone();
            tokio::spawn(async move {
                let Ok(conn) = acceptor.accept(tcp).await else {
                    return;
                };
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(
                    hyper_util::rt::TokioIo::new(conn),
                    hyper_util::service::TowerToHyperService::new(app),
                )
                .await;
            });
        }
    });
    (port, task)
}

fn review_answer(review: &Value, response: Value) -> Value {
    let mut response = response;
    if response.get("uid").is_none() {
        response["uid"] = review["request"]["uid"].clone();
    }
    json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response})
}

/// The in-memory API server applies the real dispatcher's rules to what a
/// webhook answers: a denial carries its message, an answer for another uid
/// is a failed call, and failurePolicy Ignore lets a pod through a webhook
/// that cannot be reached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_server_judges_webhook_answers_as_kubernetes_does() {
    kiam::ensure_crypto_provider();
    let c = ProcCluster::start().await;
    let ca = std::fs::read(c.pki.path("ca.pem")).unwrap();
    c.api
        .create_namespace(json!({"metadata": {"name": "team-a", "labels": {OPT_IN: "enabled"}}}))
        .unwrap();
    let client = kube::Client::try_from(kube::Config::new(c.api.url().parse().unwrap())).unwrap();
    let team_a: Api<Pod> = Api::namespaced(client, "team-a");
    let spec = json!({"containers": [{"name": "a", "image": "a"}]});
    let register = |port: u16, policy: &str| {
        let mut config = configuration(&format!("https://127.0.0.1:{port}/mutate"), &ca);
        config["webhooks"][0]["failurePolicy"] = json!(policy);
        c.api
            .register_mutating_webhook_configuration(config)
            .unwrap();
    };
    let refused = |e: kube::Error| match e {
        kube::Error::Api(s) => (s.code, s.message),
        other => panic!("{other:?}"),
    };

    let (port, deny) = scripted_webhook(&c.pki, |r| {
        review_answer(
            r,
            json!({"allowed": false, "status": {"code": 403, "message": "no roles today"}}),
        )
    })
    .await;
    register(port, "Fail");
    let (code, message) = refused(
        team_a
            .create(
                &PostParams::default(),
                &pod("denied", Some("r"), spec.clone()),
            )
            .await
            .unwrap_err(),
    );
    assert_eq!(code, 403);
    assert_eq!(
        message,
        "admission webhook \"token-identity.kiam.amazonaws.com\" denied the request: no roles today"
    );
    deny.abort();

    let (port, wrong_uid) = scripted_webhook(&c.pki, |r| {
        review_answer(r, json!({"uid": "someone-else", "allowed": true}))
    })
    .await;
    register(port, "Fail");
    let (code, message) = refused(
        team_a
            .create(
                &PostParams::default(),
                &pod("wrong-uid", Some("r"), spec.clone()),
            )
            .await
            .unwrap_err(),
    );
    assert_eq!(code, 500);
    assert!(message.contains("expected response.uid="), "{message}");
    wrong_uid.abort();

    // Ignore: nothing listens there, and the pod is created unchanged.
    register(free_port(), "Ignore");
    team_a
        .create(&PostParams::default(), &pod("ignored", Some("r"), spec))
        .await
        .unwrap();
    assert!(untouched(&c.api.pod("team-a", "ignored").unwrap()));
}
