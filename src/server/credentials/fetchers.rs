//! How many background STS calls run at once: adaptive, between 1 and
//! `--fetchers`.
//!
//! The surprise: `--fetchers` is a ceiling, not the concurrency. The limit
//! starts at kiam's old fixed 8 and moves like TCP's congestion window:
//! while calls are waiting for a slot and STS answers as fast as it has
//! (no slower than twice the quickest answer seen), each answer adds one
//! slot, doubling the limit every round trip up to the ceiling (slow start)
//! or, after a throttle, up to half the limit at which it came (then one slot
//! per round trip). A throttling error (`Throttling`, `RequestLimitExceeded`,
//! ...) halves the limit, once per round trip: calls that were already in
//! flight when it was halved do not halve it again. So a burst of new
//! identities fills the ceiling within a few round trips, and a throttling
//! STS sees the calls shrink to one at a time rather than a storm.
//!
//! Calls a request is waiting for never wait for a slot (a pod must not
//! queue behind prefetch), but they count as in flight and their answers
//! steer the limit like any other.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// Where the limit starts: kiam's fixed default.
const INITIAL: f64 = 8.0;

/// AWS error codes that mean "too many requests" (not a server fault).
const THROTTLED: &[&str] = &[
    "Throttling",
    "ThrottlingException",
    "ThrottledException",
    "RequestThrottled",
    "RequestThrottledException",
    "RequestLimitExceeded",
    "TooManyRequestsException",
    "SlowDown",
];

/// Whether an STS error code says to slow down.
pub(super) fn is_throttling(code: Option<&str>) -> bool {
    code.is_some_and(|c| THROTTLED.contains(&c))
}

/// How an STS call went, for the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Outcome {
    /// Answered (credentials or a refusal that is not throttling).
    Answered,
    /// Throttled.
    Throttled,
    /// Anything else (a timeout, a 5xx): no signal either way.
    Failed,
}

struct State {
    /// Current limit; fractional so that the additive phase can add one
    /// slot per round trip (1/limit per answer).
    limit: f64,
    /// Slow start (doubling) below this, additive above.
    threshold: f64,
    in_flight: usize,
    /// Background calls waiting for a slot: growth only when they exist.
    waiting: usize,
    /// The quickest answer seen: "STS answers quickly" is relative to it.
    quickest: Option<Duration>,
    /// When the limit was last halved; calls started before then do not
    /// halve it again.
    last_cut: Option<Instant>,
}

/// The adaptive limit. One per credential cache.
pub(super) struct Fetchers {
    ceiling: usize,
    // std Mutex: held to read or update a few numbers, never across an await.
    state: Mutex<State>,
    freed: Notify,
}

/// A slot for one STS call; give it back with [`Slot::done`] (dropping it
/// gives it back without a signal).
pub(super) struct Slot {
    fetchers: Arc<Fetchers>,
    started: Instant,
    /// What the call said, given back with the slot.
    outcome: Option<Outcome>,
}

impl Fetchers {
    /// `ceiling`: `--fetchers`.
    pub(super) fn new(ceiling: usize) -> Arc<Self> {
        let ceiling = ceiling.max(1);
        Arc::new(Fetchers {
            ceiling,
            state: Mutex::new(State {
                limit: INITIAL.min(ceiling as f64),
                threshold: ceiling as f64,
                in_flight: 0,
                waiting: 0,
                quickest: None,
                last_cut: None,
            }),
            freed: Notify::new(),
        })
    }

