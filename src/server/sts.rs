//! STS AssumeRole behind a trait, so the credential cache can be tested with
//! an in-process fake ([`FakeSts`]) and run against the real `aws-sdk-sts`
//! ([`StsClient`]) in production.
//!
//! Neither implementation caches, retries across calls or counts metrics:
//! [`super::credentials`] does all three, so every implementation is measured
//! the same way (through [`StsMetrics`]). The SDK's own per-call retries
//! (throttling, 5xx) still happen inside one [`StsClient`] call.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_config::meta::region::RegionProviderChain;
use aws_config::sts::AssumeRoleProvider;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region};
use aws_sdk_sts::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use futures::future::BoxFuture;
use futures::FutureExt;
use jiff::Timestamp;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use super::pods::PodInfo;

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

impl StsError {
    /// A transient failure without an AWS error code (timeouts, network).
    pub fn transient(code: &str, message: impl Into<String>) -> Self {
        StsError {
            code: Some(code.to_string()),
            message: format!("{code}: {}", message.into()),
            retryable: true,
        }
    }
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

/// kiam's STS call metrics. Registered once; clones share the families.
#[derive(Clone, Debug)]
pub struct StsMetrics {
    timing: Histogram,
    current: Gauge,
    errors: Counter,
}

impl StsMetrics {
    /// Registers `kiam_sts_assumerole_timing_seconds`,
    /// `kiam_sts_assumerole_current` and `kiam_sts_issuing_errors_total`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::unregistered();
        registry.register(
            "kiam_sts_assumerole_timing_seconds",
            "Bucketed histogram of assumeRole timings",
            m.timing.clone(),
        );
        registry.register(
            "kiam_sts_assumerole_current",
            "Number of assume role calls currently executing",
            m.current.clone(),
        );
        // prometheus-client appends `_total` to counters.
        registry.register(
            "kiam_sts_issuing_errors",
            "Number of errors issuing credentials",
            m.errors.clone(),
        );
        m
    }

    /// Metrics that are counted but exported nowhere (tests, tools).
    pub fn unregistered() -> Self {
        StsMetrics {
            // kiam's buckets: 1ms doubling to ~4s... up to 13 buckets.
            timing: Histogram::new(exponential_buckets(0.001, 2.0, 13)),
            current: Gauge::default(),
            errors: Counter::default(),
        }
    }

    /// Runs one STS call, timing it and counting it in flight and on error.
    pub async fn observe<F>(&self, call: F) -> Result<Credentials, StsError>
    where
        F: Future<Output = Result<Credentials, StsError>>,
    {
        struct InFlight<'a>(&'a Gauge);
        impl Drop for InFlight<'_> {
            // A cancelled call must not leave the gauge raised.
            fn drop(&mut self) {
                self.0.dec();
            }
        }
        self.current.inc();
        let _in_flight = InFlight(&self.current);
        let started = tokio::time::Instant::now();
        let res = call.await;
        self.timing.observe(started.elapsed().as_secs_f64());
        if res.is_err() {
            self.errors.inc();
        }
        res
    }

    /// Errors counted so far (for tests and logs).
    pub fn errors(&self) -> u64 {
        self.errors.get()
    }
}

/// Why the STS client could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum StsSetupError {
    #[error(
        "--assume-role-arn {0:?} is not a role ARN (expected arn:aws:iam::<account>:role/<name>)"
    )]
    AssumeRoleArn(String),
    #[error("--region {0:?} is not a region name (expected e.g. eu-west-1)")]
    Region(String),
}

/// The region used when neither `--region` nor the environment names one:
/// STS's global endpoint lives there.
const GLOBAL_STS_REGION: &str = "us-east-1";
/// The session name of the server's own role (`--assume-role-arn`).
const SERVER_SESSION_NAME: &str = "kiam-server";
/// Bounds one AssumeRole call including the SDK's own retries, so a hung
/// connection never holds an identity's single in-flight slot for long.
const OPERATION_TIMEOUT: Duration = Duration::from_secs(10);
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(4);

