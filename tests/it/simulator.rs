//! The simulator over real sockets: every endpoint, every fault, the lock, and the control API.

use crate::common::*;
use http::{Method, StatusCode};
use serde_json::json;
use std::time::Duration;
use thingspace_gateway::sim_transport::sim_transport;
use thingspace_gateway::upstream::transport::OutRequest;
use thingspace_sim::{SimOptions, Simulator};

async fn token(sim: &Simulator) -> String {
    let r = request(
        Method::POST,
        &format!("{}/api/ts/v1/oauth2/token", sim.base_url()),
        &[
            ("authorization", &basic("demo-key", "demo-secret")),
            ("content-type", "application/x-www-form-urlencoded"),
        ],
        b"grant_type=client_credentials",
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    r.json()["access_token"].as_str().unwrap().to_string()
}

async fn login(sim: &Simulator, bearer: &str, password: &str) -> Resp {
    request(
        Method::POST,
        &format!("{}/api/m2m/v1/session/login", sim.base_url()),
        &[
            ("authorization", &format!("Bearer {bearer}")),
            ("content-type", "application/json"),
        ],
        json!({"username": "demo-user", "password": password})
            .to_string()
            .as_bytes(),
    )
    .await
}

async fn page(sim: &Simulator, path: &str, bearer: &str, session: &str) -> Resp {
    get_with(
        &format!("{}{path}", sim.base_url()),
        &[
            ("authorization", &format!("Bearer {bearer}")),
            ("vz-m2m-token", session),
        ],
    )
    .await
}

async fn fault(sim: &Simulator, body: serde_json::Value) {
    let r = request(
        Method::POST,
        &format!("{}/_sim/faults", sim.base_url()),
        &[("content-type", "application/json")],
        body.to_string().as_bytes(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
}

#[tokio::test]
async fn oauth_token_endpoint() {
    let sim = start_sim(sim_opts()).await;
    let url = format!("{}/api/ts/v1/oauth2/token", sim.base_url());
    let form = b"grant_type=client_credentials";
    let r = request(Method::POST, &url, &[], form).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.json()["fault"]["code"], "900902");
    assert_eq!(r.json()["fault"]["message"], "Missing Credentials");
    let r = request(
        Method::POST,
        &url,
        &[("authorization", &basic("demo-key", "nope"))],
        form,
    )
    .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.json()["fault"]["code"], "900901");
    let r = request(
        Method::POST,
        &url,
        &[("authorization", &basic("demo-key", "demo-secret"))],
        b"grant_type=password",
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.json()["error"], "unsupported_grant_type");
    let r = request(
        Method::POST,
        &url,
        &[("authorization", &basic("demo-key", "demo-secret"))],
        form,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let body = r.json();
    assert_eq!(body["token_type"], "Bearer");
    assert!(body["scope"].is_string());
    let first = body["access_token"].as_str().unwrap().to_string();
    let expires = body["expires_in"].as_u64().unwrap();
    assert!((3599..=3600).contains(&expires), "{expires}");
    // The same token while it is valid.
    assert_eq!(token(&sim).await, first);
}

#[tokio::test]
async fn session_login_and_lock_after_five_failures() {
    let sim = start_sim(sim_opts()).await;
    let t = token(&sim).await;
    let r = login(&sim, "bogus", "demo-pass").await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.json()["fault"]["code"], "900901");
    for _ in 0..4 {
        let r = login(&sim, &t, "wrong").await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        assert_eq!(
            r.error_code(),
            "UnifiedWebService.REQUEST_FAILED.InvalidCredentials"
        );
    }
    // A success in between resets the count.
    assert_eq!(login(&sim, &t, "demo-pass").await.status, StatusCode::OK);
    for _ in 0..5 {
        assert_eq!(
            login(&sim, &t, "wrong").await.status,
            StatusCode::BAD_REQUEST
        );
    }
    let r = login(&sim, &t, "demo-pass").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        r.error_code(),
        "UnifiedWebService.REQUEST_FAILED.UserLocked"
    );
    fault(&sim, json!({"unlock_users": true})).await;
    let r = login(&sim, &t, "demo-pass").await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(!r.json()["sessionToken"].as_str().unwrap().is_empty());
}

