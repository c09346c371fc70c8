//! The reload seams (SPEC §11), called directly the way the reload driver calls them after a
//! successful swap: `ClientApi::apply_clients`, `Upstream::apply`, `TokenManager::apply`.
//! Clients over real sockets; the budget and the logins in-process under paused time. Every
//! login test counts the simulator's rejected logins and checks the user never locked.

use crate::common::*;
use http::StatusCode;
use std::time::Duration;
use thingspace_gateway::clients::sha256_hex;
use thingspace_gateway::config::Config;
use thingspace_sim::Simulator;
use tokio::time::sleep;

const KEY1: &str = "key-one-0123456789abcdef0123456789";
const KEY2: &str = "key-two-0123456789abcdef0123456789";

/// `[clients]` required, signed with `key`, and these `(id, secret, accounts)`.
fn clients_toml(key: &str, clients: &[(&str, &str, &[&str])]) -> String {
    let mut t = format!("[clients]\nmode = \"required\"\ntoken_signing_key = \"{key}\"\n");
    for (id, secret, accounts) in clients {
        t.push_str(&format!(
            "[[clients.client]]\nid = \"{id}\"\nsecret_sha256 = \"{}\"\naccounts = {accounts:?}\n",
            sha256_hex(secret)
        ));
    }
    t
}

async fn status_with(url: &str, authorization: &str) -> StatusCode {
    let r = get_with(url, &[("authorization", authorization)]).await;
    match r.status {
        StatusCode::UNAUTHORIZED => assert_eq!(r.error_code(), "GW_UNAUTHORIZED"),
        StatusCode::FORBIDDEN => assert_eq!(r.error_code(), "GW_FORBIDDEN"),
        _ => {}
    }
    r.status
}

#[tokio::test]
async fn clients_added_removed_rekeyed_and_their_accounts_apply_at_once() {
    let sim = start_sim(sim_opts()).await;
    let accounts = sim.account_names();
    let (a0, a1) = (accounts[0].as_str(), accounts[1].as_str());
    let cfg_of = |t: String| config(&sim.base_url(), &t);
    let start = cfg_of(clients_toml(KEY1, &[("billing", "s1", &[a0])]));
    let gw = start_gateway(start).await;
    wait_ready(&gw).await;
    let api = gw.gateway.client_api();
    let base = gw.base_url();
    let page = |a: &str| format!("{base}{}", license_path(a, 0));
    let ops_basic = basic("ops", "s2");

    assert_eq!(
        status_with(&page(a0), &ops_basic).await,
        StatusCode::UNAUTHORIZED
    );
    // Added: authenticates, by Basic and by a token it is issued.
    let two = cfg_of(clients_toml(
        KEY1,
        &[("billing", "s1", &[a0]), ("ops", "s2", &["*"])],
    ));
    api.apply_clients(&two.clients).unwrap();
    assert_eq!(status_with(&page(a1), &ops_basic).await, StatusCode::OK);
    let ops_bearer = format!("Bearer {}", gateway_token(&base, "ops", "s2").await);
    assert_eq!(status_with(&page(a1), &ops_bearer).await, StatusCode::OK);
    let billing_bearer = format!("Bearer {}", gateway_token(&base, "billing", "s1").await);

    // Accounts changed: 403 ↔ 200, for Basic and for a token issued before the change.
    assert_eq!(
        status_with(&page(a1), &billing_bearer).await,
        StatusCode::FORBIDDEN
    );
    let moved = cfg_of(clients_toml(
        KEY1,
        &[("billing", "s1", &[a1]), ("ops", "s2", &["*"])],
    ));
    api.apply_clients(&moved.clients).unwrap();
    assert_eq!(
        status_with(&page(a1), &billing_bearer).await,
        StatusCode::OK
    );
    assert_eq!(
        status_with(&page(a0), &basic("billing", "s1")).await,
        StatusCode::FORBIDDEN
    );

    // Removed: its Basic credentials and its issued token are refused at once.
    let removed = cfg_of(clients_toml(KEY1, &[("billing", "s1", &[a1])]));
    api.apply_clients(&removed.clients).unwrap();
    assert_eq!(
        status_with(&page(a1), &ops_basic).await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        status_with(&page(a1), &ops_bearer).await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        status_with(&page(a1), &billing_bearer).await,
        StatusCode::OK
    );

    // Re-keyed (new secret): the old secret and the tokens issued for it are refused.
    let rekeyed = cfg_of(clients_toml(KEY1, &[("billing", "s1-new", &[a1])]));
    api.apply_clients(&rekeyed.clients).unwrap();
    for auth in [basic("billing", "s1"), billing_bearer.clone()] {
        assert_eq!(
            status_with(&page(a1), &auth).await,
            StatusCode::UNAUTHORIZED
        );
    }
    assert_eq!(
        status_with(&page(a1), &basic("billing", "s1-new")).await,
        StatusCode::OK
    );

    // A new signing key: tokens signed with the old one are refused; new ones work.
    let fresh = format!("Bearer {}", gateway_token(&base, "billing", "s1-new").await);
    assert_eq!(status_with(&page(a1), &fresh).await, StatusCode::OK);
    let new_key = cfg_of(clients_toml(KEY2, &[("billing", "s1-new", &[a1])]));
    api.apply_clients(&new_key.clients).unwrap();
    assert_eq!(
        status_with(&page(a1), &fresh).await,
        StatusCode::UNAUTHORIZED
    );
    let fresh = format!("Bearer {}", gateway_token(&base, "billing", "s1-new").await);
    assert_eq!(status_with(&page(a1), &fresh).await, StatusCode::OK);

    // Mode "none" (loopback listener): everyone in.
    let mut open = new_key.clone();
    open.clients.mode = thingspace_gateway::config::ClientMode::None;
    api.apply_clients(&open.clients).unwrap();
    assert_eq!(get(&page(a0)).await.status, StatusCode::OK);
    gw.stop().await;
}

