//! Server-side printing: the `meta.k8s.io/v1` `Table` that `kubectl get` asks for with
//! `Accept: application/json;as=Table;...`, with the same columns a real server prints.

use serde_json::{json, Value};

use super::resources::Resource;

/// Whether an Accept header prefers a Table (kubectl lists it before plain JSON).
pub fn wants_table(accept: &str) -> bool {
    accept
        .split(',')
        .next()
        .is_some_and(|first| first.contains("as=Table"))
}

fn column(name: &str, kind: &str, priority: u8) -> Value {
    let format = if name == "Name" { "name" } else { "" };
    json!({"name": name, "type": kind, "format": format, "description": "", "priority": priority})
}

/// kubectl's short ages: 45s, 5m30s, 3h, 4d.
fn age(timestamp: Option<&str>) -> String {
    let Some(then) = timestamp.and_then(|t| t.parse::<jiff::Timestamp>().ok()) else {
        return "<unknown>".to_string();
    };
    let secs = (jiff::Timestamp::now().as_second() - then.as_second()).max(0);
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 600 => format!("{}m{}s", s / 60, s % 60),
        s if s < 3 * 3600 => format!("{}m", s / 60),
        s if s < 2 * 86400 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

fn text<'a>(obj: &'a Value, pointer: &str) -> &'a str {
    obj.pointer(pointer).and_then(Value::as_str).unwrap_or("")
}

fn or_none(s: &str) -> &str {
    if s.is_empty() {
        "<none>"
    } else {
        s
    }
}

fn pod_cells(pod: &Value) -> Vec<Value> {
    let containers = pod
        .pointer("/spec/containers")
        .and_then(Value::as_array)
        .map_or(0, Vec::len);
    let statuses = pod
        .pointer("/status/containerStatuses")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let ready = statuses
        .iter()
        .filter(|s| s.get("ready").and_then(Value::as_bool) == Some(true))
        .count();
    let restarts: i64 = statuses
        .iter()
        .filter_map(|s| s.get("restartCount").and_then(Value::as_i64))
        .sum();
    let status = if pod.pointer("/metadata/deletionTimestamp").is_some() {
        "Terminating"
    } else {
        match text(pod, "/status/reason") {
            "" => text(pod, "/status/phase"),
            reason => reason,
        }
    };
    vec![
        text(pod, "/metadata/name").into(),
        format!("{ready}/{containers}").into(),
        status.into(),
        restarts.to_string().into(),
        age(pod
            .pointer("/metadata/creationTimestamp")
            .and_then(Value::as_str))
        .into(),
        or_none(text(pod, "/status/podIP")).into(),
        or_none(text(pod, "/spec/nodeName")).into(),
        or_none(text(pod, "/status/nominatedNodeName")).into(),
        "<none>".into(),
    ]
}

/// The real server's event printer, for core/v1 and events.k8s.io/v1 alike (the latter's
/// `deprecated*` fields and `series` are what the former's fields become): the wide columns
/// carry the source, first sighting and count.
fn event_cells(event: &Value) -> Vec<Value> {
    let first_text = |pointers: &[&str]| {
        pointers
            .iter()
            .map(|p| text(event, p))
            .find(|t| !t.is_empty())
    };
    let first = first_text(&["/firstTimestamp", "/deprecatedFirstTimestamp", "/eventTime"]);
    let mut last = first_text(&["/lastTimestamp", "/deprecatedLastTimestamp"]).or(first);
    let mut count = ["/count", "/deprecatedCount"]
        .iter()
        .find_map(|p| event.pointer(p).and_then(Value::as_i64))
        .filter(|c| *c != 0)
        .unwrap_or(1);
    if let Some(series) = event.get("series").filter(|s| s.is_object()) {
        last = Some(text(series, "/lastObservedTime"));
        count = series.get("count").and_then(Value::as_i64).unwrap_or(0);
    }
    // events.k8s.io/v1 calls the object `regarding`, the source `deprecatedSource`.
    let reference = match event.get("involvedObject") {
        Some(r) if r.is_object() => r,
        _ => event.get("regarding").unwrap_or(&Value::Null),
    };
    let object = match text(reference, "/kind") {
        "" => text(reference, "/name").to_string(),
        kind => format!("{}/{}", kind.to_lowercase(), text(reference, "/name")),
    };
    let message = match text(event, "/message") {
        "" => text(event, "/note"),
        m => m,
    };
    let component = first_text(&[
        "/source/component",
        "/deprecatedSource/component",
        "/reportingComponent",
        "/reportingController",
    ])
    .unwrap_or("");
    let source = match first_text(&[
        "/source/host",
        "/deprecatedSource/host",
        "/reportingInstance",
    ]) {
        None => component.to_string(),
        Some(instance) => format!("{component}, {instance}"),
    };
    vec![
        age(last).into(),
        text(event, "/type").into(),
        text(event, "/reason").into(),
        object.into(),
        text(reference, "/fieldPath").into(),
        source.into(),
        message.trim().into(),
        age(first).into(),
        count.into(),
        text(event, "/metadata/name").into(),
    ]
}

