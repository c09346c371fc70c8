//! Time-based behaviour under tokio's paused clock: the gateway wired to the simulator
//! in-process (no sockets), so hours pass in milliseconds and every count is exact.
#![allow(clippy::needless_range_loop)]

use crate::common::*;
use http::StatusCode;
use std::sync::Arc;
use std::time::Duration;
use thingspace_sim::control::FaultRequest;
use thingspace_sim::SimOptions;
use tokio::time::{sleep, Instant};

const MIN: Duration = Duration::from_secs(60);

#[tokio::test(start_paused = true)]
async fn oauth_token_refreshes_at_75_percent_and_after_a_same_token_expiry() {
    let p = InProc::new(
        sim_opts(),
        "[cache]\nttl = \"1s\"\nstale_while_revalidate = \"0s\"\n",
    )
    .await;
    let account = p.sim.account_names()[0].clone();
    for minute in 0..110 {
        let r = p.get(&license_path(&account, 0)).await;
        assert_eq!(r.status, StatusCode::OK, "minute {minute}: {:?}", r.body);
        sleep(MIN).await;
    }
    // t=0 new token; 45m same token back (kept, expiry unchanged); 60m new; 105m same.
    assert_eq!(p.sim.count("oauth_token"), 4);
    assert_eq!(
        p.sim.count_status("licenses", 401),
        0,
        "no request carried an expired token"
    );
    assert_eq!(
        p.sim.count("session_login"),
        1,
        "use keeps the session alive"
    );
    assert_eq!(p.sim.count_status("licenses", 200), 110);
}

#[tokio::test(start_paused = true)]
async fn idle_session_is_renewed_lazily() {
    let p = InProc::new(sim_opts(), "[cache]\nttl = \"1s\"\n").await;
    let account = p.sim.account_names()[0].clone();
    assert_eq!(
        p.get(&license_path(&account, 0)).await.status,
        StatusCode::OK
    );
    sleep(25 * MIN).await;
    assert_eq!(p.sim.count("session_login"), 1, "no login while idle");
    let imeis = p.sim.imeis(&account);
    assert_eq!(
        p.get(&license_path(&account, imeis[0])).await.status,
        StatusCode::OK
    );
    assert_eq!(p.sim.count("session_login"), 2);
    assert_eq!(
        p.sim.count_status("licenses", 400),
        0,
        "renewed before the upstream refused it"
    );
}

