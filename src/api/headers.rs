//! What a client request asks for: its request id, gzip, and the header limits.

use crate::error::GatewayError;
use http::{header, HeaderMap, HeaderValue};

pub use crate::respond::X_REQUEST_ID;

/// More request headers than this (Host included) → 431.
pub const MAX_HEADERS: usize = 100;

/// The client's `X-Request-Id` when it is sane (1-128 visible ASCII), else 32 random hex digits.
pub(super) fn request_id(headers: &HeaderMap) -> HeaderValue {
    if let Some(v) = headers.get(X_REQUEST_ID).filter(|v| {
        (1..=128).contains(&v.len()) && v.as_bytes().iter().all(|b| b.is_ascii_graphic())
    }) {
        return v.clone();
    }
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut id = [0u8; 32];
    let words = [fastrand::u64(..), fastrand::u64(..)];
    for (i, c) in id.iter_mut().enumerate() {
        *c = HEX[((words[i / 16] >> ((i % 16) * 4)) & 0xf) as usize];
    }
    HeaderValue::from_bytes(&id).unwrap_or(HeaderValue::from_static("0"))
}

/// `gzip` (or `*`) listed with a non-zero q.
pub(super) fn accepts_gzip(headers: &HeaderMap) -> bool {
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

pub(super) fn check_header_limits(
    headers: &HeaderMap,
    max_bytes: usize,
) -> Result<(), GatewayError> {
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
