//! The metadata API pods see: kiam's routes, IMDSv2, and a deny-by-default
//! proxy to the node's real metadata service.
//!
//! The surprise: routing is not done on the path as sent. Every path is
//! first normalised (percent-decoding to a fixpoint, `\` as `/`, `;`
//! parameters cut, empty, `.` and `..` segments resolved) and every decision
//! — which handler, whether the allow-list matches, what is sent upstream —
//! is taken on that one normalised form. Anything that looks like
//! `meta-data/iam` or security credentials in any spelling is answered here
//! (404 when unknown) and never proxied, so the node's role cannot leak
//! through an encoding trick.
//!
//! A pod is identified only by the connection's source address (or `?ip=`
//! with `--allow-ip-query`); headers such as `X-Forwarded-For`, `Forwarded`
//! or `Host` are never consulted.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::connect_info::{ConnectInfo, MockConnectInfo};
use axum::extract::{Query, Request, State as AxumState};
use axum::response::{IntoResponse, Response};
use axum::Router;
use http::header::{self, HeaderValue};
use http::{HeaderMap, Method, StatusCode, Uri};
use jiff::Timestamp;
use percent_encoding::{percent_decode, utf8_percent_encode, AsciiSet, CONTROLS};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use regex::Regex;
use serde::Serialize;
use tokio::time::Instant;

use super::client::{ClientError, Credentials, KiamClient};
use super::fallback::{same_role, Fallback};
use super::imdsv2::{TokenError, Tokens, TOKEN_HEADER, TTL_HEADER};
use super::proxy::{response_headers, Upstream, UpstreamError};

/// Router settings (from the agent flags).
#[derive(Debug, Clone)]
pub struct Config {
    /// `--allow-ip-query`.
    pub allow_ip_query: bool,
    /// `--allow-route-regexp`, matched against the normalised path.
    pub allow_route: Regex,
    /// `--require-imdsv2`.
    pub require_imdsv2: bool,
    /// `--stale-credentials-window`.
    pub stale_window: Duration,
    /// Budget for a role or credential answer, retries included. Below the
    /// ~1 s after which SDKs give up on the metadata service.
    pub deadline: Duration,
    /// Budget for `/health` (server health and upstream instance-id).
    pub health_deadline: Duration,
    /// Open connections allowed from one source address; more are answered
    /// 429 and closed, so one pod cannot use up the agent's connections.
    pub max_connections_per_source: usize,
}

