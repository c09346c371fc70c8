//! The token manager: one OAuth token and one M2M session per process (SPEC §5).
//!
//! - Both logins run the one token exchange (`credentials/exchange.rs`: guard → call → judge →
//!   settle); `credentials/oauth.rs` and `credentials/login.rs` describe what differs.
//! - What is kept between calls sits behind `CredentialState` (`credentials/state.rs`):
//!   the held tokens (lock-free reads), one refresh lease per token (single-flight: any number
//!   of concurrent requests cause one token call), the guards and their store. The in-process
//!   version today; its module doc says how a Redis one implements each piece.
//! - The OAuth token is refreshed in the background when 25 % of its lifetime is left; the
//!   session is renewed lazily when idle.
//! - The lockout guard (`credentials/guard.rs`) keeps `rejected` and `attempts` per username in
//!   a [`GuardStore`] (`credentials/store.rs`: the guard file, or memory for a loopback
//!   upstream), so the gateway never sends the login that would lock the ThingSpace user,
//!   across restarts too.
//! - A refused token is renewed once; a renewed token refused too backs off (1 s doubling to
//!   60 s), and no token call is made while the upstream is closed to us (cooldown, open circuit).
//! - Fleet mode (SPEC §10, `credentials/fleet.rs`): the tokens and the guard's numbers are the
//!   fleet's, in Redis; the local state keeps the working copies (lock-free token reads, the
//!   guard mirrored for `/status`), and each token call takes the fleet's turn first.

use crate::config::CredentialsConfig;
use crate::error::{GatewayError, Throttle};
use crate::observe::{Metrics, TokenLabel};
use crate::secret::Secret;
use crate::upstream::circuit::CircuitState;
use crate::upstream::Upstream;
use crate::util::Shutdown;
use arc_swap::ArcSwap;
use guard::{Cause, Guard, Origin};
use http::{header, HeaderMap, HeaderValue};
use parking_lot::Mutex;
use state::{CredentialState, LocalState};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::time::Instant;

mod exchange;
mod fleet;
mod guard;
mod login;
mod oauth;
mod report;
mod state;
pub mod store;

pub use guard::{BEARER_REFUSED, RESET_ATTEMPTS, STOP_AT_ATTEMPTS, THINGSPACE_LOCKOUT};
pub use report::ResetError;
pub use store::{FileStore, GuardStore, MemoryStore, Record};

/// The longest token lifetime believed from an upstream `expires_in`.
const MAX_TOKEN_LIFETIME_SECS: u64 = 24 * 3600;
/// How often the background loop looks again while it has nothing to do (no credentials).
const IDLE_WAKE: Duration = Duration::from_secs(3600);

/// The session is renewed this long before the upstream's idle expiry would hit: 5 % of the idle
/// timeout, at most 1 s (a fixed 1 s made a 1 s idle timeout log in for every request).
pub fn session_margin(idle: Duration) -> Duration {
    (idle / 20).min(Duration::from_secs(1))
}

/// Credentials with their fingerprint, swapped together.
struct Login {
    creds: UpstreamCredentials,
    /// Of the username and password (the session guard's "changed credentials").
    fingerprint: String,
    /// Of the client id and secret (the OAuth guard's).
    client_fingerprint: String,
}

impl Login {
    fn new(creds: UpstreamCredentials) -> Self {
        Self {
            fingerprint: creds.fingerprint(),
            client_fingerprint: creds.client_fingerprint(),
            creds,
        }
    }
}

impl std::ops::Deref for Login {
    type Target = UpstreamCredentials;
    fn deref(&self) -> &UpstreamCredentials {
        &self.creds
    }
}

pub struct UpstreamCredentials {
    pub client_id: String,
    pub client_secret: Secret,
    pub username: String,
    pub password: Secret,
}

impl UpstreamCredentials {
    fn client_configured(&self) -> bool {
        !self.client_id.is_empty() && !self.client_secret.expose().is_empty()
    }

    fn user_configured(&self) -> bool {
        !self.username.is_empty() && !self.password.expose().is_empty()
    }

