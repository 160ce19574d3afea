//! Frames the server sends, serialised straight into a `String` once; a broadcast's frame is
//! built once and the same bytes go to every recipient.
//!
//! Pusher sends `data` as a JSON-encoded string for events (pusher-js parses it back) and as an
//! object for `pusher:error`; these builders follow that exactly.

use super::error::ProtocolError;

/// Appends `s` as a JSON string literal.
fn push_json_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                out.push_str(&format!("\\u{:04x}", c as u32));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// A frame builder: `{"event":E[,"channel":C],"data":...}`.
struct Frame(String);

impl Frame {
    fn new(event: &str, capacity: usize) -> Self {
        let mut s = String::with_capacity(capacity + event.len() + 32);
        s.push_str("{\"event\":");
        push_json_str(&mut s, event);
        Frame(s)
    }

    fn channel(mut self, channel: &str) -> Self {
        self.0.push_str(",\"channel\":");
        push_json_str(&mut self.0, channel);
        self
    }

    /// `data` as a JSON string holding `text`.
    fn data_str(mut self, text: &str) -> Self {
        self.0.push_str(",\"data\":");
        push_json_str(&mut self.0, text);
        self
    }

    /// `data` as raw JSON (already valid JSON).
    fn data_raw(mut self, json: &str) -> Self {
        self.0.push_str(",\"data\":");
        self.0.push_str(json);
        self
    }

    fn user_id(mut self, user_id: &str) -> Self {
        self.0.push_str(",\"user_id\":");
        push_json_str(&mut self.0, user_id);
        self
    }

    fn finish(mut self) -> String {
        self.0.push('}');
        self.0
    }
}

/// `pusher:connection_established`.
pub fn connection_established(socket_id: &str, activity_timeout_s: u64) -> String {
    let data = format!("{{\"socket_id\":\"{socket_id}\",\"activity_timeout\":{activity_timeout_s}}}");
    Frame::new("pusher:connection_established", data.len() + 8).data_str(&data).finish()
}

/// `pusher:error` with `{code, message}`.
pub fn error(err: &ProtocolError) -> String {
    let mut data = String::with_capacity(96);
    data.push_str("{\"code\":");
    data.push_str(&err.code().to_string());
    data.push_str(",\"message\":");
    push_json_str(&mut data, &err.to_string());
    data.push('}');
    Frame::new("pusher:error", data.len()).data_raw(&data).finish()
}

pub fn pong() -> String {
    Frame::new("pusher:pong", 4).data_str("{}").finish()
}

pub fn ping() -> String {
    Frame::new("pusher:ping", 4).data_str("{}").finish()
}

/// `pusher_internal:subscription_succeeded`; `data` is `{}` or the presence object.
pub fn subscription_succeeded(channel: &str, data: &str) -> String {
    Frame::new("pusher_internal:subscription_succeeded", channel.len() + data.len())
        .channel(channel)
        .data_str(data)
        .finish()
}

/// `pusher:subscription_error` on the channel, in the shape pusher-js emits for auth errors.
pub fn subscription_error(channel: &str, kind: &str, error: &str, status: u16) -> String {
    let mut data = String::with_capacity(64 + error.len());
    data.push_str("{\"type\":");
    push_json_str(&mut data, kind);
    data.push_str(",\"error\":");
    push_json_str(&mut data, error);
    data.push_str(",\"status\":");
    data.push_str(&status.to_string());
    data.push('}');
    Frame::new("pusher:subscription_error", channel.len() + data.len()).channel(channel).data_raw(&data).finish()
}

/// The presence part of `subscription_succeeded`: `{"presence":{"ids":[..],"hash":{..},"count":n}}`.
pub fn presence_data<'a>(members: impl Iterator<Item = (&'a str, &'a str)>, count: usize) -> String {
    let mut ids = String::from("[");
    let mut hash = String::from("{");
    for (i, (id, info)) in members.enumerate() {
        if i > 0 {
            ids.push(',');
            hash.push(',');
        }
        push_json_str(&mut ids, id);
        push_json_str(&mut hash, id);
        hash.push(':');
        hash.push_str(info);
    }
    ids.push(']');
    hash.push('}');
    format!("{{\"presence\":{{\"ids\":{ids},\"hash\":{hash},\"count\":{count}}}}}")
}

pub fn member_added(channel: &str, user_id: &str, user_info: &str) -> String {
    let mut data = String::from("{\"user_id\":");
    push_json_str(&mut data, user_id);
    data.push_str(",\"user_info\":");
    data.push_str(user_info);
    data.push('}');
    Frame::new("pusher_internal:member_added", channel.len() + data.len()).channel(channel).data_str(&data).finish()
}

