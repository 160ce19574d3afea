//! Every instrument of the telemetry contract (`shared/reference/metrics.md`), declared here and
//! recorded through typed calls with attribute sets built once per app ([`AppAttrs`]).
//!
//! OTel names carry no prefix; the Prometheus bridge adds the configured one and is told not to
//! add `_total` or unit suffixes, so the exposed names are exactly the contract's.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

use opentelemetry::metrics::{
    BoundCounter, BoundUpDownCounter, Counter, Gauge, Histogram, Meter, ObservableCounter, ObservableGauge,
    UpDownCounter,
};
use opentelemetry::KeyValue;

use crate::protocol::ChannelType;

/// `error_type` values of `connection_errors_total`, in a fixed order.
pub const ERROR_TYPES: [&str; 10] = [
    "app_not_found",
    "app_disabled",
    "over_quota",
    "over_capacity",
    "origin_not_allowed",
    "invalid_message",
    "message_too_large",
    "pong_timeout",
    "slow_consumer",
    "auth_timeout",
];

/// `signal` values of `telemetry_export_failures_total`, in the order of
/// [`super::otlp::ExportFailures`].
pub const EXPORT_SIGNALS: [&str; 3] = ["traces", "metrics", "logs"];

/// `recipient_count_bucket` values and their upper bounds.
const RECIPIENT_BUCKETS: [(&str, usize); 5] =
    [("xs", 10), ("sm", 100), ("md", 1000), ("lg", 10_000), ("xl", usize::MAX)];

const BROADCAST_LATENCY_BUCKETS: [f64; 15] =
    [0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0];
const HTTP_DURATION_BUCKETS: [f64; 15] =
    [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];
const RESOLVE_TIME_BUCKETS: [f64; 13] =
    [0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0];

/// A rate limiter, with its contract labels (`limiter_type`, `request_context`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limiter {
    HttpApi,
    WebsocketConnect,
    ClientEvents,
}

impl Limiter {
    const ALL: [Limiter; 3] = [Limiter::HttpApi, Limiter::WebsocketConnect, Limiter::ClientEvents];

    fn labels(self) -> (&'static str, &'static str) {
        match self {
            Limiter::HttpApi => ("http_api", "http_api"),
            Limiter::WebsocketConnect => ("websocket_connect", "websocket_upgrade"),
            Limiter::ClientEvents => ("client_events", "websocket_message"),
        }
    }
}

/// Attribute sets of one app, built once when the app is loaded.
pub struct AppAttrs {
    base: Vec<KeyValue>,
    /// The per-message counters bound to `base`: an unbound `add` hashes and compares the
    /// attribute set on every call, which callgrind put at 78% of a delivery's user-space
    /// instructions (docs/PROFILING.md). Bound, an add is an atomic increment.
    hot: Option<HotCounters>,
    /// The cache-channel instruments bound to `base`, handed to the app's channel state.
    cache: Option<CacheMeter>,
    channel: [Vec<KeyValue>; 5],
    errors: [Vec<KeyValue>; 10],
    latency: [[Vec<KeyValue>; 5]; 5],
    limiter: [Vec<KeyValue>; 3],
    webhooks: [Vec<KeyValue>; 4],
    /// Bytes queued in all of the app's sockets' send queues (each outbox adds and subtracts).
    send_queue: Arc<AtomicUsize>,
}

/// Counters added to once per WebSocket message, bound to an app's base attributes.
struct HotCounters {
    messages_sent: BoundCounter<u64>,
    bytes_sent: BoundCounter<u64>,
    messages_received: BoundCounter<u64>,
    bytes_received: BoundCounter<u64>,
}

/// An app's cache-channel instruments, bound to its base attributes: the bytes its stored last
/// events hold (`cache_channel_bytes`) and the events evicted or refused to keep within the byte
/// bounds (`cache_channel_evictions_total`). Cloned into the app's channel state, which records
/// each store, expiry and eviction as one call after releasing its lock.
#[derive(Clone)]
pub struct CacheMeter {
    bytes: BoundUpDownCounter<i64>,
    evictions: BoundCounter<u64>,
}

