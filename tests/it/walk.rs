//! Whole-account endpoints over real sockets.

use crate::common::*;
use http::{Method, StatusCode};
use thingspace_sim::control::FaultRequest;
use thingspace_sim::SimOptions;

#[tokio::test]
async fn twenty_five_pages_merge_into_one_document() {
    let sim = start_sim(SimOptions {
        accounts: 1,
        devices: 25_000,
        ..sim_opts()
    })
    .await;
    let gw = start_gateway(config(
        &sim.base_url(),
        "[upstream]\nrate_per_second = 1000.0\nburst = 1000\n",
    ))
    .await;
    let account = sim.account_names()[0].clone();
    let url = format!("{}/gateway/v1/accounts/{account}/licenses", gw.base_url());
    let r = get(&url).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("x-cache"), "MISS");
    assert_eq!(sim.count("licenses"), 25);
    // The concatenation of a direct page walk, device bytes unchanged.
    let mut devices: Vec<u8> = Vec::new();
    let mut first: Option<serde_json::Value> = None;
    let mut index = 0u64;
    loop {
        let page = get(&format!(
            "{}{}",
            gw.base_url(),
            license_path(&account, index)
        ))
        .await;
        let text = std::str::from_utf8(&page.body).unwrap();
        let list = &text[text.find("\"deviceList\":[").unwrap() + 14..text.rfind(']').unwrap()];
        if !devices.is_empty() && !list.is_empty() {
            devices.push(b',');
        }
        devices.extend_from_slice(list.as_bytes());
        let p = page.json();
        if first.is_none() {
            first = Some(p.clone());
        }
        if !p["hasMoreData"].as_bool().unwrap() {
            break;
        }
        index = p["lastSeenDeviceId"].as_u64().unwrap();
    }
    let first = first.unwrap();
    let expected = format!(
        "{{\"accountName\":{},\"totalLicenses\":{},\"assignedLicenses\":{},\"deviceCount\":25000,\"deviceList\":[{}]}}",
        first["accountName"],
        first["totalLicenses"],
        first["assignedLicenses"],
        String::from_utf8(devices).unwrap()
    );
    assert_eq!(std::str::from_utf8(&r.body).unwrap(), expected);
    assert_eq!(r.json()["deviceList"].as_array().unwrap().len(), 25_000);
    assert_eq!(
        sim.count("licenses"),
        25,
        "the page walk was served from the cache"
    );
    // A second walk: no upstream call; ETag and 304; HEAD.
    let again = get(&url).await;
    assert_eq!(
        (again.header("x-cache"), again.body == r.body),
        ("HIT", true)
    );
    let etag = again.header("etag").to_string();
    let r304 = get_with(&url, &[("if-none-match", &etag)]).await;
    assert_eq!(r304.status, StatusCode::NOT_MODIFIED);
    assert!(r304.body.is_empty());
    let head = request(Method::HEAD, &url, &[], b"").await;
    assert_eq!(head.header("content-length"), again.body.len().to_string());
    // gzip: compressed once per version, decompresses to the identity document.
    let gz = get_with(&url, &[("accept-encoding", "gzip")]).await;
    assert_eq!(gz.header("content-encoding"), "gzip");
    assert_eq!(gz.header("etag"), etag);
    assert!(gz.body.len() < r.body.len() / 3);
    let mut plain = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&gz.body[..]), &mut plain)
        .unwrap();
    assert_eq!(plain, r.body);
    assert_eq!(
        get_with(&url, &[("accept-encoding", "gzip")]).await.body,
        gz.body
    );
    assert_eq!(sim.count("licenses"), 25);
}

#[tokio::test]
async fn device_lookup_present_and_absent() {
    let sim = start_sim(sim_opts()).await;
    let gw = start_gateway(config(&sim.base_url(), "")).await;
    let account = sim.account_names()[0].clone();
    let imeis = sim.imeis(&account);
    let lookup = |id: String| {
        format!(
            "{}/gateway/v1/accounts/{account}/licenses/{id}",
            gw.base_url()
        )
    };
    for imei in [imeis[0], imeis[1500], imeis[2499]] {
        let r = get(&lookup(imei.to_string())).await;
        assert_eq!(r.status, StatusCode::OK);
        let v = r.json();
        assert_eq!(v["deviceId"], imei.to_string());
        assert_eq!(v["licensed"], true);
        assert!(v["assignmentTime"].is_string());
    }
    let absent = imeis[2499] + 1;
    let r = get(&lookup(absent.to_string())).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        std::str::from_utf8(&r.body).unwrap(),
        format!("{{\"deviceId\":\"{absent}\",\"licensed\":false,\"assignmentTime\":null}}")
    );
    assert_eq!(r.json()["licensed"], false);
    assert_eq!(r.json()["assignmentTime"], serde_json::Value::Null);
    // Exact string comparison: leading zeros name another device.
    let r = get(&lookup(format!("0{}", imeis[0]))).await;
    assert_eq!(r.json()["licensed"], false);
    assert_eq!(sim.count("licenses"), 3, "lookups share the walked pages");
    // An unknown account's refusal is passed through.
    let r = get(&format!(
        "{}/gateway/v1/accounts/0000000000-00404/licenses/1",
        gw.base_url()
    ))
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        r.error_code(),
        "UnifiedWebService.REQUEST_FAILED.AccountNotFound"
    );
}

