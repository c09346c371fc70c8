//! Fleet mode's upstream protection (SPEC §10) with a real redis-server, the simulator and three
//! in-process gateways on real sockets, in real time: one budget for the fleet, a 429 on one
//! replica stopping all of them, one circuit with one probe for the fleet, and each replica's
//! share while Redis is down. Upstream calls and concurrency are counted by the simulator.

use crate::common::*;
use crate::fleet::{eventually, metric};
use crate::redis::{fleet_config, ready_replicas, RedisServer};
use http::StatusCode;
use std::sync::Arc;
use std::time::Duration;
use thingspace_gateway::runtime::Running;
use thingspace_sim::control::FaultRequest;
use thingspace_sim::{SimOptions, Simulator};

const RATE: f64 = 10.0;
const BURST: u32 = 9;
const MAX_CONCURRENT: u64 = 6;
const REPLICAS: u32 = 3;

/// Rate 10/s, burst 9, 6 slots, three replicas at most: each replica's share while Redis is
/// down is 10/3 per second, a burst of 3 and 2 slots. `upstream` adds keys to `[upstream]`.
fn budget_toml(upstream: &str) -> String {
    format!(
        "[upstream]\nrate_per_second = {RATE:?}\nburst = {BURST}\nmax_concurrent = \
         {MAX_CONCURRENT}\nmax_queue_wait = \"500ms\"\nretries = 0\n{upstream}[redis]\n\
         max_replicas = {REPLICAS}\n"
    )
}

async fn three_replicas(sim: &Simulator, redis: &RedisServer, extra: &str) -> Vec<Running> {
    ready_replicas(&fleet_config(&sim.base_url(), redis, &budget_toml(extra))).await
}

/// Every upstream call the simulator saw, any endpoint and status.
fn sim_calls(sim: &Simulator) -> u64 {
    ["oauth_token", "session_login", "licenses"]
        .iter()
        .map(|e| sim.count(e))
        .sum()
}

/// Answers of status 429 the simulator gave, any endpoint.
fn sim_429s(sim: &Simulator) -> u64 {
    ["oauth_token", "session_login", "licenses"]
        .iter()
        .map(|e| sim.count_status(e, 429))
        .sum()
}

