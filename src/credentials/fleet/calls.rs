//! The fleet's Redis calls for tokens and the guard (each one script or one pipeline, under
//! `redis.command_timeout`), and [`FleetTurn`], the lease of one token call.

use super::scripts::*;
use super::{ms, verdict, Event, Keys, Limits, SharedToken, SharedTokens, Verdict, FRESH_GRACE};
use crate::credentials::{RESET_ATTEMPTS, STOP_AT_ATTEMPTS};
use crate::fleet::RedisError;
use crate::secret::Secret;
use ring::rand::SecureRandom;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// What is sealed: the token, its fence (checked against `v`), and what the OAuth refresh needs.
#[derive(serde::Serialize, serde::Deserialize)]
struct Payload {
    t: String,
    f: u64,
    #[serde(default)]
    life_ms: u64,
    #[serde(default)]
    same: bool,
}

impl SharedTokens {
    fn owner(&self) -> String {
        let mut b = [0u8; 16];
        // A failing system generator leaves a fixed owner: the lease still works (one holder at
        // a time), only a stale holder could then release a newer one's.
        let _ = self.rng.fill(&mut b);
        crate::util::hex(&b)
    }

    async fn guard_script(
        &self,
        script: &'static redis::Script,
        keys: Vec<String>,
        args: Vec<String>,
    ) -> Result<Verdict, RedisError> {
        let reply = self
            .redis
            .call(|mut c| async move {
                let mut inv = script.prepare_invoke();
                for k in keys {
                    inv.key(k);
                }
                for a in args {
                    inv.arg(a);
                }
                inv.invoke_async::<Vec<i64>>(&mut c).await
            })
            .await?;
        verdict(&reply).ok_or_else(|| {
            let e = RedisError::Failed("unexpected guard script reply".into());
            self.redis.mark_down(&e);
            e
        })
    }

    fn memory_args(&self, guard: &str) -> Vec<String> {
        self.remembered(guard)
            .args()
            .iter()
            .map(u64::to_string)
            .collect()
    }

