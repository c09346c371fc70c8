//! The rules for the parameters of ThingSpace's paths (SPEC §4), shared by routing, the admin
//! purge route and config validation. Checked on the raw path, before any decoding.

pub const INVALID_ACCOUNT: &str = "Invalid account name format";
pub const INVALID_INDEX: &str = "Invalid index value";
pub const INVALID_DEVICE: &str = "Invalid device id format";

/// 1–64 of `[0-9A-Za-z-]`, kept exactly (leading zeros matter).
pub fn valid_account(s: &str) -> bool {
    (1..=64).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// 1–20 decimal digits that fit in a u64.
pub fn parse_u64_param(s: &str) -> Option<u64> {
    if s.is_empty() || s.len() > 20 {
        return None;
    }
    s.bytes().try_fold(0u64, |n, b| {
        let digit = b.wrapping_sub(b'0');
        if digit > 9 {
            return None;
        }
        n.checked_mul(10)?.checked_add(u64::from(digit))
    })
}
