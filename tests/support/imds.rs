//! A deliberately leaky EC2 metadata service for agent tests.
//!
//! It serves a node role whose name and keys are unique marker strings, and
//! it is lenient about spelling the way a sloppy server could be: before
//! matching it percent-decodes repeatedly, lowercases, treats `\` as `/`,
//! drops `;params`, collapses `//` and resolves `.`/`..`. Any request the
//! agent forwards that such a server would map to IAM or credential data
//! therefore gets the markers back, and every request is recorded so tests
//! can also check what reached it.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::Router;
use http::{HeaderMap, Method, StatusCode};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub const NODE_ROLE: &str = "NODEROLEMARKER-e1f7c3";
pub const NODE_ACCESS_KEY: &str = "ASIANODEKEYMARKER4B2D";
pub const NODE_SECRET: &str = "NODESECRETMARKER-94af0c";
pub const NODE_TOKEN: &str = "NODETOKENMARKER-5d8e21";
pub const NODE_PROFILE: &str = "NODEPROFILEMARKER-c04b9a";
pub const NODE_PROFILE_ID: &str = "AIPANODEPROFILEIDMARKER";
pub const USER_DATA: &str = "USERDATAMARKER-7a61e3";
pub const INSTANCE_ID: &str = "i-0123456789abcdef0";

/// Everything that must never reach a pod (user-data aside: it is the
/// operator's to allow).
pub const NODE_MARKERS: [&str; 6] = [
    NODE_ROLE,
    NODE_ACCESS_KEY,
    NODE_SECRET,
    NODE_TOKEN,
    NODE_PROFILE,
    NODE_PROFILE_ID,
];

/// One request as the emulator received it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: Method,
    pub path: String,
    pub headers: HeaderMap,
}

struct Inner {
    require_token: AtomicBool,
    tokens_issued: AtomicUsize,
    seen: Mutex<Vec<Seen>>,
}

/// A running emulator; stops when dropped.
pub struct Imds {
    pub addr: SocketAddr,
    inner: Arc<Inner>,
    stop: CancellationToken,
}

impl Drop for Imds {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Imds {
    /// Starts on 127.0.0.1:0; with `require_token`, tokenless GETs get 401
    /// as on an instance with `HttpTokens=required`.
    pub async fn start(require_token: bool) -> Imds {
        let inner = Arc::new(Inner {
            require_token: AtomicBool::new(require_token),
            tokens_issued: AtomicUsize::new(0),
            seen: Mutex::new(Vec::new()),
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new().fallback(handle).with_state(inner.clone());
        let stop = CancellationToken::new();
        let s = stop.clone();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(s.cancelled_owned())
                .await
                .unwrap();
        });
        Imds { addr, inner, stop }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.inner.seen.lock().unwrap().clone()
    }

    pub fn tokens_issued(&self) -> usize {
        self.inner.tokens_issued.load(Ordering::SeqCst)
    }
}

/// The lenient spelling this emulator matches on.
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

fn node_credentials() -> String {
    format!(
        r#"{{"Code":"Success","LastUpdated":"2024-01-01T00:00:00Z","Type":"AWS-HMAC","AccessKeyId":"{NODE_ACCESS_KEY}","SecretAccessKey":"{NODE_SECRET}","Token":"{NODE_TOKEN}","Expiration":"2099-01-01T00:00:00Z","AccountId":"123456789012","RoleName":"{NODE_ROLE}"}}"#
    )
}

async fn handle(State(inner): State<Arc<Inner>>, req: Request) -> Response {
    let (parts, _) = req.into_parts();
    inner.seen.lock().unwrap().push(Seen {
        method: parts.method.clone(),
        path: parts.uri.path().to_string(),
        headers: parts.headers.clone(),
    });
    let path = lenient(parts.uri.path());

    if parts.method == Method::PUT && path.ends_with("/api/token") {
        if parts.headers.contains_key("x-forwarded-for") {
            return StatusCode::FORBIDDEN.into_response();
        }
        let Some(ttl) = parts
            .headers
            .get("x-aws-ec2-metadata-token-ttl-seconds")
            .cloned()
        else {
            return StatusCode::BAD_REQUEST.into_response();
        };
        let n = inner.tokens_issued.fetch_add(1, Ordering::SeqCst);
        return (
            [("x-aws-ec2-metadata-token-ttl-seconds", ttl)],
            format!("upstream-token-{n}"),
        )
            .into_response();
    }
    if inner.require_token.load(Ordering::SeqCst) {
        let ok = parts
            .headers
            .get("x-aws-ec2-metadata-token")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|t| t.starts_with("upstream-token-"));
        if !ok {
            return StatusCode::UNAUTHORIZED.into_response();
        }
    }

    let squashed: String = path
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '/')
        .collect();
    if squashed.contains("iam") || squashed.contains("credentials") {
        // Whatever was asked, a leaky server hands out the node's identity.
        let body = if squashed.ends_with("/info") {
            format!(
                r#"{{"Code":"Success","LastUpdated":"2024-01-01T00:00:00Z","InstanceProfileArn":"arn:aws:iam::123456789012:instance-profile/{NODE_PROFILE}","InstanceProfileId":"{NODE_PROFILE_ID}"}}"#
            )
        } else if squashed.ends_with("securitycredentials")
            || squashed.ends_with("securitycredentialsextended")
        {
            NODE_ROLE.to_string()
        } else {
            node_credentials()
        };
        return ([("x-node-role", NODE_ROLE)], body).into_response();
    }
    if path.ends_with("/user-data") {
        return USER_DATA.into_response();
    }
    if path.ends_with("/meta-data/instance-id") {
        return INSTANCE_ID.into_response();
    }
    if path.ends_with("/meta-data/placement/region") {
        return "eu-west-1".into_response();
    }
    if path.ends_with("/meta-data") {
        return "ami-id\niam/\ninstance-id\nplacement/".into_response();
    }
    StatusCode::NOT_FOUND.into_response()
}
