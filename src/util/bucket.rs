//! One token bucket: `rate` tokens a second up to `burst`, refilled from the time between calls.
//! Pure arithmetic on the instants it is given; panic-free for any rate or burst (a rate that
//! is not a positive number earns nothing beyond the burst).

use std::time::Duration;
use tokio::time::Instant;

/// The longest wait [`TokenBucket::try_take`] reports, for a token that may never come (a rate
/// of zero) or would take longer than this.
pub const LONGEST_WAIT: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket as of `now`.
    pub fn new(rate_per_second: f64, burst: f64, now: Instant) -> Self {
        // NaN, zero and negative rates earn nothing; an infinite one is capped so that
        // `0 s × rate` stays 0 (not NaN).
        let rate = if rate_per_second > 0.0 {
            rate_per_second.min(f64::MAX)
        } else {
            0.0
        };
        let burst = if burst > 0.0 {
            burst.min(f64::MAX)
        } else {
            0.0
        };
        Self {
            rate,
            burst,
            tokens: burst,
            last: now,
        }
    }

    /// A new rate and burst as of `now` (a reload): what accrued at the old rate is kept,
    /// clamped to the new burst; a raised burst is not filled at once, the rate fills it.
    pub fn reconfigure(&mut self, rate_per_second: f64, burst: f64, now: Instant) {
        self.refill(now);
        let fresh = Self::new(rate_per_second, burst, now);
        self.rate = fresh.rate;
        self.burst = fresh.burst;
        self.tokens = self.tokens.min(self.burst);
    }

    pub fn rate(&self) -> f64 {
        self.rate
    }

    /// Tokens held as of the last [`refill`](Self::refill).
    pub fn tokens(&self) -> f64 {
        self.tokens
    }

    /// Adds what accrued since the last refill (an earlier `now` adds nothing).
    pub fn refill(&mut self, now: Instant) {
        let earned = now.saturating_duration_since(self.last).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + earned).min(self.burst);
        if now > self.last {
            self.last = now;
        }
    }

    /// Takes one token if a whole one is held (no refill).
    pub fn take(&mut self) -> bool {
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Returns one token taken but not used.
    pub fn give_back(&mut self) {
        self.tokens = (self.tokens + 1.0).min(self.burst);
    }

    /// Refills to `now` and takes one token, or says how long until one is due (at most
    /// [`LONGEST_WAIT`]).
    pub fn try_take(&mut self, now: Instant) -> Result<(), Duration> {
        self.refill(now);
        if self.take() {
            Ok(())
        } else {
            Err(self
                .time_for(1.0)
                .map_or(LONGEST_WAIT, |d| d.min(LONGEST_WAIT)))
        }
    }

    /// How long until `n` tokens will have been there to take, the held ones first and then
    /// each as it accrues (taken as it comes, so the burst does not cap the count): zero if
    /// they are held now, `None` if never or not within any representable time. A wait is at
    /// least a nanosecond, so a rounding residue (0.99999999 tokens) still moves the clock.
    pub fn time_for(&self, n: f64) -> Option<Duration> {
        let missing = n - self.tokens;
        if missing <= 0.0 {
            return Some(Duration::ZERO);
        }
        Duration::try_from_secs_f64(missing / self.rate)
            .ok()
            .map(|d| d.max(Duration::from_nanos(1)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn burst_then_rate() {
        let start = Instant::now();
        let mut b = TokenBucket::new(2.0, 3.0, start);
        for _ in 0..3 {
            assert_eq!(b.try_take(start), Ok(()));
        }
        assert_eq!(b.try_take(start), Err(Duration::from_millis(500)));
        let later = start + Duration::from_millis(500);
        assert_eq!(b.try_take(later), Ok(()));
        assert_eq!(b.time_for(1.0), Some(Duration::from_millis(500)));
        assert_eq!(b.time_for(2.0), Some(Duration::from_secs(1)));
        // Tokens taken as they come are not capped by the burst.
        assert_eq!(b.time_for(8.0), Some(Duration::from_secs(4)));
        // Never above the burst, and an earlier instant adds nothing.
        b.refill(start + Duration::from_secs(3600));
        assert_eq!(b.tokens(), 3.0);
        b.refill(start);
        assert_eq!(b.tokens(), 3.0);
        assert!(b.take());
        b.give_back();
        b.give_back();
        assert_eq!(b.tokens(), 3.0);
    }

    #[tokio::test(start_paused = true)]
    async fn any_rate_is_panic_free() {
        let now = Instant::now();
        for rate in [
            0.0,
            -1.0,
            f64::NAN,
            1e-300,
            f64::MIN_POSITIVE,
            f64::NEG_INFINITY,
        ] {
            let mut b = TokenBucket::new(rate, 1.0, now);
            assert_eq!(b.try_take(now), Ok(()), "the burst, at {rate}");
            let later = now + Duration::from_secs(3600);
            assert_eq!(b.try_take(later), Err(LONGEST_WAIT), "at {rate}");
            assert!(b.tokens() < 1.0);
        }
        for rate in [1e12, 1e300, f64::MAX, f64::INFINITY] {
            let mut b = TokenBucket::new(rate, 1e6, now);
            for _ in 0..3 {
                assert_eq!(b.try_take(now), Ok(()), "at {rate}");
            }
            b.refill(now + Duration::from_millis(1));
            assert_eq!(b.tokens(), 1e6);
            assert_eq!(b.time_for(1e6), Some(Duration::ZERO));
            assert!(b.time_for(2e6).is_some());
        }
        for burst in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let mut b = TokenBucket::new(1.0, burst, now);
            let _ = b.try_take(now + Duration::from_secs(5));
            let _ = b.time_for(1.0);
        }
    }
}
