//! The node's own EC2 instance metadata service, as the agent's
//! `--metadata-endpoint` sees it: instance id, placement, user-data, and an
//! instance profile with the *node's* role and credentials.
//!
//! The one surprise: the node role exists to be stolen. Its name and keys are
//! unmistakable markers ([`NodeIdentity::markers`]) and every request is
//! recorded, so a test can prove that no Pod ever got them — whatever kiam
//! serves a Pod must come from STS via the server, never from here. On an
//! isolated sandbox node this emulator answers at 169.254.169.254:80 itself,
//! exactly where a Pod would reach the real service if the agent's iptables
//! rule were missing. Agent tests make it leakier still ([`Behaviour::leaky`]):
//! it then hands the node's identity to any spelling of an IAM path a sloppy
//! server might accept, so a test fails if the agent forwards one.
//!
//! Tokens work as on EC2 with `HttpTokens=optional` (or `required`, see
//! [`Behaviour`]): `PUT /latest/api/token` with a TTL of 1..21600 seconds
//! returns one; a GET may go without, but a GET with an unknown or expired
//! token is 401.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
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
    /// The instance profile's name, in its ARN (often the role's name).
    pub instance_profile_name: String,
    pub instance_profile_id: String,
    pub access_key_id: String,
    pub secret_access_key: String,
    pub token: String,
    /// `/latest/user-data`: the operator's to allow to Pods or not.
    pub user_data: String,
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
            instance_profile_name: "kiam-sandbox-NODE-ROLE".into(),
            instance_profile_id: "AIPASANDBOXNODEPROFILE".into(),
            access_key_id: "ASIASANDBOXNODEROLEKEY".into(),
            secret_access_key: "sandbox-NODE-ROLE-secret-must-never-reach-a-pod".into(),
            token: "sandbox-NODE-ROLE-session-token-must-never-reach-a-pod".into(),
            user_data: "kiam-sandbox-USER-DATA".into(),
        }
    }
}

impl NodeIdentity {
    /// Strings that must never appear in anything a Pod receives (user-data
    /// aside: it is the operator's to allow).
    pub fn markers(&self) -> [&str; 6] {
        [
            &self.role_name,
            &self.instance_profile_name,
            &self.instance_profile_id,
            &self.access_key_id,
            &self.secret_access_key,
            &self.token,
        ]
    }

    /// `arn:aws:iam::<account>:instance-profile/<profile>` (what
    /// `--role-base-arn-autodetect` reads).
    pub fn instance_profile_arn(&self) -> String {
        format!(
            "arn:aws:iam::{}:instance-profile/{}",
            self.account_id, self.instance_profile_name
        )
    }
}

/// What the emulator does beyond EC2's defaults; tests choose.
#[derive(Debug, Clone, Copy, Default)]
pub struct Behaviour {
    /// Tokenless GETs get 401, as on an instance with `HttpTokens=required`.
    pub tokens_required: bool,
    /// Paths are matched the way a sloppy server could ([`lenient`], any
    /// version, any method), and whatever looks like IAM after that gets the
    /// node's identity.
    pub leaky: bool,
}

impl Behaviour {
    /// Leaky, tokens optional: the upstream agent tests put behind kiam.
    pub fn leaky() -> Behaviour {
        Behaviour {
            tokens_required: false,
            leaky: true,
        }
    }

    /// The same, but tokenless GETs get 401.
    pub fn requiring_tokens(self) -> Behaviour {
        Behaviour {
            tokens_required: true,
            ..self
        }
    }
}

/// One request as the emulator received it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: Method,
    pub path: String,
    pub headers: HeaderMap,
}

struct Inner {
    node: NodeIdentity,
    behaviour: Behaviour,
    // std Mutexes: pushes and lookups only, never across an `.await`.
    /// Every token issued, in order, with its expiry.
    tokens: Mutex<Vec<(String, Instant)>>,
    seen: Mutex<Vec<Seen>>,
    node_credentials_served: AtomicUsize,
}

/// A running emulator; it stops serving when dropped.
pub struct ImdsEmulator {
    addr: SocketAddr,
    inner: Arc<Inner>,
    /// Dropping it ends the server (and closes the listener).
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl std::fmt::Debug for ImdsEmulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImdsEmulator")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl ImdsEmulator {
    /// Serves on a listener the caller bound, as EC2 would. Must be called
    /// inside a tokio runtime.
    pub fn serve(listener: TcpListener, node: NodeIdentity) -> std::io::Result<ImdsEmulator> {
        Self::serve_with(listener, node, Behaviour::default())
    }

