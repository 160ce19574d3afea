//! The Pusher protocol as the tool speaks it: WebSocket clients (connect with an optional
//! source address, wait for `pusher:connection_established`, subscribe, answer pings) and the
//! signed HTTP events API used by the publisher (auth_version 1.0, HMAC-SHA256 over
//! `POST\n/apps/{id}/events\n{sorted query}`), over a pool of keep-alive connections.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use hmac::{Hmac, Mac};
use md5::{Digest, Md5};
use serde::Deserialize;
use serde_json::value::RawValue;
use sha2::Sha256;
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::tls::TlsTarget;

/// A client WebSocket.
pub type Ws = WebSocketStream<TcpStream>;

/// Where the server is and which app to use.
#[derive(Debug, Clone)]
pub struct Target {
    pub host: String,
    pub port: u16,
    pub app_id: String,
    pub key: String,
    pub secret: String,
    /// The resolved server address.
    pub addr: SocketAddr,
    /// Bound on each step of opening a connection (TCP, handshake, welcome, subscription).
    pub timeout: Duration,
    /// `wss://` and `https://` instead of `ws://` and `http://`.
    pub tls: Option<TlsTarget>,
}

impl Target {
    /// Resolves `host:port` once.
    pub async fn resolve(
        host: &str,
        port: u16,
        app_id: &str,
        key: &str,
        secret: &str,
        timeout: Duration,
        tls: Option<TlsTarget>,
    ) -> Result<Self, String> {
        let addr = tokio::net::lookup_host((host, port))
            .await
            .map_err(|e| format!("cannot resolve {host}:{port}: {e}"))?
            .next()
            .ok_or_else(|| format!("{host}:{port} resolves to no address"))?;
        Ok(Self {
            host: host.to_owned(),
            port,
            app_id: app_id.to_owned(),
            key: key.to_owned(),
            secret: secret.to_owned(),
            addr,
            timeout,
            tls,
        })
    }

    /// `host:port` as the `Host` header and URLs want it (IPv6 in brackets).
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// The WebSocket URL of the app.
    pub fn ws_url(&self) -> String {
        let scheme = if self.tls.is_some() { "wss" } else { "ws" };
        format!("{scheme}://{}{}", self.authority(), self.ws_path())
    }

    /// The path and query of the app's WebSocket endpoint.
    pub fn ws_path(&self) -> String {
        format!("/app/{}?protocol=7&client=sockudo-bench&version=0.1", self.key)
    }

    /// Whether source addresses 127.0.0.x can be used to reach the server.
    pub fn is_loopback_v4(&self) -> bool {
        matches!(self.addr.ip(), IpAddr::V4(ip) if ip.is_loopback())
    }

    /// The source address for connection number `i` when cycling over `k` loopback addresses
    /// (127.0.0.1 ..= 127.0.0.k); `None` when `k` is 0 or the server is not on IPv4 loopback.
    pub fn source_for(&self, i: usize, k: usize) -> Option<IpAddr> {
        if k == 0 || !self.is_loopback_v4() {
            return None;
        }
        let last = u8::try_from(1 + i % k).unwrap_or(1);
        Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, last)))
    }
}

/// How far a connection attempt got before it failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stage {
    Tcp,
    /// The TLS handshake (`wss://` targets).
    Tls,
    Handshake,
    Welcome,
    Subscribe,
    Unsubscribe,
    Close,
}

impl Stage {
    pub fn name(self) -> &'static str {
        match self {
            Stage::Tcp => "tcp_connect",
            Stage::Tls => "tls_handshake",
            Stage::Handshake => "ws_handshake",
            Stage::Welcome => "connection_established",
            Stage::Subscribe => "subscribe",
            Stage::Unsubscribe => "unsubscribe",
            Stage::Close => "close",
        }
    }
}

/// A failed step, with the reason.
#[derive(Debug, Clone)]
pub struct Failure {
    pub stage: Stage,
    pub detail: String,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.stage.name(), self.detail)
    }
}

pub fn fail(stage: Stage, detail: impl fmt::Display) -> Failure {
    Failure { stage, detail: detail.to_string() }
}

/// A Pusher frame, parsed without copying.
#[derive(Debug, Deserialize)]
pub struct Frame<'a> {
    #[serde(borrow)]
    pub event: &'a str,
    #[serde(borrow, default)]
    pub channel: Option<&'a str>,
    #[serde(borrow, default)]
    pub data: Option<&'a RawValue>,
}

impl<'a> Frame<'a> {
    pub fn parse(text: &'a str) -> Option<Self> {
        serde_json::from_str(text).ok()
    }
}

/// The reply to a `pusher:ping`.
pub const PONG: &str = r#"{"event":"pusher:pong","data":{}}"#;

