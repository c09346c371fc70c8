//! Gateway core over real sockets: simulator + gateway on port 0.

use crate::common::*;
use http::{Method, StatusCode};
use serde_json::json;
use std::sync::Arc;
use thingspace_sim::control::FaultRequest;
use thingspace_sim::SimOptions;

#[tokio::test]
async fn full_cursor_walk_is_byte_for_byte() {
    let sim = start_sim(sim_opts()).await;
    let gw = start_gateway(config(&sim.base_url(), "")).await;
    let account = sim.account_names()[1].clone();
    // The same walk straight at the simulator, with tokens of our own.
    let (t, s) = sim_tokens(&sim).await;
    let mut index = 0;
    let mut pages = 0;
    loop {
        let through = get(&format!(
            "{}{}",
            gw.base_url(),
            license_path(&account, index)
        ))
        .await;
        let direct = get_with(
            &format!("{}{}", sim.base_url(), license_path(&account, index)),
            &[
                ("authorization", &format!("Bearer {t}")),
                ("vz-m2m-token", &s),
            ],
        )
        .await;
        assert_eq!(through.status, StatusCode::OK);
        assert_eq!(through.body, direct.body, "page at {index} differs");
        assert_eq!(through.header("content-type"), "application/json");
        assert_eq!(through.header("x-cache"), "MISS");
        pages += 1;
        let p = through.json();
        if !p["hasMoreData"].as_bool().unwrap() {
            break;
        }
        index = p["lastSeenDeviceId"].as_u64().unwrap();
    }
    assert_eq!(pages, 3);
    assert_eq!(sim.count_status("licenses", 200), 2 * 3);
}

#[tokio::test]
async fn concurrent_start_makes_one_token_call_and_one_login() {
    let sim = start_sim(sim_opts()).await;
    let gw = start_gateway(config(
        &sim.base_url(),
        "[upstream]\nrate_per_second = 1000.0\nburst = 1000\nmax_concurrent = 64\n",
    ))
    .await;
    let account = sim.account_names()[0].clone();
    let imeis = sim.imeis(&account);
    let http = Arc::new(Http::new());
    let mut tasks = Vec::new();
    for (i, imei) in imeis.iter().take(200).enumerate() {
        let index = if i == 0 { 0 } else { *imei };
        let url = format!("{}{}", gw.base_url(), license_path(&account, index));
        let http = http.clone();
        tasks.push(tokio::spawn(async move { http.get(&url).await.status }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), StatusCode::OK);
    }
    assert_eq!(sim.count("oauth_token"), 1);
    assert_eq!(sim.count("session_login"), 1);
    assert_eq!(sim.count("licenses"), 200);
}

#[tokio::test]
async fn revoked_tokens_and_expired_sessions_are_invisible() {
    let sim = start_sim(sim_opts()).await;
    let gw = start_gateway(config(
        &sim.base_url(),
        "[upstream]\nrate_per_second = 1000.0\nburst = 1000\nmax_concurrent = 32\n",
    ))
    .await;
    wait_ready(&gw).await;
    let account = sim.account_names()[0].clone();
    let imeis = sim.imeis(&account);
    let http = Arc::new(Http::new());
    let burst = |from: usize| {
        let http = http.clone();
        let urls: Vec<String> = (from..from + 100)
            .map(|i| format!("{}{}", gw.base_url(), license_path(&account, imeis[i])))
            .collect();
        async move {
            let tasks: Vec<_> = urls
                .into_iter()
                .map(|u| {
                    let http = http.clone();
                    tokio::spawn(async move { http.get(&u).await.status })
                })
                .collect();
            for t in tasks {
                assert_eq!(t.await.unwrap(), StatusCode::OK);
            }
        }
    };
    burst(0).await;
    assert_eq!(
        (sim.count("oauth_token"), sim.count("session_login")),
        (1, 1)
    );
    sim.apply(FaultRequest {
        revoke_tokens: true,
        ..Default::default()
    })
    .unwrap();
    burst(100).await;
    // A 401 renews the bearer and the session: one call each.
    assert_eq!(
        (sim.count("oauth_token"), sim.count("session_login")),
        (2, 2)
    );
    sim.apply(FaultRequest {
        expire_sessions: true,
        ..Default::default()
    })
    .unwrap();
    burst(200).await;
    assert_eq!(
        (sim.count("oauth_token"), sim.count("session_login")),
        (2, 3)
    );
    assert!(sim.count_status("licenses", 401) >= 1);
    assert!(sim.count_status("licenses", 400) >= 1);
}

