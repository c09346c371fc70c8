//! The account lock (SPEC §5): the gateway never sends the login that would lock the ThingSpace
//! user, across restarts, changed passwords and resets, and token trouble never becomes a storm
//! of token calls. In-process under paused time where time matters (the simulator's transport, no
//! sockets); every test checks the simulator's rejected logins and that the user never locked.

use crate::common::*;
use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use thingspace_gateway::api::ClientApi;
use thingspace_gateway::respond::Body;
use thingspace_gateway::runtime::Gateway;
use thingspace_gateway::sim_transport::sim_transport;
use thingspace_sim::control::FaultRequest;
use thingspace_sim::{SimOptions, Simulator};
use tokio::time::sleep;

const MIN: Duration = Duration::from_secs(60);
const FAULT_401: &str = r#"{"fault":{"code":"900901","message":"Invalid Credentials","description":"Invalid Credentials"}}"#;
const AUTH_FAILED: &str = "GW_UPSTREAM_AUTH_FAILED";
const UNAVAILABLE: &str = "GW_UPSTREAM_UNAVAILABLE";

fn guard_file(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tsgw-lockout-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("gateway.guard")
}

/// The `[credentials]` block: `password`, the guard file, the default pause (15 m).
fn creds(password: &str, file: &Path) -> String {
    format!(
        "[credentials]\npassword = \"{password}\"\nguard_file = {:?}\n",
        file.display().to_string()
    )
}

/// A gateway over the simulator in-process, started and stopped like a process (the stop
/// releases the guard file's lock).
struct Gw {
    gw: Arc<Gateway>,
    api: ClientApi,
    task: tokio::task::JoinHandle<()>,
}

impl Gw {
    fn start(sim: &Simulator, extra: &str) -> anyhow::Result<Gw> {
        let cfg = config(&sim.base_url(), extra);
        let transport = sim_transport(sim, cfg.upstream.max_response_bytes.as_usize());
        let gw = Gateway::with_transport(cfg, transport)?;
        let task = gw.spawn_token_refresher();
        Ok(Gw {
            api: gw.client_api(),
            gw,
            task,
        })
    }

    async fn get(&self, path: &str) -> Resp {
        let req = Request::builder()
            .method(Method::GET)
            .uri(path)
            .body(Body::new(Bytes::new()))
            .unwrap();
        let (parts, body) = self.api.serve(req).await.into_parts();
        Resp {
            status: parts.status,
            headers: parts.headers,
            body: body.collect().await.unwrap().to_bytes(),
        }
    }

    /// `/status` `tokens.session`.
    fn session(&self) -> serde_json::Value {
        self.gw.tokens().status_json()["session"].clone()
    }

    fn metric(&self, series: &str) -> f64 {
        let m = self.gw.metrics().render();
        m.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
            .unwrap_or_else(|| panic!("no series {series}"))
            .parse()
            .unwrap()
    }

    async fn stop(self) {
        self.gw.shutdown().trigger();
        let _ = self.task.await;
    }
}

/// One request a minute for `minutes`; every answer must be `code` (502 or 503).
async fn requests_fail(gw: &Gw, path: &str, minutes: u32, code: &str) {
    for minute in 0..minutes {
        let r = gw.get(path).await;
        assert_eq!(r.error_code(), code, "minute {minute}: {:?}", r.body);
        sleep(MIN).await;
    }
}

fn assert_never_locked(sim: &Simulator) {
    assert_eq!(sim.lock_events(), 0, "the simulated user locked");
}