impl CacheMeter {
    /// Applies a change of the app's stored bytes and counts evicted (or refused) events.
    pub fn record(&self, bytes_delta: i64, evicted: u64) {
        if bytes_delta != 0 {
            self.bytes.add(bytes_delta);
        }
        if evicted > 0 {
            self.evictions.add(evicted);
        }
    }
}

/// `port` and `adapter` of the adapter gauges.
pub struct AdapterAttrs([KeyValue; 2]);

/// Envelopes the adapter dropped so far, one field per series of
/// `horizontal_adapter_dropped_total` (`direction`/`reason`). The adapter and its broker link
/// count them in atomics; [`Metrics::adapter_dropped`] reads them at collection, so the
/// envelope path pays one relaxed increment per drop and nothing otherwise.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AdapterDrops {
    /// `in`/`queue_full`: arrived while the node's inbox was full.
    pub in_queue_full: u64,
    /// `out`/`queue_full`: not queued for the broker, the outbox was full.
    pub out_queue_full: u64,
    /// `in`/`decode`: malformed, from a sender that was trusted (or verified).
    pub in_decode: u64,
    /// `in`/`unauthenticated`: unsigned, badly signed, outside the replay window, or naming
    /// another sender than the signed one.
    pub in_unauthenticated: u64,
}

/// `direction` and `reason` of `horizontal_adapter_dropped_total`, every valid combination.
const ADAPTER_DROPS: [(&str, &str); 4] =
    [("in", "queue_full"), ("out", "queue_full"), ("in", "decode"), ("in", "unauthenticated")];

/// `outcome` of `webhooks_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WebhookOutcome {
    Delivered = 0,
    Retried = 1,
    Failed = 2,
    Dropped = 3,
}

const WEBHOOK_OUTCOMES: [&str; 4] = ["delivered", "retried", "failed", "dropped"];

impl std::fmt::Debug for AppAttrs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppAttrs").field("base", &self.base).finish_non_exhaustive()
    }
}

/// Every instrument.
pub struct Metrics {
    port: u16,
    /// Kept for the instruments whose source exists only later (`adapter_dropped`).
    meter: Meter,
    connected: UpDownCounter<i64>,
    new_connections: Counter<u64>,
    new_disconnections: Counter<u64>,
    connection_errors: Counter<u64>,
    socket_received_bytes: Counter<u64>,
    socket_transmitted_bytes: Counter<u64>,
    ws_messages_received: Counter<u64>,
    ws_messages_sent: Counter<u64>,
    http_calls_received: Counter<u64>,
    http_received_bytes: Counter<u64>,
    http_transmitted_bytes: Counter<u64>,
    channel_subscriptions: Counter<u64>,
    channel_unsubscriptions: Counter<u64>,
    active_channels: UpDownCounter<i64>,
    cache_channel_bytes: UpDownCounter<i64>,
    cache_channel_evictions: Counter<u64>,
    rate_limit_checks: Counter<u64>,
    rate_limit_triggered: Counter<u64>,
    broadcast_latency: Histogram<f64>,
    http_duration: Histogram<f64>,
    adapter_resolve_time: Histogram<f64>,
    adapter_resolved: Counter<u64>,
    adapter_uncomplete: Counter<u64>,
    adapter_sent_requests: Counter<u64>,
    adapter_received_requests: Counter<u64>,
    adapter_received_responses: Counter<u64>,
    webhooks: Counter<u64>,
    webhook_queue: UpDownCounter<i64>,
    build_info: Gauge<u64>,
    adapter_connected: Gauge<i64>,
    adapter_nodes: Gauge<i64>,
    /// Every app's send-queue total, read by the `socket_send_queue_bytes` callback. Weak:
    /// an `App` replaced or removed takes its entry with it once its last socket is gone.
    send_queues: Arc<SendQueues>,
    _send_queue_gauge: opentelemetry::metrics::ObservableGauge<u64>,
    unknown: AppAttrs,
}

/// The send-queue total of every app's attribute sets: `(app id, its base attributes, total)`.
type SendQueues = Mutex<Vec<(String, Vec<KeyValue>, Weak<AtomicUsize>)>>;

