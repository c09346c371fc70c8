//! One token exchange, used by both logins (SPEC §5): configured? → guard (stop, pause,
//! backoff) → a `not_before` wait → upstream open (no cooldown, circuit closed) → charge the
//! attempt → call → judge the answer → settle it in the guard → metric → store the numbers.
//! Each login ([`super::oauth`], [`super::login`]) describes only what differs: which token, its
//! request, whether its attempts are charged, and how an answer becomes a token.

use super::fleet::{Event, EventKind, FleetTurn};
use super::guard::{self, Cause};
use super::{calls, ExchangeError, TokenManager};
use crate::error::GatewayError;
use crate::observe::{Endpoint, RefreshOutcome, TokenLabel};
use crate::upstream::transport::{OutRequest, RawResponse};
use std::sync::atomic::{AtomicU32, Ordering};
use tokio::time::Instant;

/// What a token call's answer (or its absence) means for the guard.
#[derive(Debug)]
pub(super) enum Outcome<T> {
    Accepted(T),
    /// Refused for credentials: a 4xx other than 429 (for logins, a 401 without a `fault` body).
    Rejected(u16),
    /// ThingSpace says the user is locked.
    Locked(u16),
    /// A login's `fault` 401: the bearer, not the credentials (the attempt stays charged: only
    /// connect errors and 5xx are refunded).
    BearerRefused,
    /// Provably not judged: never sent, a connect error, or a 5xx answer. Refunded.
    NotJudged(GatewayError),
    /// Outcome unknown (timeout, connection lost after sending, 429, an unusable answer): stays
    /// charged.
    Unknown(GatewayError),
}

impl<T> Outcome<T> {
    pub(super) fn map<U>(self, f: impl FnOnce(T) -> U) -> Outcome<U> {
        match self {
            Outcome::Accepted(t) => Outcome::Accepted(f(t)),
            Outcome::Rejected(s) => Outcome::Rejected(s),
            Outcome::Locked(s) => Outcome::Locked(s),
            Outcome::BearerRefused => Outcome::BearerRefused,
            Outcome::NotJudged(e) => Outcome::NotJudged(e),
            Outcome::Unknown(e) => Outcome::Unknown(e),
        }
    }
}

/// When a token call was sent, and under which fleet fence (0: not shared).
#[derive(Debug, Clone, Copy)]
pub(super) struct Sent {
    pub(super) at: Instant,
    pub(super) fence: u64,
}

/// Whose turn a token call is: this process's alone, or the fleet's (a lease in Redis).
pub(super) enum Turn {
    Local,
    Fleet(FleetTurn),
}

impl Turn {
    fn fence(&self) -> u64 {
        match self {
            Turn::Local => 0,
            Turn::Fleet(t) => t.fence,
        }
    }
}

/// One token call, as its login describes it.
pub(super) struct Exchange<P> {
    pub(super) token: TokenLabel,
    pub(super) endpoint: Endpoint,
    /// The credentials the call sends are configured; no call otherwise.
    pub(super) configured: bool,
    /// Each call is charged to the guard's `attempts` and stored before it is sent, and stored
    /// again once settled (session logins: their guard is the stored one). The token request's
    /// guard only pauses: ThingSpace's lock is on the user.
    pub(super) charged: bool,
    /// Fleet mode with Redis reachable: the fleet's guard and lease (Redis) decide, not this
    /// process's alone.
    pub(super) fleet: bool,
    pub(super) request: OutRequest,
    /// An answer and when the call was sent (lifetimes count from it) → its meaning.
    pub(super) parse: P,
}

/// A call's result → its meaning. `made`: upstream attempts (0: nothing was sent).
pub(super) fn judge<T>(
    result: Result<RawResponse, GatewayError>,
    made: u32,
    parse: impl FnOnce(RawResponse) -> Outcome<T>,
) -> Outcome<T> {
    match result {
        Err(e) if made == 0 || crate::upstream::unjudged(&e) => Outcome::NotJudged(e),
        Err(e) => Outcome::Unknown(e),
        Ok(resp) => parse(resp),
    }
}

impl TokenManager {
    /// Runs one token call under the guard of `x.token`. The caller holds the token's refresh
    /// lease and stores the token it gets (and, in fleet mode, publishes it with the turn).
    pub(super) async fn exchange<T, P>(
        &self,
        x: Exchange<P>,
        deadline: Instant,
    ) -> Result<(T, Turn), ExchangeError>
    where
        P: FnOnce(RawResponse, Sent) -> Outcome<T>,
    {
        if !x.configured {
            let e = GatewayError::UpstreamAuthFailed(guard::NOT_CONFIGURED);
            return Err(ExchangeError::Other(e));
        }
        let now = Instant::now();
        let not_before = {
            let g = self.state.guard(x.token).lock();
            g.check(now).map_err(ExchangeError::Other)?;
            g.not_before
        };
        if let Some(nb) = not_before.filter(|nb| *nb > now) {
            if nb > deadline {
                return Err(ExchangeError::Other(GatewayError::UpstreamTimeout));
            }
            tokio::time::sleep_until(nb).await;
        }
        self.upstream_open(Instant::now())
            .map_err(ExchangeError::Other)?;
        let turn = if x.fleet {
            self.fleet_turn(x.token, x.charged, deadline).await?
        } else {
            if x.charged {
                self.charge(x.token).await.map_err(ExchangeError::Other)?;
            }
            Turn::Local
        };
        let sent = Sent {
            at: Instant::now(),
            fence: turn.fence(),
        };
        let made = AtomicU32::new(0);
        let result = self
            .upstream
            .call(x.endpoint, x.request, deadline, &made)
            .await;
        let made = made.load(Ordering::Relaxed);
        let parse = x.parse;
        let outcome = judge(result, made, |resp| parse(resp, sent));
        let token = self
            .settle(x.token, x.charged, outcome, made, &turn)
            .await?;
        Ok((token, turn))
    }

