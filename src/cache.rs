//! The page cache (SPEC §6): stored upstream answers with their gzip form and ETag, freshness
//! windows counted from the fetch time, and coalescing of concurrent misses.
//!
//! [`CacheStore`] is the seam for a shared L2 store; [`MokaStore`] is the in-process default,
//! weighed by stored bytes and bounded by `cache.max_bytes`. [`page::PageIndex`] is what the
//! whole-account endpoints need from a stored page, found once per entry.

pub mod page;

use crate::error::GatewayError;
use bytes::Bytes;
use flate2::write::GzEncoder;
use http::{HeaderValue, StatusCode};
use std::collections::HashMap;
use std::future::Future;
use std::io::Write;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// What a cached answer is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Page,
    Subscription,
}

/// `(route, account, numeric index)`; subscriptions use index 0.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key {
    pub kind: Kind,
    pub account: Arc<str>,
    pub index: u64,
}

/// Bodies below this are not worth compressing.
const GZIP_MIN: usize = 256;
/// Bookkeeping bytes counted per entry on top of the bodies.
const ENTRY_OVERHEAD: usize = 256;

/// One stored upstream answer. Bodies are `Bytes`: a hit clones a pointer, never the bytes.
#[derive(Debug)]
pub struct Entry {
    pub status: StatusCode,
    pub content_type: HeaderValue,
    pub body: Bytes,
    pub gzip: Option<Bytes>,
    pub etag: HeaderValue,
    pub fetched_at: Instant,
    /// `ttl` for answers, `negative_ttl` for upstream 4xx.
    pub fresh_for: Duration,
    /// One background refresh at a time while stale.
    refreshing: AtomicBool,
    /// A 200 license page read once, the first time a walk or a device lookup needs it
    /// (`None` inside when the page is not in the documented shape).
    page: OnceLock<Option<Arc<page::PageIndex>>>,
}

/// Where an entry stands at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    Fresh,
    /// Stale within `stale_while_revalidate`: serve it and refresh in the background.
    Revalidate,
    /// Stale beyond that: fetch; serve it only if the upstream fails within `stale_if_error`.
    Stale,
}

#[derive(Debug, Clone, Copy)]
pub struct Windows {
    pub stale_while_revalidate: Duration,
    pub stale_if_error: Duration,
}

impl Entry {
    pub fn new(
        status: StatusCode,
        content_type: HeaderValue,
        body: Bytes,
        fetched_at: Instant,
        fresh_for: Duration,
    ) -> Self {
        let digest = ring::digest::digest(&ring::digest::SHA256, &body);
        let hex: String = digest.as_ref()[..12]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let etag = HeaderValue::from_str(&format!("\"{hex}\""))
            .unwrap_or(HeaderValue::from_static("\"0\""));
        Self {
            status,
            content_type,
            gzip: gzip(&body),
            // An upstream body may be a slice of a larger read buffer: keep an exact-size copy
            // so the cache holds what its weigher counts, not the buffer behind it.
            body: Bytes::copy_from_slice(&body),
            etag,
            fetched_at,
            fresh_for,
            refreshing: AtomicBool::new(false),
            page: OnceLock::new(),
        }
    }

    /// The page's index for walks and lookups, parsed on first use only.
    pub fn page_index(&self) -> Option<&Arc<page::PageIndex>> {
        self.page
            .get_or_init(|| page::PageIndex::parse(&self.body).map(Arc::new))
            .as_ref()
    }

    pub fn is_negative(&self) -> bool {
        !self.status.is_success()
    }

