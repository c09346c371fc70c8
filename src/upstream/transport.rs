//! The wire to the upstream: one pooled hyper-util client over rustls, behind the small
//! [`Transport`] trait so unit tests can use an in-memory fake.

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

/// One request to the upstream; `path` starts with `/` and is appended to the base URL.
#[derive(Debug, Clone)]
pub struct OutRequest {
    pub method: Method,
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

#[derive(Debug, Clone)]
pub struct RawResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransportError {
    /// The request provably never reached the upstream.
    #[error("cannot connect to upstream: {0}")]
    Connect(String),
    /// The connection failed after the request may have been sent, before a response.
    #[error("upstream connection failed: {0}")]
    Closed(String),
    #[error("upstream did not answer in time")]
    Timeout,
    #[error("upstream response is larger than upstream.max_response_bytes")]
    TooLarge,
    #[error("upstream response body was cut off: {0}")]
    Truncated(String),
}

pub type TransportFuture<'a> =
    Pin<Box<dyn Future<Output = Result<RawResponse, TransportError>> + Send + 'a>>;

pub trait Transport: Send + Sync + 'static {
    /// One attempt, the whole body read, bounded by `timeout`.
    fn send(&self, req: OutRequest, timeout: Duration) -> TransportFuture<'_>;
    /// New `connect_timeout` and `max_response_bytes` (a reload, SPEC §11) for the attempts
    /// that start after it. Test transports that do not connect keep the default (nothing).
    fn reconfigure(&self, connect_timeout: Duration, max_response_bytes: usize) {
        let _ = (connect_timeout, max_response_bytes);
    }
}

type HttpsClient = Client<hyper_rustls::HttpsConnector<TimedConnector>, Full<Bytes>>;

pub struct HttpTransport {
    client: HttpsClient,
    base: String,
    /// `max_response_bytes`, checked by our own body reading, so a reload changes it at once.
    max_body: AtomicUsize,
    /// `connect_timeout` in nanoseconds, shared with the connector (which the pool clones).
    connect_timeout: Arc<AtomicU64>,
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// hyper-util's `HttpConnector` fixes its connect timeout when built; this wrapper bounds the
/// whole connect (name resolution and TCP, every address tried; the TLS handshake comes after,
/// under the attempt's `timeout`) by a timeout read at each connect, so a reload applies to the
/// next new connection. Pooled connections are kept.
#[derive(Clone)]
struct TimedConnector {
    inner: HttpConnector,
    timeout: Arc<AtomicU64>,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The error of a connect that took longer than `connect_timeout`.
#[derive(Debug, thiserror::Error)]
#[error("connect timed out")]
struct ConnectTimedOut;

impl tower_service::Service<Uri> for TimedConnector {
    type Response = TokioIo<tokio::net::TcpStream>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let timeout = Duration::from_nanos(self.timeout.load(Ordering::Relaxed));
        let connecting = self.inner.call(uri);
        Box::pin(async move {
            match tokio::time::timeout(timeout, connecting).await {
                Ok(done) => done.map_err(Into::into),
                Err(_) => Err(ConnectTimedOut.into()),
            }
        })
    }
}

impl HttpTransport {
    pub fn new(
        base_url: &str,
        ca_file: Option<&std::path::Path>,
        connect_timeout: Duration,
        max_body: usize,
    ) -> anyhow::Result<Self> {
        let tls = crate::upstream::tls::client_config(ca_file)?;
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        let connect_timeout = Arc::new(AtomicU64::new(nanos(connect_timeout)));
        let timed = TimedConnector {
            inner: http,
            timeout: connect_timeout.clone(),
        };
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(timed);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(64)
            .build(connector);
        Ok(Self {
            client,
            base: base_url.trim_end_matches('/').to_string(),
            max_body: AtomicUsize::new(max_body),
            connect_timeout,
        })
    }

    async fn attempt(&self, req: OutRequest) -> Result<RawResponse, TransportError> {
        let uri: Uri = format!("{}{}", self.base, req.path)
            .parse()
            .map_err(|e| TransportError::Connect(format!("bad upstream URI: {e}")))?;
        let mut builder = Request::builder().method(req.method).uri(uri);
        if let Some(h) = builder.headers_mut() {
            *h = req.headers;
        }
        let request = builder
            .body(Full::new(req.body))
            .map_err(|e| TransportError::Connect(e.to_string()))?;
        let max_body = self.max_body.load(Ordering::Relaxed);
        let resp = self.client.request(request).await.map_err(|e| {
            let msg = error_chain(&e);
            if e.is_connect() {
                TransportError::Connect(msg)
            } else {
                TransportError::Closed(msg)
            }
        })?;
        let (parts, body) = resp.into_parts();
        let declared = parts
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > max_body as u64) {
            return Err(TransportError::TooLarge);
        }
        let body = Limited::new(body, max_body)
            .collect()
            .await
            .map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    TransportError::TooLarge
                } else {
                    TransportError::Truncated(e.to_string())
                }
            })?
            .to_bytes();
        Ok(RawResponse {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    msg
}

impl Transport for HttpTransport {
    fn send(&self, req: OutRequest, timeout: Duration) -> TransportFuture<'_> {
        Box::pin(async move {
            tokio::time::timeout(timeout, self.attempt(req))
                .await
                .map_err(|_| TransportError::Timeout)?
        })
    }

    fn reconfigure(&self, connect_timeout: Duration, max_response_bytes: usize) {
        self.connect_timeout
            .store(nanos(connect_timeout), Ordering::Relaxed);
        self.max_body.store(max_response_bytes, Ordering::Relaxed);
    }
}
