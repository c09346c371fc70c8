//! What the token manager tells operators: readiness reasons, `/status`, clock-bound gauges.
//! Never a token value.

use super::guard::Guard;
use super::{lock, rfc3339, unix_secs, TokenManager};
use crate::error::GatewayError;
use tokio::time::Instant;

impl TokenManager {
    /// Reasons the gateway is not ready, empty when it is.
    pub fn not_ready_reasons(&self) -> Vec<String> {
        let now = Instant::now();
        let mut reasons = Vec::new();
        if self.valid_oauth(now).is_none() {
            reasons.push("no valid OAuth token held".to_string());
        }
        if self.session.load().is_none() {
            reasons.push("no session token held".to_string());
        }
        for (what, guard) in [
            ("token requests", &self.oauth_guard),
            ("session logins", &self.session_guard),
        ] {
            if let Err(e) = lock(guard).check(what, now) {
                if !matches!(e, GatewayError::UpstreamAuthFailed(_))
                    || !reasons.contains(&e.to_string())
                {
                    reasons.push(e.to_string());
                }
            }
        }
        reasons
    }

    /// `tokens` of `/status`: never a token value.
    pub fn status_json(&self) -> serde_json::Value {
        let now = Instant::now();
        let guard_json = |g: &Guard| {
            (
                g.failures,
                g.paused_until
                    .filter(|u| *u > now)
                    .map(|u| rfc3339(self.wall(u))),
                g.stopped,
            )
        };
        let (of, op, os) = guard_json(&lock(&self.oauth_guard));
        let (sf, sp, ss) = guard_json(&lock(&self.session_guard));
        let oauth = self.valid_oauth(now);
        let session = self.session.load_full();
        let session_exp = session.as_ref().map(|s| self.session_expiry(s));
        serde_json::json!({
            "oauth": {
                "held": oauth.is_some(),
                "expires_at": oauth.map(|t| rfc3339(self.wall(t.expires_at))),
                "failures": of,
                "paused_until": op,
                "stopped": os,
            },
            "session": {
                "held": session_exp.is_some_and(|e| e > now),
                "expires_at": session_exp.map(|e| rfc3339(self.wall(e))),
                "failures": sf,
                "paused_until": sp,
                "stopped": ss,
            },
        })
    }

    /// Refreshes the gauges that depend on the clock (called at scrape time).
    pub fn update_metrics(&self) {
        let now = Instant::now();
        for (token, guard) in [
            ("oauth", &self.oauth_guard),
            ("session", &self.session_guard),
        ] {
            let g = lock(guard);
            let paused = g.stopped || g.paused_until.is_some_and(|u| u > now);
            self.metrics
                .login_paused
                .with_label_values(&[token])
                .set(i64::from(paused));
        }
        let session = self.session.load_full();
        let v = session
            .map(|s| unix_secs(self.wall(self.session_expiry(&s))))
            .unwrap_or(0.0);
        self.metrics
            .token_expiry
            .with_label_values(&["session"])
            .set(v);
        if self.oauth.load().is_none() {
            self.metrics
                .token_expiry
                .with_label_values(&["oauth"])
                .set(0.0);
        }
    }
}
