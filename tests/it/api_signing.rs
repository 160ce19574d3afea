//! Negative tests of the signed HTTP API: wrong HMACs, stale and future timestamps, missing and
//! wrong `body_md5`, array-typed and duplicate parameters, path tricks, keys of other apps,
//! unsigned requests to every endpoint, and the body cap enforced while the body is read.
//! Every refusal has its exact status and a JSON `{"error": "..."}` body. Requests go over raw
//! TCP so that nothing (such as URL normalisation) rewrites them on the way.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::*;

/// A request as written on the wire.
struct Req {
    method: &'static str,
    target: String,
    body: Option<String>,
}

struct SigningCase {
    name: &'static str,
    build: fn(u64) -> Req,
    status: u16,
    /// A part of the `error` message that names the reason.
    error: &'static str,
}

const EVENTS: &str = "/apps/app-id/events";
const CHANNELS: &str = "/apps/app-id/channels";
const BODY: &str = r#"{"name":"e","channel":"c","data":"d"}"#;

/// The signature of exactly these (decoded) pairs, as the server computes it.
fn signature(secret: &str, method: &str, path: &str, pairs: &[(&str, &str)]) -> String {
    let mut sorted: Vec<_> = pairs.iter().filter(|(k, _)| *k != "auth_signature").collect();
    sorted.sort();
    let canonical = sorted.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join("&");
    sockudo::auth::sign(secret, &format!("{method}\n{path}\n{canonical}"))
}

/// `pairs` url-encoded, then `auth_signature` signed over them (with `secret`, `method`, `path`).
fn query_signed(secret: &str, method: &str, path: &str, pairs: &[(&str, &str)]) -> String {
    let sig = signature(secret, method, path, pairs);
    let q: String = form_urlencoded::Serializer::new(String::new()).extend_pairs(pairs.iter()).finish();
    format!("{q}&auth_signature={sig}")
}

fn md5(body: &str) -> String {
    sockudo::auth::body_md5(body.as_bytes())
}

/// A correctly signed request of the default app.
fn good(method: &'static str, path: &str, params: &[(&str, &str)], body: Option<&str>, ts: u64) -> Req {
    let q = signed_query(KEY, SECRET, method, path, params, body, ts);
    Req { method, target: format!("{path}?{q}"), body: body.map(str::to_owned) }
}

/// A publish with these pairs (signed by the default secret) and the standard body.
fn publish_with(pairs: &[(&str, &str)]) -> Req {
    Req {
        method: "POST",
        target: format!("{EVENTS}?{}", query_signed(SECRET, "POST", EVENTS, pairs)),
        body: Some(BODY.into()),
    }
}

/// A `GET /channels` with these pairs, signed by the default secret.
fn channels_with(pairs: &[(&str, &str)]) -> Req {
    Req { method: "GET", target: format!("{CHANNELS}?{}", query_signed(SECRET, "GET", CHANNELS, pairs)), body: None }
}

fn replace_signature(req: Req, sig: &str) -> Req {
    let (q, _) = req.target.rsplit_once("&auth_signature=").expect("signed");
    Req { target: format!("{q}&auth_signature={sig}"), ..req }
}

fn unsigned(method: &'static str, path: &str, body: Option<&str>) -> Req {
    Req { method, target: path.to_owned(), body: body.map(str::to_owned) }
}

const BAD_SIG: &str = "invalid signature";
const TS: &str = "auth_timestamp is not within";

