//! Service-account tokens: TokenRequest (`serviceaccounts/{name}/token`) issues them,
//! TokenReview checks them, and the issuer's OIDC discovery document and JWKS publish the
//! key that verifies them.
//!
//! A token stays checkable against the store after it is issued, as on a real server: a
//! review refuses it once its service account or bound pod is deleted or recreated (a
//! new uid), not only when it expires. Checks follow the real authenticator's order and
//! words: a token that is not a JWT, names another issuer or uses another algorithm
//! (`alg: none` included) is "not ours", refused as just an "invalid bearer token"; from
//! the key lookup on, every refusal says why. Times have the real one-minute leeway. A
//! real server may wrap these messages (`[invalid bearer token, ...]`), so match them by
//! substring.

use std::sync::Mutex;
use std::time::Duration;

use serde_json::{json, Value};

use super::jwt::{self, JwtError, SigningKey};
use super::resources::{self, Resource};
use super::status::ApiError;
use super::store::Store;

/// A common `--service-account-issuer` (kubeadm's, kind's): the fake has no DNS name of
/// its own that clients could reach over https.
pub const DEFAULT_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

/// `jwt.DefaultLeeway` in go-jose, which the real validator uses for exp, nbf and iat,
/// and for "deleted before".
const LEEWAY_SECS: i64 = 60;

/// What a TokenRequest gets without `spec.expirationSeconds` (the v1 API default).
const DEFAULT_EXPIRATION_SECS: i64 = 3600;

/// The real API server's bounds on `spec.expirationSeconds`.
const MIN_EXPIRATION_SECS: i64 = 600;
const MAX_EXPIRATION_SECS: i64 = 1 << 32;

const AUTHENTICATION_V1: &str = "authentication.k8s.io/v1";

/// What a review says of a token whose bound object is gone (deleted, or deletion
/// started over a minute ago).
const INVALIDATED: &str = "service account token has been invalidated";

/// The `authentication.kubernetes.io/...` keys of `user.extra`, as the real server sets them.
const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";
const EXTRA_NODE_NAME: &str = "authentication.kubernetes.io/node-name";
const EXTRA_NODE_UID: &str = "authentication.kubernetes.io/node-uid";
const EXTRA_CREDENTIAL_ID: &str = "authentication.kubernetes.io/credential-id";

/// The server's token issuer: its signing key, `iss`, and where the JWKS is served.
pub(crate) struct Issuer {
    key: SigningKey,
    // std Mutex: read or replaced briefly per request, never held across an `.await`.
    issuer: Mutex<String>,
    /// Like the real server's default, the API server's own address (not the issuer's),
    /// since that is where `/openid/v1/jwks` is served.
    jwks_uri: String,
}

