//! The client API request path, top to bottom:
//! route → header limits → authenticate → authorize → cache → (budget → tokens → upstream) →
//! store → respond. [`ClientApi::handle`] never fails: every error becomes its response here.

use crate::app::Gateway;
use crate::cache::{Entry, Freshness, Join, Key, Kind};
use crate::clients::Principal;
use crate::error::GatewayError;
use crate::metrics::Endpoint;
use crate::respond::{json_value, Body};
use crate::route::{route, Route, RouteError};
use crate::server::Handler;
use crate::transport::OutRequest;
use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use tokio::time::Instant;

/// The tracing target of the one-line-per-request access log: `RUST_LOG=info,access=off` turns it
/// off like nginx's `access_log off`.
pub const ACCESS_LOG: &str = "access";

/// More request headers than this (Host included) → 431.
pub const MAX_HEADERS: usize = 100;
/// POST bodies (token and login requests) are small forms.
const MAX_POST_BODY: usize = 16 * 1024;

pub struct ClientApi(pub Arc<Gateway>);

/// How a response was produced, for `X-Cache`, metrics and the request log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheResult {
    Hit,
    Miss,
    Stale,
}

impl CacheResult {
    fn header(self) -> HeaderValue {
        HeaderValue::from_static(match self {
            CacheResult::Hit => "HIT",
            CacheResult::Miss => "MISS",
            CacheResult::Stale => "STALE",
        })
    }
}

/// Request facts the response depends on.
pub struct Ctx {
    pub request_id: HeaderValue,
    pub deadline: Instant,
    pub head: bool,
    pub accept_gzip: bool,
    pub if_none_match: Option<HeaderValue>,
    /// Upstream attempts this request's own fetches made (for the access log).
    pub attempts: AtomicU32,
}

fn request_id(headers: &HeaderMap) -> HeaderValue {
    headers
        .get("x-request-id")
        .filter(|v| {
            (1..=128).contains(&v.len()) && v.as_bytes().iter().all(|b| b.is_ascii_graphic())
        })
        .cloned()
        .unwrap_or_else(|| {
            HeaderValue::from_str(&format!(
                "{:016x}{:016x}",
                fastrand::u64(..),
                fastrand::u64(..)
            ))
            .unwrap_or(HeaderValue::from_static("0"))
        })
}

/// `gzip` (or `*`) listed with a non-zero q.
fn accepts_gzip(headers: &HeaderMap) -> bool {
    headers.get_all(header::ACCEPT_ENCODING).iter().any(|v| {
        v.to_str().unwrap_or("").split(',').any(|item| {
            let mut parts = item.split(';');
            let name = parts.next().unwrap_or("").trim();
            let q_zero = parts.any(|p| {
                let p = p.trim();
                p.strip_prefix("q=")
                    .is_some_and(|q| q.trim().parse::<f32>().map(|q| q == 0.0).unwrap_or(false))
            });
            (name.eq_ignore_ascii_case("gzip") || name == "*") && !q_zero
        })
    })
}

fn check_header_limits(headers: &HeaderMap, max_bytes: usize) -> Result<(), GatewayError> {
    if headers.len() > MAX_HEADERS {
        return Err(GatewayError::HeadersTooLarge);
    }
    let bytes: usize = headers
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len())
        .sum();
    if bytes > max_bytes {
        return Err(GatewayError::HeadersTooLarge);
    }
    Ok(())
}

fn etag_matches(inm: &HeaderValue, etag: &HeaderValue) -> bool {
    let Ok(list) = inm.to_str() else {
        return false;
    };
    let tag = etag.as_bytes();
    list.split(',').any(|t| {
        let t = t.trim();
        t == "*" || t.trim_start_matches("W/").as_bytes() == tag
    })
}

/// The response for a cached entry: shares the entry's `Bytes`, copies nothing.
pub fn entry_response(e: &Entry, result: CacheResult, ctx: &Ctx, now: Instant) -> Response<Body> {
    let not_modified = e.status == StatusCode::OK
        && ctx
            .if_none_match
            .as_ref()
            .is_some_and(|inm| etag_matches(inm, &e.etag));
    let gz = if ctx.accept_gzip {
        e.gzip.as_ref()
    } else {
        None
    };
    let body = gz.unwrap_or(&e.body);
    let mut resp = if not_modified || ctx.head {
        Response::new(Body::default())
    } else {
        Response::new(Body::new(body.clone()))
    };
    *resp.status_mut() = if not_modified {
        StatusCode::NOT_MODIFIED
    } else {
        e.status
    };
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, e.content_type.clone());
    h.insert("x-cache", result.header());
    h.insert(header::AGE, HeaderValue::from(e.age(now).as_secs()));
    h.insert(header::ETAG, e.etag.clone());
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_str(&format!("private, max-age={}", e.fresh_left(now)))
            .unwrap_or(HeaderValue::from_static("private, max-age=0")),
    );
    h.insert(header::VARY, HeaderValue::from_static("accept-encoding"));
    if gz.is_some() && !not_modified {
        h.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    }
    if ctx.head && !not_modified {
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    }
    resp
}

