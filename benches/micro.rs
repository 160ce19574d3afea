//! Micro-benchmarks (criterion) of the server's hot pieces, each through the real public
//! function the server calls: frame serialisation and parsing, signature checks, channel
//! lookup and subscription, fan-out of one pre-serialised frame to N outboxes with the drain a
//! connection's writer does, and metric recording against the Prometheus-backed meter provider
//! that `Telemetry::new` builds. `cargo bench --bench micro`; figures in `benches/README.md`.
//!
//! What is left out on purpose: socket I/O, task wake-ups and the HTTP/WebSocket framing, which
//! the load tool (`benches/sockudo-bench`) measures end to end.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::{Message, Utf8Bytes};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

use sockudo::adapter::Adapter;
use sockudo::app::{App, AppManager};
use sockudo::auth::{self, SignedRequest};
use sockudo::channels::{AppChannels, CacheBounds, Frame, Registry, SocketHandle};
use sockudo::config::{AppConfig, Config};
use sockudo::protocol::client::ParseLimits;
use sockudo::protocol::rest::{self, PublishLimits};
use sockudo::protocol::{server, ChannelName, ChannelType, ClientEvent, PresenceMember};
use sockudo::telemetry::{Metrics, Telemetry};

const APP_ID: &str = "123456";
const KEY: &str = "278d425bdf160c739803";
const SECRET: &str = "7ad3773142a6692b25b8";
/// The default `websocket.max_queue_kb`, as each connection's outbox gets it.
const QUEUE_CAP: usize = 1024 * 1024;
/// A fixed clock for the API signature, inside the timestamp tolerance.
const NOW: u64 = 1_700_000_000;

fn app_settings() -> AppConfig {
    AppConfig { id: APP_ID.into(), key: KEY.into(), secret: SECRET.into(), ..AppConfig::default() }
}

/// The telemetry the server builds from its default config: metrics on, Prometheus exporter,
/// no OTLP. It must outlive the benchmark, since its meter provider owns the pipeline.
fn telemetry() -> Telemetry {
    Telemetry::new(&Config::default(), 6001, "bench-node").expect("default telemetry builds")
}

