//! Fuzz-target glue: one function per parser of untrusted input, each feeding raw bytes to the
//! same code the server runs on them and asserting what must hold whatever the bytes are. It
//! lives in the library (hidden from the docs) so that the cargo-fuzz binaries in `fuzz/` and
//! the stable regression test `tests/it/fuzz_regressions.rs` drive exactly the same code.
//!
//! A panic here is a bug: either a parser panicked (parsing must never panic) or one of the
//! invariants below does not hold. Limits are the defaults an app gets from [`AppConfig`].

use axum::http::Uri;
use serde_json::{json, Value};

use crate::api::ApiError;
use crate::auth::{self, ApiAuthError, SignedRequest};
use crate::config::{AppConfig, HttpApiConfig};
use crate::protocol::client::ParseLimits;
use crate::protocol::rest::{self, PublishEvent, PublishLimits};
use crate::protocol::{server, ChannelKind, ChannelName, ClientEvent, PresenceMember, USER_CHANNEL_PREFIX};

/// A fuzz target: takes any bytes, panics only on a bug.
pub type Target = fn(&[u8]);

/// Every target by name: the regression test replays `fuzz/{seeds,regressions}/<name>/` through it.
pub const TARGETS: &[(&str, Target)] = &[
    ("client_frame", client_frame),
    ("channel_name", channel_name),
    ("subscribe_auth", subscribe_auth),
    ("channel_data", channel_data),
    ("signin_user_data", signin_user_data),
    ("api_query", api_query),
    ("api_events_body", api_events_body),
    ("api_batch_body", api_batch_body),
];

/// The app the targets sign for (Pusher's documentation example credentials).
const KEY: &str = "278d425bdf160c739803";
const SECRET: &str = "7ad3773142a6692b25b8";
const SOCKET_ID: &str = "1234.1234";
/// The server's clock in `api_query`; seeds carry `auth_timestamp` = this.
const NOW: u64 = 1_353_088_179;
/// Longest user id a presence member or signed-in user may have.
const MAX_USER_ID: usize = 200;

fn app() -> AppConfig {
    AppConfig::default()
}

/// The limits a session parses frames with (the default app's).
fn parse_limits() -> ParseLimits {
    crate::app::parse_limits(&app())
}

/// The limits an API publish is checked against (the default app's).
fn publish_limits() -> PublishLimits {
    crate::app::publish_limits(&app())
}

/// Parses a frame the server built; it must always be valid JSON.
fn json(frame: &str) -> Value {
    match serde_json::from_str(frame) {
        Ok(v) => v,
        Err(e) => panic!("the server built invalid JSON ({e}): {frame}"),
    }
}

/// Parses JSON that holds a client's raw JSON verbatim (`user_info`, `user_data`, client event
/// `data`). The server accepts those with serde_json's grammar check (as a `RawValue`), and RFC
/// 8259's grammar allows what a `Value` cannot hold: an unpaired surrogate escape (`"\ud800"`)
/// or a number beyond f64 (`1e400`). JavaScript's `JSON.parse` takes both, so they are relayed
/// as they are (fuzz/regressions/*/crash-lone-surrogate-*); the text must still be grammatical,
/// and only then is `None` returned and the field checks skipped.
fn relayed_json(text: &str) -> Option<Value> {
    if let Err(e) = serde_json::from_str::<serde::de::IgnoredAny>(text) {
        panic!("the server built invalid JSON ({e}): {text}");
    }
    serde_json::from_str(text).ok()
}

/// Parses the JSON string held in a server frame's `data` (which may relay a client's JSON).
fn inner(frame: &Value) -> Option<Value> {
    relayed_json(frame["data"].as_str().expect("data is a string"))
}