const CASES: &[SigningCase] = &[
    // --- Wrong HMAC ---------------------------------------------------------------------------
    SigningCase {
        name: "signed_with_another_secret",
        build: |ts| {
            let q = signed_query(KEY, "wrong-secret", "POST", EVENTS, &[], Some(BODY), ts);
            Req { method: "POST", target: format!("{EVENTS}?{q}"), body: Some(BODY.into()) }
        },
        status: 401,
        error: BAD_SIG,
    },
    SigningCase {
        name: "signature_with_one_hex_digit_changed",
        build: |ts| {
            let r = good("POST", EVENTS, &[], Some(BODY), ts);
            let sig = r.target.rsplit_once('=').unwrap().1.to_owned();
            let last = if sig.ends_with('0') { '1' } else { '0' };
            replace_signature(r, &format!("{}{last}", &sig[..63]))
        },
        status: 401,
        error: BAD_SIG,
    },
    SigningCase {
        name: "signature_truncated_to_its_first_half",
        build: |ts| {
            let r = good("POST", EVENTS, &[], Some(BODY), ts);
            let sig = r.target.rsplit_once('=').unwrap().1.to_owned();
            replace_signature(r, &sig[..32])
        },
        status: 401,
        error: BAD_SIG,
    },
    SigningCase {
        name: "signature_not_hex",
        build: |ts| replace_signature(good("POST", EVENTS, &[], Some(BODY), ts), &"zz".repeat(32)),
        status: 401,
        error: BAD_SIG,
    },
    SigningCase {
        name: "signature_empty",
        build: |ts| replace_signature(good("POST", EVENTS, &[], Some(BODY), ts), ""),
        status: 401,
        error: BAD_SIG,
    },
    SigningCase {
        name: "signature_of_get_used_for_post",
        build: |ts| {
            let q = signed_query(KEY, SECRET, "GET", EVENTS, &[], Some(BODY), ts);
            Req { method: "POST", target: format!("{EVENTS}?{q}"), body: Some(BODY.into()) }
        },
        status: 401,
        error: BAD_SIG,
    },
    SigningCase {
        name: "signature_of_another_path",
        build: |ts| {
            let q = signed_query(KEY, SECRET, "GET", CHANNELS, &[], None, ts);
            Req { method: "GET", target: format!("{CHANNELS}/news?{q}"), body: None }
        },
        status: 401,
        error: BAD_SIG,
    },
    SigningCase {
        name: "parameter_added_after_signing",
        build: |ts| {
            let r = good("GET", CHANNELS, &[], None, ts);
            Req { target: format!("{}&filter_by_prefix=presence-", r.target), ..r }
        },
        status: 401,
        error: BAD_SIG,
    },
    SigningCase {
        name: "parameter_changed_after_signing",
        build: |ts| {
            let r = good("GET", CHANNELS, &[("filter_by_prefix", "a")], None, ts);
            Req { target: r.target.replace("filter_by_prefix=a", "filter_by_prefix=b"), ..r }
        },
        status: 401,
        error: BAD_SIG,
    },
    // --- auth_timestamp ---------------------------------------------------------------------------
    SigningCase {
        name: "timestamp_stale",
        build: |ts| good("POST", EVENTS, &[], Some(BODY), ts - 601),
        status: 401,
        error: TS,
    },
    SigningCase {
        name: "timestamp_in_the_future",
        build: |ts| good("POST", EVENTS, &[], Some(BODY), ts + 601),
        status: 401,
        error: TS,
    },
    SigningCase { name: "timestamp_zero", build: |_| good("POST", EVENTS, &[], Some(BODY), 0), status: 401, error: TS },
    SigningCase {
        name: "timestamp_not_a_number",
        build: |_| channels_with(&[("auth_key", KEY), ("auth_timestamp", "soon"), ("auth_version", "1.0")]),
        status: 401,
        error: TS,
    },
    SigningCase {
        name: "timestamp_negative",
        build: |_| channels_with(&[("auth_key", KEY), ("auth_timestamp", "-1"), ("auth_version", "1.0")]),
        status: 401,
        error: TS,
    },
    SigningCase {
        name: "timestamp_overflowing_u64",
        build: |_| {
            channels_with(&[("auth_key", KEY), ("auth_timestamp", "184467440737095516160"), ("auth_version", "1.0")])
        },
        status: 401,
        error: TS,
    },
    SigningCase {
        name: "timestamp_fractional",
        build: |ts| {
            let t = format!("{ts}.5");
            channels_with(&[("auth_key", KEY), ("auth_timestamp", &t), ("auth_version", "1.0")])
        },
        status: 401,
        error: TS,
    },
    // --- body_md5 -----------------------------------------------------------------------------------
    SigningCase {
        name: "body_md5_missing_with_a_body",
        build: |ts| {
            let t = ts.to_string();
            publish_with(&[("auth_key", KEY), ("auth_timestamp", &t), ("auth_version", "1.0")])
        },
        status: 401,
        error: "body_md5 is required",
    },
    SigningCase {
        name: "body_md5_of_another_body",
        build: |ts| {
            let (t, m) = (ts.to_string(), md5("{}"));
            publish_with(&[("auth_key", KEY), ("auth_timestamp", &t), ("auth_version", "1.0"), ("body_md5", &m)])
        },
        status: 401,
        error: "body_md5 does not match",
    },
    SigningCase {
        name: "body_md5_empty",
        build: |ts| {
            let t = ts.to_string();
            publish_with(&[("auth_key", KEY), ("auth_timestamp", &t), ("auth_version", "1.0"), ("body_md5", "")])
        },
        status: 401,
        error: "body_md5 does not match",
    },
    SigningCase {
        name: "body_changed_after_signing",
        build: |ts| {
            let r = good("POST", EVENTS, &[], Some(BODY), ts);
            Req { body: Some(BODY.replace(r#""d""#, r#""D""#)), ..r }
        },
        status: 401,
        error: "body_md5 does not match",
    },
    SigningCase {
        name: "body_md5_on_a_request_without_body",
        build: |ts| {
            let (t, m) = (ts.to_string(), md5("x"));
            channels_with(&[("auth_key", KEY), ("auth_timestamp", &t), ("auth_version", "1.0"), ("body_md5", &m)])
        },
        status: 401,
        error: "body_md5 does not match",
    },
    // --- Other auth parameters ----------------------------------------------------------------------
    SigningCase {
        name: "auth_version_2",
        build: |ts| {
            let t = ts.to_string();
            channels_with(&[("auth_key", KEY), ("auth_timestamp", &t), ("auth_version", "2.0")])
        },
        status: 401,
        error: "auth_version must be 1.0",
    },
    SigningCase {
        name: "auth_key_missing",
        build: |ts| {
            let t = ts.to_string();
            channels_with(&[("auth_timestamp", &t), ("auth_version", "1.0")])
        },
        status: 401,
        error: "missing query parameter auth_key",
    },
    SigningCase {
        name: "auth_timestamp_missing",
        build: |_| channels_with(&[("auth_key", KEY), ("auth_version", "1.0")]),
        status: 401,
        error: "missing query parameter auth_timestamp",
    },
    SigningCase {
        name: "auth_signature_missing",
        build: |ts| {
            let r = good("GET", CHANNELS, &[], None, ts);
            Req { target: r.target.rsplit_once("&auth_signature=").unwrap().0.to_owned(), ..r }
        },
        status: 401,
        error: "missing query parameter auth_signature",
    },
    // --- Array-typed and duplicate parameters -----------------------------------------------------
    SigningCase {
        name: "auth_key_array_typed",
        build: |ts| {
            let t = ts.to_string();
            channels_with(&[("auth_key[]", KEY), ("auth_timestamp", &t), ("auth_version", "1.0")])
        },
        status: 401,
        error: "missing query parameter auth_key",
    },
    SigningCase {
        name: "auth_signature_array_typed",
        build: |ts| {
            let r = good("GET", CHANNELS, &[], None, ts);
            Req { target: r.target.replace("&auth_signature=", "&auth_signature[]="), ..r }
        },
        status: 401,
        error: "missing query parameter auth_signature",
    },
    SigningCase {
        name: "auth_key_twice",
        build: |ts| {
            let r = good("GET", CHANNELS, &[], None, ts);
            Req { target: format!("{}&auth_key={KEY}", r.target), ..r }
        },
        status: 400,
        error: "duplicate query parameter auth_key",
    },
    SigningCase {
        name: "auth_signature_twice",
        build: |ts| {
            let r = good("GET", CHANNELS, &[], None, ts);
            let sig = r.target.rsplit_once('=').unwrap().1.to_owned();
            Req { target: format!("{}&auth_signature={sig}", r.target), ..r }
        },
        status: 400,
        error: "duplicate query parameter auth_signature",
    },
    SigningCase {
        name: "auth_timestamp_twice_with_different_values",
        build: |ts| {
            let (a, b) = (ts.to_string(), (ts - 10_000).to_string());
            channels_with(&[("auth_key", KEY), ("auth_timestamp", &a), ("auth_timestamp", &b), ("auth_version", "1.0")])
        },
        status: 400,
        error: "duplicate query parameter auth_timestamp",
    },
    SigningCase {
        name: "info_twice",
        build: |ts| {
            let t = ts.to_string();
            channels_with(&[
                ("auth_key", KEY),
                ("auth_timestamp", &t),
                ("auth_version", "1.0"),
                ("info", "subscription_count"),
                ("info", "user_count"),
            ])
        },
        status: 400,
        error: "duplicate query parameter info",
    },
    SigningCase {
        name: "body_md5_twice",
        build: |ts| {
            let (t, m) = (ts.to_string(), md5(BODY));
            publish_with(&[
                ("auth_key", KEY),
                ("auth_timestamp", &t),
                ("auth_version", "1.0"),
                ("body_md5", &m),
                ("body_md5", &m),
            ])
        },
        status: 400,
        error: "duplicate query parameter body_md5",
    },
    SigningCase {
        name: "auth_key_twice_once_percent_encoded",
        build: |ts| {
            let r = good("GET", CHANNELS, &[], None, ts);
            Req { target: format!("{}&auth%5Fkey=other", r.target), ..r }
        },
        status: 400,
        error: "duplicate query parameter auth_key",
    },
    // --- Wrong app for the key ------------------------------------------------------------------------
    SigningCase {
        name: "key_and_secret_of_another_app",
        build: |ts| {
            let q = signed_query("py-key", "py-secret", "POST", EVENTS, &[], Some(BODY), ts);
            Req { method: "POST", target: format!("{EVENTS}?{q}"), body: Some(BODY.into()) }
        },
        status: 401,
        error: "auth_key does not match the app",
    },
    SigningCase {
        name: "request_signed_for_one_app_sent_to_another",
        build: |ts| {
            let q = signed_query(KEY, SECRET, "GET", CHANNELS, &[], None, ts);
            Req { method: "GET", target: format!("/apps/12345/channels?{q}"), body: None }
        },
        status: 401,
        error: "auth_key does not match the app",
    },
    SigningCase {
        name: "unknown_app",
        build: |ts| good("GET", "/apps/no-such-app/channels", &[], None, ts),
        status: 404,
        error: "app not found",
    },
    SigningCase {
        name: "disabled_app_correctly_signed",
        build: |ts| {
            let path = "/apps/disabled-id/channels";
            let q = signed_query("disabled-key", "disabled-secret", "GET", path, &[], None, ts);
            Req { method: "GET", target: format!("{path}?{q}"), body: None }
        },
        status: 403,
        error: "app is disabled",
    },
    // --- Path tricks ------------------------------------------------------------------------------------
    SigningCase {
        name: "percent_encoded_app_id_signed_over_the_decoded_path",
        build: |ts| {
            let q = signed_query(KEY, SECRET, "GET", CHANNELS, &[], None, ts);
            Req { method: "GET", target: format!("/apps/app%2Did/channels?{q}"), body: None }
        },
        status: 401,
        error: BAD_SIG,
    },
    SigningCase {
        name: "double_slash",
        build: |ts| good("GET", "/apps//app-id/channels", &[], None, ts),
        status: 404,
        error: "not found",
    },
    SigningCase {
        name: "trailing_slash",
        build: |ts| good("GET", "/apps/app-id/channels/", &[], None, ts),
        status: 404,
        error: "not found",
    },
    SigningCase {
        name: "dot_segments",
        build: |ts| good("GET", "/apps/other/../app-id/channels", &[], None, ts),
        status: 404,
        error: "not found",
    },
    SigningCase {
        name: "upper_case_path",
        build: |ts| good("GET", "/APPS/app-id/channels", &[], None, ts),
        status: 404,
        error: "not found",
    },
    SigningCase {
        name: "encoded_slash_in_channel_name",
        build: |ts| good("GET", "/apps/app-id/channels/a%2Fb", &[], None, ts),
        status: 400,
        error: "contains a character outside",
    },
    // A known route with the wrong method is still an API error: JSON, like every other.
    SigningCase {
        name: "wrong_method_on_events",
        build: |ts| good("GET", EVENTS, &[], None, ts),
        status: 405,
        error: "",
    },
    // --- A signature reused for another query (percent-encoded separators) ---------------------
    SigningCase {
        name: "encoded_ampersand_replays_another_querys_signature",
        build: |ts| {
            let ts = ts.to_string();
            let base = [("auth_key", KEY), ("auth_timestamp", ts.as_str()), ("auth_version", "1.0")];
            // Signed: `filter_by_prefix=presence-&info=user_count` ...
            let mut signed = base.to_vec();
            signed.extend([("filter_by_prefix", "presence-"), ("info", "user_count")]);
            let sig = signature(SECRET, "GET", CHANNELS, &signed);
            // ... sent as one value that decodes to the same joined string.
            let q = format!(
                "auth_key={KEY}&auth_timestamp={ts}&auth_version=1.0&filter_by_prefix=presence-%26info%3Duser_count&auth_signature={sig}"
            );
            Req { method: "GET", target: format!("{CHANNELS}?{q}"), body: None }
        },
        status: 401,
        error: "contains an encoded",
    },
    SigningCase {
        name: "encoded_equals_in_a_key",
        build: |ts| channels_with(&[("auth_key", KEY), ("auth_timestamp", &ts.to_string()), ("a=b", "c")]),
        status: 401,
        error: "contains an encoded",
    },
    // --- Unsigned requests to every endpoint --------------------------------------------------------
    SigningCase {
        name: "unsigned_events",
        build: |_| unsigned("POST", EVENTS, Some(BODY)),
        status: 401,
        error: "missing query parameter auth_key",
    },
    SigningCase {
        name: "unsigned_batch_events",
        build: |_| {
            unsigned("POST", "/apps/app-id/batch_events", Some(r#"{"batch":[{"name":"e","channel":"c","data":"d"}]}"#))
        },
        status: 401,
        error: "missing query parameter auth_key",
    },
    SigningCase {
        name: "unsigned_channels",
        build: |_| unsigned("GET", CHANNELS, None),
        status: 401,
        error: "missing query parameter auth_key",
    },
    SigningCase {
        name: "unsigned_channel",
        build: |_| unsigned("GET", "/apps/app-id/channels/news", None),
        status: 401,
        error: "missing query parameter auth_key",
    },
    SigningCase {
        name: "unsigned_channel_users",
        build: |_| unsigned("GET", "/apps/app-id/channels/presence-room/users", None),
        status: 401,
        error: "missing query parameter auth_key",
    },
    SigningCase {
        name: "unsigned_terminate_connections",
        build: |_| unsigned("POST", "/apps/app-id/users/u1/terminate_connections", Some("{}")),
        status: 401,
        error: "missing query parameter auth_key",
    },
    SigningCase {
        name: "unsigned_terminate_connections_without_body",
        build: |_| unsigned("POST", "/apps/app-id/users/u1/terminate_connections", None),
        status: 401,
        error: "missing query parameter auth_key",
    },
];

/// One HTTP/1.1 exchange over a fresh connection (`Connection: close`): status and body.
async fn exchange(port: u16, req: &Req) -> Result<(u16, String), String> {
    let mut tcp = TcpStream::connect(("127.0.0.1", port)).await.map_err(|e| format!("connect: {e}"))?;
    let mut head = format!("{} {} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n", req.method, req.target);
    match &req.body {
        Some(b) => head.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}", b.len())),
        None if req.method == "POST" => head.push_str("Content-Length: 0\r\n\r\n"),
        None => head.push_str("\r\n"),
    }
    tcp.write_all(head.as_bytes()).await.map_err(|e| format!("write: {e}"))?;
    read_response(&mut tcp, WAIT).await
}

/// Reads one response: status and body (by Content-Length, or to EOF).
async fn read_response(tcp: &mut TcpStream, within: Duration) -> Result<(u16, String), String> {
    let deadline = Instant::now() + within;
    let mut buf = Vec::new();
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4) {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok());
            if len.is_some_and(|n| buf.len() >= end + n) {
                let status = head.get(9..12).and_then(|s| s.parse().ok()).ok_or(format!("bad status line: {head}"))?;
                return Ok((status, String::from_utf8_lossy(&buf[end..end + len.unwrap_or(0)]).into_owned()));
            }
        }
        let mut chunk = [0u8; 4096];
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, tcp.read(&mut chunk)).await {
            Err(_) => return Err(format!("no complete response in time (got {:?})", String::from_utf8_lossy(&buf))),
            Ok(Ok(0)) | Ok(Err(_)) => {
                let text = String::from_utf8_lossy(&buf).into_owned();
                let Some((head, body)) = text.split_once("\r\n\r\n") else {
                    return Err(format!("connection closed without a response (got {text:?})"));
                };
                let status = head.get(9..12).and_then(|s| s.parse().ok()).ok_or(format!("bad status line: {head}"))?;
                return Ok((status, body.to_owned()));
            }
            Ok(Ok(k)) => buf.extend_from_slice(&chunk[..k]),
        }
    }
}

