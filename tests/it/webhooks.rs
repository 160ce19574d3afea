//! Webhooks end to end: a real HTTP receiver in the test records every request (and answers
//! 503 or 400 when told to), real clients cause the events, and the server's metrics and
//! spans are read back. Every wait is bounded and waits for something to happen.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use serde_json::{json, Value};
use sockudo::config::{AdapterDriver, Config, WebhookConfig};
use tokio::net::TcpListener;

use crate::support::process::{free_port, Process};
use crate::support::*;

/// One request the receiver got.
#[derive(Clone, Debug)]
struct Hit {
    path: String,
    headers: HeaderMap,
    body: String,
}

impl Hit {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).expect("webhook bodies are JSON")
    }
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

#[derive(Default)]
struct Inner {
    hits: Vec<Hit>,
    /// Statuses to answer with first, in order; then `then`.
    script: VecDeque<u16>,
    then: u16,
}

/// An HTTP server that records webhook requests.
struct Receiver {
    port: u16,
    inner: Arc<Mutex<Inner>>,
}

async fn record(State(inner): State<Arc<Mutex<Inner>>>, uri: Uri, headers: HeaderMap, body: String) -> StatusCode {
    let mut i = inner.lock().unwrap();
    i.hits.push(Hit { path: uri.path().to_owned(), headers, body });
    let status = i.script.pop_front().unwrap_or(i.then);
    StatusCode::from_u16(status).unwrap()
}

impl Receiver {
    /// Answers `script` in order, then `then` for every later request.
    async fn start(script: &[u16], then: u16) -> Self {
        let inner = Arc::new(Mutex::new(Inner { hits: Vec::new(), script: script.iter().copied().collect(), then }));
        let app = axum::Router::new().fallback(record).with_state(inner.clone());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { port, inner }
    }

