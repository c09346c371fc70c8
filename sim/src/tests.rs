//! The in-process call: what paused-time tests of the gateway rely on.

use super::*;
use base64::Engine;

async fn sim() -> Simulator {
    Simulator::start(SimOptions {
        listen: ([127, 0, 0, 1], 0).into(),
        devices: 30,
        page_size: 10,
        ..SimOptions::default()
    })
    .await
    .expect("simulator starts")
}

fn request(method: Method, path: &str, headers: &[(&str, String)], body: &[u8]) -> SimRequest {
    let mut h = HeaderMap::new();
    for (k, v) in headers {
        h.insert(
            header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    SimRequest {
        method,
        path: path.to_string(),
        headers: h,
        body: Bytes::copy_from_slice(body),
    }
}

/// A bearer and a session, obtained through `call`.
async fn login(h: &SimHandle) -> Vec<(&'static str, String)> {
    let basic = base64::engine::general_purpose::STANDARD.encode("demo-key:demo-secret");
    let r = h
        .call(request(
            Method::POST,
            "/api/ts/v1/oauth2/token",
            &[("authorization", format!("Basic {basic}"))],
            b"grant_type=client_credentials",
        ))
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::OK);
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    let bearer = format!("Bearer {}", v["access_token"].as_str().unwrap());
    let r = h
        .call(request(
            Method::POST,
            "/api/m2m/v1/session/login",
            &[("authorization", bearer.clone())],
            br#"{"username":"demo-user","password":"demo-pass"}"#,
        ))
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::OK);
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    let session = v["sessionToken"].as_str().unwrap().to_string();
    vec![("authorization", bearer), ("vz-m2m-token", session)]
}

#[tokio::test]
async fn call_answers_pages_and_path_errors_like_the_listener() {
    let sim = sim().await;
    let h = sim.handle();
    let auth = login(&h).await;
    let account = sim.account_names()[0].clone();
    let get = |path: String| h.call(request(Method::GET, &path, &auth, b""));
    let r = get(format!("/api/fota/v1/licenses/{account}/index/0"))
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.headers[header::CONTENT_TYPE], "application/json");
    let page: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(page["deviceList"].as_array().unwrap().len(), 10);
    assert_eq!(page["hasMoreData"], true);

    let error = |r: SimResponse| {
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        (
            r.status.as_u16(),
            v["errorCode"].as_str().unwrap().to_string(),
            v["errorMessage"].as_str().unwrap().to_string(),
        )
    };
    let bad_account = |m: &str| (400, "INVALID_PARAMETER".to_string(), m.to_string());
    for name in ["a_b", "a%2Fb", "a.b", &"9".repeat(65)] {
        let r = get(format!("/api/fota/v1/licenses/{name}/index/0")).await;
        assert_eq!(
            error(r.unwrap()),
            bad_account("Invalid account name format"),
            "{name}"
        );
    }
    let r = get("/api/fota/v1/licenses/0000000000-99999/index/0".into()).await;
    assert_eq!(
        error(r.unwrap()).1,
        "UnifiedWebService.REQUEST_FAILED.AccountNotFound"
    );
    for index in ["", "+1", "-1", "1e3", "%30", "18446744073709551616"] {
        let r = get(format!("/api/fota/v1/licenses/{account}/index/{index}")).await;
        assert_eq!(
            error(r.unwrap()),
            bad_account("Invalid index value"),
            "{index:?}"
        );
    }
    assert_eq!(sim.count_status("licenses", 200), 1);
    assert_eq!(sim.count_status("licenses", 400), 11);
}

#[tokio::test]
async fn call_reports_a_closed_connection_and_counts_it() {
    let sim = sim().await;
    let h = sim.handle();
    let auth = login(&h).await;
    let account = sim.account_names()[0].clone();
    sim.apply(FaultRequest::kind("licenses", 1, "close"))
        .unwrap();
    let path = format!("/api/fota/v1/licenses/{account}/index/0");
    let r = h.call(request(Method::GET, &path, &auth, b"")).await;
    assert_eq!(r.unwrap_err(), ConnectionClosed);
    let r = h.call(request(Method::GET, &path, &auth, b"")).await;
    assert_eq!(r.unwrap().status, StatusCode::OK);
    assert_eq!(sim.count_status("licenses", 0), 1);
    assert_eq!(sim.count_status("licenses", 200), 1);
}

#[test]
fn durations_in_humantime_syntax() {
    assert_eq!(
        control::parse_duration(" 50ms "),
        Ok(Duration::from_millis(50))
    );
    assert_eq!(
        control::parse_duration("1h 5s"),
        Ok(Duration::from_secs(3605))
    );
    assert!(control::parse_duration("5 parsecs").is_err());
    assert!(control::parse_duration("").is_err());
}

#[tokio::test]
async fn generated_certificate_names_the_extra_hosts() {
    let dir = std::env::temp_dir().join(format!("tsgw-sim-names-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let pem = dir.join("sim.pem");
    let sim = Simulator::start(SimOptions {
        listen: ([127, 0, 0, 1], 0).into(),
        tls_cert_out: Some(pem.clone()),
        tls_names: vec!["sim.fleet.test".into()],
        ..SimOptions::default()
    })
    .await
    .expect("simulator starts");
    assert!(sim.base_url().starts_with("https://"));
    let text = std::fs::read_to_string(&pem).unwrap();
    let b64: String = text.lines().filter(|l| !l.starts_with("-----")).collect();
    let der = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap();
    // A dNSName SAN is the name's bytes as they are (IA5String).
    for name in ["sim.fleet.test", "localhost"] {
        assert!(
            der.windows(name.len()).any(|w| w == name.as_bytes()),
            "{name} in the certificate"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
