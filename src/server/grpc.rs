//! The `kiam.KiamService` gRPC service. Its one surprise: error *messages*
//! are part of the wire contract — Go kiam agents compare them verbatim
//! (`no pod found`, `forbidden by policy`) — so every refusal maps to a
//! status here, in one place, with those exact strings.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tonic::metadata::MetadataValue;
use tonic::{Code, Request, Response, Status};

use super::credentials::CredentialCache;
use super::events::{EventRecorder, Reason};
use super::explain::Sources;
use super::namespaces::NamespaceCache;
use super::pods::{FindError, PodCache};
use super::policy::{Decision, Policy};
use super::sts::{Credentials, StsError};
use super::token::{self, TokenError, TokenVerifier};
use crate::grpc_metrics::GrpcMetrics;
use crate::proto::kiam_service_server::KiamService;
use crate::proto::{
    Credentials as PbCredentials, ExplainRequest, Explanation, GetHealthRequest,
    GetPodCredentialsRequest, GetPodRoleRequest, GetTokenCredentialsRequest, HealthStatus, Role,
    TokenCredentials,
};
use crate::wire::{
    ec2_time, Check, DENIED_CHECK_KEY, FORBIDDEN_BY_POLICY, NODE_KEY, NO_POD_FOUND, REUSE_KEY,
    TOKEN_REFUSED,
};

/// Everything the service answers from.
pub(super) struct Service {
    pub pods: PodCache,
    pub namespaces: NamespaceCache,
    pub policy: Arc<Policy>,
    pub credentials: CredentialCache,
    pub events: EventRecorder,
    /// Verifies the tokens of the container credentials path.
    pub tokens: TokenVerifier,
    /// Set once both caches completed their first full list; until then
    /// every call is UNAVAILABLE so agents try another server.
    pub ready: Arc<AtomicBool>,
    pub metrics: GrpcMetrics,
}

fn code_of<T>(r: &Result<T, Status>) -> Code {
    r.as_ref().map_or_else(|s| s.code(), |_| Code::Ok)
}

fn parse_ip(ip: &str) -> Result<IpAddr, Status> {
    ip.trim().parse().map_err(|_| {
        // A status message travels in an HTTP/2 header: echo only the start
        // of what was sent, or a huge string breaks the stream.
        let shown: String = ip.chars().take(64).collect();
        let more = if shown.len() < ip.len() {
            format!(" ({} bytes)", ip.len())
        } else {
            String::new()
        };
        Status::invalid_argument(format!("ip {shown:?}{more} is not an IP address"))
    })
}

/// Maps a failed pod lookup to the status agents see. Only a server that
/// has not synced says UNAVAILABLE: everything here is an answer, and an
/// agent must never cover it with what it kept for this IP, which may be
/// the previous pod's. Messages are short and name no pod, namespace or
/// API address: Go kiam agents pass them on to the pod; the details are in
/// this server's log.
fn find_error(ip: IpAddr, e: FindError) -> Status {
    match e {
        FindError::NotFound => Status::not_found(NO_POD_FOUND),
        // The lookup logged which pods.
        FindError::Ambiguous { .. } => {
            Status::failed_precondition("several live pods share this IP; refusing to guess")
        }
        other => {
            tracing::warn!(pod.ip = %ip, error = %other, "finding pod failed");
            Status::internal("error finding the pod: the Kubernetes API did not answer in time")
        }
    }
}

/// Maps an STS failure to the status agents see: the AWS error code only
/// (the message can name this server's own role). A final refusal
/// (AccessDenied, a malformed policy) is FAILED_PRECONDITION so agents stop
/// asking; a transient one is INTERNAL: answered, worth retrying.
fn credentials_error(e: &StsError) -> Status {
    let code = e.code.as_deref().unwrap_or("STS error");
    let message = format!("error retrieving credentials: {code}");
    if e.retryable {
        Status::internal(message)
    } else {
        Status::failed_precondition(message)
    }
}

/// Kiam's `forbidden by policy`, plus (for our agents) which check refused,
/// so they answer 404 or 403 without asking again.
fn forbidden(check: Check) -> Status {
    let mut status = Status::permission_denied(FORBIDDEN_BY_POLICY);
    status
        .metadata_mut()
        .insert(DENIED_CHECK_KEY, MetadataValue::from_static(check.as_str()));
    status
}

