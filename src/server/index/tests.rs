use std::net::IpAddr;
use std::sync::Arc;

use jiff::Timestamp;
use k8s_openapi::api::core::v1::Pod;
use serde_json::json;

use super::*;
use crate::server::model::{PodInfo, PodPhase, ROLE_ANNOTATION};
use crate::server::podview::tests::project;
use crate::server::policy::{ArnResolver, NamespacePolicyConfig, Policy};

const BASE: &str = "arn:aws:iam::123456789012:role/";

/// `ip`: the pod's addresses, comma-separated, primary first (`podIP`).
fn pod_json(name: &str, uid: &str, ip: Option<&str>, phase: &str, role: Option<&str>) -> Pod {
    let all: Vec<&str> = ip.map(|ips| ips.split(',').collect()).unwrap_or_default();
    let pod_ips: Vec<serde_json::Value> = all.iter().map(|ip| json!({ "ip": ip })).collect();
    let ip = all.first();
    let mut annotations = serde_json::Map::new();
    if let Some(role) = role {
        annotations.insert(ROLE_ANNOTATION.into(), json!(role));
    }
    serde_json::from_value(json!({
        "metadata": {
            "namespace": "team-a", "name": name, "uid": uid, "resourceVersion": "10",
            "annotations": annotations,
        },
        "spec": { "containers": [], "serviceAccountName": "app" },
        "status": { "phase": phase, "podIP": ip, "podIPs": pod_ips },
    }))
    .unwrap()
}

