//! The resource types the fake serves, and what the real API server's registry does to
//! their objects on the way in (defaults, server-set metadata, validation).
//!
//! Objects are kept as JSON `Value`s rather than typed structs so that every field a
//! client sends survives a round trip, as it does in etcd.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::{json, Map, Value};

use super::status::ApiError;

pub use super::kinds::Resource;

/// Where an object came from, which decides how much the server trusts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// A client request: the registry rules of the real API server apply (status is
    /// reset on create, pods need containers).
    Api,
    /// A test control or seed file: the object is stored as given (status included),
    /// with only server-owned metadata filled in.
    Control,
}

/// Now, in the format Kubernetes uses for `metav1.Time` (RFC 3339, whole seconds, UTC).
pub fn now_rfc3339() -> String {
    format_time(jiff::Timestamp::now())
}

pub fn format_time(t: jiff::Timestamp) -> String {
    t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

fn random_u64() -> u64 {
    // RandomState is seeded per process from the OS; a counter makes every call differ.
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    hasher.finish()
}

/// A random version-4 UUID, the shape `metadata.uid` has on a real cluster.
pub fn new_uid() -> String {
    let hi = random_u64();
    let lo = random_u64();
    let time_hi = ((hi & 0x0fff) as u16) | 0x4000;
    let clock = (((lo >> 48) as u16) & 0x3fff) | 0x8000;
    format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        hi >> 32,
        (hi >> 16) & 0xffff,
        time_hi,
        clock,
        lo & 0xffff_ffff_ffff
    )
}

/// The five-character suffix the real API server appends to `metadata.generateName`.
pub fn name_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut n = random_u64();
    (0..5)
        .map(|_| {
            let c = ALPHABET[(n % ALPHABET.len() as u64) as usize] as char;
            n /= ALPHABET.len() as u64;
            c
        })
        .collect()
}

/// `metadata.name` of an object, or "".
pub fn name_of(obj: &Value) -> &str {
    obj.pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("")
}

/// `metadata.namespace` of an object, or "".
pub fn namespace_of(obj: &Value) -> &str {
    obj.pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .unwrap_or("")
}

/// `metadata.resourceVersion` of an object, or "".
pub fn resource_version_of(obj: &Value) -> &str {
    obj.pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
        .unwrap_or("")
}

/// The `metadata` map of an object, created if missing or not a map.
pub fn metadata_mut(obj: &mut Value) -> &mut Map<String, Value> {
    if !obj.is_object() {
        *obj = json!({});
    }
    let map = obj.as_object_mut().expect("just made an object");
    let meta = map.entry("metadata").or_insert_with(|| json!({}));
    if !meta.is_object() {
        *meta = json!({});
    }
    meta.as_object_mut().expect("just made an object")
}

/// Sets `obj[key]` to `value` unless the key is already present, creating `obj` as a map.
fn default_field(obj: &mut Map<String, Value>, key: &str, value: Value) {
    obj.entry(key).or_insert(value);
}

fn object_field<'a>(obj: &'a mut Value, key: &str) -> &'a mut Map<String, Value> {
    let map = obj.as_object_mut().expect("objects are maps by now");
    let field = map.entry(key).or_insert_with(|| json!({}));
    if !field.is_object() {
        *field = json!({});
    }
    field.as_object_mut().expect("just made an object")
}

/// DNS-1123 subdomain (pods, events) or label (namespaces), as the API server checks names.
fn valid_name(name: &str, label_only: bool) -> bool {
    let max = if label_only { 63 } else { 253 };
    let bytes = name.as_bytes();
    !name.is_empty()
        && name.len() <= max
        && bytes[0].is_ascii_alphanumeric()
        && bytes[bytes.len() - 1].is_ascii_alphanumeric()
        && bytes.iter().all(|b| {
            b.is_ascii_lowercase()
                || b.is_ascii_digit()
                || *b == b'-'
                || (!label_only && *b == b'.')
        })
}

