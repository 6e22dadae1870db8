//! Go kiam's metrics, series by series, against a running kiam server and
//! agent: every family Go kiam v4 registers (its own and the ones its gRPC
//! middleware adds) exists here under the same name, type and label names,
//! and every kiam panel of Go kiam's Grafana dashboard (grafana.com 3831,
//! `docs/dashboard-prom.json` in its repository) has data after ordinary
//! traffic. The table is written from reading Go kiam's source
//! (`pkg/aws/metadata/metrics.go`, `pkg/aws/sts/metrics.go`,
//! `pkg/k8s/metrics.go`, `pkg/server/tls.go`, go-grpc-prometheus' defaults);
//! Go kiam itself cannot be built here (the module proxy refuses it, see
//! docs/MIGRATING.md), so this is the side-by-side comparison we can run.

#[path = "support/exposition.rs"]
mod exposition;

use exposition::{check_expr, scrape_server_and_agent, Exposition};

/// One Go kiam family: the name Prometheus stores (counters with
/// `_total`, histograms by base name), its type and its label names.
struct GoSeries {
    name: &'static str,
    kind: &'static str,
    labels: &'static [&'static str],
}

const fn s(name: &'static str, kind: &'static str, labels: &'static [&'static str]) -> GoSeries {
    GoSeries { name, kind, labels }
}

const GRPC: &[&str] = &["grpc_type", "grpc_service", "grpc_method"];
const GRPC_HANDLED: &[&str] = &["grpc_type", "grpc_service", "grpc_method", "grpc_code"];

/// Every family a Go kiam v4 agent and server export besides Go's runtime
/// and process collectors.
const GO_KIAM: &[GoSeries] = &[
    // agent: pkg/aws/metadata
    s(
        "kiam_metadata_handler_latency_seconds",
        "histogram",
        &["handler"],
    ),
    s(
        "kiam_metadata_credential_fetch_errors_total",
        "counter",
        &["handler"],
    ),
    s(
        "kiam_metadata_credential_encode_errors_total",
        "counter",
        &["handler"],
    ),
    s(
        "kiam_metadata_find_role_errors_total",
        "counter",
        &["handler"],
    ),
    s("kiam_metadata_empty_role_total", "counter", &["handler"]),
    s("kiam_metadata_success_total", "counter", &["handler"]),
    s(
        "kiam_metadata_responses_total",
        "counter",
        &["handler", "code"],
    ),
    s("kiam_metadata_proxy_requests_blocked_total", "counter", &[]),
    // agent: gRPC client middleware and TLS
    s("grpc_client_started_total", "counter", GRPC),
    s("grpc_client_handled_total", "counter", GRPC_HANDLED),
    s("grpc_client_msg_sent_total", "counter", GRPC),
    s("grpc_client_msg_received_total", "counter", GRPC),
    s("grpc_client_tls_certificate_update_error", "gauge", &[]),
    s("grpc_client_tls_certificate_verify_error", "gauge", &[]),
    s("grpc_client_tls_certificate_expiry_seconds", "gauge", &[]),
    // server: pkg/aws/sts and pkg/k8s
    s("kiam_sts_cacheSize", "gauge", &[]),
    s("kiam_sts_cache_hit_total", "counter", &[]),
    s("kiam_sts_cache_miss_total", "counter", &[]),
    s("kiam_sts_issuing_errors_total", "counter", &[]),
    s("kiam_sts_assumerole_timing_seconds", "histogram", &[]),
    s("kiam_sts_assumerole_current", "gauge", &[]),
    s("kiam_k8s_dropped_pods_total", "counter", &[]),
    // server: gRPC server middleware and TLS
    s("grpc_server_started_total", "counter", GRPC),
    s("grpc_server_handled_total", "counter", GRPC_HANDLED),
    s("grpc_server_msg_sent_total", "counter", GRPC),
    s("grpc_server_msg_received_total", "counter", GRPC),
    s("grpc_server_tls_certificate_update_error", "gauge", &[]),
    s("grpc_server_tls_certificate_verify_error", "gauge", &[]),
    s("grpc_server_tls_certificate_expiry_seconds", "gauge", &[]),
];

/// The kiam panels of Go kiam's dashboard, as (sample name, labels the
/// panel groups or filters by, label values it selects). The other panels
/// plot kube-state-metrics and cAdvisor series, which kiam does not export.
/// (sample name, labels grouped or filtered by, label values selected).
type Panel = (
    &'static str,
    &'static [&'static str],
    &'static [(&'static str, &'static str)],
);

