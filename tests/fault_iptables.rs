//! Fault scenario with a real `kiam agent --iptables` process on an
//! isolated node (network namespaces; root only, otherwise SKIPPED):
//! restarted with `--iptables-remove=false`, the DNAT rule never disappears
//! (checked every 20 ms throughout) and is never doubled; deleted by
//! someone else, the running agent puts it back. tests/iptables_netns.rs
//! covers the same rules at the library level (idempotent add, removal
//! at shutdown, conntrack flush, interface matching). A DNAT of the
//! metadata address to another port put above the rule after the agent
//! started (a leftover kube2iam) is overtaken at the agent's next check.

#[path = "support/netns.rs"]
mod netns;

use std::io::Write as _;
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiam_sandbox::netns::NetNs;
use netns::{Node, METADATA_URL};

/// Copies of the rule to `target` in the namespace's `nat PREROUTING`.
fn copies(ns: &NetNs, target: &str) -> usize {
    prerouting(ns, "iptables")
        .iter()
        .filter(|l| l.ends_with(&format!("--to-destination {target}")))
        .count()
}

/// The rules of the namespace's `nat PREROUTING`, as `iptables` (or
/// `iptables-legacy`) lists them.
fn prerouting(ns: &NetNs, iptables: &str) -> Vec<String> {
    let out = ns
        .exec(&[iptables, "-w", "5", "-t", "nat", "-S", "PREROUTING"])
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("-A PREROUTING"))
        .map(str::to_string)
        .collect()
}

/// Starts `kiam agent --iptables --iptables-remove=false` inside `ns`.
fn agent(ns: &NetNs, node: &Node, port: u16, pki: &kiam::certs::Pki) -> Child {
    agent_with_path(ns, node, port, pki, None)
}

/// [`agent`] with `path_first` put before `PATH`, as the agent's container
/// does for nodes on the legacy iptables backend (docs/CNI.md).
fn agent_with_path(
    ns: &NetNs,
    node: &Node,
    port: u16,
    pki: &kiam::certs::Pki,
    path_first: Option<&std::path::Path>,
) -> Child {
    let mut cmd = ns.command(env!("CARGO_BIN_EXE_kiam")).unwrap();
    if let Some(dir) = path_first {
        let mut path = std::ffi::OsString::from(dir);
        path.push(":");
        path.push(std::env::var_os("PATH").unwrap_or_default());
        cmd.env("PATH", path);
    }
    // No server is needed to keep the rule; the agent starts without one.
    kiam_sandbox::procs::agent_args(
        &mut cmd,
        port,
        "127.0.0.1:1",
        "http://127.0.0.1:1",
        &pki.dir,
    )
    .args(["--iptables", "--iptables-remove=false"])
    .args(["--host", &node.host_ip().to_string()])
    .args(["--host-interface", &node.interface_wildcard()])
    .stdout(Stdio::null())
    .stderr(kiam_sandbox::procs::child_stderr());
    cmd.spawn().unwrap()
}

/// SIGTERM, as the kubelet sends, then wait for the exit.
fn stop(mut child: Child) {
    // SAFETY: plain kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(15);
    while child.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "the agent did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_until(what: &str, bound: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < bound, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
    start.elapsed()
}

#[test]
fn the_rule_survives_an_agent_restart_and_is_restored_when_deleted() {
    let Some(node) = Node::isolated(
        "the_rule_survives_an_agent_restart_and_is_restored_when_deleted",
        1,
    ) else {
        return;
    };
    let ns = node.node_ns().expect("an isolated node").clone_named();
    let dir = tempfile::tempdir().unwrap();
    let pki = kiam::certs::generate(dir.path(), &[], 1).unwrap();
    // kiam's default port: the node namespace is this test's alone.
    let port = 3100;
    let target = format!("{}:{port}", node.host_ip());

    let first = agent(&ns, &node, port, &pki);
    wait_until("the rule", Duration::from_secs(20), || {
        copies(&ns, &target) == 1
    });

    // Watch the rule every 20 ms from now on.
    let stop_watching = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (ns, target, stop) = (ns.clone_named(), target.clone(), stop_watching.clone());
        std::thread::spawn(move || {
            let mut samples = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                samples.push(copies(&ns, &target));
                std::thread::sleep(Duration::from_millis(20));
            }
            samples
        })
    };

    let restart = Instant::now();
    stop(first);
    let second = agent(&ns, &node, port, &pki);
    let pod = node.pod(0);
    wait_until("the new agent to answer", Duration::from_secs(20), || {
        pod.http_get_blocking(&format!("{METADATA_URL}/ping"))
            .as_deref()
            == Ok("pong")
    });
    let restarted_in = restart.elapsed();
    std::thread::sleep(Duration::from_millis(300));
    stop_watching.store(true, Ordering::SeqCst);
    let samples = watcher.join().unwrap();
    assert!(samples.len() >= 3, "too few samples: {samples:?}");
    assert!(
        samples.iter().all(|&n| n == 1),
        "the rule disappeared or was doubled during the restart: {samples:?}"
    );

    // Someone deletes the rule: the running agent restores it (it checks
    // every 10 s).
    let out = ns
        .exec(&["iptables", "-w", "5", "-t", "nat", "-F", "PREROUTING"])
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(copies(&ns, &target), 0);
    let restored = wait_until("the rule to be restored", Duration::from_secs(25), || {
        copies(&ns, &target) == 1
    });
    assert_eq!(
        pod.http_get_blocking(&format!("{METADATA_URL}/ping"))
            .as_deref(),
        Ok("pong")
    );

    stop(second);
    assert_eq!(
        copies(&ns, &target),
        1,
        "--iptables-remove=false keeps the rule at shutdown"
    );
    report(
        "iptables/restart-and-restore",
        &[
            ("samples_during_restart", samples.len().to_string()),
            (
                "samples_without_rule",
                samples.iter().filter(|&&n| n == 0).count().to_string(),
            ),
            ("restart_to_serving", ms(restarted_in)),
            ("restored_after_delete", ms(restored)),
        ],
    );
}

