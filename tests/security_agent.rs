//! Security of the agent over real TCP, in front of a real kiam server:
//! identity comes only from the connection's source address (headers and
//! `?ip=` never change which pod is served; IMDSv2 tokens are bound to the
//! IP they were minted for), and one misbehaving pod — huge headers or
//! bodies, slow clients, too many connections — never stops the agent
//! serving the others.

#[path = "support/cluster.rs"]
mod cluster;
#[path = "support/fault_stack.rs"]
mod fault_stack;

use std::time::{Duration, Instant};

use cluster::Cluster;
use fault_stack::{connect_from, http, ms, report, Agent};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const NS: &str = "team-a";
const POD_A: &str = "127.0.8.1";
const POD_B: &str = "127.0.8.2";
const LISTING: &str = "/latest/meta-data/iam/security-credentials/";

async fn two_pods(tweak: impl FnOnce(&mut kiam::agent::metadata::Config)) -> (Cluster, Agent) {
    let c = Cluster::start(&[]).await;
    c.namespace(NS, Some(".*"));
    c.pod(NS, "a", POD_A, Some("role-a"));
    c.pod(NS, "b", POD_B, Some("role-b"));
    c.ready().await;
    let agent = Agent::start(&c, &[c.addr], tweak).await;
    (c, agent)
}

/// Pod B, served while pod A misbehaves: every SDK fetch must succeed.
async fn b_is_served(agent: &Agent, n: usize) -> usize {
    let mut ok = 0;
    for _ in 0..n {
        let got = agent.sdk_fetch(POD_B).await;
        assert_eq!(
            got.as_ref().map(|(role, _)| role.as_str()),
            Ok("role-b"),
            "pod B was not served while pod A misbehaved"
        );
        ok += 1;
    }
    ok
}

#[tokio::test]
async fn forwarding_headers_never_change_the_pod() {
    let (_c, agent) = two_pods(|_| {}).await;
    let (_, key_b) = agent.sdk_fetch(POD_B).await.unwrap();
    let chain = format!("{POD_B}, 10.0.0.1");
    let spoofs: Vec<Vec<(&str, &str)>> = vec![
        vec![("X-Forwarded-For", POD_B)],
        vec![("X-Forwarded-For", &chain)],
        vec![("X-Real-IP", POD_B)],
        vec![("Forwarded", "for=127.0.8.2")],
        vec![("Forwarded", "for=\"127.0.8.2:1234\";proto=http")],
        vec![("X-Client-IP", POD_B), ("True-Client-IP", POD_B)],
        vec![("X-Original-Forwarded-For", POD_B)],
    ];
    let mut sent = 0;
    for spoof in &spoofs {
        // The Host header replaces the one `request` writes: send raw.
        for host in ["169.254.169.254", POD_B, "127.0.8.2:80"] {
            let mut req = format!("GET {LISTING} HTTP/1.1\r\nHost: {host}\r\n");
            for (k, v) in spoof {
                req.push_str(&format!("{k}: {v}\r\n"));
            }
            req.push_str("Connection: close\r\n\r\n");
            let r = http(agent.addr, POD_A.parse().unwrap(), req.as_bytes()).await;
            sent += 1;
            assert_eq!(
                (r.status, r.body.as_str()),
                (200, "role-a"),
                "{spoof:?} host {host}"
            );

            let creds = req.replace(LISTING, &format!("{LISTING}role-b"));
            let r = http(agent.addr, POD_A.parse().unwrap(), creds.as_bytes()).await;
            sent += 1;
            assert_ne!(r.status, 200, "{spoof:?}: pod A got pod B's role");
            assert!(!r.body.contains(&key_b), "{spoof:?}: pod A got pod B's key");
        }
    }
    report(
        "security/spoofed-headers",
        &[
            ("requests", sent.to_string()),
            ("served_other_pod", "0".into()),
        ],
    );
}

