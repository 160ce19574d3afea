//! Watchlist events (`pusher_internal:watchlist_events`): raw frames on one node for the exact
//! wire format, the limit and the per-app switch, and pusher-js's own `pusher.user.watchlist`
//! (tests/clients/watchlist.mjs) on one node, across two nodes on Redis and on NATS, and with
//! the watched users' node SIGKILLed.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sockudo::config::Config;
use tokio::process::Command;

use crate::clients::{clients_dir, run, with_server_env};
use crate::cluster::{process_node, Broker};
use crate::support::*;

const GRACE: Duration = Duration::from_millis(300);

fn watchlist_on(c: &mut Config) {
    c.watchlist_offline_grace_ms = GRACE.as_millis() as u64;
    c.app_manager.array.apps[0].enable_watchlist_events = true;
}

/// Signs `c` in as `user` watching `watchlist`; the server's answer.
async fn signin(c: &mut Client, user: &str, watchlist: &[&str]) -> Value {
    let user_data = json!({"id": user, "watchlist": watchlist}).to_string();
    let sig = sockudo::auth::sign(SECRET, &format!("{}::user::{user_data}", c.socket_id));
    c.send(json!({"event": "pusher:signin", "data": {"auth": format!("{KEY}:{sig}"), "user_data": user_data}})).await;
    c.next().await
}

async fn signed_in(server: &TestServer, user: &str, watchlist: &[&str]) -> Client {
    let mut c = server.client().await;
    let answer = signin(&mut c, user, watchlist).await;
    assert_eq!(answer["event"], "pusher:signin_success", "{answer}");
    c
}

/// The next frame must be a watchlist event: `(name, user_ids)`.
async fn watch_event(c: &mut Client) -> (String, Vec<String>) {
    let f = c.next().await;
    assert_eq!(f["event"], "pusher_internal:watchlist_events", "{f}");
    assert!(f.get("channel").is_none(), "{f}");
    let events = data(&f)["events"].as_array().cloned().expect("events array");
    assert_eq!(events.len(), 1, "{f}");
    let ids = events[0]["user_ids"].as_array().expect("user_ids").iter().map(|u| u.as_str().unwrap().to_owned());
    (events[0]["name"].as_str().unwrap().to_owned(), ids.collect())
}

/// Nothing arrives before a marker published now (the client is subscribed to `marks`).
async fn nothing_before_marker(server: &TestServer, c: &mut Client) {
    server.publish("marks", "marker", "x").await;
    let f = c.next().await;
    assert_eq!(f["event"], "marker", "unexpected frame {f}");
}

