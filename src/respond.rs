//! Response building blocks shared by the client API and the admin API.

/// The request id: echoed or generated for the client, sent upstream, logged.
pub const X_REQUEST_ID: http::HeaderName = http::HeaderName::from_static("x-request-id");

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use hyper::body::{Frame, SizeHint};
use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

/// A response body made of shared `Bytes` chunks: a cache hit hands out the cached buffer
/// itself, and a merged account document is a list of slices of cached pages. Nothing is copied,
/// and the common single-chunk body allocates nothing.
#[derive(Debug, Default)]
pub struct Body {
    chunks: Chunks,
}

#[derive(Debug, Default)]
enum Chunks {
    #[default]
    Empty,
    One(Bytes),
    Many(VecDeque<Bytes>),
}

impl Body {
    pub fn new(bytes: Bytes) -> Self {
        let chunks = if bytes.is_empty() {
            Chunks::Empty
        } else {
            Chunks::One(bytes)
        };
        Self { chunks }
    }

    pub fn from_chunks(chunks: impl IntoIterator<Item = Bytes>) -> Self {
        let list: VecDeque<Bytes> = chunks.into_iter().filter(|c| !c.is_empty()).collect();
        Self {
            chunks: Chunks::Many(list),
        }
    }

    pub fn len(&self) -> usize {
        self.chunks().map(Bytes::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.chunks().next().is_none()
    }

    /// Chunk `i`, for writers that keep no iterator.
    pub fn chunk(&self, i: usize) -> Option<&Bytes> {
        match &self.chunks {
            Chunks::Empty => None,
            Chunks::One(b) => (i == 0).then_some(b),
            Chunks::Many(list) => list.get(i),
        }
    }

    /// The chunks themselves (tests check that they share the cached buffers).
    pub fn chunks(&self) -> impl Iterator<Item = &Bytes> {
        let (one, many) = match &self.chunks {
            Chunks::Empty => (None, None),
            Chunks::One(b) => (Some(b), None),
            Chunks::Many(list) => (None, Some(list.iter())),
        };
        one.into_iter().chain(many.into_iter().flatten())
    }
}

impl From<Bytes> for Body {
    fn from(b: Bytes) -> Self {
        Body::new(b)
    }
}

impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let next = match &mut self.chunks {
            Chunks::Empty => None,
            Chunks::One(_) => match std::mem::take(&mut self.chunks) {
                Chunks::One(b) => Some(b),
                _ => None,
            },
            Chunks::Many(list) => list.pop_front(),
        };
        Poll::Ready(next.map(|c| Ok(Frame::data(c))))
    }

    fn is_end_stream(&self) -> bool {
        self.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.len() as u64)
    }
}

pub const JSON: HeaderValue = HeaderValue::from_static("application/json");

pub fn json_bytes(v: &serde_json::Value) -> Bytes {
    Bytes::from(serde_json::to_vec(v).unwrap_or_default())
}

pub fn json(status: StatusCode, body: Bytes) -> Response<Body> {
    let mut r = Response::new(Body::new(body));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, JSON);
    r
}

pub fn json_value(status: StatusCode, v: &serde_json::Value) -> Response<Body> {
    json(status, json_bytes(v))
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

/// A request handler that always produces a response (errors are already responses): what the
/// listeners serve.
pub trait Handler: Send + Sync + 'static {
    fn handle(
        &self,
        req: http::Request<hyper::body::Incoming>,
    ) -> impl std::future::Future<Output = Response<Body>> + Send;
}
