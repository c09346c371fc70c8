//! The read path: the cache step and the upstream read behind it (freshness, coalesced fetches,
//! stale fallbacks, background refreshes, one reactive token refresh per read), and in
//! [`answer`] the one writer of cached answers.

pub mod answer;

use crate::cache::{
    clock, Entry, FillFailed, FillOptions, Filled, Freshness, Join, Key, Kind, Origin, PageCache,
    RefreshClaim, Want, Windows,
};
use crate::clients::Principal;
use crate::config::{Config, Settings};
use crate::credentials::TokenManager;
use crate::credentials::BEARER_REFUSED;
use crate::error::GatewayError;
use crate::observe::Metrics;
use crate::respond::Body;
use crate::upstream::routes::Resource;
use crate::upstream::transport::OutRequest;
use crate::upstream::Upstream;
pub use answer::{entry_response, Answer, CacheResult, Field};
use bytes::Bytes;
use http::{header, HeaderValue, Method, Response, StatusCode};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::SystemTime;
use tokio::time::Instant;

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

/// The ThingSpace resource a cache key stands for.
fn resource(key: &Key) -> Resource<'_> {
    match key.kind {
        Kind::Page => Resource::LicensePage {
            account: &key.account,
            index: key.index,
        },
        Kind::Subscription => Resource::Subscription {
            account: &key.account,
        },
    }
}

/// Request facts the response depends on.
pub struct Ctx {
    pub request_id: HeaderValue,
    /// When the request arrived; freshness and `Age` are measured from it.
    pub started: Instant,
    pub deadline: Instant,
    pub head: bool,
    pub accept_gzip: bool,
    pub if_none_match: Option<HeaderValue>,
    /// Upstream attempts this request's own fetches made (for the access log).
    pub attempts: AtomicU32,
    /// Who asked (anonymous until authenticated): waits for upstream budget take turns by client.
    pub who: Principal,
    /// The config this request runs on, loaded once as it arrived: a reload in the middle of the
    /// request changes nothing for it (SPEC §11).
    pub cfg: Arc<Config>,
}

impl Ctx {
    /// The freshness windows of the request's config: read at every lookup, never stored with an
    /// entry, so a change of `ttl` applies to entries already cached.
    pub fn windows(&self) -> Windows {
        Windows::from_config(&self.cfg.cache)
    }
}

/// Everything a read needs: the cache, and the upstream with its tokens behind it.
pub struct Reader {
    settings: Arc<Settings>,
    metrics: Metrics,
    upstream: Arc<Upstream>,
    tokens: Arc<TokenManager>,
    cache: Arc<PageCache>,
}

impl Reader {
    pub fn new(
        settings: Arc<Settings>,
        metrics: Metrics,
        upstream: Arc<Upstream>,
        tokens: Arc<TokenManager>,
        cache: Arc<PageCache>,
    ) -> Self {
        Self {
            settings,
            metrics,
            upstream,
            tokens,
            cache,
        }
    }

    pub fn cache(&self) -> &Arc<PageCache> {
        &self.cache
    }

