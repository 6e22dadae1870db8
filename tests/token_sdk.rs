//! End to end on the token path: real, unmodified AWS SDK clients inside
//! sandbox Pods get their Pod's role through the container credential
//! provider, `AWS_CONTAINER_CREDENTIALS_FULL_URI=http://169.254.170.23/v1/credentials`
//! and `AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE`, from the real `kiam agent
//! --iptables --iptables-container-credentials` and `kiam server` processes.
//!
//! The token file holds what a kubelet would project: a token the in-memory
//! API server issued for the Pod, audience `kiam`. (The webhook that injects
//! the variables and the volume is tested on its own.) Only the agent's
//! iptables rule sends 169.254.170.23 to the agent: nothing else on the
//! isolated node answers it.
//!
//! Root only (otherwise SKIPPED). A missing client is SKIPPED, except under
//! CI, where scripts/test.sh has installed them all and a missing one fails.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

#[path = "support/clients.rs"]
mod clients;

use clients::run_json;
use kiam_sandbox::sandbox::{
    NetworkChoice, Sandbox, SandboxOptions, SandboxPod, StsChoice, NODE_IP, REGION,
};
use serde_json::{json, Value};

const ACCOUNT: &str = "123456789012";
const FULL_URI: &str = "http://169.254.170.23/v1/credentials";

const SEED: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: tok
  annotations:
    iam.amazonaws.com/permitted: "arn:aws:iam::123456789012:role/tok-.*"
"#;

fn say(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

fn on_ci() -> bool {
    std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "false")
}

fn missing(what: &str) -> String {
    if on_ci() {
        format!("{what} (CI must have every client: scripts/test.sh installs them)")
    } else {
        format!("SKIPPED: {what}")
    }
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn works(program: &Path, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The token a kubelet would project for the Pod (audience `audience`).
fn token(sandbox: &Sandbox, ns: &str, name: &str, audience: &str) -> String {
    let uid = sandbox.api().pod(ns, name).unwrap()["metadata"]["uid"]
        .as_str()
        .unwrap()
        .to_string();
    sandbox
        .api()
        .issue_token(
            ns,
            "default",
            &[audience],
            Some((name, &uid)),
            Duration::from_secs(3600),
        )
        .unwrap()
}

struct Env {
    dir: tempfile::TempDir,
}

impl Env {
    /// The token file and a clean environment for a client: PATH, HOME,
    /// empty AWS files and the two container provider variables.
    fn command(
        &self,
        netns: Option<&str>,
        full_uri: &str,
        token: &str,
        argv: &[String],
    ) -> Command {
        let file = self.dir.path().join(format!("token-{}", rand_suffix()));
        std::fs::write(&file, token).unwrap();
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).args(argv);
                c
            }
            None => {
                let mut c = Command::new(&argv[0]);
                c.args(&argv[1..]);
                c
            }
        };
        cmd.env_clear()
            .env("LANG", "C.UTF-8")
            .env("AWS_CONFIG_FILE", self.dir.path().join("config"))
            .env(
                "AWS_SHARED_CREDENTIALS_FILE",
                self.dir.path().join("credentials"),
            )
            .env("AWS_CONTAINER_CREDENTIALS_FULL_URI", full_uri)
            .env("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", &file)
            // No instance metadata: the chain must not fall back to it.
            .env("AWS_EC2_METADATA_DISABLED", "true");
        for key in ["PATH", "HOME", "PYENV_ROOT"] {
            if let Some(value) = std::env::var_os(key) {
                cmd.env(key, value);
            }
        }
        cmd
    }
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

fn expect_role(arn: &str, role: &str) -> Result<(), String> {
    let prefix = format!("arn:aws:sts::{ACCOUNT}:assumed-role/{role}/");
    if arn.starts_with(&prefix) {
        Ok(())
    } else {
        Err(format!(
            "expected the assumed-role ARN of {role}, got {arn:?}"
        ))
    }
}

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

