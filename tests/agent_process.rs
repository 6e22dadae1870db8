//! Real processes: one `kiam agent` in front of two `kiam server`s (moto for
//! STS, the in-memory API server for Kubernetes). A server killed with
//! SIGKILL mid-traffic costs no request; with every server down the agent
//! serves the last good credentials inside its stale window, and refuses
//! after it.

#[path = "support/procs.rs"]
mod procs;

use std::time::{Duration, Instant};

use procs::{free_port, kiam_bin, start_moto, wait_for_port, ChildGuard, ProcCluster};

/// SDKs give up after about a second.
async fn get(port: u16, path: &str) -> Result<(u16, String), String> {
    procs::http_get(port, path, Duration::from_secs(1)).await
}

const CREDS: &str = "/latest/meta-data/iam/security-credentials/web-role?ip=198.18.3.10";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_survives_server_loss_and_serves_stale_inside_the_window() {
    let Some(moto) = start_moto() else {
        return;
    };
    let c = ProcCluster::start().await;
    c.namespace("team-a", ".*");
    c.pod("team-a", "web", "198.18.3.10", "web-role");
    let server = |port: u16| {
        c.spawn_server(
            &moto.url,
            &[
                "--role-base-arn",
                "arn:aws:iam::123456789012:role/",
                "--bind",
                &format!("127.0.0.1:{port}"),
            ],
        )
    };

    let (p1, p2) = (free_port(), free_port());
    let mut s1 = server(p1);
    let mut s2 = server(p2);
    assert!(
        wait_for_port(p1, Duration::from_secs(20)) && wait_for_port(p2, Duration::from_secs(20))
    );

    let agent_port = free_port();
    let cmd = c.agent_cmd(
        agent_port,
        &format!("localhost:{p1},localhost:{p2}"),
        // No upstream metadata service in this test.
        &format!("http://127.0.0.1:{}", free_port()),
        &["--allow-ip-query", "--stale-credentials-window", "4s"],
    );
    let _agent = ChildGuard::spawn("kiam agent", cmd).unwrap();
    assert!(wait_for_port(agent_port, Duration::from_secs(20)));

    // Warm up: both servers synced, credentials cached.
    let deadline = Instant::now() + Duration::from_secs(20);
    let first_key = loop {
        if let Ok((200, body)) = get(agent_port, CREDS).await {
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            break v["AccessKeyId"].as_str().unwrap().to_string();
        }
        assert!(Instant::now() < deadline, "agent never served credentials");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(first_key.starts_with("ASIA"), "{first_key}");
    // Make sure the second server answers too before killing the first.
    for _ in 0..20 {
        let (code, _) = get(agent_port, CREDS).await.unwrap();
        assert_eq!(code, 200);
    }

    // Steady load, SIGKILL one server in the middle: zero failed requests.
    let load = tokio::spawn(async move {
        let mut failures = Vec::new();
        let mut sent = 0;
        let until = Instant::now() + Duration::from_secs(3);
        while Instant::now() < until {
            let mut batch = Vec::new();
            for _ in 0..8 {
                batch.push(tokio::spawn(get(agent_port, CREDS)));
            }
            for r in batch {
                sent += 1;
                match r.await.unwrap() {
                    Ok((200, _)) => {}
                    other => failures.push(format!("{other:?}")),
                }
            }
        }
        (sent, failures)
    });
    tokio::time::sleep(Duration::from_millis(800)).await;
    s1.child.kill().unwrap();
    let _ = s1.child.wait();
    let (sent, failures) = load.await.unwrap();
    assert!(sent > 50, "load too small to mean anything: {sent}");
    assert!(
        failures.is_empty(),
        "{} of {sent} failed: {failures:?}",
        failures.len()
    );

    // Every server down: the last good credentials (each server has its
    // own STS session, so take them from the survivor), inside the window only.
    let (code, body) = get(agent_port, CREDS).await.unwrap();
    assert_eq!(code, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let last_key = v["AccessKeyId"].as_str().unwrap().to_string();
    s2.child.kill().unwrap();
    let _ = s2.child.wait();
    let killed = Instant::now();
    let (code, body) = get(agent_port, CREDS).await.expect("an answer within 1s");
    assert_eq!(code, 200, "stale credentials inside the window: {body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["AccessKeyId"], last_key.as_str());

    // After the window (4s from the last successful fetch) the agent refuses.
    tokio::time::sleep(Duration::from_secs(5).saturating_sub(killed.elapsed())).await;
    let answer = get(agent_port, CREDS).await;
    match answer {
        Ok((code, body)) => {
            assert!(
                code >= 500,
                "expected an error after the stale window, got {code}: {body}"
            );
            assert!(!body.contains(&last_key));
        }
        Err(e) => panic!("the agent must answer, with an error: {e}"),
    }
}

/// kiam's manifests give the agent its address only through HOST_IP.
#[test]
fn host_comes_from_host_ip_or_kiam_host() {
    let dir = tempfile::tempdir().unwrap();
    let pki = kiam::certs::generate(dir.path(), &[], 1).unwrap();
    let check = |env: &[(&str, &str)]| {
        let mut cmd = kiam_bin();
        cmd.args(["agent", "--check-config"]);
        kiam_sandbox::procs::tls_args(&mut cmd, &pki.dir, "agent")
            .env_remove("HOST_IP")
            .env_remove("KIAM_HOST");
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    };
    assert!(check(&[("HOST_IP", "198.18.4.1")]).status.success());
    assert!(check(&[("KIAM_HOST", "198.18.4.1")]).status.success());
    let missing = check(&[]);
    assert_eq!(missing.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("--host"));
    // KIAM_HOST wins over HOST_IP; a bad value names the flag.
    let bad = check(&[("KIAM_HOST", "not-an-ip"), ("HOST_IP", "198.18.4.1")]);
    assert_eq!(bad.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--host"));
}

/// HOST_IP belongs to the agent: `kiam certs` must not add it to the
/// server certificate.
#[test]
fn certs_ignore_host_ip() {
    let dir = tempfile::tempdir().unwrap();
    let out = kiam_bin()
        .args(["certs", "--out-dir"])
        .arg(dir.path())
        .env("HOST_IP", "198.18.4.99")
        .env_remove("KIAM_HOST")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::process::Command::new("openssl")
        .args(["x509", "-noout", "-text", "-in"])
        .arg(dir.path().join("server.pem"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("127.0.0.1"), "{text}");
    assert!(!text.contains("198.18.4.99"), "{text}");
}
