//! The bus between API calls, sockets and channel state. With the local driver this node is
//! the whole cluster; with Redis or NATS every broadcast, presence change, termination and
//! channel query also goes to the other nodes through [`cluster`], whose semantics are written
//! once for both brokers ([`transport`] only moves envelopes). Every side effect of a
//! subscription change (presence events, subscription counts, gauges, webhooks) happens here.
//!
//! Webhooks are reported once per cluster where Pusher's semantics need it: `member_added` and
//! `member_removed` by the node where the change happened (never on receipt of another node's
//! envelope), `channel_occupied`/`channel_vacated` by the node whose local change left the
//! channel with subscribers on it alone or on no node at all (see [`Adapter::occupancy_changed`]).

pub mod cluster;
pub mod lanes;
pub mod transport;
mod watchlist;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::ws::Utf8Bytes;
use bytes::Bytes;
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};

use crate::app::{App, AppManager};
use crate::channels::{
    AppChannels, CacheBounds, ChannelInfo, Delivery, Frame, Registry, SocketHandle, SubscribeError, Subscribed,
};
use crate::config::{AdapterDriver, Config, ConfigError};
use crate::outbox::CloseReason;
use crate::protocol::rest::PublishEvent;
use crate::protocol::{server, ChannelKind, ChannelName, PresenceMember, ProtocolError};
use crate::shutdown::Shutdown;
use crate::telemetry::metrics::AdapterDrops;
use crate::telemetry::Metrics;
use crate::webhooks::{EventKind, WebhookEvent, Webhooks};
use cluster::{Cluster, Header, PresenceEvent, Query};
use tracing::Instrument;

/// How often a node announces itself.
const HEARTBEAT: Duration = Duration::from_secs(1);

/// Channels with a debounced subscription count waiting, at most (each costs a task and, in a
/// cluster, a query to every node).
const MAX_PENDING_COUNTS: usize = 10_000;

/// Node-local hub of channel state and fan-out, and this node's side of the cluster.
pub struct Adapter {
    registry: Registry,
    metrics: Arc<Metrics>,
    apps: Arc<AppManager>,
    debounce: Duration,
    /// Channels with a subscription-count event already scheduled: `(app id, channel)`.
    pending_counts: Mutex<HashSet<(String, Arc<str>)>>,
    cluster: Option<Arc<Cluster>>,
    gauges: crate::telemetry::metrics::AdapterAttrs,
    connected: watch::Receiver<bool>,
    webhooks: Option<Arc<Webhooks>>,
    /// The other live nodes' ids, kept beside `Cluster`'s liveness (added when a node is first
    /// heard, removed when it leaves or expires) to pick the one node that reports a dead
    /// node's presence members to webhooks.
    peer_ids: Mutex<BTreeSet<Arc<str>>>,
    /// Set when this node has said goodbye to the cluster: it can no longer ask the others.
    leaving: AtomicBool,
    /// Signed-in users waiting out their offline grace (watchlist events).
    leaving_users: watchlist::Leaving,
}

/// The receiving half of a broker link, handed to [`Adapter::run`].
pub struct Inbox {
    incoming: mpsc::Receiver<Bytes>,
    _link: transport::Link,
}

fn unix_micros() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

