//! `kiam explain` against a server on the in-memory API server and a fake
//! STS: each check that can stop a pod, with the reason printed and the exit
//! code; the CLI as a real process for its exit codes and JSON; and never a
//! secret in what it prints.

#[path = "support/cluster.rs"]
mod cluster;
#[path = "support/procs.rs"]
mod procs;

use std::process::Output;

use cluster::{pod_json, Cluster, FakeFailure, BASE_ARN};
use kiam::explain::{render_json, render_text};
use kiam::proto::explain_step::Outcome;
use kiam::proto::{ExplainRequest, ExplainStep, Explanation, GetPodCredentialsRequest};
use serde_json::Value;

const ARN_WEB: &str = "arn:aws:iam::123456789012:role/web";

async fn explain(c: &Cluster, ns: &str, name: &str) -> Explanation {
    let mut client = c.ready().await;
    let req = ExplainRequest {
        namespace: ns.into(),
        name: name.into(),
        ..Default::default()
    };
    client.explain(req).await.unwrap().into_inner()
}

async fn explain_ip(c: &Cluster, ip: &str) -> Explanation {
    let mut client = c.ready().await;
    let req = ExplainRequest {
        ip: ip.into(),
        ..Default::default()
    };
    client.explain(req).await.unwrap().into_inner()
}

fn step<'a>(e: &'a Explanation, name: &str) -> &'a ExplainStep {
    e.steps
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no step {name}: {e:#?}"))
}

fn detail<'a>(s: &'a ExplainStep, key: &str) -> &'a str {
    s.details
        .iter()
        .find(|d| d.key == key)
        .map(|d| d.value.as_str())
        .unwrap_or_else(|| panic!("no detail {key}: {s:#?}"))
}

/// The one failed step: its name, what it says and the fix, as printed.
fn failed(e: &Explanation) -> &ExplainStep {
    assert!(!e.served, "{e:#?}");
    let failed: Vec<_> = e
        .steps
        .iter()
        .filter(|s| s.outcome == Outcome::Fail as i32)
        .collect();
    assert_eq!(failed.len(), 1, "{e:#?}");
    let text = render_text("x", e);
    assert!(text.contains("would NOT be served"), "{text}");
    assert!(
        text.contains(&format!("[FAIL] {}: ", failed[0].name)),
        "{text}"
    );
    assert!(
        !failed[0].fix.is_empty(),
        "a failed step says how to fix it"
    );
    assert!(text.contains(&format!("fix: {}", failed[0].fix)), "{text}");
    failed[0]
}

/// What a script reads: parses, and agrees with the message.
fn json_of(e: &Explanation) -> Value {
    let json: Value = serde_json::from_str(&render_json("x", e)).expect("JSON parses");
    assert_eq!(json["served"], e.served);
    assert_eq!(json["steps"].as_array().unwrap().len(), e.steps.len());
    json
}