    /// The guard check, the lease and the charge (`charged`: session logins), at once, unless
    /// Redis holds a token of a fence above `known` with more than `min_ttl` left. Returns the
    /// verdict and the owner value of a granted lease.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn begin(
        &self,
        keys: &Keys,
        fp: &str,
        charged: bool,
        lease_for: Duration,
        pause_cap: Duration,
        known: u64,
        min_ttl: Duration,
    ) -> Result<(Verdict, String), RedisError> {
        let owner = self.owner();
        let mut args = self.memory_args(&keys.guard);
        args.extend([
            fp.to_string(),
            u8::from(charged).to_string(),
            ms(lease_for).max(1).to_string(),
            owner.clone(),
            ms(pause_cap).to_string(),
            ms(FRESH_GRACE).to_string(),
            STOP_AT_ATTEMPTS.to_string(),
            known.to_string(),
            ms(min_ttl).to_string(),
        ]);
        let keys = vec![keys.guard.clone(), keys.lease.clone(), keys.token.clone()];
        let v = self.guard_script(&BEGIN_SCRIPT, keys, args).await?;
        Ok((v, owner))
    }

    /// Settles a call made under the lease of `owner`.
    pub(crate) async fn settle(
        &self,
        keys: &Keys,
        fp: &str,
        charged: bool,
        event: Event,
        limits: Limits,
        owner: &str,
    ) -> Result<Verdict, RedisError> {
        let (base, cap) = crate::credentials::guard::backoff_bounds();
        let jitter = fastrand::u32(0..1000);
        let mut args = self.memory_args(&keys.guard);
        args.extend([
            event.code().to_string(),
            u8::from(event.refund).to_string(),
            u8::from(event.backoff).to_string(),
            u8::from(charged).to_string(),
            limits.max_failed.to_string(),
            ms(limits.pause).to_string(),
            ms(limits.pause).to_string(),
            STOP_AT_ATTEMPTS.to_string(),
            ms(base).to_string(),
            ms(cap).to_string(),
            jitter.to_string(),
            owner.to_string(),
            fp.to_string(),
        ]);
        let keys = vec![keys.guard.clone(), keys.lease.clone()];
        self.guard_script(&SETTLE_SCRIPT, keys, args).await
    }

    /// Pushes the remembered numbers and reads the fleet's.
    pub(crate) async fn sync(
        &self,
        keys: &Keys,
        fp: &str,
        pause_cap: Duration,
    ) -> Result<Verdict, RedisError> {
        let mut args = self.memory_args(&keys.guard);
        args.extend([ms(pause_cap).to_string(), fp.to_string()]);
        self.guard_script(&SYNC_SCRIPT, vec![keys.guard.clone()], args)
            .await
    }

    /// `POST /credentials/reset` for the fleet.
    pub(crate) async fn reset(
        &self,
        keys: &Keys,
        fp: &str,
        pause_cap: Duration,
    ) -> Result<Verdict, RedisError> {
        let mut args = self.memory_args(&keys.guard);
        args.extend([
            ms(pause_cap).to_string(),
            RESET_ATTEMPTS.to_string(),
            fp.to_string(),
        ]);
        self.guard_script(&RESET_SCRIPT, vec![keys.guard.clone()], args)
            .await
    }

    /// The fleet's token, if Redis holds one this replica can open.
    pub(crate) async fn read(&self, keys: &Keys) -> Result<Option<SharedToken>, RedisError> {
        let key = keys.token.clone();
        let (fields, pttl): (Vec<Option<Vec<u8>>>, i64) = self
            .redis
            .call(|mut c| async move {
                redis::pipe()
                    .cmd("HMGET")
                    .arg(&key)
                    .arg("v")
                    .arg("s")
                    .cmd("PTTL")
                    .arg(&key)
                    .query_async(&mut c)
                    .await
            })
            .await?;
        let (Some(Some(v)), Some(Some(sealed))) = (fields.first(), fields.get(1)) else {
            return Ok(None);
        };
        let Some(fence) = std::str::from_utf8(v).ok().and_then(|v| v.parse().ok()) else {
            return Ok(None);
        };
        let Ok(ttl) = u64::try_from(pttl) else {
            return Ok(None);
        };
        let Some(plain) = self.sealer.open(keys.token.as_bytes(), sealed) else {
            tracing::warn!(
                "a shared token in redis does not open with this replica's key \
                 (clients.token_signing_key differs across the fleet?); ignoring it"
            );
            return Ok(None);
        };
        let Ok(p) = serde_json::from_slice::<Payload>(&plain) else {
            return Ok(None);
        };
        if p.f != fence || p.t.is_empty() {
            return Ok(None);
        }
        Ok(Some(SharedToken {
            token: Secret::new(p.t),
            fence,
            ttl: Duration::from_millis(ttl),
            life: Duration::from_millis(p.life_ms),
            same: p.same,
        }))
    }

    fn seal(&self, keys: &Keys, t: &SharedToken) -> Option<Vec<u8>> {
        let payload = Payload {
            t: t.token.expose().to_string(),
            f: t.fence,
            life_ms: ms(t.life),
            same: t.same,
        };
        let plain = serde_json::to_vec(&payload).ok()?;
        self.sealer.seal(keys.token.as_bytes(), &plain)
    }

    /// Writes the token obtained under the lease of `owner` (fenced) and releases the lease.
    /// `Ok(false)`: a newer token is there.
    pub(crate) async fn publish(
        &self,
        keys: &Keys,
        t: &SharedToken,
        owner: &str,
    ) -> Result<bool, RedisError> {
        let Some(sealed) = self.seal(keys, t) else {
            return Ok(false);
        };
        let (key, lease, owner) = (keys.token.clone(), keys.lease.clone(), owner.to_string());
        let (fence, ttl) = (t.fence, ms(t.ttl));
        self.redis
            .call(|mut c| async move {
                PUBLISH_SCRIPT
                    .key(key)
                    .key(lease)
                    .arg(fence)
                    .arg(sealed)
                    .arg(ttl)
                    .arg(owner)
                    .invoke_async::<i64>(&mut c)
                    .await
            })
            .await
            .map(|n| n == 1)
    }

    /// Writes a token this replica holds where Redis has none (after it rejoined).
    pub(crate) async fn offer(&self, keys: &Keys, t: &SharedToken) -> Result<bool, RedisError> {
        let Some(sealed) = self.seal(keys, t) else {
            return Ok(false);
        };
        let key = keys.token.clone();
        let (fence, ttl) = (t.fence, ms(t.ttl));
        self.redis
            .call(|mut c| async move {
                OFFER_SCRIPT
                    .key(key)
                    .arg(fence)
                    .arg(sealed)
                    .arg(ttl)
                    .invoke_async::<i64>(&mut c)
                    .await
            })
            .await
            .map(|n| n == 1)
    }

    /// A fence for a token obtained without the lease (Redis was down): later than any the
    /// lease granted before, as far as this replica can tell.
    pub(crate) fn local_fence(&self) -> u64 {
        self.redis_ms(SystemTime::now()).max(1)
    }

    /// Pushes the session's idle expiry to `ttl` from now (never shortens it).
    pub(crate) async fn touch(&self, keys: &Keys, fence: u64, ttl: Duration) {
        let key = keys.token.clone();
        let ttl = ms(ttl);
        let _ = self
            .redis
            .call(|mut c| async move {
                TOUCH_SCRIPT
                    .key(key)
                    .arg(fence)
                    .arg(ttl)
                    .invoke_async::<i64>(&mut c)
                    .await
            })
            .await;
    }

    pub(super) async fn release(&self, lease: String, owner: String) {
        let _ = self
            .redis
            .call(|mut c| async move {
                RELEASE_SCRIPT
                    .key(lease)
                    .arg(owner)
                    .invoke_async::<i64>(&mut c)
                    .await
            })
            .await;
    }

    async fn renew(&self, lease: String, owner: String, lease_for: Duration) {
        let _ = self
            .redis
            .call(|mut c| async move {
                RENEW_SCRIPT
                    .key(lease)
                    .arg(owner)
                    .arg(ms(lease_for).max(1))
                    .invoke_async::<i64>(&mut c)
                    .await
            })
            .await;
    }
}

