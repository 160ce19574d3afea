//! Bodies of the Pusher HTTP API: `POST /events` and `POST /batch_events`, parsed and checked
//! against the app's limits into events ready to broadcast.

use serde::Deserialize;
use serde_json::value::RawValue;

use super::channel::ChannelName;

/// Limits that an API publish is checked against (from the app's settings).
#[derive(Debug, Clone, Copy)]
pub struct PublishLimits {
    pub max_channel_name_len: usize,
    pub max_event_name_len: usize,
    pub max_payload_bytes: usize,
    pub max_channels: usize,
    pub max_batch: usize,
}

/// Why a publish body was refused (HTTP 400, or 413 for [`BodyError::PayloadTooLarge`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    #[error("body is not valid JSON: {0}")]
    Json(String),
    #[error("missing field: {0}")]
    Missing(&'static str),
    #[error("`data` must be a string or an object")]
    DataType,
    #[error("event name is empty or longer than {0} characters")]
    EventName(usize),
    #[error("event data is larger than {0} bytes")]
    PayloadTooLarge(usize),
    #[error("too many channels: at most {0}")]
    TooManyChannels(usize),
    #[error("batch is empty or has more than {0} events")]
    BatchSize(usize),
    #[error("invalid channel name {name:?}: {why}")]
    Channel { name: String, why: String },
    #[error("socket_id must look like 123.456")]
    SocketId,
    #[error("events to a user channel cannot be sent to other channels at the same time")]
    MixedUserChannel,
}

#[derive(Deserialize)]
struct RawEvent<'a> {
    #[serde(default)]
    name: Option<String>,
    #[serde(default, borrow)]
    data: Option<&'a RawValue>,
    #[serde(default)]
    channel: Option<String>,
    #[serde(default)]
    channels: Option<Vec<String>>,
    #[serde(default)]
    socket_id: Option<String>,
    #[serde(default)]
    info: Option<String>,
}

#[derive(Deserialize)]
struct RawBatch<'a> {
    #[serde(borrow)]
    batch: Vec<&'a RawValue>,
}

/// A validated publish.
#[derive(Debug, Clone)]
pub struct PublishEvent {
    pub name: String,
    /// The data string as subscribers receive it.
    pub data: String,
    pub channels: Vec<ChannelName>,
    pub socket_id: Option<String>,
    /// Requested channel attributes (`user_count`, `subscription_count`).
    pub info: Vec<String>,
}

/// Whether `s` is a Pusher socket id (`digits.digits`).
pub fn valid_socket_id(s: &str) -> bool {
    match s.split_once('.') {
        Some((a, b)) => {
            !a.is_empty()
                && !b.is_empty()
                && a.len() <= 20
                && b.len() <= 20
                && a.bytes().all(|c| c.is_ascii_digit())
                && b.bytes().all(|c| c.is_ascii_digit())
        }
        None => false,
    }
}

fn check(raw: RawEvent<'_>, limits: &PublishLimits) -> Result<PublishEvent, BodyError> {
    let name = raw.name.ok_or(BodyError::Missing("name"))?;
    if name.is_empty() || name.len() > limits.max_event_name_len {
        return Err(BodyError::EventName(limits.max_event_name_len));
    }
    let data = raw.data.ok_or(BodyError::Missing("data"))?;
    let text = data.get();
    let data = if text.starts_with('"') {
        serde_json::from_str::<String>(text).map_err(|e| BodyError::Json(e.to_string()))?
    } else if text.starts_with('{') || text.starts_with('[') {
        // Some publishers send an object; subscribers get it as the JSON string Pusher would.
        text.to_owned()
    } else {
        return Err(BodyError::DataType);
    };
    if data.len() > limits.max_payload_bytes {
        return Err(BodyError::PayloadTooLarge(limits.max_payload_bytes));
    }
    let names: Vec<String> = match (raw.channels, raw.channel) {
        (Some(list), _) if !list.is_empty() => list,
        (_, Some(one)) => vec![one],
        _ => return Err(BodyError::Missing("channel or channels")),
    };
    if names.len() > limits.max_channels {
        return Err(BodyError::TooManyChannels(limits.max_channels));
    }
    let mut channels = Vec::with_capacity(names.len());
    for n in names {
        let c = ChannelName::parse(&n, limits.max_channel_name_len)
            .map_err(|e| BodyError::Channel { name: truncate(&n), why: e.to_string() })?;
        if !channels.contains(&c) {
            channels.push(c);
        }
    }
    if channels.len() > 1 && channels.iter().any(|c| c.user_id().is_some()) {
        return Err(BodyError::MixedUserChannel);
    }
    let socket_id = match raw.socket_id {
        Some(s) if valid_socket_id(&s) => Some(s),
        Some(_) => return Err(BodyError::SocketId),
        None => None,
    };
    let info = raw
        .info
        .map(|i| i.split(',').map(|s| s.trim().to_owned()).filter(|s| !s.is_empty()).collect())
        .unwrap_or_default();
    Ok(PublishEvent { name, data, channels, socket_id, info })
}

