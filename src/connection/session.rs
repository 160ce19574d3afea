//! The session loop of one established connection. Reads, writes and timers run in one task
//! with `select!`: reading a client frame never waits for a write to another socket, the
//! outbox is drained into one coalesced write, and a writer stuck on a client that does not
//! read gives up as soon as that client's queue passes its cap (or the write deadline passes).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures_util::{FutureExt, SinkExt, StreamExt};
use serde_json::value::RawValue;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::adapter::Adapter;
use crate::app::{App, Replaced};
use crate::auth;
use crate::channels::{AppChannels, Frame, SocketHandle, SubscribeError};
use crate::outbox::CloseReason;
use crate::protocol::client::ParseLimits;
use crate::protocol::{
    server, ChannelKind, ChannelName, ClientEvent, CloseCode, PresenceMember, ProtocolError, SigninData,
};
use crate::rate_limit::TokenBucket;
use crate::state::State;
use crate::telemetry::logs::Sparse;
use crate::telemetry::Limiter;

/// Subscriptions one connection may hold; past it, subscribing is refused (4302).
const MAX_SUBSCRIPTIONS_PER_CONNECTION: usize = 1000;

/// How the session ended.
#[derive(Debug)]
enum End {
    /// The client closed or the TCP connection went away.
    Gone,
    /// The server closed it with this code.
    Closed(u16),
    /// Closed as a slow consumer while a write to it was blocked: its 4100 close frame is
    /// still to be sent, behind the bytes the client has not read yet.
    Stalled,
}

struct Subscription {
    channel: ChannelName,
    /// This socket's presence user on the channel (for client events' `user_id`).
    user_id: Option<Arc<str>>,
}

struct Session<'a> {
    state: &'a Arc<State>,
    /// The app as the store has it now: replaced when its row changes (see `follow_app`).
    app: Arc<App>,
    replaced: watch::Receiver<Replaced>,
    adapter: &'a Arc<Adapter>,
    chans: Arc<AppChannels>,
    handle: Arc<SocketHandle>,
    limits: ParseLimits,
    subs: HashMap<Arc<str>, Subscription>,
    limiter: Option<TokenBucket>,
    /// Subscribe/unsubscribe requests (`websocket.max_subscription_ops_per_second`).
    sub_ops: Option<TokenBucket>,
    signin_deadline: Option<Instant>,
    /// The users this socket's sign-in watches (empty unless the app has watchlist events).
    watchlist: Vec<Arc<str>>,
    /// `websocket.connection`, from upgrade to close; the socket's `subscribe`, `client_event`
    /// and `signin` spans link to it.
    conn_span: tracing::Span,
    conn_link: Option<crate::telemetry::trace::Link>,
}

