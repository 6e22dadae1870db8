//! One scrape of a real kiam server and agent after every kind of request,
//! parsed into what the metric checks need (families, label names), and a
//! PromQL checker for dashboards: shared by tests/docs.rs (our dashboard and
//! docs/METRICS.md) and tests/metrics_parity.rs (Go kiam's names and its
//! dashboard).
#![allow(dead_code)]

#[path = "procs.rs"]
pub mod procs;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

/// (status, body); (0, "") when nothing answered.
pub async fn get(port: u16, path: &str) -> (u16, String) {
    procs::http_get(port, path, Duration::from_secs(10))
        .await
        .unwrap_or((0, String::new()))
}

/// What one /metrics page says: families (name -> type) and, per sample
/// name, the label names seen on it.
#[derive(Default, Debug)]
pub struct Exposition {
    pub families: BTreeMap<String, String>,
    pub samples: BTreeMap<String, BTreeSet<String>>,
    /// Every sample line as scraped, for checks on label values.
    pub lines: Vec<String>,
}

impl Exposition {
    pub fn parse(text: &str, into: &mut Exposition) {
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut it = rest.split_whitespace();
                let (Some(name), Some(kind)) = (it.next(), it.next()) else {
                    continue;
                };
                // The text format 0.0.4 names a counter family with its
                // `_total`; OpenMetrics without.
                let name = match kind {
                    "counter" => name.strip_suffix("_total").unwrap_or(name),
                    _ => name,
                };
                into.families.insert(name.to_string(), kind.to_string());
                continue;
            }
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            into.lines.push(line.to_string());
            let name_end = line.find(['{', ' ']).unwrap_or(line.len());
            let name = line[..name_end].to_string();
            let mut labels = BTreeSet::new();
            if line[name_end..].starts_with('{') {
                let inner = &line[name_end + 1..line.find('}').unwrap()];
                for pair in split_labels(inner) {
                    if let Some((k, _)) = pair.split_once('=') {
                        labels.insert(k.trim().to_string());
                    }
                }
            }
            into.samples.entry(name).or_default().extend(labels);
        }
    }

    /// Every name Prometheus stores for the scraped families: samples seen,
    /// plus what a family without samples yet would produce.
    pub fn series_names(&self) -> BTreeSet<String> {
        let mut out: BTreeSet<String> = self.samples.keys().cloned().collect();
        for (name, kind) in &self.families {
            match kind.as_str() {
                "counter" => {
                    out.insert(format!("{name}_total"));
                }
                "histogram" => {
                    for s in ["_bucket", "_sum", "_count"] {
                        out.insert(format!("{name}{s}"));
                    }
                }
                _ => {
                    out.insert(name.clone());
                }
            }
        }
        out
    }

    /// The name an operator knows a family by: counters with `_total`,
    /// histograms by their base name.
    /// Every label name seen on any sample (`grpc_method` looks like a
    /// metric name but is not one).
    pub fn label_names(&self) -> BTreeSet<String> {
        self.samples.values().flatten().cloned().collect()
    }

    pub fn documented_name(name: &str, kind: &str) -> String {
        if kind == "counter" {
            format!("{name}_total")
        } else {
            name.to_string()
        }
    }
}

/// Splits `a="x",b="y,z"` at the commas outside quotes.
pub fn split_labels(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let (mut quoted, mut escaped) = (false, false);
    for ch in s.chars() {
        match ch {
            '\\' if quoted && !escaped => escaped = true,
            '"' if !escaped => quoted = !quoted,
            ',' if !quoted => {
                out.push(std::mem::take(&mut cur));
                continue;
            }
            _ => escaped = false,
        }
        cur.push(ch);
    }
    if !cur.trim().is_empty() {
        out.push(cur);
    }
    out
}

/// Names of kiam's own families (and go-grpc-prometheus'), the ones these
/// docs are about.
pub fn ours(name: &str) -> bool {
    name.starts_with("kiam_") || name.starts_with("grpc_")
}

