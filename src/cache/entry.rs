//! One stored upstream answer. What a store keeps ([`StoredEntry`]: versioned, serializable
//! [`EntryMeta`], the body and its gzip form) is kept apart from what only this process needs
//! next to it (header values made once, the refresh claim, the page index), so a shared store
//! can hold the first and rebuild the second with [`Entry::from_stored`].
//!
//! Freshness is not stored: it is computed at read time from the fetch time and the windows the
//! caller passes in (the current config), so a change of `ttl` applies to entries already stored.

use super::page::PageIndex;
use bytes::Bytes;
use flate2::write::GzEncoder;
use http::{HeaderValue, StatusCode};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

/// The layout of [`EntryMeta`] this build writes and reads; a store drops other versions.
pub const META_VERSION: u8 = 1;

/// Bodies below this are not worth compressing.
const GZIP_MIN: usize = 256;
/// Bookkeeping bytes counted per entry on top of the bodies.
const ENTRY_OVERHEAD: usize = 256;

/// What a stored answer is, in plain values any store can serialize.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryMeta {
    /// [`META_VERSION`] when written.
    pub version: u8,
    /// Wall-clock fetch time (from [`super::clock`]): meaningful on another host.
    pub fetched_at: SystemTime,
    /// The upstream status: 200, or a 4xx passed through (a negative answer).
    pub status: u16,
    pub content_type: String,
    /// A strong ETag, quotes included: over the body's bytes.
    pub etag: String,
}

/// What a store keeps for one answer. Bodies are `Bytes`: a hit clones a pointer, never the bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredEntry {
    pub meta: EntryMeta,
    pub body: Bytes,
    /// Compressed once, when the answer was stored; `None` when small or not smaller.
    pub gzip: Option<Bytes>,
}

/// A stored form this build cannot serve (another version, or values that are not headers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("stored cache entry is not readable by this build")]
pub struct UnreadableEntry;

/// A stored answer as this process serves it.
#[derive(Debug)]
pub struct Entry {
    stored: StoredEntry,
    // Made once from the meta, so a hit neither parses nor allocates them.
    status: StatusCode,
    content_type: HeaderValue,
    etag: HeaderValue,
    /// In-process only: one background refresh at a time while stale.
    refreshing: AtomicBool,
    /// In-process only: a 200 license page read once, the first time a walk or a device lookup
    /// needs it (`None` inside when the page is not in the documented shape).
    page: OnceLock<Option<Arc<PageIndex>>>,
}

/// The freshness windows, from the current config: passed in at every read, never stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Windows {
    /// Fresh time of an answer (2xx).
    pub ttl: Duration,
    /// Fresh time of a negative answer (upstream 4xx).
    pub negative_ttl: Duration,
    pub stale_while_revalidate: Duration,
    pub stale_if_error: Duration,
}

impl Windows {
    pub fn from_config(c: &crate::config::CacheConfig) -> Self {
        Self {
            ttl: c.ttl.0,
            negative_ttl: c.negative_ttl.0,
            stale_while_revalidate: c.stale_while_revalidate.0,
            stale_if_error: c.stale_if_error.0,
        }
    }

    /// How long an answer with `status` is fresh.
    pub fn fresh_for(&self, status: StatusCode) -> Duration {
        if status.is_success() {
            self.ttl
        } else {
            self.negative_ttl
        }
    }
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

impl Entry {
    /// A fresh upstream answer, fetched at `fetched_at` (use [`super::clock::now`]).
    pub fn new(
        status: StatusCode,
        content_type: HeaderValue,
        body: Bytes,
        fetched_at: SystemTime,
    ) -> Self {
        let digest = ring::digest::digest(&ring::digest::SHA256, &body);
        let etag_text = format!("\"{}\"", crate::util::hex(&digest.as_ref()[..12]));
        let etag = HeaderValue::from_str(&etag_text).unwrap_or(HeaderValue::from_static("\"0\""));
        // Only visible-ASCII content types are kept: what a store can hold as text.
        let (content_type, content_type_text) = match content_type.to_str() {
            Ok(s) => {
                let text = s.to_string();
                (content_type, text)
            }
            Err(_) => (crate::respond::JSON, String::from("application/json")),
        };
        Self {
            stored: StoredEntry {
                meta: EntryMeta {
                    version: META_VERSION,
                    fetched_at,
                    status: status.as_u16(),
                    content_type: content_type_text,
                    etag: etag_text,
                },
                gzip: gzip(&body),
                // An upstream body may be a slice of a larger read buffer: keep an exact-size
                // copy so the cache holds what its weigher counts, not the buffer behind it.
                body: Bytes::copy_from_slice(&body),
            },
            status,
            content_type,
            etag,
            refreshing: AtomicBool::new(false),
            page: OnceLock::new(),
        }
    }

