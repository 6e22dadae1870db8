//! Token-bound identity: who a pod is, from the projected service-account
//! token its SDK sends to the container credentials endpoint, not from the
//! address the request came from.
//!
//! The surprise: the API server is asked about a token once, not once per
//! request. A token the API server's TokenReview accepted is remembered (by
//! the SHA-256 of the token, never the token) until it expires, and each
//! later request checks only what can change: the clock (`exp`, `nbf`) and
//! whether the pod the token is bound to is still live with that uid, which
//! the pod cache's watch answers. So the steady state costs no API call; a
//! pod the cache does not have (the watch lags a new pod) costs one GET.
//! Because a deleted pod's token is refused for good once seen (its uid
//! never comes back), a stolen token of a gone pod costs at most one GET.
//!
//! Before any API call the token is checked locally, unverified: a compact
//! JWS with a signing algorithm (never `none`), not expired, for kiam's
//! audience (`--token-audience`), bound to a pod. Garbage, expired tokens and
//! tokens for another audience thus never reach the API server; what is
//! left is verified by the API server's TokenReview (signature, issuer,
//! expiry, audience, and that the bound pod exists with that uid): one
//! review per token at a time, shared by concurrent requests, at most
//! [`MAX_CONCURRENT_REVIEWS`] at once, and a refused token is remembered
//! for [`REFUSED_TTL`].
//!
//! What may be stale: the pod cache lags the API server by the watch's
//! delay, so a token keeps working for that long after its pod is deleted
//! (the API server's own TokenReview cache allows ten seconds).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use futures::future::{BoxFuture, Shared};
use futures::FutureExt;
use jiff::Timestamp;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::{Api, PostParams};
use serde_json::Value;
use tokio::sync::Semaphore;

use super::model::PodInfo;
use super::pods::PodCache;

/// `--token-audience`'s default.
pub const DEFAULT_AUDIENCE: &str = "kiam";
/// Tokens longer than this are refused unread (real ones are about 1 KiB).
pub const MAX_TOKEN_LEN: usize = 16 * 1024;
/// At most this many TokenReviews run at once; more wait for a permit up to
/// [`REVIEW_TIMEOUT`].
pub const MAX_CONCURRENT_REVIEWS: usize = 8;
/// A TokenReview (or the GET of a pod the cache lacks) slower than this is
/// an error the agent may retry.
pub const REVIEW_TIMEOUT: Duration = Duration::from_secs(3);
/// A token TokenReview refused is refused again without asking for this long.
pub const REFUSED_TTL: Duration = Duration::from_secs(60);
/// At most this many tokens are remembered; past it the expired ones are
/// dropped, and then the soonest to expire.
pub const MAX_REMEMBERED: usize = 10_000;

/// The `sub` of a service-account token.
const SERVICE_ACCOUNT_PREFIX: &str = "system:serviceaccount:";
const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";

/// Why a token does not identify a pod. Messages are shown to the pod
/// (through the agent), so they name no other pod, namespace or address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("no token was sent")]
    Missing,
    #[error("the token is not a JWT: {0}")]
    Malformed(&'static str),
    #[error("the token is not signed (alg {0:?})")]
    Unsigned(String),
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet")]
    NotYetValid,
    #[error("the token is not for audience {0:?} (the server's --token-audience)")]
    Audience(String),
    #[error("the token is not bound to a pod (it needs the kubernetes.io pod, namespace and serviceaccount claims of a projected service-account token)")]
    NotBound,
    /// TokenReview said no; its words are kept for the server's log only.
    #[error("the Kubernetes API server does not accept the token")]
    Rejected { reason: String },
    /// The pod the token is bound to is gone, finished, or another pod has
    /// its name now.
    #[error("the pod the token is bound to no longer exists or has finished")]
    PodGone,
    /// The API server could not be asked; worth retrying.
    #[error("the token could not be verified now: {0}")]
    Unverifiable(String),
}

impl TokenError {
    /// Asking again with the same token will not change the answer.
    pub fn is_final(&self) -> bool {
        !matches!(self, TokenError::Unverifiable(_))
    }
}

/// The pod a verified token is bound to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BoundPod {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub service_account: String,
    /// `exp`.
    pub expires: Timestamp,
}

/// One remembered token.
#[derive(Debug, Clone)]
enum Remembered {
    /// TokenReview accepted it; trusted until `exp`.
    Verified(BoundPod),
    /// Refused until then.
    Refused(Timestamp, TokenError),
}

impl Remembered {
    fn until(&self) -> Timestamp {
        match self {
            Remembered::Verified(pod) => pod.expires,
            Remembered::Refused(until, _) => *until,
        }
    }
}

type Digest = [u8; 32];

