//! The node's own EC2 instance metadata service, as the agent's
//! `--metadata-endpoint` sees it: instance id, placement, and an instance
//! profile with the *node's* role and credentials.
//!
//! The one surprise: the node role exists to be stolen. Its name and keys are
//! unmistakable markers ([`NodeIdentity::markers`]) and every request is
//! counted, so a test can prove that no Pod ever got them — whatever kiam
//! serves a Pod must come from STS via the server, never from here. On an
//! isolated sandbox node this emulator answers at 169.254.169.254:80 itself,
//! exactly where a Pod would reach the real service if the agent's iptables
//! rule were missing.
//!
//! Tokens work as on EC2 with `HttpTokens=optional`: `PUT /latest/api/token`
//! with a TTL of 1..21600 seconds returns one; a GET may go without, but a
//! GET with an unknown or expired token is 401.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use rand::distr::{Alphanumeric, SampleString};
use tokio::net::TcpListener;

const TOKEN_HEADER: &str = "x-aws-ec2-metadata-token";
const TTL_HEADER: &str = "x-aws-ec2-metadata-token-ttl-seconds";
const MAX_TTL_SECONDS: u64 = 21600;

/// Who the node is. Defaults carry marker strings that appear nowhere else.
#[derive(Debug, Clone)]
pub struct NodeIdentity {
    pub instance_id: String,
    pub account_id: String,
    pub region: String,
    pub availability_zone: String,
    pub local_ipv4: String,
    pub role_name: String,
    pub instance_profile_id: String,
    pub access_key_id: String,
    pub secret_access_key: String,
    pub token: String,
}

impl Default for NodeIdentity {
    fn default() -> Self {
        NodeIdentity {
            instance_id: "i-0kiamsandbox0001".into(),
            account_id: "123456789012".into(),
            region: "us-east-1".into(),
            availability_zone: "us-east-1a".into(),
            local_ipv4: "198.18.0.1".into(),
            role_name: "kiam-sandbox-NODE-ROLE".into(),
            instance_profile_id: "AIPASANDBOXNODEPROFILE".into(),
            access_key_id: "ASIASANDBOXNODEROLEKEY".into(),
            secret_access_key: "sandbox-NODE-ROLE-secret-must-never-reach-a-pod".into(),
            token: "sandbox-NODE-ROLE-session-token-must-never-reach-a-pod".into(),
        }
    }
}

impl NodeIdentity {
    /// Strings that must never appear in anything a Pod receives.
    pub fn markers(&self) -> [&str; 5] {
        [
            &self.role_name,
            &self.instance_profile_id,
            &self.access_key_id,
            &self.secret_access_key,
            &self.token,
        ]
    }

    /// `arn:aws:iam::<account>:instance-profile/<role>` (what
    /// `--role-base-arn-autodetect` reads).
    pub fn instance_profile_arn(&self) -> String {
        format!(
            "arn:aws:iam::{}:instance-profile/{}",
            self.account_id, self.role_name
        )
    }
}

struct Inner {
    node: NodeIdentity,
    // std Mutex: inserts and lookups only, never across an `.await`.
    tokens: Mutex<HashMap<String, Instant>>,
    requests: AtomicUsize,
    node_credentials_served: AtomicUsize,
}

/// A running emulator; it serves until the runtime it was started on ends.
#[derive(Clone)]
pub struct ImdsEmulator {
    addr: std::net::SocketAddr,
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ImdsEmulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImdsEmulator")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl ImdsEmulator {
    /// Serves on a listener the caller bound. Must be called inside a tokio runtime.
    pub fn serve(listener: TcpListener, node: NodeIdentity) -> std::io::Result<ImdsEmulator> {
        let addr = listener.local_addr()?;
        let inner = Arc::new(Inner {
            node,
            tokens: Mutex::default(),
            requests: AtomicUsize::new(0),
            node_credentials_served: AtomicUsize::new(0),
        });
        let app = Router::new().fallback(handle).with_state(inner.clone());
        tokio::spawn(async move {
            if let Err(error) = axum::serve(listener, app).await {
                tracing::warn!(%error, "IMDS emulator stopped");
            }
        });
        Ok(ImdsEmulator { addr, inner })
    }

    pub fn addr(&self) -> std::net::SocketAddr {
        self.addr
    }

    pub fn node(&self) -> &NodeIdentity {
        &self.inner.node
    }

    /// How many requests arrived.
    pub fn requests(&self) -> usize {
        self.inner.requests.load(Ordering::SeqCst)
    }

    /// How many times the node role's credentials were handed out, to anyone.
    pub fn node_credentials_served(&self) -> usize {
        self.inner.node_credentials_served.load(Ordering::SeqCst)
    }
}

async fn handle(State(inner): State<Arc<Inner>>, request: Request) -> Response {
    inner.requests.fetch_add(1, Ordering::SeqCst);
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let headers = request.headers().clone();
    if path == "/latest/api/token" {
        return if method == Method::PUT {
            issue_token(&inner, &headers)
        } else {
            (StatusCode::METHOD_NOT_ALLOWED, "").into_response()
        };
    }
    if method != Method::GET && method != Method::HEAD {
        return (StatusCode::METHOD_NOT_ALLOWED, "").into_response();
    }
    if let Some(token) = headers.get(TOKEN_HEADER) {
        let valid = token.to_str().ok().is_some_and(|t| {
            inner
                .tokens
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(t)
                .is_some_and(|expiry| *expiry > Instant::now())
        });
        if !valid {
            return (StatusCode::UNAUTHORIZED, "").into_response();
        }
    }
    match answer(&inner, &path) {
        Some(body) => body.into_response(),
        None => (StatusCode::NOT_FOUND, "").into_response(),
    }
}

