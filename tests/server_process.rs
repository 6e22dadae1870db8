//! The real `kiam server` process: kubeconfig pointing at the in-memory API
//! server over HTTP, STS from moto's server, `kiam health` against it, and
//! flags checked before anything starts.

#[path = "support/grpc.rs"]
mod grpc;
#[path = "support/procs.rs"]
mod procs;

use std::process::Command;
use std::time::Duration;

use kiam::proto::kiam_service_client::KiamServiceClient;
use kiam::tls::{ChannelOpts, ClientTls};
use kiam_sandbox::imds::{Behaviour, ImdsEmulator, NodeIdentity};
use procs::{free_port, kiam_bin, start_moto, ChildGuard, ProcCluster};

const BASE: &str = "arn:aws:iam::123456789012:role/";

fn run_health(c: &ProcCluster, port: u16) -> std::process::Output {
    let mut cmd = kiam_bin();
    cmd.args(["health", "--server-address", &format!("localhost:{port}")])
        .args(["--timeout", "2s"]);
    c.tls_args(&mut cmd, "agent");
    cmd.output().unwrap()
}

/// Asks for credentials until the server has synced (or ~10 s pass).
async fn credentials(
    c: &ProcCluster,
    port: u16,
    ip: &str,
    role: &str,
) -> Result<kiam::proto::Credentials, grpc::Failure> {
    let tls = ClientTls::load(c.pki.agent_files(), &mut Default::default()).unwrap();
    let channel = tls
        .channel(&format!("localhost:{port}"), &ChannelOpts::default())
        .unwrap();
    let client = KiamServiceClient::new(channel);
    let mut last = None;
    for _ in 0..100 {
        match grpc::credentials(&client, ip, role).await {
            Ok(creds) => return Ok(creds),
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(last.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_process_serves_moto_credentials() {
    let Some(moto) = start_moto() else {
        return;
    };
    let c = ProcCluster::start().await;
    c.namespace("team-a", ".*");
    c.pod("team-a", "web", "198.18.2.10", "web-role");
    let port = free_port();
    let metrics_port = free_port();
    let _server = c.spawn_server(
        &moto.url,
        &[
            "--role-base-arn",
            BASE,
            "--bind",
            &format!("127.0.0.1:{port}"),
            "--prometheus-listen-addr",
            &format!("127.0.0.1:{metrics_port}"),
        ],
    );

    // `kiam health` exits 0 and prints ok once the caches synced.
    let mut out = run_health(&c, port);
    for _ in 0..100 {
        if out.status.success() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        out = run_health(&c, port);
    }
    assert!(
        out.status.success(),
        "kiam health failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");

    let creds = credentials(&c, port, "198.18.2.10", "web-role")
        .await
        .unwrap();
    // moto issues temporary keys with the ASIA prefix, like real STS.
    assert!(
        creds.access_key_id.starts_with("ASIA"),
        "{}",
        creds.access_key_id
    );
    assert_eq!(creds.code, "Success");
    assert!(!creds.token.is_empty());

    // The metrics endpoint speaks kiam's names.
    let body = reqwest_get(&format!("http://127.0.0.1:{metrics_port}/metrics")).await;
    for name in [
        "kiam_sts_cache_miss_total",
        "kiam_sts_assumerole_timing_seconds",
        "grpc_server_handled_total",
        "grpc_server_tls_certificate_expiry_seconds",
    ] {
        assert!(body.contains(name), "{name} missing from metrics:\n{body}");
    }

    // A health check against a port with nothing behind it fails with a reason.
    let out = run_health(&c, free_port());
    assert!(!out.status.success());
    assert!(!String::from_utf8_lossy(&out.stderr).trim().is_empty());
}

/// A tiny HTTP GET over a raw TCP stream (no extra client dependency).
async fn reqwest_get(url: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_once('/').unwrap();
    let mut s = tokio::net::TcpStream::connect(host).await.unwrap();
    s.write_all(
        format!("GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

fn server_cmd(extra: &[&str], pki: &kiam::certs::Pki) -> Command {
    let mut cmd = kiam_bin();
    kiam_sandbox::procs::tls_args(cmd.arg("server"), &pki.dir, "server").args(extra);
    cmd
}

fn expect_usage(cmd: &mut Command, flag: &str) {
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    assert!(stderr.contains(flag), "{flag} not named in: {stderr}");
}

#[test]
fn bad_flags_exit_64_naming_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let pki = kiam::certs::generate(dir.path(), &[], 1).unwrap();
    let base = [
        "--role-base-arn",
        "arn:aws:iam::123456789012:role/",
        "--check-config",
    ];

    // Sanity: a good configuration passes the check without binding anything.
    let out = server_cmd(&base, &pki).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    expect_usage(
        &mut server_cmd(&["--check-config"], &pki),
        "--role-base-arn",
    );
    expect_usage(
        &mut server_cmd(&[&base[..], &["--session-duration", "10m"]].concat(), &pki),
        "--session-duration",
    );
    expect_usage(
        &mut server_cmd(
            &[
                &base[..],
                &["--session-duration", "30m", "--session-refresh", "30m"],
            ]
            .concat(),
            &pki,
        ),
        "--session-refresh",
    );
    expect_usage(
        &mut server_cmd(&[&base[..], &["--sync", "soon"]].concat(), &pki),
        "--sync",
    );
    let mut missing = kiam_bin();
    missing
        .args(["server", "--cert", "/nonexistent/server.pem"])
        .arg("--key")
        .arg(pki.path("server-key.pem"))
        .arg("--ca")
        .arg(pki.path("ca.pem"))
        .args(base);
    expect_usage(&mut missing, "--cert");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn base_arn_autodetected_from_the_instance_profile() {
    let Some(moto) = start_moto() else {
        return;
    };
    let imds = ImdsEmulator::start(
        NodeIdentity {
            account_id: "999988887777".into(),
            instance_profile_name: "nodes".into(),
            ..NodeIdentity::default()
        },
        Behaviour::default(),
    )
    .await
    .unwrap();
    let c = ProcCluster::start().await;
    // Only the detected account's roles are permitted: success proves the
    // bare role name was resolved against the detected base.
    c.namespace("auto", "arn:aws:iam::999988887777:role/.*");
    c.pod("auto", "p", "198.18.2.20", "auto-role");
    let port = free_port();
    let mut cmd = c.server_cmd(
        &moto.url,
        &[
            "--role-base-arn-autodetect",
            "--bind",
            &format!("127.0.0.1:{port}"),
        ],
    );
    cmd.env_remove("AWS_EC2_METADATA_DISABLED")
        .env("AWS_EC2_METADATA_SERVICE_ENDPOINT", imds.url());
    let _server = ChildGuard::spawn("kiam server", cmd).unwrap();
    let creds = credentials(&c, port, "198.18.2.20", "auto-role")
        .await
        .expect("credentials for the autodetected role ARN");
    assert!(creds.access_key_id.starts_with("ASIA"));
}

fn run_explain(c: &ProcCluster, port: u16, args: &[&str]) -> std::process::Output {
    let mut cmd = kiam_bin();
    cmd.args(["explain", "--server-address", &format!("localhost:{port}")]);
    c.tls_args(&mut cmd, "agent");
    cmd.args(args).output().unwrap()
}

/// `kiam explain` against the real server process: exit 0 for a pod that
/// is served, 1 for one its namespace forbids, JSON that parses, and never
/// the secret key or session token moto issued to the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_against_the_server_process() {
    let Some(moto) = start_moto() else {
        return;
    };
    let c = ProcCluster::start().await;
    c.namespace("team-a", ".*");
    c.namespace("team-b", "^only-this$");
    c.pod("team-a", "web", "198.18.2.20", "web-role");
    c.pod("team-b", "locked", "198.18.2.21", "web-role");
    let port = free_port();
    let _server = c.spawn_server(
        &moto.url,
        &[
            "--role-base-arn",
            BASE,
            "--bind",
            &format!("127.0.0.1:{port}"),
        ],
    );
    let creds = credentials(&c, port, "198.18.2.20", "web-role")
        .await
        .unwrap();

    let out = run_explain(&c, port, &["team-a/web"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("team-a/web: would be served"), "{stdout}");
    assert!(stdout.contains(&creds.access_key_id), "{stdout}");

    let out = run_explain(&c, port, &["--output", "json", "--ip", "198.18.2.20"]);
    assert_eq!(out.status.code(), Some(0));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(json["served"], true);

    let out = run_explain(&c, port, &["team-b/locked"]);
    let locked = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{locked}");
    assert!(
        locked.contains("[FAIL] namespace: namespace team-b does not permit"),
        "{locked}"
    );
    assert!(locked.contains("as applied: ^(?:^only-this$)$"), "{locked}");

    for out in [&stdout, &locked, &String::from_utf8_lossy(&out.stderr)] {
        assert!(!out.contains(&creds.secret_access_key), "{out}");
        assert!(!out.contains(&creds.token), "{out}");
    }
}