    /// Tells changed credentials from the same ones; never reveals the password (a truncated
    /// SHA-256 of username and password).
    fn fingerprint(&self) -> String {
        let input = format!(
            "thingspace-gateway guard v1\0{}\0{}",
            self.username,
            self.password.expose()
        );
        let digest = ring::digest::digest(&ring::digest::SHA256, input.as_bytes());
        crate::util::hex(&digest.as_ref()[..8])
    }

    /// The same for the OAuth client id and secret.
    fn client_fingerprint(&self) -> String {
        let input = format!(
            "thingspace-gateway client v1\0{}\0{}",
            self.client_id,
            self.client_secret.expose()
        );
        let digest = ring::digest::digest(&ring::digest::SHA256, input.as_bytes());
        crate::util::hex(&digest.as_ref()[..8])
    }
}

#[derive(Debug, Clone)]
pub struct TokenSettings {
    pub session_idle_timeout: Duration,
    pub max_failed_logins: u32,
    pub login_pause: Duration,
    /// Deadline of a background refresh.
    pub call_timeout: Duration,
}

#[derive(Debug)]
pub struct OAuthToken {
    pub token: Secret,
    obtained_at: Instant,
    pub expires_at: Instant,
    /// The last refresh returned this same token: ask again right after it expires.
    same_returned: bool,
    /// Fleet mode: the fence it was stored under in Redis (0: not shared).
    fence: u64,
}

#[derive(Debug)]
pub struct SessionToken {
    pub token: Secret,
    /// Milliseconds since the manager's epoch of the last request sent with it (negative: a
    /// session adopted from the fleet, last used before this process started).
    last_used_ms: AtomicI64,
    /// Fleet mode: the fence it was stored under in Redis (0: not shared).
    fence: u64,
}

/// The pair of tokens one upstream request carries.
#[derive(Clone, Debug)]
pub struct Creds {
    pub oauth: Arc<OAuthToken>,
    pub session: Arc<SessionToken>,
}

/// A header value that carries a secret: marked sensitive, so no HTTP layer logs or indexes it.
/// `None` for a value that is not a valid header (a token the upstream garbled).
fn sensitive(value: &str) -> Option<HeaderValue> {
    let mut v = HeaderValue::from_str(value).ok()?;
    v.set_sensitive(true);
    Some(v)
}

impl Creds {
    /// `Authorization` and `VZ-M2M-Token`, marked sensitive.
    pub fn headers(&self) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(v) = sensitive(&format!("Bearer {}", self.oauth.token.expose())) {
            h.insert(header::AUTHORIZATION, v);
        }
        if let Some(v) = sensitive(self.session.token.expose()) {
            h.insert("vz-m2m-token", v);
        }
        h
    }
}

/// Why a token exchange gave no token.
enum ExchangeError {
    /// A login was refused for the bearer token: get a new one and try once more.
    BearerRefused,
    /// Fleet mode: another replica obtained the token meanwhile; it is held now.
    Adopted,
    Other(GatewayError),
}

/// A token's calls, as the log and `/readyz` name them.
fn calls(token: TokenLabel) -> &'static str {
    match token {
        TokenLabel::Oauth => "token requests",
        TokenLabel::Session => "session logins",
    }
}