#[tokio::test]
async fn license_pages_errors_and_cursor_walk() {
    let sim = start_sim(SimOptions {
        devices: 2500,
        page_size: 1000,
        ..sim_opts()
    })
    .await;
    let account = sim.account_names()[0].clone();
    assert_eq!(account, "0402196254-00001");
    let (t, s) = sim_tokens(&sim).await;
    let path = license_path(&account, 0);
    // Missing, wrong bearer; missing session.
    let r = get(&format!("{}{path}", sim.base_url())).await;
    assert_eq!(
        (r.status, r.json()["fault"]["code"].as_str().unwrap()),
        (StatusCode::UNAUTHORIZED, "900902")
    );
    let r = page(&sim, &path, "wrong", &s).await;
    assert_eq!(
        (r.status, r.json()["fault"]["code"].as_str().unwrap()),
        (StatusCode::UNAUTHORIZED, "900901")
    );
    let r = page(&sim, &path, &t, "nope").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        r.error_code(),
        "UnifiedWebService.REQUEST_FAILED.SessionToken.Expired"
    );
    // Unknown account, bad index, bad cursor.
    let r = page(&sim, &license_path("0000000000-99999", 0), &t, &s).await;
    assert_eq!(
        r.error_code(),
        "UnifiedWebService.REQUEST_FAILED.AccountNotFound"
    );
    let r = page(
        &sim,
        &format!("/api/fota/v1/licenses/{account}/index/abc"),
        &t,
        &s,
    )
    .await;
    assert_eq!(
        (r.status, r.json()["errorMessage"].as_str().unwrap()),
        (StatusCode::BAD_REQUEST, "Invalid index value")
    );
    let r = page(&sim, &license_path(&account, 12345), &t, &s).await;
    assert_eq!(
        r.json(),
        json!({"errorCode": "INVALID_PARAMETER", "errorMessage": "LastSeenDeviceId Not Valid"})
    );
    // Walk every page: every device exactly once, in order.
    let imeis = sim.imeis(&account);
    let mut seen = Vec::new();
    let mut index = 0u64;
    let mut pages = 0;
    loop {
        let r = page(&sim, &license_path(&account, index), &t, &s).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.header("content-type"), "application/json");
        let p = r.json();
        assert_eq!(p["accountName"], account.as_str());
        assert_eq!(p["assignedLicenses"], 2500);
        for d in p["deviceList"].as_array().unwrap() {
            let id = d["deviceId"].as_str().unwrap();
            assert_eq!(id.len(), 15);
            assert!(d["assignmentTime"].is_string());
            seen.push(id.parse::<u64>().unwrap());
        }
        pages += 1;
        if !p["hasMoreData"].as_bool().unwrap() {
            assert_eq!(p["lastSeenDeviceId"], 0);
            break;
        }
        index = p["lastSeenDeviceId"].as_u64().unwrap();
        assert_eq!(Some(&index), seen.last());
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, imeis);
    let odd = String::from_utf8_lossy(&page(&sim, &license_path(&account, 0), &t, &s).await.body)
        .into_owned();
    assert!(odd.contains("\"01-01-1900 0:0:0 +0000 UTC\""));
    // Subscriptions.
    let r = page(
        &sim,
        &format!("/api/fota/v1/subscriptions/{account}"),
        &t,
        &s,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["accountName"], account.as_str());
}