#[tokio::test]
async fn cursor_that_does_not_advance_is_a_bad_gateway() {
    let sim = start_sim(sim_opts()).await;
    let gw = start_gateway(config(&sim.base_url(), "")).await;
    let account = sim.account_names()[0].clone();
    sim.apply(FaultRequest::kind("licenses", 1, "loop_cursor"))
        .unwrap();
    let r = get(&format!(
        "{}/gateway/v1/accounts/{account}/licenses",
        gw.base_url()
    ))
    .await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    assert_eq!(r.error_code(), "GW_BAD_GATEWAY");
    assert!(r.json()["errorMessage"]
        .as_str()
        .unwrap()
        .contains("does not advance"));
}

#[tokio::test]
async fn page_bound_guards_the_walk() {
    let sim = start_sim(SimOptions {
        page_size: 100,
        ..sim_opts()
    })
    .await;
    let gw = start_gateway(config(
        &sim.base_url(),
        "[upstream]\nmax_walk_pages = 5\nrate_per_second = 1000.0\nburst = 1000\n",
    ))
    .await;
    let account = sim.account_names()[0].clone();
    let r = get(&format!(
        "{}/gateway/v1/accounts/{account}/licenses",
        gw.base_url()
    ))
    .await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    assert!(r.json()["errorMessage"]
        .as_str()
        .unwrap()
        .contains("max_walk_pages"));
    assert_eq!(sim.count("licenses"), 5);
}

#[tokio::test]
async fn device_lookups_on_every_page_and_between_devices() {
    let sim = start_sim(SimOptions {
        accounts: 1,
        page_size: 300,
        ..sim_opts()
    })
    .await;
    let gw = start_gateway(config(
        &sim.base_url(),
        "[upstream]\nrate_per_second = 1000.0\nburst = 1000\n",
    ))
    .await;
    let account = sim.account_names()[0].clone();
    let imeis = sim.imeis(&account);
    let http = Http::new();
    let lookup = |id: u64| {
        format!(
            "{}/gateway/v1/accounts/{account}/licenses/{id}",
            gw.base_url()
        )
    };
    for (i, imei) in imeis
        .iter()
        .enumerate()
        .step_by(37)
        .chain([(2499, &imeis[2499])])
    {
        let r = http.get(&lookup(*imei)).await;
        assert_eq!(r.json()["licensed"], true, "device {i}");
        assert!(r.json()["assignmentTime"].is_string());
        // Just above it: absent unless it is the next device.
        if imeis.get(i + 1) != Some(&(imei + 1)) {
            let r = http.get(&lookup(imei + 1)).await;
            assert_eq!(r.json()["licensed"], false, "after device {i}");
        }
    }
    assert_eq!(
        sim.count("licenses"),
        9,
        "2500 devices in pages of 300, walked once"
    );
}

/// Whole-account documents answer conditional requests, HEAD and gzip through the same writer
/// as pages: weak tags and lists match (test fails on previous main: only an exact tag did), and
/// a HEAD that accepts gzip reports the encoding and length the GET sends (it dropped both).
#[tokio::test]
async fn documents_answer_conditionals_head_and_gzip_like_pages() {
    let sim = start_sim(sim_opts()).await;
    let gw = start_gateway(config(&sim.base_url(), "")).await;
    let account = sim.account_names()[0].clone();
    let doc = format!("{}/gateway/v1/accounts/{account}/licenses", gw.base_url());
    let device = sim.imeis(&account)[0];
    let lookup = format!("{doc}/{device}");
    let page = format!("{}{}", gw.base_url(), license_path(&account, 0));
    let first = get(&doc).await;
    assert_eq!(first.status, StatusCode::OK);
    let upstream_calls = sim.count("licenses");
    assert!(upstream_calls >= 2, "a walk of several pages");
    // A page's gzip form is made after its first answer, by threads at the lowest priority: wait
    // for it, so that the GET and HEAD compared below see the same form.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while get_with(&page, &[("accept-encoding", "gzip")])
        .await
        .header("content-encoding")
        != "gzip"
    {
        assert!(std::time::Instant::now() < deadline, "no gzip form");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    for url in [&doc, &lookup, &page] {
        let got = get(url).await;
        assert_eq!((got.status, got.header("x-cache")), (StatusCode::OK, "HIT"));
        let etag = got.header("etag").to_string();
        assert!(etag.starts_with('"'), "{etag}");
        for inm in [
            format!("W/{etag}"),
            format!("\"other\", {etag}"),
            format!("\"other\", W/{etag}"),
            "*".to_string(),
        ] {
            let r = get_with(url, &[("if-none-match", &inm)]).await;
            assert_eq!(r.status, StatusCode::NOT_MODIFIED, "{url} {inm}");
            assert!(r.body.is_empty());
            assert_eq!(r.header("etag"), etag);
            assert_eq!(r.header("content-encoding"), "");
        }
        let r = get_with(url, &[("if-none-match", "\"other\", W/\"w0\"")]).await;
        assert_eq!(r.status, StatusCode::OK, "{url}");
        // HEAD sends the headers the GET sends, with and without gzip.
        for accept in ["identity", "gzip"] {
            let get = get_with(url, &[("accept-encoding", accept)]).await;
            let head = request(Method::HEAD, url, &[("accept-encoding", accept)], b"").await;
            assert_eq!(head.status, StatusCode::OK);
            assert!(head.body.is_empty());
            for name in ["content-encoding", "content-type", "etag", "vary"] {
                assert_eq!(head.header(name), get.header(name), "{url} {accept} {name}");
            }
            assert_eq!(
                head.header("content-length"),
                get.body.len().to_string(),
                "{url} {accept}"
            );
        }
    }
    // The document and the page are big enough to be sent compressed.
    for url in [&doc, &page] {
        let gz = get_with(url, &[("accept-encoding", "gzip")]).await;
        assert_eq!(gz.header("content-encoding"), "gzip", "{url}");
    }
    assert_eq!(sim.count("licenses"), upstream_calls, "all from the cache");
}
