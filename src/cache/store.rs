//! Where entries live in-process: the [`CacheStore`] seam and [`MemStore`], the default,
//! weighed by stored bytes and bounded by `cache.max_bytes`; [`L1`] puts the purge epoch next to
//! the store. The fleet's shared store (Redis) sits under it: [`super::l2`].

use super::{Entry, Key, Windows};
use parking_lot::RwLock;
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::hash::BuildHasher;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The calls the read path and the admin API make on a store.
pub trait CacheStore: Send + Sync + 'static {
    /// The entry under `key` unless its lifetime is over at `now`. Never waits: every cache hit
    /// runs it.
    fn get(&self, key: &Key, now: Instant) -> Option<Arc<Entry>>;
    /// Stores `entry` under `key`, replacing what was there.
    fn put(&self, key: Key, entry: Arc<Entry>) -> StoreFuture<'_, ()>;
    fn remove<'a>(&'a self, key: &'a Key) -> StoreFuture<'a, ()>;
    /// Drops every entry of `account`; returns how many.
    fn purge_account<'a>(&'a self, account: &'a str) -> StoreFuture<'a, u64>;
    fn purge_all(&self) -> StoreFuture<'_, u64>;
    /// `(entries, bytes)`, entries whose lifetime is over left out.
    fn size(&self) -> StoreFuture<'_, (u64, u64)>;
}

const SHARDS: usize = 16;

/// The in-process store: entries weighed by [`Entry::weight`], at most `max_bytes` in all, in 16
/// shards behind read-write locks (a hit takes one read lock and clones one `Arc`).
///
/// - **Eviction** is CLOCK (second chance), one victim per shard in turn: an entry read since
///   the hand last passed it is kept once more. Entries whose lifetime is over go first.
/// - **Lifetime**: every insert and every replace keeps the entry for its own lifetime, counted
///   from its own fetch time ([`Entry::keep_for`] at the windows the store was built with).
///   Freshness itself is decided at read time from the current windows; a later lengthening of
///   the windows cannot keep an entry longer than this (it is then fetched again sooner than the
///   new windows would need); a shortening takes effect at read time.
/// - An entry heavier than `max_bytes` is not kept.
pub struct MemStore {
    shards: Box<[RwLock<Shard>]>,
    hasher: foldhash::fast::RandomState,
    windows: Windows,
    max_bytes: u64,
    bytes: AtomicU64,
    /// The shard the next eviction looks in.
    hand: AtomicUsize,
}

#[derive(Default)]
struct Shard {
    slots: HashMap<Key, Slot, foldhash::fast::RandomState>,
    /// The clock: every key in `slots` once, in insertion order (a key removed from `slots`
    /// stays here until the hand or a compaction drops it; `gen` tells a re-inserted key's
    /// place from a stale one).
    ring: VecDeque<(Key, u64)>,
    next_gen: u64,
}

struct Slot {
    entry: Arc<Entry>,
    weight: u64,
    expires: Instant,
    gen: u64,
    referenced: AtomicBool,
}

impl Slot {
    fn live(&self, now: Instant) -> bool {
        self.expires > now
    }
}

impl MemStore {
    /// `windows` bound how long entries are kept (see the type's documentation).
    pub fn new(max_bytes: u64, windows: Windows) -> Self {
        Self::with_shards(max_bytes, windows, SHARDS)
    }

    fn with_shards(max_bytes: u64, windows: Windows, shards: usize) -> Self {
        Self {
            shards: (0..shards.max(1))
                .map(|_| RwLock::new(Shard::default()))
                .collect(),
            hasher: foldhash::fast::RandomState::default(),
            windows,
            max_bytes,
            bytes: AtomicU64::new(0),
            hand: AtomicUsize::new(0),
        }
    }

    fn shard(&self, key: &Key) -> &RwLock<Shard> {
        &self.shards[self.hasher.hash_one(key) as usize % self.shards.len()]
    }

