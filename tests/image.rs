//! The container image, run for real: podman (as root, with a local OCI
//! runtime) starts the image scripts/image.sh built, with the arguments,
//! security context and mounts of deploy/base, on a node made of network
//! namespaces. The server runs as non-root and its own probe (`kiam health`,
//! run inside the container) answers; the agent, with only NET_ADMIN and
//! NET_RAW, installs its DNAT rule in the node's namespace and serves a Pod
//! its role's credentials through it. The arm64 image's binary runs under
//! qemu-user against the arm64 image's own libraries.
//!
//! Needs root and the variables scripts/image.sh prints (scripts/test.sh
//! exports them): KIAM_IMAGE (amd64) and KIAM_IMAGE_ARM64. Without them
//! every test says SKIPPED loudly.
//!
//! Containers join namespaces the test made (`--network ns:`), never
//! podman's own networks, so podman adds no firewall rules; they are removed
//! on drop, also when a test panics.

#[path = "support/netns.rs"]
mod netns;

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use kiam_sandbox::netns::NodeOptions;
use netns::Node;
use serde_json::Value;

/// The node's address (on its loopback): the agent's HOST_IP.
const NODE_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// The Pod the agent serves.
const POD_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 10);
/// The server's uid and gid (deploy/base/server-deployment.yaml).
const NONROOT: u32 = 65532;
/// Limits given to every container: podman's defaults are above what this
/// process may set (no CAP_SYS_RESOURCE in CI's sandbox), and the runtime
/// then refuses to start anything.
const ULIMITS: [&str; 4] = [
    "--ulimit",
    "nofile=4096:4096",
    "--ulimit",
    "nproc=16384:16384",
];

