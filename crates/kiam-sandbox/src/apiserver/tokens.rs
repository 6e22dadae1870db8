//! Service-account tokens: TokenRequest (`serviceaccounts/{name}/token`) issues them, the
//! issuer's OIDC discovery document and JWKS publish the key that verifies them, and
//! [`review`] checks them as TokenReview does.
//!
//! A token is signed with what the store holds when it is issued (the service account's
//! uid, the bound pod's and its node's), and a review compares those with what the store
//! holds then: that is what makes a bound token die with its pod.

mod review;

use std::sync::Mutex;
use std::time::Duration;

use serde_json::{json, Value};

use super::jwt::{self, SigningKey};
use super::resources::{self, Resource};
use super::status::ApiError;
use super::store::Store;
use super::FakeApiServer;

pub(crate) use review::{review, token_review};

/// A common `--service-account-issuer` (kubeadm's, kind's): the fake has no DNS name of
/// its own that clients could reach over https.
pub const DEFAULT_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

/// What a TokenRequest gets without `spec.expirationSeconds` (the v1 API default).
const DEFAULT_EXPIRATION_SECS: i64 = 3600;

/// The real API server's bounds on `spec.expirationSeconds`.
const MIN_EXPIRATION_SECS: i64 = 600;
const MAX_EXPIRATION_SECS: i64 = 1 << 32;

const AUTHENTICATION_V1: &str = "authentication.k8s.io/v1";

/// The server's token issuer: its signing key, `iss`, and where the JWKS is served.
pub(crate) struct Issuer {
    key: SigningKey,
    // std Mutex: read or replaced briefly per request, never held across an `.await`.
    issuer: Mutex<String>,
    /// Like the real server's default, the API server's own address (not the issuer's),
    /// since that is where `/openid/v1/jwks` is served.
    jwks_uri: String,
    pub(crate) successes: review::SuccessCache,
}

impl Issuer {
    pub(crate) fn new(api_url: &str) -> Self {
        Issuer {
            key: SigningKey::generate(),
            issuer: Mutex::new(DEFAULT_ISSUER.to_string()),
            jwks_uri: format!("{api_url}/openid/v1/jwks"),
            successes: review::SuccessCache::default(),
        }
    }

    pub(crate) fn issuer(&self) -> String {
        self.issuer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(crate) fn set_issuer(&self, issuer: &str) {
        *self.issuer.lock().unwrap_or_else(|e| e.into_inner()) = issuer.to_string();
    }

    /// `--api-audiences`, which defaults to the issuer: what a token without audiences is
    /// for, and what a review without audiences asks for.
    fn api_audiences(&self) -> Vec<String> {
        vec![self.issuer()]
    }

    pub(crate) fn key_id(&self) -> &str {
        self.key.kid()
    }

    pub(crate) fn sign(&self, claims: &Value) -> String {
        self.key.sign(claims)
    }

    /// `/.well-known/openid-configuration`.
    pub(crate) fn discovery(&self) -> Value {
        json!({
            "issuer": self.issuer(),
            "jwks_uri": self.jwks_uri,
            "response_types_supported": ["id_token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": [jwt::ALGORITHM],
        })
    }

    /// `/openid/v1/jwks`.
    pub(crate) fn jwks(&self) -> Value {
        json!({"keys": [self.key.jwk()]})
    }
}

/// The object a token is bound to: `boundObjectRef`. An empty uid means "whichever
/// object has that name now".
pub(crate) enum Binding {
    Pod { name: String, uid: String },
    Node { name: String, uid: String },
}

fn uid_conflict(kind: &str, name: &str, uid: &str) -> ApiError {
    ApiError::new(
        409,
        "Conflict",
        format!(
            "Operation cannot be fulfilled on {kind} {name:?}: the UID in the bound object reference ({uid}) \
             does not match the UID in record. The object might have been deleted and then recreated"
        ),
    )
}

/// A token and what was settled in issuing it.
pub(crate) struct Issued {
    pub token: String,
    pub audiences: Vec<String>,
    /// Unix seconds.
    pub expires: i64,
}

fn text<'a>(obj: &'a Value, pointer: &str) -> &'a str {
    obj.pointer(pointer).and_then(Value::as_str).unwrap_or("")
}

