//! Asking the servers again inside a request's deadline.
//!
//! The surprise: not every error is worth asking again, and not equally
//! often. A final answer (a policy denial, a `FAILED_PRECONDITION` refusal)
//! ends the loop at once; `no pod found` is asked at most
//! [`NOT_FOUND_ATTEMPTS`] times, spread over the deadline (the start-up race
//! is served within the SDK's second, but an address with no pod does not
//! cost the servers one API lookup per backoff step); the rest is retried
//! with backoff until the deadline. The caller's `stop` may end it sooner,
//! while no server has answered (an outage the fallback can cover).

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

use super::client::ClientError;

/// How often `no pod found` is asked within one request, first try included.
pub(super) const NOT_FOUND_ATTEMPTS: u32 = 3;

/// How long past the deadline an operation may run before the loop stops
/// waiting for it. Operations are given the deadline and are expected to be
/// over by then; this only guards against one that is not.
const GRACE: Duration = Duration::from_millis(50);

/// A failed exchange with the servers.
#[derive(Debug)]
pub(super) struct RetryFailure {
    pub(super) err: ClientError,
    /// The deadline cut an attempt short (504) rather than every attempt
    /// failing outright (502 when no server answered).
    pub(super) interrupted: bool,
    /// Some server answered at some point (so no fallback).
    pub(super) answered: bool,
}

/// Calls `op(deadline)` with backoff until it succeeds, the error is final,
/// `stop` says to stop, or the deadline passes. kiam retried with 5 ms
/// initial backoff; so do we, but inside a budget SDKs will wait for.
pub(super) async fn retry<T, F, Fut>(
    deadline: Instant,
    mut op: F,
    mut stop: impl FnMut(&ClientError) -> bool,
) -> Result<T, RetryFailure>
where
    F: FnMut(Instant) -> Fut,
    Fut: Future<Output = Result<T, ClientError>>,
{
    let start = Instant::now();
    let budget = deadline.saturating_duration_since(start);
    let mut backoff = Duration::from_millis(5);
    let mut not_found = 0;
    let mut answered = false;
    loop {
        let e = match tokio::time::timeout_at(deadline + GRACE, op(deadline)).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) => e,
            Err(_) => {
                // The operation did not say whether a server had the
                // request: assume one had (no fallback), as a slow server
                // has answered.
                return Err(RetryFailure {
                    err: ClientError::Timeout("no answer before the deadline".into()),
                    interrupted: true,
                    answered: true,
                });
            }
        };
        answered |= e.answered();
        let fail = |err| RetryFailure {
            err,
            interrupted: false,
            answered,
        };
        // `stop` is for outages the caller can cover; once a server has
        // answered, the request is no outage.
        if e.is_final() || (!answered && stop(&e)) {
            return Err(fail(e));
        }
        let wake = if matches!(e, ClientError::NotFound) {
            not_found += 1;
            if not_found >= NOT_FOUND_ATTEMPTS {
                return Err(fail(e));
            }
            start + budget * not_found / NOT_FOUND_ATTEMPTS
        } else {
            let wake = Instant::now() + backoff;
            backoff = (backoff * 2).min(Duration::from_millis(200));
            wake
        };
        if wake >= deadline {
            return Err(fail(e));
        }
        tokio::time::sleep_until(wake).await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[tokio::test]
    async fn a_stop_ends_an_outage_at_once_but_not_once_a_server_answered() {
        let calls = AtomicUsize::new(0);
        let deadline = Instant::now() + Duration::from_secs(5);
        let r: Result<(), _> = retry(
            deadline,
            |_| {
                calls.fetch_add(1, Ordering::SeqCst);
                async { Err(ClientError::Unavailable("down".into())) }
            },
            |_| true,
        )
        .await;
        let f = r.unwrap_err();
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert!(!f.answered && !f.interrupted);

        // A server answered (INTERNAL), then none could be reached: no
        // stop, the request is no outage.
        let calls = AtomicUsize::new(0);
        let deadline = Instant::now() + Duration::from_millis(100);
        let r: Result<(), _> = retry(
            deadline,
            |_| {
                let n = calls.fetch_add(1, Ordering::SeqCst);
                async move {
                    Err(if n == 0 {
                        ClientError::Server("internal".into())
                    } else {
                        ClientError::Unavailable("down".into())
                    })
                }
            },
            |_| true,
        )
        .await;
        let f = r.unwrap_err();
        assert!(calls.load(Ordering::SeqCst) > 2);
        assert!(f.answered);
    }

    #[tokio::test]
    async fn outages_are_retried_until_the_deadline() {
        let calls = AtomicUsize::new(0);
        let deadline = Instant::now() + Duration::from_millis(100);
        let r: Result<(), _> = retry(
            deadline,
            |_| {
                calls.fetch_add(1, Ordering::SeqCst);
                async { Err(ClientError::Unavailable("down".into())) }
            },
            |_| false,
        )
        .await;
        let f = r.unwrap_err();
        assert!(calls.load(Ordering::SeqCst) > 1, "retried");
        assert!(!f.answered, "no server answered");
        assert!(matches!(f.err, ClientError::Unavailable(_)));
    }

    #[tokio::test]
    async fn no_pod_found_is_asked_a_bounded_number_of_times() {
        let calls = AtomicUsize::new(0);
        let deadline = Instant::now() + Duration::from_millis(300);
        let r: Result<(), _> = retry(
            deadline,
            |_| {
                calls.fetch_add(1, Ordering::SeqCst);
                async { Err(ClientError::NotFound) }
            },
            |_| false,
        )
        .await;
        let f = r.unwrap_err();
        assert_eq!(calls.load(Ordering::SeqCst), NOT_FOUND_ATTEMPTS as usize);
        assert!(matches!(f.err, ClientError::NotFound) && !f.interrupted);
    }

    #[tokio::test]
    async fn final_answers_are_asked_once() {
        for e in [
            ClientError::Final("AccessDenied".into()),
            ClientError::Forbidden(None),
        ] {
            let calls = AtomicUsize::new(0);
            let deadline = Instant::now() + Duration::from_millis(300);
            let r: Result<(), _> = retry(
                deadline,
                |_| {
                    calls.fetch_add(1, Ordering::SeqCst);
                    let e = e.clone();
                    async move { Err(e) }
                },
                |_| false,
            )
            .await;
            assert!(r.is_err());
            assert_eq!(calls.load(Ordering::SeqCst), 1, "{e:?}");
        }
    }

    #[tokio::test]
    async fn an_operation_cut_by_the_deadline_counts_as_answered() {
        let deadline = Instant::now() + Duration::from_millis(50);
        let r: Result<(), _> = retry(
            deadline,
            |_| async {
                tokio::time::sleep(Duration::from_secs(5)).await;
                Ok(())
            },
            |_| false,
        )
        .await;
        let f = r.unwrap_err();
        assert!(f.interrupted && f.answered, "{f:?}");
    }
}