fn skipped(why: &str) {
    // Straight to stderr: libtest captures eprintln! of passing tests.
    let _ = writeln!(std::io::stderr(), "\n*** SKIPPED: {why} ***\n");
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// `$var` when set, root, and podman present; else SKIPPED and `None`.
fn image_from(var: &str) -> Option<String> {
    let Some(image) = std::env::var(var).ok().filter(|v| !v.is_empty()) else {
        skipped(&format!(
            "{var} is not set: the container image was not tested \
             (scripts/test.sh builds it with scripts/image.sh as root)"
        ));
        return None;
    };
    if !is_root() {
        skipped(&format!(
            "{var}={image}, but podman's storage and namespaces need root"
        ));
        return None;
    }
    Some(image)
}

fn output(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn ok(cmd: &mut Command) -> String {
    let out = output(cmd);
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// podman with the OCI runtime that works on this machine: crun (podman's
/// default) refuses hosts with cgroup controllers on both hierarchies, runc
/// does not.
struct Podman {
    runtime: String,
}

impl Podman {
    fn find(image: &str) -> Podman {
        let mut why = Vec::new();
        for runtime in ["crun", "runc"] {
            let out = output(
                Command::new("podman")
                    .args(["run", "--rm", "--pull=never", "--network=none"])
                    .args(["--runtime", runtime])
                    .args(ULIMITS)
                    .args([image, "--version"]),
            );
            if out.status.success() {
                return Podman {
                    runtime: runtime.into(),
                };
            }
            why.push(format!(
                "{runtime}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        panic!("no OCI runtime runs {image}: {}", why.join("; "))
    }

    fn cmd(&self) -> Command {
        let mut cmd = Command::new("podman");
        cmd.args(["--runtime", &self.runtime]);
        cmd
    }

    /// `podman run --rm <args> <image> <argv>`: its output.
    fn run(&self, args: &[&str], image: &str, argv: &[&str]) -> Output {
        output(
            self.cmd()
                .args(["run", "--rm", "--pull=never"])
                .args(ULIMITS)
                .args(args)
                .arg(image)
                .args(argv),
        )
    }
}

/// A detached container, removed when dropped.
struct Container<'a> {
    podman: &'a Podman,
    name: String,
}

impl<'a> Container<'a> {
    fn start(
        podman: &'a Podman,
        name: &str,
        args: &[String],
        image: &str,
        argv: &[String],
    ) -> Self {
        let name = format!("kiam-image-test-{}-{name}", std::process::id());
        // A container of a crashed run with this name would block the start.
        let _ = podman.cmd().args(["rm", "-f", "-t", "0", &name]).output();
        let container = Container { podman, name };
        ok(podman
            .cmd()
            .args(["run", "-d", "--pull=never", "--name", &container.name])
            .args(ULIMITS)
            .args(args)
            .arg(image)
            .args(argv));
        container
    }

    fn logs(&self) -> String {
        let out = output(self.podman.cmd().args(["logs", &self.name]));
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    fn exec(&self, argv: &[String]) -> Output {
        output(self.podman.cmd().args(["exec", &self.name]).args(argv))
    }

    /// The uid and gid the container's main process runs as, seen from here.
    fn ids(&self) -> (u32, u32) {
        let pid = ok(self
            .podman
            .cmd()
            .args(["inspect", "--format", "{{.State.Pid}}", &self.name]));
        let status = std::fs::read_to_string(format!("/proc/{}/status", pid.trim())).unwrap();
        let field = |name: &str| -> u32 {
            let line = status
                .lines()
                .find(|l| l.starts_with(name))
                .unwrap_or_else(|| panic!("no {name} in /proc/<pid>/status"));
            // Real, effective, saved, filesystem: all must agree.
            let ids: Vec<u32> = line[name.len()..]
                .split_whitespace()
                .map(|v| v.parse().unwrap())
                .collect();
            assert!(ids.iter().all(|&i| i == ids[0]), "{line}");
            ids[0]
        };
        (field("Uid:"), field("Gid:"))
    }

    fn running(&self) -> bool {
        output(
            self.podman
                .cmd()
                .args(["inspect", "--format", "{{.State.Running}}", &self.name]),
        )
        .stdout
        .starts_with(b"true")
    }
}

impl Drop for Container<'_> {
    fn drop(&mut self) {
        let _ = self
            .podman
            .cmd()
            .args(["rm", "-f", "-t", "2", &self.name])
            .output();
    }
}

/// The image's root, mounted read-only here until dropped.
struct Mounted {
    image: String,
    root: PathBuf,
}

impl Mounted {
    fn new(image: &str) -> Mounted {
        let root = ok(Command::new("podman").args(["image", "mount", image]));
        Mounted {
            image: image.into(),
            root: PathBuf::from(root.trim()),
        }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("podman")
            .args(["image", "unmount", &self.image])
            .output();
    }
}

/// One container of a deploy/base manifest.
struct Deployed {
    pod: Value,
    container: Value,
}

fn deployed(file: &str) -> Deployed {
    let text = std::fs::read_to_string(repo().join("deploy/base").join(file)).unwrap();
    let doc: Value = serde_yaml::from_str(&text).unwrap();
    let pod = doc["spec"]["template"]["spec"].clone();
    let container = pod["containers"][0].clone();
    Deployed { pod, container }
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| a.iter().map(|s| s.as_str().unwrap().to_string()).collect())
        .unwrap_or_default()
}

impl Deployed {
    /// command + args, as the kubelet runs them.
    fn argv(&self) -> Vec<String> {
        let mut argv = strings(&self.container["command"]);
        argv.extend(strings(&self.container["args"]));
        argv
    }

    /// podman flags for the manifest's security context (the container's
    /// settings over the Pod's), sysctls and read-only root.
    fn security_flags(&self) -> Vec<String> {
        let pod = &self.pod["securityContext"];
        let c = &self.container["securityContext"];
        let get = |k: &str| {
            if c[k].is_null() {
                pod[k].clone()
            } else {
                c[k].clone()
            }
        };
        let mut flags = Vec::new();
        match (get("runAsUser").as_u64(), get("runAsGroup").as_u64()) {
            (Some(u), Some(g)) => flags.push(format!("--user={u}:{g}")),
            (Some(u), None) => flags.push(format!("--user={u}")),
            _ => {}
        }
        if let Some(g) = pod["fsGroup"].as_u64() {
            flags.push(format!("--group-add={g}"));
        }
        if get("allowPrivilegeEscalation") == Value::Bool(false) {
            flags.push("--security-opt=no-new-privileges".into());
        }
        // RuntimeDefault is podman's default profile; anything else would
        // need translating.
        assert_eq!(
            get("seccompProfile")["type"],
            "RuntimeDefault",
            "seccompProfile"
        );
        if get("readOnlyRootFilesystem") == Value::Bool(true) {
            // Only what the manifest mounts is writable: no tmpfs of podman's.
            flags.push("--read-only".into());
            flags.push("--read-only-tmpfs=false".into());
        }
        for cap in strings(&c["capabilities"]["drop"]) {
            flags.push(format!("--cap-drop={cap}"));
        }
        for cap in strings(&c["capabilities"]["add"]) {
            flags.push(format!("--cap-add={cap}"));
        }
        if let Some(sysctls) = pod["sysctls"].as_array() {
            for s in sysctls {
                flags.push(format!(
                    "--sysctl={}={}",
                    s["name"].as_str().unwrap(),
                    s["value"].as_str().unwrap()
                ));
            }
        }
        flags
    }

    /// The manifest's volumeMounts, from the directories given per volume
    /// name (an emptyDir with `medium: Memory` becomes a tmpfs).
    fn volume_flags(&self, sources: &[(&str, &Path)]) -> Vec<String> {
        let mut flags = Vec::new();
        for m in self.container["volumeMounts"].as_array().unwrap() {
            let name = m["name"].as_str().unwrap();
            let path = m["mountPath"].as_str().unwrap();
            let volume = self.pod["volumes"]
                .as_array()
                .unwrap()
                .iter()
                .find(|v| v["name"] == name)
                .unwrap();
            if volume["emptyDir"].is_object() {
                flags.push(format!("--tmpfs={path}:rw,nosuid,nodev,size=16m"));
                continue;
            }
            let (_, source) = sources
                .iter()
                .find(|(n, _)| *n == name)
                .unwrap_or_else(|| panic!("no source for volume {name}"));
            let ro = if m["readOnly"] == Value::Bool(true) {
                ":ro"
            } else {
                ""
            };
            flags.push(format!("--volume={}:{path}{ro}", source.display()));
        }
        flags
    }

    /// The manifest's env, with fieldRefs resolved from `fields`.
    fn env_flags(&self, fields: &[(&str, &str)], values: &[(&str, &str)]) -> Vec<String> {
        let mut flags = Vec::new();
        for e in self.container["env"].as_array().into_iter().flatten() {
            let name = e["name"].as_str().unwrap();
            let value = if let Some(v) = values.iter().find(|(n, _)| *n == name) {
                v.1.to_string()
            } else if let Some(path) = e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                fields
                    .iter()
                    .find(|(p, _)| *p == path)
                    .unwrap_or_else(|| panic!("no value for fieldRef {path}"))
                    .1
                    .to_string()
            } else {
                e["value"].as_str().unwrap().to_string()
            };
            flags.push(format!("--env={name}={value}"));
        }
        flags
    }

    /// A probe's exec command.
    fn probe(&self, probe: &str) -> Vec<String> {
        strings(&self.container[probe]["exec"]["command"])
    }
}

/// A Secret's files as the kubelet mounts them: owned by root, group the
/// Pod's fsGroup (when set), the volume's defaultMode.
fn secret_dir(from: &Path, files: &[&str], mode: u32, group: Option<u32>) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    for f in files {
        let to = dir.path().join(f);
        std::fs::copy(from.join(f), &to).unwrap();
        std::os::unix::fs::chown(&to, Some(0), group).unwrap();
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    dir
}

fn poll(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    f()
}

/// What the image says about itself: non-root by default, the base's Debian
/// release and packages as labels and in a file (and dpkg's database, which
/// scanners read), and working iptables (both backends) and conntrack.
#[test]
fn image_records_its_base_and_has_the_agents_tools() {
    let Some(image) = image_from("KIAM_IMAGE") else {
        return;
    };
    let inspect: Value = serde_json::from_str(&ok(
        Command::new("podman").args(["image", "inspect", &image])
    ))
    .unwrap();
    let config = &inspect[0]["Config"];
    assert_eq!(config["User"], format!("{NONROOT}:{NONROOT}"));
    assert_eq!(config["Entrypoint"][0], "/usr/local/bin/kiam");
    let labels = &config["Labels"];
    let release = labels["kiam.debian.release"]
        .as_str()
        .expect("a release label");
    assert!(release.starts_with("bookworm 12."), "{release}");
    let packages = labels["kiam.debian.packages"]
        .as_str()
        .expect("a packages label");
    for p in ["iptables=", "conntrack=", "ca-certificates=", "libc6="] {
        assert!(
            packages.split(' ').any(|w| w.starts_with(p)),
            "{p} not in {packages}"
        );
    }

    let mounted = Mounted::new(&image);
    let sbom =
        std::fs::read_to_string(mounted.root.join("usr/share/kiam/debian-packages.txt")).unwrap();
    assert!(sbom.starts_with("# debian 12."), "{sbom}");
    assert!(sbom.lines().any(|l| l.starts_with("iptables ")), "{sbom}");
    let status = std::fs::read_to_string(mounted.root.join("var/lib/dpkg/status")).unwrap();
    assert!(status.contains("Package: conntrack\n"));
    let bundle =
        std::fs::read_to_string(mounted.root.join("etc/ssl/certs/ca-certificates.crt")).unwrap();
    assert!(
        bundle.matches("BEGIN CERTIFICATE").count() > 100,
        "the CA bundle the server's STS client trusts"
    );
    // Go kiam's path, and the legacy backend first in PATH (docs/CNI.md).
    for (link, to) in [
        ("kiam", "usr/local/bin/kiam"),
        (
            "usr/local/lib/kiam/iptables-legacy/iptables",
            "/usr/sbin/iptables-legacy",
        ),
        (
            "usr/local/lib/kiam/iptables-legacy/ip6tables",
            "/usr/sbin/ip6tables-legacy",
        ),
    ] {
        let target = std::fs::read_link(mounted.root.join(link)).unwrap();
        assert_eq!(target, Path::new(to), "/{link}");
        let resolved = mounted.root.join(to.trim_start_matches('/'));
        assert!(resolved.exists(), "/{link} -> {to}: missing in the image");
    }
    drop(mounted);

    let podman = Podman::find(&image);
    for (program, want) in [
        ("/usr/local/bin/kiam", "kiam"),
        ("/kiam", "kiam"),
        ("/usr/sbin/iptables", "(nf_tables)"),
        ("/usr/sbin/ip6tables", "(nf_tables)"),
        ("/usr/local/lib/kiam/iptables-legacy/iptables", "(legacy)"),
        ("/usr/sbin/conntrack", "conntrack"),
    ] {
        let out = podman.run(
            &["--network=none", "--entrypoint", program],
            &image,
            &["--version"],
        );
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{program} --version: {text}");
        assert!(text.contains(want), "{program} --version: {text}");
    }
}

/// deploy/base on a node: the server and agent containers with the
/// manifests' arguments (plus `--kubeconfig`, as there is no in-cluster
/// API here, and another metrics port for the agent, as both share the
/// node's namespace), security contexts and mounts, in the node's network
/// namespace, with the node's metadata service at 169.254.169.254, STS and
/// the API server in the test. The server runs as 65532 and its probe
/// passes inside the container; the agent's DNAT rule lands in the node's
/// namespace and a Pod gets its role's credentials through it.
#[test]
fn containers_run_as_deployed_and_serve_a_pod() {
    let Some(image) = image_from("KIAM_IMAGE") else {
        return;
    };
    if let Err(e) = kiam_sandbox::netns::check_prerequisites() {
        panic!("{e} (scripts/test.sh installs it)");
    }
    let podman = Podman::find(&image);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let _rt = rt.enter();

    let mut node = Node::create(&NodeOptions {
        prefix: "kiami".into(),
        isolated: true,
        node_ip: Some(NODE_IP),
    })
    .unwrap();
    let node_ns = node.node_ns().unwrap().clone();
    node.exec_node(&["ip", "addr", "add", "169.254.169.254/32", "dev", "lo"]);
    let in_node = |addr: SocketAddr| {
        tokio::net::TcpListener::from_std(node_ns.bind_tcp(addr).unwrap()).unwrap()
    };

    // The node's metadata service, STS and the API server, on the node.
    let identity = kiam_sandbox::imds::NodeIdentity {
        local_ipv4: NODE_IP.to_string(),
        ..Default::default()
    };
    let _imds = kiam_sandbox::imds::ImdsEmulator::serve(
        in_node(SocketAddr::from(([169, 254, 169, 254], 80))),
        identity.clone(),
    )
    .unwrap();
    let sts = kiam_sandbox::sts::StsEmulator::serve(in_node(SocketAddr::from(([127, 0, 0, 1], 0))))
        .unwrap();
    let api = kiam_sandbox::apiserver::FakeApiServer::serve(in_node(SocketAddr::from((
        [127, 0, 0, 1],
        0,
    ))))
    .unwrap();
    let work = tempfile::tempdir().unwrap();
    std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let kubeconfig = work.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig).unwrap();
    std::fs::set_permissions(&kubeconfig, std::fs::Permissions::from_mode(0o644)).unwrap();

    let pod = node.add_pod(Some(POD_IP), None).unwrap().clone();
    let account = &identity.account_id;
    api.create_namespace(serde_json::json!({"metadata": {"name": "team-a",
        "annotations": {"iam.amazonaws.com/permitted": format!("arn:aws:iam::{account}:role/team-a-.*")}}}))
        .unwrap();
    api.apply_pod(serde_json::json!({
        "metadata": {"name": "web", "namespace": "team-a", "uid": "image-test-web",
                     "annotations": {"iam.amazonaws.com/role": "team-a-reader"}},
        "spec": {"containers": [{"name": "app", "image": "busybox"}], "nodeName": "node-a"},
        "status": {"phase": "Running", "podIP": POD_IP.to_string(),
                   "podIPs": [{"ip": POD_IP.to_string()}]}
    }))
    .unwrap();

    // The Secrets, made by the binary in the image.
    let pki = work.path().join("pki");
    std::fs::create_dir(&pki).unwrap();
    let out = podman.run(
        &[
            "--network=none",
            "--user=0",
            &format!("--volume={}:/out", pki.display()),
        ],
        &image,
        &["certs", "--out-dir", "/out"],
    );
    assert!(
        out.status.success(),
        "kiam certs in the image: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let server_tls = secret_dir(
        &pki,
        &["ca.pem", "server.pem", "server-key.pem"],
        0o440,
        Some(NONROOT),
    );
    let probe_tls = secret_dir(
        &pki,
        &["ca.pem", "agent.pem", "agent-key.pem"],
        0o440,
        Some(NONROOT),
    );
    let agent_tls = secret_dir(&pki, &["ca.pem", "agent.pem", "agent-key.pem"], 0o400, None);
    let xtables_lock = work.path().join("xtables.lock");
    std::fs::write(&xtables_lock, "").unwrap();
    let network = format!("--network=ns:{}", node_ns.path().display());

    // --- the server ---
    let server = deployed("server-deployment.yaml");
    let mut args = vec![network.clone()];
    args.extend(server.security_flags());
    args.extend(
        server.volume_flags(&[("tls", server_tls.path()), ("probe-tls", probe_tls.path())]),
    );
    args.push(format!(
        "--volume={}:/etc/kiam/kubeconfig:ro",
        kubeconfig.display()
    ));
    // Credentials and region come from the node's metadata service, as on
    // EC2; only STS is the test's.
    args.push(format!("--env=AWS_ENDPOINT_URL_STS=http://{}", sts.addr()));
    // The manifest's env (its own Pod IP from the downward API: the node's
    // address here, as the container shares the node's network).
    args.extend(server.env_flags(&[("status.podIP", &NODE_IP.to_string())], &[]));
    let mut argv = server.argv();
    let entrypoint = argv.remove(0);
    args.push(format!("--entrypoint={entrypoint}"));
    argv.push("--kubeconfig=/etc/kiam/kubeconfig".into());
    let server_c = Container::start(&podman, "server", &args, &image, &argv);

    let probe = server.probe("startupProbe");
    assert_eq!(probe, server.probe("readinessProbe"));
    let mut last = None;
    let healthy = poll(Duration::from_secs(60), || {
        let out = server_c.exec(&probe);
        let ok = out.status.success();
        last = Some(out);
        ok || !server_c.running()
    });
    let out = last.unwrap();
    assert!(
        healthy && out.status.success(),
        "the server's probe `{}` never passed: {}\n--- server log ---\n{}",
        probe.join(" "),
        String::from_utf8_lossy(&out.stderr),
        server_c.logs()
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");
    assert_eq!(server_c.ids(), (NONROOT, NONROOT), "the server's uid:gid");

    // --- the agent ---
    let agent = deployed("agent-daemonset.yaml");
    assert_eq!(agent.pod["hostNetwork"], true);
    let mut args = vec![network.clone(), "--add-host=kiam-server:127.0.0.1".into()];
    args.extend(agent.security_flags());
    args.extend(agent.volume_flags(&[
        ("tls", agent_tls.path()),
        ("xtables-lock", xtables_lock.as_path()),
    ]));
    let node_ip = NODE_IP.to_string();
    args.extend(agent.env_flags(
        &[
            ("status.podIP", &node_ip),
            ("status.podIPs", &node_ip),
            ("spec.nodeName", "node-a"),
        ],
        // What the CNI's component sets (deploy/components/host-interface).
        &[("KIAM_HOST_INTERFACE", &node.interface_wildcard())],
    ));
    let mut argv = agent.argv();
    let entrypoint = argv.remove(0);
    args.push(format!("--entrypoint={entrypoint}"));
    // The one change: the server shares the node's namespace here (in a
    // cluster it has its own, on another node) and holds 9620 already.
    let metrics = argv
        .iter_mut()
        .find(|a| a.starts_with("--prometheus-listen-addr="))
        .expect("the agent's --prometheus-listen-addr");
    *metrics = "--prometheus-listen-addr=0.0.0.0:9621".into();
    let agent_c = Container::start(&podman, "agent", &args, &image, &argv);

    let rule = format!("--to-destination {NODE_IP}:8181");
    let installed = poll(Duration::from_secs(30), || {
        let out = node.exec_node(&["iptables", "-w", "5", "-t", "nat", "-S", "PREROUTING"]);
        String::from_utf8_lossy(&out.stdout).contains(&rule) || !agent_c.running()
    });
    let rules = node.exec_node(&["iptables", "-w", "5", "-t", "nat", "-S", "PREROUTING"]);
    assert!(
        installed && String::from_utf8_lossy(&rules.stdout).contains(&rule),
        "no DNAT rule in the node's namespace:\n{}\n--- agent log ---\n{}",
        String::from_utf8_lossy(&rules.stdout),
        agent_c.logs()
    );
    assert_eq!(agent_c.ids(), (0, 0), "the agent's uid:gid");

    // Its own probes, from the node (the kubelet's view).
    for probe in ["livenessProbe", "readinessProbe"] {
        let path = agent.container[probe]["httpGet"]["path"].as_str().unwrap();
        let port = agent.container[probe]["httpGet"]["port"].as_u64().unwrap();
        let url = format!("http://{NODE_IP}:{port}{path}");
        let passed = poll(Duration::from_secs(30), || {
            node.exec_node(&["curl", "-sf", "--max-time", "5", &url])
                .status
                .success()
        });
        assert!(
            passed,
            "the agent's {probe} GET {url} never passed:\n{}",
            agent_c.logs()
        );
    }

    // The Pod, through the rule.
    let base = "http://169.254.169.254/latest/meta-data/iam/security-credentials/";
    let role = pod.http_get_blocking(base).unwrap_or_else(|e| {
        panic!(
            "{e}\n--- agent log ---\n{}\n--- server log ---\n{}",
            agent_c.logs(),
            server_c.logs()
        )
    });
    assert_eq!(role.trim(), "team-a-reader");
    let creds: Value = serde_json::from_str(
        &pod.http_get_blocking(&format!("{base}team-a-reader"))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(creds["Code"], "Success", "{creds}");
    let key = creds["AccessKeyId"].as_str().unwrap();
    assert!(!identity.markers().contains(&key), "the node's own key");
    let calls = sts.assume_role_calls();
    assert!(
        calls
            .iter()
            .any(|c| c.role_arn == format!("arn:aws:iam::{account}:role/team-a-reader")),
        "{calls:?}"
    );
    drop(agent_c);
    drop(server_c);
}

/// The arm64 image's binary starts under qemu-user, with the arm64 image's
/// own dynamic loader and libraries: `--version`, and `kiam certs` writes
/// a CA and certificates this (amd64) kiam accepts.
#[test]
fn arm64_binary_runs_under_emulation() {
    let Some(image) = image_from("KIAM_IMAGE_ARM64") else {
        return;
    };
    let Some(qemu) = ["qemu-aarch64", "qemu-aarch64-static"]
        .into_iter()
        .find(|q| Command::new(q).arg("--version").output().is_ok())
    else {
        panic!("KIAM_IMAGE_ARM64 is set but qemu-aarch64 is missing: apt-get install qemu-user");
    };
    let inspect: Value = serde_json::from_str(&ok(
        Command::new("podman").args(["image", "inspect", &image])
    ))
    .unwrap();
    assert_eq!(inspect[0]["Architecture"], "arm64");
    let mounted = Mounted::new(&image);
    let kiam = mounted.root.join("usr/local/bin/kiam");
    let elf = std::fs::read(&kiam).unwrap();
    // e_machine 183: EM_AARCH64.
    assert_eq!(
        u16::from_le_bytes([elf[18], elf[19]]),
        183,
        "not an arm64 binary"
    );

    let run = |args: &[&str]| {
        ok(Command::new(qemu)
            .arg("-L")
            .arg(&mounted.root)
            .arg(&kiam)
            .args(args))
    };
    let version = run(&["--version"]);
    assert!(version.starts_with("kiam "), "{version}");
    let dir = tempfile::tempdir().unwrap();
    run(&["certs", "--out-dir", dir.path().to_str().unwrap()]);
    for f in [
        "ca.pem",
        "server.pem",
        "server-key.pem",
        "agent.pem",
        "agent-key.pem",
    ] {
        let pem = std::fs::read_to_string(dir.path().join(f)).unwrap();
        assert!(pem.starts_with("-----BEGIN "), "{f}: {pem}");
    }
    // The amd64 binary reissues from the arm64 CA: the CA is sound.
    ok(Command::new(env!("CARGO_BIN_EXE_kiam"))
        .args(["certs", "--reissue", "--force", "--out-dir"])
        .arg(dir.path()));
}