/// Checks a refusal: the status and a JSON `{"error": "..."}` body containing `part`.
fn check_refusal(got: (u16, String), status: u16, part: &str) -> Result<(), String> {
    let (s, body) = got;
    let json: Option<Value> = serde_json::from_str(&body).ok();
    let message = json.as_ref().and_then(|v| v.get("error")).and_then(Value::as_str);
    match message {
        Some(m)
            if s == status
                && m.contains(part)
                && json.as_ref().and_then(Value::as_object).map(|o| o.len()) == Some(1) =>
        {
            Ok(())
        }
        _ => Err(format!("expected {status} with a JSON error containing {part:?}, got {s} {body:?}")),
    }
}

#[test]
fn at_least_twenty_five_uniquely_named_cases() {
    let mut names: Vec<_> = CASES.iter().map(|c| c.name).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), CASES.len(), "duplicate case names");
    assert!(CASES.len() >= 25, "{}", CASES.len());
}

/// Every case against one server; all run, then every failure is listed. A correctly signed
/// request still works afterwards (the refusals did not poison anything).
#[tokio::test]
async fn signing_refusals() {
    let server = TestServer::start().await;
    // The control: a correctly signed request of each shape is accepted.
    let ts = now();
    for req in [good("POST", EVENTS, &[], Some(BODY), ts), good("GET", CHANNELS, &[], None, ts)] {
        let (s, body) = exchange(server.port, &req).await.unwrap();
        assert_eq!(s, 200, "{} {}: {body}", req.method, req.target);
    }
    let mut failures = Vec::new();
    for c in CASES {
        let req = (c.build)(now());
        match exchange(server.port, &req).await {
            Ok(got) => {
                if let Err(e) = check_refusal(got, c.status, c.error) {
                    failures.push(format!("{}: {} {}: {e}", c.name, req.method, req.target));
                }
            }
            Err(e) => failures.push(format!("{}: {e}", c.name)),
        }
    }
    let (s, _) = exchange(server.port, &good("POST", EVENTS, &[], Some(BODY), now())).await.unwrap();
    assert_eq!(s, 200);
    assert!(failures.is_empty(), "{} of {} cases failed:\n{}", failures.len(), CASES.len(), failures.join("\n"));
    server.stop().await;
}

