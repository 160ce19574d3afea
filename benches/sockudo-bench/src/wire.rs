//! WebSocket framing (RFC 6455) as a client needs it, without an I/O layer: the opening
//! handshake's request and its `101` response check, a decoder for server frames (7-, 16- and
//! 64-bit lengths, fragmented messages, ping, pong and close with its code) that works on a
//! caller's buffer, and an encoder for masked client frames. The fan-out receivers and the
//! hand-written subscribe path share it, so both read a server's bytes the same way.

use std::ops::Range;

use sha1::{Digest, Sha1};

pub const OP_CONTINUATION: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// Largest frame or reassembled message accepted (a garbage length must not allocate the heap).
pub const MAX_MESSAGE: usize = 64 * 1024 * 1024;

/// Why a byte stream is not a valid sequence of server frames.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WireError {
    /// RSV bits set: no extension was negotiated.
    ReservedBits,
    UnknownOpcode(u8),
    TooLarge(u64),
    /// A control frame that is fragmented or longer than 125 bytes.
    BadControlFrame,
    /// A continuation without a message in progress, or a new message before the last ended.
    BadFragmentation,
}

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::ReservedBits => write!(f, "reserved bits set"),
            Self::UnknownOpcode(op) => write!(f, "unknown opcode {op:#x}"),
            Self::TooLarge(n) => write!(f, "frame of {n} bytes"),
            Self::BadControlFrame => write!(f, "fragmented or oversized control frame"),
            Self::BadFragmentation => write!(f, "bad fragmentation"),
        }
    }
}

/// A frame header decoded from the start of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub fin: bool,
    pub opcode: u8,
    /// Servers must not mask, but a lenient client unmasks anyway.
    pub mask: Option<[u8; 4]>,
    pub header_len: usize,
    pub payload_len: usize,
}

/// Decodes the frame header at the start of `buf`; `Ok(None)` while it is incomplete.
pub fn parse_header(buf: &[u8]) -> Result<Option<Header>, WireError> {
    let [b0, b1, ..] = *buf else {
        return Ok(None);
    };
    if b0 & 0x70 != 0 {
        return Err(WireError::ReservedBits);
    }
    let opcode = b0 & 0x0F;
    if !matches!(opcode, OP_CONTINUATION | OP_TEXT | OP_BINARY | OP_CLOSE | OP_PING | OP_PONG) {
        return Err(WireError::UnknownOpcode(opcode));
    }
    let fin = b0 & 0x80 != 0;
    let masked = b1 & 0x80 != 0;
    let (len, mut at) = match b1 & 0x7F {
        126 => match buf.get(2..4) {
            Some(b) => (u64::from(u16::from_be_bytes([b[0], b[1]])), 4),
            None => return Ok(None),
        },
        127 => match buf.get(2..10) {
            Some(b) => (u64::from_be_bytes(b.try_into().unwrap_or([0xFF; 8])), 10),
            None => return Ok(None),
        },
        n => (u64::from(n), 2),
    };
    if len > MAX_MESSAGE as u64 {
        return Err(WireError::TooLarge(len));
    }
    if opcode >= OP_CLOSE && (!fin || len > 125) {
        return Err(WireError::BadControlFrame);
    }
    let mask = if masked {
        let Some(m) = buf.get(at..at + 4) else {
            return Ok(None);
        };
        at += 4;
        Some([m[0], m[1], m[2], m[3]])
    } else {
        None
    };
    Ok(Some(Header { fin, opcode, mask, header_len: at, payload_len: len as usize }))
}