/// True for upstream errors whose `errorCode` says the session is gone.
fn is_session_error(status: StatusCode, body: &[u8]) -> bool {
    if !status.is_client_error() {
        return false;
    }
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct E {
        error_code: String,
    }
    serde_json::from_slice::<E>(body)
        .map(|e| {
            e.error_code.ends_with("SessionToken.Expired")
                || e.error_code.ends_with("SessionToken.Invalid")
        })
        .unwrap_or(false)
}

impl Key {
    fn upstream_path(&self) -> String {
        match self.kind {
            Kind::Page => format!(
                "/api/fota/v1/licenses/{}/index/{}",
                self.account, self.index
            ),
            Kind::Subscription => format!("/api/fota/v1/subscriptions/{}", self.account),
        }
    }

    fn endpoint(&self) -> Endpoint {
        match self.kind {
            Kind::Page => Endpoint::Licenses,
            Kind::Subscription => Endpoint::Subscriptions,
        }
    }
}

/// One upstream read with the gateway's tokens; one retry after a reactive token refresh.
pub async fn fetch_entry(
    g: Arc<Gateway>,
    key: Key,
    request_id: HeaderValue,
    deadline: Instant,
    attempts: Arc<AtomicU32>,
) -> Result<Arc<Entry>, GatewayError> {
    for attempt in 0..2 {
        let creds = g.tokens.credentials(deadline).await?;
        let mut headers = creds.headers();
        headers.insert(header::ACCEPT, crate::respond::JSON);
        headers.insert("x-request-id", request_id.clone());
        let req = OutRequest {
            method: Method::GET,
            path: key.upstream_path(),
            headers,
            body: Bytes::new(),
        };
        let sent = Instant::now();
        let resp = g
            .upstream
            .call(key.endpoint(), req, deadline, &attempts)
            .await?;
        let retry = attempt == 0;
        if resp.status == StatusCode::UNAUTHORIZED {
            g.tokens.invalidate_oauth(&creds.oauth.token);
            if retry {
                continue;
            }
            return Err(GatewayError::UpstreamAuthFailed(
                "upstream rejected freshly obtained tokens".into(),
            ));
        }
        if is_session_error(resp.status, &resp.body) {
            g.tokens.invalidate_session(&creds.session.token);
            if retry {
                continue;
            }
            return Err(GatewayError::UpstreamAuthFailed(
                "upstream rejected a fresh session".into(),
            ));
        }
        g.tokens.touch(&creds, sent);
        let fresh_for = if resp.status == StatusCode::OK {
            g.cfg.cache.ttl.0
        } else if resp.status.is_client_error() {
            g.cfg.cache.negative_ttl.0
        } else {
            return Err(GatewayError::BadGateway(format!(
                "unexpected upstream status {}",
                resp.status.as_u16()
            )));
        };
        // A copy, not a clone: a parsed header value shares the connection's whole read buffer,
        // which the cache would then keep alive alongside the entry.
        let content_type = resp
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| HeaderValue::from_bytes(v.as_bytes()).ok())
            .unwrap_or(crate::respond::JSON);
        return Ok(Arc::new(Entry::new(
            resp.status,
            content_type,
            resp.body,
            Instant::now(),
            fresh_for,
        )));
    }
    Err(GatewayError::UpstreamAuthFailed(
        "tokens could not be obtained".into(),
    ))
}

