//! The simulator's control API types: injected faults and request statistics.

use bytes::Bytes;
use http::HeaderMap;
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// `POST /_sim/faults`: every field optional; one call may inject a fault and apply actions.
///
/// ```json
/// {"endpoint": "licenses", "count": 2, "kind": "status", "status": 503}
/// {"endpoint": "any", "kind": "hang", "hang": "60s"}
/// {"expire_sessions": true, "revoke_tokens": true, "unlock_users": true}
/// {"rate": 10, "burst": 20, "latency": "50ms"}
/// ```
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultRequest {
    /// `licenses`, `subscriptions`, `oauth_token`, `session_login` or `any`.
    pub endpoint: Option<String>,
    /// How many requests the fault applies to (default 1).
    pub count: Option<u32>,
    /// `status` (any 200-599 answer with `body`: errors, or a changed page), `hang`, `close`,
    /// `malformed`, `oversized`, `loop_cursor`.
    pub kind: Option<String>,
    pub status: Option<u16>,
    pub body: Option<String>,
    /// `Retry-After` header value for `status` faults.
    pub retry_after: Option<String>,
    /// Body size for `oversized` (default 40 MiB).
    pub bytes: Option<usize>,
    /// How long `hang` waits before answering (default 1h).
    pub hang: Option<String>,
    #[serde(default)]
    pub expire_sessions: bool,
    #[serde(default)]
    pub revoke_tokens: bool,
    #[serde(default)]
    pub unlock_users: bool,
    /// New rate limit in requests/s (0 = unlimited).
    pub rate: Option<f64>,
    pub burst: Option<u32>,
    pub latency: Option<String>,
}

#[derive(Debug, Clone)]
pub enum FaultKind {
    Status {
        status: u16,
        body: Bytes,
        retry_after: Option<String>,
    },
    Hang(Duration),
    Close,
    Malformed,
    Oversized(usize),
    LoopCursor,
}

#[derive(Debug, Clone)]
pub struct Fault {
    endpoint: String,
    remaining: u32,
    kind: FaultKind,
}

const ENDPOINTS: [&str; 5] = [
    "licenses",
    "subscriptions",
    "oauth_token",
    "session_login",
    "any",
];

impl FaultRequest {
    /// A fault shortcut for tests: `count` requests of `endpoint` answered with `status`.
    pub fn status(endpoint: &str, count: u32, status: u16) -> Self {
        FaultRequest {
            endpoint: Some(endpoint.into()),
            count: Some(count),
            kind: Some("status".into()),
            status: Some(status),
            ..Default::default()
        }
    }

    /// A fault shortcut for tests: `count` requests of `endpoint` get `kind`.
    pub fn kind(endpoint: &str, count: u32, kind: &str) -> Self {
        FaultRequest {
            endpoint: Some(endpoint.into()),
            count: Some(count),
            kind: Some(kind.into()),
            ..Default::default()
        }
    }

    pub fn fault(&self) -> Result<Option<Fault>, String> {
        let Some(kind) = &self.kind else {
            return Ok(None);
        };
        let endpoint = self.endpoint.clone().unwrap_or_else(|| "any".into());
        if !ENDPOINTS.contains(&endpoint.as_str()) {
            return Err(format!("endpoint must be one of {ENDPOINTS:?}"));
        }
        let kind = match kind.as_str() {
            "status" => {
                let status = self.status.unwrap_or(500);
                if !(200..=599).contains(&status) {
                    return Err("status must be 200-599".into());
                }
                let body = self.body.clone().unwrap_or_else(|| {
                    serde_json::json!({"errorCode": format!("SIMULATED_{status}"), "errorMessage": "Simulated failure"})
                        .to_string()
                });
                FaultKind::Status {
                    status,
                    body: Bytes::from(body),
                    retry_after: self.retry_after.clone(),
                }
            }
            "hang" => FaultKind::Hang(match &self.hang {
                Some(h) => parse_duration(h)?,
                None => Duration::from_secs(3600),
            }),
            "close" => FaultKind::Close,
            "malformed" => FaultKind::Malformed,
            "oversized" => FaultKind::Oversized(self.bytes.unwrap_or(40 << 20)),
            "loop_cursor" => FaultKind::LoopCursor,
            other => return Err(format!("unknown fault kind {other:?}")),
        };
        Ok(Some(Fault {
            endpoint,
            remaining: self.count.unwrap_or(1).max(1),
            kind,
        }))
    }
}

/// A duration in humantime's syntax: `500ms`, `5s`, `1h`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim()).map_err(|e| format!("invalid duration {s:?}: {e}"))
}

/// Takes one use of the first fault that matches `endpoint`.
pub fn take_fault(faults: &mut Vec<Fault>, endpoint: &str) -> Option<FaultKind> {
    let i = faults
        .iter()
        .position(|f| f.endpoint == endpoint || f.endpoint == "any")?;
    let kind = faults[i].kind.clone();
    faults[i].remaining -= 1;
    if faults[i].remaining == 0 {
        faults.remove(i);
    }
    Some(kind)
}

/// Requests per endpoint and status, and the most requests in flight at once.
#[derive(Default)]
pub struct Stats {
    requests: BTreeMap<&'static str, BTreeMap<u16, u64>>,
    inflight: Arc<AtomicU64>,
    pub max_concurrency: u64,
    pub last_headers: HashMap<&'static str, Vec<(String, String)>>,
}

/// Decrements the in-flight count when the request ends, however it ends.
pub struct InflightGuard(Arc<AtomicU64>);

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Stats {
    pub fn enter(&mut self, endpoint: &'static str, headers: &HeaderMap) -> InflightGuard {
        let now = self.inflight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_concurrency = self.max_concurrency.max(now);
        self.last_headers.insert(
            endpoint,
            headers
                .iter()
                .map(|(k, v)| {
                    (
                        k.as_str().to_string(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect(),
        );
        InflightGuard(self.inflight.clone())
    }

    pub fn record(&mut self, endpoint: &'static str, status: u16) {
        *self
            .requests
            .entry(endpoint)
            .or_default()
            .entry(status)
            .or_default() += 1;
    }

    pub fn count(&self, endpoint: &str, status: Option<u16>) -> u64 {
        self.requests
            .get(endpoint)
            .map(|m| match status {
                Some(s) => m.get(&s).copied().unwrap_or(0),
                None => m.values().sum(),
            })
            .unwrap_or(0)
    }

    pub fn reset(&mut self) {
        self.requests.clear();
        self.max_concurrency = self.inflight.load(Ordering::SeqCst);
        self.last_headers.clear();
    }

    pub fn to_json(&self) -> serde_json::Value {
        let requests: serde_json::Map<String, serde_json::Value> = self
            .requests
            .iter()
            .map(|(e, m)| {
                let by_status: serde_json::Map<String, serde_json::Value> = m
                    .iter()
                    .map(|(s, n)| (s.to_string(), (*n).into()))
                    .collect();
                (e.to_string(), by_status.into())
            })
            .collect();
        serde_json::json!({
            "requests": requests,
            "inflight": self.inflight.load(Ordering::SeqCst),
            "max_concurrency": self.max_concurrency,
        })
    }
}