    /// An entry read back from a store.
    pub fn from_stored(stored: StoredEntry) -> Result<Self, UnreadableEntry> {
        let m = &stored.meta;
        if m.version != META_VERSION {
            return Err(UnreadableEntry);
        }
        let status = StatusCode::from_u16(m.status).map_err(|_| UnreadableEntry)?;
        let content_type = HeaderValue::from_str(&m.content_type).map_err(|_| UnreadableEntry)?;
        let etag = HeaderValue::from_str(&m.etag).map_err(|_| UnreadableEntry)?;
        Ok(Self {
            status,
            content_type,
            etag,
            stored,
            refreshing: AtomicBool::new(false),
            page: OnceLock::new(),
        })
    }

    /// What a store keeps.
    pub fn stored(&self) -> &StoredEntry {
        &self.stored
    }

    pub fn meta(&self) -> &EntryMeta {
        &self.stored.meta
    }

    pub fn status(&self) -> StatusCode {
        self.status
    }

    pub fn content_type(&self) -> &HeaderValue {
        &self.content_type
    }

    pub fn etag(&self) -> &HeaderValue {
        &self.etag
    }

    pub fn body(&self) -> &Bytes {
        &self.stored.body
    }

    pub fn gzip(&self) -> Option<&Bytes> {
        self.stored.gzip.as_ref()
    }

    pub fn fetched_at(&self) -> SystemTime {
        self.stored.meta.fetched_at
    }

    /// The page's index for walks and lookups, parsed on first use only.
    pub fn page_index(&self) -> Option<&Arc<PageIndex>> {
        self.page
            .get_or_init(|| PageIndex::parse(&self.stored.body).map(Arc::new))
            .as_ref()
    }

    pub fn is_negative(&self) -> bool {
        !self.status.is_success()
    }

    /// Time since the fetch; a fetch time in the future (another host's clock) counts as 0.
    pub fn age(&self, now: SystemTime) -> Duration {
        now.duration_since(self.fetched_at()).unwrap_or_default()
    }

    fn fresh_for(&self, w: &Windows) -> Duration {
        w.fresh_for(self.status)
    }

    /// Seconds of freshness left (the `max-age` to send).
    pub fn fresh_left(&self, now: SystemTime, w: &Windows) -> u64 {
        self.fresh_for(w).saturating_sub(self.age(now)).as_secs()
    }

    /// Both stale windows count from the moment the entry became stale (RFC 5861). Negative
    /// answers are never served stale.
    pub fn freshness(&self, now: SystemTime, w: &Windows) -> Freshness {
        let age = self.age(now);
        let fresh_for = self.fresh_for(w);
        if age < fresh_for {
            Freshness::Fresh
        } else if !self.is_negative() && age - fresh_for < w.stale_while_revalidate {
            Freshness::Revalidate
        } else {
            Freshness::Stale
        }
    }

    pub fn usable_on_error(&self, now: SystemTime, w: &Windows) -> bool {
        !self.is_negative() && self.age(now).saturating_sub(self.fresh_for(w)) < w.stale_if_error
    }

