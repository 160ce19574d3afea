//! Signed cluster envelopes (`adapter.cluster_secret`) against forgeries published straight to
//! the broker topic, as anyone who can reach Redis or NATS could. Each scenario is written once
//! over a [`Bus`] and run for both brokers (the machine's, under a unique prefix per test). The
//! test seals its own envelopes with HMAC-SHA256, written here independently of the server's
//! `Signer`, so that a correctly signed one being delivered proves the negatives meaningful.

use std::pin::Pin;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;
use sockudo::config::AdapterDriver;

use crate::support::*;

#[derive(Clone, Copy)]
enum Bus {
    Redis,
    Nats,
}

type Tap = Pin<Box<dyn Stream<Item = Bytes> + Send>>;

impl Bus {
    fn name(self) -> &'static str {
        match self {
            Bus::Redis => "redis",
            Bus::Nats => "nats",
        }
    }

    fn prefix(self) -> String {
        format!("it-sign-{}-{}", std::process::id(), fastrand::u64(..))
    }

    /// A node on `prefix`, signing with `secret` (`None`: trusting the broker).
    async fn node(self, prefix: &str, secret: Option<&str>) -> TestServer {
        let (prefix, secret) = (prefix.to_owned(), secret.map(str::to_owned));
        TestServer::start_with(move |c| {
            c.adapter.request_timeout_ms = 500;
            c.adapter.node_timeout_ms = 2000;
            c.adapter.cluster_secret = secret;
            match self {
                Bus::Redis => {
                    c.adapter.driver = AdapterDriver::Redis;
                    c.adapter.redis.url = "redis://127.0.0.1:6379".into();
                    c.adapter.redis.prefix = prefix;
                }
                Bus::Nats => {
                    c.adapter.driver = AdapterDriver::Nats;
                    c.adapter.nats.servers = vec!["nats://127.0.0.1:4222".into()];
                    c.adapter.nats.prefix = prefix;
                }
            }
        })
        .await
    }

    /// Publishes raw bytes on the cluster topic of `prefix`, as an outsider on the broker.
    async fn inject(self, prefix: &str, payload: &[u8]) {
        match self {
            Bus::Redis => {
                let client = redis::Client::open("redis://127.0.0.1:6379").unwrap();
                let mut conn = tokio::time::timeout(WAIT, client.get_multiplexed_async_connection())
                    .await
                    .expect("redis connects in time")
                    .unwrap();
                let receivers: i64 = redis::cmd("PUBLISH")
                    .arg(format!("{prefix}#cluster"))
                    .arg(payload)
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                assert!(receivers >= 1, "nobody subscribed to {prefix}#cluster");
            }
            Bus::Nats => {
                let client =
                    tokio::time::timeout(WAIT, async_nats::connect("nats://127.0.0.1:4222")).await.unwrap().unwrap();
                client.publish(format!("{prefix}.cluster"), Bytes::copy_from_slice(payload)).await.unwrap();
                client.flush().await.unwrap();
            }
        }
    }

    /// Everything published on the cluster topic of `prefix` from now on.
    async fn tap(self, prefix: &str) -> Tap {
        match self {
            Bus::Redis => {
                let client = redis::Client::open("redis://127.0.0.1:6379").unwrap();
                let mut ps = client.get_async_pubsub().await.unwrap();
                ps.subscribe(format!("{prefix}#cluster")).await.unwrap();
                Box::pin(ps.into_on_message().map(|m| Bytes::copy_from_slice(m.get_payload_bytes())))
            }
            Bus::Nats => {
                let client = async_nats::connect("nats://127.0.0.1:4222").await.unwrap();
                let sub = client.subscribe(format!("{prefix}.cluster")).await.unwrap();
                client.flush().await.unwrap();
                // The subscriber keeps its client alive.
                Box::pin(sub.map(|m| m.payload))
            }
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

/// `s1 <hex HMAC-SHA256> <unix ms> <node>\n<envelope>`, the MAC over the cluster's scope
/// (`sockudo-cluster/{prefix}\n`), `s1 ` and everything after the MAC's trailing space (the
/// format `docs/ARCHITECTURE.md` describes).
fn seal_for(prefix: &str, secret: &str, node: &str, ts_ms: u64, envelope: &[u8]) -> Vec<u8> {
    let signed = [format!("{ts_ms} {node}\n").as_bytes(), envelope].concat();
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("sockudo-cluster/{prefix}\n").as_bytes());
    mac.update(b"s1 ");
    mac.update(&signed);
    let tag = hex::encode(mac.finalize().into_bytes());
    [format!("s1 {tag} ").as_bytes(), &signed].concat()
}

/// An unsigned envelope as nodes without a secret send them: header JSON, `\n`, body.
fn envelope(header: Value, body: &str) -> Vec<u8> {
    format!("{header}\n{body}").into_bytes()
}

/// A `broadcast` envelope of a frame for `channel` of the test app.
fn broadcast(sender: &str, channel: &str, event: &str) -> Vec<u8> {
    let frame = json!({"event": event, "channel": channel, "data": "x"}).to_string();
    envelope(json!({"t": "broadcast", "n": sender, "a": APP_ID, "c": channel, "o": 0, "e": event}), &frame)
}

/// The sender of the next sealed envelope on `tap` that is not from one of `known`.
async fn next_sender(tap: &mut Tap, known: &[String]) -> String {
    let found = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(payload) = tap.next().await {
            let text = String::from_utf8_lossy(&payload).into_owned();
            let line = text.split('\n').next().unwrap_or_default();
            let fields: Vec<&str> = line.split(' ').collect();
            assert_eq!(fields[0], "s1", "a signed node sends sealed envelopes only: {line}");
            let node = fields[3].to_owned();
            if !known.contains(&node) {
                return node;
            }
        }
        panic!("the tap ended");
    })
    .await;
    found.expect("a node's envelope on the topic within 10 s")
}

