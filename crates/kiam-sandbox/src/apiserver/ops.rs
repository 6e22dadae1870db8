//! Writes with the real API server's rules: namespace existence, optimistic concurrency,
//! preconditions, status subresource separation, patch types. HTTP handlers and the test
//! controls both come through here, so a control cannot create what the API would refuse
//! to hold (a pod in a missing namespace), only what it would refuse to *accept*.

use std::sync::Arc;

use serde_json::Value;

use super::resources::{
    self, metadata_mut, name_of, namespace_of, resource_version_of, Origin, Resource,
};
use super::status::ApiError;
use super::store::{Key, Store, Writer};

/// A PATCH body, by its Content-Type.
#[derive(Debug)]
pub enum Patch {
    /// `application/merge-patch+json` (RFC 7386).
    Merge(Value),
    /// `application/strategic-merge-patch+json`, applied as a merge patch after dropping
    /// `$`-directives: right for metadata and status, lists are replaced wholesale.
    Strategic(Value),
    /// `application/json-patch+json` (RFC 6902).
    Json(json_patch::Patch),
}

/// `DeleteOptions.preconditions`.
#[derive(Debug, Default)]
pub struct Preconditions {
    pub uid: Option<String>,
    pub resource_version: Option<String>,
}

fn key(res: Resource, namespace: &str, name: &str) -> Key {
    if res.namespaced() {
        (namespace.to_string(), name.to_string())
    } else {
        (String::new(), name.to_string())
    }
}

/// The object must be a JSON map of this resource's type (a missing apiVersion or kind is
/// taken from the URL, as the real decoder does).
pub fn check_type(res: Resource, obj: &Value) -> Result<(), ApiError> {
    if !obj.is_object() {
        return Err(ApiError::bad_request(
            "the body of the request must be a JSON object",
        ));
    }
    let field = |f: &str| obj.get(f).and_then(Value::as_str).unwrap_or("");
    let (api_version, kind) = (field("apiVersion"), field("kind"));
    if !api_version.is_empty() && api_version != res.api_version() {
        return Err(ApiError::bad_request(format!(
            "the API version in the data ({api_version}) does not match the expected API version ({})",
            res.api_version()
        )));
    }
    if !kind.is_empty() && kind != res.kind() {
        return Err(ApiError::bad_request(format!(
            "the kind in the data ({kind}) does not match the expected kind ({})",
            res.kind()
        )));
    }
    Ok(())
}

fn require_namespace(w: &Writer<'_>, res: Resource, namespace: &str) -> Result<(), ApiError> {
    if res.namespaced()
        && w.get(
            Resource::Namespaces,
            &(String::new(), namespace.to_string()),
        )
        .is_none()
    {
        return Err(ApiError::not_found(Resource::Namespaces, namespace));
    }
    Ok(())
}

/// Makes the object's namespace agree with the request's, or refuses like the real server.
fn settle_namespace(res: Resource, obj: &mut Value, namespace: &str) -> Result<(), ApiError> {
    if !res.namespaced() {
        return Ok(());
    }
    let given = namespace_of(obj);
    if !given.is_empty() && given != namespace {
        return Err(ApiError::bad_request(
            "the namespace of the provided object does not match the namespace sent on the request",
        ));
    }
    metadata_mut(obj).insert("namespace".into(), namespace.into());
    Ok(())
}

/// POST: a new object; 409 if the name is taken, 404 if its namespace does not exist.
pub fn create(
    store: &Store,
    res: Resource,
    namespace: &str,
    mut obj: Value,
    origin: Origin,
    dry_run: bool,
) -> Result<Arc<Value>, ApiError> {
    check_type(res, &obj)?;
    settle_namespace(res, &mut obj, namespace)?;
    let generate_name = obj
        .pointer("/metadata/generateName")
        .and_then(Value::as_str)
        .map(str::to_string);
    if name_of(&obj).is_empty() {
        if let Some(prefix) = &generate_name {
            let name = format!("{prefix}{}", resources::name_suffix());
            metadata_mut(&mut obj).insert("name".into(), name.into());
        }
    }
    resources::validate(res, &obj, origin)?;
    resources::prepare_create(res, &mut obj, origin);
    store.write(|w| {
        require_namespace(w, res, namespace)?;
        let key = key(res, namespace, name_of(&obj));
        if w.get(res, &key).is_some() {
            return Err(ApiError::already_exists(res, &key.1));
        }
        if dry_run {
            return Ok(Arc::new(obj));
        }
        let stored = w.put(res, key, obj);
        if res == Resource::Namespaces {
            ensure_default_service_account(w, name_of(&stored));
        }
        Ok(stored)
    })
}

