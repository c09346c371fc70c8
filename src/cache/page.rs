//! What the whole-account endpoints need from one stored license page, found once per stored
//! version (the entry keeps it), so a warm walk or device lookup parses no page again.

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;
use std::borrow::Cow;

/// A lookup parses at most about this many bytes of device objects (plus one device) in a page.
const CHECKPOINT_BYTES: usize = 2048;

/// A license page seen once: its header fields, its cursor, and where its devices lie.
#[derive(Debug)]
pub struct PageIndex {
    /// `{"accountName":…,"totalLicenses":…,"assignedLicenses":…,` with the page's own bytes.
    pub header_fields: Bytes,
    pub has_more_data: bool,
    pub last_seen_device_id: u64,
    /// The device objects' bytes, separators included: a slice of the page, not a copy.
    pub devices: Bytes,
    pub device_count: usize,
    /// Present when every device id is a number and they come in increasing order (what the
    /// upstream documents): lookups then skip the page or jump near the device.
    ranges: Option<Ranges>,
}

/// A device list whose entries are not objects with a `deviceId`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotDevices;

#[derive(Debug)]
struct Ranges {
    first: u64,
    last: u64,
    /// `(device id, offset in devices)` of the first device and of one device every
    /// `CHECKPOINT_BYTES` after it: at most one entry per 2 KiB of page.
    checkpoints: Vec<(u64, u32)>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PageHead<'a> {
    #[serde(borrow)]
    account_name: &'a RawValue,
    #[serde(borrow)]
    total_licenses: &'a RawValue,
    #[serde(borrow)]
    assigned_licenses: &'a RawValue,
    #[serde(default)]
    has_more_data: bool,
    #[serde(default)]
    last_seen_device_id: u64,
    #[serde(borrow)]
    device_list: Vec<&'a RawValue>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Device<'a> {
    #[serde(borrow)]
    device_id: Cow<'a, str>,
    #[serde(borrow, default)]
    assignment_time: Option<&'a RawValue>,
}

/// The byte offset of `inner` inside `outer` (both from the same buffer).
fn offset_in(outer: &[u8], inner: &str) -> Option<usize> {
    let start = (inner.as_ptr() as usize).checked_sub(outer.as_ptr() as usize)?;
    (start + inner.len() <= outer.len()).then_some(start)
}

impl PageIndex {
    /// Reads a 200 license page; `None` when it is not in the documented shape.
    pub fn parse(body: &Bytes) -> Option<PageIndex> {
        let head: PageHead = serde_json::from_slice(body).ok()?;
        let header_fields = Bytes::from(format!(
            "{{\"accountName\":{},\"totalLicenses\":{},\"assignedLicenses\":{},",
            head.account_name.get(),
            head.total_licenses.get(),
            head.assigned_licenses.get()
        ));
        let (devices, ranges) = match (head.device_list.first(), head.device_list.last()) {
            (Some(first), Some(last)) => {
                let start = offset_in(body, first.get())?;
                let end = offset_in(body, last.get())? + last.get().len();
                let ranges = ranges(&head.device_list, body, start);
                (body.slice(start..end), ranges)
            }
            _ => (Bytes::new(), None),
        };
        Some(PageIndex {
            header_fields,
            has_more_data: head.has_more_data,
            last_seen_device_id: head.last_seen_device_id,
            devices,
            device_count: head.device_list.len(),
            ranges,
        })
    }

    /// Bytes this index holds beyond the page itself (at most, for the cache's weigher).
    pub fn extra_bytes_bound(body_len: usize) -> usize {
        body_len / (CHECKPOINT_BYTES / 16) + 256
    }

    /// Finds `device_id` (an exact string match) in this page: `Ok(Some(assignmentTime))` when
    /// present (JSON `null` when the device has none), `Ok(None)` when absent, `Err` when the
    /// devices are not objects with a `deviceId`.
    pub fn find(&self, device_id: &str) -> Result<Option<Box<RawValue>>, NotDevices> {
        let Some(r) = &self.ranges else {
            return self.scan(0, device_id, None);
        };
        let Ok(wanted) = device_id.parse::<u64>() else {
            return Ok(None);
        };
        if wanted < r.first || wanted > r.last {
            return Ok(None);
        }
        // The last checkpoint below the id: every device numbered `wanted` comes after it.
        let i = r.checkpoints.partition_point(|&(id, _)| id < wanted);
        let from = i.checked_sub(1).map_or(0, |j| r.checkpoints[j].1 as usize);
        self.scan(from, device_id, Some(wanted))
    }

