//! The bytes of one L2 page in Redis: a fixed 40-byte header, the [`EntryMeta`] as JSON, the
//! body, and its gzip form when there is one. Binary, so an ~80 KB page costs one copy in and
//! the bodies come back out as slices of the value read (no base64, no second copy).
//!
//! ```text
//!  0..3   b"TSG"            magic
//!  3      LAYOUT            this layout; another one is not read
//!  4..12  write id (u64 LE) random per write: what a fill lease compares ([`IDENTITY`])
//! 12..20  purge stamp, all (u64 LE)      the fleet's generations when the fill began
//! 20..28  purge stamp, account (u64 LE)
//! 28..32  meta length (u32 LE)
//! 32..36  body length (u32 LE)
//! 36..40  gzip length (u32 LE; u32::MAX: no gzip form)
//! ```

use crate::cache::{EntryMeta, StoredEntry, UnreadableEntry};
use bytes::Bytes;

const MAGIC: &[u8; 3] = b"TSG";
/// The header layout this build writes and reads (the meta has its own version inside).
const LAYOUT: u8 = 1;
const HEADER: usize = 40;
/// Bytes at the start of a value that tell one write from another: magic, layout, write id.
pub const IDENTITY: usize = 12;
const NO_GZIP: u32 = u32::MAX;

/// The purge generations a page was filled under (see `super` for the purge scheme).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stamps {
    pub all: u64,
    pub account: u64,
}

/// The value stored for `stored`, filled under `stamps`.
pub fn encode(stored: &StoredEntry, stamps: Stamps) -> Vec<u8> {
    // EntryMeta is plain strings and numbers: serializing it cannot fail.
    let meta = serde_json::to_vec(&stored.meta).unwrap_or_default();
    let gzip = stored.gzip.as_ref();
    let len = HEADER + meta.len() + stored.body.len() + gzip.map_or(0, Bytes::len);
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(MAGIC);
    out.push(LAYOUT);
    out.extend_from_slice(&fastrand::u64(..).to_le_bytes());
    out.extend_from_slice(&stamps.all.to_le_bytes());
    out.extend_from_slice(&stamps.account.to_le_bytes());
    out.extend_from_slice(&len32(meta.len()).to_le_bytes());
    out.extend_from_slice(&len32(stored.body.len()).to_le_bytes());
    out.extend_from_slice(&gzip.map_or(NO_GZIP, |g| len32(g.len())).to_le_bytes());
    out.extend_from_slice(&meta);
    out.extend_from_slice(&stored.body);
    if let Some(g) = gzip {
        out.extend_from_slice(g);
    }
    out
}

/// Lengths are checked against `redis.l2_max_entry_bytes` before encoding; a length that does
/// not fit is written as one that cannot be read back.
fn len32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(NO_GZIP - 1)
}

fn u64_at(v: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&v[at..at + 8]);
    u64::from_le_bytes(b)
}

fn u32_at(v: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&v[at..at + 4]);
    u32::from_le_bytes(b)
}

/// The entry and stamps in `value`; bodies are slices of it. Another layout, another meta
/// version, or bytes that do not add up are [`UnreadableEntry`].
pub fn decode(value: Bytes) -> Result<(StoredEntry, Stamps), UnreadableEntry> {
    if value.len() < HEADER || &value[..3] != MAGIC || value[3] != LAYOUT {
        return Err(UnreadableEntry);
    }
    let stamps = Stamps {
        all: u64_at(&value, 12),
        account: u64_at(&value, 20),
    };
    let meta_len = u32_at(&value, 28) as usize;
    let body_len = u32_at(&value, 32) as usize;
    let gzip_len = u32_at(&value, 36);
    let meta_end = HEADER + meta_len;
    let body_end = meta_end.checked_add(body_len).ok_or(UnreadableEntry)?;
    let end = match gzip_len {
        NO_GZIP => body_end,
        n => body_end.checked_add(n as usize).ok_or(UnreadableEntry)?,
    };
    if end != value.len() {
        return Err(UnreadableEntry);
    }
    let meta: EntryMeta =
        serde_json::from_slice(&value[HEADER..meta_end]).map_err(|_| UnreadableEntry)?;
    let stored = StoredEntry {
        meta,
        body: value.slice(meta_end..body_end),
        gzip: (gzip_len != NO_GZIP).then(|| value.slice(body_end..end)),
    };
    Ok((stored, stamps))
}

/// What identifies the write behind `value` (empty for no value).
pub fn identity(value: &[u8]) -> &[u8] {
    &value[..value.len().min(IDENTITY)]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::{Entry, META_VERSION};
    use http::{HeaderValue, StatusCode};
    use std::time::{Duration, SystemTime};

    fn page(devices: usize) -> Entry {
        let body: Vec<u8> = (0..devices)
            .flat_map(|i| format!("{{\"deviceId\":\"{i:015}\"}},").into_bytes())
            .collect();
        Entry::new(
            StatusCode::OK,
            HeaderValue::from_static("application/json; charset=utf-8"),
            Bytes::from(body),
            SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
        )
    }

    #[test]
    fn round_trip_keeps_meta_bodies_and_stamps() {
        let stamps = Stamps {
            all: 7,
            account: u64::MAX - 1,
        };
        for e in [page(2000), page(1)] {
            let value = Bytes::from(encode(e.stored(), stamps));
            let (back, got) = decode(value.clone()).unwrap();
            assert_eq!(&back, e.stored());
            assert_eq!(got, stamps);
            // The bodies are slices of the value read, not copies.
            let inside = |b: &Bytes| value.as_ptr_range().contains(&b.as_ptr());
            assert!(inside(&back.body));
            if let Some(g) = &back.gzip {
                assert!(inside(g));
            }
            let entry = Entry::from_stored(back).unwrap();
            assert_eq!(entry.etag(), e.etag());
            assert_eq!(entry.fetched_at(), e.fetched_at());
        }
    }

    #[test]
    fn every_write_has_its_own_identity() {
        let e = page(10);
        let a = encode(e.stored(), Stamps::default());
        let b = encode(e.stored(), Stamps::default());
        assert_eq!(identity(&a).len(), IDENTITY);
        assert_ne!(identity(&a), identity(&b));
        assert_eq!(identity(&[]), b"");
    }

    #[test]
    fn other_layouts_versions_and_torn_values_are_not_read() {
        let e = page(100);
        let good = encode(e.stored(), Stamps::default());
        let mut layout = good.clone();
        layout[3] = 2;
        assert_eq!(decode(layout.into()).unwrap_err(), UnreadableEntry);
        let mut other = e.stored().clone();
        other.meta.version = META_VERSION + 1;
        let (stored, _) = decode(encode(&other, Stamps::default()).into()).unwrap();
        assert_eq!(Entry::from_stored(stored).unwrap_err(), UnreadableEntry);
        assert!(decode(Bytes::copy_from_slice(&good[..good.len() - 1])).is_err());
        assert!(decode(Bytes::copy_from_slice(&good[..20])).is_err());
        let mut meta = good.clone();
        meta[HEADER] = b'x';
        assert!(decode(meta.into()).is_err());
        assert!(decode(Bytes::from_static(
            b"not a page at all, not one bit of it...."
        ))
        .is_err());
    }
}
