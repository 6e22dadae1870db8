//! STS AssumeRole behind a trait ([`AssumeRole`]), so the credential cache
//! runs against the real `aws-sdk-sts` ([`StsClient`]) in production and
//! against an in-process fake in tests (tests/support/fake_sts.rs).
//!
//! Neither implementation caches, retries across calls or counts metrics:
//! [`super::credentials`] does all three, so every implementation is measured
//! the same way (through [`StsMetrics`]). The SDK's own per-call retries
//! (throttling, 5xx) still happen inside one [`StsClient`] call.

use std::future::Future;
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

use super::model::Identity;

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
    pub async fn from_env(region: Option<&str>, assume_role_arn: Option<&str>) -> StsClient {
        let flag_region = region.map(|r| Region::new(r.to_string()));
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
        if let Some(assume_role_arn) = assume_role_arn {
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
        StsClient {
            client: aws_sdk_sts::Client::from_conf(conf.build()),
        }
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

    async fn call(&self, identity: &Identity, duration: Duration) -> Result<Credentials, StsError> {
        let mut req = self
            .client
            .assume_role()
            .role_arn(identity.role_arn.as_ref())
            .role_session_name(identity.session_name.as_ref())
            .set_external_id(identity.external_id.as_deref().map(str::to_string))
            .duration_seconds(i32::try_from(duration.as_secs()).unwrap_or(i32::MAX));
        for (key, value) in identity.tags.iter().flat_map(|t| t.pairs()) {
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
    ) -> BoxFuture<'a, Result<Credentials, StsError>> {
        self.call(identity, duration).boxed()
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Fails the first call with `Throttling`, then issues credentials.
    struct ThrottleOnce(std::sync::atomic::AtomicBool);

    impl AssumeRole for ThrottleOnce {
        fn assume_role<'a>(
            &'a self,
            _identity: &'a Identity,
            duration: Duration,
        ) -> BoxFuture<'a, Result<Credentials, StsError>> {
            let first = !self.0.swap(true, std::sync::atomic::Ordering::SeqCst);
            async move {
                if first {
                    return Err(StsError::transient("Throttling", "Rate exceeded"));
                }
                let now = Timestamp::now();
                Ok(Credentials {
                    access_key_id: "ASIAEXAMPLE".into(),
                    secret_access_key: "secret".into(),
                    session_token: "token".into(),
                    expiration: now + jiff::SignedDuration::try_from(duration).unwrap(),
                    last_updated: now,
                })
            }
            .boxed()
        }
    }

    #[tokio::test]
    async fn metrics_count_errors_and_release_the_in_flight_gauge() {
        let mut registry = Registry::default();
        let m = StsMetrics::register(&mut registry);
        let sts = ThrottleOnce(Default::default());
        let id = Identity {
            role_arn: "arn:aws:iam::123456789012:role/a".into(),
            session_name: "kiam-kiam".into(),
            external_id: None,
            tags: None,
        };
        assert!(m
            .observe(sts.assume_role(&id, Duration::from_secs(900)))
            .await
            .is_err());
        assert!(m
            .observe(sts.assume_role(&id, Duration::from_secs(900)))
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
}
