//! Why `kiam server` could not start or stopped. Usage variants name the
//! flag to fix and exit 64 before any port is bound; the rest exit 1.

use crate::tls::TlsError;

use super::policy::PolicyError;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(
        "--role-base-arn or --role-base-arn-autodetect must be set \
         (e.g. --role-base-arn=arn:aws:iam::123456789012:role/)"
    )]
    NoBaseArn,
    #[error("--role-base-arn and --role-base-arn-autodetect are mutually exclusive; set one")]
    TwoBaseArns,
    /// A bad `--role-base-arn` or `--default-permitted-regexp`.
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error("--session-duration {0} is below STS's minimum of 15m")]
    SessionDuration(String),
    #[error("--session-refresh {refresh} must be shorter than --session-duration {duration}")]
    RefreshNotShorter { refresh: String, duration: String },
    #[error("--session-refresh must be greater than 0s")]
    RefreshZero,
    #[error("--session must not be empty")]
    EmptySession,
    #[error("--token-audience must not be empty (default: kiam)")]
    EmptyTokenAudience,
    #[error(
        "--assume-role-arn {arn:?} is not a role ARN \
         (expected arn:aws:iam::<account>:role/<name>): {reason}"
    )]
    AssumeRoleArn { arn: String, reason: &'static str },
    #[error("--region {0:?} is not a region name (expected e.g. eu-west-1)")]
    Region(String),
    #[error("--prefetch-peers {0}")]
    PrefetchPeers(String),
    #[error("--advertise-ip {0:?} is not an IP address (deploy it from status.podIP)")]
    AdvertiseIp(String),
    #[error("--prefetch-peers and --advertise-ip are set together; {0} is missing")]
    PeersHalfSet(&'static str),
    #[error("--kubeconfig {path}: {reason}")]
    Kubeconfig { path: String, reason: String },
    #[error(transparent)]
    Tls(#[from] TlsError),

    #[error("no in-cluster Kubernetes config and no --kubeconfig: {0}")]
    NoKubeConfig(String),
    #[error("Kubernetes client: {0}")]
    KubeClient(String),
    #[error("--role-base-arn-autodetect: {0}")]
    Autodetect(String),
    #[error("--bind {addr}: cannot listen: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("--prometheus-listen-addr {addr:?}: cannot listen: {source}")]
    Metrics {
        addr: String,
        source: std::io::Error,
    },
    #[error("gRPC server failed: {0}")]
    Serve(String),
}

impl ServerError {
    /// Bad flags or files, reported before any port is bound.
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            ServerError::NoBaseArn
                | ServerError::TwoBaseArns
                | ServerError::Policy(_)
                | ServerError::SessionDuration(_)
                | ServerError::RefreshNotShorter { .. }
                | ServerError::RefreshZero
                | ServerError::EmptySession
                | ServerError::EmptyTokenAudience
                | ServerError::AssumeRoleArn { .. }
                | ServerError::Region(_)
                | ServerError::Kubeconfig { .. }
                | ServerError::PrefetchPeers(_)
                | ServerError::AdvertiseIp(_)
                | ServerError::PeersHalfSet(_)
                | ServerError::Tls(_)
        )
    }
}

impl From<ServerError> for crate::Fatal {
    fn from(e: ServerError) -> Self {
        if e.is_usage() {
            crate::Fatal::Usage(e.to_string())
        } else {
            crate::Fatal::Failed(e.to_string())
        }
    }
}
