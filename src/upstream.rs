//! Every upstream call goes through [`Upstream::call_for`]: 429 cooldown → circuit → budget →
//! one attempt (timed, metered) → classification → retry with full-jitter backoff.
//!
//! The cooldown and the circuit sit behind [`protection::Protection`], the budget behind
//! [`budget::Budget`]: the seams a fleet's shared versions implement ([`fleet`]: one budget
//! script per attempt that also reports, and enforces, the fleet's cooldown and circuit).

pub mod budget;
pub mod circuit;
pub mod fleet;
pub mod json;
pub mod protection;
pub mod routes;
pub mod tls;
pub mod transport;

use crate::config::UpstreamConfig;
use crate::error::{GatewayError, Throttle};
use crate::observe::{Endpoint, Metrics};
use crate::upstream::budget::{Budget, BudgetParams, Denied};
use crate::upstream::circuit::{Admission, CircuitState, Outcome};
use crate::upstream::protection::{ProbeGuard, Protection, Refusal};
use crate::upstream::transport::{OutRequest, RawResponse, Transport, TransportError};
use crate::util::backoff::{Backoff, Jitter};
use arc_swap::ArcSwap;
use http::{HeaderMap, Method, StatusCode};
use prometheus::IntGauge;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::time::Instant;

/// Used when a 429 carries no usable `Retry-After`.
pub const DEFAULT_COOLDOWN: Duration = Duration::from_secs(30);
/// The longest cooldown a `Retry-After` may ask for.
pub const MAX_COOLDOWN: Duration = Duration::from_secs(600);
const BACKOFF_BASE: Duration = Duration::from_millis(50);
const BACKOFF_CAP: Duration = Duration::from_secs(2);
/// Between retries of one call: full jitter in `[0, min(2 s, 50 ms × 2^attempt)]`.
const RETRY_BACKOFF: Backoff = Backoff::new(BACKOFF_BASE, BACKOFF_CAP, Jitter::Full);

/// The per-call numbers of `[upstream]`, read once at the start of each call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamSettings {
    pub timeout: Duration,
    pub retries: u32,
    pub max_queue_wait: Duration,
}

pub struct Upstream {
    transport: Arc<dyn Transport>,
    budget: Arc<dyn Budget>,
    protection: Arc<dyn Protection>,
    metrics: Metrics,
    /// Swapped whole by [`Upstream::apply`]; a call keeps the numbers it started with.
    settings: ArcSwap<UpstreamSettings>,
}

/// Counts one attempt in the `upstream_inflight` gauge for as long as it lives, so an attempt
/// that panics or whose future is dropped is counted out too.
struct InFlight<'a>(&'a IntGauge);

