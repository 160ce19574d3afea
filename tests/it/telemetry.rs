//! Telemetry end to end with the real binary: OTLP push of traces, metrics and logs to a real
//! receiver (gRPC and HTTP/protobuf), the trace of a publish continuing the caller's
//! `traceparent`, JSON log lines carrying that trace id, and a dead collector that changes
//! nothing for clients.

use std::time::Duration;

use serde_json::{json, Value};

use crate::support::otlp::{attr, hex, Receiver};
use crate::support::process::{free_port, Process};
use crate::support::*;

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_SPAN: &str = "00f067aa0ba902b7";

async fn publish_traced(port: u16, channel: &str, traceparent: Option<&str>) -> u16 {
    let body = json!({"name": "traced", "channel": channel, "data": "{\"secret\":\"payload-text\"}"}).to_string();
    signed_publish(port, &body, traceparent).await.0
}

fn otel_env(endpoint: &str, protocol: &str) -> Vec<(&'static str, String)> {
    vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.to_owned()),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", protocol.to_owned()),
        ("OTEL_SERVICE_NAME", "sockudo-under-test".to_owned()),
        ("OTEL_METRIC_EXPORT_INTERVAL", "300".to_owned()),
        ("METRICS_DRIVER", "prometheus,otlp".to_owned()),
        ("LOG_FORMAT", "json".to_owned()),
        ("LOG_LEVEL", "debug".to_owned()),
    ]
}