/// A client frame (the bytes of one WebSocket text message) through `ClientEvent::parse`. A
/// refusal must render as a valid `pusher:error`; an accepted frame, serialised again (or relayed
/// to other subscribers, for `client-` events), must parse back to the same event.
pub fn client_frame(data: &[u8]) {
    // Text frames are UTF-8: tungstenite refuses anything else before the session sees it.
    let Ok(text) = std::str::from_utf8(data) else { return };
    let limits = parse_limits();
    let event = match ClientEvent::parse(text, &limits) {
        Ok(event) => event,
        Err(err) => {
            let frame = json(&server::error(&err));
            assert_eq!(frame["data"]["code"], err.code());
            assert_eq!(frame["data"]["message"], err.to_string());
            return;
        }
    };
    let reparse = |frame: Value| match ClientEvent::parse(&frame.to_string(), &limits) {
        Ok(event) => event,
        Err(e) => panic!("a re-serialised frame was refused ({e}): {frame}"),
    };
    match event {
        ClientEvent::Ping | ClientEvent::Pong => {}
        ClientEvent::Subscribe { channel, auth, channel_data } => {
            check_channel(&channel, limits.max_channel_name_len);
            let data = json!({ "channel": channel.as_str(), "auth": auth, "channel_data": channel_data });
            // Clients send `data` as an object or as a string holding one; both must round-trip.
            for data in [data.clone(), Value::String(data.to_string())] {
                match reparse(json!({ "event": "pusher:subscribe", "data": data })) {
                    ClientEvent::Subscribe { channel: c, auth: a, channel_data: d } => {
                        assert_eq!((&c, &a, &d), (&channel, &auth, &channel_data));
                    }
                    other => panic!("subscribe re-parsed as {other:?}"),
                }
            }
            let ok = json(&server::subscription_succeeded(channel.as_str(), "{}"));
            assert_eq!(ok["channel"], channel.as_str());
        }
        ClientEvent::Unsubscribe { channel } => {
            check_channel(&channel, limits.max_channel_name_len);
            match reparse(json!({ "event": "pusher:unsubscribe", "data": { "channel": channel.as_str() } })) {
                ClientEvent::Unsubscribe { channel: c } => assert_eq!(c, channel),
                other => panic!("unsubscribe re-parsed as {other:?}"),
            }
        }
        ClientEvent::Signin(signin) => {
            check_user_id(&signin.user_id);
            let data = json!({ "auth": signin.auth, "user_data": signin.user_data });
            match reparse(json!({ "event": "pusher:signin", "data": data })) {
                ClientEvent::Signin(s) => {
                    assert_eq!((&s.auth, &s.user_data, &s.user_id), (&signin.auth, &signin.user_data, &signin.user_id));
                }
                other => panic!("signin re-parsed as {other:?}"),
            }
            let success = inner(&json(&server::signin_success(&signin.user_data)))
                .expect("signin_success data holds only a string");
            assert_eq!(success["user_data"], signin.user_data);
        }
        ClientEvent::Client { event, channel, data } => {
            assert!(event.starts_with("client-") && event.len() <= limits.max_event_name_len);
            assert!(data.get().len() <= limits.max_client_payload_bytes);
            check_channel(&channel, limits.max_channel_name_len);
            // What the channel's other subscribers receive is itself a valid client event.
            for user_id in [None, Some("user \"7\"\n")] {
                let relayed = server::client_event(channel.as_str(), &event, data.get(), user_id);
                if let Some(frame) = relayed_json(&relayed) {
                    assert_eq!(frame["user_id"], json!(user_id));
                }
                match ClientEvent::parse(&relayed, &limits) {
                    Ok(ClientEvent::Client { event: e, channel: c, data: d }) => {
                        assert_eq!((&e, &c, d.get()), (&event, &channel, data.get()));
                    }
                    other => panic!("the relayed frame {relayed} re-parsed as {other:?}"),
                }
            }
        }
    }
}

/// A channel name through `ChannelName::parse` with the default length limit.
pub fn channel_name(data: &[u8]) {
    let Ok(name) = std::str::from_utf8(data) else { return };
    let max = app().max_channel_name_length;
    if let Ok(channel) = ChannelName::parse(name, max) {
        assert_eq!(channel.as_str(), name);
        check_channel(&channel, max);
    }
}

/// What every accepted channel name satisfies.
fn check_channel(channel: &ChannelName, max: usize) {
    let name = channel.as_str();
    assert!(!name.is_empty() && name.len() <= max, "{name:?}");
    // Names go into frames, logs and Redis/NATS subjects: printable ASCII only.
    assert!(name.bytes().all(|b| b.is_ascii_graphic()), "{name:?}");
    assert_eq!(ChannelName::parse(name, max).as_ref(), Ok(channel));
    // Whatever looks private or presence must be authorised, or a name could skip the check.
    let signed = name.starts_with("private-") || name.starts_with("presence-");
    assert_eq!(channel.requires_auth(), signed, "{name:?}");
    assert_eq!(channel.kind() == ChannelKind::Presence, name.starts_with("presence-"), "{name:?}");
    match channel.user_id() {
        Some(user) => {
            assert_eq!(channel.kind(), ChannelKind::User);
            assert!(!user.is_empty() && name == format!("{USER_CHANNEL_PREFIX}{user}"));
        }
        None => assert!(channel.kind() != ChannelKind::User && !name.contains('#'), "{name:?}"),
    }
}