#[tokio::test]
async fn ip_query_is_ignored_unless_allowed() {
    let (c, agent) = two_pods(|_| {}).await;
    let r = agent.get(POD_A, &format!("{LISTING}?ip={POD_B}")).await;
    assert_eq!((r.status, r.body.as_str()), (200, "role-a"));
    let r = agent
        .get(POD_A, &format!("{LISTING}role-b?ip={POD_B}"))
        .await;
    assert_ne!(r.status, 200);

    // Development only: with --allow-ip-query the override is honoured.
    let dev = Agent::start(&c, &[c.addr], |cfg| cfg.allow_ip_query = true).await;
    let r = dev.get(POD_A, &format!("{LISTING}?ip={POD_B}")).await;
    assert_eq!((r.status, r.body.as_str()), (200, "role-b"));
    let r = dev.get(POD_A, &format!("{LISTING}?ip=999.1.1.1")).await;
    assert_eq!(r.status, 400, "{}", r.body);
}

#[tokio::test]
async fn an_imdsv2_token_works_only_from_the_ip_it_was_minted_for() {
    let (_c, agent) = two_pods(|cfg| cfg.require_imdsv2 = true).await;
    let ttl = [("X-aws-ec2-metadata-token-ttl-seconds", "60")];
    let minted = agent.request(POD_A, "PUT", "/latest/api/token", &ttl).await;
    assert_eq!(minted.status, 200, "{minted:?}");
    let token = minted.body.clone();
    let with = [("X-aws-ec2-metadata-token", token.as_str())];

    let r = agent.request(POD_A, "GET", LISTING, &with).await;
    assert_eq!((r.status, r.body.as_str()), (200, "role-a"));
    // Stolen by pod B: refused, for every path, spoofed headers or not.
    for path in [
        LISTING,
        "/latest/meta-data/iam/security-credentials/role-a",
        "/latest/meta-data/iam/info",
    ] {
        let r = agent.request(POD_B, "GET", path, &with).await;
        assert_eq!(r.status, 401, "{path}: {r:?}");
        let mut spoofed = with.to_vec();
        spoofed.push(("X-Forwarded-For", POD_A));
        let r = agent.request(POD_B, "GET", path, &spoofed).await;
        assert_eq!(r.status, 401, "{path} with X-Forwarded-For: {r:?}");
    }
    // A token request that went through a proxy is refused, as on EC2.
    let mut proxied = ttl.to_vec();
    proxied.push(("X-Forwarded-For", POD_A));
    let r = agent
        .request(POD_B, "PUT", "/latest/api/token", &proxied)
        .await;
    assert_eq!(r.status, 403);
    // Tampered tokens are refused too.
    let mut tampered = token.clone();
    let last = tampered.pop().unwrap();
    tampered.push(if last == '0' { '1' } else { '0' });
    let r = agent
        .request(
            POD_A,
            "GET",
            LISTING,
            &[("X-aws-ec2-metadata-token", &tampered)],
        )
        .await;
    assert_eq!(r.status, 401);
}

#[tokio::test]
async fn huge_headers_and_bodies_are_refused_and_others_still_served() {
    let (_c, agent) = two_pods(|_| {}).await;
    let a = POD_A.parse().unwrap();

    // A 64 KB header: refused (431) or cut off, never a crash.
    let big = "x".repeat(64 * 1024);
    let req =
        format!("GET {LISTING} HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\nConnection: close\r\n\r\n");
    let r = http(agent.addr, a, req.as_bytes()).await;
    assert!(
        r.status == 431 || r.error.is_some(),
        "a 64 KB header was accepted: {r:?}"
    );
    // 2000 small headers: the same.
    let mut many = format!("GET {LISTING} HTTP/1.1\r\nHost: x\r\n");
    for i in 0..2000 {
        many.push_str(&format!("X-H{i}: v\r\n"));
    }
    many.push_str("\r\n");
    let r = http(agent.addr, a, many.as_bytes()).await;
    assert!(r.status == 431 || r.error.is_some(), "2000 headers: {r:?}");

    // A huge body on a token PUT: answered at once, the body never read.
    let start = Instant::now();
    let mut s = connect_from(agent.addr, a).await.unwrap();
    s.write_all(
        b"PUT /latest/api/token HTTP/1.1\r\nHost: x\r\nX-aws-ec2-metadata-token-ttl-seconds: 60\r\n\
          Content-Length: 10000000000\r\n\r\n",
    )
    .await
    .unwrap();
    // Some of it (a megabyte); the agent must not wait for the rest.
    let chunk = vec![b'x'; 64 * 1024];
    for _ in 0..16 {
        if s.write_all(&chunk).await.is_err() {
            break;
        }
    }
    let mut head = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(2), s.read(&mut head))
        .await
        .expect("an answer without the 10 GB body")
        .unwrap();
    let head = String::from_utf8_lossy(&head[..n]).to_string();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    drop(s);

    let served = b_is_served(&agent, 5).await;
    report(
        "security/huge-headers-bodies",
        &[
            ("header_64k", "refused".into()),
            ("body_10gb_answer_after", ms(start.elapsed())),
            ("other_pod_served", format!("{served}/5")),
        ],
    );
}

