//! The client API's HTTP/1.1 front (`runtime::h1`), byte for byte over raw sockets: pipelining,
//! heads in pieces, the hand-over to hyper, framing (HEAD, 304, lengths, `Date`), `Connection:
//! close`, query strings, header names in any case, shutdown, the head timeout, and the metrics
//! of the hits it answers itself.

use crate::common::*;
use std::net::SocketAddr;
use std::time::Duration;
use thingspace_gateway::runtime::Running;
use thingspace_sim::control::FaultRequest;
use thingspace_sim::Simulator;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

/// The bound on any one wait for the gateway: far above any answer's time, so a hang fails the
/// test instead of stalling it.
const WAIT: Duration = Duration::from_secs(15);

/// One answer as it came off the wire.
struct Raw {
    status_line: String,
    status: u16,
    /// In order, names lower-cased.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

/// The head, and the body's length and first bytes (a page is too long for a failure message).
impl std::fmt::Debug for Raw {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Raw")
            .field("status_line", &self.status_line)
            .field("headers", &self.headers)
            .field("body_len", &self.body.len())
            .field(
                "body_start",
                &String::from_utf8_lossy(&self.body[..self.body.len().min(200)]),
            )
            .finish()
    }
}

impl Raw {
    /// The one value of `name`; panics when it appears more than once.
    fn header(&self, name: &str) -> Option<&str> {
        let all = self.all(name);
        assert!(all.len() <= 1, "{name} {} times: {self:?}", all.len());
        all.first().copied()
    }

    fn all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// The header names, sorted.
    fn names(&self) -> Vec<&str> {
        let mut n: Vec<&str> = self.headers.iter().map(|(n, _)| n.as_str()).collect();
        n.sort_unstable();
        n
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }

    fn length(&self) -> Option<usize> {
        self.header("content-length")
            .map(|v| v.parse().expect("a decimal content-length"))
    }
}

/// A client connection that writes exact bytes and reads answers framed as HTTP/1.1 says.
struct Conn {
    r: OwnedReadHalf,
    /// `None` once given to a writer task ([`Conn::take_writer`]).
    w: Option<OwnedWriteHalf>,
    /// Read and not yet consumed.
    buf: Vec<u8>,
}

impl Conn {
    async fn open(addr: SocketAddr) -> Conn {
        let s = TcpStream::connect(addr).await.expect("connect");
        s.set_nodelay(true).expect("nodelay");
        let (r, w) = s.into_split();
        Conn {
            r,
            w: Some(w),
            buf: Vec::new(),
        }
    }

    fn w(&mut self) -> &mut OwnedWriteHalf {
        self.w.as_mut().expect("the writer")
    }

    fn take_writer(&mut self) -> OwnedWriteHalf {
        self.w.take().expect("the writer")
    }

    async fn send(&mut self, bytes: impl AsRef<[u8]>) {
        tokio::time::timeout(WAIT, self.w().write_all(bytes.as_ref()))
            .await
            .expect("write in time")
            .expect("write");
    }

    /// Reads more; 0 at the end of the stream (or a reset).
    async fn fill(&mut self) -> usize {
        let mut chunk = [0u8; 16 * 1024];
        match tokio::time::timeout(WAIT, self.r.read(&mut chunk))
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "no answer within {WAIT:?}; read so far: {:?}",
                    String::from_utf8_lossy(&self.buf)
                )
            }) {
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                n
            }
            Err(_) => 0,
        }
    }

    /// The next answer; `head` when it answers a HEAD (no body whatever its length). Checks
    /// what every answer must have: one `Date` (an IMF-fixdate), at most one `Content-Length`,
    /// no chunked framing (the gateway's bodies all have a known length).
    async fn answer(&mut self, head: bool) -> Raw {
        let end = loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
            let n = self.fill().await;
            assert!(
                n > 0,
                "closed before a whole head: {:?}",
                String::from_utf8_lossy(&self.buf)
            );
        };
        let head_text = String::from_utf8(self.buf[..end].to_vec()).expect("an ASCII head");
        self.buf.drain(..end + 4);
        let mut lines = head_text.split("\r\n");
        let status_line = lines.next().unwrap_or_default().to_string();
        let status: u16 = status_line
            .get(9..12)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("a status line: {status_line:?}"));
        let headers: Vec<(String, String)> = lines
            .map(|l| {
                let (n, v) = l
                    .split_once(':')
                    .unwrap_or_else(|| panic!("a header line: {l:?}"));
                (n.to_ascii_lowercase(), v.trim().to_string())
            })
            .collect();
        let mut raw = Raw {
            status_line,
            status,
            headers,
            body: Vec::new(),
        };
        let dates = raw.all("date");
        assert_eq!(dates.len(), 1, "one date header: {raw:?}");
        assert!(
            httpdate::parse_http_date(dates[0]).is_ok(),
            "an HTTP date: {raw:?}"
        );
        assert!(raw.all("content-length").len() <= 1, "{raw:?}");
        assert!(raw.header("transfer-encoding").is_none(), "{raw:?}");
        let bodiless = head || status == 204 || status == 304 || (100..200).contains(&status);
        if bodiless {
            return raw;
        }
        match raw.length() {
            Some(n) => {
                while self.buf.len() < n {
                    let got = self.fill().await;
                    assert!(got > 0, "closed within a body of {n} bytes: {raw:?}");
                }
                raw.body = self.buf.drain(..n).collect();
            }
            // Close-delimited (HTTP/1.0).
            None => {
                while self.fill().await > 0 {}
                raw.body = std::mem::take(&mut self.buf);
            }
        }
        raw
    }

    /// The server closes the connection, with no byte after what was read.
    async fn closed(&mut self) {
        let n = self.fill().await;
        assert_eq!(
            (n, String::from_utf8_lossy(&self.buf).to_string()),
            (0, String::new()),
            "closed, with nothing more"
        );
    }
}

/// `GET path` as HTTP/1.1, with `extra` header lines (each ending in CRLF).
fn get(path: &str, extra: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: gw\r\n{extra}\r\n")
}

fn head(path: &str, extra: &str) -> String {
    format!("HEAD {path} HTTP/1.1\r\nHost: gw\r\n{extra}\r\n")
}

async fn setup(extra: &str) -> (Simulator, Running, String) {
    let sim = start_sim(sim_opts()).await;
    let gw = start_gateway(config(&sim.base_url(), extra)).await;
    wait_ready(&gw).await;
    let account = sim.account_names()[0].clone();
    (sim, gw, account)
}

/// Every test here makes the gateway log in: none was refused, the user never locked.
fn no_lockout(sim: &Simulator) {
    assert_eq!((sim.rejected_logins(), sim.lock_events()), (0, 0));
}

