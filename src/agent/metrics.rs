//! The agent's metrics: kiam's `kiam_metadata_*` families, names and labels
//! unchanged, plus the agent's own counters.
//!
//! The surprise: counters are registered without `_total` because the
//! library appends it; the exposed names are kiam's exactly, so dashboards
//! built for Go kiam keep working.

use std::time::Duration;

use http::StatusCode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HandlerLabel {
    handler: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResponseLabels {
    handler: &'static str,
    code: String,
}

type HistogramFamily = Family<HandlerLabel, Histogram, fn() -> Histogram>;

/// kiam's `kiam_metadata_*` metrics plus the agent's own: answers served
/// from the fallback, connections refused by the per-source limit.
#[derive(Clone)]
pub struct Metrics {
    latency: HistogramFamily,
    credential_fetch_errors: Family<HandlerLabel, Counter>,
    /// Go kiam's `kiam_metadata_credential_encode_errors_total`: a
    /// credentials document that could not be rendered. Ours renders plain
    /// strings and cannot fail, so it stays 0; it is exported so alerts and
    /// dashboards written for Go kiam find the series.
    credential_encode_errors: Family<HandlerLabel, Counter>,
    find_role_errors: Family<HandlerLabel, Counter>,
    empty_role: Family<HandlerLabel, Counter>,
    success: Family<HandlerLabel, Counter>,
    responses: Family<ResponseLabels, Counter>,
    proxy_blocked: Counter,
    stale_served: Family<HandlerLabel, Counter>,
    connections_refused: Counter,
    /// `kiam_agent_imdsv2_required`: 1 with --require-imdsv2.
    imdsv2_required: Gauge,
    /// `kiam_agent_fallback_pods`: pod IPs whose last good answer is kept
    /// for an outage (what could be served stale if every server went away).
    fallback_pods: Gauge,
}

fn latency_histogram() -> Histogram {
    // kiam's buckets: 1 ms doubling to ~4 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 13))
}

impl Metrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = Metrics {
            latency: Family::new_with_constructor(latency_histogram as fn() -> Histogram),
            credential_fetch_errors: Family::default(),
            credential_encode_errors: Family::default(),
            find_role_errors: Family::default(),
            empty_role: Family::default(),
            success: Family::default(),
            responses: Family::default(),
            proxy_blocked: Counter::default(),
            stale_served: Family::default(),
            connections_refused: Counter::default(),
            imdsv2_required: Gauge::default(),
            fallback_pods: Gauge::default(),
        };
        // Counters are registered without `_total`: the library appends it.
        registry.register(
            "kiam_metadata_handler_latency_seconds",
            "Bucketed histogram of handler timings",
            m.latency.clone(),
        );
        registry.register(
            "kiam_metadata_credential_fetch_errors",
            "Number of errors fetching the credentials for a pod",
            m.credential_fetch_errors.clone(),
        );
        registry.register(
            "kiam_metadata_credential_encode_errors",
            "Number of errors encoding the credentials for a pod (always 0: kept for Go kiam's alerts)",
            m.credential_encode_errors.clone(),
        );
        registry.register(
            "kiam_metadata_find_role_errors",
            "Number of errors finding the role for a pod",
            m.find_role_errors.clone(),
        );
        registry.register(
            "kiam_metadata_empty_role",
            "Number of empty roles returned",
            m.empty_role.clone(),
        );
        registry.register(
            "kiam_metadata_success",
            "Number of successful responses from a handler",
            m.success.clone(),
        );
        registry.register(
            "kiam_metadata_responses",
            "Responses from mocked out metadata handlers",
            m.responses.clone(),
        );
        registry.register(
            "kiam_metadata_proxy_requests_blocked",
            "Number of access requests to the proxy handler that were blocked by the regexp",
            m.proxy_blocked.clone(),
        );
        registry.register(
            "kiam_agent_stale_credentials_served",
            "Answers served from the last good server answer because no server answered",
            m.stale_served.clone(),
        );
        registry.register(
            "kiam_agent_connections_refused",
            "Connections refused because their source address already had the most open connections allowed",
            m.connections_refused.clone(),
        );
        registry.register(
            "kiam_agent_fallback_pods",
            "Pod IPs whose last good server answer is kept for a server outage",
            m.fallback_pods.clone(),
        );
        registry.register(
            "kiam_agent_imdsv2_required",
            "1 when the agent refuses metadata GETs without an IMDSv2 token (--require-imdsv2)",
            m.imdsv2_required.clone(),
        );
        // Shown at 0 from the start, so `increase()` over it is never empty.
        let _ = m.credential_encode_errors.get_or_create(&HandlerLabel {
            handler: "credentials",
        });
        m
    }

    /// Records --require-imdsv2, for dashboards and `kiam explain`.
    pub fn imdsv2_required(&self, required: bool) {
        self.imdsv2_required.set(i64::from(required));
    }

    /// The gauge the credential fallback keeps up to date.
    pub(crate) fn fallback_pods(&self) -> Gauge {
        self.fallback_pods.clone()
    }

    /// Counts a connection refused by the per-source limit.
    pub fn connection_refused(&self) {
        self.connections_refused.inc();
    }

    /// Records one answer of `handler`: its latency, its status code and,
    /// for a 200, a success.
    pub(crate) fn answered(&self, handler: &'static str, took: Duration, status: StatusCode) {
        self.latency
            .get_or_create(&HandlerLabel { handler })
            .observe(took.as_secs_f64());
        self.responses
            .get_or_create(&ResponseLabels {
                handler,
                code: status.as_u16().to_string(),
            })
            .inc();
        if status == StatusCode::OK {
            Self::inc(&self.success, handler);
        }
    }

    /// A request that asked a server for credentials got none.
    pub(crate) fn credential_fetch_error(&self, handler: &'static str) {
        Self::inc(&self.credential_fetch_errors, handler);
    }

    /// A request that needed the pod's role did not get it.
    pub(crate) fn find_role_error(&self, handler: &'static str) {
        Self::inc(&self.find_role_errors, handler);
    }

    /// A server said the pod has no role.
    pub(crate) fn empty_role(&self, handler: &'static str) {
        Self::inc(&self.empty_role, handler);
    }

    /// An answer came from the fallback because no server answered.
    pub(crate) fn stale_served(&self, handler: &'static str) {
        Self::inc(&self.stale_served, handler);
    }

    /// A path `--allow-route-regexp` does not allow was not proxied.
    pub(crate) fn proxy_blocked(&self) {
        self.proxy_blocked.inc();
    }

    fn inc(family: &Family<HandlerLabel, Counter>, handler: &'static str) {
        family.get_or_create(&HandlerLabel { handler }).inc();
    }
}
