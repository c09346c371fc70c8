//! One stored upstream answer. What a store keeps ([`StoredEntry`]: versioned, serializable
//! [`EntryMeta`], the body and its gzip form) is kept apart from what only this process needs
//! next to it (header values made once, the refresh claim, the page index), so a shared store
//! can hold the first and rebuild the second with [`Entry::from_stored`].
//!
//! Freshness is not stored: it is computed at read time from the fetch time and the windows the
//! caller passes in (the current config), so a change of `ttl` applies to entries already stored.
//!
//! The gzip form is not needed for the first answer, so a new entry has none: it is made after,
//! off the async workers ([`gzip`]), and appears in the entry when ready.

mod file;
mod gzip;

use super::page::PageIndex;
use bytes::Bytes;
pub use file::FileForm;
use file::FILE_MIN;
pub use gzip::gzip_parts;
use gzip::{GzipSlot, GZIP_MIN};
use http::{HeaderValue, StatusCode};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

/// The layout of [`EntryMeta`] this build writes and reads; a store drops other versions.
pub const META_VERSION: u8 = 1;

/// Bookkeeping bytes counted per entry on top of the bodies.
const ENTRY_OVERHEAD: usize = 256;
/// An entry's weight counts `body / GZIP_ROOM_DIVISOR` for a gzip form made after it was
/// stored (license pages compress about 5:1); a gzip form larger than that is not kept, so the
/// weight never undercounts what the entry holds.
const GZIP_ROOM_DIVISOR: usize = 3;

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
    /// Compressed once per answer; `None` when small, not smaller, or not made yet (a store
    /// may write an entry before its gzip form is ready: see [`Entry::to_stored`]).
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
    /// In-process only: the gzip form made after the entry was built, when `stored.gzip` is
    /// `None` (shared by weak reference with the compression job, see [`gzip`]).
    late_gzip: Arc<GzipSlot>,
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
    /// A fresh upstream answer, fetched at `fetched_at` (use [`super::clock::now`]), without its
    /// gzip form: see [`Entry::compress_later`].
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
                gzip: None,
                // An upstream body may be a slice of a larger read buffer: keep an exact-size
                // copy so the cache holds what its weigher counts, not the buffer behind it.
                body: Bytes::copy_from_slice(&body),
            },
            status,
            content_type,
            etag,
            late_gzip: Arc::default(),
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
            late_gzip: Arc::default(),
            refreshing: AtomicBool::new(false),
            page: OnceLock::new(),
        })
    }

    /// What a store keeps, as the entry was built (its gzip form only if it came with it).
    pub fn stored(&self) -> &StoredEntry {
        &self.stored
    }

    /// What a store keeps, with the gzip form if it is ready by now.
    pub fn to_stored(&self) -> StoredEntry {
        let mut stored = self.stored.clone();
        if stored.gzip.is_none() {
            stored.gzip = self.late_gzip.get().cloned();
        }
        stored
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

    /// The gzip form, if it came with the entry or has been made since.
    /// The body's file form, for `sendfile` (large bodies, once a plaintext hit asked for it
    /// and it was made: see [`Entry::file_later`]).
    pub fn file(&self) -> Option<&Arc<FileForm>> {
        self.late_gzip.file()
    }

    /// Queues the making of the body's file form on the compressor threads (bodies of 32 KiB or
    /// more; once); returns at once. Only a client that can be sent it asks: a TLS listener, or
    /// a page never hit, costs no file and no descriptor.
    pub fn file_later(&self) {
        self.late_gzip.request_file(&self.stored.body);
    }

    pub fn gzip(&self) -> Option<&Bytes> {
        self.stored.gzip.as_ref().or_else(|| self.late_gzip.get())
    }

    /// True if a gzip form may still come: the body is worth compressing and no compression
    /// of it has ended yet.
    pub fn gzip_pending(&self) -> bool {
        self.stored.gzip.is_none()
            && self.stored.body.len() >= GZIP_MIN
            && !self.late_gzip.is_done()
    }

    /// The room counted in [`Entry::weight`] for a gzip form made later.
    fn gzip_room(&self) -> usize {
        self.stored.body.len() / GZIP_ROOM_DIVISOR
    }

    /// Queues the gzip form's compression on the compressor threads, unless it is there,
    /// queued, or not worth it; returns at once. When the queue is full nothing is queued, and a
    /// later call (the next gzip request for the entry) asks again.
    pub fn compress_later(&self) {
        if self.gzip_pending() {
            self.late_gzip.request(&self.stored.body, self.gzip_room());
        }
    }

    /// Makes the gzip form here and now, if it may still come (benches and tests).
    pub fn compress_now(&self) {
        if self.gzip_pending() {
            self.late_gzip.fill(&self.stored.body, self.gzip_room());
        }
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
        self.fresh_left_at(self.age(now), w)
    }

    /// [`Entry::fresh_left`] for an age already known.
    pub fn fresh_left_at(&self, age: Duration, w: &Windows) -> u64 {
        self.fresh_for(w).saturating_sub(age).as_secs()
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

    /// The weight counted against `cache.max_bytes`: the bodies (a gzip form made later counts
    /// as the room kept for it from the start, so the weight does not change), bookkeeping, and
    /// room for the page index a walk may add.
    pub fn weight(&self) -> u32 {
        let body = self.stored.body.len();
        let index = if self.status.is_success() {
            PageIndex::extra_bytes_bound(body)
        } else {
            0
        };
        let gzip = match &self.stored.gzip {
            Some(gz) => gz.len(),
            None if body >= GZIP_MIN => self.gzip_room(),
            None => 0,
        };
        // A large body's file form is a second copy, counted from the start (made or not), so
        // that the weight never undercounts what the entry holds.
        let file = if body >= FILE_MIN { body } else { 0 };
        let n = body + gzip + file + ENTRY_OVERHEAD + index;
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

    fn device_list(n: usize) -> Vec<u8> {
        (0..n)
            .flat_map(|i| format!("{{\"deviceId\":\"{i}\"}},").into_bytes())
            .collect()
    }

    fn gunzip(gz: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(gz), &mut out).unwrap();
        out
    }

    #[test]
    fn gzip_round_trip_and_etag() {
        let body = device_list(2000);
        let e = Entry::new(
            StatusCode::OK,
            crate::respond::JSON,
            Bytes::from(body.clone()),
            SystemTime::now(),
        );
        assert!(
            e.gzip().is_none() && e.gzip_pending(),
            "made after, not at build"
        );
        let weight = e.weight();
        e.compress_now();
        assert!(!e.gzip_pending());
        assert_eq!(gunzip(e.gzip().unwrap()), body);
        assert_eq!(e.weight(), weight, "the room was counted from the start");
        assert!(e.gzip().unwrap().len() <= e.gzip_room());
        let etag = e.etag().to_str().unwrap();
        assert!(etag.starts_with('"') && etag.ends_with('"') && etag.len() == 26);
        assert_eq!(e.meta().etag, etag);
        let small = Entry::new(
            StatusCode::OK,
            crate::respond::JSON,
            Bytes::from_static(b"{}"),
            SystemTime::now(),
        );
        assert!(!small.gzip_pending());
        small.compress_now();
        assert!(small.gzip().is_none());
    }

    /// The first answer never waits for gzip: the form is made on the compressor threads and
    /// shows up in the entry (and in what a store would write) when ready.
    #[test]
    fn the_gzip_form_arrives_after_the_entry() {
        let body = device_list(3000);
        let e = Arc::new(Entry::new(
            StatusCode::OK,
            crate::respond::JSON,
            Bytes::from(body.clone()),
            SystemTime::now(),
        ));
        assert!(e.to_stored().gzip.is_none());
        e.compress_later();
        e.compress_later();
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while e.gzip_pending() {
            assert!(std::time::Instant::now() < deadline, "never compressed");
            // Polled, not spun: the compressor runs at the lowest priority.
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(gunzip(e.gzip().unwrap()), body);
        assert!(e.stored().gzip.is_none(), "as built");
        let stored = e.to_stored();
        assert_eq!(stored.gzip.as_ref(), e.gzip());
        let back = Entry::from_stored(stored).unwrap();
        assert_eq!(back.gzip(), e.gzip());
        assert!(!back.gzip_pending());
        assert!(back.weight() <= e.weight(), "counts the form it holds");
    }

    /// What a shared store would write and read back: the same answer, the same headers.
    #[test]
    fn the_stored_form_round_trips_and_is_versioned() {
        let e = Entry::new(
            StatusCode::NOT_FOUND,
            HeaderValue::from_static("application/json; charset=utf-8"),
            Bytes::from(device_list(200)),
            SystemTime::now(),
        );
        e.compress_now();
        assert!(e.gzip().is_some());
        let text = serde_json::to_vec(&e.to_stored()).unwrap();
        let back: StoredEntry = serde_json::from_slice(&text).unwrap();
        assert_eq!(back, e.to_stored());
        let back = Entry::from_stored(back).unwrap();
        assert_eq!(back.status(), StatusCode::NOT_FOUND);
        assert_eq!(back.content_type(), "application/json; charset=utf-8");
        assert_eq!(back.etag(), e.etag());
        assert_eq!(back.fetched_at(), e.fetched_at());
        assert_eq!((back.body(), back.gzip()), (e.body(), e.gzip()));
        // Written before its gzip form was ready: read back without one, made again on demand.
        let early = Entry::from_stored(e.stored().clone()).unwrap();
        assert!(early.gzip().is_none() && early.gzip_pending());
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
