//! Whole-account endpoints: every page walked from index 0 through the cache (so concurrent
//! walks share pages), merged into one document whose device list is the pages' own bytes.

use crate::app::Gateway;
use crate::cache::{Entry, Key, Kind};
use crate::error::GatewayError;
use crate::proxy::{entry_response, CacheResult, Ctx};
use crate::respond::Body;
use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use serde::Deserialize;
use serde_json::value::RawValue;
use std::sync::Arc;
use tokio::time::Instant;

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PageHead<'a> {
    #[serde(borrow)]
    account_name: &'a RawValue,
    #[serde(borrow)]
    total_licenses: &'a RawValue,
    #[serde(borrow)]
    assigned_licenses: &'a RawValue,
    #[serde(default)]
    has_more_data: bool,
    #[serde(default)]
    last_seen_device_id: u64,
    #[serde(borrow)]
    device_list: DeviceSpan<'a>,
}

/// The device list seen without collecting it: how many devices, and the first and last
/// device's raw JSON (whose positions delimit the list's bytes in the page).
#[derive(Default)]
struct DeviceSpan<'a> {
    count: usize,
    first: Option<&'a RawValue>,
    last: Option<&'a RawValue>,
}

impl<'de: 'a, 'a> Deserialize<'de> for DeviceSpan<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for Visit<'a> {
            type Value = DeviceSpan<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an array of devices")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Self::Value, A::Error> {
                let mut span = DeviceSpan::default();
                while let Some(d) = seq.next_element::<&'de RawValue>()? {
                    span.first.get_or_insert(d);
                    span.last = Some(d);
                    span.count += 1;
                }
                Ok(span)
            }
        }
        d.deserialize_seq(Visit(std::marker::PhantomData))
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Device<'a> {
    device_id: std::borrow::Cow<'a, str>,
    #[serde(borrow, default)]
    assignment_time: Option<&'a RawValue>,
}

/// A walked account: its pages in cursor order, each parsed once during the walk.
struct Walk {
    pages: Vec<Arc<Entry>>,
    /// Per page: the device objects' bytes (a slice of the cached page) and how many.
    devices: Vec<(Bytes, usize)>,
    /// `{"accountName":…,"totalLicenses":…,"assignedLicenses":…,` from the first page.
    header_fields: String,
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

/// The byte offset of `inner` inside `outer` (both from the same buffer).
fn offset_in(outer: &Bytes, inner: &str) -> Option<usize> {
    let start = (inner.as_ptr() as usize).checked_sub(outer.as_ptr() as usize)?;
    (start + inner.len() <= outer.len()).then_some(start)
}

fn worse(a: CacheResult, b: CacheResult) -> CacheResult {
    use CacheResult::*;
    match (a, b) {
        (Stale, _) | (_, Stale) => Stale,
        (Miss, _) | (_, Miss) => Miss,
        _ => Hit,
    }
}

async fn walk(g: &Arc<Gateway>, account: &str, ctx: &Ctx) -> Result<Walked, GatewayError> {
    let mut pages = Vec::new();
    let mut devices = Vec::new();
    let mut header_fields = String::new();
    let mut result = CacheResult::Hit;
    let mut index = 0u64;
    loop {
        if pages.len() >= g.cfg.upstream.max_walk_pages {
            return Err(GatewayError::BadGateway(format!(
                "account has more than upstream.max_walk_pages = {} pages",
                g.cfg.upstream.max_walk_pages
            )));
        }
        let key = Key {
            kind: Kind::Page,
            account: account.into(),
            index,
        };
        let (entry, r) = g.cached(key, ctx).await?;
        if entry.status != StatusCode::OK {
            return Ok(Walked::Refused(entry, r));
        }
        result = worse(result, r);
        let head: PageHead = serde_json::from_slice(&entry.body).map_err(|_| bad_page())?;
        if pages.is_empty() {
            header_fields = format!(
                "{{\"accountName\":{},\"totalLicenses\":{},\"assignedLicenses\":{},",
                head.account_name.get(),
                head.total_licenses.get(),
                head.assigned_licenses.get()
            );
        }
        if let (Some(first), Some(last)) = (head.device_list.first, head.device_list.last) {
            let start = offset_in(&entry.body, first.get()).ok_or_else(bad_page)?;
            let end = offset_in(&entry.body, last.get()).ok_or_else(bad_page)? + last.get().len();
            // The devices' own bytes, separators included: a slice of the cached page, not a copy.
            devices.push((entry.body.slice(start..end), head.device_list.count));
        }
        let (more, next) = (head.has_more_data, head.last_seen_device_id);
        pages.push(entry.clone());
        if !more {
            return Ok(Walked::Pages(Walk {
                pages,
                devices,
                header_fields,
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
    h.insert(header::AGE, crate::proxy::age_value(oldest));
    h.insert(
        header::CACHE_CONTROL,
        crate::proxy::cache_control_value(fresh),
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
    g: &Arc<Gateway>,
    account: &str,
    ctx: &Ctx,
) -> Result<(Response<Body>, CacheResult), GatewayError> {
    let w = match walk(g, account, ctx).await? {
        Walked::Pages(w) => w,
        Walked::Refused(e, r) => return Ok((entry_response(&e, r, ctx, Instant::now()), r)),
    };
    let mut chunks: Vec<Bytes> = Vec::with_capacity(w.devices.len() * 2 + 2);
    let mut count = 0usize;
    for (slice, n) in &w.devices {
        if count > 0 {
            chunks.push(Bytes::from_static(b","));
        }
        count += n;
        chunks.push(slice.clone());
    }
    let head = format!(
        "{}\"deviceCount\":{count},\"deviceList\":[",
        w.header_fields
    );
    let mut all = Vec::with_capacity(chunks.len() + 2);
    all.push(Bytes::from(head));
    all.extend(chunks);
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
async fn gzip_document(g: &Arc<Gateway>, etag: &HeaderValue, chunks: &[Bytes]) -> Option<Bytes> {
    let key = etag.to_str().ok()?.to_string();
    let parts: Vec<Bytes> = chunks.to_vec();
    g.cache
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
    g: &Arc<Gateway>,
    account: &str,
    device_id: &str,
    ctx: &Ctx,
) -> Result<(Response<Body>, CacheResult), GatewayError> {
    let w = match walk(g, account, ctx).await? {
        Walked::Pages(w) => w,
        Walked::Refused(e, r) => return Ok((entry_response(&e, r, ctx, Instant::now()), r)),
    };
    let wanted: u64 = device_id.parse().unwrap_or(0);
    let mut found: Option<serde_json::Value> = None;
    'pages: for page in &w.pages {
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Devices<'a> {
            #[serde(borrow)]
            device_list: Vec<Device<'a>>,
        }
        let devices = serde_json::from_slice::<Devices>(&page.body)
            .map_err(|_| bad_page())?
            .device_list;
        // Pages hold IMEIs in increasing order: skip a page whose range cannot hold the id.
        let numeric = |d: &Device| d.device_id.parse::<u64>().ok();
        if let (Some(lo), Some(hi)) = (
            devices.first().and_then(numeric),
            devices.last().and_then(numeric),
        ) {
            if wanted < lo || wanted > hi {
                continue;
            }
        }
        for d in &devices {
            if d.device_id == device_id {
                let time = d
                    .assignment_time
                    .and_then(|t| serde_json::from_str::<serde_json::Value>(t.get()).ok())
                    .unwrap_or(serde_json::Value::Null);
                found = Some(time);
                break 'pages;
            }
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
