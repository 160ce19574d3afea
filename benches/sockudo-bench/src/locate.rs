//! Finds the `event`, `channel` and `data` members of a Pusher frame without building a JSON
//! tree: one pass over the top-level object that records where those three values lie and
//! skips every other value (nested objects, arrays, numbers, literals) by bracket depth. Keys
//! may come in any order and with any whitespace; strings may hold escapes (`\"`, `\u003a`),
//! which are decoded only when present; a `data` string that is itself a JSON-encoded string
//! (a server that encodes twice) is unwrapped once. The fan-out receivers run this on every
//! delivery, so it does no allocation when nothing is escaped.

use memchr::memchr2;

/// A JSON string value as it appears on the wire (between the quotes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JsonStr<'a> {
    pub raw: &'a [u8],
    /// Whether `raw` holds a backslash (and must be decoded before use).
    pub escaped: bool,
}

impl<'a> JsonStr<'a> {
    /// The string's bytes: `raw` itself when nothing is escaped, else decoded into `scratch`.
    pub fn bytes<'s>(&self, scratch: &'s mut Vec<u8>) -> Option<&'s [u8]>
    where
        'a: 's,
    {
        if !self.escaped {
            return Some(self.raw);
        }
        scratch.clear();
        unescape(self.raw, scratch)?;
        Some(scratch)
    }

    /// Whether the decoded string equals `s`.
    pub fn eq_str(&self, s: &str, scratch: &mut Vec<u8>) -> bool {
        if !self.escaped {
            return self.raw == s.as_bytes();
        }
        self.bytes(scratch) == Some(s.as_bytes())
    }
}

/// A member's value: a string, or any other JSON value as its raw text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Value<'a> {
    Str(JsonStr<'a>),
    Other(&'a [u8]),
}

/// The members of a Pusher frame that the tool reads.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Fields<'a> {
    pub event: Option<JsonStr<'a>>,
    pub channel: Option<JsonStr<'a>>,
    pub data: Option<Value<'a>>,
}

/// Locates `event`, `channel` and `data` in a JSON object; `None` if `msg` is not one.
pub fn locate(msg: &[u8]) -> Option<Fields<'_>> {
    let mut p = Scan { b: msg, i: 0 };
    p.ws();
    p.expect(b'{')?;
    let mut f = Fields::default();
    p.ws();
    if p.peek() == Some(b'}') {
        return Some(f);
    }
    loop {
        p.ws();
        p.expect(b'"')?;
        let key = p.string()?;
        p.ws();
        p.expect(b':')?;
        p.ws();
        let value = if p.peek() == Some(b'"') {
            p.i += 1;
            Value::Str(p.string()?)
        } else {
            Value::Other(p.skip_value()?)
        };
        let mut scratch = Vec::new();
        let name = key.bytes(&mut scratch)?;
        match (name, value) {
            (b"event", Value::Str(s)) => f.event = Some(s),
            (b"channel", Value::Str(s)) => f.channel = Some(s),
            (b"data", v) => f.data = Some(v),
            _ => {}
        }
        p.ws();
        match p.next()? {
            b',' => continue,
            b'}' => return Some(f),
            _ => return None,
        }
    }
}

/// The `data` member as a string: decoded if escaped, and unwrapped once more if it is itself
/// a JSON string literal. `None` when data is absent or not a string.
pub fn data_string<'s>(f: &Fields<'s>, scratch: &'s mut Vec<u8>) -> Option<&'s [u8]> {
    let Value::Str(s) = f.data? else {
        return None;
    };
    let inner = |b: &[u8]| b.len() >= 2 && b[0] == b'"' && b[b.len() - 1] == b'"';
    if !s.escaped {
        return Some(s.raw);
    }
    scratch.clear();
    unescape(s.raw, scratch)?;
    if inner(scratch) {
        let once: Vec<u8> = scratch[1..scratch.len() - 1].to_vec();
        scratch.clear();
        unescape(&once, scratch)?;
    }
    Some(scratch)
}

struct Scan<'a> {
    b: &'a [u8],
    i: usize,
}

impl<'a> Scan<'a> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn next(&mut self) -> Option<u8> {
        let c = self.peek()?;
        self.i += 1;
        Some(c)
    }

    fn ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\r' | b'\n')) {
            self.i += 1;
        }
    }

    fn expect(&mut self, c: u8) -> Option<()> {
        (self.next()? == c).then_some(())
    }

    /// Reads a string whose opening quote was consumed; leaves `i` after the closing quote.
    fn string(&mut self) -> Option<JsonStr<'a>> {
        let start = self.i;
        let mut escaped = false;
        loop {
            let at = self.i + memchr2(b'"', b'\\', &self.b[self.i..])?;
            if self.b[at] == b'"' {
                self.i = at + 1;
                return Some(JsonStr { raw: &self.b[start..at], escaped });
            }
            escaped = true;
            // Skip the backslash and the character it escapes.
            self.i = at + 2;
            if self.i > self.b.len() {
                return None;
            }
        }
    }

    /// Skips a non-string value; returns its raw text.
    fn skip_value(&mut self) -> Option<&'a [u8]> {
        let start = self.i;
        let mut depth = 0usize;
        loop {
            match self.peek()? {
                b'"' => {
                    self.i += 1;
                    self.string()?;
                    continue;
                }
                b'{' | b'[' => depth += 1,
                b'}' | b']' if depth == 0 => break,
                b'}' | b']' => depth -= 1,
                b',' if depth == 0 => break,
                _ => {}
            }
            self.i += 1;
        }
        let raw = &self.b[start..self.i];
        let raw = raw.trim_ascii_end();
        (!raw.is_empty()).then_some(raw)
    }
}