/// The real STS, through `aws-sdk-sts`.
#[derive(Clone, Debug)]
pub struct StsClient {
    client: aws_sdk_sts::Client,
}

impl StsClient {
    /// Builds a client from the AWS SDK's default chains: credentials from
    /// env, profile, web identity (IRSA) or the instance profile; endpoint
    /// from `AWS_ENDPOINT_URL_STS` / `AWS_ENDPOINT_URL` (resolved by
    /// aws-config itself). `region` is `--region` (empty: `AWS_REGION` or the
    /// profile's region, else us-east-1, whose regional endpoint
    /// `sts.us-east-1.amazonaws.com` serves what the global endpoint did).
    /// A non-empty `assume_role_arn` (`--assume-role-arn`) makes the server
    /// first assume that role and use it for every pod's AssumeRole.
    ///
    /// Nothing is called here: missing credentials show up as errors of the
    /// first AssumeRole.
    pub async fn from_env(region: &str, assume_role_arn: &str) -> Result<StsClient, StsSetupError> {
        let region = region.trim();
        let assume_role_arn = assume_role_arn.trim();
        if !region.is_empty()
            && !region
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        {
            return Err(StsSetupError::Region(region.to_string()));
        }
        if !assume_role_arn.is_empty() && !assume_role_arn.starts_with("arn:") {
            return Err(StsSetupError::AssumeRoleArn(assume_role_arn.to_string()));
        }
        let flag_region = (!region.is_empty()).then(|| Region::new(region.to_string()));
        let region_chain = RegionProviderChain::first_try(flag_region)
            .or_default_provider()
            .or_else(Region::from_static(GLOBAL_STS_REGION));
        let base = aws_config::defaults(BehaviorVersion::latest())
            .region(region_chain)
            .timeout_config(
                TimeoutConfig::builder()
                    .operation_timeout(OPERATION_TIMEOUT)
                    .operation_attempt_timeout(ATTEMPT_TIMEOUT)
                    .build(),
            )
            .load()
            .await;
        let mut conf = aws_sdk_sts::config::Builder::from(&base);
        if !assume_role_arn.is_empty() {
            // The provider's own STS client is built from `base`, so it uses
            // the same endpoint, region and base credentials; the outer
            // client's identity cache refreshes the server role before expiry.
            let provider = AssumeRoleProvider::builder(assume_role_arn)
                .session_name(SERVER_SESSION_NAME)
                .configure(&base)
                .build()
                .await;
            conf = conf.credentials_provider(provider);
        }
        Ok(StsClient {
            client: aws_sdk_sts::Client::from_conf(conf.build()),
        })
    }

    /// A client from an explicit SDK configuration, reading no environment
    /// (tests and the sandbox point it at an emulator this way).
    pub fn from_conf(conf: aws_sdk_sts::Config) -> StsClient {
        StsClient {
            client: aws_sdk_sts::Client::from_conf(conf),
        }
    }

    /// The region calls are signed for (and, without a custom endpoint, sent to).
    pub fn region(&self) -> Option<String> {
        self.client.config().region().map(|r| r.to_string())
    }

    async fn call(
        &self,
        identity: &Identity,
        duration: Duration,
        tags: Option<&SessionTags>,
    ) -> Result<Credentials, StsError> {
        let mut req = self
            .client
            .assume_role()
            .role_arn(identity.role_arn.as_ref())
            .role_session_name(identity.session_name.as_ref())
            .set_external_id(identity.external_id.as_deref().map(str::to_string))
            .duration_seconds(i32::try_from(duration.as_secs()).unwrap_or(i32::MAX));
        for (key, value) in tags.into_iter().flat_map(SessionTags::pairs) {
            let tag = aws_sdk_sts::types::Tag::builder()
                .key(key)
                .value(value)
                .build()
                .map_err(|e| StsError {
                    code: Some("InvalidTag".into()),
                    message: format!("InvalidTag: session tag {key}: {e}"),
                    retryable: false,
                })?;
            req = req.tags(tag);
        }
        let out = req.send().await.map_err(sdk_error)?;
        let creds = out.credentials.ok_or_else(|| StsError {
            code: None,
            message: "STS answered AssumeRole without credentials".into(),
            retryable: true,
        })?;
        let exp = creds.expiration;
        let expiration =
            Timestamp::new(exp.secs(), exp.subsec_nanos() as i32).map_err(|e| StsError {
                code: None,
                message: format!("STS answered an unusable expiration: {e}"),
                retryable: true,
            })?;
        Ok(Credentials {
            access_key_id: creds.access_key_id,
            secret_access_key: creds.secret_access_key,
            session_token: creds.session_token,
            expiration,
            last_updated: Timestamp::now(),
        })
    }
}