    /// Waits for a slot under the current limit.
    pub(super) async fn acquire(self: &Arc<Self>) -> Slot {
        let mut counted = Waiting(None);
        loop {
            let notified = self.freed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut st = self.lock();
                if st.in_flight < (st.limit as usize).max(1) {
                    st.in_flight += 1;
                    if counted.0.take().is_some() {
                        st.waiting -= 1;
                    }
                    let room = st.in_flight < st.limit as usize;
                    drop(st);
                    if room {
                        // Pass the wake-up on: more may fit.
                        self.freed.notify_one();
                    }
                    return self.slot();
                }
                if counted.0.is_none() {
                    st.waiting += 1;
                    counted.0 = Some(self.clone());
                }
            }
            notified.await;
        }
    }

    /// A slot taken whatever the limit (a request is waiting on the call).
    pub(super) fn enter(self: &Arc<Self>) -> Slot {
        self.lock().in_flight += 1;
        self.slot()
    }

    /// The current limit, rounded down (tests, metrics).
    pub(super) fn limit(&self) -> usize {
        (self.lock().limit as usize).max(1)
    }

    fn slot(self: &Arc<Self>) -> Slot {
        Slot {
            fetchers: self.clone(),
            started: Instant::now(),
            outcome: None,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn release(&self, started: Instant, outcome: Option<Outcome>) {
        let mut st = self.lock();
        st.in_flight -= 1;
        let ceiling = self.ceiling as f64;
        match outcome {
            Some(Outcome::Answered) => {
                let took = started.elapsed();
                let quickest = *st.quickest.get_or_insert(took);
                st.quickest = Some(quickest.min(took));
                let quick = took <= quickest.saturating_mul(2);
                if quick && st.waiting > 0 {
                    let step = if st.limit < st.threshold {
                        1.0
                    } else {
                        1.0 / st.limit
                    };
                    st.limit = (st.limit + step).min(ceiling);
                }
            }
            Some(Outcome::Throttled) => {
                if st.last_cut.is_none_or(|cut| started >= cut) {
                    st.limit = (st.limit / 2.0).max(1.0);
                    st.threshold = st.limit;
                    st.last_cut = Some(Instant::now());
                    tracing::info!(
                        limit = st.limit as usize,
                        "STS is throttling: halved the concurrent credential fetches (ceiling --fetchers)"
                    );
                }
            }
            Some(Outcome::Failed) | None => {}
        }
        drop(st);
        self.freed.notify_one();
    }
}

/// Counts a waiter until it gets a slot, also if it is cancelled.
struct Waiting(Option<Arc<Fetchers>>);

impl Drop for Waiting {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            f.lock().waiting -= 1;
        }
    }
}

impl Slot {
    /// Gives the slot back with what the call said about STS.
    pub(super) fn done(mut self, outcome: Outcome) {
        self.outcome = Some(outcome);
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.fetchers.release(self.started, self.outcome);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn grows_while_answers_are_quick_and_calls_wait() {
        let f = Fetchers::new(64);
        assert_eq!(f.limit(), 8);
        // Nobody waiting: no growth however quick.
        let s = f.acquire().await;
        tokio::time::advance(Duration::from_millis(100)).await;
        s.done(Outcome::Answered);
        assert_eq!(f.limit(), 8);

        // Eight in flight and one waiting: each quick answer adds a slot.
        let slots: Vec<Slot> = futures::future::join_all((0..8).map(|_| f.acquire())).await;
        let waiter = tokio::spawn({
            let f = f.clone();
            async move { f.acquire().await }
        });
        tokio::task::yield_now().await;
        assert_eq!(f.lock().waiting, 1);
        tokio::time::advance(Duration::from_millis(100)).await;
        for s in slots {
            s.done(Outcome::Answered);
        }
        let _w = waiter.await.unwrap();
        assert_eq!(f.limit(), 16, "eight quick answers while one call waited");
        // A slow answer (over twice the quickest) holds the limit.
        let slots: Vec<Slot> = futures::future::join_all((0..15).map(|_| f.acquire())).await;
        let waiter = tokio::spawn({
            let f = f.clone();
            async move { f.acquire().await }
        });
        tokio::task::yield_now().await;
        tokio::time::advance(Duration::from_millis(500)).await;
        for s in slots {
            s.done(Outcome::Answered);
        }
        drop(waiter.await.unwrap());
        assert_eq!(f.limit(), 16);
    }

    #[tokio::test(start_paused = true)]
    async fn throttling_halves_once_per_round_trip_down_to_one() {
        let f = Fetchers::new(64);
        let slots: Vec<Slot> = futures::future::join_all((0..8).map(|_| f.acquire())).await;
        tokio::time::advance(Duration::from_millis(100)).await;
        // Eight throttled answers of one round: one halving.
        for s in slots {
            s.done(Outcome::Throttled);
        }
        assert_eq!(f.limit(), 4);
        for _ in 0..10 {
            let s = f.acquire().await;
            tokio::time::advance(Duration::from_millis(1)).await;
            s.done(Outcome::Throttled);
        }
        assert_eq!(f.limit(), 1);
        // At the floor a call still runs.
        let s = f.acquire().await;
        s.done(Outcome::Failed);
    }

    #[tokio::test(start_paused = true)]
    async fn the_ceiling_holds_and_requests_never_wait() {
        let f = Fetchers::new(3);
        assert_eq!(f.limit(), 3);
        let slots: Vec<Slot> = futures::future::join_all((0..3).map(|_| f.acquire())).await;
        let urgent = f.enter();
        assert_eq!(f.lock().in_flight, 4);
        let mut queued = Box::pin(f.acquire());
        assert!(futures::poll!(&mut queued).is_pending());
        drop(urgent);
        assert!(
            futures::poll!(&mut queued).is_pending(),
            "still 3 in flight"
        );
        drop(slots);
        let _s = queued.await;
        assert!(is_throttling(Some("RequestLimitExceeded")));
        assert!(!is_throttling(Some("AccessDenied")));
    }
}