async fn nodes_seen(node: &TestServer, bus: Bus) -> Option<f64> {
    node.metric("sockudo_horizontal_adapter_nodes", &[("adapter", bus.name())]).await
}

async fn dropped(node: &TestServer, reason: &str) -> f64 {
    let labels = [("direction", "in"), ("reason", reason)];
    node.metric("sockudo_horizontal_adapter_dropped_total", &labels).await.expect("the dropped series exists")
}

/// Waits until `node` has counted `want` unauthenticated envelopes in all.
async fn wait_unauthenticated(node: &TestServer, want: f64) {
    let reached = eventually(WAIT, || async { dropped(node, "unauthenticated").await >= want }).await;
    let counted = dropped(node, "unauthenticated").await;
    assert!(reached, "unauthenticated stayed at {counted}, expected {want}");
    assert_eq!(counted, want, "exactly the envelopes sent are counted");
}

/// Two signed nodes (with their ids read off the broker, as an eavesdropper would), a client on
/// node 0 signed in as `u7`, subscribed to `news`, its user channel and a presence channel that
/// a client on node 1 shares.
struct Scene {
    bus: Bus,
    prefix: String,
    nodes: Vec<TestServer>,
    ids: Vec<String>,
    a: Client,
    _b: Client,
}

async fn scene(bus: Bus) -> Scene {
    let prefix = bus.prefix();
    let mut tap = bus.tap(&prefix).await;
    let first = bus.node(&prefix, Some(CLUSTER_SECRET)).await;
    let id0 = next_sender(&mut tap, &[]).await;
    let second = bus.node(&prefix, Some(CLUSTER_SECRET)).await;
    let id1 = next_sender(&mut tap, std::slice::from_ref(&id0)).await;
    let nodes = vec![first, second];
    for node in &nodes {
        let met = eventually(Duration::from_secs(10), || async { nodes_seen(node, bus).await == Some(2.0) }).await;
        assert!(met, "{}: the signed nodes did not find each other", bus.name());
        assert_eq!(dropped(node, "unauthenticated").await, 0.0, "a correctly configured cluster rejects nothing");
    }
    let mut a = nodes[0].client().await;
    let user_data = json!({"id": "u7"}).to_string();
    let sig = sockudo::auth::sign(SECRET, &format!("{}::user::{user_data}", a.socket_id));
    a.send(json!({"event": "pusher:signin", "data": {"auth": format!("{KEY}:{sig}"), "user_data": user_data}})).await;
    a.expect("pusher:signin_success").await;
    a.subscribe("#server-to-user-u7").await;
    a.subscribe("news").await;
    a.subscribe_presence("presence-room", "alice").await;
    let mut b = nodes[1].client().await;
    b.subscribe_presence("presence-room", "bob").await;
    assert_eq!(data(&a.expect("pusher_internal:member_added").await)["user_id"], "bob");
    Scene { bus, prefix, nodes, ids: vec![id0, id1], a, _b: b }
}

