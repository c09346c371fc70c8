//! The client API's HTTP/1.1 front.
//!
//! hyper serves every request correctly, but per request it builds a `Request` (URI, header
//! map) and a `Response` (header map) and arms a timer: for a cache hit that is most of the
//! gateway's work. This front reads the requests of a connection itself, parsed by `httparse`
//! (the parser hyper uses), and:
//! - answers a body-less HTTP/1.1 GET or HEAD that is a fresh cache hit straight from the entry
//!   ([`ClientApi::fresh_hit`]): one write of the head and the cached bytes;
//! - gives any other body-less GET or HEAD to [`ClientApi::serve`], as hyper would, and writes
//!   its answer the way hyper does (`Content-Length`, `Date`, no body for HEAD, 204 and 304);
//! - hands the connection, with every byte it has read, to hyper for anything else (another
//!   method, a request body, `Expect`, `Upgrade`, HTTP/1.0, a head it cannot parse or that
//!   outgrows the head limit), which then serves the connection to its end as before.
//!
//! Its limits are hyper's settings: `header_read_timeout` runs from when a head is first awaited
//! (so it also closes idle keep-alive connections), and on shutdown an idle connection closes at
//! once while a busy one closes after its answer (sent with `Connection: close`).

use crate::api::{ClientApi, MAX_HEADERS};
use crate::cache::FileForm;
use crate::read::{Answer, Field};
use crate::respond::Body;
use crate::util::Shutdown;
use bytes::{Buf, Bytes};
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode};
use http_body_util::Empty;
use std::cell::RefCell;
use std::future::Future;
use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, Interest, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

/// Bytes read at a time; the buffer grows past it only for a head that needs more.
const READ_CHUNK: usize = 8 * 1024;

/// What the front needs of the server settings.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub header_read_timeout: Duration,
    /// A head not complete within this many bytes goes to hyper (which answers 431).
    pub max_head_bytes: usize,
}

/// How a connection left the front.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Closed: by the client, an error, the head timeout, `Connection: close` or shutdown.
    Closed,
    /// To be served by hyper from here on: the bytes read and not answered come first.
    HandOver(Bytes),
}

/// A connection the front serves: any stream; a plaintext one also lends its socket (and its
/// write timeout) for `sendfile`.
pub trait Conn: AsyncRead + AsyncWrite + Unpin {
    fn socket(&self) -> Option<(&TcpStream, Duration)> {
        None
    }
}

