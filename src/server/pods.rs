//! The Pod cache: a small projection of each Pod (not whole objects), kept by
//! a kube-runtime watcher and indexed by pod IP and by role identity.
//!
//! Like any watch-based cache it may lag the API server; a miss on an IP is
//! therefore confirmed with one direct API lookup before "no pod found".

use std::net::IpAddr;
use std::sync::Arc;

use jiff::Timestamp;

/// The pod phases kiam cares about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodPhase {
    Pending,
    Running,
    Succeeded,
    Failed,
    Unknown,
}

/// What kiam keeps of a Pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInfo {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
    /// Distinguishes a new pod that reuses an old pod's name or IP.
    pub uid: Arc<str>,
    pub ip: Option<IpAddr>,
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
}
