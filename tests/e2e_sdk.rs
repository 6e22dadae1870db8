//! End to end: real, unmodified AWS SDK clients inside sandbox Pods get their
//! Pod's credentials from the real `kiam agent` and `kiam server` processes.
//!
//! Every client runs inside a Pod's network namespace with no AWS or kiam
//! configuration at all: it finds 169.254.169.254 on its own, and only the
//! agent's iptables rule on the (isolated) node sends it to the agent. The
//! node's own metadata service answers at that same address on the node, so
//! a missing or wrong rule would hand a Pod the node's role — which every
//! case checks never happens.
//!
//! Which IMDS version a client used is not left to chance: a Pod's own
//! `OUTPUT` chain can refuse (TCP reset) any metadata GET without an
//! `x-aws-ec2-metadata-token` header, so a client there can only succeed over
//! IMDSv2; or refuse `PUT /latest/api/token`, so botocore's token request
//! fails and it must fall back to IMDSv1 (its documented behaviour on a
//! connection error). Each case first checks with curl that its rule does
//! exactly that.
//!
//! One sandbox serves the whole file (one test running the cases in order,
//! each reported separately) to stay fast. Root only: otherwise it says
//! SKIPPED. A missing client (python with boto3, the AWS CLI, node with
//! tests/js installed) is SKIPPED too, except under CI (`CI` set), where
//! scripts/test.sh has installed them all and a missing one fails. Without
//! kubectl, its annotate request is sent with curl instead (loudly).

use std::io::Write as _;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[path = "support/clients.rs"]
mod clients;

use clients::run_json;
use kiam_sandbox::sandbox::{
    NetworkChoice, Sandbox, SandboxOptions, SandboxPod, StsChoice, REGION,
};
use serde_json::Value;

const CREDENTIALS: &str = "/latest/meta-data/iam/security-credentials/";
const ACCOUNT: &str = "123456789012";

/// The cluster this file needs, independent of the demo seed.
const SEED: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: e2e
  annotations:
    iam.amazonaws.com/permitted: "arn:aws:iam::123456789012:role/e2e-.*"
---
apiVersion: v1
kind: Namespace
metadata:
  # No iam.amazonaws.com/permitted: nothing is permitted here.
  name: locked
"#;

/// Refuses metadata GETs that carry no IMDSv2 token, with a TCP reset.
#[rustfmt::skip]
const REQUIRE_TOKEN: &[&str] = &[
    "-I", "OUTPUT", "-p", "tcp", "-d", "169.254.169.254", "--dport", "80",
    "-m", "string", "--algo", "bm", "--string", "GET ",
    "-m", "string", "--algo", "bm", "--icase", "!", "--string", "x-aws-ec2-metadata-token:",
    "-j", "REJECT", "--reject-with", "tcp-reset",
];

/// Refuses the IMDSv2 token request, with a TCP reset.
#[rustfmt::skip]
const REFUSE_TOKEN: &[&str] = &[
    "-I", "OUTPUT", "-p", "tcp", "-d", "169.254.169.254", "--dport", "80",
    "-m", "string", "--algo", "bm", "--string", "PUT /latest/api/token",
    "-j", "REJECT", "--reject-with", "tcp-reset",
];

/// Says something past libtest's output capture.
fn say(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

fn on_ci() -> bool {
    std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "false")
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs the cases and collects their outcomes.
struct Suite {
    failures: Vec<String>,
    /// Everything the clients printed, to search for the node's secrets.
    outputs: Vec<String>,
}

impl Suite {
    fn case(&mut self, name: &str, f: impl FnOnce(&mut Vec<String>) -> Result<(), String>) {
        let started = Instant::now();
        let mut outputs = Vec::new();
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| f(&mut outputs))).unwrap_or_else(
            |panic| {
                Err(panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "panicked".into()))
            },
        );
        self.outputs.extend(outputs);
        match result {
            Ok(()) => say(&format!(
                "e2e: {name} ... ok ({:.1}s)",
                started.elapsed().as_secs_f64()
            )),
            Err(e) if e.starts_with("SKIPPED") => say(&format!("e2e: {name} ... {e}")),
            Err(e) => {
                say(&format!("e2e: {name} ... FAILED: {e}"));
                self.failures.push(format!("{name}: {e}"));
            }
        }
    }
}

/// "SKIPPED: ..." (reported, not a failure), or a failure under CI.
fn missing(what: &str) -> String {
    if on_ci() {
        format!("{what} (CI must have every client: scripts/test.sh installs them)")
    } else {
        format!("SKIPPED: {what}")
    }
}

/// The clients and how to run them.
struct Clients {
    /// A python that imports boto3 (and maybe awscli).
    python: Option<PathBuf>,
    /// How to run the AWS CLI.
    aws: Option<Vec<String>>,
    /// node, when tests/js has its packages installed.
    node: Option<PathBuf>,
    kubectl: bool,
    /// Empty AWS config and credentials files, so a developer's ~/.aws
    /// cannot leak in.
    aws_home: tempfile::TempDir,
}

