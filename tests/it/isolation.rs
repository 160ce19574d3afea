//! Tenant isolation and hostile input, round two: each confirmed defect of the outside review has
//! a test here that fails on the code before its fix (an identity swapped by a second subscribe,
//! a leaked slot after a panic, a path that is not a Pusher path, ...).

use serde_json::json;

use crate::support::*;

/// A second, validly signed subscribe to a presence channel the socket already has changes
/// nothing: its client events keep the first `user_id`, the member list keeps the first member,
/// and the answer is `subscription_succeeded` again with the first identity (as Pusher does).
#[tokio::test]
async fn a_second_subscribe_does_not_change_who_a_socket_is() {
    let server = TestServer::start().await;
    let mut alice = server.client().await;
    let mut watcher = server.client().await;
    watcher.subscribe_presence("presence-room", "watcher").await;
    alice.subscribe_presence("presence-room", "alice").await;
    watcher.expect_for("pusher_internal:member_added", "presence-room").await;
    // The same socket subscribes again as "mallory", correctly signed.
    let again = alice.subscribe_presence("presence-room", "mallory").await;
    let presence = data(&again)["presence"].clone();
    let mut ids: Vec<String> = serde_json::from_value(presence["ids"].clone()).unwrap();
    ids.sort();
    assert_eq!(ids, ["alice", "watcher"], "{again}");
    alice.send(json!({"event": "client-hello", "channel": "presence-room", "data": {"n": 1}})).await;
    let got = watcher.expect_for("client-hello", "presence-room").await;
    assert_eq!(got["user_id"], "alice", "the client event carries the socket's first identity: {got}");
    let (_, users) = server.api("GET", "/channels/presence-room/users", &[], None).await;
    let mut listed: Vec<String> =
        users["users"].as_array().unwrap().iter().map(|u| u["id"].as_str().unwrap().to_owned()).collect();
    listed.sort();
    assert_eq!(listed, ["alice", "watcher"]);
    // The same on a private channel: still one subscription, delivered once.
    alice.subscribe_private("private-x").await;
    alice.subscribe_private("private-x").await;
    server.publish("private-x", "once", "1").await;
    server.publish("private-x", "marker", "2").await;
    assert_eq!(alice.expect_for("once", "private-x").await["event"], "once");
    assert_eq!(alice.next().await["event"], "marker");
    server.stop().await;
}

/// A WebSocket to a path below `/app/{key}` (or to `/app/` itself) is refused with Pusher's 4005
/// (an error frame, then a close with that code), as the README says; plain HTTP there gets the
/// API's JSON 404.
#[tokio::test]
async fn a_bad_path_is_refused_with_4005() {
    let server = TestServer::start().await;
    for path in [format!("/app/{KEY}/extra?protocol=7"), "/app/?protocol=7".into(), format!("/app/{KEY}/a/b")] {
        let url = format!("ws://127.0.0.1:{}{path}", server.port);
        let mut ws = Client::open(&url).await;
        let frame = next_json(&mut ws).await;
        assert_eq!(frame["event"], "pusher:error", "{path}: {frame}");
        assert_eq!(data(&frame)["code"], 4005, "{path}: {frame}");
        let mut c = Client { ws, socket_id: String::new() };
        assert_eq!(c.closed().await, Closed::Code(4005), "{path}");
    }
    let (status, body) = server.raw_request("GET", &format!("/app/{KEY}/extra"), None).await;
    assert_eq!((status, body["error"].as_str()), (404, Some("not found")));
    server.stop().await;
}

