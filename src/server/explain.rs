//! `kiam explain`'s server side: why a pod gets, or does not get, its role,
//! built from the same caches, policy and credential state a request meets.
//!
//! The surprise: explaining never changes what it explains. It reads the
//! caches (one GET to the API server to compare, which is not put in the
//! cache), never starts an STS fetch and writes no Event, so asking about a
//! broken pod a hundred times costs STS nothing. The one exception is a pod
//! asked for by IP that the cache does not have: that is looked up exactly
//! as a request would be (`PodCache::find_by_ip`), since that lookup is what
//! decides whether the pod is served.

use std::net::IpAddr;
use std::sync::Arc;

use jiff::Timestamp;
use tonic::Status;

use super::credentials::{CredentialCache, CredentialState};
use super::events::EventRecorder;
use super::model::{
    Identity, PodInfo, EXTERNAL_ID_ANNOTATION, PERMITTED_ANNOTATION, ROLE_ANNOTATION,
    SESSION_NAME_ANNOTATION,
};
use super::namespaces::NamespaceCache;
use super::pods::{FindError, PodCache};
use super::policy::{Decision, NamespacePolicy, Policy};
use crate::proto::explain_step::Outcome;
use crate::proto::{ExplainDetail, ExplainEvent, ExplainRequest, ExplainStep, Explanation};
use crate::wire::ec2_time;

/// How many of the pod's Events an explanation carries.
const EVENTS_SHOWN: usize = 5;

/// What an explanation reads.
pub(super) struct Sources<'a> {
    pub pods: &'a PodCache,
    pub namespaces: &'a NamespaceCache,
    pub policy: &'a Policy,
    pub credentials: &'a CredentialCache,
    pub events: &'a EventRecorder,
    pub ready: bool,
}

/// Which pod to explain.
enum Target {
    Name { namespace: String, name: String },
    Ip(IpAddr),
}

fn target(req: &ExplainRequest) -> Result<Target, Status> {
    let by_name = !req.namespace.is_empty() || !req.name.is_empty();
    match (by_name, req.ip.trim()) {
        (true, "") if !req.namespace.is_empty() && !req.name.is_empty() => Ok(Target::Name {
            namespace: req.namespace.clone(),
            name: req.name.clone(),
        }),
        (false, ip) if !ip.is_empty() => ip
            .parse()
            .map(Target::Ip)
            .map_err(|_| Status::invalid_argument("ip is not an IP address")),
        _ => Err(Status::invalid_argument(
            "give either namespace and name, or ip",
        )),
    }
}

/// One step under construction.
struct Step(ExplainStep);

impl Step {
    fn new(name: &str, outcome: Outcome, summary: impl Into<String>) -> Self {
        Step(ExplainStep {
            name: name.into(),
            outcome: outcome as i32,
            summary: summary.into(),
            details: Vec::new(),
            fix: String::new(),
        })
    }

    fn detail(mut self, key: &str, value: impl std::fmt::Display) -> Self {
        self.0.details.push(ExplainDetail {
            key: key.into(),
            value: value.to_string(),
        });
        self
    }

    fn fix(mut self, fix: impl Into<String>) -> Self {
        self.0.fix = fix.into();
        self
    }

    /// A passed step that found something worth a look.
    fn warn(mut self) -> Self {
        if self.0.outcome == Outcome::Pass as i32 {
            self.0.outcome = Outcome::Warn as i32;
        }
        self
    }

    fn failed(&self) -> bool {
        self.0.outcome == Outcome::Fail as i32
    }
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

fn or_none<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| "(none)".to_string(), |v| v.to_string())
}

