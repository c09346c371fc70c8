//! The OAuth token call: client credentials for a bearer token. Rejections pause token requests
//! (no attempts, no stop: ThingSpace's lock is on the user); other failures back off.

use super::guard::{self, Cause};
use super::{lock, sensitive, unix_secs, OAuthToken, TokenManager, MAX_TOKEN_LIFETIME_SECS};
use crate::error::GatewayError;
use crate::observe::Endpoint;
use crate::secret::Secret;
use crate::upstream::transport::OutRequest;
use base64::Engine;
use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

impl TokenManager {
    /// One token call (single-flight): waiters of the flight in progress take its result unless
    /// `proactive` (the background refresh before expiry).
    pub(super) async fn refresh_oauth(
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
        if !self.creds.client_configured() {
            return Err(GatewayError::UpstreamAuthFailed(guard::NOT_CONFIGURED));
        }
        let not_before = {
            let g = lock(&self.oauth_guard);
            g.check(now)?;
            g.not_before
        };
        if let Some(nb) = not_before.filter(|nb| *nb > now) {
            if nb > deadline {
                return Err(GatewayError::UpstreamTimeout);
            }
            tokio::time::sleep_until(nb).await;
        }
        self.upstream_open(Instant::now())?;
        let sent = Instant::now();
        let made = AtomicU32::new(0);
        let result = self
            .upstream
            .call(Endpoint::OauthToken, self.token_request(), deadline, &made)
            .await;
        let now = Instant::now();
        let resp = match result {
            Ok(r) => r,
            Err(e) => {
                let made = made.load(Ordering::Relaxed);
                return Err(self.call_failed(&self.oauth_guard, "oauth", e, made, now));
            }
        };
        let status = resp.status.as_u16();
        if resp.status.is_client_error() {
            // A 4xx other than 429 (a `fault` 401 included): the client id or secret is refused.
            self.metrics.token_refresh("oauth", "rejected");
            lock(&self.oauth_guard).rejected(
                "token requests",
                status,
                self.settings.max_failed_logins,
                self.settings.login_pause,
                now,
            );
            return Err(GatewayError::UpstreamAuthFailed(guard::REJECTED));
        }
        #[derive(serde::Deserialize)]
        struct TokenBody {
            access_token: String,
            expires_in: u64,
        }
        let body = match serde_json::from_slice::<TokenBody>(&resp.body) {
            Ok(b) if resp.status.is_success() && !b.access_token.is_empty() => b,
            _ => {
                tracing::warn!(
                    status,
                    bytes = resp.body.len(),
                    "upstream token response is malformed"
                );
                return Err(self.malformed("oauth", &self.oauth_guard, now));
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
                tracing::warn!("upstream issued a token that is already expired");
                return Err(self.malformed("oauth", &self.oauth_guard, now));
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
            g.accepted();
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
            return Err(GatewayError::TokensUnavailable {
                retry_after: Duration::from_secs(1),
            });
        }
        Ok(new)
    }

    /// An answer that is not a usable token: a transient failure (503), not the credentials.
    pub(super) fn malformed(
        &self,
        token: &'static str,
        guard: &std::sync::Mutex<guard::Guard>,
        now: Instant,
    ) -> GatewayError {
        self.metrics.token_refresh(token, "failure");
        lock(guard).back_off(Cause::Transient, now)
    }

    fn token_request(&self) -> OutRequest {
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
        OutRequest {
            method: Method::POST,
            path: "/api/ts/v1/oauth2/token".into(),
            headers,
            body: Bytes::from_static(b"grant_type=client_credentials"),
        }
    }
}