/// The sum of every series of `name` (0 when none is there yet).
async fn metric_sum(admin_url: &str, name: &str) -> f64 {
    let body = get(&format!("{admin_url}/metrics")).await.body;
    String::from_utf8_lossy(&body)
        .lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn throttled(gw: &Running, reason: &str) -> f64 {
    metric(
        &gw.admin_url(),
        &format!("thingspace_gateway_upstream_throttled_total{{reason=\"{reason}\"}}"),
    )
    .await
}

async fn upstream_calls(gw: &Running) -> f64 {
    metric_sum(
        &gw.admin_url(),
        "thingspace_gateway_upstream_requests_total",
    )
    .await
}

/// Distinct cold keys: (account, IMEI) pairs, never the same twice.
struct Keys {
    all: Vec<(String, u64)>,
    next: usize,
}

impl Keys {
    fn new(sim: &Simulator) -> Keys {
        let mut all = Vec::new();
        for a in sim.account_names() {
            for i in sim.imeis(&a) {
                all.push((a.clone(), i));
            }
        }
        Keys { all, next: 0 }
    }

    fn url(&mut self, gw: &Running) -> String {
        let (a, i) = &self.all[self.next];
        self.next += 1;
        format!("{}{}", gw.base_url(), license_path(a, *i))
    }
}

/// Ten times the fleet's rate of requests for distinct cold keys, spread over `replicas` in
/// turn, for `secs` seconds; returns every answer's status and error code.
async fn overload(replicas: &[Running], keys: &mut Keys, secs: f64) -> Vec<(StatusCode, String)> {
    let http = Arc::new(Http::new());
    let per_second = RATE * 10.0;
    let n = (per_second * secs) as usize;
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / per_second));
    let mut tasks = Vec::new();
    for i in 0..n {
        tick.tick().await;
        let url = keys.url(&replicas[i % replicas.len()]);
        let http = http.clone();
        tasks.push(tokio::spawn(async move {
            let r = http.get(&url).await;
            let code = if r.status == StatusCode::OK {
                String::new()
            } else {
                r.error_code()
            };
            (r.status, code)
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

fn count(answers: &[(StatusCode, String)], status: StatusCode) -> usize {
    answers.iter().filter(|(s, _)| *s == status).count()
}

/// SPEC §10: three replicas under ten times the rate of cold keys make at most
/// `burst + rate × seconds` upstream calls and never more than `max_concurrent` at once, and
/// the simulator's own limiter at the same rate never answers 429.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_under_overload_share_one_budget() {
    let sim = start_sim(SimOptions {
        latency: Duration::from_millis(200),
        rate: Some(RATE),
        // The same rate; three tokens of slack for the network's jitter between a grant on
        // Redis's clock and the arrival at the simulator.
        burst: Some(BURST + 3),
        ..sim_opts()
    })
    .await;
    let redis = RedisServer::start().await;
    let started = std::time::Instant::now();
    let replicas = three_replicas(&sim, &redis, "").await;
    let mut keys = Keys::new(&sim);
    let answers = overload(&replicas, &mut keys, 3.0).await;
    let seconds = started.elapsed().as_secs_f64();

    let calls = sim_calls(&sim);
    let bound = f64::from(BURST) + RATE * seconds;
    assert!(
        calls as f64 <= bound,
        "{calls} upstream calls in {seconds:.2} s, over {bound:.1}"
    );
    assert!(
        sim.max_concurrency() <= MAX_CONCURRENT,
        "{}",
        sim.max_concurrency()
    );
    assert_eq!(sim_429s(&sim), 0, "{}", sim.stats());
    // The budget was the limit: at least half of it was used, the rest of the clients were
    // told to retry, and each refusal is counted by reason on the replica that answered it.
    let ok = count(&answers, StatusCode::OK);
    let refused = count(&answers, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(ok + refused, answers.len(), "{answers:?}");
    assert!(ok as f64 >= RATE * 3.0 / 2.0, "only {ok} answered");
    assert!(answers
        .iter()
        .filter(|(s, _)| *s == StatusCode::SERVICE_UNAVAILABLE)
        .all(|(_, code)| code == "GW_UPSTREAM_UNAVAILABLE"));
    let mut budget = 0.0;
    for gw in &replicas {
        budget += throttled(gw, "budget").await;
        assert_eq!(throttled(gw, "upstream_429").await, 0.0);
        assert_eq!(throttled(gw, "circuit_open").await, 0.0);
        let status = get(&format!("{}/status", gw.admin_url())).await.json();
        assert_eq!(
            status["upstream"]["budget"],
            serde_json::json!({"rate_per_second": RATE, "burst": BURST,
                "max_concurrent": MAX_CONCURRENT, "scope": "fleet"})
        );
    }
    assert_eq!(budget as usize, refused);
    let leases: u64 = redis.cmd(&["ZCARD", "tsgw:budget:leases"]).await;
    assert!(leases <= MAX_CONCURRENT);
}

/// SPEC §10: a 429 seen by one replica stops every replica until its `Retry-After`: while
/// Redis's cooldown has time left, no replica calls the upstream; then they all do again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_on_one_replica_stops_every_replica_until_its_retry_after() {
    let sim = start_sim(sim_opts()).await;
    let redis = RedisServer::start().await;
    let replicas = three_replicas(&sim, &redis, "").await;
    let mut keys = Keys::new(&sim);
    sim.apply(FaultRequest {
        retry_after: Some("2".into()),
        ..FaultRequest::status("licenses", 1, 429)
    })
    .unwrap();
    let r = get(&keys.url(&replicas[0])).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.error_code(), "GW_UPSTREAM_UNAVAILABLE");
    assert_eq!(r.header("retry-after"), "2");
    // Stored before the client was answered.
    let left: i64 = redis.cmd(&["PTTL", "tsgw:cooldown"]).await;
    assert!(left > 0 && left <= 2000, "{left}");
    assert_eq!(sim.count("licenses"), 1);

    // The others learn it on their next call, which it refuses.
    for gw in &replicas[1..] {
        let r = get(&keys.url(gw)).await;
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.error_code(), "GW_UPSTREAM_UNAVAILABLE");
        let after: u64 = r.header("retry-after").parse().unwrap();
        assert!((1..=2).contains(&after), "{after}");
        assert_eq!(throttled(gw, "upstream_429").await, 1.0);
        assert_eq!(throttled(gw, "budget").await, 0.0);
    }
    assert_eq!(throttled(&replicas[0], "upstream_429").await, 1.0);
    assert_eq!(sim.count("licenses"), 1, "no call during the cooldown");

    // Until Redis's cooldown ends, every replica refuses; after, every replica serves.
    let mut served = [false; 3];
    let mut refused_while_running = 0;
    let done = eventually(8, async || {
        for (i, gw) in replicas.iter().enumerate() {
            if served[i] {
                continue;
            }
            let left: i64 = redis.cmd(&["PTTL", "tsgw:cooldown"]).await;
            let before = sim.count("licenses");
            let r = get(&keys.url(gw)).await;
            if left > 100 {
                assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{left} ms left");
                assert_eq!(sim.count("licenses"), before, "a call with {left} ms left");
                refused_while_running += 1;
            } else if r.status == StatusCode::OK {
                served[i] = true;
            }
        }
        served.iter().all(|s| *s)
    })
    .await;
    assert!(done, "the replicas did not serve again after the cooldown");
    assert!(refused_while_running > 0);
    assert_eq!(sim.count_status("licenses", 429), 1);
}

/// SPEC §10: failures on one replica open the circuit for all; when it half-opens, ONE probe
/// in the whole fleet goes through, and its success closes the circuit for every replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_circuit_opens_for_the_fleet_and_one_probe_closes_it() {
    let sim = start_sim(sim_opts()).await;
    let redis = RedisServer::start().await;
    let extra = "circuit_failures = 3\ncircuit_open_for = \"1s\"\n";
    let replicas = three_replicas(&sim, &redis, extra).await;
    let mut keys = Keys::new(&sim);
    sim.apply(FaultRequest::status("licenses", 3, 503)).unwrap();
    for _ in 0..3 {
        let r = get(&keys.url(&replicas[0])).await;
        assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    }
    assert_eq!(sim.count("licenses"), 3);
    let open: Option<String> = redis
        .cmd(&["HGET", "tsgw:circuit:state", "open_until"])
        .await;
    assert!(open.is_some(), "the fleet's circuit is open");
    for gw in &replicas {
        let r = get(&keys.url(gw)).await;
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.error_code(), "GW_UPSTREAM_UNAVAILABLE");
        assert_eq!(throttled(gw, "circuit_open").await, 1.0);
        let status = get(&format!("{}/status", gw.admin_url())).await.json();
        assert_eq!(status["upstream"]["circuit"], "open");
    }
    assert_eq!(sim.count("licenses"), 3, "no call while open");

    // Half-open: fifteen requests at once over the three replicas; the probe is slow, so all
    // the others arrive while it is in flight.
    sim.apply(FaultRequest {
        latency: Some("500ms".into()),
        ..FaultRequest::default()
    })
    .unwrap();
    assert!(
        eventually(5, async || {
            get(&format!("{}/status", replicas[2].admin_url()))
                .await
                .json()["upstream"]["circuit"]
                == "half_open"
        })
        .await
    );
    let http = Arc::new(Http::new());
    let tasks: Vec<_> = (0..15)
        .map(|i| {
            let url = keys.url(&replicas[i % 3]);
            let http = http.clone();
            tokio::spawn(async move { http.get(&url).await })
        })
        .collect();
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.unwrap());
    }
    let ok = answers
        .iter()
        .filter(|r| r.status == StatusCode::OK)
        .count();
    assert_eq!(ok, 1, "one probe for the fleet");
    for r in answers.iter().filter(|r| r.status != StatusCode::OK) {
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.error_code(), "GW_UPSTREAM_UNAVAILABLE");
    }
    assert_eq!(sim.count("licenses"), 4);
    let circuit_open: f64 = {
        let mut n = 0.0;
        for gw in &replicas {
            n += throttled(gw, "circuit_open").await;
        }
        n
    };
    assert_eq!(circuit_open, 3.0 + 14.0);

    // Closed for everyone: each replica serves its next request.
    sim.apply(FaultRequest {
        latency: Some("0ms".into()),
        ..FaultRequest::default()
    })
    .unwrap();
    for gw in &replicas {
        let r = get(&keys.url(gw)).await;
        assert_eq!(r.status, StatusCode::OK);
        let status = get(&format!("{}/status", gw.admin_url())).await.json();
        assert_eq!(status["upstream"]["circuit"], "closed");
    }
    let open: Option<String> = redis
        .cmd(&["HGET", "tsgw:circuit:state", "open_until"])
        .await;
    assert_eq!(open, None);
}