    /// Charges one attempt and makes it durable; `Err` (refunded, backing off) when it cannot
    /// be stored: the login is not sent then.
    async fn charge(&self, token: TokenLabel) -> Result<(), GatewayError> {
        self.state.guard(token).lock().attempts += 1;
        if let Err(e) = self.save_session_guard().await {
            let mut g = self.state.guard(token).lock();
            g.attempts = g.attempts.saturating_sub(1);
            tracing::error!(error = %e, "cannot record the login attempt in the guard file; no login sent");
            return Err(g.back_off(Cause::Transient, Instant::now()));
        }
        Ok(())
    }

    /// Applies a call's outcome to the guard, counts it, stores the numbers (charged calls), and
    /// answers the request.
    async fn settle<T>(
        &self,
        token: TokenLabel,
        charged: bool,
        outcome: Outcome<T>,
        made: u32,
        turn: &Turn,
    ) -> Result<T, ExchangeError> {
        let what = calls(token);
        let now = Instant::now();
        let event = |kind, refund, backoff| Event {
            kind,
            refund,
            backoff,
        };
        let (result, metric, event) = {
            let mut g = self.state.guard(token).lock();
            let settled = match outcome {
                Outcome::Accepted(t) => {
                    g.accepted();
                    let ev = event(EventKind::Accepted, false, false);
                    (Ok(t), Some(RefreshOutcome::Success), ev)
                }
                Outcome::Rejected(status) => {
                    let settings = self.settings.load();
                    g.rejected(
                        what,
                        status,
                        settings.max_failed_logins,
                        settings.login_pause,
                        now,
                    );
                    let e = GatewayError::UpstreamAuthFailed(guard::REJECTED);
                    let ev = event(EventKind::Rejected, false, false);
                    (
                        Err(ExchangeError::Other(e)),
                        Some(RefreshOutcome::Rejected),
                        ev,
                    )
                }
                Outcome::Locked(status) => {
                    tracing::error!(status, "upstream {what} answered: user locked");
                    g.locked(what);
                    let e = GatewayError::UpstreamAuthFailed(guard::LOCKED);
                    let ev = event(EventKind::Locked, false, false);
                    (
                        Err(ExchangeError::Other(e)),
                        Some(RefreshOutcome::Rejected),
                        ev,
                    )
                }
                Outcome::BearerRefused => (
                    Err(ExchangeError::BearerRefused),
                    Some(RefreshOutcome::Failure),
                    event(EventKind::Nothing, false, false),
                ),
                Outcome::NotJudged(e) => {
                    if charged {
                        g.attempts = g.attempts.saturating_sub(1);
                    }
                    if made == 0 {
                        // Our own protection held it back: no failure counted, no backoff.
                        let ev = event(EventKind::Nothing, charged, false);
                        (Err(ExchangeError::Other(e)), None, ev)
                    } else {
                        tracing::warn!(
                            token = token.as_str(),
                            error = %e,
                            "upstream {what} failed before judging the credentials; backing off"
                        );
                        let e = g.back_off(Cause::Transient, now);
                        let ev = event(EventKind::Nothing, charged, true);
                        (
                            Err(ExchangeError::Other(e)),
                            Some(RefreshOutcome::Failure),
                            ev,
                        )
                    }
                }
                Outcome::Unknown(e) => {
                    tracing::warn!(
                        token = token.as_str(),
                        error = %e,
                        attempt_counted = charged,
                        "upstream {what} failed, outcome unknown; backing off"
                    );
                    let backoff = g.back_off(Cause::Transient, now);
                    let e = match e {
                        // A 429 answer keeps its reason (metrics, Retry-After of the cooldown).
                        GatewayError::UpstreamUnavailable { .. } => e,
                        _ => backoff,
                    };
                    let ev = event(EventKind::Nothing, false, true);
                    (
                        Err(ExchangeError::Other(e)),
                        Some(RefreshOutcome::Failure),
                        ev,
                    )
                }
            };
            if g.is_stopped() {
                g.stop(what);
            }
            settled
        };
        if let Some(m) = metric {
            self.metrics.token_refresh(token, m);
        }
        match turn {
            Turn::Fleet(t) => self.fleet_settle(token, charged, event, t).await,
            Turn::Local => {
                if charged {
                    if let Err(e) = self.save_session_guard().await {
                        tracing::error!(error = %e, "cannot record the login outcome in the guard file");
                    }
                }
                // Fleet mode with Redis unreachable: remembered, pushed when it is back.
                self.fleet_remember_mirror(token);
            }
        }
        if let Err(ExchangeError::Other(GatewayError::UpstreamUnavailable {
            retry_after, ..
        })) = &result
        {
            *self.closed_until.lock() = Some(now + *retry_after);
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_judged_by_whether_the_upstream_could_judge() {
        let never = |_| -> Outcome<()> { panic!("no answer to parse") };
        assert!(matches!(
            judge(Err(GatewayError::UpstreamTimeout), 1, never),
            Outcome::Unknown(_)
        ));
        assert!(matches!(
            judge(Err(GatewayError::UpstreamTimeout), 0, never),
            Outcome::NotJudged(_)
        ));
    }
}
