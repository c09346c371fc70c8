//! Where entries live in-process: the [`CacheStore`] seam and [`MokaStore`], the default,
//! weighed by stored bytes and bounded by `cache.max_bytes`; [`L1`] puts the purge epoch next to
//! the store. The fleet's shared store (Redis) sits under it: [`super::l2`].

use super::{Entry, Key, Windows};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The calls the read path and the admin API make on a store.
pub trait CacheStore: Send + Sync + 'static {
    fn get<'a>(&'a self, key: &'a Key) -> StoreFuture<'a, Option<Arc<Entry>>>;
    /// Stores `entry` under `key`, replacing what was there.
    fn put(&self, key: Key, entry: Arc<Entry>) -> StoreFuture<'_, ()>;
    fn remove<'a>(&'a self, key: &'a Key) -> StoreFuture<'a, ()>;
    /// Drops every entry of `account`; returns how many.
    fn purge_account<'a>(&'a self, account: &'a str) -> StoreFuture<'a, u64>;
    fn purge_all(&self) -> StoreFuture<'_, u64>;
    /// `(entries, bytes)` after pending maintenance.
    fn size(&self) -> StoreFuture<'_, (u64, u64)>;
}

/// Every insert and every replace keeps the entry for its own lifetime, counted from its own
/// fetch time. (moka's default for a replace keeps the first insert's deadline: a page refreshed
/// in the background would vanish that long after its first fetch, taking its stale copy.)
///
/// The lifetime comes from the windows the store was built with: freshness itself is decided
/// at read time from the current windows, but a later lengthening of the windows cannot keep an
/// entry longer than this (it is then fetched again sooner than the new windows would need);
/// a shortening takes effect at read time.
pub(super) struct EntryExpiry {
    pub(super) windows: Windows,
}

impl moka::Expiry<Key, Arc<Entry>> for EntryExpiry {
    fn expire_after_create(
        &self,
        _k: &Key,
        v: &Arc<Entry>,
        _at: std::time::Instant,
    ) -> Option<Duration> {
        Some(v.keep_for(&self.windows, super::clock::now()))
    }

    fn expire_after_update(
        &self,
        _k: &Key,
        v: &Arc<Entry>,
        _at: std::time::Instant,
        _until_now: Option<Duration>,
    ) -> Option<Duration> {
        Some(v.keep_for(&self.windows, super::clock::now()))
    }
}

pub struct MokaStore {
    cache: moka::future::Cache<Key, Arc<Entry>>,
}

impl MokaStore {
    /// `windows` bound how long entries are kept (see [`EntryExpiry`]).
    pub fn new(max_bytes: u64, windows: Windows) -> Self {
        let cache = moka::future::Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|_k: &Key, v: &Arc<Entry>| v.weight())
            .expire_after(EntryExpiry { windows })
            .build();
        Self { cache }
    }
}

impl CacheStore for MokaStore {
    fn get<'a>(&'a self, key: &'a Key) -> StoreFuture<'a, Option<Arc<Entry>>> {
        Box::pin(self.cache.get(key))
    }