    /// The config in force now (a lock-free snapshot; see [`Settings`]).
    pub fn config(&self) -> arc_swap::Guard<Arc<Config>> {
        self.settings.load()
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The answer for one cached entry, its age measured from when the request arrived.
    pub fn respond(&self, e: &Entry, result: CacheResult, ctx: &Ctx) -> Response<Body> {
        entry_response(e, result, ctx, clock::at(ctx.started), &ctx.windows())
    }

    /// The answer for a fresh entry (a HIT) at `now` (when the request arrived, on the cache's
    /// clock), for the HTTP/1.1 front; `None` when `e` is not fresh. Nothing is counted.
    pub fn fresh_answer(&self, e: &Entry, ctx: &Ctx, now: SystemTime) -> Option<Answer> {
        let windows = ctx.windows();
        (e.freshness(now, &windows) == Freshness::Fresh)
            .then(|| answer::entry_answer(e, CacheResult::Hit, ctx, now, &windows))
    }
}

/// The name a read waits for upstream budget under: its client's id, "" when anonymous.
fn budget_client(who: &Principal) -> &str {
    match who {
        Principal::Anonymous => "",
        Principal::Client(c) => &c.id,
    }
}

/// A fetch in progress: boxed, so that the futures of the read path that may start one (a cache
/// hit's among them) stay small instead of carrying the whole upstream call's state, which they
/// would copy each time they are moved.
pub type FetchFuture = Pin<Box<dyn Future<Output = Result<Arc<Entry>, GatewayError>> + Send>>;

/// One upstream read with the gateway's tokens, for `who`; one retry after a reactive token
/// refresh (a renewed token refused again backs off in the token manager: no renewal storm).
pub fn fetch_entry(
    g: Arc<Reader>,
    key: Key,
    who: Principal,
    request_id: HeaderValue,
    deadline: Instant,
    attempts: Arc<AtomicU32>,
) -> FetchFuture {
    Box::pin(fetch_entry_inner(
        g, key, who, request_id, deadline, attempts,
    ))
}

async fn fetch_entry_inner(
    g: Arc<Reader>,
    key: Key,
    who: Principal,
    request_id: HeaderValue,
    deadline: Instant,
    attempts: Arc<AtomicU32>,
) -> Result<Arc<Entry>, GatewayError> {
    for attempt in 0..2 {
        let creds = g.tokens.credentials(deadline).await?;
        let mut headers = creds.headers();
        headers.insert(header::ACCEPT, crate::respond::JSON);
        headers.insert(crate::respond::X_REQUEST_ID, request_id.clone());
        let req = OutRequest {
            method: Method::GET,
            path: resource(&key).path(),
            headers,
            body: Bytes::new(),
        };
        let sent = Instant::now();
        let resp = g
            .upstream
            .call_for(
                budget_client(&who),
                resource(&key).endpoint(),
                req,
                deadline,
                &attempts,
            )
            .await?;
        let retry = attempt == 0;
        if resp.status == StatusCode::UNAUTHORIZED {
            // Renew the bearer (and session) once; a renewed bearer refused too backs off.
            g.tokens.bearer_refused(&creds.oauth.token)?;
            if retry {
                continue;
            }
            return Err(GatewayError::UpstreamAuthFailed(BEARER_REFUSED));
        }
        if is_session_error(resp.status, &resp.body) {
            g.tokens.session_refused(&creds.session.token)?;
            if retry {
                continue;
            }
            return Err(GatewayError::TokensUnavailable {
                retry_after: std::time::Duration::from_secs(1),
            });
        }
        g.tokens.touch(&creds, sent);
        // 200s and 4xx (negative answers) are stored; their freshness is decided at read time.
        if resp.status != StatusCode::OK && !resp.status.is_client_error() {
            return Err(GatewayError::BadGateway(format!(
                "unexpected upstream status {}",
                resp.status.as_u16()
            )));
        }
        // A copy, not a clone: a parsed header value shares the connection's whole read buffer,
        // which the cache would then keep alive alongside the entry.
        let content_type = resp
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| HeaderValue::from_bytes(v.as_bytes()).ok())
            .unwrap_or(crate::respond::JSON);
        let entry = Entry::new(resp.status, content_type, resp.body, clock::now());
        // The answer goes out now; its gzip form is made off the async workers and joins the
        // entry when ready (gzip requests get the identity body until then).
        entry.compress_later();
        return Ok(Arc::new(entry));
    }
    Err(GatewayError::UpstreamAuthFailed(BEARER_REFUSED))
}