pub struct TokenManager {
    upstream: Arc<Upstream>,
    /// The credentials the next token call uses, and their fingerprint; swapped by
    /// [`TokenManager::apply`].
    creds: ArcSwap<Login>,
    settings: ArcSwap<TokenSettings>,
    metrics: Metrics,
    /// Held tokens, refresh leases, guards and their store.
    state: Arc<dyn CredentialState>,
    /// Saves of the session guard in order: each writes the numbers as of its turn, so an older
    /// snapshot never overwrites a newer one.
    save_order: tokio::sync::Mutex<()>,
    epoch: Instant,
    epoch_wall: SystemTime,
    /// A guard holds a renewed token under suspicion (checked without a lock on the hot path).
    suspicion: AtomicBool,
    /// Both tokens were held once: `/readyz` answers 200 from then on (SPEC §7).
    ready: AtomicBool,
    /// The upstream was closed to us (cooldown, open circuit) until then: no token call before.
    closed_until: Mutex<Option<Instant>>,
    /// Wakes the background loop (a reset lifted a stop).
    wake: tokio::sync::Notify,
    /// Fleet mode (SPEC §10): the tokens and the guard shared in Redis.
    fleet: Option<Arc<fleet::SharedTokens>>,
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Opens where the login counts live: the guard file, or memory when `guard_file` is empty
/// (allowed by config validation only for a loopback upstream).
pub fn open_guard_store(
    guard_file: Option<&std::path::Path>,
) -> Result<Arc<dyn GuardStore>, store::OpenError> {
    let Some(guard_file) = guard_file else {
        return Ok(Arc::new(MemoryStore::default()));
    };
    Ok(Arc::new(FileStore::open(guard_file)?))
}

impl TokenManager {
    pub fn new(
        upstream: Arc<Upstream>,
        creds: UpstreamCredentials,
        settings: TokenSettings,
        metrics: Metrics,
        store: Arc<dyn GuardStore>,
    ) -> Self {
        let state = Arc::new(LocalState::new(store));
        Self::with_state(upstream, creds, settings, metrics, state)
    }

    /// Fleet mode (SPEC §10): tokens and login counts shared with every replica on `redis`,
    /// sealed with a key from `signing_key`; `store` (the guard file, if configured) keeps this
    /// replica's memory of the counts.
    pub fn new_shared(
        upstream: Arc<Upstream>,
        creds: UpstreamCredentials,
        settings: TokenSettings,
        metrics: Metrics,
        store: Arc<dyn GuardStore>,
        redis: Arc<crate::fleet::Redis>,
        signing_key: &Secret,
    ) -> Self {
        let mut m = Self::new(upstream, creds, settings, metrics, store);
        let shared = Arc::new(fleet::SharedTokens::new(redis, signing_key));
        m.fleet_remember_file(&shared);
        m.fleet = Some(shared);
        m
    }

    /// A token manager over `state` (the in-process one, or a shared one in fleet mode).
    pub(crate) fn with_state(
        upstream: Arc<Upstream>,
        creds: UpstreamCredentials,
        settings: TokenSettings,
        metrics: Metrics,
        state: Arc<dyn CredentialState>,
    ) -> Self {
        let m = Self {
            upstream,
            settings: ArcSwap::from_pointee(settings),
            metrics,
            epoch: Instant::now(),
            epoch_wall: SystemTime::now(),
            suspicion: AtomicBool::new(false),
            ready: AtomicBool::new(false),
            closed_until: Mutex::new(None),
            wake: tokio::sync::Notify::new(),
            save_order: tokio::sync::Mutex::new(()),
            fleet: None,
            state,
            creds: ArcSwap::from_pointee(Login::new(creds)),
        };
        let login = m.creds.load_full();
        if login.user_configured() {
            let record = m.state.guard_store().load(&login.username);
            *m.state.guard(TokenLabel::Session).lock() = m.guard_from(&record);
        }
        m
    }

