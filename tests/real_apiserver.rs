//! The real `kiam server` process against a real kube-apiserver (and etcd),
//! built from their Go modules by scripts/peers.sh: the namespace and the pod
//! are made through the Kubernetes API, the pod's IP set through the status
//! subresource, and the server must sync, report healthy and answer
//! GetPodRole for that IP. With deploy/base's RBAC applied, the server runs
//! on its service account's token (TokenRequest), so a permission the
//! manifests lack fails a test: it syncs, answers GetPodCredentials (STS from
//! moto) and records a KiamRoleForbidden Event; and the same server on a
//! ClusterRole without `namespaces` is refused and never healthy. And Pods
//! as network namespaces on a node, made through the API with their real
//! addresses: boto3 inside one gets its role through `kiam agent
//! --iptables`. SKIPPED without KIAM_ETCD_BIN and KIAM_KUBE_APISERVER_BIN
//! (and the last without root).

#[path = "support/grpc.rs"]
mod grpc;
#[path = "support/kubeapi.rs"]
mod kubeapi;
#[path = "support/procs.rs"]
mod procs;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use kiam::proto::kiam_service_client::KiamServiceClient;
use kiam::tls::{ChannelOpts, ClientTls};
use procs::{free_port, kiam_bin, ChildGuard};

const BASE: &str = "arn:aws:iam::123456789012:role/";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kiam_server_against_real_apiserver() {
    let Some((etcd, apiserver)) = kubeapi::binaries() else {
        return;
    };
    let api = kubeapi::KubeApi::start(&etcd, &apiserver);
    api.namespace("team-a", ".*");
    api.pod("team-a", "web", "198.18.2.10", "web-role");

    let pki = kiam::certs::generate(&api.dir.path().join("kiam-certs"), &[], 1).unwrap();
    let port = free_port();
    let mut cmd = kiam_bin();
    kiam_sandbox::procs::server_args(&mut cmd, &api.kubeconfig, &pki.dir)
        .args(["--role-base-arn", BASE])
        .args(["--bind", &format!("127.0.0.1:{port}")])
        .args([
            "--prometheus-listen-addr",
            &format!("127.0.0.1:{}", free_port()),
        ]);
    // No STS is asked here: GetPodRole only needs the API server.
    cmd.env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_REGION", "us-east-1")
        .env("AWS_EC2_METADATA_DISABLED", "true");
    let _server = ChildGuard::spawn("kiam server", cmd).unwrap();

    // `kiam health` exits 0 once the caches synced from the real API server.
    let health = || {
        let mut cmd = kiam_bin();
        cmd.args(["health", "--server-address", &format!("localhost:{port}")])
            .args(["--timeout", "2s"]);
        kiam_sandbox::procs::tls_args(&mut cmd, &pki.dir, "agent");
        cmd.output().unwrap()
    };
    let mut out = health();
    for _ in 0..300 {
        if out.status.success() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        out = health();
    }
    assert!(
        out.status.success(),
        "kiam health against the server on the real API server: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let tls = ClientTls::load(pki.agent_files(), &mut Default::default()).unwrap();
    let channel = tls
        .channel(&format!("localhost:{port}"), &ChannelOpts::default())
        .unwrap();
    let client = KiamServiceClient::new(channel);
    let mut role = grpc::role(&client, "198.18.2.10").await;
    for _ in 0..100 {
        if matches!(&role, Ok(r) if r == "web-role") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        role = grpc::role(&client, "198.18.2.10").await;
    }
    assert_eq!(role, Ok("web-role".to_string()));
}

/// deploy/base's RBAC objects, in the namespace its kustomization sets.
fn manifest_rbac() -> Vec<serde_json::Value> {
    use serde::Deserialize;
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/base/server-rbac.yaml");
    let text = std::fs::read_to_string(path).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde_json::Value::deserialize(d).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

const KIAM_NAMESPACE: &str = "kube-system";

/// `kiam server` authenticated by `kubeconfig`, its stderr in `log`.
fn spawn_server(
    kubeconfig: &Path,
    pki: &kiam::certs::Pki,
    port: u16,
    sts_url: &str,
    log: &Path,
    metrics_port: u16,
) -> ChildGuard {
    let mut cmd = kiam_bin();
    kiam_sandbox::procs::server_args(&mut cmd, kubeconfig, &pki.dir)
        .args(["--role-base-arn", BASE])
        .args(["--bind", &format!("127.0.0.1:{port}")])
        .args([
            "--prometheus-listen-addr",
            &format!("127.0.0.1:{metrics_port}"),
        ]);
    procs::moto_env(&mut cmd, sts_url);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(std::fs::File::create(log).unwrap()));
    ChildGuard {
        child: cmd.spawn().expect("start kiam server"),
        name: "kiam server".into(),
    }
}

fn health(pki: &kiam::certs::Pki, port: u16) -> std::process::Output {
    let mut cmd: Command = kiam_bin();
    cmd.args(["health", "--server-address", &format!("localhost:{port}")])
        .args(["--timeout", "2s"]);
    kiam_sandbox::procs::tls_args(&mut cmd, &pki.dir, "agent");
    cmd.output().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kiam_server_on_the_manifests_rbac_and_a_service_account_token() {
    let Some((etcd, apiserver)) = kubeapi::binaries() else {
        return;
    };
    let Some(moto) = procs::start_moto() else {
        return;
    };
    let api = kubeapi::KubeApi::start(&etcd, &apiserver);
    let dir = api.dir.path().to_path_buf();
    let pki = kiam::certs::generate(&dir.join("kiam-certs"), &[], 1).unwrap();

    // deploy/base's ServiceAccount, ClusterRole and ClusterRoleBinding.
    let rbac = manifest_rbac();
    let kinds: Vec<&str> = rbac.iter().filter_map(|d| d["kind"].as_str()).collect();
    for k in ["ServiceAccount", "ClusterRole", "ClusterRoleBinding"] {
        assert!(
            kinds.contains(&k),
            "deploy/base/server-rbac.yaml has no {k}"
        );
    }
    for doc in &rbac {
        let (code, text) = api.create(doc, KIAM_NAMESPACE);
        assert!(
            (200..300).contains(&code),
            "create {}: {code} {text}",
            doc["kind"]
        );
    }

    // The same objects, but a ClusterRole without `namespaces`: the
    // server must not become healthy on it (proves the test would catch a
    // missing permission).
    let bound = rbac
        .iter()
        .find(|d| d["kind"] == "ClusterRoleBinding")
        .map(|d| d["subjects"][0]["name"].clone())
        .unwrap();
    // Only the bound service account (deploy/base also has the agent's).
    let mut incomplete: Vec<serde_json::Value> = rbac
        .iter()
        .filter(|d| d["kind"] != "ServiceAccount" || d["metadata"]["name"] == bound)
        .cloned()
        .collect();
    for doc in incomplete.iter_mut() {
        match doc["kind"].as_str() {
            Some("ServiceAccount") => doc["metadata"]["name"] = "kiam-incomplete".into(),
            Some("ClusterRole") => {
                doc["metadata"]["name"] = "kiam-incomplete".into();
                for rule in doc["rules"].as_array_mut().unwrap() {
                    if let Some(res) = rule["resources"].as_array_mut() {
                        res.retain(|r| r != "namespaces");
                    }
                }
            }
            Some("ClusterRoleBinding") => {
                doc["metadata"]["name"] = "kiam-incomplete".into();
                doc["roleRef"]["name"] = "kiam-incomplete".into();
                doc["subjects"][0]["name"] = "kiam-incomplete".into();
            }
            _ => {}
        }
        let (code, text) = api.create(doc, KIAM_NAMESPACE);
        assert!(
            (200..300).contains(&code),
            "create {}: {code} {text}",
            doc["kind"]
        );
    }

    api.namespace("team-a", "^arn:aws:iam::123456789012:role/web-role$");
    api.pod("team-a", "web", "198.18.2.10", "web-role");
    api.pod("team-a", "sneaky", "198.18.2.11", "admin");

    // Without `namespaces`: the API server refuses the server's list, and
    // it says so; it never reports healthy.
    let sa_name = |doc: &serde_json::Value| doc["metadata"]["name"].as_str().unwrap().to_string();
    let incomplete_sa = sa_name(
        incomplete
            .iter()
            .find(|d| d["kind"] == "ServiceAccount")
            .unwrap(),
    );
    let kc_bad = dir.join("kubeconfig-incomplete");
    api.kubeconfig_with_token(
        &kc_bad,
        &api.service_account_token(KIAM_NAMESPACE, &incomplete_sa),
    );
    let bad_port = free_port();
    let bad_log = dir.join("kiam-incomplete.log");
    let bad = spawn_server(&kc_bad, &pki, bad_port, &moto.url, &bad_log, free_port());
    let refused = kiam_sandbox::procs::wait_until(
        Duration::from_secs(60),
        Duration::from_millis(200),
        || {
            let log = std::fs::read_to_string(&bad_log).unwrap_or_default();
            log.contains("namespaces") && (log.contains("403") || log.contains("orbidden"))
        },
    );
    assert!(
        refused,
        "the server on a ClusterRole without namespaces did not report the refusal:\n{}",
        kiam_sandbox::procs::log_tail(&bad_log, 30)
    );
    let out = health(&pki, bad_port);
    assert!(
        !out.status.success(),
        "healthy without permission to list namespaces: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    drop(bad);

    // With the manifests' RBAC and the service account's token.
    let sa = bound.as_str().unwrap().to_string();
    let kc = dir.join("kubeconfig-kiam-server");
    api.kubeconfig_with_token(&kc, &api.service_account_token(KIAM_NAMESPACE, &sa));
    let port = free_port();
    let log = dir.join("kiam-server.log");
    let metrics_port = free_port();
    let _server = spawn_server(&kc, &pki, port, &moto.url, &log, metrics_port);
    let mut out = health(&pki, port);
    for _ in 0..300 {
        if out.status.success() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        out = health(&pki, port);
    }
    assert!(
        out.status.success(),
        "kiam health on the manifests' RBAC: {}{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        kiam_sandbox::procs::log_tail(&log, 30)
    );

    let tls = ClientTls::load(pki.agent_files(), &mut Default::default()).unwrap();
    let channel = tls
        .channel(&format!("localhost:{port}"), &ChannelOpts::default())
        .unwrap();
    let client = KiamServiceClient::new(channel);

    // A pod made through the API (spec.nodeName, status via the status
    // subresource) gets its own role's credentials, from STS (moto).
    let mut creds = grpc::credentials(&client, "198.18.2.10", "web-role").await;
    for _ in 0..100 {
        if creds.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        creds = grpc::credentials(&client, "198.18.2.10", "web-role").await;
    }
    let creds = creds.unwrap_or_else(|e| {
        panic!(
            "GetPodCredentials for web-role: {e:?}\n{}",
            kiam_sandbox::procs::log_tail(&log, 30)
        )
    });
    assert!(!creds.access_key_id.is_empty());
    assert!(!creds.token.is_empty());

    // The server proves its Pod watch current with `limit=1` LISTs read
    // against the real API server's resourceVersions: once a pod change is
    // the newest write, requests are confirmed without a GET per pod.
    api.pod("team-a", "newest", "198.18.2.12", "web-role");
    let wanted = [
        r#"kiam_k8s_pod_watch_checks_total{result="current"}"#,
        r#"kiam_k8s_pod_confirmations_total{result="current"}"#,
    ];
    let value = |text: &str, series: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or(0.0)
    };
    let mut metrics = String::new();
    for _ in 0..100 {
        grpc::credentials(&client, "198.18.2.10", "web-role")
            .await
            .unwrap();
        metrics = procs::http_get(metrics_port, "/metrics", Duration::from_secs(2))
            .await
            .map(|(_, body)| body)
            .unwrap_or_default();
        if wanted.iter().all(|w| value(&metrics, w) >= 1.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for w in wanted {
        assert!(value(&metrics, w) >= 1.0, "{w} not counted:\n{metrics}");
    }
    assert_eq!(
        value(
            &metrics,
            r#"kiam_k8s_pod_watch_checks_total{result="failed"}"#
        ),
        0.0,
        "{metrics}"
    );

    // And through a real agent, as a pod's SDK asks (by `?ip=` here: the
    // pod's address exists only in the API server).
    let agent_port = free_port();
    let mut cmd = kiam_bin();
    kiam_sandbox::procs::agent_args(
        &mut cmd,
        agent_port,
        &format!("localhost:{port}"),
        &format!("http://127.0.0.1:{}", free_port()),
        &pki.dir,
    )
    .args(["--host", "127.0.0.1", "--allow-ip-query"]);
    let _agent = ChildGuard::spawn("kiam agent", cmd).unwrap();
    let path = "/latest/meta-data/iam/security-credentials/web-role?ip=198.18.2.10";
    let mut got = procs::http_get(agent_port, path, Duration::from_secs(2)).await;
    for _ in 0..100 {
        if matches!(&got, Ok((200, _))) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        got = procs::http_get(agent_port, path, Duration::from_secs(2)).await;
    }
    let (code, body) = got.unwrap();
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(
        v["AccessKeyId"].as_str().unwrap().starts_with("ASIA"),
        "{body}"
    );

    // A role the namespace does not permit is refused, and the server
    // records why on the pod (events create/patch in the ClusterRole).
    let refused = grpc::credentials(&client, "198.18.2.11", "admin").await;
    assert_eq!(
        refused.as_ref().map_err(|(code, _)| *code).err(),
        Some(tonic::Code::PermissionDenied),
        "{refused:?}"
    );
    let recorded = kiam_sandbox::procs::wait_until(
        Duration::from_secs(30),
        Duration::from_millis(200),
        || {
            let events = api.get_json("/api/v1/namespaces/team-a/events");
            events["items"].as_array().unwrap().iter().any(|e| {
                e["reason"] == "KiamRoleForbidden" && e["involvedObject"]["name"] == "sneaky"
            })
        },
    );
    assert!(
        recorded,
        "no KiamRoleForbidden Event on team-a/sneaky:\n{}",
        kiam_sandbox::procs::log_tail(&log, 30)
    );
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        !log_text.contains("forbidden: User"),
        "the API server refused the server something on the manifests' RBAC:\n{}",
        kiam_sandbox::procs::log_tail(&log, 30)
    );
}

#[path = "support/netns.rs"]
mod netns;

/// The whole metadata path on the real API server: Pods are network
/// namespaces on a node, made through the Kubernetes API with their real
/// addresses; `kiam agent --iptables` DNATs their 169.254.169.254 traffic
/// to itself; the server runs on deploy/base's RBAC with its service
/// account's token. boto3 inside a Pod gets that Pod's role (the same key
/// the server hands out for it), and a Pod whose role its namespace does not
/// permit gets no credentials. SKIPPED without root, the peers or moto.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pods_boto3_gets_its_role_through_iptables_on_the_real_apiserver() {
    let Some((etcd, apiserver)) = kubeapi::binaries() else {
        return;
    };
    let Some(node) = netns::Node::new("real_apiserver boto3", 2) else {
        return;
    };
    let Some(moto) = procs::start_moto() else {
        return;
    };
    let api = kubeapi::KubeApi::start(&etcd, &apiserver);
    let dir = api.dir.path().to_path_buf();
    let pki = kiam::certs::generate(&dir.join("kiam-certs"), &[], 1).unwrap();
    let rbac = manifest_rbac();
    for doc in &rbac {
        let (code, text) = api.create(doc, KIAM_NAMESPACE);
        assert!(
            (200..300).contains(&code),
            "create {}: {code} {text}",
            doc["kind"]
        );
    }
    let sa = rbac
        .iter()
        .find(|d| d["kind"] == "ClusterRoleBinding")
        .and_then(|d| d["subjects"][0]["name"].as_str())
        .unwrap()
        .to_string();
    let kc = dir.join("kubeconfig-kiam-server");
    api.kubeconfig_with_token(&kc, &api.service_account_token(KIAM_NAMESPACE, &sa));

    let (web, other) = (node.pod(0), node.pod(1));
    api.namespace("team-a", "^arn:aws:iam::123456789012:role/web-role$");
    api.pod("team-a", "web", &web.ip.to_string(), "web-role");
    api.pod("team-a", "other", &other.ip.to_string(), "admin");

    let port = free_port();
    let log = dir.join("kiam-server.log");
    let _server = spawn_server(&kc, &pki, port, &moto.url, &log, free_port());
    let agent_port = free_port();
    let mut cmd = kiam_bin();
    kiam_sandbox::procs::agent_args(
        &mut cmd,
        agent_port,
        &format!("localhost:{port}"),
        &format!("http://127.0.0.1:{}", free_port()),
        &pki.dir,
    )
    .args(["--iptables"])
    .args(["--host", &node.host_ip().to_string()])
    .args(["--host-interface", &node.interface_wildcard()]);
    let _agent = ChildGuard::spawn("kiam agent", cmd).unwrap();

    // The Pod's role, asked as any SDK asks: through the DNAT.
    let listing = format!(
        "{}/latest/meta-data/iam/security-credentials/",
        netns::METADATA_URL
    );
    let mut role = web.http_get(&listing).await;
    for _ in 0..300 {
        if role.as_deref() == Ok("web-role") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        role = web.http_get(&listing).await;
    }
    assert_eq!(
        role.as_deref(),
        Ok("web-role"),
        "{}",
        kiam_sandbox::procs::log_tail(&log, 30)
    );

    // boto3's default chain inside the Pod: the key the server issues for it.
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    let python = if venv.is_file() {
        venv.to_string_lossy().into_owned()
    } else {
        "python3".to_string()
    };
    let script = "import boto3; c = boto3.Session(region_name='us-east-1').get_credentials(); \
                  print(c.get_frozen_credentials().access_key if c else 'NONE')";
    let out = web
        .exec_async(&[
            "env",
            "-i",
            "PATH=/usr/bin:/bin",
            "HOME=/nonexistent",
            "AWS_CONFIG_FILE=/dev/null",
            "AWS_SHARED_CREDENTIALS_FILE=/dev/null",
            &python,
            "-c",
            script,
        ])
        .await;
    let got = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        out.status.success() && got.starts_with("ASIA"),
        "boto3 in the Pod: {got} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tls = ClientTls::load(pki.agent_files(), &mut Default::default()).unwrap();
    let channel = tls
        .channel(&format!("localhost:{port}"), &ChannelOpts::default())
        .unwrap();
    let client = KiamServiceClient::new(channel);
    let issued = grpc::credentials(&client, &web.ip.to_string(), "web-role")
        .await
        .unwrap();
    assert_eq!(
        got, issued.access_key_id,
        "boto3 got another key than the Pod's"
    );

    // The other Pod's role is not permitted in its namespace: no credentials.
    let admin = format!("{listing}admin");
    let refused = other.http_get(&admin).await;
    assert!(
        !refused
            .as_deref()
            .unwrap_or_default()
            .contains("AccessKeyId"),
        "a forbidden role was served: {refused:?}"
    );
}
