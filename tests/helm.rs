//! deploy/helm/kiam, the chart that takes Go kiam's chart values. `helm lint`
//! and `helm template` with the default values, with the keys of Go kiam's
//! own CI values (ci/test-values.yaml) and with a values file that sets most
//! of its keys (ci/operator-values.yaml); the rendered objects are validated
//! against Kubernetes 1.30's schemas, every kiam command line in them passes
//! `--check-config`, the default rendering is compared with deploy/base,
//! a server and an agent run on the certificates the chart generates, and
//! the rendered objects are created on a real kube-apiserver (with
//! `KIAM_ETCD_BIN` and `KIAM_KUBE_APISERVER_BIN`).
//!
//! Needs helm (`KIAM_HELM_BIN`, which scripts/test.sh sets from
//! `scripts/peers.sh helm`), PyPI's kubernetes-validate and kubectl (for
//! deploy/base); without them the tests say SKIPPED loudly.

#[path = "support/kubeapi.rs"]
mod kubeapi;
#[path = "support/procs.rs"]
mod procs;
#[path = "support/workload.rs"]
mod workload;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use base64::Engine;
use serde::Deserialize;
use serde_json::Value;
use workload::{
    containers, decode_data, kiam_in, kind_name, set_flag, strings, Container, Secrets,
};

const KUBERNETES_VERSION: &str = "1.30.0";
const NAMESPACE: &str = "kube-system";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn chart() -> PathBuf {
    repo().join("deploy/helm/kiam")
}

fn skipped(why: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "\n*** SKIPPED: {why} ***\n");
}

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn helm() -> Option<PathBuf> {
    let found = std::env::var_os("KIAM_HELM_BIN")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .or_else(|| on_path("helm"));
    match found {
        Some(p) => {
            assert!(p.is_file(), "KIAM_HELM_BIN={} is not a file", p.display());
            Some(p)
        }
        None => {
            skipped(
                "no helm (KIAM_HELM_BIN unset and none on PATH; scripts/test.sh \
                 builds it with scripts/peers.sh helm): the chart was not rendered",
            );
            None
        }
    }
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
        skipped("kubernetes-validate not found: the chart's objects were not validated");
    }
    found
}