    /// New `[credentials]` values (a reload, SPEC §11): the next token call and login use them,
    /// and `session_idle_timeout`, `max_failed_logins`, `login_pause` and `call_timeout` (the
    /// background refresh's deadline, `server.request_timeout`) apply from now. Held tokens
    /// are kept (no forced login). Changed credentials lift a login *pause* for one attempt
    /// (the rejected count is kept until an attempt is accepted, so one more rejection pauses
    /// again), never a *stop*: only `POST /credentials/reset` lifts that (SPEC §5). A new
    /// username brings its own login counts from the guard store.
    pub fn apply(&self, c: &CredentialsConfig, call_timeout: Duration) {
        self.settings.store(Arc::new(TokenSettings {
            session_idle_timeout: c.session_idle_timeout.0,
            max_failed_logins: c.max_failed_logins,
            login_pause: c.login_pause.0,
            call_timeout,
        }));
        let next = Login::new(UpstreamCredentials {
            client_id: c.client_id.clone(),
            client_secret: c.client_secret.clone(),
            username: c.username.clone(),
            password: c.password.clone(),
        });
        let old = self.creds.load_full();
        let user_changed = next.fingerprint != old.fingerprint;
        let client_changed = next.client_fingerprint != old.client_fingerprint;
        let other_user = next.username != old.username;
        let next = Arc::new(next);
        self.creds.store(next.clone());
        if client_changed {
            let mut g = self.state.guard(TokenLabel::Oauth).lock();
            if g.paused(Instant::now()).is_some() {
                g.paused_until = None;
                tracing::warn!(
                    rejected = g.rejected,
                    "the OAuth client credentials changed: the token request pause is lifted \
                     for one attempt"
                );
            }
        }
        if other_user && next.user_configured() {
            // The counts belong to the ThingSpace user: the new one's as stored (a stored pause
            // under other credentials is lifted there, a stop kept).
            let record = self.state.guard_store().load(&next.username);
            *self.state.guard(TokenLabel::Session).lock() = self.guard_from(&record);
            if let Some(f) = &self.fleet {
                self.fleet_remember_file(f);
            }
        } else if user_changed {
            let mut g = self.state.guard(TokenLabel::Session).lock();
            if !g.is_stopped() && g.paused(Instant::now()).is_some() {
                g.paused_until = None;
                tracing::warn!(
                    rejected = g.rejected,
                    attempts = g.attempts,
                    "the credentials changed: the login pause is lifted for one attempt"
                );
            } else if g.is_stopped() {
                tracing::warn!(
                    rejected = g.rejected,
                    attempts = g.attempts,
                    "the credentials changed, but upstream session logins stay stopped until \
                     POST /credentials/reset on the admin API"
                );
            }
        }
        if user_changed || client_changed {
            // The background loop logs in now if it has nothing held.
            self.wake.notify_one();
        }
    }

    /// The session guard as stored: a pause read back is capped at now + `login_pause`; changed
    /// credentials lift a pause (one attempt), never a stop.
    fn guard_from(&self, r: &Record) -> Guard {
        let now = Instant::now();
        let pause = self.settings.load().login_pause;
        let paused_until = r.paused_until.as_ref().map(|s| {
            match humantime::parse_rfc3339_weak(s) {
                Ok(wall) => wall
                    .duration_since(SystemTime::now())
                    .map(|left| now + left.min(pause))
                    .unwrap_or(now),
                // Unreadable: the whole pause, to be safe.
                Err(_) => now + pause,
            }
        });
        let mut g = Guard {
            rejected: r.rejected,
            attempts: r.attempts,
            paused_until: paused_until.filter(|u| *u > now),
            stopped: r.stopped,
            locked: r.locked,
            ..Guard::default()
        };
        let changed = !r.fingerprint.is_empty() && r.fingerprint != self.creds.load().fingerprint;
        if g.is_stopped() {
            g.stopped = true;
            tracing::error!(
                rejected = g.rejected,
                attempts = g.attempts,
                locked = g.locked,
                "upstream session logins are stopped (from the guard file); no login until \
                 POST /credentials/reset on the admin API"
            );
        } else if changed && g.paused_until.is_some() {
            g.paused_until = None;
            tracing::warn!(
                rejected = g.rejected,
                attempts = g.attempts,
                "the credentials changed since the last login attempt: the login pause is lifted \
                 for one attempt"
            );
        } else if g.attempts > 0 || g.paused_until.is_some() {
            tracing::warn!(
                rejected = g.rejected,
                attempts = g.attempts,
                paused = g.paused_until.is_some(),
                "login counts read from the guard file"
            );
        }
        g
    }

    /// The session guard's numbers as stored.
    fn record(&self, g: &Guard, now: Instant) -> Record {
        Record {
            rejected: g.rejected,
            attempts: g.attempts,
            paused_until: g
                .paused(now)
                .map(|u| humantime::format_rfc3339_millis(self.wall(u)).to_string()),
            stopped: g.stopped,
            locked: g.locked,
            fingerprint: self.creds.load().fingerprint.clone(),
            epoch: 0,
        }
    }

