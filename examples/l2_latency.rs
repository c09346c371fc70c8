//! What an L2 hit costs over an L1 hit (SPEC §9: ≤ 0.5 ms p50 for ~80 KB pages over loopback).
//!
//! Starts a `redis-server` on a free port, the simulator (3 accounts of 20,000 devices, pages of
//! 1,000: ~80 KB), and two gateways of one fleet, A and B, each on one worker thread. A fetches
//! distinct pages (so they are in Redis); then, in interleaved rounds, a client on its own thread
//! asks B for each page twice over one keep-alive connection: the first request is an L2 hit (B's
//! L1 has never seen the page), the second an L1 hit. Prints p50/p90/p99 of both and the
//! difference of the medians of the per-round p50s.
//!
//! Usage: `cargo run --release --example l2_latency [ROUNDS] [PAGES_PER_ROUND]` (defaults 5,
//! 400); `redis-server` must be on the PATH.

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use thingspace_gateway::runtime::Running;
use thingspace_sim::{SimOptions, Simulator};

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn runtime(threads: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()?)
}

fn config(sim: &str, redis_port: u16) -> anyhow::Result<thingspace_gateway::config::Config> {
    let text = format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
[upstream]
base_url = "{sim}"
rate_per_second = 100000.0
burst = 100000
max_concurrent = 64
[credentials]
client_id = "demo-key"
client_secret = "demo-secret"
username = "demo-user"
password = "demo-pass"
guard_file = ""
[cache]
max_bytes = "1GiB"
ttl = "1h"
[clients]
mode = "none"
token_signing_key = "l2-latency-signing-key-0123456789abcdef"
[log]
level = "warn"
[redis]
url = "redis://127.0.0.1:{redis_port}/0"
command_timeout = "250ms"
"#
    );
    thingspace_gateway::config::from_toml_with_env(&text, &[]).map_err(|e| anyhow::anyhow!("{e}"))
}

/// One connection, requests one after another; each request's time until its whole body.
struct Client {
    send: hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
}

impl Client {
    async fn connect(addr: std::net::SocketAddr) -> anyhow::Result<Client> {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        Ok(Client { send })
    }

    async fn get(&mut self, path: &str) -> anyhow::Result<(Duration, String)> {
        let req = Request::get(path)
            .header("host", "gateway")
            .body(Empty::new())?;
        let started = Instant::now();
        let resp = self.send.send_request(req).await?;
        let status = resp.status();
        let cache = resp
            .headers()
            .get("x-cache")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let body = resp.into_body().collect().await?.to_bytes();
        let took = started.elapsed();
        anyhow::ensure!(status == StatusCode::OK, "{path}: {status}");
        anyhow::ensure!(
            body.len() > 60_000,
            "{path}: a small page ({} bytes)",
            body.len()
        );
        Ok((took, cache))
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn main() -> anyhow::Result<()> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse())
        .collect::<Result<_, _>>()?;
    let rounds = args.first().copied().unwrap_or(5);
    let per_round = args.get(1).copied().unwrap_or(400);

