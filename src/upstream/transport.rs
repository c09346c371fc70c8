//! The wire to the upstream: one pooled hyper-util client over rustls, behind the small
//! [`Transport`] trait so unit tests can use an in-memory fake.
//!
//! Connections are kept alive and reused (`pool_max_idle_per_host`); each response is counted
//! in `upstream_connections_total` by whether it came on a new connection or a reused one.

use crate::observe::Metrics;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
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
    /// The metrics a transport with connections reports into (`upstream_connections_total`);
    /// called once, when the [`super::Upstream`] over it is built. Others ignore it.
    fn attach_metrics(&self, metrics: &Metrics) {
        let _ = metrics;
    }
}

type HttpsClient = Client<hyper_rustls::HttpsConnector<TimedConnector>, Full<Bytes>>;

pub struct HttpTransport {
    client: HttpsClient,
    base: String,
    /// `Host` for every request, made once (hyper-util would format it per request).
    host: Option<HeaderValue>,
    metrics: OnceLock<Metrics>,
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

/// Responses received on one connection so far, shared by the connection and (through hyper's
/// connection info) every response that comes on it.
#[derive(Clone, Debug, Default)]
struct ConnUses(Arc<AtomicU64>);

/// A connection to the upstream that tells hyper-util, through its connection info, how to
/// count the responses it carries.
struct CountedIo {
    io: TokioIo<tokio::net::TcpStream>,
    uses: ConnUses,
}

impl Connection for CountedIo {
    fn connected(&self) -> Connected {
        self.io.connected().extra(self.uses.clone())
    }
}

impl hyper::rt::Read for CountedIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for CountedIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }
}

impl tower_service::Service<Uri> for TimedConnector {
    type Response = CountedIo;
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
                Ok(done) => done.map_err(Into::into).map(|io| CountedIo {
                    io,
                    uses: ConnUses::default(),
                }),
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
        let base = base_url.trim_end_matches('/').to_string();
        let host = base
            .parse::<Uri>()
            .ok()
            .and_then(|u| u.authority().map(|a| a.as_str().to_string()))
            .and_then(|a| HeaderValue::from_str(&a).ok());
        Ok(Self {
            client,
            base,
            host,
            metrics: OnceLock::new(),
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
            if let Some(host) = &self.host {
                h.entry(http::header::HOST).or_insert_with(|| host.clone());
            }
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
        self.count_connection(resp.extensions().get::<ConnUses>());
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

impl HttpTransport {
    /// One response: on a new connection (its first) or a reused one.
    fn count_connection(&self, uses: Option<&ConnUses>) {
        let (Some(m), Some(uses)) = (self.metrics.get(), uses) else {
            return;
        };
        if uses.0.fetch_add(1, Ordering::Relaxed) == 0 {
            m.upstream_connections_new.inc();
        } else {
            m.upstream_connections_reused.inc();
        }
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

    fn attach_metrics(&self, metrics: &Metrics) {
        let _ = self.metrics.set(metrics.clone());
    }
}
