//! Prometheus metrics: one [`Metrics`] struct with its own registry.
//!
//! Labels are route names, endpoints and outcomes, never raw paths, accounts or device ids.
//! Every series of a fixed label set is registered at zero at start so dashboards see it.

use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

const NS: &str = "thingspace_gateway";

/// Upstream endpoints (metric `endpoint` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Endpoint {
    Licenses,
    Subscriptions,
    OauthToken,
    SessionLogin,
}

impl Endpoint {
    pub const ALL: [Endpoint; 4] = [
        Endpoint::Licenses,
        Endpoint::Subscriptions,
        Endpoint::OauthToken,
        Endpoint::SessionLogin,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Endpoint::Licenses => "licenses",
            Endpoint::Subscriptions => "subscriptions",
            Endpoint::OauthToken => "oauth_token",
            Endpoint::SessionLogin => "session_login",
        }
    }
}

/// The `route` label of client API metrics: one fixed set, every series registered at zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteLabel {
    Licenses,
    Subscriptions,
    AccountLicenses,
    DeviceLicense,
    OauthToken,
    SessionLogin,
    /// Requests that matched no route.
    Unmatched,
}

impl RouteLabel {
    pub const ALL: [RouteLabel; 7] = [
        RouteLabel::Licenses,
        RouteLabel::Subscriptions,
        RouteLabel::AccountLicenses,
        RouteLabel::DeviceLicense,
        RouteLabel::OauthToken,
        RouteLabel::SessionLogin,
        RouteLabel::Unmatched,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RouteLabel::Licenses => "licenses",
            RouteLabel::Subscriptions => "subscriptions",
            RouteLabel::AccountLicenses => "account_licenses",
            RouteLabel::DeviceLicense => "device_license",
            RouteLabel::OauthToken => "oauth_token",
            RouteLabel::SessionLogin => "session_login",
            RouteLabel::Unmatched => "unmatched",
        }
    }
}

/// The `token` label of token metrics: the upstream OAuth token or the M2M session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TokenLabel {
    Oauth,
    Session,
}

impl TokenLabel {
    pub const ALL: [TokenLabel; 2] = [TokenLabel::Oauth, TokenLabel::Session];

    pub fn as_str(self) -> &'static str {
        match self {
            TokenLabel::Oauth => "oauth",
            TokenLabel::Session => "session",
        }
    }
}

/// The `outcome` label of `token_refreshes_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefreshOutcome {
    /// A token was issued.
    Success,
    /// No usable answer: transport error, timeout, malformed body, a refused bearer.
    Failure,
    /// The upstream refused the credentials (or said the user is locked).
    Rejected,
}

impl RefreshOutcome {
    pub const ALL: [RefreshOutcome; 3] = [
        RefreshOutcome::Success,
        RefreshOutcome::Failure,
        RefreshOutcome::Rejected,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RefreshOutcome::Success => "success",
            RefreshOutcome::Failure => "failure",
            RefreshOutcome::Rejected => "rejected",
        }
    }
}

/// Every metric, in one registry of its own; cheap to clone (the collectors are shared).
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub http_requests: IntCounterVec,
    pub cache_entries: IntGauge,
    pub cache_bytes: IntGauge,
    pub upstream_requests: IntCounterVec,
    pub upstream_duration: HistogramVec,
    pub upstream_inflight: IntGauge,
    pub upstream_throttled: IntCounterVec,
    token_refreshes: IntCounterVec,
    token_expiry: GaugeVec,
    pub circuit_open: IntGauge,
    pub budget_available: Gauge,
    config_reloads: IntCounterVec,
    config_last_reload: Gauge,
    login_paused: IntGaugeVec,
    // Handles resolved once, so the hit path does no label lookups.
    pub lookup_hit: IntCounter,
    pub lookup_miss: IntCounter,
    pub lookup_stale: IntCounter,
    pub lookup_coalesced: IntCounter,
    http_ok: Vec<IntCounter>,
    http_hist: Vec<Histogram>,
    /// `upstream_connections_total{reused="false"}`: upstream responses that came on a new
    /// connection (its first response).
    pub upstream_connections_new: IntCounter,
    /// `upstream_connections_total{reused="true"}`: upstream responses on a connection kept
    /// alive from an earlier one.
    pub upstream_connections_reused: IntCounter,
    // Fleet mode (SPEC §10).
    pub lookup_l2_hit: IntCounter,
    pub redis_up: IntGauge,
    redis_ok: IntCounter,
    redis_error: IntCounter,
    redis_timeout: IntCounter,
    redis_duration: Histogram,
}

