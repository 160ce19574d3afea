//! Cache channels are bounded in bytes: per app (`cache.max_mb_per_app`) and per node
//! (`cache.max_mb`). Driven through the signed API and real sockets: the oldest events are
//! evicted and counted, the newest still replay, and another app's entries are never touched.

use serde_json::json;

use crate::support::*;

const MIB: f64 = 1024.0 * 1024.0;
/// Under `max_event_payload_in_kb` (100): about 90 KB per event, so 1 MiB holds 11 of them.
const DATA_LEN: usize = 90 * 1024;

async fn publish_big(server: &TestServer, app: (&str, &str, &str), channel: &str) {
    let body = json!({"name": "big", "channel": channel, "data": "y".repeat(DATA_LEN)});
    let (status, body) = server.api_as(app.0, app.1, app.2, "POST", "/events", &[], Some(body)).await;
    assert_eq!(status, 200, "{channel}: {body}");
}

const DEFAULT_APP: (&str, &str, &str) = (APP_ID, KEY, SECRET);
const OTHER_APP: (&str, &str, &str) = ("12345", "py-key", "py-secret");

/// Subscribes a new client of `key` to `channel` and returns the frame after the subscription.
async fn replay(server: &TestServer, key: &str, channel: &str) -> serde_json::Value {
    let mut client = server.client_of(key).await;
    client.subscribe(channel).await;
    let frame = client.next().await;
    client.close().await;
    frame
}

async fn assert_replays(server: &TestServer, key: &str, channel: &str) {
    let frame = replay(server, key, channel).await;
    assert_eq!((frame["event"].as_str(), frame["channel"].as_str()), (Some("big"), Some(channel)), "{channel}");
    assert_eq!(frame["data"].as_str().map(str::len), Some(DATA_LEN));
}

async fn assert_misses(server: &TestServer, key: &str, channel: &str) {
    let frame = replay(server, key, channel).await;
    assert_eq!((frame["event"].as_str(), frame["channel"].as_str()), (Some("pusher:cache_miss"), Some(channel)));
}

#[tokio::test]
async fn an_app_holds_at_most_its_bound_and_evicts_its_oldest() {
    let server = TestServer::start_with(|c| c.cache.max_mb_per_app = 1).await;
    let other = [("app_id", "12345")];
    let mine = [("app_id", APP_ID)];
    // Series exist from the first scrape, at zero.
    assert_eq!(server.metric("sockudo_cache_channel_bytes", &mine).await, Some(0.0));
    assert_eq!(server.metric("sockudo_cache_channel_evictions_total", &mine).await, Some(0.0));

    publish_big(&server, OTHER_APP, "cache-other").await;
    for i in 0..30 {
        publish_big(&server, DEFAULT_APP, &format!("cache-big-{i}")).await;
    }
    let bytes = server.metric("sockudo_cache_channel_bytes", &mine).await.unwrap();
    let evicted = server.metric("sockudo_cache_channel_evictions_total", &mine).await.unwrap();
    println!("figure: app bound 1 MiB, 30 events of {DATA_LEN} B data: {bytes} B held, {evicted} evicted");
    assert!(bytes <= MIB, "{bytes} bytes held over the 1 MiB bound");
    assert!(bytes >= 10.0 * DATA_LEN as f64, "the bound is used, not emptied: {bytes}");
    assert!(evicted >= 18.0, "{evicted} evictions");

    assert_replays(&server, KEY, "cache-big-29").await;
    assert_misses(&server, KEY, "cache-big-0").await;
    // The other app is untouched.
    assert_replays(&server, "py-key", "cache-other").await;
    let other_bytes = server.metric("sockudo_cache_channel_bytes", &other).await.unwrap();
    assert!(other_bytes > DATA_LEN as f64, "{other_bytes}");
    assert_eq!(server.metric("sockudo_cache_channel_evictions_total", &other).await, Some(0.0));
    server.stop().await;
}

#[tokio::test]
async fn the_node_bound_never_evicts_another_apps_events() {
    // Each app may hold 1 MiB, the node 1 MiB in all: the other app's one event is stored first,
    // and the default app filling the node evicts only its own.
    let server = TestServer::start_with(|c| {
        c.cache.max_mb_per_app = 1;
        c.cache.max_mb = 1;
    })
    .await;
    publish_big(&server, OTHER_APP, "cache-other").await;
    for i in 0..30 {
        publish_big(&server, DEFAULT_APP, &format!("cache-big-{i}")).await;
    }
    let mine = server.metric("sockudo_cache_channel_bytes", &[("app_id", APP_ID)]).await.unwrap();
    let other = server.metric("sockudo_cache_channel_bytes", &[("app_id", "12345")]).await.unwrap();
    assert!(mine + other <= MIB, "{mine} + {other} bytes over the node's 1 MiB");
    assert!(server.metric("sockudo_cache_channel_evictions_total", &[("app_id", APP_ID)]).await.unwrap() > 0.0);
    assert_eq!(server.metric("sockudo_cache_channel_evictions_total", &[("app_id", "12345")]).await, Some(0.0));
    assert_replays(&server, "py-key", "cache-other").await;
    assert_replays(&server, KEY, "cache-big-29").await;
    assert_misses(&server, KEY, "cache-big-0").await;
    server.stop().await;
}
