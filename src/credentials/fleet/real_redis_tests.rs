//! The fleet's scripts on a real `redis-server` (started here on a free port): one lease at a
//! time, fenced tokens, and the guard across replicas, a flush and a reset. Compiled only in
//! tests: `#[cfg(test)]` is on its `mod` line in `credentials/fleet.rs`.

use super::*;
use crate::credentials::{RESET_ATTEMPTS, STOP_AT_ATTEMPTS};

/// A real `redis-server` on a free loopback port, no persistence; killed when dropped.
struct TestRedis(std::process::Child, u16);

impl TestRedis {
    async fn start() -> TestRedis {
        for _ in 0..5 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .unwrap()
                .port();
            let child = std::process::Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .stdout(std::process::Stdio::null())
                .spawn()
                .expect("redis-server runs");
            let mut r = TestRedis(child, port);
            for _ in 0..200 {
                if tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .is_ok()
                {
                    return r;
                }
                if let Ok(Some(_)) = r.0.try_wait() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        panic!("redis-server did not start");
    }

    async fn cmd(&self, args: &[&str]) -> redis::Value {
        let client = redis::Client::open(format!("redis://127.0.0.1:{}/0", self.1)).unwrap();
        let mut c = client.get_multiplexed_async_connection().await.unwrap();
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        cmd.query_async(&mut c).await.unwrap()
    }
}

impl Drop for TestRedis {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn shared(server: &TestRedis, shutdown: &crate::util::Shutdown) -> Arc<SharedTokens> {
    let cfg = crate::config::RedisConfig {
        url: Secret::new(format!("redis://127.0.0.1:{}/0", server.1)),
        command_timeout: crate::config::Dur(Duration::from_secs(1)),
        ..Default::default()
    };
    let redis = Redis::new(&cfg, crate::observe::Metrics::new()).unwrap();
    redis.start(shutdown.clone()).await;
    assert!(redis.is_up());
    Arc::new(SharedTokens::new(redis, &Secret::new("k".repeat(32))))
}

fn creds() -> UpstreamCredentials {
    UpstreamCredentials {
        client_id: "id".into(),
        client_secret: Secret::new("secret"),
        username: "user".into(),
        password: Secret::new("pw"),
    }
}

fn token(t: &str, fence: u64) -> SharedToken {
    SharedToken {
        token: Secret::new(t),
        fence,
        ttl: Duration::from_secs(60),
        life: Duration::from_secs(3600),
        same: false,
    }
}

const LEASE: Duration = Duration::from_secs(5);
const PAUSE: Duration = Duration::from_secs(900);

#[tokio::test]
async fn one_lease_and_fenced_tokens_on_a_real_redis() {
    let server = TestRedis::start().await;
    let shutdown = crate::util::Shutdown::new();
    let (a, b) = (
        shared(&server, &shutdown).await,
        shared(&server, &shutdown).await,
    );
    let keys = a.keys(TokenLabel::Oauth, &creds());
    let begin = |s: &Arc<SharedTokens>, known| {
        let (s, keys) = (s.clone(), keys.clone());
        async move {
            s.begin(&keys, "fp", false, LEASE, PAUSE, known, Duration::ZERO)
                .await
                .unwrap()
        }
    };
    let (granted, owner) = begin(&a, 0).await;
    assert_eq!(granted.code, Code::Granted);
    let fence = granted.extra;
    assert_eq!(begin(&b, 0).await.0.code, Code::Busy, "one lease at a time");
    // Only its owner releases it.
    b.release(keys.lease.clone(), "not-the-owner".into()).await;
    assert_eq!(begin(&b, 0).await.0.code, Code::Busy);
    assert!(a
        .publish(&keys, &token("first", fence), &owner)
        .await
        .unwrap());
    let read = b.read(&keys).await.unwrap().unwrap();
    assert_eq!((read.token.expose(), read.fence), ("first", fence));
    assert!(read.ttl > Duration::ZERO && read.life == Duration::from_secs(3600));
    // Published: the lease is free, and a caller that does not know the token finds it.
    let (fresh, _) = begin(&b, 0).await;
    assert_eq!((fresh.code, fresh.extra), (Code::Fresh, fence));
    let (again, owner_b) = begin(&b, fence).await;
    assert_eq!(again.code, Code::Granted);
    assert!(again.extra > fence, "fences grow");
    // A stale holder's write never overwrites a newer token.
    assert!(b
        .publish(&keys, &token("second", again.extra), &owner_b)
        .await
        .unwrap());
    assert!(!a.publish(&keys, &token("stale", fence), "").await.unwrap());
    assert_eq!(
        a.read(&keys).await.unwrap().unwrap().token.expose(),
        "second"
    );
    // Sealed under its key: in clear nowhere, and not openable under another key.
    let raw = server.cmd(&["HGET", &keys.token, "s"]).await;
    let redis::Value::BulkString(raw) = raw else {
        panic!("{raw:?}")
    };
    assert!(!raw.windows(6).any(|w| w == b"second"));
    let _ = server.cmd(&["RENAME", &keys.token, &keys.lease]).await;
    let moved = Keys {
        token: keys.lease.clone(),
        ..keys.clone()
    };
    assert!(
        a.read(&moved).await.unwrap().is_none(),
        "the key is the seal's AAD"
    );
    shutdown.trigger();
}

#[tokio::test]
async fn the_guard_counts_for_the_fleet_and_survives_a_flush_and_a_stale_memory() {
    let server = TestRedis::start().await;
    let shutdown = crate::util::Shutdown::new();
    let (a, b) = (
        shared(&server, &shutdown).await,
        shared(&server, &shutdown).await,
    );
    let keys = a.keys(TokenLabel::Session, &creds());
    let limits = Limits {
        max_failed: 2,
        pause: PAUSE,
    };
    let rejected = Event {
        kind: flow::EventKind::Rejected,
        refund: false,
        backoff: false,
    };
    let begin = |s: &Arc<SharedTokens>, fp: &'static str| {
        let (s, keys) = (s.clone(), keys.clone());
        async move {
            let (v, owner) = s
                .begin(&keys, fp, true, LEASE, PAUSE, 0, Duration::ZERO)
                .await
                .unwrap();
            s.remember(&keys.guard, v.numbers, v.now_ms);
            (v, owner)
        }
    };
    // A fresh guard waits for the live replicas first.
    assert_eq!(begin(&a, "fp1").await.0.code, Code::Wait);
    let _ = server.cmd(&["HSET", &keys.guard, "born", "0"]).await;
    for n in 1..=2u32 {
        let (v, owner) = begin(&a, "fp1").await;
        assert_eq!(
            (v.code, v.numbers.attempts),
            (Code::Granted, n),
            "charged at once"
        );
        let s = a
            .settle(&keys, "fp1", true, rejected, limits, &owner)
            .await
            .unwrap();
        a.remember(&keys.guard, s.numbers, s.now_ms);
        assert_eq!(s.numbers.rejected, n);
    }
    let (v, _) = begin(&b, "fp1").await;
    assert_eq!(v.code, Code::Paused, "paused for every replica");
    assert!(v.numbers.paused_until_ms > v.now_ms);
    // Other credentials, never tried: one attempt through the pause.
    let (v, owner) = begin(&b, "fp2").await;
    assert_eq!((v.code, v.numbers.attempts), (Code::Granted, 3));
    let s = b
        .settle(&keys, "fp2", true, rejected, limits, &owner)
        .await
        .unwrap();
    b.remember(&keys.guard, s.numbers, s.now_ms);
    assert_eq!(begin(&b, "fp2").await.0.code, Code::Paused);

