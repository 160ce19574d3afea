//! The webhook queue on NATS JetStream: a work-queue stream `<PREFIX>_WEBHOOKS` on file
//! storage, one message per request on subject `<prefix>.webhooks.<app id in hex>`, read by
//! every node through one durable pull consumer (`sockudo`).
//!
//! JetStream does the bookkeeping the Redis queue does in scripts: an unacknowledged message
//! is delivered again after `ack_wait` (= `webhooks.claim_idle_ms`, kept from expiring by
//! progress acks while a node works on it), the stream refuses new messages beyond
//! `queue_size` in all and `max_queue_events_per_app` per app (JetStream counts messages, so
//! here both bound requests, each of at most 100 events), and `Nats-Msg-Id` (the request's
//! id) makes an append retried after a lost answer a no-op. Dead letters go to
//! `<PREFIX>_WEBHOOKS_DEAD`, a limits stream of at most `dead_letter_max` messages.

use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull, message::PublishMessage as Publish, stream, AckKind};
use async_nats::HeaderMap;
use bytes::Bytes;
use futures_util::StreamExt;

use super::durable::{Appended, Bounds, Broken, Entry, Receipt, Taken};

pub(crate) struct NatsQueue {
    js: jetstream::Context,
    /// The streams and the consumer, made again after a failure (a NATS that came back without
    /// its JetStream store has neither), at most once a second.
    handles: std::sync::Mutex<Handles>,
    configs: (stream::Config, stream::Config, pull::Config),
    last_repair: std::sync::Mutex<Option<std::time::Instant>>,
    /// `<prefix>.webhooks.` and `<prefix>.dead.`
    subject: String,
    dead_subject: String,
}

#[derive(Clone)]
struct Handles {
    queue: stream::Stream,
    dead: stream::Stream,
    consumer: jetstream::consumer::Consumer<pull::Config>,
}

/// Makes (or finds) the two streams and the consumer.
async fn handles(
    js: &jetstream::Context,
    c: &(stream::Config, stream::Config, pull::Config),
) -> Result<Handles, Broken> {
    let queue = js.get_or_create_stream(c.0.clone()).await.map_err(broken)?;
    let dead = js.get_or_create_stream(c.1.clone()).await.map_err(broken)?;
    let consumer = queue.get_or_create_consumer("sockudo", c.2.clone()).await.map_err(broken)?;
    Ok(Handles { queue, dead, consumer })
}

fn broken(e: impl std::fmt::Display) -> Broken {
    Broken(e.to_string())
}

/// The error and its causes in one line (JetStream's own reason is a cause).
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        next = cause.source();
    }
    text
}

/// `sockudo` → `SOCKUDO`; anything but letters and digits becomes `_` (stream names allow
/// neither dots nor spaces).
fn stream_name(prefix: &str, suffix: &str) -> String {
    let base: String =
        prefix.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_uppercase() } else { '_' }).collect();
    format!("{base}_{suffix}")
}

const HEADERS: [&str; 6] =
    ["Sockudo-Id", "Sockudo-App", "Sockudo-Target", "Sockudo-Fp", "Sockudo-Events", "Sockudo-Bytes"];

impl NatsQueue {
    pub async fn connect(
        client: async_nats::Client,
        prefix: &str,
        claim_idle: Duration,
        bounds: &Bounds,
        dead_letter_max: usize,
    ) -> Result<Self, Broken> {
        let js = jetstream::new(client);
        let subject = format!("{prefix}.webhooks.");
        let dead_subject = format!("{prefix}.dead.");
        let queue = stream::Config {
            name: stream_name(prefix, "WEBHOOKS"),
            subjects: vec![format!("{subject}*")],
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::File,
            max_messages: bounds.total_events as i64,
            max_messages_per_subject: bounds.app_events as i64,
            max_bytes: (bounds.total_events as i64).saturating_mul(64 * 1024),
            discard: stream::DiscardPolicy::New,
            discard_new_per_subject: true,
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        };
        let dead = stream::Config {
            name: stream_name(prefix, "WEBHOOKS_DEAD"),
            subjects: vec![format!("{dead_subject}*")],
            storage: stream::StorageType::File,
            max_messages: dead_letter_max as i64,
            discard: stream::DiscardPolicy::Old,
            ..Default::default()
        };
        let consumer = pull::Config {
            durable_name: Some("sockudo".into()),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ack_wait: claim_idle,
            max_deliver: -1,
            max_ack_pending: 100_000,
            ..Default::default()
        };
        let configs = (queue, dead, consumer);
        let made = handles(&js, &configs).await?;
        Ok(Self {
            js,
            handles: std::sync::Mutex::new(made),
            configs,
            last_repair: std::sync::Mutex::new(None),
            subject,
            dead_subject,
        })
    }