/// How one Redis command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedisOutcome {
    Ok,
    Error,
    Timeout,
}

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help).namespace(NS)
}

/// Registers a collector built from a fixed definition in this file. Such a definition cannot be
/// invalid or collide, so a failure here is a bug caught by the unit test, never a runtime state.
fn register<C: prometheus::core::Collector + Clone + 'static>(
    r: &Registry,
    c: prometheus::Result<C>,
) -> C {
    let c = c.unwrap_or_else(|e| panic!("metric definition: {e}"));
    r.register(Box::new(c.clone()))
        .unwrap_or_else(|e| panic!("metric registration: {e}"));
    c
}

fn counters(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    register(r, IntCounterVec::new(opts(name, help), labels))
}

fn histograms(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: Vec<f64>,
) -> HistogramVec {
    register(
        r,
        HistogramVec::new(
            HistogramOpts::from(opts(name, help)).buckets(buckets),
            labels,
        ),
    )
}

fn gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    register(r, IntGauge::with_opts(opts(name, help)))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let r = Registry::new();
        // process_* series (CPU, memory, open files, start time) from the crate's own collector.
        #[cfg(target_os = "linux")]
        let _ = r.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ));
        // Hits take well under a millisecond; upstream calls up to the 15 s attempt timeout.
        let fast = vec![
            0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
            2.5, 5.0, 10.0, 30.0,
        ];
        let slow = vec![
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 30.0,
        ];
        let http_requests = counters(
            &r,
            "http_requests_total",
            "Client API requests by route and status.",
            &["route", "status"],
        );
        let http_duration = histograms(
            &r,
            "http_request_duration_seconds",
            "Client API request duration by route.",
            &["route"],
            fast,
        );
        let cache_lookups = counters(
            &r,
            "cache_lookups_total",
            "Cache lookups by result.",
            &["result"],
        );
        let token_refreshes = counters(
            &r,
            "token_refreshes_total",
            "Upstream token refreshes by token and outcome.",
            &["token", "outcome"],
        );
        let token_expiry = register(
            &r,
            GaugeVec::new(
                opts(
                    "token_expiry_timestamp_seconds",
                    "Unix time at which the held token expires (0 when none is held).",
                ),
                &["token"],
            ),
        );
        let login_paused = register(
            &r,
            IntGaugeVec::new(
                opts(
                    "login_paused",
                    "1 while upstream logins of this token are paused or stopped by the lockout guard.",
                ),
                &["token"],
            ),
        );
        let upstream_throttled = counters(
            &r,
            "upstream_throttled_total",
            "Client requests answered without a fresh upstream answer, by reason.",
            &["reason"],
        );
        let upstream_duration = histograms(
            &r,
            "upstream_request_duration_seconds",
            "Upstream attempt duration by endpoint.",
            &["endpoint"],
            slow,
        );
        let build = register(
            &r,
            IntGaugeVec::new(opts("build_info", "Build information."), &["version"]),
        );
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        // Every series of a fixed label set exists at zero from the start.
        for e in Endpoint::ALL {
            upstream_duration.with_label_values(&[e.label()]);
        }
        for reason in ["budget", "upstream_429", "circuit_open"] {
            upstream_throttled.with_label_values(&[reason]);
        }
        for token in TokenLabel::ALL {
            for outcome in RefreshOutcome::ALL {
                token_refreshes.with_label_values(&[token.as_str(), outcome.as_str()]);
            }
            token_expiry.with_label_values(&[token.as_str()]);
            login_paused.with_label_values(&[token.as_str()]);
        }
        let http_ok = RouteLabel::ALL
            .iter()
            .map(|route| http_requests.with_label_values(&[route.as_str(), "200"]))
            .collect();
        let http_hist = RouteLabel::ALL
            .iter()
            .map(|route| http_duration.with_label_values(&[route.as_str()]))
            .collect();
        let upstream_connections = counters(
            &r,
            "upstream_connections_total",
            "Upstream responses by connection: a new one (reused=false) or one kept alive (reused=true).",
            &["reused"],
        );
        let redis_commands = counters(
            &r,
            "redis_commands_total",
            "Redis commands (fleet mode) by outcome (ok, error, timeout).",
            &["outcome"],
        );
        let redis_duration = register(
            &r,
            Histogram::with_opts(
                HistogramOpts::from(opts(
                    "redis_command_duration_seconds",
                    "Redis command round trips (fleet mode).",
                ))
                .buckets(vec![
                    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                    0.5, 1.0,
                ]),
            ),
        );
        Metrics {
            upstream_connections_new: upstream_connections.with_label_values(&["false"]),
            upstream_connections_reused: upstream_connections.with_label_values(&["true"]),
            lookup_l2_hit: cache_lookups.with_label_values(&["l2_hit"]),
            redis_up: gauge(
                &r,
                "redis_up",
                "1 while Redis answers, 0 while this replica treats it as failed (or none is configured).",
            ),
            redis_ok: redis_commands.with_label_values(&["ok"]),
            redis_error: redis_commands.with_label_values(&["error"]),
            redis_timeout: redis_commands.with_label_values(&["timeout"]),
            redis_duration,
            lookup_hit: cache_lookups.with_label_values(&["hit"]),
            lookup_miss: cache_lookups.with_label_values(&["miss"]),
            lookup_stale: cache_lookups.with_label_values(&["stale"]),
            lookup_coalesced: cache_lookups.with_label_values(&["coalesced"]),
            http_ok,
            http_hist,
            http_requests,
            cache_entries: gauge(&r, "cache_entries", "Entries in the page cache."),
            cache_bytes: gauge(
                &r,
                "cache_bytes",
                "Bytes held by the page cache (its weight).",
            ),
            upstream_requests: counters(
                &r,
                "upstream_requests_total",
                "Upstream attempts by endpoint and status (code, timeout or error).",
                &["endpoint", "status"],
            ),
            upstream_duration,
            upstream_inflight: gauge(&r, "upstream_inflight", "Upstream requests in flight."),
            upstream_throttled,
            token_refreshes,
            token_expiry,
            circuit_open: gauge(&r, "circuit_open", "1 while the upstream circuit is open."),
            budget_available: register(
                &r,
                Gauge::with_opts(opts(
                    "upstream_budget_available",
                    "Tokens left in the upstream rate bucket.",
                )),
            ),
            login_paused,
            config_reloads: {
                let c = counters(
                    &r,
                    "config_reloads_total",
                    "Config reloads by outcome (applied, rejected).",
                    &["outcome"],
                );
                for outcome in ["applied", "rejected"] {
                    c.with_label_values(&[outcome]);
                }
                c
            },
            config_last_reload: register(
                &r,
                Gauge::with_opts(opts(
                    "config_last_reload_timestamp_seconds",
                    "When the config in force was loaded (start-up included), Unix seconds.",
                )),
            ),
            registry: r,
        }
    }

    /// The config in force was loaded at `at` (start-up or an applied reload).
    pub fn config_loaded(&self, at: std::time::SystemTime) {
        let secs = at
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        self.config_last_reload.set(secs);
    }

    /// One reload, applied or rejected.
    pub fn config_reload(&self, applied: bool, at: std::time::SystemTime) {
        let outcome = if applied { "applied" } else { "rejected" };
        self.config_reloads.with_label_values(&[outcome]).inc();
        if applied {
            self.config_loaded(at);
        }
    }

    pub fn record_http(&self, route: RouteLabel, status: u16, seconds: f64) {
        let i = route as usize;
        if status == 200 {
            self.http_ok[i].inc();
        } else {
            self.http_requests
                .with_label_values(&[route.as_str(), status_label(status)])
                .inc();
        }
        self.http_hist[i].observe(seconds);
    }

    /// One Redis command that took `seconds`.
    pub fn redis_command(&self, outcome: RedisOutcome, seconds: f64) {
        match outcome {
            RedisOutcome::Ok => self.redis_ok.inc(),
            RedisOutcome::Error => self.redis_error.inc(),
            RedisOutcome::Timeout => self.redis_timeout.inc(),
        }
        self.redis_duration.observe(seconds);
    }

    /// A lookup that fetched: the leader counts a miss, joiners count as coalesced.
    pub fn lookup(&self, coalesced: bool) {
        if coalesced {
            self.lookup_coalesced.inc();
        } else {
            self.lookup_miss.inc();
        }
    }

    pub fn record_upstream(&self, endpoint: Endpoint, status: &str, seconds: f64) {
        self.upstream_requests
            .with_label_values(&[endpoint.label(), status])
            .inc();
        self.upstream_duration
            .with_label_values(&[endpoint.label()])
            .observe(seconds);
    }

    pub fn throttled(&self, reason: &str) {
        self.upstream_throttled.with_label_values(&[reason]).inc();
    }

    pub fn token_refresh(&self, token: TokenLabel, outcome: RefreshOutcome) {
        self.token_refreshes
            .with_label_values(&[token.as_str(), outcome.as_str()])
            .inc();
    }

    /// Unix time at which the held `token` expires; 0 when none is held.
    pub fn token_expiry(&self, token: TokenLabel, unix_secs: f64) {
        self.token_expiry
            .with_label_values(&[token.as_str()])
            .set(unix_secs);
    }

    /// Whether the lockout guard pauses or stops `token`'s logins.
    pub fn login_paused(&self, token: TokenLabel, paused: bool) {
        self.login_paused
            .with_label_values(&[token.as_str()])
            .set(i64::from(paused));
    }

    /// Prometheus text format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// Status codes as static label strings: no allocation per request.
