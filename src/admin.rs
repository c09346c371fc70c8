//! The admin API (`server.admin_listen`): metrics, probes, status and cache purges.

use crate::api::ClientApi;
use crate::cache::{NotShared, PageCache};
use crate::config::Settings;
use crate::credentials::TokenManager;
use crate::error::GatewayError;
use crate::fleet::{Redis, RedisStatus};
use crate::observe::Metrics;
use crate::respond::Handler;
use crate::respond::{json_value, text, Body};
use crate::upstream::circuit::CircuitState;
use crate::upstream::Upstream;
use crate::util::Shutdown;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::json;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock, Weak};
use std::time::SystemTime;
use tokio::time::Instant;

/// The admin API and the narrow view of the gateway it reports on.
#[derive(Clone)]
pub struct AdminApi(Arc<View>);

/// What the admin routes read and act on; nothing of the request path beyond its in-flight count.
pub struct View {
    pub settings: Arc<Settings>,
    pub metrics: Metrics,
    pub upstream: Arc<Upstream>,
    pub tokens: Arc<TokenManager>,
    pub cache: Arc<PageCache>,
    pub redis: Option<Arc<Redis>>,
    pub api: ClientApi,
    pub shutdown: Shutdown,
    pub started: std::time::Instant,
    pub reloader: OnceLock<Weak<dyn Reloader>>,
}

impl AdminApi {
    pub fn new(view: View) -> Self {
        Self(Arc::new(view))
    }

    /// Connects the reload route to what reloads (set once, after the gateway is built; weak,
    /// so the gateway and its admin API do not keep each other alive).
    pub fn set_reloader(&self, reloader: Weak<dyn Reloader>) {
        let _ = self.0.reloader.set(reloader);
    }

    fn reloader(&self) -> Option<Arc<dyn Reloader>> {
        self.0.reloader.get().and_then(Weak::upgrade)
    }

    async fn reload(&self) -> Response<Body> {
        match self.reloader() {
            Some(r) => json_value(StatusCode::OK, &r.reload().await),
            None => GatewayError::NotFound.to_response(),
        }
    }
}

/// Every admin route's path template (as in `deploy/openapi.yaml`) and its methods.
pub const ADMIN_ROUTES: [(&str, &[&str]); 8] = [
    ("/metrics", &["GET", "HEAD"]),
    ("/healthz", &["GET", "HEAD"]),
    ("/readyz", &["GET", "HEAD"]),
    ("/status", &["GET", "HEAD"]),
    ("/cache", &["DELETE"]),
    ("/cache/accounts/{account}", &["DELETE"]),
    ("/credentials/reset", &["POST"]),
    ("/config/reload", &["POST"]),
];

/// Reloads the config (SPEC §11) and reports on the config in force; the runtime implements it.
pub trait Reloader: Send + Sync + 'static {
    /// The reload's JSON answer.
    fn reload(&self) -> Pin<Box<dyn Future<Output = serde_json::Value> + Send + '_>>;
    /// `config` of `/status`.
    fn config_status(&self) -> serde_json::Value;
}

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
    /// SPEC §7's rule for every admin route that changes state (purges, credential reset,
    /// reload): `Authorization: Bearer <server.admin_token>` when the token is set; without one,
    /// only a loopback `admin_listen` serves them (behind a sidecar or a port-forward every peer
    /// looks like loopback, so the peer address proves nothing). Read-only routes never call it.
    pub fn authorize_change<B>(&self, req: &Request<B>) -> Result<(), GatewayError> {
        let cfg = self.0.settings.load();
        let server = &cfg.server;
        if server.admin_token.is_empty() {
            return if server.admin_listen.ip().is_loopback() {
                Ok(())
            } else {
                Err(GatewayError::AdminForbidden)
            };
        }
        let presented = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim());
        match presented {
            Some(token) if server.admin_token.matches(token) => Ok(()),
            _ => Err(GatewayError::Unauthorized("missing or invalid admin token")),
        }
    }

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
                tracing::error!(error = %e, "credentials reset could not be stored");
                json_value(e.status(), &json!({"reset": false, "error": e.words()}))
            }
        }
    }

    async fn refresh_gauges(&self) -> (u64, u64) {
        let g = &self.0;
        let (entries, bytes) = g.cache.size().await;
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
                    "budget": g.upstream.budget_params(),
                    "inflight": g.metrics.upstream_inflight.get(),
                },
                "clients": {"inflight": g.api.inflight()},
                "redis": g.redis.as_ref().map_or_else(RedisStatus::off, |r| r.status()),
                "config": self.reloader().map(|r| r.config_status()),
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
                if let Err(e) = self.authorize_change(&req) {
                    return e.to_response();
                }
                let purged = g.cache.purge_all().await;
                tracing::info!(purged = purged.unwrap_or_else(|e| e.purged), "cache purged");
                purge_response(purged)
            }
            "/cache" => method_not_allowed("DELETE"),
            "/credentials/reset" | "/config/reload" if req.method() == Method::POST => {
                if let Err(e) = self.authorize_change(&req) {
                    return e.to_response();
                }
                if path == "/config/reload" {
                    self.reload().await
                } else {
                    self.reset_credentials().await
                }
            }
            "/credentials/reset" | "/config/reload" => method_not_allowed("POST"),
            p => match p.strip_prefix("/cache/accounts/") {
                Some(account) if crate::api::route::valid_account(account) => {
                    if req.method() != Method::DELETE {
                        return method_not_allowed("DELETE");
                    }
                    if let Err(e) = self.authorize_change(&req) {
                        return e.to_response();
                    }
                    let purged = g.cache.purge_account(account).await;
                    tracing::info!(
                        purged = purged.unwrap_or_else(|e| e.purged),
                        "account purged from cache"
                    );
                    let mut r = purge_response(purged);
                    r.headers_mut()
                        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
                    r
                }
                Some(_) => {
                    crate::error::GatewayError::InvalidParameter(crate::api::route::INVALID_ACCOUNT)
                        .to_response()
                }
                None => not_found(),
            },
        }
    }
}

