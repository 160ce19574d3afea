//! WebSocket protocol 7 over raw frames: handshake, refusals with their codes, channels,
//! presence, cache channels, client events, sign-in, subscription counts, limits and shutdown.

use std::time::Duration;

use futures_util::SinkExt;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use crate::support::*;

#[tokio::test]
async fn connection_established_and_ping() {
    let server = TestServer::start().await;
    let mut ws = Client::open(&server.ws_url(KEY, "protocol=7&client=js&version=8.4.0")).await;
    let first = next_json(&mut ws).await;
    assert_eq!(first["event"], "pusher:connection_established");
    let d = data(&first);
    let id = d["socket_id"].as_str().unwrap();
    let (a, b) = id.split_once('.').unwrap();
    assert!(a.bytes().all(|c| c.is_ascii_digit()) && b.bytes().all(|c| c.is_ascii_digit()), "{id}");
    assert_eq!(d["activity_timeout"], 120);
    ws.send(Message::Text(r#"{"event":"pusher:ping","data":""}"#.into())).await.unwrap();
    assert_eq!(next_json(&mut ws).await["event"], "pusher:pong");
    ws.send(Message::Text(r#"{"event":"pusher:ping","data":{}}"#.into())).await.unwrap();
    assert_eq!(next_json(&mut ws).await["event"], "pusher:pong");
    server.stop().await;
}

async fn refused(server: &TestServer, key: &str, query: &str) -> (u64, Closed) {
    let mut ws = Client::open(&server.ws_url(key, query)).await;
    let frame = next_json(&mut ws).await;
    assert_eq!(frame["event"], "pusher:error", "{frame}");
    let code = frame["data"]["code"].as_u64().unwrap();
    let mut c = Client { ws, socket_id: String::new() };
    (code, c.closed().await)
}

#[tokio::test]
async fn refusals_send_an_error_frame_then_close_with_the_same_code() {
    let server = TestServer::start_with(|c| c.max_connections = 3).await;
    assert_eq!(refused(&server, "nope", "protocol=7").await, (4001, Closed::Code(4001)));
    assert_eq!(refused(&server, "disabled-key", "protocol=7").await, (4003, Closed::Code(4003)));
    assert_eq!(refused(&server, KEY, "protocol=3").await, (4007, Closed::Code(4007)));
    assert_eq!(refused(&server, KEY, "protocol=x").await, (4006, Closed::Code(4006)));
    assert_eq!(refused(&server, KEY, "client=js").await, (4008, Closed::Code(4008)));
    // The quota app holds one connection.
    let first = server.client_of("quota-key").await;
    assert_eq!(refused(&server, "quota-key", "protocol=7").await, (4004, Closed::Code(4004)));
    // The node holds three (the quota connection is one of them).
    let _a = server.client().await;
    let _b = server.client().await;
    assert_eq!(refused(&server, KEY, "protocol=7").await, (4100, Closed::Code(4100)));
    first.close().await;
    let unknown = server
        .metric("sockudo_connection_errors_total", &[("app_id", "unknown"), ("error_type", "app_not_found")])
        .await;
    assert_eq!(unknown, Some(1.0));
    server.stop().await;
}

#[tokio::test]
async fn public_channel_broadcast_and_socket_exclusion() {
    let server = TestServer::start().await;
    let mut a = server.client().await;
    let mut b = server.client().await;
    a.subscribe("news").await;
    b.subscribe("news").await;
    let (status, body) = server.publish("news", "headline", "{\"n\":1}").await;
    assert_eq!((status, body), (200, json!({})));
    for c in [&mut a, &mut b] {
        let ev = c.expect("headline").await;
        assert_eq!(ev["channel"], "news");
        assert_eq!(ev["data"], "{\"n\":1}");
    }
    // Excluding a's socket: b gets it, a gets only the next one.
    let body = json!({"name": "only-b", "channel": "news", "data": "x", "socket_id": a.socket_id});
    assert_eq!(server.api("POST", "/events", &[], Some(body)).await.0, 200);
    assert_eq!(b.expect("only-b").await["data"], "x");
    server.publish("news", "both", "y").await;
    assert_eq!(a.next().await["event"], "both", "the excluded event must not reach a");
    // Unsubscribe stops delivery.
    a.send(json!({"event": "pusher:unsubscribe", "data": {"channel": "news"}})).await;
    a.subscribe("other").await;
    server.publish("news", "after", "z").await;
    server.publish("other", "marker", "z").await;
    assert_eq!(a.next().await["event"], "marker");
    server.stop().await;
}

#[tokio::test]
async fn private_channel_auth_failure_keeps_the_socket_open() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    let bad = c.auth("wrong-secret", "private-a", None);
    c.send(json!({"event": "pusher:subscribe", "data": {"channel": "private-a", "auth": bad}})).await;
    let err = c.expect_for("pusher:subscription_error", "private-a").await;
    assert_eq!(err["data"]["status"], 401);
    assert_eq!(err["data"]["type"], "AuthError");
    c.send(json!({"event": "pusher:subscribe", "data": {"channel": "private-b"}})).await;
    assert_eq!(c.expect_for("pusher:subscription_error", "private-b").await["data"]["status"], 401);
    // Still open, and a good signature works.
    c.subscribe_private("private-a").await;
    c.subscribe_private("private-encrypted-a").await;
    server.publish("private-a", "ok", "1").await;
    assert_eq!(c.expect("ok").await["channel"], "private-a");
    server.stop().await;
}

#[tokio::test]
async fn presence_members_join_and_leave_once_per_user() {
    let server = TestServer::start().await;
    let mut a = server.client().await;
    let ok = a.subscribe_presence("presence-room", "alice").await;
    let d = data(&ok);
    assert_eq!(d["presence"]["count"], 1);
    assert_eq!(d["presence"]["ids"], json!(["alice"]));
    assert_eq!(d["presence"]["hash"]["alice"]["name"], "user alice");

    let mut b1 = server.client().await;
    let ok = b1.subscribe_presence("presence-room", "bob").await;
    assert_eq!(data(&ok)["presence"]["count"], 2);
    let added = a.expect("pusher_internal:member_added").await;
    assert_eq!(data(&added)["user_id"], "bob");
    assert_eq!(data(&added)["user_info"]["name"], "user bob");

    // A second socket of bob is not a new member.
    let mut b2 = server.client().await;
    assert_eq!(data(&b2.subscribe_presence("presence-room", "bob").await)["presence"]["count"], 2);
    let (_, users) = server.api("GET", "/channels/presence-room/users", &[], None).await;
    let mut ids: Vec<_> =
        users["users"].as_array().unwrap().iter().map(|u| u["id"].as_str().unwrap().to_owned()).collect();
    ids.sort();
    assert_eq!(ids, ["alice", "bob"]);
    let (_, info) =
        server.api("GET", "/channels/presence-room", &[("info", "user_count,subscription_count")], None).await;
    assert_eq!(info, json!({"occupied": true, "user_count": 2, "subscription_count": 3}));

    // bob's first socket leaving removes nobody; the second one removes bob once.
    b1.close().await;
    server.publish("presence-room", "marker-1", "x").await;
    assert_eq!(a.next().await["event"], "marker-1", "no member_removed while bob has a socket");
    b2.close().await;
    let removed = a.expect("pusher_internal:member_removed").await;
    assert_eq!(data(&removed)["user_id"], "bob");
    let (_, list) =
        server.api("GET", "/channels", &[("filter_by_prefix", "presence-"), ("info", "user_count")], None).await;
    assert_eq!(list, json!({"channels": {"presence-room": {"user_count": 1}}}));
    server.stop().await;
}

#[tokio::test]
async fn cache_channel_sends_last_event_or_cache_miss() {
    let server = TestServer::start().await;
    let mut a = server.client().await;
    a.subscribe("cache-prices").await;
    a.expect_for("pusher:cache_miss", "cache-prices").await;
    server.publish("cache-prices", "price", "42").await;
    assert_eq!(a.expect("price").await["data"], "42");
    let mut b = server.client().await;
    b.subscribe("cache-prices").await;
    let cached = b.expect("price").await;
    assert_eq!((cached["channel"].as_str(), cached["data"].as_str()), (Some("cache-prices"), Some("42")));
    server.stop().await;
}

#[tokio::test]
async fn client_events_reach_others_only() {
    let server = TestServer::start().await;
    let mut a = server.client().await;
    let mut b = server.client().await;
    a.subscribe_presence("presence-chat", "ann").await;
    b.subscribe_presence("presence-chat", "ben").await;
    a.send(json!({"event": "client-typing", "channel": "presence-chat", "data": {"on": true}})).await;
    let got = b.expect("client-typing").await;
    assert_eq!(got["data"], json!({"on": true}));
    assert_eq!(got["user_id"], "ann");
    server.publish("presence-chat", "marker", "x").await;
    // a's next frames: member_added for ben, then the marker, never its own client event.
    loop {
        let f = a.next().await;
        assert_ne!(f["event"], "client-typing", "client events are not echoed");
        if f["event"] == "marker" {
            break;
        }
    }
    // Public channel: refused with 4301, socket stays open.
    a.subscribe("public-x").await;
    a.send(json!({"event": "client-x", "channel": "public-x", "data": {}})).await;
    assert_eq!(a.expect("pusher:error").await["data"]["code"], 4301);
    // Not subscribed: 4301.
    a.send(json!({"event": "client-x", "channel": "private-zzz", "data": {}})).await;
    assert_eq!(a.expect("pusher:error").await["data"]["code"], 4301);
    // App without client events: 4301.
    let mut p = server.client_of("plain-key").await;
    p.send(json!({"event": "client-x", "channel": "private-a", "data": {}})).await;
    assert_eq!(p.expect("pusher:error").await["data"]["code"], 4301);
    server.stop().await;
}

#[tokio::test]
async fn client_event_rate_limit() {
    let server = TestServer::start_with(|c| c.app_manager.array.apps[0].max_client_events_per_second = 2).await;
    let mut a = server.client().await;
    a.subscribe_private("private-r").await;
    for _ in 0..3 {
        a.send(json!({"event": "client-x", "channel": "private-r", "data": {}})).await;
    }
    let err = a.expect("pusher:error").await;
    assert_eq!(err["data"]["code"], 4301);
    assert!(err["data"]["message"].as_str().unwrap().contains("rate limit"));
    let triggered = server
        .metric("sockudo_rate_limit_triggered_total", &[("app_id", APP_ID), ("limiter_type", "client_events")])
        .await;
    assert_eq!(triggered, Some(1.0));
    server.stop().await;
}

#[tokio::test]
async fn signin_user_channel_and_terminate() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    let user_data = json!({"id": "u1", "user_info": {"name": "U"}}).to_string();
    let sig = sockudo::auth::sign(SECRET, &format!("{}::user::{user_data}", c.socket_id));
    // Subscribing to the user channel before signing in is refused.
    c.send(json!({"event": "pusher:subscribe", "data": {"channel": "#server-to-user-u1"}})).await;
    assert_eq!(c.expect_for("pusher:subscription_error", "#server-to-user-u1").await["data"]["status"], 403);
    c.send(json!({"event": "pusher:signin", "data": {"auth": format!("{KEY}:{sig}"), "user_data": user_data}})).await;
    let ok = c.expect("pusher:signin_success").await;
    assert_eq!(data(&ok)["user_data"], user_data);
    c.subscribe("#server-to-user-u1").await;
    let (status, _) = server.publish("#server-to-user-u1", "direct", "hi").await;
    assert_eq!(status, 200);
    assert_eq!(c.expect("direct").await["data"], "hi");
    let (status, _) = server.api("POST", "/users/u1/terminate_connections", &[], Some(json!({}))).await;
    assert_eq!(status, 200);
    let err = c.expect("pusher:error").await;
    assert_eq!(err["data"]["code"], 4009);
    assert_eq!(c.closed().await, Closed::Code(4009));

    // A bad sign-in signature is refused without closing.
    let mut d = server.client().await;
    d.send(json!({"event": "pusher:signin", "data": {"auth": format!("{KEY}:00"), "user_data": user_data}})).await;
    assert_eq!(d.expect("pusher:error").await["data"]["code"], 4302);
    d.subscribe("still-open").await;
    server.stop().await;
}

#[tokio::test]
async fn subscription_count_is_sent_debounced() {
    let server = TestServer::start().await;
    let mut a = server.client().await;
    let mut b = server.client().await;
    a.subscribe("counted").await;
    b.subscribe("counted").await;
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let f = a.expect_for("pusher_internal:subscription_count", "counted").await;
        if data(&f)["subscription_count"] == 2 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "count 2 never arrived");
    }
    server.stop().await;
}

