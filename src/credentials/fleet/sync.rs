//! What a replica remembers of the fleet's guard and how it stays in step (SPEC §10): every
//! verdict mirrored and remembered (and kept in the guard file, when there is one), the pushes
//! every [`SYNC_EVERY`] and on each rejoin, the tokens converged after a rejoin, and the fleet's
//! reset.

use super::{Keys, Numbers, SharedToken, SharedTokens, Verdict, SYNC_EVERY};
use crate::credentials::guard::Guard;
use crate::credentials::report::ResetError;
use crate::credentials::store::Record;
use crate::credentials::{calls, OAuthToken, SessionToken, TokenManager};
use crate::observe::TokenLabel;
use crate::util::Shutdown;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// The guard's numbers as Redis gave them, into the local guard (what `/status`, `/readyz` and
/// the checks made without a Redis call read). Local-only fields (backoff steps, suspicion) stay.
fn mirror(g: &mut Guard, v: &Verdict, now: Instant) {
    let n = &v.numbers;
    g.rejected = n.rejected;
    g.attempts = n.attempts;
    g.stopped = n.stopped;
    g.locked = n.locked;
    g.paused_until = (n.paused_until_ms > v.now_ms && !v.lift)
        .then(|| now + Duration::from_millis(n.paused_until_ms - v.now_ms));
}

impl TokenManager {
    /// Takes a guard verdict: remembered, mirrored, kept in the guard file (logins), and the
    /// background loop woken when it lifted a stop or a pause.
    pub(super) async fn fleet_learn(
        &self,
        f: &SharedTokens,
        token: TokenLabel,
        keys: &Keys,
        v: &Verdict,
    ) {
        let changed = f.remember(&keys.guard, v.numbers, v.now_ms);
        let now = Instant::now();
        let (was_blocked, blocked, newly_stopped) = {
            let mut g = self.state.guard(token).lock();
            let was_stopped = g.is_stopped();
            let was_blocked = was_stopped || g.paused(now).is_some();
            mirror(&mut g, v, now);
            let stopped = g.is_stopped();
            (
                was_blocked,
                stopped || g.paused(now).is_some(),
                stopped && !was_stopped,
            )
        };
        if newly_stopped {
            tracing::error!(
                rejected = v.numbers.rejected,
                attempts = v.numbers.attempts,
                locked = v.numbers.locked,
                "upstream {} are stopped for the fleet (seen in redis); no login until POST \
                 /credentials/reset on the admin API of any replica",
                calls(token)
            );
        }
        if was_blocked && !blocked {
            self.wake.notify_one();
        }
        if changed && token == TokenLabel::Session {
            self.fleet_save_file(f, v.numbers).await;
        }
    }

    /// Keeps the fleet's login numbers in the guard file too, when one is configured (this
    /// replica's durable memory; Redis holds the fleet's).
    async fn fleet_save_file(&self, f: &SharedTokens, n: Numbers) {
        let login = self.creds.load_full();
        if !login.user_configured() {
            return;
        }
        let record = Record {
            rejected: n.rejected,
            attempts: n.attempts,
            paused_until: (n.paused_until_ms > 0).then(|| {
                humantime::format_rfc3339_millis(f.wall_of(n.paused_until_ms)).to_string()
            }),
            stopped: n.stopped,
            locked: n.locked,
            fingerprint: login.fingerprint.clone(),
            epoch: n.epoch,
        };
        let _turn = self.save_order.lock().await;
        if let Err(e) = self.state.guard_store().save(&login.username, record).await {
            tracing::warn!(error = %e, "cannot keep the fleet's login counts in the guard file");
        }
    }

    /// Adds the guard file's numbers (if any) to what this replica remembers: pushed to Redis
    /// by the next script call.
    pub(in crate::credentials) fn fleet_remember_file(&self, f: &SharedTokens) {
        let login = self.creds.load();
        if !login.user_configured() {
            return;
        }
        let r = self.state.guard_store().load(&login.username);
        let paused_until_ms = r
            .paused_until
            .as_deref()
            .and_then(|s| humantime::parse_rfc3339_weak(s).ok())
            .map(|wall| f.redis_ms(wall))
            .unwrap_or(0);
        let n = Numbers {
            epoch: r.epoch,
            rejected: r.rejected,
            attempts: r.attempts,
            paused_until_ms,
            stopped: r.stopped,
            locked: r.locked,
        };
        f.remember_max(&f.keys(TokenLabel::Session, &login).guard, n);
    }

    /// What this replica learned without Redis (a call made alone, a settle Redis did not
    /// take): remembered, pushed when Redis answers again. No-op outside fleet mode.
    pub(in crate::credentials) fn fleet_remember_mirror(&self, token: TokenLabel) {
        let Some(f) = &self.fleet else { return };
        let keys = self.fleet_keys(f, token);
        let now = Instant::now();
        let n = {
            let g = self.state.guard(token).lock();
            Numbers {
                epoch: f.remembered(&keys.guard).epoch,
                rejected: g.rejected,
                attempts: g.attempts,
                paused_until_ms: g.paused(now).map(|u| f.redis_ms(self.wall(u))).unwrap_or(0),
                stopped: g.stopped,
                locked: g.locked,
            }
        };
        f.remember_max(&keys.guard, n);
    }