/// Sums the live totals per app (a replaced app and its successor share one series) and
/// forgets the dead ones.
fn observe_send_queues(queues: &SendQueues) -> Vec<(Vec<KeyValue>, u64)> {
    let mut q = queues.lock().unwrap_or_else(|p| p.into_inner());
    q.retain(|(_, _, w)| w.strong_count() > 0);
    let mut sums: HashMap<&str, (Vec<KeyValue>, u64)> = HashMap::new();
    for (app_id, attrs, total) in q.iter() {
        let Some(total) = total.upgrade() else { continue };
        sums.entry(app_id).or_insert_with(|| (attrs.clone(), 0)).1 += total.load(Ordering::Relaxed) as u64;
    }
    sums.into_values().collect()
}

impl Metrics {
    pub fn new(meter: &Meter, port: u16) -> Self {
        let counter = |name: &'static str, desc: &'static str| meter.u64_counter(name).with_description(desc).build();
        let bytes = |name: &'static str, desc: &'static str| {
            meter.u64_counter(name).with_description(desc).with_unit("By").build()
        };
        let gauge =
            |name: &'static str, desc: &'static str| meter.i64_up_down_counter(name).with_description(desc).build();
        let send_queues: Arc<SendQueues> = Arc::default();
        let observed = send_queues.clone();
        let send_queue_gauge = meter
            .u64_observable_gauge("socket_send_queue_bytes")
            .with_description("Bytes waiting in all of the app's sockets' send queues")
            .with_unit("By")
            .with_callback(move |o| {
                for (attrs, bytes) in observe_send_queues(&observed) {
                    o.observe(bytes, &attrs);
                }
            })
            .build();
        let mut m = Self {
            port,
            send_queues,
            _send_queue_gauge: send_queue_gauge,
            meter: meter.clone(),
            connected: meter
                .i64_up_down_counter("connected")
                .with_description("Open WebSocket connections")
                .with_unit("{connection}")
                .build(),
            new_connections: counter("new_connections_total", "Connections that reached connection_established"),
            new_disconnections: counter("new_disconnections_total", "Established connections that ended"),
            connection_errors: counter("connection_errors_total", "Refused connections and fatal protocol errors"),
            socket_received_bytes: bytes("socket_received_bytes", "Bytes of WebSocket messages received"),
            socket_transmitted_bytes: bytes("socket_transmitted_bytes", "Bytes of WebSocket messages written"),
            ws_messages_received: counter("ws_messages_received_total", "WebSocket messages received"),
            ws_messages_sent: counter("ws_messages_sent_total", "WebSocket messages written to sockets"),
            http_calls_received: counter("http_calls_received_total", "HTTP API requests received"),
            http_received_bytes: bytes("http_received_bytes", "HTTP API request body bytes"),
            http_transmitted_bytes: bytes("http_transmitted_bytes", "HTTP API response body bytes"),
            channel_subscriptions: counter("channel_subscriptions_total", "Successful subscriptions"),
            channel_unsubscriptions: counter("channel_unsubscriptions_total", "Subscriptions that ended"),
            active_channels: gauge("active_channels", "Channels with at least one subscriber on this node"),
            cache_channel_bytes: meter
                .i64_up_down_counter("cache_channel_bytes")
                .with_description("Bytes held for cache channels' last events (frame plus channel name)")
                .with_unit("By")
                .build(),
            cache_channel_evictions: counter(
                "cache_channel_evictions_total",
                "Last events evicted or not stored to keep the cache within its byte bounds",
            ),
            rate_limit_checks: counter("rate_limit_checks_total", "Rate-limit decisions taken"),
            rate_limit_triggered: counter("rate_limit_triggered_total", "Rate-limit decisions that refused"),
            broadcast_latency: meter
                .f64_histogram("broadcast_latency_ms")
                .with_description("Publish accepted to frame written to the last local recipient")
                .with_unit("ms")
                .with_boundaries(BROADCAST_LATENCY_BUCKETS.to_vec())
                .build(),
            http_duration: meter
                .f64_histogram("http_server_request_duration_seconds")
                .with_description("API request head received to response written")
                .with_unit("s")
                .with_boundaries(HTTP_DURATION_BUCKETS.to_vec())
                .build(),
            adapter_resolve_time: meter
                .f64_histogram("horizontal_adapter_resolve_time")
                .with_description("Time for a cross-node query to complete or time out")
                .with_unit("ms")
                .with_boundaries(RESOLVE_TIME_BUCKETS.to_vec())
                .build(),
            adapter_resolved: counter(
                "horizontal_adapter_resolved_promises",
                "Cross-node queries answered by every node in time",
            ),
            adapter_uncomplete: counter(
                "horizontal_adapter_uncomplete_promises",
                "Cross-node queries that timed out with answers missing",
            ),
            adapter_sent_requests: counter("horizontal_adapter_sent_requests", "Cross-node queries this node sent"),
            adapter_received_requests: counter(
                "horizontal_adapter_received_requests",
                "Cross-node queries this node answered",
            ),
            adapter_received_responses: counter("horizontal_adapter_received_responses", "Answers this node received"),
            webhooks: counter("webhooks_total", "Webhook deliveries by outcome"),
            webhook_queue: meter
                .i64_up_down_counter("webhook_queue_events")
                .with_description("Webhook events waiting to be sent (this node's view of the queue)")
                .with_unit("{event}")
                .build(),
            build_info: meter.u64_gauge("build_info").with_description("The running version").build(),
            adapter_connected: meter
                .i64_gauge("horizontal_adapter_connected")
                .with_description("Whether this node is connected to its adapter's broker")
                .build(),
            adapter_nodes: meter
                .i64_gauge("horizontal_adapter_nodes")
                .with_description("Nodes this node sees, itself included")
                .build(),
            unknown: AppAttrs::build(port, "unknown"),
        };
        m.unknown.hot = Some(m.bind_hot(&m.unknown.base));
        m.build_info
            .record(1, &[KeyValue::new("port", port as i64), KeyValue::new("version", env!("CARGO_PKG_VERSION"))]);
        m.register_unknown();
        m
    }

