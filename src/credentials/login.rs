//! The session login, under the lockout guard (SPEC §5): every login is charged to `attempts`
//! and made durable *before* it is sent; the answer settles it.

use super::guard::{self, Cause, Origin};
use super::{lock, sensitive, OAuthToken, SessionError, SessionToken, TokenManager};
use crate::error::GatewayError;
use crate::observe::Endpoint;
use crate::secret::Secret;
use crate::upstream::transport::{OutRequest, RawResponse};
use bytes::Bytes;
use http::{header, HeaderMap, Method, StatusCode};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use tokio::time::Instant;

/// What a login's answer means for the guard.
#[derive(Debug)]
enum Outcome {
    Accepted(String),
    /// Refused for credentials: a 4xx other than 429, a 401 without a `fault` body.
    Rejected(u16),
    /// ThingSpace says the user is locked.
    Locked(u16),
    /// A `fault` 401: the bearer, not the credentials (stays charged: only connect errors and
    /// 5xx are refunded).
    BearerRefused,
    /// Provably not judged: never sent, a connect error, or a 5xx answer. Refunded.
    NotJudged(GatewayError),
    /// Outcome unknown (timeout, connection lost after sending, 429, an unusable 200): stays
    /// charged.
    Unknown(GatewayError),
}

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

/// `made`: upstream attempts the call made (0: nothing was sent).
fn classify(result: Result<RawResponse, GatewayError>, made: u32) -> Outcome {
    let resp = match result {
        Err(e) if made == 0 || crate::upstream::unjudged(&e) => return Outcome::NotJudged(e),
        Err(e) => return Outcome::Unknown(e),
        Ok(r) => r,
    };
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

const WHAT: &str = "session logins";

impl TokenManager {
    pub(super) async fn session_token(
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
        if let Some(s) = self.valid_session(Instant::now()) {
            return Ok(s);
        }
        // The flight we waited for may have found our bearer refused: don't log in with it again.
        if !self
            .oauth
            .load()
            .as_ref()
            .is_some_and(|current| current.token == oauth.token)
        {
            return Err(SessionError::BearerRefused);
        }
        self.login(&oauth.token, deadline).await
    }

    /// One login, charged and recorded before it is sent.
    async fn login(
        &self,
        bearer: &Secret,
        deadline: Instant,
    ) -> Result<Arc<SessionToken>, SessionError> {
        let now = Instant::now();
        if !self.creds.user_configured() {
            return Err(SessionError::Other(GatewayError::UpstreamAuthFailed(
                guard::NOT_CONFIGURED,
            )));
        }
        lock(&self.session_guard)
            .check(now)
            .map_err(SessionError::Other)?;
        self.upstream_open(now).map_err(SessionError::Other)?;
        lock(&self.session_guard).attempts += 1;
        if let Err(e) = self.save_session_guard().await {
            let mut g = lock(&self.session_guard);
            g.attempts = g.attempts.saturating_sub(1);
            tracing::error!(error = %e, "cannot record the login attempt in the guard file; no login sent");
            return Err(SessionError::Other(
                g.back_off(Cause::Transient, Instant::now()),
            ));
        }
        let sent = Instant::now();
        let made = AtomicU32::new(0);
        let result = self
            .upstream
            .call(
                Endpoint::SessionLogin,
                self.login_request(bearer),
                deadline,
                &made,
            )
            .await;
        let made = made.load(Ordering::Relaxed);
        let outcome = classify(result, made);
        self.settle(outcome, bearer, sent, made).await
    }

    /// Applies a login's outcome to the guard, stores the numbers, and answers the request.
    async fn settle(
        &self,
        outcome: Outcome,
        bearer: &Secret,
        sent: Instant,
        made: u32,
    ) -> Result<Arc<SessionToken>, SessionError> {
        let now = Instant::now();
        let (result, metric) = {
            let mut g = lock(&self.session_guard);
            let settled = match outcome {
                Outcome::Accepted(token) => {
                    g.accepted();
                    let s = Arc::new(SessionToken {
                        token: Secret::new(token),
                        last_used_ms: AtomicU64::new(self.ms(sent)),
                    });
                    (Ok(s), Some("success"))
                }
                Outcome::Rejected(status) => {
                    g.rejected(
                        WHAT,
                        status,
                        self.settings.max_failed_logins,
                        self.settings.login_pause,
                        now,
                    );
                    let e = GatewayError::UpstreamAuthFailed(guard::REJECTED);
                    (Err(SessionError::Other(e)), Some("rejected"))
                }
                Outcome::Locked(status) => {
                    tracing::error!(status, "upstream session login answered: user locked");
                    g.locked(WHAT);
                    let e = GatewayError::UpstreamAuthFailed(guard::LOCKED);
                    (Err(SessionError::Other(e)), Some("rejected"))
                }
                Outcome::BearerRefused => (Err(SessionError::BearerRefused), Some("failure")),
                Outcome::NotJudged(e) => {
                    g.attempts = g.attempts.saturating_sub(1);
                    if made == 0 {
                        (Err(SessionError::Other(e)), None)
                    } else {
                        tracing::warn!(error = %e, "upstream session login failed before judging the credentials");
                        let e = g.back_off(Cause::Transient, now);
                        (Err(SessionError::Other(e)), Some("failure"))
                    }
                }
                Outcome::Unknown(e) => {
                    tracing::warn!(error = %e, "upstream session login outcome unknown; the attempt stays counted");
                    let backoff = g.back_off(Cause::Transient, now);
                    let e = match e {
                        GatewayError::UpstreamUnavailable { .. } => e,
                        _ => backoff,
                    };
                    (Err(SessionError::Other(e)), Some("failure"))
                }
            };
            if g.is_stopped() {
                g.stop(WHAT);
            }
            settled
        };
        if let Some(m) = metric {
            self.metrics.token_refresh("session", m);
        }
        if let Err(e) = self.save_session_guard().await {
            tracing::error!(error = %e, "cannot record the login outcome in the guard file");
        }
        match result {
            Ok(s) => {
                self.bearer_accepted_at_login();
                self.session.store(Some(s.clone()));
                self.ready.store(true, Ordering::Release);
                Ok(s)
            }
            Err(SessionError::BearerRefused) => match self.refuse_bearer(bearer, Origin::Login) {
                Ok(()) => Err(SessionError::BearerRefused),
                Err(e) => Err(SessionError::Other(e)),
            },
            Err(e) => {
                if let SessionError::Other(GatewayError::UpstreamUnavailable {
                    retry_after, ..
                }) = &e
                {
                    *lock(&self.closed_until) = Some(now + *retry_after);
                }
                Err(e)
            }
        }
    }

    fn login_request(&self, bearer: &Secret) -> OutRequest {
        let mut headers = HeaderMap::new();
        if let Some(v) = sensitive(&format!("Bearer {}", bearer.expose())) {
            headers.insert(header::AUTHORIZATION, v);
        }
        headers.insert(header::CONTENT_TYPE, crate::respond::JSON);
        headers.insert(header::ACCEPT, crate::respond::JSON);
        let body = serde_json::json!({
            "username": self.creds.username,
            "password": self.creds.password.expose(),
        });
        OutRequest {
            method: Method::POST,
            path: "/api/m2m/v1/session/login".into(),
            headers,
            body: Bytes::from(body.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(status: u16, body: &str) -> Result<RawResponse, GatewayError> {
        Ok(RawResponse {
            status: StatusCode::from_u16(status).unwrap(),
            headers: HeaderMap::new(),
            body: Bytes::from(body.to_string()),
        })
    }

    #[test]
    fn login_answers_and_what_they_mean() {
        let fault = r#"{"fault":{"code":"900901","message":"Invalid Credentials"}}"#;
        assert!(matches!(
            classify(answer(200, r#"{"sessionToken":"s"}"#), 1),
            Outcome::Accepted(_)
        ));
        assert!(matches!(
            classify(answer(401, fault), 1),
            Outcome::BearerRefused
        ));
        assert!(matches!(
            classify(answer(401, r#"{"fault":{"code":900902}}"#), 1),
            Outcome::BearerRefused
        ));
        assert!(matches!(
            classify(answer(401, r#"{"errorCode":"InvalidCredentials"}"#), 1),
            Outcome::Rejected(401)
        ));
        assert!(matches!(
            classify(
                answer(
                    400,
                    r#"{"errorCode":"UnifiedWebService.REQUEST_FAILED.UserLocked"}"#
                ),
                1
            ),
            Outcome::Locked(400)
        ));
        assert!(matches!(
            classify(answer(403, "<html>"), 1),
            Outcome::Rejected(403)
        ));
        assert!(matches!(
            classify(answer(200, "{}"), 1),
            Outcome::Unknown(_)
        ));
        assert!(matches!(
            classify(Err(GatewayError::UpstreamTimeout), 1),
            Outcome::Unknown(_)
        ));
        assert!(matches!(
            classify(Err(GatewayError::UpstreamTimeout), 0),
            Outcome::NotJudged(_)
        ));
    }
}
