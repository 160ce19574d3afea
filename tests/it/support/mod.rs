//! Test support: an in-process server on port 0, a raw Pusher WebSocket client, a signed API
//! client and `eventually`. Every wait here is bounded.

#![allow(dead_code)]

pub mod brokers;
pub mod otlp;
pub mod process;
pub mod tls;

use std::future::Future;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use sockudo::config::{self, AppConfig, Config};
use sockudo::server::{self, Listeners};
use sockudo::shutdown::{self, ShutdownTrigger};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub const KEY: &str = "app-key";
pub const SECRET: &str = "app-secret";
pub const APP_ID: &str = "app-id";
pub const WAIT: Duration = Duration::from_secs(5);
/// `adapter.cluster_secret` of the cluster tests' nodes (signing on unless a test turns it off).
pub const CLUSTER_SECRET: &str = "it-cluster-secret-0123456789";

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// The apps every test server has.
pub fn test_apps() -> Vec<AppConfig> {
    let full = |id: &str, key: &str, secret: &str| AppConfig {
        id: id.into(),
        key: key.into(),
        secret: secret.into(),
        enable_client_messages: true,
        enable_user_authentication: true,
        enable_subscription_count: true,
        ..AppConfig::default()
    };
    vec![
        full(APP_ID, KEY, SECRET),
        full("12345", "py-key", "py-secret"),
        AppConfig { enabled: false, ..full("disabled-id", "disabled-key", "disabled-secret") },
        AppConfig { max_connections: 1, ..full("quota-id", "quota-key", "quota-secret") },
        AppConfig {
            enable_client_messages: false,
            enable_user_authentication: false,
            ..full("plain-id", "plain-key", "plain-secret")
        },
    ]
}

/// The configuration tests start from: the embedded default with the test apps.
pub fn test_config() -> Config {
    let mut c = config::load(None, &Default::default()).expect("embedded default config is valid");
    c.host = "127.0.0.1".into();
    c.metrics.host = "127.0.0.1".into();
    c.subscription_count_debounce_ms = 20;
    // The first in-process server installs the process-wide log subscriber: keep test output quiet.
    c.log_level = Some("error".into());
    c.shutdown_grace_period = 3;
    c.app_manager.array.apps = test_apps();
    c
}

pub struct TestServer {
    pub port: u16,
    pub metrics_port: u16,
    trigger: ShutdownTrigger,
    handle: JoinHandle<anyhow::Result<()>>,
    http: reqwest::Client,
}

impl TestServer {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(f: impl FnOnce(&mut Config)) -> Self {
        let mut config = test_config();
        f(&mut config);
        config.validate().expect("test config is valid");
        let main = TcpListener::bind("127.0.0.1:0").await.expect("bind main");
        let port = main.local_addr().expect("addr").port();
        let (metrics, metrics_port) = if config.metrics.enabled {
            let l = TcpListener::bind("127.0.0.1:0").await.expect("bind metrics");
            let p = l.local_addr().expect("addr").port();
            (Some(l), p)
        } else {
            (None, 0)
        };
        let (trigger, stop) = shutdown::channel();
        let handle = tokio::spawn(server::run(config, Listeners { main, metrics }, stop));
        Self { port, metrics_port, trigger, handle, http: reqwest::Client::new() }
    }

    /// Triggers shutdown and waits (bounded) for `run` to return.
    pub async fn stop(self) {
        self.trigger.trigger();
        let r = tokio::time::timeout(Duration::from_secs(15), self.handle).await;
        r.expect("server stops within 15 s").expect("server task").expect("server run ok");
    }

    pub fn trigger_shutdown(&self) {
        self.trigger.trigger();
    }

    pub fn ws_url(&self, key: &str, query: &str) -> String {
        format!("ws://127.0.0.1:{}/app/{key}?{query}", self.port)
    }

    pub fn http_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// A connected client of the default app.
    pub async fn client(&self) -> Client {
        Client::connect(&self.ws_url(KEY, "protocol=7&client=rust&version=0.1")).await
    }

    pub async fn client_of(&self, key: &str) -> Client {
        Client::connect(&self.ws_url(key, "protocol=7")).await
    }

    /// A signed API request to the default app.
    pub async fn api(&self, method: &str, path: &str, params: &[(&str, &str)], body: Option<Value>) -> (u16, Value) {
        self.api_as(APP_ID, KEY, SECRET, method, path, params, body).await
    }

