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

/// The group of TokenReview, which is created and answered but never stored, so it has
/// no [`Resource`].
const AUTHENTICATION: &str = "authentication.k8s.io";

/// The named groups served: events.k8s.io for kube-runtime's event recorder and
/// authentication.k8s.io for TokenReview.
const GROUPS: [&str; 2] = ["events.k8s.io", AUTHENTICATION];

/// `/apis`: the named groups.
pub fn groups() -> Value {
    let groups: Vec<Value> = GROUPS
        .iter()
        .map(|name| {
            let mut g = group(name);
            let map = g.as_object_mut().expect("group is a map");
            map.remove("kind");
            map.remove("apiVersion");
            g
        })
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

/// `/apis/{group}`, if the group is served.
pub fn group_document(name: &str) -> Option<Value> {
    GROUPS.contains(&name).then(|| group(name))
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
        if res == Resource::ServiceAccounts {
            resources.push(json!({
                "name": "serviceaccounts/token",
                "singularName": "",
                "namespaced": true,
                "group": AUTHENTICATION,
                "version": "v1",
                "kind": "TokenRequest",
                "verbs": ["create"],
            }));
        }
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
    if group == AUTHENTICATION {
        resources.push(json!({
            "name": "tokenreviews",
            "singularName": "tokenreview",
            "namespaced": false,
            "kind": "TokenReview",
            "verbs": ["create"],
        }));
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

fn group_version_path(group: &str) -> String {
    match group {
        "" => "api/v1".to_string(),
        g => format!("apis/{g}/v1"),
    }
}

/// `/openapi/v3`: where each group version's document is.
pub fn openapi_root() -> Value {
    let mut paths = serde_json::Map::new();
    for group in ["", "events.k8s.io", AUTHENTICATION] {
        let path = group_version_path(group);
        paths.insert(
            path.clone(),
            json!({"serverRelativeURL": format!("/openapi/v3/{path}?hash=kiam-sandbox")}),
        );
    }
    json!({"paths": paths})
}

/// `/openapi/v3/api/v1` or `/openapi/v3/apis/{group}/v1`: just enough of the OpenAPI
/// document for kubectl to see that PATCH and POST take `fieldValidation`, so it leaves
/// validation to the server instead of needing full schemas.
pub fn openapi_group_version(path: &str) -> Option<Value> {
    let group = match path {
        "api/v1" => "",
        other => other.strip_prefix("apis/")?.strip_suffix("/v1")?,
    };
    let resources: Vec<Resource> = Resource::ALL
        .into_iter()
        .filter(|r| r.group() == group)
        .collect();
    if resources.is_empty() && group != AUTHENTICATION {
        return None;
    }
    let field_validation = json!({
        "name": "fieldValidation", "in": "query", "schema": {"type": "string", "uniqueItems": true}
    });
    let mut paths = serde_json::Map::new();
    for res in resources {
        let gvk = json!({"group": res.group(), "version": "v1", "kind": res.kind()});
        let operation = |verb: &str| {
            json!({
                "operationId": format!("{verb}{}", res.kind()),
                "parameters": [field_validation],
                "responses": {"200": {"description": "OK"}},
                "x-kubernetes-action": verb,
                "x-kubernetes-group-version-kind": gvk,
            })
        };
        let prefix = format!("/{}", group_version_path(group));
        let collection = if res.namespaced() {
            format!("{prefix}/namespaces/{{namespace}}/{}", res.plural())
        } else {
            format!("{prefix}/{}", res.plural())
        };
        paths.insert(collection.clone(), json!({"post": operation("post")}));
        paths.insert(
            format!("{collection}/{{name}}"),
            json!({"put": operation("put"), "patch": operation("patch")}),
        );
    }
    let create = |path: String, kind: &str| {
        let operation = json!({
            "operationId": format!("create{kind}"),
            "parameters": [field_validation],
            "responses": {"201": {"description": "Created"}},
            "x-kubernetes-action": "post",
            "x-kubernetes-group-version-kind": {"group": AUTHENTICATION, "version": "v1", "kind": kind},
        });
        (path, json!({"post": operation}))
    };
    let (path, item) = match group {
        "" => create(
            "/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token".into(),
            "TokenRequest",
        ),
        AUTHENTICATION => create(
            format!("/apis/{AUTHENTICATION}/v1/tokenreviews"),
            "TokenReview",
        ),
        _ => (String::new(), Value::Null),
    };
    if !item.is_null() {
        paths.insert(path, item);
    }
    Some(json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": "v1.33.0-kiam-sandbox"},
        "paths": paths,
        "components": {"schemas": {}},
    }))
}