/// Timestamps just inside the tolerance are accepted (the refusals above are not off by one
/// in the other direction).
#[tokio::test]
async fn timestamps_inside_the_tolerance_are_accepted() {
    let server = TestServer::start().await;
    for ts in [now() - 590, now() + 590] {
        let (s, body) = exchange(server.port, &good("GET", CHANNELS, &[], None, ts)).await.unwrap();
        assert_eq!(s, 200, "{body}");
    }
    server.stop().await;
}

const CAP_KB: usize = 16;

async fn capped_server() -> TestServer {
    TestServer::start_with(|c| c.http_api.max_body_kb = CAP_KB).await
}

/// A declared Content-Length over the cap is refused from the head alone: the body is never
/// sent and the answer still comes.
#[tokio::test]
async fn content_length_over_the_cap_is_refused_without_waiting_for_the_body() {
    let server = capped_server().await;
    let q = signed_query(KEY, SECRET, "POST", EVENTS, &[], Some(BODY), now());
    let mut tcp = TcpStream::connect(("127.0.0.1", server.port)).await.unwrap();
    let head = format!(
        "POST {EVENTS}?{q} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        100 * 1024 * 1024
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    let got = read_response(&mut tcp, Duration::from_secs(3)).await.unwrap();
    check_refusal(got, 413, "larger than").unwrap();
    // Unsigned, too: the size is checked before anything else.
    let mut tcp = TcpStream::connect(("127.0.0.1", server.port)).await.unwrap();
    let head = format!("POST {EVENTS} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n", CAP_KB * 1024 + 1);
    tcp.write_all(head.as_bytes()).await.unwrap();
    let got = read_response(&mut tcp, Duration::from_secs(3)).await.unwrap();
    check_refusal(got, 413, "larger than").unwrap();
    server.stop().await;
}

/// A chunked body (no Content-Length) that keeps streaming past the cap is refused while it is
/// being read: the 413 arrives long before the client could have sent all of it.
#[tokio::test]
async fn chunked_body_over_the_cap_is_refused_while_streaming() {
    let server = capped_server().await;
    let q = signed_query(KEY, SECRET, "POST", EVENTS, &[], Some(BODY), now());
    let tcp = TcpStream::connect(("127.0.0.1", server.port)).await.unwrap();
    let (mut rd, mut wr) = tcp.into_split();
    let head = format!(
        "POST {EVENTS}?{q} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    );
    wr.write_all(head.as_bytes()).await.unwrap();
    // 256 MiB in 4 KiB chunks: far more than socket buffers can hold, so a server that reads
    // it all before answering would keep the writer busy for the whole of it.
    const TOTAL: usize = 256 * 1024 * 1024;
    let sent = Arc::new(AtomicUsize::new(0));
    let writer = {
        let sent = sent.clone();
        tokio::spawn(async move {
            let mut chunk = b"1000\r\n".to_vec();
            chunk.extend_from_slice(&[b' '; 4096]);
            chunk.extend_from_slice(b"\r\n");
            while sent.load(Ordering::Relaxed) < TOTAL {
                if wr.write_all(&chunk).await.is_err() {
                    return;
                }
                sent.fetch_add(4096, Ordering::Relaxed);
            }
            let _ = wr.write_all(b"0\r\n\r\n").await;
        })
    };
    let tcp_read = async {
        let mut buf = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut chunk = [0u8; 4096];
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, rd.read(&mut chunk)).await {
                Err(_) => return Err(format!("no answer within 10 s (got {:?})", String::from_utf8_lossy(&buf))),
                Ok(Ok(0)) | Ok(Err(_)) => return Ok(buf),
                Ok(Ok(k)) => {
                    buf.extend_from_slice(&chunk[..k]);
                    let text = String::from_utf8_lossy(&buf);
                    if let Some((head, body)) = text.split_once("\r\n\r\n") {
                        let len = head
                            .to_ascii_lowercase()
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:").map(|v| v.trim().parse::<usize>()))
                            .and_then(Result::ok);
                        if len.is_some_and(|n| body.len() >= n) {
                            return Ok(buf);
                        }
                    }
                }
            }
        }
    };
    let answer = tcp_read.await;
    let sent_when_answered = sent.load(Ordering::Relaxed);
    writer.abort();
    let buf = answer.unwrap();
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no response: {text:?}"));
    let status: u16 = head.get(9..12).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("{head}"));
    check_refusal((status, body.to_owned()), 413, "larger than").unwrap();
    assert!(
        sent_when_answered < TOTAL,
        "the 413 came only after the whole {TOTAL}-byte body was sent: it was buffered, not refused while read"
    );
    server.stop().await;
}