    fn insert(&self, key: Key, entry: Arc<Entry>) {
        let weight = u64::from(entry.weight());
        if weight > self.max_bytes {
            self.delete(&key);
            return;
        }
        let now = Instant::now();
        // A lifetime too long to represent is kept as long as the store lives.
        let expires = now
            .checked_add(entry.keep_for(&self.windows, super::clock::at(now)))
            .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 86_400));
        {
            let mut shard = self.shard(&key).write();
            let shard = &mut *shard;
            let gen = match shard.slots.get(&key) {
                // A replace keeps the key's place on the clock.
                Some(old) => old.gen,
                None => {
                    shard.next_gen += 1;
                    shard.ring.push_back((key.clone(), shard.next_gen));
                    shard.next_gen
                }
            };
            let slot = Slot {
                entry,
                weight,
                expires,
                gen,
                referenced: AtomicBool::new(false),
            };
            if let Some(old) = shard.slots.insert(key, slot) {
                self.bytes.fetch_sub(old.weight, Ordering::Relaxed);
            }
            self.bytes.fetch_add(weight, Ordering::Relaxed);
            shard.compact();
        }
        self.evict_over_budget(now);
    }

    fn delete(&self, key: &Key) {
        if let Some(old) = self.shard(key).write().slots.remove(key) {
            self.bytes.fetch_sub(old.weight, Ordering::Relaxed);
        }
    }

    /// Evicts, one victim per shard in turn, until the store is within `max_bytes`. A shard
    /// whose entries were all read since the hand last passed is skipped (their marks cleared)
    /// while other shards have unread ones; after two rounds without a victim, read entries go
    /// too; after four, the store holds nothing more to evict.
    fn evict_over_budget(&self, now: Instant) {
        let shards = self.shards.len();
        let mut misses = 0;
        while self.bytes.load(Ordering::Relaxed) > self.max_bytes && misses < 4 * shards {
            let i = self.hand.fetch_add(1, Ordering::Relaxed) % shards;
            match self.shards[i].write().evict_one(now, misses >= 2 * shards) {
                Some(weight) => {
                    self.bytes.fetch_sub(weight, Ordering::Relaxed);
                    misses = 0;
                }
                None => misses += 1,
            }
        }
    }

    /// Removes the entries `drop` selects; returns how many.
    fn remove_where(&self, drop: impl Fn(&Key) -> bool) -> u64 {
        let mut removed = 0;
        for shard in self.shards.iter() {
            let mut shard = shard.write();
            let mut freed = 0;
            shard.slots.retain(|k, slot| {
                let gone = drop(k);
                if gone {
                    removed += 1;
                    freed += slot.weight;
                }
                !gone
            });
            shard.ring.retain(|(k, _)| !drop(k));
            self.bytes.fetch_sub(freed, Ordering::Relaxed);
        }
        removed
    }
}

impl Shard {
    /// Drops the next victim under the hand: the first entry whose lifetime is over or that was
    /// not read since the hand last passed it (any entry when `force`), clearing the marks it
    /// passes. Returns its weight; `None` after one turn of the clock without a victim.
    fn evict_one(&mut self, now: Instant, force: bool) -> Option<u64> {
        for _ in 0..self.ring.len() {
            let (key, gen) = self.ring.pop_front()?;
            let Some(slot) = self.slots.get(&key).filter(|s| s.gen == gen) else {
                continue;
            };
            if !force && slot.live(now) && slot.referenced.swap(false, Ordering::Relaxed) {
                self.ring.push_back((key, gen));
                continue;
            }
            return self.slots.remove(&key).map(|s| s.weight);
        }
        None
    }

    /// Keeps the ring within twice the live keys (removed keys leave stale places behind).
    fn compact(&mut self) {
        if self.ring.len() > 2 * self.slots.len() + 16 {
            let slots = &self.slots;
            self.ring
                .retain(|(k, gen)| slots.get(k).is_some_and(|s| s.gen == *gen));
        }
    }
}

impl CacheStore for MemStore {
    fn get(&self, key: &Key, now: Instant) -> Option<Arc<Entry>> {
        let shard = self.shard(key).read();
        let slot = shard.slots.get(key)?;
        if !slot.live(now) {
            return None;
        }
        // Written only when it changes: a hot entry's line is not dirtied on every hit.
        if !slot.referenced.load(Ordering::Relaxed) {
            slot.referenced.store(true, Ordering::Relaxed);
        }
        Some(slot.entry.clone())
    }