    fn put(&self, key: Key, entry: Arc<Entry>) -> StoreFuture<'_, ()> {
        Box::pin(self.cache.insert(key, entry))
    }

    fn remove<'a>(&'a self, key: &'a Key) -> StoreFuture<'a, ()> {
        Box::pin(self.cache.invalidate(key))
    }

    fn purge_account<'a>(&'a self, account: &'a str) -> StoreFuture<'a, u64> {
        Box::pin(async move {
            let keys: Vec<Arc<Key>> = self
                .cache
                .iter()
                .filter(|(k, _)| &*k.account == account)
                .map(|(k, _)| k)
                .collect();
            for k in &keys {
                self.cache.invalidate(k.as_ref()).await;
            }
            self.cache.run_pending_tasks().await;
            keys.len() as u64
        })
    }

    fn purge_all(&self) -> StoreFuture<'_, u64> {
        Box::pin(async move {
            let n = self.cache.iter().count() as u64;
            self.cache.invalidate_all();
            self.cache.run_pending_tasks().await;
            n
        })
    }

    fn size(&self) -> StoreFuture<'_, (u64, u64)> {
        Box::pin(async move {
            self.cache.run_pending_tasks().await;
            (self.cache.entry_count(), self.cache.weighted_size())
        })
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
        let store = MokaStore::new(64 * 1024, windows());
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
    async fn a_replaced_entry_expires_from_its_own_fetch_time() {
        use moka::Expiry;
        let expiry = EntryExpiry {
            windows: Windows {
                ttl: Duration::from_secs(1),
                negative_ttl: Duration::from_secs(30),
                stale_while_revalidate: Duration::from_secs(1),
                stale_if_error: Duration::from_secs(4),
            },
        };
        let at = std::time::Instant::now();
        let first = entry(200, b"{}");
        assert_eq!(
            expiry.expire_after_create(&page_key(), &first, at),
            Some(Duration::from_secs(5))
        );
        for refreshed in [1300, 2600, 3900] {
            tokio::time::advance(Duration::from_millis(1300)).await;
            let now = entry(200, b"{}");
            // moka passes what is left of the first insert's 5 s.
            let left = Duration::from_millis(5000 - refreshed);
            assert_eq!(
                expiry.expire_after_update(&page_key(), &now, at, Some(left)),
                Some(Duration::from_secs(5)),
                "refreshed at {refreshed} ms"
            );
        }
        // Counted from the fetch, not from the insert: fetched at 3.9 s, stored at 4.4 s.
        let fetched = entry(200, b"{}");
        tokio::time::advance(Duration::from_millis(500)).await;
        assert_eq!(
            expiry.expire_after_update(&page_key(), &fetched, at, Some(Duration::ZERO)),
            Some(Duration::from_millis(4500))
        );
        // Negative answers live for their own fresh time only.
        let negative = entry(400, b"{}");
        assert_eq!(
            expiry.expire_after_update(&page_key(), &negative, at, Some(Duration::from_secs(1))),
            Some(Duration::from_secs(30))
        );
    }

    /// Through moka itself (whose clock is real time, so the test cannot wait for a deadline):
    /// a replace whose own lifetime is already over must not inherit the first entry's.
    #[tokio::test(start_paused = true)]
    async fn moka_applies_the_replacing_entrys_lifetime() {
        let store = MokaStore::new(1 << 20, windows());
        // Fetched at 0 with 300 s fresh + 3600 s stale-if-error, stored 3901 s later (as a
        // shared store may hold it): nothing of its lifetime is left.
        let old = entry(200, b"{\"v\":1}");
        tokio::time::advance(Duration::from_secs(3901)).await;
        store.put(page_key(), entry(200, b"{}")).await;
        assert!(store.get(&page_key()).await.is_some());
        store.put(page_key(), old).await;
        assert!(
            store.get(&page_key()).await.is_none(),
            "kept past its own lifetime"
        );
    }

    #[tokio::test]
    async fn a_fill_that_began_before_a_purge_is_not_kept() {
        let l1 = L1::new(Arc::new(MokaStore::new(1 << 20, windows())));
        let before = l1.epoch();
        l1.put_unless_purged(page_key(), entry(200, b"{}"), before)
            .await;
        assert!(l1.store().get(&page_key()).await.is_some());
        assert_eq!(l1.purge_account("a").await, 1);
        // Began before the purge, lands after it: not stored.
        l1.put_unless_purged(page_key(), entry(200, b"{}"), before)
            .await;
        assert!(l1.store().get(&page_key()).await.is_none());
        l1.put_unless_purged(page_key(), entry(200, b"{}"), l1.epoch())
            .await;
        assert!(l1.store().get(&page_key()).await.is_some());
        assert_eq!(l1.purge_all().await, 1);
        assert!(l1.epoch() > before);
    }

    #[tokio::test]
    async fn purge_one_account() {
        let store = MokaStore::new(1 << 20, windows());
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
            .get(&Key {
                kind: Kind::Page,
                account: "b".into(),
                index: 0
            })
            .await
            .is_some());
        assert_eq!(store.purge_all().await, 1);
    }
}