/// What the real controller manager's serviceaccounts controller does moments after a
/// namespace appears (here in the same write, so tests need not wait): the namespace
/// gets a `default` ServiceAccount, which pods without `serviceAccountName` run as.
fn ensure_default_service_account(w: &mut Writer<'_>, namespace: &str) {
    let key = (namespace.to_string(), "default".to_string());
    if w.get(Resource::ServiceAccounts, &key).is_some() {
        return;
    }
    let mut sa = serde_json::json!({"metadata": {"name": "default", "namespace": namespace}});
    resources::prepare_create(Resource::ServiceAccounts, &mut sa, Origin::Api);
    w.put(Resource::ServiceAccounts, key, sa);
}

fn check_preconditions(
    res: Resource,
    current: &Value,
    pre: &Preconditions,
) -> Result<(), ApiError> {
    let name = name_of(current);
    let uid = current
        .pointer("/metadata/uid")
        .and_then(Value::as_str)
        .unwrap_or("");
    if let Some(want) = pre.uid.as_deref().filter(|u| !u.is_empty()) {
        if want != uid {
            return Err(ApiError::conflict(
                res,
                name,
                &format!(
                    "Precondition failed: UID in precondition: {want}, UID in object meta: {uid}"
                ),
            ));
        }
    }
    if let Some(want) = pre.resource_version.as_deref().filter(|v| !v.is_empty()) {
        if want != resource_version_of(current) {
            return Err(ApiError::stale_resource_version(res, name));
        }
    }
    Ok(())
}

/// How an update is applied.
#[derive(Clone, Copy)]
struct UpdateMode {
    /// Through the `/status` subresource: only `.status` changes.
    status_only: bool,
    origin: Origin,
    dry_run: bool,
}

impl UpdateMode {
    fn api(status_only: bool, dry_run: bool) -> Self {
        UpdateMode {
            status_only,
            origin: Origin::Api,
            dry_run,
        }
    }
}

/// Builds the stored form of an update of `old` into `new` and stores it.
fn commit_update(
    w: &mut Writer<'_>,
    res: Resource,
    key: Key,
    old: &Value,
    mut new: Value,
    mode: UpdateMode,
) -> Result<Arc<Value>, ApiError> {
    if name_of(&new) != name_of(old) {
        return Err(ApiError::invalid(
            res,
            name_of(old),
            "metadata.name",
            "Invalid value: field is immutable".into(),
        ));
    }
    if res.namespaced() && namespace_of(&new) != namespace_of(old) {
        return Err(ApiError::invalid(
            res,
            name_of(old),
            "metadata.namespace",
            "Invalid value: field is immutable".into(),
        ));
    }
    if mode.status_only {
        // The status subresource changes status and nothing else.
        let mut merged = old.clone();
        match new.get("status") {
            Some(status) => merged["status"] = status.clone(),
            None => {
                merged
                    .as_object_mut()
                    .expect("stored objects are maps")
                    .remove("status");
            }
        }
        new = merged;
    }
    resources::prepare_update(
        res,
        old,
        &mut new,
        mode.status_only || mode.origin == Origin::Control,
    );
    resources::validate(res, &new, mode.origin)?;
    if mode.dry_run {
        return Ok(Arc::new(new));
    }
    Ok(w.put(res, key, new))
}

/// PUT: replaces an object; the body's resourceVersion must be the current one.
pub fn replace(
    store: &Store,
    res: Resource,
    namespace: &str,
    name: &str,
    mut obj: Value,
    status_only: bool,
    dry_run: bool,
) -> Result<Arc<Value>, ApiError> {
    check_type(res, &obj)?;
    settle_namespace(res, &mut obj, namespace)?;
    let given = name_of(&obj);
    if !given.is_empty() && given != name {
        return Err(ApiError::bad_request(format!(
            "the name of the object ({given}) does not match the name on the URL ({name})"
        )));
    }
    metadata_mut(&mut obj).insert("name".into(), name.into());
    let rv = resource_version_of(&obj).to_string();
    if rv.is_empty() {
        return Err(ApiError::invalid(
            res,
            name,
            "metadata.resourceVersion",
            "Invalid value: 0x0: must be specified for an update".into(),
        ));
    }
    let uid = obj
        .pointer("/metadata/uid")
        .and_then(Value::as_str)
        .map(str::to_string);
    store.write(|w| {
        let key = key(res, namespace, name);
        let old = w
            .get(res, &key)
            .ok_or_else(|| ApiError::not_found(res, name))?;
        check_preconditions(
            res,
            &old,
            &Preconditions {
                uid,
                resource_version: Some(rv),
            },
        )?;
        commit_update(
            w,
            res,
            key,
            &old,
            obj,
            UpdateMode::api(status_only, dry_run),
        )
    })
}