    fn current(&self) -> Handles {
        self.handles.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// After a failure: makes the streams and the consumer again if they are gone (at most
    /// once a second; a broker that is down just fails again).
    async fn repair(&self) {
        {
            let mut last = self.last_repair.lock().unwrap_or_else(|p| p.into_inner());
            if last.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
                return;
            }
            *last = Some(std::time::Instant::now());
        }
        if let Ok(made) = handles(&self.js, &self.configs).await {
            *self.handles.lock().unwrap_or_else(|p| p.into_inner()) = made;
        }
    }

    fn headers(entry: &Entry) -> HeaderMap {
        let mut h = HeaderMap::new();
        let values = [
            entry.id.to_string(),
            entry.app.clone(),
            entry.target.to_string(),
            entry.fingerprint.clone(),
            entry.events.to_string(),
            entry.bytes.to_string(),
        ];
        for (name, value) in HEADERS.iter().zip(values) {
            h.insert(*name, value.as_str());
        }
        if let Some(tp) = &entry.traceparent {
            h.insert("traceparent", &**tp);
        }
        if let Some(bg) = &entry.baggage {
            h.insert("baggage", &**bg);
        }
        h
    }

    fn parse(headers: Option<&HeaderMap>, body: &Bytes) -> Option<Entry> {
        let h = headers?;
        let get = |name: &str| h.get(name).map(|v| v.as_str().to_owned());
        Some(Entry {
            id: get("Sockudo-Id")?.into(),
            app: get("Sockudo-App")?,
            target: get("Sockudo-Target")?.parse().ok()?,
            fingerprint: get("Sockudo-Fp")?,
            events: get("Sockudo-Events")?.parse().ok()?,
            bytes: get("Sockudo-Bytes")?.parse().ok()?,
            traceparent: get("traceparent").map(Into::into),
            baggage: get("baggage").map(Into::into),
            body: body.clone(),
        })
    }

    /// The queue's subject for `app`'s requests.
    fn queue_subject(&self, app: &str) -> String {
        format!("{}{}", self.subject, hex::encode(app))
    }

    /// Publishes `entry` on `subject` with `dedup` as its `Nats-Msg-Id`.
    async fn publish(&self, subject: String, entry: &Entry, dedup: &str) -> Result<Appended, Broken> {
        let message = Publish::build().payload(entry.body.clone()).headers(Self::headers(entry)).message_id(dedup);
        let ack = async { self.js.send_publish(subject, message).await?.await };
        match ack.await {
            Ok(_) => Ok(Appended::Stored),
            Err(e) => {
                let text = chain(&e);
                // The stream's limits (discard new): the request is refused, not the broker down.
                if text.contains("maximum") {
                    Ok(Appended::Full)
                } else {
                    Err(Broken(text))
                }
            }
        }
    }

    pub async fn append(&self, entries: &[&Entry]) -> Result<Vec<Appended>, Broken> {
        let mut out = Vec::with_capacity(entries.len());
        for e in entries {
            match self.publish(self.queue_subject(&e.app), e, &e.id).await {
                Ok(a) => out.push(a),
                Err(err) => {
                    self.repair().await;
                    return Err(err);
                }
            }
        }
        Ok(out)
    }