    /// The listener port every series is labelled with.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Attribute sets for an app, with every counter and gauge series created at zero so that
    /// `rate()` and absence alerts have something to read from the first scrape.
    pub fn app_attrs(&self, app_id: &str) -> AppAttrs {
        let mut attrs = AppAttrs::build(self.port, app_id);
        attrs.hot = Some(self.bind_hot(&attrs.base));
        self.send_queues.lock().unwrap_or_else(|p| p.into_inner()).push((
            app_id.to_owned(),
            attrs.base.clone(),
            Arc::downgrade(&attrs.send_queue),
        ));
        attrs.cache = Some(CacheMeter {
            bytes: self.cache_channel_bytes.bind(&attrs.base),
            evictions: self.cache_channel_evictions.bind(&attrs.base),
        });
        self.register_app(&attrs);
        attrs
    }

    fn bind_hot(&self, base: &[KeyValue]) -> HotCounters {
        HotCounters {
            messages_sent: self.ws_messages_sent.bind(base),
            bytes_sent: self.socket_transmitted_bytes.bind(base),
            messages_received: self.ws_messages_received.bind(base),
            bytes_received: self.socket_received_bytes.bind(base),
        }
    }

    /// The attribute set for traffic that no app was found for.
    pub fn unknown(&self) -> &AppAttrs {
        &self.unknown
    }

    /// Traffic without an app can only be refused: its series are the refusal families.
    fn register_unknown(&self) {
        let a = &self.unknown;
        for c in [
            &self.http_calls_received,
            &self.http_received_bytes,
            &self.http_transmitted_bytes,
            &self.ws_messages_sent,
            &self.socket_transmitted_bytes,
        ] {
            c.add(0, &a.base);
        }
        for e in &a.errors {
            self.connection_errors.add(0, e);
        }
        for l in &a.limiter {
            self.rate_limit_checks.add(0, l);
            self.rate_limit_triggered.add(0, l);
        }
    }

