//! The pod projection: the dozen fields of a Pod kiam reads, deserialized
//! straight from the API server's JSON into [`PodView`] and projected into
//! [`PodInfo`].
//!
//! The surprise: annotations other than kiam's are skipped while parsing,
//! never built. A real pod is 4-8 KB of JSON of which kiam keeps a dozen
//! fields; building whole `Pod` objects only to drop them was most of a
//! large cluster's sync time and its peak memory.

use std::sync::Arc;

use jiff::Timestamp;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::model::{
    PodInfo, PodIps, PodPhase, EXTERNAL_ID_ANNOTATION, ROLE_ANNOTATION, SESSION_NAME_ANNOTATION,
};

impl PodInfo {
    /// The projection of a [`PodView`]. Empty annotations count as absent (as
    /// in kiam). The addresses are `status.podIP` then the rest of
    /// `status.podIPs` (a dual-stack pod has one per family; kiam only knew
    /// `podIP`); an unparsable address is skipped.
    pub(crate) fn from_view(pod: &PodView) -> Self {
        let meta = &pod.metadata;
        let annotation = |key: &str| {
            meta.annotations
                .as_ref()
                .and_then(|a| a.get(key))
                .filter(|v| !v.is_empty())
                .map(|v| Arc::<str>::from(v.as_str()))
        };
        let status = pod.status.as_ref();
        let spec = pod.spec.as_ref();
        PodInfo {
            namespace: meta.namespace.as_deref().unwrap_or_default().into(),
            name: meta.name.as_deref().unwrap_or_default().into(),
            uid: meta.uid.as_deref().unwrap_or_default().into(),
            ips: status.and_then(StatusView::ips),
            phase: PodPhase::parse(status.and_then(|s| s.phase.as_deref())),
            host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
            deletion: meta
                .deletion_timestamp
                .as_ref()
                .and_then(|t| from_k8s_time(&t.0)),
            role: annotation(ROLE_ANNOTATION),
            session_name: annotation(SESSION_NAME_ANNOTATION),
            external_id: annotation(EXTERNAL_ID_ANNOTATION),
            service_account: spec
                .and_then(|s| s.service_account_name.as_deref())
                .filter(|s| !s.is_empty())
                .map(Into::into),
            node: spec
                .and_then(|s| s.node_name.as_deref())
                .filter(|s| !s.is_empty())
                .map(Into::into),
        }
    }
}

/// The fields of a Pod that kiam reads, deserialized straight from the API
/// server's JSON; everything else — env, volumes, probes, managed fields,
/// container statuses, annotations other than kiam's — is skipped without
/// being built. A real pod is 4-8 KB of JSON of which kiam keeps a dozen
/// fields, so at start-up (a full LIST) building whole `Pod` objects only
/// to drop them was most of the sync's time and its peak memory.
#[derive(Clone, Debug, Default, serde::Deserialize)]
pub(crate) struct PodView {
    #[serde(default, deserialize_with = "view::metadata")]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: Option<SpecView>,
    #[serde(default)]
    pub status: Option<StatusView>,
}

#[derive(Clone, Debug, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct SpecView {
    pub host_network: Option<bool>,
    pub service_account_name: Option<String>,
    pub node_name: Option<String>,
}

#[derive(Clone, Debug, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct StatusView {
    pub phase: Option<String>,
    #[serde(rename = "podIP")]
    pub pod_ip: Option<String>,
    /// Every address of the pod, `podIP` first (the API server keeps
    /// `podIPs[0] == podIP`; the order is not relied on).
    #[serde(rename = "podIPs")]
    pub pod_ips: Option<Vec<PodIpView>>,
}

#[derive(Clone, Debug, Default, serde::Deserialize)]
pub(crate) struct PodIpView {
    pub ip: Option<String>,
}

impl StatusView {
    fn ips(&self) -> Option<PodIps> {
        let primary = self.pod_ip.iter().map(String::as_str);
        let all = self
            .pod_ips
            .iter()
            .flatten()
            .filter_map(|p| p.ip.as_deref());
        PodIps::new(primary.chain(all).filter_map(|ip| ip.trim().parse().ok()))
    }
}

impl k8s_openapi::Resource for PodView {
    const API_VERSION: &'static str = <Pod as k8s_openapi::Resource>::API_VERSION;
    const GROUP: &'static str = <Pod as k8s_openapi::Resource>::GROUP;
    const KIND: &'static str = <Pod as k8s_openapi::Resource>::KIND;
    const VERSION: &'static str = <Pod as k8s_openapi::Resource>::VERSION;
    const URL_PATH_SEGMENT: &'static str = <Pod as k8s_openapi::Resource>::URL_PATH_SEGMENT;
    type Scope = <Pod as k8s_openapi::Resource>::Scope;
}