/// Removes `$`-directive keys (`$patch`, `$setElementOrder/...`, `$retainKeys`) that only
/// strategic merge understands, so a plain merge does not store them.
fn strip_directives(value: &mut Value) {
    match value {
        Value::Object(map) => {
            map.retain(|k, _| !k.starts_with('$'));
            map.values_mut().for_each(strip_directives);
        }
        Value::Array(items) => items.iter_mut().for_each(strip_directives),
        _ => {}
    }
}

/// Applies a patch to a copy of `old`.
pub fn apply_patch(res: Resource, old: &Value, patch: &Patch) -> Result<Value, ApiError> {
    let mut new = old.clone();
    match patch {
        Patch::Merge(p) => json_patch::merge(&mut new, p),
        Patch::Strategic(p) => {
            let mut p = p.clone();
            strip_directives(&mut p);
            json_patch::merge(&mut new, &p);
        }
        Patch::Json(p) => json_patch::patch(&mut new, p).map_err(|e| {
            ApiError::invalid(
                res,
                name_of(old),
                "patch",
                format!("the JSON patch could not be applied: {e}"),
            )
        })?,
    }
    if !new.is_object() {
        return Err(ApiError::bad_request("the patch must leave a JSON object"));
    }
    Ok(new)
}

/// PATCH: a resourceVersion in the patched result acts as a precondition, as on the real server.
pub fn patch(
    store: &Store,
    res: Resource,
    namespace: &str,
    name: &str,
    patch: &Patch,
    status_only: bool,
    dry_run: bool,
) -> Result<Arc<Value>, ApiError> {
    store.write(|w| {
        let key = key(res, namespace, name);
        let old = w
            .get(res, &key)
            .ok_or_else(|| ApiError::not_found(res, name))?;
        let new = apply_patch(res, &old, patch)?;
        let rv = resource_version_of(&new);
        if !rv.is_empty() && rv != resource_version_of(&old) {
            return Err(ApiError::stale_resource_version(res, name));
        }
        commit_update(
            w,
            res,
            key,
            &old,
            new,
            UpdateMode::api(status_only, dry_run),
        )
    })
}

/// DELETE: removes the object at once (no kubelet here to honour a grace period) and,
/// for a namespace, everything in it.
pub fn delete(
    store: &Store,
    res: Resource,
    namespace: &str,
    name: &str,
    pre: &Preconditions,
    dry_run: bool,
) -> Result<Arc<Value>, ApiError> {
    store.write(|w| {
        let key = key(res, namespace, name);
        let old = w
            .get(res, &key)
            .ok_or_else(|| ApiError::not_found(res, name))?;
        check_preconditions(res, &old, pre)?;
        if dry_run {
            return Ok(old);
        }
        if res == Resource::Namespaces {
            for inner in Resource::ALL.into_iter().filter(|r| r.namespaced()) {
                let keys: Vec<Key> = w
                    .objects(inner)
                    .keys()
                    .filter(|(ns, _)| ns == name)
                    .cloned()
                    .collect();
                for k in keys {
                    w.remove(inner, &k);
                }
            }
        }
        w.remove(res, &key)
            .ok_or_else(|| ApiError::not_found(res, name))
    })
}