    // Redis loses everything: the first replica's push brings the count back.
    let _ = server.cmd(&["FLUSHALL"]).await;
    let v = b.sync(&keys, "fp2", PAUSE).await.unwrap();
    assert_eq!((v.numbers.rejected, v.numbers.attempts), (3, 3));
    assert!(v.numbers.paused_until_ms > v.now_ms);
    // The pause ends (Redis and every memory of it).
    let _ = server
        .cmd(&["HSET", &keys.guard, "born", "0", "pause", "0"])
        .await;
    for s in [&a, &b] {
        let n = s.remembered(&keys.guard);
        s.remember(
            &keys.guard,
            Numbers {
                paused_until_ms: 0,
                ..n
            },
            v.now_ms,
        );
    }
    let (v, owner) = begin(&a, "fp1").await;
    assert_eq!((v.code, v.numbers.attempts), (Code::Granted, 4));
    let s = a
        .settle(&keys, "fp1", true, rejected, limits, &owner)
        .await
        .unwrap();
    assert!(s.numbers.stopped, "stopped at four attempts");
    assert_eq!(
        begin(&b, "fp3").await.0.code,
        Code::Stopped,
        "not by new credentials"
    );

    // A reset is a new epoch: a replica remembering the numbers before it does not undo it.
    let r = a.reset(&keys, "fp1", PAUSE).await.unwrap();
    assert_eq!(
        (r.numbers.attempts, r.numbers.stopped),
        (RESET_ATTEMPTS, false)
    );
    let stale = Numbers {
        attempts: 4,
        stopped: true,
        ..s.numbers
    };
    b.remember(&keys.guard, stale, 0);
    let v = b.sync(&keys, "fp1", PAUSE).await.unwrap();
    assert_eq!(
        (v.numbers.attempts, v.numbers.stopped),
        (RESET_ATTEMPTS, false)
    );
    let (v, owner) = begin(&b, "fp1").await;
    assert_eq!(
        (v.code, v.numbers.attempts),
        (Code::Granted, STOP_AT_ATTEMPTS)
    );
    // Accepted: a new epoch, numbers to zero; the lease goes with the publication.
    let accepted = Event {
        kind: flow::EventKind::Accepted,
        refund: false,
        backoff: false,
    };
    let s = b
        .settle(&keys, "fp1", true, accepted, limits, &owner)
        .await
        .unwrap();
    assert_eq!((s.numbers.attempts, s.numbers.rejected), (0, 0));
    assert!(s.numbers.epoch > r.numbers.epoch);
    assert_eq!(
        begin(&a, "fp1").await.0.code,
        Code::Busy,
        "lease kept for the publication"
    );
    shutdown.trigger();
}
