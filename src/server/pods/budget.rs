//! The confirmation budget (`--pod-confirmations-per-second`): a token
//! bucket, so a burst of busy pods costs the API server a bounded number of
//! GETs however many pods there are.

use std::time::Instant;

/// A token bucket: at most `rate` takes per second, `rate` at once.
#[derive(Debug)]
pub(super) struct Budget {
    rate: f64,
    tokens: f64,
    at: Instant,
}

impl Budget {
    pub(super) fn new(rate: u32) -> Self {
        Budget {
            rate: f64::from(rate),
            tokens: f64::from(rate),
            at: Instant::now(),
        }
    }

    pub(super) fn take(&mut self) -> bool {
        let now = Instant::now();
        let refill = now.duration_since(self.at).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + refill).min(self.rate);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}