    /// Reads devices from byte `from` of the list until `device_id`, the end, or (when the order
    /// is known) a device numbered above `stop_above`.
    fn scan(
        &self,
        mut from: usize,
        device_id: &str,
        stop_above: Option<u64>,
    ) -> Result<Option<Box<RawValue>>, NotDevices> {
        let list = &self.devices[..];
        while from < list.len() {
            let mut stream = serde_json::Deserializer::from_slice(&list[from..]).into_iter();
            let d: Device = stream.next().ok_or(NotDevices)?.map_err(|_| NotDevices)?;
            from += stream.byte_offset();
            if d.device_id == device_id {
                let time = match d.assignment_time {
                    Some(t) => t.to_owned(),
                    None => RawValue::from_string("null".into()).map_err(|_| NotDevices)?,
                };
                return Ok(Some(time));
            }
            if stop_above.is_some_and(|w| d.device_id.parse::<u64>().is_ok_and(|id| id > w)) {
                return Ok(None);
            }
            while from < list.len() && (list[from].is_ascii_whitespace() || list[from] == b',') {
                from += 1;
            }
        }
        Ok(None)
    }
}

/// The ordered-ids view of a device list, or `None` when an id is not a number or out of order.
fn ranges(list: &[&RawValue], body: &[u8], start: usize) -> Option<Ranges> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Id<'a> {
        #[serde(borrow)]
        device_id: Cow<'a, str>,
    }
    let mut checkpoints = Vec::new();
    let mut prev: Option<u64> = None;
    let mut last_checkpoint: Option<usize> = None;
    for raw in list {
        let id: u64 = serde_json::from_str::<Id>(raw.get())
            .ok()?
            .device_id
            .parse()
            .ok()?;
        if prev.is_some_and(|p| p > id) {
            return None;
        }
        prev = Some(id);
        let at = offset_in(body, raw.get())? - start;
        if last_checkpoint.is_none_or(|c| at - c >= CHECKPOINT_BYTES) {
            checkpoints.push((id, u32::try_from(at).ok()?));
            last_checkpoint = Some(at);
        }
    }
    Some(Ranges {
        first: checkpoints.first()?.0,
        last: prev?,
        checkpoints,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(devices: &[&str], more: bool) -> Bytes {
        let list: Vec<String> = devices
            .iter()
            .map(|d| format!("{{\"deviceId\":\"{d}\",\"assignmentTime\":\"t{d}\"}}"))
            .collect();
        Bytes::from(format!(
            "{{\"accountName\":\"0001-01\",\"totalLicenses\":9,\"assignedLicenses\":3,\
             \"hasMoreData\":{more},\"lastSeenDeviceId\":{},\"deviceList\":[{}]}}",
            if more { devices.last().unwrap() } else { "0" },
            list.join(", ")
        ))
    }

    #[test]
    fn header_slice_and_cursor() {
        let body = page(&["100", "200", "300"], true);
        let p = PageIndex::parse(&body).unwrap();
        assert_eq!(
            &p.header_fields[..],
            br#"{"accountName":"0001-01","totalLicenses":9,"assignedLicenses":3,"#
        );
        assert!(p.has_more_data);
        assert_eq!(p.last_seen_device_id, 300);
        assert_eq!(p.device_count, 3);
        assert!(p.devices.starts_with(br#"{"deviceId":"100""#));
        assert!(p.devices.ends_with(br#""t300"}"#));
        let empty = PageIndex::parse(&page(&[], false)).unwrap();
        assert_eq!((empty.device_count, empty.devices.len()), (0, 0));
        assert!(PageIndex::parse(&Bytes::from_static(b"{\"deviceList\":[]}")).is_none());
    }

    #[test]
    fn finds_devices_across_checkpoints() {
        let ids: Vec<String> = (0..2000u64)
            .map(|i| (1_000_000 + 7 * i).to_string())
            .collect();
        let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
        let body = page(&refs, false);
        let p = PageIndex::parse(&body).unwrap();
        assert!(p.ranges.as_ref().unwrap().checkpoints.len() > 10);
        for id in &ids {
            let t = p.find(id).unwrap().unwrap();
            assert_eq!(t.get(), format!("\"t{id}\""));
        }
        for absent in ["1", "1000001", "999999999", "01000000", "x"] {
            assert!(p.find(absent).unwrap().is_none(), "{absent}");
        }
    }

    #[test]
    fn unordered_or_odd_ids_are_scanned() {
        let body = page(&["300", "100", "abc", "0200"], false);
        let p = PageIndex::parse(&body).unwrap();
        assert!(p.ranges.is_none());
        assert_eq!(p.find("100").unwrap().unwrap().get(), "\"t100\"");
        assert_eq!(p.find("abc").unwrap().unwrap().get(), "\"tabc\"");
        assert_eq!(p.find("0200").unwrap().unwrap().get(), "\"t0200\"");
        assert!(p.find("200").unwrap().is_none());
        // Leading zeros in an ordered page: numerically equal ids are all looked at.
        let body = page(&["5", "06", "6", "7"], false);
        let p = PageIndex::parse(&body).unwrap();
        assert!(p.ranges.is_some());
        assert_eq!(p.find("6").unwrap().unwrap().get(), "\"t6\"");
        assert_eq!(p.find("06").unwrap().unwrap().get(), "\"t06\"");
        assert!(p.find("006").unwrap().is_none());
        // A device without an assignment time answers null.
        let body = Bytes::from_static(
            br#"{"accountName":"a","totalLicenses":1,"assignedLicenses":1,"deviceList":[{"deviceId":"1"}]}"#,
        );
        assert_eq!(
            PageIndex::parse(&body)
                .unwrap()
                .find("1")
                .unwrap()
                .unwrap()
                .get(),
            "null"
        );
    }
}
