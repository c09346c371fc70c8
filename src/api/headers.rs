//! What a client request asks for: its request id, gzip, `If-None-Match`, `Authorization`, and
//! the header limits, read in one pass over its headers.

use crate::error::GatewayError;
use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, HeaderValue};
use std::cell::RefCell;

pub use crate::respond::X_REQUEST_ID;

/// More request headers than this (Host included) → 431.
pub const MAX_HEADERS: usize = 100;

/// The request headers the client API reads, found in one pass (one comparison of names per
/// header instead of one hash lookup per name), and the sizes the limits are checked on. Read
/// from hyper's `HeaderMap` or straight from the parsed head of the HTTP/1.1 front.
pub(super) struct RequestHeaders<'a> {
    pub request_id: Option<&'a [u8]>,
    pub accept_gzip: bool,
    pub if_none_match: Option<&'a [u8]>,
    pub authorization: Option<&'a [u8]>,
    /// Header lines, `Host` included.
    pub count: usize,
    /// Names and values of all headers.
    pub bytes: usize,
}

impl<'a> RequestHeaders<'a> {
    pub fn read(headers: &'a HeaderMap) -> Self {
        Self::from_pairs(
            headers
                .iter()
                .map(|(name, value)| (name.as_str().as_bytes(), value.as_bytes())),
        )
    }

    /// From a head as `httparse` parsed it (names in any case).
    pub fn read_raw(headers: &'a [httparse::Header<'a>]) -> Self {
        Self::from_pairs(headers.iter().map(|h| (h.name.as_bytes(), h.value)))
    }

    fn from_pairs(pairs: impl Iterator<Item = (&'a [u8], &'a [u8])>) -> Self {
        let mut h = RequestHeaders {
            request_id: None,
            accept_gzip: false,
            if_none_match: None,
            authorization: None,
            count: 0,
            bytes: 0,
        };
        for (name, value) in pairs {
            h.count += 1;
            h.bytes += name.len() + value.len();
            let is = |n: &HeaderName| name.eq_ignore_ascii_case(n.as_str().as_bytes());
            if is(&header::ACCEPT_ENCODING) {
                h.accept_gzip = h.accept_gzip || value_accepts_gzip(value);
            } else if is(&header::IF_NONE_MATCH) {
                h.if_none_match.get_or_insert(value);
            } else if is(&header::AUTHORIZATION) {
                h.authorization.get_or_insert(value);
            } else if is(&X_REQUEST_ID) {
                h.request_id.get_or_insert(value);
            }
        }
        h
    }

    /// 431 when over [`MAX_HEADERS`] lines or `max_bytes` of names and values.
    pub fn check_limits(&self, max_bytes: usize) -> Result<(), GatewayError> {
        if self.count > MAX_HEADERS || self.bytes > max_bytes {
            return Err(GatewayError::HeadersTooLarge);
        }
        Ok(())
    }

    /// The client's `X-Request-Id` when it is sane (1-128 visible ASCII), else a new one.
    pub fn request_id(&self) -> HeaderValue {
        match self
            .request_id
            .filter(|v| (1..=128).contains(&v.len()) && v.iter().all(|b| b.is_ascii_graphic()))
        {
            Some(v) => HeaderValue::from_bytes(v).unwrap_or_else(|_| new_request_id()),
            None => new_request_id(),
        }
    }

    /// `If-None-Match`, when it is a valid header value.
    pub fn if_none_match(&self) -> Option<HeaderValue> {
        self.if_none_match
            .and_then(|v| HeaderValue::from_bytes(v).ok())
    }

    /// `Authorization` as text (a value that is not UTF-8 authenticates no one).
    pub fn authorization(&self) -> Option<&'a str> {
        self.authorization.and_then(|v| std::str::from_utf8(v).ok())
    }
}

/// Generated request ids: 32 random hex digits each, made 64 at a time into one buffer that
/// each id is a slice of (no allocation per request).
const IDS_PER_BATCH: usize = 64;
const ID_LEN: usize = 32;