#[tokio::test(start_paused = true)]
async fn a_one_second_idle_timeout_does_not_log_in_for_every_request() {
    let p = InProc::new(
        SimOptions {
            session_idle: Duration::from_secs(1),
            ..sim_opts()
        },
        "[credentials]\nsession_idle_timeout = \"1s\"\n",
    )
    .await;
    let account = p.sim.account_names()[0].clone();
    let imeis = p.sim.imeis(&account);
    // A cold request every 500 ms for 10 s: the session stays in use, so one login. With a fixed
    // 1 s renewal margin every request logged in again.
    for i in 0..20 {
        let r = p.get(&license_path(&account, imeis[i])).await;
        assert_eq!(r.status, StatusCode::OK, "request {i}");
        sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(p.sim.count("session_login"), 1);
    assert_eq!(
        p.sim.count_status("licenses", 400),
        0,
        "never sent an expired session"
    );
    // Idle past the timeout: renewed before use.
    sleep(Duration::from_secs(2)).await;
    assert_eq!(
        p.get(&license_path(&account, imeis[30])).await.status,
        StatusCode::OK
    );
    assert_eq!(p.sim.count("session_login"), 2);
    assert_eq!(p.sim.count_status("licenses", 400), 0);
}

#[tokio::test(start_paused = true)]
async fn rejected_logins_stay_below_the_lock_across_pauses() {
    let p = InProc::new(
        sim_opts(),
        "[credentials]\npassword = \"wrong\"\nmax_failed_logins = 2\nlogin_pause = \"15m\"\n",
    )
    .await;
    let account = p.sim.account_names()[0].clone();
    let mut per_window = [0u64; 6];
    let mut before = 0;
    for minute in 0..90u64 {
        let r = p.get(&license_path(&account, 0)).await;
        assert_eq!(r.status, StatusCode::BAD_GATEWAY);
        assert_eq!(r.error_code(), "GW_UPSTREAM_AUTH_FAILED");
        let now = p.sim.count_status("session_login", 400);
        per_window[(minute / 15) as usize] += now - before;
        before = now;
        sleep(MIN).await;
    }
    assert!(per_window.iter().all(|n| *n <= 2), "{per_window:?}");
    assert_eq!(per_window[0], 2);
    let total: u64 = per_window.iter().sum();
    assert_eq!(
        total, 4,
        "stops one short of ThingSpace's five: {per_window:?}"
    );
    assert_eq!(p.sim.count_status("session_login", 200), 0);
    let status = p.gw.tokens().status_json();
    assert_eq!(status["session"]["stopped"], true);
    assert!(
        p.gw.tokens().readiness().is_err(),
        "never held a session: not ready"
    );
    assert_eq!(status["session"]["attempts"], 4);
    assert_eq!(p.sim.lock_events(), 0);
}

#[tokio::test(start_paused = true)]
async fn ttl_then_stale_while_revalidate_then_new_data() {
    let p = InProc::new(
        sim_opts(),
        "[cache]\nttl = \"5m\"\nstale_while_revalidate = \"1m\"\n",
    )
    .await;
    let account = p.sim.account_names()[0].clone();
    let path = license_path(&account, 0);
    let first = p.get(&path).await;
    assert_eq!(first.header("x-cache"), "MISS");
    sleep(4 * MIN).await;
    for _ in 0..5 {
        let r = p.get(&path).await;
        assert_eq!(r.header("x-cache"), "HIT");
        assert_eq!(r.header("age"), "240");
        assert_eq!(r.header("cache-control"), "private, max-age=60");
    }
    assert_eq!(p.sim.count("licenses"), 1, "no upstream call within ttl");
    let new_body = r#"{"accountName":"changed","totalLicenses":1,"assignedLicenses":0,"hasMoreData":false,"lastSeenDeviceId":0,"deviceList":[]}"#;
    p.sim
        .apply(FaultRequest {
            body: Some(new_body.into()),
            ..FaultRequest::status("licenses", 1, 200)
        })
        .unwrap();
    sleep(MIN + Duration::from_secs(1)).await;
    let gw = Arc::new(p);
    let tasks: Vec<_> = (0..10)
        .map(|_| {
            let gw = gw.clone();
            let path = path.clone();
            tokio::spawn(async move { gw.get(&path).await })
        })
        .collect();
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.header("x-cache"), "STALE");
        assert_eq!(r.body, first.body);
    }
    gw.settle().await;
    assert_eq!(
        gw.sim.count("licenses"),
        2,
        "exactly one background refresh"
    );
    let r = gw.get(&path).await;
    assert_eq!(r.header("x-cache"), "HIT");
    assert_eq!(r.body.as_ref(), new_body.as_bytes());
}

#[tokio::test(start_paused = true)]
async fn stale_if_error_then_the_exact_error() {
    let p = InProc::new(
        sim_opts(),
        "[cache]\nttl = \"1m\"\nstale_while_revalidate = \"0s\"\nstale_if_error = \"10m\"\n[upstream]\nretries = 0\ncircuit_failures = 1000\n",
    )
    .await;
    let account = p.sim.account_names()[0].clone();
    let path = license_path(&account, 0);
    let original = p.get(&path).await;
    p.sim
        .apply(FaultRequest::status("licenses", 1000, 500))
        .unwrap();
    sleep(2 * MIN).await;
    let r = p.get(&path).await;
    assert_eq!(r.header("x-cache"), "STALE");
    assert_eq!(r.body, original.body);
    assert_eq!(r.header("cache-control"), "private, max-age=0");
    // 1 m fresh + 10 m stale-if-error, counted from the moment it went stale.
    sleep(8 * MIN).await;
    assert_eq!(
        p.get(&path).await.header("x-cache"),
        "STALE",
        "9 m after going stale"
    );
    sleep(2 * MIN).await;
    let r = p.get(&path).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    assert_eq!(r.error_code(), "GW_BAD_GATEWAY");
}