/// Serves requests from `io` until the connection closes or must go to hyper.
pub async fn serve<IO: Conn>(
    io: &mut IO,
    api: &ClientApi,
    limits: Limits,
    shutdown: &Shutdown,
) -> Outcome {
    let mut buf = vec![0u8; READ_CHUNK];
    // Unanswered bytes are `buf[pos..filled]`.
    let (mut pos, mut filled) = (0usize, 0usize);
    let mut out = Vec::with_capacity(512);
    let mut waits = Waits::new(Instant::now() + limits.header_read_timeout, shutdown);
    loop {
        if pos < filled {
            let mut slots = [MaybeUninit::<httparse::Header<'_>>::uninit(); MAX_HEADERS];
            let mut req = httparse::Request::new(&mut []);
            let len = match req.parse_with_uninit_headers(&buf[pos..filled], &mut slots) {
                Ok(httparse::Status::Complete(len)) => len,
                Ok(httparse::Status::Partial) if filled - pos < limits.max_head_bytes => 0,
                // Too large, too many headers, or malformed: hyper answers it as it always has.
                _ => return Outcome::HandOver(Bytes::copy_from_slice(&buf[pos..filled])),
            };
            if len > 0 {
                let Some(plain) = Plain::of(&req) else {
                    return Outcome::HandOver(Bytes::copy_from_slice(&buf[pos..filled]));
                };
                let started = Instant::now();
                // A query is checked as hyper checks it (the path of a fast hit is checked by
                // the router); a target hyper would refuse goes to hyper.
                let fast_path = match plain.target.bytes().position(|b| b == b'?') {
                    None => Some(plain.target),
                    Some(q) => plain
                        .target
                        .parse::<http::uri::PathAndQuery>()
                        .is_ok()
                        .then(|| &plain.target[..q]),
                };
                let hit = match fast_path {
                    Some(path) => {
                        let sendfile = io.socket().is_some();
                        api.fresh_hit(plain.head, path, req.headers, started, sendfile)
                            .await
                    }
                    None => None,
                };
                let reply = match hit {
                    Some(hit) => Reply::Hit(hit),
                    None => {
                        let Some(request) = plain.request(req.headers) else {
                            return Outcome::HandOver(Bytes::copy_from_slice(&buf[pos..filled]));
                        };
                        Reply::Served(api.serve(request).await)
                    }
                };
                // Shutdown may have come while the answer was made.
                let close = plain.close || shutdown.is_triggered();
                let written = match reply {
                    Reply::Hit((answer, request_id)) => {
                        write_answer(io, &mut out, answer, &request_id, close).await
                    }
                    Reply::Served(resp) => {
                        write_response(io, &mut out, resp, plain.head, close).await
                    }
                };
                if written.is_err() || close {
                    let _ = io.shutdown().await;
                    return Outcome::Closed;
                }
                pos += len;
                if pos == filled {
                    (pos, filled) = (0, 0);
                }
                // The next head is awaited from when this answer was written.
                waits
                    .head
                    .restart(Instant::now() + limits.header_read_timeout);
                continue;
            }
        }
        // More bytes for the head: make room, then read (or stop).
        if buf.len() - filled < READ_CHUNK / 8 {
            buf.copy_within(pos..filled, 0);
            (pos, filled) = (0, filled - pos);
            if buf.len() - filled < READ_CHUNK / 8 {
                buf.resize(buf.len() + READ_CHUNK, 0);
            }
        }
        let idle = pos == filled;
        let read = std::future::poll_fn(|cx| {
            let mut rb = ReadBuf::new(&mut buf[filled..]);
            match Pin::new(&mut *io).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => Poll::Ready(Some(rb.filled().len())),
                Poll::Ready(Err(_)) => Poll::Ready(None),
                Poll::Pending if waits.stop(cx, idle) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            }
        })
        .await;
        match read {
            Some(n) if n > 0 => filled += n,
            // End of stream, an error, the head timeout or shutdown.
            _ => return Outcome::Closed,
        }
    }
}

/// An answer to write: a fresh hit and its request id, or what [`ClientApi::serve`] answered.
enum Reply {
    Hit((Answer, HeaderValue)),
    Served(http::Response<Body>),
}

/// A request head the front serves itself: HTTP/1.1, GET or HEAD, no body, no upgrade.
struct Plain<'a> {
    head: bool,
    target: &'a str,
    /// `Connection: close`.
    close: bool,
}

impl<'a> Plain<'a> {
    fn of(req: &httparse::Request<'_, 'a>) -> Option<Self> {
        let head = match req.method? {
            "GET" => false,
            "HEAD" => true,
            _ => return None,
        };
        let target = req.path.filter(|p| p.starts_with('/'))?;
        if req.version != Some(1) {
            return None;
        }
        let mut close = false;
        for h in req.headers.iter() {
            let name = h.name.as_bytes();
            let is = |n: &HeaderName| name.eq_ignore_ascii_case(n.as_str().as_bytes());
            if is(&header::CONTENT_LENGTH)
                || is(&header::TRANSFER_ENCODING)
                || is(&header::EXPECT)
                || is(&header::UPGRADE)
            {
                return None;
            }
            if is(&header::CONNECTION) {
                for token in h.value.split(|&b| b == b',') {
                    let token = token.trim_ascii();
                    if token.eq_ignore_ascii_case(b"close") {
                        close = true;
                    } else if token.eq_ignore_ascii_case(b"upgrade") {
                        return None;
                    }
                }
            }
        }
        Some(Plain {
            head,
            target,
            close,
        })
    }