fn digest(token: &str) -> Digest {
    let d = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

type Review = Shared<BoxFuture<'static, Result<(), TokenError>>>;

/// Verifies tokens against the API server and remembers the answers.
pub struct TokenVerifier {
    reviews: Api<TokenReview>,
    audience: Arc<str>,
    permits: Arc<Semaphore>,
    // std Mutex: looked up or filled without any `.await` while held.
    remembered: Mutex<HashMap<Digest, Remembered>>,
    /// One TokenReview per token at a time, shared by concurrent requests.
    // std Mutex: held only to find or insert a review, never across `.await`.
    in_flight: Mutex<HashMap<Digest, Review>>,
}

impl TokenVerifier {
    pub fn new(client: kube::Client, audience: &str) -> Self {
        TokenVerifier {
            reviews: Api::all(client),
            audience: audience.into(),
            permits: Arc::new(Semaphore::new(MAX_CONCURRENT_REVIEWS)),
            remembered: Mutex::new(HashMap::new()),
            in_flight: Mutex::new(HashMap::new()),
        }
    }

    /// `--token-audience`.
    pub fn audience(&self) -> &str {
        &self.audience
    }

    /// How many tokens are remembered (verified or refused).
    pub fn remembered(&self) -> usize {
        self.remembered.lock().unwrap().len()
    }

    /// The pod `token` is bound to, if the token is valid now: checked
    /// locally, then by TokenReview unless a review already accepted it.
    /// Says nothing about whether the pod is still live: see [`live_pod`].
    pub async fn verify(&self, token: &str) -> Result<BoundPod, TokenError> {
        let now = Timestamp::now();
        let claims = read_claims(token, &self.audience, now)?;
        let key = digest(token);
        let known = self.remembered.lock().unwrap().get(&key).cloned();
        match known {
            Some(Remembered::Verified(pod)) => return Ok(pod),
            Some(Remembered::Refused(until, e)) if until > now => return Err(e),
            _ => {}
        }
        let flight = self
            .in_flight
            .lock()
            .unwrap()
            .entry(key)
            .or_insert_with(|| {
                review(
                    self.reviews.clone(),
                    self.permits.clone(),
                    self.audience.clone(),
                    token.to_string(),
                    claims.clone(),
                )
                .boxed()
                .shared()
            })
            .clone();
        let result = flight.await;
        // Remembered before the flight is forgotten, so a request arriving
        // in between finds one or the other.
        let result = match result {
            Ok(()) => {
                self.remember(key, Remembered::Verified(claims.clone()));
                Ok(claims)
            }
            Err(e @ TokenError::Unverifiable(_)) => Err(e),
            Err(e) => {
                let until = now
                    .checked_add(REFUSED_TTL)
                    .unwrap_or(now)
                    .min(claims.expires);
                self.remember(key, Remembered::Refused(until, e.clone()));
                Err(e)
            }
        };
        self.in_flight.lock().unwrap().remove(&key);
        result
    }

    /// Refuses `token` from now until it expires: the pod it is bound to is
    /// gone, and a pod's uid never comes back.
    pub fn revoke(&self, token: &str, bound: &BoundPod) {
        self.remember(
            digest(token),
            Remembered::Refused(bound.expires, TokenError::PodGone),
        );
    }

    fn remember(&self, key: Digest, entry: Remembered) {
        let mut map = self.remembered.lock().unwrap();
        if map.len() >= MAX_REMEMBERED && !map.contains_key(&key) {
            let now = Timestamp::now();
            map.retain(|_, e| e.until() > now);
            if map.len() >= MAX_REMEMBERED {
                // Still full of live entries: drop the soonest to expire.
                if let Some(soonest) = map.iter().min_by_key(|(_, e)| e.until()).map(|(k, _)| *k) {
                    map.remove(&soonest);
                }
            }
        }
        map.insert(key, entry);
    }
}

/// One TokenReview for kiam's audience; `Ok` when the API server
/// authenticated the token as the service account and pod its claims name.
async fn review(
    reviews: Api<TokenReview>,
    permits: Arc<Semaphore>,
    audience: Arc<str>,
    token: String,
    pod: BoundPod,
) -> Result<(), TokenError> {
    let _permit = tokio::time::timeout(REVIEW_TIMEOUT, permits.acquire())
        .await
        .map_err(|_| TokenError::Unverifiable("too many token reviews in flight".into()))?
        .expect("the semaphore is never closed");
    let review = TokenReview {
        spec: TokenReviewSpec {
            token: Some(token),
            audiences: Some(vec![audience.to_string()]),
        },
        ..Default::default()
    };
    let answer = tokio::time::timeout(
            REVIEW_TIMEOUT,
            reviews.create(&PostParams::default(), &review),
        )
        .await
        .map_err(|_| TokenError::Unverifiable("the TokenReview timed out".into()))?
        .map_err(|e| {
            tracing::warn!(error = %e, "TokenReview failed (does kiam server's ClusterRole allow creating tokenreviews?)");
            TokenError::Unverifiable("the Kubernetes API did not answer the TokenReview".into())
        })?;
    let status = answer.status.unwrap_or_default();
    let rejected = |reason: String| TokenError::Rejected { reason };
    if status.authenticated != Some(true) {
        return Err(rejected(
            status.error.unwrap_or_else(|| "not authenticated".into()),
        ));
    }
    // An audience-unaware authenticator answers without audiences: its
    // "yes" would be for the API server's audience, not kiam's.
    let audiences = status.audiences.unwrap_or_default();
    if !audiences.iter().any(|a| **a == *audience) {
        return Err(TokenError::Audience(audience.to_string()));
    }
    let user = status.user.unwrap_or_default();
    let expected = format!(
        "{SERVICE_ACCOUNT_PREFIX}{}:{}",
        pod.namespace, pod.service_account
    );
    if user.username.as_deref() != Some(expected.as_str()) {
        return Err(rejected(format!(
            "TokenReview authenticated {:?}, not the token's service account",
            user.username
        )));
    }
    let extra = user.extra.unwrap_or_default();
    for (key, want) in [(EXTRA_POD_NAME, &pod.name), (EXTRA_POD_UID, &pod.uid)] {
        if let Some(values) = extra.get(key) {
            if values.first() != Some(want) {
                return Err(rejected(format!(
                    "TokenReview's {key} differs from the token's claim"
                )));
            }
        }
    }
    Ok(())
}

/// The token's claims, read without checking the signature, and every
/// check that needs no key: structure, algorithm, time, audience, binding.
fn read_claims(token: &str, audience: &str, now: Timestamp) -> Result<BoundPod, TokenError> {
    if token.is_empty() {
        return Err(TokenError::Missing);
    }
    if token.len() > MAX_TOKEN_LEN {
        return Err(TokenError::Malformed(
            "longer than any service-account token",
        ));
    }
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TokenError::Malformed("not three dot-separated parts"));
    };
    let json = |segment: &str| -> Result<Value, TokenError> {
        let bytes = URL_SAFE_NO_PAD
            .decode(segment)
            .map_err(|_| TokenError::Malformed("a part is not base64url"))?;
        let v: Value = serde_json::from_slice(&bytes)
            .map_err(|_| TokenError::Malformed("a part is not JSON"))?;
        v.is_object()
            .then_some(v)
            .ok_or(TokenError::Malformed("a part is not a JSON object"))
    };
    let header = json(header)?;
    let alg = header.get("alg").and_then(Value::as_str).unwrap_or("");
    if alg.is_empty() || alg.eq_ignore_ascii_case("none") || signature.is_empty() {
        return Err(TokenError::Unsigned(alg.to_string()));
    }
    let claims = json(payload)?;
    let time = |key: &str| {
        claims
            .get(key)
            .and_then(Value::as_i64)
            .and_then(|s| Timestamp::from_second(s).ok())
    };
    // Service-account tokens always carry `exp`; one without never expires
    // and is not one kiam accepts.
    let expires = time("exp").ok_or(TokenError::Expired)?;
    if expires <= now {
        return Err(TokenError::Expired);
    }
    if time("nbf").is_some_and(|nbf| nbf > now) {
        return Err(TokenError::NotYetValid);
    }
    let for_us = match claims.get("aud") {
        Some(Value::String(a)) => a == audience,
        Some(Value::Array(list)) => list.iter().any(|a| a.as_str() == Some(audience)),
        _ => false,
    };
    if !for_us {
        return Err(TokenError::Audience(audience.to_string()));
    }
    let k8s = claims.get("kubernetes.io").ok_or(TokenError::NotBound)?;
    let text = |pointer: &str| {
        k8s.pointer(pointer)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .ok_or(TokenError::NotBound)
    };
    let pod = BoundPod {
        namespace: text("/namespace")?,
        name: text("/pod/name")?,
        uid: text("/pod/uid")?,
        service_account: text("/serviceaccount/name")?,
        expires,
    };
    // `sub` must agree with the claims (a real token's always does).
    let sub = claims.get("sub").and_then(Value::as_str).unwrap_or("");
    let expected = format!(
        "{SERVICE_ACCOUNT_PREFIX}{}:{}",
        pod.namespace, pod.service_account
    );
    if sub != expected {
        return Err(TokenError::NotBound);
    }
    Ok(pod)
}