impl Issuer {
    pub(crate) fn new(api_url: &str) -> Self {
        Issuer {
            key: SigningKey::generate(),
            issuer: Mutex::new(DEFAULT_ISSUER.to_string()),
            jwks_uri: format!("{api_url}/openid/v1/jwks"),
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

/// `POST /apis/authentication.k8s.io/v1/tokenreviews`: the TokenReview with `status`.
pub(crate) fn token_review(
    store: &Store,
    issuer: &Issuer,
    mut body: Value,
) -> Result<Value, ApiError> {
    check_type(&body, "TokenReview")?;
    let token = text(&body, "/spec/token").to_string();
    if token.is_empty() {
        return Err(ApiError::bad_request(
            "token is required for TokenReview in authentication",
        ));
    }
    let audiences = strings(body.pointer("/spec/audiences"));
    let map = body
        .as_object_mut()
        .expect("the handler decodes only objects");
    map.insert("apiVersion".into(), AUTHENTICATION_V1.into());
    map.insert("kind".into(), "TokenReview".into());
    resources::metadata_mut(&mut body).insert("creationTimestamp".into(), Value::Null);
    body["status"] = review(store, issuer, &token, &audiences);
    Ok(body)
}

/// A TokenReview's `status` for `token`. `authenticated` is absent rather than false
/// when refused, as the real server's `omitempty` field is.
pub(crate) fn review(store: &Store, issuer: &Issuer, token: &str, audiences: &[String]) -> Value {
    match authenticate(store, issuer, token, audiences) {
        Ok((user, audiences)) => json!({
            "authenticated": true,
            "user": user,
            "audiences": audiences,
        }),
        // What the bearer-token authenticator says when no token authenticator knew it.
        Err(Refusal::NotOurs) => json!({"user": {}, "error": "invalid bearer token"}),
        Err(Refusal::Invalid(error)) => json!({"user": {}, "error": error}),
    }
}

enum Refusal {
    /// Another authenticator's token, as far as the service-account one can tell.
    NotOurs,
    /// Ours, and refused for this reason.
    Invalid(String),
}

/// Go's `%q` of a string slice: `["a" "b"]`.
fn go_quoted(list: &[String]) -> String {
    let items: Vec<String> = list.iter().map(|s| format!("{s:?}")).collect();
    format!("[{}]", items.join(" "))
}

fn authenticate(
    store: &Store,
    issuer: &Issuer,
    token: &str,
    requested: &[String],
) -> Result<(Value, Vec<String>), Refusal> {
    let invalid = |why: String| Refusal::Invalid(why);
    let (_, unverified) = jwt::decode_unverified(token).map_err(|_| Refusal::NotOurs)?;
    if text(&unverified, "/iss") != issuer.issuer() {
        return Err(Refusal::NotOurs);
    }
    // The key is looked up by the header's `kid` (all keys when there is none).
    let (header, _) = jwt::decode_unverified(token).map_err(|_| Refusal::NotOurs)?;
    if header
        .get("kid")
        .and_then(Value::as_str)
        .is_some_and(|kid| !kid.is_empty() && kid != issuer.key.kid())
    {
        return Err(invalid("invalid signature, no keys found".into()));
    }
    let claims = match issuer.key.verify(token) {
        Ok(claims) => claims,
        Err(JwtError::Malformed | JwtError::Algorithm(_)) => return Err(Refusal::NotOurs),
        Err(e @ JwtError::Signature) => return Err(invalid(e.to_string())),
    };

    let token_audiences = match claims.get("aud") {
        Some(Value::String(aud)) => vec![aud.clone()],
        other => strings(other),
    };
    let implicit = issuer.api_audiences();
    let token_audiences = if token_audiences.is_empty() {
        implicit.clone()
    } else {
        token_audiences
    };
    let requested = if requested.is_empty() {
        implicit
    } else {
        requested.to_vec()
    };
    let audiences: Vec<String> = requested
        .iter()
        .filter(|a| token_audiences.contains(a))
        .cloned()
        .collect();
    if audiences.is_empty() {
        return Err(invalid(format!(
            "token audiences {} is invalid for the target audiences {}",
            go_quoted(&token_audiences),
            go_quoted(&requested)
        )));
    }

    let now = jiff::Timestamp::now().as_second();
    let time = |claim: &str| claims.get(claim).and_then(Value::as_i64);
    if time("nbf").is_some_and(|nbf| now + LEEWAY_SECS < nbf) {
        return Err(invalid("service account token is not valid yet".into()));
    }
    if time("exp").is_some_and(|exp| now - LEEWAY_SECS > exp) {
        return Err(invalid("service account token has expired".into()));
    }
    if time("iat").is_some_and(|iat| now + LEEWAY_SECS < iat) {
        // go-jose's ErrIssuedInTheFuture, which the real validator does not name.
        return Err(invalid(
            "service account token claims could not be validated due to unexpected validation error"
                .into(),
        ));
    }

    let k8s = claims.get("kubernetes.io").cloned().unwrap_or(Value::Null);
    let namespace = text(&k8s, "/namespace");
    // Something deleted before this is gone; later deletions are within the leeway.
    let deleted_before = now - LEEWAY_SECS;
    let gone = |obj: &Value| {
        let at = text(obj, "/metadata/deletionTimestamp");
        !at.is_empty()
            && at
                .parse::<jiff::Timestamp>()
                .is_ok_and(|t| t.as_second() < deleted_before)
    };

    let sa_name = text(&k8s, "/serviceaccount/name");
    let sa_uid = text(&k8s, "/serviceaccount/uid");
    let sa = store
        .get(Resource::ServiceAccounts, &key(namespace, sa_name))
        .ok_or_else(|| invalid(format!("serviceaccount {sa_name:?} not found")))?;
    if gone(&sa) {
        return Err(invalid(format!(
            "service account {namespace}/{sa_name} has been deleted"
        )));
    }
    if uid_of(&sa) != sa_uid {
        return Err(invalid(format!(
            "service account UID ({}) does not match claim ({sa_uid})",
            uid_of(&sa)
        )));
    }

    let mut extra = serde_json::Map::new();
    if let Some(pod_claim) = k8s.get("pod").filter(|p| p.is_object()) {
        let (pod_name, pod_uid) = (text(pod_claim, "/name"), text(pod_claim, "/uid"));
        let pod = store
            .get(Resource::Pods, &key(namespace, pod_name))
            .ok_or_else(|| invalid(INVALIDATED.into()))?;
        if uid_of(&pod) != pod_uid {
            return Err(invalid(format!(
                "pod UID ({}) does not match service account pod ref claim ({pod_uid})",
                uid_of(&pod)
            )));
        }
        if gone(&pod) {
            return Err(invalid(INVALIDATED.into()));
        }
        extra.insert(EXTRA_POD_NAME.into(), json!([pod_name]));
        extra.insert(EXTRA_POD_UID.into(), json!([pod_uid]));
    }
    if let Some(node_claim) = k8s.get("node").filter(|n| n.is_object()) {
        let (node_name, node_uid) = (text(node_claim, "/name"), text(node_claim, "/uid"));
        // A token bound to a node itself must still name that node; a pod's node is
        // only information.
        if !k8s.get("pod").is_some_and(Value::is_object) {
            let node = store
                .get(Resource::Nodes, &key("", node_name))
                .ok_or_else(|| invalid(INVALIDATED.into()))?;
            if uid_of(&node) != node_uid {
                return Err(invalid(format!(
                    "node UID ({}) does not match service account node ref claim ({node_uid})",
                    uid_of(&node)
                )));
            }
            if gone(&node) {
                return Err(invalid(INVALIDATED.into()));
            }
        }
        extra.insert(EXTRA_NODE_NAME.into(), json!([node_name]));
        if !node_uid.is_empty() {
            extra.insert(EXTRA_NODE_UID.into(), json!([node_uid]));
        }
    }
    let jti = text(&claims, "/jti");
    if !jti.is_empty() {
        extra.insert(EXTRA_CREDENTIAL_ID.into(), json!([format!("JTI={jti}")]));
    }
    let mut user = json!({
        "username": format!("system:serviceaccount:{namespace}:{sa_name}"),
        "uid": sa_uid,
        "groups": [
            "system:serviceaccounts",
            format!("system:serviceaccounts:{namespace}"),
            "system:authenticated",
        ],
    });
    if !extra.is_empty() {
        user["extra"] = Value::Object(extra);
    }
    Ok((user, audiences))
}

/// The claims of a token, without checking its signature (what `jwt.io` shows).
pub fn token_claims(token: &str) -> Option<Value> {
    jwt::decode_unverified(token).ok().map(|(_, claims)| claims)
}

/// The same claims with `alg: none` and no signature: what a forger without the key
/// hands in.
pub fn unsigned_token(token: &str) -> String {
    let claims = token_claims(token).unwrap_or_else(|| json!({}));
    jwt::encode_unsigned(&json!({"alg": "none"}), &claims)
}

/// The token with its claims changed by `change` and its header and signature kept:
/// a signature that no longer verifies.
pub fn tampered_token(token: &str, change: impl FnOnce(&mut Value)) -> String {
    let mut claims = token_claims(token).unwrap_or_else(|| json!({}));
    change(&mut claims);
    let mut parts = token.splitn(3, '.');
    let header = parts.next().unwrap_or("");
    let _ = parts.next();
    let signature = parts.next().unwrap_or("");
    format!(
        "{header}.{}.{signature}",
        jwt::encode_segment(claims.to_string().as_bytes())
    )
}

/// `claims` signed ES256 by a key no API server knows, with that key's id.
pub fn foreign_signed_token(claims: &Value) -> String {
    SigningKey::generate().sign(claims)
}

/// Expiry for test controls: whole seconds, saturating.
pub(crate) fn ttl_secs(ttl: Duration) -> i64 {
    i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX)
}