impl k8s_openapi::Metadata for PodView {
    type Ty = ObjectMeta;

    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// Deserializers that keep only what [`PodView`] needs.
mod view {
    use std::collections::BTreeMap;
    use std::fmt;

    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
    use serde::de::{self, Deserializer, IgnoredAny, MapAccess, Visitor};
    use serde::Deserialize;

    use crate::server::model::{EXTERNAL_ID_ANNOTATION, ROLE_ANNOTATION, SESSION_NAME_ANNOTATION};

    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Meta {
        name: Option<String>,
        namespace: Option<String>,
        uid: Option<String>,
        resource_version: Option<String>,
        deletion_timestamp: Option<Time>,
        #[serde(default, deserialize_with = "kiam_annotations")]
        annotations: Option<BTreeMap<String, String>>,
    }

    pub(super) fn metadata<'de, D: Deserializer<'de>>(d: D) -> Result<ObjectMeta, D::Error> {
        let m = Option::<Meta>::deserialize(d)?;
        Ok(m.map(|m| ObjectMeta {
            name: m.name,
            namespace: m.namespace,
            uid: m.uid,
            resource_version: m.resource_version,
            deletion_timestamp: m.deletion_timestamp,
            annotations: m.annotations,
            ..ObjectMeta::default()
        })
        .unwrap_or_default())
    }

    /// An annotation key: `Some` only for the annotations kiam reads.
    struct Key(Option<String>);

    impl<'de> Deserialize<'de> for Key {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl Visitor<'_> for V {
                type Value = Key;
                fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                    f.write_str("an annotation key")
                }
                fn visit_str<E: de::Error>(self, v: &str) -> Result<Key, E> {
                    let wanted = [
                        ROLE_ANNOTATION,
                        SESSION_NAME_ANNOTATION,
                        EXTERNAL_ID_ANNOTATION,
                    ];
                    Ok(Key(wanted.contains(&v).then(|| v.to_string())))
                }
            }
            d.deserialize_str(V)
        }
    }

    fn kiam_annotations<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<BTreeMap<String, String>>, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Option<BTreeMap<String, String>>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a map of annotations")
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(None)
            }
            fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(None)
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
                d.deserialize_map(self)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut kept = BTreeMap::new();
                while let Some(Key(key)) = map.next_key()? {
                    match key {
                        Some(key) => {
                            kept.insert(key, map.next_value()?);
                        }
                        None => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(Some(kept))
            }
        }
        d.deserialize_option(V)
    }
}

/// k8s-openapi uses jiff 0.2 and this crate jiff 1; both count nanoseconds
/// since the epoch.
fn from_k8s_time(t: &k8s_openapi::jiff::Timestamp) -> Option<Timestamp> {
    Timestamp::from_nanosecond(t.as_nanosecond()).ok()
}

#[cfg(test)]
pub(crate) mod tests {
    use k8s_openapi::api::core::v1::Pod;
    use serde_json::json;

    use super::*;

    /// The projection of a whole `pod`, by the rules of [`PodInfo::from_view`]:
    /// project the fields a PodView keeps, then use it.
    pub(crate) fn project(pod: &Pod) -> PodInfo {
        PodInfo::from_view(&PodView {
            metadata: pod.metadata.clone(),
            spec: pod.spec.as_ref().map(|s| SpecView {
                host_network: s.host_network,
                service_account_name: s.service_account_name.clone(),
                node_name: s.node_name.clone(),
            }),
            status: pod.status.as_ref().map(|s| StatusView {
                phase: s.phase.clone(),
                pod_ip: s.pod_ip.clone(),
                pod_ips: s.pod_ips.as_ref().map(|ips| {
                    ips.iter()
                        .map(|p| PodIpView {
                            ip: Some(p.ip.clone()),
                        })
                        .collect()
                }),
            }),
        })
    }

    fn ips(s: &str) -> PodIps {
        s.parse().unwrap()
    }