    /// Stores the session guard's numbers; `Err` means they are not durable.
    async fn save_session_guard(&self) -> Result<(), String> {
        let _turn = self.save_order.lock().await;
        let record = self.record(
            &self.state.guard(TokenLabel::Session).lock(),
            Instant::now(),
        );
        let username = self.creds.load().username.clone();
        self.state.guard_store().save(&username, record).await
    }

    fn wall(&self, t: Instant) -> SystemTime {
        match t.checked_duration_since(self.epoch) {
            Some(d) => self.epoch_wall + d,
            None => self.epoch_wall - self.epoch.duration_since(t),
        }
    }

    /// Milliseconds from the manager's epoch to `t` (negative before it).
    fn ms(&self, t: Instant) -> i64 {
        let ms = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        match t.checked_duration_since(self.epoch) {
            Some(d) => ms(d),
            None => -ms(self.epoch.duration_since(t)),
        }
    }

    /// The instant `ms` milliseconds from the manager's epoch.
    fn at_ms(&self, ms: i64) -> Instant {
        let d = Duration::from_millis(ms.unsigned_abs());
        if ms >= 0 {
            self.epoch + d
        } else {
            self.epoch.checked_sub(d).unwrap_or(self.epoch)
        }
    }

    fn session_expiry(&self, s: &SessionToken) -> Instant {
        self.at_ms(s.last_used_ms.load(Ordering::Relaxed))
            + self.settings.load().session_idle_timeout
    }

    fn valid_oauth(&self, now: Instant) -> Option<Arc<OAuthToken>> {
        self.state.held_oauth().filter(|t| now < t.expires_at)
    }

    fn valid_session(&self, now: Instant) -> Option<Arc<SessionToken>> {
        let margin = session_margin(self.settings.load().session_idle_timeout);
        self.state
            .held_session()
            .filter(|s| now + margin < self.session_expiry(s))
    }

    /// Both tokens, valid now; waits for the one refresh in flight when needed.
    pub async fn credentials(&self, deadline: Instant) -> Result<Creds, GatewayError> {
        for _ in 0..2 {
            let oauth = match self.valid_oauth(Instant::now()) {
                Some(t) => t,
                None => self.refresh_oauth(deadline, false).await?,
            };
            match self.session_token(&oauth, deadline).await {
                Ok(session) => return Ok(Creds { oauth, session }),
                // Adopted: another replica's session is held now; looked up again.
                Err(ExchangeError::BearerRefused | ExchangeError::Adopted) => continue,
                Err(ExchangeError::Other(e)) => return Err(e),
            }
        }
        Err(GatewayError::UpstreamAuthFailed(guard::BEARER_REFUSED))
    }

    /// Records that a request carrying `creds` was sent at `sent_at` and answered without a
    /// token complaint: keeps the session alive and clears any suspicion of renewed tokens.
    pub fn touch(&self, creds: &Creds, sent_at: Instant) {
        creds
            .session
            .last_used_ms
            .fetch_max(self.ms(sent_at), Ordering::Relaxed);
        if let Some(f) = &self.fleet {
            self.fleet_touch(f, &creds.session);
        }
        if self.suspicion.load(Ordering::Relaxed) {
            for token in TokenLabel::ALL {
                let mut g = self.state.guard(token).lock();
                if g.suspect.take().is_some() {
                    g.transient = 0;
                }
            }
            self.suspicion.store(false, Ordering::Relaxed);
        }
    }

    /// The upstream answered a page request carrying `used` with 401. `Ok` → renew the bearer and
    /// the session and retry once; `Err` → a renewed bearer was refused too: backing off, the
    /// credentials are the cause.
    pub fn bearer_refused(&self, used: &Secret) -> Result<(), GatewayError> {
        self.refuse_bearer(used, Origin::Page)
    }