    /// The request as hyper would have built it; `None` for a target or a header that hyper
    /// would refuse (it then answers it itself).
    fn request(&self, raw: &[httparse::Header<'_>]) -> Option<Request<Empty<Bytes>>> {
        let uri: http::Uri = self.target.parse().ok()?;
        let mut headers = HeaderMap::with_capacity(raw.len());
        for h in raw {
            headers.append(
                HeaderName::from_bytes(h.name.as_bytes()).ok()?,
                HeaderValue::from_bytes(h.value).ok()?,
            );
        }
        let mut req = Request::new(Empty::new());
        *req.method_mut() = if self.head { Method::HEAD } else { Method::GET };
        *req.uri_mut() = uri;
        *req.headers_mut() = headers;
        Some(req)
    }
}

/// What a wait for request bytes stops on besides the bytes: the head timeout and shutdown.
/// Neither timer nor shutdown signal is touched per request: the timer is moved only when it
/// fires before the current deadline, and each is polled again only after it woke the task.
struct Waits {
    head: HeadDeadline,
    shutdown: Shutdown,
    shutdown_wait: Pin<Box<dyn Future<Output = ()> + Send>>,
    shutdown_watched: bool,
}

impl Waits {
    fn new(deadline: Instant, shutdown: &Shutdown) -> Self {
        let signal = shutdown.clone();
        Self {
            head: HeadDeadline::new(deadline),
            shutdown: shutdown.clone(),
            shutdown_wait: Box::pin(async move { signal.wait().await }),
            shutdown_watched: false,
        }
    }

    /// True when the wait must end: the head deadline passed, or shutdown came while `idle`
    /// (no part of a request read).
    fn stop(&mut self, cx: &mut Context<'_>, idle: bool) -> bool {
        if self.head.poll_passed(cx) {
            return true;
        }
        let shutting_down = if self.shutdown_watched {
            self.shutdown.is_triggered()
        } else {
            self.shutdown_watched = true;
            self.shutdown_wait.as_mut().poll(cx).is_ready()
        };
        shutting_down && idle
    }
}

/// The head deadline of a connection: one timer for the connection's life.
struct HeadDeadline {
    at: Instant,
    timer: Pin<Box<Sleep>>,
    /// The timer holds this task's waker (it was polled since it was last set).
    watched: bool,
}

impl HeadDeadline {
    fn new(at: Instant) -> Self {
        Self {
            at,
            timer: Box::pin(tokio::time::sleep_until(at)),
            watched: false,
        }
    }

    /// A new deadline, never earlier than the last: the timer is left where it is (it fires
    /// early, and is moved then).
    fn restart(&mut self, at: Instant) {
        self.at = self.at.max(at);
    }

    fn poll_passed(&mut self, cx: &mut Context<'_>) -> bool {
        if self.watched && !self.timer.is_elapsed() {
            return false;
        }
        loop {
            match self.timer.as_mut().poll(cx) {
                Poll::Ready(()) if self.timer.deadline() >= self.at => return true,
                Poll::Ready(()) => self.timer.as_mut().reset(self.at),
                Poll::Pending => {
                    self.watched = true;
                    return false;
                }
            }
        }
    }
}

/// The head of an answer, as hyper writes it: the status line, the headers, then
/// `Content-Length` (unless given, or not allowed), `Connection: close` and `Date`.
struct HeadWriter<'a> {
    out: &'a mut Vec<u8>,
    has_length: bool,
    has_date: bool,
}