/// Maps a token that identifies no pod to the status agents see: a refusal
/// of the token itself is UNAUTHENTICATED (the agent answers 401), its pod
/// gone is `no pod found` as on the metadata path, and a token that could
/// not be checked now is INTERNAL: answered, worth retrying. Messages are
/// the error's own words, which name nothing but the token's faults.
fn token_error(e: &TokenError) -> Status {
    match e {
        TokenError::PodGone => Status::not_found(NO_POD_FOUND),
        TokenError::Unverifiable(_) => Status::internal(e.to_string()),
        _ => Status::unauthenticated(format!("{TOKEN_REFUSED}: {e}")),
    }
}

fn to_proto(c: &Credentials) -> PbCredentials {
    PbCredentials {
        code: "Success".into(),
        r#type: "AWS-HMAC".into(),
        access_key_id: c.access_key_id.clone(),
        secret_access_key: c.secret_access_key.clone(),
        token: c.session_token.clone(),
        expiration: ec2_time(c.expiration),
        last_updated: ec2_time(c.last_updated),
    }
}

impl Service {
    fn ensure_ready(&self) -> Result<(), Status> {
        if self.ready.load(Ordering::Acquire) {
            Ok(())
        } else {
            Err(Status::unavailable(
                "kiam server is starting: Pod and Namespace caches not yet synced",
            ))
        }
    }

    /// `kiam explain`: answers before the first sync too, saying so.
    async fn explain(&self, req: ExplainRequest) -> Result<Explanation, Status> {
        let sources = Sources {
            pods: &self.pods,
            namespaces: &self.namespaces,
            policy: &self.policy,
            credentials: &self.credentials,
            events: &self.events,
            ready: self.ready.load(Ordering::Acquire),
        };
        sources.explain(req).await
    }

    async fn pod_role(
        &self,
        req: GetPodRoleRequest,
        node: Option<String>,
    ) -> Result<Reusable<Role>, Status> {
        self.ensure_ready()?;
        let ip = parse_ip(&req.ip)?;
        let pod = self
            .pods
            .find_by_ip_on(ip, node.as_deref())
            .await
            .map_err(|e| find_error(ip, e))?;
        let name = pod.role.as_deref().unwrap_or_default().to_string();
        // The resolved ARN lets agents answer `AccountId` and `iam/info` for
        // a bare name. Empty without a role, or for one that does not
        // resolve: the credentials call refuses that one, with the reason.
        let arn = match pod.role.as_deref() {
            Some(role) if !role.is_empty() => {
                self.policy.resolver().resolve(role).unwrap_or_else(|e| {
                    tracing::debug!(pod.namespace = %pod.namespace, pod.name = %pod.name, error = %e, "role does not resolve to an ARN");
                    String::new()
                })
            }
            _ => String::new(),
        };
        tracing::debug!(pod.namespace = %pod.namespace, pod.name = %pod.name, pod.ip = %ip, pod.iam.role = %name, pod.iam.arn = %arn, "found role");
        let reuse_until = self.pods.reuse_until(&pod, ip);
        Ok(Reusable {
            answer: Role { name, arn },
            reuse_until,
        })
    }

    async fn pod_credentials(
        &self,
        req: GetPodCredentialsRequest,
        node: Option<String>,
    ) -> Result<Reusable<PbCredentials>, Status> {
        self.ensure_ready()?;
        let ip = parse_ip(&req.ip)?;
        let pod = self
            .pods
            .find_by_ip_on(ip, node.as_deref())
            .await
            .map_err(|e| find_error(ip, e))?;
        // A namespace created moments ago may not be in the cache yet: ask
        // the API rather than refuse for good.
        let ns = self.namespaces.find(&pod.namespace).await.map_err(|e| {
            tracing::warn!(pod.namespace = %pod.namespace, error = %e, "reading namespace failed");
            Status::internal("error reading the pod's namespace from the Kubernetes API")
        })?;
        let identity = match self.policy.decide(&pod, &req.role, ns.as_deref()) {
            Decision::Allowed(identity) => identity,
            Decision::Forbidden { check, explanation } => {
                tracing::warn!(
                    pod.namespace = %pod.namespace, pod.name = %pod.name, pod.ip = %ip,
                    pod.iam.requested_role = %req.role, policy.explanation = %explanation,
                    "pod denied by policy"
                );
                self.events.record(
                    &pod,
                    Reason::RoleForbidden,
                    format!("failed assuming role {:?}: {explanation}", req.role),
                );
                return Err(forbidden(check));
            }
        };
        match self.credentials.get(&identity).await {
            Ok(creds) => {
                // Read after the credentials: a confirmation that ended
                // while STS answered gives no window.
                let reuse_until = self.pods.reuse_until(&pod, ip).and_then(|until| {
                    let left = creds.expiration.duration_since(jiff::Timestamp::now());
                    let left = Duration::try_from(left).ok()?;
                    let servable = left.checked_sub(self.credentials.session_refresh())?;
                    Some(until.min(Instant::now() + servable))
                });
                Ok(Reusable {
                    answer: to_proto(&creds),
                    reuse_until,
                })
            }
            Err(e) => {
                tracing::error!(
                    pod.namespace = %pod.namespace, pod.name = %pod.name, pod.ip = %ip,
                    pod.iam.role = %identity.role_arn, error = %e, "error retrieving credentials"
                );
                self.events.record(
                    &pod,
                    Reason::CredentialError,
                    format!("failed retrieving credentials: {e}"),
                );
                Err(credentials_error(&e))
            }
        }
    }
}