    /// Pushes what this replica remembers of both guards and mirrors the fleet's numbers.
    async fn fleet_sync(&self, f: &SharedTokens) {
        let login = self.creds.load_full();
        for token in TokenLabel::ALL {
            let configured = match token {
                TokenLabel::Oauth => login.client_configured(),
                TokenLabel::Session => login.user_configured(),
            };
            if !configured {
                continue;
            }
            let keys = f.keys(token, &login);
            match f
                .sync(&keys, &self.fleet_fp(token), self.limits().pause)
                .await
            {
                Ok(v) => self.fleet_learn(f, token, &keys, &v).await,
                Err(_) => return,
            }
        }
    }

    /// After a (re)join: the fleet's tokens where Redis has newer ones; this replica's where
    /// Redis has none (it restarted empty); one shared token either way.
    async fn fleet_converge(&self, f: &SharedTokens) {
        let login = self.creds.load_full();
        if login.client_configured() && !self.fleet_adopt(f, TokenLabel::Oauth).await {
            self.fleet_offer_oauth(f).await;
        }
        if login.user_configured() && !self.fleet_adopt(f, TokenLabel::Session).await {
            self.fleet_offer_session(f).await;
        }
    }

    async fn fleet_offer_oauth(&self, f: &SharedTokens) {
        let now = Instant::now();
        let Some(t) = self.valid_oauth(now) else {
            return;
        };
        let fence = if t.fence != 0 {
            t.fence
        } else {
            f.local_fence()
        };
        let shared = SharedToken {
            token: t.token.clone(),
            fence,
            ttl: t.expires_at.saturating_duration_since(now),
            life: t.expires_at.saturating_duration_since(t.obtained_at),
            same: t.same_returned,
        };
        let keys = self.fleet_keys(f, TokenLabel::Oauth);
        match f.offer(&keys, &shared).await {
            Ok(true) if t.fence == 0 => self.state.store_oauth(Some(Arc::new(OAuthToken {
                token: t.token.clone(),
                obtained_at: t.obtained_at,
                expires_at: t.expires_at,
                same_returned: t.same_returned,
                fence,
            }))),
            Ok(true) | Err(_) => {}
            // Another replica's is there now: that one.
            Ok(false) => {
                self.fleet_adopt(f, TokenLabel::Oauth).await;
            }
        }
    }

    async fn fleet_offer_session(&self, f: &SharedTokens) {
        let now = Instant::now();
        let Some(s) = self.valid_session(now) else {
            return;
        };
        let fence = if s.fence != 0 {
            s.fence
        } else {
            f.local_fence()
        };
        let shared = SharedToken {
            token: s.token.clone(),
            fence,
            ttl: self.session_expiry(&s).saturating_duration_since(now),
            life: Duration::ZERO,
            same: false,
        };
        let keys = self.fleet_keys(f, TokenLabel::Session);
        match f.offer(&keys, &shared).await {
            Ok(true) if s.fence == 0 => self.state.store_session(Some(Arc::new(SessionToken {
                token: s.token.clone(),
                last_used_ms: AtomicI64::new(s.last_used_ms.load(Ordering::Relaxed)),
                fence,
            }))),
            Ok(true) | Err(_) => {}
            Ok(false) => {
                self.fleet_adopt(f, TokenLabel::Session).await;
            }
        }
    }

    /// Until `shutdown`: pushes and mirrors the guards every [`SYNC_EVERY`]; on every (re)join
    /// also converges the tokens and wakes the background loop (logins may go on).
    pub(in crate::credentials) async fn fleet_loop(
        self: Arc<Self>,
        f: Arc<SharedTokens>,
        shutdown: Shutdown,
    ) {
        let mut joined = f.redis().joined();
        let mut rejoined = true;
        loop {
            if f.redis().is_up() {
                self.fleet_sync(&f).await;
                if rejoined && f.redis().is_up() {
                    self.fleet_converge(&f).await;
                    self.wake.notify_one();
                    rejoined = false;
                }
            }
            tokio::select! {
                changed = joined.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    rejoined = true;
                }
                _ = tokio::time::sleep(SYNC_EVERY) => {}
                _ = shutdown.wait() => return,
            }
        }
    }

    /// `POST /credentials/reset` for the fleet: a new epoch in Redis (so no replica's memory of
    /// the numbers before it undoes it), `attempts` at 3, the pause and stop lifted for all.
    pub(in crate::credentials) async fn fleet_reset(
        &self,
        f: &SharedTokens,
    ) -> Result<(), ResetError> {
        let keys = self.fleet_keys(f, TokenLabel::Session);
        let fp = self.fleet_fp(TokenLabel::Session);
        let v = f
            .reset(&keys, &fp, self.limits().pause)
            .await
            .map_err(|_| ResetError::Redis)?;
        {
            let mut g = self.state.guard(TokenLabel::Session).lock();
            tracing::warn!(
                rejected = g.rejected,
                attempts = g.attempts,
                stopped = g.is_stopped(),
                "the fleet's login guard reset on the admin API: {} attempts counted, one login \
                 allowed before the stop",
                v.numbers.attempts
            );
            g.reset();
        }
        self.fleet_learn(f, TokenLabel::Session, &keys, &v).await;
        self.wake.notify_one();
        Ok(())
    }
}
