//! A private, durable `redis-server` (append-only file, fsync on every write) or `nats-server`
//! (JetStream on disk) on a free port with its data in a temporary folder, which a test can
//! SIGKILL and start again on the same port and data; plus the few reads a test makes of the
//! broker directly (Redis commands, and JetStream's JSON API over core NATS requests, so that
//! the tests need no client feature of their own).

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::process::{Child, Command};

use super::eventually;
use super::process::free_port;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Redis,
    Nats,
}

impl Kind {
    /// The name `webhooks.queue_driver` and `adapter.driver` use.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Redis => "redis",
            Kind::Nats => "nats",
        }
    }
}

/// A broker process and its data folder, both gone when the test ends however it ends.
pub struct DurableBroker {
    pub kind: Kind,
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl DurableBroker {
    pub async fn start(kind: Kind) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "sockudo-durable-{}-{}-{}",
            kind.name(),
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let mut broker = Self { kind, port: free_port(), dir, child: None };
        broker.restart().await;
        broker
    }

    /// Starts the process (again) on the same port and data folder and waits until it listens.
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "the broker is already running");
        let (port, dir) = (self.port.to_string(), self.dir.to_string_lossy().into_owned());
        let mut cmd = match self.kind {
            Kind::Redis => {
                let mut c = Command::new("redis-server");
                c.args(["--port", &port, "--bind", "127.0.0.1", "--dir", &dir, "--save", ""]);
                c.args(["--appendonly", "yes", "--appendfsync", "always"]);
                c
            }
            Kind::Nats => {
                let mut c = Command::new("nats-server");
                c.args(["-a", "127.0.0.1", "-p", &port, "-js", "-sd", &dir]);
                c
            }
        };
        let child = cmd
            .current_dir(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("{}: {e}", self.kind.name()));
        self.child = Some(child);
        let up = eventually(Duration::from_secs(15), || async { self.ping().await }).await;
        assert!(up, "{} did not come up on {}", self.kind.name(), self.port);
    }

    /// Whether the broker answers (Redis has loaded its data; NATS has JetStream ready).
    async fn ping(&self) -> bool {
        match self.kind {
            Kind::Redis => {
                let r: Option<String> = self.redis(redis::cmd("PING")).await;
                r.as_deref() == Some("PONG")
            }
            Kind::Nats => self.js("$JS.API.INFO", json!({})).await.is_some_and(|v| v.get("error").is_none()),
        }
    }

    /// SIGKILL: the broker dies at once (its data on disk stays).
    pub async fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().await.unwrap();
            let _ = c.wait().await;
        }
    }

    pub fn url(&self) -> String {
        match self.kind {
            Kind::Redis => format!("redis://127.0.0.1:{}", self.port),
            Kind::Nats => format!("nats://127.0.0.1:{}", self.port),
        }
    }

    /// One Redis command; `None` when Redis cannot be reached or answers an error.
    pub async fn redis<T: redis::FromRedisValue>(&self, cmd: redis::Cmd) -> Option<T> {
        let go = async {
            let client = redis::Client::open(self.url()).ok()?;
            let mut conn = client.get_multiplexed_async_connection().await.ok()?;
            cmd.query_async::<T>(&mut conn).await.ok()
        };
        tokio::time::timeout(Duration::from_secs(5), go).await.ok().flatten()
    }

    /// A JetStream API request (`$JS.API.…`) and its JSON answer; `None` when NATS cannot be
    /// reached or does not answer.
    pub async fn js(&self, subject: &str, body: Value) -> Option<Value> {
        let go = async {
            let client = async_nats::connect(self.url()).await.ok()?;
            let reply = client.request(subject.to_owned(), body.to_string().into()).await.ok()?;
            serde_json::from_slice::<Value>(&reply.payload).ok()
        };
        tokio::time::timeout(Duration::from_secs(5), go).await.ok().flatten()
    }

    /// `$JS.API.STREAM.INFO`: `None` when the stream does not exist or NATS is away.
    pub async fn stream_info(&self, stream: &str) -> Option<Value> {
        let info = self.js(&format!("$JS.API.STREAM.INFO.{stream}"), json!({})).await?;
        info.get("error").is_none().then_some(info)
    }

    /// The payloads of every message stored in `stream`, oldest first.
    pub async fn stream_payloads(&self, stream: &str) -> Vec<Vec<u8>> {
        let Some(info) = self.stream_info(stream).await else { return Vec::new() };
        let (first, last) =
            (info["state"]["first_seq"].as_u64().unwrap_or(1), info["state"]["last_seq"].as_u64().unwrap_or(0));
        let mut out = Vec::new();
        for seq in first..=last {
            let got = self.js(&format!("$JS.API.STREAM.MSG.GET.{stream}"), json!({"seq": seq})).await;
            if let Some(data) = got.as_ref().and_then(|v| v["message"]["data"].as_str()) {
                out.push(base64_decode(data));
            }
        }
        out
    }
}

impl Drop for DurableBroker {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.start_kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Standard base64 (JetStream's message API encodes payloads with it); other bytes are skipped.
pub fn base64_decode(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' | b'-' => Some(62),
        b'/' | b'_' => Some(63),
        _ => None,
    };
    let (mut out, mut acc, mut bits) = (Vec::new(), 0u32, 0u32);
    for v in text.bytes().filter_map(value) {
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    out
}

#[test]
fn base64_decodes() {
    assert_eq!(base64_decode("aGVsbG8gd29ybGQ="), b"hello world");
    assert_eq!(base64_decode("eyJhIjoxfQ=="), br#"{"a":1}"#);
}