impl Service {
    /// The container credentials path: the pod is the one the token is
    /// bound to, whatever address the request came from; then the same
    /// policy, identity and credential cache as [`Service::pod_credentials`]
    /// with the pod's own annotated role as the requested one.
    async fn token_credentials(
        &self,
        req: GetTokenCredentialsRequest,
    ) -> Result<TokenCredentials, Status> {
        self.ensure_ready()?;
        let from = req.ip.trim();
        let bound = self.tokens.verify(req.token.trim()).await.map_err(|e| {
            // Never the token: only why, and where it came from.
            match &e {
                TokenError::Rejected { reason } => {
                    tracing::warn!(request.ip = %from, error = %e, review = %reason, "token refused")
                }
                TokenError::Unverifiable(_) => {
                    tracing::warn!(request.ip = %from, error = %e, "token not verified")
                }
                _ => tracing::info!(request.ip = %from, error = %e, "token refused"),
            }
            token_error(&e)
        })?;
        let pod = token::live_pod(&self.pods, &bound).await.map_err(|e| {
            if e == TokenError::PodGone {
                self.tokens.revoke(req.token.trim(), &bound);
            }
            tracing::info!(
                pod.namespace = %bound.namespace, pod.name = %bound.name, request.ip = %from,
                error = %e, "token's pod is not served"
            );
            token_error(&e)
        })?;
        let Some(role) = pod.role.clone() else {
            // As GetPodRole's empty name: nothing to record on the pod.
            tracing::info!(pod.namespace = %pod.namespace, pod.name = %pod.name, "pod has no role");
            return Err(forbidden(Check::AnnotatedRole));
        };
        let ns = self.namespaces.find(&pod.namespace).await.map_err(|e| {
            tracing::warn!(pod.namespace = %pod.namespace, error = %e, "reading namespace failed");
            Status::internal("error reading the pod's namespace from the Kubernetes API")
        })?;
        let identity = match self.policy.decide(&pod, &role, ns.as_deref()) {
            Decision::Allowed(identity) => identity,
            Decision::Forbidden { check, explanation } => {
                tracing::warn!(
                    pod.namespace = %pod.namespace, pod.name = %pod.name, request.ip = %from,
                    pod.iam.requested_role = %role, policy.explanation = %explanation,
                    "pod denied by policy (token)"
                );
                self.events.record(
                    &pod,
                    Reason::RoleForbidden,
                    format!("failed assuming role {role:?}: {explanation}"),
                );
                return Err(forbidden(check));
            }
        };
        match self.credentials.get(&identity).await {
            Ok(creds) => {
                tracing::debug!(pod.namespace = %pod.namespace, pod.name = %pod.name, request.ip = %from, pod.iam.role = %identity.role_arn, "token credentials");
                Ok(TokenCredentials {
                    credentials: Some(to_proto(&creds)),
                    role_arn: identity.role_arn.to_string(),
                    namespace: pod.namespace.to_string(),
                    name: pod.name.to_string(),
                })
            }
            Err(e) => {
                tracing::error!(
                    pod.namespace = %pod.namespace, pod.name = %pod.name, request.ip = %from,
                    pod.iam.role = %identity.role_arn, error = %e, "error retrieving credentials"
                );
                self.events.record(
                    &pod,
                    Reason::CredentialError,
                    format!("failed retrieving credentials: {e}"),
                );
                Err(credentials_error(&e))
            }
        }
    }
}

