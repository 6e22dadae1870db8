//! The container credentials endpoint, `GET /v1/credentials`: what the AWS
//! SDKs' container credential provider asks when a pod sets
//! `AWS_CONTAINER_CREDENTIALS_FULL_URI=http://169.254.170.23/v1/credentials`
//! and `AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE` (the SDK sends the file's
//! content, a projected service-account token, in `Authorization`).
//!
//! The surprise: the caller's address identifies nothing here. The token
//! goes to a kiam server, which answers for the pod the token is bound to
//! (or refuses); the address is passed on for logs only. So a host-network
//! pod gets its own role, a reused address changes nothing, and a stolen
//! token works only as the pod it names, while that pod lives. There is no
//! fallback to kept answers and nothing is ever proxied to the node's
//! metadata service on this path.
//!
//! Answers are what the SDKs parse: `200` with `AccessKeyId`,
//! `SecretAccessKey`, `Token`, `Expiration` (RFC 3339) and `AccountId`;
//! errors as `{"Code", "Message"}` with a 4xx/5xx status, whose message
//! names the flag, annotation or token fault to fix and nothing of other
//! pods or of the servers.

use std::net::IpAddr;

use axum::response::{IntoResponse, Response};
use http::header::{self, HeaderMap};
use http::{Method, StatusCode};
use jiff::Timestamp;
use serde::Serialize;
use tokio::time::Instant;

use super::{handler, RouterContext};
use crate::agent::client::{ClientError, TOKEN_UNSUPPORTED};
use crate::agent::retry::{retry, RetryFailure};
use crate::arn::RoleArn;
use crate::wire::{is_ec2_time, Check, TOKEN_REFUSED};

/// Tokens longer than this are refused unread (real ones are about 1 KiB).
const MAX_TOKEN_LEN: usize = 16 * 1024;
/// A server's words passed on to the pod are cut to this many characters.
const MAX_MESSAGE: usize = 300;

/// An error answer: status, `Code`, `Message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Refusal {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl Refusal {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Refusal {
            status,
            code,
            message: message.into(),
        }
    }

    fn unauthorized(message: impl Into<String>) -> Self {
        Refusal::new(StatusCode::UNAUTHORIZED, "InvalidToken", message)
    }

    /// Maps a failed exchange with the servers to what the pod sees: one
    /// place, as `Reject::from_failure` is for the metadata path.
    fn from_failure(f: RetryFailure) -> Self {
        match f.err {
            ClientError::Final(m) if m.contains(TOKEN_REFUSED) => {
                // The server words token refusals for the pod: pass on
                // its reason, from the marker on.
                let reason = &m[m.find(TOKEN_REFUSED).unwrap_or(0)..];
                Refusal::unauthorized(reason.chars().take(MAX_MESSAGE).collect::<String>())
            }
            ClientError::NotFound => Refusal::unauthorized(
                "token refused: the pod the token is bound to no longer exists or has finished",
            ),
            ClientError::Forbidden(Some(Check::AnnotatedRole)) => Refusal::new(
                StatusCode::FORBIDDEN,
                "AccessDenied",
                "the pod the token is bound to has no valid iam.amazonaws.com/role annotation",
            ),
            ClientError::Forbidden(_) => Refusal::new(
                StatusCode::FORBIDDEN,
                "AccessDenied",
                "the pod's namespace does not permit its role (iam.amazonaws.com/permitted); \
                 see the pod's Events",
            ),
            ClientError::Final(_) | ClientError::Server(_) => Refusal::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "ServerError",
                "the kiam server could not get credentials for the pod's role; see the pod's Events",
            ),
            ClientError::Timeout(_) => Refusal::new(
                StatusCode::GATEWAY_TIMEOUT,
                "Timeout",
                "no kiam server answered in time",
            ),
            ClientError::Unavailable(m) if m.contains(TOKEN_UNSUPPORTED) => Refusal::new(
                StatusCode::NOT_IMPLEMENTED,
                "NotImplemented",
                "the kiam servers do not support the container credentials path \
                 (GetTokenCredentials): run kiam in Rust servers, or use the metadata path",
            ),
            ClientError::Unavailable(_) if f.interrupted => Refusal::new(
                StatusCode::GATEWAY_TIMEOUT,
                "Timeout",
                "no kiam server answered in time",
            ),
            ClientError::Unavailable(_) => Refusal::new(
                StatusCode::BAD_GATEWAY,
                "ServiceUnavailable",
                "no kiam server answered",
            ),
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct ErrorDoc<'a> {
    code: &'a str,
    message: &'a str,
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let body = ErrorDoc {
            code: self.code,
            message: &self.message,
        };
        json(self.status, &body)
    }
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct CredentialsDoc<'a> {
    access_key_id: &'a str,
    secret_access_key: &'a str,
    token: &'a str,
    expiration: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    account_id: Option<&'a str>,
}