fn parse_yaml(s: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(s)
        .map(|d| Value::deserialize(d).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

/// One way of rendering the chart.
struct Case {
    name: &'static str,
    /// Values files (relative to the chart) and generated ones.
    values: Vec<PathBuf>,
    /// Secrets the operator made beforehand (tlsSecret), by name.
    secrets: Secrets,
    _dir: Option<tempfile::TempDir>,
}

/// `kiam certs --print-secrets`: kiam-server-tls and kiam-agent-tls with
/// the cfssl file names, as the seed document's steps make them.
fn kiam_certs_secrets(dir: &Path) -> Secrets {
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
        secrets.insert(
            s["metadata"]["name"].as_str().unwrap().to_string(),
            decode_data(&s),
        );
    }
    secrets
}

fn cases() -> Vec<Case> {
    let dir = tempfile::tempdir().unwrap();
    // Go kiam's CI values carry base64 PEMs in agent/server.tlsFiles; ours
    // come from `kiam certs`, in a second values file with those keys.
    let pems = kiam_certs_secrets(&dir.path().join("certs"));
    let b64 = |secret: &str, key: &str| {
        base64::engine::general_purpose::STANDARD.encode(&pems[secret][key])
    };
    let tls_values = serde_json::json!({
        "agent": {"tlsFiles": {
            "ca": b64("kiam-agent-tls", "ca.pem"),
            "cert": b64("kiam-agent-tls", "agent.pem"),
            "key": b64("kiam-agent-tls", "agent-key.pem")}},
        "server": {"tlsFiles": {
            "ca": b64("kiam-server-tls", "ca.pem"),
            "cert": b64("kiam-server-tls", "server.pem"),
            "key": b64("kiam-server-tls", "server-key.pem")}},
    });
    let tls_file = dir.path().join("tls-values.yaml");
    std::fs::write(&tls_file, serde_yaml::to_string(&tls_values).unwrap()).unwrap();
    vec![
        Case {
            name: "default values",
            values: vec![],
            secrets: Secrets::new(),
            _dir: None,
        },
        Case {
            name: "ci/test-values.yaml (Go kiam's CI keys)",
            values: vec![chart().join("ci/test-values.yaml"), tls_file],
            secrets: Secrets::new(),
            _dir: None,
        },
        Case {
            name: "ci/operator-values.yaml",
            values: vec![chart().join("ci/operator-values.yaml")],
            secrets: pems,
            _dir: Some(dir),
        },
    ]
}

fn helm_template(helm: &Path, values: &[PathBuf], extra: &[&str]) -> Result<String, String> {
    let mut cmd = Command::new(helm);
    cmd.args(["template", "kiam"])
        .arg(chart())
        .args(["--namespace", NAMESPACE]);
    for v in values {
        cmd.arg("-f").arg(v);
    }
    cmd.args(extra);
    let out = cmd.output().unwrap();
    if out.status.success() {
        Ok(String::from_utf8(out.stdout).unwrap())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn render(helm: &Path, case: &Case) -> Vec<Value> {
    let text = helm_template(helm, &case.values, &[])
        .unwrap_or_else(|e| panic!("helm template ({}): {e}", case.name));
    let docs = parse_yaml(&text);
    assert!(!docs.is_empty(), "{}: rendered nothing", case.name);
    docs
}

#[test]
fn chart_version_is_the_crates() {
    let chart: Value =
        serde_yaml::from_str(&std::fs::read_to_string(chart().join("Chart.yaml")).unwrap())
            .unwrap();
    assert_eq!(chart["appVersion"], env!("CARGO_PKG_VERSION"));
    assert_eq!(chart["version"], env!("CARGO_PKG_VERSION"));
}

#[test]
fn helm_lint_passes_with_every_values_file() {
    let Some(helm) = helm() else { return };
    for case in cases() {
        let mut cmd = Command::new(&helm);
        cmd.args(["lint", "--strict", "--namespace", NAMESPACE])
            .arg(chart());
        for v in &case.values {
            cmd.arg("-f").arg(v);
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "helm lint --strict ({}):\n{}{}",
            case.name,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Prometheus-operator kinds have no schema in kubernetes-validate.
fn has_schema(doc: &Value) -> bool {
    doc["apiVersion"] != "monitoring.coreos.com/v1"
}

fn validate(validator: &Path, docs: &[Value], scratch: &Path) -> Vec<String> {
    let docs: Vec<&Value> = docs.iter().filter(|d| has_schema(d)).collect();
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
        } else if !line.trim().is_empty() {
            problems.push(line.to_string());
        }
    }
    if problems.is_empty() && passed != docs.len() {
        problems.push(format!(
            "kubernetes-validate passed {passed} objects of {}:\n{text}",
            docs.len()
        ));
    }
    if !out.status.success() && problems.is_empty() {
        problems.push(format!("kubernetes-validate failed:\n{text}"));
    }
    problems
}

#[test]
fn rendered_objects_validate() {
    let (Some(helm), Some(validator)) = (helm(), validator()) else {
        return;
    };
    let scratch = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    for case in cases() {
        let docs = render(&helm, &case);
        for p in validate(&validator, &docs, scratch.path()) {
            failures.push(format!("{}: {p}", case.name));
        }
        // The ServiceMonitors, at least in shape.
        for d in docs.iter().filter(|d| !has_schema(d)) {
            assert_eq!(d["kind"], "ServiceMonitor", "{}", case.name);
            assert_eq!(d["spec"]["endpoints"][0]["port"], "metrics");
            let selector = &d["spec"]["selector"]["matchLabels"];
            let service = docs
                .iter()
                .find(|s| {
                    s["kind"] == "Service"
                        && selector
                            .as_object()
                            .unwrap()
                            .iter()
                            .all(|(k, v)| &s["metadata"]["labels"][k] == v)
                        && s["spec"]["ports"]
                            .as_array()
                            .unwrap()
                            .iter()
                            .any(|p| p["name"] == "metrics")
                })
                .map(kind_name);
            assert!(
                service.is_some(),
                "{}: {} selects no Service with a metrics port",
                case.name,
                kind_name(d)
            );
        }
        println!(
            "{}: {} objects valid for Kubernetes {KUBERNETES_VERSION} (strict)",
            case.name,
            docs.iter().filter(|d| has_schema(d)).count()
        );
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

// ---------------------------------------------------------------------------
// The containers as a kubelet would run them.

/// Every container, with Secret volumes written out from the rendered
/// Secrets and those the operator made (`case.secrets`).
fn case_containers(docs: &[Value], case: &Case, dir: &Path) -> Vec<Container> {
    let mut secrets = case.secrets.clone();
    for s in docs.iter().filter(|d| d["kind"] == "Secret") {
        secrets.insert(
            s["metadata"]["name"].as_str().unwrap().to_string(),
            decode_data(s),
        );
    }
    containers(docs, &secrets, dir)
}

#[test]
fn every_kiam_command_line_passes_check_config() {
    let Some(helm) = helm() else { return };
    let mut checked = 0;
    for case in cases() {
        let docs = render(&helm, &case);
        let dir = tempfile::tempdir().unwrap();
        let mut roles = Vec::new();
        for c in case_containers(&docs, &case, dir.path()) {
            let Some(argv) = c.main_argv() else { continue };
            let leftover: Vec<&String> = argv.iter().filter(|a| a.contains("/etc/kiam")).collect();
            assert!(
                leftover.is_empty(),
                "{} {}: {leftover:?} point into no mounted Secret",
                case.name,
                c.workload
            );
            let out = kiam_in(&c, &argv).arg("--check-config").output().unwrap();
            assert!(
                out.status.success(),
                "{} {}: kiam {} --check-config exited {:?}:\n{}",
                case.name,
                c.workload,
                argv.join(" "),
                out.status.code(),
                String::from_utf8_lossy(&out.stderr)
            );
            // The probes' files exist too.
            for (probe, argv) in c.probe_argvs() {
                for a in &argv {
                    for flag in ["--cert=", "--key=", "--ca="] {
                        if let Some(p) = a.strip_prefix(flag) {
                            assert!(
                                Path::new(p).is_file(),
                                "{} {} {probe}: {a} names no file of the mounted Secret",
                                case.name,
                                c.workload
                            );
                        }
                    }
                }
            }
            roles.push(argv[0].clone());
            checked += 1;
        }
        roles.sort();
        assert_eq!(roles, ["agent", "server"], "{}", case.name);
    }
    println!("{checked} kiam command lines passed --check-config");
}

/// Go kiam's image runs another program: a values file still naming it
/// fails to render, and the message names the key to change.
#[test]
fn go_kiam_image_is_refused_naming_the_key() {
    let Some(helm) = helm() else { return };
    for role in ["agent", "server"] {
        let err = helm_template(
            &helm,
            &[],
            &[
                "--set",
                &format!("{role}.image.repository=quay.io/uswitch/kiam"),
                "--set",
                &format!("{role}.image.tag=v4.0"),
            ],
        )
        .expect_err("Go kiam's image was accepted");
        assert!(
            err.contains(&format!("{role}.image.repository")),
            "the error does not name {role}.image.repository: {err}"
        );
    }
}

/// psp.create (Go kiam's chart) is accepted and renders no
/// PodSecurityPolicy (removed in Kubernetes 1.25); rbac.create=false and
/// serviceAccounts.*.create=false render none of those.
#[test]
fn psp_rbac_and_service_account_switches() {
    let Some(helm) = helm() else { return };
    let docs = parse_yaml(&helm_template(&helm, &[], &["--set", "psp.create=true"]).unwrap());
    assert!(docs.iter().all(|d| d["kind"] != "PodSecurityPolicy"));
    let docs = parse_yaml(
        &helm_template(
            &helm,
            &[],
            &[
                "--set",
                "rbac.create=false",
                "--set",
                "serviceAccounts.server.create=false",
                "--set",
                "serviceAccounts.server.name=existing",
                "--set",
                "serviceAccounts.agent.create=false",
            ],
        )
        .unwrap(),
    );
    let kinds: Vec<String> = docs.iter().map(kind_name).collect();
    for k in ["ClusterRole", "ClusterRoleBinding", "ServiceAccount"] {
        assert!(
            kinds.iter().all(|n| !n.starts_with(&format!("{k}/"))),
            "{k} rendered: {kinds:?}"
        );
    }
    let server = docs.iter().find(|d| d["kind"] == "Deployment").unwrap();
    assert_eq!(
        server["spec"]["template"]["spec"]["serviceAccountName"],
        "existing"
    );
    let agent = docs.iter().find(|d| d["kind"] == "DaemonSet").unwrap();
    assert_eq!(
        agent["spec"]["template"]["spec"]["serviceAccountName"],
        "default"
    );
}

// ---------------------------------------------------------------------------
// The default rendering against deploy/base.

/// deploy/base as `kubectl kustomize` renders it; without kubectl, the same
/// done here (its kustomization only lists files, sets the namespace of
/// namespaced objects and the image tag), so CI compares either way.
fn kustomize_base() -> Vec<Value> {
    let base = repo().join("deploy/base");
    if let Some(kubectl) = on_path("kubectl") {
        let out = Command::new(kubectl)
            .arg("kustomize")
            .arg(&base)
            .output()
            .unwrap();
        assert!(out.status.success(), "kubectl kustomize deploy/base");
        return parse_yaml(&String::from_utf8(out.stdout).unwrap());
    }
    let k: Value =
        serde_yaml::from_str(&std::fs::read_to_string(base.join("kustomization.yaml")).unwrap())
            .unwrap();
    let known: Vec<&str> = k.as_object().unwrap().keys().map(String::as_str).collect();
    assert!(
        known
            .iter()
            .all(|key| ["apiVersion", "kind", "namespace", "resources", "images"].contains(key)),
        "deploy/base/kustomization.yaml uses more than this test applies: {known:?}"
    );
    let ns = k["namespace"].as_str().unwrap();
    let tag = k["images"][0]["newTag"].as_str().unwrap();
    let mut docs = Vec::new();
    for r in k["resources"].as_array().unwrap() {
        let text = std::fs::read_to_string(base.join(r.as_str().unwrap())).unwrap();
        for mut d in parse_yaml(&text) {
            if !["ClusterRole", "ClusterRoleBinding"].contains(&d["kind"].as_str().unwrap()) {
                d["metadata"]["namespace"] = ns.into();
            }
            if let Some(cs) = d["spec"]["template"]["spec"]["containers"].as_array_mut() {
                for c in cs {
                    if c["image"] == k["images"][0]["name"] {
                        c["image"] = format!("{}:{tag}", c["image"].as_str().unwrap()).into();
                    }
                }
            }
            docs.push(d);
        }
    }
    docs
}

/// Container args with the TLS file names (the chart keeps Go kiam's chart's
/// Secret keys: cert, key, ca) reduced to their flag, and the flags Go kiam's
/// chart always passed (at their default values) removed.
fn comparable_args(args: &[String]) -> Vec<String> {
    const GO_CHART_EXTRAS: &[&str] = &[
        "--prometheus-sync-interval=5s",
        "--gateway-timeout-creation=1s",
    ];
    args.iter()
        .filter(|a| !GO_CHART_EXTRAS.contains(&a.as_str()))
        .map(|a| {
            for flag in ["--cert=", "--key=", "--ca="] {
                if let Some(path) = a.strip_prefix(flag) {
                    let dir = Path::new(path).parent().unwrap().display().to_string();
                    return format!("{flag}{dir}/<{}>", flag.trim_matches(['-', '=']));
                }
            }
            a.clone()
        })
        .collect()
}

fn container_view(doc: &Value) -> Value {
    let pod = &doc["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    let probes: BTreeMap<&str, Value> = ["startupProbe", "readinessProbe", "livenessProbe"]
        .iter()
        .map(|p| {
            let probe = &c[*p];
            let what = if probe["exec"].is_object() {
                Value::from(comparable_args(&strings(&probe["exec"]["command"])[1..]))
            } else {
                probe["httpGet"].clone()
            };
            (*p, what)
        })
        .collect();
    serde_json::json!({
        "command": c["command"],
        "args": comparable_args(&strings(&c["args"])),
        "env": c["env"],
        "ports": c["ports"],
        "securityContext": c["securityContext"],
        "mounts": c["volumeMounts"].as_array().unwrap().iter()
            .map(|m| m["mountPath"].clone()).collect::<Vec<_>>(),
        "probes": probes,
        "podSecurityContext": pod["securityContext"],
        "hostNetwork": pod["hostNetwork"],
        "automountServiceAccountToken": pod["automountServiceAccountToken"],
        "serviceAccountName": pod["serviceAccountName"],
        "priorityClassName": pod["priorityClassName"],
        "resources": c["resources"],
        "annotations": doc["spec"]["template"]["metadata"]["annotations"],
    })
}

#[test]
fn default_rendering_matches_deploy_base() {
    let Some(helm) = helm() else { return };
    let base = kustomize_base();
    let text = helm_template(&helm, &[], &[]).unwrap();
    let chart = parse_yaml(&text);

    // The same objects (kind and name), besides the TLS Secrets the chart
    // makes when no tlsSecret is given (deploy/base expects them made).
    let names = |docs: &[Value]| -> Vec<String> {
        let mut v: Vec<String> = docs
            .iter()
            .filter(|d| d["kind"] != "Secret")
            .map(kind_name)
            .collect();
        v.sort();
        v
    };
    assert_eq!(names(&chart), names(&base));
    let secrets: Vec<String> = chart
        .iter()
        .filter(|d| d["kind"] == "Secret")
        .map(kind_name)
        .collect();
    assert_eq!(secrets, ["Secret/kiam-agent", "Secret/kiam-server"]);

    let find = |docs: &[Value], kn: &str| -> Value {
        docs.iter()
            .find(|d| kind_name(d) == kn)
            .unwrap_or_else(|| panic!("no {kn}"))
            .clone()
    };
    for workload in ["DaemonSet/kiam-agent", "Deployment/kiam-server"] {
        let (c, b) = (find(&chart, workload), find(&base, workload));
        let (mut cv, bv) = (container_view(&c), container_view(&b));
        // The image: the chart's appVersion, deploy/base's newTag.
        assert_eq!(
            c["spec"]["template"]["spec"]["containers"][0]["image"],
            b["spec"]["template"]["spec"]["containers"][0]["image"],
            "{workload} image"
        );
        // The probes' extra flag (Go kiam's chart's probes passed it).
        if let Some(probes) = cv["probes"].as_object_mut() {
            for p in probes.values_mut() {
                if let Some(a) = p.as_array_mut() {
                    a.retain(|x| x != "--gateway-timeout-creation=1s");
                }
            }
        }
        // Probe timing comes from Go kiam's chart's keys; compared apart.
        assert_eq!(cv, bv, "{workload}: the chart and deploy/base differ");
    }
    for kn in [
        "ClusterRole/kiam-server",
        "ServiceAccount/kiam-agent",
        "PodDisruptionBudget/kiam-server",
    ] {
        let (c, b) = (find(&chart, kn), find(&base, kn));
        for key in ["rules", "automountServiceAccountToken"] {
            assert_eq!(c[key], b[key], "{kn} {key}");
        }
        assert_eq!(
            c["spec"]["maxUnavailable"], b["spec"]["maxUnavailable"],
            "{kn}"
        );
    }
    let (c, b) = (
        find(&chart, "ClusterRoleBinding/kiam-server"),
        find(&base, "ClusterRoleBinding/kiam-server"),
    );
    assert_eq!(c["subjects"], b["subjects"]);
    assert_eq!(c["roleRef"], b["roleRef"]);
    let (c, b) = (
        find(&chart, "Service/kiam-server"),
        find(&base, "Service/kiam-server"),
    );
    assert_eq!(c["spec"]["ports"], b["spec"]["ports"]);
    assert_eq!(c["spec"]["clusterIP"], b["spec"]["clusterIP"]);
    let d = find(&chart, "Deployment/kiam-server");
    assert_eq!(d["spec"]["replicas"], 3);
    assert_eq!(
        d["spec"]["strategy"],
        find(&base, "Deployment/kiam-server")["spec"]["strategy"]
    );
}

// ---------------------------------------------------------------------------
// Running what the chart renders.

/// The certificates the chart generates (no tlsSecret, no tlsFiles) work:
/// the server and agent started with the rendered arguments and Secrets
/// (addresses pointed at the test's API server and metadata emulator, no
/// iptables), the server's exec probes pass and the agent's deep health
/// check reaches the server over mutual TLS, by the name `localhost`, which
/// the generated server certificate carries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chart_generated_certificates_give_working_mtls() {
    let Some(helm) = helm() else { return };
    let case = Case {
        name: "default values",
        values: vec![],
        secrets: Secrets::new(),
        _dir: None,
    };
    let docs = render(&helm, &case);
    let dir = tempfile::tempdir().unwrap();
    let cs = case_containers(&docs, &case, dir.path());
    let find = |role: &str| {
        cs.iter()
            .find(|c| c.main_argv().is_some_and(|a| a[0] == role))
            .unwrap()
    };
    let (server, agent) = (find("server"), find("agent"));
    let imds = kiam_sandbox::imds::ImdsEmulator::start(
        Default::default(),
        kiam_sandbox::imds::Behaviour::leaky(),
    )
    .await
    .unwrap();
    let cluster = procs::ProcCluster::start().await;

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
    assert_eq!(probes.len(), 3);
    for (probe, mut argv) in probes {
        set_flag(&mut argv, "server-address", &format!("127.0.0.1:{port}"));
        let mut last = None;
        for _ in 0..150 {
            let out = kiam_in(server, &argv).output().unwrap();
            let ok = out.status.success();
            last = Some(out);
            if ok {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let out = last.unwrap();
        assert!(
            out.status.success(),
            "the server's {probe} never passed: kiam {} -> {:?}\n{}",
            argv.join(" "),
            out.status.code(),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    let agent_port = procs::free_port();
    let mut argv = agent.main_argv().unwrap();
    argv.retain(|a| !a.starts_with("--iptables"));
    set_flag(&mut argv, "port", &agent_port.to_string());
    set_flag(&mut argv, "server-address", &format!("localhost:{port}"));
    set_flag(
        &mut argv,
        "prometheus-listen-addr",
        &format!("127.0.0.1:{}", procs::free_port()),
    );
    set_flag(&mut argv, "metadata-endpoint", &imds.url());
    let _agent = procs::ChildGuard::spawn("kiam agent", kiam_in(agent, &argv)).unwrap();
    let mut status = 0;
    for _ in 0..150 {
        status = workload::http_status(agent_port, "/health?deep=1").await;
        if status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        status, 200,
        "the agent's deep health check (a server over mTLS with the chart's certificates)"
    );
}

/// The rendered objects are accepted by a real kube-apiserver (strict field
/// validation, its defaulting and admission): the default values into
/// kube-system as release "kiam", the operator's values into another
/// namespace as release "kiam-ops". ServiceMonitors need the Prometheus
/// operator's CRD, which this API server does not have: skipped.
#[test]
fn rendered_objects_are_accepted_by_a_real_apiserver() {
    let Some(helm) = helm() else { return };
    let Some((etcd, apiserver)) = kubeapi::binaries() else {
        return;
    };
    let api = kubeapi::KubeApi::start(&etcd, &apiserver);
    let mut created = 0;
    for (case, release, ns) in [(0, "kiam", NAMESPACE), (2, "kiam-ops", "kiam-ops")] {
        let case = cases().into_iter().nth(case).unwrap();
        if ns != NAMESPACE {
            api.namespace(ns, "");
        }
        let mut cmd = Command::new(&helm);
        cmd.args(["template", release])
            .arg(chart())
            .args(["--namespace", ns]);
        for v in &case.values {
            cmd.arg("-f").arg(v);
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "helm template {release}");
        for doc in parse_yaml(&String::from_utf8(out.stdout).unwrap()) {
            if !has_schema(&doc) {
                continue;
            }
            let (code, text) = api.create(&doc, ns);
            assert!(
                (200..300).contains(&code),
                "{} ({}): the API server refused {}: {code} {text}",
                case.name,
                release,
                kind_name(&doc)
            );
            created += 1;
        }
    }
    // The check can fail: a misspelled field is refused.
    let mut docs = parse_yaml(&helm_template(&helm, &[], &[]).unwrap());
    let ds = docs.iter_mut().find(|d| d["kind"] == "DaemonSet").unwrap();
    ds["metadata"]["name"] = "kiam-misspelled".into();
    ds["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always".into();
    let (code, text) = api.create(ds, NAMESPACE);
    assert!(
        !(200..300).contains(&code) && text.contains("imagePullPolicyy"),
        "a misspelled field was accepted: {code} {text}"
    );
    println!("{created} rendered objects created on a real kube-apiserver");
}

/// `helm install` and `helm upgrade` against a real kube-apiserver: the
/// release installs, and an upgrade keeps the CA and certificates the
/// chart generated at install (read back with `lookup`), so agents and
/// servers keep trusting each other across upgrades.
#[test]
fn helm_upgrade_on_a_real_apiserver_keeps_generated_certificates() {
    let Some(helm) = helm() else { return };
    let Some((etcd, apiserver)) = kubeapi::binaries() else {
        return;
    };
    let api = kubeapi::KubeApi::start(&etcd, &apiserver);
    let cache = api.dir.path().join("helm-cache");
    let run = |verb: &str| {
        let out = Command::new(&helm)
            .args([verb, "kiam"])
            .arg(chart())
            .args(["--namespace", NAMESPACE])
            .arg("--kubeconfig")
            .arg(&api.kubeconfig)
            // Helm's own state, kept out of the user's home.
            .env("HELM_CACHE_HOME", cache.join("cache"))
            .env("HELM_CONFIG_HOME", cache.join("config"))
            .env("HELM_DATA_HOME", cache.join("data"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "helm {verb}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let secrets = || {
        ["kiam-agent", "kiam-server"].map(|name| {
            api.get_json(&format!("/api/v1/namespaces/{NAMESPACE}/secrets/{name}"))["data"].clone()
        })
    };
    run("install");
    let installed = secrets();
    for s in &installed {
        for key in ["ca", "cert", "key"] {
            assert!(s[key].is_string(), "generated Secret lacks {key}: {s}");
        }
    }
    assert_eq!(installed[0]["ca"], installed[1]["ca"], "one CA for both");
    run("upgrade");
    assert_eq!(
        secrets(),
        installed,
        "helm upgrade replaced the certificates"
    );
    // The workloads exist as rendered.
    for path in [
        "/apis/apps/v1/namespaces/kube-system/deployments/kiam-server",
        "/apis/apps/v1/namespaces/kube-system/daemonsets/kiam-agent",
    ] {
        let v = api.get_json(path);
        assert_eq!(v["metadata"]["labels"]["release"], "kiam", "{path}");
    }
}

/// Every key path in the values.yaml of Go kiam's chart (6.x, its last
/// version), so a values file written for it sets nothing this chart lacks.
const GO_KIAM_CHART_KEYS: &[&str] = &[
    "agent",
    "agent.affinity",
    "agent.deepLivenessProbe",
    "agent.dnsPolicy",
    "agent.enabled",
    "agent.extraArgs",
    "agent.extraEnv",
    "agent.extraHostPathMounts",
    "agent.gatewayTimeoutCreation",
    "agent.host",
    "agent.host.interface",
    "agent.host.iptables",
    "agent.host.iptablesRemoveOnShutdown",
    "agent.host.port",
    "agent.image",
    "agent.image.pullPolicy",
    "agent.image.repository",
    "agent.image.tag",
    "agent.initContainers",
    "agent.keepaliveParams",
    "agent.keepaliveParams.time",
    "agent.keepaliveParams.timeout",
    "agent.livenessProbe",
    "agent.livenessProbe.failureThreshold",
    "agent.livenessProbe.initialDelaySeconds",
    "agent.livenessProbe.periodSeconds",
    "agent.livenessProbe.successThreshold",
    "agent.livenessProbe.timeoutSeconds",
    "agent.log",
    "agent.log.jsonOutput",
    "agent.log.level",
    "agent.name",
    "agent.nodeSelector",
    "agent.podAnnotations",
    "agent.podLabels",
    "agent.priorityClassName",
    "agent.prometheus",
    "agent.prometheus.port",
    "agent.prometheus.scrape",
    "agent.prometheus.servicemonitor",
    "agent.prometheus.servicemonitor.enabled",
    "agent.prometheus.servicemonitor.interval",
    "agent.prometheus.servicemonitor.labels",
    "agent.prometheus.servicemonitor.path",
    "agent.prometheus.syncInterval",
    "agent.resources",
    "agent.seLinuxOptions",
    "agent.serviceAnnotations",
    "agent.serviceLabels",
    "agent.tlsCerts",
    "agent.tlsCerts.caFileName",
    "agent.tlsCerts.certFileName",
    "agent.tlsCerts.keyFileName",
    "agent.tlsFiles",
    "agent.tlsFiles.ca",
    "agent.tlsFiles.cert",
    "agent.tlsFiles.key",
    "agent.tlsSecret",
    "agent.tolerations",
    "agent.updateStrategy",
    "extraArgs",
    "imagePullSecrets",
    "psp",
    "psp.create",
    "rbac",
    "rbac.create",
    "server",
    "server.affinity",
    "server.assumeRoleArn",
    "server.cache",
    "server.cache.syncInterval",
    "server.deployment",
    "server.deployment.enabled",
    "server.deployment.replicas",
    "server.disableStrictNamespaceRegexp",
    "server.enabled",
    "server.extraArgs",
    "server.extraEnv",
    "server.extraHostPathMounts",
    "server.gatewayTimeoutCreation",
    "server.image",
    "server.image.pullPolicy",
    "server.image.repository",
    "server.image.tag",
    "server.initContainers",
    "server.keepaliveParams",
    "server.keepaliveParams.maxConnectionAge",
    "server.keepaliveParams.maxConnectionAgeGrace",
    "server.keepaliveParams.maxConnectionIdle",
    "server.keepaliveParams.time",
    "server.keepaliveParams.timeout",
    "server.livenessProbe",
    "server.livenessProbe.failureThreshold",
    "server.livenessProbe.initialDelaySeconds",
    "server.livenessProbe.periodSeconds",
    "server.livenessProbe.successThreshold",
    "server.livenessProbe.timeoutSeconds",
    "server.log",
    "server.log.jsonOutput",
    "server.log.level",
    "server.name",
    "server.nodeSelector",
    "server.podAnnotations",
    "server.podLabels",
    "server.priorityClassName",
    "server.probes",
    "server.probes.serverAddress",
    "server.prometheus",
    "server.prometheus.port",
    "server.prometheus.scrape",
    "server.prometheus.servicemonitor",
    "server.prometheus.servicemonitor.enabled",
    "server.prometheus.servicemonitor.interval",
    "server.prometheus.servicemonitor.labels",
    "server.prometheus.servicemonitor.path",
    "server.prometheus.syncInterval",
    "server.readinessProbe",
    "server.readinessProbe.failureThreshold",
    "server.readinessProbe.initialDelaySeconds",
    "server.readinessProbe.periodSeconds",
    "server.readinessProbe.successThreshold",
    "server.readinessProbe.timeoutSeconds",
    "server.resources",
    "server.roleBaseArn",
    "server.seLinuxOptions",
    "server.service",
    "server.service.port",
    "server.service.targetPort",
    "server.serviceAnnotations",
    "server.serviceLabels",
    "server.sessionDuration",
    "server.sslCertHostPath",
    "server.tlsCerts",
    "server.tlsCerts.caFileName",
    "server.tlsCerts.certFileName",
    "server.tlsCerts.keyFileName",
    "server.tlsFiles",
    "server.tlsFiles.ca",
    "server.tlsFiles.cert",
    "server.tlsFiles.key",
    "server.tlsSecret",
    "server.tolerations",
    "server.updateStrategy",
    "server.useHostNetwork",
    "serviceAccounts",
    "serviceAccounts.agent",
    "serviceAccounts.agent.annotations",
    "serviceAccounts.agent.create",
    "serviceAccounts.agent.name",
    "serviceAccounts.server",
    "serviceAccounts.server.annotations",
    "serviceAccounts.server.create",
    "serviceAccounts.server.name",
];

#[test]
fn values_have_every_key_of_go_kiams_chart() {
    fn paths(v: &serde_yaml::Value, prefix: &str, out: &mut Vec<String>) {
        if let Some(map) = v.as_mapping() {
            for (k, v) in map {
                let p = if prefix.is_empty() {
                    k.as_str().unwrap().to_string()
                } else {
                    format!("{prefix}.{}", k.as_str().unwrap())
                };
                paths(v, &p, out);
                out.push(p);
            }
        }
    }
    let values: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(chart().join("values.yaml")).unwrap())
            .unwrap();
    let mut ours = Vec::new();
    paths(&values, "", &mut ours);
    let missing: Vec<&&str> = GO_KIAM_CHART_KEYS
        .iter()
        .filter(|k| !ours.iter().any(|o| o == *k))
        .collect();
    assert!(missing.is_empty(), "values.yaml lacks {missing:?}");
}
