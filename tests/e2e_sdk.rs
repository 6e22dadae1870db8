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
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

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

/// Runs a client with a deadline (a hung client fails its case, not the run).
fn run(mut cmd: Command, outputs: &mut Vec<String>) -> Result<Output, String> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {cmd:?}: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().map_err(|e| e.to_string())?.is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    outputs.push(String::from_utf8_lossy(&out.stdout).into_owned());
    outputs.push(String::from_utf8_lossy(&out.stderr).into_owned());
    Ok(out)
}

/// Runs a client that prints one JSON line; its parsed output.
fn run_json(cmd: Command, outputs: &mut Vec<String>) -> Result<Value, String> {
    let out = run(cmd, outputs)?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        return Err(format!(
            "client failed ({}): {}{}",
            out.status,
            stdout,
            tail(&stderr)
        ));
    }
    serde_json::from_str(stdout.trim())
        .or_else(|_| serde_json::from_str(stdout.trim().lines().last().unwrap_or("")))
        .map_err(|e| format!("client printed {stdout:?} ({e}); stderr: {}", tail(&stderr)))
}

fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
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
/// aws-sdk-sts GetCallerIdentity with what it got.
fn rust_sdk(pod: &SandboxPod, sts: &str) -> Result<(String, String), String> {
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
            let imds = aws_config::imds::Client::builder()
                .endpoint("http://169.254.169.254")
                .map_err(|e| e.to_string())?
                .build();
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
            let (key, arn) = rust_sdk(&rust, &sandbox.endpoints().sts_for_pods)?;
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