    async fn ok() -> Self {
        Self::start(&[], 200).await
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn hits(&self) -> Vec<Hit> {
        self.inner.lock().unwrap().hits.clone()
    }

    /// Every event received on `path`, in arrival order.
    fn events(&self, path: &str) -> Vec<Value> {
        self.hits()
            .iter()
            .filter(|h| h.path == path)
            .flat_map(|h| h.json()["events"].as_array().cloned().unwrap_or_default())
            .collect()
    }

    /// Waits (bounded) until an event on `path` matches `want`; returns the events so far.
    async fn wait_for(&self, path: &str, want: Value) -> Vec<Value> {
        let found = eventually(WAIT, || {
            let got = self.events(path).contains(&want);
            async move { got }
        })
        .await;
        let events = self.events(path);
        assert!(found, "no {want} on {path}; got {events:#?}");
        events
    }
}

fn hook(url: String, types: &[&str]) -> WebhookConfig {
    WebhookConfig { url, event_types: types.iter().map(|t| t.to_string()).collect(), headers: Default::default() }
}

/// A server whose default app has `hooks`.
async fn server(hooks: Vec<WebhookConfig>, f: impl FnOnce(&mut Config)) -> TestServer {
    TestServer::start_with(move |c| {
        c.app_manager.array.apps[0].webhooks = hooks;
        c.webhooks.batch_ms = 20;
        f(c);
    })
    .await
}

async fn webhook_metric(server: &TestServer, outcome: &str) -> f64 {
    server.metric("sockudo_webhooks_total", &[("app_id", APP_ID), ("outcome", outcome)]).await.unwrap_or(0.0)
}

async fn wait_metric(server: &TestServer, outcome: &str, at_least: f64) {
    let reached = eventually(WAIT, || async { webhook_metric(server, outcome).await >= at_least }).await;
    assert!(reached, "webhooks_total{{outcome={outcome}}} never reached {at_least}");
}

fn count(events: &[Value], want: &Value) -> usize {
    events.iter().filter(|e| *e == want).count()
}

#[tokio::test]
async fn requests_are_signed_and_batched() {
    let rx = Receiver::ok().await;
    let mut headers = std::collections::BTreeMap::new();
    headers.insert("Authorization".to_owned(), "Bearer extra".to_owned());
    let with_headers = WebhookConfig { headers, ..hook(rx.url("/hook"), &[]) };
    let server = server(vec![with_headers], |c| c.webhooks.batch_ms = 300).await;
    let mut alice = server.client().await;
    let before = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    alice.subscribe_presence("presence-room", "alice").await;
    rx.wait_for("/hook", json!({"name": "member_added", "channel": "presence-room", "user_id": "alice"})).await;

    let hits = rx.hits();
    let hit = hits
        .iter()
        .find(|h| h.json()["events"].as_array().unwrap().iter().any(|e| e["name"] == "member_added"))
        .unwrap();
    // Both events of the subscription happened within the window: one request.
    assert_eq!(
        hit.json()["events"],
        json!([
            {"name": "channel_occupied", "channel": "presence-room"},
            {"name": "member_added", "channel": "presence-room", "user_id": "alice"}
        ]),
        "{hits:#?}"
    );
    let time_ms = hit.json()["time_ms"].as_u64().expect("time_ms is a number");
    assert!(time_ms >= before && time_ms < before + 10_000, "{time_ms} vs {before}");
    assert_eq!(hit.header("content-type"), Some("application/json"));
    assert_eq!(hit.header("x-pusher-key"), Some(KEY));
    assert_eq!(hit.header("authorization"), Some("Bearer extra"), "configured headers are sent");
    // The signature is the HMAC-SHA256 of the exact body with the app secret.
    let signature = hit.header("x-pusher-signature").expect("X-Pusher-Signature");
    assert_eq!(signature, sockudo::auth::sign(SECRET, &hit.body));
    assert_ne!(signature, sockudo::auth::sign("another-secret", &hit.body));
    wait_metric(&server, "delivered", 1.0).await;
    server.stop().await;
}

#[tokio::test]
async fn every_event_type_has_pushers_shape() {
    let rx = Receiver::ok().await;
    let server = server(vec![hook(rx.url("/all"), &[])], |_| {}).await;
    let mut one = server.client().await;
    let mut two = server.client().await;

    one.subscribe_presence("presence-room", "u1").await;
    rx.wait_for("/all", json!({"name": "channel_occupied", "channel": "presence-room"})).await;
    rx.wait_for("/all", json!({"name": "member_added", "channel": "presence-room", "user_id": "u1"})).await;

    // Client events: `data` as a string, the sender's socket id, `user_id` on presence only.
    one.subscribe_private("private-chat").await;
    two.subscribe_private("private-chat").await;
    one.send(json!({"event": "client-y", "channel": "private-chat", "data": {"a": 1}})).await;
    two.expect("client-y").await;
    rx.wait_for(
        "/all",
        json!({"name": "client_event", "channel": "private-chat", "event": "client-y",
               "data": "{\"a\":1}", "socket_id": one.socket_id}),
    )
    .await;
    one.send(json!({"event": "client-z", "channel": "presence-room", "data": "hello"})).await;
    rx.wait_for(
        "/all",
        json!({"name": "client_event", "channel": "presence-room", "event": "client-z",
               "data": "hello", "socket_id": one.socket_id, "user_id": "u1"}),
    )
    .await;

    // A cache channel with nothing cached; then one with a cached event (no miss).
    one.subscribe("cache-empty").await;
    one.expect("pusher:cache_miss").await;
    rx.wait_for("/all", json!({"name": "cache_miss", "channel": "cache-empty"})).await;
    server.publish("cache-full", "ev", "1").await;
    two.subscribe("cache-full").await;
    two.expect("ev").await;

    // The debounced, cluster-wide subscription count.
    one.subscribe("counted").await;
    two.subscribe("counted").await;
    rx.wait_for("/all", json!({"name": "subscription_count", "channel": "counted", "subscription_count": 2})).await;

    // Leaving: a member who goes, channels that empty, and one that does not.
    one.close().await;
    rx.wait_for("/all", json!({"name": "member_removed", "channel": "presence-room", "user_id": "u1"})).await;
    rx.wait_for("/all", json!({"name": "channel_vacated", "channel": "presence-room"})).await;
    rx.wait_for("/all", json!({"name": "channel_vacated", "channel": "cache-empty"})).await;
    let events =
        rx.wait_for("/all", json!({"name": "subscription_count", "channel": "counted", "subscription_count": 1})).await;
    assert!(!events.contains(&json!({"name": "channel_vacated", "channel": "private-chat"})), "two is still there");
    assert!(!events.contains(&json!({"name": "cache_miss", "channel": "cache-full"})), "cache-full had an event");
    assert_eq!(count(&events, &json!({"name": "channel_occupied", "channel": "presence-room"})), 1);
    for e in &events {
        let name = e["name"].as_str().unwrap();
        assert!(
            [
                "channel_occupied",
                "channel_vacated",
                "member_added",
                "member_removed",
                "client_event",
                "cache_miss",
                "subscription_count"
            ]
            .contains(&name),
            "{e}"
        );
    }
    two.close().await;
    server.stop().await;
}

#[tokio::test]
async fn event_types_filter_what_each_url_gets() {
    let rx = Receiver::ok().await;
    let hooks = vec![
        hook(rx.url("/members"), &["member_added"]),
        hook(rx.url("/occupancy"), &["channel_occupied", "channel_vacated"]),
    ];
    let server = server(hooks, |_| {}).await;
    let mut a = server.client().await;
    a.subscribe_presence("presence-filtered", "a").await;
    rx.wait_for("/occupancy", json!({"name": "channel_occupied", "channel": "presence-filtered"})).await;
    rx.wait_for("/members", json!({"name": "member_added", "channel": "presence-filtered", "user_id": "a"})).await;
    let mut b = server.client().await;
    b.subscribe_presence("presence-filtered", "b").await;
    b.close().await;
    a.close().await;
    // The last events in each URL's order: everything before them has arrived.
    let members =
        rx.wait_for("/members", json!({"name": "member_added", "channel": "presence-filtered", "user_id": "b"})).await;
    let occupancy = rx.wait_for("/occupancy", json!({"name": "channel_vacated", "channel": "presence-filtered"})).await;
    assert!(members.iter().all(|e| e["name"] == "member_added"), "{members:#?}");
    assert_eq!(members.len(), 2, "{members:#?}");
    assert_eq!(
        occupancy,
        vec![
            json!({"name": "channel_occupied", "channel": "presence-filtered"}),
            json!({"name": "channel_vacated", "channel": "presence-filtered"})
        ]
    );
    server.stop().await;
}

#[tokio::test]
async fn a_5xx_is_retried_until_delivered() {
    let rx = Receiver::start(&[503, 503], 200).await;
    let server = server(vec![hook(rx.url("/retry"), &["channel_occupied"])], |_| {}).await;
    let mut c = server.client().await;
    c.subscribe("retry-me").await;
    wait_metric(&server, "delivered", 1.0).await;
    let hits = rx.hits();
    assert_eq!(hits.len(), 3, "two 503s, then a 200: {hits:#?}");
    // The same batch each time: same body, same signature.
    assert!(hits
        .iter()
        .all(|h| h.body == hits[0].body && h.header("x-pusher-signature") == hits[0].header("x-pusher-signature")));
    assert_eq!(hits[0].json()["events"], json!([{"name": "channel_occupied", "channel": "retry-me"}]));
    assert_eq!(webhook_metric(&server, "retried").await, 2.0);
    assert_eq!(webhook_metric(&server, "delivered").await, 1.0);
    assert_eq!(webhook_metric(&server, "failed").await, 0.0);
    server.stop().await;
}

#[tokio::test]
async fn a_4xx_is_final() {
    let rx = Receiver::start(&[], 400).await;
    let server = server(vec![hook(rx.url("/refuse"), &["channel_occupied"])], |_| {}).await;
    let mut c = server.client().await;
    c.subscribe("refused").await;
    wait_metric(&server, "failed", 1.0).await;
    // `failed` is counted once the batch is given up: no attempt can follow it.
    assert_eq!(rx.hits().len(), 1);
    assert_eq!(webhook_metric(&server, "retried").await, 0.0);
    assert_eq!(webhook_metric(&server, "delivered").await, 0.0);
    server.stop().await;
}

/// A TCP server that accepts connections and never answers.
async fn black_hole() -> (u16, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    (port, task)
}

#[tokio::test]
async fn dead_receivers_do_not_slow_sockets() {
    let (hole, _hole) = black_hole().await;
    let closed = free_port();
    let hooks =
        vec![hook(format!("http://127.0.0.1:{hole}/never"), &[]), hook(format!("http://127.0.0.1:{closed}/"), &[])];
    let server = server(hooks, |c| {
        c.webhooks.timeout_ms = 300;
        c.webhooks.max_retry_seconds = 2;
        c.webhooks.queue_size = 50;
        c.webhooks.workers = 2;
        c.app_manager.array.apps[0].max_client_events_per_second = 0;
    })
    .await;
    let mut sub = server.client().await;
    sub.subscribe("news").await;
    let mut chatty = server.client().await;
    chatty.subscribe_private("private-noise").await;
    // Webhook traffic well beyond the queue while the receivers are dead.
    for i in 0..200 {
        chatty.send(json!({"event": "client-noise", "channel": "private-noise", "data": {"i": i}})).await;
    }
    let started = Instant::now();
    for i in 0..200 {
        let (status, _) = server.publish("news", "tick", &i.to_string()).await;
        assert_eq!(status, 200);
        let mut churn = server.client().await;
        if i % 20 == 0 {
            churn.subscribe(&format!("churn-{i}")).await;
        }
        drop(churn);
    }
    for i in 0..200 {
        let f = sub.expect("tick").await;
        assert_eq!(f["data"], i.to_string());
    }
    let took = started.elapsed();
    assert!(took < Duration::from_secs(5), "200 publishes and deliveries took {took:?}");
    // The overflow was dropped and counted; the dead receivers were retried.
    wait_metric(&server, "dropped", 1.0).await;
    wait_metric(&server, "retried", 1.0).await;
    println!("200 events delivered in {took:?} with dead webhook receivers");
    server.stop().await;
}

/// The request continues the trace the event happened in, and is a `webhook.send` client
/// span with the contract's attributes (no query string, no secret).
#[tokio::test]
async fn requests_carry_the_events_trace() {
    use crate::support::otlp::{attr, hex, Receiver as Otlp};
    let (otlp, endpoint) = Otlp::grpc().await;
    let rx = Receiver::ok().await;
    let dir = std::env::temp_dir().join(format!("sockudo-webhooks-{}-{}", std::process::id(), fastrand::u64(..)));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("config.json");
    let cfg = json!({
        "webhooks": {"batch_ms": 10},
        "app_manager": {"array": {"apps": [{
            "id": APP_ID, "key": KEY, "secret": SECRET,
            "webhooks": [{"url": rx.url("/traced?token=query-secret"), "event_types": ["channel_occupied"]}]
        }]}}
    });
    std::fs::write(&file, cfg.to_string()).unwrap();
    let env = vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint),
        ("OTEL_METRICS_EXPORTER", "none".to_owned()),
        ("OTEL_LOGS_EXPORTER", "none".to_owned()),
        ("LOG_LEVEL", "debug".to_owned()),
    ];
    let node = Process::start_with_args(&["--config", &file.to_string_lossy()], &env).await;
    // Browsers cannot set headers on a WebSocket: the connection's baggage comes as a query
    // parameter, and reaches the webhooks of what the socket does.
    let url = format!("ws://127.0.0.1:{}/app/{KEY}?protocol=7&baggage=tenant%3Dacme", node.port);
    let mut c = crate::support::Client::connect(&url).await;
    c.subscribe("traced-channel").await;
    rx.wait_for("/traced", json!({"name": "channel_occupied", "channel": "traced-channel"})).await;
    let hit = rx.hits().into_iter().next().unwrap();
    assert_eq!(hit.header("baggage"), Some("tenant=acme"), "the request carries the event's baggage");
    let tp = hit.header("traceparent").expect("the request carries traceparent").to_owned();
    let parts: Vec<&str> = tp.split('-').collect();
    assert_eq!(parts.len(), 4, "{tp}");
    assert_eq!((parts[0], parts[1].len(), parts[2].len()), ("00", 32, 16), "{tp}");

    let found = eventually(Duration::from_secs(15), || async {
        otlp.spans().iter().any(|s| s.name == "webhook.send") && otlp.spans().iter().any(|s| s.name == "subscribe")
    })
    .await;
    assert!(found, "spans: {:?}", otlp.spans().iter().map(|s| s.name.clone()).collect::<Vec<_>>());
    let spans = otlp.spans();
    let send = spans.iter().find(|s| s.name == "webhook.send").unwrap();
    assert_eq!(send.kind, 3, "SPAN_KIND_CLIENT");
    assert_eq!((hex(&send.trace_id), hex(&send.span_id)), (parts[1].to_owned(), parts[2].to_owned()));
    let subscribe = spans.iter().find(|s| s.span_id == send.parent_span_id).expect("webhook.send has its parent");
    assert_eq!(subscribe.name, "subscribe", "the event happened while subscribing");
    assert_eq!(attr(send, "sockudo.app_id").as_deref(), Some(APP_ID));
    assert_eq!(attr(send, "url.full"), Some(rx.url("/traced")));
    assert_eq!(attr(send, "http.response.status_code").as_deref(), Some("200"));
    assert_eq!(attr(send, "sockudo.webhook.attempt").as_deref(), Some("1"));
    assert_eq!(attr(send, "http.request.method").as_deref(), Some("POST"));
    assert_eq!(attr(send, "server.address").as_deref(), Some("127.0.0.1"));
    assert_eq!(attr(send, "server.port"), Some(rx.port.to_string()));
    assert_eq!(attr(send, "baggage.tenant").as_deref(), Some("acme"));
    for s in &spans {
        for kv in &s.attributes {
            let v = crate::support::otlp::kv_string(kv).1;
            assert!(!v.contains(SECRET) && !v.contains("query-secret"), "secret in {}: {v}", s.name);
        }
    }
    c.close().await;
    let lines = node.stop().await;
    assert!(lines.iter().all(|l| !l.contains(SECRET) && !l.contains("query-secret")), "a secret was logged");
}

