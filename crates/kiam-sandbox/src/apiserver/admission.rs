//! Mutating admission webhooks, called on create as the real API server's
//! dispatcher calls them: configurations in name order and their webhooks in
//! order, each filtered by its `rules`, `namespaceSelector` and
//! `objectSelector`, sent an `admission.k8s.io/v1` AdmissionReview over HTTPS
//! (verified against `caBundle`) within `timeoutSeconds`, its JSON patch
//! applied before the next one sees the object; `failurePolicy` decides
//! whether a webhook that cannot be called blocks the request, a denial
//! always does, and `reinvocationPolicy: IfNeeded` webhooks are called once
//! more when a later webhook changed the object.
//!
//! Differences from a real server: configurations are registered with a test
//! control ([`FakeApiServer::register_mutating_webhook_configuration`]), not
//! through `admissionregistration.k8s.io`; only `clientConfig.url` is
//! supported (no Service network); `matchConditions` are evaluated only in a
//! small CEL subset (`&&` of `has(object.x.y)` and `'key' in object.x.y`;
//! anything else is refused at registration); only creates are sent (no UPDATE/DELETE/CONNECT reviews); no
//! validating webhooks; `userInfo` is always anonymous (nothing is
//! authenticated here).

mod call;

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use base64::Engine;
use serde_json::{json, Value};

use super::kinds::Resource;
use super::status::ApiError;
use super::{FakeApiServer, IntoObject, Shared};
use call::Endpoint;

/// One webhook of a configuration, checked and defaulted as the API would.
#[derive(Clone, Debug)]
struct Webhook {
    name: String,
    endpoint: Endpoint,
    rules: Vec<Value>,
    namespace_selector: Value,
    object_selector: Value,
    /// `failurePolicy: Ignore`; the v1 default is Fail.
    ignore_failures: bool,
    timeout: Duration,
    /// `sideEffects: NoneOnDryRun`/`None` may be called for dry runs.
    dry_run_safe: bool,
    reinvoke: bool,
    /// `matchConditions`: all must hold for the webhook to be called.
    conditions: Vec<Condition>,
}

/// The registered configurations, by name (the dispatcher's order).
#[derive(Default)]
pub(crate) struct Registry {
    // std Mutex: cloned out before any call, never held across an `.await`.
    configs: Mutex<BTreeMap<String, Vec<Webhook>>>,
}

impl Registry {
    fn webhooks(&self) -> Vec<Webhook> {
        let configs = self.configs.lock().unwrap_or_else(|e| e.into_inner());
        configs.values().flatten().cloned().collect()
    }
}

impl FakeApiServer {
    /// Registers (or replaces, by name) an
    /// `admissionregistration.k8s.io/v1` MutatingWebhookConfiguration, as
    /// `kubectl apply` of the same YAML would on a real cluster. Fields are
    /// validated and defaulted as the API does (`failurePolicy: Fail`,
    /// `timeoutSeconds: 10`, empty selectors match everything).
    pub fn register_mutating_webhook_configuration(
        &self,
        config: impl IntoObject,
    ) -> Result<(), ApiError> {
        let config = config.into_object()?;
        if config["apiVersion"] != "admissionregistration.k8s.io/v1"
            || config["kind"] != "MutatingWebhookConfiguration"
        {
            return Err(ApiError::bad_request(
                "expected an admissionregistration.k8s.io/v1 MutatingWebhookConfiguration",
            ));
        }
        let name = config["metadata"]["name"]
            .as_str()
            .filter(|n| !n.is_empty())
            .ok_or_else(|| ApiError::bad_request("metadata.name: Required value"))?
            .to_string();
        let mut webhooks = Vec::new();
        for (i, w) in config["webhooks"]
            .as_array()
            .into_iter()
            .flatten()
            .enumerate()
        {
            webhooks.push(parse_webhook(w).map_err(|e| {
                ApiError::new(
                    422,
                    "Invalid",
                    format!("MutatingWebhookConfiguration {name:?} is invalid: webhooks[{i}]: {e}"),
                )
            })?);
        }
        let mut configs = self
            .shared
            .admission
            .configs
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        configs.insert(name, webhooks);
        Ok(())
    }

