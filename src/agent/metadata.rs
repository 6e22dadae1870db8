//! The metadata API pods see: kiam's routes, IMDSv2, and a deny-by-default
//! proxy to the node's real metadata service.
//!
//! The surprise: routing is not done on the path as sent. Every path is
//! first normalised ([`NormalPath`]: percent-decoding to a fixpoint, `\`
//! as `/`, `;` parameters cut, empty, `.` and `..` segments resolved) and
//! every decision — which handler, whether the allow-list matches, what is
//! sent upstream — is taken on that one normalised form. Anything that
//! looks like `meta-data/iam` or security credentials in any spelling is
//! answered here (404 when unknown) and never proxied, so the node's role
//! cannot leak through an encoding trick.
//!
//! A pod is identified only by the connection's source address (or `?ip=`
//! with `--allow-ip-query`); headers such as `X-Forwarded-For`, `Forwarded`
//! or `Host` are never consulted.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::connect_info::{ConnectInfo, MockConnectInfo};
use axum::extract::{Query, Request, State};
use axum::response::{IntoResponse, Response};
use axum::Router;
use http::header::{self, HeaderValue};
use http::{HeaderMap, Method, StatusCode, Uri};
use regex::Regex;
use tokio::time::Instant;

use super::client::{ClientError, KiamClient, PodRole};
use super::documents;
use super::fallback::Fallback;
use super::imdsv2::{TokenError, Tokens, TOKEN_HEADER, TTL_HEADER};
use super::metrics::Metrics;
use super::path::NormalPath;
use super::proxy::{response_headers, Upstream, UpstreamError};
use super::retry::{retry, RetryFailure};
use crate::wire::{Check, FORBIDDEN_BY_POLICY};

mod container;
mod health;
mod warm;

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

/// What every request handler shares: the flags, the servers, the
/// upstream, the fallback, the token key and the metrics. One per agent,
/// shared by all connections.
pub struct RouterContext {
    cfg: Config,
    client: Arc<dyn KiamClient>,
    upstream: Arc<Upstream>,
    fallback: Fallback,
    /// Answers servers said may be reused for a while (the warm path).
    warm: warm::Warm,
    tokens: Tokens,
    metrics: Metrics,
    /// The node's instance-id, once the metadata service gave it.
    instance_id: std::sync::OnceLock<String>,
}