    fn put(&self, key: Key, entry: Arc<Entry>) -> StoreFuture<'_, ()> {
        self.insert(key, entry);
        Box::pin(std::future::ready(()))
    }

    fn remove<'a>(&'a self, key: &'a Key) -> StoreFuture<'a, ()> {
        self.delete(key);
        Box::pin(std::future::ready(()))
    }

    fn purge_account<'a>(&'a self, account: &'a str) -> StoreFuture<'a, u64> {
        let n = self.remove_where(|k| &*k.account == account);
        Box::pin(std::future::ready(n))
    }

    fn purge_all(&self) -> StoreFuture<'_, u64> {
        let n = self.remove_where(|_| true);
        Box::pin(std::future::ready(n))
    }

    fn size(&self) -> StoreFuture<'_, (u64, u64)> {
        let now = Instant::now();
        let mut entries = 0;
        let mut bytes = 0;
        for shard in self.shards.iter() {
            for slot in shard.read().slots.values().filter(|s| s.live(now)) {
                entries += 1;
                bytes += slot.weight;
            }
        }
        Box::pin(std::future::ready((entries, bytes)))
    }
}

/// The in-process store (L1) and its purge epoch: a fill that began before a purge does not
/// put what it fetched back into the store (it still answers its callers).
pub struct L1 {
    store: Arc<dyn CacheStore>,
    epoch: AtomicU64,
}

impl L1 {
    pub fn new(store: Arc<dyn CacheStore>) -> Self {
        Self {
            store,
            epoch: AtomicU64::new(0),
        }
    }

    pub fn store(&self) -> &Arc<dyn CacheStore> {
        &self.store
    }

    /// Taken when a fill begins; see [`L1::put_unless_purged`].
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Stores `entry` unless a purge came since `epoch`. A purge that lands while the entry goes
    /// in takes it out again.
    pub async fn put_unless_purged(&self, key: Key, entry: Arc<Entry>, epoch: u64) {
        if self.epoch() != epoch {
            return;
        }
        self.store.put(key.clone(), entry).await;
        if self.epoch() != epoch {
            self.store.remove(&key).await;
        }
    }

    pub async fn purge_account(&self, account: &str) -> u64 {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.store.purge_account(account).await
    }