    #[test]
    fn projection_keeps_what_kiam_needs() {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {
                "namespace": "ns", "name": "p", "uid": "u1",
                "deletionTimestamp": "2030-01-02T03:04:05Z",
                "annotations": {
                    ROLE_ANNOTATION: "/foo", SESSION_NAME_ANNOTATION: "s",
                    EXTERNAL_ID_ANNOTATION: "", "other": "x",
                },
            },
            "spec": { "containers": [], "hostNetwork": true, "serviceAccountName": "sa" },
            "status": { "phase": "Running", "podIP": "fd00::5" },
        }))
        .unwrap();
        let info = project(&pod);
        assert_eq!(&*info.namespace, "ns");
        assert_eq!(&*info.name, "p");
        assert_eq!(&*info.uid, "u1");
        assert_eq!(info.ips, Some(ips("fd00::5")));
        assert_eq!(info.phase, PodPhase::Running);
        assert!(info.host_network);
        assert_eq!(info.deletion, Some("2030-01-02T03:04:05Z".parse().unwrap()));
        assert_eq!(info.role.as_deref(), Some("/foo"));
        assert_eq!(info.session_name.as_deref(), Some("s"));
        assert_eq!(info.external_id, None, "empty annotations count as absent");
        assert_eq!(info.service_account.as_deref(), Some("sa"));

        let bare: Pod = serde_json::from_value(json!({
            "metadata": { "name": "q" }, "status": { "podIP": "not-an-ip" }
        }))
        .unwrap();
        let info = project(&bare);
        assert_eq!(info.ips, None);
        assert_eq!(info.phase, PodPhase::Unknown);
        assert_eq!(info.role, None);
    }

    #[test]
    fn every_pod_ip_is_kept_primary_first() {
        let status = |status: serde_json::Value| {
            let view: PodView = serde_json::from_value(json!({ "status": status })).unwrap();
            PodInfo::from_view(&view).ips.map(|ips| ips.to_string())
        };
        // Dual-stack, either family first.
        assert_eq!(
            status(
                json!({"podIP": "198.18.0.5", "podIPs": [{"ip": "198.18.0.5"}, {"ip": "2001:2::5"}]})
            ),
            Some("198.18.0.5,2001:2::5".into())
        );
        assert_eq!(
            status(
                json!({"podIP": "2001:2::5", "podIPs": [{"ip": "2001:2::5"}, {"ip": "198.18.0.5"}]})
            ),
            Some("2001:2::5,198.18.0.5".into())
        );
        // podIP stays first even if podIPs disagrees on the order.
        assert_eq!(
            status(
                json!({"podIP": "2001:2::5", "podIPs": [{"ip": "198.18.0.5"}, {"ip": "2001:2::5"}]})
            ),
            Some("2001:2::5,198.18.0.5".into())
        );
        // Only one of the two fields; bad and missing entries are skipped.
        assert_eq!(
            status(json!({"podIP": "198.18.0.5"})),
            Some("198.18.0.5".into())
        );
        assert_eq!(
            status(json!({"podIPs": [{"ip": "bad"}, {}, {"ip": "2001:2::5"}]})),
            Some("2001:2::5".into())
        );
        assert_eq!(status(json!({"podIPs": []})), None);
        // One address written two ways is one address.
        assert_eq!(
            status(json!({"podIP": "2001:2::5", "podIPs": [{"ip": "2001:2:0::5"}]})),
            Some("2001:2::5".into())
        );
        let ips: PodIps = "198.18.0.5,2001:2::5".parse().unwrap();
        assert!(ips.contains("2001:2::5".parse().unwrap()));
        assert!(ips.contains("::ffff:198.18.0.5".parse().unwrap()));
        assert!(!ips.contains("2001:2::6".parse().unwrap()));
        assert_eq!(
            ips.primary(),
            "198.18.0.5".parse::<std::net::IpAddr>().unwrap()
        );
    }

    #[test]
    fn the_view_projects_like_the_full_pod() {
        let doc = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {
                "namespace": "ns", "name": "p", "uid": "u1", "resourceVersion": "42",
                "deletionTimestamp": "2030-01-02T03:04:05Z",
                "labels": {"app": "web"},
                "annotations": {
                    ROLE_ANNOTATION: "/foo", SESSION_NAME_ANNOTATION: "s",
                    EXTERNAL_ID_ANNOTATION: "", "kubectl.kubernetes.io/last-applied-configuration": "{\"big\": [1, 2]}",
                },
                "managedFields": [{"manager": "kubelet", "fieldsV1": {"f:status": {}}}],
            },
            "spec": {
                "containers": [{"name": "app", "image": "x", "env": [{"name": "A", "value": "b"}]}],
                "hostNetwork": true, "serviceAccountName": "sa",
            },
            "status": { "phase": "Running", "podIP": "fd00::5", "podIPs": [{"ip": "fd00::5"}, {"ip": "198.18.0.5"}], "conditions": [{"type": "Ready"}] },
        });
        let full: Pod = serde_json::from_value(doc.clone()).unwrap();
        let view: PodView = serde_json::from_value(doc).unwrap();
        assert_eq!(PodInfo::from_view(&view), project(&full));
        assert_eq!(view.metadata.resource_version.as_deref(), Some("42"));
        // Only kiam's annotations are kept.
        assert_eq!(view.metadata.annotations.as_ref().map(|a| a.len()), Some(3));

        // Missing or null parts are absent, not errors.
        let bare: PodView = serde_json::from_value(json!({
            "metadata": { "name": "q", "annotations": null }, "spec": null
        }))
        .unwrap();
        assert_eq!(PodInfo::from_view(&bare).role, None);
        let empty: PodView = serde_json::from_value(json!({})).unwrap();
        assert_eq!(&*PodInfo::from_view(&empty).name, "");
    }
}