    #[allow(clippy::too_many_arguments)]
    pub async fn api_as(
        &self,
        app_id: &str,
        key: &str,
        secret: &str,
        method: &str,
        path: &str,
        params: &[(&str, &str)],
        body: Option<Value>,
    ) -> (u16, Value) {
        let full_path = format!("/apps/{app_id}{path}");
        let body = body.map(|b| b.to_string());
        let query = signed_query(key, secret, method, &full_path, params, body.as_deref(), now());
        self.raw_request(method, &format!("{full_path}?{query}"), body).await
    }

    /// An arbitrary request; the body is returned as JSON (or as a string when it is not JSON).
    pub async fn raw_request(&self, method: &str, path_and_query: &str, body: Option<String>) -> (u16, Value) {
        let m = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let mut req = self.http.request(m, self.http_url(path_and_query));
        if let Some(b) = body {
            req = req.header("content-type", "application/json").body(b);
        }
        let resp = tokio::time::timeout(WAIT, req.send()).await.expect("request in time").expect("request");
        let status = resp.status().as_u16();
        let text = resp.text().await.expect("body");
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    pub async fn publish(&self, channel: &str, event: &str, data: &str) -> (u16, Value) {
        self.api("POST", "/events", &[], Some(json!({"name": event, "channel": channel, "data": data}))).await
    }

    /// The Prometheus text of `/metrics`.
    pub async fn scrape(&self) -> String {
        let url = format!("http://127.0.0.1:{}/metrics", self.metrics_port);
        let resp =
            tokio::time::timeout(WAIT, self.http.get(url).send()).await.expect("scrape in time").expect("scrape");
        resp.text().await.expect("text")
    }

    /// One sample's value, `None` when the series is absent.
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        sample(&self.scrape().await, name, labels)
    }
}

pub fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_secs()
}

/// The query string of a signed API request (Pusher's algorithm, written independently of
/// the server's verifier except for the HMAC primitive).
pub fn signed_query(
    key: &str,
    secret: &str,
    method: &str,
    path: &str,
    params: &[(&str, &str)],
    body: Option<&str>,
    ts: u64,
) -> String {
    let mut all: Vec<(String, String)> = vec![
        ("auth_key".into(), key.into()),
        ("auth_timestamp".into(), ts.to_string()),
        ("auth_version".into(), "1.0".into()),
    ];
    if let Some(b) = body {
        all.push(("body_md5".into(), sockudo::auth::body_md5(b.as_bytes())));
    }
    for (k, v) in params {
        all.push((k.to_string(), v.to_string()));
    }
    all.sort();
    let canonical = all.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join("&");
    let sig = sockudo::auth::sign(secret, &format!("{method}\n{path}\n{canonical}"));
    let encoded: String = form_urlencoded::Serializer::new(String::new()).extend_pairs(all.iter()).finish();
    format!("{encoded}&auth_signature={sig}")
}

/// A signed `POST /apps/{APP_ID}/events` with `body` to a server on `port` (an in-process one
/// or a child process), optionally inside the caller's trace. Returns the status and the
/// signed query string it used.
pub async fn signed_publish(port: u16, body: &str, traceparent: Option<&str>) -> (u16, String) {
    let headers: Vec<(&str, &str)> = traceparent.map(|tp| ("traceparent", tp)).into_iter().collect();
    signed_publish_with(port, body, &headers).await
}

/// The same, with any request headers (`traceparent`, `baggage`, ...).
pub async fn signed_publish_with(port: u16, body: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let path = format!("/apps/{APP_ID}/events");
    let query = signed_query(KEY, SECRET, "POST", &path, &[], Some(body), now());
    let mut req = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{port}{path}?{query}"))
        .header("content-type", "application/json")
        .body(body.to_owned());
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let status = tokio::time::timeout(WAIT, req.send()).await.expect("publish in time").expect("publish").status();
    (status.as_u16(), query)
}

/// Reads one sample from Prometheus text.
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        let (n, rest) = match series.find('{') {
            Some(i) => (&series[..i], &series[i..]),
            None => (series, ""),
        };
        if n != name {
            return None;
        }
        let ok = labels.iter().all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")));
        if ok {
            value.parse().ok()
        } else {
            None
        }
    })
}

