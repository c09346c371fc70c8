//! The wire to the upstream: one pooled hyper-util client over rustls, behind the small
//! [`Transport`] trait so unit tests can use an in-memory fake.

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::future::Future;
use std::pin::Pin;
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
}

type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

pub struct HttpTransport {
    client: HttpsClient,
    base: String,
    max_body: usize,
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
        http.set_connect_timeout(Some(connect_timeout));
        http.set_nodelay(true);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(64)
            .build(connector);
        Ok(Self {
            client,
            base: base_url.trim_end_matches('/').to_string(),
            max_body,
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
        if declared.is_some_and(|n| n > self.max_body as u64) {
            return Err(TransportError::TooLarge);
        }
        let body = Limited::new(body, self.max_body)
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
}