const GO_DASHBOARD: &[Panel] = &[
    ("kiam_metadata_success_total", &["handler"], &[]),
    ("kiam_metadata_responses_total", &["code"], &[]),
    ("kiam_metadata_empty_role_total", &[], &[]),
    ("kiam_metadata_find_role_errors_total", &["handler"], &[]),
    ("kiam_sts_issuing_errors_total", &[], &[]),
    ("kiam_k8s_dropped_pods_total", &[], &[]),
    ("kiam_sts_assumerole_current", &[], &[]),
    ("kiam_sts_cache_hit_total", &[], &[]),
    ("kiam_sts_cache_miss_total", &[], &[]),
    ("kiam_sts_assumerole_timing_seconds_bucket", &["le"], &[]),
    (
        "kiam_metadata_handler_latency_seconds_bucket",
        &["le"],
        &[("handler", "credentials")],
    ),
    (
        "kiam_metadata_handler_latency_seconds_bucket",
        &["le"],
        &[("handler", "roleName")],
    ),
    (
        "grpc_client_handled_total",
        &["grpc_code", "grpc_method"],
        &[],
    ),
    ("grpc_client_started_total", &["grpc_method"], &[]),
    ("grpc_client_msg_sent_total", &["grpc_method"], &[]),
    ("grpc_client_msg_received_total", &["grpc_method"], &[]),
    (
        "grpc_server_handled_total",
        &["grpc_code", "grpc_method"],
        &[],
    ),
    ("grpc_server_started_total", &["grpc_method"], &[]),
    ("grpc_server_msg_sent_total", &["grpc_method"], &[]),
    ("grpc_server_msg_received_total", &["grpc_method"], &[]),
];

/// The family name in a `# TYPE` line for a stored series name.
fn family_of(series: &GoSeries) -> &'static str {
    match series.kind {
        "counter" => series.name.strip_suffix("_total").unwrap_or(series.name),
        _ => series.name,
    }
}

/// Label names on the samples of one family (histograms: `_bucket` without
/// `le`).
fn labels_of(e: &Exposition, series: &GoSeries) -> Option<Vec<String>> {
    let sample = match series.kind {
        "histogram" => format!("{}_bucket", series.name),
        _ => series.name.to_string(),
    };
    let labels = e.samples.get(&sample)?;
    Some(labels.iter().filter(|l| *l != "le").cloned().collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_kiam_series_and_dashboard_panels_exist_here() {
    let Some(e) = scrape_server_and_agent().await else {
        return;
    };
    let mut problems = Vec::new();
    for series in GO_KIAM {
        let family = family_of(series);
        match e.families.get(family) {
            None => problems.push(format!("{} ({}) is not exported", series.name, series.kind)),
            Some(kind) if kind != series.kind => problems.push(format!(
                "{} is a {kind} here, a {} in Go kiam",
                series.name, series.kind
            )),
            Some(_) => {}
        }
        let mut want: Vec<String> = series.labels.iter().map(|l| l.to_string()).collect();
        want.sort();
        match labels_of(&e, series) {
            Some(have) if have != want => problems.push(format!(
                "{} has labels {have:?}; Go kiam's are {want:?}",
                series.name
            )),
            Some(_) => {}
            None => problems.push(format!(
                "{} has no sample after traffic (a panel or alert on it is empty)",
                series.name
            )),
        }
    }
    for (sample, by, values) in GO_DASHBOARD {
        let expr = if by.is_empty() {
            format!("sum({sample})")
        } else {
            format!("sum by ({}) ({sample})", by.join(", "))
        };
        for p in check_expr(&expr, &e) {
            problems.push(format!("Go kiam dashboard, {sample}: {p}"));
        }
        let has_data = e.lines.iter().any(|line| {
            line.strip_prefix(sample)
                .is_some_and(|rest| rest.starts_with(['{', ' ']))
                && values
                    .iter()
                    .all(|(k, v)| line.contains(&format!("{k}=\"{v}\"")))
        });
        if !has_data {
            problems.push(format!(
                "Go kiam dashboard panel on {sample} {values:?} would be empty"
            ));
        }
    }
    println!(
        "{} Go kiam families and {} dashboard panels checked",
        GO_KIAM.len(),
        GO_DASHBOARD.len()
    );
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
