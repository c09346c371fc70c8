//! The token manager in fleet mode (SPEC §10): each step of a token call that the fleet
//! shares, as the token exchange and the background loop use it.
//!
//! - Before a call: the fleet's token is adopted when another replica holds a newer one;
//!   otherwise [`TokenManager::fleet_turn`] asks Redis for the turn (guard check, charge and
//!   lease at once) and, while another replica holds the lease, waits for its result.
//! - After it: the outcome is settled in Redis and mirrored here; an obtained token is
//!   published (sealed, fenced) and the lease released with it.
//! - All along: the session's use is pushed at most once per `session_margin(idle)`
//!   (`fleet/sync.rs` pushes the remembered numbers and converges the tokens on a rejoin).
//! - Redis unreachable: no login (503, or stale); the OAuth token renewed alone at most once
//!   per [`LOCAL_OAUTH_EVERY`]; held tokens keep being used.

use super::{
    Code, FleetTurn, Keys, Limits, SharedToken, SharedTokens, LOCAL_OAUTH_EVERY, POLL_EVERY,
};
use crate::credentials::exchange::Turn;
use crate::credentials::guard::{self, Cause};
use crate::credentials::{
    calls, session_margin, unix_secs, ExchangeError, OAuthToken, SessionToken, TokenManager,
};
use crate::error::GatewayError;
use crate::observe::TokenLabel;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// What a settled token call did to the guard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EventKind {
    Accepted,
    Rejected,
    Locked,
    Nothing,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Event {
    pub(crate) kind: EventKind,
    /// The charged attempt provably did not count.
    pub(crate) refund: bool,
    /// A transient failure: one backoff step for the fleet.
    pub(crate) backoff: bool,
}

impl Event {
    pub(crate) fn code(&self) -> &'static str {
        match self.kind {
            EventKind::Accepted => "a",
            EventKind::Rejected => "r",
            EventKind::Locked => "l",
            EventKind::Nothing => "n",
        }
    }
}