impl<'a> HeadWriter<'a> {
    fn new(out: &'a mut Vec<u8>, status: StatusCode) -> Self {
        out.clear();
        out.extend_from_slice(b"HTTP/1.1 ");
        out.extend_from_slice(status.as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
        out.extend_from_slice(b"\r\n");
        Self {
            out,
            has_length: false,
            has_date: false,
        }
    }

    fn header(&mut self, name: &HeaderName, value: &HeaderValue) {
        self.note(name);
        self.out.extend_from_slice(name.as_str().as_bytes());
        self.out.extend_from_slice(b": ");
        self.out.extend_from_slice(value.as_bytes());
        self.out.extend_from_slice(b"\r\n");
    }

    /// [`header`](Self::header) with the line's start already written out.
    fn field(&mut self, field: &Field, value: &HeaderValue) {
        self.note(&field.name);
        self.out.extend_from_slice(field.line);
        self.out.extend_from_slice(value.as_bytes());
        self.out.extend_from_slice(b"\r\n");
    }

    fn note(&mut self, name: &HeaderName) {
        self.has_length |= name == header::CONTENT_LENGTH;
        self.has_date |= name == header::DATE;
    }

    fn finish(self, length: Option<usize>, close: bool, date: SystemTime) {
        if let (Some(n), false) = (length, self.has_length) {
            self.out.extend_from_slice(b"content-length: ");
            let mut digits = [0u8; 20];
            self.out.extend_from_slice(decimal(n, &mut digits));
            self.out.extend_from_slice(b"\r\n");
        }
        if close {
            self.out.extend_from_slice(b"connection: close\r\n");
        }
        if !self.has_date {
            self.out.extend_from_slice(b"date: ");
            with_date(date, |d| self.out.extend_from_slice(d));
            self.out.extend_from_slice(b"\r\n");
        }
        self.out.extend_from_slice(b"\r\n");
    }
}

/// hyper's rules: no length and no body for 1xx, 204 and 304; a HEAD answer keeps the length
/// it was given and gets none of its own when its body is empty.
fn body_rules(status: StatusCode, head: bool, body_len: usize) -> (Option<usize>, bool) {
    let bodiless_status = status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let length = if bodiless_status || (head && body_len == 0) {
        None
    } else {
        Some(body_len)
    };
    (length, !bodiless_status && !head)
}

async fn write_answer<IO: Conn>(
    io: &mut IO,
    out: &mut Vec<u8>,
    answer: Answer,
    request_id: &HeaderValue,
    close: bool,
) -> io::Result<()> {
    let mut w = HeadWriter::new(out, answer.status);
    answer.for_each_header(|field, value| w.field(field, value));
    w.field(&Field::X_REQUEST_ID, request_id);
    // A HEAD answer carries its length among its headers, and has no body here.
    let (length, send_body) = body_rules(answer.status, false, answer.body.len());
    w.finish(length, close, answer.at);
    if let (Some(file), Some((socket, timeout))) = (&answer.file, io.socket()) {
        return send_file(socket, timeout, out, file).await;
    }
    write_all(io, out, send_body.then_some(&answer.body)).await
}

/// The head (held back with `MSG_MORE`), then the body from its file form with `sendfile`: the
/// kernel passes the file's pages to the socket, copying nothing. A wait for the socket longer
/// than `timeout` (the client reads nothing) fails the write, as for any answer.
async fn send_file(
    socket: &TcpStream,
    timeout: Duration,
    head: &[u8],
    file: &FileForm,
) -> io::Result<()> {
    let mut sent = 0;
    while sent < head.len() {
        let more = socket.try_io(Interest::WRITABLE, || {
            rustix::net::send(socket, &head[sent..], rustix::net::SendFlags::MORE)
                .map_err(io::Error::from)
        });
        match more {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => sent += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => writable(socket, timeout).await?,
            Err(e) => return Err(e),
        }
    }
    let len = file.len() as u64;
    let mut offset = 0u64;
    while offset < len {
        let left = usize::try_from(len - offset).unwrap_or(usize::MAX);
        let more = socket.try_io(Interest::WRITABLE, || {
            rustix::fs::sendfile(socket, file.file(), Some(&mut offset), left)
                .map_err(io::Error::from)
        });
        match more {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => writable(socket, timeout).await?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

async fn writable(socket: &TcpStream, timeout: Duration) -> io::Result<()> {
    match tokio::time::timeout(timeout, socket.writable()).await {
        Ok(ready) => ready,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the client read nothing of its answer within server.write_timeout",
        )),
    }
}

async fn write_response<IO: AsyncWrite + Unpin>(
    io: &mut IO,
    out: &mut Vec<u8>,
    resp: http::Response<Body>,
    head: bool,
    close: bool,
) -> io::Result<()> {
    let (parts, body) = resp.into_parts();
    let mut w = HeadWriter::new(out, parts.status);
    for (name, value) in &parts.headers {
        w.header(name, value);
    }
    let (length, send_body) = body_rules(parts.status, head, body.len());
    w.finish(length, close, SystemTime::now());
    write_all(io, out, send_body.then_some(&body)).await
}

/// Writes `head` then the body's chunks, up to 16 parts per (vectored) write.
async fn write_all<IO: AsyncWrite + Unpin>(
    io: &mut IO,
    head: &[u8],
    body: Option<&Body>,
) -> io::Result<()> {
    const BATCH: usize = 16;
    if body.is_none_or(|b| b.chunk(1).is_none()) {
        return write_two(
            io,
            head,
            body.and_then(|b| b.chunk(0)).map_or(&[], |c| c.as_ref()),
        )
        .await;
    }
    // Part 0 is the head, part i + 1 the body's chunk i (indices, not an iterator: nothing
    // borrowed by a closure lives across the writes).
    let mut next = 0;
    loop {
        let mut window: [&[u8]; BATCH] = [&[]; BATCH];
        let mut count = 0;
        while count < BATCH {
            let Some(p) = part(head, body, next) else {
                break;
            };
            next += 1;
            if !p.is_empty() {
                window[count] = p;
                count += 1;
            }
        }
        if count == 0 {
            return io.flush().await;
        }
        // `window[first..count]` is still to be written.
        let mut first = 0;
        while first < count {
            let mut slices = [IoSlice::new(&[]); BATCH];
            for (slice, part) in slices.iter_mut().zip(&window[first..count]) {
                *slice = IoSlice::new(part);
            }
            let mut n = io.write_vectored(&slices[..count - first]).await?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            while first < count && n >= window[first].len() {
                n -= window[first].len();
                first += 1;
            }
            if first < count {
                window[first] = &window[first][n..];
            }
        }
    }
}

/// The common case: a head and at most one chunk.
async fn write_two<IO: AsyncWrite + Unpin>(
    io: &mut IO,
    mut head: &[u8],
    mut body: &[u8],
) -> io::Result<()> {
    while !head.is_empty() || !body.is_empty() {
        let n = io
            .write_vectored(&[IoSlice::new(head), IoSlice::new(body)])
            .await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        let from_head = n.min(head.len());
        head = &head[from_head..];
        body = &body[n - from_head..];
    }
    io.flush().await
}

fn part<'a>(head: &'a [u8], body: Option<&'a Body>, i: usize) -> Option<&'a [u8]> {
    match i {
        0 => Some(head),
        _ => body.and_then(|b| b.chunk(i - 1)).map(|c| c.as_ref()),
    }
}

/// `n` in decimal, in `digits`.
fn decimal(mut n: usize, digits: &mut [u8; 20]) -> &[u8] {
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &digits[i..];
        }
    }
}