/// Checks the parts of an object the real API server would reject with 422 Invalid.
pub fn validate(res: Resource, obj: &Value, origin: Origin) -> Result<(), ApiError> {
    let name = name_of(obj);
    let invalid = |field: &str, why: String| ApiError::invalid(res, name, field, why);
    if !valid_name(name, res == Resource::Namespaces) {
        let why = if name.is_empty() {
            "Required value: name or generateName is required".to_string()
        } else {
            format!(
                "Invalid value: {name:?}: a lowercase RFC 1123 {} must consist of lower case \
                 alphanumeric characters, '-'{}, and must start and end with an alphanumeric character",
                if res == Resource::Namespaces { "label" } else { "subdomain" },
                if res == Resource::Namespaces { "" } else { " or '.'" },
            )
        };
        return Err(invalid("metadata.name", why));
    }
    if res == Resource::Pods && origin == Origin::Api {
        let containers = obj.pointer("/spec/containers").and_then(Value::as_array);
        match containers {
            None => return Err(invalid("spec.containers", "Required value".into())),
            Some(list) if list.is_empty() => {
                return Err(invalid("spec.containers", "Required value".into()))
            }
            Some(list) => {
                for (i, c) in list.iter().enumerate() {
                    if c.get("name")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .is_empty()
                    {
                        return Err(invalid(
                            &format!("spec.containers[{i}].name"),
                            "Required value".into(),
                        ));
                    }
                    if c.get("image")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .is_empty()
                    {
                        return Err(invalid(
                            &format!("spec.containers[{i}].image"),
                            "Required value".into(),
                        ));
                    }
                }
            }
        }
    }
    if res == Resource::Events && origin == Origin::Api {
        validate_legacy_event(obj).map_err(|(field, why)| invalid(field, why))?;
    }
    if res == Resource::Nodes {
        validate_taints(obj).map_err(|(field, why)| invalid(&field, why))?;
    }
    Ok(())
}

/// The taint effects the real API server accepts.
const TAINT_EFFECTS: [&str; 3] = ["NoSchedule", "PreferNoSchedule", "NoExecute"];

/// `spec.taints` as the real node validation checks it: each taint has a key and a
/// known effect, and no two taints share a key and an effect.
fn validate_taints(node: &Value) -> Result<(), (String, String)> {
    let Some(taints) = node.pointer("/spec/taints") else {
        return Ok(());
    };
    let Some(taints) = taints.as_array() else {
        return Err(("spec.taints".into(), "Invalid value: must be a list".into()));
    };
    let mut seen = Vec::new();
    for (i, taint) in taints.iter().enumerate() {
        let text = |f: &str| taint.get(f).and_then(Value::as_str).unwrap_or("");
        let (key, effect) = (text("key"), text("effect"));
        if key.is_empty() {
            return Err((format!("spec.taints[{i}].key"), "Required value".into()));
        }
        if effect.is_empty() {
            return Err((format!("spec.taints[{i}].effect"), "Required value".into()));
        }
        if !TAINT_EFFECTS.contains(&effect) {
            return Err((
                format!("spec.taints[{i}].effect"),
                format!(
                    "Unsupported value: {effect:?}: supported values: \"NoExecute\", \"NoSchedule\", \"PreferNoSchedule\""
                ),
            ));
        }
        if seen.contains(&(key, effect)) {
            return Err((
                format!("spec.taints[{i}]"),
                "Duplicate value: taints must be unique by key and effect pair".into(),
            ));
        }
        seen.push((key, effect));
    }
    Ok(())
}

/// What the real server's `legacyValidateEvent` checks of a core/v1 Event without an
/// `eventTime` (the kind `kubectl describe` and client-go's recorder write), on create and
/// on every update: the Event lives in its object's namespace. Events with an `eventTime`
/// have stricter rules there that this server does not check.
fn validate_legacy_event(event: &Value) -> Result<(), (&'static str, String)> {
    if event.get("eventTime").is_some_and(|t| !t.is_null()) {
        return Ok(());
    }
    let namespace = namespace_of(event);
    let involved = event
        .pointer("/involvedObject/namespace")
        .and_then(Value::as_str)
        .unwrap_or("");
    // An Event about a cluster-scoped object goes in "default" (or nowhere, for old clients).
    let agrees = if involved.is_empty() {
        namespace.is_empty() || namespace == "default"
    } else {
        involved == namespace
    };
    if agrees {
        Ok(())
    } else {
        Err((
            "involvedObject.namespace",
            format!("Invalid value: {involved:?}: does not match event.namespace"),
        ))
    }
}