    /// Removes a MutatingWebhookConfiguration registered by name.
    pub fn remove_mutating_webhook_configuration(&self, name: &str) {
        let mut configs = self
            .shared
            .admission
            .configs
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        configs.remove(name);
    }
}

fn parse_webhook(w: &Value) -> Result<Webhook, String> {
    let name = w["name"]
        .as_str()
        .filter(|n| n.contains('.'))
        .ok_or("name: must be a fully qualified name with at least three segments")?;
    let versions: Vec<&str> = w["admissionReviewVersions"]
        .as_array()
        .ok_or("admissionReviewVersions: Required value")?
        .iter()
        .filter_map(Value::as_str)
        .collect();
    if !versions.contains(&"v1") {
        return Err("admissionReviewVersions: the in-memory API server speaks only v1".into());
    }
    let dry_run_safe = match w["sideEffects"].as_str() {
        Some("None" | "NoneOnDryRun") => true,
        Some(other) => {
            return Err(format!(
                "sideEffects: Unsupported value: {other:?}: supported values: \"None\", \"NoneOnDryRun\""
            ))
        }
        None => return Err("sideEffects: Required value".into()),
    };
    let ignore_failures = match w["failurePolicy"].as_str().unwrap_or("Fail") {
        "Fail" => false,
        "Ignore" => true,
        other => return Err(format!("failurePolicy: Unsupported value: {other:?}")),
    };
    let timeout = w["timeoutSeconds"].as_u64().unwrap_or(10);
    if !(1..=30).contains(&timeout) {
        return Err("timeoutSeconds: the timeout value must be between 1 and 30 seconds".into());
    }
    let reinvoke = match w["reinvocationPolicy"].as_str().unwrap_or("Never") {
        "Never" => false,
        "IfNeeded" => true,
        other => return Err(format!("reinvocationPolicy: Unsupported value: {other:?}")),
    };
    let mut conditions = Vec::new();
    for (i, c) in w["matchConditions"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
    {
        let expression = c["expression"].as_str().unwrap_or("");
        conditions.push(
            Condition::parse(expression)
                .ok_or_else(|| format!("matchConditions[{i}].expression: {expression:?}: the in-memory API server evaluates only `&&` of has(object.<path>) and '<key>' in object.<path>"))?,
        );
    }
    if w["matchPolicy"]
        .as_str()
        .is_some_and(|p| p != "Equivalent" && p != "Exact")
    {
        return Err("matchPolicy: Unsupported value".into());
    }
    Ok(Webhook {
        name: name.to_string(),
        endpoint: Endpoint::parse(&w["clientConfig"])?,
        rules: w["rules"].as_array().cloned().unwrap_or_default(),
        namespace_selector: w["namespaceSelector"].clone(),
        object_selector: w["objectSelector"].clone(),
        ignore_failures,
        timeout: Duration::from_secs(timeout),
        dry_run_safe,
        reinvoke,
        conditions,
    })
}

/// A `matchConditions` expression in the small CEL subset the fake
/// evaluates: terms joined by `&&`, each `has(object.a.b)` (the field is
/// present) or `'key' in object.a.b` (a map has the key).
#[derive(Clone, Debug)]
struct Condition(Vec<Term>);

#[derive(Clone, Debug)]
enum Term {
    Has(Vec<String>),
    In(String, Vec<String>),
}

impl Condition {
    fn parse(expression: &str) -> Option<Condition> {
        let path = |p: &str| -> Option<Vec<String>> {
            let rest = p.trim().strip_prefix("object.")?;
            let parts: Vec<String> = rest.split('.').map(str::to_string).collect();
            parts
                .iter()
                .all(|s| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
                .then_some(parts)
        };
        let mut terms = Vec::new();
        for term in expression.split("&&").map(str::trim) {
            if let Some(inner) = term.strip_prefix("has(").and_then(|t| t.strip_suffix(')')) {
                terms.push(Term::Has(path(inner)?));
            } else if let Some((key, map)) = term.split_once(" in ") {
                let key = key.trim().strip_prefix('\'')?.strip_suffix('\'')?;
                terms.push(Term::In(key.to_string(), path(map)?));
            } else {
                return None;
            }
        }
        Some(Condition(terms))
    }

    fn holds(&self, object: &Value) -> bool {
        let at = |p: &[String]| p.iter().try_fold(object, |v, k| v.get(k.as_str()));
        self.0.iter().all(|t| match t {
            Term::Has(p) => at(p).is_some_and(|v| !v.is_null()),
            Term::In(key, p) => at(p)
                .and_then(Value::as_object)
                .is_some_and(|m| m.contains_key(key)),
        })
    }
}

/// Whether a `metav1.LabelSelector` matches `labels` (null or `{}` matches
/// everything; an unknown operator matches nothing, as the API refuses it).
fn selector_matches(selector: &Value, labels: &Value) -> bool {
    let label = |k: &str| labels.get(k).and_then(Value::as_str);
    let exact = selector["matchLabels"]
        .as_object()
        .into_iter()
        .flatten()
        .all(|(k, v)| label(k) == v.as_str());
    let expressions = selector["matchExpressions"]
        .as_array()
        .into_iter()
        .flatten()
        .all(|e| {
            let key = e["key"].as_str().unwrap_or("");
            let values: Vec<&str> = e["values"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            match e["operator"].as_str() {
                Some("In") => label(key).is_some_and(|l| values.contains(&l)),
                Some("NotIn") => label(key).is_none_or(|l| !values.contains(&l)),
                Some("Exists") => label(key).is_some(),
                Some("DoesNotExist") => label(key).is_none(),
                _ => false,
            }
        });
    exact && expressions
}

/// Whether one of `rules` covers a create of `res` (no subresource).
fn rules_match(rules: &[Value], res: Resource, namespaced: bool) -> bool {
    let has = |list: &Value, want: &str| {
        list.as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .any(|v| v == "*" || v == want)
    };
    rules.iter().any(|r| {
        let version = res.api_version().rsplit('/').next().unwrap_or("v1");
        let resource = r["resources"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .any(|spec| {
                let (name, sub) = spec.split_once('/').unwrap_or((spec, ""));
                (name == "*" || name == res.plural()) && (sub == "*" || sub.is_empty())
            });
        let scope = match r["scope"].as_str().unwrap_or("*") {
            "Namespaced" => namespaced,
            "Cluster" => !namespaced,
            _ => true,
        };
        has(&r["operations"], "CREATE")
            && has(&r["apiGroups"], res.group())
            && has(&r["apiVersions"], version)
            && resource
            && scope
    })
}

fn uid() -> String {
    let b: [u8; 16] = rand::random();
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        u32::from_be_bytes([b[0], b[1], b[2], b[3]]),
        u16::from_be_bytes([b[4], b[5]]),
        u16::from_be_bytes([b[6], b[7]]) & 0x0fff,
        (u16::from_be_bytes([b[8], b[9]]) & 0x3fff) | 0x8000,
        u64::from_be_bytes([0, 0, b[10], b[11], b[12], b[13], b[14], b[15]])
    )
}

fn review(res: Resource, namespace: &str, obj: &Value, dry_run: bool) -> Value {
    let version = res.api_version().rsplit('/').next().unwrap_or("v1");
    let kind = json!({"group": res.group(), "version": version, "kind": res.kind()});
    let resource = json!({"group": res.group(), "version": version, "resource": res.plural()});
    let mut request = json!({
        "uid": uid(),
        "kind": kind, "resource": resource,
        "requestKind": kind, "requestResource": resource,
        "operation": "CREATE",
        "userInfo": {"username": "system:anonymous", "groups": ["system:unauthenticated"]},
        "object": obj,
        "oldObject": null,
        "dryRun": dry_run,
        "options": {"kind": "CreateOptions", "apiVersion": "meta.k8s.io/v1"},
    });
    // Omitted when empty, as Go's omitempty does (generateName pods have no name yet).
    if let Some(name) = obj["metadata"]["name"].as_str().filter(|n| !n.is_empty()) {
        request["name"] = name.into();
    }
    if res.namespaced() {
        request["namespace"] = namespace.into();
    }
    json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": request})
}

/// A call that failed (as opposed to a denial): `failurePolicy` applies.
fn call_failed(w: &Webhook, why: &str) -> ApiError {
    ApiError::internal(format!(
        "Internal error occurred: failed calling webhook {:?}: {why}",
        w.name
    ))
}

/// A webhook's `allowed: false`, as the real server reports it.
fn denied(w: &Webhook, status: &Value) -> ApiError {
    let code = status["code"]
        .as_u64()
        .and_then(|c| u16::try_from(c).ok())
        .filter(|c| *c >= 400)
        .unwrap_or(400);
    let by = format!("admission webhook {:?} denied the request", w.name);
    let message = match status["message"].as_str().filter(|m| !m.is_empty()) {
        Some(m) => format!("{by}: {m}"),
        None => format!("{by} without explanation"),
    };
    ApiError::new(code, "", message)
}

/// Calls one webhook and applies its patch to `obj`. `Ok(true)`: changed.
async fn call(
    w: &Webhook,
    res: Resource,
    namespace: &str,
    obj: &mut Value,
    dry_run: bool,
    warnings: &mut Vec<String>,
) -> Result<bool, ApiError> {
    let request = review(res, namespace, obj, dry_run);
    let sent_uid = request["request"]["uid"].clone();
    let answer = match w.endpoint.post(&request, w.timeout).await {
        Ok(a) => a,
        Err(e) => return Err(call_failed(w, &format!("failed to call webhook: {e}"))),
    };
    if answer["apiVersion"] != "admission.k8s.io/v1" || answer["kind"] != "AdmissionReview" {
        return Err(call_failed(
            w,
            &format!(
                "expected webhook response of admission.k8s.io/v1, Kind=AdmissionReview, got {}, Kind={}",
                answer["apiVersion"].as_str().unwrap_or(""),
                answer["kind"].as_str().unwrap_or("")
            ),
        ));
    }
    let response = &answer["response"];
    if !response.is_object() {
        return Err(call_failed(w, "webhook response was absent"));
    }
    if response["uid"] != sent_uid {
        return Err(call_failed(
            w,
            &format!(
                "expected response.uid={}, got {}",
                sent_uid.as_str().unwrap_or(""),
                response["uid"].as_str().unwrap_or("")
            ),
        ));
    }
    for warning in response["warnings"].as_array().into_iter().flatten() {
        if let Some(text) = warning.as_str() {
            warnings.push(text.to_string());
        }
    }
    if response["allowed"] != true {
        return Err(denied(w, &response["status"]));
    }
    let patch = response["patch"].as_str().filter(|p| !p.is_empty());
    let patch_type = response["patchType"].as_str();
    let Some(patch) = patch else {
        if patch_type.is_some() {
            return Err(call_failed(
                w,
                "webhook returned response.patchType but not response.patch",
            ));
        }
        return Ok(false);
    };
    if patch_type != Some("JSONPatch") {
        return Err(call_failed(
            w,
            &format!(
                "webhook returned invalid response.patchType of {:?}",
                patch_type.unwrap_or("")
            ),
        ));
    }
    // Past this point failurePolicy no longer applies: a patch that does not
    // apply is the webhook's answer, and it is an error.
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(patch)
        .map_err(|e| call_failed(w, &format!("response.patch is not base64: {e}")))?;
    let ops: json_patch::Patch = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::internal(format!("Internal error occurred: {e}")))?;
    let before = obj.clone();
    json_patch::patch(obj, &ops)
        .map_err(|e| ApiError::internal(format!("Internal error occurred: {e}")))?;
    Ok(*obj != before)
}

/// Runs the mutating webhooks for a create of `obj` in `namespace`, returning
/// the object to store and the warnings to send back.
pub(crate) async fn mutate(
    shared: &Shared,
    res: Resource,
    namespace: &str,
    mut obj: Value,
    dry_run: bool,
) -> Result<(Value, Vec<String>), ApiError> {
    if res == Resource::Pods {
        default_service_account(&mut obj);
    }
    let webhooks = shared.admission.webhooks();
    let mut warnings = Vec::new();
    if webhooks.is_empty() {
        return Ok((obj, warnings));
    }
    // As in the real handler, the namespace is settled before admission; a
    // conflicting or missing namespace fails later, in the registry, without
    // any webhook being called (NamespaceLifecycle admission runs first).
    let ns_labels = if res.namespaced() {
        let given = obj["metadata"]["namespace"].as_str().unwrap_or("");
        if !given.is_empty() && given != namespace {
            return Ok((obj, warnings));
        }
        let key = (String::new(), namespace.to_string());
        match shared.store.get(Resource::Namespaces, &key) {
            Some(ns) => ns["metadata"]["labels"].clone(),
            None => return Ok((obj, warnings)),
        }
    } else {
        json!({})
    };
    if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        if res.namespaced() {
            meta.insert("namespace".into(), namespace.into());
        }
    }
    let applies = |w: &Webhook, obj: &Value| {
        rules_match(&w.rules, res, res.namespaced())
            && (!res.namespaced() || selector_matches(&w.namespace_selector, &ns_labels))
            && selector_matches(&w.object_selector, &obj["metadata"]["labels"])
            && w.conditions.iter().all(|c| c.holds(obj))
    };
    // Which webhooks ran, and the index of the last one that changed the object.
    let mut called = Vec::new();
    let mut last_change: Option<usize> = None;
    for (i, w) in webhooks.iter().enumerate() {
        if !applies(w, &obj) {
            continue;
        }
        if dry_run && !w.dry_run_safe {
            return Err(ApiError::bad_request(format!(
                "admission webhook {:?} does not support dry run",
                w.name
            )));
        }
        match call(w, res, namespace, &mut obj, dry_run, &mut warnings).await {
            Ok(changed) => {
                called.push(i);
                if changed {
                    last_change = Some(i);
                }
            }
            Err(e)
                if e.code == 500
                    && w.ignore_failures
                    && e.message.contains("failed calling webhook") =>
            {
                tracing::warn!(webhook = %w.name, error = %e.message, "failurePolicy Ignore: skipping the webhook");
            }
            Err(e) => return Err(e),
        }
    }
    // reinvocationPolicy IfNeeded: once more, for those called before a later
    // webhook changed the object.
    if let Some(last) = last_change {
        for &i in called.iter().filter(|&&i| i < last) {
            let w = &webhooks[i];
            if !w.reinvoke || !applies(w, &obj) {
                continue;
            }
            match call(w, res, namespace, &mut obj, dry_run, &mut warnings).await {
                Ok(_) => {}
                Err(e)
                    if e.code == 500
                        && w.ignore_failures
                        && e.message.contains("failed calling webhook") => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok((obj, warnings))
}

/// The one thing of the ServiceAccount admission plugin (which runs before
/// webhooks) done here: a pod without `serviceAccountName` runs as
/// `default`. Webhooks see that, and the API refuses a projected token
/// without it. (Its token volume and the check that the account exists are
/// not done.)
fn default_service_account(pod: &mut Value) {
    let Some(spec) = pod.get_mut("spec").and_then(Value::as_object_mut) else {
        return;
    };
    let empty = spec
        .get("serviceAccountName")
        .and_then(Value::as_str)
        .is_none_or(str::is_empty);
    if empty {
        let name = spec
            .get("serviceAccount")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .unwrap_or("default")
            .to_string();
        spec.insert("serviceAccountName".into(), name.into());
    }
}

/// Webhook warnings as `Warning: 299 - "..."` headers, which kubectl and
/// client-go print.
pub(crate) fn add_warnings(response: &mut http::Response<axum::body::Body>, warnings: &[String]) {
    for w in warnings {
        let text = w.replace(['"', '\\'], "'");
        if let Ok(v) = http::HeaderValue::from_str(&format!("299 - \"{text}\"")) {
            response.headers_mut().append(http::header::WARNING, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_selectors_follow_metav1_semantics() {
        let labels = json!({"iam.amazonaws.com/token-identity": "enabled", "team": "a"});
        assert!(selector_matches(&Value::Null, &labels));
        assert!(selector_matches(&json!({}), &Value::Null));
        assert!(selector_matches(
            &json!({"matchLabels": {"iam.amazonaws.com/token-identity": "enabled"}}),
            &labels
        ));
        assert!(!selector_matches(
            &json!({"matchLabels": {"iam.amazonaws.com/token-identity": "enabled"}}),
            &json!({"team": "a"})
        ));
        assert!(selector_matches(
            &json!({"matchExpressions": [{"key": "team", "operator": "In", "values": ["a", "b"]},
                                         {"key": "x", "operator": "DoesNotExist"}]}),
            &labels
        ));
        assert!(!selector_matches(
            &json!({"matchExpressions": [{"key": "team", "operator": "NotIn", "values": ["a"]}]}),
            &labels
        ));
        assert!(!selector_matches(
            &json!({"matchExpressions": [{"key": "team", "operator": "Bogus"}]}),
            &labels
        ));
    }

    #[test]
    fn match_conditions_in_the_supported_subset() {
        let c = Condition::parse(
            "has(object.metadata.annotations) &&\n'iam.amazonaws.com/role' in object.metadata.annotations",
        )
        .unwrap();
        assert!(c.holds(&json!({"metadata": {"annotations": {"iam.amazonaws.com/role": "r"}}})));
        assert!(!c.holds(&json!({"metadata": {"annotations": {"other": "r"}}})));
        assert!(!c.holds(&json!({"metadata": {}})));
        assert!(Condition::parse("object.metadata.name == 'x'").is_none());
        assert!(Condition::parse("has(request.userInfo)").is_none());
    }

    #[test]
    fn rules_match_resources_as_the_dispatcher_does() {
        let rule = |resources: Value| {
            vec![
                json!({"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
                        "resources": resources}),
            ]
        };
        assert!(rules_match(&rule(json!(["pods"])), Resource::Pods, true));
        assert!(rules_match(&rule(json!(["*"])), Resource::Pods, true));
        assert!(rules_match(&rule(json!(["pods/*"])), Resource::Pods, true));
        assert!(!rules_match(
            &rule(json!(["pods/status"])),
            Resource::Pods,
            true
        ));
        assert!(!rules_match(
            &rule(json!(["services"])),
            Resource::Pods,
            true
        ));
        let update_only = vec![json!({"operations": ["UPDATE"], "apiGroups": [""],
            "apiVersions": ["v1"], "resources": ["pods"]})];
        assert!(!rules_match(&update_only, Resource::Pods, true));
        let cluster = vec![json!({"operations": ["*"], "apiGroups": ["*"],
            "apiVersions": ["*"], "resources": ["*"], "scope": "Cluster"})];
        assert!(!rules_match(&cluster, Resource::Pods, true));
    }

    #[test]
    fn reviews_are_admission_v1_with_a_fresh_uid() {
        let pod = json!({"metadata": {"generateName": "web-", "namespace": "a"}, "spec": {}});
        let r = review(Resource::Pods, "a", &pod, true);
        assert_eq!(r["apiVersion"], "admission.k8s.io/v1");
        let req = &r["request"];
        assert_eq!(
            req["kind"],
            json!({"group": "", "version": "v1", "kind": "Pod"})
        );
        assert_eq!(req["resource"]["resource"], "pods");
        assert_eq!(req["operation"], "CREATE");
        assert_eq!(req["dryRun"], true);
        assert!(req.get("name").is_none());
        assert_eq!(req["uid"].as_str().unwrap().len(), 36);
        assert_ne!(
            req["uid"],
            review(Resource::Pods, "a", &pod, true)["request"]["uid"]
        );
    }
}
