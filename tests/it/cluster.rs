//! Many nodes behaving as one server. Each scenario is written once over a [`Broker`] and run
//! for Redis and for NATS (the brokers the machine runs, with a unique prefix per test so tests
//! do not hear each other), with real clients on different nodes. Fault tests start their own
//! `redis-server` / `nats-server` on free ports and kill and restart them mid-test.

use std::process::Stdio;
use std::time::Duration;

use serde_json::json;
use sockudo::config::AdapterDriver;

use crate::support::process::free_port;
use crate::support::*;

#[derive(Clone)]
pub enum Broker {
    Redis(String),
    Nats(String),
    /// Redis with a whole `adapter.redis` section: TLS and ACL, Sentinel, or Cluster
    /// (`secure_links.rs`); the prefix is set per test.
    RedisWith(Box<sockudo::config::RedisConfig>),
    /// NATS with a whole `adapter.nats` section: TLS and credentials (`secure_links.rs`).
    NatsWith(Box<sockudo::config::NatsConfig>),
}

impl Broker {
    pub(crate) fn redis() -> Self {
        Broker::Redis("redis://127.0.0.1:6379".into())
    }
    pub(crate) fn nats() -> Self {
        Broker::Nats("nats://127.0.0.1:4222".into())
    }

    pub(crate) fn name(&self) -> &'static str {
        match self {
            Broker::Redis(_) | Broker::RedisWith(_) => "redis",
            Broker::Nats(_) | Broker::NatsWith(_) => "nats",
        }
    }

    /// A node on this broker under `prefix`.
    async fn node(&self, prefix: &str) -> TestServer {
        self.node_with(prefix, |_| {}).await
    }

    pub(crate) async fn node_with(&self, prefix: &str, f: impl FnOnce(&mut sockudo::config::Config)) -> TestServer {
        let (broker, prefix) = (self.clone(), prefix.to_owned());
        TestServer::start_with(move |c| {
            c.adapter.cluster_secret = Some(CLUSTER_SECRET.into());
            f(c);
            c.adapter.request_timeout_ms = 500;
            c.adapter.node_timeout_ms = 2000;
            match broker {
                Broker::Redis(url) => {
                    c.adapter.driver = AdapterDriver::Redis;
                    c.adapter.redis.url = url;
                    c.adapter.redis.prefix = prefix;
                }
                Broker::Nats(url) => {
                    c.adapter.driver = AdapterDriver::Nats;
                    c.adapter.nats.servers = vec![url];
                    c.adapter.nats.prefix = prefix;
                }
                Broker::RedisWith(redis) => {
                    c.adapter.driver = AdapterDriver::Redis;
                    c.adapter.redis = sockudo::config::RedisConfig { prefix, ..*redis };
                }
                Broker::NatsWith(nats) => {
                    c.adapter.driver = AdapterDriver::Nats;
                    c.adapter.nats = sockudo::config::NatsConfig { prefix, ..*nats };
                }
            }
        })
        .await
    }

    /// `n` nodes that see each other.
    pub(crate) async fn cluster(&self, n: usize) -> Vec<TestServer> {
        self.cluster_with(n, |_| {}).await
    }

    /// `n` nodes that see each other, each configured by `f` too.
    pub(crate) async fn cluster_with(&self, n: usize, f: impl Fn(&mut sockudo::config::Config)) -> Vec<TestServer> {
        let prefix = format!("it-{}-{}", std::process::id(), fastrand::u64(..));
        let mut nodes = Vec::new();
        for _ in 0..n {
            nodes.push(self.node_with(&prefix, &f).await);
        }
        for node in &nodes {
            let adapter = self.name();
            let seen = eventually(Duration::from_secs(10), || async {
                node.metric("sockudo_horizontal_adapter_nodes", &[("adapter", adapter)]).await == Some(n as f64)
            })
            .await;
            assert!(seen, "{adapter} nodes did not find each other");
        }
        nodes
    }
}