async fn traced_publish_is_exported(protocol: &str) {
    let (rx, endpoint) = if protocol == "grpc" { Receiver::grpc().await } else { Receiver::http().await };
    let server = Process::start(&otel_env(&endpoint, protocol)).await;
    let mut sub = server.client().await;
    sub.subscribe("traced-channel").await;
    let traceparent = format!("00-{TRACE_ID}-{PARENT_SPAN}-01");
    assert_eq!(publish_traced(server.port, "traced-channel", Some(&traceparent)).await, 200);
    assert_eq!(sub.expect("traced").await["channel"], "traced-channel");

    // Spans: the HTTP server span continues the caller's trace; `broadcast` is its child.
    let found = eventually(Duration::from_secs(15), || async {
        rx.spans().iter().any(|s| s.name == "broadcast") && rx.spans().iter().any(|s| s.name.starts_with("POST "))
    })
    .await;
    assert!(found, "spans received: {:?}", rx.spans().iter().map(|s| s.name.clone()).collect::<Vec<_>>());
    // The encoding asked for is the one that arrived.
    let types = rx.got.lock().unwrap().content_types.clone();
    match protocol {
        "http/json" => assert!(types.iter().all(|t| t.starts_with("application/json")), "{types:?}"),
        "http/protobuf" => assert!(types.iter().all(|t| t.starts_with("application/x-protobuf")), "{types:?}"),
        _ => assert!(types.is_empty(), "gRPC only: {types:?}"),
    }
    let spans = rx.spans();
    let http = spans.iter().find(|s| s.name == "POST /apps/{app_id}/events").expect("the HTTP server span");
    assert_eq!(hex(&http.trace_id), TRACE_ID);
    assert_eq!(hex(&http.parent_span_id), PARENT_SPAN);
    assert_eq!(http.kind, 2, "SPAN_KIND_SERVER");
    assert_eq!(attr(http, "http.request.method").as_deref(), Some("POST"));
    assert_eq!(attr(http, "http.route").as_deref(), Some("/apps/{app_id}/events"));
    assert_eq!(attr(http, "http.response.status_code").as_deref(), Some("200"));
    assert_eq!(attr(http, "sockudo.app_id").as_deref(), Some(APP_ID));
    // Semantic conventions (contract 2) beside the sockudo.* attributes.
    assert_eq!(attr(http, "url.path").as_deref(), Some("/apps/app-id/events"));
    assert_eq!(attr(http, "url.scheme").as_deref(), Some("http"));
    assert_eq!(attr(http, "server.port"), Some(server.port.to_string()));
    assert_eq!(attr(http, "client.address").as_deref(), Some("127.0.0.1"));
    assert_eq!(attr(http, "network.protocol.version").as_deref(), Some("1.1"));
    assert!(!attr(http, "url.path").unwrap().contains("auth_signature"), "no query in url.path");
    let broadcast = spans.iter().find(|s| s.name == "broadcast").unwrap();
    assert_eq!(hex(&broadcast.trace_id), TRACE_ID);
    assert_eq!(broadcast.parent_span_id, http.span_id);
    assert_eq!(attr(broadcast, "sockudo.channel").as_deref(), Some("traced-channel"));
    assert_eq!(attr(broadcast, "sockudo.channel_type").as_deref(), Some("public"));
    assert_eq!(attr(broadcast, "sockudo.event").as_deref(), Some("traced"));
    assert_eq!(attr(broadcast, "sockudo.recipients").as_deref(), Some("1"));
    assert_eq!(attr(broadcast, "messaging.system").as_deref(), Some("pusher"));
    assert_eq!(attr(broadcast, "messaging.operation.type").as_deref(), Some("send"));
    assert_eq!(attr(broadcast, "messaging.destination.name").as_deref(), Some("traced-channel"));
    assert_eq!(attr(broadcast, "messaging.batch.message_count").as_deref(), Some("1"));
    // The span ends at the last write and says how long that took (for tail sampling).
    let last_write: f64 = attr(broadcast, "sockudo.last_write_ms").expect("last_write_ms").parse().unwrap();
    assert!(last_write > 0.0 && last_write < 10_000.0, "{last_write}");
    assert!(spans.iter().any(|s| s.name == "subscribe"), "subscribe span");
    for s in &spans {
        for kv in &s.attributes {
            let v = crate::support::otlp::kv_string(kv).1;
            assert!(!v.contains(SECRET) && !v.contains("payload-text"), "secret or payload in {}: {v}", s.name);
        }
    }

    // Metrics over OTLP: unprefixed OTel names.
    assert!(
        eventually(Duration::from_secs(15), || async {
            rx.metric_names().iter().any(|n| n == "new_connections_total")
        })
        .await,
        "metrics received: {:?}",
        rx.metric_names()
    );
    assert!(rx.metric_names().iter().any(|n| n == "broadcast_latency_ms"));
    // Logs over OTLP, correlated with the trace.
    assert!(
        eventually(Duration::from_secs(15), || async { rx.log_records().iter().any(|(t, _)| t == TRACE_ID) }).await,
        "no log record with the trace id: {:?}",
        rx.log_records()
    );
    // Resource on every export.
    let resources = rx.resources();
    assert!(!resources.is_empty());
    for r in &resources {
        assert!(r.contains(&("service.name".into(), "sockudo-under-test".into())), "{r:?}");
        assert!(r.iter().any(|(k, v)| k == "service.instance.id" && !v.is_empty()), "{r:?}");
    }
    sub.close().await;

    // JSON logs: the broadcast's line carries the caller's trace id and the exported span's id.
    let lines = server.stop().await;
    let parsed: Vec<Value> = lines.iter().filter_map(|l| serde_json::from_str(l).ok()).collect();
    assert!(!parsed.is_empty(), "JSON log lines: {lines:?}");
    let line = parsed
        .iter()
        .find(|v| v["message"] == "broadcast queued for local sockets")
        .unwrap_or_else(|| panic!("no broadcast line in {lines:#?}"));
    assert_eq!(line["trace_id"], TRACE_ID);
    assert_eq!(line["span_id"], hex(&broadcast.span_id));
    assert_eq!(line["level"], "DEBUG");
    assert_eq!(line["target"], "sockudo::adapter");
    assert!(line["timestamp"].as_str().unwrap().ends_with('Z'));
    for l in &lines {
        assert!(!l.contains(SECRET) && !l.contains("payload-text") && !l.contains("auth_signature"), "leak: {l}");
    }
}

#[tokio::test]
async fn otlp_grpc_traces_metrics_logs() {
    traced_publish_is_exported("grpc").await;
}

#[tokio::test]
async fn otlp_http_protobuf_traces_metrics_logs() {
    traced_publish_is_exported("http/protobuf").await;
}

#[tokio::test]
async fn otlp_http_json_traces_metrics_logs() {
    traced_publish_is_exported("http/json").await;
}