    fn register_app(&self, a: &AppAttrs) {
        self.connected.add(0, &a.base);
        self.cache_channel_bytes.add(0, &a.base);
        self.webhook_queue.add(0, &a.base);
        for c in [
            &self.new_connections,
            &self.new_disconnections,
            &self.socket_received_bytes,
            &self.socket_transmitted_bytes,
            &self.ws_messages_received,
            &self.ws_messages_sent,
            &self.http_calls_received,
            &self.http_received_bytes,
            &self.http_transmitted_bytes,
            &self.adapter_resolved,
            &self.adapter_uncomplete,
            &self.adapter_sent_requests,
            &self.adapter_received_requests,
            &self.adapter_received_responses,
            &self.cache_channel_evictions,
        ] {
            c.add(0, &a.base);
        }
        for w in &a.webhooks {
            self.webhooks.add(0, w);
        }
        for e in &a.errors {
            self.connection_errors.add(0, e);
        }
        for c in &a.channel {
            self.channel_subscriptions.add(0, c);
            self.channel_unsubscriptions.add(0, c);
            self.active_channels.add(0, c);
        }
        for l in &a.limiter {
            self.rate_limit_checks.add(0, l);
            self.rate_limit_triggered.add(0, l);
        }
    }

    pub fn connection_opened(&self, a: &AppAttrs) {
        self.connected.add(1, &a.base);
        self.new_connections.add(1, &a.base);
    }

    pub fn connection_closed(&self, a: &AppAttrs) {
        self.connected.add(-1, &a.base);
        self.new_disconnections.add(1, &a.base);
    }

    /// Counts a refusal under its contract `error_type` (unknown strings are not counted).
    pub fn connection_error(&self, a: &AppAttrs, error_type: &str) {
        if let Some(i) = ERROR_TYPES.iter().position(|t| *t == error_type) {
            self.connection_errors.add(1, &a.errors[i]);
        }
    }

    pub fn ws_received(&self, a: &AppAttrs, bytes: usize) {
        match &a.hot {
            Some(h) => {
                h.messages_received.add(1);
                h.bytes_received.add(bytes as u64);
            }
            None => {
                self.ws_messages_received.add(1, &a.base);
                self.socket_received_bytes.add(bytes as u64, &a.base);
            }
        }
    }

    /// Counts frames written to a socket, batched per write.
    pub fn ws_sent(&self, a: &AppAttrs, messages: u64, bytes: u64) {
        match &a.hot {
            Some(h) => {
                h.messages_sent.add(messages);
                h.bytes_sent.add(bytes);
            }
            None => {
                self.ws_messages_sent.add(messages, &a.base);
                self.socket_transmitted_bytes.add(bytes, &a.base);
            }
        }
    }

    /// One API request's duration. `app_id` is the app the handler resolved (never a raw path
    /// segment), `route` the matched template; methods and statuses collapse to closed sets.
    pub fn http_request(&self, app_id: Option<&str>, method: &str, route: Option<&str>, status: u16, seconds: f64) {
        let method = match method {
            "GET" => "GET",
            "POST" => "POST",
            _ => "other",
        };
        let class = match status {
            0..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            _ => "5xx",
        };
        let attrs = [
            KeyValue::new("app_id", app_id.unwrap_or("unknown").to_owned()),
            KeyValue::new("port", self.port as i64),
            KeyValue::new("method", method),
            KeyValue::new("route", route.unwrap_or("other").to_owned()),
            KeyValue::new("status_class", class),
        ];
        self.http_duration.record(seconds, &attrs);
    }

    pub fn http_call(&self, a: &AppAttrs, request_bytes: u64, response_bytes: u64) {
        self.http_calls_received.add(1, &a.base);
        self.http_received_bytes.add(request_bytes, &a.base);
        self.http_transmitted_bytes.add(response_bytes, &a.base);
    }

    pub fn subscribed(&self, a: &AppAttrs, t: ChannelType) {
        self.channel_subscriptions.add(1, &a.channel[t.index()]);
    }

    pub fn unsubscribed(&self, a: &AppAttrs, t: ChannelType, count: u64) {
        self.channel_unsubscriptions.add(count, &a.channel[t.index()]);
    }

    pub fn channel_occupied(&self, a: &AppAttrs, t: ChannelType) {
        self.active_channels.add(1, &a.channel[t.index()]);
    }

    pub fn channel_vacated(&self, a: &AppAttrs, t: ChannelType) {
        self.active_channels.add(-1, &a.channel[t.index()]);
    }

    pub fn rate_limit(&self, a: &AppAttrs, limiter: Limiter, refused: bool) {
        let i = Limiter::ALL.iter().position(|l| *l == limiter).unwrap_or(0);
        self.rate_limit_checks.add(1, &a.limiter[i]);
        if refused {
            self.rate_limit_triggered.add(1, &a.limiter[i]);
        }
    }

