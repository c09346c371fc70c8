//! The client API request path, top to bottom:
//! route → header limits → authenticate → authorize → cache → (budget → tokens → upstream) →
//! store → respond. [`ClientApi::handle`] never fails: every error becomes its response here.
//! `proxy/fetch.rs` holds the cache step and the upstream read behind it; `proxy/headers.rs`
//! the request headers read and the response headers written.

use crate::api::route::{route, Route, RouteError};
use crate::cache::{clock, Key, Kind};
use crate::clients::Principal;
use crate::clients::{Clients, ClientsError};
use crate::config::{ClientsConfig, Config, Settings};
use crate::error::GatewayError;
use crate::observe::{Metrics, RouteLabel};
use crate::read::{Answer, CacheResult, Ctx, Reader};
use crate::respond::Handler;
use crate::respond::{json_value, Body};
use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use std::future::Future;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::time::Instant;

/// The tracing target of the one-line-per-request access log: `RUST_LOG=info,access=off` turns it
/// off like nginx's `access_log off`.
pub const ACCESS_LOG: &str = "access";

mod headers;
pub mod route;

use headers::RequestHeaders;
pub use headers::MAX_HEADERS;
/// POST bodies (token and login requests) are small forms.
const MAX_POST_BODY: usize = 16 * 1024;

/// The client API: one cheap handle (`Arc` inside) shared by every connection.
#[derive(Clone)]
pub struct ClientApi(Arc<State>);

struct State {
    settings: Arc<Settings>,
    /// The client registry in force, read once per request; a reload installs a new one whole
    /// ([`ClientApi::install_clients`]), so a removed client's tokens are refused at once.
    clients: ArcSwap<Clients>,
    reader: Arc<Reader>,
    metrics: Metrics,
    /// Client API requests in flight (load shedding above `server.max_inflight`).
    inflight: AtomicUsize,
}

impl State {
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
        // Basic only (a token is never traded for a fresh one), and rated like any request.
        // One registry for the whole exchange: the token is issued by the one that checked.
        let clients = self.clients.load_full();
        let who = clients.authenticate_for_token(authorization)?;
        clients.authorize(&who, None)?;
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
        let (token, expires_in) = clients.issue_token(&who);
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
        ctx: &mut Ctx,
    ) -> Result<(Response<Body>, Option<CacheResult>), GatewayError> {
        let headers = RequestHeaders::read(req.headers());
        headers.check_limits(ctx.cfg.server.max_header_bytes.as_usize())?;
        let authorization = headers.authorization().map(str::to_string);
        if matches!(route, Route::Token) {
            let token = self.token(authorization.as_deref(), req.into_body());
            return Ok((Box::pin(token).await?, None));
        }
        let who: Principal = {
            let clients = self.clients.load();
            let who = clients.authenticate(authorization.as_deref())?;
            clients.authorize(&who, route.account())?;
            who
        };
        ctx.who = who;
        let ctx = &*ctx;
        if req.method() != Method::POST {
            let b = req.body();
            if !b.is_end_stream() && b.size_hint().upper() != Some(0) {
                return Err(GatewayError::BadRequest("request body not allowed on GET"));
            }
        }
        let key = match &route {
            Route::LicensePage { .. } | Route::Subscription { .. } => match cache_key(&route) {
                Some(key) => key,
                None => return Err(GatewayError::NotFound),
            },
            // The other routes' futures are boxed: inline, the largest of them (a walk) would set
            // the size of every request's future, which is moved several times per request.
            Route::SessionLogin => {
                return Ok((Box::pin(self.session_login(req.into_body())).await?, None))
            }
            Route::AccountLicenses { account } => {
                let walk = crate::documents::account_licenses(&self.reader, account, ctx);
                let (r, c) = Box::pin(walk).await?;
                return Ok((r, Some(c)));
            }
            Route::DeviceLicense { account, device_id } => {
                let lookup =
                    crate::documents::device_license(&self.reader, account, device_id, ctx);
                let (r, c) = Box::pin(lookup).await?;
                return Ok((r, Some(c)));
            }
            Route::Token => return Err(GatewayError::NotFound),
        };
        let (entry, result) = self.reader.cached(key, ctx).await?;
        Ok((self.reader.respond(&entry, result, ctx), Some(result)))
    }
}

