//! The ThingSpace simulator (SPEC §8): a faithful stand-in for the upstream, for the gateway's
//! `demo` and `sim` commands, tests, benchmarks and local development. Tests start it in-process
//! on port 0, or call it without sockets through [`SimHandle::call`] (paused-time tests).
//!
//! It serves the OAuth token, session login, license page and subscription endpoints with
//! ThingSpace's shapes and errors, locks a user after five failed logins, and has a control API
//! under `/_sim/` to count calls and inject faults.
//!
//! It shares no code with the gateway: its own accept loop, responses and path checks.
#![forbid(unsafe_code)]

pub mod control;
pub mod data;
mod endpoints;
pub mod params;
mod respond;
mod server;

use endpoints::error_400;

use crate::respond::{json, json_value, Body};
use crate::server::{aborted, serve, AbortConnection, Shutdown};
use bytes::Bytes;
use control::{Fault, FaultKind, FaultRequest, Stats};
use data::Account;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde_json::json;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::time::Instant;

/// Lock a std mutex, recovering the data if a panicking holder poisoned it.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Debug, Clone)]
pub struct SimOptions {
    pub listen: SocketAddr,
    pub accounts: usize,
    pub devices: usize,
    pub seed: u64,
    pub page_size: usize,
    pub client_id: String,
    pub client_secret: String,
    pub username: String,
    pub password: String,
    pub token_ttl: Duration,
    pub session_idle: Duration,
    /// Requests per second before answering 429; `None` is unlimited.
    pub rate: Option<f64>,
    /// Bucket size of the limiter; defaults to one second of `rate`.
    pub burst: Option<u32>,
    pub latency: Duration,
    pub tls_cert_out: Option<PathBuf>,
    /// Names the generated certificate is valid for besides `localhost` and `127.0.0.1` (a
    /// host name the gateway reaches it by, e.g. a compose service name).
    pub tls_names: Vec<String>,
}

impl Default for SimOptions {
    fn default() -> Self {
        Self {
            listen: ([127, 0, 0, 1], 8081).into(),
            accounts: 3,
            devices: 2500,
            seed: 1,
            page_size: 1000,
            client_id: "demo-key".into(),
            client_secret: "demo-secret".into(),
            username: "demo-user".into(),
            password: "demo-pass".into(),
            token_ttl: Duration::from_secs(3600),
            session_idle: Duration::from_secs(20 * 60),
            rate: None,
            burst: None,
            latency: Duration::ZERO,
            tls_cert_out: None,
            tls_names: Vec::new(),
        }
    }
}

/// ThingSpace locks a user after this many failed logins in a row.
pub const LOCK_AFTER: u32 = 5;

#[derive(Default)]
struct Auth {
    bearer: Option<(String, Instant)>,
    sessions: HashMap<String, Instant>,
    failed_logins: u32,
    locked: bool,
    /// Logins refused for wrong credentials, ever (since the last reset).
    rejected_logins: u64,
    /// Times a user became locked.
    lock_events: u64,
}

struct Limiter {
    rate: Option<f64>,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl Limiter {
    fn new(rate: Option<f64>, burst: Option<u32>) -> Self {
        let burst = burst
            .map(f64::from)
            .unwrap_or_else(|| rate.unwrap_or(1.0).max(1.0));
        Limiter {
            rate,
            burst,
            tokens: burst,
            last: Instant::now(),
        }
    }

    /// `Err(wait)` when over the rate.
    fn take(&mut self) -> Result<(), Duration> {
        let Some(rate) = self.rate.filter(|r| *r > 0.0) else {
            return Ok(());
        };
        let now = Instant::now();
        self.tokens =
            (self.tokens + now.duration_since(self.last).as_secs_f64() * rate).min(self.burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / rate))
        }
    }
}

pub struct SimState {
    opts: SimOptions,
    accounts: Vec<Account>,
    by_name: HashMap<String, usize>,
    auth: Mutex<Auth>,
    faults: Mutex<Vec<Fault>>,
    stats: Mutex<Stats>,
    limiter: Mutex<Limiter>,
    latency: Mutex<Duration>,
}