#[tokio::test]
async fn a_served_pod_passes_every_step_and_shows_no_secret() {
    let c = Cluster::start(&[]).await;
    c.namespace("team", Some(ARN_WEB));
    let mut pod = pod_json("team", "web", "198.18.1.1", Some("web"), "Running");
    pod["spec"]["nodeName"] = "node-1".into();
    c.api.apply_pod(pod).unwrap();
    let mut client = c.ready().await;
    let creds = client
        .get_pod_credentials(GetPodCredentialsRequest {
            ip: "198.18.1.1".into(),
            role: "web".into(),
        })
        .await
        .unwrap()
        .into_inner();

    let e = explain(&c, "team", "web").await;
    assert!(e.served, "{e:#?}");
    let names: Vec<&str> = e.steps.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["pod", "role", "namespace", "credentials", "path"]);
    assert!(
        e.steps.iter().all(|s| s.outcome == Outcome::Pass as i32),
        "{e:#?}"
    );
    assert_eq!(detail(step(&e, "pod"), "API server agrees"), "yes");
    assert_eq!(detail(step(&e, "pod"), "IPs"), "198.18.1.1");
    assert_eq!(detail(step(&e, "pod"), "node"), "node-1");
    assert_eq!(detail(step(&e, "role"), "role ARN"), ARN_WEB);
    assert_eq!(detail(step(&e, "role"), "session name"), "kiam-kiam");
    let ns = step(&e, "namespace");
    assert_eq!(detail(ns, "as applied"), format!("^(?:{ARN_WEB})$"));
    let cr = step(&e, "credentials");
    assert_eq!(detail(cr, "access key id"), creds.access_key_id);
    assert_eq!(detail(cr, "expiration"), creds.expiration);

    // By IP: the same pod, the same verdict.
    let by_ip = explain_ip(&c, "198.18.1.1").await;
    assert!(by_ip.served);
    assert_eq!(step(&by_ip, "pod").summary, "team/web");

    let text = render_text("team/web", &e);
    let json = render_json("team/web", &e);
    serde_json::from_str::<Value>(&json).unwrap();
    for out in [&text, &json, &format!("{e:?}")] {
        assert!(out.contains(&creds.access_key_id));
        assert!(!out.contains(&creds.secret_access_key), "{out}");
        assert!(!out.contains(&creds.token), "{out}");
        assert!(!out.contains("fake-secret") && !out.contains("fake-token"));
    }
    assert!(text.contains("team/web: would be served"), "{text}");
}

#[tokio::test]
async fn no_pod() {
    let c = Cluster::start(&[]).await;
    c.namespace("team", Some(ARN_WEB));
    let e = explain(&c, "team", "ghost").await;
    let s = failed(&e);
    assert_eq!(s.name, "pod");
    assert_eq!(s.summary, "no pod team/ghost");
    assert_eq!(e.steps.len(), 1);
    json_of(&e);

    let e = explain_ip(&c, "198.18.9.9").await;
    assert_eq!(failed(&e).summary, "no pod found with IP 198.18.9.9");
}

#[tokio::test]
async fn finished_pod() {
    let c = Cluster::start(&[]).await;
    c.namespace("team", Some(ARN_WEB));
    c.api
        .apply_pod(pod_json(
            "team",
            "job",
            "198.18.1.2",
            Some("web"),
            "Succeeded",
        ))
        .unwrap();
    let e = explain(&c, "team", "job").await;
    let s = failed(&e);
    assert_eq!(s.name, "path");
    assert!(
        s.summary.contains("the pod has finished (Succeeded)"),
        "{s:#?}"
    );
    assert_eq!(json_of(&e)["steps"][4]["outcome"], "fail");
}

#[tokio::test]
async fn no_role_annotation() {
    let c = Cluster::start(&[]).await;
    c.namespace("team", Some(ARN_WEB));
    c.pod("team", "web", "198.18.1.3", None);
    let e = explain(&c, "team", "web").await;
    let s = failed(&e);
    assert_eq!(s.name, "role");
    assert_eq!(
        s.summary,
        "the pod has no iam.amazonaws.com/role annotation"
    );
    assert!(s.fix.contains("iam.amazonaws.com/role"));
}

#[tokio::test]
async fn an_invalid_role_annotation_says_why() {
    let c = Cluster::start(&[]).await;
    c.namespace("team", Some(".*"));
    c.pod("team", "web", "198.18.1.10", Some("arn:aws:s3:::bucket"));
    let e = explain(&c, "team", "web").await;
    let s = failed(&e);
    assert_eq!(s.name, "role");
    assert!(s.summary.contains("is not an IAM role ARN"), "{s:#?}");
    assert_eq!(detail(s, "iam.amazonaws.com/role"), "arn:aws:s3:::bucket");
}