/// A node on Redis under `prefix` whose default app has `hooks`.
async fn redis_node(prefix: &str, hooks: Vec<WebhookConfig>) -> TestServer {
    let prefix = prefix.to_owned();
    server(hooks, move |c| {
        c.adapter.driver = AdapterDriver::Redis;
        c.adapter.redis.url = "redis://127.0.0.1:6379".into();
        c.adapter.redis.prefix = prefix;
        c.adapter.request_timeout_ms = 500;
        c.adapter.node_timeout_ms = 2000;
    })
    .await
}

async fn wait_nodes(node: &TestServer, n: f64) {
    let seen = eventually(Duration::from_secs(10), || async {
        node.metric("sockudo_horizontal_adapter_nodes", &[("adapter", "redis")]).await == Some(n)
    })
    .await;
    assert!(seen, "the nodes did not find each other");
}

#[tokio::test]
async fn cluster_reports_occupancy_and_members_once() {
    let rx = Receiver::ok().await;
    let prefix = format!("it-webhooks-{}-{}", std::process::id(), fastrand::u64(..));
    let types = &["channel_occupied", "channel_vacated", "member_added", "member_removed"];
    let nodes = [
        redis_node(&prefix, vec![hook(rx.url("/c"), types)]).await,
        redis_node(&prefix, vec![hook(rx.url("/c"), types)]).await,
    ];
    for n in &nodes {
        wait_nodes(n, 2.0).await;
    }
    let occupied = |c: &str| json!({"name": "channel_occupied", "channel": c});
    let vacated = |c: &str| json!({"name": "channel_vacated", "channel": c});

    let mut a = nodes[0].client().await;
    a.subscribe_presence("presence-shared", "alice").await;
    rx.wait_for("/c", occupied("presence-shared")).await;
    // The same user, and another, on the other node.
    let mut b = nodes[1].client().await;
    b.subscribe_presence("presence-shared", "alice").await;
    let mut bob = nodes[1].client().await;
    bob.subscribe_presence("presence-shared", "bob").await;
    a.expect("pusher_internal:member_added").await;
    // A later event from node 2 marks the point by which a duplicate would have arrived.
    b.subscribe("marker-1").await;
    let events = rx.wait_for("/c", occupied("marker-1")).await;
    assert_eq!(count(&events, &occupied("presence-shared")), 1, "{events:#?}");
    let added = |u: &str| json!({"name": "member_added", "channel": "presence-shared", "user_id": u});
    assert_eq!(count(&events, &added("alice")), 1, "{events:#?}");
    assert_eq!(count(&events, &added("bob")), 1, "{events:#?}");

    // Leaving node 2 does not vacate the channel; alice is still on node 1.
    b.close().await;
    bob.close().await;
    let removed = |u: &str| json!({"name": "member_removed", "channel": "presence-shared", "user_id": u});
    rx.wait_for("/c", removed("bob")).await;
    a.close().await;
    rx.wait_for("/c", vacated("presence-shared")).await;
    let mut m = nodes[1].client().await;
    m.subscribe("marker-2").await;
    let events = rx.wait_for("/c", occupied("marker-2")).await;
    assert_eq!(count(&events, &vacated("presence-shared")), 1, "{events:#?}");
    assert_eq!(count(&events, &removed("alice")), 1, "{events:#?}");
    assert_eq!(count(&events, &removed("bob")), 1, "{events:#?}");
    m.close().await;
    for n in nodes {
        n.stop().await;
    }
}