fn ids(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

#[tokio::test]
async fn watchers_hear_online_once_and_offline_after_the_grace() {
    let server = TestServer::start_with(watchlist_on).await;
    let bob = signed_in(&server, "bob", &[]).await;
    let mut alice = signed_in(&server, "alice", &["bob", "carol"]).await;
    assert_eq!(watch_event(&mut alice).await, ("online".into(), ids(&["bob"])), "who is online already");
    alice.subscribe("marks").await;

    let carol1 = signed_in(&server, "carol", &[]).await;
    assert_eq!(watch_event(&mut alice).await, ("online".into(), ids(&["carol"])));
    let carol2 = signed_in(&server, "carol", &[]).await;
    carol1.close().await;
    nothing_before_marker(&server, &mut alice).await;
    let closed = Instant::now();
    carol2.close().await;
    assert_eq!(watch_event(&mut alice).await, ("offline".into(), ids(&["carol"])));
    assert!(closed.elapsed() >= GRACE, "offline only after the grace ({:?})", closed.elapsed());

    // Back within the grace: neither offline nor online.
    bob.close().await;
    let _bob = signed_in(&server, "bob", &[]).await;
    // An absence is only seen by waiting past the grace.
    tokio::time::sleep(GRACE + Duration::from_millis(200)).await;
    nothing_before_marker(&server, &mut alice).await;
    server.stop().await;
}

#[tokio::test]
async fn a_watchlist_over_the_limit_is_refused_and_the_socket_stays_open() {
    let server = TestServer::start_with(|c| {
        watchlist_on(c);
        c.app_manager.array.apps[0].max_watchlist_size = 3;
    })
    .await;
    let mut c = server.client().await;
    let refused = signin(&mut c, "u1", &["a", "b", "c", "d"]).await;
    assert_eq!(refused["event"], "pusher:error", "{refused}");
    assert_eq!(refused["data"]["code"], 4302, "{refused}");
    assert!(refused["data"]["message"].as_str().unwrap().contains("limit of 3"), "{refused}");
    c.send(json!({"event": "pusher:ping", "data": {}})).await;
    assert_eq!(c.next().await["event"], "pusher:pong", "the socket stays open");
    let ok = signin(&mut c, "u1", &["a", "b", "c"]).await;
    assert_eq!(ok["event"], "pusher:signin_success", "{ok}");
    server.stop().await;
}

#[tokio::test]
async fn an_app_without_watchlist_events_sends_none() {
    let server = TestServer::start_with(|c| {
        c.app_manager.array.apps[0].enable_watchlist_events = false;
        c.app_manager.array.apps[0].max_watchlist_size = 1;
    })
    .await;
    // Not refused either: the watchlist is ignored.
    let mut alice = signed_in(&server, "alice", &["bob", "carol"]).await;
    alice.subscribe("marks").await;
    let bob = signed_in(&server, "bob", &[]).await;
    bob.close().await;
    nothing_before_marker(&server, &mut alice).await;
    server.stop().await;
}

/// Runs tests/clients/watchlist.mjs: the watcher on `watcher`, the watched users on `watched_port`.
async fn pusher_js(watcher: &TestServer, watched_port: u16, kill_pid: Option<u32>, what: &str) {
    let mut cmd = Command::new("node");
    cmd.arg("--test").arg("watchlist.mjs").current_dir(clients_dir());
    with_server_env(&mut cmd, watcher);
    cmd.env("WATCHED_PORT", watched_port.to_string()).env("GRACE_MS", GRACE.as_millis().to_string());
    if let Some(pid) = kill_pid {
        cmd.env("KILL_PID", pid.to_string());
    }
    run(cmd, what).await;
}

#[tokio::test]
async fn pusher_js_watchlist_on_one_node() {
    let server = TestServer::start_with(watchlist_on).await;
    pusher_js(&server, server.port, None, "pusher-js watchlist, one node").await;
    server.stop().await;
}

async fn pusher_js_watchlist_across_nodes(broker: Broker) {
    let nodes = broker.cluster_with(2, watchlist_on).await;
    pusher_js(&nodes[0], nodes[1].port, None, &format!("pusher-js watchlist, two {} nodes", broker.name())).await;
    crate::cluster::stop_all(nodes).await;
}

#[tokio::test]
async fn redis_pusher_js_watchlist_across_nodes() {
    pusher_js_watchlist_across_nodes(Broker::redis()).await;
}

#[tokio::test]
async fn nats_pusher_js_watchlist_across_nodes() {
    pusher_js_watchlist_across_nodes(Broker::nats()).await;
}

/// The watched users' node (a separate process) is SIGKILLed by the client script: the
/// watcher's node takes them offline when it expires the silent node.
async fn killed_node_takes_its_users_offline(broker: Broker) {
    let prefix = format!("it-watch-{}-{}", std::process::id(), fastrand::u64(..));
    let watcher = broker.node_with(&prefix, watchlist_on).await;
    let watched = process_node(broker.name(), &prefix, &[("ADAPTER_CLUSTER_SECRET", CLUSTER_SECRET.into())]).await;
    let adapter = broker.name();
    let joined = eventually(Duration::from_secs(10), || async {
        watcher.metric("sockudo_horizontal_adapter_nodes", &[("adapter", adapter)]).await == Some(2.0)
    })
    .await;
    assert!(joined, "the {adapter} nodes did not find each other");
    pusher_js(&watcher, watched.port, Some(watched.pid()), &format!("pusher-js watchlist, killed {adapter} node"))
        .await;
    watcher.stop().await;
}

#[tokio::test]
async fn redis_killed_node_takes_its_users_offline() {
    killed_node_takes_its_users_offline(Broker::redis()).await;
}

#[tokio::test]
async fn nats_killed_node_takes_its_users_offline() {
    killed_node_takes_its_users_offline(Broker::nats()).await;
}