impl Config {
    /// kiam's defaults: nothing proxied, no `?ip=`, tokens optional.
    pub fn new(allow_route: Regex) -> Self {
        Config {
            allow_ip_query: false,
            allow_route,
            require_imdsv2: false,
            stale_window: Duration::from_secs(300),
            deadline: Duration::from_millis(900),
            health_deadline: Duration::from_secs(3),
            max_connections_per_source: 64,
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HandlerLabel {
    handler: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResponseLabels {
    handler: &'static str,
    code: String,
}

type HistogramFamily = Family<HandlerLabel, Histogram, fn() -> Histogram>;

/// kiam's `kiam_metadata_*` metrics plus the fallback counter.
#[derive(Clone)]
pub struct Metrics {
    latency: HistogramFamily,
    credential_fetch_errors: Family<HandlerLabel, Counter>,
    find_role_errors: Family<HandlerLabel, Counter>,
    empty_role: Family<HandlerLabel, Counter>,
    success: Family<HandlerLabel, Counter>,
    responses: Family<ResponseLabels, Counter>,
    proxy_blocked: Counter,
    stale_served: Family<HandlerLabel, Counter>,
    connections_refused: Counter,
}

fn latency_histogram() -> Histogram {
    // kiam's buckets: 1 ms doubling to ~4 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 13))
}

impl Metrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = Metrics {
            latency: Family::new_with_constructor(latency_histogram as fn() -> Histogram),
            credential_fetch_errors: Family::default(),
            find_role_errors: Family::default(),
            empty_role: Family::default(),
            success: Family::default(),
            responses: Family::default(),
            proxy_blocked: Counter::default(),
            stale_served: Family::default(),
            connections_refused: Counter::default(),
        };
        // Counters are registered without `_total`: the library appends it.
        registry.register(
            "kiam_metadata_handler_latency_seconds",
            "Bucketed histogram of handler timings",
            m.latency.clone(),
        );
        registry.register(
            "kiam_metadata_credential_fetch_errors",
            "Number of errors fetching the credentials for a pod",
            m.credential_fetch_errors.clone(),
        );
        registry.register(
            "kiam_metadata_find_role_errors",
            "Number of errors finding the role for a pod",
            m.find_role_errors.clone(),
        );
        registry.register(
            "kiam_metadata_empty_role",
            "Number of empty roles returned",
            m.empty_role.clone(),
        );
        registry.register(
            "kiam_metadata_success",
            "Number of successful responses from a handler",
            m.success.clone(),
        );
        registry.register(
            "kiam_metadata_responses",
            "Responses from mocked out metadata handlers",
            m.responses.clone(),
        );
        registry.register(
            "kiam_metadata_proxy_requests_blocked",
            "Number of access requests to the proxy handler that were blocked by the regexp",
            m.proxy_blocked.clone(),
        );
        registry.register(
            "kiam_agent_stale_credentials_served",
            "Answers served from the last good server answer because no server answered",
            m.stale_served.clone(),
        );
        registry.register(
            "kiam_agent_connections_refused",
            "Connections refused because their source address already had the most open connections allowed",
            m.connections_refused.clone(),
        );
        m
    }

    /// Counts a connection refused by the per-source limit.
    pub fn connection_refused(&self) {
        self.connections_refused.inc();
    }

    fn inc(family: &Family<HandlerLabel, Counter>, handler: &'static str) {
        family.get_or_create(&HandlerLabel { handler }).inc();
    }
}

/// Everything a request needs; shared by all connections.
pub struct State {
    cfg: Config,
    client: Arc<dyn KiamClient>,
    upstream: Arc<Upstream>,
    fallback: Fallback,
    tokens: Tokens,
    metrics: Metrics,
}

impl State {
    pub fn new(
        cfg: Config,
        client: Arc<dyn KiamClient>,
        upstream: Arc<Upstream>,
        metrics: Metrics,
    ) -> Arc<Self> {
        Arc::new(State {
            fallback: Fallback::new(cfg.stale_window),
            tokens: Tokens::new(),
            cfg,
            client,
            upstream,
            metrics,
        })
    }

    /// The credential fallback (for tests and diagnostics).
    pub fn fallback(&self) -> &Fallback {
        &self.fallback
    }

    /// The router's settings.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }
}

/// The agent's HTTP router. The caller must supply the connection's address
/// as [`ConnectInfo<SocketAddr>`] (or [`MockConnectInfo`] in tests).
pub fn router(state: Arc<State>) -> Router {
    Router::new().fallback(dispatch).with_state(state)
}

// ---------------------------------------------------------------------------
// Path normalisation

/// A path reduced to its meaning.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NormalPath {
    /// Decoded, non-empty segments, with `.` and `..` resolved.
    pub segments: Vec<String>,
    /// Whether the path ends in `/` (which changes the answer, e.g.
    /// `security-credentials` vs `security-credentials/`).
    pub trailing_slash: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("path is not valid UTF-8 after percent-decoding")]
    NotUtf8,
    #[error("path contains control characters")]
    Control,
    #[error("path is percent-encoded too many times")]
    TooEncoded,
}

/// Characters escaped when a normalised segment is written back into a URL.
const SEGMENT: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'/')
    .add(b'<')
    .add(b'>')
    .add(b'?')
    .add(b'[')
    .add(b'\\')
    .add(b']')
    .add(b'^')
    .add(b'`')
    .add(b'{')
    .add(b'|')
    .add(b'}');

impl NormalPath {
    /// Normalises a raw request path (see the module doc).
    pub fn parse(raw: &str) -> Result<Self, PathError> {
        let mut bytes = raw.as_bytes().to_vec();
        let mut settled = false;
        for _ in 0..4 {
            let decoded: Vec<u8> = percent_decode(&bytes).collect();
            if decoded == bytes {
                settled = true;
                break;
            }
            bytes = decoded;
        }
        if !settled && percent_decode(&bytes).ne(bytes.iter().copied()) {
            return Err(PathError::TooEncoded);
        }
        let s = String::from_utf8(bytes).map_err(|_| PathError::NotUtf8)?;
        if s.chars().any(char::is_control) {
            return Err(PathError::Control);
        }
        let s = s.replace('\\', "/");
        let mut segments: Vec<String> = Vec::new();
        let mut trailing_slash = false;
        for piece in s.split('/') {
            // `;params` are cut: some servers ignore them, so must we.
            let seg = piece.split(';').next().unwrap_or("");
            trailing_slash = matches!(seg, "" | "." | "..");
            match seg {
                "" | "." => {}
                ".." => {
                    segments.pop();
                }
                _ => segments.push(seg.to_string()),
            }
        }
        if segments.is_empty() {
            trailing_slash = true;
        }
        Ok(NormalPath {
            segments,
            trailing_slash,
        })
    }