    fn refuse_bearer(&self, used: &Secret, origin: Origin) -> Result<(), GatewayError> {
        let mut g = self.state.guard(TokenLabel::Oauth).lock();
        let current = self.state.held_oauth();
        if !current.as_ref().is_some_and(|c| c.token == *used) {
            return Ok(()); // a concurrent request already dealt with it
        }
        // Fleet mode with Redis unreachable: no login could replace the session, so it is kept
        // (the retry shows whether it still holds); only the bearer is renewed.
        let keep_session = self.fleet.as_ref().is_some_and(|f| !f.redis().is_up());
        if let Some(f) = &self.fleet {
            self.fleet_refused(
                f,
                TokenLabel::Oauth,
                current.as_ref().map_or(0, |t| t.fence),
            );
            if !keep_session {
                let session = self.state.held_session();
                self.fleet_refused(f, TokenLabel::Session, session.map_or(0, |s| s.fence));
            }
        }
        self.state.store_oauth(None);
        if !keep_session {
            self.state.store_session(None);
        }
        if g.suspect.is_none() {
            g.suspect = Some(origin);
            self.suspicion.store(true, Ordering::Relaxed);
            tracing::info!("upstream refused the bearer token; renewing it and the session");
            return Ok(());
        }
        let e = g.back_off(Cause::BearerRefused, Instant::now());
        tracing::warn!(
            step = g.transient,
            "upstream refused a renewed bearer token too; backing off before renewing again"
        );
        Err(e)
    }

    /// A login with the bearer was accepted: a suspicion raised at login is cleared (one raised by
    /// a page request is cleared only by a page request).
    fn bearer_accepted_at_login(&self) {
        let mut g = self.state.guard(TokenLabel::Oauth).lock();
        if g.suspect == Some(Origin::Login) {
            g.suspect = None;
            g.transient = 0;
        }
    }

    /// The upstream said the session carried by a page request expired or is invalid. `Ok` → log
    /// in again and retry once; `Err` → a fresh session was refused too: backing off.
    pub fn session_refused(&self, used: &Secret) -> Result<(), GatewayError> {
        let mut g = self.state.guard(TokenLabel::Session).lock();
        let current = self.state.held_session();
        if !current.as_ref().is_some_and(|c| c.token == *used) {
            return Ok(());
        }
        if let Some(f) = &self.fleet {
            self.fleet_refused(f, TokenLabel::Session, current.map_or(0, |s| s.fence));
        }
        self.state.store_session(None);
        if g.suspect.is_none() {
            g.suspect = Some(Origin::Page);
            self.suspicion.store(true, Ordering::Relaxed);
            tracing::info!("upstream session expired; logging in again");
            return Ok(());
        }
        let e = g.back_off(Cause::Transient, Instant::now());
        tracing::warn!(
            step = g.transient,
            "upstream refused a fresh session too; backing off before logging in again"
        );
        Err(e)
    }

    /// `Err` while the upstream is closed to us (429 cooldown, open circuit): no token call then.
    fn upstream_open(&self, now: Instant) -> Result<(), GatewayError> {
        if let Some(until) = self.upstream.cooldown_until() {
            *self.closed_until.lock() = Some(until);
            return Err(GatewayError::UpstreamUnavailable {
                reason: Throttle::Upstream429,
                retry_after: until.saturating_duration_since(now),
                message: "upstream is throttling; retry later",
            });
        }
        if self.upstream.circuit_state() == CircuitState::Open {
            let retry_after = Duration::from_secs(1);
            *self.closed_until.lock() = Some(now + retry_after);
            return Err(GatewayError::UpstreamUnavailable {
                reason: Throttle::CircuitOpen,
                retry_after,
                message: "upstream circuit is open after repeated failures; retry later",
            });
        }
        Ok(())
    }

