//! TokenReview: whether a token is one of this server's and still names live objects.
//!
//! Checks follow the real authenticator's order and words: a token that is not a JWT,
//! names another issuer or uses another algorithm (`alg: none` included) is "not ours",
//! refused as just an "invalid bearer token"; from the key lookup on, every refusal says
//! why. Times have the real one-minute leeway. A real server may wrap these messages
//! (`[invalid bearer token, ...]`), so match them by substring.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::{check_type, key, strings, text, uid_of, Issuer, AUTHENTICATION_V1};
use crate::apiserver::jwt::{self, JwtError};
use crate::apiserver::resources::{self, Resource};
use crate::apiserver::status::ApiError;
use crate::apiserver::store::Store;

/// `jwt.DefaultLeeway` in go-jose, which the real validator uses for exp, nbf and iat,
/// and for "deleted before".
const LEEWAY_SECS: i64 = 60;

/// What a review says of a token whose bound object is gone (deleted, or deletion
/// started over a minute ago).
const INVALIDATED: &str = "service account token has been invalidated";

/// The `authentication.kubernetes.io/...` keys of `user.extra`, as the real server sets them.
const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";
const EXTRA_NODE_NAME: &str = "authentication.kubernetes.io/node-name";
const EXTRA_NODE_UID: &str = "authentication.kubernetes.io/node-uid";
const EXTRA_CREDENTIAL_ID: &str = "authentication.kubernetes.io/credential-id";

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

/// How many successful reviews the cache keeps; a full cache is emptied.
const SUCCESS_CACHE_LIMIT: usize = 4096;

/// The real server's cache of successful token checks (`TokenSuccessCacheTTL`, ten
/// seconds there), by token and requested audiences. Off unless a test turns it on, so
/// that here a deleted pod's token is refused at once.
#[derive(Default)]
pub(crate) struct SuccessCache {
    // std Mutex: looked up and filled once per review, never held across an `.await`.
    state: Mutex<CacheState>,
}

#[derive(Default)]
struct CacheState {
    ttl: Duration,
    entries: HashMap<(String, Vec<String>), (Instant, Value)>,
}

impl SuccessCache {
    pub(crate) fn set_ttl(&self, ttl: Duration) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.ttl = ttl;
        state.entries.clear();
    }

    fn get(&self, key: &(String, Vec<String>)) -> Option<Value> {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (at, status) = state.entries.get(key)?;
        (at.elapsed() < state.ttl).then(|| status.clone())
    }

    fn put(&self, key: (String, Vec<String>), status: &Value) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.ttl.is_zero() {
            return;
        }
        if state.entries.len() >= SUCCESS_CACHE_LIMIT {
            state.entries.clear();
        }
        state.entries.insert(key, (Instant::now(), status.clone()));
    }
}

/// A TokenReview's `status` for `token`. `authenticated` is absent rather than false
/// when refused, as the real server's `omitempty` field is.
pub(crate) fn review(store: &Store, issuer: &Issuer, token: &str, audiences: &[String]) -> Value {
    let key = (token.to_string(), audiences.to_vec());
    if let Some(cached) = issuer.successes.get(&key) {
        return cached;
    }
    let status = check(store, issuer, token, audiences);
    if status["authenticated"] == true {
        issuer.successes.put(key, &status);
    }
    status
}

fn check(store: &Store, issuer: &Issuer, token: &str, audiences: &[String]) -> Value {
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
    let (header, unverified) = jwt::decode_unverified(token).map_err(|_| Refusal::NotOurs)?;
    if text(&unverified, "/iss") != issuer.issuer() {
        return Err(Refusal::NotOurs);
    }
    // The key is looked up by the header's `kid` (all keys when there is none).
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
    // In the token's order, as Go's `Audiences.Intersect` keeps them.
    let audiences: Vec<String> = token_audiences
        .iter()
        .filter(|a| requested.contains(a))
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
    // NumericDate: seconds, which JSON may also write as a float.
    let time = |claim: &str| claims.get(claim).and_then(Value::as_f64).map(|t| t as i64);
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
