//! Bad input at the server: malformed annotations (bad regexes, empty or
//! blank roles, garbage ARNs, 100 KB values) and malformed gRPC requests
//! (bad IPs, huge strings, oversized messages). Pass condition: each gets a
//! clear, bounded error (and an Event on the pod where kiam refuses it),
//! and the server stays healthy, serving well-formed pods throughout.

#[path = "support/cluster.rs"]
mod cluster;
#[path = "support/fault_stack.rs"]
mod fault_stack;
#[path = "support/grpc.rs"]
mod grpc;

use std::time::Duration;

use cluster::{Cluster, BASE_ARN};
use fault_stack::{report, until, Agent};
use grpc::role;
use kiam::proto::kiam_service_client::KiamServiceClient;
use kiam::proto::GetHealthRequest;
use serde_json::json;
use tonic::transport::Channel;
use tonic::Code;

/// The access key id a pod gets, or why not.
async fn creds(
    client: &KiamServiceClient<Channel>,
    ip: &str,
    role: &str,
) -> Result<String, grpc::Failure> {
    grpc::credentials(client, ip, role)
        .await
        .map(|c| c.access_key_id)
}

/// The server still answers health and serves a well-formed pod.
async fn healthy(client: &KiamServiceClient<Channel>) {
    let h = client
        .clone()
        .get_health(GetHealthRequest {})
        .await
        .unwrap();
    assert_eq!(h.into_inner().message, "ok");
    assert!(creds(client, "198.18.12.1", "good-role").await.is_ok());
}

fn pod_with(ns: &str, name: &str, ip: &str, annotations: serde_json::Value) -> serde_json::Value {
    let mut pod = cluster::pod_json(ns, name, ip, None, "Running");
    pod["metadata"]["annotations"] = annotations;
    pod
}

/// Waits for the `KiamRoleForbidden` Event on `name` and returns its message.
async fn forbidden_event(c: &Cluster, ns: &str, name: &str) -> String {
    until(
        "a KiamRoleForbidden Event",
        Duration::from_secs(5),
        || async {
            c.api.events(ns).into_iter().find_map(|e| {
                (e["reason"] == "KiamRoleForbidden" && e["involvedObject"]["name"] == name)
                    .then(|| e["message"].as_str().unwrap_or_default().to_string())
            })
        },
    )
    .await
    .0
}