#[tokio::test]
async fn an_invalid_namespace_regex_permits_nothing() {
    let c = Cluster::start(&[]).await;
    c.namespace("team", Some("arn:(unclosed"));
    c.pod("team", "web", "198.18.1.11", Some("web"));
    let e = explain(&c, "team", "web").await;
    let s = failed(&e);
    assert_eq!(s.name, "namespace");
    assert!(
        s.summary
            .contains("has an invalid iam.amazonaws.com/permitted regex"),
        "{s:#?}"
    );
    assert_eq!(detail(s, "iam.amazonaws.com/permitted"), "arn:(unclosed");
    assert!(s.fix.contains(&regex::escape(ARN_WEB)), "{}", s.fix);
}

#[tokio::test]
async fn regex_mismatch_shows_the_anchored_regex_and_one_that_matches() {
    let c = Cluster::start(&[]).await;
    // Unanchored this would match `.../web`; the server anchors it.
    c.namespace("team", Some("arn:aws:iam::123456789012:role/we"));
    c.pod("team", "web", "198.18.1.4", Some("web"));
    let e = explain(&c, "team", "web").await;
    let s = failed(&e);
    assert_eq!(s.name, "namespace");
    assert_eq!(
        s.summary,
        format!("namespace team does not permit {ARN_WEB}")
    );
    assert_eq!(
        detail(s, "as applied"),
        "^(?:arn:aws:iam::123456789012:role/we)$"
    );
    assert_eq!(detail(s, "matches"), "no");
    // The fix's regex does match, anchored as the server anchors it.
    let suggested = s.fix.split('\'').nth(1).expect("a quoted regex");
    let re = regex::Regex::new(&format!("^(?:{suggested})$")).unwrap();
    assert!(re.is_match(ARN_WEB), "{suggested}");
    assert!(suggested.starts_with("arn:aws:iam::123456789012:role/we|"));
    assert_eq!(json_of(&e)["steps"][2]["details"]["matches"], "no");
}

#[tokio::test]
async fn namespace_without_permitted_annotation() {
    let c = Cluster::start(&[]).await;
    c.namespace("team", None);
    c.pod("team", "web", "198.18.1.5", Some("web"));
    let e = explain(&c, "team", "web").await;
    let s = failed(&e);
    assert_eq!(s.name, "namespace");
    assert!(
        s.summary
            .contains("has no iam.amazonaws.com/permitted annotation"),
        "{s:#?}"
    );
    assert!(
        s.fix.contains("kubectl annotate namespace team"),
        "{}",
        s.fix
    );
    assert!(s.fix.contains(&regex::escape(ARN_WEB)), "{}", s.fix);
}

#[tokio::test]
async fn sts_access_denied_shows_the_aws_code_and_the_event() {
    let c = Cluster::start(&[]).await;
    c.sts.fail_always(Some(FakeFailure::AccessDenied));
    c.namespace("team", Some(ARN_WEB));
    c.pod("team", "web", "198.18.1.6", Some("web"));
    let mut client = c.ready().await;
    let err = client
        .get_pod_credentials(GetPodCredentialsRequest {
            ip: "198.18.1.6".into(),
            role: "web".into(),
        })
        .await
        .unwrap_err();
    assert!(err.message().contains("AccessDenied"));

    let e = explain(&c, "team", "web").await;
    let s = failed(&e);
    assert_eq!(s.name, "credentials");
    assert_eq!(s.summary, "STS refused the last fetch: AccessDenied");
    assert_eq!(detail(s, "last error code"), "AccessDenied");
    assert_eq!(detail(s, "cached"), "no");
    assert!(s.fix.contains("trust policy"), "{}", s.fix);
    assert!(s.fix.contains(ARN_WEB));
    // The Event the request wrote, as this server counted it.
    assert!(
        e.events
            .iter()
            .any(|ev| ev.reason == "KiamCredentialError" && ev.message.contains("AccessDenied")),
        "{:#?}",
        e.events
    );
    let text = render_text("team/web", &e);
    assert!(text.contains("KiamCredentialError (x"), "{text}");
}

