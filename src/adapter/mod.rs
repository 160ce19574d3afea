//! The bus between API calls, sockets and channel state. Today it is the local adapter: this
//! node is the whole cluster. Every side effect of a subscription change (presence events,
//! subscription counts, gauges) and every broadcast goes through here, so a broker-backed
//! adapter only has to carry the same calls between nodes.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::ws::Utf8Bytes;

use crate::app::App;
use crate::channels::{AppChannels, Delivery, Frame, Registry, SocketHandle, SubscribeError, Subscribed};
use crate::outbox::CloseReason;
use crate::protocol::rest::PublishEvent;
use crate::protocol::{server, ChannelKind, ChannelName, PresenceMember, ProtocolError};
use crate::telemetry::Metrics;

/// Node-local hub of channel state and fan-out.
pub struct Adapter {
    registry: Registry,
    metrics: Arc<Metrics>,
    debounce: Duration,
    /// Channels with a subscription-count event already scheduled: `(app id, channel)`.
    pending_counts: Mutex<HashSet<(String, Arc<str>)>>,
}

impl Adapter {
    pub fn new(metrics: Arc<Metrics>, cache_ttl: Duration, debounce: Duration) -> Self {
        metrics.adapter_state("local", true, 1);
        Self { registry: Registry::new(cache_ttl), metrics, debounce, pending_counts: Mutex::default() }
    }

    pub fn channels(&self, app: &App) -> Arc<AppChannels> {
        self.registry.app(&app.id)
    }

    /// Sends one pre-serialised frame to every local subscriber of `channel` except `except`.
    /// With `started`, the broadcast's latency is recorded when the last recipient's write
    /// completes. Returns the number of sockets it was queued for.
    pub fn broadcast(
        &self,
        app: &Arc<App>,
        channel: &ChannelName,
        text: Utf8Bytes,
        except: Option<&str>,
        started: Option<Instant>,
    ) -> usize {
        let Some(subscribers) = self.registry.app(&app.id).snapshot(channel.as_str()) else { return 0 };
        let recipients =
            subscribers.len() - usize::from(except.is_some_and(|e| subscribers.iter().any(|s| &*s.id == e)));
        if recipients == 0 {
            return 0;
        }
        let delivery =
            started.map(|t| Delivery::new(t, recipients, channel.channel_type(), app.clone(), self.metrics.clone()));
        let frame = Frame { text, delivery };
        for s in subscribers.iter() {
            if except.is_some_and(|e| *s.id == *e) {
                continue;
            }
            // A refused push (slow consumer) closes that socket; the others are unaffected.
            s.send(frame.clone());
        }
        recipients
    }

    /// Publishes an API event to each of its channels: one serialisation per channel, the
    /// same bytes for every recipient.
    pub fn publish(&self, app: &Arc<App>, event: &PublishEvent, started: Instant) {
        for channel in &event.channels {
            let span = tracing::info_span!(
                "broadcast",
                sockudo.app_id = %app.id,
                sockudo.channel = channel.as_str(),
                sockudo.channel_type = channel.channel_type().as_str(),
                sockudo.event = %event.name,
                sockudo.recipients = tracing::field::Empty,
            );
            let _entered = span.enter();
            let text = Utf8Bytes::from(server::event(channel.as_str(), &event.name, &event.data));
            if channel.is_cache() {
                self.registry.app(&app.id).set_cache(channel.as_str(), text.clone());
            }
            let recipients = self.broadcast(app, channel, text, event.socket_id.as_deref(), Some(started));
            span.record("sockudo.recipients", recipients);
            tracing::debug!(recipients, "broadcast queued for local sockets");
        }
    }

    /// Subscribes a socket and carries out what follows: gauges, `member_added` to the others,
    /// and a debounced subscription count.
    pub fn subscribe(
        self: &Arc<Self>,
        app: &Arc<App>,
        channel: &ChannelName,
        handle: &Arc<SocketHandle>,
        member: Option<PresenceMember>,
    ) -> Result<Subscribed, SubscribeError> {
        let chans = self.registry.app(&app.id);
        let (user_id, user_info) = match &member {
            Some(m) => (Some(m.user_id.clone()), Some(m.user_info.get().to_owned())),
            None => (None, None),
        };
        let outcome = chans.subscribe(channel, handle, member, app.settings.max_presence_members_per_channel)?;
        if outcome.already {
            return Ok(outcome);
        }
        self.metrics.subscribed(&app.attrs, channel.channel_type());
        if outcome.occupied {
            self.metrics.channel_occupied(&app.attrs, channel.channel_type());
        }
        if outcome.member_added {
            if let (Some(id), Some(info)) = (user_id, user_info) {
                let frame = server::member_added(channel.as_str(), &id, &info);
                self.broadcast(app, channel, Utf8Bytes::from(frame), Some(&handle.id), None);
            }
        }
        self.count_changed(app, channel);
        Ok(outcome)
    }

    /// Unsubscribes a socket (explicitly or by disconnect); false when it was not subscribed.
    pub fn unsubscribe(self: &Arc<Self>, app: &Arc<App>, channel: &ChannelName, socket_id: &str) -> bool {
        let chans = self.registry.app(&app.id);
        let Some(out) = chans.unsubscribe(channel.as_str(), socket_id) else { return false };
        self.metrics.unsubscribed(&app.attrs, out.channel_type, 1);
        if out.vacated {
            self.metrics.channel_vacated(&app.attrs, out.channel_type);
        }
        if let Some(user_id) = out.member_removed {
            let frame = server::member_removed(channel.as_str(), &user_id);
            self.broadcast(app, channel, Utf8Bytes::from(frame), None, None);
        }
        if !out.vacated {
            self.count_changed(app, channel);
        }
        true
    }

    /// Schedules one `pusher_internal:subscription_count` for the channel after the debounce
    /// delay, when the app has the feature on (Pusher sends none for presence channels).
    fn count_changed(self: &Arc<Self>, app: &Arc<App>, channel: &ChannelName) {
        if !app.settings.enable_subscription_count || channel.kind() == ChannelKind::Presence {
            return;
        }
        let key = (app.id.clone(), Arc::<str>::from(channel.as_str()));
        {
            let mut pending = self.pending_counts.lock().unwrap_or_else(|p| p.into_inner());
            if !pending.insert(key.clone()) {
                return;
            }
        }
        let this = self.clone();
        let app = app.clone();
        let channel = channel.clone();
        let debounce = self.debounce;
        tokio::spawn(async move {
            tokio::time::sleep(debounce).await;
            this.pending_counts.lock().unwrap_or_else(|p| p.into_inner()).remove(&key);
            let count = this.registry.app(&app.id).info(&channel).subscription_count;
            if count > 0 {
                let frame = server::subscription_count(channel.as_str(), count);
                this.broadcast(&app, &channel, Utf8Bytes::from(frame), None, None);
            }
        });
    }

    /// Closes every socket signed in as `user_id`; returns how many.
    pub fn terminate_user(&self, app: &App, user_id: &str) -> usize {
        let sockets = self.registry.app(&app.id).user_sockets(user_id);
        for s in &sockets {
            let err = ProtocolError::Terminated;
            s.outbox.close_with(Frame::from(server::error(&err)), CloseReason::Code(err.code(), err.to_string()));
        }
        sockets.len()
    }

    /// Drops expired cached events of every app (run periodically).
    pub fn sweep_caches(&self) {
        for app in self.registry.all() {
            app.sweep_cache();
        }
    }
}