    /// The decoded path, e.g. `/latest/meta-data/`: what the allow-list sees.
    pub fn decoded(&self) -> String {
        self.render(|s| s.to_string())
    }

    /// The path re-encoded for a URL: what the upstream receives.
    pub fn encoded(&self) -> String {
        self.render(|s| utf8_percent_encode(s, SEGMENT).to_string())
    }

    fn render(&self, f: impl Fn(&str) -> String) -> String {
        let mut out = String::new();
        for s in &self.segments {
            out.push('/');
            out.push_str(&f(s));
        }
        if self.trailing_slash || self.segments.is_empty() {
            out.push('/');
        }
        out
    }

    /// Whether the path could name IAM or credential data in any spelling:
    /// such paths are answered by the agent and never proxied. Deliberately
    /// blunt: any path whose letters and digits, lowercased, spell `iam` or
    /// `credentials` within a segment (so `/latest/Meta-Data/I%41M`,
    /// `/iam`, `identity-credentials/...` all count). The price is that an
    /// allow-listed tag or path containing those letters is not proxied.
    pub fn is_sensitive(&self) -> bool {
        self.segments.iter().any(|seg| {
            let squashed: String = seg
                .to_lowercase()
                .chars()
                .filter(char::is_ascii_alphanumeric)
                .collect();
            squashed.contains("iam") || squashed.contains("credentials")
        })
    }
}

// ---------------------------------------------------------------------------
// Errors -> HTTP, in one place

