//! Property tests over random input, bounded by count: routing/validation, the whole client
//! request path, and the config loader. `.ci/run` runs them longer with FUZZ_ITERATIONS; a
//! failure prints the seed to reproduce it with FUZZ_SEED.

use crate::common::*;
use http::{Method, StatusCode};
use thingspace_gateway::api::route::{route, Route, RouteError};
use thingspace_gateway::config::from_toml_with_env;

fn iterations(default: usize) -> usize {
    std::env::var("FUZZ_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn rng() -> (fastrand::Rng, u64) {
    let seed = std::env::var("FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5eed);
    (fastrand::Rng::with_seed(seed), seed)
}

const PIECES: &[&str] = &[
    "/",
    "/",
    "/",
    "api",
    "fota",
    "v1",
    "licenses",
    "index",
    "subscriptions",
    "gateway",
    "accounts",
    "ts",
    "oauth2",
    "token",
    "m2m",
    "session",
    "login",
    "0",
    "7",
    "0402196254-00001",
    "%2F",
    "%2e",
    "%00",
    "%",
    "..",
    ".",
    "-",
    "a",
    "Z",
    "_",
    ";",
    "?",
    "#",
    "\\",
    " ",
    "\u{e9}",
    "\u{0}",
    "18446744073709551615",
    "18446744073709551616",
    "99999999999999999999",
    "00000000000000000000001",
];

fn random_path(r: &mut fastrand::Rng) -> String {
    let templates = [
        "/api/fota/v1/licenses/{}/index/{}",
        "/api/fota/v1/subscriptions/{}",
        "/gateway/v1/accounts/{}/licenses",
        "/gateway/v1/accounts/{}/licenses/{}",
    ];
    let piece = |r: &mut fastrand::Rng| -> String {
        (0..r.usize(0..4))
            .map(|_| PIECES[r.usize(..PIECES.len())])
            .collect()
    };
    if r.bool() {
        let t = templates[r.usize(..templates.len())];
        let mut out = String::new();
        for (i, part) in t.split("{}").enumerate() {
            if i > 0 {
                out.push_str(&piece(r));
            }
            out.push_str(part);
        }
        out
    } else {
        (0..r.usize(1..12))
            .map(|_| PIECES[r.usize(..PIECES.len())])
            .collect()
    }
}

fn valid_account(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
}

fn valid_number(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 20
        && s.chars().all(|c| c.is_ascii_digit())
        && s.parse::<u64>().is_ok()
}

#[test]
fn routing_accepts_exactly_the_valid_shapes() {
    let (mut r, seed) = rng();
    for i in 0..iterations(50_000) {
        let path = random_path(&mut r);
        let method =
            [Method::GET, Method::HEAD, Method::POST, Method::DELETE][r.usize(..4)].clone();
        let got = route(&method, &path);
        let ctx = format!("seed {seed} iteration {i}: {method} {path:?} -> {got:?}");
        match &got {
            Ok(Route::LicensePage { account, index }) => {
                let rest = path.strip_prefix("/api/fota/v1/licenses/").expect(&ctx);
                let (a, idx) = rest.split_once("/index/").expect(&ctx);
                assert!(a == &**account && valid_account(a), "{ctx}");
                assert!(
                    valid_number(idx) && idx.parse::<u64>().ok() == Some(*index),
                    "{ctx}"
                );
            }
            Ok(Route::Subscription { account }) => {
                assert_eq!(
                    path,
                    format!("/api/fota/v1/subscriptions/{account}"),
                    "{ctx}"
                );
                assert!(valid_account(account), "{ctx}");
            }
            Ok(Route::AccountLicenses { account }) => {
                assert_eq!(
                    path,
                    format!("/gateway/v1/accounts/{account}/licenses"),
                    "{ctx}"
                );
                assert!(valid_account(account), "{ctx}");
            }
            Ok(Route::DeviceLicense { account, device_id }) => {
                assert_eq!(
                    path,
                    format!("/gateway/v1/accounts/{account}/licenses/{device_id}"),
                    "{ctx}"
                );
                assert!(valid_account(account) && valid_number(device_id), "{ctx}");
            }
            Ok(Route::Token) => assert_eq!(path, "/api/ts/v1/oauth2/token", "{ctx}"),
            Ok(Route::SessionLogin) => assert_eq!(path, "/api/m2m/v1/session/login", "{ctx}"),
            Err(RouteError::InvalidParameter(_)) => {
                assert!(
                    path.starts_with("/api/fota/v1/licenses/")
                        || path.starts_with("/api/fota/v1/subscriptions/")
                        || path.starts_with("/gateway/v1/accounts/"),
                    "{ctx}"
                );
            }
            Err(RouteError::NotFound) | Err(RouteError::MethodNotAllowed { .. }) => {}
        }
        // Whatever was accepted can only name the routes' own upstream paths.
        if let Ok(route) = &got {
            if let Some(account) = route.account() {
                assert!(valid_account(account), "{ctx}");
            }
        }
    }
}

#[tokio::test]
async fn random_requests_get_a_documented_answer() {
    let p = InProc::new(sim_opts(), "").await;
    let (mut r, seed) = rng();
    let n = iterations(50_000) / 25;
    let allowed = [
        200u16, 304, 400, 401, 403, 404, 405, 429, 431, 502, 503, 504,
    ];
    for i in 0..n {
        let path = random_path(&mut r);
        let method = [Method::GET, Method::HEAD, Method::POST, Method::PUT][r.usize(..4)].clone();
        let mut headers: Vec<(&str, String)> = Vec::new();
        if r.bool() {
            headers.push((
                "accept-encoding",
                ["gzip", "br", "*;q=0", "gzip;q=abc"][r.usize(..4)].into(),
            ));
        }
        if r.bool() {
            headers.push((
                "if-none-match",
                ["*", "\"x\"", "W/\"y\"", ""][r.usize(..4)].into(),
            ));
        }
        if r.bool() {
            headers.push((
                "authorization",
                ["Basic !!!", "Bearer a.b", "Bearer", ""][r.usize(..4)].into(),
            ));
        }
        let body: &[u8] = if r.bool() {
            b""
        } else {
            b"grant_type=client_credentials"
        };
        if http::Uri::try_from(path.as_str()).is_err() {
            continue; // not a request target an HTTP parser would hand us
        }
        let hdrs: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let resp = p.request(method.clone(), &path, &hdrs, body).await;
        let ctx = format!(
            "seed {seed} iteration {i}: {method} {path:?} {hdrs:?} -> {}",
            resp.status
        );
        assert!(allowed.contains(&resp.status.as_u16()), "{ctx}");
        if resp.status != StatusCode::OK
            && resp.status != StatusCode::NOT_MODIFIED
            && method != Method::HEAD
        {
            let v: serde_json::Value = serde_json::from_slice(&resp.body).expect(&ctx);
            assert!(v["errorCode"].is_string(), "{ctx}");
        }
    }
}

#[test]
fn config_loader_never_panics() {
    let base = std::fs::read_to_string("config/gateway.toml").unwrap();
    let lines: Vec<&str> = base.lines().collect();
    let (mut r, seed) = rng();
    let junk = [
        "\"",
        "=",
        "[",
        "]",
        "0",
        "-1",
        "1e99",
        "\"5x\"",
        "\"9999999999999GiB\"",
        "\u{0}",
        "{",
        "true",
        "\n",
    ];
    for i in 0..iterations(50_000) / 10 {
        let mut text: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
        for _ in 0..r.usize(1..4) {
            let li = r.usize(..text.len());
            match r.u8(..4) {
                0 => {
                    text.remove(li);
                }
                1 => {
                    let line = &mut text[li];
                    if !line.is_empty() {
                        let at = line
                            .char_indices()
                            .nth(r.usize(..line.chars().count()))
                            .map(|(b, _)| b)
                            .unwrap_or(0);
                        line.insert_str(at, junk[r.usize(..junk.len())]);
                    }
                }
                2 => {
                    if let Some((k, _)) = text[li].split_once(" = ") {
                        text[li] = format!("{k} = {}", junk[r.usize(..junk.len())]);
                    }
                }
                _ => {
                    let other = r.usize(..text.len());
                    text.swap(li, other);
                }
            }
        }
        let doc = text.join("\n");
        let env = vec![(
            "THINGSPACE_GATEWAY_CACHE__TTL".to_string(),
            junk[r.usize(..junk.len())].trim_matches('"').to_string(),
        )];
        let env: &[(String, String)] = if r.bool() { &env } else { &[] };
        let result = std::panic::catch_unwind(|| from_toml_with_env(&doc, env).map(|_| ()));
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => assert_eq!(e.0.lines().count(), 1, "seed {seed} iteration {i}: {e}"),
            Err(_) => panic!("seed {seed} iteration {i}: the config loader panicked on:\n{doc}"),
        }
    }
}
