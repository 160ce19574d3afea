//! Durable webhook queues (`webhooks.queue_driver` redis or nats): a batched request written
//! to the broker survives the node that wrote it (SIGKILL), a broker restart, and a receiver
//! that is down, holds requests or refuses them (dead letters and `sockudo webhooks replay`).
//! Every request carries `X-Sockudo-Webhook-Id`, the same on every retry and redelivery; the
//! memory queue carries it too. Each scenario is written once over the broker kind and run on
//! a private, durable `redis-server` and `nats-server` that the test can kill and restart;
//! nodes are the real binary so that they can be SIGKILLed.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::support::brokers::{DurableBroker, Kind};
use crate::support::process::{free_port, Process};
use crate::support::*;

/// `webhooks.claim_idle_ms` of the nodes: how long a dead node's entries wait to be claimed.
const CLAIM_IDLE_MS: u64 = 1500;
/// The longest any one wait in these tests may take.
const LONG: Duration = Duration::from_secs(45);
/// Every event kind the producers cause (subscription counts are left out: they are debounced
/// and would make the expected set depend on timing).
const KINDS: [&str; 6] =
    ["channel_occupied", "channel_vacated", "member_added", "member_removed", "client_event", "cache_miss"];
const ID_HEADER: &str = "x-sockudo-webhook-id";

// ---------------------------------------------------------------------------------------------
// The receiver

/// One request the receiver got, and what it answered.
#[derive(Clone, Debug)]
struct Hit {
    id: Option<String>,
    body: String,
    /// `None`: held and never answered with a status the node could act on.
    status: Option<u16>,
}

impl Hit {
    fn events(&self) -> Vec<Value> {
        let v: Value = serde_json::from_str(&self.body).expect("webhook bodies are JSON");
        v["events"].as_array().cloned().unwrap_or_default()
    }
    fn delivered(&self) -> bool {
        self.status.is_some_and(|s| (200..300).contains(&s))
    }
}

struct Inner {
    hits: Vec<Hit>,
    /// Statuses to answer with first, in order; then `then`.
    script: VecDeque<u16>,
    then: u16,
}

#[derive(Clone)]
struct RxState {
    inner: Arc<Mutex<Inner>>,
    hold: watch::Receiver<bool>,
}

