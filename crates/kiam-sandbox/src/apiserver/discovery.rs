//! The discovery documents `kubectl` reads before anything else, built from the
//! resource table. Only legacy (non-aggregated) discovery is served: kubectl falls back to
//! it when the answer to its aggregated-discovery Accept header is plain `application/json`.

use serde_json::{json, Value};

use super::resources::Resource;

pub fn version() -> Value {
    json!({
        "major": "1",
        "minor": "33",
        "gitVersion": "v1.33.0-kiam-sandbox",
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2025-01-01T00:00:00Z",
        "goVersion": "go1.24.0",
        "compiler": "gc",
        "platform": "linux/amd64"
    })
}

/// `/api`: the legacy core group's versions.
pub fn core_versions(server_address: &str) -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}]
    })
}

fn group(name: &str) -> Value {
    let gv = json!({"groupVersion": format!("{name}/v1"), "version": "v1"});
    json!({
        "kind": "APIGroup",
        "apiVersion": "v1",
        "name": name,
        "versions": [gv],
        "preferredVersion": gv
    })
}

/// `/apis`: the named groups (only events.k8s.io, for kube-runtime's event recorder).
pub fn groups() -> Value {
    let mut g = group("events.k8s.io");
    let map = g.as_object_mut().expect("group is a map");
    map.remove("kind");
    map.remove("apiVersion");
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": [g]})
}

/// `/apis/{group}`, if the group is served.
pub fn group_document(name: &str) -> Option<Value> {
    Resource::ALL
        .iter()
        .any(|r| r.group() == name && !name.is_empty())
        .then(|| group(name))
}

/// `/api/v1` or `/apis/{group}/v1`: the resources of one group version and their verbs.
pub fn resource_list(group: &str) -> Value {
    let mut resources = Vec::new();
    for res in Resource::ALL.into_iter().filter(|r| r.group() == group) {
        let mut verbs = vec![
            "create", "delete", "get", "list", "patch", "update", "watch",
        ];
        if res.namespaced() {
            verbs.insert(1, "deletecollection");
        }
        let mut entry = json!({
            "name": res.plural(),
            "singularName": res.singular(),
            "namespaced": res.namespaced(),
            "kind": res.kind(),
            "verbs": verbs,
            "shortNames": res.short_names(),
        });
        if res == Resource::Pods {
            entry["categories"] = json!(["all"]);
        }
        resources.push(entry);
        if res.has_status() {
            resources.push(json!({
                "name": format!("{}/status", res.plural()),
                "singularName": "",
                "namespaced": res.namespaced(),
                "kind": res.kind(),
                "verbs": ["get", "patch", "update"],
            }));
        }
    }
    let group_version = match group {
        "" => "v1".to_string(),
        g => format!("{g}/v1"),
    };
    json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": group_version,
        "resources": resources
    })
}