    /// How long a store should keep this entry from `now`: its fresh time plus the longer stale
    /// window, counted from its own fetch time (negative answers are never served stale).
    pub fn keep_for(&self, w: &Windows, now: SystemTime) -> Duration {
        let keep = if self.is_negative() {
            Duration::ZERO
        } else {
            w.stale_while_revalidate.max(w.stale_if_error)
        };
        (self.fresh_for(w) + keep).saturating_sub(self.age(now))
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
        let body = self.stored.body.len();
        let index = if self.status.is_success() {
            PageIndex::extra_bytes_bound(body)
        } else {
            0
        };
        let n = body + self.gzip().map_or(0, Bytes::len) + ENTRY_OVERHEAD + index;
        u32::try_from(n).unwrap_or(u32::MAX)
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

#[cfg(test)]
mod tests {
    use super::super::clock;
    use super::super::fixtures::{entry, windows};
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn freshness_windows() {
        let w = windows();
        let e = entry(200, b"{}");
        assert_eq!(e.freshness(clock::now(), &w), Freshness::Fresh);
        tokio::time::advance(Duration::from_secs(300)).await;
        assert_eq!(e.freshness(clock::now(), &w), Freshness::Revalidate);
        assert_eq!(e.fresh_left(clock::now(), &w), 0);
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(e.freshness(clock::now(), &w), Freshness::Stale);
        assert!(e.usable_on_error(clock::now(), &w));
        tokio::time::advance(Duration::from_secs(3540)).await;
        assert!(!e.usable_on_error(clock::now(), &w));
        let neg = entry(400, b"{}");
        tokio::time::advance(Duration::from_secs(30)).await;
        assert_eq!(neg.freshness(clock::now(), &w), Freshness::Stale);
        assert!(!neg.usable_on_error(clock::now(), &w));
    }

    /// Freshness comes from the windows of the read, not from the time of the store: a longer
    /// or shorter `ttl` applies to an entry already stored.
    #[tokio::test(start_paused = true)]
    async fn current_windows_apply_to_stored_entries() {
        let e = entry(200, b"{}");
        let neg = entry(404, b"{}");
        tokio::time::advance(Duration::from_secs(400)).await;
        let now = clock::now();
        let before = windows();
        assert_eq!(e.freshness(now, &before), Freshness::Stale);
        let longer = Windows {
            ttl: Duration::from_secs(600),
            negative_ttl: Duration::from_secs(500),
            ..before
        };
        assert_eq!(e.freshness(now, &longer), Freshness::Fresh);
        assert_eq!(e.fresh_left(now, &longer), 200);
        assert_eq!(neg.freshness(now, &longer), Freshness::Fresh);
        let shorter = Windows {
            ttl: Duration::from_secs(350),
            ..before
        };
        assert_eq!(e.freshness(now, &shorter), Freshness::Revalidate);
    }

    #[test]
    fn a_fetch_time_in_the_future_counts_as_age_zero() {
        let e = Entry::new(
            StatusCode::OK,
            crate::respond::JSON,
            Bytes::from_static(b"{}"),
            SystemTime::now() + Duration::from_secs(30),
        );
        let now = SystemTime::now();
        assert_eq!(e.age(now), Duration::ZERO);
        assert_eq!(e.fresh_left(now, &windows()), 300);
        assert_eq!(e.freshness(now, &windows()), Freshness::Fresh);
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
            SystemTime::now(),
        );
        let gz = e.gzip().unwrap().clone();
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&gz[..]), &mut out).unwrap();
        assert_eq!(out, body);
        let etag = e.etag().to_str().unwrap();
        assert!(etag.starts_with('"') && etag.ends_with('"') && etag.len() == 26);
        assert_eq!(e.meta().etag, etag);
        assert!(Entry::new(
            StatusCode::OK,
            crate::respond::JSON,
            Bytes::from_static(b"{}"),
            SystemTime::now(),
        )
        .gzip()
        .is_none());
    }

    /// What a shared store would write and read back: the same answer, the same headers.
    #[test]
    fn the_stored_form_round_trips_and_is_versioned() {
        let body: Vec<u8> = (0..200)
            .flat_map(|i| format!("{{\"deviceId\":\"{i}\"}},").into_bytes())
            .collect();
        let e = Entry::new(
            StatusCode::NOT_FOUND,
            HeaderValue::from_static("application/json; charset=utf-8"),
            Bytes::from(body),
            SystemTime::now(),
        );
        let text = serde_json::to_vec(e.stored()).unwrap();
        let back: StoredEntry = serde_json::from_slice(&text).unwrap();
        assert_eq!(&back, e.stored());
        let back = Entry::from_stored(back).unwrap();
        assert_eq!(back.status(), StatusCode::NOT_FOUND);
        assert_eq!(back.content_type(), "application/json; charset=utf-8");
        assert_eq!(back.etag(), e.etag());
        assert_eq!(back.fetched_at(), e.fetched_at());
        assert_eq!((back.body(), back.gzip()), (e.body(), e.gzip()));
        let mut other = e.stored().clone();
        other.meta.version = META_VERSION + 1;
        assert_eq!(Entry::from_stored(other).unwrap_err(), UnreadableEntry);
        let mut bad = e.stored().clone();
        bad.meta.etag = "\"a\nb\"".into();
        assert_eq!(Entry::from_stored(bad).unwrap_err(), UnreadableEntry);
    }

    #[tokio::test]
    async fn a_refresh_claim_is_given_back_unless_the_entry_was_replaced() {
        let e = entry(200, b"{}");
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
}