#[tokio::test(start_paused = true)]
async fn three_starts_with_a_wrong_password_stay_below_the_lock() {
    let sim = start_sim(sim_opts()).await;
    let page = license_path(&sim.account_names()[0], 0);
    let file = guard_file("restarts");
    let mut per_start = Vec::new();
    for _ in 0..3 {
        let before = sim.rejected_logins();
        let gw = Gw::start(&sim, &creds("wrong", &file)).unwrap();
        requests_fail(&gw, &page, 20, AUTH_FAILED).await;
        per_start.push(sim.rejected_logins() - before);
        gw.stop().await;
    }
    // Start 1: two, paused 15 m, a third. Start 2: the pause read back, then the fourth and the
    // stop. Start 3: stopped. (Before the guard file: 3 + 3 and the fifth locked the user.)
    assert_eq!(per_start, [3, 1, 0]);
    assert_eq!(sim.rejected_logins(), 4);
    assert_never_locked(&sim);
    let gw = Gw::start(&sim, &creds("wrong", &file)).unwrap();
    let s = gw.session();
    assert_eq!(
        (s["failures"].as_u64(), s["attempts"].as_u64()),
        (Some(4), Some(4))
    );
    assert_eq!(s["stopped"], true);
    let r = gw.get(&page).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    assert_eq!(
        r.json()["errorMessage"],
        "upstream logins are stopped to protect the account until an operator resets them"
    );
    gw.stop().await;
}

/// Drives the guard file to the stop with a wrong password (four rejected logins).
async fn stopped_guard_file(sim: &Simulator, name: &str) -> PathBuf {
    let file = guard_file(name);
    let gw = Gw::start(sim, &creds("wrong", &file)).unwrap();
    requests_fail(
        &gw,
        &license_path(&sim.account_names()[0], 0),
        35,
        AUTH_FAILED,
    )
    .await;
    assert_eq!(gw.session()["stopped"], true);
    gw.stop().await;
    assert_eq!(sim.rejected_logins(), 4);
    file
}

#[tokio::test(start_paused = true)]
async fn the_stop_survives_restarts_and_changed_passwords_and_a_reset_allows_one_attempt() {
    let sim = start_sim(sim_opts()).await;
    let page = license_path(&sim.account_names()[0], 0);
    let file = stopped_guard_file(&sim, "stop").await;
    // The right password does not lift a stop: no login at all.
    let gw = Gw::start(&sim, &creds("demo-pass", &file)).unwrap();
    requests_fail(&gw, &page, 60, AUTH_FAILED).await;
    assert_eq!(sim.count("session_login"), 4);
    let reasons = gw.gw.tokens().readiness().unwrap_err().join("; ");
    assert!(reasons.contains("stopped"), "{reasons}");
    gw.stop().await;
    // The operator makes sure ThingSpace's count is back to zero, then resets: with a password
    // that is still wrong, exactly one attempt, then the stop again.
    sim.apply(FaultRequest {
        unlock_users: true,
        ..Default::default()
    })
    .unwrap();
    let gw = Gw::start(&sim, &creds("still-wrong", &file)).unwrap();
    gw.gw.tokens().reset_login_guard().await.unwrap();
    requests_fail(&gw, &page, 60, AUTH_FAILED).await;
    assert_eq!(sim.rejected_logins(), 5);
    assert_eq!(gw.session()["attempts"], 4);
    assert_eq!(gw.session()["stopped"], true);
    gw.stop().await;
    // Restarted with the right password: still stopped until the next reset, which logs in.
    let gw = Gw::start(&sim, &creds("demo-pass", &file)).unwrap();
    assert_eq!(gw.get(&page).await.error_code(), AUTH_FAILED);
    gw.gw.tokens().reset_login_guard().await.unwrap();
    assert_eq!(gw.get(&page).await.status, StatusCode::OK);
    assert_eq!(gw.session()["attempts"], 0);
    assert_eq!(gw.session()["failures"], 0);
    gw.stop().await;
    assert_eq!(sim.rejected_logins(), 5);
    assert_eq!(sim.count_status("session_login", 200), 1);
    assert_never_locked(&sim);
}

