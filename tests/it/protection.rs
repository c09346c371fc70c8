//! Upstream protection and connection hygiene over real sockets: load shedding, transparent
//! retries, the concurrency bound, slow clients; and what a panic or a dropped call leaves
//! behind (nothing that blocks a key or the circuit).

use crate::common::*;
use http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU8};
use std::sync::Arc;
use std::time::Duration;
use thingspace_gateway::observe::{Endpoint, Metrics};
use thingspace_gateway::respond::Body;
use thingspace_gateway::runtime::Gateway;
use thingspace_gateway::sim_transport::sim_transport;
use thingspace_gateway::upstream::budget::LocalBudget;
use thingspace_gateway::upstream::circuit::CircuitState;
use thingspace_gateway::upstream::protection::LocalProtection;
use thingspace_gateway::upstream::transport::{
    OutRequest, RawResponse, Transport, TransportFuture,
};
use thingspace_gateway::upstream::{Upstream, UpstreamSettings};
use thingspace_sim::control::FaultRequest;
use thingspace_sim::SimOptions;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

#[tokio::test]
async fn over_max_inflight_is_shed_at_once() {
    let sim = start_sim(SimOptions {
        latency: Duration::from_millis(400),
        ..sim_opts()
    })
    .await;
    let gw = start_gateway(config(
        &sim.base_url(),
        "[server]\nmax_inflight = 3\n[upstream]\nrate_per_second = 1000.0\nburst = 1000\n",
    ))
    .await;
    wait_ready(&gw).await;
    let account = sim.account_names()[0].clone();
    let imeis = sim.imeis(&account);
    let http = Arc::new(Http::new());
    let tasks: Vec<_> = (0..10)
        .map(|i| {
            let http = http.clone();
            let url = format!("{}{}", gw.base_url(), license_path(&account, imeis[i]));
            tokio::spawn(async move {
                let started = std::time::Instant::now();
                let r = http.get(&url).await;
                (r, started.elapsed())
            })
        })
        .collect();
    let (mut ok, mut shed) = (0, 0);
    for t in tasks {
        let (r, took) = t.await.unwrap();
        match r.status {
            StatusCode::OK => ok += 1,
            StatusCode::SERVICE_UNAVAILABLE => {
                assert_eq!(r.error_code(), "GW_OVERLOADED");
                assert_eq!(r.header("retry-after"), "1");
                assert!(
                    took < Duration::from_millis(300),
                    "shed at once, not queued: {took:?}"
                );
                shed += 1;
            }
            s => panic!("unexpected {s}"),
        }
    }
    assert_eq!((ok, shed), (3, 7));
    // The admin port is not subject to the client bound.
    assert_eq!(
        get(&format!("{}/healthz", gw.admin_url())).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn dropped_connection_is_retried_transparently() {
    let sim = start_sim(sim_opts()).await;
    let gw = start_gateway(config(&sim.base_url(), "[upstream]\nretries = 2\n")).await;
    wait_ready(&gw).await;
    let account = sim.account_names()[0].clone();
    sim.apply(FaultRequest::kind("licenses", 1, "close"))
        .unwrap();
    let r = get(&format!("{}{}", gw.base_url(), license_path(&account, 0))).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(sim.count_status("licenses", 0), 1, "the dropped attempt");
    assert_eq!(sim.count_status("licenses", 200), 1, "its retry");
    // A 503 then a 200: retried, too.
    sim.apply(FaultRequest::status("licenses", 2, 503)).unwrap();
    let r = get(&format!(
        "{}{}",
        gw.base_url(),
        license_path(&account, sim.imeis(&account)[5])
    ))
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(sim.count_status("licenses", 503), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_concurrency_never_exceeds_max_concurrent() {
    let sim = start_sim(SimOptions {
        latency: Duration::from_millis(30),
        ..sim_opts()
    })
    .await;
    let gw = start_gateway(config(
        &sim.base_url(),
        "[upstream]\nmax_concurrent = 4\nrate_per_second = 1000.0\nburst = 1000\n",
    ))
    .await;
    wait_ready(&gw).await;
    let account = sim.account_names()[0].clone();
    let imeis = sim.imeis(&account);
    let http = Arc::new(Http::new());
    let tasks: Vec<_> = (0..60)
        .map(|i| {
            let http = http.clone();
            let url = format!("{}{}", gw.base_url(), license_path(&account, imeis[i]));
            tokio::spawn(async move { http.get(&url).await.status })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), StatusCode::OK);
    }
    assert_eq!(sim.count("licenses"), 60);
    assert_eq!(sim.max_concurrency(), 4);
}

#[tokio::test]
async fn slow_and_idle_clients_are_cut_off() {
    let sim = start_sim(sim_opts()).await;
    let gw = start_gateway(config(
        &sim.base_url(),
        "[server]\nheader_read_timeout = \"300ms\"\n",
    ))
    .await;
    // A client that never finishes its request head.
    let mut slow = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    slow.write_all(b"GET /api/fota/v1/licenses/a/index/0 HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "the gateway closed the connection");
    // A keep-alive connection left idle after one request.
    let mut idle = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    idle.write_all(b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut first = [0u8; 12];
    idle.read_exact(&mut first).await.unwrap();
    assert_eq!(&first, b"HTTP/1.1 404");
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), idle.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "idle keep-alive connection closed");
}

/// Two clients of the gateway, both free to read any account fast.
fn two_clients() -> String {
    format!(
        r#"
[clients]
mode = "required"
token_signing_key = "k7Qm2vXr9LpT4wZb8NcY3sHd6FjA1uEo5GiK0tRy"
[[clients.client]]
id = "billing"
secret_sha256 = "{}"
accounts = ["*"]
rate_per_second = 1000.0
burst = 1000
[[clients.client]]
id = "ops"
secret_sha256 = "{}"
accounts = ["*"]
rate_per_second = 1000.0
burst = 1000
"#,
        thingspace_gateway::clients::sha256_hex("billing-secret-0123"),
        thingspace_gateway::clients::sha256_hex("ops-secret-0123456"),
    )
}

/// SPEC §5: waiters for upstream budget take turns by client. Default budget: 10 per second,
/// burst 20, `max_queue_wait` 5 s.
#[tokio::test(start_paused = true)]
async fn one_clients_flood_of_cold_keys_does_not_starve_another() {
    let p = Arc::new(
        InProc::new(
            SimOptions {
                accounts: 1,
                devices: 5000,
                ..sim_opts()
            },
            &two_clients(),
        )
        .await,
    );
    let account = p.sim.account_names()[0].clone();
    let imeis = p.sim.imeis(&account);
    let billing = basic("billing", "billing-secret-0123");
    let ops = basic("ops", "ops-secret-0123456");
    let warm = p
        .request(
            Method::GET,
            &license_path(&account, 0),
            &[("authorization", &ops)],
            b"",
        )
        .await;
    assert_eq!(warm.status, StatusCode::OK);
    let started = Instant::now();
    // billing asks for 100 cold pages at once.
    let flood: Vec<_> = (0..100)
        .map(|i| {
            let (p, auth) = (p.clone(), billing.clone());
            let path = license_path(&account, imeis[i]);
            tokio::spawn(async move {
                p.request(Method::GET, &path, &[("authorization", &auth)], b"")
                    .await
            })
        })
        .collect();
    p.settle().await;
    // Then ops asks for one.
    let asked = Instant::now();
    let r = p
        .request(
            Method::GET,
            &license_path(&account, imeis[4000]),
            &[("authorization", &ops)],
            b"",
        )
        .await;
    let waited = asked.elapsed();
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(r.header("x-cache"), "MISS");
    // Two token intervals at most (the grant already due to billing, then ops's), not billing's
    // queue (which made ops wait 4.77 s of its 5 s).
    assert!(
        waited <= Duration::from_millis(200),
        "ops waited {waited:?}"
    );
    let (mut ok, mut shed) = (0, 0);
    for t in flood {
        let r = t.await.unwrap();
        match r.status {
            StatusCode::OK => ok += 1,
            StatusCode::SERVICE_UNAVAILABLE => {
                assert_eq!(r.error_code(), "GW_UPSTREAM_UNAVAILABLE");
                shed += 1;
            }
            s => panic!("unexpected {s}"),
        }
    }
    // billing keeps the rest of the budget: its burst, then 10 per second for up to 5 s.
    assert!(ok >= 60, "billing served {ok}, shed {shed}");
    let seconds = started.elapsed().as_secs_f64();
    assert_eq!(p.sim.count("licenses"), ok + 2);
    assert!(
        (ok + 2 + 2) as f64 <= 20.0 + 10.0 * seconds,
        "{ok} pages in {seconds}s: over the budget"
    );
    assert_eq!(p.sim.count("session_login"), 1, "one login, none rejected");
    assert_eq!(p.sim.count_status("session_login", 200), 1);
}

/// SPEC §3 `write_timeout`: a client that reads nothing of its answer is cut off. With one
/// connection allowed, the next client is answered only once the stalled one is closed.
#[tokio::test]
async fn a_client_that_stops_reading_is_cut_off_after_write_timeout() {
    let sim = start_sim(SimOptions {
        accounts: 1,
        devices: 100_000,
        page_size: 10_000,
        ..sim_opts()
    })
    .await;
    let gw = start_gateway(config(
        &sim.base_url(),
        "[server]\nwrite_timeout = \"200ms\"\nmax_connections = 1\n\
         [upstream]\nrate_per_second = 1000.0\nburst = 1000\n",
    ))
    .await;
    wait_ready(&gw).await;
    let account = sim.account_names()[0].clone();
    // A small receive window, so that the ~8 MB answer cannot all sit in kernel buffers.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stalled = socket.connect(gw.addr).await.unwrap();
    stalled
        .write_all(
            format!("GET /gateway/v1/accounts/{account}/licenses HTTP/1.1\r\nHost: x\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
    let next = tokio::time::timeout(
        Duration::from_secs(30),
        get(&format!("{}/nope", gw.base_url())),
    )
    .await
    .expect("the next client is served once the stalled connection is cut off");
    assert_eq!(next.status, StatusCode::NOT_FOUND);
    assert_eq!(sim.count("licenses"), 10, "the whole account was read");
    // The stalled connection is closed: draining it now ends before the whole answer.
    let mut got = Vec::new();
    let end = tokio::time::timeout(Duration::from_secs(30), stalled.read_to_end(&mut got))
        .await
        .expect("the connection was closed");
    let text = String::from_utf8_lossy(&got[..got.len().min(4096)]).to_lowercase();
    assert!(text.starts_with("http/1.1 200"), "{text}");
    let length: usize = text
        .split("content-length: ")
        .nth(1)
        .and_then(|v| v.split("\r\n").next())
        .and_then(|v| v.parse().ok())
        .expect("content-length");
    let head = text.find("\r\n\r\n").unwrap() + 4;
    assert!(length > 8_000_000, "{length}");
    assert!(
        end.is_err() || got.len() < head + length,
        "got {} of {} bytes",
        got.len(),
        head + length
    );
}

/// A transport to the simulator whose first license request panics (issue 13 item 5: a panic
/// in the budget under one key's fetch).
struct PanicsOnce {
    inner: Arc<dyn Transport>,
    armed: AtomicBool,
}

impl Transport for PanicsOnce {
    fn send(&self, req: OutRequest, timeout: Duration) -> TransportFuture<'_> {
        if req.path.starts_with("/api/fota/v1/licenses/") && self.armed.swap(false, SeqCst) {
            panic!("a fetch panics mid-flight");
        }
        self.inner.send(req, timeout)
    }
}

#[tokio::test]
async fn a_fetch_that_panics_answers_502_and_the_next_request_fetches_again() {
    let sim = start_sim(sim_opts()).await;
    let cfg = config(&sim.base_url(), "[upstream]\nretries = 0\n");
    let transport = Arc::new(PanicsOnce {
        inner: sim_transport(&sim, cfg.upstream.max_response_bytes.as_usize()),
        armed: AtomicBool::new(true),
    });
    let gw = Gateway::with_transport(cfg, transport).expect("gateway builds");
    gw.spawn_token_refresher();
    let api = gw.client_api();
    let account = sim.account_names()[0].clone();
    let get = |path: String| {
        let api = &api;
        async move {
            let resp = api
                .serve(Request::get(path).body(Body::default()).unwrap())
                .await;
            let status = resp.status();
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            (status, body)
        }
    };
    let (status, body) = get(license_path(&account, 0)).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["errorCode"], "GW_BAD_GATEWAY");
    assert_eq!(v["errorMessage"], "upstream fetch failed");
    assert_eq!(sim.count("licenses"), 0, "the panic came before the wire");
    // The key is not stuck on the dead fetch: the next request goes upstream and is answered.
    let (status, _) = get(license_path(&account, 0)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(sim.count("licenses"), 1);
    assert_eq!(
        (
            sim.count("session_login"),
            sim.count_status("session_login", 200)
        ),
        (1, 1),
        "one accepted login, none rejected"
    );
}

/// Answers 500, hangs, panics, or answers 200 `{}`, as told; counts the attempts it sees.
#[derive(Default)]
struct Scripted {
    mode: AtomicU8,
    calls: AtomicU32,
}

const FAIL: u8 = 0;
const HANG: u8 = 1;
const OK: u8 = 2;
const PANIC: u8 = 3;

impl Transport for Scripted {
    fn send(&self, _req: OutRequest, _timeout: Duration) -> TransportFuture<'_> {
        self.calls.fetch_add(1, SeqCst);
        let mode = self.mode.load(SeqCst);
        Box::pin(async move {
            let status = match mode {
                FAIL => StatusCode::INTERNAL_SERVER_ERROR,
                HANG => std::future::pending().await,
                PANIC => panic!("the scripted transport panics"),
                _ => StatusCode::OK,
            };
            Ok(RawResponse {
                status,
                headers: http::HeaderMap::new(),
                body: bytes::Bytes::from_static(b"{}"),
            })
        })
    }
}

#[tokio::test(start_paused = true)]
async fn a_probe_dropped_mid_flight_lets_the_next_request_probe() {
    let transport = Arc::new(Scripted::default());
    let metrics = Metrics::new();
    let upstream = Upstream::new(
        transport.clone(),
        Arc::new(LocalBudget::new(100.0, 100, 8)),
        Arc::new(LocalProtection::new(1, Duration::from_secs(10))),
        metrics.clone(),
        UpstreamSettings {
            timeout: Duration::from_secs(5),
            retries: 0,
            max_queue_wait: Duration::from_secs(1),
        },
    );
    let call = || {
        let req = OutRequest {
            method: Method::GET,
            path: "/api/fota/v1/licenses/a/index/0".into(),
            headers: http::HeaderMap::new(),
            body: bytes::Bytes::new(),
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let upstream = &upstream;
        async move {
            upstream
                .call(Endpoint::Licenses, req, deadline, &AtomicU32::new(0))
                .await
        }
    };
    let err = call().await.unwrap_err();
    assert_eq!(err.error_code(), "GW_BAD_GATEWAY");
    assert_eq!(upstream.circuit_state(), CircuitState::Open);
    assert_eq!(metrics.circuit_open.get(), 1);
    tokio::time::advance(Duration::from_secs(10)).await;
    assert_eq!(upstream.circuit_state(), CircuitState::HalfOpen);
    // The probe hangs and its caller gives up: the call future is dropped mid-flight.
    transport.mode.store(HANG, SeqCst);
    assert!(tokio::time::timeout(Duration::from_secs(1), call())
        .await
        .is_err());
    assert_eq!(transport.calls.load(SeqCst), 2);
    // The next request is the new probe (not "circuit open" forever), and it closes the circuit.
    transport.mode.store(OK, SeqCst);
    let resp = call().await.expect("a new probe goes through");
    assert_eq!(resp.status, StatusCode::OK);
    assert_eq!(transport.calls.load(SeqCst), 3);
    assert_eq!(upstream.circuit_state(), CircuitState::Closed);
    assert_eq!(metrics.circuit_open.get(), 0);
}

/// An attempt whose future is dropped mid-flight, or whose task panics, is counted out of the
/// `upstream_inflight` gauge (test fails on previous main: the gauge stayed up).
#[tokio::test(start_paused = true)]
async fn a_dropped_or_panicking_attempt_leaves_nothing_in_flight() {
    let transport = Arc::new(Scripted::default());
    let metrics = Metrics::new();
    let upstream = Arc::new(Upstream::new(
        transport.clone(),
        Arc::new(LocalBudget::new(100.0, 100, 8)),
        Arc::new(LocalProtection::new(5, Duration::from_secs(10))),
        metrics.clone(),
        UpstreamSettings {
            timeout: Duration::from_secs(5),
            retries: 0,
            max_queue_wait: Duration::from_secs(1),
        },
    ));
    let call = |upstream: Arc<Upstream>| async move {
        let req = OutRequest {
            method: Method::GET,
            path: "/api/fota/v1/licenses/a/index/0".into(),
            headers: http::HeaderMap::new(),
            body: bytes::Bytes::new(),
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        upstream
            .call(Endpoint::Licenses, req, deadline, &AtomicU32::new(0))
            .await
    };
    transport.mode.store(HANG, SeqCst);
    assert!(
        tokio::time::timeout(Duration::from_secs(1), call(upstream.clone()))
            .await
            .is_err()
    );
    assert_eq!(transport.calls.load(SeqCst), 1);
    assert_eq!(
        metrics.upstream_inflight.get(),
        0,
        "after a dropped attempt"
    );
    transport.mode.store(PANIC, SeqCst);
    let joined = tokio::spawn(call(upstream.clone())).await;
    assert!(joined.unwrap_err().is_panic());
    assert_eq!(transport.calls.load(SeqCst), 2);
    assert_eq!(
        metrics.upstream_inflight.get(),
        0,
        "after a panicked attempt"
    );
    // The upstream still serves, and the budget slots came back (8 slots, 10 calls).
    transport.mode.store(OK, SeqCst);
    for _ in 0..10 {
        assert_eq!(call(upstream.clone()).await.unwrap().status, StatusCode::OK);
    }
    assert_eq!(transport.calls.load(SeqCst), 12);
    assert_eq!(metrics.upstream_inflight.get(), 0);
}
