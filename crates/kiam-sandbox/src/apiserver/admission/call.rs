//! One HTTPS POST of an AdmissionReview to a webhook's `clientConfig.url`,
//! verified against its `caBundle` (and the URL's host) as the real API
//! server's webhook client does. HTTP/1.1 only; a fresh connection per call.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use serde_json::Value;
use tokio::net::TcpStream;

/// The largest response body read (the real client's limit is similar).
const MAX_RESPONSE: usize = 3 * 1024 * 1024;

/// Where and how to call one webhook, checked at registration.
#[derive(Clone, Debug)]
pub(crate) struct Endpoint {
    /// `clientConfig.url` as given, for error messages.
    pub url: String,
    pub host: String,
    pub port: u16,
    pub path_and_query: String,
    /// The trust roots from `caBundle`.
    pub roots: Arc<rustls::RootCertStore>,
}

impl Endpoint {
    /// Parses `clientConfig`: an `https://` URL (no user info, query or
    /// fragment, as the API validates) and a PEM `caBundle` (base64).
    pub fn parse(client_config: &Value) -> Result<Endpoint, String> {
        if client_config.get("service").is_some_and(|s| !s.is_null()) {
            return Err("clientConfig.service is not supported by the in-memory API server (there is no Service network); use clientConfig.url".into());
        }
        let url = client_config["url"]
            .as_str()
            .ok_or("clientConfig.url: required")?;
        let uri: http::Uri = url.parse().map_err(|e| format!("clientConfig.url: {e}"))?;
        if uri.scheme_str() != Some("https") {
            return Err("clientConfig.url: 'https' is the only allowed URL scheme".into());
        }
        if uri.query().is_some() || url.contains('#') {
            return Err("clientConfig.url: query parameters and fragments are not allowed".into());
        }
        let authority = uri.authority().ok_or("clientConfig.url: no host")?;
        if authority.as_str().contains('@') {
            return Err("clientConfig.url: user information is not allowed".into());
        }
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let mut roots = rustls::RootCertStore::empty();
        if let Some(b64) = client_config["caBundle"].as_str() {
            use base64::Engine;
            let pem = base64::engine::general_purpose::STANDARD
                .decode(b64)
                .map_err(|e| format!("clientConfig.caBundle: not base64: {e}"))?;
            for cert in CertificateDer::pem_slice_iter(&pem) {
                let cert = cert.map_err(|e| format!("clientConfig.caBundle: {e}"))?;
                roots
                    .add(cert)
                    .map_err(|e| format!("clientConfig.caBundle: {e}"))?;
            }
        }
        Ok(Endpoint {
            url: url.to_string(),
            host,
            port: authority.port_u16().unwrap_or(443),
            path_and_query: uri
                .path_and_query()
                .map(|p| p.as_str().to_string())
                .unwrap_or_else(|| "/".into()),
            roots: Arc::new(roots),
        })
    }

    /// POSTs `review` and returns the decoded response body. Errors read
    /// like Go's `Post "url": ...`.
    pub async fn post(&self, review: &Value, timeout: Duration) -> Result<Value, String> {
        match tokio::time::timeout(timeout, self.post_inner(review)).await {
            Ok(r) => r.map_err(|e| format!("Post \"{}\": {e}", self.url)),
            Err(_) => Err(format!("Post \"{}\": context deadline exceeded", self.url)),
        }
    }

    async fn post_inner(&self, review: &Value) -> Result<Value, String> {
        // No trust roots means the system's, which the sandbox has none of.
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(self.roots.clone())
            .with_no_client_auth();
        let name = ServerName::try_from(self.host.clone()).map_err(|e| e.to_string())?;
        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| format!("dial tcp {}:{}: {e}", self.host, self.port))?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .map_err(|e| format!("tls: {e}"))?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let body = serde_json::to_vec(review).map_err(|e| e.to_string())?;
        let request = http::Request::post(&self.path_and_query)
            .header(http::header::HOST, format!("{}:{}", self.host, self.port))
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::ACCEPT, "application/json, */*")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| e.to_string())?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status();
        let bytes = Limited::new(response.into_body(), MAX_RESPONSE)
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        if !status.is_success() {
            return Err(format!(
                "the server responded with {status}: {}",
                String::from_utf8_lossy(&bytes).trim()
            ));
        }
        serde_json::from_slice(&bytes).map_err(|e| format!("decoding the response: {e}"))
    }
}