impl Adapter {
    /// Builds the adapter of `config.adapter.driver`, connecting to its broker. A broker that
    /// cannot be reached is a configuration error (exit 64), never a fallback to local.
    pub async fn connect(
        config: &Config,
        node_id: &str,
        metrics: Arc<Metrics>,
        apps: Arc<AppManager>,
    ) -> Result<(Self, Option<Inbox>), ConfigError> {
        let c = &config.adapter;
        let link = match c.driver {
            AdapterDriver::Local => None,
            AdapterDriver::Redis => {
                Some(transport::redis(&c.redis).await.map_err(|e| ConfigError::new(e.key, e.message))?)
            }
            AdapterDriver::Nats => {
                Some(transport::nats(&c.nats).await.map_err(|e| ConfigError::new(e.key, e.message))?)
            }
        };
        let signer = match (&link, &c.cluster_secret) {
            (Some(_), Some(secret)) => Some(
                cluster::Signer::new(secret.as_bytes(), c.prefix())
                    .map_err(|e| ConfigError::new("adapter.cluster_secret", e.to_string()))?,
            ),
            (Some(_), None) => {
                tracing::warn!(
                    adapter = c.driver.as_str(),
                    "cluster envelopes are not signed: anyone who can reach the broker can read and inject \
                     broadcasts, terminations and presence; set adapter.cluster_secret on every node"
                );
                None
            }
            (None, _) => None,
        };
        let attrs = metrics.adapter_attrs(c.driver.as_str());
        let (cluster, connected, inbox) = match link {
            Some(mut link) => {
                let cluster = Arc::new(Cluster::new(
                    node_id,
                    link.outgoing.clone(),
                    Duration::from_millis(c.request_timeout_ms),
                    Duration::from_millis(c.node_timeout_ms),
                    signer,
                ));
                // Read at collection time: the counters stay plain atomics on the envelope path.
                let (counted, link_drops) = (cluster.clone(), link.drops.clone());
                metrics.adapter_dropped(&attrs, move || {
                    let d = counted.drops();
                    AdapterDrops {
                        in_queue_full: link_drops.incoming.load(Ordering::Relaxed),
                        out_queue_full: d.out_queue_full,
                        in_decode: d.in_decode,
                        in_unauthenticated: d.in_unauthenticated,
                    }
                });
                let connected = link.connected.clone();
                let (_, empty) = mpsc::channel(1);
                let incoming = std::mem::replace(&mut link.incoming, empty);
                (Some(cluster), connected, Some(Inbox { incoming, _link: link }))
            }
            None => {
                // A single node drops no envelopes; its series exist at 0 like every counter's.
                metrics.adapter_dropped(&attrs, AdapterDrops::default);
                (None, watch::channel(true).1, None)
            }
        };
        let adapter = Self {
            registry: Registry::new(CacheBounds {
                ttl: Duration::from_secs(config.cache.ttl_seconds),
                max_app_bytes: config.cache.max_bytes_per_app(),
                max_node_bytes: config.cache.max_bytes(),
            }),
            gauges: attrs,
            metrics,
            apps,
            debounce: Duration::from_millis(config.subscription_count_debounce_ms),
            pending_counts: Mutex::default(),
            cluster,
            connected,
            webhooks: None,
            peer_ids: Mutex::default(),
            leaving: AtomicBool::new(false),
            leaving_users: watchlist::Leaving::new(Duration::from_millis(config.watchlist_offline_grace_ms)),
        };
        adapter.record_state();
        Ok((adapter, inbox))
    }

    /// Whether the webhook queue can reach its broker (always, in memory or without webhooks).
    pub fn webhook_queue_available(&self) -> bool {
        self.webhooks.as_ref().is_none_or(|w| w.queue_available())
    }

    /// Reports channel, presence, client and cache events to `webhooks` from now on.
    pub fn with_webhooks(mut self, webhooks: Option<Arc<Webhooks>>) -> Self {
        self.webhooks = webhooks;
        self
    }

    /// The webhook queue, when some webhook of `app` wants `kind`.
    fn hooks(&self, app: &Arc<App>, kind: EventKind) -> Option<&Arc<Webhooks>> {
        self.webhooks.as_ref().filter(|w| w.wants(app, kind))
    }

    pub fn channels(&self, app: &App) -> Arc<AppChannels> {
        self.registry.app(app)
    }

    /// Whether this node can reach the rest of the cluster (always, for the local driver).
    pub fn is_connected(&self) -> bool {
        *self.connected.borrow()
    }