/// Why a request was not answered with data.
#[derive(Debug)]
enum Reject {
    BadRequest(String),
    Unauthorized,
    Forbidden(&'static str),
    NotFound,
    MethodNotAllowed,
    /// A server answered with an error.
    Server(String),
    /// No server answered.
    BadGateway(String),
    /// The deadline passed before a server answered.
    GatewayTimeout,
    Internal(String),
}

impl Reject {
    fn status(&self) -> StatusCode {
        match self {
            Reject::BadRequest(_) => StatusCode::BAD_REQUEST,
            Reject::Unauthorized => StatusCode::UNAUTHORIZED,
            Reject::Forbidden(_) => StatusCode::FORBIDDEN,
            Reject::NotFound => StatusCode::NOT_FOUND,
            Reject::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Reject::Server(_) | Reject::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            Reject::BadGateway(_) => StatusCode::BAD_GATEWAY,
            Reject::GatewayTimeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    fn from_failure(f: Failure) -> Reject {
        match f.err {
            ClientError::NotFound => Reject::NotFound,
            ClientError::Forbidden => Reject::Forbidden("forbidden by policy"),
            ClientError::Server(m) => Reject::Server(m),
            ClientError::Unavailable(_) if f.interrupted => Reject::GatewayTimeout,
            ClientError::Unavailable(m) => Reject::BadGateway(m),
        }
    }
}

impl IntoResponse for Reject {
    fn into_response(self) -> Response {
        let status = self.status();
        // Bodies are short and never contain upstream data.
        let body = match &self {
            Reject::BadRequest(m) => m.clone(),
            Reject::Forbidden(m) => (*m).to_string(),
            Reject::Server(m) => format!("error fetching from kiam server: {m}"),
            Reject::BadGateway(m) => format!("no kiam server answered: {m}"),
            Reject::Internal(m) => m.clone(),
            _ => status.canonical_reason().unwrap_or("error").to_string(),
        };
        (
            status,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            body,
        )
            .into_response()
    }
}

// ---------------------------------------------------------------------------
// Retries

/// A failed exchange with the servers.
#[derive(Debug)]
struct Failure {
    err: ClientError,
    /// The deadline cut an attempt short (504) rather than every attempt
    /// failing outright (502 when no server answered).
    interrupted: bool,
    /// Some server answered at some point (so no fallback).
    answered: bool,
}

/// Calls `op` with backoff until it succeeds, `stop` says to stop, or the
/// deadline passes. kiam retried with 5 ms initial backoff; so do we, but
/// inside a budget SDKs will wait for.
async fn retry<T, F, Fut>(
    deadline: Instant,
    mut op: F,
    mut stop: impl FnMut(&ClientError) -> bool,
) -> Result<T, Failure>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, ClientError>>,
{
    let mut backoff = Duration::from_millis(5);
    let mut last: Option<ClientError> = None;
    let mut answered = false;
    let mut interrupted = false;
    loop {
        match tokio::time::timeout_at(deadline, op()).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) => {
                answered |= e.answered();
                if stop(&e) {
                    return Err(Failure {
                        err: e,
                        interrupted: false,
                        answered,
                    });
                }
                last = Some(e);
            }
            Err(_) => {
                interrupted = true;
                break;
            }
        }
        if Instant::now() + backoff >= deadline {
            break;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_millis(200));
    }
    let err = last.unwrap_or_else(|| {
        ClientError::Unavailable("no kiam server answered before the deadline".into())
    });
    Err(Failure {
        err,
        interrupted,
        answered,
    })
}

// ---------------------------------------------------------------------------
// Dispatch

/// Handler names used as metric labels (kiam's where kiam had the handler).
mod handler {
    pub const CREDENTIALS: &str = "credentials";
    pub const CREDENTIALS_EXTENDED: &str = "credentialsExtended";
    pub const ROLE_NAME: &str = "roleName";
    pub const HEALTH: &str = "health";
    pub const PROXY: &str = "proxy";
    pub const IAM_INFO: &str = "iamInfo";
    pub const IAM: &str = "iam";
    pub const TOKEN: &str = "token";
}

async fn dispatch(AxumState(state): AxumState<Arc<State>>, req: Request) -> Response {
    let (parts, _body) = req.into_parts();
    let path = match NormalPath::parse(parts.uri.path()) {
        Ok(p) => p,
        Err(e) => return Reject::BadRequest(e.to_string()).into_response(),
    };
    let segs: Vec<&str> = path.segments.iter().map(String::as_str).collect();
    let query = query_params(&parts.uri);
    let get_like = parts.method == Method::GET || parts.method == Method::HEAD;

    // Probes: no caller identity, no token.
    match segs.as_slice() {
        ["ping"] if get_like => return "pong".into_response(),
        ["health"] if get_like => {
            let start = Instant::now();
            let resp = health(&state, query.get("deep").is_some_and(|v| !v.is_empty())).await;
            return state.finish(handler::HEALTH, start, resp);
        }
        _ => {}
    }

    let caller = match caller_ip(&state.cfg, &parts.extensions, &query) {
        Ok(ip) => ip,
        Err(r) => return r.into_response(),
    };

    if let [_, "api", "token"] = segs.as_slice() {
        if parts.method == Method::PUT {
            let start = Instant::now();
            let resp = put_token(&state, caller, &parts.headers);
            return state.finish(handler::TOKEN, start, resp);
        }
    }

    // IMDSv2: a token, if sent, must be good; with --require-imdsv2 it must be sent.
    let token_ok = match parts.headers.get(TOKEN_HEADER) {
        Some(t) => state.tokens.verify(caller, t.as_bytes()).is_ok(),
        None => !state.cfg.require_imdsv2,
    };
    if !token_ok {
        tracing::info!(pod.ip = %caller, "refused request without a valid IMDSv2 token");
        return Reject::Unauthorized.into_response();
    }

    if let [version, "meta-data", "iam", rest @ ..] = segs.as_slice() {
        return iam(
            &state,
            caller,
            &parts.method,
            version,
            rest,
            &path,
            &parts.uri,
        )
        .await;
    }
    if path.is_sensitive() {
        let start = Instant::now();
        return state.finish(handler::IAM, start, Err(Reject::NotFound));
    }
    let start = Instant::now();
    let resp = proxy(&state, &parts.method, &path, &parts.headers).await;
    state.finish(handler::PROXY, start, resp)
}

impl State {
    /// Records kiam's per-handler metrics and renders the answer.
    fn finish(
        &self,
        handler: &'static str,
        start: Instant,
        resp: Result<Response, Reject>,
    ) -> Response {
        let resp = match resp {
            Ok(r) => r,
            Err(rej) => rej.into_response(),
        };
        let status = resp.status();
        self.metrics
            .latency
            .get_or_create(&HandlerLabel { handler })
            .observe(start.elapsed().as_secs_f64());
        self.metrics
            .responses
            .get_or_create(&ResponseLabels {
                handler,
                code: status.as_u16().to_string(),
            })
            .inc();
        if status == StatusCode::OK {
            Metrics::inc(&self.metrics.success, handler);
        }
        resp
    }
}

fn query_params(uri: &Uri) -> HashMap<String, String> {
    Query::<HashMap<String, String>>::try_from_uri(uri)
        .map(|q| q.0)
        .unwrap_or_default()
}

/// The pod's IP: the connection's source address, or `?ip=` when allowed.
fn caller_ip(
    cfg: &Config,
    extensions: &http::Extensions,
    query: &HashMap<String, String>,
) -> Result<IpAddr, Reject> {
    if cfg.allow_ip_query {
        if let Some(ip) = query.get("ip").filter(|v| !v.is_empty()) {
            return ip
                .parse::<IpAddr>()
                .map(|ip| ip.to_canonical())
                .map_err(|_| Reject::BadRequest(format!("?ip={ip:?} is not an IP address")));
        }
    }
    extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0)
        .or_else(|| extensions.get::<MockConnectInfo<SocketAddr>>().map(|m| m.0))
        .map(|a| a.ip().to_canonical())
        .ok_or_else(|| Reject::Internal("no caller address on the connection".into()))
}

