//! Our processes beside the real Go kiam (`KIAM_GO_BIN`, built by
//! `scripts/peers.sh kiam-go`): a Go agent asking our server and our agent
//! asking a Go server must answer pods exactly as the same agent does with a
//! server of its own kind; either agent keeps serving through a rolling
//! upgrade (one Go and one Rust server, either stopped); each `kiam health`
//! passes against the other's server; and every flag Go kiam lists passes
//! our `--check-config`. All run against one in-memory API server and one
//! moto, with certificates from `kiam::certs::generate` (what `kiam certs`
//! writes), so Go kiam accepting them in both roles is proven by every pair
//! that answers at all.
//!
//! The HTTP answers are compared, not the gRPC ones: a Go agent turns the
//! status strings of a server (`no pod found`, `forbidden by policy`) into
//! HTTP statuses, and that is what a pod sees. Differences that are ours to
//! fix are pinned, with docs/MIGRATING.md ("Tested against Go kiam"), so a
//! fix updates both.

#[path = "support/gokiam.rs"]
mod gokiam;
#[path = "support/procs.rs"]
mod procs;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use gokiam::{go_agent_cmd, go_flags, go_kiam_bin, go_server_cmd, StsProxy};
use procs::{free_port, start_moto, wait_for_port, ChildGuard, Moto, ProcCluster};

const BASE: &str = "arn:aws:iam::123456789012:role/";
/// A pod whose namespace permits its role.
const PERMITTED_IP: &str = "198.18.5.10";
/// A pod whose namespace does not permit its role.
const FORBIDDEN_IP: &str = "198.18.5.20";
/// No pod has this IP.
const UNKNOWN_IP: &str = "198.18.5.99";
const ROLES: &str = "/latest/meta-data/iam/security-credentials/";

/// Go agents retry a missing pod for 5 s before answering, hence the long bound.
async fn get(port: u16, path: &str) -> Result<(u16, String), String> {
    procs::http_get(port, path, Duration::from_secs(15)).await
}

/// Both servers, Go's and ours, over one cluster, one moto, one PKI.
struct Servers {
    go_bin: PathBuf,
    cluster: ProcCluster,
    go_port: u16,
    our_port: u16,
    go: Option<ChildGuard>,
    ours: Option<ChildGuard>,
    sts: StsProxy,
    moto: Moto,
}

impl Servers {
    /// `None` (after a SKIPPED line) without Go kiam or moto.
    async fn start() -> Option<Servers> {
        let go_bin = go_kiam_bin()?;
        let moto = start_moto()?;
        let sts = StsProxy::start(&moto.url).await;
        let cluster = ProcCluster::start().await;
        cluster.namespace("team-a", ".*");
        cluster.namespace("team-b", "^only-this$");
        cluster.pod("team-a", "web", PERMITTED_IP, "web-role");
        cluster.pod("team-b", "locked", FORBIDDEN_IP, "web-role");

        let (go_port, our_port) = (free_port(), free_port());
        let go = spawn_go_server(&go_bin, &cluster, go_port, &sts);
        let ours = spawn_our_server(&cluster, our_port, &moto);
        Some(Servers {
            go_bin,
            cluster,
            go_port,
            our_port,
            go: Some(go),
            ours: Some(ours),
            sts,
            moto,
        })
    }

    /// Stops (SIGKILL) the Go server, or starts it again on its port.
    fn go_server(&mut self, running: bool) {
        self.go = None;
        if running {
            let go = spawn_go_server(&self.go_bin, &self.cluster, self.go_port, &self.sts);
            self.go = Some(go);
        }
    }

    /// Stops (SIGKILL) our server, or starts it again on its port.
    fn our_server(&mut self, running: bool) {
        self.ours = None;
        if running {
            self.ours = Some(spawn_our_server(&self.cluster, self.our_port, &self.moto));
        }
    }