fn truncate(s: &str) -> String {
    s.chars().take(64).collect()
}

/// Bodies are objects; serde would also read a struct from an array by position.
fn object(body: &[u8]) -> Result<(), BodyError> {
    match body.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'{') => Ok(()),
        _ => Err(BodyError::Json("the body must be a JSON object".into())),
    }
}

/// Parses a `POST /events` body.
pub fn parse_event(body: &[u8], limits: &PublishLimits) -> Result<PublishEvent, BodyError> {
    object(body)?;
    let raw: RawEvent<'_> = serde_json::from_slice(body).map_err(|e| BodyError::Json(e.to_string()))?;
    check(raw, limits)
}

/// Parses a `POST /batch_events` body; each event names exactly one channel.
pub fn parse_batch(body: &[u8], limits: &PublishLimits) -> Result<Vec<PublishEvent>, BodyError> {
    object(body)?;
    let raw: RawBatch<'_> = serde_json::from_slice(body).map_err(|e| BodyError::Json(e.to_string()))?;
    if raw.batch.is_empty() || raw.batch.len() > limits.max_batch {
        return Err(BodyError::BatchSize(limits.max_batch));
    }
    let one = PublishLimits { max_channels: 1, ..*limits };
    raw.batch
        .into_iter()
        .map(|e| {
            object(e.get().as_bytes())?;
            let event: RawEvent<'_> = serde_json::from_str(e.get()).map_err(|err| BodyError::Json(err.to_string()))?;
            check(event, &one)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const L: PublishLimits = PublishLimits {
        max_channel_name_len: 200,
        max_event_name_len: 200,
        max_payload_bytes: 100,
        max_channels: 3,
        max_batch: 2,
    };

    #[test]
    fn events() {
        let e =
            parse_event(br#"{"name":"a","data":"{\"x\":1}","channels":["c1","c2"],"socket_id":"1.2"}"#, &L).unwrap();
        assert_eq!(e.data, "{\"x\":1}");
        assert_eq!(e.channels.len(), 2);
        let e = parse_event(br#"{"name":"a","data":{"x":1},"channel":"c"}"#, &L).unwrap();
        assert_eq!(e.data, "{\"x\":1}");
        assert_eq!(parse_event(br#"{"name":"a","data":1,"channel":"c"}"#, &L).unwrap_err(), BodyError::DataType);
        assert!(matches!(
            parse_event(br#"{"name":"a","data":"x","channel":"a b"}"#, &L),
            Err(BodyError::Channel { .. })
        ));
        assert_eq!(
            parse_event(br#"{"name":"a","data":"x","channels":["a","b","c","d"]}"#, &L).unwrap_err(),
            BodyError::TooManyChannels(3)
        );
        let big = format!(r#"{{"name":"a","data":"{}","channel":"c"}}"#, "x".repeat(101));
        assert_eq!(parse_event(big.as_bytes(), &L).unwrap_err(), BodyError::PayloadTooLarge(100));
        assert_eq!(
            parse_event(br#"{"name":"a","data":"x","channel":"c","socket_id":"x"}"#, &L).unwrap_err(),
            BodyError::SocketId
        );
    }

    #[test]
    fn batches() {
        let b = parse_batch(
            br#"{"batch":[{"name":"a","data":"1","channel":"c"},{"name":"b","data":"2","channel":"d"}]}"#,
            &L,
        )
        .unwrap();
        assert_eq!(b.len(), 2);
        assert_eq!(parse_batch(br#"{"batch":[]}"#, &L).unwrap_err(), BodyError::BatchSize(2));
    }
}
