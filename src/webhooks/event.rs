//! What a webhook says: the closed set of event kinds an app can subscribe a URL to, and each
//! event in Pusher's JSON shape (`{"name": "channel_occupied", "channel": "x"}` and so on).

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};

/// The kinds of event a webhook can be filtered on (`event_types` in the app config).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    ChannelOccupied,
    ChannelVacated,
    MemberAdded,
    MemberRemoved,
    ClientEvent,
    CacheMiss,
    SubscriptionCount,
}

impl EventKind {
    pub const ALL: [EventKind; 7] = [
        EventKind::ChannelOccupied,
        EventKind::ChannelVacated,
        EventKind::MemberAdded,
        EventKind::MemberRemoved,
        EventKind::ClientEvent,
        EventKind::CacheMiss,
        EventKind::SubscriptionCount,
    ];

    /// The Pusher name, used both in `event_types` and as the event's `name`.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::ChannelOccupied => "channel_occupied",
            EventKind::ChannelVacated => "channel_vacated",
            EventKind::MemberAdded => "member_added",
            EventKind::MemberRemoved => "member_removed",
            EventKind::ClientEvent => "client_event",
            EventKind::CacheMiss => "cache_miss",
            EventKind::SubscriptionCount => "subscription_count",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == name)
    }

    /// This kind's bit in a filter mask.
    pub(crate) fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

/// One event, as the adapter reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WebhookEvent {
    ChannelOccupied {
        channel: String,
    },
    ChannelVacated {
        channel: String,
    },
    MemberAdded {
        channel: String,
        user_id: String,
    },
    MemberRemoved {
        channel: String,
        user_id: String,
    },
    /// `data` is the event's data as a string: a JSON string's contents, or the JSON text of
    /// any other value. `user_id` is set on presence channels only.
    ClientEvent {
        channel: String,
        event: String,
        data: String,
        socket_id: String,
        user_id: Option<String>,
    },
    CacheMiss {
        channel: String,
    },
    SubscriptionCount {
        channel: String,
        count: usize,
    },
}

/// The parts of a client-event frame (`protocol::server::client_event`) a webhook needs.
#[derive(Deserialize)]
struct ClientFrame<'a> {
    event: String,
    channel: String,
    #[serde(borrow)]
    data: &'a RawValue,
    #[serde(default)]
    user_id: Option<String>,
}

impl WebhookEvent {
    pub fn kind(&self) -> EventKind {
        match self {
            WebhookEvent::ChannelOccupied { .. } => EventKind::ChannelOccupied,
            WebhookEvent::ChannelVacated { .. } => EventKind::ChannelVacated,
            WebhookEvent::MemberAdded { .. } => EventKind::MemberAdded,
            WebhookEvent::MemberRemoved { .. } => EventKind::MemberRemoved,
            WebhookEvent::ClientEvent { .. } => EventKind::ClientEvent,
            WebhookEvent::CacheMiss { .. } => EventKind::CacheMiss,
            WebhookEvent::SubscriptionCount { .. } => EventKind::SubscriptionCount,
        }
    }

    /// A `client_event` from the frame the sender's socket produced (the adapter relays the
    /// frame, not its parts); `None` when the frame is not a client event.
    pub fn from_client_frame(frame: &str, socket_id: &str) -> Option<Self> {
        let f: ClientFrame<'_> = serde_json::from_str(frame).ok()?;
        let raw = f.data.get();
        let data = match serde_json::from_str::<Value>(raw) {
            Ok(Value::String(s)) => s,
            _ => raw.to_owned(),
        };
        Some(WebhookEvent::ClientEvent {
            channel: f.channel,
            event: f.event,
            data,
            socket_id: socket_id.to_owned(),
            user_id: f.user_id,
        })
    }

    /// The event's JSON in Pusher's shape.
    pub fn to_json(&self) -> String {
        let name = self.kind().as_str();
        let v = match self {
            WebhookEvent::ChannelOccupied { channel }
            | WebhookEvent::ChannelVacated { channel }
            | WebhookEvent::CacheMiss { channel } => json!({"name": name, "channel": channel}),
            WebhookEvent::MemberAdded { channel, user_id } | WebhookEvent::MemberRemoved { channel, user_id } => {
                json!({"name": name, "channel": channel, "user_id": user_id})
            }
            WebhookEvent::ClientEvent { channel, event, data, socket_id, user_id } => {
                let mut v = json!({
                    "name": name,
                    "channel": channel,
                    "event": event,
                    "data": data,
                    "socket_id": socket_id,
                });
                if let Some(u) = user_id {
                    v["user_id"] = Value::from(u.as_str());
                }
                v
            }
            WebhookEvent::SubscriptionCount { channel, count } => {
                json!({"name": name, "channel": channel, "subscription_count": count})
            }
        };
        v.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(e: &WebhookEvent) -> Value {
        serde_json::from_str(&e.to_json()).unwrap()
    }

    #[test]
    fn kinds_round_trip_and_have_distinct_bits() {
        let mut mask = 0u8;
        for k in EventKind::ALL {
            assert_eq!(EventKind::parse(k.as_str()), Some(k));
            assert_eq!(mask & k.bit(), 0);
            mask |= k.bit();
        }
        assert_eq!(EventKind::parse("channel_existence"), None);
    }

    #[test]
    fn events_have_pushers_shapes() {
        let c = || "presence-x".to_owned();
        assert_eq!(
            parsed(&WebhookEvent::ChannelOccupied { channel: c() }),
            json!({"name": "channel_occupied", "channel": "presence-x"})
        );
        assert_eq!(
            parsed(&WebhookEvent::MemberRemoved { channel: c(), user_id: "u".into() }),
            json!({"name": "member_removed", "channel": "presence-x", "user_id": "u"})
        );
        assert_eq!(
            parsed(&WebhookEvent::SubscriptionCount { channel: "x".into(), count: 3 }),
            json!({"name": "subscription_count", "channel": "x", "subscription_count": 3})
        );
    }

    #[test]
    fn client_events_come_from_the_relayed_frame() {
        let frame = crate::protocol::server::client_event("private-x", "client-y", r#"{"a":1}"#, None);
        let e = WebhookEvent::from_client_frame(&frame, "1.2").unwrap();
        assert_eq!(
            parsed(&e),
            json!({"name": "client_event", "channel": "private-x", "event": "client-y", "data": "{\"a\":1}", "socket_id": "1.2"})
        );
        let frame = crate::protocol::server::client_event("presence-x", "client-y", r#""text""#, Some("u"));
        let e = WebhookEvent::from_client_frame(&frame, "1.2").unwrap();
        assert_eq!(parsed(&e)["data"], "text");
        assert_eq!(parsed(&e)["user_id"], "u");
        assert!(WebhookEvent::from_client_frame("not json", "1.2").is_none());
    }
}