/// Presence changes travel asynchronously: waits until `node` lists `n` members of `channel`.
async fn wait_for_members(node: &TestServer, channel: &str, n: usize) {
    let path = format!("/channels/{channel}/users");
    let known = eventually(WAIT, || async {
        let (_, users) = node.api("GET", &path, &[], None).await;
        users["users"].as_array().is_some_and(|u| u.len() == n)
    })
    .await;
    assert!(known, "the node never listed {n} members of {channel}");
}

pub(crate) async fn stop_all(nodes: Vec<TestServer>) {
    for n in nodes {
        n.stop().await;
    }
}

pub(crate) async fn broadcast_reaches_every_node_and_excludes_the_socket(broker: Broker) {
    let nodes = broker.cluster(2).await;
    let mut a = nodes[0].client().await;
    let mut b = nodes[1].client().await;
    a.subscribe("news").await;
    b.subscribe("news").await;
    assert_eq!(nodes[0].publish("news", "hello", "1").await.0, 200);
    assert_eq!(a.expect("hello").await["data"], "1");
    assert_eq!(b.expect("hello").await["data"], "1");
    // Published on node 1 excluding b's socket (which lives on node 2).
    let body = json!({"name": "not-b", "channel": "news", "data": "2", "socket_id": b.socket_id});
    assert_eq!(nodes[0].api("POST", "/events", &[], Some(body)).await.0, 200);
    assert_eq!(a.expect("not-b").await["data"], "2");
    nodes[1].publish("news", "marker", "3").await;
    assert_eq!(b.next().await["event"], "marker", "b must not receive the excluded event");
    // Client events cross nodes too, never back to the sender.
    a.subscribe_private("private-chat").await;
    b.subscribe_private("private-chat").await;
    a.send(json!({"event": "client-hi", "channel": "private-chat", "data": {"x": 1}})).await;
    assert_eq!(b.expect("client-hi").await["data"], json!({"x": 1}));
    // User-targeted delivery to a socket signed in on the other node.
    let user_data = json!({"id": "u7"}).to_string();
    let sig = sockudo::auth::sign(SECRET, &format!("{}::user::{user_data}", b.socket_id));
    b.send(json!({"event": "pusher:signin", "data": {"auth": format!("{KEY}:{sig}"), "user_data": user_data}})).await;
    b.expect("pusher:signin_success").await;
    b.subscribe("#server-to-user-u7").await;
    nodes[0].publish("#server-to-user-u7", "direct", "4").await;
    assert_eq!(b.expect("direct").await["data"], "4");
    // terminate_connections for a user connected on the other node.
    assert_eq!(nodes[0].api("POST", "/users/u7/terminate_connections", &[], Some(json!({}))).await.0, 200);
    assert_eq!(b.closed().await, Closed::Code(4009));
    stop_all(nodes).await;
}

pub(crate) async fn presence_is_cluster_wide_and_once_per_user(broker: Broker) {
    let nodes = broker.cluster(2).await;
    let mut alice = nodes[0].client().await;
    alice.subscribe_presence("presence-room", "alice").await;
    wait_for_members(&nodes[1], "presence-room", 1).await;
    let mut bob1 = nodes[1].client().await;
    let ok = bob1.subscribe_presence("presence-room", "bob").await;
    let d = data(&ok);
    assert_eq!(d["presence"]["count"], 2, "{d}");
    assert!(d["presence"]["hash"]["alice"].is_object());
    assert_eq!(data(&alice.expect("pusher_internal:member_added").await)["user_id"], "bob");
    // bob again, on alice's node: not a new member anywhere.
    let mut bob2 = nodes[0].client().await;
    assert_eq!(data(&bob2.subscribe_presence("presence-room", "bob").await)["presence"]["count"], 2);
    for node in &nodes {
        let (_, users) = node.api("GET", "/channels/presence-room/users", &[], None).await;
        let mut ids: Vec<String> =
            users["users"].as_array().unwrap().iter().map(|u| u["id"].as_str().unwrap().to_owned()).collect();
        ids.sort();
        assert_eq!(ids, ["alice", "bob"]);
        let (_, info) =
            node.api("GET", "/channels/presence-room", &[("info", "user_count,subscription_count")], None).await;
        assert_eq!(info, json!({"occupied": true, "user_count": 2, "subscription_count": 3}));
    }
    bob1.close().await;
    nodes[0].publish("presence-room", "marker", "x").await;
    assert_eq!(alice.next().await["event"], "marker", "bob still has a socket: no member_removed");
    bob2.close().await;
    assert_eq!(data(&alice.expect("pusher_internal:member_removed").await)["user_id"], "bob");
    nodes[1].publish("presence-room", "marker-2", "x").await;
    assert_eq!(alice.next().await["event"], "marker-2", "member_removed arrives once");
    stop_all(nodes).await;
}

