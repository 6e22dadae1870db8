//! `--iptables` with real packets: Pods made of network namespaces reach a
//! stand-in agent through 169.254.169.254:80 only because of the rule. Root
//! only (CI is root); otherwise each test prints SKIPPED.
//!
//! Tests on an isolated node run the rule's `iptables` and `conntrack` inside
//! the node namespace by entering it on the test thread; they rely on
//! `#[tokio::test]`'s current-thread runtime so that spawned tasks and child
//! processes start from that thread too.

#[path = "support/netns.rs"]
mod netns;

use std::net::{Ipv4Addr, SocketAddr};
use std::process::Command;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::http::Uri;
use axum::Router;
use kiam::agent::iptables::{
    maintain, maintain_if_available, Family, IptablesMetrics, IptablesRule, Position,
};
use netns::{Footprint, Node, METADATA_URL};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

const CREDENTIALS_PATH: &str = "/latest/meta-data/iam/security-credentials/";

/// Stands in for the agent: answers any path with "<caller ip> <path>", so a
/// test sees both that the request arrived and whom it came from.
async fn stand_in_agent(ip: Ipv4Addr) -> SocketAddr {
    let listener = TcpListener::bind((ip, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = Router::new().fallback(
        |ConnectInfo(peer): ConnectInfo<SocketAddr>, uri: Uri| async move {
            format!("{} {}", peer.ip(), uri.path())
        },
    );
    tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
    });
    addr
}