#[tokio::test(start_paused = true)]
async fn hanging_upstream_serves_stale_then_times_out() {
    let p = InProc::new(
        sim_opts(),
        "[cache]\nttl = \"1m\"\nstale_while_revalidate = \"0s\"\n[upstream]\ntimeout = \"2s\"\nretries = 1\n",
    )
    .await;
    let account = p.sim.account_names()[0].clone();
    let path = license_path(&account, 0);
    p.get(&path).await;
    sleep(2 * MIN).await;
    p.sim
        .apply(FaultRequest::kind("licenses", 100, "hang"))
        .unwrap();
    let started = Instant::now();
    let r = p.get(&path).await;
    assert_eq!(r.header("x-cache"), "STALE");
    assert!(started.elapsed() < Duration::from_secs(5));
    let imeis = p.sim.imeis(&account);
    let r = p.get(&license_path(&account, imeis[3])).await;
    assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(r.error_code(), "GW_UPSTREAM_TIMEOUT");
}

#[tokio::test(start_paused = true)]
async fn upstream_429_opens_a_cooldown() {
    let p = InProc::new(
        sim_opts(),
        "[cache]\nttl = \"10s\"\nstale_while_revalidate = \"0s\"\n",
    )
    .await;
    let account = p.sim.account_names()[0].clone();
    let imeis = p.sim.imeis(&account);
    let cached = license_path(&account, 0);
    p.get(&cached).await;
    sleep(Duration::from_secs(20)).await;
    p.sim
        .apply(FaultRequest {
            retry_after: Some("2".into()),
            ..FaultRequest::status("licenses", 1, 429)
        })
        .unwrap();
    let r = p.get(&cached).await;
    assert_eq!(
        r.header("x-cache"),
        "STALE",
        "the request that met the 429 is served stale"
    );
    let calls = p.sim.count("licenses");
    // During the cooldown: no upstream call; cached keys stale, others 503 with Retry-After.
    for i in 0..5 {
        let r = p.get(&cached).await;
        assert_eq!(r.header("x-cache"), "STALE");
        let r = p.get(&license_path(&account, imeis[i])).await;
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.error_code(), "GW_UPSTREAM_UNAVAILABLE");
        let ra: u64 = r.header("retry-after").parse().unwrap();
        assert!((1..=2).contains(&ra), "{ra}");
        sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(p.sim.count("licenses"), calls);
    assert!(p.gw.upstream().cooldown_until().is_some());
    sleep(Duration::from_secs(1)).await;
    let r = p.get(&license_path(&account, imeis[10])).await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "traffic recovers after the cooldown"
    );
    let m = p.gw.metrics().render();
    assert!(
        m.contains("thingspace_gateway_upstream_throttled_total{reason=\"upstream_429\"} 11"),
        "{m}"
    );
}

#[tokio::test(start_paused = true)]
async fn five_failures_open_the_circuit_then_one_probe_closes_it() {
    let p = InProc::new(
        sim_opts(),
        "[upstream]\nretries = 0\ncircuit_failures = 5\ncircuit_open_for = \"10s\"\n",
    )
    .await;
    let account = p.sim.account_names()[0].clone();
    let imeis = p.sim.imeis(&account);
    let url = |i: usize| license_path(&account, imeis[i]);
    // Let the start-up token calls finish before counting.
    assert_eq!(
        p.get(&license_path(&account, 0)).await.status,
        StatusCode::OK
    );
    p.sim
        .apply(FaultRequest::status("licenses", 5, 503))
        .unwrap();
    for i in 0..5 {
        assert_eq!(p.get(&url(i)).await.status, StatusCode::BAD_GATEWAY);
    }
    assert_eq!(p.gw.upstream().circuit_state().label(), "open");
    let calls = p.sim.count("licenses");
    for i in 5..10 {
        let r = p.get(&url(i)).await;
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.error_code(), "GW_UPSTREAM_UNAVAILABLE");
        assert!(!r.header("retry-after").is_empty());
    }
    assert_eq!(p.sim.count("licenses"), calls, "no call while open");
    sleep(Duration::from_secs(10)).await;
    assert_eq!(p.gw.upstream().circuit_state().label(), "half_open");
    // Exactly one probe goes through; it succeeds and closes the circuit.
    assert_eq!(p.get(&url(20)).await.status, StatusCode::OK);
    assert_eq!(p.sim.count("licenses"), calls + 1);
    assert_eq!(p.gw.upstream().circuit_state().label(), "closed");
    assert_eq!(p.get(&url(21)).await.status, StatusCode::OK);
}

