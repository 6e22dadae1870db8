//! The node's real metadata service, as seen from the agent.
//!
//! The surprise: nothing of the pod's request is passed through except its
//! (already normalised) path and a few harmless headers. `X-Forwarded-For`,
//! `Forwarded` and the pod's IMDSv2 token never reach the upstream; when the
//! upstream requires IMDSv2, the agent uses a session token of its own,
//! fetched on the first 401 and refreshed before it expires.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::imdsv2::{TOKEN_HEADER, TTL_HEADER};

/// Upstream answers larger than this are refused (user-data is at most
/// 16 KiB; nothing in the metadata API comes close).
const MAX_BODY: usize = 1 << 20;
/// The TTL the agent asks for its own upstream token.
const UPSTREAM_TOKEN_TTL: Duration = Duration::from_secs(21_600);
/// Refresh the upstream token this long before it expires.
const TOKEN_REFRESH_MARGIN: Duration = Duration::from_secs(300);

/// Request headers a pod may pass to the upstream; everything else is dropped.
const FORWARDED_REQUEST_HEADERS: [HeaderName; 4] = [
    header::ACCEPT,
    header::USER_AGENT,
    header::IF_NONE_MATCH,
    header::IF_MODIFIED_SINCE,
];

#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error("--metadata-endpoint {0:?} must be an http:// URL without a path, e.g. http://169.254.169.254")]
    Invalid(String),
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("metadata endpoint did not answer within {0:?}")]
    Timeout(Duration),
    #[error("metadata endpoint request failed: {0}")]
    Request(String),
    #[error("metadata endpoint answer is larger than {MAX_BODY} bytes or unreadable: {0}")]
    Body(String),
}

/// A buffered upstream answer.
pub type UpstreamResponse = Response<Bytes>;

/// Client for `--metadata-endpoint`.
pub struct Upstream {
    /// `http://host[:port]`, no trailing slash.
    base: String,
    client: Client<HttpConnector, Full<Bytes>>,
    /// Bound on one exchange (headers and body).
    timeout: Duration,
    /// The agent's own IMDSv2 token and when to stop using it. std Mutex:
    /// only read or replaced, never held across an await.
    token: Mutex<Option<(String, Instant)>>,
}