impl Sources<'_> {
    pub(super) async fn explain(&self, req: ExplainRequest) -> Result<Explanation, Status> {
        let target = target(&req)?;
        if !self.ready {
            let mut waiting_for = Vec::new();
            if !self.pods.is_synced() {
                waiting_for.push("pods".to_string());
            }
            if !self.namespaces.is_synced() {
                waiting_for.push("namespaces".to_string());
            }
            if waiting_for.is_empty() {
                waiting_for.push("start-up".to_string());
            }
            return Ok(Explanation {
                served: false,
                waiting_for,
                ..Default::default()
            });
        }
        let mut steps = Vec::new();
        let pod = match self.pod_step(&target, &mut steps).await {
            Some(pod) => pod,
            None => return Ok(finish(steps, Vec::new())),
        };
        let identity = self.role_step(&pod, &mut steps);
        let allowed = match &identity {
            Some(identity) => self.namespace_step(&pod, identity, &mut steps).await,
            None => None,
        };
        if let Some(identity) = &allowed {
            steps.push(credentials_step(
                identity,
                &self.credentials.state(identity),
            ));
        }
        steps.push(self.path_step(&pod));
        let events = self
            .events
            .recent(&pod.uid, EVENTS_SHOWN)
            .into_iter()
            .map(|e| ExplainEvent {
                reason: e.reason.as_str().into(),
                message: e.message,
                count: e.count,
                first: event_time(e.first.as_second()),
                last: event_time(e.last.as_second()),
            })
            .collect();
        Ok(finish(steps, events))
    }

    /// Step 1: the pod as the cache has it, and as the API server has it now.
    async fn pod_step(&self, target: &Target, steps: &mut Vec<Step>) -> Option<Arc<PodInfo>> {
        let (cached, namespace, name) = match target {
            Target::Name { namespace, name } => (
                self.pods.get(namespace, name),
                namespace.clone(),
                name.clone(),
            ),
            Target::Ip(ip) => {
                let pod = match self.pods.live_on(*ip).as_slice() {
                    [only] => only.clone(),
                    [] => match self.pods.find_by_ip(*ip).await {
                        Ok(pod) => pod,
                        Err(e) => {
                            steps.push(find_failed(*ip, &e));
                            return None;
                        }
                    },
                    several => {
                        steps.push(ambiguous(*ip, several.iter().map(|p| pod_name(p))));
                        return None;
                    }
                };
                let (namespace, name) = (pod.namespace.to_string(), pod.name.to_string());
                (Some(pod), namespace, name)
            }
        };
        let live = self.pods.get_from_api(&namespace, &name).await;
        let Some(pod) = cached else {
            let step = match live {
                Ok(None) => Step::new("pod", Outcome::Fail, format!("no pod {namespace}/{name}"))
                    .detail("in this server's cache", "no")
                    .detail("in the API server", "no")
                    .fix(format!(
                        "check the namespace and name (kubectl get pod -n {namespace} {name})"
                    )),
                Err(e) => Step::new(
                    "pod",
                    Outcome::Fail,
                    format!("{namespace}/{name} is not in this server's cache"),
                )
                .detail("API server", format!("could not ask: {e}"))
                .fix("check the server's access to the Kubernetes API (its log says more)"),
                Ok(Some(now)) => {
                    let summary = format!(
                        "{namespace}/{name} is not in this server's cache yet (its watch lags); \
                         shown as the API server has it"
                    );
                    steps.push(pod_facts(Step::new("pod", Outcome::Warn, summary), &now));
                    return Some(Arc::new(now));
                }
            };
            steps.push(step);
            return None;
        };
        let step = pod_facts(
            Step::new("pod", Outcome::Pass, format!("{namespace}/{name}")),
            &pod,
        );
        let step = match agreement(&pod, &live) {
            None => step.detail("API server agrees", "yes"),
            Some(why) => step.detail("API server agrees", why).warn(),
        };
        steps.push(step);
        Some(pod)
    }

    /// Step 2: the role annotation and the identity it resolves to.
    fn role_step(&self, pod: &PodInfo, steps: &mut Vec<Step>) -> Option<Identity> {
        let fix_annotation = format!(
            "annotate the pod (in its template) with {ROLE_ANNOTATION}: <role name, /name or role ARN>"
        );
        match self.policy.identity(pod) {
            Ok(None) => {
                steps.push(
                    Step::new(
                        "role",
                        Outcome::Fail,
                        format!("the pod has no {ROLE_ANNOTATION} annotation"),
                    )
                    .fix(fix_annotation),
                );
                None
            }
            Err(e) => {
                steps.push(
                    Step::new("role", Outcome::Fail, e.to_string())
                        .detail(ROLE_ANNOTATION, or_none(pod.role.as_deref()))
                        .fix(fix_annotation),
                );
                None
            }
            Ok(Some(identity)) => {
                let mut step = Step::new("role", Outcome::Pass, identity.role_arn.to_string())
                    .detail(ROLE_ANNOTATION, or_none(pod.role.as_deref()))
                    .detail("role ARN", &identity.role_arn)
                    .detail("base ARN", self.policy.resolver().base())
                    .detail("session name", &identity.session_name)
                    .detail(
                        SESSION_NAME_ANNOTATION,
                        or_none(pod.session_name.as_deref()),
                    )
                    .detail(EXTERNAL_ID_ANNOTATION, or_none(pod.external_id.as_deref()));
                if let Some(tags) = &identity.tags {
                    let tags: Vec<String> = tags.pairs().map(|(k, v)| format!("{k}={v}")).collect();
                    step = step.detail("session tags", tags.join(", "));
                }
                steps.push(step);
                Some(identity)
            }
        }
    }

    /// Step 3: the namespace's `permitted` regex, as the server applies it.
    /// Returns the identity the policy allowed (the one credentials are
    /// fetched for).
    async fn namespace_step(
        &self,
        pod: &PodInfo,
        identity: &Identity,
        steps: &mut Vec<Step>,
    ) -> Option<Identity> {
        let ns = &pod.namespace;
        let arn = &identity.role_arn;
        let suggestion = format!("^{}$", regex::escape(arn));
        let annotate = |regex: &str| {
            format!("kubectl annotate namespace {ns} --overwrite {PERMITTED_ANNOTATION}='{regex}'")
        };
        let policy = match self.namespaces.find(ns).await {
            Ok(Some(policy)) => policy,
            Ok(None) => {
                steps.push(
                    Step::new(
                        "namespace",
                        Outcome::Fail,
                        format!("namespace {ns} does not exist"),
                    )
                    .fix("the pod's namespace is gone; recreate the pod"),
                );
                return None;
            }
            Err(e) => {
                steps.push(
                    Step::new(
                        "namespace",
                        Outcome::Fail,
                        format!("could not read namespace {ns}: {e}"),
                    )
                    .fix("check the server's access to the Kubernetes API (its log says more)"),
                );
                return None;
            }
        };
        let step = match &*policy {
            NamespacePolicy::Missing => Step::new(
                "namespace",
                Outcome::Fail,
                format!("namespace {ns} has no {PERMITTED_ANNOTATION} annotation, so it permits no roles"),
            )
            .detail("role ARN", arn)
            .fix(annotate(&suggestion)),
            NamespacePolicy::Invalid { expression, error } => Step::new(
                "namespace",
                Outcome::Fail,
                format!("namespace {ns} has an invalid {PERMITTED_ANNOTATION} regex, so it permits no roles"),
            )
            .detail(PERMITTED_ANNOTATION, expression)
            .detail("error", error)
            .fix(annotate(&suggestion)),
            NamespacePolicy::Permits(re) => {
                let source = if re.from_default() {
                    "--default-permitted-regexp (no annotation)"
                } else {
                    PERMITTED_ANNOTATION
                };
                let matches = re.is_match(arn);
                let step = Step::new(
                    "namespace",
                    if matches { Outcome::Pass } else { Outcome::Fail },
                    if matches {
                        format!("namespace {ns} permits {arn}")
                    } else {
                        format!("namespace {ns} does not permit {arn}")
                    },
                )
                .detail(source, re.expression())
                .detail("as applied", re.anchored())
                .detail("role ARN", arn)
                .detail("matches", yes_no(matches));
                if matches {
                    step
                } else {
                    let widened = format!("{}|{}", re.expression(), regex::escape(arn));
                    step.fix(format!(
                        "permit it in the namespace, e.g. {}, or annotate the pod with a role the regex matches",
                        annotate(&widened)
                    ))
                }
            }
        };
        let failed = step.failed();
        steps.push(step);
        if failed {
            return None;
        }
        // The verdict a request would get, with the identity it carries.
        match self.policy.decide(pod, pod.role.as_deref()?, Some(&policy)) {
            Decision::Allowed(identity) => Some(identity),
            Decision::Forbidden { explanation, .. } => {
                steps.push(Step::new("namespace", Outcome::Fail, explanation));
                None
            }
        }
    }

    /// Step 5: what stops a request from the pod's IP reaching this pod.
    fn path_step(&self, pod: &PodInfo) -> Step {
        let name = "path";
        let now = Timestamp::now();
        let Some(ips) = &pod.ips else {
            return Step::new(name, Outcome::Fail, "the pod has no IP yet")
                .fix("wait for the pod to be scheduled and its sandbox to start");
        };
        let base = |outcome, summary: String| {
            Step::new(name, outcome, summary)
                .detail("metadata path", format!("by source IP {ips}"))
                .detail(
                    "token path",
                    "by a projected service-account token naming this pod, whatever its IP (docs/TOKEN-IDENTITY.md)",
                )
                .detail("phase", format!("{:?}", pod.phase))
                .detail("host network", yes_no(pod.host_network))
        };
        if pod.host_network {
            return base(
                Outcome::Fail,
                "the pod uses the host's network, so its requests come from the node's IP and are never matched to it".into(),
            )
            .fix(
                "use the token path (AWS_CONTAINER_CREDENTIALS_FULL_URI and a projected token, \
                 docs/TOKEN-IDENTITY.md), which serves host-network pods their own role; \
                 or run the pod without hostNetwork: true (by address, host-network pods get the node's role)",
            );
        }
        if pod.phase.is_completed() {
            return base(
                Outcome::Fail,
                format!(
                    "the pod has finished ({:?}); its IP may already belong to another pod",
                    pod.phase
                ),
            )
            .fix("nothing to serve: a finished pod's containers are gone");
        }
        if let Some(deadline) = pod.deletion {
            if deadline <= now {
                return base(
                    Outcome::Fail,
                    format!("the pod is past its deletion deadline ({deadline})"),
                )
                .fix("nothing to serve: the pod is being deleted");
            }
        }
        let mut others: Vec<String> = Vec::new();
        for ip in ips.iter() {
            for other in self.pods.live_on(ip) {
                if other.uid != pod.uid && !others.contains(&pod_name(&other)) {
                    others.push(pod_name(&other));
                }
            }
        }
        if !others.is_empty() {
            return base(
                Outcome::Fail,
                format!(
                    "other live pods share its IP ({}); requests from it are refused rather than guessed",
                    others.join(", ")
                ),
            )
            .fix("find why two pods hold one IP (a finished pod not reported as finished, or the CNI reusing an address): delete the stale pod");
        }
        let step = base(
            Outcome::Pass,
            format!("requests from {ips} are answered for this pod"),
        );
        match pod.deletion {
            Some(deadline) => step.detail("terminating", format!("served until {deadline}")),
            None => step,
        }
    }
}

