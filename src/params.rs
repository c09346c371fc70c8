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
    let digits = s.as_bytes();
    if digits.is_empty() || digits.len() > 20 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    // Up to 19 digits cannot overflow; 20 may.
    let (head, last) = match digits.len() {
        20 => (&digits[..19], Some(digits[19])),
        _ => (digits, None),
    };
    let n = head.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
    match last {
        None => Some(n),
        Some(d) => n.checked_mul(10)?.checked_add(u64::from(d - b'0')),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn u64_params_at_their_bounds() {
        assert_eq!(parse_u64_param("0"), Some(0));
        assert_eq!(parse_u64_param("007"), Some(7));
        assert_eq!(
            parse_u64_param("9999999999999999999"),
            Some(9_999_999_999_999_999_999)
        );
        assert_eq!(parse_u64_param("18446744073709551615"), Some(u64::MAX));
        assert_eq!(parse_u64_param("18446744073709551616"), None);
        assert_eq!(parse_u64_param("99999999999999999999"), None);
        assert_eq!(parse_u64_param("000000000000000000001"), None);
        for bad in ["", "-1", "+1", "1e3", " 1", "1/", "١"] {
            assert_eq!(parse_u64_param(bad), None, "{bad:?}");
        }
    }
}