/// `max_presence_members_per_channel` holds for the cluster: with a limit of 1, a second user
/// joining on another node is refused (`LimitReached`), while the first user's second socket
/// there is not a new member and joins.
async fn presence_limit_is_cluster_wide(broker: Broker) {
    let nodes = broker.cluster_with(2, |c| c.app_manager.array.apps[0].max_presence_members_per_channel = 1).await;
    let mut alice = nodes[0].client().await;
    alice.subscribe_presence("presence-one", "alice").await;
    wait_for_members(&nodes[1], "presence-one", 1).await;
    let mut bob = nodes[1].client().await;
    let data_bob = json!({"user_id": "bob", "user_info": {}}).to_string();
    let auth = bob.auth(SECRET, "presence-one", Some(&data_bob));
    bob.send(json!({"event": "pusher:subscribe", "data": {"channel": "presence-one", "auth": auth, "channel_data": data_bob}}))
        .await;
    let refused = bob.expect_for("pusher:subscription_error", "presence-one").await;
    assert_eq!(data(&refused)["type"], "LimitReached", "{refused}");
    let mut alice2 = nodes[1].client().await;
    let ok = alice2.subscribe_presence("presence-one", "alice").await;
    assert_eq!(data(&ok)["presence"]["count"], 1, "{ok}");
    stop_all(nodes).await;
}

#[tokio::test]
async fn redis_presence_limit() {
    presence_limit_is_cluster_wide(Broker::redis()).await;
}

#[tokio::test]
async fn nats_presence_limit() {
    presence_limit_is_cluster_wide(Broker::nats()).await;
}

pub(crate) async fn cache_counts_and_channel_queries_are_shared(broker: Broker) {
    let nodes = broker.cluster(2).await;
    nodes[0].publish("cache-quotes", "quote", "42").await;
    let mut late = nodes[1].client().await;
    late.subscribe("cache-quotes").await;
    assert_eq!(late.expect("quote").await["data"], "42", "the cached event crossed nodes");
    let mut a = nodes[0].client().await;
    a.subscribe("shared").await;
    late.subscribe("shared").await;
    // Both subscribers, on different nodes, hear the cluster-wide count.
    for c in [&mut a, &mut late] {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let f = c.expect_for("pusher_internal:subscription_count", "shared").await;
            if data(&f)["subscription_count"] == 2 {
                break;
            }
            assert!(std::time::Instant::now() < deadline);
        }
    }
    let (_, list) =
        nodes[1].api("GET", "/channels", &[("filter_by_prefix", "sha"), ("info", "subscription_count")], None).await;
    assert_eq!(list, json!({"channels": {"shared": {"subscription_count": 2}}}));
    let (_, one) = nodes[0].api("GET", "/channels/shared", &[("info", "subscription_count")], None).await;
    assert_eq!(one, json!({"occupied": true, "subscription_count": 2}));
    let resolved =
        nodes[0].metric("sockudo_horizontal_adapter_resolved_promises", &[("app_id", APP_ID)]).await.unwrap();
    assert!(resolved >= 1.0, "cross-node queries are counted: {resolved}");
    assert!(
        nodes[1].metric("sockudo_horizontal_adapter_received_requests", &[("app_id", APP_ID)]).await.unwrap() >= 1.0
    );
    stop_all(nodes).await;
}

