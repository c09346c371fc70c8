//! Client security: registry, gateway tokens, SDK drop-in flow, hostile input.

use crate::common::*;
use base64::Engine;
use http::{Method, StatusCode};
use thingspace_gateway::clients::sha256_hex;
use thingspace_sim::Simulator;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The clients every test here registers; `key` is padded to the 32 bytes a signing key needs.
fn clients_toml(sim: &Simulator, key: &str) -> String {
    clients_toml_with(sim, key, "ops-secret")
}

fn clients_toml_with(sim: &Simulator, key: &str, ops_secret: &str) -> String {
    let a = &sim.account_names()[0];
    format!(
        r#"
[clients]
mode = "required"
token_signing_key = "{}"
[[clients.client]]
id = "billing"
secret_sha256 = "{}"
accounts = ["{a}"]
rate_per_second = 1000.0
burst = 1000
[[clients.client]]
id = "ops"
secret_sha256 = "{}"
accounts = ["*"]
[[clients.client]]
id = "slow"
secret_sha256 = "{}"
accounts = ["*"]
rate_per_second = 0.5
burst = 2
"#,
        signing_key(key),
        sha256_hex("billing-secret"),
        sha256_hex(ops_secret),
        sha256_hex("slow-secret"),
    )
}

fn signing_key(key: &str) -> String {
    format!("{key}-0123456789abcdef0123456789abcdef")
}

/// No test here may cost the upstream user a rejected login.
fn assert_no_rejected_login(sim: &Simulator) {
    assert_eq!(
        sim.count("session_login"),
        sim.count_status("session_login", 200),
        "every upstream login accepted"
    );
}

/// Sends raw bytes (for request targets no HTTP client would send) and returns the status and body.
async fn raw(addr: std::net::SocketAddr, request: &[u8]) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), s.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

#[tokio::test]
async fn sdk_flow_works_with_only_the_base_url_changed() {
    let sim = start_sim(sim_opts()).await;
    let gw = start_gateway(config(&sim.base_url(), &clients_toml(&sim, "k1"))).await;
    let account = sim.account_names()[0].clone();
    // What the official SDK sends: token request, then the page with Bearer + VZ-M2M-Token.
    let token = gateway_token(&gw.base_url(), "billing", "billing-secret").await;
    let login = request(
        Method::POST,
        &format!("{}/api/m2m/v1/session/login", gw.base_url()),
        &[
            ("authorization", &format!("Bearer {token}")),
            ("content-type", "application/json"),
        ],
        br#"{"username":"someone","password":"whatever"}"#,
    )
    .await;
    assert_eq!(login.status, StatusCode::OK);
    let session = login.json()["sessionToken"].as_str().unwrap().to_string();
    let r = get_with(
        &format!("{}{}", gw.base_url(), license_path(&account, 0)),
        &[
            ("authorization", &format!("Bearer {token}")),
            ("vz-m2m-token", &session),
        ],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["accountName"], account.as_str());
    // The local login never reached the upstream with the client's credentials.
    assert!(!format!("{:?}", sim.last_headers("session_login")).contains(&token));
}