    fn record_state(&self) {
        let peers = self.cluster.as_ref().map_or(0, |c| c.peers());
        self.metrics.adapter_state(&self.gauges, self.is_connected(), 1 + peers as i64);
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
        let Some(subscribers) = self.registry.app(app).snapshot(channel.as_str()) else { return 0 };
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

    /// Broadcasts locally and, in a cluster, once to the broker for every other node (client
    /// events, subscription counts): the socket `except` is skipped on every node. A client
    /// event (sent by `except`) is also reported to webhooks, by this node only.
    pub fn relay(&self, app: &Arc<App>, channel: &ChannelName, text: Utf8Bytes, except: Option<&str>, event: &str) {
        if let (Some(webhooks), Some(socket_id), true) =
            (self.hooks(app, EventKind::ClientEvent), except, event.starts_with("client-"))
        {
            if let Some(e) = WebhookEvent::from_client_frame(text.as_str(), socket_id) {
                webhooks.emit(app, e);
            }
        }
        self.broadcast_everywhere(app, channel, text, except, event);
    }

    fn broadcast_everywhere(
        &self,
        app: &Arc<App>,
        channel: &ChannelName,
        text: Utf8Bytes,
        except: Option<&str>,
        event: &str,
    ) {
        if let Some(cluster) = &self.cluster {
            let header = Header::Broadcast {
                n: cluster.me(),
                a: app.id.clone(),
                c: channel.as_str().to_owned(),
                x: except.map(str::to_owned),
                o: 0,
                tp: crate::telemetry::trace::current_traceparent(),
                bg: crate::telemetry::trace::current_baggage(),
                cache: false,
                e: event.to_owned(),
            };
            cluster.send_for(app, &header, text.as_bytes());
        }
        self.broadcast(app, channel, text, except, None);
    }

    /// Publishes an API event to each of its channels: one serialisation per channel, the
    /// same bytes for every local recipient and one envelope for the rest of the cluster.
    pub fn publish(&self, app: &Arc<App>, event: &PublishEvent, started: Instant) {
        let origin = unix_micros().saturating_sub(started.elapsed().as_micros() as u64);
        for channel in &event.channels {
            let span = tracing::info_span!(
                "broadcast",
                sockudo.app_id = %app.id,
                sockudo.channel = channel.as_str(),
                sockudo.channel_type = channel.channel_type().as_str(),
                sockudo.event = %event.name,
                sockudo.recipients = tracing::field::Empty,
                messaging.system = "pusher",
                messaging.operation.type = "send",
                messaging.destination.name = channel.as_str(),
                messaging.batch.message_count = tracing::field::Empty,
                sockudo.last_write_ms = tracing::field::Empty,
            );
            let _entered = span.enter();
            let text = Utf8Bytes::from(server::event(channel.as_str(), &event.name, &event.data));
            if channel.is_cache() {
                self.registry.app(app).set_cache(channel.as_str(), text.clone());
            }
            if let Some(cluster) = &self.cluster {
                let header = Header::Broadcast {
                    n: cluster.me(),
                    a: app.id.clone(),
                    c: channel.as_str().to_owned(),
                    x: event.socket_id.clone(),
                    o: origin,
                    tp: crate::telemetry::trace::current_traceparent(),
                    bg: crate::telemetry::trace::current_baggage(),
                    cache: channel.is_cache(),
                    e: event.name.clone(),
                };
                cluster.send_for(app, &header, text.as_bytes());
            }
            let recipients = self.broadcast(app, channel, text, event.socket_id.as_deref(), Some(started));
            span.record("sockudo.recipients", recipients);
            span.record("messaging.batch.message_count", recipients);
            tracing::debug!(recipients, "broadcast queued for local sockets");
        }
    }

    /// Subscribes a socket and carries out what follows: gauges, `member_added` to the others
    /// (once per user cluster-wide), and a debounced subscription count.
    pub fn subscribe(
        self: &Arc<Self>,
        app: &Arc<App>,
        channel: &ChannelName,
        handle: &Arc<SocketHandle>,
        member: Option<PresenceMember>,
    ) -> Result<Subscribed, SubscribeError> {
        let chans = self.registry.app(app);
        let joining = member.as_ref().map(|m| (m.user_id.clone(), m.user_info.get().to_owned()));
        let max_members = app.settings.max_presence_members_per_channel;
        // The member limit holds for the cluster, on the replicated member state (a join on
        // two nodes within one propagation delay can still pass both: the state is eventually
        // consistent, not a lock).
        if let (Some(cluster), Some((user, _))) = (&self.cluster, &joining) {
            if !cluster.has_room(&app.id, channel.as_str(), user, max_members) {
                return Err(SubscribeError::PresenceFull(max_members));
            }
        }
        let mut outcome = chans.subscribe(channel, handle, member, max_members)?;
        if let (Some(cluster), true) = (&self.cluster, channel.kind() == ChannelKind::Presence) {
            if let (Some((user, info)), true) = (&joining, outcome.member_added) {
                outcome.member_added = cluster.join(&cluster.node, &app.id, channel.as_str(), user, info);
                let header = Header::PresenceJoin {
                    n: cluster.me(),
                    a: app.id.clone(),
                    c: channel.as_str().to_owned(),
                    u: user.clone(),
                    i: info.clone(),
                };
                cluster.send_for(app, &header, b"");
            }
            let members = cluster.members(&app.id, channel.as_str());
            outcome.succeeded_data =
                server::presence_data(members.iter().map(|(u, i)| (u.as_str(), i.as_str())), members.len());
        }
        if outcome.already {
            return Ok(outcome);
        }
        self.metrics.subscribed(&app.attrs, channel.channel_type());
        if outcome.occupied {
            self.metrics.channel_occupied(&app.attrs, channel.channel_type());
            self.occupancy_changed(app, channel, true);
        }
        if let (true, Some((user, info))) = (outcome.member_added, &joining) {
            let frame = server::member_added(channel.as_str(), user, info);
            self.broadcast(app, channel, Utf8Bytes::from(frame), Some(&handle.id), None);
            if let Some(webhooks) = self.hooks(app, EventKind::MemberAdded) {
                let (channel, user_id) = (channel.as_str().to_owned(), user.clone());
                webhooks.emit(app, WebhookEvent::MemberAdded { channel, user_id });
            }
        }
        // The same test the session makes right after this to send `pusher:cache_miss`.
        if let (true, Some(webhooks)) = (channel.is_cache(), self.hooks(app, EventKind::CacheMiss)) {
            if chans.cached(channel.as_str()).is_none() {
                webhooks.emit(app, WebhookEvent::CacheMiss { channel: channel.as_str().to_owned() });
            }
        }
        self.count_changed(app, channel);
        Ok(outcome)
    }

    /// Unsubscribes a socket (explicitly or by disconnect); false when it was not subscribed.
    pub fn unsubscribe(self: &Arc<Self>, app: &Arc<App>, channel: &ChannelName, socket_id: &str) -> bool {
        let chans = self.registry.app(app);
        let Some(out) = chans.unsubscribe(channel.as_str(), socket_id) else { return false };
        self.metrics.unsubscribed(&app.attrs, out.channel_type, 1);
        if out.vacated {
            self.metrics.channel_vacated(&app.attrs, out.channel_type);
            self.occupancy_changed(app, channel, false);
        }
        if let Some(user_id) = out.member_removed {
            let gone = match &self.cluster {
                Some(cluster) => {
                    cluster.send_for(
                        app,
                        &Header::PresenceLeave {
                            n: cluster.me(),
                            a: app.id.clone(),
                            c: channel.as_str().to_owned(),
                            u: user_id.to_string(),
                        },
                        b"",
                    );
                    cluster.part(&cluster.node, &app.id, channel.as_str(), &user_id)
                }
                None => true,
            };
            if gone {
                let frame = server::member_removed(channel.as_str(), &user_id);
                self.broadcast(app, channel, Utf8Bytes::from(frame), None, None);
                if let Some(webhooks) = self.hooks(app, EventKind::MemberRemoved) {
                    let user_id = user_id.to_string();
                    webhooks.emit(app, WebhookEvent::MemberRemoved { channel: channel.as_str().to_owned(), user_id });
                }
            }
        }
        self.count_changed(app, channel);
        true
    }

    /// Reports `channel_occupied` / `channel_vacated` after the channel's first local
    /// subscriber came or its last one went. Alone, this node is the cluster. In a cluster it
    /// asks the others and reports only when none of them has a subscriber, so a channel
    /// joined on several nodes is reported once, by the node that occupied it first.
    ///
    /// The race, accepted: two nodes whose first local subscribers arrive within one query
    /// round trip each see the other's and neither reports `channel_occupied`; two nodes
    /// whose last subscribers leave that close together may both report `channel_vacated`.
    /// A node that does not answer in time counts as having none (a duplicate rather than a
    /// lost event), and a node that is shutting down reports nothing (its bus is closed; its
    /// clients reconnect to the others). The two checks of one channel run concurrently, so a
    /// subscribe and unsubscribe in quick succession may, rarely, be reported out of order.
    fn occupancy_changed(self: &Arc<Self>, app: &Arc<App>, channel: &ChannelName, occupied: bool) {
        let kind = if occupied { EventKind::ChannelOccupied } else { EventKind::ChannelVacated };
        let Some(webhooks) = self.hooks(app, kind) else { return };
        let name = channel.as_str().to_owned();
        let event = if occupied {
            WebhookEvent::ChannelOccupied { channel: name }
        } else {
            WebhookEvent::ChannelVacated { channel: name }
        };
        match &self.cluster {
            Some(cluster) if cluster.peers() > 0 => {
                if self.leaving.load(Ordering::Acquire) {
                    return;
                }
                let (this, app, channel, webhooks) = (self.clone(), app.clone(), channel.clone(), webhooks.clone());
                let check = async move {
                    let elsewhere: u64 = this
                        .ask(&app, Query::Channel { name: channel.as_str().to_owned() })
                        .await
                        .iter()
                        .map(|a| a.as_u64().unwrap_or(0))
                        .sum();
                    if elsewhere == 0 && !this.leaving.load(Ordering::Acquire) {
                        webhooks.emit(&app, event);
                    }
                };
                // In the span of the change, so the webhook continues its trace.
                tokio::spawn(check.instrument(tracing::Span::current()));
            }
            _ => webhooks.emit(app, event),
        }
    }

    /// Schedules one `pusher_internal:subscription_count` for the channel after the debounce
    /// delay, when the app has the feature on (Pusher sends none for presence channels), and
    /// the `subscription_count` webhook when the app has one. The count is cluster-wide and
    /// the event reaches subscribers on every node.
    fn count_changed(self: &Arc<Self>, app: &Arc<App>, channel: &ChannelName) {
        let to_sockets = app.settings.enable_subscription_count;
        if !(to_sockets || self.hooks(app, EventKind::SubscriptionCount).is_some())
            || channel.kind() == ChannelKind::Presence
        {
            return;
        }
        let key = (app.id.clone(), Arc::<str>::from(channel.as_str()));
        {
            let mut pending = self.pending_counts.lock().unwrap_or_else(|p| p.into_inner());
            // One query per channel per debounce window (coalesced here), and a bounded number of
            // channels waiting: under churn past it, counts are skipped rather than queued.
            if pending.len() >= MAX_PENDING_COUNTS || !pending.insert(key.clone()) {
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
            let count = this.channel_info(&app, &channel).await.subscription_count;
            // A count of 0 is not reported: `channel_vacated` says it.
            if count > 0 {
                if to_sockets {
                    let frame = server::subscription_count(channel.as_str(), count);
                    let text = Utf8Bytes::from(frame);
                    this.broadcast_everywhere(&app, &channel, text, None, "pusher_internal:subscription_count");
                }
                if let Some(webhooks) = this.hooks(&app, EventKind::SubscriptionCount) {
                    let channel = channel.as_str().to_owned();
                    webhooks.emit(&app, WebhookEvent::SubscriptionCount { channel, count });
                }
            }
        });
    }

    /// Closes every socket signed in as `user_id`, on every node; returns how many were here.
    pub fn terminate_user(&self, app: &App, user_id: &str) -> usize {
        if let Some(cluster) = &self.cluster {
            cluster.send_for(
                app,
                &Header::Terminate { n: cluster.me(), a: app.id.clone(), u: user_id.to_owned() },
                b"",
            );
        }
        self.terminate_local(app, user_id)
    }

    fn terminate_local(&self, app: &App, user_id: &str) -> usize {
        let sockets = self.registry.app(app).user_sockets(user_id);
        for s in &sockets {
            let err = ProtocolError::Terminated;
            s.outbox.close_with(Frame::from(server::error(&err)), CloseReason::Code(err.code(), err.to_string()));
        }
        sockets.len()
    }

    /// Asks the other nodes (recording the query's metrics).
    async fn ask(&self, app: &App, q: Query) -> Vec<Value> {
        let Some(cluster) = &self.cluster else { return Vec::new() };
        if cluster.peers() == 0 {
            return Vec::new();
        }
        let (answers, complete, took) = cluster.query(&app.id, q).await;
        self.metrics.adapter_query(&app.attrs, took.as_secs_f64() * 1000.0, complete);
        answers
    }

    /// Counts of one channel across the cluster (nodes that do not answer in time are left out).
    pub async fn channel_info(&self, app: &App, channel: &ChannelName) -> ChannelInfo {
        let mut info = self.registry.app(app).info(channel);
        for a in self.ask(app, Query::Channel { name: channel.as_str().to_owned() }).await {
            info.subscription_count += a.as_u64().unwrap_or(0) as usize;
        }
        if let (Some(cluster), true) = (&self.cluster, info.presence) {
            info.user_count = cluster.user_count(&app.id, channel.as_str());
        }
        info
    }

    /// Occupied channels starting with `prefix` across the cluster.
    pub async fn channel_list(&self, app: &App, prefix: &str) -> Vec<ChannelInfo> {
        let mut merged: BTreeMap<String, ChannelInfo> =
            self.registry.app(app).list(prefix).into_iter().map(|c| (c.name.to_string(), c)).collect();
        for answer in self.ask(app, Query::Channels { prefix: prefix.to_owned() }).await {
            let Some(map) = answer.as_object() else { continue };
            for (name, count) in map {
                let count = count.as_u64().unwrap_or(0) as usize;
                if let Some(c) = merged.get_mut(name) {
                    c.subscription_count += count;
                } else if let Ok(channel) = ChannelName::parse(name, app.settings.max_channel_name_length) {
                    let mut c = self.registry.app(app).info(&channel);
                    c.subscription_count = count;
                    merged.insert(name.clone(), c);
                }
            }
        }
        if let Some(cluster) = &self.cluster {
            for c in merged.values_mut().filter(|c| c.presence) {
                c.user_count = cluster.user_count(&app.id, &c.name);
            }
        }
        merged.into_values().collect()
    }

    /// The user ids present in a presence channel, cluster-wide.
    pub fn members(&self, app: &App, channel: &ChannelName) -> Vec<String> {
        match &self.cluster {
            Some(cluster) => cluster.members(&app.id, channel.as_str()).into_iter().map(|(u, _)| u).collect(),
            None => self.registry.app(app).members(channel.as_str()).iter().map(|u| u.to_string()).collect(),
        }
    }

    /// Occupied channels and presence members on this node, over every app (for `/stats`).
    pub fn local_counts(&self) -> (usize, usize) {
        self.registry.all().iter().map(|a| a.counts()).fold((0, 0), |(c, m), (ac, am)| (c + ac, m + am))
    }

    /// Drops expired cached events of every app (run periodically).
    pub fn sweep_caches(&self) {
        for app in self.registry.all() {
            app.sweep_cache();
        }
    }

    /// Runs this node's side of the cluster until shutdown: handles envelopes from the other
    /// nodes, heartbeats, expires silent nodes, and resynchronises presence after an outage.
    pub async fn run(self: Arc<Self>, inbox: Inbox, shutdown: Shutdown) {
        let Some(cluster) = self.cluster.clone() else { return };
        let Inbox { mut incoming, _link: link } = inbox;
        // Publishes the broker refused or could not take (it is down): not dropped for a
        // reason of the metric's contract, so they are reported here, once a beat at most.
        let mut unpublished = 0;
        let mut connected = self.connected.clone();
        let mut beat = tokio::time::interval(HEARTBEAT);
        cluster.send(&Header::Sync { n: cluster.me() }, b"");
        loop {
            tokio::select! {
                msg = incoming.recv() => match msg {
                    Some(payload) => self.receive(&cluster, payload).await,
                    None => break,
                },
                _ = beat.tick() => {
                    cluster.send(&Header::Heartbeat { n: cluster.me() }, b"");
                    let failed = link.drops.outgoing.load(Ordering::Relaxed);
                    if failed > unpublished {
                        tracing::warn!(
                            envelopes = failed - unpublished,
                            total = failed,
                            "cluster envelopes could not be published to the broker"
                        );
                        unpublished = failed;
                    }
                    for node in cluster.expire() {
                        tracing::warn!(node = %node, "cluster node went silent; removing its presence members");
                        self.peer_ids.lock().unwrap_or_else(|p| p.into_inner()).remove(&node);
                        let events = cluster.drop_node(&node);
                        self.dead_node_members_removed(&cluster, &events).await;
                        self.announce(events).await;
                    }
                    self.record_state();
                }
                changed = connected.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    self.record_state();
                    if *connected.borrow() {
                        // Others may have timed us out meanwhile: tell them who is here again.
                        cluster.send(&Header::Snapshot { n: cluster.me(), members: cluster.snapshot() }, b"");
                        cluster.send(&Header::Sync { n: cluster.me() }, b"");
                    }
                }
                _ = shutdown.wait() => {
                    self.leaving.store(true, Ordering::Release);
                    cluster.send(&Header::Leave { n: cluster.me() }, b"");
                    // Give the publisher a moment to hand the farewell to the broker.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    break;
                }
            }
        }
    }