fn uid_of(obj: &Value) -> &str {
    text(obj, "/metadata/uid")
}

fn key(namespace: &str, name: &str) -> (String, String) {
    (namespace.to_string(), name.to_string())
}

/// Issues a token for a service account, bound to a pod or node if given: the registry's
/// checks (the service account exists; the bound object exists and has that uid; a pod runs
/// as that service account) and then the claims of a bound token. Expiry bounds are the
/// caller's business.
pub(crate) fn issue(
    store: &Store,
    issuer: &Issuer,
    namespace: &str,
    service_account: &str,
    audiences: Vec<String>,
    binding: Option<&Binding>,
    expiration_secs: i64,
) -> Result<Issued, ApiError> {
    let sa = store
        .get(Resource::ServiceAccounts, &key(namespace, service_account))
        .ok_or_else(|| ApiError::not_found(Resource::ServiceAccounts, service_account))?;
    let audiences = if audiences.is_empty() {
        issuer.api_audiences()
    } else {
        audiences
    };
    let mut kubernetes = json!({
        "namespace": namespace,
        "serviceaccount": {"name": service_account, "uid": uid_of(&sa)},
    });
    if let Some(Binding::Node { name, uid }) = binding {
        let node = store
            .get(Resource::Nodes, &key("", name))
            .ok_or_else(|| ApiError::not_found(Resource::Nodes, name))?;
        if !uid.is_empty() && uid != uid_of(&node) {
            return Err(uid_conflict("Node", name, uid));
        }
        kubernetes["node"] = json!({"name": name, "uid": uid_of(&node)});
    }
    if let Some(Binding::Pod { name, uid }) = binding {
        let pod = store
            .get(Resource::Pods, &key(namespace, name))
            .ok_or_else(|| ApiError::not_found(Resource::Pods, name))?;
        let runs_as = match text(&pod, "/spec/serviceAccountName") {
            // The ServiceAccount admission plugin fills this in on a real cluster.
            "" => "default",
            name => name,
        };
        if runs_as != service_account {
            return Err(ApiError::bad_request(format!(
                "cannot bind token for serviceaccount {service_account:?} to pod running with different serviceaccount name."
            )));
        }
        if !uid.is_empty() && uid != uid_of(&pod) {
            return Err(uid_conflict("Pod", name, uid));
        }
        kubernetes["pod"] = json!({"name": name, "uid": uid_of(&pod)});
        // The pod's node (ServiceAccountTokenPodNodeInfo), by name alone when the Node
        // object is missing.
        let node_name = text(&pod, "/spec/nodeName");
        if !node_name.is_empty() {
            kubernetes["node"] = match store.get(Resource::Nodes, &key("", node_name)) {
                Some(node) => json!({"name": node_name, "uid": uid_of(&node)}),
                None => json!({"name": node_name}),
            };
        }
    }
    let now = jiff::Timestamp::now().as_second();
    let expires = now.saturating_add(expiration_secs);
    let claims = json!({
        "aud": audiences,
        "exp": expires,
        "iat": now,
        "iss": issuer.issuer(),
        "jti": resources::new_uid(),
        "kubernetes.io": kubernetes,
        "nbf": now,
        "sub": format!("system:serviceaccount:{namespace}:{service_account}"),
    });
    Ok(Issued {
        token: issuer.sign(&claims),
        audiences,
        expires,
    })
}

/// Refuses a body of another type (an absent apiVersion or kind is taken from the URL).
fn check_type(body: &Value, kind: &str) -> Result<(), ApiError> {
    let (api_version, given_kind) = (text(body, "/apiVersion"), text(body, "/kind"));
    if !api_version.is_empty() && api_version != AUTHENTICATION_V1 {
        return Err(ApiError::bad_request(format!(
            "the API version in the data ({api_version}) does not match the expected API version ({AUTHENTICATION_V1})"
        )));
    }
    if !given_kind.is_empty() && given_kind != kind {
        return Err(ApiError::bad_request(format!(
            "the kind in the data ({given_kind}) does not match the expected kind ({kind})"
        )));
    }
    Ok(())
}