/// A 200 page from the cache (or not), with the headers of a cached answer.
fn assert_page(r: &Raw, x_cache: &str, body: &[u8]) {
    assert_eq!(r.status_line, "HTTP/1.1 200 OK", "{r:?}");
    assert_eq!(r.header("x-cache"), Some(x_cache), "{r:?}");
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.header("vary"), Some("accept-encoding"));
    assert!(
        r.header("etag").is_some_and(|e| e.starts_with('"')),
        "{r:?}"
    );
    assert!(r.header("age").is_some(), "{r:?}");
    assert!(r
        .header("cache-control")
        .is_some_and(|v| v.starts_with("private, max-age=")));
    assert!(r.header("x-request-id").is_some_and(|v| !v.is_empty()));
    assert!(r.header("content-encoding").is_none(), "{r:?}");
    assert_eq!(r.length(), Some(body.len()));
    assert_eq!(r.body, body);
}

fn assert_error(r: &Raw, status_line: &str, code: &str) {
    assert_eq!(r.status_line, status_line, "{r:?}");
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.json()["errorCode"], code, "{r:?}");
    assert_eq!(r.length(), Some(r.body.len()));
}

/// The page's body, fetched once (a miss) on its own connection.
async fn warm(gw: &Running, path: &str) -> Raw {
    let mut c = Conn::open(gw.addr).await;
    c.send(get(path, "")).await;
    let r = c.answer(false).await;
    assert_eq!(r.status, 200, "{r:?}");
    r
}

// ---------------------------------------------------------------------------------------------
// 1. Pipelining

#[tokio::test]
async fn pipelined_gets_are_answered_in_order_each_framed_by_its_length() {
    let (sim, gw, account) = setup("").await;
    let page = license_path(&account, 0);
    let mut c = Conn::open(gw.addr).await;
    // A miss, two hits of the same page and a 404, in one write.
    let batch = [
        get(&page, "x-request-id: p1\r\n"),
        get(&page, "x-request-id: p2\r\n"),
        get(&page, "x-request-id: p3\r\n"),
        get("/api/fota/v1/nothing-here", "x-request-id: p4\r\n"),
    ]
    .concat();
    c.send(batch).await;
    let miss = c.answer(false).await;
    assert!(miss.body.len() > 1000);
    assert_page(&miss, "MISS", &miss.body.clone());
    assert_eq!(miss.header("x-request-id"), Some("p1"));
    for id in ["p2", "p3"] {
        let hit = c.answer(false).await;
        assert_page(&hit, "HIT", &miss.body);
        assert_eq!(hit.header("etag"), miss.header("etag"));
        assert_eq!(hit.header("x-request-id"), Some(id));
    }
    let nf = c.answer(false).await;
    assert_error(&nf, "HTTP/1.1 404 Not Found", "GW_NOT_FOUND");
    assert_eq!(
        nf.json(),
        serde_json::json!({"errorCode": "GW_NOT_FOUND", "errorMessage": "no such route"})
    );
    assert_eq!(nf.header("x-request-id"), Some("p4"));
    assert!(c.buf.is_empty(), "no stray bytes: {:?}", c.buf);

    // Once cached, hits, HEADs and a 404 mixed in one write; the connection stays usable.
    let batch = [
        head(&page, ""),
        get("/nope", ""),
        get(&page, ""),
        head("/nope", ""),
        get(&page, ""),
    ]
    .concat();
    c.send(batch).await;
    let h = c.answer(true).await;
    assert_eq!(h.status_line, "HTTP/1.1 200 OK");
    assert_eq!(h.length(), Some(miss.body.len()));
    assert_error(
        &c.answer(false).await,
        "HTTP/1.1 404 Not Found",
        "GW_NOT_FOUND",
    );
    assert_page(&c.answer(false).await, "HIT", &miss.body);
    let h = c.answer(true).await;
    assert_eq!(h.status_line, "HTTP/1.1 404 Not Found");
    assert_page(&c.answer(false).await, "HIT", &miss.body);
    assert!(c.buf.is_empty(), "no stray bytes: {:?}", c.buf);
    assert_eq!(sim.count("licenses"), 1);
    no_lockout(&sim);
}

/// Hundreds of requests of uneven sizes in one write, far more than the front reads at a time:
/// heads straddle its reads and its buffer's ends, and every one is answered, in order.
#[tokio::test]
async fn a_long_pipeline_straddling_reads_is_answered_in_order() {
    let (sim, gw, account) = setup("").await;
    let page = license_path(&account, 0);
    let etag = warm(&gw, &page)
        .await
        .header("etag")
        .expect("etag")
        .to_string();
    const COUNT: usize = 400;
    // Small answers (304, 404, HEAD) so that the answers, not the requests, stay small.
    let mut batch = Vec::new();
    let mut kinds = Vec::new();
    for i in 0..COUNT {
        let pad = "p".repeat((i * 7919) % 3000);
        let extra = format!("x-request-id: n{i}\r\nx-pad: {pad}\r\n");
        let (req, kind) = match i % 3 {
            0 => (
                get(&page, &format!("{extra}if-none-match: {etag}\r\n")),
                304,
            ),
            1 => (get("/nope", &extra), 404),
            _ => (head(&page, &extra), 200),
        };
        batch.extend_from_slice(req.as_bytes());
        kinds.push(kind);
    }
    assert!(batch.len() > 500 * 1024);
    let mut c = Conn::open(gw.addr).await;
    let mut w = c.take_writer();
    let writer = tokio::spawn(async move {
        w.write_all(&batch).await.expect("write");
        w
    });
    for (i, kind) in kinds.into_iter().enumerate() {
        let r = c.answer(kind == 200).await;
        assert_eq!(r.status, kind, "request {i}: {r:?}");
        assert_eq!(r.header("x-request-id"), Some(format!("n{i}").as_str()));
    }
    let _w = tokio::time::timeout(WAIT, writer)
        .await
        .expect("written")
        .expect("writer");
    assert!(c.buf.is_empty());
    assert_eq!(sim.count("licenses"), 1);
    no_lockout(&sim);
}

// ---------------------------------------------------------------------------------------------
// 2. A head in pieces