impl RouterContext {
    pub fn new(
        cfg: Config,
        client: Arc<dyn KiamClient>,
        upstream: Arc<Upstream>,
        metrics: Metrics,
    ) -> Arc<Self> {
        Arc::new(RouterContext {
            fallback: Fallback::new(cfg.stale_window, metrics.fallback_pods()),
            warm: warm::Warm::default(),
            tokens: Tokens::new(),
            cfg,
            client,
            upstream,
            metrics,
            instance_id: std::sync::OnceLock::new(),
        })
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
pub fn router(ctx: Arc<RouterContext>) -> Router {
    Router::new().fallback(dispatch).with_state(ctx)
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
    /// A server answered with an error (its message is for the log only).
    Server,
    /// No server answered, or the node's metadata service did not: a short
    /// reason, never an address.
    BadGateway(&'static str),
    /// The deadline passed before a server answered.
    GatewayTimeout,
    /// Something on the agent's side failed: a short text of our own.
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
            Reject::Server | Reject::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            Reject::BadGateway(_) => StatusCode::BAD_GATEWAY,
            Reject::GatewayTimeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    fn from_failure(f: RetryFailure) -> Reject {
        match f.err {
            ClientError::NotFound => Reject::NotFound,
            // Not the pod's role: 404, as EC2 answers for a role that is not
            // the instance's.
            ClientError::Forbidden(Some(Check::AnnotatedRole)) => Reject::NotFound,
            // The pod's role, but its namespace does not permit it. A Go
            // kiam server never says which check refused, so its denials
            // are all 403: telling them apart would cost a second call.
            ClientError::Forbidden(Some(Check::NamespacePermitted) | None) => {
                Reject::Forbidden(FORBIDDEN_BY_POLICY)
            }
            ClientError::Server(_) | ClientError::Final(_) => Reject::Server,
            ClientError::Timeout(_) => Reject::GatewayTimeout,
            ClientError::Unavailable(_) if f.interrupted => Reject::GatewayTimeout,
            ClientError::Unavailable(_) => Reject::BadGateway(NO_SERVER_ANSWERED),
        }
    }
}

impl IntoResponse for Reject {
    fn into_response(self) -> Response {
        let status = self.status();
        // Bodies are short and never contain upstream data, server
        // addresses or what a server said (it may name the server's own
        // role or another pod): those go to the agent's log.
        let body = match &self {
            Reject::BadRequest(m) => m.clone(),
            Reject::Forbidden(m) => (*m).to_string(),
            Reject::Server => "kiam server error".to_string(),
            Reject::BadGateway(m) => (*m).to_string(),
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

/// The body for a request no kiam server could be reached for.
const NO_SERVER_ANSWERED: &str = "no kiam server answered";

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
    pub const CONTAINER_CREDENTIALS: &str = "containerCredentials";
}

async fn dispatch(State(ctx): State<Arc<RouterContext>>, req: Request) -> Response {
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
            let deep = query.get("deep").is_some_and(|v| !v.is_empty());
            let resp = health::health(&ctx, deep).await;
            return ctx.finish(handler::HEALTH, start, resp);
        }
        _ => {}
    }

    let caller = match caller_ip(&ctx.cfg, &parts.extensions, &query) {
        Ok(ip) => ip,
        Err(r) => return r.into_response(),
    };

    // The container credentials path: the token in `Authorization`, not
    // the address or an IMDSv2 token, says who the pod is.
    if let ["v1", "credentials"] = segs.as_slice() {
        return container::serve(&ctx, caller, &parts.method, &parts.headers).await;
    }

    if let [_, "api", "token"] = segs.as_slice() {
        if parts.method == Method::PUT {
            let start = Instant::now();
            let resp = put_token(&ctx, caller, &parts.headers);
            return ctx.finish(handler::TOKEN, start, resp);
        }
    }

    // IMDSv2: a token, if sent, must be good; with --require-imdsv2 it must be sent.
    let token_ok = match parts.headers.get(TOKEN_HEADER) {
        Some(t) => ctx.tokens.verify(caller, t.as_bytes()).is_ok(),
        None => !ctx.cfg.require_imdsv2,
    };
    if !token_ok {
        tracing::info!(pod.ip = %caller, "refused request without a valid IMDSv2 token");
        return Reject::Unauthorized.into_response();
    }

    if let [version, "meta-data", "iam", rest @ ..] = segs.as_slice() {
        return iam(
            &ctx,
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
        return ctx.finish(handler::IAM, start, Err(Reject::NotFound));
    }
    let start = Instant::now();
    let resp = proxy(&ctx, &parts.method, &path, &parts.headers).await;
    ctx.finish(handler::PROXY, start, resp)
}

impl RouterContext {
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
        self.metrics
            .answered(handler, start.elapsed(), resp.status());
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

fn put_token(ctx: &RouterContext, caller: IpAddr, headers: &HeaderMap) -> Result<Response, Reject> {
    // EC2 refuses token requests that went through a proxy.
    if headers.contains_key("x-forwarded-for") {
        return Err(Reject::Forbidden("Forbidden"));
    }
    let ttl = Tokens::parse_ttl(headers.get(TTL_HEADER).map(HeaderValue::as_bytes))
        .map_err(|e: TokenError| Reject::BadRequest(e.to_string()))?;
    let token = ctx.tokens.mint(caller, Duration::from_secs(ttl));
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
    ctx: &RouterContext,
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
        return ctx.finish(name, start, Err(Reject::MethodNotAllowed));
    }
    let resp = match rest {
        [] => iam_listing(ctx, caller).await,
        [listing @ ("security-credentials" | "security-credentials-extended")] => {
            if path.trailing_slash {
                role_name(ctx, caller).await
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
            credentials(ctx, caller, &role.join("/"), false).await
        }
        ["security-credentials-extended", role @ ..] => {
            credentials(ctx, caller, &role.join("/"), true).await
        }
        ["info"] => iam_info(ctx, caller).await,
        _ => Err(Reject::NotFound),
    };
    ctx.finish(name, start, resp)
}

/// The pod's role: kept from a server's recent answer (the warm path), from
/// a server, or (while none answers) from the fallback.
async fn find_role(
    ctx: &RouterContext,
    caller: IpAddr,
    handler: &'static str,
) -> Result<PodRole, Reject> {
    if let Some(kept) = ctx.warm.role(caller) {
        return match kept {
            Some(role) => Ok(role),
            None => {
                ctx.metrics.empty_role(handler);
                Err(Reject::NotFound)
            }
        };
    }
    let deadline = Instant::now() + ctx.cfg.deadline;
    let fallback = &ctx.fallback;
    let warm = &ctx.warm;
    let result = retry(
        deadline,
        |deadline| {
            asked(fallback, warm, caller, async move {
                ctx.client.get_pod_role_answer(caller, deadline).await
            })
        },
        // Serve a kept role at once rather than making the pod wait out
        // an outage; `no pod found` is asked again a few times (start-up
        // race), as kiam did, but not until the deadline.
        |e| matches!(e, ClientError::Unavailable(_)) && fallback.role(caller).is_some(),
    )
    .await;
    let result = result.map(|(answer, at)| {
        warm.keep_role(caller, &answer, at);
        (answer.value, at)
    });
    match result {
        Ok((Some(role), at)) => {
            fallback.remember_role(caller, &role, at);
            Ok(role)
        }
        Ok((None, _)) => {
            fallback.forget_ip(caller);
            ctx.metrics.empty_role(handler);
            tracing::info!(pod.ip = %caller, "pod has no role");
            Err(Reject::NotFound)
        }
        Err(f) => {
            if !f.answered {
                if let Some(role) = fallback.role(caller) {
                    ctx.metrics.stale_served(handler);
                    tracing::warn!(pod.ip = %caller, pod.iam.role = %role.name, "no kiam server answered; serving the last known role");
                    return Ok(role);
                }
            }
            ctx.metrics.find_role_error(handler);
            tracing::warn!(pod.ip = %caller, error = %f.err, "error finding role for pod");
            Err(Reject::from_failure(f))
        }
    }
}

/// One attempt at asking the servers about `caller`, and when it was asked
/// (the fallback keeps an answer only if nothing was forgotten since). A
/// `no pod found` or a final refusal (e.g. several pods share the IP) in
/// any attempt drops what the fallback kept for the IP at once, not only
/// when it is the request's last answer: a later attempt that finds no
/// server must not serve the previous pod's answers.
///
/// Any refusal (those two, or `forbidden by policy`) drops the answers the
/// warm path kept for the IP.
async fn asked<T>(
    fallback: &Fallback,
    warm: &warm::Warm,
    caller: IpAddr,
    attempt: impl std::future::Future<Output = Result<T, ClientError>>,
) -> Result<(T, std::time::Instant), ClientError> {
    let at = std::time::Instant::now();
    match attempt.await {
        Ok(v) => Ok((v, at)),
        Err(e) => {
            if matches!(e, ClientError::NotFound | ClientError::Final(_)) {
                fallback.forget_ip(caller);
            }
            if matches!(
                e,
                ClientError::NotFound | ClientError::Final(_) | ClientError::Forbidden(_)
            ) {
                warm.forget_ip(caller);
            }
            Err(e)
        }
    }
}

/// What SDKs list: the role name, no trailing newline. A leading `/` (the
/// `/name` annotation form) is dropped so that the URL SDKs build from it
/// has no empty segment; servers resolve both forms to the same ARN.
fn listed(role: &str) -> &str {
    role.trim_start_matches('/')
}

async fn role_name(ctx: &RouterContext, caller: IpAddr) -> Result<Response, Reject> {
    let role = find_role(ctx, caller, handler::ROLE_NAME).await?;
    Ok(text(listed(&role.name).to_string()))
}

async fn iam_listing(ctx: &RouterContext, caller: IpAddr) -> Result<Response, Reject> {
    let role = find_role(ctx, caller, handler::IAM).await?;
    let mut body = String::new();
    if documents::role_arn(&role.name, Some(&role)).is_some() {
        body.push_str("info\n");
    }
    body.push_str("security-credentials/");
    Ok(text(body))
}

async fn credentials(
    ctx: &RouterContext,
    caller: IpAddr,
    role: &str,
    extended: bool,
) -> Result<Response, Reject> {
    if role.is_empty() {
        return Err(Reject::NotFound);
    }
    if !extended || documents::full_arn(role).is_some() {
        let rendered = fetch_credentials(ctx, caller, role, extended).await?;
        let body = rendered.body(|| documents::full_arn(role), extended);
        return Ok(documents::json_response(body));
    }
    // A bare name: its account is in the ARN the server resolved it to,
    // asked for alongside the credentials (or kept from a recent answer).
    let (rendered, pod) = tokio::join!(
        fetch_credentials(ctx, caller, role, extended),
        resolved_role(ctx, caller)
    );
    let rendered = rendered?;
    let arn = documents::role_arn(role, pod.as_ref());
    Ok(documents::json_response(rendered.body(|| arn, extended)))
}

/// The pod's role with the ARN a server resolved it to, for `AccountId`
/// only: `None` on any error (the credentials call decides the answer), and
/// the kept role only while no server answers, as [`find_role`] does.
async fn resolved_role(ctx: &RouterContext, caller: IpAddr) -> Option<PodRole> {
    if let Some(kept) = ctx.warm.role(caller) {
        return kept;
    }
    let deadline = Instant::now() + ctx.cfg.deadline;
    let at = std::time::Instant::now();
    match ctx.client.get_pod_role_answer(caller, deadline).await {
        Ok(answer) => {
            ctx.warm.keep_role(caller, &answer, at);
            answer.value
        }
        Err(ClientError::Unavailable(_)) => ctx.fallback.role(caller),
        Err(_) => None,
    }
}

/// The credentials for (`caller`, `role`), ready to render: kept from a
/// recent answer (the warm path), from a server, or (while none answers)
/// from the fallback.
async fn fetch_credentials(
    ctx: &RouterContext,
    caller: IpAddr,
    role: &str,
    extended: bool,
) -> Result<std::sync::Arc<warm::Rendered>, Reject> {
    let handler = if extended {
        handler::CREDENTIALS_EXTENDED
    } else {
        handler::CREDENTIALS
    };
    if let Some(kept) = ctx.warm.credentials(caller, role) {
        return Ok(kept);
    }
    let deadline = Instant::now() + ctx.cfg.deadline;
    let fallback = &ctx.fallback;
    let warm = &ctx.warm;
    let result = retry(
        deadline,
        |deadline| {
            asked(fallback, warm, caller, async move {
                ctx.client
                    .get_pod_credentials_answer(caller, role, deadline)
                    .await
            })
        },
        // Final answers (a policy denial, a refusal) end the loop by
        // themselves; an outage ends it at once when there is a kept answer.
        |e| {
            matches!(e, ClientError::Unavailable(_)) && fallback.credentials(caller, role).is_some()
        },
    )
    .await;
    let rendered = match result {
        Ok((answer, at)) => {
            fallback.remember_credentials(caller, role, &answer.value, at);
            warm.keep_credentials(caller, role, answer, at)
        }
        Err(f) => {
            ctx.metrics.credential_fetch_error(handler);
            if let ClientError::Forbidden(_) = &f.err {
                fallback.forget(caller, role);
            }
            if !f.answered {
                if let Some(c) = fallback.credentials(caller, role) {
                    ctx.metrics.stale_served(handler);
                    tracing::warn!(pod.ip = %caller, pod.iam.role = %role, "no kiam server answered; serving the last good credentials");
                    return Ok(warm::Rendered::unkept(c));
                }
            }
            tracing::warn!(pod.ip = %caller, pod.iam.requestedRole = %role, error = %f.err, "error fetching credentials");
            return Err(Reject::from_failure(f));
        }
    };
    tracing::debug!(pod.ip = %caller, pod.iam.role = %role, "served credentials");
    Ok(rendered)
}

/// `iam/info` for the pod's role: 404 unless its ARN is known (see
/// [`documents`]), never the node's profile.
async fn iam_info(ctx: &RouterContext, caller: IpAddr) -> Result<Response, Reject> {
    let role = find_role(ctx, caller, handler::IAM_INFO).await?;
    documents::iam_info(&role).ok_or(Reject::NotFound)
}

async fn proxy(
    ctx: &RouterContext,
    method: &Method,
    path: &NormalPath,
    headers: &HeaderMap,
) -> Result<Response, Reject> {
    let decoded = path.decoded();
    if !ctx.cfg.allow_route.is_match(&decoded) {
        ctx.metrics.proxy_blocked();
        tracing::debug!(path = %decoded, "request blocked by --allow-route-regexp");
        return Err(Reject::NotFound);
    }
    if method != Method::GET && method != Method::HEAD {
        return Err(Reject::MethodNotAllowed);
    }
    match ctx.upstream.fetch(method, &path.encoded(), headers).await {
        Ok(up) => {
            let (parts, body) = up.into_parts();
            let mut resp = Response::new(Body::from(body));
            *resp.status_mut() = parts.status;
            *resp.headers_mut() = response_headers(&parts.headers);
            Ok(resp)
        }
        Err(UpstreamError::Timeout(_)) => Err(Reject::GatewayTimeout),
        Err(e) => {
            tracing::warn!(error = %e, "proxy: the node's metadata service failed");
            Err(Reject::BadGateway("metadata endpoint unreachable"))
        }
    }
}

fn text(body: String) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], body).into_response()
}