/// A running simulator.
pub struct Simulator {
    pub addr: SocketAddr,
    pub tls: bool,
    state: Arc<SimState>,
    shutdown: Shutdown,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Simulator {
    /// Binds `opts.listen` and serves in the background until dropped or [`Simulator::stop`].
    pub async fn start(opts: SimOptions) -> std::io::Result<Simulator> {
        let accounts = data::generate(opts.accounts, opts.devices, opts.seed);
        let by_name = accounts
            .iter()
            .enumerate()
            .map(|(i, a)| (a.name.clone(), i))
            .collect();
        let tls = match &opts.tls_cert_out {
            Some(path) => Some(self_signed_acceptor(path, &opts.tls_names)?),
            None => None,
        };
        let listener = tokio::net::TcpListener::bind(opts.listen).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(SimState {
            limiter: Mutex::new(Limiter::new(opts.rate, opts.burst)),
            latency: Mutex::new(opts.latency),
            opts,
            accounts,
            by_name,
            auth: Mutex::new(Auth::default()),
            faults: Mutex::new(Vec::new()),
            stats: Mutex::new(Stats::default()),
        });
        let shutdown = Shutdown::new();
        let task = tokio::spawn(serve(
            listener,
            tls.clone(),
            state.clone(),
            shutdown.clone(),
            Duration::from_secs(1),
        ));
        Ok(Simulator {
            addr,
            tls: tls.is_some(),
            state,
            shutdown,
            task: Some(task),
        })
    }

    pub fn base_url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    pub fn account_names(&self) -> Vec<String> {
        self.state.accounts.iter().map(|a| a.name.clone()).collect()
    }

    /// The IMEIs of an account, sorted.
    pub fn imeis(&self, account: &str) -> Vec<u64> {
        self.state
            .by_name
            .get(account)
            .map(|&i| self.state.accounts[i].imeis.clone())
            .unwrap_or_default()
    }

    pub fn stats(&self) -> serde_json::Value {
        self.state.stats_json()
    }

    /// Requests seen at one endpoint (`licenses`, `subscriptions`, `oauth_token`, `session_login`).
    pub fn count(&self, endpoint: &str) -> u64 {
        lock(&self.state.stats).count(endpoint, None)
    }

    /// Requests at one endpoint answered with one status.
    pub fn count_status(&self, endpoint: &str, status: u16) -> u64 {
        lock(&self.state.stats).count(endpoint, Some(status))
    }

    /// Logins the simulator refused for wrong credentials (since start or reset).
    pub fn rejected_logins(&self) -> u64 {
        lock(&self.state.auth).rejected_logins
    }

    /// Times the simulated user became locked (five failed logins in a row).
    pub fn lock_events(&self) -> u64 {
        lock(&self.state.auth).lock_events
    }

    pub fn max_concurrency(&self) -> u64 {
        lock(&self.state.stats).max_concurrency
    }

    /// The headers of the last request at an endpoint, lower-case names.
    pub fn last_headers(&self, endpoint: &str) -> Vec<(String, String)> {
        lock(&self.state.stats)
            .last_headers
            .get(endpoint)
            .cloned()
            .unwrap_or_default()
    }

    pub fn apply(&self, req: FaultRequest) -> Result<(), String> {
        self.state.apply(req)
    }

    pub fn reset(&self) {
        self.state.reset();
    }

    /// A handle that answers requests in-process, for tests under paused time (no sockets, so
    /// tokio's clock can jump without firing I/O timeouts).
    pub fn handle(&self) -> SimHandle {
        SimHandle(self.state.clone())
    }

    pub async fn stop(mut self) {
        self.shutdown.trigger();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Simulator {
    fn drop(&mut self) {
        self.shutdown.trigger();
    }
}

/// A certificate for `localhost`, `127.0.0.1` and `names`, its PEM written to `path`. The ring
/// provider is named here rather than installed process-wide, so the simulator leaves the host's
/// rustls set-up alone.
fn self_signed_acceptor(
    path: &Path,
    names: &[String],
) -> std::io::Result<tokio_rustls::TlsAcceptor> {
    let mut sans = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    sans.extend(names.iter().cloned());
    let cert = rcgen::generate_simple_self_signed(sans)
        .map_err(|e| std::io::Error::other(format!("simulator certificate: {e}")))?;
    std::fs::write(path, cert.cert.pem())?;
    let key = rustls::pki_types::PrivateKeyDer::try_from(cert.signing_key.serialize_der())
        .map_err(|e| std::io::Error::other(format!("simulator key: {e}")))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(|b| {
            b.with_no_client_auth()
                .with_single_cert(vec![cert.cert.der().clone()], key)
        })
        .map_err(|e| std::io::Error::other(format!("simulator TLS: {e}")))?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Which endpoint a request is for (the stats and fault key).
fn endpoint_of(method: &Method, path: &str) -> Option<&'static str> {
    match (method, path) {
        (&Method::POST, "/api/ts/v1/oauth2/token") => Some("oauth_token"),
        (&Method::POST, "/api/m2m/v1/session/login") => Some("session_login"),
        (&Method::GET, p) if p.starts_with("/api/fota/v1/licenses/") => Some("licenses"),
        (&Method::GET, p) if p.starts_with("/api/fota/v1/subscriptions/") => Some("subscriptions"),
        _ => None,
    }
}

/// A request as the simulator sees it, body already read.
pub struct SimRequest {
    pub method: Method,
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// Requests to the simulator are small; anything larger is refused.
const MAX_SIM_BODY: usize = 1 << 20;

impl SimState {
    /// Answers one request from the accept loop.
    async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        let (parts, body) = req.into_parts();
        let body = match http_body_util::Limited::new(body, MAX_SIM_BODY)
            .collect()
            .await
        {
            Ok(b) => b.to_bytes(),
            Err(_) => {
                return error_400("INVALID_PARAMETER", "request body too large or unreadable")
            }
        };
        self.respond(SimRequest {
            method: parts.method,
            path: parts.uri.path().to_string(),
            headers: parts.headers,
            body,
        })
        .await
    }
}

impl SimState {
    /// Answers one request: control API, or an endpoint with latency, faults and rate limit.
    pub async fn respond(&self, req: SimRequest) -> Response<Body> {
        if let Some(rest) = req.path.strip_prefix("/_sim/") {
            return self.control(&req.method, rest, &req.body);
        }
        let Some(endpoint) = endpoint_of(&req.method, &req.path) else {
            return json_value(
                StatusCode::NOT_FOUND,
                &json!({"errorCode": "NOT_FOUND", "errorMessage": "Resource not found"}),
            );
        };
        let inflight = lock(&self.stats).enter(endpoint, &req.headers);
        let latency = *lock(&self.latency);
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        let resp = self.answer(endpoint, &req).await;
        let status = if aborted(&resp) {
            0 // connection closed without an answer
        } else {
            resp.status().as_u16()
        };
        lock(&self.stats).record(endpoint, status);
        drop(inflight);
        resp
    }
}

impl SimState {
    async fn answer(&self, endpoint: &'static str, req: &SimRequest) -> Response<Body> {
        let fault = control::take_fault(&mut lock(&self.faults), endpoint);
        let mut loop_cursor = false;
        if let Some(kind) = fault {
            match kind {
                FaultKind::Status {
                    status,
                    body,
                    retry_after,
                } => {
                    let mut r = json(
                        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                        body,
                    );
                    if let Some(ra) = retry_after.and_then(|v| HeaderValue::from_str(&v).ok()) {
                        r.headers_mut().insert(header::RETRY_AFTER, ra);
                    }
                    return r;
                }
                FaultKind::Hang(d) => {
                    tokio::time::sleep(d).await;
                    return json(StatusCode::GATEWAY_TIMEOUT, Bytes::from_static(b"{}"));
                }
                FaultKind::Close => {
                    let mut r = Response::new(Body::default());
                    r.extensions_mut().insert(AbortConnection);
                    return r;
                }
                FaultKind::Malformed => {
                    return respond::text(
                        StatusCode::OK,
                        Bytes::from_static(
                            b"<html><body>Service Temporarily Unavailable</body></html>",
                        ),
                        "text/html",
                    );
                }
                FaultKind::Oversized(n) => {
                    let mut body = Vec::with_capacity(n + 16);
                    body.extend_from_slice(b"{\"pad\":\"");
                    body.resize(n.saturating_sub(2).max(8), b'x');
                    body.extend_from_slice(b"\"}");
                    return json(StatusCode::OK, Bytes::from(body));
                }
                FaultKind::LoopCursor => loop_cursor = true,
            }
        }
        let throttled = lock(&self.limiter).take();
        if let Err(wait) = throttled {
            let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            let mut r = json_value(
                StatusCode::TOO_MANY_REQUESTS,
                &json!({"errorCode": "REQUEST_THROTTLED", "errorMessage": "Too many requests"}),
            );
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
            return r;
        }
        match endpoint {
            "oauth_token" => self.oauth_token(req),
            "session_login" => self.session_login(req),
            _ => self.fota(endpoint, &req.headers, &req.path, loop_cursor),
        }
    }

    fn control(&self, method: &Method, what: &str, body: &[u8]) -> Response<Body> {
        match (method.clone(), what) {
            (Method::GET, "accounts") => {
                let list: Vec<_> = self
                    .accounts
                    .iter()
                    .map(|a| {
                        json!({
                            "accountName": a.name,
                            "devices": a.imeis.len(),
                            "firstDeviceId": a.imeis.first().map(|i| i.to_string()),
                            "lastDeviceId": a.imeis.last().map(|i| i.to_string()),
                        })
                    })
                    .collect();
                json_value(StatusCode::OK, &json!(list))
            }
            (Method::GET, "stats") => json_value(StatusCode::OK, &self.stats_json()),
            (Method::POST, "reset") => {
                self.reset();
                json_value(StatusCode::OK, &json!({"reset": true}))
            }
            (Method::POST, "faults") => {
                let parsed: Result<FaultRequest, _> = serde_json::from_slice(body);
                match parsed
                    .map_err(|e| e.to_string())
                    .and_then(|f| self.apply(f))
                {
                    Ok(()) => json_value(StatusCode::OK, &json!({"ok": true})),
                    Err(e) => error_400("INVALID_PARAMETER", &e),
                }
            }
            _ => json_value(
                StatusCode::NOT_FOUND,
                &json!({"errorCode": "NOT_FOUND", "errorMessage": "unknown control route"}),
            ),
        }
    }

    fn apply(&self, f: FaultRequest) -> Result<(), String> {
        if let Some(fault) = f.fault()? {
            lock(&self.faults).push(fault);
        }
        let mut auth = lock(&self.auth);
        if f.expire_sessions {
            auth.sessions.clear();
        }
        if f.revoke_tokens {
            auth.bearer = None;
        }
        if f.unlock_users {
            auth.locked = false;
            auth.failed_logins = 0;
        }
        drop(auth);
        if f.rate.is_some() || f.burst.is_some() {
            let mut l = lock(&self.limiter);
            let rate = match f.rate {
                Some(r) if r > 0.0 => Some(r),
                Some(_) => None,
                None => l.rate,
            };
            *l = Limiter::new(rate, f.burst);
        }
        if let Some(lat) = &f.latency {
            *lock(&self.latency) = control::parse_duration(lat)?;
        }
        Ok(())
    }

    /// `GET /_sim/stats`: requests per endpoint and status, concurrency, and the login counts
    /// that decide the lock.
    fn stats_json(&self) -> serde_json::Value {
        let mut stats = lock(&self.stats).to_json();
        let auth = lock(&self.auth);
        stats["logins"] = json!({
            "rejected": auth.rejected_logins,
            "failed_in_a_row": auth.failed_logins,
            "locked": auth.locked,
            "lock_events": auth.lock_events,
        });
        stats
    }

    fn reset(&self) {
        *lock(&self.auth) = Auth::default();
        lock(&self.faults).clear();
        lock(&self.stats).reset();
        *lock(&self.limiter) = Limiter::new(self.opts.rate, self.opts.burst);
        *lock(&self.latency) = self.opts.latency;
    }
}

/// The simulator answering in-process: what [`Simulator::handle`] hands out.
#[derive(Clone)]
pub struct SimHandle(Arc<SimState>);

/// An in-process answer: what would have gone over the wire.
#[derive(Debug, Clone)]
pub struct SimResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// The simulator dropped the connection without answering (the `close` fault).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionClosed;

impl std::fmt::Display for ConnectionClosed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("connection closed by the simulator")
    }
}

impl std::error::Error for ConnectionClosed {}

impl SimHandle {
    /// Answers one request as the listener would, with latency, faults, rate limit and stats.
    pub async fn call(&self, req: SimRequest) -> Result<SimResponse, ConnectionClosed> {
        let resp = self.0.respond(req).await;
        if aborted(&resp) {
            return Err(ConnectionClosed);
        }
        let (parts, body) = resp.into_parts();
        let body = match body.collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(never) => match never {},
        };
        Ok(SimResponse {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }
}

#[cfg(test)]
mod tests;