#[tokio::test]
async fn a_head_written_one_byte_at_a_time_is_answered() {
    let (sim, gw, account) = setup("[server]\nheader_read_timeout = \"60s\"\n").await;
    let page = license_path(&account, 0);
    let mut c = Conn::open(gw.addr).await;
    let mut bodies = Vec::new();
    for (id, x_cache) in [("slow-1", "MISS"), ("slow-2", "HIT")] {
        let req = get(
            &page,
            &format!("Accept: application/json\r\nX-Request-Id: {id}\r\n"),
        );
        for b in req.bytes() {
            c.send([b]).await;
            // Pacing (not synchronisation): each byte its own segment, most likely its own read.
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let r = c.answer(false).await;
        assert_eq!(r.header("x-cache"), Some(x_cache), "{r:?}");
        assert_eq!(r.header("x-request-id"), Some(id));
        assert_page(&r, x_cache, &r.body.clone());
        bodies.push(r.body);
    }
    assert_eq!(bodies[0], bodies[1]);
    // A whole request and half of the next in one write, the rest in another.
    let two = [
        get(&page, "x-request-id: a\r\n"),
        get(&page, "x-request-id: b\r\n"),
    ]
    .concat();
    let cut = two.len() - 20;
    c.send(&two[..cut]).await;
    let a = c.answer(false).await;
    assert_eq!(a.header("x-request-id"), Some("a"));
    c.send(&two[cut..]).await;
    let b = c.answer(false).await;
    assert_eq!(b.header("x-request-id"), Some("b"));
    assert_page(&b, "HIT", &bodies[0]);
    assert_eq!(sim.count("licenses"), 1);
    no_lockout(&sim);
}

// ---------------------------------------------------------------------------------------------
// 3. Hand-over to hyper

#[tokio::test]
async fn a_keep_alive_connection_goes_on_in_hyper_after_a_post() {
    let (sim, gw, account) = setup("").await;
    let page = license_path(&account, 0);
    let mut c = Conn::open(gw.addr).await;
    c.send(get(&page, "")).await;
    let miss = c.answer(false).await;
    assert_page(&miss, "MISS", &miss.body.clone());
    c.send(get(&page, "")).await;
    assert_page(&c.answer(false).await, "HIT", &miss.body);
    // A POST: the connection goes to hyper.
    c.send(format!(
        "POST {page} HTTP/1.1\r\nHost: gw\r\nContent-Length: 0\r\nX-Request-Id: post-1\r\n\r\n"
    ))
    .await;
    let r = c.answer(false).await;
    assert_error(
        &r,
        "HTTP/1.1 405 Method Not Allowed",
        "GW_METHOD_NOT_ALLOWED",
    );
    assert_eq!(r.header("allow"), Some("GET, HEAD"));
    assert_eq!(r.header("x-request-id"), Some("post-1"));
    // hyper serves the rest of the connection: GET, the token route, HEAD, GET.
    c.send(get(&page, "x-request-id: after-post\r\n")).await;
    let r = c.answer(false).await;
    assert_page(&r, "HIT", &miss.body);
    assert_eq!(r.header("x-request-id"), Some("after-post"));
    let form = "grant_type=client_credentials";
    c.send(format!(
        "POST /api/ts/v1/oauth2/token HTTP/1.1\r\nHost: gw\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{form}",
        form.len()
    ))
    .await;
    let t = c.answer(false).await;
    assert_eq!(t.status_line, "HTTP/1.1 200 OK", "{t:?}");
    assert_eq!(t.header("cache-control"), Some("no-store"));
    assert_eq!(t.json()["token_type"], "Bearer");
    assert!(t.json()["access_token"].is_string());
    c.send(head(&page, "")).await;
    let h = c.answer(true).await;
    assert_eq!(h.status_line, "HTTP/1.1 200 OK");
    assert_eq!(h.length(), Some(miss.body.len()));
    c.send(get(&page, "")).await;
    assert_page(&c.answer(false).await, "HIT", &miss.body);

    // The same in one write: a hit, a POST, a hit.
    let mut c = Conn::open(gw.addr).await;
    c.send(
        [
            get(&page, "x-request-id: w1\r\n"),
            format!("POST {page} HTTP/1.1\r\nHost: gw\r\nContent-Length: 2\r\n\r\n{{}}"),
            get(&page, "x-request-id: w3\r\n"),
        ]
        .concat(),
    )
    .await;
    let r = c.answer(false).await;
    assert_page(&r, "HIT", &miss.body);
    assert_eq!(r.header("x-request-id"), Some("w1"));
    let r = c.answer(false).await;
    assert_error(
        &r,
        "HTTP/1.1 405 Method Not Allowed",
        "GW_METHOD_NOT_ALLOWED",
    );
    assert_eq!(r.header("allow"), Some("GET, HEAD"));
    let r = c.answer(false).await;
    assert_page(&r, "HIT", &miss.body);
    assert_eq!(r.header("x-request-id"), Some("w3"));
    assert!(c.buf.is_empty());
    assert_eq!(sim.count("licenses"), 1);
    no_lockout(&sim);
}

#[tokio::test]
async fn heads_the_front_does_not_serve_are_answered_by_hyper() {
    let (sim, gw, account) = setup("").await;
    let page = license_path(&account, 0);
    let body = warm(&gw, &page).await.body;

    // A GET with `Content-Length: 0`: hyper, then more requests on the same connection.
    let mut c = Conn::open(gw.addr).await;
    c.send(get(&page, "Content-Length: 0\r\nx-request-id: cl0\r\n"))
        .await;
    let r = c.answer(false).await;
    assert_page(&r, "HIT", &body);
    assert_eq!(r.header("x-request-id"), Some("cl0"));
    c.send(get(&page, "")).await;
    assert_page(&c.answer(false).await, "HIT", &body);

    // An absolute-form target: the same page.
    let mut c = Conn::open(gw.addr).await;
    c.send(format!(
        "GET http://gw{page} HTTP/1.1\r\nHost: gw\r\nx-request-id: abs\r\n\r\n"
    ))
    .await;
    let r = c.answer(false).await;
    assert_page(&r, "HIT", &body);
    assert_eq!(r.header("x-request-id"), Some("abs"));
    c.send(get(&page, "")).await;
    assert_page(&c.answer(false).await, "HIT", &body);

    // A chunked GET: a body on a GET is refused (as tests/it/security.rs expects); nothing hangs.
    let mut c = Conn::open(gw.addr).await;
    c.send(get(&page, "Transfer-Encoding: chunked\r\n") + "5\r\nhello\r\n0\r\n\r\n")
        .await;
    let r = c.answer(false).await;
    assert_error(&r, "HTTP/1.1 400 Bad Request", "INVALID_PARAMETER");
    // Either the connection goes on or hyper closes it: an answer or the end, in bounded time.
    c.send(get(&page, "")).await;
    let mut more = [0u8; 12];
    let n = tokio::time::timeout(WAIT, c.r.read(&mut more))
        .await
        .expect("an answer or the end")
        .unwrap_or(0);
    assert!(n == 0 || more[..n].starts_with(b"HTTP/1.1 200"), "{more:?}");

    // HTTP/1.0: hyper answers as HTTP/1.0 and closes (no keep-alive asked).
    let mut c = Conn::open(gw.addr).await;
    c.send(format!("GET {page} HTTP/1.0\r\nx-request-id: ten\r\n\r\n"))
        .await;
    let r = c.answer(false).await;
    assert_eq!(r.status_line, "HTTP/1.0 200 OK", "{r:?}");
    assert_eq!(r.header("x-cache"), Some("HIT"));
    assert_eq!(r.header("x-request-id"), Some("ten"));
    assert_eq!(r.body, body);
    c.closed().await;

    // 100 headers (Host included) are served; 101 get the JSON 431.
    let with_headers = |count: usize| {
        let mut req = format!("GET {page} HTTP/1.1\r\nHost: gw\r\n");
        for i in 1..count {
            req.push_str(&format!("X-H{i}: v\r\n"));
        }
        req + "\r\n"
    };
    let mut c = Conn::open(gw.addr).await;
    c.send(with_headers(100)).await;
    assert_page(&c.answer(false).await, "HIT", &body);
    c.send(with_headers(101)).await;
    let r = c.answer(false).await;
    assert_error(
        &r,
        "HTTP/1.1 431 Request Header Fields Too Large",
        "GW_HEADERS_TOO_LARGE",
    );
    assert_eq!(sim.count("licenses"), 1);
    no_lockout(&sim);
}

// ---------------------------------------------------------------------------------------------
// 4. Framing

#[tokio::test]
async fn head_carries_the_get_length_and_no_body() {
    let (sim, gw, account) = setup("").await;
    let page = license_path(&account, 0);
    let mut c = Conn::open(gw.addr).await;
    // HEAD of a miss (through ClientApi::serve), then of a hit (the front's own), each followed
    // by a GET on the same connection: a stray body would be read as its status line.
    c.send(head(&page, "x-request-id: h1\r\n")).await;
    let h = c.answer(true).await;
    assert_eq!(h.status_line, "HTTP/1.1 200 OK", "{h:?}");
    assert_eq!(h.header("x-cache"), Some("MISS"));
    assert_eq!(h.header("x-request-id"), Some("h1"));
    c.send(get(&page, "")).await;
    let g = c.answer(false).await;
    assert_page(&g, "HIT", &g.body.clone());
    assert_eq!(h.length(), Some(g.body.len()));
    c.send(head(&page, "x-request-id: h2\r\n")).await;
    let h = c.answer(true).await;
    assert_eq!(h.status_line, "HTTP/1.1 200 OK");
    assert_eq!(h.header("x-cache"), Some("HIT"));
    assert_eq!(h.header("x-request-id"), Some("h2"));
    assert_eq!(h.header("etag"), g.header("etag"));
    assert_eq!(h.length(), Some(g.body.len()));
    c.send(get(&page, "")).await;
    assert_page(&c.answer(false).await, "HIT", &g.body);
    // HEAD of a 404: no body either.
    c.send(head("/api/fota/v1/nothing", "")).await;
    let h = c.answer(true).await;
    assert_eq!(h.status_line, "HTTP/1.1 404 Not Found");
    c.send(get(&page, "")).await;
    assert_page(&c.answer(false).await, "HIT", &g.body);
    assert!(c.buf.is_empty());
    assert_eq!(sim.count("licenses"), 1);
    no_lockout(&sim);
}

#[tokio::test]
async fn not_modified_has_no_length_and_no_body() {
    let (sim, gw, account) = setup("").await;
    let page = license_path(&account, 0);
    let g = warm(&gw, &page).await;
    let etag = g.header("etag").expect("etag").to_string();
    let mut c = Conn::open(gw.addr).await;
    for inm in [
        etag.clone(),
        format!("W/{etag}"),
        format!("\"other\", {etag}"),
        "*".into(),
    ] {
        c.send(get(
            &page,
            &format!("If-None-Match: {inm}\r\nx-request-id: nm\r\n"),
        ))
        .await;
        let r = c.answer(false).await;
        assert_eq!(r.status_line, "HTTP/1.1 304 Not Modified", "{inm}: {r:?}");
        assert_eq!(r.header("content-length"), None, "{r:?}");
        assert_eq!(r.header("etag"), Some(etag.as_str()));
        assert_eq!(r.header("x-cache"), Some("HIT"));
        assert_eq!(r.header("x-request-id"), Some("nm"));
        // The next answer starts right after the head: no body was sent.
        c.send(get(&page, "")).await;
        assert_page(&c.answer(false).await, "HIT", &g.body);
    }
    // HEAD with a matching tag: 304 too, no length.
    c.send(head(&page, &format!("If-None-Match: {etag}\r\n")))
        .await;
    let r = c.answer(true).await;
    assert_eq!(r.status_line, "HTTP/1.1 304 Not Modified");
    assert_eq!(r.header("content-length"), None);
    // Another tag: the whole page.
    c.send(get(&page, "If-None-Match: \"other\"\r\n")).await;
    assert_page(&c.answer(false).await, "HIT", &g.body);
    c.send(get(&page, "")).await;
    assert_page(&c.answer(false).await, "HIT", &g.body);
    assert!(c.buf.is_empty());
    assert_eq!(sim.count("licenses"), 1);
    no_lockout(&sim);
}

/// The front writes what hyper writes: the same request answered by the front, and by hyper
/// (forced by `Content-Length: 0`), has the same status line, headers and body, but for the
/// values that move with the clock (`Date`, `Age`, `Cache-Control`'s max-age).
#[tokio::test]
async fn the_front_writes_answers_as_hyper_does() {
    let (sim, gw, account) = setup("").await;
    let page = license_path(&account, 0);
    let g = warm(&gw, &page).await;
    let etag = g.header("etag").expect("etag").to_string();
    let bad_index = format!("/api/fota/v1/licenses/{account}/index/x");
    let inm = format!("If-None-Match: {etag}\r\n");
    let cases: Vec<(&str, &str, String, bool)> = vec![
        ("hit", "GET", page.clone(), false),
        ("head hit", "HEAD", page.clone(), true),
        ("404", "GET", "/nope".into(), false),
        ("head 404", "HEAD", "/nope".into(), true),
        ("400", "GET", bad_index.clone(), false),
        ("head 400", "HEAD", bad_index, true),
        ("304", "GET", page.clone(), false),
        ("head 304", "HEAD", page.clone(), true),
        ("close", "GET", page.clone(), false),
        ("close 404", "GET", "/nope".into(), false),
    ];
    for (name, method, path, is_head) in cases {
        let mut extra = format!("x-request-id: same-{}\r\n", name.replace(' ', "-"));
        if name.contains("304") {
            extra += &inm;
        }
        if name.contains("close") {
            extra += "Connection: close\r\n";
        }
        let (front, hyper) = front_and_hyper(&gw, method, path.as_bytes(), &extra, is_head).await;
        assert_same(name, &front, &hyper);
    }
    assert_eq!(sim.count("licenses"), 1);
    no_lockout(&sim);
}

/// Odd request targets (characters a URI may not hold, a fragment, escapes, bytes past ASCII)
/// get the same answer from the front as from hyper: the front neither serves from the cache a
/// target hyper refuses nor refuses one hyper serves.
#[tokio::test]
async fn odd_targets_are_answered_as_hyper_answers_them() {
    let (sim, gw, account) = setup("").await;
    let page = license_path(&account, 0);
    warm(&gw, &page).await;
    let mut targets: Vec<Vec<u8>> = [
        "?a<b", "?a>b", "?a\"b", "?a{b}", "?a|b", "?a^b", "?a`b", "?a\\b", "#frag", "?x#frag",
        "?a%zz", "%30", "/", "?a=b?c", "?a[]=1",
    ]
    .iter()
    .map(|t| format!("{page}{t}").into_bytes())
    .collect();
    targets.push([page.as_bytes(), b"?a=\xff".as_slice()].concat());
    targets.push([page.as_bytes(), b"?a=\x7f".as_slice()].concat());
    for t in [
        format!("/api/fota/v1/licenses/{account}/index/%30"),
        format!("//api/fota/v1/licenses/{account}/index/0"),
        format!("/api/fota/v1/licenses/{account}/index/0/"),
        format!("/api/fota/v1/licenses/{account}//index/0"),
        format!("/api/fota/v1/licenses/{account}/index/+0"),
        format!("/api/fota/v1/LICENSES/{account}/index/0"),
        format!("/api/fota/v1/licenses/{account}/index/00"),
        format!("/api/fota/v1/licenses/{account}/index/0;x"),
    ] {
        targets.push(t.into_bytes());
    }
    let mut differences = Vec::new();
    // The answer to a target does not hang on whether its page is cached.
    let other = license_path(&sim.account_names()[1], 0);
    let odd = format!("{other}?a<b");
    let mut c = Conn::open(gw.addr).await;
    c.send(get(&odd, "Connection: close\r\n")).await;
    let uncached = c.answer(false).await;
    warm(&gw, &other).await;
    let mut c = Conn::open(gw.addr).await;
    c.send(get(&odd, "Connection: close\r\n")).await;
    let cached = c.answer(false).await;
    if uncached.status != cached.status {
        differences.push(format!(
            "GET {odd}: {} before the page is cached, {} once it is",
            uncached.status_line, cached.status_line
        ));
    }
    for target in &targets {
        let name = String::from_utf8_lossy(target).to_string();
        for (method, head) in [("GET", false), ("HEAD", true)] {
            let extra = "x-request-id: odd\r\n";
            let (front, hyper) = front_and_hyper(&gw, method, target, extra, head).await;
            differences.extend(difference(&format!("{method} {name}"), &front, &hyper));
        }
    }
    assert!(
        differences.is_empty(),
        "{} differences (over {} targets, GET and HEAD each):\n{}",
        differences.len(),
        targets.len(),
        differences.join("\n")
    );
    no_lockout(&sim);
}

/// `method target` with `extra` header lines, answered once by the front (as sent) and once by
/// hyper (the same with `Content-Length: 0`, which the front hands over), each on its own
/// connection.
async fn front_and_hyper(
    gw: &Running,
    method: &str,
    target: &[u8],
    extra: &str,
    head: bool,
) -> (Raw, Raw) {
    let mut answers = Vec::new();
    for length in ["", "Content-Length: 0\r\n"] {
        let req = [
            method.as_bytes(),
            b" ",
            target,
            format!(" HTTP/1.1\r\nHost: gw\r\n{length}{extra}\r\n").as_bytes(),
        ]
        .concat();
        let mut c = Conn::open(gw.addr).await;
        c.send(req).await;
        answers.push(c.answer(head).await);
    }
    let hyper = answers.pop().expect("two answers");
    let front = answers.pop().expect("two answers");
    (front, hyper)
}

/// The same status line, headers and body, but for the values that move with the clock
/// (`Date`, `Age`, `Cache-Control`'s max-age) and the request ids made by the gateway.
fn assert_same(name: &str, front: &Raw, hyper: &Raw) {
    if let Some(d) = difference(name, front, hyper) {
        panic!("{d}");
    }
}

/// What differs between the front's answer and hyper's, as a line, if anything.
fn difference(name: &str, front: &Raw, hyper: &Raw) -> Option<String> {
    let comparable = |r: &Raw| {
        let mut h: Vec<(String, String)> = r
            .headers
            .iter()
            .map(|(n, v)| match n.as_str() {
                "date" | "age" | "cache-control" => (n.clone(), String::new()),
                "x-request-id" if v.len() == 32 => (n.clone(), "(made)".into()),
                _ => (n.clone(), v.clone()),
            })
            .collect();
        h.sort();
        (r.status_line.clone(), h)
    };
    let (f, h) = (comparable(front), comparable(hyper));
    if f != h {
        return Some(format!("{name}: front {f:?}, hyper {h:?}"));
    }
    (front.body != hyper.body)
        .then(|| format!("{name}: bodies differ: front {front:?}, hyper {hyper:?}"))
}

/// A hit's exact header set, and the request id: echoed when sent, made when not.
#[tokio::test]
async fn a_hit_has_exactly_the_cached_answer_headers() {
    let (sim, gw, account) = setup("").await;
    let page = license_path(&account, 0);
    let g = warm(&gw, &page).await;
    let mut c = Conn::open(gw.addr).await;
    c.send(get(&page, "X-Request-Id: echo-me-1\r\n")).await;
    let r = c.answer(false).await;
    assert_page(&r, "HIT", &g.body);
    assert_eq!(
        r.names(),
        [
            "age",
            "cache-control",
            "content-length",
            "content-type",
            "date",
            "etag",
            "vary",
            "x-cache",
            "x-request-id"
        ]
    );
    assert_eq!(r.header("x-request-id"), Some("echo-me-1"));
    // Not sent (or not sane): one is made, 32 hex digits, a new one each time.
    let mut ids = Vec::new();
    for extra in ["", "X-Request-Id: has space\r\n"] {
        c.send(get(&page, extra)).await;
        let r = c.answer(false).await;
        let id = r.header("x-request-id").expect("an id").to_string();
        assert_eq!(id.len(), 32, "{id}");
        assert!(id.bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
        ids.push(id);
    }
    assert_ne!(ids[0], ids[1]);
    assert_eq!(sim.count("licenses"), 1);
    no_lockout(&sim);
}

/// A hit the front answers itself is authenticated, authorized and rated like any request:
/// a cached page is no answer for a client without credentials, with wrong ones, or not allowed
/// the account, and each hit takes one unit of the client's rate, no more.
#[tokio::test]
async fn fresh_hits_are_authenticated_authorized_and_rated_once() {
    let sim = start_sim(sim_opts()).await;
    let (a, b) = (
        sim.account_names()[0].clone(),
        sim.account_names()[1].clone(),
    );
    let clients = format!(
        r#"
[clients]
mode = "required"
token_signing_key = "front-0123456789abcdef0123456789abcdef"
[[clients.client]]
id = "one"
secret_sha256 = "{}"
accounts = ["{a}"]
rate_per_second = 0.001
burst = 3
[[clients.client]]
id = "all"
secret_sha256 = "{}"
accounts = ["*"]
"#,
        thingspace_gateway::clients::sha256_hex("one-secret"),
        thingspace_gateway::clients::sha256_hex("all-secret"),
    );
    let gw = start_gateway(config(&sim.base_url(), &clients)).await;
    wait_ready(&gw).await;
    let (page_a, page_b) = (license_path(&a, 0), license_path(&b, 0));
    let all = format!("Authorization: {}\r\n", basic("all", "all-secret"));
    let one = format!("Authorization: {}\r\n", basic("one", "one-secret"));
    let mut c = Conn::open(gw.addr).await;
    for page in [&page_a, &page_b] {
        c.send(get(page, &all)).await;
        assert_eq!(c.answer(false).await.header("x-cache"), Some("MISS"));
    }
    // Both pages are cached now.
    c.send(get(&page_b, &one)).await;
    assert_error(
        &c.answer(false).await,
        "HTTP/1.1 403 Forbidden",
        "GW_FORBIDDEN",
    );
    c.send(get(&page_a, "")).await;
    let r = c.answer(false).await;
    assert_error(&r, "HTTP/1.1 401 Unauthorized", "GW_UNAUTHORIZED");
    assert!(r.header("www-authenticate").is_some());
    let wrong = format!("Authorization: {}\r\n", basic("one", "not-the-secret"));
    c.send(get(&page_a, &wrong)).await;
    assert_error(
        &c.answer(false).await,
        "HTTP/1.1 401 Unauthorized",
        "GW_UNAUTHORIZED",
    );
    c.send(head(&page_a, "")).await;
    assert_eq!(
        c.answer(true).await.status_line,
        "HTTP/1.1 401 Unauthorized"
    );
    // Three hits (the burst), then 429: the refusals above took nothing.
    for _ in 0..3 {
        c.send(get(&page_a, &one)).await;
        assert_eq!(c.answer(false).await.header("x-cache"), Some("HIT"));
    }
    c.send(get(&page_a, &one)).await;
    let r = c.answer(false).await;
    assert_error(&r, "HTTP/1.1 429 Too Many Requests", "GW_RATE_LIMITED");
    assert!(r.header("retry-after").is_some());
    // A gateway token of the unlimited client serves hits too.
    let token = gateway_token(&gw.base_url(), "all", "all-secret").await;
    c.send(get(&page_b, &format!("authorization: Bearer {token}\r\n")))
        .await;
    assert_eq!(c.answer(false).await.header("x-cache"), Some("HIT"));
    assert_eq!(sim.count("licenses"), 2);
    no_lockout(&sim);
}

// ---------------------------------------------------------------------------------------------
// 5. Connection: close

#[tokio::test]
async fn connection_close_is_answered_then_the_connection_closes() {
    let (sim, gw, account) = setup("").await;
    let page = license_path(&account, 0);
    let body = warm(&gw, &page).await.body;
    for (path, close) in [
        (page.as_str(), "Connection: close\r\n"),
        (page.as_str(), "Connection: keep-alive, close\r\n"),
        ("/nope", "Connection: close\r\n"),
    ] {
        let mut c = Conn::open(gw.addr).await;
        // A request after the one with `close`: never answered.
        c.send(get(path, close) + &get(&page, "")).await;
        let r = c.answer(false).await;
        assert_eq!(r.header("connection"), Some("close"), "{r:?}");
        if path == page {
            assert_page(&r, "HIT", &body);
        } else {
            assert_error(&r, "HTTP/1.1 404 Not Found", "GW_NOT_FOUND");
        }
        let mut rest = Vec::new();
        tokio::time::timeout(WAIT, c.r.read_to_end(&mut rest))
            .await
            .expect("the server closes")
            .ok();
        assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(&rest));
    }
    // A client that sends its request and half-closes still gets the whole answer.
    let mut c = Conn::open(gw.addr).await;
    c.send(get(&page, "")).await;
    c.w().shutdown().await.expect("half-close");
    assert_page(&c.answer(false).await, "HIT", &body);
    c.closed().await;
    // Without `close`, no `connection` header.
    let mut c = Conn::open(gw.addr).await;
    c.send(get(&page, "Connection: keep-alive\r\n")).await;
    let r = c.answer(false).await;
    assert_eq!(r.header("connection"), None);
    assert_eq!(sim.count("licenses"), 1);
    no_lockout(&sim);
}

// ---------------------------------------------------------------------------------------------
// 6. Query strings

#[tokio::test]
async fn a_query_string_names_the_same_cached_page() {
    let (sim, gw, account) = setup("").await;
    let page = license_path(&account, 0);
    let mut c = Conn::open(gw.addr).await;
    c.send(get(&page, "")).await;
    let g = c.answer(false).await;
    assert_page(&g, "MISS", &g.body.clone());
    for q in ["?x=1", "?x=1&y=2", "?", "?index=5"] {
        c.send(get(&format!("{page}{q}"), "")).await;
        assert_page(&c.answer(false).await, "HIT", &g.body);
    }
    c.send(head(&format!("{page}?x=1"), "")).await;
    let h = c.answer(true).await;
    assert_eq!(h.header("x-cache"), Some("HIT"));
    assert_eq!(h.length(), Some(g.body.len()));
    assert_eq!(sim.count("licenses"), 1);
    // First asked with a query: cached under the page, found without it.
    let other = license_path(&sim.account_names()[1], 0);
    c.send(get(&format!("{other}?x=1"), "")).await;
    let o = c.answer(false).await;
    assert_page(&o, "MISS", &o.body.clone());
    c.send(get(&other, "")).await;
    assert_page(&c.answer(false).await, "HIT", &o.body);
    assert_eq!(sim.count("licenses"), 2);
    no_lockout(&sim);
}

// ---------------------------------------------------------------------------------------------
// 7. Header names in any case

#[tokio::test]
async fn header_names_in_any_case_count_as_lower_case() {
    let (sim, gw, account) = setup("").await;
    let page = license_path(&account, 0);
    let g = warm(&gw, &page).await;
    let etag = g.header("etag").expect("etag").to_string();
    let mut c = Conn::open(gw.addr).await;
    // gzip: the form is made after the first gzip request; wait (bounded) until it is sent.
    let mut gz = None;
    for _ in 0..500 {
        c.send(get(&page, "ACCEPT-ENCODING: gzip\r\n")).await;
        let r = c.answer(false).await;
        assert_eq!(r.status, 200);
        if r.header("content-encoding") == Some("gzip") {
            gz = Some(r);
            break;
        }
        assert_eq!(r.body, g.body, "identity until the gzip form exists");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let gz = gz.expect("the gzip form is sent");
    assert!(gz.body.len() < g.body.len());
    let mut unzipped = Vec::new();
    std::io::Read::read_to_end(
        &mut flate2::read::GzDecoder::new(&gz.body[..]),
        &mut unzipped,
    )
    .expect("gzip");
    assert_eq!(unzipped, g.body);
    for name in ["accept-encoding", "Accept-Encoding", "aCcEpT-eNcOdInG"] {
        c.send(get(&page, &format!("{name}: gzip\r\n"))).await;
        let r = c.answer(false).await;
        assert_eq!(r.header("content-encoding"), Some("gzip"), "{name}");
        assert_eq!(r.body, gz.body, "{name}");
        c.send(head(&page, &format!("{name}: gzip\r\n"))).await;
        let h = c.answer(true).await;
        assert_eq!(h.header("content-encoding"), Some("gzip"), "{name}");
        assert_eq!(h.length(), Some(gz.body.len()), "{name}");
    }
    for name in ["if-none-match", "IF-NONE-MATCH", "iF-nOnE-mAtCh"] {
        c.send(get(&page, &format!("{name}: {etag}\r\n"))).await;
        let r = c.answer(false).await;
        assert_eq!(r.status_line, "HTTP/1.1 304 Not Modified", "{name}");
    }
    // A body announced in upper case is a body: refused on a GET (never taken for the next
    // request), and the connection goes on.
    c.send(get(&page, "CONTENT-LENGTH: 5\r\n") + "hello").await;
    assert_error(
        &c.answer(false).await,
        "HTTP/1.1 400 Bad Request",
        "INVALID_PARAMETER",
    );
    c.send(get(&page, "")).await;
    assert_page(&c.answer(false).await, "HIT", &g.body);
    c.send(get(&page, "X-REQUEST-ID: Upper-1\r\n")).await;
    assert_eq!(
        c.answer(false).await.header("x-request-id"),
        Some("Upper-1")
    );
    c.send(format!(
        "GET {page} HTTP/1.1\r\nHOST: gw\r\nCONNECTION: CLOSE\r\n\r\n"
    ))
    .await;
    let r = c.answer(false).await;
    assert_eq!(r.header("connection"), Some("close"));
    assert_page(&r, "HIT", &g.body);
    c.closed().await;
    assert_eq!(sim.count("licenses"), 1);
    no_lockout(&sim);
}

// ---------------------------------------------------------------------------------------------
// 8. Shutdown and the head timeout

/// Idle keep-alive connections, in the front and in hyper, close on shutdown, and the serve
/// tasks end long before the (long) shutdown grace.
#[tokio::test]
async fn shutdown_closes_idle_keep_alive_connections() {
    let (sim, gw, account) =
        setup("[server]\nshutdown_grace = \"120s\"\nheader_read_timeout = \"120s\"\n").await;
    let page = license_path(&account, 0);
    // Idle in the front after an answer.
    let mut front = Conn::open(gw.addr).await;
    front.send(get(&page, "")).await;
    assert_eq!(front.answer(false).await.status, 200);
    // Idle in hyper after a POST.
    let mut hyper = Conn::open(gw.addr).await;
    hyper
        .send(format!(
            "POST {page} HTTP/1.1\r\nHost: gw\r\nContent-Length: 0\r\n\r\n"
        ))
        .await;
    assert_eq!(hyper.answer(false).await.status, 405);
    tokio::time::timeout(WAIT, gw.stop())
        .await
        .expect("the gateway stops well within the shutdown grace");
    front.closed().await;
    hyper.closed().await;
    no_lockout(&sim);
}

/// Requests in flight when shutdown comes are answered with `connection: close`, then their
/// connections close: hyper's graceful shutdown does so for its busy connections, and the front
/// must do the same. Two misses (two accounts) held by the upstream, one on a connection in the
/// front, one on a connection in hyper (`Content-Length: 0`).
#[tokio::test]
async fn shutdown_finishes_busy_connections_with_connection_close() {
    let (sim, gw, account) =
        setup("[server]\nshutdown_grace = \"120s\"\nheader_read_timeout = \"120s\"\n").await;
    let front_page = license_path(&account, 0);
    let hyper_page = license_path(&sim.account_names()[1], 0);
    sim.apply(FaultRequest {
        latency: Some("2s".into()),
        ..Default::default()
    })
    .unwrap();
    let mut front = Conn::open(gw.addr).await;
    front
        .send(get(&front_page, "x-request-id: busy-front\r\n"))
        .await;
    let mut hyper = Conn::open(gw.addr).await;
    hyper
        .send(get(
            &hyper_page,
            "Content-Length: 0\r\nx-request-id: busy-hyper\r\n",
        ))
        .await;
    // Both misses have reached the upstream, which holds them: both requests are in flight.
    let deadline = tokio::time::Instant::now() + WAIT;
    while sim.stats()["inflight"].as_u64() != Some(2) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "both misses reach the upstream: {}",
            sim.stats()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    gw.gateway.shutdown().trigger();
    for (c, id) in [(&mut hyper, "busy-hyper"), (&mut front, "busy-front")] {
        let r = c.answer(false).await;
        assert_page(&r, "MISS", &r.body.clone());
        assert_eq!(r.header("x-request-id"), Some(id));
        assert_eq!(r.header("connection"), Some("close"), "{id}: {r:?}");
        c.closed().await;
    }
    assert_eq!(sim.count("licenses"), 2);
    no_lockout(&sim);
}

#[tokio::test]
async fn the_head_timeout_closes_idle_and_half_sent_connections() {
    let (sim, gw, account) = setup("[server]\nheader_read_timeout = \"1s\"\n").await;
    let page = license_path(&account, 0);
    // Idle after an answer.
    let mut idle = Conn::open(gw.addr).await;
    idle.send(get(&page, "")).await;
    assert_eq!(idle.answer(false).await.status, 200);
    // Never sent a whole head.
    let mut half = Conn::open(gw.addr).await;
    half.send(format!("GET {page} HTTP/1.1\r\nHost: gw\r\n"))
        .await;
    // Bounded by WAIT (15 s), far above the 1 s timeout.
    idle.closed().await;
    half.closed().await;
    // A head trickled a byte every 100 ms (about 20 s in all): the timeout runs from when the
    // head was first awaited, not from the last byte, so the connection closes long before the
    // head is whole.
    let mut slow = Conn::open(gw.addr).await;
    let req = get(&page, "x-request-id: trickle\r\n");
    let mut closed = false;
    for b in req.bytes() {
        if slow.w().write_all(&[b]).await.is_err() {
            closed = true;
            break;
        }
        // Pacing: a read that waits 100 ms between bytes, and sees the end if it comes.
        let mut one = [0u8; 1];
        match tokio::time::timeout(Duration::from_millis(100), slow.r.read(&mut one)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                closed = true;
                break;
            }
            Ok(Ok(_)) => panic!("an answer to a head not yet whole"),
            Err(_) => {}
        }
    }
    assert!(closed, "the trickled head was read to its end");
    no_lockout(&sim);
}

// ---------------------------------------------------------------------------------------------
// 9. Metrics

fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no series {series}"))
        .parse()
        .expect("a number")
}