impl Reader {
    /// The cache step: fresh → HIT; stale within `stale_while_revalidate` → STALE plus one
    /// background refresh; otherwise one coalesced fill (in fleet mode the shared L2 first: a
    /// page another replica fetched is a HIT, or STALE by its age, never a MISS), falling back to
    /// a stale copy within `stale_if_error` when the upstream fails or is being protected.
    pub async fn cached(
        self: &Arc<Self>,
        key: Key,
        ctx: &Ctx,
    ) -> Result<(Arc<Entry>, CacheResult), GatewayError> {
        // The request's start stands for "now": freshness measured from when the client asked.
        let now = clock::at(ctx.started);
        let windows = ctx.windows();
        let existing = self.cache.get(&key, ctx.started);
        if let Some(e) = &existing {
            match e.freshness(now, &windows) {
                Freshness::Fresh => {
                    self.metrics.lookup_hit.inc();
                    return Ok((e.clone(), CacheResult::Hit));
                }
                Freshness::Revalidate => {
                    self.metrics.lookup_stale.inc();
                    if let Some(claim) = e.claim_refresh() {
                        self.spawn_refresh(key, claim, ctx.request_id.clone());
                    }
                    return Ok((e.clone(), CacheResult::Stale));
                }
                Freshness::Stale => {}
            }
        }
        let attempts = Arc::new(AtomicU32::new(0));
        let fetch_deadline = ctx.started + ctx.cfg.server.request_timeout.0;
        let fetch = fetch_entry(
            self.clone(),
            key.clone(),
            ctx.who.clone(),
            ctx.request_id.clone(),
            fetch_deadline,
            attempts.clone(),
        );
        let options = FillOptions {
            windows,
            want: Want::Usable,
            deadline: fetch_deadline,
        };
        let (result, join) = self
            .cache
            .fill(key.clone(), ctx.deadline, options, fetch)
            .await;
        if join == Join::Leader {
            ctx.attempts
                .fetch_add(attempts.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        let coalesced = join == Join::Coalesced;
        match result {
            Ok(Filled {
                entry,
                origin: Origin::Upstream,
            }) => {
                self.metrics.lookup(coalesced);
                Ok((entry, CacheResult::Miss))
            }
            Ok(Filled {
                entry,
                origin: Origin::Shared,
            }) => {
                // Answered from the L2: counted once as l2_hit (its joiners as coalesced).
                if coalesced {
                    self.metrics.lookup_coalesced.inc();
                } else {
                    self.metrics.lookup_l2_hit.inc();
                }
                match entry.freshness(now, &windows) {
                    Freshness::Fresh => Ok((entry, CacheResult::Hit)),
                    _ => {
                        if let Some(claim) = entry.claim_refresh() {
                            self.spawn_refresh(key, claim, ctx.request_id.clone());
                        }
                        Ok((entry, CacheResult::Stale))
                    }
                }
            }
            Err(FillFailed { error: err, stale }) => {
                if let Some(t) = err.throttle() {
                    self.metrics.throttled(t.label());
                }
                match existing
                    .or(stale)
                    .filter(|e| err.stale_eligible() && e.usable_on_error(clock::now(), &windows))
                {
                    Some(e) => {
                        self.metrics.lookup_stale.inc();
                        tracing::debug!(error = %err, "serving stale copy");
                        Ok((e, CacheResult::Stale))
                    }
                    None => {
                        self.metrics.lookup(coalesced);
                        Err(err)
                    }
                }
            }
        }
    }

    /// The claim is given back when the refresh fails or its task dies, so a later request can
    /// start another; it stays taken once a new entry replaced the stale one. In fleet mode one
    /// replica refreshes (the fill lease); the others take its answer from the L2.
    fn spawn_refresh(self: &Arc<Self>, key: Key, claim: RefreshClaim, request_id: HeaderValue) {
        let g = self.clone();
        tokio::spawn(async move {
            let cfg = g.config();
            let deadline = Instant::now() + cfg.server.request_timeout.0;
            let options = FillOptions {
                windows: Windows::from_config(&cfg.cache),
                want: Want::Fresh,
                deadline,
            };
            drop(cfg);
            // The gateway's own work: no client waits for it.
            let fetch = fetch_entry(
                g.clone(),
                key.clone(),
                Principal::Anonymous,
                request_id,
                deadline,
                Default::default(),
            );
            match g.cache.fill(key, deadline, options, fetch).await.0 {
                Ok(_) => claim.refreshed(),
                Err(e) => {
                    tracing::warn!(error = %e.error, "background refresh failed; the stale copy stays");
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