    pub fn age(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.fetched_at)
    }

    /// Seconds of freshness left (the `max-age` to send).
    pub fn fresh_left(&self, now: Instant) -> u64 {
        self.fresh_for.saturating_sub(self.age(now)).as_secs()
    }

    /// Both stale windows count from the moment the entry became stale (RFC 5861). Negative
    /// answers are never served stale.
    pub fn freshness(&self, now: Instant, w: &Windows) -> Freshness {
        let age = self.age(now);
        if age < self.fresh_for {
            Freshness::Fresh
        } else if !self.is_negative() && age - self.fresh_for < w.stale_while_revalidate {
            Freshness::Revalidate
        } else {
            Freshness::Stale
        }
    }

    pub fn usable_on_error(&self, now: Instant, w: &Windows) -> bool {
        !self.is_negative() && self.age(now).saturating_sub(self.fresh_for) < w.stale_if_error
    }

    /// The claim of the one caller that should start the background refresh. Dropping the
    /// claim without [`RefreshClaim::refreshed`] (a failed refresh, or a task that died or was
    /// dropped) lets the next request start another.
    pub fn claim_refresh(self: &Arc<Self>) -> Option<RefreshClaim> {
        self.refreshing
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
            .then(|| RefreshClaim {
                entry: self.clone(),
                replaced: false,
            })
    }

    /// The weight counted against `cache.max_bytes`: the bodies, bookkeeping, and room for the
    /// page index a walk may add.
    pub fn weight(&self) -> u32 {
        let index = if self.status.is_success() {
            page::PageIndex::extra_bytes_bound(self.body.len())
        } else {
            0
        };
        let n = self.body.len() + self.gzip.as_ref().map_or(0, Bytes::len) + ENTRY_OVERHEAD + index;
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    /// How long the store should keep this entry from now: its fresh time plus the longer
    /// stale window, counted from its own fetch time (negative answers are never served stale).
    pub fn keep_for(&self, w: &Windows, now: Instant) -> Duration {
        let keep = if self.is_negative() {
            Duration::ZERO
        } else {
            w.stale_while_revalidate.max(w.stale_if_error)
        };
        (self.fresh_for + keep).saturating_sub(self.age(now))
    }
}

/// Held by the one background refresh of a stale entry; see [`Entry::claim_refresh`].
#[derive(Debug)]
pub struct RefreshClaim {
    entry: Arc<Entry>,
    replaced: bool,
}

impl RefreshClaim {
    /// The refresh stored a new entry: this one stays claimed, so requests still holding it
    /// start no second refresh.
    pub fn refreshed(mut self) {
        self.replaced = true;
    }
}

impl Drop for RefreshClaim {
    fn drop(&mut self) {
        if !self.replaced {
            self.entry.refreshing.store(false, Ordering::Release);
        }
    }
}

/// Compressed once, at insert; kept only if smaller.
fn gzip(body: &[u8]) -> Option<Bytes> {
    gzip_parts(&[body])
}

/// Gzip of the concatenated parts (level 6), or `None` when small or not smaller.
pub fn gzip_parts(parts: &[&[u8]]) -> Option<Bytes> {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    if len < GZIP_MIN {
        return None;
    }
    let mut enc = GzEncoder::new(Vec::with_capacity(len / 4), flate2::Compression::new(6));
    for p in parts {
        enc.write_all(p).ok()?;
    }
    let out = enc.finish().ok()?;
    (out.len() < len).then(|| Bytes::from(out.into_boxed_slice()))
}

pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Where entries live. The in-process moka store is the default; a shared store (Redis L2)
/// implements the same five calls.
pub trait CacheStore: Send + Sync + 'static {
    fn get<'a>(&'a self, key: &'a Key) -> StoreFuture<'a, Option<Arc<Entry>>>;
    fn insert(&self, key: Key, entry: Arc<Entry>) -> StoreFuture<'_, ()>;
    /// Drops every entry of `account`; returns how many.
    fn purge_account<'a>(&'a self, account: &'a str) -> StoreFuture<'a, u64>;
    fn purge_all(&self) -> StoreFuture<'_, u64>;
    /// `(entries, bytes)` after pending maintenance.
    fn size(&self) -> StoreFuture<'_, (u64, u64)>;
}

/// Every insert and every replace keeps the entry for its own lifetime, counted from its own
/// fetch time. (moka's default for a replace keeps the first insert's deadline: a page refreshed
/// in the background would vanish that long after its first fetch, taking its stale copy.)
struct EntryExpiry {
    windows: Windows,
}

impl moka::Expiry<Key, Arc<Entry>> for EntryExpiry {
    fn expire_after_create(
        &self,
        _k: &Key,
        v: &Arc<Entry>,
        _at: std::time::Instant,
    ) -> Option<Duration> {
        Some(v.keep_for(&self.windows, Instant::now()))
    }