/// Stands in for another metadata agent (a kube2iam left on the node):
/// answers any path with "kube2iam".
async fn stand_in_kube2iam(ip: Ipv4Addr) -> SocketAddr {
    let listener = TcpListener::bind((ip, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = Router::new().fallback(|| async { "kube2iam" });
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

fn rule_to(agent: SocketAddr, host_interface: &str) -> IptablesRule {
    IptablesRule::new(agent.ip(), agent.port(), host_interface).unwrap()
}

/// Asks through the metadata address and expects the stand-in agent to
/// answer, having seen the Pod's own address.
async fn assert_reaches_agent(pod: &netns::Pod) {
    let body = pod
        .http_get(&format!("{METADATA_URL}{CREDENTIALS_PATH}"))
        .await
        .unwrap_or_else(|e| panic!("pod {} cannot reach the agent: {e}", pod.ip));
    assert_eq!(body, format!("{} {CREDENTIALS_PATH}", pod.ip));
}

/// Copies of the rule in this namespace's `nat PREROUTING`.
fn copies(rule: &IptablesRule) -> usize {
    let out = Command::new("iptables")
        .args(["-w", "5", "-t", "nat", "-S", "PREROUTING"])
        .output()
        .unwrap();
    let target = format!("--to-destination {}", rule.target());
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.ends_with(&target))
        .count()
}

/// `iptables -t nat <op> PREROUTING <rule>`, as an administrator would type it.
fn iptables_by_hand(op: &str, rule: &IptablesRule) {
    let out = Command::new("iptables")
        .args(["-w", "5", "-t", "nat", op, "PREROUTING"])
        .args(rule.spec())
        .output()
        .unwrap();
    assert!(out.status.success(), "iptables {op}: {out:?}");
}

/// Waits (up to a generous bound, for slow CI) until the rule's presence is
/// `present`.
async fn until_rule(rule: &IptablesRule, present: bool) {
    for _ in 0..200 {
        if rule.exists().await.unwrap() == present {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("rule {rule} never became present={present}");
}

fn assert_nothing_left(footprint: Footprint) {
    let left = footprint.leftovers();
    assert!(left.is_empty(), "left behind: {left:#?}");
}

#[tokio::test]
async fn pod_reaches_the_agent_through_the_metadata_address() {
    let Some(node) = Node::new("pod_reaches_the_agent_through_the_metadata_address", 1) else {
        return;
    };
    let agent = stand_in_agent(node.host_ip()).await;
    let rule = rule_to(agent, &node.pod(0).host_if);

    assert!(rule.add().await.unwrap(), "the rule was new");
    assert!(rule.exists().await.unwrap());
    assert_reaches_agent(node.pod(0)).await;

    assert!(rule.remove().await.unwrap());
    assert!(!rule.exists().await.unwrap());
    let footprint = node.footprint();
    drop(node);
    assert_nothing_left(footprint);
}

#[tokio::test]
async fn wildcard_interface_covers_every_pod() {
    let Some(node) = Node::isolated("wildcard_interface_covers_every_pod", 3) else {
        return;
    };
    let inside = node.enter();
    let agent = stand_in_agent(node.host_ip()).await;
    let rule = rule_to(agent, &node.interface_wildcard());
    rule.add().await.unwrap();
    for pod in node.pods() {
        assert_reaches_agent(pod).await;
    }
    drop(inside);
    let footprint = node.footprint();
    drop(node);
    assert_nothing_left(footprint);
}

#[tokio::test]
async fn negated_interface_matches_only_other_interfaces() {
    let Some(node) = Node::isolated("negated_interface_matches_only_other_interfaces", 2) else {
        return;
    };
    let inside = node.enter();
    let agent = stand_in_agent(node.host_ip()).await;
    let excluded = node.pod(1);
    let rule = rule_to(agent, &format!("!{}", excluded.host_if));
    assert!(rule.spec().contains(&"!".to_string()));
    rule.add().await.unwrap();

    assert_reaches_agent(node.pod(0)).await;
    // The isolated node has no route to 169.254.169.254, so an unmatched
    // request fails at once and goes nowhere.
    excluded
        .http_get(&format!("{METADATA_URL}{CREDENTIALS_PATH}"))
        .await
        .expect_err("traffic from the excluded interface must not be redirected");

    // The rule lives in the node namespace only.
    drop(inside);
    assert!(!rule.exists().await.unwrap());
    let footprint = node.footprint();
    drop(node);
    assert_nothing_left(footprint);
}

#[tokio::test]
async fn adding_twice_leaves_one_rule_and_remove_deletes_every_copy() {
    let Some(node) = Node::isolated(
        "adding_twice_leaves_one_rule_and_remove_deletes_every_copy",
        1,
    ) else {
        return;
    };
    let inside = node.enter();
    let rule = rule_to(
        SocketAddr::from((node.host_ip(), 3100)),
        &node.pod(0).host_if,
    );

    assert!(rule.add().await.unwrap());
    assert!(!rule.add().await.unwrap(), "second add must find the rule");
    assert_eq!(copies(&rule), 1);

    // A copy of kiam's rule (its comment included) added by hand counts as
    // present and goes too at removal.
    iptables_by_hand("-A", &rule);
    assert!(!rule.add().await.unwrap());
    assert_eq!(copies(&rule), 2);
    assert!(rule.remove().await.unwrap());
    assert_eq!(copies(&rule), 0);
    assert!(!rule.remove().await.unwrap(), "nothing left to remove");
    drop(inside);
    drop(node);
}

#[tokio::test]
async fn adding_flushes_conntrack_entries_to_the_metadata_address() {
    let Some(node) = Node::isolated(
        "adding_flushes_conntrack_entries_to_the_metadata_address",
        1,
    ) else {
        return;
    };
    let inside = node.enter();
    let pod = node.pod(0);
    let conntrack = |args: &[&str]| Command::new("conntrack").args(args).output().unwrap();
    let insert = |dst: &str, sport: &str, dport: &str| {
        let out = conntrack(&[
            "-I",
            "-p",
            "tcp",
            "-s",
            &pod.ip.to_string(),
            "-d",
            dst,
            "--sport",
            sport,
            "--dport",
            dport,
            "--state",
            "ESTABLISHED",
            "-u",
            "ASSURED",
            "-t",
            "120",
        ]);
        assert!(out.status.success(), "conntrack -I: {out:?}");
    };
    let entries_to = |dst: &str| {
        let out = conntrack(&["-L", "-p", "tcp", "--orig-dst", dst]);
        String::from_utf8_lossy(&out.stdout).lines().count()
    };
    // A connection a Pod opened to the real metadata service before the
    // rule existed, and an unrelated one.
    insert("169.254.169.254", "40000", "80");
    insert(&node.host_ip().to_string(), "40001", "8080");
    assert_eq!(entries_to("169.254.169.254"), 1);

    let rule = rule_to(SocketAddr::from((node.host_ip(), 3100)), &pod.host_if);
    assert!(rule.add().await.unwrap());
    assert_eq!(
        entries_to("169.254.169.254"),
        0,
        "the old connection must be forgotten"
    );
    assert_eq!(
        entries_to(&node.host_ip().to_string()),
        1,
        "other connections stay"
    );
    drop(inside);
    drop(node);
}

#[tokio::test]
async fn maintain_restores_a_deleted_rule_and_removes_it_at_shutdown() {
    let Some(node) = Node::new(
        "maintain_restores_a_deleted_rule_and_removes_it_at_shutdown",
        1,
    ) else {
        return;
    };
    let agent = stand_in_agent(node.host_ip()).await;
    let rule = rule_to(agent, &node.pod(0).host_if);
    let mut registry = Registry::default();
    let metrics = IptablesMetrics::register(&mut registry);
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(maintain(
        rule.clone(),
        Duration::from_millis(200),
        true,
        metrics.clone(),
        None,
        shutdown.clone(),
    ));
    until_rule(&rule, true).await;

    // Deleted behind the agent's back: blocking calls, so the maintenance
    // task cannot run between the delete and the check.
    iptables_by_hand("-D", &rule);
    assert_eq!(copies(&rule), 0);
    // The counter moves only once the whole add (insert and conntrack
    // flush) is done, so it, not the rule's presence, says "restored".
    for _ in 0..200 {
        if metrics.restored.get() > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(metrics.restored.get(), 1, "restored exactly once");
    assert_eq!(copies(&rule), 1);
    assert!(kiam::telemetry::encode(&registry).contains("kiam_agent_iptables_restored_total 1"));
    assert_reaches_agent(node.pod(0)).await;

    shutdown.cancel();
    task.await.unwrap().unwrap();
    assert!(!rule.exists().await.unwrap(), "removed at shutdown");
    assert_eq!(copies(&rule), 0);
    let footprint = node.footprint();
    drop(node);
    assert_nothing_left(footprint);
}

#[tokio::test]
async fn maintain_keeps_the_rule_at_shutdown_when_told_to() {
    let Some(node) = Node::isolated("maintain_keeps_the_rule_at_shutdown_when_told_to", 1) else {
        return;
    };
    let inside = node.enter();
    let agent = stand_in_agent(node.host_ip()).await;
    let rule = rule_to(agent, &node.pod(0).host_if);
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(maintain(
        rule.clone(),
        Duration::from_millis(200),
        false,
        IptablesMetrics::default(),
        None,
        shutdown.clone(),
    ));
    until_rule(&rule, true).await;
    shutdown.cancel();
    task.await.unwrap().unwrap();

    assert!(
        rule.exists().await.unwrap(),
        "--iptables-remove=false keeps the rule"
    );
    assert_reaches_agent(node.pod(0)).await;
    assert!(rule.remove().await.unwrap());
    drop(inside);
    drop(node);
}

#[tokio::test]
async fn maintain_moves_the_rule_back_above_a_later_dnat_to_another_agent() {
    let Some(node) = Node::isolated(
        "maintain_moves_the_rule_back_above_a_later_dnat_to_another_agent",
        1,
    ) else {
        return;
    };
    let inside = node.enter();
    let pod = node.pod(0);
    let agent = stand_in_agent(node.host_ip()).await;
    let rule = rule_to(agent, &pod.host_if);
    let other = rule_to(stand_in_kube2iam(node.host_ip()).await, &pod.host_if);
    let mut registry = Registry::default();
    let metrics = IptablesMetrics::register(&mut registry);
    let (in_place, told) = tokio::sync::oneshot::channel();
    let shutdown = CancellationToken::new();
    let interval = Duration::from_millis(200);
    let task = tokio::spawn(maintain(
        rule.clone(),
        interval,
        true,
        metrics.clone(),
        Some(in_place),
        shutdown.clone(),
    ));
    told.await.expect("maintain says when the rule is in place");
    assert!(rule.position().await.unwrap().first);
    assert_reaches_agent(pod).await;

    // After the agent started, kube2iam's DNAT (same match, another port)
    // goes in above kiam's rule, and kiam's rule (its comment included) was
    // also appended once more by hand. Blocking calls: the maintenance task cannot
    // run in between.
    iptables_by_hand("-A", &rule);
    iptables_by_hand_at_top(&other);
    assert_eq!(
        rule.position().await.unwrap(),
        Position {
            first: false,
            copies: 2
        }
    );
    // Until the next check, the other agent takes the Pod's traffic.
    let body = pod
        .http_get(&format!("{METADATA_URL}{CREDENTIALS_PATH}"))
        .await
        .unwrap();
    assert_eq!(body, "kube2iam", "the inserted rule wins while it is first");

    let started = std::time::Instant::now();
    while metrics.displaced.get() == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the rule was not moved back to the top (the check runs every {interval:?})"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let moved_after = started.elapsed();
    assert_eq!(
        rule.position().await.unwrap(),
        Position {
            first: true,
            copies: 1
        },
        "first again, and kiam's lower copies are gone"
    );
    assert!(
        other.exists().await.unwrap(),
        "the other rule is not deleted"
    );
    assert_reaches_agent(pod).await;
    assert_eq!(metrics.displaced.get(), 1);
    assert_eq!(metrics.restored.get(), 0, "the rule was never missing");
    assert!(kiam::telemetry::encode(&registry).contains("kiam_agent_iptables_displaced_total 1"));
    println!(
        "RELIABILITY iptables/displaced-by-another-dnat: moved_back_after={}ms interval={}ms",
        moved_after.as_millis(),
        interval.as_millis()
    );

    shutdown.cancel();
    task.await.unwrap().unwrap();
    assert_eq!(copies(&rule), 0, "removed at shutdown");
    assert!(other.exists().await.unwrap(), "only kiam's rule is removed");
    assert!(other.remove().await.unwrap());
    drop(inside);
    drop(node);
}

/// `iptables -t nat -I PREROUTING 1 <rule>`, as another program would.
fn iptables_by_hand_at_top(rule: &IptablesRule) {
    let out = Command::new("iptables")
        .args(["-w", "5", "-t", "nat", "-I", "PREROUTING", "1"])
        .args(rule.spec())
        .output()
        .unwrap();
    assert!(out.status.success(), "iptables -I: {out:?}");
}

/// The ip6tables rule is kept first and removed by the same code as the
/// IPv4 one: inserted at the top, moved back above a DNAT another program
/// put first, removed at shutdown, other programs' rules left alone. Packets
/// through it are the end-to-end test's (tests/e2e_sdk.rs, IPv6 SDKs).
#[tokio::test]
async fn maintain_keeps_the_ip6tables_rule_first_and_removes_it_at_shutdown() {
    let test = "maintain_keeps_the_ip6tables_rule_first_and_removes_it_at_shutdown";
    let Some(node) = Node::isolated(test, 1) else {
        return;
    };
    assert!(
        kiam_sandbox::netns::on_path("ip6tables"),
        "{test}: ip6tables is not installed: apt-get install iptables"
    );
    let inside = node.enter();
    let host_if = node.pod(0).host_if.clone();
    let rule = IptablesRule::new_v6("2001:2::1".parse().unwrap(), 3100, &host_if).unwrap();
    let other = IptablesRule::new_v6("2001:2::1".parse().unwrap(), 8181, &host_if).unwrap();
    assert_eq!(rule.family(), Family::V6);
    let mut registry = Registry::default();
    let metrics = IptablesMetrics::register(&mut registry);
    let (in_place, told) = tokio::sync::oneshot::channel();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(maintain_if_available(
        rule.clone(),
        Duration::from_millis(200),
        true,
        metrics.clone(),
        Some(in_place),
        shutdown.clone(),
    ));
    told.await.expect("maintain says when the rule is in place");
    assert!(rule.exists().await.unwrap());
    assert!(rule.position().await.unwrap().first);
    // Only in ip6tables: the IPv4 table has no such rule.
    let v4 = Command::new("iptables")
        .args(["-w", "5", "-t", "nat", "-S", "PREROUTING"])
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&v4.stdout).contains("fd00:ec2::254"));

    let out = Command::new("ip6tables")
        .args(["-w", "5", "-t", "nat", "-I", "PREROUTING", "1"])
        .args(other.spec())
        .output()
        .unwrap();
    assert!(out.status.success(), "ip6tables -I: {out:?}");
    let started = std::time::Instant::now();
    while metrics.displaced.get() == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the ip6tables rule was not moved back to the top"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        rule.position().await.unwrap(),
        Position {
            first: true,
            copies: 1
        }
    );
    assert!(
        other.exists().await.unwrap(),
        "the other rule is not deleted"
    );

    shutdown.cancel();
    task.await.unwrap().unwrap();
    assert!(!rule.exists().await.unwrap(), "removed at shutdown");
    assert!(other.remove().await.unwrap());
    drop(inside);
    drop(node);
}

/// The IPv6 rule flushes conntrack entries to `[fd00:ec2::254]:80` (and
/// only those) when it is put in place, as the IPv4 rule does for
/// 169.254.169.254.
#[tokio::test]
async fn adding_the_ipv6_rule_flushes_conntrack_entries_to_the_ipv6_metadata_address() {
    let Some(node) = Node::isolated(
        "adding_the_ipv6_rule_flushes_conntrack_entries_to_the_ipv6_metadata_address",
        1,
    ) else {
        return;
    };
    let inside = node.enter();
    let pod = node.pod(0);
    let conntrack = |args: &[&str]| Command::new("conntrack").args(args).output().unwrap();
    let insert = |dst: &str, sport: &str, dport: &str| {
        let out = conntrack(&[
            "-I",
            "-p",
            "tcp",
            "-s",
            "2001:2::12",
            "-d",
            dst,
            "--sport",
            sport,
            "--dport",
            dport,
            "--state",
            "ESTABLISHED",
            "-u",
            "ASSURED",
            "-t",
            "120",
        ]);
        assert!(out.status.success(), "conntrack -I: {out:?}");
    };
    let entries_to = |dst: &str| {
        let out = conntrack(&["-L", "-f", "ipv6", "-p", "tcp", "--orig-dst", dst]);
        String::from_utf8_lossy(&out.stdout).lines().count()
    };
    insert("fd00:ec2::254", "40000", "80");
    insert("2001:2::1", "40001", "8080");
    assert_eq!(entries_to("fd00:ec2::254"), 1);

    let rule = IptablesRule::new_v6("2001:2::1".parse().unwrap(), 3100, &pod.host_if).unwrap();
    assert!(rule.add().await.unwrap());
    assert_eq!(
        entries_to("fd00:ec2::254"),
        0,
        "the old connection must be forgotten"
    );
    assert_eq!(entries_to("2001:2::1"), 1, "other connections stay");
    assert!(rule.remove().await.unwrap());
    drop(inside);
    drop(node);
}

// ---------------------------------------------------------------------------
// docs/MIGRATING.md, "Switching over" from kube2iam, run as written: the
// shell blocks are read from the document, the kubectl steps are played by
// the test (a kube2iam stand-in that goes away, a stand-in agent kept by the
// real `maintain`), and a probe in a Pod asks the metadata address all along.
// The node's real metadata service is a namespace holding 169.254.169.254
// behind the node, reached by forwarding as on EC2: whatever no rule
// redirects reaches it, and it answers with the node's role.

/// What the node's real metadata service answers: a Pod that reads this got
/// the node's role.
const NODE_ROLE: &str = "NODE-ROLE";

/// The shell block that follows the `<!-- run-by: ... -->` marker naming
/// `label` in `doc` (a path from the repository root).
fn doc_block(doc: &str, label: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(doc);
    let text = std::fs::read_to_string(&path).unwrap();
    let mut lines = text.lines();
    lines
        .by_ref()
        .find(|l| l.trim_start().starts_with("<!-- run-by:") && l.contains(label))
        .unwrap_or_else(|| panic!("{doc} has no `<!-- run-by: ... {label} -->` marker"));
    let fence = lines.next().unwrap_or_default();
    assert!(
        fence.trim_start().starts_with("```sh"),
        "{doc}: the marker {label:?} must be followed by a ```sh block"
    );
    let indent = fence.len() - fence.trim_start().len();
    lines
        .take_while(|l| l.trim_start() != "```")
        .map(|l| l.get(indent..).unwrap_or(l.trim_start()))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Runs a documentation block with `sh -e` on the node (the thread is in
/// the node's namespace, so the child is too).
fn run_doc_block(label: &str) {
    let script = doc_block("docs/MIGRATING.md", label);
    let out = Command::new("sh")
        .args(["-e", "-c", &script])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "docs/MIGRATING.md block {label:?} failed: {out:?}\n{script}"
    );
}

/// What the kube2iam chart's `preStop` hook does when its Pod is deleted:
/// every `iptables-save` line naming 169.254.169.254 is deleted as a nat
/// rule (lines of other tables fail to delete and are left).
fn kube2iam_chart_prestop() {
    let save = Command::new("iptables-save").output().unwrap();
    for line in String::from_utf8_lossy(&save.stdout).lines() {
        let Some(rule) = line.strip_prefix("-A ") else {
            continue;
        };
        if !line.contains("169.254.169.254") {
            continue;
        }
        let _ = Command::new("iptables")
            .args(["-w", "5", "-t", "nat", "-D"])
            .args(rule.split_whitespace())
            .output()
            .unwrap();
    }
}

/// A stand-in server answering every path with `body`; aborting the handle
/// closes its port.
async fn serve_text(
    listener: TcpListener,
    body: &'static str,
) -> tokio::task::JoinHandle<std::io::Result<()>> {
    let app = Router::new().fallback(move || async move { body });
    tokio::spawn(async move { axum::serve(listener, app).await })
}

/// Asks the metadata address from `pod` over and over until `stop`, and
/// returns every answer (bodies, or curl's errors).
fn probe_continuously(
    pod: netns::Pod,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<Vec<Result<String, String>>> {
    tokio::spawn(async move {
        let mut seen = Vec::new();
        while !stop.is_cancelled() {
            seen.push(
                pod.http_get(&format!("{METADATA_URL}{CREDENTIALS_PATH}"))
                    .await,
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        seen
    })
}

fn assert_not_node_role(answer: &Result<String, String>, step: &str) {
    if let Ok(body) = answer {
        assert!(
            !body.contains(NODE_ROLE),
            "after {step:?} a Pod reached the node's metadata service and its role"
        );
    }
}

/// Puts the node's real metadata service behind the node: a Pod-like
/// namespace holding 169.254.169.254 that answers [`NODE_ROLE`], routed to
/// from the node, so what no rule redirects is forwarded there as on EC2.
async fn real_metadata_service(node: &mut Node) {
    let imds = node.add_pod(None, Some("imds")).unwrap().clone();
    imds.exec(&["ip", "addr", "add", "169.254.169.254/32", "dev", "lo"]);
    let out = node.exec_node(&[
        "ip",
        "route",
        "add",
        "169.254.169.254/32",
        "via",
        &imds.ip.to_string(),
    ]);
    assert!(
        out.status.success(),
        "route to the metadata service: {out:?}"
    );
    let listener = imds
        .netns()
        .bind_tcp(SocketAddr::from((
            kiam::agent::iptables::METADATA_ADDRESS,
            80,
        )))
        .unwrap();
    serve_text(TcpListener::from_std(listener).unwrap(), NODE_ROLE).await;
}

async fn kube2iam_switch_over(test: &str, chart_prestop: bool) {
    let Some(mut node) = Node::isolated(test, 1) else {
        return;
    };
    let pod = node.pod(0).clone();
    real_metadata_service(&mut node).await;

    let inside = node.enter();
    let url = format!("{METADATA_URL}{CREDENTIALS_PATH}");
    let probe = || pod.http_get(&url);
    // Without any rule the Pod reaches the node's role: the probe can tell.
    assert_eq!(probe().await.unwrap(), NODE_ROLE);

    // kube2iam runs: its DNAT (appended, no comment) to its port.
    let kube2iam_listener = TcpListener::bind((node.host_ip(), 0)).await.unwrap();
    let port = kube2iam_listener.local_addr().unwrap().port();
    let kube2iam = serve_text(kube2iam_listener, "kube2iam").await;
    let kube2iam_rule = [
        "-p",
        "tcp",
        "-d",
        "169.254.169.254",
        "--dport",
        "80",
        "-j",
        "DNAT",
        "--to-destination",
        &format!("{}:{port}", node.host_ip()),
        "-i",
        &pod.host_if,
    ];
    let out = Command::new("iptables")
        .args(["-w", "5", "-t", "nat", "-A", "PREROUTING"])
        .args(kube2iam_rule)
        .output()
        .unwrap();
    assert!(out.status.success(), "kube2iam's rule: {out:?}");
    assert_eq!(probe().await.unwrap(), "kube2iam");

    // Step 1 of the switch-over: the guard, while kube2iam still serves.
    run_doc_block("kube2iam switch-over: guard");
    assert_eq!(
        probe().await.unwrap(),
        "kube2iam",
        "the guard keeps DNAT'd traffic"
    );
    let stop = CancellationToken::new();
    let prober = probe_continuously(pod.clone(), stop.clone());

    // Step 2: kube2iam's DaemonSet is deleted (with the chart, its preStop
    // hook deletes every 169.254.169.254 rule first), then kube2iam stops.
    if chart_prestop {
        kube2iam_chart_prestop();
    }
    kube2iam.abort();
    let _ = kube2iam.await;
    let answer = probe().await;
    assert!(
        answer.is_err(),
        "nothing answers between kube2iam and kiam: {answer:?}"
    );
    assert_not_node_role(&answer, "deleting kube2iam");

    // Step 3: the kiam agent starts on the same port, and its rule has the
    // same match and target as kube2iam's.
    let agent_listener = TcpListener::bind((node.host_ip(), port)).await.unwrap();
    let agent = agent_listener.local_addr().unwrap();
    let app = Router::new().fallback(
        |ConnectInfo(peer): ConnectInfo<SocketAddr>, uri: Uri| async move {
            format!("{} {}", peer.ip(), uri.path())
        },
    );
    tokio::spawn(async move {
        axum::serve(
            agent_listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
    });
    let rule = rule_to(agent, &pod.host_if);
    let mut registry = Registry::default();
    let metrics = IptablesMetrics::register(&mut registry);
    let (in_place, told) = tokio::sync::oneshot::channel();
    let shutdown = CancellationToken::new();
    // No check during the test: what the documented steps leave is what a
    // Pod gets, never masked by a re-check putting the rule back.
    let task = tokio::spawn(maintain(
        rule.clone(),
        Duration::from_secs(3600),
        true,
        metrics.clone(),
        Some(in_place),
        shutdown.clone(),
    ));
    told.await.expect("the agent's rule is in place");
    assert_eq!(
        rule.position().await.unwrap(),
        Position {
            first: true,
            copies: 1
        },
        "kube2iam's identical rule is not taken as kiam's"
    );
    assert_reaches_agent(&pod).await;

    // Step 4: tidy up kube2iam's rule, then take the guard away.
    run_doc_block("kube2iam switch-over: tidy up");
    let listing = Command::new("iptables")
        .args(["-w", "5", "-t", "nat", "-S", "PREROUTING"])
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&listing.stdout).into_owned();
    assert_eq!(
        listing.matches("169.254.169.254").count(),
        1,
        "only kiam's rule is left:\n{listing}"
    );
    assert!(rule.position().await.unwrap().first, "{listing}");
    assert_reaches_agent(&pod).await;
    run_doc_block("kube2iam switch-over: remove the guard");
    assert_reaches_agent(&pod).await;

    stop.cancel();
    let seen = prober.await.unwrap();
    for answer in &seen {
        assert_not_node_role(answer, "some step of the switch-over");
    }
    assert!(!seen.is_empty());
    assert_eq!(metrics.restored.get(), 0, "nothing had to be put back");

    // The agent goes: with --iptables-remove its rule goes, and the Pod
    // reaches the node's role again, showing the probe would have seen it.
    shutdown.cancel();
    task.await.unwrap().unwrap();
    assert_eq!(probe().await.unwrap(), NODE_ROLE);
    println!(
        "{test}: {} probes during the switch-over, none reached the node's role",
        seen.len()
    );
    drop(inside);
    drop(node);
}

#[tokio::test]
async fn kube2iam_switch_over_as_documented_never_reaches_the_node_role() {
    kube2iam_switch_over(
        "kube2iam_switch_over_as_documented_never_reaches_the_node_role",
        false,
    )
    .await;
}

#[tokio::test]
async fn kube2iam_chart_switch_over_as_documented_never_reaches_the_node_role() {
    kube2iam_switch_over(
        "kube2iam_chart_switch_over_as_documented_never_reaches_the_node_role",
        true,
    )
    .await;
}

// ---------------------------------------------------------------------------
// docs/CNI.md: the component for Amazon VPC CNI with Security Groups for
// Pods, whose branch-ENI Pods have `vlan…` host veths beside `eni…` ones.

/// The `KIAM_HOST_INTERFACE` value a host-interface component sets.
fn component_interface(component: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy/components/host-interface")
        .join(component)
        .join("kustomization.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let mut lines = text
        .lines()
        .skip_while(|l| !l.contains("KIAM_HOST_INTERFACE"));
    lines.next();
    let value = lines
        .next()
        .and_then(|l| l.trim().strip_prefix("value: "))
        .unwrap();
    value.trim_matches('"').to_string()
}

/// Renames a Pod's node-side veth (it must be down to be renamed; the /30's
/// route comes back with the address when it is up again).
fn rename_host_if(node: &Node, from: &str, to: &str) {
    for cmd in [
        vec!["ip", "link", "set", from, "down"],
        vec!["ip", "link", "set", from, "name", to],
        vec!["ip", "link", "set", to, "up"],
    ] {
        let out = node.exec_node(&cmd);
        assert!(out.status.success(), "{cmd:?}: {out:?}");
    }
}

#[tokio::test]
async fn the_security_groups_for_pods_component_catches_vlan_and_eni_veths() {
    let test = "the_security_groups_for_pods_component_catches_vlan_and_eni_veths";
    let Some(node) = Node::isolated(test, 2) else {
        return;
    };
    let suffix = &node.id()[node.id().len() - 8..];
    let (vlan, eni) = (format!("vlan{suffix}"), format!("eni{suffix}"));
    rename_host_if(&node, &node.pod(0).host_if, &vlan);
    rename_host_if(&node, &node.pod(1).host_if, &eni);
    let (vlan_pod, eni_pod) = (node.pod(0), node.pod(1));
    let inside = node.enter();
    let agent = stand_in_agent(node.host_ip()).await;

    // The plain VPC CNI component misses the branch-ENI Pod: its request
    // goes past the agent (to the node's metadata service on a real node;
    // here, with no uplink, nowhere).
    let plain = component_interface("amazon-vpc-cni");
    assert_eq!(plain, "eni+");
    let rule = rule_to(agent, &plain);
    assert!(rule.add().await.unwrap());
    assert_reaches_agent(eni_pod).await;
    let missed = vlan_pod
        .http_get(&format!("{METADATA_URL}{CREDENTIALS_PATH}"))
        .await;
    assert!(missed.is_err(), "eni+ must not catch {vlan}: {missed:?}");
    assert!(rule.remove().await.unwrap());

    // The component docs/CNI.md gives for Security Groups for Pods.
    let every = component_interface("all-interfaces");
    assert_eq!(every, "+");
    let rule = rule_to(agent, &every);
    assert!(rule.add().await.unwrap());
    assert_reaches_agent(vlan_pod).await;
    assert_reaches_agent(eni_pod).await;
    assert!(rule.remove().await.unwrap());
    drop(inside);
    // The names the node removes its veths by.
    rename_host_if(&node, &vlan, &node.pod(0).host_if);
    rename_host_if(&node, &eni, &node.pod(1).host_if);
    drop(node);
}

/// docs/CNI.md: no `--host-interface`, not even `+`, catches what the node
/// itself sends (a `hostNetwork` Pod): it goes through `nat OUTPUT`, never
/// `PREROUTING`, and reaches the node's metadata service.
#[tokio::test]
async fn the_nodes_own_traffic_never_passes_the_prerouting_rule() {
    let test = "the_nodes_own_traffic_never_passes_the_prerouting_rule";
    let Some(mut node) = Node::isolated(test, 1) else {
        return;
    };
    let pod = node.pod(0).clone();
    real_metadata_service(&mut node).await;
    let inside = node.enter();
    let agent = stand_in_agent(node.host_ip()).await;
    let rule = rule_to(agent, "+");
    assert!(rule.add().await.unwrap());
    assert_reaches_agent(&pod).await;
    // A process on the node (what a hostNetwork Pod is), blocking call: the
    // node's metadata service answers from another namespace.
    let url = format!("{METADATA_URL}{CREDENTIALS_PATH}");
    let out = tokio::task::spawn_blocking({
        let ns = node.node_ns().unwrap().clone();
        move || ns.exec(&["curl", "-sS", "--max-time", "10", &url]).unwrap()
    })
    .await
    .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        NODE_ROLE,
        "the node's own request is not redirected: {out:?}"
    );
    assert!(rule.remove().await.unwrap());
    drop(inside);
    drop(node);
}