#[tokio::test]
async fn redis_broadcast() {
    broadcast_reaches_every_node_and_excludes_the_socket(Broker::redis()).await;
}
#[tokio::test]
async fn nats_broadcast() {
    broadcast_reaches_every_node_and_excludes_the_socket(Broker::nats()).await;
}
#[tokio::test]
async fn redis_presence() {
    presence_is_cluster_wide_and_once_per_user(Broker::redis()).await;
}
#[tokio::test]
async fn nats_presence() {
    presence_is_cluster_wide_and_once_per_user(Broker::nats()).await;
}
#[tokio::test]
async fn redis_cache_counts_queries() {
    cache_counts_and_channel_queries_are_shared(Broker::redis()).await;
}
#[tokio::test]
async fn nats_cache_counts_queries() {
    cache_counts_and_channel_queries_are_shared(Broker::nats()).await;
}

#[tokio::test]
async fn unreachable_broker_at_startup_exits_64_with_the_password_masked() {
    let port = free_port();
    let cases = [
        ("redis", "REDIS_URL", format!("redis://user:hunter2@127.0.0.1:{port}/0"), "adapter.redis.url"),
        ("nats", "NATS_SERVERS", format!("nats://127.0.0.1:{port}"), "adapter.nats.servers"),
    ];
    for (driver, var, url, key) in cases {
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_sockudo"))
            .env("HOST", "127.0.0.1")
            .env("PORT", free_port().to_string())
            .env("METRICS_ENABLED", "false")
            .env("ADAPTER_DRIVER", driver)
            .env(var, &url)
            .output();
        let out = tokio::time::timeout(Duration::from_secs(20), out).await.unwrap().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{driver}: {err}");
        assert!(err.contains(key), "{err}");
        assert!(!err.contains("hunter2"), "password leaked: {err}");
    }
}

/// A broker process of our own on a free port, to kill and restart.
struct OwnBroker {
    kind: &'static str,
    port: u16,
    child: Option<tokio::process::Child>,
}

impl OwnBroker {
    async fn start(kind: &'static str, port: u16) -> Self {
        let mut cmd = match kind {
            "redis" => {
                let mut c = tokio::process::Command::new("redis-server");
                c.args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]);
                c
            }
            _ => {
                let mut c = tokio::process::Command::new("nats-server");
                c.args(["-a", "127.0.0.1", "-p", &port.to_string()]);
                c
            }
        };
        let child = cmd.stdout(Stdio::null()).stderr(Stdio::null()).kill_on_drop(true).spawn().expect("broker binary");
        let up = eventually(Duration::from_secs(10), || async {
            tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok()
        })
        .await;
        assert!(up, "{kind} did not start");
        Self { kind, port, child: Some(child) }
    }

    async fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().await.unwrap();
            let _ = c.wait().await;
        }
    }

    fn broker(&self) -> Broker {
        match self.kind {
            "redis" => Broker::Redis(format!("redis://127.0.0.1:{}", self.port)),
            _ => Broker::Nats(format!("nats://127.0.0.1:{}", self.port)),
        }
    }
}

