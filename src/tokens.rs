//! The token manager: one OAuth token and one M2M session per process (SPEC §5).
//!
//! - Reads are lock-free (`ArcSwapOption`); refreshes are single-flight behind one async mutex
//!   per token, so any number of concurrent requests cause one token call.
//! - The OAuth token is refreshed in the background when 25 % of its lifetime is left; a refresh
//!   that returns the same token keeps the later expiry and asks again right after it expires.
//! - The session is renewed lazily when idle longer than `session_idle_timeout`.
//! - The lockout guard counts rejected logins in a row and pauses logins before ThingSpace's
//!   five-failure lock; transient failures back off with jitter and do not count.

use crate::error::GatewayError;
use crate::metrics::{Endpoint, Metrics};
use crate::secret::Secret;
use crate::server::Shutdown;
use crate::transport::OutRequest;
use crate::upstream::Upstream;
use arc_swap::ArcSwapOption;
use base64::Engine;
use bytes::Bytes;
use guard::Guard;
use http::{header, HeaderMap, HeaderValue, Method};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio::time::Instant;

mod guard;
mod report;

/// The longest token lifetime believed from an upstream `expires_in`.
const MAX_TOKEN_LIFETIME_SECS: u64 = 24 * 3600;

pub use guard::THINGSPACE_LOCKOUT;
/// The session is renewed this long before the upstream's idle expiry would hit.
const SESSION_MARGIN: Duration = Duration::from_secs(1);

pub struct UpstreamCredentials {
    pub client_id: String,
    pub client_secret: Secret,
    pub username: String,
    pub password: Secret,
}

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
}

#[derive(Debug)]
pub struct SessionToken {
    pub token: Secret,
    /// Milliseconds since the manager's epoch of the last request sent with it.
    last_used_ms: AtomicU64,
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

enum SessionError {
    /// The login was refused for the bearer token: get a new one and try once more.
    BearerRejected,
    Other(GatewayError),
}

pub struct TokenManager {
    upstream: Arc<Upstream>,
    creds: UpstreamCredentials,
    settings: TokenSettings,
    metrics: Metrics,
    epoch: Instant,
    epoch_wall: SystemTime,
    oauth: ArcSwapOption<OAuthToken>,
    session: ArcSwapOption<SessionToken>,
    oauth_lock: tokio::sync::Mutex<()>,
    session_lock: tokio::sync::Mutex<()>,
    oauth_guard: Mutex<Guard>,
    session_guard: Mutex<Guard>,
}

fn lock(m: &Mutex<Guard>) -> std::sync::MutexGuard<'_, Guard> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Errors of our own protection (budget, cooldown, circuit) say nothing about the upstream's
/// health, so they set no backoff.
fn is_own_throttle(e: &GatewayError) -> bool {
    e.throttle().is_some()
}

impl TokenManager {
    pub fn new(
        upstream: Arc<Upstream>,
        creds: UpstreamCredentials,
        settings: TokenSettings,
        metrics: Metrics,
    ) -> Self {
        Self {
            upstream,
            creds,
            settings,
            metrics,
            epoch: Instant::now(),
            epoch_wall: SystemTime::now(),
            oauth: ArcSwapOption::empty(),
            session: ArcSwapOption::empty(),
            oauth_lock: tokio::sync::Mutex::new(()),
            session_lock: tokio::sync::Mutex::new(()),
            oauth_guard: Mutex::new(Guard::default()),
            session_guard: Mutex::new(Guard::default()),
        }
    }

    fn wall(&self, t: Instant) -> SystemTime {
        match t.checked_duration_since(self.epoch) {
            Some(d) => self.epoch_wall + d,
            None => self.epoch_wall - self.epoch.duration_since(t),
        }
    }

    fn ms(&self, t: Instant) -> u64 {
        u64::try_from(t.saturating_duration_since(self.epoch).as_millis()).unwrap_or(u64::MAX)
    }

    fn session_expiry(&self, s: &SessionToken) -> Instant {
        self.epoch
            + Duration::from_millis(s.last_used_ms.load(Ordering::Relaxed))
            + self.settings.session_idle_timeout
    }

    fn valid_oauth(&self, now: Instant) -> Option<Arc<OAuthToken>> {
        self.oauth.load_full().filter(|t| now < t.expires_at)
    }