    fn go_agent(&self, server_port: u16) -> (u16, ChildGuard) {
        let port = free_port();
        let cmd = go_agent_cmd(
            &self.go_bin,
            &self.cluster.pki.dir,
            port,
            &format!("127.0.0.1:{server_port}"),
        );
        let agent = ChildGuard::spawn(format!("Go kiam agent -> :{server_port}"), cmd).unwrap();
        assert!(
            wait_for_port(port, Duration::from_secs(30)),
            "the Go kiam agent never listened"
        );
        (port, agent)
    }

    fn our_agent(&self, server_port: u16) -> (u16, ChildGuard) {
        let port = free_port();
        let cmd = self.cluster.agent_cmd(
            port,
            &format!("127.0.0.1:{server_port}"),
            // No upstream metadata service: only kiam's own routes are asked.
            &format!("http://127.0.0.1:{}", free_port()),
            &["--allow-ip-query"],
        );
        let agent = ChildGuard::spawn(format!("kiam agent -> :{server_port}"), cmd).unwrap();
        assert!(
            wait_for_port(port, Duration::from_secs(30)),
            "our agent never listened"
        );
        (port, agent)
    }
}

/// Go kiam's server on 127.0.0.1:`port`, listening when this returns.
fn spawn_go_server(bin: &Path, cluster: &ProcCluster, port: u16, sts: &StsProxy) -> ChildGuard {
    let cmd = go_server_cmd(
        bin,
        &cluster.kubeconfig,
        &cluster.pki.dir,
        port,
        sts,
        // Go kiam since v4.1 exits at start ("role can't be empty") without
        // one.
        &["--role-base-arn", BASE, "--assume-role-arn", "kiam-server"],
    );
    let child = ChildGuard::spawn("Go kiam server", cmd).unwrap();
    assert!(
        wait_for_port(port, Duration::from_secs(30)),
        "the Go kiam server never listened"
    );
    child
}

/// Our server on 127.0.0.1:`port`, listening when this returns.
fn spawn_our_server(cluster: &ProcCluster, port: u16, moto: &Moto) -> ChildGuard {
    let child = cluster.spawn_server(
        &moto.url,
        &[
            "--role-base-arn",
            BASE,
            "--bind",
            &format!("127.0.0.1:{port}"),
        ],
    );
    assert!(
        wait_for_port(port, Duration::from_secs(30)),
        "our server never listened"
    );
    child
}

/// What one agent answered for each case.
#[derive(Debug)]
struct Answers {
    /// The role list of the permitted pod.
    roles: (u16, String),
    /// Its credentials: status and AccessKeyId.
    credentials: (u16, String),
    /// A role the permitted pod is not annotated with.
    other_role: u16,
    /// The forbidden pod's own role.
    forbidden: u16,
    /// The role list for an IP no pod has.
    unknown_roles: u16,
    /// Credentials for an IP no pod has.
    unknown_credentials: u16,
}