async fn broker_restart_mid_test(kind: &'static str) {
    let port = free_port();
    let mut own = OwnBroker::start(kind, port).await;
    let broker = own.broker();
    let nodes = broker.cluster(2).await;
    let mut a = nodes[0].client().await;
    let mut b = nodes[1].client().await;
    a.subscribe("live").await;
    b.subscribe("live").await;
    nodes[0].publish("live", "before", "1").await;
    assert_eq!(b.expect("before").await["data"], "1");

    own.kill().await;
    for node in &nodes {
        let down = eventually(Duration::from_secs(15), || async {
            node.metric("sockudo_horizontal_adapter_connected", &[("adapter", kind)]).await == Some(0.0)
        })
        .await;
        assert!(down, "{kind}: connected gauge never went to 0");
        assert_eq!(node.raw_request("GET", "/up", None).await.0, 503, "readiness follows the broker");
    }
    // Local sockets are still served while the broker is away.
    nodes[0].publish("live", "local-only", "2").await;
    assert_eq!(a.expect("local-only").await["data"], "2");

    let _own = OwnBroker::start(kind, port).await;
    for node in &nodes {
        let up = eventually(Duration::from_secs(20), || async {
            node.metric("sockudo_horizontal_adapter_connected", &[("adapter", kind)]).await == Some(1.0)
        })
        .await;
        assert!(up, "{kind}: connected gauge never came back to 1");
    }
    // Cross-node delivery resumes (retrying: the first envelopes may race the resubscription).
    let mut resumed = false;
    for i in 0..50 {
        nodes[0].publish("live", "after", &i.to_string()).await;
        if let Ok(f) = tokio::time::timeout(Duration::from_millis(200), b.expect("after")).await {
            assert_eq!(f["event"], "after");
            resumed = true;
            break;
        }
    }
    assert!(resumed, "{kind}: cross-node delivery did not resume");
    assert_eq!(nodes[1].raw_request("GET", "/up", None).await.0, 200);
    stop_all(nodes).await;
}

#[tokio::test]
async fn redis_restart_mid_test() {
    broker_restart_mid_test("redis").await;
}

#[tokio::test]
async fn nats_restart_mid_test() {
    broker_restart_mid_test("nats").await;
}