/// A request's facts, before it is routed or authenticated.
fn new_ctx(headers: &RequestHeaders, head: bool, started: Instant, cfg: Arc<Config>) -> Ctx {
    Ctx {
        request_id: headers.request_id(),
        started,
        deadline: started + cfg.server.request_timeout.0,
        head,
        accept_gzip: headers.accept_gzip,
        if_none_match: headers.if_none_match(),
        attempts: AtomicU32::new(0),
        who: Principal::Anonymous,
        cfg,
    }
}

/// The cache key of a route answered from one stored entry.
fn cache_key(route: &Route) -> Option<Key> {
    match route {
        Route::LicensePage { account, index } => Some(Key {
            kind: Kind::Page,
            account: account.clone(),
            index: *index,
        }),
        Route::Subscription { account } => Some(Key {
            kind: Kind::Subscription,
            account: account.clone(),
            index: 0,
        }),
        _ => None,
    }
}

/// `fut`, or `None` once `deadline` passes first. Like `tokio::time::timeout_at`, but the timer
/// is made only when `fut` does not finish on its first poll: a cache hit never makes one.
async fn within<F: Future>(deadline: Instant, fut: F) -> Option<F::Output> {
    let mut fut = std::pin::pin!(fut);
    let mut timer = std::pin::pin!(None::<tokio::time::Sleep>);
    std::future::poll_fn(|cx| {
        if let std::task::Poll::Ready(v) = fut.as_mut().poll(cx) {
            return std::task::Poll::Ready(Some(v));
        }
        if timer.is_none() {
            timer.set(Some(tokio::time::sleep_until(deadline)));
        }
        match timer.as_mut().as_pin_mut().map(|t| t.poll(cx)) {
            Some(std::task::Poll::Ready(())) => std::task::Poll::Ready(None),
            _ => std::task::Poll::Pending,
        }
    })
    .await
}

