//! deploy/ as a cluster would receive it. Every kustomization an operator can
//! apply (the base, each overlay, the base plus each component) is rendered
//! with `kubectl kustomize`, validated against Kubernetes 1.30's schemas, and
//! run: every `kiam` command line in it must pass `--check-config` with the
//! Secrets it mounts, and the server and agent started exactly as deployed
//! must pass their own probes.
//!
//! Needs `kubectl` and PyPI's `kubernetes-validate` (scripts/test.sh installs
//! the latter into .venv); without them the tests say SKIPPED loudly.

#[path = "support/procs.rs"]
mod procs;
#[path = "support/workload.rs"]
mod workload;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use serde::Deserialize;
use serde_json::Value;
use workload::{containers, kiam_in, kind_name, set_flag, Container, Secrets};

/// The Kubernetes version the manifests are validated against.
const KUBERNETES_VERSION: &str = "1.30.0";
/// Kinds with no schema in kubernetes-validate, checked against ours instead.
const CERT_MANAGER_SCHEMA: &str = "tests/schemas/cert-manager-v1.json";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn skipped(why: &str) {
    use std::io::Write;
    // Straight to stderr: libtest captures eprintln! of passing tests.
    let _ = writeln!(std::io::stderr(), "\n*** SKIPPED: {why} ***\n");
}

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn kubectl() -> Option<PathBuf> {
    let found = on_path("kubectl");
    if found.is_none() {
        skipped("kubectl not found on PATH: deploy/ was not rendered");
    }
    found
}

/// `$KUBERNETES_VALIDATE`, else `kubernetes-validate` on PATH, else .venv's.
fn validator() -> Option<PathBuf> {
    let found = std::env::var_os("KUBERNETES_VALIDATE")
        .map(PathBuf::from)
        .filter(|p| p.is_file())
        .or_else(|| on_path("kubernetes-validate"))
        .or_else(|| {
            let p = repo().join(".venv/bin/kubernetes-validate");
            p.is_file().then_some(p)
        });
    if found.is_none() {
        skipped(
            "kubernetes-validate not found (pip install kubernetes-validate; \
             scripts/test.sh puts it in .venv): manifests were not validated",
        );
    }
    found
}

/// One thing an operator can `kubectl apply -k`.
struct Target {
    name: String,
    dir: PathBuf,
}

/// `path` relative to `from` (both absolute): kustomize refuses absolute
/// paths to bases and components.
fn relative(from: &Path, path: &Path) -> String {
    let ups = from.components().count() - 1;
    let down = path.strip_prefix("/").unwrap();
    format!("{}{}", "../".repeat(ups), down.display())
}