/// A subscribe frame checked the way the session checks it: for a private, encrypted or
/// presence channel, the signature the auth endpoint computes (over `socket_id:channel`, plus
/// `:channel_data` for presence) verifies; a one-byte change of it does not; and the fuzzed
/// `auth` verifies exactly when it is that key and signature (hex in either case). The signed
/// `channel_data` of a presence channel then goes through [`channel_data`]'s checks.
pub fn subscribe_auth(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(ClientEvent::Subscribe { channel, auth, channel_data }) = ClientEvent::parse(text, &parse_limits()) else {
        return;
    };
    if !channel.requires_auth() {
        return;
    }
    let presence = channel.kind() == ChannelKind::Presence;
    let signed_data = if presence { channel_data.as_deref() } else { None };
    let message = match signed_data {
        Some(d) => format!("{SOCKET_ID}:{channel}:{d}"),
        None => format!("{SOCKET_ID}:{channel}"),
    };
    let signature = auth::sign(SECRET, &message);
    let verify =
        |auth: &str, data: Option<&str>| auth::verify_channel(KEY, SECRET, SOCKET_ID, channel.as_str(), data, auth);
    let good = format!("{KEY}:{signature}");
    assert!(verify(&good, signed_data));
    assert!(verify(&format!("{KEY}:{}", signature.to_ascii_uppercase()), signed_data));
    assert!(!verify(&format!("{KEY}:{}", change_hex_digit(&signature, data.len())), signed_data));
    assert!(!verify(&format!("{}:{signature}", change_hex_digit(KEY, data.len())), signed_data));
    if signed_data.is_some() {
        // The signature covers channel_data: without it (or with another) it is refused.
        assert!(!verify(&good, None));
        assert!(!verify(&good, Some("{\"user_id\":\"someone else\"}")));
    }
    if let Some(auth) = &auth {
        let expected = auth.split_once(':').is_some_and(|(k, s)| k == KEY && s.eq_ignore_ascii_case(&signature));
        assert_eq!(verify(auth, signed_data), expected, "{auth:?}");
    }
    if let Some(d) = signed_data {
        check_presence_member(d);
    }
}

/// Replaces the hex digit at `seed % len` by another one (a one-byte change).
fn change_hex_digit(hex: &str, seed: usize) -> String {
    let mut bytes = hex.as_bytes().to_vec();
    let i = seed % bytes.len();
    bytes[i] = if bytes[i] == b'0' { b'1' } else { b'0' };
    String::from_utf8(bytes).expect("hex is ASCII")
}

/// A presence subscribe's `channel_data` through `PresenceMember::parse` with the default size
/// limit; an accepted member's frames (`member_added`, the presence hash) must be valid JSON
/// carrying its id and `user_info` unchanged.
pub fn channel_data(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    check_presence_member(text);
}

fn check_presence_member(channel_data: &str) {
    let max = app().max_presence_member_size_in_kb * 1024;
    let member = match PresenceMember::parse(channel_data, max) {
        Ok(m) => m,
        Err(e) => {
            json(&server::subscription_error("presence-a", "InvalidChannelData", &e.to_string(), 400));
            return;
        }
    };
    check_user_id(&member.user_id);
    let info = relayed_json(member.user_info.get());
    let added = inner(&json(&server::member_added("presence-a", &member.user_id, member.user_info.get())));
    let members = [(member.user_id.as_str(), member.user_info.get())];
    let presence = relayed_json(&server::presence_data(members.into_iter(), 1));
    if let (Some(info), Some(added), Some(presence)) = (info, added, presence) {
        assert_eq!((&added["user_id"], &added["user_info"]), (&json!(member.user_id), &info));
        assert_eq!(presence["presence"]["ids"][0], member.user_id);
        assert_eq!(presence["presence"]["hash"][&member.user_id], info);
    }
}

fn check_user_id(user_id: &str) {
    assert!(!user_id.is_empty() && user_id.len() <= MAX_USER_ID, "user id of {} bytes", user_id.len());
}

