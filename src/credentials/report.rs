//! What the token manager tells operators and takes from them: the readiness latch, `/status`,
//! clock-bound gauges, and `POST /credentials/reset`. Never a token value.

use super::guard::{Guard, RESET_ATTEMPTS};
use super::{calls, rfc3339, unix_secs, TokenManager};
use crate::observe::TokenLabel;
use crate::upstream::circuit::CircuitState;
use std::sync::atomic::Ordering;
use tokio::time::Instant;

/// Why `POST /credentials/reset` changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ResetError {
    #[error("the guard file could not be written: {0}")]
    GuardFile(String),
    /// Fleet mode: the fleet's numbers live in Redis, which did not answer.
    #[error("redis is unreachable: the fleet's login counts were not reset")]
    Redis,
}

impl ResetError {
    pub fn status(&self) -> http::StatusCode {
        match self {
            ResetError::GuardFile(_) => http::StatusCode::INTERNAL_SERVER_ERROR,
            ResetError::Redis => http::StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// Fixed words for the admin's answer.
    pub fn words(&self) -> &'static str {
        match self {
            ResetError::GuardFile(_) => "the guard file could not be written",
            ResetError::Redis => "redis is unreachable; the fleet's login counts were not reset",
        }
    }
}

impl TokenManager {
    /// The readiness latch (SPEC §7): `Ok` once both tokens have been held, whatever the upstream
    /// does afterwards (a paused or cut-off gateway still serves its cache); before that, the
    /// reasons it is not ready yet.
    pub fn readiness(&self) -> Result<(), Vec<String>> {
        if self.ready.load(Ordering::Acquire) {
            return Ok(());
        }
        let now = Instant::now();
        let mut reasons = Vec::new();
        if !self.creds.load().client_configured() {
            reasons.push(
                "no upstream client credentials configured (credentials.client_id, \
                 client_secret): no token call is made"
                    .to_string(),
            );
        }
        if !self.creds.load().user_configured() {
            reasons.push(
                "no upstream username and password configured (credentials.username, \
                 password): no login is sent"
                    .to_string(),
            );
        }
        if self.valid_oauth(now).is_none() {
            reasons.push("no OAuth token held yet".to_string());
        }
        if self.state.held_session().is_none() {
            reasons.push("no session token held yet".to_string());
        }
        for token in TokenLabel::ALL {
            let what = calls(token);
            let g = self.state.guard(token).lock();
            if g.locked {
                reasons.push(format!(
                    "{what} stopped: ThingSpace reports the user locked; POST /credentials/reset \
                     once it is unlocked"
                ));
            } else if g.is_stopped() {
                reasons.push(format!(
                    "{what} stopped one attempt short of ThingSpace's lock; fix the credentials, \
                     then POST /credentials/reset"
                ));
            } else if g.paused(now).is_some() {
                reasons.push(format!("{what} paused after rejected credentials"));
            } else if g.backoff_until.is_some_and(|u| u > now) {
                reasons.push(format!("{what} backing off after failures"));
            }
        }
        if self.fleet.as_ref().is_some_and(|f| !f.redis().is_up()) {
            reasons
                .push("redis unreachable: no session login until it answers (fleet mode)".into());
        }
        if self.upstream.cooldown_until().is_some() {
            reasons.push("upstream is throttling (429 cooldown)".to_string());
        }
        if self.upstream.circuit_state() == CircuitState::Open {
            reasons.push("upstream circuit is open".to_string());
        }
        Err(reasons)
    }

    /// `tokens` of `/status`: never a token value.
    pub fn status_json(&self) -> serde_json::Value {
        let now = Instant::now();
        let guard_json = |g: &Guard| {
            serde_json::json!({
                "failures": g.rejected,
                "attempts": g.attempts,
                "paused_until": g.paused(now).map(|u| rfc3339(self.wall(u))),
                "stopped": g.is_stopped(),
            })
        };
        let mut oauth_json = guard_json(&self.state.guard(TokenLabel::Oauth).lock());
        let mut session_json = guard_json(&self.state.guard(TokenLabel::Session).lock());
        let oauth = self.valid_oauth(now);
        let session = self.state.held_session();
        let session_exp = session.as_ref().map(|s| self.session_expiry(s));
        oauth_json["held"] = oauth.is_some().into();
        oauth_json["expires_at"] = oauth.map(|t| rfc3339(self.wall(t.expires_at))).into();
        session_json["held"] = session_exp.is_some_and(|e| e > now).into();
        session_json["expires_at"] = session_exp.map(|e| rfc3339(self.wall(e))).into();
        serde_json::json!({"oauth": oauth_json, "session": session_json})
    }

    /// Refreshes the gauges that depend on the clock (called at scrape time).
    pub fn update_metrics(&self) {
        let now = Instant::now();
        for token in TokenLabel::ALL {
            let g = self.state.guard(token).lock();
            let paused = g.is_stopped() || g.paused(now).is_some();
            self.metrics.login_paused(token, paused);
        }
        let session = self.state.held_session();
        let v = session
            .map(|s| unix_secs(self.wall(self.session_expiry(&s))))
            .unwrap_or(0.0);
        self.metrics.token_expiry(TokenLabel::Session, v);
        if self.state.held_oauth().is_none() {
            self.metrics.token_expiry(TokenLabel::Oauth, 0.0);
        }
    }

    /// `POST /credentials/reset` (SPEC §7), for the configured username: `rejected` to 0,
    /// `attempts` to 3 (one login before the stop again, so even a mistaken reset allows one
    /// attempt, never two), the pause and the stop lifted. `Err` when the numbers could not be
    /// stored (the next login is then refused too, as it cannot be recorded). In fleet mode
    /// the fleet's numbers, for every replica.
    pub async fn reset_login_guard(&self) -> Result<(), ResetError> {
        if let Some(f) = &self.fleet {
            return self.fleet_reset(f).await;
        }
        {
            let mut g = self.state.guard(TokenLabel::Session).lock();
            tracing::warn!(
                rejected = g.rejected,
                attempts = g.attempts,
                stopped = g.is_stopped(),
                "login guard reset on the admin API: {RESET_ATTEMPTS} attempts counted, one login \
                 allowed before the stop"
            );
            g.reset();
        }
        let saved = self.save_session_guard().await;
        self.wake.notify_one();
        saved.map_err(ResetError::GuardFile)
    }
}