#[tokio::test]
async fn malformed_annotations_get_clear_refusals_and_the_server_stays_healthy() {
    let c = Cluster::start(&[]).await;
    c.namespace("good", Some(".*"));
    c.pod("good", "good", "198.18.12.1", Some("good-role"));
    // Namespaces whose `permitted` regex is broken or absurd.
    let huge_regex = format!("({})", vec!["a{1000}"; 100].join("|"));
    let long_literal = "x".repeat(100 * 1024);
    for (ns, permitted) in [
        ("unclosed", "(arn:aws:iam::.*"),
        ("huge-regex", huge_regex.as_str()),
        ("long-literal", long_literal.as_str()),
    ] {
        c.namespace(ns, Some(permitted));
    }
    c.pod("unclosed", "p", "198.18.12.10", Some("app"));
    c.pod("huge-regex", "p", "198.18.12.11", Some("app"));
    c.pod("long-literal", "p", "198.18.12.12", Some("app"));
    // Pods whose annotations are malformed.
    let long_role = "r".repeat(100 * 1024);
    let cases: Vec<(&str, &str, serde_json::Value)> = vec![
        (
            "empty-role",
            "198.18.12.20",
            json!({"iam.amazonaws.com/role": ""}),
        ),
        (
            "blank-role",
            "198.18.12.21",
            json!({"iam.amazonaws.com/role": "   "}),
        ),
        (
            "bad-arn",
            "198.18.12.22",
            json!({"iam.amazonaws.com/role": "arn:aws:iam::123456789012:user/x"}),
        ),
        (
            "s3-arn",
            "198.18.12.23",
            json!({"iam.amazonaws.com/role": "arn:aws:s3:::bucket"}),
        ),
        (
            "colons",
            "198.18.12.24",
            json!({"iam.amazonaws.com/role": "arn:::::"}),
        ),
        (
            "no-name",
            "198.18.12.28",
            json!({"iam.amazonaws.com/role": "arn:aws:iam::123456789012:role/"}),
        ),
        (
            "long-role",
            "198.18.12.25",
            json!({"iam.amazonaws.com/role": long_role}),
        ),
        (
            "control",
            "198.18.12.26",
            json!({"iam.amazonaws.com/role": "app\u{0}\n\u{7f}"}),
        ),
        (
            "long-session",
            "198.18.12.27",
            json!({"iam.amazonaws.com/role": "good-role",
            "iam.amazonaws.com/session-name": "s".repeat(100 * 1024)}),
        ),
    ];
    for (name, ip, annotations) in &cases {
        c.api
            .apply_pod(pod_with("good", name, ip, annotations.clone()))
            .unwrap();
    }
    let client = c.ready().await;
    healthy(&client).await;

    // Broken namespace regexes permit nothing and say why.
    for (ns, ip, why) in [
        (
            "unclosed",
            "198.18.12.10",
            "invalid iam.amazonaws.com/permitted regex",
        ),
        (
            "huge-regex",
            "198.18.12.11",
            "invalid iam.amazonaws.com/permitted regex",
        ),
        (
            "long-literal",
            "198.18.12.12",
            "invalid iam.amazonaws.com/permitted regex",
        ),
    ] {
        let got = until("the namespace's pod", Duration::from_secs(5), || async {
            match creds(&client, ip, "app").await {
                Err((Code::NotFound, _)) => None,
                other => Some(other),
            }
        })
        .await
        .0;
        assert_eq!(
            got,
            Err((Code::PermissionDenied, "forbidden by policy".into())),
            "{ns}"
        );
        let event = forbidden_event(&c, ns, "p").await;
        assert!(event.contains(why), "{ns}: {event}");
        assert!(
            event.ends_with("so it permits no roles (wanted arn:aws:iam::123456789012:role/app)"),
            "{ns}: {event}"
        );
        assert!(event.len() <= 1024, "{ns}: a {} byte Event", event.len());
    }

    // An empty role is no role.
    assert_eq!(role(&client, "198.18.12.20").await, Ok(String::new()));
    // Roles that cannot be an IAM role are refused for any request.
    for (name, ip, requested) in [
        ("blank-role", "198.18.12.21", "   "),
        (
            "bad-arn",
            "198.18.12.22",
            "arn:aws:iam::123456789012:user/x",
        ),
        ("s3-arn", "198.18.12.23", "arn:aws:s3:::bucket"),
        ("colons", "198.18.12.24", "arn:::::"),
        ("no-name", "198.18.12.28", "arn:aws:iam::123456789012:role/"),
        ("long-role", "198.18.12.25", long_role.as_str()),
        ("control", "198.18.12.26", "app\u{0}\n\u{7f}"),
    ] {
        let got = creds(&client, ip, requested).await;
        assert_eq!(
            got,
            Err((Code::PermissionDenied, "forbidden by policy".into())),
            "{name}"
        );
        let event = forbidden_event(&c, "good", name).await;
        assert!(
            event.contains("is not a valid role") || event.contains("is not an IAM role ARN"),
            "{name}: the Event does not say what is wrong: {event}"
        );
        assert!(event.len() <= 1024, "{name}: a {} byte Event", event.len());
    }
    // A 100 KB session name is cut to STS's 64 characters, not refused.
    assert!(creds(&client, "198.18.12.27", "good-role").await.is_ok());
    healthy(&client).await;

    // Through an agent: the same refusals as HTTP statuses, and the agent
    // keeps serving.
    let agent = Agent::start(&c, &[c.addr], |cfg| {
        cfg.deadline = Duration::from_millis(300)
    })
    .await;
    c.pod("good", "agent-good", "127.0.12.1", Some("good-role"));
    c.api
        .apply_pod(pod_with(
            "good",
            "agent-bad",
            "127.0.12.2",
            json!({"iam.amazonaws.com/role": "arn:aws:iam::123456789012:user/x"}),
        ))
        .unwrap();
    let r = agent
        .get(
            "127.0.12.2",
            "/latest/meta-data/iam/security-credentials/arn:aws:iam::123456789012:user/x",
        )
        .await;
    assert!(r.status == 403 || r.status == 404, "{r:?}");
    assert!(agent.sdk_fetch("127.0.12.1").await.is_ok());
    report(
        "input/malformed-annotations",
        &[
            ("namespaces", "3".into()),
            ("pods", cases.len().to_string()),
            ("server_healthy_after", "yes".into()),
        ],
    );
}