/// Runs a server and an agent (moto for STS, the in-memory API server),
/// makes every kind of metadata request once, and returns both scrapes.
pub async fn scrape_server_and_agent() -> Option<Exposition> {
    let moto = procs::start_moto()?;
    let imds = kiam_sandbox::imds::ImdsEmulator::start(
        Default::default(),
        kiam_sandbox::imds::Behaviour::leaky(),
    )
    .await
    .unwrap();
    let c = procs::ProcCluster::start().await;
    c.namespace("team-a", "arn:aws:iam::123456789012:role/web-.*");
    c.pod("team-a", "web", "198.18.4.10", "web-role");
    c.pod("team-a", "batch", "198.18.4.11", "batch-role");
    c.api
        .apply_pod(serde_json::json!({
            "metadata": {"name": "plain", "namespace": "team-a"},
            "spec": {"containers": [{"name": "app", "image": "busybox"}]},
            "status": {"phase": "Running", "podIP": "198.18.4.12"}
        }))
        .unwrap();

    let (port, server_metrics) = (procs::free_port(), procs::free_port());
    let server = c.spawn_server(
        &moto.url,
        &[
            "--role-base-arn=arn:aws:iam::123456789012:role/",
            &format!("--bind=127.0.0.1:{port}"),
            &format!("--prometheus-listen-addr=127.0.0.1:{server_metrics}"),
        ],
    );
    let (agent_port, agent_metrics) = (procs::free_port(), procs::free_port());
    let cmd = c.agent_cmd(
        agent_port,
        &format!("localhost:{port}"),
        &imds.url(),
        &[
            "--allow-ip-query",
            &format!("--prometheus-listen-addr=127.0.0.1:{agent_metrics}"),
        ],
    );
    let mut agent = procs::ChildGuard::spawn("kiam agent", cmd).unwrap();

    // Credentials once the server has synced.
    let creds = "/latest/meta-data/iam/security-credentials/web-role?ip=198.18.4.10";
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (code, body) = get(agent_port, creds).await;
        if code == 200 {
            break;
        }
        // A port taken between free_port and the agent's bind ends the
        // agent at once: say so rather than wait (KIAM_TEST_LOGS shows why).
        if let Ok(Some(status)) = agent.child.try_wait() {
            panic!("kiam agent exited ({status}) before serving; rerun with KIAM_TEST_LOGS=1");
        }
        assert!(
            Instant::now() < deadline,
            "agent never served credentials: {code} {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for path in [
        // role name, IMDSv2-less info, extended credentials
        "/latest/meta-data/iam/security-credentials/?ip=198.18.4.10",
        "/latest/meta-data/iam/info?ip=198.18.4.10",
        "/latest/meta-data/iam/security-credentials-extended/web-role?ip=198.18.4.10",
        // a role the namespace does not permit: a credential error
        "/latest/meta-data/iam/security-credentials/batch-role?ip=198.18.4.11",
        // a pod without a role, and an IP with no pod
        "/latest/meta-data/iam/security-credentials/?ip=198.18.4.12",
        "/latest/meta-data/iam/security-credentials/?ip=198.18.4.99",
        // a path the default --allow-route-regexp blocks
        "/latest/meta-data/instance-id?ip=198.18.4.10",
        "/health?deep=1",
    ] {
        get(agent_port, path).await;
    }

    // Something that is not TLS at the gRPC port: a handshake error.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
        let mut sink = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut sink)).await;
    }

    let mut all = Exposition::default();
    let scrape = |p: u16| async move {
        let (code, body) = get(p, "/metrics").await;
        assert_eq!(code, 200, "GET /metrics on {p}");
        body
    };
    Exposition::parse(&scrape(server_metrics).await, &mut all);

    // kiam webhook: its families exist (at zero) from the start.
    let (webhook_port, webhook_metrics) = (procs::free_port(), procs::free_port());
    let mut cmd = procs::kiam_bin();
    cmd.args(["webhook", &format!("--bind=127.0.0.1:{webhook_port}")])
        .arg(format!(
            "--prometheus-listen-addr=127.0.0.1:{webhook_metrics}"
        ));
    c.tls_args(&mut cmd, "server");
    let _webhook = procs::ChildGuard::spawn("kiam webhook", cmd).unwrap();
    assert!(
        procs::wait_for_port(webhook_metrics, Duration::from_secs(20)),
        "kiam webhook never served metrics"
    );
    Exposition::parse(&scrape(webhook_metrics).await, &mut all);

    // With the server gone, the agent answers from its last good credentials
    // (once the server's reuse window, at most a second, is over: inside it
    // the warm path answers, which is not the outage fallback).
    drop(server);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let (code, body) = get(agent_port, creds).await;
    assert_eq!(code, 200, "stale credentials: {body}");
    Exposition::parse(&scrape(agent_metrics).await, &mut all);
    Some(all)
}

