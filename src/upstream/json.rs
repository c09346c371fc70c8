//! Is an upstream 200 body one JSON object? A validating scan of the grammar (RFC 8259) that
//! builds nothing and allocates nothing: every upstream page goes through it on the miss path.
//!
//! It accepts what `serde_json` accepts as one value (checked against it by the tests below):
//! escapes are checked for their form (`\u` and four hex digits) but not decoded, bytes of 0x80
//! and above pass as they are (as serde_json's own `IgnoredAny` does: the body is passed through,
//! never decoded), and nesting has no limit (serde_json's `IgnoredAny` walks it iteratively
//! too).

/// True if `body` is exactly one JSON object, with optional whitespace around it.
pub fn is_object(body: &[u8]) -> bool {
    let start = skip_ws(body, 0);
    body.get(start) == Some(&b'{') && scan(body, start) == Some(body.len())
}

const ONES: u64 = u64::MAX / 255;
const HIGHS: u64 = ONES << 7;

/// A bit set for each byte of `chunk` that is `"`, `\` or a control character (the bytes that
/// end a run of plain string content), plus possibly bits above the first such byte.
#[inline(always)]
fn string_stops(chunk: u64) -> u64 {
    let ctrl = chunk.wrapping_sub(ONES * 0x20) & !chunk;
    let q = chunk ^ (ONES * u64::from(b'"'));
    let quote = q.wrapping_sub(ONES) & !q;
    let s = chunk ^ (ONES * u64::from(b'\\'));
    let backslash = s.wrapping_sub(ONES) & !s;
    (ctrl | quote | backslash) & HIGHS
}

#[inline(always)]
fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while let Some(b' ' | b'\n' | b'\r' | b'\t') = b.get(i) {
        i += 1;
    }
    i
}

/// `i` is just past an opening quote; the index just past the closing one.
#[inline(always)]
fn string(b: &[u8], mut i: usize) -> Option<usize> {
    loop {
        // Plain content eight bytes at a time, then byte by byte up to what stopped it.
        while let Some(chunk) = b.get(i..i + 8) {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            let stops = string_stops(u64::from_le_bytes(word));
            if stops != 0 {
                i += (stops.trailing_zeros() / 8) as usize;
                break;
            }
            i += 8;
        }
        match *b.get(i)? {
            b'"' => return Some(i + 1),
            b'\\' => {
                i = match *b.get(i + 1)? {
                    b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => i + 2,
                    b'u' => {
                        let hex = b.get(i + 2..i + 6)?;
                        if !hex.iter().all(u8::is_ascii_hexdigit) {
                            return None;
                        }
                        i + 6
                    }
                    _ => return None,
                };
            }
            c if c < 0x20 => return None,
            _ => i += 1,
        }
    }
}

#[inline(always)]
fn digits(b: &[u8], mut i: usize) -> usize {
    while b.get(i).is_some_and(u8::is_ascii_digit) {
        i += 1;
    }
    i
}

/// `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?` from `i`; the index past it.
fn number(b: &[u8], mut i: usize) -> Option<usize> {
    if b.get(i) == Some(&b'-') {
        i += 1;
    }
    match *b.get(i)? {
        b'0' => i += 1,
        b'1'..=b'9' => i = digits(b, i + 1),
        _ => return None,
    }
    if b.get(i) == Some(&b'.') {
        let end = digits(b, i + 1);
        if end == i + 1 {
            return None;
        }
        i = end;
    }
    if let Some(b'e' | b'E') = b.get(i) {
        i += 1;
        if let Some(b'+' | b'-') = b.get(i) {
            i += 1;
        }
        let end = digits(b, i);
        if end == i {
            return None;
        }
        i = end;
    }
    Some(i)
}

/// `i` is at an object key's opening quote; the index of the value after its colon.
#[inline(always)]
fn key(b: &[u8], i: usize) -> Option<usize> {
    if b.get(i) != Some(&b'"') {
        return None;
    }
    let i = skip_ws(b, string(b, i + 1)?);
    (b.get(i) == Some(&b':')).then(|| skip_ws(b, i + 1))
}

/// The open containers, one bit each (1 = object): 128 in a register, deeper ones spilled.
struct Nesting {
    bits: u128,
    depth: usize,
    spill: Vec<u128>,
}

impl Nesting {
    #[inline(always)]
    fn push(&mut self, object: bool) {
        if self.depth > 0 && self.depth.is_multiple_of(128) {
            self.spill.push(self.bits);
            self.bits = 0;
        }
        self.bits = (self.bits << 1) | u128::from(object);
        self.depth += 1;
    }

    #[inline(always)]
    fn pop(&mut self) {
        self.bits >>= 1;
        self.depth -= 1;
        if self.depth > 0 && self.depth.is_multiple_of(128) {
            self.bits = self.spill.pop().unwrap_or_default();
        }
    }

    #[inline(always)]
    fn in_object(&self) -> bool {
        self.bits & 1 == 1
    }
}