    pub async fn purge_all(&self) -> u64 {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.store.purge_all().await
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{entry, page_key, windows};
    use super::super::{clock, Kind};
    use super::*;
    use bytes::Bytes;
    use http::StatusCode;

    #[tokio::test]
    async fn weight_stays_within_capacity() {
        let store = MemStore::new(64 * 1024, windows());
        let body = Bytes::from(vec![b'x'; 4000]);
        for i in 0..160u64 {
            let e = Arc::new(Entry::new(
                StatusCode::OK,
                crate::respond::JSON,
                body.clone(),
                clock::now(),
            ));
            store
                .put(
                    Key {
                        kind: Kind::Page,
                        account: "a".into(),
                        index: i,
                    },
                    e,
                )
                .await;
        }
        let (entries, bytes) = store.size().await;
        assert!(bytes <= 64 * 1024, "{bytes}");
        assert!(entries > 0 && entries < 160);
    }

    /// The reproduction of issue 13 item 4 (ttl 1 s, swr 1 s, sie 4 s, refreshed at 1.3, 2.6
    /// and 3.9 s): a replace keeps the new entry for its own lifetime, not the first insert's.
    #[tokio::test(start_paused = true)]
    async fn a_replaced_entry_lives_from_its_own_fetch_time() {
        let store = MemStore::new(
            1 << 20,
            Windows {
                ttl: Duration::from_secs(1),
                negative_ttl: Duration::from_secs(30),
                stale_while_revalidate: Duration::from_secs(1),
                stale_if_error: Duration::from_secs(4),
            },
        );
        store.put(page_key(), entry(200, b"{}")).await;
        for _ in 0..3 {
            tokio::time::advance(Duration::from_millis(1300)).await;
            store.put(page_key(), entry(200, b"{}")).await;
        }
        // Last fetched at 3.9 s: kept until 8.9 s, well past the first insert's 5 s.
        tokio::time::advance(Duration::from_millis(4900)).await;
        assert!(store.get(&page_key(), Instant::now()).is_some());
        tokio::time::advance(Duration::from_millis(100)).await;
        assert!(store.get(&page_key(), Instant::now()).is_none());
        // Negative answers live for their own fresh time only.
        store.put(page_key(), entry(400, b"{}")).await;
        tokio::time::advance(Duration::from_millis(29_999)).await;
        assert!(store.get(&page_key(), Instant::now()).is_some());
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(store.get(&page_key(), Instant::now()).is_none());
        assert_eq!(store.size().await, (0, 0));
    }

    /// A replace whose own lifetime is already over does not inherit the first entry's.
    #[tokio::test(start_paused = true)]
    async fn a_replace_whose_lifetime_is_over_is_not_kept() {
        let store = MemStore::new(1 << 20, windows());
        // Fetched at 0 with 300 s fresh + 3600 s stale-if-error, stored 3901 s later (as a
        // shared store may hold it): nothing of its lifetime is left.
        let old = entry(200, b"{\"v\":1}");
        tokio::time::advance(Duration::from_secs(3901)).await;
        store.put(page_key(), entry(200, b"{}")).await;
        assert!(store.get(&page_key(), Instant::now()).is_some());
        store.put(page_key(), old).await;
        assert!(
            store.get(&page_key(), Instant::now()).is_none(),
            "kept past its own lifetime"
        );
    }

    /// CLOCK (one shard, so the order is exact): entries read since the hand last passed them
    /// outlive those that were not; the bytes stay within the bound with any number of shards.
    #[tokio::test]
    async fn read_entries_outlive_unread_ones() {
        let weight = u64::from(entry(200, &[b'x'; 1000]).weight());
        let key = |i: u64| Key {
            kind: Kind::Page,
            account: "a".into(),
            index: i,
        };
        let store = MemStore::with_shards(weight * 64, windows(), 1);
        for i in 0..64 {
            store.put(key(i), entry(200, &[b'x'; 1000])).await;
        }
        for round in 0..3 {
            for i in 0..8 {
                assert!(
                    store.get(&key(i), Instant::now()).is_some(),
                    "read entry {i} evicted in round {round}"
                );
            }
            for i in 0..32 {
                let i = 64 + 32 * round + i;
                store.put(key(i), entry(200, &[b'x'; 1000])).await;
            }
        }
        assert_eq!(store.size().await, (64, weight * 64));
        for shards in [16, 3] {
            let store = MemStore::with_shards(weight * 64, windows(), shards);
            for i in 0..500 {
                store.put(key(i), entry(200, &[b'x'; 1000])).await;
                let (_, bytes) = store.size().await;
                assert!(bytes <= weight * 64, "{bytes}");
            }
            assert_eq!(store.size().await.0, 64);
        }
        // Heavier than the whole store: not kept.
        let big = MemStore::new(weight / 2, windows());
        big.put(key(0), entry(200, &[b'x'; 1000])).await;
        assert!(big.get(&key(0), Instant::now()).is_none());
    }

    #[tokio::test]
    async fn a_fill_that_began_before_a_purge_is_not_kept() {
        let l1 = L1::new(Arc::new(MemStore::new(1 << 20, windows())));
        let before = l1.epoch();
        l1.put_unless_purged(page_key(), entry(200, b"{}"), before)
            .await;
        assert!(l1.store().get(&page_key(), Instant::now()).is_some());
        assert_eq!(l1.purge_account("a").await, 1);
        // Began before the purge, lands after it: not stored.
        l1.put_unless_purged(page_key(), entry(200, b"{}"), before)
            .await;
        assert!(l1.store().get(&page_key(), Instant::now()).is_none());
        l1.put_unless_purged(page_key(), entry(200, b"{}"), l1.epoch())
            .await;
        assert!(l1.store().get(&page_key(), Instant::now()).is_some());
        assert_eq!(l1.purge_all().await, 1);
        assert!(l1.epoch() > before);
    }

    #[tokio::test]
    async fn purge_one_account() {
        let store = MemStore::new(1 << 20, windows());
        for (acct, i) in [("a", 0), ("a", 1), ("b", 0)] {
            store
                .put(
                    Key {
                        kind: Kind::Page,
                        account: acct.into(),
                        index: i,
                    },
                    entry(200, b"{}"),
                )
                .await;
        }
        assert_eq!(store.purge_account("a").await, 2);
        assert!(store
            .get(
                &Key {
                    kind: Kind::Page,
                    account: "b".into(),
                    index: 0
                },
                Instant::now()
            )
            .is_some());
        assert_eq!(store.purge_all().await, 1);
    }
}