#[tokio::test(start_paused = true)]
async fn failed_probe_reopens_and_only_one_probe_at_a_time() {
    let p = InProc::new(
        sim_opts(),
        "[upstream]\nretries = 0\ncircuit_failures = 2\ncircuit_open_for = \"10s\"\n",
    )
    .await;
    let account = p.sim.account_names()[0].clone();
    let imeis = p.sim.imeis(&account);
    assert_eq!(
        p.get(&license_path(&account, 0)).await.status,
        StatusCode::OK
    );
    p.sim
        .apply(FaultRequest::status("licenses", 3, 503))
        .unwrap();
    for i in 0..2 {
        p.get(&license_path(&account, imeis[i])).await;
    }
    sleep(Duration::from_secs(10)).await;
    let calls = p.sim.count("licenses");
    assert_eq!(
        p.get(&license_path(&account, imeis[5])).await.status,
        StatusCode::BAD_GATEWAY
    );
    assert_eq!(p.sim.count("licenses"), calls + 1, "one probe, not retried");
    assert_eq!(p.gw.upstream().circuit_state().label(), "open");
}

#[tokio::test(start_paused = true)]
async fn ten_times_overload_stays_within_the_budget() {
    let p = Arc::new(
        InProc::new(
            SimOptions {
                rate: Some(10.0),
                burst: Some(20),
                accounts: 1,
                devices: 5000,
                ..sim_opts()
            },
            "[upstream]\nrate_per_second = 10.0\nburst = 20\nmax_queue_wait = \"2s\"\n[server]\nrequest_timeout = \"5s\"\n",
        )
        .await,
    );
    let account = p.sim.account_names()[0].clone();
    let imeis = p.sim.imeis(&account);
    let started = Instant::now();
    let mut tasks = Vec::new();
    // 200 requests/s for distinct keys, for 5 s.
    for i in 0..1000 {
        let p = p.clone();
        let path = license_path(&account, imeis[i]);
        tasks.push(tokio::spawn(async move {
            let t0 = Instant::now();
            let r = p.get(&path).await;
            (r, t0.elapsed())
        }));
        sleep(Duration::from_millis(5)).await;
    }
    let (mut ok, mut shed) = (0, 0);
    for t in tasks {
        let (r, waited) = t.await.unwrap();
        assert!(waited <= Duration::from_secs(5), "{waited:?}");
        match r.status {
            StatusCode::OK => ok += 1,
            StatusCode::SERVICE_UNAVAILABLE => {
                assert!(!r.header("retry-after").is_empty());
                assert_eq!(r.error_code(), "GW_UPSTREAM_UNAVAILABLE");
                shed += 1;
            }
            s => panic!("unexpected {s}"),
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let upstream_calls: u64 = ["licenses", "oauth_token", "session_login"]
        .iter()
        .map(|e| p.sim.count(e))
        .sum();
    assert!(
        upstream_calls as f64 <= 20.0 + 10.0 * seconds,
        "{upstream_calls} calls in {seconds}s"
    );
    assert_eq!(
        p.sim.count_status("licenses", 429),
        0,
        "the simulator's own limiter never tripped"
    );
    assert!(ok >= 40, "{ok}");
    assert_eq!(ok + shed, 1000);
    let m = p.gw.metrics().render();
    assert!(m.contains(&format!(
        "thingspace_gateway_upstream_throttled_total{{reason=\"budget\"}} {shed}"
    )));
}
