//! The OAuth token request: client credentials for a bearer token, through the one
//! [exchange](super::exchange). Rejections pause token requests (no attempts, no stop:
//! ThingSpace's lock is on the user); other failures back off.

use super::exchange::{Exchange, Outcome, Sent};
use super::{
    guard, refresh_at, sensitive, unix_secs, ExchangeError, OAuthToken, TokenManager,
    MAX_TOKEN_LIFETIME_SECS,
};
use crate::error::GatewayError;
use crate::observe::{Endpoint, TokenLabel};
use crate::secret::Secret;
use crate::upstream::transport::{OutRequest, RawResponse};
use base64::Engine;
use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method};
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
        let _lease = tokio::time::timeout_at(deadline, self.state.refresh_lease(TokenLabel::Oauth))
            .await
            .map_err(|_| GatewayError::UpstreamTimeout)?;
        if !proactive {
            if let Some(t) = self.valid_oauth(Instant::now()) {
                return Ok(t); // refreshed by the flight we waited for
            }
        }
        // Fleet mode: the fleet's token when another replica has a newer one; the fleet's lease
        // otherwise; alone (at most once a minute) while Redis is unreachable.
        let fleet = match &self.fleet {
            Some(f) => {
                if f.redis().is_up() && self.fleet_adopt(f, TokenLabel::Oauth).await {
                    if let Some(t) = self.valid_oauth(Instant::now()) {
                        if !proactive || Instant::now() < refresh_at(&t) {
                            return Ok(t);
                        }
                    }
                }
                f.redis().is_up() || {
                    self.local_oauth_allowed(f)?;
                    false
                }
            }
            None => false,
        };
        let exchange = Exchange {
            token: TokenLabel::Oauth,
            endpoint: Endpoint::OauthToken,
            configured: self.creds.load().client_configured(),
            charged: false,
            fleet,
            request: self.token_request(),
            parse: |resp, sent| self.parse_token(resp, sent),
        };
        let (new, turn) = match self.exchange(exchange, deadline).await {
            Ok(x) => x,
            Err(ExchangeError::Other(e)) => return Err(e),
            Err(ExchangeError::Adopted) => {
                return self
                    .valid_oauth(Instant::now())
                    .ok_or(GatewayError::TokensUnavailable {
                        retry_after: Duration::from_secs(1),
                    })
            }
            // Only a login's answer says this; kept total rather than assumed away.
            Err(ExchangeError::BearerRefused) => {
                return Err(GatewayError::UpstreamAuthFailed(guard::BEARER_REFUSED))
            }
        };
        let now = Instant::now();
        if new.expires_at <= now {
            // Same token, in its last second: ask again shortly instead of spinning.
            self.state.guard(TokenLabel::Oauth).lock().not_before =
                Some(now + Duration::from_secs(1));
        }
        self.metrics
            .token_expiry(TokenLabel::Oauth, unix_secs(self.wall(new.expires_at)));
        self.state.store_oauth(Some(new.clone()));
        self.fleet_publish_oauth(&new, turn).await;
        if new.expires_at <= now {
            return Err(GatewayError::TokensUnavailable {
                retry_after: Duration::from_secs(1),
            });
        }
        Ok(new)
    }

    /// A token answer → a token. An answer that is not a usable token is a transient failure
    /// (503), not the credentials; any 4xx (a `fault` 401 included) refuses the client id or
    /// secret.
    fn parse_token(&self, resp: RawResponse, sent: Sent) -> Outcome<Arc<OAuthToken>> {
        let (fence, sent) = (sent.fence, sent.at);
        let status = resp.status.as_u16();
        if resp.status.is_client_error() {
            return Outcome::Rejected(status);
        }
        #[derive(serde::Deserialize)]
        struct TokenBody {
            access_token: String,
            expires_in: u64,
        }
        let malformed = || {
            Outcome::Unknown(GatewayError::BadGateway(
                "upstream token response is malformed".into(),
            ))
        };
        let body = match serde_json::from_slice::<TokenBody>(&resp.body) {
            Ok(b) if resp.status.is_success() && !b.access_token.is_empty() => b,
            _ => {
                tracing::warn!(
                    status,
                    bytes = resp.body.len(),
                    "upstream token response is malformed"
                );
                return malformed();
            }
        };
        let token = Secret::new(body.access_token);
        // An upstream that claims a lifetime of centuries gets a day: Instant arithmetic must not
        // overflow, and a day is far beyond ThingSpace's real hour.
        let estimate = sent + Duration::from_secs(body.expires_in.min(MAX_TOKEN_LIFETIME_SECS));
        let current = self.state.held_oauth();
        let new = match current.filter(|c| c.token == token) {
            Some(cur) => OAuthToken {
                token,
                obtained_at: cur.obtained_at,
                expires_at: cur.expires_at.max(estimate),
                same_returned: true,
                fence,
            },
            None if body.expires_in == 0 => {
                tracing::warn!("upstream issued a token that is already expired");
                return malformed();
            }
            None => OAuthToken {
                token,
                obtained_at: sent,
                expires_at: estimate,
                same_returned: false,
                fence,
            },
        };
        Outcome::Accepted(Arc::new(new))
    }

    fn token_request(&self) -> OutRequest {
        let mut headers = HeaderMap::new();
        let creds = self.creds.load();
        let basic = base64::engine::general_purpose::STANDARD.encode(format!(
            "{}:{}",
            creds.client_id,
            creds.client_secret.expose()
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
            path: crate::upstream::routes::OAUTH_TOKEN.into(),
            headers,
            body: Bytes::from_static(b"grant_type=client_credentials"),
        }
    }
}
