//! Fleet mode's tokens and lockout guard (SPEC §10): what the replicas of one fleet share in
//! Redis, and the Redis side of it. The token manager's fleet flows (`fleet/flow.rs`) use it.
//!
//! - **Tokens** at `tok:{oauth|session}:{id}` (a hash: `v` the fence, `s` the token sealed with
//!   [`Sealer`] under the Redis key as associated data), expiring with the token (the session:
//!   its idle expiry, pushed later by use on any replica). One replica at a time obtains a token,
//!   under the lease `lease:{oauth|session}:{id}` (`SET NX PX`, a random owner, released by
//!   compare-and-delete, renewed while the call runs, living at most `upstream.timeout` + 1 s
//!   past its last renewal); its write is fenced (a lower fence never overwrites a higher one).
//! - **Guard** at `guard:{oauth|session}:{id}`: see `fleet/scripts.rs`. Every replica
//!   remembers the numbers it last saw per guard ([`Numbers`], by epoch) and sends them with
//!   every script call; it pushes them every [`SYNC_EVERY`] and when it rejoins.
//!
//! `{id}` is a truncated SHA-256 of the ThingSpace username (or OAuth client id): no name in
//! key names.

mod calls;
mod flow;
#[cfg(test)]
mod real_redis_tests;
mod scripts;
mod sync;

pub(crate) use calls::FleetTurn;
pub(crate) use flow::{unavailable, Event, EventKind};

use super::UpstreamCredentials;
use crate::fleet::seal::Sealer;
use crate::fleet::Redis;
use crate::observe::TokenLabel;
use crate::secret::Secret;
use parking_lot::Mutex;
use ring::rand::SystemRandom;
use scripts::*;
use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::time::Instant;

/// How often a replica pushes its remembered numbers and reads the fleet's (so `/status` shows
/// the fleet's count, a reset elsewhere lifts the stop here, and a Redis that lost the guard
/// gets it back).
pub(crate) const SYNC_EVERY: Duration = Duration::from_millis(250);
/// A guard hash created just now (a fresh Redis, or one that lost its data) grants no login for
/// this long (four syncs), so the live replicas push what they remember first.
pub(crate) const FRESH_GRACE: Duration = Duration::from_millis(1000);
/// How often a replica waiting for another's token call looks for its result.
pub(crate) const POLL_EVERY: Duration = Duration::from_millis(50);
/// While Redis is unreachable a replica renews the OAuth token itself at most this often.
pub(crate) const LOCAL_OAUTH_EVERY: Duration = Duration::from_secs(60);

/// A guard script's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Code {
    /// The lease is ours (and, for logins, the attempt charged): make the call.
    Granted,
    /// Another replica holds the lease: wait for its result.
    Busy,
    /// The guard was just created: wait for the live replicas to restore the count.
    Wait,
    Paused,
    Stopped,
    /// The fleet is backing off after transient failures.
    Backoff,
    /// Synced, settled or reset.
    Done,
    /// Redis holds a newer token than the caller knows: adopt it, no call.
    Fresh,
}

/// SPEC §5's numbers for one guard, as Redis and the replicas hold them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Numbers {
    /// Redis's time (ms) of the last accepted login or reset; 0 before any.
    pub(crate) epoch: u64,
    pub(crate) rejected: u32,
    pub(crate) attempts: u32,
    /// Redis's clock, ms since the Unix epoch; 0: none.
    pub(crate) paused_until_ms: u64,
    pub(crate) stopped: bool,
    pub(crate) locked: bool,
}

impl Numbers {
    fn args(&self) -> [u64; 6] {
        [
            self.epoch,
            u64::from(self.rejected),
            u64::from(self.attempts),
            self.paused_until_ms,
            u64::from(self.stopped),
            u64::from(self.locked),
        ]
    }

    /// The scripts' merge: a later epoch wins whole; within one, each number's maximum.
    pub(crate) fn merge(self, other: Numbers) -> Numbers {
        if other.epoch > self.epoch {
            return other;
        }
        if other.epoch < self.epoch {
            return self;
        }
        Numbers {
            epoch: self.epoch,
            rejected: self.rejected.max(other.rejected),
            attempts: self.attempts.max(other.attempts),
            paused_until_ms: self.paused_until_ms.max(other.paused_until_ms),
            stopped: self.stopped || other.stopped,
            locked: self.locked || other.locked,
        }
    }
}