#[tokio::test]
async fn accounts_rates_and_credentials() {
    let sim = start_sim(sim_opts()).await;
    let gw = start_gateway(config(&sim.base_url(), &clients_toml(&sim, "k1"))).await;
    let names = sim.account_names();
    let url = |a: &str| format!("{}{}", gw.base_url(), license_path(a, 0));
    // B cold: 403, and no upstream call.
    let r = get_with(
        &url(&names[1]),
        &[("authorization", &basic("billing", "billing-secret"))],
    )
    .await;
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (StatusCode::FORBIDDEN, "GW_FORBIDDEN")
    );
    assert_eq!(sim.count("licenses"), 0);
    // B cached by another client: still 403.
    let r = get_with(
        &url(&names[1]),
        &[("authorization", &basic("ops", "ops-secret"))],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let r = get_with(
        &url(&names[1]),
        &[("authorization", &basic("billing", "billing-secret"))],
    )
    .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert!(!r.body.windows(8).any(|w| w == b"deviceId"));
    // Own account: fine.
    let r = get_with(
        &url(&names[0]),
        &[("authorization", &basic("billing", "billing-secret"))],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    // Per-client rate: burst 2 then 429 with Retry-After.
    for _ in 0..2 {
        let r = get_with(
            &url(&names[0]),
            &[("authorization", &basic("slow", "slow-secret"))],
        )
        .await;
        assert_eq!(r.status, StatusCode::OK);
    }
    let r = get_with(
        &url(&names[0]),
        &[("authorization", &basic("slow", "slow-secret"))],
    )
    .await;
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (StatusCode::TOO_MANY_REQUESTS, "GW_RATE_LIMITED")
    );
    assert_eq!(r.header("retry-after"), "2");
    // Wrong, missing, unknown credentials: 401 with WWW-Authenticate, at the token endpoint too.
    for auth in [
        Some(basic("billing", "wrong")),
        Some(basic("nobody", "billing-secret")),
        Some("Bearer not-a-token".to_string()),
        Some("Digest abc".to_string()),
        None,
    ] {
        let headers: Vec<(&str, &str)> =
            auth.iter().map(|a| ("authorization", a.as_str())).collect();
        let r = get_with(&url(&names[0]), &headers).await;
        assert_eq!(
            (r.status, r.error_code().as_str()),
            (StatusCode::UNAUTHORIZED, "GW_UNAUTHORIZED"),
            "{auth:?}"
        );
        assert!(!r.header("www-authenticate").is_empty());
        let r = request(
            Method::POST,
            &format!("{}/api/ts/v1/oauth2/token", gw.base_url()),
            &headers,
            b"grant_type=client_credentials",
        )
        .await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{auth:?}");
    }
    let r = request(
        Method::POST,
        &format!("{}/api/ts/v1/oauth2/token", gw.base_url()),
        &[("authorization", &basic("ops", "ops-secret"))],
        b"grant_type=password",
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn tokens_cross_instances_only_with_the_same_key() {
    let sim = start_sim(sim_opts()).await;
    let a = start_gateway(config(&sim.base_url(), &clients_toml(&sim, "shared-key"))).await;
    let b = start_gateway(config(&sim.base_url(), &clients_toml(&sim, "shared-key"))).await;
    let c = start_gateway(config(&sim.base_url(), &clients_toml(&sim, "other-key"))).await;
    let token = gateway_token(&a.base_url(), "ops", "ops-secret").await;
    let path = license_path(&sim.account_names()[0], 0);
    let bearer = format!("Bearer {token}");
    assert_eq!(
        get_with(
            &format!("{}{path}", b.base_url()),
            &[("authorization", &bearer)]
        )
        .await
        .status,
        StatusCode::OK
    );
    assert_eq!(
        get_with(
            &format!("{}{path}", c.base_url()),
            &[("authorization", &bearer)]
        )
        .await
        .status,
        StatusCode::UNAUTHORIZED
    );
    // Any byte changed: 401.
    let bytes = token.as_bytes();
    for i in (0..bytes.len()).step_by(3) {
        let mut t = bytes.to_vec();
        t[i] = if t[i] == b'x' { b'y' } else { b'x' };
        let t = String::from_utf8(t).unwrap();
        let r = get_with(
            &format!("{}{path}", a.base_url()),
            &[("authorization", &format!("Bearer {t}"))],
        )
        .await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "tampered at {i}");
    }
}

async fn token_request(base: &str, authorization: &str) -> Resp {
    request(
        Method::POST,
        &format!("{base}/api/ts/v1/oauth2/token"),
        &[
            ("authorization", authorization),
            ("content-type", "application/x-www-form-urlencoded"),
        ],
        b"grant_type=client_credentials",
    )
    .await
}

#[tokio::test]
async fn token_endpoint_takes_basic_only_and_applies_the_client_rate() {
    let sim = start_sim(sim_opts()).await;
    let gw = start_gateway(config(&sim.base_url(), &clients_toml(&sim, "k1"))).await;
    let base = gw.base_url();
    // A bearer is never traded for a fresh token (that made tokens self-renewing forever).
    let token = gateway_token(&base, "ops", "ops-secret").await;
    let r = token_request(&base, &format!("Bearer {token}")).await;
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (StatusCode::UNAUTHORIZED, "GW_UNAUTHORIZED")
    );
    assert!(!r.header("www-authenticate").is_empty());
    assert!(r.json()["access_token"].is_null());
    // The token endpoint spends the client's own rate: `slow` has a burst of 2.
    for _ in 0..2 {
        gateway_token(&base, "slow", "slow-secret").await;
    }
    let r = token_request(&base, &basic("slow", "slow-secret")).await;
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (StatusCode::TOO_MANY_REQUESTS, "GW_RATE_LIMITED")
    );
    assert_eq!(r.header("retry-after"), "2");
    // The bucket is the one page requests use.
    let r = get_with(
        &format!("{base}{}", license_path(&sim.account_names()[0], 0)),
        &[("authorization", &basic("slow", "slow-secret"))],
    )
    .await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert_no_rejected_login(&sim);
}