/// An HTTP receiver that records every request. While it holds, it answers nothing; on
/// release the held requests get a 503 (their node must still deliver them) and later ones
/// the script.
struct Receiver {
    inner: Arc<Mutex<Inner>>,
    hold: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

async fn record(State(st): State<RxState>, headers: HeaderMap, body: String) -> StatusCode {
    let id = headers.get(ID_HEADER).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let mut hold = st.hold.clone();
    if *hold.borrow() {
        st.inner.lock().unwrap().hits.push(Hit { id, body, status: None });
        let _ = hold.wait_for(|h| !*h).await;
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    let mut i = st.inner.lock().unwrap();
    let status = i.script.pop_front().unwrap_or(i.then);
    i.hits.push(Hit { id, body, status: Some(status) });
    StatusCode::from_u16(status).unwrap()
}

impl Receiver {
    async fn start_on(port: u16, script: &[u16], then: u16, hold: bool) -> Self {
        let inner = Arc::new(Mutex::new(Inner { hits: Vec::new(), script: script.iter().copied().collect(), then }));
        let (hold_tx, hold_rx) = watch::channel(hold);
        let app = axum::Router::new().fallback(record).with_state(RxState { inner: inner.clone(), hold: hold_rx });
        let listener = TcpListener::bind(("127.0.0.1", port)).await.expect("bind the receiver's port");
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { inner, hold: hold_tx, task }
    }

    fn release(&self) {
        self.hold.send_replace(false);
    }

    fn answer_from_now(&self, status: u16) {
        self.inner.lock().unwrap().then = status;
    }

    fn hits(&self) -> Vec<Hit> {
        self.inner.lock().unwrap().hits.clone()
    }

    /// The events of every request answered 2xx, as keys.
    fn delivered(&self) -> BTreeSet<Key> {
        self.hits().iter().filter(|h| h.delivered()).flat_map(|h| h.events()).map(|e| key(&e)).collect()
    }

    /// Waits (bounded) until every `expected` event was delivered; then nothing else may have
    /// been, and every request must be well identified.
    async fn wait_all(&self, expected: &BTreeSet<Key>, what: &str, nodes: &[&Process]) {
        let all = eventually(LONG, || {
            let done = self.delivered().is_superset(expected);
            async move { done }
        })
        .await;
        let got = self.delivered();
        let missing: Vec<_> = expected.difference(&got).collect();
        assert!(
            all,
            "{what}: {} of {} events never delivered: {missing:?}\n{} requests seen\n{}",
            missing.len(),
            expected.len(),
            self.hits().len(),
            logs(nodes)
        );
        let extra: Vec<_> = got.difference(expected).collect();
        assert!(extra.is_empty(), "{what}: events delivered that no one caused: {extra:?}");
        check_ids(&self.hits());
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An event as (name, channel, user id or client event name).
type Key = (String, String, String);

fn key(e: &Value) -> Key {
    let s = |k: &str| e[k].as_str().unwrap_or_default().to_owned();
    let third = if e["name"] == "client_event" { s("event") } else { s("user_id") };
    (s("name"), s("channel"), third)
}

fn k(name: &str, channel: &str, third: &str) -> Key {
    (name.to_owned(), channel.to_owned(), third.to_owned())
}

/// Every request has an id of 32 lowercase hex digits; a request seen more than once (a retry
/// or a redelivery) has the same id and the same body each time, and one id is one body.
fn check_ids(hits: &[Hit]) {
    let mut bodies: BTreeMap<&str, &str> = BTreeMap::new();
    let mut ids: BTreeMap<&str, &str> = BTreeMap::new();
    for h in hits {
        let id = h.id.as_deref().unwrap_or_else(|| panic!("a request without {ID_HEADER}: {h:?}"));
        assert!(
            id.len() == 32 && id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
            "{ID_HEADER} is not 32 lowercase hex digits: {id:?}"
        );
        let body = *bodies.entry(id).or_insert(&h.body);
        assert_eq!(body, h.body, "two bodies under one id {id}");
        let first = *ids.entry(&h.body).or_insert(id);
        assert_eq!(first, id, "one body under two ids: {}", h.body);
    }
}

// ---------------------------------------------------------------------------------------------
// Nodes

/// What a node's config file says.
struct NodeSpec<'a> {
    /// `webhooks.queue_driver`: `None` leaves it to the default (or to the environment).
    queue: Option<&'a str>,
    broker: Option<&'a DurableBroker>,
    prefix: &'a str,
    hook_url: String,
    event_types: &'a [&'a str],
    claim_idle_ms: Option<u64>,
}

/// Writes the node's config file (JSON) into a fresh folder; returns its path.
fn config_file(spec: &NodeSpec) -> PathBuf {
    let mut webhooks = json!({"batch_ms": 20, "timeout_ms": 3000});
    if let Some(q) = spec.queue {
        webhooks["queue_driver"] = json!(q);
    }
    if let Some(ms) = spec.claim_idle_ms {
        webhooks["claim_idle_ms"] = json!(ms);
    }
    let (redis_url, nats_url) = match spec.broker {
        Some(b) => (b.url().replace("nats://", "redis://"), b.url().replace("redis://", "nats://")),
        // Nothing listens here: a memory queue must not need a broker.
        None => {
            let p = free_port();
            (format!("redis://127.0.0.1:{p}"), format!("nats://127.0.0.1:{p}"))
        }
    };
    let app = |id: &str, key: &str, secret: &str, hooks: Value| {
        json!({
            "id": id, "key": key, "secret": secret, "enabled": true,
            "enable_client_messages": true, "enable_user_authentication": true,
            "enable_subscription_count": false, "max_client_events_per_second": 0,
            "webhooks": hooks
        })
    };
    let cfg = json!({
        // The adapter stays local: the queue alone uses the broker (and no node reports a dead
        // node's members, which would add events no test caused).
        "adapter": {
            "driver": "local",
            "redis": {"url": redis_url, "prefix": spec.prefix},
            "nats": {"servers": [nats_url], "prefix": spec.prefix}
        },
        "webhooks": webhooks,
        "app_manager": {"array": {"apps": [
            app(APP_ID, KEY, SECRET, json!([{"url": spec.hook_url, "event_types": spec.event_types}])),
            app("other-id", "other-key", "other-secret", json!([]))
        ]}}
    });
    let dir = std::env::temp_dir().join(format!("sockudo-dw-{}-{}", std::process::id(), fastrand::u64(..)));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("node.json");
    std::fs::write(&file, serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
    file
}

async fn node(file: &std::path::Path, env: &[(&str, String)]) -> Process {
    Process::start_with_args(&["--config", &file.to_string_lossy()], env).await
}

fn prefix() -> String {
    format!("dw-{:08x}", fastrand::u32(..))
}

/// JetStream's name for a prefix: uppercased, every non-alphanumeric as `_`.
fn js_name(prefix: &str, suffix: &str) -> String {
    let p: String =
        prefix.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_uppercase() } else { '_' }).collect();
    format!("{p}_{suffix}")
}

async fn scrape(p: &Process) -> String {
    let url = format!("http://127.0.0.1:{}/metrics", p.metrics_port);
    match tokio::time::timeout(WAIT, reqwest::get(url)).await {
        Ok(Ok(r)) => r.text().await.unwrap_or_default(),
        _ => String::new(),
    }
}

async fn webhooks_total(p: &Process, outcome: &str) -> f64 {
    sample(&scrape(p).await, "sockudo_webhooks_total", &[("app_id", APP_ID), ("outcome", outcome)]).unwrap_or(0.0)
}

async fn queue_events(p: &Process) -> Option<f64> {
    sample(&scrape(p).await, "sockudo_webhook_queue_events", &[("app_id", APP_ID)])
}

async fn wait_total(p: &Process, outcome: &str, at_least: f64) {
    let ok = eventually(LONG, || async { webhooks_total(p, outcome).await >= at_least }).await;
    assert!(
        ok,
        "sockudo_webhooks_total{{outcome={outcome}}} never reached {at_least} (is {})\n{}",
        webhooks_total(p, outcome).await,
        logs(&[p])
    );
}

/// The last lines each node wrote, for failure messages.
fn logs(nodes: &[&Process]) -> String {
    nodes
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let lines = p.lines.lock().unwrap();
            let tail = lines.iter().rev().take(25).rev().cloned().collect::<Vec<_>>().join("\n");
            format!("--- node {i} (port {}) ---\n{tail}", p.port)
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// `GET /up` of a node: status and body.
async fn up(p: &Process) -> (u16, String) {
    let url = format!("http://127.0.0.1:{}/up", p.port);
    match tokio::time::timeout(WAIT, reqwest::get(url)).await {
        Ok(Ok(r)) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
        _ => (0, String::new()),
    }
}

// ---------------------------------------------------------------------------------------------
// Producing events and finding them in the broker

/// Causes `10 * groups + 2` distinct webhook events of every kind on the node at `port`, with
/// channel names under `tag`; returns them. Each client is closed only after the server has
/// answered its close, so every event has happened when this returns.
async fn produce(port: u16, tag: &str, groups: usize) -> BTreeSet<Key> {
    let url = format!("ws://127.0.0.1:{port}/app/{KEY}?protocol=7");
    let mut expected = BTreeSet::new();
    let chat = format!("private-{tag}-chat");
    let mut talker = Client::connect(&url).await;
    let mut listener = Client::connect(&url).await;
    talker.subscribe_private(&chat).await;
    listener.subscribe_private(&chat).await;
    expected.insert(k("channel_occupied", &chat, ""));
    for i in 0..groups {
        let event = format!("client-{tag}-{i}");
        talker.send(json!({"event": event, "channel": chat, "data": {"i": i}})).await;
        listener.expect(&event).await;
        expected.insert(k("client_event", &chat, &event));

        let mut c = Client::connect(&url).await;
        let (public, presence, cache) =
            (format!("{tag}-public-{i}"), format!("presence-{tag}-{i}"), format!("cache-{tag}-{i}"));
        let user = format!("{tag}-user-{i}");
        c.subscribe(&public).await;
        c.subscribe_presence(&presence, &user).await;
        c.subscribe(&cache).await;
        c.expect("pusher:cache_miss").await;
        for ch in [&public, &presence, &cache] {
            c.send(json!({"event": "pusher:unsubscribe", "data": {"channel": ch}})).await;
        }
        c.close().await;
        for ch in [&public, &presence, &cache] {
            expected.insert(k("channel_occupied", ch, ""));
            expected.insert(k("channel_vacated", ch, ""));
        }
        expected.insert(k("member_added", &presence, &user));
        expected.insert(k("member_removed", &presence, &user));
        expected.insert(k("cache_miss", &cache, ""));
    }
    talker.close().await;
    listener.close().await;
    expected.insert(k("channel_vacated", &chat, ""));
    assert_eq!(expected.len(), 10 * groups + 2);
    expected
}

/// Counts the events in a stored entry: the `events` arrays of the request body, wherever the
/// entry keeps it (the whole payload, a field of it, or a JSON string inside it).
fn events_in(v: &Value) -> usize {
    match v {
        Value::Object(m) => match m.get("events") {
            Some(Value::Array(a)) => a.len(),
            _ => m.values().map(events_in).sum(),
        },
        Value::Array(a) => a.iter().map(events_in).sum(),
        Value::String(s) => serde_json::from_str::<Value>(s).map(|v| events_in(&v)).unwrap_or(0),
        _ => 0,
    }
}

/// Events of the default app the broker holds, not yet acknowledged: Redis's depth hash, or
/// for NATS the events in the queue stream's messages (the tests that call this acknowledge
/// nothing before they count).
async fn events_in_broker(broker: &DurableBroker, prefix: &str) -> usize {
    match broker.kind {
        Kind::Redis => {
            let depth: Option<Option<i64>> =
                broker.redis(redis::cmd("HGET").arg(format!("{{{prefix}:webhooks}}:depth")).arg(APP_ID).clone()).await;
            depth.flatten().unwrap_or(0).max(0) as usize
        }
        Kind::Nats => broker
            .stream_payloads(&js_name(prefix, "WEBHOOKS"))
            .await
            .iter()
            .map(|p| serde_json::from_slice::<Value>(p).map(|v| events_in(&v)).unwrap_or(0))
            .sum(),
    }
}

/// Waits (bounded) until the broker holds `n` events, polling it at a pace a loaded machine
/// can take.
async fn wait_in_broker(broker: &DurableBroker, prefix: &str, n: usize, nodes: &[&Process]) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut last = 0;
    while tokio::time::Instant::now() < deadline {
        last = events_in_broker(broker, prefix).await;
        if last >= n {
            assert_eq!(last, n, "the broker holds more events than were caused");
            return;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let detail = match broker.kind {
        Kind::Redis => {
            let xlen: Option<i64> =
                broker.redis(redis::cmd("XLEN").arg(format!("{{{prefix}:webhooks}}:queue")).clone()).await;
            format!("XLEN queue = {xlen:?}")
        }
        Kind::Nats => {
            let stream = js_name(prefix, "WEBHOOKS");
            let first = broker.stream_payloads(&stream).await.first().map(|p| String::from_utf8_lossy(p).into_owned());
            format!("stream info {:?}\nfirst payload {first:?}", broker.stream_info(&stream).await)
        }
    };
    panic!("the broker holds {last} of {n} events after 30 s; {detail}\n{}", logs(nodes));
}

/// Entries in the dead-letter stream.
async fn dead_letters(broker: &DurableBroker, prefix: &str) -> Option<u64> {
    match broker.kind {
        Kind::Redis => {
            let n: Option<i64> =
                broker.redis(redis::cmd("XLEN").arg(format!("{{{prefix}:webhooks}}:dead")).clone()).await;
            n.map(|n| n as u64)
        }
        Kind::Nats => broker.stream_info(&js_name(prefix, "WEBHOOKS_DEAD")).await?["state"]["messages"].as_u64(),
    }
}

// ---------------------------------------------------------------------------------------------
// 1. A node SIGKILLed with everything in the broker: a new node delivers it all.

async fn a_killed_nodes_events_are_delivered_by_a_new_node(kind: Kind) {
    let broker = DurableBroker::start(kind).await;
    let prefix = prefix();
    // Nothing listens on the receiver's port until the node is dead.
    let rx_port = free_port();
    let file = config_file(&NodeSpec {
        queue: Some(kind.name()),
        broker: Some(&broker),
        prefix: &prefix,
        hook_url: format!("http://127.0.0.1:{rx_port}/hook"),
        event_types: &KINDS,
        claim_idle_ms: Some(CLAIM_IDLE_MS),
    });
    let a = node(&file, &[]).await;
    let expected = produce(a.port, "killed", 10).await;
    assert!(expected.len() >= 100);
    wait_in_broker(&broker, &prefix, expected.len(), &[&a]).await;
    // The gauge counts what the broker holds unacknowledged (refreshed about every second): its
    // events on Redis, its requests on NATS (JetStream counts messages; README "Durable webhooks").
    let n = match kind {
        Kind::Redis => expected.len() as f64,
        Kind::Nats => broker.stream_payloads(&js_name(&prefix, "WEBHOOKS")).await.len() as f64,
    };
    let gauged = eventually(Duration::from_secs(15), || async { queue_events(&a).await == Some(n) }).await;
    assert!(gauged, "sockudo_webhook_queue_events is {:?}, not {n}", queue_events(&a).await);
    a.kill().await;

    let rx = Receiver::start_on(rx_port, &[], 200, false).await;
    let b = node(&file, &[]).await;
    rx.wait_all(&expected, kind.name(), &[&b]).await;
    let drained = eventually(Duration::from_secs(15), || async { queue_events(&b).await == Some(0.0) }).await;
    assert!(drained, "the queue gauge did not fall to 0: {:?}", queue_events(&b).await);
}

#[tokio::test]
async fn redis_killed_node_loses_nothing() {
    a_killed_nodes_events_are_delivered_by_a_new_node(Kind::Redis).await;
}

#[tokio::test]
async fn nats_killed_node_loses_nothing() {
    a_killed_nodes_events_are_delivered_by_a_new_node(Kind::Nats).await;
}

// ---------------------------------------------------------------------------------------------
// 2. Two nodes on one queue: the one delivering dies mid-request; the other claims its entries.

async fn a_peer_claims_a_dead_nodes_entries(kind: Kind) {
    let broker = DurableBroker::start(kind).await;
    let prefix = prefix();
    let rx_port = free_port();
    let rx = Receiver::start_on(rx_port, &[], 200, true).await;
    // The driver and claim time from the environment, as an operator would set them.
    let file = config_file(&NodeSpec {
        queue: None,
        broker: Some(&broker),
        prefix: &prefix,
        hook_url: format!("http://127.0.0.1:{rx_port}/hook"),
        event_types: &KINDS,
        claim_idle_ms: None,
    });
    let env = [("WEBHOOK_QUEUE_DRIVER", kind.name().to_owned()), ("WEBHOOKS_CLAIM_IDLE_MS", CLAIM_IDLE_MS.to_string())];
    // A alone runs while the events happen, so A alone holds them.
    let a = node(&file, &env).await;
    let expected = produce(a.port, "claimed", 3).await;
    wait_in_broker(&broker, &prefix, expected.len(), &[&a]).await;
    let held = eventually(LONG, || {
        let n = rx.hits().len();
        async move { n >= 1 }
    })
    .await;
    assert!(held, "node A never sent a request\n{}", logs(&[&a]));
    let b = node(&file, &env).await;
    a.kill().await;
    rx.release();
    rx.wait_all(&expected, kind.name(), &[&b]).await;
    assert!(rx.hits().iter().any(|h| h.status.is_none()), "a request was held");
    wait_total(&b, "delivered", 1.0).await;
}

#[tokio::test]
async fn redis_peer_claims_a_dead_nodes_entries() {
    a_peer_claims_a_dead_nodes_entries(Kind::Redis).await;
}

#[tokio::test]
async fn nats_peer_claims_a_dead_nodes_entries() {
    a_peer_claims_a_dead_nodes_entries(Kind::Nats).await;
}

// ---------------------------------------------------------------------------------------------
// 3. and 6. Retries keep the request's id (durable and memory queues).

/// One request answered 500 three times, then 200; then a second request. Returns the hits.
async fn retries_keep_the_id(node: &Process, rx: &Receiver) {
    let mut c = node.client().await;
    c.subscribe("retried-channel").await;
    wait_total(node, "delivered", 1.0).await;
    // A later request marks the point by which a redelivery of the first would have arrived.
    c.subscribe("marker-channel").await;
    wait_total(node, "delivered", 2.0).await;
    let hits = rx.hits();
    check_ids(&hits);
    let first: Vec<&Hit> = hits.iter().filter(|h| h.id == hits[0].id).collect();
    assert_eq!(
        first.iter().map(|h| h.status).collect::<Vec<_>>(),
        vec![Some(500), Some(500), Some(500), Some(200)],
        "{hits:#?}"
    );
    assert_eq!(first[0].events(), vec![json!({"name": "channel_occupied", "channel": "retried-channel"})]);
    let others: Vec<&Hit> = hits.iter().filter(|h| h.id != hits[0].id).collect();
    assert_eq!(others.len(), 1, "the marker is one request with its own id: {hits:#?}");
    assert_eq!(others[0].events(), vec![json!({"name": "channel_occupied", "channel": "marker-channel"})]);
    assert_eq!(webhooks_total(node, "retried").await, 3.0);
    assert_eq!(webhooks_total(node, "delivered").await, 2.0);
    assert_eq!(webhooks_total(node, "failed").await, 0.0);
    c.close().await;
}

async fn durable_retries_keep_the_id(kind: Kind) {
    let broker = DurableBroker::start(kind).await;
    let prefix = prefix();
    let rx_port = free_port();
    let rx = Receiver::start_on(rx_port, &[500, 500, 500], 200, false).await;
    let file = config_file(&NodeSpec {
        queue: Some(kind.name()),
        broker: Some(&broker),
        prefix: &prefix,
        hook_url: format!("http://127.0.0.1:{rx_port}/hook"),
        event_types: &["channel_occupied"],
        // The default: no claim can race the retries.
        claim_idle_ms: None,
    });
    let n = node(&file, &[]).await;
    retries_keep_the_id(&n, &rx).await;
}

#[tokio::test]
async fn redis_retries_keep_the_id() {
    durable_retries_keep_the_id(Kind::Redis).await;
}

#[tokio::test]
async fn nats_retries_keep_the_id() {
    durable_retries_keep_the_id(Kind::Nats).await;
}

#[tokio::test]
async fn memory_queue_requests_carry_a_stable_id() {
    // Set explicitly from the environment, then left to its default (a local adapter: memory).
    for env in [vec![("WEBHOOK_QUEUE_DRIVER", "memory".to_owned())], vec![]] {
        let rx_port = free_port();
        let rx = Receiver::start_on(rx_port, &[500, 500, 500], 200, false).await;
        let file = config_file(&NodeSpec {
            queue: None,
            broker: None,
            prefix: &prefix(),
            hook_url: format!("http://127.0.0.1:{rx_port}/hook"),
            event_types: &["channel_occupied"],
            claim_idle_ms: None,
        });
        let n = node(&file, &env).await;
        retries_keep_the_id(&n, &rx).await;
    }
}

// ---------------------------------------------------------------------------------------------
// 4. The broker restarted while events keep coming: nothing lost.

async fn a_broker_restart_loses_nothing(kind: Kind) {
    let mut broker = DurableBroker::start(kind).await;
    let prefix = prefix();
    let rx_port = free_port();
    let rx = Receiver::start_on(rx_port, &[], 200, false).await;
    let file = config_file(&NodeSpec {
        queue: Some(kind.name()),
        broker: Some(&broker),
        prefix: &prefix,
        hook_url: format!("http://127.0.0.1:{rx_port}/hook"),
        event_types: &KINDS,
        claim_idle_ms: Some(CLAIM_IDLE_MS),
    });
    let n = node(&file, &[]).await;
    assert_eq!(up(&n).await.0, 200);
    let mut expected = produce(n.port, "before", 3).await;

    broker.kill().await;
    let unready =
        eventually(Duration::from_secs(20), || async { up(&n).await == (503, "WEBHOOK QUEUE UNAVAILABLE".into()) })
            .await;
    assert!(unready, "/up while the queue's broker is away: {:?}\n{}", up(&n).await, logs(&[&n]));
    expected.extend(produce(n.port, "during", 3).await);

    broker.restart().await;
    let ready = eventually(Duration::from_secs(30), || async { up(&n).await.0 == 200 }).await;
    assert!(ready, "/up after the broker came back: {:?}\n{}", up(&n).await, logs(&[&n]));
    expected.extend(produce(n.port, "after", 3).await);
    rx.wait_all(&expected, kind.name(), &[&n]).await;
}

#[tokio::test]
async fn redis_restart_loses_no_webhook() {
    a_broker_restart_loses_nothing(Kind::Redis).await;
}

#[tokio::test]
async fn nats_restart_loses_no_webhook() {
    a_broker_restart_loses_nothing(Kind::Nats).await;
}

// ---------------------------------------------------------------------------------------------
// 5. A refused request is a dead letter; `sockudo webhooks replay` sends it again.

/// `sockudo webhooks replay --config FILE --app APP`: exit code, stdout, stderr.
async fn replay(file: &std::path::Path, app: &str) -> (Option<i32>, String, String) {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_sockudo"));
    cmd.args(["webhooks", "replay", "--config", &file.to_string_lossy(), "--app", app])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default());
    let out = tokio::time::timeout(Duration::from_secs(30), cmd.output()).await.expect("replay exits in time").unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The `replayed` count of the replay command's JSON line.
fn replayed(stdout: &str) -> Option<u64> {
    stdout.lines().rev().find_map(|l| serde_json::from_str::<Value>(l.trim()).ok()?["replayed"].as_u64())
}

async fn refused_requests_are_dead_letters_until_replayed(kind: Kind) {
    let broker = DurableBroker::start(kind).await;
    let prefix = prefix();
    let rx_port = free_port();
    let rx = Receiver::start_on(rx_port, &[], 400, false).await;
    let file = config_file(&NodeSpec {
        queue: Some(kind.name()),
        broker: Some(&broker),
        prefix: &prefix,
        hook_url: format!("http://127.0.0.1:{rx_port}/hook"),
        event_types: &["channel_occupied"],
        claim_idle_ms: Some(CLAIM_IDLE_MS),
    });
    let n = node(&file, &[]).await;
    let mut c = n.client().await;
    c.subscribe("refused-channel").await;
    wait_total(&n, "failed", 1.0).await;
    let refused = rx.hits();
    assert_eq!(refused.len(), 1, "a 400 is final: {refused:#?}");
    assert_eq!(refused[0].events(), vec![json!({"name": "channel_occupied", "channel": "refused-channel"})]);
    let id = refused[0].id.clone().expect("the refused request has an id");
    let dead = eventually(Duration::from_secs(15), || async { dead_letters(&broker, &prefix).await >= Some(1) }).await;
    assert!(dead, "no dead letter: {:?}\n{}", dead_letters(&broker, &prefix).await, logs(&[&n]));
    assert_eq!(webhooks_total(&n, "delivered").await, 0.0);

    rx.answer_from_now(200);
    // Another app's dead letters: none.
    let (code, out, err) = replay(&file, "other-id").await;
    assert_eq!(code, Some(0), "replay --app other-id: {out}\n{err}");
    assert_eq!(replayed(&out), Some(0), "replay --app other-id printed {out:?}\n{err}");
    assert!(dead_letters(&broker, &prefix).await >= Some(1), "replaying another app moved this one's");

    let (code, out, err) = replay(&file, APP_ID).await;
    assert_eq!(code, Some(0), "replay: {out}\n{err}");
    let count = replayed(&out);
    assert!(count >= Some(1), "replay printed {out:?} (stderr {err})");
    let again = eventually(LONG, || {
        let ok = rx.hits().iter().any(|h| h.delivered() && h.id.as_deref() == Some(&id));
        async move { ok }
    })
    .await;
    assert!(again, "the replayed request never arrived with id {id}: {:#?}\n{}", rx.hits(), logs(&[&n]));
    check_ids(&rx.hits());
    wait_total(&n, "delivered", 1.0).await;
    // Moved, not copied.
    let moved = eventually(Duration::from_secs(15), || async { dead_letters(&broker, &prefix).await == Some(0) }).await;
    assert!(moved, "dead letters after replay: {:?}", dead_letters(&broker, &prefix).await);
    c.close().await;
}

#[tokio::test]
async fn redis_dead_letters_replay() {
    refused_requests_are_dead_letters_until_replayed(Kind::Redis).await;
}

#[tokio::test]
async fn nats_dead_letters_replay() {
    refused_requests_are_dead_letters_until_replayed(Kind::Nats).await;
}