#[tokio::test]
async fn invalid_input_gets_4300_and_the_socket_stays_usable() {
    let server = TestServer::start_with(|c| {
        c.websocket.max_message_size_kb = 1;
        c.websocket.hard_max_message_size_kb = 4;
    })
    .await;
    let mut c = server.client().await;
    for bad in ["{", "[]", "null", r#"{"event":1}"#, r#"{"event":"pusher:subscribe","data":7}"#, r#"{"event":"nope"}"#]
    {
        c.send_text(bad).await;
        assert_eq!(c.expect("pusher:error").await["data"]["code"], 4300, "{bad}");
    }
    c.ws.send(Message::Binary(vec![1, 2, 3].into())).await.unwrap();
    assert_eq!(c.expect("pusher:error").await["data"]["code"], 4300);
    c.send(json!({"event": "pusher:subscribe", "data": {"channel": "bad name"}})).await;
    assert_eq!(c.expect("pusher:error").await["data"]["code"], 4300);
    // Over the soft limit: 4300, still open.
    c.send_text(&format!(r#"{{"event":"client-x","channel":"private-a","data":"{}"}}"#, "x".repeat(2000))).await;
    let err = c.expect("pusher:error").await;
    assert_eq!(err["data"]["code"], 4300);
    c.subscribe("fine").await;
    // Over the hard limit: close 1009.
    c.send_text(&"x".repeat(5000)).await;
    assert_eq!(c.closed().await, Closed::Code(1009));
    server.stop().await;
}

#[tokio::test]
async fn idle_socket_is_pinged_then_closed_with_4201() {
    let server = TestServer::start_with(|c| {
        c.activity_timeout = 1;
        c.pong_timeout = 1;
    })
    .await;
    let mut c = server.client().await;
    assert_eq!(c.expect("pusher:ping").await["event"], "pusher:ping");
    // Not answering: closed with 4201.
    assert_eq!(c.closed().await, Closed::Code(4201));
    // Answering keeps it open past the timeout.
    let mut d = server.client().await;
    d.expect("pusher:ping").await;
    d.send(json!({"event": "pusher:pong", "data": {}})).await;
    d.expect("pusher:ping").await;
    d.send(json!({"event": "pusher:pong", "data": {}})).await;
    d.subscribe("alive").await;
    let timeouts =
        server.metric("sockudo_connection_errors_total", &[("app_id", APP_ID), ("error_type", "pong_timeout")]).await;
    assert_eq!(timeouts, Some(1.0));
    server.stop().await;
}

#[tokio::test]
async fn slow_consumer_is_closed_with_4100_and_others_keep_receiving() {
    let server = TestServer::start_with(|c| {
        c.websocket.max_queue_kb = 256;
        c.websocket.write_buffer_size = 4096;
    })
    .await;
    // A raw TCP WebSocket that never reads after the handshake.
    let mut slow = server.client().await;
    slow.subscribe("firehose").await;
    let mut fast = server.client().await;
    fast.subscribe("firehose").await;
    // Loopback socket buffers absorb several MB before the server's writes block, so this
    // publishes up to 45 MB; the slow consumer is closed long before that.
    let payload = "x".repeat(90 * 1024);
    let mut closed = false;
    for i in 0..500 {
        let (status, _) = server.publish("firehose", "big", &payload).await;
        assert_eq!(status, 200);
        // The fast client reads everything.
        assert_eq!(fast.expect("big").await["event"], "big", "publish {i}");
        if i % 10 == 9
            && server
                .metric("sockudo_connection_errors_total", &[("app_id", APP_ID), ("error_type", "slow_consumer")])
                .await
                == Some(1.0)
        {
            closed = true;
            break;
        }
    }
    assert!(closed, "the slow consumer was never closed");
    assert!(
        eventually(WAIT, || async { server.metric("sockudo_connected", &[("app_id", APP_ID)]).await == Some(1.0) })
            .await
    );
    drop(slow);
    server.stop().await;
}

#[tokio::test]
async fn shutdown_closes_sockets_with_4200_and_up_turns_503() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    assert_eq!(server.raw_request("GET", "/up", None).await.0, 200);
    server.trigger_shutdown();
    let err = c.expect("pusher:error").await;
    assert_eq!(err["data"]["code"], 4200);
    assert_eq!(c.closed().await, Closed::Code(4200));
    server.stop().await;
    let _ = Duration::ZERO;
}

#[tokio::test]
async fn allowed_origins_refuse_other_browsers_with_4009() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let server = TestServer::start_with(|c| {
        c.app_manager.array.apps[0].allowed_origins = vec!["https://good.example".into(), "*.trusted.example".into()];
    })
    .await;
    let open = |origin: &'static str| {
        let mut req = server.ws_url(KEY, "protocol=7").into_client_request().unwrap();
        req.headers_mut().insert("origin", origin.parse().unwrap());
        async move { tokio_tungstenite::connect_async(req).await.unwrap().0 }
    };
    for ok in ["https://good.example", "https://a.trusted.example"] {
        let mut ws = open(ok).await;
        assert_eq!(next_json(&mut ws).await["event"], "pusher:connection_established", "{ok}");
    }
    let mut ws = open("https://evil.example").await;
    let frame = next_json(&mut ws).await;
    assert_eq!(frame["data"]["code"], 4009);
    assert_eq!(Client { ws, socket_id: String::new() }.closed().await, Closed::Code(4009));
    let refused = server
        .metric("sockudo_connection_errors_total", &[("app_id", APP_ID), ("error_type", "origin_not_allowed")])
        .await;
    assert_eq!(refused, Some(1.0));
    server.stop().await;
}