/// A JSON object of about `len` bytes, as a publisher would put in `data` (quotes included, so
/// the frame builder has escaping to do, as it does in production).
fn payload(len: usize) -> String {
    let mut s = String::from(r#"{"order_id":12345,"status":"shipped","items":["#);
    let mut i = 0;
    while s.len() + 40 < len {
        if i > 0 {
            s.push(',');
        }
        s.push_str(&format!(r#"{{"sku":"SKU-{i:05}","qty":{}}}"#, i % 7 + 1));
        i += 1;
    }
    s.push_str(r#"],"note":""#);
    while s.len() + 2 < len {
        s.push('x');
    }
    s.push_str("\"}");
    s
}

fn handle(i: usize) -> Arc<SocketHandle> {
    Arc::new(SocketHandle::new(Arc::from(format!("{}.{}", 1000 + i, 7_000_000 + i)), QUEUE_CAP))
}

/// What `Adapter::publish` does once per channel before the fan-out; a function of its own so
/// that a profiler can be pointed at it (`docs/PROFILING.md`).
#[inline(never)]
fn publish_frame(channel: &str, event: &str, data: &str) -> Utf8Bytes {
    Utf8Bytes::from(server::event(channel, event, data))
}

fn frame(c: &mut Criterion) {
    let mut g = c.benchmark_group("frame");
    for (label, len) in [("100B", 100), ("1KB", 1024)] {
        let data = payload(len);
        g.throughput(Throughput::Bytes(data.len() as u64));
        g.bench_with_input(BenchmarkId::new("serialise_event", label), &data, |b, data| {
            b.iter(|| publish_frame(black_box("private-orders-42"), "order-updated", black_box(data)))
        });
        let body =
            serde_json::json!({ "name": "order-updated", "channel": "private-orders-42", "data": data }).to_string();
        let limits = PublishLimits {
            max_channel_name_len: 200,
            max_event_name_len: 200,
            max_payload_bytes: 100 * 1024,
            max_channels: 100,
            max_batch: 10,
        };
        g.bench_with_input(BenchmarkId::new("parse_publish_body", label), &body, |b, body| {
            b.iter(|| rest::parse_event(black_box(body.as_bytes()), &limits).expect("valid body"))
        });
    }
    g.throughput(Throughput::Elements(1));
    let limits = ParseLimits { max_channel_name_len: 200, max_event_name_len: 200, max_client_payload_bytes: 10240 };
    let subscribe = format!(
        r#"{{"event":"pusher:subscribe","data":{{"channel":"private-orders-42","auth":"{KEY}:{}"}}}}"#,
        auth::sign(SECRET, "1234.5678:private-orders-42")
    );
    g.bench_function("parse_client/subscribe_private", |b| {
        b.iter(|| ClientEvent::parse(black_box(&subscribe), &limits).expect("valid frame"))
    });
    let client_event = format!(r#"{{"event":"client-typing","channel":"private-chat-7","data":{}}}"#, payload(100));
    g.bench_function("parse_client/client_event_100B", |b| {
        b.iter(|| ClientEvent::parse(black_box(&client_event), &limits).expect("valid frame"))
    });
    g.finish();
}

fn signature(c: &mut Criterion) {
    let mut g = c.benchmark_group("signature");
    // A publish as the Pusher server libraries sign it: body_md5, then the sorted query signed.
    let body = serde_json::json!({ "name": "order-updated", "channels": ["private-orders-42"], "data": payload(100) })
        .to_string();
    let query =
        format!("auth_key={KEY}&auth_timestamp={NOW}&auth_version=1.0&body_md5={}", auth::body_md5(body.as_bytes()));
    let path = format!("/apps/{APP_ID}/events");
    let signature = auth::sign(SECRET, &format!("POST\n{path}\n{query}"));
    let query = format!("{query}&auth_signature={signature}");
    let req = SignedRequest { method: "POST", path: &path, query: &query, body: body.as_bytes() };
    assert_eq!(auth::verify_api_request(KEY, SECRET, &req, NOW, 600), Ok(()));
    g.bench_function("api_request", |b| {
        b.iter(|| auth::verify_api_request(KEY, SECRET, black_box(&req), NOW, 600).expect("valid signature"))
    });

    let socket_id = "1234.5678";
    let private = format!("{KEY}:{}", auth::sign(SECRET, &format!("{socket_id}:private-orders-42")));
    assert!(auth::verify_channel(KEY, SECRET, socket_id, "private-orders-42", None, &private));
    g.bench_function("channel_private", |b| {
        b.iter(|| {
            auth::verify_channel(KEY, SECRET, socket_id, black_box("private-orders-42"), None, black_box(&private))
        })
    });
    let channel_data =
        r#"{"user_id":"user-4242","user_info":{"name":"Alice Example","avatar":"https://example.com/a.png"}}"#;
    let presence = format!("{KEY}:{}", auth::sign(SECRET, &format!("{socket_id}:presence-room-9:{channel_data}")));
    assert!(auth::verify_channel(KEY, SECRET, socket_id, "presence-room-9", Some(channel_data), &presence));
    g.bench_function("channel_presence", |b| {
        b.iter(|| {
            auth::verify_channel(
                KEY,
                SECRET,
                socket_id,
                black_box("presence-room-9"),
                Some(black_box(channel_data)),
                black_box(&presence),
            )
        })
    });
    g.finish();
}

fn channel_lookup(c: &mut Criterion) {
    let mut g = c.benchmark_group("channel_lookup");
    let telemetry = telemetry();
    let app = App::new(app_settings(), &telemetry.metrics);
    let registry = Registry::new(CacheBounds::ttl_only(Duration::from_secs(1800)));
    let chans: Arc<AppChannels> = registry.app(&app);
    for i in 0..10_000 {
        let name = ChannelName::parse(&format!("orders-{i}"), 200).expect("valid name");
        chans.subscribe(&name, &handle(i), None, 100).expect("public subscribe");
    }
    let existing = ChannelName::parse("orders-4242", 200).expect("valid name");
    let fresh = ChannelName::parse("orders-fresh", 200).expect("valid name");
    let room = ChannelName::parse("presence-room-9", 200).expect("valid name");
    for i in 0..100 {
        let member = PresenceMember::parse(&format!(r#"{{"user_id":"u{i}","user_info":{{"name":"User {i}"}}}}"#), 2048)
            .expect("valid member");
        chans.subscribe(&room, &handle(20_000 + i), Some(member), 1000).expect("presence subscribe");
    }
    assert!(chans.snapshot("orders-4242").is_some());

    // The first two steps of every broadcast: the app's state, then the channel's subscribers.
    g.bench_function("registry_app", |b| b.iter(|| registry.app(black_box(&app))));
    g.bench_function("snapshot_hit_10k_channels", |b| b.iter(|| chans.snapshot(black_box("orders-4242"))));
    g.bench_function("snapshot_miss_10k_channels", |b| b.iter(|| chans.snapshot(black_box("orders-nobody"))));
    g.bench_function("info_10k_channels", |b| b.iter(|| chans.info(black_box(&existing))));

    let me = handle(99_999);
    g.bench_function("subscribe_unsubscribe/existing_channel", |b| {
        b.iter(|| {
            chans.subscribe(&existing, &me, None, 100).expect("public subscribe");
            chans.unsubscribe(existing.as_str(), &me.id).expect("was subscribed")
        })
    });
    g.bench_function("subscribe_unsubscribe/new_channel", |b| {
        b.iter(|| {
            chans.subscribe(&fresh, &me, None, 100).expect("public subscribe");
            chans.unsubscribe(fresh.as_str(), &me.id).expect("was subscribed")
        })
    });
    // The member is parsed from channel_data once per subscribe in the server too; a clone
    // stands in for that here so that the cost is the channel state's.
    let member = PresenceMember::parse(r#"{"user_id":"u-new","user_info":{"name":"New"}}"#, 2048).expect("valid");
    g.bench_function("subscribe_unsubscribe/presence_100_members", |b| {
        b.iter(|| {
            chans.subscribe(&room, &me, Some(member.clone()), 1000).expect("presence subscribe");
            chans.unsubscribe(room.as_str(), &me.id).expect("was subscribed")
        })
    });
    g.finish();
}

/// A channel with `n` local subscribers behind the real [`Adapter`] (local driver).
struct Fanout {
    adapter: Adapter,
    app: Arc<App>,
    channel: ChannelName,
    sockets: Vec<Arc<SocketHandle>>,
    batch: Vec<Frame>,
}

impl Fanout {
    fn new(telemetry: &Telemetry, n: usize) -> Self {
        let config = Config::default();
        let metrics: Arc<Metrics> = telemetry.metrics.clone();
        let apps = Arc::new(AppManager::from_config(&config, &metrics));
        let rt = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
        let (adapter, _) = rt.block_on(Adapter::connect(&config, "bench-node", metrics.clone(), apps)).expect("local");
        let app = Arc::new(App::new(app_settings(), &metrics));
        let channel = ChannelName::parse(&format!("fanout-{n}"), 200).expect("valid name");
        let sockets: Vec<_> = (0..n).map(handle).collect();
        for s in &sockets {
            adapter.channels(&app).subscribe(&channel, s, None, 100).expect("public subscribe");
        }
        Self { adapter, app, channel, sockets, batch: Vec::new() }
    }

    /// `Adapter::broadcast` as `Adapter::publish` calls it (with a start time, so the last
    /// recipient's drop records `broadcast_latency_ms`).
    #[inline(never)]
    fn broadcast(&self, text: &Utf8Bytes) -> usize {
        self.adapter.broadcast(&self.app, &self.channel, text.clone(), None, Some(Instant::now()))
    }

    /// What each connection's writer (`Session::write`) does with its queue, short of the
    /// socket: drain, wrap every frame in a WebSocket message, count the write, drop the frames.
    #[inline(never)]
    fn drain_all(&mut self, metrics: &Metrics) -> u64 {
        let mut total = 0;
        for s in &self.sockets {
            let drained = s.outbox.drain(&mut self.batch);
            let mut bytes = 0u64;
            for f in &self.batch {
                bytes += f.text.len() as u64;
                black_box(Message::Text(f.text.clone()));
            }
            metrics.ws_sent(&self.app.attrs, self.batch.len() as u64, bytes);
            total += bytes;
            black_box(drained.close);
            self.batch.clear();
        }
        total
    }

    #[inline(never)]
    fn round(&mut self, text: &Utf8Bytes, metrics: &Metrics) -> u64 {
        self.broadcast(text);
        self.drain_all(metrics)
    }
}

fn fanout(c: &mut Criterion) {
    let mut g = c.benchmark_group("fanout");
    let telemetry = telemetry();
    let metrics = telemetry.metrics.clone();
    let text = Utf8Bytes::from(server::event("fanout", "order-updated", &payload(100)));
    for n in [1usize, 100, 1000] {
        let mut f = Fanout::new(&telemetry, n);
        assert_eq!(f.round(&text, &metrics), (n * text.len()) as u64);
        g.throughput(Throughput::Elements(n as u64));
        g.bench_function(BenchmarkId::new("broadcast_and_drain", n), |b| b.iter(|| f.round(&text, &metrics)));
        // The publisher's share alone (the writers' drains run outside the timed part).
        g.bench_function(BenchmarkId::new("broadcast_only", n), |b| {
            b.iter_custom(|iters| {
                let mut spent = Duration::ZERO;
                for _ in 0..iters {
                    let t = Instant::now();
                    black_box(f.broadcast(&text));
                    spent += t.elapsed();
                    f.drain_all(&metrics);
                }
                spent
            })
        });
    }
    // A subscription change drops the channel's shared snapshot; the next broadcast rebuilds
    // it from the subscriber map (here 1000 subscribers).
    let f = Fanout::new(&telemetry, 1000);
    let chans = f.adapter.channels(&f.app);
    let extra = handle(5000);
    g.throughput(Throughput::Elements(1000));
    g.bench_function("resubscribe_then_snapshot/1000", |b| {
        b.iter(|| {
            chans.subscribe(&f.channel, &extra, None, 100).expect("public subscribe");
            chans.unsubscribe(f.channel.as_str(), &extra.id).expect("was subscribed");
            chans.snapshot(f.channel.as_str())
        })
    });
    g.finish();
    assert!(telemetry.render().contains("sockudo_broadcast_latency_ms_bucket"), "latency reached the exporter");
}

fn metrics(c: &mut Criterion) {
    let mut g = c.benchmark_group("metrics");
    let telemetry = telemetry();
    let m = telemetry.metrics.clone();
    let app = App::new(app_settings(), &m);
    let a = &app.attrs;
    // One counter, 3 attributes (app_id, port, channel_type).
    g.bench_function("counter_add", |b| b.iter(|| m.subscribed(a, black_box(ChannelType::Public))));
    // Two counters, 2 attributes each: what a writer records per flush.
    g.bench_function("ws_sent_2_counters", |b| b.iter(|| m.ws_sent(a, black_box(1), black_box(120))));
    // One histogram (15 buckets), 4 attributes: once per broadcast.
    g.bench_function("histogram_record", |b| {
        b.iter(|| m.broadcast_latency(a, ChannelType::Public, black_box(100), black_box(1.7)))
    });
    g.finish();
    let text = telemetry.render();
    assert!(text.contains("sockudo_channel_subscriptions_total") && text.contains("sockudo_broadcast_latency_ms"));
}

criterion_group!(benches, frame, signature, channel_lookup, fanout, metrics);
criterion_main!(benches);