/// A node that dies takes its members with it; the surviving node reports them, once.
#[tokio::test]
async fn a_dead_nodes_members_are_reported_by_one_node() {
    let rx = Receiver::ok().await;
    let prefix = format!("it-webhooks-kill-{}-{}", std::process::id(), fastrand::u64(..));
    let types = ["member_added", "member_removed"];
    let survivor = redis_node(&prefix, vec![hook(rx.url("/m"), &types)]).await;
    let dir = std::env::temp_dir().join(format!("sockudo-webhooks-{}-{}", std::process::id(), fastrand::u64(..)));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("node.json");
    let cfg = json!({
        "adapter": {"driver": "redis", "node_timeout_ms": 2000, "request_timeout_ms": 500,
                    "redis": {"url": "redis://127.0.0.1:6379", "prefix": prefix}},
        "webhooks": {"batch_ms": 10},
        "app_manager": {"array": {"apps": [{
            "id": APP_ID, "key": KEY, "secret": SECRET,
            "webhooks": [{"url": rx.url("/m"), "event_types": types}]
        }]}}
    });
    std::fs::write(&file, cfg.to_string()).unwrap();
    let doomed = Process::start_with_args(&["--config", &file.to_string_lossy()], &[]).await;
    wait_nodes(&survivor, 2.0).await;
    let mut bob = doomed.client().await;
    bob.subscribe_presence("presence-doomed", "bob").await;
    let added = json!({"name": "member_added", "channel": "presence-doomed", "user_id": "bob"});
    rx.wait_for("/m", added.clone()).await;
    doomed.kill().await;
    let removed = json!({"name": "member_removed", "channel": "presence-doomed", "user_id": "bob"});
    let gone = eventually(Duration::from_secs(15), || {
        let got = rx.events("/m").contains(&removed);
        async move { got }
    })
    .await;
    assert!(gone, "no member_removed for the dead node's user: {:#?}", rx.events("/m"));
    // A later event marks the point by which a duplicate would have arrived.
    let mut carol = survivor.client().await;
    carol.subscribe_presence("presence-doomed", "carol").await;
    let events =
        rx.wait_for("/m", json!({"name": "member_added", "channel": "presence-doomed", "user_id": "carol"})).await;
    assert_eq!(count(&events, &removed), 1, "{events:#?}");
    assert_eq!(count(&events, &added), 1, "{events:#?}");
    carol.close().await;
    survivor.stop().await;
}