/// A successful answer and until when the agent may reuse it
/// ([`REUSE_KEY`]); `None`: not at all.
pub(super) struct Reusable<T> {
    answer: T,
    reuse_until: Option<Instant>,
}

impl<T> Reusable<T> {
    /// The response, with [`REUSE_KEY`] when there is a window left. Whole
    /// milliseconds, rounded down: the agent measures from when it sent the
    /// request, which is before this moment, so its window ends first.
    fn into_response(self) -> Response<T> {
        let mut response = Response::new(self.answer);
        let left = self
            .reuse_until
            .map(|until| until.saturating_duration_since(Instant::now()).as_millis())
            .filter(|ms| *ms > 0);
        if let Some(ms) = left {
            response
                .metadata_mut()
                .insert(REUSE_KEY, MetadataValue::from(ms as u64));
        }
        response
    }
}

/// The tonic-facing handle.
#[derive(Clone)]
pub(super) struct KiamGrpc(pub Arc<Service>);

impl KiamGrpc {
    /// Runs one RPC, counted and timed under `method`.
    async fn instrumented<T>(
        &self,
        method: &'static str,
        call: impl std::future::Future<Output = Result<T, Status>>,
    ) -> Result<Response<T>, Status> {
        self.instrumented_response(method, async { call.await.map(Response::new) })
            .await
    }

    /// [`Self::instrumented`] for calls that build their own response (to
    /// add metadata).
    async fn instrumented_response<T>(
        &self,
        method: &'static str,
        call: impl std::future::Future<Output = Result<Response<T>, Status>>,
    ) -> Result<Response<T>, Status> {
        let t = self.0.metrics.started(method);
        let r = call.await;
        self.0.metrics.handled(method, t, code_of(&r));
        r
    }
}

/// The agent's node from [`NODE_KEY`], if it sent one that can be a node
/// name (a DNS subdomain); anything else is ignored, never an error.
fn node_hint<T>(request: &Request<T>) -> Option<String> {
    let node = request.metadata().get(NODE_KEY)?.to_str().ok()?;
    let valid = !node.is_empty()
        && node.len() <= 253
        && node
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
    valid.then(|| node.to_string())
}

#[tonic::async_trait]
impl KiamService for KiamGrpc {
    async fn get_pod_role(
        &self,
        request: Request<GetPodRoleRequest>,
    ) -> Result<Response<Role>, Status> {
        let call = async {
            let node = node_hint(&request);
            let answer = self.0.pod_role(request.into_inner(), node).await?;
            Ok(answer.into_response())
        };
        self.instrumented_response("GetPodRole", call).await
    }

    async fn get_pod_credentials(
        &self,
        request: Request<GetPodCredentialsRequest>,
    ) -> Result<Response<PbCredentials>, Status> {
        let call = async {
            let node = node_hint(&request);
            let answer = self.0.pod_credentials(request.into_inner(), node).await?;
            Ok(answer.into_response())
        };
        self.instrumented_response("GetPodCredentials", call).await
    }

    async fn get_health(
        &self,
        _request: Request<GetHealthRequest>,
    ) -> Result<Response<HealthStatus>, Status> {
        let call = async {
            self.0.ensure_ready().map(|()| HealthStatus {
                message: "ok".into(),
            })
        };
        self.instrumented("GetHealth", call).await
    }

    async fn explain(
        &self,
        request: Request<ExplainRequest>,
    ) -> Result<Response<Explanation>, Status> {
        self.instrumented("Explain", self.0.explain(request.into_inner()))
            .await
    }

    async fn get_token_credentials(
        &self,
        request: Request<GetTokenCredentialsRequest>,
    ) -> Result<Response<TokenCredentials>, Status> {
        let call = self.0.token_credentials(request.into_inner());
        self.instrumented("GetTokenCredentials", call).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_ips_are_invalid_arguments() {
        assert_eq!(parse_ip("10.0.0.1").unwrap().to_string(), "10.0.0.1");
        let e = parse_ip("not-an-ip").unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().contains("not-an-ip"));
        let e = parse_ip(&"9".repeat(1 << 20)).unwrap_err();
        assert!(e.message().len() < 200, "{}", e.message());
        assert!(e.message().contains("(1048576 bytes)"), "{}", e.message());
    }
}