/// The reply to a `pusher:ping`, as a message.
pub fn pong() -> Message {
    Message::text(PONG)
}

/// The `pusher:subscribe` frame for a public channel.
pub fn subscribe_json(channel: &str) -> String {
    serde_json::json!({"event": "pusher:subscribe", "data": {"channel": channel}}).to_string()
}

pub fn subscribe_msg(channel: &str) -> Message {
    Message::text(subscribe_json(channel))
}

pub fn unsubscribe_msg(channel: &str) -> Message {
    Message::text(serde_json::json!({"event": "pusher:unsubscribe", "data": {"channel": channel}}).to_string())
}

/// WebSocket buffers: small for the many idle connections, larger for busy subscribers.
pub fn ws_config(busy: bool) -> WebSocketConfig {
    if busy {
        WebSocketConfig::default().read_buffer_size(64 * 1024).write_buffer_size(0)
    } else {
        WebSocketConfig::default().read_buffer_size(4 * 1024).write_buffer_size(0)
    }
}

/// A TCP socket of `target`'s address family, for options to be set before [`connect_tcp`].
pub fn tcp_socket(target: &Target) -> Result<TcpSocket, Failure> {
    match target.addr {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }
    .map_err(|e| fail(Stage::Tcp, e))
}

/// Binds `socket` to `source` (if given), connects it within `target.timeout` and sets
/// `TCP_NODELAY`.
pub async fn connect_tcp(target: &Target, socket: TcpSocket, source: Option<IpAddr>) -> Result<TcpStream, Failure> {
    if let Some(ip) = source {
        socket.bind(SocketAddr::new(ip, 0)).map_err(|e| fail(Stage::Tcp, format!("bind {ip}: {e}")))?;
    }
    let stream = tokio::time::timeout(target.timeout, socket.connect(target.addr))
        .await
        .map_err(|_| fail(Stage::Tcp, "timed out"))?
        .map_err(|e| fail(Stage::Tcp, e))?;
    stream.set_nodelay(true).map_err(|e| fail(Stage::Tcp, e))?;
    Ok(stream)
}

/// Opens a TCP connection (from `source` if given), runs the WebSocket handshake and waits
/// for `pusher:connection_established`. Every step is bounded by `target.timeout`.
pub async fn open(target: &Target, source: Option<IpAddr>, config: WebSocketConfig) -> Result<Ws, Failure> {
    let stream = connect_tcp(target, tcp_socket(target)?, source).await?;
    let (mut ws, _) = tokio::time::timeout(
        target.timeout,
        tokio_tungstenite::client_async_with_config(target.ws_url(), stream, Some(config)),
    )
    .await
    .map_err(|_| fail(Stage::Handshake, "timed out"))?
    .map_err(|e| fail(Stage::Handshake, e))?;
    wait_event(&mut ws, "pusher:connection_established", None, target.timeout, Stage::Welcome).await?;
    Ok(ws)
}

/// Subscribes to a public channel and waits for `pusher_internal:subscription_succeeded`.
pub async fn subscribe(ws: &mut Ws, channel: &str, timeout: Duration) -> Result<(), Failure> {
    ws.send(subscribe_msg(channel)).await.map_err(|e| fail(Stage::Subscribe, e))?;
    wait_event(ws, "pusher_internal:subscription_succeeded", Some(channel), timeout, Stage::Subscribe).await
}

/// Sends a close frame and waits (bounded) for the server to end the connection.
pub async fn close(mut ws: Ws, timeout: Duration) -> Result<(), Failure> {
    let finish = async {
        ws.close(None).await.map_err(|e| fail(Stage::Close, e))?;
        while let Some(msg) = ws.next().await {
            if msg.is_err() {
                break;
            }
        }
        Ok(())
    };
    tokio::time::timeout(timeout, finish).await.map_err(|_| fail(Stage::Close, "timed out"))?
}

/// Reads until the named event arrives (on `channel`, if given), answering pings and failing
/// on `pusher:error`, on close, or after `timeout`.
pub async fn wait_event(
    ws: &mut Ws,
    event: &str,
    channel: Option<&str>,
    timeout: Duration,
    stage: Stage,
) -> Result<(), Failure> {
    let wait = async {
        loop {
            let msg = match ws.next().await {
                Some(Ok(m)) => m,
                Some(Err(e)) => return Err(fail(stage, e)),
                None => return Err(fail(stage, "connection closed")),
            };
            let text = match &msg {
                Message::Text(t) => t.as_str(),
                Message::Close(c) => return Err(fail(stage, format!("closed by server: {c:?}"))),
                _ => continue,
            };
            let Some(frame) = Frame::parse(text) else {
                continue;
            };
            if frame.event == event && (channel.is_none() || frame.channel == channel) {
                return Ok(());
            }
            match frame.event {
                "pusher:ping" => ws.send(pong()).await.map_err(|e| fail(stage, e))?,
                "pusher:error" => return Err(fail(stage, format!("pusher:error {text}"))),
                _ => {}
            }
        }
    };
    tokio::time::timeout(timeout, wait).await.map_err(|_| fail(stage, format!("no {event} within {timeout:?}")))?
}

