//! The page cache (SPEC §6, §10): stored upstream answers with their gzip form and ETag,
//! freshness decided at read time from each answer's fetch time and the current windows, and
//! coalescing of concurrent misses; in fleet mode a shared L2 in Redis under the in-process L1.
//!
//! - [`entry`]: what is stored ([`StoredEntry`]: versioned, serializable [`EntryMeta`] and the
//!   bodies) and the in-process extras next to it; freshness against [`Windows`].
//! - [`clock`]: the wall clock fetch times are written in, following tokio's (paused) time.
//! - [`store`]: the [`CacheStore`] seam, [`MemStore`] (the L1), and [`L1`] with its purge epoch.
//! - [`flight`]: [`SingleFlight`], one fetch per key at a time.
//! - [`fill`]: one fill of a missed key: L2 read, fleet fill lease, upstream fetch.
//! - [`l2`]: the fleet's shared store in Redis, its purges and the purge subscription.
//! - [`page`]: what the whole-account endpoints need from a stored page, found once per entry.

pub mod clock;
pub mod entry;
pub mod fill;
pub mod flight;
pub mod l2;
pub mod page;
pub mod store;

pub use entry::{
    gzip_parts, Entry, EntryMeta, FileForm, Freshness, RefreshClaim, StoredEntry, UnreadableEntry,
    Windows, META_VERSION,
};
pub use fill::{FillFailed, FillResult, Filled, Origin, Want};
pub use flight::{Join, Missed, SingleFlight};
pub use store::{CacheStore, MemStore, StoreFuture, L1};

use crate::error::GatewayError;
use crate::fleet::Redis;
use crate::util::Shutdown;
use bytes::Bytes;
use http::HeaderValue;
use l2::L2;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
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

/// What one fill needs besides the key and the fetch.
#[derive(Debug, Clone, Copy)]
pub struct FillOptions {
    /// The windows of the caller's config (a shared entry is judged by them).
    pub windows: Windows,
    pub want: Want,
    /// How long the fill itself may take (waiting on another replica's fetch included); each
    /// caller waits for it until its own deadline only.
    pub deadline: Instant,
}

/// A purge that reached this replica's L1 but not the fleet (Redis did not answer).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the purge reached this replica only: redis did not answer")]
pub struct NotShared {
    /// Entries dropped from this replica's L1.
    pub purged: u64,
}

/// The cache as the request path sees it: the L1 (and in fleet mode the L2 under it) plus
/// coalescing of concurrent fills.
pub struct PageCache {
    l1: Arc<L1>,
    l2: Option<Arc<L2>>,
    flight: SingleFlight<Key, FillResult>,
    /// Gzip forms of documents assembled from cached pages (whole-account walks), by ETag:
    /// compressed once per version, bounded to an eighth of `cache.max_bytes`.
    derived_gzip: moka::future::Cache<String, Bytes>,
}

impl PageCache {
    /// The L1 entry for `key`, if any (fresh or not: the caller judges). Never touches Redis.
    /// `now` is when the request arrived (an entry whose lifetime is over by then is absent).
    pub fn get(&self, key: &Key, now: Instant) -> Option<Arc<Entry>> {
        self.l1.store().get(key, now)
    }

    /// Drops every entry of `account`, from the whole fleet in fleet mode; returns how many
    /// this replica held.
    pub async fn purge_account(&self, account: &str) -> Result<u64, NotShared> {
        let purged = self.l1.purge_account(account).await;
        self.purge_shared(Some(account), purged).await
    }

    /// Drops everything (from the whole fleet in fleet mode); returns how many entries this
    /// replica held.
    pub async fn purge_all(&self) -> Result<u64, NotShared> {
        let purged = self.l1.purge_all().await;
        self.purge_shared(None, purged).await
    }

    async fn purge_shared(&self, account: Option<&str>, purged: u64) -> Result<u64, NotShared> {
        match &self.l2 {
            None => Ok(purged),
            Some(l2) => match l2.purge(account).await {
                Ok(()) => Ok(purged),
                Err(e) => {
                    tracing::warn!(error = %e, "purge not shared with the fleet");
                    Err(NotShared { purged })
                }
            },
        }
    }

    /// `(entries, bytes)` of the L1 after pending maintenance.
    pub async fn size(&self) -> (u64, u64) {
        self.l1.store().size().await
    }