fn status_label(status: u16) -> &'static str {
    match status {
        200 => "200",
        304 => "304",
        400 => "400",
        401 => "401",
        403 => "403",
        404 => "404",
        405 => "405",
        429 => "429",
        431 => "431",
        500 => "500",
        502 => "502",
        503 => "503",
        504 => "504",
        s if s < 300 => "2xx",
        s if s < 400 => "3xx",
        s if s < 500 => "4xx",
        _ => "5xx",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_series_exist_at_zero() {
        let m = Metrics::new();
        let text = m.render();
        for needle in [
            "thingspace_gateway_cache_lookups_total{result=\"coalesced\"} 0",
            "thingspace_gateway_upstream_throttled_total{reason=\"upstream_429\"} 0",
            "thingspace_gateway_token_refreshes_total{outcome=\"rejected\",token=\"session\"} 0",
            "thingspace_gateway_build_info{version=",
            "thingspace_gateway_circuit_open 0",
            "thingspace_gateway_upstream_inflight 0",
            "thingspace_gateway_upstream_connections_total{reused=\"false\"} 0",
            "thingspace_gateway_upstream_connections_total{reused=\"true\"} 0",
            "process_resident_memory_bytes",
        ] {
            assert!(text.contains(needle), "missing {needle}");
        }
    }
}