fn put_token(state: &State, caller: IpAddr, headers: &HeaderMap) -> Result<Response, Reject> {
    // EC2 refuses token requests that went through a proxy.
    if headers.contains_key("x-forwarded-for") {
        return Err(Reject::Forbidden("Forbidden"));
    }
    let ttl = Tokens::parse_ttl(headers.get(TTL_HEADER).map(HeaderValue::as_bytes))
        .map_err(|e: TokenError| Reject::BadRequest(e.to_string()))?;
    let token = state.tokens.mint(caller, Duration::from_secs(ttl));
    Ok((
        [
            (header::CONTENT_TYPE, HeaderValue::from_static("text/plain")),
            (
                header::HeaderName::from_static(TTL_HEADER),
                HeaderValue::from(ttl),
            ),
        ],
        token,
    )
        .into_response())
}

async fn iam(
    state: &State,
    caller: IpAddr,
    method: &Method,
    version: &str,
    rest: &[&str],
    path: &NormalPath,
    uri: &Uri,
) -> Response {
    let start = Instant::now();
    let name = match rest {
        ["security-credentials", ..] if rest.len() > 1 => handler::CREDENTIALS,
        ["security-credentials-extended", ..] if rest.len() > 1 => handler::CREDENTIALS_EXTENDED,
        ["security-credentials" | "security-credentials-extended"] => handler::ROLE_NAME,
        ["info"] => handler::IAM_INFO,
        _ => handler::IAM,
    };
    if method != Method::GET && method != Method::HEAD {
        return state.finish(name, start, Err(Reject::MethodNotAllowed));
    }
    let resp = match rest {
        [] => iam_listing(state, caller).await,
        [listing @ ("security-credentials" | "security-credentials-extended")] => {
            if path.trailing_slash {
                role_name(state, caller).await
            } else {
                // kiam answers the slash-less listing with a redirect.
                let mut location = format!("/{version}/meta-data/iam/{listing}/");
                location = NormalPath::parse(&location)
                    .map(|p| p.encoded())
                    .unwrap_or(location);
                if let Some(q) = uri.query() {
                    location.push('?');
                    location.push_str(q);
                }
                Ok((
                    StatusCode::MOVED_PERMANENTLY,
                    [(header::LOCATION, location)],
                )
                    .into_response())
            }
        }
        ["security-credentials", role @ ..] => {
            credentials(state, caller, &role.join("/"), false).await
        }
        ["security-credentials-extended", role @ ..] => {
            credentials(state, caller, &role.join("/"), true).await
        }
        ["info"] => iam_info(state, caller).await,
        _ => Err(Reject::NotFound),
    };
    state.finish(name, start, resp)
}

/// The pod's role, from a server or (while none answers) the fallback.
async fn find_role(state: &State, caller: IpAddr, handler: &'static str) -> Result<String, Reject> {
    let deadline = Instant::now() + state.cfg.deadline;
    let fallback = &state.fallback;
    let result = retry(
        deadline,
        || state.client.get_pod_role(caller),
        // Serve a kept role at once rather than making the pod wait out
        // an outage; `no pod found` is retried (start-up race), as kiam did.
        |e| matches!(e, ClientError::Unavailable(_)) && fallback.role(caller).is_some(),
    )
    .await;
    match result {
        Ok(Some(role)) => {
            fallback.remember_role(caller, &role);
            Ok(role)
        }
        Ok(None) => {
            fallback.forget_ip(caller);
            Metrics::inc(&state.metrics.empty_role, handler);
            tracing::info!(pod.ip = %caller, "pod has no role");
            Err(Reject::NotFound)
        }
        Err(f) => {
            if matches!(f.err, ClientError::NotFound) {
                fallback.forget_ip(caller);
            }
            if !f.answered {
                if let Some(role) = fallback.role(caller) {
                    Metrics::inc(&state.metrics.stale_served, handler);
                    tracing::warn!(pod.ip = %caller, pod.iam.role = %role, "no kiam server answered; serving the last known role");
                    return Ok(role);
                }
            }
            Metrics::inc(&state.metrics.find_role_errors, handler);
            tracing::warn!(pod.ip = %caller, error = %f.err, "error finding role for pod");
            Err(Reject::from_failure(f))
        }
    }
}

