//! The session login, through the one [exchange](super::exchange) under the lockout guard
//! (SPEC §5): every login is charged to `attempts` and made durable *before* it is sent; the
//! answer settles it.

use super::exchange::{Exchange, Outcome, Sent};
use super::guard::Origin;
use super::{sensitive, ExchangeError, OAuthToken, SessionToken, TokenManager};
use crate::error::GatewayError;
use crate::observe::{Endpoint, TokenLabel};
use crate::secret::Secret;
use crate::upstream::transport::{OutRequest, RawResponse};
use bytes::Bytes;
use http::{header, HeaderMap, Method, StatusCode};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use tokio::time::Instant;

/// `{"fault": {"code": "900901" | "900902", ...}}`: ThingSpace's bearer-token errors.
pub fn is_bearer_fault(body: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct Fault {
        fault: FaultBody,
    }
    #[derive(serde::Deserialize)]
    struct FaultBody {
        code: serde_json::Value,
    }
    let Ok(f) = serde_json::from_slice::<Fault>(body) else {
        return false;
    };
    let code = match &f.fault.code {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Number(n) => n.to_string(),
        _ => return false,
    };
    code == "900901" || code == "900902"
}

fn error_code(body: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct E {
        error_code: String,
    }
    serde_json::from_slice::<E>(body)
        .map(|e| e.error_code)
        .unwrap_or_default()
}

/// A login's answer → what it means: the session token when accepted.
fn classify(resp: &RawResponse) -> Outcome<String> {
    let status = resp.status.as_u16();
    if resp.status.is_success() {
        #[derive(serde::Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct LoginBody {
            session_token: String,
        }
        return match serde_json::from_slice::<LoginBody>(&resp.body) {
            Ok(b) if !b.session_token.is_empty() => Outcome::Accepted(b.session_token),
            _ => Outcome::Unknown(GatewayError::BadGateway(
                "upstream session login response is malformed".into(),
            )),
        };
    }
    if !resp.status.is_client_error() {
        return Outcome::Unknown(GatewayError::BadGateway(format!(
            "unexpected upstream status {status}"
        )));
    }
    if error_code(&resp.body).contains("Locked") {
        return Outcome::Locked(status);
    }
    if resp.status == StatusCode::UNAUTHORIZED && is_bearer_fault(&resp.body) {
        return Outcome::BearerRefused;
    }
    Outcome::Rejected(status)
}

impl TokenManager {
    pub(super) async fn session_token(
        &self,
        oauth: &OAuthToken,
        deadline: Instant,
    ) -> Result<Arc<SessionToken>, ExchangeError> {
        if let Some(s) = self.valid_session(Instant::now()) {
            return Ok(s);
        }
        let _lease =
            tokio::time::timeout_at(deadline, self.state.refresh_lease(TokenLabel::Session))
                .await
                .map_err(|_| ExchangeError::Other(GatewayError::UpstreamTimeout))?;
        if let Some(s) = self.valid_session(Instant::now()) {
            return Ok(s);
        }
        // The flight we waited for may have found our bearer refused: don't log in with it again.
        if !self
            .state
            .held_oauth()
            .is_some_and(|current| current.token == oauth.token)
        {
            return Err(ExchangeError::BearerRefused);
        }
        // Fleet mode: the fleet's session if it has one; no login at all while Redis is
        // unreachable (SPEC §10: the counts that protect the account live there).
        if let Some(f) = &self.fleet {
            if f.redis().is_up() && self.fleet_adopt(f, TokenLabel::Session).await {
                if let Some(s) = self.valid_session(Instant::now()) {
                    return Ok(s);
                }
            }
            if !f.redis().is_up() {
                return Err(ExchangeError::Other(super::fleet::unavailable()));
            }
        }
        self.login(&oauth.token, deadline).await
    }

    /// One login, charged and recorded before it is sent.
    async fn login(
        &self,
        bearer: &Secret,
        deadline: Instant,
    ) -> Result<Arc<SessionToken>, ExchangeError> {
        let exchange = Exchange {
            token: TokenLabel::Session,
            endpoint: Endpoint::SessionLogin,
            configured: self.creds.load().user_configured(),
            charged: true,
            fleet: self.fleet.is_some(),
            request: self.login_request(bearer),
            parse: |resp: RawResponse, sent: Sent| {
                classify(&resp).map(|token| {
                    Arc::new(SessionToken {
                        token: Secret::new(token),
                        last_used_ms: AtomicI64::new(self.ms(sent.at)),
                        fence: sent.fence,
                    })
                })
            },
        };
        match self.exchange(exchange, deadline).await {
            Ok((s, turn)) => {
                self.bearer_accepted_at_login();
                self.state.store_session(Some(s.clone()));
                self.ready.store(true, Ordering::Release);
                self.fleet_publish_session(&s, turn).await;
                Ok(s)
            }
            Err(ExchangeError::Adopted) => self
                .valid_session(Instant::now())
                .ok_or(ExchangeError::Other(super::fleet::unavailable())),
            Err(ExchangeError::BearerRefused) => match self.refuse_bearer(bearer, Origin::Login) {
                Ok(()) => Err(ExchangeError::BearerRefused),
                Err(e) => Err(ExchangeError::Other(e)),
            },
            Err(e) => Err(e),
        }
    }

    fn login_request(&self, bearer: &Secret) -> OutRequest {
        let mut headers = HeaderMap::new();
        if let Some(v) = sensitive(&format!("Bearer {}", bearer.expose())) {
            headers.insert(header::AUTHORIZATION, v);
        }
        headers.insert(header::CONTENT_TYPE, crate::respond::JSON);
        headers.insert(header::ACCEPT, crate::respond::JSON);
        // One snapshot: a reload never pairs one username with another's password.
        let creds = self.creds.load();
        let body = serde_json::json!({
            "username": creds.username,
            "password": creds.password.expose(),
        });
        OutRequest {
            method: Method::POST,
            path: crate::upstream::routes::SESSION_LOGIN.into(),
            headers,
            body: Bytes::from(body.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(status: u16, body: &str) -> RawResponse {
        RawResponse {
            status: StatusCode::from_u16(status).unwrap(),
            headers: HeaderMap::new(),
            body: Bytes::from(body.to_string()),
        }
    }

    #[test]
    fn login_answers_and_what_they_mean() {
        let fault = r#"{"fault":{"code":"900901","message":"Invalid Credentials"}}"#;
        assert!(matches!(
            classify(&answer(200, r#"{"sessionToken":"s"}"#)),
            Outcome::Accepted(_)
        ));
        assert!(matches!(
            classify(&answer(401, fault)),
            Outcome::BearerRefused
        ));
        assert!(matches!(
            classify(&answer(401, r#"{"fault":{"code":900902}}"#)),
            Outcome::BearerRefused
        ));
        assert!(matches!(
            classify(&answer(401, r#"{"errorCode":"InvalidCredentials"}"#)),
            Outcome::Rejected(401)
        ));
        assert!(matches!(
            classify(&answer(
                400,
                r#"{"errorCode":"UnifiedWebService.REQUEST_FAILED.UserLocked"}"#
            )),
            Outcome::Locked(400)
        ));
        assert!(matches!(
            classify(&answer(403, "<html>")),
            Outcome::Rejected(403)
        ));
        assert!(matches!(classify(&answer(200, "{}")), Outcome::Unknown(_)));
    }
}
