//! Asking the servers again inside a request's deadline.
//!
//! The surprise: the loop itself never decides that an error is final; the
//! caller's `stop` does (a policy denial, or an outage the fallback can
//! cover), because what is worth waiting for depends on what is being
//! fetched.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

use super::client::ClientError;

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

/// Calls `op` with backoff until it succeeds, `stop` says to stop, or the
/// deadline passes. kiam retried with 5 ms initial backoff; so do we, but
/// inside a budget SDKs will wait for.
pub(super) async fn retry<T, F, Fut>(
    deadline: Instant,
    mut op: F,
    mut stop: impl FnMut(&ClientError) -> bool,
) -> Result<T, RetryFailure>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, ClientError>>,
{
    let mut backoff = Duration::from_millis(5);
    let mut last: Option<ClientError> = None;
    let mut answered = false;
    let mut interrupted = false;
    loop {
        match tokio::time::timeout_at(deadline, op()).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) => {
                answered |= e.answered();
                if stop(&e) {
                    return Err(RetryFailure {
                        err: e,
                        interrupted: false,
                        answered,
                    });
                }
                last = Some(e);
            }
            Err(_) => {
                interrupted = true;
                break;
            }
        }
        if Instant::now() + backoff >= deadline {
            break;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_millis(200));
    }
    let err = last.unwrap_or_else(|| {
        ClientError::Unavailable("no kiam server answered before the deadline".into())
    });
    Err(RetryFailure {
        err,
        interrupted,
        answered,
    })
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[tokio::test]
    async fn a_stop_ends_the_loop_at_once_and_remembers_an_answer() {
        let calls = AtomicUsize::new(0);
        let deadline = Instant::now() + Duration::from_secs(5);
        let r: Result<(), _> = retry(
            deadline,
            || {
                calls.fetch_add(1, Ordering::SeqCst);
                async { Err(ClientError::NotFound) }
            },
            |_| true,
        )
        .await;
        let f = r.unwrap_err();
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert!(f.answered && !f.interrupted);
    }

    #[tokio::test]
    async fn outages_are_retried_until_the_deadline() {
        let calls = AtomicUsize::new(0);
        let deadline = Instant::now() + Duration::from_millis(100);
        let r: Result<(), _> = retry(
            deadline,
            || {
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
}