    /// Up to `max` messages, new or due again; waits up to `wait` for the first.
    pub async fn take(&self, max: usize, wait: Duration) -> Result<Vec<Taken>, Broken> {
        let consumer = self.current().consumer;
        let mut batch = match consumer.fetch().max_messages(max).expires(wait).messages().await {
            Ok(b) => b,
            Err(e) => {
                self.repair().await;
                return Err(broken(e));
            }
        };
        let mut taken = Vec::new();
        while let Some(message) = batch.next().await {
            let message = message.map_err(broken)?;
            match Self::parse(message.headers.as_ref(), &message.payload) {
                Some(entry) => taken.push(Taken { entry, receipt: Receipt::Nats(Box::new(message)) }),
                None => {
                    tracing::warn!(subject = %message.subject, "malformed webhook queue message dropped");
                    let _ = message.ack_with(AckKind::Term).await;
                }
            }
        }
        Ok(taken)
    }

    pub async fn keep(message: &jetstream::Message) -> Result<(), Broken> {
        message.ack_with(AckKind::Progress).await.map_err(broken)
    }

    pub async fn release(message: &jetstream::Message, after: Duration) {
        let _ = message.ack_with(AckKind::Nak(Some(after))).await;
    }

    /// Acknowledges the message; with `dead`, first keeps a copy in the dead letters.
    pub async fn finish(&self, message: &jetstream::Message, entry: &Entry, dead: bool) -> Result<(), Broken> {
        if dead {
            let subject = format!("{}{}", self.dead_subject, hex::encode(&entry.app));
            if let Appended::Full = self.publish(subject, entry, &entry.id).await? {
                tracing::warn!(app_id = %entry.app, "dead-letter stream refused a request");
            }
        }
        message.double_ack().await.map_err(broken)
    }

    /// Each app's requests in the queue.
    pub async fn depth(&self) -> Result<Vec<(String, i64)>, Broken> {
        let mut subjects =
            self.current().queue.info_with_subjects(format!("{}*", self.subject)).await.map_err(broken)?;
        let mut out = Vec::new();
        while let Some(item) = subjects.next().await {
            let (subject, count) = item.map_err(broken)?;
            let app = subject.strip_prefix(&self.subject).and_then(|h| hex::decode(h).ok());
            if let Some(app) = app.and_then(|a| String::from_utf8(a).ok()) {
                out.push((app, count as i64));
            }
        }
        Ok(out)
    }

    /// Moves dead letters (of `app` only, when given) back into the queue until none is left
    /// or the queue is full; returns how many moved.
    pub async fn replay(&self, app: Option<&str>) -> Result<usize, Broken> {
        let filter = match app {
            Some(a) => format!("{}{}", self.dead_subject, hex::encode(a)),
            None => format!("{}*", self.dead_subject),
        };
        let dead = self.current().dead;
        let info = dead.get_info().await.map_err(broken)?;
        let mut moved = 0;
        if info.state.messages == 0 {
            return Ok(moved);
        }
        for seq in info.state.first_sequence..=info.state.last_sequence {
            let Ok(raw) = dead.get_raw_message(seq).await else { continue };
            if !subject_matches(&raw.subject, &filter) {
                continue;
            }
            let Some(entry) = Self::parse(Some(&raw.headers), &raw.payload) else { continue };
            // A replayed request gets a fresh dedup key (its id stays) so JetStream accepts it.
            let dedup = format!("{}-replay-{seq}", entry.id);
            if let Appended::Full = self.publish(self.queue_subject(&entry.app), &entry, &dedup).await? {
                return Ok(moved);
            }
            dead.delete_message(seq).await.map_err(broken)?;
            moved += 1;
        }
        Ok(moved)
    }
}

fn subject_matches(subject: &str, filter: &str) -> bool {
    match filter.strip_suffix('*') {
        Some(prefix) => subject.starts_with(prefix),
        None => subject == filter,
    }
}
