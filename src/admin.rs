//! The admin API (`server.admin_listen`): metrics, probes, status and cache purges.

use crate::app::Gateway;
use crate::circuit::CircuitState;
use crate::respond::{json_value, text, Body};
use crate::server::Handler;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::json;
use std::sync::Arc;
use std::time::SystemTime;
use tokio::time::Instant;

pub struct AdminApi(pub Arc<Gateway>);

/// Every admin route's path template (as in `deploy/openapi.yaml`) and its methods.
pub const ADMIN_ROUTES: [(&str, &[&str]); 7] = [
    ("/metrics", &["GET", "HEAD"]),
    ("/healthz", &["GET", "HEAD"]),
    ("/readyz", &["GET", "HEAD"]),
    ("/status", &["GET", "HEAD"]),
    ("/cache", &["DELETE"]),
    ("/cache/accounts/{account}", &["DELETE"]),
    ("/credentials/reset", &["POST"]),
];

fn not_found() -> Response<Body> {
    crate::error::GatewayError::NotFound.to_response()
}

fn method_not_allowed(allow: &'static str) -> Response<Body> {
    crate::error::GatewayError::MethodNotAllowed { allow }.to_response()
}

fn wall(at: Instant) -> String {
    let d = at.saturating_duration_since(Instant::now());
    humantime::format_rfc3339_seconds(SystemTime::now() + d).to_string()
}

impl AdminApi {
    /// A latch (SPEC §7): not ready until both tokens were held once, then ready until draining,
    /// whatever the upstream does.
    fn not_ready_reasons(&self) -> Vec<String> {
        let g = &self.0;
        if g.shutdown.is_triggered() {
            return vec!["shutting down".into()];
        }
        g.tokens.readiness().err().unwrap_or_default()
    }

    /// `POST /credentials/reset`: lifts the login stop for the configured username (SPEC §7).
    async fn reset_credentials(&self) -> Response<Body> {
        match self.0.tokens.reset_login_guard().await {
            Ok(()) => json_value(StatusCode::OK, &json!({"reset": true})),
            Err(e) => {
                tracing::error!(error = %e, "credentials reset could not be stored in the guard file");
                json_value(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &json!({"reset": false, "error": "the guard file could not be written"}),
                )
            }
        }
    }

    async fn refresh_gauges(&self) -> (u64, u64) {
        let g = &self.0;
        let (entries, bytes) = g.cache.store.size().await;
        g.metrics
            .cache_entries
            .set(i64::try_from(entries).unwrap_or(i64::MAX));
        g.metrics
            .cache_bytes
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
        g.metrics
            .budget_available
            .set(g.upstream.budget_available());
        g.metrics.circuit_open.set(i64::from(
            g.upstream.circuit_state() != CircuitState::Closed,
        ));
        g.tokens.update_metrics();
        (entries, bytes)
    }

    async fn status(&self) -> Response<Body> {
        let g = &self.0;
        let (entries, bytes) = self.refresh_gauges().await;
        json_value(
            StatusCode::OK,
            &json!({
                "version": env!("CARGO_PKG_VERSION"),
                "uptime_seconds": g.started.elapsed().as_secs(),
                "tokens": g.tokens.status_json(),
                "cache": {"entries": entries, "bytes": bytes},
                "upstream": {
                    "circuit": g.upstream.circuit_state().label(),
                    "cooldown_until": g.upstream.cooldown_until().map(wall),
                    "budget_available": g.upstream.budget_available(),
                    "inflight": g.metrics.upstream_inflight.get(),
                },
                "clients": {"inflight": g.inflight()},
            }),
        )
    }
}

impl Handler for AdminApi {
    async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        let g = &self.0;
        let path = req.uri().path();
        let get = req.method() == Method::GET || req.method() == Method::HEAD;
        match path {
            "/metrics" if get => {
                self.refresh_gauges().await;
                text(
                    StatusCode::OK,
                    g.metrics.render(),
                    "text/plain; version=0.0.4; charset=utf-8",
                )
            }
            "/healthz" if get => json_value(StatusCode::OK, &json!({"status": "ok"})),
            "/readyz" if get => {
                let reasons = self.not_ready_reasons();
                if reasons.is_empty() {
                    json_value(StatusCode::OK, &json!({"ready": true}))
                } else {
                    json_value(
                        StatusCode::SERVICE_UNAVAILABLE,
                        &json!({"ready": false, "reasons": reasons}),
                    )
                }
            }
            "/status" if get => self.status().await,
            "/metrics" | "/healthz" | "/readyz" | "/status" => method_not_allowed("GET, HEAD"),
            "/cache" if req.method() == Method::DELETE => {
                let n = g.cache.store.purge_all().await;
                tracing::info!(purged = n, "cache purged");
                json_value(StatusCode::OK, &json!({"purged": n}))
            }
            "/cache" => method_not_allowed("DELETE"),
            "/credentials/reset" if req.method() == Method::POST => self.reset_credentials().await,
            "/credentials/reset" => method_not_allowed("POST"),
            p => match p.strip_prefix("/cache/accounts/") {
                Some(account) if crate::route::valid_account(account) => {
                    if req.method() != Method::DELETE {
                        return method_not_allowed("DELETE");
                    }
                    let n = g.cache.store.purge_account(account).await;
                    tracing::info!(purged = n, "account purged from cache");
                    let mut r = json_value(StatusCode::OK, &json!({"purged": n}));
                    r.headers_mut()
                        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
                    r
                }
                Some(_) => {
                    crate::error::GatewayError::InvalidParameter(crate::route::INVALID_ACCOUNT)
                        .to_response()
                }
                None => not_found(),
            },
        }
    }
}