/// What SDKs list: the role name, no trailing newline. A leading `/` (the
/// `/name` annotation form) is dropped so that the URL SDKs build from it
/// has no empty segment; servers resolve both forms to the same ARN.
fn listed(role: &str) -> &str {
    role.trim_start_matches('/')
}

async fn role_name(state: &State, caller: IpAddr) -> Result<Response, Reject> {
    let role = find_role(state, caller, handler::ROLE_NAME).await?;
    Ok(text(listed(&role).to_string()))
}

async fn iam_listing(state: &State, caller: IpAddr) -> Result<Response, Reject> {
    let role = find_role(state, caller, handler::IAM).await?;
    let mut body = String::new();
    if RoleArn::parse(&role).is_some() {
        body.push_str("info\n");
    }
    body.push_str("security-credentials/");
    Ok(text(body))
}

async fn credentials(
    state: &State,
    caller: IpAddr,
    role: &str,
    extended: bool,
) -> Result<Response, Reject> {
    let handler = if extended {
        handler::CREDENTIALS_EXTENDED
    } else {
        handler::CREDENTIALS
    };
    if role.is_empty() {
        return Err(Reject::NotFound);
    }
    let deadline = Instant::now() + state.cfg.deadline;
    let fallback = &state.fallback;
    let result = retry(
        deadline,
        || state.client.get_pod_credentials(caller, role),
        |e| match e {
            // A policy denial is final: answering at once lets SDKs move on.
            ClientError::Forbidden => true,
            ClientError::Unavailable(_) => fallback.credentials(caller, role).is_some(),
            _ => false,
        },
    )
    .await;
    let creds = match result {
        Ok(c) => {
            fallback.remember_credentials(caller, role, &c);
            c
        }
        Err(f) => {
            Metrics::inc(&state.metrics.credential_fetch_errors, handler);
            match &f.err {
                ClientError::NotFound => fallback.forget_ip(caller),
                ClientError::Forbidden => fallback.forget(caller, role),
                _ => {}
            }
            if !f.answered {
                if let Some(c) = fallback.credentials(caller, role) {
                    Metrics::inc(&state.metrics.stale_served, handler);
                    tracing::warn!(pod.ip = %caller, pod.iam.role = %role, "no kiam server answered; serving the last good credentials");
                    return Ok(credentials_json(&c, role, extended));
                }
            }
            tracing::warn!(pod.ip = %caller, pod.iam.requestedRole = %role, error = %f.err, "error fetching credentials");
            if matches!(f.err, ClientError::Forbidden)
                && !is_pods_role(state, caller, role, deadline).await
            {
                // Like EC2 for a role that is not the instance's.
                return Err(Reject::NotFound);
            }
            return Err(Reject::from_failure(f));
        }
    };
    tracing::debug!(pod.ip = %caller, pod.iam.role = %role, "served credentials");
    Ok(credentials_json(&creds, role, extended))
}

/// After a denial: is `role` at least the pod's own role? One quick
/// question, no retries; when unsure, say yes (403 rather than 404).
async fn is_pods_role(state: &State, caller: IpAddr, role: &str, deadline: Instant) -> bool {
    match tokio::time::timeout_at(deadline, state.client.get_pod_role(caller)).await {
        Ok(Ok(Some(actual))) => same_role(&actual, role),
        Ok(Ok(None)) => false,
        _ => true,
    }
}

/// Times as the EC2 metadata API prints them.
fn imds_time(s: &str) -> String {
    // kiam servers already send this form; only others are re-rendered
    // (parsing and formatting on every answer was measurable per request).
    if is_imds_form(s) {
        return s.to_string();
    }
    match s.parse::<Timestamp>() {
        Ok(t) => t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string(),
        Err(_) => s.to_string(),
    }
}

/// Exactly `YYYY-MM-DDTHH:MM:SSZ` (digits where digits go).
fn is_imds_form(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 20
        && b.iter().enumerate().all(|(i, c)| match i {
            4 | 7 => *c == b'-',
            10 => *c == b'T',
            13 | 16 => *c == b':',
            19 => *c == b'Z',
            _ => c.is_ascii_digit(),
        })
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct CredentialsDoc<'a> {
    code: &'static str,
    last_updated: String,
    #[serde(rename = "Type")]
    kind: &'static str,
    access_key_id: &'a str,
    secret_access_key: &'a str,
    token: &'a str,
    expiration: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    account_id: Option<&'a str>,
}