/// A broker of the test's own on `port`, without persistence: a restart empties it, which is
/// what the outage test wants to survive (the queue's stream, group or consumer are made again
/// and the events waiting on the node are written again).
async fn own_broker(nats: bool, port: u16) -> tokio::process::Child {
    let p = port.to_string();
    let mut cmd = if nats {
        let store = std::env::temp_dir().join(format!("sockudo-it-js-{}-{}", std::process::id(), fastrand::u64(..)));
        let mut c = tokio::process::Command::new("nats-server");
        c.args(["-a", "127.0.0.1", "-p", &p, "-js", "-sd", &store.to_string_lossy()]);
        c
    } else {
        let mut c = tokio::process::Command::new("redis-server");
        c.args(["--port", &p, "--save", "", "--appendonly", "no", "--bind", "127.0.0.1"]);
        c
    };
    let child = cmd.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).kill_on_drop(true).spawn();
    let child = child.expect("start the broker");
    let up = eventually(WAIT, || async { tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() }).await;
    assert!(up, "broker on {port} did not start");
    child
}

async fn up(server: &TestServer) -> (u16, String) {
    let r = reqwest::get(server.http_url("/up")).await.expect("GET /up");
    (r.status().as_u16(), r.text().await.unwrap_or_default())
}

/// The durable queue's broker goes away: events caused meanwhile wait on the node (nothing is
/// lost, nothing blocks the sockets) and `/up` says so while they wait; when a broker is back
/// (empty) they are written and delivered and `/up` is ready again.
async fn broker_outage(nats: bool) {
    let port = free_port();
    let mut broker = own_broker(nats, port).await;
    let rx = Receiver::ok().await;
    let prefix = format!("it-outage-{}", fastrand::u64(..));
    let node = server(vec![hook(rx.url("/q"), &["channel_occupied"])], move |c| {
        if nats {
            c.webhooks.queue_driver = Some(sockudo::config::QueueDriver::Nats);
            c.adapter.nats.servers = vec![format!("nats://127.0.0.1:{port}")];
            c.adapter.nats.prefix = prefix;
        } else {
            c.webhooks.queue_driver = Some(sockudo::config::QueueDriver::Redis);
            c.adapter.redis.url = format!("redis://127.0.0.1:{port}");
            c.adapter.redis.prefix = prefix;
        }
        c.webhooks.claim_idle_ms = 1000;
    })
    .await;
    assert_eq!(up(&node).await, (200, "OK".to_owned()));
    let mut c = node.client().await;
    c.subscribe("before-outage").await;
    rx.wait_for("/q", json!({"name": "channel_occupied", "channel": "before-outage"})).await;

    broker.kill().await.unwrap();
    let _ = broker.wait().await;
    // Nothing waits yet: the node is fit for traffic, the broker is only needed for webhooks.
    assert_eq!(up(&node).await.0, 200);
    for i in 0..5 {
        c.subscribe(&format!("during-outage-{i}")).await;
    }
    let reported = eventually(Duration::from_secs(30), || async {
        up(&node).await == (503, "WEBHOOK QUEUE UNAVAILABLE".to_owned())
    })
    .await;
    assert!(reported, "/up while events wait for the broker: {:?}", up(&node).await);
    let waiting = eventually(WAIT, || async {
        node.metric("sockudo_webhook_queue_events", &[("app_id", APP_ID)]).await == Some(5.0)
    })
    .await;
    assert!(
        waiting,
        "5 events wait on the node: {:?}",
        node.metric("sockudo_webhook_queue_events", &[("app_id", APP_ID)]).await
    );
    assert!(rx.events("/q").iter().all(|e| !e["channel"].as_str().unwrap().starts_with("during")), "nothing sent yet");

    let _broker = own_broker(nats, port).await;
    // The node reconnects on its own schedule (backoff up to 5 s), then writes what waited.
    let delivered = eventually(Duration::from_secs(30), || async {
        (0..5).all(|i| {
            rx.events("/q").contains(&json!({"name": "channel_occupied", "channel": format!("during-outage-{i}")}))
        })
    })
    .await;
    assert!(delivered, "events waiting on the node were not delivered: {:#?}", rx.events("/q"));
    let ready = eventually(Duration::from_secs(15), || async { up(&node).await.0 == 200 }).await;
    assert!(ready, "/up after the broker returned: {:?}", up(&node).await);
    assert_eq!(webhook_metric(&node, "dropped").await, 0.0);
    c.close().await;
    node.stop().await;
}