impl Scene {
    /// A genuine broadcast through node 1's API reaches `a` as its very next frame: nothing
    /// injected before it got through.
    async fn control(&mut self, marker: &str) {
        assert_eq!(self.nodes[1].publish("news", marker, "genuine").await.0, 200);
        let next = self.a.next().await;
        assert_eq!(next["event"], marker, "the client's next frame is the genuine one, not {next}");
    }

    /// The presence members node 0 lists, sorted.
    async fn members(&self) -> Vec<String> {
        let (status, users) = self.nodes[0].api("GET", "/channels/presence-room/users", &[], None).await;
        assert_eq!(status, 200);
        let mut ids: Vec<String> =
            users["users"].as_array().unwrap().iter().map(|u| u["id"].as_str().unwrap().to_owned()).collect();
        ids.sort();
        ids
    }
}

async fn forged_envelopes_are_ignored_and_counted(bus: Bus) {
    let mut s = scene(bus).await;
    let id1 = s.ids[1].clone();
    let forgeries: Vec<Vec<u8>> = vec![
        broadcast("forger", "news", "forged"),
        broadcast(&id1, "#server-to-user-u7", "forged-direct"),
        envelope(json!({"t": "terminate", "n": id1, "a": APP_ID, "u": "u7"}), ""),
        envelope(json!({"t": "part", "n": id1, "a": APP_ID, "c": "presence-room", "u": "bob"}), ""),
        envelope(json!({"t": "join", "n": id1, "a": APP_ID, "c": "presence-room", "u": "mallory", "i": "{}"}), ""),
        envelope(json!({"t": "snapshot", "n": id1, "members": []}), ""),
        envelope(json!({"t": "leave", "n": id1}), ""),
        // Sealed with another secret.
        // Sealed with another secret (not in node 1's name: a node skips, uncounted, what
        // claims to come from itself, so each node would count one less).
        seal_for(&s.prefix, "not-the-cluster-secret", "forger", now_ms(), &broadcast("forger", "news", "forged-key")),
        // Sealed correctly by a holder of the secret, but speaking for another node.
        seal_for(&s.prefix, CLUSTER_SECRET, "insider", now_ms(), &envelope(json!({"t": "leave", "n": id1}), "")),
        // Sealed correctly for another cluster sharing the broker and the secret: not a replay
        // that this cluster accepts.
        seal_for("another-cluster", CLUSTER_SECRET, "forger", now_ms(), &broadcast("forger", "news", "neighbour")),
    ];
    for f in &forgeries {
        s.bus.inject(&s.prefix, f).await;
    }
    for node in &s.nodes {
        wait_unauthenticated(node, forgeries.len() as f64).await;
    }
    s.control("control-1").await;
    assert_eq!(s.members().await, ["alice", "bob"], "presence unchanged: bob not erased, mallory not added");
    assert_eq!(nodes_seen(&s.nodes[0], bus).await, Some(2.0), "node 1 was not made to leave");
    assert_eq!(dropped(&s.nodes[0], "decode").await, 0.0);

    // Positive control: the same kind of envelope, sealed correctly, is delivered.
    let genuine = seal_for(&s.prefix, CLUSTER_SECRET, &id1, now_ms(), &broadcast(&id1, "news", "sealed-by-test"));
    s.bus.inject(&s.prefix, &genuine).await;
    assert_eq!(s.a.next().await["event"], "sealed-by-test");
    let direct =
        seal_for(&s.prefix, CLUSTER_SECRET, &id1, now_ms(), &broadcast(&id1, "#server-to-user-u7", "direct-by-test"));
    s.bus.inject(&s.prefix, &direct).await;
    assert_eq!(s.a.next().await["event"], "direct-by-test");
    // The same envelope 31 s old, or 31 s ahead, is outside the replay window.
    for skew in [-31_000i64, 31_000] {
        let ts = now_ms().checked_add_signed(skew).unwrap();
        s.bus
            .inject(&s.prefix, &seal_for(&s.prefix, CLUSTER_SECRET, &id1, ts, &broadcast(&id1, "news", "stale")))
            .await;
    }
    wait_unauthenticated(&s.nodes[0], forgeries.len() as f64 + 2.0).await;
    s.control("control-2").await;
    // Node 1 skipped them before verifying, uncounted: they claim to be its own envelopes.
    assert_eq!(dropped(&s.nodes[1], "unauthenticated").await, forgeries.len() as f64);
    assert_eq!(s.members().await, ["alice", "bob"]);
    for node in s.nodes {
        node.stop().await;
    }
}