fn hex4(b: &[u8]) -> Option<u32> {
    let s = std::str::from_utf8(b.get(..4)?).ok()?;
    u32::from_str_radix(s, 16).ok()
}

/// Decodes JSON string escapes from `raw` into `out` (UTF-8); `None` on a bad escape.
pub fn unescape(raw: &[u8], out: &mut Vec<u8>) -> Option<()> {
    let mut i = 0;
    while i < raw.len() {
        let c = raw[i];
        if c != b'\\' {
            out.push(c);
            i += 1;
            continue;
        }
        let e = *raw.get(i + 1)?;
        i += 2;
        let simple = match e {
            b'"' => b'"',
            b'\\' => b'\\',
            b'/' => b'/',
            b'b' => 0x08,
            b'f' => 0x0C,
            b'n' => b'\n',
            b'r' => b'\r',
            b't' => b'\t',
            b'u' => {
                let mut cp = hex4(&raw[i..])?;
                i += 4;
                if (0xD800..0xDC00).contains(&cp) && raw.get(i..i + 2) == Some(b"\\u") {
                    let lo = hex4(&raw[i + 2..])?;
                    if (0xDC00..0xE000).contains(&lo) {
                        cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                        i += 6;
                    }
                }
                let ch = char::from_u32(cp).unwrap_or(char::REPLACEMENT_CHARACTER);
                let mut tmp = [0u8; 4];
                out.extend_from_slice(ch.encode_utf8(&mut tmp).as_bytes());
                continue;
            }
            _ => return None,
        };
        out.push(simple);
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data_of(msg: &str) -> Option<String> {
        let f = locate(msg.as_bytes())?;
        let mut scratch = Vec::new();
        data_string(&f, &mut scratch).map(|b| String::from_utf8_lossy(b).into_owned())
    }

    #[test]
    fn finds_the_members_of_a_plain_frame() {
        let msg = br#"{"event":"bench","channel":"bench-1-0","data":"1:2:3"}"#;
        let f = locate(msg).expect("object");
        let mut s = Vec::new();
        assert!(f.event.expect("event").eq_str("bench", &mut s));
        assert!(f.channel.expect("channel").eq_str("bench-1-0", &mut s));
        assert_eq!(data_of(std::str::from_utf8(msg).expect("utf8")).as_deref(), Some("1:2:3"));
    }

    #[test]
    fn any_order_whitespace_and_other_members() {
        let msg = r#" { "data" : "4:5:6" , "user_id":"u\"1", "extra": {"a":[1,{"b":"}"}],"c":null},
                      "channel":"c", "n": -1.5e3, "event" : "bench" } "#;
        let f = locate(msg.as_bytes()).expect("object");
        let mut s = Vec::new();
        assert!(f.event.expect("event").eq_str("bench", &mut s));
        assert!(f.channel.expect("channel").eq_str("c", &mut s));
        assert_eq!(data_of(msg).as_deref(), Some("4:5:6"));
    }

    #[test]
    fn decodes_escaped_and_double_encoded_data() {
        assert_eq!(data_of(r#"{"event":"bench","data":"1\u003a2\u003A3"}"#).as_deref(), Some("1:2:3"));
        assert_eq!(data_of(r#"{"event":"bench","data":"\"1:2:3\""}"#).as_deref(), Some("1:2:3"));
        assert_eq!(data_of(r#"{"event":"bench","data":"\"1\\u003a2:3\""}"#).as_deref(), Some("1:2:3"));
        assert_eq!(data_of(r#"{"event":"b\u0065nch","channel":"a\/b","data":"x"}"#).as_deref(), Some("x"));
        let f = locate(br#"{"event":"b\u0065nch","channel":"a\/b"}"#).expect("object");
        let mut s = Vec::new();
        assert!(f.event.expect("event").eq_str("bench", &mut s));
        assert!(f.channel.expect("channel").eq_str("a/b", &mut s));
    }

    #[test]
    fn object_data_is_not_a_string() {
        let msg = r#"{"event":"pusher:ping","data":{}}"#;
        let f = locate(msg.as_bytes()).expect("object");
        assert_eq!(f.data, Some(Value::Other(b"{}")));
        assert_eq!(data_of(msg), None);
    }

    #[test]
    fn refuses_what_is_not_an_object() {
        for bad in ["", "[]", "\"x\"", "{\"event\":", "{\"event\":\"x", "{\"a\" 1}", "{\"a\":1,}", "{\"a\":1 x"] {
            assert_eq!(locate(bad.as_bytes()), None, "{bad:?}");
        }
        assert_eq!(locate(b"{}"), Some(Fields::default()));
        // A bad escape is found only when the string is used.
        let f = locate(br#"{"event":"\q"}"#).expect("object");
        assert_eq!(f.event.expect("event").bytes(&mut Vec::new()), None);
    }

    #[test]
    fn unescapes_surrogate_pairs() {
        let mut out = Vec::new();
        unescape(br"\ud83d\ude00 \n", &mut out).expect("valid");
        assert_eq!(String::from_utf8(out).expect("utf8"), "\u{1F600} \n");
    }
}