    /// When the background loop should act next.
    fn next_wake(&self, now: Instant) -> Instant {
        if !self.creds.load().client_configured() {
            return now + IDLE_WAKE;
        }
        let later =
            |ts: &[Option<Instant>]| ts.iter().flatten().copied().filter(|t| *t > now).max();
        let oauth_blocked = {
            let g = self.state.guard(TokenLabel::Oauth).lock();
            later(&[g.paused_until, g.backoff_until, g.not_before])
        };
        let held = self.valid_oauth(now);
        let oauth_due = held.as_ref().map(|t| refresh_at(t)).unwrap_or(now);
        let mut next = oauth_due.max(oauth_blocked.unwrap_or(now));
        // Fleet mode with Redis unreachable: no login (the rejoin wakes the loop), and the OAuth
        // token renewed alone at most once a minute.
        let fleet_down = self.fleet.as_ref().filter(|f| !f.redis().is_up());
        if let Some(f) = fleet_down {
            if let Some(at) = *f.local_oauth_at.lock() {
                next = next.max(at + fleet::LOCAL_OAUTH_EVERY);
            }
        }
        if held.is_some()
            && fleet_down.is_none()
            && self.state.held_session().is_none()
            && self.creds.load().user_configured()
        {
            let g = self.state.guard(TokenLabel::Session).lock();
            if !g.is_stopped() {
                let blocked = later(&[g.paused_until, g.backoff_until]);
                next = next.min(blocked.unwrap_or(now));
            }
        }
        match *self.closed_until.lock() {
            Some(c) if c > now => next.max(c),
            _ => next,
        }
    }

    /// Obtains both tokens at start (so readiness does not wait for traffic) and keeps the
    /// OAuth token fresh until `shutdown`.
    pub async fn run(self: Arc<Self>, shutdown: Shutdown) {
        if let Some(f) = &self.fleet {
            tokio::spawn(self.clone().fleet_loop(f.clone(), shutdown.clone()));
        }
        loop {
            let now = Instant::now();
            let wake = self.next_wake(now).max(now);
            tokio::select! {
                _ = tokio::time::sleep_until(wake) => {}
                _ = self.wake.notified() => {}
                _ = shutdown.wait() => return,
            }
            if self.creds.load().client_configured() {
                let deadline = Instant::now() + self.settings.load().call_timeout;
                let now = Instant::now();
                match self.state.held_oauth() {
                    Some(t) if now < refresh_at(&t) && now < t.expires_at => {}
                    held => {
                        let _ = self.refresh_oauth(deadline, held.is_some()).await;
                    }
                }
                if let Some(oauth) = self.valid_oauth(Instant::now()) {
                    if self.state.held_session().is_none() && self.creds.load().user_configured() {
                        // Failures are recorded by the guard (backoff, pause, stop); the next
                        // turn waits for them.
                        let _ = self.session_token(&oauth, deadline).await;
                    }
                }
            }
            // Never spin: a loop turn takes at least a few milliseconds of (possibly paused) time.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// When the background loop refreshes a token: when 25 % of its lifetime is left, or right after
/// it expires when the last refresh returned the same token (ThingSpace does within the hour).
fn refresh_at(t: &OAuthToken) -> Instant {
    if t.same_returned {
        t.expires_at
    } else {
        t.obtained_at
            + t.expires_at
                .saturating_duration_since(t.obtained_at)
                .mul_f64(0.75)
    }
}

fn unix_secs(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_margin_is_a_fraction_of_the_idle_timeout() {
        assert_eq!(
            session_margin(Duration::from_secs(1)),
            Duration::from_millis(50)
        );
        assert_eq!(
            session_margin(Duration::from_secs(1200)),
            Duration::from_secs(1)
        );
    }

    #[test]
    fn fingerprint_changes_with_the_password_and_hides_it() {
        let creds = |pw: &str| UpstreamCredentials {
            client_id: String::new(),
            client_secret: Secret::default(),
            username: "u".into(),
            password: Secret::new(pw.to_string()),
        };
        let a = creds("hunter2").fingerprint();
        assert_eq!(a.len(), 16);
        assert_eq!(a, creds("hunter2").fingerprint());
        assert_ne!(a, creds("hunter3").fingerprint());
        assert!(!a.contains("hunter2"));
    }
}
