//! Fleet mode's link to Redis (SPEC §10): the one place that talks to Redis.
//!
//! Every command runs under `redis.command_timeout` (redis-rs would otherwise retry a timed-out
//! command on the same hung socket); a command that fails or times out marks Redis **down**: the
//! connection is dropped, every later call fails at once without touching the network, and a
//! probe reconnects about once a second. So a dead or hung (SIGSTOPped) Redis costs one
//! `command_timeout`, then nothing per request. When a probe succeeds the link is **up** again
//! and [`Redis::joined`] moves on: what may have missed updates while the link was down (the L1
//! cache, a subscription, the guard's numbers) resyncs.
//!
//! The shared pieces (tokens and guard, budget, cooldown and circuit, L2 pages, purges) live
//! next to the seams they implement; they use [`Redis::call`] and [`Redis::key`], and
//! [`seal`] for what must not be in Redis in clear.

pub mod seal;

use crate::config::RedisConfig;
use crate::observe::{Metrics, RedisOutcome};
use crate::util::Shutdown;
use arc_swap::ArcSwapOption;
use parking_lot::Mutex;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

/// A lease is a key whose value is its holder's random owner token. Compare-and-delete: released
/// only by its owner (Debian's Redis 7.0 has neither `SET … IFEQ` nor `DELEX`). KEYS: lease.
/// ARGV: owner.
pub const LEASE_RELEASE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"#;

/// Compare-and-expire: only the owner keeps its lease alive. KEYS: lease. ARGV: owner, ms.
pub const LEASE_RENEW: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"#;

/// How often a replica that treats Redis as down tries it again.
pub const PROBE_EVERY: Duration = Duration::from_secs(1);

/// Why a Redis call gave no answer. Callers treat all three alike (Redis is failed); the kind is
/// for the log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RedisError {
    /// Redis is treated as down: no call was made.
    #[error("redis is down; not called")]
    Down,
    #[error("redis command timed out")]
    Timeout,
    /// An error reply or a broken connection (the kind only: a reply may quote a key).
    #[error("redis command failed: {0}")]
    Failed(String),
}

/// `/status`'s `redis` object.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RedisStatus {
    pub configured: bool,
    pub connected: bool,
    /// RFC 3339 (UTC), or null while connected.
    pub degraded_since: Option<String>,
}

impl RedisStatus {
    /// Without `redis.url`.
    pub fn off() -> Self {
        Self {
            configured: false,
            connected: false,
            degraded_since: None,
        }
    }
}

/// The link to the fleet's Redis.
pub struct Redis {
    client: redis::Client,
    conn: ArcSwapOption<ConnectionManager>,
    prefix: String,
    connect_timeout: Duration,
    command_timeout: Duration,
    max_replicas: u32,
    l2_max_entry_bytes: u64,
    up: AtomicBool,
    degraded_since: Mutex<Option<SystemTime>>,
    /// Counts the times the link came up (0: never yet).
    joined: watch::Sender<u64>,
    /// Wakes the probe loop when the link goes down.
    went_down: Notify,
    metrics: Metrics,
}

impl std::fmt::Debug for Redis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may carry a password: never printed.
        f.debug_struct("Redis")
            .field("prefix", &self.prefix)
            .field("up", &self.is_up())
            .finish_non_exhaustive()
    }
}

impl Redis {
    /// The link for `cfg` (validated: `url` set and parseable). Starts down; [`Redis::start`]
    /// connects.
    pub fn new(cfg: &RedisConfig, metrics: Metrics) -> anyhow::Result<Arc<Self>> {
        let client = redis::Client::open(cfg.url.expose())
            .map_err(|_| anyhow::anyhow!("redis.url: not a Redis URL"))?;
        metrics.redis_up.set(0);
        Ok(Arc::new(Self {
            client,
            conn: ArcSwapOption::empty(),
            prefix: cfg.key_prefix.clone(),
            connect_timeout: cfg.connect_timeout.0,
            command_timeout: cfg.command_timeout.0,
            max_replicas: cfg.max_replicas,
            l2_max_entry_bytes: cfg.l2_max_entry_bytes.0,
            up: AtomicBool::new(false),
            degraded_since: Mutex::new(Some(SystemTime::now())),
            joined: watch::channel(0).0,
            went_down: Notify::new(),
            metrics,
        }))
    }