impl Upstream {
    pub fn new(endpoint: &str, timeout: Duration) -> Result<Self, EndpointError> {
        let invalid = || EndpointError::Invalid(endpoint.to_string());
        let uri: Uri = endpoint.parse().map_err(|_| invalid())?;
        if uri.scheme_str() != Some("http")
            || uri.authority().is_none()
            || uri.query().is_some()
            || !matches!(uri.path(), "" | "/")
            || uri.authority().is_some_and(|a| a.as_str().contains('@'))
        {
            return Err(invalid());
        }
        let base = format!("http://{}", uri.authority().expect("checked above"));
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_secs(1)));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Ok(Upstream {
            base,
            client,
            timeout,
            token: Mutex::new(None),
        })
    }

    /// The endpoint as configured (`http://host[:port]`).
    pub fn base(&self) -> &str {
        &self.base
    }

    /// Sends `method path` upstream (`path` must already be normalised and
    /// percent-encoded, with no query), copying only the allow-listed
    /// headers of `from`, and handling the upstream's IMDSv2 if it has one.
    pub async fn fetch(
        &self,
        method: &Method,
        path: &str,
        from: &HeaderMap,
    ) -> Result<UpstreamResponse, UpstreamError> {
        let mut headers = HeaderMap::new();
        for name in FORWARDED_REQUEST_HEADERS {
            if let Some(v) = from.get(&name) {
                headers.insert(name, v.clone());
            }
        }
        let token = self.current_token();
        let resp = self.send(method, path, &headers, token.as_deref()).await?;
        if resp.status() != StatusCode::UNAUTHORIZED {
            return Ok(resp);
        }
        // The upstream wants IMDSv2 (or our token went stale): get a fresh
        // token and try once more.
        match self.fetch_token().await {
            Ok(token) => self.send(method, path, &headers, Some(&token)).await,
            Err(e) => {
                tracing::warn!(error = %e, "metadata endpoint answered 401 and no IMDSv2 token could be fetched");
                Ok(resp)
            }
        }
    }

    fn current_token(&self) -> Option<String> {
        let guard = self.token.lock().unwrap();
        match &*guard {
            Some((t, until)) if Instant::now() < *until => Some(t.clone()),
            _ => None,
        }
    }

    async fn fetch_token(&self) -> Result<String, UpstreamError> {
        let mut headers = HeaderMap::new();
        headers.insert(
            HeaderName::from_static(TTL_HEADER),
            HeaderValue::from(UPSTREAM_TOKEN_TTL.as_secs()),
        );
        let resp = self
            .send(&Method::PUT, "/latest/api/token", &headers, None)
            .await?;
        if resp.status() != StatusCode::OK {
            return Err(UpstreamError::Request(format!(
                "token PUT answered {}",
                resp.status()
            )));
        }
        let token = String::from_utf8(resp.into_body().to_vec())
            .map_err(|e| UpstreamError::Body(e.to_string()))?
            .trim()
            .to_string();
        if token.is_empty() || HeaderValue::from_str(&token).is_err() {
            return Err(UpstreamError::Body("unusable IMDSv2 token".into()));
        }
        let until = Instant::now() + UPSTREAM_TOKEN_TTL - TOKEN_REFRESH_MARGIN;
        *self.token.lock().unwrap() = Some((token.clone(), until));
        Ok(token)
    }

    async fn send(
        &self,
        method: &Method,
        path: &str,
        headers: &HeaderMap,
        token: Option<&str>,
    ) -> Result<UpstreamResponse, UpstreamError> {
        let mut req = Request::builder()
            .method(method.clone())
            .uri(format!("{}{}", self.base, path))
            .body(Full::new(Bytes::new()))
            .map_err(|e| UpstreamError::Request(e.to_string()))?;
        req.headers_mut().extend(headers.clone());
        if let Some(t) = token {
            let v = HeaderValue::from_str(t).map_err(|e| UpstreamError::Request(e.to_string()))?;
            req.headers_mut()
                .insert(HeaderName::from_static(TOKEN_HEADER), v);
        }
        let exchange = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| UpstreamError::Request(e.to_string()))?;
            let (parts, body) = resp.into_parts();
            let body = Limited::new(body, MAX_BODY)
                .collect()
                .await
                .map_err(|e| UpstreamError::Body(e.to_string()))?
                .to_bytes();
            Ok(Response::from_parts(parts, body))
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| UpstreamError::Timeout(self.timeout))?
    }
}

/// Response headers worth passing back to a pod: hop-by-hop headers, the
/// length (recomputed) and anything about IMDSv2 tokens are dropped.
pub fn response_headers(from: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::new();
    for (name, value) in from {
        let n = name.as_str();
        let drop = matches!(
            n,
            "connection"
                | "keep-alive"
                | "proxy-authenticate"
                | "proxy-authorization"
                | "te"
                | "trailer"
                | "transfer-encoding"
                | "upgrade"
                | "content-length"
        ) || n.starts_with("x-aws-ec2-metadata-token");
        if !drop {
            out.append(name.clone(), value.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_validation() {
        let t = Duration::from_secs(1);
        assert_eq!(
            Upstream::new("http://169.254.169.254", t).unwrap().base(),
            "http://169.254.169.254"
        );
        assert_eq!(
            Upstream::new("http://127.0.0.1:8080/", t).unwrap().base(),
            "http://127.0.0.1:8080"
        );
        for bad in [
            "",
            "169.254.169.254",
            "https://x",
            "http://x/latest",
            "ftp://x",
            "http://u@x",
            "http://x?a=b",
        ] {
            assert!(Upstream::new(bad, t).is_err(), "{bad}");
        }
    }
}