fn credentials_json(c: &Credentials, role: &str, extended: bool) -> Response {
    let arn = RoleArn::parse(role);
    let doc = CredentialsDoc {
        code: "Success",
        last_updated: imds_time(&c.last_updated),
        kind: "AWS-HMAC",
        access_key_id: &c.access_key_id,
        secret_access_key: &c.secret_access_key,
        token: &c.token,
        expiration: imds_time(&c.expiration),
        // Only when the role names its account: a guessed account would
        // send account-routed SDK calls to the wrong place.
        account_id: if extended {
            arn.as_ref().map(|a| a.account)
        } else {
            None
        },
    };
    let body = serde_json::to_string(&doc).expect("plain strings serialise");
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// `arn:<partition>:iam::<account>:role/<path/name>`.
struct RoleArn<'a> {
    partition: &'a str,
    account: &'a str,
    name: &'a str,
}

impl<'a> RoleArn<'a> {
    fn parse(role: &'a str) -> Option<Self> {
        let mut parts = role.splitn(6, ':');
        let (arn, partition, service, region, account, resource) = (
            parts.next()?,
            parts.next()?,
            parts.next()?,
            parts.next()?,
            parts.next()?,
            parts.next()?,
        );
        let name = resource.strip_prefix("role/")?;
        let ok = arn == "arn"
            && !partition.is_empty()
            && service == "iam"
            && region.is_empty()
            && account.len() == 12
            && account.bytes().all(|b| b.is_ascii_digit())
            && !name.is_empty();
        ok.then_some(RoleArn {
            partition,
            account,
            name,
        })
    }
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct InfoDoc {
    code: &'static str,
    last_updated: String,
    instance_profile_arn: String,
    instance_profile_id: String,
}

/// `iam/info` for the pod's role. The agent only knows the role as
/// annotated, so this is answered when the role is a full ARN (the account
/// is then known) and is 404 otherwise: never the node's profile, and never
/// a guessed account. The profile ARN and id are derived from the role
/// (there is no real instance profile behind a pod).
async fn iam_info(state: &State, caller: IpAddr) -> Result<Response, Reject> {
    let role = find_role(state, caller, handler::IAM_INFO).await?;
    let Some(arn) = RoleArn::parse(&role) else {
        return Err(Reject::NotFound);
    };
    let profile = format!(
        "arn:{}:iam::{}:instance-profile/{}",
        arn.partition, arn.account, arn.name
    );
    let digest = ring::digest::digest(&ring::digest::SHA256, profile.as_bytes());
    const B32: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let id: String = digest.as_ref()[..17]
        .iter()
        .map(|b| B32[(b & 31) as usize] as char)
        .collect();
    let doc = InfoDoc {
        code: "Success",
        last_updated: Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string(),
        instance_profile_arn: profile,
        instance_profile_id: format!("AIPA{id}"),
    };
    let body = serde_json::to_string(&doc).expect("plain strings serialise");
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}

async fn health(state: &State, deep: bool) -> Result<Response, Reject> {
    let deadline = Instant::now() + state.cfg.health_deadline;
    if deep {
        let msg = retry(deadline, || state.client.health(), |_| false)
            .await
            .map_err(|f| Reject::Internal(format!("server health: {}", f.err)))?;
        if msg != "ok" {
            return Err(Reject::Internal(format!("server health: {msg}")));
        }
    }
    let no_headers = HeaderMap::new();
    let fetch = state
        .upstream
        .fetch(&Method::GET, "/latest/meta-data/instance-id", &no_headers);
    match tokio::time::timeout_at(deadline, fetch).await {
        Ok(Ok(resp)) if resp.status() == StatusCode::OK => {
            Ok(text(String::from_utf8_lossy(resp.body()).into_owned()))
        }
        Ok(Ok(resp)) => Err(Reject::Internal(format!(
            "metadata endpoint answered {} for instance-id",
            resp.status()
        ))),
        Ok(Err(e)) => Err(Reject::Internal(e.to_string())),
        Err(_) => Err(Reject::Internal(
            "metadata endpoint did not answer in time".into(),
        )),
    }
}

async fn proxy(
    state: &State,
    method: &Method,
    path: &NormalPath,
    headers: &HeaderMap,
) -> Result<Response, Reject> {
    let decoded = path.decoded();
    if !state.cfg.allow_route.is_match(&decoded) {
        state.metrics.proxy_blocked.inc();
        tracing::debug!(path = %decoded, "request blocked by --allow-route-regexp");
        return Err(Reject::NotFound);
    }
    if method != Method::GET && method != Method::HEAD {
        return Err(Reject::MethodNotAllowed);
    }
    match state.upstream.fetch(method, &path.encoded(), headers).await {
        Ok(up) => {
            let (parts, body) = up.into_parts();
            let mut resp = Response::new(Body::from(body));
            *resp.status_mut() = parts.status;
            *resp.headers_mut() = response_headers(&parts.headers);
            Ok(resp)
        }
        Err(UpstreamError::Timeout(_)) => Err(Reject::GatewayTimeout),
        Err(e) => Err(Reject::BadGateway(e.to_string())),
    }
}

fn text(body: String) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(s: &str) -> String {
        NormalPath::parse(s).unwrap().decoded()
    }