impl AssumeRole for StsClient {
    fn assume_role<'a>(
        &'a self,
        identity: &'a Identity,
        duration: Duration,
        tags: Option<&'a SessionTags>,
    ) -> BoxFuture<'a, Result<Credentials, StsError>> {
        self.call(identity, duration, tags).boxed()
    }
}

/// AWS error codes that mean "slow down", retried like 5xx.
const THROTTLING_CODES: &[&str] = &[
    "Throttling",
    "ThrottlingException",
    "ThrottledException",
    "RequestThrottled",
    "RequestThrottledException",
    "RequestLimitExceeded",
    "TooManyRequestsException",
    "SlowDown",
    "PriorRequestNotComplete",
    "IDPCommunicationError",
    "InternalFailure",
    "ServiceUnavailable",
];

/// Keeps event and log messages readable: AWS messages can embed policies.
const MAX_MESSAGE: usize = 400;

fn shorten(mut s: String) -> String {
    if s.len() > MAX_MESSAGE {
        let mut cut = MAX_MESSAGE;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push('…');
    }
    s
}

/// Maps an SDK failure to a short `Code: message` and whether retrying can help.
fn sdk_error<E>(err: SdkError<E>) -> StsError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    match &err {
        SdkError::ServiceError(ctx) => {
            let status = ctx.raw().status();
            let code = ctx.err().code().map(str::to_string);
            let text = ctx.err().message().unwrap_or("no message").to_string();
            let retryable = status.is_server_error()
                || status.as_u16() == 429
                || code
                    .as_deref()
                    .is_some_and(|c| THROTTLING_CODES.contains(&c));
            let message = match &code {
                Some(c) => format!("{c}: {text}"),
                None => format!("HTTP {}: {text}", status.as_u16()),
            };
            StsError {
                code,
                message: shorten(message),
                retryable,
            }
        }
        SdkError::TimeoutError(_) => StsError::transient("Timeout", "STS did not answer in time"),
        SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => StsError::transient(
            "Unreachable",
            shorten(format!("calling STS failed: {}", DisplayErrorContext(&err))),
        ),
        _ => StsError {
            code: None,
            message: shorten(format!("cannot call STS: {}", DisplayErrorContext(&err))),
            retryable: false,
        },
    }
}

/// How a [`FakeSts`] call fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FakeFailure {
    /// `Throttling`, retryable.
    Throttle,
    /// `AccessDenied`, final.
    AccessDenied,
    /// Never answers (until the caller gives up).
    Hang,
    /// Answers, after the configured delay, the retryable `Timeout` the
    /// real client reports when STS does not answer in time.
    Timeout,
}

#[derive(Default)]
struct FakeState {
    calls: HashMap<Identity, usize>,
    in_flight: HashMap<Identity, usize>,
    max_in_flight: HashMap<Identity, usize>,
    tags: HashMap<Identity, Option<SessionTags>>,
    delay: Duration,
    lifetime: Option<Duration>,
    next_failures: VecDeque<FakeFailure>,
    always_fail: Option<FakeFailure>,
}

/// A test double for [`AssumeRole`], kept out of `cfg(test)` so integration
/// tests and the sandbox can use it. It counts calls and concurrent calls per
/// identity, waits a configurable delay (tokio time, so paused clocks work),
/// fails on demand, and issues unique AccessKeyIds expiring after the
/// requested duration (or [`FakeSts::set_lifetime`]).
#[derive(Default)]
pub struct FakeSts {
    // No `.await` happens under this lock.
    state: Mutex<FakeState>,
    serial: AtomicU64,
}

