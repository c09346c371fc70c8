//! The one writer of cached answers: status, body (identity or gzip), `X-Cache`, `Age`, `ETag`
//! with `If-None-Match` → 304, `Cache-Control`, `Vary`, and `HEAD`. Pages and subscriptions
//! (one stored entry) and whole-account documents (assembled from several) each give a [`View`]
//! and answer through [`respond`], so they answer conditional requests, `HEAD` and gzip alike.

use super::Ctx;
use crate::cache::{Entry, FileForm, Windows};
use crate::respond::{Body, X_REQUEST_ID};
use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, HeaderValue, Response, StatusCode};
use std::sync::{Arc, OnceLock};
use std::time::SystemTime;

pub const X_CACHE: HeaderName = HeaderName::from_static("x-cache");

/// Header values for the seconds a cached answer reports (`Age`, `max-age`) are made once, as
/// static text (about 60 KB for both tables, kept for the life of the process): a hit then
/// formats, allocates and counts references for neither.
const PRECOMPUTED_SECONDS: u64 = 3600;

fn seconds_table(render: fn(u64) -> String) -> Vec<HeaderValue> {
    (0..=PRECOMPUTED_SECONDS)
        .map(|n| {
            let text: &'static str = Box::leak(render(n).into_boxed_str());
            HeaderValue::from_static(text)
        })
        .collect()
}

pub fn age_value(secs: u64) -> HeaderValue {
    static TABLE: OnceLock<Vec<HeaderValue>> = OnceLock::new();
    let table = TABLE.get_or_init(|| seconds_table(|n| n.to_string()));
    match table.get(secs as usize) {
        Some(v) => v.clone(),
        None => HeaderValue::from(secs),
    }
}

fn render_cache_control(max_age: u64) -> String {
    format!("private, max-age={max_age}")
}

pub fn cache_control_value(max_age: u64) -> HeaderValue {
    static TABLE: OnceLock<Vec<HeaderValue>> = OnceLock::new();
    let table = TABLE.get_or_init(|| seconds_table(render_cache_control));
    match table.get(max_age as usize) {
        Some(v) => v.clone(),
        None => HeaderValue::from_str(&render_cache_control(max_age))
            .unwrap_or(HeaderValue::from_static("private, max-age=0")),
    }
}

/// How a response was produced, for `X-Cache`, metrics and the request log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheResult {
    Hit,
    Miss,
    Stale,
}

impl CacheResult {
    pub fn header(self) -> HeaderValue {
        const HIT: HeaderValue = HeaderValue::from_static("HIT");
        const MISS: HeaderValue = HeaderValue::from_static("MISS");
        const STALE: HeaderValue = HeaderValue::from_static("STALE");
        match self {
            CacheResult::Hit => HIT,
            CacheResult::Miss => MISS,
            CacheResult::Stale => STALE,
        }
    }
}

const VARY: HeaderValue = HeaderValue::from_static("accept-encoding");
const GZIP: HeaderValue = HeaderValue::from_static("gzip");

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

/// What a cached answer is made of, whichever way it was put together.
#[derive(Debug)]
pub struct View {
    pub status: StatusCode,
    pub content_type: HeaderValue,
    pub etag: HeaderValue,
    /// Seconds since the (oldest) fetch behind the answer: `Age`.
    pub age: u64,
    /// Seconds of freshness left (the least of the parts'): `max-age`.
    pub fresh_left: u64,
    /// The identity body.
    pub body: Body,
    /// The gzip form, when there is one; sent to clients that accept it.
    pub gzip: Option<Bytes>,
    /// The identity body's file form, when there is one (`sendfile` in the HTTP/1.1 front).
    pub file: Option<Arc<FileForm>>,
}

impl View {
    /// One stored entry at `now`, with the current windows, its gzip form only if `gzip` (the
    /// client accepts it). Shares the entry's `Bytes`.
    pub fn of_entry(e: &Entry, now: SystemTime, w: &Windows, gzip: bool) -> View {
        let age = e.age(now);
        View {
            status: e.status(),
            content_type: e.content_type().clone(),
            etag: e.etag().clone(),
            age: age.as_secs(),
            fresh_left: e.fresh_left_at(age, w),
            body: Body::new(e.body().clone()),
            gzip: if gzip { e.gzip().cloned() } else { None },
            file: e.file().cloned(),
        }
    }
}

/// Whether the request's `If-None-Match` matches an answer with `status` and `etag` (a 304
/// then goes out instead): a list, weak tags (`W/`) and `*` all count; only 200s are matched.
pub fn not_modified(status: StatusCode, etag: &HeaderValue, ctx: &Ctx) -> bool {
    status == StatusCode::OK
        && ctx
            .if_none_match
            .as_ref()
            .is_some_and(|inm| etag_matches(inm, etag))
}

/// A header of a cached answer: its name, and its line's start as HTTP/1.1 writes it.
pub struct Field {
    pub name: HeaderName,
    /// `name: `, lower case.
    pub line: &'static [u8],
}