/// Step 4: the credential state of the identity the policy allowed.
fn credentials_step(identity: &Identity, state: &CredentialState) -> Step {
    let name = "credentials";
    let (outcome, summary) = match (&state.cached, &state.last_failure) {
        (Some(c), _) if c.fresh => (Outcome::Pass, "cached".to_string()),
        (_, Some(f)) => (
            Outcome::Fail,
            format!(
                "STS refused the last fetch: {}",
                f.code.as_deref().unwrap_or("STS error")
            ),
        ),
        (Some(_), None) => (
            Outcome::Warn,
            "cached, but due for refresh: the next request fetches new ones".to_string(),
        ),
        (None, None) if state.in_flight => (Outcome::Warn, "being fetched now".to_string()),
        (None, None) => (
            Outcome::Warn,
            "not fetched yet: the first request fetches them from STS".to_string(),
        ),
    };
    let mut step = Step::new(name, outcome, summary)
        .detail("cached", yes_no(state.cached.is_some()))
        .detail("fetch in flight", yes_no(state.in_flight));
    if let Some(c) = &state.cached {
        step = step
            .detail("access key id", &c.access_key_id)
            .detail("expiration", ec2_time(c.expiration))
            .detail("next refresh", ec2_time(c.refresh_at));
    }
    if let Some(f) = &state.last_failure {
        step = step
            .detail("last error code", f.code.as_deref().unwrap_or("(none)"))
            .detail("last error", &f.message)
            .detail("retryable", yes_no(f.retryable))
            .detail("consecutive failures", f.consecutive)
            .detail("next retry", ec2_time(f.retry_at));
        let fix = match f.code.as_deref() {
            Some("AccessDenied") => format!(
                "let the kiam server's role assume {}: its trust policy must allow sts:AssumeRole from the server's role{}",
                identity.role_arn,
                if identity.external_id.is_some() {
                    " with this external id"
                } else {
                    ""
                }
            ),
            Some("NoSuchEntity") => format!("create the role {} or fix the annotation", identity.role_arn),
            _ if f.retryable => "usually transient: the server retries with backoff; see its log".into(),
            _ => "see the error above and the server's log".into(),
        };
        if outcome == Outcome::Fail {
            step = step.fix(fix);
        }
    }
    step
}

