//! The fleet's shared page cache and purges (SPEC §10): three gateways on real sockets, one real
//! redis-server, the simulator; real time with short windows (a real Redis and a paused clock do
//! not mix), conditions polled with bounded deadlines.

use crate::common::*;
use crate::fleet::{eventually, metric};
use crate::redis::{fleet_config, ready_replicas, RedisServer};
use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use std::sync::Arc;
use std::time::Duration;
use thingspace_gateway::respond::Body;
use thingspace_gateway::runtime::Running;
use thingspace_sim::{SimOptions, Simulator};
use tokio::time::Instant;

/// Upstream budget wide open (the tests count calls, they do not throttle).
const OPEN_BUDGET: &str =
    "[upstream]\nrate_per_second = 1000.0\nburst = 1000\nmax_concurrent = 64\n";

/// Three replicas of one fleet, tokens held.
async fn fleet(sim: &Simulator, redis: &RedisServer, extra: &str) -> Vec<Running> {
    ready_replicas(&fleet_config(&sim.base_url(), redis, extra)).await
}

fn page_url(gw: &Running, account: &str, cursor: u64) -> String {
    format!("{}{}", gw.base_url(), license_path(account, cursor))
}

/// The cursor of the `n`th distinct page of `account` (0 first; then the page after every
/// seventh device).
fn at(sim: &Simulator, account: &str, n: u64) -> u64 {
    match n {
        0 => 0,
        n => sim.imeis(account)[n as usize * 7],
    }
}

/// `extra` merged over [`OPEN_BUDGET`], section by section.
fn with_budget(extra: &str) -> String {
    let mut table: toml::Table = toml::from_str(OPEN_BUDGET).unwrap();
    for (section, values) in toml::from_str::<toml::Table>(extra).unwrap() {
        match (table.get_mut(&section), values) {
            (Some(toml::Value::Table(t)), toml::Value::Table(v)) => t.extend(v),
            (_, v) => {
                table.insert(section, v);
            }
        }
    }
    toml::to_string(&table).unwrap()
}

async fn l1_entries(gw: &Running) -> u64 {
    get(&format!("{}/status", gw.admin_url())).await.json()["cache"]["entries"]
        .as_u64()
        .unwrap()
}

fn age(r: &Resp) -> u64 {
    r.header("age").parse().unwrap()
}

#[tokio::test]
async fn a_page_fetched_by_one_replica_is_served_by_the_others_from_redis() {
    let sim = start_sim(sim_opts()).await;
    let redis = RedisServer::start().await;
    let extra = with_budget("[cache]\nttl = \"30s\"\nnegative_ttl = \"20s\"\n");
    let fleet = fleet(&sim, &redis, &extra).await;
    let (a, b, c) = (&fleet[0], &fleet[1], &fleet[2]);
    let account = sim.account_names()[0].clone();

    let first = get(&page_url(a, &account, at(&sim, &account, 0))).await;
    assert_eq!(
        (first.status, first.header("x-cache")),
        (StatusCode::OK, "MISS")
    );
    // Time passes, so that Age shows where it is counted from.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let again = get(&page_url(a, &account, at(&sim, &account, 0))).await;
    assert_eq!(again.header("x-cache"), "HIT");
    for gw in [b, c] {
        let r = get(&page_url(gw, &account, at(&sim, &account, 0))).await;
        assert_eq!((r.status, r.header("x-cache")), (StatusCode::OK, "HIT"));
        assert_eq!(r.body, first.body, "identical bytes");
        assert_eq!(r.header("etag"), first.header("etag"));
        assert!(age(&r) >= 1, "Age counted from A's fetch: {}", age(&r));
        assert!(age(&r).abs_diff(age(&again)) <= 1);
        assert_eq!(
            metric(
                &gw.admin_url(),
                "thingspace_gateway_cache_lookups_total{result=\"l2_hit\"}"
            )
            .await,
            1.0
        );
        assert_eq!(
            metric(
                &gw.admin_url(),
                "thingspace_gateway_cache_lookups_total{result=\"miss\"}"
            )
            .await,
            0.0
        );
    }
    assert_eq!(sim.count("licenses"), 1, "one upstream call for the fleet");
    // Then from each replica's own L1: conditional requests answer 304 there too.
    let r = get_with(
        &page_url(c, &account, at(&sim, &account, 0)),
        &[("if-none-match", first.header("etag"))],
    )
    .await;
    assert_eq!(r.status, StatusCode::NOT_MODIFIED);

    // Negative answers are shared too, for negative_ttl.
    let unknown = "0000000000-00404";
    let r = get(&page_url(b, unknown, 0)).await;
    assert_eq!(
        (r.status, r.header("x-cache")),
        (StatusCode::BAD_REQUEST, "MISS")
    );
    let r = get(&page_url(c, unknown, 0)).await;
    assert_eq!(
        (r.status, r.header("x-cache")),
        (StatusCode::BAD_REQUEST, "HIT")
    );
    assert_eq!(sim.count("licenses"), 2);

    // Redis expiry: ttl + max(swr 1m, sie 1h) for the 200, negative_ttl for the 400.
    let pttl = |k: String| {
        let redis = &redis;
        async move { redis.cmd::<i64>(&["PTTL", &k]).await }
    };
    let ok = pttl(format!("tsgw:page:p:{account}:0")).await;
    assert!(ok > 3_600_000 && ok <= 3_630_000, "{ok}");
    let negative = pttl(format!("tsgw:page:p:{unknown}:0")).await;
    assert!(negative > 0 && negative <= 20_000, "{negative}");

    // No Redis value carries a token, the client secret or the password.
    let sent = sim.last_headers("licenses");
    let mut secrets: Vec<String> = vec!["demo-secret".into(), "demo-pass".into()];
    for (name, value) in &sent {
        if name == "authorization" {
            secrets.push(value.trim_start_matches("Bearer ").to_string());
        }
        if name == "vz-m2m-token" {
            secrets.push(value.clone());
        }
    }
    assert_eq!(secrets.len(), 4, "{sent:?}");
    let dump = redis.dump().await;
    assert!(!dump.is_empty());
    for (key, value) in &dump {
        for s in &secrets {
            let found = value.windows(s.len()).any(|w| w == s.as_bytes()) || key.contains(s);
            assert!(!found, "a secret in redis key {key}");
        }
    }
}