#[tokio::test]
async fn a_redis_queue_outage_is_ridden_out_and_reported_by_readiness() {
    broker_outage(false).await;
}

#[tokio::test]
async fn a_nats_queue_outage_is_ridden_out_and_reported_by_readiness() {
    broker_outage(true).await;
}

/// A NATS server without JetStream cannot hold the queue: implied by the adapter, webhooks stay
/// in memory (with a warning) and still arrive; asked for explicitly, startup fails with exit 64
/// naming the broker's key.
#[tokio::test]
async fn a_broker_without_jetstream_keeps_webhooks_in_memory_unless_required() {
    let port = free_port();
    let child = tokio::process::Command::new("nats-server")
        .args(["-a", "127.0.0.1", "-p", &port.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("nats-server");
    let up = eventually(WAIT, || async { tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() }).await;
    assert!(up, "nats-server did not start");
    let rx = Receiver::ok().await;
    let dir = std::env::temp_dir().join(format!("sockudo-nojs-{}-{}", std::process::id(), fastrand::u64(..)));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("config.json");
    let cfg = json!({
        "adapter": {"driver": "nats", "nats": {"servers": [format!("nats://127.0.0.1:{port}")],
                    "prefix": format!("it-nojs-{}", fastrand::u64(..))}},
        "webhooks": {"batch_ms": 10},
        "app_manager": {"array": {"apps": [{
            "id": APP_ID, "key": KEY, "secret": SECRET,
            "webhooks": [{"url": rx.url("/m"), "event_types": ["channel_occupied"]}]
        }]}}
    });
    std::fs::write(&file, cfg.to_string()).unwrap();
    let node = Process::start_with_args(&["--config", &file.to_string_lossy()], &[]).await;
    let mut c = node.client().await;
    c.subscribe("in-memory").await;
    rx.wait_for("/m", json!({"name": "channel_occupied", "channel": "in-memory"})).await;
    assert!(node.logged("cannot hold the webhook queue"), "the fallback is logged");
    c.close().await;
    node.stop().await;

    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_sockudo"))
        .args(["--config", &file.to_string_lossy()])
        .env("HOST", "127.0.0.1")
        .env("PORT", free_port().to_string())
        .env("METRICS_ENABLED", "false")
        .env("WEBHOOK_QUEUE_DRIVER", "nats")
        .output();
    let out = tokio::time::timeout(Duration::from_secs(20), out).await.unwrap().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(err.contains("adapter.nats.servers") && err.contains("webhooks.queue_driver"), "{err}");
    drop(child);
}
