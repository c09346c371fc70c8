//! Fleet mode's link to Redis (SPEC §10): config, `/status`, `redis_up`, a Redis that dies and
//! comes back. The shared pieces have their own `fleet_*` modules.

use crate::common::*;
use crate::redis::{fleet_config, fleet_config_text, RedisServer};
use http::StatusCode;
use std::time::Duration;
use thingspace_gateway::config;

/// Polls `cond` every 20 ms for up to `secs` seconds (real time: Redis is a real process).
pub async fn eventually(secs: u64, mut cond: impl AsyncFnMut() -> bool) -> bool {
    for _ in 0..secs * 50 {
        if cond().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// The value of one metric series on the admin listener.
pub async fn metric(admin_url: &str, series: &str) -> f64 {
    let body = get(&format!("{admin_url}/metrics")).await.body;
    let text = String::from_utf8_lossy(&body);
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no series {series}"))
        .parse()
        .unwrap()
}

#[tokio::test]
async fn without_redis_nothing_changes_and_status_says_so() {
    let sim = start_sim(sim_opts()).await;
    let gw = start_gateway(config(&sim.base_url(), "")).await;
    let status = get(&format!("{}/status", gw.admin_url())).await.json();
    assert_eq!(
        status["redis"],
        serde_json::json!({"configured": false, "connected": false, "degraded_since": null})
    );
    assert_eq!(
        metric(&gw.admin_url(), "thingspace_gateway_redis_up").await,
        0.0
    );
    assert!(gw.gateway.redis().is_none());
}

#[tokio::test]
async fn a_replica_follows_redis_down_and_back_without_a_restart() {
    let sim = start_sim(sim_opts()).await;
    let mut redis = RedisServer::start().await;
    let gw = start_gateway(fleet_config(&sim.base_url(), &redis, "")).await;
    // Tokens held before Redis dies (in fleet mode no session login is made while it is down).
    wait_ready(&gw).await;
    let admin = gw.admin_url();
    let status = get(&format!("{admin}/status")).await.json();
    assert_eq!(
        status["redis"],
        serde_json::json!({"configured": true, "connected": true, "degraded_since": null})
    );
    assert_eq!(metric(&admin, "thingspace_gateway_redis_up").await, 1.0);
    // Ready first (a fleet's first login waits for the guard's grace): no login while down.
    let ready = async || get(&format!("{admin}/readyz")).await.status == StatusCode::OK;
    assert!(eventually(10, ready).await, "never ready");

    redis.kill();
    assert!(
        eventually(10, async || metric(&admin, "thingspace_gateway_redis_up")
            .await
            == 0.0)
        .await,
        "redis_up never went to 0"
    );
    let status = get(&format!("{admin}/status")).await.json();
    assert_eq!(status["redis"]["connected"], false);
    assert!(status["redis"]["degraded_since"].is_string(), "{status}");
    // Still ready: a replica serves without Redis.
    assert_eq!(get(&format!("{admin}/readyz")).await.status, StatusCode::OK);

    redis.restart().await;
    assert!(
        eventually(10, async || metric(&admin, "thingspace_gateway_redis_up")
            .await
            == 1.0)
        .await,
        "the replica did not rejoin"
    );
    let status = get(&format!("{admin}/status")).await.json();
    assert_eq!(status["redis"]["degraded_since"], serde_json::Value::Null);
}

#[tokio::test]
async fn a_replica_that_starts_without_redis_serves_and_joins_later() {
    let sim = start_sim(sim_opts()).await;
    let mut redis = RedisServer::start().await;
    redis.kill();
    let gw = start_gateway(fleet_config(&sim.base_url(), &redis, "")).await;
    let admin = gw.admin_url();
    assert_eq!(metric(&admin, "thingspace_gateway_redis_up").await, 0.0);
    assert_eq!(
        get(&format!("{admin}/healthz")).await.status,
        StatusCode::OK
    );
    redis.restart().await;
    assert!(
        eventually(10, async || metric(&admin, "thingspace_gateway_redis_up")
            .await
            == 1.0)
        .await,
        "never joined"
    );
}

#[test]
fn fleet_config_is_checked_and_the_url_masked() {
    let text = |extra: &str| {
        crate::common::config_text(
            "http://127.0.0.1:1",
            &format!("[redis]\nurl = \"redis://user:Hunter2secret@127.0.0.1:6399/0\"\n{extra}"),
        )
    };
    // Fleet mode needs the shared signing key.
    let e = config::from_toml_with_env(&text(""), &[]).unwrap_err();
    assert!(e.0.starts_with("clients.token_signing_key:"), "{e}");
    assert!(!e.0.contains("Hunter2"), "{e}");
    let key = "[clients]\ntoken_signing_key = \"fleet-test-signing-key-0123456789abcdef\"\n";
    let cfg = config::from_toml_with_env(&text(key), &[]).unwrap();
    let shown = cfg.to_masked_toml();
    assert!(shown.contains("url = \"MASKED\""), "{shown}");
    assert!(!shown.contains("Hunter2"), "{shown}");
    assert!(!format!("{cfg:?}").contains("Hunter2"));
    // Burst and concurrency must cover a share per replica while Redis is down.
    let e = config::from_toml_with_env(&text(&format!("{key}[upstream]\nburst = 3\n")), &[])
        .unwrap_err();
    assert!(e.0.starts_with("upstream.burst:"), "{e}");
    let e = config::from_toml_with_env(
        &crate::common::config_text(
            "http://127.0.0.1:1",
            &format!("{key}[redis]\nurl = \"http://127.0.0.1:6379\"\n"),
        ),
        &[],
    )
    .unwrap_err();
    assert!(e.0.starts_with("redis.url:"), "{e}");
    // The deploy kit's placeholder password is refused, not run degraded.
    let e = config::from_toml_with_env(
        &crate::common::config_text(
            "http://127.0.0.1:1",
            &format!("{key}[redis]\nurl = \"redis://:REPLACE-ME-redis-password@redis:6379/0\"\n"),
        ),
        &[],
    )
    .unwrap_err();
    assert_eq!(
        e.0,
        "redis.url: still the example's placeholder; set the real value"
    );
    // The environment and url_file set it too; the environment wins.
    let dir = std::env::temp_dir().join(format!("tsgw-redis-url-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("url");
    std::fs::write(&file, "redis://127.0.0.1:6390/2\n").unwrap();
    let with_file = crate::common::config_text(
        "http://127.0.0.1:1",
        &format!("{key}[redis]\nurl_file = \"{}\"\n", file.display()),
    );
    let cfg = config::from_toml_with_env(&with_file, &[]).unwrap();
    assert_eq!(cfg.redis.url.expose(), "redis://127.0.0.1:6390/2");
    let env = vec![(
        "THINGSPACE_GATEWAY_REDIS__URL".to_string(),
        "redis://127.0.0.1:6391/3".to_string(),
    )];
    let cfg = config::from_toml_with_env(&with_file, &env).unwrap();
    assert_eq!(cfg.redis.url.expose(), "redis://127.0.0.1:6391/3");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn redis_keys_are_refused_by_a_reload() {
    let sim = start_sim(sim_opts()).await;
    let redis = RedisServer::start().await;
    let dir = std::env::temp_dir().join(format!("tsgw-fleet-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("gateway.toml");
    std::fs::write(&path, fleet_config_text(&sim.base_url(), &redis, "")).unwrap();
    let gw = thingspace_gateway::runtime::Gateway::from_source(Some(path.clone())).unwrap();
    std::fs::write(
        &path,
        fleet_config_text(
            &sim.base_url(),
            &redis,
            "[redis]\nkey_prefix = \"other:\"\n",
        ),
    )
    .unwrap();
    let report = gw.reload().await;
    let report = serde_json::to_value(&report).unwrap();
    assert_eq!(report["outcome"], "applied", "{report}");
    assert_eq!(
        report["refused_keys"],
        serde_json::json!(["redis.key_prefix"])
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