impl FakeSts {
    pub fn new() -> Self {
        Self::default()
    }

    /// Every call waits this long before answering.
    pub fn set_delay(&self, delay: Duration) {
        self.lock().delay = delay;
    }

    /// Issue credentials living this long instead of the requested duration
    /// (STS caps chained roles at 1h, for example). `None`: as requested.
    pub fn set_lifetime(&self, lifetime: Option<Duration>) {
        self.lock().lifetime = lifetime;
    }

    /// The next `n` calls (any identity) fail with `failure`.
    pub fn fail_next(&self, n: usize, failure: FakeFailure) {
        self.lock()
            .next_failures
            .extend(std::iter::repeat_n(failure, n));
    }

    /// Every call fails with `failure` until set back to `None`.
    pub fn fail_always(&self, failure: Option<FakeFailure>) {
        self.lock().always_fail = failure;
    }

    /// AssumeRole calls made for `identity`, finished or not.
    pub fn calls(&self, identity: &Identity) -> usize {
        self.lock().calls.get(identity).copied().unwrap_or(0)
    }

    /// AssumeRole calls made for any identity.
    pub fn total_calls(&self) -> usize {
        self.lock().calls.values().sum()
    }

    /// The most calls for `identity` that were ever in flight at once.
    pub fn max_in_flight(&self, identity: &Identity) -> usize {
        self.lock()
            .max_in_flight
            .get(identity)
            .copied()
            .unwrap_or(0)
    }

    /// The session tags of the last call for `identity`.
    pub fn last_tags(&self, identity: &Identity) -> Option<SessionTags> {
        self.lock().tags.get(identity).cloned().flatten()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FakeState> {
        // A panicking test thread must not hide the real failure behind poison.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn call(
        &self,
        identity: &Identity,
        duration: Duration,
        tags: Option<&SessionTags>,
    ) -> Result<Credentials, StsError> {
        let (delay, failure, lifetime) = {
            let mut st = self.lock();
            *st.calls.entry(identity.clone()).or_default() += 1;
            st.tags.insert(identity.clone(), tags.cloned());
            let now_in_flight = {
                let n = st.in_flight.entry(identity.clone()).or_default();
                *n += 1;
                *n
            };
            let max = st.max_in_flight.entry(identity.clone()).or_default();
            *max = (*max).max(now_in_flight);
            let failure = st.next_failures.pop_front().or(st.always_fail);
            (st.delay, failure, st.lifetime.unwrap_or(duration))
        };
        struct Leave<'a>(&'a FakeSts, &'a Identity);
        impl Drop for Leave<'_> {
            fn drop(&mut self) {
                if let Some(n) = self.0.lock().in_flight.get_mut(self.1) {
                    *n -= 1;
                }
            }
        }
        let _leave = Leave(self, identity);
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        match failure {
            Some(FakeFailure::Throttle) => Err(StsError {
                code: Some("Throttling".into()),
                message: "Throttling: Rate exceeded".into(),
                retryable: true,
            }),
            Some(FakeFailure::AccessDenied) => Err(StsError {
                code: Some("AccessDenied".into()),
                message: format!(
                    "AccessDenied: User: arn:aws:iam::123456789012:role/kiam-server is not authorized to perform: sts:AssumeRole on resource: {}",
                    identity.role_arn
                ),
                retryable: false,
            }),
            Some(FakeFailure::Hang) => futures::future::pending().await,
            Some(FakeFailure::Timeout) => Err(StsError::transient(
                "Timeout",
                "STS did not answer in time",
            )),
            None => {
                let n = self.serial.fetch_add(1, Ordering::Relaxed);
                let now = Timestamp::now();
                let lifetime = jiff::SignedDuration::try_from(lifetime).unwrap_or(jiff::SignedDuration::MAX);
                Ok(Credentials {
                    access_key_id: format!("ASIAFAKE{n:012}"),
                    secret_access_key: format!("fake-secret-{n}"),
                    session_token: format!("fake-token-{n}"),
                    expiration: now.saturating_add(lifetime).unwrap_or(Timestamp::MAX),
                    last_updated: now,
                })
            }
        }
    }
}

