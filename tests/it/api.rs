//! The signed HTTP API: statuses and JSON errors, channel queries, batch events, keep-alive and
//! the health endpoints.

use serde_json::{json, Value};

use crate::support::*;

#[tokio::test]
async fn signing_errors_have_their_status_and_a_json_error() {
    let server = TestServer::start().await;
    let body = json!({"name": "e", "channel": "c", "data": "d"});
    // Wrong secret: 401.
    let (s, v) = server.api_as(APP_ID, KEY, "wrong", "POST", "/events", &[], Some(body.clone())).await;
    assert_eq!(s, 401);
    assert!(v["error"].as_str().unwrap().contains("signature"), "{v}");
    // Unknown app: 404.
    let (s, v) = server.api_as("nope", KEY, SECRET, "POST", "/events", &[], Some(body.clone())).await;
    assert_eq!((s, v["error"].is_string()), (404, true));
    // Wrong key for the app: 401.
    let (s, _) = server.api_as(APP_ID, "py-key", SECRET, "POST", "/events", &[], Some(body.clone())).await;
    assert_eq!(s, 401);
    // Stale timestamp: 401.
    let path = format!("/apps/{APP_ID}/events");
    let b = body.to_string();
    let q = signed_query(KEY, SECRET, "POST", &path, &[], Some(&b), now() - 700);
    assert_eq!(server.raw_request("POST", &format!("{path}?{q}"), Some(b.clone())).await.0, 401);
    // Unsigned: 401.
    assert_eq!(server.raw_request("POST", &path, Some(b.clone())).await.0, 401);
    // Body changed after signing (body_md5 mismatch): 401.
    let q = signed_query(KEY, SECRET, "POST", &path, &[], Some(&b), now());
    assert_eq!(server.raw_request("POST", &format!("{path}?{q}"), Some("{}".into())).await.0, 401);
    // Duplicate parameter: 400.
    let q = signed_query(KEY, SECRET, "POST", &path, &[], Some(&b), now());
    assert_eq!(server.raw_request("POST", &format!("{path}?{q}&auth_key={KEY}"), Some(b.clone())).await.0, 400);
    // Bad bodies: 400; too large: 413.
    let (s, v) = server.api("POST", "/events", &[], Some(json!({"name": "e", "data": "d"}))).await;
    assert_eq!(s, 400, "{v}");
    let (s, _) =
        server.api("POST", "/events", &[], Some(json!({"name": "e", "channel": "bad name", "data": "d"}))).await;
    assert_eq!(s, 400);
    let big = "x".repeat(101 * 1024);
    let (s, _) = server.api("POST", "/events", &[], Some(json!({"name": "e", "channel": "c", "data": big}))).await;
    assert_eq!(s, 413);
    let huge = "x".repeat(1100 * 1024);
    let (s, _) = server.api("POST", "/events", &[], Some(json!({"name": "e", "channel": "c", "data": huge}))).await;
    assert_eq!(s, 413);
    // Unknown route: 404 JSON.
    let (s, v) = server.raw_request("GET", "/nothing", None).await;
    assert_eq!((s, v["error"].as_str()), (404, Some("not found")));
    // Rejected requests are counted too.
    let calls = server.metric("sockudo_http_calls_received_total", &[("app_id", "unknown")]).await.unwrap();
    assert!(calls >= 3.0, "{calls}");
    server.stop().await;
}

#[tokio::test]
async fn channels_queries_and_info_on_publish() {
    let server = TestServer::start().await;
    let mut a = server.client().await;
    let mut b = server.client().await;
    a.subscribe("room-1").await;
    b.subscribe("room-1").await;
    a.subscribe("room-2").await;
    a.subscribe("other").await;
    let (s, v) =
        server.api("GET", "/channels", &[("filter_by_prefix", "room-"), ("info", "subscription_count")], None).await;
    assert_eq!(s, 200);
    assert_eq!(v, json!({"channels": {"room-1": {"subscription_count": 2}, "room-2": {"subscription_count": 1}}}));
    let (s, v) = server.api("GET", "/channels/room-1", &[("info", "subscription_count")], None).await;
    assert_eq!((s, v), (200, json!({"occupied": true, "subscription_count": 2})));
    let (_, v) = server.api("GET", "/channels/empty", &[], None).await;
    assert_eq!(v, json!({"occupied": false}));
    // user_count needs presence.
    assert_eq!(server.api("GET", "/channels", &[("info", "user_count")], None).await.0, 400);
    assert_eq!(server.api("GET", "/channels/room-1/users", &[], None).await.0, 400);
    let body = json!({"name": "e", "channels": ["room-1", "room-2"], "data": "d", "info": "subscription_count"});
    let (s, v) = server.api("POST", "/events", &[], Some(body)).await;
    assert_eq!(
        (s, v),
        (200, json!({"channels": {"room-1": {"subscription_count": 2}, "room-2": {"subscription_count": 1}}}))
    );
    let batch = json!({"batch": [
        {"name": "b1", "channel": "room-1", "data": "1"},
        {"name": "b2", "channel": "room-2", "data": "2"}
    ]});
    assert_eq!(server.api("POST", "/batch_events", &[], Some(batch)).await, (200, json!({})));
    assert_eq!(a.expect("b1").await["data"], "1");
    assert_eq!(a.expect("b2").await["data"], "2");
    let eleven: Vec<Value> =
        (0..11).map(|i| json!({"name": "x", "channel": "room-1", "data": i.to_string()})).collect();
    assert_eq!(server.api("POST", "/batch_events", &[], Some(json!({"batch": eleven}))).await.0, 400);
    server.stop().await;
}

#[tokio::test]
async fn keep_alive_and_health() {
    let server = TestServer::start().await;
    // reqwest reuses one connection when the server keeps it alive.
    for i in 0..20 {
        assert_eq!(server.publish("k", "e", &i.to_string()).await.0, 200);
    }
    let opened = server.metric("sockudo_http_calls_received_total", &[("app_id", APP_ID)]).await;
    assert_eq!(opened, Some(20.0));
    assert_eq!(server.raw_request("GET", "/up", None).await, (200, json!("OK")));
    assert_eq!(server.raw_request("GET", "/up/app-id", None).await.0, 200);
    assert_eq!(server.raw_request("GET", "/up/nope", None).await.0, 404);
    assert_eq!(server.raw_request("GET", "/live", None).await.0, 200);
    // A raw HTTP/1.1 exchange: two requests on one connection without `Connection: close`.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", server.port)).await.unwrap();
    for _ in 0..2 {
        tcp.write_all(b"GET /live HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let mut buf = [0u8; 512];
        let n = tokio::time::timeout(WAIT, tcp.read(&mut buf)).await.unwrap().unwrap();
        let head = String::from_utf8_lossy(&buf[..n]).to_ascii_lowercase();
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert!(!head.contains("connection: close"), "{head}");
    }
    server.stop().await;
}

#[tokio::test]
async fn python_style_numeric_app_and_encoded_query() {
    let server = TestServer::start().await;
    let (s, v) = server
        .api_as(
            "12345",
            "py-key",
            "py-secret",
            "GET",
            "/channels",
            &[("filter_by_prefix", "presence-"), ("info", "user_count")],
            None,
        )
        .await;
    assert_eq!((s, v), (200, json!({"channels": {}})));
    server.stop().await;
}