    /// `windows` bound how long derived document forms are kept.
    pub fn new(store: Arc<dyn CacheStore>, max_bytes: u64, windows: Windows) -> Self {
        let derived_gzip = moka::future::Cache::builder()
            .max_capacity((max_bytes / 8).max(1 << 20))
            .weigher(|k: &String, v: &Bytes| u32::try_from(k.len() + v.len()).unwrap_or(u32::MAX))
            .time_to_live(windows.ttl + windows.stale_while_revalidate)
            .build();
        Self {
            l1: Arc::new(L1::new(store)),
            l2: None,
            flight: SingleFlight::new(),
            derived_gzip,
        }
    }

    /// Fleet mode: the shared L2 in `redis` under the L1 (`connect_timeout` bounds making the
    /// purge subscription). `None` leaves the cache in-process only.
    pub fn with_shared(mut self, redis: Option<Arc<Redis>>, connect_timeout: Duration) -> Self {
        self.l2 = redis.map(|r| Arc::new(L2::new(r, connect_timeout)));
        self
    }

    /// In fleet mode: subscribes to the fleet's purges (one attempt, within the connect
    /// timeout, when Redis is up) and runs the loop that keeps the L1 in step until `shutdown`.
    pub async fn start_sync(&self, shutdown: Shutdown) -> Option<tokio::task::JoinHandle<()>> {
        let l2 = self.l2.clone()?;
        let first = l2::sync::subscribe(&l2).await;
        Some(tokio::spawn(l2::sync::run(
            l2,
            self.l1.clone(),
            first,
            shutdown,
        )))
    }

    /// Fills `key` (see [`fill`]): one fill per key however many callers ask at the same time,
    /// and in fleet mode one upstream fetch for the fleet. Its entry is in the L1 before anyone
    /// is answered; every caller waits at most until its own `wait_until`.
    pub async fn fill<F>(
        &self,
        key: Key,
        wait_until: Instant,
        options: FillOptions,
        fetch: F,
    ) -> (FillResult, Join)
    where
        F: Future<Output = Result<Arc<Entry>, GatewayError>> + Send + 'static,
    {
        let job = fill::Fill {
            l1: self.l1.clone(),
            l2: self.l2.clone(),
            key: key.clone(),
            windows: options.windows,
            want: options.want,
            deadline: options.deadline,
        };
        let (result, join) = self.flight.run(key, wait_until, job.run(fetch)).await;
        let result = match result {
            Ok(filled) => filled,
            Err(missed) => Err(FillFailed {
                error: match missed {
                    Missed::Deadline => GatewayError::UpstreamTimeout,
                    Missed::Died => GatewayError::BadGateway("upstream fetch failed".into()),
                },
                stale: None,
            }),
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

    fn options(deadline: Instant) -> FillOptions {
        FillOptions {
            windows: windows(),
            want: Want::Usable,
            deadline,
        }
    }

    #[tokio::test]
    async fn a_fetch_that_panics_answers_its_waiters_and_frees_the_key() {
        let cache = Arc::new(PageCache::new(
            Arc::new(MemStore::new(1 << 20, windows())),
            1 << 20,
            windows(),
        ));
        let deadline = Instant::now() + Duration::from_secs(5);
        let (gate_tx, gate_rx) = tokio::sync::oneshot::channel::<()>();
        let leader = tokio::spawn({
            let cache = cache.clone();
            async move {
                cache
                    .fill(page_key(), deadline, options(deadline), async move {
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
                    .fill(page_key(), deadline, options(deadline), async {
                        unreachable!("coalesced")
                    })
                    .await
            }
        });
        tokio::task::yield_now().await;
        gate_tx.send(()).unwrap();
        for (task, join) in [(leader, Join::Leader), (waiter, Join::Coalesced)] {
            let (result, joined) = task.await.unwrap();
            assert_eq!(joined, join);
            assert_eq!(result.unwrap_err().error.error_code(), "GW_BAD_GATEWAY");
        }
        // The next request for the key fetches again.
        let (result, join) = cache
            .fill(page_key(), deadline, options(deadline), async {
                Ok(entry(200, b"{}"))
            })
            .await;
        assert_eq!(join, Join::Leader);
        assert_eq!(result.unwrap().origin, Origin::Upstream);
        assert!(cache.get(&page_key(), Instant::now()).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn a_caller_past_its_deadline_gets_a_timeout() {
        let cache = PageCache::new(
            Arc::new(MemStore::new(1 << 20, windows())),
            1 << 20,
            windows(),
        );
        let deadline = Instant::now() + Duration::from_secs(1);
        let (result, _) = cache
            .fill(
                page_key(),
                deadline,
                options(deadline),
                std::future::pending(),
            )
            .await;
        assert_eq!(
            result.unwrap_err().error.error_code(),
            "GW_UPSTREAM_TIMEOUT"
        );
    }
}