/// A guard script's reply.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Verdict {
    pub(crate) code: Code,
    pub(crate) numbers: Numbers,
    /// Redis's clock at the call, ms.
    pub(crate) now_ms: u64,
    /// Granted: the fence; Fresh: the newer token's fence; Busy/Wait/Paused/Backoff: ms to
    /// wait; settled: the backoff step.
    pub(crate) extra: u64,
    /// The caller's credentials were not tried since the last accepted login: a pause does not
    /// hold them (one attempt).
    pub(crate) lift: bool,
}

fn verdict(v: &[i64]) -> Option<Verdict> {
    let [code, ep, rej, att, pause, stop, lock, now, extra, lift] = v.try_into().ok()?;
    let u = |n: i64| u64::try_from(n).unwrap_or(0);
    let small = |n: i64| u32::try_from(n).unwrap_or(if n < 0 { 0 } else { u32::MAX });
    let code = match code {
        0 => Code::Granted,
        1 => Code::Busy,
        2 => Code::Wait,
        3 => Code::Paused,
        4 => Code::Stopped,
        5 => Code::Backoff,
        6 => Code::Done,
        7 => Code::Fresh,
        _ => return None,
    };
    Some(Verdict {
        code,
        numbers: Numbers {
            epoch: u(ep),
            rejected: small(rej),
            attempts: small(att),
            paused_until_ms: u(pause),
            stopped: stop != 0,
            locked: lock != 0,
        },
        now_ms: u(now),
        extra: u(extra),
        lift: lift != 0,
    })
}

/// One token's keys for one user (or client).
#[derive(Debug, Clone)]
pub(crate) struct Keys {
    pub(crate) guard: String,
    pub(crate) lease: String,
    pub(crate) token: String,
}

/// A token as the fleet holds it.
pub(crate) struct SharedToken {
    pub(crate) token: Secret,
    pub(crate) fence: u64,
    /// Left before the key expires (the token's expiry; the session's idle expiry).
    pub(crate) ttl: Duration,
    /// The OAuth token's lifetime from its request (for its refresh at 75 %).
    pub(crate) life: Duration,
    /// The last refresh returned this same OAuth token.
    pub(crate) same: bool,
}

/// What a guard script is told about the caller's settings.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub(crate) max_failed: u32,
    pub(crate) pause: Duration,
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn wall_ms() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// The Redis side of the fleet's tokens and guard, and what this replica remembers of them.
pub(crate) struct SharedTokens {
    redis: Arc<Redis>,
    sealer: Sealer,
    /// Keys the credentials' fingerprints kept in Redis.
    fp_key: ring::hmac::Key,
    rng: SystemRandom,
    /// The highest numbers seen per guard key (by epoch): pushed with every script call.
    memory: Mutex<HashMap<String, Numbers>>,
    /// Redis's clock minus ours (ms), from the last reply: converts pauses for the guard file.
    clock_offset_ms: AtomicI64,
    /// When this replica last pushed the session's use (manager ms): at most once per
    /// `session_margin(idle)`.
    pub(crate) pushed_ms: AtomicI64,
    /// The last OAuth renewal made alone while Redis was unreachable.
    pub(crate) local_oauth_at: Mutex<Option<Instant>>,
    /// Fences of tokens the upstream refused (oauth, session): never adopted again.
    refused: [AtomicU64; 2],
}

impl std::fmt::Debug for SharedTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SharedTokens(..)")
    }
}

fn slot(token: TokenLabel) -> usize {
    match token {
        TokenLabel::Oauth => 0,
        TokenLabel::Session => 1,
    }
}

/// The name a token's keys are kept under: the OAuth client id or the ThingSpace username,
/// hashed.
fn key_id(token: TokenLabel, creds: &UpstreamCredentials) -> String {
    let name = match token {
        TokenLabel::Oauth => &creds.client_id,
        TokenLabel::Session => &creds.username,
    };
    let input = format!("thingspace-gateway fleet id v1\0{}\0{name}", token.as_str());
    let digest = ring::digest::digest(&ring::digest::SHA256, input.as_bytes());
    crate::util::hex(&digest.as_ref()[..8])
}

