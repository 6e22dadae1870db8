//! Failures as the real API server reports them: a `Status` object whose `reason` and
//! `code` clients branch on (kube-rs's watcher re-lists on `code: 410`).

use serde_json::{json, Value};

use super::kinds::Resource;

/// One failed request, rendered as a `metav1.Status` by [`ApiError::to_status`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
    /// `details.name` / `details.kind` / `details.group`, which `kubectl` prints.
    pub details: Option<(Resource, String)>,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({} {})", self.message, self.code, self.reason)
    }
}

impl std::error::Error for ApiError {}

fn qualified(res: Resource) -> String {
    match res.group() {
        "" => res.plural().to_string(),
        group => format!("{}.{group}", res.plural()),
    }
}

impl ApiError {
    pub(crate) fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            code,
            reason,
            message: message.into(),
            details: None,
        }
    }

    fn about(mut self, res: Resource, name: &str) -> Self {
        self.details = Some((res, name.to_string()));
        self
    }

    pub fn not_found(res: Resource, name: &str) -> Self {
        Self::new(
            404,
            "NotFound",
            format!("{} {name:?} not found", qualified(res)),
        )
        .about(res, name)
    }

    pub fn already_exists(res: Resource, name: &str) -> Self {
        Self::new(
            409,
            "AlreadyExists",
            format!("{} {name:?} already exists", qualified(res)),
        )
        .about(res, name)
    }

    /// Optimistic concurrency failure: the client's resourceVersion or uid is stale.
    pub fn conflict(res: Resource, name: &str, why: &str) -> Self {
        Self::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} {name:?}: {why}",
                qualified(res)
            ),
        )
        .about(res, name)
    }

    pub fn stale_resource_version(res: Resource, name: &str) -> Self {
        Self::conflict(
            res,
            name,
            "the object has been modified; please apply your changes to the latest version and try again",
        )
    }

    pub fn invalid(res: Resource, name: &str, field: &str, why: String) -> Self {
        Self::new(
            422,
            "Invalid",
            format!("{} {name:?} is invalid: {field}: {why}", res.kind()),
        )
        .about(res, name)
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }

    /// A resourceVersion or continue token older than the retained history.
    pub fn expired(message: impl Into<String>) -> Self {
        Self::new(410, "Expired", message)
    }

    pub fn not_found_path() -> Self {
        Self::new(
            404,
            "NotFound",
            "the server could not find the requested resource",
        )
    }

    pub fn method_not_allowed(method: &http::Method) -> Self {
        Self::new(
            405,
            "MethodNotAllowed",
            format!("the server does not allow this method on the requested resource ({method})"),
        )
    }

    pub fn unsupported_media_type(content_type: &str) -> Self {
        Self::new(
            415,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format ({content_type}) - accepted media types include: \
                 application/json-patch+json, application/merge-patch+json, application/strategic-merge-patch+json"
            ),
        )
    }

    pub fn not_acceptable() -> Self {
        Self::new(
            406,
            "NotAcceptable",
            "only the following media types are accepted: application/json, application/yaml",
        )
    }

    pub fn too_large() -> Self {
        Self::new(413, "RequestEntityTooLarge", "the request is too large")
    }

    pub fn unavailable() -> Self {
        Self::new(
            503,
            "ServiceUnavailable",
            "the fake API server is marked unavailable by its test",
        )
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(500, "InternalError", message)
    }

    /// The `metav1.Status` object a real server sends for this failure.
    pub fn to_status(&self) -> Value {
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let Some((res, name)) = &self.details {
            let mut details = json!({"name": name, "kind": res.plural()});
            if !res.group().is_empty() {
                details["group"] = res.group().into();
            }
            status["details"] = details;
        }
        status
    }
}