impl Gateway {
    /// The cache step: fresh → HIT; stale within `stale_while_revalidate` → STALE plus one
    /// background refresh; otherwise one coalesced fetch, falling back to a stale copy within
    /// `stale_if_error` when the upstream fails or is being protected.
    pub async fn cached(
        self: &Arc<Self>,
        key: Key,
        ctx: &Ctx,
    ) -> Result<(Arc<Entry>, CacheResult), GatewayError> {
        let now = Instant::now();
        let existing = self.cache.store.get(&key).await;
        if let Some(e) = &existing {
            match e.freshness(now, &self.cache.windows) {
                Freshness::Fresh => {
                    self.metrics.lookup_hit.inc();
                    return Ok((e.clone(), CacheResult::Hit));
                }
                Freshness::Revalidate => {
                    self.metrics.lookup_stale.inc();
                    if e.claim_refresh() {
                        self.spawn_refresh(key, e.clone(), ctx.request_id.clone());
                    }
                    return Ok((e.clone(), CacheResult::Stale));
                }
                Freshness::Stale => {}
            }
        }
        let attempts = Arc::new(AtomicU32::new(0));
        let fetch = fetch_entry(
            self.clone(),
            key.clone(),
            ctx.request_id.clone(),
            now + self.cfg.server.request_timeout.0,
            attempts.clone(),
        );
        let (result, join) = self.cache.fetch(key, ctx.deadline, fetch).await;
        if join == Join::Leader {
            ctx.attempts
                .fetch_add(attempts.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        match result {
            Ok(e) => {
                self.metrics.lookup(join == Join::Coalesced);
                Ok((e, CacheResult::Miss))
            }
            Err(err) => {
                if let Some(t) = err.throttle() {
                    self.metrics.throttled(t.label());
                }
                match existing.filter(|e| {
                    err.stale_eligible() && e.usable_on_error(Instant::now(), &self.cache.windows)
                }) {
                    Some(e) => {
                        self.metrics.lookup_stale.inc();
                        tracing::debug!(error = %err, "serving stale copy");
                        Ok((e, CacheResult::Stale))
                    }
                    None => {
                        self.metrics.lookup(join == Join::Coalesced);
                        Err(err)
                    }
                }
            }
        }
    }

    fn spawn_refresh(self: &Arc<Self>, key: Key, stale: Arc<Entry>, request_id: HeaderValue) {
        let g = self.clone();
        tokio::spawn(async move {
            let deadline = Instant::now() + g.cfg.server.request_timeout.0;
            let fetch = fetch_entry(
                g.clone(),
                key.clone(),
                request_id,
                deadline,
                Default::default(),
            );
            let (result, _) = g.cache.fetch(key, deadline, fetch).await;
            if let Err(e) = result {
                tracing::warn!(error = %e, "background refresh failed; the stale copy stays");
                stale.release_refresh();
            }
        });
    }

    async fn read_post_body<B: ClientBody>(&self, body: B) -> Result<Bytes, GatewayError> {
        Limited::new(body, MAX_POST_BODY)
            .collect()
            .await
            .map(|b| b.to_bytes())
            .map_err(|_| GatewayError::BadRequest("request body too large or unreadable"))
    }

    /// `POST /api/ts/v1/oauth2/token`: ThingSpace's token request, answered with a gateway token.
    async fn token<B: ClientBody>(
        &self,
        authorization: Option<&str>,
        body: B,
    ) -> Result<Response<Body>, GatewayError> {
        let who = self.clients.authenticate(authorization)?;
        let form = self.read_post_body(body).await?;
        let grant_ok = std::str::from_utf8(&form)
            .map(|s| {
                s.split('&')
                    .any(|kv| kv.trim() == "grant_type=client_credentials")
            })
            .unwrap_or(false);
        if !grant_ok {
            return Err(GatewayError::BadRequest(
                "grant_type must be client_credentials",
            ));
        }
        let (token, expires_in) = self.clients.issue_token(who.id());
        let mut r = json_value(
            StatusCode::OK,
            &serde_json::json!({
                "access_token": token,
                "token_type": "Bearer",
                "expires_in": expires_in,
                "scope": "thingspace-gateway",
            }),
        );
        r.headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        Ok(r)
    }

    /// `POST /api/m2m/v1/session/login`: answered locally; the real session stays in the gateway.
    async fn session_login<B: ClientBody>(&self, body: B) -> Result<Response<Body>, GatewayError> {
        // ThingSpace's login body; the values are not used (the real session is the gateway's).
        #[derive(serde::Deserialize)]
        struct Login {
            #[allow(dead_code)]
            username: String,
            #[allow(dead_code)]
            password: String,
        }
        let body = self.read_post_body(body).await?;
        if serde_json::from_slice::<Login>(&body).is_err() {
            return Err(GatewayError::BadRequest(
                "login body must be {\"username\": string, \"password\": string}",
            ));
        }
        let mut b = [0u8; 16];
        b.iter_mut().for_each(|x| *x = fastrand::u8(..));
        let token: String = b.iter().map(|x| format!("{x:02x}")).collect();
        Ok(json_value(
            StatusCode::OK,
            &serde_json::json!({ "sessionToken": token }),
        ))
    }

    async fn inner<B: ClientBody>(
        self: &Arc<Self>,
        req: Request<B>,
        route: Route,
        ctx: &Ctx,
    ) -> Result<(Response<Body>, Option<CacheResult>), GatewayError> {
        check_header_limits(req.headers(), self.cfg.server.max_header_bytes.as_usize())?;
        let authorization = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        if matches!(route, Route::Token) {
            return Ok((
                self.token(authorization.as_deref(), req.into_body())
                    .await?,
                None,
            ));
        }
        let who: Principal = self.clients.authenticate(authorization.as_deref())?;
        self.clients.authorize(&who, route.account())?;
        if req.method() != Method::POST {
            let b = req.body();
            if !b.is_end_stream() && b.size_hint().upper() != Some(0) {
                return Err(GatewayError::BadRequest("request body not allowed on GET"));
            }
        }
        let key = match &route {
            Route::LicensePage { account, index } => Key {
                kind: Kind::Page,
                account: account.clone(),
                index: *index,
            },
            Route::Subscription { account } => Key {
                kind: Kind::Subscription,
                account: account.clone(),
                index: 0,
            },
            Route::SessionLogin => return Ok((self.session_login(req.into_body()).await?, None)),
            Route::AccountLicenses { account } => {
                let (r, c) = crate::walk::account_licenses(self, account, ctx).await?;
                return Ok((r, Some(c)));
            }
            Route::DeviceLicense { account, device_id } => {
                let (r, c) = crate::walk::device_license(self, account, device_id, ctx).await?;
                return Ok((r, Some(c)));
            }
            Route::Token => return Err(GatewayError::NotFound),
        };
        let (entry, result) = self.cached(key, ctx).await?;
        Ok((
            entry_response(&entry, result, ctx, Instant::now()),
            Some(result),
        ))
    }
}

/// Decrements the in-flight count however the request ends.
struct InflightGuard<'a>(&'a Gateway);

impl Drop for InflightGuard<'_> {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Any request body the client API can read: hyper's `Incoming` from the socket, or an
/// in-memory body in tests.
pub trait ClientBody:
    hyper::body::Body<Data = Bytes, Error: Into<Box<dyn std::error::Error + Send + Sync>>>
    + Send
    + Unpin
    + 'static
{
}

impl<B> ClientBody for B where
    B: hyper::body::Body<Data = Bytes, Error: Into<Box<dyn std::error::Error + Send + Sync>>>
        + Send
        + Unpin
        + 'static
{
}

impl Handler for ClientApi {
    async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        self.serve(req).await
    }
}

