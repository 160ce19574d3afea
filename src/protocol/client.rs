//! Frames a client sends, parsed once into [`ClientEvent`]. Every malformed input becomes a
//! [`ProtocolError`] carrying its Pusher code; nothing here panics or allocates without bound
//! (serde_json's recursion limit caps nesting, the caller caps the frame size).

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;

use super::channel::ChannelName;
use super::error::ProtocolError;

/// Limits that parsing enforces, taken from the app's settings.
#[derive(Debug, Clone, Copy)]
pub struct ParseLimits {
    pub max_channel_name_len: usize,
    pub max_event_name_len: usize,
    pub max_client_payload_bytes: usize,
}

/// One parsed client frame.
#[derive(Debug)]
pub enum ClientEvent {
    Ping,
    Pong,
    Subscribe {
        channel: ChannelName,
        auth: Option<String>,
        /// The raw `channel_data` string, exactly as signed by the auth endpoint.
        channel_data: Option<String>,
    },
    Unsubscribe {
        channel: ChannelName,
    },
    Signin(SigninData),
    /// A `client-*` event to forward to the channel's other subscribers.
    Client {
        event: String,
        channel: ChannelName,
        data: Box<RawValue>,
    },
}

/// `pusher:signin` data: the signature and the `user_data` string it signs.
#[derive(Debug, Clone)]
pub struct SigninData {
    pub auth: String,
    pub user_data: String,
    pub user_id: String,
    /// The user ids of `user_data`'s `watchlist` (no repeats, in the order given).
    pub watchlist: Vec<String>,
}

/// A presence member from subscribe `channel_data`.
#[derive(Debug, Clone)]
pub struct PresenceMember {
    pub user_id: String,
    /// `user_info` as raw JSON (`null` when absent).
    pub user_info: Box<RawValue>,
}

#[derive(Deserialize)]
struct RawFrame<'a> {
    #[serde(borrow)]
    event: Cow<'a, str>,
    #[serde(default, borrow)]
    channel: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    data: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct SubscribeData {
    channel: String,
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    channel_data: Option<String>,
}

#[derive(Deserialize)]
struct RawSignin {
    auth: String,
    user_data: String,
}

fn invalid(why: impl Into<String>) -> ProtocolError {
    ProtocolError::InvalidMessage(why.into())
}

/// serde's derived `Deserialize` also reads a struct from a JSON array by position; the
/// protocol only has objects, so anything else is refused before parsing.
fn is_object(text: &str) -> bool {
    text.trim_start().starts_with('{')
}

/// Decodes `data` that is either an object or a string holding JSON (clients send both).
fn decode_data<T: for<'de> Deserialize<'de>>(raw: Option<&RawValue>, what: &str) -> Result<T, ProtocolError> {
    let raw = raw.ok_or_else(|| invalid(format!("{what} needs a data object")))?;
    let text = raw.get();
    let parsed = if text.starts_with('"') {
        let inner: String = serde_json::from_str(text).map_err(|_| invalid(format!("{what} data is not valid")))?;
        if !is_object(&inner) {
            return Err(invalid(format!("{what} data must be an object")));
        }
        serde_json::from_str(&inner)
    } else if is_object(text) {
        serde_json::from_str(text)
    } else {
        return Err(invalid(format!("{what} data must be an object")));
    };
    parsed.map_err(|e| invalid(format!("{what} data is not valid: {}", short(&e))))
}

fn short(e: &serde_json::Error) -> String {
    // serde's messages name the field and type but never echo the input.
    let mut s = e.to_string();
    s.truncate(120);
    s
}