/// curl inside the Pod with `Authorization: <token>`: (status, body).
fn curl(pod: &SandboxPod, token: &str) -> Result<(u16, String), String> {
    let out = Command::new("ip")
        .args(["netns", "exec", pod.netns.as_deref().unwrap()])
        .args(["curl", "-sS", "--max-time", "5", "-w", "\n%{http_code}"])
        .args(["-H", &format!("Authorization: {token}"), FULL_URI])
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
    }
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", ""));
    Ok((code.trim().parse().unwrap_or(0), body.to_string()))
}

#[test]
fn real_sdk_clients_get_their_pods_role_by_token() {
    if !kiam_sandbox::netns::is_root() {
        say("SKIPPED: real_sdk_clients_get_their_pods_role_by_token: network namespaces and iptables require root");
        return;
    }
    if let Err(e) = kiam_sandbox::netns::check_prerequisites() {
        panic!("{e} (scripts/test.sh installs it)");
    }
    let sandbox = Sandbox::start(SandboxOptions {
        seed_yaml: SEED.into(),
        seed_name: "tests/token_sdk.rs".into(),
        kiam: Some(PathBuf::from(env!("CARGO_BIN_EXE_kiam"))),
        sts: StsChoice::Auto,
        network: NetworkChoice::Namespaces,
        kubelet: false,
        agent_args: vec!["--iptables-container-credentials".into()],
        ..SandboxOptions::default()
    })
    .unwrap_or_else(|e| panic!("sandbox: {e}"));
    let sts = sandbox.endpoints().sts_for_pods.clone();
    let env = Env {
        dir: tempfile::tempdir().unwrap(),
    };
    std::fs::write(env.dir.path().join("config"), "").unwrap();
    std::fs::write(env.dir.path().join("credentials"), "").unwrap();
    let add = |name: &str, role: &str| {
        sandbox
            .add_pod("tok", name, Some(role))
            .unwrap_or_else(|e| panic!("adding pod {name}: {e}"))
    };
    let boto_pod = add("boto", "tok-boto");
    let cli_pod = add("cli", "tok-cli");
    let js_pod = add("js", "tok-js");
    let rust_pod = add("rust", "tok-rust");
    let other = add("other", "tok-other");
    let mut failures: Vec<String> = Vec::new();
    let mut case = |name: &str, result: Result<(), String>| match result {
        Ok(()) => say(&format!("token-sdk: {name} ... ok")),
        Err(e) if e.starts_with("SKIPPED") => say(&format!("token-sdk: {name} ... {e}")),
        Err(e) => {
            say(&format!("token-sdk: {name} ... FAILED: {e}"));
            failures.push(format!("{name}: {e}"));
        }
    };

    // The endpoint itself, with curl: the pod's token gets JSON with the
    // fields the SDKs read; a wrong audience and no token are refused.
    case(
        "curl: 200 with the token, 401 without or with another audience",
        (|| {
            let t = token(&sandbox, "tok", "other", "kiam");
            let (code, body) = curl(&other, &t)?;
            let doc: Value = serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
            if code != 200 || doc["AccountId"] != ACCOUNT || doc["AccessKeyId"].as_str().is_none() {
                return Err(format!("{code} {body}"));
            }
            let exp = doc["Expiration"].as_str().unwrap_or_default();
            exp.parse::<jiff::Timestamp>()
                .map_err(|e| format!("Expiration {exp:?}: {e}"))?;
            let wrong = token(&sandbox, "tok", "other", "sts.amazonaws.com");
            let (code, body) = curl(&other, &wrong)?;
            let doc: Value = serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
            if code != 401 || doc["Code"].as_str().is_none() || doc["Message"].as_str().is_none() {
                return Err(format!("wrong audience: {code} {body}"));
            }
            if body.contains("AccessKeyId") || body.contains("ASIA") {
                return Err(format!("a refusal carried credentials: {body}"));
            }
            let out = Command::new("ip")
                .args(["netns", "exec", other.netns.as_deref().unwrap()])
                .args([
                    "curl",
                    "-sS",
                    "--max-time",
                    "5",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                    FULL_URI,
                ])
                .output()
                .map_err(|e| e.to_string())?;
            match String::from_utf8_lossy(&out.stdout).trim() {
                "401" => Ok(()),
                other => Err(format!("no token: {other}")),
            }
        })(),
    );

    // A token stolen from `boto` and presented from `other`: boto's
    // credentials (one identity, one cached set), never other's.
    case(
        "a stolen token is only the pod it names",
        (|| {
            let key = |pod: &SandboxPod, t: &str| -> Result<String, String> {
                let (code, body) = curl(pod, t)?;
                let doc: Value = serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
                match doc["AccessKeyId"].as_str() {
                    Some(k) if code == 200 => Ok(k.to_string()),
                    _ => Err(format!("{code} {body}")),
                }
            };
            let boto_token = token(&sandbox, "tok", "boto", "kiam");
            let stolen = key(&other, &boto_token)?;
            let own = key(&boto_pod, &boto_token)?;
            let others = key(&other, &token(&sandbox, "tok", "other", "kiam"))?;
            if stolen != own || stolen == others {
                return Err(format!("stolen {stolen}, boto's {own}, other's {others}"));
            }
            Ok(())
        })(),
    );

    case(
        "boto3 (ContainerProvider)",
        (|| {
            let venv = repo().join(".venv/bin/python");
            let python = [venv, PathBuf::from("python3")]
                .into_iter()
                .find(|p| works(p, &["-c", "import boto3"]))
                .ok_or_else(|| missing("python with boto3"))?;
            let t = token(&sandbox, "tok", "boto", "kiam");
            let argv = [
                python.display().to_string(),
                "-c".into(),
                BOTO_SCRIPT.into(),
                sts.clone(),
                REGION.into(),
            ];
            let answer = run_json(
                env.command(boto_pod.netns.as_deref(), FULL_URI, &t, &argv),
                &mut Vec::new(),
            )?;
            if answer["method"] != "container-role" {
                return Err(format!(
                    "botocore did not use the container provider: {answer}"
                ));
            }
            expect_role(answer["arn"].as_str().unwrap_or_default(), "tok-boto")
        })(),
    );

    case(
        "AWS CLI sts get-caller-identity",
        (|| {
            let venv = repo().join(".venv/bin/aws");
            let aws = [venv, PathBuf::from("aws")]
                .into_iter()
                .find(|p| works(p, &["--version"]))
                .ok_or_else(|| missing("the AWS CLI"))?;
            let t = token(&sandbox, "tok", "cli", "kiam");
            let argv: Vec<String> = [
                aws.display().to_string().as_str(),
                "sts",
                "get-caller-identity",
                "--region",
                REGION,
                "--endpoint-url",
                &sts,
                "--output",
                "json",
            ]
            .map(String::from)
            .to_vec();
            let answer = run_json(
                env.command(cli_pod.netns.as_deref(), FULL_URI, &t, &argv),
                &mut Vec::new(),
            )?;
            expect_role(answer["Arn"].as_str().unwrap_or_default(), "tok-cli")
        })(),
    );

    case(
        "JavaScript SDK v3 (default chain, fromHttp)",
        (|| {
            let script = repo().join("tests/js/container-credentials.mjs");
            let ok = works(Path::new("node"), &["--version"])
                && repo()
                    .join("tests/js/node_modules/@aws-sdk/credential-providers")
                    .is_dir();
            if !ok {
                return Err(missing("node with tests/js installed"));
            }
            let t = token(&sandbox, "tok", "js", "kiam");
            let argv = [
                "node".to_string(),
                script.display().to_string(),
                sts.clone(),
            ];
            let answer = run_json(
                env.command(js_pod.netns.as_deref(), FULL_URI, &t, &argv),
                &mut Vec::new(),
            )?;
            expect_role(answer["arn"].as_str().unwrap_or_default(), "tok-js")
        })(),
    );

    case(
        "Rust aws-config (EcsCredentialsProvider)",
        (|| {
            let t = token(&sandbox, "tok", "rust", "kiam");
            let file = env.dir.path().join("rust-token");
            std::fs::write(&file, t).map_err(|e| e.to_string())?;
            let netns = rust_pod.netns_handle().expect("namespace mode");
            let sts = sts.clone();
            let arn = std::thread::spawn(move || -> Result<String, String> {
                let _inside = netns.enter().map_err(|e| e.to_string())?;
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| e.to_string())?;
                rt.block_on(async {
                    use aws_sdk_sts::config::ProvideCredentials;
                    // aws-config reads the process environment; this file's
                    // only test sets it here, and every other client runs as a
                    // child with a cleared environment.
                    std::env::set_var("AWS_CONTAINER_CREDENTIALS_FULL_URI", FULL_URI);
                    std::env::set_var("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", &file);
                    let provider = aws_config::ecs::EcsCredentialsProvider::builder().build();
                    let creds = provider
                        .provide_credentials()
                        .await
                        .map_err(|e| format!("EcsCredentialsProvider: {e:?}"))?;
                    let config = aws_sdk_sts::Config::builder()
                        .behavior_version(aws_sdk_sts::config::BehaviorVersion::latest())
                        .region(aws_sdk_sts::config::Region::new(REGION))
                        .endpoint_url(sts)
                        .credentials_provider(creds)
                        .build();
                    let id = aws_sdk_sts::Client::from_conf(config)
                        .get_caller_identity()
                        .send()
                        .await
                        .map_err(|e| format!("GetCallerIdentity: {e:?}"))?;
                    Ok(id.arn().unwrap_or_default().to_string())
                })
            })
            .join()
            .map_err(|_| "the Rust SDK thread panicked".to_string())??;
            expect_role(&arn, "tok-rust")
        })(),
    );

    // A host-network Pod shares the node's network namespace and address:
    // by address it can never have a role; by token it gets its own.
    case(
        "host-network Pod with boto3",
        (|| {
            let python = [repo().join(".venv/bin/python"), PathBuf::from("python3")]
                .into_iter()
                .find(|p| works(p, &["-c", "import boto3"]))
                .ok_or_else(|| missing("python with boto3"))?;
            sandbox
                .api()
                .apply_pod(json!({
                    "apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": "hostnet", "namespace": "tok",
                                 "annotations": {"iam.amazonaws.com/role": "tok-hostnet"}},
                    "spec": {"hostNetwork": true, "serviceAccountName": "default",
                             "containers": [{"name": "main", "image": "busybox"}]},
                    "status": {"phase": "Running", "podIP": NODE_IP.to_string(),
                               "podIPs": [{"ip": NODE_IP.to_string()}]}
                }))
                .map_err(|e| e.to_string())?;
            let t = token(&sandbox, "tok", "hostnet", "kiam");
            // The agent's port on the node: the target of its DNAT rule.
            let node = sandbox.node_ns().expect("namespace mode");
            let rules = node
                .exec(&["iptables", "-w", "5", "-t", "nat", "-S", "PREROUTING"])
                .map_err(|e| e.to_string())?;
            let rules = String::from_utf8_lossy(&rules.stdout).to_string();
            let port = rules
                .split_whitespace()
                .find_map(|w| w.strip_prefix(&format!("{NODE_IP}:")))
                .ok_or_else(|| format!("no DNAT rule to the agent: {rules}"))?
                .to_string();
            let argv = [
                python.display().to_string(),
                "-c".into(),
                BOTO_SCRIPT.into(),
                sts.clone(),
                REGION.into(),
            ];
            // The sandbox's node has no default route (every real node
            // has one): without a route to 169.254.170.23 the connection
            // fails before nat OUTPUT sees it. Gone with the node's netns.
            let added = node
                .exec(&[
                    "ip",
                    "route",
                    "replace",
                    "169.254.170.23/32",
                    "dev",
                    "lo",
                    "src",
                    &NODE_IP.to_string(),
                ])
                .map_err(|e| e.to_string())?;
            if !added.status.success() {
                return Err(format!(
                    "ip route: {}",
                    String::from_utf8_lossy(&added.stderr)
                ));
            }
            // The same URI as every Pod (the agent's nat OUTPUT rule sends
            // the node's own connections to it), and the agent's port on
            // the node's loopback (for nodes without that rule).
            for uri in [
                FULL_URI.to_string(),
                format!("http://127.0.0.1:{port}/v1/credentials"),
            ] {
                let answer = run_json(
                    env.command(Some(node.name()), &uri, &t, &argv),
                    &mut Vec::new(),
                )
                .map_err(|e| {
                    let show = |cmd: &[&str]| {
                        node.exec(cmd)
                            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                            .unwrap_or_default()
                    };
                    format!(
                        "{uri}: {e}\nnat OUTPUT:\n{}route: {}",
                        show(&["iptables", "-w", "5", "-t", "nat", "-S", "OUTPUT"]),
                        show(&["ip", "route", "get", "169.254.170.23"]),
                    )
                })?;
                expect_role(answer["arn"].as_str().unwrap_or_default(), "tok-hostnet")?;
            }
            Ok(())
        })(),
    );

    drop(sandbox);
    assert!(failures.is_empty(), "failed: {failures:#?}");
}