fn works(program: &Path, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

impl Clients {
    fn find() -> Clients {
        let venv = repo().join(".venv/bin");
        let python = [venv.join("python"), PathBuf::from("python3")]
            .into_iter()
            .find(|p| works(p, &["-c", "import boto3"]));
        let aws = match &python {
            Some(py) if works(py, &["-c", "import awscli"]) => {
                Some(vec![py.display().to_string(), "-m".into(), "awscli".into()])
            }
            _ => [venv.join("aws"), PathBuf::from("aws")]
                .into_iter()
                .find(|p| works(p, &["--version"]))
                .map(|p| vec![p.display().to_string()]),
        };
        let node = Some(PathBuf::from("node")).filter(|n| {
            works(n, &["--version"])
                && repo()
                    .join("tests/js/node_modules/@aws-sdk/credential-providers")
                    .is_dir()
        });
        let kubectl = works(Path::new("kubectl"), &["version", "--client"]);
        let aws_home = tempfile::tempdir().unwrap();
        std::fs::write(aws_home.path().join("config"), "").unwrap();
        std::fs::write(aws_home.path().join("credentials"), "").unwrap();
        Clients {
            python,
            aws,
            node,
            kubectl,
            aws_home,
        }
    }

    /// `ip netns exec <pod> <argv>` with a clean environment: PATH and HOME
    /// (pyenv shims need them) and empty AWS files; nothing about AWS or kiam.
    fn in_pod(&self, pod: &SandboxPod, argv: &[String]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args([
            "netns",
            "exec",
            pod.netns.as_deref().expect("namespace mode"),
        ])
        .args(argv)
        .env_clear()
        .env("LANG", "C.UTF-8")
        .env("AWS_CONFIG_FILE", self.aws_home.path().join("config"))
        .env(
            "AWS_SHARED_CREDENTIALS_FILE",
            self.aws_home.path().join("credentials"),
        );
        for key in ["PATH", "HOME", "PYENV_ROOT"] {
            if let Some(value) = std::env::var_os(key) {
                cmd.env(key, value);
            }
        }
        cmd
    }
}

/// The assumed-role ARN the server's session for `role` has.
fn assumed_role_prefix(role: &str) -> String {
    format!("arn:aws:sts::{ACCOUNT}:assumed-role/{role}/")
}

/// Waits until the agent serves the Pod credentials for `role` (the server
/// prefetches them when the Pod appears). The SDKs' metadata timeouts are
/// about a second, so a client started before the first STS call finished
/// on a slow machine would test the machine, not the SDK.
fn warm(sandbox: &Sandbox, pod: &SandboxPod, role: &str) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = Err(String::new());
    while Instant::now() < deadline {
        last = sandbox.metadata_get(pod, &format!("{CREDENTIALS}{role}"));
        if matches!(&last, Ok((200, _))) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(format!(
        "the agent never served {role} to {}: {last:?}",
        pod.name
    ))
}

/// curl inside the Pod: Ok(status) or the connection error.
fn curl(pod: &SandboxPod, args: &[&str]) -> Result<u16, String> {
    let out = Command::new("ip")
        .args(["netns", "exec", pod.netns.as_deref().unwrap()])
        .args([
            "curl",
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "5",
        ])
        .args(args)
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or(0))
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

const TOKEN_PUT: [&str; 4] = [
    "-X",
    "PUT",
    "-H",
    "x-aws-ec2-metadata-token-ttl-seconds: 60",
];

/// Checks a Pod's rule: whether tokenless GETs and token PUTs get through.
fn check_rule(pod: &SandboxPod, tokenless_get: bool, token_put: bool) -> Result<(), String> {
    let url = "http://169.254.169.254/latest/api/token";
    let put = curl(pod, &[&TOKEN_PUT[..], &[url]].concat());
    if put.is_ok() != token_put {
        return Err(format!(
            "token PUT in {}: expected through={token_put}, got {put:?}",
            pod.name
        ));
    }
    let get = curl(pod, &[&format!("http://169.254.169.254{CREDENTIALS}")]);
    if get.is_ok() != tokenless_get {
        return Err(format!(
            "tokenless GET in {}: expected through={tokenless_get}, got {get:?}",
            pod.name
        ));
    }
    Ok(())
}

/// boto3's default credential chain and STS GetCallerIdentity, as JSON.
const BOTO_SCRIPT: &str = r#"
import json, sys, boto3
session = boto3.Session(region_name=sys.argv[2])
creds = session.get_credentials()
if creds is None:
    print(json.dumps({"method": None}))
    sys.exit(0)
frozen = creds.get_frozen_credentials()
arn = session.client("sts", endpoint_url=sys.argv[1]).get_caller_identity()["Arn"]
print(json.dumps({"method": creds.method, "access_key": frozen.access_key, "arn": arn}))
"#;

fn boto(
    clients: &Clients,
    sandbox: &Sandbox,
    pod: &SandboxPod,
    outputs: &mut Vec<String>,
) -> Result<Value, String> {
    let python = clients
        .python
        .as_ref()
        .ok_or_else(|| missing("python with boto3"))?;
    let argv = [
        python.display().to_string(),
        "-c".into(),
        BOTO_SCRIPT.into(),
        sandbox.endpoints().sts_for_pods.clone(),
        REGION.into(),
    ];
    run_json(clients.in_pod(pod, &argv), outputs)
}

fn expect_role(answer: &Value, role: &str) -> Result<(), String> {
    let arn = answer["arn"].as_str().unwrap_or_default();
    if !arn.starts_with(&assumed_role_prefix(role)) {
        return Err(format!(
            "expected the assumed-role ARN of {role}, got {answer}"
        ));
    }
    Ok(())
}

/// aws-config's IMDS provider from a thread inside the Pod's namespace, then
/// aws-sdk-sts GetCallerIdentity with what it got. `ipv6`: the IMDS client
/// in IPv6 endpoint mode (`[fd00:ec2::254]`), as
/// `AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE=IPv6` selects.
fn rust_sdk(pod: &SandboxPod, sts: &str, ipv6: bool) -> Result<(String, String), String> {
    let netns = pod.netns_handle().expect("namespace mode");
    let sts = sts.to_string();
    std::thread::spawn(move || {
        let _inside = netns.enter().map_err(|e| e.to_string())?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        rt.block_on(async {
            use aws_config::imds::credentials::ImdsCredentialsProvider;
            use aws_sdk_sts::config::ProvideCredentials;
            let imds = if ipv6 {
                aws_config::imds::Client::builder()
                    .endpoint_mode(aws_config::imds::client::EndpointMode::IpV6)
                    .build()
            } else {
                aws_config::imds::Client::builder()
                    .endpoint("http://169.254.169.254")
                    .map_err(|e| e.to_string())?
                    .build()
            };
            let provider = ImdsCredentialsProvider::builder().imds_client(imds).build();
            let creds = provider
                .provide_credentials()
                .await
                .map_err(|e| format!("ImdsCredentialsProvider: {e:?}"))?;
            let config = aws_sdk_sts::Config::builder()
                .behavior_version(aws_sdk_sts::config::BehaviorVersion::latest())
                .region(aws_sdk_sts::config::Region::new(REGION))
                .endpoint_url(sts)
                .credentials_provider(creds.clone())
                .build();
            let identity = aws_sdk_sts::Client::from_conf(config)
                .get_caller_identity()
                .send()
                .await
                .map_err(|e| format!("GetCallerIdentity: {e:?}"))?;
            Ok((
                creds.access_key_id().to_string(),
                identity.arn().unwrap_or_default().to_string(),
            ))
        })
    })
    .join()
    .map_err(|_| "the Rust SDK thread panicked".to_string())?
}

#[test]
fn real_sdk_clients_get_their_pods_credentials() {
    if !kiam_sandbox::netns::is_root() {
        say("SKIPPED: real_sdk_clients_get_their_pods_credentials: network namespaces and iptables require root");
        return;
    }
    if let Err(e) = kiam_sandbox::netns::check_prerequisites() {
        panic!("{e} (scripts/test.sh installs it)");
    }
    let started = Instant::now();
    let sandbox = Sandbox::start(SandboxOptions {
        seed_yaml: SEED.into(),
        seed_name: "tests/e2e_sdk.rs".into(),
        kiam: Some(PathBuf::from(env!("CARGO_BIN_EXE_kiam"))),
        sts: StsChoice::Auto,
        network: NetworkChoice::Namespaces,
        kubelet: false,
        ..SandboxOptions::default()
    })
    .unwrap_or_else(|e| panic!("sandbox: {e}"));
    say(&format!(
        "e2e: sandbox up in {:.1}s ({:?} STS)",
        started.elapsed().as_secs_f64(),
        sandbox.sts_kind()
    ));
    let clients = Clients::find();
    let add = |name: &str, role: &str| {
        let ns = if name == "denied" { "locked" } else { "e2e" };
        sandbox
            .add_pod(ns, name, Some(role))
            .unwrap_or_else(|e| panic!("adding pod {name}: {e}"))
    };
    let boto_v2 = add("boto-v2", "e2e-boto-v2");
    let boto_v1 = add("boto-v1", "e2e-boto-v1");
    let cli = add("cli", "e2e-cli");
    let js = add("js", "e2e-js");
    let rust = add("rust", "e2e-rust");
    let switch = add("switch", "e2e-first");
    let denied = add("denied", "e2e-denied");
    let mut suite = Suite {
        failures: Vec::new(),
        outputs: Vec::new(),
    };

    suite.case("boto3 over IMDSv2 (tokenless GETs refused)", |outputs| {
        warm(&sandbox, &boto_v2, "e2e-boto-v2")?;
        pod_iptables(&boto_v2, REQUIRE_TOKEN)?;
        check_rule(&boto_v2, false, true)?;
        let answer = boto(&clients, &sandbox, &boto_v2, outputs)?;
        if answer["method"] != "iam-role" {
            return Err(format!(
                "botocore did not use the instance metadata: {answer}"
            ));
        }
        expect_role(&answer, "e2e-boto-v2")
    });

    suite.case("boto3 over IMDSv1 (token request refused)", |outputs| {
        warm(&sandbox, &boto_v1, "e2e-boto-v1")?;
        pod_iptables(&boto_v1, REFUSE_TOKEN)?;
        check_rule(&boto_v1, true, false)?;
        let answer = boto(&clients, &sandbox, &boto_v1, outputs)?;
        if answer["method"] != "iam-role" {
            return Err(format!(
                "botocore did not use the instance metadata: {answer}"
            ));
        }
        expect_role(&answer, "e2e-boto-v1")
    });

    suite.case("AWS CLI sts get-caller-identity", |outputs| {
        let aws = clients.aws.as_ref().ok_or_else(|| missing("the AWS CLI"))?;
        warm(&sandbox, &cli, "e2e-cli")?;
        let mut argv = aws.clone();
        argv.extend(
            [
                "sts",
                "get-caller-identity",
                "--region",
                REGION,
                "--endpoint-url",
                &sandbox.endpoints().sts_for_pods,
                "--output",
                "json",
            ]
            .map(String::from),
        );
        let answer = run_json(clients.in_pod(&cli, &argv), outputs)?;
        let arn = answer["Arn"].as_str().unwrap_or_default();
        if !arn.starts_with(&assumed_role_prefix("e2e-cli")) {
            return Err(format!(
                "expected the assumed-role ARN of e2e-cli, got {answer}"
            ));
        }
        Ok(())
    });

    suite.case(
        "JavaScript SDK v3 fromInstanceMetadata over IMDSv2",
        |outputs| {
            let node = clients
                .node
                .as_ref()
                .ok_or_else(|| missing("node with tests/js installed (npm install in tests/js)"))?;
            warm(&sandbox, &js, "e2e-js")?;
            pod_iptables(&js, REQUIRE_TOKEN)?;
            check_rule(&js, false, true)?;
            let argv = [
                node.display().to_string(),
                repo()
                    .join("tests/js/imds-credentials.mjs")
                    .display()
                    .to_string(),
                sandbox.endpoints().sts_for_pods.clone(),
            ];
            let answer = run_json(clients.in_pod(&js, &argv), outputs)?;
            expect_role(&answer, "e2e-js")
        },
    );

    suite.case(
        "Rust aws-config ImdsCredentialsProvider (IMDSv2 only)",
        |outputs| {
            warm(&sandbox, &rust, "e2e-rust")?;
            let (key, arn) = rust_sdk(&rust, &sandbox.endpoints().sts_for_pods, false)?;
            outputs.push(format!("{key} {arn}"));
            if !arn.starts_with(&assumed_role_prefix("e2e-rust")) {
                return Err(format!(
                    "expected the assumed-role ARN of e2e-rust, got {arn}"
                ));
            }
            Ok(())
        },
    );

    suite.case("a forbidden role gets nothing and an Event", |outputs| {
        let (status, body) = sandbox.metadata_get(&denied, &format!("{CREDENTIALS}e2e-denied"))?;
        outputs.push(body.clone());
        if status == 200 || body.contains("AccessKeyId") {
            return Err(format!(
                "the agent served a forbidden role: {status} {body}"
            ));
        }
        if clients.python.is_some() {
            let answer = boto(&clients, &sandbox, &denied, outputs)?;
            if !answer["method"].is_null() {
                return Err(format!(
                    "boto3 found credentials in a forbidden Pod: {answer}"
                ));
            }
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let found = sandbox.api().events("locked").iter().any(|e| {
                e["reason"] == "KiamRoleForbidden"
                    && (e["involvedObject"]["name"] == "denied"
                        || e["regarding"]["name"] == "denied")
            });
            if found {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "no KiamRoleForbidden event on locked/denied; events: {:?}",
                    sandbox.api().events("locked")
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    });

    suite.case("kubectl annotate changes the role a Pod gets", |outputs| {
        warm(&sandbox, &switch, "e2e-first")?;
        let before = boto(&clients, &sandbox, &switch, outputs)?;
        expect_role(&before, "e2e-first")?;
        annotate(&sandbox, clients.kubectl, "e2e", "switch", "e2e-second")?;
        // The server learns of the change through its watch.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match sandbox.metadata_get(&switch, CREDENTIALS) {
                Ok((200, role)) if role == "e2e-second" => break,
                other if Instant::now() > deadline => {
                    return Err(format!("the Pod's role never changed: {other:?}"))
                }
                _ => std::thread::sleep(Duration::from_millis(100)),
            }
        }
        warm(&sandbox, &switch, "e2e-second")?;
        let after = boto(&clients, &sandbox, &switch, outputs)?;
        expect_role(&after, "e2e-second")
    });

    suite.case("the node's role never reached a Pod", |_| {
        let node = sandbox.node_metadata();
        if node.node_credentials_served() != 0 {
            return Err(format!(
                "the node's metadata service handed out its role {} times",
                node.node_credentials_served()
            ));
        }
        Ok(())
    });
    let leaked: Vec<&String> = suite
        .outputs
        .iter()
        .filter(|o| {
            sandbox
                .node_metadata()
                .node()
                .markers()
                .iter()
                .any(|m| o.contains(m))
        })
        .collect();
    if !leaked.is_empty() {
        suite
            .failures
            .push(format!("a client saw the node's role: {leaked:?}"));
    }
    if let Err(e) = sandbox.check() {
        suite.failures.push(format!("a sandbox process died: {e}"));
    }
    say(&format!(
        "e2e: done in {:.1}s",
        started.elapsed().as_secs_f64()
    ));
    drop(sandbox);
    assert!(
        suite.failures.is_empty(),
        "{} case(s) failed:\n{}",
        suite.failures.len(),
        suite.failures.join("\n")
    );
}

fn pod_iptables(pod: &SandboxPod, rule: &[&str]) -> Result<(), String> {
    let ns = kiam_sandbox::netns::NetNs::named(pod.netns.clone().unwrap());
    let mut args = vec!["iptables", "-w", "5"];
    args.extend(rule);
    let out = ns.exec(&args).map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "iptables {rule:?} in {}: {} (the kernel needs the xt_string match)",
            pod.name,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// `kubectl annotate --overwrite`, or (kubectl missing, which no install
/// step provides) the same merge patch sent with curl, said loudly.
fn annotate(
    sandbox: &Sandbox,
    kubectl: bool,
    namespace: &str,
    pod: &str,
    role: &str,
) -> Result<(), String> {
    let out = if kubectl {
        Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(sandbox.kubeconfig())
            .args(["-n", namespace, "annotate", "--overwrite", "pod", pod])
            .arg(format!("iam.amazonaws.com/role={role}"))
            .output()
    } else {
        say("e2e: NOTE: kubectl not found; sending kubectl's merge patch with curl instead");
        Command::new("curl")
            .args(["-sS", "--fail", "-X", "PATCH"])
            .args(["-H", "Content-Type: application/merge-patch+json"])
            .args([
                "-d",
                &format!(
                    r#"{{"metadata":{{"annotations":{{"iam.amazonaws.com/role":"{role}"}}}}}}"#
                ),
            ])
            .arg(format!(
                "{}/api/v1/namespaces/{namespace}/pods/{pod}",
                sandbox.endpoints().api
            ))
            .output()
    }
    .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "annotate: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Without namespaces (any user): the sandbox falls back to loopback and
/// `--allow-ip-query`, and the built-in STS stands in for moto. The real
/// server's Rust SDK and botocore both speak to that emulator, and
/// GetCallerIdentity answers with the assumed role of the key it issued.
#[test]
fn loopback_sandbox_with_the_built_in_sts() {
    let sandbox = Sandbox::start(SandboxOptions {
        seed_yaml: SEED.into(),
        seed_name: "tests/e2e_sdk.rs".into(),
        kiam: Some(PathBuf::from(env!("CARGO_BIN_EXE_kiam"))),
        sts: StsChoice::BuiltIn,
        network: NetworkChoice::Loopback,
        kubelet: false,
        ..SandboxOptions::default()
    })
    .unwrap_or_else(|e| panic!("sandbox: {e}"));
    assert_eq!(sandbox.mode(), kiam_sandbox::sandbox::Mode::Loopback);
    let sts = sandbox.builtin_sts().expect("the built-in STS runs");
    let reader = sandbox
        .add_pod("e2e", "reader", Some("e2e-reader"))
        .unwrap();
    let denied = sandbox
        .add_pod("locked", "denied", Some("e2e-denied"))
        .unwrap();
    assert_eq!(reader.netns, None);

    warm(&sandbox, &reader, "e2e-reader").unwrap();
    let (status, body) = sandbox
        .metadata_get(&reader, &format!("{CREDENTIALS}e2e-reader"))
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let creds: Value = serde_json::from_str(&body).unwrap();
    let key = creds["AccessKeyId"].as_str().unwrap();
    let identity = sts.identity(key).expect("the emulator issued this key");
    assert!(
        identity.arn.starts_with(&assumed_role_prefix("e2e-reader")),
        "{identity:?}"
    );
    let call = sts
        .assume_role_calls()
        .into_iter()
        .find(|c| c.role_arn == format!("arn:aws:iam::{ACCOUNT}:role/e2e-reader"))
        .expect("the server assumed the Pod's role");
    assert_eq!(call.session_name, "kiam-kiam");

    let (status, body) = sandbox
        .metadata_get(&denied, &format!("{CREDENTIALS}e2e-denied"))
        .unwrap();
    assert_ne!(status, 200, "{body}");
    assert!(!body.contains("AccessKeyId"));
    assert!(
        !sts.assume_role_calls()
            .iter()
            .any(|c| c.role_arn.ends_with("/e2e-denied")),
        "a forbidden role must not even be assumed"
    );

    // botocore signs with the Pod's temporary credentials; the emulator
    // knows whose they are.
    let clients = Clients::find();
    let Some(python) = clients.python.as_ref() else {
        say(&missing(
            "python with boto3: botocore against the built-in STS",
        ));
        assert!(!on_ci(), "python with boto3 is missing");
        return;
    };
    let script = r#"
import boto3, sys
print(boto3.client("sts", endpoint_url=sys.argv[1], region_name="us-east-1",
      aws_access_key_id=sys.argv[2], aws_secret_access_key=sys.argv[3],
      aws_session_token=sys.argv[4]).get_caller_identity()["Arn"])
"#;
    let out = Command::new(python)
        .args(["-c", script, &sandbox.endpoints().sts])
        .args([
            key,
            creds["SecretAccessKey"].as_str().unwrap(),
            creds["Token"].as_str().unwrap(),
        ])
        .env("AWS_CONFIG_FILE", clients.aws_home.path().join("config"))
        .env(
            "AWS_SHARED_CREDENTIALS_FILE",
            clients.aws_home.path().join("credentials"),
        )
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), identity.arn);
}

/// EC2's IPv6 metadata endpoint, as the SDKs spell it in IPv6 mode.
const METADATA_V6: &str = "http://[fd00:ec2::254]";

/// Refuses TCP to 169.254.169.254 from a Pod, so its clients can only have
/// succeeded over IPv6.
#[rustfmt::skip]
const NO_IPV4_METADATA: &[&str] = &[
    "-I", "OUTPUT", "-p", "tcp", "-d", "169.254.169.254", "-j", "REJECT", "--reject-with", "tcp-reset",
];

/// Deletes the Pod's [`NO_IPV4_METADATA`] rule.
fn lift_ipv4_block(pod: &SandboxPod) -> Result<(), String> {
    let ns = kiam_sandbox::netns::NetNs::named(pod.netns.clone().unwrap());
    let mut delete = vec!["iptables", "-w", "5", "-D", "OUTPUT"];
    delete.extend(&NO_IPV4_METADATA[2..]);
    let out = ns.exec(&delete).map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
    }
    Ok(())
}

