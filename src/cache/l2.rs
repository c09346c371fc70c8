//! The fleet's shared page cache (L2, SPEC §10) in Redis, under each replica's in-process L1.
//!
//! Keys (under `redis.key_prefix`):
//! - `page:{p|s}:{account}:{index}`: one answer ([`codec`]: header, meta, body, gzip), expiring
//!   when the answer is no longer servable (`ttl + max(swr, sie)` for 200s, `negative_ttl` for
//!   4xx, counted from the fetch).
//! - `fill:{…}`: the fill lease: one replica of the fleet fetches a key at a time (`SET NX PX`,
//!   a random owner, renewed while the fetch runs, released by compare-and-delete).
//! - `gen:all`, `gen:acct:{account}`: purge generations. A purge writes a new random value
//!   (O(1) whatever the number of pages); a page records the generations current when its fill
//!   began and is served only while both still hold, so a fill that raced a purge is never
//!   served either.
//! - channel `purge`: tells every replica to drop the account (or everything) from its L1;
//!   [`sync`] listens.
//!
//! Every call goes through [`Redis::call`]: bounded by `command_timeout`, failing at once while
//! Redis is down, so a caller falls back to the local path without waiting.

pub mod codec;
pub mod sync;

use super::{Entry, Key, Kind, Windows};
use crate::fleet::{Redis, RedisError};
use bytes::Bytes;
use codec::Stamps;
use redis::Script;
use std::sync::Arc;
use std::time::Duration;

/// How long a fill lease lives unless its holder renews it.
pub const LEASE_TTL: Duration = Duration::from_secs(2);
/// How often a holder renews its lease while its fetch runs.
pub const LEASE_RENEW_EVERY: Duration = Duration::from_millis(250);
/// A lease not renewed for this long belongs to a holder that lost Redis or died: its waiters
/// stop waiting and fetch themselves (a replica that lost Redis mid-fill cannot release it).
pub const LEASE_STALLED_AFTER: Duration = Duration::from_millis(750);
/// Purge generations outlive the pages filled under them (a page whose generation key expired
/// is only fetched again).
const GENERATION_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// Takes the lease unless the page changed since the caller read it (then it reads again).
/// KEYS: fill, page, gen:all, gen:acct. ARGV: owner, ttl ms, identity of the page read ("" none).
/// Returns {1, gen all, gen account} (held), {0, "", ""} (busy), {2, "", ""} (page changed).
const LEASE: &str = r#"
if redis.call('GETRANGE', KEYS[2], 0, 11) ~= ARGV[3] then return {2, '', ''} end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return {1, redis.call('GET', KEYS[3]) or '', redis.call('GET', KEYS[4]) or ''}
end
return {0, '', ''}
"#;

/// Writes the page unless a purge happened since the lease was taken, and releases the lease.
/// KEYS: page, gen:all, gen:acct, fill. ARGV: value, ttl ms, gen all, gen account, owner.
const WRITE: &str = r#"
local same = (redis.call('GET', KEYS[2]) or '') == ARGV[3]
  and (redis.call('GET', KEYS[3]) or '') == ARGV[4]
if same then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) end
if redis.call('GET', KEYS[4]) == ARGV[5] then redis.call('DEL', KEYS[4]) end
if same then return 1 end
return 0
"#;

/// One page read from L2.
pub struct Read {
    /// The entry, when there is one this build can serve and no purge came after its fill.
    pub entry: Option<Arc<Entry>>,
    /// What identifies the value read (empty: none), for [`L2::lease`].
    pub seen: Vec<u8>,
}

/// A fill lease held by this replica.
#[derive(Debug, Clone)]
pub struct Lease {
    owner: String,
    /// The generations as Redis held them when the lease was taken.
    gen_all: String,
    gen_account: String,
}

impl Lease {
    fn stamps(&self) -> Stamps {
        Stamps {
            all: generation(Some(&self.gen_all)),
            account: generation(Some(&self.gen_account)),
        }
    }
}

/// The answer to a lease request.
pub enum Leasing {
    Held(Lease),
    /// Another replica is filling the key.
    Busy,
    /// The page changed since it was read: read it again.
    Changed,
}

/// A generation as stored ("" or absent: 0). Values this build did not write never match.
fn generation(raw: Option<&str>) -> u64 {
    match raw {
        None | Some("") => 0,
        Some(s) => s.parse().unwrap_or(u64::MAX),
    }
}