pub(super) async fn run(
    mut ws: WebSocket,
    state: &Arc<State>,
    app: &Arc<App>,
    traceparent: Option<&str>,
    baggage: Option<&str>,
) {
    let cfg = &state.config;
    let queue = app.attrs.send_queue();
    let handle = Arc::new(SocketHandle::counted(state.next_socket_id(), cfg.websocket.max_queue_kb * 1024, queue));
    let conn_span = tracing::info_span!(
        "websocket.connection",
        otel.kind = "server",
        sockudo.app_id = %app.id,
        sockudo.socket_id = %handle.id,
        websocket.close.code = tracing::field::Empty,
    );
    crate::telemetry::trace::continue_from(&conn_span, traceparent, baggage);
    let rate = app.settings.max_client_events_per_second;
    let mut session = Session {
        state,
        app: app.clone(),
        replaced: app.watch_replaced(),
        adapter: &state.adapter,
        chans: state.adapter.channels(app),
        handle: handle.clone(),
        limits: app.parse_limits(),
        subs: HashMap::new(),
        limiter: (rate > 0).then(|| TokenBucket::per_second(rate)),
        sub_ops: (cfg.websocket.max_subscription_ops_per_second > 0).then(|| {
            TokenBucket::with_burst(
                cfg.websocket.max_subscription_ops_per_second,
                MAX_SUBSCRIPTIONS_PER_CONNECTION as u32,
            )
        }),
        signin_deadline: (app.settings.enable_user_authentication && app.settings.user_authentication_timeout > 0)
            .then(|| after(Instant::now(), Duration::from_secs(app.settings.user_authentication_timeout))),
        watchlist: Vec::new(),
        conn_link: crate::telemetry::trace::Link::to(&conn_span),
        conn_span,
    };
    // Released by drop, however the task ends (a panic included): the `connected` gauge here,
    // the channels, presence membership and user registry by `Session`'s own `Drop`.
    let _open = Opened::new(state, app);
    tracing::debug!(app_id = %app.id, socket_id = %handle.id, "connection opened");
    handle.reply(server::connection_established(&handle.id, cfg.activity_timeout));
    let end = session.event_loop(&mut ws).await;
    let code = match end {
        // 1005: no status received (the client closed or the TCP connection went away).
        End::Gone => 1005,
        End::Closed(code) => code,
        End::Stalled => ProtocolError::SlowConsumer.code(),
    };
    session.conn_span.record("websocket.close.code", code);
    session.cleanup();
    if let End::Stalled = end {
        // The writer gave up mid-write, so the close frame was never queued. It goes out behind
        // what is already buffered, from a task of its own within the write timeout, so that a
        // client that reads again learns why (4100: back off) instead of seeing an abnormal
        // closure, while the connection's slot and channels are already released.
        let err = ProtocolError::SlowConsumer;
        let close = CloseFrame { code: err.code(), reason: Utf8Bytes::from(err.to_string()) };
        let write_timeout = Duration::from_secs(cfg.websocket.write_timeout_seconds);
        let (token, shutdown) = (state.sockets.token(), state.shutdown.clone());
        tokio::spawn(async move {
            let _token = token;
            tokio::select! {
                _ = tokio::time::timeout(write_timeout, ws.send(Message::Close(Some(close)))) => {}
                _ = shutdown.wait() => {}
            }
        });
    }
    match end {
        End::Gone => tracing::debug!(app_id = %app.id, socket_id = %handle.id, "connection closed by the client"),
        End::Closed(code) => {
            tracing::debug!(app_id = %app.id, socket_id = %handle.id, code, "connection closed by the server")
        }
        End::Stalled => {
            tracing::debug!(app_id = %app.id, socket_id = %handle.id, code = ProtocolError::SlowConsumer.code(), "connection closed by the server")
        }
    }
}

/// The `connected` gauge's share of one connection: counted on creation, uncounted on drop.
struct Opened<'a> {
    state: &'a State,
    app: &'a App,
}

impl<'a> Opened<'a> {
    fn new(state: &'a State, app: &'a App) -> Self {
        state.metrics.connection_opened(&app.attrs);
        Self { state, app }
    }
}

impl Drop for Opened<'_> {
    fn drop(&mut self) {
        self.state.metrics.connection_closed(&self.app.attrs);
    }
}

impl Drop for Session<'_> {
    /// Whatever the task did not release itself (it panicked) is released here; after a normal
    /// end `cleanup` has run already and this finds nothing left.
    fn drop(&mut self) {
        self.cleanup();
    }
}