fn new_request_id() -> HeaderValue {
    thread_local! {
        static BATCH: RefCell<(Bytes, usize)> = const { RefCell::new((Bytes::new(), 0)) };
    }
    BATCH.with(|b| {
        let mut b = b.borrow_mut();
        let (ids, next) = &mut *b;
        if *next >= IDS_PER_BATCH || ids.is_empty() {
            *ids = id_batch();
            *next = 0;
        }
        let id = ids.slice(*next * ID_LEN..(*next + 1) * ID_LEN);
        *next += 1;
        HeaderValue::from_maybe_shared(id).unwrap_or(HeaderValue::from_static("0"))
    })
}

fn id_batch() -> Bytes {
    // Two hex digits per byte, from a table: a batch costs a few instructions per id.
    static PAIRS: [[u8; 2]; 256] = {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut t = [[0u8; 2]; 256];
        let mut i = 0;
        while i < 256 {
            t[i] = [HEX[i >> 4], HEX[i & 0xf]];
            i += 1;
        }
        t
    };
    let mut buf = [0u8; IDS_PER_BATCH * ID_LEN];
    for digits in buf.chunks_exact_mut(16) {
        let random = fastrand::u64(..).to_le_bytes();
        for (pair, byte) in digits.chunks_exact_mut(2).zip(random) {
            pair.copy_from_slice(&PAIRS[usize::from(byte)]);
        }
    }
    Bytes::copy_from_slice(&buf)
}

/// `gzip` (or `*`) listed with a non-zero q in one `Accept-Encoding` value.
fn value_accepts_gzip(bytes: &[u8]) -> bool {
    // Most values name no gzip at all ("identity", "br"): no parsing for those.
    if !bytes.iter().any(|&b| b == b'*' || b | 0x20 == b'g') {
        return false;
    }
    std::str::from_utf8(bytes)
        .unwrap_or("")
        .split(',')
        .any(|item| {
            let mut parts = item.split(';');
            let name = parts.next().unwrap_or("").trim();
            let q_zero = parts.any(|p| {
                let p = p.trim();
                p.strip_prefix("q=")
                    .is_some_and(|q| q.trim().parse::<f32>().map(|q| q == 0.0).unwrap_or(false))
            });
            (name.eq_ignore_ascii_case("gzip") || name == "*") && !q_zero
        })
}

/// `gzip` (or `*`) listed with a non-zero q in any `Accept-Encoding` header.
#[cfg(test)]
fn accepts_gzip(headers: &HeaderMap) -> bool {
    RequestHeaders::read(headers).accept_gzip
}

#[cfg(test)]
fn check_header_limits(headers: &HeaderMap, max_bytes: usize) -> Result<(), GatewayError> {
    RequestHeaders::read(headers).check_limits(max_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn request_ids_are_echoed_when_sane_else_new_and_distinct() {
        let mut h = HeaderMap::new();
        h.insert(X_REQUEST_ID, HeaderValue::from_static("abc-123"));
        assert_eq!(RequestHeaders::read(&h).request_id(), "abc-123");
        h.insert(X_REQUEST_ID, HeaderValue::from_static("has space"));
        let mut seen = std::collections::HashSet::new();
        for _ in 0..3 * IDS_PER_BATCH {
            let id = RequestHeaders::read(&h).request_id();
            assert_eq!(id.len(), ID_LEN);
            assert!(id.as_bytes().iter().all(|b| b.is_ascii_hexdigit()));
            assert!(seen.insert(id), "ids repeat");
        }
    }

    #[test]
    fn one_pass_finds_what_lookups_find() {
        let mut h = HeaderMap::new();
        h.append(header::ACCEPT_ENCODING, "identity".parse().unwrap());
        h.append(header::ACCEPT_ENCODING, "GZIP;q=0.8".parse().unwrap());
        h.insert(header::IF_NONE_MATCH, "\"x\"".parse().unwrap());
        h.insert(header::AUTHORIZATION, "Basic eA==".parse().unwrap());
        let r = RequestHeaders::read(&h);
        assert!(r.accept_gzip);
        assert_eq!(r.if_none_match.unwrap(), b"\"x\"");
        assert_eq!(r.authorization(), Some("Basic eA=="));
        assert_eq!(r.count, 4);
        assert!(r.request_id.is_none());
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