/// A cluster node as a separate process on `prefix` (Redis on 6379 or NATS on 4222).
pub(crate) async fn process_node(
    driver: &str,
    prefix: &str,
    extra: &[(&'static str, String)],
) -> crate::support::process::Process {
    let dir = std::env::temp_dir().join(format!("sockudo-cluster-{}-{}", std::process::id(), fastrand::u64(..)));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("node.json");
    let cfg = json!({"adapter": {
        "driver": driver,
        "node_timeout_ms": 2000,
        "request_timeout_ms": 500,
        "redis": {"url": "redis://127.0.0.1:6379", "prefix": prefix},
        "nats": {"servers": ["nats://127.0.0.1:4222"], "prefix": prefix}
    }});
    std::fs::write(&file, cfg.to_string()).unwrap();
    let file = file.to_string_lossy().into_owned();
    crate::support::process::Process::start_with_args(&["--config", &file], extra).await
}

async fn killed_node_presence_is_removed_once(broker: Broker) {
    let prefix = format!("it-kill-{}-{}", std::process::id(), fastrand::u64(..));
    let a = broker.node(&prefix).await;
    let b = process_node(broker.name(), &prefix, &[("ADAPTER_CLUSTER_SECRET", CLUSTER_SECRET.into())]).await;
    let adapter = broker.name();
    assert!(
        eventually(Duration::from_secs(10), || async {
            a.metric("sockudo_horizontal_adapter_nodes", &[("adapter", adapter)]).await == Some(2.0)
        })
        .await
    );
    let mut alice = a.client().await;
    alice.subscribe_presence("presence-lobby", "alice").await;
    let mut bob = b.client().await;
    bob.subscribe_presence("presence-lobby", "bob").await;
    assert_eq!(data(&alice.expect("pusher_internal:member_added").await)["user_id"], "bob");
    b.kill().await;
    let started = std::time::Instant::now();
    let removed = tokio::time::timeout(Duration::from_secs(15), alice.expect("pusher_internal:member_removed")).await;
    let removed = removed.expect("member_removed for the dead node's user within 15 s");
    assert_eq!(data(&removed)["user_id"], "bob");
    println!("{adapter}: killed node's member removed after {:?}", started.elapsed());
    a.publish("presence-lobby", "marker", "x").await;
    assert_eq!(alice.next().await["event"], "marker", "exactly one member_removed");
    let (_, users) = a.api("GET", "/channels/presence-lobby/users", &[], None).await;
    assert_eq!(users, json!({"users": [{"id": "alice"}]}));
    assert_eq!(a.metric("sockudo_horizontal_adapter_nodes", &[("adapter", adapter)]).await, Some(1.0));
    a.stop().await;
}

#[tokio::test]
async fn redis_killed_node() {
    killed_node_presence_is_removed_once(Broker::redis()).await;
}

#[tokio::test]
async fn nats_killed_node() {
    killed_node_presence_is_removed_once(Broker::nats()).await;
}

/// One trace across two nodes: the origin's `broadcast` span is the parent of the receiving
/// node's `broadcast.remote` span, both exported to one OTLP receiver, and the request's W3C
/// baggage travels in the envelope (recorded on the remote span as `baggage.*`).
#[tokio::test]
async fn one_trace_across_nodes() {
    use crate::support::otlp::{hex, Receiver};
    let (rx, endpoint) = Receiver::grpc().await;
    let prefix = format!("it-trace-{}-{}", std::process::id(), fastrand::u64(..));
    let env = vec![("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.clone()), ("OTEL_METRICS_EXPORTER", "none".to_owned())];
    let a = process_node("nats", &prefix, &env).await;
    let b = process_node("nats", &prefix, &env).await;
    let mut sub = b.client().await;
    sub.subscribe("traced").await;
    // Wait until a's broadcasts reach b (the nodes have met).
    let trace_id = "0af7651916cd43dd8448eb211c80319c";
    let mut delivered = false;
    for _ in 0..50 {
        let body = json!({"name": "t", "channel": "traced", "data": "x"}).to_string();
        let traceparent = format!("00-{trace_id}-b7ad6b7169203331-01");
        let headers = [("traceparent", traceparent.as_str()), ("baggage", "tenant=acme,plan=pro%20plus")];
        assert_eq!(signed_publish_with(a.port, &body, &headers).await.0, 200);
        if tokio::time::timeout(Duration::from_millis(200), sub.expect("t")).await.is_ok() {
            delivered = true;
            break;
        }
    }
    assert!(delivered, "no cross-node delivery");
    let found = eventually(Duration::from_secs(15), || async {
        rx.spans().iter().any(|s| s.name == "broadcast.remote" && hex(&s.trace_id) == trace_id)
    })
    .await;
    assert!(found, "no broadcast.remote span: {:?}", rx.spans().iter().map(|s| s.name.clone()).collect::<Vec<_>>());
    let spans = rx.spans();
    let remote = spans.iter().find(|s| s.name == "broadcast.remote" && hex(&s.trace_id) == trace_id).unwrap();
    let origin = spans
        .iter()
        .find(|s| s.name == "broadcast" && s.span_id == remote.parent_span_id)
        .expect("the remote span's parent is the origin's broadcast span");
    assert_eq!(hex(&origin.trace_id), trace_id);
    assert_eq!(remote.kind, 5, "SPAN_KIND_CONSUMER");
    assert_eq!(crate::support::otlp::attr(remote, "sockudo.recipients").as_deref(), Some("1"));
    assert_eq!(crate::support::otlp::attr(remote, "messaging.operation.type").as_deref(), Some("process"));
    assert_eq!(crate::support::otlp::attr(remote, "messaging.system").as_deref(), Some("pusher"));
    assert_eq!(crate::support::otlp::attr(remote, "messaging.batch.message_count").as_deref(), Some("1"));
    let http = spans.iter().find(|s| s.span_id == origin.parent_span_id).expect("broadcast's parent is the HTTP span");
    assert_eq!(hex(&http.parent_span_id), "b7ad6b7169203331");
    for span in [http, remote] {
        assert_eq!(crate::support::otlp::attr(span, "baggage.tenant").as_deref(), Some("acme"), "{}", span.name);
        assert_eq!(crate::support::otlp::attr(span, "baggage.plan").as_deref(), Some("pro plus"), "{}", span.name);
    }
    let instances: std::collections::HashSet<String> = rx
        .resources()
        .iter()
        .filter_map(|r| r.iter().find(|(k, _)| k == "service.instance.id").map(|(_, v)| v.clone()))
        .collect();
    assert!(instances.len() >= 2, "spans from both nodes: {instances:?}");
    sub.close().await;
    a.stop().await;
    b.stop().await;
}