async fn a_node_with_another_secret_stays_out(bus: Bus) {
    let s = scene(bus).await;
    let stranger = bus.node(&s.prefix, Some("a-different-cluster-secret")).await;
    // Two of its heartbeats (a second apart) rejected by each member: had either been
    // accepted, that node's gauge would have counted the stranger on receipt.
    for node in &s.nodes {
        let rejected =
            eventually(Duration::from_secs(10), || async { dropped(node, "unauthenticated").await >= 2.0 }).await;
        assert!(rejected, "the stranger's envelopes were not rejected");
        assert_eq!(nodes_seen(node, bus).await, Some(2.0), "the stranger joined the cluster's view");
    }
    let rejects = eventually(WAIT, || async { dropped(&stranger, "unauthenticated").await >= 2.0 }).await;
    assert!(rejects, "and the stranger rejects the cluster's");
    assert_eq!(nodes_seen(&stranger, bus).await, Some(1.0));
    stranger.stop().await;
    for node in s.nodes {
        node.stop().await;
    }
}

/// Without a secret the unsigned format still works; what is not an envelope is `decode`.
async fn an_unsigned_cluster_still_works(bus: Bus) {
    let prefix = bus.prefix();
    let nodes = vec![bus.node(&prefix, None).await, bus.node(&prefix, None).await];
    for node in &nodes {
        let met = eventually(Duration::from_secs(10), || async { nodes_seen(node, bus).await == Some(2.0) }).await;
        assert!(met, "{}: unsigned nodes did not find each other", bus.name());
    }
    let mut a = nodes[0].client().await;
    a.subscribe("news").await;
    assert_eq!(nodes[1].publish("news", "across", "1").await.0, 200);
    assert_eq!(a.next().await["event"], "across");
    bus.inject(&prefix, b"not an envelope").await;
    // A sealed envelope cannot be verified here: refused, not trusted.
    bus.inject(&prefix, &seal_for(&prefix, CLUSTER_SECRET, "sealed", now_ms(), &broadcast("sealed", "news", "sealed")))
        .await;
    let counted = eventually(WAIT, || async {
        dropped(&nodes[0], "decode").await == 1.0 && dropped(&nodes[0], "unauthenticated").await == 1.0
    })
    .await;
    assert!(counted, "garbage is in/decode and a sealed envelope in/unauthenticated on an unsigned node");
    assert_eq!(nodes[1].publish("news", "after", "2").await.0, 200);
    assert_eq!(a.next().await["event"], "after", "the sealed broadcast was not delivered");
    for node in nodes {
        node.stop().await;
    }
}

#[tokio::test]
async fn redis_forged_envelopes_are_ignored() {
    forged_envelopes_are_ignored_and_counted(Bus::Redis).await;
}

#[tokio::test]
async fn nats_forged_envelopes_are_ignored() {
    forged_envelopes_are_ignored_and_counted(Bus::Nats).await;
}

#[tokio::test]
async fn redis_other_secret_stays_out() {
    a_node_with_another_secret_stays_out(Bus::Redis).await;
}

#[tokio::test]
async fn nats_other_secret_stays_out() {
    a_node_with_another_secret_stays_out(Bus::Nats).await;
}

#[tokio::test]
async fn redis_unsigned_cluster_still_works() {
    an_unsigned_cluster_still_works(Bus::Redis).await;
}

#[tokio::test]
async fn nats_unsigned_cluster_still_works() {
    an_unsigned_cluster_still_works(Bus::Nats).await;
}
