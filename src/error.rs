//! The gateway's errors, and the one place that turns them into client responses.
//!
//! Each variant records where the fault lies: the client (4xx), the upstream (502/504), or the
//! gateway protecting the upstream (503). The status/code table is pinned by a test below.

use crate::respond::{json_bytes, Body};
use http::{header, HeaderValue, Response, StatusCode};
use std::time::Duration;

/// Why a request was answered without a fresh upstream answer (metric `reason` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Throttle {
    Budget,
    Upstream429,
    CircuitOpen,
}

impl Throttle {
    pub fn label(self) -> &'static str {
        match self {
            Throttle::Budget => "budget",
            Throttle::Upstream429 => "upstream_429",
            Throttle::CircuitOpen => "circuit_open",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GatewayError {
    #[error("{0}")]
    InvalidParameter(&'static str),
    #[error("{0}")]
    Unauthorized(&'static str),
    #[error("client is not allowed this account")]
    Forbidden,
    /// A state-changing admin route without `server.admin_token` on a non-loopback admin listener.
    #[error("admin changes need server.admin_token or a loopback admin_listen")]
    AdminForbidden,
    #[error("no such route")]
    NotFound,
    #[error("method not allowed")]
    MethodNotAllowed { allow: &'static str },
    #[error("client rate limit exceeded")]
    RateLimited { retry_after: Duration },
    #[error("request headers too large")]
    HeadersTooLarge,
    #[error("{0}")]
    BadRequest(&'static str),
    #[error("{0}")]
    BadGateway(String),
    /// The credentials are the cause (SPEC §5); the words are fixed per cause, details go to the log.
    #[error("{0}")]
    UpstreamAuthFailed(&'static str),
    #[error("{message}")]
    UpstreamUnavailable {
        reason: Throttle,
        retry_after: Duration,
        message: &'static str,
    },
    /// Upstream tokens cannot be obtained for a reason other than the credentials (token calls
    /// failing with connect errors, timeouts or 5xx; the login guard unable to record an attempt).
    #[error("upstream tokens are temporarily unavailable; retry later")]
    TokensUnavailable { retry_after: Duration },
    #[error("too many requests in flight")]
    Overloaded,
    #[error("upstream did not answer in time")]
    UpstreamTimeout,
}

impl GatewayError {
    pub fn status(&self) -> StatusCode {
        use GatewayError::*;
        match self {
            InvalidParameter(_) | BadRequest(_) => StatusCode::BAD_REQUEST,
            Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Forbidden | AdminForbidden => StatusCode::FORBIDDEN,
            NotFound => StatusCode::NOT_FOUND,
            MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            BadGateway(_) | UpstreamAuthFailed(_) => StatusCode::BAD_GATEWAY,
            UpstreamUnavailable { .. } | TokensUnavailable { .. } | Overloaded => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    pub fn error_code(&self) -> &'static str {
        use GatewayError::*;
        match self {
            InvalidParameter(_) | BadRequest(_) => "INVALID_PARAMETER",
            Unauthorized(_) => "GW_UNAUTHORIZED",
            Forbidden | AdminForbidden => "GW_FORBIDDEN",
            NotFound => "GW_NOT_FOUND",
            MethodNotAllowed { .. } => "GW_METHOD_NOT_ALLOWED",
            RateLimited { .. } => "GW_RATE_LIMITED",
            HeadersTooLarge => "GW_HEADERS_TOO_LARGE",
            BadGateway(_) => "GW_BAD_GATEWAY",
            UpstreamAuthFailed(_) => "GW_UPSTREAM_AUTH_FAILED",
            UpstreamUnavailable { .. } | TokensUnavailable { .. } => "GW_UPSTREAM_UNAVAILABLE",
            Overloaded => "GW_OVERLOADED",
            UpstreamTimeout => "GW_UPSTREAM_TIMEOUT",
        }
    }

    /// Set when the error means the upstream is being protected (served stale where possible).
    pub fn throttle(&self) -> Option<Throttle> {
        match self {
            GatewayError::UpstreamUnavailable { reason, .. } => Some(*reason),
            _ => None,
        }
    }

    /// True for upstream-side failures where a stale copy should be served instead.
    pub fn stale_eligible(&self) -> bool {
        matches!(
            self,
            GatewayError::BadGateway(_)
                | GatewayError::UpstreamAuthFailed(_)
                | GatewayError::UpstreamUnavailable { .. }
                | GatewayError::TokensUnavailable { .. }
                | GatewayError::UpstreamTimeout
        )
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            GatewayError::RateLimited { retry_after }
            | GatewayError::UpstreamUnavailable { retry_after, .. }
            | GatewayError::TokensUnavailable { retry_after } => Some(*retry_after),
            GatewayError::Overloaded => Some(Duration::from_secs(1)),
            _ => None,
        }
    }

    /// The client response: `{"errorCode","errorMessage"}` plus the headers the status calls for.
    pub fn to_response(&self) -> Response<Body> {
        let body = json_bytes(&serde_json::json!({
            "errorCode": self.error_code(),
            "errorMessage": self.to_string(),
        }));
        let mut resp = crate::respond::json(self.status(), body);
        let h = resp.headers_mut();
        if let Some(d) = self.retry_after() {
            let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
            h.insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
        }
        match self {
            GatewayError::MethodNotAllowed { allow } => {
                h.insert(header::ALLOW, HeaderValue::from_static(allow));
            }
            GatewayError::Unauthorized(_) => {
                h.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Basic realm=\"thingspace-gateway\", Bearer"),
                );
            }
            _ => {}
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use GatewayError::*;

    #[test]
    fn status_and_code_table() {
        let d = Duration::from_secs(3);
        let table: Vec<(GatewayError, u16, &str)> = vec![
            (InvalidParameter("x"), 400, "INVALID_PARAMETER"),
            (BadRequest("x"), 400, "INVALID_PARAMETER"),
            (Unauthorized("x"), 401, "GW_UNAUTHORIZED"),
            (Forbidden, 403, "GW_FORBIDDEN"),
            (AdminForbidden, 403, "GW_FORBIDDEN"),
            (NotFound, 404, "GW_NOT_FOUND"),
            (
                MethodNotAllowed { allow: "GET" },
                405,
                "GW_METHOD_NOT_ALLOWED",
            ),
            (RateLimited { retry_after: d }, 429, "GW_RATE_LIMITED"),
            (HeadersTooLarge, 431, "GW_HEADERS_TOO_LARGE"),
            (BadGateway("x".into()), 502, "GW_BAD_GATEWAY"),
            (UpstreamAuthFailed("x"), 502, "GW_UPSTREAM_AUTH_FAILED"),
            (
                UpstreamUnavailable {
                    reason: Throttle::Budget,
                    retry_after: d,
                    message: "x",
                },
                503,
                "GW_UPSTREAM_UNAVAILABLE",
            ),
            (
                TokensUnavailable { retry_after: d },
                503,
                "GW_UPSTREAM_UNAVAILABLE",
            ),
            (Overloaded, 503, "GW_OVERLOADED"),
            (UpstreamTimeout, 504, "GW_UPSTREAM_TIMEOUT"),
        ];
        for (e, status, code) in table {
            assert_eq!(e.status().as_u16(), status, "{e:?}");
            assert_eq!(e.error_code(), code, "{e:?}");
            let r = e.to_response();
            assert_eq!(r.status().as_u16(), status);
        }
    }

    #[test]
    fn headers_that_go_with_the_status() {
        let r = MethodNotAllowed { allow: "GET, HEAD" }.to_response();
        assert_eq!(r.headers()["allow"], "GET, HEAD");
        let r = Overloaded.to_response();
        assert_eq!(r.headers()["retry-after"], "1");
        let r = Unauthorized("x").to_response();
        assert!(r.headers().contains_key("www-authenticate"));
        let r = RateLimited {
            retry_after: Duration::from_millis(200),
        }
        .to_response();
        assert_eq!(r.headers()["retry-after"], "1");
    }
}