/// Re-signs `token`'s payload with its expiry (the largest number in it) moved ten years out:
/// what anyone holding the signing key (for instance an example's placeholder) can do.
fn forge_ten_year_expiry(token: &str, key: &str) -> String {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let payload = URL_SAFE_NO_PAD
        .decode(token.split_once('.').unwrap().0)
        .unwrap();
    let payload = String::from_utf8(payload).unwrap();
    let expiry = payload
        .split('\n')
        .filter_map(|f| f.parse::<u64>().ok())
        .max()
        .unwrap();
    let forged = payload.replace(
        &expiry.to_string(),
        &(expiry + 10 * 365 * 24 * 3600).to_string(),
    );
    let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key.as_bytes());
    let sig = ring::hmac::sign(&k, forged.as_bytes());
    format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(&forged),
        URL_SAFE_NO_PAD.encode(sig.as_ref())
    )
}

#[tokio::test]
async fn tokens_die_with_their_secret_and_never_outlive_token_ttl() {
    let sim = start_sim(sim_opts()).await;
    let path = license_path(&sim.account_names()[0], 0);
    let issuer = start_gateway(config(&sim.base_url(), &clients_toml(&sim, "k1"))).await;
    // Same key: the same clients (accepts), `ops` re-keyed, `ops` removed.
    let same = start_gateway(config(&sim.base_url(), &clients_toml(&sim, "k1"))).await;
    let rotated = start_gateway(config(
        &sim.base_url(),
        &clients_toml_with(&sim, "k1", "ops-secret-rotated"),
    ))
    .await;
    let removed_toml = clients_toml(&sim, "k1").replace("id = \"ops\"", "id = \"ops-renamed\"");
    let removed = start_gateway(config(&sim.base_url(), &removed_toml)).await;
    let token = gateway_token(&issuer.base_url(), "ops", "ops-secret").await;
    let bearer = format!("Bearer {token}");
    let status = |gw: &thingspace_gateway::runtime::Running, auth: String| {
        let url = format!("{}{path}", gw.base_url());
        async move { get_with(&url, &[("authorization", &auth)]).await }
    };
    assert_eq!(status(&same, bearer.clone()).await.status, StatusCode::OK);
    // A well-signed token whose expiry lies ten years out is refused.
    let forged = forge_ten_year_expiry(&token, &signing_key("k1"));
    let r = status(&issuer, format!("Bearer {forged}")).await;
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (StatusCode::UNAUTHORIZED, "GW_UNAUTHORIZED")
    );
    for gw in [&rotated, &removed] {
        let r = status(gw, bearer.clone()).await;
        assert_eq!(
            (r.status, r.error_code().as_str()),
            (StatusCode::UNAUTHORIZED, "GW_UNAUTHORIZED")
        );
    }
    // The rotated secret itself works there.
    let r = status(&rotated, basic("ops", "ops-secret-rotated")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        sim.count("licenses"),
        2,
        "one upstream call per gateway that answered 200"
    );
    assert_no_rejected_login(&sim);
}