fn strings(value: Option<&Value>) -> Vec<String> {
    value
        .and_then(Value::as_array)
        .map(|items| {
            items
                .iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

fn invalid_token_request(field: &str, value: &Value, why: &str) -> ApiError {
    ApiError::new(
        422,
        "Invalid",
        format!(
            "TokenRequest.authentication.k8s.io \"\" is invalid: {field}: Invalid value: {value}: {why}"
        ),
    )
}

/// `POST /api/v1/namespaces/{namespace}/serviceaccounts/{name}/token`: the TokenRequest
/// with `spec` defaulted and `status.token` / `status.expirationTimestamp` filled in.
pub(crate) fn token_request(
    store: &Store,
    issuer: &Issuer,
    namespace: &str,
    name: &str,
    mut body: Value,
) -> Result<Value, ApiError> {
    check_type(&body, "TokenRequest")?;
    for (field, want) in [("name", name), ("namespace", namespace)] {
        let given = text(&body, &format!("/metadata/{field}"));
        if !given.is_empty() && given != want {
            return Err(ApiError::new(
                422,
                "Invalid",
                format!(
                    "TokenRequest.authentication.k8s.io {name:?} is invalid: metadata.{field}: Invalid value: \
                     {given:?}: must match the service account {field} if specified"
                ),
            ));
        }
    }
    if store
        .get(Resource::ServiceAccounts, &key(namespace, name))
        .is_none()
    {
        return Err(ApiError::not_found(Resource::ServiceAccounts, name));
    }
    let expiration = match body.pointer("/spec/expirationSeconds") {
        None | Some(Value::Null) => DEFAULT_EXPIRATION_SECS,
        Some(v) => v.as_i64().ok_or_else(|| {
            ApiError::bad_request(format!(
                "spec.expirationSeconds must be an integer, got {v}"
            ))
        })?,
    };
    if expiration < MIN_EXPIRATION_SECS {
        return Err(invalid_token_request(
            "spec.expirationSeconds",
            &expiration.into(),
            "may not specify a duration less than 10 minutes",
        ));
    }
    if expiration > MAX_EXPIRATION_SECS {
        return Err(invalid_token_request(
            "spec.expirationSeconds",
            &expiration.into(),
            "may not specify a duration larger than 2^32 seconds",
        ));
    }
    let bound = match body.pointer("/spec/boundObjectRef") {
        None | Some(Value::Null) => None,
        Some(reference) => {
            let (kind, api_version) = (text(reference, "/kind"), text(reference, "/apiVersion"));
            let name = text(reference, "/name").to_string();
            let uid = text(reference, "/uid").to_string();
            match (api_version, kind) {
                ("v1", "Pod") => Some(Binding::Pod { name, uid }),
                ("v1", "Node") => Some(Binding::Node { name, uid }),
                // The real server also binds to Secrets, which this one does not serve.
                _ => {
                    // Go's GroupVersionKind.String(): "group/version, Kind=kind".
                    let group_version = if api_version.contains('/') {
                        api_version.to_string()
                    } else {
                        format!("/{api_version}")
                    };
                    return Err(ApiError::bad_request(format!(
                        "cannot bind token to object of type {group_version}, Kind={kind}"
                    )));
                }
            }
        }
    };
    let audiences = strings(body.pointer("/spec/audiences"));
    let issued = issue(
        store,
        issuer,
        namespace,
        name,
        audiences,
        bound.as_ref(),
        expiration,
    )?;
    let map = body
        .as_object_mut()
        .expect("the handler decodes only objects");
    map.insert("apiVersion".into(), AUTHENTICATION_V1.into());
    map.insert("kind".into(), "TokenRequest".into());
    let meta = resources::metadata_mut(&mut body);
    meta.insert("name".into(), name.into());
    meta.insert("namespace".into(), namespace.into());
    meta.insert("creationTimestamp".into(), resources::now_rfc3339().into());
    let spec = &mut body["spec"];
    if !spec.is_object() {
        *spec = json!({});
    }
    spec["audiences"] = json!(issued.audiences);
    spec["expirationSeconds"] = expiration.into();
    let expires = jiff::Timestamp::from_second(issued.expires).unwrap_or(jiff::Timestamp::MAX);
    body["status"] = json!({
        "token": issued.token,
        "expirationTimestamp": resources::format_time(expires),
    });
    Ok(body)
}

/// Expiry for test controls: whole seconds, saturating.
fn ttl_secs(ttl: Duration) -> i64 {
    i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX)
}

/// Test controls for tokens.
impl FakeApiServer {
    pub fn service_account(&self, namespace: &str, name: &str) -> Option<Value> {
        self.get(Resource::ServiceAccounts, namespace, name)
    }

    /// Creates or replaces a ServiceAccount (`default` exists in every namespace already).
    pub fn apply_service_account(&self, namespace: &str, name: &str) -> Result<Value, ApiError> {
        self.apply(json!({
            "apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": {"name": name, "namespace": namespace},
        }))
    }

    /// The `iss` of the tokens this server issues and accepts (default
    /// [`DEFAULT_ISSUER`]); also the audience of tokens requested without one.
    pub fn issuer(&self) -> String {
        self.shared.tokens.issuer()
    }

    /// Changes the issuer, like restarting a real server with another
    /// `--service-account-issuer` (and `--api-audiences` left to default to it): tokens
    /// of the old issuer stop being accepted.
    pub fn set_issuer(&self, issuer: &str) {
        self.shared.tokens.set_issuer(issuer);
    }

    /// What the kubelet writes into a projected service-account token volume: a token for
    /// `service_account`, bound to `pod` (name, uid) if given, for `audiences` (the
    /// server's own audience if empty), valid for `ttl`. The same checks as a
    /// TokenRequest (the service account and pod exist, the pod runs as that service
    /// account, the uid matches) except the ten-minute minimum, so tests can use any ttl.
    pub fn issue_token(
        &self,
        namespace: &str,
        service_account: &str,
        audiences: &[&str],
        pod: Option<(&str, &str)>,
        ttl: Duration,
    ) -> Result<String, ApiError> {
        let pod = pod.map(|(name, uid)| Binding::Pod {
            name: name.to_string(),
            uid: uid.to_string(),
        });
        issue(
            &self.shared.store,
            &self.shared.tokens,
            namespace,
            service_account,
            audiences.iter().map(|a| a.to_string()).collect(),
            pod.as_ref(),
            ttl_secs(ttl),
        )
        .map(|issued| issued.token)
    }

    /// The `kid` of the server's signing key, in token headers and the JWKS.
    pub fn signing_key_id(&self) -> String {
        self.shared.tokens.key_id().to_string()
    }

    /// Signs any claims with the server's key (valid signature, its `kid`), for tokens a
    /// real server would never issue: expired, not yet valid, another issuer. Start from
    /// [`token_claims`](super::token_claims) of an [`FakeApiServer::issue_token`] token.
    pub fn sign_token(&self, claims: &Value) -> String {
        self.shared.tokens.sign(claims)
    }

    /// Answers a TokenReview that succeeded within `ttl` from a cache, as a real server
    /// does for ten seconds (`TokenSuccessCacheTTL`): a token then still passes for up to
    /// `ttl` after its pod is deleted. Off (zero) by default; setting it empties the cache.
    pub fn set_token_review_cache(&self, ttl: Duration) {
        self.shared.tokens.successes.set_ttl(ttl);
    }

    /// A TokenReview's `status` for `token` and `audiences`, without an HTTP request (and
    /// so without a recorded one).
    pub fn review_token(&self, token: &str, audiences: &[&str]) -> Value {
        let audiences: Vec<String> = audiences.iter().map(|a| a.to_string()).collect();
        review(&self.shared.store, &self.shared.tokens, token, &audiences)
    }
}