#[tokio::test]
async fn two_pods_on_one_ip() {
    let c = Cluster::start(&[]).await;
    c.namespace("team", Some(ARN_WEB));
    c.pod("team", "web", "198.18.1.7", Some("web"));
    c.pod("team", "twin", "198.18.1.7", Some("web"));
    let e = explain(&c, "team", "web").await;
    let s = failed(&e);
    assert_eq!(s.name, "path");
    assert!(
        s.summary
            .contains("other live pods share its IP (team/twin)"),
        "{s:#?}"
    );

    let e = explain_ip(&c, "198.18.1.7").await;
    let s = failed(&e);
    assert_eq!(s.name, "pod");
    assert!(
        s.summary.starts_with("2 live pods share IP 198.18.1.7"),
        "{s:#?}"
    );
}

#[tokio::test]
async fn host_network_pod() {
    let c = Cluster::start(&[]).await;
    c.namespace("team", Some(ARN_WEB));
    let mut pod = pod_json("team", "node-agent", "10.0.0.1", Some("web"), "Running");
    pod["spec"]["hostNetwork"] = true.into();
    c.api.apply_pod(pod).unwrap();
    let e = explain(&c, "team", "node-agent").await;
    let s = failed(&e);
    assert_eq!(s.name, "path");
    assert!(s.summary.contains("uses the host's network"), "{s:#?}");
    assert_eq!(detail(s, "host network"), "yes");
}

#[tokio::test]
async fn a_terminating_pod_is_served_until_its_deadline_and_says_so() {
    let c = Cluster::start(&[]).await;
    c.namespace("team", Some(ARN_WEB));
    c.pod("team", "web", "198.18.1.8", Some("web"));
    c.ready().await;
    c.api
        .mark_pod_terminating("team", "web", std::time::Duration::from_secs(600))
        .unwrap();
    let mut e = explain(&c, "team", "web").await;
    for _ in 0..200 {
        if detail(step(&e, "pod"), "deletion") != "(none)" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        e = explain(&c, "team", "web").await;
    }
    assert!(e.served, "{e:#?}");
    let path = step(&e, "path");
    assert_eq!(path.outcome, Outcome::Pass as i32);
    assert!(detail(path, "terminating").starts_with("served until "));
}

#[tokio::test]
async fn says_when_the_api_server_disagrees_with_the_cache() {
    let c = Cluster::start(&[]).await;
    c.namespace("team", Some(ARN_WEB));
    c.pod("team", "web", "198.18.1.9", Some("web"));
    c.ready().await;
    // The watch lags: the API server has deleted the pod, the cache has not seen it.
    c.api.hold_watch_events(true);
    c.api.delete_pod("team", "web").unwrap();
    let e = explain(&c, "team", "web").await;
    let pod = step(&e, "pod");
    assert_eq!(pod.outcome, Outcome::Warn as i32, "{e:#?}");
    assert!(
        detail(pod, "API server agrees").starts_with("no: the pod is gone"),
        "{pod:#?}"
    );
    c.api.hold_watch_events(false);
}

#[tokio::test]
async fn before_the_first_sync_says_what_it_waits_for() {
    let api = kiam_sandbox::apiserver::FakeApiServer::start()
        .await
        .unwrap();
    api.set_unavailable(true);
    let c = Cluster::start_with(api, &[]).await;
    let mut client = c.client();
    let req = ExplainRequest {
        namespace: "team".into(),
        name: "web".into(),
        ..Default::default()
    };
    let mut answer = None;
    for _ in 0..100 {
        match client.explain(req.clone()).await {
            Ok(r) => {
                answer = Some(r.into_inner());
                break;
            }
            // The listener may not be up yet.
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(25)).await,
        }
    }
    let e = answer.expect("the server answers explain before it has synced");
    assert!(!e.served);
    assert_eq!(e.waiting_for, ["pods", "namespaces"]);
    assert!(e.steps.is_empty());
    let text = render_text("team/web", &e);
    assert!(
        text.contains("not yet synced (waiting for pods, namespaces)"),
        "{text}"
    );
}