fn json(status: StatusCode, doc: &impl Serialize) -> Response {
    let body = serde_json::to_string(doc).expect("documents serialise");
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// `2026-11-28T12:00:00Z` as the server sent it, or reformatted to that.
fn rfc3339(s: &str) -> String {
    if is_ec2_time(s) {
        return s.to_string();
    }
    s.parse::<Timestamp>()
        .map(crate::wire::ec2_time)
        .unwrap_or_else(|_| s.to_string())
}

/// The token in `Authorization`: the whole value as the SDKs send it
/// (a `Bearer ` prefix is tolerated), trimmed.
fn token_of(headers: &HeaderMap) -> Result<&str, Refusal> {
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let (Some(value), None) = (values.next(), values.next()) else {
        return Err(Refusal::unauthorized(
            "no token: set AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE to the pod's projected \
             service-account token (audience: the kiam server's --token-audience)",
        ));
    };
    if value.len() > MAX_TOKEN_LEN {
        return Err(Refusal::unauthorized(
            "token refused: the token is too long",
        ));
    }
    let value = value
        .to_str()
        .map_err(|_| Refusal::unauthorized("token refused: the token is not text"))?
        .trim();
    let token = match value.get(..6) {
        Some(scheme)
            if scheme.eq_ignore_ascii_case("bearer")
                && value[6..].chars().next().is_none_or(char::is_whitespace) =>
        {
            value[6..].trim()
        }
        _ => value,
    };
    if token.is_empty() {
        return Err(Refusal::unauthorized(
            "no token: the file AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE names is empty",
        ));
    }
    Ok(token)
}

/// `/v1/credentials`.
pub(super) async fn serve(
    ctx: &RouterContext,
    caller: IpAddr,
    method: &Method,
    headers: &HeaderMap,
) -> Response {
    let start = Instant::now();
    let resp = answer(ctx, caller, method, headers)
        .await
        .map_err(|r| r.into_response());
    let resp = match resp {
        Ok(r) | Err(r) => r,
    };
    ctx.metrics.answered(
        handler::CONTAINER_CREDENTIALS,
        start.elapsed(),
        resp.status(),
    );
    resp
}

async fn answer(
    ctx: &RouterContext,
    caller: IpAddr,
    method: &Method,
    headers: &HeaderMap,
) -> Result<Response, Refusal> {
    if method != Method::GET && method != Method::HEAD {
        return Err(Refusal::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "use GET",
        ));
    }
    let token = token_of(headers)?;
    let deadline = Instant::now() + ctx.cfg.deadline;
    let result = retry(
        deadline,
        |deadline| ctx.client.get_token_credentials(token, caller, deadline),
        // No fallback on this path: an outage is answered as one.
        |_| false,
    )
    .await;
    let answer = match result {
        Ok(a) => a,
        Err(f) => {
            ctx.metrics
                .credential_fetch_error(handler::CONTAINER_CREDENTIALS);
            tracing::warn!(pod.ip = %caller, error = %f.err, "container credentials refused");
            return Err(Refusal::from_failure(f));
        }
    };
    tracing::debug!(
        pod.ip = %caller, pod.namespace = %answer.namespace, pod.name = %answer.name,
        pod.iam.role = %answer.role_arn, "served container credentials"
    );
    let c = &answer.credentials;
    let doc = CredentialsDoc {
        access_key_id: &c.access_key_id,
        secret_access_key: &c.secret_access_key,
        token: &c.token,
        expiration: rfc3339(&c.expiration),
        account_id: RoleArn::parse(&answer.role_arn).ok().map(|a| a.account),
    };
    Ok(json(StatusCode::OK, &doc))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(header::AUTHORIZATION, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn tokens_are_read_from_authorization() {
        assert_eq!(token_of(&headers(&["abc"])).unwrap(), "abc");
        assert_eq!(token_of(&headers(&["  abc  "])).unwrap(), "abc");
        assert_eq!(token_of(&headers(&["Bearer abc"])).unwrap(), "abc");
        assert_eq!(token_of(&headers(&["bearer  abc"])).unwrap(), "abc");
        for bad in [&[][..], &[""], &["Bearer "], &["a", "b"]] {
            let r = token_of(&headers(bad)).unwrap_err();
            assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{bad:?}");
        }
        let long = "x".repeat(MAX_TOKEN_LEN + 1);
        assert_eq!(
            token_of(&headers(&[&long])).unwrap_err().status,
            StatusCode::UNAUTHORIZED
        );
    }

    #[test]
    fn refusals_map_to_statuses() {
        let f = |err| RetryFailure {
            err,
            interrupted: false,
            answered: true,
        };
        let r = Refusal::from_failure(f(ClientError::Final(
            "127.0.0.1:1: Unauthenticated: token refused: the token has expired".into(),
        )));
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);
        assert_eq!(r.message, "token refused: the token has expired");
        let status = |e| Refusal::from_failure(f(e)).status;
        assert_eq!(status(ClientError::NotFound), StatusCode::UNAUTHORIZED);
        assert_eq!(
            status(ClientError::Forbidden(Some(Check::NamespacePermitted))),
            StatusCode::FORBIDDEN
        );
        assert_eq!(
            status(ClientError::Unavailable(TOKEN_UNSUPPORTED.into())),
            StatusCode::NOT_IMPLEMENTED
        );
        assert_eq!(
            status(ClientError::Unavailable("refused".into())),
            StatusCode::BAD_GATEWAY
        );
        assert_eq!(
            status(ClientError::Final("AccessDenied".into())),
            StatusCode::INTERNAL_SERVER_ERROR
        );
    }

    #[test]
    fn times_are_rfc3339() {
        assert_eq!(rfc3339("2026-11-28T12:00:00Z"), "2026-11-28T12:00:00Z");
        assert_eq!(rfc3339("2026-11-28T12:00:00.5Z"), "2026-11-28T12:00:00Z");
    }
}