/// One JSON value starting at `i` (no leading whitespace); the index just past it. Iterative,
/// so any depth costs no recursion.
fn scan(b: &[u8], mut i: usize) -> Option<usize> {
    let mut open = Nesting {
        bits: 0,
        depth: 0,
        spill: Vec::new(),
    };
    loop {
        // A value at `i`.
        match *b.get(i)? {
            opener @ (b'{' | b'[') => {
                i = skip_ws(b, i + 1);
                let object = opener == b'{';
                if b.get(i) == Some(if object { &b'}' } else { &b']' }) {
                    i += 1;
                } else {
                    open.push(object);
                    if object {
                        i = key(b, i)?;
                    }
                    continue;
                }
            }
            b'"' => i = string(b, i + 1)?,
            b't' => i = literal(b, i, b"true")?,
            b'f' => i = literal(b, i, b"false")?,
            b'n' => i = literal(b, i, b"null")?,
            _ => i = number(b, i)?,
        }
        // After a value: separators and closes until the next value, or the end.
        loop {
            if open.depth == 0 {
                return Some(skip_ws(b, i));
            }
            i = skip_ws(b, i);
            match (*b.get(i)?, open.in_object()) {
                (b',', true) => {
                    i = key(b, skip_ws(b, i + 1))?;
                    break;
                }
                (b',', false) => {
                    i = skip_ws(b, i + 1);
                    break;
                }
                (b'}', true) | (b']', false) => {
                    i += 1;
                    open.pop();
                }
                _ => return None,
            }
        }
    }
}

#[inline(always)]
fn literal(b: &[u8], i: usize, word: &[u8]) -> Option<usize> {
    (b.get(i..i + word.len())? == word).then_some(i + word.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the gateway checked before: serde_json's `IgnoredAny`, behind a leading `{`.
    fn reference(b: &[u8]) -> bool {
        let first = b.iter().find(|c| !c.is_ascii_whitespace());
        first == Some(&b'{') && serde_json::from_slice::<serde::de::IgnoredAny>(b).is_ok()
    }

    #[test]
    fn accepts_objects_and_nothing_else() {
        for ok in [
            &b"{}"[..],
            b" \r\n\t{ } \n",
            b"{\"a\":1}",
            b"{\"a\":[1,-2.5e+3,0,0.0,1E9,true,false,null,\"x\\u00e9\\n\",{}],\"b\":{\"c\":[]}}",
            "{\"é\":\"ü\u{1F600}\"}".as_bytes(),
            b"{\"a\" : [ 1 , { \"b\" : null } ] }",
        ] {
            assert!(is_object(ok), "{}", String::from_utf8_lossy(ok));
            assert!(reference(ok));
        }
        for bad in [
            &b""[..],
            b"[1]",
            b"\"x\"",
            b"1",
            b"<html>",
            b"{\"a\":",
            b"{\"a\":1,}",
            b"{\"a\":1}{}",
            b"{\"a\":1} x",
            b"{a:1}",
            b"{\"a\":01}",
            b"{\"a\":1.}",
            b"{\"a\":1e}",
            b"{\"a\":-}",
            b"{\"a\":+1}",
            b"{\"a\":tru}",
            b"{\"a\":\"\\x\"}",
            b"{\"a\":\"\\u12g4\"}",
            b"{\"a\":\"tab\there\"}",
            b"{\"a\":\"open}",
            b"{\"a\":[1,2}",
            b"{\"a\":{]}",
            b"{\"a\" 1}",
            b"{,}",
            b"{\"a\":1 \"b\":2}",
        ] {
            assert!(!is_object(bad), "{}", String::from_utf8_lossy(bad));
            assert!(!reference(bad));
        }
    }

    #[test]
    fn any_depth_like_serde_json() {
        let nest = |n: usize, inner: &str| {
            let mut s = String::from("{\"a\":");
            for i in 0..n {
                s.push_str(if i % 3 == 0 { "{\"k\":" } else { "[" });
            }
            s.push_str(inner);
            for i in (0..n).rev() {
                s.push(if i % 3 == 0 { '}' } else { ']' });
            }
            s.push('}');
            s.into_bytes()
        };
        for n in [0, 1, 127, 128, 129, 255, 256, 257, 1000, 5000] {
            assert!(is_object(&nest(n, "1")), "depth {n}");
            assert!(reference(&nest(n, "1")), "depth {n}");
            assert!(!is_object(&nest(n, ",")), "depth {n}");
            let mut unbalanced = nest(n, "1");
            unbalanced.pop();
            assert!(!is_object(&unbalanced), "depth {n}");
        }
    }

    /// Every single-byte change of a real page and of a small document with every token kind
    /// gets the same verdict as serde_json's.
    #[test]
    fn agrees_with_serde_json_on_mutations() {
        let page = thingspace_sim::data::generate(1, 12, 1)[0].page(0, 12, None);
        let tokens = br#"{"s":"a\"b\\c\/\b\f\n\r\t\u00aF","n":[0,-1,2.50,3e-2,4E+7],"l":[true,false,null],"o":{"e":{},"a":[]}}"#;
        let alphabet = b"{}[]:,\"\\ -+.0123456789eEtrufalsn\x01\x7f\xc3";
        for doc in [&page[..], &tokens[..]] {
            assert!(is_object(doc));
            for pos in 0..doc.len() {
                for &c in alphabet {
                    let mut m = doc.to_vec();
                    m[pos] = c;
                    assert_eq!(
                        is_object(&m),
                        reference(&m),
                        "{}",
                        String::from_utf8_lossy(&m)
                    );
                }
                let mut cut = doc.to_vec();
                cut.remove(pos);
                assert_eq!(is_object(&cut), reference(&cut));
                assert!(!is_object(&doc[..pos]));
            }
        }
    }
}
