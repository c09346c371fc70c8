//! The page cache (SPEC §6): stored upstream answers with their gzip form and ETag, freshness
//! decided at read time from each answer's fetch time and the current windows, and coalescing
//! of concurrent misses.
//!
//! - [`entry`]: what is stored ([`StoredEntry`]: versioned, serializable [`EntryMeta`] and the
//!   bodies) and the in-process extras next to it; freshness against [`Windows`].
//! - [`clock`]: the wall clock fetch times are written in, following tokio's (paused) time.
//! - [`store`]: the [`CacheStore`] seam for a shared L2 store and [`MokaStore`], the default.
//! - [`flight`]: [`SingleFlight`], one fetch per key at a time.
//! - [`page`]: what the whole-account endpoints need from a stored page, found once per entry.

pub mod clock;
pub mod entry;
pub mod flight;
pub mod page;
pub mod store;

pub use entry::{
    gzip_parts, Entry, EntryMeta, Freshness, RefreshClaim, StoredEntry, UnreadableEntry, Windows,
    META_VERSION,
};
pub use flight::{Join, Missed, SingleFlight};
pub use store::{CacheStore, MokaStore, StoreFuture};

use crate::error::GatewayError;
use bytes::Bytes;
use http::HeaderValue;
use std::future::Future;
use std::sync::Arc;
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

type Fetched = Result<Arc<Entry>, GatewayError>;

/// The cache as the request path sees it: a store plus coalescing of concurrent fetches.
pub struct PageCache {
    store: Arc<dyn CacheStore>,
    flight: SingleFlight<Key, Fetched>,
    /// Gzip forms of documents assembled from cached pages (whole-account walks), by ETag:
    /// compressed once per version, bounded to an eighth of `cache.max_bytes`.
    derived_gzip: moka::future::Cache<String, Bytes>,
}

impl PageCache {
    /// The stored entry for `key`, if any (fresh or not: the caller judges).
    pub async fn get(&self, key: &Key) -> Option<Arc<Entry>> {
        self.store.get(key).await
    }

    /// Drops every entry of `account`; returns how many.
    pub async fn purge_account(&self, account: &str) -> u64 {
        self.store.purge_account(account).await
    }

    /// Drops everything; returns how many entries there were.
    pub async fn purge_all(&self) -> u64 {
        self.store.purge_all().await
    }

    /// `(entries, bytes)` after pending maintenance.
    pub async fn size(&self) -> (u64, u64) {
        self.store.size().await
    }

    /// `windows` bound how long derived document forms are kept.
    pub fn new(store: Arc<dyn CacheStore>, max_bytes: u64, windows: Windows) -> Self {
        let derived_gzip = moka::future::Cache::builder()
            .max_capacity((max_bytes / 8).max(1 << 20))
            .weigher(|k: &String, v: &Bytes| u32::try_from(k.len() + v.len()).unwrap_or(u32::MAX))
            .time_to_live(windows.ttl + windows.stale_while_revalidate)
            .build();
        Self {
            store,
            flight: SingleFlight::new(),
            derived_gzip,
        }
    }

    /// Runs `fetch` once per key however many callers ask at the same time (see [`flight`]);
    /// its entry is stored before anyone is answered; every caller waits at most until its own
    /// `deadline`.
    pub async fn fetch<F>(&self, key: Key, deadline: Instant, fetch: F) -> (Fetched, Join)
    where
        F: Future<Output = Fetched> + Send + 'static,
    {
        let store = self.store.clone();
        let stored_key = key.clone();
        let fetch_and_store = async move {
            let result = fetch.await;
            if let Ok(entry) = &result {
                store.put(stored_key, entry.clone()).await;
            }
            result
        };
        let (result, join) = self.flight.run(key, deadline, fetch_and_store).await;
        let result = match result {
            Ok(fetched) => fetched,
            Err(Missed::Deadline) => Err(GatewayError::UpstreamTimeout),
            Err(Missed::Died) => Err(GatewayError::BadGateway("upstream fetch failed".into())),
        };
        (result, join)
    }

    /// The gzip form of a document assembled from `parts`, compressed once per version (`etag`)
    /// off the async threads; concurrent requests for the same version wait for the one
    /// compression.
    pub async fn document_gzip(&self, etag: &HeaderValue, parts: &[Bytes]) -> Option<Bytes> {
        let key = etag.to_str().ok()?.to_string();
        let parts: Vec<Bytes> = parts.to_vec();
        self.derived_gzip
            .optionally_get_with(key, async move {
                tokio::task::spawn_blocking(move || {
                    let slices: Vec<&[u8]> = parts.iter().map(|b| b.as_ref()).collect();
                    gzip_parts(&slices)
                })
                .await
                .ok()
                .flatten()
            })
            .await
    }
}

/// Fixtures for the cache's unit tests.
#[cfg(test)]
pub(crate) mod fixtures {
    use super::*;
    use http::StatusCode;
    use std::time::Duration;

    /// ttl 300 s, negative_ttl 30 s, swr 60 s, sie 3600 s.
    pub fn windows() -> Windows {
        Windows {
            ttl: Duration::from_secs(300),
            negative_ttl: Duration::from_secs(30),
            stale_while_revalidate: Duration::from_secs(60),
            stale_if_error: Duration::from_secs(3600),
        }
    }

    /// Fetched now.
    pub fn entry(status: u16, body: &'static [u8]) -> Arc<Entry> {
        Arc::new(Entry::new(
            StatusCode::from_u16(status).unwrap(),
            crate::respond::JSON,
            Bytes::from_static(body),
            clock::now(),
        ))
    }

    pub fn page_key() -> Key {
        Key {
            kind: Kind::Page,
            account: "a".into(),
            index: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::*;
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_fetch_that_panics_answers_its_waiters_and_frees_the_key() {
        let cache = Arc::new(PageCache::new(
            Arc::new(MokaStore::new(1 << 20, windows())),
            1 << 20,
            windows(),
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
            .fetch(page_key(), deadline, async { Ok(entry(200, b"{}")) })
            .await;
        assert_eq!(join, Join::Leader);
        assert!(result.is_ok());
        assert!(cache.store.get(&page_key()).await.is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn a_caller_past_its_deadline_gets_a_timeout() {
        let cache = PageCache::new(
            Arc::new(MokaStore::new(1 << 20, windows())),
            1 << 20,
            windows(),
        );
        let deadline = Instant::now() + Duration::from_secs(1);
        let (result, _) = cache
            .fetch(page_key(), deadline, std::future::pending())
            .await;
        assert_eq!(result.unwrap_err().error_code(), "GW_UPSTREAM_TIMEOUT");
    }
}
