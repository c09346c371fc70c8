//! The HTTP/1.1 accept loop shared by the client listener and the admin listener.
//!
//! Connections are bounded by a semaphore taken *before* `accept`, so excess clients wait in the
//! kernel backlog instead of costing memory here. Each connection runs in its own task (never
//! awaited in the loop), and shutdown drains them through hyper-util's `GracefulShutdown`.

use crate::respond::Body;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

/// hyper's own default buffer limit (8 KiB + 4 KiB x 100).
const HYPER_DEFAULT_MAX_BUF: usize = 8192 + 4096 * 100;

#[derive(Clone)]
pub struct ServeOptions {
    pub max_connections: usize,
    /// Also closes keep-alive connections idle this long (hyper starts it when waiting for a head).
    pub header_read_timeout: Duration,
    /// hyper's own hard cap on the request head; the gateway's finer 431 check runs below it.
    pub max_head_bytes: usize,
    pub max_headers: usize,
    pub tls: Option<tokio_rustls::TlsAcceptor>,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            max_connections: 10_000,
            header_read_timeout: Duration::from_secs(5),
            max_head_bytes: 64 * 1024,
            max_headers: 128,
            tls: None,
        }
    }
}

/// A request handler that always produces a response (errors are already responses).
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, req: Request<Incoming>) -> impl Future<Output = Response<Body>> + Send;
}

/// Flips once to ask every server loop to stop accepting and drain.
#[derive(Clone)]
pub struct Shutdown {
    tx: Arc<watch::Sender<bool>>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Self::new()
    }
}

impl Shutdown {
    pub fn new() -> Self {
        Self {
            tx: Arc::new(watch::channel(false).0),
        }
    }

    pub fn trigger(&self) {
        self.tx.send_replace(true);
    }

    pub fn is_triggered(&self) -> bool {
        *self.tx.borrow()
    }

    pub async fn wait(&self) {
        let mut rx = self.tx.subscribe();
        let _ = rx.wait_for(|v| *v).await;
    }
}

/// Serves until `shutdown` fires, then waits up to `grace` for in-flight connections.
pub async fn serve<H: Handler>(
    listener: TcpListener,
    opts: ServeOptions,
    handler: Arc<H>,
    shutdown: Shutdown,
    grace: Duration,
) {
    let permits = Arc::new(Semaphore::new(opts.max_connections));
    let graceful = GracefulShutdown::new();
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            _ = shutdown.wait() => break,
        };
        let (stream, _peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
            _ = shutdown.wait() => break,
        };
        let _ = stream.set_nodelay(true);
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(opts.header_read_timeout)
            // Also caps hyper's write queue: keep it at least hyper's default (~400 KiB), or
            // large bodies are written in more, smaller syscalls.
            .max_buf_size(opts.max_head_bytes.max(HYPER_DEFAULT_MAX_BUF))
            .max_headers(opts.max_headers)
            .keep_alive(true);
        let handler = handler.clone();
        let service = hyper::service::service_fn(move |req| {
            let handler = handler.clone();
            async move { Ok::<_, std::convert::Infallible>(handler.handle(req).await) }
        });
        let watcher = graceful.watcher();
        match opts.tls.clone() {
            None => {
                let conn = builder.serve_connection(TokioIo::new(stream), service);
                tokio::spawn(async move {
                    let _ = watcher.watch(conn).await;
                    drop(permit);
                });
            }
            Some(acceptor) => {
                let handshake_timeout = opts.header_read_timeout;
                tokio::spawn(async move {
                    let tls = match tokio::time::timeout(handshake_timeout, acceptor.accept(stream))
                        .await
                    {
                        Ok(Ok(tls)) => tls,
                        _ => return,
                    };
                    let conn = builder.serve_connection(TokioIo::new(tls), service);
                    let _ = watcher.watch(conn).await;
                    drop(permit);
                });
            }
        }
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(grace) => {
            tracing::warn!(grace = ?grace, "shutdown grace elapsed with connections still open");
        }
    }
}