#[tokio::test]
async fn admin_routes_that_change_state_need_the_admin_token() {
    const ADMIN_TOKEN: &str = "adm-0123456789abcdef0123";
    let sim = start_sim(sim_opts()).await;
    let extra = format!(
        "{}\n[server]\nadmin_token = \"{ADMIN_TOKEN}\"\n",
        clients_toml(&sim, "k1")
    );
    let gw = start_gateway(config(&sim.base_url(), &extra)).await;
    wait_ready(&gw).await;
    let account = sim.account_names()[0].clone();
    let page = format!("{}{}", gw.base_url(), license_path(&account, 0));
    let ops = basic("ops", "ops-secret");
    let r = get_with(&page, &[("authorization", &ops)]).await;
    assert_eq!(r.header("x-cache"), "MISS");
    let admin = gw.admin_url();
    let purges = [
        format!("{admin}/cache"),
        format!("{admin}/cache/accounts/{account}"),
    ];
    for url in &purges {
        for auth in [
            None,
            Some("Bearer adm-0123456789abcdef012".to_string()),
            Some(format!("Bearer {ADMIN_TOKEN}x")),
            Some(format!("Basic {ADMIN_TOKEN}")),
            Some(ops.clone()),
        ] {
            let headers: Vec<(&str, &str)> =
                auth.iter().map(|a| ("authorization", a.as_str())).collect();
            let r = request(Method::DELETE, url, &headers, b"").await;
            assert_eq!(
                (r.status, r.error_code().as_str()),
                (StatusCode::UNAUTHORIZED, "GW_UNAUTHORIZED"),
                "{url} {auth:?}"
            );
            assert!(!r.header("www-authenticate").is_empty());
            assert!(!format!("{:?}", r.body).contains(ADMIN_TOKEN));
        }
    }
    // Nothing was purged; read-only routes stay open without the token.
    let r = get_with(&page, &[("authorization", &ops)]).await;
    assert_eq!(r.header("x-cache"), "HIT");
    assert_eq!(sim.count("licenses"), 1);
    for route in ["/metrics", "/healthz", "/readyz", "/status"] {
        assert_eq!(
            get(&format!("{admin}{route}")).await.status,
            StatusCode::OK,
            "{route}"
        );
    }
    assert!(!get(&format!("{admin}/status"))
        .await
        .body
        .windows(ADMIN_TOKEN.len())
        .any(|w| w == ADMIN_TOKEN.as_bytes()));
    // With the token: purged.
    let bearer = format!("Bearer {ADMIN_TOKEN}");
    let r = request(
        Method::DELETE,
        &purges[1],
        &[("authorization", &bearer)],
        b"",
    )
    .await;
    assert_eq!(
        (r.status, r.json()["purged"].as_u64()),
        (StatusCode::OK, Some(1))
    );
    let r = request(
        Method::DELETE,
        &purges[0],
        &[("authorization", &bearer)],
        b"",
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let r = get_with(&page, &[("authorization", &ops)]).await;
    assert_eq!(r.header("x-cache"), "MISS");
    assert_eq!(sim.count("licenses"), 2);
    assert_no_rejected_login(&sim);
}

#[tokio::test]
async fn hostile_paths_and_headers_never_reach_the_upstream() {
    let sim = start_sim(sim_opts()).await;
    let gw = start_gateway(config(&sim.base_url(), &clients_toml(&sim, "k"))).await;
    wait_ready(&gw).await;
    let before = sim.count("licenses") + sim.count("subscriptions");
    let long = "a".repeat(65);
    let cases: Vec<(String, u16, &str)> = vec![
        (
            "GET /api/fota/v1/licenses/%2e%2e/index/0".into(),
            400,
            "INVALID_PARAMETER",
        ),
        (
            "GET /api/fota/v1/licenses/../index/0".into(),
            400,
            "INVALID_PARAMETER",
        ),
        (
            "GET /api/fota/v1/licenses/a%00/index/0".into(),
            400,
            "INVALID_PARAMETER",
        ),
        (
            "GET /api/fota/v1/licenses/a%2Fb/index/0".into(),
            400,
            "INVALID_PARAMETER",
        ),
        (
            "GET /api/fota/v1/licenses/a;x=1/index/0".into(),
            400,
            "INVALID_PARAMETER",
        ),
        (
            "GET /api/fota/v1/licenses//index/0".into(),
            400,
            "INVALID_PARAMETER",
        ),
        (
            format!("GET /api/fota/v1/licenses/{long}/index/0"),
            400,
            "INVALID_PARAMETER",
        ),
        (
            "GET /api/fota/v1/licenses/a/index/0%20".into(),
            400,
            "INVALID_PARAMETER",
        ),
        (
            "GET /api/fota/v1/licenses/a/index/%2F..%2F".into(),
            400,
            "INVALID_PARAMETER",
        ),
        (
            "GET /api/fota/v1/licenses/a/index/+1".into(),
            400,
            "INVALID_PARAMETER",
        ),
        (
            "GET /api/fota/v1/licenses/a/index/0x10".into(),
            400,
            "INVALID_PARAMETER",
        ),
        (
            "GET /api/fota/v1/licenses/a/index/1;2".into(),
            400,
            "INVALID_PARAMETER",
        ),
        (
            "GET /api/fota/v1/licenses/a/index/18446744073709551616".into(),
            400,
            "INVALID_PARAMETER",
        ),
        (
            "GET /api/fota/v1/subscriptions/a%20b".into(),
            400,
            "INVALID_PARAMETER",
        ),
        (
            "GET /api/fota/v1/subscriptions/".into(),
            400,
            "INVALID_PARAMETER",
        ),
        (
            "GET /gateway/v1/accounts/a/licenses/123456789012345678901".into(),
            400,
            "INVALID_PARAMETER",
        ),
        (
            "GET /gateway/v1/accounts/a/licenses/-5".into(),
            400,
            "INVALID_PARAMETER",
        ),
        (
            "GET /gateway/v1/accounts/%41/licenses".into(),
            400,
            "INVALID_PARAMETER",
        ),
        (
            "GET /api/fota/v1/licenses/a//index/0".into(),
            404,
            "GW_NOT_FOUND",
        ),
        (
            "GET //api/fota/v1/licenses/a/index/0".into(),
            404,
            "GW_NOT_FOUND",
        ),
        (
            "GET /api/fota/v1/licenses/a/index/0/../../../ts/v1/oauth2/token".into(),
            404,
            "GW_NOT_FOUND",
        ),
        (
            "GET /API/fota/v1/licenses/a/index/0".into(),
            404,
            "GW_NOT_FOUND",
        ),
        (
            "GET /api/fota/v1/licenses/a/index/0/".into(),
            404,
            "GW_NOT_FOUND",
        ),
        ("GET /_sim/stats".into(), 404, "GW_NOT_FOUND"),
        (
            "POST /api/fota/v1/licenses/a/index/0".into(),
            405,
            "GW_METHOD_NOT_ALLOWED",
        ),
        (
            "PUT /gateway/v1/accounts/a/licenses".into(),
            405,
            "GW_METHOD_NOT_ALLOWED",
        ),
        (
            "GET /api/ts/v1/oauth2/token".into(),
            405,
            "GW_METHOD_NOT_ALLOWED",
        ),
        (
            "DELETE /api/m2m/v1/session/login".into(),
            405,
            "GW_METHOD_NOT_ALLOWED",
        ),
    ];
    for (line, status, code) in &cases {
        let req = format!("{line} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let (got, body) = raw(gw.addr, req.as_bytes()).await;
        assert_eq!(got, *status, "{line}: {body}");
        assert!(body.contains(code), "{line}: {body}");
    }
    // Bytes no client library sends: rejected by the HTTP parser or by us, always 400.
    for line in [
        "GET /api/fota/v1/licenses/caf\u{e9}/index/0",
        "GET /api/fota/v1/licenses/a\\b/index/0",
    ] {
        let req = format!("{line} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let (got, body) = raw(gw.addr, req.as_bytes()).await;
        assert_eq!(got, 400, "{line}: {body}");
    }
    let auth = basic("ops", "ops-secret");
    let account = sim.account_names()[0].clone();
    let ok_path = license_path(&account, 0);
    // 101 headers, Host included.
    let mut req = format!(
        "GET {ok_path} HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\nConnection: close\r\n"
    );
    for i in 0..98 {
        req.push_str(&format!("X-H{i}: v\r\n"));
    }
    req.push_str("\r\n");
    let (got, body) = raw(gw.addr, req.as_bytes()).await;
    assert_eq!(
        (got, body.contains("GW_HEADERS_TOO_LARGE")),
        (431, true),
        "{body}"
    );
    // Header bytes over max_header_bytes (16 KiB).
    let req = format!(
        "GET {ok_path} HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
        "b".repeat(17 * 1024)
    );
    let (got, body) = raw(gw.addr, req.as_bytes()).await;
    assert_eq!(
        (got, body.contains("GW_HEADERS_TOO_LARGE")),
        (431, true),
        "{body}"
    );
    // A body on a GET.
    let req = format!("GET {ok_path} HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello");
    let (got, body) = raw(gw.addr, req.as_bytes()).await;
    assert_eq!(
        (got, body.contains("INVALID_PARAMETER")),
        (400, true),
        "{body}"
    );
    let req = format!(
        "GET {ok_path} HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    );
    let (got, _) = raw(gw.addr, req.as_bytes()).await;
    assert_eq!(got, 400);
    // No credentials, wrong credentials.
    let (got, body) = raw(
        gw.addr,
        format!("GET {ok_path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await;
    assert_eq!((got, body.contains("GW_UNAUTHORIZED")), (401, true));
    assert_eq!(
        sim.count("licenses") + sim.count("subscriptions"),
        before,
        "no hostile request reached the upstream"
    );
    assert!(cases.len() + 8 >= 30);
}

#[tokio::test]
async fn tls_listener() {
    thingspace_gateway::upstream::tls::install_crypto_provider();
    let dir = std::env::temp_dir().join(format!("tsgw-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).unwrap();
    let sim = start_sim(sim_opts()).await;
    let gw = start_gateway(config(
        &sim.base_url(),
        &format!(
            "[server]\ntls_cert = {:?}\ntls_key = {:?}\n",
            cert_path.display().to_string(),
            key_path.display().to_string()
        ),
    ))
    .await;
    assert!(gw.base_url().starts_with("https://"));
    let tls = thingspace_gateway::upstream::tls::client_config(Some(cert_path.as_path())).unwrap();
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .build();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build::<_, http_body_util::Full<bytes::Bytes>>(connector);
    let url = format!(
        "https://localhost:{}{}",
        gw.addr.port(),
        license_path(&sim.account_names()[0], 0)
    );
    let resp = client.get(url.parse().unwrap()).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    // Plain HTTP to the TLS port gets nothing useful.
    let (got, _) = raw(
        gw.addr,
        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_ne!(got, 200);
}

/// SPEC §3/§4: more than 100 request headers (Host included) get the JSON 431, however many
/// hyper can read (up to its own cap of 1,000); past that cap hyper answers a bare 431 or the
/// connection is simply closed, never a 2xx.
#[tokio::test]
async fn every_header_count_over_100_gets_the_json_431() {
    let sim = start_sim(sim_opts()).await;
    let gw = start_gateway(config(&sim.base_url(), "")).await;
    let path = license_path(&sim.account_names()[0], 0);
    let with_headers = |count: usize| {
        // Host and Connection, then small ones up to `count`.
        let mut req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n");
        for i in 2..count {
            req.push_str(&format!("X-H{i}: v\r\n"));
        }
        req.push_str("\r\n");
        req
    };
    let (got, body) = raw(gw.addr, with_headers(100).as_bytes()).await;
    assert_eq!(got, 200, "100 headers are allowed: {body}");
    for count in [101, 153, 500, 1000] {
        let (got, body) = raw(gw.addr, with_headers(count).as_bytes()).await;
        assert_eq!(
            (got, body.contains("\"errorCode\":\"GW_HEADERS_TOO_LARGE\"")),
            (431, true),
            "{count} headers: {body}"
        );
    }
    // Past hyper's cap: its bare 431, or a reset while the client was still sending.
    let req = with_headers(10_000);
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let _ = s.write_all(req.as_bytes()).await;
    let mut out = Vec::new();
    let closed = tokio::time::timeout(std::time::Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .expect("the connection is closed");
    let text = String::from_utf8_lossy(&out);
    assert!(
        text.starts_with("HTTP/1.1 431") || (closed.is_err() && out.is_empty()),
        "10,000 headers: {text}"
    );
    assert_eq!(
        sim.count("licenses"),
        1,
        "only the allowed request reached the upstream"
    );
}
