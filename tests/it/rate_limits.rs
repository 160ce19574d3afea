//! Rate limits: API events and reads per app (429 with `Retry-After` and `X-RateLimit-*`),
//! connections per IP, per node and cluster-wide through Redis, with their metrics.

use serde_json::{json, Value};

use crate::support::*;

async fn raw(
    server: &TestServer,
    method: &str,
    path: &str,
    params: &[(&str, &str)],
    body: Option<Value>,
) -> reqwest::Response {
    let full = format!("/apps/{APP_ID}{path}");
    let body = body.map(|b| b.to_string());
    let q = signed_query(KEY, SECRET, method, &full, params, body.as_deref(), now());
    let mut req = reqwest::Client::new().request(method.parse().unwrap(), server.http_url(&format!("{full}?{q}")));
    if let Some(b) = body {
        req = req.header("content-type", "application/json").body(b);
    }
    req.send().await.unwrap()
}

fn batch(n: usize) -> Value {
    json!({"batch": (0..n).map(|i| json!({"name": "e", "channel": "rl", "data": i.to_string()})).collect::<Vec<_>>()})
}

#[tokio::test]
async fn api_events_over_the_limit_get_429_with_headers() {
    let server = TestServer::start_with(|c| c.app_manager.array.apps[0].max_backend_events_per_second = 3).await;
    // A batch is one request but counts every event: 4 > 3 is refused outright.
    let resp = raw(&server, "POST", "/batch_events", &[], Some(batch(4))).await;
    assert_eq!(resp.status(), 429);
    let h = resp.headers();
    assert_eq!(h["retry-after"], "1");
    assert_eq!(h["x-ratelimit-limit"], "3");
    assert!(h.contains_key("x-ratelimit-remaining") && h.contains_key("x-ratelimit-reset"));
    let body: Value = resp.json().await.unwrap();
    assert!(body["error"].as_str().unwrap().contains("rate limit"));
    // Single events: some pass, then 429.
    let mut statuses = Vec::new();
    for _ in 0..20 {
        let s = raw(&server, "POST", "/events", &[], Some(json!({"name": "e", "channel": "rl", "data": "x"})))
            .await
            .status();
        statuses.push(s.as_u16());
        if s == 429 {
            break;
        }
    }
    assert_eq!(statuses.last(), Some(&429), "{statuses:?}");
    assert!(statuses.iter().filter(|s| **s == 200).count() <= 6, "at most two windows' worth: {statuses:?}");
    let l = [("app_id", APP_ID), ("limiter_type", "http_api"), ("request_context", "http_api")];
    assert_eq!(server.metric("sockudo_rate_limit_triggered_total", &l).await, Some(2.0));
    assert_eq!(server.metric("sockudo_rate_limit_checks_total", &l).await, Some(1.0 + statuses.len() as f64));
    server.stop().await;
}

#[tokio::test]
async fn api_reads_have_their_own_budget() {
    let server = TestServer::start_with(|c| {
        c.app_manager.array.apps[0].max_read_requests_per_second = 1;
        c.app_manager.array.apps[0].max_backend_events_per_second = 0;
    })
    .await;
    let mut refused = false;
    for _ in 0..6 {
        if raw(&server, "GET", "/channels", &[], None).await.status() == 429 {
            refused = true;
            break;
        }
    }
    assert!(refused, "reads past 1/s are refused");
    // Events are not limited for this app.
    for _ in 0..5 {
        assert_eq!(server.publish("rl", "e", "x").await.0, 200);
    }
    server.stop().await;
}

#[tokio::test]
async fn connections_per_ip_are_limited() {
    let server = TestServer::start_with(|c| c.rate_limits.connections_per_ip_per_second = 2).await;
    let mut refused = None;
    let mut open = Vec::new();
    for _ in 0..8 {
        match tokio_tungstenite::connect_async(server.ws_url(KEY, "protocol=7")).await {
            Ok((ws, _)) => open.push(ws),
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                refused = Some(resp.status().as_u16());
                break;
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(refused, Some(429));
    assert!(open.len() <= 4, "{} accepted", open.len());
    let l = [("app_id", APP_ID), ("limiter_type", "websocket_connect"), ("request_context", "websocket_upgrade")];
    assert_eq!(server.metric("sockudo_rate_limit_triggered_total", &l).await, Some(1.0));
    server.stop().await;
}

#[tokio::test]
async fn redis_limits_are_shared_by_the_cluster() {
    let prefix = format!("it-rl-{}", fastrand::u64(..));
    let node = |p: String| {
        TestServer::start_with(move |c| {
            c.rate_limits.driver = "redis".into();
            c.adapter.redis.prefix = p;
            c.app_manager.array.apps[0].max_backend_events_per_second = 3;
        })
    };
    let a = node(prefix.clone()).await;
    let b = node(prefix).await;
    let mut shared = false;
    for _ in 0..5 {
        // Each attempt starts a fresh one-second window (the limiter's windows are Unix
        // seconds): an attempt that straddled a boundary left spending in the next window, and
        // every later attempt within that second was then refused at its first request.
        let into_second = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_millis();
        tokio::time::sleep(std::time::Duration::from_millis(u64::from(1000 - into_second) + 20)).await;
        let first = raw(&a, "POST", "/batch_events", &[], Some(batch(3))).await.status();
        let second =
            raw(&b, "POST", "/events", &[], Some(json!({"name": "e", "channel": "rl", "data": "x"}))).await.status();
        if first == 200 && second == 429 {
            shared = true;
            break;
        }
    }
    assert!(shared, "node b saw node a's spending in the same second");
    a.stop().await;
    b.stop().await;
}