/// Labels Prometheus adds from the scrape target, not from the binaries.
pub const TARGET_LABELS: [&str; 5] = ["job", "instance", "namespace", "pod", "node"];

/// Problems with one PromQL expression: unknown metric names, selectors or
/// groupings on labels the metrics do not have, or no kiam metric at all.
pub fn check_expr(expr: &str, e: &Exposition) -> Vec<String> {
    let series = e.series_names();
    // Label values are free text ("OK", "5.."): drop them before tokenising.
    let unquoted = regex::Regex::new(r#""(?:[^"\\]|\\.)*""#)
        .unwrap()
        .replace_all(expr, "\"\"");
    let ident = regex::Regex::new(r"[a-zA-Z_:][a-zA-Z0-9_:]*").unwrap();
    let label_names = e.label_names();
    let names: BTreeSet<String> = ident
        .find_iter(&unquoted)
        .map(|m| m.as_str().to_string())
        .filter(|n| ours(n) && !label_names.contains(n))
        .collect();
    let mut problems = Vec::new();
    if names.is_empty() {
        problems.push(format!("uses no kiam metric: {expr}"));
    }
    for n in &names {
        if !series.contains(n) {
            problems.push(format!("{n} is not exported by kiam server or agent"));
        }
    }
    let labels_of = |n: &str| e.samples.get(n).cloned().unwrap_or_default();
    let selector = regex::Regex::new(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{([^}]*)\}").unwrap();
    let matcher = regex::Regex::new(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)").unwrap();
    for cap in selector.captures_iter(&unquoted) {
        let have = labels_of(&cap[1]);
        for m in matcher.captures_iter(&cap[2]) {
            let label = &m[1];
            if !have.contains(label) && !TARGET_LABELS.contains(&label) {
                problems.push(format!(
                    "{} has no label {label} (it has {have:?})",
                    &cap[1]
                ));
            }
        }
    }
    let all_labels: BTreeSet<String> = names.iter().flat_map(|n| labels_of(n)).collect();
    let grouping = regex::Regex::new(r"\b(?:by|without)\s*\(([^)]*)\)").unwrap();
    for cap in grouping.captures_iter(&unquoted) {
        for label in cap[1].split(',').map(str::trim).filter(|l| !l.is_empty()) {
            if !all_labels.contains(label) && !TARGET_LABELS.contains(&label) {
                problems.push(format!("no metric in `{expr}` has the label {label}"));
            }
        }
    }
    problems
}

/// Every PromQL expression in the dashboard, with its panel's title.
pub fn dashboard_exprs(dashboard: &serde_json::Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut stack = vec![dashboard];
    while let Some(v) = stack.pop() {
        match v {
            serde_json::Value::Object(map) => {
                if let Some(targets) = map.get("targets").and_then(|t| t.as_array()) {
                    let title = map.get("title").and_then(|t| t.as_str()).unwrap_or("?");
                    for t in targets {
                        let expr = t["expr"].as_str().unwrap_or_default().to_string();
                        out.push((title.to_string(), expr));
                    }
                }
                stack.extend(map.values());
            }
            serde_json::Value::Array(items) => stack.extend(items),
            _ => {}
        }
    }
    out
}