#[tokio::test]
async fn hits_answered_by_the_front_are_counted() {
    let (sim, gw, account) = setup("").await;
    let page = license_path(&account, 0);
    warm(&gw, &page).await;
    let metrics_url = format!("{}/metrics", gw.admin_url());
    let ok = "thingspace_gateway_http_requests_total{route=\"licenses\",status=\"200\"}";
    let hits = "thingspace_gateway_cache_lookups_total{result=\"hit\"}";
    let timed = "thingspace_gateway_http_request_duration_seconds_count{route=\"licenses\"}";
    let before = String::from_utf8(crate::common::get(&metrics_url).await.body.to_vec()).unwrap();
    const N: usize = 7;
    let mut c = Conn::open(gw.addr).await;
    // Some one by one, the rest pipelined.
    for _ in 0..3 {
        c.send(get(&page, "")).await;
        assert_eq!(c.answer(false).await.header("x-cache"), Some("HIT"));
    }
    c.send(get(&page, "").repeat(N - 3)).await;
    for _ in 3..N {
        assert_eq!(c.answer(false).await.header("x-cache"), Some("HIT"));
    }
    let after = String::from_utf8(crate::common::get(&metrics_url).await.body.to_vec()).unwrap();
    for series in [ok, hits, timed] {
        assert_eq!(
            metric(&after, series) - metric(&before, series),
            N as f64,
            "{series}"
        );
    }
    assert_eq!(sim.count("licenses"), 1);
    no_lockout(&sim);
}