impl Field {
    const fn new(name: HeaderName, line: &'static [u8]) -> Self {
        Self { name, line }
    }

    pub const CONTENT_TYPE: Field = Field::new(header::CONTENT_TYPE, b"content-type: ");
    pub const X_CACHE: Field = Field::new(X_CACHE, b"x-cache: ");
    pub const AGE: Field = Field::new(header::AGE, b"age: ");
    pub const ETAG: Field = Field::new(header::ETAG, b"etag: ");
    pub const CACHE_CONTROL: Field = Field::new(header::CACHE_CONTROL, b"cache-control: ");
    pub const VARY: Field = Field::new(header::VARY, b"vary: ");
    pub const CONTENT_ENCODING: Field = Field::new(header::CONTENT_ENCODING, b"content-encoding: ");
    pub const CONTENT_LENGTH: Field = Field::new(header::CONTENT_LENGTH, b"content-length: ");
    pub const X_REQUEST_ID: Field = Field::new(X_REQUEST_ID, b"x-request-id: ");
}

/// A cached answer, decided once for both of its writers: [`Answer::into_response`] for the
/// hyper path, [`Answer::for_each_header`] for the client API's own HTTP/1.1 writer
/// (`runtime::h1`). Copies no body bytes.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    content_type: HeaderValue,
    cache: CacheResult,
    age: u64,
    etag: HeaderValue,
    fresh_left: u64,
    gzip: bool,
    /// `Content-Length` of a HEAD answer: what the GET would send.
    head_length: Option<usize>,
    /// Empty for HEAD and 304.
    pub body: Body,
    /// When it was answered (the request's arrival), for `Date`.
    pub at: SystemTime,
    /// The body's file form, when the body is the whole identity body and has one.
    pub file: Option<Arc<FileForm>>,
}

impl Answer {
    /// Every header of the answer, in order (`Date` and, for a GET, `Content-Length` are the
    /// writer's).
    pub fn for_each_header(&self, mut f: impl FnMut(&Field, &HeaderValue)) {
        f(&Field::CONTENT_TYPE, &self.content_type);
        f(&Field::X_CACHE, &self.cache.header());
        f(&Field::AGE, &age_value(self.age));
        f(&Field::ETAG, &self.etag);
        f(&Field::CACHE_CONTROL, &cache_control_value(self.fresh_left));
        f(&Field::VARY, &VARY);
        if self.gzip {
            f(&Field::CONTENT_ENCODING, &GZIP);
        }
        if let Some(n) = self.head_length {
            f(&Field::CONTENT_LENGTH, &HeaderValue::from(n));
        }
    }

    /// The body sent is the whole identity body (not gzip, HEAD or 304): what a file form holds.
    pub fn sends_identity_body(&self) -> bool {
        !self.gzip && self.head_length.is_none() && self.status != StatusCode::NOT_MODIFIED
    }

    pub fn into_response(self) -> Response<Body> {
        // Room for every header this answer gets, so inserting never regrows the map.
        let mut headers = HeaderMap::with_capacity(12);
        self.for_each_header(|field, value| {
            headers.insert(&field.name, value.clone());
        });
        let mut resp = Response::new(self.body);
        *resp.status_mut() = self.status;
        *resp.headers_mut() = headers;
        resp
    }
}

/// The answer for `view`: 304 when `If-None-Match` matches, no body for HEAD, the gzip form
/// for a client that accepts it.
pub fn answer(view: View, result: CacheResult, ctx: &Ctx, at: SystemTime) -> Answer {
    let not_modified = not_modified(view.status, &view.etag, ctx);
    let gzip = view.gzip.filter(|_| ctx.accept_gzip);
    let sent_len = gzip.as_ref().map_or_else(|| view.body.len(), Bytes::len);
    let gzip_sent = gzip.is_some() && !not_modified;
    let body = if not_modified || ctx.head {
        Body::default()
    } else {
        match gzip {
            Some(gz) => Body::new(gz),
            None => view.body,
        }
    };
    let mut answer = Answer {
        status: if not_modified {
            StatusCode::NOT_MODIFIED
        } else {
            view.status
        },
        content_type: view.content_type,
        cache: result,
        age: view.age,
        etag: view.etag,
        fresh_left: view.fresh_left,
        gzip: gzip_sent,
        head_length: (ctx.head && !not_modified).then_some(sent_len),
        body,
        at,
        file: None,
    };
    answer.file = view.file.filter(|_| answer.sends_identity_body());
    answer
}

/// The response for a cached answer: copies no body bytes.
pub fn respond(view: View, result: CacheResult, ctx: &Ctx) -> Response<Body> {
    answer(view, result, ctx, SystemTime::now()).into_response()
}