fn issue_token(inner: &Inner, headers: &HeaderMap) -> Response {
    if headers.contains_key("x-forwarded-for") {
        return (StatusCode::FORBIDDEN, "").into_response();
    }
    let ttl = headers
        .get(TTL_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|ttl| (1..=MAX_TTL_SECONDS).contains(ttl));
    let Some(ttl) = ttl else {
        return (StatusCode::BAD_REQUEST, "").into_response();
    };
    let token = Alphanumeric.sample_string(&mut rand::rng(), 56);
    inner
        .tokens
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(token.clone(), Instant::now() + Duration::from_secs(ttl));
    ([(TTL_HEADER, ttl.to_string())], token).into_response()
}

fn answer(inner: &Inner, path: &str) -> Option<String> {
    let node = &inner.node;
    let now = jiff::Timestamp::now();
    let updated = now.strftime("%Y-%m-%dT%H:%M:%SZ").to_string();
    let body = match path.trim_end_matches('/') {
        "/latest" => "dynamic\nmeta-data\n".into(),
        "/latest/meta-data" => {
            "ami-id\nhostname\niam/\ninstance-id\ninstance-type\nlocal-ipv4\nplacement/\n".into()
        }
        "/latest/meta-data/ami-id" => "ami-0kiamsandbox".into(),
        "/latest/meta-data/hostname" => "sandbox-node.ec2.internal".into(),
        "/latest/meta-data/instance-id" => node.instance_id.clone(),
        "/latest/meta-data/instance-type" => "m5.large".into(),
        "/latest/meta-data/local-ipv4" => node.local_ipv4.clone(),
        "/latest/meta-data/placement" => "availability-zone\nregion\n".into(),
        "/latest/meta-data/placement/availability-zone" => node.availability_zone.clone(),
        "/latest/meta-data/placement/region" => node.region.clone(),
        "/latest/meta-data/iam" => "info\nsecurity-credentials/\n".into(),
        "/latest/meta-data/iam/info" => serde_json::json!({
            "Code": "Success",
            "LastUpdated": updated,
            "InstanceProfileArn": node.instance_profile_arn(),
            "InstanceProfileId": node.instance_profile_id,
        })
        .to_string(),
        "/latest/meta-data/iam/security-credentials" => node.role_name.clone(),
        "/latest/dynamic/instance-identity/document" => serde_json::json!({
            "accountId": node.account_id,
            "availabilityZone": node.availability_zone,
            "instanceId": node.instance_id,
            "instanceType": "m5.large",
            "privateIp": node.local_ipv4,
            "region": node.region,
        })
        .to_string(),
        other => {
            let role = other.strip_prefix("/latest/meta-data/iam/security-credentials/")?;
            if role != node.role_name {
                return None;
            }
            inner.node_credentials_served.fetch_add(1, Ordering::SeqCst);
            let expiration = now
                .checked_add(jiff::SignedDuration::from_hours(6))
                .unwrap_or(now)
                .strftime("%Y-%m-%dT%H:%M:%SZ")
                .to_string();
            serde_json::json!({
                "Code": "Success",
                "LastUpdated": updated,
                "Type": "AWS-HMAC",
                "AccessKeyId": node.access_key_id,
                "SecretAccessKey": node.secret_access_key,
                "Token": node.token,
                "Expiration": expiration,
            })
            .to_string()
        }
    };
    Some(body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn send(addr: std::net::SocketAddr, request: &str) -> (u16, String) {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut raw = String::new();
        stream.read_to_string(&mut raw).await.unwrap();
        let (head, body) = raw.split_once("\r\n\r\n").unwrap();
        (head[9..12].parse().unwrap(), body.to_string())
    }

    fn get(path: &str, token: Option<&str>) -> String {
        let token = token
            .map(|t| format!("{TOKEN_HEADER}: {t}\r\n"))
            .unwrap_or_default();
        format!("GET {path} HTTP/1.1\r\nHost: x\r\n{token}Connection: close\r\n\r\n")
    }

    fn put_token(ttl: &str) -> String {
        format!(
            "PUT /latest/api/token HTTP/1.1\r\nHost: x\r\n{TTL_HEADER}: {ttl}\r\n\
             Content-Length: 0\r\nConnection: close\r\n\r\n"
        )
    }

    #[tokio::test]
    async fn tokens_are_optional_but_checked_and_the_node_role_is_counted() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let imds = ImdsEmulator::serve(listener, NodeIdentity::default()).unwrap();
        let addr = imds.addr();

        assert_eq!(send(addr, &put_token("0")).await.0, 400);
        assert_eq!(send(addr, &put_token("21601")).await.0, 400);
        let (status, token) = send(addr, &put_token("60")).await;
        assert_eq!(status, 200);

        let role_path = "/latest/meta-data/iam/security-credentials/";
        assert_eq!(
            send(addr, &get(role_path, Some("forged"))).await,
            (401, String::new())
        );
        let (status, role) = send(addr, &get(role_path, None)).await;
        assert_eq!(
            (status, role.as_str()),
            (200, imds.node().role_name.as_str())
        );
        assert_eq!(imds.node_credentials_served(), 0);

        let (status, body) = send(addr, &get(&format!("{role_path}{role}"), Some(&token))).await;
        assert_eq!(status, 200);
        let creds: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(creds["AccessKeyId"], imds.node().access_key_id);
        assert_eq!(imds.node_credentials_served(), 1);
        assert_eq!(
            send(addr, &get(&format!("{role_path}other"), None)).await.0,
            404
        );
    }
}