    #[test]
    fn normalisation() {
        assert_eq!(
            norm("/latest/meta-data/iam/security-credentials/"),
            "/latest/meta-data/iam/security-credentials/"
        );
        assert_eq!(
            norm("/latest/meta-data/iam/security-credentials"),
            "/latest/meta-data/iam/security-credentials"
        );
        assert_eq!(
            norm("//latest///meta-data/./iam/x/../security-credentials/"),
            "/latest/meta-data/iam/security-credentials/"
        );
        assert_eq!(
            norm("/latest/meta-data%2Fiam%2fsecurity-credentials"),
            "/latest/meta-data/iam/security-credentials"
        );
        assert_eq!(
            norm("/latest/meta-data/%252e%252e/meta-data/iam/"),
            "/latest/meta-data/iam/"
        );
        assert_eq!(
            norm("/latest/meta-data/iam;x=1/info"),
            "/latest/meta-data/iam/info"
        );
        assert_eq!(norm("/latest\\meta-data\\iam"), "/latest/meta-data/iam");
        assert_eq!(norm("/../../.."), "/");
        assert_eq!(
            norm("/latest/meta-data/iam/security-credentials/.."),
            "/latest/meta-data/iam/"
        );
        assert_eq!(NormalPath::parse("/a%00b"), Err(PathError::Control));
        assert_eq!(NormalPath::parse("/a%ffb"), Err(PathError::NotUtf8));
        assert_eq!(
            NormalPath::parse("/a%2525252525252Fb"),
            Err(PathError::TooEncoded)
        );
    }

    #[test]
    fn sensitive_paths() {
        for p in [
            "/latest/meta-data/iam/",
            "/latest/Meta-Data/IAM/info",
            "/latest/meta_data/iam",
            "/x/meta-data/iamfoo",
            "/latest/meta-data/identity-credentials/ec2/security-credentials/ec2-instance",
            "/latest/meta-data/iam%20/security-credentials",
            "/meta-data/iam",
        ] {
            assert!(NormalPath::parse(p).unwrap().is_sensitive(), "{p}");
        }
        for p in [
            "/latest/meta-data/instance-id",
            "/latest/user-data",
            "/latest/meta-data/placement/region",
        ] {
            assert!(!NormalPath::parse(p).unwrap().is_sensitive(), "{p}");
        }
    }

    #[test]
    fn encoded_round_trips() {
        let p = NormalPath::parse("/latest/a%20b/c%3Fd/").unwrap();
        assert_eq!(p.encoded(), "/latest/a%20b/c%3Fd/");
        assert_eq!(NormalPath::parse(&p.encoded()).unwrap(), p);
    }

    #[test]
    fn role_arns() {
        let a = RoleArn::parse("arn:aws:iam::123456789012:role/path/name").unwrap();
        assert_eq!(
            (a.partition, a.account, a.name),
            ("aws", "123456789012", "path/name")
        );
        assert!(RoleArn::parse("name").is_none());
        assert!(RoleArn::parse("arn:aws:iam::12345:role/x").is_none());
        assert!(RoleArn::parse("arn:aws:s3:::bucket").is_none());
    }

    #[test]
    fn imds_times() {
        assert_eq!(imds_time("2024-01-02T03:04:05Z"), "2024-01-02T03:04:05Z");
        assert!(!is_imds_form("2024-01-02T03:04:5Z0"));
        assert!(!is_imds_form("2024-01-02 03:04:05Z"));
        assert_eq!(
            imds_time("2024-01-02T03:04:05.678Z"),
            "2024-01-02T03:04:05Z"
        );
        assert_eq!(
            imds_time("2024-01-02T04:04:05+01:00"),
            "2024-01-02T03:04:05Z"
        );
        assert_eq!(imds_time("garbage"), "garbage");
    }
}