fn columns(res: Resource) -> Vec<Value> {
    match res {
        Resource::Pods => vec![
            column("Name", "string", 0),
            column("Ready", "string", 0),
            column("Status", "string", 0),
            column("Restarts", "string", 0),
            column("Age", "string", 0),
            column("IP", "string", 1),
            column("Node", "string", 1),
            column("Nominated Node", "string", 1),
            column("Readiness Gates", "string", 1),
        ],
        Resource::Namespaces | Resource::Nodes => vec![
            column("Name", "string", 0),
            column("Status", "string", 0),
            column("Age", "string", 0),
        ],
        Resource::ServiceAccounts => vec![
            column("Name", "string", 0),
            column("Secrets", "integer", 0),
            column("Age", "string", 0),
        ],
        Resource::Events | Resource::EventsV1 => vec![
            column("Last Seen", "string", 0),
            column("Type", "string", 0),
            column("Reason", "string", 0),
            column("Object", "string", 0),
            column("Subobject", "string", 1),
            column("Source", "string", 1),
            column("Message", "string", 0),
            column("First Seen", "string", 1),
            column("Count", "string", 1),
            column("Name", "string", 1),
        ],
    }
}

fn cells(res: Resource, obj: &Value) -> Vec<Value> {
    match res {
        Resource::Pods => pod_cells(obj),
        Resource::Namespaces => vec![
            text(obj, "/metadata/name").into(),
            text(obj, "/status/phase").into(),
            age(obj
                .pointer("/metadata/creationTimestamp")
                .and_then(Value::as_str))
            .into(),
        ],
        Resource::Events | Resource::EventsV1 => event_cells(obj),
        Resource::ServiceAccounts => vec![
            text(obj, "/metadata/name").into(),
            obj.get("secrets")
                .and_then(Value::as_array)
                .map_or(0, Vec::len)
                .into(),
            age(obj
                .pointer("/metadata/creationTimestamp")
                .and_then(Value::as_str))
            .into(),
        ],
        Resource::Nodes => vec![
            text(obj, "/metadata/name").into(),
            node_status(obj).into(),
            age(obj
                .pointer("/metadata/creationTimestamp")
                .and_then(Value::as_str))
            .into(),
        ],
    }
}

/// kubectl's node STATUS: Ready, NotReady or Unknown, then SchedulingDisabled when cordoned.
fn node_status(node: &Value) -> String {
    let ready = node
        .pointer("/status/conditions")
        .and_then(Value::as_array)
        .and_then(|c| c.iter().find(|c| c["type"] == "Ready"))
        .map(|c| match c["status"].as_str() {
            Some("True") => "Ready",
            Some("False") => "NotReady",
            _ => "Unknown",
        })
        .unwrap_or("Unknown");
    if node.pointer("/spec/unschedulable") == Some(&Value::Bool(true)) {
        format!("{ready},SchedulingDisabled")
    } else {
        ready.to_string()
    }
}