    async fn receive(&self, cluster: &Arc<Cluster>, payload: Bytes) {
        // Verified (when signing is on) before the header is parsed; rejections are counted there.
        let Some((header, body)) = cluster.open(&payload) else { return };
        let sender = header.sender().to_owned();
        if sender == *cluster.node {
            return;
        }
        if cluster.seen(&sender) {
            self.peer_ids.lock().unwrap_or_else(|p| p.into_inner()).insert(Arc::from(sender.as_str()));
            tracing::info!(node = %sender, "cluster node joined");
            cluster.send(&Header::Snapshot { n: cluster.me(), members: cluster.snapshot() }, b"");
            self.record_state();
        }
        match header {
            Header::Broadcast { a, c, x, o, tp, bg, cache, e, .. } => {
                let Some(app) = self.apps.find_by_id(&a).await else { return };
                let Ok(channel) = ChannelName::parse(&c, app.settings.max_channel_name_length) else { return };
                let Ok(text) = Utf8Bytes::try_from(body) else { return };
                let span = tracing::info_span!(
                    "broadcast.remote",
                    otel.kind = "consumer",
                    sockudo.app_id = %a,
                    sockudo.channel = %c,
                    sockudo.channel_type = channel.channel_type().as_str(),
                    sockudo.event = %e,
                    sockudo.recipients = tracing::field::Empty,
                    messaging.system = "pusher",
                    messaging.operation.type = "process",
                    messaging.destination.name = %c,
                    messaging.batch.message_count = tracing::field::Empty,
                    sockudo.last_write_ms = tracing::field::Empty,
                );
                crate::telemetry::trace::continue_from(&span, tp.as_deref(), bg.as_deref());
                let _entered = span.enter();
                if cache {
                    self.registry.app(&app).set_cache(&c, text.clone());
                }
                // The origin's clock starts the latency; clocks of nodes on one host agree.
                let started = (o > 0).then(|| {
                    let age = Duration::from_micros(unix_micros().saturating_sub(o));
                    Instant::now().checked_sub(age).unwrap_or_else(Instant::now)
                });
                let recipients = self.broadcast(&app, &channel, text, x.as_deref(), started);
                span.record("sockudo.recipients", recipients);
                span.record("messaging.batch.message_count", recipients);
                tracing::debug!(recipients, "remote broadcast queued for local sockets");
            }
            Header::Query { n, id, a, q } => {
                let Some(app) = self.apps.find_by_id(&a).await else { return };
                let chans = self.registry.app(&app);
                let body = match q {
                    Query::Channels { prefix } => {
                        let map: serde_json::Map<String, Value> = chans
                            .list(&prefix)
                            .into_iter()
                            .map(|c| (c.name.to_string(), json!(c.subscription_count)))
                            .collect();
                        Value::Object(map)
                    }
                    Query::Channel { name } => match ChannelName::parse(&name, app.settings.max_channel_name_length) {
                        Ok(ch) => json!(chans.info(&ch).subscription_count),
                        Err(_) => json!(0),
                    },
                };
                cluster.send(&Header::Answer { n: cluster.me(), to: n, id, a: app.id.clone(), body }, b"");
                self.metrics.adapter_answered(&app.attrs);
            }
            Header::Answer { to, id, a, body, .. } => {
                if to == *cluster.node && cluster.answered(id, body) {
                    if let Some(app) = self.apps.find_by_id(&a).await {
                        self.metrics.adapter_response(&app.attrs);
                    }
                }
            }
            Header::Heartbeat { .. } => {}
            Header::Leave { n } => {
                tracing::info!(node = %n, "cluster node left");
                cluster.forget(&n);
                self.peer_ids.lock().unwrap_or_else(|p| p.into_inner()).remove(n.as_str());
                // No webhooks here: a leaving node's sessions unsubscribe as they close, and
                // it reports its own members' `member_removed` on that path.
                let events = cluster.drop_node(&n);
                self.announce(events).await;
                self.record_state();
            }
            Header::PresenceJoin { n, a, c, u, i } => {
                // `i` becomes part of frames: only valid JSON is accepted from the wire.
                if serde_json::from_str::<serde::de::IgnoredAny>(&i).is_ok() && cluster.join(&n, &a, &c, &u, &i) {
                    self.announce(vec![PresenceEvent::Added { app: a, channel: c, user: u, info: i }]).await;
                }
            }
            Header::PresenceLeave { n, a, c, u } => {
                if cluster.part(&n, &a, &c, &u) {
                    self.announce(vec![PresenceEvent::Removed { app: a, channel: c, user: u }]).await;
                }
            }
            Header::Snapshot { n, members } => {
                let events = cluster.replace_node(&n, &members);
                self.announce(events).await;
            }
            Header::Sync { .. } => {
                cluster.send(&Header::Snapshot { n: cluster.me(), members: cluster.snapshot() }, b"");
            }
            Header::Terminate { a, u, .. } => {
                if let Some(app) = self.apps.find_by_id(&a).await {
                    self.terminate_local(&app, &u);
                }
            }
        }
    }

