//! Path parameters as ThingSpace documents them, checked here on their own so that a validation
//! bug in the gateway shows up as a difference instead of being mirrored.
//!
//! - `account`: "the name of the account … usually numeric, and must include any leading zeros";
//!   the gateway's contract narrows it to 1–64 characters of `[0-9A-Za-z-]`, taken as is.
//! - `startIndex`: an integer cursor, "only return devices with IMEIs larger than this value; use
//!   0 for the first request": 1–20 decimal digits whose value fits in a u64. No sign, no spaces,
//!   no percent-encoding (the raw path is checked).

/// Longest account name accepted.
const ACCOUNT_MAX: usize = 64;

/// u64::MAX has 20 digits.
const INDEX_MAX_DIGITS: usize = 20;

/// Whether `name` has the shape of an account name.
pub fn account_ok(name: &str) -> bool {
    let len = name.chars().count();
    len > 0
        && len <= ACCOUNT_MAX
        && name
            .chars()
            .all(|c| c.is_ascii_digit() || c.is_ascii_alphabetic() || c == '-')
}

/// The value of a `startIndex` segment, or `None` when it is not a cursor.
pub fn start_index(segment: &str) -> Option<u64> {
    if segment.is_empty() || segment.len() > INDEX_MAX_DIGITS {
        return None;
    }
    segment.chars().try_fold(0u64, |value, c| {
        let digit = c.to_digit(10)?;
        value.checked_mul(10)?.checked_add(u64::from(digit))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn account_names() {
        for ok in ["0402196254-00001", "0", "abc-XYZ-09", &"9".repeat(64)] {
            assert!(account_ok(ok), "{ok:?}");
        }
        let too_long = "9".repeat(65);
        for bad in [
            "",
            too_long.as_str(),
            "a_b",
            "a.b",
            "a%2Fb",
            "a b",
            "a/b",
            "é",
            "１２",
        ] {
            assert!(!account_ok(bad), "{bad:?}");
        }
    }

    #[test]
    fn start_indexes() {
        assert_eq!(start_index("0"), Some(0));
        assert_eq!(start_index("007"), Some(7));
        assert_eq!(start_index("350000000000001"), Some(350_000_000_000_001));
        assert_eq!(start_index("18446744073709551615"), Some(u64::MAX));
        for bad in [
            "",
            "18446744073709551616",
            "000000000000000000001",
            "+1",
            "-1",
            " 1",
            "1 ",
            "1e3",
            "0x10",
            "%31",
            "١",
        ] {
            assert_eq!(start_index(bad), None, "{bad:?}");
        }
    }
}
