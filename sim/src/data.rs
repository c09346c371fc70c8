//! Deterministic synthetic accounts for the simulator, with their pages rendered once into `Bytes`.

use bytes::Bytes;
use std::collections::HashMap;
use std::sync::Mutex;

/// splitmix64: tiny, deterministic, good enough for synthetic data.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

pub struct Account {
    pub name: String,
    pub total_licenses: u64,
    /// Sorted IMEIs.
    pub imeis: Vec<u64>,
    /// `{"deviceId":"…","assignmentTime":"…"}` per device, same order as `imeis`.
    fragments: Vec<Bytes>,
    /// Rendered pages by start offset into `imeis`: each page is rendered once.
    pages: Mutex<HashMap<usize, Bytes>>,
    pub subscription: Bytes,
}

/// The odd formats ThingSpace really returns, mixed into the normal ones.
const ODD_TIMES: [&str; 2] = [
    "01-01-1900 0:0:0 +0000 UTC",
    "2017-11-29 20:15:42 +0000 +0000",
];

pub fn generate(accounts: usize, devices: usize, seed: u64) -> Vec<Account> {
    let mut rng = Rng(seed);
    let prefix = if seed == 1 {
        402_196_254
    } else {
        400_000_000 + rng.below(99_999_999)
    };
    (0..accounts)
        .map(|i| {
            let name = format!("{prefix:010}-{:05}", i + 1);
            let mut imei = 350_000_000_000_000 + rng.below(100_000_000_000_000);
            let mut imeis = Vec::with_capacity(devices);
            let mut fragments = Vec::with_capacity(devices);
            for d in 0..devices {
                imei += 1 + rng.below(997);
                imeis.push(imei);
                let time = if d % 17 == 5 {
                    ODD_TIMES[(d / 17) % 2].to_string()
                } else {
                    format!(
                        "20{:02}-{:02}-{:02} {:02}:{:02}:{:02}.{:03} +0000 UTC",
                        15 + rng.below(10),
                        1 + rng.below(12),
                        1 + rng.below(28),
                        rng.below(24),
                        rng.below(60),
                        rng.below(60),
                        rng.below(1000)
                    )
                };
                fragments.push(Bytes::from(format!(
                    "{{\"deviceId\":\"{imei}\",\"assignmentTime\":\"{time}\"}}"
                )));
            }
            let total_licenses = devices as u64 + rng.below(1000);
            let subscription = Bytes::from(
                serde_json::json!({
                    "accountName": name,
                    "purchaseType": "MRC",
                    "totalAllowed": total_licenses,
                    "totalUsed": devices,
                    "createdOn": "2017-11-29T20:15:42Z",
                    "updatedOn": "2024-03-01T08:00:00Z",
                })
                .to_string(),
            );
            Account {
                name,
                total_licenses,
                imeis,
                fragments,
                pages: Mutex::new(HashMap::new()),
                subscription,
            }
        })
        .collect()
}

/// What a cursor asks for.
pub enum Cursor {
    /// Devices from this offset on.
    From(usize),
    /// Not 0 and not an IMEI of the account.
    Invalid,
}

impl Account {
    pub fn cursor(&self, start_index: u64) -> Cursor {
        if start_index == 0 {
            return Cursor::From(0);
        }
        match self.imeis.binary_search(&start_index) {
            Ok(i) => Cursor::From(i + 1),
            Err(_) => Cursor::Invalid,
        }
    }

    /// The page of up to `page_size` devices starting at `offset`; `loop_cursor` makes it point
    /// back at `start_index` (a broken upstream whose cursor never advances).
    pub fn page(&self, offset: usize, page_size: usize, loop_cursor: Option<u64>) -> Bytes {
        if loop_cursor.is_none() {
            if let Ok(pages) = self.pages.lock() {
                if let Some(p) = pages.get(&offset) {
                    return p.clone();
                }
            }
        }
        let end = (offset + page_size.max(1)).min(self.imeis.len());
        let has_more = end < self.imeis.len();
        let last_seen = match loop_cursor {
            Some(start) => start,
            None if has_more => self.imeis[end - 1],
            None => 0,
        };
        let list = &self.fragments[offset.min(end)..end];
        let mut out = Vec::with_capacity(160 + list.iter().map(|f| f.len() + 1).sum::<usize>());
        out.extend_from_slice(
            format!(
                "{{\"accountName\":\"{}\",\"totalLicenses\":{},\"assignedLicenses\":{},\"hasMoreData\":{},\"lastSeenDeviceId\":{},\"deviceList\":[",
                self.name,
                self.total_licenses,
                self.imeis.len(),
                has_more || loop_cursor.is_some(),
                last_seen
            )
            .as_bytes(),
        );
        for (i, f) in list.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(f);
        }
        out.extend_from_slice(b"]}");
        let page = Bytes::from(out);
        if loop_cursor.is_none() {
            if let Ok(mut pages) = self.pages.lock() {
                pages.insert(offset, page.clone());
            }
        }
        page
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_sorted_fifteen_digit() {
        let a = generate(2, 50, 1);
        let b = generate(2, 50, 1);
        assert_eq!(a[0].name, "0402196254-00001");
        assert_eq!(a[1].name, "0402196254-00002");
        assert_eq!(a[0].imeis, b[0].imeis);
        assert!(a[0].imeis.windows(2).all(|w| w[0] < w[1]));
        assert!(a[0].imeis.iter().all(|i| i.to_string().len() == 15));
        assert_ne!(generate(1, 5, 2)[0].imeis, a[0].imeis);
    }

    #[test]
    fn pages_parse_and_chain() {
        let a = &generate(1, 25, 1)[0];
        let p: serde_json::Value = serde_json::from_slice(&a.page(0, 10, None)).unwrap();
        assert_eq!(p["hasMoreData"], true);
        assert_eq!(p["deviceList"].as_array().unwrap().len(), 10);
        assert_eq!(p["lastSeenDeviceId"], a.imeis[9]);
        let Cursor::From(off) = a.cursor(a.imeis[19]) else {
            panic!()
        };
        let last: serde_json::Value = serde_json::from_slice(&a.page(off, 10, None)).unwrap();
        assert_eq!(last["hasMoreData"], false);
        assert_eq!(last["lastSeenDeviceId"], 0);
        assert_eq!(last["deviceList"].as_array().unwrap().len(), 5);
        assert!(
            matches!(a.cursor(a.imeis[0] + 1), Cursor::Invalid) || a.imeis[1] == a.imeis[0] + 1
        );
    }
}