    /// Reports to webhooks the members a silent (dead) node took with it. Every node sees the
    /// same removals; only the live node with the lowest id reports them, so they are
    /// reported once (twice only while nodes disagree about who is alive).
    async fn dead_node_members_removed(&self, cluster: &Cluster, events: &[PresenceEvent]) {
        let Some(webhooks) = &self.webhooks else { return };
        let lowest = self.peer_ids.lock().unwrap_or_else(|p| p.into_inner()).iter().all(|p| **p > *cluster.node);
        if !lowest {
            return;
        }
        for event in events {
            let PresenceEvent::Removed { app, channel, user } = event else { continue };
            if channel == watchlist::USERS {
                continue;
            }
            let Some(app) = self.apps.find_by_id(app).await else { continue };
            if webhooks.wants(&app, EventKind::MemberRemoved) {
                webhooks.emit(&app, WebhookEvent::MemberRemoved { channel: channel.clone(), user_id: user.clone() });
            }
        }
    }

    /// Tells local subscribers about cluster-wide presence changes, and watchers about users
    /// coming online or going offline.
    async fn announce(&self, events: Vec<PresenceEvent>) {
        for event in events {
            if let Some((app_id, user, watch)) = event.watchlist() {
                if let Some(app) = self.apps.find_by_id(app_id).await {
                    self.tell_watchers(&app, user, watch);
                }
                continue;
            }
            let (app_id, channel, frame) = match &event {
                PresenceEvent::Added { app, channel, user, info } => {
                    (app, channel, server::member_added(channel, user, info))
                }
                PresenceEvent::Removed { app, channel, user } => (app, channel, server::member_removed(channel, user)),
            };
            let Some(app) = self.apps.find_by_id(app_id).await else { continue };
            let Ok(channel) = ChannelName::parse(channel, app.settings.max_channel_name_length) else { continue };
            self.broadcast(&app, &channel, Utf8Bytes::from(frame), None, None);
        }
    }
}