/// Publishes events over the signed HTTP API on a pool of keep-alive connections.
#[derive(Clone)]
pub struct Publisher {
    client: reqwest::Client,
    url: String,
    path: String,
    key: String,
    secret: String,
}

/// How a publish ended.
pub enum PublishOutcome {
    Ok,
    Status(u16),
    Transport(String),
}

impl Publisher {
    /// `pool` is the number of keep-alive connections kept open (the publish concurrency).
    pub fn new(target: &Target, pool: usize) -> Result<Self, String> {
        let builder = match &target.tls {
            Some(tls) => reqwest::Client::builder().use_preconfigured_tls((*tls.config).clone()),
            None => reqwest::Client::builder(),
        };
        let client = builder
            .no_proxy()
            .pool_max_idle_per_host(pool)
            .pool_idle_timeout(Duration::from_secs(90))
            .tcp_nodelay(true)
            .connect_timeout(target.timeout)
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| format!("http client: {e}"))?;
        let path = format!("/apps/{}/events", target.app_id);
        Ok(Self {
            client,
            url: format!("{}://{}{}", if target.tls.is_some() { "https" } else { "http" }, target.authority(), path),
            path,
            key: target.key.clone(),
            secret: target.secret.clone(),
        })
    }

    /// The signed query string for a POST of `body`, at `timestamp` (unix seconds).
    pub fn signed_query(&self, body: &[u8], timestamp: u64) -> String {
        let body_md5 = hex::encode(Md5::digest(body));
        // Already in sorted key order.
        let query = format!("auth_key={}&auth_timestamp={timestamp}&auth_version=1.0&body_md5={body_md5}", self.key);
        let to_sign = format!("POST\n{}\n{query}", self.path);
        let signature = match Hmac::<Sha256>::new_from_slice(self.secret.as_bytes()) {
            Ok(mut mac) => {
                mac.update(to_sign.as_bytes());
                hex::encode(mac.finalize().into_bytes())
            }
            // HMAC takes keys of any length; this arm is unreachable in practice.
            Err(_) => String::new(),
        };
        format!("{query}&auth_signature={signature}")
    }

    /// Publishes one `bench` event with the given string data on `channel`.
    pub async fn publish(&self, channel: &str, data: &str) -> PublishOutcome {
        let body = serde_json::json!({"name": "bench", "channel": channel, "data": data}).to_string().into_bytes();
        let timestamp = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let url = format!("{}?{}", self.url, self.signed_query(&body, timestamp));
        let sent = self.client.post(url).header("content-type", "application/json").body(body).send().await;
        match sent {
            Ok(resp) => {
                let status = resp.status().as_u16();
                // Read the body so the connection goes back to the pool.
                let _ = resp.bytes().await;
                if status == 200 {
                    PublishOutcome::Ok
                } else {
                    PublishOutcome::Status(status)
                }
            }
            Err(e) => PublishOutcome::Transport(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target() -> Target {
        Target {
            host: "127.0.0.1".into(),
            port: 6001,
            app_id: "3".into(),
            key: "278d425bdf160c739803".into(),
            secret: "7ad3773142a6692b25b8".into(),
            addr: "127.0.0.1:6001".parse().expect("literal address"),
            timeout: Duration::from_secs(1),
            tls: None,
        }
    }

    #[test]
    fn signs_like_the_pusher_docs() {
        // The worked example from Pusher's "Generating authentication signatures" page.
        let p = Publisher::new(&target(), 1).expect("client");
        let body = br#"{"name":"foo","channels":["project-3"],"data":"{\"some\":\"data\"}"}"#;
        let q = p.signed_query(body, 1353088179);
        assert!(q.contains("body_md5=ec365a775a4cd0599faeb73354201b6f"), "{q}");
        assert!(q.ends_with("auth_signature=da454824c97ba181a32ccc17a72625ba02771f50b50e1e7430e47a1f3f457e6c"), "{q}");
    }

    #[test]
    fn parses_frames_without_copying() {
        let f = Frame::parse(r#"{"event":"bench","channel":"c","data":"1:2:3"}"#).expect("frame");
        assert_eq!((f.event, f.channel), ("bench", Some("c")));
    }

    #[test]
    fn cycles_source_addresses() {
        let t = target();
        assert_eq!(t.source_for(0, 3), Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1))));
        assert_eq!(t.source_for(4, 3), Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2))));
        assert_eq!(t.source_for(4, 0), None);
    }
}