/// curl inside the Pod: Ok((status, body)) or the connection error.
fn curl_body(pod: &SandboxPod, args: &[&str]) -> Result<(u16, String), String> {
    let out = Command::new("ip")
        .args(["netns", "exec", pod.netns.as_deref().unwrap()])
        .args(["curl", "-gsS", "-w", "\n%{http_code}", "--max-time", "5"])
        .args(args)
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
    }
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    Ok((code.trim().parse().unwrap_or(0), body.to_string()))
}

/// [`warm`] over IPv6: until the agent serves `role` at `[fd00:ec2::254]`.
fn warm_v6(pod: &SandboxPod, role: &str) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = Err(String::new());
    while Instant::now() < deadline {
        last = curl_body(pod, &[&format!("{METADATA_V6}{CREDENTIALS}{role}")]);
        if matches!(&last, Ok((200, _))) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(format!(
        "the agent never served {role} to {} over IPv6: {last:?}",
        pod.name
    ))
}

/// A client's command inside the Pod, in the SDKs' IPv6 endpoint mode.
fn ipv6_mode(mut cmd: Command) -> Command {
    cmd.env("AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE", "IPv6");
    cmd
}

/// The node's ip6tables `nat PREROUTING`, as `-S` prints it.
fn ip6_prerouting(sandbox: &Sandbox) -> String {
    let ns = sandbox.node_ns().expect("namespace mode");
    let out = ns
        .exec(&["ip6tables", "-w", "5", "-t", "nat", "-S", "PREROUTING"])
        .expect("ip6tables");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// IPv6 end to end (the behaviour contract, section 6; issue 12): the agent's ip6tables rule
/// sends `[fd00:ec2::254]` to it, botocore, the JavaScript SDK v3 and
/// aws-config in IPv6 endpoint mode get their Pod's credentials, and Pods
/// are identified by any of `status.podIPs`: a dual-stack Pod by its
/// secondary IPv6 address, one with IPv6 first by its primary, and one the
/// API server knows only by IPv6. Every Pod's IPv4 metadata traffic is
/// refused in the Pod, so a client can only have succeeded over IPv6; the
/// node's own metadata service answers at `[fd00:ec2::254]` on the node, so
/// a missing rule would hand out the node's role, which is checked never to
/// happen.
#[test]
fn real_sdk_clients_get_their_pods_credentials_over_ipv6() {
    let test = "real_sdk_clients_get_their_pods_credentials_over_ipv6";
    if !kiam_sandbox::netns::is_root() {
        say(&format!(
            "SKIPPED: {test}: network namespaces and ip6tables require root"
        ));
        return;
    }
    if let Err(e) = kiam_sandbox::netns::check_prerequisites() {
        panic!("{e} (scripts/test.sh installs it)");
    }
    if !kiam_sandbox::netns::on_path("ip6tables") {
        panic!("{test}: ip6tables is not installed: apt-get install iptables");
    }
    let started = Instant::now();
    let sandbox = Sandbox::start(SandboxOptions {
        seed_yaml: SEED.into(),
        seed_name: "tests/e2e_sdk.rs".into(),
        kiam: Some(PathBuf::from(env!("CARGO_BIN_EXE_kiam"))),
        sts: StsChoice::Auto,
        network: NetworkChoice::Namespaces,
        kubelet: false,
        ipv6: true,
        ..SandboxOptions::default()
    })
    .unwrap_or_else(|e| panic!("sandbox: {e}"));
    say(&format!(
        "e2e-ipv6: sandbox up in {:.1}s ({:?} STS)",
        started.elapsed().as_secs_f64(),
        sandbox.sts_kind()
    ));
    let clients = Clients::find();
    // (primary, ipv4_too): how the API server reports the Pod's addresses.
    let add = |name: &str, role: &str, primary: bool, ipv4_too: bool| {
        let pod = sandbox
            .add_pod("e2e", name, Some(role))
            .unwrap_or_else(|e| panic!("adding pod {name}: {e}"));
        let ip6 = sandbox
            .add_ipv6(&pod, primary, ipv4_too)
            .unwrap_or_else(|e| panic!("giving pod {name} IPv6: {e}"));
        (pod, ip6)
    };
    // Dual-stack, IPv4 primary: identified by its secondary address.
    let (boto, _) = add("boto6", "e2e-boto6", false, true);
    // Dual-stack, IPv6 primary.
    let (js, _) = add("js6", "e2e-js6", true, true);
    // IPv6 only, as far as the API server knows.
    let (rust, _) = add("rust6", "e2e-rust6", true, false);
    let mut suite = Suite {
        failures: Vec::new(),
        outputs: Vec::new(),
    };

    suite.case(
        "the ip6tables rule for [fd00:ec2::254] is first",
        |outputs| {
            let listing = ip6_prerouting(&sandbox);
            outputs.push(listing.clone());
            let first = listing
                .lines()
                .find(|l| l.starts_with("-A PREROUTING"))
                .unwrap_or_default();
            if !(first.contains("-d fd00:ec2::254/128")
                && first.contains("--to-destination [2001:2::1]:"))
            {
                return Err(format!("nat PREROUTING:\n{listing}"));
            }
            Ok(())
        },
    );

    suite.case(
        "boto3 in IPv6 mode, dual-stack Pod found by its secondary address",
        |outputs| {
            pod_iptables(&boto, NO_IPV4_METADATA)?;
            warm_v6(&boto, "e2e-boto6")?;
            let answer = boto_in_mode(&clients, &sandbox, &boto, outputs)?;
            if answer["method"] != "iam-role" {
                return Err(format!(
                    "botocore did not use the instance metadata: {answer}"
                ));
            }
            expect_role(&answer, "e2e-boto6")
        },
    );

    suite.case(
        "JavaScript SDK v3 in IPv6 mode, IPv6-primary Pod",
        |outputs| {
            let node = clients
                .node
                .as_ref()
                .ok_or_else(|| missing("node with tests/js installed (npm install in tests/js)"))?;
            pod_iptables(&js, NO_IPV4_METADATA)?;
            warm_v6(&js, "e2e-js6")?;
            let argv = [
                node.display().to_string(),
                repo()
                    .join("tests/js/imds-credentials.mjs")
                    .display()
                    .to_string(),
                sandbox.endpoints().sts_for_pods.clone(),
            ];
            let answer = run_json(ipv6_mode(clients.in_pod(&js, &argv)), outputs)?;
            expect_role(&answer, "e2e-js6")
        },
    );

    suite.case("Rust aws-config in IPv6 mode, IPv6-only Pod", |outputs| {
        pod_iptables(&rust, NO_IPV4_METADATA)?;
        warm_v6(&rust, "e2e-rust6")?;
        let (key, arn) = rust_sdk(&rust, &sandbox.endpoints().sts_for_pods, true)?;
        outputs.push(format!("{key} {arn}"));
        if !arn.starts_with(&assumed_role_prefix("e2e-rust6")) {
            return Err(format!(
                "expected the assumed-role ARN of e2e-rust6, got {arn}"
            ));
        }
        Ok(())
    });

    suite.case(
        "the IPv4 address the API server does not list gets no role",
        |outputs| {
            // rust6's namespace has IPv4 too, but no pod owns that address.
            lift_ipv4_block(&rust)?;
            let (status, body) = sandbox.metadata_get(&rust, CREDENTIALS)?;
            outputs.push(body.clone());
            if status == 200 || body.contains("e2e-rust6") {
                return Err(format!("answered {status}: {body}"));
            }
            Ok(())
        },
    );

    suite.case(
        "an IMDSv2 token from the IPv6 address is refused over IPv4",
        |outputs| {
            let url6 = format!("{METADATA_V6}/latest/api/token");
            let (status, token) = curl_body(&boto, &[&TOKEN_PUT[..], &[url6.as_str()]].concat())?;
            if status != 200 || token.is_empty() {
                return Err(format!("token PUT over IPv6: {status} {token}"));
            }
            let header = format!("x-aws-ec2-metadata-token: {token}");
            let (ok, body) = curl_body(
                &boto,
                &["-H", &header, &format!("{METADATA_V6}{CREDENTIALS}")],
            )?;
            outputs.push(body.clone());
            if ok != 200 || body != "e2e-boto6" {
                return Err(format!("GET over IPv6 with its token: {ok} {body}"));
            }
            // IPv4 from the same (dual-stack) Pod: another caller.
            lift_ipv4_block(&boto)?;
            let (refused, body) = curl_body(
                &boto,
                &[
                    "-H",
                    &header,
                    &format!("http://169.254.169.254{CREDENTIALS}"),
                ],
            )?;
            outputs.push(body.clone());
            if refused != 401 {
                return Err(format!(
                    "GET over IPv4 with the IPv6 token: {refused} {body}"
                ));
            }
            Ok(())
        },
    );

    suite.case("the node's role never reached a Pod", |_| {
        for node in [Some(sandbox.node_metadata()), sandbox.node_metadata_v6()]
            .into_iter()
            .flatten()
        {
            if node.node_credentials_served() != 0 || node.requests() != 0 {
                return Err(format!(
                    "the node's metadata service at {} was asked {} times and handed out its role {} times",
                    node.addr(),
                    node.requests(),
                    node.node_credentials_served()
                ));
            }
        }
        Ok(())
    });
    let leaked: Vec<&String> = suite
        .outputs
        .iter()
        .filter(|o| {
            sandbox
                .node_metadata()
                .node()
                .markers()
                .iter()
                .any(|m| o.contains(m))
        })
        .collect();
    if !leaked.is_empty() {
        suite
            .failures
            .push(format!("a client saw the node's role: {leaked:?}"));
    }
    if let Err(e) = sandbox.check() {
        suite.failures.push(format!("a sandbox process died: {e}"));
    }
    say(&format!(
        "e2e-ipv6: done in {:.1}s",
        started.elapsed().as_secs_f64()
    ));
    drop(sandbox);
    assert!(
        suite.failures.is_empty(),
        "{} case(s) failed:\n{}",
        suite.failures.len(),
        suite.failures.join("\n")
    );
}

/// [`boto`] in IPv6 endpoint mode.
fn boto_in_mode(
    clients: &Clients,
    sandbox: &Sandbox,
    pod: &SandboxPod,
    outputs: &mut Vec<String>,
) -> Result<Value, String> {
    let python = clients
        .python
        .as_ref()
        .ok_or_else(|| missing("python with boto3"))?;
    let argv = [
        python.display().to_string(),
        "-c".into(),
        BOTO_SCRIPT.into(),
        sandbox.endpoints().sts_for_pods.clone(),
        REGION.into(),
    ];
    run_json(ipv6_mode(clients.in_pod(pod, &argv)), outputs)
}

/// A node whose ip6tables has no nat table (a stand-in `ip6tables` on the
/// agent's PATH fails as the real one does there): the agent says so in
/// one log line, keeps running and serves IPv4 Pods; once ip6tables works,
/// its next check puts the rule in place.
#[test]
fn a_node_without_ip6_nat_serves_ipv4_and_says_so_once() {
    let test = "a_node_without_ip6_nat_serves_ipv4_and_says_so_once";
    if !kiam_sandbox::netns::is_root() {
        say(&format!(
            "SKIPPED: {test}: network namespaces and iptables require root"
        ));
        return;
    }
    if let Err(e) = kiam_sandbox::netns::check_prerequisites() {
        panic!("{e} (scripts/test.sh installs it)");
    }
    let bin = tempfile::tempdir().unwrap();
    let fake = bin.path().join("ip6tables");
    std::fs::write(
        &fake,
        "#!/bin/sh\necho \"ip6tables v1.8.9 (nf_tables): can't initialize ip6tables table \\`nat': Table does not exist (do you need to insmod?)\" >&2\nexit 3\n",
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let path = format!(
        "{}:{}",
        bin.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let sandbox = Sandbox::start(SandboxOptions {
        seed_yaml: SEED.into(),
        seed_name: "tests/e2e_sdk.rs".into(),
        kiam: Some(PathBuf::from(env!("CARGO_BIN_EXE_kiam"))),
        sts: StsChoice::BuiltIn,
        network: NetworkChoice::Namespaces,
        kubelet: false,
        ipv6: true,
        agent_env: vec![("PATH".into(), path)],
        ..SandboxOptions::default()
    })
    .unwrap_or_else(|e| panic!("sandbox: {e}"));
    let pod = sandbox.add_pod("e2e", "plain", Some("e2e-plain")).unwrap();
    warm(&sandbox, &pod, "e2e-plain").unwrap();
    // Past one rule check (10s), to see it does not repeat.
    std::thread::sleep(Duration::from_secs(11));
    let (status, body) = sandbox
        .metadata_get(&pod, &format!("{CREDENTIALS}e2e-plain"))
        .unwrap();
    assert_eq!(status, 200, "{body}");
    sandbox.check().expect("the agent keeps running");
    let log = std::fs::read_to_string(sandbox.log_path("kiam-agent")).unwrap();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("ip6tables") || l.contains("IPv6"))
        .collect();
    assert_eq!(lines.len(), 1, "one line about IPv6, got: {lines:#?}");
    assert!(
        lines[0].contains("serving IPv4 only") && lines[0].contains("fd00:ec2::254"),
        "{}",
        lines[0]
    );
    assert!(lines[0].contains("WARN"), "{}", lines[0]);
    say(&format!("e2e-ipv6: the agent's one line: {}", lines[0]));

    // The nat table appears (the stand-in gives way to the real ip6tables):
    // the agent's quiet retry puts the rule in place at its next check.
    let real = [
        "/usr/sbin/ip6tables",
        "/sbin/ip6tables",
        "/usr/bin/ip6tables",
    ]
    .into_iter()
    .find(|p| std::path::Path::new(p).exists())
    .expect("ip6tables is installed");
    std::fs::remove_file(&fake).unwrap();
    std::os::unix::fs::symlink(real, &fake).unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while !ip6_prerouting(&sandbox).contains("fd00:ec2::254") {
        assert!(
            Instant::now() < deadline,
            "the ip6tables rule was never put in place once ip6tables worked"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