// ---------------------------------------------------------------------------------------------
// 10. sendfile

/// Asks for page 0 of `account` once more (a plaintext hit asks for the page's file form) and
/// waits until the form, of `len` bytes, is made.
async fn wait_for_file_form(gw: &Running, account: &str, len: usize) {
    use thingspace_gateway::cache::{Key, Kind};
    let hit = warm(gw, &license_path(account, 0)).await;
    assert_eq!(hit.header("x-cache"), Some("HIT"), "{hit:?}");
    let key = Key {
        kind: Kind::Page,
        account: account.into(),
        index: 0,
    };
    let deadline = std::time::Instant::now() + WAIT;
    while gw
        .gateway
        .cache()
        .get(&key, tokio::time::Instant::now())
        .and_then(|e| e.file().map(|f| f.len()))
        != Some(len)
    {
        assert!(std::time::Instant::now() < deadline, "no file form");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A large page's hits go out with `sendfile` from its file form, made after the first answer:
/// the same bytes again and again on one connection, pipelined too; HEAD sends the length only;
/// gzip clients still get the gzip form.
#[tokio::test]
async fn large_pages_are_sent_from_their_file_form() {
    let (sim, gw, account) = setup("").await;
    let page = license_path(&account, 0);
    let miss = warm(&gw, &page).await;
    assert!(miss.body.len() >= 32 * 1024, "{}", miss.body.len());
    wait_for_file_form(&gw, &account, miss.body.len()).await;
    let mut c = Conn::open(gw.addr).await;
    for _ in 0..5 {
        c.send(get(&page, "")).await;
        assert_page(&c.answer(false).await, "HIT", &miss.body);
    }
    c.send(format!(
        "{}{}{}",
        get(&page, ""),
        head(&page, ""),
        get(&page, "")
    ))
    .await;
    assert_page(&c.answer(false).await, "HIT", &miss.body);
    let h = c.answer(true).await;
    assert_eq!(h.status, 200, "{h:?}");
    assert_eq!(h.length(), Some(miss.body.len()));
    assert!(h.body.is_empty());
    assert_page(&c.answer(false).await, "HIT", &miss.body);
    c.send(get(&page, "Accept-Encoding: gzip\r\n")).await;
    let gz = c.answer(false).await;
    assert_eq!(gz.header("content-encoding"), Some("gzip"), "{gz:?}");
    let mut plain = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&gz.body[..]), &mut plain)
        .expect("gzip");
    assert_eq!(plain, miss.body);
    assert_eq!(sim.count("licenses"), 1);
    no_lockout(&sim);
}