    pub fn broadcast_latency(&self, a: &AppAttrs, t: ChannelType, recipients: usize, ms: f64) {
        let b = RECIPIENT_BUCKETS.iter().position(|(_, max)| recipients <= *max).unwrap_or(4);
        self.broadcast_latency.record(ms, &a.latency[t.index()][b]);
    }

    /// A cross-node query this node sent, answered in time by every node or not.
    pub fn adapter_query(&self, a: &AppAttrs, ms: f64, complete: bool) {
        self.adapter_sent_requests.add(1, &a.base);
        self.adapter_resolve_time.record(ms, &a.base);
        if complete {
            self.adapter_resolved.add(1, &a.base);
        } else {
            self.adapter_uncomplete.add(1, &a.base);
        }
    }

    /// A cross-node query this node answered.
    pub fn adapter_answered(&self, a: &AppAttrs) {
        self.adapter_received_requests.add(1, &a.base);
    }

    /// An answer this node received for one of its queries.
    pub fn adapter_response(&self, a: &AppAttrs) {
        self.adapter_received_responses.add(1, &a.base);
    }

    /// Webhook events of the app accepted into the queue.
    pub fn webhooks_queued(&self, a: &AppAttrs, events: usize) {
        self.webhook_queue.add(events as i64, &a.base);
    }

    /// Webhook events of the app that left the queue: delivered or given up.
    pub fn webhooks_unqueued(&self, a: &AppAttrs, events: usize) {
        self.webhook_queue.add(-(events as i64), &a.base);
    }

    /// The app's depth in a broker's webhook queue changed by `delta` events.
    pub fn webhooks_depth_changed(&self, a: &AppAttrs, delta: i64) {
        if delta != 0 {
            self.webhook_queue.add(delta, &a.base);
        }
    }

    /// A webhook delivery outcome.
    pub fn webhook(&self, a: &AppAttrs, outcome: WebhookOutcome) {
        self.webhooks.add(1, &a.webhooks[outcome as usize]);
    }

    /// The attribute set of the adapter gauges, built once by the adapter.
    pub fn adapter_attrs(&self, adapter: &'static str) -> AdapterAttrs {
        AdapterAttrs([KeyValue::new("port", self.port as i64), KeyValue::new("adapter", adapter)])
    }

    /// Declares `horizontal_adapter_dropped_total` for this node's adapter, reading `read` at
    /// each collection. Called once, by the adapter; every combination of [`ADAPTER_DROPS`] is
    /// a series from the first scrape.
    pub fn adapter_dropped(&self, attrs: &AdapterAttrs, read: impl Fn() -> AdapterDrops + Send + Sync + 'static) {
        let sets = ADAPTER_DROPS.map(|(direction, reason)| {
            let mut v = attrs.0.to_vec();
            v.push(KeyValue::new("direction", direction));
            v.push(KeyValue::new("reason", reason));
            v
        });
        // The handle is only a marker: the callback stays registered with the meter provider.
        let _ = self
            .meter
            .u64_observable_counter("horizontal_adapter_dropped_total")
            .with_description("Cluster envelopes not sent or not processed")
            .with_callback(move |observer| {
                let d = read();
                let values = [d.in_queue_full, d.out_queue_full, d.in_decode, d.in_unauthenticated];
                for (value, set) in values.into_iter().zip(&sets) {
                    observer.observe(value, set);
                }
            })
            .build();
    }

    /// Records the adapter's broker state and the nodes it sees.
    pub fn adapter_state(&self, attrs: &AdapterAttrs, connected: bool, nodes: i64) {
        self.adapter_connected.record(i64::from(connected), &attrs.0);
        self.adapter_nodes.record(nodes, &attrs.0);
    }
}

/// Instruments read when metrics are collected, not on any request path: the async runtime's
/// own counts (tokio's stable runtime metrics) and the OTLP export failures. Dropping them
/// would not unregister their callbacks; they are kept to say whose they are.
pub struct Observers {
    _runtime: Option<RuntimeObservers>,
    _export_failures: ObservableCounter<u64>,
}