impl ClientEvent {
    /// Parses one text frame.
    pub fn parse(text: &str, limits: &ParseLimits) -> Result<Self, ProtocolError> {
        if !is_object(text) {
            return Err(invalid("a frame must be a JSON object"));
        }
        let frame: RawFrame<'_> =
            serde_json::from_str(text).map_err(|e| invalid(format!("malformed JSON: {}", short(&e))))?;
        let channel_of =
            |name: &str| ChannelName::parse(name, limits.max_channel_name_len).map_err(|e| invalid(e.to_string()));
        match frame.event.as_ref() {
            "pusher:ping" => Ok(Self::Ping),
            "pusher:pong" => Ok(Self::Pong),
            "pusher:subscribe" => {
                let data: SubscribeData = decode_data(frame.data, "pusher:subscribe")?;
                Ok(Self::Subscribe {
                    channel: channel_of(&data.channel)?,
                    auth: data.auth,
                    channel_data: data.channel_data,
                })
            }
            "pusher:unsubscribe" => {
                let data: SubscribeData = decode_data(frame.data, "pusher:unsubscribe")?;
                Ok(Self::Unsubscribe { channel: channel_of(&data.channel)? })
            }
            "pusher:signin" => {
                let data: RawSignin = decode_data(frame.data, "pusher:signin")?;
                let (user_id, watchlist) = parse_user_data(&data.user_data)?;
                Ok(Self::Signin(SigninData { auth: data.auth, user_data: data.user_data, user_id, watchlist }))
            }
            event if event.starts_with("client-") => {
                if event.len() > limits.max_event_name_len {
                    return Err(ProtocolError::ClientEventRejected(format!(
                        "event name longer than {} characters",
                        limits.max_event_name_len
                    )));
                }
                let channel =
                    frame.channel.ok_or_else(|| ProtocolError::ClientEventRejected("no channel given".into()))?;
                let channel = channel_of(&channel)?;
                let data = frame.data.ok_or_else(|| ProtocolError::ClientEventRejected("no data given".into()))?;
                if data.get().len() > limits.max_client_payload_bytes {
                    return Err(ProtocolError::ClientEventRejected(format!(
                        "payload larger than {} bytes",
                        limits.max_client_payload_bytes
                    )));
                }
                Ok(Self::Client { event: event.to_owned(), channel, data: data.to_owned() })
            }
            event if event.starts_with("pusher:") || event.starts_with("pusher_internal:") => {
                Err(invalid("unknown pusher event"))
            }
            _ => Err(invalid("events sent by clients must start with client-")),
        }
    }
}

/// Extracts the `id` of a sign-in `user_data` string (a JSON object with a non-empty string id).
/// The longest user id accepted, in bytes (as an id of `user_data` or of its watchlist).
const MAX_USER_ID_LEN: usize = 200;

/// `user_data`'s `id` and `watchlist` (`[]` when absent).
fn parse_user_data(user_data: &str) -> Result<(String, Vec<String>), ProtocolError> {
    #[derive(Deserialize)]
    struct UserData {
        id: serde_json::Value,
        #[serde(default)]
        watchlist: Option<serde_json::Value>,
    }
    let is_id = |s: &str| !s.is_empty() && s.len() <= MAX_USER_ID_LEN;
    if !is_object(user_data) {
        return Err(invalid("user_data must be a JSON object with an id"));
    }
    let parsed: UserData =
        serde_json::from_str(user_data).map_err(|_| invalid("user_data must be a JSON object with an id"))?;
    let id = match parsed.id {
        serde_json::Value::String(s) if is_id(&s) => s,
        _ => return Err(invalid("user_data id must be a non-empty string")),
    };
    let not_ids = || invalid("user_data watchlist must be an array of non-empty user id strings");
    let mut watchlist: Vec<String> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    match parsed.watchlist {
        None | Some(serde_json::Value::Null) => {}
        Some(serde_json::Value::Array(items)) => {
            for item in items {
                let serde_json::Value::String(user) = item else { return Err(not_ids()) };
                if !is_id(&user) {
                    return Err(not_ids());
                }
                if seen.insert(user.clone()) {
                    watchlist.push(user);
                }
            }
        }
        Some(_) => return Err(not_ids()),
    }
    Ok((id, watchlist))
}

impl PresenceMember {
    /// Parses presence `channel_data`: `{"user_id": string|number, "user_info"?: any}`.
    pub fn parse(channel_data: &str, max_bytes: usize) -> Result<Self, ProtocolError> {
        #[derive(Deserialize)]
        struct Raw<'a> {
            user_id: serde_json::Value,
            #[serde(default, borrow)]
            user_info: Option<&'a RawValue>,
        }
        if channel_data.len() > max_bytes {
            return Err(ProtocolError::SubscriptionRejected(format!(
                "presence channel_data larger than {max_bytes} bytes"
            )));
        }
        if !is_object(channel_data) {
            return Err(invalid("channel_data must be a JSON object with user_id"));
        }
        let raw: Raw<'_> = serde_json::from_str(channel_data)
            .map_err(|_| invalid("channel_data must be a JSON object with user_id"))?;
        let user_id = match raw.user_id {
            serde_json::Value::String(s) if !s.is_empty() && s.len() <= 200 => s,
            serde_json::Value::Number(n) => n.to_string(),
            _ => return Err(invalid("channel_data user_id must be a non-empty string or number")),
        };
        let user_info = match raw.user_info {
            Some(info) => info.to_owned(),
            None => RawValue::from_string("null".into()).map_err(|_| invalid("user_info"))?,
        };
        Ok(Self { user_id, user_info })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const L: ParseLimits =
        ParseLimits { max_channel_name_len: 200, max_event_name_len: 200, max_client_payload_bytes: 10_240 };