/// The response for one stored entry at `now`, with the current windows. A gzip client that
/// finds no gzip form yet gets the identity body, and asks for the form to be made if it was
/// skipped (a full compressor queue, or an entry read from a store without one).
pub fn entry_response(
    e: &Entry,
    result: CacheResult,
    ctx: &Ctx,
    now: SystemTime,
    w: &Windows,
) -> Response<Body> {
    entry_answer(e, result, ctx, now, w).into_response()
}

/// [`entry_response`] before it becomes a `Response`.
pub fn entry_answer(
    e: &Entry,
    result: CacheResult,
    ctx: &Ctx,
    now: SystemTime,
    w: &Windows,
) -> Answer {
    let view = View::of_entry(e, now, w, ctx.accept_gzip);
    if ctx.accept_gzip && view.gzip.is_none() {
        e.compress_later();
    }
    answer(view, result, ctx, now)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::fixtures::windows;
    use std::sync::atomic::AtomicU32;
    use tokio::time::Instant;

    fn ctx(gzip: bool, head: bool) -> Ctx {
        Ctx {
            request_id: HeaderValue::from_static("t"),
            started: Instant::now(),
            deadline: Instant::now(),
            head,
            accept_gzip: gzip,
            if_none_match: None,
            attempts: AtomicU32::new(0),
            who: crate::clients::Principal::Anonymous,
            cfg: Default::default(),
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
            SystemTime::now(),
        );
        e.compress_now();
        let w = windows();
        for (gzip, cached) in [(false, e.body()), (true, e.gzip().unwrap())] {
            let r = entry_response(
                &e,
                CacheResult::Hit,
                &ctx(gzip, false),
                SystemTime::now(),
                &w,
            );
            let chunks: Vec<&Bytes> = r.body().chunks().collect();
            assert_eq!(chunks.len(), 1);
            // Same allocation, same length: a pointer was cloned, not the bytes.
            assert_eq!(chunks[0].as_ptr(), cached.as_ptr());
            assert_eq!(chunks[0].len(), cached.len());
        }
        let r = entry_response(
            &e,
            CacheResult::Hit,
            &ctx(false, true),
            SystemTime::now(),
            &w,
        );
        assert!(r.body().is_empty());
        assert_eq!(
            r.headers()[header::CONTENT_LENGTH],
            e.body().len().to_string().as_str()
        );
        // HEAD with gzip: the length and encoding the GET would send.
        let r = entry_response(
            &e,
            CacheResult::Hit,
            &ctx(true, true),
            SystemTime::now(),
            &w,
        );
        assert!(r.body().is_empty());
        assert_eq!(r.headers()[header::CONTENT_ENCODING], "gzip");
        assert_eq!(
            r.headers()[header::CONTENT_LENGTH],
            e.gzip().unwrap().len().to_string().as_str()
        );
    }

    /// A gzip client that comes before the gzip form is made is answered at once, with the
    /// identity body and the same ETag; the form then comes and is sent from then on.
    #[tokio::test]
    async fn gzip_clients_get_identity_until_the_form_is_made() {
        let body: Vec<u8> = (0..800)
            .flat_map(|i| format!("{{\"d\":{i}}},").into_bytes())
            .collect();
        let e = Entry::new(
            StatusCode::OK,
            crate::respond::JSON,
            Bytes::from(body),
            SystemTime::now(),
        );
        let w = windows();
        let r = entry_response(
            &e,
            CacheResult::Miss,
            &ctx(true, false),
            SystemTime::now(),
            &w,
        );
        assert!(r.headers().get(header::CONTENT_ENCODING).is_none());
        assert_eq!(r.headers()[header::ETAG], e.etag());
        assert_eq!(r.body().len(), e.body().len());
        // That request asked for the form (the fetch asks too; asking twice queues once).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while e.gzip_pending() {
            assert!(std::time::Instant::now() < deadline, "never compressed");
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        let r = entry_response(
            &e,
            CacheResult::Hit,
            &ctx(true, false),
            SystemTime::now(),
            &w,
        );
        assert_eq!(r.headers()[header::CONTENT_ENCODING], "gzip");
        assert_eq!(r.headers()[header::ETAG], e.etag());
        assert_eq!(r.body().len(), e.gzip().unwrap().len());
    }

    #[test]
    fn second_values_inside_and_beyond_the_table() {
        assert_eq!(age_value(0), "0");
        assert_eq!(age_value(3600), "3600");
        assert_eq!(age_value(86_400), "86400");
        assert_eq!(cache_control_value(299), "private, max-age=299");
        assert_eq!(cache_control_value(7200), "private, max-age=7200");
    }

    #[test]
    fn field_lines_spell_their_names() {
        for f in [
            Field::CONTENT_TYPE,
            Field::X_CACHE,
            Field::AGE,
            Field::ETAG,
            Field::CACHE_CONTROL,
            Field::VARY,
            Field::CONTENT_ENCODING,
            Field::CONTENT_LENGTH,
            Field::X_REQUEST_ID,
        ] {
            assert_eq!(f.line, format!("{}: ", f.name).as_bytes());
        }
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
}