/// A sign-in `user_data` string, sent the way pusher-js sends it (a JSON string in a
/// `pusher:signin` frame, with the signature the auth endpoint computes): an accepted one yields
/// its `id`, the signature verifies and a one-byte change of it does not, and
/// `pusher:signin_success` carries `user_data` back unchanged.
pub fn signin_user_data(data: &[u8]) {
    let Ok(user_data) = std::str::from_utf8(data) else { return };
    let signature = auth::sign(SECRET, &format!("{SOCKET_ID}::user::{user_data}"));
    let good = format!("{KEY}:{signature}");
    let frame = json!({ "event": "pusher:signin", "data": { "auth": good, "user_data": user_data } });
    let signin = match ClientEvent::parse(&frame.to_string(), &parse_limits()) {
        Ok(ClientEvent::Signin(s)) => s,
        Ok(other) => panic!("a signin frame parsed as {other:?}"),
        Err(e) => {
            json(&server::error(&e));
            return;
        }
    };
    assert_eq!(signin.user_data, user_data);
    check_user_id(&signin.user_id);
    if let Some(parsed) = relayed_json(user_data) {
        assert_eq!(parsed["id"], signin.user_id);
    }
    let verify = |auth: &str| auth::verify_signin(KEY, SECRET, SOCKET_ID, &signin.user_data, auth);
    assert!(verify(&signin.auth));
    assert!(!verify(&format!("{KEY}:{}", change_hex_digit(&signature, data.len()))));
    let success =
        inner(&json(&server::signin_success(&signin.user_data))).expect("signin_success data holds only a string");
    assert_eq!(success["user_data"], user_data);
}

/// An API request as `api::authenticate` sees it: the first line is the request target (path
/// and query, parsed as hyper parses it), anything after the first newline is the body (and
/// makes it a POST). Checks that verification is deterministic and independent of parameter
/// order; that the same parameters, signed the way Pusher's server libraries sign them (sorted
/// `key=value` pairs joined by `&` after `METHOD\npath\n`, with fresh `auth_*` and `body_md5`),
/// verify; and that a one-byte change of the signature, the path or a parameter does not.
pub fn api_query(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let (target, body) = text.split_once('\n').unwrap_or((text, ""));
    let Ok(uri) = target.parse::<Uri>() else { return };
    let method = if body.is_empty() { "GET" } else { "POST" };
    let tolerance = HttpApiConfig::default().timestamp_tolerance_seconds;
    let (path, body) = (uri.path(), body.as_bytes());
    let verify = |path: &str, query: &str| {
        let req = SignedRequest { method, path, query, body };
        auth::verify_api_request(KEY, SECRET, &req, NOW, tolerance)
    };
    let query = uri.query().unwrap_or("");
    let first = verify(path, query);
    assert_eq!(verify(path, query), first);
    if let Err(e) = &first {
        // What `api::authenticate` answers: 400 for a duplicate, 401 otherwise.
        let status = match e {
            ApiAuthError::Duplicate(_) => ApiError::BadRequest(e.to_string()).status(),
            other => ApiError::Unauthorized(other.clone()).status(),
        };
        assert!(status.is_client_error());
    }
    let params = match auth::query_params(query) {
        Ok(params) => params,
        Err(e) => {
            assert!(
                matches!(first, Err(ApiAuthError::Duplicate(_) | ApiAuthError::Ambiguous(_))),
                "{e:?} vs {first:?}"
            );
            return;
        }
    };
    let reversed = query.split('&').rev().collect::<Vec<_>>().join("&");
    assert_eq!(verify(path, &reversed), first, "order changed the answer for {query:?}");

    let fresh = ["auth_key", "auth_timestamp", "auth_version", "auth_signature", "body_md5"];
    let mut signed: Vec<(String, String)> = params.into_iter().filter(|(k, _)| !fresh.contains(&k.as_str())).collect();
    let changeable = signed.iter().position(|(_, v)| !v.is_empty());
    signed.push(("auth_key".into(), KEY.into()));
    signed.push(("auth_timestamp".into(), NOW.to_string()));
    signed.push(("auth_version".into(), "1.0".into()));
    if !body.is_empty() {
        signed.push(("body_md5".into(), auth::body_md5(body)));
    }
    let (query, signature) = sign_like_a_client(method, path, &signed);
    assert_eq!(verify(path, &query), Ok(()), "a correctly signed {method} {path}?{query} was refused");
    let wrong_signature = query.replace(&signature, &change_hex_digit(&signature, data.len()));
    assert_eq!(verify(path, &wrong_signature), Err(ApiAuthError::Signature));
    assert_eq!(verify(&format!("{path}x"), &query), Err(ApiAuthError::Signature));
    if let Some(i) = changeable {
        let mut changed = signed.clone();
        let value = &mut changed[i].1;
        let first_char = value.chars().next().expect("value is not empty");
        value.replace_range(..first_char.len_utf8(), if first_char == 'a' { "b" } else { "a" });
        // The changed parameters with the original signature.
        let (changed_query, changed_signature) = sign_like_a_client(method, path, &changed);
        let forged = changed_query.replace(&changed_signature, &signature);
        assert_eq!(verify(path, &forged), Err(ApiAuthError::Signature), "{forged:?}");
    }
}