    #[test]
    fn parses_the_protocol() {
        assert!(matches!(ClientEvent::parse(r#"{"event":"pusher:ping","data":""}"#, &L), Ok(ClientEvent::Ping)));
        assert!(matches!(ClientEvent::parse(r#"{"event":"pusher:ping"}"#, &L), Ok(ClientEvent::Ping)));
        let sub = ClientEvent::parse(
            r#"{"event":"pusher:subscribe","data":{"channel":"presence-a","auth":"k:s","channel_data":"{\"user_id\":1}"}}"#,
            &L,
        )
        .unwrap();
        match sub {
            ClientEvent::Subscribe { channel, auth, channel_data } => {
                assert_eq!(channel.as_str(), "presence-a");
                assert_eq!(auth.as_deref(), Some("k:s"));
                assert_eq!(channel_data.as_deref(), Some("{\"user_id\":1}"));
            }
            other => panic!("{other:?}"),
        }
        let string_data = ClientEvent::parse(r#"{"event":"pusher:subscribe","data":"{\"channel\":\"a\"}"}"#, &L);
        assert!(matches!(string_data, Ok(ClientEvent::Subscribe { .. })));
        let ce = ClientEvent::parse(r#"{"event":"client-x","channel":"private-a","data":{"a":1}}"#, &L).unwrap();
        assert!(matches!(ce, ClientEvent::Client { .. }));
    }

    #[test]
    fn signin_reads_the_watchlist() {
        assert_eq!(parse_user_data(r#"{"id":"u1"}"#).unwrap(), ("u1".to_owned(), vec![]));
        let (id, watchlist) = parse_user_data(r#"{"id":"u1","watchlist":["u2","u3","u2"]}"#).unwrap();
        assert_eq!((id.as_str(), watchlist), ("u1", vec!["u2".to_owned(), "u3".to_owned()]));
        for bad in
            [r#"{"id":"u1","watchlist":"u2"}"#, r#"{"id":"u1","watchlist":[2]}"#, r#"{"id":"u1","watchlist":[""]}"#]
        {
            assert_eq!(parse_user_data(bad).unwrap_err().code(), 4300, "{bad}");
        }
        let long = format!(r#"{{"id":"u1","watchlist":["{}"]}}"#, "x".repeat(MAX_USER_ID_LEN + 1));
        assert!(parse_user_data(&long).is_err());
    }

    #[test]
    fn refuses_with_codes() {
        let code = |s: &str| ClientEvent::parse(s, &L).unwrap_err().code();
        assert_eq!(code("{"), 4300);
        assert_eq!(code("[]"), 4300);
        assert_eq!(code(r#"{"event":5}"#), 4300);
        assert_eq!(code(r#"{"event":"pusher:subscribe","data":5}"#), 4300);
        assert_eq!(code(r#"{"event":"pusher:subscribe","data":{"channel":"a b"}}"#), 4300);
        assert_eq!(code(r#"{"event":"pusher:nope"}"#), 4300);
        assert_eq!(code(r#"{"event":"hello"}"#), 4300);
        assert_eq!(code(r#"{"event":"client-x","data":{}}"#), 4301);
        // Deep nesting is skipped iteratively (no recursion, no stack overflow); this one is
        // refused for its size.
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert_eq!(code(&format!(r#"{{"event":"client-x","channel":"private-a","data":{deep}}}"#)), 4301);
        // Nesting inside a field that is parsed (not skipped) hits serde_json's recursion limit.
        let deep_obj = format!("{}{}", "{\"a\":".repeat(1000), "}".repeat(1000));
        assert_eq!(code(&format!(r#"{{"event":"pusher:subscribe","data":{deep_obj}}}"#)), 4300);
    }

    #[test]
    fn presence_member() {
        let m = PresenceMember::parse(r#"{"user_id":7,"user_info":{"n":"x"}}"#, 1024).unwrap();
        assert_eq!(m.user_id, "7");
        assert_eq!(m.user_info.get(), r#"{"n":"x"}"#);
        assert!(PresenceMember::parse(r#"{"user_id":""}"#, 1024).is_err());
        assert!(PresenceMember::parse(r#"{"user_id":[1]}"#, 1024).is_err());
        assert!(PresenceMember::parse(r#"{"user_id":"1","user_info":"x"}"#, 5).is_err());
    }
}
