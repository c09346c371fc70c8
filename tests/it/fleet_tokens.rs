//! Fleet mode's shared tokens and lockout guard (SPEC §10): three in-process replicas on real
//! sockets, one real redis-server, one simulator; real time with short windows (a real Redis
//! and a paused clock do not mix). Every test checks the simulator's rejected logins and that
//! the user never locked.

use crate::common::*;
use crate::fleet::{eventually, metric};
use crate::redis::{fleet_config, RedisServer};
use http::{Method, StatusCode};
use std::time::Duration;
use thingspace_gateway::config::Config;
use thingspace_gateway::runtime::Running;
use thingspace_sim::control::FaultRequest;
use thingspace_sim::Simulator;

const AUTH_FAILED: &str = "GW_UPSTREAM_AUTH_FAILED";
const UNAVAILABLE: &str = "GW_UPSTREAM_UNAVAILABLE";
const LOCKED_BODY: &str = r#"{"errorCode":"UnifiedWebService.REQUEST_FAILED.UserLocked","errorMessage":"User account is locked"}"#;

/// Three replicas started at once.
async fn start3(cfg: &Config) -> Vec<Running> {
    let (a, b, c) = tokio::join!(
        start_gateway(cfg.clone()),
        start_gateway(cfg.clone()),
        start_gateway(cfg.clone())
    );
    vec![a, b, c]
}

/// `/status` `tokens.session` of a replica.
async fn session(gw: &Running) -> serde_json::Value {
    get(&format!("{}/status", gw.admin_url())).await.json()["tokens"]["session"].clone()
}

/// Polls until every replica's `/status` session satisfies `cond`.
async fn all_sessions(gws: &[Running], secs: u64, cond: impl Fn(&serde_json::Value) -> bool) {
    let ok = eventually(secs, async || {
        for gw in gws {
            if !cond(&session(gw).await) {
                return false;
            }
        }
        true
    })
    .await;
    let mut seen = Vec::new();
    for gw in gws {
        seen.push(session(gw).await);
    }
    assert!(ok, "replicas' sessions never matched: {seen:?}");
}

async fn ready(gw: &Running) -> bool {
    get(&format!("{}/readyz", gw.admin_url())).await.status == StatusCode::OK
}

async fn all_ready(gws: &[Running], secs: u64) {
    for gw in gws {
        assert!(
            eventually(secs, async || ready(gw).await).await,
            "not ready"
        );
    }
}

fn paused_at(max_failed: u64) -> impl Fn(&serde_json::Value) -> bool {
    move |s| s["failures"] == max_failed && s["paused_until"].is_string()
}

/// The simulator's user never locked: its counter and `/_sim/stats` agree.
async fn assert_never_locked(sim: &Simulator) {
    assert_eq!(sim.lock_events(), 0, "the simulated user locked");
    let stats = get(&format!("{}/_sim/stats", sim.base_url())).await.json();
    assert_eq!(stats["logins"]["lock_events"], 0, "{stats}");
    assert_eq!(stats["logins"]["locked"], false, "{stats}");
    assert_eq!(
        stats["logins"]["rejected"],
        sim.rejected_logins(),
        "{stats}"
    );
}