    /// Serves on a listener the caller bound, behaving as `behaviour` says.
    pub fn serve_with(
        listener: TcpListener,
        node: NodeIdentity,
        behaviour: Behaviour,
    ) -> std::io::Result<ImdsEmulator> {
        let addr = listener.local_addr()?;
        let inner = Arc::new(Inner {
            node,
            behaviour,
            tokens: Mutex::default(),
            seen: Mutex::default(),
            node_credentials_served: AtomicUsize::new(0),
        });
        let app = Router::new().fallback(handle).with_state(inner.clone());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let serve = axum::serve(listener, app).with_graceful_shutdown(async {
                let _ = stopped.await;
            });
            if let Err(error) = serve.await {
                tracing::warn!(%error, "IMDS emulator stopped");
            }
        });
        Ok(ImdsEmulator {
            addr,
            inner,
            _stop: stop,
        })
    }

    /// On 127.0.0.1:0, for tests.
    pub async fn start(node: NodeIdentity, behaviour: Behaviour) -> std::io::Result<ImdsEmulator> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        Self::serve_with(listener, node, behaviour)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://<addr>`, for `--metadata-endpoint`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn node(&self) -> &NodeIdentity {
        &self.inner.node
    }

    /// How many requests arrived.
    pub fn requests(&self) -> usize {
        lock(&self.inner.seen).len()
    }

    /// Every request so far, oldest first.
    pub fn seen(&self) -> Vec<Seen> {
        lock(&self.inner.seen).clone()
    }

    /// Every token issued so far, oldest first.
    pub fn issued_tokens(&self) -> Vec<String> {
        lock(&self.inner.tokens)
            .iter()
            .map(|(token, _)| token.clone())
            .collect()
    }

    /// How many times the node role's credentials were handed out, to anyone.
    pub fn node_credentials_served(&self) -> usize {
        self.inner.node_credentials_served.load(Ordering::SeqCst)
    }
}

/// The spelling a lenient server matches on: percent-decoded repeatedly,
/// lowercased, `\` as `/`, `;params` dropped, `//` collapsed and `.`/`..`
/// resolved.
pub fn lenient(path: &str) -> String {
    let mut s = path.to_string();
    for _ in 0..5 {
        let d = percent_encoding::percent_decode_str(&s)
            .decode_utf8_lossy()
            .into_owned();
        if d == s {
            break;
        }
        s = d;
    }
    let s = s.to_lowercase().replace('\\', "/");
    let mut out: Vec<&str> = Vec::new();
    for seg in s.split('/') {
        let seg = seg
            .split(';')
            .next()
            .unwrap_or("")
            .trim_matches(|c: char| c.is_whitespace() || c == '\0');
        match seg {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            _ => out.push(seg),
        }
    }
    format!("/{}", out.join("/"))
}

/// A path with only its letters, digits and slashes.
fn squashed(path: &str) -> String {
    path.chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '/')
        .collect()
}

/// Whether a sloppy server would take `path` for IAM data: its [`lenient`]
/// spelling, squashed, names `iam` or `credentials` anywhere.
pub fn looks_like_iam(path: &str) -> bool {
    let squashed = squashed(&lenient(path));
    squashed.contains("iam") || squashed.contains("credentials")
}

