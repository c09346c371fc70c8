//! Secret values (client secrets, passwords, tokens) in a type that never prints itself.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

/// A string that must never reach a log line, an error body, `/status` or `Debug` output.
///
/// `Debug`, `Display` and `Serialize` all print a mask; only [`Secret::expose`] gives the value,
/// and every call of it is a place that sends the value somewhere on purpose.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// True when `presented` is this secret. Compares SHA-256 digests in constant time, so
    /// neither the contents nor the length of the secret leak through timing.
    pub fn matches(&self, presented: &str) -> bool {
        let sha = |s: &str| ring::digest::digest(&ring::digest::SHA256, s.as_bytes());
        ct_eq(sha(&self.0).as_ref(), sha(presented).as_ref())
    }

    fn mask(&self) -> &'static str {
        if self.0.is_empty() {
            ""
        } else {
            "MASKED"
        }
    }
}

/// Equality of two byte strings in time that depends only on their lengths.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A secret as written in a file or on stdin: one trailing line ending (`\n` or `\r\n`) is
/// removed and nothing else, so spaces, tabs and further newlines stay part of the secret.
pub fn strip_line_ending(text: &str) -> &str {
    text.strip_suffix("\r\n")
        .or_else(|| text.strip_suffix('\n'))
        .unwrap_or(text)
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret({})", self.mask())
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.mask())
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.mask())
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Secret)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_prints_the_value() {
        let s = Secret::new("hunter2");
        assert!(!format!("{s:?}").contains("hunter2"));
        assert!(!format!("{s}").contains("hunter2"));
        assert!(!serde_json::to_string(&s).unwrap().contains("hunter2"));
        assert_eq!(s.expose(), "hunter2");
    }

    #[test]
    fn matches_only_the_exact_value() {
        let s = Secret::new("admin-token-123");
        assert!(s.matches("admin-token-123"));
        for wrong in ["", "admin-token-12", "admin-token-1234", "Admin-token-123"] {
            assert!(!s.matches(wrong), "{wrong:?}");
        }
    }

    #[test]
    fn one_line_ending_is_removed_and_nothing_else() {
        for (text, secret) in [
            ("pw", "pw"),
            ("pw\n", "pw"),
            ("pw\r\n", "pw"),
            ("pw \n", "pw "),
            ("pw\t\r\n", "pw\t"),
            ("pw\n\n", "pw\n"),
            (" pw", " pw"),
            ("pw\r", "pw\r"),
            ("\n", ""),
        ] {
            assert_eq!(strip_line_ending(text), secret, "{text:?}");
        }
    }
}