    let redis_port = free_port()?;
    let dir = std::env::temp_dir().join(format!("tsgw-l2-latency-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut redis = Command::new("redis-server")
        .args(["--port", &redis_port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .args(["--maxmemory-policy", "noeviction"])
        .arg("--dir")
        .arg(&dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let result = run(redis_port, rounds, per_round);
    let _ = redis.kill();
    let _ = redis.wait();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn run(redis_port: u16, rounds: usize, per_round: usize) -> anyhow::Result<()> {
    let sim_rt = runtime(1)?;
    let sim = sim_rt.block_on(Simulator::start(SimOptions {
        listen: ([127, 0, 0, 1], 0).into(),
        accounts: 3,
        devices: 20_000,
        ..SimOptions::default()
    }))?;
    // Cursors whose pages are full (1,000 devices after them): distinct ~80 KB pages.
    let mut paths = Vec::new();
    for account in sim.account_names() {
        let imeis = sim.imeis(&account);
        for i in (0..imeis.len() - 1000).step_by(7) {
            paths.push(format!(
                "/api/fota/v1/licenses/{account}/index/{}",
                imeis[i]
            ));
        }
    }
    anyhow::ensure!(
        paths.len() >= rounds * per_round,
        "not enough distinct pages"
    );
    fastrand::shuffle(&mut paths);
    paths.truncate(rounds * per_round);

    let (a_rt, b_rt) = (runtime(1)?, runtime(1)?);
    // Wait for redis-server to listen.
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::net::TcpStream::connect(("127.0.0.1", redis_port)).is_err() {
        anyhow::ensure!(Instant::now() < deadline, "redis-server did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
    let a = a_rt.block_on(Running::start(config(&sim.base_url(), redis_port)?))?;
    let b = b_rt.block_on(Running::start(config(&sim.base_url(), redis_port)?))?;
    let client_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    client_rt.block_on(async {
        // Into Redis through A (a few at a time).
        let mut warmers = Vec::new();
        for chunk in paths.chunks(paths.len().div_ceil(8)) {
            let mut c = Client::connect(a.addr).await?;
            let chunk = chunk.to_vec();
            warmers.push(tokio::spawn(async move {
                for p in chunk {
                    c.get(&p).await?;
                }
                anyhow::Ok(())
            }));
        }
        for w in warmers {
            w.await??;
        }
        // A's writes to Redis run after its answers: give the last ones a moment.
        tokio::time::sleep(Duration::from_millis(200)).await;

        let mut client = Client::connect(b.addr).await?;
        // Warm B's connection and token path on a page left out of the rounds.
        client.get(&paths[0]).await?;
        let (mut l1_all, mut l2_all) = (Vec::new(), Vec::new());
        let (mut l1_p50s, mut l2_p50s) = (Vec::new(), Vec::new());
        for (round, chunk) in paths.chunks(per_round).enumerate() {
            let (mut l1, mut l2) = (Vec::new(), Vec::new());
            for p in chunk.iter().skip(usize::from(round == 0)) {
                let (took, cache) = client.get(p).await?;
                anyhow::ensure!(cache == "HIT", "not an L2 hit: {cache}");
                l2.push(took);
                let (took, cache) = client.get(p).await?;
                anyhow::ensure!(cache == "HIT", "not an L1 hit: {cache}");
                l1.push(took);
            }
            l1.sort();
            l2.sort();
            l1_p50s.push(percentile(&l1, 0.5));
            l2_p50s.push(percentile(&l2, 0.5));
            println!(
                "round {round}: L1 hit p50 {:.0} µs, L2 hit p50 {:.0} µs",
                micros(percentile(&l1, 0.5)),
                micros(percentile(&l2, 0.5))
            );
            l1_all.extend(l1);
            l2_all.extend(l2);
        }
        l1_all.sort();
        l2_all.sort();
        l1_p50s.sort();
        l2_p50s.sort();
        for (name, all) in [("L1 hit", &l1_all), ("L2 hit", &l2_all)] {
            println!(
                "{name}: n {} p50 {:.0} µs p90 {:.0} µs p99 {:.0} µs",
                all.len(),
                micros(percentile(all, 0.5)),
                micros(percentile(all, 0.9)),
                micros(percentile(all, 0.99))
            );
        }
        let (l1, l2) = (percentile(&l1_p50s, 0.5), percentile(&l2_p50s, 0.5));
        println!(
            "L2 hit over L1 hit, median of per-round p50s: {:.0} µs (target ≤ 500 µs)",
            micros(l2) - micros(l1)
        );
        anyhow::Ok(())
    })?;
    let l2_hits = b.gateway.metrics().lookup_l2_hit.get();
    println!("B's cache_lookups_total{{result=\"l2_hit\"}}: {l2_hits}");
    drop((a, b));
    Ok(())
}