/// How a slow client's connection ended.
#[derive(Debug, PartialEq)]
enum Cut {
    /// Answered 429 (over the per-pod limit) at once.
    Refused,
    /// Closed by the header read timeout.
    TimedOut(Duration),
    /// Still open after 30 s: slow clients are not bounded.
    Never,
}

#[tokio::test]
async fn slow_clients_do_not_stop_other_pods_being_served() {
    let (_c, agent) = two_pods(|_| {}).await;
    let a = POD_A.parse().unwrap();
    let start = Instant::now();
    // Pod A: 100 connections, each trickling its request head a byte every
    // 200 ms (slowloris).
    let mut slow = Vec::new();
    for _ in 0..100 {
        let mut s = connect_from(agent.addr, a).await.unwrap();
        slow.push(tokio::spawn(async move {
            let _ = s
                .write_all(b"GET /latest/meta-data/iam/security-cred")
                .await;
            let mut buf = [0u8; 512];
            while start.elapsed() < Duration::from_secs(30) {
                tokio::select! {
                    read = s.read(&mut buf) => return match read {
                        Ok(n) if n > 0 && buf.starts_with(b"HTTP/1.1 429") => Cut::Refused,
                        _ => Cut::TimedOut(start.elapsed()),
                    },
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {
                        if s.write_all(b"e").await.is_err() {
                            return Cut::TimedOut(start.elapsed());
                        }
                    }
                }
            }
            Cut::Never
        }));
    }
    let served = b_is_served(&agent, 20).await;
    let served_in = start.elapsed();
    let mut refused = 0;
    let mut last_cut = Duration::ZERO;
    for task in slow {
        match task.await.unwrap() {
            Cut::Refused => refused += 1,
            Cut::TimedOut(after) => last_cut = last_cut.max(after),
            Cut::Never => panic!("a slow client was never cut off"),
        }
    }
    assert_eq!(
        refused,
        100 - agent.state.config().max_connections_per_source
    );
    report(
        "security/slowloris",
        &[
            ("slow_connections", "100".into()),
            ("refused_429", refused.to_string()),
            ("other_pod_fetches_ok", format!("{served}/20")),
            ("other_pod_time", ms(served_in)),
            ("last_slow_connection_cut_after", ms(last_cut)),
        ],
    );
}

#[tokio::test]
async fn open_connections_per_pod_are_bounded() {
    let (_c, agent) = two_pods(|_| {}).await;
    let limit = agent.state.config().max_connections_per_source;
    assert_eq!(limit, 64, "the default");
    let a = POD_A.parse().unwrap();
    // Pod A opens connections and sends nothing.
    let mut held = Vec::new();
    for _ in 0..limit {
        held.push(connect_from(agent.addr, a).await.unwrap());
    }
    // One more: answered 429 at once and closed.
    let mut refused = 0;
    for _ in 0..20 {
        let r = http(
            agent.addr,
            a,
            format!("GET {LISTING} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
        )
        .await;
        assert_eq!(r.status, 429, "{r:?}");
        assert!(r.body.contains("too many open connections"), "{}", r.body);
        refused += 1;
    }
    let m = agent.metrics();
    assert!(
        m.contains(&format!("kiam_agent_connections_refused_total {refused}")),
        "{m}"
    );
    // Pod B is not affected.
    let served = b_is_served(&agent, 5).await;
    // Pod A is served again once it closes what it held.
    drop(held);
    let ((role, _), recovered) =
        fault_stack::until("pod A served again", Duration::from_secs(5), || async {
            agent.sdk_fetch(POD_A).await.ok()
        })
        .await;
    assert_eq!(role, "role-a");
    report(
        "security/connections-per-pod",
        &[
            ("limit", limit.to_string()),
            ("refused_429", refused.to_string()),
            ("other_pod_served", format!("{served}/5")),
            ("recovered_after_close", ms(recovered)),
        ],
    );
}