/// The form-encoded query, with `auth_signature` last, and the signature, as a Pusher server
/// library builds them.
fn sign_like_a_client(method: &str, path: &str, params: &[(String, String)]) -> (String, String) {
    let mut sorted: Vec<&(String, String)> = params.iter().collect();
    sorted.sort();
    let pairs: Vec<String> = sorted.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let signature = auth::sign(SECRET, &format!("{method}\n{path}\n{}", pairs.join("&")));
    let mut query = form_urlencoded::Serializer::new(String::new());
    query.extend_pairs(params);
    query.append_pair("auth_signature", &signature);
    (query.finish(), signature)
}

/// A `POST /events` body through `rest::parse_event` with the default limits.
pub fn api_events_body(data: &[u8]) {
    let limits = publish_limits();
    match rest::parse_event(data, &limits) {
        Ok(event) => {
            check_publish(&event, &limits);
            let again = rest::parse_event(publish_body(&event).to_string().as_bytes(), &limits);
            assert_same(&again.expect("a re-serialised event parses"), &event);
        }
        Err(e) => check_body_error(e),
    }
}

/// A `POST /batch_events` body through `rest::parse_batch` with the default limits.
pub fn api_batch_body(data: &[u8]) {
    let limits = publish_limits();
    match rest::parse_batch(data, &limits) {
        Ok(events) => {
            assert!(!events.is_empty() && events.len() <= limits.max_batch);
            let one = PublishLimits { max_channels: 1, ..limits };
            for event in &events {
                check_publish(event, &one);
            }
            let body = json!({ "batch": events.iter().map(publish_body).collect::<Vec<_>>() });
            let again = rest::parse_batch(body.to_string().as_bytes(), &limits).expect("a re-serialised batch parses");
            assert_eq!(again.len(), events.len());
            again.iter().zip(&events).for_each(|(a, b)| assert_same(a, b));
        }
        Err(e) => check_body_error(e),
    }
}

/// A refused body is a client error: 400, or 413 when the data is too large.
fn check_body_error(e: rest::BodyError) {
    let err = ApiError::from(e);
    assert!(matches!(err.status().as_u16(), 400 | 413), "{err}");
}

/// What every accepted publish satisfies, and its frame: valid JSON carrying the name, channel
/// and data unchanged.
fn check_publish(event: &PublishEvent, limits: &PublishLimits) {
    assert!(!event.name.is_empty() && event.name.len() <= limits.max_event_name_len);
    assert!(event.data.len() <= limits.max_payload_bytes);
    assert!(!event.channels.is_empty() && event.channels.len() <= limits.max_channels);
    for (i, channel) in event.channels.iter().enumerate() {
        check_channel(channel, limits.max_channel_name_len);
        assert!(!event.channels[..i].contains(channel), "duplicate channel {channel}");
        let frame = json(&server::event(channel.as_str(), &event.name, &event.data));
        assert_eq!(
            (&frame["event"], &frame["channel"], &frame["data"]),
            (&json!(event.name), &json!(channel.as_str()), &json!(event.data))
        );
    }
    if event.channels.len() > 1 {
        assert!(event.channels.iter().all(|c| c.user_id().is_none()));
    }
    assert!(event.socket_id.as_deref().is_none_or(rest::valid_socket_id));
    assert!(event.info.iter().all(|f| !f.is_empty() && !f.contains(',') && f.trim() == f));
}

/// A publish as a client library would send it (`data` as a string).
fn publish_body(event: &PublishEvent) -> Value {
    let channels: Vec<&str> = event.channels.iter().map(ChannelName::as_str).collect();
    let mut body = json!({ "name": event.name, "data": event.data, "channels": channels });
    if let Some(s) = &event.socket_id {
        body["socket_id"] = json!(s);
    }
    if !event.info.is_empty() {
        body["info"] = json!(event.info.join(","));
    }
    body
}

fn assert_same(a: &PublishEvent, b: &PublishEvent) {
    assert_eq!(
        (&a.name, &a.data, &a.channels, &a.socket_id, &a.info),
        (&b.name, &b.data, &b.channels, &b.socket_id, &b.info)
    );
}