#[tokio::test]
async fn malformed_grpc_requests_get_clear_errors_and_the_server_stays_healthy() {
    let c = Cluster::start(&[]).await;
    c.namespace("good", Some(".*"));
    c.pod("good", "good", "198.18.12.1", Some("good-role"));
    let client = c.ready().await;
    healthy(&client).await;

    let mega = "9".repeat(1024 * 1024);
    let bad_ips = [
        "",
        "not-an-ip",
        "999.999.999.999",
        "10.0.0.1\0",
        "10.0.0.1:80",
        "::ffff:zz",
        "fe80::1%eth0",
        "１０.０.０.１",
        mega.as_str(),
    ];
    let mut sent = 0;
    for ip in bad_ips {
        for r in [
            role(&client, ip).await.map(|_| ()),
            creds(&client, ip, "good-role").await.map(|_| ()),
        ] {
            sent += 1;
            let (code, message) = r.expect_err(ip);
            assert_eq!(code, Code::InvalidArgument, "{:.40}: {message:.200}", ip);
            assert!(message.contains("is not an IP address"), "{message:.200}");
            assert!(
                message.len() <= 512,
                "a {} byte error message",
                message.len()
            );
        }
    }
    // A huge requested role for a real pod: refused by policy, and the
    // Event about it stays small.
    let r = creds(&client, "198.18.12.1", &"r".repeat(1024 * 1024)).await;
    assert_eq!(
        r,
        Err((Code::PermissionDenied, "forbidden by policy".into()))
    );
    sent += 1;
    let event = forbidden_event(&c, "good", "good").await;
    assert!(event.len() <= 1024, "a {} byte Event", event.len());

    // A pod asking for a new role name each time cannot make the server
    // write an Event each time.
    for i in 0..50 {
        let r = creds(&client, "198.18.12.1", &format!("made-up-{i}")).await;
        assert_eq!(
            r,
            Err((Code::PermissionDenied, "forbidden by policy".into()))
        );
        sent += 1;
    }
    let denials = || {
        c.api
            .events("good")
            .into_iter()
            .filter(|e| e["reason"] == "KiamRoleForbidden")
            .count()
    };
    until(
        "the Events to be written",
        Duration::from_secs(5),
        || async { (denials() >= kiam::server::events::MAX_EVENTS_PER_POD as usize).then_some(()) },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(denials(), kiam::server::events::MAX_EVENTS_PER_POD as usize);

    // Past tonic's 4 MB message limit: refused before it is decoded.
    let r = role(&client, &"1".repeat(5 * 1024 * 1024)).await;
    assert!(
        matches!(
            r,
            Err((
                Code::ResourceExhausted | Code::OutOfRange | Code::Internal,
                _
            ))
        ),
        "{:?}",
        r.map_err(|(c, m)| (c, m.chars().take(200).collect::<String>()))
    );
    sent += 1;

    // The same channel, and the server, still work.
    healthy(&client).await;
    let fresh = c.client();
    healthy(&fresh).await;
    assert_eq!(role(&fresh, "198.18.12.1").await.unwrap(), "good-role");
    report(
        "input/malformed-grpc",
        &[
            ("bad_requests", sent.to_string()),
            ("events_written", denials().to_string()),
            ("server_healthy_after", "yes".into()),
        ],
    );
}

#[test]
fn base_arn_is_checked_at_start_up() {
    // A malformed --role-base-arn is a usage error naming the flag, not a
    // server that refuses every pod later.
    for bad in [
        "",
        "arn:aws:iam::123:user/",
        "arn:aws:s3:::x/",
        "not-an-arn",
    ] {
        let r = kiam::server::policy::ArnResolver::new(bad);
        assert!(r.is_err(), "{bad:?} accepted");
    }
    assert!(kiam::server::policy::ArnResolver::new(BASE_ARN).is_ok());
}