/// IPv6: the ip6tables rule sends `[fd00:ec2::23]:80` to the agent, and
/// boto3 in an IPv6-only Pod gets its role there.
#[test]
fn ipv6_pods_use_fd00_ec2_23() {
    if !kiam_sandbox::netns::is_root() {
        say("SKIPPED: ipv6_pods_use_fd00_ec2_23: network namespaces and iptables require root");
        return;
    }
    if let Err(e) = kiam_sandbox::netns::check_prerequisites() {
        panic!("{e} (scripts/test.sh installs it)");
    }
    let Some(python) = [repo().join(".venv/bin/python"), PathBuf::from("python3")]
        .into_iter()
        .find(|p| works(p, &["-c", "import boto3"]))
    else {
        let m = missing("python with boto3");
        assert!(m.starts_with("SKIPPED"), "{m}");
        say(&format!("ipv6_pods_use_fd00_ec2_23: {m}"));
        return;
    };
    let sandbox = Sandbox::start(SandboxOptions {
        seed_yaml: SEED.into(),
        seed_name: "tests/token_sdk.rs".into(),
        kiam: Some(PathBuf::from(env!("CARGO_BIN_EXE_kiam"))),
        sts: StsChoice::Auto,
        network: NetworkChoice::Namespaces,
        kubelet: false,
        ipv6: true,
        agent_args: vec!["--iptables-container-credentials".into()],
        ..SandboxOptions::default()
    })
    .unwrap_or_else(|e| panic!("sandbox: {e}"));
    let env = Env {
        dir: tempfile::tempdir().unwrap(),
    };
    std::fs::write(env.dir.path().join("config"), "").unwrap();
    std::fs::write(env.dir.path().join("credentials"), "").unwrap();
    let pod = sandbox.add_pod("tok", "boto6", Some("tok-boto6")).unwrap();
    sandbox.add_ipv6(&pod, true, false).unwrap();
    let t = token(&sandbox, "tok", "boto6", "kiam");
    let argv = [
        python.display().to_string(),
        "-c".into(),
        BOTO_SCRIPT.into(),
        sandbox.endpoints().sts_for_pods.clone(),
        REGION.into(),
    ];
    let uri = "http://[fd00:ec2::23]/v1/credentials";
    let answer = run_json(
        env.command(pod.netns.as_deref(), uri, &t, &argv),
        &mut Vec::new(),
    );
    drop(sandbox);
    let answer = answer.unwrap();
    assert_eq!(answer["method"], "container-role", "{answer}");
    expect_role(answer["arn"].as_str().unwrap_or_default(), "tok-boto6").unwrap();
}