/// `runtime_workers`, `runtime_alive_tasks`, `runtime_global_queue_depth` and
/// `runtime_worker_busy_seconds_total`.
type RuntimeObservers = (ObservableGauge<u64>, ObservableGauge<u64>, ObservableGauge<u64>, ObservableCounter<f64>);

impl Observers {
    /// Registers the collection-time instruments on `meter`. The runtime family is there only
    /// when called inside a Tokio runtime (the server's), whose handle the callbacks keep.
    pub fn register(meter: &Meter, port: u16, failures: Arc<super::otlp::ExportFailures>) -> Self {
        let attrs = [KeyValue::new("port", port as i64)];
        let runtime = tokio::runtime::Handle::try_current().ok().map(|rt| {
            let gauge = |name: &'static str, desc: &'static str, read: fn(&tokio::runtime::RuntimeMetrics) -> usize| {
                let (rt, attrs) = (rt.clone(), attrs.clone());
                meter
                    .u64_observable_gauge(name)
                    .with_description(desc)
                    .with_callback(move |o| o.observe(read(&rt.metrics()) as u64, &attrs))
                    .build()
            };
            let busy = {
                let (rt, attrs) = (rt.clone(), attrs.clone());
                meter
                    .f64_observable_counter("runtime_worker_busy_seconds_total")
                    .with_description("Busy time summed over the runtime's workers")
                    .with_unit("s")
                    .with_callback(move |o| {
                        let m = rt.metrics();
                        let busy: f64 =
                            (0..m.num_workers()).map(|w| m.worker_total_busy_duration(w).as_secs_f64()).sum();
                        o.observe(busy, &attrs)
                    })
                    .build()
            };
            (
                gauge("runtime_workers", "Async runtime worker threads", |m| m.num_workers()),
                gauge("runtime_alive_tasks", "Tasks alive in the runtime", |m| m.num_alive_tasks()),
                gauge("runtime_global_queue_depth", "Tasks waiting in the runtime's global queue", |m| {
                    m.global_queue_depth()
                }),
                busy,
            )
        });
        let signals = EXPORT_SIGNALS.map(|s| [KeyValue::new("port", port as i64), KeyValue::new("signal", s)]);
        let export_failures = meter
            .u64_observable_counter("telemetry_export_failures_total")
            .with_description("OTLP export batches that failed")
            .with_callback(move |o| {
                for (count, attrs) in failures.0.iter().zip(&signals) {
                    o.observe(count.load(Ordering::Relaxed), attrs);
                }
            })
            .build();
        Self { _runtime: runtime, _export_failures: export_failures }
    }
}

impl AppAttrs {
    /// The total that the app's sockets' send queues add their queued bytes to.
    pub fn send_queue(&self) -> Arc<AtomicUsize> {
        self.send_queue.clone()
    }

    /// The app's cache-channel instruments (`None` for `unknown`, which stores no events).
    pub fn cache_meter(&self) -> Option<CacheMeter> {
        self.cache.clone()
    }

    fn build(port: u16, app_id: &str) -> Self {
        let base = vec![KeyValue::new("app_id", app_id.to_owned()), KeyValue::new("port", port as i64)];
        let with = |extra: &[KeyValue]| {
            let mut v = base.clone();
            v.extend_from_slice(extra);
            v
        };
        let channel = ChannelType::ALL.map(|t| with(&[KeyValue::new("channel_type", t.as_str())]));
        let errors = ERROR_TYPES.map(|e| with(&[KeyValue::new("error_type", e)]));
        let latency = ChannelType::ALL.map(|t| {
            RECIPIENT_BUCKETS.map(|(b, _)| {
                with(&[KeyValue::new("channel_type", t.as_str()), KeyValue::new("recipient_count_bucket", b)])
            })
        });
        let limiter = Limiter::ALL.map(|l| {
            let (kind, ctx) = l.labels();
            with(&[KeyValue::new("limiter_type", kind), KeyValue::new("request_context", ctx)])
        });
        let webhooks = WEBHOOK_OUTCOMES.map(|o| with(&[KeyValue::new("outcome", o)]));
        let send_queue = Arc::default();
        Self { base, hot: None, cache: None, channel, errors, latency, limiter, webhooks, send_queue }
    }
}