    fn valid_session(&self, now: Instant) -> Option<Arc<SessionToken>> {
        self.session
            .load_full()
            .filter(|s| now + SESSION_MARGIN < self.session_expiry(s))
    }

    /// Both tokens, valid now; waits for the one refresh in flight when needed.
    pub async fn credentials(&self, deadline: Instant) -> Result<Creds, GatewayError> {
        for attempt in 0..2 {
            let oauth = match self.valid_oauth(Instant::now()) {
                Some(t) => t,
                None => self.refresh_oauth(deadline, false).await?,
            };
            match self.session_token(&oauth, deadline).await {
                Ok(session) => return Ok(Creds { oauth, session }),
                Err(SessionError::BearerRejected) if attempt == 0 => {
                    self.invalidate_oauth(&oauth.token)
                }
                Err(SessionError::BearerRejected) => {
                    return Err(GatewayError::UpstreamAuthFailed(
                        "upstream rejected a fresh bearer token at session login".into(),
                    ))
                }
                Err(SessionError::Other(e)) => return Err(e),
            }
        }
        Err(GatewayError::UpstreamAuthFailed(
            "tokens could not be obtained".into(),
        ))
    }

    /// Records that a request carrying `creds` was sent at `sent_at` (keeps the session alive).
    pub fn touch(&self, creds: &Creds, sent_at: Instant) {
        creds
            .session
            .last_used_ms
            .fetch_max(self.ms(sent_at), Ordering::Relaxed);
    }

    /// The upstream refused the bearer (401): drop it and the session, if still current.
    pub fn invalidate_oauth(&self, used: &Secret) {
        let current = self.oauth.load_full();
        if current.as_ref().is_some_and(|c| c.token == *used) {
            self.oauth.store(None);
            self.session.store(None);
            tracing::info!("upstream rejected the bearer token; refreshing it and the session");
        }
    }

    /// The upstream said the session expired or is invalid: drop it, if still current.
    pub fn invalidate_session(&self, used: &Secret) {
        let current = self.session.load_full();
        if current.as_ref().is_some_and(|c| c.token == *used) {
            self.session.store(None);
            tracing::info!("upstream session expired; logging in again");
        }
    }