async fn handle(State(inner): State<Arc<Inner>>, request: Request) -> Response {
    let (parts, _) = request.into_parts();
    lock(&inner.seen).push(Seen {
        method: parts.method.clone(),
        path: parts.uri.path().to_string(),
        headers: parts.headers.clone(),
    });
    let leaky = inner.behaviour.leaky;
    let path = if leaky {
        lenient(parts.uri.path())
    } else {
        parts.uri.path().to_string()
    };
    let method = &parts.method;
    let headers = &parts.headers;
    if path == "/latest/api/token" || (leaky && path.ends_with("/api/token")) {
        return if method == Method::PUT {
            issue_token(&inner, headers)
        } else {
            (StatusCode::METHOD_NOT_ALLOWED, "").into_response()
        };
    }
    if !leaky && method != Method::GET && method != Method::HEAD {
        return (StatusCode::METHOD_NOT_ALLOWED, "").into_response();
    }
    match headers.get(TOKEN_HEADER) {
        Some(token) => {
            let valid = token.to_str().ok().is_some_and(|t| {
                lock(&inner.tokens)
                    .iter()
                    .any(|(issued, expiry)| issued == t && *expiry > Instant::now())
            });
            if !valid {
                return (StatusCode::UNAUTHORIZED, "").into_response();
            }
        }
        None if inner.behaviour.tokens_required => {
            return (StatusCode::UNAUTHORIZED, "").into_response();
        }
        None => {}
    }
    if leaky {
        if looks_like_iam(&path) {
            return leak(&inner, &path);
        }
        // Any version answers as `latest`.
        let latest = match path.trim_start_matches('/').split_once('/') {
            Some((_, rest)) => format!("/latest/{rest}"),
            None => path.clone(),
        };
        return answer(&inner, &latest).map_or_else(
            || (StatusCode::NOT_FOUND, "").into_response(),
            IntoResponse::into_response,
        );
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
    lock(&inner.tokens).push((token.clone(), Instant::now() + Duration::from_secs(ttl)));
    ([(TTL_HEADER, ttl.to_string())], token).into_response()
}

fn ec2_time(t: jiff::Timestamp) -> String {
    t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

fn instance_profile_info(node: &NodeIdentity) -> String {
    serde_json::json!({
        "Code": "Success",
        "LastUpdated": ec2_time(jiff::Timestamp::now()),
        "InstanceProfileArn": node.instance_profile_arn(),
        "InstanceProfileId": node.instance_profile_id,
    })
    .to_string()
}

fn node_credentials(inner: &Inner) -> String {
    let node = &inner.node;
    inner.node_credentials_served.fetch_add(1, Ordering::SeqCst);
    let now = jiff::Timestamp::now();
    let expiration = now
        .checked_add(jiff::SignedDuration::from_hours(6))
        .unwrap_or(now);
    serde_json::json!({
        "Code": "Success",
        "LastUpdated": ec2_time(now),
        "Type": "AWS-HMAC",
        "AccessKeyId": node.access_key_id,
        "SecretAccessKey": node.secret_access_key,
        "Token": node.token,
        "Expiration": ec2_time(expiration),
    })
    .to_string()
}

/// A leaky server's answer to anything IAM-like: the node's identity,
/// whatever was asked, with its role in a header too.
fn leak(inner: &Inner, path: &str) -> Response {
    let node = &inner.node;
    let squashed = squashed(path);
    let body = if squashed.ends_with("/info") {
        instance_profile_info(node)
    } else if squashed.ends_with("securitycredentials")
        || squashed.ends_with("securitycredentialsextended")
    {
        node.role_name.clone()
    } else {
        node_credentials(inner)
    };
    ([("x-node-role", node.role_name.clone())], body).into_response()
}

fn answer(inner: &Inner, path: &str) -> Option<String> {
    let node = &inner.node;
    let body = match path.trim_end_matches('/') {
        "/latest" => "dynamic\nmeta-data\nuser-data\n".into(),
        "/latest/user-data" => node.user_data.clone(),
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
        "/latest/meta-data/iam/info" => instance_profile_info(node),
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
            node_credentials(inner)
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

    #[tokio::test]
    async fn a_leaky_emulator_hands_the_node_role_to_any_spelling_of_iam() {
        let behaviour = Behaviour::leaky().requiring_tokens();
        let imds = ImdsEmulator::start(NodeIdentity::default(), behaviour)
            .await
            .unwrap();
        let addr = imds.addr();
        let spelled = "/1.0/META-DATA/x/..%2f%2569am//security-credentials;p/anything";
        assert_eq!(send(addr, &get(spelled, None)).await.0, 401);
        let (_, token) = send(addr, &put_token("60")).await;
        let (status, body) = send(addr, &get(spelled, Some(&token))).await;
        assert_eq!(status, 200);
        assert!(body.contains(&imds.node().secret_access_key), "{body}");
        assert_eq!(imds.node_credentials_served(), 1);
        assert!(looks_like_iam(spelled));
        // Not IAM: answered as any version's `latest`.
        let (status, body) = send(addr, &get("/2016-09-02/user-data", Some(&token))).await;
        assert_eq!(
            (status, body.as_str()),
            (200, imds.node().user_data.as_str())
        );
        assert_eq!(imds.issued_tokens(), [token]);
        assert_eq!(imds.seen().len(), 4);
    }
}