/// SPEC §10: Redis killed mid-overload → each replica falls back to its share (a third of the
/// rate, from an empty bucket), so the fleet stays within one gateway's budget; when Redis is
/// back, they use the fleet's budget again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_killed_each_replica_keeps_to_its_share() {
    outage_mid_overload(Outage::Kill).await;
}

/// The same with a hung Redis (SIGSTOP): each command gives up at `command_timeout`, and the
/// replicas serve on their shares.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_hung_each_replica_keeps_to_its_share() {
    outage_mid_overload(Outage::Pause).await;
}

#[derive(Clone, Copy, PartialEq)]
enum Outage {
    Kill,
    Pause,
}

async fn outage_mid_overload(outage: Outage) {
    let sim = start_sim(SimOptions {
        latency: Duration::from_millis(20),
        ..sim_opts()
    })
    .await;
    let mut redis = RedisServer::start().await;
    let started = std::time::Instant::now();
    let replicas = three_replicas(&sim, &redis, "").await;
    let mut keys = Keys::new(&sim);
    let before = overload(&replicas, &mut keys, 1.0).await;
    assert!(count(&before, StatusCode::OK) > 0);

    let mut at_kill = Vec::new();
    for gw in &replicas {
        at_kill.push(upstream_calls(gw).await);
    }
    match outage {
        Outage::Kill => redis.kill(),
        Outage::Pause => redis.pause(),
    }
    let killed = std::time::Instant::now();
    let during = overload(&replicas, &mut keys, 3.0).await;
    let after_kill = killed.elapsed().as_secs_f64();
    let seconds = started.elapsed().as_secs_f64();

    let share = RATE / f64::from(REPLICAS);
    for (gw, at) in replicas.iter().zip(&at_kill) {
        let calls = upstream_calls(gw).await - at;
        // From an empty bucket: a token every 0.3 s; plus a call or two already granted by the
        // fleet when Redis died.
        let bound = (share * after_kill).floor() + 2.0;
        assert!(
            calls <= bound,
            "{calls} calls in {after_kill:.2} s without Redis, over {bound}"
        );
        let status = get(&format!("{}/status", gw.admin_url())).await.json();
        assert_eq!(status["redis"]["connected"], false);
        assert_eq!(
            status["upstream"]["budget"],
            serde_json::json!({"rate_per_second": share, "burst": BURST / REPLICAS,
                "max_concurrent": MAX_CONCURRENT / u64::from(REPLICAS),
                "scope": "replica_share"})
        );
    }
    let total = sim_calls(&sim);
    let bound = f64::from(BURST) + RATE * seconds;
    assert!(
        total as f64 <= bound,
        "{total} calls in {seconds:.2} s, over {bound:.1}"
    );
    assert!(sim.max_concurrency() <= MAX_CONCURRENT);
    assert!(count(&during, StatusCode::OK) > 0, "served on the share");
    assert!(during
        .iter()
        .all(|(s, _)| *s == StatusCode::OK || *s == StatusCode::SERVICE_UNAVAILABLE));

    // Back: the fleet's budget, and its numbers, again.
    match outage {
        Outage::Kill => redis.restart().await,
        Outage::Pause => redis.resume(),
    }
    for gw in &replicas {
        let admin = gw.admin_url();
        assert!(
            eventually(10, async || metric(&admin, "thingspace_gateway_redis_up")
                .await
                == 1.0)
            .await
        );
        let r = get(&keys.url(gw)).await;
        assert_eq!(r.status, StatusCode::OK);
        let status = get(&format!("{admin}/status")).await.json();
        assert_eq!(status["upstream"]["budget"]["scope"], "fleet");
        assert_eq!(status["upstream"]["budget"]["rate_per_second"], RATE);
    }
}