/// Test control: creates or replaces an object exactly as given (status included), with
/// server-owned metadata filled in. The type comes from its apiVersion and kind.
pub fn apply(store: &Store, mut obj: Value) -> Result<Arc<Value>, ApiError> {
    if !obj.is_object() {
        return Err(ApiError::bad_request("an object must be a JSON/YAML map"));
    }
    let field = |f: &str| obj.get(f).and_then(Value::as_str).unwrap_or("").to_string();
    let (api_version, kind) = (field("apiVersion"), field("kind"));
    let res = Resource::from_type(&api_version, &kind).ok_or_else(|| {
        ApiError::bad_request(format!(
            "the fake API server does not serve {api_version:?} {kind:?}; it serves v1 Pod, Namespace, Node, ServiceAccount, Event and events.k8s.io/v1 Event"
        ))
    })?;
    let namespace = if res.namespaced() {
        match namespace_of(&obj) {
            "" => "default".to_string(),
            ns => ns.to_string(),
        }
    } else {
        String::new()
    };
    settle_namespace(res, &mut obj, &namespace)?;
    resources::validate(res, &obj, Origin::Control)?;
    let name = name_of(&obj).to_string();
    store.write(|w| {
        require_namespace(w, res, &namespace)?;
        let key = key(res, &namespace, &name);
        match w.get(res, &key) {
            Some(old) => commit_update(
                w,
                res,
                key,
                &old,
                obj,
                UpdateMode {
                    status_only: false,
                    origin: Origin::Control,
                    dry_run: false,
                },
            ),
            None => {
                resources::prepare_create(res, &mut obj, Origin::Control);
                let stored = w.put(res, key, obj);
                if res == Resource::Namespaces {
                    ensure_default_service_account(w, &name);
                }
                Ok(stored)
            }
        }
    })
}

/// Test control: changes a stored object in place (status included) and stores the result.
pub fn modify(
    store: &Store,
    res: Resource,
    namespace: &str,
    name: &str,
    change: impl FnOnce(&mut Value),
) -> Result<Arc<Value>, ApiError> {
    store.write(|w| {
        let key = key(res, namespace, name);
        let old = w
            .get(res, &key)
            .ok_or_else(|| ApiError::not_found(res, name))?;
        let mut new = (*old).clone();
        change(&mut new);
        Ok(w.put(res, key, new))
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn store_with_namespace(ns: &str) -> Store {
        let store = Store::new(100);
        apply(
            &store,
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}),
        )
        .unwrap();
        store
    }

    fn event(ns: &str, count: i64) -> Value {
        json!({
            "metadata": {"name": "web.17", "namespace": ns},
            "involvedObject": {"kind": "Pod", "namespace": ns, "name": "web", "uid": "u"},
            "reason": "KiamRoleForbidden", "message": "no", "type": "Warning",
            "count": count,
            "firstTimestamp": "2026-01-01T00:00:00Z", "lastTimestamp": "2026-01-01T00:00:00Z"
        })
    }

    /// What a recorder does with a repeated core/v1 Event: patch its count and
    /// lastTimestamp, by merge or strategic merge patch, and create it again when gone.
    #[test]
    fn a_core_event_is_counted_up_by_patches_and_gone_once_deleted() {
        let store = store_with_namespace("a");
        let created = create(
            &store,
            Resource::Events,
            "a",
            event("a", 1),
            Origin::Api,
            false,
        )
        .unwrap();
        let update = |patch: Patch| {
            super::patch(
                &store,
                Resource::Events,
                "a",
                "web.17",
                &patch,
                false,
                false,
            )
        };
        let merged = update(Patch::Merge(
            json!({"count": 2, "lastTimestamp": "2026-01-01T00:00:10Z"}),
        ))
        .unwrap();
        assert_eq!(merged["count"], 2);
        assert_eq!(merged["lastTimestamp"], "2026-01-01T00:00:10Z");
        assert_eq!(merged["firstTimestamp"], "2026-01-01T00:00:00Z");
        assert_eq!(merged["metadata"]["uid"], created["metadata"]["uid"]);
        assert_ne!(resource_version_of(&merged), resource_version_of(&created));
        let strategic = update(Patch::Strategic(json!({"count": 3}))).unwrap();
        assert_eq!(strategic["count"], 3);
        assert_eq!(strategic["message"], "no");
        // Updates are validated like creates.
        let moved = update(Patch::Merge(json!({"involvedObject": {"namespace": "b"}})));
        assert_eq!(moved.unwrap_err().code, 422);

        delete(
            &store,
            Resource::Events,
            "a",
            "web.17",
            &Preconditions::default(),
            false,
        )
        .unwrap();
        let gone = update(Patch::Merge(json!({"count": 4}))).unwrap_err();
        assert_eq!((gone.code, gone.reason), (404, "NotFound"));
        let again = create(
            &store,
            Resource::Events,
            "a",
            event("a", 4),
            Origin::Api,
            false,
        )
        .unwrap();
        assert_eq!(again["count"], 4);
        let taken = create(
            &store,
            Resource::Events,
            "a",
            event("a", 1),
            Origin::Api,
            false,
        )
        .unwrap_err();
        assert_eq!((taken.code, taken.reason), (409, "AlreadyExists"));
    }
}