impl<'a> InFlight<'a> {
    fn new(gauge: &'a IntGauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// `Retry-After` as seconds or an HTTP date; 30 s when absent or unreadable; capped at 10 min.
pub fn parse_retry_after(headers: &HeaderMap) -> Duration {
    let Some(v) = headers
        .get(http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
    else {
        return DEFAULT_COOLDOWN;
    };
    let v = v.trim();
    let d = if let Ok(secs) = v.parse::<u64>() {
        Duration::from_secs(secs)
    } else if let Ok(at) = httpdate::parse_http_date(v) {
        at.duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO)
    } else {
        DEFAULT_COOLDOWN
    };
    d.clamp(Duration::from_secs(1), MAX_COOLDOWN)
}

/// True if the body is one JSON object (what every upstream 200 must be): a validating scan
/// that builds nothing ([`json`]; faster than serde_json's `IgnoredAny`, see
/// `benches/miss_path.rs`).
pub fn is_json_object(body: &[u8]) -> bool {
    json::is_object(body)
}

/// The error of a call that could not connect (the request was never sent).
const CONNECT_FAILED: &str = "cannot connect to upstream";
/// The error of a 5xx answer starts with this, followed by the status.
const SERVER_ERROR: &str = "upstream answered ";

fn server_error(status: StatusCode) -> GatewayError {
    GatewayError::BadGateway(format!("{SERVER_ERROR}{}", status.as_u16()))
}

/// True for a failed call that provably did not reach the upstream's judgement of the request:
/// a connect error (never sent) or a 5xx answer (the server failed before judging it). The
/// lockout guard refunds a login attempt for these, and only these (SPEC §5).
pub fn unjudged(err: &GatewayError) -> bool {
    let GatewayError::BadGateway(m) = err else {
        return false;
    };
    m == CONNECT_FAILED
        || m.strip_prefix(SERVER_ERROR)
            .and_then(|code| code.parse::<u16>().ok())
            .is_some_and(|code| (500..600).contains(&code))
}

enum Verdict {
    Done(Result<RawResponse, GatewayError>),
    Retry(GatewayError),
}

/// What one attempt's result means: for the circuit, for the caller, and (a 429) the cooldown
/// to start.
struct Classified {
    outcome: Outcome,
    verdict: Verdict,
    cooldown: Option<Duration>,
}

fn refused(refusal: Refusal) -> GatewayError {
    match refusal {
        Refusal::Cooldown(left) => GatewayError::UpstreamUnavailable {
            reason: Throttle::Upstream429,
            retry_after: left.min(MAX_COOLDOWN),
            message: "upstream is throttling; retry later",
        },
        Refusal::CircuitOpen(retry_after) => GatewayError::UpstreamUnavailable {
            reason: Throttle::CircuitOpen,
            retry_after,
            message: "upstream circuit is open after repeated failures; retry later",
        },
    }
}

impl Upstream {
    pub fn new(
        transport: Arc<dyn Transport>,
        budget: Arc<dyn Budget>,
        protection: Arc<dyn Protection>,
        metrics: Metrics,
        settings: UpstreamSettings,
    ) -> Self {
        transport.attach_metrics(&metrics);
        Self {
            transport,
            budget,
            protection,
            metrics,
            settings: ArcSwap::from_pointee(settings),
        }
    }

    /// The reloadable keys of `[upstream]` (SPEC §11), for the calls that start after it:
    /// `rate_per_second`, `burst`, `max_concurrent` (the budget), `max_queue_wait`, `retries`,
    /// `timeout`, `circuit_failures`, `circuit_open_for` (the protection), `connect_timeout`,
    /// `max_response_bytes` (the transport). `base_url` and `ca_file` need a restart;
    /// `max_walk_pages` is read per request from the settings.
    pub fn apply(&self, u: &UpstreamConfig) {
        self.budget
            .reconfigure(u.rate_per_second, u.burst, u.max_concurrent);
        self.budget.set_call_timeout(u.timeout.0);
        self.protection
            .reconfigure(u.circuit_failures, u.circuit_open_for.0);
        self.transport
            .reconfigure(u.connect_timeout.0, u.max_response_bytes.as_usize());
        self.settings.store(Arc::new(UpstreamSettings {
            timeout: u.timeout.0,
            retries: u.retries,
            max_queue_wait: u.max_queue_wait.0,
        }));
    }

    /// The per-call numbers in force.
    pub fn settings(&self) -> Arc<UpstreamSettings> {
        self.settings.load_full()
    }

    pub fn circuit_state(&self) -> CircuitState {
        self.protection.state()
    }

    /// The end of the current 429 cooldown, if one is running (what the protection reports as
    /// time left, from now; at most [`MAX_COOLDOWN`] away).
    pub fn cooldown_until(&self) -> Option<Instant> {
        let left = self.protection.cooldown_remaining()?;
        Some(Instant::now() + left.min(MAX_COOLDOWN))
    }

    pub fn budget_available(&self) -> f64 {
        self.budget.available()
    }

    /// The budget's numbers in force (in fleet mode, the fleet's).
    pub fn budget_params(&self) -> BudgetParams {
        self.budget.params()
    }

    async fn start_cooldown(&self, d: Duration) {
        self.protection.start_cooldown(d).await;
        tracing::warn!(
            cooldown_secs = d.as_secs(),
            "upstream answered 429: no upstream call until the cooldown ends"
        );
    }

    /// A call for the gateway's own work (token calls): it waits for budget as client "".
    pub async fn call(
        &self,
        endpoint: Endpoint,
        req: OutRequest,
        deadline: Instant,
        attempts: &AtomicU32,
    ) -> Result<RawResponse, GatewayError> {
        self.call_for("", endpoint, req, deadline, attempts).await
    }

    /// One logical call on behalf of `client` (a principal id, "" for anonymous clients; its
    /// budget waits take turns with other clients'); `attempts` counts the attempts it made.
    /// GETs are retried on connect errors, dropped connections, timeouts and 502/503/504; POSTs
    /// only on connect errors (the request never reached the upstream).
    pub async fn call_for(
        &self,
        client: &str,
        endpoint: Endpoint,
        req: OutRequest,
        deadline: Instant,
        attempts: &AtomicU32,
    ) -> Result<RawResponse, GatewayError> {
        let idempotent = req.method == Method::GET;
        let settings = self.settings.load_full();
        let mut attempt = 0u32;
        loop {
            let admission = self.protection.admit().map_err(refused)?;
            // Gives a half-open probe back if this attempt panics or is dropped mid-flight.
            let _probe = ProbeGuard::new(&*self.protection, admission);
            let budget_deadline = deadline.min(Instant::now() + settings.max_queue_wait);
            let permit = match self.budget.acquire(client, budget_deadline).await {
                Ok(permit) => permit,
                Err(denied) => {
                    // Not an attempt: give the probe back without an outcome.
                    self.record_circuit(admission, Outcome::Neutral).await;
                    return Err(match denied {
                        Denied::Refused(refusal) => refused(refusal),
                        Denied::Exhausted => GatewayError::UpstreamUnavailable {
                            reason: Throttle::Budget,
                            retry_after: Duration::from_secs(1),
                            message: "upstream request budget exhausted; retry later",
                        },
                    });
                }
            };
            // A fleet's budget script runs the fleet's circuit: its grant says whether this
            // attempt is the fleet's one probe (a fleet probe is given back by the permit).
            let admission = permit.admission().unwrap_or(admission);
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                self.record_circuit(admission, Outcome::Neutral).await;
                return Err(GatewayError::UpstreamTimeout);
            }
            let started = Instant::now();
            attempts.fetch_add(1, Ordering::Relaxed);
            let result = {
                let _inflight = InFlight::new(&self.metrics.upstream_inflight);
                self.transport
                    .send(req.clone(), settings.timeout.min(remaining))
                    .await
            };
            let status_label = match &result {
                Ok(r) => r.status.as_str().to_string(),
                Err(TransportError::Timeout) => "timeout".into(),
                Err(_) => "error".into(),
            };
            self.metrics
                .record_upstream(endpoint, &status_label, started.elapsed().as_secs_f64());
            let Classified {
                outcome,
                verdict,
                cooldown,
            } = classify(endpoint, idempotent, result);
            self.record_circuit(admission, outcome).await;
            if let Some(d) = cooldown {
                // Stored (in fleet mode: in Redis) before the caller answers its client.
                self.start_cooldown(d).await;
            }
            drop(permit);
            let err = match verdict {
                Verdict::Done(r) => return r,
                Verdict::Retry(e) => e,
            };
            if admission.probe || attempt >= settings.retries {
                return Err(err);
            }
            let pause = RETRY_BACKOFF.delay(attempt);
            if Instant::now() + pause >= deadline {
                return Err(err);
            }
            tokio::time::sleep(pause).await;
            attempt += 1;
            tracing::debug!(endpoint = endpoint.label(), attempt, error = %err, "retrying upstream call");
        }
    }

    async fn record_circuit(&self, admission: Admission, outcome: Outcome) {
        if let Some(open) = self.protection.record(admission, outcome).await {
            self.metrics.circuit_open.set(i64::from(open));
            if open {
                tracing::error!("upstream circuit opened after repeated failures");
            } else {
                tracing::info!("upstream circuit closed");
            }
        }
    }
}

/// What an attempt's result means; the caller records it and starts the cooldown.
fn classify(
    endpoint: Endpoint,
    idempotent: bool,
    result: Result<RawResponse, TransportError>,
) -> Classified {
    let fail = |err: GatewayError, retryable: bool| Classified {
        outcome: Outcome::Failure,
        verdict: if retryable {
            Verdict::Retry(err)
        } else {
            Verdict::Done(Err(err))
        },
        cooldown: None,
    };
    match result {
        Ok(resp) if resp.status == StatusCode::TOO_MANY_REQUESTS => {
            let d = parse_retry_after(&resp.headers);
            Classified {
                outcome: Outcome::Neutral,
                verdict: Verdict::Done(Err(GatewayError::UpstreamUnavailable {
                    reason: Throttle::Upstream429,
                    retry_after: d,
                    message: "upstream is throttling; retry later",
                })),
                cooldown: Some(d),
            }
        }
        Ok(resp) if resp.status.is_server_error() => {
            let retryable = idempotent
                && matches!(
                    resp.status,
                    StatusCode::BAD_GATEWAY
                        | StatusCode::SERVICE_UNAVAILABLE
                        | StatusCode::GATEWAY_TIMEOUT
                );
            fail(server_error(resp.status), retryable)
        }
        Ok(resp) if resp.status == StatusCode::OK && !is_json_object(&resp.body) => {
            tracing::warn!(
                endpoint = endpoint.label(),
                bytes = resp.body.len(),
                "upstream 200 body is not a JSON object"
            );
            fail(
                GatewayError::BadGateway(
                    "upstream answered a body that is not a JSON object".into(),
                ),
                false,
            )
        }
        Ok(resp) => Classified {
            outcome: Outcome::Success,
            verdict: Verdict::Done(Ok(resp)),
            cooldown: None,
        },
        Err(TransportError::Connect(e)) => {
            tracing::warn!(endpoint = endpoint.label(), error = %e, "upstream connect failed");
            fail(GatewayError::BadGateway(CONNECT_FAILED.into()), true)
        }
        Err(TransportError::Closed(e)) => {
            tracing::warn!(endpoint = endpoint.label(), error = %e, "upstream connection failed");
            fail(
                GatewayError::BadGateway("upstream closed the connection".into()),
                idempotent,
            )
        }
        Err(TransportError::Timeout) => fail(GatewayError::UpstreamTimeout, idempotent),
        Err(e @ (TransportError::TooLarge | TransportError::Truncated(_))) => {
            fail(GatewayError::BadGateway(e.to_string()), false)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_forms() {
        let mut h = HeaderMap::new();
        assert_eq!(parse_retry_after(&h), DEFAULT_COOLDOWN);
        h.insert("retry-after", "2".parse().unwrap());
        assert_eq!(parse_retry_after(&h), Duration::from_secs(2));
        h.insert("retry-after", "99999".parse().unwrap());
        assert_eq!(parse_retry_after(&h), MAX_COOLDOWN);
        let at = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(120));
        h.insert("retry-after", at.parse().unwrap());
        let d = parse_retry_after(&h);
        assert!(
            d > Duration::from_secs(110) && d <= Duration::from_secs(120),
            "{d:?}"
        );
        h.insert("retry-after", "soon".parse().unwrap());
        assert_eq!(parse_retry_after(&h), DEFAULT_COOLDOWN);
    }

    /// Always 503; counts sends and keeps what `reconfigure` was given.
    #[derive(Default)]
    struct Failing {
        sends: AtomicU32,
        reconfigured: parking_lot::Mutex<Option<(Duration, usize)>>,
    }

    impl Transport for Failing {
        fn send(&self, _: OutRequest, _: Duration) -> transport::TransportFuture<'_> {
            self.sends.fetch_add(1, Ordering::Relaxed);
            Box::pin(async {
                Ok(RawResponse {
                    status: StatusCode::SERVICE_UNAVAILABLE,
                    headers: HeaderMap::new(),
                    body: bytes::Bytes::new(),
                })
            })
        }

        fn reconfigure(&self, connect_timeout: Duration, max_response_bytes: usize) {
            *self.reconfigured.lock() = Some((connect_timeout, max_response_bytes));
        }
    }

    /// `apply` reaches every part: retries and timeout per call, the circuit's threshold, the
    /// budget, the transport's connect timeout and body limit.
    #[tokio::test(start_paused = true)]
    async fn apply_reaches_settings_circuit_budget_and_transport() {
        use crate::config::{ByteSize, Dur};
        let transport = Arc::new(Failing::default());
        let up = Upstream::new(
            transport.clone(),
            Arc::new(budget::LocalBudget::new(100.0, 100, 10)),
            Arc::new(protection::LocalProtection::new(
                100,
                Duration::from_secs(30),
            )),
            Metrics::new(),
            UpstreamSettings {
                timeout: Duration::from_secs(5),
                retries: 0,
                max_queue_wait: Duration::from_secs(1),
            },
        );
        async fn call(up: &Upstream) -> (Result<RawResponse, GatewayError>, u32) {
            let req = OutRequest {
                method: Method::GET,
                path: "/x".into(),
                headers: HeaderMap::new(),
                body: bytes::Bytes::new(),
            };
            let attempts = AtomicU32::new(0);
            let deadline = Instant::now() + Duration::from_secs(60);
            let r = up.call(Endpoint::Licenses, req, deadline, &attempts).await;
            (r, attempts.load(Ordering::Relaxed))
        }
        assert_eq!(call(&up).await.1, 1);
        let u = UpstreamConfig {
            retries: 2,
            timeout: Dur::secs(7),
            circuit_failures: 4,
            connect_timeout: Dur::secs(2),
            max_response_bytes: ByteSize(1234),
            rate_per_second: 5.0,
            burst: 1,
            ..UpstreamConfig::default()
        };
        up.apply(&u);
        assert_eq!(up.settings().retries, 2);
        assert_eq!(up.settings().timeout, Duration::from_secs(7));
        assert_eq!(
            *transport.reconfigured.lock(),
            Some((Duration::from_secs(2), 1234))
        );
        assert!(up.budget_available() <= 1.0);
        // The first call's failure and three attempts (two retries) reach the new threshold.
        let (r, attempts) = call(&up).await;
        assert!(r.is_err());
        assert_eq!(attempts, 3);
        assert_eq!(up.circuit_state(), CircuitState::Open);
    }

    #[test]
    fn json_object_check() {
        assert!(is_json_object(b" {\"a\":1}"));
        assert!(!is_json_object(b"[1]"));
        assert!(!is_json_object(b"<html>"));
        assert!(!is_json_object(b"{\"a\":"));
    }

    #[test]
    fn unjudged_failures_are_connect_errors_and_5xx_only() {
        assert!(unjudged(&GatewayError::BadGateway(CONNECT_FAILED.into())));
        assert!(unjudged(&server_error(StatusCode::SERVICE_UNAVAILABLE)));
        assert!(!unjudged(&GatewayError::BadGateway(
            "upstream closed the connection".into()
        )));
        assert!(!unjudged(&GatewayError::BadGateway(
            "upstream answered a body that is not a JSON object".into()
        )));
        assert!(!unjudged(&GatewayError::UpstreamTimeout));
    }

    #[test]
    fn jitter_is_bounded() {
        for attempt in 0..30 {
            assert!(RETRY_BACKOFF.delay(attempt) <= BACKOFF_CAP);
            assert!(RETRY_BACKOFF.delay(attempt) <= BACKOFF_BASE * 2u32.pow(attempt.min(6)));
        }
    }
}
