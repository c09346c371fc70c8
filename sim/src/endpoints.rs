//! The simulated ThingSpace endpoints: OAuth token, session login, license pages and
//! subscriptions, with ThingSpace's shapes and errors.

use super::data::Cursor;
use super::params;
use super::{lock, SimRequest, SimState, LOCK_AFTER};
use crate::respond::{json, json_value, Body};
use base64::Engine;
use http::{header, HeaderMap, Response, StatusCode};
use serde_json::json;
use tokio::time::Instant;

fn fault_401(code: &str) -> Response<Body> {
    let message = if code == "900902" {
        "Missing Credentials"
    } else {
        "Invalid Credentials"
    };
    json_value(
        StatusCode::UNAUTHORIZED,
        &json!({"fault": {
            "code": code,
            "message": message,
            "description": format!("{message}. Make sure your API invocation call has a header: 'Authorization : Bearer ACCESS_TOKEN' or 'Authorization : Basic ACCESS_TOKEN'"),
        }}),
    )
}

pub(super) fn error_400(code: &str, message: &str) -> Response<Body> {
    json_value(
        StatusCode::BAD_REQUEST,
        &json!({"errorCode": code, "errorMessage": message}),
    )
}

fn random_token() -> String {
    let mut b = [0u8; 18];
    for x in &mut b {
        *x = fastrand::u8(..);
    }
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

fn header_str<'a>(h: &'a HeaderMap, name: &header::HeaderName) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

impl SimState {
    pub(super) fn oauth_token(&self, req: &SimRequest) -> Response<Body> {
        let body = &req.body;
        let Some(basic) =
            header_str(&req.headers, &header::AUTHORIZATION).and_then(|v| v.strip_prefix("Basic "))
        else {
            return fault_401("900902");
        };
        let expected = base64::engine::general_purpose::STANDARD.encode(format!(
            "{}:{}",
            self.opts.client_id, self.opts.client_secret
        ));
        if basic.trim() != expected {
            return fault_401("900901");
        }
        let grant_ok = std::str::from_utf8(body)
            .map(|s| s.split('&').any(|kv| kv == "grant_type=client_credentials"))
            .unwrap_or(false);
        if !grant_ok {
            return json_value(
                StatusCode::BAD_REQUEST,
                &json!({"error": "unsupported_grant_type", "error_description": "Unsupported grant_type value"}),
            );
        }
        let now = Instant::now();
        let mut auth = lock(&self.auth);
        let (token, expires) = match &auth.bearer {
            Some((t, exp)) if *exp > now => (t.clone(), *exp),
            _ => {
                let t = random_token();
                let exp = now + self.opts.token_ttl;
                auth.bearer = Some((t.clone(), exp));
                (t, exp)
            }
        };
        json_value(
            StatusCode::OK,
            &json!({
                "access_token": token,
                "token_type": "Bearer",
                "expires_in": expires.duration_since(now).as_secs(),
                "scope": "discovery:read serviceprofile:read serviceprofile:write",
            }),
        )
    }

    /// `Err` is the fault code of the 401 to answer.
    fn check_bearer(&self, headers: &HeaderMap) -> Result<(), &'static str> {
        let Some(token) =
            header_str(headers, &header::AUTHORIZATION).and_then(|v| v.strip_prefix("Bearer "))
        else {
            return Err("900902");
        };
        match &lock(&self.auth).bearer {
            Some((t, exp)) if t == token.trim() && *exp > Instant::now() => Ok(()),
            _ => Err("900901"),
        }
    }

    pub(super) fn session_login(&self, req: &SimRequest) -> Response<Body> {
        if let Err(code) = self.check_bearer(&req.headers) {
            return fault_401(code);
        }
        let body = &req.body;
        #[derive(serde::Deserialize)]
        struct Login {
            username: String,
            password: String,
        }
        let Ok(login) = serde_json::from_slice::<Login>(body) else {
            return error_400(
                "UnifiedWebService.REQUEST_FAILED.InvalidRequest",
                "Request body is invalid",
            );
        };
        let mut auth = lock(&self.auth);
        if auth.locked {
            return error_400(
                "UnifiedWebService.REQUEST_FAILED.UserLocked",
                "User account is locked after too many failed login attempts",
            );
        }
        if login.username != self.opts.username || login.password != self.opts.password {
            auth.failed_logins += 1;
            auth.rejected_logins += 1;
            if auth.failed_logins >= LOCK_AFTER {
                auth.locked = true;
                auth.lock_events += 1;
            }
            return error_400(
                "UnifiedWebService.REQUEST_FAILED.InvalidCredentials",
                "Invalid username or password",
            );
        }
        auth.failed_logins = 0;
        let token = random_token();
        auth.sessions.insert(token.clone(), Instant::now());
        json_value(StatusCode::OK, &json!({"sessionToken": token}))
    }

    pub(super) fn fota(
        &self,
        endpoint: &str,
        headers: &HeaderMap,
        path: &str,
        loop_cursor: bool,
    ) -> Response<Body> {
        if let Err(code) = self.check_bearer(headers) {
            return fault_401(code);
        }
        let session = headers.get("vz-m2m-token").and_then(|v| v.to_str().ok());
        {
            let mut auth = lock(&self.auth);
            let now = Instant::now();
            let idle = self.opts.session_idle;
            match session.and_then(|s| auth.sessions.get_mut(s)) {
                Some(last) if now.duration_since(*last) < idle => *last = now,
                _ => {
                    return error_400(
                        "UnifiedWebService.REQUEST_FAILED.SessionToken.Expired",
                        "Session token is expired or invalid",
                    )
                }
            }
        }
        let not_found = || {
            error_400(
                "UnifiedWebService.REQUEST_FAILED.AccountNotFound",
                "Account not found",
            )
        };
        if endpoint == "subscriptions" {
            let name = path.trim_start_matches("/api/fota/v1/subscriptions/");
            return match self.by_name.get(name) {
                Some(&i) => json(StatusCode::OK, self.accounts[i].subscription.clone()),
                None => not_found(),
            };
        }
        let rest = path.trim_start_matches("/api/fota/v1/licenses/");
        let (name, index) = match rest.split('/').collect::<Vec<_>>()[..] {
            [name, "index", index] => (name, index),
            _ => return error_400("INVALID_PARAMETER", "Invalid request path"),
        };
        let Some(&ai) = self.by_name.get(name) else {
            return if params::account_ok(name) {
                not_found()
            } else {
                error_400("INVALID_PARAMETER", "Invalid account name format")
            };
        };
        let Some(start) = params::start_index(index) else {
            return error_400("INVALID_PARAMETER", "Invalid index value");
        };
        let account = &self.accounts[ai];
        match account.cursor(start) {
            Cursor::From(offset) => json(
                StatusCode::OK,
                account.page(offset, self.opts.page_size, loop_cursor.then_some(start)),
            ),
            Cursor::Invalid => error_400("INVALID_PARAMETER", "LastSeenDeviceId Not Valid"),
        }
    }
}
