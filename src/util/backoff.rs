//! One exponential backoff: step `n` may wait up to `base × 2ⁿ`, capped, with full or equal
//! jitter. Panic-free for any step.

use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Jitter {
    /// Uniform in `[0, ceiling]`: spreads retries the most.
    Full,
    /// Uniform in `[ceiling / 2, ceiling]`: never less than half the step.
    Equal,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    jitter: Jitter,
}

impl Backoff {
    pub const fn new(base: Duration, cap: Duration, jitter: Jitter) -> Self {
        Self { base, cap, jitter }
    }

    /// The longest wait of step `step`: `min(cap, base × 2^step)`.
    pub fn ceiling(&self, step: u32) -> Duration {
        self.base.saturating_mul(1u32 << step.min(31)).min(self.cap)
    }

    /// The wait of step `step`, jittered.
    pub fn delay(&self, step: u32) -> Duration {
        let ceiling = self.ceiling(step);
        match self.jitter {
            Jitter::Full => share(ceiling, fastrand::f64()),
            Jitter::Equal => ceiling / 2 + share(ceiling / 2, fastrand::f64()),
        }
    }
}

/// `d × r` for `r` in `[0, 1)`, never above `d` (`mul_f64` can round past `Duration::MAX`).
fn share(d: Duration, r: f64) -> Duration {
    Duration::try_from_secs_f64(d.as_secs_f64() * r)
        .unwrap_or(d)
        .min(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_to_the_cap_within_the_jitter() {
        let ms = Duration::from_millis;
        let full = Backoff::new(ms(50), ms(2000), Jitter::Full);
        assert_eq!(full.ceiling(0), ms(50));
        assert_eq!(full.ceiling(3), ms(400));
        assert_eq!(full.ceiling(6), ms(2000));
        let equal = Backoff::new(ms(1000), ms(60_000), Jitter::Equal);
        for step in [0, 1, 5, 6, 30, 31, 32, u32::MAX] {
            let d = full.delay(step);
            assert!(d <= full.ceiling(step), "{step}: {d:?}");
            let c = equal.ceiling(step);
            let d = equal.delay(step);
            assert!(d >= c / 2 && d <= c, "{step}: {d:?}");
        }
        assert_eq!(equal.ceiling(u32::MAX), ms(60_000));
        let huge = Backoff::new(Duration::MAX, Duration::MAX, Jitter::Equal);
        assert!(huge.delay(40) >= Duration::MAX / 2);
        assert!(share(Duration::MAX, 1.0 - f64::EPSILON) > Duration::MAX / 2);
        assert_eq!(share(ms(100), 0.5), ms(50));
    }
}