/// Asks the agent on `port` every case, once its server has synced (the
/// permitted pod's role list answers 200 within 30 s).
async fn answers(port: u16) -> Answers {
    let deadline = Instant::now() + Duration::from_secs(30);
    let roles = loop {
        match get(port, &format!("{ROLES}?ip={PERMITTED_IP}")).await {
            Ok((200, body)) => break (200, body),
            last if Instant::now() >= deadline => {
                panic!("agent on {port} never listed the pod's role: {last:?}")
            }
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    let status = |path: String| async move { get(port, &path).await.unwrap().0 };
    let (code, body) = get(port, &format!("{ROLES}web-role?ip={PERMITTED_IP}"))
        .await
        .unwrap();
    let key = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["AccessKeyId"].as_str().map(str::to_string))
        .unwrap_or(body);
    Answers {
        roles,
        credentials: (code, key),
        other_role: status(format!("{ROLES}other-role?ip={PERMITTED_IP}")).await,
        forbidden: status(format!("{ROLES}web-role?ip={FORBIDDEN_IP}")).await,
        unknown_roles: status(format!("{ROLES}?ip={UNKNOWN_IP}")).await,
        unknown_credentials: status(format!("{ROLES}web-role?ip={UNKNOWN_IP}")).await,
    }
}

/// A case where an agent answers differently with the other implementation's
/// server: (case, with a server of its own kind, with the other kind).
type Known = (&'static str, u16, u16);

/// `mixed` (an agent with the other implementation's server) answers every
/// case as `same` (that agent with a server of its own kind) does, but for
/// the `known` differences, which must be exactly as listed (docs/MIGRATING.md
/// has them: a fix changes the table and this list together). Both serve the
/// permitted pod and refuse the rest.
fn assert_same(what: &str, same: &Answers, mixed: &Answers, known: &[Known]) {
    eprintln!("{what}\n  same kind: {same:?}\n  mixed:     {mixed:?}");
    for a in [same, mixed] {
        assert_eq!(a.roles.1.trim(), "web-role", "{what}: {a:?}");
        assert_eq!(a.credentials.0, 200, "{what}: {a:?}");
        assert!(a.credentials.1.starts_with("ASIA"), "{what}: {a:?}");
        for refused in [
            a.other_role,
            a.forbidden,
            a.unknown_roles,
            a.unknown_credentials,
        ] {
            assert_ne!(refused, 200, "{what}: a refusal answered 200: {a:?}");
        }
    }
    let cases = [
        ("role list", same.roles.0, mixed.roles.0),
        ("unannotated role", same.other_role, mixed.other_role),
        ("forbidden by policy", same.forbidden, mixed.forbidden),
        (
            "no pod found (role list)",
            same.unknown_roles,
            mixed.unknown_roles,
        ),
        (
            "no pod found (credentials)",
            same.unknown_credentials,
            mixed.unknown_credentials,
        ),
    ];
    for (case, s, m) in cases {
        match known.iter().find(|k| k.0 == case) {
            Some(&(_, ks, km)) => assert_eq!(
                (s, m),
                (ks, km),
                "{what}: {case}: the known difference changed; update docs/MIGRATING.md"
            ),
            None => assert_eq!(s, m, "{what}: {case}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_agent_answers_the_same_with_our_server_as_with_a_go_server() {
    let Some(s) = Servers::start().await else {
        return;
    };
    let (with_go, _a) = s.go_agent(s.go_port);
    let (with_ours, _b) = s.go_agent(s.our_port);
    let (same, mixed) = tokio::join!(answers(with_go), answers(with_ours));
    assert_same("Go agent: Go server vs our server", &same, &mixed, &[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_agent_answers_the_same_with_a_go_server_as_with_ours() {
    let Some(s) = Servers::start().await else {
        return;
    };
    let (with_ours, _a) = s.our_agent(s.our_port);
    let (with_go, _b) = s.our_agent(s.go_port);
    let (same, mixed) = tokio::join!(answers(with_ours), answers(with_go));
    assert_same(
        "our agent: our server vs Go server",
        &same,
        &mixed,
        &[
            // Our server says which check refused (response metadata) and
            // our agent answers "not the pod's role" 404, as EC2 does; a Go
            // server does not say, so the agent can only answer 403.
            ("unannotated role", 404, 403),
        ],
    );
}

/// Credentials for a new pod at `ip` (so no agent cache can answer): 200
/// within 30 s, once a server has seen the pod.
async fn new_pod_credentials(s: &Servers, agent: u16, name: &str, ip: &str) {
    s.cluster.pod("team-a", name, ip, "web-role");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match get(agent, &format!("{ROLES}web-role?ip={ip}")).await {
            Ok((200, body)) if body.contains("ASIA") => return,
            last if Instant::now() >= deadline => {
                panic!("no credentials for new pod {name} ({ip}): {last:?}")
            }
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// A rolling upgrade seen from our agent: its `--server-address` lists one
/// Go and one Rust server, and it keeps serving new pods while either one
/// is down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_agent_keeps_serving_while_either_a_go_or_a_rust_server_is_down() {
    let Some(mut s) = Servers::start().await else {
        return;
    };
    let port = free_port();
    let cmd = s.cluster.agent_cmd(
        port,
        &format!("127.0.0.1:{},127.0.0.1:{}", s.go_port, s.our_port),
        &format!("http://127.0.0.1:{}", free_port()),
        &["--allow-ip-query"],
    );
    let _agent = ChildGuard::spawn("kiam agent -> Go + ours", cmd).unwrap();
    assert!(wait_for_port(port, Duration::from_secs(30)));
    new_pod_credentials(&s, port, "web", PERMITTED_IP).await;

    s.our_server(false);
    new_pod_credentials(&s, port, "only-go", "198.18.5.31").await;

    s.our_server(true);
    s.go_server(false);
    new_pod_credentials(&s, port, "only-ours", "198.18.5.32").await;
}

/// Waits until something accepts connections on `addr`.
fn wait_for_addr(addr: &str, timeout: Duration) -> bool {
    kiam_sandbox::procs::wait_until(timeout, Duration::from_millis(20), || {
        std::net::TcpStream::connect(addr).is_ok()
    })
}

/// The same rolling upgrade seen from a Go agent. A Go agent finds its
/// servers by resolving one name (`kiam-server:<port>`, round robin over the
/// addresses), so it runs in a mount namespace whose /etc/hosts gives that
/// name two loopback addresses: the Go server on 127.0.0.1, ours on
/// 127.0.0.2, the same port. Needs root (unshare, mount).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_agent_keeps_serving_while_either_a_go_or_a_rust_server_is_down() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        let _ = writeln!(
            std::io::stderr(),
            "\n*** SKIPPED: not root; a Go agent's private /etc/hosts needs unshare -m ***\n"
        );
        return;
    }
    let Some(mut s) = Servers::start().await else {
        return;
    };
    // Ours moves to 127.0.0.2 on the Go server's port.
    s.our_server(false);
    let rust_addr = format!("127.0.0.2:{}", s.go_port);
    let spawn_rust = |s: &Servers| {
        let child = s.cluster.spawn_server(
            &s.moto.url,
            &["--role-base-arn", BASE, "--bind", &rust_addr],
        );
        assert!(
            wait_for_addr(&rust_addr, Duration::from_secs(30)),
            "our server never listened on {rust_addr}"
        );
        child
    };
    let rust = spawn_rust(&s);

    let dir = tempfile::tempdir().unwrap();
    let hosts = dir.path().join("hosts");
    std::fs::write(
        &hosts,
        "127.0.0.1 localhost\n127.0.0.1 kiam-server\n127.0.0.2 kiam-server\n",
    )
    .unwrap();
    let port = free_port();
    let agent = go_agent_cmd(
        &s.go_bin,
        &s.cluster.pki.dir,
        port,
        &format!("kiam-server:{}", s.go_port),
    );
    let mut cmd = std::process::Command::new("unshare");
    cmd.args([
        "-m",
        "sh",
        "-c",
        "mount --bind \"$0\" /etc/hosts && exec \"$@\"",
    ])
    .arg(&hosts)
    .arg(agent.get_program())
    .args(agent.get_args())
    // Go's own resolver reads every address of a name in /etc/hosts.
    .env("GODEBUG", "netdns=go");
    let _agent = ChildGuard::spawn("Go kiam agent -> kiam-server", cmd).unwrap();
    assert!(
        wait_for_port(port, Duration::from_secs(30)),
        "the Go kiam agent never listened"
    );
    new_pod_credentials(&s, port, "web", PERMITTED_IP).await;

    drop(rust);
    new_pod_credentials(&s, port, "only-go", "198.18.5.41").await;

    let _rust = spawn_rust(&s);
    s.go_server(false);
    new_pod_credentials(&s, port, "only-ours", "198.18.5.42").await;
}

/// Every flag Go kiam's server and agent accept, as a manifest would write
/// it (its default or a real value; for a boolean both `--flag` and
/// kingpin's `--no-flag`), passes our `--check-config`, but for the pinned
/// gaps (docs/MIGRATING.md lists them; a fix changes both).
#[test]
fn our_binaries_accept_every_flag_go_kiam_accepts() {
    let Some(go) = go_kiam_bin() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    kiam::certs::generate(&certs, &[], 1).unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        "apiVersion: v1\nkind: Config\nclusters: [{name: c, cluster: {server: 'http://127.0.0.1:1'}}]\n\
         users: [{name: u, user: {}}]\ncontexts: [{name: c, context: {cluster: c, user: u}}]\n\
         current-context: c\n",
    )
    .unwrap();
    let mut rejected = Vec::new();
    for role in ["server", "agent"] {
        let tls_role = if role == "server" { "server" } else { "agent" };
        for (name, value) in go_flags(&go, role) {
            // Given in every run below.
            if ["cert", "key", "ca", "host"].contains(&name.as_str()) {
                continue;
            }
            let forms: Vec<Vec<String>> = match value.as_deref() {
                None => vec![vec![format!("--{name}")], vec![format!("--no-{name}")]],
                Some("PROMETHEUS-LISTEN-ADDR") => {
                    vec![vec![format!("--{name}"), "127.0.0.1:9620".into()]]
                }
                Some("ROLE-BASE-ARN") => vec![vec![format!("--{name}"), BASE.into()]],
                Some(v) => vec![vec![format!("--{name}={v}")]],
            };
            for form in forms {
                let mut cmd = procs::kiam_bin();
                cmd.arg(role);
                kiam_sandbox::procs::tls_args(&mut cmd, &certs, tls_role);
                if role == "agent" {
                    cmd.args(["--host", "127.0.0.1"]);
                } else {
                    if name != "kubeconfig" {
                        cmd.arg("--kubeconfig").arg(&kubeconfig);
                    }
                    if !name.starts_with("role-base-arn") {
                        cmd.args(["--role-base-arn", BASE]);
                    }
                }
                cmd.args(&form).arg("--check-config");
                let out = cmd.output().unwrap();
                if !out.status.success() {
                    eprintln!(
                        "kiam {role} {}: {:?}: {}",
                        form.join(" "),
                        out.status.code(),
                        String::from_utf8_lossy(&out.stderr)
                            .lines()
                            .last()
                            .unwrap_or_default()
                    );
                    rejected.push(format!("{role} {}", form[0]));
                }
            }
        }
    }
    // Kingpin gives every boolean a `--no-` form (Go kiam's own Helm chart
    // passes `--no-iptables-remove`); ours take them too.
    assert!(
        rejected.is_empty(),
        "our binaries reject flags Go kiam accepts: {rejected:?}"
    );
}

/// `kiam health` (what probes run) from each implementation against the
/// other's server: exit 0 once the server answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_commands_pass_against_the_other_implementations_server() {
    let Some(s) = Servers::start().await else {
        return;
    };
    let health = |mut cmd: std::process::Command, port: u16| {
        cmd.arg("health")
            .args(["--server-address", &format!("127.0.0.1:{port}")])
            .args(["--timeout", "2s"]);
        kiam_sandbox::procs::tls_args(&mut cmd, &s.cluster.pki.dir, "agent");
        cmd
    };
    for (what, make, port) in [
        ("Go kiam health -> our server", true, s.our_port),
        ("our kiam health -> Go server", false, s.go_port),
    ] {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let bin = if make {
                std::process::Command::new(&s.go_bin)
            } else {
                procs::kiam_bin()
            };
            let out = health(bin, port).output().unwrap();
            if out.status.success() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: {:?}\n{}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// `kiam explain` (a new RPC beside the old ones) against a Go kiam server,
/// which answers it UNIMPLEMENTED: says so and exits 1. Against our server
/// beside it, the same pod is explained and served (exit 0).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_says_a_go_server_does_not_support_it() {
    let Some(s) = Servers::start().await else {
        return;
    };
    let explain = |port: u16| {
        let mut cmd = procs::kiam_bin();
        cmd.arg("explain")
            .args(["--server-address", &format!("127.0.0.1:{port}")])
            .args(["--timeout", "2s"]);
        kiam_sandbox::procs::tls_args(&mut cmd, &s.cluster.pki.dir, "agent");
        cmd.arg("team-a/web").output().unwrap()
    };
    for (what, port, code, says) in [
        ("Go server", s.go_port, 1, "does not support explain"),
        ("our server", s.our_port, 0, "team-a/web: would be served"),
    ] {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = explain(port);
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            if out.status.code() == Some(code) && text.contains(says) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: {:?}\n{text}",
                out.status
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}