    async fn refresh_oauth(
        &self,
        deadline: Instant,
        proactive: bool,
    ) -> Result<Arc<OAuthToken>, GatewayError> {
        let _flight = tokio::time::timeout_at(deadline, self.oauth_lock.lock())
            .await
            .map_err(|_| GatewayError::UpstreamTimeout)?;
        let now = Instant::now();
        if !proactive {
            if let Some(t) = self.valid_oauth(now) {
                return Ok(t); // refreshed by the flight we waited for
            }
        }
        let not_before = {
            let g = lock(&self.oauth_guard);
            g.check("token requests", now)?;
            g.not_before
        };
        if let Some(nb) = not_before.filter(|nb| *nb > now) {
            if nb > deadline {
                return Err(GatewayError::UpstreamTimeout);
            }
            tokio::time::sleep_until(nb).await;
        }
        let mut headers = HeaderMap::new();
        let basic = base64::engine::general_purpose::STANDARD.encode(format!(
            "{}:{}",
            self.creds.client_id,
            self.creds.client_secret.expose()
        ));
        if let Some(v) = sensitive(&format!("Basic {basic}")) {
            headers.insert(header::AUTHORIZATION, v);
        }
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-www-form-urlencoded"),
        );
        headers.insert(header::ACCEPT, crate::respond::JSON);
        let req = OutRequest {
            method: Method::POST,
            path: "/api/ts/v1/oauth2/token".into(),
            headers,
            body: Bytes::from_static(b"grant_type=client_credentials"),
        };
        let sent = Instant::now();
        let result = self
            .upstream
            .call(Endpoint::OauthToken, req, deadline, &AtomicU32::new(0))
            .await;
        let now = Instant::now();
        let resp = match result {
            Ok(r) => r,
            Err(e) => return Err(self.oauth_transient(e, now)),
        };
        if resp.status.is_client_error() {
            self.metrics.token_refresh("oauth", "rejected");
            let mut g = lock(&self.oauth_guard);
            g.rejected(
                "token requests",
                resp.status.as_u16(),
                self.settings.max_failed_logins,
                self.settings.login_pause,
                now,
            );
            return Err(GatewayError::UpstreamAuthFailed(format!(
                "upstream rejected the client credentials (HTTP {})",
                resp.status.as_u16()
            )));
        }
        #[derive(serde::Deserialize)]
        struct TokenBody {
            access_token: String,
            expires_in: u64,
        }
        let body = match serde_json::from_slice::<TokenBody>(&resp.body) {
            Ok(b) if resp.status.is_success() && !b.access_token.is_empty() => b,
            _ => {
                let e = GatewayError::UpstreamAuthFailed(format!(
                    "upstream token response is malformed (HTTP {}, {} bytes)",
                    resp.status.as_u16(),
                    resp.body.len()
                ));
                tracing::warn!(error = %e, "token refresh failed");
                return Err(self.oauth_transient(e, now));
            }
        };
        let token = Secret::new(body.access_token);
        // An upstream that claims a lifetime of centuries gets a day: Instant arithmetic must not
        // overflow, and a day is far beyond ThingSpace's real hour.
        let estimate = sent + Duration::from_secs(body.expires_in.min(MAX_TOKEN_LIFETIME_SECS));
        let current = self.oauth.load_full();
        let new = match current.filter(|c| c.token == token) {
            Some(cur) => OAuthToken {
                token,
                obtained_at: cur.obtained_at,
                expires_at: cur.expires_at.max(estimate),
                same_returned: true,
            },
            None if body.expires_in == 0 => {
                let e = GatewayError::UpstreamAuthFailed(
                    "upstream issued a token that is already expired".into(),
                );
                return Err(self.oauth_transient(e, now));
            }
            None => OAuthToken {
                token,
                obtained_at: sent,
                expires_at: estimate,
                same_returned: false,
            },
        };
        let new = Arc::new(new);
        {
            let mut g = lock(&self.oauth_guard);
            g.success();
            if new.expires_at <= now {
                // Same token, in its last second: ask again shortly instead of spinning.
                g.not_before = Some(now + Duration::from_secs(1));
            }
        }
        self.metrics.token_refresh("oauth", "success");
        self.metrics
            .token_expiry
            .with_label_values(&["oauth"])
            .set(unix_secs(self.wall(new.expires_at)));
        self.oauth.store(Some(new.clone()));
        if new.expires_at <= now {
            return Err(GatewayError::UpstreamAuthFailed(
                "upstream token is expiring; retry".into(),
            ));
        }
        Ok(new)
    }

    fn oauth_transient(&self, e: GatewayError, now: Instant) -> GatewayError {
        self.metrics.token_refresh("oauth", "failure");
        if !is_own_throttle(&e) {
            lock(&self.oauth_guard).transient(e.clone(), now);
        }
        e
    }

    fn session_transient(&self, e: GatewayError, now: Instant) -> SessionError {
        self.metrics.token_refresh("session", "failure");
        if !is_own_throttle(&e) {
            lock(&self.session_guard).transient(e.clone(), now);
        }
        SessionError::Other(e)
    }

