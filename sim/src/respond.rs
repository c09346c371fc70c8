//! JSON and text responses, as ThingSpace sends them.

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};

/// Every simulator answer is one buffer.
pub type Body = http_body_util::Full<Bytes>;

pub fn json(status: StatusCode, body: Bytes) -> Response<Body> {
    text(status, body, "application/json")
}

pub fn json_value(status: StatusCode, v: &serde_json::Value) -> Response<Body> {
    // Serializing a `Value` cannot fail (its map keys are strings).
    json(
        status,
        Bytes::from(serde_json::to_vec(v).unwrap_or_default()),
    )
}

pub fn text(
    status: StatusCode,
    body: impl Into<Bytes>,
    content_type: &'static str,
) -> Response<Body> {
    let mut r = Response::new(Body::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}
