//! The lockout guard: rejected logins in a row, the pause before ThingSpace's lock, and the
//! jittered backoff of transient failures.

use crate::error::GatewayError;
use std::time::Duration;
use tokio::time::Instant;

/// ThingSpace locks the account at this many failed logins in a row; the guard stops below it.
pub const THINGSPACE_LOCKOUT: u32 = 5;
const TRANSIENT_BACKOFF_BASE: Duration = Duration::from_secs(1);
const TRANSIENT_BACKOFF_CAP: Duration = Duration::from_secs(60);

/// Failure bookkeeping for one kind of login.
#[derive(Default)]
pub(super) struct Guard {
    /// Rejected logins in a row.
    pub(super) failures: u32,
    pub(super) paused_until: Option<Instant>,
    /// Set once the next rejection would reach ThingSpace's lock: no more logins until restart.
    pub(super) stopped: bool,
    pub(super) transient: u32,
    pub(super) backoff_until: Option<Instant>,
    pub(super) last_error: Option<GatewayError>,
    /// A refresh returned the same, already expired token: wait this long before asking again.
    pub(super) not_before: Option<Instant>,
}

impl Guard {
    pub(super) fn check(&self, what: &str, now: Instant) -> Result<(), GatewayError> {
        if self.stopped {
            return Err(GatewayError::UpstreamAuthFailed(format!(
                "upstream {what} stopped after {} rejected attempts in a row; fix the credentials and restart",
                self.failures
            )));
        }
        if let Some(until) = self.paused_until.filter(|u| *u > now) {
            return Err(GatewayError::UpstreamAuthFailed(format!(
                "upstream {what} paused for {}s after {} rejected attempts in a row",
                (until - now).as_secs(),
                self.failures
            )));
        }
        if self.backoff_until.is_some_and(|u| u > now) {
            return Err(self.last_error.clone().unwrap_or_else(|| {
                GatewayError::UpstreamAuthFailed(format!("upstream {what} failed"))
            }));
        }
        Ok(())
    }

    pub(super) fn success(&mut self) {
        *self = Guard::default();
    }

    pub(super) fn transient(&mut self, err: GatewayError, now: Instant) {
        self.transient = self.transient.saturating_add(1);
        let ceiling = TRANSIENT_BACKOFF_BASE
            .saturating_mul(1 << self.transient.min(10))
            .min(TRANSIENT_BACKOFF_CAP);
        // Equal jitter: at least half the ceiling, so a failing upstream is never hammered.
        let wait = ceiling / 2 + (ceiling / 2).mul_f64(fastrand::f64());
        self.backoff_until = Some(now + wait);
        self.last_error = Some(err);
    }

    pub(super) fn rejected(
        &mut self,
        what: &str,
        status: u16,
        max_failed: u32,
        pause: Duration,
        now: Instant,
    ) {
        self.failures += 1;
        if self.failures >= THINGSPACE_LOCKOUT - 1 {
            self.stopped = true;
            tracing::error!(
                failures = self.failures,
                status,
                "upstream {what} rejected {} times in a row; no further attempt until restart, \
                 one more would lock the ThingSpace account",
                self.failures
            );
        } else if self.failures >= max_failed {
            self.paused_until = Some(now + pause);
            tracing::error!(
                failures = self.failures,
                status,
                pause_secs = pause.as_secs(),
                "upstream {what} rejected {} times in a row; pausing logins to avoid locking the ThingSpace account",
                self.failures
            );
        } else {
            tracing::warn!(
                failures = self.failures,
                status,
                "upstream {what} rejected the credentials"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn pauses_then_stops_one_short_of_the_lock() {
        let mut g = Guard::default();
        let pause = Duration::from_secs(900);
        let now = Instant::now();
        g.rejected("logins", 400, 2, pause, now);
        assert!(g.check("logins", now).is_ok(), "one rejection: keep trying");
        g.rejected("logins", 400, 2, pause, now);
        assert!(
            g.check("logins", now).is_err(),
            "paused after max_failed_logins"
        );
        assert!(g.check("logins", now + pause).is_ok(), "the pause ends");
        g.rejected("logins", 400, 2, pause, now + pause);
        assert!(g
            .check("logins", now + pause * 2 - Duration::from_secs(1))
            .is_err());
        g.rejected("logins", 400, 2, pause, now + pause * 2);
        assert!(g.stopped, "four rejections in a row: stop");
        assert!(g.check("logins", now + pause * 100).is_err());
        g.success();
        assert!(g.check("logins", now).is_ok() && g.failures == 0);
    }

    #[tokio::test(start_paused = true)]
    async fn transient_failures_back_off_without_counting() {
        let mut g = Guard::default();
        let now = Instant::now();
        g.transient(GatewayError::UpstreamTimeout, now);
        assert_eq!(g.failures, 0);
        assert_eq!(g.check("logins", now), Err(GatewayError::UpstreamTimeout));
        let until = g.backoff_until.unwrap();
        assert!(until >= now + Duration::from_secs(1) && until <= now + Duration::from_secs(2));
        assert!(g.check("logins", until).is_ok());
        for _ in 0..20 {
            g.transient(GatewayError::UpstreamTimeout, now);
        }
        assert!(g.backoff_until.unwrap() <= now + TRANSIENT_BACKOFF_CAP);
    }
}