#[test]
fn a_dnat_put_above_the_rule_is_overtaken_at_the_next_check() {
    dnat_put_above_the_rule(
        "a_dnat_put_above_the_rule_is_overtaken_at_the_next_check",
        "iptables",
    );
}

/// The same on a node whose iptables is the legacy backend: the agent's
/// `iptables` is `iptables-legacy` (first in PATH), and so is the restore
/// that moves the rule; nothing lands in the nft tables.
#[test]
fn on_the_legacy_backend_the_rule_is_moved_with_legacy_iptables() {
    let legacy = std::path::Path::new("/usr/sbin/iptables-legacy");
    if !legacy.exists() {
        let _ = writeln!(
            std::io::stderr(),"SKIPPED: on_the_legacy_backend_the_rule_is_moved_with_legacy_iptables: no iptables-legacy");
        return;
    }
    dnat_put_above_the_rule(
        "on_the_legacy_backend_the_rule_is_moved_with_legacy_iptables",
        "iptables-legacy",
    );
}

/// A leftover kube2iam DNAT (same match, another port) put above the
/// running agent's rule with `iptables` (the program named so, or
/// `iptables-legacy`): the agent's next check puts its rule first again,
/// keeping the other rule below it.
fn dnat_put_above_the_rule(test: &str, iptables: &str) {
    let Some(node) = Node::isolated(test, 1) else {
        return;
    };
    let ns = node.node_ns().expect("an isolated node").clone_named();
    let dir = tempfile::tempdir().unwrap();
    let pki = kiam::certs::generate(dir.path(), &[], 1).unwrap();
    let legacy_dir = (iptables != "iptables").then(|| {
        let bin = dir.path().join("iptables-first");
        std::fs::create_dir(&bin).unwrap();
        std::os::unix::fs::symlink(
            std::path::Path::new("/usr/sbin").join(iptables),
            bin.join("iptables"),
        )
        .unwrap();
        bin
    });
    let port = 3100;
    let target = format!("{}:{port}", node.host_ip());
    // kube2iam's port; nothing listens there any more (kube2iam was
    // uninstalled, its rule was not), so its rule makes probes fail.
    let leftover = format!("{}:8181", node.host_ip());
    let agent = agent_with_path(&ns, &node, port, &pki, legacy_dir.as_deref());
    let pod = node.pod(0);
    let ping = || {
        pod.http_get_blocking(&format!("{METADATA_URL}/ping"))
            .as_deref()
            == Ok("pong")
    };
    wait_until("the agent to answer", Duration::from_secs(20), ping);

    let out = ns
        .exec(&[
            iptables,
            "-w",
            "5",
            "-t",
            "nat",
            "-I",
            "PREROUTING",
            "1",
            "-p",
            "tcp",
            "-d",
            "169.254.169.254",
            "--dport",
            "80",
            "-i",
            &node.interface_wildcard(),
            "-j",
            "DNAT",
            "--to-destination",
            &leftover,
        ])
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(!ping(), "the rule put above kiam's takes the traffic");
    // The agent checks every 10 s.
    let overtaken = wait_until(
        "the agent's rule to be first again",
        Duration::from_secs(25),
        ping,
    );
    let rules = prerouting(&ns, iptables);
    assert_eq!(rules.len(), 2, "{rules:#?}");
    assert!(
        rules[0].ends_with(&format!("--to-destination {target}")),
        "{rules:#?}"
    );
    assert!(
        rules[1].ends_with(&format!("--to-destination {leftover}")),
        "the other rule stays, below kiam's: {rules:#?}"
    );
    if iptables != "iptables" {
        let nft = prerouting(&ns, "iptables");
        assert!(
            nft.is_empty(),
            "the agent wrote to the other backend: {nft:#?}"
        );
    }
    stop(agent);
    report(
        &format!("iptables/dnat-put-above ({iptables})"),
        &[("overtaken_after", ms(overtaken))],
    );
}

/// A figure for docs/RELIABILITY.md (as tests/support/fault_stack.rs prints them).
fn report(scenario: &str, figures: &[(&str, String)]) {
    let line: Vec<String> = figures.iter().map(|(k, v)| format!("{k}={v}")).collect();
    println!("RELIABILITY {scenario}: {}", line.join(" "));
}

fn ms(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

trait CloneNamed {
    fn clone_named(&self) -> NetNs;
}

impl CloneNamed for NetNs {
    fn clone_named(&self) -> NetNs {
        NetNs::named(self.name().to_string())
    }
}
