//! The HTTP/1.1 accept loop shared by the client listener and the admin listener.
//!
//! Connections are bounded by a semaphore taken *before* `accept`, so excess clients wait in the
//! kernel backlog instead of costing memory here. Each connection runs in its own task (never
//! awaited in the loop), and shutdown drains them through hyper-util's `GracefulShutdown`.
//! A connection whose peer reads nothing of its answer for `write_timeout` is closed.

use super::h1::{self, Limits, Outcome};
use crate::api::ClientApi;
use crate::respond::Body;
pub use crate::util::Shutdown;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::HttpService;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::{Instant, Sleep};

/// hyper's own default buffer limit (8 KiB + 4 KiB x 100).
const HYPER_DEFAULT_MAX_BUF: usize = 8192 + 4096 * 100;

/// What each new connection is served with; read from the live config as the connection is
/// accepted, so a reload applies to new connections while established ones go on as they are.
#[derive(Clone)]
pub struct ServeOptions {
    /// Also closes keep-alive connections idle this long (hyper starts it when waiting for a head).
    pub header_read_timeout: Duration,
    /// hyper's own hard cap on the request head; the gateway's finer 431 check runs below it.
    pub max_head_bytes: usize,
    pub max_headers: usize,
    /// A write that makes no progress this long (the client reads nothing) closes the connection.
    pub write_timeout: Duration,
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    /// On shutdown, how long in-flight connections get to finish.
    pub shutdown_grace: Duration,
}

pub use crate::respond::Handler;

/// Serves until `shutdown` fires, then waits up to `shutdown_grace` for in-flight connections.
/// At most `max_connections` at once (a permit is taken before `accept`); `options` gives each
/// new connection its settings. With `front` (the client API), each connection starts in the
/// HTTP/1.1 front ([`super::h1`]) and reaches hyper only if the front hands it over.
pub async fn serve<H: Handler>(
    listener: TcpListener,
    max_connections: usize,
    options: impl Fn() -> ServeOptions + Send + Sync + 'static,
    handler: Arc<H>,
    front: Option<ClientApi>,
    shutdown: Shutdown,
) {
    let permits = Arc::new(Semaphore::new(max_connections));
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
        let opts = options();
        let stream = WriteTimeout::new(stream, opts.write_timeout);
        let mut builder = http1::Builder::new();
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
        // Held for the connection's whole life, front included: shutdown waits for it.
        let watcher = graceful.watcher();
        let front = front.clone().map(|api| {
            let limits = Limits {
                header_read_timeout: opts.header_read_timeout,
                max_head_bytes: opts.max_head_bytes,
            };
            (api, limits, shutdown.clone())
        });
        match opts.tls {
            None => {
                tokio::spawn(async move {
                    connection(stream, builder, service, watcher, front).await;
                    drop(permit);
                });
            }
            Some(acceptor) => {
                let handshake_timeout = opts.header_read_timeout;
                tokio::spawn(async move {
                    if let Ok(Ok(tls)) =
                        tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await
                    {
                        connection(tls, builder, service, watcher, front).await;
                    }
                    drop(permit);
                });
            }
        }
    }
    drop(listener);
    let grace = options().shutdown_grace;
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(grace) => {
            tracing::warn!(grace = ?grace, "shutdown grace elapsed with connections still open");
        }
    }
}

/// One connection: in the HTTP/1.1 front when there is one, in hyper otherwise or once the
/// front hands it over.
async fn connection<IO, S>(
    mut io: IO,
    builder: http1::Builder,
    service: S,
    watcher: Watcher,
    front: Option<(ClientApi, Limits, Shutdown)>,
) where
    IO: h1::Conn + Send + 'static,
    S: HttpService<Incoming, ResBody = Body>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let Some((api, limits, shutdown)) = front else {
        let _ = watcher
            .watch(builder.serve_connection(TokioIo::new(io), service))
            .await;
        return;
    };
    if let Outcome::HandOver(read) = h1::serve(&mut io, &api, limits, &shutdown).await {
        let io = TokioIo::new(h1::Rewind::new(read, io));
        let _ = watcher.watch(builder.serve_connection(io, service)).await;
    }
}

impl h1::Conn for WriteTimeout<TcpStream> {
    fn socket(&self) -> Option<(&TcpStream, Duration)> {
        Some((&self.io, self.timeout))
    }
}

/// TLS: no `sendfile` (the bytes are encrypted in this process).
impl h1::Conn for tokio_rustls::server::TlsStream<WriteTimeout<TcpStream>> {}

/// A connection's IO whose writes fail once they have made no progress for `timeout`: the
/// peer's receive window stayed shut (it reads nothing), so hyper gets an error, stops, and the
/// connection closes. Progress of any size rearms it: a slow reader is not cut off, a stopped
/// one is. Below TLS, so a stalled handshake or TLS write counts as well.
pub struct WriteTimeout<S> {
    io: S,
    timeout: Duration,
    /// Set when a write first stalls, cleared by the next one that completes. Made on the first
    /// stall only, so connections that never stall carry no timer.
    stalled: Option<Pin<Box<Sleep>>>,
    armed: bool,
}

impl<S> WriteTimeout<S> {
    pub fn new(io: S, timeout: Duration) -> Self {
        Self {
            io,
            timeout,
            stalled: None,
            armed: false,
        }
    }

    fn progress<T>(&mut self, cx: &mut Context<'_>, r: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if r.is_ready() {
            self.armed = false;
            return r;
        }
        if !self.armed {
            // A timeout too long to represent never fires.
            let Some(at) = Instant::now().checked_add(self.timeout) else {
                return Poll::Pending;
            };
            match &mut self.stalled {
                Some(sleep) => sleep.as_mut().reset(at),
                None => self.stalled = Some(Box::pin(tokio::time::sleep_until(at))),
            }
            self.armed = true;
        }
        match self.stalled.as_mut().map(|s| s.as_mut().poll(cx)) {
            Some(Poll::Ready(())) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client read nothing of its answer within server.write_timeout",
            ))),
            _ => Poll::Pending,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for WriteTimeout<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WriteTimeout<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        self.progress(cx, r)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.progress(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.io).poll_flush(cx);
        self.progress(cx, r)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.io).poll_shutdown(cx);
        self.progress(cx, r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn a_stopped_reader_fails_the_write_a_slow_one_does_not() {
        let (near, mut far) = tokio::io::duplex(1024);
        let mut w = WriteTimeout::new(near, Duration::from_secs(1));
        let chunk = vec![b'x'; 4096];
        // A slow reader: 512 bytes every 900 ms keeps the writer going.
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 512];
            for _ in 0..24 {
                tokio::time::sleep(Duration::from_millis(900)).await;
                far.read_exact(&mut buf).await.unwrap();
            }
            far
        });
        for _ in 0..3 {
            w.write_all(&chunk[..]).await.unwrap();
        }
        let far = reader.await.unwrap();
        // It stops reading: the next write that stalls fails after 1 s.
        let started = Instant::now();
        let err = w.write_all(&chunk[..]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), Duration::from_secs(1));
        drop(far);
    }
}
