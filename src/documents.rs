//! Whole-account endpoints: every page walked from index 0 through the cache (so concurrent
//! walks share pages), merged into one document whose device list is the pages' own bytes.
//! Each stored page is read once, into its [`PageIndex`]; a warm walk or lookup parses no page.

use crate::cache::page::PageIndex;
use crate::cache::{Entry, Key, Kind};
use crate::error::GatewayError;
use crate::read::Reader;
use crate::read::{entry_response, CacheResult, Ctx};
use crate::respond::Body;
use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use std::sync::Arc;
use tokio::time::Instant;

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
        if pages.len() >= g.config().upstream.max_walk_pages {
            return Err(GatewayError::BadGateway(format!(
                "account has more than upstream.max_walk_pages = {} pages",
                g.config().upstream.max_walk_pages
            )));
        }
        let key = Key {
            kind: Kind::Page,
            account: account.clone(),
            index,
        };
        let (entry, r) = g.cached(key, ctx).await?;
        if entry.status != StatusCode::OK {
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
        ctx.update(p.etag.as_bytes());
    }
    let hex: String = ctx.finish().as_ref()[..12]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    HeaderValue::from_str(&format!("\"w{hex}\"")).unwrap_or(HeaderValue::from_static("\"w0\""))
}

fn finish(
    mut resp: Response<Body>,
    etag: HeaderValue,
    result: CacheResult,
    pages: &[Arc<Entry>],
    ctx: &Ctx,
) -> Response<Body> {
    let now = Instant::now();
    let oldest = pages
        .iter()
        .map(|p| p.age(now).as_secs())
        .max()
        .unwrap_or(0);
    let fresh = pages.iter().map(|p| p.fresh_left(now)).min().unwrap_or(0);
    let not_modified = ctx
        .if_none_match
        .as_ref()
        .is_some_and(|v| v.as_bytes() == etag.as_bytes() || v == "*");
    if not_modified {
        *resp.status_mut() = StatusCode::NOT_MODIFIED;
        *resp.body_mut() = Body::default();
    } else if ctx.head {
        let len = resp.body().len();
        *resp.body_mut() = Body::default();
        resp.headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    }
    let h = resp.headers_mut();
    h.insert(header::ETAG, etag);
    h.insert(header::AGE, crate::read::answer::age_value(oldest));
    h.insert(
        header::CACHE_CONTROL,
        crate::read::answer::cache_control_value(fresh),
    );
    h.insert(header::VARY, HeaderValue::from_static("accept-encoding"));
    h.insert(
        "x-cache",
        HeaderValue::from_static(match result {
            CacheResult::Hit => "HIT",
            CacheResult::Miss => "MISS",
            CacheResult::Stale => "STALE",
        }),
    );
    resp
}

/// `GET /gateway/v1/accounts/{account}/licenses`
pub async fn account_licenses(
    g: &Arc<Reader>,
    account: &str,
    ctx: &Ctx,
) -> Result<(Response<Body>, CacheResult), GatewayError> {
    let w = match walk(g, account, ctx).await? {
        Walked::Pages(w) => w,
        Walked::Refused(e, r) => return Ok((entry_response(&e, r, ctx, Instant::now()), r)),
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
    let gzip = if ctx.accept_gzip && !ctx.head {
        gzip_document(g, &etag, &all).await
    } else {
        None
    };
    let mut resp = match &gzip {
        Some(gz) => Response::new(Body::new(gz.clone())),
        None => Response::new(Body::from_chunks(all)),
    };
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, crate::respond::JSON);
    if gzip.is_some() {
        resp.headers_mut()
            .insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    }
    Ok((finish(resp, etag, w.result, &w.pages, ctx), w.result))
}

/// The document's gzip form, compressed once per version (ETag) off the async threads;
/// concurrent requests for the same version wait for the one compression.
async fn gzip_document(g: &Arc<Reader>, etag: &HeaderValue, chunks: &[Bytes]) -> Option<Bytes> {
    let key = etag.to_str().ok()?.to_string();
    let parts: Vec<Bytes> = chunks.to_vec();
    g.cache()
        .derived_gzip
        .optionally_get_with(key, async move {
            tokio::task::spawn_blocking(move || {
                let slices: Vec<&[u8]> = parts.iter().map(|b| b.as_ref()).collect();
                crate::cache::gzip_parts(&slices)
            })
            .await
            .ok()
            .flatten()
        })
        .await
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
        Walked::Refused(e, r) => return Ok((entry_response(&e, r, ctx, Instant::now()), r)),
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
    let resp = crate::respond::json(StatusCode::OK, Bytes::from(body));
    let etag = {
        let base = combined_etag(&w.pages);
        let b = base
            .to_str()
            .unwrap_or("\"w0\"")
            .trim_end_matches('"')
            .to_string();
        HeaderValue::from_str(&format!("{b}-{device_id}\"")).unwrap_or(base)
    };
    Ok((finish(resp, etag, w.result, &w.pages, ctx), w.result))
}