/// The pod `bound` names, if it is still live with that uid: from the
/// cache, or one GET when the cache does not have that uid under that name
/// (a new pod the watch has not delivered). `PodGone` is final: the caller
/// revokes the token. Host-network pods are served: the token, not the
/// address, says who they are.
pub async fn live_pod(pods: &PodCache, bound: &BoundPod) -> Result<Arc<PodInfo>, TokenError> {
    let cached = pods
        .get(&bound.namespace, &bound.name)
        .filter(|p| *p.uid == *bound.uid);
    let pod = match cached {
        Some(pod) => pod,
        None => {
            let found = tokio::time::timeout(
                REVIEW_TIMEOUT,
                pods.get_from_api(&bound.namespace, &bound.name),
            )
            .await
            .map_err(|_| TokenError::Unverifiable("reading the pod timed out".into()))?
            .map_err(|e| {
                tracing::warn!(pod.namespace = %bound.namespace, pod.name = %bound.name, error = %e, "reading the token's pod failed");
                TokenError::Unverifiable("the Kubernetes API did not answer".into())
            })?;
            match found {
                Some(pod) if *pod.uid == *bound.uid => Arc::new(pod),
                _ => return Err(TokenError::PodGone),
            }
        }
    };
    let past_deadline = pod.deletion.is_some_and(|d| d <= Timestamp::now());
    if pod.phase.is_completed() || past_deadline {
        return Err(TokenError::PodGone);
    }
    Ok(pod)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn seg(v: &Value) -> String {
        URL_SAFE_NO_PAD.encode(v.to_string())
    }

    fn token(header: Value, claims: Value) -> String {
        format!("{}.{}.c2ln", seg(&header), seg(&claims))
    }

    fn claims(now: i64) -> Value {
        json!({
            "aud": ["kiam"], "exp": now + 600, "nbf": now - 1, "iat": now - 1,
            "iss": "https://kubernetes.default.svc",
            "sub": "system:serviceaccount:team-a:web",
            "kubernetes.io": {
                "namespace": "team-a",
                "pod": {"name": "web-1", "uid": "u-1"},
                "serviceaccount": {"name": "web", "uid": "s-1"},
            },
        })
    }

    #[test]
    fn good_claims_are_read() {
        let now = Timestamp::now();
        let t = token(json!({"alg": "RS256"}), claims(now.as_second()));
        let c = read_claims(&t, "kiam", now).unwrap();
        assert_eq!(c.namespace, "team-a");
        assert_eq!(c.name, "web-1");
        assert_eq!(c.uid, "u-1");
        assert_eq!(c.service_account, "web");
        // A single-string audience is an audience too.
        let mut one = claims(now.as_second());
        one["aud"] = json!("kiam");
        assert!(read_claims(&token(json!({"alg": "ES256"}), one), "kiam", now).is_ok());
    }

    #[test]
    fn bad_tokens_are_refused_without_asking() {
        let now = Timestamp::now();
        let s = now.as_second();
        let alg = json!({"alg": "ES256"});
        let check = |t: String| read_claims(&t, "kiam", now).unwrap_err();
        assert_eq!(
            read_claims("", "kiam", now).unwrap_err(),
            TokenError::Missing
        );
        assert!(matches!(check("a.b".into()), TokenError::Malformed(_)));
        assert!(matches!(
            check("x".repeat(MAX_TOKEN_LEN + 1)),
            TokenError::Malformed(_)
        ));
        assert!(matches!(check("!!.!!.!!".into()), TokenError::Malformed(_)));
        let unsigned = format!("{}.{}.", seg(&json!({"alg": "none"})), seg(&claims(s)));
        assert_eq!(check(unsigned), TokenError::Unsigned("none".into()));
        let no_sig = format!("{}.{}.", seg(&alg), seg(&claims(s)));
        assert!(matches!(check(no_sig), TokenError::Unsigned(_)));
        let mut c = claims(s);
        c["exp"] = json!(s - 1);
        assert_eq!(check(token(alg.clone(), c)), TokenError::Expired);
        let mut c = claims(s);
        c.as_object_mut().unwrap().remove("exp");
        assert_eq!(check(token(alg.clone(), c)), TokenError::Expired);
        let mut c = claims(s);
        c["nbf"] = json!(s + 100);
        assert_eq!(check(token(alg.clone(), c)), TokenError::NotYetValid);
        let mut c = claims(s);
        c["aud"] = json!(["sts.amazonaws.com"]);
        assert_eq!(
            check(token(alg.clone(), c)),
            TokenError::Audience("kiam".into())
        );
        let mut c = claims(s);
        c["kubernetes.io"].as_object_mut().unwrap().remove("pod");
        assert_eq!(check(token(alg.clone(), c)), TokenError::NotBound);
        let mut c = claims(s);
        c["sub"] = json!("system:serviceaccount:other:web");
        assert_eq!(check(token(alg.clone(), c)), TokenError::NotBound);
    }

    #[test]
    fn digests_differ_per_token() {
        assert_ne!(digest("a"), digest("b"));
        assert_eq!(digest("a"), digest("a"));
    }
}