/// A client whose rate is unchanged keeps its bucket's state through a rebuild; a changed rate
/// starts a fresh bucket.
#[tokio::test]
async fn an_unchanged_client_keeps_its_rate_bucket() {
    let sim = start_sim(sim_opts()).await;
    let a0 = sim.account_names()[0].clone();
    let toml = |burst: u32, extra_client: bool| {
        let mut t = clients_toml(KEY1, &[]);
        t.push_str(&format!(
            "[[clients.client]]\nid = \"billing\"\nsecret_sha256 = \"{}\"\naccounts = [\"*\"]\n\
             rate_per_second = 0.001\nburst = {burst}\n",
            sha256_hex("s1")
        ));
        if extra_client {
            t.push_str(&format!(
                "[[clients.client]]\nid = \"ops\"\nsecret_sha256 = \"{}\"\naccounts = [\"*\"]\n",
                sha256_hex("s2")
            ));
        }
        config(&sim.base_url(), &t)
    };
    let gw = start_gateway(toml(2, false)).await;
    let api = gw.gateway.client_api();
    let url = format!("{}{}", gw.base_url(), license_path(&a0, 0));
    let auth = basic("billing", "s1");
    let codes = || async { get_with(&url, &[("authorization", &auth)]).await.status };
    assert_eq!(codes().await, StatusCode::OK);
    assert_eq!(codes().await, StatusCode::OK);
    assert_eq!(codes().await, StatusCode::TOO_MANY_REQUESTS);
    // Another client added, billing unchanged: its bucket is still empty.
    api.apply_clients(&toml(2, true).clients).unwrap();
    assert_eq!(codes().await, StatusCode::TOO_MANY_REQUESTS);
    // Its burst changed: a fresh bucket.
    api.apply_clients(&toml(3, true).clients).unwrap();
    for _ in 0..3 {
        assert_eq!(codes().await, StatusCode::OK);
    }
    assert_eq!(codes().await, StatusCode::TOO_MANY_REQUESTS);
    gw.stop().await;
}

/// Requests refused for budget are served once a raised budget is applied.
#[tokio::test(start_paused = true)]
async fn a_raised_budget_serves_what_was_refused() {
    let extra = "[upstream]\nrate_per_second = 0.01\nburst = 3\nmax_queue_wait = \"100ms\"\n";
    let opts = thingspace_sim::SimOptions {
        accounts: 5,
        ..sim_opts()
    };
    let gw = InProc::new(opts, extra).await;
    let accounts = gw.sim.account_names();
    assert!(accounts.len() >= 5);
    let page = |i: usize| license_path(&accounts[i], 0);
    // The token request, the login and the first page take the burst.
    assert_eq!(gw.get(&page(0)).await.status, StatusCode::OK);
    let refused = gw.get(&page(1)).await;
    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(refused.error_code(), "GW_UPSTREAM_UNAVAILABLE");
    let pages_before = gw.sim.count("licenses");
    let mut raised: Config = config(&gw.sim.base_url(), extra);
    raised.upstream.rate_per_second = 100.0;
    raised.upstream.burst = 100;
    gw.gw.upstream().apply(&raised.upstream);
    for index in 1..4 {
        let r = gw.get(&page(index)).await;
        assert_eq!(r.status, StatusCode::OK, "page {index}");
    }
    assert_eq!(gw.sim.count("licenses"), pages_before + 3);
}