/// Fills in what the server owns on a new object: type, uid, timestamps, generation, the
/// defaults the real registry applies, and (for API creates) a fresh status.
pub fn prepare_create(res: Resource, obj: &mut Value, origin: Origin) {
    let map = obj.as_object_mut().expect("callers check objects are maps");
    map.insert("apiVersion".into(), res.api_version().into());
    map.insert("kind".into(), res.kind().into());
    let name = name_of(obj).to_string();
    let meta = metadata_mut(obj);
    meta.insert("uid".into(), new_uid().into());
    meta.remove("resourceVersion");
    meta.remove("managedFields");
    if origin == Origin::Api || !meta.contains_key("creationTimestamp") {
        meta.insert("creationTimestamp".into(), now_rfc3339().into());
    }
    if origin == Origin::Api {
        meta.remove("deletionTimestamp");
        meta.remove("deletionGracePeriodSeconds");
    }
    if res.has_generation() {
        meta.insert("generation".into(), 1.into());
    }
    if !res.namespaced() {
        meta.remove("namespace");
    }
    match res {
        Resource::Pods => {
            let spec = object_field(obj, "spec");
            default_field(spec, "restartPolicy", "Always".into());
            default_field(spec, "terminationGracePeriodSeconds", 30.into());
            default_field(spec, "dnsPolicy", "ClusterFirst".into());
            default_field(spec, "schedulerName", "default-scheduler".into());
            default_field(spec, "securityContext", json!({}));
            if origin == Origin::Api {
                obj["status"] = json!({"phase": "Pending", "qosClass": "BestEffort"});
            } else {
                default_field(object_field(obj, "status"), "phase", "Pending".into());
            }
        }
        Resource::Namespaces => {
            let labels = object_field(
                obj.get_mut("metadata").expect("metadata was just made"),
                "labels",
            );
            labels.insert("kubernetes.io/metadata.name".into(), name.into());
            default_field(
                object_field(obj, "spec"),
                "finalizers",
                json!(["kubernetes"]),
            );
            if origin == Origin::Api {
                obj["status"] = json!({"phase": "Active"});
            } else {
                default_field(object_field(obj, "status"), "phase", "Active".into());
            }
        }
        // The kubelet registers its node with a status, and the registry keeps it.
        Resource::Events | Resource::EventsV1 | Resource::Nodes | Resource::ServiceAccounts => {}
    }
}

/// Carries the server-owned parts of `old` into its replacement `new` (uid, creation
/// time, deletion state, generation; status too unless `keep_new_status`), and bumps the
/// generation when the spec changed.
pub fn prepare_update(res: Resource, old: &Value, new: &mut Value, keep_new_status: bool) {
    let map = new.as_object_mut().expect("callers check objects are maps");
    map.insert("apiVersion".into(), res.api_version().into());
    map.insert("kind".into(), res.kind().into());
    let old_meta = old.get("metadata").and_then(Value::as_object);
    let spec_changed = old.get("spec") != new.get("spec");
    let meta = metadata_mut(new);
    meta.remove("managedFields");
    for key in [
        "uid",
        "creationTimestamp",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "generation",
    ] {
        match old_meta.and_then(|m| m.get(key)) {
            Some(v) => meta.insert(key.into(), v.clone()),
            None => meta.remove(key),
        };
    }
    if res.has_generation() && spec_changed {
        let generation = meta.get("generation").and_then(Value::as_i64).unwrap_or(0);
        meta.insert("generation".into(), (generation + 1).into());
    }
    if res == Resource::Namespaces {
        let name = name_of(old).to_string();
        let labels = object_field(new.get_mut("metadata").expect("made above"), "labels");
        labels.insert("kubernetes.io/metadata.name".into(), name.into());
    }
    if res.has_status() && !keep_new_status {
        match old.get("status") {
            Some(status) => new["status"] = status.clone(),
            None => {
                new.as_object_mut().expect("map").remove("status");
            }
        }
    }
}

