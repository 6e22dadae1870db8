//! The pod cache's metric families: prefetches dropped, and the direct API
//! lookups that cache misses cost (the load kiam puts on the API server).

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::progress::Unproven;
use super::FindError;
use crate::server::model::PodInfo;

/// The pod cache's metric families.
#[derive(Clone, Debug, Default)]
pub struct PodCacheMetrics {
    /// `kiam_k8s_dropped_pods_total`: pods not prefetched for because the
    /// prefetch buffer (`--prefetch-buffer-size`) was full.
    pub(super) dropped: Counter,
    /// `kiam_k8s_pod_lookups_total{result}`: direct API lookups of an IP
    /// (`found`, `not_found`, `ambiguous`, `error`).
    lookups: Family<LookupLabel, Counter>,
    /// `kiam_k8s_pod_lookups_in_flight`: lookups holding or waiting for one
    /// of the concurrent lookup slots.
    pub(super) in_flight: Gauge,
    /// `kiam_k8s_pod_lookups_negative_cached_total`: misses answered from
    /// the short negative cache instead of the API.
    pub(super) negative_hits: Counter,
    /// `kiam_k8s_pod_confirmations_total{result}`: checks that a cached pod
    /// still owns a request's IP: `owner`, `stale` (gone, completed or
    /// moved), `unanswered` (the GET failed or was slow: cache trusted),
    /// `skipped` (over `--pod-confirmations-per-second`: cache trusted),
    /// `current` (the whole cache was proven current: no GET).
    confirmations: Family<LookupLabel, Counter>,
    /// `kiam_k8s_pod_watch_checks_total{result}`: checks that the Pod watch
    /// is current (one `limit=1` LIST each): `current`, `behind` (no pod
    /// event reached the LIST's resourceVersion in time), `failed`.
    watch_checks: Family<LookupLabel, Counter>,
    /// `kiam_k8s_pod_lookups_on_node_total{result}`: direct lookups among
    /// the pods of the requesting agent's node (`found`, or `not_found`: then
    /// the whole cluster is asked).
    node_lookups: Family<LookupLabel, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LookupLabel {
    result: &'static str,
}

impl PodCacheMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = PodCacheMetrics::default();
        registry.register(
            "kiam_k8s_dropped_pods",
            "Number of dropped pods because of full buffer",
            m.dropped.clone(),
        );
        registry.register(
            "kiam_k8s_pod_lookups",
            "Direct API lookups of a pod by IP (cache misses), by result",
            m.lookups.clone(),
        );
        registry.register(
            "kiam_k8s_pod_lookups_in_flight",
            "Direct pod lookups running or waiting for one of the concurrent slots",
            m.in_flight.clone(),
        );
        registry.register(
            "kiam_k8s_pod_lookups_negative_cached",
            "Cache misses answered 'no pod found' from the short negative cache",
            m.negative_hits.clone(),
        );
        registry.register(
            "kiam_k8s_pod_confirmations",
            "Checks that a cached pod still owns the IP a request came from, by result",
            m.confirmations.clone(),
        );
        registry.register(
            "kiam_k8s_pod_lookups_on_node",
            "Direct lookups of a pod by IP among the requesting agent's node's pods, by result",
            m.node_lookups.clone(),
        );
        // Every result from the start, at 0, so rates work before the first.
        for result in ["found", "not_found"] {
            let _ = m.node_lookups.get_or_create(&LookupLabel { result });
        }
        for result in ["current", "behind", "failed"] {
            let _ = m.watch_checks.get_or_create(&LookupLabel { result });
        }
        registry.register(
            "kiam_k8s_pod_watch_checks",
            "Checks that the Pod watch has caught up with the API server (one LIST of one pod each), by result",
            m.watch_checks.clone(),
        );
        m
    }

    pub(super) fn node_lookup(&self, found: bool) {
        let result = if found { "found" } else { "not_found" };
        self.node_lookups
            .get_or_create(&LookupLabel { result })
            .inc();
    }

    pub(super) fn progress_checked(&self, outcome: Result<std::time::Instant, Unproven>) {
        let result = match outcome {
            Ok(_) => "current",
            Err(Unproven::Behind) => "behind",
            Err(Unproven::Failed) => "failed",
        };
        self.watch_checks
            .get_or_create(&LookupLabel { result })
            .inc();
    }

    pub(super) fn confirmed(&self, result: &'static str) {
        self.confirmations
            .get_or_create(&LookupLabel { result })
            .inc();
    }

    /// How many pods were not prefetched for because the buffer was full.
    pub fn dropped_pods(&self) -> u64 {
        self.dropped.get()
    }

    pub(super) fn lookup_done(&self, result: &Result<Arc<PodInfo>, FindError>) {
        let result = match result {
            Ok(_) => "found",
            Err(FindError::NotFound) => "not_found",
            Err(FindError::Ambiguous { .. }) => "ambiguous",
            Err(_) => "error",
        };
        self.lookups.get_or_create(&LookupLabel { result }).inc();
    }
}