    async fn session_token(
        &self,
        oauth: &OAuthToken,
        deadline: Instant,
    ) -> Result<Arc<SessionToken>, SessionError> {
        if let Some(s) = self.valid_session(Instant::now()) {
            return Ok(s);
        }
        let _flight = tokio::time::timeout_at(deadline, self.session_lock.lock())
            .await
            .map_err(|_| SessionError::Other(GatewayError::UpstreamTimeout))?;
        let now = Instant::now();
        if let Some(s) = self.valid_session(now) {
            return Ok(s);
        }
        // The flight we waited for may have found our bearer refused: don't log in with it again.
        if !self
            .oauth
            .load()
            .as_ref()
            .is_some_and(|current| current.token == oauth.token)
        {
            return Err(SessionError::BearerRejected);
        }
        lock(&self.session_guard)
            .check("session logins", now)
            .map_err(SessionError::Other)?;
        let mut headers = HeaderMap::new();
        if let Some(v) = sensitive(&format!("Bearer {}", oauth.token.expose())) {
            headers.insert(header::AUTHORIZATION, v);
        }
        headers.insert(header::CONTENT_TYPE, crate::respond::JSON);
        headers.insert(header::ACCEPT, crate::respond::JSON);
        let body = serde_json::json!({
            "username": self.creds.username,
            "password": self.creds.password.expose(),
        });
        let req = OutRequest {
            method: Method::POST,
            path: "/api/m2m/v1/session/login".into(),
            headers,
            body: Bytes::from(body.to_string()),
        };
        let sent = Instant::now();
        let result = self
            .upstream
            .call(Endpoint::SessionLogin, req, deadline, &AtomicU32::new(0))
            .await;
        let now = Instant::now();
        let resp = match result {
            Ok(r) => r,
            Err(e) => return Err(self.session_transient(e, now)),
        };
        if resp.status == http::StatusCode::UNAUTHORIZED {
            self.metrics.token_refresh("session", "failure");
            return Err(SessionError::BearerRejected);
        }
        if resp.status.is_client_error() {
            self.metrics.token_refresh("session", "rejected");
            lock(&self.session_guard).rejected(
                "session logins",
                resp.status.as_u16(),
                self.settings.max_failed_logins,
                self.settings.login_pause,
                now,
            );
            return Err(SessionError::Other(GatewayError::UpstreamAuthFailed(
                format!(
                    "upstream rejected the session login (HTTP {})",
                    resp.status.as_u16()
                ),
            )));
        }
        #[derive(serde::Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct LoginBody {
            session_token: String,
        }
        let token = match serde_json::from_slice::<LoginBody>(&resp.body) {
            Ok(b) if resp.status.is_success() && !b.session_token.is_empty() => b.session_token,
            _ => {
                let e = GatewayError::UpstreamAuthFailed(format!(
                    "upstream session login response is malformed (HTTP {})",
                    resp.status.as_u16()
                ));
                tracing::warn!(error = %e, "session login failed");
                return Err(self.session_transient(e, now));
            }
        };
        lock(&self.session_guard).success();
        self.metrics.token_refresh("session", "success");
        let s = Arc::new(SessionToken {
            token: Secret::new(token),
            last_used_ms: AtomicU64::new(self.ms(sent)),
        });
        self.session.store(Some(s.clone()));
        Ok(s)
    }

    /// When the background loop should act next.
    fn next_wake(&self, now: Instant) -> Instant {
        let g = lock(&self.oauth_guard);
        if g.stopped {
            return now + Duration::from_secs(3600);
        }
        let blocked = [g.paused_until, g.backoff_until, g.not_before]
            .into_iter()
            .flatten()
            .filter(|t| *t > now)
            .max();
        drop(g);
        if let Some(t) = blocked {
            return t;
        }
        let sg = lock(&self.session_guard);
        let session_blocked = [sg.paused_until, sg.backoff_until]
            .into_iter()
            .flatten()
            .filter(|t| *t > now)
            .max();
        let session_stopped = sg.stopped;
        drop(sg);
        let oauth_next = match self.oauth.load_full() {
            None => return now,
            Some(t) => refresh_at(&t),
        };
        if self.session.load().is_none() && !session_stopped {
            return session_blocked.unwrap_or(now).min(oauth_next);
        }
        oauth_next
    }

    /// Obtains both tokens at start (so readiness does not wait for traffic) and keeps the
    /// OAuth token fresh until `shutdown`.
    pub async fn run(self: Arc<Self>, shutdown: Shutdown) {
        loop {
            let now = Instant::now();
            let wake = self.next_wake(now).max(now);
            tokio::select! {
                _ = tokio::time::sleep_until(wake) => {}
                _ = shutdown.wait() => return,
            }
            let deadline = Instant::now() + self.settings.call_timeout;
            let now = Instant::now();
            let oauth = match self.oauth.load_full() {
                Some(t) if now < refresh_at(&t) && now < t.expires_at => Some(t),
                held => self.refresh_oauth(deadline, held.is_some()).await.ok(),
            };
            if let Some(oauth) = oauth {
                if self.session.load().is_none() {
                    if let Err(SessionError::BearerRejected) =
                        self.session_token(&oauth, deadline).await
                    {
                        self.invalidate_oauth(&oauth.token);
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