/// A complete message or control frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Event<'a> {
    Text(&'a [u8]),
    Binary,
    Ping(&'a [u8]),
    Pong,
    /// A close frame; `code` is absent when its payload is empty.
    Close {
        code: Option<u16>,
        reason: &'a [u8],
    },
}

/// Where the next event's payload lies: in the caller's buffer or in the reassembly buffer.
enum Found {
    Frame(u8, Range<usize>),
    Assembled(u8),
}

/// Decodes a stream of server frames held in the caller's buffer, reassembling fragmented
/// messages (control frames may come between the fragments).
#[derive(Debug, Default)]
pub struct Reader {
    /// Opcode and payload so far of a fragmented message in progress.
    partial: Option<(u8, Vec<u8>)>,
    /// The last reassembled message (reused to keep its allocation).
    assembled: Vec<u8>,
}

impl Reader {
    /// Decodes the next event from `buf[*pos..]` and moves `pos` past the frames it used.
    /// `Ok(None)`: no complete frame at `pos` (keep `buf[*pos..]` and read more).
    pub fn next<'a>(&'a mut self, buf: &'a mut [u8], pos: &mut usize) -> Result<Option<Event<'a>>, WireError> {
        let found = loop {
            let Some(h) = parse_header(&buf[*pos..])? else {
                return Ok(None);
            };
            let start = *pos + h.header_len;
            let end = start + h.payload_len;
            if end > buf.len() {
                return Ok(None);
            }
            *pos = end;
            if let Some(mask) = h.mask {
                for (i, b) in buf[start..end].iter_mut().enumerate() {
                    *b ^= mask[i % 4];
                }
            }
            match h.opcode {
                OP_TEXT | OP_BINARY if self.partial.is_some() => return Err(WireError::BadFragmentation),
                OP_TEXT | OP_BINARY if h.fin => break Found::Frame(h.opcode, start..end),
                OP_TEXT | OP_BINARY => self.partial = Some((h.opcode, buf[start..end].to_vec())),
                OP_CONTINUATION => {
                    let Some((op, mut data)) = self.partial.take() else {
                        return Err(WireError::BadFragmentation);
                    };
                    if data.len() + h.payload_len > MAX_MESSAGE {
                        return Err(WireError::TooLarge((data.len() + h.payload_len) as u64));
                    }
                    data.extend_from_slice(&buf[start..end]);
                    if h.fin {
                        self.assembled = data;
                        break Found::Assembled(op);
                    }
                    self.partial = Some((op, data));
                }
                op => break Found::Frame(op, start..end),
            }
        };
        let buf: &'a [u8] = buf;
        let this: &'a Self = self;
        Ok(Some(match found {
            Found::Assembled(OP_TEXT) => Event::Text(&this.assembled),
            Found::Assembled(_) => Event::Binary,
            Found::Frame(OP_TEXT, r) => Event::Text(&buf[r]),
            Found::Frame(OP_PING, r) => Event::Ping(&buf[r]),
            Found::Frame(OP_PONG, _) => Event::Pong,
            Found::Frame(OP_CLOSE, r) => {
                let p = &buf[r];
                match p {
                    [hi, lo, reason @ ..] => Event::Close { code: Some(u16::from_be_bytes([*hi, *lo])), reason },
                    _ => Event::Close { code: None, reason: &[] },
                }
            }
            Found::Frame(..) => Event::Binary,
        }))
    }

    /// Whether a fragmented message is in progress (bytes that a closed stream cut short).
    pub fn in_message(&self) -> bool {
        self.partial.is_some()
    }
}

/// Appends a masked client frame (FIN set) to `out`.
pub fn encode_client(opcode: u8, payload: &[u8], mask: [u8; 4], out: &mut Vec<u8>) {
    out.push(0x80 | opcode);
    let len = payload.len();
    if len < 126 {
        out.push(0x80 | len as u8);
    } else if let Ok(short) = u16::try_from(len) {
        out.push(0x80 | 126);
        out.extend_from_slice(&short.to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
}

/// Appends a masked close frame with `code` to `out`.
pub fn encode_close(code: u16, mask: [u8; 4], out: &mut Vec<u8>) {
    encode_client(OP_CLOSE, &code.to_be_bytes(), mask, out);
}

/// A small xorshift generator for masking keys and handshake nonces. RFC 6455 asks for
/// unpredictable masks to protect proxies from cache poisoning; a load tool talking to its
/// own test servers needs only distinct ones.
#[derive(Debug, Clone)]
pub struct Masks(u64);

impl Masks {
    pub fn new(seed: u64) -> Self {
        Self(seed | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn mask(&mut self) -> [u8; 4] {
        let b = self.next_u64().to_le_bytes();
        [b[0], b[1], b[2], b[3]]
    }
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding.
pub fn base64(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(B64[(n >> (18 - 6 * i) & 0x3F) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The `Sec-WebSocket-Accept` value a server must answer `key` with.
pub fn accept_key(key: &str) -> String {
    let mut h = Sha1::new();
    h.update(key.as_bytes());
    h.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    base64(&h.finalize())
}

/// The opening handshake request for `path` (with its query) on `authority`.
pub fn handshake_request(authority: &str, path: &str, key: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: {authority}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nUser-Agent: sockudo-bench\r\n\r\n"
    )
}

/// Checks the handshake response at the start of `buf`: `Ok(Some(n))` with the length of the
/// HTTP head (the frames start at `n`), `Ok(None)` while it is incomplete, or why it is refused.
pub fn parse_handshake_response(buf: &[u8], key: &str) -> Result<Option<usize>, String> {
    const LIMIT: usize = 16 * 1024;
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return if buf.len() > LIMIT { Err("response head too long".into()) } else { Ok(None) };
    };
    let head = String::from_utf8_lossy(&buf[..end]);
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap_or_default();
    let code = status.split_whitespace().nth(1).unwrap_or_default();
    if code != "101" {
        return Err(format!("HTTP status {}", status.trim()));
    }
    let want = accept_key(key);
    let accepted = lines
        .filter_map(|l| l.split_once(':'))
        .any(|(name, value)| name.trim().eq_ignore_ascii_case("sec-websocket-accept") && value.trim() == want);
    if !accepted {
        return Err("missing or wrong Sec-WebSocket-Accept".into());
    }
    Ok(Some(end + 4))
}

#[cfg(test)]
pub mod tests {
    use super::*;

    /// An unmasked server frame, as a server would send it.
    pub fn server_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![if fin { 0x80 } else { 0 } | opcode];
        let len = payload.len();
        if len < 126 {
            out.push(len as u8);
        } else if let Ok(short) = u16::try_from(len) {
            out.push(126);
            out.extend_from_slice(&short.to_be_bytes());
        } else {
            out.push(127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
        out.extend_from_slice(payload);
        out
    }

    fn all(mut buf: Vec<u8>) -> (Vec<String>, usize) {
        let mut r = Reader::default();
        let mut pos = 0;
        let mut out = Vec::new();
        while let Some(e) = r.next(&mut buf, &mut pos).expect("valid frames") {
            out.push(match e {
                Event::Text(t) => format!("text:{}", t.len()),
                Event::Binary => "binary".into(),
                Event::Ping(p) => format!("ping:{}", String::from_utf8_lossy(p)),
                Event::Pong => "pong".into(),
                Event::Close { code, reason } => format!("close:{code:?}:{}", String::from_utf8_lossy(reason)),
            });
        }
        (out, pos)
    }

    #[test]
    fn decodes_the_three_length_forms() {
        for len in [0usize, 125, 126, 65_535, 65_536] {
            let frame = server_frame(true, OP_TEXT, &vec![b'a'; len]);
            let header = parse_header(&frame).expect("valid").expect("complete");
            assert_eq!(header.payload_len, len);
            assert_eq!(
                header.header_len,
                if len < 126 {
                    2
                } else if len <= 65_535 {
                    4
                } else {
                    10
                }
            );
            let (events, pos) = all(frame.clone());
            assert_eq!(events, vec![format!("text:{len}")]);
            assert_eq!(pos, frame.len());
        }
    }

    #[test]
    fn waits_for_incomplete_frames() {
        let frame = server_frame(true, OP_TEXT, &[b'x'; 300]);
        for cut in [0, 1, 3, 4, 100, frame.len() - 1] {
            let mut buf = frame[..cut].to_vec();
            let mut pos = 0;
            assert_eq!(Reader::default().next(&mut buf, &mut pos), Ok(None), "cut at {cut}");
            assert_eq!(pos, 0);
        }
    }

    #[test]
    fn reassembles_fragments_around_a_ping() {
        let mut buf = server_frame(false, OP_TEXT, b"{\"event\":");
        buf.extend(server_frame(true, OP_PING, b"hi"));
        buf.extend(server_frame(false, OP_CONTINUATION, b"\"bench\""));
        buf.extend(server_frame(true, OP_CONTINUATION, b"}"));
        let mut r = Reader::default();
        let mut pos = 0;
        assert_eq!(r.next(&mut buf, &mut pos), Ok(Some(Event::Ping(b"hi"))));
        assert!(r.in_message());
        assert_eq!(r.next(&mut buf, &mut pos), Ok(Some(Event::Text(b"{\"event\":\"bench\"}"))));
        assert!(!r.in_message());
        assert_eq!(pos, buf.len());
    }

    #[test]
    fn decodes_close_with_code_and_reason() {
        let mut payload = 4100u16.to_be_bytes().to_vec();
        payload.extend_from_slice(b"Slow consumer");
        let (events, _) = all(server_frame(true, OP_CLOSE, &payload));
        assert_eq!(events, vec!["close:Some(4100):Slow consumer".to_owned()]);
        let (events, _) = all(server_frame(true, OP_CLOSE, &[]));
        assert_eq!(events, vec!["close:None:".to_owned()]);
    }

    #[test]
    fn refuses_bad_frames() {
        let mut r = Reader::default();
        let mut pos = 0;
        assert_eq!(r.next(&mut server_frame(true, 0x3, b""), &mut pos), Err(WireError::UnknownOpcode(3)));
        assert_eq!(r.next(&mut server_frame(false, OP_PING, b""), &mut 0), Err(WireError::BadControlFrame));
        assert_eq!(r.next(&mut server_frame(true, OP_CONTINUATION, b"x"), &mut 0), Err(WireError::BadFragmentation));
        let mut rsv = server_frame(true, OP_TEXT, b"x");
        rsv[0] |= 0x40;
        assert_eq!(r.next(&mut rsv, &mut 0), Err(WireError::ReservedBits));
        let mut huge = vec![0x81, 127];
        huge.extend_from_slice(&u64::MAX.to_be_bytes());
        assert_eq!(r.next(&mut huge, &mut 0), Err(WireError::TooLarge(u64::MAX)));
    }

    #[test]
    fn unmasks_masked_server_frames() {
        let mut buf = Vec::new();
        encode_client(OP_TEXT, b"hello", [1, 2, 3, 4], &mut buf);
        let (events, _) = all(buf);
        assert_eq!(events, vec!["text:5".to_owned()]);
    }

    #[test]
    fn encodes_masked_client_frames() {
        for len in [5usize, 200, 70_000] {
            let payload = vec![b'p'; len];
            let mut buf = Vec::new();
            encode_client(OP_TEXT, &payload, [9, 8, 7, 6], &mut buf);
            let h = parse_header(&buf).expect("valid").expect("complete");
            assert_eq!((h.fin, h.opcode, h.mask, h.payload_len), (true, OP_TEXT, Some([9, 8, 7, 6]), len));
            assert_ne!(&buf[h.header_len..h.header_len + 5], b"ppppp", "masked on the wire");
            let mut pos = 0;
            let mut r = Reader::default();
            assert_eq!(r.next(&mut buf, &mut pos), Ok(Some(Event::Text(&payload[..]))));
        }
        let mut pong = Vec::new();
        encode_client(OP_PONG, b"p", [1, 1, 1, 1], &mut pong);
        assert_eq!(Reader::default().next(&mut pong, &mut 0), Ok(Some(Event::Pong)));
        let mut close = Vec::new();
        encode_close(1000, [0; 4], &mut close);
        assert_eq!(close, vec![0x88, 0x82, 0, 0, 0, 0, 0x03, 0xE8]);
    }

    #[test]
    fn handshake_accept_matches_rfc_example() {
        assert_eq!(accept_key("dGhlIHNhbXBsZSBub25jZQ=="), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        assert_eq!(base64(b"the sample nonce"), "dGhlIHNhbXBsZSBub25jZQ==");
        assert_eq!(base64(b"ab"), "YWI=");
        let resp = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                     sec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n\x81\x00";
        assert_eq!(parse_handshake_response(resp, "dGhlIHNhbXBsZSBub25jZQ=="), Ok(Some(resp.len() - 2)));
        assert_eq!(parse_handshake_response(&resp[..20], "dGhlIHNhbXBsZSBub25jZQ=="), Ok(None));
        assert!(parse_handshake_response(b"HTTP/1.1 404 Not Found\r\n\r\n", "k").is_err());
        assert!(parse_handshake_response(resp, "other").is_err());
    }
}
