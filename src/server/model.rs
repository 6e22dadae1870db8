//! The plain data every part of the server shares: what kiam keeps of a
//! Pod, and the identity STS is asked for. This module imports nothing else
//! of the server, so the server's imports read top-down without circles.
//!
//! The surprise: [`Identity`] includes the session tags when
//! `--session-tags` is on. Tags are part of what a credential *is*: two pods
//! sharing a role but not a namespace must never share tagged credentials.

use std::net::IpAddr;
use std::sync::Arc;

use jiff::Timestamp;

/// Pod annotation naming the role (name, `/name`, path or full ARN).
pub const ROLE_ANNOTATION: &str = "iam.amazonaws.com/role";
/// Pod annotation overriding `--session` in the STS session name.
pub const SESSION_NAME_ANNOTATION: &str = "iam.amazonaws.com/session-name";
/// Pod annotation passed to STS as the external id.
pub const EXTERNAL_ID_ANNOTATION: &str = "iam.amazonaws.com/external-id";
/// Namespace annotation: a regex over resolved role ARNs.
pub const PERMITTED_ANNOTATION: &str = "iam.amazonaws.com/permitted";

/// The pod phases kiam cares about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodPhase {
    Pending,
    Running,
    Succeeded,
    Failed,
    Unknown,
}

impl PodPhase {
    pub fn parse(phase: Option<&str>) -> Self {
        match phase {
            Some("Pending") => PodPhase::Pending,
            Some("Running") => PodPhase::Running,
            Some("Succeeded") => PodPhase::Succeeded,
            Some("Failed") => PodPhase::Failed,
            _ => PodPhase::Unknown,
        }
    }

    /// Succeeded or Failed: the containers are gone and the IP may be reused.
    pub fn is_completed(self) -> bool {
        matches!(self, PodPhase::Succeeded | PodPhase::Failed)
    }
}

/// What kiam keeps of a Pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInfo {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
    /// Distinguishes a new pod that reuses an old pod's name or IP.
    pub uid: Arc<str>,
    /// Every address of `status.podIPs`, the primary (`status.podIP`) first;
    /// `None` before the pod has one. A dual-stack pod is identified by
    /// either of its addresses. (Still named `ip` from when kiam knew one
    /// address per pod; `"10.0.0.5".parse()` builds a one-address set.)
    pub ips: Option<PodIps>,
    pub phase: PodPhase,
    /// Host-network pods share the node's IP and are never matched.
    pub host_network: bool,
    /// `deletionTimestamp`; a pod past it (the grace period is already
    /// folded in by the API server) is never matched.
    pub deletion: Option<Timestamp>,
    /// `iam.amazonaws.com/role`, as written (name, `/name` or an ARN).
    pub role: Option<Arc<str>>,
    /// `iam.amazonaws.com/session-name`.
    pub session_name: Option<Arc<str>>,
    /// `iam.amazonaws.com/external-id`.
    pub external_id: Option<Arc<str>>,
    pub service_account: Option<Arc<str>>,
    /// `spec.nodeName`: which node's agent answers the pod (`None` before it
    /// is scheduled). Only `kiam explain` shows it; nothing decides on it.
    pub node: Option<Arc<str>>,
}

impl PodInfo {
    /// Is `ip` one of the pod's addresses (`status.podIPs`)?
    pub fn has_ip(&self, ip: IpAddr) -> bool {
        self.ips.as_ref().is_some_and(|ips| ips.contains(ip))
    }

    /// May a request from this pod's IP be answered with this pod at `now`?
    /// Not when it has no IP, uses the host's network, has completed, or is
    /// past its deletion deadline. Pending pods with an IP do match.
    pub fn matches_ip_at(&self, now: Timestamp) -> bool {
        self.ips.is_some()
            && !self.host_network
            && !self.phase.is_completed()
            && self.deletion.is_none_or(|deadline| deadline > now)
    }
}

/// A pod's addresses (`status.podIPs`): never empty, no duplicates, the
/// primary (`status.podIP`, the only one the API server's `status.podIP`
/// field selector matches) first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodIps(Vec<IpAddr>);

impl PodIps {
    /// The addresses in order, duplicates dropped; `None` when there are none.
    pub fn new(ips: impl IntoIterator<Item = IpAddr>) -> Option<Self> {
        let mut kept: Vec<IpAddr> = Vec::new();
        for ip in ips {
            let ip = ip.to_canonical();
            if !kept.contains(&ip) {
                kept.push(ip);
            }
        }
        (!kept.is_empty()).then_some(PodIps(kept))
    }

    /// `status.podIP`.
    pub fn primary(&self) -> IpAddr {
        self.0[0]
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0.contains(&ip.to_canonical())
    }

    /// Every address, the primary first.
    pub fn iter(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.0.iter().copied()
    }
}

impl From<IpAddr> for PodIps {
    fn from(ip: IpAddr) -> Self {
        PodIps(vec![ip.to_canonical()])
    }
}

/// `198.18.0.5` or, dual-stack, `198.18.0.5,2001:2::5` (primary first).
impl std::str::FromStr for PodIps {
    type Err = std::net::AddrParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let ips = s
            .split(',')
            .map(|ip| ip.trim().parse())
            .collect::<Result<Vec<IpAddr>, _>>()?;
        // An empty string fails to parse above, so there is at least one.
        Ok(PodIps::new(ips).expect("at least one address"))
    }
}

impl std::fmt::Display for PodIps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, ip) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{ip}")?;
        }
        Ok(())
    }
}

/// What STS is asked for, and so what one set of credentials is shared by:
/// pods with equal identities share credentials.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    /// The resolved role ARN (never a bare name).
    pub role_arn: Arc<str>,
    /// The sanitised session name, `kiam-...`, at most 64 characters.
    pub session_name: Arc<str>,
    /// From `iam.amazonaws.com/external-id`.
    pub external_id: Option<Arc<str>>,
    /// With `--session-tags`: the tags describing the pod, sent to STS.
    pub tags: Option<Arc<SessionTags>>,
}

/// STS session tags (`--session-tags`) describing one pod.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionTags {
    pub namespace: String,
    pub pod: String,
    pub service_account: String,
}

impl SessionTags {
    /// The tags describing `pod` (an empty service account is left untagged).
    pub fn for_pod(pod: &PodInfo) -> Self {
        SessionTags {
            namespace: pod.namespace.to_string(),
            pod: pod.name.to_string(),
            service_account: pod
                .service_account
                .as_deref()
                .unwrap_or_default()
                .to_string(),
        }
    }

    /// The `(key, value)` pairs sent to STS; empty values are skipped because
    /// an empty tag carries nothing an IAM condition could use.
    pub fn pairs(&self) -> impl Iterator<Item = (&'static str, &str)> {
        [
            ("kiam-namespace", self.namespace.as_str()),
            ("kiam-pod", self.pod.as_str()),
            ("kiam-service-account", self.service_account.as_str()),
        ]
        .into_iter()
        .filter(|(_, v)| !v.is_empty())
    }
}

/// A pod worth fetching credentials for before it asks, with the identity
/// the policy gave it: the prefetcher only checks the namespace, it never
/// resolves the role again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prefetch {
    pub pod: Arc<PodInfo>,
    pub identity: Identity,
}
