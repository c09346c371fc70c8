//! Metrics: exact counter values after a known sequence, and no account or device id in them.

use crate::common::*;
use http::StatusCode;
use std::time::Duration;
use thingspace_sim::control::FaultRequest;

fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no series {series}"))
        .parse()
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn known_sequence_moves_exact_counters() {
    let p = InProc::new(
        sim_opts(),
        "[cache]\nttl = \"1m\"\nstale_while_revalidate = \"1m\"\n[upstream]\nretries = 0\n",
    )
    .await;
    let account = p.sim.account_names()[0].clone();
    let imeis = p.sim.imeis(&account);
    let (a, b, c) = (
        license_path(&account, 0),
        license_path(&account, imeis[0]),
        license_path(&account, imeis[1]),
    );
    // 2 misses, 3 hits.
    assert_eq!(p.get(&a).await.header("x-cache"), "MISS");
    assert_eq!(p.get(&b).await.header("x-cache"), "MISS");
    for _ in 0..3 {
        assert_eq!(p.get(&a).await.header("x-cache"), "HIT");
    }
    // 1 stale (its background refresh is one more upstream 200, not a lookup).
    tokio::time::sleep(Duration::from_secs(61)).await;
    assert_eq!(p.get(&a).await.header("x-cache"), "STALE");
    p.settle().await;
    // 1 upstream 500.
    p.sim
        .apply(FaultRequest::status("licenses", 1, 500))
        .unwrap();
    assert_eq!(p.get(&c).await.status, StatusCode::BAD_GATEWAY);
    // 1 token refresh: the upstream revokes the bearer; the next miss refreshes it.
    p.sim
        .apply(FaultRequest {
            revoke_tokens: true,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(p.get(&c).await.status, StatusCode::OK);

    let m = p.gw.metrics().render();
    let v = |s: &str| value(&m, s);
    assert_eq!(
        v("thingspace_gateway_cache_lookups_total{result=\"hit\"}"),
        3.0
    );
    assert_eq!(
        v("thingspace_gateway_cache_lookups_total{result=\"miss\"}"),
        4.0
    );
    assert_eq!(
        v("thingspace_gateway_cache_lookups_total{result=\"stale\"}"),
        1.0
    );
    assert_eq!(
        v("thingspace_gateway_cache_lookups_total{result=\"coalesced\"}"),
        0.0
    );
    assert_eq!(
        v("thingspace_gateway_http_requests_total{route=\"licenses\",status=\"200\"}"),
        7.0
    );
    assert_eq!(
        v("thingspace_gateway_http_requests_total{route=\"licenses\",status=\"502\"}"),
        1.0
    );
    assert_eq!(
        v("thingspace_gateway_http_request_duration_seconds_count{route=\"licenses\"}"),
        8.0
    );
    // Upstream: 2 misses + 1 refresh + the 401 and its retry = 200 x4, 500 x1, 401 x1.
    assert_eq!(
        v("thingspace_gateway_upstream_requests_total{endpoint=\"licenses\",status=\"200\"}"),
        4.0
    );
    assert_eq!(
        v("thingspace_gateway_upstream_requests_total{endpoint=\"licenses\",status=\"500\"}"),
        1.0
    );
    assert_eq!(
        v("thingspace_gateway_upstream_requests_total{endpoint=\"licenses\",status=\"401\"}"),
        1.0
    );
    assert_eq!(
        v("thingspace_gateway_upstream_requests_total{endpoint=\"oauth_token\",status=\"200\"}"),
        2.0
    );
    assert_eq!(
        v("thingspace_gateway_upstream_requests_total{endpoint=\"session_login\",status=\"200\"}"),
        2.0
    );
    assert_eq!(
        v("thingspace_gateway_token_refreshes_total{outcome=\"success\",token=\"oauth\"}"),
        2.0
    );
    assert_eq!(
        v("thingspace_gateway_token_refreshes_total{outcome=\"success\",token=\"session\"}"),
        2.0
    );
    assert_eq!(
        v("thingspace_gateway_token_refreshes_total{outcome=\"rejected\",token=\"session\"}"),
        0.0
    );
    assert_eq!(v("thingspace_gateway_upstream_inflight"), 0.0);
    assert_eq!(v("thingspace_gateway_circuit_open"), 0.0);
    assert!(v("thingspace_gateway_token_expiry_timestamp_seconds{token=\"oauth\"}") > 1.7e9);
    assert_eq!(
        v(&format!(
            "thingspace_gateway_build_info{{version=\"{}\"}}",
            env!("CARGO_PKG_VERSION")
        )),
        1.0
    );
}

#[tokio::test]
async fn scrape_has_every_required_metric_and_no_ids() {
    let sim = start_sim(sim_opts()).await;
    let gw = start_gateway(config(&sim.base_url(), "")).await;
    wait_ready(&gw).await;
    let account = sim.account_names()[0].clone();
    let imei = sim.imeis(&account)[7];
    for path in [
        license_path(&account, 0),
        license_path(&account, imei),
        format!("/gateway/v1/accounts/{account}/licenses/{imei}"),
        format!("/api/fota/v1/subscriptions/{account}"),
        "/nope/123456".to_string(),
    ] {
        get(&format!("{}{path}", gw.base_url())).await;
    }
    let m = get(&format!("{}/metrics", gw.admin_url())).await;
    assert_eq!(m.status, StatusCode::OK);
    assert!(m.header("content-type").starts_with("text/plain"));
    let text = String::from_utf8_lossy(&m.body);
    for name in [
        "thingspace_gateway_http_requests_total",
        "thingspace_gateway_http_request_duration_seconds_bucket",
        "thingspace_gateway_cache_lookups_total",
        "thingspace_gateway_cache_entries",
        "thingspace_gateway_cache_bytes",
        "thingspace_gateway_upstream_requests_total",
        "thingspace_gateway_upstream_request_duration_seconds_bucket",
        "thingspace_gateway_upstream_inflight",
        "thingspace_gateway_upstream_throttled_total",
        "thingspace_gateway_token_refreshes_total",
        "thingspace_gateway_token_expiry_timestamp_seconds",
        "thingspace_gateway_circuit_open",
        "thingspace_gateway_build_info",
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
        "process_open_fds",
    ] {
        assert!(text.contains(name), "missing {name}");
    }
    assert!(value(&text, "thingspace_gateway_cache_entries") >= 3.0);
    let prefix = &account[..10];
    assert!(!text.contains(prefix), "an account id is in /metrics");
    assert!(
        !text.contains(&imei.to_string()),
        "a device id is in /metrics"
    );
    assert!(!text.contains("123456"), "a raw path is in /metrics");
    assert!(text.contains("route=\"unmatched\",status=\"404\""));
}

/// Upstream connections are kept alive: sequential misses reuse them, and every upstream
/// response is counted once in `upstream_connections_total`, new or reused.
#[tokio::test]
async fn upstream_connections_are_reused_and_counted() {
    let sim = start_sim(sim_opts()).await;
    let gw = start_gateway(config(&sim.base_url(), "")).await;
    wait_ready(&gw).await;
    let account = sim.account_names()[0].clone();
    let imeis = sim.imeis(&account);
    for imei in &imeis[..10] {
        let r = get(&format!(
            "{}{}",
            gw.base_url(),
            license_path(&account, *imei)
        ))
        .await;
        assert_eq!(r.header("x-cache"), "MISS");
    }
    let text = String::from_utf8_lossy(&get(&format!("{}/metrics", gw.admin_url())).await.body)
        .to_string();
    let new = value(
        &text,
        "thingspace_gateway_upstream_connections_total{reused=\"false\"}",
    );
    let reused = value(
        &text,
        "thingspace_gateway_upstream_connections_total{reused=\"true\"}",
    );
    let upstream = ["oauth_token", "session_login", "licenses"]
        .iter()
        .map(|e| sim.count(e))
        .sum::<u64>();
    assert_eq!(sim.count("licenses"), 10);
    assert_eq!(new + reused, upstream as f64);
    assert!(new >= 1.0);
    // One client at a time: a connection is back in the pool long before the next miss.
    assert!(reused >= 8.0, "new {new}, reused {reused}");
}