#[tokio::test]
async fn wrong_password_pauses_logins_before_the_lock() {
    let sim = start_sim(sim_opts()).await;
    let cfg = config(
        &sim.base_url(),
        "[credentials]\npassword = \"wrong\"\nmax_failed_logins = 2\nlogin_pause = \"15m\"\n",
    );
    let gw = start_gateway(cfg).await;
    let account = sim.account_names()[0].clone();
    let mut last = None;
    for i in 0..10 {
        let r = get(&format!("{}{}", gw.base_url(), license_path(&account, 0))).await;
        assert_eq!(r.status, StatusCode::BAD_GATEWAY, "request {i}");
        assert_eq!(r.error_code(), "GW_UPSTREAM_AUTH_FAILED");
        last = Some(r);
    }
    let msg = last.unwrap().json()["errorMessage"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(msg, "upstream logins are paused after rejected credentials");
    assert!(!msg.contains("wrong"), "no secret in the error body");
    assert_eq!(
        sim.count_status("session_login", 400),
        2,
        "exactly max_failed_logins rejected logins"
    );
    assert_eq!(sim.count("licenses"), 0);
    let ready = get(&format!("{}/readyz", gw.admin_url())).await;
    assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(ready.body.windows(6).any(|w| w == b"paused"));
    let status = get(&format!("{}/status", gw.admin_url())).await.json();
    assert_eq!(status["tokens"]["session"]["failures"], 2);
    assert_eq!(status["tokens"]["session"]["attempts"], 2);
    assert_eq!((sim.rejected_logins(), sim.lock_events()), (2, 0));
    assert!(status["tokens"]["session"]["paused_until"].is_string());
    // The simulator's user is not locked: the right password still works there.
    sim_tokens(&sim).await;
}

#[tokio::test]
async fn input_rules_make_no_upstream_call() {
    let sim = start_sim(sim_opts()).await;
    let gw = start_gateway(config(&sim.base_url(), "")).await;
    wait_ready(&gw).await;
    let base = gw.base_url();
    let cases: &[(&str, u16, &str, &str)] = &[
        (
            "/api/fota/v1/licenses//index/0",
            400,
            "INVALID_PARAMETER",
            "Invalid account name format",
        ),
        (
            "/api/fota/v1/licenses/a.b/index/0",
            400,
            "INVALID_PARAMETER",
            "Invalid account name format",
        ),
        (
            "/api/fota/v1/licenses/a%2F/index/0",
            400,
            "INVALID_PARAMETER",
            "Invalid account name format",
        ),
        (
            "/api/fota/v1/licenses/a/index/x",
            400,
            "INVALID_PARAMETER",
            "Invalid index value",
        ),
        (
            "/api/fota/v1/licenses/a/index/99999999999999999999",
            400,
            "INVALID_PARAMETER",
            "Invalid index value",
        ),
        (
            "/api/fota/v1/subscriptions/a_b",
            400,
            "INVALID_PARAMETER",
            "Invalid account name format",
        ),
        (
            "/gateway/v1/accounts/a/licenses/1x",
            400,
            "INVALID_PARAMETER",
            "Invalid device id format",
        ),
        (
            "/api/fota/v1/licenses/a/index/0/extra",
            404,
            "GW_NOT_FOUND",
            "",
        ),
        ("/nope", 404, "GW_NOT_FOUND", ""),
    ];
    for (path, status, code, message) in cases {
        let r = get(&format!("{base}{path}")).await;
        assert_eq!(r.status.as_u16(), *status, "{path}");
        assert_eq!(r.error_code(), *code, "{path}");
        if !message.is_empty() {
            assert_eq!(r.json()["errorMessage"], *message, "{path}");
        }
    }
    let r = request(
        Method::DELETE,
        &format!("{base}/api/fota/v1/licenses/a/index/0"),
        &[],
        b"",
    )
    .await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(r.header("allow"), "GET, HEAD");
    assert_eq!(r.error_code(), "GW_METHOD_NOT_ALLOWED");
    assert_eq!(sim.count("licenses") + sim.count("subscriptions"), 0);
    // A query string is ignored and never forwarded.
    let account = sim.account_names()[0].clone();
    let r = get(&format!(
        "{base}{}?x=1&startIndex=5",
        license_path(&account, 0)
    ))
    .await;
    assert_eq!(r.status, StatusCode::OK);
}

#[tokio::test]
async fn upstream_hang_oversize_and_garbage() {
    let sim = start_sim(sim_opts()).await;
    let gw = start_gateway(config(
        &sim.base_url(),
        "[upstream]\ntimeout = \"300ms\"\nretries = 0\nmax_response_bytes = \"1MiB\"\n",
    ))
    .await;
    wait_ready(&gw).await;
    let account = sim.account_names()[0].clone();
    let url = |i| format!("{}{}", gw.base_url(), license_path(&account, i));
    let imeis = sim.imeis(&account);

    sim.apply(FaultRequest::kind("licenses", 1, "hang"))
        .unwrap();
    let started = std::time::Instant::now();
    let r = get(&url(0)).await;
    assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(r.error_code(), "GW_UPSTREAM_TIMEOUT");
    assert!(started.elapsed() < std::time::Duration::from_secs(3));

    sim.apply(FaultRequest {
        bytes: Some(2 << 20),
        ..FaultRequest::kind("licenses", 1, "oversized")
    })
    .unwrap();
    let r = get(&url(imeis[0])).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    assert_eq!(r.error_code(), "GW_BAD_GATEWAY");

    sim.apply(FaultRequest::kind("licenses", 1, "malformed"))
        .unwrap();
    let r = get(&url(imeis[1])).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    assert!(r.json()["errorMessage"]
        .as_str()
        .unwrap()
        .contains("not a JSON object"));

    // None of those were cached: the next request goes upstream and succeeds.
    let r = get(&url(imeis[0])).await;
    assert_eq!((r.status, r.header("x-cache")), (StatusCode::OK, "MISS"));
}

#[tokio::test]
async fn malformed_token_response_backs_off() {
    let sim = start_sim(sim_opts()).await;
    sim.apply(FaultRequest {
        body: Some("{\"access_token\": 42}".into()),
        ..FaultRequest::status("oauth_token", 100, 200)
    })
    .unwrap();
    let gw = start_gateway(config(&sim.base_url(), "")).await;
    let account = sim.account_names()[0].clone();
    for _ in 0..20 {
        let r = get(&format!("{}{}", gw.base_url(), license_path(&account, 0))).await;
        // Not the credentials' fault (SPEC §4): 503 with Retry-After, fixed words.
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.error_code(), "GW_UPSTREAM_UNAVAILABLE");
        assert!(!r.header("retry-after").is_empty());
        assert_eq!(
            r.json()["errorMessage"],
            "upstream tokens are temporarily unavailable; retry later"
        );
    }
    // Backoff: twenty client requests did not become twenty token calls.
    assert!(
        sim.count("oauth_token") <= 2,
        "{}",
        sim.count("oauth_token")
    );
    assert_eq!(
        get(&format!("{}/healthz", gw.admin_url())).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn client_credentials_never_reach_the_upstream() {
    let sim = start_sim(sim_opts()).await;
    let gw = start_gateway(config(&sim.base_url(), "")).await;
    let account = sim.account_names()[0].clone();
    let r = get_with(
        &format!("{}{}", gw.base_url(), license_path(&account, 0)),
        &[
            ("authorization", "Bearer client-own-token"),
            ("vz-m2m-token", "client-own-session"),
            ("cookie", "a=b"),
            ("x-request-id", "req-123"),
        ],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("x-request-id"), "req-123");
    let seen = sim.last_headers("licenses");
    let all = format!("{seen:?}");
    assert!(!all.contains("client-own"), "{all}");
    assert!(!all.contains("a=b"), "{all}");
    assert_eq!(seen.iter().filter(|(k, _)| k == "authorization").count(), 1);
    assert_eq!(seen.iter().filter(|(k, _)| k == "vz-m2m-token").count(), 1);
    assert!(seen
        .iter()
        .any(|(k, v)| k == "x-request-id" && v == "req-123"));
}

#[tokio::test]
async fn readiness_and_health() {
    let sim = start_sim(SimOptions { ..sim_opts() }).await;
    let gw = start_gateway(config(&sim.base_url(), "")).await;
    wait_ready(&gw).await;
    assert_eq!(
        get(&format!("{}/healthz", gw.admin_url())).await.json(),
        json!({"status": "ok"})
    );
    let status = get(&format!("{}/status", gw.admin_url())).await.json();
    assert_eq!(status["tokens"]["oauth"]["held"], true);
    assert_eq!(status["tokens"]["session"]["held"], true);
    assert_eq!(status["upstream"]["circuit"], "closed");
    assert!(status["upstream"]["budget_available"].is_number());
    assert!(status["tokens"]["oauth"]["expires_at"]
        .as_str()
        .unwrap()
        .ends_with('Z'));
    let r = request(
        Method::POST,
        &format!("{}/readyz", gw.admin_url()),
        &[],
        b"",
    )
    .await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn upstream_token_lifetime_lies_are_survived() {
    let sim = start_sim(sim_opts()).await;
    // A bogus token that claims to live forever: the session login with it is refused (401), the
    // gateway renews the token once and the client never sees the error.
    sim.apply(FaultRequest {
        body: Some(
            r#"{"access_token":"bogus","token_type":"Bearer","expires_in":18446744073709551615}"#
                .into(),
        ),
        ..FaultRequest::status("oauth_token", 1, 200)
    })
    .unwrap();
    let gw = start_gateway(config(&sim.base_url(), "")).await;
    let account = sim.account_names()[0].clone();
    let r = get(&format!("{}{}", gw.base_url(), license_path(&account, 0))).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(sim.count_status("session_login", 401), 1);
    assert_eq!(sim.count("oauth_token"), 2);
    assert_eq!(sim.count_status("licenses", 200), 1);
    let status = get(&format!("{}/status", gw.admin_url())).await.json();
    assert_eq!(status["tokens"]["oauth"]["held"], true);
}
