//! An in-process STS double behind the server's `AssumeRole` seam. One
//! file, included with `#[path]` by the integration tests, by the server's
//! unit tests (the crate names itself `kiam` for them) and by kiam-bench.
#![allow(dead_code)]

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::FutureExt;
use jiff::Timestamp;
use kiam::server::model::{Identity, SessionTags};
use kiam::server::sts::{AssumeRole, Credentials, StsError};

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
    /// Calls in flight for any identity, and the most seen at once.
    total_in_flight: usize,
    max_total_in_flight: usize,
    tags: HashMap<Identity, Option<SessionTags>>,
    delay: Duration,
    lifetime: Option<Duration>,
    next_failures: VecDeque<FakeFailure>,
    always_fail: Option<FakeFailure>,
}

/// A test double for [`AssumeRole`], shared by the server's unit tests,
/// the integration tests and the benchmarks. It counts calls and concurrent calls per
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

    /// The most calls (any identities) that were ever in flight at once,
    /// since the start or [`FakeSts::reset_max_total_in_flight`].
    pub fn max_total_in_flight(&self) -> usize {
        self.lock().max_total_in_flight
    }

    /// Starts counting [`FakeSts::max_total_in_flight`] afresh from the
    /// calls in flight now.
    pub fn reset_max_total_in_flight(&self) {
        let mut st = self.lock();
        st.max_total_in_flight = st.total_in_flight;
    }

    /// The session tags of the last call for `identity`.
    pub fn last_tags(&self, identity: &Identity) -> Option<SessionTags> {
        self.lock().tags.get(identity).cloned().flatten()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FakeState> {
        // A panicking test thread must not hide the real failure behind poison.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn call(&self, identity: &Identity, duration: Duration) -> Result<Credentials, StsError> {
        let (delay, failure, lifetime) = {
            let mut st = self.lock();
            *st.calls.entry(identity.clone()).or_default() += 1;
            st.tags
                .insert(identity.clone(), identity.tags.as_deref().cloned());
            let now_in_flight = {
                let n = st.in_flight.entry(identity.clone()).or_default();
                *n += 1;
                *n
            };
            let max = st.max_in_flight.entry(identity.clone()).or_default();
            *max = (*max).max(now_in_flight);
            st.total_in_flight += 1;
            st.max_total_in_flight = st.max_total_in_flight.max(st.total_in_flight);
            let failure = st.next_failures.pop_front().or(st.always_fail);
            (st.delay, failure, st.lifetime.unwrap_or(duration))
        };
        struct Leave<'a>(&'a FakeSts, &'a Identity);
        impl Drop for Leave<'_> {
            fn drop(&mut self) {
                let mut st = self.0.lock();
                st.total_in_flight -= 1;
                if let Some(n) = st.in_flight.get_mut(self.1) {
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
    ) -> BoxFuture<'a, Result<Credentials, StsError>> {
        self.call(identity, duration).boxed()
    }
}