/// A client request straight into a replica's client API: the replicas are on real sockets, but
/// 300 client sockets at once (and their server ends) would crowd a 1,024-file limit shared with
/// the tests running alongside.
async fn serve(gw: &Running, path: &str) -> Resp {
    let req = Request::builder()
        .method(Method::GET)
        .uri(path)
        .body(Body::new(Bytes::new()))
        .unwrap();
    let resp = gw.gateway.client_api().serve(req).await;
    let (parts, body) = resp.into_parts();
    Resp {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.unwrap().to_bytes(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hundred_concurrent_requests_over_three_replicas_make_one_upstream_call() {
    let sim = start_sim(SimOptions {
        latency: Duration::from_millis(300),
        ..sim_opts()
    })
    .await;
    let redis = RedisServer::start().await;
    let fleet = Arc::new(fleet(&sim, &redis, OPEN_BUDGET).await);
    let account = sim.account_names()[1].clone();
    let path = license_path(&account, at(&sim, &account, 1));
    let tasks: Vec<_> = (0..300)
        .map(|i| {
            let fleet = fleet.clone();
            let path = path.clone();
            tokio::spawn(async move { serve(&fleet[i % 3], &path).await })
        })
        .collect();
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.unwrap());
    }
    assert!(answers.iter().all(|r| r.status == StatusCode::OK));
    assert!(answers.iter().all(|r| r.body == answers[0].body));
    assert!(answers
        .iter()
        .all(|r| r.header("etag") == answers[0].header("etag")));
    assert_eq!(sim.count("licenses"), 1, "one upstream call for the fleet");
    // The misses are those of the replica that fetched; the others answered from Redis.
    let misses: Vec<usize> = (0..3)
        .filter(|&i| {
            answers
                .iter()
                .skip(i)
                .step_by(3)
                .any(|r| r.header("x-cache") == "MISS")
        })
        .collect();
    assert_eq!(misses.len(), 1, "{misses:?}");
    for (i, gw) in fleet.iter().enumerate() {
        let l2 = metric(
            &gw.admin_url(),
            "thingspace_gateway_cache_lookups_total{result=\"l2_hit\"}",
        )
        .await;
        assert_eq!(l2, if misses[0] == i { 0.0 } else { 1.0 }, "replica {i}");
    }
}

#[tokio::test]
async fn a_purge_on_one_replica_reaches_every_replica_within_a_second() {
    let sim = start_sim(sim_opts()).await;
    let redis = RedisServer::start().await;
    let fleet = fleet(&sim, &redis, OPEN_BUDGET).await;
    let account = sim.account_names()[0].clone();
    for gw in &fleet {
        for index in 0..3 {
            assert_eq!(
                get(&page_url(gw, &account, at(&sim, &account, index)))
                    .await
                    .status,
                StatusCode::OK
            );
        }
    }
    assert_eq!(sim.count("licenses"), 3);
    for gw in &fleet {
        assert_eq!(l1_entries(gw).await, 3);
    }

    let r = request(
        Method::DELETE,
        &format!("{}/cache/accounts/{account}", fleet[0].admin_url()),
        &[],
        b"",
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json(), serde_json::json!({"purged": 3}));
    let purged = Instant::now();
    for gw in &fleet[1..] {
        let deadline = purged + Duration::from_secs(1);
        while l1_entries(gw).await != 0 {
            assert!(Instant::now() < deadline, "an L1 still holds the account");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    // The next request on each replica is a MISS (the L2 copy is purged too).
    for (gw, index) in fleet.iter().zip([1, 2, 0]) {
        let r = get(&page_url(gw, &account, at(&sim, &account, index))).await;
        assert_eq!((r.status, r.header("x-cache")), (StatusCode::OK, "MISS"));
    }
    assert_eq!(sim.count("licenses"), 6);

    // DELETE /cache: everything, everywhere.
    let r = request(
        Method::DELETE,
        &format!("{}/cache", fleet[2].admin_url()),
        &[],
        b"",
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    for gw in &fleet {
        assert!(eventually(1, async || l1_entries(gw).await == 0).await);
    }
    let r = get(&page_url(&fleet[1], &account, at(&sim, &account, 0))).await;
    assert_eq!(r.header("x-cache"), "MISS", "the L2 copy is purged");
    assert_eq!(sim.count("licenses"), 7);
}

#[tokio::test]
async fn a_replica_whose_purge_subscription_dropped_empties_its_l1() {
    let sim = start_sim(sim_opts()).await;
    let redis = RedisServer::start().await;
    let fleet = fleet(&sim, &redis, OPEN_BUDGET).await;
    let account = sim.account_names()[0].clone();
    for gw in &fleet {
        assert_eq!(
            get(&page_url(gw, &account, at(&sim, &account, 0)))
                .await
                .status,
            StatusCode::OK
        );
        assert_eq!(l1_entries(gw).await, 1);
    }
    // Drops every subscriber connection (and only those): purges sent meanwhile would be lost.
    let killed: i64 = redis.cmd(&["CLIENT", "KILL", "TYPE", "pubsub"]).await;
    assert_eq!(killed, 3);
    for gw in &fleet {
        assert!(
            eventually(5, async || l1_entries(gw).await == 0).await,
            "L1 not emptied on resubscribe"
        );
    }
    // Resubscribed: a purge reaches every replica again.
    for gw in &fleet {
        assert_eq!(
            get(&page_url(gw, &account, at(&sim, &account, 1)))
                .await
                .status,
            StatusCode::OK
        );
    }
    let r = request(
        Method::DELETE,
        &format!("{}/cache", fleet[0].admin_url()),
        &[],
        b"",
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    for gw in &fleet {
        assert!(eventually(1, async || l1_entries(gw).await == 0).await);
    }
}

/// SIGSTOP keeps the subscription's socket open: only the rejoin tells the replica it may have
/// missed purges.
#[tokio::test]
async fn a_replica_that_rejoins_empties_its_l1() {
    let sim = start_sim(sim_opts()).await;
    let redis = RedisServer::start().await;
    let gw = start_gateway(fleet_config(&sim.base_url(), &redis, OPEN_BUDGET)).await;
    let admin = gw.admin_url();
    let account = sim.account_names()[0].clone();
    assert_eq!(
        get(&page_url(&gw, &account, 0)).await.status,
        StatusCode::OK
    );
    // In Redis (written just after the answer) before Redis stops.
    let key = format!("tsgw:page:p:{account}:0");
    assert!(eventually(2, async || redis.cmd::<i64>(&["EXISTS", &key]).await == 1).await);
    redis.pause();
    assert!(
        eventually(10, async || metric(&admin, "thingspace_gateway_redis_up")
            .await
            == 0.0)
        .await
    );
    // Served from the L1 while Redis is down; a page fetched meanwhile is kept there too.
    let r = get(&page_url(&gw, &account, 0)).await;
    assert_eq!((r.status, r.header("x-cache")), (StatusCode::OK, "HIT"));
    let r = get(&page_url(&gw, &account, at(&sim, &account, 1))).await;
    assert_eq!((r.status, r.header("x-cache")), (StatusCode::OK, "MISS"));
    assert_eq!(l1_entries(&gw).await, 2);
    redis.resume();
    assert!(
        eventually(10, async || metric(&admin, "thingspace_gateway_redis_up")
            .await
            == 1.0)
        .await
    );
    assert!(
        eventually(2, async || l1_entries(&gw).await == 0).await,
        "L1 kept what it cached before it rejoined"
    );
    // Page 0 is still in Redis: a HIT from there, not a new upstream call.
    let r = get(&page_url(&gw, &account, 0)).await;
    assert_eq!((r.status, r.header("x-cache")), (StatusCode::OK, "HIT"));
    assert_eq!(sim.count("licenses"), 2);
}

#[tokio::test]
async fn answers_over_l2_max_entry_bytes_stay_in_the_replica() {
    let sim = start_sim(sim_opts()).await;
    let redis = RedisServer::start().await;
    // Pages of 1000 devices are ~80 KB; subscriptions are small.
    let extra = with_budget("[redis]\nl2_max_entry_bytes = \"16KiB\"\n");
    let fleet = fleet(&sim, &redis, &extra).await;
    let account = sim.account_names()[0].clone();
    let big = get(&page_url(&fleet[0], &account, at(&sim, &account, 0))).await;
    assert!(big.body.len() > 16 * 1024);
    assert_eq!(
        get(&page_url(&fleet[0], &account, at(&sim, &account, 0)))
            .await
            .header("x-cache"),
        "HIT"
    );
    let r = get(&page_url(&fleet[1], &account, at(&sim, &account, 0))).await;
    assert_eq!(r.header("x-cache"), "MISS", "not in Redis: fetched again");
    assert_eq!(sim.count("licenses"), 2);
    let small = format!("/api/fota/v1/subscriptions/{account}");
    let r = get(&format!("{}{small}", fleet[0].base_url())).await;
    assert_eq!(r.header("x-cache"), "MISS");
    assert!(
        eventually(2, async || {
            get(&format!("{}{small}", fleet[2].base_url()))
                .await
                .header("x-cache")
                == "HIT"
        })
        .await
    );
    assert_eq!(sim.count("subscriptions"), 1);
    let keys: Vec<String> = redis.cmd(&["KEYS", "tsgw:page:*"]).await;
    assert_eq!(keys, vec![format!("tsgw:page:s:{account}:0")]);
}

#[tokio::test]
async fn one_replica_revalidates_for_the_fleet() {
    let sim = start_sim(SimOptions {
        latency: Duration::from_millis(200),
        ..sim_opts()
    })
    .await;
    let redis = RedisServer::start().await;
    let extra = with_budget("[cache]\nttl = \"1s\"\nstale_while_revalidate = \"30s\"\n");
    let fleet = Arc::new(fleet(&sim, &redis, &extra).await);
    let account = sim.account_names()[2].clone();
    for gw in fleet.iter() {
        assert_eq!(
            get(&page_url(gw, &account, at(&sim, &account, 0)))
                .await
                .status,
            StatusCode::OK
        );
    }
    assert_eq!(sim.count("licenses"), 1);
    // Until the page is stale (ttl 1 s), then every replica at once.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let tasks: Vec<_> = (0..3)
        .map(|i| {
            let url = page_url(&fleet[i], &account, 0);
            tokio::spawn(async move { get(&url).await })
        })
        .collect();
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!((r.status, r.header("x-cache")), (StatusCode::OK, "STALE"));
    }
    for gw in fleet.iter() {
        assert!(
            eventually(5, async || get(&page_url(
                gw,
                &account,
                at(&sim, &account, 0)
            ))
            .await
            .header("age")
                == "0")
            .await,
            "not refreshed"
        );
    }
    assert_eq!(
        sim.count("licenses"),
        2,
        "one background refresh for the fleet"
    );
}

#[tokio::test]
async fn a_purge_that_cannot_reach_redis_says_so() {
    let sim = start_sim(sim_opts()).await;
    let mut redis = RedisServer::start().await;
    let gw = start_gateway(fleet_config(&sim.base_url(), &redis, OPEN_BUDGET)).await;
    let account = sim.account_names()[0].clone();
    assert_eq!(
        get(&page_url(&gw, &account, at(&sim, &account, 0)))
            .await
            .status,
        StatusCode::OK
    );
    redis.kill();
    let r = request(
        Method::DELETE,
        &format!("{}/cache", gw.admin_url()),
        &[],
        b"",
    )
    .await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.header("retry-after"), "1");
    assert_eq!(r.json()["errorCode"], "GW_REDIS_UNAVAILABLE");
    assert_eq!(
        r.json()["purged"],
        1,
        "this replica's L1 is purged all the same"
    );
    assert_eq!(l1_entries(&gw).await, 0);
}

/// Traffic on every replica while Redis is killed, restarted, then SIGSTOPped: every answer
/// 200, none waiting on Redis longer than `command_timeout` (250 ms here) plus a margin, and
/// the replicas rejoin each time Redis is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_then_stopped_mid_traffic() {
    let sim = start_sim(SimOptions {
        devices: 4000,
        page_size: 100,
        ..sim_opts()
    })
    .await;
    let mut redis = RedisServer::start().await;
    let fleet = Arc::new(fleet(&sim, &redis, OPEN_BUDGET).await);
    let accounts = sim.account_names();
    // Warm: the first ten pages of each account, cached on every replica.
    for gw in fleet.iter() {
        for a in &accounts {
            for index in 0..10 {
                assert_eq!(
                    get(&page_url(gw, a, at(&sim, a, index))).await.status,
                    StatusCode::OK
                );
            }
        }
    }
    let stopped = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let cursors: Vec<Vec<u64>> = accounts
        .iter()
        .map(|a| (0..40).map(|n| at(&sim, a, n)).collect())
        .collect();
    let traffic: Vec<_> = (0..3)
        .map(|i| {
            let (fleet, accounts, stopped) = (fleet.clone(), accounts.clone(), stopped.clone());
            let cursors = cursors.clone();
            tokio::spawn(async move {
                let http = Http::new();
                let mut seen = Vec::new();
                let mut n = 0u64;
                while !stopped.load(std::sync::atomic::Ordering::Relaxed) {
                    let which = (n as usize) % accounts.len();
                    let a = &accounts[which];
                    // Mostly cached keys; every fourth one beyond the warm ones (an L1 miss that
                    // asks Redis first).
                    let index = if n % 4 == 3 {
                        10 + (n / 4) % 20
                    } else {
                        n % 10
                    };
                    let started = Instant::now();
                    let r = http
                        .get(&page_url(&fleet[i], a, cursors[which][index as usize]))
                        .await;
                    seen.push((r.status, started.elapsed()));
                    n += 1;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                seen
            })
        })
        .collect();
    let all_up = async |up: f64| {
        for gw in fleet.iter() {
            let admin = gw.admin_url();
            if !eventually(10, async || {
                metric(&admin, "thingspace_gateway_redis_up").await == up
            })
            .await
            {
                return false;
            }
        }
        true
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    redis.kill();
    assert!(all_up(0.0).await, "redis_up never went to 0");
    tokio::time::sleep(Duration::from_millis(500)).await;
    redis.restart().await;
    assert!(
        all_up(1.0).await,
        "the replicas did not rejoin after the restart"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    redis.pause();
    assert!(all_up(0.0).await, "a hung redis was not noticed");
    tokio::time::sleep(Duration::from_millis(500)).await;
    redis.resume();
    assert!(
        all_up(1.0).await,
        "the replicas did not rejoin after SIGCONT"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    stopped.store(true, std::sync::atomic::Ordering::Relaxed);
    let bound = Duration::from_millis(250) + Duration::from_secs(1);
    let mut total = 0;
    for t in traffic {
        for (status, took) in t.await.unwrap() {
            assert_eq!(status, StatusCode::OK);
            assert!(took <= bound, "a request took {took:?}");
            total += 1;
        }
    }
    assert!(total > 100, "{total} requests");
    // Back in the fleet: pages go to Redis again.
    let r = get(&page_url(
        &fleet[0],
        &accounts[0],
        at(&sim, &accounts[0], 35),
    ))
    .await;
    assert_eq!((r.status, r.header("x-cache")), (StatusCode::OK, "MISS"));
    assert!(
        eventually(2, async || get(&page_url(
            &fleet[1],
            &accounts[0],
            at(&sim, &accounts[0], 35)
        ))
        .await
        .header("x-cache")
            == "HIT")
        .await
    );
}