    fn expire_after_update(
        &self,
        _k: &Key,
        v: &Arc<Entry>,
        _at: std::time::Instant,
        _until_now: Option<Duration>,
    ) -> Option<Duration> {
        Some(v.keep_for(&self.windows, Instant::now()))
    }
}

pub struct MokaStore {
    cache: moka::future::Cache<Key, Arc<Entry>>,
}

impl MokaStore {
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

    fn insert(&self, key: Key, entry: Arc<Entry>) -> StoreFuture<'_, ()> {
        Box::pin(self.cache.insert(key, entry))
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

type Outcome = Option<Result<Arc<Entry>, GatewayError>>;

/// The cache as the request path sees it: a store plus coalescing of concurrent fetches.
pub struct PageCache {
    pub store: Arc<dyn CacheStore>,
    pub windows: Windows,
    inflight: Mutex<HashMap<Key, watch::Receiver<Outcome>>>,
    /// Gzip forms of documents assembled from cached pages (whole-account walks), by ETag:
    /// compressed once per version, bounded to an eighth of `cache.max_bytes`.
    pub derived_gzip: moka::future::Cache<String, Bytes>,
}

/// How a fetch was joined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Join {
    Leader,
    Coalesced,
}

impl PageCache {
    pub fn new(
        store: Arc<dyn CacheStore>,
        windows: Windows,
        max_bytes: u64,
        ttl: Duration,
    ) -> Self {
        let derived_gzip = moka::future::Cache::builder()
            .max_capacity((max_bytes / 8).max(1 << 20))
            .weigher(|k: &String, v: &Bytes| u32::try_from(k.len() + v.len()).unwrap_or(u32::MAX))
            .time_to_live(ttl + windows.stale_while_revalidate)
            .build();
        Self {
            store,
            windows,
            inflight: Mutex::new(HashMap::new()),
            derived_gzip,
        }
    }

    /// Runs `fetch` once per key however many callers ask at the same time. The fetch runs in its
    /// own task (a caller that goes away does not cancel it); its entry is stored before anyone
    /// is answered; every caller waits at most until its own `deadline`.
    pub async fn fetch<F>(
        self: &Arc<Self>,
        key: Key,
        deadline: Instant,
        fetch: F,
    ) -> (Result<Arc<Entry>, GatewayError>, Join)
    where
        F: Future<Output = Result<Arc<Entry>, GatewayError>> + Send + 'static,
    {
        let (mut rx, join) = {
            let mut map = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
            match map.get(&key) {
                Some(rx) => (rx.clone(), Join::Coalesced),
                None => {
                    let (tx, rx) = watch::channel(None);
                    map.insert(key.clone(), rx.clone());
                    let flight = Flight {
                        cache: self.clone(),
                        key,
                        rx: rx.clone(),
                        tx: Some(tx),
                    };
                    tokio::spawn(async move {
                        let result = fetch.await;
                        if let Ok(entry) = &result {
                            flight
                                .cache
                                .store
                                .insert(flight.key.clone(), entry.clone())
                                .await;
                        }
                        flight.land(result);
                    });
                    (rx, Join::Leader)
                }
            }
        };
        let waited = tokio::time::timeout_at(deadline, rx.wait_for(Option::is_some)).await;
        let result = match waited {
            Ok(Ok(v)) => v.clone().unwrap_or(Err(GatewayError::UpstreamTimeout)),
            // Not expected: a `Flight` always answers before its channel closes.
            Ok(Err(_)) => Err(fetch_died()),
            Err(_) => Err(GatewayError::UpstreamTimeout),
        };
        (result, join)
    }
}

fn fetch_died() -> GatewayError {
    GatewayError::BadGateway("upstream fetch failed".into())
}

/// One fetch in the in-flight map. However its task ends (an answer, a panic, or the runtime
/// dropping it) the key leaves the map and the waiters get an answer, so the next request for
/// the key starts a fresh fetch instead of waiting on a dead one.
struct Flight {
    cache: Arc<PageCache>,
    key: Key,
    rx: watch::Receiver<Outcome>,
    tx: Option<watch::Sender<Outcome>>,
}

impl Flight {
    fn land(mut self, result: Result<Arc<Entry>, GatewayError>) {
        self.finish(result);
    }