/// A new generation: random, never 0 (the value of "no purge yet").
fn new_generation() -> String {
    fastrand::u64(1..).to_string()
}

struct Keys {
    page: String,
    fill: String,
    gen_all: String,
    gen_account: String,
}

/// The shared store.
pub struct L2 {
    redis: Arc<Redis>,
    lease: Script,
    write: Script,
    renew: Script,
    release: Script,
    channel: String,
    /// `redis.connect_timeout`: bounds making the purge subscription.
    connect_timeout: Duration,
}

impl L2 {
    pub fn new(redis: Arc<Redis>, connect_timeout: Duration) -> Self {
        Self {
            connect_timeout,
            channel: redis.key("purge"),
            redis,
            lease: Script::new(LEASE),
            write: Script::new(WRITE),
            renew: Script::new(crate::fleet::LEASE_RENEW),
            release: Script::new(crate::fleet::LEASE_RELEASE),
        }
    }

    pub fn redis(&self) -> &Arc<Redis> {
        &self.redis
    }

    pub fn connect_timeout(&self) -> Duration {
        self.connect_timeout
    }

    /// The pub/sub channel purges are announced on.
    pub fn channel(&self) -> &str {
        &self.channel
    }

    fn keys(&self, key: &Key) -> Keys {
        let kind = match key.kind {
            Kind::Page => 'p',
            Kind::Subscription => 's',
        };
        let id = format!("{kind}:{}:{}", key.account, key.index);
        Keys {
            page: self.redis.key(&format!("page:{id}")),
            fill: self.redis.key(&format!("fill:{id}")),
            gen_all: self.redis.key("gen:all"),
            gen_account: self.account_generation_key(&key.account),
        }
    }

    fn account_generation_key(&self, account: &str) -> String {
        self.redis.key(&format!("gen:acct:{account}"))
    }

    /// The page and both generations in one round trip.
    pub async fn read(&self, key: &Key) -> Result<Read, RedisError> {
        let k = self.keys(key);
        type Reply = (Option<Vec<u8>>, Option<String>, Option<String>);
        let (value, all, account): Reply = self
            .redis
            .call(|mut c| async move {
                redis::cmd("MGET")
                    .arg(&k.page)
                    .arg(&k.gen_all)
                    .arg(&k.gen_account)
                    .query_async(&mut c)
                    .await
            })
            .await?;
        let Some(value) = value else {
            return Ok(Read {
                entry: None,
                seen: Vec::new(),
            });
        };
        let seen = codec::identity(&value).to_vec();
        let current = Stamps {
            all: generation(all.as_deref()),
            account: generation(account.as_deref()),
        };
        let entry = match codec::decode(Bytes::from(value)) {
            Ok((stored, stamps)) if stamps == current => Entry::from_stored(stored).ok(),
            Ok(_) => None,  // purged since its fill
            Err(_) => None, // another layout: the next fill replaces it
        };
        Ok(Read {
            entry: entry.map(Arc::new),
            seen,
        })
    }