#[tokio::test]
async fn trace_id_is_logged_without_any_exporter() {
    let server = Process::start(&[("LOG_FORMAT", "json".into()), ("LOG_LEVEL", "debug".into())]).await;
    let traceparent = format!("00-{TRACE_ID}-{PARENT_SPAN}-01");
    assert_eq!(publish_traced(server.port, "no-export", Some(&traceparent)).await, 200);
    let lines = server.stop().await;
    let ok = lines.iter().filter_map(|l| serde_json::from_str::<Value>(l).ok()).any(|v| {
        v["message"] == "broadcast queued for local sockets" && v["trace_id"] == TRACE_ID && v["span_id"].is_string()
    });
    assert!(ok, "{lines:#?}");
}

#[tokio::test]
async fn a_dead_collector_changes_nothing_for_clients() {
    // A port nobody listens on: every export fails fast; a bound-but-never-accepting listener
    // would make exports hang instead. Both must leave publishing untouched; this covers the
    // first, the shutdown bound covers the second's flush.
    let dead = format!("http://127.0.0.1:{}", free_port());
    let mut env = otel_env(&dead, "grpc");
    env.push(("LOG_LEVEL", "warn".into()));
    env.push(("OTEL_EXPORTER_OTLP_TIMEOUT", "500".into()));
    let server = Process::start(&env).await;
    let mut sub = server.client().await;
    sub.subscribe("busy").await;
    for i in 0..300 {
        assert_eq!(publish_traced(server.port, "busy", None).await, 200, "publish {i}");
        assert_eq!(sub.expect("traced").await["event"], "traced");
    }
    sub.close().await;
    let started = std::time::Instant::now();
    let lines = server.stop().await;
    assert!(started.elapsed() < Duration::from_secs(15), "shutdown took {:?}", started.elapsed());
    let warnings = lines.iter().filter(|l| l.contains("OTLP export failed")).count();
    assert!(warnings <= 3, "export failures are rate-limited: {warnings} lines");
}

/// A socket is one `websocket.connection` span, continuing the `traceparent` of its upgrade (a
/// query parameter, as browsers cannot set headers), ended at close with the close code; its
/// `subscribe` spans are their own traces, linked to it.
#[tokio::test]
async fn a_socket_is_one_connection_span_its_work_links_to() {
    let (rx, endpoint) = Receiver::http().await;
    let server = Process::start(&otel_env(&endpoint, "http/protobuf")).await;
    let traceparent = format!("00-{TRACE_ID}-{PARENT_SPAN}-01");
    let url = format!("ws://127.0.0.1:{}/app/{KEY}?protocol=7&traceparent={traceparent}", server.port);
    let mut client = Client::connect(&url).await;
    client.subscribe("linked-1").await;
    client.subscribe("linked-2").await;
    client.close().await;
    let found = eventually(Duration::from_secs(15), || async {
        let spans = rx.spans();
        spans.iter().any(|s| s.name == "websocket.connection")
            && spans.iter().filter(|s| s.name == "subscribe").count() >= 2
    })
    .await;
    let spans = rx.spans();
    assert!(found, "spans: {:?}", spans.iter().map(|s| s.name.clone()).collect::<Vec<_>>());
    let conn = spans.iter().find(|s| s.name == "websocket.connection").unwrap();
    assert_eq!(hex(&conn.trace_id), TRACE_ID, "continues the upgrade's traceparent");
    assert_eq!(hex(&conn.parent_span_id), PARENT_SPAN);
    assert_eq!(conn.kind, 2, "SPAN_KIND_SERVER");
    assert_eq!(attr(conn, "sockudo.app_id").as_deref(), Some(APP_ID));
    assert_eq!(attr(conn, "websocket.close.code").as_deref(), Some("1005"), "the client closed");
    for sub in spans.iter().filter(|s| s.name == "subscribe") {
        assert_ne!(sub.trace_id, conn.trace_id, "a subscribe is its own trace");
        assert!(
            sub.links.iter().any(|l| l.span_id == conn.span_id && l.trace_id == conn.trace_id),
            "subscribe links to its connection: {:?}",
            sub.links
        );
    }
    server.stop().await;
}