/// A request that needs a token call while Redis is unreachable: 503, not the credentials' 502.
pub(crate) fn unavailable() -> GatewayError {
    GatewayError::TokensUnavailable {
        retry_after: crate::fleet::PROBE_EVERY,
    }
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl TokenManager {
    pub(super) fn fleet_keys(&self, f: &SharedTokens, token: TokenLabel) -> Keys {
        f.keys(token, &self.creds.load())
    }

    /// The fingerprint of the credentials a call of `token` sends, as the fleet keeps it (keyed:
    /// Redis alone does not allow guessing a password from it).
    pub(super) fn fleet_fp(&self, token: TokenLabel) -> String {
        let Some(f) = &self.fleet else {
            return String::new();
        };
        let login = self.creds.load();
        match token {
            TokenLabel::Oauth => f.keyed(&login.client_fingerprint),
            TokenLabel::Session => f.keyed(&login.fingerprint),
        }
    }

    /// How long a lease lives past its holder's last renewal (SPEC §10).
    pub(super) fn lease_for(&self) -> Duration {
        self.upstream.settings().timeout + Duration::from_secs(1)
    }

    pub(super) fn limits(&self) -> Limits {
        let s = self.settings.load();
        Limits {
            max_failed: s.max_failed_logins,
            pause: s.login_pause,
        }
    }

    /// The fleet's turn for one call of `token`: granted (the lease, and for logins the attempt
    /// charged, in one script), or refused as paused, stopped or backing off. While another
    /// replica holds the lease (or a fresh guard waits for the live replicas' numbers) it waits
    /// for that replica's result to `deadline`, and returns [`ExchangeError::Adopted`] once a
    /// token arrived.
    pub(in crate::credentials) async fn fleet_turn(
        &self,
        token: TokenLabel,
        charged: bool,
        deadline: Instant,
    ) -> Result<Turn, ExchangeError> {
        let Some(f) = &self.fleet else {
            return Ok(Turn::Local);
        };
        let what = calls(token);
        loop {
            let keys = self.fleet_keys(f, token);
            let fp = self.fleet_fp(token);
            let lease_for = self.lease_for();
            let (known, min_ttl) = self.fleet_known(f, token);
            let pause = self.limits().pause;
            let begun = f
                .begin(&keys, &fp, charged, lease_for, pause, known, min_ttl)
                .await;
            let (v, owner) = match begun {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "redis unreachable: no upstream {what} sent");
                    return Err(ExchangeError::Other(unavailable()));
                }
            };
            self.fleet_learn(f, token, &keys, &v).await;
            let wait = Duration::from_millis(v.extra);
            let refused = |e| Err(ExchangeError::Other(e));
            match v.code {
                Code::Granted => {
                    let turn = FleetTurn::new(f.clone(), keys, owner, v.extra, lease_for);
                    return Ok(Turn::Fleet(turn));
                }
                Code::Stopped => {
                    let words = if v.numbers.locked {
                        guard::LOCKED
                    } else {
                        guard::STOPPED
                    };
                    return refused(GatewayError::UpstreamAuthFailed(words));
                }
                Code::Paused => return refused(GatewayError::UpstreamAuthFailed(guard::PAUSED)),
                Code::Backoff => {
                    let mut g = self.state.guard(token).lock();
                    g.backoff_until = Some(Instant::now() + wait);
                    g.cause = Some(Cause::Transient);
                    return refused(GatewayError::TokensUnavailable { retry_after: wait });
                }
                Code::Fresh => {
                    if self.fleet_adopt(f, token).await {
                        return Err(ExchangeError::Adopted);
                    }
                    if Instant::now() + POLL_EVERY > deadline {
                        return refused(GatewayError::UpstreamTimeout);
                    }
                    tokio::time::sleep(POLL_EVERY).await;
                }
                Code::Busy | Code::Wait => {
                    let nap = POLL_EVERY.min(wait).max(Duration::from_millis(5));
                    if Instant::now() + nap > deadline {
                        return refused(GatewayError::UpstreamTimeout);
                    }
                    tokio::time::sleep(nap).await;
                    if self.fleet_adopt(f, token).await {
                        return Err(ExchangeError::Adopted);
                    }
                }
                Code::Done => return refused(unavailable()),
            }
        }
    }

    /// The newest fence of `token` this replica holds or refused (a token in Redis above it is
    /// news), and the least time left that makes a shared token worth adopting.
    fn fleet_known(&self, f: &SharedTokens, token: TokenLabel) -> (u64, Duration) {
        match token {
            TokenLabel::Oauth => {
                let held = self.state.held_oauth().map_or(0, |t| t.fence);
                (held.max(f.refused(token)), Duration::ZERO)
            }
            TokenLabel::Session => {
                let held = self.state.held_session().map_or(0, |s| s.fence);
                let idle = self.settings.load().session_idle_timeout;
                (held.max(f.refused(token)), session_margin(idle))
            }
        }
    }

    /// Settles a call made on the fleet's turn: in Redis (one script), then mirrored. When Redis
    /// does not take it, this replica remembers it and pushes it later.
    pub(in crate::credentials) async fn fleet_settle(
        &self,
        token: TokenLabel,
        charged: bool,
        event: Event,
        turn: &FleetTurn,
    ) {
        let Some(f) = &self.fleet else { return };
        let fp = self.fleet_fp(token);
        let settled = f
            .settle(&turn.keys, &fp, charged, event, self.limits(), &turn.owner)
            .await;
        match settled {
            Ok(v) => {
                if event.kind != EventKind::Accepted {
                    turn.released();
                }
                self.fleet_learn(f, token, &turn.keys, &v).await;
                if event.backoff && v.extra > 0 {
                    let mut g = self.state.guard(token).lock();
                    g.backoff_until = Some(Instant::now() + Duration::from_millis(v.extra));
                }
            }
            Err(e) => {
                tracing::error!(
                    error = %e,
                    "cannot record the outcome of upstream {} in redis; kept here and pushed \
                     when redis answers",
                    calls(token)
                );
                self.fleet_remember_mirror(token);
            }
        }
    }

    /// Adopts the fleet's token when Redis has a usable one newer than the one held (a newer
    /// fence; for the session also a later idle expiry of the same one). `true` when a token of
    /// `token`'s kind is held and valid afterwards because of it.
    pub(in crate::credentials) async fn fleet_adopt(
        &self,
        f: &SharedTokens,
        token: TokenLabel,
    ) -> bool {
        let keys = self.fleet_keys(f, token);
        let Ok(Some(shared)) = f.read(&keys).await else {
            return false;
        };
        if shared.fence == f.refused(token) {
            return false;
        }
        let now = Instant::now();
        match token {
            TokenLabel::Oauth => {
                if shared.ttl.is_zero() {
                    return false;
                }
                if let Some(held) = self.valid_oauth(now) {
                    if held.fence >= shared.fence {
                        return false;
                    }
                }
                let expires_at = now + shared.ttl;
                let t = Arc::new(OAuthToken {
                    token: shared.token,
                    obtained_at: expires_at.checked_sub(shared.life).unwrap_or(now),
                    expires_at,
                    same_returned: shared.same,
                    fence: shared.fence,
                });
                self.metrics
                    .token_expiry(TokenLabel::Oauth, unix_secs(self.wall(expires_at)));
                self.state.store_oauth(Some(t));
                true
            }
            TokenLabel::Session => {
                let idle = self.settings.load().session_idle_timeout;
                if shared.ttl <= session_margin(idle) {
                    return false;
                }
                let last_used = self.ms(now + shared.ttl) - millis(idle);
                match self.state.held_session() {
                    Some(held) if held.fence > shared.fence => return false,
                    Some(held) if held.fence == shared.fence => {
                        // Kept alive by another replica's use.
                        held.last_used_ms.fetch_max(last_used, Ordering::Relaxed);
                    }
                    _ => {
                        self.state.store_session(Some(Arc::new(SessionToken {
                            token: shared.token,
                            last_used_ms: AtomicI64::new(last_used),
                            fence: shared.fence,
                        })));
                    }
                }
                let valid = self.valid_session(now).is_some();
                if valid && self.valid_oauth(now).is_some() {
                    self.ready.store(true, Ordering::Release);
                }
                valid
            }
        }
    }

    /// Publishes the OAuth token obtained on the fleet's turn and releases the lease with it.
    pub(in crate::credentials) async fn fleet_publish_oauth(&self, t: &OAuthToken, turn: Turn) {
        let (Some(f), Turn::Fleet(turn)) = (&self.fleet, turn) else {
            return;
        };
        let now = Instant::now();
        let shared = SharedToken {
            token: t.token.clone(),
            fence: turn.fence,
            ttl: t.expires_at.saturating_duration_since(now),
            life: t.expires_at.saturating_duration_since(t.obtained_at),
            same: t.same_returned,
        };
        match f.publish(&turn.keys, &shared, &turn.owner).await {
            Ok(_) => turn.released(),
            Err(e) => tracing::warn!(error = %e, "cannot share the new OAuth token in redis"),
        }
    }

    /// Publishes the session obtained on the fleet's turn and releases the lease with it.
    pub(in crate::credentials) async fn fleet_publish_session(&self, s: &SessionToken, turn: Turn) {
        let (Some(f), Turn::Fleet(turn)) = (&self.fleet, turn) else {
            return;
        };
        let shared = SharedToken {
            token: s.token.clone(),
            fence: turn.fence,
            ttl: self
                .session_expiry(s)
                .saturating_duration_since(Instant::now()),
            life: Duration::ZERO,
            same: false,
        };
        match f.publish(&turn.keys, &shared, &turn.owner).await {
            Ok(_) => turn.released(),
            Err(e) => tracing::warn!(error = %e, "cannot share the new session in redis"),
        }
    }

    /// A request was answered with the session: pushes its idle expiry to the fleet, at most
    /// once per `session_margin(idle)` per replica (not a Redis write per request).
    pub(in crate::credentials) fn fleet_touch(&self, f: &Arc<SharedTokens>, s: &SessionToken) {
        if s.fence == 0 || !f.redis().is_up() {
            return;
        }
        let idle = self.settings.load().session_idle_timeout;
        let every = millis(session_margin(idle)).max(1);
        let now = Instant::now();
        let now_ms = self.ms(now);
        let last = f.pushed_ms.load(Ordering::Relaxed);
        if now_ms.saturating_sub(last) < every
            || f.pushed_ms
                .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        let ttl = self.session_expiry(s).saturating_duration_since(now);
        let (keys, f, fence) = (self.fleet_keys(f, TokenLabel::Session), f.clone(), s.fence);
        tokio::spawn(async move { f.touch(&keys, fence, ttl).await });
    }

    /// The upstream refused the token of `fence`: the fleet drops it too.
    pub(in crate::credentials) fn fleet_refused(
        &self,
        f: &Arc<SharedTokens>,
        token: TokenLabel,
        fence: u64,
    ) {
        let keys = self.fleet_keys(f, token);
        f.refuse(token, &keys, fence);
    }

    /// While Redis is unreachable the OAuth token may be renewed alone, at most once a minute.
    pub(in crate::credentials) fn local_oauth_allowed(
        &self,
        f: &SharedTokens,
    ) -> Result<(), GatewayError> {
        let now = Instant::now();
        let mut at = f.local_oauth_at.lock();
        if let Some(last) = *at {
            let next = last + LOCAL_OAUTH_EVERY;
            if now < next {
                return Err(GatewayError::TokensUnavailable {
                    retry_after: next - now,
                });
            }
        }
        *at = Some(now);
        tracing::warn!("redis unreachable: renewing the OAuth token alone (at most once a minute)");
        Ok(())
    }
}