/// Events carry k8s-openapi's own `jiff` (another version of the crate).
fn event_time(unix_seconds: i64) -> String {
    Timestamp::from_second(unix_seconds).map_or_else(|_| unix_seconds.to_string(), ec2_time)
}

fn pod_name(pod: &PodInfo) -> String {
    format!("{}/{}", pod.namespace, pod.name)
}

fn pod_facts(step: Step, pod: &PodInfo) -> Step {
    step.detail("uid", &pod.uid)
        .detail("phase", format!("{:?}", pod.phase))
        .detail("IPs", or_none(pod.ips.as_ref()))
        .detail("host network", yes_no(pod.host_network))
        .detail("deletion", or_none(pod.deletion))
        .detail("service account", or_none(pod.service_account.as_deref()))
        .detail("node", or_none(pod.node.as_deref()))
}

/// `None` when the API server has the pod as cached; else how it differs.
fn agreement(cached: &PodInfo, live: &Result<Option<PodInfo>, kube::Error>) -> Option<String> {
    let lags = "the cache catches up with its watch";
    match live {
        Ok(Some(now)) if now == cached => None,
        Ok(Some(now)) if now.uid != cached.uid => Some(format!(
            "no: it has a newer pod of that name (uid {}); {lags}",
            now.uid
        )),
        Ok(Some(now)) => Some(format!(
            "not yet: it has phase {:?}, IPs {}, deletion {}; {lags}",
            now.phase,
            or_none(now.ips.as_ref()),
            or_none(now.deletion)
        )),
        Ok(None) => Some("no: the pod is gone; the cache has not seen its deletion yet".into()),
        Err(e) => Some(format!("could not ask: {e}")),
    }
}