#[tokio::test(start_paused = true)]
async fn changed_credentials_lift_a_pause_with_one_attempt() {
    let sim = start_sim(sim_opts()).await;
    let page = license_path(&sim.account_names()[0], 0);
    let file = guard_file("changed");
    let gw = Gw::start(&sim, &creds("wrong-1", &file)).unwrap();
    requests_fail(&gw, &page, 1, AUTH_FAILED).await;
    assert!(gw.session()["paused_until"].is_string());
    gw.stop().await;
    assert_eq!(sim.rejected_logins(), 2);
    // A different (still wrong) password: one attempt, paused again.
    let gw = Gw::start(&sim, &creds("wrong-2", &file)).unwrap();
    requests_fail(&gw, &page, 10, AUTH_FAILED).await;
    assert_eq!(sim.rejected_logins(), 3);
    assert_eq!(gw.session()["attempts"], 3);
    gw.stop().await;
    // The same password again: the pause holds.
    let gw = Gw::start(&sim, &creds("wrong-2", &file)).unwrap();
    requests_fail(&gw, &page, 10, AUTH_FAILED).await;
    assert_eq!(sim.rejected_logins(), 3);
    gw.stop().await;
    // The right one: one attempt, accepted.
    let gw = Gw::start(&sim, &creds("demo-pass", &file)).unwrap();
    assert_eq!(gw.get(&page).await.status, StatusCode::OK);
    assert_eq!(gw.session()["attempts"], 0);
    gw.stop().await;
    assert_eq!(sim.count("session_login"), 4);
    assert_eq!(sim.rejected_logins(), 3);
    assert_never_locked(&sim);
}

#[tokio::test(start_paused = true)]
async fn a_corrupt_guard_file_allows_one_attempt() {
    let sim = start_sim(sim_opts()).await;
    let page = license_path(&sim.account_names()[0], 0);
    let file = guard_file("corrupt");
    std::fs::write(&file, b"{\"version\":1,\"users\":{\"demo-user\":{\"attem").unwrap();
    let gw = Gw::start(&sim, &creds("wrong", &file)).unwrap();
    requests_fail(&gw, &page, 60, AUTH_FAILED).await;
    assert_eq!(
        sim.rejected_logins(),
        1,
        "attempts 3 on an unreadable file: one login"
    );
    assert_eq!(gw.session()["stopped"], true);
    gw.stop().await;
    std::fs::write(&file, b"garbage").unwrap();
    let gw = Gw::start(&sim, &creds("demo-pass", &file)).unwrap();
    assert_eq!(gw.get(&page).await.status, StatusCode::OK);
    assert_eq!(gw.session()["attempts"], 0);
    gw.stop().await;
    assert_eq!(sim.count("session_login"), 2);
    assert_never_locked(&sim);
}

#[tokio::test(start_paused = true)]
async fn no_login_is_sent_when_the_attempt_cannot_be_recorded() {
    let sim = start_sim(sim_opts()).await;
    let page = license_path(&sim.account_names()[0], 0);
    let file = guard_file("unwritable");
    // The temporary file of the atomic write cannot be created: every save fails.
    let blocker = file.with_file_name("gateway.guard.tmp");
    std::fs::create_dir_all(&blocker).unwrap();
    let gw = Gw::start(&sim, &creds("demo-pass", &file)).unwrap();
    for _ in 0..30 {
        let r = gw.get(&page).await;
        assert_eq!(
            (r.status, r.error_code()),
            (StatusCode::SERVICE_UNAVAILABLE, UNAVAILABLE.into())
        );
        sleep(Duration::from_secs(1)).await;
    }
    assert_eq!(sim.count("session_login"), 0);
    assert_eq!(gw.session()["attempts"], 0);
    std::fs::remove_dir(&blocker).unwrap();
    sleep(MIN).await;
    assert_eq!(gw.get(&page).await.status, StatusCode::OK);
    assert_eq!(sim.count("session_login"), 1);
    gw.stop().await;
    assert_never_locked(&sim);
}