/// The HTTP transport takes a new body limit for the next response (real sockets).
#[tokio::test]
async fn a_smaller_response_limit_reaches_the_http_transport() {
    let gw = InProc::over_tcp(sim_opts(), "").await;
    let accounts = gw.sim.account_names();
    assert_eq!(
        gw.get(&license_path(&accounts[0], 0)).await.status,
        StatusCode::OK
    );
    let mut small = config(&gw.sim.base_url(), "");
    small.upstream.max_response_bytes = thingspace_gateway::config::ByteSize(64);
    gw.gw.upstream().apply(&small.upstream);
    let r = gw.get(&license_path(&accounts[1], 0)).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    assert_eq!(r.error_code(), "GW_BAD_GATEWAY");
    // Back up: served again.
    gw.gw
        .upstream()
        .apply(&config(&gw.sim.base_url(), "").upstream);
    assert_eq!(
        gw.get(&license_path(&accounts[1], 0)).await.status,
        StatusCode::OK
    );
}

const MIN: Duration = Duration::from_secs(60);

/// `[credentials]` with `password` inline (the shared config leaves the guard in memory).
fn creds_cfg(sim: &Simulator, password: &str) -> Config {
    config(
        &sim.base_url(),
        &format!("[credentials]\npassword = \"{password}\"\n"),
    )
}

/// Requests a minute apart until the session guard is paused (or `minutes` pass).
async fn until_paused(gw: &InProc, path: &str, minutes: u32) {
    for _ in 0..minutes {
        let r = gw.get(path).await;
        assert_eq!(r.error_code(), "GW_UPSTREAM_AUTH_FAILED", "{:?}", r.body);
        if !gw.gw.tokens().status_json()["session"]["paused_until"].is_null() {
            return;
        }
        sleep(MIN).await;
    }
    panic!("never paused");
}

fn apply_creds(gw: &InProc, password: &str) {
    let cfg = creds_cfg(&gw.sim, password);
    gw.gw
        .tokens()
        .apply(&cfg.credentials, cfg.server.request_timeout.0);
}

#[tokio::test(start_paused = true)]
async fn the_right_password_applied_during_a_pause_logs_in_once() {
    let gw = InProc::new(sim_opts(), "[credentials]\npassword = \"wrong\"\n").await;
    let page = license_path(&gw.sim.account_names()[0], 0);
    until_paused(&gw, &page, 5).await;
    assert_eq!(gw.sim.rejected_logins(), 2);
    assert!(gw.gw.tokens().readiness().is_err());
    let logins = gw.sim.count("session_login");
    // Still paused: a request sends nothing.
    assert_eq!(gw.get(&page).await.error_code(), "GW_UPSTREAM_AUTH_FAILED");
    assert_eq!(gw.sim.count("session_login"), logins);

    apply_creds(&gw, "demo-pass");
    gw.settle().await;
    assert_eq!(gw.get(&page).await.status, StatusCode::OK);
    assert_eq!(gw.sim.count("session_login"), logins + 1);
    assert_eq!(gw.sim.count_status("session_login", 200), 1);
    assert!(gw.gw.tokens().readiness().is_ok());
    let s = gw.gw.tokens().status_json()["session"].clone();
    assert_eq!(
        (s["failures"].as_u64(), s["attempts"].as_u64()),
        (Some(0), Some(0))
    );
    assert_eq!(gw.sim.rejected_logins(), 2);
    assert_eq!(gw.sim.lock_events(), 0);
}

#[tokio::test(start_paused = true)]
async fn changed_credentials_lift_a_pause_for_one_attempt_never_the_stop() {
    let gw = InProc::new(sim_opts(), "[credentials]\npassword = \"wrong\"\n").await;
    let page = license_path(&gw.sim.account_names()[0], 0);
    until_paused(&gw, &page, 5).await;
    assert_eq!(gw.sim.rejected_logins(), 2);
    // Another wrong password: one attempt, rejected, paused again at once (the count was kept).
    for (n, password) in [(3, "wrong-2"), (4, "wrong-3")] {
        let logins = gw.sim.count("session_login");
        apply_creds(&gw, password);
        gw.settle().await;
        for _ in 0..3 {
            assert_eq!(gw.get(&page).await.error_code(), "GW_UPSTREAM_AUTH_FAILED");
            sleep(MIN).await;
        }
        assert_eq!(gw.sim.count("session_login"), logins + 1, "{password}");
        assert_eq!(gw.sim.rejected_logins(), n);
    }
    let s = gw.gw.tokens().status_json()["session"].clone();
    assert_eq!(s["stopped"], true);
    assert_eq!(s["attempts"].as_u64(), Some(4));
    // At the stop, the right password sends no login; only a reset would.
    let logins = gw.sim.count("session_login");
    apply_creds(&gw, "demo-pass");
    gw.settle().await;
    for _ in 0..20 {
        let r = gw.get(&page).await;
        assert_eq!(r.status, StatusCode::BAD_GATEWAY);
        assert_eq!(
            r.json()["errorMessage"],
            "upstream logins are stopped to protect the account until an operator resets them"
        );
        sleep(MIN).await;
    }
    assert_eq!(gw.sim.count("session_login"), logins);
    assert_eq!(gw.sim.rejected_logins(), 4);
    assert_eq!(gw.sim.lock_events(), 0);
}
