//! The lockout guard's rules (SPEC §5), for one kind of token call: `rejected` in a row and the
//! pause, `attempts` and the stop (session logins only), and the jittered backoff of transient
//! failures and of renewals that did not cure a refusal. Pure bookkeeping: no I/O, no clock reads.

use crate::error::GatewayError;
use crate::util::backoff::{Backoff, Jitter};
use std::time::Duration;
use tokio::time::Instant;

/// ThingSpace locks the user at this many failed logins in a row.
pub const THINGSPACE_LOCKOUT: u32 = 5;
/// At this many attempts without an accepted login the gateway stops: one more could lock.
pub const STOP_AT_ATTEMPTS: u32 = THINGSPACE_LOCKOUT - 1;
/// `POST /credentials/reset` leaves this many attempts: even a mistaken reset allows one login.
pub const RESET_ATTEMPTS: u32 = STOP_AT_ATTEMPTS - 1;
const TRANSIENT_BACKOFF_BASE: Duration = Duration::from_secs(1);
const TRANSIENT_BACKOFF_CAP: Duration = Duration::from_secs(60);
const TRANSIENT_BACKOFF: Backoff =
    Backoff::new(TRANSIENT_BACKOFF_BASE, TRANSIENT_BACKOFF_CAP, Jitter::Equal);

/// The transient backoff's first step and cap (the fleet's backoff steps in Redis use them).
pub(super) fn backoff_bounds() -> (Duration, Duration) {
    (TRANSIENT_BACKOFF_BASE, TRANSIENT_BACKOFF_CAP)
}

// What a client is told when the credentials are the cause: fixed words, no counts or durations
// (those go to the log).
pub const REJECTED: &str = "upstream rejected the gateway's credentials";
pub const PAUSED: &str = "upstream logins are paused after rejected credentials";
pub const STOPPED: &str =
    "upstream logins are stopped to protect the account until an operator resets them";
pub const LOCKED: &str = "upstream reports the user locked";
pub const NOT_CONFIGURED: &str = "upstream credentials are not configured";
pub const BEARER_REFUSED: &str = "upstream refused a freshly issued bearer token";

/// Where a refused token was used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Origin {
    Login,
    Page,
}

/// What a request meeting the backoff is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Cause {
    /// Connect errors, timeouts, 5xx, malformed answers, a guard write that failed: 503.
    Transient,
    /// A fresh bearer was refused too: the credentials are the cause, 502.
    BearerRefused,
}

#[derive(Default)]
pub(crate) struct Guard {
    /// Calls rejected for credentials in a row.
    pub(super) rejected: u32,
    /// Logins sent since the last accepted one (session only).
    pub(super) attempts: u32,
    pub(super) paused_until: Option<Instant>,
    /// No call until `POST /credentials/reset` (session only).
    pub(super) stopped: bool,
    /// The stop came from ThingSpace saying the user is locked.
    pub(super) locked: bool,
    /// Backoff steps in a row.
    pub(super) transient: u32,
    pub(super) backoff_until: Option<Instant>,
    pub(super) cause: Option<Cause>,
    /// A refresh returned the same, already expired token: wait this long before asking again.
    pub(super) not_before: Option<Instant>,
    /// A token of this kind was refused and renewed: if the renewed one is refused too, back off
    /// instead of renewing again. Cleared when a call with the token is accepted.
    pub(super) suspect: Option<Origin>,
}

impl Cause {
    fn error(self, retry_after: Duration) -> GatewayError {
        match self {
            Cause::Transient => GatewayError::TokensUnavailable { retry_after },
            Cause::BearerRefused => GatewayError::UpstreamAuthFailed(BEARER_REFUSED),
        }
    }
}

impl Guard {
    pub(super) fn is_stopped(&self) -> bool {
        self.stopped || self.attempts >= STOP_AT_ATTEMPTS
    }

    pub(super) fn paused(&self, now: Instant) -> Option<Instant> {
        self.paused_until.filter(|u| *u > now)
    }

    /// `Err` while stopped, paused or backing off.
    pub(super) fn check(&self, now: Instant) -> Result<(), GatewayError> {
        if self.is_stopped() {
            let words = if self.locked { LOCKED } else { STOPPED };
            return Err(GatewayError::UpstreamAuthFailed(words));
        }
        if self.paused(now).is_some() {
            return Err(GatewayError::UpstreamAuthFailed(PAUSED));
        }
        if let Some(until) = self.backoff_until.filter(|u| *u > now) {
            let cause = self.cause.unwrap_or(Cause::Transient);
            return Err(cause.error(until - now));
        }
        Ok(())
    }

    /// An accepted call: the counts start over. Backoff steps only while no renewed token is
    /// under suspicion (a token endpoint that answers does not prove the token is accepted).
    pub(super) fn accepted(&mut self) {
        self.rejected = 0;
        self.attempts = 0;
        self.paused_until = None;
        self.stopped = false;
        self.locked = false;
        self.backoff_until = None;
        if self.suspect.is_none() {
            self.transient = 0;
        }
    }