#[tokio::test(start_paused = true)]
async fn a_second_gateway_on_the_same_guard_file_is_refused() {
    let sim = start_sim(sim_opts()).await;
    let file = guard_file("second");
    let first = Gw::start(&sim, &creds("demo-pass", &file)).unwrap();
    let e = Gw::start(&sim, &creds("demo-pass", &file)).err().unwrap();
    let e = format!("{e:#}");
    assert!(
        e.starts_with("credentials.guard_file") && e.contains("another gateway process"),
        "{e}"
    );
    first.stop().await;
    Gw::start(&sim, &creds("demo-pass", &file))
        .unwrap()
        .stop()
        .await;
}

#[tokio::test(start_paused = true)]
async fn a_login_401_that_is_not_a_fault_is_a_rejected_login() {
    let sim = start_sim(sim_opts()).await;
    sim.apply(FaultRequest {
        body: Some(r#"{"errorCode":"InvalidCredentials","errorMessage":"Invalid"}"#.into()),
        ..FaultRequest::status("session_login", 1000, 401)
    })
    .unwrap();
    let gw = Gw::start(&sim, "").unwrap();
    let page = license_path(&sim.account_names()[0], 0);
    for _ in 0..80 {
        let r = gw.get(&page).await;
        assert_eq!(
            (r.status, r.error_code()),
            (StatusCode::BAD_GATEWAY, AUTH_FAILED.into())
        );
        sleep(Duration::from_millis(100)).await;
    }
    // Before: 53 logins and 53 token calls in 8 s, `failures` 0.
    assert_eq!(sim.count("session_login"), 2);
    assert_eq!(sim.count("oauth_token"), 1);
    let s = gw.session();
    assert_eq!(
        (s["failures"].as_u64(), s["attempts"].as_u64()),
        (Some(2), Some(2))
    );
    assert!(s["paused_until"].is_string());
    assert_eq!(
        gw.metric(
            "thingspace_gateway_token_refreshes_total{outcome=\"rejected\",token=\"session\"}"
        ),
        2.0
    );
    assert_eq!(sim.rejected_logins(), 0);
    assert_never_locked(&sim);
    gw.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_fault_401_at_login_renews_the_bearer_once_then_backs_off() {
    let sim = start_sim(sim_opts()).await;
    sim.apply(FaultRequest {
        body: Some(FAULT_401.into()),
        ..FaultRequest::status("session_login", 1000, 401)
    })
    .unwrap();
    let gw = Gw::start(&sim, "").unwrap();
    let page = license_path(&sim.account_names()[0], 0);
    sleep(Duration::from_millis(500)).await;
    // One renewal: two token calls, two logins; then the backoff (at least 1 s).
    assert_eq!(
        (sim.count("oauth_token"), sim.count("session_login")),
        (2, 2)
    );
    for _ in 0..4 {
        let r = gw.get(&page).await;
        assert_eq!(r.error_code(), AUTH_FAILED);
        assert_eq!(
            r.json()["errorMessage"],
            "upstream refused a freshly issued bearer token"
        );
        sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        (sim.count("oauth_token"), sim.count("session_login")),
        (2, 2)
    );
    // Each backoff step renews once more; a login's attempt stays charged (only connect errors
    // and 5xx are refunded), so the fourth stops logins.
    sleep(2 * MIN).await;
    assert_eq!(sim.count("session_login"), 4);
    assert!(
        sim.count("oauth_token") <= 5,
        "{}",
        sim.count("oauth_token")
    );
    assert_eq!(gw.session()["stopped"], true);
    assert_eq!(sim.rejected_logins(), 0);
    assert_never_locked(&sim);
    gw.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_persistent_401_on_pages_makes_no_renewal_storm() {
    let sim = start_sim(sim_opts()).await;
    let gw = Gw::start(&sim, "").unwrap();
    sleep(Duration::from_millis(100)).await;
    assert_eq!(
        (sim.count("oauth_token"), sim.count("session_login")),
        (1, 1)
    );
    sim.apply(FaultRequest {
        body: Some(FAULT_401.into()),
        ..FaultRequest::status("licenses", 1000, 401)
    })
    .unwrap();
    let account = sim.account_names()[0].clone();
    let imeis = sim.imeis(&account);
    // Before: 8 cold requests made 15 token calls and 15 sessions.
    for imei in &imeis[0..8] {
        let r = gw.get(&license_path(&account, *imei)).await;
        assert_eq!(
            (r.status, r.error_code()),
            (StatusCode::BAD_GATEWAY, AUTH_FAILED.into())
        );
    }
    assert_eq!(
        (sim.count("oauth_token"), sim.count("session_login")),
        (2, 2)
    );
    assert_eq!(sim.count_status("licenses", 401), 2);
    // One renewal per backoff step, whoever asks.
    sleep(Duration::from_secs(5)).await;
    for imei in &imeis[8..16] {
        assert_eq!(
            gw.get(&license_path(&account, *imei)).await.error_code(),
            AUTH_FAILED
        );
    }
    assert_eq!(
        (sim.count("oauth_token"), sim.count("session_login")),
        (3, 3)
    );
    assert_eq!(sim.count_status("licenses", 401), 3);
    assert_eq!(
        gw.session()["attempts"],
        0,
        "accepted logins charge nothing"
    );
    assert_eq!(sim.rejected_logins(), 0);
    assert_never_locked(&sim);
    gw.stop().await;
}

#[tokio::test(start_paused = true)]
async fn no_token_call_during_a_429_cooldown() {
    let sim = start_sim(sim_opts()).await;
    sim.apply(FaultRequest {
        retry_after: Some("30".into()),
        ..FaultRequest::status("oauth_token", 1, 429)
    })
    .unwrap();
    let gw = Gw::start(&sim, "").unwrap();
    let page = license_path(&sim.account_names()[0], 0);
    for _ in 0..300 {
        let r = gw.get(&page).await;
        assert_eq!(
            (r.status, r.error_code()),
            (StatusCode::SERVICE_UNAVAILABLE, UNAVAILABLE.into())
        );
        assert!(!r.header("retry-after").is_empty());
        sleep(Duration::from_millis(10)).await;
    }
    // Before: the failure counter reached 246 in 3 s.
    assert_eq!(sim.count("oauth_token"), 1);
    assert_eq!(
        gw.metric("thingspace_gateway_token_refreshes_total{outcome=\"failure\",token=\"oauth\"}"),
        1.0
    );
    sleep(Duration::from_secs(30)).await;
    assert_eq!(gw.get(&page).await.status, StatusCode::OK);
    assert_eq!(sim.count("oauth_token"), 2);
    assert_never_locked(&sim);
    gw.stop().await;
}

#[tokio::test(start_paused = true)]
async fn no_token_call_while_the_circuit_is_open() {
    let sim = start_sim(SimOptions {
        token_ttl: Duration::from_secs(10),
        ..sim_opts()
    })
    .await;
    let gw = Gw::start(
        &sim,
        "[upstream]\nretries = 0\ncircuit_failures = 2\ncircuit_open_for = \"60s\"\n",
    )
    .unwrap();
    let account = sim.account_names()[0].clone();
    let imeis = sim.imeis(&account);
    assert_eq!(
        gw.get(&license_path(&account, 0)).await.status,
        StatusCode::OK
    );
    sim.apply(FaultRequest::status("licenses", 2, 503)).unwrap();
    for imei in &imeis[0..2] {
        assert_eq!(
            gw.get(&license_path(&account, *imei)).await.status,
            StatusCode::BAD_GATEWAY
        );
    }
    assert_eq!(gw.gw.upstream().circuit_state().label(), "open");
    // The bearer expires at 10 s: its refresh waits for the circuit.
    sleep(Duration::from_secs(20)).await;
    for imei in &imeis[2..300] {
        let r = gw.get(&license_path(&account, *imei)).await;
        assert_eq!(
            (r.status, r.error_code()),
            (StatusCode::SERVICE_UNAVAILABLE, UNAVAILABLE.into())
        );
        sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(sim.count("oauth_token"), 1);
    assert_eq!(
        gw.metric("thingspace_gateway_token_refreshes_total{outcome=\"failure\",token=\"oauth\"}"),
        0.0
    );
    sleep(MIN).await;
    assert_eq!(
        gw.get(&license_path(&account, imeis[400])).await.status,
        StatusCode::OK
    );
    assert_never_locked(&sim);
    gw.stop().await;
}

#[tokio::test(start_paused = true)]
async fn token_endpoint_trouble_is_503_and_refused_client_credentials_502() {
    let sim = start_sim(sim_opts()).await;
    let page = license_path(&sim.account_names()[0], 0);
    sim.apply(FaultRequest::status("oauth_token", 1000, 503))
        .unwrap();
    let gw = Gw::start(&sim, "[upstream]\nretries = 0\ncircuit_failures = 1000\n").unwrap();
    let r = gw.get(&page).await;
    assert_eq!(
        (r.status, r.error_code()),
        (StatusCode::SERVICE_UNAVAILABLE, UNAVAILABLE.into())
    );
    assert_eq!(
        r.json()["errorMessage"],
        "upstream tokens are temporarily unavailable; retry later"
    );
    assert!(r.header("retry-after").parse::<u64>().unwrap() >= 1);
    gw.stop().await;
    sim.reset();
    sim.apply(FaultRequest::kind("oauth_token", 1000, "hang"))
        .unwrap();
    let gw = Gw::start(&sim, "[upstream]\ntimeout = \"2s\"\n").unwrap();
    sleep(Duration::from_secs(3)).await;
    let r = gw.get(&page).await;
    assert_eq!(
        (r.status, r.error_code()),
        (StatusCode::SERVICE_UNAVAILABLE, UNAVAILABLE.into())
    );
    gw.stop().await;
    sim.reset();
    sim.apply(FaultRequest {
        body: Some(FAULT_401.into()),
        ..FaultRequest::status("oauth_token", 1000, 401)
    })
    .unwrap();
    let gw = Gw::start(&sim, "").unwrap();
    let r = gw.get(&page).await;
    assert_eq!(
        (r.status, r.error_code()),
        (StatusCode::BAD_GATEWAY, AUTH_FAILED.into())
    );
    assert_eq!(sim.count("session_login"), 0);
    gw.stop().await;
    assert_never_locked(&sim);
}

#[tokio::test(start_paused = true)]
async fn a_5xx_login_is_refunded_and_a_timed_out_one_stays_charged() {
    let sim = start_sim(sim_opts()).await;
    let page = license_path(&sim.account_names()[0], 0);
    sim.apply(FaultRequest::status("session_login", 1, 503))
        .unwrap();
    let gw = Gw::start(&sim, "[upstream]\ntimeout = \"2s\"\n").unwrap();
    sleep(Duration::from_millis(100)).await;
    assert_eq!(sim.count_status("session_login", 503), 1);
    assert_eq!(
        gw.session()["attempts"],
        0,
        "a 5xx never judged the password"
    );
    let r = gw.get(&page).await;
    assert_eq!(
        r.error_code(),
        UNAVAILABLE,
        "backing off, not the credentials"
    );
    gw.stop().await;
    sim.reset();
    sim.apply(FaultRequest::kind("session_login", 1, "hang"))
        .unwrap();
    let gw = Gw::start(&sim, "[upstream]\ntimeout = \"2s\"\n").unwrap();
    sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        gw.session()["attempts"],
        1,
        "a timeout's outcome is unknown"
    );
    sleep(Duration::from_secs(5)).await;
    assert_eq!(gw.get(&page).await.status, StatusCode::OK);
    assert_eq!(gw.session()["attempts"], 0);
    gw.stop().await;
    assert_never_locked(&sim);
}

#[tokio::test(start_paused = true)]
async fn a_locked_user_answer_stops_logins_at_once() {
    let sim = start_sim(sim_opts()).await;
    sim.apply(FaultRequest {
        body: Some(
            r#"{"errorCode":"UnifiedWebService.REQUEST_FAILED.UserLocked","errorMessage":"User account is locked"}"#
                .into(),
        ),
        ..FaultRequest::status("session_login", 1000, 400)
    })
    .unwrap();
    let gw = Gw::start(&sim, "").unwrap();
    let page = license_path(&sim.account_names()[0], 0);
    for _ in 0..60 {
        let r = gw.get(&page).await;
        assert_eq!(r.error_code(), AUTH_FAILED);
        assert_eq!(r.json()["errorMessage"], "upstream reports the user locked");
        sleep(MIN).await;
    }
    assert_eq!(sim.count("session_login"), 1);
    assert_eq!(gw.session()["stopped"], true);
    assert_never_locked(&sim);
    gw.stop().await;
}

#[tokio::test(start_paused = true)]
async fn no_credentials_no_token_call_and_no_login() {
    let sim = start_sim(sim_opts()).await;
    let page = license_path(&sim.account_names()[0], 0);
    let gw = Gw::start(
        &sim,
        "[credentials]\nclient_id = \"\"\nclient_secret = \"\"\nusername = \"\"\npassword = \"\"\n",
    )
    .unwrap();
    requests_fail(&gw, &page, 10, AUTH_FAILED).await;
    assert_eq!(
        gw.get(&page).await.json()["errorMessage"],
        "upstream credentials are not configured"
    );
    let reasons = gw.gw.tokens().readiness().unwrap_err().join("; ");
    assert!(
        reasons.contains("no upstream client credentials configured"),
        "{reasons}"
    );
    gw.stop().await;
    // A client id and secret but no password: the bearer, never a login.
    let gw = Gw::start(&sim, "[credentials]\npassword = \"\"\n").unwrap();
    requests_fail(&gw, &page, 10, AUTH_FAILED).await;
    let reasons = gw.gw.tokens().readiness().unwrap_err().join("; ");
    assert!(
        reasons.contains("no upstream username and password configured"),
        "{reasons}"
    );
    gw.stop().await;
    assert_eq!(sim.count("oauth_token"), 1);
    assert_eq!(sim.count("session_login"), 0);
    assert_never_locked(&sim);
}

/// Polls `/status` (real time, bounded) until `tokens.session` satisfies `done`.
async fn wait_session(admin: &str, done: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    for _ in 0..500 {
        let s = get(&format!("{admin}/status")).await.json()["tokens"]["session"].clone();
        if done(&s) {
            return s;
        }
        sleep(Duration::from_millis(20)).await;
    }
    panic!("the session guard never reached the expected state");
}

#[tokio::test]
async fn readiness_is_a_latch_once_both_tokens_were_held() {
    // An open circuit after being ready: still ready (the cache is served).
    let sim = start_sim(sim_opts()).await;
    let gw = start_gateway(config(
        &sim.base_url(),
        "[upstream]\nretries = 0\ncircuit_failures = 1\ncircuit_open_for = \"1h\"\n",
    ))
    .await;
    wait_ready(&gw).await;
    let account = sim.account_names()[0].clone();
    let imeis = sim.imeis(&account);
    let url = |i: u64| format!("{}{}", gw.base_url(), license_path(&account, i));
    assert_eq!(get(&url(0)).await.status, StatusCode::OK);
    sim.apply(FaultRequest::status("licenses", 1, 503)).unwrap();
    assert_eq!(get(&url(imeis[0])).await.status, StatusCode::BAD_GATEWAY);
    let status = get(&format!("{}/status", gw.admin_url())).await.json();
    assert_eq!(status["upstream"]["circuit"], "open");
    let ready = get(&format!("{}/readyz", gw.admin_url())).await;
    assert_eq!(ready.status, StatusCode::OK, "{:?}", ready.body);
    assert_eq!(get(&url(0)).await.header("x-cache"), "HIT");
    gw.stop().await;

    // Logins rejected and paused after being ready: still ready.
    let sim = start_sim(sim_opts()).await;
    let gw = start_gateway(config(&sim.base_url(), "")).await;
    wait_ready(&gw).await;
    sim.apply(FaultRequest {
        body: Some(r#"{"errorCode":"InvalidCredentials","errorMessage":"Invalid"}"#.into()),
        expire_sessions: true,
        ..FaultRequest::status("session_login", 2, 400)
    })
    .unwrap();
    let account = sim.account_names()[0].clone();
    for i in 0..3 {
        let r = get(&format!("{}{}", gw.base_url(), license_path(&account, i))).await;
        assert_eq!(r.error_code(), AUTH_FAILED);
    }
    let s = wait_session(&gw.admin_url(), |s| s["paused_until"].is_string()).await;
    assert_eq!(
        (s["failures"].as_u64(), s["attempts"].as_u64()),
        (Some(2), Some(2))
    );
    assert_eq!(s["stopped"], false);
    assert_eq!(s["held"], false);
    let ready = get(&format!("{}/readyz", gw.admin_url())).await;
    assert_eq!(ready.status, StatusCode::OK, "{:?}", ready.body);
    assert_eq!(sim.count_status("session_login", 400), 2);
    assert_never_locked(&sim);
    gw.stop().await;

    // Never held both: 503 with the reasons.
    let sim = start_sim(sim_opts()).await;
    let gw = start_gateway(config(
        &sim.base_url(),
        "[credentials]\npassword = \"wrong\"\n",
    ))
    .await;
    wait_session(&gw.admin_url(), |s| s["paused_until"].is_string()).await;
    let ready = get(&format!("{}/readyz", gw.admin_url())).await;
    assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE);
    let reasons = ready.json()["reasons"].to_string();
    assert!(
        reasons.contains("no session token held yet") && reasons.contains("paused"),
        "{reasons}"
    );
    assert_eq!(sim.rejected_logins(), 2);
    assert_never_locked(&sim);
    gw.stop().await;
}

#[tokio::test]
async fn credentials_reset_on_the_admin_api_allows_exactly_one_attempt() {
    let sim = start_sim(sim_opts()).await;
    let file = guard_file("http-reset");
    let gw = start_gateway(config(
        &sim.base_url(),
        &format!("{}login_pause = \"10ms\"\n", creds("wrong", &file)),
    ))
    .await;
    let admin = gw.admin_url();
    // Short pauses: four rejected logins, then the stop.
    let s = wait_session(&admin, |s| s["failures"] == 4).await;
    assert_eq!(
        (s["attempts"].as_u64(), s["stopped"].as_bool()),
        (Some(4), Some(true))
    );
    assert_eq!(sim.rejected_logins(), 4);
    let reset_url = format!("{admin}/credentials/reset");
    assert_eq!(get(&reset_url).await.status, StatusCode::METHOD_NOT_ALLOWED);
    // The operator has ThingSpace's count back to zero (a good login elsewhere), then resets.
    sim.apply(FaultRequest {
        unlock_users: true,
        ..Default::default()
    })
    .unwrap();
    let r = request(Method::POST, &reset_url, &[], b"").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json(), serde_json::json!({"reset": true}));
    let s = wait_session(&admin, |s| s["failures"] == 1).await;
    assert_eq!(
        (s["attempts"].as_u64(), s["stopped"].as_bool()),
        (Some(4), Some(true))
    );
    let page = format!(
        "{}{}",
        gw.base_url(),
        license_path(&sim.account_names()[0], 0)
    );
    for _ in 0..5 {
        assert_eq!(get(&page).await.error_code(), AUTH_FAILED);
    }
    assert_eq!(sim.rejected_logins(), 5, "exactly one more attempt");
    assert_eq!(sim.stats()["logins"]["failed_in_a_row"], 1);
    assert_never_locked(&sim);
    gw.stop().await;
}