    /// Takes the fill lease of `key` unless another replica holds it or the page changed since
    /// it was read (`seen`).
    pub async fn lease(&self, key: &Key, seen: &[u8]) -> Result<Leasing, RedisError> {
        let k = self.keys(key);
        let owner = format!("{:032x}", fastrand::u128(..));
        let script = &self.lease;
        let mine = &owner;
        let (state, gen_all, gen_account): (i64, String, String) = self
            .redis
            .call(|mut c| async move {
                script
                    .key(&k.fill)
                    .key(&k.page)
                    .key(&k.gen_all)
                    .key(&k.gen_account)
                    .arg(mine)
                    .arg(millis(LEASE_TTL))
                    .arg(seen)
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        Ok(match state {
            1 => Leasing::Held(Lease {
                owner,
                gen_all,
                gen_account,
            }),
            2 => Leasing::Changed,
            _ => Leasing::Busy,
        })
    }

    /// Keeps a held lease alive; false when it is no longer this replica's.
    pub async fn renew(&self, key: &Key, lease: &Lease) -> Result<bool, RedisError> {
        let k = self.keys(key);
        let script = &self.renew;
        let renewed: i64 = self
            .redis
            .call(|mut c| async move {
                script
                    .key(&k.fill)
                    .arg(&lease.owner)
                    .arg(millis(LEASE_TTL))
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        Ok(renewed == 1)
    }

    /// What is left of the fill lease of `key` (None: no replica holds it).
    pub async fn lease_left(&self, key: &Key) -> Result<Option<Duration>, RedisError> {
        let k = self.keys(key);
        let ms: i64 = self
            .redis
            .call(|mut c| async move { redis::cmd("PTTL").arg(&k.fill).query_async(&mut c).await })
            .await?;
        Ok(match ms {
            -2 => None,
            // No expiry: not written by this build; treat it as freshly renewed.
            -1 => Some(LEASE_TTL),
            ms => Some(Duration::from_millis(ms.max(0) as u64)),
        })
    }

    /// Stores `entry` (fetched under `lease`) for as long as it is servable under `windows`,
    /// unless it is larger than `redis.l2_max_entry_bytes` or a purge came after the lease was
    /// taken; releases the lease either way. Returns whether the page was written.
    pub async fn write(
        &self,
        key: &Key,
        entry: &Entry,
        lease: &Lease,
        windows: &Windows,
    ) -> Result<bool, RedisError> {
        let keep = entry.keep_for(windows, super::clock::now());
        if entry.body().len() as u64 > self.redis.l2_max_entry_bytes() || millis(keep) == 0 {
            self.release(key, lease).await?;
            return Ok(false);
        }
        let value = codec::encode(&entry.to_stored(), lease.stamps());
        let k = self.keys(key);
        let script = &self.write;
        let written: i64 = self
            .redis
            .call(|mut c| async move {
                script
                    .key(&k.page)
                    .key(&k.gen_all)
                    .key(&k.gen_account)
                    .key(&k.fill)
                    .arg(value)
                    .arg(millis(keep))
                    .arg(&lease.gen_all)
                    .arg(&lease.gen_account)
                    .arg(&lease.owner)
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        Ok(written == 1)
    }

    /// Gives a lease back (compare-and-delete: only while it is still this replica's).
    pub async fn release(&self, key: &Key, lease: &Lease) -> Result<(), RedisError> {
        let k = self.keys(key);
        let script = &self.release;
        self.redis
            .call(|mut c| async move {
                script
                    .key(&k.fill)
                    .arg(&lease.owner)
                    .invoke_async::<i64>(&mut c)
                    .await
            })
            .await
            .map(|_| ())
    }

    /// Purges `account` (or everything) for the fleet: a new generation, so no page filled
    /// before is served again, and a message that empties every replica's L1 of it.
    pub async fn purge(&self, account: Option<&str>) -> Result<(), RedisError> {
        let (key, message) = match account {
            Some(a) => (self.account_generation_key(a), format!("a:{a}")),
            None => (self.redis.key("gen:all"), String::from("*")),
        };
        let channel = &self.channel;
        self.redis
            .call(|mut c| async move {
                redis::pipe()
                    .atomic()
                    .cmd("SET")
                    .arg(&key)
                    .arg(new_generation())
                    .arg("PX")
                    .arg(millis(GENERATION_TTL))
                    .ignore()
                    .cmd("PUBLISH")
                    .arg(channel)
                    .arg(&message)
                    .ignore()
                    .query_async::<()>(&mut c)
                    .await
            })
            .await
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// What a purge message asks a replica to drop from its L1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PurgeMessage {
    All,
    Account(String),
}

impl PurgeMessage {
    pub fn parse(payload: &[u8]) -> Option<Self> {
        match payload {
            b"*" => Some(Self::All),
            p => p
                .strip_prefix(b"a:")
                .and_then(|a| std::str::from_utf8(a).ok())
                .map(|a| Self::Account(a.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generations_and_purge_messages() {
        assert_eq!(generation(None), 0);
        assert_eq!(generation(Some("")), 0);
        assert_eq!(generation(Some("42")), 42);
        assert_eq!(generation(Some("x")), u64::MAX);
        assert!((0..1000).all(|_| generation(Some(&new_generation())) != 0));
        assert_eq!(PurgeMessage::parse(b"*"), Some(PurgeMessage::All));
        assert_eq!(
            PurgeMessage::parse(b"a:0402196254-00001"),
            Some(PurgeMessage::Account("0402196254-00001".into()))
        );
        assert_eq!(PurgeMessage::parse(b"other"), None);
    }
}