/// `write_timeout` holds for an answer sent with `sendfile` too: a client that reads nothing of
/// a large page is cut off, and with one connection allowed the next client is then answered.
#[tokio::test]
async fn a_client_that_stops_reading_a_sendfile_answer_is_cut_off() {
    let sim = start_sim(thingspace_sim::SimOptions {
        accounts: 1,
        devices: 100_000,
        page_size: 100_000,
        ..sim_opts()
    })
    .await;
    let gw = start_gateway(config(
        &sim.base_url(),
        // Only the write timeout may close the stalled connection within the test's wait.
        "[server]\nwrite_timeout = \"200ms\"\nmax_connections = 1\n\
         header_read_timeout = \"60s\"\n",
    ))
    .await;
    wait_ready(&gw).await;
    let account = sim.account_names()[0].clone();
    let page = license_path(&account, 0);
    let miss = warm(&gw, &page).await;
    wait_for_file_form(&gw, &account, miss.body.len()).await;
    // A small receive window, so that the ~8 MB page cannot all sit in kernel buffers.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stalled = socket.connect(gw.addr).await.unwrap();
    stalled.write_all(get(&page, "").as_bytes()).await.unwrap();
    let mut next = Conn::open(gw.addr).await;
    next.send(get("/nope", "")).await;
    assert_error(
        &next.answer(false).await,
        "HTTP/1.1 404 Not Found",
        "GW_NOT_FOUND",
    );
    let mut got = Vec::new();
    let end = tokio::time::timeout(WAIT, stalled.read_to_end(&mut got))
        .await
        .expect("the stalled connection was closed");
    assert!(
        end.is_err() || got.len() < miss.body.len(),
        "got {} bytes of a {}-byte page",
        got.len(),
        miss.body.len()
    );
    assert_eq!(sim.count("licenses"), 1);
    no_lockout(&sim);
}