fn entry(pod: &Pod) -> CachedPod {
    let info = project(pod);
    let policy = Policy::new(
        ArnResolver::new(BASE).unwrap(),
        "kiam",
        false,
        NamespacePolicyConfig::default(),
    );
    CachedPod {
        identity: policy.identity(&info).unwrap_or(None),
        info: Arc::new(info),
        resource_version: pod
            .metadata
            .resource_version
            .as_deref()
            .and_then(|v| v.parse().ok()),
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn names(pods: &[Arc<PodInfo>]) -> Vec<&str> {
    pods.iter().map(|p| &*p.name).collect()
}

#[test]
fn matching_rule() {
    let now = Timestamp::now();
    let base = project(&pod_json("p", "u", Some("10.0.0.1"), "Running", None));
    assert!(base.matches_ip_at(now));
    let pending = PodInfo {
        phase: PodPhase::Pending,
        ..base.clone()
    };
    assert!(pending.matches_ip_at(now));
    for phase in [PodPhase::Succeeded, PodPhase::Failed] {
        assert!(!PodInfo {
            phase,
            ..base.clone()
        }
        .matches_ip_at(now));
    }
    assert!(!PodInfo {
        host_network: true,
        ..base.clone()
    }
    .matches_ip_at(now));
    assert!(!PodInfo {
        ips: None,
        ..base.clone()
    }
    .matches_ip_at(now));
    let in_grace = PodInfo {
        deletion: Some(now + jiff::SignedDuration::from_secs(30)),
        ..base.clone()
    };
    assert!(in_grace.matches_ip_at(now));
    let past = PodInfo {
        deletion: Some(now - jiff::SignedDuration::from_secs(1)),
        ..base.clone()
    };
    assert!(!past.matches_ip_at(now));
}

#[test]
fn ip_reuse_answers_the_new_pod_only() {
    let mut index = PodIndex::default();
    let now = Timestamp::now();
    index.upsert(entry(&pod_json(
        "old",
        "u1",
        Some("10.0.0.1"),
        "Running",
        Some("old-role"),
    )));
    assert_eq!(names(&index.live_on(ip("10.0.0.1"), now)), ["old"]);
    // The old pod completes, a new one gets its IP.
    index.upsert(entry(&pod_json(
        "old",
        "u1",
        Some("10.0.0.1"),
        "Succeeded",
        Some("old-role"),
    )));
    index.upsert(entry(&pod_json(
        "new",
        "u2",
        Some("10.0.0.1"),
        "Pending",
        Some("new-role"),
    )));
    let live = index.live_on(ip("10.0.0.1"), now);
    assert_eq!(names(&live), ["new"]);
    assert_eq!(live[0].role.as_deref(), Some("new-role"));
    // Deleting the old pod removes it from the IP index entirely.
    index.delete(&("team-a".into(), "old".into()), &"u1".into());
    assert_eq!(index.by_ip[&ip("10.0.0.1")].len(), 1);
    index.delete(&("team-a".into(), "new".into()), &"u2".into());
    assert!(index.by_ip.is_empty() && index.pods.is_empty());
}

#[test]
fn a_pod_moving_ip_is_reindexed() {
    let mut index = PodIndex::default();
    let now = Timestamp::now();
    index.upsert(entry(&pod_json(
        "p",
        "u1",
        Some("10.0.0.1"),
        "Running",
        None,
    )));
    index.upsert(entry(&pod_json(
        "p",
        "u1",
        Some("10.0.0.2"),
        "Running",
        None,
    )));
    assert!(index.live_on(ip("10.0.0.1"), now).is_empty());
    assert_eq!(names(&index.live_on(ip("10.0.0.2"), now)), ["p"]);
}

#[test]
fn identities_count_live_pods_only() {
    let mut index = PodIndex::default();
    let a = entry(&pod_json(
        "a",
        "u1",
        Some("10.0.0.1"),
        "Running",
        Some("foo"),
    ));
    let id = a.identity.clone().unwrap();
    index.upsert(a);
    // `/foo` is the same identity.
    index.upsert(entry(&pod_json("b", "u2", None, "Pending", Some("/foo"))));
    assert_eq!(index.identities[&id], 2);
    index.upsert(entry(&pod_json(
        "a",
        "u1",
        Some("10.0.0.1"),
        "Failed",
        Some("foo"),
    )));
    assert_eq!(index.identities[&id], 1);
    // Re-applying an unchanged pod does not double-count.
    index.upsert(entry(&pod_json("b", "u2", None, "Pending", Some("/foo"))));
    assert_eq!(index.identities[&id], 1);
    index.delete(&("team-a".into(), "b".into()), &"u2".into());
    assert!(index.identities.is_empty());
    // Unresolvable roles count for nothing.
    index.upsert(entry(&pod_json(
        "c",
        "u3",
        None,
        "Running",
        Some("bad role"),
    )));
    assert!(index.identities.is_empty());
}

#[test]
fn prefetches_when_a_pod_with_a_role_becomes_runnable_or_changes() {
    let mut index = PodIndex::default();
    // No IP yet: nothing to prefetch for.
    assert!(index
        .upsert(entry(&pod_json("p", "u1", None, "Pending", Some("foo"))))
        .is_none());
    let prefetched = index
        .upsert(entry(&pod_json(
            "p",
            "u1",
            Some("10.0.0.1"),
            "Pending",
            Some("foo"),
        )))
        .expect("pending with an IP is prefetched for");
    assert_eq!(prefetched.pod.role.as_deref(), Some("foo"));
    // Running, same role and IP: already prefetched for.
    assert!(index
        .upsert(entry(&pod_json(
            "p",
            "u1",
            Some("10.0.0.1"),
            "Running",
            Some("foo")
        )))
        .is_none());
    // The role changes: prefetch again.
    assert!(index
        .upsert(entry(&pod_json(
            "p",
            "u1",
            Some("10.0.0.1"),
            "Running",
            Some("bar")
        )))
        .is_some());
    // No role, completed, host network: never.
    assert!(index
        .upsert(entry(&pod_json(
            "q",
            "u2",
            Some("10.0.0.2"),
            "Running",
            None
        )))
        .is_none());
    assert!(index
        .upsert(entry(&pod_json(
            "r",
            "u3",
            Some("10.0.0.3"),
            "Succeeded",
            Some("foo")
        )))
        .is_none());
    let mut host: Pod = pod_json("h", "u4", Some("10.0.0.4"), "Running", Some("foo"));
    host.spec.as_mut().unwrap().host_network = Some(true);
    assert!(index.upsert(entry(&host)).is_none());
}

#[test]
fn direct_lookups_never_resurrect_or_overwrite_newer_state() {
    let mut index = PodIndex::default();
    let now = Timestamp::now();
    // A lookup raced with a deletion the watch already applied.
    index.upsert(entry(&pod_json(
        "p",
        "u1",
        Some("10.0.0.1"),
        "Running",
        Some("foo"),
    )));
    index.delete(&("team-a".into(), "p".into()), &"u1".into());
    assert!(index
        .insert_fresh(entry(&pod_json(
            "p",
            "u1",
            Some("10.0.0.1"),
            "Running",
            Some("foo")
        )))
        .is_none());
    assert!(index.live_on(ip("10.0.0.1"), now).is_empty());

    // Unknown pod: inserted (and prefetched for).
    assert!(index
        .insert_fresh(entry(&pod_json(
            "q",
            "u2",
            Some("10.0.0.2"),
            "Running",
            Some("foo")
        )))
        .is_some());
    assert_eq!(names(&index.live_on(ip("10.0.0.2"), now)), ["q"]);

    // Same resourceVersion or older: the cache keeps its state.
    let mut older = pod_json("q", "u2", Some("10.0.0.9"), "Running", Some("foo"));
    older.metadata.resource_version = Some("9".into());
    index.insert_fresh(entry(&older));
    assert_eq!(names(&index.live_on(ip("10.0.0.2"), now)), ["q"]);
    // Newer: replaces.
    let mut newer = pod_json("q", "u2", Some("10.0.0.3"), "Running", Some("foo"));
    newer.metadata.resource_version = Some("11".into());
    index.insert_fresh(entry(&newer));
    assert!(index.live_on(ip("10.0.0.2"), now).is_empty());
    assert_eq!(names(&index.live_on(ip("10.0.0.3"), now)), ["q"]);
    // Another pod under the same name: the watch decides.
    index.insert_fresh(entry(&pod_json(
        "q",
        "u9",
        Some("10.0.0.4"),
        "Running",
        None,
    )));
    assert_eq!(&*index.pods[&("team-a".into(), "q".into())].info.uid, "u2");
}

#[test]
fn a_delete_for_an_older_pod_keeps_its_successor() {
    let mut index = PodIndex::default();
    index.upsert(entry(&pod_json(
        "p",
        "new-uid",
        Some("10.0.0.1"),
        "Running",
        None,
    )));
    index.delete(&("team-a".into(), "p".into()), &"old-uid".into());
    assert_eq!(index.pods.len(), 1);
}

#[test]
fn relist_drops_pods_deleted_while_the_watch_was_down() {
    let mut index = PodIndex::default();
    index.upsert(entry(&pod_json(
        "gone",
        "u1",
        Some("10.0.0.1"),
        "Running",
        Some("foo"),
    )));
    index.upsert(entry(&pod_json(
        "kept",
        "u2",
        Some("10.0.0.2"),
        "Running",
        Some("foo"),
    )));
    index.relisted = Some(HashSet::new());
    let kept = entry(&pod_json(
        "kept",
        "u2",
        Some("10.0.0.2"),
        "Running",
        Some("foo"),
    ));
    index.relisted.as_mut().unwrap().insert(kept.key());
    index.upsert(kept);
    assert_eq!(index.finish_relist(), 1);
    assert!(index.pods.keys().all(|(_, name)| &**name == "kept"));
    assert!(!index.by_ip.contains_key(&ip("10.0.0.1")));
    assert_eq!(index.identities.values().sum::<usize>(), 1);
    assert!(index.tombstoned.contains("u1"));
}

#[test]
fn a_dual_stack_pod_is_found_by_either_address() {
    let mut index = PodIndex::default();
    let now = Timestamp::now();
    index.upsert(entry(&pod_json(
        "dual",
        "u1",
        Some("198.18.0.1,2001:2::1"),
        "Running",
        Some("foo"),
    )));
    assert_eq!(names(&index.live_on(ip("198.18.0.1"), now)), ["dual"]);
    assert_eq!(names(&index.live_on(ip("2001:2::1"), now)), ["dual"]);
    // The v4-mapped spelling of the IPv4 address is the same address.
    assert_eq!(
        names(&index.live_on(ip("::ffff:198.18.0.1"), now)),
        ["dual"]
    );
    assert!(index.live_on(ip("2001:2::2"), now).is_empty());

    // A single-stack IPv6 pod.
    index.upsert(entry(&pod_json(
        "v6",
        "u2",
        Some("2001:2::2"),
        "Running",
        None,
    )));
    assert_eq!(names(&index.live_on(ip("2001:2::2"), now)), ["v6"]);

    // Losing its IPv6 address unindexes only that address.
    index.upsert(entry(&pod_json(
        "dual",
        "u1",
        Some("198.18.0.1"),
        "Running",
        Some("foo"),
    )));
    assert!(index.live_on(ip("2001:2::1"), now).is_empty());
    assert_eq!(names(&index.live_on(ip("198.18.0.1"), now)), ["dual"]);

    index.delete(&("team-a".into(), "dual".into()), &"u1".into());
    index.delete(&("team-a".into(), "v6".into()), &"u2".into());
    assert!(index.by_ip.is_empty() && index.pods.is_empty());
}

#[test]
fn an_ipv6_address_reused_by_another_pod_answers_the_new_pod_only() {
    let mut index = PodIndex::default();
    let now = Timestamp::now();
    index.upsert(entry(&pod_json(
        "old",
        "u1",
        Some("198.18.0.1,2001:2::1"),
        "Running",
        Some("old-role"),
    )));
    // The old pod completes; a new pod gets its IPv6 address as its
    // primary, and another IPv4 address.
    index.upsert(entry(&pod_json(
        "old",
        "u1",
        Some("198.18.0.1,2001:2::1"),
        "Failed",
        Some("old-role"),
    )));
    index.upsert(entry(&pod_json(
        "new",
        "u2",
        Some("2001:2::1,198.18.0.2"),
        "Running",
        Some("new-role"),
    )));
    assert_eq!(names(&index.live_on(ip("2001:2::1"), now)), ["new"]);
    assert!(index.live_on(ip("198.18.0.1"), now).is_empty());
    // Two live pods on one IPv6 address: both are reported (the caller
    // refuses to guess).
    index.upsert(entry(&pod_json(
        "old",
        "u1",
        Some("198.18.0.1,2001:2::1"),
        "Running",
        Some("old-role"),
    )));
    assert_eq!(index.live_on(ip("2001:2::1"), now).len(), 2);
}

#[test]
fn a_new_ipv6_address_is_prefetched_for_like_a_new_ipv4_one() {
    let mut index = PodIndex::default();
    assert!(index
        .upsert(entry(&pod_json(
            "p",
            "u1",
            Some("198.18.0.1"),
            "Running",
            Some("foo")
        )))
        .is_some());
    // Same pod, now dual-stack: what it would be given is the same, but
    // the address set changed, as when a pod moves IP.
    assert!(index
        .upsert(entry(&pod_json(
            "p",
            "u1",
            Some("198.18.0.1,2001:2::1"),
            "Running",
            Some("foo")
        )))
        .is_some());
}