/// Retries `check` until it returns true or `within` passes.
pub async fn eventually<F, Fut>(within: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A raw Pusher protocol client.
pub struct Client {
    pub ws: Ws,
    pub socket_id: String,
}

/// What the server ended the socket with.
#[derive(Debug, PartialEq)]
pub enum Closed {
    Code(u16),
    NoFrame,
}

impl Client {
    pub async fn open(url: &str) -> Ws {
        let (ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url))
            .await
            .expect("connect in time")
            .expect("connect");
        ws
    }

    pub async fn connect(url: &str) -> Self {
        let mut ws = Self::open(url).await;
        let first = next_json(&mut ws).await;
        assert_eq!(first["event"], "pusher:connection_established", "{first}");
        let data: Value = serde_json::from_str(first["data"].as_str().expect("data is a string")).expect("data json");
        let socket_id = data["socket_id"].as_str().expect("socket_id").to_owned();
        Self { ws, socket_id }
    }

    pub async fn send(&mut self, v: Value) {
        self.ws.send(Message::Text(v.to_string().into())).await.expect("send");
    }

    pub async fn send_text(&mut self, s: &str) {
        self.ws.send(Message::Text(s.to_owned().into())).await.expect("send");
    }

    /// The next frame, skipping debounced `subscription_count` frames (they arrive on their
    /// own schedule; tests that want them use `expect_for`).
    pub async fn next(&mut self) -> Value {
        loop {
            let v = next_json(&mut self.ws).await;
            if v["event"] != "pusher_internal:subscription_count" {
                return v;
            }
        }
    }

    /// The next frame with this event name (frames before it are skipped).
    pub async fn expect(&mut self, event: &str) -> Value {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let v = tokio::time::timeout(left, next_json(&mut self.ws))
                .await
                .unwrap_or_else(|_| panic!("no {event} within {WAIT:?}"));
            if v["event"] == event {
                return v;
            }
        }
    }

    pub async fn subscribe(&mut self, channel: &str) -> Value {
        self.send(json!({"event": "pusher:subscribe", "data": {"channel": channel}})).await;
        self.expect_for("pusher_internal:subscription_succeeded", channel).await
    }

    pub fn auth(&self, secret: &str, channel: &str, channel_data: Option<&str>) -> String {
        let msg = match channel_data {
            Some(d) => format!("{}:{channel}:{d}", self.socket_id),
            None => format!("{}:{channel}", self.socket_id),
        };
        format!("{KEY}:{}", sockudo::auth::sign(secret, &msg))
    }

    pub async fn subscribe_private(&mut self, channel: &str) -> Value {
        let auth = self.auth(SECRET, channel, None);
        self.send(json!({"event": "pusher:subscribe", "data": {"channel": channel, "auth": auth}})).await;
        self.expect_for("pusher_internal:subscription_succeeded", channel).await
    }

    pub async fn subscribe_presence(&mut self, channel: &str, user_id: &str) -> Value {
        let data = json!({"user_id": user_id, "user_info": {"name": format!("user {user_id}")}}).to_string();
        let auth = self.auth(SECRET, channel, Some(&data));
        self.send(
            json!({"event": "pusher:subscribe", "data": {"channel": channel, "auth": auth, "channel_data": data}}),
        )
        .await;
        self.expect_for("pusher_internal:subscription_succeeded", channel).await
    }

    /// The next frame with this event name on this channel.
    pub async fn expect_for(&mut self, event: &str, channel: &str) -> Value {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let v = tokio::time::timeout(left, next_json(&mut self.ws))
                .await
                .unwrap_or_else(|_| panic!("no {event} on {channel} within {WAIT:?}"));
            if v["event"] == event && v["channel"] == channel {
                return v;
            }
        }
    }

    /// Reads until the server closes; returns the close code (frames before it are skipped).
    pub async fn closed(&mut self) -> Closed {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.ws.next()).await.expect("server closes in time") {
                Some(Ok(Message::Close(Some(f)))) => return Closed::Code(u16::from(f.code)),
                Some(Ok(Message::Close(None))) | None | Some(Err(_)) => return Closed::NoFrame,
                Some(Ok(_)) => continue,
            }
        }
    }

    pub async fn close(mut self) {
        let _ = self
            .ws
            .close(Some(tokio_tungstenite::tungstenite::protocol::CloseFrame {
                code: CloseCode::Normal,
                reason: "".into(),
            }))
            .await;
        // Wait for the server's close reply (bounded) so that its cleanup has run.
        let _ = tokio::time::timeout(WAIT, async { while let Some(Ok(_)) = self.ws.next().await {} }).await;
    }
}

/// The next text frame as JSON, skipping WebSocket pings.
pub async fn next_json(ws: &mut Ws) -> Value {
    loop {
        let msg = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("a frame in time")
            .expect("stream open")
            .expect("frame ok");
        match msg {
            Message::Text(t) => return serde_json::from_str(t.as_str()).expect("server sends JSON"),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected frame {other:?}"),
        }
    }
}

/// The `data` of a frame, decoded when it is a JSON string.
pub fn data(frame: &Value) -> Value {
    match &frame["data"] {
        Value::String(s) => serde_json::from_str(s).unwrap_or(Value::String(s.clone())),
        other => other.clone(),
    }
}
