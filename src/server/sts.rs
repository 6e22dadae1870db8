//! STS AssumeRole behind a trait, so the credential cache can be tested with
//! an in-process fake and run against the real `aws-sdk-sts` in production.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use jiff::Timestamp;

/// What STS is asked for: one set of credentials is shared by every pod with
/// the same identity.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    /// The resolved role ARN (never a bare name).
    pub role_arn: Arc<str>,
    /// The sanitised session name, `kiam-...`, at most 64 characters.
    pub session_name: Arc<str>,
    /// From `iam.amazonaws.com/external-id`.
    pub external_id: Option<Arc<str>>,
}

/// Optional STS session tags (`--session-tags`). Not part of [`Identity`]:
/// pods sharing an identity share credentials, so tags describe the pod that
/// caused the fetch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionTags {
    pub namespace: String,
    pub pod: String,
    pub service_account: String,
}

/// Temporary credentials as STS issued them.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: String,
    pub expiration: Timestamp,
    /// When this server received them.
    pub last_updated: Timestamp,
}

impl std::fmt::Debug for Credentials {
    // Never print secrets, even at debug level.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("access_key_id", &self.access_key_id)
            .field("expiration", &self.expiration)
            .finish_non_exhaustive()
    }
}

/// Why an STS call failed; `retryable` drives backoff.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct StsError {
    /// AWS error code when there is one (`AccessDenied`, `Throttling`, ...).
    pub code: Option<String>,
    pub message: String,
    pub retryable: bool,
}

/// One AssumeRole call. Implementations must not cache: that is
/// [`super::credentials`]'s job.
pub trait AssumeRole: Send + Sync + 'static {
    fn assume_role<'a>(
        &'a self,
        identity: &'a Identity,
        duration: Duration,
        tags: Option<&'a SessionTags>,
    ) -> BoxFuture<'a, Result<Credentials, StsError>>;
}