impl Session<'_> {
    async fn event_loop(&mut self, ws: &mut WebSocket) -> End {
        let cfg = &self.state.config;
        let activity = Duration::from_secs(cfg.activity_timeout);
        let pong_timeout = Duration::from_secs(cfg.pong_timeout);
        let write_timeout = Duration::from_secs(cfg.websocket.write_timeout_seconds);
        let soft_limit = cfg.websocket.max_message_size_kb * 1024;
        let mut last_seen = Instant::now();
        let mut ping_sent: Option<Instant> = None;
        let timer = tokio::time::sleep(activity);
        tokio::pin!(timer);
        let mut shutting_down = false;
        let mut batch: Vec<Frame> = Vec::new();
        // Built once: a fresh shutdown future per loop turn would cost a receiver clone each.
        let shutdown = self.state.shutdown.clone();
        let stop = shutdown.wait();
        tokio::pin!(stop);
        loop {
            let signin_deadline = self.signin_deadline;
            tokio::select! {
                biased;
                _ = &mut stop, if !shutting_down => {
                    shutting_down = true;
                    self.close_with(ProtocolError::ShuttingDown);
                }
                changed = self.replaced.changed() => match changed {
                    Ok(()) => self.follow_app(),
                    // Only the app we hold can drop its sender, and we hold it: re-arm anyway.
                    Err(_) => self.replaced = self.app.watch_replaced(),
                },
                _ = self.handle.outbox.notified() => {
                    if let Some(end) = self.write(ws, &mut batch, write_timeout).await {
                        return end;
                    }
                }
                msg = ws.next() => {
                    last_seen = Instant::now();
                    ping_sent = None;
                    match msg {
                        Some(Ok(Message::Text(text))) => self.on_text(&text, soft_limit),
                        Some(Ok(Message::Binary(data))) => {
                            self.state.metrics.ws_received(&self.app.attrs, data.len());
                            self.refuse(ProtocolError::InvalidMessage("binary frames are not supported".into()));
                        }
                        Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                        Some(Ok(Message::Close(_))) => {
                            // Tungstenite has queued the close reply; RFC 6455 wants it sent.
                            let _ = tokio::time::timeout(Duration::from_secs(1), ws.flush()).await;
                            return End::Gone;
                        }
                        None => return End::Gone,
                        Some(Err(err)) => return self.read_failed(ws, err).await,
                    }
                }
                () = &mut timer => {
                    let now = Instant::now();
                    match ping_sent {
                        Some(sent) if now >= after(sent, pong_timeout) => self.close_with(ProtocolError::PongTimeout),
                        Some(sent) => timer.as_mut().reset(after(sent, pong_timeout)),
                        None if now >= after(last_seen, activity) => {
                            self.handle.reply(server::ping());
                            ping_sent = Some(now);
                            timer.as_mut().reset(after(now, pong_timeout));
                        }
                        None => timer.as_mut().reset(after(last_seen, activity)),
                    }
                }
                () = sleep_until_opt(signin_deadline) => {
                    self.signin_deadline = None;
                    if self.handle.user_id().is_none() {
                        self.close_with(ProtocolError::Unauthorized);
                    }
                }
            }
        }
    }

    /// Writes everything queued in one flush; returns how the session ends, if it does.
    async fn write(&mut self, ws: &mut WebSocket, batch: &mut Vec<Frame>, deadline: Duration) -> Option<End> {
        let drained = self.handle.outbox.drain(batch);
        let mut bytes = 0u64;
        let count = batch.len() as u64;
        let close = drained.close.map(|reason| match reason {
            CloseReason::SlowConsumer => {
                let err = ProtocolError::SlowConsumer;
                self.count_error(&err);
                (err.code(), err.to_string())
            }
            CloseReason::Code(code, reason) => (code, reason),
        });
        let send = async {
            for frame in batch.iter() {
                bytes += frame.text.len() as u64;
                ws.feed(Message::Text(frame.text.clone())).await?;
            }
            if let Some((code, reason)) = &close {
                ws.feed(Message::Close(Some(CloseFrame { code: *code, reason: Utf8Bytes::from(reason.as_str()) })))
                    .await?;
            }
            ws.flush().await
        };
        let closing_code = close.as_ref().map(|(code, _)| *code);
        // Most writes complete at once (the socket buffer has room): try once before arming
        // the deadline, so the common case registers no timer.
        let outcome = {
            let mut send = std::pin::pin!(send);
            match (&mut send).now_or_never() {
                Some(Ok(())) => Ok(()),
                Some(Err(_)) => Err(End::Gone),
                None => self.write_blocked(send, deadline, closing_code, close.is_none()).await,
            }
        };
        if outcome.is_ok() && count > 0 {
            self.state.metrics.ws_sent(&self.app.attrs, count, bytes);
        }
        // Dropping the frames settles their broadcasts' latency (see `Delivery`).
        batch.clear();
        if batch.capacity() > 256 {
            batch.shrink_to(16);
        }
        match (outcome, close) {
            (Err(end), _) => Some(end),
            (Ok(()), Some((code, _))) => Some(End::Closed(code)),
            (Ok(()), None) => None,
        }
    }

    /// Finishes a write the socket could not take at once: within `deadline`, and giving up
    /// as soon as the client's queue overflows meanwhile (unless already closing).
    async fn write_blocked(
        &self,
        send: std::pin::Pin<&mut impl std::future::Future<Output = Result<(), axum::Error>>>,
        deadline: Duration,
        closing_code: Option<u16>,
        watch_overflow: bool,
    ) -> Result<(), End> {
        tokio::select! {
            r = tokio::time::timeout(deadline, send) => match (r, closing_code) {
                (Ok(Ok(())), _) => Ok(()),
                (Ok(Err(_)), _) => Err(End::Gone),
                // Already closing for another reason (or already counted as slow): give up.
                (Err(_), Some(code)) => Err(End::Closed(code)),
                (Err(_), None) => Err(self.slow_consumer()),
            },
            // The client's queue overflowed while this write was blocked on it.
            _ = self.handle.outbox.closing(), if watch_overflow => Err(self.slow_consumer()),
        }
    }

    /// A write that could not complete: the client is not reading.
    fn slow_consumer(&self) -> End {
        self.count_error(&ProtocolError::SlowConsumer);
        tracing::info!(app_id = %self.app.id, socket_id = %self.handle.id, "connection closed: client too slow to read");
        End::Stalled
    }

    async fn read_failed(&self, ws: &mut WebSocket, err: axum::Error) -> End {
        let too_big = matches!(
            err.into_inner().downcast::<tungstenite::Error>().map(|e| *e),
            Ok(tungstenite::Error::Capacity(_))
        );
        if !too_big {
            return End::Gone;
        }
        let err =
            ProtocolError::MessageTooLarge { limit_bytes: self.state.config.websocket.hard_max_message_size_kb * 1024 };
        self.count_error(&err);
        let close = CloseFrame { code: CloseCode::MESSAGE_TOO_BIG, reason: Utf8Bytes::from_static("Message too big") };
        let _ = tokio::time::timeout(Duration::from_secs(1), ws.send(Message::Close(Some(close)))).await;
        End::Closed(CloseCode::MESSAGE_TOO_BIG)
    }

    fn count_error(&self, err: &ProtocolError) {
        if let Some(t) = err.error_type() {
            self.state.metrics.connection_error(&self.app.attrs, t);
        }
    }

    /// Sends `pusher:error`; closes the socket when the error is fatal.
    fn refuse(&self, err: ProtocolError) {
        if err.closes() {
            self.close_with(err);
        } else {
            self.count_error(&err);
            self.handle.reply(server::error(&err));
        }
    }

    fn close_with(&self, err: ProtocolError) {
        if !matches!(err, ProtocolError::ShuttingDown) {
            self.count_error(&err);
        }
        self.handle.outbox.close_with(Frame::from(server::error(&err)), CloseReason::Code(err.code(), err.to_string()));
    }

    fn on_text(&mut self, text: &str, soft_limit: usize) {
        self.state.metrics.ws_received(&self.app.attrs, text.len());
        if text.len() > soft_limit {
            return self.refuse(ProtocolError::MessageTooLarge { limit_bytes: soft_limit });
        }
        match ClientEvent::parse(text, &self.limits) {
            Err(err) => {
                tracing::debug!(app_id = %self.app.id, socket_id = %self.handle.id, code = err.code(), "invalid client message");
                self.refuse(err)
            }
            Ok(ClientEvent::Ping) => {
                self.handle.reply(server::pong());
            }
            Ok(ClientEvent::Pong) => {}
            Ok(ClientEvent::Subscribe { .. } | ClientEvent::Unsubscribe { .. }) if !self.take_sub_op() => {
                self.refuse(ProtocolError::SubscriptionRejected("too many subscribe/unsubscribe requests".into()))
            }
            Ok(ClientEvent::Subscribe { channel, auth, channel_data }) => self.subscribe(channel, auth, channel_data),
            Ok(ClientEvent::Unsubscribe { channel }) => {
                if self.subs.remove(channel.as_str()).is_some() {
                    self.adapter.unsubscribe(&self.app, &channel, &self.handle.id);
                }
            }
            Ok(ClientEvent::Signin(data)) => self.signin(data),
            Ok(ClientEvent::Client { event, channel, data }) => self.client_event(event, channel, &data),
        }
    }

    /// The app store replaced or removed this socket's app: a disabled or removed app closes
    /// the socket (4003 / 4001); otherwise the socket carries on with the new settings and
    /// secret (the next channel auth is checked against it).
    fn follow_app(&mut self) {
        let mut next = self.replaced.borrow_and_update().clone();
        // It may have been replaced again already: follow to the app that is current.
        while let Replaced::By(app) = &next {
            match app.replacement() {
                Replaced::Current => break,
                later => next = later,
            }
        }
        match next {
            Replaced::Current => {}
            Replaced::Removed => self.close_with(ProtocolError::AppNotFound),
            Replaced::By(app) => {
                if !app.settings.enabled {
                    self.close_with(ProtocolError::AppDisabled);
                }
                self.limits = app.parse_limits();
                self.replaced = app.watch_replaced();
                self.app = app;
            }
        }
    }

    /// Spends one subscribe/unsubscribe from the socket's budget; false when it is empty.
    fn take_sub_op(&mut self) -> bool {
        self.sub_ops.as_mut().is_none_or(TokenBucket::try_take)
    }

    fn subscription_error(&self, channel: &ChannelName, kind: &str, error: &str, status: u16) {
        self.handle.reply(server::subscription_error(channel.as_str(), kind, error, status));
    }

    fn subscribe(&mut self, channel: ChannelName, auth: Option<String>, channel_data: Option<String>) {
        let span = self.span("subscribe", &channel);
        let _entered = span.enter();
        if self.subs.len() >= MAX_SUBSCRIPTIONS_PER_CONNECTION && !self.subs.contains_key(channel.as_str()) {
            return self.refuse(ProtocolError::SubscriptionRejected(format!(
                "at most {MAX_SUBSCRIPTIONS_PER_CONNECTION} subscriptions per connection"
            )));
        }
        let member = match channel.kind() {
            ChannelKind::Public => None,
            ChannelKind::User => {
                if self.handle.user_id().map(|u| &**u) != channel.user_id() {
                    return self.subscription_error(&channel, "AuthError", "Sign in as this user first", 403);
                }
                None
            }
            ChannelKind::Private | ChannelKind::PrivateEncrypted | ChannelKind::Presence => {
                let presence = channel.kind() == ChannelKind::Presence;
                let Some(auth) = auth else {
                    return self.subscription_error(&channel, "AuthError", "auth is required for this channel", 401);
                };
                let data = if presence {
                    match channel_data.as_deref() {
                        Some(d) => Some(d),
                        None => {
                            return self.subscription_error(&channel, "AuthError", "channel_data is required", 400);
                        }
                    }
                } else {
                    None
                };
                if !auth::verify_channel(
                    &self.app.key,
                    self.app.secret(),
                    &self.handle.id,
                    channel.as_str(),
                    data,
                    &auth,
                ) {
                    static LOG: Sparse = Sparse::new();
                    if let Some(suppressed) = LOG.admit() {
                        tracing::info!(
                            app_id = %self.app.id,
                            socket_id = %self.handle.id,
                            channel_type = channel.channel_type().as_str(),
                            suppressed,
                            "subscription authentication failed: invalid signature"
                        );
                    }
                    return self.subscription_error(&channel, "AuthError", "Invalid signature", 401);
                }
                match data {
                    Some(d) => {
                        let max = self.app.settings.max_presence_member_size_in_kb * 1024;
                        match PresenceMember::parse(d, max) {
                            Ok(m) => Some(m),
                            Err(e) => {
                                return self.subscription_error(&channel, "InvalidChannelData", &e.to_string(), 400)
                            }
                        }
                    }
                    None => None,
                }
            }
        };
        let user_id = member.as_ref().map(|m| Arc::<str>::from(m.user_id.as_str()));
        // Recorded before the adapter takes it, so that `cleanup` (run by drop, even after a
        // panic) finds every subscription the channels hold. A repeated subscribe changes
        // nothing: the socket keeps the identity it joined with.
        let fresh = !self.subs.contains_key(channel.as_str());
        if fresh {
            let name: Arc<str> = Arc::from(channel.as_str());
            self.subs.insert(name, Subscription { channel: channel.clone(), user_id });
        }
        match self.adapter.subscribe(&self.app, &channel, &self.handle, member) {
            Ok(out) => {
                super::fault::maybe_panic(channel.as_str());
                self.handle.reply(server::subscription_succeeded(channel.as_str(), &out.succeeded_data));
                if channel.is_cache() && !out.already {
                    match self.chans.cached(channel.as_str()) {
                        Some(frame) => {
                            self.handle.outbox.push_control(Frame::new(frame));
                        }
                        None => {
                            self.handle.reply(server::cache_miss(channel.as_str()));
                        }
                    }
                }
            }
            Err(SubscribeError::PresenceFull(max)) => {
                if fresh {
                    self.subs.remove(channel.as_str());
                }
                self.subscription_error(
                    &channel,
                    "LimitReached",
                    &format!("presence channel is full ({max} members)"),
                    403,
                )
            }
        }
    }

    fn span(&self, name: &'static str, channel: &ChannelName) -> tracing::Span {
        let span = match name {
            "subscribe" => {
                tracing::info_span!("subscribe", sockudo.app_id = %self.app.id, sockudo.channel = channel.as_str(), sockudo.channel_type = channel.channel_type().as_str())
            }
            _ => {
                tracing::info_span!("client_event", sockudo.app_id = %self.app.id, sockudo.channel = channel.as_str(), sockudo.channel_type = channel.channel_type().as_str())
            }
        };
        if let Some(link) = &self.conn_link {
            link.add_to(&span);
        }
        span
    }

    fn signin(&mut self, data: SigninData) {
        let span = tracing::info_span!("signin", sockudo.app_id = %self.app.id);
        if let Some(link) = &self.conn_link {
            link.add_to(&span);
        }
        let _entered = span.enter();
        if !self.app.settings.enable_user_authentication {
            return self
                .refuse(ProtocolError::SubscriptionRejected("user authentication is disabled for this app".into()));
        }
        if !auth::verify_signin(&self.app.key, self.app.secret(), &self.handle.id, &data.user_data, &data.auth) {
            static LOG: Sparse = Sparse::new();
            if let Some(suppressed) = LOG.admit() {
                tracing::info!(app_id = %self.app.id, socket_id = %self.handle.id, suppressed, "signin authentication failed: invalid signature");
            }
            return self.refuse(ProtocolError::SubscriptionRejected("sign-in authentication failed".into()));
        }
        let max_watchlist = self.app.settings.max_watchlist_size;
        let watchlist = match self.app.settings.enable_watchlist_events {
            true if data.watchlist.len() > max_watchlist => {
                return self.refuse(ProtocolError::SubscriptionRejected(format!(
                    "a watchlist of {} users is over this app's limit of {max_watchlist}",
                    data.watchlist.len()
                )));
            }
            true => data.watchlist.iter().map(|u| Arc::from(u.as_str())).collect(),
            false => Vec::new(),
        };
        let user_id: Arc<str> = Arc::from(data.user_id.as_str());
        if !self.handle.set_user(user_id.clone()) {
            return self.refuse(ProtocolError::SubscriptionRejected("already signed in as another user".into()));
        }
        self.signin_deadline = None;
        self.handle.reply(server::signin_success(&data.user_data));
        // Signing in again as the same user replaces the watchlist.
        self.chans.unwatch(&self.handle.id, &self.watchlist);
        self.watchlist = watchlist;
        self.adapter.signed_in(&self.app, &self.handle, &user_id, &self.watchlist);
    }

    fn client_event(&mut self, event: String, channel: ChannelName, data: &RawValue) {
        let span = self.span("client_event", &channel);
        let _entered = span.enter();
        let reject = |why: &str| ProtocolError::ClientEventRejected(why.to_owned());
        if !self.app.settings.enable_client_messages {
            return self.refuse(reject("client events are not enabled for this app"));
        }
        if !channel.allows_client_events() {
            return self.refuse(reject("client events are only allowed on private and presence channels"));
        }
        let Some(sub) = self.subs.get(channel.as_str()) else {
            return self.refuse(reject("not subscribed to the channel"));
        };
        let user_id = sub.user_id.clone();
        if let Some(limiter) = &mut self.limiter {
            let allowed = limiter.try_take();
            self.state.metrics.rate_limit(&self.app.attrs, Limiter::ClientEvents, !allowed);
            if !allowed {
                return self.refuse(reject("rate limit exceeded"));
            }
        }
        let frame = server::client_event(channel.as_str(), &event, data.get(), user_id.as_deref());
        self.adapter.relay(&self.app, &channel, Utf8Bytes::from(frame), Some(&self.handle.id), &event);
    }

    /// Leaves every channel and the user registry; runs however the session ended.
    fn cleanup(&mut self) {
        for (_, sub) in self.subs.drain() {
            self.adapter.unsubscribe(&self.app, &sub.channel, &self.handle.id);
        }
        if let Some(user) = self.handle.user_id() {
            self.adapter.signed_out(&self.app, &self.handle.id, user, &self.watchlist);
        }
        // Frames still queued are dropped with the handle; make sure nobody queues more.
        self.handle.outbox.close(CloseReason::Code(CloseCode::NORMAL, String::new()));
    }
}

/// `at + d`, saturating: a deadline too far to represent is "never" (a day past is as good),
/// never a panic.
fn after(at: Instant, d: Duration) -> Instant {
    at.checked_add(d).or_else(|| at.checked_add(Duration::from_secs(86_400 * 365))).unwrap_or(at)
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