fn subdirs(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.map(|e| e.unwrap().path())
                .filter(|p| p.is_dir())
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// The base, every overlay, and the base plus each component (components
/// cannot be rendered alone, so each gets a generated kustomization).
fn targets() -> Vec<Target> {
    let deploy = repo().join("deploy").canonicalize().unwrap();
    let mut out = vec![Target {
        name: "deploy/base".into(),
        dir: deploy.join("base"),
    }];
    for dir in subdirs(&deploy.join("overlays")) {
        out.push(Target {
            name: format!(
                "deploy/overlays/{}",
                dir.file_name().unwrap().to_string_lossy()
            ),
            dir,
        });
    }
    let mut components = Vec::new();
    let mut stack = vec![deploy.join("components")];
    while let Some(dir) = stack.pop() {
        if dir.join("kustomization.yaml").is_file() {
            components.push(dir.clone());
        }
        stack.extend(subdirs(&dir));
    }
    components.sort();
    let wrappers = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("deploy-components");
    for comp in components {
        let rel = comp.strip_prefix(&deploy).unwrap().display().to_string();
        let dir = wrappers.join(rel.replace('/', "_"));
        std::fs::create_dir_all(&dir).unwrap();
        let dir = dir.canonicalize().unwrap();
        let content = format!(
            "resources: [{}]\ncomponents: [{}]\n",
            relative(&dir, &deploy.join("base")),
            relative(&dir, &comp)
        );
        write_atomically(&dir.join("kustomization.yaml"), &content);
        out.push(Target {
            name: format!("deploy/base + deploy/{rel}"),
            dir,
        });
    }
    assert!(out.len() >= 3, "deploy/ has no overlays or components");
    out
}

/// Tests run in parallel and share the generated kustomizations: a reader
/// must never see a half-written file, so write aside and rename.
fn write_atomically(path: &Path, content: &str) {
    if std::fs::read_to_string(path).is_ok_and(|c| c == content) {
        return;
    }
    static SEQ: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let tmp = path.with_extension(format!("tmp{}-{n}", std::process::id()));
    std::fs::write(&tmp, content).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn render(kubectl: &Path, t: &Target) -> Vec<Value> {
    let out = Command::new(kubectl)
        .arg("kustomize")
        .arg(&t.dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kubectl kustomize {} failed:\n{}",
        t.name,
        String::from_utf8_lossy(&out.stderr)
    );
    parse_yaml(&String::from_utf8(out.stdout).unwrap())
}

fn parse_yaml(s: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(s)
        .map(|d| Value::deserialize(d).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

fn is_cert_manager(doc: &Value) -> bool {
    doc["apiVersion"].as_str() == Some("cert-manager.io/v1")
}

/// Runs kubernetes-validate (strict) on `docs`; returns one line per problem.
fn validate_kubernetes(validator: &Path, docs: &[Value], scratch: &Path) -> Vec<String> {
    let file = scratch.join("rendered.yaml");
    let yaml: Vec<String> = docs
        .iter()
        .map(|d| serde_yaml::to_string(d).unwrap())
        .collect();
    std::fs::write(&file, yaml.join("---\n")).unwrap();
    let out = Command::new(validator)
        .args(["--strict", "-k", KUBERNETES_VERSION])
        .arg(&file)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    let mut problems = Vec::new();
    let mut passed = 0;
    for line in text.lines() {
        if line.starts_with("INFO") && line.contains(" passed ") {
            passed += 1;
        } else if line.starts_with("WARN") && line.contains("cert-manager.io/v1") {
            // Checked against our own schema by the caller.
        } else if !line.trim().is_empty() {
            problems.push(line.to_string());
        }
    }
    let expected = docs.iter().filter(|d| !is_cert_manager(d)).count();
    if problems.is_empty() && passed != expected {
        problems.push(format!(
            "kubernetes-validate passed {passed} objects, expected {expected}:\n{text}"
        ));
    }
    if !out.status.success() && problems.is_empty() {
        problems.push(format!("kubernetes-validate failed:\n{text}"));
    }
    problems
}

/// Python that validates JSON documents on stdin against the per-kind schemas
/// of tests/schemas/cert-manager-v1.json, with the interpreter that runs
/// kubernetes-validate (it depends on jsonschema).
const SCHEMA_CHECK: &str = r#"
import json, sys
import jsonschema
schemas = json.load(open(sys.argv[1]))
bad = 0
for doc in json.load(sys.stdin):
    schema = dict(schemas[doc["kind"]], **{"$defs": schemas["$defs"]})
    for e in jsonschema.Draft202012Validator(schema).iter_errors(doc):
        bad += 1
        print("ERROR %s/%s: %s: %s" % (doc["kind"], doc["metadata"]["name"],
              "/".join(map(str, e.absolute_path)), e.message))
sys.exit(1 if bad else 0)
"#;

fn validator_python(validator: &Path) -> PathBuf {
    let dir = validator.parent().unwrap();
    ["python3", "python"]
        .iter()
        .map(|n| dir.join(n))
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("python3"))
}

/// Validates cert-manager objects against our schema; one line per problem.
fn validate_cert_manager(validator: &Path, docs: &[Value]) -> Vec<String> {
    let docs: Vec<&Value> = docs.iter().filter(|d| is_cert_manager(d)).collect();
    if docs.is_empty() {
        return Vec::new();
    }
    let mut child = Command::new(validator_python(validator))
        .arg("-c")
        .arg(SCHEMA_CHECK)
        .arg(repo().join(CERT_MANAGER_SCHEMA))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin
            .write_all(serde_json::to_string(&docs).unwrap().as_bytes())
            .unwrap();
    }
    let out = child.wait_with_output().unwrap();
    if out.status.success() {
        return Vec::new();
    }
    let mut lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    if lines.is_empty() {
        lines.push(format!(
            "cert-manager schema check failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    lines
}

#[test]
fn every_kustomization_renders_and_validates() {
    let (Some(kubectl), Some(validator)) = (kubectl(), validator()) else {
        return;
    };
    let scratch = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    for t in targets() {
        let docs = render(&kubectl, &t);
        assert!(!docs.is_empty(), "{} rendered nothing", t.name);
        let mut problems = validate_kubernetes(&validator, &docs, scratch.path());
        problems.extend(validate_cert_manager(&validator, &docs));
        let cm = docs.iter().filter(|d| is_cert_manager(d)).count();
        println!(
            "{}: {} objects valid for Kubernetes {KUBERNETES_VERSION} (strict){}",
            t.name,
            docs.len() - cm,
            if cm > 0 {
                format!(
                    "; {cm} cert-manager.io/v1 objects checked against {CERT_MANAGER_SCHEMA} \
                     (kubernetes-validate has no schema for them)"
                )
            } else {
                String::new()
            }
        );
        for p in problems {
            failures.push(format!("{}: {p}", t.name));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The checks above can fail: a misspelled field is caught by both.
#[test]
fn validators_reject_misspelled_fields() {
    let (Some(kubectl), Some(validator)) = (kubectl(), validator()) else {
        return;
    };
    let scratch = tempfile::tempdir().unwrap();
    let t = targets()
        .into_iter()
        .find(|t| t.name == "deploy/overlays/cert-manager")
        .expect("deploy/overlays/cert-manager");
    let mut docs = render(&kubectl, &t);
    let deployment = docs.iter_mut().find(|d| d["kind"] == "Deployment").unwrap();
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] =
        Value::from("Always");
    let certificate = docs
        .iter_mut()
        .find(|d| d["kind"] == "Certificate")
        .unwrap();
    certificate["spec"]["secretname"] = Value::from("oops");
    let k8s = validate_kubernetes(&validator, &docs, scratch.path());
    assert!(
        k8s.iter().any(|p| p.contains("imagePullPolicyy")),
        "kubernetes-validate missed a misspelled field: {k8s:?}"
    );
    let cm = validate_cert_manager(&validator, &docs);
    assert!(
        cm.iter().any(|p| p.contains("secretname")),
        "the cert-manager schema missed a misspelled field: {cm:?}"
    );
}

// ---------------------------------------------------------------------------
// Running what the manifests run.

/// The Secrets as `kiam certs --print-secrets` makes them, plus (when the
/// rendered objects include cert-manager Certificates) each Certificate's
/// Secret with cert-manager's keys tls.crt, tls.key and ca.crt.
fn secrets_for(docs: &[Value], dir: &Path) -> Secrets {
    let out = procs::kiam_bin()
        .args(["certs", "--print-secrets", "--out-dir"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kiam certs: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut secrets = Secrets::new();
    for s in parse_yaml(&String::from_utf8(out.stdout).unwrap()) {
        let mut files = BTreeMap::new();
        for (k, v) in s["data"].as_object().unwrap() {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(v.as_str().unwrap())
                .unwrap();
            files.insert(k.clone(), bytes);
        }
        secrets.insert(s["metadata"]["name"].as_str().unwrap().to_string(), files);
    }
    let read = |f: &str| std::fs::read(dir.join(f)).unwrap();
    // deploy/components/webhook: what `kiam certs --out-dir webhook-tls
    // --host kiam-webhook.kube-system.svc` writes, as a generic Secret with
    // kiam certs' file names (docs/WEBHOOK.md).
    let webhook = ["server.pem", "server-key.pem", "ca.pem"]
        .map(|f| (f.to_string(), read(f)))
        .into_iter()
        .collect();
    secrets.insert("kiam-webhook-tls".to_string(), webhook);
    for cert in docs.iter().filter(|d| d["kind"] == "Certificate") {
        let usages = cert["spec"]["usages"].to_string();
        let leaf = if usages.contains("server auth") {
            "server"
        } else if usages.contains("client auth") {
            "agent"
        } else {
            continue; // the CA
        };
        let files = BTreeMap::from([
            ("tls.crt".to_string(), read(&format!("{leaf}.pem"))),
            ("tls.key".to_string(), read(&format!("{leaf}-key.pem"))),
            ("ca.crt".to_string(), read("ca.pem")),
        ]);
        let name = cert["spec"]["secretName"].as_str().unwrap().to_string();
        secrets.insert(name, files);
    }
    secrets
}

/// The value of `--flag=value` in `argv` (manifests use the `=` form).
fn flag<'a>(argv: &'a [String], name: &str) -> Option<&'a str> {
    let prefix = format!("--{name}=");
    argv.iter().find_map(|a| a.strip_prefix(&prefix))
}

fn port_of(addr: &str) -> u16 {
    addr.rsplit(':').next().unwrap().parse().unwrap()
}

#[test]
fn every_kiam_command_line_passes_check_config() {
    let Some(kubectl) = kubectl() else {
        return;
    };
    let mut checked = 0;
    for t in targets() {
        let docs = render(&kubectl, &t);
        let dir = tempfile::tempdir().unwrap();
        let secrets = secrets_for(&docs, dir.path());
        for c in containers(&docs, &secrets, dir.path()) {
            let Some(argv) = c.main_argv() else { continue };
            let role = argv.first().cloned().unwrap_or_default();
            assert!(
                ["server", "agent", "webhook"].contains(&role.as_str()),
                "{} {}: runs kiam {role}, which has no --check-config",
                t.name,
                c.workload
            );
            let leftover: Vec<&String> = argv.iter().filter(|a| a.contains("/etc/kiam")).collect();
            assert!(
                leftover.is_empty(),
                "{} {}: {leftover:?} point into no mounted Secret",
                t.name,
                c.workload
            );
            let out = kiam_in(&c, &argv).arg("--check-config").output().unwrap();
            assert!(
                out.status.success(),
                "{} {}: kiam {} --check-config exited {:?}:\n{}",
                t.name,
                c.workload,
                argv.join(" "),
                out.status.code(),
                String::from_utf8_lossy(&out.stderr)
            );
            checked += 1;
        }
    }
    println!("{checked} kiam command lines passed --check-config");
    assert!(
        checked >= 2 * 3,
        "expected a server and an agent per target"
    );
}

/// Ports and names that must agree across objects: the Service points at
/// the server's --bind port, agents dial the Service, the probes and the
/// scrape annotations use the ports the processes listen on, and the image
/// tag is this crate's version.
#[test]
fn ports_and_names_agree_across_objects() {
    let Some(kubectl) = kubectl() else {
        return;
    };
    for t in targets() {
        let docs = render(&kubectl, &t);
        let dir = tempfile::tempdir().unwrap();
        let secrets = secrets_for(&docs, dir.path());
        let cs = containers(&docs, &secrets, dir.path());
        let find = |role: &str| {
            cs.iter()
                .find(|c| c.main_argv().is_some_and(|a| a[0] == role))
                .unwrap_or_else(|| panic!("{}: no kiam {role}", t.name))
        };
        let (server, agent) = (find("server"), find("agent"));
        let server_argv = server.main_argv().unwrap();
        let agent_argv = agent.main_argv().unwrap();
        let bind_port = port_of(flag(&server_argv, "bind").expect("server --bind"));
        // The manifests name the release they belong to.
        let image = format!("kiam:{}", env!("CARGO_PKG_VERSION"));
        for c in [server, agent] {
            assert_eq!(c.spec["image"], image.as_str(), "{} {}", t.name, c.workload);
        }

        let service = docs
            .iter()
            .find(|d| kind_name(d) == "Service/kiam-server")
            .expect("a Service");
        let svc_port = &service["spec"]["ports"][0];
        let target = svc_port["targetPort"].as_str().expect("named targetPort");
        let container_port = server.spec["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == target)
            .unwrap_or_else(|| panic!("{}: server has no port named {target}", t.name));
        assert_eq!(container_port["containerPort"], bind_port, "{}", t.name);
        assert_eq!(service["spec"]["clusterIP"], "None", "{}: headless", t.name);

        let server_address = flag(&agent_argv, "server-address").expect("agent --server-address");
        assert_eq!(
            server_address,
            format!(
                "{}:{}",
                service["metadata"]["name"].as_str().unwrap(),
                svc_port["port"]
            ),
            "{}: agents dial the Service",
            t.name
        );
        for (probe, argv) in server.probe_argvs() {
            assert_eq!(argv[0], "health", "{} {probe}", t.name);
            let addr = flag(&argv, "server-address").expect("probe --server-address");
            assert_eq!(port_of(addr), bind_port, "{} {probe}", t.name);
        }

        let agent_port: u16 = flag(&agent_argv, "port").unwrap().parse().unwrap();
        for probe in ["livenessProbe", "readinessProbe"] {
            assert_eq!(
                agent.spec[probe]["httpGet"]["port"], agent_port,
                "{} agent {probe}",
                t.name
            );
        }
        for (c, argv) in [(server, &server_argv), (agent, &agent_argv)] {
            let metrics = port_of(flag(argv, "prometheus-listen-addr").unwrap());
            let doc = docs.iter().find(|d| kind_name(d) == c.workload).unwrap();
            let annotated =
                &doc["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"];
            assert_eq!(
                annotated,
                &Value::from(metrics.to_string()),
                "{} {}",
                t.name,
                c.workload
            );
        }
        if let Some(webhook) = cs
            .iter()
            .find(|c| c.main_argv().is_some_and(|a| a[0] == "webhook"))
        {
            webhook_agrees(&t.name, &docs, webhook);
        }
    }
}

/// deploy/components/webhook*: the configuration calls the Service, the
/// Service and the probes reach the container's --bind port, the scrape
/// annotation its metrics port.
fn webhook_agrees(target: &str, docs: &[Value], webhook: &Container) {
    let argv = webhook.main_argv().unwrap();
    let bind_port = port_of(flag(&argv, "bind").expect("webhook --bind"));
    let image = format!("kiam:{}", env!("CARGO_PKG_VERSION"));
    assert_eq!(webhook.spec["image"], image.as_str(), "{target}");
    let named = |name: &str| {
        webhook.spec["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .unwrap_or_else(|| panic!("{target}: webhook has no port {name}"))["containerPort"]
            .clone()
    };
    let service = docs
        .iter()
        .find(|d| kind_name(d) == "Service/kiam-webhook")
        .expect("Service/kiam-webhook");
    let svc_port = &service["spec"]["ports"][0];
    assert_eq!(
        named(svc_port["targetPort"].as_str().unwrap()),
        bind_port,
        "{target}"
    );
    for probe in ["livenessProbe", "readinessProbe"] {
        let get = &webhook.spec[probe]["httpGet"];
        assert_eq!(get["scheme"], "HTTPS", "{target} {probe}");
        assert_eq!(get["path"], "/healthz", "{target} {probe}");
        assert_eq!(
            named(get["port"].as_str().unwrap()),
            bind_port,
            "{target} {probe}"
        );
    }
    let config = docs
        .iter()
        .find(|d| d["kind"] == "MutatingWebhookConfiguration")
        .expect("a MutatingWebhookConfiguration");
    for w in config["webhooks"].as_array().unwrap() {
        let svc = &w["clientConfig"]["service"];
        assert_eq!(svc["name"], service["metadata"]["name"], "{target}");
        assert_eq!(
            svc["namespace"], service["metadata"]["namespace"],
            "{target}"
        );
        assert_eq!(svc["port"], svc_port["port"], "{target}");
        assert_eq!(svc["path"], "/mutate", "{target}");
        assert_eq!(w["sideEffects"], "None", "{target}");
        assert_eq!(
            w["admissionReviewVersions"],
            serde_json::json!(["v1"]),
            "{target}"
        );
    }
    let metrics = port_of(flag(&argv, "prometheus-listen-addr").unwrap());
    let doc = docs
        .iter()
        .find(|d| kind_name(d) == webhook.workload)
        .unwrap();
    assert_eq!(
        doc["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"],
        Value::from(metrics.to_string()),
        "{target}"
    );
}

/// Polls `f` until it returns true, for at most `limit`.
async fn eventually(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    f()
}

/// The server and agent run with the manifests' own arguments (only
/// addresses, the kubeconfig and the metadata endpoint are pointed at the
/// test's emulators, and the agent leaves iptables alone), and the probes
/// the manifests declare pass against them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_and_agent_pass_their_own_probes() {
    let Some(kubectl) = kubectl() else {
        return;
    };
    let imds = kiam_sandbox::imds::ImdsEmulator::start(
        Default::default(),
        kiam_sandbox::imds::Behaviour::leaky(),
    )
    .await
    .unwrap();
    let cluster = procs::ProcCluster::start().await;
    for t in targets() {
        let docs = render(&kubectl, &t);
        let dir = tempfile::tempdir().unwrap();
        let secrets = secrets_for(&docs, dir.path());
        let cs = containers(&docs, &secrets, dir.path());
        let find = |role: &str| {
            cs.iter()
                .find(|c| c.main_argv().is_some_and(|a| a[0] == role))
                .unwrap()
        };
        let (server, agent) = (find("server"), find("agent"));

        let port = procs::free_port();
        let mut argv = server.main_argv().unwrap();
        set_flag(&mut argv, "bind", &format!("127.0.0.1:{port}"));
        set_flag(
            &mut argv,
            "prometheus-listen-addr",
            &format!("127.0.0.1:{}", procs::free_port()),
        );
        set_flag(
            &mut argv,
            "kubeconfig",
            &cluster.kubeconfig.display().to_string(),
        );
        let mut cmd = kiam_in(server, &argv);
        cmd.env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .env("AWS_REGION", "us-east-1")
            .env("AWS_EC2_METADATA_SERVICE_ENDPOINT", imds.url());
        let _server = procs::ChildGuard::spawn("kiam server", cmd).unwrap();

        let probes = server.probe_argvs();
        assert_eq!(probes.len(), 3, "{}: startup, readiness, liveness", t.name);
        for (probe, mut argv) in probes {
            set_flag(&mut argv, "server-address", &format!("127.0.0.1:{port}"));
            let mut last = None;
            let ok = eventually(Duration::from_secs(15), || {
                let out = kiam_in(server, &argv).output().unwrap();
                let ok = out.status.success();
                last = Some(out);
                ok
            })
            .await;
            let out = last.unwrap();
            assert!(
                ok,
                "{}: the server's {probe} never passed: kiam {} -> {:?}\n{}",
                t.name,
                argv.join(" "),
                out.status.code(),
                String::from_utf8_lossy(&out.stderr)
            );
            assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");
        }

        let agent_port = procs::free_port();
        let mut argv = agent.main_argv().unwrap();
        argv.retain(|a| !a.starts_with("--iptables"));
        set_flag(&mut argv, "port", &agent_port.to_string());
        set_flag(&mut argv, "server-address", &format!("127.0.0.1:{port}"));
        set_flag(
            &mut argv,
            "prometheus-listen-addr",
            &format!("127.0.0.1:{}", procs::free_port()),
        );
        set_flag(&mut argv, "metadata-endpoint", &imds.url());
        let _agent = procs::ChildGuard::spawn("kiam agent", kiam_in(agent, &argv)).unwrap();
        for probe in ["livenessProbe", "readinessProbe"] {
            let path = agent.spec[probe]["httpGet"]["path"]
                .as_str()
                .unwrap()
                .to_string();
            let deadline = Instant::now() + Duration::from_secs(15);
            let mut status = 0;
            while Instant::now() < deadline {
                status = workload::http_status(agent_port, &path).await;
                if (200..400).contains(&status) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            assert!(
                (200..400).contains(&status),
                "{}: the agent's {probe} GET {path} answered {status}",
                t.name
            );
        }
        println!("{}: server and agent pass their probes", t.name);
    }
}

/// docs/CNI.md's table and deploy/components/host-interface/ agree: every
/// component is in the table, and renders the interface the table gives.
#[test]
fn cni_table_matches_the_components() {
    let Some(kubectl) = kubectl() else {
        return;
    };
    let doc = std::fs::read_to_string(repo().join("docs/CNI.md")).unwrap();
    let row =
        regex::Regex::new(r"^\|[^|]*\| `([^`]+)` \| `host-interface/([a-z0-9-]+)` \|").unwrap();
    let table: BTreeMap<String, String> = doc
        .lines()
        .filter_map(|l| row.captures(l))
        .map(|c| (c[2].to_string(), c[1].to_string()))
        .collect();
    let components: Vec<Target> = targets()
        .into_iter()
        .filter(|t| t.name.contains("components/host-interface/"))
        .collect();
    assert!(!components.is_empty());
    for t in components {
        let name = t.name.rsplit('/').next().unwrap().to_string();
        let want = table
            .get(&name)
            .unwrap_or_else(|| panic!("docs/CNI.md has no row for host-interface/{name}"));
        let docs = render(&kubectl, &t);
        let agent = docs
            .iter()
            .find(|d| d["kind"] == "DaemonSet")
            .expect("the agent DaemonSet");
        let env = &agent["spec"]["template"]["spec"]["containers"][0]["env"];
        let got = env
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == "KIAM_HOST_INTERFACE")
            .and_then(|e| e["value"].as_str());
        assert_eq!(got, Some(want.as_str()), "{}", t.name);
    }
    assert_eq!(
        table.len(),
        subdirs(&repo().join("deploy/components/host-interface")).len(),
        "docs/CNI.md names a component that does not exist: {table:?}"
    );
}

/// The Containerfile is checked for what the manifests rely on, also for
/// builds other than CI's (tests/image.rs runs the image CI builds): the
/// build context it copies exists and is not ignored, the Debian stage
/// installs iptables and conntrack, the image runs as non-root by default
/// and provides the path the manifests run kiam from.
#[test]
fn containerfile_provides_what_the_manifests_run() {
    let text = std::fs::read_to_string(repo().join("Containerfile")).unwrap();
    let ignore = std::fs::read_to_string(repo().join(".containerignore")).unwrap();
    let ignored: Vec<&str> = ignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    assert_eq!(
        std::fs::read_to_string(repo().join(".dockerignore")).unwrap(),
        ignore,
        ".dockerignore and .containerignore differ"
    );
    // Instructions, with `\` continuations joined.
    let joined = text.replace("\\\n", " ");
    let lines: Vec<&str> = joined
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let stages: Vec<usize> = (0..lines.len())
        .filter(|&i| lines[i].starts_with("FROM "))
        .collect();
    assert!(stages.len() >= 2, "a multi-stage build");
    for line in &lines {
        let Some(rest) = line.strip_prefix("COPY ") else {
            continue;
        };
        if rest.starts_with("--from") {
            continue;
        }
        let parts: Vec<&str> = rest.split_whitespace().collect();
        for src in &parts[..parts.len() - 1] {
            assert!(repo().join(src).exists(), "COPY {src}: no such file");
            assert!(
                !ignored.contains(src),
                "COPY {src}, but .containerignore excludes it"
            );
        }
    }
    // Every file the root manifest names must be in the build context.
    let copied: Vec<&str> = lines
        .iter()
        .filter_map(|l| l.strip_prefix("COPY "))
        .filter(|r| !r.starts_with("--from"))
        .flat_map(|r| {
            let parts: Vec<&str> = r.split_whitespace().collect();
            parts[..parts.len() - 1].to_vec()
        })
        .collect();
    let manifest = std::fs::read_to_string(repo().join("Cargo.toml")).unwrap();
    let path = regex::Regex::new(r#"\bpath\s*=\s*"([^"]+)""#).unwrap();
    for cap in path.captures_iter(&manifest) {
        let p = &cap[1];
        assert!(
            copied
                .iter()
                .any(|c| p == *c || p.starts_with(&format!("{}/", c.trim_end_matches('/')))),
            "Cargo.toml names {p}, which the Containerfile does not COPY into the build"
        );
    }
    let runtime = &lines[*stages.last().unwrap()..];
    // The `debian` stage: the base of a build that does not supply its own
    // (scripts/image.sh supplies one with the same packages; tests/image.rs
    // runs what it builds).
    let debian = stages
        .iter()
        .position(|&i| lines[i].ends_with(" AS debian"))
        .expect("a stage `AS debian`");
    let end = stages.get(debian + 1).copied().unwrap_or(lines.len());
    let installs = lines[stages[debian]..end]
        .iter()
        .find(|l| l.contains("apt-get install"))
        .expect("the debian stage installs packages");
    for pkg in ["iptables", "conntrack", "ca-certificates"] {
        assert!(
            installs.split_whitespace().any(|w| w == pkg),
            "runtime lacks {pkg}"
        );
    }
    let user = runtime
        .iter()
        .rev()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("a USER");
    assert!(
        !user.starts_with("0") && !user.starts_with("root"),
        "USER {user}"
    );
    for path in ["/usr/local/bin/kiam", "/kiam"] {
        assert!(
            runtime.iter().any(|l| l.contains(path)),
            "the image does not provide {path}"
        );
    }
}