/// The `Date` value of `now` (an IMF-fixdate), made once a second per thread.
fn with_date<R>(now: SystemTime, f: impl FnOnce(&[u8]) -> R) -> R {
    thread_local! {
        static DATE: RefCell<(u64, [u8; 29])> = const { RefCell::new((u64::MAX, [0; 29])) };
    }
    let secs = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    DATE.with(|d| {
        let mut d = d.borrow_mut();
        if d.0 != secs {
            let text = httpdate::fmt_http_date(now);
            if text.len() == 29 {
                d.1.copy_from_slice(text.as_bytes());
                d.0 = secs;
            }
        }
        f(&d.1)
    })
}

/// An IO whose first reads return `prefix`: how a connection reaches hyper with the bytes the
/// front already read.
pub struct Rewind<S> {
    prefix: Bytes,
    io: S,
}

impl<S> Rewind<S> {
    pub fn new(prefix: Bytes, io: S) -> Self {
        Self { prefix, io }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimals() {
        let mut d = [0u8; 20];
        assert_eq!(decimal(0, &mut d), b"0");
        assert_eq!(decimal(8192, &mut d), b"8192");
        assert_eq!(
            decimal(usize::MAX, &mut d),
            usize::MAX.to_string().as_bytes()
        );
    }

    #[test]
    fn lengths_and_bodies_follow_hyper() {
        assert_eq!(body_rules(StatusCode::OK, false, 5), (Some(5), true));
        assert_eq!(body_rules(StatusCode::OK, false, 0), (Some(0), true));
        assert_eq!(body_rules(StatusCode::OK, true, 0), (None, false));
        assert_eq!(
            body_rules(StatusCode::NOT_MODIFIED, false, 0),
            (None, false)
        );
        assert_eq!(body_rules(StatusCode::NO_CONTENT, false, 0), (None, false));
        assert_eq!(body_rules(StatusCode::NOT_FOUND, true, 0), (None, false));
    }

    #[test]
    fn the_date_is_an_imf_fixdate() {
        let d = with_date(SystemTime::now(), |d| {
            String::from_utf8(d.to_vec()).unwrap()
        });
        assert_eq!(d.len(), 29);
        assert!(d.ends_with(" GMT"), "{d}");
        assert!(httpdate::parse_http_date(&d).is_ok());
    }
}