/// Equality that ignores `metadata.resourceVersion`: an update that changes nothing else
/// is a no-op on a real server (no new resourceVersion, no watch event).
pub fn same_content(a: &Value, b: &Value) -> bool {
    let strip = |v: &Value| {
        let mut v = v.clone();
        if let Some(meta) = v.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.remove("resourceVersion");
        }
        v
    };
    strip(a) == strip(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uids_are_v4_shaped_and_distinct() {
        let a = new_uid();
        let b = new_uid();
        assert_ne!(a, b);
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "4");
    }

    #[test]
    fn names_follow_dns_rules() {
        assert!(valid_name("web-0.a", false));
        assert!(!valid_name("web-0.a", true));
        assert!(!valid_name("Web", false));
        assert!(!valid_name("-web", false));
        assert!(!valid_name("", false));
    }

    #[test]
    fn api_create_resets_pod_status_and_control_create_keeps_it() {
        let pod =
            json!({"metadata": {"name": "p"}, "status": {"phase": "Running", "podIP": "10.0.0.1"}});
        let mut via_api = pod.clone();
        prepare_create(Resource::Pods, &mut via_api, Origin::Api);
        assert_eq!(via_api["status"]["phase"], "Pending");
        assert!(via_api["status"].get("podIP").is_none());
        let mut via_control = pod;
        prepare_create(Resource::Pods, &mut via_control, Origin::Control);
        assert_eq!(via_control["status"]["podIP"], "10.0.0.1");
        assert_eq!(via_control["metadata"]["generation"], 1);
    }

    #[test]
    fn node_taints_are_validated_like_the_real_server() {
        let node = |taints: Value| json!({"metadata": {"name": "n1"}, "spec": {"taints": taints}});
        let ok = node(json!([
            {"key": "kiam.example/agent-not-ready", "effect": "NoSchedule"},
            {"key": "kiam.example/agent-not-ready", "effect": "NoExecute"},
            {"key": "other", "value": "x", "effect": "PreferNoSchedule"},
        ]));
        assert!(validate(Resource::Nodes, &ok, Origin::Api).is_ok());
        for bad in [
            json!([{"effect": "NoSchedule"}]),
            json!([{"key": "a"}]),
            json!([{"key": "a", "effect": "Sometimes"}]),
            json!([{"key": "a", "effect": "NoSchedule"}, {"key": "a", "value": "v", "effect": "NoSchedule"}]),
        ] {
            let err = validate(Resource::Nodes, &node(bad.clone()), Origin::Api).unwrap_err();
            assert_eq!(err.code, 422, "{bad}");
        }
    }

    #[test]
    fn created_nodes_keep_their_status() {
        let mut node = json!({"metadata": {"name": "n1"}, "status": {"conditions": [{"type": "Ready", "status": "True"}]}});
        prepare_create(Resource::Nodes, &mut node, Origin::Api);
        assert_eq!(node["status"]["conditions"][0]["type"], "Ready");
        assert_eq!(node["kind"], "Node");
        assert!(node["metadata"].get("namespace").is_none());
        assert!(node["metadata"].get("generation").is_none());
    }

    #[test]
    fn a_core_event_lives_in_its_objects_namespace() {
        let event = |ns: &str, involved: Option<&str>| {
            let mut e = json!({"metadata": {"name": "web.1", "namespace": ns},
                               "involvedObject": {"kind": "Pod", "name": "web"}});
            if let Some(involved) = involved {
                e["involvedObject"]["namespace"] = involved.into();
            }
            e
        };
        let check = |e: &Value| validate(Resource::Events, e, Origin::Api);
        check(&event("a", Some("a"))).unwrap();
        check(&event("default", None)).unwrap();
        let err = check(&event("b", Some("a"))).unwrap_err();
        assert_eq!(err.code, 422);
        assert!(
            err.message.contains(
                "involvedObject.namespace: Invalid value: \"a\": does not match event.namespace"
            ),
            "{}",
            err.message
        );
        assert_eq!(check(&event("b", None)).unwrap_err().code, 422);
        // Events with an eventTime follow other rules; test controls store anything.
        let mut timed = event("b", Some("a"));
        timed["eventTime"] = "2026-01-01T00:00:00.000000Z".into();
        check(&timed).unwrap();
        validate(Resource::Events, &event("b", Some("a")), Origin::Control).unwrap();
    }

    #[test]
    fn update_keeps_server_fields_and_counts_spec_changes() {
        let mut old = json!({"metadata": {"name": "p"}, "spec": {"containers": []}});
        prepare_create(Resource::Pods, &mut old, Origin::Control);
        let mut new = json!({"metadata": {"name": "p", "uid": "forged"}, "spec": {"nodeName": "n"}, "status": {"phase": "Failed"}});
        prepare_update(Resource::Pods, &old, &mut new, false);
        assert_eq!(new["metadata"]["uid"], old["metadata"]["uid"]);
        assert_eq!(new["metadata"]["generation"], 2);
        assert_eq!(new["status"]["phase"], "Pending");
    }
}