/// The fleet's lease on one token call, held by this replica: renewed while the call runs,
/// released when the token is published or when dropped.
pub(crate) struct FleetTurn {
    shared: Arc<SharedTokens>,
    pub(crate) keys: Keys,
    pub(crate) owner: String,
    pub(crate) fence: u64,
    released: AtomicBool,
    renew: tokio::task::JoinHandle<()>,
}

impl FleetTurn {
    pub(crate) fn new(
        shared: Arc<SharedTokens>,
        keys: Keys,
        owner: String,
        fence: u64,
        lease_for: Duration,
    ) -> Self {
        let renew = {
            let (s, lease, owner) = (shared.clone(), keys.lease.clone(), owner.clone());
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(lease_for / 3).await;
                    s.renew(lease.clone(), owner.clone(), lease_for).await;
                }
            })
        };
        Self {
            shared,
            keys,
            owner,
            fence,
            released: AtomicBool::new(false),
            renew,
        }
    }

    /// The lease went with the token's publication (or the settle of a failed call).
    pub(crate) fn released(&self) {
        self.renew.abort();
        self.released.store(true, Ordering::Relaxed);
    }
}

impl Drop for FleetTurn {
    fn drop(&mut self) {
        self.renew.abort();
        if self.released.swap(true, Ordering::Relaxed) {
            return;
        }
        // Dropped mid-call (the request went away) or after a failed publication: free the
        // lease now rather than after it expires.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let (s, lease, owner) = (
                self.shared.clone(),
                self.keys.lease.clone(),
                self.owner.clone(),
            );
            rt.spawn(async move { s.release(lease, owner).await });
        }
    }
}