impl SharedTokens {
    pub(crate) fn new(redis: Arc<Redis>, signing_key: &Secret) -> Self {
        Self {
            redis,
            sealer: Sealer::new(signing_key, b"tokens"),
            fp_key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, signing_key.expose().as_bytes()),
            rng: SystemRandom::new(),
            memory: Mutex::new(HashMap::new()),
            clock_offset_ms: AtomicI64::new(0),
            pushed_ms: AtomicI64::new(i64::MIN / 2),
            local_oauth_at: Mutex::new(None),
            refused: [AtomicU64::new(0), AtomicU64::new(0)],
        }
    }

    pub(crate) fn redis(&self) -> &Arc<Redis> {
        &self.redis
    }

    pub(crate) fn keys(&self, token: TokenLabel, creds: &UpstreamCredentials) -> Keys {
        let id = key_id(token, creds);
        let t = token.as_str();
        Keys {
            guard: self.redis.key(&format!("guard:{t}:{id}")),
            lease: self.redis.key(&format!("lease:{t}:{id}")),
            token: self.redis.key(&format!("tok:{t}:{id}")),
        }
    }

    /// A credentials fingerprint keyed with the signing key (16 hex digits).
    pub(crate) fn keyed(&self, fingerprint: &str) -> String {
        let input = format!("thingspace-gateway fleet fingerprint v1\0{fingerprint}");
        let tag = ring::hmac::sign(&self.fp_key, input.as_bytes());
        crate::util::hex(&tag.as_ref()[..8])
    }

    pub(crate) fn remembered(&self, guard: &str) -> Numbers {
        self.memory.lock().get(guard).copied().unwrap_or_default()
    }

    /// Takes the fleet's numbers as remembered; `true` when they changed.
    pub(crate) fn remember(&self, guard: &str, n: Numbers, now_ms: u64) -> bool {
        let offset = i64::try_from(now_ms).unwrap_or(0).saturating_sub(wall_ms());
        self.clock_offset_ms.store(offset, Ordering::Relaxed);
        self.memory.lock().insert(guard.to_string(), n) != Some(n)
    }

    /// Adds what this replica saw without Redis (the maximum, by epoch).
    pub(crate) fn remember_max(&self, guard: &str, n: Numbers) {
        let mut m = self.memory.lock();
        let merged = m.get(guard).copied().unwrap_or_default().merge(n);
        m.insert(guard.to_string(), merged);
    }

    /// Redis's clock now, as this replica last measured it (ms).
    pub(crate) fn redis_ms(&self, wall: SystemTime) -> u64 {
        let w = wall
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        u64::try_from(w.saturating_add(self.clock_offset_ms.load(Ordering::Relaxed))).unwrap_or(0)
    }

    /// A Redis time (ms) on this replica's wall clock.
    pub(crate) fn wall_of(&self, redis_ms: u64) -> SystemTime {
        let local = i64::try_from(redis_ms)
            .unwrap_or(i64::MAX)
            .saturating_sub(self.clock_offset_ms.load(Ordering::Relaxed));
        SystemTime::UNIX_EPOCH + Duration::from_millis(u64::try_from(local).unwrap_or(0))
    }

    pub(crate) fn refused(&self, token: TokenLabel) -> u64 {
        self.refused[slot(token)].load(Ordering::Relaxed)
    }

    /// The upstream refused the token of `fence`: never adopt it again, and take it out of
    /// Redis (if it is still the one there) so no replica does.
    pub(crate) fn refuse(self: &Arc<Self>, token: TokenLabel, keys: &Keys, fence: u64) {
        if fence == 0 {
            return;
        }
        self.refused[slot(token)].fetch_max(fence, Ordering::Relaxed);
        let (me, key) = (self.clone(), keys.token.clone());
        tokio::spawn(async move {
            let _ = me
                .redis
                .call(|mut c| async move {
                    INVALIDATE_SCRIPT
                        .key(key)
                        .arg(fence)
                        .invoke_async::<i64>(&mut c)
                        .await
                })
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_merge_takes_a_later_epoch_whole_and_else_the_maximum() {
        let old = Numbers {
            epoch: 5,
            rejected: 2,
            attempts: 3,
            paused_until_ms: 100,
            stopped: false,
            locked: false,
        };
        let reset = Numbers {
            epoch: 9,
            attempts: 3,
            ..Numbers::default()
        };
        assert_eq!(old.merge(reset), reset, "a reset is not undone");
        assert_eq!(reset.merge(old), reset);
        let other = Numbers {
            epoch: 5,
            rejected: 1,
            attempts: 4,
            paused_until_ms: 50,
            stopped: true,
            locked: false,
        };
        let m = old.merge(other);
        assert_eq!((m.rejected, m.attempts, m.paused_until_ms), (2, 4, 100));
        assert!(m.stopped);
    }

    #[test]
    fn replies_of_the_wrong_shape_are_refused() {
        assert!(verdict(&[0, 1, 2]).is_none());
        assert!(verdict(&[9, 0, 0, 0, 0, 0, 0, 0, 0, 0]).is_none());
        let v = verdict(&[0, 7, 1, 2, 0, 0, 0, 1000, 1001, 1]).unwrap();
        assert_eq!(v.code, Code::Granted);
        assert_eq!((v.numbers.epoch, v.numbers.attempts, v.extra), (7, 2, 1001));
        assert!(v.lift);
    }
}