fn ambiguous(ip: IpAddr, pods: impl Iterator<Item = String>) -> Step {
    let pods: Vec<String> = pods.collect();
    Step::new(
        "pod",
        Outcome::Fail,
        format!(
            "{} live pods share IP {ip} ({}); requests from it are refused rather than guessed",
            pods.len(),
            pods.join(", ")
        ),
    )
    .fix("find why two pods hold one IP (a finished pod not reported as finished, or the CNI reusing an address): delete the stale pod")
}

fn find_failed(ip: IpAddr, e: &FindError) -> Step {
    match e {
        FindError::NotFound => Step::new("pod", Outcome::Fail, format!("no pod found with IP {ip}"))
            .fix("check the address: it must be the pod's own IP (kubectl get pods -A -o wide), not a node's or a service's"),
        FindError::Ambiguous { pods, .. } => ambiguous(ip, pods.iter().cloned()),
        other => Step::new("pod", Outcome::Fail, other.to_string())
            .fix("check the server's access to the Kubernetes API (its log says more)"),
    }
}

fn finish(steps: Vec<Step>, events: Vec<ExplainEvent>) -> Explanation {
    let served = !steps.is_empty() && !steps.iter().any(Step::failed);
    Explanation {
        served,
        waiting_for: Vec::new(),
        steps: steps.into_iter().map(|s| s.0).collect(),
        events,
    }
}