// The CLI as a real process against the in-process server.

/// Runs `kiam explain` without blocking the runtime the server runs on.
async fn run_cli(c: &Cluster, args: &[&str]) -> Output {
    let files = c.pki.agent_files();
    let mut cmd = procs::kiam_bin();
    cmd.arg("explain")
        .arg("--cert")
        .arg(&files.cert)
        .arg("--key")
        .arg(&files.key)
        .arg("--ca")
        .arg(&files.ca)
        .arg("--server-address")
        .arg(format!("localhost:{}", c.addr.port()))
        .args(args);
    tokio::process::Command::from(cmd).output().await.unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[tokio::test]
async fn cli_exit_codes_and_json() {
    let c = Cluster::start(&[]).await;
    c.namespace("team", Some(ARN_WEB));
    c.namespace("closed", None);
    c.pod("team", "web", "198.18.2.1", Some("web"));
    c.pod("closed", "web", "198.18.2.2", Some("web"));
    c.ready().await;

    let o = run_cli(&c, &["team/web"]).await;
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}{}",
        stdout(&o),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(stdout(&o).contains("team/web: would be served"));
    let secret_free = stdout(&o);
    assert!(!secret_free.contains("fake-secret") && !secret_free.contains("fake-token"));

    let o = run_cli(&c, &["closed/web"]).await;
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stdout(&o)
            .contains("[FAIL] namespace: namespace closed has no iam.amazonaws.com/permitted"),
        "{}",
        stdout(&o)
    );

    let o = run_cli(&c, &["--output", "json", "--ip", "198.18.2.2"]).await;
    assert_eq!(o.status.code(), Some(1));
    let json: Value = serde_json::from_slice(&o.stdout).expect("JSON on stdout");
    assert_eq!(json["served"], false);
    assert_eq!(json["pod"], "ip 198.18.2.2");
    assert_eq!(json["steps"][2]["name"], "namespace");
    assert_eq!(json["steps"][2]["outcome"], "fail");

    let o = run_cli(&c, &["--output", "json", "team/web"]).await;
    assert_eq!(o.status.code(), Some(0));
    let json: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(json["served"], true);

    // Usage errors: 64, naming what to fix.
    for (args, says) in [
        (&[][..], "POD"),
        (&["web"][..], "namespace/name"),
        (&["team/web", "--ip", "198.18.2.1"][..], "not both"),
        (&["--ip", "nope"][..], "--ip"),
        (&["--output", "yaml", "team/web"][..], "--output"),
    ] {
        let o = run_cli(&c, args).await;
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(64), "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
    }
}

/// A server that predates explain, as Go kiam does: UNIMPLEMENTED.
struct Old;

#[tonic::async_trait]
impl kiam::proto::kiam_service_server::KiamService for Old {
    async fn get_pod_role(
        &self,
        _: tonic::Request<kiam::proto::GetPodRoleRequest>,
    ) -> Result<tonic::Response<kiam::proto::Role>, tonic::Status> {
        Err(tonic::Status::unimplemented(""))
    }
    async fn get_pod_credentials(
        &self,
        _: tonic::Request<GetPodCredentialsRequest>,
    ) -> Result<tonic::Response<kiam::proto::Credentials>, tonic::Status> {
        Err(tonic::Status::unimplemented(""))
    }
    async fn get_health(
        &self,
        _: tonic::Request<kiam::proto::GetHealthRequest>,
    ) -> Result<tonic::Response<kiam::proto::HealthStatus>, tonic::Status> {
        Err(tonic::Status::unimplemented(""))
    }
    async fn explain(
        &self,
        _: tonic::Request<ExplainRequest>,
    ) -> Result<tonic::Response<Explanation>, tonic::Status> {
        Err(tonic::Status::unimplemented(
            "unknown method Explain for service kiam.KiamService",
        ))
    }
    async fn get_token_credentials(
        &self,
        _: tonic::Request<kiam::proto::GetTokenCredentialsRequest>,
    ) -> Result<tonic::Response<kiam::proto::TokenCredentials>, tonic::Status> {
        Err(tonic::Status::unimplemented("token credentials"))
    }
}

