//! AdmissionReview v1 in, AdmissionReview v1 out. Anything the API server
//! sends that is not a pod CREATE is allowed unchanged; a review that cannot
//! be read at all is a 400 (there is no `uid` to answer), and a pod that
//! cannot be patched is allowed unchanged with a warning the client sees.

use base64::Engine;
use serde_json::{json, Value};

use super::patch::{operations, Injection, Outcome};

/// How one review ended, for metrics and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReviewResult {
    Pod(Outcome),
    /// Not a pod CREATE (an UPDATE, another resource, a subresource).
    Ignored,
    /// A pod we could not read; allowed unchanged with a warning.
    Malformed,
}

impl ReviewResult {
    pub fn as_str(self) -> &'static str {
        match self {
            ReviewResult::Pod(o) => o.as_str(),
            ReviewResult::Ignored => "ignored",
            ReviewResult::Malformed => "malformed",
        }
    }
}

/// The body was not an AdmissionReview v1 with a request and a uid.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BadReview(pub String);

/// Answers one AdmissionReview body.
pub fn answer(body: &[u8], inj: &Injection) -> Result<(Value, ReviewResult), BadReview> {
    let review: Value = serde_json::from_slice(body)
        .map_err(|e| BadReview(format!("the body is not JSON: {e}")))?;
    if review["apiVersion"] != "admission.k8s.io/v1" || review["kind"] != "AdmissionReview" {
        return Err(BadReview(format!(
            "expected an admission.k8s.io/v1 AdmissionReview (admissionReviewVersions: [v1]), got {} {}",
            review["apiVersion"], review["kind"]
        )));
    }
    let request = &review["request"];
    let Some(uid) = request["uid"].as_str().filter(|u| !u.is_empty()) else {
        return Err(BadReview("the AdmissionReview has no request.uid".into()));
    };
    let mut response = json!({"uid": uid, "allowed": true});
    let is_pod_create = request["operation"] == "CREATE"
        && request["resource"]["group"] == ""
        && request["resource"]["resource"] == "pods"
        && request["subResource"].as_str().unwrap_or("").is_empty();
    let outcome = if !is_pod_create {
        ReviewResult::Ignored
    } else {
        match operations(&request["object"], inj) {
            Ok((ops, outcome)) => {
                if !ops.is_empty() {
                    // Serialising a Vec<Value> cannot fail.
                    let patch = serde_json::to_vec(&ops).unwrap_or_default();
                    response["patchType"] = json!("JSONPatch");
                    response["patch"] =
                        json!(base64::engine::general_purpose::STANDARD.encode(patch));
                }
                if outcome == Outcome::NoServiceAccount {
                    response["warnings"] = json!([
                        "kiam webhook: the pod has no serviceAccountName (is the ServiceAccount admission plugin off?), so it was not given the token path"
                    ]);
                }
                ReviewResult::Pod(outcome)
            }
            Err(e) => {
                response["warnings"] = json!([format!(
                    "kiam webhook: pod not given the token path ({e}); it may still use the metadata path"
                )]);
                ReviewResult::Malformed
            }
        }
    };
    let out = json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "response": response,
    });
    Ok((out, outcome))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn review(request: Value) -> Vec<u8> {
        serde_json::to_vec(&json!({"apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview", "request": request}))
        .unwrap()
    }

    fn pod_create(object: Value) -> Value {
        json!({"uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
               "kind": {"group": "", "version": "v1", "kind": "Pod"},
               "resource": {"group": "", "version": "v1", "resource": "pods"},
               "namespace": "team-a", "operation": "CREATE", "dryRun": false,
               "object": object})
    }

    fn role_pod() -> Value {
        json!({"metadata": {"annotations": {"iam.amazonaws.com/role": "r"}},
               "spec": {"serviceAccountName": "default", "containers": [{"name": "a"}]}})
    }

    #[test]
    fn no_service_account_no_patch_but_a_warning() {
        let mut pod = role_pod();
        pod["spec"]
            .as_object_mut()
            .unwrap()
            .remove("serviceAccountName");
        let (out, result) = answer(&review(pod_create(pod)), &Injection::default()).unwrap();
        assert_eq!(result, ReviewResult::Pod(Outcome::NoServiceAccount));
        assert!(out["response"].get("patch").is_none());
        assert!(out["response"]["warnings"][0]
            .as_str()
            .unwrap()
            .contains("serviceAccountName"));
    }

    #[test]
    fn a_pod_with_a_role_gets_a_base64_json_patch() {
        let (out, result) = answer(&review(pod_create(role_pod())), &Injection::default()).unwrap();
        assert_eq!(result, ReviewResult::Pod(Outcome::Injected));
        let r = &out["response"];
        assert_eq!(r["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
        assert_eq!(r["allowed"], true);
        assert_eq!(r["patchType"], "JSONPatch");
        let patch = base64::engine::general_purpose::STANDARD
            .decode(r["patch"].as_str().unwrap())
            .unwrap();
        let ops: Vec<Value> = serde_json::from_slice(&patch).unwrap();
        assert_eq!(ops.len(), 3);
        assert_eq!(out["apiVersion"], "admission.k8s.io/v1");
        assert_eq!(out["kind"], "AdmissionReview");
    }

    #[test]
    fn dry_run_is_answered_the_same() {
        // No side effects to skip: the dry run must show the real result.
        let mut req = pod_create(role_pod());
        req["dryRun"] = json!(true);
        let (out, _) = answer(&review(req), &Injection::default()).unwrap();
        assert_eq!(out["response"]["patchType"], "JSONPatch");
    }

    #[test]
    fn anything_but_a_pod_create_is_allowed_unchanged() {
        for (k, v) in [
            ("operation", json!("UPDATE")),
            (
                "resource",
                json!({"group": "", "version": "v1", "resource": "services"}),
            ),
            ("subResource", json!("ephemeralcontainers")),
        ] {
            let mut req = pod_create(role_pod());
            req[k] = v;
            let (out, result) = answer(&review(req), &Injection::default()).unwrap();
            assert_eq!(result, ReviewResult::Ignored);
            assert_eq!(out["response"]["allowed"], true);
            assert!(out["response"].get("patch").is_none());
        }
    }

    #[test]
    fn no_role_no_patch_field() {
        let pod = json!({"metadata": {}, "spec": {"containers": [{"name": "a"}]}});
        let (out, result) = answer(&review(pod_create(pod)), &Injection::default()).unwrap();
        assert_eq!(result, ReviewResult::Pod(Outcome::NoRole));
        assert!(out["response"].get("patch").is_none());
        assert!(out["response"].get("patchType").is_none());
    }

    #[test]
    fn a_broken_pod_is_allowed_with_a_warning() {
        let pod = json!({"metadata": {"annotations": {"iam.amazonaws.com/role": "r"}},
                         "spec": {"serviceAccountName": "default", "containers": "nope"}});
        let (out, result) = answer(&review(pod_create(pod)), &Injection::default()).unwrap();
        assert_eq!(result, ReviewResult::Malformed);
        assert_eq!(out["response"]["allowed"], true);
        assert!(out["response"]["warnings"][0]
            .as_str()
            .unwrap()
            .contains("spec.containers is not a list"));
    }

    #[test]
    fn unreadable_reviews_are_errors_not_panics() {
        let inj = Injection::default();
        for body in [
            &b""[..],
            b"{",
            b"[]",
            b"{\"apiVersion\":\"admission.k8s.io/v1beta1\",\"kind\":\"AdmissionReview\",\"request\":{\"uid\":\"x\"}}",
            b"{\"apiVersion\":\"admission.k8s.io/v1\",\"kind\":\"AdmissionReview\"}",
            b"{\"apiVersion\":\"admission.k8s.io/v1\",\"kind\":\"AdmissionReview\",\"request\":{\"uid\":7}}",
        ] {
            assert!(answer(body, &inj).is_err(), "{}", String::from_utf8_lossy(body));
        }
    }
}
