//! One app's dead webhook receiver must not starve the other apps' webhooks (issue 13, defect
//! 11). App A's webhook points at a receiver that accepts connections, reads and never
//! answers, with the full 5 s request timeout; app B's at a working receiver. A client of A
//! churns through channels far faster than A's share allows while B causes a known number of
//! events: every one of B's arrives promptly, A's overflow is dropped and counted under A, and
//! the queue gauge shows A's share full (and no fuller) while B's drains to zero.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::StatusCode;
use serde_json::{json, Value};
use sockudo::config::WebhookConfig;
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;

use crate::support::*;

/// App A: the second test app, whose receiver hangs.
const A_ID: &str = "12345";
const A_KEY: &str = "py-key";
/// A's share of the queue in the test.
const A_MAX: f64 = 50.0;
/// Channels A occupies and vacates: 1000 events, twenty times its share.
const A_CYCLES: usize = 500;
/// Channels B occupies and vacates: 20 events.
const B_CYCLES: usize = 10;
/// How long B's events may take while A is stuck: two of A's request timeouts.
const B_DEADLINE: Duration = Duration::from_secs(10);

/// A TCP server that accepts connections and reads them, and never writes a byte.
async fn black_hole() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
            });
        }
    });
    port
}

/// An HTTP receiver that answers 200 and keeps every event it gets.
async fn receiver() -> (u16, Arc<Mutex<Vec<Value>>>) {
    async fn record(State(events): State<Arc<Mutex<Vec<Value>>>>, body: String) -> StatusCode {
        let v: Value = serde_json::from_str(&body).expect("webhook bodies are JSON");
        events.lock().unwrap().extend(v["events"].as_array().cloned().unwrap_or_default());
        StatusCode::OK
    }
    let events = Arc::new(Mutex::new(Vec::new()));
    let app = axum::Router::new().fallback(record).with_state(events.clone());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (port, events)
}

fn occupancy_hook(url: String) -> WebhookConfig {
    WebhookConfig {
        url,
        event_types: vec!["channel_occupied".into(), "channel_vacated".into()],
        headers: Default::default(),
    }
}

async fn webhooks_total(server: &TestServer, app: &str, outcome: &str) -> f64 {
    server.metric("sockudo_webhooks_total", &[("app_id", app), ("outcome", outcome)]).await.unwrap_or(0.0)
}

async fn queue_events(server: &TestServer, app: &str) -> f64 {
    server.metric("sockudo_webhook_queue_events", &[("app_id", app)]).await.expect("the queue gauge is exported")
}

/// Occupies and vacates `cycles` distinct channels from one client.
async fn churn(client: &mut Client, prefix: &str, cycles: usize) {
    for i in 0..cycles {
        let channel = format!("{prefix}-{i}");
        client.subscribe(&channel).await;
        client.send(json!({"event": "pusher:unsubscribe", "data": {"channel": channel}})).await;
    }
}

#[tokio::test]
async fn a_dead_receiver_does_not_starve_other_apps() {
    let hole = black_hole().await;
    let (rx_port, received) = receiver().await;
    let server = TestServer::start_with(|c| {
        c.app_manager.array.apps[0].webhooks = vec![occupancy_hook(format!("http://127.0.0.1:{rx_port}/b"))];
        c.app_manager.array.apps[1].webhooks = vec![occupancy_hook(format!("http://127.0.0.1:{hole}/a"))];
        let w = &mut c.webhooks;
        w.batch_ms = 20;
        // A's requests hang for the full default timeout and are retried for minutes: B must
        // get through because A holds only its share, not because A gives up quickly.
        w.timeout_ms = 5_000;
        w.max_retry_seconds = 300;
        w.workers = 4;
        w.max_in_flight_per_app = 2;
        // Without per-app shares A's 1000 events would fill this node-wide bound, and B's
        // events would be dropped or wait behind A's batches.
        w.queue_size = 200;
        w.max_queue_events_per_app = A_MAX as usize;
        w.max_queue_kb_per_app = 64;
    })
    .await;

    // Present from the first scrape, at zero.
    assert_eq!(queue_events(&server, A_ID).await, 0.0);
    assert_eq!(queue_events(&server, APP_ID).await, 0.0);

    let mut a = server.client_of(A_KEY).await;
    churn(&mut a, "a", A_CYCLES).await;
    assert!(
        eventually(WAIT, || async { webhooks_total(&server, A_ID, "dropped").await > 0.0 }).await,
        "A's overflow is dropped and counted under A"
    );

    let started = Instant::now();
    let mut b = server.client().await;
    churn(&mut b, "b", B_CYCLES).await;
    let want: Vec<Value> = (0..B_CYCLES)
        .flat_map(|i| {
            let channel = format!("b-{i}");
            [
                json!({"name": "channel_occupied", "channel": channel}),
                json!({"name": "channel_vacated", "channel": channel}),
            ]
        })
        .collect();
    let all_arrived = eventually(B_DEADLINE, || {
        let got = received.lock().unwrap().clone();
        let done = want.iter().all(|w| got.contains(w));
        async move { done }
    })
    .await;
    let took = started.elapsed();
    let got = received.lock().unwrap().clone();
    assert!(all_arrived, "B's events did not all arrive within {B_DEADLINE:?}: got {got:#?}");
    assert_eq!(got.len(), 2 * B_CYCLES, "B gets each event once and nothing of A's: {got:#?}");
    println!("B's {} webhook events arrived in {took:?} while A's receiver hung", 2 * B_CYCLES);

    // A is still stuck: nothing delivered, its share full and no fuller, its overflow counted.
    let a_queued = queue_events(&server, A_ID).await;
    assert!(a_queued > 0.0 && a_queued <= A_MAX, "A's queue depth {a_queued} is within (0, {A_MAX}]");
    assert_eq!(webhooks_total(&server, A_ID, "delivered").await, 0.0);
    let a_dropped = webhooks_total(&server, A_ID, "dropped").await;
    assert!(a_dropped >= 2.0 * A_CYCLES as f64 - A_MAX, "A dropped {a_dropped}");
    // B drains to zero, with nothing dropped and everything delivered.
    assert!(eventually(WAIT, || async { queue_events(&server, APP_ID).await == 0.0 }).await, "B's queue drains");
    assert_eq!(webhooks_total(&server, APP_ID, "dropped").await, 0.0);
    assert!(webhooks_total(&server, APP_ID, "delivered").await >= 1.0);
    server.stop().await;
}