pub fn member_removed(channel: &str, user_id: &str) -> String {
    let mut data = String::from("{\"user_id\":");
    push_json_str(&mut data, user_id);
    data.push('}');
    Frame::new("pusher_internal:member_removed", channel.len() + data.len()).channel(channel).data_str(&data).finish()
}

/// An event published through the HTTP API: `data` is the string the publisher gave.
pub fn event(channel: &str, event: &str, data: &str) -> String {
    Frame::new(event, channel.len() + data.len() + 16).channel(channel).data_str(data).finish()
}

/// A client event, forwarded with its data as sent and, on presence channels, the sender's id.
pub fn client_event(channel: &str, event: &str, data_json: &str, user_id: Option<&str>) -> String {
    let f = Frame::new(event, channel.len() + data_json.len() + 32).channel(channel).data_raw(data_json);
    match user_id {
        Some(id) => f.user_id(id).finish(),
        None => f.finish(),
    }
}

pub fn cache_miss(channel: &str) -> String {
    Frame::new("pusher:cache_miss", channel.len()).channel(channel).data_str("{}").finish()
}

pub fn subscription_count(channel: &str, count: usize) -> String {
    let data = format!("{{\"subscription_count\":{count}}}");
    Frame::new("pusher_internal:subscription_count", channel.len() + data.len())
        .channel(channel)
        .data_str(&data)
        .finish()
}

pub fn signin_success(user_data: &str) -> String {
    let mut data = String::from("{\"user_data\":");
    push_json_str(&mut data, user_data);
    data.push('}');
    Frame::new("pusher:signin_success", data.len()).data_str(&data).finish()
}

/// Whether a watched user came online or went offline (`pusher_internal:watchlist_events`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Watch {
    Online,
    Offline,
}

impl Watch {
    pub fn as_str(self) -> &'static str {
        match self {
            Watch::Online => "online",
            Watch::Offline => "offline",
        }
    }
}

/// `pusher_internal:watchlist_events` with one event, as Pusher sends it (no channel; `data`
/// a string holding `{"events":[{"name":"online","user_ids":[...]}]}`), which pusher-js turns
/// into `pusher.user.watchlist` `online` / `offline` events.
pub fn watchlist_events<'a>(name: Watch, user_ids: impl Iterator<Item = &'a str>) -> String {
    let mut data = String::from("{\"events\":[{\"name\":\"");
    data.push_str(name.as_str());
    data.push_str("\",\"user_ids\":[");
    for (i, user) in user_ids.enumerate() {
        if i > 0 {
            data.push(',');
        }
        push_json_str(&mut data, user);
    }
    data.push_str("]}]}");
    Frame::new("pusher_internal:watchlist_events", data.len()).data_str(&data).finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn parse(s: &str) -> Value {
        serde_json::from_str(s).expect("valid JSON")
    }

    #[test]
    fn watchlist_events_are_pushers_wire_format() {
        let f = parse(&watchlist_events(Watch::Online, ["u1", "u\"2"].into_iter()));
        assert_eq!(f["event"], "pusher_internal:watchlist_events");
        assert!(f.get("channel").is_none());
        let data: Value = serde_json::from_str(f["data"].as_str().expect("data is a string")).unwrap();
        assert_eq!(data, serde_json::json!({"events": [{"name": "online", "user_ids": ["u1", "u\"2"]}]}));
        let f = parse(&watchlist_events(Watch::Offline, std::iter::empty()));
        let data: Value = serde_json::from_str(f["data"].as_str().unwrap()).unwrap();
        assert_eq!(data["events"][0]["name"], "offline");
    }

    #[test]
    fn frames_are_valid_json() {
        let f = parse(&event("a", "ev\"\n", "{\"x\":\"\u{1}\"}"));
        assert_eq!(f["event"], "ev\"\n");
        assert_eq!(f["data"], "{\"x\":\"\u{1}\"}");
        let ce = parse(&connection_established("1.2", 120));
        let data: Value = serde_json::from_str(ce["data"].as_str().unwrap()).unwrap();
        assert_eq!(data["socket_id"], "1.2");
        let e = parse(&error(&ProtocolError::AppNotFound));
        assert_eq!(e["data"]["code"], 4001);
        let p = presence_data([("1", "{\"n\":1}"), ("2", "null")].into_iter(), 2);
        let p = parse(&p);
        assert_eq!(p["presence"]["count"], 2);
        assert_eq!(p["presence"]["hash"]["1"]["n"], 1);
        let ce = parse(&client_event("presence-a", "client-x", "{\"a\":1}", Some("u\"1")));
        assert_eq!(ce["user_id"], "u\"1");
        assert_eq!(ce["data"]["a"], 1);
        let se = parse(&subscription_error("private-a", "AuthError", "bad", 401));
        assert_eq!(se["data"]["status"], 401);
    }
}