    fn finish(&mut self, result: Result<Arc<Entry>, GatewayError>) {
        let Some(tx) = self.tx.take() else { return };
        {
            let mut map = self
                .cache
                .inflight
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if map
                .get(&self.key)
                .is_some_and(|rx| rx.same_channel(&self.rx))
            {
                map.remove(&self.key);
            }
        }
        tx.send_replace(Some(result));
    }
}

impl Drop for Flight {
    fn drop(&mut self) {
        if self.tx.is_some() {
            if std::thread::panicking() {
                tracing::error!("an upstream fetch panicked; its waiters get 502");
            } else {
                // The runtime is shutting down and dropped the task.
                tracing::debug!("an upstream fetch was dropped before it answered");
            }
            self.finish(Err(fetch_died()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn windows() -> Windows {
        Windows {
            stale_while_revalidate: Duration::from_secs(60),
            stale_if_error: Duration::from_secs(3600),
        }
    }

    fn entry(status: u16, body: &'static [u8], fresh: u64) -> Arc<Entry> {
        Arc::new(Entry::new(
            StatusCode::from_u16(status).unwrap(),
            crate::respond::JSON,
            Bytes::from_static(body),
            Instant::now(),
            Duration::from_secs(fresh),
        ))
    }

    #[tokio::test(start_paused = true)]
    async fn freshness_windows() {
        let w = windows();
        let e = entry(200, b"{}", 300);
        assert_eq!(e.freshness(Instant::now(), &w), Freshness::Fresh);
        tokio::time::advance(Duration::from_secs(300)).await;
        assert_eq!(e.freshness(Instant::now(), &w), Freshness::Revalidate);
        assert_eq!(e.fresh_left(Instant::now()), 0);
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(e.freshness(Instant::now(), &w), Freshness::Stale);
        assert!(e.usable_on_error(Instant::now(), &w));
        tokio::time::advance(Duration::from_secs(3540)).await;
        assert!(!e.usable_on_error(Instant::now(), &w));
        let neg = entry(400, b"{}", 30);
        tokio::time::advance(Duration::from_secs(30)).await;
        assert_eq!(neg.freshness(Instant::now(), &w), Freshness::Stale);
        assert!(!neg.usable_on_error(Instant::now(), &w));
    }

    #[test]
    fn gzip_round_trip_and_etag() {
        let body: Vec<u8> = (0..2000)
            .flat_map(|i| format!("{{\"deviceId\":\"{i}\"}},").into_bytes())
            .collect();
        let e = Entry::new(
            StatusCode::OK,
            crate::respond::JSON,
            Bytes::from(body.clone()),
            Instant::now(),
            Duration::from_secs(1),
        );
        let gz = e.gzip.clone().unwrap();
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&gz[..]), &mut out).unwrap();
        assert_eq!(out, body);
        assert!(e.etag.to_str().unwrap().starts_with('"'));
        assert!(Entry::new(
            StatusCode::OK,
            crate::respond::JSON,
            Bytes::from_static(b"{}"),
            Instant::now(),
            Duration::ZERO
        )
        .gzip
        .is_none());
    }

    #[tokio::test]
    async fn weight_stays_within_capacity() {
        let store = MokaStore::new(64 * 1024, windows());
        let body = Bytes::from(vec![b'x'; 4000]);
        for i in 0..160u64 {
            let e = Arc::new(Entry::new(
                StatusCode::OK,
                crate::respond::JSON,
                body.clone(),
                Instant::now(),
                Duration::from_secs(60),
            ));
            store
                .insert(
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

    fn page_key() -> Key {
        Key {
            kind: Kind::Page,
            account: "a".into(),
            index: 0,
        }
    }

    /// The reproduction of issue 13 item 4 (ttl 1 s, swr 1 s, sie 4 s, refreshed at 1.3, 2.6
    /// and 3.9 s): a replace keeps the new entry for its own lifetime, not the first insert's.
    #[tokio::test(start_paused = true)]
    async fn a_replaced_entry_expires_from_its_own_fetch_time() {
        use moka::Expiry;
        let expiry = EntryExpiry {
            windows: Windows {
                stale_while_revalidate: Duration::from_secs(1),
                stale_if_error: Duration::from_secs(4),
            },
        };
        let at = std::time::Instant::now();
        let first = entry(200, b"{}", 1);
        assert_eq!(
            expiry.expire_after_create(&page_key(), &first, at),
            Some(Duration::from_secs(5))
        );
        for refreshed in [1300, 2600, 3900] {
            tokio::time::advance(Duration::from_millis(1300)).await;
            let now = entry(200, b"{}", 1);
            // moka passes what is left of the first insert's 5 s.
            let left = Duration::from_millis(5000 - refreshed);
            assert_eq!(
                expiry.expire_after_update(&page_key(), &now, at, Some(left)),
                Some(Duration::from_secs(5)),
                "refreshed at {refreshed} ms"
            );
        }
        // Counted from the fetch, not from the insert: fetched at 3.9 s, stored at 4.4 s.
        let fetched = entry(200, b"{}", 1);
        tokio::time::advance(Duration::from_millis(500)).await;
        assert_eq!(
            expiry.expire_after_update(&page_key(), &fetched, at, Some(Duration::ZERO)),
            Some(Duration::from_millis(4500))
        );
        // Negative answers live for their own fresh time only.
        let negative = entry(400, b"{}", 30);
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
        let old = entry(200, b"{\"v\":1}", 300);
        tokio::time::advance(Duration::from_secs(3901)).await;
        store.insert(page_key(), entry(200, b"{}", 300)).await;
        assert!(store.get(&page_key()).await.is_some());
        store.insert(page_key(), old).await;
        assert!(
            store.get(&page_key()).await.is_none(),
            "kept past its own lifetime"
        );
    }

    #[tokio::test]
    async fn a_refresh_claim_is_given_back_unless_the_entry_was_replaced() {
        let e = entry(200, b"{}", 1);
        let claim = e.claim_refresh().expect("first claim");
        assert!(e.claim_refresh().is_none(), "one refresh at a time");
        drop(claim);
        // A refresh task that fails, panics or is dropped gives the claim back.
        let task = tokio::spawn({
            let claim = e.claim_refresh().expect("claimed again");
            async move {
                let _claim = claim;
                panic!("refresh task dies");
            }
        });
        assert!(task.await.unwrap_err().is_panic());
        let claim = e.claim_refresh().expect("given back by the dead task");
        claim.refreshed();
        assert!(
            e.claim_refresh().is_none(),
            "a replaced entry stays claimed"
        );
    }

    #[tokio::test]
    async fn a_fetch_that_panics_answers_its_waiters_and_frees_the_key() {
        let cache = Arc::new(PageCache::new(
            Arc::new(MokaStore::new(1 << 20, windows())),
            windows(),
            1 << 20,
            Duration::from_secs(60),
        ));
        let deadline = Instant::now() + Duration::from_secs(5);
        let (gate_tx, gate_rx) = tokio::sync::oneshot::channel::<()>();
        let leader = tokio::spawn({
            let cache = cache.clone();
            async move {
                cache
                    .fetch(page_key(), deadline, async move {
                        let _ = gate_rx.await;
                        panic!("the budget panicked");
                    })
                    .await
            }
        });
        tokio::task::yield_now().await;
        let waiter = tokio::spawn({
            let cache = cache.clone();
            async move {
                cache
                    .fetch(page_key(), deadline, async { unreachable!("coalesced") })
                    .await
            }
        });
        tokio::task::yield_now().await;
        gate_tx.send(()).unwrap();
        for (task, join) in [(leader, Join::Leader), (waiter, Join::Coalesced)] {
            let (result, joined) = task.await.unwrap();
            assert_eq!(joined, join);
            assert_eq!(result.unwrap_err().error_code(), "GW_BAD_GATEWAY");
        }
        // The next request for the key fetches again.
        let (result, join) = cache
            .fetch(page_key(), deadline, async { Ok(entry(200, b"{}", 60)) })
            .await;
        assert_eq!(join, Join::Leader);
        assert!(result.is_ok());
        assert!(cache.store.get(&page_key()).await.is_some());
    }

    #[tokio::test]
    async fn purge_one_account() {
        let store = MokaStore::new(1 << 20, windows());
        for (acct, i) in [("a", 0), ("a", 1), ("b", 0)] {
            store
                .insert(
                    Key {
                        kind: Kind::Page,
                        account: acct.into(),
                        index: i,
                    },
                    entry(200, b"{}", 60),
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