    /// One backoff step: 1 s doubling to 60 s, with equal jitter (at least half the step, so a
    /// failing upstream is never hammered). Returns the error for the request that failed.
    pub(super) fn back_off(&mut self, cause: Cause, now: Instant) -> GatewayError {
        self.transient = self.transient.saturating_add(1);
        let wait = TRANSIENT_BACKOFF.delay(self.transient);
        self.backoff_until = Some(now + wait);
        self.cause = Some(cause);
        cause.error(wait)
    }

    /// A call rejected for credentials: pause at `max_failed` in a row, stop at the attempts
    /// limit. One log line says which.
    pub(super) fn rejected(
        &mut self,
        what: &str,
        status: u16,
        max_failed: u32,
        pause: Duration,
        now: Instant,
    ) {
        self.rejected = self.rejected.saturating_add(1);
        if self.is_stopped() {
            self.stop(what);
        } else if self.rejected >= max_failed {
            self.paused_until = Some(now + pause);
            tracing::error!(
                rejected = self.rejected,
                attempts = self.attempts,
                status,
                pause_secs = pause.as_secs(),
                "upstream {what} rejected {} times in a row; pausing them for {}s so the \
                 ThingSpace account does not lock",
                self.rejected,
                pause.as_secs()
            );
        } else {
            tracing::warn!(
                rejected = self.rejected,
                attempts = self.attempts,
                status,
                "upstream {what} rejected the credentials"
            );
        }
    }

    /// Stops logins (once; logged once).
    pub(super) fn stop(&mut self, what: &str) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        tracing::error!(
            rejected = self.rejected,
            attempts = self.attempts,
            "upstream {what} stopped: {} attempts without an accepted login, one more could lock \
             the ThingSpace account; fix the credentials, make sure ThingSpace's own count is \
             back to zero, then POST /credentials/reset on the admin API",
            self.attempts
        );
    }

    /// ThingSpace says the user is locked: stop at once.
    pub(super) fn locked(&mut self, what: &str) {
        self.rejected = self.rejected.saturating_add(1);
        self.locked = true;
        self.stopped = true;
        tracing::error!(
            "upstream {what} answered that the ThingSpace user is locked; no login until it is \
             unlocked (a support call) and POST /credentials/reset on the admin API"
        );
    }

    /// `POST /credentials/reset`: one attempt before the stop again, pause and stop lifted.
    pub(super) fn reset(&mut self) {
        self.rejected = 0;
        self.attempts = RESET_ATTEMPTS;
        self.paused_until = None;
        self.stopped = false;
        self.locked = false;
        self.transient = 0;
        self.backoff_until = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn login(g: &mut Guard, now: Instant) -> bool {
        if g.check(now).is_err() {
            return false;
        }
        g.attempts += 1;
        g.rejected("logins", 400, 2, Duration::from_secs(900), now);
        true
    }

    #[tokio::test(start_paused = true)]
    async fn pauses_then_stops_at_four_attempts() {
        let mut g = Guard::default();
        let pause = Duration::from_secs(900);
        let now = Instant::now();
        assert!(login(&mut g, now));
        assert!(g.check(now).is_ok(), "one rejection: keep trying");
        assert!(login(&mut g, now));
        assert_eq!(
            g.check(now),
            Err(GatewayError::UpstreamAuthFailed(PAUSED)),
            "paused after max_failed_logins"
        );
        assert!(g.check(now + pause).is_ok(), "the pause ends");
        assert!(login(&mut g, now + pause));
        assert!(!login(&mut g, now + pause * 2 - Duration::from_secs(1)));
        assert!(login(&mut g, now + pause * 2));
        assert!(g.stopped, "four attempts without an accepted login: stop");
        assert_eq!(
            g.check(now + pause * 100),
            Err(GatewayError::UpstreamAuthFailed(STOPPED))
        );
        g.reset();
        assert_eq!(g.attempts, RESET_ATTEMPTS);
        assert!(login(&mut g, now), "a reset allows one attempt");
        assert!(!login(&mut g, now + pause * 100), "and only one");
        g.accepted();
        assert!(g.check(now).is_ok() && g.rejected == 0 && g.attempts == 0);
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_doubles_to_a_minute_without_counting() {
        let mut g = Guard::default();
        let now = Instant::now();
        let e = g.back_off(Cause::Transient, now);
        assert!(matches!(e, GatewayError::TokensUnavailable { .. }));
        assert_eq!(g.rejected, 0);
        let until = g.backoff_until.unwrap();
        assert!(until >= now + Duration::from_secs(1) && until <= now + Duration::from_secs(2));
        assert!(matches!(
            g.check(now),
            Err(GatewayError::TokensUnavailable { .. })
        ));
        assert!(g.check(until).is_ok());
        for _ in 0..20 {
            g.back_off(Cause::BearerRefused, now);
        }
        assert!(g.backoff_until.unwrap() <= now + TRANSIENT_BACKOFF_CAP);
        assert!(g.backoff_until.unwrap() >= now + TRANSIENT_BACKOFF_CAP / 2);
        assert_eq!(
            g.check(now),
            Err(GatewayError::UpstreamAuthFailed(BEARER_REFUSED))
        );
    }
}