/// Decrements the in-flight count however the request ends.
struct InflightGuard<'a>(&'a State);

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
    pub fn new(
        settings: Arc<Settings>,
        clients: Clients,
        reader: Arc<Reader>,
        metrics: Metrics,
    ) -> Self {
        Self(Arc::new(State {
            settings,
            clients: ArcSwap::from_pointee(clients),
            reader,
            metrics,
            inflight: AtomicUsize::new(0),
        }))
    }

    /// Builds the registry `cfg` describes from the one in force (unchanged clients keep their
    /// rate buckets); nothing changes until [`install_clients`](Self::install_clients).
    pub fn rebuild_clients(&self, cfg: &ClientsConfig) -> Result<Clients, ClientsError> {
        self.0.clients.load().rebuild(cfg)
    }

    /// Puts `clients` in force at once: the next request authenticates against it (requests
    /// already past authentication finish as they started).
    pub fn install_clients(&self, clients: Clients) {
        self.0.clients.store(Arc::new(clients));
    }

    /// [`rebuild_clients`](Self::rebuild_clients) then [`install_clients`](Self::install_clients).
    pub fn apply_clients(&self, cfg: &ClientsConfig) -> Result<(), ClientsError> {
        let next = self.rebuild_clients(cfg)?;
        self.install_clients(next);
        Ok(())
    }

    /// Client API requests in flight now.
    pub fn inflight(&self) -> usize {
        self.0.inflight.load(Ordering::Relaxed)
    }

    /// The whole client request, as the listener runs it.
    /// (Its future is declared `Send` here, where that is proven; generic callers, such as the
    /// HTTP/1.1 front, could not prove it themselves.)
    pub fn serve<B: ClientBody>(
        &self,
        req: Request<B>,
    ) -> impl Future<Output = Response<Body>> + Send + '_ {
        self.serve_inner(req)
    }

    async fn serve_inner<B: ClientBody>(&self, req: Request<B>) -> Response<Body> {
        let g = &self.0;
        let started = Instant::now();
        let cfg = g.settings.current();
        let headers = RequestHeaders::read(req.headers());
        let mut ctx = new_ctx(&headers, req.method() == Method::HEAD, started, cfg);
        let method = req.method().clone();
        let routed = route(req.method(), req.uri().path());
        let label = routed
            .as_ref()
            .map(Route::label)
            .unwrap_or(RouteLabel::Unmatched);
        let in_flight = g.inflight.fetch_add(1, Ordering::Relaxed);
        let _guard = InflightGuard(g);
        let outcome = match routed {
            Err(RouteError::NotFound) => Err(GatewayError::NotFound),
            Err(RouteError::MethodNotAllowed { allow }) => {
                Err(GatewayError::MethodNotAllowed { allow })
            }
            Err(RouteError::InvalidParameter(m)) => Err(GatewayError::InvalidParameter(m)),
            Ok(_) if in_flight >= ctx.cfg.server.max_inflight => Err(GatewayError::Overloaded),
            Ok(route) => {
                let deadline = ctx.deadline;
                within(deadline, g.inner(req, route, &mut ctx))
                    .await
                    .unwrap_or(Err(GatewayError::UpstreamTimeout))
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
        g.finish(&method, label, resp.status(), cache, &ctx);
        // Moved, not cloned: the request is done with it.
        resp.headers_mut()
            .insert(headers::X_REQUEST_ID, ctx.request_id);
        resp
    }

    /// A body-less GET or HEAD answered from a fresh cached entry, for the HTTP/1.1 front
    /// (`runtime::h1`), with what [`serve`](Self::serve) would answer: the answer and its
    /// request id, everything counted and logged. `None` for any other request, before any
    /// effect (the client's rate is charged only once the hit is certain); the front then
    /// gives the request to [`serve`](Self::serve).
    /// `sendfile`: the client's connection can be sent a body's file form.
    pub fn fresh_hit<'a>(
        &'a self,
        head: bool,
        path: &'a str,
        raw: &'a [httparse::Header<'a>],
        started: Instant,
        sendfile: bool,
    ) -> impl Future<Output = Option<(Answer, HeaderValue)>> + Send + 'a {
        self.fresh_hit_inner(head, path, raw, started, sendfile)
    }

    async fn fresh_hit_inner(
        &self,
        head: bool,
        path: &str,
        raw: &[httparse::Header<'_>],
        started: Instant,
        sendfile: bool,
    ) -> Option<(Answer, HeaderValue)> {
        let g = &self.0;
        let method = if head { Method::HEAD } else { Method::GET };
        let route = route(&method, path).ok()?;
        let key = cache_key(&route)?;
        let headers = RequestHeaders::read_raw(raw);
        let cfg = g.settings.current();
        headers
            .check_limits(cfg.server.max_header_bytes.as_usize())
            .ok()?;
        if g.inflight.load(Ordering::Relaxed) >= cfg.server.max_inflight {
            return None;
        }
        let ctx = new_ctx(&headers, head, started, cfg);
        let entry = g.reader.cache().get(&key, started)?;
        let answer = g.reader.fresh_answer(&entry, &ctx, clock::at(started))?;
        {
            let clients = g.clients.load();
            let who = clients.authenticate(headers.authorization()).ok()?;
            clients.authorize(&who, route.account()).ok()?;
        }
        // A whole identity body the connection could be sent with `sendfile` asks for its
        // file form (made once, off the response path; this answer is written from memory).
        if sendfile && answer.file.is_none() && answer.sends_identity_body() {
            entry.file_later();
        }
        g.reader.metrics().lookup_hit.inc();
        g.finish(
            &method,
            route.label(),
            answer.status,
            Some(CacheResult::Hit),
            &ctx,
        );
        Some((answer, ctx.request_id))
    }
}

impl State {
    /// Counts the request and writes its access log line.
    fn finish(
        &self,
        method: &Method,
        label: RouteLabel,
        status: StatusCode,
        cache: Option<CacheResult>,
        ctx: &Ctx,
    ) {
        let status = status.as_u16();
        let elapsed = ctx.started.elapsed();
        self.metrics
            .record_http(label, status, elapsed.as_secs_f64());
        tracing::info!(
            target: ACCESS_LOG,
            request_id = ctx.request_id.to_str().unwrap_or("-"),
            method = %method,
            route = label.as_str(),
            status,
            cache = cache.map(|c| c.header().to_str().unwrap_or("-").to_string()).unwrap_or_else(|| "-".into()),
            upstream_attempts = ctx.attempts.load(Ordering::Relaxed),
            duration_ms = elapsed.as_secs_f64() * 1000.0,
            "request"
        );
    }
}
