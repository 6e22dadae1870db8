//! The gRPC server over mutual TLS against the in-memory API server and a
//! fake STS: the answers agents depend on, prefetch, and single-flight.

#[path = "support/cluster.rs"]
mod cluster;
#[path = "support/grpc.rs"]
mod grpc;

use std::time::Duration;

use cluster::{eventually, pod_json, Cluster, BASE_ARN};
use kiam::proto::GetPodRoleRequest;
use kiam::server::model::Identity;
use tonic::Code;

fn identity(role: &str, session: &str) -> Identity {
    Identity {
        role_arn: format!("{BASE_ARN}{role}").into(),
        session_name: session.into(),
        external_id: None,
        tags: None,
    }
}

/// Which check refused, as the server tells our agents (Go agents ignore it).
fn denied_check(e: &tonic::Status) -> Option<&str> {
    e.metadata()
        .get(kiam::wire::DENIED_CHECK_KEY)
        .and_then(|v| v.to_str().ok())
}

#[tokio::test]
async fn answers_role_credentials_and_health() {
    let c = Cluster::start(&[]).await;
    // The regex is matched against the resolved ARN, anchored.
    c.namespace("team-a", Some("arn:aws:iam::123456789012:role/team-a-.*"));
    c.pod("team-a", "web", "198.18.0.10", Some("team-a-web"));
    let mut client = c.ready().await;

    let role = client
        .get_pod_role(GetPodRoleRequest {
            ip: "198.18.0.10".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(role.name, "team-a-web");

    let creds = client
        .get_pod_credentials(grpc::credentials_request("198.18.0.10", "team-a-web"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(creds.code, "Success");
    assert_eq!(creds.r#type, "AWS-HMAC");
    assert!(!creds.access_key_id.is_empty());
    assert!(!creds.secret_access_key.is_empty());
    assert!(!creds.token.is_empty());
    // YYYY-MM-DDTHH:MM:SSZ
    let exp = &creds.expiration;
    assert_eq!(exp.len(), 20, "{exp}");
    assert!(exp.ends_with('Z') && &exp[10..11] == "T", "{exp}");
    let exp: jiff::Timestamp = exp.parse().unwrap();
    let left = exp.duration_since(jiff::Timestamp::now());
    assert!(left > jiff::SignedDuration::from_mins(55), "{left:?}");

    // The full ARN works too: the policy compares resolved ARNs.
    client
        .get_pod_credentials(grpc::credentials_request(
            "198.18.0.10",
            &format!("{BASE_ARN}team-a-web"),
        ))
        .await
        .unwrap();
    assert_eq!(c.sts.calls(&identity("team-a-web", "kiam-kiam")), 1);
}

#[tokio::test]
async fn refusals_carry_kiam_wire_messages() {
    let c = Cluster::start(&[]).await;
    c.namespace("team-a", Some(".*:role/team-a-.*"));
    c.namespace("locked", None);
    c.pod("team-a", "web", "198.18.0.20", Some("team-a-web"));
    c.pod("locked", "db", "198.18.0.21", Some("team-a-web"));
    c.pod("team-a", "plain", "198.18.0.22", None);
    let mut client = c.ready().await;

    let e = client
        .get_pod_role(GetPodRoleRequest {
            ip: "198.18.0.99".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.message(), "no pod found");

    let e = client
        .get_pod_credentials(grpc::credentials_request("198.18.0.99", "team-a-web"))
        .await
        .unwrap_err();
    assert_eq!(e.message(), "no pod found");

    // Another role than the annotated one.
    let e = client
        .get_pod_credentials(grpc::credentials_request("198.18.0.20", "team-a-admin"))
        .await
        .unwrap_err();
    assert_eq!(e.message(), "forbidden by policy");
    assert_eq!(e.code(), Code::PermissionDenied);
    assert_eq!(denied_check(&e), Some("annotated-role"));

    // A namespace without iam.amazonaws.com/permitted permits nothing.
    let e = client
        .get_pod_credentials(grpc::credentials_request("198.18.0.21", "team-a-web"))
        .await
        .unwrap_err();
    assert_eq!(e.message(), "forbidden by policy");
    assert_eq!(denied_check(&e), Some("namespace-permitted"));

    // A pod without a role: empty role name, and no credentials.
    let role = client
        .get_pod_role(GetPodRoleRequest {
            ip: "198.18.0.22".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(role.name, "");
    let e = client
        .get_pod_credentials(grpc::credentials_request("198.18.0.22", "team-a-web"))
        .await
        .unwrap_err();
    assert_eq!(e.message(), "forbidden by policy");

    // Garbage IPs are a clear client error, and the server lives on.
    let e = client
        .get_pod_role(GetPodRoleRequest {
            ip: "not-an-ip".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    // Denied requests never reach STS (web's own role was prefetched: that is allowed).
    assert_eq!(c.sts.calls(&identity("team-a-admin", "kiam-kiam")), 0);
    assert!(
        c.sts.total_calls() <= 1,
        "only web's own role: {}",
        c.sts.total_calls()
    );

    // The denial is recorded once on the pod, however often it repeats.
    for _ in 0..20 {
        let _ = client
            .get_pod_credentials(grpc::credentials_request("198.18.0.20", "team-a-admin"))
            .await;
    }
    eventually("a KiamRoleForbidden event", || {
        c.api
            .events("team-a")
            .iter()
            .any(|e| e["reason"] == "KiamRoleForbidden")
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let forbidden: Vec<_> = c
        .api
        .events("team-a")
        .into_iter()
        .filter(|e| e["reason"] == "KiamRoleForbidden" && e["involvedObject"]["name"] == "web")
        .collect();
    assert_eq!(forbidden.len(), 1, "deduplicated: {forbidden:?}");
    assert!(forbidden[0]["message"]
        .as_str()
        .unwrap()
        .contains("team-a-admin"));
}

#[tokio::test]
async fn prefetch_calls_sts_when_the_pod_appears() {
    let c = Cluster::start(&[]).await;
    c.namespace("team-a", Some(".*"));
    c.namespace("locked", None);
    let _client = c.ready().await;
    let id = identity("early", "kiam-kiam");
    assert_eq!(c.sts.calls(&id), 0);

    c.pod("team-a", "early", "198.18.0.30", Some("early"));
    // No request is made: the call must come from the watcher.
    eventually("a prefetch AssumeRole call", || c.sts.calls(&id) == 1).await;

    // A forbidden role is not prefetched.
    c.pod("locked", "nope", "198.18.0.31", Some("forbidden-role"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(c.sts.calls(&identity("forbidden-role", "kiam-kiam")), 0);
}

#[tokio::test]
async fn one_sts_call_per_identity_under_concurrency() {
    let c = Cluster::start(&[]).await;
    c.namespace("shared", Some(".*"));
    // Slow STS so every request overlaps with the in-flight calls.
    c.sts.set_delay(Duration::from_millis(200));
    let client = c.ready().await;
    // The pods appear before any prefetch can finish; requests race it.
    for i in 0..50 {
        c.pod(
            "shared",
            &format!("p{i}"),
            &format!("198.18.1.{i}"),
            Some(&format!("role-{}", i % 5)),
        );
    }
    let mut tasks = Vec::new();
    for n in 0..1000 {
        let mut client = client.clone();
        let i = n % 50;
        tasks.push(tokio::spawn(async move {
            client
                .get_pod_credentials(grpc::credentials_request(
                    &format!("198.18.1.{i}"),
                    &format!("role-{}", i % 5),
                ))
                .await
                .map(|r| r.into_inner().access_key_id)
        }));
    }
    let mut keys = std::collections::HashMap::new();
    for (n, t) in tasks.into_iter().enumerate() {
        let key = t
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("request {n}: {e}"));
        keys.entry((n % 50) % 5)
            .or_insert_with(std::collections::HashSet::new)
            .insert(key);
    }
    let per: Vec<usize> = (0..5)
        .map(|r| c.sts.calls(&identity(&format!("role-{r}"), "kiam-kiam")))
        .collect();
    assert_eq!(
        c.sts.total_calls(),
        5,
        "exactly one AssumeRole per identity: {per:?}"
    );
    for (role, set) in &keys {
        assert_eq!(
            set.len(),
            1,
            "role-{role} got one credential, shared: {set:?}"
        );
    }
    let metrics = c.metrics();
    assert!(metrics.contains("kiam_sts_cache_hit_total"), "{metrics}");
    assert!(metrics.contains("grpc_server_handled_total"), "{metrics}");
}

#[tokio::test]
async fn deleted_completed_and_reused_ips() {
    let c = Cluster::start(&[]).await;
    c.namespace("team-a", Some(".*"));
    c.pod("team-a", "old", "198.18.0.40", Some("old-role"));
    c.pod("team-a", "done", "198.18.0.41", Some("done-role"));
    let mut client = c.ready().await;
    let role = |client: &mut kiam::proto::kiam_service_client::KiamServiceClient<_>, ip: &str| {
        let mut client = client.clone();
        let ip = ip.to_string();
        async move {
            client
                .get_pod_role(GetPodRoleRequest { ip })
                .await
                .map(|r| r.into_inner().name)
                .map_err(|e| e.message().to_string())
        }
    };
    assert_eq!(role(&mut client, "198.18.0.40").await.unwrap(), "old-role");

    // Completed: never matched again.
    c.api
        .apply_pod(pod_json(
            "team-a",
            "done",
            "198.18.0.41",
            Some("done-role"),
            "Succeeded",
        ))
        .unwrap();
    let mut last = Ok(String::new());
    for _ in 0..100 {
        last = role(&mut client, "198.18.0.41").await;
        if last.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(last, Err("no pod found".to_string()));

    // Deleted, then the IP is reused by a pod with another role.
    c.api.delete_pod("team-a", "old").unwrap();
    c.pod("team-a", "new", "198.18.0.40", Some("new-role"));
    let mut seen = String::new();
    for _ in 0..100 {
        seen = role(&mut client, "198.18.0.40").await.unwrap_or_default();
        if seen == "new-role" {
            break;
        }
        assert_ne!(
            seen, "",
            "a reused IP must never be unanswered or ambiguous here"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(seen, "new-role");
    // And the new pod can never get the old pod's role.
    let e = client
        .get_pod_credentials(grpc::credentials_request("198.18.0.40", "old-role"))
        .await
        .unwrap_err();
    assert_eq!(e.message(), "forbidden by policy");
}

#[tokio::test]
async fn start_up_race_is_answered_from_the_api() {
    let c = Cluster::start(&[]).await;
    c.namespace("team-a", Some(".*"));
    let mut client = c.ready().await;
    c.api.hold_watch_events(true);
    c.pod("team-a", "fresh", "198.18.0.50", Some("fresh-role"));
    let role = client
        .get_pod_role(GetPodRoleRequest {
            ip: "198.18.0.50".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(role.name, "fresh-role");
    let creds = client
        .get_pod_credentials(grpc::credentials_request("198.18.0.50", "fresh-role"))
        .await
        .unwrap()
        .into_inner();
    assert!(!creds.access_key_id.is_empty());
    assert!(
        c.api.count_requests(|r| r
            .param("fieldSelector")
            .is_some_and(|f| f.contains("status.podIP=198.18.0.50")))
            >= 1
    );
    c.api.hold_watch_events(false);
}

/// An agent's node name (`kiam-node` request metadata) scopes the lookup
/// of a pod the watch has not delivered to that node's pods; a value that
/// cannot be a node name is ignored (the whole cluster is asked), never an
/// error.
#[tokio::test]
async fn the_agents_node_scopes_a_direct_lookup() {
    let c = Cluster::start(&[]).await;
    c.namespace("team-a", Some(".*"));
    let mut client = c.ready().await;
    c.api.hold_watch_events(true);
    for (name, ip) in [("near", "198.18.0.60"), ("odd", "198.18.0.61")] {
        let mut pod = pod_json("team-a", name, ip, Some("near-role"), "Running");
        pod["spec"]["nodeName"] = serde_json::json!("node-7");
        c.api.apply_pod(pod).unwrap();
    }
    let with_node = |ip: &str, node: &str| {
        let mut request = tonic::Request::new(GetPodRoleRequest { ip: ip.into() });
        request
            .metadata_mut()
            .insert(kiam::wire::NODE_KEY, node.parse().unwrap());
        request
    };
    let role = client
        .get_pod_role(with_node("198.18.0.60", "node-7"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(role.name, "near-role");
    let selectors = |ip: &str| -> Vec<String> {
        c.api
            .requests()
            .iter()
            .filter(|r| r.verb == "list")
            .filter_map(|r| r.param("fieldSelector").map(str::to_string))
            .filter(|f| f.contains(ip))
            .collect()
    };
    assert_eq!(
        selectors("198.18.0.60"),
        ["spec.nodeName=node-7,status.podIP=198.18.0.60"]
    );

    let role = client
        .get_pod_role(with_node("198.18.0.61", "Node_7;x"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(role.name, "near-role");
    assert_eq!(selectors("198.18.0.61"), ["status.podIP=198.18.0.61"]);
    c.api.hold_watch_events(false);
}

#[tokio::test]
async fn clients_without_the_ca_are_refused() {
    let c = Cluster::start(&[]).await;
    c.namespace("team-a", Some(".*"));
    c.ready().await;

    // A client certificate from another CA.
    let other = tempfile::tempdir().unwrap();
    let other_pki = kiam::certs::generate(other.path(), &[], 1).unwrap();
    let files = kiam::tls::TlsFiles::new(
        other_pki.path("agent.pem"),
        other_pki.path("agent-key.pem"),
        c.pki.path("ca.pem"),
    );
    let tls = kiam::tls::ClientTls::load(files, &mut Default::default()).unwrap();
    let channel = tls
        .channel(&format!("localhost:{}", c.addr.port()), &Default::default())
        .unwrap();
    let mut client = kiam::proto::kiam_service_client::KiamServiceClient::new(channel);
    let e = client
        .get_health(kiam::proto::GetHealthRequest {})
        .await
        .unwrap_err();
    let text = format!("{e:?}");
    assert!(text.contains("refused this client's certificate"), "{text}");

    // Plain TCP without TLS gets nothing either.
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{}", c.addr.port()))
            .unwrap()
            .connect_lazy();
    let mut client = kiam::proto::kiam_service_client::KiamServiceClient::new(channel);
    assert!(client
        .get_health(kiam::proto::GetHealthRequest {})
        .await
        .is_err());

    // The server still serves good clients.
    c.ready().await;
}

/// `--session-tags`: two pods in different namespaces, both allowed the same
/// role, each get credentials tagged with their own namespace and name,
/// never the other's (the cache used to key on the role alone and hand the
/// second pod the first pod's tagged credentials).
#[tokio::test]
async fn session_tags_are_never_shared_between_pods() {
    let c = Cluster::start(&["--session-tags"]).await;
    c.namespace("team-a", Some(".*:role/shared"));
    c.namespace("team-b", Some(".*:role/shared"));
    c.pod("team-a", "web", "198.18.0.40", Some("shared"));
    c.pod("team-b", "api", "198.18.0.41", Some("shared"));
    let mut client = c.ready().await;
    let a = client
        .get_pod_credentials(grpc::credentials_request("198.18.0.40", "shared"))
        .await
        .unwrap()
        .into_inner();
    let b = client
        .get_pod_credentials(grpc::credentials_request("198.18.0.41", "shared"))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(a.access_key_id, b.access_key_id);
    let tagged = |ns: &str, pod: &str| Identity {
        tags: Some(std::sync::Arc::new(kiam::server::model::SessionTags {
            namespace: ns.into(),
            pod: pod.into(),
            service_account: "default".into(),
        })),
        ..identity("shared", "kiam-kiam")
    };
    let (ta, tb) = (tagged("team-a", "web"), tagged("team-b", "api"));
    assert_eq!(c.sts.last_tags(&ta).unwrap().namespace, "team-a");
    assert_eq!(c.sts.last_tags(&tb).unwrap().namespace, "team-b");
    // Repeats are cache hits for each pod's own identity.
    let again = client
        .get_pod_credentials(grpc::credentials_request("198.18.0.41", "shared"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.access_key_id, b.access_key_id);
    assert_eq!(c.sts.calls(&ta), 1);
    assert_eq!(c.sts.calls(&tb), 1);
}

/// What a server says to agents never names other pods, namespaces or its
/// own role (Go agents hand the message to the pod), and says which
/// failures are final: STS refusals are FAILED_PRECONDITION, transient ones
/// INTERNAL, never UNAVAILABLE (which would let an agent serve what it kept
/// for the IP).
#[tokio::test]
async fn error_messages_are_short_and_final_refusals_are_marked() {
    let c = Cluster::start(&[]).await;
    c.namespace("team-a", Some(".*"));
    c.namespace("secret-ns", Some(".*"));
    c.pod("team-a", "web", "198.18.0.50", Some("web"));
    c.pod("secret-ns", "twin", "198.18.0.50", Some("other"));
    let mut client = c.ready().await;

    // Once the watch has delivered both pods, the IP is ambiguous.
    let mut answer = Ok(());
    for _ in 0..200 {
        answer = client
            .get_pod_credentials(grpc::credentials_request("198.18.0.50", "web"))
            .await
            .map(|_| ());
        if answer.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let e = answer.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    for secret in ["secret-ns", "twin", "team-a", "web"] {
        assert!(!e.message().contains(secret), "{}", e.message());
    }

    c.sts.fail_always(Some(cluster::FakeFailure::AccessDenied));
    c.pod("team-a", "api", "198.18.0.51", Some("api"));
    let e = client
        .get_pod_credentials(grpc::credentials_request("198.18.0.51", "api"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert_eq!(e.message(), "error retrieving credentials: AccessDenied");

    c.sts.fail_always(Some(cluster::FakeFailure::Throttle));
    c.pod("team-a", "batch", "198.18.0.52", Some("batch"));
    let e = client
        .get_pod_credentials(grpc::credentials_request("198.18.0.52", "batch"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Internal);
    assert_eq!(e.message(), "error retrieving credentials: Throttling");
}

/// Issue 13: `Role.arn` is the annotated role resolved under
/// `--role-base-arn` (a full ARN as it is), so agents can tell a bare
/// name's account; empty without a role.
#[tokio::test]
async fn role_answers_carry_the_resolved_arn() {
    let c = Cluster::start(&[]).await;
    c.namespace("team-a", Some(".*"));
    c.pod("team-a", "bare", "198.18.0.40", Some("team-a-web"));
    c.pod("team-a", "slash", "198.18.0.41", Some("/team/web"));
    let full = "arn:aws:iam::210987654321:role/elsewhere";
    c.pod("team-a", "full", "198.18.0.42", Some(full));
    c.pod("team-a", "none", "198.18.0.43", None);
    let client = c.ready().await;
    let role = |ip: &str| {
        let req = GetPodRoleRequest { ip: ip.into() };
        let mut client = client.clone();
        async move { client.get_pod_role(req).await.unwrap().into_inner() }
    };
    let r = role("198.18.0.40").await;
    assert_eq!(r.name, "team-a-web");
    assert_eq!(r.arn, format!("{BASE_ARN}team-a-web"));
    let r = role("198.18.0.41").await;
    assert_eq!(r.name, "/team/web");
    assert_eq!(r.arn, format!("{BASE_ARN}team/web"));
    let r = role("198.18.0.42").await;
    assert_eq!((r.name.as_str(), r.arn.as_str()), (full, full));
    let r = role("198.18.0.43").await;
    assert_eq!((r.name.as_str(), r.arn.as_str()), ("", ""));
}