/// SPEC §10: the parameters in force are those of the replica that last applied its config,
/// stored in Redis; the others take them on their next call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_config_applied_is_the_fleets_budget() {
    let sim = start_sim(sim_opts()).await;
    let redis = RedisServer::start().await;
    let replicas = three_replicas(&sim, &redis, "").await;
    let mut keys = Keys::new(&sim);
    let rate: String = redis.cmd(&["HGET", "tsgw:budget:params", "rate"]).await;
    assert_eq!(rate, "10");
    // A reload on the third replica.
    let changed = fleet_config(
        &sim.base_url(),
        &redis,
        &budget_toml("").replace("rate_per_second = 10.0", "rate_per_second = 7.5"),
    );
    replicas[2].gateway.upstream().apply(&changed.upstream);
    assert!(
        eventually(5, async || {
            redis
                .cmd::<String>(&["HGET", "tsgw:budget:params", "rate"])
                .await
                == "7.5"
        })
        .await
    );
    let r = get(&keys.url(&replicas[0])).await;
    assert_eq!(r.status, StatusCode::OK);
    let status = get(&format!("{}/status", replicas[0].admin_url()))
        .await
        .json();
    assert_eq!(status["upstream"]["budget"]["rate_per_second"], 7.5);
    assert_eq!(status["upstream"]["budget"]["scope"], "fleet");
}