#[tokio::test]
async fn faults_and_control_api() {
    let sim = start_sim(sim_opts()).await;
    let account = sim.account_names()[0].clone();
    let (t, s) = sim_tokens(&sim).await;
    let path = license_path(&account, 0);

    fault(&sim, json!({"endpoint": "licenses", "count": 2, "kind": "status", "status": 503, "retry_after": "7"})).await;
    for _ in 0..2 {
        let r = page(&sim, &path, &t, &s).await;
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.header("retry-after"), "7");
        assert_eq!(r.error_code(), "SIMULATED_503");
    }
    assert_eq!(page(&sim, &path, &t, &s).await.status, StatusCode::OK);

    fault(
        &sim,
        json!({"endpoint": "licenses", "kind": "status", "status": 500, "body": "{\"x\":1}"}),
    )
    .await;
    let r = page(&sim, &path, &t, &s).await;
    assert_eq!(
        (r.status, r.body.as_ref()),
        (StatusCode::INTERNAL_SERVER_ERROR, b"{\"x\":1}".as_ref())
    );

    fault(&sim, json!({"endpoint": "licenses", "kind": "malformed"})).await;
    let r = page(&sim, &path, &t, &s).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.body.starts_with(b"<html>"));

    fault(
        &sim,
        json!({"endpoint": "licenses", "kind": "oversized", "bytes": 3_000_000}),
    )
    .await;
    let r = page(&sim, &path, &t, &s).await;
    assert_eq!(r.body.len(), 3_000_000);

    fault(&sim, json!({"endpoint": "licenses", "kind": "loop_cursor"})).await;
    let r = page(&sim, &license_path(&account, 0), &t, &s).await;
    assert_eq!(r.json()["hasMoreData"], true);
    assert_eq!(r.json()["lastSeenDeviceId"], 0);

    fault(&sim, json!({"endpoint": "licenses", "kind": "close"})).await;
    let url = format!("{}{path}", sim.base_url());
    let req = http::Request::get(&url)
        .header("authorization", format!("Bearer {t}"))
        .header("vz-m2m-token", &s)
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http();
    assert!(
        client.request(req).await.is_err(),
        "connection closed without an answer"
    );

    fault(
        &sim,
        json!({"endpoint": "licenses", "kind": "hang", "hang": "300ms"}),
    )
    .await;
    let started = std::time::Instant::now();
    let r = page(&sim, &path, &t, &s).await;
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT);

    // Expire sessions, revoke bearer tokens.
    fault(&sim, json!({"expire_sessions": true})).await;
    assert_eq!(
        page(&sim, &path, &t, &s).await.error_code(),
        "UnifiedWebService.REQUEST_FAILED.SessionToken.Expired"
    );
    fault(&sim, json!({"revoke_tokens": true})).await;
    assert_eq!(
        page(&sim, &path, &t, &s).await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_ne!(token(&sim).await, t, "a new token after revocation");

    // Rate limit at run time: burst 2, then 429 with Retry-After.
    let (t, s) = sim_tokens(&sim).await;
    fault(&sim, json!({"rate": 0.5, "burst": 2})).await;
    assert_eq!(page(&sim, &path, &t, &s).await.status, StatusCode::OK);
    assert_eq!(page(&sim, &path, &t, &s).await.status, StatusCode::OK);
    let r = page(&sim, &path, &t, &s).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.header("retry-after"), "2");
    fault(&sim, json!({"rate": 0})).await;

    // Latency at run time.
    fault(&sim, json!({"latency": "200ms"})).await;
    let started = std::time::Instant::now();
    page(&sim, &path, &t, &s).await;
    assert!(started.elapsed() >= Duration::from_millis(200));

    // Bad fault requests are refused.
    let r = request(
        Method::POST,
        &format!("{}/_sim/faults", sim.base_url()),
        &[],
        br#"{"kind":"explode"}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);

    // Stats, accounts, reset.
    let stats = get(&format!("{}/_sim/stats", sim.base_url())).await.json();
    assert_eq!(stats["requests"]["licenses"]["503"], 2);
    assert_eq!(
        stats["requests"]["licenses"]["0"], 1,
        "the closed connection"
    );
    assert!(stats["max_concurrency"].as_u64().unwrap() >= 1);
    let accounts = get(&format!("{}/_sim/accounts", sim.base_url()))
        .await
        .json();
    assert_eq!(accounts.as_array().unwrap().len(), 3);
    assert_eq!(accounts[0]["devices"], 2500);
    let r = request(
        Method::POST,
        &format!("{}/_sim/reset", sim.base_url()),
        &[],
        b"",
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let stats = get(&format!("{}/_sim/stats", sim.base_url())).await.json();
    assert_eq!(stats["requests"], json!({}));
    assert_eq!(
        page(&sim, &path, &t, &s).await.status,
        StatusCode::UNAUTHORIZED,
        "reset forgets tokens"
    );
}

#[tokio::test]
async fn https_with_generated_certificate() {
    thingspace_gateway::upstream::tls::install_crypto_provider();
    let dir = std::env::temp_dir().join(format!("tsgw-sim-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let pem = dir.join("sim.pem");
    let sim = start_sim(SimOptions {
        tls_cert_out: Some(pem.clone()),
        ..sim_opts()
    })
    .await;
    assert!(sim.base_url().starts_with("https://"));
    let gw = start_gateway(config(
        &sim.base_url(),
        &format!("[upstream]\nca_file = {:?}\n", pem.display().to_string()),
    ))
    .await;
    wait_ready(&gw).await;
    let account = sim.account_names()[0].clone();
    let r = get(&format!("{}{}", gw.base_url(), license_path(&account, 0))).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(sim.count("licenses"), 1);
    // Without the CA the certificate is refused: verification is always on.
    // The token call cannot connect: not the credentials' fault, so 503 (SPEC §4).
    let gw2 = start_gateway(config(&sim.base_url(), "")).await;
    let r = get(&format!("{}{}", gw2.base_url(), license_path(&account, 0))).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.error_code(), "GW_UPSTREAM_UNAVAILABLE");
}

#[tokio::test(start_paused = true)]
async fn token_and_session_expiry_under_paused_time() {
    let sim = start_sim(SimOptions {
        token_ttl: Duration::from_secs(3600),
        session_idle: Duration::from_secs(600),
        ..sim_opts()
    })
    .await;
    let t = sim_transport(&sim, 1 << 26);
    let send = |method: Method,
                path: String,
                headers: Vec<(&'static str, String)>,
                body: &'static [u8]| {
        let mut h = http::HeaderMap::new();
        for (k, v) in headers {
            h.insert(k, v.parse().unwrap());
        }
        t.send(
            OutRequest {
                method,
                path,
                headers: h,
                body: bytes::Bytes::from_static(body),
            },
            Duration::from_secs(5),
        )
    };
    let token_request = || {
        send(
            Method::POST,
            "/api/ts/v1/oauth2/token".into(),
            vec![("authorization", basic("demo-key", "demo-secret"))],
            b"grant_type=client_credentials",
        )
    };
    let r = token_request().await.unwrap();
    let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    let bearer = body["access_token"].as_str().unwrap().to_string();
    tokio::time::advance(Duration::from_secs(1800)).await;
    let r = token_request().await.unwrap();
    let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(
        body["access_token"],
        bearer.as_str(),
        "same token within the hour"
    );
    assert_eq!(body["expires_in"], 1800, "expires_in is the remainder");
    let login = || {
        send(
            Method::POST,
            "/api/m2m/v1/session/login".into(),
            vec![("authorization", format!("Bearer {bearer}"))],
            br#"{"username":"demo-user","password":"demo-pass"}"#,
        )
    };
    let r = login().await.unwrap();
    let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    let session = body["sessionToken"].as_str().unwrap().to_string();
    let account = sim.account_names()[0].clone();
    let get_page = || {
        send(
            Method::GET,
            license_path(&account, 0),
            vec![
                ("authorization", format!("Bearer {bearer}")),
                ("vz-m2m-token", session.clone()),
            ],
            b"",
        )
    };
    assert_eq!(get_page().await.unwrap().status, StatusCode::OK);
    // Use keeps the session alive; ten idle minutes expire it.
    tokio::time::advance(Duration::from_secs(599)).await;
    assert_eq!(get_page().await.unwrap().status, StatusCode::OK);
    tokio::time::advance(Duration::from_secs(600)).await;
    let r = get_page().await.unwrap();
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(String::from_utf8_lossy(&r.body).contains("SessionToken.Expired"));
    // The bearer expires at one hour.
    tokio::time::advance(Duration::from_secs(601)).await;
    let r = login().await.unwrap();
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
}