impl ClientApi {
    /// The whole client request, as the listener runs it.
    pub async fn serve<B: ClientBody>(&self, req: Request<B>) -> Response<Body> {
        let g = &self.0;
        let started = Instant::now();
        let ctx = Ctx {
            request_id: request_id(req.headers()),
            deadline: started + g.cfg.server.request_timeout.0,
            head: req.method() == Method::HEAD,
            accept_gzip: accepts_gzip(req.headers()),
            if_none_match: req.headers().get(header::IF_NONE_MATCH).cloned(),
            attempts: AtomicU32::new(0),
        };
        let method = req.method().clone();
        let routed = route(req.method(), req.uri().path());
        let route_index = routed
            .as_ref()
            .map(Route::metric_index)
            .unwrap_or(crate::route::UNMATCHED);
        let label = crate::route::ROUTE_LABELS[route_index];
        let in_flight = g.inflight.fetch_add(1, Ordering::Relaxed);
        let _guard = InflightGuard(g);
        let outcome = match routed {
            Err(RouteError::NotFound) => Err(GatewayError::NotFound),
            Err(RouteError::MethodNotAllowed { allow }) => {
                Err(GatewayError::MethodNotAllowed { allow })
            }
            Err(RouteError::InvalidParameter(m)) => Err(GatewayError::InvalidParameter(m)),
            Ok(_) if in_flight >= g.cfg.server.max_inflight => Err(GatewayError::Overloaded),
            Ok(route) => {
                match tokio::time::timeout_at(ctx.deadline, g.inner(req, route, &ctx)).await {
                    Ok(r) => r,
                    Err(_) => Err(GatewayError::UpstreamTimeout),
                }
            }
        };
        let (mut resp, cache) = match outcome {
            Ok(ok) => ok,
            Err(e) => {
                let mut r = e.to_response();
                if ctx.head {
                    *r.body_mut() = Body::default();
                }
                (r, None)
            }
        };
        resp.headers_mut()
            .insert("x-request-id", ctx.request_id.clone());
        let status = resp.status().as_u16();
        let elapsed = started.elapsed();
        g.metrics
            .record_http(route_index, status, elapsed.as_secs_f64());
        tracing::info!(
            target: ACCESS_LOG,
            request_id = ctx.request_id.to_str().unwrap_or("-"),
            method = %method,
            route = label,
            status,
            cache = cache.map(|c| c.header().to_str().unwrap_or("-").to_string()).unwrap_or_else(|| "-".into()),
            upstream_attempts = ctx.attempts.load(Ordering::Relaxed),
            duration_ms = elapsed.as_secs_f64() * 1000.0,
            "request"
        );
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn ctx(gzip: bool, head: bool) -> Ctx {
        Ctx {
            request_id: HeaderValue::from_static("t"),
            deadline: Instant::now(),
            head,
            accept_gzip: gzip,
            if_none_match: None,
            attempts: AtomicU32::new(0),
        }
    }

    #[tokio::test]
    async fn a_hit_shares_the_cached_bytes() {
        let body: Vec<u8> = (0..500)
            .flat_map(|i| format!("{{\"d\":{i}}},").into_bytes())
            .collect();
        let e = Entry::new(
            StatusCode::OK,
            crate::respond::JSON,
            Bytes::from(body),
            Instant::now(),
            Duration::from_secs(60),
        );
        for (gzip, cached) in [(false, &e.body), (true, e.gzip.as_ref().unwrap())] {
            let r = entry_response(&e, CacheResult::Hit, &ctx(gzip, false), Instant::now());
            let chunks: Vec<&Bytes> = r.body().chunks().collect();
            assert_eq!(chunks.len(), 1);
            // Same allocation, same length: a pointer was cloned, not the bytes.
            assert_eq!(chunks[0].as_ptr(), cached.as_ptr());
            assert_eq!(chunks[0].len(), cached.len());
        }
        let r = entry_response(&e, CacheResult::Hit, &ctx(false, true), Instant::now());
        assert!(r.body().is_empty());
        assert_eq!(
            r.headers()[header::CONTENT_LENGTH],
            e.body.len().to_string().as_str()
        );
    }

    #[test]
    fn gzip_negotiation() {
        let mut h = HeaderMap::new();
        assert!(!accepts_gzip(&h));
        h.insert(header::ACCEPT_ENCODING, "br, gzip;q=0.5".parse().unwrap());
        assert!(accepts_gzip(&h));
        h.insert(header::ACCEPT_ENCODING, "gzip;q=0".parse().unwrap());
        assert!(!accepts_gzip(&h));
        h.insert(header::ACCEPT_ENCODING, "*".parse().unwrap());
        assert!(accepts_gzip(&h));
    }

    #[test]
    fn etags() {
        let tag = HeaderValue::from_static("\"abc\"");
        assert!(etag_matches(
            &HeaderValue::from_static("\"x\", \"abc\""),
            &tag
        ));
        assert!(etag_matches(&HeaderValue::from_static("W/\"abc\""), &tag));
        assert!(etag_matches(&HeaderValue::from_static("*"), &tag));
        assert!(!etag_matches(&HeaderValue::from_static("\"abd\""), &tag));
    }

    #[test]
    fn session_errors() {
        let b = br#"{"errorCode":"UnifiedWebService.REQUEST_FAILED.SessionToken.Expired","errorMessage":"x"}"#;
        assert!(is_session_error(StatusCode::BAD_REQUEST, b));
        assert!(is_session_error(
            StatusCode::FORBIDDEN,
            br#"{"errorCode":"SessionToken.Invalid"}"#
        ));
        assert!(!is_session_error(
            StatusCode::BAD_REQUEST,
            br#"{"errorCode":"AccountNotFound"}"#
        ));
        assert!(!is_session_error(StatusCode::OK, b));
    }

    #[test]
    fn header_limits() {
        let mut h = HeaderMap::new();
        for i in 0..MAX_HEADERS {
            h.insert(
                http::HeaderName::from_bytes(format!("x-h{i}").as_bytes()).unwrap(),
                HeaderValue::from_static("v"),
            );
        }
        assert!(check_header_limits(&h, 16384).is_ok());
        h.insert("x-one-more", HeaderValue::from_static("v"));
        assert_eq!(
            check_header_limits(&h, 16384),
            Err(GatewayError::HeadersTooLarge)
        );
        let mut h = HeaderMap::new();
        h.insert("x-big", HeaderValue::from_str(&"a".repeat(2000)).unwrap());
        assert_eq!(
            check_header_limits(&h, 1024),
            Err(GatewayError::HeadersTooLarge)
        );
    }
}