/// A connection task that panics (fault injected in debug builds, right after its presence
/// subscription took effect) leaks nothing: node and app slots, the `connected` gauge, the
/// subscription and the presence member all return to their baseline, so a node with
/// `max_connections: 2` keeps accepting after three panicked connections.
#[cfg(debug_assertions)]
#[tokio::test]
async fn a_panicking_connection_task_releases_everything() {
    const CHANNEL: &str = "presence-fault-injected-panic";
    sockudo::connection::panic_on_subscribe(CHANNEL);
    let server = TestServer::start_with(|c| c.max_connections = 2).await;
    let http = reqwest::Client::new();
    let stats = |http: reqwest::Client, port: u16| async move {
        let r = http.get(format!("http://127.0.0.1:{port}/stats")).send().await.unwrap();
        r.json::<serde_json::Value>().await.unwrap()
    };
    let connected = || server.metric("sockudo_connected", &[("app_id", APP_ID)]);
    let baseline = connected().await.unwrap_or(0.0);
    for _ in 0..3 {
        let mut c = server.client().await;
        let data = json!({"user_id": "ghost", "user_info": {}}).to_string();
        let auth = c.auth(SECRET, CHANNEL, Some(&data));
        c.send(json!({"event": "pusher:subscribe", "data": {"channel": CHANNEL, "auth": auth, "channel_data": data}}))
            .await;
        // The task died: the socket ends without a subscription_succeeded.
        assert_eq!(c.closed().await, Closed::NoFrame);
    }
    let released = eventually(WAIT, || async {
        let s = stats(http.clone(), server.metrics_port).await;
        s["connections"] == 0 && s["channels"] == 0 && s["presence_members"] == 0
    })
    .await;
    assert!(released, "{}", stats(http.clone(), server.metrics_port).await);
    assert_eq!(connected().await.unwrap_or(0.0), baseline, "the connected gauge is back at its baseline");
    let (_, users) = server.api("GET", &format!("/channels/{CHANNEL}/users"), &[], None).await;
    assert_eq!(users["users"], json!([]), "the presence member left with the task");
    // Slots were released: two sockets still fit under max_connections = 2.
    let mut a = server.client().await;
    let b = server.client().await;
    a.subscribe("after-the-panics").await;
    b.close().await;
    a.close().await;
    server.stop().await;
}

/// A flood of refused connections and unsigned API calls writes a line a second at most per
/// kind (the first at once, later ones with the count they stand for), while the counters stay
/// exact.
#[tokio::test]
async fn unauthenticated_floods_write_bounded_logs() {
    let server = crate::support::process::Process::start(&[("LOG_LEVEL", "info".to_owned())]).await;
    const N: usize = 200;
    let http = reqwest::Client::new();
    let started = std::time::Instant::now();
    for _ in 0..N {
        let mut c = Client {
            ws: Client::open(&format!("ws://127.0.0.1:{}/app/no-such-key?protocol=7", server.port)).await,
            socket_id: String::new(),
        };
        assert_eq!(c.closed().await, Closed::Code(4001));
        let url = format!("http://127.0.0.1:{}/apps/{APP_ID}/channels", server.port);
        assert_eq!(http.get(url).send().await.unwrap().status(), 401);
    }
    let seconds = started.elapsed().as_secs() + 1;
    let text = http
        .get(format!("http://127.0.0.1:{}/metrics", server.metrics_port))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        sample(&text, "sockudo_connection_errors_total", &[("app_id", "unknown"), ("error_type", "app_not_found")]),
        Some(N as f64)
    );
    let lines = server.stop().await;
    let refused = lines.iter().filter(|l| l.contains("connection refused")).count();
    let api = lines.iter().filter(|l| l.contains("api authentication failed")).count();
    let bound = seconds as usize + 1;
    assert!((1..=bound).contains(&refused), "{refused} refusal lines in {seconds} s");
    assert!((1..=bound).contains(&api), "{api} api lines in {seconds} s");
    println!("{N} refused connections and {N} unsigned calls in {seconds} s: {refused} + {api} log lines");
}

/// Subscription churn is not free: past a burst of 1000, a socket may subscribe or unsubscribe
/// `websocket.max_subscription_ops_per_second` times a second; beyond it each request gets
/// 4302 and the socket stays open.
#[tokio::test]
async fn subscription_churn_is_rate_limited_per_socket() {
    let server = TestServer::start_with(|c| c.websocket.max_subscription_ops_per_second = 5).await;
    let mut c = server.client().await;
    const PAIRS: usize = 700;
    for i in 0..PAIRS {
        let channel = format!("churn-{i}");
        c.send(json!({"event": "pusher:subscribe", "data": {"channel": channel}})).await;
        c.send(json!({"event": "pusher:unsubscribe", "data": {"channel": channel}})).await;
    }
    c.send(json!({"event": "pusher:ping", "data": {}})).await;
    let (mut succeeded, mut refused) = (0, 0);
    loop {
        let v = c.next().await;
        match v["event"].as_str() {
            Some("pusher_internal:subscription_succeeded") => succeeded += 1,
            Some("pusher:error") => {
                assert_eq!(data(&v)["code"], 4302, "{v}");
                refused += 1;
            }
            Some("pusher:pong") => break,
            _ => panic!("unexpected {v}"),
        }
    }
    // 1400 operations: the burst of 1000 plus a few refilled pass, the rest are refused.
    assert!((450..=560).contains(&succeeded), "{succeeded} subscribes passed");
    assert!(refused >= 380, "{refused} refused");
    // Another socket is not affected, and this one is still open.
    let mut other = server.client().await;
    other.subscribe("calm").await;
    c.send(json!({"event": "pusher:ping", "data": {}})).await;
    assert_eq!(c.next().await["event"], "pusher:pong");
    server.stop().await;
}