/// The `Authorization` bearer and `VZ-M2M-Token` of the last page request the simulator saw.
fn last_tokens(sim: &Simulator) -> (String, String) {
    let h = sim.last_headers("licenses");
    let find = |name: &str| {
        h.iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    let bearer = find("authorization");
    let bearer = bearer.strip_prefix("Bearer ").unwrap_or("").to_string();
    (bearer, find("vz-m2m-token"))
}

async fn page(gw: &Running, sim: &Simulator, account: usize) -> Resp {
    let path = license_path(&sim.account_names()[account], 0);
    get(&format!("{}{path}", gw.base_url())).await
}

#[tokio::test]
async fn three_replicas_starting_together_make_one_token_call_and_one_login() {
    let sim = start_sim(sim_opts()).await;
    let redis = RedisServer::start().await;
    let cfg = fleet_config(&sim.base_url(), &redis, "");
    let gws = start3(&cfg).await;
    all_ready(&gws, 8).await;
    assert_eq!(sim.count("oauth_token"), 1, "{}", sim.stats());
    assert_eq!(sim.count("session_login"), 1, "{}", sim.stats());
    for (i, gw) in gws.iter().enumerate() {
        let r = page(gw, &sim, i).await;
        assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    }
    assert_eq!(sim.count("oauth_token"), 1);
    assert_eq!(sim.count("session_login"), 1);
    assert_eq!(sim.rejected_logins(), 0);
    assert_never_locked(&sim).await;

    // No Redis value holds a token or a secret in clear.
    let (bearer, session) = last_tokens(&sim);
    assert!(
        bearer.len() > 8 && session.len() > 8,
        "{bearer:?} {session:?}"
    );
    let dump = redis.dump().await;
    let keys: Vec<&str> = dump.iter().map(|(k, _)| k.as_str()).collect();
    assert!(
        keys.iter().any(|k| k.starts_with("tsgw:tok:oauth:")),
        "{keys:?}"
    );
    assert!(
        keys.iter().any(|k| k.starts_with("tsgw:tok:session:")),
        "{keys:?}"
    );
    assert!(
        keys.iter().any(|k| k.starts_with("tsgw:guard:session:")),
        "{keys:?}"
    );
    let secrets = [
        bearer.as_str(),
        session.as_str(),
        "demo-secret",
        "demo-pass",
        "demo-user",
    ];
    for (k, v) in &dump {
        for s in secrets {
            let found = |hay: &[u8]| hay.windows(s.len()).any(|w| w == s.as_bytes());
            assert!(
                !found(k.as_bytes()) && !found(v),
                "{k} holds a secret in clear"
            );
        }
    }
    // The guard's keys never expire; the tokens' do.
    for (k, _) in &dump {
        let ttl: i64 = redis.cmd(&["PTTL", k]).await;
        if k.starts_with("tsgw:guard:") {
            assert_eq!(ttl, -1, "{k}");
        } else if k.starts_with("tsgw:tok:") {
            assert!(ttl > 0, "{k}: {ttl}");
        }
    }
}

#[tokio::test]
async fn wrong_password_on_three_replicas_restarted_three_times_stays_within_max_failed_logins() {
    let sim = start_sim(sim_opts()).await;
    let redis = RedisServer::start().await;
    let cfg = fleet_config(
        &sim.base_url(),
        &redis,
        "[credentials]\npassword = \"wrong\"\nlogin_pause = \"1h\"\n",
    );
    let mut gws = start3(&cfg).await;
    all_sessions(&gws, 8, paused_at(2)).await;
    assert_eq!(sim.rejected_logins(), 2);
    for round in 0..3 {
        for i in 0..gws.len() {
            let old = std::mem::replace(&mut gws[i], start_gateway(cfg.clone()).await);
            old.stop().await;
            all_sessions(&gws[i..=i], 5, paused_at(2)).await;
            let r = page(&gws[i], &sim, 0).await;
            assert_eq!(r.status, StatusCode::BAD_GATEWAY, "round {round}");
            assert_eq!(r.error_code(), AUTH_FAILED);
            assert_eq!(sim.rejected_logins(), 2, "round {round}, replica {i}");
        }
    }
    let s = session(&gws[0]).await;
    assert_eq!(
        (s["failures"].as_u64(), s["attempts"].as_u64()),
        (Some(2), Some(2))
    );
    assert_eq!(s["stopped"], false);
    assert_eq!(sim.count("session_login"), 2, "{}", sim.stats());
    assert_never_locked(&sim).await;
}

#[tokio::test]
async fn after_short_pauses_the_fleet_stops_before_a_fifth_rejection() {
    let sim = start_sim(sim_opts()).await;
    let redis = RedisServer::start().await;
    let cfg = fleet_config(
        &sim.base_url(),
        &redis,
        "[credentials]\npassword = \"wrong\"\nlogin_pause = \"2s\"\n",
    );
    let mut gws = start3(&cfg).await;
    // Restarts while it runs: one replica at a time, every ~1.5 s.
    for gw in gws.iter_mut() {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let old = std::mem::replace(gw, start_gateway(cfg.clone()).await);
        old.stop().await;
    }
    all_sessions(&gws, 8, |s| s["stopped"] == true).await;
    // Longer than a pause: nothing more goes out.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(sim.rejected_logins(), 4, "{}", sim.stats());
    let s = session(&gws[1]).await;
    assert_eq!(s["attempts"], 4);
    let r = page(&gws[2], &sim, 0).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    assert_eq!(r.error_code(), AUTH_FAILED);
    assert_never_locked(&sim).await;
}

#[tokio::test]
async fn a_flushed_redis_gets_the_count_back_from_the_live_replicas() {
    let sim = start_sim(sim_opts()).await;
    let redis = RedisServer::start().await;
    let cfg = fleet_config(
        &sim.base_url(),
        &redis,
        "[credentials]\npassword = \"wrong\"\nlogin_pause = \"2s\"\n",
    );
    let mut gws = start3(&cfg).await;
    // Each time the fleet's count moved, every replica saw it: FLUSHALL, and restart one.
    for (i, rejected) in [2u64, 3, 4].into_iter().enumerate() {
        all_sessions(&gws, 8, |s| s["failures"] == rejected).await;
        let _: String = redis.cmd(&["FLUSHALL"]).await;
        let old = std::mem::replace(&mut gws[i], start_gateway(cfg.clone()).await);
        old.stop().await;
        assert!(sim.rejected_logins() <= 4, "{}", sim.stats());
    }
    all_sessions(&gws, 8, |s| s["stopped"] == true && s["attempts"] == 4).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(sim.rejected_logins(), 4, "{}", sim.stats());
    assert_never_locked(&sim).await;
}

#[tokio::test]
async fn a_reset_on_one_replica_lifts_the_stop_for_all() {
    let sim = start_sim(sim_opts()).await;
    sim.apply(FaultRequest {
        endpoint: Some("session_login".into()),
        count: Some(1),
        kind: Some("status".into()),
        status: Some(400),
        body: Some(LOCKED_BODY.into()),
        ..FaultRequest::default()
    })
    .unwrap();
    let redis = RedisServer::start().await;
    let cfg = fleet_config(&sim.base_url(), &redis, "");
    let mut gws = start3(&cfg).await;
    all_sessions(&gws, 8, |s| s["stopped"] == true).await;
    assert_eq!(sim.count("session_login"), 1);
    let r = page(&gws[1], &sim, 0).await;
    assert_eq!(
        (r.status, r.error_code()),
        (StatusCode::BAD_GATEWAY, AUTH_FAILED.into())
    );
    // A restarted replica finds the stop in Redis.
    let old = std::mem::replace(&mut gws[2], start_gateway(cfg.clone()).await);
    old.stop().await;
    all_sessions(&gws[2..], 5, |s| s["stopped"] == true).await;
    assert_eq!(sim.count("session_login"), 1);

    let r = request(
        Method::POST,
        &format!("{}/credentials/reset", gws[0].admin_url()),
        &[],
        b"",
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(r.json(), serde_json::json!({"reset": true}));
    all_ready(&gws, 8).await;
    for (i, gw) in gws.iter().enumerate() {
        let r = page(gw, &sim, i).await;
        assert_eq!(r.status, StatusCode::OK, "replica {i}: {:?}", r.body);
    }
    all_sessions(&gws, 5, |s| s["attempts"] == 0 && s["stopped"] == false).await;
    assert_eq!(sim.count("session_login"), 2, "one login for the fleet");
    assert_eq!(sim.rejected_logins(), 0);
    assert_never_locked(&sim).await;
}

#[tokio::test]
async fn without_redis_no_login_and_back_the_replicas_share_one_token_again() {
    let sim = start_sim(sim_opts()).await;
    let mut redis = RedisServer::start().await;
    let cfg = fleet_config(&sim.base_url(), &redis, "");
    let gws = start3(&cfg).await;
    all_ready(&gws, 8).await;
    for gw in &gws {
        assert_eq!(page(gw, &sim, 0).await.status, StatusCode::OK);
    }
    assert_eq!(sim.count("session_login"), 1, "{}", sim.stats());
    let up = "thingspace_gateway_redis_up";
    let all_up = async |want: f64| {
        for gw in &gws {
            let admin = gw.admin_url();
            assert!(
                eventually(8, async || metric(&admin, up).await == want).await,
                "redis_up never {want}"
            );
        }
    };

    // Down and back without losing the session: no login, one shared token again.
    redis.kill();
    all_up(0.0).await;
    for (i, gw) in gws.iter().enumerate() {
        assert_eq!(
            page(gw, &sim, i).await.status,
            StatusCode::OK,
            "held tokens in use"
        );
    }
    redis.restart().await;
    all_up(1.0).await;
    assert!(
        eventually(5, async || redis
            .dump()
            .await
            .iter()
            .filter(|(k, _)| k.starts_with("tsgw:tok:"))
            .count()
            == 2)
        .await,
        "the held tokens were not shared again"
    );
    assert_eq!(sim.count("session_login"), 1, "{}", sim.stats());
    assert_eq!(sim.count("oauth_token"), 1, "{}", sim.stats());
    // Back in the fleet, a replica empties its L1 (it may have missed purges, SPEC §10): cache
    // the page again before the next outage.
    let admin = gws[1].admin_url();
    let l1_empty = async || get(&format!("{admin}/status")).await.json()["cache"]["entries"] == 0;
    assert!(eventually(5, l1_empty).await);
    assert_eq!(page(&gws[1], &sim, 0).await.status, StatusCode::OK);

    // Down with the session expired upstream: a request that needs a new session gets 503
    // (not 502), cached pages still answer, and no replica logs in until Redis is back.
    redis.kill();
    all_up(0.0).await;
    sim.apply(FaultRequest {
        expire_sessions: true,
        ..FaultRequest::default()
    })
    .unwrap();
    let r = page(&gws[0], &sim, 2).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{:?}", r.body);
    assert_eq!(r.error_code(), UNAVAILABLE);
    assert_eq!(
        page(&gws[1], &sim, 0).await.status,
        StatusCode::OK,
        "cached"
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        sim.count("session_login"),
        1,
        "a login while redis was down"
    );

    redis.restart().await;
    all_up(1.0).await;
    for (i, gw) in gws.iter().enumerate() {
        let ok = eventually(8, async || page(gw, &sim, 2).await.status == StatusCode::OK).await;
        assert!(ok, "replica {i} never served again");
    }
    assert_eq!(sim.count("session_login"), 2, "one login for the fleet");
    assert_eq!(sim.rejected_logins(), 0);
    assert_never_locked(&sim).await;
}

#[tokio::test]
async fn a_session_kept_alive_on_one_replica_is_alive_on_the_others() {
    let sim = start_sim(thingspace_sim::SimOptions {
        session_idle: Duration::from_secs(2),
        ..sim_opts()
    })
    .await;
    let redis = RedisServer::start().await;
    let cfg = fleet_config(
        &sim.base_url(),
        &redis,
        "[credentials]\nsession_idle_timeout = \"2s\"\n",
    );
    let gws = start3(&cfg).await;
    all_ready(&gws, 8).await;
    assert_eq!(sim.count("session_login"), 1);
    // Replica A alone uses the session for twice the idle timeout.
    for _ in 0..20 {
        let purge = request(
            Method::DELETE,
            &format!("{}/cache", gws[0].admin_url()),
            &[],
            b"",
        )
        .await;
        assert_eq!(purge.status, StatusCode::OK);
        assert_eq!(page(&gws[0], &sim, 0).await.status, StatusCode::OK);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // B and C, idle all along, use the same session: no new login.
    for (i, gw) in gws.iter().enumerate().skip(1) {
        let r = page(gw, &sim, i).await;
        assert_eq!(r.status, StatusCode::OK, "replica {i}: {:?}", r.body);
    }
    assert_eq!(sim.count("session_login"), 1, "{}", sim.stats());
    assert_eq!(
        sim.count_status("licenses", 400),
        0,
        "no expired session was sent"
    );
    assert_eq!(sim.rejected_logins(), 0);
    assert_never_locked(&sim).await;
}

#[tokio::test]
async fn without_redis_the_oauth_token_is_renewed_alone_at_most_once_a_minute() {
    let sim = start_sim(sim_opts()).await;
    let mut redis = RedisServer::start().await;
    let cfg = fleet_config(&sim.base_url(), &redis, "");
    let gws = start3(&cfg).await;
    all_ready(&gws, 8).await;
    assert_eq!(sim.count("oauth_token"), 1);
    redis.kill();
    for gw in &gws {
        let admin = gw.admin_url();
        let down = async || metric(&admin, "thingspace_gateway_redis_up").await == 0.0;
        assert!(eventually(8, down).await, "redis_up never 0");
    }
    let revoke = || {
        sim.apply(FaultRequest {
            revoke_tokens: true,
            ..FaultRequest::default()
        })
        .unwrap()
    };
    revoke();
    // Each replica renews the bearer alone, once, and keeps its session.
    for (i, gw) in gws.iter().take(2).enumerate() {
        let r = page(gw, &sim, 1).await;
        assert_eq!(r.status, StatusCode::OK, "replica {i}: {:?}", r.body);
        assert_eq!(sim.count("oauth_token"), 2 + i as u64, "{}", sim.stats());
    }
    // Not twice within a minute.
    revoke();
    let r = page(&gws[0], &sim, 2).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{:?}", r.body);
    assert_eq!(r.error_code(), UNAVAILABLE);
    assert_eq!(sim.count("oauth_token"), 3, "{}", sim.stats());
    assert_eq!(
        sim.count("session_login"),
        1,
        "no login while redis is down"
    );
    // The fleet's count cannot be reset without Redis: nothing changes, and the answer says so.
    let r = request(
        Method::POST,
        &format!("{}/credentials/reset", gws[1].admin_url()),
        &[],
        b"",
    )
    .await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{:?}", r.body);
    assert_eq!(r.json()["reset"], false);
    assert_eq!(sim.rejected_logins(), 0);
    assert_never_locked(&sim).await;
}

#[tokio::test]
async fn a_wrong_client_secret_pauses_token_requests_for_the_whole_fleet() {
    let sim = start_sim(sim_opts()).await;
    let redis = RedisServer::start().await;
    let cfg = fleet_config(
        &sim.base_url(),
        &redis,
        "[credentials]\nclient_secret = \"wrong-secret\"\n",
    );
    let mut gws = start3(&cfg).await;
    let oauth = async |gw: &Running| {
        get(&format!("{}/status", gw.admin_url())).await.json()["tokens"]["oauth"].clone()
    };
    for gw in &gws {
        let paused = async || paused_at(2)(&oauth(gw).await);
        assert!(eventually(8, paused).await, "{}", oauth(gw).await);
    }
    let old = std::mem::replace(&mut gws[0], start_gateway(cfg.clone()).await);
    old.stop().await;
    let paused = async || paused_at(2)(&oauth(&gws[0]).await);
    assert!(
        eventually(5, paused).await,
        "a restarted replica finds the pause"
    );
    let r = page(&gws[0], &sim, 0).await;
    assert_eq!(
        (r.status, r.error_code()),
        (StatusCode::BAD_GATEWAY, AUTH_FAILED.into())
    );
    assert_eq!(sim.count("oauth_token"), 2, "{}", sim.stats());
    assert_eq!(sim.count_status("oauth_token", 401), 2);
    assert_eq!(sim.count("session_login"), 0);
    assert_eq!(sim.rejected_logins(), 0);
    assert_never_locked(&sim).await;
}
