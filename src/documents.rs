//! Whole-account endpoints: every page walked from index 0 through the cache (so concurrent
//! walks share pages), merged into one document whose device list is the pages' own bytes.
//! Each stored page is read once, into its [`PageIndex`]; a warm walk or lookup parses no page.

use crate::cache::page::PageIndex;
use crate::cache::{clock, Entry, Key, Kind};
use crate::error::GatewayError;
use crate::read::answer::{self, View};
use crate::read::Reader;
use crate::read::{entry_response, CacheResult, Ctx};
use crate::respond::Body;
use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};
use std::sync::Arc;

/// A walked account: its pages in cursor order, with their indexes.
struct Walk {
    pages: Vec<Arc<Entry>>,
    indexes: Vec<Arc<PageIndex>>,
    /// The worst cache result among the pages (any STALE → STALE, else any MISS → MISS).
    result: CacheResult,
}

enum Walked {
    Pages(Walk),
    /// The upstream refused a page (bad account, bad cursor): passed through as it came.
    Refused(Arc<Entry>, CacheResult),
}

fn bad_page() -> GatewayError {
    GatewayError::BadGateway("upstream license page is not in the documented shape".into())
}

fn worse(a: CacheResult, b: CacheResult) -> CacheResult {
    use CacheResult::*;
    match (a, b) {
        (Stale, _) | (_, Stale) => Stale,
        (Miss, _) | (_, Miss) => Miss,
        _ => Hit,
    }
}

async fn walk(g: &Arc<Reader>, account: &str, ctx: &Ctx) -> Result<Walked, GatewayError> {
    let mut pages = Vec::new();
    let mut indexes = Vec::new();
    let mut result = CacheResult::Hit;
    let mut index = 0u64;
    let account: Arc<str> = account.into();
    loop {
        if pages.len() >= ctx.cfg.upstream.max_walk_pages {
            return Err(GatewayError::BadGateway(format!(
                "account has more than upstream.max_walk_pages = {} pages",
                ctx.cfg.upstream.max_walk_pages
            )));
        }
        let key = Key {
            kind: Kind::Page,
            account: account.clone(),
            index,
        };
        let (entry, r) = g.cached(key, ctx).await?;
        if entry.status() != StatusCode::OK {
            return Ok(Walked::Refused(entry, r));
        }
        result = worse(result, r);
        let page = entry.page_index().ok_or_else(bad_page)?.clone();
        let (more, next) = (page.has_more_data, page.last_seen_device_id);
        pages.push(entry);
        indexes.push(page);
        if !more {
            return Ok(Walked::Pages(Walk {
                pages,
                indexes,
                result,
            }));
        }
        if next <= index {
            return Err(GatewayError::BadGateway(format!(
                "upstream cursor does not advance (lastSeenDeviceId {next} after startIndex {index})"
            )));
        }
        index = next;
    }
}

/// An ETag over the pages' ETags: changes whenever any page does.
fn combined_etag(pages: &[Arc<Entry>]) -> HeaderValue {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for p in pages {
        ctx.update(p.etag().as_bytes());
    }
    let hex = crate::util::hex(&ctx.finish().as_ref()[..12]);
    HeaderValue::from_str(&format!("\"w{hex}\"")).unwrap_or(HeaderValue::from_static("\"w0\""))
}

/// A document assembled from the walked pages: as old as its oldest page, fresh for as long as
/// its least fresh page (with the current windows).
fn document(w: &Walk, ctx: &Ctx, etag: HeaderValue, body: Body, gzip: Option<Bytes>) -> View {
    let now = clock::now();
    let windows = ctx.windows();
    View {
        status: StatusCode::OK,
        content_type: crate::respond::JSON,
        etag,
        age: w
            .pages
            .iter()
            .map(|p| p.age(now).as_secs())
            .max()
            .unwrap_or(0),
        fresh_left: w
            .pages
            .iter()
            .map(|p| p.fresh_left(now, &windows))
            .min()
            .unwrap_or(0),
        body,
        gzip,
        file: None,
    }
}

/// A refused page, passed through as the cache answers it.
fn refused(e: &Entry, r: CacheResult, ctx: &Ctx) -> Response<Body> {
    entry_response(e, r, ctx, clock::now(), &ctx.windows())
}

/// `GET /gateway/v1/accounts/{account}/licenses`
pub async fn account_licenses(
    g: &Arc<Reader>,
    account: &str,
    ctx: &Ctx,
) -> Result<(Response<Body>, CacheResult), GatewayError> {
    let w = match walk(g, account, ctx).await? {
        Walked::Pages(w) => w,
        Walked::Refused(e, r) => return Ok((refused(&e, r, ctx), r)),
    };
    let pages_with_devices = || w.indexes.iter().filter(|p| p.device_count > 0);
    let count: usize = pages_with_devices().map(|p| p.device_count).sum();
    let mut all: Vec<Bytes> = Vec::with_capacity(w.indexes.len() * 2 + 3);
    // `{"accountName":…,"totalLicenses":…,"assignedLicenses":…,` from the first page.
    all.extend(w.indexes.first().map(|p| p.header_fields.clone()));
    all.push(Bytes::from(format!(
        "\"deviceCount\":{count},\"deviceList\":["
    )));
    for (i, page) in pages_with_devices().enumerate() {
        if i > 0 {
            all.push(Bytes::from_static(b","));
        }
        // The devices' own bytes, separators included: a slice of the cached page, not a copy.
        all.push(page.devices.clone());
    }
    all.push(Bytes::from_static(b"]}"));
    let etag = combined_etag(&w.pages);
    // Compressed (once per version) whenever the answer would carry it, HEAD included, so a
    // HEAD reports the length and encoding the GET sends; not for a 304.
    let gzip = if ctx.accept_gzip && !answer::not_modified(StatusCode::OK, &etag, ctx) {
        g.cache().document_gzip(&etag, &all).await
    } else {
        None
    };
    let view = document(&w, ctx, etag, Body::from_chunks(all), gzip);
    Ok((answer::respond(view, w.result, ctx), w.result))
}

/// `GET /gateway/v1/accounts/{account}/licenses/{deviceId}`
pub async fn device_license(
    g: &Arc<Reader>,
    account: &str,
    device_id: &str,
    ctx: &Ctx,
) -> Result<(Response<Body>, CacheResult), GatewayError> {
    let w = match walk(g, account, ctx).await? {
        Walked::Pages(w) => w,
        Walked::Refused(e, r) => return Ok((refused(&e, r, ctx), r)),
    };
    let mut found: Option<serde_json::Value> = None;
    for page in &w.indexes {
        // Pages whose id range cannot hold the device are skipped without reading them.
        if let Some(time) = page.find(device_id).map_err(|_| bad_page())? {
            found = Some(serde_json::from_str(time.get()).unwrap_or(serde_json::Value::Null));
            break;
        }
    }
    // Written in the documented field order; `device_id` is digits only (checked by the router).
    let body = format!(
        "{{\"deviceId\":\"{device_id}\",\"licensed\":{},\"assignmentTime\":{}}}",
        found.is_some(),
        found.unwrap_or(serde_json::Value::Null)
    );
    let etag = {
        let base = combined_etag(&w.pages);
        let b = base
            .to_str()
            .unwrap_or("\"w0\"")
            .trim_end_matches('"')
            .to_string();
        HeaderValue::from_str(&format!("{b}-{device_id}\"")).unwrap_or(base)
    };
    // Small: never worth compressing.
    let view = document(&w, ctx, etag, Body::new(Bytes::from(body)), None);
    Ok((answer::respond(view, w.result, ctx), w.result))
}
