//! The simulator's own small HTTP/1.1 accept loop: one task per connection, optional TLS, a
//! graceful drain on shutdown, and a way for a response to drop its connection unanswered.

use crate::respond::Body;
use crate::SimState;
use http::Response;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Idle keep-alive connections and slow request heads are closed after this long; also bounds
/// the TLS handshake.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// More than hyper's default of 100, so a test can send a few extra headers.
const MAX_HEADERS: usize = 128;

/// Put into a response's extensions to drop the connection without answering (the `close` fault).
#[derive(Debug, Clone, Copy)]
pub(crate) struct AbortConnection;

impl std::fmt::Display for AbortConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("connection aborted on purpose")
    }
}

impl std::error::Error for AbortConnection {}

pub(crate) fn aborted(resp: &Response<Body>) -> bool {
    resp.extensions().get::<AbortConnection>().is_some()
}

/// Flips once to stop the accept loop.
#[derive(Clone)]
pub(crate) struct Shutdown(Arc<watch::Sender<bool>>);

impl Shutdown {
    pub(crate) fn new() -> Self {
        Shutdown(Arc::new(watch::channel(false).0))
    }

    pub(crate) fn trigger(&self) {
        self.0.send_replace(true);
    }

    async fn wait(&self) {
        let mut rx = self.0.subscribe();
        let _ = rx.wait_for(|stopped| *stopped).await;
    }
}

/// Serves `state` until `shutdown` fires, then gives open connections up to `grace` to finish.
pub(crate) async fn serve(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    state: Arc<SimState>,
    shutdown: Shutdown,
    grace: Duration,
) {
    let graceful = GracefulShutdown::new();
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => stream,
                Err(_) => {
                    // Out of file descriptors and the like: back off instead of spinning.
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
            .header_read_timeout(HEADER_READ_TIMEOUT)
            .max_headers(MAX_HEADERS)
            .keep_alive(true);
        let state = state.clone();
        let service = hyper::service::service_fn(move |req| {
            let state = state.clone();
            async move {
                let resp = state.handle(req).await;
                if aborted(&resp) {
                    return Err(AbortConnection);
                }
                Ok(resp)
            }
        });
        let watcher = graceful.watcher();
        match tls.clone() {
            None => {
                let conn = builder.serve_connection(TokioIo::new(stream), service);
                tokio::spawn(async move {
                    let _ = watcher.watch(conn).await;
                });
            }
            Some(acceptor) => {
                tokio::spawn(async move {
                    let handshake =
                        tokio::time::timeout(HEADER_READ_TIMEOUT, acceptor.accept(stream)).await;
                    let Ok(Ok(stream)) = handshake else {
                        return;
                    };
                    let conn = builder.serve_connection(TokioIo::new(stream), service);
                    let _ = watcher.watch(conn).await;
                });
            }
        }
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(grace) => {}
    }
}