impl AssumeRole for FakeSts {
    fn assume_role<'a>(
        &'a self,
        identity: &'a Identity,
        duration: Duration,
        tags: Option<&'a SessionTags>,
    ) -> BoxFuture<'a, Result<Credentials, StsError>> {
        self.call(identity, duration, tags).boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(role: &str) -> Identity {
        Identity {
            role_arn: format!("arn:aws:iam::123456789012:role/{role}").into(),
            session_name: "kiam-kiam".into(),
            external_id: None,
        }
    }

    #[tokio::test]
    async fn fake_issues_unique_keys_expiring_after_the_duration() {
        let sts = FakeSts::new();
        let id = identity("a");
        let a = sts
            .assume_role(&id, Duration::from_secs(3600), None)
            .await
            .unwrap();
        let b = sts
            .assume_role(&id, Duration::from_secs(3600), None)
            .await
            .unwrap();
        assert_ne!(a.access_key_id, b.access_key_id);
        let life = a.expiration.duration_since(a.last_updated);
        assert_eq!(life, jiff::SignedDuration::from_secs(3600));
        assert_eq!(sts.calls(&id), 2);
        assert_eq!(sts.calls(&identity("b")), 0);
    }

    #[tokio::test]
    async fn fake_fails_on_demand() {
        let sts = FakeSts::new();
        let id = identity("a");
        sts.fail_next(1, FakeFailure::Throttle);
        let e = sts
            .assume_role(&id, Duration::from_secs(900), None)
            .await
            .unwrap_err();
        assert!(e.retryable);
        assert_eq!(e.code.as_deref(), Some("Throttling"));
        sts.fail_always(Some(FakeFailure::AccessDenied));
        let e = sts
            .assume_role(&id, Duration::from_secs(900), None)
            .await
            .unwrap_err();
        assert!(!e.retryable);
        assert!(e.message.starts_with("AccessDenied: "), "{}", e.message);
        sts.fail_always(None);
        assert!(sts
            .assume_role(&id, Duration::from_secs(900), None)
            .await
            .is_ok());
    }

    #[tokio::test]
    async fn metrics_count_errors_and_release_the_in_flight_gauge() {
        let mut registry = Registry::default();
        let m = StsMetrics::register(&mut registry);
        let sts = FakeSts::new();
        let id = identity("a");
        sts.fail_next(1, FakeFailure::Throttle);
        assert!(m
            .observe(sts.assume_role(&id, Duration::from_secs(900), None))
            .await
            .is_err());
        assert!(m
            .observe(sts.assume_role(&id, Duration::from_secs(900), None))
            .await
            .is_ok());
        let text = crate::telemetry::encode(&registry);
        assert!(text.contains("kiam_sts_issuing_errors_total 1"), "{text}");
        assert!(text.contains("kiam_sts_assumerole_current 0"), "{text}");
        assert!(
            text.contains("kiam_sts_assumerole_timing_seconds_count 2"),
            "{text}"
        );
    }

    #[test]
    fn session_tags_skip_empty_values() {
        let tags = SessionTags {
            namespace: "ns".into(),
            pod: "p".into(),
            service_account: String::new(),
        };
        let pairs: Vec<_> = tags.pairs().collect();
        assert_eq!(pairs, vec![("kiam-namespace", "ns"), ("kiam-pod", "p")]);
    }

    #[tokio::test]
    async fn setup_rejects_bad_flags_naming_them() {
        let e = StsClient::from_env("", "not-an-arn").await.unwrap_err();
        assert!(e.to_string().contains("--assume-role-arn"), "{e}");
        let e = StsClient::from_env("eu west", "").await.unwrap_err();
        assert!(e.to_string().contains("--region"), "{e}");
    }
}