#[tokio::test]
async fn cli_against_a_server_without_explain() {
    let dir = tempfile::tempdir().unwrap();
    let pki = kiam::certs::generate(dir.path(), &[], 1).unwrap();
    let mut registry = prometheus_client::registry::Registry::default();
    let tls = kiam::tls::ServerTls::load(pki.server_files(), &mut registry).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let incoming = kiam::tls::incoming(listener, tls);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(kiam::proto::kiam_service_server::KiamServiceServer::new(
                Old,
            ))
            .serve_with_incoming(incoming),
    );
    let files = pki.agent_files();
    let mut cmd = procs::kiam_bin();
    cmd.args(["explain", "--server-address", &format!("localhost:{port}")])
        .arg("--cert")
        .arg(&files.cert)
        .arg("--key")
        .arg(&files.key)
        .arg("--ca")
        .arg(&files.ca)
        .arg("team/web");
    let o = tokio::process::Command::from(cmd).output().await.unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("does not support explain"), "{err}");
    assert!(o.stdout.is_empty());
}

#[test]
fn base_arn_matches_the_fixture() {
    assert_eq!(format!("{BASE_ARN}web"), ARN_WEB);
}

/// `--agent-metrics`: the agent on the pod's node says whether it requires
/// IMDSv2 (and whether its start-up gate is closed); a real agent process
/// with --require-imdsv2 makes the step a warning, and an address where no
/// agent answers is a warning that says so. The pod is still served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_step_reads_a_real_agents_metrics() {
    let c = Cluster::start(&[]).await;
    c.namespace("team", Some(ARN_WEB));
    c.pod("team", "web", "198.18.2.1", Some("web"));
    c.ready().await;

    let (port, metrics) = (procs::free_port(), procs::free_port());
    let mut cmd = procs::kiam_bin();
    kiam_sandbox::procs::agent_args(
        &mut cmd,
        port,
        &format!("localhost:{}", c.addr.port()),
        "http://127.0.0.1:9",
        &c.pki.dir,
    )
    .args(["--host", "127.0.0.1", "--require-imdsv2"])
    .arg(format!("--prometheus-listen-addr=127.0.0.1:{metrics}"));
    let _agent = kiam_sandbox::procs::ChildGuard::spawn("kiam agent", cmd).unwrap();
    assert!(
        kiam_sandbox::procs::wait_for_port(metrics, std::time::Duration::from_secs(20)),
        "the agent never served metrics"
    );

    let url = format!("http://127.0.0.1:{metrics}/metrics");
    let o = run_cli(
        &c,
        &["--output", "json", "--agent-metrics", &url, "team/web"],
    )
    .await;
    assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
    let json: Value = serde_json::from_slice(&o.stdout).unwrap();
    let steps = json["steps"].as_array().unwrap();
    let agent = steps.last().unwrap();
    assert_eq!(agent["name"], "agent", "{json}");
    assert_eq!(agent["outcome"], "warn", "{agent}");
    assert!(
        agent["summary"]
            .as_str()
            .unwrap()
            .contains("--require-imdsv2"),
        "{agent}"
    );
    assert_eq!(json["served"], true);

    let nobody = format!("http://127.0.0.1:{}/metrics", procs::free_port());
    let o = run_cli(&c, &["--agent-metrics", &nobody, "team/web"]).await;
    assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
    assert!(
        stdout(&o).contains("[warn] agent: could not read the agent's metrics"),
        "{}",
        stdout(&o)
    );
}