/// A body exactly at the cap is read and handled (the cap is not off by one).
#[tokio::test]
async fn body_exactly_at_the_cap_is_accepted() {
    let server = capped_server().await;
    let empty = r#"{"name":"e","channel":"c","data":""}"#;
    let pad = CAP_KB * 1024 - empty.len();
    let body = format!(r#"{{"name":"e","channel":"c","data":"{}"}}"#, "x".repeat(pad));
    assert_eq!(body.len(), CAP_KB * 1024);
    let (s, text) = exchange(server.port, &good("POST", EVENTS, &[], Some(&body), now())).await.unwrap();
    assert_eq!(s, 200, "{text}");
    let over = format!(r#"{{"name":"e","channel":"c","data":"{}"}}"#, "x".repeat(pad + 1));
    let got = exchange(server.port, &good("POST", EVENTS, &[], Some(&over), now())).await.unwrap();
    check_refusal(got, 413, "larger than").unwrap();
    server.stop().await;
}

/// A chunked body that is malformed (not too large) is a bad request, not "too large".
#[tokio::test]
async fn malformed_chunked_body_is_a_bad_request() {
    let server = capped_server().await;
    let q = signed_query(KEY, SECRET, "POST", EVENTS, &[], Some(BODY), now());
    let mut tcp = TcpStream::connect(("127.0.0.1", server.port)).await.unwrap();
    let req =
        format!("POST {EVENTS}?{q} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{BODY}\r\n0\r\n\r\n");
    tcp.write_all(req.as_bytes()).await.unwrap();
    let got = read_response(&mut tcp, WAIT).await.unwrap();
    check_refusal(got, 400, "").unwrap();
    server.stop().await;
}