/// SPEC §10: a replica that dies mid-call frees its slot within `upstream.timeout` (plus the
/// Redis round trips around the attempt): each lease is scored by its expiry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_replicas_slots_free_themselves() {
    let sim = start_sim(sim_opts()).await;
    let redis = RedisServer::start().await;
    let replicas = three_replicas(&sim, &redis, "timeout = \"1s\"\n").await;
    let mut keys = Keys::new(&sim);
    let leases = async || redis.cmd::<u64>(&["ZCARD", "tsgw:budget:leases"]).await;
    // A live call's lease expires no later than the timeout plus two command timeouts.
    sim.apply(FaultRequest {
        latency: Some("600ms".into()),
        ..FaultRequest::default()
    })
    .unwrap();
    let url = keys.url(&replicas[0]);
    let call = tokio::spawn(async move { get(&url).await.status });
    assert!(eventually(5, async || leases().await == 1).await);
    let lease: Vec<String> = redis
        .cmd(&["ZRANGE", "tsgw:budget:leases", "0", "-1", "WITHSCORES"])
        .await;
    let time: Vec<String> = redis.cmd(&["TIME"]).await;
    let now_ms = time[0].parse::<i64>().unwrap() * 1000 + time[1].parse::<i64>().unwrap() / 1000;
    let left = lease[1].parse::<i64>().unwrap() - now_ms;
    assert!(left > 0 && left <= 1000 + 2 * 250, "{left} ms");
    assert_eq!(call.await.unwrap(), StatusCode::OK);
    assert!(
        eventually(5, async || leases().await == 0).await,
        "released"
    );
    sim.apply(FaultRequest {
        latency: Some("0ms".into()),
        ..FaultRequest::default()
    })
    .unwrap();

    // A replica that died holding every slot: its leases, never released, expire.
    let until = (now_ms + 1500).to_string();
    for i in 0..MAX_CONCURRENT {
        let member = format!("dead-replica-{i}");
        let _: u64 = redis
            .cmd(&["ZADD", "tsgw:budget:leases", &until, &member])
            .await;
    }
    let before = sim.count("licenses");
    let r = get(&keys.url(&replicas[1])).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.error_code(), "GW_UPSTREAM_UNAVAILABLE");
    assert_eq!(throttled(&replicas[1], "budget").await, 1.0);
    assert_eq!(sim.count("licenses"), before);
    assert!(
        eventually(5, async || get(&keys.url(&replicas[1])).await.status
            == StatusCode::OK)
        .await,
        "the dead replica's slots never came back"
    );
}

/// SPEC §10: while Redis is down a replica keeps its own cooldown; when Redis is back it writes
/// it, so the others stop too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cooldown_seen_while_redis_was_down_reaches_the_fleet_when_it_is_back() {
    let sim = start_sim(sim_opts()).await;
    let mut redis = RedisServer::start().await;
    let replicas = three_replicas(&sim, &redis, "").await;
    let mut keys = Keys::new(&sim);
    redis.kill();
    for gw in &replicas {
        let admin = gw.admin_url();
        assert!(
            eventually(5, async || metric(&admin, "thingspace_gateway_redis_up")
                .await
                == 0.0)
            .await
        );
    }
    sim.apply(FaultRequest {
        retry_after: Some("5".into()),
        ..FaultRequest::status("licenses", 1, 429)
    })
    .unwrap();
    let r = get(&keys.url(&replicas[0])).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(sim.count_status("licenses", 429), 1);
    // Its own cooldown: refused without a call.
    let calls = sim.count("licenses");
    let r = get(&keys.url(&replicas[0])).await;
    assert_eq!(r.error_code(), "GW_UPSTREAM_UNAVAILABLE");
    assert_eq!(throttled(&replicas[0], "upstream_429").await, 2.0);
    assert_eq!(sim.count("licenses"), calls);

    redis.restart().await;
    assert!(
        eventually(5, async || redis
            .cmd::<i64>(&["PTTL", "tsgw:cooldown"])
            .await
            > 0)
        .await,
        "the cooldown was not written when Redis came back"
    );
    for gw in &replicas[1..] {
        let admin = gw.admin_url();
        assert!(
            eventually(5, async || metric(&admin, "thingspace_gateway_redis_up")
                .await
                == 1.0)
            .await
        );
        let r = get(&keys.url(gw)).await;
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.error_code(), "GW_UPSTREAM_UNAVAILABLE");
        assert_eq!(throttled(gw, "upstream_429").await, 1.0);
    }
    assert_eq!(sim.count("licenses"), calls);
}