    /// Connects once (within `connect_timeout`; the gateway serves either way, degraded until
    /// Redis answers) and checks the eviction policy; then, until `shutdown`, once a second:
    /// a PING while up, a reconnect attempt while down.
    pub async fn start(self: &Arc<Self>, shutdown: Shutdown) {
        if !self.probe().await {
            tracing::warn!(
                "redis is not answering: serving degraded (no logins, 1/max_replicas of the \
                 upstream budget) and trying again every second"
            );
        }
        let link = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(PROBE_EVERY) => {}
                    _ = link.went_down.notified() => continue,
                    _ = shutdown.wait() => return,
                }
                if link.is_up() {
                    // An idle replica notices a failed Redis too (`redis_up` stays true to life).
                    let _ = link
                        .call(|mut c| async move {
                            redis::cmd("PING").query_async::<String>(&mut c).await
                        })
                        .await;
                } else {
                    link.probe().await;
                }
            }
        });
    }

    /// A fresh connection and a PING; on success the link is up. Returns whether it is.
    async fn probe(&self) -> bool {
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.connect_timeout))
            // Our own timeout bounds every call; the crate's would retry on a hung socket.
            .set_response_timeout(None)
            .set_number_of_retries(1);
        let connect = ConnectionManager::new_with_config(self.client.clone(), config);
        let conn = match tokio::time::timeout(self.connect_timeout, connect).await {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => {
                tracing::debug!(error = %e.category(), "redis probe: cannot connect");
                return false;
            }
            Err(_) => {
                tracing::debug!("redis probe: connect timed out");
                return false;
            }
        };
        let mut ping_conn = conn.clone();
        let ping_cmd = redis::cmd("PING");
        let ping = ping_cmd.query_async::<String>(&mut ping_conn);
        match tokio::time::timeout(self.command_timeout.max(self.connect_timeout), ping).await {
            Ok(Ok(_)) => {}
            _ => return false,
        }
        self.check_eviction_policy(conn.clone()).await;
        self.conn.store(Some(Arc::new(conn)));
        self.up.store(true, Ordering::Release);
        *self.degraded_since.lock() = None;
        self.metrics.redis_up.set(1);
        self.joined.send_modify(|n| *n += 1);
        let joined = *self.joined.borrow();
        if joined > 1 {
            tracing::info!("redis answers again: rejoined the fleet");
        } else {
            tracing::info!("connected to redis: fleet mode");
        }
        true
    }

    /// SPEC §10: pages may be evicted under memory pressure, the guard's keys never; only
    /// `noeviction` and `volatile-*` policies keep keys without an expiry. A warning, not a
    /// refusal: managed Redis services often forbid `CONFIG GET`.
    async fn check_eviction_policy(&self, mut conn: ConnectionManager) {
        let mut cmd = redis::cmd("CONFIG");
        cmd.arg("GET").arg("maxmemory-policy");
        let get = cmd.query_async::<Vec<String>>(&mut conn);
        match tokio::time::timeout(self.connect_timeout, get).await {
            Ok(Ok(v)) => {
                let policy = v.get(1).map(String::as_str).unwrap_or("");
                if policy != "noeviction" && !policy.starts_with("volatile-") {
                    tracing::warn!(
                        policy,
                        "redis maxmemory-policy may evict keys without an expiry (the login \
                         counts): set it to noeviction or a volatile-* policy"
                    );
                }
            }
            _ => tracing::warn!(
                "cannot read redis maxmemory-policy (CONFIG GET refused?): make sure it is \
                 noeviction or a volatile-* policy"
            ),
        }
    }

    /// True while Redis answers.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// A receiver of the number of times the link came up: it changes on every (re)join.
    pub fn joined(&self) -> watch::Receiver<u64> {
        self.joined.subscribe()
    }

    /// `key_prefix` + `suffix`.
    pub fn key(&self, suffix: &str) -> String {
        let mut k = String::with_capacity(self.prefix.len() + suffix.len());
        k.push_str(&self.prefix);
        k.push_str(suffix);
        k
    }

    pub fn max_replicas(&self) -> u32 {
        self.max_replicas
    }

    pub fn l2_max_entry_bytes(&self) -> u64 {
        self.l2_max_entry_bytes
    }

    pub fn command_timeout(&self) -> Duration {
        self.command_timeout
    }

    /// The client, for what needs its own connection (a pub/sub subscription).
    pub fn client(&self) -> &redis::Client {
        &self.client
    }

    pub fn status(&self) -> RedisStatus {
        RedisStatus {
            configured: true,
            connected: self.is_up(),
            degraded_since: self
                .degraded_since
                .lock()
                .map(|t| humantime::format_rfc3339_seconds(t).to_string()),
        }
    }

    /// Runs `f` on the shared connection within `command_timeout`. Fails at once while Redis is
    /// down; a failure or a timeout marks it down.
    pub async fn call<T, F, Fut>(&self, f: F) -> Result<T, RedisError>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let conn = match self.conn.load_full() {
            Some(c) if self.is_up() => (*c).clone(),
            _ => return Err(RedisError::Down),
        };
        let started = Instant::now();
        let result = tokio::time::timeout(self.command_timeout, f(conn)).await;
        let seconds = started.elapsed().as_secs_f64();
        match result {
            Ok(Ok(v)) => {
                self.metrics.redis_command(RedisOutcome::Ok, seconds);
                Ok(v)
            }
            Ok(Err(e)) => {
                self.metrics.redis_command(RedisOutcome::Error, seconds);
                let err = RedisError::Failed(e.category().to_string());
                self.mark_down(&err);
                Err(err)
            }
            Err(_) => {
                self.metrics.redis_command(RedisOutcome::Timeout, seconds);
                self.mark_down(&RedisError::Timeout);
                Err(RedisError::Timeout)
            }
        }
    }

    /// Treats Redis as failed until a probe succeeds (also for a caller that found an answer
    /// it cannot use, e.g. a script's reply of the wrong shape).
    pub fn mark_down(&self, why: &RedisError) {
        if self.up.swap(false, Ordering::AcqRel) {
            self.conn.store(None);
            *self.degraded_since.lock() = Some(SystemTime::now());
            self.metrics.redis_up.set(0);
            tracing::error!(
                error = %why,
                "redis failed: serving degraded (no logins, 1/max_replicas of the upstream \
                 budget) until it answers again"
            );
            self.went_down.notify_one();
        }
    }
}