/// A Table of `objects`; `include_object` is the request's `includeObject` (default Metadata).
pub fn render(
    res: Resource,
    objects: &[&Value],
    list_metadata: Value,
    include_object: &str,
) -> Value {
    let rows: Vec<Value> = objects
        .iter()
        .map(|obj| {
            let object = match include_object {
                "None" => Value::Null,
                "Object" => {
                    let mut full = (*obj).clone();
                    full["kind"] = res.kind().into();
                    full["apiVersion"] = res.api_version().into();
                    full
                }
                _ => json!({
                    "kind": "PartialObjectMetadata",
                    "apiVersion": "meta.k8s.io/v1",
                    "metadata": obj.get("metadata").cloned().unwrap_or_else(|| json!({})),
                }),
            };
            json!({"cells": cells(res, obj), "object": object})
        })
        .collect();
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": list_metadata,
        "columnDefinitions": columns(res),
        "rows": rows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubectl_accept_header_asks_for_a_table() {
        assert!(wants_table(
            "application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json"
        ));
        assert!(!wants_table("application/json"));
    }

    #[test]
    fn pod_rows_show_readiness_status_and_ip() {
        let pod = json!({
            "metadata": {"name": "web", "creationTimestamp": "2020-01-01T00:00:00Z"},
            "spec": {"containers": [{"name": "a"}, {"name": "b"}], "nodeName": "n1"},
            "status": {"phase": "Running", "podIP": "198.18.0.1",
                       "containerStatuses": [{"ready": true, "restartCount": 2}, {"ready": false, "restartCount": 1}]}
        });
        let table = render(Resource::Pods, &[&pod], json!({}), "Metadata");
        assert_eq!(
            table["rows"][0]["cells"],
            json!([
                "web",
                "1/2",
                "Running",
                "3",
                age(Some("2020-01-01T00:00:00Z")),
                "198.18.0.1",
                "n1",
                "<none>",
                "<none>"
            ])
        );
        assert_eq!(table["rows"][0]["object"]["metadata"]["name"], "web");
    }

    #[test]
    fn event_rows_show_the_count_in_wide_columns() {
        let core = json!({
            "metadata": {"name": "web.17"},
            "involvedObject": {"kind": "Pod", "name": "web"},
            "type": "Warning", "reason": "KiamRoleForbidden", "message": " no \n",
            "source": {"component": "kiam"}, "reportingInstance": "kiam-server-0",
            "firstTimestamp": "2020-01-01T00:00:00Z", "lastTimestamp": "2020-01-02T00:00:00Z",
            "count": 10
        });
        let series = json!({
            "metadata": {"name": "web.18"},
            "regarding": {"kind": "Pod", "name": "web"},
            "type": "Warning", "reason": "KiamCredentialError", "note": "sts failed",
            "reportingController": "kiam", "eventTime": "2020-01-01T00:00:00.000000Z",
            "series": {"count": 3, "lastObservedTime": "2020-01-03T00:00:00.000000Z"}
        });
        let table = render(Resource::Events, &[&core, &series], json!({}), "Metadata");
        let names: Vec<&str> = table["columnDefinitions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(names[8], "Count");
        assert_eq!(
            table["rows"][0]["cells"].as_array().unwrap().len(),
            names.len()
        );
        assert_eq!(
            table["rows"][0]["cells"],
            json!([
                age(Some("2020-01-02T00:00:00Z")),
                "Warning",
                "KiamRoleForbidden",
                "pod/web",
                "",
                "kiam, kiam-server-0",
                "no",
                age(Some("2020-01-01T00:00:00Z")),
                10,
                "web.17"
            ])
        );
        let row = &table["rows"][1]["cells"];
        assert_eq!(row[0], age(Some("2020-01-03T00:00:00Z")));
        assert_eq!(row[3], "pod/web");
        assert_eq!(row[5], "kiam");
        assert_eq!(row[6], "sts failed");
        assert_eq!(row[8], 3);
    }
}