/// `{"purged": N}` (N: entries this replica held). In fleet mode, when Redis did not take the
/// purge, this replica's L1 is purged but the fleet's is not: 503 with `Retry-After: 1`, so the
/// operator (or the script) tries again.
fn purge_response(purged: Result<u64, NotShared>) -> Response<Body> {
    match purged {
        Ok(n) => json_value(StatusCode::OK, &json!({"purged": n})),
        Err(e) => {
            let mut r = json_value(
                StatusCode::SERVICE_UNAVAILABLE,
                &json!({
                    "purged": e.purged,
                    "errorCode": "GW_REDIS_UNAVAILABLE",
                    "errorMessage": "Purged on this replica only: Redis is not answering, so the \
                                     other replicas and the shared cache were not purged. Retry.",
                }),
            );
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            r
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::transport::{OutRequest, Transport, TransportError, TransportFuture};
    use std::time::Duration;

    struct NoUpstream;

    impl Transport for NoUpstream {
        fn send(&self, _: OutRequest, _: Duration) -> TransportFuture<'_> {
            Box::pin(async { Err(TransportError::Connect("no upstream in this test".into())) })
        }
    }

    fn admin(extra: &str) -> AdminApi {
        let cfg = crate::config::from_toml_with_env(
            &format!("[upstream]\nbase_url = \"http://127.0.0.1:1\"\n[credentials]\nguard_file = \"\"\n{extra}"),
            &[],
        )
        .unwrap();
        crate::runtime::Gateway::with_transport(cfg, Arc::new(NoUpstream))
            .unwrap()
            .admin_api()
    }

    fn purge(authorization: Option<&str>) -> Request<()> {
        let mut b = Request::builder().method(Method::DELETE).uri("/cache");
        if let Some(a) = authorization {
            b = b.header(header::AUTHORIZATION, a);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn without_a_token_only_a_loopback_listener_changes_state() {
        for listen in ["127.0.0.1:9090", "127.3.4.5:0", "[::1]:9090"] {
            let api = admin(&format!("[server]\nadmin_listen = \"{listen}\"\n"));
            assert_eq!(api.authorize_change(&purge(None)), Ok(()), "{listen}");
        }
        for listen in ["0.0.0.0:9090", "[::]:9090", "10.1.2.3:9090"] {
            let api = admin(&format!("[server]\nadmin_listen = \"{listen}\"\n"));
            let e = api.authorize_change(&purge(None)).unwrap_err();
            assert_eq!((e.status().as_u16(), e.error_code()), (403, "GW_FORBIDDEN"));
            // A bearer proves nothing when no token is configured.
            assert!(api.authorize_change(&purge(Some("Bearer x"))).is_err());
        }
    }

    #[test]
    fn with_a_token_every_listener_needs_it() {
        for listen in ["127.0.0.1:9090", "0.0.0.0:9090"] {
            let api = admin(&format!(
                "[server]\nadmin_listen = \"{listen}\"\nadmin_token = \"adm-0123456789abcdef\"\n"
            ));
            assert_eq!(
                api.authorize_change(&purge(Some("Bearer adm-0123456789abcdef"))),
                Ok(())
            );
            assert_eq!(
                api.authorize_change(&purge(Some("bearer adm-0123456789abcdef"))),
                Ok(())
            );
            for auth in [
                None,
                Some("Bearer adm-0123456789abcde"),
                Some("Bearer adm-0123456789abcdef0"),
                Some("Bearer "),
                Some("Basic adm-0123456789abcdef"),
                Some("adm-0123456789abcdef"),
            ] {
                let e = api.authorize_change(&purge(auth)).unwrap_err();
                assert_eq!(
                    (e.status().as_u16(), e.error_code()),
                    (401, "GW_UNAUTHORIZED"),
                    "{listen} {auth:?}"
                );
                assert!(e
                    .to_response()
                    .headers()
                    .contains_key(header::WWW_AUTHENTICATE));
            }
        }
    }
}
