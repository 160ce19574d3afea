//! Hostile input: a named corpus of malformed, oversized, truncated and protocol-violating
//! input, each with its exact outcome (a `pusher:error` code, a subscription error status, a
//! close code, a dropped connection or an HTTP status), run against one server while a healthy
//! neighbour keeps receiving. The hostile side speaks raw TCP: it does the WebSocket handshake
//! itself and writes hand-built frames, so that it can send what no WebSocket library would.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::*;

/// What the hostile connection is made to do before the input (each step must succeed).
#[derive(Clone, Copy)]
enum Setup {
    None,
    /// Subscribe to a public channel.
    Subscribe(&'static str),
    /// Subscribe to a private (or private-encrypted) channel with a valid signature.
    SubscribePrivate(&'static str),
    /// Sign in as this user with a valid signature.
    SignIn(&'static str),
}

/// The hostile input.
#[derive(Clone, Copy)]
enum Input {
    /// One masked text frame after the handshake.
    Text(&'static str),
    /// One masked text frame built from the connection's socket id (for signatures) or too
    /// long to write out.
    Json(fn(&str) -> String),
    /// Raw bytes written after the handshake (hand-built frames).
    Frames(fn() -> Vec<u8>),
    /// Raw bytes written after the handshake, then the write half is shut down (EOF).
    FramesThenEof(fn() -> Vec<u8>),
    /// Raw bytes written to the port instead of a WebSocket handshake.
    RawHttp(fn() -> Vec<u8>),
}

/// The exact outcome.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Expect {
    /// `pusher:error` with this code; the socket stays open.
    Error(u16),
    /// `pusher:subscription_error` with this status; the socket stays open.
    SubError(u16),
    /// The next frame is this event; the socket stays open.
    Reply(&'static str),
    /// Nothing is sent back; the socket stays open.
    Silent,
    /// A close frame with this code, then the TCP connection ends.
    Close(u16),
    /// The TCP connection ends (a protocol violation: tungstenite fails the connection). A
    /// close frame before it may only carry 1002 (protocol error) or 1007 (invalid data).
    Dropped,
    /// An HTTP response with this status (no upgrade).
    Status(u16),
}

struct Case {
    name: &'static str,
    setup: Setup,
    input: Input,
    expect: Expect,
}

const fn case(name: &'static str, input: Input, expect: Expect) -> Case {
    Case { name, setup: Setup::None, input, expect }
}

const fn after(name: &'static str, setup: Setup, input: Input, expect: Expect) -> Case {
    Case { name, setup, input, expect }
}

use Expect::*;
use Input::*;

// Limits of the corpus server (see `corpus_server`).
const SOFT_LIMIT: usize = 8 * 1024;
const HARD_LIMIT: usize = 16 * 1024;
const CLIENT_PAYLOAD_LIMIT: usize = 4 * 1024;

const CORPUS: &[Case] = &[
    // --- Malformed JSON -------------------------------------------------------------------
    case("json_open_brace", Text("{"), Error(4300)),
    case("json_trailing_garbage", Text(r#"{"event":"pusher:ping"}}"#), Error(4300)),
    case("json_array", Text("[]"), Error(4300)),
    case("json_null", Text("null"), Error(4300)),
    case("json_bare_string", Text(r#""pusher:ping""#), Error(4300)),
    case("json_number", Text("12345"), Error(4300)),
    case("empty_text_frame", Text(""), Error(4300)),
    case("whitespace_only", Text(" \t\r\n "), Error(4300)),
    case("json_single_quotes", Text("{'event':'pusher:ping'}"), Error(4300)),
    case("json_unterminated_string", Text(r#"{"event":"pusher:ping"#), Error(4300)),
    case("json_lone_surrogate_escape_in_event", Text(r#"{"event":"client-\ud800"}"#), Error(4300)),
    case("json_duplicate_event_key", Text(r#"{"event":"pusher:ping","event":"pusher:subscribe"}"#), Error(4300)),
    // A frame is an object: serde's positional form of a struct (an array) is not one.
    case("frame_as_positional_array", Text(r#"["pusher:subscribe",null,{"channel":"arr-frame"}]"#), Error(4300)),
    case("json_nan_literal", Text(r#"{"event":"pusher:ping","data":NaN}"#), Error(4300)),
    // --- Deeply nested JSON -------------------------------------------------------------------
    case("deep_nesting_top_level", Json(|_| nested(4000)), Error(4300)),
    case(
        "deep_nesting_unclosed",
        Json(|_| format!(r#"{{"event":"pusher:ping","data":{}"#, "[".repeat(7000))),
        Error(4300),
    ),
    case(
        "deep_nesting_as_channel",
        Json(|_| format!(r#"{{"event":"pusher:subscribe","data":{{"channel":{}}}}}"#, nested(3000))),
        Error(4300),
    ),
    case(
        "deep_nesting_in_string_data",
        Json(|_| json!({"event": "pusher:subscribe", "data": nested(3000)}).to_string()),
        Error(4300),
    ),
    // Ping data is never looked at: it is skipped without recursion.
    case(
        "deep_nesting_in_ping_data",
        Json(|_| format!(r#"{{"event":"pusher:ping","data":{}}}"#, nested(3500))),
        Reply("pusher:pong"),
    ),
    case(
        "deep_nesting_in_unknown_field",
        Json(|_| format!(r#"{{"event":"pusher:ping","x":{}}}"#, nested(3500))),
        Reply("pusher:pong"),
    ),
    case(
        "deep_nesting_signin_user_id",
        Json(|_| signin_raw(&format!(r#"{{"id":{}}}"#, nested(500)), "x")),
        Error(4300),
    ),
    // --- Pings and pongs ----------------------------------------------------------------------
    case(
        "famous_crasher_ping_with_empty_string_data",
        Text(r#"{"event":"pusher:ping","data":""}"#),
        Reply("pusher:pong"),
    ),
    case("ping_without_data", Text(r#"{"event":"pusher:ping"}"#), Reply("pusher:pong")),
    case("ping_with_number_data", Text(r#"{"event":"pusher:ping","data":5}"#), Reply("pusher:pong")),
    case("unsolicited_pong", Text(r#"{"event":"pusher:pong","data":{}}"#), Silent),
    // --- Event names ----------------------------------------------------------------------------
    case("event_missing", Text(r#"{"data":{}}"#), Error(4300)),
    case("event_number", Text(r#"{"event":1}"#), Error(4300)),
    case("event_null", Text(r#"{"event":null}"#), Error(4300)),
    case("event_empty", Text(r#"{"event":""}"#), Error(4300)),
    case("event_unknown_pusher", Text(r#"{"event":"pusher:nope","data":{}}"#), Error(4300)),
    case("event_with_nul", Text(r#"{"event":"pusher:ping\u0000"}"#), Error(4300)),
    case(
        "event_spoofed_internal",
        Text(r#"{"event":"pusher_internal:subscription_succeeded","channel":"x","data":"{}"}"#),
        Error(4300),
    ),
    case("event_without_client_prefix", Text(r#"{"event":"hello","channel":"private-a","data":{}}"#), Error(4300)),
    // --- Wrong data types -------------------------------------------------------------------------
    case("subscribe_data_number", Text(r#"{"event":"pusher:subscribe","data":7}"#), Error(4300)),
    case("subscribe_data_null", Text(r#"{"event":"pusher:subscribe","data":null}"#), Error(4300)),
    case("subscribe_data_bool", Text(r#"{"event":"pusher:subscribe","data":true}"#), Error(4300)),
    case("subscribe_data_empty_array", Text(r#"{"event":"pusher:subscribe","data":[]}"#), Error(4300)),
    // `data` is an object (or a string holding one), never serde's positional array form.
    case("subscribe_data_array", Text(r#"{"event":"pusher:subscribe","data":["arr"]}"#), Error(4300)),
    case("subscribe_data_string_not_json", Text(r#"{"event":"pusher:subscribe","data":"news"}"#), Error(4300)),
    case("subscribe_data_missing", Text(r#"{"event":"pusher:subscribe"}"#), Error(4300)),
    case("subscribe_channel_missing", Text(r#"{"event":"pusher:subscribe","data":{}}"#), Error(4300)),
    case("subscribe_channel_number", Text(r#"{"event":"pusher:subscribe","data":{"channel":5}}"#), Error(4300)),
    case("subscribe_channel_null", Text(r#"{"event":"pusher:subscribe","data":{"channel":null}}"#), Error(4300)),
    case("subscribe_channel_array", Text(r#"{"event":"pusher:subscribe","data":{"channel":["a","b"]}}"#), Error(4300)),
    case(
        "subscribe_auth_number",
        Text(r#"{"event":"pusher:subscribe","data":{"channel":"private-a","auth":5}}"#),
        Error(4300),
    ),
    case(
        "subscribe_channel_data_object",
        Text(
            r#"{"event":"pusher:subscribe","data":{"channel":"presence-a","auth":"a:b","channel_data":{"user_id":"1"}}}"#,
        ),
        Error(4300),
    ),
    case("unsubscribe_data_number", Text(r#"{"event":"pusher:unsubscribe","data":1}"#), Error(4300)),
    case("unsubscribe_never_subscribed", Text(r#"{"event":"pusher:unsubscribe","data":{"channel":"never"}}"#), Silent),
    case("signin_data_number", Text(r#"{"event":"pusher:signin","data":1}"#), Error(4300)),
    case(
        "signin_missing_auth",
        Text(r#"{"event":"pusher:signin","data":{"user_data":"{\"id\":\"u\"}"}}"#),
        Error(4300),
    ),
    case(
        "signin_user_data_object",
        Text(r#"{"event":"pusher:signin","data":{"auth":"a:b","user_data":{"id":"u"}}}"#),
        Error(4300),
    ),
    // --- Bad channel names --------------------------------------------------------------------------
    case("channel_empty", Json(|_| subscribe_raw("")), Error(4300)),
    case("channel_space", Json(|_| subscribe_raw("a b")), Error(4300)),
    case("channel_too_long", Json(|_| subscribe_raw(&"a".repeat(201))), Error(4300)),
    case("channel_non_ascii", Json(|_| subscribe_raw("news-\u{e9}")), Error(4300)),
    case("channel_nul", Json(|_| subscribe_raw("a\0b")), Error(4300)),
    case("channel_newline", Json(|_| subscribe_raw("a\nb")), Error(4300)),
    case("channel_bidi_override", Json(|_| subscribe_raw("private-\u{202e}a")), Error(4300)),
    case("channel_user_prefix_without_id", Json(|_| subscribe_raw("#server-to-user-")), Error(4300)),
    case("channel_other_hash", Json(|_| subscribe_raw("#other")), Error(4300)),
    // --- Bad auth strings -----------------------------------------------------------------------------
    case("private_without_auth", Json(|_| subscribe_raw("private-h")), SubError(401)),
    case("private_auth_empty", Json(|_| subscribe_auth("private-h", "")), SubError(401)),
    case("private_auth_without_colon", Json(|_| subscribe_auth("private-h", "nocolon")), SubError(401)),
    case("private_auth_non_hex", Json(|_| subscribe_auth("private-h", &format!("{KEY}:zzzz"))), SubError(401)),
    case(
        "private_auth_wrong_key",
        Json(|s| subscribe_auth("private-h", &format!("py-key:{}", sig(SECRET, &format!("{s}:private-h"))))),
        SubError(401),
    ),
    case(
        "private_auth_wrong_secret",
        Json(|s| subscribe_auth("private-h", &format!("{KEY}:{}", sig("py-secret", &format!("{s}:private-h"))))),
        SubError(401),
    ),
    case(
        "private_auth_for_another_socket",
        Json(|_| subscribe_auth("private-h", &format!("{KEY}:{}", sig(SECRET, "1.1:private-h")))),
        SubError(401),
    ),
    case(
        "private_auth_for_another_channel",
        Json(|s| subscribe_auth("private-h", &format!("{KEY}:{}", sig(SECRET, &format!("{s}:private-other"))))),
        SubError(401),
    ),
    case(
        "private_auth_truncated_odd",
        Json(|s| subscribe_auth("private-h", &format!("{KEY}:{}", &sig(SECRET, &format!("{s}:private-h"))[..63]))),
        SubError(401),
    ),
    case(
        "private_auth_signature_prefix",
        Json(|s| subscribe_auth("private-h", &format!("{KEY}:{}", &sig(SECRET, &format!("{s}:private-h"))[..32]))),
        SubError(401),
    ),
    case(
        "private_auth_extra_colon",
        Json(|s| subscribe_auth("private-h", &format!("{KEY}:{}:x", sig(SECRET, &format!("{s}:private-h"))))),
        SubError(401),
    ),
    case("encrypted_without_auth", Json(|_| subscribe_raw("private-encrypted-h")), SubError(401)),
    case("presence_without_auth", Json(|_| subscribe_raw("presence-h")), SubError(401)),
    // --- Bad channel_data / user_data ---------------------------------------------------------------
    case(
        "presence_without_channel_data",
        Json(|s| subscribe_auth("presence-h", &format!("{KEY}:{}", sig(SECRET, &format!("{s}:presence-h"))))),
        SubError(400),
    ),
    case("presence_channel_data_not_json", Json(|s| presence(s, "not json")), SubError(400)),
    // channel_data is a JSON object with user_id (signed, so only its shape is wrong).
    case("presence_channel_data_array", Json(|s| presence(s, "[1]")), SubError(400)),
    case("presence_user_id_empty", Json(|s| presence(s, r#"{"user_id":""}"#)), SubError(400)),
    case("presence_user_id_null", Json(|s| presence(s, r#"{"user_id":null}"#)), SubError(400)),
    case("presence_user_id_array", Json(|s| presence(s, r#"{"user_id":[1]}"#)), SubError(400)),
    case("presence_user_id_missing", Json(|s| presence(s, r#"{"user_info":{}}"#)), SubError(400)),
    case(
        "presence_user_id_too_long",
        Json(|s| presence(s, &json!({"user_id": "u".repeat(201)}).to_string())),
        SubError(400),
    ),
    case(
        "presence_channel_data_too_large",
        Json(|s| presence(s, &json!({"user_id": "u", "user_info": {"pad": "x".repeat(3000)}}).to_string())),
        SubError(400),
    ),
    case(
        "presence_user_id_deeply_nested",
        Json(|s| presence(s, &format!(r#"{{"user_id":{}}}"#, nested(500)))),
        SubError(400),
    ),
    case(
        "presence_channel_data_changed_after_signing",
        Json(|s| {
            let auth = format!("{KEY}:{}", sig(SECRET, &format!(r#"{s}:presence-h:{{"user_id":"a"}}"#)));
            subscribe_full("presence-h", &auth, r#"{"user_id":"admin"}"#)
        }),
        SubError(401),
    ),
    case("user_channel_without_signin", Json(|_| subscribe_raw("#server-to-user-u1")), SubError(403)),
    after(
        "user_channel_of_another_user",
        Setup::SignIn("u1"),
        Json(|_| subscribe_raw("#server-to-user-u2")),
        SubError(403),
    ),
    case("signin_user_data_not_json", Json(|s| signin(s, "not json")), Error(4300)),
    case("signin_user_data_without_id", Json(|s| signin(s, r#"{"name":"x"}"#)), Error(4300)),
    case("signin_user_data_numeric_id", Json(|s| signin(s, r#"{"id":5}"#)), Error(4300)),
    case("signin_user_data_positional_array", Json(|s| signin(s, r#"["u1"]"#)), Error(4300)),
    case("signin_user_data_empty_id", Json(|s| signin(s, r#"{"id":""}"#)), Error(4300)),
    case("signin_bad_signature", Json(|_| signin_raw(r#"{"id":"u1"}"#, &format!("{KEY}:00"))), Error(4302)),
    case(
        "signin_signature_of_another_socket",
        Json(|_| signin_raw(r#"{"id":"u1"}"#, &format!("{KEY}:{}", sig(SECRET, r#"1.1::user::{"id":"u1"}"#)))),
        Error(4302),
    ),
    after("signin_as_a_second_user", Setup::SignIn("u1"), Json(|s| signin(s, r#"{"id":"u2"}"#)), Error(4302)),
    // --- Client events ------------------------------------------------------------------------------
    after(
        "client_event_on_public_channel",
        Setup::Subscribe("pub"),
        Text(r#"{"event":"client-x","channel":"pub","data":{}}"#),
        Error(4301),
    ),
    after(
        "client_event_on_encrypted_channel",
        Setup::SubscribePrivate("private-encrypted-e"),
        Text(r#"{"event":"client-x","channel":"private-encrypted-e","data":{}}"#),
        Error(4301),
    ),
    case("client_event_not_subscribed", Text(r#"{"event":"client-x","channel":"private-n","data":{}}"#), Error(4301)),
    case("client_event_without_channel", Text(r#"{"event":"client-x","data":{}}"#), Error(4301)),
    after(
        "client_event_without_data",
        Setup::SubscribePrivate("private-c"),
        Text(r#"{"event":"client-x","channel":"private-c"}"#),
        Error(4301),
    ),
    after(
        "client_event_name_too_long",
        Setup::SubscribePrivate("private-c"),
        Json(|_| {
            json!({"event": format!("client-{}", "x".repeat(200)), "channel": "private-c", "data": {}}).to_string()
        }),
        Error(4301),
    ),
    after(
        "client_event_payload_over_limit",
        Setup::SubscribePrivate("private-c"),
        Json(|_| {
            json!({"event": "client-x", "channel": "private-c", "data": "x".repeat(CLIENT_PAYLOAD_LIMIT + 10)})
                .to_string()
        }),
        Error(4301),
    ),
    case("client_event_bad_channel_name", Text(r#"{"event":"client-x","channel":"a b","data":{}}"#), Error(4300)),
    // --- Double subscribe ---------------------------------------------------------------------------
    after(
        "double_subscribe_public",
        Setup::Subscribe("dup"),
        Json(|_| subscribe_raw("dup")),
        Reply("pusher_internal:subscription_succeeded"),
    ),
    after(
        "double_subscribe_private",
        Setup::SubscribePrivate("private-dup"),
        Json(|s| subscribe_auth("private-dup", &format!("{KEY}:{}", sig(SECRET, &format!("{s}:private-dup"))))),
        Reply("pusher_internal:subscription_succeeded"),
    ),
    // --- Binary and fragmented frames ------------------------------------------------------------
    case("binary_frame", Frames(|| frame(true, BINARY, &[1, 2, 3])), Error(4300)),
    case("binary_frame_empty", Frames(|| frame(true, BINARY, &[])), Error(4300)),
    case("binary_frame_with_valid_json", Frames(|| frame(true, BINARY, PING_JSON)), Error(4300)),
    case(
        "fragmented_ping",
        Frames(|| [frame(false, TEXT, &PING_JSON[..7]), frame(true, CONT, &PING_JSON[7..])].concat()),
        Reply("pusher:pong"),
    ),
    case(
        "fragmented_ping_in_one_byte_pieces",
        Frames(|| {
            let n = PING_JSON.len();
            (0..n)
                .map(|i| frame(i + 1 == n, if i == 0 { TEXT } else { CONT }, &PING_JSON[i..=i]))
                .collect::<Vec<_>>()
                .concat()
        }),
        Reply("pusher:pong"),
    ),
    case(
        "fragmented_with_control_frame_between",
        Frames(|| {
            [frame(false, TEXT, &PING_JSON[..5]), frame(true, PING, b"hi"), frame(true, CONT, &PING_JSON[5..])].concat()
        }),
        Reply("pusher:pong"),
    ),
    case(
        "fragmented_garbage",
        Frames(|| [frame(false, TEXT, b"{\"eve"), frame(true, CONT, b"nt\":")].concat()),
        Error(4300),
    ),
    case(
        "fragmented_over_soft_limit",
        Frames(|| {
            let body = format!(r#"{{"event":"pusher:ping","data":"{}"}}"#, "x".repeat(SOFT_LIMIT + 100));
            let (a, b) = body.as_bytes().split_at(body.len() / 2);
            [frame(false, TEXT, a), frame(true, CONT, b)].concat()
        }),
        Error(4300),
    ),
    case(
        "fragmented_over_hard_limit",
        Frames(|| {
            let piece = vec![b'x'; HARD_LIMIT / 2];
            [frame(false, TEXT, &piece), frame(false, CONT, &piece), frame(true, CONT, &piece)].concat()
        }),
        Close(1009),
    ),
    case("continuation_without_start", Frames(|| frame(true, CONT, PING_JSON)), Dropped),
    case(
        "new_message_inside_fragmented_one",
        Frames(|| [frame(false, TEXT, b"{\"ev"), frame(true, TEXT, PING_JSON)].concat()),
        Dropped,
    ),
    case("fragmented_control_frame", Frames(|| frame(false, PING, b"x")), Dropped),
    case("control_frame_over_125_bytes", Frames(|| frame(true, PING, &[b'p'; 126])), Dropped),
    case("unmasked_client_frame", Frames(|| raw_frame(0x80 | TEXT, None, PING_JSON)), Dropped),
    case("reserved_bit_set", Frames(|| raw_frame(0x80 | 0x40 | TEXT, Some(MASK), PING_JSON)), Dropped),
    case("reserved_data_opcode", Frames(|| frame(true, 0x3, PING_JSON)), Dropped),
    case("reserved_control_opcode", Frames(|| frame(true, 0xB, b"")), Dropped),
    // --- Invalid UTF-8 ------------------------------------------------------------------------------
    case("invalid_utf8_text", Frames(|| frame(true, TEXT, b"{\"event\":\"\xff\xfe\"}")), Dropped),
    case("overlong_utf8_text", Frames(|| frame(true, TEXT, b"{\"event\":\"\xc0\xaf\"}")), Dropped),
    case("utf8_encoded_surrogate", Frames(|| frame(true, TEXT, b"{\"event\":\"\xed\xa0\x80\"}")), Dropped),
    case(
        "invalid_utf8_across_fragments",
        Frames(|| [frame(false, TEXT, b"{\"event\":\"\xe2\x82"), frame(true, CONT, b"\x28\"}")].concat()),
        Dropped,
    ),
    case("close_reason_invalid_utf8", Frames(|| frame(true, CLOSE, b"\x03\xe8\xff\xfe")), Dropped),
    case("close_payload_one_byte", Frames(|| frame(true, CLOSE, b"\x03")), Dropped),
    // RFC 6455 5.5.1: a close frame is answered with a close frame (1002 for a code that may
    // not be sent, such as 999 or 1005).
    case("close_code_not_allowed", Frames(|| frame(true, CLOSE, &999u16.to_be_bytes())), Close(1002)),
    case("close_code_reserved_1005", Frames(|| frame(true, CLOSE, &1005u16.to_be_bytes())), Close(1002)),
    case("close_frame_is_answered", Frames(|| frame(true, CLOSE, &1000u16.to_be_bytes())), Close(1000)),
    // --- Frames over the limit ----------------------------------------------------------------------
    case(
        "text_over_soft_limit",
        Json(|_| format!(r#"{{"event":"pusher:ping","data":"{}"}}"#, "x".repeat(SOFT_LIMIT))),
        Error(4300),
    ),
    case("text_over_hard_limit", Frames(|| frame(true, TEXT, &vec![b' '; HARD_LIMIT + 1])), Close(1009)),
    case("binary_over_hard_limit", Frames(|| frame(true, BINARY, &vec![0; HARD_LIMIT + 1])), Close(1009)),
    // Only a header that announces 1 TiB: refused at once, nothing is buffered or awaited.
    case("header_announces_one_tebibyte", Frames(|| frame_header(true, TEXT, 1 << 40)), Close(1009)),
    case("header_length_with_msb_set", Frames(|| frame_header(true, TEXT, u64::MAX)), Close(1009)),
    // --- Truncated frames ---------------------------------------------------------------------------
    case("truncated_header_then_eof", FramesThenEof(|| vec![0x81]), Dropped),
    case("truncated_extended_length_then_eof", FramesThenEof(|| vec![0x81, 0xFE, 0x01]), Dropped),
    case(
        "truncated_payload_then_eof",
        FramesThenEof(|| {
            let mut f = frame(true, TEXT, &[b' '; 100]);
            f.truncate(20);
            f
        }),
        Dropped,
    ),
    case("fragment_then_eof", FramesThenEof(|| frame(false, TEXT, &PING_JSON[..5])), Dropped),
    // --- Bad HTTP start lines and headers -------------------------------------------------------------
    case("http_garbage_start_line", RawHttp(|| b"HELLO\r\n\r\n".to_vec()), Status(400)),
    case("http_bad_method_token", RawHttp(|| b"G(T / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()), Status(400)),
    case(
        "http_unknown_version",
        RawHttp(|| b"GET /app/app-key?protocol=7 HTTP/9.9\r\nHost: x\r\n\r\n".to_vec()),
        Status(400),
    ),
    case("http_missing_version", RawHttp(|| b"GET /app/app-key?protocol=7\r\nHost: x\r\n\r\n".to_vec()), Status(400)),
    case("http_nul_in_path", RawHttp(|| b"GET /app/app\0key HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()), Status(400)),
    case("http_space_in_path", RawHttp(|| b"GET /app/app key HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()), Status(400)),
    case("http_header_without_colon", RawHttp(|| b"GET /live HTTP/1.1\r\nHost x\r\n\r\n".to_vec()), Status(400)),
    case(
        "http_header_name_with_space",
        RawHttp(|| b"GET /live HTTP/1.1\r\nBad Header: x\r\n\r\n".to_vec()),
        Status(400),
    ),
    case("http_obsolete_line_folding", RawHttp(|| b"GET /live HTTP/1.1\r\nX-A: a\r\n b\r\n\r\n".to_vec()), Status(400)),
    case("http_too_many_headers", RawHttp(|| http_with_headers(200, 10)), Status(431)),
    case("http_huge_header", RawHttp(|| http_with_headers(1, 600 * 1024)), Status(431)),
    case(
        "http_content_length_not_a_number",
        RawHttp(|| b"POST /apps/app-id/events HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n".to_vec()),
        Status(400),
    ),
    case(
        "http_conflicting_content_lengths",
        RawHttp(|| {
            b"POST /apps/app-id/events HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}".to_vec()
        }),
        Status(400),
    ),
    case(
        "http_transfer_encoding_not_chunked",
        RawHttp(|| b"POST /apps/app-id/events HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n".to_vec()),
        Status(400),
    ),
    case("http_tls_client_hello", RawHttp(|| b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03".to_vec()), Status(400)),
    case("http_websocket_frame_before_handshake", RawHttp(|| frame(true, TEXT, PING_JSON)), Status(400)),
    case(
        "upgrade_without_upgrade_headers",
        RawHttp(|| b"GET /app/app-key?protocol=7 HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()),
        Status(400),
    ),
    case(
        "upgrade_wrong_websocket_version",
        RawHttp(|| handshake_with("Sec-WebSocket-Version: 8\r\n", true)),
        Status(400),
    ),
    case(
        "upgrade_without_websocket_key",
        RawHttp(|| handshake_with("Sec-WebSocket-Version: 13\r\n", false)),
        Status(400),
    ),
    case(
        "upgrade_with_post",
        RawHttp(|| [b"POST".as_slice(), &handshake_with("Sec-WebSocket-Version: 13\r\n", true)[3..]].concat()),
        Status(405),
    ),
];

// ---- Input builders ---------------------------------------------------------------------------

const PING_JSON: &[u8] = br#"{"event":"pusher:ping","data":{}}"#;
const CONT: u8 = 0x0;
const TEXT: u8 = 0x1;
const BINARY: u8 = 0x2;
const CLOSE: u8 = 0x8;
const PING: u8 = 0x9;
const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

fn nested(depth: usize) -> String {
    format!("{}{}", "[".repeat(depth), "]".repeat(depth))
}

fn sig(secret: &str, message: &str) -> String {
    sockudo::auth::sign(secret, message)
}

fn subscribe_raw(channel: &str) -> String {
    json!({"event": "pusher:subscribe", "data": {"channel": channel}}).to_string()
}

fn subscribe_auth(channel: &str, auth: &str) -> String {
    json!({"event": "pusher:subscribe", "data": {"channel": channel, "auth": auth}}).to_string()
}

fn subscribe_full(channel: &str, auth: &str, channel_data: &str) -> String {
    json!({"event": "pusher:subscribe", "data": {"channel": channel, "auth": auth, "channel_data": channel_data}})
        .to_string()
}

/// A presence subscribe with a valid signature over `channel_data`, whatever it holds.
fn presence(socket_id: &str, channel_data: &str) -> String {
    let auth = format!("{KEY}:{}", sig(SECRET, &format!("{socket_id}:presence-h:{channel_data}")));
    subscribe_full("presence-h", &auth, channel_data)
}

fn signin_raw(user_data: &str, auth: &str) -> String {
    json!({"event": "pusher:signin", "data": {"auth": auth, "user_data": user_data}}).to_string()
}

/// A sign-in with a valid signature over `user_data`, whatever it holds.
fn signin(socket_id: &str, user_data: &str) -> String {
    signin_raw(user_data, &format!("{KEY}:{}", sig(SECRET, &format!("{socket_id}::user::{user_data}"))))
}

/// A masked client frame.
fn frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    raw_frame(if fin { 0x80 } else { 0 } | opcode, Some(MASK), payload)
}

/// A frame with this first byte, masked or not.
fn raw_frame(first: u8, mask: Option<[u8; 4]>, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    let m = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => out.push(m | n as u8),
        n if n <= 0xFFFF => {
            out.push(m | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(m | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    match mask {
        Some(k) => {
            out.extend_from_slice(&k);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ k[i % 4]));
        }
        None => out.extend_from_slice(payload),
    }
    out
}

/// Only the header (with mask key) of a masked frame announcing `len` payload bytes.
fn frame_header(fin: bool, opcode: u8, len: u64) -> Vec<u8> {
    let mut out = vec![if fin { 0x80 } else { 0 } | opcode, 0x80 | 127];
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&MASK);
    out
}

const WS_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
const WS_ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

/// A handshake request with these extra header lines, with or without a key.
fn handshake_with(extra: &str, with_key: bool) -> Vec<u8> {
    let key = if with_key { format!("Sec-WebSocket-Key: {WS_KEY}\r\n") } else { String::new() };
    format!(
        "GET /app/{KEY}?protocol=7 HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n{key}{extra}\r\n"
    )
    .into_bytes()
}

fn http_with_headers(count: usize, value_len: usize) -> Vec<u8> {
    let mut s = String::from("GET /live HTTP/1.1\r\nHost: x\r\n");
    let value = "v".repeat(value_len);
    for i in 0..count {
        s.push_str(&format!("X-H{i}: {value}\r\n"));
    }
    s.push_str("\r\n");
    s.into_bytes()
}

// ---- The raw WebSocket client ----------------------------------------------------------------

/// A frame the server sent.
#[derive(Debug)]
enum Got {
    Json(Value),
    Close(Option<u16>),
    /// Any other frame, by opcode.
    Other(u8),
    /// The TCP connection ended (EOF or reset).
    Eof,
}

struct RawWs {
    tcp: TcpStream,
    buf: Vec<u8>,
    socket_id: String,
}

fn fail<T>(msg: impl Into<String>) -> Result<T, String> {
    Err(msg.into())
}

impl RawWs {
    async fn connect(port: u16) -> Result<Self, String> {
        let mut tcp = tokio::time::timeout(WAIT, TcpStream::connect(("127.0.0.1", port)))
            .await
            .map_err(|_| "connect timed out")?
            .map_err(|e| format!("connect: {e}"))?;
        let req = handshake_with("Sec-WebSocket-Version: 13\r\n", true);
        tcp.write_all(&req).await.map_err(|e| format!("write handshake: {e}"))?;
        let mut buf = Vec::new();
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 4096];
            let n = tokio::time::timeout(WAIT, tcp.read(&mut chunk))
                .await
                .map_err(|_| "handshake response timed out")?
                .map_err(|e| format!("read handshake: {e}"))?;
            if n == 0 {
                return fail("EOF during handshake");
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_string();
        if !head.starts_with("HTTP/1.1 101") || !head.contains(WS_ACCEPT) {
            return fail(format!("bad handshake response: {head}"));
        }
        buf.drain(..end);
        let mut ws = Self { tcp, buf, socket_id: String::new() };
        match ws.next().await? {
            Got::Json(v) if v["event"] == "pusher:connection_established" => {
                let d = data(&v);
                ws.socket_id = d["socket_id"].as_str().ok_or("no socket_id")?.to_owned();
                Ok(ws)
            }
            other => fail(format!("expected connection_established, got {other:?}")),
        }
    }

    async fn write(&mut self, bytes: &[u8]) -> Result<(), String> {
        tokio::time::timeout(WAIT, self.tcp.write_all(bytes))
            .await
            .map_err(|_| "write timed out".to_owned())?
            .map_err(|e| format!("write: {e}"))
    }

    async fn send_text(&mut self, text: &str) -> Result<(), String> {
        self.write(&frame(true, TEXT, text.as_bytes())).await
    }

    /// Reads until `n` bytes are buffered; false on EOF or reset.
    async fn fill(&mut self, n: usize, deadline: Instant) -> Result<bool, String> {
        while self.buf.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            let mut chunk = [0u8; 8192];
            match tokio::time::timeout(left, self.tcp.read(&mut chunk)).await {
                Err(_) => return fail("no frame in time"),
                Ok(Ok(0)) | Ok(Err(_)) => return Ok(false),
                Ok(Ok(k)) => self.buf.extend_from_slice(&chunk[..k]),
            }
        }
        Ok(true)
    }

    /// The next frame from the server (unmasked, possibly fragmented).
    async fn frame(&mut self, within: Duration) -> Result<Got, String> {
        let deadline = Instant::now() + within;
        let mut message: Vec<u8> = Vec::new();
        let mut message_op = None;
        loop {
            if !self.fill(2, deadline).await? {
                return Ok(Got::Eof);
            }
            let (fin, op, short) = (self.buf[0] & 0x80 != 0, self.buf[0] & 0x0f, (self.buf[1] & 0x7f) as usize);
            if self.buf[1] & 0x80 != 0 {
                return fail("the server sent a masked frame");
            }
            let (hlen, len) = match short {
                126 => {
                    if !self.fill(4, deadline).await? {
                        return Ok(Got::Eof);
                    }
                    (4, u16::from_be_bytes([self.buf[2], self.buf[3]]) as usize)
                }
                127 => {
                    if !self.fill(10, deadline).await? {
                        return Ok(Got::Eof);
                    }
                    let mut b = [0u8; 8];
                    b.copy_from_slice(&self.buf[2..10]);
                    (10, u64::from_be_bytes(b) as usize)
                }
                n => (2, n),
            };
            if !self.fill(hlen + len, deadline).await? {
                return Ok(Got::Eof);
            }
            let payload: Vec<u8> = self.buf.drain(..hlen + len).skip(hlen).collect();
            if op >= 0x8 {
                return Ok(match op {
                    CLOSE if payload.len() >= 2 => Got::Close(Some(u16::from_be_bytes([payload[0], payload[1]]))),
                    CLOSE => Got::Close(None),
                    _ => Got::Other(op),
                });
            }
            if op != CONT {
                message_op = Some(op);
            }
            message.extend_from_slice(&payload);
            if fin {
                break;
            }
        }
        match message_op {
            Some(TEXT) => match serde_json::from_slice(&message) {
                Ok(v) => Ok(Got::Json(v)),
                Err(_) => fail(format!(
                    "the server sent a text frame that is not JSON: {:?}",
                    String::from_utf8_lossy(&message)
                )),
            },
            Some(op) => Ok(Got::Other(op)),
            None => fail("the server sent a continuation without a start"),
        }
    }

    /// The next frame, skipping control frames other than close and `subscription_count`.
    async fn next(&mut self) -> Result<Got, String> {
        loop {
            match self.frame(WAIT).await? {
                Got::Other(op) if op >= 0x8 => continue,
                Got::Json(v) if v["event"] == "pusher_internal:subscription_count" => continue,
                other => return Ok(other),
            }
        }
    }

    async fn expect_event(&mut self, event: &str, channel: Option<&str>) -> Result<Value, String> {
        match self.next().await? {
            Got::Json(v) if v["event"] == event && channel.is_none_or(|c| v["channel"] == c) => Ok(v),
            other => fail(format!("expected {event}, got {other:?}")),
        }
    }

    /// Reads until the TCP connection ends; returns the close code seen on the way, if any.
    async fn until_eof(&mut self) -> Result<Vec<Got>, String> {
        let mut seen = Vec::new();
        loop {
            match self.frame(WAIT).await {
                Ok(Got::Eof) => return Ok(seen),
                Ok(got) => seen.push(got),
                Err(e) => return fail(format!("{e} (the connection was not closed; seen before: {seen:?})")),
            }
        }
    }
}

// ---- Running the corpus ------------------------------------------------------------------------

async fn setup(ws: &mut RawWs, s: Setup) -> Result<(), String> {
    let sid = ws.socket_id.clone();
    match s {
        Setup::None => return Ok(()),
        Setup::Subscribe(c) => {
            ws.send_text(&subscribe_raw(c)).await?;
            ws.expect_event("pusher_internal:subscription_succeeded", Some(c)).await?;
        }
        Setup::SubscribePrivate(c) => {
            ws.send_text(&subscribe_auth(c, &format!("{KEY}:{}", sig(SECRET, &format!("{sid}:{c}"))))).await?;
            ws.expect_event("pusher_internal:subscription_succeeded", Some(c)).await?;
        }
        Setup::SignIn(user) => {
            ws.send_text(&signin(&sid, &json!({"id": user}).to_string())).await?;
            ws.expect_event("pusher:signin_success", None).await?;
        }
    }
    Ok(())
}

/// Checks that a socket that must stay open still answers a ping and can still subscribe.
async fn still_open(ws: &mut RawWs, n: usize) -> Result<(), String> {
    ws.send_text(r#"{"event":"pusher:ping","data":{}}"#).await?;
    ws.expect_event("pusher:pong", None).await.map_err(|e| format!("after the case, ping: {e}"))?;
    let alive = format!("alive-{n}");
    ws.send_text(&subscribe_raw(&alive)).await?;
    ws.expect_event("pusher_internal:subscription_succeeded", Some(&alive))
        .await
        .map_err(|e| format!("after the case, subscribe: {e}"))?;
    Ok(())
}

async fn run_ws_case(port: u16, c: &Case, n: usize) -> Result<(), String> {
    let mut ws = RawWs::connect(port).await?;
    setup(&mut ws, c.setup).await.map_err(|e| format!("setup: {e}"))?;
    let sid = ws.socket_id.clone();
    // A write may fail once the server has dropped the connection; the outcome is what counts.
    let write = match c.input {
        Text(t) => ws.send_text(t).await,
        Json(f) => ws.send_text(&f(&sid)).await,
        Frames(f) => ws.write(&f()).await,
        FramesThenEof(f) => {
            let r = ws.write(&f()).await;
            let _ = ws.tcp.shutdown().await;
            r
        }
        RawHttp(_) => unreachable!(),
    };
    let _ = write;
    match c.expect {
        Error(code) => match ws.next().await? {
            Got::Json(v) if v["event"] == "pusher:error" && v["data"]["code"] == code => {}
            other => return fail(format!("expected pusher:error {code}, got {other:?}")),
        },
        SubError(status) => match ws.next().await? {
            Got::Json(v) if v["event"] == "pusher:subscription_error" && v["data"]["status"] == status => {}
            other => return fail(format!("expected pusher:subscription_error {status}, got {other:?}")),
        },
        Reply(event) => {
            ws.expect_event(event, None).await?;
        }
        Silent => {}
        Close(code) => {
            let seen = ws.until_eof().await?;
            return match seen.as_slice() {
                [Got::Close(Some(c))] if *c == code => Ok(()),
                _ => fail(format!("expected a close frame {code} then EOF, got {seen:?} then EOF")),
            };
        }
        Dropped => {
            let seen = ws.until_eof().await?;
            return match seen.as_slice() {
                [] | [Got::Close(Some(1002 | 1007))] => Ok(()),
                _ => fail(format!("expected the connection to be dropped, got {seen:?} then EOF")),
            };
        }
        Status(_) => unreachable!(),
    }
    still_open(&mut ws, n).await
}

/// Writes raw bytes instead of a handshake; returns the status of the answer (None: closed
/// without one).
async fn raw_http(port: u16, bytes: &[u8]) -> Result<Option<u16>, String> {
    let mut tcp = TcpStream::connect(("127.0.0.1", port)).await.map_err(|e| format!("connect: {e}"))?;
    // The server may answer (and close) before it has read everything.
    let _ = tokio::time::timeout(WAIT, tcp.write_all(bytes)).await;
    let mut buf = Vec::new();
    let deadline = Instant::now() + WAIT;
    while !buf.windows(2).any(|w| w == b"\r\n") {
        let mut chunk = [0u8; 1024];
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, tcp.read(&mut chunk)).await {
            Err(_) => return fail(format!("no answer in time (got {:?})", String::from_utf8_lossy(&buf))),
            Ok(Ok(0)) | Ok(Err(_)) if buf.is_empty() => return Ok(None),
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(k)) => buf.extend_from_slice(&chunk[..k]),
        }
    }
    let line = String::from_utf8_lossy(&buf).lines().next().unwrap_or("").to_owned();
    match line.strip_prefix("HTTP/1.1 ").and_then(|r| r.get(..3)).and_then(|s| s.parse().ok()) {
        Some(code) => Ok(Some(code)),
        None => fail(format!("not an HTTP status line: {line:?}")),
    }
}

async fn run_case(port: u16, c: &Case, n: usize) -> Result<(), String> {
    match (c.input, c.expect) {
        (RawHttp(f), Status(status)) => match raw_http(port, &f()).await? {
            Some(s) if s == status => Ok(()),
            other => fail(format!("expected HTTP {status}, got {other:?}")),
        },
        (RawHttp(_), _) | (_, Status(_)) => fail("a RawHttp input goes with a Status outcome"),
        _ => run_ws_case(port, c, n).await,
    }
}

async fn corpus_server() -> TestServer {
    TestServer::start_with(|c| {
        c.websocket.max_message_size_kb = SOFT_LIMIT / 1024;
        c.websocket.hard_max_message_size_kb = HARD_LIMIT / 1024;
        c.app_manager.array.apps[0].max_event_payload_in_kb = CLIENT_PAYLOAD_LIMIT / 1024;
    })
    .await
}

/// Publishes through the API and checks that the neighbour gets exactly that next.
async fn neighbour_receives(server: &TestServer, neighbour: &mut Client, n: usize, after: &str) {
    let event = format!("after-{n}");
    let (status, body) = server.publish("healthy", &event, after).await;
    assert_eq!(status, 200, "publishing after {after}: {body}");
    // With a short activity timeout the server may ping the neighbour first: answer and skip.
    let mut got = neighbour.next().await;
    while got["event"] == "pusher:ping" {
        neighbour.send(json!({"event": "pusher:pong", "data": {}})).await;
        got = neighbour.next().await;
    }
    assert_eq!(got["event"], event.as_str(), "the neighbour after {after}: {got}");
    assert_eq!(got["data"], after);
}

#[tokio::test]
async fn corpus_names_are_unique_and_sixty_or_more() {
    let mut names: Vec<_> = CORPUS.iter().map(|c| c.name).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), CORPUS.len(), "duplicate case names");
    assert!(CORPUS.len() >= 60, "{}", CORPUS.len());
}

/// Every case of the corpus against one server; all cases run, then every failure is listed.
#[tokio::test]
async fn hostile_corpus() {
    let server = corpus_server().await;
    let mut neighbour = server.client().await;
    neighbour.subscribe("healthy").await;
    let mut failures = Vec::new();
    for (n, c) in CORPUS.iter().enumerate() {
        let outcome = tokio::time::timeout(Duration::from_secs(20), run_case(server.port, c, n))
            .await
            .unwrap_or_else(|_| fail("the case did not finish within 20 s"));
        if let Err(e) = outcome {
            failures.push(format!("{} (expected {:?}): {e}", c.name, c.expect));
        }
        neighbour_receives(&server, &mut neighbour, n, c.name).await;
    }
    // Every hostile connection is gone: only the neighbour is left.
    let settled =
        eventually(WAIT, || async { server.metric("sockudo_connected", &[("app_id", APP_ID)]).await == Some(1.0) })
            .await;
    if !settled {
        let left = server.metric("sockudo_connected", &[("app_id", APP_ID)]).await;
        failures.push(format!("connections left open after the corpus: {left:?} (expected only the neighbour)"));
    }
    assert!(failures.is_empty(), "{} of {} cases failed:\n{}", failures.len(), CORPUS.len(), failures.join("\n"));
    server.stop().await;
}

/// A frame cut off mid-payload, then silence: the session must not wait on it for ever. Its
/// activity timer still runs: it is pinged and then closed with 4201, while a neighbour that
/// answers pings keeps receiving.
#[tokio::test]
async fn truncated_frame_then_silence_is_timed_out() {
    let server = TestServer::start_with(|c| {
        c.activity_timeout = 1;
        c.pong_timeout = 1;
    })
    .await;
    let mut neighbour = server.client().await;
    neighbour.subscribe("healthy").await;
    let mut ws = RawWs::connect(server.port).await.unwrap();
    let mut f = frame(true, TEXT, &[b' '; 300]);
    f.truncate(40);
    ws.write(&f).await.unwrap();
    let hostile = async {
        let ping = ws.frame(Duration::from_secs(5)).await.unwrap();
        assert!(matches!(&ping, Got::Json(v) if v["event"] == "pusher:ping"), "{ping:?}");
        let mut seen = Vec::new();
        loop {
            match ws.frame(Duration::from_secs(5)).await.expect("closed within 5 s") {
                Got::Eof => break,
                got => seen.push(got),
            }
        }
        assert!(
            matches!(seen.as_slice(), [Got::Json(e), Got::Close(Some(4201))] if e["data"]["code"] == 4201),
            "{seen:?}"
        );
    };
    // The neighbour answers its pings meanwhile.
    let deadline = Instant::now() + Duration::from_secs(4);
    let healthy = async {
        while Instant::now() < deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            if let Ok(v) = tokio::time::timeout(left, neighbour.next()).await {
                if v["event"] == "pusher:ping" {
                    neighbour.send(json!({"event": "pusher:pong", "data": {}})).await;
                }
            }
        }
    };
    tokio::join!(hostile, healthy);
    neighbour_receives(&server, &mut neighbour, 0, "truncated_frame_then_silence").await;
    server.stop().await;
}

/// A subscription made twice is one subscription: the event is delivered once.
#[tokio::test]
async fn double_subscribe_delivers_once() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    c.subscribe("dup").await;
    c.subscribe("dup").await;
    server.publish("dup", "once", "1").await;
    server.publish("dup", "marker", "2").await;
    assert_eq!(c.next().await["event"], "once");
    assert_eq!(c.next().await["event"], "marker", "the event was delivered twice");
    let (_, info) = server.api("GET", "/channels/dup", &[("info", "subscription_count")], None).await;
    assert_eq!(info, json!({"occupied": true, "subscription_count": 1}));
    server.stop().await;
}

/// A request head that never completes must not hold a connection for ever (slowloris). The
/// bound is generous: hyper's own default header read timeout is 30 s.
#[tokio::test]
async fn stalled_http_head_is_dropped() {
    let server = TestServer::start().await;
    let mut tcp = TcpStream::connect(("127.0.0.1", server.port)).await.unwrap();
    tcp.write_all(b"GET /live HTTP/1.1\r\nHost: x\r\nX-Slow: ").await.unwrap();
    let mut neighbour = server.client().await;
    neighbour.subscribe("healthy").await;
    neighbour_receives(&server, &mut neighbour, 0, "stalled_http_head").await;
    let mut buf = [0u8; 256];
    let r = tokio::time::timeout(Duration::from_secs(35), tcp.read(&mut buf)).await;
    assert!(r.is_ok(), "a connection with an unfinished request head was still open after 35 s");
    server.stop().await;
}
