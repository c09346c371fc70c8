//! Prometheus metrics: one [`Metrics`] struct with its own registry.
//!
//! Labels are route names, endpoints and outcomes, never raw paths, accounts or device ids.
//! Every series of a fixed label set is registered at zero at start so dashboards see it.

use prometheus::{
    Encoder, Gauge, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
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

#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub http_requests: IntCounterVec,
    pub http_duration: HistogramVec,
    pub cache_lookups: IntCounterVec,
    pub cache_entries: IntGauge,
    pub cache_bytes: IntGauge,
    pub upstream_requests: IntCounterVec,
    pub upstream_duration: HistogramVec,
    pub upstream_inflight: IntGauge,
    pub upstream_throttled: IntCounterVec,
    pub token_refreshes: IntCounterVec,
    pub token_expiry: GaugeVec,
    pub circuit_open: IntGauge,
    pub budget_available: Gauge,
    pub login_paused: IntGaugeVec,
}

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help).namespace(NS)
}

fn register<C: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: C) -> C {
    // Names are fixed and unique in this file, so registration cannot collide.
    let _ = r.register(Box::new(c.clone()));
    c
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let r = Registry::new();
        let fast = vec![
            0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
            2.5, 5.0, 10.0, 30.0,
        ];
        let slow = vec![
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 30.0,
        ];
        let m = Metrics {
            http_requests: register(
                &r,
                IntCounterVec::new(
                    opts(
                        "http_requests_total",
                        "Client API requests by route and status.",
                    ),
                    &["route", "status"],
                )
                .unwrap_or_else(|_| unreachable!()),
            ),
            http_duration: register(
                &r,
                HistogramVec::new(
                    HistogramOpts::from(opts(
                        "http_request_duration_seconds",
                        "Client API request duration by route.",
                    ))
                    .buckets(fast),
                    &["route"],
                )
                .unwrap_or_else(|_| unreachable!()),
            ),
            cache_lookups: register(
                &r,
                IntCounterVec::new(
                    opts("cache_lookups_total", "Cache lookups by result."),
                    &["result"],
                )
                .unwrap_or_else(|_| unreachable!()),
            ),
            cache_entries: register(
                &r,
                IntGauge::with_opts(opts("cache_entries", "Entries in the page cache."))
                    .unwrap_or_else(|_| unreachable!()),
            ),
            cache_bytes: register(
                &r,
                IntGauge::with_opts(opts(
                    "cache_bytes",
                    "Bytes held by the page cache (its weight).",
                ))
                .unwrap_or_else(|_| unreachable!()),
            ),
            upstream_requests: register(
                &r,
                IntCounterVec::new(
                    opts(
                        "upstream_requests_total",
                        "Upstream attempts by endpoint and status (code, timeout or error).",
                    ),
                    &["endpoint", "status"],
                )
                .unwrap_or_else(|_| unreachable!()),
            ),
            upstream_duration: register(
                &r,
                HistogramVec::new(
                    HistogramOpts::from(opts(
                        "upstream_request_duration_seconds",
                        "Upstream attempt duration by endpoint.",
                    ))
                    .buckets(slow),
                    &["endpoint"],
                )
                .unwrap_or_else(|_| unreachable!()),
            ),
            upstream_inflight: register(
                &r,
                IntGauge::with_opts(opts("upstream_inflight", "Upstream requests in flight."))
                    .unwrap_or_else(|_| unreachable!()),
            ),
            upstream_throttled: register(
                &r,
                IntCounterVec::new(
                    opts(
                        "upstream_throttled_total",
                        "Client requests answered without a fresh upstream answer, by reason.",
                    ),
                    &["reason"],
                )
                .unwrap_or_else(|_| unreachable!()),
            ),
            token_refreshes: register(
                &r,
                IntCounterVec::new(
                    opts(
                        "token_refreshes_total",
                        "Upstream token refreshes by token and outcome.",
                    ),
                    &["token", "outcome"],
                )
                .unwrap_or_else(|_| unreachable!()),
            ),
            token_expiry: register(
                &r,
                GaugeVec::new(
                    opts(
                        "token_expiry_timestamp_seconds",
                        "Unix time at which the held token expires (0 when none is held).",
                    ),
                    &["token"],
                )
                .unwrap_or_else(|_| unreachable!()),
            ),
            circuit_open: register(
                &r,
                IntGauge::with_opts(opts(
                    "circuit_open",
                    "1 while the upstream circuit is open.",
                ))
                .unwrap_or_else(|_| unreachable!()),
            ),
            budget_available: register(
                &r,
                Gauge::with_opts(opts(
                    "upstream_budget_available",
                    "Tokens left in the upstream rate bucket.",
                ))
                .unwrap_or_else(|_| unreachable!()),
            ),
            login_paused: register(
                &r,
                IntGaugeVec::new(
                    opts(
                        "login_paused",
                        "1 while upstream logins of this token are paused or stopped by the lockout guard.",
                    ),
                    &["token"],
                )
                .unwrap_or_else(|_| unreachable!()),
            ),
            registry: r,
        };
        let build = register(
            &m.registry,
            IntGaugeVec::new(opts("build_info", "Build information."), &["version"])
                .unwrap_or_else(|_| unreachable!()),
        );
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        for route in crate::route::ROUTE_LABELS {
            m.http_duration.with_label_values(&[route]);
        }
        for result in ["hit", "miss", "stale", "coalesced"] {
            m.cache_lookups.with_label_values(&[result]);
        }
        for e in Endpoint::ALL {
            m.upstream_duration.with_label_values(&[e.label()]);
        }
        for reason in ["budget", "upstream_429", "circuit_open"] {
            m.upstream_throttled.with_label_values(&[reason]);
        }
        for token in ["oauth", "session"] {
            for outcome in ["success", "failure", "rejected"] {
                m.token_refreshes.with_label_values(&[token, outcome]);
            }
            m.token_expiry.with_label_values(&[token]);
            m.login_paused.with_label_values(&[token]);
        }
        m
    }

    pub fn record_http(&self, route: &str, status: u16, seconds: f64) {
        self.http_requests
            .with_label_values(&[route, status_label(status)])
            .inc();
        self.http_duration
            .with_label_values(&[route])
            .observe(seconds);
    }

    pub fn cache_lookup(&self, result: &str) {
        self.cache_lookups.with_label_values(&[result]).inc();
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

    pub fn token_refresh(&self, token: &str, outcome: &str) {
        self.token_refreshes
            .with_label_values(&[token, outcome])
            .inc();
    }

    /// Prometheus text format, process metrics appended.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        let mut out = String::from_utf8(buf).unwrap_or_default();
        crate::metrics::process::append(&mut out);
        out
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

mod process {
    //! `process_*` metrics from `/proc/self` (Linux); absent elsewhere.
    use std::fmt::Write;

    pub fn append(out: &mut String) {
        let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
            return;
        };
        // Fields after the ")" that ends the command name: state is field 3.
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            return;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks = 100.0; // USER_HZ on Linux
        let page = 4096.0;
        let num = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        // f[0] is field 3 (state); utime = field 14, stime = 15, starttime = 22, rss = 24.
        let cpu = (num(11) + num(12)) / ticks;
        let rss = num(21) * page;
        let vsize = num(20);
        let fds = std::fs::read_dir("/proc/self/fd")
            .map(|d| d.count())
            .unwrap_or(0);
        let boot = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|s| {
                s.lines().find_map(|l| {
                    l.strip_prefix("btime ")
                        .and_then(|v| v.trim().parse::<f64>().ok())
                })
            })
            .unwrap_or(0.0);
        let start = boot + num(19) / ticks;
        let _ = write!(
            out,
            "# HELP process_cpu_seconds_total Total user and system CPU time spent in seconds.\n\
             # TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total {cpu}\n\
             # HELP process_resident_memory_bytes Resident memory size in bytes.\n\
             # TYPE process_resident_memory_bytes gauge\nprocess_resident_memory_bytes {rss}\n\
             # HELP process_virtual_memory_bytes Virtual memory size in bytes.\n\
             # TYPE process_virtual_memory_bytes gauge\nprocess_virtual_memory_bytes {vsize}\n\
             # HELP process_open_fds Number of open file descriptors.\n\
             # TYPE process_open_fds gauge\nprocess_open_fds {fds}\n\
             # HELP process_start_time_seconds Start time of the process since unix epoch in seconds.\n\
             # TYPE process_start_time_seconds gauge\nprocess_start_time_seconds {start}\n"
        );
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
            "process_resident_memory_bytes",
        ] {
            assert!(text.contains(needle), "missing {needle}");
        }
    }
}
